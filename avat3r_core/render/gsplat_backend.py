"""CUDA path: gsplat 1.5.3's fused rasterizer in "RGB+ED" mode (non-packed)."""

from __future__ import annotations

from torch import Tensor


def rasterize_gsplat(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor,
                     colors: Tensor, viewmats: Tensor, Ks: Tensor, width: int, height: int,
                     backgrounds: Tensor | None, near_plane: float, far_plane: float,
                     eps2d: float, tile_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """colors (N,3) or (C,N,3); returns (rgb (C,H,W,3), alpha (C,H,W,1), expected depth (C,H,W,1))."""
    if not means.is_cuda:
        raise ValueError("means: the gsplat backend needs CUDA tensors (use backend='cpu')")
    from gsplat import rasterization

    render_colors, render_alphas, _ = rasterization(
        means, quats, scales, opacities, colors, viewmats, Ks, int(width), int(height),
        near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=None,
        packed=False, tile_size=int(tile_size), backgrounds=backgrounds,
        render_mode="RGB+ED", rasterize_mode="classic", camera_model="pinhole",
    )
    return render_colors[..., :3], render_alphas, render_colors[..., 3:4]
