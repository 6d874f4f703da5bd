"""Image grids and PNGs: the one place that lays renders out side by side for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avat3r_core.formats.batch import Avat3rBatch
from avat3r_core.inference.predict import targets_on_background
from avat3r_core.losses import composite


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


def grid(images: list[np.ndarray], columns: int) -> np.ndarray:
    """Tile equally sized images (H, W, 3) into one picture, white where the grid is short."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return canvas
