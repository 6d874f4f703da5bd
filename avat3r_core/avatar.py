"""A built avatar: its cached encoder state, and the pictures and videos people look at.

* :func:`save_encoded` / :func:`load_encoded` — the expression-independent activations of the
  model (``Avat3r.encode``), so driving an avatar with new expressions reruns only the decoder.
  Stored with ``torch.save`` of plain tensors and read back with ``weights_only=True``.
* :func:`orbit_cameras` — a turntable sweep around the head (yaw ping-pong in front of the face:
  the model sees only the front, a full 360° would mostly show the unseen back).
* :func:`render_frames`, :func:`turntable_video`, :func:`animation_frames` — RGB frames through
  :func:`avat3r_core.render.render` (gsplat on CUDA, the numba rasterizer on CPU) and H.264 MP4s.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avat3r_core.cameras import Cameras
from avat3r_core.gaussians import Gaussians
from avat3r_core.model.avat3r import EncodedAvatar
from avat3r_core.model.head import PixelSkips
from avat3r_core.video import encode_video
from avat3r_core.weights import safe_torch_load


# --------------------------------------------------------------------------- cache
def encoded_bytes(encoded: EncodedAvatar) -> bytes:
    """Serialise the encoder cache (plain tensors only)."""
    skips = {f.name: getattr(encoded.skips, f.name) for f in dataclasses.fields(PixelSkips)}
    payload = {"tokens": encoded.tokens.detach().cpu(), "valid": encoded.valid.detach().cpu(),
               "skips": {k: (v.detach().cpu() if v is not None else None) for k, v in skips.items()}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_encoded(path: str | Path, device: str | torch.device = "cpu") -> EncodedAvatar:
    """Read a cache written by :func:`encoded_bytes` (weights-only: no code is unpickled)."""
    payload = safe_torch_load(path, map_location=device)
    skips = PixelSkips(**payload["skips"])
    return EncodedAvatar(payload["tokens"], skips, payload["valid"])


# --------------------------------------------------------------------------- cameras
def orbit_cameras(center: Tensor | np.ndarray, radius: float, frames: int = 48, yaw_deg: float = 60.0,
                  pitch_deg: float = 5.0, fov_deg: float = 20.0, size: int = 256) -> Cameras:
    """``frames`` cameras sweeping yaw ±``yaw_deg`` and back around ``center`` (y up, face +z)."""
    t = np.linspace(0.0, 2.0 * np.pi, frames, endpoint=False)
    yaw = np.deg2rad(yaw_deg) * np.sin(t)
    pitch = np.deg2rad(pitch_deg)
    offsets = np.stack([np.sin(yaw) * np.cos(pitch), np.full_like(yaw, np.sin(pitch)), np.cos(yaw) * np.cos(pitch)], 1)
    center = np.asarray(center, dtype=np.float64).reshape(3)
    return Cameras.look_at(torch.tensor(center + radius * offsets), torch.tensor(center), fov_deg=fov_deg,
                           width=size, height=size, dtype=torch.float32)


# --------------------------------------------------------------------------- pictures
@torch.no_grad()
def render_frames(gaussians: Gaussians, cameras: Cameras, background: tuple[float, float, float] = (1.0, 1.0, 1.0),
                  chunk: int = 8) -> np.ndarray:
    """(N, H, W, 3) uint8 frames of ``gaussians`` seen by each camera."""
    from avat3r_core.render import render

    gaussians = gaussians.to(cameras.device, cameras.dtype)
    out = []
    for start in range(0, len(cameras), chunk):
        cams = cameras[start:start + chunk]
        bg = torch.tensor(background, dtype=cams.dtype).expand(len(cams), 3)
        rgb = render(gaussians, cams, background=bg).rgb
        out.append((rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out, axis=0)


def turntable_video(gaussians: Gaussians, center, radius: float, frames: int = 48, size: int = 256,
                    fps: float = 24.0) -> bytes:
    """An MP4 sweeping around the avatar."""
    images = render_frames(gaussians, orbit_cameras(center, radius, frames=frames, size=size))
    return encode_video(list(images), fps=fps)


@torch.no_grad()
def animation_frames(model, encoded: EncodedAvatar, codes: Tensor, camera: Cameras, chunk: int = 4,
                     background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Drive a cached avatar with expression codes (T, D): only the decoder runs per frame."""
    frames = []
    for start in range(0, len(codes), chunk):
        batch = codes[start:start + chunk]
        output = model.decode(encoded.expand(len(batch)), batch)
        for b in range(len(batch)):
            frames.append(render_frames(output.gaussians(b), camera, background)[0])
    return np.stack(frames)


def grid(images: list[np.ndarray], columns: int) -> np.ndarray:
    """Tile equally sized images (H, W, 3) into one picture, white where the grid is short."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return canvas
