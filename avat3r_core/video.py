"""Video encode/decode (H.264 via PyAV; decoding also via OpenCV).

OpenCV 5 wheels cannot encode H.264, so encoding goes through PyAV (FFmpeg's libx264). Encoding
is single-threaded and fully specified so the same frames give the same bytes (the studio relies
on this for seed-determinism). Videos are built in memory and written atomically through the
storage layer, so a killed writer never leaves a half-written ``.mp4`` under its final name.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: float


def encode_video(frames: Iterable[np.ndarray], fps: float = 24.0, crf: int = 16, gray: bool = False) -> bytes:
    """H.264 ``.mp4`` bytes from RGB (H,W,3) or gray (H,W) uint8 frames (even sizes)."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = None
        for frame in frames:
            frame = np.ascontiguousarray(frame)
            if frame.dtype != np.uint8:
                raise ValueError(f"frames must be uint8, got {frame.dtype}")
            if stream is None:
                height, width = frame.shape[:2]
                if width % 2 or height % 2:
                    raise ValueError(f"H.264 yuv420p needs even frame sizes, got {width}x{height}")
                stream = container.add_stream("libx264", rate=int(round(fps)))
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                # crf 0 is lossless for the luma plane (used for alpha mattes).
                # Same frames must give the same bytes (seed-determinism of the studio). Measured:
                # with threads, or with macroblock-tree rate control, this x264 build encodes
                # identical input to different bitstreams from run to run; single-threaded without
                # mbtree it was byte-identical over 25 runs.
                stream.options = {"crf": str(crf), "preset": "medium", "tune": "film" if not gray else "grain",
                                  "x264-params": "threads=1:lookahead-threads=1:no-mbtree=1"}
                stream.codec_context.thread_count = 1
            image = av.VideoFrame.from_ndarray(_to_yuv420p(frame, gray), format="yuv420p")
            for packet in stream.encode(image):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to encode")
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _to_yuv420p(frame: np.ndarray, gray: bool) -> np.ndarray:
    """RGB/gray uint8 → planar yuv420p (BT.601, limited range), as one (H·3/2, W) array.

    Done here rather than by FFmpeg's swscale, whose threaded conversion made identical frames
    encode to different bytes; decoders read untagged streams as BT.601 limited, as written.
    """
    h, w = frame.shape[:2]
    if gray:
        y = 16.0 + frame.astype(np.float32) * (219.0 / 255.0)
        u = v = np.full((h // 2, w // 2), 128.0, np.float32)
    else:
        rgb = frame.astype(np.float32)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        y = 16.0 + 0.256788 * r + 0.504129 * g + 0.097906 * b
        cb = 128.0 - 0.148223 * r - 0.290993 * g + 0.439216 * b
        cr = 128.0 + 0.439216 * r - 0.367788 * g - 0.071427 * b
        u = cb.reshape(h // 2, 2, w // 2, 2).mean((1, 3))
        v = cr.reshape(h // 2, 2, w // 2, 2).mean((1, 3))
    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8) for p in (y, u, v)]
    chroma = np.concatenate([planes[1].ravel(), planes[2].ravel()]).reshape(h // 2, w)
    return np.concatenate([planes[0], chroma], axis=0)


#: Codec options for FFmpeg's stream probe on open. Opening a container with its defaults decodes
#: its first frames to fill in stream details (11 ms a video at 2048 px, 6 ms at 1024); skipping
#: non-key frames ends that probe at once (0.2-0.6 ms; `benchmarks/extract.py`). Size, frame count
#: and rate come from the container header either way, and decoding after the open is not
#: affected (the decoder it uses is set up afresh: the same frames, byte for byte, tested), so
#: every open, the probe's and the decoders', skips that work.
_HEADER_ONLY = {"skip_frame": "nonkey"}


def _open(uri: str | Path):
    """A PyAV container. A local file is opened by path, so FFmpeg reads only what it needs (a
    probe reads the headers, not a capture's gigabytes); a remote one is read whole first."""
    import av

    fs, path = storage.url_to_fs(uri)
    try:
        size = fs.size(path)
    except FileNotFoundError as exc:
        raise FormatError(uri, None, "video file not found") from exc
    if not size:
        raise FormatError(uri, None, "empty file (0 bytes)")
    local = storage.local_path(uri)
    try:
        return av.open(local if local is not None else io.BytesIO(storage.read_bytes(uri)), options=_HEADER_ONLY)
    except av.error.FFmpegError as exc:
        raise FormatError(uri, None, f"unreadable video ({exc})") from exc


def probe_video(uri: str | Path, decode: bool = True) -> VideoInfo:
    """Frame count, size and rate. ``decode=True`` counts by decoding every frame (finds truncated
    files, costs a full decode); ``decode=False`` trusts the container header when it has a count."""
    import av

    with _open(uri) as container:
        if not container.streams.video:
            raise FormatError(uri, None, "no video stream")
        stream = container.streams.video[0]
        if not decode and stream.frames:
            rate = float(stream.average_rate or stream.base_rate or 0)
            width, height = stream.codec_context.width, stream.codec_context.height
            if not width or not height:
                width, height = _first_frame_size(uri)
            return VideoInfo(int(stream.frames), width, height, rate)
        count = 0
        try:
            for _ in container.decode(stream):
                count += 1
        except av.error.FFmpegError as exc:
            raise FormatError(uri, f"frame {count}", f"decode failed ({exc})") from exc
        rate = float(stream.average_rate or stream.base_rate or 0)
        return VideoInfo(count, stream.codec_context.width, stream.codec_context.height, rate)


def _first_frame_size(uri: str | Path) -> tuple[int, int]:
    """Width and height of the first decoded frame. The header-only probe leaves the size at 0x0
    for codecs whose size sits in the bitstream rather than the container (MPEG-4 Part 2, as
    OpenCV's ``mp4v`` writes it): one frame decoded settles it."""
    for frame in decoded_frames(uri, threads=1):
        return frame.width, frame.height
    raise FormatError(uri, "frame 0", "video has no decodable frame")


def decoded_frames(uri: str | Path, threads: int = 0):
    """PyAV ``VideoFrame`` objects of a video's first stream, in order; a decode error becomes a
    FormatError naming the file and the frame index."""
    import av

    with _open(uri) as container:
        if not container.streams.video:
            raise FormatError(uri, None, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if threads:
            stream.codec_context.thread_count = threads
        index = 0
        try:
            for frame in container.decode(stream):
                yield frame
                index += 1
        except av.error.FFmpegError as exc:
            raise FormatError(uri, f"frame {index}", f"decode failed ({exc})") from exc


def reference_frames(uri: str | Path, threads: int = 1) -> Iterator[tuple[int, object]]:
    """(index, PyAV ``VideoFrame``) of the frames other frames reference, in presentation order:
    the decoder skips the rest (FFmpeg's ``skip_frame=NONREF``, typically the non-reference
    B-frames). On the x264 streams of ``benchmarks/extract.py`` that is 53 of 96 frames for ~60 %
    of a full decode's time (measured); a stream without such frames (intra-only, no B-frames)
    decodes whole.

    The index of a decoded frame is its position among all the stream's packets in presentation
    order (packets are demuxed first, which decodes nothing). Where that order is not known (a
    packet without a timestamp, as some AVI files have) every frame is decoded and counted, as
    :func:`decoded_frames` does."""
    import av

    with _open(uri) as container:
        if not container.streams.video:
            raise FormatError(uri, None, "no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        try:
            # the flush packet (size 0) ends the list; discarded packets (an edit list's lead-in)
            # are neither decoded into frames nor counted by a sequential decode
            packets = [p for p in container.demux(stream) if p.size and not p.is_discard]
        except av.error.FFmpegError as exc:
            raise FormatError(uri, None, f"demux failed ({exc})") from exc
        pts = [p.pts for p in packets]
        order = {t: i for i, t in enumerate(sorted(pts))} if None not in pts and len(set(pts)) == len(pts) else None
        if order is not None:
            stream.codec_context.skip_frame = "NONREF"
        count = 0
        try:
            for packet in packets + [None]:  # None: flush the decoder's delayed frames
                for frame in stream.decode(packet):
                    index = order.get(frame.pts) if order is not None else count
                    count += 1
                    if index is not None:
                        yield index, frame
        except av.error.FFmpegError as exc:
            raise FormatError(uri, f"frame {count}", f"decode failed ({exc})") from exc


def read_frames(uri: str | Path, gray: bool = False, backend: str = "pyav", threads: int = 0) -> Iterator[np.ndarray]:
    """Yield decoded frames as RGB (H,W,3) or gray (H,W) uint8. ``backend``: pyav or opencv.

    ``threads``: decoder threads (0 = FFmpeg's choice, all cores). Stages run one worker per core
    and pass 1, so workers do not fight over cores.
    """
    if backend == "opencv":
        yield from _read_frames_opencv(uri, gray, threads)
        return
    for frame in decoded_frames(uri, threads):
        yield frame.to_ndarray(format="gray" if gray else "rgb24")


def _read_frames_opencv(uri: str | Path, gray: bool, threads: int = 0) -> Iterator[np.ndarray]:
    import cv2

    fs, path = storage.url_to_fs(uri)
    if not fs.exists(path):
        raise FormatError(uri, None, "video file not found")
    params = [cv2.CAP_PROP_N_THREADS, threads] if threads else []
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    if not capture.isOpened():
        raise FormatError(uri, None, "OpenCV cannot open this video")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if gray else cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        capture.release()
