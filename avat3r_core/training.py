"""Training pieces that need no Ray: the step, checkpoints, the non-learned baseline, evaluation.

The distributed loop (Ray Train, DDP) wraps these; everything here runs in one process on one
batch, so it is tested directly. One step: the model turns the input views into pixel-aligned
Gaussians (invalid pixels at zero opacity), :func:`avat3r_core.render.render` draws them at the
target cameras, and the Avat3r loss compares with the targets composited on the same background.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from avat3r_core.config import Presets
from avat3r_core.formats.batch import Avat3rBatch
from avat3r_core.gaussians import Gaussians
from avat3r_core.losses import Avat3rLoss, composite, psnr, ssim
from avat3r_core.model.avat3r import Avat3rInputs
from avat3r_core.render import render
from avat3r_core.weights import safe_torch_load

log = logging.getLogger("avat3r.training")


@dataclass
class TrainConfig(Presets):
    PRESETS: ClassVar[dict] = {
        "tiny": dict(steps=300, lr=1e-3, warmup_steps=10),
        "paper": dict(steps=3_500_000, lr=5e-5, warmup_steps=2000),
    }

    steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_fraction: float = 0.1  # cosine decay down to this fraction of lr
    grad_clip: float = 1.0
    seed: int = 0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    model: dict = field(default_factory=dict)  # Avat3rConfig values (preset + overrides)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_fraction``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.lr * (self.min_lr_fraction + (1 - self.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


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


@dataclass
class StepResult:
    skipped: bool
    loss: float = float("nan")
    terms: dict = field(default_factory=dict)
    grad_norm: float = float("nan")
    seconds: dict = field(default_factory=dict)  # forward, render, backward


def train_step(model, batch: Avat3rBatch, optimizer: torch.optim.Optimizer, loss_fn: Avat3rLoss,
               config: TrainConfig, step: int = 0) -> StepResult:
    """One optimiser step; a batch with NaN/Inf inputs, or a non-finite loss, is skipped (logged)."""
    if not batch.is_finite():
        log.warning("step %d: batch %s has non-finite inputs; skipped", step, batch.keys)
        return StepResult(skipped=True)
    for group in optimizer.param_groups:
        group["lr"] = config.lr_at(step)
    background = torch.tensor(config.background, dtype=batch.images.dtype, device=batch.images.device)
    t0 = time.perf_counter()
    output = model(model_inputs(batch), batch.expression)
    gaussians = [output.dense_gaussians(b) for b in range(batch.batch_size)]
    t1 = time.perf_counter()
    prediction = render_predictions(gaussians, batch, background)
    t2 = time.perf_counter()
    loss, terms = loss_fn(prediction, targets_on_background(batch, background), step=step)
    if not torch.isfinite(loss):
        log.warning("step %d: non-finite loss on %s; skipped", step, batch.keys)
        optimizer.zero_grad(set_to_none=True)
        return StepResult(skipped=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    t3 = time.perf_counter()
    return StepResult(False, float(loss.detach()), terms, float(grad_norm),
                      {"forward": t1 - t0, "render": t2 - t1, "backward": t3 - t2})


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: str | Path, model, optimizer, step: int, extra: dict | None = None) -> Path:
    """Write ``checkpoint.pt`` (model, optimiser, step, extra) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "extra": extra or {}}, path)
    return path


def load_checkpoint(directory: str | Path, model, optimizer=None) -> dict:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its ``step``/``extra``."""
    path = Path(directory) / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (the checkpoint directory to resume from is missing)")
    state = safe_torch_load(path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return {"step": int(state["step"]), "extra": state.get("extra", {})}


# --------------------------------------------------------------------------- baseline and evaluation
def splat_baseline(batch: Avat3rBatch, b: int, confidence_threshold: float = 0.5, opacity: float = 0.95) -> Gaussians:
    """The non-learned baseline: one isotropic Gaussian per confident input pixel, at its position
    map point with its colour, sized to the pixel's footprint at its depth. No network."""
    V = batch.images.shape[1]
    cams = batch.cameras[b * V:(b + 1) * V]
    points = batch.position_maps[b].permute(0, 2, 3, 1)  # (V, H, W, 3)
    colors = batch.images[b].permute(0, 2, 3, 1)
    keep = batch.confidence[b] > confidence_threshold
    depth = (points - cams.centers[:, None, None, :]).norm(dim=-1)
    focal = 0.5 * (cams.fx + cams.fy)
    footprint = depth / focal[:, None, None]
    n = int(keep.sum())
    return Gaussians.from_activated(
        means=points[keep], rotations=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4),
        scales=footprint[keep][:, None].expand(n, 3).contiguous(), opacities=torch.full((n,), opacity),
        colors=colors[keep].clamp(0, 1))


@torch.no_grad()
def evaluate(batches, model=None, background=(1.0, 1.0, 1.0)) -> dict:
    """Mean PSNR/SSIM at the target views of the model (``model``) or of the baseline (``None``)."""
    psnrs, ssims = [], []
    for batch in batches:
        bg = torch.tensor(background, dtype=batch.images.dtype)
        if model is not None:
            output = model(model_inputs(batch), batch.expression)
            gaussians = [output.dense_gaussians(b) for b in range(batch.batch_size)]
        else:
            gaussians = [splat_baseline(batch, b) for b in range(batch.batch_size)]
        prediction = render_predictions(gaussians, batch, bg).clamp(0, 1)
        target = targets_on_background(batch, bg)
        psnrs.append(psnr(prediction, target))
        ssims.append(ssim(prediction, target))
    return {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean())}
