"""Training throughput: 1 vs 2 Ray Train (DDP, gloo) CPU workers on the ``tiny`` preset, same run.

Prints one JSON object:
* ``workers_<n>``: for n = 1 and 2 Ray Train workers (``TorchTrainer``, 1 CPU and 1 torch thread each): the mean
  step-time split measured inside the loop on rank 0 (``data``: next batch + to device;
  ``forward``: network; ``render``: rasterising the target views; ``backward``: backward + all-reduce
  (DDP) + clip + Adam), ``samples_per_s`` (global batch / step time, first ``--warmup`` steps left
  out), ``fit_s`` (wall time of ``trainer.fit()``: Ray worker start-up, process group, training,
  checkpoints), and ``samples_per_s_incl_warmup`` (from metrics.json: every step, including the
  numba/torch warm-up);
* ``workers_1_cpus_2``: reference, 1 worker given both CPUs (2 torch threads);
* ``speedup_2_vs_1``: samples/s of 2 workers / 1 worker (1 CPU each).

Data: the in-memory synthetic source (:class:`avat3r_core.train.synthetic.SyntheticSource`): random
Gaussian-blob "heads" rendered at ``--size``², ``--inputs`` input views with exact position maps
and a random stand-in feature map (the tiny model's 32 channels), ``--targets`` target views.

Usage: python benchmarks/train.py [--steps 40 --warmup 5 --size 64 --inputs 4 --targets 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from avat3r_core.train.config import TrainConfig
from avat3r_core.train.loop import step_time_summary
from avat3r_core.train.synthetic import SyntheticSource
from stages.ray_runtime import ensure_ray  # noqa: E402
from stages.train import TrainScaling, run_train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reference-2cpu", action=argparse.BooleanOptionalAction, default=True,
                    help="also run 1 worker with 2 CPUs (2 torch threads): one process using the whole box")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.size, args.inputs, args.targets, args.samples = 4, 1, 32, 2, 2, 2
        args.workers, args.reference_2cpu = [2], False  # the DDP path, the one most likely to rot

    ensure_ray(num_cpus=max(2, max(args.workers)), dashboard=False)
    out: dict = {"preset": "tiny", "device": "cpu", "image_size": args.size, "input_views": args.inputs,
                 "target_views": args.targets, "batch_per_worker": 1, "steps": args.steps,
                 "warmup_steps_excluded": args.warmup, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="avat3r-train-bench-") as tmp:
        runs = [(n, 1) for n in args.workers] + ([(1, 2)] if args.reference_2cpu else [])
        for n, cpus in runs:
            config = TrainConfig.preset("tiny", schedule=dict(steps=args.steps, validate_every=0), checkpoint=dict(every=args.steps),
                                        model={"image_size": args.size, "num_views": args.inputs})
            source = SyntheticSource(num_samples=args.samples, size=args.size, num_inputs=args.inputs,
                                     num_targets=args.targets, feature_dim=config.model_config().feature_dim)
            key = f"workers_{n}" if cpus == 1 else f"workers_{n}_cpus_{cpus}"
            run_dir = Path(tmp) / key
            t0 = time.perf_counter()
            metrics = run_train(config, source, run_dir, scaling=TrainScaling(num_workers=n, cpus_per_worker=cpus),
                                name=key)
            fit_s = time.perf_counter() - t0
            split = step_time_summary(run_dir / "train_log.csv", skip_first=args.warmup)
            out[key] = {
                "num_workers": n, "cpus_per_worker": cpus,
                "samples_per_s": split["samples_per_s"],
                "step_s": split["step"],
                "split_s": {k: split[k] for k in ("data", "forward", "render", "backward")},
                "split_fraction": {k: split[k] / split["step"] for k in ("data", "forward", "render", "backward")},
                "steps_measured": split["rows"],
                "samples_per_s_incl_warmup": metrics["samples_per_s"],
                "fit_s": fit_s,
                "final_train_loss": metrics["final_train_loss"],
                "torch_threads_per_worker": json.loads((run_dir / "ranks" / "rank_0.json").read_text())["torch_threads"],
            }
    if "workers_1" in out and "workers_2" in out:
        out["speedup_2_vs_1"] = out["workers_2"]["samples_per_s"] / out["workers_1"]["samples_per_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
