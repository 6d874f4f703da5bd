"""Stages on S3-compatible object storage for real: s3fs against moto's S3 server, started here on
127.0.0.1, endpoint and credentials through the standard variables only. A capture on s3:// is
synthesised, extracted, tracked, given priors and packed there (outputs checked against the same
extract from a local copy), training streams the shards from s3://, reconstruction writes the
held-out subject's avatar there, and a run killed mid-way on
a store without rename leaves no partial object and resumes with every item exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from avat3r_core import storage
from tests.mini_params import mini_params

REPO = Path(__file__).resolve().parents[1]
BUCKET = "avat3r-test"

MINI = mini_params(seed=4)


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in (*creds, "AWS_ENDPOINT_URL")}
    # this process: botocore's AWS_ENDPOINT_URL; the drivers below: fsspec's FSSPEC_S3_ENDPOINT_URL
    os.environ.update(creds, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    env = {**{k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}, **creds,
           "FSSPEC_S3_ENDPOINT_URL": f"http://{host}:{port}", "PYTHONPATH": str(REPO), "AVAT3R_EXECUTOR": "local"}
    yield fs, env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


PIPELINE = textwrap.dedent("""
    import sys
    from pipelines.flows import STAGES, DataLayout
    from stages.train import train_on_shards, train_stage_configs
    import yaml
    params, root, train_out = sys.argv[1:]
    for name in ("synth", "extract", "track", "priors", "pack"):
        STAGES[name](params, DataLayout(root), None, "local")
    config, data, scaling = train_stage_configs(yaml.safe_load(open(params))["train"])
    metrics = train_on_shards(config, data, root + "/shards", train_out, scaling=scaling, executor="local")
    print("steps", metrics["steps"])
    # avatars of the held-out subject, written to the bucket, with the (local) trained checkpoint
    from avat3r_core.config import build
    from avat3r_core.reconstruct.library import write_capture_library
    from stages.reconstruct import ReconstructConfig, run_reconstruct, with_data_defaults
    layout = DataLayout(root)
    values = with_data_defaults({"turntable_frames": 2}, layout.face_model, layout.priors)
    library = write_capture_library(layout.frames_manifest, layout.shards, "test", layout.avatars + "/library.parquet")
    summary = run_reconstruct(build(ReconstructConfig, values, preset="tiny"), library, train_out + "/checkpoint",
                              layout.avatars, executor="local")
    print("avatars", summary.items_done)
""")


def test_stages_and_training_on_object_storage(s3, tmp_path):
    fs, env = s3
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(MINI))
    root = f"s3://{BUCKET}/run"
    # an empty working directory: a URI mistaken for a local path ("s3:/...") would land, and be
    # found again, there
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run([sys.executable, "-c", PIPELINE, str(params), root, str(tmp_path / "train")],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not any(cwd.iterdir()), sorted(str(p) for p in cwd.rglob("*"))[:5]
    assert "steps 2" in done.stdout and "avatars 1" in done.stdout, done.stdout
    # everything the stages wrote is in the bucket, nothing on local disk but training's own files
    for manifest in ("raw/synthetic/synth.parquet", "frames/frames.parquet", "tracking/tracking.parquet",
                     "priors/priors.parquet", "shards/index.parquet"):
        assert storage.read_parquet(f"{root}/{manifest}").num_rows > 0, manifest
    assert not fs.glob(f"{BUCKET}/**/.tmp-*")
    avatars = storage.read_parquet(f"{root}/avatars/index.parquet").to_pylist()
    assert [a["status"] for a in avatars] == ["ok"], avatars
    built = {Path(p).name for p in fs.ls(f"{BUCKET}/run/avatars/{avatars[0]['id']}")}
    assert {"meta.json"} <= built and any(name.endswith(".ply") for name in built), built
    from avat3r_core.dataset.pack import verify_shards

    report = verify_shards(f"{root}/shards")
    assert report["ok"] and report["samples"] > 0, report

    # the s3:// extract is the extract of the same capture on local disk, byte for byte
    from avat3r_core.config import build
    from avat3r_core.extract import ExtractConfig
    from stages.extract import run_extract

    local_raw = tmp_path / "raw"
    fs.get(f"{BUCKET}/run/raw/synthetic", str(local_raw), recursive=True)
    run_extract(build(ExtractConfig, {}, preset="tiny"), str(local_raw), str(tmp_path / "frames"), executor="local")
    remote_rows = storage.read_parquet(f"{root}/frames/frames.parquet").to_pylist()
    local_rows = pq.read_table(tmp_path / "frames/frames.parquet").to_pylist()
    assert len(remote_rows) == len(local_rows) > 0
    image_key = next(k for k in ("image", "image_path", "path") if k in remote_rows[0])
    for remote, local in zip(sorted(remote_rows, key=lambda r: r["id"]), sorted(local_rows, key=lambda r: r["id"])):
        ours = storage.read_bytes(storage.join(f"{root}/frames", remote[image_key]))
        assert ours == (tmp_path / "frames" / local[image_key]).read_bytes(), remote["id"]


KILLED = textwrap.dedent("""
    import sys
    from stages.runner import run_stage
    from tests.test_runner import items, toy_factory
    run_stage(toy_factory(sys.argv[1], 0.3), items(20), sys.argv[2], "toy", executor="local", show_progress=False)
""")


def test_a_run_killed_on_object_storage_resumes_with_every_item_once(s3, tmp_path):
    from stages.runner import committed_ids, run_stage
    from tests.test_runner import items, log_counts, toy_factory

    fs, env = s3
    out, log = f"s3://{BUCKET}/killed", tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(log), out], env=env, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and len(committed_ids(out)) < 5:
        assert proc.poll() is None, "driver exited before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = committed_ids(out)
    assert 5 <= len(before) < 20, "the kill should land half-way"
    # no rename on S3: nothing half-written is visible, no temp objects; committed items' media are whole
    assert not fs.glob(f"{BUCKET}/killed/**/.tmp-*")
    for item_id in before:
        assert fs.cat(f"{BUCKET}/killed/media/{item_id}.txt").decode() == str(int(item_id.split("-")[1]))

    summary = run_stage(toy_factory(log), items(20), out, "toy", executor="local", show_progress=False)
    assert summary.items_skipped == len(before) and summary.items_done == 20 - len(before)
    rows = storage.read_parquet(summary.manifest).to_pylist()
    assert [r["id"] for r in rows] == [f"item-{i:03d}" for i in range(20)]  # every item exactly once
    assert [r["double"] for r in rows] == [2 * i for i in range(20)]
    counts = log_counts(log)
    assert all(counts[i] == 1 for i in before), "committed items must not be processed again"
