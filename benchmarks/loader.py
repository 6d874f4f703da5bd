"""Loader throughput against a raw tar-read + decode loop over the same shards, in the same run.

Prints one JSON object:
* ``decode``: images/s of Pillow vs OpenCV on every JPEG/PNG member of the shards (colour images
  and alpha mattes separately); the loader's default decoder should be the faster;
* ``raw_loop``: samples/s of a plain loop that reads every shard with ``tarfile`` and decodes, per
  sample, the members one training item decodes (V input views: image, alpha, position npz,
  features npz, widened to float32 with the loader's own helpers; T target views: image, alpha;
  the first cameras, no sampling, no buffer, no collate) — the reference;
* ``loader``: items/s of the Avat3r loader (``make_loader``: shard pipeline, subject buffer,
  k-farthest sampling, decode, collate to ``Avat3rBatch``) with 0 and 2 DataLoader workers over
  the same shards (training mode: resampled, one epoch of ``--passes`` × samples items, worker
  start-up included); the raw loop makes ``--passes`` passes;
* ``ratio_*``: loader / raw loop (goal ≥ 0.8).

The data: the synthetic studio, extracted at ``--crop``, with random position maps (float16, crop
resolution) and feature maps (``--feature-dim`` × crop/16²) standing in for the priors stage.

Usage: python benchmarks/loader.py [--subjects 2 --frames 8 --cameras 8 --crop 128 --repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from avat3r_core import storage  # noqa: E402
from avat3r_core.dataset.batching import to_float32  # noqa: E402
from avat3r_core.dataset.loader import LoaderConfig, decode_alpha, decode_image, load_npz, make_loader  # noqa: E402
from avat3r_core.dataset.pack import PackConfig, pack, shard_urls  # noqa: E402
from avat3r_core.formats.manifests import PRIORS_SCHEMA  # noqa: E402
from avat3r_core.ids import make_id  # noqa: E402


def random_head_to_world(rng: np.random.Generator) -> list[float]:
    """A small random rigid transform (row-major 4x4), like a tracked head's motion."""
    from scipy.spatial.transform import Rotation

    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(rng.normal(0.0, 0.1, 3)).as_matrix()
    m[:3, 3] = rng.normal(0.0, 0.01, 3)
    return m.reshape(-1).tolist()


def make_side_manifests(frames_dir: Path, tracking_dir: Path, priors_dir: Path, feature_dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows = storage.read_parquet(str(frames_dir / "frames.parquet")).to_pylist()
    tracking, priors = {}, []
    for r in rows:
        k = (r["subject"], r["sequence"], r["frame"])
        tracking.setdefault(k, {"id": make_id(*k), "subject": k[0], "sequence": k[1], "frame": k[2],
                                "expression_code": rng.normal(size=135).tolist(), "jaw": [0.0] * 3,
                                # the loader's default works in each frame's head frame: give every
                                # frame a rigid head motion, as the track stage does
                                "head_to_world": random_head_to_world(rng)})
        H, W = r["height"], r["width"]
        yy, xx = np.mgrid[0:H, 0:W] / max(H, W)
        position = np.stack([xx, yy, 0.1 * rng.normal(size=(H, W))], -1).astype(np.float16)
        buf = io.BytesIO()
        np.savez_compressed(buf, position=position, confidence=rng.uniform(size=(H, W)).astype(np.float16))
        storage.atomic_write_bytes(str(priors_dir / "position" / f"{r['id']}.npz"), buf.getvalue())
        buf = io.BytesIO()
        np.savez_compressed(buf, features=rng.normal(size=(feature_dim, H // 16, W // 16)).astype(np.float16))
        storage.atomic_write_bytes(str(priors_dir / "features" / f"{r['id']}.npz"), buf.getvalue())
        priors.append({"id": r["id"], "subject": r["subject"], "sequence": r["sequence"], "frame": r["frame"],
                       "camera": r["camera"], "position": f"position/{r['id']}.npz", "position_source": "random",
                       "features": f"features/{r['id']}.npz", "feature_source": "random", "feature_dim": feature_dim})
    storage.write_parquet(pa.Table.from_pylist(priors, schema=PRIORS_SCHEMA), str(priors_dir / "priors.parquet"))
    storage.write_parquet(pa.Table.from_pylist(list(tracking.values())), str(tracking_dir / "tracking.parquet"))


def decode_rates(urls: list[str], repeat: int) -> dict:
    members = {"image": [], "alpha": []}
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                kind = "alpha" if m.name.endswith(".alpha.png") else "image" if m.name.endswith((".jpg", ".png")) else None
                if kind:
                    members[kind].append(tar.extractfile(m).read())
    out = {}
    for decoder in ("pillow", "opencv"):
        for kind, fn in (("image", decode_image), ("alpha", decode_alpha)):
            best = 0.0
            for _ in range(repeat):
                t0 = time.perf_counter()
                for data in members[kind]:
                    fn(data, decoder)
                best = max(best, len(members[kind]) / (time.perf_counter() - t0))
            out[f"{decoder}_{kind}_per_s"] = round(best, 1)
    for kind in ("image", "alpha"):
        out[f"opencv_over_pillow_{kind}"] = round(out[f"opencv_{kind}_per_s"] / out[f"pillow_{kind}_per_s"], 3)
    return out


def raw_loop(urls: list[str], V: int, T: int, decoder: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for url in urls:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            sample: dict[str, bytes] = {}
            key = None

            def flush(sample: dict[str, bytes]) -> None:
                meta = json.loads(sample["meta.json"])
                cams, ext = meta["cameras"], meta["image_ext"]
                for s in cams[:V]:
                    decode_image(sample[f"cam_{s}.{ext}"], decoder)
                    decode_alpha(sample[f"cam_{s}.alpha.png"], decoder)
                    p = load_npz(sample[f"cam_{s}.position.npz"])
                    to_float32(p["position"]), to_float32(p["confidence"])  # the loader's own widening
                    to_float32(load_npz(sample[f"cam_{s}.features.npz"])["features"])
                for s in cams[:T]:
                    decode_image(sample[f"cam_{s}.{ext}"], decoder)
                    decode_alpha(sample[f"cam_{s}.alpha.png"], decoder)
                np.load(io.BytesIO(sample["expression.npy"]))

            for info in tar:
                k, _, field = info.name.partition(".")
                if key is not None and k != key:
                    flush(sample)
                    n += 1
                    sample = {}
                key = k
                sample[field] = tar.extractfile(info).read()
            if sample:
                flush(sample)
                n += 1
    return n, time.perf_counter() - t0


def loader_rate(urls: list[str], config: LoaderConfig, workers: int, items: int) -> tuple[int, float]:
    loader = make_loader(urls, config, num_workers=workers, epoch_length=items, seed=0)
    t0 = time.perf_counter()
    n = sum(b.batch_size for b in loader)
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--render", type=int, default=192, help="studio render height")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--feature-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--passes", type=int, default=4, help="passes over the data per measurement (epoch length)")
    ap.add_argument("--keep", default="", help="build the data here (reused when present)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.subjects, args.frames, args.cameras, args.render, args.crop = 1, 2, 4, 96, 64
        args.feature_dim, args.repeat, args.passes = 8, 1, 1

    import cv2

    cv2.setNumThreads(1)  # the comparison is per core; workers bring the parallelism
    from avat3r_core.extract import ExtractConfig
    from avat3r_core.synthetic.studio import StudioConfig
    from stages.extract import run_extract
    from stages.synth import run_synth

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="avat3r-loader-bench-"))
    shards = root / "shards"
    if not (shards / "index.parquet").exists():
        run_synth(StudioConfig(subjects=args.subjects, sequences=1, frames=args.frames, cameras=args.cameras,
                               resolution=args.render), str(root / "raw"), str(root / "gt"), str(root / "model"),
                  executor="local")
        run_extract(ExtractConfig(resolution=args.crop), str(root / "raw"), str(root / "frames"), executor="local")
        make_side_manifests(root / "frames", root / "tracking", root / "priors", args.feature_dim)
        pack(PackConfig(shard_size_mb=64, min_shards=4, split_fractions=(1.0, 0.0, 0.0)),
             str(root / "frames/frames.parquet"), str(root / "tracking/tracking.parquet"),
             str(root / "priors/priors.parquet"), str(shards))
    urls = shard_urls(str(shards))

    decode = decode_rates(urls, args.repeat)
    decoder = "opencv" if decode["opencv_image_per_s"] >= decode["pillow_image_per_s"] else "pillow"
    config = LoaderConfig(input_views=4, target_views=8, batch_size=1, resampled=True, shuffle_buffer=4,
                          decoder=decoder)
    raws = []
    for _ in range(args.repeat):
        runs = [raw_loop(urls, config.input_views, config.target_views, decoder) for _ in range(args.passes)]
        raws.append((sum(r[0] for r in runs), sum(r[1] for r in runs)))
    raw = max(raws, key=lambda r: r[0] / r[1])
    len_samples = raw[0] // args.passes
    result = {"data": {"samples": len_samples, "passes": args.passes, "shards": len(urls), "cameras": args.cameras,
                       "crop": args.crop, "feature_dim": args.feature_dim, "decoder": decoder,
                       "cpus": os.cpu_count()},
              "decode": decode, "raw_loop": {"samples": raw[0], "samples_per_s": round(raw[0] / raw[1], 2)}}
    for workers in (0, 2):
        runs = [loader_rate(urls, config, workers, args.passes * len_samples) for _ in range(args.repeat)]
        n, s = max(runs, key=lambda r: r[0] / r[1])
        result[f"loader_{workers}_workers"] = {"items": n, "items_per_s": round(n / s, 2)}
        result[f"ratio_{workers}_workers"] = round((n / s) / (raw[0] / raw[1]), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
