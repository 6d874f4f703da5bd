"""Plain geometry on numpy arrays (and the batched rigidity test the torch :class:`Cameras` shares).

It imports torch only inside the rigidity test: the extract workers, which run without torch,
use the rest.

Conventions are :mod:`avat3r_core.cameras`'s: ``world_to_cam`` (…, 4, 4) rigid ``[R | t]``; the
camera centre is ``-R^T t``. A tracked ``head_to_world`` is a rigid frame-to-world transform.
"""

from __future__ import annotations

from typing import Any

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


#: the coordinate frames views can be expressed in. The choice is the loader's (``LoaderConfig.frame``,
#: default ``head``: each view in its timestep's tracked head frame); the trained model records it
#: (``Avat3rConfig.frame``, whose default ``world`` is what checkpoints from before the record were),
#: and evaluation and reconstruction follow the model's.
FRAMES = ("head", "world")

# Tolerance of the rigidity checks (R R^T = I, last row [0, 0, 0, 1]); loose enough for float32
# data and calibration files written with ~6 significant digits.
RIGID_TOL = 1e-3


def rigid_errors(world_to_cam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-camera (last-row error, orthonormality error, det(R)) of (B, 4, 4) matrices."""
    import torch

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
    import torch

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


def farthest_views(centers: np.ndarray, k: int, rng: random.Random | None = None, groups: np.ndarray | None = None,
                   tol: float = 1e-6) -> list[int]:
    """k-farthest viewpoint sampling: indices of ``k`` of the candidate ``centers`` (N, 3).

    A first pick, then repeatedly the candidate farthest (Euclidean, camera centres) from every
    pick so far; among near-ties, candidates whose ``groups`` label (the timestep) has not been
    picked yet come first. With ``rng`` (training) the first pick and the tie-break are random;
    without it the choice is deterministic — the camera nearest the mean centre first (the frontal
    one of a frontal rig), ties to the lowest index — so a rebuilt avatar gets the same views.
    Candidates are picked at most once, so ``k > N`` returns all N (in pick order).
    """
    centers = np.asarray(centers, np.float64)
    n = len(centers)
    if n == 0:
        return []
    if rng is not None:
        picks = [rng.randrange(n)]
    else:
        picks = [int(np.argmin(np.linalg.norm(centers - centers.mean(0), axis=1)))]
    dist = np.linalg.norm(centers - centers[picks[0]], axis=1)
    dist[picks[0]] = -1.0
    while len(picks) < min(k, n):
        best = dist.max()
        ties = np.flatnonzero(dist >= best - tol)
        if groups is not None:
            fresh = ties[~np.isin(groups[ties], groups[picks])]
            ties = fresh if len(fresh) else ties
        nxt = int(ties[rng.randrange(len(ties))]) if rng is not None else int(ties[0])
        picks.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(centers - centers[nxt], axis=1))
        dist[picks] = -1.0
    return picks


def camera_centers(world_to_cam: np.ndarray) -> np.ndarray:
    """(..., 3) camera centres ``-R^T t`` of (..., 4, 4) rigid world-to-camera transforms (float64).
    The torch :attr:`Cameras.centers <avat3r_core.cameras.Cameras.centers>` is the same for tensors."""
    w2c = np.asarray(world_to_cam, np.float64)
    return -np.einsum("...ji,...j->...i", w2c[..., :3, :3], w2c[..., :3, 3])


class HeadFrameError(ValueError):
    """Tracked head frames that cannot be used: the indices of those ``missing`` (None: tracking
    from before head frames) and of those ``not_rigid``; ``first`` is the lowest of both. Each
    reader turns it into its own error naming its file."""

    def __init__(self, missing: list[int], not_rigid: list[int]):
        self.missing, self.not_rigid = missing, not_rigid
        self.first = min(missing + not_rigid)
        self.first_missing = self.first in missing
        super().__init__(f"{len(missing)} head frames missing, {len(not_rigid)} not rigid (first: entry {self.first})")


def head_frames(values: Sequence[Any]) -> np.ndarray:
    """(N, 4, 4) float64 of tracked ``head_to_world`` entries (16 numbers each, flat or 4x4, or None),
    each checked with :func:`is_rigid`: the one reader of tracked head frames (the loader's
    samples, reconstruction's capture inputs, driving head motion). Raises :class:`HeadFrameError`."""
    missing = [i for i, v in enumerate(values) if v is None]
    bad = [i for i, v in enumerate(values) if v is not None and not is_rigid(v)]
    if missing or bad:
        raise HeadFrameError(missing, bad)
    return np.array([np.asarray(v, np.float64).reshape(4, 4) for v in values]).reshape(-1, 4, 4)
