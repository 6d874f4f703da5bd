"""FLAME tracking users already have → ``tracking.parquet`` rows (:data:`TRACKING_SCHEMA`), so a
sequence tracked elsewhere skips the track stage.

* NeRSemble benchmark release, one npz per sequence (FLAME 2023): ``shape`` (1, 300),
  ``expression`` (T, 100), ``rotation`` (T, 3) (and optionally ``rotation_matrices`` (T, 3, 3),
  checked against it), ``translation``, ``jaw``, ``neck`` (T, 3), ``eyes`` (T, 6), ``frames`` (T,),
  ``scale`` (1, 1) — the keys and shapes of ``FlameTracking`` in the public
  ``tobias-kirschstein/nersemble-benchmark`` (``src/nersemble_benchmark/data/benchmark_data.py``).
  Its ``FlameProvider`` (``src/nersemble_benchmark/models/flame.py``) runs FLAME with a zero
  global rotation and no translation and then maps the mesh to the world by
  ``v ↦ scale · R · v + translation`` with ``R = Rotation.from_euler('XYZ', rotation)`` (dreifus'
  ``Pose.from_euler``, scipy's intrinsic XYZ): ``rotation`` is Euler angles about the world
  origin, not FLAME's axis-angle about the root joint. The import converts it to this project's
  convention (``v = scale · LBS(rotation about the root joint J₀) + translation``, as the track
  stage writes): the axis-angle of ``R`` and ``translation + scale · (R J₀ − J₀)``, with J₀ from
  the user's FLAME model for the frame's shape and expression.
* VHAP exports, ``flame_param/<t:05d>.npz`` per timestep (or one npz with all timesteps): ``shape``
  (300,), ``expr`` (1, 100), ``rotation``, ``neck_pose``, ``jaw_pose``, ``translation`` (1, 3),
  ``eyes_pose`` (1, 6); ``static_offset`` is not imported (per-vertex offsets move no joint, so
  not the head frame, and the schema has no column for them). The timestep is the frame.

The head frame of each row (``head_to_world``) comes from the user's FLAME model
(:meth:`FlameLayer.head_to_world`, the same as the track stage). VHAP's ``rotation`` is FLAME's own
global axis-angle and its ``translation`` is added after LBS (its ``FlameHead`` takes them as the
global pose and translation; ``vhap/export_as_nerf_dataset.py`` writes the keys above, the
translation shifted by the sequence's mean with the cameras): imported as they are. Files are read with ``allow_pickle=False``; every missing, misshaped or
inconsistent field is a :class:`FormatError` naming the file and the field.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avat3r_core.errors import FormatError
from avat3r_core.ids import make_id

#: the file's key of each parameter, and its per-frame width (None: any, checked against the model)
NERSEMBLE_FIELDS = {"expression": ("expression", None), "rotation": ("rotation", 3), "translation": ("translation", 3),
                    "jaw": ("jaw", 3), "neck": ("neck", 3), "eyes": ("eyes", 6)}
VHAP_FIELDS = {"expression": ("expr", None), "rotation": ("rotation", 3), "translation": ("translation", 3),
               "jaw": ("jaw_pose", 3), "neck": ("neck_pose", 3), "eyes": ("eyes_pose", 6)}
_TIMESTEP = re.compile(r"^(\d+)\.npz$")


@dataclass
class ImportedTrack:
    """FLAME parameters of T frames, named as :data:`TRACKING_SCHEMA` names them."""

    params: dict[str, np.ndarray]  # (T, n) each: expression, rotation, translation, jaw, neck, eyes
    shape: np.ndarray  # (n_shape,)
    scale: float
    frames: list[int]
    source: str  # backend name in the rows: import:nersemble | import:vhap
    path: str
    #: the rigid transform (rotation as axis-angle, translation, scale) maps the FLAME mesh posed
    #: without global rotation about the world origin (NeRSemble's FlameProvider), not about the
    #: root joint: :func:`tracking_rows` converts it
    about_origin: bool = False


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise FormatError(path, None, "file not found") from None
    except ValueError as exc:  # an object array: pickled Python objects, refused
        raise FormatError(path, None, f"holds pickled objects, refused (loaded with allow_pickle=False): {exc}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FormatError(path, None, f"not a readable .npz ({exc})") from None


def _numeric(value: np.ndarray, path: Path, key: str) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.number):
        raise FormatError(path, key, f"expected numbers, got dtype {value.dtype}")
    value = value.astype(np.float64)
    if not np.isfinite(value).all():
        raise FormatError(path, key, "non-finite values")
    return value


def _per_frame(data: dict, path: Path, fields: dict, frames: int | None) -> dict[str, np.ndarray]:
    """Each field as (T, width); T is the first field's frame count unless given."""
    out = {}
    for name, (key, width) in fields.items():
        if key not in data:
            raise FormatError(path, key, f"missing (a {name} track is required)")
        value = _numeric(data[key], path, key)
        value = value.reshape(1, -1) if value.ndim == 1 else value
        if value.ndim != 2 or (width is not None and value.shape[1] != width):
            raise FormatError(path, key, f"expected (T, {width or 'n'}), got {tuple(data[key].shape)}")
        if frames is None:
            frames = value.shape[0]
        if value.shape[0] != frames:
            raise FormatError(path, key, f"{value.shape[0]} frames, but {fields['expression'][0]} has {frames}")
        out[name] = value
    return out


def read_nersemble_tracking(path: str | Path) -> ImportedTrack:
    """A NeRSemble benchmark FLAME tracking ``.npz`` (fields in the module docstring)."""
    path = Path(path)
    data = _load_npz(path)
    params = _per_frame(data, path, NERSEMBLE_FIELDS, None)
    T = params["expression"].shape[0]
    if "shape" not in data:
        raise FormatError(path, "shape", "missing")
    shape = _numeric(data["shape"], path, "shape")
    if shape.ndim > 2 or (shape.ndim == 2 and shape.shape[0] != 1):
        raise FormatError(path, "shape", f"expected (1, n_shape) shared by the sequence, got {tuple(shape.shape)}")
    scale = 1.0
    if "scale" in data:
        s = _numeric(data["scale"], path, "scale")
        if s.size != 1 or not float(s.reshape(-1)[0]) > 0:
            raise FormatError(path, "scale", f"expected one positive number, got {s.reshape(-1)[:4].tolist()}")
        scale = float(s.reshape(-1)[0])
    from scipy.spatial.transform import Rotation

    euler = Rotation.from_euler("XYZ", params["rotation"])  # see the module docstring
    if "rotation_matrices" in data:
        R = _numeric(data["rotation_matrices"], path, "rotation_matrices")
        if R.shape != (T, 3, 3):
            raise FormatError(path, "rotation_matrices", f"expected ({T}, 3, 3), got {tuple(R.shape)}")
        err = np.abs(euler.as_matrix() - R).max(axis=(1, 2))
        if (err > 1e-4).any():
            t = int(np.argmax(err > 1e-4))
            raise FormatError(path, "rotation_matrices", f"disagrees with rotation (Euler XYZ) at frame index {t} "
                              f"(max difference {err[t]:.3g}): which one is meant?")
    params["rotation"] = euler.as_rotvec()
    frames = list(range(T))
    if "frames" in data:
        f = data["frames"].reshape(-1)
        if f.shape[0] != T or not np.issubdtype(f.dtype, np.integer) or len(set(f.tolist())) != T or (f < 0).any():
            raise FormatError(path, "frames", f"expected {T} distinct frame indices ≥ 0, got {f.dtype} {tuple(f.shape)}")
        frames = [int(x) for x in f]
    return ImportedTrack(params, shape.reshape(-1), scale, frames, "import:nersemble", str(path), about_origin=True)


def read_vhap_tracking(path: str | Path) -> ImportedTrack:
    """VHAP's ``flame_param/`` folder (``<t:05d>.npz`` per timestep) or one npz with all of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if _TIMESTEP.match(p.name)), key=lambda p: int(p.stem))
        if not files:
            raise FormatError(path, None, "no <timestep>.npz files (VHAP flame_param/)")
    else:
        files = [path]
    per_file, shape = [], None
    for file in files:
        data = _load_npz(file)
        per_file.append(_per_frame(data, file, VHAP_FIELDS, None))
        if "shape" not in data:
            raise FormatError(file, "shape", "missing")
        s = _numeric(data["shape"], file, "shape").reshape(-1)
        if shape is None:
            shape = s
        elif s.shape != shape.shape or np.abs(s - shape).max() > 1e-6:
            raise FormatError(file, "shape", f"differs from {files[0].name}'s: one identity per sequence")
    params = {k: np.concatenate([p[k] for p in per_file]) for k in VHAP_FIELDS}
    frames = [int(f.stem) for f in files] if path.is_dir() else list(range(params["expression"].shape[0]))
    return ImportedTrack(params, shape, 1.0, frames, "import:vhap", str(path))


def tracking_rows(track: ImportedTrack, subject: str, sequence: str, flame_model_path: str | Path) -> list[dict]:
    """:data:`TRACKING_SCHEMA` rows of an imported track, head frames from the user's FLAME model.
    No residuals were measured here: ``residual_px`` is NaN and no cameras are listed."""
    import torch

    from avat3r_core.flame import FlameLayer, load_flame_model
    from avat3r_core.tracking import expression_code

    model = load_flame_model(flame_model_path)
    n_shape, n_expr = track.shape.shape[0], track.params["expression"].shape[1]
    if n_shape > model.n_shape_total:
        raise FormatError(track.path, "shape", f"{n_shape} components, but the FLAME model {flame_model_path} "
                          f"has {model.n_shape_total}")
    if n_expr > model.n_expr_total:
        raise FormatError(track.path, "expression", f"{n_expr} components, but the FLAME model {flame_model_path} "
                          f"has {model.n_expr_total}")
    layer = FlameLayer(model, n_shape=n_shape, n_expr=n_expr, dtype=torch.float64)
    p, T = dict(track.params), len(track.frames)
    shapes = np.repeat(track.shape[None], T, 0)
    if track.about_origin:  # R about the origin = R about the root joint J0 + translation (R J0 - J0)
        from avat3r_core.tracking.expression_code import axis_angle_to_matrix

        with torch.no_grad():
            J0 = layer(shape=shapes, expr=p["expression"]).joints[:, 0].numpy()
        R = axis_angle_to_matrix(torch.as_tensor(p["rotation"])).numpy()
        p["translation"] = p["translation"] + track.scale * (np.einsum("tij,tj->ti", R, J0) - J0)
    with torch.no_grad():
        head = layer.head_to_world(shape=shapes, expr=p["expression"],
                                   rotation=p["rotation"], neck=p["neck"], translation=p["translation"],
                                   scale=np.full((T, 1), track.scale)).numpy()
    codes = expression_code.encode(p)
    return [{
        "id": make_id(subject, sequence, frame), "subject": subject, "sequence": sequence, "frame": int(frame),
        "shape": track.shape.tolist(), "expression": p["expression"][t].tolist(), "jaw": p["jaw"][t].tolist(),
        "neck": p["neck"][t].tolist(), "eyes": p["eyes"][t].tolist(), "rotation": p["rotation"][t].tolist(),
        "translation": p["translation"][t].tolist(), "scale": track.scale, "expression_code": codes[t].tolist(),
        "head_to_world": head[t].reshape(-1).tolist(), "residual_px": float("nan"), "camera_residuals_px": [],
        "cameras": [], "backend": track.source, "converged": True,
    } for t, frame in enumerate(track.frames)]


def write_tracking(rows: list[dict], out: str | Path) -> int:
    """Write rows into ``out`` (a ``tracking.parquet``): rows of other (subject, sequence) pairs
    already there (imported, or the track stage's) are kept, those of the imported ones replaced.
    Rows carry the ``item_id`` (``<pid>_<seq>``) the stage runner adds to the track stage's rows.
    Returns the row count."""
    import pyarrow as pa

    from avat3r_core import storage
    from avat3r_core.tracking import TRACKING_SCHEMA

    schema = TRACKING_SCHEMA.append(pa.field("item_id", pa.string()))
    replaced = {(r["subject"], r["sequence"]) for r in rows}
    kept = []
    if storage.exists(str(out)):
        kept = [{k: r.get(k) for k in schema.names} for r in storage.read_parquet(str(out)).to_pylist()
                if (r["subject"], r["sequence"]) not in replaced]
    rows = [{**r, "item_id": make_id(r["subject"], r["sequence"])} for r in rows]
    table = pa.Table.from_pylist(kept + rows, schema=schema)
    storage.write_parquet(table, str(out))
    return table.num_rows
