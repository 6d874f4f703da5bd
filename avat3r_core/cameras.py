"""Batched pinhole cameras (OpenCV convention) and the calibration files we read and write.

Conventions
-----------
* Camera frame: OpenCV, x right, y down, z forward (into the scene).
* ``world_to_cam`` is a (B, 4, 4) rigid world-to-camera transform ``[R | t; 0 0 0 1]``, so a world
  point X maps to ``X_cam = R X + t``; the camera centre is ``-R^T t``.
* ``K`` is a (B, 3, 3) intrinsic matrix ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` mapping camera
  space to *continuous* image coordinates ``(u, v)`` with u along the width (columns) and v along
  the height (rows). Pixel (i, j) (row i, column j) covers ``[j, j+1) x [i, i+1)``; its centre is
  ``(j + 0.5, i + 0.5)``. The image centre is therefore ``(W / 2, H / 2)``.
* One image size (``width`` x ``height``) per batch.

Geometry (``project``, ``unproject``, ``rays``, ``plucker``, ``crop``/``resize``) is plain torch
and differentiable with respect to the points, the poses and the intrinsics.

Files
-----
* NeRSemble ``camera_params.json``: ``{"world_2_cam": {serial: 4x4}, "intrinsics": 3x3}``, OpenCV
  world-to-camera, one intrinsics matrix shared by all cameras (or ``{serial: 3x3}``, one per camera)
  at full resolution; the file holds no image size.
* nerfstudio ``transforms.json``: per frame a camera-to-world ``transform_matrix`` in the
  OpenGL/Blender camera convention (x right, y up, z backward) and pinhole intrinsics
  ``fl_x, fl_y, cx, cy, w, h`` at top level and/or per frame (per frame wins). nerfstudio uses the
  same pixel-centre +0.5 convention, so ``cx``/``cy`` are taken over unchanged.

Every reader raises :class:`~avat3r_core.errors.FormatError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avat3r_core import storage
from avat3r_core.errors import FormatError, check_finite
from avat3r_core.formats.parsing import read_json

__all__ = [
    "Cameras",
    "to_head_frame",
    "NERSEMBLE_FULL_SIZE",
    "read_nersemble_calibration",
    "write_nersemble_calibration",
    "read_transforms_json",
    "write_transforms_json",
    "image_size",
    "OPENGL_TO_OPENCV",
]

#: Full-resolution NeRSemble frame size as the dataset documents it ("3208x2200"); which side is
#: the width is resolved from the principal point when the caller does not say (see
#: :func:`read_nersemble_calibration`).
NERSEMBLE_FULL_SIZE = (3208, 2200)

#: Flips camera axes between OpenGL/Blender (x right, y up, z back) and OpenCV (x right, y down,
#: z forward). It is its own inverse: ``c2w_cv = c2w_gl @ OPENGL_TO_OPENCV``.
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])

_IN_MEMORY = "Cameras"
# Tolerance of the rigidity checks (R R^T = I, last row [0, 0, 0, 1]); loose enough for float32
# data and calibration files written with ~6 significant digits.
_RIGID_TOL = 1e-3
# Distortion keys nerfstudio (and COLMAP-derived exporters) write.
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")
_PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_size(value: Any, path: Any, field: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise FormatError(path, field, f"expected a positive integer, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise FormatError(path, field, f"expected a positive integer, got {value}")
    return int(value)


def _batched_rigid_errors(world_to_cam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-camera (last-row error, orthonormality error, det(R)) of (B, 4, 4) matrices."""
    with torch.no_grad():
        m = world_to_cam.detach().double()
        last = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=m.dtype, device=m.device)
        last_err = (m[:, 3, :] - last).abs().amax(dim=-1)
        r = m[:, :3, :3]
        eye = torch.eye(3, dtype=m.dtype, device=m.device)
        ortho_err = (r @ r.transpose(-1, -2) - eye).abs().amax(dim=(-1, -2))
        # the triple product: elementwise, far cheaper than a batched LU for 3x3 blocks
        det = (torch.linalg.cross(r[:, 0], r[:, 1], dim=-1) * r[:, 2]).sum(-1)
    return last_err, ortho_err, det


def _as_float_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise FormatError(_IN_MEMORY, name, f"not convertible to a float tensor: {exc}") from None


@dataclass(eq=False)
class Cameras:
    """A batch of B pinhole cameras sharing one image size (see the module docstring)."""

    world_to_cam: Tensor  # (B, 4, 4)
    K: Tensor  # (B, 3, 3)
    width: int
    height: int

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.world_to_cam = _as_float_tensor(self.world_to_cam, "world_to_cam")
        self.K = _as_float_tensor(self.K, "K")
        w2c, K = self.world_to_cam, self.K
        if w2c.ndim != 3 or tuple(w2c.shape[1:]) != (4, 4):
            raise FormatError(_IN_MEMORY, "world_to_cam", f"expected shape (B,4,4), got {tuple(w2c.shape)}")
        if K.ndim != 3 or tuple(K.shape[1:]) != (3, 3):
            raise FormatError(_IN_MEMORY, "K", f"expected shape (B,3,3), got {tuple(K.shape)}")
        if len(w2c) != len(K):
            raise FormatError(_IN_MEMORY, "K", f"batch size {len(K)} differs from world_to_cam's {len(w2c)}")
        if not w2c.is_floating_point():
            raise FormatError(_IN_MEMORY, "world_to_cam", f"expected a floating dtype, got {w2c.dtype}")
        if not K.is_floating_point():
            raise FormatError(_IN_MEMORY, "K", f"expected a floating dtype, got {K.dtype}")
        if K.dtype != w2c.dtype or K.device != w2c.device:
            self.K = K = K.to(device=w2c.device, dtype=w2c.dtype)
        self.width = _check_size(self.width, _IN_MEMORY, "width")
        self.height = _check_size(self.height, _IN_MEMORY, "height")
        check_finite(w2c.detach(), _IN_MEMORY, "world_to_cam")
        check_finite(K.detach(), _IN_MEMORY, "K")
        if len(w2c) == 0:
            return
        last_err, ortho_err, det = _batched_rigid_errors(w2c)
        for name, bad, msg in (
            ("world_to_cam", last_err > _RIGID_TOL, "last row must be [0, 0, 0, 1]"),
            ("world_to_cam", ortho_err > _RIGID_TOL, "rotation block is not orthonormal"),
            ("world_to_cam", det <= 0, "rotation block has det <= 0 (a reflection)"),
        ):
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise FormatError(_IN_MEMORY, f"{name}[{i}]", msg)
        with torch.no_grad():
            Kd = K.detach()
            bottom = torch.tensor([0.0, 0.0, 1.0], dtype=Kd.dtype, device=Kd.device)
            bad_bottom = (Kd[:, 2, :] - bottom).abs().amax(-1) > 1e-6
            bad_lower = Kd[:, 1, 0].abs() > 1e-6
            bad_focal = (Kd[:, 0, 0] <= 0) | (Kd[:, 1, 1] <= 0)
        for bad, msg in (
            (bad_bottom, "last row must be [0, 0, 1]"),
            (bad_lower, "K[1,0] must be 0"),
            (bad_focal, "focal lengths fx, fy must be positive"),
        ):
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise FormatError(_IN_MEMORY, f"K[{i}]", msg)

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return self.world_to_cam.shape[0]

    def __repr__(self) -> str:
        return (
            f"Cameras(n={len(self)}, size={self.width}x{self.height}, dtype={self.dtype}, "
            f"device={self.device})"
        )

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Cameras:
        """Select cameras; an int keeps a batch dimension of 1."""
        if _is_int(index):
            i = int(index)
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"camera index {i} out of range for {n} cameras")
            i %= n
            index = slice(i, i + 1)
        elif isinstance(index, Tensor):
            if index.dtype != torch.bool:
                index = index.long().reshape(-1)
            index = index.to(self.device)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.device)
            if index.dtype != torch.bool:
                index = index.long().reshape(-1)
        return Cameras(self.world_to_cam[index], self.K[index], self.width, self.height)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cameras:
        return Cameras(
            self.world_to_cam.to(device=device, dtype=dtype),
            self.K.to(device=device, dtype=dtype),
            self.width,
            self.height,
        )

    @staticmethod
    def cat(cameras: Sequence[Cameras]) -> Cameras:
        """Concatenate batches; image sizes must agree. Device/dtype follow the first batch."""
        cameras = list(cameras)
        if not cameras:
            raise ValueError("Cameras.cat needs at least one batch")
        first = cameras[0]
        for k, c in enumerate(cameras[1:], start=1):
            if (c.width, c.height) != (first.width, first.height):
                raise ValueError(
                    f"Cameras.cat: batch {k} has size {c.width}x{c.height}, "
                    f"batch 0 has {first.width}x{first.height}"
                )
        kw = {"device": first.device, "dtype": first.dtype}
        return Cameras(
            torch.cat([c.world_to_cam.to(**kw) for c in cameras]),
            torch.cat([c.K.to(**kw) for c in cameras]),
            first.width,
            first.height,
        )

    @property
    def device(self) -> torch.device:
        return self.world_to_cam.device

    @property
    def dtype(self) -> torch.dtype:
        return self.world_to_cam.dtype

    # ------------------------------------------------------------------ derived quantities
    @property
    def R(self) -> Tensor:
        """(B, 3, 3) world-to-camera rotation."""
        return self.world_to_cam[:, :3, :3]

    @property
    def t(self) -> Tensor:
        """(B, 3) world-to-camera translation."""
        return self.world_to_cam[:, :3, 3]

    @property
    def cam_to_world(self) -> Tensor:
        """(B, 4, 4) inverse of ``world_to_cam`` (closed form for a rigid transform)."""
        Rt = self.R.transpose(-1, -2)
        c = -(Rt @ self.t.unsqueeze(-1)).squeeze(-1)
        top = torch.cat([Rt, c.unsqueeze(-1)], dim=-1)
        bottom = self.world_to_cam[:, 3:, :].new_tensor([0.0, 0.0, 0.0, 1.0]).expand(len(self), 1, 4)
        return torch.cat([top, bottom], dim=-2)

    @property
    def centers(self) -> Tensor:
        """(B, 3) camera centres in world coordinates."""
        return -(self.R.transpose(-1, -2) @ self.t.unsqueeze(-1)).squeeze(-1)

    @property
    def fx(self) -> Tensor:
        return self.K[:, 0, 0]

    @property
    def fy(self) -> Tensor:
        return self.K[:, 1, 1]

    @property
    def cx(self) -> Tensor:
        return self.K[:, 0, 2]

    @property
    def cy(self) -> Tensor:
        return self.K[:, 1, 2]

    # ------------------------------------------------------------------ projection
    def _batched(self, x: Tensor, last: int, name: str) -> tuple[Tensor, tuple[int, ...]]:
        """Bring ``x`` of shape (N, last) [shared] or (B, *S, last) to (B, M, last)."""
        if x.shape[-1] != last:
            raise ValueError(f"{name}: last dimension must be {last}, got shape {tuple(x.shape)}")
        B = len(self)
        if x.ndim == 2:
            return x.unsqueeze(0).expand(B, -1, -1), (x.shape[0],)
        if x.ndim < 2 or x.shape[0] != B:
            raise ValueError(f"{name}: expected (N,{last}) or ({B},...,{last}), got {tuple(x.shape)}")
        spatial = tuple(x.shape[1:-1])
        return x.reshape(B, -1, last), spatial

    def world_to_camera(self, points: Tensor) -> Tensor:
        """Camera-space coordinates of world points: (N,3) or (B,...,3) → (B,...,3)."""
        p, spatial = self._batched(points.to(self.dtype), 3, "points")
        xc = p @ self.R.transpose(-1, -2) + self.t.unsqueeze(1)
        return xc.reshape(len(self), *spatial, 3)

    def project(self, points: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
        """Project world points.

        ``points``: (N, 3) shared by all cameras or (B, ..., 3) per camera.
        Returns ``uv`` (B, ..., 2) continuous pixel coordinates and ``depth`` (B, ...) = camera-space
        z. Points behind the camera (depth <= 0) get mirrored, meaningless uv: mask them with
        ``depth > 0``. |depth| below ``eps`` is clamped in the division only, so no NaN/Inf appears.
        """
        p, spatial = self._batched(points.to(self.dtype), 3, "points")
        xc = p @ self.R.transpose(-1, -2) + self.t.unsqueeze(1)  # (B, M, 3)
        z = xc[..., 2]
        sign = torch.where(z < 0, -torch.ones_like(z), torch.ones_like(z))
        z_safe = torch.where(z.abs() < eps, sign * eps, z)
        img = xc @ self.K.transpose(-1, -2)  # (B, M, 3); img z == camera z (K's last row [0,0,1])
        uv = img[..., :2] / z_safe.unsqueeze(-1)
        B = len(self)
        return uv.reshape(B, *spatial, 2), z.reshape(B, *spatial)

    def _pixel_to_camera_dirs(self, uv: Tensor) -> Tensor:
        """(B, M, 2) pixel coords → (B, M, 3) camera-space points at z = 1."""
        fx, fy = self.fx[:, None], self.fy[:, None]
        cx, cy, s = self.cx[:, None], self.cy[:, None], self.K[:, 0, 1][:, None]
        y = (uv[..., 1] - cy) / fy
        x = (uv[..., 0] - cx - s * y) / fx
        return torch.stack([x, y, torch.ones_like(x)], dim=-1)

    def unproject(self, uv: Tensor, depth: Tensor) -> Tensor:
        """Inverse of :meth:`project`: pixel coords and camera-space z depth → world points.

        ``uv`` (N, 2) shared or (B, ..., 2); ``depth`` broadcastable to the matching (B, ...) shape
        (e.g. (N,) with shared uv, or (B, ...)). Returns (B, ..., 3).
        """
        uv_b, spatial = self._batched(uv.to(self.dtype), 2, "uv")
        B = len(self)
        depth = depth.to(self.dtype)
        depth = torch.broadcast_to(depth, (B, *spatial)).reshape(B, -1)
        xc = self._pixel_to_camera_dirs(uv_b) * depth.unsqueeze(-1)
        xw = (xc - self.t.unsqueeze(1)) @ self.R  # R^T (xc - t), row-vector form
        return xw.reshape(B, *spatial, 3)

    def pixel_grid(self) -> Tensor:
        """(H, W, 2) pixel centres ``(j + 0.5, i + 0.5)`` as (u, v)."""
        u = torch.arange(self.width, device=self.device, dtype=self.dtype) + 0.5
        v = torch.arange(self.height, device=self.device, dtype=self.dtype) + 0.5
        vv, uu = torch.meshgrid(v, u, indexing="ij")
        return torch.stack([uu, vv], dim=-1)

    def rays(self, uv: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """World-frame rays through pixel centres (or through given ``uv``).

        Without ``uv``: origins and unit directions, each (B, H, W, 3). With ``uv`` (N, 2) shared
        or (B, ..., 2): each (B, ..., 3).
        """
        if uv is None:
            uv = self.pixel_grid().unsqueeze(0).expand(len(self), -1, -1, -1)
        uv_b, spatial = self._batched(uv.to(self.dtype), 2, "uv")
        d_cam = self._pixel_to_camera_dirs(uv_b)
        d = d_cam @ self.R  # rotate to world: R^T d
        d = d / d.norm(dim=-1, keepdim=True)
        B = len(self)
        o = self.centers[:, None, :].expand_as(d)
        return o.reshape(B, *spatial, 3), d.reshape(B, *spatial, 3)

    def plucker(self) -> Tensor:
        """(B, 6, H, W) Plücker ray coordinates per pixel centre.

        Channels 0–2: the unit world direction d; channels 3–5: the moment m = o × d (o = camera
        centre), which is the same for every point on the ray.
        """
        o, d = self.rays()
        m = torch.linalg.cross(o, d, dim=-1)
        return torch.cat([d, m], dim=-1).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ image-space edits
    def _with_affine(self, sx: Tensor, sy: Tensor, ox: Tensor, oy: Tensor, width: int, height: int) -> Cameras:
        """Apply u' = sx (u - ox), v' = sy (v - oy) per camera to the intrinsics."""
        A = torch.zeros(len(self), 3, 3, dtype=self.dtype, device=self.device)
        A[:, 0, 0] = sx
        A[:, 0, 2] = -sx * ox
        A[:, 1, 1] = sy
        A[:, 1, 2] = -sy * oy
        A[:, 2, 2] = 1.0
        return Cameras(self.world_to_cam, A @ self.K, width, height)

    def _per_camera(self, value: Any, name: str) -> Tensor:
        v = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        if v.ndim == 0:
            return v.expand(len(self))
        v = v.reshape(-1)
        if v.numel() != len(self):
            raise ValueError(f"{name}: expected a scalar or {len(self)} values, got {v.numel()}")
        return v

    def crop(self, x0: Any, y0: Any, w: int, h: int) -> Cameras:
        """Crop to the box with top-left corner (x0, y0) (pixels; scalars or per-camera (B,)) and
        size w x h. The box may extend beyond the image. A point projecting to (u, v) projects to
        (u - x0, v - y0) in the crop."""
        w = _check_size(w, _IN_MEMORY, "crop.w")
        h = _check_size(h, _IN_MEMORY, "crop.h")
        ones = torch.ones(len(self), dtype=self.dtype, device=self.device)
        return self._with_affine(ones, ones, self._per_camera(x0, "x0"), self._per_camera(y0, "y0"), w, h)

    def resize(self, width: int, height: int) -> Cameras:
        """Resize the image to width x height. Continuous coordinates scale by (W'/W, H'/H), so with
        the pixel-centre +0.5 convention ``cx' = cx * W'/W`` exactly."""
        width = _check_size(width, _IN_MEMORY, "resize.width")
        height = _check_size(height, _IN_MEMORY, "resize.height")
        sx = torch.full((len(self),), width / self.width, dtype=self.dtype, device=self.device)
        sy = torch.full((len(self),), height / self.height, dtype=self.dtype, device=self.device)
        zero = torch.zeros_like(sx)
        return self._with_affine(sx, sy, zero, zero, width, height)

    def crop_resize(self, boxes: Any, size: int | tuple[int, int]) -> Cameras:
        """Crop each camera to its box and resize the crops to one common size.

        ``boxes``: (B, 4) ``(x0, y0, w, h)`` in pixels (may extend beyond the image; w, h > 0 may be
        fractional). ``size``: ``(width, height)`` of the output, or an int for a square.
        """
        if _is_int(size):
            size = (int(size), int(size))
        out_w = _check_size(size[0], _IN_MEMORY, "crop_resize.size[0]")
        out_h = _check_size(size[1], _IN_MEMORY, "crop_resize.size[1]")
        b = torch.as_tensor(boxes, dtype=self.dtype, device=self.device)
        if b.ndim == 1:
            b = b.expand(len(self), 4)
        if tuple(b.shape) != (len(self), 4):
            raise ValueError(f"boxes: expected shape ({len(self)}, 4) as (x0, y0, w, h), got {tuple(b.shape)}")
        if bool((b[:, 2:] <= 0).any()):
            raise ValueError("boxes: widths and heights must be positive")
        return self._with_affine(out_w / b[:, 2], out_h / b[:, 3], b[:, 0], b[:, 1], out_w, out_h)

    # ------------------------------------------------------------------ builders
    @staticmethod
    def intrinsics_from_fov(fov_deg: Any, width: int, height: int, dtype=torch.float32, device=None) -> Tensor:
        """(3, 3) or (B, 3, 3) K with square pixels, the given *vertical* field of view and the
        principal point at the image centre (W/2, H/2)."""
        fov = torch.as_tensor(fov_deg, dtype=torch.float64)
        if bool(((fov <= 0) | (fov >= 180)).any()):
            raise ValueError(f"fov_deg must lie in (0, 180), got {fov_deg}")
        f = 0.5 * height / torch.tan(torch.deg2rad(fov) / 2)
        K = torch.zeros(*f.shape, 3, 3, dtype=torch.float64)
        K[..., 0, 0] = f
        K[..., 1, 1] = f
        K[..., 0, 2] = width / 2
        K[..., 1, 2] = height / 2
        K[..., 2, 2] = 1.0
        return K.to(dtype=dtype, device=device)

    @classmethod
    def look_at(
        cls,
        eye: Any,
        target: Any,
        up: Any = (0.0, 1.0, 0.0),
        fov_deg: float | None = None,
        K: Any = None,
        width: int = 512,
        height: int = 512,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Cameras:
        """Cameras at ``eye`` (B, 3) looking at ``target`` ((B, 3) or (3,)).

        OpenCV axes: +z points from eye to target, +y (image down) is the component of ``-up``
        orthogonal to the viewing direction, +x = y × z (image right). Give either ``fov_deg``
        (vertical field of view, square pixels, principal point at the image centre) or ``K``
        ((3, 3) or (B, 3, 3)). Differentiable in eye/target when they are tensors.
        """
        eye_t = torch.as_tensor(eye, dtype=dtype, device=device)
        if eye_t.ndim == 1:
            eye_t = eye_t.unsqueeze(0)
        if eye_t.ndim != 2 or eye_t.shape[-1] != 3:
            raise ValueError(f"eye: expected (B, 3), got {tuple(eye_t.shape)}")
        B = eye_t.shape[0]
        tgt = torch.as_tensor(target, dtype=dtype, device=eye_t.device).expand(B, 3)
        up_t = torch.as_tensor(up, dtype=dtype, device=eye_t.device).expand(B, 3)
        z = tgt - eye_t
        zn = z.norm(dim=-1, keepdim=True)
        if bool((zn <= 1e-12).any()):
            raise ValueError("look_at: eye and target coincide")
        z = z / zn
        x = torch.linalg.cross(z, up_t, dim=-1)
        xn = x.norm(dim=-1, keepdim=True)
        if bool((xn <= 1e-6).any()):
            raise ValueError("look_at: viewing direction is parallel to `up`")
        x = x / xn
        y = torch.linalg.cross(z, x, dim=-1)
        R = torch.stack([x, y, z], dim=-2)  # rows are the camera axes in world coordinates
        t = -(R @ eye_t.unsqueeze(-1)).squeeze(-1)
        w2c = torch.cat(
            [torch.cat([R, t.unsqueeze(-1)], dim=-1), eye_t.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(B, 1, 4)],
            dim=-2,
        )
        if (fov_deg is None) == (K is None):
            raise ValueError("look_at: give exactly one of fov_deg and K")
        if K is None:
            Kt = cls.intrinsics_from_fov(fov_deg, width, height, dtype=dtype, device=eye_t.device)
        else:
            Kt = torch.as_tensor(K, dtype=dtype, device=eye_t.device)
        Kt = Kt.expand(B, 3, 3) if Kt.ndim == 2 else Kt
        return cls(w2c, Kt, width, height)

    @classmethod
    def rig_arc(
        cls,
        n: int = 16,
        radius: float = 1.0,
        target: Any = (0.0, 0.0, 0.0),
        yaw_range_deg: tuple[float, float] = (-60.0, 60.0),
        pitch_deg_levels: Sequence[float] = (-12.0, 12.0),
        fov_deg: float = 12.0,
        width: int = 550,
        height: int = 802,
        up: Any = (0.0, 1.0, 0.0),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Cameras:
        """A NeRSemble-like frontal arc of ``n`` cameras, all looking at ``target``.

        World frame: y up, the subject faces +z (FLAME's convention). Cameras sit on a sphere of
        ``radius`` around ``target``, in ``len(pitch_deg_levels)`` rows (positive pitch = above the
        target); the ``n`` cameras are split as evenly as possible over the rows (earlier rows get
        the remainder) and spread evenly over ``yaw_range_deg`` within a row (yaw 0 = straight in
        front, positive yaw towards +x). Row order first, then increasing yaw.
        """
        n = _check_size(n, _IN_MEMORY, "rig_arc.n")
        levels = list(pitch_deg_levels)
        if not levels:
            raise ValueError("rig_arc: pitch_deg_levels must not be empty")
        rows = min(len(levels), n)
        counts = [n // rows + (1 if r < n % rows else 0) for r in range(rows)]
        yaws, pitches = [], []
        lo, hi = yaw_range_deg
        for r, count in enumerate(counts):
            if count == 1:
                yaws.append(0.5 * (lo + hi))
            else:
                yaws += [lo + (hi - lo) * k / (count - 1) for k in range(count)]
            pitches += [levels[r]] * count
        yaw = torch.deg2rad(torch.tensor(yaws, dtype=torch.float64))
        pitch = torch.deg2rad(torch.tensor(pitches, dtype=torch.float64))
        offset = torch.stack(
            [torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), torch.cos(yaw) * torch.cos(pitch)], dim=-1
        )
        tgt = torch.as_tensor(target, dtype=torch.float64)
        eye = tgt + radius * offset
        cams = cls.look_at(eye, tgt, up=up, fov_deg=fov_deg, width=width, height=height, dtype=torch.float64)
        return cams.to(device=device, dtype=dtype)


# ====================================================================== JSON helpers


def _require(obj: Any, key: str, path: Path, field: str) -> Any:
    if not isinstance(obj, dict):
        raise FormatError(path, field, f"expected an object holding {key!r}, got {type(obj).__name__}")
    if key not in obj:
        raise FormatError(path, field, "missing")
    return obj[key]


def _number(value: Any, path: Path, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(path, field, f"expected a number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise FormatError(path, field, f"non-finite value {value!r}")
    return out


def _matrix(value: Any, rows: int, cols: int, path: Path, field: str) -> np.ndarray:
    """A JSON nested list → float64 (rows, cols) array, with messages naming the bad entry."""
    if not isinstance(value, list) or not all(isinstance(r, list) for r in value):
        kind = type(value).__name__
        raise FormatError(path, field, f"expected a {rows}x{cols} matrix (list of lists), got {kind}")
    lengths = {len(r) for r in value}
    if len(lengths) > 1:
        raise FormatError(path, field, f"expected a {rows}x{cols} matrix, got ragged rows of lengths {sorted(lengths)}")
    got = (len(value), lengths.pop() if lengths else 0)
    if got != (rows, cols):
        raise FormatError(path, field, f"expected a {rows}x{cols} matrix, got {got[0]}x{got[1]}")
    out = np.empty((rows, cols), dtype=np.float64)
    for i, row in enumerate(value):
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise FormatError(path, field, f"expected a number at [{i}][{j}], got {type(x).__name__} {x!r}")
            out[i, j] = float(x)
    check_finite(out, path, field)
    return out


def _check_rigid(m: np.ndarray, path: Path, field: str) -> None:
    if np.abs(m[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > _RIGID_TOL:
        raise FormatError(path, field, f"last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    r = m[:3, :3]
    err = np.abs(r @ r.T - np.eye(3)).max()
    if err > _RIGID_TOL:
        raise FormatError(path, field, f"rotation block is not orthonormal (max |R R^T - I| = {err:.3g})")
    if np.linalg.det(r) <= 0:
        raise FormatError(path, field, "rotation block has det <= 0 (a reflection)")


def _check_intrinsics(k: np.ndarray, path: Path, field: str) -> None:
    if np.abs(k[2] - np.array([0.0, 0.0, 1.0])).max() > 1e-6 or abs(k[1, 0]) > 1e-6:
        raise FormatError(path, field, f"expected [[fx, s, cx], [0, fy, cy], [0, 0, 1]], got {k.tolist()}")
    if k[0, 0] <= 0 or k[1, 1] <= 0:
        raise FormatError(path, field, f"focal lengths must be positive, got fx={k[0, 0]}, fy={k[1, 1]}")


def image_size(image: str | Path) -> tuple[int, int]:
    """(width, height) from an image file's header; FormatError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            return im.size
    except FileNotFoundError:
        raise FormatError(image, None, "image file missing") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise FormatError(image, None, f"unreadable image ({exc})") from None


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def not_rigid(transforms: Any) -> np.ndarray:
    """Indices of the entries of ``transforms`` (16 values or a 4x4 each) that are not finite
    rigid transforms, by the rule :class:`Cameras` applies to ``world_to_cam``. Every reader of a
    tracked ``head_to_world`` checks it with this: a bad one would silently move every camera and
    position map of its frame."""
    H = np.asarray(transforms, np.float64).reshape(-1, 4, 4)
    finite = np.isfinite(H).all(axis=(1, 2))
    last_err, ortho_err, det = _batched_rigid_errors(torch.from_numpy(np.where(finite[:, None, None], H, np.eye(4))))
    rigid = finite & (last_err <= _RIGID_TOL).numpy() & (ortho_err <= _RIGID_TOL).numpy() & (det > 0).numpy()
    return np.flatnonzero(~rigid)


def is_rigid(values: Any) -> bool:
    """Whether ``values`` (16 numbers, flat or 4x4) are one finite rigid transform (:func:`not_rigid`)."""
    H = np.asarray(values, np.float64)
    return H.size == 16 and not len(not_rigid(H))


def to_head_frame(points: np.ndarray, head_to_world: np.ndarray) -> np.ndarray:
    """World points (..., 3) in a rigid frame given by its (4, 4) frame-to-world transform (e.g. a
    tracked head frame): ``R^T (p - t)``, in float32 (position maps' working precision)."""
    R, t = head_to_world[:3, :3].astype(np.float32), head_to_world[:3, 3].astype(np.float32)
    return (np.asarray(points, np.float32) - t) @ R


# ====================================================================== NeRSemble


def read_nersemble_calibration(
    path: str | Path,
    width: int | None = None,
    height: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[str], Cameras]:
    """Read a NeRSemble ``camera_params.json``; returns (sorted serials, Cameras).

    ``intrinsics`` is one 3x3 matrix shared by all cameras, or ``{serial: 3x3}`` per camera.

    The file holds no image size. Give ``width``/``height`` of the frames the intrinsics belong to
    (the full-resolution ones; scale the cameras with :meth:`Cameras.resize` for downscaled frames).
    When both are omitted the documented full size 3208x2200 is used, oriented (landscape or
    portrait) so that the principal point lies nearest the image centre.
    """
    path = storage.as_path(path)  # a local path or a URI
    data = read_json(path)
    if not isinstance(data, dict):
        raise FormatError(path, None, f"expected a JSON object, got {type(data).__name__}")
    w2c_map = _require(data, "world_2_cam", path, "world_2_cam")
    if not isinstance(w2c_map, dict):
        kind = type(w2c_map).__name__
        raise FormatError(path, "world_2_cam", f"expected an object {{serial: 4x4}}, got {kind}")
    if not w2c_map:
        raise FormatError(path, "world_2_cam", "no cameras")
    serials = sorted(w2c_map)
    intrinsics = _require(data, "intrinsics", path, "intrinsics")
    if isinstance(intrinsics, dict):  # one matrix per serial (the benchmark release's variant)
        absent = [s for s in serials if s not in intrinsics]
        if absent:
            raise FormatError(path, f"intrinsics.{absent[0]}", f"missing for {len(absent)} camera(s) of world_2_cam: {absent}")
        Ks = [_matrix(intrinsics[s], 3, 3, path, f"intrinsics.{s}") for s in serials]
        for s, k in zip(serials, Ks):
            _check_intrinsics(k, path, f"intrinsics.{s}")
    else:
        K = _matrix(intrinsics, 3, 3, path, "intrinsics")
        _check_intrinsics(K, path, "intrinsics")
        Ks = [K] * len(serials)
    mats = []
    for s in serials:
        field = f"world_2_cam.{s}"
        m = _matrix(w2c_map[s], 4, 4, path, field)
        _check_rigid(m, path, field)
        mats.append(m)
    if width is None and height is None:
        a, b = NERSEMBLE_FULL_SIZE
        cx, cy = np.mean([k[0, 2] for k in Ks]), np.mean([k[1, 2] for k in Ks])
        landscape = abs(cx - a / 2) + abs(cy - b / 2)
        portrait = abs(cx - b / 2) + abs(cy - a / 2)
        width, height = (a, b) if landscape <= portrait else (b, a)
    elif width is None or height is None:
        raise ValueError("read_nersemble_calibration: give both width and height, or neither")
    width = _check_size(width, path, "width")
    height = _check_size(height, path, "height")
    w2c = torch.as_tensor(np.stack(mats)).to(dtype)
    return serials, Cameras(w2c, torch.as_tensor(np.stack(Ks)).to(dtype), width, height)


def write_nersemble_calibration(path: str | Path, serials: Sequence[str], cams: Cameras) -> None:
    """Write ``camera_params.json`` in NeRSemble's layout (image size is not stored).

    The format shares one intrinsics matrix: raises FormatError (field ``intrinsics``) if the
    cameras' K differ (beyond 1e-6 relative).
    """
    path = storage.as_path(path)  # a local path or a URI
    serials = [str(s) for s in serials]
    if len(serials) != len(cams):
        raise ValueError(f"{len(serials)} serials for {len(cams)} cameras")
    if len(set(serials)) != len(serials):
        raise ValueError("serials must be unique")
    if len(cams) == 0:
        raise ValueError("no cameras to write")
    K = cams.K.detach().double().cpu()
    if not torch.allclose(K, K[:1].expand_as(K), rtol=1e-6, atol=1e-9):
        i = int(((K - K[:1]).abs().amax(dim=(1, 2)) > 1e-9).nonzero()[0, 0])
        raise FormatError(
            path, "intrinsics", f"NeRSemble shares one intrinsics matrix, but camera {serials[i]} has a different K"
        )
    w2c = cams.world_to_cam.detach().double().cpu()
    obj = {
        "world_2_cam": {s: w2c[i].tolist() for i, s in enumerate(serials)},
        "intrinsics": K[0].tolist(),
    }
    _write_json(path, obj)


# ====================================================================== nerfstudio transforms.json


def _intrinsic_value(frame: dict, top: dict, key: str, path: Path, i: int) -> tuple[Any, str]:
    """A per-frame intrinsic value (frame wins over top level) and the field it came from."""
    if key in frame:
        return frame[key], f"frames[{i}].{key}"
    if key in top:
        return top[key], key
    raise FormatError(path, f"frames[{i}].{key}", "missing (neither in the frame nor at top level)")


def read_transforms_json(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[list[str], Cameras]:
    """Read a nerfstudio ``transforms.json``; returns (file paths as written, Cameras).

    Poses are converted from OpenGL camera-to-world to OpenCV world-to-camera. All frames must share
    one image size; without ``w``/``h`` (frame or top level) it is read from each frame's image. Nonzero distortion coefficients and non-pinhole camera models are rejected
    (we do not undistort).
    """
    path = storage.as_path(path)  # a local path or a URI
    data = read_json(path)
    if not isinstance(data, dict):
        raise FormatError(path, None, f"expected a JSON object, got {type(data).__name__}")
    model = data.get("camera_model")
    if model is not None and model not in _PINHOLE_MODELS:
        raise FormatError(path, "camera_model", f"unsupported camera model {model!r} (pinhole only)")
    for key in _DISTORTION_KEYS:
        if key in data and _number(data[key], path, key) != 0.0:
            raise FormatError(path, key, f"nonzero distortion {data[key]!r}; undistort the images first")
    frames = _require(data, "frames", path, "frames")
    if not isinstance(frames, list):
        raise FormatError(path, "frames", f"expected a list, got {type(frames).__name__}")
    if not frames:
        raise FormatError(path, "frames", "no frames")
    files: list[str] = []
    w2cs, Ks = [], []
    size: tuple[int, int] | None = None
    size_field = ""
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict):
            raise FormatError(path, f"frames[{i}]", f"expected an object, got {type(frame).__name__}")
        fp = _require(frame, "file_path", path, f"frames[{i}].file_path")
        if not isinstance(fp, str):
            raise FormatError(path, f"frames[{i}].file_path", f"expected a string, got {type(fp).__name__}")
        fmodel = frame.get("camera_model")
        if fmodel is not None and fmodel not in _PINHOLE_MODELS:
            raise FormatError(
                path, f"frames[{i}].camera_model", f"unsupported camera model {fmodel!r} (pinhole only)"
            )
        for key in _DISTORTION_KEYS:
            if key in frame and _number(frame[key], path, f"frames[{i}].{key}") != 0.0:
                raise FormatError(
                    path, f"frames[{i}].{key}", f"nonzero distortion {frame[key]!r}; undistort the images first"
                )
        field = f"frames[{i}].transform_matrix"
        c2w_gl = _matrix(_require(frame, "transform_matrix", path, field), 4, 4, path, field)
        _check_rigid(c2w_gl, path, field)
        c2w_cv = c2w_gl @ OPENGL_TO_OPENCV
        r = c2w_cv[:3, :3]
        w2c = np.eye(4)
        w2c[:3, :3] = r.T
        w2c[:3, 3] = -r.T @ c2w_cv[:3, 3]
        vals = {}
        for key in ("fl_x", "fl_y", "cx", "cy"):
            v, f = _intrinsic_value(frame, data, key, path, i)
            vals[key] = _number(v, path, f)
            if key.startswith("fl") and vals[key] <= 0:
                raise FormatError(path, f, f"focal length must be positive, got {vals[key]}")
        if any(k in frame or k in data for k in ("w", "h")):
            wh = []
            for key in ("w", "h"):
                v, f = _intrinsic_value(frame, data, key, path, i)
                wh.append(_check_size(v, path, f))
        else:  # no size in the file: the image decides (never a placeholder)
            try:
                wh = list(image_size(path.parent / fp))
            except FormatError as exc:
                raise FormatError(path, f"frames[{i}].file_path", f"no w/h in the file and {exc}") from None
        if size is None:
            size, size_field = (wh[0], wh[1]), f"frames[{i}]"
        elif tuple(wh) != size:
            raise FormatError(
                path, f"frames[{i}].w", f"image size {wh[0]}x{wh[1]} differs from {size_field}'s {size[0]}x{size[1]}"
            )
        K = np.array([[vals["fl_x"], 0.0, vals["cx"]], [0.0, vals["fl_y"], vals["cy"]], [0.0, 0.0, 1.0]])
        files.append(fp)
        w2cs.append(w2c)
        Ks.append(K)
    assert size is not None
    cams = Cameras(torch.as_tensor(np.stack(w2cs)).to(dtype), torch.as_tensor(np.stack(Ks)).to(dtype), *size)
    return files, cams


def write_transforms_json(path: str | Path, file_paths: Sequence[str], cams: Cameras) -> None:
    """Write a nerfstudio ``transforms.json`` (``camera_model`` PINHOLE, no distortion).

    Intrinsics go at top level when all cameras share them, otherwise per frame. Raises
    FormatError (field ``K``) for a skewed K, which the format cannot hold.
    """
    path = storage.as_path(path)  # a local path or a URI
    file_paths = [str(p) for p in file_paths]
    if len(file_paths) != len(cams):
        raise ValueError(f"{len(file_paths)} file paths for {len(cams)} cameras")
    K = cams.K.detach().double().cpu()
    if bool((K[:, 0, 1].abs() > 1e-9).any()):
        raise FormatError(path, "K", "transforms.json cannot store a skewed K (K[0,1] != 0)")
    c2w_cv = cams.cam_to_world.detach().double().cpu().numpy()
    c2w_gl = c2w_cv @ OPENGL_TO_OPENCV

    def intr(k: Tensor) -> dict[str, float]:
        return {"fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2])}

    shared = len(cams) > 0 and bool(torch.equal(K, K[:1].expand_as(K)))
    obj: dict[str, Any] = {"camera_model": "PINHOLE", "w": cams.width, "h": cams.height}
    if shared:
        obj.update(intr(K[0]))
    frames = []
    for i, fp in enumerate(file_paths):
        frame: dict[str, Any] = {"file_path": fp, "transform_matrix": c2w_gl[i].tolist()}
        if not shared:
            frame.update(intr(K[i]))
        frames.append(frame)
    obj["frames"] = frames
    _write_json(path, obj)
