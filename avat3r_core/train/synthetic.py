"""An in-memory :data:`~avat3r_core.train.loop.BatchSource` for tests and benchmarks: a random
Gaussian blob "head" rendered from cameras around it, with exact position maps."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import torch

from avat3r_core.cameras import Cameras
from avat3r_core.batch import Avat3rBatch, cat_batches
from avat3r_core.gaussians import Gaussians
from avat3r_core.render import render
from avat3r_core.tracking import EXPRESSION_DIM


def synthetic_sample(index: int, size: int = 32, num_inputs: int = 2, num_targets: int = 2, seed: int = 0,
                     num_points: int = 3000, expr_dim: int = EXPRESSION_DIM, expression_scale: float = 0.0,
                     feature_dim: int = 0) -> Avat3rBatch:
    """One sample (B = 1) of a synthetic scene: a random blob of Gaussians (the "head", fixed by
    ``seed + index``) rendered from ``num_inputs + num_targets`` cameras on an arc in front of it.
    Input position maps are exact (the rendered depth unprojected), confidence is 1 where the
    rendered alpha exceeds 0.5, colours are straight (rendered over black, divided by alpha).
    ``feature_dim`` > 0 adds a random (1, V, feature_dim, size/8, size/8) feature map (a stand-in
    with the right shape, for models built with features; it carries no information)."""
    g = torch.Generator().manual_seed(1000 * seed + index)
    n = num_points
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.05, 0.06, 0.045])
    # smooth colour field (a few random sinusoids of position) + a little per-point noise
    freq = torch.randn(3, 3, generator=g) * 12.0
    phase = torch.rand(3, generator=g) * 2 * math.pi
    colors = 0.5 + 0.35 * torch.sin(means @ freq + phase) + 0.05 * torch.randn(n, 3, generator=g)
    head = Gaussians.from_activated(means, torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
                                    torch.full((n, 3), 0.006), torch.full((n,), 0.8), colors.clamp(0, 1))
    k = num_inputs + num_targets
    azimuth = (torch.rand(k, generator=g) - 0.5) * math.radians(70)
    elevation = (torch.rand(k, generator=g) - 0.5) * math.radians(30)
    radius = 0.95 + 0.1 * torch.rand(k, generator=g)
    eyes = torch.stack([radius * torch.sin(azimuth) * torch.cos(elevation), radius * torch.sin(elevation),
                        radius * torch.cos(azimuth) * torch.cos(elevation)], dim=-1)
    cams = Cameras.look_at(eyes, torch.zeros(3), fov_deg=20, width=size, height=size)
    with torch.no_grad():
        out = render(head, cams)  # over black: straight colour = rgb / alpha
    alpha = out.alpha.permute(0, 3, 1, 2)
    rgb = (out.rgb.permute(0, 3, 1, 2) / alpha.clamp_min(1e-6)).clamp(0, 1)
    uv = cams.pixel_grid().reshape(1, -1, 2).expand(k, -1, -1)
    points = cams.unproject(uv, out.depth[..., 0].reshape(k, -1).clamp_min(0.1)).reshape(k, size, size, 3)
    i, t = list(range(num_inputs)), list(range(num_inputs, k))
    expression = torch.randn(1, expr_dim, generator=g) * expression_scale
    features = (torch.randn(1, num_inputs, feature_dim, max(1, size // 8), max(1, size // 8), generator=g)
                if feature_dim > 0 else None)
    return Avat3rBatch(
        images=rgb[None, i], alphas=alpha[None, i], cameras=cams[i],
        position_maps=points.permute(0, 3, 1, 2)[None, i].contiguous(), confidence=(alpha[None, i, 0] > 0.5).float(),
        features=features, target_images=rgb[None, t], target_alphas=alpha[None, t], target_cameras=cams[t],
        expression=expression, keys=[f"synth{seed}_s{index:03d}"], input_frames=torch.tensor([i]),
        target_frames=torch.tensor([num_inputs]))


class SyntheticSource:
    """In-memory :data:`BatchSource` over ``num_samples`` synthetic samples (built once per
    process). Rank ``r`` of ``w`` gets samples ``r, r + w, ...`` of the epoch's order (shuffled by
    ``seed + epoch`` when ``shuffle``), grouped into batches of ``batch_size`` (the remainder is
    dropped so ranks stay in step). ``nan_samples``: indices whose position map gets a NaN (to test
    the guard). Picklable: Ray ships it to the workers."""

    def __init__(self, num_samples: int = 4, size: int = 32, num_inputs: int = 2, num_targets: int = 2,
                 batch_size: int = 1, seed: int = 0, shuffle: bool = True, nan_samples: tuple[int, ...] = (),
                 expression_scale: float = 0.0, feature_dim: int = 0):
        self.num_samples, self.size, self.num_inputs, self.num_targets = num_samples, size, num_inputs, num_targets
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.nan_samples = tuple(nan_samples)
        self.expression_scale, self.feature_dim = expression_scale, feature_dim
        self._cache: list[Avat3rBatch] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def samples(self) -> list[Avat3rBatch]:
        if self._cache is None:
            out = []
            for i in range(self.num_samples):
                s = synthetic_sample(i, self.size, self.num_inputs, self.num_targets, self.seed,
                                     expression_scale=self.expression_scale, feature_dim=self.feature_dim)
                if i in self.nan_samples:
                    s.position_maps[0, 0, :, self.size // 2, self.size // 2] = float("nan")
                out.append(s)
            self._cache = out
        return self._cache

    def __call__(self, rank: int = 0, world_size: int = 1, epoch: int = 0) -> Iterator[Avat3rBatch]:
        samples = self.samples()
        order = list(range(len(samples)))
        if self.shuffle:
            random.Random(self.seed * 7919 + epoch).shuffle(order)
        mine = order[rank::world_size]
        per_rank = len(order) // world_size  # equal shard lengths on every rank
        mine = mine[:per_rank - per_rank % self.batch_size]
        for start in range(0, len(mine), self.batch_size):
            yield cat_batches([samples[i] for i in mine[start:start + self.batch_size]])
