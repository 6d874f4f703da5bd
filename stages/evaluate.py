"""The evaluation stage: a trained checkpoint and the non-learned baseline on a held-out split.

``run_evaluate(checkpoint, shards_dir, out_dir, split="test")`` reads the split once through the
shard loader (inputs from other timesteps = novel expressions, target cameras = novel views),
renders every target view with the model and with the baseline, and writes into ``out_dir``:

* ``metrics.json`` — the DVC metric file (per method: PSNR, SSIM, LPIPS, AKD ×3, CSIM (dlib), counts; the
  detector's AKD floor; statuses; the published numbers for context);
* ``report.md`` — the Markdown table (this data's rows + the published rows, marked as different
  data and resolution) and its notes;
* ``per_view.csv`` — one row per (method, target view);
* ``grid.png`` — inputs | target | ours | baseline for a few samples.

A plain process: the work is one model over a few hundred views, not worth a Ray pool. The
checkpoint is read only through the weights-only loader (:func:`avat3r_core.inference.checkpoint.load_trained_model`);
a missing or ill-formed checkpoint directory raises :class:`~avat3r_core.errors.FormatError`
naming it (the CLI maps it to exit code 3).

See :mod:`avat3r_core.evaluation` for the protocol (AKD, its floor, what is unavailable and why).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from avat3r_core.errors import FormatError
from avat3r_core.storage import atomic_write_bytes, join
from avat3r_core.evaluation import (
    EvalConfig,
    GroundTruth68,
    TargetViewIndex,
    eval_loader_config,
    evaluate_report,
    make_detector68,
    make_identity,
)
from avat3r_core.evaluation_report import LPIPS_NOT_COMPUTED
from avat3r_core.inference.checkpoint import load_trained_model

log = logging.getLogger("avat3r.stages.evaluate")

#: Bumped when the stage's output changes meaning; part of the flow task's cache key (pipelines/caching.py).
VERSION = "4"  # 2: views in the tracked head frame; 3: rig cameras matched across timesteps in the world; 4: CSIM

OUTPUTS = ("metrics.json", "report.md", "per_view.csv", "grid.png")


def _lpips(backbone: str | None, lin: str | None, net: str):
    """(model or None, status). Not given → not computed; given but absent → an error naming it."""
    if not backbone and not lin:
        return None, LPIPS_NOT_COMPUTED
    if not backbone or not lin:
        raise FormatError(backbone or lin, None, "LPIPS needs both weight files: the backbone (torchvision "
                          f"{net}) and the v0.1 linear layers; only one was given")
    for p in (backbone, lin):
        if not Path(p).is_file():
            raise FormatError(p, None, "LPIPS weights file not found")
    from avat3r_core.lpips import load_lpips

    model = load_lpips(net, backbone, lin)
    return model, f"LPIPS: computed (v0.1 {model.net}; backbone {backbone}; linear layers {lin})"


def run_evaluate(checkpoint: str | Path, shards_dir: str | Path, out_dir: str | Path, split: str = "test", *,
                 frames_manifest: str | Path | None = None, ground_truth: str | Path | None = None,
                 lpips_backbone: str | Path | None = None, lpips_lin: str | Path | None = None,
                 mediapipe_model: str | None = None, config: EvalConfig | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Evaluate ``checkpoint`` (a directory holding ``checkpoint.pt``, or a training run's output
    with ``checkpoints/checkpoint_*``) and the baseline on ``split`` of ``shards_dir``; write the
    four outputs into ``out_dir`` and return the metrics dict (plus ``outputs``: their paths).

    ``frames_manifest`` + ``ground_truth`` (the studio's ground-truth root) enable AKD against
    ground-truth landmarks and its floor; without them AKD is the detector-vs-detector number only
    (and says so). ``lpips_backbone`` + ``lpips_lin``: LPIPS weight files (user-supplied).
    """
    config = config or EvalConfig.preset("demo")
    t0 = time.perf_counter()
    model, _, info = load_trained_model(checkpoint, device)  # first: a bad checkpoint fails before any work
    shards_dir = str(shards_dir)
    if not Path(shards_dir).is_dir() and "://" not in shards_dir:
        raise FormatError(shards_dir, None, "shards directory not found")
    lpips_model, lpips_status = _lpips(str(lpips_backbone) if lpips_backbone else None,
                                       str(lpips_lin) if lpips_lin else None, config.lpips_net)
    views = gt = None
    gt_status = ""
    if frames_manifest and ground_truth:
        views, gt = TargetViewIndex(frames_manifest), GroundTruth68(ground_truth)
    else:
        missing = [n for n, v in (("frames manifest", frames_manifest), ("ground-truth root", ground_truth)) if not v]
        gt_status = f"no ground-truth landmarks: {' and '.join(missing)} not given"
    detector, detector_status = make_detector68(config.detector, mediapipe_model, config.detector_upscale)
    if detector is None:
        log.warning("AKD unavailable: %s", detector_status)
    identity, identity_status = make_identity(config.identity)
    if identity is None:
        log.warning("CSIM unavailable: %s", identity_status)

    from avat3r_core.dataset.loader import make_loader
    from avat3r_core.dataset.pack import check_shards, read_index

    # only shards that are as the index says are read: a truncated, altered or missing shard (or
    # one holding NaN maps) is skipped as a whole, and the report says which, how many samples, why
    index = [r for r in read_index(shards_dir) if r["split"] == split]
    broken = check_shards(shards_dir, split)
    skipped = [{"shard": r["path"], "samples": int(r["count"]), "problems": broken[r["path"]][:3]}
               for r in index if r["path"] in broken]
    for s in skipped:
        log.warning("evaluate: skipping shard %s (%d samples): %s", s["shard"], s["samples"], "; ".join(s["problems"]))
    good = [join(shards_dir, r["path"]) for r in index if r["path"] not in broken]
    if not good:
        raise FormatError(shards_dir, split, f"no readable shard in split {split!r} ({len(index)} in the index): "
                          + "; ".join(f"{s['shard']}: {s['problems'][0]}" for s in skipped[:5]))
    loader = make_loader(good, eval_loader_config(config, model.config.frame), 0, 1, 0, None, config.seed, split)
    step = info["step"]
    context = {"split": split, "shards": shards_dir, "checkpoint": info["checkpoint"], "step": step,
               "model_preset": info["model_preset"], "model_image_size": info["image_size"],
               "target_views_per_sample": config.target_views, "input_views": config.input_views, "seed": config.seed,
               "frame": model.config.frame, "index_samples": sum(int(r["count"]) for r in index),
               "samples_skipped": sum(s["samples"] for s in skipped), "skipped_shards": skipped}
    from avat3r_core.animation.sensitivity import ExpressionProbe

    probe = ExpressionProbe(model, config.background, config.bf16, detector, detector_status)
    try:
        report = evaluate_report(
            loader, model, labels={"ours": f"ours ({info['model_preset']}, step {step}; this data)",
                                   "baseline": "non-learned baseline (this data)"},
            background=config.background, views=views, ground_truth=gt, detector=detector,
            detector_status=detector_status, ground_truth_status=gt_status, lpips_model=lpips_model,
            lpips_status=lpips_status, bf16=config.bf16, grid_samples=config.grid_samples,
            grid_views=config.grid_views, max_samples=config.max_samples, context=context,
            expression_probe=probe, identity=identity, identity_status=identity_status,
            identity_upscale=config.identity_upscale)
    finally:
        if detector is not None:
            detector.close()
    if report.samples == 0:
        raise FormatError(shards_dir, split, f"split {split!r} yields no evaluation sample")
    if report.resolution and report.resolution[1] != info["image_size"]:
        log.warning("the model was trained at %d² but the %s split is %d²", info["image_size"], split, report.resolution[1])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = report.metrics()
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    atomic_write_bytes(out / "report.md", report.to_markdown().encode())
    atomic_write_bytes(out / "per_view.csv", report.to_csv().encode())
    if report.grid is not None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(report.grid).save(buf, format="PNG")
        atomic_write_bytes(out / "grid.png", buf.getvalue())
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=1).encode())  # last: marks a complete run
    log.info("evaluated %d samples of %s in %.1f s → %s", report.samples, split, metrics["seconds"], out)
    return {**metrics, "outputs": {name: str(out / name) for name in OUTPUTS if (out / name).exists()}}
