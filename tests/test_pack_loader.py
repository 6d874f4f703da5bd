"""Packing (WebDataset shards, index, verification, split) and the Avat3r loader, on tiny studio data."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from avat3r_core import storage
from avat3r_core.dataset.loader import Avat3rDataset, LoaderConfig, make_loader
from avat3r_core.geometry import farthest_views
from avat3r_core.dataset.pack import (PackConfig, build_samples, read_index, shard_stats, shard_urls, split_subjects,
                                      verify_shards)
from avat3r_core.formats.manifests import PRIORS_SCHEMA
from avat3r_core.ids import make_id

FEATURE_DIM = 8


def _rigid(rng) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    H = np.eye(4)
    H[:3, :3] = Rotation.from_rotvec(rng.normal(0, 0.3, 3)).as_matrix()
    H[:3, 3] = rng.normal(0, 0.05, 3)
    return H


def make_priors_and_tracking(frames_dir, tracking_dir, priors_dir, seed=0):
    """Small stand-ins for the priors and track stages' manifests (same schema, random values)."""
    rng = np.random.default_rng(seed)
    rows = storage.read_parquet(f"{frames_dir}/frames.parquet").to_pylist()
    tracking, priors = {}, []
    for r in rows:
        k = (r["subject"], r["sequence"], r["frame"])
        tracking.setdefault(k, {
            "id": make_id(*k), "subject": k[0], "sequence": k[1], "frame": k[2],
            "shape": rng.normal(size=10).tolist(), "expression": rng.normal(size=100).tolist(),
            "rotation": [0.0] * 3, "translation": [0.0] * 3, "jaw": [0.0] * 3, "neck": [0.0] * 3, "eyes": [0.0] * 6,
            "expression_code": rng.normal(size=135).tolist(), "residual_px": 0.5, "backend": "test",
            "head_to_world": _rigid(rng).reshape(-1).tolist()})
        H, W = r["height"], r["width"]
        buf = io.BytesIO()
        np.savez_compressed(buf, position=rng.normal(size=(H, W, 3)).astype(np.float16),
                            confidence=rng.uniform(size=(H, W)).astype(np.float16))
        pos_rel = f"position/{r['id']}.npz"
        storage.atomic_write_bytes(f"{priors_dir}/{pos_rel}", buf.getvalue())
        buf = io.BytesIO()
        np.savez_compressed(buf, features=rng.normal(size=(FEATURE_DIM, 2, 2)).astype(np.float16))
        feat_rel = f"features/{r['id']}.npz"
        storage.atomic_write_bytes(f"{priors_dir}/{feat_rel}", buf.getvalue())
        priors.append({"id": r["id"], "subject": r["subject"], "sequence": r["sequence"], "frame": r["frame"],
                       "camera": r["camera"], "position": pos_rel, "position_source": "ground_truth",
                       "features": feat_rel, "feature_source": "test", "feature_dim": FEATURE_DIM})
    storage.write_parquet(pa.Table.from_pylist(priors, schema=PRIORS_SCHEMA), f"{priors_dir}/priors.parquet")
    storage.write_parquet(pa.Table.from_pylist(list(tracking.values())), f"{tracking_dir}/tracking.parquet")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from avat3r_core.extract import ExtractConfig
    from avat3r_core.synthetic.studio import StudioConfig
    from stages.extract import run_extract
    from stages.pack import run_pack
    from stages.synth import run_synth

    root = tmp_path_factory.mktemp("pack")
    run_synth(StudioConfig(subjects=3, sequences=1, frames=4, cameras=4, resolution=96),
              str(root / "raw"), str(root / "gt"), str(root / "model"), executor="local")
    run_extract(ExtractConfig(resolution=32), str(root / "raw"), str(root / "frames"), executor="local")
    make_priors_and_tracking(root / "frames", root / "tracking", root / "priors")
    manifests = (str(root / "frames/frames.parquet"), str(root / "tracking/tracking.parquet"),
                 str(root / "priors/priors.parquet"))
    config = PackConfig(shard_size_mb=1.0, min_shards=4, seed=0)
    summary = run_pack(config, *manifests, str(root / "shards"), executor="local")
    return {"root": root, "shards": str(root / "shards"), "manifests": manifests, "config": config, "summary": summary}


def all_keys(shards):
    return sorted(k for r in read_index(shards) for k in r["keys"])


# --------------------------------------------------------------------------- packing
def test_pack_writes_index_and_keys_round_trip(data):
    shards = data["shards"]
    rows = read_index(shards)
    keys = all_keys(shards)
    assert len(keys) == 12 and len(set(keys)) == 12  # 3 subjects x 1 sequence x 4 frames
    assert all("." not in k for k in keys)
    stats = shard_stats(shards)
    for split in ("train", "val", "test"):  # 1 subject each, 4 samples → min_shards=4 shards
        assert stats[split]["shards"] == 4 and stats[split]["samples"] == 4
    report = verify_shards(shards)
    assert report["ok"], report["broken"]

    # multi-dot fields come back as one field; media bytes are the extracted files, not re-encoded
    from webdataset.tariterators import group_by_keys, tar_file_expander

    path = storage.join(shards, rows[0]["path"])
    with open(path, "rb") as f:
        sample = next(group_by_keys(tar_file_expander([{"url": path, "stream": f}])))
    assert sample["__key__"] == rows[0]["keys"][0]
    frames = storage.read_parquet(data["manifests"][0]).to_pylist()
    row = next(r for r in frames if make_id(r["subject"], r["sequence"], r["frame"]) == sample["__key__"])
    base = str(data["root"] / "frames")
    assert sample[f"cam_{row['camera']}.jpg"] == storage.read_bytes(f"{base}/{row['image']}")
    assert sample[f"cam_{row['camera']}.alpha.png"] == storage.read_bytes(f"{base}/{row['alpha']}")
    for field in ("camera.json", "position.npz", "features.npz"):
        assert f"cam_{row['camera']}.{field}" in sample
    assert {"expression.npy", "tracking.json", "meta.json"} <= set(sample)
    with tarfile.open(path) as tar:
        assert all(m.name.split(".", 1)[0] in rows[0]["keys"] for m in tar.getmembers())


def test_split_by_subject_is_disjoint_and_deterministic(data, tmp_path):
    subjects = [f"{i:03d}" for i in range(20)]
    a = split_subjects(subjects, (0.8, 0.1, 0.1), seed=3)
    b = split_subjects(random.Random(1).sample(subjects, 20), (0.8, 0.1, 0.1), seed=3)
    assert a == b
    assert sorted(a["train"] + a["val"] + a["test"]) == subjects
    assert [len(a[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    assert split_subjects(subjects, (0.8, 0.1, 0.1), seed=4) != a
    tiny = split_subjects(["001", "002", "003"], (0.8, 0.1, 0.1))
    assert all(len(v) == 1 for v in tiny.values())  # every split with a fraction gets a subject

    rows = read_index(data["shards"])
    by_split = {s: {x for r in rows if r["split"] == s for x in r["subjects"]} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    # the same inputs give byte-identical shards, and a rerun skips committed splits
    from stages.pack import run_pack

    again = run_pack(data["config"], *data["manifests"], str(tmp_path / "shards"), executor="local")
    assert [(r["path"], r["sha256"]) for r in read_index(str(tmp_path / "shards"))] == \
           [(r["path"], r["sha256"]) for r in rows]
    assert again.items_done == 3
    resumed = run_pack(data["config"], *data["manifests"], str(tmp_path / "shards"), executor="local")
    assert resumed.items_skipped == 3


def test_missing_tracking_is_excluded(data):
    frames, tracking, priors = data["manifests"]
    table = storage.read_parquet(tracking)
    samples, excluded = build_samples(frames, table.slice(1), priors)
    assert len(samples) == 11 and any(e["reason"].startswith("no tracking") for e in excluded)


# --------------------------------------------------------------------------- loader
def test_every_sample_read_exactly_once_across_ranks_and_workers(data):
    shards = shard_urls(data["shards"])  # all 12 shards (train+val+test) as one stream
    config = LoaderConfig(resampled=False, shuffle_buffer=0, target_views=4)
    for epoch in (0, 1):
        seen, targets, dropped = [], [], 0
        for rank in range(2):
            ds = Avat3rDataset(shards, config, rank=rank, world_size=2, seed=7)
            ds.set_epoch(epoch)
            for worker in range(2):
                got = [ts.key for ts in ds.samples(worker, 2)]
                assert got, "every rank x worker must get a shard"
                seen += got
                targets += [it["key"] for it in ds.items(worker, 2)]
            dropped += ds.counters.as_dict()["no_partner"]
        assert sorted(seen) == all_keys(data["shards"])
        # as targets too: each sample once, except those whose sequence this worker saw only once
        assert len(targets) == len(set(targets)) and len(targets) + dropped == 12


def test_inputs_come_from_other_timesteps(data):
    shards = shard_urls(data["shards"], "train")
    config = LoaderConfig(resampled=False, shuffle_buffer=0, target_views=8, input_views=4)
    items = list(Avat3rDataset(shards, config, seed=1).items())
    assert len(items) == 4
    for it in items:
        assert (it["input_frames"] != it["target_frame"]).all()
        centres = {tuple(np.round(np.linalg.inv(w)[:3, 3], 5)) for w in it["world_to_cam"]}
        assert len(centres) == 4  # k-farthest over a 4-camera rig: every camera once
        assert it["target_images"].shape[0] == 4  # T=8 but only 4 cameras
    # each input view carries its own timestep's code (the one that timestep has as a target)
    code_of = {(it["key"].rsplit("_", 1)[0], int(it["target_frame"])): it["expression"] for it in items}
    checked = 0
    for it in items:
        for frame, code in zip(it["input_frames"], it["input_expressions"]):
            ref = code_of.get((it["key"].rsplit("_", 1)[0], int(frame)))
            if ref is not None:
                np.testing.assert_array_equal(code, ref)
                checked += 1
            assert not np.array_equal(code, it["expression"])  # another timestep, another (random) code
    assert checked > 0
    ablation = LoaderConfig(resampled=False, shuffle_buffer=0, random_timestep_inputs=False)
    items = list(Avat3rDataset(shards, ablation, seed=1).items())
    assert len(items) == 4 and all((it["input_frames"] == it["target_frame"]).all() for it in items)


def test_input_contrast_picks_the_most_different_timesteps():
    """With input_contrast the inputs come from the half of the other timesteps whose expression is
    farthest from the target's; without it any buffered timestep may be picked; read_once turns it off."""
    from avat3r_core.dataset.loader import Avat3rSampler, Timestep, expression_distance

    def ts(frame, jaw):
        code = np.zeros(135, np.float32)
        code[0] = jaw  # one expression coefficient: the distance is |jaw_a - jaw_b|
        return Timestep(key=f"s_q_{frame}", subject="s", sequence="q", frame=frame, serials=["a", "b"],
                        image_ext="png", world_to_cam=np.tile(np.eye(4), (2, 1, 1)), K=np.tile(np.eye(3), (2, 1, 1)),
                        width=4, height=4, centers=np.array([[0.0, 0, 1], [1.0, 0, 1]]), has_position=[True, True],
                        has_features=[False, False], expression=code, raw={})

    frames = [ts(f, j) for f, j in enumerate([0.0, 0.1, 2.0, 2.1, 0.05])]  # the last is the target
    assert expression_distance(frames[2].expression, frames[4].expression) == pytest.approx(1.95)
    picked = {True: set(), False: set()}
    for contrast in (True, False):
        for seed in range(20):
            sampler = Avat3rSampler(LoaderConfig(input_views=2, input_contrast=contrast), random.Random(seed))
            plans = [p for f in frames for p in sampler.push(f)]
            picked[contrast] |= {t.frame for t, _ in plans[-1].inputs}
    assert picked[True] == {2, 3}  # the two timesteps with the open jaw
    assert picked[False] == {0, 1, 2, 3}
    assert not LoaderConfig(input_contrast=True).read_once().input_contrast


def _timestep_stream():
    """2 people x 2 sequences x 4 frames, 3 cameras (the third without a position map at frame 2),
    random centres and codes, in packing order."""
    from avat3r_core.dataset.loader import Timestep

    rng = np.random.default_rng(5)
    out = []
    for subject in ("p1", "p2"):
        for sequence in ("A", "B"):
            for frame in range(4):
                centers = rng.normal(size=(3, 3))
                out.append(Timestep(key=f"{subject}_{sequence}_{frame}", subject=subject, sequence=sequence,
                                    frame=frame, serials=["a", "b", "c"], image_ext="png",
                                    world_to_cam=np.tile(np.eye(4), (3, 1, 1)), K=np.tile(np.eye(3), (3, 1, 1)),
                                    width=4, height=4, centers=centers, has_position=[True, True, frame != 2],
                                    has_features=[False] * 3, expression=rng.normal(size=135).astype(np.float32),
                                    raw={}))
    return out


def _plans(config, seed=3):
    from avat3r_core.dataset.loader import Avat3rSampler

    dropped = []
    sampler = Avat3rSampler(config, random.Random(seed), on_drop=dropped.append)
    plans = [p for ts in _timestep_stream() for p in sampler.push(ts)]
    sampler.flush()
    return plans, dropped


@pytest.mark.parametrize("contrast, digest", [
    (False, "e987f744af43d6e6cbf41da6161a27db3942f3135aabe62b95dda8c1a0b3f6e6"),
    (True, "8886d08d5eda6a7f90e686eb5eaffd82b835c59b6917ce0f509759f882d1842f")])
def test_default_input_pool_chooses_exactly_as_before(contrast, digest):
    """The sequence pool (default) picks the same targets, views and inputs, in the same order and
    with the same random draws, as the sampler did before input_pool existed (digests recorded
    from that code on this stream)."""
    import hashlib

    config = LoaderConfig(input_views=3, target_views=2, buffer_per_sequence=3, max_sequences=2,
                          input_contrast=contrast)
    plans, _ = _plans(config)
    text = repr([(p.target.key, p.target_views, [(t.key, c) for t, c in p.inputs]) for p in plans])
    assert hashlib.sha256(text.encode()).hexdigest() == digest


def test_subject_input_pool_takes_inputs_from_the_persons_other_sequences():
    config = LoaderConfig(input_views=3, target_views=2, buffer_per_sequence=3, max_sequences=2,
                          input_pool="subject")
    plans, dropped = _plans(config)
    for p in plans:
        assert {t.subject for t, _ in p.inputs} == {p.target.subject}
        assert all(t.sequence != p.target.sequence for t, _ in p.inputs)
        assert all(t.has_position[c] for t, c in p.inputs)
    # sequence A waits for B: its last 3 (buffer_per_sequence) targets are released one per arriving
    # B timestep, the first is dropped; every B target finds A in the buffer
    targets = [p.target.key for p in plans]
    assert len(targets) == len(set(targets)) == 14
    assert sorted(ts.key for ts in dropped) == ["p1_A_0", "p2_A_0"]
    assert targets[:3] == ["p1_A_1", "p1_B_0", "p1_A_2"]
    # the plain pool on the same stream takes every input from the target's own sequence
    plain, _ = _plans(replace(config, input_pool="sequence"))
    assert all(t.sequence == p.target.sequence for p in plain for t, _ in p.inputs)
    assert LoaderConfig(input_pool="subject").read_once().input_pool == "sequence"
    with pytest.raises(ValueError, match="input_pool"):
        LoaderConfig(input_pool="person")
    with pytest.raises(ValueError, match="random_timestep_inputs"):
        LoaderConfig(input_pool="subject", random_timestep_inputs=False)


def test_head_frame_moves_cameras_and_points_together(data):
    """Head-frame items are the world-frame items seen from the head: every input point projects
    to the same camera coordinates, cameras are world_to_cam @ head_to_world, and the batch's
    target_head_to_world maps target cameras back to the world ones."""
    from avat3r_core.dataset.batching import collate
    from avat3r_core.dataset.loader import ItemPlan, decode_item, parse_sample

    ds = Avat3rDataset(shard_urls(data["shards"], "train"), LoaderConfig(resampled=False, shuffle_buffer=0,
                                                                           frame="world"))
    raws = [ts.raw for ts in ds.samples()][:2]
    worlds = [parse_sample(r, "world") for r in raws]
    heads = [parse_sample(r, "head") for r in raws]
    H = [h.head_to_world for h in heads]
    assert worlds[0].head_to_world is None and not np.allclose(H[0], np.eye(4))
    items = {}
    for name, (tgt, src) in (("world", worlds), ("head", heads)):
        items[name] = decode_item(ItemPlan(tgt, [0, 1], [(src, 0), (src, 2)]), "opencv")
    w, h = items["world"], items["head"]
    np.testing.assert_allclose(h["world_to_cam"], w["world_to_cam"] @ H[1], atol=1e-9)
    np.testing.assert_allclose(h["target_world_to_cam"], w["target_world_to_cam"] @ H[0], atol=1e-9)
    np.testing.assert_allclose(h["target_head_to_world"], H[0])
    np.testing.assert_array_equal(w["target_head_to_world"], np.eye(4))
    for v in range(2):  # every input point, in its camera's coordinates: the same from both frames
        in_cam = [it["world_to_cam"][v, :3, :3] @ it["position_maps"][v].reshape(-1, 3).astype(np.float64).T
                  + it["world_to_cam"][v, :3, 3:] for it in (w, h)]
        np.testing.assert_allclose(in_cam[1], in_cam[0], atol=1e-5)
    batch = collate([h])
    back = batch.target_cameras.world_to_cam.double() @ torch.linalg.inv(batch.target_head_to_world.double())[0]
    np.testing.assert_allclose(back.numpy(), w["target_world_to_cam"], atol=1e-5)
    np.testing.assert_allclose(batch.input_head_to_world[0].double().numpy(), np.stack([H[1], H[1]]), atol=1e-6)
    # evaluation compares rig cameras across timesteps in the world: head-frame centres map back exactly
    from avat3r_core.evaluation import _world_centers

    world_batch = collate([w])
    np.testing.assert_allclose(_world_centers(batch.cameras, batch.input_head_to_world, 1, 2).numpy(),
                               world_batch.cameras.centers.double().reshape(1, 2, 3).numpy(), atol=1e-5)


def test_head_frame_needs_head_poses(data, tmp_path):
    """Shards packed from tracking without head poses stop a head-frame reader with the fix named."""
    from avat3r_core.dataset.loader import MissingHeadFrame
    from stages.pack import run_pack

    frames, tracking, priors = data["manifests"]
    old = tmp_path / "tracking.parquet"
    storage.write_parquet(storage.read_parquet(tracking).drop(["head_to_world"]), str(old))
    run_pack(data["config"], frames, str(old), priors, str(tmp_path / "shards"), executor="local")
    with pytest.raises(MissingHeadFrame, match="re-run track and pack"):
        list(make_loader(str(tmp_path / "shards"), LoaderConfig(resampled=False, shuffle_buffer=0, target_views=2)))
    assert len(list(make_loader(str(tmp_path / "shards"), LoaderConfig(resampled=False, shuffle_buffer=0,
                                                                       target_views=2, frame="world")))) > 0


def test_head_frame_rejects_a_non_rigid_head_pose():
    """A sample's head_to_world must be a rigid transform; the error names the sample."""
    import json

    from avat3r_core.dataset.loader import head_to_world_of

    H = np.eye(4)
    H[:3, 3] = (0.1, 0.2, 0.3)
    np.testing.assert_array_equal(head_to_world_of({"__key__": "a", "tracking.json": json.dumps(
        {"head_to_world": H.ravel().tolist()})}), H)
    H[:3, :3] *= 1.1
    with pytest.raises(ValueError, match="'001_s_000003'.*not a rigid transform"):
        head_to_world_of({"__key__": "001_s_000003", "tracking.json": json.dumps({"head_to_world": H.ravel().tolist()})})


def test_farthest_views_spreads():
    pts = np.stack([np.arange(11.0), np.zeros(11), np.zeros(11)], 1)
    for seed in range(5):
        picks = farthest_views(pts, 2, random.Random(seed))
        first = picks[0]
        assert picks[1] == (0 if first > 5 else 10)
    # the same camera at two timesteps: the tie goes to an unused timestep
    pts2 = np.array([[0, 0, 0], [1, 0, 0], [1, 0, 0]], float)
    for seed in range(5):
        picks = farthest_views(pts2, 2, random.Random(seed), groups=np.array([5, 5, 6]))
        if picks[0] == 0:
            assert picks[1] == 2


def test_batch_shapes(data):
    config = LoaderConfig(batch_size=2, target_views=3, input_views=4, resampled=True)
    loader = make_loader(data["shards"], config, epoch_length=4, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    b = batches[0]
    B, V, T, H = 2, 4, 3, 32
    assert b.images.shape == (B, V, 3, H, H) and b.alphas.shape == (B, V, 1, H, H)
    assert len(b.cameras) == B * V and (b.cameras.width, b.cameras.height) == (H, H)
    assert b.position_maps.shape == (B, V, 3, H, H) and b.confidence.shape == (B, V, H, H)
    assert b.features.shape == (B, V, FEATURE_DIM, 2, 2)
    assert b.target_images.shape == (B, T, 3, H, H) and b.target_alphas.shape == (B, T, 1, H, H)
    assert len(b.target_cameras) == B * T and b.expression.shape == (B, 135)
    assert b.input_frames.shape == (B, V) and b.target_frames.shape == (B,) and len(b.keys) == B
    assert b.input_expressions.shape == (B, V, 135)
    assert b.is_finite() and 0 <= float(b.images.min()) and float(b.images.max()) <= 1
    assert all("." not in k for k in b.keys)


def test_resampled_epoch_length_with_worker_processes(data):
    config = LoaderConfig(batch_size=1, target_views=2, resampled=True, shuffle_buffer=2)
    loader = make_loader(data["shards"], config, rank=1, world_size=2, num_workers=2, epoch_length=3, seed=0)
    assert sum(1 for _ in loader) == 3
    assert loader.counters["items"] == 3 and loader.counters["samples"] >= 3  # counted inside the workers


def test_truncated_shard_is_skipped_counted_and_named(data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    rows = read_index(str(shards))
    victim = rows[0]["path"]
    blob = (shards / victim).read_bytes()
    (shards / victim).write_bytes(blob[: len(blob) // 2])
    report = verify_shards(str(shards))
    assert not report["ok"] and list(report["broken"]) == [victim]

    config = LoaderConfig(resampled=False, shuffle_buffer=0, target_views=2)
    ds = Avat3rDataset(shard_urls(str(shards)), config)
    keys = [ts.key for ts in ds.samples()]
    assert ds.counters.as_dict()["corrupt"] >= 1
    good = sorted(k for r in rows[1:] for k in r["keys"])
    assert set(good) <= set(keys) and len(keys) == len(set(keys)) < 12
    # resampled training over the broken set still ends with its fixed length
    loader = make_loader(str(shards), LoaderConfig(batch_size=1, target_views=2, shuffle_buffer=0),
                         epoch_length=6, seed=3)
    assert sum(1 for _ in loader) == 6


def test_training_batches_carry_mouth_weights_only_when_asked(data, tmp_path):
    from avat3r_core.synthetic.studio import write_face_model
    from stages.train import ShardSource, TrainDataConfig

    plain = TrainDataConfig(loader=LoaderConfig(target_views=2), epoch_length=2)
    batches = list(ShardSource(data["shards"], plain, 1)(0, 1, 0))
    assert len(batches) == 2 and all(b.target_weights is None for b in batches)
    with pytest.raises(ValueError, match="face_model"):
        replace(plain, mouth_weight=4.0).mouth_weights()
    with pytest.raises(ValueError, match="frame"):
        TrainDataConfig(loader=LoaderConfig(frame="world"), mouth_weight=4.0)
    with pytest.raises(ValueError, match="mouth_weight"):
        TrainDataConfig(mouth_weight=-1.0)
    model, embedding = write_face_model(str(tmp_path / "head"), seed=0)
    weighted = replace(plain, mouth_weight=4.0, face_model=model, landmark_embedding=embedding)
    source = ShardSource(data["shards"], weighted, 1)
    for b, ref in zip(source(0, 1, 0), batches):
        assert b.keys == ref.keys and b.target_weights.shape == b.target_alphas.shape
        assert set(b.target_weights.unique().tolist()) <= {1.0, 5.0}
    val = ShardSource(data["shards"], replace(weighted, val_samples=1), 1, validation=True)
    assert all(b.target_weights is None for b in val())  # validation scores the plain view
