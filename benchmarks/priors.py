"""Priors throughput per backend on the CPU at the demo crop size, and feature storage per frame.

Prints one JSON object:
* ``backends``: images/s of each per-view source on the same crops (decoded images and loaded
  depth in memory; file I/O excluded), after one warm-up call:
  - ``ground_truth``: studio depth resampled into the crop + unprojection (stand-in);
  - ``face_model``: FLAME posed from the studio's true parameters (once per frame, shared by its
    views) + rasterization into each crop camera (stand-in);
  - ``efficientnet``: EfficientNet-Lite0 ImageNet features (stand-in for Sapiens);
  - ``dust3r_tiny_random``: a tiny DUSt3R (2+2 layers, width 64/48) with **random weights** at the
    crop size, all ordered pairs of the frame's views + alignment + resampling: architecture cost
    only at that size; says nothing about the real ViT-L model's speed or any accuracy;
* ``stage``: the whole stage (local executor: reading, writing, manifest) with ground_truth +
  efficientnet, images/s;
* ``feature_bytes_per_frame``: float16 storage of one frame's feature map, all channels vs PCA to
  k (measured for EfficientNet at this crop size; Sapiens-2B at its 1024x1024 input computed
  from its published width 1920), plus the compressed position-map file size.

Usage: python benchmarks/priors.py [--size 128 --cameras 4 --frames 3 --k 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from avat3r_core.extract import ExtractConfig  # noqa: E402
from avat3r_core.formats.manifests import cameras_from_rows  # noqa: E402
from avat3r_core.priors import sources  # noqa: E402
from avat3r_core.priors.sapiens import SAPIENS_WIDTHS, bytes_per_frame  # noqa: E402
from avat3r_core.synthetic.studio import StudioConfig  # noqa: E402
from stages.extract import run_extract  # noqa: E402
from stages.priors import PriorsConfig, run_priors  # noqa: E402
from stages.synth import run_synth  # noqa: E402


def timed(fn, n_images: int, repeats: int = 2) -> float:
    fn()  # warm-up (numba, allocator, first-call costs)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(n_images / best, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="crop size (demo preset: 128)")
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--k", type=int, default=32, help="projected feature channels")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.size, args.cameras, args.frames, args.k = 64, 2, 2, 8

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        raw, gt, model, frames = (str(root / n) for n in ("raw", "gt", "model", "frames"))
        # source frames large enough that the crop is not upsampled much
        with contextlib.redirect_stdout(sys.stderr):  # progress bars: keep stdout pure JSON
            run_synth(StudioConfig(subjects=1, sequences=1, frames=args.frames, cameras=args.cameras,
                                   resolution=2 * args.size), raw, gt, model, executor="local")
            run_extract(ExtractConfig(resolution=args.size), raw, frames, executor="local")
        rows = sorted(pq.read_table(f"{frames}/frames.parquet").to_pylist(), key=lambda r: r["id"])
        n = len(rows)
        images = np.stack([cv2.imread(f"{frames}/{r['image']}")[..., ::-1] for r in rows])
        crops = [cameras_from_rows([r], torch.float64) for r in rows]
        depths = {}
        for r in rows:
            path = f"{gt}/{r['subject']}/sequences/{r['sequence']}/depth/cam_{r['camera']}.npz"
            depths[r["id"]] = np.load(path)["depth"][r["frame"]]
        result: dict = {"size": args.size, "images": n, "cameras": args.cameras, "frames": args.frames,
                        "torch_threads": torch.get_num_threads(), "device": "cpu", "backends": {}}

        def ground_truth():
            for r, c in zip(rows, crops):
                src = sources.crop_to_source_camera(c, r["crop_box"], r["source_width"], r["source_height"])
                sources.position_from_ground_truth(depths[r["id"]], src, r["crop_box"], c)

        result["backends"]["ground_truth"] = {"images_per_s": timed(ground_truth, n), "stand_in": True}

        from avat3r_core.flame import FlameLayer, load_flame_model

        layer = FlameLayer(load_flame_model(f"{model}/head_model.pkl"), dtype=torch.float64).eval()
        params = dict(np.load(f"{gt}/{rows[0]['subject']}/sequences/{rows[0]['sequence']}/flame_params.npz"))

        def face_model():
            verts = {}
            for r, c in zip(rows, crops):
                t = r["frame"]
                if t not in verts:
                    p = {k: (params[k][0] if k in ("shape", "scale") else params[k][t])
                         for k in ("shape", "expression", "rotation", "neck", "jaw", "eyes", "translation", "scale")}
                    verts[t] = sources.flame_vertices(layer, p)
                sources.position_from_mesh(verts[t], layer.faces, c)

        result["backends"]["face_model"] = {"images_per_s": timed(face_model, n), "stand_in": True,
                                            "note": "FLAME from the studio's true parameters (tracking stand-in)"}

        from avat3r_core.priors.backbone import load_efficientnet_lite0

        effnet = load_efficientnet_lite0()
        result["backends"]["efficientnet"] = {
            "images_per_s": timed(lambda: sources.efficientnet_features(effnet, images, batch_size=8), n),
            "stand_in": True, "source": "efficientnet_lite0_imagenet"}

        from avat3r_core.priors.dust3r import Dust3rConfig, build_dust3r

        torch.manual_seed(0)
        net = build_dust3r(Dust3rConfig(
            img_size=(args.size, args.size), patch_size=16, enc_embed_dim=64, enc_depth=2, enc_num_heads=4,
            dec_embed_dim=48, dec_depth=2, dec_num_heads=4, pos_embed="RoPE100", patch_embed_cls="ManyAR_PatchEmbed",
            head_type="dpt", output_mode="pts3d")).eval()
        by_frame: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_frame.setdefault(r["frame"], []).append(i)

        def dust3r():
            from avat3r_core.cameras import Cameras

            for idx in by_frame.values():
                sources.position_from_dust3r(net, images[idx], Cameras.cat([crops[i] for i in idx]), batch_size=4)

        result["backends"]["dust3r_tiny_random"] = {
            "images_per_s": timed(dust3r, n, repeats=1), "random_weights": True,
            "note": "tiny random-weight network (enc 2x64, dec 2x48) at the crop size, all ordered pairs of "
                    f"{args.cameras} views + alignment: architecture cost only, not the ViT-L checkpoint"}

        start = time.perf_counter()
        summary = run_priors(PriorsConfig.preset("demo", ground_truth_root=gt, feature_projection_dim=0, device="cpu"),
                             f"{frames}/frames.parquet", str(root / "priors"), executor="local", show_progress=False)
        seconds = time.perf_counter() - start
        result["stage"] = {"backend": "ground_truth + efficientnet", "executor": "local",
                           "images_per_s": round(summary.rows / seconds, 2), "seconds": round(seconds, 2),
                           "incl_model_load": True}
        table = pq.read_table(str(root / "priors" / "priors.parquet")).to_pylist()
        pos_files = [root / "priors" / r["position"] for r in table]
        h = w = args.size // 16
        sap_c = SAPIENS_WIDTHS["2b"][0]
        feats = sources.efficientnet_features(effnet, images)
        from avat3r_core.priors.sapiens import fit_projection

        matrix, mean = fit_projection(feats, min(args.k, feats.shape[1]))
        projected = sources.features_to_store(feats, (matrix, mean))
        result["feature_bytes_per_frame"] = {
            "efficientnet_fp16_full": {"shape": [int(feats.shape[1]), h, w], "bytes": bytes_per_frame((feats.shape[1], h, w))},
            f"efficientnet_fp16_k{args.k}": {"shape": list(projected.shape[1:]), "bytes": int(projected[0].nbytes)},
            "sapiens_2b_fp16_full_1024": {"shape": [sap_c, 64, 64], "bytes": bytes_per_frame((sap_c, 64, 64)),
                                           "computed": True},
            f"sapiens_2b_fp16_k{args.k}_1024": {"shape": [args.k, 64, 64], "bytes": bytes_per_frame((args.k, 64, 64)),
                                                 "computed": True},
        }
        result["position_map_bytes_per_frame"] = {
            "raw_fp16": args.size * args.size * 4 * 2,
            "npz_compressed_mean": int(np.mean([p.stat().st_size for p in pos_files])),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
