"""Benchmark: batch avatar reconstruction on CPU (avatars per minute) and driving with vs without the cache.

Usage::

    python benchmarks/reconstruct.py                      # 4 subjects, capture + photos mode, Ray Data
    python benchmarks/reconstruct.py --subjects 2 --executor local
    python benchmarks/reconstruct.py --landmarks mediapipe   # photos mode on real photos, MediaPipe

Prints one JSON object on stdout.

Setup (not timed): a synthetic studio run (``--subjects`` people, 1 sequence, 3 frames, 8 cameras,
128 px) extracted to 64 px crops with ground-truth-depth position maps and EfficientNet features
projected to 32 channels (the ``tiny`` model's width), and a random-init ``tiny`` network saved
with ``save_checkpoint``. The library holds two avatars per person: ``capture`` mode (4 farthest
views of the preprocessed capture) and ``photos`` mode (4 raw studio frames with their landmark
files: landmark backend ``file``, face-model fit, crops, ``face_model`` position maps and
EfficientNet features). Random weights cost the same time as trained ones.

* ``avatars_per_minute``: built avatars / wall time of :func:`stages.reconstruct.run_reconstruct`
  with the ``tiny`` preset (everything per avatar: preparation, encode, .ply, preview, a
  ``turntable_frames`` turntable and a built-in-expression animation, MP4 encoding); Ray is started
  before the clock, Ray Data's actor start-up is inside it. Reported per mode as well.
* ``driving``: one capture avatar driven by ``--drive-frames`` expressions at ``--drive-size`` px,
  rendered at the frontal camera, in the same process: ``cached`` = decoder only from the encoder
  cache (what ``avat3r animate`` does), ``full`` = encode + decode per frame. ``speedup`` =
  cached frames/s ÷ full frames/s (medians of ``--repeats`` interleaved runs, after Ray is shut
  down). Both include rendering; ``network_only`` repeats both without rendering.

``--landmarks mediapipe``: the ``photos`` avatars are built from real photographs instead, with the
default picture path (MediaPipe landmarks mapped to the studio head's 68-point embedding, the
selfie-segmentation matte, dlib identity figures): scikit-image's astronaut and matplotlib's Grace
Hopper, four pictures each (the original, its mirror image, a 0.85x zoom and an 8-degree roll;
the same person from one photo: a stand-in for a real photo set), one ``photos`` avatar per
person, ``--subjects`` times over. ``per_mode.photos.prepare_timings`` says where preparation time
goes (read + detect, fit, crops + matte, position maps, features; means per avatar) and
``build_timings`` the model side (encode, decode, turntable, fidelity renders + dlib, animation).

* ``--driving-limits 128,256`` (alone: no reconstruction run): for each size, frames/s of driving
  from the encoder cache (decode + render, as ``avat3r animate``) beside rendering the very same
  Gaussians alone (decoded once beforehand, rendered to uint8 frames: the limit for driving) and
  the decoder alone; ``per_frame_ms.other`` is the rest (taking the valid Gaussians out of the
  dense maps). Medians of ``--repeats`` interleaved runs.
"""

from __future__ import annotations

import argparse
import contextlib
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
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AVAT3R_RAY_DASHBOARD", "0")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def real_photo_folders(root: Path, copies: int) -> list[tuple[str, str]]:
    """(avatar id, folder) of real-photo sets: each of two public-domain portraits in four variants."""
    import cv2
    import matplotlib
    import skimage

    photos = {"astronaut": Path(skimage.__file__).parent / "data" / "astronaut.png",
              "hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    out = []
    for k in range(copies):
        for name, path in photos.items():
            img = cv2.imread(str(path))
            h, w = img.shape[:2]
            folder = root / "real" / f"{name}{k}"
            folder.mkdir(parents=True)
            zoom = cv2.resize(img[int(0.075 * h):int(0.925 * h), int(0.075 * w):int(0.925 * w)], (w, h))
            roll = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 8.0, 1.0), (w, h),
                                  borderMode=cv2.BORDER_REPLICATE)
            for tag, variant in (("original", img), ("mirror", img[:, ::-1]), ("zoom", zoom), ("roll", roll)):
                cv2.imwrite(str(folder / f"{tag}.jpg"), variant, [cv2.IMWRITE_JPEG_QUALITY, 95])
            out.append((f"photos_{name}{k}", str(folder)))
    return out


def setup(root: Path, subjects: int, landmarks: str = "file") -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from avat3r_core.extract import ExtractConfig
    from avat3r_core.reconstruct.library import write_library
    from avat3r_core.reconstruct.pictures import LANDMARKS_SUFFIX
    from avat3r_core.synthetic.studio import StudioConfig, face_model_paths
    from avat3r_core.train.config import TrainConfig, build_model
    from avat3r_core.train.state import save_checkpoint
    from avat3r_core.video import read_frames
    from stages.extract import run_extract
    from stages.priors import PriorsConfig, run_priors
    from stages.synth import run_synth

    raw, gt, model_dir, frames, priors = (str(root / n) for n in ("raw", "gt", "model", "frames", "priors"))
    run_synth(StudioConfig(subjects=subjects, sequences=1, frames=3, cameras=8, resolution=128, background_frames=1),
              raw, gt, model_dir, executor="local")
    run_extract(ExtractConfig(resolution=64), raw, frames, executor="local")
    run_priors(PriorsConfig.preset("tiny", position_source="ground_truth", ground_truth_root=gt,
                                   feature_source="efficientnet", feature_projection_dim=32, projection_fit_frames=16),
               f"{frames}/frames.parquet", priors, executor="local", show_progress=False)
    rows = []
    for pid in (f"{i + 1:03d}" for i in range(subjects)):  # the studio's subject ids
        seq = "EXP-1-head"
        lm = np.load(f"{gt}/{pid}/sequences/{seq}/landmarks2d.npz")
        serials = [str(s) for s in lm["serials"]]
        folder = root / "people" / pid
        folder.mkdir(parents=True)
        for c in (0, 2, 5, 7):
            image = list(read_frames(f"{raw}/{pid}/sequences/{seq}/images/cam_{serials[c]}.mp4"))[1]
            Image.fromarray(image).save(folder / f"cam{c}.png")
            np.savez(folder / f"cam{c}{LANDMARKS_SUFFIX}", landmarks=lm["landmarks"][1, c], visible=lm["visible"][1, c])
        rows.append({"avatar_id": f"capture_{pid}", "mode": "capture", "source": f"{frames}/frames.parquet", "subject": pid})
        if landmarks == "file":
            rows.append({"avatar_id": f"photos_{pid}", "mode": "photos", "source": str(folder)})
    if landmarks == "mediapipe":  # as many real-photo avatars as studio people
        rows += [{"avatar_id": a, "mode": "photos", "source": f}
                 for a, f in real_photo_folders(root, (subjects + 1) // 2)[:subjects]]
    library = write_library(rows, root / "library.csv")
    torch.manual_seed(0)
    cfg = TrainConfig.preset("tiny")  # tiny: 64 px, 32 feature channels
    net = build_model(cfg)
    save_checkpoint(root / "checkpoint", net, torch.optim.Adam(net.parameters()), 0, config=cfg)
    model_path, emb_path = face_model_paths(model_dir)
    return {"library": library, "checkpoint": str(root / "checkpoint"), "face_model": model_path, "embedding": emb_path,
            "projection": f"{priors}/feature_projection.npz", "frames": f"{frames}/frames.parquet",
            "priors": f"{priors}/priors.parquet"}


def drive(data: dict, frames: int, size: int, repeats: int = 3) -> dict:
    import torch

    from avat3r_core.inference.drive import animation_frames
    from avat3r_core.reconstruct.build import drive_without_cache
    from avat3r_core.reconstruct.expressions import load_expression_track
    from avat3r_core.reconstruct.library import LibraryEntry
    from avat3r_core.reconstruct.prepare import Preparer
    from avat3r_core.reconstruct.prepared import PrepareConfig
    from avat3r_core.inference.drive import view_orbit
    from avat3r_core.inference.checkpoint import load_trained_model

    torch.set_num_threads(os.cpu_count() or 1)
    model, mc, _ = load_trained_model(data["checkpoint"])
    prepared = Preparer(PrepareConfig(feature_projection=data["projection"]), mc.image_size, mc.feature_dim, mc.features_enabled,
                        frame=mc.frame).prepare(
        LibraryEntry("d", "capture", data["frames"], subject="001", priors=data["priors"]))
    codes, _ = load_expression_track("builtin", prepared.reference, frames_per_key=max(1, frames // 6 + 1))
    codes = codes[:frames]
    cam = view_orbit(prepared.center, prepared.radius, prepared.front, prepared.up, frames=1, size=size)
    inputs = prepared.inputs()
    out: dict = {"frames": int(len(codes)), "size": size, "repeats": repeats}
    c = torch.as_tensor(codes)

    def cached_render():
        animation_frames(model, encoded, c, cam)

    def full_render():
        drive_without_cache(model, prepared, codes, cam)

    def cached_net():
        for i in range(0, len(c), 4):
            model.decode(encoded.expand(len(c[i:i + 4])), c[i:i + 4])

    def full_net():
        for code in c:
            model(inputs, code[None])

    times: dict[str, list[float]] = {k: [] for k in ("cached", "full", "cached_net", "full_net")}
    with torch.no_grad():
        encoded = model.encode(inputs)
        animation_frames(model, encoded, c[:2], cam)  # warm-up (numba kernels, allocator)
        drive_without_cache(model, prepared, codes[:2], cam)
        for _ in range(repeats):  # interleaved, median: the machine is shared
            for key, fn in (("cached", cached_render), ("full", full_render), ("cached_net", cached_net),
                            ("full_net", full_net)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out["cached_frames_per_s"] = round(len(codes) / med["cached"], 2)
    out["full_frames_per_s"] = round(len(codes) / med["full"], 2)
    out["speedup"] = round(med["full"] / med["cached"], 2)
    out["network_only"] = {"cached_frames_per_s": round(len(codes) / med["cached_net"], 1),
                           "full_frames_per_s": round(len(codes) / med["full_net"], 1),
                           "speedup": round(med["full_net"] / med["cached_net"], 2)}
    return out


def driving_limits(data: dict, sizes: list[int], frames: int, repeats: int = 3) -> dict:
    """Per render size: cached driving vs rendering the same Gaussians alone (module docstring)."""
    import torch

    from avat3r_core.inference.drive import animation_frames, render_frames, view_orbit
    from avat3r_core.reconstruct.expressions import load_expression_track
    from avat3r_core.reconstruct.library import LibraryEntry
    from avat3r_core.reconstruct.prepare import Preparer
    from avat3r_core.reconstruct.prepared import PrepareConfig
    from avat3r_core.inference.checkpoint import load_trained_model

    torch.set_num_threads(os.cpu_count() or 1)
    model, mc, _ = load_trained_model(data["checkpoint"])
    prepared = Preparer(PrepareConfig(feature_projection=data["projection"]), mc.image_size, mc.feature_dim,
                        mc.features_enabled, frame=mc.frame).prepare(LibraryEntry("d", "capture", data["frames"], subject="001",
                                                                  priors=data["priors"]))
    codes, _ = load_expression_track("builtin", prepared.reference, frames_per_key=max(1, frames // 7 + 1))
    c = torch.as_tensor(codes[:frames])
    out: dict = {"frames": int(len(c)), "repeats": repeats, "chunk": 4}
    with torch.no_grad():
        encoded = model.encode(prepared.inputs())
        outputs = [model.decode(encoded.expand(len(c[i:i + 4])), c[i:i + 4]) for i in range(0, len(c), 4)]
        gaussians = [o.gaussians(b) for o in outputs for b in range(o.batch_size)]
        out["gaussians_per_frame"] = int(gaussians[0].means.shape[0])
        for size in sizes:
            cam = view_orbit(prepared.center, prepared.radius, prepared.front, prepared.up, frames=1, size=size)

            def driven():
                animation_frames(model, encoded, c, cam)

            def render_only():
                for g in gaussians:
                    render_frames(g, cam, (1.0, 1.0, 1.0))

            def decode_only():
                for i in range(0, len(c), 4):
                    model.decode(encoded.expand(len(c[i:i + 4])), c[i:i + 4])

            driven(), render_only()  # warm-up (numba kernels, allocator)
            times: dict[str, list[float]] = {"driven": [], "render_only": [], "decode_only": []}
            for _ in range(repeats):
                for key, fn in (("driven", driven), ("render_only", render_only), ("decode_only", decode_only)):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            n = len(c)
            out[f"{size}"] = {
                "driven_frames_per_s": round(n / med["driven"], 2),
                "render_only_frames_per_s": round(n / med["render_only"], 2),
                "ratio_driven_vs_render_only": round(med["render_only"] / med["driven"], 3),
                "per_frame_ms": {"driven": round(1e3 * med["driven"] / n, 2), "render": round(1e3 * med["render_only"] / n, 2),
                                 "decode": round(1e3 * med["decode_only"] / n, 2),
                                 "other": round(1e3 * (med["driven"] - med["render_only"] - med["decode_only"]) / n, 2)},
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--executor", default="ray", choices=("ray", "local"))
    parser.add_argument("--drive-frames", type=int, default=24)
    parser.add_argument("--drive-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--landmarks", default="file", choices=("file", "mediapipe"),
                        help="photos avatars: studio frames + landmark files, or real photos + MediaPipe")
    parser.add_argument("--no-drive", action="store_true", help="skip the driving measurement")

    parser.add_argument("--driving-limits", default="", help="e.g. 128,256: only the driving-limit measurement")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = parser.parse_args()
    if args.smoke:  # one person, no Ray, 4 driven frames once: keeps the script running, measures nothing
        args.subjects, args.executor, args.drive_frames, args.repeats = 1, "local", 4, 1
    if args.driving_limits:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
            data = setup(Path(tmp), 1)
            result = driving_limits(data, [int(s) for s in args.driving_limits.split(",")], args.drive_frames,
                                    args.repeats)
        result.update(benchmark="reconstruct_driving_limits", machine={
            "cpus": os.cpu_count(), "load_average_1min_at_end": round(os.getloadavg()[0], 2)})
        print(json.dumps(result, indent=1))
        return

    import logging

    logging.basicConfig(level=logging.ERROR)
    import pyarrow.parquet as pq

    from avat3r_core.reconstruct.expressions import BUILTIN_KEYS
    from stages.reconstruct import ReconstructConfig, run_reconstruct

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stage progress bars: stdout carries only the JSON
            data = setup(root, args.subjects, args.landmarks)
        setup_s = time.perf_counter() - t0
        config = ReconstructConfig.preset("tiny", landmarks=args.landmarks, face_model=data["face_model"],
                                          landmark_embedding=data["embedding"], feature_projection=data["projection"])
        if args.executor == "ray":
            from stages.ray_runtime import ensure_ray

            ensure_ray(dashboard=False)
        summary = run_reconstruct(config, data["library"], data["checkpoint"], str(root / "avatars"),
                                  executor=args.executor, show_progress=False)
        index = [r for r in pq.read_table(root / "avatars" / "index.parquet").to_pylist() if r["status"] == "ok"]
        per_mode = {}
        for mode in ("capture", "photos"):
            rows = [r for r in index if r["mode"] == mode]
            if rows:
                per_mode[mode] = {"avatars": len(rows),
                                  "mean_prepare_s": round(sum(r["prepare_s"] for r in rows) / len(rows), 3),
                                  "mean_build_s": round(sum(r["build_s"] for r in rows) / len(rows), 3)}
                metas = [json.loads((root / "avatars" / r["meta"]).read_text()) for r in rows]
                prep = [m["preparation"].get("timings") for m in metas if m["preparation"].get("timings")]
                if prep:
                    per_mode[mode]["prepare_timings"] = {k: round(statistics.mean(t[k] for t in prep), 3) for k in prep[0]}
                per_mode[mode]["build_timings"] = {
                    k: round(statistics.mean(m["stats"][k] for m in metas), 3)
                    for k in ("encode_s", "decode_s", "turntable_s", "fidelity_s", "animation_s") if k in metas[0]["stats"]}
                if mode == "photos" and args.landmarks == "mediapipe":
                    per_mode[mode]["fit_residual_px"] = [round(r["fit_residual_px"], 2) for r in rows]
                    per_mode[mode]["identity_yaw0"] = [r["identity_yaw0"] for r in rows]
        result = {
            "benchmark": "reconstruct",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
            "setup_s": round(setup_s, 1),
            "executor": args.executor,
            "preset": "tiny",
            "render": {"size": config.render_size, "turntable_frames": config.turntable_frames,
                       "animation_frames": (len(BUILTIN_KEYS) - 1) * config.frames_per_key},
            "avatars": summary.items_done, "failed": summary.items_failed, "seconds": summary.seconds,
            "avatars_per_minute": round(60.0 * summary.items_done / summary.seconds, 2),
            "per_mode": per_mode,
            "sources": {"capture": "ground_truth positions + efficientnet_lite0_imagenet features (projected to 32)",
                        "photos": ("landmarks file + face_model positions + efficientnet_lite0_imagenet features"
                                   if args.landmarks == "file" else
                                   "real photos: mediapipe landmarks (478 -> iBUG-68) + selfie_segmentation matte + "
                                   "face_model positions + efficientnet_lite0_imagenet features + dlib identity")},
        }
        if args.executor == "ray":
            import ray

            ray.shutdown()  # idle Ray workers must not compete with the driving measurement
        if not args.no_drive:
            result["driving"] = drive(data, args.drive_frames, args.drive_size, args.repeats)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
