"""DUSt3R loader/network (tiny checkpoint in the official layout) and alignment into a calibrated world."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.errors import FormatError
from avat3r_core.priors.align import align_pairwise_to_world, similarity_align, solve_pair_scales
from avat3r_core.priors.dust3r import PAPER_CONFIG, Dust3rConfig, apply_rope2d, build_dust3r
from avat3r_core.priors.dust3r_checkpoint import config_to_model_string, load_dust3r, parse_model_string
from avat3r_core.priors.dust3r_inference import Dust3rPairs, dust3r_preprocess, pairwise_inference

TINY = Dust3rConfig(
    img_size=(64, 64), patch_size=16, enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
    dec_embed_dim=48, dec_depth=2, dec_num_heads=4, pos_embed="RoPE100",
    patch_embed_cls="ManyAR_PatchEmbed", head_type="dpt", output_mode="pts3d",
)
OFFICIAL_STRING = (
    "AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
    "head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
    "enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12)"
)


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_dust3r(TINY).eval()
    # Larger random head outputs than the default init would give, so confidences vary.
    with torch.no_grad():
        for head in (model.downstream_head1, model.downstream_head2):
            head.dpt.head[4].weight.mul_(5.0)
    return model


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_model) -> Path:
    path = tmp_path_factory.mktemp("dust3r") / "tiny_dust3r.pth"
    torch.save({"model": tiny_model.state_dict(), "args": argparse.Namespace(model=config_to_model_string(TINY))}, path)
    return path


def _images(n: int, h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1)[None] + rng.integers(0, 40, (n, 1, 1, 3))
    return (base % 256).astype(np.uint8) + rng.integers(0, 20, (n, h, w, 3)).astype(np.uint8)


# ---------------------------------------------------------------------------- config string


def test_parse_official_constructor_string():
    assert parse_model_string(OFFICIAL_STRING) == PAPER_CONFIG
    assert parse_model_string(config_to_model_string(PAPER_CONFIG)) == PAPER_CONFIG
    assert parse_model_string(config_to_model_string(TINY)) == TINY


@pytest.mark.parametrize(
    "text, field",
    [
        ("AsymmetricCroCo3DStereo(enc_depth=2, bogus_arg=3)", "bogus_arg"),
        ("AsymmetricCroCo3DStereo(head_type='linear')", "head_type"),
        ("AsymmetricCroCo3DStereo(pos_embed='cosine')", "pos_embed"),
        ("AsymmetricCroCo3DStereo(img_size=__import__('os').system('true'))", "img_size"),
        ("AsymmetricCroCo3DStereo(depth_mode=('exp', 0, inf))", "depth_mode"),
        ("AsymmetricCroCo3DStereo(pos_embed=100)", "pos_embed"),
        ("AsymmetricCroCo3DStereo(enc_depth=2.5)", "enc_depth"),
    ],
)
def test_parse_refuses_unknown_or_unsupported(text, field):
    with pytest.raises(FormatError) as err:
        parse_model_string(text)
    assert err.value.field == field


def test_parse_refuses_other_calls():
    for text in ("os.system('x')", "CroCoNet(enc_depth=2)", "AsymmetricCroCo3DStereo(**kw)", "1 +"):
        with pytest.raises(FormatError):
            parse_model_string(text)


# ---------------------------------------------------------------------------- official layout


def test_paper_config_key_layout_on_meta():
    model = build_dust3r(PAPER_CONFIG, device="meta")
    sd = model.state_dict()
    expect = {
        "mask_token": (1, 1, 768),
        "patch_embed.proj.weight": (1024, 3, 16, 16),
        "patch_embed.proj.bias": (1024,),
        "enc_blocks.0.norm1.weight": (1024,),
        "enc_blocks.23.attn.qkv.weight": (3072, 1024),
        "enc_blocks.23.attn.proj.weight": (1024, 1024),
        "enc_blocks.23.mlp.fc1.weight": (4096, 1024),
        "enc_blocks.23.mlp.fc2.weight": (1024, 4096),
        "enc_norm.weight": (1024,),
        "decoder_embed.weight": (768, 1024),
        "dec_blocks.11.attn.qkv.weight": (2304, 768),
        "dec_blocks.11.cross_attn.projq.weight": (768, 768),
        "dec_blocks.11.cross_attn.projk.bias": (768,),
        "dec_blocks.11.cross_attn.projv.weight": (768, 768),
        "dec_blocks.11.cross_attn.proj.weight": (768, 768),
        "dec_blocks.11.norm3.weight": (768,),
        "dec_blocks2.11.norm_y.bias": (768,),
        "dec_norm.weight": (768,),
        "downstream_head1.dpt.act_postprocess.0.0.weight": (96, 1024, 1, 1),
        "downstream_head1.dpt.act_postprocess.0.1.weight": (96, 96, 4, 4),
        "downstream_head1.dpt.act_postprocess.1.0.weight": (192, 768, 1, 1),
        "downstream_head1.dpt.act_postprocess.1.1.weight": (192, 192, 2, 2),
        "downstream_head1.dpt.act_postprocess.2.0.weight": (384, 768, 1, 1),
        "downstream_head1.dpt.act_postprocess.3.0.weight": (768, 768, 1, 1),
        "downstream_head1.dpt.act_postprocess.3.1.weight": (768, 768, 3, 3),
        "downstream_head2.dpt.scratch.layer1_rn.weight": (256, 96, 3, 3),
        "downstream_head2.dpt.scratch.layer_rn.3.weight": (256, 768, 3, 3),
        "downstream_head2.dpt.scratch.refinenet4.resConfUnit1.conv1.weight": (256, 256, 3, 3),
        "downstream_head2.dpt.scratch.refinenet1.out_conv.bias": (256,),
        "downstream_head1.dpt.head.0.weight": (128, 256, 3, 3),
        "downstream_head1.dpt.head.2.weight": (32, 128, 3, 3),
        "downstream_head1.dpt.head.4.weight": (4, 32, 1, 1),
    }
    for key, shape in expect.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("prediction_head", "enc_pos_embed", "dec_pos_embed")) for k in sd)
    assert "downstream_head1.dpt.act_1_postprocess.0.weight" not in sd  # removed in the dust3r fix
    assert "enc_blocks.24.norm1.weight" not in sd and "dec_blocks.12.norm1.weight" not in sd
    assert PAPER_CONFIG.dpt_hooks == [0, 6, 9, 12]


def test_rope_is_relative():
    """Scores after RoPE2D depend only on position differences (both axes)."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(pq, pk):
        a = apply_rope2d(q, torch.tensor([[pq]]), 100.0)
        b = apply_rope2d(k, torch.tensor([[pk]]), 100.0)
        return (a * b).sum(-1)

    assert torch.allclose(score((1, 2), (4, 7)), score((3, 5), (6, 10)), atol=1e-5)
    assert not torch.allclose(score((1, 2), (4, 7)), score((1, 2), (7, 4)), atol=1e-3)


# ---------------------------------------------------------------------------- loading + inference


def test_checkpoint_roundtrip_and_pairwise_inference(tiny_model, tiny_ckpt):
    model = load_dust3r(tiny_ckpt)
    assert model.config == TINY
    assert not model.training
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in model.state_dict().values())
    imgs = _images(3)
    x, shapes, transforms = dust3r_preprocess(imgs, long_side=TINY.long_side)
    assert tuple(x.shape) == (3, 3, 48, 64) and shapes.tolist() == [[48, 64]] * 3
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    res = pairwise_inference(model, x, batch_size=4)
    assert isinstance(res, Dust3rPairs)
    assert len(res) == 3 * 2 and sorted(res.pairs) == [(i, j) for i in range(3) for j in range(3) if i != j]
    assert tuple(res.pts3d_i.shape) == (6, 48, 64, 3) and tuple(res.pts3d_j_in_i.shape) == (6, 48, 64, 3)
    assert tuple(res.conf_i.shape) == (6, 48, 64) and tuple(res.conf_j.shape) == (6, 48, 64)
    for t in (res.pts3d_i, res.pts3d_j_in_i, res.conf_i, res.conf_j):
        assert torch.isfinite(t).all()
    assert float(res.conf_i.min()) >= 1.0 and float(res.conf_j.min()) >= 1.0

    # Encoding each view once == the official per-pair forward, and the reloaded weights are exact.
    with torch.no_grad():
        direct = tiny_model(x[1:2], x[2:3])
    p = res.pairs.index((1, 2))
    assert torch.allclose(res.pts3d_i[p], direct["pts3d"][0], atol=1e-5)
    assert torch.allclose(res.pts3d_j_in_i[p], direct["pts3d_in_other_view"][0], atol=1e-5)
    assert torch.allclose(res.conf_j[p], direct["conf2"][0], atol=1e-4)
    # Batch size does not change the result.
    res1 = pairwise_inference(model, x, batch_size=1)
    assert torch.allclose(res1.pts3d_j_in_i, res.pts3d_j_in_i, atol=1e-5)


def test_portrait_images_run_natively(tiny_model):
    x, shapes, _ = dust3r_preprocess(_images(2, h=80, w=50), long_side=64)
    assert shapes.tolist() == [[64, 32], [64, 32]]
    res = pairwise_inference(tiny_model, x)
    assert tuple(res.pts3d_i.shape) == (2, 64, 32, 3)


def test_bare_state_dict_with_config(tiny_model, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(FormatError):
        load_dust3r(path)
    model = load_dust3r(path, config=TINY)
    model2 = load_dust3r(state_dict=tiny_model.state_dict(), config=TINY)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert model2.enc_norm.weight.data_ptr() != tiny_model.enc_norm.weight.data_ptr()  # no aliasing


def test_missing_and_renamed_keys_are_reported(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd["enc_norm.gamma"] = sd.pop("enc_norm.weight")
    del sd["downstream_head2.dpt.head.4.bias"]
    path = tmp_path / "renamed.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model=config_to_model_string(TINY))}, path)
    with pytest.raises(FormatError) as err:
        load_dust3r(path)
    msg = str(err.value)
    assert "missing keys" in msg and "enc_norm.weight" in msg and "downstream_head2.dpt.head.4.bias" in msg
    assert "unexpected keys" in msg and "enc_norm.gamma" in msg


def test_wrong_shape_is_reported(tiny_model, tmp_path):
    sd = dict(tiny_model.state_dict())
    sd["decoder_embed.weight"] = torch.zeros(8, 8)
    with pytest.raises(FormatError) as err:
        load_dust3r(state_dict=sd, config=TINY)
    assert "decoder_embed.weight" in str(err.value)


def test_older_checkpoint_without_dec_blocks2_is_completed(tiny_model):
    sd = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("dec_blocks2.")}
    model = load_dust3r(state_dict=sd, config=TINY)
    assert torch.equal(model.dec_blocks2[1].mlp.fc1.weight, tiny_model.dec_blocks[1].mlp.fc1.weight)


def test_unknown_kwarg_in_checkpoint_args(tiny_model, tmp_path):
    path = tmp_path / "kw.pth"
    text = config_to_model_string(TINY)[:-1] + ", use_magic=True)"
    torch.save({"model": tiny_model.state_dict(), "args": argparse.Namespace(model=text)}, path)
    with pytest.raises(FormatError) as err:
        load_dust3r(path)
    assert err.value.field == "use_magic"


class _Payload:
    """Pickles to a call of os.system: a weights-only loader must refuse to run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Payload(marker)}, path)
    with pytest.raises(FormatError) as err:
        load_dust3r(path)
    assert "weights-only" in str(err.value)
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(FormatError):
        load_dust3r(path)


# ---------------------------------------------------------------------------- preprocessing


def test_preprocess_geometry_matches_cameras():
    imgs = _images(1, h=70, w=100)
    x, shapes, (tr,) = dust3r_preprocess(imgs, long_side=64)
    # long side 100 → 64, short 70 → round(44.8) = 45; centre crop to 64 x 32
    assert tr.resized_size == (64, 45) and tr.out_size == (64, 32) and tr.crop_xy == (0, 6)
    assert tuple(x.shape[-2:]) == (32, 64)
    cams = Cameras.look_at(torch.tensor([[0.2, 0.1, 2.0]]), torch.zeros(3), fov_deg=30.0, width=100, height=70)
    pts = torch.tensor([[0.05, -0.03, 0.1], [-0.1, 0.08, -0.05]])
    uv_in, _ = cams.project(pts)
    uv_out, _ = tr.cameras(cams).project(pts)
    assert torch.allclose(tr.to_output_pixels(uv_in), uv_out, atol=1e-4)
    assert torch.allclose(tr.to_input_pixels(uv_out), uv_in, atol=1e-4)


def test_preprocess_square_becomes_four_by_three():
    x, shapes, _ = dust3r_preprocess(_images(1, h=90, w=90), long_side=64)
    assert shapes.tolist() == [[48, 64]]
    x, shapes, _ = dust3r_preprocess(_images(1, h=90, w=90), long_side=64, square_ok=True)
    assert shapes.tolist() == [[64, 64]]


# ---------------------------------------------------------------------------- alignment


def _synthetic_scene(H: int = 24, W: int = 32):
    """Three calibrated cameras looking at a sphere in front of a back plane; world point maps."""
    eyes = torch.tensor([[-0.8, 0.1, 1.4], [0.0, -0.1, 1.6], [0.9, 0.2, 1.3]], dtype=torch.float64)
    cams = Cameras.look_at(eyes, torch.zeros(3, dtype=torch.float64), fov_deg=45.0, width=W, height=H,
                           dtype=torch.float64)
    o, d = cams.rays()
    centre, radius, plane_z = torch.tensor([0.05, 0.0, 0.0], dtype=torch.float64), 0.35, -0.6
    oc = o - centre
    b = (oc * d).sum(-1)
    c = (oc * oc).sum(-1) - radius**2
    disc = b * b - c
    lam_sphere = -b - torch.sqrt(disc.clamp(min=0))
    lam_plane = (plane_z - o[..., 2]) / d[..., 2]
    lam = torch.where(disc > 0, lam_sphere, lam_plane)
    world = o + lam[..., None] * d
    return cams, world


def _as_dust3r(cams: Cameras, world: torch.Tensor, seed: int = 0, noise_frac: float = 0.0):
    n = len(cams)
    rng = torch.Generator().manual_seed(seed)
    cam_pts = cams.world_to_camera(world.reshape(n, -1, 3)).reshape(world.shape)  # view v in its own frame
    pairs, pi, pj, ci, cj, scales = [], [], [], [], [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            s = float(torch.empty(1).uniform_(0.3, 3.0, generator=rng))
            xj_in_i = cams[i].world_to_camera(world[j].reshape(-1, 3)).reshape(world[j].shape)
            pairs.append((i, j))
            pi.append(cam_pts[i] / s)
            pj.append(xj_in_i / s)
            ci.append(1.0 + 5.0 * torch.rand(world.shape[1:3], generator=rng, dtype=torch.float64))
            cj.append(1.0 + 5.0 * torch.rand(world.shape[1:3], generator=rng, dtype=torch.float64))
            scales.append(s)
    res = Dust3rPairs(pairs, torch.stack(pi).float(), torch.stack(pj).float(), torch.stack(ci).float(),
                      torch.stack(cj).float(), n)
    return res, torch.tensor(scales, dtype=torch.float64)


def test_align_recovers_world_maps():
    cams, world = _synthetic_scene()
    res, scales = _as_dust3r(cams, world)
    for snap in (True, False):
        pos, conf, est = align_pairwise_to_world(res, cams.to(dtype=torch.float32), conf_threshold=1.0,
                                                 snap_to_rays=snap, return_scales=True)
        assert tuple(pos.shape) == tuple(world.shape) and tuple(conf.shape) == tuple(world.shape[:3])
        assert torch.allclose(pos.double(), world, atol=1e-4), (snap, (pos.double() - world).abs().max())
        # the aligner returns the factor that maps predictions to metric units
        assert torch.allclose(est.double(), scales, rtol=1e-4)
        assert float(conf.min()) >= 1.0


def test_align_ignores_low_confidence_outliers():
    cams, world = _synthetic_scene()
    res, _ = _as_dust3r(cams, world, seed=3)
    gen = torch.Generator().manual_seed(1)
    bad = torch.rand(res.conf_j.shape, generator=gen) < 0.1
    res.pts3d_j_in_i[bad] += torch.randn(int(bad.sum()), 3, generator=gen)
    res.conf_j[bad] = 1.1
    bad_i = torch.rand(res.conf_i.shape, generator=gen) < 0.1
    res.pts3d_i[bad_i] *= 1.7
    res.conf_i[bad_i] = 1.1
    pos, conf = align_pairwise_to_world(res, cams, conf_threshold=1.2)
    assert torch.allclose(pos.double(), world, atol=1e-4)


def test_pair_scale_is_robust_without_threshold():
    cams, world = _synthetic_scene()
    res, scales = _as_dust3r(cams, world, seed=5)
    gen = torch.Generator().manual_seed(2)
    bad = torch.rand(res.conf_j.shape, generator=gen) < 0.05
    res.pts3d_j_in_i[bad] += 0.5 * torch.randn(int(bad.sum()), 3, generator=gen)
    est = solve_pair_scales(res, cams, conf_threshold=1.0)
    assert torch.allclose(est.double(), scales, rtol=2e-2)


def test_align_rejects_wrong_resolution():
    cams, world = _synthetic_scene()
    res, _ = _as_dust3r(cams, world)
    with pytest.raises(ValueError):
        align_pairwise_to_world(res, cams.resize(64, 48))


def test_similarity_align_recovers_transform():
    torch.manual_seed(0)
    src = torch.randn(50, 3, dtype=torch.float64)
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    axis = axis / axis.norm()
    ang = 1.1
    Kx = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    R = torch.eye(3, dtype=torch.float64) + math.sin(ang) * Kx + (1 - math.cos(ang)) * Kx @ Kx
    s, t = 2.5, torch.tensor([0.1, -2.0, 3.0], dtype=torch.float64)
    dst = s * src @ R.T + t
    s_est, R_est, t_est = similarity_align(src, dst)
    assert abs(float(s_est) - s) < 1e-4 and torch.allclose(R_est, R, atol=1e-4) and torch.allclose(t_est, t, atol=1e-4)
    # weights: outliers with zero weight do not matter
    dst_bad = dst.clone()
    dst_bad[:5] += 10.0
    w = torch.ones(50, dtype=torch.float64)
    w[:5] = 0
    s_est, R_est, t_est = similarity_align(src, dst_bad, weights=w)
    assert abs(float(s_est) - s) < 1e-4 and torch.allclose(R_est, R, atol=1e-4) and torch.allclose(t_est, t, atol=1e-4)
    # rigid only
    s1, R1, t1 = similarity_align(src, src @ R.T + t, with_scale=False)
    assert float(s1) == 1.0 and torch.allclose(R1, R, atol=1e-4) and torch.allclose(t1, t, atol=1e-4)


def test_pipeline_composes(tiny_model):
    """preprocess → pairwise inference → cameras at the DUSt3R grid → world maps (random weights)."""
    imgs = _images(3, h=60, w=80, seed=4)
    x, _, transforms = dust3r_preprocess(imgs, long_side=64)
    eyes = torch.tensor([[-0.5, 0.0, 2.0], [0.0, 0.1, 2.1], [0.5, 0.0, 2.0]])
    cams = Cameras.look_at(eyes, torch.zeros(3), fov_deg=30.0, width=80, height=60)
    cams_d = transforms[0].cameras(cams)
    assert (cams_d.width, cams_d.height) == (64, 48)
    res = pairwise_inference(tiny_model, x)
    pos, conf = align_pairwise_to_world(res, cams_d, conf_threshold=1.0)
    assert tuple(pos.shape) == (3, 48, 64, 3) and torch.isfinite(pos).all() and float(conf.min()) >= 1.0
