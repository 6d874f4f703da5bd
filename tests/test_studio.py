"""The synthetic studio: format, determinism, ground truth that agrees with the pixels, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.spatial import cKDTree

from avat3r_core.formats.calibration import read_nersemble_calibration
from avat3r_core.color import apply_ccm, read_color_calibration
from avat3r_core.formats.capture import scan_capture
from avat3r_core.synthetic import studio
from avat3r_core.synthetic.studio import StudioConfig
from avat3r_core.video import read_frames
from stages.synth import run_synth

TINY = dict(subjects=2, sequences=1, frames=3, cameras=3, resolution=96, seed=7, preview=True)


def generate(root: Path, **overrides) -> tuple[Path, Path, Path, object]:
    config = StudioConfig(**{**TINY, **overrides})
    raw, gt, model = root / "raw", root / "gt", root / "model"
    summary = run_synth(config, str(raw), str(gt), str(model), executor="local")
    return raw, gt, model, summary


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("studio"))


def test_nersemble_layout_and_manifest(dataset):
    raw, gt, model, summary = dataset
    assert summary.items_done == 2 and summary.items_failed == 0
    index = scan_capture(raw)
    assert index.layout == "nersemble" and not [p for p in index.problems if p.severity == "error"]
    assert sorted(index.subjects) == ["001", "002"]
    subject = index.subjects["001"]
    assert list(subject.sequences) == ["EXP-1-head"] and subject.background is not None
    seq = subject.sequences["EXP-1-head"]
    assert seq.frames == 3 and all(m.alpha_path for m in seq.media.values())
    assert set(subject.color_calibration) == set(subject.serials)
    rows = pq.read_table(summary.manifest).to_pylist()
    assert len(rows) == 2 * 3 * 2  # subjects x cameras x (sequence + background)
    assert all("." not in r["id"] for r in rows)
    assert (gt / "previews" / "001.png").exists() and (model / "head_model.pkl").exists()
    params = np.load(gt / "001" / "sequences" / "EXP-1-head" / "flame_params.npz")
    assert params["expression"].shape == (3, 100) and params["shape"].shape == (1, 300)
    assert params["rotation_matrices"].shape == (3, 3, 3) and params["eyes"].shape == (3, 6)


def test_same_seed_same_data_and_both_decoders(dataset, tmp_path):
    raw, gt, _, _ = dataset
    raw2, gt2, _, _ = generate(tmp_path)
    assert (raw / "001/calibration/camera_params.json").read_text() == (raw2 / "001/calibration/camera_params.json").read_text()
    for rel in ("001/sequences/EXP-1-head/flame_params.npz", "002/sequences/EXP-1-head/landmarks2d.npz"):
        a, b = np.load(gt / rel), np.load(gt2 / rel)
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    video = "002/sequences/EXP-1-head/images/cam_222200037.mp4"
    frames_a = list(read_frames(raw / video))
    frames_b = list(read_frames(raw2 / video))
    assert len(frames_a) == 3 and all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b))
    opencv = list(read_frames(raw / video, backend="opencv"))
    assert len(opencv) == 3 and np.abs(opencv[1].astype(int) - frames_a[1]).mean() < 1.0
    other_seed = StudioConfig(**{**TINY, "seed": 8})
    assert not np.array_equal(studio.sequence_motion(7, "001", "EXP-1-head", 3, 16)["expression"],
                              studio.sequence_motion(other_seed.seed, "001", "EXP-1-head", 3, 16)["expression"])


def test_visible_landmarks_land_on_the_rendered_face(dataset):
    raw, gt, _, _ = dataset
    lm = np.load(gt / "001/sequences/EXP-1-head/landmarks2d.npz")
    serials = [str(s) for s in lm["serials"]]
    exact, checked = 0, 0
    for c, serial in enumerate(serials):
        alphas = list(read_frames(raw / f"001/sequences/EXP-1-head/alpha/cam_{serial}.mp4", gray=True))
        for t, alpha in enumerate(alphas):
            for k, ((u, v), vis) in enumerate(zip(lm["landmarks"][t, c], lm["visible"][t, c])):
                if not vis:
                    continue
                row, col = int(v), int(u)
                near = alpha[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2]
                # every visible landmark is on the face to within a pixel (4 mm at this size) ...
                assert near.max() >= 250, f"landmark {k} off the face: cam {serial} frame {t} at {(u, v)}"
                exact += alpha[row, col] >= 250
                checked += 1
    assert exact >= 0.95 * checked  # ... and almost all exactly on fully covered pixels
    assert checked > 100


def test_ground_truth_depth_matches_the_posed_mesh(dataset):
    raw, gt, model, _ = dataset
    head = studio.HeadAssets.load(*studio.face_model_paths(str(model)))
    params = np.load(gt / "001/sequences/EXP-1-head/flame_params.npz")
    serials, cams = read_nersemble_calibration(raw / "001/calibration/camera_params.json", width=studio.StudioConfig(**TINY).width,
                                               height=studio.StudioConfig(**TINY).height, dtype=torch.float64)
    from avat3r_core.synthetic.appearance import hair_offsets, sample_appearance

    identity = json.loads((gt / "001/identity.json").read_text())
    appearance = sample_appearance(0)
    appearance.__dict__.update(identity["appearance"])
    t = 1
    with torch.no_grad():
        out = head.layer(
            shape=torch.tensor(params["shape"], dtype=torch.float64),
            expr=torch.tensor(params["expression"][t:t + 1], dtype=torch.float64),
            rotation=torch.tensor(params["rotation"][t:t + 1], dtype=torch.float64),
            neck=torch.tensor(params["neck"][t:t + 1], dtype=torch.float64),
            jaw=torch.tensor(params["jaw"][t:t + 1], dtype=torch.float64),
            eyes=torch.tensor(params["eyes"][t:t + 1], dtype=torch.float64),
            translation=torch.tensor(params["translation"][t:t + 1], dtype=torch.float64),
            offsets=torch.tensor(hair_offsets(head.model, appearance))[None],
        )
    # the posed surface, densely sampled (point-to-surface distance without a mesh library)
    vertices, faces = out.vertices[0].numpy(), head.layer.faces.numpy()
    w = np.array([(a, b, 8 - a - b) for a in range(9) for b in range(9 - a)], dtype=np.float64) / 8
    tree = cKDTree(np.einsum("sk,fkd->fsd", w, vertices[faces]).reshape(-1, 3))
    for c, serial in enumerate(serials):
        depth = np.load(gt / f"001/sequences/EXP-1-head/depth/cam_{serial}.npz")["depth"][t].astype(np.float64)
        rows, cols = np.nonzero(depth > 0)
        uv = torch.tensor(np.stack([cols + 0.5, rows + 0.5], 1), dtype=torch.float64)
        points = cams[c].unproject(uv[None], torch.tensor(depth[rows, cols])[None])[0].numpy()
        distance, _ = tree.query(points)
        # depth: float16 (~0.5 mm at 1 m), nearest of 2x2 subsamples unprojected at the pixel centre
        assert np.median(distance) < 0.0015 and np.percentile(distance, 90) < 0.004, serial


def test_color_calibration_undoes_each_camera_cast(dataset):
    raw, _, _, _ = dataset
    ccms = read_color_calibration(raw / "001/calibration/color_calibration.json")
    casts = studio.camera_color_casts(TINY["seed"], sorted(ccms))
    # mid-tones: a cast may push saturated darks out of gamut, where clipping is physical
    image = np.random.default_rng(0).uniform(0.2, 0.9, (8, 8, 3)).astype(np.float32)
    for serial, ccm in ccms.items():
        recorded = studio.apply_cast(image, casts[serial])
        np.testing.assert_allclose(apply_ccm(recorded, ccm), image, atol=2e-3)


def test_resume_redoes_only_missing_subjects(tmp_path):
    raw, _, _, first = generate(tmp_path, subjects=2, cameras=1, frames=2, resolution=64, preview=False)
    (raw / "_parts" / "002.parquet").unlink()  # as if killed before subject 002 committed
    config = StudioConfig(**{**TINY, "subjects": 2, "cameras": 1, "frames": 2, "resolution": 64, "preview": False})
    again = run_synth(config, str(raw), str(tmp_path / "gt"), str(tmp_path / "model"), executor="local")
    assert again.items_skipped == 1 and again.items_done == 1
    assert len(pq.read_table(again.manifest)) == len(pq.read_table(first.manifest))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="sequences"):
        StudioConfig(sequences=99)
    with pytest.raises(ValueError, match="frames"):
        StudioConfig(frames=1)
