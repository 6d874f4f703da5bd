"""Losses (L1 + SSIM + LPIPS), LPIPS weight loading, and evaluation metrics.

SSIM and LPIPS are checked against independent computations written here (a NumPy/SciPy Gaussian
filter for SSIM; a functional conv/relu/pool forward straight from the weight dicts for LPIPS).
LPIPS weight files are random tensors written by the test in the torchvision / LPIPS v0.1 layouts.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from avat3r_core.config import build
from avat3r_core.errors import FormatError
from avat3r_core.losses import Avat3rLoss, LossConfig, composite, psnr, ssim, ssim_map
from avat3r_core.lpips import LPIPS, backbone_state_dict_keys, lin_state_dict_keys, load_lpips, try_load_lpips
from avat3r_core.metrics import MetricTable, MetricUnavailable, akd, csim, lpips_metric
from avat3r_core.metrics import ssim as metric_ssim

# ---------------------------------------------------------------------------------- fixtures
# Convolution shapes of torchvision's alexnet / vgg16 ``features`` (index → (out, in, k)).
ALEX_CONVS = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
VGG_CONVS = {0: (64, 3, 3), 2: (64, 64, 3), 5: (128, 64, 3), 7: (128, 128, 3), 10: (256, 128, 3),
             12: (256, 256, 3), 14: (256, 256, 3), 17: (512, 256, 3), 19: (512, 512, 3), 21: (512, 512, 3),
             24: (512, 512, 3), 26: (512, 512, 3), 28: (512, 512, 3)}
LIN_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


def random_backbone(net: str, seed: int = 0, classifier: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (o, c, k) in (ALEX_CONVS if net == "alex" else VGG_CONVS).items():
        sd[f"features.{i}.weight"] = torch.randn(o, c, k, k, generator=g) * math.sqrt(2.0 / (c * k * k))
        sd[f"features.{i}.bias"] = torch.randn(o, generator=g) * 0.01
    if classifier:  # a torchvision full-model checkpoint carries the classifier too (small stand-ins)
        for i in ((1, 4, 6) if net == "alex" else (0, 3, 6)):
            sd[f"classifier.{i}.weight"] = torch.randn(2, 2, generator=g)
            sd[f"classifier.{i}.bias"] = torch.randn(2, generator=g)
    return sd


def random_lins(net: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
            for k, c in enumerate(LIN_CHANNELS[net])}


@pytest.fixture(scope="module")
def alex_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    bb, lin = random_backbone("alex", classifier=True), random_lins("alex")
    torch.save(bb, d / "alexnet.pth")
    torch.save(lin, d / "alex.pth")
    return d / "alexnet.pth", d / "alex.pth", bb, lin


def images(b=2, h=48, w=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish content so SSIM is far from both 0 and 1 under noise
    x = torch.rand(b, 3, h // 4, w // 4, generator=g, dtype=dtype)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.clamp(0, 1), g


# ---------------------------------------------------------------------------------- SSIM
def ssim_numpy(a: np.ndarray, b: np.ndarray, padding: str, mask: np.ndarray | None = None,
               ws: int = 11, sigma: float = 1.5, L: float = 1.0) -> np.ndarray:
    """Independent SSIM: direct 2-D Gaussian correlation per channel (a, b: (B, C, H, W))."""
    r = ws // 2
    ax = np.arange(ws) - r
    k1 = np.exp(-(ax**2) / (2 * sigma**2))
    k2 = np.outer(k1, k1)
    k2 /= k2.sum()

    def filt(x):
        return ndimage.correlate(x, k2, mode="constant", cval=0.0)

    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    out = []
    for i in range(a.shape[0]):
        maps = []
        for c in range(a.shape[1]):
            x, y = a[i, c].astype(np.float64), b[i, c].astype(np.float64)
            mx, my = filt(x), filt(y)
            sxx, syy, sxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
            m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
            if padding == "valid":  # the windows that lie wholly inside the image
                m = m[r:-r, r:-r]
            maps.append(m)
        maps = np.stack(maps)
        if mask is None:
            out.append(maps.mean())
        else:
            w = mask[i, 0][r:-r, r:-r] if padding == "valid" else mask[i, 0]
            w = np.broadcast_to(w, maps.shape)
            out.append((maps * w).sum() / w.sum())
    return np.array(out)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_ssim_matches_independent_filter(padding):
    x, g = images(dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(x, y, padding=padding)
    ref = ssim_numpy(x.numpy(), y.numpy(), padding)
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-10)
    # channels-last input, float32, and the metric wrapper (default "valid")
    ours_cl = ssim(x.permute(0, 2, 3, 1).float(), y.permute(0, 2, 3, 1).float(), padding=padding, channels_last=True)
    np.testing.assert_allclose(ours_cl.numpy(), ref, atol=1e-5)
    if padding == "valid":
        np.testing.assert_allclose(metric_ssim(x, y).numpy(), ref, atol=1e-10)
    # data_range scales the constants: images in [0, 255]
    np.testing.assert_allclose(ssim(255 * x, 255 * y, data_range=255.0, padding=padding).numpy(), ref, atol=1e-8)


def test_ssim_mask_matches_independent():
    x, g = images(dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    mask = torch.zeros(2, 1, 48, 40, dtype=torch.float64)
    mask[:, :, 10:40, 5:30] = 1.0
    for padding in ("same", "valid"):
        ours = ssim(x, y, mask=mask, padding=padding)
        ref = ssim_numpy(x.numpy(), y.numpy(), padding, mask.numpy())
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)
        # a (B, H, W) mask and an all-ones mask
        np.testing.assert_allclose(ssim(x, y, mask=mask[:, 0], padding=padding).numpy(), ref, atol=1e-10)
        np.testing.assert_allclose(ssim(x, y, mask=torch.ones_like(mask), padding=padding).numpy(),
                                   ssim(x, y, padding=padding).numpy(), atol=1e-12)


def test_ssim_known_cases():
    x, g = images()
    for padding in ("same", "valid"):
        torch.testing.assert_close(ssim(x, x, padding=padding), torch.ones(2), atol=1e-5, rtol=0)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.5
    assert ssim_map(x, x, padding="valid").shape == (2, 3, 38, 30)
    assert ssim_map(x, x).shape == (2, 3, 48, 40)
    with pytest.raises(ValueError, match="odd"):
        ssim(x, x, window_size=10)
    with pytest.raises(ValueError, match="padding"):
        ssim(x, x, padding="reflect")


def test_ssim_gradcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 13, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 3, 13, 12, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ssim(a, y, window_size=5), (x,))
    assert torch.autograd.gradcheck(lambda a: ssim(a, y, window_size=5, padding="valid"), (x,))


# ---------------------------------------------------------------------------------- PSNR
def test_psnr():
    x, _ = images()
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.equal(psnr(x, x, max_db=100.0), torch.full((2,), 100.0))
    t = torch.full((2, 3, 8, 8), 0.5)
    p = t.clone()
    p[0] += 0.1  # MSE 0.01 → 20 dB
    p[1, :, :4] += 0.2  # MSE 0.02 (half the pixels off by 0.2)
    expected = torch.tensor([10 * math.log10(1 / 0.01), 10 * math.log10(1 / 0.02)])
    torch.testing.assert_close(psnr(p, t), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(p, t, channels_last=False, data_range=2.0), expected + 10 * math.log10(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(p.permute(0, 2, 3, 1), t.permute(0, 2, 3, 1), channels_last=True), expected, atol=1e-4, rtol=0)
    # mask: only the unchanged half of image 1 counts → identical → inf; image 0 unchanged 20 dB
    mask = torch.zeros(2, 8, 8)
    mask[:, 4:] = 1
    out = psnr(p, t, mask=mask)
    assert out[0].item() == pytest.approx(20.0, abs=1e-4) and math.isinf(out[1].item())


# ---------------------------------------------------------------------------------- loss
def test_loss_terms_and_gradients():
    x, g = images()
    target = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    pred = x.clone().requires_grad_(True)
    loss = Avat3rLoss()
    assert not loss.lpips_enabled and "disabled" in loss.lpips_status
    total, terms = loss(pred, target)
    l1 = (pred - target).abs().mean().item()
    s = ssim(pred, target).mean().item()
    assert terms["l1"] == pytest.approx(l1, rel=1e-5)
    assert terms["ssim"] == pytest.approx(s, rel=1e-5)
    assert terms["total"] == pytest.approx(0.8 * l1 + 0.2 * (1 - s), rel=1e-5)
    assert terms["lpips_active"] == 0.0 and "lpips" not in terms
    assert all(isinstance(v, float) for v in terms.values())
    total.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    # identical images → zero loss
    assert loss(target, target)[0].item() == pytest.approx(0.0, abs=1e-6)
    # channels-last gives the same numbers
    _, terms_cl = loss(pred.detach().permute(0, 2, 3, 1), target.permute(0, 2, 3, 1), channels_last=True)
    assert terms_cl["total"] == pytest.approx(terms["total"], rel=1e-6)


def test_loss_with_lpips_and_alpha(alex_files):
    bb_path, lin_path, _, _ = alex_files
    cfg = build(LossConfig, {"use_lpips": True, "lpips_backbone_path": str(bb_path),
                             "lpips_lin_path": str(lin_path), "lpips_start_step": 10})
    loss = Avat3rLoss(cfg)
    assert loss.lpips_enabled and loss.lpips_status.startswith("LPIPS enabled")
    x, g = images(h=64, w=64)
    target = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    alpha = torch.zeros(2, 1, 64, 64)
    alpha[:, :, 8:56, 8:56] = 1.0
    pred = x.clone().requires_grad_(True)
    pred_alpha = torch.rand(2, 1, 64, 64, generator=g).requires_grad_(True)
    total, terms = loss(pred, target, target_alpha=alpha, pred_alpha=pred_alpha, background=0.3, step=10)
    assert terms["lpips_active"] == 1.0 and terms["lpips"] > 0
    t_c = composite(target, alpha, 0.3)
    p_c = pred + 0.3 * (1 - pred_alpha)
    lp = loss.lpips(p_c, t_c, normalize=True).mean()
    expected = 0.8 * (p_c - t_c).abs().mean() + 0.2 * (1 - ssim(p_c, t_c).mean()) + 0.01 * lp
    assert terms["total"] == pytest.approx(expected.item(), rel=1e-5)
    total.backward()
    for t in (pred.grad, pred_alpha.grad):
        assert t is not None and torch.isfinite(t).all()
    assert all(p.grad is None for p in loss.lpips.parameters())  # frozen
    # channels-last images and mattes give the same terms
    _, terms_cl = loss(pred.detach().permute(0, 2, 3, 1), target.permute(0, 2, 3, 1), channels_last=True,
                       target_alpha=alpha.permute(0, 2, 3, 1), pred_alpha=pred_alpha.detach()[:, 0], background=0.3, step=10)
    assert terms_cl["total"] == pytest.approx(terms["total"], rel=1e-6)
    # before lpips_start_step LPIPS is not applied
    _, early = loss(pred.detach(), target, step=9)
    assert early["lpips_active"] == 0.0 and "lpips" not in early
    # target fully transparent over background == background-coloured prediction: loss 0
    bg = torch.tensor([0.2, 0.4, 0.6])
    flat = bg.view(1, 3, 1, 1).expand(2, 3, 64, 64)
    zero, _ = loss(flat, target, target_alpha=torch.zeros(2, 64, 64), background=bg)
    assert zero.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_without_weight_files_reports_disabled(tmp_path):
    cfg = build(LossConfig, {}, preset="paper")
    assert cfg.use_lpips and cfg.lpips_start_step == 3_000_000
    loss = Avat3rLoss(cfg)
    assert not loss.lpips_enabled and "LPIPS disabled" in loss.lpips_status and "backbone_path" in loss.lpips_status
    cfg = LossConfig(use_lpips=True, lpips_backbone_path=str(tmp_path / "none.pth"), lpips_lin_path=str(tmp_path / "x.pth"))
    loss = Avat3rLoss(cfg)
    assert not loss.lpips_enabled and "does not exist" in loss.lpips_status
    x, _ = images()
    _, terms = loss(x, x.flip(-1), step=5_000_000)
    assert terms["lpips_active"] == 0.0
    # a present but broken file is an error, not a silent fallback
    (tmp_path / "bad.pth").write_bytes(b"not a torch file")
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(FormatError, match="bad.pth"):
        Avat3rLoss(LossConfig(use_lpips=True, lpips_backbone_path=str(tmp_path / "bad.pth"),
                              lpips_lin_path=str(tmp_path / "x.pth")))


# ---------------------------------------------------------------------------------- LPIPS
def lpips_functional(x, y, bb, lin, net):
    """LPIPS straight from the weight dicts ([0, 1] inputs)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def conv(h, i, stride=1, pad=1):
        return F.relu(F.conv2d(h, bb[f"features.{i}.weight"], bb[f"features.{i}.bias"], stride=stride, padding=pad))

    def taps(h):
        h = (2 * h - 1 - shift) / scale
        out = []
        if net == "alex":
            h = conv(h, 0, 4, 2); out.append(h)
            h = conv(F.max_pool2d(h, 3, 2), 3, 1, 2); out.append(h)
            h = conv(F.max_pool2d(h, 3, 2), 6); out.append(h)
            h = conv(h, 8); out.append(h)
            h = conv(h, 10); out.append(h)
        else:
            blocks = [(0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)]
            for j, block in enumerate(blocks):
                if j:
                    h = F.max_pool2d(h, 2, 2)
                for i in block:
                    h = conv(h, i)
                out.append(h)
        return out

    total = 0
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b) ** 2, lin[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


def test_lpips_key_layout():
    assert backbone_state_dict_keys("alex") == [f"features.{i}.{p}" for i in ALEX_CONVS for p in ("weight", "bias")]
    assert backbone_state_dict_keys("vgg16") == [f"features.{i}.{p}" for i in VGG_CONVS for p in ("weight", "bias")]
    assert lin_state_dict_keys("vgg") == [f"lin{k}.model.1.weight" for k in range(5)]
    assert set(LPIPS("alex").state_dict()) == set(backbone_state_dict_keys("alex")) | set(lin_state_dict_keys("alex"))
    with pytest.raises(ValueError, match="unknown LPIPS network"):
        LPIPS("squeeze")


def test_lpips_alex_files_roundtrip(alex_files, tmp_path):
    bb_path, lin_path, bb, lin = alex_files
    model = load_lpips("alex", bb_path, lin_path)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, g = images(h=64, w=64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    d = model(x, y, normalize=True)
    assert d.shape == (2,)
    torch.testing.assert_close(d, lpips_functional(x, y, bb, lin, "alex"), atol=1e-6, rtol=1e-5)
    # [-1, 1] inputs without normalize give the same
    torch.testing.assert_close(model(2 * x - 1, 2 * y - 1), d, atol=1e-6, rtol=1e-5)
    # save the loaded model's weights back in the two layouts, reload: identical outputs
    sd = model.state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, tmp_path / "bb.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, tmp_path / "lin.pth")
    again = load_lpips("alex", tmp_path / "bb.pth", tmp_path / "lin.pth")
    assert torch.equal(again(x, y, normalize=True), d)
    # LPIPS(x, x) = 0, growing with distortion; gradients reach the input
    assert torch.equal(model(x, x, normalize=True), torch.zeros(2))
    noise = torch.randn(x.shape, generator=g)
    vals = [model(x, (x + s * noise).clamp(0, 1), normalize=True).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 0 < vals[0] < vals[1] < vals[2], vals
    xr = x.clone().requires_grad_(True)
    model(xr, y, normalize=True).sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def test_lpips_vgg_files(tmp_path):
    bb, lin = random_backbone("vgg", seed=5), random_lins("vgg", seed=6)
    torch.save(bb, tmp_path / "vgg16.pth")
    torch.save(lin, tmp_path / "vgg.pth")
    model = load_lpips("vgg", tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    x, g = images(b=1, h=32, w=32)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    d = model(x, y, normalize=True)
    torch.testing.assert_close(d, lpips_functional(x, y, bb, lin, "vgg"), atol=1e-6, rtol=1e-5)
    assert d.item() > 0 and model(x, x, normalize=True).item() == 0.0


def test_lpips_rejects_wrong_files(alex_files, tmp_path):
    bb_path, lin_path, bb, lin = alex_files
    # renamed key: both names appear
    wrong = dict(lin)
    wrong["lin2.model.weight"] = wrong.pop("lin2.model.1.weight")
    torch.save(wrong, tmp_path / "wrong_lin.pth")
    with pytest.raises(FormatError) as info:
        load_lpips("alex", bb_path, tmp_path / "wrong_lin.pth")
    msg = str(info.value)
    assert "missing keys [lin2.model.1.weight]" in msg and "unexpected keys [lin2.model.weight]" in msg
    assert "wrong_lin.pth" in msg and info.value.field is not None
    # backbone: an extra key that is not torchvision's classifier, and a missing conv
    wrong_bb = {k: v for k, v in bb.items() if k != "features.10.bias"}
    wrong_bb["features.13.weight"] = torch.zeros(1)
    torch.save(wrong_bb, tmp_path / "wrong_bb.pth")
    with pytest.raises(FormatError, match=r"missing keys \[features\.10\.bias\]; unexpected keys \[features\.13\.weight\]"):
        load_lpips("alex", tmp_path / "wrong_bb.pth", lin_path)
    # vgg linear layers with the alex backbone: shape mismatch names the key
    torch.save(random_lins("vgg"), tmp_path / "vgg_lin.pth")
    with pytest.raises(FormatError, match=r"lin1\.model\.1\.weight.*shape"):
        load_lpips("alex", bb_path, tmp_path / "vgg_lin.pth")
    # not a weights-only loadable file / not a dict / absent
    import argparse
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "pickle.pth")
    with pytest.raises(FormatError, match="weights-only"):
        load_lpips("alex", tmp_path / "pickle.pth", lin_path)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(FormatError, match="state_dict"):
        load_lpips("alex", bb_path, tmp_path / "list.pth")
    with pytest.raises(FormatError, match="not found"):
        load_lpips("alex", tmp_path / "absent.pth", lin_path)
    assert try_load_lpips("alex", None, lin_path)[0] is None


# ---------------------------------------------------------------------------------- metrics
def test_lpips_metric(alex_files, tmp_path):
    bb_path, lin_path, bb, lin = alex_files
    x, g = images(h=64, w=64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert lpips_metric(x, y) is None
    assert lpips_metric(x, y, backbone_path=tmp_path / "no.pth", lin_path=lin_path) is None
    d = lpips_metric(x, y, backbone_path=bb_path, lin_path=lin_path)
    torch.testing.assert_close(d, lpips_functional(x, y, bb, lin, "alex"), atol=1e-6, rtol=1e-5)
    d_cl = lpips_metric(x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1), backbone_path=bb_path, lin_path=lin_path,
                        channels_last=True)
    torch.testing.assert_close(d_cl, d)


def test_akd():
    gt = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]],
                       [[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]])
    pred = gt.clone()
    pred[0, 0] += torch.tensor([3.0, 4.0])  # 5 px
    pred[0, 1] += torch.tensor([0.0, 2.0])  # 2 px
    pred[1] += torch.tensor([1.0, 0.0])  # 1 px each
    torch.testing.assert_close(akd(pred, gt), torch.tensor([7.0 / 3.0, 1.0]))
    vis = torch.tensor([[True, True, False], [False, False, False]])
    out = akd(pred, gt, visible=vis)
    assert out[0].item() == pytest.approx(3.5) and math.isnan(out[1].item())
    with pytest.raises(ValueError):
        akd(pred[..., :1], gt[..., :1])


def test_csim_unavailable_names_the_reason(tmp_path, monkeypatch):
    import sys

    from avat3r_core.identity import FaceIdentity

    monkeypatch.delenv("AVAT3R_IDENTITY_MODELS", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # a venv without dlib's model files
    with pytest.raises(MetricUnavailable, match="CSIM unavailable: .*dlib_face_recognition_resnet_model_v1.dat"):
        csim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), identity=FaceIdentity())
    assert issubclass(MetricUnavailable, NotImplementedError)


UNAVAILABLE_CSIM = "CSIM unavailable: no identity network (test)"


def test_metric_table():
    table = MetricTable(unavailable={"csim": UNAVAILABLE_CSIM})
    table.add_batch("avat3r", ids=["a", "b"], psnr=torch.tensor([20.0, 22.0]), ssim=[0.7, 0.8],
                    lpips=torch.tensor([0.3, 0.4]), akd=torch.tensor([4.0, float("nan")]))
    table.add("baseline", "a", psnr=18.0, ssim=0.6, lpips=None, akd=6.0, csim=0.5)
    table.add("baseline", "b", psnr=19.0, ssim=0.65, akd=5.0)
    means = table.means()
    assert means["avat3r"]["csim"] is None
    assert {k: v for k, v in means["avat3r"].items() if k != "csim"} == pytest.approx(
        {"psnr": 21.0, "ssim": 0.75, "lpips": 0.35, "akd": 4.0})  # AKD's NaN sample is skipped
    assert means["baseline"]["lpips"] is None and means["baseline"]["csim"] is None  # csim is unavailable
    assert table.counts()["avat3r"]["akd"] == 1 and table.counts()["baseline"]["ssim"] == 2
    md = table.to_markdown()
    lines = md.splitlines()
    assert lines[0] == "| Method | PSNR↑ | SSIM↑ | LPIPS↓ | AKD↓ | CSIM↑ |"
    assert lines[2] == "| avat3r | 21.00 | 0.7500 | 0.3500 | 4.00 | n/a |"
    assert lines[3] == "| baseline | 18.50 | 0.6250 | n/a | 5.50 | n/a |"
    assert UNAVAILABLE_CSIM in md
    d = table.to_dict(samples=True)
    json.dumps(d, allow_nan=False)
    assert d["means"]["baseline"]["lpips"] is None and d["unavailable"]["csim"] == UNAVAILABLE_CSIM
    assert [s["id"] for s in d["samples"]] == ["a", "b", "a", "b"]
    # infinite PSNR (identical images) stays visible and JSON-safe
    t2 = MetricTable(metrics=("psnr",))
    t2.add_batch("copy", psnr=psnr(torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4)))
    assert "| copy | inf |" in t2.to_markdown()
    assert t2.to_dict()["means"]["copy"]["psnr"] == "inf"
    with pytest.raises(ValueError, match="unknown metric"):
        table.add("x", fid=1.0)
