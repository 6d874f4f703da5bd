"""The preprocessed studio data that the capacity and scale-out benchmarks start from: the params
of a tiny studio run (4 cameras, 4 frames, one sequence per person, a short ground-truth fit) and
the preprocessing stages run on them with ``--executor local``."""

from __future__ import annotations

from pathlib import Path

import yaml

def studio_params(subjects: int, seed: int, cameras: int = 4, frames: int = 4) -> dict:
    """Params of a tiny studio run with ``subjects`` people; tracking runs a short fit (these
    benchmarks are about the pipeline, not the fit)."""
    return {"synth": {"preset": "tiny", "seed": seed, "preview": False, "subjects": subjects, "cameras": cameras,
                      "frames": frames},
            "extract": {"preset": "tiny"},
            "track": {"preset": "tiny", "landmarks": "ground_truth", "overlay_frames": 1,
                      "fit": {"rigid_iters": 5, "adam_iters": 20, "lbfgs_iters": 2}},
            "priors": {"preset": "tiny"},
            "pack": {"preset": "tiny", "split_fractions": [0.5, 0.25, 0.25]},
            "runtime": {"resources": {"default": {"num_cpus": 1, "max_errors": 2}}}}


def write_params(path: Path, params: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params))
    return path


def preprocess(params_path: str, data_root: str) -> str:
    """Run the preprocessing stages (:data:`pipelines.flows.PREPROCESS`) in this process, one item
    at a time (``local``); returns the data root as the stages resolved it."""
    from pipelines.flows import PREPROCESS, STAGES, DataLayout

    layout = DataLayout(data_root)
    for name in PREPROCESS:
        STAGES[name](params_path, layout, None, "local")
    return layout.root
