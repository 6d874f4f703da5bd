"""The pack stage: frames + priors + tracking manifests → WebDataset shards + ``shards/index.parquet``.

One item per split (train / val / test). Packing is I/O-bound and sequential within a shard, so a
split is one task; the three splits run in parallel on Ray. The driver assigns subjects to splits
(deterministic in the seed, see :func:`avat3r_core.dataset.pack.split_subjects`); each worker
reads the manifests once in ``setup()``, builds its split's samples, and writes the split's
shards through ``webdataset.ShardWriter``. A split is committed (runner fragment) only after all
its shards are closed and checksummed, so a rerun skips committed splits and rewrites an
interrupted one from scratch (its old shards are removed first).

Outputs in ``out_dir``: ``<split>-%06d.tar``, ``index.parquet`` (one row per shard: split, path,
keys, subjects, count, bytes, sha256; the runner's merged manifest), ``index.errors.parquet``,
``index.stats.json``, ``excluded.parquet`` (frames/cameras left out and why) and
``splits.json`` (subjects per split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow as pa

from avat3r_core import storage
from avat3r_core.dataset.pack import (INDEX_NAME, SPLITS, PackConfig, build_samples, split_subjects, write_index,
                                      write_split)
from stages.runner import Stage, StageContext, StageResources, StageSummary, run_stage


#: Bumped when the stage's output changes meaning; part of the flow task's cache key (pipelines/caching.py).
VERSION = "1"


class PackStage(Stage):
    name = "pack"
    version = VERSION
    cheap_setup = True  # nothing to load: splits run as Ray tasks on warm pooled workers

    def __init__(self, config: PackConfig, frames_manifest: str, tracking_manifest: str, priors_manifest: str | None):
        self.config = config
        self.manifests = (frames_manifest, tracking_manifest, priors_manifest)

    def process(self, item: dict, ctx: StageContext) -> list[dict]:
        samples, _ = build_samples(*self.manifests, subjects=item["subjects"], require_priors=self.config.require_priors)
        rows = write_split(samples, item["split"], ctx.out_dir, self.config)
        for r in rows:
            ctx.add_file(r["path"], r["bytes"])
        return rows


def _digest(samples: list) -> str:
    h = hashlib.sha256()
    for spec in samples:
        h.update(json.dumps(dataclasses.asdict(spec), sort_keys=True,
                            default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode())
    return h.hexdigest()


def run_pack(config: PackConfig, frames_manifest: str, tracking_manifest: str, priors_manifest: str | None,
             out_dir: str, resources: StageResources | None = None, executor: str = "ray") -> StageSummary:
    """Pack every split into ``out_dir`` (resumable per split); returns the runner's summary with
    ``extra`` = shard stats per split and the number of excluded frames/cameras."""
    from avat3r_core.dataset.pack import shard_stats

    samples, excluded = build_samples(frames_manifest, tracking_manifest, priors_manifest,
                                      require_priors=config.require_priors)
    splits = split_subjects({s.subject for s in samples}, config.split_fractions, config.seed)
    storage.makedirs(out_dir)
    storage.atomic_write_bytes(storage.join(out_dir, "splits.json"), json.dumps(splits, indent=1).encode())
    storage.write_parquet(pa.Table.from_pylist(excluded, schema=pa.schema([("id", pa.string()), ("reason", pa.string())])),
                          storage.join(out_dir, "excluded.parquet"))
    # each split's item carries a digest of its samples (paths, cameras, tracking, sources): new
    # tracking or priors repack it (the runner's item key); an unchanged split stays as packed
    items = [{"id": split, "split": split, "subjects": splits[split],
              "samples_digest": _digest([s for s in samples if s.subject in set(splits[split])])} for split in SPLITS]
    summary = run_stage(lambda: PackStage(config, frames_manifest, tracking_manifest, priors_manifest), items, out_dir,
                        INDEX_NAME, resources=resources or StageResources(num_cpus=1, max_errors=0), executor=executor)
    # the runner's merged manifest carries item_id; rewrite it in the index schema (split order)
    index = storage.join(out_dir, f"{INDEX_NAME}.parquet")
    rows = [r for r in storage.read_parquet(index).to_pylist() if r.get("split")]
    write_index(rows, out_dir)
    # the shards were just written and checksummed: the index's figures, without re-reading them
    summary.extra = {"stats": shard_stats(out_dir, check=False), "excluded": len(excluded), "splits": splits}
    return summary
