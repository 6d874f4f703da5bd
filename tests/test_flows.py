"""End to end: the Prefect flows and the CLI on a miniature studio, through Ray."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pyarrow.parquet as pq
import yaml


def write_params(path, train_steps=4, **synth):
    params = {
        "synth": {"preset": "tiny", "seed": 3, "preview": True, **synth},
        "extract": {"preset": "tiny"},
        "track": {"preset": "tiny", "landmarks": "ground_truth", "noise_px": 0.25},  # 1 px at 256 px
        "priors": {"preset": "tiny"},
        "pack": {"preset": "tiny", "split_fractions": [0.5, 0.5, 0.0]},
        "train": {"preset": "tiny", "schedule": {"steps": train_steps, "validate_every": 2}, "checkpoint": {"every": 2}, "scaling": {"cpus_per_worker": 1},
                  "data": {"preset": "tiny"}},
        "evaluate": {"preset": "tiny", "split": "val", "detector": "none"},
        "reconstruct": {"preset": "tiny", "split": "val", "turntable_frames": 2},
        "runtime": {"resources": {"default": {"num_cpus": 1, "max_errors": 2}}},
    }
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_demo_flow_runs_the_built_stages_and_is_resumable(prefect_harness, ray_session, tmp_path):
    from pipelines.flows import demo_flow

    params = write_params(tmp_path / "params.yaml")
    result = demo_flow(params_path=params, data_root=str(tmp_path / "data"))
    synth, extract, track, priors, pack, train, reconstruct, evaluate = result["stages"]
    assert synth["stage"] == "synth" and synth["items_done"] == 2 and synth["items_failed"] == 0
    rows = pq.read_table(synth["manifest"]).to_pylist()
    assert {r["subject"] for r in rows} == {"001", "002"}
    assert extract["stage"] == "extract" and extract["items_failed"] == 0
    frames = pq.read_table(extract["manifest"]).to_pylist()
    assert len(frames) == 2 * 4 * 3 and (tmp_path / "data/frames" / frames[0]["image"]).exists()
    assert track["stage"] == "track" and track["items_failed"] == 0
    tracking = pq.read_table(track["manifest"]).to_pylist()
    assert len(tracking) == 2 * 3 and len(tracking[0]["expression_code"]) == 135
    assert priors["stage"] == "priors" and priors["items_failed"] == 0
    maps = pq.read_table(priors["manifest"]).to_pylist()
    assert len(maps) == len(frames) and {m["position_source"] for m in maps} == {"ground_truth"}
    assert {m["feature_source"] for m in maps} == {"efficientnet_lite0_imagenet"}
    assert pack["stage"] == "pack" and pack["items_failed"] == 0
    from avat3r_core.dataset.pack import verify_shards

    report = verify_shards(str(tmp_path / "data/shards"))
    assert report["ok"] and report["samples"] == 2 * 3  # every (subject, sequence, frame) once
    verify = run_cli("shards", "verify", str(tmp_path / "data/shards"))
    assert verify.returncode == 0 and "all shards match the index" in verify.stdout
    assert run_cli("shards", "stats", str(tmp_path / "data/shards")).returncode == 0
    assert (tmp_path / "data/ground_truth/synthetic/previews/001.png").exists()
    # training: sized from the shards (64² crops, 4 views), validated on the held-out subject
    assert train["stage"] == "train" and train["items_done"] == 4 and train["items_failed"] == 0
    metrics = json.loads((tmp_path / "data/train/metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["val_psnr"] > 10 and metrics["baseline_val_psnr"] > 10
    assert (tmp_path / "data/train/checkpoint/checkpoint.pt").exists()
    from avat3r_core.weights import safe_torch_load

    stored = safe_torch_load(tmp_path / "data/train/checkpoint/checkpoint.pt")["config"]["model"]
    assert stored["image_size"] == 64 and stored["feature_dim"] == 112  # tiny priors keep all channels
    assert list((tmp_path / "data/train/val").glob("*.png"))
    with (tmp_path / "data/train/plots/val.csv").open(newline="") as f:
        val_rows = list(csv.DictReader(f))  # shards carry the input frames' codes: every code is scored
    assert val_rows and all(math.isfinite(float(r[k])) for r in val_rows
                            for k in ("psnr", "psnr_inputs_code", "psnr_inputs_expression", "psnr_neutral_code"))
    # evaluation of the checkpoint beside the baseline on the held-out subject
    assert evaluate["stage"] == "evaluate" and evaluate["items_done"] > 0
    report = (tmp_path / "data/reports/evaluation/report.md").read_text()
    assert "non-learned baseline" in report and "published" in report
    assert "target − inputs' expression (both with the target's head pose)" in report
    assert result["report"] == str(tmp_path / "data/reports/evaluation/report.md")
    # the held-out subject as an avatar: .ply, preview, turntable, animation, in the library index
    assert reconstruct["stage"] == "reconstruct" and reconstruct["items_done"] == 1 and reconstruct["items_failed"] == 0
    (avatar,) = pq.read_table(tmp_path / "data/avatars/index.parquet").to_pylist()
    assert avatar["status"] == "ok" and avatar["mode"] == "capture"
    for key in ("ply", "preview", "turntable", "animation"):
        assert (tmp_path / "data/avatars" / avatar[key]).stat().st_size > 0
    stats = json.loads((tmp_path / "data/raw/synthetic/synth.stats.json").read_text())
    assert stats["bytes_written"] > 0 and stats["items_per_s"] > 0
    assert not any(s["cached"] for s in result["stages"])
    # nothing changed: every stage is a Prefect cache hit (no Ray work at all)
    again = demo_flow(params_path=params, data_root=str(tmp_path / "data"))
    assert all(s["cached"] for s in again["stages"]), [(s["stage"], s["cached"]) for s in again["stages"]]
    # a lost output reruns its stage, which skips every committed item
    (tmp_path / "data/tracking/tracking.parquet").unlink()
    # more training steps: only train reruns, resuming from its last checkpoint
    write_params(tmp_path / "params.yaml", train_steps=6)
    third = demo_flow(params_path=params, data_root=str(tmp_path / "data"))
    assert [s["cached"] for s in third["stages"]] == [True, True, False, True, True, False, False, False]
    track3, train3 = third["stages"][2], third["stages"][5]
    assert track3["items_done"] == 0 and track3["items_skipped"] == 2
    assert train3["items_skipped"] == 4 and train3["items_done"] == 2


def run_cli(*args):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, env=env)


def test_cli_stage_run_and_inspection(tmp_path):
    params = write_params(tmp_path / "params.yaml", subjects=1, cameras=2, frames=2, resolution=64)
    data = tmp_path / "data"
    done = run_cli("stage", "run", "synth", "--params", params, "--data-root", str(data), "--executor", "local")
    assert done.returncode == 0, done.stdout + done.stderr
    inspect = run_cli("ingest", "inspect", str(data / "raw/synthetic"))
    assert inspect.returncode == 0 and "EXP-1-head" in inspect.stdout and "no problems found" in inspect.stdout
    quick = run_cli("ingest", "inspect", str(data / "raw/synthetic"), "--quick")  # headers only: the same table
    assert quick.returncode == 0 and quick.stdout == inspect.stdout
    stats = run_cli("stage", "stats", str(data / "raw/synthetic"))
    assert stats.returncode == 0 and "synth" in stats.stdout
    errors = run_cli("stage", "errors", str(data / "raw/synthetic"))
    assert errors.returncode == 0 and "no failed items" in errors.stdout


def test_cli_exit_codes(tmp_path):
    assert run_cli("synth", "--frames", "1").returncode == 2  # bad argument
    bad = write_params(tmp_path / "bad.yaml", colour="red")
    result = run_cli("stage", "run", "synth", "--params", bad, "--data-root", str(tmp_path / "d"), "--executor", "local")
    assert result.returncode == 3 and "colour" in result.stdout  # bad input names the key
    assert run_cli("stage", "run", "nope").returncode == 2
    info = run_cli("model", "info", "--preset", "tiny", "--json")
    assert info.returncode == 0 and json.loads(info.stdout)["parameters"]["total"] > 0
    help_text = run_cli("--help").stdout
    assert "Exit codes" in help_text and "synth" in help_text
