"""Tracking: expression code, landmark backends, the FLAME fitter (measured on a studio run), the stage."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding
from avat3r_core.tracking import TRACKING_SCHEMA, expression_code
from avat3r_core.tracking.fit import (FitConfig, SubsetFlame, fit_uncalibrated,
                                      flame_params_to_full)
from avat3r_core.tracking.landmarks import (FileLandmarks, GroundTruthLandmarks, MediaPipeLandmarks,
                                            crop_points, mediapipe_available)

# the measured configuration: 256 px high, 1 subject, 1 sequence, 8 frames, 12 cameras
STUDIO = dict(subjects=1, sequences=1, frames=8, cameras=12, resolution=256, background_frames=1)
SEQ = "EXP-1-head"


# --------------------------------------------------------------------------- fixtures
def _frames_manifest(raw: Path, out: Path, config) -> Path:
    """A frames.parquet built from the studio's videos: crop = the full frame, camera = calibration."""
    from PIL import Image

    from avat3r_core.formats.calibration import read_nersemble_calibration
    from avat3r_core.formats.manifests import FRAMES_SCHEMA, cameras_to_columns
    from avat3r_core.ids import make_id
    from avat3r_core.video import read_frames

    serials, cams = read_nersemble_calibration(raw / "001/calibration/camera_params.json", width=config.width,
                                               height=config.height, dtype=torch.float64)
    cols = cameras_to_columns(cams)
    rows = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for c, serial in enumerate(serials):
        colour = list(read_frames(raw / f"001/sequences/{SEQ}/images/cam_{serial}.mp4"))
        alpha = list(read_frames(raw / f"001/sequences/{SEQ}/alpha/cam_{serial}.mp4", gray=True))
        for t, (img, a) in enumerate(zip(colour, alpha)):
            rid = make_id("001", SEQ, t, serial)
            Image.fromarray(img).save(out / "images" / f"{rid}.png")
            Image.fromarray(a).save(out / "images" / f"{rid}_alpha.png")
            rows.append(dict(id=rid, subject="001", sequence=SEQ, frame=t, camera=serial, image=f"images/{rid}.png",
                             alpha=f"images/{rid}_alpha.png", width=config.width, height=config.height,
                             world_to_cam=cols["world_to_cam"][c], K=cols["K"][c],
                             crop_box=[0.0, 0.0, float(config.width), float(config.height)],
                             source_width=config.width, source_height=config.height, alpha_source="alpha_video",
                             color_corrected=False))
    path = out / "frames.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=FRAMES_SCHEMA), path)
    return path


@pytest.fixture(scope="module")
def studio_run(tmp_path_factory):
    from avat3r_core.synthetic.studio import StudioConfig, face_model_paths
    from stages.synth import run_synth

    root = tmp_path_factory.mktemp("track")
    config = StudioConfig(**STUDIO)
    run_synth(config, str(root / "raw"), str(root / "gt"), str(root / "model"), executor="local")
    manifest = _frames_manifest(root / "raw", root / "frames", config)
    return dict(root=root, config=config, manifest=manifest, gt=root / "gt", model=face_model_paths(str(root / "model")))


@pytest.fixture(scope="module")
def head(studio_run):
    model_path, emb_path = studio_run["model"]
    model = load_flame_model(model_path)
    return model, FlameLayer(model, landmarks=load_landmark_embedding(emb_path), dtype=torch.float64)


# --------------------------------------------------------------------------- expression code
def test_expression_code_layout_and_round_trip():
    rng = np.random.default_rng(0)
    T = 7
    rot = rng.normal(0, 0.8, (T, 3))
    rot[0] = 0.0  # identity
    rot[1] = np.array([0.0, 0.0, np.pi - 1e-4])  # near pi
    rot[2] = np.array([1e-9, 0.0, 0.0])  # tiny
    params = {"expression": rng.normal(size=(T, 100)), "eyes": rng.normal(0, 0.3, (T, 6)), "neck": rng.normal(0, 0.2, (T, 3)),
              "jaw": rng.normal(0, 0.2, (T, 3)), "rotation": rot, "translation": rng.normal(0, 0.1, (T, 3))}
    code = expression_code.encode(params)
    assert code.shape == (T, expression_code.DIM) == (T, 135)
    assert np.allclose(code[:, expression_code.EXPR], params["expression"])
    assert np.all(code[:, expression_code.EYELIDS] == 0)  # no eyelid blendshapes: zeros
    assert np.allclose(code[:, expression_code.HEAD_TRANS], params["translation"])
    sizes = [s.stop - s.start for s in (expression_code.EXPR, expression_code.EYES, expression_code.EYELIDS,
                                          expression_code.NECK, expression_code.JAW, expression_code.HEAD_POSE)]
    assert sizes == [100, 12, 2, 6, 6, 9]
    back = expression_code.decode(code)
    for key in ("expression", "eyes", "neck", "jaw", "rotation", "translation"):
        assert np.allclose(back[key], params[key], atol=1e-7), key
    # identity rotation encodes to the first two columns of I
    assert np.allclose(code[0, expression_code.HEAD_ROT], [1, 0, 0, 0, 1, 0])
    # eyelids pass through when given
    lids = expression_code.encode({**params, "eyelids": np.full((T, 2), 0.5)})
    assert np.allclose(expression_code.decode(lids)["eyelids"], 0.5)


# --------------------------------------------------------------------------- landmark backends
def test_crop_mapping_and_file_backend(tmp_path):
    pts = np.array([[100.0, 50.0], [300.0, 250.0]])
    out = crop_points(pts, [100.0, 50.0, 200.0, 200.0], 512, 512)
    assert np.allclose(out, [[0, 0], [512, 512]])

    T, C, L = 3, 2, 68
    rng = np.random.default_rng(1)
    lm = rng.uniform(50, 150, (T, C, L, 2))
    vis = rng.uniform(size=(T, C, L)) > 0.3
    (tmp_path / "007").mkdir()
    np.savez(tmp_path / "007" / "SEQ-A.npz", landmarks=lm, visible=vis, serials=np.array(["a", "b"]),
             frames=np.array([10, 11, 12]))
    det = FileLandmarks(str(tmp_path))
    assert not det.needs_images
    rows = [dict(subject="007", sequence="SEQ-A", frame=11, camera="b", crop_box=[40.0, 40.0, 120.0, 120.0],
                 width=240, height=240),
            dict(subject="007", sequence="SEQ-A", frame=99, camera="a", crop_box=[0.0, 0.0, 200.0, 200.0],
                 width=200, height=200)]
    d = det.detect(None, rows)
    assert d.points.shape == (2, L, 2)
    assert np.allclose(d.points[0], (lm[1, 1] - 40) * 2, atol=1e-4)
    assert np.array_equal(d.confidence[0] > 0, vis[1, 1])
    assert d.found.tolist() == [True, False]  # frame 99 does not exist: nothing found
    with pytest.raises(ValueError):
        det.detect(None)
    with pytest.raises(ValueError, match="never guessed"):
        GroundTruthLandmarks("")
    bad = tmp_path / "008"
    bad.mkdir()
    np.savez(bad / "S.npz", landmarks=np.zeros((2, 2, 68)), serials=np.array(["a", "b"]))
    from avat3r_core.errors import FormatError

    with pytest.raises(FormatError, match="landmarks"):
        FileLandmarks(str(tmp_path)).detect(None, [dict(subject="008", sequence="S", frame=0, camera="a",
                                                           crop_box=[0, 0, 1, 1], width=1, height=1)])


def test_ground_truth_backend_matches_projection(studio_run, head):
    gt = np.load(studio_run["gt"] / "001" / "sequences" / SEQ / "landmarks2d.npz")
    rows = pq.read_table(studio_run["manifest"]).to_pylist()[:5]
    d = GroundTruthLandmarks(str(studio_run["gt"])).detect(None, rows)
    serials = list(gt["serials"].astype(str))
    for i, r in enumerate(rows):
        assert np.allclose(d.points[i], gt["landmarks"][r["frame"], serials.index(r["camera"])], atol=1e-4)


NO_MEDIAPIPE = "mediapipe is not installed in this environment (a project dependency: run `make setup`)"


@pytest.mark.skipif(not mediapipe_available(), reason=NO_MEDIAPIPE)
def test_mediapipe_finds_the_face_in_a_real_photograph():
    """Grace Hopper's portrait ships with matplotlib; the face box was marked by hand."""
    import matplotlib
    from PIL import Image

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = np.asarray(Image.open(photo).convert("RGB"))
    with MediaPipeLandmarks() as detector:
        found = detector.detect(image[None])
    assert found.found[0] and found.points.shape == (1, 478, 2)
    points = found.points[0]
    x0, y0, x1, y1 = 150, 110, 380, 350  # forehead below the cap to the chin, ear to ear
    assert ((points[:, 0] > x0) & (points[:, 0] < x1) & (points[:, 1] > y0) & (points[:, 1] < y1)).all()
    assert np.ptp(points[:, 0]) > 120 and np.ptp(points[:, 1]) > 120  # spread over the face, not a blob
    assert found.extras["blendshapes"].shape == (1, 52)


@pytest.mark.skipif(not mediapipe_available(), reason=NO_MEDIAPIPE)
def test_mediapipe_backend_runs(studio_run):
    from PIL import Image

    rows = [r for r in pq.read_table(studio_run["manifest"]).to_pylist() if r["frame"] == 0][:4]
    images = np.stack([np.asarray(Image.open(studio_run["manifest"].parent / r["image"])) for r in rows])
    import os

    try:
        with MediaPipeLandmarks(os.environ.get("AVAT3R_MEDIAPIPE_MODEL") or None) as det:
            d = det.detect(images)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert d.points.shape == (4, 478, 2) and d.confidence.shape == (4, 478)
    assert d.extras["transform"].shape == (4, 4, 4) and d.extras["blendshapes"].shape == (4, 52)
    assert d.found.any()  # the procedural head is not a real face: found in most, not necessarily all views
    k = int(np.argmax(d.found))
    assert (d.points[k] >= 0).all() and (d.points[k, :, 0] < images.shape[2]).all()


# --------------------------------------------------------------------------- fitter pieces
def test_subset_flame_matches_full_layer(head):
    model, layer = head
    rng = np.random.default_rng(2)
    B = 3
    args = dict(shape=torch.tensor(rng.normal(size=(1, 300))), expr=torch.tensor(rng.normal(size=(B, 100))),
                rotation=torch.tensor(rng.normal(0, 0.3, (B, 3))), neck=torch.tensor(rng.normal(0, 0.2, (B, 3))),
                jaw=torch.tensor(rng.normal(0, 0.2, (B, 3))), eyes=torch.tensor(rng.normal(0, 0.2, (B, 6))),
                translation=torch.tensor(rng.normal(0, 0.05, (B, 3))))
    full = layer(**{**args, "shape": args["shape"].expand(B, -1)})
    idx = np.array([5, 100, 2000, 6000])
    sub = SubsetFlame(layer, idx)
    verts, lmk, _ = sub(args["shape"], args["expr"], args["rotation"], args["neck"], args["jaw"], args["eyes"],
                        args["translation"])
    assert torch.allclose(verts, full.vertices[:, idx], atol=1e-10)
    assert torch.allclose(lmk, full.landmarks, atol=1e-10)


def _gt_params(studio_run) -> dict:
    g = np.load(studio_run["gt"] / "001" / "sequences" / SEQ / "flame_params.npz")
    return {k: g[k] for k in g.files}


def test_fit_uncalibrated_recovers_relative_cameras(studio_run, head):
    """Four 'photos' (four cameras at one frame) with no calibration: one camera pose each."""
    from avat3r_core.formats.calibration import read_nersemble_calibration

    model, layer = head
    cfg = studio_run["config"]
    gt = np.load(studio_run["gt"] / "001" / "sequences" / SEQ / "landmarks2d.npz")
    picks = [1, 4, 7, 10]
    pts = gt["landmarks"][3, picks]
    conf = gt["visible"][3, picks].astype(float)
    sizes = np.tile([cfg.width, cfg.height], (len(picks), 1))
    res = fit_uncalibrated(layer, pts, sizes, conf, fov_deg=cfg.fov_deg, config=FitConfig.preset("tiny"))
    assert res.converged, res.message
    assert res.residuals.mean() < 1.0
    assert np.allclose(res.params["rotation"], 0) and np.allclose(res.params["translation"], 0)
    # the returned cameras see the head-frame mesh where the fit put its landmarks
    lm = layer(shape=torch.tensor(res.params["shape"]).expand(len(picks), -1), expr=torch.tensor(res.params["expression"]),
               neck=torch.tensor(res.params["neck"]), jaw=torch.tensor(res.params["jaw"]),
               eyes=torch.tensor(res.params["eyes"])).landmarks
    for i in range(len(picks)):
        uv, _ = res.cameras(i).project(lm[i:i + 1].to(torch.float32))
        assert np.abs(uv[0].numpy() - res.landmarks2d[i]).max() < 1e-2
    # relative camera rotations match the calibrated rig (the head frame is arbitrary, relative poses are not)
    _, cams = read_nersemble_calibration(studio_run["root"] / "raw/001/calibration/camera_params.json",
                                         width=cfg.width, height=cfg.height, dtype=torch.float64)
    R_gt = cams.world_to_cam[picks, :3, :3].numpy()
    R_fit = res.world_to_cam[:, :3, :3]
    for i in range(1, len(picks)):
        rel_gt, rel_fit = R_gt[i] @ R_gt[0].T, R_fit[i] @ R_fit[0].T
        angle = np.degrees(np.arccos(np.clip((np.trace(rel_gt.T @ rel_fit) - 1) / 2, -1, 1)))
        assert angle < 10.0, angle  # monocular landmark fits: a few degrees of pose ambiguity per view


# --------------------------------------------------------------------------- the stage, measured
def _metrics(table: pa.Table, studio_run, layer) -> dict:
    rows = sorted(table.to_pylist(), key=lambda r: r["frame"])
    gt = _gt_params(studio_run)
    fit = {k: np.array([r[k] for r in rows]) for k in ("expression", "jaw", "neck", "eyes", "rotation", "translation")}
    fit["shape"] = np.array(rows[0]["shape"])[None]
    frames = [r["frame"] for r in rows]
    gt_f = {k: (v[frames] if k not in ("shape", "scale") else v) for k, v in gt.items()}
    vg = flame_params_to_full(layer, gt_f)
    vf = flame_params_to_full(layer, fit)
    size = float((vg[0].max(0).values - vg[0].min(0).values).norm())
    vertex_err = float((vg - vf).norm(dim=-1).mean()) / size
    # landmark error against the noise-free ground-truth projections (visible points)
    from avat3r_core.formats.calibration import read_nersemble_calibration

    cfg = studio_run["config"]
    _, cams = read_nersemble_calibration(studio_run["root"] / "raw/001/calibration/camera_params.json",
                                         width=cfg.width, height=cfg.height, dtype=torch.float64)
    lmk_fit = layer(shape=torch.tensor(fit["shape"]).expand(len(frames), -1), expr=torch.tensor(fit["expression"]),
                    rotation=torch.tensor(fit["rotation"]), neck=torch.tensor(fit["neck"]), jaw=torch.tensor(fit["jaw"]),
                    eyes=torch.tensor(fit["eyes"]), translation=torch.tensor(fit["translation"])).landmarks
    uv = torch.stack([cams.project(lmk_fit[t])[0] for t in range(len(frames))]).numpy()  # (T, C, L, 2)
    lm = np.load(studio_run["gt"] / "001" / "sequences" / SEQ / "landmarks2d.npz")
    clean, vis = lm["landmarks"][frames], lm["visible"][frames]
    lmk_err = float(np.linalg.norm(uv - clean, axis=-1)[vis].mean())
    active = np.abs(gt["expression"]).max(0) > 0
    ea, eg = fit["expression"][:, active], gt_f["expression"][:, active]
    pearson = float(np.corrcoef(ea.ravel(), eg.ravel())[0, 1])
    # the head frame (what training works in) against the ground truth's
    H_fit = np.array([r["head_to_world"] for r in rows]).reshape(-1, 4, 4)
    T = len(frames)
    H_gt = layer.head_to_world(shape=torch.tensor(gt_f["shape"]).reshape(1, -1).expand(T, -1),
                               expr=torch.tensor(gt_f["expression"]), rotation=torch.tensor(gt_f["rotation"]),
                               neck=torch.tensor(gt_f["neck"]), translation=torch.tensor(gt_f["translation"])).numpy()
    rel = np.einsum("tji,tjk->tik", H_gt[:, :3, :3], H_fit[:, :3, :3])
    head_deg = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    head_move = float(np.linalg.norm(H_gt[:, :3, 3] - H_gt[:1, :3, 3], axis=1).max())
    return dict(landmark_px=lmk_err, residual_px=float(np.mean([r["residual_px"] for r in rows])),
                vertex_err_frac=vertex_err, head_size_m=size, expr_pearson=pearson, frames=len(frames),
                head_rot_deg=float(head_deg.max()), head_moves_m=head_move,
                head_origin_err_frac=float(np.linalg.norm(H_fit[:, :3, 3] - H_gt[:, :3, 3], axis=1).max()) / size)


def test_track_stage_measured(studio_run, head, tmp_path):
    """GT landmarks + 1 px Gaussian noise, tiny preset: landmark error < 1 px (vs the noise-free
    projections), vertex error < 1 % of the head size, expression correlation > 0.9."""
    from stages.track import TrackConfig, run_track

    model, layer = head
    config = TrackConfig.preset("tiny", ground_truth_root=str(studio_run["gt"]), noise_px=1.0)
    out = tmp_path / "tracking"
    start = time.perf_counter()
    summary = run_track(config, str(studio_run["manifest"]), str(out), studio_run["model"], executor="local")
    seconds = time.perf_counter() - start
    assert summary.items_failed == 0 and summary.rows == STUDIO["frames"]
    table = pq.read_table(out / "tracking.parquet")
    for f in TRACKING_SCHEMA:
        assert table.schema.field(f.name).type == f.type, f.name
    row = table.to_pylist()[0]
    assert row["id"] == f"001_{SEQ}_000000" and len(row["expression_code"]) == 135 and row["backend"] == "ground_truth"
    assert len(row["camera_residuals_px"]) == STUDIO["cameras"]
    assert (out / "overlays" / f"001_{SEQ}.png").stat().st_size > 1000
    m = _metrics(table, studio_run, layer)
    print("measured", m, f"stage {seconds:.1f}s")
    assert m["landmark_px"] < 1.0
    assert m["vertex_err_frac"] < 0.01
    assert m["expr_pearson"] > 0.9
    assert m["head_rot_deg"] < 1.0 and m["head_origin_err_frac"] < 0.01  # the head frame is the true one
    # a rerun resumes: nothing to do
    again = run_track(config, str(studio_run["manifest"]), str(out), studio_run["model"], executor="local")
    assert again.items_skipped == 1 and again.items_done == 0


def test_garbage_landmarks_diverge(studio_run, head, tmp_path):
    from stages.track import TrackConfig, run_track

    gt = np.load(studio_run["gt"] / "001" / "sequences" / SEQ / "landmarks2d.npz")
    rng = np.random.default_rng(3)
    cfg = studio_run["config"]
    junk = np.stack([rng.uniform(0, cfg.width, gt["landmarks"].shape[:-1]),
                     rng.uniform(0, cfg.height, gt["landmarks"].shape[:-1])], -1)
    (tmp_path / "lm" / "001").mkdir(parents=True)
    np.savez(tmp_path / "lm" / "001" / f"{SEQ}.npz", landmarks=junk, visible=np.ones(junk.shape[:-1], bool),
             serials=gt["serials"])
    config = TrackConfig.preset("tiny", landmarks="file", landmarks_root=str(tmp_path / "lm"),
                                fit=dict(FitConfig.PRESETS["tiny"], adam_iters=100, lbfgs_iters=0))
    out = tmp_path / "tracking"
    from stages.runner import StageResources

    summary = run_track(config, str(studio_run["manifest"]), str(out), studio_run["model"],
                        resources=StageResources(max_errors=10, max_error_fraction=1.0), executor="local")
    assert summary.items_failed == 1 and summary.rows == 0
    errors = pq.read_table(out / "tracking.errors.parquet").to_pylist()
    assert len(errors) == 1 and "diverged" in errors[0]["message"]
    assert "residual per camera" in errors[0]["message"] and gt["serials"][0] in errors[0]["message"]
    assert (out / "overlays" / f"001_{SEQ}.png").exists()  # kept to look at


def test_silhouette_term_runs(studio_run, head):
    """The optional silhouette term: fitted mesh vertices stay inside the alpha masks."""
    from stages.track import TrackConfig, TrackStage
    from stages.runner import StageContext

    config = TrackConfig.preset("tiny", ground_truth_root=str(studio_run["gt"]), silhouette=True, max_frames=2,
                                overlay_frames=0)
    stage = TrackStage(config, str(studio_run["manifest"]), studio_run["model"])
    stage.setup()
    rows = stage.process({"id": f"001_{SEQ}", "subject": "001", "sequence": SEQ},
                         StageContext(out_dir=str(studio_run["root"] / "sil"), stage="track"))
    assert len(rows) == 2 and all(r["converged"] and r["residual_px"] < 1.0 for r in rows)


@pytest.mark.parametrize("yaw_deg", [0.0, 40.0, 74.0, -54.0])
@pytest.mark.parametrize("pitch_deg", [-30.0, 10.0, 35.0])
def test_level_start_keeps_yaw_and_levels_the_camera(yaw_deg, pitch_deg):
    """The uncalibrated fit's level start: the camera centre (in the head's frame) ends at pitch 0
    with its yaw and distance kept, also far from frontal (a turn about the head's x axis put a
    74-deg view 20 deg off and made a turning video's fit diverge)."""
    from avat3r_core.tracking.rigid import level_pose

    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    c = 2.0 * np.array([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)])
    a, b = 0.3, -0.7  # an arbitrary head pose in the camera
    R = (np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
         @ np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]]))
    tr = -R @ c
    c2 = -level_pose(R, tr).T @ tr
    assert abs(c2[1]) < 1e-9
    assert np.degrees(np.arctan2(c2[0], c2[2])) == pytest.approx(yaw_deg, abs=1e-6)
    assert np.linalg.norm(c2) == pytest.approx(2.0)
