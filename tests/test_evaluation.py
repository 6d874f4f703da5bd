"""Held-out evaluation (avat3r_core.evaluation, stages.evaluate, `avat3r evaluate`) on tiny studio shards."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from avat3r_core.dataset.loader import make_loader
from avat3r_core.errors import FormatError
from avat3r_core.inference.checkpoint import load_trained_model
from avat3r_core.evaluation import (
    EvalConfig,
    GroundTruth68,
    TargetViewIndex,
    eval_loader_config,
    evaluate_report,
)
from avat3r_core.evaluation_report import LPIPS_NOT_COMPUTED
from avat3r_core.metrics import PSNR_CAP
from avat3r_core.tracking.landmarks import MEDIAPIPE_TO_IBUG68, mediapipe_to_ibug68
from tests.test_pack_loader import FEATURE_DIM, make_priors_and_tracking

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from avat3r_core.extract import ExtractConfig
    from avat3r_core.synthetic.studio import StudioConfig
    from avat3r_core.train.config import TrainConfig, build_model, build_optimizer
    from avat3r_core.train.state import save_checkpoint
    from stages.extract import run_extract
    from avat3r_core.dataset.pack import PackConfig
    from stages.pack import run_pack
    from stages.synth import run_synth

    root = tmp_path_factory.mktemp("evaluation")
    run_synth(StudioConfig(subjects=3, sequences=1, frames=3, cameras=4, resolution=96),
              str(root / "raw"), str(root / "gt"), str(root / "model"), executor="local")
    run_extract(ExtractConfig(resolution=SIZE), str(root / "raw"), str(root / "frames"), executor="local")
    make_priors_and_tracking(root / "frames", root / "tracking", root / "priors")
    run_pack(PackConfig(shard_size_mb=1.0, min_shards=1, seed=0), str(root / "frames/frames.parquet"),
             str(root / "tracking/tracking.parquet"), str(root / "priors/priors.parquet"), str(root / "shards"),
             executor="local")
    torch.manual_seed(0)
    config = TrainConfig.preset("tiny", model={"image_size": SIZE, "feature_dim": FEATURE_DIM})
    model = build_model(config)
    optimizer, scheduler = build_optimizer(model, config)
    save_checkpoint(root / "ckpt", model, optimizer, 7, scheduler=scheduler, config=config)
    cfg = EvalConfig(target_views=3, grid_samples=2)
    batches = list(make_loader(str(root / "shards"), eval_loader_config(cfg, "head"), split="test"))
    return {"root": root, "shards": str(root / "shards"), "frames": str(root / "frames/frames.parquet"),
            "gt": str(root / "gt"), "ckpt": root / "ckpt", "batches": batches, "config": cfg}


def _oracle(batch):
    """A 'method' whose renders are exactly the targets on the white background."""
    from avat3r_core.inference.predict import targets_on_background

    return targets_on_background(batch, torch.ones(3)).clamp(0, 1)


def test_identical_images_psnr_inf_per_view_and_capped_in_the_mean(data):
    report = evaluate_report(data["batches"], methods={"oracle": _oracle})
    rows = report.method_rows("oracle")
    assert rows and all(math.isinf(r["psnr"]) and r["psnr"] > 0 for r in rows)  # metrics.psnr: +inf
    assert all(r["ssim"] == pytest.approx(1.0, abs=1e-5) for r in rows)
    summary = report.summary("oracle")
    assert summary["psnr"] == PSNR_CAP  # capped like inference.predict.mean_psnr_ssim
    assert json.loads(json.dumps(report.metrics(), allow_nan=False))["oracle"]["psnr"] == PSNR_CAP
    assert "inf" in report.to_csv().splitlines()[1]


def test_every_target_view_finds_its_frames_row_and_gt_landmarks(data):
    views = TargetViewIndex(data["frames"])
    gt = GroundTruth68(data["gt"])
    for batch in data["batches"]:
        rows = views.rows_for(batch)
        assert all(r is not None for r in rows)
        T = batch.target_images.shape[1]
        for i, r in enumerate(rows):
            assert batch.keys[i // T].startswith(f"{r['subject']}_")
            assert int(r["frame"]) == int(batch.target_frames[i // T])
            np.testing.assert_allclose(np.asarray(r["K"]).reshape(3, 3), batch.target_cameras.K[i].numpy(), rtol=1e-5)
        pts, vis = gt.landmarks(rows)
        assert vis.any(axis=1).all()  # every view sees some landmarks
        assert (pts[vis] >= -0.5).all() and (pts[vis] <= SIZE + 0.5).all()  # inside the crop


def test_ground_truth_akd_against_itself_is_zero(data):
    gt = GroundTruth68(data["gt"])
    report = evaluate_report(data["batches"], methods={"oracle": _oracle}, views=TargetViewIndex(data["frames"]),
                             ground_truth=gt, detector=gt)  # the ground truth as the "detector"
    s = report.summary("oracle")
    assert s["akd_views"] == s["views"] > 0
    assert s["akd"] == 0.0 and s["akd_inner"] == 0.0 and s["akd_det"] == 0.0
    assert report.floor()["akd"] == 0.0
    md = report.to_markdown()
    assert "AKD floor" in md and "AKD unavailable" not in md


def test_baseline_equals_training_evaluate(data):
    from avat3r_core.inference.predict import mean_psnr_ssim

    expected = mean_psnr_ssim(data["batches"], None)
    report = evaluate_report(data["batches"], None)
    assert report.methods == ["baseline"]
    s = report.summary("baseline")
    assert s["views"] == expected["images"]
    assert s["psnr"] == pytest.approx(expected["psnr"], rel=1e-6)
    assert s["ssim"] == pytest.approx(expected["ssim"], rel=1e-6)


def test_table_has_our_rows_and_the_published_rows(data):
    model, _, _ = load_trained_model(data["ckpt"])
    report = evaluate_report(data["batches"], model, context={"split": "test"})
    md = report.to_markdown()
    table = [l for l in md.splitlines() if l.startswith("| ")]
    assert table[1].startswith("| ours") and table[2].startswith("| non-learned baseline")
    published = [l for l in table if "published, different data and resolution" in l]
    assert len(published) == 2 and "NeRSemble" in published[0] and "Ava-256" in published[1]
    assert "| 20.5 | 0.75 | 0.33 | 3.7 |" in published[0] and "| 20.7 | 0.71 | 0.33 | 4.8 |" in published[1]
    assert LPIPS_NOT_COMPUTED in md
    assert "AKD unavailable: no landmark detector given" in md
    assert "CSIM unavailable: no identity network given" in md
    assert report.metrics()["csim_status"] == "unavailable: no identity network given"


class _ColourIdentity:
    """A stand-in identity network: the embedding is the image's mean colour (+1), so a render
    identical to its target scores exactly 1; no face (None) on an all-white image."""

    available, reason = True, ""

    def embed(self, image, upscale=1):
        if (image == 255).all():
            return None
        return np.r_[image.reshape(-1, 3).mean(axis=0) / 255.0, 1.0]


def test_csim_per_view_counts_and_the_other_people_reference(data):
    white = lambda b: torch.ones_like(_oracle(b))  # noqa: E731 - a "method" on which no face is found
    # one held-out person: no "other people" reference, and the report says so
    alone = evaluate_report(data["batches"], methods={"oracle": _oracle}, views=TargetViewIndex(data["frames"]),
                            identity=_ColourIdentity())
    assert alone.csim_other_people["csim"] is None and "fewer than two" in alone.csim_other_people["note"]
    assert "not measured: fewer than two held-out people" in alone.to_markdown()
    # every split's people (three) for the reference
    batches = [b for split in ("train", "val", "test")
               for b in make_loader(data["shards"], eval_loader_config(data["config"], "head"), split=split)]
    report = evaluate_report(batches, methods={"oracle": _oracle, "white": white},
                             views=TargetViewIndex(data["frames"]), identity=_ColourIdentity(), identity_upscale=3)
    oracle, blank = report.summary("oracle"), report.summary("white")
    assert oracle["csim"] == pytest.approx(1.0) and oracle["identity_distance"] == pytest.approx(0.0, abs=1e-9)
    assert oracle["csim_views"] == oracle["identity_faces_found"] == oracle["views"] > 0
    assert blank["csim"] is None and blank["csim_views"] == blank["identity_faces_found"] == 0
    # the reference: every target against the other held-out people's targets, by hand
    embs = [(r["subject"], _ColourIdentity().embed(im)) for b in batches
            for r, im in zip(TargetViewIndex(data["frames"]).rows_for(b),
                             (_oracle(b).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))]
    from avat3r_core.identity import cosine

    expected = np.mean([cosine(a, b) for i, (s, a) in enumerate(embs) for j, (t, b) in enumerate(embs) if s != t])
    ref = report.csim_other_people
    assert len({s for s, _ in embs}) >= 2 and ref["people"] == len({s for s, _ in embs})
    assert ref["csim"] == pytest.approx(expected) and ref["views"] == len(embs)
    metrics = report.metrics()
    assert metrics["csim_status"].startswith("computed (dlib ResNet-128") and "not ArcFace" in metrics["csim_status"]
    assert metrics["identity_target_faces_found"] == oracle["views"] and metrics["oracle"]["csim"] == pytest.approx(1.0)
    md = report.to_markdown()
    row = next(l for l in md.splitlines() if l.startswith("| oracle"))
    assert row.endswith(f"| 1.000 | {oracle['views']}/{oracle['views']} |")
    assert "CSIM reference" in md and "enlarged 3x" in md and "Not ArcFace" in md
    assert "csim" in report.to_csv().splitlines()[0].split(",")


def test_lpips_computed_when_weight_files_are_given(data, tmp_path):
    from avat3r_core.lpips import LPIPS, load_lpips
    from avat3r_core.metrics import lpips_metric

    torch.manual_seed(1)
    net = LPIPS("alex")
    sd = net.state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, tmp_path / "alex_backbone.pth")
    torch.save({k: v.abs() for k, v in sd.items() if k.startswith("lin")}, tmp_path / "alex.pth")
    lp = load_lpips("alex", tmp_path / "alex_backbone.pth", tmp_path / "alex.pth")
    batch = data["batches"][0]
    report = evaluate_report([batch], None, lpips_model=lp, lpips_status="LPIPS: computed (test)")
    from avat3r_core.inference.predict import predict_images, targets_on_background

    expected = lpips_metric(predict_images(batch, None), targets_on_background(batch, torch.ones(3)).clamp(0, 1), model=lp)
    got = [r["lpips"] for r in report.method_rows("baseline")]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5)
    assert report.summary("baseline")["lpips"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_missing_or_ill_formed_checkpoint_names_the_directory(data, tmp_path):
    from stages.evaluate import run_evaluate

    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FormatError, match="no_such_checkpoint"):
        run_evaluate(missing, data["shards"], tmp_path / "out")
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(FormatError, match="empty_ckpt.*no checkpoint.pt"):
        run_evaluate(empty, data["shards"], tmp_path / "out")
    bad = tmp_path / "bad_ckpt"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(FormatError, match="bad_ckpt"):
        run_evaluate(bad, data["shards"], tmp_path / "out")
    assert not (tmp_path / "out").exists()

    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--checkpoint", str(missing), "--shards", data["shards"],
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 3
    assert "no_such_checkpoint" in result.output.replace("\n", "")


def test_run_evaluate_writes_the_four_outputs(data, tmp_path):
    from stages.evaluate import run_evaluate

    out = tmp_path / "eval"
    config = EvalConfig(target_views=3, grid_samples=2, max_samples=3)
    metrics = run_evaluate(data["ckpt"], data["shards"], out, "test", frames_manifest=data["frames"],
                           ground_truth=data["gt"], config=config)
    assert set(metrics["outputs"]) == {"metrics.json", "report.md", "per_view.csv", "grid.png"}
    on_disk = json.loads((out / "metrics.json").read_text())  # strict JSON (no NaN)
    assert on_disk["step"] == 7 and on_disk["samples"] == 3 and on_disk["resolution"] == [SIZE, SIZE]
    assert on_disk["lpips_status"] == LPIPS_NOT_COMPUTED
    assert on_disk["ours"]["views"] == on_disk["baseline"]["views"] == 9
    # AKD: either computed by the detector, or unavailable with its reason (never made up)
    if on_disk["akd_status"] != "computed":
        assert on_disk["akd_status"].startswith("unavailable: ") and on_disk["ours"]["akd"] is None
    # CSIM with dlib's network (installed by make setup): computed, faces counted (a 32² synthetic
    # crop enlarged 2x is below what dlib's detector finds, so the counts may be 0 and CSIM None)
    assert on_disk["csim_status"].startswith("computed (dlib ResNet-128"), on_disk["csim_status"]
    for m in ("ours", "baseline"):
        s = on_disk[m]
        assert 0 <= s["csim_views"] <= s["identity_faces_found"] <= s["views"]
        assert (s["csim"] is None) == (s["csim_views"] == 0)
        assert s["csim"] is None or -1.0 <= s["csim"] <= 1.0
    assert "CSIM↑ (dlib)" in (out / "report.md").read_text()
    rows = list(csv.DictReader(io.StringIO((out / "per_view.csv").read_text())))
    assert len(rows) == 18 and {r["method"] for r in rows} == {"ours", "baseline"}
    assert all(r["camera"] for r in rows)
    from PIL import Image

    with Image.open(out / "grid.png") as im:  # 2 samples × 2 views; inputs | target | ours | baseline
        assert im.size == ((4 + 1 + 2) * SIZE, 14 + 4 * SIZE)


def test_mediapipe_to_ibug68_table():
    assert len(MEDIAPIPE_TO_IBUG68) == 68 and all(0 <= i < 478 for ids in MEDIAPIPE_TO_IBUG68 for i in ids)
    pts = np.random.default_rng(0).uniform(0, 100, (2, 478, 2))
    out = mediapipe_to_ibug68(pts)
    assert out.shape == (2, 68, 2)
    np.testing.assert_allclose(out[:, 36], pts[:, 33])  # right eye outer corner
    np.testing.assert_allclose(out[:, 3], (pts[:, 132] + pts[:, 58]) / 2)


def test_akd_unavailable_with_the_reason_when_the_detector_finds_no_face(data):
    class Blind:
        name = "blind test detector"

        def __call__(self, images, rows):
            n = len(images)
            return np.zeros((n, 68, 2)), np.zeros(n, bool)

    report = evaluate_report(data["batches"], None, views=TargetViewIndex(data["frames"]),
                             ground_truth=GroundTruth68(data["gt"]), detector=Blind())
    assert report.akd_status.startswith("the detector (blind test detector) found no face")
    metrics = report.metrics()
    assert metrics["akd_status"].startswith("unavailable: ") and metrics["baseline"]["akd"] is None
    assert metrics["detector_floor"] is None
    md = report.to_markdown()
    assert "AKD unavailable: the detector (blind test detector) found no face" in md
    assert "| unavailable | unavailable | unavailable |" in md and "AKD floor" not in md


def test_evaluation_skips_shards_that_do_not_match_the_index_and_says_so(data, tmp_path):
    """The sweep: one shard truncated, one with flipped bytes, one gone, and evaluate said "36
    held-out samples" without a word about the rest. Now each is checked against the index first;
    report.md, metrics.json and `shards stats` count what was skipped and why."""
    from avat3r_core.dataset.pack import PackConfig, read_index, shard_stats
    from stages.evaluate import run_evaluate
    from stages.pack import run_pack

    root, shards = data["root"], tmp_path / "shards"
    run_pack(PackConfig(shard_size_mb=1.0, min_shards=3, seed=0), str(root / "frames/frames.parquet"),
             str(root / "tracking/tracking.parquet"), str(root / "priors/priors.parquet"), str(shards),
             executor="local")
    test = [r for r in read_index(str(shards)) if r["split"] == "test"]
    assert [r["count"] for r in test] == [1, 1, 1]
    first = shards / test[0]["path"]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # truncated
    config = EvalConfig(target_views=2, grid_samples=1)
    metrics = run_evaluate(data["ckpt"], str(shards), tmp_path / "eval", "test", config=config)
    assert metrics["samples"] == 2 and metrics["samples_skipped"] == 1 and metrics["index_samples"] == 3
    assert metrics["skipped_shards"][0]["shard"] == test[0]["path"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["samples_skipped"] == 1
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"Skipped: 1 of the split's 3 samples" in report and test[0]["path"] in report

    second = shards / test[1]["path"]
    flipped = bytearray(second.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    second.write_bytes(bytes(flipped))
    (shards / test[2]["path"]).unlink()
    stats = shard_stats(str(shards))["test"]
    assert (stats["shards"], stats["samples"], stats["readable_shards"], stats["readable_samples"]) == (3, 3, 0, 0)
    problems = stats["unreadable"]
    assert problems[test[2]["path"]] == ["missing file"]
    assert "sha256 differs from the index" in problems[test[1]["path"]]
    assert any("size" in p for p in problems[test[0]["path"]])
    with pytest.raises(FormatError, match="no readable shard in split 'test'.*missing file"):
        run_evaluate(data["ckpt"], str(shards), tmp_path / "eval2", "test", config=config)


def test_pack_leaves_out_non_finite_maps_and_tracking_naming_the_rows(data, tmp_path):
    """The sweep: NaN/Inf blocks in position maps were packed, flagged only by `shards verify`,
    and evaluated (those views at 9.2 dB pulled the mean down). Pack now leaves them out, by name."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from avat3r_core.dataset.pack import PackConfig, build_samples, verify_shards
    from avat3r_core.ids import make_id
    from stages.pack import run_pack

    root = data["root"]
    shutil.copytree(root / "priors", tmp_path / "priors")
    prior = pq.read_table(tmp_path / "priors" / "priors.parquet").to_pylist()[0]
    with np.load(tmp_path / "priors" / prior["position"]) as z:
        position, confidence = z["position"].copy(), z["confidence"]
    position[4:12, 4:12] = np.nan
    position[0, 0] = np.inf
    np.savez(tmp_path / "priors" / prior["position"], position=position, confidence=confidence)
    tracking = pq.read_table(root / "tracking" / "tracking.parquet").to_pylist()
    other = next(t for t in tracking if (t["subject"], t["frame"]) != (prior["subject"], prior["frame"]))
    other["rotation"] = [0.0, float("nan"), 0.0]
    pq.write_table(pa.Table.from_pylist(tracking), tmp_path / "tracking.parquet")

    samples, excluded = build_samples(str(root / "frames/frames.parquet"), str(tmp_path / "tracking.parquet"),
                                      str(tmp_path / "priors" / "priors.parquet"))
    reasons = {e["id"]: e["reason"] for e in excluded}
    assert prior["id"] in reasons and prior["position"] in reasons[prior["id"]] and "NaN or Inf" in reasons[prior["id"]]
    key = make_id(other["subject"], other["sequence"], other["frame"])
    assert reasons[key] == "tracking rotation holds NaN or Inf"
    assert key not in {s.key for s in samples}
    run_pack(PackConfig(shard_size_mb=1.0, min_shards=1, seed=0), str(root / "frames/frames.parquet"),
             str(tmp_path / "tracking.parquet"), str(tmp_path / "priors" / "priors.parquet"), str(tmp_path / "shards"),
             executor="local")
    assert verify_shards(str(tmp_path / "shards"))["ok"]  # nothing non-finite reached a shard
    assert prior["id"] in pq.read_table(tmp_path / "shards" / "excluded.parquet").column("id").to_pylist()
