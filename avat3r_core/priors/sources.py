"""Per-item sources of the priors: position maps (+ confidence) and feature maps for one crop view.

Everything here works on one view (or, for DUSt3R, on the views of one frame) and is testable
without Ray; ``stages/priors.py`` only fans it out and writes files.

Position maps (all at the crop resolution, world frame of the calibrated cameras, every valid
point lying on the ray through its pixel centre of the crop camera):

* :func:`position_from_dust3r` — the method's own prior: DUSt3R pairwise predictions of all views
  of a frame, put into the calibrated world by :func:`~avat3r_core.priors.align.align_pairwise_to_world`
  and resampled back to the crop grid. Confidence is DUSt3R's mapped by ``1 − 1/conf`` to [0, 1).
* :func:`position_from_ground_truth` — stand-in ``ground_truth``: the synthetic studio's rendered
  depth of the source camera, resampled into the crop and unprojected. Confidence 1 on the
  surface, 0 on background. Only for synthetic data (evaluation / upper bound).
* :func:`position_from_mesh` — stand-in ``face_model``: the tracked FLAME mesh rasterized into the
  crop camera (:func:`flame_vertices` poses it from a tracking row). Confidence 1 where the mesh
  covers the pixel. It has no hair, shoulders or accessories: a different, weaker prior.

Feature maps: :func:`efficientnet_features` (stand-in ``efficientnet_lite0_imagenet``) and
:func:`sapiens_features` (the official TorchScript models), both (N, C, h, w) float32; storage as
float16 (optionally PCA-projected) is the stage's business (:func:`features_to_store`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from avat3r_core.cameras import Cameras

__all__ = [
    "FACE_MODEL_SOURCE",
    "GROUND_TRUTH_SOURCE",
    "DUST3R_SOURCE",
    "confidence_from_dust3r",
    "crop_to_source_camera",
    "efficientnet_features",
    "features_to_store",
    "flame_vertices",
    "position_from_depth",
    "position_from_dust3r",
    "position_from_ground_truth",
    "position_from_mesh",
    "resample_depth",
    "sapiens_features",
]

DUST3R_SOURCE = "dust3r"
GROUND_TRUTH_SOURCE = "ground_truth"
FACE_MODEL_SOURCE = "face_model"


# ====================================================================== cameras


def crop_to_source_camera(crop: Cameras, crop_box: Sequence[float], source_width: int, source_height: int) -> Cameras:
    """The source (full-frame) camera a crop camera came from (``Cameras.crop_resize`` inverted).

    The crop camera maps ``u' = sx (u − x0)`` with ``sx = W'/w``; so ``K_src = A⁻¹ K_crop`` with the
    same pose.
    """
    x0, y0, w, h = (float(v) for v in crop_box)
    sx, sy = crop.width / w, crop.height / h
    A_inv = torch.tensor([[1.0 / sx, 0.0, x0], [0.0, 1.0 / sy, y0], [0.0, 0.0, 1.0]], dtype=crop.dtype)
    K = A_inv.to(crop.device) @ crop.K
    return Cameras(crop.world_to_cam, K, int(source_width), int(source_height))


def _crop_pixels_in_source(source: Cameras, crop: Cameras) -> Tensor:
    """(H', W', 2) continuous source-image (u, v) of every crop pixel centre (same pose assumed).

    Both cameras share the pose, so a crop pixel maps to the source by the affine map between the
    intrinsics: ``uv_src = K_src K_crop⁻¹ [u', v', 1]``.
    """
    Ks, Kc = source.K[0].double(), crop.K[0].double()
    M = Ks @ torch.linalg.inv(Kc)
    grid = crop.to(dtype=torch.float64).pixel_grid()  # (H', W', 2)
    uv1 = torch.cat([grid, torch.ones_like(grid[..., :1])], -1)
    p = uv1 @ M.T
    return p[..., :2] / p[..., 2:3]


# ====================================================================== depth → positions


def resample_depth(depth: np.ndarray | Tensor, uv: Tensor, max_jump: float = 0.01) -> Tensor:
    """Sample a depth map (H, W) (0 = background) at continuous pixel coordinates ``uv`` (..., 2).

    Bilinear where all four neighbouring pixels are foreground and their depths differ by at most
    ``max_jump`` metres (one smooth surface); nearest pixel otherwise, so a foreground point is
    never blended with the background's 0 nor across an occlusion edge. Outside the image: 0.
    Returns float64 (...).
    """
    d = torch.as_tensor(np.asarray(depth, dtype=np.float64) if not isinstance(depth, Tensor) else depth.double())
    H, W = d.shape
    x = uv[..., 0].double() - 0.5  # pixel-index coordinates (centre of pixel j at x = j)
    y = uv[..., 1].double() - 0.5
    inside = (uv[..., 0] >= 0) & (uv[..., 0] < W) & (uv[..., 1] >= 0) & (uv[..., 1] < H)
    # nearest: the pixel whose square contains the point
    jn = uv[..., 0].floor().long().clamp(0, W - 1)
    in_ = uv[..., 1].floor().long().clamp(0, H - 1)
    nearest = d[in_, jn]
    x0 = x.floor().long()
    y0 = y.floor().long()
    fx, fy = x - x0, y - y0
    x0c, x1c = x0.clamp(0, W - 1), (x0 + 1).clamp(0, W - 1)
    y0c, y1c = y0.clamp(0, H - 1), (y0 + 1).clamp(0, H - 1)
    d00, d01, d10, d11 = d[y0c, x0c], d[y0c, x1c], d[y1c, x0c], d[y1c, x1c]
    stack = torch.stack([d00, d01, d10, d11])
    smooth = (stack > 0).all(0) & ((stack.amax(0) - stack.amin(0)) <= max_jump)
    bilinear = (d00 * (1 - fx) * (1 - fy) + d01 * fx * (1 - fy) + d10 * (1 - fx) * fy + d11 * fx * fy)
    out = torch.where(smooth, bilinear, nearest)
    return torch.where(inside, out, torch.zeros_like(out))


def position_from_depth(depth: Tensor, camera: Cameras) -> tuple[Tensor, Tensor]:
    """Camera-z depth (H, W) at ``camera``'s pixel centres (0 = none) → world positions (H, W, 3)
    float32 (zeros where there is no depth) and confidence (H, W) float32 in {0, 1}."""
    cam = camera.to(dtype=torch.float64)
    if tuple(depth.shape) != (cam.height, cam.width):
        raise ValueError(f"depth is {tuple(depth.shape)}, the camera is {cam.height}x{cam.width}")
    valid = depth > 0
    pts = cam.unproject(cam.pixel_grid()[None], depth.double()[None])[0]
    pts = torch.where(valid[..., None], pts, torch.zeros_like(pts))
    return pts.float(), valid.float()


def position_from_ground_truth(
    depth_src: np.ndarray | Tensor,
    source: Cameras,
    crop_box: Sequence[float] | None,
    crop: Cameras,
    size: int | None = None,
    max_jump: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Ground-truth position map of one crop view (stand-in ``ground_truth``).

    ``depth_src`` (H_src, W_src) camera-space z of the source camera in metres (0 = background);
    ``source``: that camera (one, at the source resolution); ``crop``: the crop camera (one);
    ``crop_box`` (x0, y0, w, h) is only checked against the cameras (the mapping itself comes from
    the two intrinsics, which is exact for any crop/resize); ``size``: expected crop size.
    Returns positions (S, S, 3) world and confidence (S, S) (1 where depth > 0 else 0), float32.
    """
    if len(source) != 1 or len(crop) != 1:
        raise ValueError("position_from_ground_truth works on one source and one crop camera")
    d = np.asarray(depth_src.detach().cpu().numpy() if isinstance(depth_src, Tensor) else depth_src)
    if d.shape != (source.height, source.width):
        raise ValueError(f"depth map is {d.shape}, the source camera is {source.height}x{source.width}")
    if size is not None and (crop.width, crop.height) != (size, size):
        raise ValueError(f"crop camera is {crop.width}x{crop.height}, expected {size}x{size}")
    if not np.isfinite(d.astype(np.float64)).all():
        raise ValueError("depth map has NaN/Inf values")
    uv = _crop_pixels_in_source(source, crop)
    if crop_box is not None:  # the box's corner must land on the crop's (0, 0)
        x0, y0 = float(crop_box[0]), float(crop_box[1])
        corner = uv[0, 0] - 0.5 * torch.tensor([crop_box[2] / crop.width, crop_box[3] / crop.height], dtype=uv.dtype)
        if abs(float(corner[0]) - x0) > 1e-3 * max(1.0, abs(x0)) or abs(float(corner[1]) - y0) > 1e-3 * max(1.0, abs(y0)):
            raise ValueError(f"crop_box {list(crop_box)} does not match the crop and source cameras")
    depth = resample_depth(d, uv, max_jump)
    return position_from_depth(depth, crop)


# ====================================================================== mesh → positions


def position_from_mesh(vertices: np.ndarray | Tensor, faces: np.ndarray | Tensor, crop: Cameras) -> tuple[Tensor, Tensor]:
    """Position map of a world-space mesh seen by one crop camera (stand-in ``face_model``).

    The mesh is rasterized (pixel centres, z-buffer) and world positions are interpolated with the
    perspective-correct barycentrics. Returns positions (H, W, 3) and confidence (H, W) in {0, 1},
    float32.
    """
    from avat3r_core.synthetic.mesh_raster import rasterize_mesh

    if len(crop) != 1:
        raise ValueError("position_from_mesh works on one camera")
    v = np.asarray(vertices.detach().cpu().double().numpy() if isinstance(vertices, Tensor) else vertices, np.float64)
    f = np.asarray(faces.detach().cpu().numpy() if isinstance(faces, Tensor) else faces, np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"expected (V, 3) vertices, got {v.shape}")
    face_id, bary, _ = rasterize_mesh(v, f, crop.world_to_cam[0].double(), crop.K[0].double(), crop.width, crop.height)
    fid, b = face_id[0], bary[0]
    mask = fid >= 0
    pts = np.zeros((crop.height, crop.width, 3), np.float64)
    tri = f[fid[mask]]
    pts[mask] = (v[tri] * b[mask][..., None]).sum(1)
    return torch.from_numpy(pts).float(), torch.from_numpy(mask.astype(np.float32))


_FLAME_KEYS = ("shape", "expression", "rotation", "neck", "jaw", "eyes", "translation")


def flame_vertices(layer: torch.nn.Module, params: Mapping[str, Any]) -> Tensor:
    """World vertices (V, 3) of a FLAME layer posed by one frame's parameters.

    ``params``: a tracking-manifest row (``shape``, ``expression``, ``rotation``, ``neck``, ``jaw``,
    ``eyes``, ``translation`` lists and ``scale``), or the same keys as arrays for one frame.
    """
    dtype = layer.v_template.dtype

    def vec(key: str) -> Tensor | None:
        value = params.get(key)
        if value is None:
            return None
        return torch.as_tensor(np.asarray(value, dtype=np.float64).reshape(1, -1), dtype=dtype)

    missing = [k for k in ("shape", "expression", "rotation", "translation") if params.get(k) is None]
    if missing:
        raise KeyError(f"FLAME parameters miss {missing}")
    scale = params.get("scale")
    scale_t = None if scale is None else torch.as_tensor(float(np.asarray(scale).reshape(-1)[0]), dtype=dtype).reshape(1)
    with torch.no_grad():
        out = layer(shape=vec("shape"), expr=vec("expression"), rotation=vec("rotation"), neck=vec("neck"),
                    jaw=vec("jaw"), eyes=vec("eyes"), translation=vec("translation"), scale=scale_t)
    return out.vertices[0]


# ====================================================================== DUSt3R → positions


def confidence_from_dust3r(conf: Tensor) -> Tensor:
    """DUSt3R confidence (≥ 1, or 0 for 'no prediction') → [0, 1): ``1 − 1/conf``, 0 below 1."""
    conf = conf.double()
    out = torch.where(conf > 1.0, 1.0 - 1.0 / conf.clamp(min=1.0), torch.zeros_like(conf))
    return out.float()


def _grid_sample_pixels(image: Tensor, uv: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear sample (C, h, w) at continuous pixel coords (H, W, 2) (pixel-centre convention).

    Returns (C, H, W) and a (H, W) mask of samples inside the map.
    """
    C, h, w = image.shape
    gx = 2.0 * uv[..., 0] / w - 1.0
    gy = 2.0 * uv[..., 1] / h - 1.0
    grid = torch.stack([gx, gy], -1)[None].to(image.dtype)
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    inside = (uv[..., 0] >= 0) & (uv[..., 0] <= w) & (uv[..., 1] >= 0) & (uv[..., 1] <= h)
    return out, inside


@torch.no_grad()
def position_from_dust3r(
    model: Any,
    images: np.ndarray,
    crops: Cameras,
    batch_size: int = 4,
    square_ok: bool = True,
    conf_threshold: float = 1.0,
) -> list[tuple[Tensor, Tensor]]:
    """DUSt3R position maps of all views of one frame, in the calibrated world.

    ``images`` uint8 (N, H, W, 3) crops (N ≥ 2) with their crop cameras ``crops`` (N, at H x W).
    Steps: :func:`dust3r_preprocess` to the model's input size → :func:`pairwise_inference` on all
    ordered pairs → :func:`align_pairwise_to_world` with the crop cameras mapped onto the DUSt3R
    grid (``Dust3rTransform.cameras``) → per view, the fused depth along the crop camera's rays is
    sampled bilinearly at the crop pixel centres and unprojected through the crop camera, so every
    point lies on its pixel's ray. Crop pixels outside DUSt3R's grid (``square_ok=False`` crops
    square images to 4:3, as the official loader does) get position 0 and confidence 0.
    Returns per view (position (H, W, 3), confidence (H, W) = 1 − 1/conf), float32.

    ``square_ok`` defaults to True: Avat3r's crops are square and the 4:3 crop of the official
    loader would drop the top and bottom of every crop (the network accepts any multiple of 16).
    """
    from avat3r_core.priors.align import align_pairwise_to_world
    from avat3r_core.priors.dust3r_inference import dust3r_preprocess, pairwise_inference

    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] != len(crops) or (arr.shape[2], arr.shape[1]) != (crops.width, crops.height):
        raise ValueError(f"images {arr.shape} do not match {len(crops)} cameras at {crops.width}x{crops.height}")
    if len(crops) < 2:
        raise ValueError("DUSt3R needs at least two views of a frame")
    long_side = int(model.config.long_side) if hasattr(model, "config") else 512
    x, _, transforms = dust3r_preprocess(arr, long_side=long_side, square_ok=square_ok)
    pairs = pairwise_inference(model, x, batch_size=batch_size)
    grid_cams = Cameras.cat([t.cameras(crops[i].to(dtype=torch.float64)) for i, t in enumerate(transforms)])
    world, conf = align_pairwise_to_world(pairs, grid_cams, conf_threshold=conf_threshold)
    # depth along each grid camera's z (== the crop camera's z: same pose)
    depth = grid_cams.world_to_camera(world.double())[..., 2]  # (N, h, w)
    out = []
    crops64 = crops.to(dtype=torch.float64)
    for i, t in enumerate(transforms):
        uv_crop = crops64[i].pixel_grid()
        uv_grid = t.to_output_pixels(uv_crop)
        maps = torch.stack([depth[i], conf[i].double()])  # (2, h, w)
        sampled, inside = _grid_sample_pixels(maps, uv_grid)
        d = torch.where(inside & (sampled[0] > 0), sampled[0], torch.zeros_like(sampled[0]))
        pos, valid = position_from_depth(d, crops64[i])
        c = confidence_from_dust3r(torch.where(inside, sampled[1], torch.zeros_like(sampled[1])))
        out.append((pos, c * valid))
    return out


# ====================================================================== features


def efficientnet_features(model: Any, images: np.ndarray, batch_size: int = 8) -> Tensor:
    """EfficientNet-Lite0 ImageNet features (N, 112, H/16, W/16) float32 (stand-in for Sapiens)."""
    from avat3r_core.priors.backbone import extract_backbone_features

    feats, _ = extract_backbone_features(model, np.ascontiguousarray(images), batch_size=batch_size)
    return feats


def sapiens_features(model: Any, images: np.ndarray, size: tuple[int, int] = (1024, 1024),
                     batch_size: int = 4) -> Tensor:
    """Sapiens features (N, C, size/16) float32 from an official TorchScript model."""
    from avat3r_core.priors.sapiens import extract_features

    return extract_features(model, np.ascontiguousarray(images), size=size, batch_size=batch_size)


class FeatureExtractor:
    """A feature source loaded once: ``kind`` efficientnet (the ImageNet stand-in), sapiens (an
    official TorchScript file) or none. ``source`` names it for manifests and avatar records;
    ``__call__(images (N, H, W, 3) uint8) -> (N, C, h, w)`` float32, or None for ``none``."""

    def __init__(self, kind: str, device: Any = "cpu", sapiens_model: str = "",
                 sapiens_input_size: tuple[int, int] = (1024, 768), batch_size: int = 8):
        self.kind, self.sapiens_input_size, self.batch_size = kind, tuple(sapiens_input_size), batch_size
        self.model = None
        if kind == "efficientnet":
            from avat3r_core.priors.backbone import BACKBONE_SOURCE, load_efficientnet_lite0

            self.model = load_efficientnet_lite0(device=device)
            self.source = BACKBONE_SOURCE
        elif kind == "sapiens":
            from avat3r_core.priors.sapiens import load_sapiens

            self.model = load_sapiens(sapiens_model, device=device)
            self.source = f"sapiens_{self.model.size}" if self.model.size else "sapiens"
        elif kind == "none":
            self.source = "none"
        else:
            raise ValueError(f"unknown feature source {kind!r} (efficientnet, sapiens or none)")

    def __call__(self, images: np.ndarray) -> Tensor | None:
        if self.kind == "efficientnet":
            return efficientnet_features(self.model, images, batch_size=self.batch_size)
        if self.kind == "sapiens":
            return sapiens_features(self.model, images, size=self.sapiens_input_size, batch_size=self.batch_size)
        return None


def features_to_store(features: Tensor, projection: tuple[Tensor, Tensor] | None = None) -> np.ndarray:
    """(N, C, h, w) float features → float16 numpy, PCA-projected to k channels when given
    ``(matrix (C, k), mean (C,))``. Refuses NaN/Inf and values beyond the float16 range."""
    from avat3r_core.priors.sapiens import apply_projection, to_fp16

    if projection is not None:
        features = apply_projection(features, projection[0], projection[1])
    return to_fp16(features, "features").numpy()


def read_feature_projection(path: str) -> tuple[Tensor, Tensor, dict]:
    """The priors stage's ``feature_projection.npz`` → (matrix (C, k), mean (C,), meta) as float32
    tensors: the one reader (the priors stage applies it, reconstruction projects pictures' features
    with it). Errors name the file."""
    import io
    import json

    from avat3r_core import storage
    from avat3r_core.errors import FormatError

    try:
        with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as z:
            matrix, mean = torch.from_numpy(z["matrix"]).float(), torch.from_numpy(z["mean"]).float()
            meta = json.loads(str(z["meta"])) if "meta" in z else {}
    except FileNotFoundError:
        raise FormatError(path, None, "feature projection file not found") from None
    except KeyError as exc:
        raise FormatError(path, str(exc), "missing key in the feature projection") from None
    return matrix, mean, meta


def choose_position_source(requested: str, dust3r_checkpoint: str, ground_truth_root: str = "") -> str:
    """What ``position_source: auto`` means, for the priors stage and for reconstruction alike:
    DUSt3R when its checkpoint is given, else the studio's ground truth when given (the priors
    stage only), else the face-model stand-in. A concrete choice is kept."""
    if requested != "auto":
        return requested
    if dust3r_checkpoint:
        return "dust3r"
    return "ground_truth" if ground_truth_root else "face_model"


def choose_feature_source(requested: str, sapiens_model: str) -> str:
    """What ``feature_source: auto`` means: Sapiens when its model file is given, else EfficientNet."""
    if requested != "auto":
        return requested
    return "sapiens" if sapiens_model else "efficientnet"
