"""Priors: position-map sources (ground truth, face-model mesh, DUSt3R) and the stage end to end.

Data: one tiny studio run (1 subject, 1 sequence, 3 frames, 3 cameras, 96 px) extracted to 64 px
crops, shared by the module. DUSt3R runs with *random* weights (a tiny network in the official
checkpoint layout), so only shapes, finiteness, the [0, 1) confidence and world-frame geometry
(points in front of the cameras, on their pixel rays) can be checked, not accuracy.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from avat3r_core.extract import ExtractConfig
from avat3r_core.formats.manifests import PRIORS_SCHEMA, cameras_from_rows
from avat3r_core.priors import sources
from avat3r_core.synthetic.studio import StudioConfig
from stages.extract import run_extract
from stages.priors import PROJECTION_FILE, PriorsConfig, run_priors
from stages.synth import run_synth

S = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("priors")
    raw, gt, model, frames = (str(root / n) for n in ("raw", "gt", "model", "frames"))
    run_synth(StudioConfig(subjects=1, sequences=1, frames=3, cameras=3, resolution=96), raw, gt, model, executor="local")
    run_extract(ExtractConfig(resolution=S), raw, frames, executor="local")
    rows = sorted(pq.read_table(f"{frames}/frames.parquet").to_pylist(), key=lambda r: r["id"])
    return {"root": root, "gt": gt, "model": model, "frames": frames, "manifest": f"{frames}/frames.parquet", "rows": rows}


def _gt_depth(data, row) -> np.ndarray:
    path = f"{data['gt']}/{row['subject']}/sequences/{row['sequence']}/depth/cam_{row['camera']}.npz"
    return np.load(path)["depth"][row["frame"]].astype(np.float64)


def _gt_map(data, row):
    crop = cameras_from_rows([row], torch.float64)
    src = sources.crop_to_source_camera(crop, row["crop_box"], row["source_width"], row["source_height"])
    pos, conf = sources.position_from_ground_truth(_gt_depth(data, row), src, row["crop_box"], crop, S)
    return crop, pos, conf


def _alpha(data, row) -> np.ndarray:
    return cv2.imread(f"{data['frames']}/{row['alpha']}", cv2.IMREAD_GRAYSCALE)


# ---------------------------------------------------------------------------- ground truth


def test_ground_truth_map_reprojects_and_matches_depth(data):
    for row in [r for r in data["rows"] if r["frame"] == 1]:
        crop, pos, conf = _gt_map(data, row)
        assert pos.shape == (S, S, 3) and conf.shape == (S, S) and pos.dtype == torch.float32
        fg = torch.from_numpy(_alpha(data, row) == 255)
        assert fg.sum() > 200 and bool((conf[fg] == 1).all())  # every solid-alpha pixel has depth
        assert set(conf.unique().tolist()) <= {0.0, 1.0}
        uv, z = crop.project(pos.double()[fg][None])
        err = (uv[0] - crop.pixel_grid()[fg]).norm(dim=-1)
        assert float(err.max()) < 0.05
        # independent resampling check: the crop pixel centre mapped through crop_box into the source;
        # the depth must lie within the 2x2 source neighbourhood (careful bilinear or nearest)
        d = _gt_depth(data, row)
        x0, y0, w, h = row["crop_box"]
        jj, ii = np.meshgrid(np.arange(S) + 0.5, np.arange(S) + 0.5)
        us, vs = x0 + jj * w / S - 0.5, y0 + ii * h / S - 0.5
        c0 = np.clip(np.floor(us).astype(int), 0, d.shape[1] - 1)
        r0 = np.clip(np.floor(vs).astype(int), 0, d.shape[0] - 1)
        c1, r1 = np.clip(c0 + 1, 0, d.shape[1] - 1), np.clip(r0 + 1, 0, d.shape[0] - 1)
        nb = np.stack([d[r0, c0], d[r0, c1], d[r1, c0], d[r1, c1]])
        m = fg.numpy()
        zz = z[0].numpy()
        tol = 2e-3  # float16 metres around 1 m: spacing 4.9e-4
        assert np.all(zz >= nb.min(0)[m] - tol) and np.all(zz <= nb.max(0)[m] + tol)


def test_ground_truth_maps_agree_across_cameras(data):
    from scipy.spatial import cKDTree

    rows = [r for r in data["rows"] if r["frame"] == 1]
    maps = {r["camera"]: _gt_map(data, r) for r in rows}
    best = None
    for a in maps:
        for b in maps:
            if a == b:
                continue
            ca, pa_, fa = maps[a]
            cb, pb, fb = maps[b]
            pts = pa_[fa > 0].double()
            uv, z = cb.project(pts[None])
            zb = torch.where(fb > 0, cb.world_to_camera(pb.double()[None])[0][..., 2], torch.zeros(S, S, dtype=torch.float64))
            seen = sources.resample_depth(zb, uv[0])
            overlap = (seen > 0) & ((z[0] - seen).abs() < 0.01)  # visible in B, not occluded
            if best is None or overlap.sum() > best[0]:
                nn, _ = cKDTree(pb[fb > 0].numpy()).query(pts[overlap].numpy())
                best = (int(overlap.sum()), float(np.median(nn)), float((z[0] - seen)[overlap].abs().median()))
    count, nn_median, depth_median = best
    assert count > 300
    assert nn_median < 3e-3  # point-to-nearest-point, incl. the 64 px sampling spacing (~4.7 mm)
    assert depth_median < 2e-3  # point-to-surface along B's rays


# ---------------------------------------------------------------------------- face-model stand-in


def _gt_flame(data, row) -> dict:
    p = np.load(f"{data['gt']}/{row['subject']}/sequences/{row['sequence']}/flame_params.npz")
    t = row["frame"]
    return {k: (p[k][0] if k in ("shape", "scale") else p[k][t])
            for k in ("shape", "expression", "rotation", "neck", "jaw", "eyes", "translation", "scale")}


@pytest.fixture(scope="module")
def flame_layer(data):
    from avat3r_core.flame import FlameLayer, load_flame_model

    return FlameLayer(load_flame_model(f"{data['model']}/head_model.pkl"), dtype=torch.float64).eval()


def test_mesh_map_agrees_with_ground_truth(data, flame_layer):
    for row in [r for r in data["rows"] if r["frame"] == 2]:
        crop, gt_pos, gt_conf = _gt_map(data, row)
        verts = sources.flame_vertices(flame_layer, _gt_flame(data, row))
        pos, conf = sources.position_from_mesh(verts, flame_layer.faces, crop)
        uv, _ = crop.project(pos.double()[conf > 0][None])
        assert float((uv[0] - crop.pixel_grid()[conf > 0]).norm(dim=-1).max()) < 0.05
        both = ((conf > 0) & (gt_conf > 0)).numpy().astype(np.uint8)
        interior = cv2.erode(both, np.ones((5, 5), np.uint8)).astype(bool)
        dist = (pos - gt_pos).norm(dim=-1).numpy()[interior]
        assert interior.sum() > 500
        # the studio renders hair as extra per-vertex offsets that FLAME parameters do not carry,
        # so hair pixels differ by centimetres; the face and skin agree to ~1 mm
        assert np.median(dist) < 3e-3
        assert (dist < 5e-3).mean() > 0.6


# ---------------------------------------------------------------------------- stage


def _load(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _check_manifest(data, out: Path, position_source: str, feature_source: str) -> list[dict]:
    table = pq.read_table(out / "priors.parquet")
    assert table.schema.remove(table.schema.get_field_index("item_id")) == PRIORS_SCHEMA
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == [r["id"] for r in data["rows"]]
    for r in rows:
        assert r["position_source"] == position_source and r["feature_source"] == feature_source
        assert (out / r["position"]).is_file()
        if feature_source != "none":
            assert (out / r["features"]).is_file()
        else:
            assert r["features"] == "" and r["feature_dim"] == 0
    return rows


def test_stage_ground_truth_with_features_and_rerun(data, tmp_path):
    out = tmp_path / "priors"
    cfg = PriorsConfig.preset("tiny", ground_truth_root=data["gt"])
    summary = run_priors(cfg, data["manifest"], str(out), executor="local", show_progress=False)
    assert summary.items_failed == 0 and summary.rows == len(data["rows"])
    rows = _check_manifest(data, out, "ground_truth", "efficientnet_lite0_imagenet")
    f = _load(out / rows[0]["features"])["features"]
    assert f.shape == (112, S // 16, S // 16) and f.dtype == np.float16 and rows[0]["feature_dim"] == 112
    m = _load(out / rows[0]["position"])
    assert m["position"].shape == (S, S, 3) and m["position"].dtype == np.float16 and m["confidence"].dtype == np.float16
    # the stored float16 map is the in-memory one up to float16 rounding
    _, pos, conf = _gt_map(data, data["rows"][0])
    assert np.abs(m["position"].astype(np.float32) - pos.numpy()).max() < 5e-4
    assert np.array_equal(m["confidence"].astype(np.float32), conf.numpy())
    again = run_priors(cfg, data["manifest"], str(out), executor="local", show_progress=False)
    assert again.items_skipped == again.items_total == len(data["rows"]) and again.items_done == 0
    assert again.rows == len(data["rows"])


def test_stage_feature_projection_reduces_bytes(data, tmp_path):
    out = tmp_path / "priors"
    cfg = PriorsConfig.preset("tiny", ground_truth_root=data["gt"], feature_projection_dim=8)
    summary = run_priors(cfg, data["manifest"], str(out), executor="local", show_progress=False)
    assert (out / PROJECTION_FILE).is_file()
    proj = _load(out / PROJECTION_FILE)
    assert proj["matrix"].shape == (112, 8) and proj["mean"].shape == (112,)
    rows = _check_manifest(data, out, "ground_truth", "efficientnet_lite0_imagenet")
    f = _load(out / rows[0]["features"])["features"]
    assert f.shape == (8, S // 16, S // 16) and f.dtype == np.float16 and rows[0]["feature_dim"] == 8
    assert summary.extra["feature_bytes_per_frame"] == f.nbytes < 112 * (S // 16) ** 2 * 2


def test_stage_missing_depth_file_is_an_error_item(data, tmp_path):
    gt = tmp_path / "gt"
    shutil.copytree(data["gt"], gt)
    victim = data["rows"][0]
    missing = gt / victim["subject"] / "sequences" / victim["sequence"] / "depth" / f"cam_{victim['camera']}.npz"
    missing.unlink()
    # and a NaN in one frame of another camera's depth
    other = next(r for r in data["rows"] if r["camera"] != victim["camera"] and r["frame"] == 1)
    corrupt = gt / other["subject"] / "sequences" / other["sequence"] / "depth" / f"cam_{other['camera']}.npz"
    depth = np.load(corrupt)["depth"].copy()
    depth[1, depth.shape[1] // 2, depth.shape[2] // 2] = np.nan
    np.savez_compressed(corrupt, depth=depth)
    out = tmp_path / "priors"
    cfg = PriorsConfig.preset("tiny", ground_truth_root=str(gt), feature_source="none")
    summary = run_priors(cfg, data["manifest"], str(out), executor="local", show_progress=False)
    lost = {r["id"] for r in data["rows"] if r["camera"] == victim["camera"]}
    bad = lost | {other["id"]}
    errors = {e["id"]: e["message"] for e in pq.read_table(out / "priors.errors.parquet").to_pylist()}
    assert set(errors) == bad and summary.items_failed == len(bad)
    assert all(str(missing) in errors[i] for i in lost)
    assert str(corrupt) in errors[other["id"]] and "NaN" in errors[other["id"]]
    done = pq.read_table(out / "priors.parquet").to_pylist()
    assert sorted(r["id"] for r in done) == sorted(r["id"] for r in data["rows"] if r["id"] not in bad)


def test_stage_face_model_from_tracking_manifest(data, tmp_path, flame_layer):
    import pyarrow as pa

    cfg = PriorsConfig.preset("tiny", feature_source="none")
    with pytest.raises(ValueError, match="tracking manifest"):
        run_priors(cfg, data["manifest"], str(tmp_path / "x"), executor="local")
    # a tracking manifest holding the studio's true FLAME parameters (the track stage's columns)
    track_rows = []
    for row in data["rows"]:
        if row["camera"] != data["rows"][0]["camera"]:
            continue
        p = _gt_flame(data, row)
        track_rows.append({"id": row["id"].rsplit("_", 1)[0], "subject": row["subject"], "sequence": row["sequence"],
                           "frame": row["frame"], **{k: np.asarray(v, np.float64).reshape(-1).tolist()
                                                     for k, v in p.items() if k != "scale"},
                           "scale": float(np.asarray(p["scale"]).reshape(-1)[0])})
    tracking = tmp_path / "tracking.parquet"
    pq.write_table(pa.Table.from_pylist(track_rows), tracking)
    out = tmp_path / "priors"
    paths = (f"{data['model']}/head_model.pkl", f"{data['model']}/head_landmark_embedding.pkl")
    summary = run_priors(cfg, data["manifest"], str(out), executor="local", show_progress=False,
                         tracking_manifest=str(tracking), face_model_paths=paths)
    assert summary.items_failed == 0
    rows = _check_manifest(data, out, "face_model", "none")
    row = data["rows"][4]
    got = _load(out / next(r for r in rows if r["id"] == row["id"])["position"])
    verts = sources.flame_vertices(flame_layer, _gt_flame(data, row))
    pos, conf = sources.position_from_mesh(verts, flame_layer.faces, cameras_from_rows([row], torch.float64))
    assert np.array_equal(got["confidence"].astype(np.float32), conf.numpy()) and conf.sum() > 500
    assert np.abs(got["position"].astype(np.float32) - pos.numpy()).max() < 5e-4


TINY_DUST3R = dict(img_size=(64, 64), patch_size=16, enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
                   dec_embed_dim=48, dec_depth=2, dec_num_heads=4, pos_embed="RoPE100",
                   patch_embed_cls="ManyAR_PatchEmbed", head_type="dpt", output_mode="pts3d")


def test_stage_dust3r_random_weights(data, tmp_path):
    """Random weights: shapes, finite values, conf in [0, 1), points in front of and on the rays of
    the crop cameras. Nothing about accuracy can be checked without the real checkpoint."""
    from avat3r_core.priors.dust3r import Dust3rConfig, build_dust3r
    from avat3r_core.priors.dust3r_checkpoint import config_to_model_string

    cfg_net = Dust3rConfig(**TINY_DUST3R)
    torch.manual_seed(0)
    net = build_dust3r(cfg_net).eval()
    ckpt = tmp_path / "tiny_dust3r.pth"
    torch.save({"model": net.state_dict(), "args": argparse.Namespace(model=config_to_model_string(cfg_net))}, ckpt)
    out = tmp_path / "priors"
    cfg = PriorsConfig.preset("tiny", dust3r_checkpoint=str(ckpt), ground_truth_root=data["gt"], feature_source="none")
    summary = run_priors(cfg, data["manifest"], str(out), executor="local", show_progress=False)
    assert summary.items_total == 3  # one item per frame: all views jointly
    rows = _check_manifest(data, out, "dust3r", "none")
    by_id = {r["id"]: r for r in data["rows"]}
    for r in rows:
        m = _load(out / r["position"])
        pos, conf = m["position"].astype(np.float64), m["confidence"].astype(np.float64)
        assert pos.shape == (S, S, 3) and np.isfinite(pos).all() and np.isfinite(conf).all()
        assert conf.min() >= 0 and conf.max() < 1
        assert (conf > 0).mean() > 0.5  # square crops: all pixels predicted (some may fall behind the camera)
        pos = pos[conf > 0]
        crop = cameras_from_rows([by_id[r["id"]]], torch.float64)
        uv, z = crop.project(torch.from_numpy(pos)[None])
        assert bool((z > 0).all())
        # on the pixel rays up to float16 storage: each coordinate is rounded by at most half an
        # ulp (|x| * 2^-11), which moves the projection by at most ~f * |rounding| / z
        err = (uv[0] - crop.pixel_grid()[torch.from_numpy(conf > 0)]).norm(dim=-1).numpy()
        rounding = np.sqrt(3) * np.abs(pos).max(-1) * 2.0**-11
        bound = 2.0 * float(crop.fx[0]) * rounding / z[0].numpy() + 1e-3
        assert np.all(err <= bound)


def test_position_from_dust3r_official_4_3_crop(data):
    """square_ok=False reproduces the official loader's 4:3 crop: the cut rows get confidence 0."""
    from avat3r_core.priors.dust3r import Dust3rConfig, build_dust3r

    torch.manual_seed(0)
    net = build_dust3r(Dust3rConfig(**TINY_DUST3R)).eval()
    rows = [r for r in data["rows"] if r["frame"] == 0]
    images = np.stack([cv2.imread(f"{data['frames']}/{r['image']}")[..., ::-1] for r in rows])
    cams = cameras_from_rows(rows, torch.float64)
    maps = sources.position_from_dust3r(net, images, cams, square_ok=False)
    for (pos, conf), i in zip(maps, range(len(rows))):
        assert pos.shape == (S, S, 3) and bool(torch.isfinite(pos).all())
        covered = (conf > 0).float().mean(1)  # per image row
        # rows cut by the 4:3 crop have no prediction; inside, random weights may still put a few
        # points behind the camera (also confidence 0)
        assert float(covered[: S // 8 - 1].max()) == 0.0 and float(covered[-S // 8 + 1 :].max()) == 0.0
        assert float(covered[S // 8 + 1 : -S // 8 - 1].mean()) > 0.5
        uv, z = cams[i].project(pos.double()[conf > 0][None])
        assert bool((z > 0).all()) and float((uv[0] - cams[i].pixel_grid()[conf > 0]).norm(dim=-1).max()) < 1e-3


def test_auto_source_resolution():
    assert PriorsConfig(dust3r_checkpoint="x.pth", ground_truth_root="gt").resolve().position_source == "dust3r"
    r = PriorsConfig(ground_truth_root="gt").resolve()
    assert (r.position_source, r.feature_source) == ("ground_truth", "efficientnet")
    assert PriorsConfig(sapiens_model="s.pt2", ground_truth_root="gt").resolve().feature_source == "sapiens"
    with pytest.raises(ValueError, match="dust3r_checkpoint"):
        PriorsConfig().resolve()
    with pytest.raises(ValueError, match="never guessed"):
        PriorsConfig(position_source="ground_truth")


class _TinySapiens(torch.nn.Module):
    """The official feature models' calling convention: (B, 3, H, W) → (feat (B, C, H/16, W/16),)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, channels, kernel_size=16, stride=16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.proj(x),)


def test_stage_sapiens_torchscript_with_projection(data, tmp_path):
    import warnings

    torch.manual_seed(0)
    path = tmp_path / "sapiens_0.3b_epoch_1600_torchscript.pt2"  # the name sets size 0.3b → 1024 channels
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated.*")
        torch.jit.script(_TinySapiens(1024).eval()).save(str(path))
    out = tmp_path / "priors"
    cfg = PriorsConfig.preset("tiny", ground_truth_root=data["gt"], sapiens_model=str(path),
                              sapiens_input_size=(128, 128), feature_projection_dim=16)
    summary = run_priors(cfg, data["manifest"], str(out), executor="local", show_progress=False)
    assert summary.items_failed == 0
    rows = _check_manifest(data, out, "ground_truth", "sapiens_0.3b")
    f = _load(out / rows[0]["features"])["features"]
    assert f.shape == (16, 8, 8) and f.dtype == np.float16 and rows[0]["feature_dim"] == 16
    assert _load(out / PROJECTION_FILE)["matrix"].shape == (1024, 16)
    # a rerun with a different k must not silently mix projections
    with pytest.raises(Exception, match="delete it"):
        run_priors(PriorsConfig.preset("tiny", ground_truth_root=data["gt"], sapiens_model=str(path),
                                       sapiens_input_size=(128, 128), feature_projection_dim=8),
                   data["manifest"], str(out), executor="local", show_progress=False)
