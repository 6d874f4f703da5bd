"""Capture layouts: one reader interface, one file per layout.

A reader turns a dataset root into a :class:`CaptureIndex` — subjects, their calibrated cameras,
sequences and per-camera media — plus every :class:`Problem` it found on the way (missing
calibration for a camera, videos of unequal length, unreadable files, ...). It never raises on a
bad item: the problem is recorded with the file at fault and the rest of the dataset is indexed.
Adding COLMAP or Ava-256 is one more class with ``name``, ``detect`` and ``scan``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.formats.calibration import image_size, read_nersemble_calibration, read_transforms_json
from avat3r_core.color import read_color_calibration
from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.video import VideoInfo, probe_video

BACKGROUND = "BACKGROUND"
#: Full-resolution NeRSemble frame size, portrait (width, height); calibrations are given there.
NERSEMBLE_FULL_PORTRAIT = (2200, 3208)


@dataclass
class Problem:
    """Something wrong in the input. ``severity`` is ``error`` (item unusable) or ``warning``."""

    subject: str
    sequence: str | None
    camera: str | None
    path: str
    message: str
    severity: str = "error"
    frame: int | None = None  # set when only this frame of the camera is affected (frame folders)


@dataclass
class MediaSource:
    """One camera's media in one sequence: a video, or an ordered list of image files."""

    path: str
    alpha_path: str | None = None
    frames: int = 0
    width: int = 0
    height: int = 0
    images: list[str] | None = None  # set for image-folder layouts, one file per frame
    alpha_images: list[str] | None = None  # per-frame mattes of an image-folder layout
    #: NeRSemble v1's per-(sequence, camera) affine colour correction (3x3, 3x4 or 4x4, as stored)
    color_correction: list[list[float]] | None = None


@dataclass
class CaptureSequence:
    subject: str
    name: str
    media: dict[str, MediaSource] = field(default_factory=dict)  # serial → media

    @property
    def frames(self) -> int:
        counts = [m.frames for m in self.media.values()]
        return min(counts) if counts else 0


@dataclass
class CaptureSubject:
    subject: str
    root: str
    serials: list[str]
    cameras: Cameras | None  # at the media resolution
    color_calibration: dict[str, np.ndarray] | None = None
    sequences: dict[str, CaptureSequence] = field(default_factory=dict)
    background: CaptureSequence | None = None  # empty-scene plates: stills or one-frame videos
    calibration_path: str = ""


@dataclass
class CaptureIndex:
    layout: str
    root: str
    subjects: dict[str, CaptureSubject] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # metadata_*.csv next to the subjects: name → path

    def problems_for(self, subject: str, sequence: str | None = None, camera: str | None = None) -> list[Problem]:
        return [
            p for p in self.problems
            if p.subject == subject and p.severity == "error"
            and (sequence is None or p.sequence in (None, sequence))
            and (camera is None or p.camera in (None, camera))
        ]


class CaptureReader(Protocol):
    name: str

    def detect(self, root: Path) -> bool: ...

    def scan(self, root: Path, probe: bool = True, decode: bool = True) -> CaptureIndex: ...


def _describe(exc: FormatError) -> str:
    """The error without its path (a Problem carries the path in its own column)."""
    return f"[{exc.field}] {exc.message}" if exc.field else exc.message


# --------------------------------------------------------------------------- NeRSemble
_SUBJECT = re.compile(r"^\d{3}$")
_CAMERA_FILE = re.compile(r"^cam_(?P<serial>[0-9A-Za-z-]+)\.mp4$")
#: containers a camera's video may come in besides NeRSemble's own .mp4 (re-encoded or
#: re-captured data: OpenCV writes MJPEG only to .avi)
_VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
_PLATE_FILE = re.compile(r"^image_(?P<serial>[0-9A-Za-z-]+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)
_CAMERA_PNG = re.compile(r"^cam_(?P<serial>[0-9A-Za-z-]+)\.png$")
_FRAME_DIR = re.compile(r"^frame_(?P<t>\d+)$")
#: a principal point further than this (fraction of the size) from the centre of both candidate
#: sizes fits neither: the calibration belongs to other media, or the media were cropped
_CENTRE_TOLERANCE = 0.1
#: the route a camera without alpha and without plate takes (recorded per frame as alpha_source)
MEDIAN_PLATE_NOTE = "its mattes come from a background plate made as the temporal median of its own frames"


def _nominal_size(cams: Cameras, width: int, height: int) -> tuple[tuple[int, int], float]:
    """The resolution the calibration was made at, given the media size, and how far (a fraction of
    that size) the principal point lies from its centre.

    NeRSemble calibrations are at full resolution while videos may be downscaled; choose, among the
    media size and the full NeRSemble size with the same aspect, the one whose centre is nearest the
    principal point.
    """
    centre = np.array([float(cams.cx.mean()) * 2, float(cams.cy.mean()) * 2])
    candidates = [(width, height)]
    full_w, full_h = NERSEMBLE_FULL_PORTRAIT if height >= width else NERSEMBLE_FULL_PORTRAIT[::-1]
    if abs(full_w / full_h - width / height) < 0.01:
        candidates.append((full_w, full_h))
    best = min(candidates, key=lambda wh: float(np.abs(np.array(wh) - centre).sum()))
    return best, float((np.abs(np.array(best) - centre) / np.array(best)).max() / 2)


def _metadata_files(root: Path) -> dict[str, str]:
    """``metadata_*.csv`` at the dataset root (or beside a single subject directory)."""
    found = {}
    for folder in (root, root.parent) if (root / "sequences").is_dir() else (root,):
        for path in sorted(folder.glob("metadata_*.csv")):
            found.setdefault(path.name, str(path))
    return found


def _read_calibration(pid: str, path: Path, problems: list[Problem]) -> tuple[list[str], Cameras | None]:
    if not path.exists():
        problems.append(Problem(pid, None, None, str(path), "calibration file missing"))
        return [], None
    try:
        # Size is fixed up from the media (_fix_camera_size); the file itself has none.
        return read_nersemble_calibration(path, width=2, height=2, dtype=torch.float64)
    except FormatError as exc:
        problems.append(Problem(pid, None, None, str(path), _describe(exc)))
        return [], None


def _scan_subject_folders(reader, root: str | Path, probe: bool, decode: bool) -> CaptureIndex:
    """The scan both NeRSemble layouts share: ``root`` (a local path or a URI), its ``metadata_*.csv``,
    and one :class:`CaptureSubject` per subject folder from the reader's ``_scan_subject``."""
    root = storage.as_path(root)
    index = CaptureIndex(reader.name, str(root))
    if not root.exists():
        index.problems.append(Problem("", None, None, str(root), "dataset root does not exist"))
        return index
    index.metadata = _metadata_files(root)
    for subject_dir in reader._subject_dirs(root):
        index.subjects[subject_dir.name] = reader._scan_subject(subject_dir, index.problems, probe, decode)
    if not index.subjects:
        index.problems.append(Problem("", None, None, str(root), "no subject directories (<pid:03d>/) found"))
    return index


class NersembleReader:
    """NeRSemble v2 raw release: ``<root>/<pid:03d>/calibration/camera_params.json`` +
    ``sequences/<SEQ>/images/cam_<serial>.mp4``.

    Optional: ``calibration/color_calibration.json`` (CCM per serial), ``sequences/<SEQ>/alpha/
    cam_<serial>.mp4`` (foreground mattes), background plates ``sequences/BACKGROUND/
    image_<serial>.jpg`` (the toolkit's stills; an older download has ``BACKGROUND/images/
    cam_<serial>.mp4``), ``metadata_*.csv`` at the root. ``root`` may also be a single subject
    directory. A camera with neither alpha nor plate is a warning: its mattes come from a plate
    made as the temporal median of its own frames (:data:`MEDIAN_PLATE_NOTE`).
    """

    name = "nersemble"

    def detect(self, root: Path) -> bool:
        return (root / "calibration" / "camera_params.json").exists() or any(
            (p / "calibration").is_dir() or (p / "sequences").is_dir() for p in self._subject_dirs(root)
        )

    @staticmethod
    def _subject_dirs(root: Path) -> list[Path]:
        if (root / "calibration").is_dir() or (root / "sequences").is_dir():
            return [root]
        return sorted(p for p in root.iterdir() if p.is_dir() and _SUBJECT.match(p.name)) if root.is_dir() else []

    def scan(self, root: Path, probe: bool = True, decode: bool = True) -> CaptureIndex:
        """``probe`` reads each video's size and frame count; ``decode`` counts frames by decoding
        (finds truncated files before processing, at the cost of a full decode)."""
        return _scan_subject_folders(self, root, probe, decode)

    def _scan_subject(self, subject_dir: Path, problems: list[Problem], probe: bool, decode: bool) -> CaptureSubject:
        pid = subject_dir.name
        calib_path = subject_dir / "calibration" / "camera_params.json"
        serials, cams = _read_calibration(pid, calib_path, problems)
        ccms = None
        ccm_path = subject_dir / "calibration" / "color_calibration.json"
        if ccm_path.exists():
            try:
                ccms = read_color_calibration(ccm_path)
            except FormatError as exc:
                problems.append(Problem(pid, None, None, str(ccm_path), _describe(exc)))
        subject = CaptureSubject(pid, str(subject_dir), serials, cams, ccms, calibration_path=str(calib_path))

        seq_root = subject_dir / "sequences"
        if not seq_root.is_dir():
            problems.append(Problem(pid, None, None, str(seq_root), "no sequences/ directory"))
            return subject
        for seq_dir in sorted(p for p in seq_root.iterdir() if p.is_dir()):
            if seq_dir.name == BACKGROUND:
                subject.background = self._scan_background(pid, seq_dir, serials, problems, probe, decode)
            else:
                subject.sequences[seq_dir.name] = self._scan_sequence(pid, seq_dir, serials, problems, probe, decode)
        _fix_camera_size(subject, problems)
        _warn_unmatted(subject, problems, subject_dir / "sequences" / BACKGROUND)
        return subject

    @staticmethod
    def _scan_background(pid: str, seq_dir: Path, serials: list[str], problems: list[Problem],
                         probe: bool, decode: bool) -> CaptureSequence:
        """Plates: ``image_<serial>.jpg`` stills, else (older downloads) ``images/cam_<serial>.mp4``."""
        plates = CaptureSequence(pid, BACKGROUND)
        for path in sorted(seq_dir.iterdir()):
            match = _PLATE_FILE.match(path.name)
            if not match or (serials and match["serial"] not in serials):
                continue
            media = MediaSource(str(path), frames=1, images=[str(path)])
            if probe:
                try:
                    if not path.stat().st_size:
                        raise FormatError(path, None, "empty file (0 bytes)")
                    media.width, media.height = image_size(path)
                except FormatError as exc:
                    problems.append(Problem(pid, BACKGROUND, match["serial"], str(path),
                                            f"background plate unusable: {_describe(exc)}", "warning"))
                    continue
            plates.media[match["serial"]] = media
        videos = _camera_videos(pid, seq_dir, problems)
        probed = _probe_all([p for s, p in videos.items() if s not in plates.media], decode) if probe else {}
        for serial, path in videos.items():
            if serial in plates.media or (serials and serial not in serials):
                continue
            media = MediaSource(str(path))
            if probe:
                info = probed[path]
                if isinstance(info, FormatError):
                    problems.append(Problem(pid, BACKGROUND, serial, str(path),
                                            f"background plate unusable: {_describe(info)}", "warning"))
                    continue
                media.frames, media.width, media.height = info.frames, info.width, info.height
            plates.media[serial] = media
        return plates

    def _scan_sequence(self, pid: str, seq_dir: Path, serials: list[str], problems: list[Problem],
                       probe: bool, decode: bool) -> CaptureSequence:
        sequence = CaptureSequence(pid, seq_dir.name)
        image_dir = seq_dir / "images"
        videos = _camera_videos(pid, seq_dir, problems)
        if not videos:
            problems.append(Problem(pid, seq_dir.name, None, str(image_dir), "no camera videos (images/cam_<serial>.mp4)"))
        calibrated = {serial: path for serial, path in videos.items() if not serials or serial in serials}
        probed = _probe_all(list(calibrated.values()), decode) if probe else {}
        for serial, path in videos.items():
            if serial not in calibrated:
                problems.append(Problem(pid, seq_dir.name, serial, str(path), f"camera {serial} has no calibration in camera_params.json"))
                continue
            alpha = seq_dir / "alpha" / path.name
            media = MediaSource(str(path), str(alpha) if alpha.exists() else None)
            if probe:
                info = probed[path]
                if isinstance(info, FormatError):
                    problems.append(Problem(pid, seq_dir.name, serial, str(path), _describe(info)))
                    continue
                media.frames, media.width, media.height = info.frames, info.width, info.height
            sequence.media[serial] = media
        for serial in serials:
            if serial not in videos:
                problems.append(Problem(pid, seq_dir.name, serial, str(image_dir / f"cam_{serial}.mp4"),
                                        f"camera {serial} is calibrated but has no video in this sequence", "warning"))
        if probe and len({m.frames for m in sequence.media.values()}) > 1:
            counts = {s: m.frames for s, m in sequence.media.items()}
            problems.append(Problem(pid, seq_dir.name, None, str(image_dir),
                                    f"videos of unequal length {sorted(set(counts.values()))} frames "
                                    f"(using the first {min(counts.values())}): {counts}", "warning"))
        return sequence


def _camera_videos(pid: str, seq_dir: Path, problems: list[Problem]) -> dict[str, Path]:
    """``images/cam_<serial>.mp4`` (or another container, :data:`_VIDEO_SUFFIXES`) of a sequence
    folder, by serial; .mp4 wins when a camera has two."""
    image_dir = seq_dir / "images"
    videos: dict[str, Path] = {}
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _VIDEO_SUFFIXES) if image_dir.is_dir() else []
    for path in sorted(paths, key=lambda p: p.suffix.lower() != ".mp4"):
        match = _CAMERA_FILE.match(path.with_suffix(".mp4").name)
        if not match:
            problems.append(Problem(pid, seq_dir.name, None, str(path), "file name is not cam_<serial>.mp4", "warning"))
            continue
        videos.setdefault(match["serial"], path)
    return dict(sorted(videos.items()))


def _fix_camera_size(subject: CaptureSubject, problems: list[Problem]) -> None:
    """Scale the calibration to the media resolution; flag media of a different size, and a
    principal point that fits neither the media nor the full NeRSemble size."""
    if subject.cameras is None:
        return
    sizes: dict[tuple[int, int], int] = {}
    for seq in subject.sequences.values():
        for media in seq.media.values():
            if media.width:
                sizes[(media.width, media.height)] = sizes.get((media.width, media.height), 0) + 1
    if not sizes:
        return
    width, height = max(sizes, key=sizes.get)
    (nominal_w, nominal_h), off_centre = _nominal_size(subject.cameras, width, height)
    if off_centre > _CENTRE_TOLERANCE:
        cx, cy = float(subject.cameras.cx.mean()), float(subject.cameras.cy.mean())
        problems.append(Problem(subject.subject, None, None, subject.calibration_path,
                                f"principal point ({cx:.1f}, {cy:.1f}) fits neither the media size {width}x{height} "
                                f"nor the full size {NERSEMBLE_FULL_PORTRAIT[0]}x{NERSEMBLE_FULL_PORTRAIT[1]} "
                                f"(off centre by {100 * off_centre:.0f}%): assuming {nominal_w}x{nominal_h}; "
                                "crops may be off if the calibration belongs to other media", "warning"))
    cams = Cameras(subject.cameras.world_to_cam, subject.cameras.K, nominal_w, nominal_h)
    subject.cameras = cams.resize(width, height) if (nominal_w, nominal_h) != (width, height) else cams
    for seq in list(subject.sequences.values()) + ([subject.background] if subject.background else []):
        for serial, media in list(seq.media.items()):
            if media.width and (media.width, media.height) != (width, height):
                plate = seq.name == BACKGROUND
                problems.append(Problem(subject.subject, seq.name, serial, media.path,
                                        f"resolution {media.width}x{media.height} differs from the subject's "
                                        f"{width}x{height}" + ("; background plate not used" if plate else ""),
                                        "warning" if plate else "error"))
                del seq.media[serial]


def _warn_unmatted(subject: CaptureSubject, problems: list[Problem], plate_dir: Path) -> None:
    """A named warning per camera that has media without alpha and no background plate."""
    plates = subject.background.media if subject.background else {}
    unmatted = sorted({serial for seq in subject.sequences.values() for serial, media in seq.media.items()
                       if media.alpha_path is None and media.alpha_images is None and serial not in plates})
    for serial in unmatted:
        problems.append(Problem(subject.subject, BACKGROUND, serial, str(plate_dir / f"image_{serial}.jpg"),
                                f"camera {serial} has no alpha and no background plate: {MEDIAN_PLATE_NOTE}",
                                "warning"))


class NersembleV1Reader:
    """NeRSemble v1 frame-folder release: ``<root>/<pid:03d>/camera_params.json`` +
    ``sequences/<SEQ>/frame_<t:05d>/images-2x[-73fps]/cam_<serial>.png``.

    Mattes from ``frame_<t>/alpha_map[-73fps]/cam_<serial>.png``; colour correction from
    ``annotations/<SEQ>/color_correction/<serial>.npy``. A missing or empty PNG is an error for
    that (frame, camera) only. Frame indices are positions in the sorted ``frame_<t>`` folders.
    """

    name = "nersemble_v1"
    IMAGE_DIRS = ("images-2x", "images-2x-73fps")
    ALPHA_DIRS = ("alpha_map", "alpha_map-73fps")

    def detect(self, root: Path) -> bool:
        return any((p / "camera_params.json").exists() and (p / "sequences").is_dir() for p in self._subject_dirs(root))

    @staticmethod
    def _subject_dirs(root: Path) -> list[Path]:
        if (root / "camera_params.json").exists():
            return [root]
        return sorted(p for p in root.iterdir() if p.is_dir() and _SUBJECT.match(p.name)) if root.is_dir() else []

    def scan(self, root: Path, probe: bool = True, decode: bool = True) -> CaptureIndex:
        """``probe`` reads each camera's image size (from its first PNG's header); ``decode`` is
        unused (images are checked for presence and size; extract decodes them)."""
        return _scan_subject_folders(self, root, probe, decode)

    def _scan_subject(self, subject_dir: Path, problems: list[Problem], probe: bool, decode: bool) -> CaptureSubject:
        del decode  # images are checked for presence and size only; extract decodes them
        pid = subject_dir.name
        calib_path = subject_dir / "camera_params.json"
        serials, cams = _read_calibration(pid, calib_path, problems)
        subject = CaptureSubject(pid, str(subject_dir), serials, cams, calibration_path=str(calib_path))
        seq_root = subject_dir / "sequences"
        if not seq_root.is_dir():
            problems.append(Problem(pid, None, None, str(seq_root), "no sequences/ directory"))
            return subject
        for seq_dir in sorted(p for p in seq_root.iterdir() if p.is_dir()):
            subject.sequences[seq_dir.name] = self._scan_sequence(subject_dir, seq_dir, serials, problems, probe)
        _fix_camera_size(subject, problems)
        _warn_unmatted(subject, problems, seq_root / BACKGROUND)
        return subject

    def _scan_sequence(self, subject_dir: Path, seq_dir: Path, serials: list[str], problems: list[Problem],
                       probe: bool) -> CaptureSequence:
        pid, name = subject_dir.name, seq_dir.name
        sequence = CaptureSequence(pid, name)
        frame_dirs = sorted((p for p in seq_dir.iterdir() if p.is_dir() and _FRAME_DIR.match(p.name)),
                            key=lambda p: int(_FRAME_DIR.match(p.name)["t"]))
        if not frame_dirs:
            problems.append(Problem(pid, name, None, str(seq_dir), "no frame_<t:05d> folders"))
            return sequence
        image_dir = next((d for d in self.IMAGE_DIRS if any((f / d).is_dir() for f in frame_dirs)), None)
        if image_dir is None:
            problems.append(Problem(pid, name, None, str(frame_dirs[0]),
                                    f"no image folder ({' or '.join(self.IMAGE_DIRS)}) in any frame"))
            return sequence
        alpha_dir = next((d for d in self.ALPHA_DIRS if any((f / d).is_dir() for f in frame_dirs)), None)
        found = {m["serial"] for f in frame_dirs if (f / image_dir).is_dir()
                 for m in map(_CAMERA_PNG.match, os.listdir(f / image_dir)) if m}
        for serial in sorted(found - set(serials)) if serials else []:
            problems.append(Problem(pid, name, serial, str(frame_dirs[0] / image_dir / f"cam_{serial}.png"),
                                    f"camera {serial} has no calibration in camera_params.json"))
        for serial in sorted(found & set(serials) if serials else found):
            images = [str(f / image_dir / f"cam_{serial}.png") for f in frame_dirs]
            alphas = [str(f / alpha_dir / f"cam_{serial}.png") for f in frame_dirs] if alpha_dir else None
            usable = []
            for t, image in enumerate(images):
                fault = _file_fault(image, "image") or (_file_fault(alphas[t], "alpha map") if alphas else None)
                if fault:
                    problems.append(Problem(pid, name, serial, fault[0], f"frame {t}: {fault[1]}", frame=t))
                else:
                    usable.append(image)
            media = MediaSource(images[0], None, len(images), images=images, alpha_images=alphas)
            ccm_path = subject_dir / "annotations" / name / "color_correction" / f"{serial}.npy"
            try:
                if probe and usable:
                    media.width, media.height = image_size(Path(usable[0]))
                if ccm_path.exists():
                    media.color_correction = read_affine_color_correction(ccm_path).tolist()
            except FormatError as exc:
                problems.append(Problem(pid, name, serial, str(exc.path), _describe(exc)))
                continue
            sequence.media[serial] = media
        return sequence


def _file_fault(path: str, what: str) -> tuple[str, str] | None:
    """(path, message) when an image file is missing or empty."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return path, f"{what} missing"
    return (path, f"{what} is an empty file (0 bytes)") if not size else None


def read_affine_color_correction(path: Path) -> np.ndarray:
    """A NeRSemble v1 colour correction ``<serial>.npy``: an affine map of RGB in [0, 1], as a
    (3, 3), (3, 4) or (4, 4) array (applied by :func:`avat3r_core.extract.affine_color_correct`).
    Loaded without pickle."""
    try:
        matrix = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise FormatError(path, None, f"not a numpy array file ({exc})") from None
    if matrix.shape not in ((3, 3), (3, 4), (4, 4)) or not np.issubdtype(matrix.dtype, np.number):
        raise FormatError(path, None, f"colour correction must be a numeric 3x3, 3x4 or 4x4 matrix, got {matrix.dtype} {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise FormatError(path, None, "colour correction has non-finite entries")
    return matrix.astype(np.float64)


# --------------------------------------------------------------------------- generic
class TransformsJsonReader:
    """``<root>/<subject>/[<sequence>/]transforms.json`` (nerfstudio) with its image files.

    Frames that share one camera (same pose and intrinsics) are one camera over time; a frame's
    optional ``time``/``timestep`` orders it, else file order does. Frames' ``fg_mask_path``
    (VHAP / GaussianAvatars exports) are the mattes when every frame has one; a missing mask
    file is an error for that frame's camera, as a missing image is.
    """

    name = "transforms"

    def detect(self, root: Path) -> bool:
        return any(root.glob("transforms.json")) or any(root.glob("*/transforms.json")) or any(root.glob("*/*/transforms.json"))

    def scan(self, root: Path, probe: bool = True, decode: bool = True) -> CaptureIndex:
        root = storage.as_path(root)  # a local path or a URI (s3://...)
        index = CaptureIndex(self.name, str(root))
        files = sorted(root.glob("*/transforms.json")) + sorted(root.glob("*/*/transforms.json"))
        if (root / "transforms.json").exists():
            files = [root / "transforms.json"]
        for path in files:
            rel = path.parent.relative_to(root).parts
            subject_name = rel[0] if rel else root.name
            sequence_name = rel[1] if len(rel) > 1 else "default"
            try:
                file_paths, cams = read_transforms_json(path, dtype=torch.float64)
            except FormatError as exc:
                index.problems.append(Problem(subject_name, sequence_name, None, str(path), _describe(exc)))
                continue
            subject = index.subjects.get(subject_name)
            serials, groups = self._group_cameras(cams)
            if subject is None:
                subject = CaptureSubject(subject_name, str(path.parent), serials, cams[[g[0] for g in groups]])
                index.subjects[subject_name] = subject
            sequence = CaptureSequence(subject_name, sequence_name)
            masks = self._mask_paths(path)
            for serial, members in zip(serials, groups):
                pairs = [(str((path.parent / file_paths[i]).resolve()),
                          str((path.parent / masks[i]).resolve()) if masks else None) for i in members]
                # a missing file fails that frame of that camera only (frame = position in the camera's frames)
                faults = [((image, "image file missing") if not storage.exists(image) else
                           (mask, "foreground mask (fg_mask_path) missing") if mask and not storage.exists(mask)
                           else None) for image, mask in pairs]
                for t, fault in enumerate(faults):
                    if fault:
                        index.problems.append(Problem(subject_name, sequence_name, serial, fault[0],
                                                      f"frame {t}: {fault[1]}", frame=t))
                if not all(faults):
                    images = [image for image, _ in pairs]
                    sequence.media[serial] = MediaSource(images[0], None, len(images), cams.width, cams.height, images,
                                                         alpha_images=[m for _, m in pairs] if masks else None)
            subject.sequences[sequence_name] = sequence
        if not index.subjects:
            index.problems.append(Problem("", None, None, str(root), "no transforms.json found"))
        return index

    @staticmethod
    def _mask_paths(path: Path) -> list[str] | None:
        """Each frame's ``fg_mask_path`` (as VHAP's ``export_as_nerf_dataset.py`` writes one per
        frame, ``fg_masks/<t>_<c>.png``), in frame order; ``None`` unless every frame has one (the
        masks are then the mattes, ``alpha_source: alpha_map``)."""
        from avat3r_core.formats.parsing import read_json

        frames = read_json(path).get("frames", [])
        masks = [f.get("fg_mask_path") if isinstance(f, dict) else None for f in frames]
        return masks if masks and all(isinstance(m, str) and m for m in masks) else None

    @staticmethod
    def _group_cameras(cams: Cameras) -> tuple[list[str], list[list[int]]]:
        key = np.round(np.concatenate([cams.world_to_cam.reshape(len(cams), -1).numpy(),
                                       cams.K.reshape(len(cams), -1).numpy()], axis=1), 6)
        groups: dict[bytes, list[int]] = {}
        for i, row in enumerate(key):
            groups.setdefault(row.tobytes(), []).append(i)
        ordered = sorted(groups.values(), key=lambda g: g[0])
        return [f"cam{i:02d}" for i in range(len(ordered))], ordered


#: in detection order: a v1 subject folder also has ``sequences/``, so v1 is asked first
READERS: list[CaptureReader] = [NersembleV1Reader(), NersembleReader(), TransformsJsonReader()]


def scan_capture(root: str | Path, layout: str = "auto", probe: bool = True, decode: bool = True) -> CaptureIndex:
    """Index a capture dataset with the named reader, or the first that recognises ``root``."""
    root = storage.as_path(root)
    for reader in READERS:
        if layout == reader.name or (layout == "auto" and reader.detect(root)):
            return reader.scan(root, probe=probe, decode=decode)
    known = ", ".join(r.name for r in READERS)
    if layout != "auto":
        raise ValueError(f"unknown capture layout {layout!r}; known: {known}")
    raise FormatError(root, None, f"no known capture layout recognised ({known})")


def _probe_all(paths: list[Path], decode: bool) -> dict[Path, VideoInfo | FormatError]:
    """Each video's info, or the FormatError that names what is wrong with it. Probed on a few
    threads (FFmpeg runs without the GIL): with ``decode`` every frame is decoded, and a capture
    has hundreds of videos per person. A header-only probe costs ~0.2 ms a video."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path: Path) -> VideoInfo | FormatError:
        try:
            info = probe_video(path, decode=decode)
        except FormatError as exc:
            return exc
        return info if info.frames else FormatError(path, None, "video has no frames")

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(paths), 1))) as pool:
        return dict(zip(paths, pool.map(one, paths)))
