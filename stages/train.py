"""The training stage: Ray Train (``TorchTrainer``, DDP) around :func:`avat3r_core.train.loop.train_loop`.

``run_train(config, batch_source_factory, out_dir, scaling=...)`` starts (or joins) Ray and runs
``scaling.num_workers`` workers (:class:`TrainScaling` → ``ScalingConfig``; Ray sets up the process
group: gloo on CPU, NCCL on GPU). Each worker builds the model, wraps it with
``ray.train.torch.prepare_model`` (DDP when there is more than one worker) and trains on its own
shard: the batch source is called as ``factory(rank, world_size, epoch)``.

Checkpoints: every ``checkpoint.every`` steps and at the end, rank 0 writes ``checkpoint.pt``
(model, optimiser, scheduler, step, every rank's loader position and RNG state) into a temporary
directory and hands it to ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(...))``;
Ray persists it under ``<storage_path>/<name>/`` and keeps the newest ``checkpoint.keep``.
Resume: a worker restarted after a failure (``max_failures``), or a rerun with the same
``storage_path`` and ``name``, gets the latest checkpoint from ``ray.train.get_checkpoint()``;
``resume_from=<dir>`` starts a new run from a given checkpoint directory instead. Either way the
run ends at ``config.schedule.steps``.

Rank 0 writes the logs and reports into ``out_dir`` (``train_log.csv``, ``tensorboard/``,
``plots/*.csv``, ``val/*.png``, ``metrics.json``); on a multi-node cluster ``out_dir`` must be a
shared path. ``executor="local"`` runs the same loop in this process without Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from avat3r_core import storage
from avat3r_core.config import Presets, build, set_cpu_threads
from avat3r_core.dataset.loader import LoaderConfig, make_loader
from avat3r_core.inference.checkpoint import CHECKPOINT_FILE
from avat3r_core.train.config import TrainConfig
from avat3r_core.train.loop import BatchSource, LocalSession, train_loop
from avat3r_core.train.synthetic import SyntheticSource

log = logging.getLogger("avat3r.stages.train")

#: Bumped when the stage's output changes meaning; part of the flow task's cache key (pipelines/caching.py).
VERSION = "2"  # 2: views in the tracked head frame


# --------------------------------------------------------------------------- data
@dataclass
class TrainDataConfig(Presets):
    """Where training batches come from: the packed shards through the WebDataset loader
    (``params.yaml`` ``train.data``). Training draws shards with replacement for a fixed epoch
    length per rank; validation reads the first ``val_samples`` samples of ``val_split`` in a fixed
    order, so every validation sees the same held-out views and expressions."""

    PRESETS: ClassVar[dict] = {
        "tiny": dict(loader=dict(preset="tiny", batch_size=1, target_views=2), epoch_length=8, val_samples=2),
        "demo": dict(loader=dict(preset="demo", target_views=4), epoch_length=64, val_samples=16),
        "paper": dict(loader=dict(preset="paper"), epoch_length=10_000, val_samples=64, loader_workers=4),
    }

    loader: LoaderConfig = field(default_factory=LoaderConfig)  #: views per sample, decoder, buffers
    epoch_length: int = 64  #: training items per rank per epoch (shards are resampled)
    loader_workers: int = 0  #: DataLoader processes per rank (0: decode in the training process)
    val_split: str = "val"
    val_samples: int = 16  #: held-out samples evaluated at each validation
    #: training loss weight of the mouth: its pixels count 1 + this (0: off; MouthWeights), boxes
    #: from the face model below projected into each target view
    mouth_weight: float = 0.0
    face_model: str = ""  #: FLAME-layout model (.pkl) for mouth_weight; "" in the flows: the studio head
    landmark_embedding: str = ""  #: its 68-point iBUG landmark embedding

    def __post_init__(self) -> None:
        if self.epoch_length < 1 or self.val_samples < 0 or self.loader_workers < 0 or self.mouth_weight < 0:
            raise ValueError("epoch_length ≥ 1, val_samples ≥ 0, loader_workers ≥ 0 and mouth_weight ≥ 0 are required")
        if self.mouth_weight and self.loader.frame != "head":
            raise ValueError("train.data.mouth_weight places the face model's mouth in the head frame: it needs "
                             f"loader frame: head, not {self.loader.frame!r}")

    def mouth_weights(self):
        """The :class:`~avat3r_core.animation.sensitivity.MouthWeights` of ``mouth_weight`` (None when off)."""
        if not self.mouth_weight:
            return None
        if not (self.face_model and self.landmark_embedding):
            raise ValueError("train.data.mouth_weight needs train.data.face_model and landmark_embedding (the "
                             "face model tracking fitted, with its 68-point embedding)")
        from avat3r_core.animation.sensitivity import MouthWeights

        return MouthWeights(self.mouth_weight, self.face_model, self.landmark_embedding)


@dataclass
class TrainScaling(Presets):
    """How Ray Train runs the recipe (``params.yaml`` ``train.scaling``): the stage's concern, not
    the recipe's (:class:`~avat3r_core.train.config.TrainConfig`). ``paper``: 8 GPU workers, batch 1
    each (the published setup)."""

    PRESETS: ClassVar[dict] = {
        "tiny": dict(num_workers=1, use_gpu=False),
        "paper": dict(num_workers=8, use_gpu=True),
    }

    num_workers: int = 1  #: Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: int = 1  #: CPUs Ray reserves per worker; on CPU also torch's intra-op threads


class ShardSource:
    """:data:`~avat3r_core.train.loop.BatchSource` over packed shards: ``(rank, world_size, epoch)`` →
    that rank's batches of the epoch. ``validation=True``: no resampling, no shuffling, at most
    ``max_samples`` samples. Training batches carry the mouth's loss weights when
    ``data.mouth_weight`` is on (validation's are plain). Picklable (Ray ships it to the workers;
    each builds its own loader)."""

    def __init__(self, shards_dir: str | Path, data: TrainDataConfig, batch_size: int, split: str = "train",
                 validation: bool = False, seed: int = 0):
        self.shards_dir, self.data, self.batch_size = str(shards_dir), data, batch_size
        self.split, self.validation, self.seed = split, validation, seed

    def loader_config(self) -> LoaderConfig:
        if self.validation:
            return self.data.loader.read_once()
        return replace(self.data.loader, batch_size=self.batch_size)

    def __call__(self, rank: int = 0, world_size: int = 1, epoch: int = 0):
        config = self.loader_config()
        if self.validation:
            loader = make_loader(self.shards_dir, config, 0, 1, 0, None, self.seed, self.split)
            for i, batch in enumerate(loader):
                if i >= self.data.val_samples:
                    return
                yield batch
            return
        loader = make_loader(self.shards_dir, config, rank, world_size, self.data.loader_workers,
                             self.data.epoch_length, self.seed, self.split)
        loader.set_epoch(epoch)
        mouth = self.data.mouth_weights()  # built here, in the worker: the source stays picklable
        for batch in loader:
            yield batch if mouth is None else replace(batch, target_weights=mouth(batch))


def model_overrides_from_shards(shards_dir: str | Path, split: str = "train") -> dict:
    """The model inputs the packed data implies: crop resolution (``image_size``) and the stored
    feature channels (``feature_dim``; no features in the shards → ``use_features=False``)."""
    config = LoaderConfig(target_views=1, frame="world").read_once()  # sizes only: any frame
    batch = next(iter(make_loader(str(shards_dir), config, split=split)), None)
    if batch is None:
        raise ValueError(f"{shards_dir}: split {split!r} yields no sample; cannot size the model")
    overrides: dict = {"image_size": int(batch.images.shape[-1]), "num_views": int(batch.images.shape[1])}
    if batch.features is None:
        overrides["use_features"] = False
    else:
        overrides["feature_dim"] = int(batch.features.shape[2])
    return overrides


class RayTrainSession:
    """:class:`avat3r_core.train.loop.TrainSession` inside a Ray Train worker."""

    def __init__(self, resume_from: str | None = None, find_unused_parameters: bool = False,
                 cpu_threads: int | None = None):
        import ray.train
        import ray.train.torch

        set_cpu_threads(cpu_threads)  # one thread per reserved CPU: workers must not oversubscribe the node

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.resume_from = Path(resume_from) if resume_from else None
        self.find_unused_parameters = find_unused_parameters

    def prepare_model(self, model):
        import ray.train.torch

        kwargs = {"find_unused_parameters": True} if self.find_unused_parameters else None
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs)

    @contextlib.contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # this run's latest (restart after failure / same name)
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                yield Path(directory)
        else:
            yield self.resume_from

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _worker(loop_config: dict) -> None:
    """The per-worker training function (runs in each Ray Train worker)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    scaling = loop_config["scaling"]
    session = RayTrainSession(loop_config["resume_from"], loop_config.get("find_unused_parameters", False),
                              cpu_threads=None if scaling.use_gpu else scaling.cpus_per_worker)
    train_loop(loop_config["config"], loop_config["source"], loop_config["out_dir"], session,
               loop_config["val_source"])


def _check_resume(resume_from: str | Path | None) -> str | None:
    if resume_from is None:
        return None
    path = Path(resume_from).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory to resume from does not exist: {path}")
    if not (path / CHECKPOINT_FILE).exists():
        raise FileNotFoundError(f"checkpoint directory {path} holds no {CHECKPOINT_FILE}")
    return str(path)


def run_train(config: TrainConfig, batch_source_factory: BatchSource, out_dir: str | Path,
              val_source_factory: BatchSource | None = None, *, scaling: TrainScaling | None = None,
              resume_from: str | Path | None = None,
              storage_path: str | Path | None = None, name: str = "train", max_failures: int = 0,
              executor: str = "ray", ray_address: str | None = None,
              find_unused_parameters: bool = False) -> dict[str, Any]:
    """Train ``config`` on ``batch_source_factory`` and return the run's metrics (``metrics.json``
    plus ``checkpoint``: the final checkpoint directory).

    ``storage_path`` (default ``<out_dir>/ray``) and ``name`` locate the checkpoints; rerunning with
    the same pair resumes from the newest one. ``resume_from``: a checkpoint directory to start
    from (a missing one raises FileNotFoundError naming it). ``executor="local"``: no Ray, one
    process (checkpoints under ``<storage_path>/<name>/``).
    """
    scaling = scaling or TrainScaling()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = _check_resume(resume_from)
    storage = Path(storage_path).resolve() if storage_path is not None else out_dir / "ray"
    if executor == "local":
        session = LocalSession(storage / name, keep=config.checkpoint.keep, resume_from=resume)
        metrics = train_loop(config, batch_source_factory, out_dir, session, val_source_factory)
        found = session.checkpoints()
        return {**metrics, "checkpoint": str(found[-1]) if found else None}
    if executor != "ray":
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from stages.ray_runtime import ensure_ray

    ensure_ray(ray_address)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config, "source": batch_source_factory, "val_source": val_source_factory,
                           "out_dir": str(out_dir), "resume_from": resume, "scaling": scaling,
                           "find_unused_parameters": find_unused_parameters},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(storage_path=str(storage), name=name,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=max(1, config.checkpoint.keep))),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics_path = out_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else dict(result.metrics or {})
    metrics["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    return metrics


def train_on_shards(config: TrainConfig, data: TrainDataConfig, shards_dir: str | Path, out_dir: str | Path,
                    **run_kwargs) -> dict[str, Any]:
    """Train on packed shards: the model is sized from the data (explicit ``config.model`` values
    win), validation runs on ``data.val_split``, and the final checkpoint is copied to
    ``<out_dir>/checkpoint`` (a stable path for reconstruction and DVC)."""
    # shards may be streamed from object storage (s3://...); what training writes (checkpoints,
    # TensorBoard, Ray Train's storage) is local files
    shards_dir = storage.as_path(shards_dir)
    if isinstance(shards_dir, Path):
        shards_dir = shards_dir.resolve()
    if "://" in str(out_dir):
        raise ValueError(f"train: the output directory must be local (checkpoints, TensorBoard and Ray Train's "
                         f"storage are local files), got {out_dir}; the shards may be on object storage")
    if not storage.exists(storage.join(str(shards_dir), "index.parquet")):
        raise FileNotFoundError(f"no shards index at {storage.join(str(shards_dir), 'index.parquet')} (run the pack stage first)")
    if data.loader.batch_size != config.batch_size:
        # one home for the batch size: the recipe's (samples per worker per step); the loader's
        # would be silently replaced (ShardSource), so a different value there is refused
        raise ValueError(f"train.data.loader.batch_size = {data.loader.batch_size} is not used by training: batches "
                         f"hold train.batch_size = {config.batch_size} samples per worker; set that one instead")
    inferred = {**model_overrides_from_shards(shards_dir), "frame": data.loader.frame}
    config = replace(config, model={**inferred, **config.model})
    log.info("model sized from %s: %s", shards_dir, inferred)
    source = ShardSource(shards_dir, data, config.batch_size, "train", seed=config.seed)
    val = ShardSource(shards_dir, data, 1, data.val_split, validation=True, seed=config.seed) if data.val_samples else None
    metrics = run_train(config, source, out_dir, val, **run_kwargs)
    final = Path(out_dir).resolve() / "checkpoint"
    if metrics.get("checkpoint"):
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(metrics["checkpoint"], final)
        metrics["checkpoint"] = str(final)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(
            {k: v for k, v in metrics.items() if k != "checkpoint"}, indent=1))
    return metrics


def train_stage_configs(values: dict, source: str = "params.yaml:train"
                        ) -> tuple[TrainConfig, TrainDataConfig, TrainScaling]:
    """``params.yaml``'s ``train`` section: the :class:`TrainConfig` keys and sections at the top (so
    ``dvc exp run -S train.schedule.steps=...`` works), the loader under ``data`` and Ray Train's scaling
    under ``scaling`` (its preset follows the recipe's when it has one of that name)."""
    values = dict(values or {})
    data = build(TrainDataConfig, values.pop("data", None) or {"preset": "demo"}, source=f"{source}.data")
    preset = values.get("preset")
    scaling = build(TrainScaling, values.pop("scaling", None) or {},
                    preset=preset if preset in TrainScaling.PRESETS else None, source=f"{source}.scaling")
    return build(TrainConfig, values, source=source), data, scaling


def main(argv: list[str] | None = None) -> None:
    """Demo: train on the in-memory synthetic source (the WebDataset loader is wired by the CLI)."""
    import argparse

    ap = argparse.ArgumentParser(description="avat3r training on synthetic data (Ray Train)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--workers", type=int)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--resume-from")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    overrides: dict = {"model": {"image_size": args.size}}
    if args.steps:
        overrides["schedule"] = {"steps": args.steps}
    config = TrainConfig.preset(args.preset, **overrides)
    scaling = build(TrainScaling, {"num_workers": args.workers} if args.workers else {},
                    preset=args.preset if args.preset in TrainScaling.PRESETS else None)
    mc = config.model_config()
    source = SyntheticSource(num_samples=16, size=args.size, num_inputs=mc.num_views, num_targets=4,
                             feature_dim=mc.feature_dim if mc.features_enabled else 0)
    val = SyntheticSource(num_samples=2, size=args.size, num_inputs=mc.num_views, num_targets=4, seed=1,
                          shuffle=False, feature_dim=mc.feature_dim if mc.features_enabled else 0)
    metrics = run_train(config, source, args.out, val, scaling=scaling, resume_from=args.resume_from,
                        executor=args.executor)
    print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main()
