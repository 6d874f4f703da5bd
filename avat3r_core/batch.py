"""The typed training/evaluation batch: what the loader yields and the trainer consumes.

One item = one (subject, sequence, target timestep): V input views taken at *other* timesteps of
the same subject and sequence (different expressions), and T supervision views at the target
timestep with its expression code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from avat3r_core.cameras import Cameras


@dataclass
class Avat3rBatch:
    # inputs (B samples, V views)
    images: Tensor  # (B, V, 3, H, W) float in [0, 1]
    alphas: Tensor  # (B, V, 1, H, W)
    cameras: Cameras  # B·V cameras, sample-major
    position_maps: Tensor  # (B, V, 3, H, W) points in the cameras' frame (world, or each view's head frame)
    confidence: Tensor  # (B, V, H, W) in [0, 1]
    features: Tensor | None  # (B, V, C, h, w) or None (no feature source)
    # supervision (T target views at one timestep)
    target_images: Tensor  # (B, T, 3, H, W)
    target_alphas: Tensor  # (B, T, 1, H, W)
    target_cameras: Cameras  # B·T cameras, sample-major
    expression: Tensor  # (B, 135) expression code of the target timestep
    # bookkeeping
    keys: list[str]  # sample keys (<pid>_<seq>_<frame:06d> of the target)
    input_frames: Tensor  # (B, V) timestep of each input view
    target_frames: Tensor  # (B,) target timestep
    #: (B, 4, 4) the target timestep's head frame → world (identity when the batch is in the
    #: world frame); ``target_cameras.world_to_cam @ inverse`` gives the capture's world cameras
    target_head_to_world: Tensor | None = None
    #: (B, V, 4, 4) the same for each input view's own timestep
    input_head_to_world: Tensor | None = None
    #: (B, V, 135) the expression code of each input view's own timestep: what the inputs show,
    #: the reference an expression-sensitivity measurement replaces the target's code with
    input_expressions: Tensor | None = None
    #: (B, T, 1, H, W) per-pixel weights of the photometric loss (None: every pixel 1), e.g. the
    #: mouth raised (:class:`avat3r_core.animation.sensitivity.MouthWeights`)
    target_weights: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "Avat3rBatch":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to(device) if isinstance(value, (Tensor, Cameras)) else value
        return Avat3rBatch(**out)

    def is_finite(self) -> bool:
        """False if any float tensor holds NaN/Inf (the trainer skips such batches)."""
        tensors = [getattr(self, f.name) for f in fields(self)]
        return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, Tensor) and t.is_floating_point())


# --------------------------------------------------------------------------- data
def cat_batches(samples: list[Avat3rBatch]) -> Avat3rBatch:
    """Concatenate batches along the sample axis."""
    if len(samples) == 1:
        return samples[0]
    cat = lambda name: torch.cat([getattr(s, name) for s in samples])  # noqa: E731
    return Avat3rBatch(
        images=cat("images"), alphas=cat("alphas"), cameras=Cameras.cat([s.cameras for s in samples]),
        position_maps=cat("position_maps"), confidence=cat("confidence"),
        features=None if samples[0].features is None else cat("features"),
        target_images=cat("target_images"), target_alphas=cat("target_alphas"),
        target_cameras=Cameras.cat([s.target_cameras for s in samples]), expression=cat("expression"),
        keys=[k for s in samples for k in s.keys], input_frames=cat("input_frames"), target_frames=cat("target_frames"),
        target_head_to_world=None if any(s.target_head_to_world is None for s in samples) else cat("target_head_to_world"),
        input_head_to_world=None if any(s.input_head_to_world is None for s in samples) else cat("input_head_to_world"),
        input_expressions=None if any(s.input_expressions is None for s in samples) else cat("input_expressions"),
        target_weights=None if any(s.target_weights is None for s in samples) else cat("target_weights"))
