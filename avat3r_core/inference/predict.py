"""Running a network (or the non-learned baseline) on a batch: inputs, Gaussians, renders, PSNR/SSIM.

What training's step, validation, evaluation and reconstruction share. On CUDA the network runs
under bf16 autocast (rendering stays float32); on CPU the same code runs in float32."""

from __future__ import annotations

import torch
from torch import Tensor

from avat3r_core.batch import Avat3rBatch
from avat3r_core.gaussians import Gaussians
from avat3r_core.losses import composite
from avat3r_core.metrics import PSNR_CAP, psnr, ssim
from avat3r_core.model.avat3r import Avat3rInputs
from avat3r_core.render import render


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


def predict_gaussians(model, batch: Avat3rBatch, bf16: bool = True) -> list[Gaussians]:
    """Dense Gaussians per sample (float32); the network under bf16 autocast on CUDA only."""
    device = batch.images.device
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
        output = model(model_inputs(batch), batch.expression)
        gaussians = [output.dense_gaussians(b) for b in range(batch.batch_size)]
    return [g.to(dtype=torch.float32) for g in gaussians]


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
def mean_psnr_ssim(batches, model=None, background=(1.0, 1.0, 1.0)) -> dict:
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
    return {"psnr": float(p.clamp(max=PSNR_CAP).mean()), "ssim": float(torch.cat(ssims).mean()), "images": int(p.numel())}
