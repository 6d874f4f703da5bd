"""Benchmark: real photographs become avatars with the default picture path, measured per photo.

Usage::

    python benchmarks/real_photos.py                   # image mode, 64 px random-init tiny model, 256 px renders
    python benchmarks/real_photos.py --image-size 128 --checkpoint data/models/checkpoints/demo
    python benchmarks/real_photos.py --smoke           # seconds: 32 px network, 64 px renders (the tests)

Prints one JSON object on stdout.

Photos: scikit-image's astronaut (512 x 512) and matplotlib's Grace Hopper (512 x 600), both
public domain, each one ``mode: image`` library row with default settings: MediaPipe landmarks
(478 points → iBUG-68 → the studio head's 68-point embedding), uncalibrated face-model fit,
MediaPipe selfie-segmentation matte, ``face_model`` position maps, through
:func:`stages.reconstruct.run_reconstruct` (``tiny`` preset but ``--render-size`` renders).

The network: ``--checkpoint`` if given (e.g. the demo's, trained on the synthetic studio only),
else a random-init ``tiny`` network at ``--image-size``. Its Gaussian head starts near zero, so
each Gaussian sits on the fitted face-model surface with its pixel's colour: the figures then
measure the picture path (fit, matte, framing) rather than a learned model.

Per photo: faces found, fit residual (px, in the decoded picture), the fitted head pose, matte
source and fraction, input-view PSNR inside the matte (and inside matte ∩ Gaussians), identity
(dlib ResNet-128: cosine similarity and distance, photo crop vs the avatar at 0, ±20, ±40° yaw),
seconds of preparation. References measured in the same run with the same network: the
astronaut's photo vs Grace Hopper's (different people) and vs its own mirror image (same person).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--render-size", type=int, default=256)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run: 32 px network, 64 px renders "
                    "(the test suite runs it; too small for dlib to find faces in the renders)")
    args = ap.parse_args()
    if args.smoke:
        args.image_size, args.render_size = 32, 64

    import logging

    import matplotlib
    import numpy as np
    import pyarrow.parquet as pq
    import skimage
    import torch

    from avat3r_core.identity import NETWORK, FaceIdentity, cosine
    from avat3r_core.reconstruct.library import write_library
    from avat3r_core.reconstruct.pictures import read_picture
    from avat3r_core.synthetic.studio import face_model_paths, write_face_model
    from avat3r_core.train.config import TrainConfig, build_model
    from avat3r_core.train.state import save_checkpoint
    from stages.reconstruct import ReconstructConfig, run_reconstruct

    logging.basicConfig(level=logging.ERROR)
    photos = {"astronaut": str(Path(skimage.__file__).parent / "data" / "astronaut.png"),
              "grace_hopper": str(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with contextlib.redirect_stdout(sys.stderr):
            write_face_model(str(root / "model"), seed=0)
        model_path, emb_path = face_model_paths(str(root / "model"))
        checkpoint = args.checkpoint
        if not checkpoint:
            torch.manual_seed(0)
            tcfg = TrainConfig.preset("tiny", model={"image_size": args.image_size, "feature_dim": 0})
            net = build_model(tcfg)
            save_checkpoint(root / "ckpt", net, torch.optim.Adam(net.parameters()), 0, config=tcfg)
            checkpoint = str(root / "ckpt")
        cfg = ReconstructConfig.preset("tiny", face_model=model_path, landmark_embedding=emb_path,
                                       render_size=args.render_size)
        lib = write_library([{"avatar_id": k, "mode": "image", "source": p} for k, p in photos.items()],
                            root / "photos.csv")
        summary = run_reconstruct(cfg, str(lib), checkpoint, str(root / "avatars"), executor="local",
                                  show_progress=False)
        index = {r["id"]: r for r in pq.read_table(root / "avatars" / "index.parquet").to_pylist()}
        per_photo = {}
        for name in photos:
            row = index[name]
            if row["status"] != "ok":
                per_photo[name] = {"status": row["status"], "message": row["message"]}
                continue
            meta = json.loads((root / "avatars" / name / "meta.json").read_text())
            view, fid = meta["views"][0], meta["stats"]["fidelity"]
            per_photo[name] = {
                "faces_found": view["faces_found"], "face_box": view["face_box"], "decoded": view["decoded"],
                "fit_residual_px": round(row["fit_residual_px"], 2), "yaw_deg": view["yaw_deg"],
                "pitch_deg": view["pitch_deg"], "matte_source": row["matte_source"],
                "matte_fraction": meta["preparation"]["matte_fraction"], "input_psnr": row["input_psnr"],
                "input_psnr_covered": row["input_psnr_covered"], "identity": fid.get("identity"),
                "identity_status": fid.get("identity_status"), "prepare_s": row["prepare_s"],
                "prepare_timings": meta["preparation"]["timings"], "build_s": row["build_s"],
            }
    ident = FaceIdentity()
    emb = {k: ident.embed(read_picture(p)[0]) for k, p in photos.items()}
    mirror = ident.embed(np.ascontiguousarray(read_picture(photos["astronaut"])[0][:, ::-1]))
    out = {
        "benchmark": "real_photos", "device": "cpu", "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "network": checkpoint if args.checkpoint else f"random-init tiny, {args.image_size} px",
        "render_size": args.render_size, "smoke": args.smoke, "identity_network": NETWORK, "avatars": summary.items_done,
        "per_photo": per_photo,
        "reference": {
            "astronaut_vs_grace_hopper": {"similarity": round(cosine(emb["astronaut"], emb["grace_hopper"]), 4),
                                          "distance": round(float(np.linalg.norm(emb["astronaut"] - emb["grace_hopper"])), 4)},
            "astronaut_vs_mirror": {"similarity": round(cosine(emb["astronaut"], mirror), 4),
                                    "distance": round(float(np.linalg.norm(emb["astronaut"] - mirror)), 4)},
        },
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
