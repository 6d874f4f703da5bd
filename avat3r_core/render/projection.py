"""EWA projection of 3D Gaussians to the image planes of a batch of pinhole cameras.

Plain vectorised torch (autograd gives the backward). Conventions follow gsplat 1.5.3's
``fully_fused_projection`` CUDA kernel (non-packed, pinhole, classic mode):

* OpenCV camera: x right, y down, z forward; ``viewmats`` are world-to-camera (C, 4, 4).
* The Jacobian uses the camera-space mean with x/z and y/z clamped to the tan-fov limits widened
  by 30 % (``lim = (W - cx)/fx + 0.3 * tan_fovx`` etc.); the projected mean itself is unclamped.
* ``eps2d`` is added to the diagonal of the 2D covariance; conics are its inverse ``(a, b, c)``.
* A Gaussian is culled (radius 0) when its depth is outside ``[near, far]``, the blurred
  determinant is ``<= 0``, its opacity is below 1/255, or its pixel box misses the image.
* The radius uses the opacity-aware extent ``min(3.33, sqrt(2 log(255 o)))`` times the square root
  of the 2D covariance diagonal, rounded up.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0


class Projected(NamedTuple):
    means2d: Tensor  # (C, N, 2) pixel coordinates
    conics: Tensor  # (C, N, 3) inverse 2D covariance (a, b, c)
    depths: Tensor  # (C, N) camera-space z
    radii: Tensor  # (C, N, 2) int32, 0 where culled (no grad)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """(…, 4) wxyz quaternions (any norm) -> (…, 3, 3) rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def covariance_3d(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariance R S S R^T, (N, 3, 3)."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> Projected:
    rot = viewmats[:, :3, :3]  # (C, 3, 3)
    trans = viewmats[:, :3, 3]  # (C, 3)
    means_c = torch.einsum("cij,nj->cni", rot, means) + trans[:, None, :]  # (C, N, 3)
    cov = covariance_3d(quats, scales)  # (N, 3, 3)
    cov_c = torch.einsum("cij,njk,clk->cnil", rot, cov, rot)  # (C, N, 3, 3)

    x, y, z = means_c.unbind(-1)
    depth_ok = (z >= near_plane) & (z <= far_plane)
    # keep culled entries finite so that zero upstream gradients stay zero (0 * inf = nan)
    zs = torch.where(depth_ok, z, torch.ones_like(z))

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # (C, 1)
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = zs * torch.clamp(x / zs, min=-lim_x_neg, max=lim_x_pos)
    ty = zs * torch.clamp(y / zs, min=-lim_y_neg, max=lim_y_pos)

    zero = torch.zeros_like(zs)
    jac = torch.stack(
        [fx / zs, zero, -fx * tx / (zs * zs), zero, fy / zs, -fy * ty / (zs * zs)], dim=-1
    ).reshape(zs.shape + (2, 3))
    cov2d = jac @ cov_c @ jac.transpose(-1, -2)  # (C, N, 2, 2)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)

    c00 = cov2d[..., 0, 0] + eps2d
    c11 = cov2d[..., 1, 1] + eps2d
    c01 = 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0])
    det = c00 * c11 - c01 * c01
    det_ok = det > 0
    dets = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c11 / dets, -c01 / dets, c00 / dets], dim=-1)

    with torch.no_grad():
        op = opacities.detach().to(means.dtype)
        op_ok = op >= ALPHA_THRESHOLD
        extend = torch.sqrt(2.0 * torch.log(op.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = extend.clamp(max=3.33)[None, :]  # (1, N)
        rx = torch.ceil(extend * torch.sqrt(c00.detach().clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(c11.detach().clamp_min(0)))
        m2 = means2d.detach()
        valid = depth_ok & det_ok & op_ok[None, :] & ((rx > 0) | (ry > 0))
        valid &= (m2[..., 0] + rx > 0) & (m2[..., 0] - rx < width)
        valid &= (m2[..., 1] + ry > 0) & (m2[..., 1] - ry < height)
        valid &= torch.isfinite(m2).all(-1) & torch.isfinite(conics.detach()).all(-1)
        radii = torch.stack([rx, ry], dim=-1)
        radii = torch.where(valid[..., None], radii, torch.zeros_like(radii)).to(torch.int32)

    return Projected(means2d, conics, z, radii)
