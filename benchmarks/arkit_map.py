"""Fit the ARKit-52 → expression-code map on a studio and print its fit error (JSON).

Pairs: MediaPipe's blendshape scores on the extracted crops (the most frontal ``--cameras`` per
frame) against the studio's ground-truth codes (:func:`avat3r_core.animation.arkit.studio_pairs`);
ridge fit with a held-out share (:func:`~avat3r_core.animation.arkit.fit_arkit_mapping`). The
reference for each error is predicting every code by the mean (``rms_mean_only``), measured on
the same pairs. ``--save`` writes the map (``arkit_mapping.npz``) beside the face model.

    python benchmarks/arkit_map.py --frames data/frames/frames.parquet --ground-truth data/ground_truth/synthetic \\
        --face-model data/models/studio_head [--save]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avat3r_core import storage  # noqa: E402
from avat3r_core.animation.arkit import fit_arkit_mapping, studio_pairs  # noqa: E402
from avat3r_core.animation.drivers import MAPPING_FILE  # noqa: E402
from avat3r_core.synthetic.studio import face_model_paths  # noqa: E402
from avat3r_core.tracking.landmarks import MediaPipeLandmarks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="data/frames/frames.parquet")
    ap.add_argument("--ground-truth", default="data/ground_truth/synthetic")
    ap.add_argument("--face-model", default="data/models/studio_head")
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = ap.parse_args()
    tmp = None
    if args.smoke:  # a 2-person, 6-frame studio: enough pairs for the fit to run, too few to mean anything
        tmp = tempfile.TemporaryDirectory(prefix="avat3r-arkit-map-")
        args.frames, args.ground_truth, args.face_model = smoke_studio(Path(tmp.name))
        args.cameras, args.save = 2, False
    t0 = time.perf_counter()
    with MediaPipeLandmarks() as detector:
        scores, codes = studio_pairs(args.frames, args.ground_truth, detector, cameras=args.cameras)
    model, _ = face_model_paths(args.face_model)
    mapping = fit_arkit_mapping(scores, codes, face_model_sha256=storage.sha256(model))
    if args.save:
        mapping.save(Path(args.face_model) / MAPPING_FILE)
    print(json.dumps({"benchmark": "arkit_map", "seconds": round(time.perf_counter() - t0, 1),
                      "cameras_per_frame": args.cameras, "fit_error": mapping.fit_error}, indent=1))
    if tmp is not None:
        tmp.cleanup()


def smoke_studio(root: Path) -> tuple[str, str, str]:
    import contextlib

    from avat3r_core.extract import ExtractConfig
    from avat3r_core.synthetic.studio import StudioConfig
    from stages.extract import run_extract
    from stages.synth import run_synth

    with contextlib.redirect_stdout(sys.stderr):  # stage progress bars: stdout carries only the JSON
        run_synth(StudioConfig(subjects=2, sequences=1, frames=6, cameras=4, resolution=224), str(root / "raw"),
                  str(root / "gt"), str(root / "model"), executor="local")
        run_extract(ExtractConfig(resolution=128), str(root / "raw"), str(root / "frames"), executor="local")
    return str(root / "frames/frames.parquet"), str(root / "gt"), str(root / "model")


if __name__ == "__main__":
    main()
