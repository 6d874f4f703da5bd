"""The shared stage runner: Ray fan-out over items, resumable, with an error manifest and stats.

A stage is a class with ``setup()`` (once per actor: load models) and ``process(item, ctx)``
(one item → rows). The runner adds what every stage needs and nothing stage-specific:

* fan-out over a pool of Ray actors (resources per stage from :class:`StageResources`), or,
  for a stage whose set-up loads nothing (:attr:`Stage.cheap_setup`), over Ray tasks on Ray's
  pooled, warm worker processes; or inline with ``executor="local"`` for debugging;
* commit protocol: the stage writes its media through ``ctx`` first; the runner then commits the
  item's manifest fragment ``_parts/<id>.parquet`` atomically (temp + rename). A rerun skips every
  committed item, so a killed run resumes without redoing or duplicating work;
* item keys: each fragment records the key of the work that made it (:func:`item_key`: the
  stage's name, version and settings, and the item itself with the size and modification time of
  every local file it names). A committed item whose key no longer matches (a new stage version,
  other settings, changed input) is redone, not skipped; so a stage's items should carry what
  they depend on (e.g. a digest of the manifest rows they read);
* on Ray, an item whose worker was lost with a node that left the cluster is run again on the
  nodes still there (at most :data:`NODE_LOSS_RETRIES` times; a worker dying on a live node is the
  item's own failure and is not retried); the stats name each retry and the node each item ran on;
* a failing item is written to ``_errors/<id>.json`` (id, stage, message, traceback) and the run
  goes on until the error budget is exceeded; then it drains in-flight items (their work is kept),
  writes the manifests and raises :class:`ErrorBudgetExceeded`;
* at the end the fragments are merged into ``<out>/<manifest>.parquet`` and
  ``<out>/<manifest>.errors.parquet``, and throughput goes to ``<out>/<manifest>.stats.json``.
"""

from __future__ import annotations

import json
import hashlib
import logging
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from avat3r_core import storage
from avat3r_core.ids import MAX_ID_LENGTH

log = logging.getLogger("avat3r.stages")

PARTS = "_parts"
ERRORS = "_errors"
#: schema metadata of a committed fragment: the item key it was made under
ITEM_KEY = b"avat3r.item_key"
#: ... and the files the item wrote (JSON list, relative to the output root or absolute)
ITEM_FILES = b"avat3r.item_files"
#: where the driver hands an item's key to the worker that commits it
_KEY_FIELD = "__item_key__"
#: how often one item is run again after losing its node (see :func:`_run_on_ray`)
NODE_LOSS_RETRIES = 2


class StageError(RuntimeError):
    """A stage run that cannot go on."""


class ErrorBudgetExceeded(StageError):
    pass


class DiskFull(StageError):
    """The output's filesystem is full: the run stopped; what finished is committed."""


@dataclass
class StageResources:
    """How a stage is scheduled. ``concurrency=None`` sizes the actor pool from the cluster."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int | None = None
    max_errors: int = 10  # error budget per run: stop when more items than this fail ...
    max_error_fraction: float = 0.5  # ... or more than this fraction of the run's items


@dataclass
class StageContext:
    """What ``process`` may use: the output root and byte-counting atomic writers. The files an
    item writes are recorded with its fragment: a rerun redoes a committed item one of whose
    files is gone."""

    out_dir: str
    stage: str
    bytes_written: int = 0
    files: list[str] = field(default_factory=list)  # relative to out_dir, or absolute / URIs

    def path(self, rel: str) -> str:
        return storage.join(self.out_dir, rel)

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Write a media file atomically under the output root; returns ``rel``."""
        self.add_file(rel, storage.atomic_write_bytes(self.path(rel), data))
        return rel

    def add_file(self, path: str, count: int) -> None:
        """For media a stage writes itself (e.g. a video encoder writing a local file): ``path``
        relative to the output root (or absolute), ``count`` its bytes."""
        self.files.append(path)
        self.bytes_written += int(count)


class Stage:
    """Base class of a stage. Subclasses set ``name``/``version`` and implement ``process``."""

    name: str = "stage"
    version: str = "1"
    #: ``setup()`` loads nothing (no models): each item may set the stage up afresh. The runner
    #: then runs items as Ray tasks on Ray's own pooled worker processes, which stay warm (started,
    #: modules imported) across passes, runs and stages, instead of starting actors for the run
    #: (~0.5 s each) and killing them after.
    cheap_setup: bool = False

    def settings(self) -> dict[str, Any]:
        """What the stage was built with (its config, input paths), for :func:`item_key`. Called on
        a fresh instance, before ``setup``."""
        return {k: asdict(v) if is_dataclass(v) and not isinstance(v, type) else v
                for k, v in vars(self).items() if not k.startswith("_")}

    def setup(self) -> None:  # noqa: B027 - optional hook
        """Load models / open resources once per worker."""

    def process(self, item: dict[str, Any], ctx: StageContext) -> list[dict[str, Any]]:
        raise NotImplementedError


@dataclass
class ItemResult:
    id: str
    ok: bool
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    message: str = ""
    disk_full: bool = False  # the item stopped on a full disk: the run stops too
    node: str = "local"  # the Ray node id it ran on ("local": the inline executor)


def _node_id() -> str:
    """The Ray node this process runs on, or ``local`` outside Ray."""
    ray = sys.modules.get("ray")  # imported by every Ray worker; never imported here for the local executor
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"


@dataclass
class StageSummary:
    """The small record a flow task returns (never data)."""

    stage: str
    version: str
    manifest: str
    errors_manifest: str
    items_total: int
    items_done: int
    items_skipped: int
    items_failed: int
    rows: int
    bytes_written: int
    seconds: float
    items_per_s: float
    bytes_per_s: float
    extra: dict = field(default_factory=dict)
    #: seconds items of this run spent in their stage (summed over items: the per-item cost)
    busy_seconds: float = 0.0
    #: the median of those per-item seconds: the steady cost of an item, without the one-off
    #: warm-up (imports, JIT compilation) the first items on a fresh worker pay
    item_seconds_median: float = 0.0
    #: node id → items of this run done there
    nodes: dict = field(default_factory=dict)
    #: items run again after their node left the cluster: id, the error, the attempt
    retried: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- item execution
def item_key(stage: str, version: str, settings: dict[str, Any], item: dict[str, Any]) -> str:
    """The key of one item's work: stage name, version and settings, the item, and the size and
    modification time of every local file the item names (content hashes would read every video)."""
    files = {}
    for path in storage.local_files_named_in(item):
        st = Path(path).stat()
        files[path] = (st.st_size, st.st_mtime_ns)
    payload = {"stage": stage, "version": version, "settings": settings, "item": item, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def commit_fragment(out_dir: str, item_id: str, rows: list[dict], key: str | None = None,
                    files: Iterable[str] = ()) -> None:
    """Commit an item: its manifest fragment (after its media; ``key``: its :func:`item_key`;
    ``files``: what it wrote, checked before a rerun skips it), healing an earlier failure record."""
    table = pa.Table.from_pylist(rows) if rows else pa.table({"item_id": pa.array([], pa.string())})
    metadata = dict(table.schema.metadata or {})
    if key is not None:
        metadata[ITEM_KEY] = key.encode()
    metadata[ITEM_FILES] = json.dumps(sorted(set(files))).encode()
    table = table.replace_schema_metadata(metadata)
    storage.write_parquet(table, storage.join(out_dir, PARTS, f"{item_id}.parquet"))
    storage.remove(storage.join(out_dir, ERRORS, f"{item_id}.json"))  # an earlier failure is healed


def commit_error(out_dir: str, stage: str, item_id: str, message: str, traceback_text: str, item_json: str) -> bool:
    """Record a failed item in the error manifest's fragments (id, stage, message, traceback, item).

    Never raises: a record that cannot be written (disk full, a name the filesystem refuses) is
    logged with the item's error, and the run goes on; returns whether the record was written."""
    record = {"id": item_id, "stage": stage, "message": message, "traceback": traceback_text, "item": item_json,
              "time": time.time()}
    try:
        storage.atomic_write_bytes(storage.join(out_dir, ERRORS, f"{item_id}.json"), json.dumps(record).encode())
        return True
    except Exception as exc:  # noqa: BLE001 - recording a failure must not become another one
        log.error("stage %s: item %s failed (%s) and its error record could not be written: %s: %s",
                  stage, item_id[:80], message, type(exc).__name__, exc)
        return False


def _execute_item(stage: Stage, item: dict, out_dir: str) -> ItemResult:
    """Run one item and commit its fragment (or error record). Used by both executors."""
    item_id = item["id"]
    key = item.get(_KEY_FIELD)
    item = {k: v for k, v in item.items() if k != _KEY_FIELD}
    ctx = StageContext(out_dir=out_dir, stage=stage.name)
    start = time.perf_counter()
    try:
        rows = stage.process(item, ctx)
        for row in rows:
            row.setdefault("item_id", item_id)
        commit_fragment(out_dir, item_id, rows, key, ctx.files)
        return ItemResult(item_id, True, len(rows), ctx.bytes_written, time.perf_counter() - start, node=_node_id())
    except Exception as exc:  # a bad item must not stop the others
        message = f"{type(exc).__name__}: {exc}"
        if storage.is_disk_full(exc):
            # what this uncommitted item wrote is referenced by nothing: removing it makes room
            # for the manifests of the items that finished
            for path in ctx.files:
                _quietly_remove(_file_uri(out_dir, path))
            return _fail_item(out_dir, stage.name, item, message, traceback.format_exc(), 0,
                              time.perf_counter() - start, disk_full=True)
        log.warning("stage %s: item %s failed: %s", stage.name, item_id, message)
        return _fail_item(out_dir, stage.name, item, message, traceback.format_exc(), ctx.bytes_written,
                          time.perf_counter() - start)


def _file_uri(out_dir: str, path: str) -> str:
    """A recorded item file (relative to the output root, or absolute / a URI) as a path."""
    return path if "://" in path or path.startswith("/") else storage.join(out_dir, path)


def _quietly_remove(uri: str) -> None:
    try:
        storage.remove(uri)
    except OSError as exc:
        log.warning("could not remove %s: %s", uri, exc)


def _fail_item(out_dir: str, stage_name: str, item: dict, message: str, traceback_text: str,
               bytes_written: int = 0, seconds: float = 0.0, disk_full: bool = False) -> ItemResult:
    """Record a failed item in the error manifest (the item as the stage got it, without the
    runner's key) and return its result."""
    commit_error(out_dir, stage_name, item["id"], message, traceback_text,
                 json.dumps({k: v for k, v in item.items() if k != _KEY_FIELD}, default=str))
    return ItemResult(item["id"], False, 0, bytes_written, seconds, message, disk_full, node=_node_id())


class _LocalWorker:
    """One stage, set up once, running items (inline, or as the body of a stage actor)."""

    def __init__(self, factory: Callable[[], Stage], out_dir: str):
        self.stage = factory()
        self.stage.setup()
        self.out_dir = out_dir

    def run(self, item: dict) -> ItemResult:
        return _execute_item(self.stage, item, self.out_dir)


# --------------------------------------------------------------------------- manifests
def committed_ids(out_dir: str) -> set[str]:
    return {Path(p).name[: -len(".parquet")] for p in storage.list_files(storage.join(out_dir, PARTS), ".parquet")}


def committed_keys(out_dir: str) -> dict[str, str | None]:
    """Committed item id → the item key its fragment was made under (None: no key recorded, or
    a file the item wrote is gone, so it must be redone)."""
    out = {}
    root = storage.local_path(out_dir)

    def exists(f: str) -> bool:  # a plain stat for local outputs: a rerun may check millions of crops
        if root is not None and "://" not in f:
            return os.path.exists(f if f.startswith("/") else os.path.join(root, f))
        return storage.exists(_file_uri(out_dir, f))

    for path in storage.list_files(storage.join(out_dir, PARTS), ".parquet"):
        fs, local = storage.url_to_fs(path)
        metadata = pq.read_schema(local, filesystem=fs).metadata or {}
        key = metadata.get(ITEM_KEY)
        item_id = Path(path).name[: -len(".parquet")]
        files = json.loads(metadata.get(ITEM_FILES, b"[]"))
        missing = next((f for f in files if not exists(f)), None)
        if missing is not None:
            log.warning("committed item %s: its file %s is gone; redoing the item", item_id, _file_uri(out_dir, missing))
            key = None
        out[item_id] = key.decode() if key else None
    return out


def pending_items(stage: str, version: str, settings: dict[str, Any], items: list[dict[str, Any]],
                  out_dir: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The items still to do in ``out_dir`` (not committed, or committed under another
    :func:`item_key`) and every item's key; logs how many are skipped and how many redone."""
    keys = {it["id"]: item_key(stage, version, settings, it) for it in items}
    committed = committed_keys(out_dir)
    todo = [it for it in items if committed.get(it["id"], "") != keys[it["id"]]]
    skipped, stale = len(items) - len(todo), sum(1 for it in todo if it["id"] in committed)
    if skipped:
        log.info("stage %s: %d of %d items already committed in %s, skipping them", stage, skipped, len(items), out_dir)
    if stale:
        log.info("stage %s: %d committed items were made with another stage version, settings or input, "
                 "or lost a file: redoing them", stage, stale)
    return todo, keys


def merge_manifest(out_dir: str, manifest_name: str) -> tuple[str, str, int]:
    """Merge committed fragments and error records into the stage's two manifests."""
    parts = storage.list_files(storage.join(out_dir, PARTS), ".parquet")
    tables = [t for t in (storage.read_parquet(p) for p in parts) if t.num_rows]
    manifest = storage.join(out_dir, f"{manifest_name}.parquet")
    if tables:
        table = pa.concat_tables(tables, promote_options="default")
        if "id" in table.column_names:
            table = table.sort_by("id")
    else:
        table = pa.table({"item_id": pa.array([], pa.string())})
    storage.write_parquet(table, manifest)

    records = [json.loads(storage.read_bytes(p)) for p in storage.list_files(storage.join(out_dir, ERRORS), ".json")]
    errors_manifest = storage.join(out_dir, f"{manifest_name}.errors.parquet")
    error_schema = pa.schema([(k, pa.string()) for k in ("id", "stage", "message", "traceback", "item")] + [("time", pa.float64())])
    storage.write_parquet(pa.Table.from_pylist(records, schema=error_schema), errors_manifest)
    return manifest, errors_manifest, table.num_rows


# --------------------------------------------------------------------------- runner
def _progress(total: int, description: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        console=Console(stderr=True),  # like logs: stdout stays for what a command prints (JSON, tables)
    )
    task = progress.add_task(description, total=total, status="")
    return progress, task


def run_stage(
    factory: Callable[[], Stage],
    items: Iterable[dict[str, Any]],
    out_dir: str | Path,
    manifest_name: str,
    resources: StageResources | None = None,
    executor: str = "ray",
    show_progress: bool = True,
) -> StageSummary:
    """Run ``factory()``'s stage over ``items`` (dicts with a unique, dot-free ``id``).

    Committed items are skipped; failed items are retried on a rerun. Returns a summary; raises
    :class:`ErrorBudgetExceeded` (after committing everything finished) when too many items fail.
    """
    resources = resources or StageResources()
    out_dir = str(out_dir)
    items = list(items)
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise StageError(f"duplicate item ids in stage input: {dupes}")
    bad = [i for i in ids if "." in i or "/" in i]
    if bad:
        raise StageError(f"item ids must not contain '.' or '/': {bad[:5]}")
    long_ids = [i for i in ids if len(i) > MAX_ID_LENGTH]
    if long_ids:
        raise StageError(f"{len(long_ids)} item id(s) longer than {MAX_ID_LENGTH} characters (ids become file names), "
                         f"e.g. {long_ids[0][:60]!r}...")

    probe = factory()  # cheap: stages load heavy things in setup(), not __init__
    stage_name, stage_version = probe.name, probe.version
    # one writer per output: a second run on it is refused, naming the first (held to the end)
    with storage.output_lock(out_dir):
        pending, keys = pending_items(stage_name, stage_version, probe.settings(), items, out_dir)
        todo = [{**it, _KEY_FIELD: keys[it["id"]]} for it in pending]
        skipped = len(items) - len(todo)

        start = time.perf_counter()
        results: list[ItemResult] = []
        retried: list[dict] = []
        budget_hit: StageError | None = None

        def over_budget() -> StageError | None:
            return stop_reason(stage_name, results, len(items), resources, out_dir, manifest_name)

        progress, task = _progress(len(todo), f"{stage_name}") if (show_progress and todo) else (None, None)
        if progress:
            progress.start()
        try:
            if todo and executor == "local":
                worker = _LocalWorker(factory, out_dir)
                for item in todo:
                    results.append(worker.run(item))
                    if progress:
                        progress.update(task, advance=1, status=f"errors={sum(not r.ok for r in results)}")
                    budget_hit = over_budget()
                    if budget_hit:
                        break
            elif todo and executor == "ray":
                budget_hit = _run_on_ray(factory, stage_name, todo, out_dir, resources, results, over_budget, progress, task,
                                         as_tasks=probe.cheap_setup, retried=retried)
            elif todo:
                raise StageError(f"unknown executor {executor!r} (use 'ray' or 'local')")
        finally:
            if progress:
                progress.stop()
            try:
                manifest, errors_manifest, n_rows = merge_manifest(out_dir, manifest_name)
            except OSError as exc:
                if not storage.is_disk_full(exc):
                    raise
                raise disk_full_error(stage_name, out_dir, None, results, len(items)) from None
        if isinstance(budget_hit, DiskFull):
            raise disk_full_error(stage_name, out_dir, manifest, results, len(items))

        summary = run_summary(
            stage_name, stage_version, manifest, errors_manifest, results, len(items), skipped, n_rows,
            time.perf_counter() - start, out_dir,
            busy_seconds=round(sum(r.seconds for r in results if r.ok), 3),
            item_seconds_median=round(statistics.median([r.seconds for r in results if r.ok] or [0.0]), 4),
            nodes=_count_by_node(results),
            retried=retried,
        )
        done_now, n_failed = summary.items_done, summary.items_failed
        storage.atomic_write_bytes(
            storage.join(out_dir, f"{manifest_name}.stats.json"), json.dumps(summary.to_dict(), indent=2).encode()
        )
        if budget_hit:
            raise budget_hit
        log.info(
            "stage %s: %d done, %d skipped, %d failed, %.1f items/s -> %s",
            stage_name, done_now, skipped, n_failed, summary.items_per_s, manifest,
        )
        return summary


def run_summary(stage_name: str, version: str, manifest: str, errors_manifest: str, results: list[ItemResult],
                total: int, skipped: int, rows: int, seconds: float, out_dir: str, rate_digits: int = 3,
                **fields) -> StageSummary:
    """The figures of a finished run (items, bytes, rates; ``fields``: the caller's own), from its
    results and the error records left in ``out_dir``. The runner and the reconstruct stage share it."""
    done_now = sum(r.ok for r in results)
    bytes_written = sum(r.bytes for r in results)
    return StageSummary(
        stage=stage_name,
        version=version,
        manifest=manifest,
        errors_manifest=errors_manifest,
        items_total=total,
        items_done=done_now,
        items_skipped=skipped,
        items_failed=len(storage.list_files(storage.join(out_dir, ERRORS), ".json")),
        rows=rows,
        bytes_written=bytes_written,
        seconds=round(seconds, 3),
        items_per_s=round(done_now / seconds, rate_digits) if seconds > 0 else 0.0,
        bytes_per_s=round(bytes_written / seconds, 1) if seconds > 0 else 0.0,
        **fields,
    )


def stop_reason(stage_name: str, results: list[ItemResult], total: int, resources: StageResources, out_dir: str,
                manifest_name: str, noun: str = "items") -> StageError | None:
    """Why a run must stop (no more items submitted; in-flight ones drain), or None: a full disk,
    or more failures than the error budget allows. The runner and the reconstruct stage share it."""
    if any(r.disk_full for r in results):
        return DiskFull(stage_name)  # the message is made once the manifests are written
    failed = sum(not r.ok for r in results)
    # both bounds count against the whole run, so a few bad items that happen to come
    # first cannot stop a large run early
    if failed > resources.max_errors or failed > resources.max_error_fraction * total:
        return ErrorBudgetExceeded(
            f"stage {stage_name}: {failed} of {len(results)} attempted {noun} failed, over the error budget "
            f"(max_errors={resources.max_errors}, max_error_fraction={resources.max_error_fraction}); "
            f"stopped. Everything finished is committed in {out_dir}; failures are listed in "
            f"{storage.join(out_dir, manifest_name + '.errors.parquet')}"
        )
    return None


def disk_full_error(stage_name: str, out_dir: str, manifest: str | None, results: list[ItemResult],
                    n_items: int) -> DiskFull:
    """The one-line account of a run stopped by a full disk: what is kept and what is not."""
    committed = len(committed_ids(out_dir))
    lost = [r for r in results if r.disk_full]
    first = lost[0].message if lost else "no space left on device"
    kept = (f"the manifest {manifest} lists the {committed} committed items" if manifest else
            f"the manifest could not be written either; the {committed} committed items' fragments in "
            f"{storage.join(out_dir, PARTS)} are kept and a rerun merges them")
    return DiskFull(f"stage {stage_name}: disk full writing {out_dir} ({first}); stopped: {kept} "
                    f"({sum(r.ok for r in results)} finished in this run); the partial files of {len(lost)} unfinished "
                    f"item(s) were removed; free space and rerun to do the other {n_items - committed} of {n_items}")


def _count_by_node(results: list[ItemResult]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        if r.ok:
            counts[r.node] = counts.get(r.node, 0) + 1
    return dict(sorted(counts.items()))


_STAGE_ACTOR: Any = None
_ITEM_TASK: Any = None


def _stage_actor_class() -> Any:
    """The Ray actor class hosting a stage with a set-up worth keeping (defined once)."""
    global _STAGE_ACTOR
    if _STAGE_ACTOR is None:
        import ray

        @ray.remote
        class StageActor(_LocalWorker):
            pass

        _STAGE_ACTOR = StageActor
    return _STAGE_ACTOR


def _run_item(factory: Callable[[], Stage], stage_name: str, out_dir: str, item: dict) -> ItemResult:
    """One item of a :attr:`Stage.cheap_setup` stage, on whichever worker process Ray picks. A
    set-up that fails fails this item, by name (an actor's would fail its creation)."""
    try:
        stage = factory()
        stage.setup()
    except Exception as exc:
        return _fail_item(out_dir, stage_name, item, f"stage set-up failed on the worker: {type(exc).__name__}: {exc}",
                          traceback.format_exc())
    return _execute_item(stage, item, out_dir)


def _item_task() -> Any:
    """:func:`_run_item` as a Ray task (defined once). ``max_retries=0``: an item whose worker
    dies is recorded as failed, as with actors, not silently run again."""
    global _ITEM_TASK
    if _ITEM_TASK is None:
        import ray

        _ITEM_TASK = ray.remote(max_retries=0)(_run_item)
    return _ITEM_TASK


def _pool_size(resources: StageResources, cluster: dict[str, float]) -> int:
    """Concurrent items of a stage: ``resources.concurrency``, else as many as the cluster's CPUs
    (and GPUs, for a GPU stage) hold."""
    if resources.concurrency:
        return resources.concurrency
    n_slots = max(1, int(cluster.get("CPU", 1) // max(resources.num_cpus, 1e-3)))
    if resources.num_gpus:
        n_slots = min(n_slots, max(1, int(cluster.get("GPU", 0) // resources.num_gpus)))
    return n_slots


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _lost_node(exc: Exception, nodes_at_start: set[str]) -> str | None:
    """The node whose loss killed this item's worker, or None when its node is still there (the
    worker itself died: the item's own failure). Ray says so for a task (``NodeDiedError``, naming
    the node) and for an actor (its death cause); the cluster's node table is the fallback."""
    import re

    import ray

    text = str(exc)
    if isinstance(exc, ray.exceptions.NodeDiedError) or "node has died" in text or "node it was running on is dead" in text:
        named = re.search(r"node ID: ([0-9a-f]{16,})", text)
        return named.group(1) if named else "unknown"
    lost = nodes_at_start - _alive_nodes()
    return sorted(lost)[0] if lost else None


def _run_on_ray(factory, stage_name, todo, out_dir, resources, results, over_budget, progress, task,
                as_tasks: bool = False, retried: list | None = None) -> "StageError | None":
    """Items on Ray, one in flight per slot: a slot is an actor hosting the stage, or with
    ``as_tasks`` a share of the cluster for one task at a time (the in-flight count is what
    bounds a task stage's concurrency, so it stays one per slot).

    An item whose worker died with its node (:func:`_lost_node`) is queued again (appended to ``retried``), up to :data:`NODE_LOSS_RETRIES` times: the item did
    nothing wrong, and its fragment is committed atomically under its id, so a run that had
    committed it before the node went is overwritten by the same rows, never doubled."""
    import ray

    from stages.ray_runtime import ensure_ray

    ensure_ray()
    n_slots = max(1, min(_pool_size(resources, ray.cluster_resources()), len(todo)))
    if as_tasks:
        run = _item_task().options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)
        factory_ref = ray.put(factory)  # shipped once, not with every item
        slots: list[Any] = list(range(n_slots))

        def start(slot, item):
            return run.remote(factory_ref, stage_name, out_dir, item)

        def replace(slot):  # nothing to restart: Ray starts another worker for the next task
            return slot
    else:
        actor_cls = _stage_actor_class().options(num_cpus=resources.num_cpus, num_gpus=resources.num_gpus)
        slots = [actor_cls.remote(factory, out_dir) for _ in range(n_slots)]

        def start(actor, item):
            return actor.run.remote(item)

        def replace(dead):
            actor = actor_cls.remote(factory, out_dir)
            slots.append(actor)  # killed with the others at the end
            return actor

    queue = list(reversed(todo))
    in_flight: dict[Any, Any] = {}
    budget_hit = None
    nodes_at_start = _alive_nodes()
    attempts: dict[str, int] = {}
    retried = retried if retried is not None else []

    def submit(slot) -> None:
        item = queue.pop()
        in_flight[start(slot, item)] = (slot, item)

    try:
        for slot in list(slots):
            if queue:
                submit(slot)
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            ref = ready[0]
            slot, item = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the worker itself died (OOM, segfault, its node...)
                slot = replace(slot)
                lost = _lost_node(exc, nodes_at_start)
                if lost and attempts.get(item["id"], 0) < NODE_LOSS_RETRIES:
                    attempts[item["id"]] = attempts.get(item["id"], 0) + 1
                    first_line = str(exc).splitlines()[0] if str(exc) else ""
                    retried.append({"id": item["id"], "attempt": attempts[item["id"]] + 1,
                                    "error": f"{type(exc).__name__}: {first_line[:300]}", "node_lost": lost})
                    log.warning("stage %s: item %s lost its worker with node %s; running it again", stage_name,
                                item["id"], lost)
                    queue.append(item)
                    if budget_hit is None:
                        submit(slot)
                    continue
                result = _record_worker_death(stage_name, item, out_dir, exc)
            results.append(result)
            if progress:
                progress.update(task, advance=1, status=f"errors={sum(not r.ok for r in results)}")
            if budget_hit is None:
                budget_hit = over_budget()
            if queue and budget_hit is None:
                submit(slot)
    finally:
        if not as_tasks:
            for actor in slots:
                ray.kill(actor)
    return budget_hit


def _record_worker_death(stage_name: str, item: dict, out_dir: str, exc: Exception) -> ItemResult:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    message = f"worker died while processing this item: {type(exc).__name__}: {first_line}"
    return _fail_item(out_dir, stage_name, item, message, str(exc))
