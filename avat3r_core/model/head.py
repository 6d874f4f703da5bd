"""Upsampler and Gaussian head: tokens → one Gaussian per input pixel.

Upsampler (unpublished; our design): ``Linear(D → p²·C_up)`` per token, pixel-shuffle to the input
resolution → ``(C_up, H, W)``; concatenate the input RGB (``2·rgb − 1``) so high-frequency colour
is available at full resolution; ``refine_layers`` × (3×3 conv + GELU) of width ``refine_dim``;
a 1×1 output conv to 14 raw channels per pixel:

=======  ==========================  =================================================
chans    raw                         activated
=======  ==========================  =================================================
0–2      position offset ``o``       ``mean = position_map + offset_scale·o``  (skip)
3–5      log-scale residual ``s``    ``log_scale = log(scale_footprint·z/f) + s``
6–9      quaternion residual ``q``   ``quat = normalize(q + (1, 0, 0, 0))``
10–12    colour residual ``c``       ``colour = rgb + c``  (skip; ``0.5 + c`` without)
13       opacity residual ``a``      ``opacity_logit = logit(init_opacity) + a``
=======  ==========================  =================================================

The constant terms are added *outside* the output layer, so a zero output layer gives exactly:
offsets 0 (means = position map), colours = input RGB, identity rotations, opacity =
``init_opacity`` (0.9) and an isotropic scale of ``scale_footprint`` (1) pixel footprint, i.e.
``z/f`` with ``z`` the camera depth of the position-map point and ``f`` the mean focal length in
pixels. The output layer is initialised with std ``head_init_std`` (0.02, like every other layer; not
zero, so that every parameter gets a gradient from the first step, and not 1e-3, under which the rest of
the network's changes barely reached the Gaussians: 0.5 dB lower held-out PSNR on the demo); its bias is
zero.

Without the position skip (``position_skip=False``) or without the position map
(``use_position_map=False``), the mean is ``camera centre + t · ray`` with the unit pixel ray and
the distance ``t = init_depth · exp(offset_scale · o₂ / init_depth)`` (≈ ``init_depth +
offset_scale·o₂`` near init, always positive); channels 0–1 are then unused. Without the position
map the footprint depth is ``init_depth`` too.

Colours are not clamped (the renderer clamps at 0, as :attr:`Gaussians.colors` does) so the
residual keeps its gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avat3r_core.model.config import NUM_GAUSSIAN_CHANNELS, Avat3rConfig

__all__ = ["PixelSkips", "GaussianHead", "OFFSET", "LOG_SCALE", "QUAT", "COLOR", "OPACITY"]

OFFSET, LOG_SCALE, QUAT, COLOR, OPACITY = slice(0, 3), slice(3, 6), slice(6, 10), slice(10, 13), slice(13, 14)


@dataclass
class PixelSkips:
    """Per-pixel tensors the head needs besides the tokens (N = B·V views, channels last).

    ``rgb`` (N, 3, H, W) in [0, 1]; ``base_means`` (N, H, W, 3) the position map (None when the
    mean comes from rays); ``ray_origins``/``ray_dirs`` (N, H, W, 3) (None when the position skip is
    used); ``log_scale_base`` (N, H, W, 1).
    """

    rgb: Tensor
    base_means: Tensor | None
    ray_origins: Tensor | None
    ray_dirs: Tensor | None
    log_scale_base: Tensor


class GaussianHead(nn.Module):
    def __init__(self, config: Avat3rConfig):
        super().__init__()
        self.config = c = config
        self.linear = nn.Linear(c.dim, c.patch_size**2 * c.upsample_dim)
        refine = []
        width = c.upsample_dim + 3
        for _ in range(c.refine_layers):
            refine.append(nn.Conv2d(width, c.refine_dim, kernel_size=3, padding=1))
            width = c.refine_dim
        self.refine = nn.ModuleList(refine)
        self.out = nn.Conv2d(width, NUM_GAUSSIAN_CHANNELS, kernel_size=1)
        self.reset_output(c.head_init_std)

    @torch.no_grad()
    def reset_output(self, std: float) -> None:
        """(Re)initialise the output layer: weights ~ N(0, std²) (zeros for std = 0), bias 0."""
        if std > 0:
            nn.init.normal_(self.out.weight, std=std)
        else:
            nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def upsample(self, tokens: Tensor, rgb: Tensor) -> Tensor:
        """``tokens`` (N, T, D), ``rgb`` (N, 3, H, W) → raw per-pixel outputs (N, 14, H, W)."""
        p = self.config.patch_size
        n, _, h, w = rgb.shape
        gh, gw = h // p, w // p
        x = self.linear(tokens).transpose(1, 2).reshape(n, -1, gh, gw)
        x = F.pixel_shuffle(x, p)  # (N, C_up, H, W)
        x = torch.cat([x, rgb * 2 - 1], dim=1)
        for conv in self.refine:
            x = F.gelu(conv(x))
        return self.out(x)

    def forward(self, tokens: Tensor, skips: PixelSkips) -> dict[str, Tensor]:
        """Activated per-pixel Gaussian maps, channels last: (N, H, W, ·)."""
        c = self.config
        raw = self.upsample(tokens, skips.rgb).permute(0, 2, 3, 1)  # (N, H, W, 14)
        offset = raw[..., OFFSET] * c.offset_scale
        if skips.base_means is not None:
            means = skips.base_means + offset
        else:
            t = c.init_depth * torch.exp(offset[..., 2:3] / c.init_depth)
            means = skips.ray_origins + t * skips.ray_dirs
        log_scales = skips.log_scale_base + raw[..., LOG_SCALE]
        identity = raw.new_tensor([1.0, 0.0, 0.0, 0.0])
        quats = F.normalize(raw[..., QUAT] + identity, dim=-1)
        rgb = skips.rgb.permute(0, 2, 3, 1)
        colors = (rgb if c.color_skip else 0.5) + raw[..., COLOR]
        opacity_logits = raw[..., 13] + math.log(c.init_opacity / (1 - c.init_opacity))
        return {"means": means, "quats": quats, "log_scales": log_scales,
                "opacity_logits": opacity_logits, "colors": colors}
