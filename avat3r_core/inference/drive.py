"""A built avatar: its cached encoder state, and the pictures and videos people look at.

* :func:`save_encoded` / :func:`load_encoded` — the expression-independent activations of the
  model (``Avat3r.encode``), so driving an avatar with new expressions reruns only the decoder.
  Stored with ``torch.save`` of plain tensors and read back with ``weights_only=True``.
* :func:`view_orbit` — a turntable sweep around the head (yaw ping-pong in front of the face).
* :func:`render_frames`, :func:`animation_frames` — RGB frames through
  :func:`avat3r_core.render.render` (gsplat on CUDA, the numba rasterizer on CPU).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avat3r_core.cameras import Cameras
from avat3r_core.gaussians import Gaussians
from avat3r_core.model.avat3r import EncodedAvatar
from avat3r_core.model.head import PixelSkips
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
def view_orbit(center, radius: float, front, up, frames: int = 24, yaw_deg: float = 45.0, pitch_deg: float = 5.0,
               fov_deg: float = 20.0, size: int = 256, device: torch.device | str = "cpu",
               yaw_values: Sequence[float] | None = None) -> Cameras:
    """A yaw ping-pong around ``center`` in the input cameras' frame (``front``: towards them).

    It follows whatever world frame the inputs live in (a calibrated rig's or the head frame of a
    fit); the model sees only the front, so a full 360° would mostly show the unseen back.
    ``frames=1``: the frontal view. ``yaw_values`` (degrees) replaces the sweep by explicit views.
    """
    center, front, up = (np.asarray(v, np.float64).reshape(3) for v in (center, front, up))
    side = np.cross(up, front)
    if yaw_values is not None:
        yaw = np.deg2rad(np.asarray(yaw_values, np.float64).reshape(-1))
    else:
        t = np.linspace(0.0, 2.0 * np.pi, frames, endpoint=False)
        yaw = np.deg2rad(yaw_deg) * np.sin(t)
    pitch = np.deg2rad(pitch_deg)
    dirs = (np.cos(yaw)[:, None] * front + np.sin(yaw)[:, None] * side) * np.cos(pitch) + np.sin(pitch) * up
    eyes = center + radius * dirs
    return Cameras.look_at(torch.tensor(eyes), torch.tensor(center), up=torch.tensor(up), fov_deg=fov_deg, width=size,
                           height=size, dtype=torch.float32, device=device)


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
        bg = torch.tensor(background, dtype=cams.dtype, device=cams.device).expand(len(cams), 3)
        rgb = render(gaussians, cams, background=bg).rgb
        out.append((rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out, axis=0)


@torch.no_grad()
def animation_frames(model, encoded: EncodedAvatar, codes: Tensor, camera: Cameras, chunk: int = 4,
                     background: tuple[float, float, float] = (1.0, 1.0, 1.0),
                     motion: np.ndarray | None = None) -> np.ndarray:
    """Drive a cached avatar with expression codes (T, D): only the decoder runs per frame.
    ``motion`` (T, 4, 4): per frame, the camera is ``camera.world_to_cam @ motion[t]`` (a head
    motion replayed by a head-frame avatar); frames beyond it keep its last pose."""
    frames = []
    for start in range(0, len(codes), chunk):
        batch = codes[start:start + chunk]
        output = model.decode(encoded.expand(len(batch)), batch)
        for b in range(len(batch)):
            cam = camera
            if motion is not None:
                m = torch.as_tensor(motion[min(start + b, len(motion) - 1)], dtype=camera.world_to_cam.dtype,
                                    device=camera.world_to_cam.device)
                cam = Cameras(camera.world_to_cam @ m, camera.K, camera.width, camera.height)
            frames.append(render_frames(output.gaussians(b), cam, background)[0])
    return np.stack(frames)
