"""The ``avat3r`` command line.

Exit codes: 0 success · 1 unexpected failure · 2 bad arguments · 3 bad input data (a file with
the wrong layout; the message names file and field) · 4 a stage exceeded its error budget
(finished work is kept; the message names the error manifest) · 5 the output is being written by
another run (the message names it). A full disk exits 1 with one line saying what was kept.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BAD_INPUT, EXIT_ERROR_BUDGET, EXIT_BUSY = 0, 1, 2, 3, 4, 5

app = typer.Typer(
    name="avat3r",
    help="Avat3r at dataset scale: synthetic studio, preprocessing stages, training and avatar reconstruction.\n\n"
    "Exit codes: 0 ok, 1 failure, 2 bad arguments, 3 bad input data, 4 error budget exceeded, "
    "5 output in use by another run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stage_app = typer.Typer(help="Run one stage; inspect its failures and throughput.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
console = Console()

RayAddress = typer.Option(None, "--ray-address", help="Join an existing Ray cluster: HOST:PORT (127.0.0.1:PORT for one bound to loopback), auto, "
                          "or ray://head:10001. Default: start Ray locally, listening on 127.0.0.1 only.")
Executor = typer.Option("ray", "--executor", envvar="AVAT3R_EXECUTOR",
                        help="ray (fan out on Ray) or local (inline, for debugging).")
ParamsPath = typer.Option("params.yaml", "--params", help="The params file DVC tracks.")
DataRoot = typer.Option("data", "--data-root", help="Root of the DVC-tracked data tree.")


def _print_error(kind: str, exc: BaseException) -> None:
    """One line naming what failed. soft_wrap: Rich would otherwise break a long path at the terminal's
    width mid-name (``…/tracking\\n.npz``), and the name must stay one piece to be copied or grepped."""
    console.print(f"[bold red]{kind}:[/] {escape(str(exc))}", soft_wrap=True)


def _run(fn, *args, **kwargs):
    """Map the project's errors to exit codes with a one-line message naming what failed."""
    from avat3r_core.errors import FormatError
    from avat3r_core.storage import OutputLocked
    from stages.ray_runtime import RayConnectError
    from stages.runner import DiskFull, ErrorBudgetExceeded

    try:
        return fn(*args, **kwargs)
    except OutputLocked as exc:
        _print_error("output in use", exc)
        raise typer.Exit(EXIT_BUSY) from exc
    except DiskFull as exc:
        _print_error("disk full", exc)
        raise typer.Exit(EXIT_FAILURE) from exc
    except FormatError as exc:
        _print_error("bad input", exc)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except FileNotFoundError as exc:  # a missing input file/directory: name it, no traceback
        _print_error("missing input", exc)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    except ErrorBudgetExceeded as exc:
        _print_error("error budget exceeded", exc)
        raise typer.Exit(EXIT_ERROR_BUDGET) from exc
    except RayConnectError as exc:  # nothing answers --ray-address: name it, no traceback
        _print_error("ray", exc)
        raise typer.Exit(EXIT_FAILURE) from exc


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.callback()
def main_callback(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log stage progress details.")):
    _setup_logging(verbose)


# --------------------------------------------------------------------------- studio
@app.command()
def synth(
    out: Path = typer.Option(Path("data/raw/synthetic"), "--out", help="Capture root (NeRSemble layout)."),
    ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="Ground-truth root (default: <out>/../../ground_truth/<name>)."),
    face_model: Optional[Path] = typer.Option(None, "--face-model", help="Where the studio head model (FLAME format) is written (default: <out>/../../models/studio_head)."),
    preset: str = typer.Option("demo", "--preset", help="Studio preset: tiny, demo or large."),
    subjects: Optional[int] = typer.Option(None, "--subjects", min=1, help="Number of people."),
    sequences: Optional[int] = typer.Option(None, "--sequences", min=1, help="Expression sequences per person."),
    frames: Optional[int] = typer.Option(None, "--frames", min=2, help="Frames per sequence."),
    cameras: Optional[int] = typer.Option(None, "--cameras", min=1, max=64, help="Cameras in the rig."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=32, max=4096, help="Image height in pixels (width follows the portrait aspect)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Dataset seed: same seed, same data."),
    preview: bool = typer.Option(False, "--preview", help="Also write contact-sheet PNGs per subject."),
    ray_address: Optional[str] = RayAddress,
    executor: str = Executor,
):
    """Generate the synthetic capture studio (a FLAME-format head filmed by a calibrated rig)."""
    from avat3r_core.config import build
    from avat3r_core.synthetic.studio import StudioConfig
    from stages.ray_runtime import ensure_ray
    from stages.synth import run_synth

    values = {k: v for k, v in dict(subjects=subjects, sequences=sequences, frames=frames, cameras=cameras,
                                      resolution=resolution, seed=seed).items() if v is not None}
    if preview:
        values["preview"] = True
    config = _run(build, StudioConfig, values, preset=preset, source="command line")
    root = out.parent.parent
    gt = ground_truth or root / "ground_truth" / out.name
    model_dir = face_model or root / "models" / "studio_head"
    if executor == "ray":
        _run(ensure_ray, ray_address)
    summary = _run(run_synth, config, str(out), str(gt), str(model_dir), executor=executor)
    _print_summaries([summary.to_dict()])
    console.print(f"capture: {out}\nground truth: {gt}\nface model: {model_dir}")
    if config.preview:
        console.print(f"previews: {gt / 'previews'}")


# --------------------------------------------------------------------------- ingestion
ingest_app = typer.Typer(help="Look at a capture dataset before processing it.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")


@ingest_app.command("inspect")
def ingest_inspect(
    root: Path = typer.Argument(..., help="Dataset root (NeRSemble v2 or v1 layout, or folders with transforms.json)."),
    layout: str = typer.Option("auto", "--layout", help="auto, nersemble, nersemble_v1 or transforms."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    quick: bool = typer.Option(False, "--quick", help="Read frame counts from the container headers instead of "
                               "decoding every frame: seconds for a whole dataset, but a truncated video whose "
                               "index sits at the front passes here (extract still names it)."),
):
    """Subjects, sequences, cameras, frame counts, resolutions, and every problem found.

    By default every frame of every video is decoded, so truncated and corrupt files are found;
    on a full capture that is a decode of the whole dataset (use --quick for a first look).
    Exits 3 when any problem of severity 'error' was found (the items it names are unusable).
    """
    from dataclasses import asdict

    from avat3r_core.formats.capture import scan_capture

    index = _run(scan_capture, root, layout, decode=not quick)
    # In a log or CI (not a terminal) nothing is cut: tables at their full width, problems one a line.
    full = not console.is_terminal
    out = Console(width=100_000, highlight=False) if full else console
    table = Table(title=f"{root} ({index.layout} layout)")
    for col in ("subject", "sequence", "cameras", "frames", "resolution", "alpha", "plates", "colour cal."):
        table.add_column(col)
    for subject in index.subjects.values():
        plates = set(subject.background.media) if subject.background else set()
        for seq in subject.sequences.values():
            sizes = sorted({f"{m.width}x{m.height}" for m in seq.media.values() if m.width})
            frames = sorted({m.frames for m in seq.media.values()})
            alpha = sum(m.alpha_path is not None or m.alpha_images is not None for m in seq.media.values())
            colour = "yes" if subject.color_calibration or any(m.color_correction for m in seq.media.values()) else "no"
            table.add_row(subject.subject, seq.name, f"{len(seq.media)}/{len(subject.serials)}",
                          "-".join(map(str, [frames[0], frames[-1]] if len(frames) > 1 else frames)),
                          ", ".join(sizes), f"{alpha}/{len(seq.media)}", f"{len(plates & set(seq.media))}/{len(seq.media)}",
                          colour)
    out.print(table)
    for name, path in index.metadata.items():
        caption, rows = _metadata_table(name, path, list(index.subjects))
        out.print(caption, markup=False)
        out.print(rows)
    errors = [p for p in index.problems if p.severity == "error"]
    if index.problems and full:
        out.print(f"{len(index.problems)} problem(s), {len(errors)} error(s):")
        for p in index.problems:
            where = "/".join(x for x in (p.subject, p.sequence, p.camera,
                                         None if p.frame is None else f"frame {p.frame}") if x)
            typer.echo(f"{p.severity}\t{where}\t{p.message}\t{p.path}")  # tab-separated, for grep/cut
    elif index.problems:
        problems = Table(title=f"{len(index.problems)} problem(s), {len(errors)} error(s)")
        for col in ("severity", "subject", "sequence", "camera", "message", "file"):
            problems.add_column(col)
        for p in index.problems:
            problems.add_row(f"[red]{p.severity}[/]" if p.severity == "error" else p.severity, p.subject,
                             p.sequence or "", p.camera or "", escape(p.message), escape(p.path))
        console.print(problems)
    else:
        console.print("[green]no problems found[/]")
    if json_out:
        report = {"layout": index.layout, "root": index.root, "problems": [asdict(p) for p in index.problems],
                  "subjects": {s.subject: {"serials": s.serials, "sequences": {
                      q.name: {c: asdict(m) for c, m in q.media.items()} for q in s.sequences.values()}}
                      for s in index.subjects.values()}}
        json_out.write_text(json.dumps(report, indent=1))
    raise typer.Exit(EXIT_BAD_INPUT if errors else EXIT_OK)


@ingest_app.command("import-tracking")
def ingest_import_tracking(
    source: Path = typer.Argument(..., help="A NeRSemble benchmark tracking .npz, or VHAP's flame_param/ folder (or one VHAP .npz)."),
    flame_model: Path = typer.Option(..., "--flame-model", help="Your FLAME model (.pkl) the tracking was made with: it gives the head frame."),
    subject: str = typer.Option(..., "--subject", help="Subject id in the capture (e.g. 017)."),
    sequence: str = typer.Option(..., "--sequence", help="Sequence name in the capture (e.g. EXP-1-head)."),
    source_format: str = typer.Option("auto", "--format", help="auto, nersemble (benchmark npz) or vhap."),
    out: Path = typer.Option(Path("data/tracking/tracking.parquet"), "--out", help="tracking.parquet to write (other sequences in it are kept)."),
):
    """Turn FLAME tracking made elsewhere into tracking.parquet rows, so the track stage can be skipped."""
    from avat3r_core.tracking.imports import read_nersemble_tracking, read_vhap_tracking, tracking_rows, write_tracking

    if source_format == "auto":
        source_format = "vhap" if source.is_dir() or source.parent.name == "flame_param" else "nersemble"
    readers = {"nersemble": read_nersemble_tracking, "vhap": read_vhap_tracking}
    if source_format not in readers:
        console.print(f"[bold red]bad argument:[/] --format must be auto, nersemble or vhap, got {escape(source_format)}")
        raise typer.Exit(EXIT_USAGE)
    track = _run(readers[source_format], source)
    rows = _run(tracking_rows, track, subject, sequence, flame_model)
    total = _run(write_tracking, rows, out)
    console.print(f"{len(rows)} frame(s) of {escape(subject)}/{escape(sequence)} imported from {escape(str(source))} "
                  f"({source_format}); {out} holds {total} row(s)")


def _metadata_table(name: str, path: str, subjects: list[str]) -> tuple[str, Table]:
    """A ``metadata_*.csv`` as a caption and a table: its rows for the indexed subjects when the first column
    holds participant ids (``17`` or ``017``), else its first rows."""
    import csv

    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        rows = list(csv.reader(handle))
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    wanted = {s.lstrip("0") or "0" for s in subjects}
    mine = [r for r in body if r and r[0].strip().lstrip("0") in wanted]
    shown = mine or body[:10]
    caption = f"{name}: {len(body)} row(s)" + (f", {len(shown)} for these subjects" if mine else
                                               f", first {len(shown)}" if len(body) > len(shown) else "")
    table = Table()
    for col in header:
        table.add_column(escape(col))
    for r in shown:
        table.add_row(*(escape(c) for c in r[:len(header)]))
    return caption, table


@app.command()
def extract(
    # str, not Path: a URI (s3://bucket/...) must keep its "//"
    capture: str = typer.Option("data/raw/synthetic", "--capture", help="Capture root (NeRSemble layout or transforms.json folders); a local path or a URI (s3://...)."),
    out: str = typer.Option("data/frames", "--out", help="Output directory (frames.parquet + images/ + alpha/); a local path or a URI."),
    preset: str = typer.Option("demo", "--preset", help="tiny, demo or paper (512 px crops)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=16, help="Square crop size in pixels."),
    frame_step: Optional[int] = typer.Option(None, "--frame-step", min=1, help="Every k-th frame."),
    frames_per_sequence: Optional[int] = typer.Option(None, "--frames-per-sequence", min=0, help="This many frames per sequence, evenly spaced."),
    layout: str = typer.Option("auto", "--layout", help="auto, nersemble, nersemble_v1 or transforms."),
    no_color_correction: bool = typer.Option(False, "--no-color-correction", help="Ignore color_calibration.json."),
    ray_address: Optional[str] = RayAddress,
    executor: str = Executor,
):
    """Extract head-centred, matted, colour-corrected crops with their crop cameras (frames.parquet)."""
    from avat3r_core.config import build
    from avat3r_core.extract import ExtractConfig
    from stages.ray_runtime import ensure_ray
    from stages.extract import run_extract

    values = {k: v for k, v in dict(resolution=resolution, frame_step=frame_step,
                                      frames_per_sequence=frames_per_sequence).items() if v is not None}
    if no_color_correction:
        values["color_correction"] = False
    config = _run(build, ExtractConfig, values, preset=preset, source="command line")
    if executor == "ray":
        _run(ensure_ray, ray_address)
    centers, frames = _run(run_extract, config, str(capture), str(out), layout=layout, executor=executor)
    _print_summaries([centers.to_dict(), frames.to_dict()])


# --------------------------------------------------------------------------- shards
shards_app = typer.Typer(help="Check and summarise packed WebDataset shards.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")


@shards_app.command("verify")
def shards_verify(shards_dir: Path = typer.Argument(Path("data/shards"), help="Directory with index.parquet and the shards.")):
    """Re-read every shard against index.parquet (count, keys, checksum, decodable members); exit 3 if any is broken."""
    from avat3r_core.dataset.pack import verify_shards

    report = _run(verify_shards, str(shards_dir))
    console.print(f"{report['shards']} shard(s), {report['samples']} sample(s) checked")
    for path, problems in report["broken"].items():
        for problem in problems:
            console.print(f"[red]broken[/] {escape(str(path))}: {escape(str(problem))}", soft_wrap=True)
    if report["ok"]:
        console.print("[green]all shards match the index[/]")
    raise typer.Exit(EXIT_OK if report["ok"] else EXIT_BAD_INPUT)


@shards_app.command("stats")
def shards_stats(shards_dir: Path = typer.Argument(Path("data/shards"), help="Directory with index.parquet.")):
    """Shards, samples, subjects and bytes per split (the index's figures), and how many shards and samples
    are readable (each shard re-read against the index; the problems of the others listed)."""
    from avat3r_core.dataset.pack import shard_stats

    console.print_json(json.dumps(_run(shard_stats, str(shards_dir)), default=str))


# --------------------------------------------------------------------------- capacity
@app.command()
def plan(
    dataset: str = typer.Option("nersemble_v2", "--dataset", help="nersemble_v2 or ava256 (override any field below)."),
    participants: Optional[int] = typer.Option(None, "--participants", min=1),
    sequences: Optional[int] = typer.Option(None, "--sequences", min=1, help="Per participant."),
    cameras: Optional[int] = typer.Option(None, "--cameras", min=1),
    frames: Optional[int] = typer.Option(None, "--frames", min=1, help="Source frames per sequence."),
    frame_step: Optional[int] = typer.Option(None, "--frame-step", min=1),
    frames_per_sequence: Optional[int] = typer.Option(None, "--frames-per-sequence", min=0),
    resolution: Optional[int] = typer.Option(None, "--resolution", min=16, help="Crop size of the planned run."),
    nodes: int = typer.Option(1, "--nodes", min=1, help="Machines (K)."),
    cpus_per_node: int = typer.Option(2, "--cpus-per-node", min=1),
    gpus_per_node: int = typer.Option(0, "--gpus-per-node", min=0),
    params: str = ParamsPath,
    data_root: str = DataRoot,
    run_slots: int = typer.Option(1, "--run-slots", min=1, help="Items the measured run had in flight at once "
                                  "(1 for --executor local; its Ray CPUs otherwise)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """CPU-hours, GPU-hours, bytes and wall time per stage for a whole dataset on K nodes, from
    the per-item costs measured by a run under --data-root (its stats files)."""
    from dataclasses import replace

    from avat3r_core.capacity import DATASETS, measured_costs
    from avat3r_core.capacity import plan as make_plan
    from avat3r_core.config import load_params, section
    from avat3r_core.extract import ExtractConfig
    from pipelines.flows import DataLayout, _resources

    if dataset not in DATASETS:
        console.print(f"[red]unknown dataset {dataset!r}; known: {', '.join(DATASETS)}[/]")
        raise typer.Exit(EXIT_USAGE)
    described = replace(DATASETS[dataset], **{k: v for k, v in dict(
        participants=participants, sequences=sequences, cameras=cameras, frames=frames, frame_step=frame_step,
        frames_per_sequence=frames_per_sequence, resolution=resolution).items() if v is not None})
    values = _run(load_params, params)
    measured_res = _run(section, values, "extract", ExtractConfig, params).resolution
    resources = {s: vars(_resources(values, s)) for s in ("extract", "track", "priors", "pack")}
    resources["head_centers"] = resources["extract"]
    measured = _run(measured_costs, DataLayout(data_root).root, measured_res, resources, run_slots)
    result = make_plan(measured, described, nodes, cpus_per_node, gpus_per_node)
    if json_out:
        console.print_json(json.dumps(result))
        return
    table = Table(title=f"{described.name}: {described.views:,} views on {nodes} node(s) x {cpus_per_node} CPUs "
                        f"(measured: {measured.views} views at {measured_res} px)")
    for col in ("stage", "CPU-h", "GPU-h", "GB", "wall h"):
        table.add_column(col)
    for row in result["stages"] + [{"stage": "total", **result["total"]}]:
        table.add_row(row["stage"], f"{row['cpu_hours']:.1f}", f"{row['gpu_hours']:.1f}", f"{row['bytes'] / 1e9:.1f}",
                      f"{row['wall_hours']:.2f}")
    console.print(table)
    console.print(f"assumptions: {result['assumptions']}")


# --------------------------------------------------------------------------- model
model_app = typer.Typer(help="The Avat3r network.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("info")
def model_info_command(
    preset: str = typer.Option("tiny", "--preset", help="tiny, small or paper."),
    feature_dim: Optional[int] = typer.Option(None, "--feature-dim", min=0, help="Feature channels (0 = no features)."),
    json_out: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
):
    """Parameter count per part and a FLOPs estimate for a model preset."""
    from avat3r_core.config import build
    from avat3r_core.model import Avat3rConfig
    from avat3r_core.model.avat3r import model_info

    values = {"feature_dim": feature_dim} if feature_dim is not None else {}
    info = model_info(_run(build, Avat3rConfig, values, preset=preset, source="command line"))
    if json_out:
        console.print_json(json.dumps(info, default=str))
        return
    cfg = info["config"]
    console.print(f"[bold]Avat3r {preset}[/]: {cfg['num_views']} views × {cfg['image_size']}², patch {cfg['patch_size']}, "
                  f"width {cfg['dim']} ({info['heads']} heads), {info['tokens']} tokens, features {cfg['feature_dim']}")
    for title, column, values, fmt in (("parameters", "parameters", info["parameters"], "{:,}"),
                                       ("GFLOPs per sample (multiply-add = 2)", "GFLOPs", info["gflops"], "{:,.3f}")):
        table = Table(title=title)
        table.add_column("part")
        table.add_column(column, justify="right")
        for part, value in values.items():
            table.add_row(part, fmt.format(value))
        console.print(table)
    console.print(f"at most {info['max_gaussians']:,} Gaussians; expression-independent blocks cached for driving: "
                  f"{info['encoder_blocks_cached']}")


# --------------------------------------------------------------------------- flows
@app.command()
def preprocess(params: str = ParamsPath, data_root: str = DataRoot, ray_address: Optional[str] = RayAddress,
               executor: str = Executor):
    """Run the preprocess flow: studio → extract → track → priors → pack."""
    from pipelines.flows import preprocess_flow

    summaries = _run(preprocess_flow, params, data_root, ray_address, executor)
    _print_summaries(summaries)


@app.command()
def train(params: str = ParamsPath, data_root: str = DataRoot, ray_address: Optional[str] = RayAddress,
          executor: str = Executor):
    """Run the train flow: Ray Train (DDP) on data/shards with params.yaml `train` (model sized from the data)."""
    from pipelines.flows import train_flow

    summary = _run(train_flow, params, data_root, ray_address, executor)
    _print_summaries([summary])
    metrics = summary["extra"]
    console.print(f"validation PSNR {metrics['val_psnr']:.2f} dB / SSIM {metrics['val_ssim']:.4f} "
                  f"(non-learned baseline {metrics['baseline_val_psnr']:.2f} dB / {metrics['baseline_val_ssim']:.4f})")
    console.print(f"checkpoint: {metrics['checkpoint']}")


@app.command()
def schedule(
    flow_name: str = typer.Argument(..., metavar="FLOW", help="train | preprocess | reconstruct | demo"),
    cron: str = typer.Option(..., "--cron", help='Cron expression, e.g. "0 2 * * *" (nightly at 02:00).'),
    params: str = ParamsPath, data_root: str = DataRoot, ray_address: Optional[str] = RayAddress,
    timezone: str = typer.Option("UTC", "--timezone", help="Time zone of the cron expression."),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment name (default: FLOW-scheduled)."),
    work_pool: Optional[str] = typer.Option(None, "--work-pool",
                                            help="Register with the Prefect server (PREFECT_API_URL) for this work pool's "
                                                 "workers instead of serving from this process."),
    gpus: int = typer.Option(1, "--gpus", min=1, help="Training runs allowed at once (one per GPU node)."),
):
    """Run a flow on a cron schedule: serve it from here, or register it for a work pool.

    Without --work-pool this process serves the schedule (runs execute here; Ctrl-C stops). Runs of
    one deployment never overlap, and every training run, scheduled or not, holds a slot of the
    `avat3r-training` concurrency limit (--gpus slots)."""
    from pipelines import schedules

    try:
        deployment = _run(schedules.make_deployment, flow_name, cron, params, data_root, ray_address, name,
                          work_pool, timezone)
    except ValueError as exc:
        _print_error("bad schedule", exc)
        raise typer.Exit(EXIT_USAGE) from exc
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        console.print("[bold red]no Prefect server:[/] schedules need one (a temporary server creates no scheduled "
                      "runs and is gone when this command ends). Start one with `prefect server start` and "
                      "`export PREFECT_API_URL=http://127.0.0.1:4200/api`, or point PREFECT_API_URL at yours.")
        raise typer.Exit(EXIT_USAGE)
    schedules.ensure_training_limit(gpus)
    if work_pool:
        deployment_id = schedules.register(deployment)
        console.print(f"registered deployment {deployment.name!r} ({deployment_id}) of flow {flow_name!r} on "
                      f"'{cron}' for work pool {work_pool!r}; start a worker: prefect worker start --pool {work_pool}")
        return
    console.print(f"serving {flow_name!r} on '{cron}' ({timezone}); Ctrl-C stops")
    schedules.serve(deployment)


@app.command()
def demo(params: str = ParamsPath, data_root: str = DataRoot, ray_address: Optional[str] = RayAddress,
         executor: str = Executor):
    """The main job: studio → preprocess → train → reconstruct + evaluate, on the embedded synthetic studio."""
    from pipelines.flows import demo_flow

    result = _run(demo_flow, params, data_root, ray_address, executor)
    _print_summaries(result["stages"])
    evaluation = next((s["extra"] for s in result["stages"] if s["stage"] == "evaluate"), None)
    console.print("[bold green]demo finished[/]")
    if evaluation:
        ours, base = evaluation["ours"], evaluation["baseline"]
        console.print(f"held-out subjects ({evaluation['views']} novel views at novel expressions): "
                      f"ours {ours['psnr']:.2f} dB / SSIM {ours['ssim']:.3f}, "
                      f"non-learned baseline {base['psnr']:.2f} dB / {base['ssim']:.3f}")
    for key in ("report", "avatars", "checkpoint", "training", "previews", "raw", "frames", "tracking", "priors", "shards"):
        console.print(f"  {key:13s} {result[key]}")
    console.print(f"  {'turntables':13s} {result['avatars']}/<id>/turntable.mp4 (animation.mp4, preview.png, *.ply beside it)")
    if Path(result["gallery"]).exists():
        console.print(f"  {'gallery':13s} {result['gallery']} (serve: python -m http.server -d {Path(result['gallery']).parent})")


# --------------------------------------------------------------------------- inspection
def _print_summaries(summaries: list[dict]) -> None:
    table = Table(title="stages")
    for col in ("stage", "items", "done", "skipped", "failed", "rows", "items/s", "MB/s", "manifest"):
        table.add_column(col)
    for s in summaries:
        table.add_row(s["stage"] + (" (cached)" if s.get("cached") else ""), str(s["items_total"]), str(s["items_done"]), str(s["items_skipped"]),
                      f"[red]{s['items_failed']}[/]" if s["items_failed"] else "0", str(s["rows"]),
                      f"{s['items_per_s']:.2f}", f"{s['bytes_per_s'] / 1e6:.2f}", s["manifest"])
    console.print(table)


@stage_app.command("run")
def stage_run(name: str = typer.Argument(..., help="Stage to run (synth, ...)."), params: str = ParamsPath,
              data_root: str = DataRoot, ray_address: Optional[str] = RayAddress, executor: str = Executor):
    """Run one stage from params.yaml without Prefect (this is what dvc.yaml calls); outside
    ``dvc repro``, its outputs are recorded in dvc.lock as dvc repro would."""
    from pipelines.flows import STAGES, DataLayout

    if name not in STAGES:
        console.print(f"[red]unknown stage {name!r}; known: {', '.join(STAGES)}[/]")
        raise typer.Exit(EXIT_USAGE)
    from pipelines.versioning import record_stages

    summary = _run(STAGES[name], params, DataLayout(data_root), ray_address, executor)
    _print_summaries([summary])
    version = record_stages([name], params, data_root)  # dvc.lock, unless dvc repro runs us (it records)
    if version.recorded:
        console.print(f"recorded in dvc.lock (sha256 {version.dvc_lock_sha256[:12]}, git {version.git_commit[:12]})")
    elif version.note:
        console.print(f"dvc.lock: {escape(version.note)}")


@stage_app.command("errors")
def stage_errors(stage_dir: Path = typer.Argument(..., help="A stage output directory."),
                 traceback: bool = typer.Option(False, "--traceback", help="Show full tracebacks.")):
    """List the failed items of a stage run (id, message), from its error manifest."""
    import pyarrow.parquet as pq

    files = sorted(stage_dir.glob("*.errors.parquet"))
    if not files:
        console.print(f"[red]no error manifest (*.errors.parquet) in {escape(str(stage_dir))}[/]", soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    total = 0
    for path in files:
        rows = pq.read_table(path).to_pylist()
        total += len(rows)
        if not rows:
            console.print(f"{path.name}: no failed items")
            continue
        table = Table(title=f"{path.name}: {len(rows)} failed item(s)")
        table.add_column("id")
        table.add_column("stage")
        table.add_column("message")
        for row in rows:
            table.add_row(row["id"], row["stage"], escape(row["message"]))
        console.print(table)
        if traceback:
            for row in rows:
                console.rule(row["id"])
                console.print(escape(row["traceback"]))
    raise typer.Exit(EXIT_OK if total == 0 else EXIT_FAILURE)


@stage_app.command("stats")
def stage_stats(paths: list[Path] = typer.Argument(..., help="Stage output directories or *.stats.json files.")):
    """Print the throughput of stage runs (merged from their stats files)."""
    summaries = []
    for path in paths:
        for stats in ([path] if path.is_file() else sorted(path.glob("*.stats.json"))):
            summaries.append(json.loads(stats.read_text()))
    if not summaries:
        console.print("[red]no *.stats.json found[/]")
        raise typer.Exit(EXIT_BAD_INPUT)
    _print_summaries(summaries)


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint directory (checkpoint.pt, or a run with checkpoints/checkpoint_*)."),
    shards: Path = typer.Option(Path("data/shards"), "--shards", help="Shards directory (index.parquet)."),
    split: str = typer.Option("test", "--split", help="Held-out split to evaluate (test or val)."),
    out: Path = typer.Option(..., "--out", help="Output directory: metrics.json, report.md, per_view.csv, grid.png."),
    frames: Optional[Path] = typer.Option(None, "--frames", help="frames.parquet (target view → camera, crop); default data/frames/frames.parquet if present."),
    ground_truth: Optional[Path] = typer.Option(None, "--ground-truth", help="Studio ground-truth root (landmarks for AKD); default data/ground_truth/synthetic if present."),
    lpips_backbone: Optional[Path] = typer.Option(None, "--lpips-backbone", help="LPIPS backbone weights (torchvision alexnet state_dict)."),
    lpips_lin: Optional[Path] = typer.Option(None, "--lpips-lin", help="LPIPS v0.1 linear-layer weights (alex.pth)."),
    preset: str = typer.Option("demo", "--preset", help="EvalConfig preset: tiny (4 samples) or demo (whole split)."),
    target_views: Optional[int] = typer.Option(None, "--target-views", min=1, help="Novel views per sample."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=0, help="At most this many samples (0 = all)."),
):
    """Evaluate a checkpoint beside the non-learned baseline on held-out subjects (PSNR, SSIM, LPIPS, AKD)."""
    from avat3r_core.config import build
    from avat3r_core.evaluation import EvalConfig
    from stages.evaluate import run_evaluate

    frames = frames or (Path("data/frames/frames.parquet") if Path("data/frames/frames.parquet").exists() else None)
    ground_truth = ground_truth or (Path("data/ground_truth/synthetic") if Path("data/ground_truth/synthetic").exists() else None)
    overrides = {k: v for k, v in (("target_views", target_views), ("max_samples", max_samples)) if v is not None}
    try:
        config = build(EvalConfig, overrides, preset=preset, source="command line")
    except ValueError as exc:
        _print_error("bad arguments", exc)
        raise typer.Exit(EXIT_USAGE) from exc
    metrics = _run(run_evaluate, checkpoint, shards, out, split, frames_manifest=frames, ground_truth=ground_truth,
                   lpips_backbone=lpips_backbone, lpips_lin=lpips_lin, config=config)
    console.print(Path(metrics["outputs"]["report.md"]).read_text(), soft_wrap=True, markup=False)
    for name, path in metrics["outputs"].items():
        console.print(f"  {name:13s} {path}")


# --------------------------------------------------------------------------- avatars
@app.command()
def reconstruct(
    inputs: Path = typer.Option(..., "--inputs", help="Library manifest (.csv, .yaml or .parquet): one row per avatar (mode: capture, photos, image, video)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Training checkpoint directory (or its checkpoint.pt)."),
    out: Path = typer.Option(Path("data/avatars"), "--out", help="Output directory (<id>/ per avatar, index.parquet)."),
    preset: str = typer.Option("demo", "--preset", help="tiny, demo or paper (render sizes, fit length)."),
    landmarks: Optional[str] = typer.Option(None, "--landmarks", help="mediapipe (default; 478 points mapped to the face model's 68-point embedding) or file (<picture stem>.landmarks.npz beside each picture)."),
    face_model: Optional[Path] = typer.Option(None, "--face-model", help="Face-model directory (head_model.pkl + head_landmark_embedding.pkl) for photos/image/video; default data/models/studio_head."),
    feature_projection: Optional[Path] = typer.Option(None, "--feature-projection", help="The training data's feature_projection.npz (default: data/priors/feature_projection.npz when present)."),
    dust3r_checkpoint: Optional[Path] = typer.Option(None, "--dust3r-checkpoint", help="DUSt3R checkpoint (else the face_model stand-in position maps)."),
    ray_address: Optional[str] = RayAddress,
    executor: str = Executor,
):
    """Build avatars in bulk: Gaussians (.ply), encoder cache, preview, turntable and animation per person."""
    from avat3r_core.config import build
    from stages.ray_runtime import ensure_ray
    from stages.reconstruct import ReconstructConfig, run_reconstruct, with_data_defaults

    values: dict = {}
    if landmarks:
        values["landmarks"] = landmarks
    if feature_projection:
        values["feature_projection"] = str(feature_projection.resolve())
    values = with_data_defaults(values, face_model or Path("data/models/studio_head"), Path("data/priors"))
    if dust3r_checkpoint:
        values["dust3r_checkpoint"] = str(dust3r_checkpoint)
    config = _run(build, ReconstructConfig, values, preset=preset, source="command line")
    if executor == "ray":
        _run(ensure_ray, ray_address)
    summary = _run(run_reconstruct, config, str(inputs), str(checkpoint), str(out.resolve()), executor=executor)
    _print_summaries([summary.to_dict()])
    console.print(f"avatars: {out}\nindex: {summary.manifest}")
    if summary.items_failed:
        console.print(f"[red]{summary.items_failed} avatar(s) failed[/]: avat3r stage errors {out}", soft_wrap=True)


@app.command()
def animate(
    avatar_dir: Path = typer.Argument(..., help="A built avatar directory (avatars/<id>/)."),
    expressions: str = typer.Option("builtin", "--expressions", help="builtin, a tracking.parquet[#subject/sequence], or a .npy of (T, 135) codes."),
    out: Path = typer.Option(..., "--out", help="Output video (.mp4)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Default: the checkpoint recorded in the avatar's meta.json."),
    size: Optional[int] = typer.Option(None, "--size", min=16, help="Frame size (default: as built)."),
    fps: Optional[float] = typer.Option(None, "--fps", min=1.0, help="Frame rate (default: as built)."),
    head_pose: bool = typer.Option(False, "--head-pose", help="Also replay a tracked sequence's head motion."),
    driver: Optional[Path] = typer.Option(None, "--driver", help="A video of any face (tracked; output driver | avatar) "
                                          "or a Live Link Face ARKit-52 .csv; replaces --expressions."),
    face_model: Path = typer.Option(Path("data/models/studio_head"), "--face-model",
                                    help="Face model directory (head_model.pkl, its landmark embedding, arkit_mapping.npz)."),
    strip: Optional[Path] = typer.Option(None, "--strip", help="Also a PNG of evenly spaced frames side by side "
                                         "(driver | avatar when driven)."),
    strip_frames: int = typer.Option(6, "--strip-frames", min=1, help="Frames in the --strip picture."),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for the model and renderer (0: one per "
                                "core; on a machine other jobs share, 1 is much faster than too many)."),
):
    """Drive a built avatar with an expression track from its encoder cache (decoder only per frame)."""
    from avat3r_core.animation.drivers import make_driver
    from avat3r_core.config import set_cpu_threads
    from avat3r_core.reconstruct.build import animate_avatar

    set_cpu_threads(threads)
    drive = _run(make_driver, driver, face_model) if driver is not None else None
    result = _run(animate_avatar, avatar_dir, expressions, out, checkpoint=checkpoint, size=size, fps=fps,
                  drive_head_pose=head_pose, driver=drive, strip=strip, strip_frames=strip_frames)
    console.print_json(json.dumps(result))


@app.command()
def gallery(
    avatars_dir: Path = typer.Argument(..., help="An avatar library (the reconstruct output: index.parquet + <id>/)."),
    out: Path = typer.Option(..., "--out", help="Site folder (new, or one an earlier `avat3r gallery` built)."),
    title: Optional[str] = typer.Option(None, "--title", help="Heading of the index page."),
    viewer_dir: Optional[Path] = typer.Option(None, "--viewer-dir", help="Folder with the viewer's node_modules (default: the repository's web/)."),
):
    """A static web site of the library: index (sort/filter by status and score) and a 3D viewer per avatar."""
    from avat3r_core.gallery.site import GalleryConfig, GalleryError, build_gallery

    values = {k: str(v) for k, v in (("title", title), ("viewer_dir", viewer_dir)) if v is not None}
    try:
        summary = _run(build_gallery, avatars_dir, out, GalleryConfig(**values))
    except GalleryError as exc:
        _print_error("cannot build the gallery", exc)
        raise typer.Exit(EXIT_USAGE) from exc
    console.print(f"{summary['avatars']} avatars: {summary['ok']} ok, {summary['incomplete']} incomplete, "
                  f"{summary['failed']} failed; web export {summary['splat_bytes'] / 1e6:.2f} MB "
                  f"({100 * (summary['splat_vs_ply'] or 0):.1f} % of the .ply)")
    for record in summary["records"]:
        for problem in record["problems"]:
            console.print(f"  [yellow]{escape(problem)}[/]")
    console.print(f"gallery: {summary['index']}\nview it: python -m http.server --bind 127.0.0.1 -d {out} "
                  f"(then open http://127.0.0.1:8000/)")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
