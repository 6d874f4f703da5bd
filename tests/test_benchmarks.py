"""Every benchmark the README quotes runs on a clean clone: each one's ``--smoke`` size, end to end.

The smoke sizes measure nothing worth quoting; they keep the scripts from rotting (the loader
benchmark once crashed on its own shards after the loader's default frame changed, and nobody
noticed until a user tried to reproduce the README). Each run must print one JSON object whose
measured figures are positive numbers.

The runs are subprocesses that spend much of their time starting up (imports, Ray, Chromium) on
one core, so they run two at a time, the longest first, while the tests collect their results
in order: the module costs about half of their sum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# benchmark -> (path into its JSON to a measured figure that must be a positive number, ...)
FIGURES = {
    "arkit_map": (("seconds",), ("fit_error", "pairs")),
    "capacity": (("calibrated_on", "views"), ("scales", "1", "total_predicted_s"), ("scales", "1", "total_ratio")),
    "expression_path": (("input_choice", "plain", "samples"), ("gradients", "grad_norm_mean", "head"),
                        ("cross_attention_at_init", "layer0_output_over_token_norm"), ("overfit", "final", "samples"),
                        ("overfit", "final", "target_mouth_psnr")),
    "extract": (("stage_frames_per_s", "1_worker"), ("decode_only_frames_per_s", "pyav"),
                ("ratio_stage_1_worker_vs_decode_only",), ("ratio_2_workers_vs_1",),
                ("ratio_stage_in_process_vs_decode_only_cpu",), ("ratio_ceiling_decode_only_cpu",),
                ("stage_decodes_only", "frames_or_images")),
    "gallery": (("build_s",), ("avatars", 0, "first_frame_ms", "splat"), ("avatars", 0, "ply_vs_splat")),
    "loader": (("raw_loop", "samples_per_s"), ("loader_0_workers", "items_per_s"), ("ratio_2_workers",)),
    "priors": (("backends", "ground_truth", "images_per_s"), ("stage", "images_per_s")),
    "real_photos": (("avatars",), ("per_photo", "astronaut", "fit_residual_px"),
                    ("per_photo", "grace_hopper", "prepare_s"), ("reference", "astronaut_vs_grace_hopper", "distance")),
    "reconstruct": (("avatars_per_minute",), ("driving", "cached_frames_per_s")),
    "render": (("results", 0, "cpu", "median_s"), ("results", 0, "speedup_baseline_over_cpu")),
    "scale_out": (("cluster", "ratio_items_per_s_2_vs_1", "extract"), ("dvc_s3", "push_MB_per_s"),
                  ("loader_s3", "ratio_s3_vs_local")),
    "studio": (("render_only_camera_frames_per_s",), ("ratio_2_workers_vs_1",)),
    "track": (("batched", "frames_per_s"), ("speedup_batched_vs_per_frame",)),
    "track_detector": (("mean", "ground_truth", "landmark_err_px"), ("ratio_landmark_err_mediapipe68_vs_gt",),
                       ("per_subject", 0, "detect_s")),
    "train": (("workers_2", "samples_per_s"), ("workers_2", "final_train_loss")),
}


def run_smoke(name: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"benchmarks/{name}.py --smoke failed:\n{proc.stderr[-4000:]}"
    start = proc.stdout.index("{")  # anything before the JSON object is a library's chatter
    return json.loads(proc.stdout[start:])


# the slowest smoke runs (seconds on the 2-core CI machine), started first; the rest follow in name order
LONGEST_FIRST = ("scale_out", "gallery", "extract", "capacity", "train", "expression_path", "studio")


def skip_reason(name: str) -> str:
    if name == "gallery":
        from avat3r_core.gallery.browser import browser_unavailable

        return browser_unavailable() or ""
    return ""


@pytest.fixture(scope="module")
def smoke_runs(request):
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_benchmark_smoke_prints_measured_figures"}
    order = [n for n in LONGEST_FIRST if n in FIGURES] + [n for n in sorted(FIGURES) if n not in LONGEST_FIRST]
    pool = ThreadPoolExecutor(max_workers=2)
    runs: dict[str, Future] = {name: pool.submit(run_smoke, name) for name in order
                               if name in selected and not skip_reason(name)}
    yield runs
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_benchmark_smoke_prints_measured_figures(name, smoke_runs):
    if reason := skip_reason(name):
        pytest.skip(reason)
    result = smoke_runs[name].result()
    for path in FIGURES[name]:
        value = result
        for key in path:
            value = value[key]
        assert isinstance(value, (int, float)) and value > 0, f"{name}: {path} = {value!r}"

