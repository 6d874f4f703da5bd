"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), v0.1, written from the paper and the public description of the reference code so that the
user-supplied weight files load strictly.

The distance, for images ``x, y`` of shape (B, 3, H, W):

1. Scaling layer: inputs in [-1, 1] (pass ``normalize=True`` for [0, 1] inputs, mapped by ``2x-1``)
   are shifted and scaled per channel: ``(x - shift) / scale`` with
   ``shift = [-.030, -.088, -.188]``, ``scale = [.458, .448, .450]`` (:data:`LPIPS_SHIFT`,
   :data:`LPIPS_SCALE`; these are the ImageNet mean/std re-expressed for the [-1, 1] range).
2. Backbone feature taps (the ImageNet classifiers' ``features`` stacks, torchvision layout):

   * ``alex``: relu1 … relu5, the outputs of ``features.{1, 4, 7, 9, 11}``;
     channels 64, 192, 384, 256, 256.
   * ``vgg`` (VGG-16): relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, the outputs of
     ``features.{3, 8, 15, 22, 29}``; channels 64, 128, 256, 512, 512.

3. Each tap is unit-normalised along channels: ``f / (||f||_2 + 1e-10)``.
4. Squared difference of the two images' normalised features, a 1x1 convolution to one channel
   without bias (``lin{k}.model.1.weight``, shape (1, C_k, 1, 1); ``lin{k}.model.0`` is a dropout
   that is an identity in eval mode and holds no parameters), spatial mean.
5. Sum over the five taps → one distance per image, returned as shape (B,).

Weight files (both user-supplied; nothing is downloaded):

* backbone: a torchvision ``state_dict`` of ``alexnet`` / ``vgg16``: ``features.{i}.weight`` and
  ``features.{i}.bias`` for every convolution index ``i``. The full classifier checkpoints as
  torchvision publishes them also carry ``classifier.*`` keys; exactly the classifier keys of that
  network's torchvision layout (alex: ``classifier.{1,4,6}.{weight,bias}``; vgg16:
  ``classifier.{0,3,6}.{weight,bias}``) are accepted and ignored. Every other key difference
  (missing, unexpected, wrong shape) is an error.
* linear layers: the official v0.1 file (``alex.pth`` / ``vgg.pth``) holding exactly
  ``lin0.model.1.weight`` … ``lin4.model.1.weight``.

Both are read with ``torch.load(weights_only=True)`` and loaded strictly; a mismatch raises
:class:`~avat3r_core.errors.FormatError` naming the missing and unexpected keys.

One numerical difference from the reference code, on purpose: the channel norm is computed as
``sqrt(max(sum f², 1e-20))`` instead of ``sqrt(sum f²)``. The values only differ where a whole
feature vector is below 1e-10 in norm (its contribution is then ~0 either way), and the gradient
there is 0 instead of NaN (``d sqrt / ds`` is infinite at 0), which matters when LPIPS is a loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from avat3r_core.weights import check_state_dict, safe_torch_load
from avat3r_core.errors import FormatError

__all__ = [
    "LPIPS",
    "LPIPS_SCALE",
    "LPIPS_SHIFT",
    "NETS",
    "backbone_state_dict_keys",
    "lin_state_dict_keys",
    "load_lpips",
    "try_load_lpips",
]

#: Per-channel shift and scale of the v0.1 scaling layer (inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

_NORM_EPS = 1e-10


def _alexnet_features() -> nn.Sequential:
    # torchvision ``alexnet().features`` indices 0..12.
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0
        nn.ReLU(),  # 1  relu1
        nn.MaxPool2d(kernel_size=3, stride=2),  # 2
        nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3
        nn.ReLU(),  # 4  relu2
        nn.MaxPool2d(kernel_size=3, stride=2),  # 5
        nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
        nn.ReLU(),  # 7  relu3
        nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
        nn.ReLU(),  # 9  relu4
        nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
        nn.ReLU(),  # 11 relu5
        nn.MaxPool2d(kernel_size=3, stride=2),  # 12 (not used by LPIPS, kept for the layout)
    )


def _vgg16_features() -> nn.Sequential:
    # torchvision ``vgg16().features`` (configuration "D", no batch norm), indices 0..30.
    layers: list[nn.Module] = []
    c_in = 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU()]
            c_in = int(v)
    return nn.Sequential(*layers)


#: net name → (features builder, tap indices into ``features``, tap channels, ignorable classifier keys)
NETS: dict[str, dict[str, Any]] = {
    "alex": {
        "features": _alexnet_features,
        "taps": (1, 4, 7, 9, 11),
        "channels": (64, 192, 384, 256, 256),
        "classifier": tuple(f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias")),
    },
    "vgg": {
        "features": _vgg16_features,
        "taps": (3, 8, 15, 22, 29),
        "channels": (64, 128, 256, 512, 512),
        "classifier": tuple(f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")),
    },
}
_ALIASES = {"alex": "alex", "alexnet": "alex", "vgg": "vgg", "vgg16": "vgg"}


def _net_name(net: str) -> str:
    try:
        return _ALIASES[net.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown LPIPS network {net!r}; known: {sorted(_ALIASES)}") from None


class _LinLayer(nn.Module):
    """``model = Sequential(Dropout(), Conv2d(C, 1, 1, bias=False))`` — keys ``model.1.weight``."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _unit_normalize(f: Tensor) -> Tensor:
    norm = torch.sqrt(f.pow(2).sum(dim=1, keepdim=True).clamp_min(_NORM_EPS**2))
    return f / (norm + _NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS v0.1 distance. State dict: ``features.{i}.*`` (backbone) and ``lin{k}.model.1.weight``.

    A freshly constructed module has random weights; use :func:`load_lpips` for real ones.
    ``forward(x, y)`` returns (B,) distances; inputs (B, 3, H, W) in [-1, 1], or in [0, 1] with
    ``normalize=True``. The module is a frozen metric: :func:`load_lpips` returns it in eval mode
    with ``requires_grad=False`` parameters, but gradients flow to the inputs.
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net = _net_name(net)
        spec = NETS[self.net]
        self.taps: tuple[int, ...] = spec["taps"]
        self.channels: tuple[int, ...] = spec["channels"]
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = spec["features"]()
        for k, c in enumerate(self.channels):
            self.add_module(f"lin{k}", _LinLayer(c))

    @property
    def lins(self) -> list[_LinLayer]:
        return [getattr(self, f"lin{k}") for k in range(len(self.channels))]

    def taps_of(self, x: Tensor) -> list[Tensor]:
        """Backbone activations at the five taps for scaled input ``x``."""
        out = []
        last = self.taps[-1]
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
            if i == last:
                break
        return out

    def forward(self, x: Tensor, y: Tensor, normalize: bool = False, per_layer: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if normalize:
            x = 2 * x - 1
            y = 2 * y - 1
        x = (x - self.shift) / self.scale
        y = (y - self.shift) / self.scale
        b = x.shape[0]
        # One backbone pass over both images.
        feats = self.taps_of(torch.cat([x, y], dim=0))
        layers = []
        for f, lin in zip(feats, self.lins):
            d = (_unit_normalize(f[:b]) - _unit_normalize(f[b:])).pow(2)
            layers.append(lin(d).mean(dim=(1, 2, 3)))
        total = torch.stack(layers, dim=0).sum(dim=0)
        return (total, layers) if per_layer else total


def backbone_state_dict_keys(net: str = "alex") -> list[str]:
    """Keys a backbone file must hold (torchvision layout)."""
    return [f"features.{k}" for k in _template(net).features.state_dict()]


def lin_state_dict_keys(net: str = "alex") -> list[str]:
    """Keys a v0.1 linear-layer file must hold."""
    return [f"lin{k}.model.1.weight" for k in range(len(NETS[_net_name(net)]["channels"]))]


def _template(net: str) -> LPIPS:
    with torch.device("meta"):
        return LPIPS(net)


def _read_state_dict(path: Path, what: str) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise FormatError(path, None, f"LPIPS {what} weights file not found")
    sd = safe_torch_load(path)
    if not isinstance(sd, Mapping):
        raise FormatError(path, None, f"expected a state_dict (mapping of tensors), got {type(sd).__name__}")
    bad = [str(k) for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise FormatError(path, ", ".join(bad[:8]), "values must be tensors")
    return sd


def _check_keys(path: Path | str, sd: Mapping[str, Tensor], expected: Mapping[str, Tensor], ignorable: tuple[str, ...] = ()) -> None:
    check_state_dict(expected, sd, path, what="the LPIPS layout", ignorable=ignorable)
    for k in expected:
        if not sd[k].is_floating_point():
            raise FormatError(path, k, f"dtype {sd[k].dtype} is not floating point")


def load_lpips(
    net: str = "alex",
    backbone_path: str | Path | None = None,
    lin_path: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> LPIPS:
    """Build LPIPS(``net``) and load both weight files strictly (see the module docstring).

    Missing files, unreadable files, and key/shape mismatches raise :class:`FormatError` (the
    message lists missing and unexpected keys). Returns the model in eval mode, frozen.
    """
    if backbone_path is None or lin_path is None:
        raise FormatError(None, "backbone_path" if backbone_path is None else "lin_path",
                          "LPIPS needs both a backbone file and a linear-layer file")
    backbone_path, lin_path = Path(backbone_path), Path(lin_path)
    model = LPIPS(net)
    own = model.state_dict()

    backbone = _read_state_dict(backbone_path, "backbone")
    expected_bb = {k: v for k, v in own.items() if k.startswith("features.")}
    _check_keys(backbone_path, backbone, expected_bb, NETS[model.net]["classifier"])
    lins = _read_state_dict(lin_path, "linear-layer")
    expected_lin = {k: v for k, v in own.items() if k.startswith("lin")}
    _check_keys(lin_path, lins, expected_lin)

    merged = {k: backbone[k] for k in expected_bb}
    merged.update({k: lins[k] for k in expected_lin})
    model.load_state_dict(merged, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def try_load_lpips(
    net: str = "alex",
    backbone_path: str | Path | None = None,
    lin_path: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[LPIPS | None, str]:
    """(model, status) where model is None, with the reason in ``status``, when a file is absent.

    Absent means: a path not given, or no file at the path. A file that exists but is wrong
    still raises :class:`FormatError` — a broken weights file is never silently ignored.
    """
    for name, p in (("backbone_path", backbone_path), ("lin_path", lin_path)):
        if p is None:
            return None, f"LPIPS disabled: no {name} given (user-supplied {net} weights)"
        if not Path(p).is_file():
            return None, f"LPIPS disabled: {name} {str(p)!r} does not exist"
    model = load_lpips(net, backbone_path, lin_path, device)
    return model, f"LPIPS enabled ({model.net}; backbone {backbone_path}; linear layers {lin_path})"
