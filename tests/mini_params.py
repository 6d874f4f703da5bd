"""The miniature ``params.yaml`` the multi-node and object-storage tests run the pipeline with:
3 people × 2 frames × 3 cameras, a few fit iterations and 2 training steps (what those tests check
is where items run and where data lives, not the fit or the model)."""

from __future__ import annotations


def mini_params(seed: int) -> dict:
    return {
        "synth": {"preset": "tiny", "seed": seed, "preview": False, "subjects": 3, "frames": 2, "cameras": 3},
        "extract": {"preset": "tiny"},
        "track": {"preset": "tiny", "landmarks": "ground_truth", "overlay_frames": 1,
                  "fit": {"rigid_iters": 5, "adam_iters": 10, "lbfgs_iters": 2}},
        "priors": {"preset": "tiny"},
        "pack": {"preset": "tiny", "split_fractions": [0.34, 0.33, 0.33]},
        "train": {"preset": "tiny", "schedule": {"steps": 2, "validate_every": 0}, "checkpoint": {"every": 2}, "scaling": {"cpus_per_worker": 1},
                  "data": {"preset": "tiny"}},
        "runtime": {"resources": {"default": {"num_cpus": 1, "max_errors": 2}}},
    }
