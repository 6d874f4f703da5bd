"""Prefect flows: which stages run, in what order, with which config. No pixels, no tensors.

Each task is one coarse stage: it starts (or joins) Ray, runs the stage through the shared
runner and returns the stage's small summary (manifest path, counts, throughput). Tasks retry
only on infrastructure failures (a Ray worker or node lost), never on bad data: bad items are
already in the stage's error manifest, and an exceeded error budget needs a person.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from avat3r_core.config import load_params, section

log = logging.getLogger("avat3r.flows")


@dataclass
class DataLayout:
    """Where each stage boundary lives under the data root (DVC tracks these directories)."""

    root: str = "data"

    def __post_init__(self) -> None:
        # absolute, so Ray workers (whose working directory is not ours) find the same files
        self.root = str(Path(self.root).resolve())

    def path(self, *parts: str) -> str:
        return str(Path(self.root, *parts))

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
        return str(Path(self.frames, "frames.parquet"))

    @property
    def tracking(self) -> str:
        return self.path("tracking")

    @property
    def tracking_manifest(self) -> str:
        return str(Path(self.tracking, "tracking.parquet"))

    @property
    def priors(self) -> str:
        return self.path("priors")

    @property
    def shards(self) -> str:
        return self.path("shards")


def _is_infrastructure_failure(task, task_run, state) -> bool:
    """Retry condition: only lost workers/nodes, not data errors or exhausted error budgets."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify, not handle
        name = type(exc).__name__
        return name in {"RayActorError", "WorkerCrashedError", "NodeDiedError", "RaySystemError", "ObjectLostError"}
    return False


def stage_task(name: str):
    return task(name=name, retries=2, retry_delay_seconds=5, retry_condition_fn=_is_infrastructure_failure)


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
    ``backend: mediapipe`` or ``file``."""
    from avat3r_core.config import build
    from avat3r_core.synthetic.studio import face_model_paths
    from stages.track import TrackConfig, run_track

    params = load_params(params_path)
    values = dict(params.get("track") or {})
    if values.get("backend", "ground_truth") == "ground_truth":
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
    if values.get("position_source", "auto") in ("auto", "ground_truth") and Path(layout.ground_truth).exists():
        values.setdefault("ground_truth_root", layout.ground_truth)
    config = build(PriorsConfig, values, source=f"{params_path}:priors")
    _start_ray(executor, ray_address)
    tracking = layout.tracking_manifest if Path(layout.tracking_manifest).exists() else None
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
                       str(Path(layout.priors, "priors.parquet")), layout.shards,
                       resources=_resources(params, "pack"), executor=executor)
    return summary.to_dict()


#: Stage name → the plain function that runs it from params (used by flows, CLI and dvc.yaml).
STAGES = {"synth": run_synth_stage, "extract": run_extract_stage, "track": run_track_stage,
          "priors": run_priors_stage, "pack": run_pack_stage}


def _start_ray(executor: str, ray_address: str | None) -> None:
    if executor == "ray":
        from stages.ray_runtime import ensure_ray

        ensure_ray(ray_address)


def _flow_task(name: str):
    """The Prefect task of one stage: the registry's function, with retries and a log line."""
    run = STAGES[name]

    @stage_task(name)
    def run_stage_task(params_path: str, layout: DataLayout, ray_address: str | None, executor: str) -> dict:
        summary = run(params_path, layout, ray_address, executor)
        get_run_logger().info("%s: %s", name, summary)
        return summary

    return run_stage_task


#: The preprocess flow's stages, in order, each as a Prefect task.
PREPROCESS = ("synth", "extract", "track", "priors", "pack")
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


@flow(name="preprocess", log_prints=True)
def preprocess_flow(params_path: str = "params.yaml", data_root: str = "data", ray_address: str | None = None,
                    executor: str = "ray") -> list[dict]:
    """Studio (or ingest) → extract → track → priors → pack. Stages are added as they land."""
    layout = DataLayout(data_root)
    summaries = [STAGE_TASKS[name](params_path, layout, ray_address, executor) for name in PREPROCESS]
    _publish_stage_table(summaries, "preprocess-stages")
    return summaries


@flow(name="demo", log_prints=True)
def demo_flow(params_path: str = "params.yaml", data_root: str = "data", ray_address: str | None = None,
              executor: str = "ray") -> dict:
    """Everything on the embedded synthetic studio: preprocess (→ train → reconstruct as they land)."""
    summaries = preprocess_flow(params_path, data_root, ray_address, executor)
    layout = DataLayout(data_root)
    return {"stages": summaries, "raw": layout.raw, "ground_truth": layout.ground_truth,
            "previews": str(Path(layout.ground_truth) / "previews"), "frames": layout.frames,
            "tracking": layout.tracking, "priors": layout.priors, "shards": layout.shards}
