"""Benchmark: the gallery's 3D viewer in headless Chromium on software WebGL (page load to first
drawn frame) and the .splat web export's size against the .ply.

Usage::

    python benchmarks/gallery.py                 # 20k and 100k Gaussians, 3 page loads each
    python benchmarks/gallery.py --sizes 20000 --repeats 1
    python benchmarks/gallery.py --smoke         # 2k Gaussians, one load: the test suite's run

Prints one JSON object on stdout.

Setup (not timed): one avatar per size with Gaussians sampled on the studio's procedural head
(:func:`avat3r_core.synthetic.surface.head_surface_gaussians`, SH degree 0 as the model writes
them: 17 float32 per Gaussian in the .ply), its ``meta.json`` framing and an ``index.parquet``;
``avat3r gallery`` builds the site (its wall time, the .splat conversions included, is reported
as ``build_s``), served by the standard library's file server on 127.0.0.1.

* ``first_frame_ms``: ``performance.now()`` (ms since navigation start) when the viewer first puts
  splats on the canvas (web/viewer.js reads the frame back right after the viewer's render), for
  the avatar page as built (``splat``) and for the same page loading the ``.ply`` instead
  (``ply``, the reference, same viewer, same run); median of ``--repeats`` loads, each in a fresh
  browser context (no HTTP cache), after one untimed load that warms the browser's shader
  cache. ``ply_vs_splat`` = ply / splat. ``loaded_ms``: when the viewer's
  ``addSplatScene`` resolved (file fetched, parsed, uploaded).
* ``bytes``: file sizes; ``splat_vs_ply`` = .splat / .ply.

Chromium: Debian's ``/usr/bin/chromium`` with SwiftShader (``webgl_renderer`` says which), a
640x480 viewer at device pixel ratio 1. On a shared machine the times move with its load
(``loadavg`` is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WAIT = "window.avat3rViewer && window.avat3rViewer.state !== 'loading'"


def avatar_id(n: int) -> str:
    return f"head_{n}"


def make_library(root: Path, sizes: list[int]) -> None:
    import pyarrow as pa

    from avat3r_core import storage
    from avat3r_core.synthetic.head import build_head_model
    from avat3r_core.synthetic.surface import head_surface_gaussians

    model = build_head_model(0)
    rows = []
    for n in sizes:
        head_surface_gaussians(n, seed=0, model=model).save_ply(root / avatar_id(n) / "gaussians_neutral.ply")
        meta = {"id": avatar_id(n), "framing": {"center": [0, 0, 0], "radius": 1.1, "front": [0, 0, 1], "up": [0, 1, 0]},
                "render": {"fov_deg": 20.0}}
        (root / avatar_id(n) / "meta.json").write_text(json.dumps(meta))
        rows.append({"id": avatar_id(n), "status": "ok", "mode": "synthetic", "gaussians": n})
    storage.write_parquet(pa.Table.from_pylist(rows), root / "index.parquet")


def ply_page(site: Path, avatar_id: str, library: Path) -> str:
    """The avatar's page, loading its .ply instead of the .splat (the reference)."""
    folder = site / "avatars" / avatar_id
    (folder / "gaussians_neutral.ply").write_bytes((library / avatar_id / "gaussians_neutral.ply").read_bytes())
    page = (folder / "index.html").read_text()
    marker = '"splat": "gaussians_neutral.splat", "format": "splat"'
    assert marker in page, "the avatar page's viewer configuration changed; update this benchmark"
    (folder / "ply.html").write_text(page.replace(marker, '"splat": "gaussians_neutral.ply", "format": "ply"'))
    return f"avatars/{avatar_id}/ply.html"


def load_times(browser, url: str) -> dict:
    context = browser.new_context(viewport={"width": 900, "height": 700}, device_scale_factor=1)
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_function(WAIT, timeout=300_000)
        state = page.evaluate("({state: avat3rViewer.state, error: avat3rViewer.error, "
                              "first: avat3rViewer.firstFrameMs, loaded: avat3rViewer.loadedMs})")
        if state["state"] != "drawn":
            raise RuntimeError(f"{url}: the viewer did not draw ({state['error']})")
        return {"first_frame_ms": state["first"], "loaded_ms": state["loaded"]}
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run: one small avatar, one load (the test suite runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.repeats = [2000], 1

    from avat3r_core.gallery.browser import CHROMIUM, CHROMIUM_FLAGS, browser_unavailable, chromium, serve, webgl_renderer
    from avat3r_core.gallery.site import build_gallery

    reason = browser_unavailable()
    if reason:
        sys.exit(f"benchmarks/gallery.py: {reason}")
    lock = json.loads((REPO / "web" / "package-lock.json").read_text())["packages"]
    result = {
        "benchmark": "gallery", "python": platform.python_version(), "cpus": os.cpu_count(),
        "chromium": subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip(),
        "chromium_flags": list(CHROMIUM_FLAGS),
        "viewer": {name: lock[f"node_modules/{name}"]["version"] for name in ("@mkkellogg/gaussian-splats-3d", "three")},
        "repeats": args.repeats, "avatars": [],
    }
    with tempfile.TemporaryDirectory(prefix="avat3r-gallery-bench-") as tmp:
        library, site = Path(tmp, "avatars"), Path(tmp, "site")
        make_library(library, args.sizes)
        start = time.perf_counter()
        summary = build_gallery(library, site)
        result["build_s"] = round(time.perf_counter() - start, 3)
        with serve(site) as base, chromium() as browser:
            probe = browser.new_page()
            result["webgl_renderer"] = webgl_renderer(probe)
            probe.close()
            sizes = {avatar_id(n): n for n in args.sizes}
            # one untimed load first: the browser's shader and module caches are then warm for every timed one
            load_times(browser, f"{base}/avatars/{avatar_id(min(args.sizes))}/index.html")
            for record in sorted(summary["records"], key=lambda r: sizes[r["id"]]):
                n = sizes[record["id"]]
                urls = {"splat": f"{base}/avatars/{record['id']}/index.html",
                        "ply": f"{base}/{ply_page(site, record['id'], library)}"}
                runs: dict[str, list[dict]] = {"splat": [], "ply": []}
                for _ in range(args.repeats):  # interleaved, so load drift hits both alike
                    for kind, url in urls.items():
                        runs[kind].append(load_times(browser, url))
                first = {k: round(statistics.median(r["first_frame_ms"] for r in v), 1) for k, v in runs.items()}
                loaded = {k: round(statistics.median(r["loaded_ms"] for r in v), 1) for k, v in runs.items()}
                result["avatars"].append({
                    "id": record["id"], "gaussians": n,
                    "bytes": {"ply": record["ply_bytes"], "splat": record["splat_bytes"]},
                    "splat_vs_ply": record["splat_vs_ply"],
                    "first_frame_ms": first, "ply_vs_splat": round(first["ply"] / first["splat"], 3),
                    "loaded_ms": loaded,
                    "first_frame_ms_all": {k: [r["first_frame_ms"] for r in v] for k, v in runs.items()},
                })
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
