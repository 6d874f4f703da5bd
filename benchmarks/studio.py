"""Synthetic studio generation speed, against rendering alone in the same run.

Prints one JSON object:
* ``render_only``: camera-frames/s of the head renderer alone (the studio's inherent cost);
* ``stage``: camera-frames/s of the synth stage (render + colour cast + noise + H.264 encode of
  colour and alpha + ground truth), on 1 and 2 Ray workers;
* the stage's time for the whole ``demo`` preset, extrapolated from the measured per-subject rate
  (subjects are independent items, so it is linear in the subject count).

Usage: python benchmarks/studio.py [--subjects 2 --preset demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from avat3r_core.config import build  # noqa: E402
from avat3r_core.synthetic import studio  # noqa: E402
from avat3r_core.synthetic.appearance import render_head, sample_appearance  # noqa: E402
from avat3r_core.synthetic.head import sample_identity  # noqa: E402
from avat3r_core.synthetic.studio import StudioConfig  # noqa: E402
from stages.runner import StageResources  # noqa: E402
from stages.synth import run_synth  # noqa: E402


def render_only(config: StudioConfig, model_dir: Path, frames: int) -> float:
    head = studio.HeadAssets.load(*studio.face_model_paths(str(model_dir)))
    serials, cams = studio.make_rig(config)
    w2c, K = cams.world_to_cam.numpy(), cams.K.numpy()
    start = time.perf_counter()
    for t in range(frames):
        render_head(head.layer, head.model, sample_appearance(t), w2c, K, config.width, config.height,
                    supersample=config.supersample, shape=sample_identity(t), jaw=np.array([0.1 * (t % 3), 0, 0]))
    return frames * len(serials) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=2, help="subjects per measured run (≥ 2 for 2 workers)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = parser.parse_args()

    import ray

    full = build(StudioConfig, {}, preset=args.preset)
    config = replace(full, subjects=args.subjects, preview=False)
    if args.smoke:
        config = replace(config, sequences=1, frames=2, cameras=2, resolution=64)
    per_subject = config.sequences * config.frames * config.cameras
    work = Path(tempfile.mkdtemp(prefix="avat3r-bench-studio-"))
    try:
        studio.write_face_model(str(work / "model"), config.seed)
        render_rate = render_only(config, work / "model", frames=4)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
        rates = {}
        for workers in (1, 2):
            out = work / f"run{workers}"
            start = time.perf_counter()
            run_synth(config, str(out / "raw"), str(out / "gt"), str(work / "model"),
                      resources=StageResources(concurrency=workers), executor="ray")
            rates[workers] = args.subjects * per_subject / (time.perf_counter() - start)
        result = {
            "preset": args.preset, "image": f"{config.width}x{config.height}", "supersample": config.supersample,
            "camera_frames_per_subject": per_subject,
            "render_only_camera_frames_per_s": round(render_rate, 1),
            "stage_camera_frames_per_s": {"1_worker": round(rates[1], 1), "2_workers": round(rates[2], 1)},
            "ratio_stage_1_worker_vs_render_only": round(rates[1] / render_rate, 3),
            "ratio_2_workers_vs_1": round(rates[2] / rates[1], 3),
            f"{args.preset}_preset_subjects": full.subjects,
            f"{args.preset}_preset_seconds_2_workers_extrapolated": round(full.subjects * per_subject / rates[2], 1),
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
