"""3D Gaussians: a container with activations, and the standard 3DGS ``.ply`` layout.

Parameters are stored raw (as a network predicts them or an optimiser updates them) and exposed
activated:

=================  ==========  ==========================================
stored             shape       activated
=================  ==========  ==========================================
``means``          (N, 3)      world-space centres
``quats``          (N, 4)      unit quaternion (w, x, y, z) via ``rotations``
``log_scales``     (N, 3)      ``scales = exp(log_scales)``
``opacity_logits`` (N,)        ``opacities = sigmoid(opacity_logits)``
``sh``             (N, K, 3)   K = (degree+1)²; ``sh[:, 0]`` is the DC term,
                               ``colors = 0.5 + SH_C0 · sh[:, 0]`` for degree 0
=================  ==========  ==========================================

The ``.ply`` layout is the de-facto one that 3DGS viewers read (see ``shared/FORMATS.md``):
``x y z nx ny nz f_dc_0..2 f_rest_0.. opacity scale_0..2 rot_0..3`` as little-endian float32,
where ``f_rest`` is stored channel-major (all coefficients of R, then G, then B) as the original
3DGS code writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avat3r_core.errors import FormatError, check_finite

SH_C0 = 0.28209479177387814


def rgb_to_sh_dc(rgb: Tensor) -> Tensor:
    """Inverse of the degree-0 colour activation: ``dc = (rgb - 0.5) / SH_C0``."""
    return (rgb - 0.5) / SH_C0


def sh_degree_from_k(k: int) -> int:
    degree = int(round(k**0.5)) - 1
    if (degree + 1) ** 2 != k:
        raise ValueError(f"SH coefficient count {k} is not a square (expected (degree+1)^2)")
    return degree


@dataclass
class Gaussians:
    means: Tensor
    quats: Tensor
    log_scales: Tensor
    opacity_logits: Tensor
    sh: Tensor

    def __post_init__(self) -> None:
        n = self.means.shape[0] if self.means.ndim == 2 else -1
        expected = {
            "means": (n, 3),
            "quats": (n, 4),
            "log_scales": (n, 3),
            "opacity_logits": (n,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape:
                raise FormatError("Gaussians", name, f"expected shape {shape}, got {tuple(value.shape)}")
        if self.sh.ndim != 3 or self.sh.shape[0] != n or self.sh.shape[2] != 3:
            raise FormatError("Gaussians", "sh", f"expected shape ({n}, K, 3), got {tuple(self.sh.shape)}")
        sh_degree_from_k(self.sh.shape[1])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_activated(
        cls,
        means: Tensor,
        rotations: Tensor,
        scales: Tensor,
        opacities: Tensor,
        colors: Tensor,
        eps: float = 1e-6,
    ) -> "Gaussians":
        """Build from activated values: scales > 0, opacities in (0, 1), RGB colours."""
        opacities = opacities.clamp(eps, 1 - eps)
        return cls(
            means=means,
            quats=rotations,
            log_scales=torch.log(scales.clamp_min(eps)),
            opacity_logits=torch.logit(opacities),
            sh=rgb_to_sh_dc(colors)[:, None, :],
        )

    # ------------------------------------------------------------------ activated views
    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_k(self.sh.shape[1])

    @property
    def rotations(self) -> Tensor:
        return torch.nn.functional.normalize(self.quats, dim=-1)

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def colors(self) -> Tensor:
        """View-independent colour from the DC term (what a degree-0 renderer shows)."""
        return (0.5 + SH_C0 * self.sh[:, 0]).clamp_min(0.0)

    @property
    def device(self) -> torch.device:
        return self.means.device

    # ------------------------------------------------------------------ set operations
    def _map(self, fn) -> "Gaussians":
        return Gaussians(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, device=None, dtype=None) -> "Gaussians":
        return self._map(lambda t: t.to(device=device, dtype=dtype))

    def detach(self) -> "Gaussians":
        return self._map(Tensor.detach)

    def filter(self, mask: Tensor) -> "Gaussians":
        """Keep the Gaussians where ``mask`` (bool (N,) or index tensor) selects."""
        return self._map(lambda t: t[mask])

    def __getitem__(self, index) -> "Gaussians":
        return self.filter(index)

    @staticmethod
    def cat(items: list["Gaussians"]) -> "Gaussians":
        if not items:
            raise ValueError("Gaussians.cat needs at least one item")
        degrees = {g.sh_degree for g in items}
        if len(degrees) != 1:
            raise ValueError(f"cannot concatenate Gaussians of different SH degrees {sorted(degrees)}")
        return Gaussians(**{f.name: torch.cat([getattr(g, f.name) for g in items]) for f in fields(Gaussians)})

    def validate(self, source: str | Path = "Gaussians") -> "Gaussians":
        """Raise :class:`NonFiniteError` naming the field if anything is NaN/Inf."""
        for f in fields(self):
            check_finite(getattr(self, f.name), source, f.name)
        return self

    # ------------------------------------------------------------------ .ply
    def save_ply(self, path: str | Path) -> None:
        """Write the standard 3DGS binary little-endian ``.ply``."""
        from plyfile import PlyData, PlyElement

        self.validate(path)
        g = self.detach().to("cpu", torch.float32)
        n = len(g)
        rest = g.sh[:, 1:, :].permute(0, 2, 1).reshape(n, -1)  # channel-major, as 3DGS writes
        columns = {
            "x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
            "nx": torch.zeros(n), "ny": torch.zeros(n), "nz": torch.zeros(n),
            **{f"f_dc_{i}": g.sh[:, 0, i] for i in range(3)},
            **{f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])},
            "opacity": g.opacity_logits,
            **{f"scale_{i}": g.log_scales[:, i] for i in range(3)},
            **{f"rot_{i}": g.quats[:, i] for i in range(4)},
        }
        vertex = np.empty(n, dtype=[(name, "<f4") for name in columns])
        for name, values in columns.items():
            vertex[name] = values.numpy()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(path))

    @classmethod
    def load_ply(cls, path: str | Path) -> "Gaussians":
        """Read a standard 3DGS ``.ply``; a missing property raises FormatError naming it."""
        from plyfile import PlyData

        try:
            ply = PlyData.read(str(path))
        except Exception as exc:  # plyfile raises several types for corrupt files
            raise FormatError(path, None, f"not a readable .ply file ({exc})") from exc
        if "vertex" not in ply:
            raise FormatError(path, "vertex", "no vertex element")
        vertex = ply["vertex"].data
        names = set(vertex.dtype.names)

        def column(name: str) -> np.ndarray:
            if name not in names:
                raise FormatError(path, name, "missing property in vertex element")
            return np.asarray(vertex[name], dtype=np.float32)

        def stack(prefix: str, count: int) -> Tensor:
            return torch.from_numpy(np.stack([column(f"{prefix}{i}") for i in range(count)], axis=1))

        n_rest = len([name for name in names if name.startswith("f_rest_")])
        if n_rest % 3:
            raise FormatError(path, "f_rest_*", f"{n_rest} coefficients is not a multiple of 3")
        k = 1 + n_rest // 3
        try:
            sh_degree_from_k(k)
        except ValueError as exc:
            raise FormatError(path, "f_rest_*", str(exc)) from exc
        n = len(vertex)
        dc = stack("f_dc_", 3)[:, None, :]
        rest = stack("f_rest_", n_rest).reshape(n, 3, k - 1).permute(0, 2, 1) if n_rest else dc[:, :0]
        gaussians = cls(
            means=torch.from_numpy(np.stack([column(a) for a in "xyz"], axis=1)),
            quats=stack("rot_", 4),
            log_scales=stack("scale_", 3),
            opacity_logits=torch.from_numpy(column("opacity")),
            sh=torch.cat([dc, rest], dim=1),
        )
        return gaussians.validate(path)
