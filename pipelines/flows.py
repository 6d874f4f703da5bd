"""Prefect flows: which stages run, in what order, with which config. No pixels, no tensors.

Each task is one coarse stage: it starts (or joins) Ray, runs the stage through the shared
runner and returns the stage's small summary (manifest path, counts, throughput). Tasks retry
only on infrastructure failures (a Ray worker or node lost), never on bad data: bad items are
already in the stage's error manifest, and an exceeded error budget needs a person.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.concurrency.sync import concurrency

from avat3r_core import storage
from avat3r_core.config import load_params, section
from pipelines.caching import outputs_present, stage_cache_key
from pipelines.versioning import record_stages

log = logging.getLogger("avat3r.flows")

#: the global concurrency limit a training run holds a slot of (one slot per GPU node:
#: :func:`pipelines.schedules.ensure_training_limit`), so two trainings never share a GPU
TRAINING_LIMIT = "avat3r-training"


@dataclass
class DataLayout:
    """Where each stage boundary lives under the data root (DVC tracks these directories)."""

    root: str = "data"

    def __post_init__(self) -> None:
        # absolute, so Ray workers (whose working directory is not ours) find the same files; a URI
        # (s3://bucket/prefix) is one already
        if "://" not in str(self.root):
            self.root = str(Path(self.root).resolve())

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def raw(self) -> str:
        return self.path("raw", "synthetic")

    @property
    def ground_truth(self) -> str:
        return self.path("ground_truth", "synthetic")

    @property
    def face_model(self) -> str:
        return self.path("models", "studio_head")

    @property
    def frames(self) -> str:
        return self.path("frames")

    @property
    def frames_manifest(self) -> str:
        return storage.join(self.frames, "frames.parquet")

    @property
    def raw_manifest(self) -> str:
        return storage.join(self.raw, "synth.parquet")

    @property
    def tracking(self) -> str:
        return self.path("tracking")

    @property
    def tracking_manifest(self) -> str:
        return storage.join(self.tracking, "tracking.parquet")

    @property
    def priors(self) -> str:
        return self.path("priors")

    @property
    def shards(self) -> str:
        return self.path("shards")

    @property
    def priors_manifest(self) -> str:
        return storage.join(self.priors, "priors.parquet")

    @property
    def shards_index(self) -> str:
        return storage.join(self.shards, "index.parquet")

    @property
    def train_metrics(self) -> str:
        return storage.join(self.train, "metrics.json")

    @property
    def evaluation(self) -> str:
        return self.path("reports", "evaluation")

    @property
    def evaluation_metrics(self) -> str:
        return storage.join(self.evaluation, "metrics.json")

    @property
    def avatars(self) -> str:
        return self.path("avatars")

    @property
    def avatars_index(self) -> str:
        return storage.join(self.avatars, "index.parquet")

    @property
    def gallery(self) -> str:
        """The avatar library as a static web site (``avat3r gallery``)."""
        return self.path("gallery")

    @property
    def train(self) -> str:
        return self.path("train")

    @property
    def checkpoint(self) -> str:
        """The trained model reconstruction uses (the train stage copies its final checkpoint here)."""
        return self.path("train", "checkpoint")


def _is_infrastructure_failure(task, task_run, state) -> bool:
    """Retry condition: only lost workers/nodes, not data errors or exhausted error budgets."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        name = type(exc).__name__
        return name in {"RayActorError", "WorkerCrashedError", "NodeDiedError", "RaySystemError", "ObjectLostError"}
    return False


def run_synth_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                    executor: str = "ray") -> dict:
    """The synth stage as the flow, the CLI (``avat3r stage run synth``) and DVC run it."""
    from avat3r_core.synthetic.studio import StudioConfig
    from stages.synth import run_synth

    params = load_params(params_path)
    config = section(params, "synth", StudioConfig, params_path)
    _start_ray(executor, ray_address)
    summary = run_synth(config, layout.raw, layout.ground_truth, layout.face_model,
                        resources=_resources(params, "synth"), executor=executor)
    return summary.to_dict()


def run_extract_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                      executor: str = "ray") -> dict:
    """Extract cropped frames of the capture (head centres first, then one task per video)."""
    from avat3r_core.extract import ExtractConfig
    from stages.extract import run_extract

    params = load_params(params_path)
    config = section(params, "extract", ExtractConfig, params_path)
    _start_ray(executor, ray_address)
    centers, frames = run_extract(config, layout.raw, layout.frames, resources=_resources(params, "extract"),
                                  executor=executor)
    summary = frames.to_dict()
    summary["extra"] = {"head_centers": centers.to_dict()}
    return summary


def run_track_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                    executor: str = "ray") -> dict:
    """FLAME tracking per (subject, sequence). On the studio, the landmark backend is its ground
    truth (+ noise from params), passed explicitly from the data layout; real captures use
    ``landmarks: mediapipe`` or ``file``."""
    from avat3r_core.config import build
    from avat3r_core.synthetic.studio import face_model_paths
    from stages.track import TrackConfig, run_track

    params = load_params(params_path)
    values = dict(params.get("track") or {})
    if values.get("landmarks", "ground_truth") == "ground_truth":
        values.setdefault("ground_truth_root", layout.ground_truth)
    config = build(TrackConfig, values, source=f"{params_path}:track")
    _start_ray(executor, ray_address)
    summary = run_track(config, layout.frames_manifest, layout.tracking, face_model_paths(layout.face_model),
                        resources=_resources(params, "track"), executor=executor)
    return summary.to_dict()


def run_priors_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                     executor: str = "ray") -> dict:
    """Position maps and feature maps per frame. Sources follow params (``auto``: DUSt3R when a
    checkpoint is given, else the studio's ground-truth depth on synthetic data, else the tracked
    face model); every row records which source (and which stand-in) made it."""
    from avat3r_core.config import build
    from avat3r_core.synthetic.studio import face_model_paths
    from stages.priors import PriorsConfig, run_priors

    params = load_params(params_path)
    values = dict(params.get("priors") or {})
    if values.get("position_source", "auto") in ("auto", "ground_truth") and storage.exists(layout.ground_truth):
        values.setdefault("ground_truth_root", layout.ground_truth)
    config = build(PriorsConfig, values, source=f"{params_path}:priors")
    _start_ray(executor, ray_address)
    tracking = layout.tracking_manifest if storage.exists(layout.tracking_manifest) else None
    summary = run_priors(config, layout.frames_manifest, layout.priors, resources=_resources(params, "priors"),
                         executor=executor, tracking_manifest=tracking, face_model_paths=face_model_paths(layout.face_model))
    return summary.to_dict()


def run_pack_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                   executor: str = "ray") -> dict:
    """Sharded WebDataset packing, split by subject (train/val/test)."""
    from avat3r_core.dataset.pack import PackConfig
    from stages.pack import run_pack

    params = load_params(params_path)
    config = section(params, "pack", PackConfig, params_path)
    _start_ray(executor, ray_address)
    summary = run_pack(config, layout.frames_manifest, layout.tracking_manifest,
                       layout.priors_manifest, layout.shards,
                       resources=_resources(params, "pack"), executor=executor)
    return summary.to_dict()


def run_train_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                    executor: str = "ray") -> dict:
    """Ray Train (DDP) on the packed shards; the model is sized from the data. Returns the run's
    metrics (``metrics.json``: validation PSNR/SSIM beside the non-learned baseline) and the final
    checkpoint path."""
    from stages.runner import StageSummary
    from stages.train import VERSION, train_on_shards, train_stage_configs

    params = load_params(params_path)
    config, data, scaling = train_stage_configs(params.get("train") or {}, source=f"{params_path}:train")
    if data.mouth_weight and not data.face_model:  # the mouth's box from the face model tracking fitted
        from avat3r_core.synthetic.studio import face_model_paths

        model, embedding = face_model_paths(layout.face_model)
        data = replace(data, face_model=model, landmark_embedding=data.landmark_embedding or embedding)
    t0 = time.perf_counter()
    metrics = train_on_shards(config, data, layout.shards, layout.train, scaling=scaling, executor=executor,
                              ray_address=ray_address)
    # the common stage summary (items = optimiser steps, rows = samples, failed = skipped batches)
    return StageSummary(
        stage="train", version=VERSION, manifest=layout.train_metrics, errors_manifest="", items_total=config.schedule.steps,
        items_done=metrics["steps"] - metrics["resumed_from_step"], items_skipped=metrics["resumed_from_step"],
        items_failed=metrics["skipped_batches"], rows=metrics["samples"], bytes_written=0,
        seconds=round(time.perf_counter() - t0, 3), items_per_s=metrics["samples_per_s"], bytes_per_s=0.0,
        extra=metrics).to_dict()


def run_evaluate_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                       executor: str = "ray") -> dict:
    """The trained checkpoint beside the non-learned baseline on the held-out split (novel views at
    novel expressions): PSNR/SSIM (+LPIPS with weights), AKD; report.md, grid.png, metrics.json."""
    from avat3r_core.config import build
    from avat3r_core.evaluation import EvalConfig
    from stages.evaluate import VERSION, run_evaluate
    from stages.runner import StageSummary

    params = load_params(params_path)
    values = dict(params.get("evaluate") or {})
    split = values.pop("split", "test")
    lpips = {k: values.pop(k, "") or None for k in ("lpips_backbone", "lpips_lin")}
    config = build(EvalConfig, values, source=f"{params_path}:evaluate")
    t0 = time.perf_counter()
    metrics = run_evaluate(layout.checkpoint, layout.shards, layout.evaluation, split,
                           frames_manifest=layout.frames_manifest, ground_truth=layout.ground_truth,
                           config=config, **lpips)
    views = int(metrics.get("views") or metrics.get("samples") or 0)
    seconds = time.perf_counter() - t0
    return StageSummary(
        stage="evaluate", version=VERSION, manifest=layout.evaluation_metrics, errors_manifest="", items_total=views,
        items_done=views, items_skipped=0, items_failed=0, rows=views, bytes_written=0, seconds=round(seconds, 3),
        items_per_s=views / max(seconds, 1e-9), bytes_per_s=0.0, extra=metrics).to_dict()


def run_reconstruct_stage(params_path: str, layout: DataLayout, ray_address: str | None = None,
                          executor: str = "ray") -> dict:
    """Build an avatar library with the trained checkpoint. ``reconstruct.library`` names a library
    manifest; empty: the held-out subjects of the preprocessed capture (``reconstruct.split``)."""
    from avat3r_core.config import build
    from avat3r_core.reconstruct.library import write_capture_library
    from stages.reconstruct import ReconstructConfig, run_reconstruct, with_data_defaults

    params = load_params(params_path)
    values = dict(params.get("reconstruct") or {})
    library = values.pop("library", "") or None
    split = values.pop("split", "test")
    values = with_data_defaults(values, layout.face_model, layout.priors)
    config = build(ReconstructConfig, values, source=f"{params_path}:reconstruct")
    if library is None:
        library = write_capture_library(layout.frames_manifest, layout.shards, split,
                                        storage.join(layout.avatars, f"library_{split}.parquet"))
    _start_ray(executor, ray_address)
    summary = run_reconstruct(config, library, layout.checkpoint, layout.avatars,
                              resources=_resources(params, "reconstruct"), executor=executor)
    return summary.to_dict()


#: Stage name → the plain function that runs it from params (used by flows, CLI and dvc.yaml).
STAGES = {"synth": run_synth_stage, "extract": run_extract_stage, "track": run_track_stage,
          "priors": run_priors_stage, "pack": run_pack_stage, "train": run_train_stage,
          "evaluate": run_evaluate_stage, "reconstruct": run_reconstruct_stage}


def _start_ray(executor: str, ray_address: str | None) -> None:
    if executor == "ray":
        from stages.ray_runtime import ensure_ray

        ensure_ray(ray_address)


@dataclass(frozen=True)
class StageIO:
    """What a stage reads and writes under the data layout: the task cache key
    (:mod:`pipelines.caching`) hashes the inputs, and a missing output forces a rerun. The stage's
    version is its module's ``VERSION`` (``stages/<name>.py``), the one the stage records itself."""

    inputs: tuple[str, ...]  # DataLayout attribute names
    outputs: tuple[str, ...]

    def paths(self, layout: DataLayout, names: tuple[str, ...]) -> list[str]:
        return [getattr(layout, n) for n in names]


STAGE_IO = {
    "synth": StageIO((), ("raw_manifest",)),
    "extract": StageIO(("raw",), ("frames_manifest",)),
    "track": StageIO(("frames_manifest", "face_model", "ground_truth"), ("tracking_manifest",)),
    "priors": StageIO(("frames_manifest", "tracking_manifest", "ground_truth"), ("priors_manifest",)),
    "pack": StageIO(("frames_manifest", "tracking_manifest", "priors_manifest"), ("shards_index",)),
    "train": StageIO(("shards_index",), ("train_metrics", "checkpoint")),
    "reconstruct": StageIO(("checkpoint", "shards_index", "frames_manifest", "priors_manifest", "tracking_manifest"),
                           ("avatars_index",)),
    "evaluate": StageIO(("checkpoint", "shards_index", "frames_manifest", "ground_truth"), ("evaluation_metrics",)),
}


def _cache_key(name: str):
    def key(context, parameters: dict) -> str:
        layout: DataLayout = parameters["layout"]
        config = load_params(parameters["params_path"]).get(name) or {}
        io = STAGE_IO[name]
        version = importlib.import_module(f"stages.{name}").VERSION
        return stage_cache_key(name, version, config, layout.root, io.paths(layout, io.inputs))

    return key


def _flow_task(name: str):
    """The Prefect task of one stage: the registry's function, with retries, caching and a log line."""
    run = STAGES[name]

    @task(name=name, retries=2, retry_delay_seconds=5, retry_condition_fn=_is_infrastructure_failure,
          cache_key_fn=_cache_key(name), persist_result=True)
    def run_stage_task(params_path: str, layout: DataLayout, ray_address: str | None, executor: str) -> dict:
        # training holds a slot of the GPU limit (pipelines.schedules); without the limit defined, it runs freely
        guard = concurrency(TRAINING_LIMIT, occupy=1, strict=False) if name == "train" else contextlib.nullcontext()
        with guard:
            summary = run(params_path, layout, ray_address, executor)
        get_run_logger().info("%s: %s", name, summary)
        return summary

    return run_stage_task


def run_stage_cached(name: str, params_path: str, layout: DataLayout, ray_address: str | None, executor: str) -> dict:
    """Run stage ``name`` as its Prefect task: a cache hit (same inputs, config and version, outputs
    still there) returns the earlier summary without starting Ray, marked ``cached: True``."""
    stage_task_ = STAGE_TASKS[name]
    io = STAGE_IO[name]
    if not outputs_present(io.paths(layout, io.outputs)):
        stage_task_ = stage_task_.with_options(refresh_cache=True)
    state = stage_task_(params_path, layout, ray_address, executor, return_state=True)
    summary = dict(state.result())
    summary["cached"] = state.name == "Cached"
    if summary["cached"]:
        get_run_logger().info("%s: cached — inputs, config and version unchanged; nothing to do", name)
    return summary


#: The preprocess flow's stages, in order, each as a Prefect task.
PREPROCESS = ("synth", "extract", "track", "priors", "pack")
RECONSTRUCT = ("reconstruct", "evaluate")
STAGE_TASKS = {name: _flow_task(name) for name in STAGES}


def _resources(params: dict, stage: str):
    from stages.runner import StageResources
    from avat3r_core.config import build

    values = dict((params.get("runtime") or {}).get("resources", {}).get("default", {}))
    values.update((params.get("runtime") or {}).get("resources", {}).get(stage, {}))
    return build(StageResources, values, source=f"params.yaml:runtime.resources.{stage}")


def _publish_stage_table(summaries: list[dict], key: str) -> None:
    rows = [
        {
            "stage": s["stage"],
            "cached": s.get("cached", False),
            "items": s["items_total"],
            "done": s["items_done"],
            "skipped": s["items_skipped"],
            "failed": s["items_failed"],
            "rows": s["rows"],
            "items/s": s["items_per_s"],
            "MB/s": round(s["bytes_per_s"] / 1e6, 3),
            "manifest": s["manifest"],
        }
        for s in summaries
    ]
    create_table_artifact(key=key, table=rows, description="Stage counts, errors and throughput")


def _record_version(stages: list[str], params_path: str, layout: DataLayout, key: str) -> dict:
    """Record what the flow ran in ``dvc.lock`` (:mod:`pipelines.versioning`) and publish the
    version the run belongs to: git commit and ``dvc.lock`` digest."""
    version = record_stages(stages, params_path, layout.root).to_dict()
    rows = [{"field": k, "value": ", ".join(v) if isinstance(v, list) else str(v)} for k, v in version.items()]
    create_table_artifact(key=key, table=rows, description="The git commit and dvc.lock digest this run belongs to")
    return version


@flow(name="preprocess", log_prints=True)
def preprocess_flow(params_path: str = "params.yaml", data_root: str = "data", ray_address: str | None = None,
                    executor: str = "ray") -> list[dict]:
    """Studio (or ingest) → extract → track → priors → pack. Stages are added as they land."""
    layout = DataLayout(data_root)
    summaries = [run_stage_cached(name, params_path, layout, ray_address, executor) for name in PREPROCESS]
    _publish_stage_table(summaries, "preprocess-stages")
    _record_version(list(PREPROCESS), params_path, layout, "preprocess-version")
    return summaries


@flow(name="train", log_prints=True)
def train_flow(params_path: str = "params.yaml", data_root: str = "data", ray_address: str | None = None,
               executor: str = "ray") -> dict:
    """Ray Train on the packed shards (``params.yaml`` ``train``); publishes the curves and the
    latest validation grid as artifacts."""
    layout = DataLayout(data_root)
    summary = run_stage_cached("train", params_path, layout, ray_address, executor)
    _publish_stage_table([summary], "train-stage")
    _publish_training(layout)
    _record_version(["train"], params_path, layout, "train-version")
    return summary


def _publish_training(layout: DataLayout) -> None:
    """Prefect artifacts of a training run: validation PSNR/SSIM beside the baseline, and the
    loss curve (sampled), so the UI shows how the run went without opening TensorBoard."""
    import csv

    val_csv = Path(layout.train, "plots", "val.csv")
    if val_csv.exists():
        with val_csv.open(newline="") as f:
            rows = [{k: (round(float(v), 4) if k != "step" else int(float(v))) for k, v in r.items()} for r in csv.DictReader(f)]
        create_table_artifact(key="train-validation", table=rows,
                              description="Validation on held-out subjects: model vs the non-learned baseline")
    train_csv = Path(layout.train, "plots", "train.csv")
    if train_csv.exists():
        with train_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
        stride = max(1, len(rows) // 50)
        curve = [{"step": int(float(r["step"])), "loss": round(float(r["loss"]), 5), "lr": float(r["lr"])}
                 for r in rows[::stride]]
        create_table_artifact(key="train-loss-curve", table=curve, description="Training loss (every %d-th step)" % stride)


def _publish_evaluation(layout: DataLayout) -> None:
    """The evaluation report (model vs baseline vs published) as a Markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    report = Path(layout.evaluation, "report.md")
    if report.exists():
        create_markdown_artifact(key="evaluation-report", markdown=report.read_text(),
                                 description="Held-out subjects: ours vs the non-learned baseline (and published numbers)")


def _publish_avatars(layout: DataLayout) -> None:
    """The library index (status, mode, prior sources, timings, where the pictures are)."""
    import pyarrow.parquet as pq

    if not Path(layout.avatars_index).exists():
        return
    keep = ("id", "status", "mode", "position_source", "feature_source", "stand_ins", "total_s", "turntable", "message")
    rows = [{k: r.get(k) for k in keep if k in r} for r in pq.read_table(layout.avatars_index).to_pylist()[:200]]
    create_table_artifact(key="avatar-library", table=rows, description=f"Avatars in {layout.avatars}")


def _publish_gallery(layout: DataLayout) -> None:
    """The library's web gallery (``avat3r gallery``), linked from an artifact. Without the viewer
    package (``make setup`` installs it) the avatars stand and the log says why there is no site."""
    from prefect.artifacts import create_link_artifact

    from avat3r_core.gallery.site import GalleryError, build_gallery

    if not Path(layout.avatars_index).exists():
        return
    try:
        summary = build_gallery(layout.avatars, layout.gallery)
    except GalleryError as exc:
        log.warning("reconstruct: no gallery: %s", exc)
        return
    print(f"gallery: {summary['index']} (serve: python -m http.server --bind 127.0.0.1 -d {layout.gallery})")
    create_link_artifact(key="avatar-gallery", link=Path(summary["index"]).as_uri(), link_text="avatar gallery",
                         description=f"{summary['avatars']} avatars ({summary['ok']} ok, {summary['incomplete']} "
                                     f"incomplete, {summary['failed']} failed); serve it with "
                                     f"`python -m http.server -d {layout.gallery}`")


@flow(name="reconstruct", log_prints=True)
def reconstruct_flow(params_path: str = "params.yaml", data_root: str = "data", ray_address: str | None = None,
                     executor: str = "ray") -> list[dict]:
    """Bulk reconstruction with the trained checkpoint (an avatar library: .ply, preview,
    turntable, animation per avatar), then the evaluation on held-out subjects beside the baseline."""
    layout = DataLayout(data_root)
    summaries = [run_stage_cached(name, params_path, layout, ray_address, executor) for name in RECONSTRUCT]
    _publish_stage_table(summaries, "reconstruct-stages")
    _record_version(list(RECONSTRUCT), params_path, layout, "reconstruct-version")
    _publish_avatars(layout)
    _publish_gallery(layout)
    _publish_evaluation(layout)
    return summaries


@flow(name="demo", log_prints=True)
def demo_flow(params_path: str = "params.yaml", data_root: str = "data", ray_address: str | None = None,
              executor: str = "ray") -> dict:
    """Everything on the embedded synthetic studio: preprocess → train → reconstruct + evaluate."""
    summaries = preprocess_flow(params_path, data_root, ray_address, executor)
    summaries.append(train_flow(params_path, data_root, ray_address, executor))
    summaries += reconstruct_flow(params_path, data_root, ray_address, executor)
    _publish_stage_table(summaries, "demo-stages")
    layout = DataLayout(data_root)
    return {"stages": summaries, "raw": layout.raw, "ground_truth": layout.ground_truth,
            "previews": str(Path(layout.ground_truth) / "previews"), "frames": layout.frames,
            "tracking": layout.tracking, "priors": layout.priors, "shards": layout.shards,
            "training": layout.train, "checkpoint": layout.checkpoint,
            "report": str(Path(layout.evaluation, "report.md")), "avatars": layout.avatars,
            "gallery": str(Path(layout.gallery, "index.html"))}
