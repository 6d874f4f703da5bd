"""What drives an avatar: a monocular video of anyone, or an ARKit-52 blendshape track (CSV).

Both give a :class:`Driver`: ``codes(reference)`` → (T, 135) expression codes with the head at the
avatar's reference pose, a description, and ``side_by_side(frames)`` for the output video.

Video (:func:`video_driver`): every frame through MediaPipe FaceLandmarker (478 points, mapped
to the face model's 68 iBUG landmarks when its embedding selects none, as the studio's does), then
one face-model fit over all frames with a face (:func:`~avat3r_core.tracking.fit.fit_uncalibrated`,
``video=True``: shared shape, per-frame expression / jaw / eyes, temporal smoothness terms), then a
centred moving average over :data:`SMOOTH_FRAMES` frames against the per-frame jitter of monocular
landmarks. Frames where no face is found get codes interpolated between the nearest frames with
one (held at the ends), and the log names them. The output is ``driver | avatar``.

CSV (:func:`csv_driver`): :func:`avat3r_core.animation.arkit.read_live_link_csv` + an
:class:`~avat3r_core.animation.arkit.ArkitMapping` fitted for the avatar's face model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avat3r_core.errors import FormatError
from avat3r_core.tracking import expression_code as ec

log = logging.getLogger("avat3r.animation")

__all__ = ["Driver", "MAPPING_FILE", "SMOOTH_FRAMES", "csv_driver", "fill_missing", "make_driver", "smooth", "video_driver"]

SMOOTH_FRAMES = 3


@dataclass
class Driver:
    params: dict[str, np.ndarray] | None  # FLAME expression, jaw, neck, eyes per frame (video)
    description: str
    frames: list[np.ndarray] = field(default_factory=list)  # the driver's own frames (video), RGB uint8
    fixed_codes: np.ndarray | None = None  # (T, 135) codes with a neutral head (CSV)
    missing: list[int] = field(default_factory=list)  # frames without a face (interpolated)

    def codes(self, reference: dict | None = None) -> np.ndarray:
        """(T, 135) float32 codes with the head at ``reference`` (rotation, translation)."""
        ref = reference or {}
        head = {k: np.asarray(ref.get(k, np.zeros(3)), np.float64).reshape(1, 3) for k in ("rotation", "translation")}
        if self.fixed_codes is not None:
            code = np.array(self.fixed_codes, np.float64)
            code[:, ec.HEAD_POSE] = ec.encode({"expression": np.zeros((1, 100)), **head})[0, ec.HEAD_POSE]
            return code.astype(np.float32)
        T = len(self.params["expression"])
        return ec.encode({**self.params, **{k: np.repeat(v, T, 0) for k, v in head.items()}}).astype(np.float32)

    def side_by_side(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """``driver | avatar`` per frame (the driver scaled to the avatar's height); the avatar alone
        for drivers without pictures."""
        if not self.frames:
            return list(frames)
        from PIL import Image

        out = []
        for d, a in zip(self.frames, frames):
            h = a.shape[0]
            w = max(2, int(round(d.shape[1] * h / d.shape[0])) // 2 * 2)
            d = np.asarray(Image.fromarray(d).resize((w, h), Image.BILINEAR))
            out.append(np.concatenate([d, a], axis=1))
        return out


def fill_missing(values: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Per-frame values (T, ...) with the rows where ``found`` is False linearly interpolated
    between the nearest found rows (held at the ends)."""
    values = np.asarray(values, np.float64)
    idx = np.flatnonzero(found)
    if len(idx) == 0:
        raise ValueError("no frame to interpolate from")
    flat = values.reshape(len(values), -1)
    t = np.arange(len(values))
    out = np.stack([np.interp(t, idx, flat[idx, j]) for j in range(flat.shape[1])], axis=1)
    return out.reshape(values.shape)


def smooth(values: np.ndarray, frames: int = SMOOTH_FRAMES) -> np.ndarray:
    """Centred moving average over ``frames`` (odd) frames along axis 0, edges replicated."""
    values = np.asarray(values, np.float64)
    if frames <= 1 or len(values) < 2:
        return values
    r = frames // 2
    padded = np.concatenate([values[:1].repeat(r, 0), values, values[-1:].repeat(r, 0)])
    c = np.cumsum(np.concatenate([np.zeros_like(values[:1]), padded]), axis=0)
    return (c[frames:] - c[:-frames]) / frames


def video_driver(path: str | Path, face_model: str | Path, landmark_embedding: str | Path,
                 mediapipe_model: str | None = None, max_frames: int = 0, fov_deg: float = 20.0,
                 fit_preset: str = "tiny") -> Driver:
    """Track a monocular video (module docstring) into a :class:`Driver`."""
    import torch

    from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding
    from avat3r_core.reconstruct.errors import NoFaceError, TooFewFramesError
    from avat3r_core.reconstruct.pictures import read_video_frames
    from avat3r_core.tracking.fit import FitConfig, fit_uncalibrated
    from avat3r_core.tracking.landmarks import MediaPipeLandmarks, points_for_embedding

    path = str(path)
    # frames shrunk to 2048 px at most; landmarks and the fit live in those pixels
    frames, _ = read_video_frames(path, max_frames if max_frames > 0 else 1 << 30)
    embedding = load_landmark_embedding(str(landmark_embedding))
    layer = FlameLayer(load_flame_model(str(face_model)), landmarks=embedding, dtype=torch.float64).eval()
    with MediaPipeLandmarks(mediapipe_model) as detector:
        dets = [detector.detect(f[None]) for f in frames]
    found = np.array([bool(d.found[0]) for d in dets])
    points = np.stack([d.points[0] for d in dets]).astype(np.float64)
    conf = np.stack([d.confidence[0] for d in dets]).astype(np.float64)
    # MediaPipe's points as the embedding takes them (478 → iBUG-68 for a 68-point one), as tracking does
    points, conf = points_for_embedding(points, conf, embedding, where=str(landmark_embedding))
    if found.sum() < 2:
        if not found.any():
            raise NoFaceError(path, f"no face in any of the {len(frames)} frames of the driving video")
        raise TooFewFramesError(path, "a face was found in only one frame of the driving video; 2 are needed")
    missing = np.flatnonzero(~found).tolist()
    if missing:
        log.warning("driving video %s: no face in %d of %d frames (%s); their expressions are interpolated between "
                    "the nearest frames with a face", path, len(missing), len(frames),
                    ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else ""))
    keep = np.flatnonzero(found)
    sizes = np.array([[frames[i].shape[1], frames[i].shape[0]] for i in keep])
    fit = fit_uncalibrated(layer, points[keep], sizes, conf[keep], fov_deg=fov_deg, config=FitConfig.preset(fit_preset),
                           landmark_indices=embedding.landmark_indices, video=True)
    if not fit.converged:
        log.warning("driving video %s: face-model fit did not converge (%s)", path, fit.message)
    params = {}
    for key in ("expression", "jaw", "neck", "eyes"):
        full = np.zeros((len(frames),) + fit.params[key].shape[1:])
        full[keep] = fit.params[key]
        params[key] = smooth(fill_missing(full, found))
    desc = (f"video {path}: {len(frames)} frames, MediaPipe + face-model fit (residual "
            f"{float(np.mean(fit.residuals)):.2f} px), {len(missing)} without a face (interpolated)")
    return Driver(params, desc, frames=list(frames), missing=missing)


def csv_driver(path: str | Path, mapping_path: str | Path, face_model_sha256: str | None = None) -> Driver:
    """A Live Link Face CSV through the ARKit map fitted for the face model."""
    from avat3r_core.animation.arkit import ArkitMapping, read_live_link_csv

    timecodes, scores = read_live_link_csv(path)
    mapping = ArkitMapping.load(mapping_path, face_model_sha256)
    held = mapping.fit_error.get("held_out_rms", {})
    desc = (f"ARKit CSV {path}: {len(scores)} frames ({timecodes[0]} – {timecodes[-1]}) through {mapping_path} "
            f"(held-out jaw-angle correlation {held.get('jaw_angle_correlation')})")
    return Driver(None, desc, fixed_codes=mapping.codes(scores))


#: the ARKit map's file beside the face model it was fitted for (versioned with it)
MAPPING_FILE = "arkit_mapping.npz"


def make_driver(path: str | Path, face_model_dir: str | Path) -> Driver:
    """``.csv`` → :func:`csv_driver` (the map in ``face_model_dir``), anything else → :func:`video_driver`."""
    from avat3r_core import storage
    from avat3r_core.synthetic.studio import face_model_paths

    model, embedding = face_model_paths(str(face_model_dir))
    if str(path).lower().endswith(".csv"):
        sha = storage.sha256(model) if storage.exists(model) else None
        return csv_driver(path, Path(face_model_dir) / MAPPING_FILE, sha)
    for f in (model, embedding):
        if not storage.exists(f):
            raise FormatError(f, None, "face model file not found (a video driver is tracked with it; --face-model)")
    return video_driver(path, model, embedding)
