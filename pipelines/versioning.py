"""One run, one version: whatever ran a stage (a Prefect flow, ``avat3r stage run``, ``dvc repro``),
its outputs end up in ``dvc.lock``.

``dvc repro`` records what it runs itself (and tells the command so: ``DVC_STAGE`` is set). Any
other run of a stage of a DVC project's pipeline records it with ``dvc commit --force <stages>``:
DVC hashes the stage's deps, params and outs as they are now, caches the outs and writes the
lock, exactly as if ``dvc repro`` had run them. So after ``make demo`` ``dvc status`` is clean,
``dvc push``/``pull`` carry the demo's data, and a rerun of either is a no-op.

A run is recorded only when it is a run of *that* pipeline: the data root is the project's
``data/`` (the paths ``dvc.yaml`` names) and the params file is the project's ``params.yaml``.
Runs elsewhere (a scratch data root, other params) are not versioned, and say so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

log = logging.getLogger("avat3r.versioning")


@dataclass
class Version:
    """What a run belongs to: the git commit (and whether the tree had uncommitted changes), the
    ``dvc.lock`` digest after recording, the stages recorded, and why not when nothing was."""

    repo: str = ""
    git_commit: str = ""
    git_dirty: bool = False
    dvc_lock_sha256: str = ""
    recorded: tuple[str, ...] = ()
    note: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "recorded": list(self.recorded)}


def dvc_project(data_root: str | Path) -> Path | None:
    """The DVC project whose pipeline writes ``data_root`` (its ``data/``), or None."""
    root = Path(data_root).resolve()
    repo = root.parent
    if root.name == "data" and (repo / "dvc.yaml").is_file() and (repo / ".dvc").is_dir():
        return repo
    return None


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def describe(repo: Path | None) -> Version:
    """The git commit and ``dvc.lock`` digest of ``repo`` as they are now."""
    if repo is None:
        return Version(note="not a DVC project's data root: nothing recorded")
    lock = repo / "dvc.lock"
    return Version(repo=str(repo), git_commit=_git(repo, "rev-parse", "HEAD"),
                   git_dirty=bool(_git(repo, "status", "--porcelain", "--untracked-files=no")),
                   dvc_lock_sha256=hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else "")


def record_stages(stages: list[str], params_path: str | Path, data_root: str | Path) -> Version:
    """Record the outputs of ``stages`` (just run, or found up to date) in ``dvc.lock``; returns
    the version the run belongs to. Never raises for a run that is not versioned: the returned
    note says why (and it is logged)."""
    repo = dvc_project(data_root)
    if os.environ.get("DVC_STAGE"):
        version = describe(repo)
        version.note = f"run by dvc repro (stage {os.environ['DVC_STAGE']}), which records it"
        return version
    if repo is None:
        return describe(None)
    pipeline = (yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("stages", {})
    if Path(params_path).resolve() != (repo / "params.yaml").resolve():
        version = describe(repo)
        version.note = f"ran with {params_path}, not the pipeline's params.yaml: not recorded in dvc.lock"
        log.warning("%s", version.note)
        return version
    names = [s for s in stages if s in pipeline]
    if names:
        done = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *names], cwd=repo,
                              capture_output=True, text=True)
        if done.returncode != 0:
            version = describe(repo)
            version.note = f"dvc commit {' '.join(names)} failed: {(done.stderr or done.stdout).strip()[-500:]}"
            log.warning("%s", version.note)
            return version
    version = describe(repo)
    version.recorded = tuple(names)
    return version
