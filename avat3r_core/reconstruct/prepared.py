"""What preparation produces and how it is configured: :class:`PrepareConfig`, :class:`PreparedAvatar`,
and the view / head-pose choice shared by the capture and picture paths."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.config import Presets
from avat3r_core.priors.sources import choose_feature_source, choose_position_source
from avat3r_core.tracking.landmarks import PICTURE_LANDMARK_BACKENDS
from avat3r_core.geometry import camera_centers, farthest_views
from avat3r_core.errors import FormatError
from avat3r_core.reconstruct.errors import AvatarInputError


def pick_diverse_poses(world_to_cam: np.ndarray, k: int) -> list[int]:
    """Indices of ``k`` images whose head poses differ most (head-frame cameras of an uncalibrated fit).

    With the head fixed at the origin, a head pose is a camera direction; farthest-point sampling on
    the unit directions starts at the most frontal one (nearest the mean direction). Sorted.
    """
    w2c = np.asarray(world_to_cam, np.float64)
    centers = camera_centers(w2c)
    dirs = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    return sorted(farthest_views(dirs, k))


def head_angles(world_to_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Yaw and pitch (degrees) of the head as each camera of an uncalibrated fit sees it.

    The head sits at the origin in FLAME's axes (x to the subject's left, y up, z out of the face);
    a camera straight in front is at yaw 0, pitch 0; on the subject's left, yaw > 0; above, pitch > 0.
    """
    w2c = np.asarray(world_to_cam, np.float64)
    c = camera_centers(w2c)
    yaw = np.degrees(np.arctan2(c[:, 0], c[:, 2]))
    pitch = np.degrees(np.arctan2(c[:, 1], np.hypot(c[:, 0], c[:, 2])))
    return yaw, pitch


@dataclass
class PrepareConfig(Presets):
    """How pictures become model inputs (the model itself fixes the crop size and feature width).

    Landmarks: ``mediapipe`` (MediaPipe FaceLandmarker, the default) or ``file`` (``<picture
    stem>.landmarks.npz`` beside each picture: ``landmarks`` (L, 2) pixels, or (T, L, 2) for a
    video, optional ``visible``). MediaPipe's 478 points meet the face model through its embedding
    (:func:`~avat3r_core.tracking.landmarks.points_for_embedding`): a 68-point one (FLAME's
    standard embedding, the studio head's) through the evaluation's MediaPipe→iBUG-68 table, or one
    with ``landmark_indices`` (FLAME's MediaPipe embedding, the studio head's
    ``head_mediapipe_embedding.npz``). The 68-point route is the default: it measured better on the
    studio (``benchmarks/track_detector.py``) and on the two real test photos.

    Pictures as people take them (:func:`read_picture`): regular files only, ``max_input_mb`` and
    ``max_megapixels`` (from the header) checked before decoding, EXIF orientation, grayscale /
    CMYK / 16-bit converted, shrunk to ``max_side``; several faces → the largest (recorded per
    view); faces under ``min_face_px`` and views beyond ``max_yaw_deg`` / ``max_pitch_deg`` are
    dropped (recorded), and when none is left the error names the measured size or angle. The
    person matte (:mod:`avat3r_core.priors.matte`) comes from ``segmentation_model``.
    """

    PRESETS: ClassVar[dict] = {"tiny": {}, "demo": {}}

    landmarks: str = "mediapipe"  # mediapipe | file
    mediapipe_model: str = ""  # face_landmarker.task (default: the installed copy)
    face_model: str = ""  # FLAME-format model (.pkl); required for photos/image/video modes
    landmark_embedding: str = ""  # its landmark embedding (.pkl/.npz)
    fov_deg: float = 24.0  # assumed vertical field of view of uncalibrated pictures
    head_extent: float = 0.15  # half-size of the square crop in metres around the head (as extraction)
    fit_preset: str = "tiny"  # FitConfig preset
    fit: dict = field(default_factory=dict)  # FitConfig overrides
    position_source: str = "auto"  # auto (dust3r if a checkpoint is given, else face_model) | dust3r | face_model
    dust3r_checkpoint: str = ""
    feature_source: str = "auto"  # auto (sapiens if given, else efficientnet) | sapiens | efficientnet | none
    sapiens_model: str = ""
    sapiens_input_size: tuple[int, int] = (1024, 1024)
    feature_projection: str = ""  # the training data's feature_projection.npz ("" = unprojected)
    num_views: int = 4  # input views per avatar (image mode: 1)
    video_max_frames: int = 300  # frames read from a video
    video_fit_frames: int = 12  # frames (evenly spaced) the face model is fitted on
    max_input_mb: float = 512.0  # a picture or video file larger than this is refused unread
    max_megapixels: float = 100.0  # a picture with more pixels (from its header) is refused undecoded
    max_side: int = 2048  # pictures and frames are shrunk to this long side before detection
    max_faces: int = 4  # faces MediaPipe looks for per picture; the largest is used (recorded)
    min_face_px: float = 24.0  # smallest face (landmark box height, brows to chin, decoded pixels) worth fitting
    max_yaw_deg: float = 75.0  # views turned further (fitted head pose) are dropped
    max_pitch_deg: float = 50.0
    segmentation_model: str = ""  # selfie_segmentation.tflite for picture mattes (default: the installed copy)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0

    def __post_init__(self) -> None:
        self.sapiens_input_size = tuple(int(v) for v in self.sapiens_input_size)  # type: ignore[assignment]
        checks = {
            "landmarks": self.landmarks in PICTURE_LANDMARK_BACKENDS,
            "position_source": self.position_source in ("auto", "dust3r", "face_model"),
            "feature_source": self.feature_source in ("auto", "sapiens", "efficientnet", "none"),
            "device": self.device in ("auto", "cpu", "cuda"),
            "num_views": self.num_views >= 1, "video_fit_frames": self.video_fit_frames >= 2,
            "video_max_frames": self.video_max_frames >= 2, "head_extent": self.head_extent > 0,
            "max_input_mb": self.max_input_mb > 0, "max_megapixels": self.max_megapixels > 0,
            "max_side": self.max_side >= 64, "max_faces": self.max_faces >= 1, "min_face_px": self.min_face_px >= 0,
            "max_yaw_deg": 0 < self.max_yaw_deg <= 180, "max_pitch_deg": 0 < self.max_pitch_deg <= 180,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise FormatError(type(self).__name__, ", ".join(bad), f"invalid value(s): {[getattr(self, k) for k in bad]}")
        if self.position_source == "dust3r" and not self.dust3r_checkpoint:
            raise FormatError(type(self).__name__, "dust3r_checkpoint", "position_source 'dust3r' needs a checkpoint")
        if self.feature_source == "sapiens" and not self.sapiens_model:
            raise FormatError(type(self).__name__, "sapiens_model", "feature_source 'sapiens' needs the model file")

    @property
    def resolved_position_source(self) -> str:
        return choose_position_source(self.position_source, self.dust3r_checkpoint)

    def resolved_feature_source(self, features_enabled: bool) -> str:
        if not features_enabled:
            return "none"
        return choose_feature_source(self.feature_source, self.sapiens_model)

    def fit_config(self):
        from avat3r_core.tracking.fit import FitConfig

        return FitConfig.preset(self.fit_preset, **dict(self.fit))


@dataclass
class PreparedAvatar:
    """The model inputs of one avatar plus what rendering needs; serialises to an ``.npz`` (no pickle)."""

    avatar_id: str
    images: np.ndarray  # (V, S, S, 3) uint8 crops
    world_to_cam: np.ndarray  # (V, 4, 4) float64 crop cameras (OpenCV)
    K: np.ndarray  # (V, 3, 3)
    position: np.ndarray  # (V, S, S, 3) float32 world points
    confidence: np.ndarray  # (V, S, S) float32
    features: np.ndarray | None  # (V, C, h, w) float32
    reference: dict[str, np.ndarray]  # FLAME rotation/translation (3,) of the neutral pose (world frame)
    center: np.ndarray  # (3,) head centre (world)
    radius: float  # typical camera distance
    front: np.ndarray  # (3,) unit direction from the head towards the mean input camera
    up: np.ndarray  # (3,) unit world up of the input cameras
    meta: dict = field(default_factory=dict)
    matte: np.ndarray | None = None  # (V, S, S) float32 person matte of each crop (pictures; meta["matte_source"])

    @property
    def num_views(self) -> int:
        return int(self.images.shape[0])

    def cameras(self, device: torch.device | str = "cpu") -> Cameras:
        S = self.images.shape[1]
        return Cameras(torch.as_tensor(self.world_to_cam, dtype=torch.float32, device=device),
                       torch.as_tensor(self.K, dtype=torch.float32, device=device), S, S)

    def inputs(self, device: torch.device | str = "cpu"):
        from avat3r_core.model.avat3r import Avat3rInputs

        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), device=device)  # noqa: E731
        images = t(self.images).permute(0, 3, 1, 2).float().div(255.0)[None]
        feats = None if self.features is None else t(self.features).float()[None]
        return Avat3rInputs(images=images, cameras=self.cameras(device),
                            position_maps=t(self.position).float().permute(0, 3, 1, 2)[None],
                            confidence=t(self.confidence).float()[None], features=feats)

    def to_bytes(self) -> bytes:
        arrays = {k: getattr(self, k) for k in ("images", "world_to_cam", "K", "position", "confidence", "center", "front", "up")}
        for k in ("features", "matte"):
            if getattr(self, k) is not None:
                arrays[k] = getattr(self, k)
        for k, v in self.reference.items():
            arrays[f"reference_{k}"] = np.asarray(v)
        header = {"avatar_id": self.avatar_id, "radius": float(self.radius), "meta": self.meta}
        buf = io.BytesIO()
        np.savez(buf, header=np.array(json.dumps(header, default=_json_default)), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PreparedAvatar":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            a = {k: z[k] for k in z.files}
        return cls(avatar_id=header["avatar_id"], images=a["images"], world_to_cam=a["world_to_cam"], K=a["K"],
                   position=a["position"], confidence=a["confidence"], features=a.get("features"),
                   reference={k[len("reference_"):]: v for k, v in a.items() if k.startswith("reference_")},
                   center=a["center"], radius=header["radius"], front=a["front"], up=a["up"], meta=header["meta"],
                   matte=a.get("matte"))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _framing(position: np.ndarray, confidence: np.ndarray, world_to_cam: np.ndarray, source: str):
    """Head centre (median of confident position-map points), camera distance, front and up."""
    pts = position[confidence > 0.5]
    if len(pts) < 16:
        raise AvatarInputError(source, f"only {len(pts)} confident position-map pixels over all views: nothing to build")
    center = np.median(pts.astype(np.float64), axis=0)
    R = world_to_cam[:, :3, :3]
    cams = camera_centers(world_to_cam)
    radius = float(np.median(np.linalg.norm(cams - center, axis=1)))
    front = (cams - center).mean(0)
    front = front / max(np.linalg.norm(front), 1e-12)
    up = -R[:, 1, :].mean(0)  # OpenCV: image y points down
    up = up - front * (up @ front)
    up = up / max(np.linalg.norm(up), 1e-12)
    return center, radius, front, up
