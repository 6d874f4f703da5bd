"""Tracking users already have (NeRSemble benchmark npz, VHAP flame_param/) → tracking.parquet rows."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from avat3r_core.flame import FlameLayer, load_flame_model, write_flame_model
from avat3r_core.tracking import TRACKING_SCHEMA

V, T = 40, 3


@pytest.fixture()
def flame_model(tmp_path):
    """A small model in FLAME's layout (300 shape + 100 expression components, 5 joints)."""
    rng = np.random.default_rng(0)
    v = rng.normal(0, 0.05, (V, 3))
    weights = np.zeros((V, 5))
    weights[:, 1] = 1.0
    weights[:10, 1], weights[:10, 2] = 0.0, 1.0
    jreg = np.zeros((5, V))
    for j, ids in enumerate([range(19, 25), range(20, 30), range(0, 10), range(13, 16), range(16, 19)]):
        jreg[j, list(ids)] = 1.0 / len(ids)
    model = {"v_template": v, "f": rng.integers(0, V, (30, 3)).astype(np.uint32),
             "shapedirs": rng.normal(0, 0.01, (V, 3, 400)), "posedirs": rng.normal(0, 0.001, (V, 3, 36)),
             "J_regressor": sp.csc_matrix(jreg), "weights": weights,
             "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64), "J": jreg @ v}
    return write_flame_model(tmp_path / "flame2023.pkl", model)


def nersemble_params(rng):
    """As the NeRSemble benchmark stores them: ``rotation`` Euler XYZ angles, ``rotation_matrices``
    their matrices (nersemble-benchmark ``models/flame.py``: ``Pose.from_euler(rotation, ..., 'XYZ')``)."""
    rotation = rng.normal(0, 0.3, (T, 3))
    return {"shape": rng.normal(0, 1, (1, 300)), "expression": rng.normal(0, 1, (T, 100)), "rotation": rotation,
            "rotation_matrices": Rotation.from_euler("XYZ", rotation).as_matrix(), "translation": rng.normal(0, 0.1, (T, 3)),
            "jaw": rng.normal(0, 0.1, (T, 3)), "neck": rng.normal(0, 0.2, (T, 3)), "eyes": rng.normal(0, 0.1, (T, 6)),
            "frames": np.array([10, 13, 16]), "scale": np.array([[1.1]])}


def import_tracking(*args):
    from pipelines.cli import app

    return CliRunner().invoke(app, ["ingest", "import-tracking", *map(str, args)])


def test_nersemble_benchmark_tracking_becomes_rows(tmp_path, flame_model):
    params = nersemble_params(np.random.default_rng(1))
    np.savez(tmp_path / "tracking.npz", **params)
    out = tmp_path / "tracking" / "tracking.parquet"
    result = import_tracking(tmp_path / "tracking.npz", "--flame-model", flame_model, "--subject", "017",
                             "--sequence", "EXP-1-head", "--out", out)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.schema.names[: len(TRACKING_SCHEMA)] == TRACKING_SCHEMA.names
    rows = table.to_pylist()
    assert [r["frame"] for r in rows] == [10, 13, 16] and [r["id"] for r in rows][0] == "017_EXP-1-head_000010"
    assert {r["backend"] for r in rows} == {"import:nersemble"} and all(r["scale"] == 1.1 for r in rows)
    layer = FlameLayer(load_flame_model(flame_model), dtype=torch.float64)
    for t, row in enumerate(rows):
        np.testing.assert_allclose(row["expression"], params["expression"][t])
        H = np.array(row["head_to_world"]).reshape(4, 4)
        # the head joint hangs below the root: its frame turns by the global then the neck rotation
        R = Rotation.from_euler("XYZ", params["rotation"][t]).as_matrix()
        np.testing.assert_allclose(H[:3, :3], R @ Rotation.from_rotvec(params["neck"][t]).as_matrix(), atol=1e-9)
        np.testing.assert_allclose(H[3], [0, 0, 0, 1])
        assert len(row["expression_code"]) == 135
        # the row's parameters in this project's convention pose the mesh where the benchmark's
        # FlameProvider puts it: FLAME without global rotation, then v -> scale * R v + translation
        pose = dict(shape=params["shape"], expr=params["expression"][[t]], neck=params["neck"][[t]],
                    jaw=params["jaw"][[t]], eyes=params["eyes"][[t]])
        with torch.no_grad():
            theirs = 1.1 * layer(**pose).vertices[0].numpy() @ R.T + params["translation"][t]
            ours = layer(**pose, rotation=[row["rotation"]], translation=[row["translation"]], scale=[row["scale"]])
        np.testing.assert_allclose(ours.vertices[0].numpy(), theirs, atol=1e-9)


def test_vhap_flame_params_become_rows_and_other_sequences_are_kept(tmp_path, flame_model):
    rng = np.random.default_rng(2)
    folder = tmp_path / "export" / "flame_param"
    folder.mkdir(parents=True)
    shape = rng.normal(0, 1, 300)
    for t in range(T):
        np.savez(folder / f"{t:05d}.npz", shape=shape, expr=rng.normal(0, 1, (1, 100)), rotation=rng.normal(0, 0.3, (1, 3)),
                 neck_pose=rng.normal(0, 0.1, (1, 3)), jaw_pose=rng.normal(0, 0.1, (1, 3)), eyes_pose=np.zeros((1, 6)),
                 translation=rng.normal(0, 0.1, (1, 3)), static_offset=np.zeros((1, V, 3)))
    out = tmp_path / "tracking.parquet"
    np.savez(tmp_path / "bench.npz", **nersemble_params(rng))
    assert import_tracking(tmp_path / "bench.npz", "--flame-model", flame_model, "--subject", "017",
                           "--sequence", "EXP-2-eyes", "--out", out).exit_code == 0
    result = import_tracking(folder, "--flame-model", flame_model, "--subject", "017", "--sequence", "EXP-1-head",
                             "--out", out)
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    vhap = [r for r in rows if r["sequence"] == "EXP-1-head"]
    assert [r["frame"] for r in vhap] == [0, 1, 2] and {r["backend"] for r in vhap} == {"import:vhap"}
    assert len([r for r in rows if r["sequence"] == "EXP-2-eyes"]) == T  # kept
    np.testing.assert_allclose(vhap[0]["shape"], shape)
    np.testing.assert_allclose(vhap[2]["translation"], np.load(folder / "00002.npz")["translation"][0])


@pytest.mark.parametrize("fault,field", [
    ("short_jaw", "jaw"), ("wrong_matrices", "rotation_matrices"), ("missing_neck", "neck"),
    ("pickled", "pickled objects"), ("too_many_expressions", "expression"),
])
def test_tracking_faults_are_named(tmp_path, flame_model, fault, field):
    # a long path, longer than the console is wide: the message must still name the file in one
    # piece (a user copies it from there, a log is grepped for it)
    folder = tmp_path / ("capture-of-person-017-recorded-on-a-long-named-day-" * 3)
    folder.mkdir()
    params = nersemble_params(np.random.default_rng(3))
    if fault == "short_jaw":
        params["jaw"] = params["jaw"][:2]
    elif fault == "wrong_matrices":
        params["rotation_matrices"] = params["rotation_matrices"][::-1].copy()
    elif fault == "missing_neck":
        del params["neck"]
    elif fault == "pickled":
        params["frames"] = np.array([{"frame": 1}] * T, dtype=object)
    elif fault == "too_many_expressions":
        params["expression"] = np.zeros((T, 120))
    np.savez(folder / "tracking.npz", **params)
    result = import_tracking(folder / "tracking.npz", "--flame-model", flame_model, "--subject", "017",
                             "--sequence", "EXP-1-head", "--out", tmp_path / "t.parquet")
    assert result.exit_code == 3, result.output
    assert str(folder / "tracking.npz") in result.output and field in result.output, result.output
    assert not (tmp_path / "t.parquet").exists()
