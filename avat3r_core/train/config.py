"""The training recipe (:class:`TrainConfig`), its learning-rate schedule, and the network and
optimiser it builds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from avat3r_core.config import Presets, build
from avat3r_core.losses import LossConfig
from avat3r_core.model.avat3r import Avat3r
from avat3r_core.model.config import Avat3rConfig
from avat3r_core.train.collectives import unwrap


# --------------------------------------------------------------------------- config
@dataclass
class OptimConfig:
    """``train.optim``: Adam and what shapes its updates."""

    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  #: max global grad norm (0 = no clipping)
    #: learning-rate multiplier of the expression path (expression MLP + cross-attention layers);
    #: 1 = one rate for the whole network
    expr_lr_scale: float = 1.0


@dataclass
class ScheduleConfig:
    """``train.schedule``: how long the run is, its learning-rate curve, and when it validates."""

    steps: int = 300  #: optimiser steps (skipped batches do not count)
    warmup_steps: int = 10
    min_lr_fraction: float = 0.1  #: cosine decay down to this fraction of lr (1.0 = constant)
    validate_every: int = 100  #: 0 = only at the end


@dataclass
class CheckpointConfig:
    """``train.checkpoint``: how often the run saves itself and how many saves it keeps."""

    every: int = 100  #: steps between checkpoints (and one at the end)
    keep: int = 3


@dataclass
class LoggingConfig:
    """``train.logging``: the CSV/TensorBoard rows."""

    every: int = 1  #: a row every N steps


@dataclass
class TrainConfig(Presets):
    """Training recipe, one section per concern (``optim``, ``schedule``, ``checkpoint``,
    ``logging``; the model and loss at the top). ``tiny``: a CPU demo of a few hundred steps on the
    tiny model; ``paper``: the published recipe (Adam 5e-5, batch 1 per GPU on 8 GPUs, bf16, 3.5 M
    steps, LPIPS from 3 M when its weight files are given). Warm-up length, cosine decay and the
    clip value are not published; they are our choices. Building merges defaults, preset and values
    section by section, key by key (:func:`avat3r_core.config.build`); a key of the old flat layout
    (``steps``, ``lr``, ``checkpoint_every``, ...) raises :class:`~avat3r_core.config.RenamedKeyError`
    naming its new place. Checkpoints written with the flat layout still load: inference reads only
    ``model_preset`` and ``model``, which stayed at the top, and resume reads no stored config."""

    PRESETS: ClassVar[dict] = {
        "tiny": dict(optim=dict(lr=1e-3), schedule=dict(steps=300, warmup_steps=10, validate_every=100),
                     checkpoint=dict(every=100), model_preset="tiny"),
        "paper": dict(optim=dict(lr=5e-5),
                      schedule=dict(steps=3_500_000, warmup_steps=2000, min_lr_fraction=1.0, validate_every=10_000),
                      checkpoint=dict(every=5000, keep=5), logging=dict(every=50),
                      model_preset="paper", batch_size=1, bf16=True,
                      loss=dict(use_lpips=True, lpips_start_step=3_000_000, lpips_net="vgg")),
    }
    #: the flat layout's keys → their place now (``params.yaml`` and ``dvc exp run -S`` used them)
    RENAMED: ClassVar[dict[str, str]] = {
        "lr": "optim.lr", "adam_betas": "optim.adam_betas", "weight_decay": "optim.weight_decay",
        "grad_clip": "optim.grad_clip", "expr_lr_scale": "optim.expr_lr_scale",
        "steps": "schedule.steps", "warmup_steps": "schedule.warmup_steps",
        "min_lr_fraction": "schedule.min_lr_fraction", "validate_every": "schedule.validate_every",
        "checkpoint_every": "checkpoint.every", "keep_checkpoints": "checkpoint.keep", "log_every": "logging.every",
    }

    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    batch_size: int = 1  #: samples per worker per step: the one home of the batch size (the loader's is refused)
    bf16: bool = True  #: bf16 autocast of the network on CUDA (ignored on CPU)
    max_skipped: int = 100  #: more skipped (non-finite) batches than this stops the run
    model_preset: str = "tiny"  #: Avat3rConfig preset
    model: dict = field(default_factory=dict)  #: Avat3rConfig overrides on top of the preset
    loss: LossConfig = field(default_factory=LossConfig)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_fraction``."""
        return self.optim.lr * self.lr_factor(step)

    def lr_factor(self, step: int) -> float:
        return LRSchedule(self)(step)

    def model_config(self) -> Avat3rConfig:
        return build(Avat3rConfig, dict(self.model), preset=self.model_preset, source="TrainConfig.model")


class LRSchedule:
    """``LambdaLR`` factor of :class:`TrainConfig`: linear warm-up, then cosine decay to
    ``min_lr_fraction``. Holds plain numbers only (``LambdaLR.state_dict`` stores its ``__dict__``
    and checkpoints are read by the weights-only loader)."""

    def __init__(self, config: TrainConfig):
        self.warmup_steps = int(config.schedule.warmup_steps)
        self.steps = int(config.schedule.steps)
        self.min_lr_fraction = float(config.schedule.min_lr_fraction)

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
    opt = config.optim
    params = list(model.parameters())
    if opt.expr_lr_scale != 1.0:
        t = unwrap(model).transformer
        expr = {id(p) for m in (t.expression, t.cross) for p in m.parameters()}
        params = [{"params": [p for p in params if id(p) not in expr]},
                  {"params": [p for p in params if id(p) in expr], "lr": opt.lr * opt.expr_lr_scale,
                   "lr_scale": opt.expr_lr_scale}]
    optimizer = torch.optim.Adam(params, lr=opt.lr, betas=tuple(opt.adam_betas), weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(config))
    return optimizer, scheduler
