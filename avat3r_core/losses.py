"""Training loss of Avat3r and the image-similarity functions it is made of.

Published loss (Avat3r, §Training): ``0.8·L1 + 0.2·(1 − SSIM) + 0.01·LPIPS``, LPIPS switched on
late (after 3 M of 3.5 M steps). :class:`Avat3rLoss` implements it; LPIPS is off by default and
needs user-supplied weight files (:mod:`avat3r_core.lpips`). When LPIPS is requested but the files
are absent the loss runs without it and says so in :attr:`Avat3rLoss.lpips_status` — a training
report must print that line, because the result is then a different (L1 + SSIM only) objective.

Conventions
-----------
* Images are float (B, 3, H, W) in [0, ``data_range``]; every function also takes channels-last
  (B, H, W, 3) with ``channels_last=True`` (the renderer's layout).
* ``mask`` (optional) is a per-pixel weight ≥ 0 (a matte in [0, 1], or training's loss weights
  that raise the mouth): (B, 1, H, W), (B, H, W) or (B, 3, H, W)
  (channels-last: (B, H, W, 1), (B, H, W) or (B, H, W, 3)). Reductions become weighted means; an
  all-zero mask gives 0 (never NaN).
* :func:`ssim`: Gaussian window (``window_size`` 11, ``sigma`` 1.5, normalised to sum 1), constants
  ``C1 = (0.01·L)²``, ``C2 = (0.03·L)²``, biased (population) local variances — Wang et al. 2004.
  ``padding="same"`` (default) zero-pads by ``window_size // 2`` exactly like the 3DGS training code
  (``conv2d(..., padding=window_size // 2)``), so the map has the image's size and the borders see
  zeros; ``padding="valid"`` filters only where the window fits (map (H-10, W-10)), which equals
  the reference metric definition (and scikit-image's ``structural_similarity`` with
  ``gaussian_weights=True, use_sample_covariance=False``, whose border crop removes the padded
  part). The training loss uses "same"; :func:`avat3r_core.metrics.ssim` defaults to "valid".
  The filter is separable (two 1-D passes), which is the same linear operation as the 2-D window.
* :func:`psnr`: ``10·log10(L² / MSE)`` per image; identical images give ``+inf`` unless
  ``max_db`` caps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avat3r_core.lpips import LPIPS, try_load_lpips

__all__ = [
    "Avat3rLoss",
    "LossConfig",
    "composite",
    "gaussian_window",
    "l1",
    "psnr",
    "ssim",
    "ssim_map",
    "to_channels_first",
]


# ----------------------------------------------------------------------------------- helpers
def to_channels_first(img: Tensor) -> Tensor:
    """(B, H, W, C) → (B, C, H, W)."""
    if img.dim() != 4:
        raise ValueError(f"expected a (B, H, W, C) tensor, got shape {tuple(img.shape)}")
    return img.permute(0, 3, 1, 2)


def _images(img1: Tensor, img2: Tensor, channels_last: bool) -> tuple[Tensor, Tensor]:
    if channels_last:
        img1, img2 = to_channels_first(img1), to_channels_first(img2)
    if img1.dim() != 4 or img1.shape != img2.shape:
        raise ValueError(f"expected two (B, C, H, W) images of one shape, got {tuple(img1.shape)} and {tuple(img2.shape)}")
    dtype = torch.promote_types(torch.promote_types(img1.dtype, img2.dtype), torch.float32)
    return img1.to(dtype), img2.to(dtype)


def _mask(mask: Tensor | None, like: Tensor, channels_last: bool) -> Tensor | None:
    """Bring ``mask`` to (B, 1 or C, H, W) float, matching channels-first ``like``."""
    if mask is None:
        return None
    b, c, h, w = like.shape
    m = mask.to(like.dtype)
    if m.dim() == 3:
        m = m.unsqueeze(1)
    elif m.dim() == 4 and channels_last:
        m = m.permute(0, 3, 1, 2)
    if m.dim() != 4 or m.shape[0] != b or m.shape[2:] != (h, w) or m.shape[1] not in (1, c):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit images of shape {(b, c, h, w)} "
                         f"({'channels-last' if channels_last else 'channels-first'})")
    return m


def _weighted_mean(x: Tensor, m: Tensor | None) -> Tensor:
    """Per-image mean of (B, C, H, W) ``x``, weighted by ``m`` (B, 1|C, H, W) when given → (B,)."""
    if m is None:
        return x.flatten(1).mean(dim=1)
    m = m.expand_as(x)
    return (x * m).flatten(1).sum(dim=1) / m.flatten(1).sum(dim=1).clamp_min(1e-12)


# ----------------------------------------------------------------------------------- SSIM
def gaussian_window(window_size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> Tensor:
    """1-D Gaussian taps ``exp(-(i - w//2)² / 2σ²)`` normalised to sum 1; the 2-D window is its outer product."""
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    x = torch.arange(window_size, dtype=torch.float64) - window_size // 2
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def _filter(x: Tensor, g: Tensor, padding: str) -> Tensor:
    """Depthwise separable Gaussian filter of (B, K, H, W) ``x``; zero padding for "same"."""
    k = x.shape[1]
    ws = g.numel()
    pad = ws // 2 if padding == "same" else 0
    x = F.conv2d(x, g.view(1, 1, 1, ws).expand(k, 1, 1, ws), padding=(0, pad), groups=k)
    return F.conv2d(x, g.view(1, 1, ws, 1).expand(k, 1, ws, 1), padding=(pad, 0), groups=k)


def ssim_map(img1: Tensor, img2: Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
             *, padding: str = "same", channels_last: bool = False) -> Tensor:
    """Local SSIM map (B, C, H', W'): H' = H for "same", H − window_size + 1 for "valid"."""
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    x, y = _images(img1, img2, channels_last)
    c = x.shape[1]
    if padding == "valid" and min(x.shape[2:]) < window_size:
        raise ValueError(f"'valid' SSIM needs images of at least {window_size}px, got {tuple(x.shape[2:])}")
    g = gaussian_window(window_size, sigma, x.dtype, x.device)
    stats = _filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), g, padding)
    mu1, mu2, e11, e22, e12 = stats.split(c, dim=1)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s11, s22, s12 = e11 - mu1_sq, e22 - mu2_sq, e12 - mu12
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    return ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s11 + s22 + c2))


def ssim(img1: Tensor, img2: Tensor, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0,
         mask: Tensor | None = None, *, padding: str = "same", channels_last: bool = False) -> Tensor:
    """Mean SSIM per image, shape (B,). Differentiable. See the module docstring for conventions.

    With a ``mask`` the map is averaged with the mask as weights (for "valid" the mask is cropped
    to the map's pixels, i.e. each map pixel takes the mask value at its window centre).
    """
    x, _ = _images(img1, img2, channels_last)
    m = _mask(mask, x, channels_last)
    smap = ssim_map(img1, img2, window_size, sigma, data_range, padding=padding, channels_last=channels_last)
    if m is not None and padding == "valid":
        r = window_size // 2
        m = m[:, :, r:m.shape[2] - r, r:m.shape[3] - r]
    return _weighted_mean(smap, m)


# ----------------------------------------------------------------------------------- PSNR / L1
def psnr(pred: Tensor, target: Tensor, mask: Tensor | None = None, data_range: float = 1.0,
         *, channels_last: bool = False, max_db: float | None = None) -> Tensor:
    """Per-image PSNR (B,) = ``10·log10(data_range² / MSE)``; MSE over (masked) pixels and channels.

    Identical images (MSE 0) give ``+inf``; pass ``max_db`` (e.g. 100) to cap instead.
    """
    x, y = _images(pred, target, channels_last)
    mse = _weighted_mean((x - y).pow(2), _mask(mask, x, channels_last))
    out = 10.0 * torch.log10(data_range**2 / mse)
    return out.clamp(max=max_db) if max_db is not None else out


def l1(pred: Tensor, target: Tensor, mask: Tensor | None = None, *, channels_last: bool = False) -> Tensor:
    """Per-image mean absolute error (B,), mask-weighted when given."""
    x, y = _images(pred, target, channels_last)
    return _weighted_mean((x - y).abs(), _mask(mask, x, channels_last))


def composite(rgb: Tensor, alpha: Tensor, background: Tensor | float, *, premultiplied: bool = False,
              channels_last: bool = False) -> Tensor:
    """Composite ``rgb`` over ``background``: ``rgb·α + bg·(1−α)`` (straight colour) or
    ``rgb + bg·(1−α)`` (``premultiplied``, e.g. a Gaussian render over black).

    ``alpha``: (B, 1, H, W) / (B, H, W) (channels-last: (B, H, W, 1) / (B, H, W));
    ``background``: a float, (3,) or (B, 3).
    """
    x = to_channels_first(rgb) if channels_last else rgb
    a = _mask(alpha, x, channels_last)
    bg = torch.as_tensor(background, dtype=x.dtype, device=x.device)
    if bg.dim() == 0:
        bg = bg.expand(x.shape[1])
    if bg.dim() == 1:
        bg = bg[None].expand(x.shape[0], -1)
    bg = bg.reshape(x.shape[0], x.shape[1], 1, 1)
    out = x + bg * (1 - a) if premultiplied else x * a + bg * (1 - a)
    return out.permute(0, 2, 3, 1) if channels_last else out


# ----------------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    """Weights of the Avat3r loss and where the LPIPS weights come from.

    ``paper``: LPIPS on after 3 M steps as published; which LPIPS backbone the paper used is not
    published — we choose VGG (the usual choice for LPIPS as a *training* loss in large
    reconstruction models; AlexNet stays the default for the LPIPS *metric*).
    """

    l1_weight: float = 0.8
    ssim_weight: float = 0.2
    lpips_weight: float = 0.01
    use_lpips: bool = False  #: off by default; needs both weight files
    lpips_start_step: int = 0  #: LPIPS is applied from this training step on (paper: 3_000_000)
    lpips_net: str = "alex"  #: "alex" or "vgg"
    lpips_backbone_path: str | None = None  #: torchvision alexnet/vgg16 state_dict
    lpips_lin_path: str | None = None  #: official LPIPS v0.1 linear-layer file
    ssim_window: int = 11
    ssim_sigma: float = 1.5
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  #: default compositing background

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {},
        "paper": {"use_lpips": True, "lpips_start_step": 3_000_000, "lpips_net": "vgg"},
    }


class Avat3rLoss(nn.Module):
    """``l1_weight·L1 + ssim_weight·(1 − SSIM) + lpips_weight·LPIPS`` (0.8 / 0.2 / 0.01).

    ``forward(pred, target, ...)`` returns ``(total, terms)``: ``total`` a scalar tensor (mean over
    the batch) and ``terms`` a dict of detached floats: ``l1``, ``ssim`` (the SSIM value, not 1−SSIM),
    ``lpips`` (only when it was applied), ``lpips_active`` (1.0 / 0.0) and ``total``.

    LPIPS: pass a ready model as ``lpips_model``, or set ``use_lpips`` and both paths in the config.
    Absent files disable it (the reason is in :attr:`lpips_status`); files that exist but are wrong
    raise :class:`~avat3r_core.errors.FormatError`. SSIM uses "same" zero padding (3DGS).

    Alpha / background (optional): the target is a photo with a matte ``target_alpha``; it is
    composited over ``background`` as ``target·α + bg·(1−α)``. ``pred`` is taken as already
    composited over the same background (render with ``backgrounds=bg``); or pass ``pred_alpha``
    and ``pred`` is taken as premultiplied over black (render without background) and composited
    as ``pred + bg·(1−α)``. ``background`` defaults to ``config.background``. ``mask`` weights the
    L1 and SSIM means (LPIPS, a global network distance, ignores it).
    """

    def __init__(self, config: LossConfig | None = None, lpips_model: LPIPS | None = None):
        super().__init__()
        self.config = config or LossConfig()
        cfg = self.config
        self.lpips: LPIPS | None = None
        if lpips_model is not None:
            self.lpips = lpips_model.eval().requires_grad_(False)
            self.lpips_status = f"LPIPS enabled ({lpips_model.net}; model given)"
        elif not cfg.use_lpips:
            self.lpips_status = "LPIPS disabled: use_lpips is off"
        else:
            model, status = try_load_lpips(cfg.lpips_net, cfg.lpips_backbone_path, cfg.lpips_lin_path)
            self.lpips = model
            self.lpips_status = status
        if self.lpips is not None and cfg.lpips_start_step > 0:
            self.lpips_status += f", applied from step {cfg.lpips_start_step}"

    @property
    def lpips_enabled(self) -> bool:
        return self.lpips is not None

    def lpips_active(self, step: int | None) -> bool:
        return self.lpips is not None and (step is None or step >= self.config.lpips_start_step)

    def forward(self, pred: Tensor, target: Tensor, *, target_alpha: Tensor | None = None,
                pred_alpha: Tensor | None = None, background: Tensor | float | None = None,
                mask: Tensor | None = None, step: int | None = None,
                channels_last: bool = False) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        if channels_last:
            pred, target = to_channels_first(pred), to_channels_first(target)
            target_alpha = None if target_alpha is None else _mask(target_alpha, target, True)
            pred_alpha = None if pred_alpha is None else _mask(pred_alpha, pred, True)
            mask = None if mask is None else _mask(mask, pred, True)
        if target_alpha is not None or pred_alpha is not None:
            bg = cfg.background if background is None else background
            if target_alpha is not None:
                target = composite(target, target_alpha, bg)
            if pred_alpha is not None:
                pred = composite(pred, pred_alpha, bg, premultiplied=True)

        l1_val = l1(pred, target, mask).mean()
        ssim_val = ssim(pred, target, cfg.ssim_window, cfg.ssim_sigma, 1.0, mask, padding="same").mean()
        total = cfg.l1_weight * l1_val + cfg.ssim_weight * (1.0 - ssim_val)
        terms = {"l1": float(l1_val.detach()), "ssim": float(ssim_val.detach())}
        active = self.lpips_active(step)
        if active:
            assert self.lpips is not None
            self.lpips.to(device=pred.device)
            lp = self.lpips(pred.float(), target.float(), normalize=True).mean()
            total = total + cfg.lpips_weight * lp
            terms["lpips"] = float(lp.detach())
        terms["lpips_active"] = 1.0 if active else 0.0
        terms["total"] = float(total.detach())
        return total, terms

    def extra_repr(self) -> str:
        c = self.config
        return f"l1={c.l1_weight}, ssim={c.ssim_weight}, lpips={c.lpips_weight} [{self.lpips_status}]"
