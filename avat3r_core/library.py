"""Avatar libraries: which avatars to build from what, and everything done to one avatar.

A team builds avatars in bulk from a *library manifest* (CSV, YAML or Parquet; one row per avatar):

============  ======================================================================================
column        meaning
============  ======================================================================================
avatar_id     optional; dot-free ``[A-Za-z0-9_-]`` (it names ``avatars/<id>/``). Absent: derived
              deterministically from mode, subject / source name, sequence and frame.
mode          ``capture`` | ``photos`` | ``image`` | ``video``
source        capture: the capture's ``frames.parquet``; photos: a folder of images (or several
              image paths joined by ``;``); image: one image; video: one video file
subject       capture only (required there); ``sequence``, ``frame``: optional narrowing
expressions   optional expression track for ``animation.mp4``: ``builtin``, a ``tracking.parquet``
              (``path#<subject>/<sequence>`` picks one tracked sequence) or a ``.npy`` of (T, 135) codes
priors        capture only: ``priors.parquet`` (default ``<frames dir>/../priors/priors.parquet``)
tracking      capture only: ``tracking.parquet`` (default ``<frames dir>/../tracking/tracking.parquet``)
============  ======================================================================================

Relative paths are relative to the library file (like every manifest of the project), so a library
can be moved together with its inputs. Errors name the file, the row and the field.

Per mode, :class:`Preparer` turns one library row into the model's inputs (:class:`PreparedAvatar`):

* ``capture`` — views of a preprocessed capture: ``frames.parquet`` crops, ``priors.parquet``
  position maps / features (whatever sources the priors stage used, recorded), chosen by
  farthest viewpoints over the subject's (frame, camera) candidates, preferring distinct
  timesteps (as training did: the model was trained on inputs at other timesteps).
* ``photos`` / ``image`` / ``video`` — uncalibrated pictures, read one at a time with caps checked
  first (:func:`read_picture`): landmarks (MediaPipe, or landmark files beside the pictures:
  backend ``file``) → :func:`~avat3r_core.tracking.fit.fit_uncalibrated`
  (face-model shape, per-image expression, one camera per image, head at the origin) → square
  head crops with exact crop cameras (the same ``frame_boxes``/``crop_image`` as extraction) →
  priors: DUSt3R position maps when a checkpoint is given, else the ``face_model`` stand-in (the
  fitted mesh rendered into each crop); features from EfficientNet (stand-in), Sapiens or none,
  projected with the training data's ``feature_projection.npz``. Video mode fits a subsample of the
  frames and picks the frames whose head poses differ most (farthest camera directions in the head
  frame). Photos beyond ``num_views`` are picked the same way. A person matte (MediaPipe's
  selfie segmentation, or the labelled face-model silhouette) keeps Gaussians off the background;
  :func:`picture_fidelity` measures each such avatar against its photo (input-view PSNR in the
  matte, dlib identity at 0, ±20, ±40° yaw) into ``meta.json`` and the index.

Failures are named exceptions carrying the path and the reason (:class:`NoFaceError`,
:class:`UnreadableInputError`, :class:`TooFewFramesError`, :class:`FitFailedError`,
:class:`FaceTooSmallError`, :class:`ExtremePoseError`), so the error
manifest says which file of which avatar was at fault.

:func:`build_avatar` then runs the network once (``Avat3r.encode``; the encoder cache is saved so
driving later runs only the decoder), decodes the neutral expression (Gaussians → ``.ply``,
``preview.png``, ``turntable.mp4``) and an expression track (``animation.mp4``).
:func:`animate_avatar` drives a built avatar from its cache alone (``avat3r animate``).

Pure torch/numpy: no Ray, no Prefect (``stages/reconstruct.py`` adds the fan-out).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import struct
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from avat3r_core import storage
from avat3r_core.avatar import (
    animation_frames,
    encoded_bytes,
    grid,
    load_encoded,
    render_frames,
    view_orbit,
)
from avat3r_core.cameras import Cameras
from avat3r_core.geometry import is_rigid, to_head_frame
from avat3r_core.config import Presets, pick_device
from avat3r_core.dataset.loader import farthest_views
from avat3r_core.errors import Avat3rError, FormatError, check_finite
from avat3r_core.formats.parsing import parse_json, read_json, read_yaml
from avat3r_core.ids import check_id_length, id_part
from avat3r_core.tracking import check_tracking_rows

log = logging.getLogger("avat3r.reconstruct")

__all__ = [
    "MODES", "LIBRARY_COLUMNS", "LANDMARKS_SUFFIX", "LibraryEntry", "read_library", "write_library",
    "write_capture_library", "AvatarInputError", "NoFaceError", "UnreadableInputError", "TooFewFramesError",
    "FitFailedError", "FaceTooSmallError", "ExtremePoseError", "PrepareConfig", "PreparedAvatar", "Preparer",
    "pick_diverse_poses", "head_angles", "read_picture", "check_input_file", "picture_header",
    "builtin_expressions", "load_expression_track", "load_head_motion", "head_motion_for", "neutral_code",
    "build_avatar", "AvatarFiles", "animate_avatar", "drive_without_cache", "picture_fidelity", "IDENTITY_YAWS",
    "yaw_key", "CACHE_FILE", "PLY_FILE", "PREVIEW_FILE", "TURNTABLE_FILE", "ANIMATION_FILE", "META_FILE",
]

MODES = ("capture", "photos", "image", "video")
LIBRARY_COLUMNS = ("avatar_id", "mode", "source", "subject", "sequence", "frame", "expressions", "priors", "tracking")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
#: landmark file beside a picture for the ``file`` backend: ``photo.png`` → ``photo.landmarks.npz``
LANDMARKS_SUFFIX = ".landmarks.npz"
CACHE_FILE, PLY_FILE, PREVIEW_FILE = "encoder_cache.pt", "gaussians_neutral.ply", "preview.png"
TURNTABLE_FILE, ANIMATION_FILE, META_FILE = "turntable.mp4", "animation.mp4", "meta.json"
_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


# ====================================================================== errors
class AvatarInputError(Avat3rError):
    """An avatar's input cannot be used; ``path`` is the file at fault, ``reason`` says why."""

    kind = "bad input"

    def __init__(self, path: str | Path | None, reason: str):
        self.path = str(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path or '<input>'}: {self.kind}: {reason}")


class NoFaceError(AvatarInputError):
    kind = "no face detected"


class UnreadableInputError(AvatarInputError):
    kind = "unreadable"


class TooFewFramesError(AvatarInputError):
    kind = "too few frames"


class FitFailedError(AvatarInputError):
    kind = "face-model fit failed"


class FaceTooSmallError(AvatarInputError):
    kind = "face too small"


class ExtremePoseError(AvatarInputError):
    kind = "head turned too far"


# ====================================================================== the library manifest
@dataclass
class LibraryEntry:
    """One avatar to build (paths absolute after :func:`read_library`)."""

    avatar_id: str
    mode: str
    source: str
    subject: str | None = None
    sequence: str | None = None
    frame: int | None = None
    expressions: str | None = None
    priors: str | None = None
    tracking: str | None = None
    library: str = ""  # the library file it came from (for messages)
    row: int = 0  # 1-based row in that file

    def to_item(self) -> dict:
        """The stage item: JSON-able, with the runner's ``id``."""
        return {"id": self.avatar_id, **asdict(self)}

    @classmethod
    def from_item(cls, item: dict) -> "LibraryEntry":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in item.items() if k in names})

    def where(self) -> str:
        return f"{self.library} row {self.row} (avatar {self.avatar_id})"

    def image_paths(self) -> list[str]:
        """Photos mode: the images of the folder (sorted) or the ``;``-separated list."""
        if ";" in self.source:
            return [p for p in self.source.split(";") if p]
        path = Path(self.source)
        if path.is_dir():
            files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise UnreadableInputError(path, f"no images ({', '.join(IMAGE_EXTS)}) in the folder")
            return files
        return [self.source]


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _resolve(base: Path, value: str) -> str:
    """Library paths are relative to the library file; ``;`` lists and ``#`` selectors survive."""
    if "://" in value:
        return value
    if ";" in value:
        return ";".join(_resolve(base, v) for v in value.split(";") if v)
    path, sep, selector = value.partition("#")
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve()) + (sep + selector if sep else "")


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if not path.exists():
        raise FormatError(path, None, "library file not found")
    try:
        if suffix == ".csv":
            with path.open(newline="") as f:
                return [dict(r) for r in csv.DictReader(f)]
        if suffix in (".yaml", ".yml"):
            data = read_yaml(path) or []
            if isinstance(data, dict):
                if "avatars" not in data:
                    raise FormatError(path, "avatars", "a YAML mapping needs an 'avatars' list")
                data = data["avatars"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise FormatError(path, None, "expected a list of mappings (one per avatar)")
            return data
        if suffix == ".parquet":
            return storage.read_parquet(str(path)).to_pylist()
    except FormatError:
        raise
    except Exception as exc:  # csv/yaml/parquet errors of many types
        raise FormatError(path, None, f"unreadable library file: {type(exc).__name__}: {exc}") from None
    raise FormatError(path, None, f"unknown library format {suffix!r} (use .csv, .yaml/.yml or .parquet)")


def read_library(path: str | Path) -> list[LibraryEntry]:
    """Read and validate a library manifest (see the module docstring); raises FormatError naming
    the file, the row and the field."""
    path = storage.absolute(path)  # a local path or a URI
    base = path.parent
    entries: list[LibraryEntry] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(_read_rows(path), start=1):
        def field_(name: str) -> str:
            return f"row {i}: {name}"

        unknown = sorted(set(raw) - set(LIBRARY_COLUMNS))
        if unknown:
            raise FormatError(path, field_(", ".join(unknown)), f"unknown column(s); known: {', '.join(LIBRARY_COLUMNS)}")
        row = {k: (None if _blank(raw.get(k)) else raw.get(k)) for k in LIBRARY_COLUMNS}
        mode = str(row["mode"] or "").strip().lower()
        if mode not in MODES:
            raise FormatError(path, field_("mode"), f"expected one of {', '.join(MODES)}, got {row['mode']!r}")
        if row["source"] is None:
            raise FormatError(path, field_("source"), "missing (the frames manifest, folder, image or video)")
        source = _resolve(base, str(row["source"]).strip())
        subject = None if row["subject"] is None else str(row["subject"]).strip()
        sequence = None if row["sequence"] is None else str(row["sequence"]).strip()
        frame = row["frame"]
        if frame is not None:
            try:
                frame = int(str(frame).strip())
            except ValueError:
                raise FormatError(path, field_("frame"), f"expected an integer frame index, got {frame!r}") from None
        if mode == "capture" and subject is None:
            raise FormatError(path, field_("subject"), "capture mode needs the subject to build")
        if mode != "capture":
            for name in ("subject", "sequence", "frame", "priors", "tracking"):
                if row[name] is not None:
                    raise FormatError(path, field_(name), f"only used in capture mode, not in {mode!r} mode")
        avatar_id = row["avatar_id"]
        if avatar_id is None:
            name = subject if mode == "capture" else Path(source.split(";")[0]).stem
            parts = [mode, name] + ([sequence] if sequence else []) + ([frame] if frame is not None else [])
            try:
                avatar_id = "_".join(id_part(p) for p in parts)
            except ValueError as exc:
                raise FormatError(path, field_("avatar_id"), f"cannot derive an id ({exc}); give avatar_id") from None
        avatar_id = str(avatar_id).strip()
        if not _ID_OK.match(avatar_id):
            raise FormatError(path, field_("avatar_id"),
                              f"{avatar_id!r} is not a dot-free id of [A-Za-z0-9_-] starting with a letter or digit")
        try:
            check_id_length(avatar_id)
        except ValueError as exc:
            raise FormatError(path, field_("avatar_id"), str(exc)) from None
        if avatar_id in seen:
            raise FormatError(path, field_("avatar_id"), f"duplicate id {avatar_id!r} (also row {seen[avatar_id]})")
        seen[avatar_id] = i
        expressions = None if row["expressions"] is None else str(row["expressions"]).strip()
        if expressions and expressions != "builtin":
            expressions = _resolve(base, expressions)
        entries.append(LibraryEntry(
            avatar_id=avatar_id, mode=mode, source=source, subject=subject, sequence=sequence, frame=frame,
            expressions=expressions,
            priors=_resolve(base, str(row["priors"])) if row["priors"] is not None else None,
            tracking=_resolve(base, str(row["tracking"])) if row["tracking"] is not None else None,
            library=str(path), row=i))
    return entries


def write_library(rows: Sequence[dict | LibraryEntry], path: str | Path) -> str:
    """Write a library manifest (format by extension: .csv, .yaml/.yml or .parquet)."""
    import pyarrow as pa

    path = storage.as_path(path)
    plain = []
    for r in rows:
        d = asdict(r) if isinstance(r, LibraryEntry) else dict(r)
        plain.append({k: d.get(k) for k in LIBRARY_COLUMNS if d.get(k) is not None})
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        schema = pa.schema([(k, pa.int64() if k == "frame" else pa.string()) for k in LIBRARY_COLUMNS])
        table = pa.Table.from_pylist([{k: r.get(k) for k in LIBRARY_COLUMNS} for r in plain], schema=schema)
        storage.write_parquet(table, str(path))
    elif suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(LIBRARY_COLUMNS))
        writer.writeheader()
        for r in plain:
            writer.writerow(r)
        storage.atomic_write_bytes(str(path), buf.getvalue().encode())
    elif suffix in (".yaml", ".yml"):
        import yaml

        storage.atomic_write_bytes(str(path), yaml.safe_dump({"avatars": plain}, sort_keys=False).encode())
    else:
        raise ValueError(f"unknown library format {suffix!r} (use .csv, .yaml/.yml or .parquet)")
    return str(path)


def write_capture_library(frames_manifest: str, splits: str, split: str = "test", out_path: str = "library.parquet",
                          expressions: str | None = None) -> str:
    """A library of one ``capture`` avatar per subject of ``split`` (held-out subjects by default).

    ``splits``: ``splits.json`` (subjects per split, written by the pack stage) or the shards
    directory holding it. Each avatar is built from the subject's first sequence; its animation is
    driven by the subject's *last* tracked sequence (a novel expression sequence when it has
    several) when ``<frames dir>/../tracking/tracking.parquet`` exists, else by the built-in set.
    ``expressions`` overrides that for every row. Ids: ``capture_<subject>``.
    """
    spath = storage.join(splits, "splits.json") if not str(splits).endswith(".json") else str(splits)
    try:
        table = parse_json(storage.read_bytes(spath), spath)
    except FileNotFoundError:
        raise FormatError(spath, None, "splits file not found (run the pack stage first)") from None
    if split not in table:
        raise FormatError(spath, split, f"no such split; known: {sorted(table)}")
    wanted = set(table[split])
    frames_manifest = str(storage.absolute(frames_manifest))
    frames = storage.read_parquet(frames_manifest).select(["subject", "sequence"]).to_pylist()
    sequences: dict[str, set[str]] = {}
    for r in frames:
        if r["subject"] in wanted:
            sequences.setdefault(r["subject"], set()).add(r["sequence"])
    tracking = storage.as_path(frames_manifest).parent.parent / "tracking" / "tracking.parquet"
    tracked: dict[str, set[str]] = {}
    if tracking.exists():
        for r in storage.read_parquet(str(tracking)).select(["subject", "sequence"]).to_pylist():
            tracked.setdefault(r["subject"], set()).add(r["sequence"])
    rows = []
    for subject in sorted(sequences):
        seqs = sorted(sequences[subject])
        expr = expressions
        if expr is None:
            drive = sorted(tracked.get(subject, ()))
            expr = f"{tracking}#{subject}/{drive[-1]}" if drive else "builtin"
        rows.append({"avatar_id": f"capture_{id_part(subject)}", "mode": "capture", "source": frames_manifest,
                     "subject": subject, "sequence": seqs[0], "expressions": expr})
    if not rows:
        log.warning("write_capture_library: no subject of split %r (%s) has frames in %s", split, sorted(wanted),
                    frames_manifest)
    return write_library(rows, out_path)


# ====================================================================== view / frame choice
def pick_diverse_poses(world_to_cam: np.ndarray, k: int) -> list[int]:
    """Indices of ``k`` images whose head poses differ most (head-frame cameras of an uncalibrated fit).

    With the head fixed at the origin, a head pose is a camera direction; farthest-point sampling on
    the unit directions starts at the most frontal one (nearest the mean direction). Sorted.
    """
    w2c = np.asarray(world_to_cam, np.float64)
    centers = -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])
    dirs = centers / np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    return sorted(farthest_views(dirs, k))


def head_angles(world_to_cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Yaw and pitch (degrees) of the head as each camera of an uncalibrated fit sees it.

    The head sits at the origin in FLAME's axes (x to the subject's left, y up, z out of the face);
    a camera straight in front is at yaw 0, pitch 0; on the subject's left, yaw > 0; above, pitch > 0.
    """
    w2c = np.asarray(world_to_cam, np.float64)
    c = -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])
    yaw = np.degrees(np.arctan2(c[:, 0], c[:, 2]))
    pitch = np.degrees(np.arctan2(c[:, 1], np.hypot(c[:, 0], c[:, 2])))
    return yaw, pitch


# ====================================================================== configuration
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
            "landmarks": self.landmarks in ("mediapipe", "file"),
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
        if self.position_source == "auto":
            return "dust3r" if self.dust3r_checkpoint else "face_model"
        return self.position_source

    def resolved_feature_source(self, features_enabled: bool) -> str:
        if not features_enabled:
            return "none"
        if self.feature_source == "auto":
            return "sapiens" if self.sapiens_model else "efficientnet"
        return self.feature_source

    def fit_config(self):
        from avat3r_core.tracking.fit import FitConfig

        return FitConfig.preset(self.fit_preset, **dict(self.fit))


# ====================================================================== prepared inputs
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
    R, t = world_to_cam[:, :3, :3], world_to_cam[:, :3, 3]
    cams = -np.einsum("nji,nj->ni", R, t)
    radius = float(np.median(np.linalg.norm(cams - center, axis=1)))
    front = (cams - center).mean(0)
    front = front / max(np.linalg.norm(front), 1e-12)
    up = -R[:, 1, :].mean(0)  # OpenCV: image y points down
    up = up - front * (up @ front)
    up = up / max(np.linalg.norm(up), 1e-12)
    return center, radius, front, up


# ====================================================================== reading pictures
def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a file the project wrote (capture crops); a missing or undecodable
    file raises :class:`UnreadableInputError` (an avatar's error row, not a stage failure).
    Users' pictures go through :func:`read_picture`."""
    try:
        return storage.read_image(path)
    except FileNotFoundError:
        raise UnreadableInputError(path, "file not found") from None
    except FormatError as exc:
        raise UnreadableInputError(path, exc.message) from None


def check_input_file(path: str, max_bytes: int | None = None) -> int:
    """Size in bytes of a user's input file, refusing what must not be opened.

    Only regular files: a FIFO would block the reader, a device (``/dev/zero``) never ends, a
    directory is no picture; ``stat`` tells without opening. ``max_bytes``: the size cap.
    """
    import stat

    local = storage.local_path(path)
    if local is not None:
        try:
            st = Path(local).stat()
        except FileNotFoundError:
            raise UnreadableInputError(path, "file not found") from None
        except OSError as exc:
            raise UnreadableInputError(path, f"cannot stat: {exc}") from None
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else
                    "a character device" if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise UnreadableInputError(path, f"{kind}: inputs are read from regular files only")
        size = int(st.st_size)
    else:
        if not storage.exists(path):
            raise UnreadableInputError(path, "file not found")
        fs, p = storage.url_to_fs(path)
        info = fs.info(p)
        if info.get("type") not in (None, "file"):
            raise UnreadableInputError(path, f"a {info.get('type')}: inputs are read from regular files only")
        size = int(info.get("size") or 0)
    if max_bytes is not None and size > max_bytes:
        raise UnreadableInputError(path, f"{size / 2 ** 20:.1f} MiB exceeds the input size cap of "
                                         f"{max_bytes / 2 ** 20:.1f} MiB (PrepareConfig.max_input_mb)")
    return size


def picture_header(handle, name: str) -> tuple[str, int, int]:
    """(format, width, height) from a picture's header alone, nothing decoded.

    Asks Pillow's format plugins directly (``Image.OPEN``): ``Image.open`` would refuse very large
    images before saying their size, and the size is what the caller checks against its own cap.
    """
    from PIL import Image

    Image.init()
    handle.seek(0)
    prefix = handle.read(16)
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and accept(prefix) is not True:
            continue
        handle.seek(0)
        try:
            im = factory(handle, name)
        except (SyntaxError, IndexError, TypeError, ValueError, OSError, struct.error):
            continue
        return fmt, int(im.size[0]), int(im.size[1])
    raise UnreadableInputError(name, "not a picture (no image format recognises its header)")


def read_picture(path: str, max_megapixels: float = 100.0, max_side: int = 2048,
                 max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """A user's picture as RGB uint8 (H, W, 3), long side at most ``max_side``, and what was done.

    Checked before decoding: a regular file (:func:`check_input_file`), its size (``max_bytes``)
    and its pixel count from the header (``max_megapixels``). Decoding (OpenCV) applies the EXIF
    orientation (phone JPEGs), converts grayscale, palette, CMYK and 16-bit pictures to 8-bit RGB,
    and shrinks large JPEGs while decoding (``IMREAD_REDUCED_COLOR_{2,4,8}``); anything still
    longer than ``max_side`` is resized (area filter). ``info``: ``format``, ``width``/``height``
    as stored, ``decoded`` [w, h] after orientation, ``scale`` (decoded / stored pixels).
    """
    import cv2

    check_input_file(path, max_bytes)
    fs, p = storage.url_to_fs(path)
    try:
        with fs.open(p, "rb") as handle:
            fmt, w, h = picture_header(handle, path)
            if w * h > max_megapixels * 1e6:
                raise UnreadableInputError(path, f"{w}x{h} pixels ({w * h / 1e6:.1f} MP, from the {fmt} header) exceed the "
                                                 f"cap of {max_megapixels:g} MP (PrepareConfig.max_megapixels)")
            handle.seek(0)
            data = handle.read()
    except OSError as exc:
        raise UnreadableInputError(path, f"cannot read: {exc}") from None
    reduce = 1
    while reduce < 8 and max(w, h) / (reduce * 2) >= max_side:
        reduce *= 2
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[reduce]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    del data
    if image is None:
        raise UnreadableInputError(path, f"cannot decode the {fmt} picture (corrupt or truncated)")
    long_side = max(image.shape[:2])
    if long_side > max_side:
        f = max_side / long_side
        image = cv2.resize(image, (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))),
                           interpolation=cv2.INTER_AREA)
    image = np.ascontiguousarray(image[..., ::-1])
    scale = max(image.shape[:2]) / max(w, h)
    return image, {"format": fmt, "width": w, "height": h, "decoded": [int(image.shape[1]), int(image.shape[0])],
                   "scale": round(float(scale), 6)}


def read_video_frames(path: str, max_frames: int, max_side: int = 2048,
                      max_bytes: int | None = None) -> tuple[list[np.ndarray], float]:
    """Up to ``max_frames`` RGB frames, each shrunk to a long side of at most ``max_side``, and that
    scale (decoded / stored pixels);
    a regular file only (:func:`check_input_file`); undecodable → :class:`UnreadableInputError`;
    < 2 frames → :class:`TooFewFramesError` (one frame is a picture: use mode ``image``)."""
    import cv2

    from avat3r_core.video import read_frames

    check_input_file(path, max_bytes)
    frames: list[np.ndarray] = []
    f = 1.0
    try:
        for frame in read_frames(path):
            if max(frame.shape[:2]) > max_side:
                f = max_side / max(frame.shape[:2])
                frame = cv2.resize(frame, (round(frame.shape[1] * f), round(frame.shape[0] * f)), interpolation=cv2.INTER_AREA)
            frames.append(frame)
            if len(frames) >= max_frames:
                break
    except Exception as exc:  # PyAV raises many error types for broken files
        if len(frames) < 2:
            raise UnreadableInputError(path, f"cannot decode the video: {type(exc).__name__}: {exc}") from None
        log.warning("%s: decoding stopped after %d frames: %s", path, len(frames), exc)
    if len(frames) < 2:
        raise TooFewFramesError(path, f"the video has {len(frames)} decodable frame(s); video mode needs at least 2 "
                                      "with different head poses (use mode 'image' for a single picture)")
    return frames, f


def landmarks_path(picture: str) -> str:
    p = Path(picture)
    return str(p.with_name(p.stem + LANDMARKS_SUFFIX))


def read_landmarks_beside(picture: str, frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``file`` backend: ``(points (N, L, 2), confidence (N, L))`` from ``<stem>.landmarks.npz``.

    A missing file means no face was marked for that picture (:class:`NoFaceError`). ``frames``:
    a video's frame count (the file then holds (T, L, 2) with T ≥ frames).
    """
    path = landmarks_path(picture)
    if not storage.exists(path):
        raise NoFaceError(picture, f"landmark backend 'file': no landmark file {path}")
    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            if "landmarks" not in z:
                raise FormatError(path, "landmarks", "missing required key")
            pts = np.asarray(z["landmarks"], np.float64)
            vis = np.asarray(z["visible"], np.float64) if "visible" in z else np.ones(pts.shape[:-1])
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(path, None, f"not a readable .npz: {exc}") from None
    if frames is None:
        pts, vis = pts[None], vis[None]
    if pts.ndim != 3 or pts.shape[-1] != 2:
        raise FormatError(path, "landmarks", f"expected ({'T, ' if frames else ''}L, 2), got {pts.shape}")
    if vis.shape != pts.shape[:2]:
        raise FormatError(path, "visible", f"expected {pts.shape[:2]}, got {vis.shape}")
    if frames is not None and pts.shape[0] < frames:
        raise FormatError(path, "landmarks", f"{pts.shape[0]} frames of landmarks for a video of {frames} frames")
    n = frames if frames is not None else 1
    return pts[:n], np.clip(vis[:n], 0, 1)


# ====================================================================== preparation
class Preparer:
    """Turns library rows into :class:`PreparedAvatar`; heavy models are loaded once, lazily.

    ``image_size``, ``feature_dim`` and ``frame`` come from the checkpoint's model config (the
    crops and coordinates must be what the network was trained on); ``features_enabled`` says
    whether it takes features at all. ``frame="head"``: every view's camera and position map is
    expressed in the tracked head frame of its own timestep (capture mode: the tracking
    manifest's ``head_to_world``; pictures: the fitted face model's).
    """

    def __init__(self, config: PrepareConfig, image_size: int, feature_dim: int = 0, features_enabled: bool = False,
                 frame: str = "world"):
        if frame not in ("head", "world"):
            raise ValueError(f"frame must be head or world, got {frame!r}")
        self.frame = frame
        self.config = config
        self.image_size = int(image_size)
        self.feature_dim = int(feature_dim)
        self.features_enabled = bool(features_enabled)
        self.device = pick_device(config.device)
        self.position_source = config.resolved_position_source
        self.feature_source = config.resolved_feature_source(self.features_enabled)
        self._layer = None
        self._embedding = None
        self._detector = None
        self._dust3r = None
        self._matte = None  # priors.matte.PictureMatte, loaded on first use
        self._features = None  # sources.FeatureExtractor, loaded on first use
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.feature_source in ("efficientnet", "sapiens") and config.feature_projection:
            path = config.feature_projection
            try:
                with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
                    self._projection = (torch.from_numpy(z["matrix"]).float(), torch.from_numpy(z["mean"]).float())
                    self.projection_meta = json.loads(str(z["meta"])) if "meta" in z else {}
            except FileNotFoundError:
                raise FormatError(path, None, "feature projection file not found") from None
            except KeyError as exc:
                raise FormatError(path, str(exc), "missing key in the feature projection") from None
            if self._projection[0].shape[1] != self.feature_dim:
                raise FormatError(path, "matrix", f"projects to {self._projection[0].shape[1]} channels, the model "
                                  f"takes {self.feature_dim}")

    def check_picture_features(self) -> None:
        """Raise FormatError now if pictures' features could never match the model's width (a
        missing projection); capture mode reads the priors stage's stored features instead."""
        if self.features_enabled and self._projection is None and self.feature_source == "efficientnet" \
                and self.feature_dim != 112:
            raise FormatError("PrepareConfig", "feature_projection",
                              f"the model takes {self.feature_dim} feature channels, EfficientNet-Lite0 gives 112: give "
                              "the training data's feature_projection.npz")

    # ------------------------------------------------------------------ lazily loaded models
    def face_layer(self):
        if self._layer is None:
            from avat3r_core.flame import (
                FlameLayer,
                load_flame_model,
                load_landmark_embedding,
            )

            cfg = self.config
            if not cfg.face_model or not cfg.landmark_embedding:
                raise FormatError("PrepareConfig", "face_model", "photos/image/video modes need face_model and "
                                  "landmark_embedding (a FLAME-format model and its landmark embedding)")
            self._embedding = load_landmark_embedding(cfg.landmark_embedding)
            self._layer = FlameLayer(load_flame_model(cfg.face_model), landmarks=self._embedding,
                                     dtype=torch.float64).eval()
        return self._layer

    def _mediapipe(self):
        if self._detector is None:
            from avat3r_core.tracking.landmarks import MediaPipeLandmarks

            self._detector = MediaPipeLandmarks(self.config.mediapipe_model or None, num_faces=self.config.max_faces)
        return self._detector

    def matte(self):
        if self._matte is None:
            from avat3r_core.priors.matte import PictureMatte

            self._matte = PictureMatte(self.config.segmentation_model or None)
        return self._matte

    def detect_one(self, image: np.ndarray, picture: str, scale: float = 1.0) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
        """Landmarks of one picture in its decoded pixels: points (L, 2), confidence (L,) (None, None
        when no face), and what the detector saw (``faces_found``, ``face_box``, ``other_faces``).
        ``scale``: decoded / stored pixels (landmark files are in stored pixels)."""
        if self.config.landmarks == "file":
            try:
                pts, conf = read_landmarks_beside(picture)
            except NoFaceError:
                return None, None, {"faces_found": 0}
            return pts[0] * scale, conf[0], {"faces_found": 1}
        d = self._mediapipe().detect(image[None])
        info: dict = {"faces_found": int(d.extras["faces_found"][0])}
        if not d.found[0]:
            return None, None, info
        info["face_box"] = [round(float(v), 1) for v in d.extras["face_box"][0]]
        info["other_faces"] = [[round(v, 1) for v in b] for b in d.extras["face_boxes"][0] if
                               [round(v, 1) for v in b] != info["face_box"]]
        return d.points[0].astype(np.float64), d.confidence[0].astype(np.float64), info

    def _features_of(self, crops: np.ndarray) -> np.ndarray | None:
        if self.feature_source == "none":
            return None
        self.check_picture_features()
        from avat3r_core.priors import sources

        if self._features is None:
            self._features = sources.FeatureExtractor(self.feature_source, self.device, self.config.sapiens_model,
                                                      self.config.sapiens_input_size)
        raw = self._features(crops)
        feats = sources.features_to_store(raw.cpu(), self._projection).astype(np.float32)
        if feats.shape[1] != self.feature_dim:
            raise FormatError(self.config.feature_projection or self._features.source, "feature_dim",
                              f"{self._features.source} features have {feats.shape[1]} channels after projection, the "
                              f"model takes {self.feature_dim} (give the training data's feature_projection.npz)")
        return feats

    def feature_source_name(self) -> str:
        if self.feature_source == "none":
            return "none"
        if self._features is not None:
            return self._features.source
        return "efficientnet_lite0_imagenet" if self.feature_source == "efficientnet" else "sapiens"

    # ------------------------------------------------------------------ entry point
    def prepare(self, entry: LibraryEntry) -> PreparedAvatar:
        start = time.perf_counter()
        if entry.mode == "capture":
            out = self.prepare_capture(entry)
        elif entry.mode in ("photos", "image"):
            out = self.prepare_pictures(entry, entry.image_paths() if entry.mode == "photos" else [entry.source])
        elif entry.mode == "video":
            cfg = self.config
            frames, scale = read_video_frames(entry.source, cfg.video_max_frames, cfg.max_side, self._max_bytes)
            out = self.prepare_pictures(entry, [entry.source], frames=frames, frame_scale=scale)
        else:  # read_library already refuses this
            raise FormatError(entry.library, f"row {entry.row}: mode", f"unknown mode {entry.mode!r}")
        out.meta["prepare_s"] = round(time.perf_counter() - start, 3)
        return out

    @property
    def _max_bytes(self) -> int:
        return int(self.config.max_input_mb * 2 ** 20)

    def read_picture(self, path: str) -> tuple[np.ndarray, dict]:
        cfg = self.config
        return read_picture(path, cfg.max_megapixels, cfg.max_side, self._max_bytes)

    # ------------------------------------------------------------------ capture mode
    def prepare_capture(self, entry: LibraryEntry) -> PreparedAvatar:
        """Farthest viewpoints of a preprocessed capture (frames + priors [+ tracking] manifests)."""
        import cv2

        frames_manifest = entry.source
        frames_dir = str(storage.as_path(frames_manifest).parent)
        priors_manifest = entry.priors or str(storage.as_path(frames_dir).parent / "priors" / "priors.parquet")
        tracking_manifest = entry.tracking or str(storage.as_path(frames_dir).parent / "tracking" / "tracking.parquet")
        for p, what in ((frames_manifest, "frames manifest"), (priors_manifest, "priors manifest")):
            if not storage.exists(p):
                raise AvatarInputError(p, f"{what} not found")
        rows = [r for r in storage.read_parquet(frames_manifest).to_pylist() if str(r["subject"]) == entry.subject]
        if entry.sequence is not None:
            rows = [r for r in rows if str(r["sequence"]) == entry.sequence]
        elif rows:
            first = sorted({str(r["sequence"]) for r in rows})[0]
            rows = [r for r in rows if str(r["sequence"]) == first]
        if entry.frame is not None:
            rows = [r for r in rows if int(r["frame"]) == entry.frame]
        if not rows:
            raise AvatarInputError(frames_manifest, f"no frames of subject {entry.subject!r}"
                                   f"{f' sequence {entry.sequence!r}' if entry.sequence else ''}"
                                   f"{f' frame {entry.frame}' if entry.frame is not None else ''}")
        priors = {r["id"]: r for r in storage.read_parquet(priors_manifest).to_pylist()}
        rows = sorted((r for r in rows if r["id"] in priors), key=lambda r: r["id"])
        if not rows:
            raise AvatarInputError(priors_manifest, f"no priors for any frame of subject {entry.subject!r}")
        tracked = self._tracking_rows(tracking_manifest, entry.subject)
        # the tracked frames this avatar uses (head frames of its rows, the reference pose)
        check_tracking_rows((tracked[k] for k in sorted({(str(r["sequence"]), int(r["frame"])) for r in rows})
                             if k in tracked), tracking_manifest)
        heads = self._capture_head_frames(rows, tracked, tracking_manifest)
        w2c = np.array([r["world_to_cam"] for r in rows], np.float64).reshape(-1, 4, 4)
        if heads is not None:
            w2c = w2c @ heads
        centers = -np.einsum("nji,nj->ni", w2c[:, :3, :3], w2c[:, :3, 3])
        picks = farthest_views(centers, self.config.num_views, groups=np.array([int(r["frame"]) for r in rows]))
        chosen = [rows[i] for i in picks]
        priors_dir = str(storage.as_path(priors_manifest).parent)
        S = self.image_size
        images, cams, pos, conf, feats, views = [], [], [], [], [], []
        for i, r in zip(picks, chosen):
            img_path = storage.join(frames_dir, r["image"])
            image = read_image(img_path)
            p = priors[r["id"]]
            pos_path = storage.join(priors_dir, p["position"])
            with np.load(io.BytesIO(storage.read_bytes(pos_path)), allow_pickle=False) as z:
                position, confidence = z["position"].astype(np.float32), z["confidence"].astype(np.float32)
            check_finite(position, pos_path, "position")  # named here, not later in a temporary .ply
            check_finite(confidence, pos_path, "confidence")
            if heads is not None:
                position = to_head_frame(position, heads[i])
            cam = Cameras(torch.tensor(w2c[i:i + 1]), torch.tensor(np.reshape(r["K"], (1, 3, 3))),
                          int(r["width"]), int(r["height"]))
            if image.shape[:2] != (S, S) or position.shape[:2] != (S, S):
                # the network's crop size differs from the capture's: resize (cameras scale exactly)
                image = cv2.resize(image, (S, S), interpolation=cv2.INTER_AREA)
                position = cv2.resize(position, (S, S), interpolation=cv2.INTER_NEAREST)
                confidence = cv2.resize(confidence, (S, S), interpolation=cv2.INTER_NEAREST)
                cam = cam.resize(S, S)
            images.append(image)
            cams.append(cam)
            pos.append(position)
            conf.append(confidence)
            if self.features_enabled:
                if not p.get("features"):
                    raise AvatarInputError(priors_manifest, f"row {r['id']} has no features (feature_source "
                                           f"{p.get('feature_source')!r}) but the model takes {self.feature_dim} channels")
                with np.load(io.BytesIO(storage.read_bytes(storage.join(priors_dir, p["features"]))), allow_pickle=False) as z:
                    f = z["features"].astype(np.float32)
                if f.shape[0] != self.feature_dim:
                    raise FormatError(storage.join(priors_dir, p["features"]), "features",
                                      f"{f.shape[0]} channels, the model takes {self.feature_dim}")
                feats.append(f)
            views.append({"id": r["id"], "frame": int(r["frame"]), "camera": str(r["camera"]), "image": img_path})
        reference = {"rotation": np.zeros(3), "translation": np.zeros(3)}
        first = tracked.get((str(chosen[0]["sequence"]), int(chosen[0]["frame"])))
        if first is not None:
            reference = {"rotation": np.asarray(first["rotation"], np.float64),
                         "translation": np.asarray(first["translation"], np.float64)}
        cameras = Cameras.cat(cams)
        position, confidence = np.stack(pos), np.stack(conf)
        world_to_cam = cameras.world_to_cam.double().numpy()
        center, radius, front, up = _framing(position, confidence, world_to_cam, priors_manifest)
        sources = sorted({str(priors[r["id"]]["position_source"]) for r in chosen})
        fsources = sorted({str(priors[r["id"]]["feature_source"]) for r in chosen})
        meta = {"mode": "capture", "views": views, "position_source": ",".join(sources),
                "feature_source": ",".join(fsources) if self.features_enabled else "none",
                "landmarks": "", "frames_manifest": frames_manifest, "priors_manifest": priors_manifest, "frame": self.frame,
                "tracking_manifest": tracking_manifest if storage.exists(tracking_manifest) else ""}
        return PreparedAvatar(entry.avatar_id, np.stack(images), world_to_cam, cameras.K.double().numpy(), position,
                              confidence, np.stack(feats) if feats else None, reference, center, radius, front, up, meta)

    @staticmethod
    def _tracking_rows(tracking_manifest: str, subject: str) -> dict[tuple[str, int], dict]:
        """The subject's tracked frames by (sequence, frame); empty without a tracking manifest."""
        if not storage.exists(tracking_manifest):
            return {}
        table = storage.read_parquet(tracking_manifest)
        return {(str(t["sequence"]), int(t["frame"])): t for t in table.to_pylist() if str(t["subject"]) == subject}

    def _capture_head_frames(self, rows: list[dict], tracked: dict, tracking_manifest: str) -> np.ndarray | None:
        """(N, 4, 4) head-to-world of each frames row's timestep (head-frame models), else None."""
        if self.frame != "head":
            return None
        if not tracked:
            raise AvatarInputError(tracking_manifest, "the model works in the tracked head frame, but there is no "
                                   "tracking for this subject (run the track stage, or give the entry's tracking)")
        heads = []
        for r in rows:
            t = tracked.get((str(r["sequence"]), int(r["frame"])))
            if t is None or t.get("head_to_world") is None:
                raise AvatarInputError(tracking_manifest, f"no head_to_world for {r['subject']}/{r['sequence']} frame "
                                       f"{r['frame']} (tracking from before head frames: re-run the track stage)")
            if not is_rigid(t["head_to_world"]):
                raise AvatarInputError(tracking_manifest, f"head_to_world of {r['subject']}/{r['sequence']} frame "
                                       f"{r['frame']} is not a rigid transform: {list(t['head_to_world'])}")
            heads.append(np.asarray(t["head_to_world"], np.float64).reshape(4, 4))
        return np.stack(heads)

    # ------------------------------------------------------------------ photos / image / video
    def prepare_pictures(self, entry: LibraryEntry, pictures: list[str], frames: list[np.ndarray] | None = None,
                         frame_scale: float = 1.0) -> PreparedAvatar:
        """Landmarks → uncalibrated face-model fit → head crops → priors, for N pictures (or the
        ``frames`` of the video ``pictures[0]``).

        Pictures are decoded one at a time: each is read, its landmarks found, and let go; only the
        views finally used are read again for their crops, so memory holds at most ``num_views``
        pictures however many the folder has.
        """
        from avat3r_core.extract import crop_image, frame_boxes
        from avat3r_core.priors import sources
        from avat3r_core.tracking.fit import fit_uncalibrated
        from avat3r_core.tracking.landmarks import points_for_embedding

        cfg = self.config
        video = frames is not None
        source = pictures[0] if video else ";".join(pictures)
        layer = self.face_layer()
        clock = {"t": time.perf_counter()}
        timings: dict[str, float] = {}

        def lap(name: str) -> None:  # where preparation time goes (meta["timings"])
            now = time.perf_counter()
            timings[name] = round(timings.get(name, 0.0) + now - clock["t"], 4)
            clock["t"] = now

        n = len(frames) if video else len(pictures)
        names = [f"{pictures[0]}#frame{i}" for i in range(n)] if video else list(pictures)
        beside = None
        if video and cfg.landmarks == "file":
            beside = read_landmarks_beside(pictures[0], frames=n)
        pts_l: list = [None] * n
        conf_l: list = [None] * n
        sizes = np.zeros((n, 2), np.int64)
        infos: list[dict] = [{} for _ in range(n)]
        reasons: dict[str, str] = {}
        face_px = np.zeros(n)
        for i in range(n):
            if video:
                image = frames[i]
                if beside is not None:
                    pts_l[i], conf_l[i] = beside[0][i] * frame_scale, beside[1][i]
                else:
                    pts_l[i], conf_l[i], infos[i] = self.detect_one(image, pictures[0])
            else:
                image, infos[i] = self.read_picture(pictures[i])
                pts_l[i], conf_l[i], found_info = self.detect_one(image, pictures[i], infos[i]["scale"])
                infos[i].update(found_info)
            sizes[i] = image.shape[1], image.shape[0]
            del image
            if pts_l[i] is not None and (conf_l[i] > 0).sum() < 6:
                pts_l[i] = conf_l[i] = None
            if pts_l[i] is None:
                reasons[names[i]] = "no face"
                continue
            seen = pts_l[i][conf_l[i] > 0]
            face_px[i] = float(seen[:, 1].max() - seen[:, 1].min())
            if face_px[i] < cfg.min_face_px:
                reasons[names[i]] = f"face {face_px[i]:.0f} px high, below min_face_px {cfg.min_face_px:g}"
                pts_l[i] = conf_l[i] = None
        found = np.array([p is not None for p in pts_l])
        if not found.any():
            if face_px.max() > 0:
                raise FaceTooSmallError(source, f"the largest face is {face_px.max():.0f} px high (landmark box, "
                                                f"{'frames' if video else 'pictures'} shrunk to at most {cfg.max_side} px); "
                                                f"fitting needs min_face_px = {cfg.min_face_px:g}")
            raise NoFaceError(source, f"no face in any of the {n} {'frames' if video else 'pictures'} "
                                      f"(landmark backend {cfg.landmarks!r})")
        L = next(p.shape[0] for p in pts_l if p is not None)
        points = np.stack([p if p is not None else np.zeros((L, 2)) for p in pts_l])
        conf = np.stack([c if c is not None else np.zeros(L) for c in conf_l])
        dropped = [names[i] for i in np.flatnonzero(~found)]
        if dropped:
            log.warning("avatar %s: %d of %d inputs dropped: %s", entry.avatar_id, len(dropped), n,
                        "; ".join(f"{k}: {reasons[k]}" for k in dropped[:5]))
        keep = np.flatnonzero(found)
        if video and len(keep) < 2:
            raise TooFewFramesError(source, f"a face was found in only {len(keep)} frame(s); video mode needs 2")
        if video and len(keep) > cfg.video_fit_frames:  # evenly spaced: cover the whole clip
            keep = keep[np.unique(np.round(np.linspace(0, len(keep) - 1, cfg.video_fit_frames)).astype(int))]
        points, conf = points_for_embedding(points, conf, self._embedding, cfg.landmark_embedding)
        indices = self._embedding.landmark_indices
        sizes = sizes[keep]
        lap("read_detect_s")
        fit = fit_uncalibrated(layer, points[keep], sizes, conf[keep], fov_deg=cfg.fov_deg, config=cfg.fit_config(),
                               landmark_indices=indices, video=video)
        if not fit.converged:
            raise FitFailedError(source, fit.message or f"residuals {np.round(fit.residuals, 2).tolist()} px")
        lap("fit_s")
        yaw, pitch = head_angles(fit.world_to_cam)
        turned = (np.abs(yaw) > cfg.max_yaw_deg) | (np.abs(pitch) > cfg.max_pitch_deg)
        for j in np.flatnonzero(turned):
            reasons[names[int(keep[j])]] = f"head turned yaw {yaw[j]:+.0f} deg, pitch {pitch[j]:+.0f} deg"
            dropped.append(names[int(keep[j])])
        if turned.all():
            j = int(np.argmin(np.abs(yaw) + np.abs(pitch)))
            raise ExtremePoseError(source, f"the most frontal {'frame' if video else 'picture'} has the head at yaw "
                                           f"{yaw[j]:+.0f} deg, pitch {pitch[j]:+.0f} deg (fitted); limits ±{cfg.max_yaw_deg:g} "
                                           f"and ±{cfg.max_pitch_deg:g} deg (PrepareConfig.max_yaw_deg/max_pitch_deg)")
        usable = np.flatnonzero(~turned)
        n_views = 1 if entry.mode == "image" else cfg.num_views
        local = (usable[pick_diverse_poses(fit.world_to_cam[usable], n_views)] if len(usable) > n_views
                 else usable).tolist()
        S = self.image_size
        # head centre: the middle of the fitted neutral head (head frame = world for uncalibrated inputs)
        neutral = sources.flame_vertices(layer, {"shape": fit.params["shape"][0],
                                                 "expression": np.zeros_like(fit.params["expression"][0]),
                                                 "rotation": np.zeros(3), "translation": np.zeros(3)}).numpy()
        center3 = 0.5 * (neutral.min(0) + neutral.max(0))
        crops, cams, verts, mattes = [], [], [], []
        matting = self.matte()
        for j in local:
            i = int(keep[j])
            cam = Cameras(torch.as_tensor(fit.world_to_cam[j:j + 1]), torch.as_tensor(fit.K[j:j + 1]),
                          int(sizes[j, 0]), int(sizes[j, 1]))
            box = frame_boxes(cam, center3[None], cfg.head_extent)[0]
            picture = frames[i] if video else self.read_picture(pictures[i])[0]
            crops.append(crop_image(picture, box, S))
            if matting.available:  # on the whole picture (the model's own framing), then cropped like it
                mattes.append(crop_image(matting(picture), box, S))
            del picture
            cams.append(cam.crop_resize(box[None], S))
            params = {k: fit.params[k][j] for k in ("expression", "jaw", "neck", "eyes")}
            params.update(shape=fit.params["shape"][0], rotation=np.zeros(3), translation=np.zeros(3))
            verts.append(sources.flame_vertices(layer, params).numpy())
        cameras = Cameras.cat(cams)
        crops_arr = np.stack(crops)
        lap("crop_matte_s")
        heads = None
        if self.frame == "head":  # the fitted head's own frame (neck rotation included), as in training
            T = len(local)
            with torch.no_grad():
                heads = layer.head_to_world(
                    shape=np.repeat(fit.params["shape"][:1], T, 0), expr=fit.params["expression"][local],
                    neck=fit.params["neck"][local]).numpy()
        if self.position_source == "dust3r":
            if self._dust3r is None:
                from avat3r_core.priors.dust3r import load_dust3r

                self._dust3r = load_dust3r(cfg.dust3r_checkpoint, device=self.device)
            # one view: DUSt3R pairs the image with itself, as its official code does for single images
            twice = len(local) == 1
            maps = sources.position_from_dust3r(self._dust3r, np.concatenate([crops_arr] * (2 if twice else 1)),
                                                Cameras.cat([cameras] * (2 if twice else 1)).to(dtype=torch.float64))
            maps = maps[:len(local)]
            position_source = "dust3r"
        else:
            maps = [sources.position_from_mesh(v, layer.faces, cameras[k].to(dtype=torch.float64)) for k, v in enumerate(verts)]
            position_source = "face_model"
        position = np.stack([m[0].numpy() for m in maps]).astype(np.float32)
        confidence = np.stack([m[1].numpy() for m in maps]).astype(np.float32)
        # the person matte: no Gaussians from the background (DUSt3R gives every pixel a point)
        matte = np.stack(mattes).astype(np.float32) if mattes else (confidence > 0.5).astype(np.float32)
        confidence = confidence * (matte > 0.5)
        if heads is not None:
            position = np.stack([to_head_frame(p, h) for p, h in zip(position, heads)])
            cameras = Cameras(cameras.world_to_cam @ torch.as_tensor(heads, dtype=cameras.world_to_cam.dtype),
                              cameras.K, cameras.width, cameras.height)
        lap("positions_s")
        feats = self._features_of(crops_arr) if self.features_enabled else None
        lap("features_s")
        world_to_cam = cameras.world_to_cam.double().numpy()
        center, radius, front, up = _framing(position, confidence, world_to_cam, source)
        views = [{"input": names[int(keep[j])], "residual_px": float(fit.residuals[j]), "yaw_deg": round(float(yaw[j]), 1),
                  "pitch_deg": round(float(pitch[j]), 1), "face_px": round(float(face_px[int(keep[j])]), 1),
                  **infos[int(keep[j])]} for j in local]
        meta = {"mode": entry.mode, "views": views, "position_source": position_source,
                "feature_source": self.feature_source_name() if self.features_enabled else "none",
                "landmarks": cfg.landmarks, "fit_residual_px": float(np.mean(fit.residuals)), "fitted": int(len(keep)),
                "matte_source": matting.source, "matte_fraction": round(float(matte.mean()), 4),
                "head_extent": cfg.head_extent, "timings": timings,
                "dropped": dropped, "dropped_reasons": {k: reasons[k] for k in dropped}, "fov_deg": cfg.fov_deg,
                "frame": self.frame, "landmark_points": int(points.shape[1]) if indices is None else int(len(indices)),
                "note": "uncalibrated: cameras from a face-model fit with an assumed field of view; head at the origin"}
        reference = {"rotation": np.zeros(3), "translation": np.zeros(3)}
        return PreparedAvatar(entry.avatar_id, crops_arr, world_to_cam, cameras.K.double().numpy(), position,
                              confidence, feats, reference, center, radius, front, up, meta, matte)


# ====================================================================== expressions
#: the built-in expression set: (label, FLAME parameters of the key), covering jaw open, smile,
#: pucker, brows up and down and eyes closed. ``expression`` moves component k of the face model's
#: expression basis by the given number of standard deviations (FLAME coefficients are in sigma
#: units; on the studio head (``synthetic.head.EXPRESSION_NAMES``) 0 is the jaw-open corrective,
#: 1 "smile", 3 "brow_raise", 4 "brow_furrow", 5/6 the blinks (closed at +2), 8 "pucker");
#: ``jaw`` rotates the jaw joint. 7 transitions: at the demo's 11 frames per key and 24 fps, 3.2 s.
BUILTIN_KEYS: tuple[tuple[str, dict], ...] = (
    ("neutral", {}),
    ("jaw_open", {"expression": {0: 1.5}, "jaw": (0.3, 0.0, 0.0)}),
    ("smile", {"expression": {1: 2.0}}),
    ("pucker", {"expression": {8: 2.0}}),
    ("brows_up", {"expression": {3: 2.0}}),
    ("brows_down", {"expression": {4: 2.0}}),
    ("eyes_closed", {"expression": {5: 2.0, 6: 2.0}}),
    ("neutral", {}),
)


def _key_params(spec: dict) -> dict[str, np.ndarray]:
    expr = np.zeros(100)
    for k, v in spec.get("expression", {}).items():
        expr[k] = v
    return {"expression": expr, "jaw": np.asarray(spec.get("jaw", (0.0, 0.0, 0.0)), np.float64)}


def builtin_expressions(reference: dict | None = None, frames_per_key: int = 8) -> tuple[np.ndarray, list[str]]:
    """Codes (T, 135) float32 easing between :data:`BUILTIN_KEYS` (cosine), head at ``reference``."""
    keys = [_key_params(spec) for _, spec in BUILTIN_KEYS]
    params: dict[str, list] = {"expression": [], "jaw": []}
    labels = []
    for a in range(len(keys) - 1):
        for s in range(frames_per_key):
            w = 0.5 - 0.5 * math.cos(math.pi * s / frames_per_key)
            for k in params:
                params[k].append((1 - w) * keys[a][k] + w * keys[a + 1][k])
            labels.append(BUILTIN_KEYS[a][0] if w < 0.5 else BUILTIN_KEYS[a + 1][0])
    return _encode({k: np.stack(v) for k, v in params.items()}, reference), labels


def _encode(params: dict[str, np.ndarray], reference: dict | None) -> np.ndarray:
    from avat3r_core.tracking import expression_code

    T = len(next(iter(params.values())))
    ref = reference or {}
    full = dict(params)
    for key in ("rotation", "translation"):
        if key not in full:
            full[key] = np.tile(np.asarray(ref.get(key, np.zeros(3)), np.float64).reshape(1, 3), (T, 1))
    return expression_code.encode(full).astype(np.float32)


def neutral_code(reference: dict | None = None) -> np.ndarray:
    """(135,) the neutral expression with the head at its reference pose."""
    return _encode({"expression": np.zeros((1, 100))}, reference)[0]


def _tracked_rows(spec: str) -> list[dict]:
    """The frames of one tracked sequence, ``<tracking.parquet>[#subject/sequence]``, in frame order."""
    path, _, selector = spec.partition("#")
    if not storage.exists(path):
        raise FormatError(path, None, "expression track not found")
    rows = storage.read_parquet(path).to_pylist()
    if selector:
        subject, _, sequence = selector.partition("/")
        rows = [r for r in rows if str(r["subject"]) == subject and (not sequence or str(r["sequence"]) == sequence)]
    groups = {(str(r["subject"]), str(r["sequence"])) for r in rows}
    if not rows:
        raise FormatError(path, selector or None, "no tracked frames for this selector")
    if len(groups) > 1:
        raise FormatError(path, None, f"holds {len(groups)} sequences; pick one with '{path}#<subject>/<sequence>'")
    rows = sorted(rows, key=lambda r: int(r["frame"]))
    check_tracking_rows(rows, path)  # one NaN frame would render white, not fail
    return rows


def load_head_motion(spec: str | None) -> np.ndarray | None:
    """A tracked sequence's rigid head motion relative to its first frame, (T, 4, 4)
    ``H₀⁻¹ Hₜ`` (the frames of :func:`load_expression_track`); None for built-in or ``.npy`` codes.

    A head-frame avatar replays it with its camera: a camera fixed in the world is
    ``camera @ H₀⁻¹ Hₜ`` in the head frame at time t.
    """
    if not spec or spec == "builtin" or spec.partition("#")[0].endswith(".npy"):
        return None
    rows = _tracked_rows(spec)
    if any(r.get("head_to_world") is None for r in rows):
        raise FormatError(spec.partition("#")[0], "head_to_world", "tracking without head frames (re-run the track "
                          "stage) cannot drive the head pose")
    bad = [r for r in rows if not is_rigid(r["head_to_world"])]
    if bad:
        raise FormatError(spec.partition("#")[0], f"frame {bad[0]['frame']}",
                          f"head_to_world is not a rigid transform ({len(bad)} of {len(rows)} frames)")
    H = np.array([r["head_to_world"] for r in rows], np.float64).reshape(-1, 4, 4)
    return np.linalg.inv(H[0]) @ H


def load_expression_track(spec: str | None, reference: dict | None = None, frames_per_key: int = 8,
                          drive_head_pose: bool = False) -> tuple[np.ndarray, str]:
    """Expression codes (T, 135) float32 and a description of where they came from.

    ``spec``: ``None``/``builtin`` → :func:`builtin_expressions`; ``<tracking.parquet>[#subject/sequence]``
    → that sequence's tracked FLAME expression, jaw, neck and eyes, in frame order (the file must
    hold one sequence when no selector is given); ``<codes>.npy`` → (T, 135) codes as they are.
    The head stays at ``reference`` unless ``drive_head_pose`` (the tracked head motion is in its
    own capture's world frame, which is not the avatar's).
    """
    if not spec or spec == "builtin":
        codes, _ = builtin_expressions(reference, frames_per_key)
        return codes, "builtin"
    path, _, selector = spec.partition("#")
    if not storage.exists(path):
        raise FormatError(path, None, "expression track not found")
    if path.endswith(".npy"):
        try:
            codes = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
        except Exception as exc:
            raise FormatError(path, None, f"not a readable .npy of codes: {exc}") from None
        if codes.ndim != 2 or codes.shape[1] != 135 or len(codes) == 0:
            raise FormatError(path, None, f"expected (T, 135) expression codes, got {codes.shape}")
        if not np.isfinite(codes).all():
            raise FormatError(path, None, "codes hold NaN/Inf")
        return codes.astype(np.float32), spec
    rows = _tracked_rows(spec)
    try:
        params = {k: np.array([r[k] for r in rows], np.float64) for k in ("expression", "jaw", "neck", "eyes")}
        if drive_head_pose:
            params.update({k: np.array([r[k] for r in rows], np.float64) for k in ("rotation", "translation")})
    except KeyError as exc:
        raise FormatError(path, str(exc).strip("'"), "missing tracking column") from None
    return _encode(params, reference), spec


# ====================================================================== building an avatar
@dataclass
class AvatarFiles:
    """What :func:`build_avatar` made (file name → bytes) and its numbers."""

    files: dict[str, bytes]
    stats: dict


#: yaw angles (degrees, around the input views' mean direction) at which picture avatars are compared with their photo
IDENTITY_YAWS = (0.0, -20.0, 20.0, -40.0, 40.0)


def yaw_key(yaw: float) -> str:
    """``yaw0``, ``yaw20``, ``yawm20`` ...: how fidelity figures name a yaw (index column suffixes)."""
    return f"yaw{'m' if yaw < 0 else ''}{abs(int(round(yaw)))}"


@torch.no_grad()
def picture_fidelity(gaussians, prepared: PreparedAvatar, orbit: dict, background: tuple[float, float, float],
                     identity=None) -> dict:
    """How well a picture avatar keeps its photo: re-render PSNR and identity similarity.

    * ``input_psnr``: each input view re-rendered at its own crop camera, PSNR (dB) over the pixels
      inside the person matte (``prepared.matte`` > 0.5), averaged over the views; what the avatar
      does not cover (hair and shoulders beyond a face-model position map) counts against it;
      ``input_psnr_covered``: the same over matte pixels that also have a Gaussian (confidence > 0.5);
    * identity (:class:`~avat3r_core.identity.FaceIdentity`, dlib's ResNet-128): the first input
      crop (resized to the render size) against the neutral avatar rendered at :data:`IDENTITY_YAWS`
      around the framing (yaw 0 = towards the mean input camera), framed like the crops (a field of
      view spanning ``meta["head_extent"]`` around the head centre): cosine ``similarity``, dlib
      ``distance`` and whether dlib found a face, per yaw.
    """
    import cv2

    from avat3r_core.identity import NETWORK, FaceIdentity

    device = gaussians.means.device
    renders = render_frames(gaussians, prepared.cameras(device), background)
    matte = prepared.matte if prepared.matte is not None else prepared.confidence

    def psnr_in(masks: np.ndarray) -> list[float]:
        out = []
        for v in range(prepared.num_views):
            if masks[v].any():
                err = (renders[v].astype(np.float64) - prepared.images[v].astype(np.float64))[masks[v]] / 255.0
                out.append(round(10.0 * math.log10(1.0 / max(float(np.mean(err ** 2)), 1e-10)), 3))
        return out

    psnrs = psnr_in(matte > 0.5)
    covered = psnr_in((matte > 0.5) & (prepared.confidence > 0.5))
    out: dict = {"input_psnr": round(float(np.mean(psnrs)), 3) if psnrs else None, "input_psnr_views": psnrs,
                 "input_psnr_covered": round(float(np.mean(covered)), 3) if covered else None}
    identity = identity if identity is not None else FaceIdentity()
    out["identity_network"] = NETWORK
    if not identity.available:
        out["identity_status"] = f"unavailable: {identity.reason}"
        return out
    size = int(orbit["size"])
    photo = cv2.resize(prepared.images[0], (size, size), interpolation=cv2.INTER_CUBIC)
    reference = identity.embed(photo)
    extent = float(prepared.meta.get("head_extent", 0.15))
    framed = {**orbit, "fov_deg": 2.0 * math.degrees(math.atan(extent / max(float(orbit["radius"]), 1e-6)))}
    views = render_frames(gaussians, view_orbit(yaw_values=IDENTITY_YAWS, pitch_deg=0.0, **framed), background)
    out["identity_status"] = "ok" if reference is not None else "no face found by dlib in the input crop"
    out["identity"] = {yaw_key(y): identity.compare(reference, img) for y, img in zip(IDENTITY_YAWS, views)}
    return out


@torch.no_grad()
def build_avatar(model, prepared: PreparedAvatar, codes: np.ndarray, turntable_frames: int = 24, size: int = 256,
                 preview_views: int = 4, fps: float = 24.0, yaw_deg: float = 45.0, fov_deg: float = 20.0,
                 background: tuple[float, float, float] = (1.0, 1.0, 1.0), chunk: int = 4,
                 motion: np.ndarray | None = None, identity=None) -> AvatarFiles:
    """Encode once, then the neutral Gaussians (``.ply``, preview, turntable) and the animation.

    Avatars from pictures also get :func:`picture_fidelity` (``stats["fidelity"]``; ``identity``:
    a :class:`~avat3r_core.identity.FaceIdentity` to reuse, else one is loaded).

    The animation is driven through the encoder cache (decoder only per frame), exactly as
    ``avat3r animate`` later drives it from the saved cache; ``motion`` (T, 4, 4): the head motion
    its camera replays (:func:`load_head_motion`).
    """
    from PIL import Image

    from avat3r_core.video import encode_video

    device = next(model.parameters()).device
    timings = {}
    t0 = time.perf_counter()
    encoded = model.encode(prepared.inputs(device))
    timings["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    neutral = torch.as_tensor(neutral_code(prepared.reference), device=device)[None]
    gaussians = model.decode(encoded, neutral).gaussians(0).detach().to(dtype=torch.float32)
    timings["decode_s"] = time.perf_counter() - t0
    files: dict[str, bytes] = {CACHE_FILE: encoded_bytes(encoded)}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        gaussians.to("cpu").save_ply(Path(tmp) / PLY_FILE)
        files[PLY_FILE] = (Path(tmp) / PLY_FILE).read_bytes()
    t0 = time.perf_counter()
    orbit = dict(center=prepared.center, radius=prepared.radius, front=prepared.front, up=prepared.up, size=size,
                 yaw_deg=yaw_deg, fov_deg=fov_deg, device=device)
    turntable = render_frames(gaussians, view_orbit(frames=turntable_frames, **orbit), background)
    files[TURNTABLE_FILE] = encode_video(list(turntable), fps=fps)
    # preview: the inputs (top row) above the neutral avatar seen from a few angles (bottom row)
    import cv2

    k = max(1, preview_views)
    views = render_frames(gaussians, view_orbit(yaw_values=np.linspace(-yaw_deg, yaw_deg, k) if k > 1 else [0.0],
                                                **orbit), background)
    top = [cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR) for img in prepared.images]
    cols = max(len(top), k)
    sheet = grid(top + [np.full((size, size, 3), 255, np.uint8)] * (cols - len(top)) + list(views), cols)
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    files[PREVIEW_FILE] = buf.getvalue()
    timings["turntable_s"] = time.perf_counter() - t0
    fidelity = None
    if prepared.meta.get("mode") in ("photos", "image", "video"):
        t0 = time.perf_counter()
        fidelity = picture_fidelity(gaussians, prepared, orbit, background, identity)
        timings["fidelity_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    front_cam = view_orbit(frames=1, **orbit)
    anim = animation_frames(model, encoded, torch.as_tensor(codes, device=device), front_cam, chunk=chunk,
                            background=background, motion=motion)
    files[ANIMATION_FILE] = encode_video(list(anim), fps=fps)
    timings["animation_s"] = time.perf_counter() - t0
    stats = {"gaussians": len(gaussians), "views": prepared.num_views, "animation_frames": int(len(codes)),
             "turntable_frames": int(turntable_frames), **{k: round(v, 4) for k, v in timings.items()}}
    if fidelity is not None:
        stats["fidelity"] = fidelity
    return AvatarFiles(files, stats)


def head_motion_for(frame: str, spec: str | None, drive_head_pose: bool) -> np.ndarray | None:
    """What an animation's camera replays: a head-frame model shows the tracked head motion
    through its camera (a world-frame model through the codes' head pose, so None here)."""
    return load_head_motion(spec) if drive_head_pose and frame == "head" else None


@torch.no_grad()
def drive_without_cache(model, prepared: PreparedAvatar, codes: np.ndarray, camera: Cameras,
                        background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The reference for the cache: a full encode + decode per expression (N, H, W, 3) uint8."""

    device = next(model.parameters()).device
    inputs = prepared.inputs(device)
    frames = []
    for code in torch.as_tensor(codes, device=device):
        output = model(inputs, code[None])
        frames.append(render_frames(output.gaussians(0), camera, background)[0])
    return np.stack(frames)


def animate_avatar(avatar_dir: str | Path, expressions: str | None, out: str | Path, checkpoint: str | Path | None = None,
                   size: int | None = None, fps: float | None = None, device: str = "auto",
                   drive_head_pose: bool = False, driver=None) -> dict:
    """Drive a built avatar (its ``meta.json`` + encoder cache) with an expression track → MP4.

    ``driver``: an :class:`avat3r_core.animation.drivers.Driver` (a tracked video or an ARKit CSV)
    instead of ``expressions``; the video shows ``driver | avatar`` when the driver has frames.

    Only the decoder runs per frame. ``checkpoint`` defaults to the one the avatar was built with
    (recorded in ``meta.json``); the cache is read with the weights-only loader.
    """
    from avat3r_core.video import encode_video

    avatar_dir = Path(avatar_dir)
    meta_path = avatar_dir / META_FILE
    if not meta_path.exists():
        raise FormatError(meta_path, None, "not a built avatar directory (no meta.json)")
    meta = read_json(meta_path)
    try:
        framing = meta["framing"]
    except (KeyError, TypeError) as exc:
        raise FormatError(meta_path, str(exc), "unreadable avatar metadata") from None
    dev = pick_device(device)
    from avat3r_core.inference.checkpoint import load_trained_model

    model, _, _ = load_trained_model(checkpoint or meta["checkpoint"], dev)
    encoded = load_encoded(avatar_dir / CACHE_FILE, dev)
    reference = {k: np.asarray(v) for k, v in meta.get("reference", {}).items()}
    if driver is not None:
        codes, described, motion = driver.codes(reference), driver.description, None
    else:
        codes, described = load_expression_track(expressions, reference, drive_head_pose=drive_head_pose)
        motion = head_motion_for(model.config.frame, expressions, drive_head_pose)
    size = int(size or meta.get("render", {}).get("size", 256))
    fps = float(fps or meta.get("render", {}).get("fps", 24.0))
    camera = view_orbit(framing["center"], framing["radius"], framing["front"], framing["up"], frames=1, size=size,
                        fov_deg=meta.get("render", {}).get("fov_deg", 20.0), device=dev)
    start = time.perf_counter()
    frames = animation_frames(model, encoded, torch.as_tensor(codes, device=dev), camera, motion=motion)
    seconds = time.perf_counter() - start
    data = encode_video(driver.side_by_side(list(frames)) if driver is not None else list(frames), fps=fps)
    storage.atomic_write_bytes(str(out), data)
    return {"out": str(out), "frames": int(len(frames)), "expressions": described, "seconds": round(seconds, 3),
            "frames_per_s": round(len(frames) / seconds, 2) if seconds > 0 else None, "bytes": len(data)}

