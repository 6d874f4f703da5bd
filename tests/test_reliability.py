"""Hostile and broken inputs, concurrent runs, full disks (issue 24): each case the sweep found,
made reproducible; every test fails on the code before the fix."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.ids import MAX_ID_LENGTH, make_id
from avat3r_core.storage import OutputLock, OutputLocked, output_lock
from stages.runner import DiskFull, Stage, StageError, commit_error, run_stage

REPO = Path(__file__).resolve().parents[1]


class MediaStage(Stage):
    """Writes one media file per item (through the runner's context) and logs every call."""

    name = "media"
    version = "1"

    def __init__(self, log_path: str):
        self.log_path = log_path

    def settings(self):
        return {}

    def process(self, item, ctx):
        with open(self.log_path, "a") as handle:
            handle.write(item["id"] + "\n")
        rel = ctx.write_bytes(f"media/{item['id']}.bin", bytes([item["value"] % 256]) * 1000)
        return [{"id": item["id"], "value": item["value"], "path": rel}]


def _items(n):
    return [{"id": f"item-{i:03d}", "value": i} for i in range(n)]


def _run(out, log, n=5, **kw):
    return run_stage(lambda: MediaStage(str(log)), _items(n), out, "media", executor="local", show_progress=False, **kw)


def _calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


# --------------------------------------------------------------------------- one writer per output
_HOLDER = textwrap.dedent("""
    import sys, time
    from avat3r_core.storage import output_lock
    with output_lock(sys.argv[1], command="avat3r extract --resolution 96"):
        print("held", flush=True)
        time.sleep(120)
""")


def test_second_run_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    out, log = tmp_path / "out", tmp_path / "log"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(OutputLocked) as refused:
            _run(out, log)
        assert time.perf_counter() - started < 5  # at once, not after waiting
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "avat3r extract --resolution 96" in message
        assert os.uname().nodename in message and "started 20" in message
        assert _calls(log) == [] and not (out / "media.parquet").exists()  # nothing done twice, nothing mixed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="avat3r.storage"):
        assert _run(out, log).items_done == 5  # the killed run's lock is taken over
    assert f"pid {holder.pid}" in caplog.text and "took over the lock" in caplog.text
    assert (out / ".lock").read_bytes() == b""  # released: the next run finds nothing to take over


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """A small studio capture in the NeRSemble layout: 2 subjects, 2 cameras, 2 frames."""
    from avat3r_core.synthetic.studio import StudioConfig
    from stages.synth import run_synth

    root = tmp_path_factory.mktemp("capture")
    run_synth(StudioConfig(subjects=2, sequences=1, frames=2, cameras=2, resolution=96, seed=3), str(root / "raw"),
              str(root / "gt"), str(root / "model"), executor="local")
    return root


def test_two_extract_runs_on_one_output_never_mix_resolutions(capture, tmp_path, monkeypatch):
    """The sweep: two extracts on one --out, 64 and 96 px, started 0.5 s apart, mixed 64 and 96
    px rows. Now the second is refused while the first runs, and the manifest is all 64 px. A
    crop deleted by hand afterwards is redone on the next run."""
    from avat3r_core.extract import ExtractConfig
    from stages import extract as extract_stage

    root, out = capture, tmp_path / "frames"
    go, original = threading.Event(), extract_stage.ExtractStage.process

    def paced(self, item, ctx):  # the first run stays in flight until the second has been tried
        assert go.wait(60)
        return original(self, item, ctx)

    monkeypatch.setattr(extract_stage.ExtractStage, "process", paced)
    first: dict = {}
    thread = threading.Thread(target=lambda: first.update(result=extract_stage.run_extract(
        ExtractConfig(resolution=64), str(root / "raw"), str(out), executor="local")))
    thread.start()
    deadline = time.time() + 60
    while not ((out / ".lock").exists() and (out / ".lock").read_bytes()) and thread.is_alive():
        assert time.time() < deadline
        time.sleep(0.01)
    assert thread.is_alive()
    with pytest.raises(OutputLocked, match="is being written by another run"):
        extract_stage.run_extract(ExtractConfig(resolution=96), str(root / "raw"), str(out), executor="local")
    go.set()
    thread.join(60)
    widths = set(pq.read_table(out / "frames.parquet").column("width").to_pylist())
    assert "result" in first and widths == {64}
    monkeypatch.setattr(extract_stage.ExtractStage, "process", original)
    extract_stage.run_extract(ExtractConfig(resolution=96), str(root / "raw"), str(out), executor="local")
    frames = pq.read_table(out / "frames.parquet").to_pylist()
    assert {r["width"] for r in frames} == {96}  # redone, not mixed
    (out / frames[0]["image"]).unlink()  # a committed crop deleted by hand
    _, again = extract_stage.run_extract(ExtractConfig(resolution=96), str(root / "raw"), str(out), executor="local")
    assert again.items_done == 1 and (out / frames[0]["image"]).is_file()


def test_a_deeply_nested_calibration_is_one_named_problem_and_the_other_subjects_go_on(capture, tmp_path):
    import shutil

    from avat3r_core.formats.capture import scan_capture

    raw = tmp_path / "raw"
    shutil.copytree(capture / "raw", raw)
    subjects = sorted(p.name for p in raw.iterdir() if p.is_dir())
    bad = raw / subjects[0] / "calibration" / "camera_params.json"
    bad.write_text("[" * 200_000)
    index = scan_capture(str(raw), decode=False)
    problems = [p for p in index.problems if p.path == str(bad)]
    assert len(problems) == 1 and "nested too deeply" in problems[0].message
    assert index.subjects[subjects[1]].cameras is not None  # the good subject is read


@pytest.mark.parametrize("name, text", [("library.yaml", "avatars: " + "[" * 100_000),
                                        ("library.json", "[" * 200_000)])
def test_untrusted_json_and_yaml_never_raise_a_bare_recursion_error(tmp_path, name, text):
    from avat3r_core.formats.parsing import read_json, read_yaml
    from avat3r_core.reconstruct.library import read_library

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(FormatError, match=f"{name}.*nested too deeply"):
        read_library(path) if name.endswith(".yaml") else read_json(path)
    path.write_bytes(b"{" + b" " * 100)
    with pytest.raises(FormatError, match="more than the 10 a metadata file may have"):
        (read_yaml if name.endswith(".yaml") else read_json)(path, max_bytes=10)


def _try_lock_in_another_thread(out):
    caught: list = []

    def attempt():
        try:
            with OutputLock(out):
                caught.append(None)
        except OutputLocked as exc:
            caught.append(exc)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(10)
    return caught[0]


def test_object_storage_lock_refuses_a_live_holder_and_takes_over_a_stale_one():
    out = f"memory://lock-test-{time.time_ns()}/out"
    fs = fsspec.filesystem("memory")
    marker = out.replace("memory://", "/") + "/.lock"
    with output_lock(out, command="first run", heartbeat_s=0.05):
        record = json.loads(fs.cat(marker))
        time.sleep(0.3)
        assert json.loads(fs.cat(marker))["heartbeat"] > record["heartbeat"]  # the holder keeps it fresh
        assert isinstance(_try_lock_in_another_thread(out), OutputLocked)  # the same thread would re-enter
        assert f"pid {os.getpid()}" in str(_try_lock_in_another_thread(out)) and "'first run'" in str(
            _try_lock_in_another_thread(out))
    assert not fs.exists(marker)  # released
    # a killed run's marker: the heartbeat stopped long ago ...
    fs.pipe(marker, json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00Z",
                                "command": "killed", "heartbeat": time.time() - 3600}).encode())
    with OutputLock(out) as lock:
        assert lock.took_over["command"] == "killed"
        assert json.loads(fs.cat(marker))["pid"] == os.getpid()
    # ... or its process is gone on this host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe(marker, json.dumps({"host": os.uname().nodename, "pid": dead.pid, "command": "gone",
                                "heartbeat": time.time()}).encode())
    with OutputLock(out) as lock:
        assert lock.took_over["command"] == "gone"
    # a live holder elsewhere with a fresh heartbeat is not taken over
    fs.pipe(marker, json.dumps({"host": "elsewhere", "pid": 7, "command": "live", "heartbeat": time.time()}).encode())
    with pytest.raises(OutputLocked, match="host elsewhere, pid 7"):
        with OutputLock(out):
            pass


# --------------------------------------------------------------------------- ids and error records
def test_over_long_ids_are_refused_by_name(tmp_path):
    from avat3r_core.reconstruct.library import read_library

    library = tmp_path / "library.csv"
    library.write_text(f"avatar_id,mode,source\n{'a' * 300},image,face.png\n")
    with pytest.raises(FormatError, match=rf"row 1: avatar_id.*300 characters, longer than {MAX_ID_LENGTH}"):
        read_library(library)
    with pytest.raises(ValueError, match="300 characters"):
        make_id("s" * 289, "seq", 1)  # 289 + 1 + 3 + 1 + 6
    with pytest.raises(StageError, match="longer than"):
        run_stage(lambda: MediaStage(str(tmp_path / "log")), [{"id": "x" * 300, "value": 1}], tmp_path / "out",
                  "media", executor="local", show_progress=False)


def test_an_error_record_that_cannot_be_written_never_crashes_the_run(tmp_path, monkeypatch, caplog):
    # a real filesystem refusal: the file name is too long for the filesystem
    with caplog.at_level(logging.ERROR, logger="avat3r.stages"):
        assert commit_error(str(tmp_path), "media", "y" * 400, "ValueError: bad", "tb", "{}") is False
    assert "could not be written" in caplog.text and "ValueError: bad" in caplog.text

    class Poisoned(MediaStage):
        def process(self, item, ctx):
            if item["value"] == 2:
                raise ValueError("poisoned")
            return super().process(item, ctx)

    real = storage.atomic_write_bytes
    monkeypatch.setattr(storage, "atomic_write_bytes", lambda uri, data: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "read-only", str(uri))) if "/_errors/" in str(uri) else real(uri, data))
    summary = run_stage(lambda: Poisoned(str(tmp_path / "log")), _items(5), tmp_path / "out", "media",
                        executor="local", show_progress=False)
    assert summary.items_done == 4 and pq.read_table(tmp_path / "out" / "media.parquet").num_rows == 4


# --------------------------------------------------------------------------- skipped items' files
def test_a_committed_items_deleted_file_is_redone(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    _run(out, log)
    (out / "media" / "item-003.bin").unlink()  # deleted by hand
    again = _run(out, log)
    assert (again.items_done, again.items_skipped) == (1, 4)
    assert _calls(log).count("item-003") == 2 and (out / "media" / "item-003.bin").read_bytes() == bytes([3]) * 1000


# --------------------------------------------------------------------------- full disk
def _fill_disk_after(monkeypatch, n_files: int):
    """The local writer hits ENOSPC on its ``n_files + 1``-th media file, after a partial write."""
    real_open = fsspec.implementations.local.LocalFileOpener.write
    count = {"media": 0}

    def write(self, data):
        path = str(getattr(self, "path", ""))
        if "/media/" in path:
            count["media"] += 1
            if count["media"] > n_files:
                real_open(self, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, data)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", write)


def test_a_full_disk_stops_the_run_in_one_line_keeping_the_finished_items(tmp_path, monkeypatch):
    out, log = tmp_path / "out", tmp_path / "log"
    _fill_disk_after(monkeypatch, 3)
    with pytest.raises(DiskFull) as stopped:
        _run(out, log, n=6)
    message = str(stopped.value)
    assert "\n" not in message and "disk full" in message and "lists the 3 committed items" in message
    assert "other 3 of 6" in message
    assert pq.read_table(out / "media.parquet").column("id").to_pylist() == ["item-000", "item-001", "item-002"]
    assert _calls(log) == ["item-000", "item-001", "item-002", "item-003"]  # stopped at the full disk
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == [] and sorted(p.name for p in (out / "media").iterdir()) == [
        "item-000.bin", "item-001.bin", "item-002.bin"]
    monkeypatch.undo()
    again = _run(out, log, n=6)  # space freed: the rest is done, the finished items are not redone
    assert (again.items_done, again.items_skipped) == (3, 3)


# --------------------------------------------------------------------------- checkpoint refusals
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("kind, blocked", [("code", "posix.system"), ("module", "torch.nn.modules.linear.Linear")])
def test_checkpoint_refusals_name_the_blocked_global_and_never_suggest_the_unsafe_switch(tmp_path, kind, blocked):
    import torch

    from avat3r_core.inference.checkpoint import load_trained_model

    path = tmp_path / "checkpoint.pt"
    # a pickled os.system call, and a pickled module object (torch words the two refusals differently)
    torch.save({"model": _Payload() if kind == "code" else torch.nn.Linear(2, 2)}, path)
    with pytest.raises(FormatError) as refused:
        load_trained_model(path)
    message = str(refused.value)
    assert str(path) in message and f"would import {blocked}" in message and "not loaded" in message
    assert "weights_only" not in message and "likely succeed" not in message


def test_a_full_disk_during_extract_leaves_only_referenced_crops(capture, tmp_path, monkeypatch):
    """Extract writes crops in place (no temp + rename): the crop being written when the disk
    fills, and the rest of its item's crops, are removed; the manifest lists what finished."""
    import builtins

    from avat3r_core.extract import ExtractConfig
    from stages import extract as extract_stage

    written = {"n": 0}

    class FullDisk:
        def __init__(self, path):
            self.handle = builtins.open(path, "wb")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            written["n"] += 1
            if written["n"] > 10:  # the disk fills up on the 11th crop file, half-way through it
                self.handle.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

    monkeypatch.setattr(extract_stage, "open", lambda path, mode="r": FullDisk(path), raising=False)
    out = tmp_path / "frames"
    with pytest.raises(DiskFull, match="disk full writing"):
        extract_stage.run_extract(ExtractConfig(resolution=64), str(capture / "raw"), str(out), executor="local")
    rows = pq.read_table(out / "frames.parquet").to_pylist()
    referenced = {r["image"] for r in rows} | {r["alpha"] for r in rows}
    on_disk = {str(p.relative_to(out)) for d in ("images", "alpha") if (out / d).exists()
               for p in (out / d).rglob("*") if p.is_file()}
    assert rows and on_disk == referenced  # no half-written or orphaned crop of the unfinished item
    assert not [p for p in out.rglob(".tmp-*")]
