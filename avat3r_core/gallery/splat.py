"""The compact web export of an avatar's Gaussians: the ``.splat`` layout web viewers load.

One 32-byte little-endian record per Gaussian, no header (the layout antimatter15's WebGL viewer
introduced and ``@mkkellogg/gaussian-splats-3d``'s ``SplatParser`` and Spark read)::

    float32 x 3   centre
    float32 x 3   scale, activated (exp of the .ply's log-scales)
    uint8   x 4   RGBA: the degree-0 colour (0.5 + SH_C0 * f_dc) and sigmoid(opacity), times 255
    uint8   x 4   unit quaternion (w, x, y, z) as round(q * 128 + 128), clipped to 0..255

The view-dependent SH bands are dropped (a viewer of this format shows degree 0, as the avatar's
previews do). Records are sorted most-visible first (opacity times volume), as the format's
writers do, so a progressive loader shows the body of the head before its fringe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avat3r_core import storage
from avat3r_core.gaussians import Gaussians

SPLAT_RECORD = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rotation", "u1", 4)])
SPLAT_SUFFIX = ".splat"


def splat_bytes(gaussians: Gaussians) -> bytes:
    """The ``.splat`` records of ``gaussians`` (see the module docstring)."""
    g = gaussians.detach().to("cpu")
    means = g.means.double().numpy()
    scales = g.scales.double().numpy()
    alpha = g.opacities.double().numpy()
    order = np.argsort(-alpha * scales.prod(axis=1), kind="stable")
    rgba = np.concatenate([g.colors.double().numpy(), alpha[:, None]], axis=1)
    records = np.empty(len(g), dtype=SPLAT_RECORD)
    records["position"] = means[order]
    records["scale"] = scales[order]
    records["rgba"] = np.clip(np.round(rgba[order] * 255.0), 0, 255)
    records["rotation"] = np.clip(np.round(g.rotations.double().numpy()[order] * 128.0 + 128.0), 0, 255)
    return records.tobytes()


def write_splat(ply_path: str | Path, splat_path: str | Path) -> int:
    """Convert a standard 3DGS ``.ply`` (read by :meth:`Gaussians.load_ply`, which names a broken
    file and property) to ``.splat``, written atomically; returns the bytes written."""
    return storage.atomic_write_bytes(splat_path, splat_bytes(Gaussians.load_ply(ply_path)))
