"""Tracking overlays: detected vs fitted landmarks and the fitted mesh wireframe, a few frames x cameras.

``overlay_grid(images, cameras, vertices, faces, detected, fitted, visible)`` returns an RGB uint8
grid (rows = frames, columns = cameras): each tile is the input image with the front-facing mesh
edges (thin, light blue), detected landmarks (green dots; hollow where not visible / zero
confidence) and fitted landmarks (red crosses). :func:`avat3r_core.inference.visuals.png_bytes` encodes it.
"""

from __future__ import annotations


import numpy as np

__all__ = ["overlay_tile", "overlay_grid"]

_EDGE = (120, 200, 255)
_DET = (40, 230, 60)
_FIT = (255, 40, 40)


def _front_edges(uv: np.ndarray, faces: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Unique edges (E, 2) of faces that face the camera (counter-clockwise in the image) and lie in front."""
    a, b, c = uv[faces[:, 0]], uv[faces[:, 1]], uv[faces[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    front = faces[(cross < 0) & (depth[faces] > 0).all(1)]
    if not len(front):
        front = faces
    edges = np.concatenate([front[:, [0, 1]], front[:, [1, 2]], front[:, [2, 0]]])
    edges.sort(1)
    return np.unique(edges, axis=0)


def overlay_tile(image: np.ndarray, uv_vertices: np.ndarray | None, depth: np.ndarray | None, faces: np.ndarray | None,
                 detected: np.ndarray | None, fitted: np.ndarray | None, visible: np.ndarray | None = None,
                 max_edges: int = 2500, wire_alpha: float = 0.35) -> np.ndarray:
    """One annotated image (H, W, 3) uint8; the wireframe is blended at ``wire_alpha``."""
    from PIL import Image, ImageDraw

    tile = Image.fromarray(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    H, W = image.shape[:2]
    r = max(1.0, H / 200)
    if uv_vertices is not None and faces is not None and depth is not None:
        edges = _front_edges(uv_vertices, faces, depth)
        if len(edges) > max_edges:
            edges = edges[np.linspace(0, len(edges) - 1, max_edges).astype(int)]
        wire = tile.copy()
        wdraw = ImageDraw.Draw(wire)
        for i, j in edges:
            wdraw.line([tuple(uv_vertices[i]), tuple(uv_vertices[j])], fill=_EDGE, width=1)
        tile = Image.blend(tile, wire, wire_alpha)
    draw = ImageDraw.Draw(tile)
    if detected is not None:
        vis = np.ones(len(detected), bool) if visible is None else np.asarray(visible) > 0
        for (x, y), v in zip(detected, vis):
            box = [x - r, y - r, x + r, y + r]
            draw.ellipse(box, fill=_DET if v else None, outline=_DET)
    if fitted is not None:
        for x, y in fitted:
            draw.line([(x - r, y - r), (x + r, y + r)], fill=_FIT, width=1)
            draw.line([(x - r, y + r), (x + r, y - r)], fill=_FIT, width=1)
    return np.asarray(tile)


def overlay_grid(images: list[list[np.ndarray]], uv_vertices=None, depth=None, faces=None, detected=None, fitted=None,
                 visible=None, gap: int = 2) -> np.ndarray:
    """Grid of tiles; every argument but ``faces`` is indexed ``[row][col]`` (``None`` to skip)."""
    rows = len(images)
    cols = max(len(r) for r in images) if rows else 0
    if rows == 0 or cols == 0:
        return np.zeros((1, 1, 3), np.uint8)
    H = max(im.shape[0] for r in images for im in r)
    W = max(im.shape[1] for r in images for im in r)
    canvas = np.full((rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap, 3), 255, np.uint8)
    pick = lambda x, i, j: None if x is None else x[i][j]  # noqa: E731
    for i in range(rows):
        for j, image in enumerate(images[i]):
            tile = overlay_tile(image, pick(uv_vertices, i, j), pick(depth, i, j), faces, pick(detected, i, j),
                                pick(fitted, i, j), pick(visible, i, j))
            y, x = i * (H + gap), j * (W + gap)
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return canvas
