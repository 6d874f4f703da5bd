"""Avatar cache, turntables and animation on the (untrained) tiny model."""

from __future__ import annotations

import numpy as np
import torch

from avat3r_core.inference.drive import animation_frames, encoded_bytes, load_encoded, render_frames, view_orbit
from avat3r_core.cameras import Cameras
from avat3r_core.config import build
from avat3r_core.gaussians import Gaussians
from avat3r_core.model import Avat3r, Avat3rConfig
from avat3r_core.model.avat3r import Avat3rInputs
from avat3r_core.video import encode_video, read_frames


def blob(n=400, seed=0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    return Gaussians.from_activated(
        means=torch.randn(n, 3, generator=g) * 0.02, rotations=torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
        scales=torch.full((n, 3), 0.01), opacities=torch.full((n,), 0.9), colors=torch.rand(n, 3, generator=g))


FRONT, UP = (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)  # the studio's frame: face towards +z, y up


def test_orbit_cameras_look_at_the_head():
    cams = view_orbit([0.0, 0.02, 0.0], 1.0, FRONT, UP, frames=12, size=64, yaw_deg=60.0)
    uv, depth = cams.project(torch.tensor([[0.0, 0.02, 0.0]]))
    assert torch.allclose(uv[:, 0], torch.full((12, 2), 32.0), atol=1e-3) and (depth > 0).all()
    distance = (cams.centers - torch.tensor([0.0, 0.02, 0.0])).norm(dim=-1)
    assert torch.allclose(distance, torch.ones(12), atol=1e-5)
    yaw = torch.atan2(cams.centers[:, 0], cams.centers[:, 2])
    assert yaw.max() > 0.9 and yaw.min() < -0.9  # sweeps both sides of the face


def test_turntable_renders_the_avatar_and_encodes(tmp_path):
    gaussians = blob()
    frames = render_frames(gaussians, view_orbit(np.zeros(3), 1.0, FRONT, UP, frames=4, size=48))
    assert frames.shape == (4, 48, 48, 3) and frames.dtype == np.uint8
    assert (frames[:, 20:28, 20:28] < 250).any() and (frames[:, 0, 0] == 255).all()  # object in the middle, white around
    (tmp_path / "turntable.mp4").write_bytes(encode_video(list(frames), fps=24.0))
    assert len(list(read_frames(tmp_path / "turntable.mp4"))) == 4


def tiny_model_inputs():
    torch.manual_seed(0)
    config = build(Avat3rConfig, {"num_views": 2, "image_size": 32, "feature_dim": 0}, preset="tiny")
    model = Avat3r(config).eval()
    eyes = torch.tensor([[0.3, 0.0, 1.0], [-0.3, 0.0, 1.0]])
    cams = Cameras.look_at(eyes, torch.zeros(3), fov_deg=20, width=32, height=32)
    depth = torch.full((2, 32 * 32), 1.0)
    uv = cams.pixel_grid().reshape(1, -1, 2).expand(2, -1, -1)
    points = cams.unproject(uv, depth).reshape(2, 32, 32, 3).permute(0, 3, 1, 2)
    inputs = Avat3rInputs(images=torch.rand(1, 2, 3, 32, 32), cameras=cams, position_maps=points[None] * 0.1,
                          confidence=torch.ones(1, 2, 32, 32))
    return model, inputs, cams


def test_encoder_cache_round_trip_and_animation(tmp_path):
    model, inputs, cams = tiny_model_inputs()
    with torch.no_grad():
        encoded = model.encode(inputs)
    (tmp_path / "cache.pt").write_bytes(encoded_bytes(encoded))
    restored = load_encoded(tmp_path / "cache.pt")
    codes = torch.randn(3, model.config.expr_dim)
    with torch.no_grad():
        a = model.decode(encoded.expand(3), codes)
        b = model.decode(restored.expand(3), codes)
    assert torch.equal(a.means, b.means) and torch.equal(a.colors, b.colors)
    frames = animation_frames(model, restored, codes * 5, cams[0], chunk=2)
    assert frames.shape == (3, 32, 32, 3)
    assert np.abs(frames[0].astype(int) - frames[2]).sum() > 0  # the expression changes the picture
