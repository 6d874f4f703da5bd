"""Training loader: WebDataset shards → Avat3r items (inputs at other timesteps) → :class:`Avat3rBatch`.

Pipeline per DataLoader worker::

    shard list (per epoch, per rank, per worker) → tar reading (webdataset's tar expander and
    key grouping, with a counting handler) → completeness check → Avat3r sampler (subject-aware
    buffer + k-farthest viewpoint sampling) → decode only the chosen views → item shuffle buffer
    → collate (:mod:`avat3r_core.dataset.batching`) → Avat3rBatch

Shards
    The shard list is shuffled per epoch with ``Random((seed, epoch))``, identically on every rank.
    ``resampled=False``: rank r takes shards ``r::world_size`` of that order, worker w of the rank
    takes ``w::num_workers`` of those, and each shard is read once: every sample is read exactly
    once per epoch when there are at least ``world_size × num_workers`` shards (packing's
    ``min_shards`` is there for that). ``resampled=True`` (training): each worker draws shards with
    replacement from the whole list with its own seeded RNG ``(seed, epoch, rank, worker)`` and
    stops after a fixed quota, so every rank yields exactly ``epoch_length`` items (whole batches)
    and no rank waits on another because its shards ran out.

Corrupt data
    Errors while reading a tar (truncated file, bad header), incomplete samples (a field listed in
    ``meta.json`` missing, e.g. the last sample of a truncated shard) and views that fail to decode
    are skipped; each is counted in :attr:`Avat3rLoader.counters` (shared across worker processes)
    and logged once as a warning. Unlike ``webdataset.warn_and_continue`` the handler does not sleep.

The Avat3r sampler
    Per training item: the *target* is one timestep; T supervision views are T of its cameras
    (all if fewer), random; V input views come from *other* timesteps of the same subject and
    sequence, chosen by k-farthest viewpoint sampling over (timestep, camera) candidates: a random
    first view, then repeatedly the candidate whose camera centre is farthest from the views chosen
    so far, ties (e.g. the same camera at different timesteps) broken at random, so views spread
    over the rig and timesteps vary. Other timesteps come from a subject-aware buffer: the last
    ``buffer_per_sequence`` timesteps of each (subject, sequence) seen by this worker, at most
    ``max_sequences`` sequences (least recently used evicted). Samples are packed in
    (subject, sequence, frame) order, so a sequence's timesteps arrive together. A sample whose
    sequence has no other timestep in the buffer yet *waits* (one per sequence) and is emitted
    as soon as a second timestep of its sequence arrives; if none arrives before its sequence is
    evicted or the stream ends it is dropped and counted as ``no_partner``. The buffer keeps the
    encoded bytes only; just the chosen views are decoded.
    ``random_timestep_inputs=False`` (the published ablation): inputs are views of the target
    timestep itself, picked the same way; no buffer, nothing waits.
    ``input_contrast=True`` (training only; :meth:`LoaderConfig.read_once` turns it off, so
    validation and evaluation keep the plain protocol): the candidate timesteps are first cut to
    the half of the buffered ones whose expression differs most from the target's
    (:func:`expression_distance`), so more samples ask for an expression the inputs do not show.
    ``input_pool="subject"`` (training only, turned off by :meth:`LoaderConfig.read_once` too): the
    inputs come from the buffered timesteps of the person's *other* sequences, never the target's
    own, so the target's expression cannot be copied from a neighbouring frame and only the code
    can say what the mouth does. A target whose person has no other sequence in the buffer yet
    waits (up to ``buffer_per_sequence`` per sequence, the oldest dropped as ``no_partner``); each
    timestep of another of that person's sequences that arrives releases one waiting target.

Coordinate frame
    ``frame="head"`` (default): every view is expressed in the tracked head frame of its own
    timestep (``head_to_world`` in the sample's ``tracking.json``, from
    :meth:`avat3r_core.flame.FlameLayer.head_to_world`): cameras become ``world_to_cam @
    head_to_world`` and position maps ``head_to_world⁻¹ · p``. The head then stands still across
    timesteps, so inputs taken at other timesteps (where the head was turned differently) line up
    with the target, and what is left between them is expression, which the network models.
    Viewpoint sampling measures camera centres in that frame too. ``frame="world"`` keeps the
    capture's world frame (the head moves between timesteps). Shards packed without head frames
    fail loudly in head mode (:class:`MissingHeadFrame`) rather than train on the wrong frame.

Decoding uses OpenCV by default (``benchmarks/loader.py`` measures OpenCV against Pillow).
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avat3r_core import storage
from avat3r_core.config import Presets
from avat3r_core.geometry import FRAMES, HeadFrameError, camera_centers, farthest_views, head_frames, to_head_frame
from avat3r_core.dataset.batching import collate, collate_packed
from avat3r_core.dataset.pack import sample_fields, shard_urls
from avat3r_core.batch import Avat3rBatch
from avat3r_core.tracking import EXPRESSION_DIM
from avat3r_core.tracking import expression_code as ec

log = logging.getLogger("avat3r.dataset")

#: coordinate frames a loader can express views in (see the module docstring)


class MissingHeadFrame(ValueError):
    """A sample without ``head_to_world`` read in the head frame: never skipped, the run stops."""


#: names of the shared counters (see :attr:`Avat3rLoader.counters`)
COUNTERS = ("corrupt", "no_partner", "samples", "items")
#: where a training target's input views come from (module docstring, ``input_pool``)
INPUT_POOLS = ("sequence", "subject")


@dataclass
class LoaderConfig(Presets):
    PRESETS: ClassVar[dict] = {
        "tiny": dict(input_views=4, target_views=4, batch_size=2, buffer_per_sequence=4, max_sequences=4,
                     shuffle_buffer=4),
        "demo": dict(batch_size=1),
        "paper": dict(input_views=4, target_views=8, batch_size=1, buffer_per_sequence=4, max_sequences=2,
                      shuffle_buffer=4),
    }

    input_views: int = 4  # V
    target_views: int = 8  # T (all cameras of the target timestep when it has fewer)
    batch_size: int = 1
    random_timestep_inputs: bool = True  # False: inputs from the target timestep (published ablation)
    buffer_per_sequence: int = 8  # timesteps kept per (subject, sequence) for input sampling
    max_sequences: int = 4  # sequences held at once per worker (LRU)
    shuffle_buffer: int = 8  # items shuffled before batching (0: off)
    resampled: bool = True  # draw shards with replacement, fixed epoch length (training)
    decoder: str = "opencv"  # opencv | pillow
    frame: str = "head"  # head: each view in its timestep's tracked head frame | world (module docstring)
    input_contrast: bool = False  # inputs from the timesteps whose expression differs most (training only)
    input_pool: str = "sequence"  # sequence: the target's sequence | subject: the person's other sequences (training only)

    def read_once(self) -> "LoaderConfig":
        """These settings for reading a split once, in order, one sample per batch (validation,
        evaluation, inspecting the data): no resampling, no shuffling, the plain input choice."""
        return replace(self, batch_size=1, resampled=False, shuffle_buffer=0, input_contrast=False,
                       input_pool="sequence")

    def __post_init__(self) -> None:
        if self.input_pool not in INPUT_POOLS:
            raise ValueError(f"input_pool must be one of {INPUT_POOLS}, got {self.input_pool!r}")
        if self.input_pool == "subject" and not self.random_timestep_inputs:
            raise ValueError("input_pool: subject takes inputs from other timesteps; it contradicts "
                             "random_timestep_inputs: false (inputs from the target timestep)")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")
        if self.decoder not in ("opencv", "pillow"):
            raise ValueError(f"decoder must be opencv or pillow, got {self.decoder!r}")
        if min(self.input_views, self.target_views, self.batch_size) < 1:
            raise ValueError("input_views, target_views and batch_size must be ≥ 1")
        if self.buffer_per_sequence < 2 or self.max_sequences < 1 or self.shuffle_buffer < 0:
            raise ValueError("buffer_per_sequence ≥ 2, max_sequences ≥ 1 and shuffle_buffer ≥ 0 are required")


# --------------------------------------------------------------------------- decoding
def decode_image(data: bytes, decoder: str = "opencv") -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    if decoder == "opencv":
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("image does not decode")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_alpha(data: bytes, decoder: str = "opencv") -> np.ndarray:
    """(H, W) uint8 matte."""
    if decoder == "opencv":
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise ValueError("alpha does not decode")
        return img
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- samples
@dataclass
class Timestep:
    """One packed sample, parsed but not decoded: its media stay encoded bytes."""

    key: str
    subject: str
    sequence: str
    frame: int
    serials: list[str]
    image_ext: str
    world_to_cam: np.ndarray  # (C, 4, 4) cameras of the sample's frame (the head frame when head_to_world is set)
    K: np.ndarray  # (C, 3, 3)
    width: int
    height: int
    centers: np.ndarray  # (C, 3) camera centres, same frame
    has_position: list[bool]
    has_features: list[bool]
    expression: np.ndarray  # (135,)
    raw: dict[str, bytes]
    head_to_world: np.ndarray | None = None  # (4, 4) when in the head frame; None: world frame

    @property
    def seq_key(self) -> tuple[str, str]:
        return (self.subject, self.sequence)


def head_to_world_of(sample: dict[str, Any]) -> np.ndarray:
    """The (4, 4) rigid head-to-world transform in a sample's ``tracking.json``."""
    try:
        return head_frames([json.loads(sample["tracking.json"]).get("head_to_world")])[0]
    except HeadFrameError as bad:
        if bad.first_missing:
            raise MissingHeadFrame(f"sample {sample.get('__key__')!r} has no head_to_world in tracking.json: its shards "
                                   "were packed from tracking without head frames; re-run track and pack "
                                   "(or read them with loader frame: world)") from None
        raise ValueError(f"sample {sample.get('__key__')!r}: head_to_world is not a rigid transform") from None


def parse_sample(sample: dict[str, Any], frame: str) -> Timestep:
    """A grouped WebDataset sample → :class:`Timestep` with its cameras in ``frame``; raises on an
    incomplete sample."""
    if "meta.json" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no meta.json (incomplete)")
    meta = json.loads(sample["meta.json"])
    missing = [f for f in sample_fields(meta) if f not in sample]
    if missing:
        raise ValueError(f"sample {sample.get('__key__')!r} is incomplete: missing {missing[:3]}")
    cams = [json.loads(sample[f"cam_{s}.camera.json"]) for s in meta["cameras"]]
    sizes = {(c["width"], c["height"]) for c in cams}
    if len(sizes) != 1:
        raise ValueError(f"sample {sample['__key__']!r}: cameras have different sizes")
    w2c = np.array([c["world_to_cam"] for c in cams], dtype=np.float64).reshape(-1, 4, 4)
    head = head_to_world_of(sample) if frame == "head" else None
    if head is not None:
        w2c = w2c @ head  # head → camera
    K = np.array([c["K"] for c in cams], dtype=np.float64).reshape(-1, 3, 3)
    centers = camera_centers(w2c)
    expression = np.load(io.BytesIO(sample["expression.npy"]), allow_pickle=False).astype(np.float32).reshape(-1)
    if expression.shape != (EXPRESSION_DIM,):
        raise ValueError(f"sample {sample['__key__']!r}: expression has shape {expression.shape}")
    (width, height), = sizes
    return Timestep(key=sample["__key__"], subject=meta["subject"], sequence=meta["sequence"], frame=int(meta["frame"]),
                    serials=list(meta["cameras"]), image_ext=meta["image_ext"], world_to_cam=w2c, K=K,
                    width=int(width), height=int(height), centers=centers,
                    has_position=list(meta["has_position"]), has_features=list(meta["has_features"]),
                    expression=expression, raw=sample, head_to_world=head)


def expression_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How differently two 135-d codes look: L2 over the expression coefficients and the jaw's
    6D rotation, the jaw weighted ×10 (0.1 rad of jaw ≈ one sigma of a coefficient). Head pose,
    neck and eyes are left out: in the head frame the pose carries no appearance."""
    d = np.concatenate([a[ec.EXPR] - b[ec.EXPR], 10.0 * (a[ec.JAW] - b[ec.JAW])])
    return float(np.linalg.norm(d))


@dataclass
class ItemPlan:
    target: Timestep
    target_views: list[int]  # camera indices of the target timestep
    inputs: list[tuple[Timestep, int]]  # (timestep, camera index)


class Avat3rSampler:
    """Turns a stream of :class:`Timestep` into :class:`ItemPlan` (see the module docstring)."""

    def __init__(self, config: LoaderConfig, rng: random.Random, on_drop: Callable[[Timestep], None] | None = None):
        self.config = config
        self.rng = rng
        self.on_drop = on_drop or (lambda ts: None)
        self.buffers: OrderedDict[tuple[str, str], OrderedDict[int, Timestep]] = OrderedDict()
        self.pending: dict[tuple[str, str], Timestep] = {}
        self.waiting: dict[tuple[str, str], list[Timestep]] = {}  # input_pool "subject": targets per sequence

    def _plan(self, target: Timestep, sources: list[Timestep]) -> ItemPlan | None:
        cfg = self.config
        if cfg.input_contrast and len(sources) > 1:
            far = sorted(sources, key=lambda ts: -expression_distance(ts.expression, target.expression))
            sources = far[: (len(far) + 1) // 2]
        cands = [(ts, c) for ts in sources for c in range(len(ts.serials)) if ts.has_position[c]]
        if not cands:
            return None
        centers = np.stack([ts.centers[c] for ts, c in cands])
        # one label per source timestep (frame numbers repeat across the sequences of one person)
        label = {id(ts): i for i, ts in enumerate(sources)}
        groups = np.array([label[id(ts)] for ts, _ in cands])
        picks = farthest_views(centers, cfg.input_views, self.rng, groups)
        while len(picks) < cfg.input_views:  # fewer candidates than V: repeat (in pick order)
            picks.append(picks[len(picks) % len(picks)])
        n_cam = len(target.serials)
        targets = self.rng.sample(range(n_cam), min(cfg.target_views, n_cam))
        return ItemPlan(target, targets, [cands[i] for i in picks])

    def push(self, ts: Timestep) -> list[ItemPlan]:
        if not self.config.random_timestep_inputs:
            plan = self._plan(ts, [ts])
            return [plan] if plan else []
        key = ts.seq_key
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = OrderedDict()
            while len(self.buffers) > self.config.max_sequences:
                old_key, _ = self.buffers.popitem(last=False)
                dropped = self.pending.pop(old_key, None)
                if dropped is not None:
                    self.on_drop(dropped)
                for waited in self.waiting.pop(old_key, []):
                    self.on_drop(waited)
        self.buffers.move_to_end(key)
        buf.pop(ts.frame, None)
        buf[ts.frame] = ts
        while len(buf) > self.config.buffer_per_sequence:
            buf.popitem(last=False)
        if self.config.input_pool == "subject":
            return self._push_other_sequences(ts)
        out = []
        waiting = self.pending.pop(key, None)
        for target in ([waiting] if waiting is not None else []) + [ts]:
            others = [o for f, o in buf.items() if f != target.frame]
            if not others:
                if target is ts:
                    self.pending[key] = ts  # waits for another timestep of its sequence
                # else: the waiting sample's frame came again (resampled): the newer copy waits instead
                continue
            plan = self._plan(target, others)
            if plan:
                out.append(plan)
        return out

    def _other_sequences(self, target: Timestep) -> list[Timestep]:
        return [o for (subject, sequence), buf in self.buffers.items()
                if subject == target.subject and sequence != target.sequence for o in buf.values()]

    def _push_other_sequences(self, ts: Timestep) -> list[ItemPlan]:
        """``input_pool="subject"``: ``ts`` (already buffered) releases one waiting target of another of
        its person's sequences, and is planned itself from those sequences or waits."""
        out = []
        for key, queue in self.waiting.items():
            if key[0] == ts.subject and key[1] != ts.sequence and queue:
                waited = queue.pop(0)
                plan = self._plan(waited, self._other_sequences(waited))
                if plan:
                    out.append(plan)
                break
        sources = self._other_sequences(ts)
        if sources:
            plan = self._plan(ts, sources)
            if plan:
                out.append(plan)
            return out
        queue = self.waiting.setdefault(ts.seq_key, [])
        queue[:] = [w for w in queue if w.frame != ts.frame]  # the frame came again (resampled): the newer copy waits
        queue.append(ts)
        while len(queue) > self.config.buffer_per_sequence:
            self.on_drop(queue.pop(0))
        return out

    def flush(self) -> None:
        """End of stream: waiting samples never found a partner."""
        for ts in [*self.pending.values(), *(w for queue in self.waiting.values() for w in queue)]:
            self.on_drop(ts)
        self.pending.clear()
        self.waiting.clear()
        self.buffers.clear()


def _decode_planar(out: np.ndarray, data: bytes, decoder: str, what: str) -> None:
    """Decode a colour image into the preallocated planar RGB view ``out`` (3, H, W) uint8."""
    if decoder == "opencv":
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"{what} does not decode")
        if img.shape != out.shape[1:] + (3,):
            raise ValueError(f"{what} is {img.shape[1]}x{img.shape[0]}, expected {out.shape[2]}x{out.shape[1]}")
        cv2.split(img, [out[2], out[1], out[0]])  # BGR → planar RGB in one deinterleave
        return
    img = decode_image(data, decoder)
    if img.shape != out.shape[1:] + (3,):
        raise ValueError(f"{what} is {img.shape[1]}x{img.shape[0]}, expected {out.shape[2]}x{out.shape[1]}")
    out[...] = np.moveaxis(img, -1, 0)


def _decode_gray(out: np.ndarray, data: bytes, decoder: str, what: str) -> None:
    """Decode a matte into the preallocated view ``out`` (H, W) uint8."""
    img = decode_alpha(data, decoder)
    if img.shape != out.shape:
        raise ValueError(f"{what} is {img.shape[1]}x{img.shape[0]}, expected {out.shape[1]}x{out.shape[0]}")
    out[...] = img


def decode_item(plan: ItemPlan, decoder: str) -> dict[str, Any]:
    """Decode just the chosen views of a plan.

    Images and mattes are decoded straight into one planar uint8 array per field ((N, 3, H, W)
    RGB and (N, H, W)); the prior maps stay as stored (float16 ``position`` (H, W, 3),
    ``confidence``, ``features``). :func:`~avat3r_core.dataset.batching.collate` widens and lays out everything in one pass
    into the batch, so an item is small while it waits in the shuffle buffer and nothing is
    copied twice.
    """
    t = plan.target
    H, W = t.height, t.width
    V, T = len(plan.inputs), len(plan.target_views)
    imgs = np.empty((V, 3, H, W), np.uint8)
    alphas = np.empty((V, H, W), np.uint8)
    pos, conf, feats = [], [], []
    have_feats = all(ts.has_features[c] for ts, c in plan.inputs)  # features only if every input has them
    w2c, K, frames, heads, codes = [], [], [], [], []
    for i, (ts, c) in enumerate(plan.inputs):
        s = ts.serials[c]
        if (ts.width, ts.height) != (W, H):
            raise ValueError(f"{ts.key}: input size {ts.width}x{ts.height} != target {W}x{H}")
        _decode_planar(imgs[i], ts.raw[f"cam_{s}.{ts.image_ext}"], decoder, f"{ts.key} cam {s} image")
        _decode_gray(alphas[i], ts.raw[f"cam_{s}.alpha.png"], decoder, f"{ts.key} cam {s} alpha")
        p = load_npz(ts.raw[f"cam_{s}.position.npz"])
        if p["position"].shape != (H, W, 3) or p["confidence"].shape != (H, W):
            raise ValueError(f"{ts.key} cam {s}: position map {p['position'].shape[:2]} != image {(H, W)}")
        pos.append(p["position"] if ts.head_to_world is None else to_head_frame(p["position"], ts.head_to_world))
        conf.append(p["confidence"])
        if have_feats:
            feats.append(load_npz(ts.raw[f"cam_{s}.features.npz"])["features"])
            if feats[-1].shape != feats[0].shape:
                raise ValueError(f"{ts.key} cam {s}: features {feats[-1].shape} != {feats[0].shape}")
        w2c.append(ts.world_to_cam[c])
        K.append(ts.K[c])
        frames.append(ts.frame)
        codes.append(ts.expression)
        heads.append(ts.head_to_world if ts.head_to_world is not None else np.eye(4))
    timgs = np.empty((T, 3, H, W), np.uint8)
    talphas = np.empty((T, H, W), np.uint8)
    for j, c in enumerate(plan.target_views):
        s = t.serials[c]
        _decode_planar(timgs[j], t.raw[f"cam_{s}.{t.image_ext}"], decoder, f"{t.key} cam {s} image")
        _decode_gray(talphas[j], t.raw[f"cam_{s}.alpha.png"], decoder, f"{t.key} cam {s} alpha")
    return {  # numpy: torch's intra-op threads only cost time on arrays this small
        "key": t.key,
        "images": imgs,  # (V, 3, H, W) uint8 RGB
        "alphas": alphas,  # (V, H, W) uint8
        "world_to_cam": np.stack(w2c),
        "K": np.stack(K),
        "position_maps": pos,  # V × (H, W, 3): as stored (float16) in the world frame, float32 in the head frame
        "confidence": conf,  # V × (H, W)
        "features": feats if have_feats else None,  # V × (C, h, w) or None
        "target_images": timgs,  # (T, 3, H, W) uint8 RGB
        "target_alphas": talphas,  # (T, H, W) uint8
        "target_world_to_cam": t.world_to_cam[plan.target_views],
        "target_K": t.K[plan.target_views],
        "target_head_to_world": t.head_to_world if t.head_to_world is not None else np.eye(4),
        "input_head_to_world": np.stack(heads),
        "expression": t.expression,
        "input_expressions": np.stack(codes),
        "input_frames": np.array(frames, dtype=np.int64),
        "target_frame": t.frame,
        "width": t.width,
        "height": t.height,
    }


# --------------------------------------------------------------------------- dataset
class _Counters:
    """Counters shared by the main process and its DataLoader workers (forked)."""

    def __init__(self) -> None:
        self._values = multiprocessing.Array("q", len(COUNTERS))

    def add(self, name: str, n: int = 1) -> None:
        with self._values.get_lock():
            self._values[COUNTERS.index(name)] += n

    def as_dict(self) -> dict[str, int]:
        with self._values.get_lock():
            return dict(zip(COUNTERS, self._values[:]))

    def reset(self) -> None:
        with self._values.get_lock():
            for i in range(len(COUNTERS)):
                self._values[i] = 0


def _quota(total: int, part: int, parts: int) -> int:
    return total // parts + (1 if part < total % parts else 0)


class Avat3rDataset(IterableDataset):
    """The per-worker pipeline (see the module docstring). Use :func:`make_loader` to batch it."""

    def __init__(self, shards: list[str], config: LoaderConfig, rank: int = 0, world_size: int = 1,
                 epoch_length: int | None = None, seed: int = 0):
        super().__init__()
        if not shards:
            raise ValueError("no shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if config.resampled and not epoch_length:
            raise ValueError("resampled=True needs an epoch_length (items per rank)")
        self.shards = sorted(shards)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.epoch_length, self.seed = epoch_length, seed
        self.epoch = 0
        self.counters = _Counters()
        self._warned = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # -- plumbing
    def _handler(self, exn: Exception) -> bool:
        self.counters.add("corrupt")
        if self._warned < 20:  # a broken shard can raise many times: say it, but not forever
            self._warned += 1
            log.warning("skipping corrupt data: %s", repr(exn)[:300])
        return True

    def shard_order(self) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def worker_shards(self, worker: int, num_workers: int) -> Iterator[str]:
        if not self.config.resampled:
            yield from self.shard_order()[self.rank::self.world_size][worker::num_workers]
            return
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}:shards")
        while True:
            yield self.shards[rng.randrange(len(self.shards))]

    def _sources(self, urls: Iterator[str]) -> Iterator[dict]:
        for url in urls:
            try:
                fs, path = storage.url_to_fs(url)
                stream = fs.open(path, "rb")
            except Exception as exn:  # noqa: BLE001
                self._handler(exn)
                continue
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()

    def samples(self, worker: int = 0, num_workers: int = 1) -> Iterator[Timestep]:
        """Complete, parsed samples of this rank × worker (no sampling)."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        files = tar_file_expander(self._sources(self.worker_shards(worker, num_workers)), handler=self._handler)
        for sample in group_by_keys(files, handler=self._handler):
            try:
                ts = parse_sample(sample, self.config.frame)
            except MissingHeadFrame:
                raise
            except Exception as exn:  # noqa: BLE001
                self._handler(exn)
                continue
            self.counters.add("samples")
            yield ts

    def items(self, worker: int = 0, num_workers: int = 1) -> Iterator[dict[str, Any]]:
        """Decoded training items of this rank × worker, shuffled, up to the worker's quota."""
        cfg = self.config
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}:views")
        sampler = Avat3rSampler(cfg, rng, on_drop=lambda ts: self.counters.add("no_partner"))
        quota = None
        if self.epoch_length:
            n_batches = math.ceil(self.epoch_length / cfg.batch_size)
            quota = _quota(n_batches, worker, num_workers) * cfg.batch_size
            if quota == 0:
                return

        def decoded() -> Iterator[dict[str, Any]]:
            since_item = 0
            for ts in self.samples(worker, num_workers):
                since_item += 1
                for plan in sampler.push(ts):
                    try:
                        item = decode_item(plan, cfg.decoder)
                    except Exception as exn:  # noqa: BLE001 - a view that does not decode
                        self._handler(exn)
                        continue
                    since_item = 0
                    yield item
                if cfg.resampled and since_item > 100 + 50 * len(self.shards):
                    raise RuntimeError(f"no usable item in the last {since_item} samples: are the shards all broken?")
            sampler.flush()

        produced = 0
        for item in _shuffled(decoded(), cfg.shuffle_buffer, rng):
            yield item
            self.counters.add("items")
            produced += 1
            if quota is not None and produced >= quota:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            return self.items(0, 1)
        import cv2

        cv2.setNumThreads(1)  # one decode thread per worker process; workers are the parallelism
        torch.set_num_threads(1)
        return self.items(info.id, info.num_workers)


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class Avat3rLoader:
    """A DataLoader over :class:`Avat3rDataset` yielding :class:`Avat3rBatch`; one epoch per ``iter``.

    ``set_epoch`` fixes the next epoch's number; otherwise epochs count up from 0.
    ``counters`` (``corrupt``, ``no_partner``, ``samples``, ``items``) accumulate over epochs in
    all worker processes.
    """

    def __init__(self, dataset: Avat3rDataset, num_workers: int = 0):
        self.dataset = dataset
        self.num_workers = num_workers
        self._next_epoch = 0
        self._lock = threading.Lock()

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    @property
    def counters(self) -> dict[str, int]:
        return self.dataset.counters.as_dict()

    @property
    def corrupt_count(self) -> int:
        return self.counters["corrupt"]

    def __len__(self) -> int:
        if not self.dataset.epoch_length:
            raise TypeError("without an epoch_length the number of batches is not known in advance")
        return math.ceil(self.dataset.epoch_length / self.dataset.config.batch_size)

    def __iter__(self) -> Iterator[Avat3rBatch]:
        with self._lock:
            self.dataset.set_epoch(self._next_epoch)
            self._next_epoch += 1
        if not self.num_workers:
            # in-process: a DataLoader would only add its per-batch bookkeeping to the same loop
            return self._batches(iter(self.dataset), self.dataset.config.batch_size)
        loader = DataLoader(self.dataset, batch_size=self.dataset.config.batch_size, collate_fn=collate_packed,
                            num_workers=self.num_workers, persistent_workers=False, prefetch_factor=4)
        return (packed.unpack() for packed in loader)

    @staticmethod
    def _batches(items: Iterator[dict[str, Any]], batch_size: int) -> Iterator[Avat3rBatch]:
        batch: list[dict[str, Any]] = []
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                yield collate(batch)
                batch = []
        if batch:  # like DataLoader's drop_last=False
            yield collate(batch)


def make_loader(shards: str | list[str], config: LoaderConfig, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, epoch_length: int | None = None, seed: int = 0,
                split: str = "train") -> Avat3rLoader:
    """The training/eval loader. ``shards``: a shards directory (its ``index.parquet``, ``split``)
    or a list of shard paths. ``epoch_length``: items per rank per epoch (required when
    ``config.resampled``; whole batches: rounded up to a multiple of the batch size)."""
    urls = shard_urls(shards, split) if isinstance(shards, str) else list(shards)
    return Avat3rLoader(Avat3rDataset(urls, config, rank, world_size, epoch_length, seed), num_workers)
