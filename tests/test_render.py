"""Tests of the Gaussian splatting renderer (avat3r_core.render)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from avat3r_core.render import RenderOutput, rasterize, render
from avat3r_core.render.sh import SH_C0, eval_sh


def _rot_y(angle: float, dtype) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]], dtype=dtype)


def _cameras(n_cam: int, width: int, height: int, dtype, fx=45.0, fy=52.0, dist=2.5):
    views = []
    for c in range(n_cam):
        m = torch.eye(4, dtype=dtype)
        m[:3, :3] = _rot_y(0.35 * c - 0.3, dtype)
        m[:3, 3] = torch.tensor([0.07 * c, -0.05 * c, dist], dtype=dtype)
        views.append(m)
    ks = torch.tensor([[fx, 0.0, 0.47 * width], [0.0, fy, 0.53 * height], [0.0, 0.0, 1.0]],
                      dtype=dtype)
    return torch.stack(views), ks.expand(n_cam, 3, 3).clone()


def _scene(seed: int, n: int = 300, n_cam: int = 3, width: int = 40, height: int = 32,
           dtype=torch.float64, per_view_colors: bool = False):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * 0.7
    # some far off to the side (off-image), some behind every camera
    k = n // 10
    means[:k, 0] += 6.0
    means[k:2 * k, 2] -= 4.0
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = torch.exp(torch.randn(n, 3, generator=g, dtype=dtype) * 0.6 - 3.0)
    scales[2 * k:3 * k] = 1e-4  # tiny (sub-pixel: the eps2d blur dominates)
    scales[3 * k:3 * k + 5] *= 8.0  # a few large ones
    opac = torch.rand(n, generator=g, dtype=dtype) * 0.98 + 0.01
    opac[3 * k + 5:3 * k + 10] = 0.002  # below 1/255: culled
    opac[3 * k + 10:3 * k + 20] = 0.99
    if per_view_colors:
        colors = torch.rand(n_cam, n, 3, generator=g, dtype=dtype)
    else:
        colors = torch.rand(n, 3, generator=g, dtype=dtype)
    bg = torch.rand(n_cam, 3, generator=g, dtype=dtype)
    viewmats, ks = _cameras(n_cam, width, height, dtype)
    return dict(means=means, quats=quats, scales=scales, opacities=opac, colors=colors,
                viewmats=viewmats, Ks=ks, width=width, height=height, backgrounds=bg)


_DIFF = ("means", "quats", "scales", "opacities", "colors")


def _render_and_grad(scene: dict, backend: str, seed: int = 7):
    args = dict(scene)
    leaves = {k: scene[k].clone().requires_grad_(True) for k in _DIFF}
    args.update(leaves)
    out = rasterize(**args, backend=backend)
    g = torch.Generator().manual_seed(seed)
    w_rgb = torch.rand(out.rgb.shape, generator=g, dtype=out.rgb.dtype)
    w_a = torch.rand(out.alpha.shape, generator=g, dtype=out.rgb.dtype)
    w_d = torch.rand(out.alpha.shape, generator=g, dtype=out.rgb.dtype)
    loss = (out.rgb * w_rgb).sum() + (out.alpha * w_a).sum() + (out.depth * w_d).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in _DIFF])
    return out, dict(zip(_DIFF, grads))


@pytest.mark.parametrize("seed,per_view", [(0, False), (1, True), (2, False)])
def test_cpu_matches_dense_reference(seed, per_view):
    scene = _scene(seed, n=300 + 100 * seed, per_view_colors=per_view)
    out, grads = _render_and_grad(scene, "cpu")
    ref, ref_grads = _render_and_grad(scene, "reference")
    assert out.rgb.shape == (3, 32, 40, 3)
    assert out.alpha.shape == out.depth.shape == (3, 32, 40, 1)
    assert (ref.alpha > 0.5).float().mean() > 0.2  # the scene actually covers the images
    assert (out.rgb - ref.rgb).abs().max() < 1e-5
    assert (out.alpha - ref.alpha).abs().max() < 1e-5
    mask = ref.alpha > 0.5
    assert (out.depth - ref.depth)[mask].abs().max() < 1e-5
    for name in _DIFF:
        err = (grads[name] - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
        assert err < 1e-4, (name, err.item())


def test_cpu_float32_close_to_reference():
    scene = _scene(3)
    ref = rasterize(**scene, backend="reference")
    scene32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in scene.items()}
    out = rasterize(**scene32, backend="cpu")
    assert out.rgb.dtype == out.alpha.dtype == out.depth.dtype == torch.float32
    assert (out.rgb.double() - ref.rgb).abs().max() < 1e-4
    assert (out.alpha.double() - ref.alpha).abs().max() < 1e-4


# ---- analytic single-Gaussian cases -------------------------------------------------------------

F = 100.0
W = H = 16


def _single(depths, opacities, colors, scale=0.02, bg=None, xy=(0.0, 0.0)):
    """Isotropic Gaussians on the optical axis of an identity camera whose axis hits the centre
    of pixel (7, 7)."""
    n = len(depths)
    dt = torch.float64
    means = torch.tensor([[xy[0], xy[1], z] for z in depths], dtype=dt)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * n, dtype=dt)
    scales = torch.full((n, 3), scale, dtype=dt)
    ks = torch.tensor([[[F, 0.0, 7.5], [0.0, F, 7.5], [0.0, 0.0, 1.0]]], dtype=dt)
    backgrounds = None if bg is None else torch.tensor([bg], dtype=dt)
    return rasterize(means, quats, scales, torch.tensor(opacities, dtype=dt),
                     torch.tensor(colors, dtype=dt), torch.eye(4, dtype=dt)[None], ks, W, H,
                     backgrounds=backgrounds, backend="cpu")


@pytest.mark.parametrize("opacity", [0.7, 1.0])
def test_single_gaussian_analytic(opacity):
    z, s = 2.0, 0.02
    out = _single([z], [opacity], [[1.0, 0.5, 0.25]], scale=s)
    var = (F * s / z) ** 2 + 0.3  # projected variance plus the low-pass
    for (px, py) in [(7, 7), (8, 7), (9, 9), (5, 8)]:
        dx, dy = px - 7.0, py - 7.0
        sigma = 0.5 * (dx * dx + dy * dy) / var
        alpha = min(0.999, opacity * math.exp(-sigma))
        if alpha < 1 / 255:
            alpha = 0.0
        assert out.alpha[0, py, px, 0].item() == pytest.approx(alpha, abs=1e-12)
        assert out.rgb[0, py, px].tolist() == pytest.approx([alpha, 0.5 * alpha, 0.25 * alpha],
                                                            abs=1e-12)
        if alpha > 0:
            assert out.depth[0, py, px, 0].item() == pytest.approx(z, abs=1e-12)
    assert out.alpha[0, 0, 0, 0].item() == 0.0 and out.depth[0, 0, 0, 0].item() == 0.0


def test_background_composited_with_final_transmittance():
    out = _single([2.0], [0.6], [[1.0, 0.0, 0.0]], bg=[0.0, 0.2, 1.0])
    a = out.alpha[0, 7, 7, 0].item()
    assert a == pytest.approx(0.6)
    assert out.rgb[0, 7, 7].tolist() == pytest.approx([a, 0.2 * (1 - a), 1 - a], abs=1e-12)
    assert out.rgb[0, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0], abs=1e-12)
    assert out.depth[0, 7, 7, 0].item() == pytest.approx(2.0)  # background adds no depth


def test_opacity_below_threshold_contributes_nothing():
    out = _single([2.0], [0.9 / 255.0], [[1.0, 1.0, 1.0]], scale=0.2, bg=[0.1, 0.2, 0.3])
    assert out.alpha.abs().max().item() == 0.0
    assert torch.allclose(out.rgb, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64).expand_as(out.rgb))


def test_nearer_opaque_gaussian_wins():
    # far green listed first: order must come from depth, not from the array
    out = _single([3.0, 2.0], [1.0, 1.0], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], bg=[0.0, 0.0, 1.0])
    # near red: alpha 0.999 -> T = 1e-3; green would take T to 1e-6 <= 1e-4 -> stop before it
    assert out.rgb[0, 7, 7].tolist() == pytest.approx([0.999, 0.0, 0.001], abs=1e-12)
    assert out.depth[0, 7, 7, 0].item() == pytest.approx(2.0, abs=1e-12)


def test_transmittance_stop_rule():
    cols = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    out = _single([2.0, 2.1, 2.2, 2.3], [0.95] * 4, cols)
    # T: 1 -> .05 -> .0025 -> 1.25e-4; the 4th would give 6.25e-6 <= 1e-4: it is not included
    w = [0.95, 0.95 * 0.05, 0.95 * 0.0025]
    assert out.rgb[0, 7, 7].tolist() == pytest.approx(w, abs=1e-12)
    assert out.alpha[0, 7, 7, 0].item() == pytest.approx(1 - 1.25e-4, abs=1e-12)
    exp_depth = (2.0 * w[0] + 2.1 * w[1] + 2.2 * w[2]) / (1 - 1.25e-4)
    assert out.depth[0, 7, 7, 0].item() == pytest.approx(exp_depth, abs=1e-12)


def test_behind_camera_and_off_image_culled():
    out = _single([-2.0], [1.0], [[1.0, 1.0, 1.0]], scale=0.1)
    assert out.alpha.abs().max().item() == 0.0
    out = _single([2.0], [1.0], [[1.0, 1.0, 1.0]], scale=0.01, xy=(5.0, 0.0))
    assert out.alpha.abs().max().item() == 0.0


def test_empty_scene_renders_background():
    means = torch.zeros(0, 3, requires_grad=True)
    out = rasterize(means, torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3),
                    torch.eye(4)[None], torch.eye(3)[None], 8, 6,
                    backgrounds=torch.tensor([[0.1, 0.2, 0.3]]))
    assert out.rgb.shape == (1, 6, 8, 3)
    assert torch.allclose(out.rgb, torch.tensor([0.1, 0.2, 0.3]).expand(1, 6, 8, 3))
    assert out.alpha.abs().max() == 0 and out.depth.abs().max() == 0
    out.rgb.sum().backward()
    assert means.grad.shape == (0, 3)


# ---- gradients ----------------------------------------------------------------------------------

def test_gradcheck_cpu_float64():
    dt = torch.float64
    g = torch.Generator().manual_seed(3)
    n = 5
    means = (torch.rand(n, 3, generator=g, dtype=dt) - 0.5) * torch.tensor([0.8, 0.8, 0.6], dtype=dt)
    quats = torch.randn(n, 4, generator=g, dtype=dt)
    scales = torch.rand(n, 3, generator=g, dtype=dt) * 0.3 + 0.35
    opac = torch.rand(n, generator=g, dtype=dt) * 0.5 + 0.3
    colors = torch.rand(n, 3, generator=g, dtype=dt)
    bg = torch.rand(1, 3, generator=g, dtype=dt)
    viewmats, ks = _cameras(1, 8, 8, dt, fx=8.0, fy=9.0, dist=2.0)

    def fn(m, q, s, o, c, b):
        out = rasterize(m, q, s, o, c, viewmats, ks, 8, 8, backgrounds=b, backend="cpu",
                        tile_size=4)
        return out.rgb, out.alpha, out.depth

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, quats, scales, opac, colors, bg))
    out = fn(*inputs)
    assert out[1].min() > 0.02  # every pixel is covered
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_background_gradient():
    scene = _scene(4, n=200)
    bg = scene.pop("backgrounds").clone().requires_grad_(True)
    out = rasterize(**scene, backgrounds=bg, backend="cpu")
    (out.rgb.sum()).backward()
    expected = (1.0 - out.alpha.detach()).sum(dim=(1, 2)).expand(-1, 3)
    assert torch.allclose(bg.grad, expected)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,bad", [
    ("means", torch.zeros(10, 2)),
    ("quats", torch.zeros(9, 4)),
    ("scales", torch.zeros(10, 3, 1)),
    ("opacities", torch.zeros(10, 1)),
    ("colors", torch.zeros(10, 4)),
    ("viewmats", torch.zeros(2, 3, 4)),
    ("Ks", torch.zeros(3, 3, 3)),
    ("backgrounds", torch.zeros(2, 4)),
])
def test_shape_errors_name_the_argument(name, bad):
    args = dict(means=torch.zeros(10, 3), quats=torch.zeros(10, 4), scales=torch.ones(10, 3),
                opacities=torch.ones(10), colors=torch.zeros(10, 3),
                viewmats=torch.eye(4).expand(2, 4, 4), Ks=torch.eye(3).expand(2, 3, 3),
                width=8, height=8, backgrounds=torch.zeros(2, 3))
    args[name] = bad
    with pytest.raises(ValueError, match=name):
        rasterize(**args)


def test_bad_backend_and_size():
    args = dict(means=torch.zeros(1, 3), quats=torch.zeros(1, 4), scales=torch.ones(1, 3),
                opacities=torch.ones(1), colors=torch.zeros(1, 3), viewmats=torch.eye(4)[None],
                Ks=torch.eye(3)[None], width=8, height=8)
    with pytest.raises(ValueError, match="backend"):
        rasterize(**args, backend="vulkan")
    with pytest.raises(ValueError, match="width"):
        rasterize(**{**args, "width": 0})


# ---- spherical harmonics and render() -------------------------------------------------------------

@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat_torch_impl(degree):
    from gsplat.cuda._torch_impl import _spherical_harmonics

    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(50, 3, generator=g, dtype=torch.float64)
    coeffs = torch.randn(50, 16, 3, generator=g, dtype=torch.float64)
    expected = _spherical_harmonics(degree, dirs, coeffs)
    assert torch.allclose(eval_sh(degree, dirs, coeffs), expected, atol=1e-10)


def _duck(scene: dict, degree: int):
    g = torch.Generator().manual_seed(11)
    n = scene["means"].shape[0]
    sh = torch.randn(n, (degree + 1) ** 2, 3, generator=g, dtype=torch.float64) * 0.3
    gaussians = SimpleNamespace(means=scene["means"], quats=scene["quats"], scales=scene["scales"],
                                opacities=scene["opacities"], sh=sh, sh_degree=degree)
    cameras = SimpleNamespace(world_to_cam=scene["viewmats"], K=scene["Ks"],
                              width=scene["width"], height=scene["height"])
    return gaussians, cameras


def test_render_degree0_is_dc_colour():
    scene = _scene(5, n=150)
    gaussians, cameras = _duck(scene, 0)
    bg = torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64)
    out = render(gaussians, cameras, background=bg, backend="cpu")
    colors = (0.5 + SH_C0 * gaussians.sh[:, 0]).clamp_min(0.0)
    ref = rasterize(scene["means"], scene["quats"], scene["scales"], scene["opacities"], colors,
                    scene["viewmats"], scene["Ks"], scene["width"], scene["height"],
                    backgrounds=bg.expand(3, 3), backend="cpu")
    assert isinstance(out, RenderOutput)
    assert torch.equal(out.rgb, ref.rgb) and torch.equal(out.alpha, ref.alpha)


def test_render_view_dependent_sh_matches_gsplat_convention():
    from gsplat.cuda._torch_impl import _spherical_harmonics

    scene = _scene(6, n=150)
    gaussians, cameras = _duck(scene, 2)
    out = render(gaussians, cameras, backend="cpu")
    campos = torch.inverse(scene["viewmats"])[:, :3, 3]
    dirs = scene["means"][None] - campos[:, None]
    colors = torch.clamp_min(
        _spherical_harmonics(2, dirs, gaussians.sh[None].expand(3, -1, -1, -1)) + 0.5, 0.0)
    ref = rasterize(scene["means"], scene["quats"], scene["scales"], scene["opacities"], colors,
                    scene["viewmats"], scene["Ks"], scene["width"], scene["height"], backend="cpu")
    assert torch.allclose(out.rgb, ref.rgb, atol=1e-10)


# ---- CUDA backend -------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat backend needs CUDA")
def test_gsplat_backend_matches_cpu():
    scene = _scene(7, dtype=torch.float32)
    cpu = rasterize(**scene, backend="cpu")
    cuda = rasterize(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in scene.items()},
                     backend="auto")
    assert (cuda.rgb.cpu() - cpu.rgb).abs().max() < 1e-3
    assert (cuda.alpha.cpu() - cpu.alpha).abs().max() < 1e-3
    mask = cpu.alpha > 0.5
    assert (cuda.depth.cpu() - cpu.depth)[mask].abs().max() < 1e-2
