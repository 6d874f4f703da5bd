"""Tokenizer: per-view pixels (+ low-resolution features) → patch tokens of width D.

Per view the per-pixel channels ``[RGB·2−1 (3), position map (3), Plücker (6)]`` are concatenated
and patchified by a conv with kernel = stride = patch size. Design choices (the paper is silent):

* RGB enters as ``2·rgb − 1``; position maps and Plücker rays enter unscaled (the data pipeline
  normalises the world frame; the synthetic studio is metric with the head at the origin).
  The confidence map is *not* an input channel (the published channel list has none); it only
  selects which Gaussians are kept.
* Features ``(Cf, h, w)`` are assumed to cover the same image extent as the RGB crop. They are
  bilinearly resampled with ``grid_sample`` at the *token centres* (``align_corners=False``, so a
  feature map that already has the token grid's size is reproduced exactly), normalised with a
  LayerNorm over channels (Sapiens activations are large), projected by a Linear ``Cf → D`` and
  **added** to the patch tokens.
* Positional embedding: one learned embedding per patch position, shared by all views (bicubically
  resized when the token grid differs from the configured one). There is deliberately **no**
  per-view embedding: the Plücker rays already tell views apart, and without one the network is
  equivariant to the order of the input views and runs with any number of views (e.g. 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avat3r_core.model.config import NUM_INPUT_CHANNELS, Avat3rConfig

__all__ = ["Tokenizer", "token_centre_grid", "resample_features"]


def token_centre_grid(gh: int, gw: int, device=None, dtype=torch.float32) -> Tensor:
    """(1, gh, gw, 2) normalised ``grid_sample`` coordinates (x, y) of the token centres."""
    ys = (torch.arange(gh, device=device, dtype=dtype) + 0.5) / gh * 2 - 1
    xs = (torch.arange(gw, device=device, dtype=dtype) + 0.5) / gw * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1).unsqueeze(0)


def resample_features(features: Tensor, gh: int, gw: int) -> Tensor:
    """Bilinearly sample (N, Cf, h, w) features at the centres of a gh × gw token grid → (N, Cf, gh, gw)."""
    grid = token_centre_grid(gh, gw, features.device, features.dtype).expand(features.shape[0], -1, -1, -1)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Tokenizer(nn.Module):
    def __init__(self, config: Avat3rConfig):
        super().__init__()
        self.config = config
        p, d = config.patch_size, config.dim
        self.patch_embed = nn.Conv2d(NUM_INPUT_CHANNELS, d, kernel_size=p, stride=p)
        g = config.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, d, g, g))
        if config.features_enabled:
            self.feature_norm = nn.LayerNorm(config.feature_dim)
            self.feature_proj = nn.Linear(config.feature_dim, d)
        else:
            self.feature_norm = None
            self.feature_proj = None

    def positional(self, gh: int, gw: int) -> Tensor:
        pe = self.pos_embed
        if pe.shape[-2:] != (gh, gw):
            pe = F.interpolate(pe, size=(gh, gw), mode="bicubic", align_corners=False)
        return pe.flatten(2).transpose(1, 2)  # (1, gh·gw, D)

    def forward(self, pixels: Tensor, features: Tensor | None = None) -> Tensor:
        """``pixels`` (N, 12, H, W) with N = B·V; ``features`` (N, Cf, h, w) or None → (N, T, D)."""
        p = self.config.patch_size
        n, c, h, w = pixels.shape
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        tokens = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (N, T, D)
        if self.feature_proj is not None:
            if features is None:
                raise ValueError("the model was built with use_features=True and feature_dim > 0: pass features")
            if features.shape[1] != self.config.feature_dim:
                raise ValueError(f"features have {features.shape[1]} channels, config.feature_dim is "
                                 f"{self.config.feature_dim}")
            f = resample_features(features.to(tokens.dtype), gh, gw).flatten(2).transpose(1, 2)
            tokens = tokens + self.feature_proj(self.feature_norm(f))
        return tokens + self.positional(gh, gw)
