"""The web gallery: the .splat export, the site builder, and the site in a real browser.

The library here is written with the project's writers (``Gaussians.save_ply`` on Gaussians
sampled on the studio head, H.264 through PyAV, PNG through Pillow, a hand-written meta.json and
index.parquet in the reconstruct stage's column layout), plus an avatar whose files are missing,
one whose .ply is corrupt and one failed row. The .splat records are decoded here with numpy from
the layout's published description, not with project code. The browser test opens the site
served on 127.0.0.1 in Debian's Chromium (software WebGL), and skips, saying why, where Chromium
or playwright is missing.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.gallery.browser import browser_unavailable, chromium, serve, webgl_renderer
from avat3r_core.gallery.site import GalleryConfig, GalleryError, build_gallery
from avat3r_core.gallery.splat import splat_bytes, write_splat
from avat3r_core.gaussians import SH_C0, Gaussians
from avat3r_core.synthetic.head import build_head_model
from avat3r_core.synthetic.surface import head_surface_gaussians
from avat3r_core.video import encode_video

N_GAUSSIANS = 4000
ARTEFACTS = "gallery-screenshots"


# --------------------------------------------------------------------------- the .splat export
def test_splat_records_match_the_ply(tmp_path):
    gen = torch.Generator().manual_seed(3)
    n = 500
    g = Gaussians(means=torch.randn(n, 3, generator=gen), quats=torch.randn(n, 4, generator=gen) * 3.0,
                  log_scales=torch.randn(n, 3, generator=gen) - 4.0, opacity_logits=torch.randn(n, generator=gen) * 3,
                  sh=torch.randn(n, 4, 3, generator=gen) * 0.8)  # degree 1: the rest bands are dropped
    g.save_ply(tmp_path / "g.ply")
    written = write_splat(tmp_path / "g.ply", tmp_path / "g.splat")
    raw = (tmp_path / "g.splat").read_bytes()
    assert written == len(raw) == 32 * n
    # decode with the layout's own description: 3 f32 position, 3 f32 scale, 4 u8 RGBA, 4 u8 quaternion
    rec = np.frombuffer(raw, dtype=np.dtype([("p", "<f4", 3), ("s", "<f4", 3), ("c", "u1", 4), ("q", "u1", 4)]))
    alpha = 1 / (1 + np.exp(-g.opacity_logits.double().numpy()))
    scales = np.exp(g.log_scales.double().numpy())
    order = np.argsort(-alpha * scales.prod(1), kind="stable")
    assert np.array_equal(rec["p"], g.means.numpy()[order])
    np.testing.assert_allclose(rec["s"], scales[order], rtol=1e-6)
    rgb = np.clip(0.5 + SH_C0 * g.sh[:, 0].double().numpy(), 0, 1)[order]
    assert np.abs(rec["c"][:, :3] / 255.0 - rgb).max() <= 0.5 / 255 + 1e-9
    assert np.abs(rec["c"][:, 3] / 255.0 - alpha[order]).max() <= 0.5 / 255 + 1e-9
    q = g.quats.double().numpy()
    q = (q / np.linalg.norm(q, axis=1, keepdims=True))[order]
    assert np.abs((rec["q"].astype(np.float64) - 128) / 128 - q).max() <= 1 / 128 + 1e-9  # w, x, y, z
    # the most visible records come first (what a progressive loader shows first)
    visible = (rec["c"][:, 3] / 255.0) * rec["s"].prod(1)
    assert visible[0] >= np.median(visible) >= visible[-1]
    assert splat_bytes(g) == raw


def test_splat_export_of_a_broken_ply_names_the_file(tmp_path):
    (tmp_path / "bad.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nend_header\n")
    with pytest.raises(FormatError, match="bad.ply"):
        write_splat(tmp_path / "bad.ply", tmp_path / "bad.splat")
    assert not (tmp_path / "bad.splat").exists()


# --------------------------------------------------------------------------- a small library
def _frames(seed: int, count: int = 4, size: int = 64) -> list[np.ndarray]:
    y, x = np.mgrid[0:size, 0:size]
    return [np.stack([(x * 4 + 40 * t + seed * 60) % 256, (y * 4) % 256, np.full_like(x, 128)], -1).astype(np.uint8)
            for t in range(count)]


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def _avatar(root: Path, avatar_id: str, seed: int, model: dict, csim: float | None, csim_in_meta: bool = False) -> dict:
    folder = root / avatar_id
    folder.mkdir(parents=True)
    head_surface_gaussians(N_GAUSSIANS, seed=seed, model=model).save_ply(folder / "gaussians_neutral.ply")
    (folder / "preview.png").write_bytes(_png(_frames(seed)[0]))
    (folder / "turntable.mp4").write_bytes(encode_video(_frames(seed), fps=8))
    (folder / "animation.mp4").write_bytes(encode_video(_frames(seed + 1), fps=8))
    meta = {"id": avatar_id, "mode": "photos", "position_source": "face_model", "feature_source": "efficientnet_lite0",
            "stand_ins": ["position:face_model", "features:efficientnet_lite0"], "views": ["a.jpg", "b.jpg"],
            "framing": {"center": [0.0, 0.0, 0.0], "radius": 1.1, "front": [0.0, 0.0, 1.0], "up": [0.0, 1.0, 0.0]},
            "render": {"size": 64, "fps": 8, "fov_deg": 20.0}, "stats": {"gaussians": N_GAUSSIANS}}
    if csim_in_meta:
        meta["identity"] = {"csim_arcface": csim, "model": "arcface"}
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    row = {"id": avatar_id, "status": "ok", "mode": "photos", "source": f"people/{avatar_id}",
           "position_source": "face_model", "feature_source": "efficientnet_lite0",
           "stand_ins": "position:face_model,features:efficientnet_lite0", "gaussians": N_GAUSSIANS,
           "prepare_s": 1.5 + seed, "build_s": 2.25, "total_s": 3.75 + seed, "message": ""}
    if csim is not None and not csim_in_meta:
        row["csim_arcface"] = csim
    return row


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("avatars")
    model = build_head_model(0)
    rows = [_avatar(root, "alice", 0, model, 0.71), _avatar(root, "bob", 1, model, 0.42),
            _avatar(root, "carol_missing", 2, model, None), _avatar(root, "dan_corrupt", 3, model, 0.55, csim_in_meta=True)]
    (root / "carol_missing" / "gaussians_neutral.ply").unlink()
    (root / "carol_missing" / "turntable.mp4").unlink()
    ply = root / "dan_corrupt" / "gaussians_neutral.ply"
    ply.write_bytes(ply.read_bytes()[:300])  # truncated mid-header
    rows.append({"id": "erin_failed", "status": "failed", "mode": "image", "source": "people/erin.jpg",
                 "message": "FormatError: people/erin.jpg: no face found (0 detections)"})
    storage.write_parquet(pa.Table.from_pylist(rows), root / "index.parquet")
    return root


@pytest.fixture(scope="module")
def site(library, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "gallery"
    summary = build_gallery(library, out)
    return out, summary


def test_gallery_lists_every_avatar_and_names_what_is_missing(site, library):
    out, summary = site
    records = {r["id"]: r for r in summary["records"]}
    assert set(records) == {"alice", "bob", "carol_missing", "dan_corrupt", "erin_failed"}
    assert [records[k]["status"] for k in sorted(records)] == ["ok", "ok", "incomplete", "incomplete", "failed"]
    assert (summary["ok"], summary["incomplete"], summary["failed"]) == (2, 2, 1)
    assert records["carol_missing"]["problems"] == ["carol_missing/turntable.mp4 is missing",
                                                    "carol_missing/gaussians_neutral.ply is missing (no 3D view)"]
    assert "dan_corrupt/gaussians_neutral.ply could not be converted" in records["dan_corrupt"]["problems"][0]
    assert records["erin_failed"]["message"].startswith("FormatError: people/erin.jpg")
    assert records["alice"]["scores"] == {"csim_arcface": 0.71} and summary["score_columns"] == ["csim_arcface"]
    assert records["dan_corrupt"]["scores"] == {"csim_arcface": 0.55}  # from meta.json's identity section
    # the export sits beside the .ply, 32 bytes a Gaussian, and its size against the .ply is recorded
    alice = records["alice"]
    assert (library / "alice" / "gaussians_neutral.splat").stat().st_size == alice["splat_bytes"] == 32 * N_GAUSSIANS
    assert alice["ply_bytes"] == (library / "alice" / "gaussians_neutral.ply").stat().st_size
    assert alice["splat_vs_ply"] == pytest.approx(32 * N_GAUSSIANS / alice["ply_bytes"], abs=1e-4) and alice["splat_vs_ply"] < 0.5
    assert json.loads((out / "gallery.json").read_text())["records"] == summary["records"]
    # pages: a viewer only where there are Gaussians; the missing files are named on the page
    assert "viewer-config" in (out / "avatars" / "alice" / "index.html").read_text()
    carol = (out / "avatars" / "carol_missing" / "index.html").read_text()
    assert "viewer-config" not in carol and "gaussians_neutral.ply is missing" in carol
    assert "no face found" in (out / "avatars" / "erin_failed" / "index.html").read_text()
    for name in ("vendor/gaussian-splats-3d.module.js", "vendor/three.module.js", "vendor/three.core.js",
                 "assets/viewer.js", "avatars/alice/gaussians_neutral.splat", "avatars/alice/turntable.mp4"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "avatars" / "alice" / "gaussians_neutral.ply").exists()  # the site ships the compact export


def test_gallery_refuses_a_foreign_folder_and_a_missing_index(tmp_path, library):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(GalleryError, match="not a gallery"):
        build_gallery(library, tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="index.parquet"):
        build_gallery(tmp_path, tmp_path / "site")
    with pytest.raises(GalleryError, match="npm ci"):
        build_gallery(library, tmp_path / "site", GalleryConfig(viewer_dir=str(tmp_path)))


def test_cli_gallery(tmp_path, library):
    from pipelines.cli import EXIT_BAD_INPUT, app

    runner = CliRunner()
    res = runner.invoke(app, ["gallery", str(library), "--out", str(tmp_path / "site"), "--title", "people"])
    assert res.exit_code == 0, res.output
    assert "5 avatars: 2 ok, 2 incomplete, 1 failed" in res.output and "carol_missing/turntable.mp4 is missing" in res.output
    assert "<h1>people</h1>" in (tmp_path / "site" / "index.html").read_text()
    again = runner.invoke(app, ["gallery", str(library), "--out", str(tmp_path / "site")])  # rebuilds in place
    assert again.exit_code == 0, again.output
    bad = runner.invoke(app, ["gallery", str(tmp_path / "nothing"), "--out", str(tmp_path / "site2")])
    assert bad.exit_code == EXIT_BAD_INPUT and "index.parquet" in bad.output


# --------------------------------------------------------------------------- in a real browser
def _canvas_rgb(page) -> np.ndarray:
    """The viewer's canvas as the page shows it (the canvas is fully in the viewport)."""
    x, y, w, h = page.eval_on_selector("#viewer canvas", "c => { const r = c.getBoundingClientRect(); "
                                                         "return [Math.ceil(r.x), Math.ceil(r.y), c.clientWidth, c.clientHeight]; }")
    shot = page.screenshot(clip={"x": x, "y": y, "width": w - 1, "height": h - 1})
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), np.int16)


def _covered(rgb: np.ndarray) -> float:
    """Fraction of the canvas not showing the viewer's background (#1e1e1e)."""
    return float((np.abs(rgb - np.array([0x1e, 0x1e, 0x1e])).sum(-1) > 30).mean())


def test_site_in_headless_chromium(site, tmp_path_factory):
    reason = browser_unavailable()
    if reason:
        pytest.skip(reason)
    out, _ = site
    (out / "avatars" / "bob" / "gaussians_neutral.splat").unlink(missing_ok=True)  # gone after the build
    shots = tmp_path_factory.mktemp(ARTEFACTS)
    outside: list[str] = []
    with serve(out) as base, chromium() as browser:
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                   else (outside.append(route.request.url), route.abort()))
        assert "SwiftShader" in webgl_renderer(page)  # software WebGL, as on a machine without a GPU
        # index: every avatar, filter by status and score, sort by score
        page.goto(f"{base}/index.html")
        ids = page.eval_on_selector_all("#avatars tbody tr", "rows => rows.map(r => r.cells[1].dataset.value)")
        assert sorted(ids) == ["alice", "bob", "carol_missing", "dan_corrupt", "erin_failed"]
        visible = "() => Array.from(document.querySelectorAll('#avatars tbody tr')).filter(r => !r.hidden).map(r => r.cells[1].dataset.value)"
        page.select_option("#status-filter", "failed")
        assert page.evaluate(visible) == ["erin_failed"]
        page.select_option("#status-filter", "")
        page.fill("#min-score", "0.5")
        assert page.evaluate(visible) == ["alice", "dan_corrupt"]
        page.fill("#min-score", "")
        page.click("#avatars th:has-text('csim_arcface') button")
        page.click("#avatars th:has-text('csim_arcface') button")  # descending; rows without a score last
        assert page.evaluate(visible) == ["alice", "dan_corrupt", "bob", "carol_missing", "erin_failed"]
        page.screenshot(path=str(shots / "index.png"), full_page=True)

        # an avatar page: the viewer draws the head, and orbiting changes the picture
        page.goto(f"{base}/avatars/alice/index.html")
        page.wait_for_function("window.avat3rViewer && window.avat3rViewer.state !== 'loading'", timeout=60_000)
        status = page.evaluate("({state: avat3rViewer.state, error: avat3rViewer.error, px: avat3rViewer.drawnPixels})")
        assert status["state"] == "drawn", status
        page.wait_for_timeout(500)
        before = _canvas_rgb(page)
        assert 0.05 < _covered(before) < 0.9, _covered(before)  # a head in the frame, not an empty or a filled canvas
        page.screenshot(path=str(shots / "avatar.png"), full_page=True)
        box = page.locator("#viewer canvas").bounding_box()
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(cx, cy)
        page.mouse.down()
        page.mouse.move(cx + 220, cy + 20, steps=4)
        page.mouse.up()
        page.wait_for_timeout(1500)  # the orbit controls' damping settles, the sort catches up
        after = _canvas_rgb(page)
        Image.fromarray(after.astype(np.uint8)).save(shots / "avatar_orbited.png")
        changed = (np.abs(after - before).sum(-1) > 30).mean()
        assert changed > 0.02, changed
        assert _covered(after) > 0.05  # still looking at the head
        for _ in range(6):  # zoom in (each wheel event dollies by a step): the head covers more of the canvas
            page.mouse.wheel(0, -100)
            page.wait_for_timeout(100)
        page.wait_for_timeout(1500)
        assert _covered(_canvas_rgb(page)) > 1.3 * _covered(after), (_covered(after), _covered(_canvas_rgb(page)))
        assert page.evaluate("document.querySelector('video').readyState") >= 1  # H.264 turntable opens
        assert "csim_arcface" in page.inner_text(".facts") and '"position_source": "face_model"' in page.inner_text("pre.meta")

        # missing at build time: says what, no canvas; missing at view time: the viewer says it could not load
        page.goto(f"{base}/avatars/carol_missing/index.html")
        assert page.locator("canvas").count() == 0
        assert "gaussians_neutral.ply is missing" in page.inner_text("#problems")
        assert "No 3D view" in page.inner_text("#no-viewer")
        page.goto(f"{base}/avatars/bob/index.html")
        page.wait_for_function("window.avat3rViewer && window.avat3rViewer.state !== 'loading'", timeout=60_000)
        assert page.evaluate("avat3rViewer.state") == "error"
        assert "Could not load the Gaussians (gaussians_neutral.splat)" in page.inner_text("#viewer-note")
        assert page.is_hidden("#viewer")
    assert outside == []  # nothing fetched from anywhere but the site
    print(f"screenshots: {shots}")


def test_reconstruct_flow_links_the_gallery(prefect_harness, library, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.flows import DataLayout, _publish_gallery

    layout = DataLayout(str(tmp_path / "data"))
    shutil.copytree(library, layout.avatars)
    flow(name="gallery-link")(_publish_gallery)(layout)
    summary = json.loads(Path(layout.gallery, "gallery.json").read_text())
    assert summary["avatars"] == 5 and summary["source"] == layout.avatars
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["avatar-gallery"])))
    assert f"[avatar gallery]({Path(layout.gallery, 'index.html').as_uri()})" in [a.data for a in artifacts]
