"""Batched pinhole cameras (OpenCV convention): the :class:`Cameras` type.

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

The calibration files (NeRSemble ``camera_params.json``, nerfstudio ``transforms.json``) are read and
written by :mod:`avat3r_core.formats.calibration`; numpy geometry lives in :mod:`avat3r_core.geometry`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avat3r_core.errors import FormatError, check_finite, check_size, is_int
from avat3r_core.geometry import RIGID_TOL, rigid_errors

__all__ = ["Cameras"]


_IN_MEMORY = "Cameras"


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
        self.width = check_size(self.width, _IN_MEMORY, "width")
        self.height = check_size(self.height, _IN_MEMORY, "height")
        check_finite(w2c.detach(), _IN_MEMORY, "world_to_cam")
        check_finite(K.detach(), _IN_MEMORY, "K")
        if len(w2c) == 0:
            return
        last_err, ortho_err, det = rigid_errors(w2c)
        for name, bad, msg in (
            ("world_to_cam", last_err > RIGID_TOL, "last row must be [0, 0, 0, 1]"),
            ("world_to_cam", ortho_err > RIGID_TOL, "rotation block is not orthonormal"),
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
        if is_int(index):
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
        w = check_size(w, _IN_MEMORY, "crop.w")
        h = check_size(h, _IN_MEMORY, "crop.h")
        ones = torch.ones(len(self), dtype=self.dtype, device=self.device)
        return self._with_affine(ones, ones, self._per_camera(x0, "x0"), self._per_camera(y0, "y0"), w, h)

    def resize(self, width: int, height: int) -> Cameras:
        """Resize the image to width x height. Continuous coordinates scale by (W'/W, H'/H), so with
        the pixel-centre +0.5 convention ``cx' = cx * W'/W`` exactly."""
        width = check_size(width, _IN_MEMORY, "resize.width")
        height = check_size(height, _IN_MEMORY, "resize.height")
        sx = torch.full((len(self),), width / self.width, dtype=self.dtype, device=self.device)
        sy = torch.full((len(self),), height / self.height, dtype=self.dtype, device=self.device)
        zero = torch.zeros_like(sx)
        return self._with_affine(sx, sy, zero, zero, width, height)

    def crop_resize(self, boxes: Any, size: int | tuple[int, int]) -> Cameras:
        """Crop each camera to its box and resize the crops to one common size.

        ``boxes``: (B, 4) ``(x0, y0, w, h)`` in pixels (may extend beyond the image; w, h > 0 may be
        fractional). ``size``: ``(width, height)`` of the output, or an int for a square.
        """
        if is_int(size):
            size = (int(size), int(size))
        out_w = check_size(size[0], _IN_MEMORY, "crop_resize.size[0]")
        out_h = check_size(size[1], _IN_MEMORY, "crop_resize.size[1]")
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
        n = check_size(n, _IN_MEMORY, "rig_arc.n")
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
