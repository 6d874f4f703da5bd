"""Training data: packing frames + priors + tracking into WebDataset shards, and the Avat3r loader.

* :mod:`avat3r_core.dataset.pack` — sample specs, subject split, shard writing, index, verification.
* :mod:`avat3r_core.dataset.loader` — shard pipeline, Avat3r view sampler, decoding.
* :mod:`avat3r_core.dataset.batching` — collate decoded items to :class:`~avat3r_core.batch.Avat3rBatch`
  (and the shared-memory batch a DataLoader worker hands over).
"""

from avat3r_core.dataset.batching import collate
from avat3r_core.dataset.loader import Avat3rDataset, Avat3rLoader, Avat3rSampler, LoaderConfig, make_loader
from avat3r_core.dataset.pack import (PackConfig, build_samples, encode_sample, pack, plan_pack, read_index,
                                      shard_stats, shard_urls, split_subjects, verify_shards, write_index,
                                      write_split)

__all__ = [
    "Avat3rDataset", "Avat3rLoader", "Avat3rSampler", "LoaderConfig", "collate", "make_loader",
    "PackConfig", "build_samples", "encode_sample", "pack", "plan_pack", "read_index", "shard_stats", "shard_urls",
    "split_subjects", "verify_shards", "write_index", "write_split",
]
