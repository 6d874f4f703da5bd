"""The capacity plan from stats files (hand-written here, in the runner's format) and a dataset
description: per-view costs, fixed costs, pixel scaling, K nodes; the CLI prints the same plan;
gpu_check on a machine without CUDA prints what it would run and exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from avat3r_core.capacity import Dataset, measured_costs, plan

REPO = Path(__file__).resolve().parents[1]


def write_stats(root: Path) -> None:
    stats = {  # (relative path, rows, items done, median item s, wall s, bytes)
        "frames/frames.stats.json": (24, 8, 0.5, 5.0, 2400),
        "priors/priors.stats.json": (24, 24, 0.1, 4.0, 24000),
    }
    for rel, (rows, done, median, seconds, nbytes) in stats.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "items_done": done, "item_seconds_median": median,
                                    "busy_seconds": median * done + 3.0, "seconds": seconds, "bytes_written": nbytes,
                                    "nodes": {"local": done}}))


def test_plan_scales_measured_costs_to_a_dataset(tmp_path):
    write_stats(tmp_path)
    measured = measured_costs(tmp_path, resolution=64)
    assert measured.views == 24 and [s.stage for s in measured.stages] == ["extract", "priors"]
    extract = measured.stages[0]
    # steady work: median 0.5 s x 8 items over 24 views; the warm-up in busy_seconds is fixed cost
    assert extract.busy_s_per_view == pytest.approx(4.0 / 24) and extract.fixed_s == pytest.approx(1.0)

    dataset = Dataset("d", participants=10, sequences=2, cameras=4, frames=30, frame_step=10, resolution=64)
    assert dataset.views == 240
    result = plan(measured, dataset, nodes=2, cpus_per_node=2)
    rows = {r["stage"]: r for r in result["stages"]}
    assert rows["extract"]["cpu_hours"] == pytest.approx(40.0 / 3600)
    assert rows["extract"]["wall_hours"] == pytest.approx((1.0 + 40.0 / 4) / 3600)  # 4 slots on 2 x 2 CPUs
    assert rows["extract"]["bytes"] == pytest.approx(24000)
    assert rows["priors"]["wall_hours"] == pytest.approx((4.0 - 2.4 + 24.0 / 4) / 3600)
    assert result["total"]["bytes"] == pytest.approx(24000 + 240000)
    # twice the crop size: the crop-sized stages do 4x the work and write 4x the bytes
    bigger = plan(measured, Dataset("d", 10, 2, 4, 30, 10, resolution=128), nodes=2, cpus_per_node=2)
    assert bigger["stages"][0]["cpu_hours"] == pytest.approx(4 * rows["extract"]["cpu_hours"])


def test_plan_command_prints_the_plan(tmp_path):
    write_stats(tmp_path / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"extract": {"preset": "tiny", "resolution": 64}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--params", str(tmp_path / "params.yaml"),
                           "--data-root", str(tmp_path / "data"), "--participants", "10", "--sequences", "2",
                           "--cameras", "4", "--frames", "30", "--frame-step", "10", "--resolution", "64",
                           "--nodes", "2", "--cpus-per-node", "2", "--json"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["dataset"]["views"] == 240 and result["total"]["bytes"] == pytest.approx(264000)


def test_gpu_check_without_cuda_says_what_it_would_run():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cuda"] is False and set(report["would_run"]) == {"rasterization", "ddp", "paper_timing"}
