"""The stage runner: resume after a kill, error manifest, error budget, stats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.runner import ErrorBudgetExceeded, Stage, StageResources, committed_ids, run_stage


class ToyStage(Stage):
    """Writes one media file per item and logs every process() call to ``log_path``."""

    name = "toy"
    version = "1"

    def __init__(self, log_path: str, delay: float = 0.0):
        self.log_path = log_path
        self.delay = delay

    def settings(self):  # the log and the pacing do not change what an item produces
        return {}

    def process(self, item, ctx):
        with open(self.log_path, "a") as handle:
            handle.write(item["id"] + "\n")
        time.sleep(self.delay)
        if item.get("poison"):
            raise ValueError(f"poisoned value {item['value']}")
        rel = ctx.write_bytes(f"media/{item['id']}.txt", str(item["value"]).encode())
        return [{"id": item["id"], "double": item["value"] * 2, "path": rel}]


def toy_factory(log_path, delay=0.0):
    return lambda: ToyStage(str(log_path), delay)


def items(n, poison=()):
    return [{"id": f"item-{i:03d}", "value": i, "poison": i in poison} for i in range(n)]


def log_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().split():
        counts[line] = counts.get(line, 0) + 1
    return counts


def test_committed_items_made_otherwise_are_redone(tmp_path):
    """A committed item is skipped only if it was made the same way: a new stage version redoes
    all, a changed input file redoes just the items naming it, and an unchanged rerun does nothing."""
    out, log = tmp_path / "out", tmp_path / "log"
    inputs = []
    for i in range(3):
        (tmp_path / f"in{i}.txt").write_text(str(i))
        inputs.append({"id": f"item-{i:03d}", "value": i, "source": str(tmp_path / f"in{i}.txt")})
    run = lambda factory: run_stage(factory, inputs, out, "toy", executor="local", show_progress=False)  # noqa: E731
    assert run(toy_factory(log)).items_done == 3
    assert run(toy_factory(log)).items_skipped == 3
    (tmp_path / "in1.txt").write_text("changed, and longer")
    again = run(toy_factory(log))
    assert (again.items_done, again.items_skipped) == (1, 2)
    assert log_counts(log) == {"item-000": 1, "item-001": 2, "item-002": 1}

    class ToyStage2(ToyStage):
        version = "2"

    assert run(lambda: ToyStage2(str(log))).items_done == 3
    assert pq.read_table(out / "toy.parquet").num_rows == 3  # redone items replace their fragments


def test_local_executor_writes_manifest_and_stats(tmp_path):
    out = tmp_path / "out"
    summary = run_stage(toy_factory(tmp_path / "log"), items(5), out, "toy", executor="local", show_progress=False)
    table = pq.read_table(summary.manifest).to_pylist()
    assert [r["id"] for r in table] == [f"item-{i:03d}" for i in range(5)]
    assert [r["double"] for r in table] == [0, 2, 4, 6, 8]
    assert all((out / r["path"]).read_text() == str(r["double"] // 2) for r in table)
    stats = json.loads((out / "toy.stats.json").read_text())
    assert stats["items_done"] == 5 and stats["bytes_written"] == 5 and stats["items_per_s"] > 0
    # second run: everything committed, nothing reprocessed
    again = run_stage(toy_factory(tmp_path / "log"), items(5), out, "toy", executor="local", show_progress=False)
    assert again.items_skipped == 5 and again.items_done == 0
    assert set(log_counts(tmp_path / "log").values()) == {1}


def test_poisoned_item_goes_to_error_manifest_and_rest_completes(ray_session, tmp_path):
    out = tmp_path / "out"
    summary = run_stage(toy_factory(tmp_path / "log"), items(8, poison={3}), out, "toy", show_progress=False)
    assert summary.items_done == 7 and summary.items_failed == 1
    errors = pq.read_table(summary.errors_manifest).to_pylist()
    assert len(errors) == 1
    assert errors[0]["id"] == "item-003" and errors[0]["stage"] == "toy"
    assert "poisoned value 3" in errors[0]["message"] and "ValueError" in errors[0]["traceback"]
    assert len(pq.read_table(summary.manifest)) == 7
    # the input is fixed: a rerun processes only the failed item and heals the error manifest
    healed = run_stage(toy_factory(tmp_path / "log"), items(8), out, "toy", show_progress=False)
    assert healed.items_done == 1 and healed.items_skipped == 7 and healed.items_failed == 0
    assert len(pq.read_table(healed.errors_manifest)) == 0
    assert len(pq.read_table(healed.manifest)) == 8


def test_error_budget_stops_run_and_keeps_committed_work(ray_session, tmp_path):
    out = tmp_path / "out"
    resources = StageResources(concurrency=1, max_errors=2)
    with pytest.raises(ErrorBudgetExceeded, match=r"over the error budget.*max_errors=2.*toy.errors.parquet"):
        run_stage(toy_factory(tmp_path / "log"), items(12, poison={1, 2, 3, 4, 5, 6}), out, "toy",
                  resources=resources, show_progress=False)
    manifest = pq.read_table(out / "toy.parquet").to_pylist()
    errors = pq.read_table(out / "toy.errors.parquet").to_pylist()
    assert [r["id"] for r in manifest] == ["item-000"]  # committed before the budget ran out: kept
    assert [r["id"] for r in errors] == ["item-001", "item-002", "item-003"]
    assert not (out / "media" / "item-011.txt").exists()  # stopped, not run to the end


DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import ray
    ray.init(address={address!r}, logging_level="ERROR")
    from stages.runner import StageResources, run_stage
    from tests.test_runner import items, toy_factory
    run_stage(toy_factory({log!r}, 0.25), items(24), {out!r}, "toy",
              resources=StageResources(concurrency=2), show_progress=False)
    """
)


def test_killed_run_resumes_and_processes_every_item_once(ray_session, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    address = ray_session.get_runtime_context().gcs_address
    repo = str(Path(__file__).resolve().parents[1])
    script = DRIVER.format(repo=repo, address=address, log=str(log), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    deadline = time.time() + 90
    while time.time() < deadline and len(committed_ids(str(out))) < 6:
        assert proc.poll() is None, "driver exited before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # let Ray reap the dead driver's actors
    before = committed_ids(str(out))
    assert 6 <= len(before) < 24, "the kill should land half-way"

    summary = run_stage(toy_factory(log), items(24), out, "toy", resources=StageResources(concurrency=2),
                        show_progress=False)
    assert summary.items_skipped == len(before)
    ids = [r["id"] for r in pq.read_table(summary.manifest).to_pylist()]
    assert ids == [f"item-{i:03d}" for i in range(24)]  # every item exactly once
    counts = log_counts(log)
    assert all(counts[i] == 1 for i in before), "committed items must not be processed again"
    assert sorted(p.name for p in (out / "media").glob("*.txt")) == [f"{i}.txt" for i in ids]


class TaskStage(Stage):
    """A stage with nothing to set up (runs as Ray tasks): logs ``setup <pid>`` per set-up and
    ``item <id> <pid>`` per item; item ``die`` kills its worker process."""

    name = "tasks"
    cheap_setup = True

    def __init__(self, log_path: str):
        self.log_path = log_path

    def _log(self, line: str) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    def setup(self):
        self._log(f"setup {os.getpid()}")

    def process(self, item, ctx):
        self._log(f"item {item['id']} {os.getpid()} {time.time():.4f}")
        if item.get("sleep"):
            time.sleep(item["sleep"])
            self._log(f"done {item['id']} {os.getpid()} {time.time():.4f}")
        if item.get("die"):
            os._exit(1)  # a segfault or the OOM killer, as far as the runner can tell
        if item.get("poison"):
            raise ValueError(f"poisoned value {item['value']}")
        return [{"id": item["id"], "double": item["value"] * 2}]


def test_cheap_setup_stages_run_as_tasks_on_warm_workers(ray_session, tmp_path):
    log = tmp_path / "log"
    work = items(8, poison={2})
    work[5]["die"] = True
    first = run_stage(lambda: TaskStage(str(log)), work, tmp_path / "out", "tasks", show_progress=False)
    assert first.items_done == 6 and first.items_failed == 2
    errors = {r["id"]: r["message"] for r in pq.read_table(first.errors_manifest).to_pylist()}
    assert "poisoned value 2" in errors["item-002"] and "worker died" in errors["item-005"]
    rows = pq.read_table(first.manifest).to_pylist()
    assert sorted(r["double"] for r in rows) == [0, 2, 6, 8, 12, 14]
    lines = log.read_text().split("\n")
    # every item ran exactly once (a task whose worker died is not retried) and set the stage up
    ran = [line.split()[1] for line in lines if line.startswith("item")]
    assert sorted(ran) == [f"item-{i:03d}" for i in range(8)]
    assert sum(line.startswith("setup") for line in lines) == 8
    # a second run (another output) lands on worker processes that are already running (with
    # actors, both runs would start and kill their own); Ray may add a process, so: some, not all
    before = {line.split()[2] for line in lines if line.startswith("item")}
    log.write_text("")
    second = run_stage(lambda: TaskStage(str(log)), items(4), tmp_path / "again", "tasks", show_progress=False)
    assert second.items_done == 4
    after = {line.split()[2] for line in log.read_text().split("\n") if line.startswith("item")}
    assert after & before, (after, before)


def test_task_stage_concurrency_is_bounded(ray_session, tmp_path):
    """Task stages have no actors to count: ``concurrency`` alone must keep items from overlapping
    (the 2-CPU cluster would run two at once)."""
    log = tmp_path / "log"
    work = [{**item, "sleep": 0.1} for item in items(4)]
    run_stage(lambda: TaskStage(str(log)), work, tmp_path / "out", "tasks",
              resources=StageResources(concurrency=1), show_progress=False)
    spans = {}
    for line in log.read_text().split("\n"):
        if line.startswith(("item", "done")):
            kind, item_id, _, at = line.split()
            spans.setdefault(item_id, {})[kind] = float(at)
    ordered = sorted((span["item"], span["done"]) for span in spans.values())
    assert len(ordered) == 4 and all(nxt[0] >= prev[1] for prev, nxt in zip(ordered, ordered[1:]))


class BrokenSetupStage(TaskStage):
    def setup(self):
        raise OSError("model file missing")


def test_task_stage_set_up_failure_names_itself(ray_session, tmp_path):
    with pytest.raises(ErrorBudgetExceeded):
        run_stage(lambda: BrokenSetupStage(str(tmp_path / "log")), items(3), tmp_path / "out", "tasks",
                  show_progress=False)
    errors = pq.read_table(tmp_path / "out" / "tasks.errors.parquet").to_pylist()
    assert errors and all("stage set-up failed on the worker: OSError: model file missing" in e["message"]
                          and e["stage"] == "tasks" for e in errors)
