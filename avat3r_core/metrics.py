"""Evaluation metrics of the Avat3r paper and a small table to collect them.

==========  =====================================================================================
PSNR ↑      :func:`psnr` — ``10·log10(1/MSE)`` on [0, 1] images (+inf for identical images).
SSIM ↑      :func:`ssim` — Gaussian-window SSIM (11, σ 1.5), **"valid"** filtering by default
            (the reference definition; the training loss uses the 3DGS "same" zero padding).
LPIPS ↓     :func:`lpips_metric` — LPIPS v0.1 AlexNet on [0, 1] images; ``None`` when the
            user-supplied weight files are absent (see :mod:`avat3r_core.lpips`).
AKD ↓       :func:`akd` — mean Euclidean distance (pixels) between predicted and ground-truth
            2-D facial landmarks, over visible landmarks.
CSIM ↑      :func:`csim` — cosine similarity of face-recognition embeddings, here dlib's
            ResNet-128 (:mod:`avat3r_core.identity`; not the paper's ArcFace, so not comparable
            with published CSIM); raises :class:`MetricUnavailable` with the reason without dlib
            or its model files.
==========  =====================================================================================
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avat3r_core.errors import Avat3rError
from avat3r_core.losses import psnr
from avat3r_core.losses import ssim as _ssim
from avat3r_core.lpips import LPIPS, try_load_lpips

__all__ = [
    "DEFAULT_METRICS",
    "HIGHER_IS_BETTER",
    "MetricTable",
    "MetricUnavailable",
    "PSNR_CAP",
    "akd",
    "csim",
    "lpips_metric",
    "psnr",
    "ssim",
]

DEFAULT_METRICS = ("psnr", "ssim", "lpips", "akd", "csim")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "akd": False, "csim": True}
#: Per-view PSNR is capped here before a mean is taken (identical images are ``+inf``), so every
#: mean (validation, evaluation, the expression probe) is finite and they agree.
PSNR_CAP = 100.0
_FORMATS = {"psnr": "{:.2f}", "ssim": "{:.4f}", "lpips": "{:.4f}", "akd": "{:.2f}", "csim": "{:.3f}"}
_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "akd": "AKD", "csim": "CSIM"}


class MetricUnavailable(Avat3rError, NotImplementedError):
    """A metric that cannot be computed in this installation; the message says why."""


def ssim(pred: Tensor, target: Tensor, mask: Tensor | None = None, data_range: float = 1.0,
         *, window_size: int = 11, sigma: float = 1.5, padding: str = "valid",
         channels_last: bool = False) -> Tensor:
    """Metric SSIM per image (B,): :func:`avat3r_core.losses.ssim` with ``padding="valid"``."""
    return _ssim(pred, target, window_size, sigma, data_range, mask, padding=padding, channels_last=channels_last)


_LPIPS_CACHE: dict[tuple, LPIPS] = {}


def lpips_metric(pred: Tensor, target: Tensor, *, model: LPIPS | None = None, net: str = "alex",
                 backbone_path: str | Path | None = None, lin_path: str | Path | None = None,
                 channels_last: bool = False) -> Tensor | None:
    """LPIPS per image (B,) for [0, 1] images, or ``None`` when no model/weights are available.

    Give a loaded ``model``, or the two weight files (loaded once and cached per path). Absent
    files → ``None``; files that exist but do not match raise FormatError.
    """
    if model is None:
        if backbone_path is None or lin_path is None:
            return None
        key = (net, str(Path(backbone_path).resolve()), str(Path(lin_path).resolve()))
        model = _LPIPS_CACHE.get(key)
        if model is None:
            model, _ = try_load_lpips(net, backbone_path, lin_path)
            if model is None:
                return None
            _LPIPS_CACHE[key] = model
    if channels_last:
        pred, target = pred.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2)
    model = model.to(pred.device)
    with torch.no_grad():
        return model(pred.float(), target.float(), normalize=True)


def akd(pred_landmarks: Tensor, gt_landmarks: Tensor, visible: Tensor | None = None) -> Tensor:
    """Average keypoint distance per image (B,): mean over landmarks of ``‖pred − gt‖₂`` (pixels).

    ``pred_landmarks``/``gt_landmarks``: (B, L, 2) pixel coordinates; ``visible``: optional (B, L)
    bool (or 0/1 weights) — only visible landmarks count. An image with none visible gives NaN.
    """
    p, g = torch.as_tensor(pred_landmarks), torch.as_tensor(gt_landmarks)
    if p.dim() != 3 or p.shape[-1] != 2 or p.shape != g.shape:
        raise ValueError(f"expected two (B, L, 2) landmark tensors, got {tuple(p.shape)} and {tuple(g.shape)}")
    dtype = torch.promote_types(torch.promote_types(p.dtype, g.dtype), torch.float32)
    d = torch.linalg.vector_norm(p.to(dtype) - g.to(dtype), dim=-1)
    if visible is None:
        return d.mean(dim=1)
    w = torch.as_tensor(visible, device=d.device).to(dtype)
    if w.shape != d.shape:
        raise ValueError(f"visible must be (B, L) = {tuple(d.shape)}, got {tuple(w.shape)}")
    n = w.sum(dim=1)
    out = (d * w).sum(dim=1) / n.clamp_min(1e-12)
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def csim(pred: Tensor, target: Tensor, identity=None, upscale: int = 1) -> Tensor:
    """(N,) identity similarity of (N, 3, H, W) images in [0, 1]: the cosine of dlib ResNet-128
    embeddings (``identity``: a :class:`~avat3r_core.identity.FaceIdentity`, else one is loaded),
    NaN where dlib finds no face in either image. Raises :class:`MetricUnavailable` (with the
    reason) without dlib or its model files."""
    from avat3r_core.identity import FaceIdentity, similarities

    identity = identity if identity is not None else FaceIdentity()
    if not identity.available:
        raise MetricUnavailable(f"CSIM unavailable: {identity.reason}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")

    def embed(images: Tensor) -> list:
        u8 = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype("uint8")
        return [identity.embed(im, upscale) for im in u8]

    return torch.from_numpy(similarities(embed(target), embed(pred))[0])


def _floats(value: Any) -> list[float]:
    if isinstance(value, Tensor):
        return [float(v) for v in value.detach().reshape(-1).cpu().tolist()]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)]


class MetricTable:
    """Per-sample metrics per method → mean rows, a markdown table, and a JSON-ready dict.

    ``add(method, sample_id=None, psnr=..., ssim=...)`` records one sample (a value of ``None``
    means "not computed for this sample"). ``add_batch(method, ids=None, psnr=tensor(B,), ...)``
    records B samples at once. Means ignore NaN values (e.g. AKD with no visible landmark) and
    report how many samples each mean is over; ``+inf`` (identical images' PSNR) propagates.

    A metric with no values for a method is shown as ``n/a``; metrics in ``unavailable`` (name →
    reason, e.g. CSIM without the identity network) are always ``n/a`` and the reason is listed
    under the markdown table and in the dict.
    """

    def __init__(self, metrics: Sequence[str] = DEFAULT_METRICS,
                 unavailable: Mapping[str, str] | None = None):
        self.metrics = list(metrics)
        self.unavailable = dict(unavailable or {})
        self._values: dict[str, dict[str, list[float]]] = {}
        self._samples: list[dict[str, Any]] = []

    @property
    def methods(self) -> list[str]:
        return list(self._values)

    def _check(self, names: Iterable[str]) -> None:
        unknown = sorted(set(names) - set(self.metrics))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; this table has {self.metrics}")

    def add(self, method: str, sample_id: str | None = None, **values: float | Tensor | None) -> None:
        self._check(values)
        per = self._values.setdefault(method, defaultdict(list))
        row: dict[str, Any] = {"method": method, "id": sample_id}
        for name, v in values.items():
            if v is None or name in self.unavailable:
                continue
            f = _floats(v)
            if len(f) != 1:
                raise ValueError(f"add() takes one value per metric; {name} has {len(f)} (use add_batch)")
            per[name].append(f[0])
            row[name] = f[0]
        self._samples.append(row)

    def add_batch(self, method: str, ids: Sequence[str] | None = None, **values: Tensor | Sequence[float] | None) -> None:
        self._check(values)
        cols = {k: _floats(v) for k, v in values.items() if v is not None}
        sizes = {len(v) for v in cols.values()} | ({len(ids)} if ids is not None else set())
        if len(sizes) > 1:
            raise ValueError(f"add_batch: inconsistent batch sizes {sorted(sizes)}")
        n = sizes.pop() if sizes else 0
        for i in range(n):
            self.add(method, None if ids is None else ids[i], **{k: v[i] for k, v in cols.items()})

    def means(self) -> dict[str, dict[str, float | None]]:
        """method → metric → NaN-ignoring mean (None when no value / unavailable)."""
        out: dict[str, dict[str, float | None]] = {}
        for method, per in self._values.items():
            row: dict[str, float | None] = {}
            for name in self.metrics:
                vals = [v for v in per.get(name, []) if not math.isnan(v)]
                row[name] = sum(vals) / len(vals) if vals and name not in self.unavailable else None
            out[method] = row
        return out

    def counts(self) -> dict[str, dict[str, int]]:
        return {m: {name: sum(1 for v in per.get(name, []) if not math.isnan(v)) for name in self.metrics}
                for m, per in self._values.items()}

    def to_markdown(self) -> str:
        arrow = {True: "↑", False: "↓", None: ""}
        header = ["Method"] + [_LABELS.get(n, n) + arrow[HIGHER_IS_BETTER.get(n)] for n in self.metrics]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, row in self.means().items():
            cells = [method]
            for n in self.metrics:
                v = row[n]
                cells.append("n/a" if v is None else (str(v) if math.isinf(v) else _FORMATS.get(n, "{:.4f}").format(v)))
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"n/a {_LABELS.get(n, n)}: {why}" for n, why in self.unavailable.items() if n in self.metrics]
        return "\n".join(lines + ([""] + notes if notes else [])) + "\n"

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        """JSON-ready: means (None = n/a, ``"inf"`` for infinite), counts, unavailable reasons."""
        def clean(v: float | None) -> float | str | None:
            if v is None or math.isnan(v):
                return None
            return ("inf" if v > 0 else "-inf") if math.isinf(v) else v

        out: dict[str, Any] = {
            "metrics": list(self.metrics),
            "means": {m: {n: clean(v) for n, v in row.items()} for m, row in self.means().items()},
            "counts": self.counts(),
            "unavailable": {n: why for n, why in self.unavailable.items() if n in self.metrics},
        }
        if samples:
            out["samples"] = [{k: clean(v) if isinstance(v, float) else v for k, v in r.items()} for r in self._samples]
        return out
