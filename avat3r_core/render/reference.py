"""Dense, slow, obviously-correct reference rasterizer (pure torch, autograd backward). Tests only.

Projection comes from gsplat's own pure-torch helpers; every Gaussian is evaluated at every pixel
and composited in depth order with gsplat's skip/clamp/stop rules expressed as masks + cumprod.
"""

from __future__ import annotations

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0


def rasterize_reference(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                        colors: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int,
                        backgrounds: Tensor, near_plane: float = 0.01, far_plane: float = 1e10,
                        eps2d: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """colors (C,N,D), backgrounds (C,D) -> (rgb-like (C,H,W,D), alpha (C,H,W,1), depth (C,H,W,1))."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    _, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d,
        near_plane=near_plane, far_plane=far_plane)
    valid = (depths > near_plane) & (depths < far_plane)  # (C, N)

    dtype, device = means.dtype, means.device
    ys, xs = torch.meshgrid(torch.arange(height, dtype=dtype, device=device) + 0.5,
                            torch.arange(width, dtype=dtype, device=device) + 0.5, indexing="ij")
    dx = means2d[..., 0, None, None] - xs  # (C, N, H, W)
    dy = means2d[..., 1, None, None] - ys
    a, b, c = (conics[..., i, None, None] for i in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    raw = opacities[None, :, None, None] * torch.exp(-sigma)
    alpha = torch.clamp(raw, max=0.999)
    ok = valid[..., None, None] & (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
    alpha = torch.where(ok, alpha, torch.zeros_like(alpha))

    key = torch.where(valid, depths.detach(), torch.full_like(depths, float("inf")))
    order = torch.argsort(key, dim=1, stable=True)  # (C, N)
    alpha = torch.gather(alpha, 1, order[..., None, None].expand_as(alpha))
    feats = torch.cat([colors, depths[..., None]], dim=-1)  # (C, N, D+1)
    feats = torch.gather(feats, 1, order[..., None].expand_as(feats))

    t_incl = torch.cumprod(1.0 - alpha, dim=1)
    included = t_incl > 1e-4  # prefix property: T only decreases
    alpha = torch.where(included, alpha, torch.zeros_like(alpha))
    one_minus = 1.0 - alpha
    t_excl = torch.cumprod(torch.cat([torch.ones_like(one_minus[:, :1]), one_minus[:, :-1]], 1), 1)
    weights = alpha * t_excl  # (C, N, H, W)
    t_final = torch.prod(one_minus, dim=1)  # (C, H, W)
    out = torch.einsum("cnhw,cnd->chwd", weights, feats)
    bg = torch.cat([backgrounds, torch.zeros_like(backgrounds[:, :1])], dim=-1)
    out = out + t_final[..., None] * bg[:, None, None, :]
    alpha_img = (1.0 - t_final)[..., None]
    depth = out[..., -1:] / alpha_img.clamp(min=1e-10)
    return out[..., :-1], alpha_img, depth
