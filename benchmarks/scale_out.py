"""Beyond one machine, measured here: a 2-node loopback Ray cluster vs one node, dvc push/pull to
an s3:// remote, and the loader streaming shards from s3:// vs local disk. Prints one JSON object.

    python benchmarks/scale_out.py [--subjects 4] [--out DIR] [--smoke]

* ``cluster``: the studio (``--subjects`` people, 4 cameras, 4 frames) preprocessed once on local
  files; then extract and priors (a fresh output each time, same inputs) run through
  ``--ray-address`` on a cluster of one node (``tests/ray_cluster.py``'s head alone, 1 CPU) and
  of two (head + second node, 1 CPU each): items/s per stage, each node's share of the items, and
  the 2-node / 1-node ratio. Both nodes share this machine's CPUs, so the ratio says how well items
  spread, not what two machines would give;
* ``dvc_s3``: the run's data directory ``dvc add``-ed in a scratch DVC project, ``dvc push`` to
  ``s3://`` on moto's server (127.0.0.1), cache and data removed, ``dvc pull``: seconds and bytes;
* ``loader_s3``: samples/s of the training loader (``make_loader``, no workers) over the same
  packed shards on s3:// and on local disk, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("AVAT3R_RAY_DASHBOARD", "0")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def prepare(out: Path, subjects: int) -> tuple[Path, Path]:
    from benchmarks.studio_data import preprocess, studio_params, write_params

    params_path = write_params(out / "params.yaml", studio_params(subjects, seed=2))
    return params_path, Path(preprocess(str(params_path), str(out / "data")))


def start_cluster(work: Path, second_node: bool) -> tuple[subprocess.Popen, dict]:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tests.ray_cluster", str(work)] + ([] if second_node else ["--head-only"])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    return proc, json.loads(proc.stdout.readline())


# extract and priors of the prepared data into a fresh output, on the cluster RAY_ADDRESS names
CLUSTER_STAGES = """
import json, sys
from avat3r_core.config import build, load_params, section
from avat3r_core.extract import ExtractConfig
from avat3r_core.synthetic.studio import face_model_paths
from pipelines.flows import DataLayout, _resources
from stages.extract import run_extract
from stages.priors import PriorsConfig, run_priors
from stages.ray_runtime import ensure_ray

params, data, out = sys.argv[1:]
ensure_ray()
p, layout = load_params(params), DataLayout(data)
_, frames = run_extract(section(p, "extract", ExtractConfig, params), layout.raw, out + "/frames",
                        resources=_resources(p, "extract"))
config = build(PriorsConfig, {**(p.get("priors") or {}), "ground_truth_root": layout.ground_truth})
priors = run_priors(config, out + "/frames/frames.parquet", out + "/priors", resources=_resources(p, "priors"),
                    tracking_manifest=layout.tracking_manifest, face_model_paths=face_model_paths(layout.face_model))
print(json.dumps({"extract": frames.to_dict(), "priors": priors.to_dict()}))
"""


def cluster_run(params_path: Path, data: Path, work: Path, second_node: bool) -> dict:
    proc, info = start_cluster(work / "cluster", second_node)
    try:
        env = {**os.environ, "RAY_ADDRESS": info["address"], "RAY_AUTH_TOKEN_PATH": info["token_path"],
               "RAY_TMPDIR": str(work / "cluster")}
        env.pop("RAY_AUTH_MODE", None)
        done = subprocess.run([sys.executable, "-c", CLUSTER_STAGES, str(params_path), str(data), str(work / "out")],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        summaries = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    names = {v["node_id"]: k for k, v in info["nodes"].items()}
    return {stage: {"items": s["items_done"], "seconds": s["seconds"], "items_per_s": s["items_per_s"],
                    "share": {names.get(n, n): round(c / max(1, s["items_done"]), 3) for n, c in s["nodes"].items()}}
            for stage, s in summaries.items()}


def moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    return server, fs, f"http://{host}:{port}"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def dvc_s3(data: Path, work: Path, endpoint: str, fs) -> dict:
    fs.mkdir("dvc-remote")
    project = work / "dvc-project"
    project.mkdir()
    shutil.copytree(data, project / "data")
    run = lambda *a: subprocess.run(a, cwd=project, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    run(sys.executable, "-m", "dvc", "add", "-q", "data")
    run(sys.executable, "-m", "dvc", "remote", "add", "-d", "s3", "s3://dvc-remote/store")
    run(sys.executable, "-m", "dvc", "remote", "modify", "s3", "endpointurl", endpoint)
    nbytes = du(project / "data")
    t0 = time.perf_counter()
    run(sys.executable, "-m", "dvc", "push", "-q")
    push_s = time.perf_counter() - t0
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data")
    t0 = time.perf_counter()
    run(sys.executable, "-m", "dvc", "pull", "-q")
    pull_s = time.perf_counter() - t0
    assert du(project / "data") == nbytes
    files = sum(1 for p in (project / "data").rglob("*") if p.is_file())
    return {"bytes": nbytes, "files": files, "push_s": round(push_s, 3), "pull_s": round(pull_s, 3),
            "push_MB_per_s": round(nbytes / push_s / 1e6, 3), "pull_MB_per_s": round(nbytes / pull_s / 1e6, 3)}


def loader_rate(shards: str, repeat: int = 3) -> float:
    from avat3r_core.dataset.loader import LoaderConfig, make_loader

    config = LoaderConfig(input_views=2, target_views=2, batch_size=1, resampled=False)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = sum(b.batch_size for b in make_loader(shards, config))
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--out", default="")
    ap.add_argument("--smoke", action="store_true", help="the smallest run: 1 person, one loader pass (the test suite runs it)")
    args = ap.parse_args()
    if args.smoke:
        args.subjects = 1
    repeat = 1 if args.smoke else 3
    out = Path(args.out or tempfile.mkdtemp(prefix="scale-out-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    params_path, data = prepare(out, args.subjects)
    report: dict = {"subjects": args.subjects, "cpus": os.cpu_count()}

    # short folder names: Ray's socket paths below them must stay within AF_UNIX's 107 bytes
    one = cluster_run(params_path, data, out / "n1", second_node=False)
    two = cluster_run(params_path, data, out / "n2", second_node=True)
    report["cluster"] = {"one_node": one, "two_nodes": two,
                         "ratio_items_per_s_2_vs_1": {s: round(two[s]["items_per_s"] / max(one[s]["items_per_s"], 1e-9), 3)
                                                      for s in one}}

    server, fs, endpoint = moto_server()
    try:
        report["dvc_s3"] = dvc_s3(data, out, endpoint, fs)
        fs.mkdir("shards")
        fs.put(str(data / "shards"), "shards/run", recursive=True)
        local, remote = loader_rate(str(data / "shards"), repeat), loader_rate("s3://shards/run", repeat)
        report["loader_s3"] = {"local_samples_per_s": round(local, 2), "s3_samples_per_s": round(remote, 2),
                               "ratio_s3_vs_local": round(remote / local, 3)}
    finally:
        server.stop()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
