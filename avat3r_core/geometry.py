"""Plain geometry on numpy arrays (and the batched rigidity test the torch :class:`Cameras` shares).

Conventions are :mod:`avat3r_core.cameras`'s: ``world_to_cam`` (…, 4, 4) rigid ``[R | t]``; the
camera centre is ``-R^T t``. A tracked ``head_to_world`` is a rigid frame-to-world transform.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

# Tolerance of the rigidity checks (R R^T = I, last row [0, 0, 0, 1]); loose enough for float32
# data and calibration files written with ~6 significant digits.
RIGID_TOL = 1e-3


def rigid_errors(world_to_cam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-camera (last-row error, orthonormality error, det(R)) of (B, 4, 4) matrices."""
    with torch.no_grad():
        m = world_to_cam.detach().double()
        last = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=m.dtype, device=m.device)
        last_err = (m[:, 3, :] - last).abs().amax(dim=-1)
        r = m[:, :3, :3]
        eye = torch.eye(3, dtype=m.dtype, device=m.device)
        ortho_err = (r @ r.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2))
        # the triple product: elementwise, far cheaper than a batched LU for 3x3 blocks
        det = (torch.linalg.cross(r[:, 0], r[:, 1], dim=-1) * r[:, 2]).sum(-1)
    return last_err, ortho_err, det


def not_rigid(transforms: Any) -> np.ndarray:
    """Indices of the entries of ``transforms`` (16 values or a 4x4 each) that are not finite
    rigid transforms, by the rule :class:`Cameras` applies to ``world_to_cam``. Every reader of a
    tracked ``head_to_world`` checks it with this: a bad one would silently move every camera and
    position map of its frame."""
    H = np.asarray(transforms, np.float64).reshape(-1, 4, 4)
    finite = np.isfinite(H).all(axis=(1, 2))
    last_err, ortho_err, det = rigid_errors(torch.from_numpy(np.where(finite[:, None, None], H, np.eye(4))))
    rigid = finite & (last_err <= RIGID_TOL).numpy() & (ortho_err <= RIGID_TOL).numpy() & (det > 0).numpy()
    return np.flatnonzero(~rigid)


def is_rigid(values: Any) -> bool:
    """Whether ``values`` (16 numbers, flat or 4x4) are one finite rigid transform (:func:`not_rigid`)."""
    H = np.asarray(values, np.float64)
    return H.size == 16 and not len(not_rigid(H))


def to_head_frame(points: np.ndarray, head_to_world: np.ndarray) -> np.ndarray:
    """World points (..., 3) in a rigid frame given by its (4, 4) frame-to-world transform (e.g. a
    tracked head frame): ``R^T (p - t)``, in float32 (position maps' working precision)."""
    R, t = head_to_world[:3, :3].astype(np.float32), head_to_world[:3, 3].astype(np.float32)
    return (np.asarray(points, np.float32) - t) @ R
