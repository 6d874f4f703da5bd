"""Gaussians on the surface of the studio's procedural head: a head-shaped splat of known geometry.

Used where a Gaussian set that looks like a head is needed without a trained network (the web
viewer's browser test and benchmark): it is not a reconstruction and is never labelled as one.
Axes as the head model (metres, y up, z out of the face).
"""

from __future__ import annotations

import numpy as np
import torch

from avat3r_core.gaussians import Gaussians
from avat3r_core.synthetic.appearance import sample_appearance, vertex_albedo
from avat3r_core.synthetic.head import build_head_model


def head_surface_gaussians(n: int, seed: int = 0, model: dict | None = None) -> Gaussians:
    """``n`` isotropic Gaussians sampled area-uniformly on the neutral head mesh (``model``: a
    :func:`build_head_model` dict, built with seed 0 when not given), coloured by the albedo of the
    appearance ``seed``; each about as wide as the spacing between samples, so the surface is closed."""
    if n < 1:
        raise ValueError(f"head_surface_gaussians: n must be >= 1, got {n}")
    model = build_head_model(0) if model is None else model
    vertices = np.asarray(model["v_template"], np.float64)
    faces = np.asarray(model["f"], np.int64)
    albedo = vertex_albedo(model, sample_appearance(seed))
    corners = vertices[faces]
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=n, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(n)), rng.random(n)  # uniform on a triangle
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    points = np.einsum("nk,nkc->nc", bary, corners[face])
    colors = np.einsum("nk,nkc->nc", bary, albedo[faces[face]])
    spacing = float(np.sqrt(area.sum() / n))
    return Gaussians.from_activated(
        means=torch.tensor(points, dtype=torch.float32),
        rotations=torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1),
        scales=torch.full((n, 3), 0.6 * spacing),
        opacities=torch.full((n,), 0.95),
        colors=torch.tensor(colors, dtype=torch.float32),
    )
