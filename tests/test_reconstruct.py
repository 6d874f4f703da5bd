"""Batch reconstruction: the library manifest, every input mode, error rows, resume, .ply, the cache.

Data: one tiny studio run (2 subjects, 1 sequence, 3 frames, 4 cameras, 96 px) shared by the
module. Subject 001 is extracted to 32 px crops with ground-truth-depth priors (capture mode);
subject 002's raw frames become "photos", a single image and a "video" (frames of different
cameras, i.e. a turning head) with the studio's ground-truth landmarks written beside them (the
``file`` landmark backend: exact points on 96 px frames; MediaPipe on real photos is
tests/test_pictures.py's). The network is a random-init ``tiny`` model at 32 px without
features, saved with ``save_checkpoint``: only plumbing is checked here, not avatar quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numba
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from avat3r_core.geometry import farthest_views
from avat3r_core.errors import FormatError
from avat3r_core.reconstruct.errors import AvatarInputError, NoFaceError, TooFewFramesError, UnreadableInputError
from avat3r_core.reconstruct.expressions import BUILTIN_KEYS, load_expression_track
from avat3r_core.reconstruct.library import LibraryEntry, read_library, write_capture_library, write_library
from avat3r_core.reconstruct.pictures import LANDMARKS_SUFFIX
from avat3r_core.reconstruct.prepare import Preparer
from avat3r_core.reconstruct.prepared import pick_diverse_poses
from avat3r_core.reconstruct.build import strip_indices
from avat3r_core.inference.checkpoint import load_trained_model
from stages.reconstruct import ReconstructConfig, run_reconstruct

S = 32
SEQ = "EXP-1-head"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from PIL import Image

    from avat3r_core.extract import ExtractConfig
    from avat3r_core.synthetic.studio import StudioConfig, face_model_paths
    from avat3r_core.train.config import TrainConfig, build_model
    from avat3r_core.train.state import save_checkpoint
    from avat3r_core.video import encode_video, read_frames
    from stages.extract import run_extract
    from stages.priors import PriorsConfig, run_priors
    from stages.synth import run_synth

    root = tmp_path_factory.mktemp("reconstruct")
    raw, gt, model_dir, frames, priors = (str(root / n) for n in ("raw", "gt", "model", "frames", "priors"))
    run_synth(StudioConfig(subjects=2, sequences=1, frames=3, cameras=4, resolution=96, background_frames=1),
              raw, gt, model_dir, executor="local")
    run_extract(ExtractConfig(resolution=S), raw, frames, executor="local")
    run_priors(PriorsConfig.preset("tiny", position_source="ground_truth", ground_truth_root=gt, feature_source="none"),
               f"{frames}/frames.parquet", priors, executor="local", show_progress=False)
    from stages.track import TrackConfig, run_track

    run_track(TrackConfig.preset("tiny", ground_truth_root=gt), f"{frames}/frames.parquet", str(root / "tracking"),
              face_model_paths(model_dir), executor="local")

    # pictures of subject 002 with the studio's landmarks beside them
    pics = root / "people"
    lm = np.load(f"{gt}/002/sequences/{SEQ}/landmarks2d.npz")
    serials = [str(s) for s in lm["serials"]]
    shots = {s: list(read_frames(f"{raw}/002/sequences/{SEQ}/images/cam_{s}.mp4")) for s in serials}

    def picture(path: Path, serial: str, t: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shots[serial][t]).save(path)
        c = serials.index(serial)
        np.savez(path.with_name(path.stem + LANDMARKS_SUFFIX), landmarks=lm["landmarks"][t, c],
                 visible=lm["visible"][t, c])

    for c, s in enumerate(serials):
        picture(pics / "photos" / f"view{c}.png", s, 1)
    picture(pics / "single" / "face.png", serials[1], 2)
    # a "video": the head seen from cameras sweeping around it (a turning head), 2 frames per camera
    order = [(s, t) for s in serials for t in (0, 1)]
    (pics / "video").mkdir()
    (pics / "video" / "turn.mp4").write_bytes(encode_video([shots[s][t] for s, t in order], fps=8))
    np.savez(pics / "video" / f"turn{LANDMARKS_SUFFIX}",
             landmarks=np.stack([lm["landmarks"][t, serials.index(s)] for s, t in order]),
             visible=np.stack([lm["visible"][t, serials.index(s)] for s, t in order]))
    # the bad ones
    (pics / "noface").mkdir()
    Image.fromarray(np.full((96, 66, 3), 128, np.uint8)).save(pics / "noface" / "wall.png")
    (pics / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    (pics / "still.mp4").write_bytes(encode_video([shots[serials[0]][0]], fps=8))

    torch.manual_seed(0)
    cfg = TrainConfig.preset("tiny", model={"image_size": S, "feature_dim": 0})
    net = build_model(cfg)
    ckpt = root / "checkpoint"
    save_checkpoint(ckpt, net, torch.optim.Adam(net.parameters()), 0, config=cfg)

    model_path, emb_path = face_model_paths(model_dir)
    return dict(root=root, raw=raw, gt=gt, frames=f"{frames}/frames.parquet", priors=f"{priors}/priors.parquet",
                tracking=str(root / "tracking" / "tracking.parquet"),
                pics=pics, checkpoint=str(ckpt), face_model=model_path, embedding=emb_path)


def config(studio, **overrides) -> ReconstructConfig:
    return ReconstructConfig.preset("tiny", landmarks="file", face_model=studio["face_model"],
                                    landmark_embedding=studio["embedding"], fov_deg=24.0, **overrides)


def library(studio, path: Path) -> Path:
    p = studio["pics"]
    rows = [
        {"mode": "capture", "source": studio["frames"], "subject": "001", "priors": studio["priors"]},
        {"avatar_id": "person-photos", "mode": "photos", "source": str(p / "photos")},
        {"avatar_id": "person-image", "mode": "image", "source": str(p / "single" / "face.png"), "expressions": "builtin"},
        {"avatar_id": "person-video", "mode": "video", "source": str(p / "video" / "turn.mp4")},
        {"avatar_id": "bad-noface", "mode": "photos", "source": str(p / "noface")},
        {"avatar_id": "bad-unreadable", "mode": "image", "source": str(p / "broken.png")},
        {"avatar_id": "bad-one-frame", "mode": "video", "source": str(p / "still.mp4")},
    ]
    return Path(write_library(rows, path))


# --------------------------------------------------------------------------- the manifest
def test_library_reading_names_file_row_and_field(tmp_path, studio):
    lib = library(studio, tmp_path / "lib.yaml")
    entries = read_library(lib)
    assert [e.avatar_id for e in entries][:2] == ["capture_001", "person-photos"]
    assert entries[0].mode == "capture" and entries[0].subject == "001" and Path(entries[0].source).is_absolute()
    # same rows through CSV and Parquet
    for ext in ("csv", "parquet"):
        again = read_library(write_library(entries, tmp_path / f"lib.{ext}"))
        assert [(e.avatar_id, e.mode, e.source) for e in again] == [(e.avatar_id, e.mode, e.source) for e in entries]
    # relative paths are relative to the library file
    (tmp_path / "rel.csv").write_text("mode,source\nimage,pics/a.png\n")
    assert read_library(tmp_path / "rel.csv")[0].source == str(tmp_path / "pics" / "a.png")

    bad = {
        "mode,source\nselfie,a.png\n": "row 1: mode",
        "avatar_id,mode,source\nann.v2,image,a.png\n": "row 1: avatar_id",
        "avatar_id,mode,source\nann,image,a.png\nann,image,b.png\n": "row 2: avatar_id",
        "mode,source\ncapture,frames.parquet\n": "row 1: subject",
        "mode,source,frame\ncapture,f.parquet,x\n": "row 1: frame",
        "mode,source,colour\nimage,a.png,red\n": "row 1: colour",
        "mode,source\nimage,\n": "row 1: source",
    }
    for text, field in bad.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(FormatError) as err:
            read_library(tmp_path / "bad.csv")
        assert err.value.field == field and "bad.csv" in str(err.value), (text, str(err.value))


def test_capture_library_from_splits(tmp_path, studio):
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["002"], "val": [], "test": ["001"]}))
    out = write_capture_library(studio["frames"], str(tmp_path), "test", str(tmp_path / "heldout.parquet"))
    entries = read_library(out)
    # the person's own tracked sequence drives the animation (tracking sits beside the frames)
    assert [(e.avatar_id, e.subject, e.sequence, e.expressions) for e in entries] == [
        ("capture_001", "001", SEQ, f"{studio['tracking']}#001/{SEQ}")]
    with pytest.raises(FormatError, match="no such split"):
        write_capture_library(studio["frames"], str(tmp_path / "splits.json"), "holdout", str(tmp_path / "x.parquet"))


def test_view_and_pose_choice_is_farthest_and_deterministic():
    centers = np.array([[0, 0, 1.0], [0.1, 0, 1.0], [1, 0, 0.2], [-1, 0, 0.2], [0, 1, 0.3], [0.05, 0, 1.0]])
    picks = farthest_views(centers, 3)
    assert picks[0] in (0, 1, 5) and set(picks[1:]) <= {2, 3, 4} and picks == farthest_views(centers, 3)
    # same camera at two timesteps: the tie goes to a timestep not picked yet
    twice = np.concatenate([centers[:2], centers[:2]])
    assert farthest_views(twice, 2, groups=np.array([0, 0, 1, 1]))[1] == 3
    # head poses: cameras around the head at the origin
    eyes = torch.tensor([[0.0, 0, 1], [0.02, 0, 1], [0.7, 0, 0.7], [-0.7, 0, 0.7], [0.0, 0.5, 0.85]])
    from avat3r_core.cameras import Cameras

    w2c = Cameras.look_at(eyes, torch.zeros(3), fov_deg=20, width=8, height=8).world_to_cam.double().numpy()
    assert pick_diverse_poses(w2c, 4) in ([0, 2, 3, 4], [1, 2, 3, 4])


# --------------------------------------------------------------------------- per mode, one item
def test_each_mode_prepares_model_inputs(studio):
    cfg = config(studio)
    prep = Preparer(cfg, image_size=S, frame="world")
    p = studio["pics"]
    cap = prep.prepare(LibraryEntry("c", "capture", studio["frames"], subject="001", priors=studio["priors"]))
    assert cap.images.shape == (4, S, S, 3) and cap.position.shape == (4, S, S, 3)
    assert len({v["camera"] for v in cap.meta["views"]}) == 4  # 4 cameras of the rig, farthest apart
    assert cap.meta["position_source"] == "ground_truth" and cap.features is None
    for mode, source, views in (("photos", p / "photos", 4), ("image", p / "single" / "face.png", 1),
                                ("video", p / "video" / "turn.mp4", 4)):
        out = prep.prepare(LibraryEntry(mode, mode, str(source)))
        assert out.images.shape == (views, S, S, 3), mode
        assert out.meta["position_source"] == "face_model" and out.meta["landmarks"] == "file"
        assert out.meta["fit_residual_px"] < 3.0, (mode, out.meta)
        # the face-model position map lands on the face: most confident pixels reproject onto their pixel
        cams = out.cameras()
        for v in range(views):
            m = torch.from_numpy(out.confidence[v] > 0.5)
            assert m.sum() > 0.1 * S * S, (mode, v)
            uv, _ = cams[v].project(torch.from_numpy(out.position[v])[m][None])
            assert float((uv[0] - cams[v].pixel_grid()[m]).norm(dim=-1).max()) < 0.05
        back = type(out).from_bytes(out.to_bytes())
        assert np.array_equal(back.images, out.images) and back.meta == json.loads(json.dumps(out.meta))
    # video mode picks frames with different head poses: the clip turns from -54 to +74 degrees of yaw
    # (camera sweep + the studio head's own turn); the two extremes are always among the picks
    video = prep.prepare(LibraryEntry("v", "video", str(p / "video" / "turn.mp4")))
    frames = [int(v["input"].rsplit("frame", 1)[1]) for v in video.meta["views"]]
    assert len(set(frames)) == 4 and {0, 7} <= set(frames), frames
    # the named errors
    with pytest.raises(NoFaceError, match="wall.png"):
        prep.prepare(LibraryEntry("n", "photos", str(p / "noface")))
    with pytest.raises(UnreadableInputError, match="broken.png"):
        prep.prepare(LibraryEntry("u", "image", str(p / "broken.png")))
    with pytest.raises(TooFewFramesError, match="still.mp4"):
        prep.prepare(LibraryEntry("o", "video", str(p / "still.mp4")))


def _non_rigid_tracking(tracking: str, out: Path) -> str:
    """A copy of a tracking manifest whose head_to_world rotations are scaled by 1.1 (not rigid)."""
    import pyarrow as pa

    table = pq.read_table(tracking)
    rows = table.to_pylist()
    for row in rows:
        H = np.reshape(row["head_to_world"], (4, 4)).copy()
        H[:3, :3] *= 1.1
        row["head_to_world"] = H.ravel().tolist()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    return str(out)


def test_head_frame_inputs(studio, tmp_path):
    """A head-frame model gets every view in the tracked head frame of its own timestep: cameras
    are world_to_cam @ head_to_world (from tracking.parquet), the position maps move with them
    (each confident point still lands on its own pixel), and without tracking it is a named error."""
    import pyarrow.parquet as pq

    cfg = config(studio)
    entry = LibraryEntry("c", "capture", studio["frames"], subject="001", priors=studio["priors"],
                         tracking=studio["tracking"])
    world = Preparer(cfg, image_size=S, frame="world").prepare(entry)
    head = Preparer(cfg, image_size=S, frame="head").prepare(entry)
    assert head.meta["frame"] == "head" and world.meta["frame"] == "world"
    tracked = {(r["sequence"], r["frame"]): np.reshape(r["head_to_world"], (4, 4))
               for r in pq.read_table(studio["tracking"]).to_pylist() if r["subject"] == "001"}
    frames = pq.read_table(studio["frames"]).to_pylist()
    w2c = {r["id"]: np.reshape(r["world_to_cam"], (4, 4)) for r in frames}
    moved = 0
    for v, view in enumerate(head.meta["views"]):
        H = tracked[(SEQ, view["frame"])]
        moved += not np.allclose(H, np.eye(4), atol=1e-3)
        np.testing.assert_allclose(head.world_to_cam[v], w2c[view["id"]] @ H, atol=1e-6)
        cam = head.cameras()[v]
        m = torch.from_numpy(head.confidence[v] > 0.5)
        uv, _ = cam.project(torch.from_numpy(head.position[v]).double()[m][None])
        assert float((uv[0] - cam.pixel_grid()[m].double()).norm(dim=-1).max()) < 0.05
    assert moved  # the studio head moves: the frames really differ from the world
    with pytest.raises(AvatarInputError, match="no tracking"):
        Preparer(cfg, image_size=S, frame="head").prepare(
            LibraryEntry("c", "capture", studio["frames"], subject="001", priors=studio["priors"],
                         tracking=str(tmp_path / "none.parquet")))
    bad = _non_rigid_tracking(studio["tracking"], tmp_path / "bad.parquet")
    with pytest.raises(AvatarInputError, match=r"bad\.parquet.*head_to_world of 001/.* is not a rigid transform"):
        Preparer(cfg, image_size=S, frame="head").prepare(
            LibraryEntry("c", "capture", studio["frames"], subject="001", priors=studio["priors"], tracking=bad))
    # pictures: the fitted head's frame, the same reprojection holds
    photos = Preparer(cfg, image_size=S, frame="head").prepare(LibraryEntry("p", "photos", str(studio["pics"] / "photos")))
    cams = photos.cameras()
    for v in range(photos.num_views):
        m = torch.from_numpy(photos.confidence[v] > 0.5)
        uv, _ = cams[v].project(torch.from_numpy(photos.position[v])[m][None])
        assert float((uv[0] - cams[v].pixel_grid()[m]).norm(dim=-1).max()) < 0.05


# --------------------------------------------------------------------------- the stage
def test_stage_builds_every_mode_names_failures_and_resumes(tmp_path, studio, ray_session):
    from plyfile import PlyData

    from avat3r_core.video import read_frames
    from stages.runner import StageResources

    lib = library(studio, tmp_path / "lib.csv")
    out = tmp_path / "avatars"
    cfg = config(studio)
    summary = run_reconstruct(cfg, str(lib), studio["checkpoint"], str(out), executor="ray", show_progress=False,
                              resources=StageResources(max_errors=5))
    assert (summary.items_total, summary.items_done, summary.items_failed) == (7, 4, 3)
    index = {r["id"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    ok = {k: r for k, r in index.items() if r["status"] == "ok"}
    assert set(ok) == {"capture_001", "person-photos", "person-image", "person-video"}
    assert {r["mode"] for r in ok.values()} == {"capture", "photos", "image", "video"}
    assert ok["person-image"]["views"] == 1 and ok["capture_001"]["views"] == 4
    assert ok["capture_001"]["position_source"] == "ground_truth" and ok["person-photos"]["position_source"] == "face_model"
    assert "landmarks:file" in ok["person-video"]["stand_ins"] and "position:face_model" in ok["person-video"]["stand_ins"]
    assert all(r["encode_s"] > 0 and r["total_s"] > 0 for r in ok.values())
    errors = {r["id"]: r["message"] for r in pq.read_table(out / "index.errors.parquet").to_pylist()}
    assert "NoFaceError" in errors["bad-noface"] and "wall.png" in errors["bad-noface"]
    assert "UnreadableInputError" in errors["bad-unreadable"] and "broken.png" in errors["bad-unreadable"]
    assert "TooFewFramesError" in errors["bad-one-frame"] and "still.mp4" in errors["bad-one-frame"]
    assert {index[k]["status"] for k in errors} == {"failed"}

    cfg_t = cfg
    for avatar_id in ok:
        d = out / avatar_id
        names = {"encoder_cache.pt", "gaussians_neutral.ply", "preview.png", "turntable.mp4", "animation.mp4", "meta.json"}
        assert names <= {f.name for f in d.iterdir()}, avatar_id
        assert len(list(read_frames(d / "turntable.mp4"))) == cfg_t.turntable_frames
        frames = list(read_frames(d / "animation.mp4"))
        assert len(frames) == (len(BUILTIN_KEYS) - 1) * cfg_t.frames_per_key and frames[0].shape == (cfg_t.render_size, cfg_t.render_size, 3)
        meta = json.loads((d / "meta.json").read_text())
        assert meta["expressions"] == "builtin" and meta["checkpoint"].endswith("checkpoint.pt")
    # the .ply is a standard 3DGS file
    ply = PlyData.read(str(out / "person-photos" / "gaussians_neutral.ply"))
    props = set(ply["vertex"].data.dtype.names)
    assert {"x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
            "rot_0", "rot_1", "rot_2", "rot_3"} <= props
    assert ply["vertex"].count == ok["person-photos"]["gaussians"] > 100

    # rerun: finished avatars are skipped (nothing rewritten), the failed ones are tried again
    stamp = (out / "person-photos" / "turntable.mp4").stat().st_mtime_ns
    again = run_reconstruct(cfg, str(lib), studio["checkpoint"], str(out), executor="local", show_progress=False,
                            resources=StageResources(max_errors=5))
    assert (again.items_skipped, again.items_done, again.items_failed) == (4, 0, 3)
    assert (out / "person-photos" / "turntable.mp4").stat().st_mtime_ns == stamp
    assert len(pq.read_table(out / "index.parquet")) == 7
    # other settings: every built avatar is rebuilt (the runner's item keys), not kept stale
    fewer = run_reconstruct(config(studio, turntable_frames=cfg_t.turntable_frames - 2), str(lib), studio["checkpoint"],
                            str(out), executor="local", show_progress=False, resources=StageResources(max_errors=5))
    assert (fewer.items_skipped, fewer.items_done) == (0, 4)
    assert len(list(read_frames(out / "person-photos" / "turntable.mp4"))) == cfg_t.turntable_frames - 2

    # the CLI: animate a built avatar with a tracked-style codes file; a bad library exits 3
    from typer.testing import CliRunner

    from pipelines.cli import app

    codes, _ = load_expression_track("builtin", None, frames_per_key=1)
    np.save(tmp_path / "codes.npy", codes[:5])
    runner = CliRunner()
    threads_before = torch.get_num_threads(), numba.get_num_threads()
    try:
        res = runner.invoke(app, ["animate", str(out / "person-image"), "--expressions", str(tmp_path / "codes.npy"),
                                  "--out", str(tmp_path / "drive.mp4"), "--strip", str(tmp_path / "strip.png"),
                                  "--strip-frames", "3", "--threads", "1"])
        # --threads holds for torch and the renderer's numba through a whole animation
        assert (torch.get_num_threads(), numba.get_num_threads()) == (1, 1)
    finally:
        torch.set_num_threads(threads_before[0])
        numba.set_num_threads(threads_before[1])
    assert res.exit_code == 0, res.output
    driven = list(read_frames(tmp_path / "drive.mp4"))
    assert len(driven) == 5
    # the strip is frames 0, 2, 4 side by side: each tile is that video frame (up to compression)
    strip = np.asarray(Image.open(tmp_path / "strip.png").convert("RGB"))
    h, w = driven[0].shape[:2]
    assert strip.shape == (h, 3 * w, 3)
    for tile, index in enumerate(json.loads(res.output)["strip_frames"]):
        assert np.abs(strip[:, tile * w:(tile + 1) * w].astype(float) - driven[index]).mean() < 4.0, tile
    assert json.loads(res.output)["strip_frames"] == [0, 2, 4]
    assert strip_indices(2, 6) == [0, 1] and strip_indices(10, 1) == [0] and strip_indices(37, 4) == [0, 12, 24, 36]
    (tmp_path / "broken.csv").write_text("mode,source\nselfie,a.png\n")
    res = runner.invoke(app, ["reconstruct", "--inputs", str(tmp_path / "broken.csv"), "--checkpoint",
                              studio["checkpoint"], "--out", str(tmp_path / "x"), "--executor", "local"])
    assert res.exit_code == 3 and "row 1: mode" in " ".join(res.output.split())


def test_head_motion_replayed_by_the_camera(studio, tmp_path):
    """A tracked track's head motion relative to its first frame, replayed by moving the camera:
    identity motion renders exactly the fixed-camera frames, the tracked motion other frames."""
    from avat3r_core.inference.drive import animation_frames, view_orbit
    from avat3r_core.reconstruct.expressions import head_motion_for, load_head_motion

    spec = f"{studio['tracking']}#001/{SEQ}"
    motion = load_head_motion(spec)
    H = np.array([r["head_to_world"] for r in sorted(pq.read_table(studio["tracking"]).to_pylist(),
                                                      key=lambda r: r["frame"]) if r["subject"] == "001"]).reshape(-1, 4, 4)
    assert motion.shape == (len(H), 4, 4)
    np.testing.assert_allclose(motion[0], np.eye(4), atol=1e-12)
    np.testing.assert_allclose(H[0] @ motion, H, atol=1e-12)  # H₀ · (H₀⁻¹ Hₜ) = Hₜ
    assert load_head_motion("builtin") is None
    bad = _non_rigid_tracking(studio["tracking"], tmp_path / "bad.parquet")
    with pytest.raises(FormatError, match=r"bad\.parquet.*frame 0.*head_to_world is not a rigid transform"):
        load_head_motion(f"{bad}#001/{SEQ}")
    assert head_motion_for("world", spec, True) is None and head_motion_for("head", spec, False) is None
    np.testing.assert_array_equal(head_motion_for("head", spec, True), motion)

    model, _, _ = load_trained_model(studio["checkpoint"])
    prepared = Preparer(config(studio), image_size=S, frame="world").prepare(
        LibraryEntry("c", "capture", studio["frames"], subject="001", priors=studio["priors"]))
    codes, _ = load_expression_track(spec, prepared.reference)
    cam = view_orbit(prepared.center, prepared.radius, prepared.front, prepared.up, frames=1, size=48)
    with torch.no_grad():
        encoded = model.encode(prepared.inputs())
        fixed = animation_frames(model, encoded, torch.as_tensor(codes), cam)
        still = animation_frames(model, encoded, torch.as_tensor(codes), cam, motion=np.tile(np.eye(4), (len(motion), 1, 1)))
        moving = animation_frames(model, encoded, torch.as_tensor(codes), cam, motion=motion)
    assert np.array_equal(fixed, still) and np.array_equal(fixed[0], moving[0])
    assert np.abs(fixed[-1].astype(int) - moving[-1]).mean() > 0.5  # the head turned by the last frame


def test_driving_through_the_cache_matches_full_forward(tmp_path, studio):
    """Decoder-only driving from the saved cache renders the same frames as encode + decode per frame."""
    from avat3r_core.inference.drive import animation_frames, encoded_bytes, load_encoded
    from avat3r_core.inference.drive import view_orbit
    from avat3r_core.reconstruct.build import drive_without_cache

    model, _, _ = load_trained_model(studio["checkpoint"])
    prepared = Preparer(config(studio), image_size=S, frame="world").prepare(
        LibraryEntry("c", "capture", studio["frames"], subject="001", priors=studio["priors"]))
    codes, _ = load_expression_track("builtin", prepared.reference, frames_per_key=1)
    codes = codes[:4] * 3  # exaggerate: the random network (output layer std 1e-3) reacts only slightly
    cam = view_orbit(prepared.center, prepared.radius, prepared.front, prepared.up, frames=1, size=48)
    with torch.no_grad():
        (tmp_path / "cache.pt").write_bytes(encoded_bytes(model.encode(prepared.inputs())))
    cached = animation_frames(model, load_encoded(tmp_path / "cache.pt"), torch.as_tensor(codes), cam, chunk=1)
    full = drive_without_cache(model, prepared, codes, cam)
    assert cached.shape == full.shape == (4, 48, 48, 3)
    assert np.array_equal(cached, full)
    assert np.abs(full[0].astype(int) - full[3]).sum() > 0  # the expression changes the picture
    with torch.no_grad():  # and the network's Gaussians, beyond 8-bit rounding
        enc = model.encode(prepared.inputs())
        a, b = (model.decode(enc, torch.as_tensor(codes[i:i + 1])) for i in (0, 2))
    assert not torch.allclose(a.means, b.means) and not torch.allclose(a.colors, b.colors)


# --------------------------------------------------------------------------- hostile and broken inputs (issue 24)
def _tracking_with(tracking: str, out: Path, column: str, frame: int | None = None) -> str:
    """A copy of a tracking manifest with a NaN in ``column`` of subject 001 (one frame, or all)."""
    import pyarrow as pa

    table = pq.read_table(tracking)
    rows = table.to_pylist()
    for row in rows:
        if row["subject"] == "001" and (frame is None or row["frame"] == frame):
            row[column] = [float("nan")] + list(row[column])[1:]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out)
    return str(out)


def test_non_finite_capture_inputs_name_the_input_at_fault(studio, tmp_path):
    """The sweep: NaN in a capture avatar's priors or tracked rotation failed with a
    NonFiniteError naming a temporary .ply; NaN in one frame of an expression track rendered a
    white frame with rc 0. Each now names the file (and frame) at fault."""
    import shutil

    from avat3r_core.errors import NonFiniteError

    cfg = config(studio)
    priors = tmp_path / "priors"
    shutil.copytree(Path(studio["priors"]).parent, priors)
    for npz in (priors / "maps" / "001").rglob("cam_*[0-9].npz"):
        with np.load(npz) as z:
            position, confidence = z["position"].copy(), z["confidence"]
        position[2:6, 2:6] = np.nan
        np.savez(npz, position=position, confidence=confidence)
    entry = LibraryEntry("c", "capture", studio["frames"], subject="001", priors=str(priors / "priors.parquet"),
                         tracking=studio["tracking"])
    with pytest.raises(NonFiniteError, match=rf"{priors}/maps/001/.*\.npz \[position\]"):
        Preparer(cfg, image_size=S, frame="world").prepare(entry)

    bad = _tracking_with(studio["tracking"], tmp_path / "rotation.parquet", "rotation")
    with pytest.raises(NonFiniteError, match=rf"rotation\.parquet \[001/{SEQ} frame \d+: rotation\]"):
        Preparer(cfg, image_size=S, frame="head").prepare(
            LibraryEntry("c", "capture", studio["frames"], subject="001", priors=studio["priors"], tracking=bad))

    track = _tracking_with(studio["tracking"], tmp_path / "expression.parquet", "expression", frame=1)
    with pytest.raises(NonFiniteError, match=rf"expression\.parquet \[001/{SEQ} frame 1: expression\]"):
        load_expression_track(f"{track}#001/{SEQ}")


def test_an_unreadable_face_model_is_reported_once_up_front(studio, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    import shutil

    face = tmp_path / "face"
    face.mkdir()
    broken = face / "head_model.pkl"
    broken.write_bytes(b"\x80\x04not a pickle at all")
    shutil.copy(studio["embedding"], face / "head_landmark_embedding.pkl")
    p = studio["pics"]
    lib = write_library([{"avatar_id": "a", "mode": "image", "source": str(p / "single" / "face.png")},
                         {"avatar_id": "b", "mode": "photos", "source": str(p / "photos")}], tmp_path / "lib.csv")
    cfg = ReconstructConfig.preset("tiny", landmarks="file", face_model=str(broken),
                                   landmark_embedding=str(face / "head_landmark_embedding.pkl"))
    with pytest.raises(FormatError, match=str(broken)):
        run_reconstruct(cfg, lib, studio["checkpoint"], str(tmp_path / "avatars"), executor="local",
                        show_progress=False)
    assert not (tmp_path / "avatars" / "_errors").exists()  # not one failure per avatar
    res = CliRunner().invoke(app, ["reconstruct", "--inputs", lib, "--checkpoint", studio["checkpoint"],
                                   "--out", str(tmp_path / "cli"), "--executor", "local", "--preset", "tiny",
                                   "--face-model", str(face), "--landmarks", "file"])
    output = "".join(res.output.split())  # the console wraps long paths
    assert res.exit_code == 3 and output.count("head_model.pkl") == 1, res.output


def test_a_full_disk_keeps_the_finished_avatars_and_leaves_no_temp_files(studio, tmp_path, monkeypatch):
    import errno

    import fsspec.implementations.local as local

    from stages.runner import DiskFull

    p = studio["pics"]
    lib = write_library([{"avatar_id": "first", "mode": "image", "source": str(p / "single" / "face.png")},
                         {"avatar_id": "second", "mode": "image", "source": str(p / "single" / "face.png")}],
                        tmp_path / "lib.csv")
    out = tmp_path / "avatars"
    real = local.LocalFileOpener.write

    def write(self, data):  # the disk fills up half-way through the second avatar's encoder cache
        if "/second/" in str(self.path) and "encoder_cache.pt" in str(self.path):
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(local.LocalFileOpener, "write", write)
    with pytest.raises(DiskFull) as stopped:
        run_reconstruct(config(studio), lib, studio["checkpoint"], str(out), executor="local", show_progress=False)
    message = str(stopped.value)
    assert "\n" not in message and "lists the 1 committed items" in message and "other 1 of 2" in message
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [(r["id"], r["status"]) for r in index if r["status"] == "ok"] == [("first", "ok")]
    assert [f.name for f in out.rglob(".tmp-*")] == [] and not any((out / "second").glob("*"))
    monkeypatch.undo()
    again = run_reconstruct(config(studio), lib, studio["checkpoint"], str(out), executor="local", show_progress=False)
    assert (again.items_skipped, again.items_done) == (1, 1)
