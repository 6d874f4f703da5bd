"""Prefect task caching for the coarse stages: a rerun with nothing changed does no work.

A stage task's cache key is the hash of: the stage name and version (bump ``Stage.version`` when
a stage's output changes meaning), its ``params.yaml`` section, the data root, and a fingerprint
of each input it reads (a file: its bytes; a directory: the listing of relative path, size and
modification time of every file in it — cheap on shard and video trees, and changed by any write),
including files its config names (a library manifest, weight files).

Prefect only consults the key; it does not know whether the stage's outputs are still on disk. The
flow therefore refreshes the cache (runs the stage, which itself skips committed items) whenever an
output is missing, e.g. after ``rm -r data/frames`` or a ``dvc checkout`` of an older version.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from avat3r_core import storage


def fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's listing (relative path, size, mtime in ns)."""
    path = Path(path)
    if path.is_file():
        return storage.sha256(path)
    h = hashlib.sha256()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = Path(root, name)
                st = full.stat()
                h.update(f"{full.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    return "missing"


def stage_cache_key(stage: str, version: str, config: dict, data_root: str, inputs: Iterable[str]) -> str:
    """The cache key of one stage run (see the module docstring for what goes in)."""
    # a library manifest or a weight file named in the config: editing it under the same name reruns the stage
    paths = list(inputs) + storage.local_files_named_in(config)
    payload = {
        "stage": stage,
        "version": version,
        "config": config,
        "data_root": str(Path(data_root).resolve()),
        "inputs": {str(p): fingerprint(p) for p in paths},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"avat3r-{stage}-{digest[:32]}"


def outputs_present(outputs: Iterable[str]) -> bool:
    return all(Path(p).exists() for p in outputs)
