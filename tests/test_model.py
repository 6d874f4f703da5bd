"""Tests of the Avat3r network (avat3r_core.model): shapes, skips, masking, cache, ablations, FLOPs."""

from __future__ import annotations

import time

import pytest
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.config import build
from avat3r_core.errors import FormatError
from avat3r_core.gaussians import Gaussians
from avat3r_core.model import (
    Avat3r,
    Avat3rConfig,
    Avat3rInputs,
    flops_estimate,
    model_info,
    parameter_count,
)


def tiny(**overrides) -> Avat3rConfig:
    return build(Avat3rConfig, overrides, preset="tiny")


def make_inputs(cfg: Avat3rConfig, batch: int = 1, seed: int = 0, features: bool = True, size: int | None = None):
    """B samples of V views on a rig around the origin; position maps = points at depth 0.9–1.1."""
    g = torch.Generator().manual_seed(seed)
    v, s = cfg.num_views, size or cfg.image_size
    cams = Cameras.rig_arc(n=batch * v, radius=1.0, fov_deg=20.0, width=s, height=s)
    uv = cams.pixel_grid().unsqueeze(0).expand(batch * v, -1, -1, -1)
    depth = 0.9 + 0.2 * torch.rand(batch * v, s, s, generator=g)
    pos = cams.unproject(uv, depth)  # (BV, H, W, 3)
    feats = None
    if features and cfg.feature_dim:
        fs = max(1, s // 16)
        feats = torch.randn(batch, v, cfg.feature_dim, fs, fs, generator=g)
    return Avat3rInputs(
        images=torch.rand(batch, v, 3, s, s, generator=g),
        cameras=cams,
        position_maps=pos.reshape(batch, v, s, s, 3).permute(0, 1, 4, 2, 3).contiguous(),
        confidence=torch.rand(batch, v, s, s, generator=g) * 2,
        features=feats,
    )


def expr(cfg: Avat3rConfig, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, cfg.expr_dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_model() -> Avat3r:
    torch.manual_seed(0)
    return Avat3r(tiny()).eval()


# ------------------------------------------------------------------------------------ config
def test_presets_and_validation():
    paper = build(Avat3rConfig, preset="paper")
    assert (paper.num_views, paper.image_size, paper.patch_size, paper.dim) == (4, 512, 16, 768)
    assert paper.num_heads == 12 and paper.depth == 8 and paper.cross_attn_layers == 8
    assert paper.num_tokens == 4 * 32 * 32 and paper.encoder_blocks == 1
    assert paper.expr_dim == 135 and paper.num_expr_tokens == 4 and paper.confidence_threshold == 0.5
    assert tiny().num_heads == 2 and tiny().encoder_blocks == 1
    assert build(Avat3rConfig, {"depth": 4, "cross_attn_layers": 2}).encoder_blocks == 3
    with pytest.raises(FormatError, match="patch_size"):
        build(Avat3rConfig, {"image_size": 100}, preset="tiny")
    with pytest.raises(FormatError, match="head_dim"):
        build(Avat3rConfig, {"dim": 100}, preset="tiny")
    with pytest.raises(FormatError, match="unknown key"):
        build(Avat3rConfig, {"dimension": 100}, preset="tiny")
    with pytest.raises(FormatError, match="frame"):
        build(Avat3rConfig, {"frame": "camera"})
    # a value another config's own check rejects (plain ValueError) is named with its source too
    from stages.track import TrackConfig

    with pytest.raises(FormatError, match=r"params.yaml:track: invalid TrackConfig: .*landmarks"):
        build(TrackConfig, {"landmarks": "nope", "ground_truth_root": "x"}, source="params.yaml:track")
    # the landmark backend's old name in the track section names the new one
    from avat3r_core.config import RenamedKeyError

    with pytest.raises(RenamedKeyError, match=r"track\.backend is now track\.landmarks"):
        build(TrackConfig, {"backend": "mediapipe"}, source="params.yaml:track")


# ------------------------------------------------------------------------------------ shapes
def test_tiny_shapes_and_gaussians(tiny_model):
    cfg = tiny_model.config
    inputs = make_inputs(cfg, batch=2)
    with torch.no_grad():
        out = tiny_model(inputs, expr(cfg, 2))
    b, v, s = 2, cfg.num_views, cfg.image_size
    assert out.means.shape == (b, v, s, s, 3)
    assert out.quats.shape == (b, v, s, s, 4)
    assert out.log_scales.shape == (b, v, s, s, 3)
    assert out.opacity_logits.shape == (b, v, s, s)
    assert out.colors.shape == (b, v, s, s, 3)
    assert out.valid.shape == (b, v, s, s) and out.valid.dtype == torch.bool
    assert torch.allclose(out.quats.norm(dim=-1), torch.ones(()), atol=1e-5)
    for t in (out.means, out.quats, out.log_scales, out.opacity_logits, out.colors):
        assert torch.isfinite(t).all()
    g = out.gaussians(1)
    assert isinstance(g, Gaussians) and g.sh_degree == 0
    assert len(g) == int(out.valid[1].sum())
    dense = out.dense_gaussians(0)
    assert len(dense) == v * s * s
    assert (dense.opacities[~out.valid[0].reshape(-1)] == 0).all()


def test_paper_parameter_count_on_meta():
    cfg = build(Avat3rConfig, preset="paper")
    with torch.device("meta"):
        model = Avat3r(cfg)
    n = parameter_count(model)
    assert 60e6 < n < 150e6, n  # ViT-B-sized transformer + 8 cross-attention layers + head
    info = model_info(cfg)
    assert info["parameters"]["total"] == n
    assert info["max_gaussians"] == 4 * 512 * 512


def test_any_number_of_views(tiny_model):
    cfg = build(Avat3rConfig, {"num_views": 1}, preset="tiny")
    with torch.no_grad():
        out = tiny_model(make_inputs(cfg), expr(cfg))
    assert out.means.shape[:2] == (1, 1)


# ------------------------------------------------------------------------------------ skips
def _zero_output(model: Avat3r) -> Avat3r:
    model.head.reset_output(0.0)
    return model


@pytest.mark.parametrize("position_skip,color_skip", [(True, True), (False, False)])
def test_skips_at_init(position_skip, color_skip):
    cfg = tiny(position_skip=position_skip, color_skip=color_skip)
    model = _zero_output(Avat3r(cfg)).eval()
    inputs = make_inputs(cfg)
    with torch.no_grad():
        out = model(inputs, expr(cfg))
    pos = inputs.position_maps.permute(0, 1, 3, 4, 2)
    rgb = inputs.images.permute(0, 1, 3, 4, 2)
    if position_skip:
        assert torch.equal(out.means, pos)
    else:
        # ray × init_depth: on the unit rays at distance init_depth from the camera centres
        assert not torch.allclose(out.means, pos, atol=1e-3)
        centres = inputs.cameras.centers.reshape(1, cfg.num_views, 1, 1, 3)
        assert torch.allclose((out.means - centres).norm(dim=-1), torch.tensor(cfg.init_depth), atol=1e-5)
    if color_skip:
        assert torch.equal(out.colors, rgb)
    else:
        assert torch.allclose(out.colors, torch.full_like(rgb, 0.5))
        assert not torch.allclose(out.colors, rgb, atol=1e-2)
    # identity rotations, init opacity, pixel-footprint scales
    assert torch.equal(out.quats, torch.tensor([1.0, 0, 0, 0]).expand_as(out.quats))
    assert torch.allclose(torch.sigmoid(out.opacity_logits), torch.tensor(cfg.init_opacity))
    z = inputs.cameras.world_to_camera(pos.reshape(-1, cfg.image_size, cfg.image_size, 3))[..., 2]
    fx = inputs.cameras.fx.reshape(-1, 1, 1)
    expected = torch.log(cfg.scale_footprint * z / fx).reshape(out.log_scales.shape[:-1])
    assert torch.allclose(out.log_scales, expected.unsqueeze(-1).expand_as(out.log_scales), atol=1e-5)


def test_default_init_is_near_the_skips(tiny_model):
    cfg = tiny_model.config
    inputs = make_inputs(cfg)
    with torch.no_grad():
        out = tiny_model(inputs, expr(cfg))
    pos = inputs.position_maps.permute(0, 1, 3, 4, 2)
    assert (out.means - pos).abs().max() < 0.01  # < 1 cm with a 1 m camera distance
    assert (out.colors - inputs.images.permute(0, 1, 3, 4, 2)).abs().max() < 0.2


# ------------------------------------------------------------------------------------ masking
def test_confidence_masking(tiny_model):
    cfg = tiny_model.config
    inputs = make_inputs(cfg)
    s = cfg.image_size
    conf = torch.full((1, cfg.num_views, s, s), 0.9)
    conf[:, 0, : s // 2] = 0.5  # exactly at the threshold: dropped
    conf[:, 2, :, :10] = 0.1
    inputs.confidence = conf
    with torch.no_grad():
        out = tiny_model(inputs, expr(cfg))
    keep = conf > 0.5
    assert torch.equal(out.valid, keep)
    g = out.gaussians(0)
    assert len(g) == int(keep.sum())
    assert torch.equal(g.means, out.means[0][keep[0]])
    # the position maps have random depths, so every mean is unique: none of the dropped survive
    dropped = out.means[0][~keep[0]]
    kept_set = {tuple(p) for p in g.means.tolist()}
    assert not any(tuple(p) in kept_set for p in dropped.tolist())
    # threshold is configurable; no confidence keeps everything
    model2 = Avat3r(tiny(confidence_threshold=0.05))
    model2.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        assert model2.encode(inputs).valid.all()
        inputs.confidence = None
        assert tiny_model.encode(inputs).valid.all()


# ------------------------------------------------------------------------------------ expression & cache
def test_expression_changes_output_and_cache_is_exact(tiny_model):
    cfg = tiny_model.config
    inputs = make_inputs(cfg)
    z1, z2 = expr(cfg, seed=1), expr(cfg, seed=2)
    with torch.no_grad():
        f1 = tiny_model(inputs, z1)
        f2 = tiny_model(inputs, z2)
        enc = tiny_model.encode(inputs)
        d2 = tiny_model.decode(enc, z2)  # decode order differs from the forwards: the cache is not mutated
        d1 = tiny_model.decode(enc, z1)
    assert not torch.allclose(f1.means, f2.means)
    assert not torch.allclose(f1.colors, f2.colors)
    for name in ("means", "quats", "log_scales", "opacity_logits", "colors", "valid"):
        assert torch.equal(getattr(d1, name), getattr(f1, name)), name
        assert torch.equal(getattr(d2, name), getattr(f2, name)), name
    # a batch-1 cache drives a batch of expressions
    with torch.no_grad():
        both = tiny_model.decode(enc, torch.cat([z1, z2]))
    assert torch.allclose(both.means[1], f2.means[0], atol=1e-6)


def test_expression_enters_only_via_cross_attention():
    """The cache (everything before the first CA layer) does not depend on z_exp, and without CA
    layers the output does not either."""
    cfg = tiny(cross_attn_layers=0)
    model = Avat3r(cfg).eval()
    inputs = make_inputs(cfg)
    with torch.no_grad():
        a = model(inputs, expr(cfg, seed=1))
        b = model(inputs, expr(cfg, seed=2))
    assert torch.equal(a.means, b.means) and torch.equal(a.colors, b.colors)


def test_decode_cheaper_than_forward(tiny_model):
    cfg = tiny_model.config
    inputs = make_inputs(cfg)
    z = expr(cfg)

    def best(fn, reps=7):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():
        enc = tiny_model.encode(inputs)
        t_forward = best(lambda: tiny_model(inputs, z))
        t_decode = best(lambda: tiny_model.decode(enc, z))
    assert t_decode < t_forward, (t_decode, t_forward)
    f = flops_estimate(cfg)
    assert f["decode"] < f["total"] and f["encode"] + f["decode"] == f["total"]


# ------------------------------------------------------------------------------------ ablations
def test_without_features():
    cfg = tiny(use_features=False)
    model = Avat3r(cfg)
    assert model.tokenizer.feature_proj is None
    with torch.no_grad():
        out = model(make_inputs(cfg, features=False), expr(cfg))
    assert torch.isfinite(out.means).all()
    with pytest.raises(ValueError, match="features"):
        Avat3r(tiny())(make_inputs(tiny(), features=False), expr(tiny()))


def test_without_position_map():
    cfg = tiny(use_position_map=False)
    model = _zero_output(Avat3r(cfg)).eval()
    inputs = make_inputs(cfg)
    inputs.position_maps = None
    with torch.no_grad():
        out = model(inputs, expr(cfg))
    # mean = camera centre + init_depth · unit ray
    origins, dirs = inputs.cameras.rays()
    expected = (origins + cfg.init_depth * dirs).reshape(out.means.shape)
    assert torch.allclose(out.means, expected, atol=1e-6)
    # the position map, when given anyway, is ignored (zeros are fed)
    with torch.no_grad():
        out2 = model(make_inputs(cfg), expr(cfg))
    assert torch.equal(out.colors, out2.colors)


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("overrides", [{}, {"use_position_map": False, "color_skip": False}])
def test_gradients_reach_every_parameter(overrides):
    torch.manual_seed(0)
    cfg = tiny(**overrides)
    model = Avat3r(cfg)
    inputs = make_inputs(cfg, batch=2, size=32)  # smaller than the configured grid: pos-embed resizes
    out = model(inputs, expr(cfg, 2))
    loss = (
        out.means.square().mean() + out.log_scales.mean() + out.quats[..., 1:].square().mean()
        + out.masked_opacity_logits(-5.0).sigmoid().mean() + out.colors.square().mean()
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------ FLOPs
def test_flops_estimate_scaling():
    cfg = build(Avat3rConfig, preset="paper")
    f1 = flops_estimate(cfg)
    f2 = flops_estimate(cfg, image_size=2 * cfg.image_size)
    assert all(v >= 0 for v in f1.values()) and f1["total"] > 0
    assert f2["tokens"] == 4 * f1["tokens"]
    assert f2["self_attn_matmul"] == 16 * f1["self_attn_matmul"]  # N² · D
    assert f2["self_attn_proj"] == 4 * f1["self_attn_proj"]  # N · D²
    assert f2["attention"] > 4 * f1["attention"]
    assert f2["mlp"] == 4 * f1["mlp"] and f2["upsampler"] == 4 * f1["upsampler"]
    # hand check of one term: patch embedding = 2 · N · (12 · p²) · D
    assert f1["patch_embed"] == 2 * 4096 * 12 * 256 * 768
    # paper model: ~1 TFLOP per forward, dominated by the transformer
    assert 0.5e12 < f1["total"] < 2e12
    assert flops_estimate(tiny())["total"] < flops_estimate(build(Avat3rConfig, preset="small"))["total"] < f1["total"]


def test_layout_expression_normalisation_drops_head_pose_in_the_head_frame_and_keeps_checkpoints():
    import numpy as np

    from avat3r_core.tracking import expression_code as ec

    cfg = build(Avat3rConfig, {"expr_normalization": "layout", "frame": "head"}, preset="tiny")
    enc = Avat3r(cfg).transformer.expression
    code = lambda **p: torch.as_tensor(ec.encode({"expression": np.zeros((1, 100)), **p}), dtype=torch.float32)  # noqa: E731
    posed = code(rotation=[[0.3, -0.2, 0.1]], translation=[[0.02, 0.0, 0.5]])
    z = (posed - enc.shift) * enc.gain
    assert z.abs().max() == 0  # a neutral face with any head pose is the rest input in the head frame
    jaw = (code(jaw=[[0.1, 0.0, 0.0]]) - enc.shift) * enc.gain
    assert jaw[0, ec.JAW].abs().max() == pytest.approx(10 * np.sin(0.1), rel=1e-4)  # 0.1 rad → ~1
    world = Avat3r(build(Avat3rConfig, {"expr_normalization": "layout"}, preset="tiny")).transformer.expression
    assert world.gain[ec.HEAD_ROT].min() > 0  # in the world frame the pose stays an input
    raw = Avat3r(build(Avat3rConfig, {}, preset="tiny"))
    assert raw.state_dict().keys() == Avat3r(cfg).state_dict().keys()  # buffers are not persistent
