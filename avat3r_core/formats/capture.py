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

from avat3r_core.cameras import Cameras, read_nersemble_calibration, read_transforms_json
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


@dataclass
class MediaSource:
    """One camera's media in one sequence: a video, or an ordered list of image files."""

    path: str
    alpha_path: str | None = None
    frames: int = 0
    width: int = 0
    height: int = 0
    images: list[str] | None = None  # set for image-folder layouts


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
    background: CaptureSequence | None = None


@dataclass
class CaptureIndex:
    layout: str
    root: str
    subjects: dict[str, CaptureSubject] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

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


def _nominal_size(cams: Cameras, width: int, height: int) -> tuple[int, int]:
    """The resolution the calibration was made at, given the media size.

    NeRSemble calibrations are at full resolution while videos may be downscaled; choose, among the
    media size and the full NeRSemble size with the same aspect, the one whose centre is nearest the
    principal point.
    """
    centre = np.array([float(cams.cx.mean()) * 2, float(cams.cy.mean()) * 2])
    candidates = [(width, height)]
    full_w, full_h = NERSEMBLE_FULL_PORTRAIT if height >= width else NERSEMBLE_FULL_PORTRAIT[::-1]
    if abs(full_w / full_h - width / height) < 0.01:
        candidates.append((full_w, full_h))
    return min(candidates, key=lambda wh: float(np.abs(np.array(wh) - centre).sum()))


class NersembleReader:
    """``<root>/<pid:03d>/calibration/camera_params.json`` + ``sequences/<SEQ>/images/cam_<serial>.mp4``.

    Optional: ``calibration/color_calibration.json`` (CCM per serial), ``sequences/<SEQ>/alpha/
    cam_<serial>.mp4`` (foreground mattes), and the ``BACKGROUND`` sequence (empty-scene plates).
    ``root`` may also be a single subject directory.
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
        root = storage.as_path(root)  # a local path or a URI (s3://...)
        index = CaptureIndex(self.name, str(root))
        if not root.exists():
            index.problems.append(Problem("", None, None, str(root), "dataset root does not exist"))
            return index
        for subject_dir in self._subject_dirs(root):
            index.subjects[subject_dir.name] = self._scan_subject(subject_dir, index.problems, probe, decode)
        if not index.subjects:
            index.problems.append(Problem("", None, None, str(root), "no subject directories (<pid:03d>/) found"))
        return index

    def _scan_subject(self, subject_dir: Path, problems: list[Problem], probe: bool, decode: bool) -> CaptureSubject:
        pid = subject_dir.name
        calib_path = subject_dir / "calibration" / "camera_params.json"
        serials: list[str] = []
        cams: Cameras | None = None
        if not calib_path.exists():
            problems.append(Problem(pid, None, None, str(calib_path), "calibration file missing"))
        else:
            try:
                # Size is fixed up below from the media; the file itself has none.
                serials, cams = read_nersemble_calibration(calib_path, width=2, height=2, dtype=torch.float64)
            except FormatError as exc:
                problems.append(Problem(pid, None, None, str(calib_path), _describe(exc)))
        ccms = None
        ccm_path = subject_dir / "calibration" / "color_calibration.json"
        if ccm_path.exists():
            try:
                ccms = read_color_calibration(ccm_path)
            except FormatError as exc:
                problems.append(Problem(pid, None, None, str(ccm_path), _describe(exc)))
        subject = CaptureSubject(pid, str(subject_dir), serials, cams, ccms)

        seq_root = subject_dir / "sequences"
        if not seq_root.is_dir():
            problems.append(Problem(pid, None, None, str(seq_root), "no sequences/ directory"))
            return subject
        for seq_dir in sorted(p for p in seq_root.iterdir() if p.is_dir()):
            sequence = self._scan_sequence(pid, seq_dir, serials, problems, probe, decode)
            if seq_dir.name == BACKGROUND:
                subject.background = sequence
            else:
                subject.sequences[seq_dir.name] = sequence
        self._fix_camera_size(subject, problems)
        return subject

    def _scan_sequence(self, pid: str, seq_dir: Path, serials: list[str], problems: list[Problem],
                       probe: bool, decode: bool) -> CaptureSequence:
        sequence = CaptureSequence(pid, seq_dir.name)
        image_dir = seq_dir / "images"
        videos = {}
        for path in sorted(image_dir.glob("*.mp4")) if image_dir.is_dir() else []:
            match = _CAMERA_FILE.match(path.name)
            if not match:
                problems.append(Problem(pid, seq_dir.name, None, str(path), "file name is not cam_<serial>.mp4", "warning"))
                continue
            videos[match["serial"]] = path
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
            if serial not in videos and seq_dir.name != BACKGROUND:
                problems.append(Problem(pid, seq_dir.name, serial, str(image_dir / f"cam_{serial}.mp4"),
                                        f"camera {serial} is calibrated but has no video in this sequence", "warning"))
        if probe and len({m.frames for m in sequence.media.values()}) > 1:
            counts = {s: m.frames for s, m in sequence.media.items()}
            problems.append(Problem(pid, seq_dir.name, None, str(image_dir),
                                    f"videos of unequal length {sorted(set(counts.values()))} frames "
                                    f"(using the first {min(counts.values())}): {counts}", "warning"))
        return sequence

    @staticmethod
    def _fix_camera_size(subject: CaptureSubject, problems: list[Problem]) -> None:
        """Scale the calibration to the media resolution; flag media of a different size."""
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
        nominal_w, nominal_h = _nominal_size(subject.cameras, width, height)
        cams = Cameras(subject.cameras.world_to_cam, subject.cameras.K, nominal_w, nominal_h)
        subject.cameras = cams.resize(width, height) if (nominal_w, nominal_h) != (width, height) else cams
        for seq in list(subject.sequences.values()) + ([subject.background] if subject.background else []):
            for serial, media in list(seq.media.items()):
                if media.width and (media.width, media.height) != (width, height):
                    problems.append(Problem(subject.subject, seq.name, serial, media.path,
                                            f"resolution {media.width}x{media.height} differs from the "
                                            f"subject's {width}x{height}"))
                    del seq.media[serial]


# --------------------------------------------------------------------------- generic
class TransformsJsonReader:
    """``<root>/<subject>/[<sequence>/]transforms.json`` (nerfstudio) with its image files.

    Frames that share one camera (same pose and intrinsics) are one camera over time; a frame's
    optional ``time``/``timestep`` orders it, else file order does.
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
            for serial, members in zip(serials, groups):
                images = [str((path.parent / file_paths[i]).resolve()) for i in members]
                missing = [p for p in images if not storage.exists(p)]
                for p in missing:
                    index.problems.append(Problem(subject_name, sequence_name, serial, p, "image file missing"))
                images = [p for p in images if p not in missing]
                if images:
                    sequence.media[serial] = MediaSource(images[0], None, len(images), cams.width, cams.height, images)
            subject.sequences[sequence_name] = sequence
        if not index.subjects:
            index.problems.append(Problem("", None, None, str(root), "no transforms.json found"))
        return index

    @staticmethod
    def _group_cameras(cams: Cameras) -> tuple[list[str], list[list[int]]]:
        key = np.round(np.concatenate([cams.world_to_cam.reshape(len(cams), -1).numpy(),
                                       cams.K.reshape(len(cams), -1).numpy()], axis=1), 6)
        groups: dict[bytes, list[int]] = {}
        for i, row in enumerate(key):
            groups.setdefault(row.tobytes(), []).append(i)
        ordered = sorted(groups.values(), key=lambda g: g[0])
        return [f"cam{i:02d}" for i in range(len(ordered))], ordered


READERS: list[CaptureReader] = [NersembleReader(), TransformsJsonReader()]


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
