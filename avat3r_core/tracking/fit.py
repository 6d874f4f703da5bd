"""FLAME tracking from 2D landmarks: calibrated multi-view sequences and uncalibrated photos.

Calibrated (:func:`fit_sequence`)
---------------------------------
One subject, one sequence, all cameras and frames jointly. Unknowns: ``shape`` (shared), and per
frame ``expression``, ``jaw``, ``neck``, ``eyes``, global ``rotation`` (axis-angle about the root
joint, FLAME's convention) and ``translation``. Energy (all terms averaged, pixels normalised to
a ``reference_height`` image so weights do not depend on resolution)::

    E = mean_w rho(|proj(lmk) - obs|)                       robust reprojection (visibility/confidence weights)
      + w_shape |shape|^2 + w_expr mean_t |expr_t|^2       L2 priors (FLAME's coefficients are in sigma units)
      + w_jaw / w_neck / w_eyes mean_t |.|^2                pose priors (neck small: it trades off with rotation)
      + w_smooth_* mean_t |p_{t+1} - p_t|^2                 temporal smoothness of every per-frame parameter
      + w_silhouette mean rho(dist_outside_mask(proj(v)))   optional silhouette term (see below)

``rho`` is Geman-McClure ``s^2 r^2 / (r^2 + s^2)`` (``robust="gm"``), Huber, or plain L2.

Silhouette term: a subset of mesh vertices is projected into every camera and penalised by the
distance (pixels, bilinearly sampled from a distance transform of the mask's outside) by which
they fall outside the alpha mask. It is one-sided on purpose: hair, clothing and the neck make
the real silhouette larger than the bare FLAME mesh, so only "mesh outside the mask" is an error.

Optimisation is vectorised across frames: one optimiser step updates all frames of a batch
(``frames_per_batch = 0``: the whole sequence). Stages: (1) rigid (rotation/translation) with
Adam, (2) everything with Adam, (3) optional L-BFGS polish on everything. Initial rigid pose per
frame: landmarks are triangulated across the calibrated cameras (weighted DLT) and the neutral
template's landmarks are aligned to them (Kabsch, with one inlier re-fit); with fewer than two
usable views a PnP fit (OpenCV) in the best camera is used instead (:mod:`avat3r_core.tracking.rigid`).

Only the vertices the energy needs (landmark triangles, the silhouette subset) are posed during
optimisation (:class:`SubsetFlame`, exactly FLAME's LBS restricted to those vertices, with the
joint regressor folded into per-component joint directions).

The result carries per-frame, per-camera mean residuals (pixels of the input images) and a
``converged`` flag: it is False when anything is non-finite or a frame's mean residual exceeds
``max_residual_px`` (at ``reference_height``) -- a sequence whose landmarks are garbage ends there.

Uncalibrated (:func:`fit_uncalibrated`)
---------------------------------------
A few photos, a single image or video frames of one person with no calibration: each image gets
a pinhole camera with the default vertical field of view (``fov_deg``, principal point at the
image centre); the head is fixed at the origin with identity rotation and one camera pose per
image is solved (internally: a head pose per image in its camera, then inverted to a
world-to-camera matrix). Shape is shared; expression, jaw, neck and eyes are per image.

Pitch prior: ``+ w_pitch mean_i sin^2(pitch_i)``, the pitch at which the head sees camera i (the
angle :func:`avat3r_core.reconstruct.prepared.head_angles` reports), and a level start (the PnP pose turned
to pitch 0 about a horizontal axis, yaw kept). Why: from one real photo, pitch trades off against face shape
and expression. The studio head's 68 landmarks are vertically longer than real faces' MediaPipe
points (brow to chin, relative to the face's width), so PnP of the mean face alone already tilts
the camera 37-39 deg above scikit-image's astronaut and Grace Hopper, and the fits ended at 38-48
deg. ``w_pitch = 5``: 10 deg on both photos at the reconstruct stage's ``tiny`` budget (7 and 5 deg
with FitConfig ``tiny``); the 68-point residual grows by 1.1 and 1.8 px there, all of it on the jaw
contour (inner 51 points within 0.15 px). The price, on studio views of the face model itself (12
cameras, true pitch -20 to +25 deg, single-image fits from ground-truth landmarks): mean pitch
error 0.7 -> 2.4 deg with FitConfig ``tiny``, 1.8 -> 4.5 deg at the stage's budget; a true 25 deg
reads as 20 (``tests/test_pictures.py`` keeps the figures on the photos).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Sequence

import numpy as np
import torch
from torch import Tensor

from avat3r_core.config import Presets
from avat3r_core.cameras import Cameras
from avat3r_core.flame import FlameLayer, batch_rodrigues
from avat3r_core.tracking.rigid import initial_rigid_pose, level_pose, pnp_pose, rotvec

__all__ = [
    "FitConfig", "FitResult", "UncalibratedResult", "SubsetFlame", "fit_sequence", "fit_uncalibrated",
    "flame_params_to_full", "PER_FRAME_KEYS",
]

PER_FRAME_KEYS = ("expression", "jaw", "neck", "eyes", "rotation", "translation")
_DIMS = {"jaw": 3, "neck": 3, "eyes": 6, "rotation": 3, "translation": 3}


@dataclass
class FitConfig(Presets):
    """Tracking energy and optimiser settings (see the module docstring)."""

    PRESETS: ClassVar[dict] = {
        "tiny": dict(rigid_iters=40, adam_iters=400, lbfgs_iters=50),
        "default": dict(rigid_iters=100, adam_iters=800, lbfgs_iters=100),
    }

    n_shape: int = 300
    n_expr: int = 100
    rigid_iters: int = 100
    adam_iters: int = 800
    lbfgs_iters: int = 100  # 0 = Adam only
    lr_pose: float = 0.01  # radians per step (Adam)
    lr_translation: float = 0.002  # metres per step
    lr_coeffs: float = 0.05  # shape / expression units per step
    robust: str = "gm"  # "gm" (Geman-McClure) | "huber" | "l2"
    robust_scale_px: float = 5.0  # at reference_height
    reference_height: int = 256
    w_shape: float = 1e-3
    w_expr: float = 1e-3
    w_jaw: float = 1e-2
    w_neck: float = 1.0
    w_eyes: float = 1.0
    w_smooth_expr: float = 1e-2
    w_smooth_pose: float = 1.0
    w_smooth_translation: float = 100.0
    w_silhouette: float = 0.0  # > 0 and masks given: silhouette term on
    w_pitch: float = 5.0  # uncalibrated fits only: prior on the head's pitch towards each camera (fit_uncalibrated)
    silhouette_vertices: int = 600
    max_residual_px: float = 5.0  # convergence test, at reference_height
    frames_per_batch: int = 0  # 0 = every frame in one optimiser step
    dtype: str = "float64"
    seed: int = 0
    num_threads: int = 1  # torch intra-op threads during a fit (small problems: 1 is fastest); 0 = leave as is

    def __post_init__(self) -> None:
        if self.robust not in ("gm", "huber", "l2"):
            raise ValueError(f"FitConfig.robust must be 'gm', 'huber' or 'l2', got {self.robust!r}")
        if min(self.rigid_iters, self.adam_iters, self.lbfgs_iters, self.frames_per_batch) < 0:
            raise ValueError("FitConfig: iteration counts and frames_per_batch must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float64": torch.float64, "float32": torch.float32}[self.dtype]


@dataclass
class FitResult:
    params: dict[str, np.ndarray]  # shape (1, S), expression (T, E), jaw/neck/rotation/translation (T, 3), eyes (T, 6), scale (1, 1)
    residuals: np.ndarray  # (T, C) mean reprojection error in input pixels (NaN: no visible landmark)
    frame_residuals: np.ndarray  # (T,) mean over the frame's visible landmarks
    converged: bool
    message: str = ""
    landmarks2d: np.ndarray | None = None  # (T, C, L, 2) fitted landmarks, input pixels
    seconds: float = 0.0
    iterations: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean_residual(self) -> float:
        return float(np.nanmean(self.residuals)) if np.isfinite(self.residuals).any() else float("nan")


@dataclass
class UncalibratedResult:
    params: dict[str, np.ndarray]  # head at the origin: rotation = translation = 0
    world_to_cam: np.ndarray  # (N, 4, 4) per image, OpenCV
    K: np.ndarray  # (N, 3, 3)
    image_sizes: np.ndarray  # (N, 2) width, height
    residuals: np.ndarray  # (N,) mean px
    converged: bool
    message: str = ""
    landmarks2d: np.ndarray | None = None  # (N, L, 2)

    def cameras(self, i: int) -> Cameras:
        w, h = (int(v) for v in self.image_sizes[i])
        return Cameras(torch.as_tensor(self.world_to_cam[i:i + 1]), torch.as_tensor(self.K[i:i + 1]), w, h)


# --------------------------------------------------------------------------- a FLAME restricted to some vertices
class SubsetFlame(torch.nn.Module):
    """FLAME (:class:`FlameLayer`'s LBS, no scale/offsets) evaluated only at ``vertex_idx`` + landmarks.

    ``forward(shape (1|B, S), expr, rotation, neck, jaw, eyes, translation) -> (verts (B, n, 3),
    landmarks (B, L, 3), root joint (B, 3))``. Joints come from per-component joint directions
    ``J_regressor @ shapedirs``, so no full mesh is needed.
    """

    def __init__(self, layer: FlameLayer, vertex_idx: np.ndarray | None = None, dtype: torch.dtype = torch.float64,
                 shape_components: np.ndarray | None = None, expr_components: np.ndarray | None = None):
        super().__init__()
        if layer.lmk_faces is None:
            raise ValueError("SubsetFlame needs a FlameLayer built with a landmark embedding")
        lmk_faces = layer.lmk_faces.cpu().numpy()
        extra = np.asarray(vertex_idx if vertex_idx is not None else [], dtype=np.int64)
        idx = np.unique(np.concatenate([lmk_faces.reshape(-1), extra]))
        remap = {int(v): i for i, v in enumerate(idx)}
        self.n_extra = len(extra)
        self.register_buffer("extra_pos", torch.as_tensor([remap[int(v)] for v in extra], dtype=torch.long))
        self.register_buffer("lmk_faces", torch.as_tensor(np.vectorize(remap.get)(lmk_faces), dtype=torch.long).reshape(-1, 3))
        self.register_buffer("lmk_bary", layer.lmk_bary.to(dtype))
        t = torch.as_tensor(idx)
        V = layer.n_vertices
        # the components this layer optimises (default: all); coefficients are given in this order
        sc = np.arange(layer.n_shape) if shape_components is None else np.asarray(shape_components, np.int64)
        ec = np.arange(layer.n_expr) if expr_components is None else np.asarray(expr_components, np.int64)
        cols = torch.as_tensor(np.concatenate([sc, layer.n_shape + ec]))
        self.n_shape, self.n_expr = len(sc), len(ec)
        self.register_buffer("v_template", layer.v_template[t].to(dtype))
        self.register_buffer("shapedirs", layer.shapedirs[t][..., cols].to(dtype))  # (n, 3, S+E)
        self.register_buffer("posedirs", layer.posedirs.reshape(-1, V, 3)[:, t].reshape(layer.posedirs.shape[0], -1).to(dtype))
        self.register_buffer("lbs_weights", layer.lbs_weights[t].to(dtype))
        J_reg = layer.J_regressor.to(dtype)
        self.register_buffer("J_template", J_reg @ layer.v_template.to(dtype))  # (5, 3)
        self.register_buffer("J_dirs", torch.einsum("jv,vcl->jcl", J_reg, layer.shapedirs[..., cols].to(dtype)))
        self.parents = list(layer.parents)

    def forward(self, shape: Tensor, expr: Tensor, rotation: Tensor, neck: Tensor, jaw: Tensor, eyes: Tensor,
                translation: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B = rotation.shape[0]
        shape = shape.expand(B, -1)
        S, E = shape.shape[1], expr.shape[1]
        betas = torch.cat([shape, expr], 1)
        dirs = torch.cat([self.shapedirs[..., :S], self.shapedirs[..., self.n_shape:self.n_shape + E]], -1)
        jdirs = torch.cat([self.J_dirs[..., :S], self.J_dirs[..., self.n_shape:self.n_shape + E]], -1)
        v_shaped = self.v_template + torch.einsum("bl,vcl->bvc", betas, dirs)
        joints = self.J_template + torch.einsum("bl,jcl->bjc", betas, jdirs)
        pose = torch.cat([rotation, neck, jaw, eyes], 1).reshape(B, 5, 3)
        rot = batch_rodrigues(pose)
        eye3 = torch.eye(3, dtype=rot.dtype, device=rot.device)
        v_posed = v_shaped + ((rot[:, 1:] - eye3).reshape(B, -1) @ self.posedirs).reshape(B, -1, 3)
        rel = torch.cat([joints[:, :1], joints[:, 1:] - joints[:, self.parents[1:]]], 1)
        local = torch.cat([torch.cat([rot, rel[..., None]], -1), rot.new_tensor([0, 0, 0, 1]).expand(B, 5, 1, 4)], -2)
        chain = [local[:, 0]]
        for j in range(1, 5):
            chain.append(chain[self.parents[j]] @ local[:, j])
        G = torch.stack(chain, 1)
        Gt = G[:, :, :3, 3] - (G[:, :, :3, :3] @ joints[..., None])[..., 0]
        Tr = torch.einsum("vj,bjmn->bvmn", self.lbs_weights, G[:, :, :3, :3])
        Tt = torch.einsum("vj,bjm->bvm", self.lbs_weights, Gt)
        verts = (Tr @ v_posed[..., None])[..., 0] + Tt + translation[:, None]
        lmk = (verts[:, self.lmk_faces] * self.lmk_bary[None, :, :, None]).sum(2)
        return verts[:, self.extra_pos], lmk, joints[:, 0]


# --------------------------------------------------------------------------- geometry helpers
def _project(points: Tensor, w2c: Tensor, K: Tensor) -> tuple[Tensor, Tensor]:
    """points (T, N, 3); w2c (T|1, C, 4, 4); K (T|1, C, 3, 3) -> uv (T, C, N, 2), z (T, C, N)."""
    R, t = w2c[..., :3, :3], w2c[..., :3, 3]
    Xc = torch.einsum("tcij,tnj->tcni", R, points.expand(max(points.shape[0], 1), -1, -1)) + t[:, :, None]
    z = Xc[..., 2]
    zc = z.clamp_min(1e-4)
    xy = Xc[..., :2] / zc[..., None]
    uv = torch.einsum("tcij,tcnj->tcni", K[..., :2, :2], xy) + K[..., None, :2, 2]
    return uv, z


def _robust(r2: Tensor, kind: str, s: float) -> Tensor:
    if kind == "gm":
        return (s * s) * r2 / (r2 + s * s)
    if kind == "huber":
        r = torch.sqrt(r2 + 1e-12)
        return torch.where(r <= s, r2, 2 * s * r - s * s)
    return r2


def _distance_maps(masks: np.ndarray) -> np.ndarray:
    """(..., H, W) masks in [0, 1] -> distance (px) to the mask for pixels outside it, 0 inside."""
    from scipy.ndimage import distance_transform_edt

    flat = masks.reshape(-1, *masks.shape[-2:])
    out = np.stack([distance_transform_edt(m < 0.5) for m in flat]).astype(np.float32)
    return out.reshape(masks.shape)


# --------------------------------------------------------------------------- the optimiser core
class _Problem:
    """Everything fixed during a fit, as tensors (T frames, C cameras per frame, L landmarks)."""

    def __init__(self, flame: SubsetFlame, obs: Tensor, weight: Tensor, w2c: Tensor, K: Tensor, norm: Tensor,
                 config: FitConfig, dist: Tensor | None):
        self.flame, self.obs, self.weight, self.w2c, self.K, self.norm = flame, obs, weight, w2c, K, norm
        self.cfg, self.dist = config, dist
        self.wsum = weight.sum().clamp_min(1e-9)
        #: uncalibrated fits (identity w2c, the head posed in each camera): the pitch prior applies
        self.pitch_prior = False

    def subset(self, frames: slice) -> "_Problem":
        pick = lambda x: x if x is None or x.shape[0] == 1 else x[frames]  # noqa: E731
        sub = _Problem(self.flame, self.obs[frames], self.weight[frames], pick(self.w2c), pick(self.K),
                       pick(self.norm), self.cfg, pick(self.dist))
        sub.pitch_prior = self.pitch_prior
        return sub

    def energy(self, p: dict[str, Tensor], with_terms: bool = False):
        cfg = self.cfg
        verts, lmk, root = self.flame(p["shape"], p["expression"], p["rotation"], p["neck"], p["jaw"], p["eyes"],
                                      p["translation"])
        uv, _ = _project(lmk, self.w2c, self.K)
        d2 = ((uv - self.obs) ** 2).sum(-1) * self.norm[..., None] ** 2
        data = (self.weight * _robust(d2, cfg.robust, cfg.robust_scale_px)).sum() / self.wsum
        mean_sq = lambda x: (x * x).sum(-1).mean()  # noqa: E731
        prior = (cfg.w_shape * (p["shape"] ** 2).sum() + cfg.w_expr * mean_sq(p["expression"])
                 + cfg.w_jaw * mean_sq(p["jaw"]) + cfg.w_neck * mean_sq(p["neck"]) + cfg.w_eyes * mean_sq(p["eyes"]))
        smooth = p["rotation"].new_zeros(())
        if p["rotation"].shape[0] > 1:
            diff = lambda x: mean_sq(x[1:] - x[:-1])  # noqa: E731
            smooth = (cfg.w_smooth_expr * diff(p["expression"])
                      + cfg.w_smooth_pose * sum(diff(p[k]) for k in ("rotation", "neck", "jaw", "eyes"))
                      + cfg.w_smooth_translation * diff(p["translation"]))
        sil = p["rotation"].new_zeros(())
        if self.dist is not None and cfg.w_silhouette > 0 and verts.shape[1]:
            vuv, _ = _project(verts, self.w2c, self.K)  # (T, C, n, 2)
            Tn, C, H, W = self.dist.shape
            grid = torch.stack([vuv[..., 0] / W * 2 - 1, vuv[..., 1] / H * 2 - 1], -1)  # align_corners=False
            dist = torch.nn.functional.grid_sample(self.dist.reshape(Tn * C, 1, H, W), grid.reshape(Tn * C, 1, -1, 2),
                                                   mode="bilinear", padding_mode="border", align_corners=False)
            dist = dist.reshape(Tn, C, -1) * self.norm[..., None]
            sil = cfg.w_silhouette * _robust(dist * dist, cfg.robust, cfg.robust_scale_px).mean()
        pitch = p["rotation"].new_zeros(())
        if self.pitch_prior and cfg.w_pitch > 0:
            pitch = cfg.w_pitch * (_sin_pitch(p["rotation"], p["translation"], root) ** 2).mean()
        total = data + prior + smooth + sil + pitch
        if with_terms:
            return total, {"data": float(data), "prior": float(prior), "smooth": float(smooth), "silhouette": float(sil),
                           "pitch": float(pitch)}
        return total

    def residuals(self, p: dict[str, Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            _, lmk, _ = self.flame(p["shape"], p["expression"], p["rotation"], p["neck"], p["jaw"], p["eyes"],
                                   p["translation"])
            uv, _ = _project(lmk, self.w2c, self.K)
            d = ((uv - self.obs) ** 2).sum(-1).sqrt()
            vis = self.weight > 0
            per_cam = (d * vis).sum(-1) / vis.sum(-1).clamp_min(1)
            per_cam = torch.where(vis.any(-1), per_cam, torch.full_like(per_cam, float("nan")))
            per_frame = (d * vis).sum((1, 2)) / vis.sum((1, 2)).clamp_min(1)
        return per_cam.numpy(), per_frame.numpy(), uv.numpy()


def _sin_pitch(rotation: Tensor, translation: Tensor, root: Tensor) -> Tensor:
    """(T,) sine of the pitch at which the head (posed in its camera's frame: an uncalibrated fit)
    sees the camera: the camera centre's height in the head's frame over its distance, the angle
    :func:`avat3r_core.reconstruct.prepared.head_angles` reports (> 0: camera above)."""
    R = batch_rodrigues(rotation)
    # head-frame origin in the camera: R (0 - J0) + J0 + translation; the camera centre in the head's
    # frame: R^T (0 - that)
    origin = translation + root - (R @ root[..., None])[..., 0]
    c = -(R.transpose(-1, -2) @ origin[..., None])[..., 0]
    return c[:, 1] / c.norm(dim=-1).clamp_min(1e-9)


class _threads:
    """Temporarily set torch's intra-op thread count (restored on exit)."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        if self.n > 0:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n > 0:
            torch.set_num_threads(self.before)


def _optimise(problem: _Problem, params: dict[str, Tensor], cfg: FitConfig, history: dict[str, list]) -> int:
    """Rigid Adam -> full Adam -> L-BFGS on ``params`` (leaf tensors, updated in place)."""
    with _threads(cfg.num_threads):
        return _optimise_inner(problem, params, cfg, history)


def _optimise_inner(problem: _Problem, params: dict[str, Tensor], cfg: FitConfig, history: dict[str, list]) -> int:
    groups = {"rotation": cfg.lr_pose, "neck": cfg.lr_pose, "jaw": cfg.lr_pose, "eyes": cfg.lr_pose,
              "translation": cfg.lr_translation, "shape": cfg.lr_coeffs, "expression": cfg.lr_coeffs}
    steps = 0

    def adam(names: Sequence[str], iters: int, tag: str) -> None:
        nonlocal steps
        if iters <= 0:
            return
        opt = torch.optim.Adam([{"params": [params[n]], "lr": groups[n]} for n in names])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=0.05 * min(groups[n] for n in names))
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            loss = problem.energy(params)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
        history.setdefault(tag, []).append(float(loss.detach()))

    adam(("rotation", "translation"), cfg.rigid_iters, "rigid")
    adam(tuple(groups), cfg.adam_iters, "adam")
    if cfg.lbfgs_iters > 0:
        leaves = [params[n] for n in groups]
        opt = torch.optim.LBFGS(leaves, lr=1.0, max_iter=cfg.lbfgs_iters, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = problem.energy(params)
            loss.backward()
            return loss

        with torch.no_grad():
            before = float(problem.energy(params))
        snapshot = {k: v.detach().clone() for k, v in params.items()}
        opt.step(closure)
        with torch.no_grad():
            after = float(problem.energy(params))
        if not math.isfinite(after) or after > before:  # a bad line search never makes things worse
            with torch.no_grad():
                for k, v in snapshot.items():
                    params[k].copy_(v)
        steps += cfg.lbfgs_iters
        history.setdefault("lbfgs", []).append(min(after, before) if math.isfinite(after) else before)
    return steps


def _initial_params(T: int, n_shape: int, n_expr: int, rotation: np.ndarray, translation: np.ndarray,
                    dtype: torch.dtype, shape: Tensor | None = None) -> dict[str, Tensor]:
    p = {
        "shape": torch.zeros(1, n_shape, dtype=dtype) if shape is None else shape.detach().clone(),
        "expression": torch.zeros(T, n_expr, dtype=dtype),
        "rotation": torch.as_tensor(rotation, dtype=dtype).clone(),
        "translation": torch.as_tensor(translation, dtype=dtype).clone(),
        **{k: torch.zeros(T, _DIMS[k], dtype=dtype) for k in ("jaw", "neck", "eyes")},
    }
    for v in p.values():
        v.requires_grad_(True)
    return p


def _select_landmarks(points: np.ndarray, weights: np.ndarray, landmark_indices) -> tuple[np.ndarray, np.ndarray]:
    if landmark_indices is None:
        return points, weights
    idx = np.asarray(landmark_indices, dtype=np.int64)
    return points[..., idx, :], weights[..., idx]


def _silhouette_subset(layer: FlameLayer, n: int, seed: int) -> np.ndarray:
    if n <= 0:
        return np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(layer.n_vertices, size=min(n, layer.n_vertices), replace=False))


def _active_components(layer: FlameLayer, n_shape: int, n_expr: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the first ``n_shape``/``n_expr`` components whose blendshape is not all zero.

    A zero blendshape cannot change any vertex, so its coefficient's optimum is the prior's (0);
    leaving it out of the optimisation is exact and saves time (the studio head has 16 + 16)."""
    norms = layer.shapedirs.detach().abs().amax(dim=(0, 1)).cpu().numpy()
    sc = np.nonzero(norms[:n_shape] > 0)[0]
    ec = np.nonzero(norms[layer.n_shape:layer.n_shape + n_expr] > 0)[0]
    return sc, ec


def _scatter(values: np.ndarray, components: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((values.shape[0], width), dtype=values.dtype)
    out[:, components] = values
    return out


def fit_sequence(layer: FlameLayer, cameras: Cameras | Sequence[Cameras], points: np.ndarray, weights: np.ndarray,
                 config: FitConfig | None = None, masks: np.ndarray | None = None,
                 landmark_indices: Sequence[int] | None = None) -> FitResult:
    """Track one sequence seen by calibrated cameras.

    ``layer``: a :class:`FlameLayer` built with the landmark embedding of the detector;
    ``cameras``: the C cameras (one image size), or one :class:`Cameras` of C per frame (crop cameras
    that move with a per-frame crop; same size and camera order); ``points`` (T, C, L, 2) detected landmarks in those
    images' pixels, ``weights`` (T, C, L) visibility/confidence (0 = ignore); ``masks`` optional
    (T, C, H, W) alpha in [0, 1] for the silhouette term; ``landmark_indices``: the embedding's
    selection of detector points (e.g. FLAME's MediaPipe embedding).
    """
    cfg = config or FitConfig()
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    dtype = cfg.torch_dtype
    points, weights = _select_landmarks(np.asarray(points, np.float64), np.asarray(weights, np.float64), landmark_indices)
    T, C, L, _ = points.shape
    if L != int(layer.lmk_faces.shape[0]):
        raise ValueError(f"{L} landmarks per image but the embedding has {int(layer.lmk_faces.shape[0])}")
    finite = np.isfinite(points).all(-1)
    weights = np.where(finite, np.clip(weights, 0, None), 0.0)
    points = np.where(finite[..., None], points, 0.0)
    cam_list = [cameras] if isinstance(cameras, Cameras) else list(cameras)
    if len(cam_list) not in (1, T) or any(len(c) != C for c in cam_list):
        raise ValueError(f"cameras: expected one Cameras of {C} or {T} of them (one per frame)")
    height = cam_list[0].height
    w2c = np.stack([c.world_to_cam.detach().double().numpy() for c in cam_list])  # (1|T, C, 4, 4)
    K = np.stack([c.K.detach().double().numpy() for c in cam_list])
    full_shape, full_expr = min(cfg.n_shape, layer.n_shape), min(cfg.n_expr, layer.n_expr)
    sc, ec = _active_components(layer, full_shape, full_expr)
    n_shape, n_expr = len(sc), len(ec)
    sil_idx = _silhouette_subset(layer, cfg.silhouette_vertices, cfg.seed) if (masks is not None and cfg.w_silhouette > 0) else None
    flame = SubsetFlame(layer, sil_idx, dtype=dtype, shape_components=sc, expr_components=ec)
    with torch.no_grad():
        z = lambda n: torch.zeros(1, n, dtype=dtype)  # noqa: E731
        _, tmpl, root = flame(z(n_shape), z(n_expr), z(3), z(3), z(3), z(6), z(3))
    rot0, trans0 = initial_rigid_pose(tmpl[0].numpy(), root[0].numpy(), points, weights, w2c, K)
    dist = torch.as_tensor(_distance_maps(np.asarray(masks, np.float32)), dtype=dtype) if sil_idx is not None else None
    norm = torch.full((1, C), cfg.reference_height / height, dtype=dtype)
    problem = _Problem(flame, torch.as_tensor(points, dtype=dtype), torch.as_tensor(weights, dtype=dtype),
                       torch.as_tensor(w2c, dtype=dtype), torch.as_tensor(K, dtype=dtype), norm, cfg, dist)
    history: dict[str, list] = {}
    chunk = cfg.frames_per_batch or T
    outputs: dict[str, list[Tensor]] = {k: [] for k in PER_FRAME_KEYS}
    shape = None
    per_cam, per_frame, uv = [], [], []
    steps = 0
    for s0 in range(0, T, chunk):
        sl = slice(s0, min(T, s0 + chunk))
        params = _initial_params(sl.stop - sl.start, n_shape, n_expr, rot0[sl], trans0[sl], dtype, shape)
        sub = problem.subset(sl)
        steps += _optimise(sub, params, cfg, history)
        shape = params["shape"]
        for k in PER_FRAME_KEYS:
            outputs[k].append(params[k].detach())
        pc, pf, u = sub.residuals(params)
        per_cam.append(pc), per_frame.append(pf), uv.append(u)
    out = {k: torch.cat(v).numpy() for k, v in outputs.items()}
    out["expression"] = _scatter(out["expression"], ec, full_expr)
    out["shape"] = _scatter(shape.detach().numpy(), sc, full_shape)
    out["scale"] = np.ones((1, 1))
    per_cam, per_frame = np.concatenate(per_cam), np.concatenate(per_frame)
    converged, message = _judge(out, per_frame * cfg.reference_height / height, cfg)
    return FitResult(out, per_cam, per_frame, converged, message, np.concatenate(uv),
                     time.perf_counter() - start, steps, history)


def _judge(params: dict[str, np.ndarray], per_frame_ref: np.ndarray, cfg: FitConfig) -> tuple[bool, str]:
    if not all(np.isfinite(v).all() for v in params.values()):
        return False, "non-finite parameters"
    if not np.isfinite(per_frame_ref).all():
        bad = np.nonzero(~np.isfinite(per_frame_ref))[0].tolist()
        return False, f"frames {bad[:10]} have no usable landmarks"
    worst = float(per_frame_ref.max()) if per_frame_ref.size else 0.0
    if worst > cfg.max_residual_px:
        bad = np.nonzero(per_frame_ref > cfg.max_residual_px)[0].tolist()
        return False, (f"diverged: {len(bad)} frame(s) with mean residual above {cfg.max_residual_px} px "
                       f"(at {cfg.reference_height} px height), worst {worst:.2f} px, frames {bad[:10]}")
    return True, f"converged: worst frame {worst:.2f} px (at {cfg.reference_height} px height)"


def flame_params_to_full(layer: FlameLayer, params: dict[str, np.ndarray], frames: slice | None = None) -> Tensor:
    """Posed vertices (T, V, 3) of fitted ``params`` through the full layer (no offsets)."""
    sl = frames or slice(None)
    with torch.no_grad():
        dt = layer.v_template.dtype
        g = lambda k: torch.as_tensor(np.asarray(params[k])[sl], dtype=dt)  # noqa: E731
        T = g("rotation").shape[0]
        shape = torch.as_tensor(np.asarray(params["shape"]), dtype=dt).reshape(1, -1).expand(T, -1)
        return layer(shape=shape, expr=g("expression"), rotation=g("rotation"), neck=g("neck"), jaw=g("jaw"),
                     eyes=g("eyes"), translation=g("translation")).vertices


# --------------------------------------------------------------------------- uncalibrated
def default_intrinsics(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole K with vertical field of view ``fov_deg``, square pixels, principal point at the centre."""
    f = 0.5 * height / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])


def fit_uncalibrated(layer: FlameLayer, points: np.ndarray, image_sizes: np.ndarray, confidence: np.ndarray | None = None,
                     fov_deg: float = 20.0, config: FitConfig | None = None,
                     landmark_indices: Sequence[int] | None = None, video: bool = False) -> UncalibratedResult:
    """Shape, per-image expression and one camera per image from landmarks alone.

    ``points`` (N, L, 2) pixels of N images (photos of one person, or video frames), ``image_sizes``
    (N, 2) width, height; ``confidence`` (N, L) (default 1). Each image gets the default intrinsics
    of ``fov_deg`` (vertical). The returned ``params`` place the head at the origin with identity
    rotation (``rotation = translation = 0``), and ``world_to_cam[i]`` is the camera of image i in
    the head's frame. ``video=True`` keeps temporal smoothness between consecutive images (off for
    unordered photos).
    """
    cfg = config or FitConfig()
    # with the head fixed at the origin, the neck rotation is interchangeable with the camera pose for
    # every landmark: pin it (strong prior) so the camera carries the head pose
    overrides = {"w_neck": max(cfg.w_neck, 1e3)}
    if not video:
        overrides.update(w_smooth_expr=0.0, w_smooth_pose=0.0, w_smooth_translation=0.0)
    cfg = FitConfig(**{**asdict(cfg), **overrides})
    dtype = cfg.torch_dtype
    points = np.asarray(points, np.float64)
    N = points.shape[0]
    conf = np.ones(points.shape[:2]) if confidence is None else np.asarray(confidence, np.float64)
    points, conf = _select_landmarks(points, conf, landmark_indices)
    finite = np.isfinite(points).all(-1)
    conf = np.where(finite, np.clip(conf, 0, None), 0.0)
    points = np.where(finite[..., None], points, 0.0)
    sizes = np.asarray(image_sizes, np.int64).reshape(N, 2)
    Ks = np.stack([default_intrinsics(int(w), int(h), fov_deg) for w, h in sizes])
    full_shape, full_expr = min(cfg.n_shape, layer.n_shape), min(cfg.n_expr, layer.n_expr)
    sc, ec = _active_components(layer, full_shape, full_expr)
    n_shape, n_expr = len(sc), len(ec)
    flame = SubsetFlame(layer, None, dtype=dtype, shape_components=sc, expr_components=ec)
    with torch.no_grad():
        z = lambda n: torch.zeros(1, n, dtype=dtype)  # noqa: E731
        _, tmpl, root = flame(z(n_shape), z(n_expr), z(3), z(3), z(3), z(6), z(3))
    tmpl, root = tmpl[0].numpy(), root[0].numpy()
    rot0, trans0 = np.zeros((N, 3)), np.zeros((N, 3))
    for i in range(N):  # head pose in each camera by PnP; a default frontal pose if that fails
        res = pnp_pose(tmpl, points[i], conf[i], Ks[i])
        if res is None:
            R, tr = np.diag([1.0, -1.0, -1.0]), np.array([0.0, 0.0, Ks[i, 1, 1] * 0.25 / sizes[i, 1]])
        else:
            R, tr = res
            if cfg.w_pitch > 0:
                R = level_pose(R, tr)
        rot0[i] = rotvec(R)
        trans0[i] = tr - (np.eye(3) - R) @ root
    eye4 = torch.eye(4, dtype=dtype).expand(N, 1, 4, 4)
    norm = torch.as_tensor(cfg.reference_height / sizes[:, 1:2].astype(np.float64), dtype=dtype)  # (N, 1)
    problem = _Problem(flame, torch.as_tensor(points[:, None], dtype=dtype), torch.as_tensor(conf[:, None], dtype=dtype),
                       eye4, torch.as_tensor(Ks[:, None], dtype=dtype), norm, cfg, None)
    problem.pitch_prior = True
    params = _initial_params(N, n_shape, n_expr, rot0, trans0, dtype)
    _optimise(problem, params, cfg, {})
    per_cam, per_frame, uv = problem.residuals(params)
    with torch.no_grad():
        _, _, root_t = flame(params["shape"], params["expression"], torch.zeros(N, 3, dtype=dtype), params["neck"],
                             params["jaw"], params["eyes"], torch.zeros(N, 3, dtype=dtype))
        R = batch_rodrigues(params["rotation"].detach())
        t = params["translation"].detach() + root_t - (R @ root_t[..., None])[..., 0]
    w2c = np.tile(np.eye(4), (N, 1, 1))
    w2c[:, :3, :3], w2c[:, :3, 3] = R.numpy(), t.numpy()
    out = {k: params[k].detach().numpy() for k in ("shape", "expression", "jaw", "neck", "eyes")}
    out["shape"] = _scatter(out["shape"], sc, full_shape)
    out["expression"] = _scatter(out["expression"], ec, full_expr)
    out["rotation"], out["translation"], out["scale"] = np.zeros((N, 3)), np.zeros((N, 3)), np.ones((1, 1))
    converged, message = _judge({**out, "w2c": w2c}, per_frame * norm[:, 0].numpy(), cfg)
    return UncalibratedResult(out, w2c, Ks, sizes, per_frame, converged, message, uv[:, 0])
