"""The training stage: the loop overfits one sample, a killed run resumes to the same weights,
bad batches are skipped and counted, 2-worker Ray Train DDP keeps ranks identical, and the
non-learned baseline is evaluated and reported beside the model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from avat3r_core.config import RenamedKeyError, build
from avat3r_core.inference.checkpoint import load_trained_model
from avat3r_core.inference.predict import mean_psnr_ssim, predict_images
from avat3r_core.inference.visuals import image_grid
from avat3r_core.train.config import TrainConfig
from avat3r_core.train.synthetic import SyntheticSource, synthetic_sample
from stages.train import TrainScaling, run_train, train_stage_configs

SIZE = 32
MODEL = {"feature_dim": 0, "image_size": SIZE, "num_views": 2}


def config(**overrides) -> TrainConfig:
    return TrainConfig.preset("tiny", model=dict(MODEL), **overrides)


def log_steps(out: Path) -> list[int]:
    with (out / "train_log.csv").open(newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_overfits_one_sample_past_30_db_and_writes_reports(tmp_path):
    source = SyntheticSource(num_samples=1, size=SIZE)
    cfg = config(schedule=dict(steps=150, validate_every=0), optim=dict(lr=2e-3), checkpoint=dict(every=1000))
    metrics = run_train(cfg, source, tmp_path / "run", source, executor="local")
    assert metrics["val_psnr"] > 30.0, metrics
    assert math.isfinite(metrics["baseline_val_psnr"]) and metrics["baseline_val_psnr"] < metrics["val_psnr"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("final_train_loss", "val_psnr", "val_ssim", "baseline_val_psnr", "baseline_val_ssim",
                "lpips_status", "steps", "samples_per_s", "skipped_batches"):
        assert key in saved, key
    assert saved["steps"] == 150 and saved["lpips_status"].startswith("LPIPS disabled")
    assert log_steps(tmp_path / "run") == list(range(1, 151))
    with (tmp_path / "run" / "train_log.csv").open(newline="") as f:
        row = next(csv.DictReader(f))
    assert all(float(row[k]) >= 0 for k in ("data_s", "forward_s", "render_s", "backward_s", "samples_per_s"))
    assert (tmp_path / "run" / "plots" / "train.csv").exists() and (tmp_path / "run" / "plots" / "val.csv").exists()
    assert list((tmp_path / "run" / "val").glob("*.png")) and list((tmp_path / "run" / "tensorboard").iterdir())
    assert Path(metrics["checkpoint"], "checkpoint.pt").exists()


class CrashOnce:
    """Wraps a source; raises once (the 'kill') when rank 0 reaches the given batch of an epoch."""

    def __init__(self, source, marker: Path, epoch: int, position: int):
        self.source, self.marker, self.epoch, self.position = source, marker, epoch, position

    def __call__(self, rank, world_size, epoch):
        for i, batch in enumerate(self.source(rank, world_size, epoch)):
            if rank == 0 and (epoch, i) == (self.epoch, self.position) and not self.marker.exists():
                self.marker.touch()
                raise RuntimeError("simulated kill")
            yield batch


def test_killed_run_resumes_to_the_same_weights_and_counts_nan_batches(tmp_path):
    source = SyntheticSource(num_samples=3, size=SIZE, nan_samples=(1,))  # 1 of 3 samples has a NaN
    cfg = config(schedule=dict(steps=8, validate_every=0), checkpoint=dict(every=4, keep=2))
    straight = run_train(cfg, source, tmp_path / "straight", executor="local")

    crashing = CrashOnce(source, tmp_path / "killed.marker", epoch=3, position=0)  # after step 4's checkpoint
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_train(cfg, crashing, tmp_path / "resumed", executor="local")
    assert log_steps(tmp_path / "resumed")[-1] > 4  # it trained past the checkpoint before dying
    resumed = run_train(cfg, crashing, tmp_path / "resumed", executor="local")  # same dir: resumes

    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == straight["steps"] == 8
    assert resumed["param_checksum"] == straight["param_checksum"]
    assert resumed["skipped_batches"] == straight["skipped_batches"] > 0  # NaN batches skipped, counted
    assert resumed["final_train_loss"] == straight["final_train_loss"]
    assert log_steps(tmp_path / "resumed") == list(range(1, 9))  # rows past the checkpoint were replaced
    kept = sorted((tmp_path / "resumed" / "ray" / "train").glob("checkpoint_*"))
    assert [p.name for p in kept] == ["checkpoint_000000004", "checkpoint_000000008"]

    # an explicit checkpoint directory starts a new run from there
    more = run_train(config(schedule=dict(steps=8, validate_every=0), checkpoint=dict(every=100)), source, tmp_path / "from_dir",
                     resume_from=kept[0], executor="local")
    assert more["resumed_from_step"] == 4 and more["param_checksum"] == straight["param_checksum"]


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_missing_checkpoint_directory_is_a_clear_error(tmp_path, executor):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        run_train(config(schedule=dict(steps=1)), SyntheticSource(num_samples=1), tmp_path / "out", resume_from=missing,
                  executor=executor)


def test_two_worker_ray_train_keeps_ranks_identical_and_resumes(tmp_path, ray_session):
    source = SyntheticSource(num_samples=4, size=SIZE)
    val = SyntheticSource(num_samples=1, size=SIZE, seed=7, shuffle=False)
    out = tmp_path / "ddp"
    first = run_train(config(schedule=dict(steps=3, validate_every=0), checkpoint=dict(every=3)), source, out, val,
                      scaling=TrainScaling(num_workers=2), name="ddp")
    ranks = [json.loads((out / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"] == first["param_checksum"]
    assert first["samples"] == 6 and Path(first["checkpoint"], "checkpoint.pt").exists()
    # the same storage path + name: Ray Train hands the latest checkpoint back (get_checkpoint);
    # rank 0 then dies at step 5 (after step 4, which was not checkpointed): FailureConfig restarts
    # the worker group, which resumes from step 3 again and finishes
    crashing = CrashOnce(source, tmp_path / "killed.marker", epoch=2, position=0)
    second = run_train(config(schedule=dict(steps=5, validate_every=0), checkpoint=dict(every=3)), crashing, out, val,
                       scaling=TrainScaling(num_workers=2), name="ddp", max_failures=1)
    assert (tmp_path / "killed.marker").exists()
    ranks = [json.loads((out / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert second["resumed_from_step"] == 3 and second["steps"] == 5 and second["samples"] == 10
    assert ranks[0]["param_checksum"] == ranks[1]["param_checksum"] != first["param_checksum"]
    assert log_steps(out) == [1, 2, 3, 4, 5]
    assert math.isfinite(second["val_psnr"]) and math.isfinite(second["baseline_val_psnr"])


def test_baseline_is_evaluated_by_the_same_code_and_shown_beside_the_model():
    batch = synthetic_sample(0, size=SIZE)
    metrics = mean_psnr_ssim([batch], model=None)
    assert math.isfinite(metrics["psnr"]) and 10.0 < metrics["psnr"] < 60.0 and 0.0 < metrics["ssim"] <= 1.0
    grid = image_grid(batch, {"baseline": predict_images(batch)})
    # one row per target view; columns: 2 inputs | target | baseline
    assert grid.shape == (2 * SIZE, 4 * SIZE, 3) and grid.dtype.name == "uint8"


def test_presets():
    paper = TrainConfig.preset("paper")
    assert (paper.optim.lr, paper.batch_size, paper.schedule.steps, paper.bf16, TrainScaling.preset("paper").use_gpu) == (5e-5, 1, 3_500_000, True, True)
    assert paper.loss.use_lpips and paper.loss.lpips_start_step == 3_000_000
    assert paper.model_config().image_size == 512
    tiny = TrainConfig.preset("tiny")
    assert tiny.schedule.steps <= 1000 and not TrainScaling.preset("tiny").use_gpu and tiny.model_config().dim == 128
    assert tiny.lr_at(0) < tiny.lr_at(tiny.schedule.warmup_steps) and tiny.lr_at(tiny.schedule.steps) < tiny.optim.lr


def test_flat_train_keys_name_their_new_section():
    for old, new in (("steps", "train.schedule.steps"), ("lr", "train.optim.lr"),
                     ("checkpoint_every", "train.checkpoint.every"), ("keep_checkpoints", "train.checkpoint.keep"),
                     ("log_every", "train.logging.every"), ("validate_every", "train.schedule.validate_every")):
        with pytest.raises(RenamedKeyError, match=f"train.{old} is now {new}".replace(".", r"\.")):
            train_stage_configs({"preset": "tiny", old: 3})


def test_sections_merge_preset_and_values_key_by_key():
    paper = TrainConfig.preset("paper")
    cfg = build(TrainConfig, {"preset": "paper", "optim": {"grad_clip": 0.5}, "schedule": {"steps": 7}})
    assert (cfg.optim.grad_clip, cfg.optim.lr) == (0.5, paper.optim.lr) == (0.5, 5e-5)  # the preset's lr kept
    assert (cfg.schedule.steps, cfg.schedule.warmup_steps, cfg.schedule.min_lr_fraction) == (7, 2000, 1.0)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.logging.every) == (5000, 5, 50)
    assert cfg.loss.use_lpips and cfg.loss.lpips_start_step == 3_000_000


def test_nested_sections_of_other_stages_merge_key_by_key():
    """params.yaml's `track.fit` and `train.data.loader` set one key and keep the preset's others
    (the same merge as the train sections above, not a replaced section)."""
    from stages.track import TrackConfig
    from stages.train import TrainDataConfig

    track = build(TrackConfig, {"preset": "tiny", "ground_truth_root": "gt", "fit": {"adam_iters": 7}})
    assert (track.fit.adam_iters, track.fit.rigid_iters, track.fit.lbfgs_iters) == (7, 40, 50)
    assert track.overlay_frames == 2
    data = build(TrainDataConfig, {"preset": "demo", "loader": {"input_contrast": True}})
    demo = TrainDataConfig.preset("demo")
    assert data.loader.input_contrast and not demo.loader.input_contrast
    assert (data.loader.target_views, data.loader.batch_size, data.loader.buffer_per_sequence) == (4, 1, 8)
    assert data.epoch_length == 64 and data.val_samples == 16


def test_a_checkpoint_with_the_flat_config_loads_for_inference_and_resume(tmp_path):
    """Checkpoints written before the sections stored the flat keys (steps, lr, checkpoint_every, ...):
    inference rebuilds the network from model_preset + model alone, and resume reads no stored config."""
    import torch

    from avat3r_core.weights import safe_torch_load

    source = SyntheticSource(num_samples=2, size=SIZE)
    cfg = config(schedule=dict(steps=4, validate_every=0), checkpoint=dict(every=2))
    straight = run_train(cfg, source, tmp_path / "straight", executor="local")
    first = sorted((tmp_path / "straight" / "ray" / "train").glob("checkpoint_*"))[0]
    old = tmp_path / "old_checkpoint"
    old.mkdir()
    state = safe_torch_load(first / "checkpoint.pt")
    c = state["config"]
    flat = {k: v for k, v in c.items() if k not in ("optim", "schedule", "checkpoint", "logging")}
    flat.update(c["optim"], **c["schedule"], checkpoint_every=c["checkpoint"]["every"],
                keep_checkpoints=c["checkpoint"]["keep"], log_every=c["logging"]["every"])
    state["config"] = flat
    assert "steps" in flat and "schedule" not in flat
    torch.save(state, old / "checkpoint.pt")

    model, model_config, info = load_trained_model(old)
    assert model_config.image_size == SIZE and info["model_preset"] == "tiny"
    reference, _, _ = load_trained_model(first)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    resumed = run_train(cfg, source, tmp_path / "resumed", resume_from=old, executor="local")
    assert resumed["resumed_from_step"] == 2 and resumed["param_checksum"] == straight["param_checksum"]
