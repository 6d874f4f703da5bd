"""Put pairwise DUSt3R point maps into the calibrated world frame of a capture rig.

DUSt3R predicts, for an ordered pair (i, j), view i's and view j's point maps in *view i's camera
frame* up to one unknown scale per pair. Its own global alignment optimises camera poses, focal
lengths, depth maps and pair scales jointly. Here the cameras are calibrated, so we fix them and
solve only what is unknown:

1. **One scale per pair, from parallax against the known baseline.** With the true scale ``s``,
   view j's points ``s·X_ji`` mapped into camera j's frame by the *known* relative pose
   ``(R, t) = world_to_cam_j ∘ cam_to_world_i`` must lie on the rays of the pixels they belong to.
   The component of ``s R X + t`` perpendicular to the pixel ray ``d`` (projector ``P = I − d dᵀ``)
   must vanish, which is linear in ``s``: ``s (P R X) + P t = 0``. We solve it by
   confidence-weighted least squares over all pixels with ``conf_j ≥ conf_threshold``, then a few
   iteratively reweighted (Cauchy) steps so a minority of wrong pixels cannot drag the scale. The
   residual is in world units, so the metric baseline fixes the scale; no other pair is needed,
   so one bad pair cannot corrupt the others. A pair whose constraint is degenerate (zero
   baseline, no valid pixels, non-positive solution) takes the median scale of the valid pairs.

2. **Fusion per view.** Every pair contributes an estimate for both of its views: view i's own map
   ``cam_to_world_i(s·X_ii)`` (weight ``conf_i``) and view j's map ``cam_to_world_i(s·X_ji)``
   (weight ``conf_j``). Per pixel we take the confidence-weighted mean over contributions whose
   confidence reaches ``conf_threshold`` (all contributions, confidence-weighted, where none does).
   With ``snap_to_rays`` (default) we fuse the *depth along the known pixel ray* of the view and
   unproject it, so every fused point projects exactly to its own pixel in the calibrated camera;
   this removes DUSt3R's own (slightly wrong) implied intrinsics from the result. The fused
   confidence is the plain mean of the contributions' DUSt3R confidences (same units as DUSt3R's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from avat3r_core.cameras import Cameras

__all__ = ["align_pairwise_to_world", "similarity_align", "solve_pair_scales"]


def similarity_align(
    src: Tensor, dst: Tensor, weights: Tensor | None = None, with_scale: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted Umeyama: ``(s, R, t)`` minimising ``Σ w ‖dst − (s R src + t)‖²``.

    ``src``, ``dst`` (M, 3); ``weights`` (M,) non-negative or None. ``R`` is a proper rotation
    (det +1, reflections are excluded by the sign correction). Computed in float64 and returned in
    ``src``'s dtype. Used by tests and as a fallback when a sequence has no calibration.
    """
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"expected matching (M, 3) point sets, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.shape[0] < 3:
        raise ValueError("need at least 3 correspondences")
    out_dtype = src.dtype if src.is_floating_point() else torch.float32
    s64, d64 = src.double(), dst.double()
    if weights is None:
        w = torch.ones(src.shape[0], dtype=torch.float64, device=src.device)
    else:
        w = weights.double().reshape(-1)
    if w.shape[0] != src.shape[0] or bool((w < 0).any()):
        raise ValueError("weights must be (M,) and non-negative")
    wsum = w.sum()
    if not wsum > 0:
        raise ValueError("weights sum to zero")
    mu_s = (w[:, None] * s64).sum(0) / wsum
    mu_d = (w[:, None] * d64).sum(0) / wsum
    xs, xd = s64 - mu_s, d64 - mu_d
    cov = (w[:, None, None] * xd[:, :, None] * xs[:, None, :]).sum(0) / wsum  # (3, 3) Σ w xd xsᵀ
    U, S, Vh = torch.linalg.svd(cov)
    D = torch.ones(3, dtype=torch.float64, device=src.device)
    if torch.det(U) * torch.det(Vh) < 0:
        D[2] = -1.0
    R = U @ torch.diag(D) @ Vh
    if with_scale:
        var_s = (w * xs.square().sum(-1)).sum() / wsum
        scale = (S * D).sum() / var_s if var_s > 0 else torch.ones((), dtype=torch.float64)
    else:
        scale = torch.ones((), dtype=torch.float64, device=src.device)
    t = mu_d - scale * (R @ mu_s)
    return scale.to(out_dtype), R.to(out_dtype), t.to(out_dtype)


def _check_inputs(pairs: Any, cameras: Cameras) -> tuple[int, int, int]:
    P, H, W, _ = pairs.pts3d_i.shape
    n = len(cameras)
    if (cameras.width, cameras.height) != (W, H):
        raise ValueError(
            f"cameras are {cameras.width}x{cameras.height} but the point maps are {W}x{H}: give the cameras "
            "at the DUSt3R input resolution (Dust3rTransform.cameras)"
        )
    for i, j in pairs.pairs:
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"pair ({i}, {j}) refers to a view outside the {n} cameras")
    return n, H, W


def _unit_pixel_rays(cameras: Cameras) -> Tensor:
    """(B, H, W, 3) unit camera-frame directions ``K⁻¹ [u, v, 1]`` through pixel centres (float64)."""
    cams = cameras.to(dtype=torch.float64)
    uv1 = torch.cat([cams.pixel_grid(), torch.ones(cams.height, cams.width, 1, dtype=torch.float64)], dim=-1)
    d = torch.einsum("bij,hwj->bhwi", torch.linalg.inv(cams.K), uv1)
    return d / d.norm(dim=-1, keepdim=True)


def solve_pair_scales(
    pairs: Any,
    cameras: Cameras,
    conf_threshold: float = 1.0,
    irls_iterations: int = 5,
) -> Tensor:
    """Per-pair metric scale (P,) from the known relative poses (see the module docstring, step 1)."""
    _check_inputs(pairs, cameras)
    cams = cameras.to(dtype=torch.float64)
    w2c = cams.world_to_cam
    c2w = cams.cam_to_world
    rays = _unit_pixel_rays(cams)
    scales = torch.full((len(pairs.pairs),), float("nan"), dtype=torch.float64)
    for p, (i, j) in enumerate(pairs.pairs):
        T = w2c[j] @ c2w[i]  # frame i → frame j
        R, t = T[:3, :3], T[:3, 3]
        X = pairs.pts3d_j_in_i[p].double().reshape(-1, 3)
        conf = pairs.conf_j[p].double().reshape(-1)
        d = rays[j].reshape(-1, 3)
        RX = X @ R.T
        a = RX - (RX * d).sum(-1, keepdim=True) * d  # P R X
        b = t[None, :] - (t[None, :] * d).sum(-1, keepdim=True) * d  # P t
        valid = (conf >= conf_threshold) & torch.isfinite(a).all(-1)
        if not bool(valid.any()):
            continue
        a, b, w0 = a[valid], b[valid], conf[valid]
        w = w0.clone()
        s = None
        for it in range(max(0, irls_iterations) + 1):
            den = (w * (a * a).sum(-1)).sum()
            if not den > 1e-18 * max(1.0, float(w.sum())):
                s = None
                break
            s = -(w * (a * b).sum(-1)).sum() / den
            if it == irls_iterations:
                break
            err = (s * a + b).norm(dim=-1)
            c = 2.5 * err.median() + 1e-12
            w = w0 / (1.0 + (err / c).square())
        if s is not None and bool(torch.isfinite(s)) and float(s) > 0:
            scales[p] = s
    ok = torch.isfinite(scales)
    if not bool(ok.all()):
        if not bool(ok.any()):
            raise ValueError(
                "no pair gives a usable scale (zero baselines, or no pixel reaches conf_threshold)"
            )
        scales[~ok] = scales[ok].median()
    return scales


def align_pairwise_to_world(
    pairs: Any,
    cameras: Cameras,
    conf_threshold: float = 1.0,
    *,
    snap_to_rays: bool = True,
    use_cross_predictions: bool = True,
    return_scales: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Fuse pairwise DUSt3R predictions into one world-space point map per view.

    ``pairs``: a :class:`~avat3r_core.priors.dust3r_inference.Dust3rPairs` (any object with ``pairs``,
    ``pts3d_i``, ``pts3d_j_in_i``, ``conf_i``, ``conf_j``). ``cameras``: the N calibrated cameras
    at the DUSt3R input resolution (same H x W as the maps). Returns world positions (N, H, W, 3)
    and confidence (N, H, W) in float32 (plus the (P,) pair scales with ``return_scales``). A view
    that appears in no pair gets zeros with confidence 0.
    """
    n, H, W = _check_inputs(pairs, cameras)
    scales = solve_pair_scales(pairs, cameras, conf_threshold)
    cams = cameras.to(dtype=torch.float64)
    w2c = cams.world_to_cam
    c2w = cams.cam_to_world

    # Per view: lists of (world points (H, W, 3), confidence (H, W)).
    contrib: list[list[tuple[Tensor, Tensor]]] = [[] for _ in range(n)]
    for p, (i, j) in enumerate(pairs.pairs):
        s = scales[p]
        Ri, ti = c2w[i, :3, :3], c2w[i, :3, 3]
        Xi = pairs.pts3d_i[p].double() * s
        contrib[i].append((Xi @ Ri.T + ti, pairs.conf_i[p].double()))
        if use_cross_predictions:
            Xj = pairs.pts3d_j_in_i[p].double() * s
            contrib[j].append((Xj @ Ri.T + ti, pairs.conf_j[p].double()))

    world = torch.zeros(n, H, W, 3, dtype=torch.float64)
    conf_out = torch.zeros(n, H, W, dtype=torch.float64)
    rays = _unit_pixel_rays(cams) if snap_to_rays else None
    for v in range(n):
        if not contrib[v]:
            continue
        pts = torch.stack([c[0] for c in contrib[v]])  # (C, H, W, 3)
        conf = torch.stack([c[1] for c in contrib[v]])  # (C, H, W)
        w = torch.where(conf >= conf_threshold, conf, torch.zeros_like(conf))
        none = w.sum(0) <= 0
        w = torch.where(none[None], conf.clamp(min=1e-12), w)
        wsum = w.sum(0)
        if snap_to_rays:
            assert rays is not None
            R, t = w2c[v, :3, :3], w2c[v, :3, 3]
            cam_pts = pts @ R.T + t  # (C, H, W, 3) in view v's frame
            # distance along the unit pixel ray (orthogonal projection onto the ray)
            dist = (cam_pts * rays[v]).sum(-1)
            fused = (w * dist).sum(0) / wsum
            cam = rays[v] * fused[..., None]
            world[v] = (cam - t) @ R  # Rᵀ (x − t)
        else:
            world[v] = (w[..., None] * pts).sum(0) / wsum[..., None]
        conf_out[v] = conf.mean(0)
    out = (world.float(), conf_out.float())
    if return_scales:
        return out[0], out[1], scales.float()
    return out
