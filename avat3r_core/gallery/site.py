"""A static web gallery of an avatar library (``avat3r gallery AVATARS_DIR --out SITE``).

Input: a reconstruct output directory (``index.parquet`` + ``<id>/`` with ``meta.json``, the
``.ply``, ``preview.png``, ``turntable.mp4``, ``animation.mp4``; see ``stages/reconstruct.py``).
Output: a self-contained site that any plain file server shows (``python -m http.server -d SITE``),
nothing fetched from elsewhere at view time::

    index.html                 every avatar: preview, status, mode, prior sources, stand-ins,
                               identity score (``csim*`` columns) where present, timings, errors;
                               sortable and filterable (assets/gallery.js)
    avatars/<id>/index.html    the 3D viewer on the avatar's Gaussians, turntable + animation,
                               meta.json in readable form, and what is missing if anything is
    avatars/<id>/...           copies of the avatar's files (the .splat instead of the .ply)
    assets/                    our page code (web/*.js, web/*.css)
    vendor/                    @mkkellogg/gaussian-splats-3d and three.js from web/node_modules
                               (installed by ``npm ci`` in the set-up step) with their licences
    gallery.json               one record per avatar: status, problems, .ply and .splat sizes

The web export (:mod:`avat3r_core.gallery.splat`) is written beside the avatar's ``.ply`` (kept
while newer than the ``.ply``) and copied into the site. An avatar whose files are missing or
unreadable gets a page saying which, and no viewer; one bad avatar never stops the build.
"""

from __future__ import annotations

import html
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avat3r_core import storage
from avat3r_core.errors import Avat3rError, FormatError
from avat3r_core.gallery.splat import SPLAT_SUFFIX, write_splat
from avat3r_core.reconstruct.build import ANIMATION_FILE as ANIMATION
from avat3r_core.reconstruct.build import META_FILE as META
from avat3r_core.reconstruct.build import PLY_FILE as PLY
from avat3r_core.reconstruct.build import PREVIEW_FILE as PREVIEW
from avat3r_core.reconstruct.build import TURNTABLE_FILE as TURNTABLE

__all__ = ["GalleryConfig", "GalleryError", "build_gallery", "VENDOR_FILES", "SITE_ASSETS"]

INDEX = "index.parquet"
SPLAT = Path(PLY).with_suffix(SPLAT_SUFFIX).name
MARKER = "gallery.json"
REPO_WEB = Path(__file__).resolve().parents[2] / "web"
# site name -> path under the viewer folder (web/): the npm package's ES module build and the
# three.js it imports (three.module.js imports ./three.core.js), with their licences
VENDOR_FILES = {
    "gaussian-splats-3d.module.js": "node_modules/@mkkellogg/gaussian-splats-3d/build/gaussian-splats-3d.module.js",
    "gaussian-splats-3d.LICENSE": "node_modules/@mkkellogg/gaussian-splats-3d/LICENSE",
    "three.module.js": "node_modules/three/build/three.module.js",
    "three.core.js": "node_modules/three/build/three.core.js",
    "three.LICENSE": "node_modules/three/LICENSE",
}
SITE_ASSETS = ("viewer.js", "gallery.js", "gallery.css")
VIEWER_FOV_DEG = 50.0  # the viewer's camera (gaussian-splats-3d's THREE_CAMERA_FOV)


class GalleryError(Avat3rError):
    """The gallery cannot be built at all (viewer package not installed, output not a gallery)."""


@dataclass
class GalleryConfig:
    """``viewer_dir``: the folder with the viewer's package.json and node_modules (default: the
    repository's ``web/``). ``render_fov_deg``: the field of view the avatar's turntable used when
    ``meta.json`` does not say; the viewer's first camera frames the head as the turntable does."""

    title: str = "avat3r avatar library"
    viewer_dir: str = ""
    render_fov_deg: float = 20.0

    @property
    def web_dir(self) -> Path:
        return Path(self.viewer_dir) if self.viewer_dir else REPO_WEB


@dataclass
class AvatarRecord:
    """What the gallery knows of one avatar (one record of ``gallery.json``)."""

    id: str
    status: str  # ok | failed (the reconstruct stage said so) | incomplete (files missing/unreadable)
    row: dict[str, Any]
    meta: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # copied into the site
    ply_bytes: int | None = None
    splat_bytes: int | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        d = asdict(self)
        del d["row"], d["meta"]
        d["splat_vs_ply"] = round(self.splat_bytes / self.ply_bytes, 4) if self.ply_bytes and self.splat_bytes else None
        d["message"] = self.row.get("message") or ""
        return d


# ====================================================================== reading the library
def _read_rows(avatars_dir: Path) -> list[dict]:
    index = avatars_dir / INDEX
    if not index.exists():
        raise FileNotFoundError(f"{index}: no avatar index (run `avat3r reconstruct` to make one)")
    try:
        rows = storage.read_parquet(index).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise FormatError(index, None, f"not a readable Parquet file ({exc})") from exc
    for i, row in enumerate(rows):
        if not row.get("id") or "/" in str(row["id"]) or str(row["id"]).startswith("."):
            raise FormatError(index, "id", f"row {i}: missing or unsafe avatar id {row.get('id')!r}")
    return rows


def _identity_scores(row: dict, meta: dict | None) -> dict[str, float]:
    """Identity-similarity scores: numeric ``csim*`` keys of the index row, of meta.json, or of a
    section of meta.json (``{"identity": {"csim": 0.7}}``); the index row wins."""
    meta = meta or {}
    sources = [v for v in meta.values() if isinstance(v, dict)] + [meta, row]
    scores = {}
    for source in sources:
        for key, value in source.items():
            if (str(key).lower().startswith("csim") and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value)):
                scores[str(key)] = float(value)
    return scores


def _collect(avatars_dir: Path, row: dict) -> AvatarRecord:
    avatar_id = str(row["id"])
    folder = avatars_dir / avatar_id
    failed = row.get("status") == "failed"
    record = AvatarRecord(avatar_id, "failed" if failed else "ok", row)
    meta_path = folder / META
    if meta_path.exists():
        try:
            record.meta = json.loads(meta_path.read_text())
            if not isinstance(record.meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            record.meta = None
            record.problems.append(f"{avatar_id}/{META} is not readable JSON ({exc})")
    elif not failed:
        record.problems.append(f"{avatar_id}/{META} is missing")
    record.scores = _identity_scores(row, record.meta)
    for name in (PREVIEW, TURNTABLE, ANIMATION):
        if (folder / name).exists():
            record.files.append(name)
        elif not failed:
            record.problems.append(f"{avatar_id}/{name} is missing")
    ply = folder / PLY
    if ply.exists():
        record.ply_bytes = ply.stat().st_size
        splat = folder / SPLAT
        try:
            if not splat.exists() or splat.stat().st_mtime < ply.stat().st_mtime:
                write_splat(ply, splat)
            record.splat_bytes = splat.stat().st_size
            record.files.append(SPLAT)
        except (FormatError, OSError) as exc:
            record.problems.append(f"{avatar_id}/{PLY} could not be converted for the viewer: {exc}")
    elif not failed:
        record.problems.append(f"{avatar_id}/{PLY} is missing (no 3D view)")
    if record.meta is not None:
        record.files.append(META)
    if record.problems and not failed:
        record.status = "incomplete"
    return record


# ====================================================================== pages
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _number(value: Any, digits: int = 2) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return ""


def _sources(row: dict, meta: dict | None) -> dict[str, str]:
    meta = meta or {}
    stand_ins = row.get("stand_ins")
    if stand_ins is None and meta.get("stand_ins") is not None:
        stand_ins = ",".join(meta["stand_ins"])
    return {key: str(row.get(key) or meta.get(key) or "") for key in ("mode", "position_source", "feature_source")} | {
        "stand_ins": str(stand_ins or "")}


def _page(title: str, body: str, depth: int, head: str = "") -> str:
    up = "../" * depth
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n<title>{_e(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<link rel="stylesheet" href="{up}assets/gallery.css">\n{head}</head>\n<body>\n{body}\n</body></html>\n')


def _index_page(config: GalleryConfig, records: list[AvatarRecord], score_keys: list[str]) -> str:
    timing_keys = ("prepare_s", "build_s", "total_s")
    heads = (["preview", "id", "status", "mode", "position", "features", "stand-ins"] + score_keys
             + ["prepare s", "build s", "total s", "Gaussians", ".splat / .ply", "message"])
    numeric = set(score_keys) | {"prepare s", "build s", "total s", "Gaussians", ".splat / .ply"}
    th = "".join(f'<th data-key="{i}" data-type="{"number" if h in numeric else "text"}"><button type="button">'
                 f'{_e(h)}</button></th>' for i, h in enumerate(heads))
    body_rows = []
    for r in records:
        src = _sources(r.row, r.meta)
        href = f"avatars/{_e(r.id)}/index.html"
        thumb = (f'<img src="avatars/{_e(r.id)}/{PREVIEW}" alt="preview of {_e(r.id)}" loading="lazy">'
                 if PREVIEW in r.files else '<span class="none">no preview</span>')
        ratio = r.splat_bytes / r.ply_bytes if r.splat_bytes and r.ply_bytes else None
        export = f"{_number(100 * ratio, 1)} % ({r.splat_bytes / 1e6:.2f} MB)" if ratio else ""
        message = r.row.get("message") or "; ".join(r.problems)
        cells = [(thumb, ""), (f'<a href="{href}">{_e(r.id)}</a>', r.id),
                 (f'<span class="status {r.status}">{r.status}</span>', r.status),
                 (_e(src["mode"]), src["mode"]), (_e(src["position_source"]), src["position_source"]),
                 (_e(src["feature_source"]), src["feature_source"]), (_e(src["stand_ins"]), src["stand_ins"])]
        cells += [(_number(r.scores.get(k), 3), _number(r.scores.get(k), 6)) for k in score_keys]
        cells += [(_number(r.row.get(k)), _number(r.row.get(k), 6)) for k in timing_keys]
        gaussians = r.row.get("gaussians")
        cells += [(_e(gaussians if gaussians is not None else ""), _e(gaussians if gaussians is not None else "")),
                  (export, _number(ratio, 6)), (f'<span class="message">{_e(message)}</span>', message)]
        tds = "".join(f'<td data-value="{_e(v)}">{c}</td>' for c, v in cells)
        score = r.scores.get(score_keys[0]) if score_keys else None
        body_rows.append(f'<tr data-status="{r.status}" data-score="{_number(score, 6)}">{tds}</tr>')
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "incomplete", "failed")}
    score_filter = (f'<label>{_e(score_keys[0])} at least <input id="min-score" type="number" step="0.01"></label>'
                    if score_keys else "")
    body = f"""<header><h1>{_e(config.title)}</h1>
<p id="counts">{len(records)} avatars: {counts['ok']} ok, {counts['incomplete']} incomplete, {counts['failed']} failed</p></header>
<form id="filters" onsubmit="return false">
<label>status <select id="status-filter"><option value="">all</option><option>ok</option><option>incomplete</option><option>failed</option></select></label>
{score_filter}
<label>id contains <input id="id-filter" type="search"></label>
<span id="shown"></span></form>
<table id="avatars"><thead><tr>{th}</tr></thead>
<tbody>
{chr(10).join(body_rows)}
</tbody></table>
<script src="assets/gallery.js"></script>"""
    return _page(config.title, body, 0)


def _viewer_camera(meta: dict, config: GalleryConfig) -> dict:
    """The viewer's first camera: where the turntable's frontal view is, moved so that the
    viewer's wider field of view frames the head the same."""
    framing = meta.get("framing") or {}
    center = [float(v) for v in framing.get("center", (0.0, 0.0, 0.0))]
    front = [float(v) for v in framing.get("front", (0.0, 0.0, 1.0))]
    up = [float(v) for v in framing.get("up", (0.0, 1.0, 0.0))]
    fov = float((meta.get("render") or {}).get("fov_deg", config.render_fov_deg))
    distance = float(framing.get("radius", 1.0)) * math.tan(math.radians(fov) / 2) / math.tan(math.radians(VIEWER_FOV_DEG) / 2)
    norm = math.sqrt(sum(f * f for f in front)) or 1.0
    return {"target": center, "up": up, "position": [c + distance * f / norm for c, f in zip(center, front)]}


def _avatar_page(config: GalleryConfig, r: AvatarRecord) -> str:
    src = _sources(r.row, r.meta)
    parts = [f'<header><p><a href="../../index.html">&larr; all avatars</a></p><h1>{_e(r.id)}</h1>'
             f'<p><span class="status {r.status}">{r.status}</span> {_e(src["mode"])}</p></header>']
    if r.row.get("message"):
        parts.append(f'<section class="problems"><h2>Reconstruction failed</h2><pre>{_e(r.row["message"])}</pre></section>')
    if r.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in r.problems)
        parts.append(f'<section class="problems" id="problems"><h2>Missing or unreadable</h2><ul>{items}</ul></section>')
    head = ""
    if SPLAT in r.files:
        camera = _viewer_camera(r.meta or {}, config)
        viewer_config = json.dumps({"splat": SPLAT, "format": "splat", **camera}).replace("</", "<\\/")
        importmap = json.dumps({"imports": {"three": "../../vendor/three.module.js",
                                            "@mkkellogg/gaussian-splats-3d": "../../vendor/gaussian-splats-3d.module.js"}})
        head = f'<script type="importmap">{importmap}</script>\n'
        parts.append(f'<section><h2>3D Gaussians <small>drag to orbit, wheel to zoom, right-drag to pan</small></h2>'
                     f'<div id="viewer"></div><p id="viewer-note">loading the Gaussians&hellip;</p>'
                     f'<script type="application/json" id="viewer-config">{viewer_config}</script>'
                     f'<script type="module" src="../../assets/viewer.js"></script></section>')
    else:
        parts.append('<section><h2>3D Gaussians</h2><p class="none" id="no-viewer">No 3D view: this avatar has no '
                     'readable Gaussians (see above).</p></section>')
    videos = []
    for name, label in ((TURNTABLE, "turntable"), (ANIMATION, "animation")):
        if name in r.files:
            videos.append(f'<figure><video src="{name}" controls loop muted playsinline preload="metadata"></video>'
                          f'<figcaption>{label}</figcaption></figure>')
    if PREVIEW in r.files:
        videos.append(f'<figure><img src="{PREVIEW}" alt="inputs and views"><figcaption>inputs (top), avatar (bottom)'
                      f'</figcaption></figure>')
    if videos:
        parts.append(f'<section class="media">{"".join(videos)}</section>')
    facts = {"status": r.status, **src, **{k: _number(v, 4) for k, v in r.scores.items()},
             **{k: _number(r.row.get(k)) for k in ("prepare_s", "encode_s", "decode_s", "turntable_s", "animation_s",
                                                    "build_s", "total_s") if r.row.get(k) is not None},
             "Gaussians": r.row.get("gaussians", ""),
             ".ply bytes": r.ply_bytes or "", ".splat bytes": r.splat_bytes or ""}
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts.items() if v not in ("", None))
    parts.append(f'<section><h2>Summary</h2><table class="facts">{rows}</table></section>')
    if r.meta is not None:
        parts.append(f'<section><h2>meta.json</h2><p><a href="{META}">raw file</a></p>'
                     f'<pre class="meta">{_e(json.dumps(r.meta, indent=2))}</pre></section>')
    return _page(f"{r.id} - {config.title}", "\n".join(parts), 2, head)


# ====================================================================== build
def _copy_viewer(config: GalleryConfig, site: Path) -> None:
    web = config.web_dir
    missing = [rel for rel in VENDOR_FILES.values() if not (web / rel).exists()]
    if missing:
        raise GalleryError(f"the web viewer is not installed in {web} (missing {missing[0]}): run `make setup` "
                           f"(it runs `npm ci` in {web})")
    for folder, names in (("vendor", VENDOR_FILES), ("assets", {n: n for n in SITE_ASSETS})):
        (site / folder).mkdir(parents=True, exist_ok=True)
        for name, rel in names.items():
            shutil.copyfile(web / rel, site / folder / name)


def _prepare_site(site: Path) -> None:
    """An existing non-empty output folder is replaced only if an earlier build made it."""
    if site.exists() and any(site.iterdir()):
        if not (site / MARKER).exists():
            raise GalleryError(f"{site} exists and is not a gallery (no {MARKER}); choose an empty or new folder")
        shutil.rmtree(site / "avatars", ignore_errors=True)
    site.mkdir(parents=True, exist_ok=True)


def build_gallery(avatars_dir: str | Path, site: str | Path, config: GalleryConfig | None = None) -> dict:
    """Build the site for the library in ``avatars_dir`` into ``site``; returns the summary that
    ``gallery.json`` holds (counts, and per avatar: status, problems, .ply and .splat sizes).

    Raises FileNotFoundError / FormatError naming the index when it is missing or unreadable, and
    GalleryError when the viewer package is not installed or ``site`` is some other folder.
    """
    config = config or GalleryConfig()
    avatars_dir, site = Path(avatars_dir), Path(site)
    rows = _read_rows(avatars_dir)
    _prepare_site(site)
    _copy_viewer(config, site)
    records = [_collect(avatars_dir, row) for row in sorted(rows, key=lambda row: str(row["id"]))]
    score_keys = sorted({k for r in records for k in r.scores})
    for r in records:
        folder = site / "avatars" / r.id
        folder.mkdir(parents=True, exist_ok=True)
        for name in r.files:
            shutil.copyfile(avatars_dir / r.id / name, folder / name)
        (folder / "index.html").write_text(_avatar_page(config, r))
    (site / "index.html").write_text(_index_page(config, records, score_keys))
    ply = sum(r.ply_bytes or 0 for r in records if r.splat_bytes)
    splat = sum(r.splat_bytes or 0 for r in records)
    summary = {
        "site": str(site.resolve()), "index": str((site / "index.html").resolve()), "source": str(avatars_dir.resolve()),
        "avatars": len(records), **{s: sum(r.status == s for r in records) for s in ("ok", "incomplete", "failed")},
        "viewer": "@mkkellogg/gaussian-splats-3d", "export": SPLAT_SUFFIX, "ply_bytes": ply, "splat_bytes": splat,
        "splat_vs_ply": round(splat / ply, 4) if ply else None, "score_columns": score_keys,
        "records": [r.summary() for r in records],
    }
    storage.atomic_write_bytes(site / MARKER, json.dumps(summary, indent=1).encode())
    return summary
