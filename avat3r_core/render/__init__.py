"""Differentiable 3D Gaussian splatting, batched over cameras, following gsplat 1.5.3's conventions.

Backends: ``"cpu"`` (torch projection + numba tile rasterizer, see :mod:`.cpu`), ``"gsplat"``
(CUDA, gsplat's fused kernels), ``"reference"`` (dense pure torch, tests only); ``"auto"`` picks
``"gsplat"`` for CUDA tensors and ``"cpu"`` otherwise.

Outputs: ``rgb`` composited front to back over ``backgrounds`` (``rgb += T_final * bg``),
``alpha = 1 - T_final``, ``depth`` the expected camera-space z (accumulated depth / max(alpha,
1e-10), gsplat's "RGB+ED").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .projection import project_gaussians
from .sh import SH_C0, eval_sh

__all__ = ["RenderOutput", "rasterize", "render", "BACKENDS"]

BACKENDS = ("auto", "cpu", "gsplat", "reference")


@dataclass
class RenderOutput:
    rgb: Tensor  # (C, H, W, 3)
    alpha: Tensor  # (C, H, W, 1)
    depth: Tensor  # (C, H, W, 1) expected depth


def _check_shape(name: str, t: Any, shape: tuple) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")


def _validate(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
              backgrounds, tile_size):
    _check_shape("means", means, (None, 3))
    n = means.shape[0]
    _check_shape("quats", quats, (n, 4))
    _check_shape("scales", scales, (n, 3))
    _check_shape("opacities", opacities, (n,))
    _check_shape("viewmats", viewmats, (None, 4, 4))
    c = viewmats.shape[0]
    _check_shape("Ks", Ks, (c, 3, 3))
    if isinstance(colors, Tensor) and colors.dim() == 3:
        _check_shape("colors", colors, (c, n, 3))
    else:
        _check_shape("colors", colors, (n, 3))
    if backgrounds is not None:
        _check_shape("backgrounds", backgrounds, (c, 3))
    for name, v in (("width", width), ("height", height), ("tile_size", tile_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    devices = {t.device for t in (means, quats, scales, opacities, colors, viewmats, Ks)}
    if backgrounds is not None:
        devices.add(backgrounds.device)
    if len(devices) != 1:
        raise ValueError(f"means: all inputs must be on one device, got {sorted(map(str, devices))}")


def rasterize(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
              viewmats: Tensor, Ks: Tensor, width: int, height: int,
              backgrounds: Tensor | None = None, near_plane: float = 0.01,
              far_plane: float = 1e10, eps2d: float = 0.3, tile_size: int = 16,
              backend: str = "auto") -> RenderOutput:
    """Render N Gaussians into C cameras.

    means (N,3) world; quats (N,4) wxyz (normalised internally); scales (N,3) activated;
    opacities (N,) in [0,1]; colors (N,3) or (C,N,3); viewmats (C,4,4) world-to-camera (OpenCV);
    Ks (C,3,3); backgrounds (C,3) or None (black).
    """
    _validate(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
              backgrounds, tile_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "cpu"
    n_cam = viewmats.shape[0]
    if backend == "gsplat":
        from .gsplat_backend import rasterize_gsplat

        rgb, alpha, depth = rasterize_gsplat(means, quats, scales, opacities, colors, viewmats,
                                             Ks, width, height, backgrounds, near_plane,
                                             far_plane, eps2d, tile_size)
        return RenderOutput(rgb, alpha, depth)

    dtype = means.dtype
    colors_c = colors if colors.dim() == 3 else colors[None].expand(n_cam, -1, -1)
    bg = backgrounds if backgrounds is not None else torch.zeros(
        (n_cam, 3), dtype=dtype, device=means.device)

    if backend == "reference":
        from .reference import rasterize_reference

        rgb, alpha, depth = rasterize_reference(means, quats, scales, opacities, colors_c,
                                                viewmats, Ks, width, height, bg,
                                                near_plane, far_plane, eps2d)
        return RenderOutput(rgb, alpha, depth)

    if means.is_cuda:
        raise ValueError("means: the cpu backend needs CPU tensors (use backend='gsplat')")
    from .cpu import rasterize_projected

    proj = project_gaussians(means, quats, scales, opacities, viewmats, Ks, width, height,
                             near_plane, far_plane, eps2d)
    feats = torch.cat([colors_c.to(dtype), proj.depths[..., None]], dim=-1).contiguous()
    opac_c = opacities[None].expand(n_cam, -1)
    bg_ext = torch.cat([bg.to(dtype), torch.zeros_like(bg[:, :1]).to(dtype)], dim=-1)
    out, alpha = rasterize_projected(proj.means2d, proj.conics, proj.depths, proj.radii, feats,
                                     opac_c, bg_ext, width, height, tile_size)
    depth = out[..., 3:4] / alpha.clamp(min=1e-10)
    return RenderOutput(out[..., :3], alpha, depth)


def camera_centers(world_to_cam: Tensor) -> Tensor:
    """(C,4,4) rigid world-to-camera -> (C,3) camera centres in world space (-R^T t)."""
    rot = world_to_cam[:, :3, :3]
    t = world_to_cam[:, :3, 3]
    return -torch.einsum("cji,cj->ci", rot, t)


def view_colors(means: Tensor, sh: Tensor, degree: int, world_to_cam: Tensor) -> Tensor:
    """Per-view colours: (N,3) for degree 0, (C,N,3) otherwise; ``clamp_min(SH + 0.5, 0)``."""
    if degree == 0:
        return torch.clamp_min(SH_C0 * sh[:, 0, :] + 0.5, 0.0)
    dirs = means[None, :, :] - camera_centers(world_to_cam)[:, None, :]  # (C, N, 3)
    return torch.clamp_min(eval_sh(degree, dirs, sh[None]) + 0.5, 0.0)


def render(gaussians: Any, cameras: Any, background: Tensor | None = None, backend: str = "auto",
           sh_degree: int | None = None) -> RenderOutput:
    """Render duck-typed ``gaussians`` (.means, .quats, .scales, .opacities, .sh, .sh_degree)
    into duck-typed ``cameras`` (.world_to_cam, .K, .width, .height).

    ``background``: (3,) or (C,3) or None (black). ``sh_degree`` defaults to the Gaussians' own;
    a lower degree uses only the first bands.
    """
    sh = gaussians.sh
    degree = int(gaussians.sh_degree if sh_degree is None else sh_degree)
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree: expected 0..3, got {degree}")
    if not isinstance(sh, Tensor) or sh.dim() != 3 or sh.shape[-1] != 3 or sh.shape[1] < (degree + 1) ** 2:
        raise ValueError(f"sh: expected shape (N, >= {(degree + 1) ** 2}, 3), got "
                         f"{tuple(sh.shape) if isinstance(sh, Tensor) else type(sh).__name__}")
    w2c = cameras.world_to_cam
    means = gaussians.means
    w2c = w2c.to(device=means.device, dtype=means.dtype)
    Ks = cameras.K.to(device=means.device, dtype=means.dtype)
    colors = view_colors(means, sh, degree, w2c)
    if background is not None:
        background = background.to(device=means.device, dtype=means.dtype)
        if background.dim() == 1:
            background = background[None].expand(w2c.shape[0], -1)
    return rasterize(means, gaussians.quats, gaussians.scales, gaussians.opacities, colors,
                     w2c, Ks, int(cameras.width), int(cameras.height), backgrounds=background,
                     backend=backend)
