"""The reconstruct stage: a library of people → avatars (Ray Data, model actors, resumable).

Input: a library manifest (:func:`avat3r_core.reconstruct.library.read_library`: one row per avatar, modes
``capture`` / ``photos`` / ``image`` / ``video``) and a training checkpoint. Output under
``out_dir`` (``data/avatars/``)::

    <id>/encoder_cache.pt        expression-independent activations (drive with `avat3r animate`)
    <id>/gaussians_neutral.ply   standard 3DGS .ply at the neutral expression
    <id>/preview.png             inputs (top) above the avatar from a few angles (bottom)
    <id>/turntable.mp4           yaw sweep around the neutral avatar
    <id>/animation.mp4           driven by the row's expression track (or the built-in set)
    <id>/meta.json               inputs, prior sources (stand-ins named), framing, timings
    index.parquet                one row per avatar: status, mode, sources, timings (+ failed rows)
    index.errors.parquet         failures (id, stage, message naming file and reason, traceback)
    index.stats.json             the run summary (avatars/s ...)

Pipeline (``executor="ray"``), streaming with Ray Data::

    from_items(library rows not yet committed)
      → map_batches(_PrepareWorker)   CPU actors: detection, face-model fit, crops, priors
      → map_batches(_AvatarWorker)    model actors (``num_gpus`` per actor when the cluster has GPUs):
                                      encode, decode, render, write the avatar's files
      → driver: commit ``_parts/<id>.parquet`` (after the media) or ``_errors/<id>.json``

Both steps catch an item's exception and pass it on as an error row, so one bad person never
stops the run; the driver applies the error budget (``StageResources.max_errors`` /
``max_error_fraction``). Commit protocol, error records and manifests are the shared runner's
(``stages/runner.py``), so ``avat3r stage errors data/avatars`` lists failures and a rerun skips
committed avatars and retries failed ones. ``executor="local"`` runs the same two workers inline.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from avat3r_core import storage
from avat3r_core.config import pick_device, set_cpu_threads
from avat3r_core.reconstruct.build import (
    ANIMATION_FILE,
    CACHE_FILE,
    META_FILE,
    PLY_FILE,
    PREVIEW_FILE,
    TURNTABLE_FILE,
    build_avatar,
)
from avat3r_core.reconstruct.expressions import head_motion_for, load_expression_track
from avat3r_core.reconstruct.library import LibraryEntry, read_library, write_capture_library
from avat3r_core.reconstruct.prepare import Preparer
from avat3r_core.reconstruct.prepared import PrepareConfig, PreparedAvatar
from avat3r_core.inference.checkpoint import load_trained_model, resolve_checkpoint
from stages.runner import (
    DiskFull,
    ItemResult,
    StageError,
    StageResources,
    StageSummary,
    commit_error,
    commit_fragment,
    disk_full_error,
    merge_manifest,
    pending_items,
    run_summary,
    stop_reason,
)

__all__ = ["ReconstructConfig", "run_reconstruct", "write_capture_library", "MANIFEST"]

log = logging.getLogger("avat3r.reconstruct")

MANIFEST = "index"
STAGE = "reconstruct"
VERSION = "2"  # 2: views in the tracked head frame


@dataclass
class ReconstructConfig(PrepareConfig):
    """Preparation settings (:class:`~avat3r_core.reconstruct.prepared.PrepareConfig`) plus what is rendered.

    ``tiny``: CPU tests (small renders, short fits); ``demo``: the demo flow; ``paper``: full-size
    renders and the default fit.
    """

    PRESETS: ClassVar[dict] = {
        "tiny": dict(turntable_frames=6, render_size=64, preview_views=3, frames_per_key=2, video_fit_frames=6,
                     fit=dict(rigid_iters=20, adam_iters=150, lbfgs_iters=0), device="cpu"),
        "demo": dict(turntable_frames=36, render_size=192, preview_views=4, frames_per_key=11),
        "paper": dict(turntable_frames=96, render_size=512, preview_views=6, frames_per_key=16, fit_preset="default"),
    }

    turntable_frames: int = 48
    render_size: int = 256  # turntable / preview / animation frame size (square)
    preview_views: int = 4
    fps: float = 24.0
    yaw_deg: float = 45.0  # turntable sweep ± (the model sees only the front)
    render_fov_deg: float = 20.0
    expressions: str = "builtin"  # track for rows without one: builtin | tracking.parquet[#subj/seq] | codes.npy
    frames_per_key: int = 12  # built-in track: frames between two key expressions
    # tracked tracks: also replay the tracked head motion (a head-frame model through its animation
    # camera, library.head_motion_for; a world-frame model through the codes' head pose)
    drive_head_pose: bool = False
    num_gpus: float = -1.0  # per model actor; -1 = 1 when the cluster has a GPU, else 0
    model_actors: int = 1  # model actors (GPUs: one each)
    decode_chunk: int = 4  # expressions decoded per batch while animating

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.turntable_frames, self.render_size, self.preview_views, self.frames_per_key, self.model_actors,
               self.decode_chunk) < 1:
            raise ValueError("ReconstructConfig: frame counts, sizes, model_actors and decode_chunk must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


def with_data_defaults(values: dict, face_model_dir: str | Path, priors_dir: str | Path) -> dict:
    """``values`` plus what a preprocessed data tree implies, where not given: the face model (and
    its landmark embedding) the tracking used, and the priors' ``feature_projection.npz`` (pictures
    must get the same feature channels the model was trained on)."""
    out = dict(values)
    # local paths (made absolute) or URIs
    face_model_dir, priors_dir = storage.absolute(face_model_dir), storage.absolute(priors_dir)
    model, embedding = face_model_dir / "head_model.pkl", face_model_dir / "head_landmark_embedding.pkl"
    if not out.get("face_model") and model.exists():
        out["face_model"], out["landmark_embedding"] = str(model), str(embedding)
    projection = priors_dir / "feature_projection.npz"
    if not out.get("feature_projection") and projection.exists():
        out["feature_projection"] = str(projection)
    return out


# ====================================================================== the two workers
def _error_fields(exc: BaseException) -> tuple[str, str]:
    return f"{type(exc).__name__}: {exc}", traceback.format_exc()


class _PrepareWorker:
    """CPU step: library row → :class:`PreparedAvatar` bytes (or the error that stopped it)."""

    def __init__(self, config: ReconstructConfig, image_size: int, feature_dim: int, features_enabled: bool,
                 frame: str = "world", num_threads: int = 1):
        set_cpu_threads(num_threads)  # the CPU renderer's numba threads too: workers must not oversubscribe the node
        self.preparer = Preparer(config, image_size, feature_dim, features_enabled, frame=frame)

    def prepare(self, item_json: str) -> dict:
        entry = LibraryEntry.from_item(json.loads(item_json))
        try:
            payload = self.preparer.prepare(entry).to_bytes()
            return {"id": entry.avatar_id, "item": item_json, "payload": payload, "error": "", "traceback": ""}
        except Exception as exc:  # one bad person must not stop the others
            message, tb = _error_fields(exc)
            log.warning("reconstruct: avatar %s (%s) failed in preparation: %s", entry.avatar_id, entry.where(), message)
            return {"id": entry.avatar_id, "item": item_json, "payload": b"", "error": message, "traceback": tb}

    def __call__(self, batch: dict) -> dict:
        rows = [self.prepare(str(j)) for j in batch["item"]]
        return _columns(rows, ("id", "item", "payload", "error", "traceback"))


class _AvatarWorker:
    """Model step: prepared inputs → encode, decode, render; writes ``<out>/<id>/``; returns the index row."""

    def __init__(self, config: ReconstructConfig, checkpoint: str, out_dir: str, num_threads: int = 1):
        set_cpu_threads(num_threads)  # the CPU renderer's numba threads too: workers must not oversubscribe the node
        self.config = config
        self.checkpoint = checkpoint
        self.out_dir = out_dir
        self.device = pick_device(config.device)
        self.model, self.model_config, info = load_trained_model(checkpoint, self.device)
        self.checkpoint_sha256 = info["sha256"]
        from avat3r_core.identity import FaceIdentity

        self.identity = FaceIdentity()  # dlib's ResNet-128, loaded on first use (picture avatars)

    def build(self, prepared_row: dict) -> dict:
        item_json = prepared_row["item"]
        item = json.loads(item_json)
        entry = LibraryEntry.from_item(item)
        if prepared_row["error"]:
            return {"id": entry.avatar_id, "item": item_json, "row": "", "error": prepared_row["error"],
                    "traceback": prepared_row["traceback"], "disk_full": False}
        self._written: list[str] = []
        try:
            return {"id": entry.avatar_id, "item": item_json, "row": json.dumps(self._build(entry, prepared_row["payload"])),
                    "error": "", "traceback": "", "disk_full": False}
        except Exception as exc:
            message, tb = _error_fields(exc)
            disk_full = storage.is_disk_full(exc)
            if disk_full:  # this avatar's files are referenced by nothing: make room for the index
                for uri in self._written:
                    storage.remove(uri)
            else:
                log.warning("reconstruct: avatar %s (%s) failed while building: %s", entry.avatar_id, entry.where(),
                            message)
            return {"id": entry.avatar_id, "item": item_json, "row": "", "error": message, "traceback": tb,
                    "disk_full": disk_full}

    def _build(self, entry: LibraryEntry, payload: bytes) -> dict:
        cfg = self.config
        start = time.perf_counter()
        prepared = PreparedAvatar.from_bytes(payload)
        track = entry.expressions or cfg.expressions
        codes, described = load_expression_track(track, prepared.reference, cfg.frames_per_key, cfg.drive_head_pose)
        made = build_avatar(self.model, prepared, codes, turntable_frames=cfg.turntable_frames, size=cfg.render_size,
                            preview_views=cfg.preview_views, fps=cfg.fps, yaw_deg=cfg.yaw_deg,
                            fov_deg=cfg.render_fov_deg, chunk=cfg.decode_chunk,
                            motion=head_motion_for(self.model.config.frame, track, cfg.drive_head_pose),
                            identity=self.identity)
        build_s = time.perf_counter() - start
        meta = prepared.meta
        model_cfg = self.model_config
        info = {
            "id": entry.avatar_id, "mode": entry.mode, "source": entry.source, "library": entry.library,
            "library_row": entry.row, "subject": entry.subject, "sequence": entry.sequence, "frame": entry.frame,
            "checkpoint": self.checkpoint, "model": {"image_size": model_cfg.image_size, "feature_dim": model_cfg.feature_dim,
                                                     "features_enabled": model_cfg.features_enabled, "dim": model_cfg.dim},
            "views": meta.get("views", []), "position_source": meta.get("position_source", ""),
            "feature_source": meta.get("feature_source", ""), "landmarks": meta.get("landmarks", ""),
            "stand_ins": _stand_ins(meta), "preparation": {k: v for k, v in meta.items() if k not in ("views",)},
            "framing": {"center": prepared.center.tolist(), "radius": prepared.radius, "front": prepared.front.tolist(),
                        "up": prepared.up.tolist()},
            "reference": {k: np.asarray(v).tolist() for k, v in prepared.reference.items()},
            "expressions": described, "render": {"size": cfg.render_size, "fps": cfg.fps, "fov_deg": cfg.render_fov_deg,
                                                 "yaw_deg": cfg.yaw_deg, "turntable_frames": cfg.turntable_frames},
            "stats": made.stats, "files": sorted(list(made.files) + [META_FILE]),
        }
        written = 0
        files = {**made.files, META_FILE: json.dumps(info, indent=1, default=_plain).encode()}
        for name, data in files.items():  # media first; the driver commits the index row after
            uri = storage.join(self.out_dir, entry.avatar_id, name)
            self._written.append(uri)
            written += storage.atomic_write_bytes(uri, data)
        prepare_s = float(meta.get("prepare_s", 0.0))
        return {
            "id": entry.avatar_id, "status": "ok", "mode": entry.mode, "source": entry.source,
            "subject": entry.subject or "", "sequence": entry.sequence or "",
            "frame": -1 if entry.frame is None else int(entry.frame),
            "views": prepared.num_views, "position_source": info["position_source"],
            "feature_source": info["feature_source"], "landmarks": info["landmarks"],
            "stand_ins": ",".join(info["stand_ins"]), "expressions": described, "gaussians": made.stats["gaussians"],
            "fit_residual_px": float(meta.get("fit_residual_px", float("nan"))),
            "matte_source": meta.get("matte_source", ""), **_fidelity_columns(made.stats.get("fidelity")),
            "directory": entry.avatar_id, "cache": f"{entry.avatar_id}/{CACHE_FILE}", "ply": f"{entry.avatar_id}/{PLY_FILE}",
            "preview": f"{entry.avatar_id}/{PREVIEW_FILE}", "turntable": f"{entry.avatar_id}/{TURNTABLE_FILE}",
            "animation": f"{entry.avatar_id}/{ANIMATION_FILE}", "meta": f"{entry.avatar_id}/{META_FILE}",
            "prepare_s": prepare_s, "encode_s": made.stats["encode_s"], "decode_s": made.stats["decode_s"],
            "turntable_s": made.stats["turntable_s"], "animation_s": made.stats["animation_s"],
            "build_s": round(build_s, 4), "total_s": round(prepare_s + build_s, 4), "bytes": written,
            "checkpoint_sha256": self.checkpoint_sha256, "message": "",
        }

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        rows = [self.build({k: batch[k][i] for k in ("item", "payload", "error", "traceback")}) for i in range(n)]
        return _columns(rows, ("id", "item", "row", "error", "traceback", "disk_full"))


def _fidelity_columns(fidelity: dict | None) -> dict:
    """Index columns of :func:`~avat3r_core.reconstruct.build.picture_fidelity` (NaN for capture avatars or
    where dlib found no face): input-view PSNR in the matte, identity similarity per yaw."""
    from avat3r_core.reconstruct.build import IDENTITY_YAWS, yaw_key

    nan = float("nan")
    fidelity = fidelity or {}
    ident = fidelity.get("identity") or {}
    out = {k: nan if fidelity.get(k) is None else float(fidelity[k]) for k in ("input_psnr", "input_psnr_covered")}
    for yaw in IDENTITY_YAWS:
        v = (ident.get(yaw_key(yaw)) or {}).get("similarity")
        out[f"identity_{yaw_key(yaw)}"] = nan if v is None else float(v)
    d = (ident.get(yaw_key(0.0)) or {}).get("distance")
    out["identity_distance_yaw0"] = nan if d is None else float(d)
    return out


def _stand_ins(meta: dict) -> list[str]:
    """The named stand-ins this avatar used (never mistaken for the method)."""
    out = []
    for src in str(meta.get("position_source", "")).split(","):
        if src and src != "dust3r":
            out.append(f"position:{src}")
    for src in str(meta.get("feature_source", "")).split(","):
        if src and not src.startswith("sapiens") and src != "none":
            out.append(f"features:{src}")
    if meta.get("landmarks") == "file":
        out.append("landmarks:file")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


def _columns(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out = {}
    for k in keys:
        values = [r[k] for r in rows]
        out[k] = np.array(values, dtype=object)
    return out


# ====================================================================== commit
#: the index row's columns that name an avatar's files (checked before a rerun skips it)
_FILE_COLUMNS = ("cache", "ply", "preview", "turntable", "animation", "meta")


def _commit(out_dir: str, result: dict, keys: dict[str, str]) -> ItemResult:
    """Commit one avatar: its index fragment (media already written, ``keys``: its item key) or
    its error record."""
    if not result["error"]:
        row = json.loads(result["row"])
        commit_fragment(out_dir, result["id"], [row], keys[result["id"]], [row[c] for c in _FILE_COLUMNS])
        return ItemResult(result["id"], True, 1, int(row["bytes"]))
    commit_error(out_dir, STAGE, result["id"], result["error"], result["traceback"], result["item"])
    return ItemResult(result["id"], False, message=result["error"], disk_full=bool(result.get("disk_full")))


def _finish_index(out_dir: str) -> tuple[str, str, int]:
    """Merge fragments (runner convention), then add one ``status='failed'`` row per error record."""
    manifest, errors_manifest, n_ok = merge_manifest(out_dir, MANIFEST)
    errors = storage.read_parquet(errors_manifest).to_pylist()
    if errors:
        failed = []
        for e in errors:
            item = json.loads(e["item"]) if e.get("item") else {}
            failed.append({"id": e["id"], "status": "failed", "mode": item.get("mode", ""), "source": item.get("source", ""),
                           "subject": item.get("subject") or "", "sequence": item.get("sequence") or "",
                           "message": e["message"]})
        table = storage.read_parquet(manifest)
        parts = [t for t in (table, pa.Table.from_pylist(failed)) if t.num_rows]
        merged = pa.concat_tables(parts, promote_options="default").sort_by("id") if len(parts) > 1 else parts[0]
        storage.write_parquet(merged, manifest)
    return manifest, errors_manifest, n_ok


# ====================================================================== driver
def run_reconstruct(config: ReconstructConfig, library_path: str, checkpoint: str, out_dir: str,
                    resources: StageResources | None = None, executor: str = "ray",
                    show_progress: bool = True) -> StageSummary:
    """Build every avatar of ``library_path`` with the network in ``checkpoint`` into ``out_dir``.

    Resumable: avatars with a committed index fragment are skipped; failed ones are retried.
    Returns the runner's :class:`StageSummary` (``to_dict()`` for flows); raises
    :class:`ErrorBudgetExceeded` (after committing everything finished) when too many avatars fail,
    FormatError for a malformed library, FileNotFoundError for a missing checkpoint.
    """
    resources = resources or StageResources()
    out_dir = str(out_dir)
    entries = read_library(library_path)
    ckpt = str(resolve_checkpoint(checkpoint).resolve())
    _, model_cfg, ckpt_info = load_trained_model(ckpt)  # a bad checkpoint fails before any work
    # one writer per output: a second run on it is refused, naming the first (held to the end)
    with storage.output_lock(out_dir):
        # an avatar is rebuilt when its library row, the settings or the weights changed (a retrained
        # model must not leave a library of avatars from the old one): the runner's item keys
        settings = {"config": _config_dict(config), "checkpoint_sha256": ckpt_info["sha256"]}
        todo, keys = pending_items(STAGE, VERSION, settings, [e.to_item() for e in entries], out_dir)
        skipped = len(entries) - len(todo)
        prep_args = dict(config=config, image_size=model_cfg.image_size, feature_dim=model_cfg.feature_dim,
                         features_enabled=model_cfg.features_enabled, frame=model_cfg.frame)
        probe = Preparer(**prep_args)  # fail fast on a bad configuration (projection file, feature width) before any actor
        if any(e.mode != "capture" for e in entries):
            probe.check_picture_features()
        pending_ids = {it["id"] for it in todo}
        if any(e.mode != "capture" and e.avatar_id in pending_ids for e in entries):
            # an unreadable face model is one problem, reported once now, not once per avatar
            probe.face_layer()
        results: list[ItemResult] = []
        budget_hit: StageError | None = None

        def over_budget() -> StageError | None:
            return stop_reason(STAGE, results, len(entries), resources, out_dir, MANIFEST, noun="avatars")

        start = time.perf_counter()
        num_gpus = 0.0
        try:
            if todo and executor == "local":
                prep = _PrepareWorker(**prep_args, num_threads=0)
                builder = _AvatarWorker(config, ckpt, out_dir, num_threads=0)
                for item in todo:
                    results.append(_commit(out_dir, builder.build(prep.prepare(json.dumps(item))), keys))
                    budget_hit = over_budget()
                    if budget_hit:
                        break
            elif todo and executor == "ray":
                budget_hit, num_gpus = _run_ray_data(config, ckpt, out_dir, todo, keys, prep_args,
                                                                    resources, results, over_budget, show_progress)
            elif todo:
                raise StageError(f"unknown executor {executor!r} (use 'ray' or 'local')")
        finally:
            try:
                manifest, errors_manifest, n_ok = _finish_index(out_dir)
            except OSError as exc:
                if not storage.is_disk_full(exc):
                    raise
                raise disk_full_error(STAGE, out_dir, None, results, len(entries)) from None
        if isinstance(budget_hit, DiskFull):
            raise disk_full_error(STAGE, out_dir, manifest, results, len(entries))
        seconds = time.perf_counter() - start
        done_now = sum(r.ok for r in results)
        summary = run_summary(
            STAGE, VERSION, manifest, errors_manifest, results, len(entries), skipped, n_ok, seconds, out_dir,
            rate_digits=4,
            extra={"executor": executor, "checkpoint": ckpt, "library": str(library_path),
                   "avatars_per_minute": round(60.0 * done_now / seconds, 3) if seconds > 0 and done_now else 0.0,
                   "landmarks": config.landmarks, "position_source": config.resolved_position_source,
                   "feature_source": config.resolved_feature_source(model_cfg.features_enabled),
                   "model_image_size": model_cfg.image_size, "num_gpus_per_model_actor": num_gpus,
                   "config": _config_dict(config)},
        )
        n_failed = summary.items_failed
        storage.atomic_write_bytes(storage.join(out_dir, f"{MANIFEST}.stats.json"),
                                   json.dumps(summary.to_dict(), indent=2, default=_plain).encode())
        if budget_hit:
            raise budget_hit
        log.info("reconstruct: %d built, %d skipped, %d failed -> %s", done_now, skipped, n_failed, manifest)
        return summary


def _config_dict(config: ReconstructConfig) -> dict:
    d = asdict(config)
    d["sapiens_input_size"] = list(d["sapiens_input_size"])
    return d


def _run_ray_data(config, ckpt, out_dir, todo, keys, prep_args, resources, results, over_budget, show_progress):
    """The Ray Data pipeline (see the module docstring); commits on the driver as results stream in."""
    import ray

    from stages.ray_runtime import ensure_ray

    cluster = ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(show_progress)
    num_gpus = config.num_gpus if config.num_gpus >= 0 else (1.0 if cluster.get("GPU", 0) > 0 else 0.0)
    cpus = float(cluster.get("CPU", 1))
    cpu_per = max(float(resources.num_cpus), 1e-3)
    model_actors = int(resources.concurrency or config.model_actors)
    if num_gpus > 0:
        model_actors = max(1, min(model_actors, int(cluster.get("GPU", 0) // num_gpus)))
    model_actors = max(1, min(model_actors, len(todo)))
    prep_actors = max(1, min(len(todo), int((cpus - model_actors * cpu_per) // cpu_per)))
    threads = max(1, int(resources.num_cpus))
    ds = ray.data.from_items([{"id": it["id"], "item": json.dumps(it)} for it in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_PrepareWorker, fn_constructor_kwargs={**prep_args, "num_threads": threads}, batch_size=1,
                        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=prep_actors), num_cpus=resources.num_cpus)
    ds = ds.map_batches(_AvatarWorker, fn_constructor_kwargs=dict(config=config, checkpoint=ckpt, out_dir=out_dir,
                                                                  num_threads=threads),
                        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=model_actors), num_cpus=resources.num_cpus,
                        num_gpus=num_gpus)
    log.info("reconstruct: Ray Data with %d preparation actor(s), %d model actor(s) (%.2f GPU each)",
             prep_actors, model_actors, num_gpus)
    budget_hit = None
    iterator = ds.iter_rows()
    try:
        for row in iterator:
            result = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in row.items()}
            results.append(_commit(out_dir, result, keys))
            budget_hit = over_budget()
            if budget_hit:
                break
    finally:
        del iterator  # stops the streaming executor when we leave early
    return budget_hit, num_gpus
