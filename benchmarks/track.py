"""Benchmark: FLAME tracking throughput on CPU, all frames per optimiser step vs one frame at a time.

Usage::

    python benchmarks/track.py                 # 16 cameras, 16 frames, 256 px, "default" fit preset
    python benchmarks/track.py --frames 8 --preset tiny

Prints one JSON object on stdout.

Setup: a synthetic studio run (1 subject, 1 sequence, ``--cameras`` cameras at ``--resolution`` px
height) is filmed into a temporary directory; its ground-truth 2D landmarks plus 1 px Gaussian
noise (per coordinate) are the observations. Both modes fit the same observations with the same
:class:`~avat3r_core.tracking.fit.FitConfig` (same rigid/Adam/L-BFGS iteration budget per
optimisation):

* ``batched``: ``frames_per_batch = 0``: every frame in one problem, one optimiser step updates
  all frames (shape shared);
* ``per_frame``: ``frames_per_batch = 1``: one problem per frame, run one after another (shape
  carried over from the previous frame).

``frames_per_s`` = frames / wall time of :func:`fit_sequence` (initialisation included, studio
filming excluded), median of ``--repeats`` runs. Quality (landmark error vs the noise-free
projections, mean vertex error as a fraction of the head's bounding-box diagonal) is reported
for both, so speed is not bought with accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads during the fit")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.cameras, args.frames, args.resolution, args.repeats, args.preset = 4, 2, 96, 1, "tiny"
    # a smoke run only has to go through every step of the fit, not converge
    iterations = dict(rigid_iters=10, adam_iters=20, lbfgs_iters=5) if args.smoke else {}

    import numpy as np
    import torch

    from avat3r_core.formats.calibration import read_nersemble_calibration
    from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding
    from avat3r_core.synthetic.studio import StudioConfig, face_model_paths
    from avat3r_core.tracking.fit import FitConfig, fit_sequence, flame_params_to_full
    from stages.synth import run_synth

    seq = "EXP-1-head"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = StudioConfig(subjects=1, sequences=1, frames=args.frames, cameras=args.cameras,
                           resolution=args.resolution, background_frames=1)
        run_synth(cfg, f"{tmp}/raw", f"{tmp}/gt", f"{tmp}/model", executor="local")
        model_path, emb_path = face_model_paths(f"{tmp}/model")
        layer = FlameLayer(load_flame_model(model_path), landmarks=load_landmark_embedding(emb_path), dtype=torch.float64)
        _, cams = read_nersemble_calibration(f"{tmp}/raw/001/calibration/camera_params.json", width=cfg.width,
                                             height=cfg.height, dtype=torch.float64)
        lm = np.load(f"{tmp}/gt/001/sequences/{seq}/landmarks2d.npz")
        gt = dict(np.load(f"{tmp}/gt/001/sequences/{seq}/flame_params.npz"))
    clean, vis = lm["landmarks"].astype(np.float64), lm["visible"]
    obs = clean + np.random.default_rng(0).normal(0.0, 1.0, clean.shape)
    vg = flame_params_to_full(layer, gt)
    head = float((vg[0].max(0).values - vg[0].min(0).values).norm())

    results = {}
    for mode, fpb in (("batched", 0), ("per_frame", 1)):
        fit_cfg = FitConfig.preset(args.preset, frames_per_batch=fpb, num_threads=args.threads, **iterations)
        times, res = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            res = fit_sequence(layer, cams, obs, vis, fit_cfg)
            times.append(time.perf_counter() - start)
        vf = flame_params_to_full(layer, res.params)
        seconds = statistics.median(times)
        results[mode] = {
            "seconds": round(seconds, 3), "frames_per_s": round(args.frames / seconds, 2),
            "optimiser_steps": res.iterations, "converged": res.converged,
            "landmark_err_px_vs_clean": round(float(np.linalg.norm(res.landmarks2d - clean, axis=-1)[vis].mean()), 3),
            "vertex_err_frac_of_head": round(float((vg - vf).norm(dim=-1).mean()) / head, 5),
        }
    out = {
        "benchmark": "track", "device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": args.threads,
        "python": platform.python_version(), "torch": torch.__version__,
        "cameras": args.cameras, "frames": args.frames, "resolution": [cfg.width, cfg.height], "landmarks": 68,
        "noise_px": 1.0, "fit_preset": args.preset, "iterations": {k: getattr(FitConfig.preset(args.preset, **iterations), k)
                                                                  for k in ("rigid_iters", "adam_iters", "lbfgs_iters")},
        "repeats": args.repeats, **results,
        "speedup_batched_vs_per_frame": round(results["per_frame"]["seconds"] / results["batched"]["seconds"], 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
