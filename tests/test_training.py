"""Training pieces without Ray: the step overfits one sample, checkpoints round-trip, NaN batches are
skipped, and the non-learned baseline is evaluated by the same code."""

from __future__ import annotations

import pytest
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.config import build
from avat3r_core.batch import Avat3rBatch
from avat3r_core.gaussians import Gaussians
from avat3r_core.losses import Avat3rLoss
from avat3r_core.model import Avat3r, Avat3rConfig
from avat3r_core.render import render
from avat3r_core.inference.predict import mean_psnr_ssim
from avat3r_core.train.config import OptimConfig, ScheduleConfig, TrainConfig
from avat3r_core.train.loop import train_step
from avat3r_core.train.state import load_checkpoint, save_checkpoint

SIZE = 32


def scene_batch(seed: int = 1) -> Avat3rBatch:
    """A blob 'head' seen by 4 cameras: 2 input views with exact position maps, 2 target views."""
    g = torch.Generator().manual_seed(seed)
    n = 3000
    head = Gaussians.from_activated(torch.randn(n, 3, generator=g) * 0.05, torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
                                    torch.full((n, 3), 0.006), torch.full((n,), 0.8), torch.rand(n, 3, generator=g))
    eyes = torch.tensor([[0.4, 0.0, 0.9], [-0.4, 0.0, 0.9], [0.0, 0.3, 0.95], [0.0, -0.2, 1.0]])
    cams = Cameras.look_at(eyes, torch.zeros(3), fov_deg=18, width=SIZE, height=SIZE)
    with torch.no_grad():
        out = render(head, cams)  # over black: straight colour = rgb / alpha
    alpha = out.alpha.permute(0, 3, 1, 2)
    rgb = (out.rgb.permute(0, 3, 1, 2) / alpha.clamp_min(1e-6)).clamp(0, 1)
    uv = cams.pixel_grid().reshape(1, -1, 2).expand(4, -1, -1)
    points = cams.unproject(uv, out.depth[..., 0].reshape(4, -1).clamp_min(0.1)).reshape(4, SIZE, SIZE, 3)
    return Avat3rBatch(
        images=rgb[None, :2], alphas=alpha[None, :2], cameras=cams[[0, 1]],
        position_maps=points.permute(0, 3, 1, 2)[None, :2], confidence=(alpha[None, :2, 0] > 0.5).float(),
        features=None, target_images=rgb[None, 2:], target_alphas=alpha[None, 2:], target_cameras=cams[[2, 3]],
        expression=torch.zeros(1, 135), keys=["blob"], input_frames=torch.tensor([[0, 1]]),
        target_frames=torch.tensor([2]))


def tiny_model() -> Avat3r:
    torch.manual_seed(0)
    return Avat3r(build(Avat3rConfig, {"num_views": 2, "image_size": SIZE, "feature_dim": 0}, preset="tiny"))


def test_overfits_one_sample_past_30_db():
    batch, model = scene_batch(), tiny_model()
    config = TrainConfig.preset("tiny", schedule=dict(steps=250))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    loss_fn = Avat3rLoss()
    start = mean_psnr_ssim([batch], model)["psnr"]
    for step in range(config.schedule.steps):
        result = train_step(model, batch, optimizer, loss_fn, config, step)
        assert not result.skipped and set(result.seconds) == {"forward", "render", "backward"}
    final = mean_psnr_ssim([batch], model)
    assert final["psnr"] > 30.0 > start, (start, final)


def test_train_step_weights_the_loss_by_the_batchs_target_weights():
    """No target_weights: the plain loss; all-ones weights: the same loss and the same update;
    raised pixels: the loss the weighted Avat3rLoss gives on the same render."""
    import dataclasses

    from avat3r_core.inference.predict import predict_gaussians, render_predictions, targets_on_background

    batch, config = scene_batch(), TrainConfig.preset("tiny", optim={"grad_clip": 0.0})
    weights = torch.ones(1, 2, 1, SIZE, SIZE)
    weights[..., 10:20, 8:24] = 5.0
    bg = torch.tensor(config.background)
    results, params = {}, {}
    for name, w in (("plain", None), ("ones", torch.ones_like(weights)), ("mouth", weights)):
        model = tiny_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        if name == "mouth":
            with torch.no_grad():
                pred = render_predictions(predict_gaussians(model, batch, False), batch, bg)
            expected = float(Avat3rLoss()(pred, targets_on_background(batch, bg), mask=weights.flatten(0, 1))[0])
        results[name] = train_step(model, dataclasses.replace(batch, target_weights=w), optimizer, Avat3rLoss(),
                                   config).loss
        params[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert results["ones"] == pytest.approx(results["plain"], rel=1e-6)
    torch.testing.assert_close(params["ones"], params["plain"])
    assert results["mouth"] == pytest.approx(expected, rel=1e-5) and results["mouth"] != pytest.approx(results["plain"])


def test_nan_batch_is_skipped_and_parameters_untouched():
    batch, model = scene_batch(), tiny_model()
    batch.position_maps[0, 0, :, 3, 3] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert train_step(model, batch, optimizer, Avat3rLoss(), TrainConfig()).skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_checkpoint_round_trip_and_missing_directory(tmp_path):
    batch, model = scene_batch(), tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_step(model, batch, optimizer, Avat3rLoss(), TrainConfig(), 0)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, step=1, extra={"epoch": 0})
    restored = tiny_model()
    state = load_checkpoint(tmp_path / "ckpt", restored, torch.optim.Adam(restored.parameters(), lr=1e-3))
    assert state["step"] == 1 and state["extra"] == {"epoch": 0}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere", restored)


def test_baseline_is_evaluated_by_the_same_code():
    metrics = mean_psnr_ssim([scene_batch()], model=None)
    assert 10.0 < metrics["psnr"] < 60.0 and 0.0 < metrics["ssim"] <= 1.0


def test_lr_schedule_warms_up_then_decays():
    config = TrainConfig(schedule=ScheduleConfig(steps=100, warmup_steps=10, min_lr_fraction=0.1), optim=OptimConfig(lr=1.0))
    assert config.lr_at(0) == pytest.approx(0.1) and config.lr_at(9) == pytest.approx(1.0)
    assert config.lr_at(100) == pytest.approx(0.1) and config.lr_at(50) < config.lr_at(20)
