"""Packing: frames + priors + tracking → WebDataset shards split by subject, and their index.

One sample = one (subject, sequence, frame) with every camera of that timestep. Its key is
``make_id(subject, sequence, frame)`` (``<pid>_<seq>_<frame:06d>``, no dots); its members are

* per camera ``cam_<serial>.jpg|png`` (the extracted bytes, never re-encoded),
  ``cam_<serial>.alpha.png``, ``cam_<serial>.camera.json`` (crop camera: ``world_to_cam`` 16 and
  ``K`` 9 row-major floats, ``width``, ``height``), ``cam_<serial>.position.npz`` (``position``
  (H, W, 3) + ``confidence`` (H, W), float16) and ``cam_<serial>.features.npz`` when present;
* ``expression.npy`` (135 float32), ``tracking.json`` (FLAME parameters of the frame and its ``head_to_world``, the frame the loader works in),
  ``meta.json`` (subject, sequence, frame, camera serials, image extension, prior sources,
  feature_dim).

WebDataset splits a member name at its *first* dot: ``<key>.cam_222200037.alpha.png`` is the
sample ``<key>``, field ``cam_222200037.alpha.png``; serials and field names are lower-case
``[a-z0-9_]`` so the reader's lower-casing of fields changes nothing.

Everything here is plain Python and testable without Ray; ``stages/pack.py`` runs one split per
item.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import numpy as np
import pyarrow as pa

from avat3r_core import storage
from avat3r_core.config import Presets
from avat3r_core.ids import make_id
from avat3r_core.tracking import EXPRESSION_DIM, nonfinite_value

log = logging.getLogger("avat3r.dataset")

SPLITS = ("train", "val", "test")
INDEX_NAME = "index"  # shards/index.parquet
#: tracking columns that are bookkeeping, not FLAME parameters (everything else goes to tracking.json)
_TRACKING_BOOKKEEPING = {"id", "subject", "sequence", "frame", "expression_code", "item_id"}
_SERIAL_OK = re.compile(r"^[a-z0-9-]+$")

#: ``shards/index.parquet``: one row per shard.
INDEX_SCHEMA = pa.schema([
    ("id", pa.string()),  # <split>_<shard:06d>
    ("split", pa.string()),
    ("path", pa.string()),  # relative to the index's directory
    ("keys", pa.list_(pa.string())),
    ("subjects", pa.list_(pa.string())),
    ("count", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
])


@dataclass
class PackConfig(Presets):
    PRESETS: ClassVar[dict] = {
        "tiny": dict(shard_size_mb=1.0, min_shards=4),
        "demo": dict(shard_size_mb=64.0, min_shards=4),
        "paper": dict(shard_size_mb=256.0, min_shards=64),  # 8 GPUs x 8 workers each get a shard
    }

    shard_size_mb: float = 256.0  # target shard size (a shard closes once it would exceed this)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test by subject
    seed: int = 0  # the subject → split assignment depends only on this and the subject ids
    min_shards: int = 8  # per split (capped by its sample count): every node x worker gets one
    reencode_images: bool = False  # kept off: images are packed as extracted
    require_priors: bool = True  # a camera without a priors row is left out of its sample

    def __post_init__(self) -> None:
        self.split_fractions = tuple(float(f) for f in self.split_fractions)
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions) or sum(self.split_fractions) <= 0:
            raise ValueError(f"split_fractions must be 3 non-negative numbers (train, val, test), got {self.split_fractions}")
        if self.shard_size_mb <= 0 or self.min_shards < 1:
            raise ValueError("shard_size_mb > 0 and min_shards ≥ 1 are required")
        if self.reencode_images:
            raise ValueError("reencode_images=True is not supported: shards hold the extracted bytes")

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_size_mb * 1024 * 1024)


# --------------------------------------------------------------------------- split
def _subject_rank(seed: int, subject: str) -> str:
    return hashlib.sha256(f"{seed}:{subject}".encode()).hexdigest()


def split_subjects(subjects: Iterable[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> dict[str, list[str]]:
    """Assign subjects to train/val/test: disjoint, deterministic in (seed, subject ids).

    Subjects are ordered by a seeded hash of their id (independent of input order), then cut by
    the fractions (rounded); a split with a positive fraction gets at least one subject when
    there are enough subjects, taken from the largest split.
    """
    subjects = sorted(set(subjects), key=lambda s: (_subject_rank(seed, s), s))
    n = len(subjects)
    total = sum(fractions)
    counts = [int(round(n * f / total)) for f in fractions]
    counts[0] = n - counts[1] - counts[2]
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    if n >= len(wanted):
        for i in wanted:
            while counts[i] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[i] += 1
    while counts[0] < 0:  # rounding overshoot
        j = max((1, 2), key=lambda j: counts[j])
        counts[j] -= 1
        counts[0] += 1
    out, start = {}, 0
    for name, c in zip(SPLITS, counts):
        out[name] = sorted(subjects[start:start + c])
        start += c
    return out


# --------------------------------------------------------------------------- sample specs
@dataclass
class CameraSpec:
    serial: str
    image: str  # absolute path/URI
    alpha: str
    camera: dict  # world_to_cam, K, width, height
    position: str | None
    features: str | None


@dataclass
class SampleSpec:
    key: str
    subject: str
    sequence: str
    frame: int
    cameras: list[CameraSpec]
    expression: list[float]
    tracking: dict
    position_source: str = ""
    feature_source: str = "none"
    feature_dim: int = 0


@dataclass
class PackPlan:
    samples: dict[str, list[SampleSpec]]  # split → samples in write order
    splits: dict[str, list[str]]  # split → subjects
    excluded: list[dict] = field(default_factory=list)  # {id, reason}


def _base(manifest: str) -> str:
    return manifest.rsplit("/", 1)[0] if "/" in manifest else "."


def _rows(table_or_path: Any) -> tuple[list[dict], str]:
    if isinstance(table_or_path, pa.Table):
        return table_or_path.to_pylist(), "."
    path = str(table_or_path)
    return storage.read_parquet(path).to_pylist(), _base(path)


def _resolve(base: str, rel: str | None) -> str | None:
    if not rel:
        return None
    if "://" in rel or rel.startswith("/"):
        return rel
    return storage.join(base, rel)


def nonfinite_arrays(data: bytes) -> list[str]:
    """Names of the arrays of an ``.npz`` (bytes) that hold NaN or Inf."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return [k for k in z.files if np.issubdtype(z[k].dtype, np.floating) and not np.isfinite(z[k]).all()]


def _nonfinite_map(prior: dict, priors_base: str) -> str | None:
    """Why a camera's position / feature map cannot be packed (NaN or Inf in it), or None. A
    shard holds what training and evaluation trust, so maps are read and checked here."""
    for column in ("position", "features"):
        path = _resolve(priors_base, prior.get(column))
        if path:
            bad = nonfinite_arrays(storage.read_bytes(path))
            if bad:
                return f"{column} map {path} holds NaN or Inf in {', '.join(bad)}"
    return None


# Long (~85 lines): one pass joining three manifests, each exclusion recorded where it is decided;
# split into helpers it would pass the half-built indices around.
def build_samples(frames_manifest: str, tracking_manifest: str, priors_manifest: str | None,
                  subjects: Iterable[str] | None = None, require_priors: bool = True
                  ) -> tuple[list[SampleSpec], list[dict]]:
    """Join the three manifests into one spec per (subject, sequence, frame), sorted by key.

    Returns ``(samples, excluded)``; ``excluded`` lists what was left out and why (frames without
    tracking, cameras without priors, inconsistent image sizes).
    """
    wanted = set(subjects) if subjects is not None else None
    frame_rows, frames_base = _rows(frames_manifest)
    tracking_rows, _ = _rows(tracking_manifest)
    priors_rows, priors_base = _rows(priors_manifest) if priors_manifest else ([], ".")
    tracking = {(r["subject"], r["sequence"], int(r["frame"])): r for r in tracking_rows
                if wanted is None or r["subject"] in wanted}
    priors = {r["id"]: r for r in priors_rows if wanted is None or r["subject"] in wanted}

    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in frame_rows:
        if wanted is None or r["subject"] in wanted:
            groups[(r["subject"], r["sequence"], int(r["frame"]))].append(r)

    samples, excluded = [], []
    for (subject, sequence, frame), rows in groups.items():
        key = make_id(subject, sequence, frame)
        track = tracking.get((subject, sequence, frame))
        if track is None:
            excluded.append({"id": key, "reason": "no tracking row for this frame"})
            continue
        code = track.get("expression_code")
        if code is None or len(code) != EXPRESSION_DIM:
            excluded.append({"id": key, "reason": f"expression_code missing or not {EXPRESSION_DIM}-d"})
            continue
        bad = nonfinite_value(track)
        if bad is not None:
            excluded.append({"id": key, "reason": f"tracking {bad} holds NaN or Inf"})
            continue
        cams, pos_src, feat_src, feat_dim = [], set(), set(), set()
        for r in sorted(rows, key=lambda r: r["camera"]):
            serial = str(r["camera"]).lower()
            if not _SERIAL_OK.match(serial):
                excluded.append({"id": r["id"], "reason": f"camera serial {r['camera']!r} is not [a-z0-9-]"})
                continue
            prior = priors.get(r["id"])
            if prior is None and require_priors:
                excluded.append({"id": r["id"], "reason": "no priors row for this camera"})
                continue
            bad_map = _nonfinite_map(prior, priors_base) if prior is not None else None
            if bad_map:
                excluded.append({"id": r["id"], "reason": bad_map})
                continue
            if prior is not None:
                pos_src.add(prior.get("position_source") or "")
                if prior.get("features"):
                    feat_src.add(prior.get("feature_source") or "")
                    feat_dim.add(int(prior.get("feature_dim") or 0))
            cams.append(CameraSpec(
                serial=serial, image=_resolve(frames_base, r["image"]), alpha=_resolve(frames_base, r["alpha"]),
                camera={"world_to_cam": [float(v) for v in r["world_to_cam"]], "K": [float(v) for v in r["K"]],
                        "width": int(r["width"]), "height": int(r["height"])},
                position=_resolve(priors_base, prior.get("position")) if prior else None,
                features=_resolve(priors_base, prior.get("features")) if prior else None))
        sizes = {(c.camera["width"], c.camera["height"]) for c in cams}
        if not cams:
            excluded.append({"id": key, "reason": "no usable camera"})
            continue
        if len(sizes) != 1:
            excluded.append({"id": key, "reason": f"cameras have different crop sizes {sorted(sizes)}"})
            continue
        if len({c.image.rsplit('.', 1)[-1].lower() for c in cams}) != 1:
            excluded.append({"id": key, "reason": "cameras mix image formats"})
            continue
        if len(feat_dim) > 1:
            excluded.append({"id": key, "reason": f"cameras have different feature dims {sorted(feat_dim)}"})
            continue
        params = {k: v for k, v in track.items() if k not in _TRACKING_BOOKKEEPING}
        samples.append(SampleSpec(
            key=key, subject=subject, sequence=sequence, frame=frame, cameras=cams,
            expression=[float(v) for v in code], tracking=params,
            position_source=",".join(sorted(s for s in pos_src if s)),
            feature_source=",".join(sorted(s for s in feat_src if s)) or "none",
            feature_dim=next(iter(feat_dim)) if feat_dim else 0))
    samples.sort(key=lambda s: (s.subject, s.sequence, s.frame))
    return samples, excluded


def plan_pack(config: PackConfig, frames_manifest: str, tracking_manifest: str,
              priors_manifest: str | None) -> PackPlan:
    """All samples, split by subject, in write order (subject, sequence, frame)."""
    samples, excluded = build_samples(frames_manifest, tracking_manifest, priors_manifest,
                                      require_priors=config.require_priors)
    splits = split_subjects({s.subject for s in samples}, config.split_fractions, config.seed)
    where = {subj: name for name, subjs in splits.items() for subj in subjs}
    by_split: dict[str, list[SampleSpec]] = {name: [] for name in SPLITS}
    for s in samples:
        by_split[where[s.subject]].append(s)
    return PackPlan(by_split, splits, excluded)


# --------------------------------------------------------------------------- encoding
def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_sample(spec: SampleSpec) -> dict[str, bytes | str]:
    """The WebDataset sample dict (``__key__`` + fields → bytes) of one spec; media copied as is."""
    ext = spec.cameras[0].image.rsplit(".", 1)[-1].lower()
    ext = "jpg" if ext == "jpeg" else ext
    sample: dict[str, Any] = {"__key__": spec.key}
    for cam in spec.cameras:
        prefix = f"cam_{cam.serial}"
        sample[f"{prefix}.{ext}"] = storage.read_bytes(cam.image)
        sample[f"{prefix}.alpha.png"] = storage.read_bytes(cam.alpha)
        sample[f"{prefix}.camera.json"] = _json(cam.camera)
        if cam.position:
            sample[f"{prefix}.position.npz"] = storage.read_bytes(cam.position)
        if cam.features:
            sample[f"{prefix}.features.npz"] = storage.read_bytes(cam.features)
    sample["expression.npy"] = npy_bytes(np.asarray(spec.expression, dtype=np.float32))
    sample["tracking.json"] = _json(spec.tracking)
    sample["meta.json"] = _json({
        "key": spec.key, "subject": spec.subject, "sequence": spec.sequence, "frame": spec.frame,
        "cameras": [c.serial for c in spec.cameras], "image_ext": ext,
        "has_position": [bool(c.position) for c in spec.cameras],
        "has_features": [bool(c.features) for c in spec.cameras],
        "position_source": spec.position_source, "feature_source": spec.feature_source,
        "feature_dim": spec.feature_dim,
    })
    return sample


def sample_fields(meta: dict) -> list[str]:
    """The fields a complete sample must have, from its ``meta.json``."""
    ext = meta["image_ext"]
    out = ["expression.npy", "tracking.json", "meta.json"]
    for i, serial in enumerate(meta["cameras"]):
        out += [f"cam_{serial}.{ext}", f"cam_{serial}.alpha.png", f"cam_{serial}.camera.json"]
        if meta["has_position"][i]:
            out.append(f"cam_{serial}.position.npz")
        if meta["has_features"][i]:
            out.append(f"cam_{serial}.features.npz")
    return out


# --------------------------------------------------------------------------- writing
def shard_groups(sizes: list[int], config: PackConfig) -> list[tuple[int, int]]:
    """Contiguous [start, stop) sample ranges, one per shard.

    The count is the larger of what the target size needs and ``min_shards`` (capped by the
    number of samples); samples are spread evenly by count so workers get similar loads.
    """
    n = len(sizes)
    if n == 0:
        return []
    by_size = math.ceil(sum(sizes) / config.shard_bytes)
    count = min(n, max(by_size, config.min_shards))
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _size(path: str) -> int:
    fs, p = storage.url_to_fs(path)
    return int(fs.size(p))


def clear_split(shards_dir: str, split: str) -> None:
    """Remove a split's shards (a rerun of an uncommitted split starts clean)."""
    for path in storage.list_files(shards_dir, ".tar"):
        if re.fullmatch(rf"{split}-\d{{6}}\.tar", path.rsplit("/", 1)[-1]):
            storage.remove(path)


def write_split(samples: list[SampleSpec], split: str, shards_dir: str, config: PackConfig) -> list[dict]:
    """Write one split's samples with ``webdataset.ShardWriter``; returns one index row per shard.

    Tar headers are deterministic (fixed mtime, sorted members), so the same inputs give
    byte-identical shards and checksums.
    """
    import webdataset as wds

    clear_split(shards_dir, split)
    storage.makedirs(shards_dir)
    if not samples:
        return []
    # sizes for planning: media bytes are known from the files, metadata is small
    sizes = [sum(_size(p) for c in s.cameras for p in (c.image, c.alpha, c.position, c.features) if p) + 4096
             for s in samples]
    groups = shard_groups(sizes, config)
    handles: dict[str, Any] = {}

    def opener(fname: str):
        fs, p = storage.url_to_fs(fname)
        handles[fname] = fs.open(p, "wb")
        return handles[fname]

    def closer(fname: str) -> None:
        handles.pop(fname).close()

    pattern = storage.join(shards_dir, f"{split}-%06d.tar")
    rows: list[dict] = []
    writer = wds.ShardWriter(pattern, maxcount=10**12, maxsize=float("inf"), verbose=0,
                             opener=opener, post=closer, encoder=False, mtime=0.0)
    try:
        for shard_idx, (a, b) in enumerate(groups):
            if shard_idx:  # the writer opened shard 0 itself; one planned group per shard
                writer.next_stream()
            for spec in samples[a:b]:
                writer.write(encode_sample(spec))
            rows.append({"id": make_id(split, shard_idx), "split": split,
                         "path": writer.fname.rsplit("/", 1)[-1],
                         "keys": [s.key for s in samples[a:b]],
                         "subjects": sorted({s.subject for s in samples[a:b]}),
                         "count": b - a})
    finally:
        writer.close()
    for row in rows:
        path = storage.join(shards_dir, row["path"])
        row["bytes"] = _size(path)
        row["sha256"] = storage.sha256(path)
    return rows


def write_index(rows: list[dict], shards_dir: str) -> str:
    uri = storage.join(shards_dir, f"{INDEX_NAME}.parquet")
    rows = sorted(rows, key=lambda r: (SPLITS.index(r["split"]) if r["split"] in SPLITS else 9, r["id"]))
    storage.write_parquet(pa.Table.from_pylist([{k: r[k] for k in INDEX_SCHEMA.names} for r in rows],
                                               schema=INDEX_SCHEMA), uri)
    return uri


def pack(config: PackConfig, frames_manifest: str, tracking_manifest: str, priors_manifest: str | None,
         shards_dir: str) -> str:
    """Plain (no Ray) packing of every split; returns the index path. The stage is resumable."""
    plan = plan_pack(config, frames_manifest, tracking_manifest, priors_manifest)
    rows = []
    for split in SPLITS:
        rows += write_split(plan.samples[split], split, shards_dir, config)
    return write_index(rows, shards_dir)


# --------------------------------------------------------------------------- reading back
def read_index(shards_dir: str) -> list[dict]:
    return storage.read_parquet(storage.join(shards_dir, f"{INDEX_NAME}.parquet")).to_pylist()


def shard_urls(shards_dir: str, split: str | None = None) -> list[str]:
    """Shard paths of a split (all splits when ``None``) from the index, in index order."""
    return [storage.join(shards_dir, r["path"]) for r in read_index(shards_dir)
            if split is None or r["split"] == split]


def _decode_member(name: str, data: bytes) -> None:
    """Raise if a member does not decode (images fully decoded, arrays loaded, JSON parsed)."""
    import cv2

    ext = name.rsplit(".", 1)[-1]
    if ext in ("jpg", "jpeg", "png"):
        if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None:
            raise ValueError("image does not decode")
    elif ext == "npz":
        bad = nonfinite_arrays(data)
        if bad:
            raise ValueError(f"array {bad[0]!r} has non-finite values")
    elif ext == "npy":
        np.load(io.BytesIO(data), allow_pickle=False)
    elif ext == "json":
        json.loads(data)


def verify_shard(path: str, row: dict | None = None) -> list[str]:
    """Problems of one shard (empty list: it is good)."""
    problems = []
    try:
        if row is not None:
            if _size(path) != row["bytes"]:
                problems.append(f"size {_size(path)} != index {row['bytes']}")
            if storage.sha256(path) != row["sha256"]:
                problems.append("sha256 differs from the index")
        fs, p = storage.url_to_fs(path)
        keys: list[str] = []
        members: dict[str, dict[str, bytes]] = {}
        with fs.open(p, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, _, fld = info.name.partition(".")
                if not fld:
                    problems.append(f"member {info.name!r} has no field")
                    continue
                if key not in members:
                    keys.append(key)
                    members[key] = {}
                data = tar.extractfile(info).read()
                try:
                    _decode_member(fld, data)
                except Exception as exc:  # noqa: BLE001 - a report, not a crash
                    problems.append(f"{info.name}: {type(exc).__name__}: {exc}")
                members[key][fld] = data
        for key in keys:
            fields = members[key]
            if "meta.json" not in fields:
                problems.append(f"sample {key}: no meta.json")
                continue
            missing = sorted(set(sample_fields(json.loads(fields["meta.json"]))) - set(fields))
            if missing:
                problems.append(f"sample {key}: missing {missing[:4]}")
        if row is not None:
            if len(keys) != row["count"]:
                problems.append(f"{len(keys)} samples, index says {row['count']}")
            if keys != list(row["keys"]):
                problems.append("sample keys differ from the index")
    except Exception as exc:  # noqa: BLE001 - truncated / unreadable tar
        problems.append(f"unreadable: {type(exc).__name__}: {exc}")
    return problems


def check_shards(shards_dir: str, split: str | None = None) -> dict[str, list[str]]:
    """The index's shards (of ``split``, all when None) that are not as the index says: shard
    path (as in the index) → problems (missing file, size, checksum, count, keys, members that
    do not decode or hold NaN/Inf). Readers that trust the index (evaluation, stats) call this."""
    broken: dict[str, list[str]] = {}
    for row in read_index(shards_dir):
        if split is not None and row["split"] != split:
            continue
        path = storage.join(shards_dir, row["path"])
        problems = verify_shard(path, row) if storage.exists(path) else ["missing file"]
        if problems:
            broken[row["path"]] = problems
    return broken


def verify_shards(shards_dir: str) -> dict:
    """Re-read every shard of the index: checksum, size, count, keys, every member decodes.

    Returns ``{"ok": bool, "shards": n, "samples": n, "broken": {path: [problems]}}``.
    """
    rows = read_index(shards_dir)
    broken = check_shards(shards_dir)
    return {"ok": not broken, "shards": len(rows), "samples": sum(r["count"] for r in rows), "broken": broken}


def shard_stats(shards_dir: str, check: bool = True) -> dict:
    """Per split: shards, samples, subjects, bytes, and min/mean/max shard size, as the index
    says, and with ``check`` how many shards and samples are actually readable
    (:func:`check_shards`: each shard is re-read), with the problems of the others."""
    out: dict[str, Any] = {}
    rows = read_index(shards_dir)
    broken = check_shards(shards_dir) if check else {}
    for split in SPLITS:
        mine = [r for r in rows if r["split"] == split]
        sizes = [r["bytes"] for r in mine]
        good = [r for r in mine if r["path"] not in broken]
        out[split] = {
            "shards": len(mine),
            "samples": sum(r["count"] for r in mine),
            "subjects": len({s for r in mine for s in r["subjects"]}),
            "bytes": sum(sizes),
            "shard_bytes_min": min(sizes) if sizes else 0,
            "shard_bytes_mean": float(np.mean(sizes)) if sizes else 0.0,
            "shard_bytes_max": max(sizes) if sizes else 0,
        }
        if check:
            out[split].update(readable_shards=len(good), readable_samples=sum(r["count"] for r in good),
                              unreadable={r["path"]: broken[r["path"]] for r in mine if r["path"] in broken})
    keys = ("shards", "samples", "subjects", "bytes") + (("readable_shards", "readable_samples") if check else ())
    out["total"] = {k: sum(out[s][k] for s in SPLITS) for k in keys}
    return out

