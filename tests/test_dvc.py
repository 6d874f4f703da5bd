"""The DVC pipeline on a clone of this repository with miniature params: `dvc repro` from scratch,
a second `dvc repro` is a no-op, push to a local remote, lose the cache and the data, pull, and the
pipeline is still up to date; `dvc exp run -S train.schedule.steps=...` reruns training and what follows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the project's git repository")

MINI_PARAMS = {
    "synth": {"preset": "tiny", "seed": 5, "preview": False, "subjects": 3},
    "extract": {"preset": "tiny"},
    # a few fit iterations: what is tested is what DVC records and restores, not the fit
    "track": {"preset": "tiny", "landmarks": "ground_truth", "noise_px": 0.25,
              "fit": {"rigid_iters": 5, "adam_iters": 10, "lbfgs_iters": 2}},
    "priors": {"preset": "tiny"},
    "pack": {"preset": "tiny", "split_fractions": [0.34, 0.33, 0.33]},
    "train": {"preset": "tiny", "schedule": {"steps": 2, "validate_every": 0}, "checkpoint": {"every": 2}, "scaling": {"cpus_per_worker": 1},
              "data": {"preset": "tiny"}},
    "evaluate": {"preset": "tiny", "split": "test", "detector": "none"},
    "reconstruct": {"preset": "tiny", "split": "test", "turntable_frames": 2},
    "runtime": {"resources": {"default": {"num_cpus": 1, "max_errors": 2}}},
}


def sh(*args, cwd, env):
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvc")
    repo = root / "repo"
    env = {**os.environ, "AVAT3R_EXECUTOR": "local", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh("git", "clone", "-q", str(REPO), str(repo), cwd=root, env=env)
    # the working tree's pipeline definition (what this commit is about to land), miniature params
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(MINI_PARAMS))
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "mini params", "--allow-empty", cwd=repo, env=env)
    return repo, env, root


def test_repro_push_pull_and_experiments(dvc_repo):
    repo, env, root = dvc_repo
    out = sh("dvc", "repro", cwd=repo, env=env)
    for stage in ("synth", "extract", "track", "priors", "pack", "train", "reconstruct", "evaluate"):
        assert f"Running stage '{stage}'" in out, out
    metrics = json.loads((repo / "data/train/metrics.json").read_text())
    assert metrics["steps"] == 2
    assert "up to date" in sh("dvc", "repro", cwd=repo, env=env)

    remote = root / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "pipeline outputs", cwd=repo, env=env)
    sh("dvc", "push", cwd=repo, env=env)
    shutil.rmtree(repo / ".dvc" / "cache")
    for out_dir in ("raw", "frames", "tracking", "priors", "shards", "train", "avatars", "models", "reports"):
        shutil.rmtree(repo / "data" / out_dir, ignore_errors=True)
    sh("dvc", "pull", cwd=repo, env=env)
    assert (repo / "data/train/checkpoint/checkpoint.pt").exists()
    assert (repo / "data/shards/index.parquet").exists()
    status = sh("dvc", "status", cwd=repo, env=env)
    assert "up to date" in status, status
    assert "up to date" in sh("dvc", "repro", cwd=repo, env=env)

    exp = sh("dvc", "exp", "run", "-S", "train.schedule.steps=3", cwd=repo, env=env)
    assert "Running stage 'train'" in exp and "Running stage 'extract'" not in exp, exp
    assert json.loads((repo / "data/train/metrics.json").read_text())["steps"] == 3


PIPELINE_RUN = ("synth", "extract", "track", "priors", "pack", "train")


def test_flow_and_stage_runs_are_recorded_in_the_lock(prefect_harness, tmp_path):
    """The preprocess flow (Prefect) and `avat3r stage run train` outside `dvc repro`: both end up
    in dvc.lock, so DVC finds them up to date, a push and a pull on a fresh clone restore them, and
    the flow's artifact names the git commit and the lock digest."""
    import hashlib

    from prefect.artifacts import Artifact

    from pipelines.flows import preprocess_flow

    env = {**os.environ, "AVAT3R_EXECUTOR": "local", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    repo = tmp_path / "repo"
    sh("git", "clone", "-q", str(REPO), str(repo), cwd=tmp_path, env=env)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(MINI_PARAMS))
    (repo / "dvc.lock").unlink(missing_ok=True)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "mini params", "--allow-empty", cwd=repo, env=env)
    commit = sh("git", "rev-parse", "HEAD", cwd=repo, env=env).strip()

    preprocess_flow(params_path=str(repo / "params.yaml"), data_root=str(repo / "data"), executor="local")
    artifact = Artifact.get("preprocess-version")
    fields = {row["field"]: row["value"] for row in json.loads(artifact.data)}
    assert fields["git_commit"] == commit and fields["recorded"] == "synth, extract, track, priors, pack", fields
    assert fields["dvc_lock_sha256"] == hashlib.sha256((repo / "dvc.lock").read_bytes()).hexdigest()
    out = sh(sys.executable, "-m", "pipelines.cli", "stage", "run", "train", "--params", str(repo / "params.yaml"),
             "--data-root", str(repo / "data"), "--executor", "local", cwd=REPO, env=env)  # (-m: this tree's code)
    assert "recorded in dvc.lock" in out, out
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(PIPELINE_RUN) <= set(lock), sorted(lock)
    assert "up to date" in sh("dvc", "status", *PIPELINE_RUN, cwd=repo, env=env)
    assert "Running stage" not in sh("dvc", "repro", "train", cwd=repo, env=env)  # a rerun is a no-op

    # push; a fresh clone pulls the same data and finds it up to date
    sh("dvc", "remote", "add", "-d", "local", str(tmp_path / "remote"), cwd=repo, env=env)
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-qm", "the run's version", cwd=repo, env=env)
    sh("dvc", "push", cwd=repo, env=env)
    fresh = tmp_path / "fresh"
    sh("git", "clone", "-q", str(repo), str(fresh), cwd=tmp_path, env=env)
    sh("dvc", "pull", *PIPELINE_RUN, cwd=fresh, env=env)
    assert (fresh / "data/shards/index.parquet").read_bytes() == (repo / "data/shards/index.parquet").read_bytes()
    assert (fresh / "data/train/checkpoint/checkpoint.pt").is_file()
    assert "up to date" in sh("dvc", "status", *PIPELINE_RUN, cwd=fresh, env=env)
