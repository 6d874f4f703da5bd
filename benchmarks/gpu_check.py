"""GPU readiness in one prepared run (at most a few minutes on one GPU).

    python benchmarks/gpu_check.py               # on a CUDA machine: the checks below; elsewhere: the plan
    python benchmarks/gpu_check.py --cpu-smoke   # the same code paths on CPU, small (what the tests run)

Prints one JSON object. On a machine without CUDA it prints what it would run (``"cuda": false``,
``"would_run"``) and exits 0. With CUDA:

* ``rasterization``: gsplat's CUDA rasterizer against the project's CPU renderer on the same
  scenes (``benchmarks/render.py``'s: Gaussians in a ball seen by 4 cameras): max abs image
  error, and for every input (means, quats, scales, opacities, colours) the relative error of the
  gradient of the same loss (goal: image < 1e-3, gradients < 1e-2);
* ``ddp``: a few optimiser steps of the ``small`` network with DistributedDataParallel over NCCL
  on every visible GPU (one process each) under bf16 autocast: finite losses, and the ranks'
  parameters identical after the steps (max abs difference of a checksum across ranks);
* ``paper_timing``: the ``paper`` preset (random weights: they cost what trained ones do), bf16,
  4 views at 512²: avatar creation = encode + first decode + first render (published Avat3r:
  12.3 s on an RTX 3090, which includes its DUSt3R and Sapiens preprocessing, not run here) and
  driving = decode + render per expression at 512² (published: 7.9 fps), after a warm-up.

``--cpu-smoke`` runs the same functions on CPU: the CPU renderer against the dense reference
renderer, DDP over gloo with 2 processes in fp32, the ``tiny`` preset's timing; figures from it
say nothing about a GPU, only that the script works.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLAN = {
    "rasterization": "gsplat (CUDA) vs the CPU renderer on benchmarks/render.py scenes (20k Gaussians, 256² and "
                     "512², 4 cameras): max image error, relative gradient error per input",
    "ddp": "5 steps of the `small` network, DDP over NCCL on every visible GPU, bf16 autocast: finite losses, "
           "ranks' parameters identical",
    "paper_timing": "the `paper` preset, bf16, 4 views at 512²: avatar creation (encode + decode + render) and "
                    "driving fps (decode + render at 512²), vs published 12.3 s / 7.9 fps (RTX 3090)",
}


def _render_scene(n: int, size: int):
    spec = importlib.util.spec_from_file_location("avat3r_render_benchmark", REPO / "benchmarks" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_scene(n, size)


def check_rasterization(n: int, size: int, backend: str, device: str, reference: str = "cpu") -> dict:
    """``backend`` on ``device`` against ``reference`` on CPU: image and gradient errors."""
    import torch

    from avat3r_core.render import rasterize

    scene = _render_scene(n, size)
    inputs = ("means", "quats", "scales", "opacities", "colors")
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(scene["viewmats"].shape[0], size, size, 3, generator=g)

    def run(dev: str, which: str):
        leaves = {k: scene[k].detach().to(dev).requires_grad_(True) for k in inputs}
        rest = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in scene.items() if k not in inputs}
        if dev != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = rasterize(**leaves, **rest, backend=which)
        loss = (out.rgb * weights.to(dev)).sum() + out.alpha.sum()
        loss.backward()
        if dev != "cpu":
            torch.cuda.synchronize()
        return out.rgb.detach().cpu(), {k: v.grad.detach().cpu() for k, v in leaves.items()}, time.perf_counter() - t0

    run(device, backend)  # warm-up: kernels compiled/loaded
    ref_img, ref_grads, ref_s = run("cpu", reference)
    img, grads, s = run(device, backend)
    rel = {k: float((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm().clamp_min(1e-12)) for k in inputs}
    return {"gaussians": n, "size": size, "backend": backend, "reference": reference,
            "image_max_abs_error": float((img - ref_img).abs().max()), "grad_rel_error": rel,
            "seconds": round(s, 4), "reference_seconds": round(ref_s, 4)}


def _ddp_worker(rank: int, world: int, port: int, backend: str, preset: str, steps: int, bf16: bool,
                out_path: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from avat3r_core.config import build
    from avat3r_core.model import Avat3rConfig
    from avat3r_core.model.avat3r import Avat3r

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    config = build(Avat3rConfig, {}, preset=preset)
    model = DistributedDataParallel(Avat3r(config).to(device), device_ids=[rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    losses = []
    for _ in range(steps):
        inputs, z = _random_inputs(config, device, g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(inputs, z)
            loss = sum(t.float().square().mean() for t in (out.means, out.colors, out.log_scales))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    checksum = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        values = [float(t) for t in gathered]
        Path(out_path).write_text(json.dumps({"world_size": world, "backend": backend, "bf16": bf16, "preset": preset,
                                         "losses": losses, "finite": all(math.isfinite(v) for v in losses),
                                         "rank_checksum_max_diff": max(values) - min(values)}))
    dist.destroy_process_group()


def _random_inputs(config, device, g):
    import torch

    from avat3r_core.cameras import Cameras
    from avat3r_core.model.avat3r import Avat3rInputs

    v, size = config.num_views, config.image_size
    eye = torch.tensor([[0.6 * (i - (v - 1) / 2), 0.0, 3.0] for i in range(v)])
    cams = Cameras.look_at(eye, (0.0, 0.0, 0.0), fov_deg=14.0, width=size, height=size, device=device)
    images = torch.rand(1, v, 3, size, size, generator=g).to(device)
    positions = (0.2 * torch.randn(1, v, 3, size, size, generator=g)).to(device)
    features = torch.randn(1, v, config.feature_dim, size // 16, size // 16, generator=g).to(device) \
        if config.features_enabled else None
    z = (0.1 * torch.randn(1, config.expr_dim, generator=g)).to(device)
    return Avat3rInputs(images, [cams], positions, None, features), z


def check_ddp(backend: str, world: int, preset: str, steps: int, bf16: bool) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = Path(tempfile.mkdtemp(prefix="gpu-check-")) / "ddp.json"
    mp.spawn(_ddp_worker, args=(world, port, backend, preset, steps, bf16, str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())


def time_avatar(preset: str, device: str, bf16: bool, frames: int) -> dict:
    """Avatar creation (encode + first decode + render) and driving fps (decode + render)."""
    import torch

    from avat3r_core.config import build
    from avat3r_core.model import Avat3rConfig
    from avat3r_core.model.avat3r import Avat3r
    from avat3r_core.render import render

    config = build(Avat3rConfig, {}, preset=preset)
    model = Avat3r(config).to(device).eval()
    g = torch.Generator().manual_seed(0)
    inputs, z = _random_inputs(config, device, g)
    cams = inputs.cameras[:1]  # the first input camera: the driven avatar seen from there

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def frame(encoded, z_exp):
        out = model.decode(encoded, z_exp)
        return render(out.gaussians(0), cams)

    with torch.no_grad(), torch.autocast(device if device == "cpu" else "cuda", dtype=torch.bfloat16, enabled=bf16):
        frame(model.encode(inputs), z)  # warm-up
        sync()
        t0 = time.perf_counter()
        encoded = model.encode(inputs)
        image = frame(encoded, z)
        sync()
        create_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(frames):
            image = frame(encoded, z * (1 + 0.01 * i))
        sync()
        drive_s = time.perf_counter() - t0
    return {"preset": preset, "bf16": bf16, "views": config.num_views, "size": config.image_size,
            "create_s": round(create_s, 3), "drive_fps": round(frames / drive_s, 3),
            "finite": bool(torch.isfinite(image.rgb.float()).all()),
            "published": {"create_s": 12.3, "drive_fps": 7.9, "gpu": "RTX 3090"} if preset == "paper" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="run the same code paths on CPU, small")
    args = parser.parse_args()
    import torch

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if args.cpu_smoke:
        report["mode"] = "cpu-smoke"
        report["rasterization"] = [check_rasterization(500, 32, "cpu", "cpu", reference="reference")]
        report["ddp"] = check_ddp("gloo", 2, "tiny", 2, bf16=False)
        report["paper_timing"] = time_avatar("tiny", "cpu", bf16=False, frames=2)
    elif not torch.cuda.is_available():
        report["would_run"] = PLAN
        report["note"] = "no CUDA device: nothing run; --cpu-smoke runs the same code paths on CPU"
    else:
        report["mode"] = "cuda"
        report["device"] = torch.cuda.get_device_name(0)
        report["rasterization"] = [check_rasterization(20000, size, "gsplat", "cuda") for size in (256, 512)]
        report["ddp"] = check_ddp("nccl", torch.cuda.device_count(), "small", 5, bf16=True)
        report["paper_timing"] = time_avatar("paper", "cuda", bf16=True, frames=20)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
