"""The training step and loop (no Ray): :func:`train_step`, :class:`BatchStream`, the sessions, :func:`train_loop`.

One step: the model turns the input views into pixel-aligned Gaussians (invalid pixels at zero
opacity), :func:`avat3r_core.render.render` draws them at the target cameras, and the Avat3r loss
compares with the targets composited on the same background (each pixel weighted by the batch's
``target_weights`` when it has them, e.g. the mouth raised); then backward, gradient clipping and
Adam. On CUDA the network runs under bf16 autocast (rendering and loss stay float32); on CPU the
same code runs in float32.

The loop (:func:`train_loop`) is written against a small :class:`TrainSession` (rank, world size,
device, how to wrap the model for DDP, where checkpoints come from and go to). :class:`LocalSession`
runs it in this process (tests, debugging); ``stages.train`` supplies a Ray Train session (DDP over
``TorchTrainer`` workers). Collective decisions (skip a bad batch, gather loader positions) use
``torch.distributed`` when a process group is up, so every rank takes the same branch.

Data comes from a :data:`BatchSource` factory ``(rank, world_size, epoch) -> Iterator[Avat3rBatch]``
yielding that rank's shard of one epoch; it must be deterministic for exact resume.
:class:`~avat3r_core.train.synthetic.SyntheticSource` is an in-memory one (a random Gaussian blob "head" rendered from cameras
around it, with exact position maps) for tests and benchmarks.

The recipe is :mod:`avat3r_core.train.config`, checkpoints and RNG :mod:`avat3r_core.train.state`,
the logs :mod:`avat3r_core.train.logger`; predicting and rendering are :mod:`avat3r_core.inference`.
This package never imports Ray (see tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from avat3r_core.batch import Avat3rBatch
from avat3r_core.inference.checkpoint import CHECKPOINT_FILE
from avat3r_core.inference.predict import (
    mean_psnr_ssim,
    predict_gaussians,
    predict_images,
    render_predictions,
    targets_on_background,
)
from avat3r_core.inference.visuals import image_grid, save_png
from avat3r_core.losses import Avat3rLoss
from avat3r_core.train.collectives import all_ranks_agree, gather_objects, parameter_checksum, unwrap
from avat3r_core.train.config import TrainConfig, build_model, build_optimizer
from avat3r_core.train.logger import TrainLogger
from avat3r_core.train.state import load_checkpoint, rng_state, save_checkpoint, seed_everything, set_rng_state

log = logging.getLogger("avat3r.training")

#: ``(rank, world_size, epoch) -> iterator over this rank's batches of that epoch``.
BatchSource = Callable[[int, int, int], Iterator[Avat3rBatch]]


@dataclass
class StepResult:
    skipped: bool
    loss: float = float("nan")
    terms: dict = field(default_factory=dict)
    grad_norm: float = float("nan")
    seconds: dict = field(default_factory=dict)  # forward, render, backward
    reason: str = ""  # why it was skipped
    lr: float = float("nan")


def train_step(model, batch: Avat3rBatch, optimizer: torch.optim.Optimizer, loss_fn: Avat3rLoss,
               config: TrainConfig, step: int = 0, scheduler=None) -> StepResult:
    """One optimiser step; a batch with NaN/Inf inputs, or a non-finite loss, is skipped (logged)
    on every rank at once. Without ``scheduler`` the lr is set from ``config.lr_at(step)``; with one
    it is the scheduler's and the scheduler advances after the update. ``seconds['backward']``
    includes clipping and the optimiser update."""
    device = batch.images.device
    if not all_ranks_agree(batch.is_finite(), device):
        log.warning("step %d: batch %s has non-finite inputs (here or on another rank); skipped", step, batch.keys)
        return StepResult(skipped=True, reason="non-finite inputs")
    if scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step) * group.get("lr_scale", 1.0)
    lr = optimizer.param_groups[0]["lr"]
    background = torch.tensor(config.background, dtype=torch.float32, device=device)
    t0 = time.perf_counter()
    gaussians = predict_gaussians(model, batch, config.bf16)
    _sync(device)
    t1 = time.perf_counter()
    prediction = render_predictions(gaussians, batch, background)
    _sync(device)
    t2 = time.perf_counter()
    weights = None if batch.target_weights is None else batch.target_weights.flatten(0, 1)
    loss, terms = loss_fn(prediction, targets_on_background(batch, background).to(prediction.dtype), step=step,
                          mask=weights)
    optimizer.zero_grad(set_to_none=True)
    if not all_ranks_agree(bool(torch.isfinite(loss)), device):
        log.warning("step %d: non-finite loss on %s (here or on another rank); skipped", step, batch.keys)
        return StepResult(skipped=True, reason="non-finite loss")
    loss.backward()
    if config.optim.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack(
            [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    _sync(device)
    t3 = time.perf_counter()
    return StepResult(False, float(loss.detach()), terms, float(grad_norm),
                      {"forward": t1 - t0, "render": t2 - t1, "backward": t3 - t2}, lr=lr)


class BatchStream:
    """Endless iterator over a :data:`BatchSource` for one rank, epoch after epoch, that knows its
    position (epoch, batches consumed in it) and can be fast-forwarded there on resume."""

    def __init__(self, source: BatchSource, rank: int = 0, world_size: int = 1):
        self.source, self.rank, self.world_size = source, rank, world_size
        self.epoch, self.position = 0, 0
        self._it: Iterator[Avat3rBatch] | None = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), 0
        self._it = iter(self.source(self.rank, self.world_size, self.epoch))
        for _ in range(int(state["position"])):
            next(self._it)  # a deterministic source replays the same order
            self.position += 1

    def __iter__(self):
        return self

    def __next__(self) -> Avat3rBatch:
        for attempt in range(2):
            if self._it is None:
                self._it = iter(self.source(self.rank, self.world_size, self.epoch))
            try:
                batch = next(self._it)
                self.position += 1
                return batch
            except StopIteration:
                self._it, self.epoch, self.position = None, self.epoch + 1, 0
        raise RuntimeError(f"batch source yielded no batch for rank {self.rank}/{self.world_size} "
                           f"in epoch {self.epoch - 1} (empty shard?)")


# --------------------------------------------------------------------------- sessions
class TrainSession(Protocol):
    """Where the loop runs: rank/world, device, DDP wrapping, checkpoint in/out, reporting.
    ``report`` is called by every rank at the same steps (a barrier under Ray Train)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None: ...


class LocalSession:
    """Single process: checkpoints go to ``<root>/checkpoint_<step>`` (keep the newest ``keep``);
    resume from ``resume_from`` if given, else from the newest checkpoint under ``root``."""

    rank, world_size = 0, 1

    def __init__(self, root: str | Path, keep: int = 3, resume_from: str | Path | None = None,
                 device: str | torch.device = "cpu"):
        self.root, self.keep = Path(root), keep
        self.resume_from = Path(resume_from) if resume_from is not None else None
        self.device = torch.device(device)
        self.reports: list[dict] = []
        if self.resume_from is not None and not self.resume_from.is_dir():
            raise FileNotFoundError(f"checkpoint directory to resume from does not exist: {self.resume_from}")

    def prepare_model(self, model):
        return model.to(self.device)

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.root.glob("checkpoint_*") if (p / CHECKPOINT_FILE).exists())

    @contextlib.contextmanager
    def latest_checkpoint(self):
        found = self.checkpoints()
        yield self.resume_from or (found[-1] if found else None)

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None:
            return
        dest = self.root / f"checkpoint_{int(metrics['step']):09d}"
        if dest.exists():
            shutil.rmtree(dest)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(checkpoint_dir, dest)
        for old in self.checkpoints()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the loop
def _validate(step: int, model, val_batches: list[Avat3rBatch], baseline: dict, config: TrainConfig,
              out_dir: Path, logger: TrainLogger | None) -> dict:
    raw = unwrap(model)
    result = mean_psnr_ssim(val_batches, raw, config.background)
    row = {"step": step, "psnr": result["psnr"], "ssim": result["ssim"],
           "baseline_psnr": baseline["psnr"], "baseline_ssim": baseline["ssim"],
           **_expression_psnrs(raw, val_batches, config)}
    if logger is not None:
        logger.val(row)
    first = val_batches[0]
    raw.eval()
    try:
        preds = {"model": predict_images(first, raw, config.background, config.bf16),
                 "baseline": predict_images(first, None, config.background)}
    finally:
        raw.train()
    save_png(out_dir / "val" / f"step_{step:09d}.png", image_grid(first, preds, config.background))
    log.info("step %d: val PSNR %.2f SSIM %.4f (baseline %.2f / %.4f)", step, row["psnr"], row["ssim"],
             baseline["psnr"], baseline["ssim"])
    return row


def _expression_psnrs(model, val_batches: list[Avat3rBatch], config: TrainConfig) -> dict:
    """Validation PSNR with the input frames' code, their expression with the target's head pose and
    a neutral code (empty for batches without input codes): a run shows when the expression path
    starts to matter, and whether it is the expression or the code's head pose that does."""
    from avat3r_core.animation.sensitivity import ExpressionProbe

    if not val_batches or any(b.input_expressions is None for b in val_batches):
        return {}
    probe = ExpressionProbe(model, config.background, config.bf16)
    bg = torch.tensor(config.background, dtype=torch.float32, device=val_batches[0].images.device)
    model.eval()
    try:
        for b in val_batches:
            probe.add(b, targets_on_background(b, bg).float().clamp(0, 1))
    finally:
        model.train()
    codes = probe.summary()["codes"]
    return {"psnr_inputs_code": codes["inputs"]["psnr"], "psnr_inputs_expression": codes["inputs_expression"]["psnr"],
            "psnr_neutral_code": codes["neutral"]["psnr"]}


# Long (~105 lines): the loop's state (step, streams, skipped counts, logger, checkpoint cadence)
# is shared by resume, step, validation and checkpointing; helpers (_validate, train_step) hold the rest.
def train_loop(config: TrainConfig, source: BatchSource, out_dir: str | Path, session: TrainSession | None = None,
               val_source: BatchSource | None = None) -> dict:
    """Train ``config.schedule.steps`` optimiser steps from ``source`` (resuming from the session's latest
    checkpoint), checkpointing every ``checkpoint.every`` steps and at the end, validating every
    ``schedule.validate_every`` steps and at the end on ``val_source`` (rank 0). Rank 0 writes
    ``train_log.csv``, ``tensorboard/``, ``plots/*.csv``, ``val/*.png`` and ``metrics.json`` in
    ``out_dir``; every rank writes ``ranks/rank_<r>.json`` (final step, parameter checksum).
    Returns rank 0's metrics (other ranks: their rank summary)."""
    out_dir = Path(out_dir)
    session = session or LocalSession(out_dir / "checkpoints", keep=config.checkpoint.keep)
    rank, world, device = session.rank, session.world_size, session.device
    seed_everything(config.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(config).to(device)
    model = session.prepare_model(model)
    model.train()
    optimizer, scheduler = build_optimizer(model, config)
    loss_fn = Avat3rLoss(config.loss).to(device)
    stream = BatchStream(source, rank, world)
    step, skipped, samples, train_seconds = 0, 0, 0, 0.0
    last_loss = float("nan")
    with session.latest_checkpoint() as ckpt:
        if ckpt is not None:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            step, extra = state["step"], state["extra"]
            loaders = extra.get("loaders") or [{"epoch": 0, "position": 0}]
            stream.restore(loaders[rank] if rank < len(loaders) else loaders[0])
            skipped, samples = int(extra.get("skipped", 0)), int(extra.get("samples", 0))
            train_seconds, last_loss = float(extra.get("train_seconds", 0.0)), float(extra.get("last_loss", "nan"))
            rngs = state.get("rng") or []
            if rank < len(rngs) and rngs[rank] is not None:
                set_rng_state(rngs[rank])
            else:
                seed_everything(config.seed + 1000 * rank + step)
            log.info("rank %d: resumed from %s at step %d (epoch %d, batch %d)", rank, ckpt, step,
                     stream.epoch, stream.position)
        else:
            seed_everything(config.seed + 1000 * rank)  # per-rank randomness from here on
    resumed_from = step
    logger = TrainLogger(out_dir, resume_step=step) if rank == 0 else None
    val_batches = [b.to(device) for b in val_source(0, 1, 0)] if (val_source is not None and rank == 0) else []
    baseline = mean_psnr_ssim(val_batches, None, config.background) if val_batches else {}
    val_row: dict = {}
    if rank == 0:
        log.info("training %d steps on %d rank(s); %s", config.schedule.steps, world, loss_fn.lpips_status)

    def checkpoint_and_report(metrics: dict) -> None:
        extra = {"loaders": gather_objects(stream.state()), "skipped": skipped, "samples": samples,
                 "train_seconds": train_seconds, "last_loss": last_loss, "epoch": stream.epoch}
        rngs = gather_objects(rng_state())
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="avat3r-ckpt-", ignore_cleanup_errors=True) as tmp:
                save_checkpoint(tmp, model, optimizer, step, extra, scheduler, rngs, config)
                session.report(metrics, Path(tmp))
        else:
            session.report(metrics, None)

    while step < config.schedule.steps:
        t0 = time.perf_counter()
        batch = next(stream).to(device)
        data_s = time.perf_counter() - t0
        result = train_step(model, batch, optimizer, loss_fn, config, step, scheduler)
        if result.skipped:
            skipped += 1
            if rank == 0:
                log.warning("skipped batches so far: %d (%s)", skipped, result.reason)
            if skipped > config.max_skipped:
                raise RuntimeError(f"{skipped} batches skipped for non-finite inputs/loss "
                                   f"(max_skipped={config.max_skipped}); stopping")
            continue
        step += 1
        step_s = data_s + sum(result.seconds.values())
        train_seconds += step_s
        samples += batch.batch_size * world
        last_loss = result.loss
        if rank == 0 and (step % max(1, config.logging.every) == 0 or step == config.schedule.steps):
            logger.train({
                "step": step, "epoch": stream.epoch, "loss": result.loss, "l1": result.terms.get("l1"),
                "ssim": result.terms.get("ssim"), "lpips": result.terms.get("lpips", ""), "lr": result.lr,
                "grad_norm": result.grad_norm, "data_s": data_s, "forward_s": result.seconds["forward"],
                "render_s": result.seconds["render"], "backward_s": result.seconds["backward"], "step_s": step_s,
                "samples_per_s": batch.batch_size * world / step_s, "skipped_total": skipped})
        if rank == 0 and val_batches and ((config.schedule.validate_every and step % config.schedule.validate_every == 0)
                                          or step == config.schedule.steps):
            val_row = _validate(step, model, val_batches, baseline, config, out_dir, logger)
        if step % max(1, config.checkpoint.every) == 0 or step == config.schedule.steps:
            checkpoint_and_report({"step": step, "loss": last_loss, "skipped": skipped,
                                   **({"val_psnr": val_row["psnr"]} if val_row else {})})

    checksum = parameter_checksum(model)
    rank_summary = {"rank": rank, "world_size": world, "step": step, "resumed_from_step": resumed_from, "skipped": skipped,
                    "param_checksum": checksum, "epoch": stream.epoch, "torch_threads": torch.get_num_threads()}
    (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (out_dir / "ranks" / f"rank_{rank}.json").write_text(json.dumps(rank_summary, indent=1))
    if rank != 0:
        return rank_summary
    if val_batches and not val_row:  # resumed at the final step: validate once more
        val_row = _validate(step, model, val_batches, baseline, config, out_dir, logger)
    logger.finish()
    metrics = {
        "steps": step, "resumed_from_step": resumed_from, "num_workers": world, "final_train_loss": last_loss, "skipped_batches": skipped,
        "samples": samples, "samples_per_s": samples / train_seconds if train_seconds > 0 else float("nan"),
        "val_psnr": val_row.get("psnr"), "val_ssim": val_row.get("ssim"),
        "baseline_val_psnr": baseline.get("psnr"), "baseline_val_ssim": baseline.get("ssim"),
        "lpips_status": loss_fn.lpips_status, "param_checksum": checksum,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def step_time_summary(train_log: str | Path, skip_first: int = 2) -> dict:
    """Mean seconds per step of data / forward / render / backward (and samples/s) from
    ``train_log.csv``, leaving out the first ``skip_first`` (warm-up) rows."""
    with Path(train_log).open(newline="") as f:
        rows = list(csv.DictReader(f))[skip_first:]
    if not rows:
        return {}
    mean = lambda k: sum(float(r[k]) for r in rows) / len(rows)  # noqa: E731
    out = {k: mean(f"{k}_s") for k in ("data", "forward", "render", "backward")}
    out["step"] = mean("step_s")
    out["samples_per_s"] = mean("samples_per_s")
    out["rows"] = len(rows)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
