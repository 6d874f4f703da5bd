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

from stages.runner import ErrorBudgetExceeded, Stage, StagePool, StageResources, committed_ids, run_stage


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


class TaggedStage(Stage):
    """Logs ``setup <tag> <pid>`` per set-up and ``<tag> <pid>`` per item: which process did what."""

    name = "tagged"

    def __init__(self, log_path: str, tag: str):
        self.log_path, self.tag = log_path, tag

    def _log(self, line: str) -> None:
        with open(self.log_path, "a") as handle:
            handle.write(line + "\n")

    def setup(self):
        self._log(f"setup {self.tag} {os.getpid()}")

    def process(self, item, ctx):
        time.sleep(0.05)  # long enough that both actors get items
        self._log(f"{self.tag} {os.getpid()}")
        return [{"id": item["id"], "tag": self.tag}]


def test_a_pool_started_ahead_hosts_its_stage_and_later_runs_reuse_its_processes(ray_session, tmp_path):
    log = tmp_path / "log"
    first = lambda: TaggedStage(str(log), "first")  # noqa: E731 - the same factory object for both calls
    resources = StageResources(concurrency=2)
    with StagePool() as pool:
        pool.start(first, str(tmp_path / "first"), resources)
        a = run_stage(first, items(6), tmp_path / "first", "tagged", resources=resources, show_progress=False, pool=pool)
        b = run_stage(lambda: TaggedStage(str(log), "second"), items(6), tmp_path / "second", "tagged",
                      resources=resources, show_progress=False, pool=pool)
        assert len(pool.actors) == 2
    assert pool.actors == [] and a.items_done == b.items_done == 6
    assert {r["tag"] for r in pq.read_table(b.manifest).to_pylist()} == {"second"}
    lines = log.read_text().split("\n")
    setups = [line.split()[1:] for line in lines if line.startswith("setup")]
    # set up once per actor when started (not again by the first run), then once per actor for the second
    assert sorted(tag for tag, _ in setups) == ["first", "first", "second", "second"]
    pids = {tag: {line.split()[1] for line in lines if line.startswith(tag)} for tag in ("first", "second")}
    assert len(pids["first"]) == 2 and pids["second"] == pids["first"]  # the same two worker processes
