"""A real two-node Ray cluster on loopback (``tests/ray_cluster.py``: two raylets, one GCS, token
authentication): the stages join it through ``--ray-address 127.0.0.1:PORT``, their items run on
both nodes (node ids in the stage stats), and losing the second node's raylet mid-stage loses no
item and runs none twice in the manifest; the stats name what was run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stages.runner import Stage
from tests.mini_params import mini_params

REPO = Path(__file__).resolve().parents[1]

MINI = mini_params(seed=3)


@pytest.fixture(scope="module")
def cluster():
    # a short directory: Ray's unix socket paths live under it
    work = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "tests.ray_cluster", str(work)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    line = proc.stdout.readline()
    assert line, "the test cluster did not start"
    info = json.loads(line)
    # drivers find the cluster's token the way a user gives it (RAY_AUTH_TOKEN_PATH), nothing else
    info["env"] = {**env, "RAY_AUTH_TOKEN_PATH": info["token_path"], "RAY_TMPDIR": str(work), "COLUMNS": "200"}
    info["env"].pop("RAY_AUTH_MODE", None)
    yield info
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def cli(env, *args):
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return done


def test_stages_join_the_loopback_cluster_and_run_on_both_nodes(cluster, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(MINI))
    common = ("--params", str(tmp_path / "params.yaml"), "--data-root", str(tmp_path / "data"))
    address = cluster["address"]
    assert address.startswith("127.0.0.1:")
    cli(cluster["env"], "stage", "run", "synth", *common, "--executor", "local")
    # the three ways to name the cluster: its address (extract), RAY_ADDRESS (track, priors and
    # pack, in one driver as a flow runs them) and `auto`, the cluster recorded on this machine (train)
    cli(cluster["env"], "stage", "run", "extract", *common, "--ray-address", address)
    code = ("import sys; from pipelines.flows import STAGES, DataLayout; "
            "[STAGES[s](sys.argv[1], DataLayout(sys.argv[2]), None, 'ray') for s in ('track', 'priors', 'pack')]")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "params.yaml"), str(tmp_path / "data")],
                          capture_output=True, text=True, env={**cluster["env"], "RAY_ADDRESS": address}, cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    nodes = {}
    for stage, manifest in (("extract", "frames/frames"), ("track", "tracking/tracking"), ("priors", "priors/priors"),
                            ("pack", "shards/index")):
        stats = json.loads((tmp_path / "data" / f"{manifest}.stats.json").read_text())
        assert stats["items_failed"] == 0 and sum(stats["nodes"].values()) == stats["items_done"] > 0, stats
        nodes[stage] = stats["nodes"]
    head, second = cluster["nodes"]["head"]["node_id"], cluster["nodes"]["second"]["node_id"]
    for stage in ("extract", "track", "priors", "pack"):
        assert set(nodes[stage]) == {head, second}, (stage, nodes[stage])
    train = cli(cluster["env"], "stage", "run", "train", *common, "--ray-address", "auto")
    metrics = json.loads((tmp_path / "data/train/metrics.json").read_text())
    assert metrics["steps"] == 2, train.stdout


class NodeLogStage(Stage):
    """Sleeps per item and logs ``<id> <node id>`` when it starts one (nothing to set up: Ray tasks)."""

    name = "node-log"
    cheap_setup = True

    def __init__(self, log_path: str, sleep_s: float):
        self.log_path, self.sleep_s = log_path, sleep_s

    def process(self, item, ctx):
        import ray

        with open(self.log_path, "a") as handle:
            handle.write(f"{item['id']} {ray.get_runtime_context().get_node_id()}\n")
        time.sleep(self.sleep_s)
        return [{"id": item["id"], "value": item["value"]}]


def drive_node_log_stage(address: str, log_path: str, out_dir: str, n_items: int, sleep_s: float) -> None:
    """The driver of the node-loss test (run in its own process: it joins the test cluster)."""
    from stages.ray_runtime import ensure_ray
    from stages.runner import StageResources, run_stage

    ensure_ray(address)
    work = [{"id": f"item-{i:03d}", "value": i} for i in range(n_items)]
    run_stage(lambda: NodeLogStage(log_path, sleep_s), work, out_dir, "nodelog",
              StageResources(num_cpus=1, max_errors=0), show_progress=False)


def test_losing_a_node_mid_stage_runs_its_items_again_on_the_head(cluster, tmp_path):
    log, out, n = tmp_path / "log", tmp_path / "out", 10
    code = (f"from tests.test_cluster import drive_node_log_stage; "
            f"drive_node_log_stage({cluster['address']!r}, {str(log)!r}, {str(out)!r}, {n}, 1.0)")
    driver = subprocess.Popen([sys.executable, "-c", code], env=cluster["env"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = cluster["nodes"]["second"]["node_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and second in log.read_text()):
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(0.05)
    started_on_second = [line.split()[0] for line in log.read_text().splitlines() if line.endswith(second)]
    assert started_on_second, "no item reached the second node"
    os.kill(cluster["nodes"]["second"]["raylet_pid"], signal.SIGKILL)
    output, _ = driver.communicate(timeout=180)
    assert driver.returncode == 0, output[-3000:]
    rows = pq.read_table(out / "nodelog.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == [f"item-{i:03d}" for i in range(n)]  # every item, once
    assert [r["value"] for r in sorted(rows, key=lambda r: r["id"])] == list(range(n))
    stats = json.loads((out / "nodelog.stats.json").read_text())
    assert stats["items_failed"] == 0 and stats["items_done"] == n
    retried = {r["id"] for r in stats["retried"]}
    assert started_on_second[0] in retried and all(r["node_lost"] == second for r in stats["retried"]), stats
    # what ran after the loss ran on the head
    assert stats["nodes"].get(cluster["nodes"]["head"]["node_id"], 0) >= n - len(started_on_second), stats


def test_without_an_address_ray_starts_locally_beside_a_recorded_cluster(cluster):
    """The test cluster is the one recorded in Ray's temp dir (what `--ray-address auto` finds, as
    after `ray start`): a command given no address still starts its own Ray on this machine."""
    code = ("import json, ray; from stages.ray_runtime import ensure_ray; "
            "resources = ensure_ray(num_cpus=1, dashboard=False); "
            "print(json.dumps({'resources': resources, 'gcs': ray.get_runtime_context().gcs_address}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cluster["env"], cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["gcs"] != cluster["address"], found
    assert "head" not in found["resources"] and "second" not in found["resources"], found
