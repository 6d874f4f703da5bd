"""Reading uncalibrated pictures and videos with their caps checked first, and landmark files beside them."""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.reconstruct.errors import NoFaceError, TooFewFramesError, UnreadableInputError

log = logging.getLogger("avat3r.reconstruct")


#: landmark file beside a picture for the ``file`` backend: ``photo.png`` → ``photo.landmarks.npz``
LANDMARKS_SUFFIX = ".landmarks.npz"


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
