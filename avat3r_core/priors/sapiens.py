"""Sapiens feature maps (official TorchScript feature models) and their storage-friendly projection.

The official ``sapiens_{0.3b,0.6b,1b,2b}_epoch_*_torchscript.pt2`` files are TorchScript archives:
``torch.jit.load`` rebuilds the graph from TorchScript IR and runs no Python pickle code. We still
refuse anything that is not a TorchScript zip archive (a plain ``torch.save`` file, a pickle,
garbage) with a FormatError before handing it to the loader, so that a mislabelled file fails with
a message that names it.

Preprocessing follows the public demo (``lite/demo/extract_feature.py`` + ``AdhocImageDataset``):
``cv2.imread`` gives BGR, ``cv2.resize(..., INTER_LINEAR)`` to (H, W) *without* keeping the aspect
ratio, channels flipped to RGB, float 0–255, mean [123.5, 116.5, 103.5], std [58.5, 57.0, 57.5],
NCHW. Our images are already RGB, so only the resize and normalisation remain. The demo's default
feature-extraction shape is 1024 x 1024 (the pretrain resolution); the task models run at
1024 x 768 (H x W), the default here because face crops of the capture are portrait. The model
returns a 1-tuple ``(feat,)`` with ``feat`` (B, C, H/16, W/16); C is the ViT width.

Storage: 1024 x 768 input gives 64 x 48 x 1920 features for the 2B model, ~11.8 MB per frame in
fp16. :func:`fit_projection` (PCA) and :func:`apply_projection` reduce the channels to ``k`` for
the priors manifest; :func:`bytes_per_frame` reports the cost either way.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avat3r_core.errors import FormatError, check_finite

__all__ = [
    "SAPIENS_MEAN",
    "SAPIENS_STD",
    "SAPIENS_WIDTHS",
    "SapiensModel",
    "apply_projection",
    "bytes_per_frame",
    "extract_features",
    "fit_projection",
    "load_sapiens",
    "sapiens_preprocess",
    "to_fp16",
]

SAPIENS_MEAN = (123.5, 116.5, 103.5)
SAPIENS_STD = (58.5, 57.0, 57.5)
#: model size → (width, depth) of the ViT, from the Sapiens release
SAPIENS_WIDTHS = {"0.3b": (1024, 24), "0.6b": (1280, 32), "1b": (1536, 40), "2b": (1920, 48)}
PATCH = 16
_NAME_RE = re.compile(r"sapiens[_-](0\.3b|0\.6b|1b|2b)", re.IGNORECASE)


@dataclass
class SapiensModel:
    """A loaded TorchScript feature model plus what the file name tells about it."""

    module: torch.jit.ScriptModule
    path: Path
    size: str | None  # "0.3b" | "0.6b" | "1b" | "2b" | None when the name does not say
    width: int | None  # expected channel count C of the features
    device: torch.device

    def __call__(self, x: Tensor) -> Any:
        return self.module(x)


def _is_torchscript_archive(path: Path) -> tuple[bool, str]:
    if not zipfile.is_zipfile(path):
        return False, "not a zip archive (TorchScript files are zip archives)"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        return False, f"unreadable zip archive: {exc}"
    has_code = any("/code/" in n for n in names)
    has_constants = any(n.endswith("constants.pkl") for n in names)
    if not (has_code and has_constants):
        return False, "a zip archive without TorchScript code/constants (a torch.save file?)"
    return True, ""


def load_sapiens(path: str | Path, device: torch.device | str = "cpu") -> SapiensModel:
    """``torch.jit.load`` an official Sapiens TorchScript feature model (eval mode).

    Model size and width come from the file name (``sapiens_2b_...``) when it says; otherwise they
    are None and the width is learnt from the first output.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    ok, why = _is_torchscript_archive(path)
    if not ok:
        raise FormatError(path, None, why)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*")
            module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise FormatError(path, None, f"torch.jit.load failed: {exc}"[:500]) from None
    module.eval()
    m = _NAME_RE.search(path.name)
    size = m.group(1).lower() if m else None
    width = SAPIENS_WIDTHS[size][0] if size else None
    return SapiensModel(module, path, size, width, torch.device(device))


def sapiens_preprocess(images: np.ndarray | Tensor, size: tuple[int, int] = (1024, 768)) -> Tensor:
    """uint8 RGB (N, H, W, 3) → normalised float32 (N, 3, size[0], size[1]).

    Bilinear resize as ``cv2.resize(INTER_LINEAR)`` (half-pixel centres, no antialiasing), which
    is what the official demo uses; OpenCV is used when importable, torch otherwise.
    """
    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    H, W = int(size[0]), int(size[1])
    try:
        import cv2

        resized = np.stack([cv2.resize(np.ascontiguousarray(im), (W, H), interpolation=cv2.INTER_LINEAR) for im in arr])
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).float()
    except ImportError:  # pragma: no cover - OpenCV is a project dependency
        x = torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    mean = torch.tensor(SAPIENS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SAPIENS_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract_features(
    model: SapiensModel,
    images: np.ndarray | Tensor,
    size: tuple[int, int] = (1024, 768),
    batch_size: int = 4,
) -> Tensor:
    """Sapiens features (N, C, H/16, W/16) float32 on the CPU.

    ``images``: uint8 RGB (N, H, W, 3) (preprocessed here to ``size``) or an already normalised
    float (N, 3, H, W) tensor. The TorchScript model returns ``(feat,)``; element 0 is taken.
    """
    if isinstance(images, Tensor) and images.is_floating_point():
        x = images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected normalised (N, 3, H, W), got {tuple(x.shape)}")
    else:
        x = sapiens_preprocess(images, size)
    H, W = x.shape[-2:]
    outs = []
    for s in range(0, x.shape[0], max(1, batch_size)):
        out = model(x[s : s + batch_size].to(model.device))
        feat = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(feat, Tensor) or feat.ndim != 4:
            msg = f"expected (feat,) with feat (B, C, h, w), got {type(feat).__name__}"
            raise FormatError(model.path, "output", msg)
        if tuple(feat.shape[-2:]) != (H // PATCH, W // PATCH):
            msg = f"feature grid {tuple(feat.shape[-2:])} is not input/{PATCH} = {(H // PATCH, W // PATCH)}"
            raise FormatError(model.path, "output", msg)
        if model.width is not None and feat.shape[1] != model.width:
            msg = f"{feat.shape[1]} channels, but a {model.size} model has {model.width}"
            raise FormatError(model.path, "output", msg)
        outs.append(feat.float().cpu())
    return torch.cat(outs)


def to_fp16(features: Tensor, field: str = "sapiens_features") -> Tensor:
    """Store features as float16, refusing values that overflow it (|x| > 65504) or are not finite."""
    check_finite(features, None, field)
    if features.numel() and float(features.abs().max()) > torch.finfo(torch.float16).max:
        raise ValueError(f"{field}: values exceed the float16 range; project or rescale before storing")
    return features.to(torch.float16)


def fit_projection(features: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """PCA over all pixels of (N, C, h, w) features → (matrix (C, k), mean (C,)), float32.

    Components are ordered by explained variance and sign-normalised (largest-magnitude entry
    positive), so a refit on the same data gives the same matrix. Fitted once per dataset (or
    per subject) and stored next to the manifest; :func:`apply_projection` uses it.
    """
    if features.ndim != 4:
        raise ValueError(f"expected (N, C, h, w) features, got {tuple(features.shape)}")
    C = features.shape[1]
    if not 0 < k <= C:
        raise ValueError(f"k must be in 1..{C}, got {k}")
    X = features.detach().double().permute(0, 2, 3, 1).reshape(-1, C)
    mean = X.mean(0)
    Xc = X - mean
    cov = Xc.T @ Xc / max(1, X.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    comps = evecs[:, torch.argsort(evals, descending=True)[:k]]  # (C, k)
    idx = comps.abs().argmax(0)
    signs = torch.sign(comps[idx, torch.arange(k)])
    signs[signs == 0] = 1
    return (comps * signs).float(), mean.float()


def apply_projection(features: Tensor, matrix: Tensor, mean: Tensor) -> Tensor:
    """(N, C, h, w) → (N, k, h, w): ``(f − mean) @ matrix`` per pixel."""
    if features.shape[1] != matrix.shape[0] or mean.shape[0] != matrix.shape[0]:
        raise ValueError(f"features have {features.shape[1]} channels, projection expects {matrix.shape[0]}")
    f = features.float() - mean.float().view(1, -1, 1, 1)
    return torch.einsum("nchw,ck->nkhw", f, matrix.float())


def bytes_per_frame(shape: Sequence[int] | Tensor, dtype: torch.dtype = torch.float16) -> int:
    """Storage bytes of one frame's feature map: ``shape`` is (C, h, w) or a (N, C, h, w) tensor."""
    if isinstance(shape, Tensor):
        shape = tuple(shape.shape[1:]) if shape.ndim == 4 else tuple(shape.shape)
    if len(shape) != 3:
        raise ValueError(f"expected (C, h, w), got {tuple(shape)}")
    c, h, w = (int(v) for v in shape)
    return c * h * w * torch.tensor([], dtype=dtype).element_size()
