"""FLAME loader (restricted unpickling), landmark embeddings and the LBS layer, on tiny fake files."""

from __future__ import annotations

import io
import pickle
import sys
import types

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.transform import Rotation

from avat3r_core.errors import FormatError
from avat3r_core.flame import (FlameLayer, load_flame_model, load_landmark_embedding, write_flame_model,
                               write_landmark_embedding)

V, F = 40, 30


class Ch:  # pretends to be chumpy.ch.Ch while pickling
    def __init__(self, x):
        self.x = x

    def __getstate__(self):
        return {"x": self.x, "_dirty_vars": set()}


Ch.__module__ = "chumpy.ch"
Ch.__qualname__ = Ch.__name__ = "Ch"


def _tiny_dict(rng):
    v = rng.normal(0, 0.05, (V, 3))
    weights = np.zeros((V, 5))
    weights[:, 1] = 1.0
    weights[:10, 1], weights[:10, 2] = 0.0, 1.0  # jaw vertices
    weights[10:13, 1], weights[10:13, 2] = 0.5, 0.5
    weights[13:16, 1], weights[13:16, 3] = 0.0, 1.0
    weights[16:19, 1], weights[16:19, 4] = 0.0, 1.0
    weights[19:22, 1], weights[19:22, 0] = 0.3, 0.7
    jreg = np.zeros((5, V))
    for j, ids in enumerate([range(19, 25), range(20, 30), range(0, 10), range(13, 16), range(16, 19)]):
        jreg[j, list(ids)] = 1.0 / len(ids)
    return {
        "v_template": v, "f": rng.integers(0, V, (F, 3)).astype(np.uint32),
        "shapedirs": Ch(rng.normal(0, 0.01, (V, 3, 400))), "posedirs": rng.normal(0, 0.001, (V, 3, 36)),
        "J_regressor": sp.csc_matrix(jreg), "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "J": jreg @ v, "bs_style": "lbs", "bs_type": "lrotmin",
    }


def _write_pickle(path, d):
    saved = {name: sys.modules.get(name) for name in ("chumpy", "chumpy.ch")}
    pkg, mod = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    mod.Ch = Ch
    pkg.ch = mod
    sys.modules.update({"chumpy": pkg, "chumpy.ch": mod})
    try:
        path.write_bytes(pickle.dumps(d, protocol=2))
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@pytest.fixture()
def tiny(tmp_path):
    rng = np.random.default_rng(0)
    d = _tiny_dict(rng)
    path = tmp_path / "generic_model.pkl"
    _write_pickle(path, d)
    assert b"chumpy.ch" in path.read_bytes()
    return path, d


def test_load_tiny_model(tiny):
    path, d = tiny
    m = load_flame_model(path)
    assert m.parents.tolist() == [-1, 0, 1, 1, 1]
    np.testing.assert_array_equal(m.shapedirs, d["shapedirs"].x)
    assert sp.issparse(m.J_regressor) and m.J_regressor.shape == (5, V)
    assert "bs_style" not in m.extras  # strings are bookkeeping


def _layer(path):
    return FlameLayer(load_flame_model(path), dtype=torch.float64)


def test_zero_params_and_blendshapes(tiny):
    path, d = tiny
    layer = _layer(path)
    out = layer(shape=torch.zeros(1, 300))
    np.testing.assert_allclose(out.vertices[0].numpy(), d["v_template"], atol=1e-12)
    sd = d["shapedirs"].x
    shape = torch.zeros(1, 300, dtype=torch.float64)
    shape[0, 7] = 1.5
    out = layer(shape=shape)
    np.testing.assert_allclose(out.vertices[0].numpy(), d["v_template"] + 1.5 * sd[:, :, 7], atol=1e-12)
    expr = torch.zeros(1, 100, dtype=torch.float64)
    expr[0, 3] = -2.0
    out = layer(expr=expr)
    np.testing.assert_allclose(out.vertices[0].numpy(), d["v_template"] - 2.0 * sd[:, :, 303], atol=1e-12)


def test_jaw_moves_only_jaw_weighted(tiny):
    path, d = tiny
    d = dict(d)
    layer = _layer(path)
    layer.posedirs.zero_()  # isolate skinning from pose correctives
    out = layer(jaw=torch.tensor([[0.3, 0.0, 0.0]], dtype=torch.float64))
    moved = np.linalg.norm(out.vertices[0].numpy() - d["v_template"], axis=1) > 1e-12
    jaw_w = d["weights"][:, 2] > 0
    assert moved[jaw_w].all() and not moved[~jaw_w].any()
    # a jaw-only vertex rotates rigidly about the jaw joint
    R = Rotation.from_rotvec([0.3, 0, 0]).as_matrix()
    Jj = d["J"][2]
    np.testing.assert_allclose(out.vertices[0, 0].numpy(), R @ (d["v_template"][0] - Jj) + Jj, atol=1e-12)


def test_global_rigid(tiny):
    path, d = tiny
    layer = _layer(path)
    rv, tr = np.array([0.2, -0.5, 0.3]), np.array([0.01, -0.02, 0.5])
    out = layer(rotation=torch.tensor(rv[None]), translation=torch.tensor(tr[None]))
    R = Rotation.from_rotvec(rv).as_matrix()
    J0 = d["J"][0]
    expect = (d["v_template"] - J0) @ R.T + J0 + tr
    np.testing.assert_allclose(out.vertices[0].numpy(), expect, atol=1e-12)
    np.testing.assert_allclose(out.joints[0].numpy(), (d["J"] - J0) @ R.T + J0 + tr, atol=1e-12)


def test_head_to_world_carries_skull_points(tiny):
    """Vertices skinned only to the head joint sit at head_to_world · (scale · unposed vertex)."""
    path, d = tiny
    layer = _layer(path)
    layer.posedirs.zero_()  # pose correctives are non-rigid by design
    rng = np.random.default_rng(3)
    B = 3
    shape = torch.tensor(rng.normal(0, 1, (B, 300)))
    expr = torch.tensor(rng.normal(0, 1, (B, 100)))
    rotation, neck = torch.tensor(rng.normal(0, 0.4, (B, 3))), torch.tensor(rng.normal(0, 0.2, (B, 3)))
    translation, scale = torch.tensor(rng.normal(0, 0.1, (B, 3))), torch.tensor([0.9, 1.0, 1.2])
    posed = layer(shape=shape, expr=expr, rotation=rotation, neck=neck, translation=translation, scale=scale).vertices
    rest = layer(shape=shape, expr=expr).vertices
    H = layer.head_to_world(shape=shape, expr=expr, rotation=rotation, neck=neck, translation=translation, scale=scale)
    R = H[:, :3, :3]
    np.testing.assert_allclose((R @ R.transpose(1, 2)).numpy(), np.broadcast_to(np.eye(3), (B, 3, 3)), atol=1e-12)
    skull = d["weights"][:, 1] == 1.0
    mapped = torch.einsum("bij,bvj->bvi", R, scale[:, None, None] * rest) + H[:, None, :3, 3]
    np.testing.assert_allclose(mapped[:, skull].numpy(), posed[:, skull].numpy(), atol=1e-12)
    assert not np.allclose(mapped[:, ~skull].numpy(), posed[:, ~skull].numpy(), atol=1e-6)  # jaw, eyes, lower neck
    # no pose: the head frame is the world
    np.testing.assert_allclose(layer.head_to_world(shape=shape).numpy(), np.broadcast_to(np.eye(4), (B, 4, 4)), atol=1e-12)


def test_landmarks_barycentric_and_grad(tiny, tmp_path):
    path, d = tiny
    idx = np.array([0, 5, 29])
    bc = np.array([[0.2, 0.3, 0.5], [1, 0, 0], [0.1, 0.1, 0.8]])
    emb_path = write_landmark_embedding(tmp_path / "emb.pkl", idx, bc)
    emb = load_landmark_embedding(emb_path)
    layer = FlameLayer(load_flame_model(path), n_shape=20, n_expr=10, landmarks=emb, dtype=torch.float64)
    shape = torch.zeros(2, 20, dtype=torch.float64, requires_grad=True)
    out = layer(shape=shape, jaw=torch.tensor([[0.1, 0, 0], [0.2, 0, 0]], dtype=torch.float64))
    tri = out.vertices.detach().numpy()[:, d["f"][idx].astype(int)]
    np.testing.assert_allclose(out.landmarks.detach().numpy(), (tri * bc[None, :, :, None]).sum(2), atol=1e-12)
    out.landmarks.sum().backward()
    assert shape.grad is not None and torch.isfinite(shape.grad).all()


def test_embedding_formats(tmp_path):
    idx = np.arange(5)
    bc = np.full((5, 3), 1 / 3)
    mp = np.arange(5) * 7
    # npz
    p = write_landmark_embedding(tmp_path / "e.npz", idx, bc, landmark_indices=mp)
    e = load_landmark_embedding(p)
    np.testing.assert_array_equal(e.landmark_indices, mp)
    # .npy holding a dict (object array), with a torch tensor inside like some tracker files
    p = tmp_path / "e.npy"
    np.save(p, {"lmk_face_idx": torch.tensor(idx), "lmk_b_coords": bc}, allow_pickle=True)
    e = load_landmark_embedding(p)
    np.testing.assert_array_equal(e.lmk_face_idx, idx)
    np.testing.assert_allclose(e.lmk_b_coords, bc)
    with pytest.raises(FormatError) as err:
        write_landmark_embedding(tmp_path / "bad.npz", idx, bc[:4])
        load_landmark_embedding(tmp_path / "bad.npz")
    assert err.value.field == "lmk_b_coords"


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch MARKER",))


def test_malicious_pickles_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    payload = pickle.dumps({"v_template": _Evil()}, protocol=2)
    for name, data in (("m.pkl", payload),):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(FormatError, match="refusing to unpickle"):
            load_flame_model(p)
        with pytest.raises(FormatError, match="refusing to unpickle"):
            load_landmark_embedding(p)
    # the same payload inside a .npy object array
    buf = io.BytesIO()
    np.save(buf, np.array([_Evil()], dtype=object), allow_pickle=True)
    (tmp_path / "e.npy").write_bytes(buf.getvalue())
    with pytest.raises(FormatError, match="refusing to unpickle"):
        load_landmark_embedding(tmp_path / "e.npy")
    assert not marker.exists()


def test_missing_and_misshaped_keys(tmp_path):
    rng = np.random.default_rng(1)
    base = _tiny_dict(rng)
    base["shapedirs"] = base["shapedirs"].x
    for key, value in (("posedirs", None), ("weights", np.ones((V, 4))), ("shapedirs", np.ones((V + 1, 3, 400))),
                       ("J_regressor", sp.csc_matrix(np.ones((5, V - 1)))), ("kintree_table", np.zeros((2, 5))),
                       ("f", np.full((F, 3), V))):
        d = dict(base)
        if value is None:
            del d[key]
        else:
            d[key] = value
        p = write_flame_model(tmp_path / f"{key}.pkl", d)
        with pytest.raises(FormatError) as err:
            load_flame_model(p)
        assert err.value.field == key and key in str(err.value)
    with pytest.raises(FormatError):
        (tmp_path / "trunc.pkl").write_bytes(pickle.dumps(base, protocol=2)[:100])
        load_flame_model(tmp_path / "trunc.pkl")


def test_write_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    d = _tiny_dict(rng)
    d["shapedirs"] = d["shapedirs"].x
    p = write_flame_model(tmp_path / "w.pkl", d)
    m = load_flame_model(p)
    np.testing.assert_array_equal(m.v_template, d["v_template"])
    np.testing.assert_array_equal(m.J_regressor.toarray(), d["J_regressor"].toarray())
    assert pickle.loads(p.read_bytes(), encoding="latin1")["kintree_table"][0, 0] == 4294967295
