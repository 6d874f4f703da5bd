"""The 135-dim expression code ``z_exp`` that drives an avatar, and exact rotation conversions.

Layout (one row per frame; slice constants below)::

    [  0, 100)  EXPR        FLAME expression coefficients (first 100; fewer are zero-padded)
    [100, 112)  EYES        left eye 6D rotation, then right eye 6D rotation
    [112, 114)  EYELIDS     left, right eyelid blendshape weights
    [114, 120)  NECK        neck 6D rotation
    [120, 126)  JAW         jaw 6D rotation
    [126, 135)  HEAD_POSE   global head rotation in 6D (HEAD_ROT, [126, 132)) + translation (HEAD_TRANS,
                            [132, 135), metres)

This is the descriptor of the related model by the same first author (expression 100 + eyes 12 +
eyelids 2 + neck 6 + jaw 6 + head pose 9). The 6D rotation is the first two columns of the
rotation matrix, column-major: ``[R00, R10, R20, R01, R11, R21]`` (Zhou et al. 2019); decoding
orthonormalises them by Gram-Schmidt, completes the third column by a cross product and converts
to axis-angle through a quaternion (stable everywhere, including angles near pi), so
``decode(encode(p))`` reproduces the rotations to floating-point precision for angles in [0, pi).

Eyelids: FLAME 2020/2023 and the studio head have no eyelid blendshapes (blinks are expression
components), so ``encode`` writes zeros there unless ``params`` carries an ``"eyelids"`` (T, 2)
array (as trackers with added eyelid blendshapes produce); ``decode`` always returns it.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from avat3r_core.flame import batch_rodrigues
from avat3r_core.tracking import EXPRESSION_DIM

__all__ = [
    "DIM", "EXPR", "EYES", "EYE_LEFT", "EYE_RIGHT", "EYELIDS", "NECK", "JAW", "HEAD_POSE", "HEAD_ROT",
    "HEAD_TRANS", "N_EXPR", "encode", "decode", "matrix_to_6d", "rot6d_to_matrix", "matrix_to_axis_angle",
    "axis_angle_to_matrix", "axis_angle_to_6d", "rot6d_to_axis_angle",
]

N_EXPR = 100
DIM = EXPRESSION_DIM
EXPR = slice(0, 100)
EYES = slice(100, 112)
EYE_LEFT = slice(100, 106)
EYE_RIGHT = slice(106, 112)
EYELIDS = slice(112, 114)
NECK = slice(114, 120)
JAW = slice(120, 126)
HEAD_POSE = slice(126, 135)
HEAD_ROT = slice(126, 132)
HEAD_TRANS = slice(132, 135)


# --------------------------------------------------------------------------- rotations (torch)
def axis_angle_to_matrix(rotvec: Tensor) -> Tensor:
    """(..., 3) axis-angle -> (..., 3, 3)."""
    return batch_rodrigues(rotvec, eps=0.0) if rotvec.numel() else rotvec.new_zeros(*rotvec.shape, 3)


def matrix_to_6d(R: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 6): the first two columns, column-major."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


def rot6d_to_matrix(d6: Tensor) -> Tensor:
    """(..., 6) -> (..., 3, 3) by Gram-Schmidt (columns a, b, a x b)."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def _matrix_to_quaternion(R: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 4) unit quaternion (w, x, y, z) with w >= 0 (Shepperd's method)."""
    m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
    trace = m00 + m11 + m22
    cands = torch.stack([trace, m00, m11, m22], -1)
    choice = cands.argmax(-1)
    # four formulas, each stable where its pivot is largest
    s0 = torch.sqrt((1 + trace).clamp_min(1e-12)) * 2
    q0 = torch.stack([0.25 * s0, (R[..., 2, 1] - R[..., 1, 2]) / s0, (R[..., 0, 2] - R[..., 2, 0]) / s0,
                      (R[..., 1, 0] - R[..., 0, 1]) / s0], -1)
    s1 = torch.sqrt((1 + m00 - m11 - m22).clamp_min(1e-12)) * 2
    q1 = torch.stack([(R[..., 2, 1] - R[..., 1, 2]) / s1, 0.25 * s1, (R[..., 0, 1] + R[..., 1, 0]) / s1,
                      (R[..., 0, 2] + R[..., 2, 0]) / s1], -1)
    s2 = torch.sqrt((1 + m11 - m00 - m22).clamp_min(1e-12)) * 2
    q2 = torch.stack([(R[..., 0, 2] - R[..., 2, 0]) / s2, (R[..., 0, 1] + R[..., 1, 0]) / s2, 0.25 * s2,
                      (R[..., 1, 2] + R[..., 2, 1]) / s2], -1)
    s3 = torch.sqrt((1 + m22 - m00 - m11).clamp_min(1e-12)) * 2
    q3 = torch.stack([(R[..., 1, 0] - R[..., 0, 1]) / s3, (R[..., 0, 2] + R[..., 2, 0]) / s3,
                      (R[..., 1, 2] + R[..., 2, 1]) / s3, 0.25 * s3], -1)
    q = torch.stack([q0, q1, q2, q3], -2)  # (..., 4 candidates, 4)
    q = torch.gather(q, -2, choice[..., None, None].expand(*choice.shape, 1, 4))[..., 0, :]
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def matrix_to_axis_angle(R: Tensor) -> Tensor:
    """(..., 3, 3) -> (..., 3) axis-angle with angle in [0, pi]."""
    q = _matrix_to_quaternion(R)
    w, v = q[..., :1], q[..., 1:]
    sin_half = v.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(sin_half, w)
    # angle / sin(angle/2); Taylor near 0: 2 / w * (1 + ...) -> use 2 + angle^2/12 form
    small = sin_half < 1e-6
    factor = torch.where(small, 2.0 / w.clamp_min(1e-12), angle / sin_half.clamp_min(1e-12))
    return v * factor


def axis_angle_to_6d(rotvec: Tensor) -> Tensor:
    return matrix_to_6d(axis_angle_to_matrix(rotvec))


def rot6d_to_axis_angle(d6: Tensor) -> Tensor:
    return matrix_to_axis_angle(rot6d_to_matrix(d6))


# --------------------------------------------------------------------------- encode / decode
def _as_tensor(value) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def _frames(params: Mapping, key: str, width: int, T: int | None) -> Tensor | None:
    if key not in params or params[key] is None:
        return None
    x = _as_tensor(params[key])
    if x.ndim == 1:
        x = x[None]
    if x.shape[-1] != width:
        raise ValueError(f"params[{key!r}]: expected (T, {width}), got {tuple(x.shape)}")
    if T is not None and x.shape[0] not in (1, T):
        raise ValueError(f"params[{key!r}]: {x.shape[0]} frames, expected {T}")
    return x


def encode(params: Mapping) -> np.ndarray:
    """FLAME parameters of T frames -> (T, 135) float64 codes (layout in the module docstring).

    ``params`` holds (T, n) arrays named like the tracking files: ``expression`` (T, <=100, or more:
    only the first 100 are kept), ``eyes`` (T, 6), ``neck``, ``jaw``, ``rotation``, ``translation``
    (T, 3) and optionally ``eyelids`` (T, 2). Missing entries are zero; T comes from
    ``expression`` (or ``rotation``).
    """
    ref = params.get("expression") if params.get("expression") is not None else params.get("rotation")
    if ref is None:
        raise ValueError("encode: params need at least 'expression' or 'rotation'")
    ref = _as_tensor(ref)
    T = ref.shape[0] if ref.ndim == 2 else 1
    code = torch.zeros(T, DIM, dtype=torch.float64)
    expr = params.get("expression")
    if expr is not None:
        e = _as_tensor(expr).reshape(T, -1)[:, :N_EXPR]
        code[:, : e.shape[1]] = e
    zero3 = torch.zeros(T, 3, dtype=torch.float64)

    def rot(key: str) -> Tensor:
        x = _frames(params, key, 3, T)
        return zero3 if x is None else x.expand(T, 3)

    eyes = _frames(params, "eyes", 6, T)
    eyes = torch.zeros(T, 6, dtype=torch.float64) if eyes is None else eyes.expand(T, 6)
    code[:, EYE_LEFT] = axis_angle_to_6d(eyes[:, :3])
    code[:, EYE_RIGHT] = axis_angle_to_6d(eyes[:, 3:])
    lids = _frames(params, "eyelids", 2, T)
    if lids is not None:
        code[:, EYELIDS] = lids.expand(T, 2)
    code[:, NECK] = axis_angle_to_6d(rot("neck"))
    code[:, JAW] = axis_angle_to_6d(rot("jaw"))
    code[:, HEAD_ROT] = axis_angle_to_6d(rot("rotation"))
    code[:, HEAD_TRANS] = rot("translation")
    return code.numpy()


def decode(code) -> dict[str, np.ndarray]:
    """(T, 135) codes -> FLAME parameters (float64): expression (T, 100), eyes (T, 6), eyelids (T, 2),
    neck/jaw/rotation (T, 3) axis-angle, translation (T, 3)."""
    c = _as_tensor(code)
    if c.ndim == 1:
        c = c[None]
    if c.shape[-1] != DIM:
        raise ValueError(f"decode: expected (T, {DIM}) codes, got {tuple(c.shape)}")
    out = {
        "expression": c[:, EXPR],
        "eyes": torch.cat([rot6d_to_axis_angle(c[:, EYE_LEFT]), rot6d_to_axis_angle(c[:, EYE_RIGHT])], -1),
        "eyelids": c[:, EYELIDS],
        "neck": rot6d_to_axis_angle(c[:, NECK]),
        "jaw": rot6d_to_axis_angle(c[:, JAW]),
        "rotation": rot6d_to_axis_angle(c[:, HEAD_ROT]),
        "translation": c[:, HEAD_TRANS],
    }
    return {k: v.clone().numpy() for k, v in out.items()}
