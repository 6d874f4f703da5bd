"""Gaussian container: activations, set operations, and the standard 3DGS .ply layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from avat3r_core.errors import FormatError, NonFiniteError
from avat3r_core.gaussians import SH_C0, Gaussians, rgb_to_sh_dc


def random_gaussians(n=50, degree=0, seed=0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians(
        means=torch.randn(n, 3, generator=g),
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.randn(n, 3, generator=g) - 3,
        opacity_logits=torch.randn(n, generator=g),
        sh=torch.randn(n, (degree + 1) ** 2, 3, generator=g),
    )


def test_activations():
    rgb = torch.tensor([[0.2, 0.5, 0.9]])
    g = Gaussians.from_activated(
        means=torch.zeros(1, 3), rotations=torch.tensor([[2.0, 0, 0, 0]]),
        scales=torch.tensor([[0.1, 0.2, 0.3]]), opacities=torch.tensor([0.7]), colors=rgb,
    )
    torch.testing.assert_close(g.colors, rgb)
    torch.testing.assert_close(g.scales, torch.tensor([[0.1, 0.2, 0.3]]))
    torch.testing.assert_close(g.opacities, torch.tensor([0.7]))
    torch.testing.assert_close(g.rotations, torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(rgb_to_sh_dc(rgb) * SH_C0 + 0.5, rgb)


def test_filter_cat_and_shape_checks():
    g = random_gaussians(10)
    kept = g.filter(g.opacities > 0.5)
    assert len(kept) == int((g.opacities > 0.5).sum())
    both = Gaussians.cat([g, kept])
    assert len(both) == 10 + len(kept)
    torch.testing.assert_close(both.means[10:], kept.means)
    with pytest.raises(ValueError, match="different SH degrees"):
        Gaussians.cat([g, random_gaussians(3, degree=1)])
    with pytest.raises(FormatError, match=r"\[quats\]"):
        Gaussians(g.means, g.quats[:, :3], g.log_scales, g.opacity_logits, g.sh)


@pytest.mark.parametrize("degree", [0, 3])
def test_ply_round_trip_standard_layout(tmp_path, degree):
    g = random_gaussians(40, degree)
    path = tmp_path / "avatar.ply"
    g.save_ply(path)
    ply = PlyData.read(str(path))
    names = [p.name for p in ply["vertex"].properties]
    n_rest = 3 * ((degree + 1) ** 2 - 1)
    assert names == (
        ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        + [f"f_rest_{i}" for i in range(n_rest)]
        + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    )
    assert all(p.val_dtype in ("f4", "float32") for p in ply["vertex"].properties)
    assert ply.byte_order == "<" and not ply.text
    # channel-major f_rest: f_rest_0 is the first non-DC coefficient of the red channel
    if degree:
        np.testing.assert_allclose(ply["vertex"]["f_rest_0"], g.sh[:, 1, 0].numpy(), rtol=1e-6)
        np.testing.assert_allclose(ply["vertex"][f"f_rest_{n_rest // 3}"], g.sh[:, 1, 1].numpy(), rtol=1e-6)
    back = Gaussians.load_ply(path)
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        torch.testing.assert_close(getattr(back, name), getattr(g, name))


def test_ply_missing_field_and_nan_are_named(tmp_path):
    vertex = np.zeros(3, dtype=[(n, "<f4") for n in ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                                                       "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2"]])
    path = tmp_path / "broken.ply"
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    with pytest.raises(FormatError, match=r"broken\.ply \[rot_3\]: missing property"):
        Gaussians.load_ply(path)
    g = random_gaussians(4)
    g.opacity_logits[2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"nan\.ply \[opacity_logits\]: 1 of 4"):
        g.save_ply(tmp_path / "nan.ply")
    (tmp_path / "garbage.ply").write_bytes(b"not a ply at all")
    with pytest.raises(FormatError, match="garbage.ply"):
        Gaussians.load_ply(tmp_path / "garbage.ply")
