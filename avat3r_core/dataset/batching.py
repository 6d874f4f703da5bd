"""Batching: decoded Avat3r items (from :func:`avat3r_core.dataset.loader.decode_item`) → one
:class:`~avat3r_core.batch.Avat3rBatch`.

:func:`collate` lays every item out into float32 batch arrays in one pass (widen, scale, planar).
:class:`PackedBatch` is the same batch as it crosses from a DataLoader worker to the main process:
all of it in one shared-memory buffer, unpacked into views there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from avat3r_core.batch import Avat3rBatch
from avat3r_core.cameras import Cameras


def to_float32(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``src`` widened to float32 (into ``out`` when given, same shape).

    float16 maps go through OpenCV's vectorised conversion (numpy's float16 cast is scalar code,
    measured 1.7-2.5x slower); values are identical. ``benchmarks/loader.py``'s raw loop uses this too.
    """
    if out is None:
        out = np.empty(src.shape, np.float32)
    if src.dtype == np.float16 and src.size and src.ndim and src.flags.c_contiguous and out.flags.c_contiguous:
        import cv2

        flat = src.reshape(src.shape[0], -1)
        cv2.multiply(flat, 1.0, dst=out.reshape(flat.shape), dtype=cv2.CV_32F)
    else:
        out[...] = src
    return out


_INV255 = np.float32(1.0 / 255.0)


_ALIGN = 64  # bytes; every field of a packed batch starts on a cache line


def _batch_layout(items: list[dict[str, Any]]) -> tuple[list[tuple[str, tuple[int, ...], Any]], int]:
    """(name, shape, dtype) of every array field of the batch of ``items``, and T."""
    B = len(items)
    first = items[0]
    V, _, H, W = first["images"].shape
    T = min(it["target_images"].shape[0] for it in items)
    f32 = np.float32
    layout = [
        ("images", (B, V, 3, H, W), f32), ("alphas", (B, V, 1, H, W), f32),
        ("world_to_cam", (B * V, 4, 4), f32), ("K", (B * V, 3, 3), f32),
        ("position_maps", (B, V, 3, H, W), f32), ("confidence", (B, V, H, W), f32),
        ("target_images", (B, T, 3, H, W), f32), ("target_alphas", (B, T, 1, H, W), f32),
        ("target_world_to_cam", (B * T, 4, 4), f32), ("target_K", (B * T, 3, 3), f32),
        ("target_head_to_world", (B, 4, 4), f32), ("input_head_to_world", (B, V, 4, 4), f32),
        ("expression", (B,) + first["expression"].shape, f32),
        ("input_expressions", (B, V) + first["expression"].shape, f32),
        ("input_frames", (B, V), np.int64), ("target_frames", (B,), np.int64),
    ]
    if all(it["features"] is not None for it in items):
        layout.append(("features", (B, V) + first["features"][0].shape, f32))
    return layout, T


def _fill(arrays: dict[str, np.ndarray], items: list[dict[str, Any]], T: int) -> None:
    """Write every item's fields into the batch arrays: widen, scale and lay out in one pass each."""
    for b, it in enumerate(items):
        V = it["images"].shape[0]
        np.multiply(it["images"], _INV255, out=arrays["images"][b])
        np.multiply(it["alphas"][:, None], _INV255, out=arrays["alphas"][b])
        np.multiply(it["target_images"][:T], _INV255, out=arrays["target_images"][b])
        np.multiply(it["target_alphas"][:T, None], _INV255, out=arrays["target_alphas"][b])
        for v in range(V):
            for ch, plane in enumerate(_split(it["position_maps"][v])):  # (H, W, 3) → (3, H, W)
                to_float32(plane, arrays["position_maps"][b, v, ch])
            to_float32(it["confidence"][v], arrays["confidence"][b, v])
            if "features" in arrays:
                to_float32(it["features"][v], arrays["features"][b, v])
        arrays["world_to_cam"][b * V:(b + 1) * V] = it["world_to_cam"]
        arrays["K"][b * V:(b + 1) * V] = it["K"]
        arrays["target_world_to_cam"][b * T:(b + 1) * T] = it["target_world_to_cam"][:T]
        arrays["target_K"][b * T:(b + 1) * T] = it["target_K"][:T]
        arrays["target_head_to_world"][b] = it["target_head_to_world"]
        arrays["input_head_to_world"][b] = it["input_head_to_world"]
        arrays["expression"][b] = it["expression"]
        arrays["input_expressions"][b] = it["input_expressions"]
        arrays["input_frames"][b] = it["input_frames"]
        arrays["target_frames"][b] = it["target_frame"]


def _split(hwc: np.ndarray) -> list[np.ndarray]:
    """Channel planes of an (H, W, C) array, each contiguous."""
    if hwc.dtype in (np.float16, np.float32) and hwc.flags.c_contiguous and hwc.shape[2] <= 4:
        import cv2

        return list(cv2.split(hwc))
    return [np.ascontiguousarray(hwc[..., c]) for c in range(hwc.shape[2])]


def _check(items: list[dict[str, Any]]) -> tuple[int, int]:
    if not items:
        raise ValueError("collate needs at least one item")
    sizes = {(it["width"], it["height"]) for it in items}
    if len(sizes) != 1:
        raise ValueError(f"items of one batch have different image sizes {sorted(sizes)}")
    (width, height), = sizes
    return width, height


def _to_batch(arrays: dict[str, np.ndarray], keys: list[str], width: int, height: int) -> Avat3rBatch:
    t = torch.from_numpy
    return Avat3rBatch(
        images=t(arrays["images"]), alphas=t(arrays["alphas"]),
        cameras=Cameras(t(arrays["world_to_cam"]), t(arrays["K"]), width, height),
        position_maps=t(arrays["position_maps"]), confidence=t(arrays["confidence"]),
        features=t(arrays["features"]) if "features" in arrays else None,
        target_images=t(arrays["target_images"]), target_alphas=t(arrays["target_alphas"]),
        target_cameras=Cameras(t(arrays["target_world_to_cam"]), t(arrays["target_K"]), width, height),
        expression=t(arrays["expression"]), keys=keys, target_head_to_world=t(arrays["target_head_to_world"]),
        input_head_to_world=t(arrays["input_head_to_world"]), input_expressions=t(arrays["input_expressions"]),
        input_frames=t(arrays["input_frames"]), target_frames=t(arrays["target_frames"]),
    )


def collate(items: list[dict[str, Any]]) -> Avat3rBatch:
    """Stack decoded items into an :class:`Avat3rBatch` (T is the smallest target count in the batch)."""
    width, height = _check(items)
    layout, T = _batch_layout(items)
    arrays = {name: np.empty(shape, dtype) for name, shape, dtype in layout}
    _fill(arrays, items, T)
    return _to_batch(arrays, [it["key"] for it in items], width, height)


class PackedBatch:
    """A batch as it crosses from a DataLoader worker to the main process: every array lives in
    one shared-memory buffer (written in place by the worker, so pickling copies nothing), and
    one tensor is sent instead of fourteen (each costs a file descriptor and a mapping to
    receive; measured ~2.5 ms vs ~1 ms of main-process time per item). The main process
    unpacks it into an :class:`Avat3rBatch` of views (:meth:`unpack`)."""

    def __init__(self, items: list[dict[str, Any]]):
        width, height = _check(items)
        layout, T = _batch_layout(items)
        self.spec, offset = [], 0
        for name, shape, dtype in layout:
            self.spec.append((name, shape, np.dtype(dtype).str, offset))
            offset += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
        # allocated in shared memory directly (share_memory_() on a fresh tensor would allocate,
        # then copy into a second buffer: twice the page faults), as torch's default_collate does
        self.buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(offset))
        _fill(self._arrays(), items, T)
        self.keys, self.width, self.height = [it["key"] for it in items], width, height

    def _arrays(self) -> dict[str, np.ndarray]:
        raw = self.buffer.numpy()
        return {name: raw[off:off + int(np.prod(shape)) * np.dtype(dt).itemsize].view(dt).reshape(shape)
                for name, shape, dt, off in self.spec}

    def unpack(self) -> Avat3rBatch:
        return _to_batch(self._arrays(), self.keys, self.width, self.height)


def collate_packed(items: list[dict[str, Any]]) -> PackedBatch:
    return PackedBatch(items)
