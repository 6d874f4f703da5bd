"""A capacity plan for a whole dataset, from what a run here measured.

Every preprocessing stage's stats file (``<manifest>.stats.json``, written by the runner) holds
its items, rows, bytes written, wall seconds and ``busy_seconds`` (the time items spent in the
stage, summed). The plan normalises each stage by the run's *frame-views* (one camera's image at
one extracted time step: the rows of ``frames.parquet``) and scales to a dataset description:

    views = participants × sequences × cameras × extracted frames per sequence

Assumptions (stated in every plan): a stage's work is linear in views (extract decodes every
video once; track fits per view; priors and pack are per view), at the *median* item's cost (the
first items on a fresh worker also pay imports and JIT compilation); the per-stage fixed cost
(start-up, warm-up, scan, manifest merge) is the measured wall time minus that steady work spread
over the run's slots, and does not grow with the dataset; with ``resolution`` different from the measured crop
size, the per-view work and bytes of the crop-sized stages (extract, priors, pack) scale with
the pixel count. Decode cost also grows with the *source* video size, which a run on the studio
does not have (``benchmarks/extract.py`` measures 2048 px decoding).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: the stages planned, with their stats file under the data root and whether work scales with crop pixels
STAGE_STATS = {
    "head_centers": ("frames/head_centers/head_centers.stats.json", False),
    "extract": ("frames/frames.stats.json", True),
    "track": ("tracking/tracking.stats.json", False),
    "priors": ("priors/priors.stats.json", True),
    "pack": ("shards/index.stats.json", True),
}


@dataclass
class Dataset:
    """What a capture holds: ``views`` of it are extracted (every ``frame_step``-th frame, or
    ``frames_per_sequence`` evenly spaced), at ``resolution`` crops."""

    name: str
    participants: int
    sequences: int  # per participant
    cameras: int
    frames: int  # per sequence, in the source videos
    frame_step: int = 1
    frames_per_sequence: int = 0  # 0: every frame_step-th frame
    resolution: int = 512

    @property
    def extracted_frames(self) -> int:
        if self.frames_per_sequence:
            return min(self.frames_per_sequence, self.frames)
        return math.ceil(self.frames / max(1, self.frame_step))

    @property
    def videos(self) -> int:
        return self.participants * self.sequences * self.cameras

    @property
    def views(self) -> int:
        return self.videos * self.extracted_frames


#: Published dataset shapes. NeRSemble v2: ~425 participants, 16 cameras, ~170k videos (~25
#: sequences each), ~1.5 TB; ~300 frames per sequence is an estimate (73 fps captures of a few
#: seconds). Ava-256: 256 participants filmed by ~80 cameras; sequences and frames per sequence
#: here are placeholders to override. Every field can be overridden on the command line.
DATASETS = {
    "nersemble_v2": Dataset("nersemble_v2", participants=425, sequences=25, cameras=16, frames=300, frame_step=10),
    "ava256": Dataset("ava256", participants=256, sequences=10, cameras=80, frames=300, frame_step=10),
}


@dataclass
class StageCost:
    """One stage's measured cost per frame-view, and its fixed cost."""

    stage: str
    busy_s_per_view: float
    bytes_per_view: float
    fixed_s: float
    cpus_per_item: float = 1.0
    gpus_per_item: float = 0.0
    scales_with_pixels: bool = False


@dataclass
class Measured:
    """What the plan is built from: the run's views, crop size and per-stage costs."""

    views: int
    resolution: int
    stages: list[StageCost] = field(default_factory=list)


def measured_costs(data_root: str | Path, resolution: int, resources: dict[str, dict] | None = None,
                   run_slots: int = 1) -> Measured:
    """Per-view costs from the stats files of a run under ``data_root`` (missing stages are left
    out). ``resources``: the run's ``StageResources`` per stage (``num_cpus``/``num_gpus``);
    ``run_slots``: items the run had in flight at once (1 for ``--executor local``)."""
    root = Path(data_root)
    frames = json.loads((root / STAGE_STATS["extract"][0]).read_text())
    views = int(frames["rows"])
    if views <= 0:
        raise ValueError(f"{root / STAGE_STATS['extract'][0]}: the run extracted no frames; nothing to plan from")
    out = Measured(views=views, resolution=resolution)
    for stage, (rel, pixels) in STAGE_STATS.items():
        path = root / rel
        if not path.is_file():
            continue
        stats = json.loads(path.read_text())
        res = (resources or {}).get(stage, {})
        # steady per-item cost × items; what the first items paid on top (warm-up) is a fixed cost
        busy = float(stats.get("item_seconds_median", 0.0)) * int(stats["items_done"]) or float(stats.get("busy_seconds", 0.0))
        out.stages.append(StageCost(
            stage=stage, busy_s_per_view=busy / views, bytes_per_view=float(stats["bytes_written"]) / views,
            fixed_s=max(0.0, float(stats["seconds"]) - busy / max(1, run_slots)), cpus_per_item=float(res.get("num_cpus", 1.0)),
            gpus_per_item=float(res.get("num_gpus", 0.0)), scales_with_pixels=pixels))
    return out


def plan(measured: Measured, dataset: Dataset, nodes: int = 1, cpus_per_node: int = 2,
         gpus_per_node: int = 0) -> dict:
    """CPU-hours, GPU-hours, bytes and wall time per stage (and in total) for ``dataset`` on
    ``nodes`` machines of ``cpus_per_node`` CPUs (and ``gpus_per_node`` GPUs)."""
    pixel_factor = (dataset.resolution / measured.resolution) ** 2
    rows, totals = [], {"cpu_hours": 0.0, "gpu_hours": 0.0, "bytes": 0.0, "wall_hours": 0.0}
    for cost in measured.stages:
        factor = pixel_factor if cost.scales_with_pixels else 1.0
        busy_s = cost.busy_s_per_view * factor * dataset.views
        slots = max(1, int(nodes * cpus_per_node // max(cost.cpus_per_item, 1e-9)))
        if cost.gpus_per_item:
            slots = min(slots, max(1, int(nodes * gpus_per_node // cost.gpus_per_item)))
        wall_s = cost.fixed_s + busy_s / slots
        row = {"stage": cost.stage, "cpu_hours": busy_s * cost.cpus_per_item / 3600,
               "gpu_hours": busy_s * cost.gpus_per_item / 3600, "bytes": cost.bytes_per_view * factor * dataset.views,
               "wall_hours": wall_s / 3600, "slots": slots}
        rows.append(row)
        for key in totals:
            totals[key] += row[key]
    return {"dataset": {**asdict(dataset), "views": dataset.views, "videos": dataset.videos},
            "cluster": {"nodes": nodes, "cpus_per_node": cpus_per_node, "gpus_per_node": gpus_per_node},
            "measured": {"views": measured.views, "resolution": measured.resolution,
                         "stages": [asdict(s) for s in measured.stages]},
            "stages": rows, "total": totals,
            "assumptions": "linear in frame-views; fixed per-stage cost as measured; crop-sized stages scale with "
                           "pixel count; source-video decode size not modelled (see avat3r_core.capacity)"}
