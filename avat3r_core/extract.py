"""Frame extraction for one video: select frames, colour-correct, matte, crop around the head.

The stage (``stages/extract.py``) fans this out, one task per video; everything here works on
one camera's video and is testable without Ray.

Crops are consistent across views: the head centre is a 3D point per frame (triangulated from the
foreground masks of all cameras, or given by tracking), and every camera crops a square that
covers the same physical extent (``head_extent`` metres) around its projection. The crop camera
comes from :meth:`Cameras.crop_resize`, so it projects a 3D point exactly where it lands in the
cropped image.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterable, Iterator

import cv2
import numpy as np

from avat3r_core.color import cheung2004_terms, linear_to_srgb, srgb_to_linear
from avat3r_core.geometry import camera_centers

if TYPE_CHECKING:  # torch (via Cameras) is imported only where cameras are projected: the extract
    # workers never do, and a worker process without torch starts ~0.9 s sooner
    from avat3r_core.cameras import Cameras


@dataclass
class ExtractConfig:
    PRESETS: ClassVar[dict] = {
        "tiny": dict(resolution=64, frames_per_sequence=3),
        "demo": dict(resolution=128),
        "paper": dict(resolution=512, image_format="png"),
    }

    resolution: int = 128  # square crop size in pixels (512 for the paper)
    frame_step: int = 1  # every k-th frame ...
    frame_list: tuple[int, ...] = ()  # ... or exactly these frame indices ...
    frames_per_sequence: int = 0  # ... or this many, evenly spaced (0 = all)
    sequences: tuple[str, ...] = ()  # only these sequences (empty = all but BACKGROUND)
    head_extent: float = 0.15  # half-size of the crop box in metres around the head centre
    center_views: int = 4  # cameras (spread farthest apart) whose mattes triangulate the head centre
    color_correction: bool = True  # apply calibration/color_calibration.json when present
    alpha_threshold: float = 0.06  # background differencing: mean abs RGB difference in [0, 1]
    image_format: str = "jpg"  # jpg | png
    jpeg_quality: int = 95
    # yuv: PyAV, frames stay as decoded 4:2:0 planes and only the crop region is converted to RGB
    # (the matte is the luma plane); pyav | opencv: whole frames converted to RGB by the decoder.
    # benchmarks/extract.py measures all three.
    decoder: str = "yuv"

    def __post_init__(self) -> None:
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be jpg or png, got {self.image_format!r}")
        if self.decoder not in ("yuv", "pyav", "opencv"):
            raise ValueError(f"decoder must be yuv, pyav or opencv, got {self.decoder!r}")
        if self.resolution < 16 or self.frame_step < 1 or self.frames_per_sequence < 0:
            raise ValueError("resolution ≥ 16, frame_step ≥ 1 and frames_per_sequence ≥ 0 are required")


def select_frames(n_frames: int, config: ExtractConfig) -> list[int]:
    """Frame indices to extract from a sequence of ``n_frames`` (all cameras use the same)."""
    if config.frame_list:
        bad = [f for f in config.frame_list if not 0 <= f < n_frames]
        if bad:
            raise ValueError(f"frame_list has indices outside 0..{n_frames - 1}: {bad}")
        return sorted(set(config.frame_list))
    frames = list(range(0, n_frames, config.frame_step))
    if config.frames_per_sequence and len(frames) > config.frames_per_sequence:
        picks = np.linspace(0, len(frames) - 1, config.frames_per_sequence).round().astype(int)
        frames = [frames[i] for i in picks]
    return frames


# --------------------------------------------------------------------------- mattes
_MEAN_OF_THREE = np.full((1, 3), 1.0 / (3 * 255.0), np.float32)


def background_matte(frame: np.ndarray, plate: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground alpha (H, W) float32 in {0, 1} from an empty-scene plate, cleaned up
    (:func:`foreground_mask` as floats)."""
    return (foreground_mask(frame, plate, threshold) > 0).astype(np.float32)


def foreground_mask(frame: np.ndarray, plate: np.ndarray, threshold: float) -> np.ndarray:
    """Foreground mask (H, W) uint8 in {0, 255} from an empty-scene plate, cleaned up.

    Difference → threshold → morphological open (speckle) and close (holes) → keep the largest
    connected component → fill interior holes. Good enough for a studio backdrop; real captures
    with alpha videos (or a matting model) should use those instead.
    """
    # the mean absolute RGB difference in [0, 1], by OpenCV on uint8 (~9x faster than numpy floats)
    diff = cv2.transform(cv2.absdiff(frame, plate).astype(np.float32), _MEAN_OF_THREE)
    mask = (diff > threshold).astype(np.uint8)
    size = max(3, int(round(min(frame.shape[:2]) / 100)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)
    # labels alone, areas by bincount: OpenCV's per-component statistics cost ~2.5x the labelling
    count, labels = cv2.connectedComponents(mask, connectivity=8)
    if count > 2:  # one component (count 2) is the mask itself
        largest = 1 + int(np.argmax(np.bincount(labels.ravel(), minlength=count)[1:]))
        mask = (labels == largest).astype(np.uint8)
    # fill holes: everything not reachable from the border through background is foreground
    # (the flood only enters background, so the component itself is never marked)
    h, w = mask.shape
    seed_mask = np.zeros((h + 2, w + 2), np.uint8)
    for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        if mask[y, x] == 0:
            cv2.floodFill(mask, seed_mask, (x, y), 2)
    return cv2.compare(mask, 2, cv2.CMP_NE)


def median_plate(frames: list[np.ndarray]) -> np.ndarray:
    """An empty-scene plate from a camera's own frames: the per-pixel temporal median (RGB uint8).

    The route for a camera with neither alpha nor a captured plate. Each pixel shows the backdrop
    in most frames only where the subject moves off it: a head that turns or sways clears, a part
    that never moves (a torso against the backdrop) stays in the plate and so out of the matte.
    """
    if not frames:
        raise ValueError("median_plate needs at least one frame")
    return np.median(np.stack(frames), axis=0).round().astype(np.uint8)


def mask_center(alpha: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """Centre of the head's bounding box in a foreground mask; ``None`` if the mask is empty.

    The head is the blob from the top of the mask down to the neck, found as the narrowest row
    below the head's widest row (shoulders widen again below it); neck and torso are excluded.
    """
    step = max(1, min(alpha.shape[:2]) // 256)  # a few pixels of precision is plenty for a centre
    fg = alpha[::step, ::step] > threshold
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    top, bottom = rows[0], rows[-1] + 1
    width = fg[top:bottom].sum(axis=1).astype(np.float64)
    width = np.convolve(np.pad(width, 2, mode="edge"), np.ones(5) / 5, mode="valid")
    widest = int(np.argmax(width[: max(1, int(0.7 * len(width)))]))
    below = width[widest:]
    neck = widest + int(np.argmin(below)) if below.size > 1 and below.min() < 0.85 * width[widest] else len(width)
    head = fg[top:top + max(neck, 1)]
    # the bounding box from occupied rows and columns (np.nonzero lists every pixel: ~4x slower)
    r, c = np.flatnonzero(head.any(axis=1)), np.flatnonzero(head.any(axis=0))
    return step * np.array([(c[0] + c[-1] + 1) / 2.0, top + (r[0] + r[-1] + 1) / 2.0])


def triangulate(world_to_cam: np.ndarray, K: np.ndarray, points: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """Least-squares 3D point closest to the rays through ``points`` (C, 2) of the valid cameras.

    Cameras as arrays: ``world_to_cam`` (C, 4, 4) and ``K`` (C, 3, 3). The rays are those of
    :meth:`Cameras.rays`, in numpy because the extract workers run without torch (its import
    would cost each worker ~0.9 s of start-up)."""
    if valid.sum() < 2:
        return None
    points = np.asarray(points, np.float64)[valid]
    w2c, K = np.asarray(world_to_cam, np.float64)[valid], np.asarray(K, np.float64)[valid]
    R = w2c[:, :3, :3]
    origins = camera_centers(w2c)
    y = (points[:, 1] - K[:, 1, 2]) / K[:, 1, 1]
    x = (points[:, 0] - K[:, 0, 2] - K[:, 0, 1] * y) / K[:, 0, 0]
    dirs = x[:, None] * R[:, 0] + y[:, None] * R[:, 1] + R[:, 2]  # R^T (x, y, 1)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    A = np.zeros((3, 3))
    b = np.zeros(3)
    for o, d in zip(origins, dirs):
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ o
    return np.linalg.solve(A, b)


def frame_boxes(camera: Cameras, centers: np.ndarray, extent: float) -> np.ndarray:
    """(N, 4) square crop boxes x0, y0, w, h of one camera, each covering ±``extent`` metres
    around one of N head centres (N, 3): a whole video's frames in one projection."""
    import torch

    uv, depth = camera.project(torch.as_tensor(np.asarray(centers), dtype=camera.dtype).reshape(-1, 3))
    uv, depth = uv[0].double().numpy(), depth[0].double().numpy()
    focal = float(0.5 * (camera.fx + camera.fy).double()[0])
    side = 2.0 * extent * focal / np.maximum(depth, 1e-6)
    return np.stack([uv[:, 0] - side / 2, uv[:, 1] - side / 2, side, side], axis=1)


def crop_roi(height: int, width: int, box: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """The source region (x0, y0, x1, y1) that :func:`crop_image` reads for ``box``: the box plus a
    margin for the filters, clipped to the image (empty when the box lies outside)."""
    x0, y0, w, h = (float(v) for v in box)
    margin = 4 + int(np.ceil(w / size))
    rx0, ry0 = max(int(np.floor(x0)) - margin, 0), max(int(np.floor(y0)) - margin, 0)
    rx1 = min(int(np.ceil(x0 + w)) + margin, width)
    ry1 = min(int(np.ceil(y0 + h)) + margin, height)
    return rx0, ry0, rx1, ry1


def crop_image(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Resample the square ``box`` (x0, y0, w, h; may leave the image) to ``size``² pixels.

    One affine warp maps output pixel centres to source coordinates with the same +0.5
    convention as :meth:`Cameras.crop_resize`, so the crop camera stays exact; outside the
    source image is black (alpha 0).
    """
    rx0, ry0, rx1, ry1 = crop_roi(image.shape[0], image.shape[1], box, size)
    if rx1 <= rx0 or ry1 <= ry0:
        return np.zeros((size, size) + image.shape[2:], image.dtype)
    return crop_region(image[ry0:ry1, rx0:rx1], (rx0, ry0), box, size)


def halvings(width: float, size: int) -> int:
    """How many exact 2x reductions a crop of a ``width``-pixel box to ``size`` starts with: while
    the box is more than twice the output (the warp then shrinks by at most 2x)."""
    times = 0
    while width / size > 2.0:
        width, times = width / 2, times + 1
    return times


def halve(image: np.ndarray, times: int) -> tuple[np.ndarray, int]:
    """Up to ``times`` exact 2x2 averagings (stopping before the image gets under 4 px); returns
    the image and how many were made. Output pixel i covers input pixels 2i and 2i + 1, so
    continuous coordinates simply halve (centres at +0.5 on both sides)."""
    done = 0
    while done < times and min(image.shape[:2]) >= 4:
        even_h, even_w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
        image = cv2.resize(image[:even_h, :even_w], (even_w // 2, even_h // 2), interpolation=cv2.INTER_AREA)
        done += 1
    return image, done


def align(coordinate: int, reduce: int) -> int:
    """``coordinate`` rounded down to a multiple of ``2 ** reduce`` (and of 2: the 4:2:0 chroma
    grid): the start of a region that is reduced ``reduce`` times, so that its reduced pixels are
    the same 2^k blocks of the frame as those of the whole frame reduced."""
    step = 2 ** max(reduce, 1)
    return coordinate // step * step


def crop_region(image: np.ndarray, origin: tuple[float, float], box: np.ndarray, size: int,
                scale: int = 1) -> np.ndarray:
    """:func:`crop_image` on a region of the source whose top-left corner is ``origin`` (x, y) in
    the source; the region must hold :func:`crop_roi` (where it lies inside the source).
    ``scale``: the region was already reduced by this factor (its pixel i covers source pixels
    ``origin + scale * i`` up to ``origin + scale * (i + 1)``)."""
    x0, y0, w, h = (float(v) for v in box)
    x0, y0, w, h = (x0 - origin[0]) / scale, (y0 - origin[1]) / scale, w / scale, h / scale
    # Work on the region of interest only (plus a margin for the filters), and halve it with exact
    # 2x2 averaging while the crop shrinks by more than 2x: cost follows the crop, not the frame.
    image, done = halve(image, halvings(w, size))
    x0, y0, w, h = x0 / 2 ** done, y0 / 2 ** done, w / 2 ** done, h / 2 ** done
    sx, sy = size / w, size / h
    # u_out = (u_src - x0) * sx  (continuous coordinates, centres at +0.5 on both sides)
    M = np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy]])
    # OpenCV warps map integer pixel indices; shift by the half-pixel on both sides
    M[:, 2] += M[:, :2] @ np.array([0.5, 0.5]) - 0.5
    if sx < 1:  # shrinking: low-pass first so the bilinear warp does not alias
        sigma = 0.5 / sx
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return cv2.warpAffine(image, M, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


# --------------------------------------------------------------------------- 4:2:0 frames
#: limited-range luma (16..235) → full-range gray, as FFmpeg converts yuv420p to gray (alpha
#: videos are written as limited-range luma, see avat3r_core.video)
LUMA_TO_GRAY = np.clip(np.rint((np.arange(256) - 16) * 255.0 / 219.0), 0, 255).astype(np.uint8)
#: a matte pixel is foreground (gray/255 > 0.5) exactly when its luma is above this
LUMA_HALF = float(np.flatnonzero(LUMA_TO_GRAY > 127.5)[0]) - 0.5


def _even_box(x0: int, y0: int, x1: int, y1: int, reduce: int, width: int, height: int
              ) -> tuple[int, int, int, int]:
    """A region as the 4:2:0 planes give it: the top-left aligned to the reduction
    (:func:`align`), the bottom-right grown to even coordinates inside the (even) frame."""
    return (align(x0, reduce), align(y0, reduce), min(-(-x1 // 2) * 2, width // 2 * 2),
            min(-(-y1 // 2) * 2, height // 2 * 2))


def _yuv444_to_rgb(luma: np.ndarray, u: np.ndarray, v: np.ndarray, full_range: bool) -> np.ndarray:
    """BT.601 RGB of planes of one size (the chroma already brought to the luma's)."""
    return cv2.transform(cv2.merge([luma, u, v]), _BT601_FULL_TO_RGB if full_range else _BT601_LIMITED_TO_RGB)


class Yuv420Frame:
    """One decoded frame as the decoder left it: 4:2:0 planes (views of the decoder's buffers,
    valid while this object lives), converted to RGB or gray only where asked.

    ``full_range``: the stream is full range (``yuvj420p``, or tagged ``pc``: luma 0..255, as
    phones and some capture rigs write), not the limited 16..235 of untagged video; conversions
    follow it (read as limited range, its colours would come out contrast-stretched)."""

    def __init__(self, frame) -> None:
        self._frame = frame  # keeps the decoder's buffers alive
        self.width, self.height = frame.width, frame.height
        self.full_range = frame.format.name == "yuvj420p" or frame.color_range == _AVCOL_RANGE_JPEG
        #: a matte pixel is foreground (gray/255 > 0.5) exactly when its luma is above this
        self.luma_half = 127.5 if self.full_range else LUMA_HALF
        y, u, v = frame.planes[:3]
        self.y = np.frombuffer(y, np.uint8).reshape(y.height, y.line_size)[:, :y.width]
        self.u = np.frombuffer(u, np.uint8).reshape(u.height, u.line_size)[:, :u.width]
        self.v = np.frombuffer(v, np.uint8).reshape(v.height, v.line_size)[:, :v.width]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def rgb(self, x0: int = 0, y0: int = 0, x1: int | None = None, y1: int | None = None,
            reduce: int = 0) -> tuple[np.ndarray, tuple[int, int], int]:
        """RGB (BT.601, limited or full range as the stream is) of the region grown to even
        coordinates; returns it with its top-left (x, y) in the frame and its reduction factor.

        ``reduce``: up to this many exact 2x2 averagings (:func:`halve`) first. They are made on
        the planes, luma ``reduce`` times and the half-size chroma once less, and only the
        reduced region is converted: far fewer pixels than converting then reducing, and the
        same result up to rounding (conversion is affine; the chroma resolution matches). The
        top-left is aligned to the reduction (:func:`align`), so a reduced pixel is the same
        block of the frame whatever region it is read in (:class:`PlatePyramid` relies on it)."""
        x1 = self.width if x1 is None else x1
        y1 = self.height if y1 is None else y1
        x0, y0, x1, y1 = _even_box(x0, y0, x1, y1, reduce, self.width, self.height)
        luma, done = halve(self.y[y0:y1, x0:x1], reduce)
        u, v = self.u[y0 // 2:y1 // 2, x0 // 2:x1 // 2], self.v[y0 // 2:y1 // 2, x0 // 2:x1 // 2]
        if done == 0 and not self.full_range:  # OpenCV's own converter (limited range only)
            h, w = y1 - y0, x1 - x0
            i420 = np.empty((h * 3 // 2, w), np.uint8)
            i420[:h] = luma
            chroma = i420[h:].reshape(-1)
            q = (h // 2) * (w // 2)
            chroma[:q].reshape(h // 2, w // 2)[...] = u
            chroma[q:].reshape(h // 2, w // 2)[...] = v
            return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420), (x0, y0), 1
        if done == 0:  # each chroma sample covers its 2x2 luma block, as in the I420 converter
            u = cv2.resize(u, (luma.shape[1], luma.shape[0]), interpolation=cv2.INTER_NEAREST)
            v = cv2.resize(v, (luma.shape[1], luma.shape[0]), interpolation=cv2.INTER_NEAREST)
        else:  # the same shape as the luma now: both halve (floor) per step
            u, _ = halve(u, done - 1)
            v, _ = halve(v, done - 1)
        return _yuv444_to_rgb(luma, u, v, self.full_range), (x0, y0), 2 ** done

    def region(self, x0: int, y0: int, x1: int, y1: int, reduce: int) -> Yuv420Region | None:
        """The planes of a region reduced as :meth:`rgb` reduces them (``reduce`` ≥ 1), kept for
        a later pass (:class:`Yuv420Region`); ``None`` if the region is too small to reduce so."""
        x0, y0, x1, y1 = _even_box(x0, y0, x1, y1, reduce, self.width, self.height)
        luma, done = halve(self.y[y0:y1, x0:x1], reduce)
        if reduce < 1 or done != reduce:
            return None
        u, _ = halve(self.u[y0 // 2:y1 // 2, x0 // 2:x1 // 2], reduce - 1)
        v, _ = halve(self.v[y0 // 2:y1 // 2, x0 // 2:x1 // 2], reduce - 1)
        return Yuv420Region(np.ascontiguousarray(luma), np.ascontiguousarray(u), np.ascontiguousarray(v),
                            x0, y0, reduce, self.width, self.height, self.full_range)

    def gray(self, x0: int = 0, y0: int = 0, x1: int | None = None, y1: int | None = None,
             reduce: int = 0) -> tuple[np.ndarray, tuple[int, int], int]:
        """Full-range gray of a region (the matte of an alpha video), with its top-left (x, y) and
        its reduction factor: ``reduce`` as in :meth:`rgb`, made on the luma before the lookup."""
        x1 = self.width if x1 is None else x1
        y1 = self.height if y1 is None else y1
        luma, done = halve(self.y[y0:y1, x0:x1], reduce)
        if self.full_range:  # the luma is the gray already
            return np.ascontiguousarray(luma), (x0, y0), 2 ** done
        return cv2.LUT(np.ascontiguousarray(luma), LUMA_TO_GRAY), (x0, y0), 2 ** done


class Yuv420Region:
    """A region of a decoded frame as :meth:`Yuv420Frame.region` reduced it (luma ``reduce``
    times, the half-size chroma once less: all three the same size), read back as the frame is:
    :meth:`rgb` of a region inside it, reduced at least as much, gives exactly the frame's bytes.
    The head-centre pass keeps such regions of the frames it decodes anyway, so that the crop
    pass does not decode those videos again (:func:`save_region`, :class:`FrameStash`)."""

    def __init__(self, y: np.ndarray, u: np.ndarray, v: np.ndarray, x0: int, y0: int, reduce: int,
                 width: int, height: int, full_range: bool) -> None:
        self.y, self.u, self.v, self.x0, self.y0, self.reduce = y, u, v, int(x0), int(y0), int(reduce)
        self.width, self.height, self.full_range = int(width), int(height), bool(full_range)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def header(self) -> list[int]:
        """What :class:`FrameStash` needs besides the planes' bytes."""
        return [self.x0, self.y0, self.reduce, self.width, self.height, int(self.full_range), *self.y.shape]

    def covers(self, x0: int, y0: int, x1: int, y1: int, reduce: int) -> bool:
        """Whether :meth:`rgb` of this region of the frame can be read from it."""
        step = 2 ** self.reduce
        x0, y0, x1, y1 = _even_box(x0, y0, x1, y1, reduce, self.width, self.height)
        return (reduce >= self.reduce and x0 >= self.x0 and y0 >= self.y0
                and (x1 - x0) // step >= 4 and (y1 - y0) // step >= 4
                and (x0 - self.x0) // step + (x1 - x0) // step <= self.y.shape[1]
                and (y0 - self.y0) // step + (y1 - y0) // step <= self.y.shape[0])

    def rgb(self, x0: int, y0: int, x1: int, y1: int, reduce: int) -> tuple[np.ndarray, tuple[int, int], int]:
        """:meth:`Yuv420Frame.rgb` of a region it :meth:`covers` (ValueError otherwise)."""
        if not self.covers(x0, y0, x1, y1, reduce):
            raise ValueError(f"region {(x0, y0, x1, y1)} at reduction {reduce} is not inside the kept region")
        step = 2 ** self.reduce
        x0, y0, x1, y1 = _even_box(x0, y0, x1, y1, reduce, self.width, self.height)
        r0, c0 = (y0 - self.y0) // step, (x0 - self.x0) // step
        rows, cols = (y1 - y0) // step, (x1 - x0) // step
        luma, more = halve(self.y[r0:r0 + rows, c0:c0 + cols], reduce - self.reduce)
        u, _ = halve(self.u[r0:r0 + rows, c0:c0 + cols], more)
        v, _ = halve(self.v[r0:r0 + rows, c0:c0 + cols], more)
        return _yuv444_to_rgb(luma, u, v, self.full_range), (x0, y0), 2 ** (self.reduce + more)


def save_region(handle, region: Yuv420Region) -> list[int]:
    """Append a :class:`Yuv420Region`'s three planes to an open binary file, read back by
    :class:`FrameStash`; returns its header (:meth:`Yuv420Region.header` and the offset), which
    the reader is given. One file per video: creating a file costs more CPU than writing
    these bytes on this project's filesystem (see ``stages/extract.py``'s writer)."""
    offset = handle.tell()
    for plane in (region.y, region.u, region.v):
        handle.write(plane.data)
    return [*region.header(), offset]


class FrameStash:
    """The regions the head-centre pass kept of one camera's frames (one file, the headers
    apart: :func:`save_region`), read like an :class:`ImageSequence`: a frame's bytes when it
    is asked for."""

    def __init__(self, path: str, headers: dict[int, list[int]]) -> None:
        self.path, self.headers = path, headers

    def __len__(self) -> int:
        return max(self.headers) + 1 if self.headers else 0

    def region(self, index: int, planes: np.ndarray | None = None) -> Yuv420Region:
        """The header's region (planes not read: zero-size views, enough for
        :meth:`Yuv420Region.covers`) or, given ``planes`` (3, rows, cols), the region itself."""
        x0, y0, reduce, width, height, full_range, rows, cols, _ = self.headers[index]
        if planes is None:
            planes = np.broadcast_to(np.uint8(0), (3, rows, cols))
        return Yuv420Region(planes[0], planes[1], planes[2], x0, y0, reduce, width, height, bool(full_range))

    def __getitem__(self, index: int) -> Yuv420Region:
        from avat3r_core.errors import FormatError

        rows, cols, offset = self.headers[index][6:]
        data = np.fromfile(self.path, np.uint8, count=3 * rows * cols, offset=offset)
        if data.size != 3 * rows * cols:
            raise FormatError(self.path, f"frame {index}", f"kept region has {data.size} bytes, expected {3 * rows * cols}")
        return self.region(index, data.reshape(3, rows, cols))


#: BT.601 limited-range YUV → RGB as an affine map of (Y, U, V, 1) for ``cv2.transform`` (the
#: coefficients OpenCV's and FFmpeg's converters use, there in fixed point)
_BT601_LIMITED_TO_RGB = np.array([
    [255 / 219, 0.0, 1.402 * 255 / 224],
    [255 / 219, -1.772 * 0.114 / 0.587 * 255 / 224, -1.402 * 0.299 / 0.587 * 255 / 224],
    [255 / 219, 1.772 * 255 / 224, 0.0],
])
_BT601_LIMITED_TO_RGB = np.hstack([_BT601_LIMITED_TO_RGB, -_BT601_LIMITED_TO_RGB @ [[16.0], [128.0], [128.0]]])
#: the same for full-range streams (luma and chroma over 0..255, as JPEG)
_BT601_FULL_TO_RGB = np.array([
    [1.0, 0.0, 1.402],
    [1.0, -1.772 * 0.114 / 0.587, -1.402 * 0.299 / 0.587],
    [1.0, 1.772, 0.0],
])
_BT601_FULL_TO_RGB = np.hstack([_BT601_FULL_TO_RGB, -_BT601_FULL_TO_RGB @ [[0.0], [128.0], [128.0]]])
#: FFmpeg's AVCOL_RANGE_JPEG: a stream tagged full range
_AVCOL_RANGE_JPEG = 2


def _as_yuv420(frame) -> Yuv420Frame:
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        frame = frame.reformat(format="yuv420p")
    return Yuv420Frame(frame)


def read_yuv420(uri, threads: int = 1) -> Iterator[Yuv420Frame]:
    """Decode a video with PyAV into :class:`Yuv420Frame` (no colour conversion of whole frames)."""
    from avat3r_core.video import decoded_frames

    for frame in decoded_frames(uri, threads):
        yield _as_yuv420(frame)


def read_reference_yuv420(uri, threads: int = 1) -> Iterator[tuple[int, Yuv420Frame]]:
    """(index, :class:`Yuv420Frame`) of the frames :func:`avat3r_core.video.reference_frames`
    decodes: the frames other frames reference, the rest skipped by the decoder."""
    from avat3r_core.video import reference_frames

    for index, frame in reference_frames(uri, threads):
        yield index, _as_yuv420(frame)


def centers_of_sparse_frames(wanted: list[int], decoded: Iterable[tuple[int, object]],
                             center: Callable[[object], np.ndarray | None]) -> dict[int, np.ndarray | None]:
    """``center`` of each wanted frame from a decode that skipped some (:func:`read_reference_yuv420`):
    a skipped wanted frame gets the centre linearly interpolated between the decoded frames either
    side of it (the one side's at the ends; ``None`` where a side has no centre). Only wanted
    frames and those neighbours are passed to ``center``; decoding stops after the last wanted frame."""
    wanted = sorted(set(wanted))
    if not wanted:
        return {}
    wanted_set, found, prev = set(wanted), {}, None
    for index, frame in decoded:
        # wanted frames the decoder skipped between the previous decoded frame and this one
        gap = prev is not None and bisect.bisect_right(wanted, index - 1) > bisect.bisect_right(wanted, prev[0])
        if gap and prev[0] not in found:
            found[prev[0]] = center(prev[1])
        if index in wanted_set or gap:
            found[index] = center(frame)
        prev = (index, frame)
        if index >= wanted[-1]:
            break
    if prev is not None and prev[0] < wanted[-1] and prev[0] not in found:  # skipped frames at the end
        found[prev[0]] = center(prev[1])
    keys = sorted(found)
    out: dict[int, np.ndarray | None] = {}
    for w in wanted:
        if w in found:
            out[w] = found[w]
            continue
        i = bisect.bisect_left(keys, w)
        left, right = (found[keys[i - 1]] if i > 0 else None), (found[keys[i]] if i < len(keys) else None)
        if i == 0 or i == len(keys):
            out[w] = right if i == 0 else left
        elif left is None or right is None:
            out[w] = None
        else:
            a = (w - keys[i - 1]) / (keys[i] - keys[i - 1])
            out[w] = (1 - a) * left + a * right
    return out


#: sRGB → linear of every uint8 value: the same numbers apply_ccm computes per pixel, looked up
_SRGB_TO_LINEAR = srgb_to_linear(np.arange(256, dtype=np.float32) / 255.0)


def _srgb_to_uint8(x: np.ndarray) -> np.ndarray:
    """``np.clip(np.rint(linear_to_srgb(x) * 255), 0, 255)`` as uint8, exactly, by table.

    float32 [0, 1] falls in 2^16 equal bins; where a bin's two ends encode to the same byte
    (the encode is monotone) the table holds it, and the few pixels in the 255 bins that hold a
    byte boundary are encoded exactly. ``np.power`` on float32 was ~70% of the colour
    correction's cost."""
    x = np.clip(x, 0.0, 1.0, out=x if x.dtype == np.float32 else None).astype(np.float32, copy=False)
    index = (x * _SRGB_BINS).astype(np.int32)  # x * 2^16 is exact; truncation is floor for x ≥ 0
    looked_up = _SRGB_TABLE[index]
    out = looked_up.astype(np.uint8)
    edge = looked_up > 255
    if edge.any():
        out[edge] = _encode_srgb_exact(x[edge])
    return out


def _encode_srgb_exact(x: np.ndarray) -> np.ndarray:
    out = linear_to_srgb(x)
    out *= 255.0
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


_SRGB_BINS = 1 << 16
_SRGB_LOW = np.arange(_SRGB_BINS + 1, dtype=np.float32) / _SRGB_BINS  # bin i starts here (bin 2^16: 1.0 alone)
_SRGB_HIGH = np.append(np.nextafter(_SRGB_LOW[1:], np.float32(0)), np.float32(1.0))  # and ends here
_SRGB_BYTE = _encode_srgb_exact(_SRGB_LOW.copy())
#: each bin's byte, or 256 where the bin holds a byte boundary (one gather gives both)
_SRGB_TABLE = np.where(_SRGB_BYTE != _encode_srgb_exact(_SRGB_HIGH.copy()), np.uint16(256), _SRGB_BYTE.astype(np.uint16))


def correct_colors(image: np.ndarray, ccm: np.ndarray | None) -> np.ndarray:
    """``apply_ccm`` on a uint8 sRGB image (its sRGB decode and encode by table: identical values)."""
    if ccm is None:
        return image
    linear = cv2.LUT(image, _SRGB_TO_LINEAR)
    # three terms are the RGB values themselves (cheung2004_terms would copy them into a new array)
    expanded = linear if ccm.shape[-1] == 3 else cheung2004_terms(linear, ccm.shape[-1])
    return _srgb_to_uint8(expanded @ np.asarray(ccm, dtype=np.float32).T)


def affine_color_correct(image: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """NeRSemble v1's colour correction of a uint8 RGB image, as the public
    ``tobias-kirschstein/nersemble`` applies ``color_correction/<serial>.npy``
    (``src/nersemble/nerfstudio/dataset/nersemble_dataset.py``, ``get_numpy_image``): on RGB as
    stored scaled to [0, 1] (no linearisation), row vectors, ``rgb @ A[:3, :3] + A[:3, 3]``, clipped
    to [0, 1], then ``* 255`` truncated to uint8 (not rounded), all in float64. Its files are 4x4
    (or 3x4) affine matrices; a 3x3 one, which that loader could not read, is taken as having no
    offset."""
    if matrix is None:
        return image
    A = np.asarray(matrix, np.float64)
    offset = A[:3, 3] if A.shape[1] == 4 else np.zeros(3)
    out = (image / 255.0) @ A[:3, :3] + offset
    return (np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_image(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    if fmt == "jpg":
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        array = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
        ok, data = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {fmt} image")
    return data.tobytes()


@dataclass
class CroppedFrame:
    frame: int
    image: np.ndarray  # (S, S, 3) uint8
    alpha: np.ndarray  # (S, S) uint8


class ImageSequence:
    """One camera's frames as image files, one per frame (frame-folder releases such as NeRSemble
    v1): each is read when asked for, so only the wanted frames are decoded. ``gray`` reads mattes
    (one 8-bit channel)."""

    def __init__(self, paths: list[str], gray: bool = False) -> None:
        self.paths, self.gray = list(paths), gray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        from avat3r_core.errors import FormatError

        path = self.paths[index]
        try:
            data = np.fromfile(path, np.uint8)
        except FileNotFoundError:
            raise FormatError(path, f"frame {index}", "image file missing") from None
        if not data.size:
            raise FormatError(path, f"frame {index}", "empty file (0 bytes)")
        # decoded straight to RGB (or one 8-bit channel): no whole-frame conversion after; 16-bit
        # PNGs come out as 8 bits
        image = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE if self.gray else cv2.IMREAD_COLOR_RGB)
        if image is None:
            raise FormatError(path, f"frame {index}", "unreadable image")
        return image


def read_image(path: str) -> np.ndarray:
    """An RGB uint8 image (a background plate still), errors naming the file."""
    return ImageSequence([path])[0]


def pick_frames(stream, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, frame) for the wanted indices of a sequential decode (stopping after the
    last), or of an :class:`ImageSequence` (reading only those)."""
    if isinstance(stream, (ImageSequence, FrameStash)):
        for index in sorted(wanted):
            if index < len(stream):
                yield index, stream[index]
        return
    wanted_set, last = set(wanted), max(wanted) if wanted else -1
    for index, frame in enumerate(stream):
        if index in wanted_set:
            yield index, frame
        if index >= last:
            return


@dataclass
class VideoJob:
    """Everything extraction needs about one camera's video (built by the stage's planner)."""

    frames: list[int]
    width: int  # source resolution
    height: int
    boxes: dict[int, np.ndarray]  # frame → crop box (x0, y0, w, h), from :func:`frame_boxes`
    ccm: np.ndarray | None = None
    plate: np.ndarray | None = None  # background plate (RGB uint8) when no alpha video
    affine: np.ndarray | None = None  # NeRSemble v1 affine colour correction (affine_color_correct)


def _crop_frame(frame, box: np.ndarray, size: int, matte: bool = False) -> np.ndarray:
    """Crop of a frame: an array (RGB or gray), or a :class:`Yuv420Frame` of which only the region
    the crop reads is converted (to RGB, or with ``matte`` to the gray of its luma)."""
    if not isinstance(frame, Yuv420Frame):
        return crop_image(frame, box, size)
    rx0, ry0, rx1, ry1 = crop_roi(frame.height, frame.width, box, size)
    if rx1 <= rx0 or ry1 <= ry0:
        return np.zeros((size, size) if matte else (size, size, 3), np.uint8)
    convert = frame.gray if matte else frame.rgb
    region, origin, scale = convert(rx0, ry0, rx1, ry1, reduce=halvings(float(box[2]), size))
    return crop_region(region, origin, box, size, scale)


def extract_video(job: VideoJob, color: Iterator, alpha: Iterator | None,
                  config: ExtractConfig) -> Iterator[CroppedFrame]:
    """Sequentially decode one video (and its alpha video) and yield the cropped frames.

    Frames are RGB arrays (alpha: gray arrays) or :class:`Yuv420Frame` (``read_yuv420``), of
    which only the cropped region is converted.
    """
    size = config.resolution
    # alpha and colour are decoded in lockstep (each sequentially), so no frame is held twice
    alpha_stream = pick_frames(alpha, job.frames) if alpha is not None else None
    plates = PlatePyramid(job.plate) if job.plate is not None else None
    for index, frame in pick_frames(color, job.frames):
        if (frame.shape[1], frame.shape[0]) != (job.width, job.height):
            raise ValueError(f"frame {index} is {frame.shape[1]}x{frame.shape[0]}, expected {job.width}x{job.height}")
        box = job.boxes[index]
        if alpha_stream is not None:
            alpha_index, matte = next(alpha_stream, (None, None))
            if alpha_index != index:
                raise ValueError(f"alpha video has no frame {index}")
            image, matte_crop = _crop_frame(frame, box, size), _crop_frame(matte, box, size, matte=True)
        elif plates is not None:
            image, matte_crop = crop_with_plate(frame, plates, box, size, config.alpha_threshold)
        else:
            raise ValueError("no alpha video and no background plate: cannot matte")
        if config.color_correction:  # per pixel, so after the crop: the same result, far fewer pixels
            image = affine_color_correct(correct_colors(image, job.ccm), job.affine)
        yield CroppedFrame(index, image, matte_crop)


class PlatePyramid:
    """A background plate and its exact 2x reductions (:func:`halve`), each made once per
    video, not once per frame: the reduced region of a plate at an aligned origin (:func:`align`)
    is a slice of its reduced whole, the same pixels as reducing the region itself."""

    def __init__(self, plate: np.ndarray) -> None:
        self.levels = [plate]

    def region(self, x0: int, y0: int, shape: tuple[int, ...], scale: int) -> np.ndarray:
        """The plate region reduced by ``scale`` (a power of two) whose top-left is (x0, y0) in
        the full plate (multiples of ``scale``), of ``shape`` (height, width) at that scale."""
        level = scale.bit_length() - 1
        while len(self.levels) <= level:
            self.levels.append(halve(self.levels[-1], 1)[0])
        plate = self.levels[level]
        region = plate[y0 // scale:y0 // scale + shape[0], x0 // scale:x0 // scale + shape[1]]
        if region.shape[:2] != tuple(shape[:2]):  # a plate smaller than the frame: stretched to the region
            region = cv2.resize(region if region.size else plate, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        return region


def _region(frame, plates: PlatePyramid, x0: int, y0: int, x1: int, y1: int, reduce: int):
    """RGB of a frame's region and the same region of its plate, both reduced alike (up to
    ``reduce`` exact halvings, the top-left aligned to them); returns (region, plate region,
    top-left in the frame, factor)."""
    if isinstance(frame, (Yuv420Frame, Yuv420Region)):
        region, origin, scale = frame.rgb(x0, y0, x1, y1, reduce=reduce)
    else:
        x0, y0 = align(x0, reduce), align(y0, reduce)
        region, done = halve(frame[y0:y1, x0:x1], reduce)
        origin, scale = (x0, y0), 2 ** done
    return region, plates.region(*origin, region.shape[:2], scale), origin, scale


def crop_with_plate(frame, plates: PlatePyramid, box: np.ndarray, size: int,
                    threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop (RGB) and matte crop (uint8) of a frame differenced against its background plate.

    Only the crop's region is differenced, at the crop's working resolution (the halvings the
    crop starts with): a 2048 px frame costs what its crop does, not a whole-frame matte. The
    matte's clean-up (largest component, filled holes) then sees the head and what surrounds it
    in the box, which is what the crop keeps."""
    rx0, ry0, rx1, ry1 = crop_roi(frame.shape[0], frame.shape[1], box, size)
    if rx1 <= rx0 or ry1 <= ry0:
        return np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8)
    region, plate_region, origin, scale = _region(frame, plates, rx0, ry0, rx1, ry1, halvings(float(box[2]), size))
    matte = foreground_mask(region, plate_region, threshold)
    return crop_region(region, origin, box, size, scale), crop_region(matte, origin, box, size, scale)


class PlateCenters:
    """:func:`mask_center` of each frame's matte against the camera's plate, differenced at a
    reduced size: the shorter side at least ``MIN_SIDE`` (128 px: 176 px for a 1024x704 frame, ~4.4x
    cheaper than 352 px, 0.8 vs 4.4 ms a frame). Against 352 px, the crops of the 1024 px benchmark
    capture moved by 0.43 px on average and 2.2 px at most in 128² crop pixels; the crops of a head at
    a known position stay centred within 1 px (tests/test_real_captures.py)."""

    MIN_SIDE = 128

    def __init__(self, plate: np.ndarray, threshold: float) -> None:
        self.plates, self.threshold, self.reduce = PlatePyramid(plate), threshold, 0
        while min(plate.shape[:2]) >> (self.reduce + 1) >= self.MIN_SIDE:
            self.reduce += 1

    def __call__(self, frame) -> np.ndarray | None:
        region, plate, _, scale = _region(frame, self.plates, 0, 0, frame.shape[1], frame.shape[0], self.reduce)
        center = mask_center(foreground_mask(region, plate, self.threshold))
        return None if center is None else center * scale
