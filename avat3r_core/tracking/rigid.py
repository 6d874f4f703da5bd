"""Rigid head poses from landmarks, in numpy: weighted DLT triangulation across calibrated
cameras, Kabsch alignment of the neutral template to the triangulated points (with one inlier
re-fit), PnP in one camera where fewer than two views see the face, and the level start of an
uncalibrated fit. :mod:`avat3r_core.tracking.fit` starts its optimisation from these.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["initial_rigid_pose", "kabsch", "level_pose", "pnp_pose", "rotvec", "triangulate"]


def triangulate(points: np.ndarray, weights: np.ndarray, w2c: np.ndarray, K: np.ndarray,
                min_views: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Weighted linear (DLT) triangulation. points (T, C, L, 2), weights (T, C, L), cameras (C, 4, 4),
    (C, 3, 3) -> X (T, L, 3), valid (T, L) (>= ``min_views`` weighted views and in front of them)."""
    P = K @ w2c[:, :3, :]  # (C, 3, 4)
    u, v = points[..., 0], points[..., 1]  # (T, C, L)
    w = np.sqrt(np.clip(weights, 0, None))
    rows1 = w[..., None] * (u[..., None] * P[None, :, None, 2] - P[None, :, None, 0])  # (T, C, L, 4)
    rows2 = w[..., None] * (v[..., None] * P[None, :, None, 2] - P[None, :, None, 1])
    A = np.concatenate([rows1, rows2], 1).transpose(0, 2, 1, 3)  # (T, L, 2C, 4)
    _, _, vh = np.linalg.svd(A)
    Xh = vh[..., -1, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        X = Xh[..., :3] / Xh[..., 3:]
    n_views = (weights > 0).sum(1)
    depth = np.einsum("cij,tlj->tcli", w2c[:, :3, :3], X)[..., 2] + w2c[None, :, 2, 3, None]
    in_front = ((depth > 0) | (weights <= 0)).all(1)
    valid = (n_views >= min_views) & np.isfinite(X).all(-1) & in_front
    return np.where(valid[..., None], X, 0.0), valid


def kabsch(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rigid R, t minimising sum w |R src + t - dst|^2 (src, dst (N, 3))."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    w = w / max(w.sum(), 1e-12)
    ms, md = (w[:, None] * src).sum(0), (w[:, None] * dst).sum(0)
    H = ((src - ms) * w[:, None]).T @ (dst - md)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T)) or 1.0
    R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
    return R, md - R @ ms


def rotvec(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_rotvec()


def pnp_pose(template: np.ndarray, pts: np.ndarray, weights: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Head pose in a camera (X_cam = R X + t) from 2D-3D correspondences; None if it fails."""
    import cv2

    ok_pts = weights > 0
    if ok_pts.sum() < 6:
        return None
    obj = np.ascontiguousarray(template[ok_pts], np.float64)
    img = np.ascontiguousarray(pts[ok_pts], np.float64)
    try:
        ok, rvec, tvec = cv2.solvePnP(obj, img, np.asarray(K, np.float64), None, flags=cv2.SOLVEPNP_EPNP)
        if ok:
            ok, rvec, tvec = cv2.solvePnP(obj, img, np.asarray(K, np.float64), None, rvec, tvec,
                                          useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    except cv2.error:
        return None
    if not ok or not np.isfinite(tvec).all() or tvec[2, 0] <= 0:
        return None
    return cv2.Rodrigues(rvec)[0], tvec[:, 0]


def initial_rigid_pose(template: np.ndarray, root: np.ndarray, points: np.ndarray, weights: np.ndarray,
                       w2c: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame FLAME (rotation, translation) (T, 3) each, from neutral ``template`` landmarks (L, 3)
    and the root joint ``root`` (3,); points/weights (T, C, L, ...), calibrated cameras (C, ...) or
    per frame (T, C, ...)."""
    T = points.shape[0]
    w2c = np.broadcast_to(w2c, (T, *w2c.shape[-3:])) if w2c.ndim == 4 else np.broadcast_to(w2c, (T, *w2c.shape))
    K = np.broadcast_to(K, (T, *K.shape[-3:])) if K.ndim == 4 else np.broadcast_to(K, (T, *K.shape))
    rotations, translations = np.zeros((T, 3)), np.zeros((T, 3))
    for t in range(T):
        X, valid = triangulate(points[t:t + 1], weights[t:t + 1], w2c[t], K[t])
        X, valid = X[0], valid[0]
        R = tr = None
        if valid.sum() >= 4:
            R, tr = kabsch(template[valid], X[valid])
            err = np.linalg.norm(template[valid] @ R.T + tr - X[valid], axis=1)
            inl = err <= max(3 * np.median(err), 1e-3)
            if inl.sum() >= 4:
                R, tr = kabsch(template[valid][inl], X[valid][inl])
        else:  # PnP in the camera that sees most landmarks
            c = int(np.argmax((weights[t] > 0).sum(-1)))
            res = pnp_pose(template, points[t, c], weights[t, c], K[t, c])
            if res is not None:
                Rp, tp = res
                Rc, tc = w2c[t, c, :3, :3], w2c[t, c, :3, 3]
                R, tr = Rc.T @ Rp, Rc.T @ (tp - tc)
        if R is None or not np.isfinite(R).all():
            R, tr = np.eye(3), np.zeros(3)
        # X = R X0 + tr  ==  FLAME: R (X0 - J0) + J0 + translation
        rotations[t] = rotvec(R)
        translations[t] = tr - (np.eye(3) - R) @ root
    return rotations, translations


def level_pose(R: np.ndarray, tr: np.ndarray) -> np.ndarray:
    """The head pose ``X_cam = R X + tr`` turned about a horizontal axis through the head's origin
    (which stays where it is in the camera) until the camera is level with the face: pitch 0, yaw
    kept. The axis is perpendicular to the camera's horizontal direction, not the head's x axis:
    at 70 deg of yaw a turn about x would mostly roll the head and put the camera far off."""
    c = -R.T @ tr  # camera centre in the head's frame
    horizontal = math.hypot(c[0], c[2])
    if horizontal < 1e-9:  # camera straight above or below: no yaw to keep
        return R
    axis = np.array([-c[2], 0.0, c[0]]) / horizontal
    K = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    pitch = math.atan2(c[1], horizontal)
    turns = [np.eye(3) + math.sin(a) * K + (1.0 - math.cos(a)) * (K @ K) for a in (pitch, -pitch)]
    Q = min(turns, key=lambda q: abs((q @ c)[1]))  # the sense that brings the camera down to level
    return R @ Q.T
