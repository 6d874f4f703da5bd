"""Benchmark: tracking the studio with a real detector (MediaPipe) against ground-truth landmarks.

Usage::

    python benchmarks/track_detector.py                     # 8 cameras, 6 frames, 512 px, "tiny" fit
    python benchmarks/track_detector.py --frames 4 --cameras 4
    python benchmarks/track_detector.py --smoke             # seconds: 2 cameras, 2 frames, a few fit steps (the tests)

Prints one JSON object on stdout.

Setup: a synthetic studio run (``--subjects`` subjects, 1 sequence, ``--cameras`` cameras at
``--resolution`` px height) is filmed into a temporary directory. The same multi-view sequence is
tracked (:func:`~avat3r_core.tracking.fit.fit_sequence`, same :class:`FitConfig`) from three
landmark sources:

* ``ground_truth``: the studio's 68 iBUG landmarks, noise-free (the reference: what the fit reaches
  with perfect 2-D points of the embedding's own definition);
* ``mediapipe_ibug68``: MediaPipe FaceLandmarker on the recorded frames, 478 points mapped to the 68
  iBUG points (the evaluation's table), fitted with the studio head's 68-point embedding;
* ``mediapipe_mesh468``: the same detections, all 468 mesh points, fitted with the studio head's
  MediaPipe embedding (``head_mediapipe_embedding.npz``, registered from the canonical face mesh).

Errors against the studio's ground-truth parameters, per source:

* ``landmark_err_px``: the fitted head's 68 iBUG landmarks (68-point embedding, whatever the fit
  used) vs the ground-truth 2-D landmarks, visible points, pixels;
* ``vertex_err_pct_head``: mean vertex distance, % of the head's bounding-box diagonal;
* ``expression_corr``: Pearson correlation of fitted vs true expression coefficients over the
  studio's active expression components and all frames;
* ``head_pose_err_deg``: angle between the fitted and the true head rotation (head-to-world, neck
  included), mean over frames;
* ``detected``: fraction of (frame, camera) images with a face (MediaPipe) / visible landmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1)
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.subjects, args.cameras, args.frames, args.resolution = 1, 2, 2, 384
    # a smoke run only has to go through every step of the fit, not converge
    iterations = dict(rigid_iters=10, adam_iters=20, lbfgs_iters=5) if args.smoke else {}

    import numpy as np
    import torch

    from avat3r_core.formats.calibration import read_nersemble_calibration
    from avat3r_core.tracking.landmarks import mediapipe_to_ibug68
    from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding
    from avat3r_core.synthetic.head import EXPRESSION_NAMES
    from avat3r_core.synthetic.studio import StudioConfig, face_model_paths
    from avat3r_core.tracking.fit import FitConfig, fit_sequence, flame_params_to_full
    from avat3r_core.tracking.landmarks import MEDIAPIPE_EMBEDDING_FILE, MediaPipeLandmarks
    from avat3r_core.video import read_frames
    from stages.synth import run_synth

    seq = "EXP-1-head"
    per_subject = []
    detector = MediaPipeLandmarks()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = StudioConfig(subjects=args.subjects, sequences=1, frames=args.frames, cameras=args.cameras,
                           resolution=args.resolution, background_frames=1)
        run_synth(cfg, f"{tmp}/raw", f"{tmp}/gt", f"{tmp}/model", executor="local")
        model_path, emb_path = face_model_paths(f"{tmp}/model")
        model = load_flame_model(model_path)
        layer68 = FlameLayer(model, landmarks=load_landmark_embedding(emb_path), dtype=torch.float64)
        mp_emb = load_landmark_embedding(f"{tmp}/model/{MEDIAPIPE_EMBEDDING_FILE}")
        layer468 = FlameLayer(model, landmarks=mp_emb, dtype=torch.float64)
        for s in range(1, args.subjects + 1):
            pid = f"{s:03d}"
            serials, cams = read_nersemble_calibration(f"{tmp}/raw/{pid}/calibration/camera_params.json",
                                                       width=cfg.width, height=cfg.height, dtype=torch.float64)
            lm = np.load(f"{tmp}/gt/{pid}/sequences/{seq}/landmarks2d.npz")
            gt = dict(np.load(f"{tmp}/gt/{pid}/sequences/{seq}/flame_params.npz"))
            order = [list(lm["serials"]).index(str(x)) for x in serials]
            clean, vis = lm["landmarks"][:, order].astype(np.float64), lm["visible"][:, order]
            T, C = clean.shape[:2]
            start = time.perf_counter()
            mp_pts = np.zeros((T, C, 478, 2))
            mp_conf = np.zeros((T, C, 478))
            for c, serial in enumerate(serials):
                frames = list(read_frames(f"{tmp}/raw/{pid}/sequences/{seq}/images/cam_{serial}.mp4"))[:T]
                det = detector.detect(np.stack(frames))
                mp_pts[:, c], mp_conf[:, c] = det.points, det.confidence
            detect_s = time.perf_counter() - start
            conf68 = np.stack([mp_conf[..., 0]] * 68, -1)
            sources = {
                "ground_truth": (layer68, clean, vis.astype(np.float64), None),
                "mediapipe_ibug68": (layer68, mediapipe_to_ibug68(mp_pts), conf68, None),
                "mediapipe_mesh468": (layer468, mp_pts, mp_conf, mp_emb.landmark_indices),
            }
            vg = flame_params_to_full(layer68, gt)
            head = float((vg[0].max(0).values - vg[0].min(0).values).norm())
            H_gt = layer68.head_to_world(shape=gt["shape"][:1].repeat(T, 0), expr=gt["expression"], rotation=gt["rotation"],
                                         neck=gt["neck"], translation=gt["translation"]).numpy()
            active = np.flatnonzero(np.abs(gt["expression"]).max(0) > 1e-6)[: len(EXPRESSION_NAMES)]
            row = {"subject": pid, "detect_s": round(detect_s, 2),
                   "detected": round(float((mp_conf[..., 0] > 0).mean()), 3)}
            for name, (layer, pts, conf, idx) in sources.items():
                t0 = time.perf_counter()
                res = fit_sequence(layer, cams, pts, conf, FitConfig.preset(args.preset, **iterations),
                                   landmark_indices=idx)
                p = res.params
                vf = flame_params_to_full(layer68, p)
                lm68 = layer68.landmarks_from_vertices(vf)  # (T, 68, 3) world
                uv = np.stack([cams[c:c + 1].project(lm68.reshape(1, -1, 3))[0][0].numpy().reshape(T, 68, 2)
                               for c in range(C)], 1)  # (T, C, 68, 2)
                H = layer68.head_to_world(shape=np.repeat(p["shape"][:1], T, 0), expr=p["expression"],
                                          rotation=p["rotation"], neck=p["neck"], translation=p["translation"]).numpy()
                rel = np.einsum("tji,tjk->tik", H[:, :3, :3], H_gt[:, :3, :3])
                ang = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
                ef, eg = p["expression"][:, active].reshape(-1), gt["expression"][:, active].reshape(-1)
                row[name] = {
                    "converged": bool(res.converged), "fit_s": round(time.perf_counter() - t0, 2),
                    "landmark_err_px": round(float(np.linalg.norm(uv - clean, axis=-1)[vis > 0].mean()), 3),
                    "vertex_err_pct_head": round(100 * float((vg - vf).norm(dim=-1).mean()) / head, 3),
                    "expression_corr": round(float(np.corrcoef(ef, eg)[0, 1]), 3),
                    "head_pose_err_deg": round(float(ang.mean()), 3),
                }
            per_subject.append(row)
    detector.close()
    keys = ("landmark_err_px", "vertex_err_pct_head", "expression_corr", "head_pose_err_deg")
    summary = {name: {k: round(float(np.mean([r[name][k] for r in per_subject])), 3) for k in keys}
               for name in ("ground_truth", "mediapipe_ibug68", "mediapipe_mesh468")}
    out = {
        "benchmark": "track_detector", "device": "cpu", "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "subjects": args.subjects, "cameras": args.cameras, "frames": args.frames,
        "resolution": [cfg.width, cfg.height], "fit_preset": args.preset, "smoke": args.smoke, "mean": summary, "per_subject": per_subject,
        "ratio_landmark_err_mediapipe68_vs_gt": round(summary["mediapipe_ibug68"]["landmark_err_px"] /
                                                      max(summary["ground_truth"]["landmark_err_px"], 1e-9), 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
