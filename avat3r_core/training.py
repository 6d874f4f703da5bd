"""Training pieces that need no Ray: config, step, checkpoints, the loop, baseline and evaluation.

One step: the model turns the input views into pixel-aligned Gaussians (invalid pixels at zero
opacity), :func:`avat3r_core.render.render` draws them at the target cameras, and the Avat3r loss
compares with the targets composited on the same background; then backward, gradient clipping and
Adam. On CUDA the network runs under bf16 autocast (rendering and loss stay float32); on CPU the
same code runs in float32.

The loop (:func:`train_loop`) is written against a small :class:`TrainSession` (rank, world size,
device, how to wrap the model for DDP, where checkpoints come from and go to). :class:`LocalSession`
runs it in this process (tests, debugging); ``stages.train`` supplies a Ray Train session (DDP over
``TorchTrainer`` workers). Collective decisions (skip a bad batch, gather loader positions) use
``torch.distributed`` when a process group is up, so every rank takes the same branch.

Data comes from a :data:`BatchSource` factory ``(rank, world_size, epoch) -> Iterator[Avat3rBatch]``
yielding that rank's shard of one epoch; it must be deterministic for exact resume.
:class:`SyntheticSource` is an in-memory one (a random Gaussian blob "head" rendered from cameras
around it, with exact position maps) for tests and benchmarks.

This module never imports Ray (see tests/test_layers.py).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor

from avat3r_core import storage
from avat3r_core.cameras import Cameras
from avat3r_core.config import Presets, build, from_dict
from avat3r_core.errors import FormatError
from avat3r_core.formats.batch import Avat3rBatch
from avat3r_core.gaussians import Gaussians
from avat3r_core.losses import Avat3rLoss, LossConfig, composite
from avat3r_core.metrics import psnr, ssim
from avat3r_core.model.avat3r import Avat3r, Avat3rInputs
from avat3r_core.model.config import Avat3rConfig
from avat3r_core.render import render
from avat3r_core.weights import check_state_dict, safe_torch_load

log = logging.getLogger("avat3r.training")

#: ``(rank, world_size, epoch) -> iterator over this rank's batches of that epoch``.
BatchSource = Callable[[int, int, int], Iterator[Avat3rBatch]]

CHECKPOINT_FILE = "checkpoint.pt"


# --------------------------------------------------------------------------- config
@dataclass
class TrainConfig(Presets):
    """Training recipe. ``tiny``: a CPU demo of a few hundred steps on the tiny model; ``paper``:
    the published recipe (Adam 5e-5, batch 1 per GPU on 8 GPUs, bf16, 3.5 M steps, LPIPS from 3 M
    when its weight files are given). Warm-up length, cosine decay and the clip value are not
    published; they are our choices."""

    PRESETS: ClassVar[dict] = {
        "tiny": dict(steps=300, lr=1e-3, warmup_steps=10, model_preset="tiny", num_workers=1, use_gpu=False,
                     checkpoint_every=100, validate_every=100),
        "paper": dict(steps=3_500_000, lr=5e-5, warmup_steps=2000, min_lr_fraction=1.0, model_preset="paper",
                      num_workers=8, use_gpu=True, batch_size=1, bf16=True, checkpoint_every=5000,
                      keep_checkpoints=5, validate_every=10_000, log_every=50,
                      loss=dict(use_lpips=True, lpips_start_step=3_000_000, lpips_net="vgg")),
    }

    steps: int = 300  #: optimiser steps (skipped batches do not count)
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_fraction: float = 0.1  #: cosine decay down to this fraction of lr (1.0 = constant)
    grad_clip: float = 1.0  #: max global grad norm (0 = no clipping)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    seed: int = 0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    batch_size: int = 1  #: samples per worker per step (the batch source honours it)
    num_workers: int = 1  #: Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: int = 1  #: CPUs Ray reserves per worker; on CPU also torch's intra-op threads
    bf16: bool = True  #: bf16 autocast of the network on CUDA (ignored on CPU)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    validate_every: int = 100  #: 0 = only at the end
    log_every: int = 1  #: CSV/TensorBoard row every N steps
    max_skipped: int = 100  #: more skipped (non-finite) batches than this stops the run
    #: learning-rate multiplier of the expression path (expression MLP + cross-attention layers);
    #: 1 = one rate for the whole network
    expr_lr_scale: float = 1.0
    model_preset: str = "tiny"  #: Avat3rConfig preset
    model: dict = field(default_factory=dict)  #: Avat3rConfig overrides on top of the preset
    loss: LossConfig = field(default_factory=LossConfig)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_fraction``."""
        return self.lr * self.lr_factor(step)

    def lr_factor(self, step: int) -> float:
        return LRSchedule(self)(step)

    def model_config(self) -> Avat3rConfig:
        return build(Avat3rConfig, dict(self.model), preset=self.model_preset, source="TrainConfig.model")


class LRSchedule:
    """``LambdaLR`` factor of :class:`TrainConfig`: linear warm-up, then cosine decay to
    ``min_lr_fraction``. Holds plain numbers only (``LambdaLR.state_dict`` stores its ``__dict__``
    and checkpoints are read by the weights-only loader)."""

    def __init__(self, config: TrainConfig):
        self.warmup_steps = int(config.warmup_steps)
        self.steps = int(config.steps)
        self.min_lr_fraction = float(config.min_lr_fraction)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(config: TrainConfig) -> Avat3r:
    return Avat3r(config.model_config())


def build_optimizer(model: torch.nn.Module, config: TrainConfig):
    """Adam + warm-up/cosine ``LambdaLR`` (its ``last_epoch`` is the step); the expression path in
    its own parameter group at ``lr · expr_lr_scale`` when that is not 1."""
    params = list(model.parameters())
    if config.expr_lr_scale != 1.0:
        t = unwrap(model).transformer
        expr = {id(p) for m in (t.expression, t.cross) for p in m.parameters()}
        params = [{"params": [p for p in params if id(p) not in expr]},
                  {"params": [p for p in params if id(p) in expr], "lr": config.lr * config.expr_lr_scale,
                   "lr_scale": config.expr_lr_scale}]
    optimizer = torch.optim.Adam(params, lr=config.lr, betas=tuple(config.adam_betas),
                                 weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(config))
    return optimizer, scheduler


# --------------------------------------------------------------------------- collectives (no-ops alone)
def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_ranks_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True iff ``flag`` holds on every rank (so all ranks skip a batch together, or none does)."""
    if not _dist():
        return bool(flag)
    if torch.distributed.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, indexed by rank (``[obj]`` without a process group)."""
    if not _dist():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


def parameter_checksum(model: torch.nn.Module) -> str:
    """Hex digest of every parameter's bytes (identical across ranks iff the weights are)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in unwrap(model).state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- step
def model_inputs(batch: Avat3rBatch) -> Avat3rInputs:
    return Avat3rInputs(images=batch.images, cameras=batch.cameras, position_maps=batch.position_maps,
                        confidence=batch.confidence, features=batch.features)


def targets_on_background(batch: Avat3rBatch, background: Tensor) -> Tensor:
    """(B·T, 3, H, W) target images composited over ``background`` (3,)."""
    images = batch.target_images.flatten(0, 1)
    alphas = batch.target_alphas.flatten(0, 1)
    return composite(images, alphas, background)


def render_predictions(gaussians: list[Gaussians], batch: Avat3rBatch, background: Tensor) -> Tensor:
    """(B·T, 3, H, W) renders of each sample's Gaussians at its T target cameras."""
    T = batch.target_images.shape[1]
    out = []
    for b, g in enumerate(gaussians):
        cams = batch.target_cameras[b * T:(b + 1) * T]
        out.append(render(g, cams, background=background.expand(T, 3)).rgb.permute(0, 3, 1, 2))
    return torch.cat(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict_gaussians(model, batch: Avat3rBatch, bf16: bool = True) -> list[Gaussians]:
    """Dense Gaussians per sample (float32); the network under bf16 autocast on CUDA only."""
    device = batch.images.device
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        output = model(model_inputs(batch), batch.expression)
        gaussians = [output.dense_gaussians(b) for b in range(batch.batch_size)]
    return [g.to(dtype=torch.float32) for g in gaussians]


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
    loss, terms = loss_fn(prediction, targets_on_background(batch, background).to(prediction.dtype), step=step)
    optimizer.zero_grad(set_to_none=True)
    if not all_ranks_agree(bool(torch.isfinite(loss)), device):
        log.warning("step %d: non-finite loss on %s (here or on another rank); skipped", step, batch.keys)
        return StepResult(skipped=True, reason="non-finite loss")
    loss.backward()
    if config.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
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


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """Torch/CUDA/NumPy/Python RNG states as tensors (loadable by the weights-only loader)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_state[1], dtype=torch.int64), "python_version": int(py_state[0]),
        "python_gauss": None if py_state[2] is None else float(py_state[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()),
                     state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(directory: str | Path, model, optimizer, step: int, extra: dict | None = None,
                    scheduler=None, rng: Any = None, config: TrainConfig | None = None) -> Path:
    """Write ``checkpoint.pt`` into ``directory``: model (unwrapped), optimiser, scheduler, step,
    ``extra`` (loader positions, counters), ``rng`` (per-rank RNG states) and the config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "step": int(step),
             "extra": extra or {}, "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": rng, "config": _plain(asdict(config)) if config is not None else None}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_checkpoint(directory: str | Path, model, optimizer=None, scheduler=None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``,
    ``scheduler`` when given); returns ``step``, ``extra``, ``rng`` and ``config``. A missing
    directory or file raises FileNotFoundError naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist "
                                "(the checkpoint directory to resume from is missing)")
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (the checkpoint directory {directory} holds no {CHECKPOINT_FILE})")
    state = safe_torch_load(path)
    unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return {"step": int(state["step"]), "extra": state.get("extra", {}), "rng": state.get("rng"),
            "config": state.get("config")}


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The ``checkpoint.pt`` meant by ``checkpoint``: the file itself, a directory holding it, or the
    newest ``checkpoint_*`` sub-directory of a run's output (directly, under ``checkpoints/``, or
    under ``ray/train/``: Ray Train's default storage path and name). Raises FormatError naming it."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FormatError(path, None, "checkpoint directory does not exist")
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    for base in (path, path / "checkpoints", path / "ray" / "train"):
        found = sorted(p for p in base.glob("checkpoint_*") if (p / CHECKPOINT_FILE).is_file())
        if found:
            return found[-1] / CHECKPOINT_FILE
    raise FormatError(path, None, f"no {CHECKPOINT_FILE} in this checkpoint directory "
                      "(nor in a checkpoint_* sub-directory of it, of its checkpoints/ or of its ray/train/)")


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[Avat3r, TrainConfig, dict]:
    """(network in eval mode on ``device``, its TrainConfig, info) from a checkpoint written by
    :func:`save_checkpoint`: rebuilt from the stored config, weights read with the weights-only
    loader (no code is unpickled) and matched key by key. ``info``: checkpoint path, step, sha256
    (avatars built with another checkpoint are rebuilt). Every problem raises FormatError naming the file."""
    path = resolve_checkpoint(checkpoint)
    state = safe_torch_load(path, map_location=device)
    if not isinstance(state, dict) or "model" not in state:
        raise FormatError(path, "model", "not an avat3r training checkpoint (no 'model' state dict)")
    if not isinstance(state.get("config"), dict):
        raise FormatError(path, "config", "the checkpoint holds no training config; cannot rebuild the network")
    config = from_dict(TrainConfig, dict(state["config"]), source=f"{path} [config]")
    model = build_model(config)
    check_state_dict(model.state_dict(), state["model"], path, "the Avat3r network", field_prefix="model.")
    model.load_state_dict(state["model"], strict=True)
    info = {"checkpoint": str(path), "step": int(state.get("step", 0)), "sha256": storage.sha256(path),
            "model_preset": config.model_preset, "image_size": int(config.model_config().image_size)}
    return model.to(device).eval(), config, info


# --------------------------------------------------------------------------- baseline and evaluation
def splat_baseline(batch: Avat3rBatch, b: int, confidence_threshold: float = 0.5, opacity: float = 0.95) -> Gaussians:
    """The non-learned baseline: one isotropic Gaussian per confident input pixel, at its position
    map point with its colour, sized to the pixel's footprint at its depth. No network."""
    V = batch.images.shape[1]
    cams = batch.cameras[b * V:(b + 1) * V]
    points = batch.position_maps[b].permute(0, 2, 3, 1)  # (V, H, W, 3)
    colors = batch.images[b].permute(0, 2, 3, 1)
    keep = batch.confidence[b] > confidence_threshold
    depth = (points - cams.centers[:, None, None, :].to(points)).norm(dim=-1)
    focal = 0.5 * (cams.fx + cams.fy).to(points)
    footprint = depth / focal[:, None, None]
    n = int(keep.sum())
    return Gaussians.from_activated(
        means=points[keep], rotations=points.new_tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4),
        scales=footprint[keep][:, None].expand(n, 3).contiguous(), opacities=points.new_full((n,), opacity),
        colors=colors[keep].clamp(0, 1))


@torch.no_grad()
def predict_images(batch: Avat3rBatch, model=None, background=(1.0, 1.0, 1.0), bf16: bool = True) -> Tensor:
    """(B·T, 3, H, W) predictions in [0, 1] at the target cameras: the model's, or the baseline's
    (``model=None``)."""
    bg = torch.tensor(background, dtype=torch.float32, device=batch.images.device)
    if model is not None:
        gaussians = predict_gaussians(model, batch, bf16)
    else:
        gaussians = [splat_baseline(batch, b) for b in range(batch.batch_size)]
    return render_predictions(gaussians, batch, bg).clamp(0, 1)


@torch.no_grad()
def evaluate(batches, model=None, background=(1.0, 1.0, 1.0)) -> dict:
    """Mean PSNR/SSIM (:mod:`avat3r_core.metrics`) at the target views of the model (``model``) or
    of the non-learned baseline (``None``); the same code for both."""
    psnrs, ssims = [], []
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        for batch in batches:
            prediction = predict_images(batch, model, background)
            target = targets_on_background(batch, torch.tensor(background, dtype=torch.float32,
                                                                device=prediction.device))
            psnrs.append(psnr(prediction, target).cpu())
            ssims.append(ssim(prediction, target).cpu())
    finally:
        if model is not None and was_training:
            model.train()
    if not psnrs:
        return {"psnr": float("nan"), "ssim": float("nan"), "images": 0}
    p = torch.cat(psnrs)
    return {"psnr": float(p.clamp(max=100.0).mean()), "ssim": float(torch.cat(ssims).mean()), "images": int(p.numel())}


def grid_rows(batch: Avat3rBatch, predictions: dict[str, Tensor], background: Tensor, max_samples: int = 4,
              max_views: int | None = None, targets: Tensor | None = None) -> list[Tensor]:
    """One (3, H, (V + 1 + P)·W) row per (sample, target view): the sample's input views on the
    background | target | each prediction (e.g. model, baseline). ``targets``: the targets already
    composited on ``background``, when the caller has them."""
    V, T = batch.images.shape[1], batch.target_images.shape[1]
    inputs = composite(batch.images.flatten(0, 1), batch.alphas.flatten(0, 1), background).reshape(-1, V, *batch.images.shape[2:])
    targets = targets_on_background(batch, background) if targets is None else targets
    rows = []
    for b in range(min(batch.batch_size, max_samples)):
        for t in range(T if max_views is None else min(T, max_views)):
            tiles = [inputs[b, v] for v in range(V)] + [targets[b * T + t]]
            tiles += [p[b * T + t] for p in predictions.values()]
            rows.append(torch.cat([x.float().clamp(0, 1).cpu() for x in tiles], dim=2))
    return rows


def image_grid(batch: Avat3rBatch, predictions: dict[str, Tensor], background=(1.0, 1.0, 1.0),
               max_samples: int = 4) -> np.ndarray:
    """uint8 (rows·H, cols·W, 3) grid of :func:`grid_rows`."""
    bg = torch.tensor(background, dtype=torch.float32, device=batch.images.device)
    grid = torch.cat(grid_rows(batch, predictions, bg, max_samples), dim=1).permute(1, 2, 0)
    return (grid.numpy() * 255 + 0.5).astype(np.uint8)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# --------------------------------------------------------------------------- data
def collate(samples: list[Avat3rBatch]) -> Avat3rBatch:
    """Concatenate batches along the sample axis."""
    if len(samples) == 1:
        return samples[0]
    cat = lambda name: torch.cat([getattr(s, name) for s in samples])  # noqa: E731
    return Avat3rBatch(
        images=cat("images"), alphas=cat("alphas"), cameras=Cameras.cat([s.cameras for s in samples]),
        position_maps=cat("position_maps"), confidence=cat("confidence"),
        features=None if samples[0].features is None else cat("features"),
        target_images=cat("target_images"), target_alphas=cat("target_alphas"),
        target_cameras=Cameras.cat([s.target_cameras for s in samples]), expression=cat("expression"),
        keys=[k for s in samples for k in s.keys], input_frames=cat("input_frames"), target_frames=cat("target_frames"),
        target_head_to_world=None if any(s.target_head_to_world is None for s in samples) else cat("target_head_to_world"),
        input_head_to_world=None if any(s.input_head_to_world is None for s in samples) else cat("input_head_to_world"),
        input_expressions=None if any(s.input_expressions is None for s in samples) else cat("input_expressions"))


def synthetic_sample(index: int, size: int = 32, num_inputs: int = 2, num_targets: int = 2, seed: int = 0,
                     num_points: int = 3000, expr_dim: int = 135, expression_scale: float = 0.0,
                     feature_dim: int = 0) -> Avat3rBatch:
    """One sample (B = 1) of a synthetic scene: a random blob of Gaussians (the "head", fixed by
    ``seed + index``) rendered from ``num_inputs + num_targets`` cameras on an arc in front of it.
    Input position maps are exact (the rendered depth unprojected), confidence is 1 where the
    rendered alpha exceeds 0.5, colours are straight (rendered over black, divided by alpha).
    ``feature_dim`` > 0 adds a random (1, V, feature_dim, size/8, size/8) feature map (a stand-in
    with the right shape, for models built with features; it carries no information)."""
    g = torch.Generator().manual_seed(1000 * seed + index)
    n = num_points
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.05, 0.06, 0.045])
    # smooth colour field (a few random sinusoids of position) + a little per-point noise
    freq = torch.randn(3, 3, generator=g) * 12.0
    phase = torch.rand(3, generator=g) * 2 * math.pi
    colors = 0.5 + 0.35 * torch.sin(means @ freq + phase) + 0.05 * torch.randn(n, 3, generator=g)
    head = Gaussians.from_activated(means, torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4),
                                    torch.full((n, 3), 0.006), torch.full((n,), 0.8), colors.clamp(0, 1))
    k = num_inputs + num_targets
    azimuth = (torch.rand(k, generator=g) - 0.5) * math.radians(70)
    elevation = (torch.rand(k, generator=g) - 0.5) * math.radians(30)
    radius = 0.95 + 0.1 * torch.rand(k, generator=g)
    eyes = torch.stack([radius * torch.sin(azimuth) * torch.cos(elevation), radius * torch.sin(elevation),
                        radius * torch.cos(azimuth) * torch.cos(elevation)], dim=-1)
    cams = Cameras.look_at(eyes, torch.zeros(3), fov_deg=20, width=size, height=size)
    with torch.no_grad():
        out = render(head, cams)  # over black: straight colour = rgb / alpha
    alpha = out.alpha.permute(0, 3, 1, 2)
    rgb = (out.rgb.permute(0, 3, 1, 2) / alpha.clamp_min(1e-6)).clamp(0, 1)
    uv = cams.pixel_grid().reshape(1, -1, 2).expand(k, -1, -1)
    points = cams.unproject(uv, out.depth[..., 0].reshape(k, -1).clamp_min(0.1)).reshape(k, size, size, 3)
    i, t = list(range(num_inputs)), list(range(num_inputs, k))
    expression = torch.randn(1, expr_dim, generator=g) * expression_scale
    features = (torch.randn(1, num_inputs, feature_dim, max(1, size // 8), max(1, size // 8), generator=g)
                if feature_dim > 0 else None)
    return Avat3rBatch(
        images=rgb[None, i], alphas=alpha[None, i], cameras=cams[i],
        position_maps=points.permute(0, 3, 1, 2)[None, i].contiguous(), confidence=(alpha[None, i, 0] > 0.5).float(),
        features=features, target_images=rgb[None, t], target_alphas=alpha[None, t], target_cameras=cams[t],
        expression=expression, keys=[f"synth{seed}_s{index:03d}"], input_frames=torch.tensor([i]),
        target_frames=torch.tensor([num_inputs]))


class SyntheticSource:
    """In-memory :data:`BatchSource` over ``num_samples`` synthetic samples (built once per
    process). Rank ``r`` of ``w`` gets samples ``r, r + w, ...`` of the epoch's order (shuffled by
    ``seed + epoch`` when ``shuffle``), grouped into batches of ``batch_size`` (the remainder is
    dropped so ranks stay in step). ``nan_samples``: indices whose position map gets a NaN (to test
    the guard). Picklable: Ray ships it to the workers."""

    def __init__(self, num_samples: int = 4, size: int = 32, num_inputs: int = 2, num_targets: int = 2,
                 batch_size: int = 1, seed: int = 0, shuffle: bool = True, nan_samples: tuple[int, ...] = (),
                 expression_scale: float = 0.0, feature_dim: int = 0):
        self.num_samples, self.size, self.num_inputs, self.num_targets = num_samples, size, num_inputs, num_targets
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.nan_samples = tuple(nan_samples)
        self.expression_scale, self.feature_dim = expression_scale, feature_dim
        self._cache: list[Avat3rBatch] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def samples(self) -> list[Avat3rBatch]:
        if self._cache is None:
            out = []
            for i in range(self.num_samples):
                s = synthetic_sample(i, self.size, self.num_inputs, self.num_targets, self.seed,
                                     expression_scale=self.expression_scale, feature_dim=self.feature_dim)
                if i in self.nan_samples:
                    s.position_maps[0, 0, :, self.size // 2, self.size // 2] = float("nan")
                out.append(s)
            self._cache = out
        return self._cache

    def __call__(self, rank: int = 0, world_size: int = 1, epoch: int = 0) -> Iterator[Avat3rBatch]:
        samples = self.samples()
        order = list(range(len(samples)))
        if self.shuffle:
            random.Random(self.seed * 7919 + epoch).shuffle(order)
        mine = order[rank::world_size]
        per_rank = len(order) // world_size  # equal shard lengths on every rank
        mine = mine[:per_rank - per_rank % self.batch_size]
        for start in range(0, len(mine), self.batch_size):
            yield collate([samples[i] for i in mine[start:start + self.batch_size]])


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


# --------------------------------------------------------------------------- logging
class TrainLogger:
    """Rank 0's per-step CSV (``train_log.csv``), TensorBoard (``tensorboard/``) and the DVC plot
    files (``plots/train.csv``, ``plots/val.csv``). On resume, rows after the resumed step (from a
    run killed between checkpoints) are dropped, so each step appears once."""

    TRAIN_FIELDS = ["step", "epoch", "loss", "l1", "ssim", "lpips", "lr", "grad_norm", "data_s", "forward_s",
                    "render_s", "backward_s", "step_s", "samples_per_s", "skipped_total"]
    #: psnr_inputs_code / psnr_neutral_code: the same validation views rendered with the input frames'
    #: mean code / a neutral code (:mod:`avat3r_core.animation.sensitivity`); psnr above them is what
    #: the expression path earns
    VAL_FIELDS = ["step", "psnr", "ssim", "baseline_psnr", "baseline_ssim", "psnr_inputs_code", "psnr_neutral_code"]

    def __init__(self, out_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        (self.out_dir / "plots").mkdir(parents=True, exist_ok=True)
        self.files = {"train": self.out_dir / "train_log.csv", "val": self.out_dir / "plots" / "val.csv"}
        self.fields = {"train": self.TRAIN_FIELDS, "val": self.VAL_FIELDS}
        for kind, path in self.files.items():
            self._truncate(path, self.fields[kind], resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
            except ImportError as exc:  # pragma: no cover - tensorboard is a dependency
                log.warning("TensorBoard unavailable (%s); CSV only", exc)

    @staticmethod
    def _truncate(path: Path, fields: list[str], resume_step: int) -> None:
        rows = []
        if path.exists() and resume_step > 0:
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def _append(self, kind: str, row: dict) -> None:
        with self.files[kind].open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields[kind], extrasaction="ignore").writerow(row)

    def train(self, row: dict) -> None:
        self._append("train", row)
        if self.writer is not None:
            step = row["step"]
            for key in self.TRAIN_FIELDS[2:]:
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def val(self, row: dict) -> None:
        self._append("val", row)
        if self.writer is not None:
            for key in self.VAL_FIELDS[1:]:
                if isinstance(row.get(key), (int, float)):
                    self.writer.add_scalar(f"val/{key}", row[key], row["step"])

    def finish(self) -> None:
        # plots/train.csv: the loss curve for DVC (step, loss terms, lr)
        with self.files["train"].open(newline="") as f:
            rows = list(csv.DictReader(f))
        keep = ["step", "loss", "l1", "ssim", "lr", "samples_per_s"]
        with (self.out_dir / "plots" / "train.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keep, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- the loop
def _validate(step: int, model, val_batches: list[Avat3rBatch], baseline: dict, config: TrainConfig,
              out_dir: Path, logger: TrainLogger | None) -> dict:
    raw = unwrap(model)
    result = evaluate(val_batches, raw, config.background)
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
    """Validation PSNR with the input frames' code and a neutral code (empty for batches without
    input codes): a run shows when the expression path starts to matter."""
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
    return {"psnr_inputs_code": codes["inputs"]["psnr"], "psnr_neutral_code": codes["neutral"]["psnr"]}


def train_loop(config: TrainConfig, source: BatchSource, out_dir: str | Path, session: TrainSession | None = None,
               val_source: BatchSource | None = None) -> dict:
    """Train ``config.steps`` optimiser steps from ``source`` (resuming from the session's latest
    checkpoint), checkpointing every ``checkpoint_every`` steps and at the end, validating every
    ``validate_every`` steps and at the end on ``val_source`` (rank 0). Rank 0 writes
    ``train_log.csv``, ``tensorboard/``, ``plots/*.csv``, ``val/*.png`` and ``metrics.json`` in
    ``out_dir``; every rank writes ``ranks/rank_<r>.json`` (final step, parameter checksum).
    Returns rank 0's metrics (other ranks: their rank summary)."""
    out_dir = Path(out_dir)
    session = session or LocalSession(out_dir / "checkpoints", keep=config.keep_checkpoints)
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
    baseline = evaluate(val_batches, None, config.background) if val_batches else {}
    val_row: dict = {}
    if rank == 0:
        log.info("training %d steps on %d rank(s); %s", config.steps, world, loss_fn.lpips_status)

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

    while step < config.steps:
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
        if rank == 0 and (step % max(1, config.log_every) == 0 or step == config.steps):
            logger.train({
                "step": step, "epoch": stream.epoch, "loss": result.loss, "l1": result.terms.get("l1"),
                "ssim": result.terms.get("ssim"), "lpips": result.terms.get("lpips", ""), "lr": result.lr,
                "grad_norm": result.grad_norm, "data_s": data_s, "forward_s": result.seconds["forward"],
                "render_s": result.seconds["render"], "backward_s": result.seconds["backward"], "step_s": step_s,
                "samples_per_s": batch.batch_size * world / step_s, "skipped_total": skipped})
        if rank == 0 and val_batches and ((config.validate_every and step % config.validate_every == 0)
                                          or step == config.steps):
            val_row = _validate(step, model, val_batches, baseline, config, out_dir, logger)
        if step % max(1, config.checkpoint_every) == 0 or step == config.steps:
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
