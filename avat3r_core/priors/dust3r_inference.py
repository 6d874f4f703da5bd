"""Running DUSt3R on a set of views: preprocessing (resize + crop, and the camera that goes with
it) and pairwise inference over ordered view pairs. The network is in
:mod:`avat3r_core.priors.dust3r`; the alignment of the pairs into the calibrated world in
:mod:`avat3r_core.priors.align`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avat3r_core.cameras import Cameras
from avat3r_core.priors.dust3r import Dust3rModel

__all__ = ["Dust3rPairs", "Dust3rTransform", "all_ordered_pairs", "dust3r_preprocess", "pairwise_inference"]


@dataclass(frozen=True)
class Dust3rTransform:
    """How one input image became the network input: resize, then crop.

    ``in_size``/``resized_size``/``out_size`` are (width, height); ``crop_xy`` is the top-left corner
    of the crop in the resized image. Continuous pixel coordinates map as
    ``u_out = u_in * rw/W - x0`` (and likewise v), the pixel-centre convention of
    :mod:`avat3r_core.cameras`.
    """

    in_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_xy: tuple[int, int]
    out_size: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        return self.resized_size[0] / self.in_size[0], self.resized_size[1] / self.in_size[1]

    def to_input_pixels(self, uv: Tensor) -> Tensor:
        """(…, 2) continuous (u, v) in the DUSt3R grid → the input image's pixel grid."""
        sx, sy = self.scale
        u = (uv[..., 0] + self.crop_xy[0]) / sx
        v = (uv[..., 1] + self.crop_xy[1]) / sy
        return torch.stack((u, v), dim=-1)

    def to_output_pixels(self, uv: Tensor) -> Tensor:
        sx, sy = self.scale
        return torch.stack((uv[..., 0] * sx - self.crop_xy[0], uv[..., 1] * sy - self.crop_xy[1]), dim=-1)

    def cameras(self, cams: Cameras) -> Cameras:
        """Cameras of the input images (their pixel grid) → cameras of the DUSt3R input."""
        if (cams.width, cams.height) != self.in_size:
            w, h = self.in_size
            raise ValueError(f"cameras are {cams.width}x{cams.height}, the images were {w}x{h}")
        r = cams.resize(*self.resized_size)
        return r.crop(self.crop_xy[0], self.crop_xy[1], *self.out_size)


def _resize_crop_box(
    W1: int, H1: int, long_side: int, square_ok: bool
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Official ``load_images`` geometry for size != 224: resize long side, centre-crop to /16."""
    S = max(W1, H1)
    W, H = (int(round(W1 * long_side / S)), int(round(H1 * long_side / S)))
    cx, cy = W // 2, H // 2
    halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
    if not square_ok and W == H:
        halfh = 3 * halfw // 4  # integer: halfw is a multiple of 8
    return (W, H), (cx - halfw, cy - halfh, cx + halfw, cy + halfh)


def dust3r_preprocess(
    images: np.ndarray | Tensor,
    long_side: int = 512,
    square_ok: bool = False,
) -> tuple[Tensor, Tensor, list[Dust3rTransform]]:
    """uint8 RGB images (N, H, W, 3) → (N, 3, h, w) float in [-1, 1], true shapes (N, 2) as (h, w),
    and one :class:`Dust3rTransform` per image.

    Follows the official ``load_images`` for the 512 models: PIL resize of the long side to
    ``long_side`` (LANCZOS when shrinking, BICUBIC otherwise), centre crop of each side to a multiple
    of 16 (square images become 4:3 unless ``square_ok``), then ``(x / 255 - 0.5) / 0.5``.
    """
    from PIL import Image

    arr = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    outs, shapes, transforms = [], [], []
    for img in arr:
        H1, W1 = img.shape[:2]
        (W, H), box = _resize_crop_box(W1, H1, long_side, square_ok)
        pil = Image.fromarray(np.ascontiguousarray(img), mode="RGB")
        interp = Image.LANCZOS if max(W1, H1) > long_side else Image.BICUBIC
        pil = pil.resize((W, H), interp).crop(box)
        out = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        outs.append((out - 0.5) / 0.5)
        shapes.append((pil.size[1], pil.size[0]))
        transforms.append(Dust3rTransform((W1, H1), (W, H), (box[0], box[1]), (box[2] - box[0], box[3] - box[1])))
    return torch.stack(outs), torch.tensor(shapes, dtype=torch.int64), transforms


@dataclass
class Dust3rPairs:
    """Raw DUSt3R predictions for ordered pairs ``(i, j)`` (P pairs, each map H x W).

    ``pts3d_i[p]`` is view i's point map in view i's camera frame; ``pts3d_j_in_i[p]`` view j's in
    view i's frame; both share one unknown per-pair scale. ``conf_*`` are DUSt3R confidences (≥ 1
    for conf mode ('exp', 1, inf)).
    """

    pairs: list[tuple[int, int]]
    pts3d_i: Tensor  # (P, H, W, 3)
    pts3d_j_in_i: Tensor  # (P, H, W, 3)
    conf_i: Tensor  # (P, H, W)
    conf_j: Tensor  # (P, H, W)
    num_views: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)


def all_ordered_pairs(n: int) -> list[tuple[int, int]]:
    """Every ordered pair (i, j), i != j: the official 'complete' scene graph, symmetrised."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


@torch.no_grad()
def pairwise_inference(
    model: Dust3rModel,
    images: Tensor,
    pairs: Sequence[tuple[int, int]] | None = None,
    batch_size: int = 4,
) -> Dust3rPairs:
    """Run DUSt3R on ordered pairs of preprocessed views (N, 3, h, w) (default: all N·(N−1)).

    Each view is encoded once (the encoder is siamese and sees one image at a time, so this equals
    the official per-pair encoding) and the decoders + heads run on batches of ``batch_size``
    pairs. Outputs are float32 on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N, 3, h, w) images, got {tuple(images.shape)}")
    n = images.shape[0]
    pairs = list(all_ordered_pairs(n) if pairs is None else pairs)
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"bad pair ({i}, {j}) for {n} views")
    param = next(model.parameters())
    dev, dtype = param.device, param.dtype
    feats, poss = [], []
    for s in range(0, n, max(1, batch_size)):
        f, p = model.encode(images[s : s + batch_size].to(dev, dtype))
        feats.append(f)
        poss.append(p)
    feat, pos = torch.cat(feats), torch.cat(poss)
    size = tuple(images.shape[-2:])
    out: dict[str, list[Tensor]] = {"pts3d": [], "conf": [], "pts3d_in_other_view": [], "conf2": []}
    for s in range(0, len(pairs), max(1, batch_size)):
        chunk = pairs[s : s + batch_size]
        ii = torch.tensor([p[0] for p in chunk], device=dev)
        jj = torch.tensor([p[1] for p in chunk], device=dev)
        dec1, dec2 = model.decode(feat[ii], pos[ii], feat[jj], pos[jj])
        res = model.heads(dec1, dec2, size)  # type: ignore[arg-type]
        for k in out:
            out[k].append(res[k].float().cpu())
    if not pairs:
        H, W = size
        empty3, empty1 = torch.zeros(0, H, W, 3), torch.zeros(0, H, W)
        return Dust3rPairs([], empty3, empty3.clone(), empty1, empty1.clone(), n)
    return Dust3rPairs(
        pairs=pairs,
        pts3d_i=torch.cat(out["pts3d"]),
        pts3d_j_in_i=torch.cat(out["pts3d_in_other_view"]),
        conf_i=torch.cat(out["conf"]),
        conf_j=torch.cat(out["conf2"]),
        num_views=n,
        meta={"source": "dust3r", "image_size": size},
    )
