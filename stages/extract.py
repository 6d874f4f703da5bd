"""The extract stage: capture videos → cropped, matted, colour-corrected frames + ``frames.parquet``.

Two passes through the shared runner, both resumable. Their set-up loads nothing, so they run as
Ray tasks on Ray's pooled worker processes (``Stage.cheap_setup``): the second pass, and later
runs and stages, find those processes started and their modules imported.

1. ``head_centers`` — one item per camera of the few well-spread views of each (subject,
   sequence): the 2D head centre of each selected frame from its foreground (the alpha video when
   there is one, else background differencing on the frames the decoder does not skip). The
   driver then triangulates the head centre per frame across those views and smooths it over
   time (:func:`head_tracks`). Small output.
2. ``frames`` — one item per video (sequential decode within a video): crop every selected frame
   around the projected head centre, write image + alpha, and one manifest row per frame.

With the default ``yuv`` decoder frames stay as decoded 4:2:0 planes: the head-centre pass reads
the alpha videos' luma plane as it is, and the crop pass reduces only each crop's region, on the
planes, before converting it to RGB (and its matte's to gray).

The workers never import torch (it would add ~0.9 s to every worker's start): the driver, which
has the camera models, puts what they would compute from cameras into the items — each
camera's centre for the triangulation, and for the crop pass each frame's crop box and crop
camera (one batched call per video).

Problems the capture reader found (unreadable video, camera without calibration, wrong
resolution, ...) become items that fail with that message, so they land in the error manifest by
name while the rest of the dataset completes.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.extract import (ExtractConfig, FrameStash, ImageSequence, PlateCenters, VideoJob,
                                 centers_of_sparse_frames, crop_roi, encode_image, extract_video, frame_boxes,
                                 halvings, mask_center, median_plate, pick_frames, read_image, read_reference_yuv420,
                                 read_yuv420, save_region, select_frames, triangulate)
from avat3r_core.geometry import farthest_views
from avat3r_core.ids import make_id
from avat3r_core.video import read_frames, reference_frames
from stages.runner import Stage, StageContext, StageResources, StageSummary, run_stage

if TYPE_CHECKING:  # the capture reader and the camera models import torch: driver side only
    from avat3r_core.cameras import Cameras
    from avat3r_core.formats.capture import CaptureIndex, CaptureSubject


def _camera_dict(cams: Cameras, i: int) -> dict:
    from avat3r_core.formats.manifests import cameras_to_columns

    cols = cameras_to_columns(cams[i])
    return {"world_to_cam": cols["world_to_cam"][0], "K": cols["K"][0], "width": cams.width, "height": cams.height}


def _camera_from_dict(d: dict) -> Cameras:
    import torch

    from avat3r_core.cameras import Cameras

    return Cameras(torch.tensor(d["world_to_cam"], dtype=torch.float64).reshape(1, 4, 4),
                   torch.tensor(d["K"], dtype=torch.float64).reshape(1, 3, 3), d["width"], d["height"])


def _plate_path(subject: CaptureSubject, serial: str) -> str | None:
    media = subject.background.media.get(serial) if subject.background else None
    return media.path if media else None


def _rgb_backend(decoder: str) -> str:
    """The whole-frame RGB decoder for paths that need whole frames (background differencing)."""
    return "pyav" if decoder == "yuv" else decoder


def _first_frame(path: str, decoder: str) -> np.ndarray:
    for frame in read_frames(path, backend=_rgb_backend(decoder), threads=1):
        return frame
    raise FormatError(path, None, "background plate video has no frames")


def _color_frames(item: dict, decoder: str, planes: bool):
    """A camera's colour frames: its image files, or its video decoded (``planes``: as
    :class:`Yuv420Frame` with the ``yuv`` decoder; else whole RGB arrays)."""
    if item.get("images"):
        return ImageSequence(item["images"])
    if planes and decoder == "yuv":
        return read_yuv420(item["video"], threads=1)
    return read_frames(item["video"], backend=_rgb_backend(decoder), threads=1)


def _reference_color_frames(video: str, decoder: str):
    """(index, frame) of a colour video's reference frames (:func:`read_reference_yuv420`): as
    :class:`Yuv420Frame` with the ``yuv`` decoder, else whole RGB arrays."""
    if decoder == "yuv":
        yield from read_reference_yuv420(video, threads=1)
        return
    for index, frame in reference_frames(video, threads=1):
        yield index, frame.to_ndarray(format="rgb24")


def _plate(item: dict, decoder: str) -> np.ndarray | None:
    """The background plate of a camera without alpha: its captured plate (a still or a video's
    first frame), else the temporal median of its frames at ``median_plate_frames``."""
    plate = item.get("plate")
    if plate:
        return read_image(plate) if plate.lower().endswith(_STILLS) else _first_frame(plate, decoder)
    if item.get("median_plate_frames"):
        return median_plate([f for _, f in pick_frames(_color_frames(item, decoder, planes=False),
                                                       item["median_plate_frames"])])
    return None


_STILLS = (".jpg", ".jpeg", ".png")


def alpha_source(item: dict) -> str:
    """How a camera's mattes are made (the manifest's ``alpha_source``)."""
    if item.get("alpha_video"):
        return "alpha_video"
    if item.get("alpha_images"):
        return "alpha_map"
    return "background_difference" if item.get("plate") else "temporal_median_plate"


def _mask_centers(item: dict, frames: list[int], decoder: str, threshold: float):
    """(frame index, 2D head centre or None) for the wanted frames of one camera (None too for its
    frames the reader found broken, ``bad_frames``).

    With the ``yuv`` decoder an alpha video's luma plane is used as decoded: the centre only
    needs foreground vs background, so no matte is converted at all. Without alpha, frames are
    differenced against the plate (:func:`_plate`) at a reduced size (:class:`PlateCenters`)."""
    bad = set(item.get("bad_frames", ()))
    usable = [f for f in frames if f not in bad]
    if item.get("alpha_video") and decoder == "yuv":
        found = {index: mask_center(frame.y, threshold=frame.luma_half)
                 for index, frame in pick_frames(read_yuv420(item["alpha_video"], threads=1), usable)}
    elif item.get("alpha_video") or item.get("alpha_images"):
        alphas = (read_frames(item["alpha_video"], gray=True, backend=_rgb_backend(decoder), threads=1)
                  if item.get("alpha_video") else ImageSequence(item["alpha_images"], gray=True))
        # on the 8-bit matte as read: x / 255 > 0.5 exactly when x > 127.5 (no float copy of each frame)
        found = {index: mask_center(matte, threshold=127.5) for index, matte in pick_frames(alphas, usable)}
    else:
        plate = _plate(item, decoder)
        if plate is None:
            raise FormatError(item["video"], None, "no alpha, no background plate and no frames for a median plate: cannot matte")
        center = PlateCenters(plate, threshold)
        if item.get("images"):
            found = {index: center(frame) for index, frame in pick_frames(ImageSequence(item["images"]), usable)}
        elif item.get("stash") and decoder == "yuv":
            found = _centers_keeping_regions(item, usable, center)
        else:  # the colour video is decoded twice (here and in the crop pass): here, its reference frames only
            found = centers_of_sparse_frames(usable, _reference_color_frames(item["video"], decoder), center)
    for index in frames:
        yield index, found.get(index)


#: what the kept regions allow for: the crop box's side may be this much off the planner's
#: estimate (the head nearer or farther than the rig's centre) ...
STASH_SIDE_SLACK = 1.3
#: ... and its centre this fraction of the side off the camera's own 2D head centre (the
#: triangulated, smoothed centre projects near, not onto, it)
STASH_CENTRE_SLACK = 0.15


def _centers_keeping_regions(item: dict, frames: list[int], center) -> dict[int, np.ndarray | None]:
    """Head centres of the wanted frames of a plate-route video, decoding it whole, and each
    frame's region around its centre kept in ``item["stash"]["dir"]`` at the crop's working
    reduction (:meth:`Yuv420Frame.region`), so the crop pass reads those instead of decoding
    the video a second time (it decodes after all where a crop falls outside them). An
    ``index.json`` of the kept frames, written last, marks the folder complete.

    As on the reference-frame route, a wanted frame between two wanted neighbours one frame
    away gets the centre interpolated between theirs (every other frame is differenced: the
    plate difference of a whole frame costs about what decoding it does)."""
    import json
    import os

    stash = item["stash"]
    folder, side, size = stash["dir"], float(stash["side"]), int(stash["size"])
    reduce = halvings(side / STASH_SIDE_SLACK, size)
    half = 0.5 * side * STASH_SIDE_SLACK + STASH_CENTRE_SLACK * side + 4 + side / size
    found, kept, regions = {}, {}, None
    if reduce >= 1:
        os.makedirs(folder, exist_ok=True)
        regions = open(f"{folder}/regions.yuv", "wb")  # noqa: SIM115 (closed below, also on a decode error)

    def keep(index: int, frame) -> None:
        c = found[index]
        if c is None or reduce < 1:
            return
        x0, y0 = max(int(c[0] - half), 0), max(int(c[1] - half), 0)
        region = frame.region(x0, y0, min(int(c[0] + half) + 1, frame.width), min(int(c[1] + half) + 1, frame.height),
                              reduce)
        if region is not None:
            kept[index] = save_region(regions, region)

    frames = sorted(frames)
    position = {f: p for p, f in enumerate(frames)}
    try:
        pending = None  # (index, frame) whose centre waits for the next differenced frame
        for index, frame in pick_frames(read_yuv420(item["video"], threads=1), frames):
            p = position[index]
            between = 0 < p < len(frames) - 1 and p % 2 == 1 and frames[p + 1] - frames[p - 1] == 2
            if between and pending is None and frames[p - 1] in found:
                pending = (index, frame)
                continue
            found[index] = center(frame)
            if pending is not None:
                before, after = found.get(frames[position[pending[0]] - 1]), found[index]
                found[pending[0]] = None if before is None or after is None else 0.5 * (before + after)
                keep(*pending)
                pending = None
            keep(index, frame)
        if pending is not None:  # the video ended early: the next frame never came
            found[pending[0]] = center(pending[1])
            keep(*pending)
    finally:
        if regions is not None:
            regions.close()
    if reduce >= 1:
        with open(f"{folder}/index.json.tmp", "w") as handle:
            json.dump(kept, handle)
        os.replace(f"{folder}/index.json.tmp", f"{folder}/index.json")
    return found


def _plan_stash(center_items: list[dict], video_items: list[dict], out_dir: str, config: ExtractConfig) -> None:
    """Where the head-centre pass keeps the regions of the plate-route videos it decodes
    (:func:`_centers_keeping_regions`), and the crop box side it should expect in each: the
    projection of ±``head_extent`` at the point nearest all these cameras' optical axes (a rig's
    cameras look at the head). Local outputs with the ``yuv`` decoder only; items changed in place."""
    root = storage.local_path(out_dir)
    if root is None or config.decoder != "yuv":
        return
    groups: dict[tuple[str, str], list[dict]] = {}
    for item in center_items:
        if not item.get("problem") and item.get("video") and not (
                item.get("alpha_video") or item.get("alpha_images") or item.get("images")):
            groups.setdefault((item["subject"], item["sequence"]), []).append(item)
    by_id = {item["id"]: item for item in video_items}
    for items in groups.values():
        w2c = np.array([i["camera"]["world_to_cam"] for i in items], np.float64).reshape(-1, 4, 4)
        K = np.array([i["camera"]["K"] for i in items], np.float64).reshape(-1, 3, 3)
        rig = triangulate(w2c, K, K[:, :2, 2], np.ones(len(items), bool))
        if rig is None:
            continue
        depth = (w2c[:, :3, :3] @ rig + w2c[:, :3, 3])[:, 2]
        for item, d, k in zip(items, depth, K):
            if d <= 0:
                continue
            folder = f"{root}/{STASH}/{item['id']}"
            item["stash"] = {"dir": folder, "side": 2.0 * config.head_extent * 0.5 * (k[0, 0] + k[1, 1]) / d,
                             "size": config.resolution}
            if item["id"] in by_id:  # the crop pass's item of the same camera (same id)
                by_id[item["id"]]["stash_dir"] = folder


#: the head-centre pass's kept regions, under the output (removed once the crop pass is done)
STASH = "head_centers/kept_regions"


def _stashed_frames(item: dict, job: VideoJob, size: int) -> FrameStash | None:
    """The head-centre pass's kept regions of this video (:func:`_centers_keeping_regions`)
    when they hold every crop it needs; else ``None`` (decode the video)."""
    import json

    folder = item.get("stash_dir")
    if not folder:
        return None
    try:
        with open(f"{folder}/index.json") as handle:
            stash = FrameStash(f"{folder}/regions.yuv", {int(f): [int(v) for v in h]
                                                         for f, h in json.load(handle).items()})
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if not set(job.frames) <= set(stash.headers):
        return None
    for index in job.frames:
        region, box = stash.region(index), job.boxes[index]
        roi = crop_roi(job.height, job.width, box, size)
        if (region.width, region.height) != (job.width, job.height) or (
                roi[2] > roi[0] and roi[3] > roi[1] and not region.covers(*roi, halvings(float(box[2]), size))):
            return None
    return stash


class _LocalWriter:
    """Media writes of one item: the filesystem resolved once and each directory made once.

    Local files are written in place, without ``ctx.write_bytes``' temp file + rename: the media
    of an item are only referenced once its manifest fragment commits (atomically, by the
    runner), and a rerun rewrites every file of an uncommitted item, so a half-written file is
    never read. On this project's sandboxed filesystem creating a file costs ~0.6 ms of CPU and
    the rename ~0.3 ms more (measured), for two files per frame. Other filesystems go through
    ``ctx.write_bytes``."""

    def __init__(self, ctx: StageContext):
        import os

        self.ctx, self._os = ctx, os
        self.root = storage.local_path(ctx.out_dir)
        self._made: set[str] = set()

    def write(self, rel: str, data: bytes) -> str:
        if self.root is None:
            return self.ctx.write_bytes(rel, data)
        path = self._os.path.join(self.root, rel)
        parent = self._os.path.dirname(path)
        if parent not in self._made:
            self._os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        self.ctx.add_file(rel, len(data))  # before writing: a write that fails half-way is removed too
        with open(path, "wb") as handle:
            handle.write(data)
        return rel


# --------------------------------------------------------------------------- pass 1
def _one_thread_per_worker() -> None:
    """Stages run one worker per core; OpenCV's and torch's own thread pools would oversubscribe.
    The extract stages never import torch; a pooled worker process where another stage's task
    did gets one thread too."""
    import cv2

    cv2.setNumThreads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


#: Bumped when the stage's output changes meaning; part of the flow task's cache key (pipelines/caching.py).
VERSION = "8"  # 8: plate-route head centres differenced at a shorter side >= 128 px (was 256), every decode opens without FFmpeg's decoding probe; 7: plate-route regions aligned to their reduction, the head-centre views decoded whole (every other frame differenced) and their regions kept for the crop pass; 6: plate-route head centres from the reference frames (the others interpolated), the head-centre pass per camera; v1 colour correction truncated as nersemble does; 5: frame folders, JPEG plates, temporal-median plates, head centres odd-reflected at the ends; 4: full-range (yuvj420p, pc-tagged) streams convert as full range; 3: crops reduced on the planes


class _ExtractStageBase(Stage):
    """Shared by both passes: the config, one thread per worker, and reader problems as errors."""

    cheap_setup = True

    def __init__(self, config: ExtractConfig):
        self.config = config

    def setup(self) -> None:
        _one_thread_per_worker()

    @staticmethod
    def raise_problem(item: dict) -> None:
        if item.get("problem"):
            raise FormatError(item["path"], None, item["problem"])


class HeadCenterStage(_ExtractStageBase):
    """Per (subject, sequence, camera) of the views the head centre is triangulated from: the 2D
    head centre of each selected frame in that camera (``u``, ``v``; NaN where no foreground).

    One item per camera, not per sequence, so the pass spreads over the workers even for a single
    sequence; the driver triangulates and smooths (:func:`head_track`), which costs nothing."""

    name = "head_centers"
    version = VERSION

    def process(self, item: dict, ctx: StageContext) -> list[dict]:
        self.raise_problem(item)
        rows = []
        for frame, center in _mask_centers(item, item["frames"], self.config.decoder, self.config.alpha_threshold):
            u, v = (float(center[0]), float(center[1])) if center is not None else (float("nan"), float("nan"))
            rows.append({"id": make_id(item["subject"], item["sequence"], frame, item["camera_serial"]),
                         "subject": item["subject"], "sequence": item["sequence"], "camera": item["camera_serial"],
                         "frame": frame, "u": u, "v": v})
        return rows


def head_track(frames: list[int], world_to_cam: np.ndarray, K: np.ndarray, centers_2d: np.ndarray) -> np.ndarray:
    """3D head centre (T, 3) of each frame from 2D centres (T, C, 2; NaN
    where a camera found none) of C cameras: triangulated per frame, frames without two views
    filled from their neighbours, then smoothed over time. ValueError if no frame has two views."""
    centers = np.full((len(frames), 3), np.nan)
    for t in range(len(frames)):
        valid = ~np.isnan(centers_2d[t, :, 0])
        point = triangulate(world_to_cam, K, np.nan_to_num(centers_2d[t]), valid)
        if point is not None:
            centers[t] = point
    if np.isnan(centers).all():
        raise ValueError("no foreground found in two cameras of any frame")
    good = ~np.isnan(centers[:, 0])
    for d in range(3):
        centers[:, d] = np.interp(np.arange(len(frames)), np.flatnonzero(good), centers[good, d])
    kernel = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
    # odd reflection at the ends keeps a steadily moving head where it is (edge padding
    # pulled the first and last frames' centres towards the middle by 4/9 of a step)
    padded = np.pad(centers, ((2, 2), (0, 0)), **(dict(mode="reflect", reflect_type="odd")
                                                  if len(frames) > 1 else dict(mode="edge")))
    return np.stack([np.convolve(padded[:, d], kernel / kernel.sum(), mode="valid") for d in range(3)], 1)


def head_tracks(center_items: list[dict], rows: list[dict]) -> dict[tuple[str, str], dict[int, list[float]] | str]:
    """Per (subject, sequence): {frame: 3D head centre} from the head-centre pass's rows, or the
    reason there is none (no camera's pass succeeded, or no foreground in two views)."""
    cameras = {(i["subject"], i["sequence"], i["camera_serial"]): i for i in center_items if not i.get("problem")}
    found: dict[tuple[str, str], dict[str, dict[int, tuple[float, float]]]] = {}
    for row in rows:
        if (row["subject"], row["sequence"], row.get("camera")) in cameras:  # not rows of an earlier version's items
            found.setdefault((row["subject"], row["sequence"]), {}).setdefault(row["camera"], {})[row["frame"]] = (
                row["u"], row["v"])
    out: dict[tuple[str, str], dict[int, list[float]] | str] = {}
    for key in {(s, q) for s, q, _ in cameras}:
        by_camera = found.get(key, {})
        if not by_camera:
            out[key] = "no head centre: the head-centre pass failed for every camera (see head_centers.errors.parquet)"
            continue
        serials = sorted(by_camera)
        items = [cameras[(*key, serial)] for serial in serials]
        frames = items[0]["frames"]
        centers_2d = np.array([[by_camera[serial].get(f, (np.nan, np.nan)) for serial in serials] for f in frames],
                              np.float64).reshape(len(frames), len(serials), 2)
        world_to_cam = np.array([i["camera"]["world_to_cam"] for i in items]).reshape(-1, 4, 4)
        K = np.array([i["camera"]["K"] for i in items]).reshape(-1, 3, 3)
        try:
            smooth = head_track(frames, world_to_cam, K, centers_2d)
        except ValueError as exc:
            out[key] = f"no head centre for {key[0]}/{key[1]}: {exc}"
            continue
        out[key] = {f: list(map(float, smooth[t])) for t, f in enumerate(frames)}
    return out


# --------------------------------------------------------------------------- pass 2
class ExtractStage(_ExtractStageBase):
    """Per video: crop the selected frames around the head, write image + alpha + manifest rows."""

    name = "extract"
    version = VERSION

    def process(self, item: dict, ctx: StageContext) -> list[dict]:
        self.raise_problem(item)
        cfg = self.config
        source = item["camera"]
        crops_planned = item["crops"]
        job = VideoJob(frames=item["frames"], width=source["width"], height=source["height"],
                       boxes={int(f): np.array(c["box"]) for f, c in crops_planned.items()},
                       ccm=np.array(item["ccm"]) if item.get("ccm") is not None else None,
                       affine=np.array(item["affine"]) if item.get("affine") is not None else None)
        alpha = None
        if item.get("alpha_video"):
            alpha = (read_yuv420(item["alpha_video"], threads=1) if cfg.decoder == "yuv"
                     else read_frames(item["alpha_video"], gray=True, backend=cfg.decoder, threads=1))
        elif item.get("alpha_images"):
            alpha = ImageSequence(item["alpha_images"], gray=True)
        else:
            job.plate = _plate(item, cfg.decoder)
        color = (_stashed_frames(item, job, cfg.resolution) if job.plate is not None and cfg.decoder == "yuv" else None)
        if color is None:
            color = _color_frames(item, cfg.decoder, planes=True)
        base = f"{item['subject']}/{make_id(item['sequence'])}/cam_{item['camera_serial']}"
        writer = _LocalWriter(ctx)
        source_of_alpha = alpha_source(item)
        corrected = bool(cfg.color_correction and (job.ccm is not None or job.affine is not None))
        rows = []
        for cropped in extract_video(job, color, alpha, cfg):
            image_rel = writer.write(f"images/{base}/{cropped.frame:06d}.{cfg.image_format}",
                                     encode_image(cropped.image, cfg.image_format, cfg.jpeg_quality))
            alpha_rel = writer.write(f"alpha/{base}/{cropped.frame:06d}.png", encode_image(cropped.alpha, "png"))
            crop = crops_planned[str(cropped.frame)]
            rows.append({
                "id": make_id(item["subject"], item["sequence"], cropped.frame, item["camera_serial"]),
                "subject": item["subject"], "sequence": item["sequence"], "frame": cropped.frame,
                "camera": item["camera_serial"], "image": image_rel, "alpha": alpha_rel,
                "width": cfg.resolution, "height": cfg.resolution,
                "world_to_cam": crop["world_to_cam"], "K": crop["K"], "crop_box": crop["box"],
                "source_width": source["width"], "source_height": source["height"],
                "alpha_source": source_of_alpha, "color_corrected": corrected,
            })
        missing = sorted(set(job.frames) - {r["frame"] for r in rows})
        if missing:
            raise FormatError(item["video"], f"frame {missing[0]}",
                              f"video ended early: {len(missing)} selected frame(s) missing (truncated file?)")
        return rows


# --------------------------------------------------------------------------- planning
def plan(index: CaptureIndex, config: ExtractConfig) -> tuple[list[dict], list[dict]]:
    """Items for both passes from a capture index; problems become failing items. The crop pass's
    items get their crops from :func:`plan_crops` once the head centres are known."""
    from avat3r_core.formats.capture import BACKGROUND

    center_items, video_items = [], []
    errors = [p for p in index.problems if p.severity == "error"]
    problems = {(p.subject, p.sequence, p.camera): p for p in errors if p.frame is None}
    bad_frames: dict[tuple[str, str, str], dict[int, object]] = {}  # one broken file of one frame
    for p in errors:
        if p.frame is not None:
            bad_frames.setdefault((p.subject, p.sequence, p.camera), {})[p.frame] = p
    for pid, subject in index.subjects.items():
        subject_problem = problems.get((pid, None, None))
        for seq_name, sequence in subject.sequences.items():
            if config.sequences and seq_name not in config.sequences:
                continue
            n_frames = sequence.frames
            frames = select_frames(n_frames, config) if n_frames else []
            videos = []
            for serial, media in sorted(sequence.media.items()):
                i = subject.serials.index(serial)
                bad = bad_frames.get((pid, seq_name, serial), {})
                video = {
                    "video": media.path, "alpha_video": media.alpha_path, "plate": _plate_path(subject, serial),
                    "images": media.images, "alpha_images": media.alpha_images, "affine": media.color_correction,
                    "camera_serial": serial, "camera": _camera_dict(subject.cameras, i), "bad_frames": sorted(bad),
                    "ccm": subject.color_calibration[serial].tolist()
                    if subject.color_calibration and serial in subject.color_calibration else None,
                }
                if not (video["alpha_video"] or video["alpha_images"] or video["plate"]):
                    good = [f for f in range(n_frames) if f not in bad]
                    video["median_plate_frames"] = [good[j] for j in sorted(set(
                        np.linspace(0, len(good) - 1, min(MEDIAN_PLATE_FRAMES, len(good))).round().astype(int)))] if good else []
                videos.append(video)
                for frame in sorted(set(frames) & set(bad)):  # that (frame, camera) fails, the rest goes on
                    video_items.append({"id": make_id(pid, seq_name, frame, serial), "problem": bad[frame].message,
                                        "path": bad[frame].path})
            seq_id = make_id(pid, seq_name)
            if subject_problem or subject.cameras is None:
                reason = subject_problem.message if subject_problem else "no usable calibration"
                center_items.append({"id": seq_id, "problem": reason,
                                     "path": subject_problem.path if subject_problem else subject.root})
                continue
            # the head centre needs a few well-spread views, not all: fewer videos to decode twice
            views = sorted(farthest_views(subject.cameras[[subject.serials.index(v["camera_serial"]) for v in videos]]
                                 .centers.numpy(), config.center_views)) if videos else []
            for i in views:
                center_items.append({"id": make_id(pid, seq_name, videos[i]["camera_serial"]), "subject": pid,
                                     "sequence": seq_name, **videos[i], "frames": frames})
            for video in videos:
                video_items.append({"id": make_id(pid, seq_name, video["camera_serial"]), "subject": pid,
                                    "sequence": seq_name, **video,
                                    "frames": [f for f in frames if f not in set(video["bad_frames"])]})
        # videos the reader rejected: one failing item each, named by the reader's message
        for (p_pid, p_seq, p_cam), problem in problems.items():
            if p_pid == pid and p_seq and p_seq != BACKGROUND and p_cam and (not config.sequences or p_seq in config.sequences):
                video_items.append({"id": make_id(pid, p_seq, p_cam), "problem": problem.message, "path": problem.path})
    return center_items, video_items


#: frames (evenly spread over the sequence) whose per-pixel median makes a camera's plate when it
#: has neither alpha nor a captured plate
MEDIAN_PLATE_FRAMES = 15


def plan_crops(item: dict, centers: dict[int, list[float]], config: ExtractConfig) -> dict:
    """A crop pass item with, per selected frame that has a head centre, its crop box and crop
    camera (``world_to_cam``, ``K`` as manifest columns): every crop camera of the video in one
    batched call."""
    import torch

    from avat3r_core.formats.manifests import cameras_to_columns

    camera = _camera_from_dict(item["camera"])
    have = [f for f in item["frames"] if f in centers]
    crops = {}
    if have:
        boxes = frame_boxes(camera, np.array([centers[f] for f in have]), config.head_extent)
        crop_cams = camera[[0] * len(have)].crop_resize(torch.tensor(boxes, dtype=torch.float64), config.resolution)
        columns = cameras_to_columns(crop_cams)
        crops = {str(f): {"box": [float(v) for v in box], "world_to_cam": columns["world_to_cam"][i],
                          "K": columns["K"][i]} for i, (f, box) in enumerate(zip(have, boxes))}
    return {**item, "crops": crops}


def run_extract(config: ExtractConfig, capture_root: str, out_dir: str, layout: str = "auto",
                resources: StageResources | None = None, executor: str = "ray") -> tuple[StageSummary, StageSummary]:
    """Extract frames of a capture into ``out_dir`` (``head_centers/`` + ``frames.parquet``).

    The run holds ``out_dir``'s lock throughout (both passes): a second extract into it is
    refused at once, so two runs with different settings cannot mix their rows."""
    from avat3r_core.formats.capture import scan_capture

    with storage.output_lock(out_dir):
        index = scan_capture(capture_root, layout=layout, decode=False)
        center_items, video_items = plan(index, config)
        _plan_stash(center_items, video_items, out_dir, config)
        centers_dir = storage.join(out_dir, "head_centers")
        centers = run_stage(lambda: HeadCenterStage(config), center_items, centers_dir, "head_centers",
                            resources=resources, executor=executor)
        rows = storage.read_parquet(centers.manifest).to_pylist() if storage.exists(centers.manifest) else []
        tracks = head_tracks(center_items, rows)
        ready = []
        for item in video_items:
            if item.get("problem"):
                ready.append(item)
                continue
            found = tracks.get((item["subject"], item["sequence"]),
                               "no head centre for this sequence (see head_centers.errors.parquet)")
            if isinstance(found, str):
                ready.append({"id": item["id"], "path": item["video"], "problem": found})
            else:
                ready.append(plan_crops(item, found, config))
        frames = run_stage(lambda: ExtractStage(config), ready, out_dir, "frames", resources=resources,
                           executor=executor)
        if storage.local_path(out_dir) is not None:  # a failed crop item decodes on a rerun
            import shutil

            shutil.rmtree(f"{storage.local_path(out_dir)}/{STASH}", ignore_errors=True)
        return centers, frames
