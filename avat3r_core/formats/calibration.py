"""The camera calibration files we read and write, as :class:`~avat3r_core.cameras.Cameras`.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avat3r_core import storage
from avat3r_core.cameras import Cameras
from avat3r_core.errors import FormatError, check_finite, check_size
from avat3r_core.formats.parsing import read_json
from avat3r_core.geometry import RIGID_TOL

#: Full-resolution NeRSemble frame size as the dataset documents it ("3208x2200"); which side is
#: the width is resolved from the principal point when the caller does not say (see
#: :func:`read_nersemble_calibration`).
NERSEMBLE_FULL_SIZE = (3208, 2200)


#: Flips camera axes between OpenGL/Blender (x right, y up, z back) and OpenCV (x right, y down,
#: z forward). It is its own inverse: ``c2w_cv = c2w_gl @ OPENGL_TO_OPENCV``.
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


# Distortion keys nerfstudio (and COLMAP-derived exporters) write.
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")


_PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")


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
    if np.abs(m[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > RIGID_TOL:
        raise FormatError(path, field, f"last row must be [0, 0, 0, 1], got {m[3].tolist()}")
    r = m[:3, :3]
    err = np.abs(r @ r.T - np.eye(3)).max()
    if err > RIGID_TOL:
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
    width = check_size(width, path, "width")
    height = check_size(height, path, "height")
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


def _intrinsic_value(frame: dict, top: dict, key: str, path: Path, i: int) -> tuple[Any, str]:
    """A per-frame intrinsic value (frame wins over top level) and the field it came from."""
    if key in frame:
        return frame[key], f"frames[{i}].{key}"
    if key in top:
        return top[key], key
    raise FormatError(path, f"frames[{i}].{key}", "missing (neither in the frame nor at top level)")


# Long (~80 lines): field-by-field validation of one file format, in the file's order, each
# check naming its field.
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
                wh.append(check_size(v, path, f))
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
