"""Image grids and PNGs: the one place that lays pictures out side by side for people to look at.

* :func:`grid_rows` / :func:`image_grid` / :func:`labelled_grid`: a batch's inputs | target |
  predictions, one row per (sample, target view) (training's validation PNGs, the evaluation sheet);
* :func:`tile_images`: equally sized images in columns (the avatar preview, the studio contact sheet);
* :func:`png_bytes` / :func:`save_png`: encoding.

Only the batch grids need torch (imported there): the synth and track stages use the rest.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from avat3r_core.batch import Avat3rBatch


def grid_rows(batch: Avat3rBatch, predictions: dict[str, Tensor], background: Tensor, max_samples: int = 4,
              max_views: int | None = None, targets: Tensor | None = None) -> list[Tensor]:
    """One (3, H, (V + 1 + P)·W) row per (sample, target view): the sample's input views on the
    background | target | each prediction (e.g. model, baseline). ``targets``: the targets already
    composited on ``background``, when the caller has them."""
    import torch

    from avat3r_core.inference.predict import targets_on_background
    from avat3r_core.losses import composite

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


def _rows_to_uint8(rows: list[Tensor]) -> np.ndarray:
    import torch

    grid = torch.cat(rows, dim=1).permute(1, 2, 0)
    return (grid.numpy() * 255 + 0.5).astype(np.uint8)


def image_grid(batch: Avat3rBatch, predictions: dict[str, Tensor], background=(1.0, 1.0, 1.0),
               max_samples: int = 4) -> np.ndarray:
    """uint8 (rows·H, cols·W, 3) grid of :func:`grid_rows`."""
    import torch

    bg = torch.tensor(background, dtype=torch.float32, device=batch.images.device)
    return _rows_to_uint8(grid_rows(batch, predictions, bg, max_samples))


def labelled_grid(rows: list[Tensor], labels: list[str], tile: int) -> np.ndarray:
    """:func:`grid_rows` rows as uint8 under a 14-pixel header naming each column (``tile`` wide)."""
    from PIL import Image, ImageDraw

    grid = _rows_to_uint8(rows)
    head = Image.new("RGB", (grid.shape[1], 14), (255, 255, 255))
    draw = ImageDraw.Draw(head)
    for i, label in enumerate(labels):
        draw.text((i * tile + 2, 1), label, fill=(0, 0, 0))
    return np.concatenate([np.asarray(head), grid], axis=0)


def tile_images(images: list[np.ndarray], columns: int) -> np.ndarray:
    """Tile equally sized images (H, W, 3) into one picture, white where the grid is short."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * h, columns * w, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return canvas


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 image as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path
