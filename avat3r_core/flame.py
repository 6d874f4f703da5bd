"""FLAME: safe loading of the official model file, landmark embeddings, and a batched torch layer.

File layout (``generic_model.pkl`` FLAME 2020, ``flame2023.pkl``)
-----------------------------------------------------------------
A latin-1 pickle (written by Python 2) of a dict:

* ``v_template`` (V, 3) float64, ``f`` (F, 3) faces,
* ``shapedirs`` (V, 3, 400): 300 identity + 100 expression components, usually a chumpy ``Ch``
  object whose pickled state holds the array under ``'x'``,
* ``posedirs`` (V, 3, 36) pose correctives, ``J_regressor`` scipy.sparse (5, V), ``weights`` (V, 5),
  ``kintree_table`` (2, 5) (row 0 = parents; the root's parent is stored as 2**32 - 1), ``J`` (5, 3),
* bookkeeping keys (``bs_style``, ``bs_type``, ...), kept in :attr:`FlameModel.extras` when they are
  plain arrays and ignored otherwise.

Joints, in order: global (root), neck, jaw, left eye, right eye.

Units and axes follow FLAME: metres, y up, z forward (out of the face), x towards the subject's left.

Safety
------
Pickles execute code: the model file and landmark embeddings are read through the restricted
unpickler of :mod:`avat3r_core.flame_pickle` (only numpy, scipy.sparse and chumpy stand-ins, and
weights-only torch tensors, resolve); ``np.load(allow_pickle=True)`` is never called.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.flame_pickle import read_npy_bytes, safe_pickle_load, unwrap

__all__ = [
    "HEAD_JOINT",
    "JOINT_NAMES",
    "FlameModel",
    "FlameOutput",
    "FlameLayer",
    "LandmarkEmbedding",
    "load_flame_model",
    "write_flame_model",
    "load_landmark_embedding",
    "closest_points_on_mesh",
    "write_landmark_embedding",
    "batch_rodrigues",
]

JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
#: How the official files store the root's parent (uint32 -1).
ROOT_PARENT_STORED = 4294967295
N_POSE_FEATURES = 36  # 4 non-root joints x 9


# --------------------------------------------------------------------------- FLAME model file
@dataclass
class FlameModel:
    """Arrays of a FLAME model file (numpy; float64 like the file)."""

    v_template: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3) int64
    shapedirs: np.ndarray  # (V, 3, n_shape_total + n_expr_total)
    posedirs: np.ndarray  # (V, 3, 36)
    J_regressor: sp.csc_matrix  # (5, V)
    weights: np.ndarray  # (V, 5)
    parents: np.ndarray  # (5,) int64, root = -1
    J: np.ndarray  # (5, 3)
    n_shape_total: int = 300
    path: str | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_expr_total(self) -> int:
        return int(self.shapedirs.shape[2]) - self.n_shape_total

    @property
    def kintree_table(self) -> np.ndarray:
        parents = self.parents.astype(np.int64).copy()
        parents[parents < 0] = ROOT_PARENT_STORED
        return np.stack([parents, np.arange(len(parents))]).astype(np.int64)


_REQUIRED = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table")


def _as_array(value: Any, path: Any, key: str, dtype=np.float64) -> np.ndarray:
    try:
        arr = np.asarray(unwrap(value).toarray() if sp.issparse(unwrap(value)) else unwrap(value), dtype=dtype)
    except Exception as exc:
        raise FormatError(path, key, f"cannot read as a {np.dtype(dtype).name} array: {exc}") from exc
    return arr


def _check_shape(arr: np.ndarray, expected: tuple, path: Any, key: str) -> None:
    ok = arr.ndim == len(expected) and all(e is None or a == e for a, e in zip(arr.shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise FormatError(path, key, f"expected shape {want}, got {tuple(arr.shape)}")


def model_from_dict(data: Any, path: str | Path | None = None, n_shape_total: int = 300) -> FlameModel:
    """Validate a FLAME dict (already unpickled) into a :class:`FlameModel`."""
    if not isinstance(data, dict):
        raise FormatError(path, None, f"expected a pickled dict, got {type(data).__name__}")
    for key in _REQUIRED:
        if key not in data:
            raise FormatError(path, key, "missing required key")
    v_template = _as_array(data["v_template"], path, "v_template")
    _check_shape(v_template, (None, 3), path, "v_template")
    V = v_template.shape[0]
    faces = _as_array(data["f"], path, "f", np.int64)
    _check_shape(faces, (None, 3), path, "f")
    if faces.size and (faces.min() < 0 or faces.max() >= V):
        raise FormatError(path, "f", f"face indices outside [0, {V})")
    shapedirs = _as_array(data["shapedirs"], path, "shapedirs")
    _check_shape(shapedirs, (V, 3, None), path, "shapedirs")
    if shapedirs.shape[2] <= n_shape_total:
        raise FormatError(path, "shapedirs", f"needs > {n_shape_total} components (shape + expression), "
                                             f"got {shapedirs.shape[2]}")
    posedirs = _as_array(data["posedirs"], path, "posedirs")
    _check_shape(posedirs, (V, 3, N_POSE_FEATURES), path, "posedirs")
    jreg = unwrap(data["J_regressor"])
    try:
        jreg = sp.csc_matrix(jreg, dtype=np.float64)
    except Exception as exc:
        raise FormatError(path, "J_regressor", f"not a matrix: {exc}") from exc
    if jreg.shape != (5, V):
        raise FormatError(path, "J_regressor", f"expected shape (5, {V}), got {jreg.shape}")
    weights = _as_array(data["weights"], path, "weights")
    _check_shape(weights, (V, 5), path, "weights")
    kintree = _as_array(data["kintree_table"], path, "kintree_table", np.float64)
    _check_shape(kintree, (2, 5), path, "kintree_table")
    parents = kintree[0].astype(np.float64)
    parents = np.where((parents < 0) | (parents >= 5), -1, parents).astype(np.int64)
    if parents[0] != -1 or any(not (0 <= parents[j] < j) for j in range(1, 5)):
        raise FormatError(path, "kintree_table", f"parents {kintree[0].tolist()} are not a tree rooted at joint 0")
    if "J" in data:
        J = _as_array(data["J"], path, "J")
        _check_shape(J, (5, 3), path, "J")
    else:
        J = np.asarray(jreg @ v_template)
    extras = {}
    for key, value in data.items():
        if key in _REQUIRED or key == "J":
            continue
        value = unwrap(value)
        if isinstance(value, np.ndarray) and value.dtype != object:
            extras[key] = value
    for name, arr in (("v_template", v_template), ("shapedirs", shapedirs), ("posedirs", posedirs),
                      ("weights", weights), ("J", J)):
        if not np.isfinite(arr).all():
            raise FormatError(path, name, "contains NaN or Inf")
    return FlameModel(v_template, faces, shapedirs, posedirs, jreg, weights, parents, J,
                      n_shape_total=n_shape_total, path=str(path) if path is not None else None, extras=extras)


def load_flame_model(path: str | Path, n_shape_total: int = 300) -> FlameModel:
    """Read an official FLAME pickle (or one written by :func:`write_flame_model`) safely."""
    path = storage.as_path(path)  # a local path or a URI
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FormatError(path, None, f"cannot read: {exc}") from exc
    data = safe_pickle_load(raw, path)
    return model_from_dict(data, path, n_shape_total=n_shape_total)


def write_flame_model(path: str | Path, model: dict | FlameModel) -> Path:
    """Write the official layout: a protocol-2 pickle of a dict of numpy arrays + csc J_regressor."""
    if isinstance(model, FlameModel):
        d = {"v_template": model.v_template, "f": model.faces, "shapedirs": model.shapedirs,
             "posedirs": model.posedirs, "J_regressor": model.J_regressor, "weights": model.weights,
             "kintree_table": model.kintree_table, "J": model.J, **model.extras}
    else:
        d = dict(model)
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key == "J_regressor":
            out[key] = sp.csc_matrix(value, dtype=np.float64)
        elif key == "f":
            out[key] = np.asarray(value, dtype=np.uint32)
        elif key == "kintree_table":
            kt = np.asarray(value, dtype=np.int64).copy()
            kt[kt < 0] = ROOT_PARENT_STORED
            out[key] = kt.astype(np.int64)
        elif isinstance(value, (np.ndarray, list, tuple)) and not isinstance(value, str):
            arr = np.asarray(value)
            out[key] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
        else:
            out[key] = value
    buffer = io.BytesIO()
    pickle.dump(out, buffer, protocol=2)
    storage.atomic_write_bytes(str(path), buffer.getvalue())  # local file or object store
    return storage.as_path(path)


# --------------------------------------------------------------------------- landmark embeddings
@dataclass
class LandmarkEmbedding:
    """Landmarks as barycentric points on mesh faces."""

    lmk_face_idx: np.ndarray  # (L,) int64
    lmk_b_coords: np.ndarray  # (L, 3) float64
    landmark_indices: np.ndarray | None = None  # (L,) e.g. MediaPipe indices into 478 points
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.lmk_face_idx.shape[0])


def _embedding_dict(path: Path) -> dict:
    raw = path.read_bytes() if path.exists() else None
    if raw is None:
        raise FormatError(path, None, "file does not exist")
    if raw[:6] == b"\x93NUMPY":
        obj = read_npy_bytes(raw, path)
        if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
            obj = obj.item()
    elif raw[:2] == b"PK":
        obj = {}
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                for name in zf.namelist():
                    key = name[:-4] if name.endswith(".npy") else name
                    value = read_npy_bytes(zf.read(name), f"{path}:{name}")
                    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
                        value = value.item()
                    obj[key] = value
        except zipfile.BadZipFile as exc:
            raise FormatError(path, None, f"corrupt .npz: {exc}") from exc
    else:
        obj = safe_pickle_load(raw, path, allow_torch=True)
    if not isinstance(obj, dict):
        raise FormatError(path, None, f"expected a dict of arrays, got {type(obj).__name__}")
    return {k: unwrap(v) for k, v in obj.items()}


def load_landmark_embedding(path: str | Path) -> LandmarkEmbedding:
    """Read ``lmk_face_idx`` (L,) + ``lmk_b_coords`` (L, 3) (+ optional ``landmark_indices``).

    Accepts a pickle, an ``.npy`` holding a dict (object array) or an ``.npz``.
    """
    path = storage.as_path(path)  # a local path or a URI
    d = _embedding_dict(path)
    for key in ("lmk_face_idx", "lmk_b_coords"):
        if key not in d:
            raise FormatError(path, key, "missing required key")
    face_idx = _as_array(d["lmk_face_idx"], path, "lmk_face_idx", np.int64)
    bary = _as_array(d["lmk_b_coords"], path, "lmk_b_coords")
    if face_idx.ndim != 1:
        raise FormatError(path, "lmk_face_idx", f"expected shape (L,), got {face_idx.shape}")
    _check_shape(bary, (face_idx.shape[0], 3), path, "lmk_b_coords")
    indices = None
    if "landmark_indices" in d:
        indices = _as_array(d["landmark_indices"], path, "landmark_indices", np.int64).reshape(-1)
        if indices.shape[0] != face_idx.shape[0]:
            raise FormatError(path, "landmark_indices", f"expected {face_idx.shape[0]} entries, got {indices.shape[0]}")
    extras = {k: np.asarray(v) for k, v in d.items()
              if k not in ("lmk_face_idx", "lmk_b_coords", "landmark_indices") and isinstance(v, np.ndarray)}
    return LandmarkEmbedding(face_idx, bary, indices, extras)


def write_landmark_embedding(path: str | Path, lmk_face_idx: np.ndarray, lmk_b_coords: np.ndarray,
                             landmark_indices: np.ndarray | None = None, **extras: np.ndarray) -> Path:
    """Write an embedding; ``.npz`` -> plain arrays, anything else -> a protocol-2 pickle of a dict."""
    d = {"lmk_face_idx": np.asarray(lmk_face_idx, dtype=np.int64),
         "lmk_b_coords": np.asarray(lmk_b_coords, dtype=np.float64), **{k: np.asarray(v) for k, v in extras.items()}}
    if landmark_indices is not None:
        d["landmark_indices"] = np.asarray(landmark_indices, dtype=np.int64)
    path = storage.as_path(path)
    buffer = io.BytesIO()
    if path.suffix == ".npz":
        np.savez(buffer, **d)
    else:
        pickle.dump(d, buffer, protocol=2)
    storage.atomic_write_bytes(str(path), buffer.getvalue())  # local file or object store
    return path


def closest_points_on_mesh(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                           chunk: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of each query point: ``(face (P,), barycentric (P, 3), distance (P,))``.

    Exact point-to-triangle distance (the Voronoi-region test of Ericson, *Real-Time Collision
    Detection* 5.1.5) against every face, ``chunk`` points at a time; barycentrics are those of the
    closest point itself (non-negative, summing to 1), so the result is a landmark embedding.
    """
    p = np.asarray(points, np.float64)
    tri = np.asarray(vertices, np.float64)[np.asarray(faces, np.int64)]  # (F, 3, 3)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    ab, ac = b - a, c - a
    out_f = np.zeros(len(p), np.int64)
    out_b = np.zeros((len(p), 3))
    out_d = np.zeros(len(p))
    dot = lambda u, v: (u * v).sum(-1)  # noqa: E731
    for s in range(0, len(p), chunk):
        q = p[s:s + chunk, None, :]  # (C, 1, 3)
        ap, bp, cp = q - a, q - b, q - c
        d1, d2, d3, d4, d5, d6 = dot(ab, ap), dot(ac, ap), dot(ab, bp), dot(ac, bp), dot(ab, cp), dot(ac, cp)
        va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
        denom = np.where(np.abs(va + vb + vc) < 1e-30, 1e-30, va + vb + vc)
        v, w = vb / denom, vc / denom  # interior by default
        safe = lambda x: np.where(np.abs(x) < 1e-30, 1e-30, x)  # noqa: E731
        # edges (checked before vertices, which override them)
        e_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
        e_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
        e_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
        t_ab, t_ac = d1 / safe(d1 - d3), d2 / safe(d2 - d6)
        t_bc = (d4 - d3) / safe((d4 - d3) + (d5 - d6))
        v, w = np.where(e_ab, t_ab, v), np.where(e_ab, 0.0, w)
        v, w = np.where(e_ac, 0.0, v), np.where(e_ac, t_ac, w)
        v, w = np.where(e_bc, 1 - t_bc, v), np.where(e_bc, t_bc, w)
        at_a, at_b, at_c = (d1 <= 0) & (d2 <= 0), (d3 >= 0) & (d4 <= d3), (d6 >= 0) & (d5 <= d6)
        v, w = np.where(at_a, 0.0, v), np.where(at_a, 0.0, w)
        v, w = np.where(at_b, 1.0, v), np.where(at_b, 0.0, w)
        v, w = np.where(at_c, 0.0, v), np.where(at_c, 1.0, w)
        closest = a + v[..., None] * ab + w[..., None] * ac  # (C, F, 3)
        dist = np.linalg.norm(closest - q, axis=-1)
        best = dist.argmin(1)
        rows = np.arange(len(best))
        out_f[s:s + chunk] = best
        bw = np.stack([1 - v[rows, best] - w[rows, best], v[rows, best], w[rows, best]], -1)
        out_b[s:s + chunk] = np.clip(bw, 0, 1) / np.clip(bw, 0, 1).sum(-1, keepdims=True)
        out_d[s:s + chunk] = dist[rows, best]
    return out_f, out_b, out_d


# --------------------------------------------------------------------------- torch layer
def batch_rodrigues(rotvec: Tensor, eps: float = 1e-12) -> Tensor:
    """Axis-angle (..., 3) -> rotation matrices (..., 3, 3); differentiable, exact at zero."""
    theta2 = (rotvec * rotvec).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + eps)
    small = theta2 < 1e-8
    # sin(t)/t and (1-cos t)/t^2 with Taylor fallbacks near zero
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / (theta * theta))
    x, y, z = rotvec.unbind(-1)
    zero = torch.zeros_like(x)
    Kx = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*rotvec.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(Kx)
    return eye + a[..., None] * Kx + b[..., None] * (Kx @ Kx)


#: FLAME's joint 1 ("neck"): the head's vertices are skinned to it (see :meth:`FlameLayer.head_to_world`).
HEAD_JOINT = 1


class FlameOutput(NamedTuple):
    vertices: Tensor  # (B, V, 3)
    landmarks: Tensor | None  # (B, L, 3)
    joints: Tensor  # (B, 5, 3) posed joint locations (after global transform)


class FlameLayer(torch.nn.Module):
    """Batched, differentiable FLAME (shape + expression blendshapes, pose correctives, LBS).

    ``forward(shape, expr, rotation, neck, jaw, eyes, translation, scale=None, offsets=None)``:
    every argument is optional (zeros); the batch size comes from the first one given.

    * ``rotation`` (B, 3) global axis-angle about the root joint, ``neck``/``jaw`` (B, 3),
      ``eyes`` (B, 6) = left eye then right eye axis-angle;
    * ``translation`` (B, 3) added last, ``scale`` (B,) or (B, 1) multiplies the posed mesh about
      the world origin before the translation: ``v = scale * LBS(...) + translation``;
    * ``offsets`` (B, V, 3) free canonical per-vertex displacements added after the blendshapes
      and after the joint regression (e.g. hair volume); they do not move the joints.
    """

    def __init__(self, model: FlameModel, n_shape: int = 300, n_expr: int = 100,
                 landmarks: LandmarkEmbedding | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.n_shape = int(min(n_shape, model.n_shape_total))
        self.n_expr = int(min(n_expr, model.n_expr_total))
        S = model.n_shape_total
        dirs = np.concatenate([model.shapedirs[:, :, : self.n_shape],
                               model.shapedirs[:, :, S: S + self.n_expr]], axis=2)
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
        self.register_buffer("v_template", t(model.v_template))
        self.register_buffer("shapedirs", t(dirs))  # (V, 3, n_shape + n_expr)
        self.register_buffer("posedirs", t(model.posedirs.reshape(-1, N_POSE_FEATURES).T))  # (36, V*3)
        self.register_buffer("J_regressor", t(model.J_regressor.toarray()))  # (5, V)
        self.register_buffer("lbs_weights", t(model.weights))
        self.register_buffer("faces", torch.as_tensor(model.faces.astype(np.int64)))
        self.parents = [int(p) for p in model.parents]
        if landmarks is not None:
            self.register_buffer("lmk_faces", torch.as_tensor(model.faces[landmarks.lmk_face_idx].astype(np.int64)))
            self.register_buffer("lmk_bary", t(landmarks.lmk_b_coords))
        else:
            self.lmk_faces = None
            self.lmk_bary = None

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    def _param(self, value: Tensor | None, B: int, dim: int, name: str) -> Tensor:
        if value is None:
            return self.v_template.new_zeros(B, dim)
        value = torch.as_tensor(value, dtype=self.v_template.dtype, device=self.v_template.device)
        if value.ndim == 1:
            value = value[None]
        if value.shape[0] != B:
            raise ValueError(f"{name}: batch {value.shape[0]} != {B}")
        if value.shape[1] > dim:
            raise ValueError(f"{name}: {value.shape[1]} coefficients > {dim} the layer has")
        if value.shape[1] < dim:  # fewer coefficients: the rest are zero
            value = torch.cat([value, value.new_zeros(B, dim - value.shape[1])], 1)
        return value

    def _batch(self, *values) -> int:
        for x in values:
            if x is not None:
                x = torch.as_tensor(x)
                return x.shape[0] if x.ndim >= 2 else 1
        return 1

    def _skinning(self, shape, expr, rotation, neck, jaw, eyes, B: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(v_shaped, rot (B, 5, 3, 3), world transforms G (B, 5, 4, 4), rest joints J (B, 5, 3))."""
        shape = self._param(shape, B, self.n_shape, "shape")
        expr = self._param(expr, B, self.n_expr, "expr")
        pose = torch.cat([self._param(rotation, B, 3, "rotation"), self._param(neck, B, 3, "neck"),
                          self._param(jaw, B, 3, "jaw"), self._param(eyes, B, 6, "eyes")], 1).reshape(B, 5, 3)
        betas = torch.cat([shape, expr], 1)
        v_shaped = self.v_template + torch.einsum("bl,vcl->bvc", betas, self.shapedirs)
        joints = torch.einsum("jv,bvc->bjc", self.J_regressor, v_shaped)
        rot = batch_rodrigues(pose)  # (B, 5, 3, 3)
        # global rigid transforms along the kinematic tree
        rel = joints.clone()
        rel[:, 1:] = joints[:, 1:] - joints[:, self.parents[1:]]
        local = torch.cat([torch.cat([rot, rel[..., None]], -1),
                           rot.new_tensor([0, 0, 0, 1]).expand(B, 5, 1, 4)], -2)  # (B, 5, 4, 4)
        chain = [local[:, 0]]
        for j in range(1, 5):
            chain.append(chain[self.parents[j]] @ local[:, j])
        return v_shaped, rot, torch.stack(chain, 1), joints

    def forward(self, shape=None, expr=None, rotation=None, neck=None, jaw=None, eyes=None,
                translation=None, scale=None, offsets=None) -> FlameOutput:
        B = self._batch(shape, expr, rotation, neck, jaw, eyes, translation, offsets)
        v_shaped, rot, transforms, joints = self._skinning(shape, expr, rotation, neck, jaw, eyes, B)
        if offsets is not None:
            v_shaped = v_shaped + torch.as_tensor(offsets, dtype=v_shaped.dtype, device=v_shaped.device)
        eye = torch.eye(3, dtype=rot.dtype, device=rot.device)
        pose_feature = (rot[:, 1:] - eye).reshape(B, -1)  # (B, 36)
        v_posed = v_shaped + (pose_feature @ self.posedirs).reshape(B, -1, 3)
        posed_joints = transforms[:, :, :3, 3]
        # remove the rest-pose joint location: A_j = G_j * T(-J_j)
        offset = (transforms[:, :, :3, :3] @ joints[..., None])[..., 0]
        A = transforms.clone()
        A[:, :, :3, 3] = transforms[:, :, :3, 3] - offset
        T = torch.einsum("vj,bjmn->bvmn", self.lbs_weights, A)  # (B, V, 4, 4)
        verts = (T[..., :3, :3] @ v_posed[..., None])[..., 0] + T[..., :3, 3]
        if scale is not None:
            s = torch.as_tensor(scale, dtype=verts.dtype, device=verts.device).reshape(-1, 1, 1)
            verts = verts * s
            posed_joints = posed_joints * s
        if translation is not None:
            tr = self._param(translation, B, 3, "translation")[:, None]
            verts = verts + tr
            posed_joints = posed_joints + tr
        landmarks = self.landmarks_from_vertices(verts) if self.lmk_faces is not None else None
        return FlameOutput(verts, landmarks, posed_joints)

    def head_to_world(self, shape=None, expr=None, rotation=None, neck=None, translation=None,
                      scale=None) -> Tensor:
        """The rigid head frame of each pose: (B, 4, 4) head-to-world transforms.

        The head (skull, face, ears: most of FLAME's vertices) is skinned to joint 1 ("neck" in
        FLAME's naming; the global rotation and the neck rotation both turn it), so a point fixed
        to the skull at ``p`` in the unposed model sits at ``s·(A₁ p) + t`` in the world, with
        ``A₁ = G₁·T(−J₁)`` the joint's skinning transform. The frame returned is that map without
        the scale, so it stays rigid (cameras keep their metric intrinsics): its rotation is
        ``R₀R₁`` and its origin is where the unposed model's origin lands. Points of the head
        frame are then the unposed head times the (per-subject) scale, the same at every
        timestep up to expression, jaw and eye motion.
        """
        B = self._batch(shape, expr, rotation, neck, translation)
        _, _, transforms, joints = self._skinning(shape, expr, rotation, neck, None, None, B)
        G = transforms[:, HEAD_JOINT]
        out = G.clone()
        out[:, :3, 3] = G[:, :3, 3] - (G[:, :3, :3] @ joints[:, HEAD_JOINT, :, None])[..., 0]
        if scale is not None:
            out[:, :3, 3] = out[:, :3, 3] * torch.as_tensor(scale, dtype=out.dtype, device=out.device).reshape(-1, 1)
        if translation is not None:
            out[:, :3, 3] = out[:, :3, 3] + self._param(translation, B, 3, "translation")
        return out

    def landmarks_from_vertices(self, vertices: Tensor) -> Tensor:
        """(B, V, 3) -> (B, L, 3) barycentric points of the embedding."""
        tri = vertices[:, self.lmk_faces]  # (B, L, 3, 3)
        return (tri * self.lmk_bary[None, :, :, None]).sum(2)
