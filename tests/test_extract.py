"""Frame extraction on the studio: exact crop cameras, mattes, resume, and every bad input named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from avat3r_core.extract import ExtractConfig, background_matte, crop_image, select_frames
from avat3r_core.formats.manifests import FRAMES_SCHEMA, cameras_from_rows
from avat3r_core.synthetic.studio import StudioConfig
from avat3r_core.video import encode_video, read_frames
from stages.extract import ExtractStage, HeadCenterStage, run_extract
from stages.synth import run_synth

STUDIO = dict(subjects=2, sequences=1, frames=4, cameras=4, resolution=128, seed=11)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    run_synth(StudioConfig(**STUDIO), str(root / "raw"), str(root / "gt"), str(root / "model"), executor="local")
    return root


def extract(capture_root, out, **config):
    return run_extract(ExtractConfig(**{"resolution": 64, **config}), str(capture_root), str(out), executor="local")


def test_select_frames():
    assert select_frames(10, ExtractConfig(frame_step=3)) == [0, 3, 6, 9]
    assert select_frames(10, ExtractConfig(frames_per_sequence=3)) == [0, 4, 9]
    assert select_frames(10, ExtractConfig(frame_list=(7, 2))) == [2, 7]
    with pytest.raises(ValueError, match="outside"):
        select_frames(5, ExtractConfig(frame_list=(9,)))


def test_crop_cameras_reproject_ground_truth_landmarks(capture, tmp_path):
    centers, frames = extract(capture / "raw", tmp_path / "frames")
    assert centers.items_failed == 0 and frames.items_failed == 0
    table = pq.read_table(frames.manifest)
    assert table.schema.names[: len(FRAMES_SCHEMA)] == FRAMES_SCHEMA.names
    rows = table.to_pylist()
    assert len(rows) == 2 * 4 * 4 and all(r["color_corrected"] and r["alpha_source"] == "alpha_video" for r in rows)
    from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding

    layer = FlameLayer(load_flame_model(capture / "model/head_model.pkl"),
                       landmarks=load_landmark_embedding(capture / "model/head_landmark_embedding.pkl"), dtype=torch.float64)
    errors = []
    for pid in ("001", "002"):
        gt = np.load(capture / f"gt/{pid}/sequences/EXP-1-head/flame_params.npz")
        lm2d = np.load(capture / f"gt/{pid}/sequences/EXP-1-head/landmarks2d.npz")
        serials = [str(s) for s in lm2d["serials"]]
        for row in (r for r in rows if r["subject"] == pid):
            t, c = row["frame"], serials.index(row["camera"])
            with torch.no_grad():
                out = layer(**{k: torch.tensor(gt[v][t:t + 1] if v != "shape" else gt[v], dtype=torch.float64)
                               for k, v in dict(shape="shape", expr="expression", rotation="rotation", neck="neck",
                                                jaw="jaw", eyes="eyes", translation="translation").items()})
            uv, _ = cameras_from_rows([row], torch.float64).project(out.landmarks[0])
            x0, y0, w, h = row["crop_box"]
            expected = (lm2d["landmarks"][t, c] - [x0, y0]) * [row["width"] / w, row["height"] / h]
            errors.append(np.abs(uv[0].numpy() - expected).max())
    assert max(errors) < 0.5, max(errors)


def test_images_alpha_and_crops_agree(capture, tmp_path):
    _, frames = extract(capture / "raw", tmp_path / "frames", frame_list=(1,))
    row = pq.read_table(frames.manifest).to_pylist()[0]
    image = np.array(Image.open(tmp_path / "frames" / row["image"]))
    alpha = np.array(Image.open(tmp_path / "frames" / row["alpha"]))
    assert image.shape == (64, 64, 3) and alpha.shape == (64, 64)
    assert 0.15 < (alpha > 127).mean() < 0.9  # a head, not an empty or full frame
    # the crop is the source frame warped by the crop box
    source = list(read_frames(capture / "raw" / row["subject"] / "sequences" / row["sequence"] / "alpha" /
                              f"cam_{row['camera']}.mp4", gray=True))[1]
    assert np.abs(crop_image(source, np.array(row["crop_box"]), 64).astype(int) - alpha).mean() < 2


def test_background_differencing_when_there_are_no_alpha_videos(capture, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(capture / "raw", raw)
    for alpha_dir in raw.glob("*/sequences/*/alpha"):
        shutil.rmtree(alpha_dir)
    _, frames = extract(raw, tmp_path / "frames", frame_list=(2,))
    _, reference = extract(capture / "raw", tmp_path / "reference", frame_list=(2,))
    diff_rows = {r["id"]: r for r in pq.read_table(frames.manifest).to_pylist()}
    assert {r["alpha_source"] for r in diff_rows.values()} == {"background_difference"}
    for ref in pq.read_table(reference.manifest).to_pylist():
        # crops from differencing mattes sit near where the true mattes put them (< 10% of the box;
        # the crop camera is exact either way, this only moves the framing)
        assert np.abs(np.array(diff_rows[ref["id"]]["crop_box"]) - ref["crop_box"]).max() < 0.1 * ref["crop_box"][2]
        video = capture / "raw" / ref["subject"] / "sequences" / ref["sequence"]
        frame = list(read_frames(video / "images" / f"cam_{ref['camera']}.mp4"))[2]
        plate = list(read_frames(capture / "raw" / ref["subject"] / "sequences/BACKGROUND/images" / f"cam_{ref['camera']}.mp4"))[0]
        truth = list(read_frames(video / "alpha" / f"cam_{ref['camera']}.mp4", gray=True))[2] > 127
        matte = background_matte(frame, plate, ExtractConfig().alpha_threshold) > 0.5
        assert (matte & truth).sum() / (matte | truth).sum() > 0.95, ref["id"]  # IoU with the true matte


def test_bad_inputs_are_named_and_the_rest_completes(capture, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(capture / "raw", raw)
    images = raw / "001/sequences/EXP-1-head/images"
    serials = sorted(p.stem[4:] for p in images.glob("cam_*.mp4"))
    truncated = images / f"cam_{serials[0]}.mp4"
    truncated.write_bytes(truncated.read_bytes()[:1500])
    (images / f"cam_{serials[1]}.mp4").write_bytes(b"")
    frames = list(read_frames(images / f"cam_{serials[2]}.mp4"))
    (images / "cam_999999999.mp4").write_bytes(encode_video(frames))  # not in the calibration
    small = [f[::2, ::2] for f in frames]
    (raw / "002/sequences/EXP-1-head/images" / f"cam_{serials[3]}.mp4").write_bytes(encode_video(small))
    other = raw / "002/sequences/EXP-1-head/images" / f"cam_{serials[0]}.mp4"
    other.write_bytes(encode_video(list(read_frames(other))[:2]))  # shorter than the others

    centers, result = extract(raw, tmp_path / "frames")
    errors = {r["id"]: r["message"] for r in pq.read_table(result.errors_manifest).to_pylist()}
    assert any(serials[0] in k for k in errors) and any(serials[1] in k and "0 bytes" in m for k, m in errors.items())
    assert any("999999999" in k and "no calibration" in m for k, m in errors.items())
    assert any(serials[3] in k and "resolution" in m for k, m in errors.items())
    done = {r["id"].rsplit("_", 1)[1] + "/" + r["subject"] for r in pq.read_table(result.manifest).to_pylist()}
    assert f"{serials[2]}/001" in done and f"{serials[3]}/001" in done
    assert f"{serials[0]}/002" in done  # the short video still gives its frames ...
    rows_002 = [r for r in pq.read_table(result.manifest).to_pylist() if r["subject"] == "002"]
    assert {r["frame"] for r in rows_002} == {0, 1}  # ... and the sequence uses the common length
    # a rerun keeps everything written and retries only the failures
    again = extract(raw, tmp_path / "frames")[1]
    assert again.items_skipped == result.items_done and again.items_done == 0


def test_yuv_crops_match_crops_of_whole_converted_frames(capture):
    """The default decoder reduces the 4:2:0 planes before converting only the crop region; that
    must be the crop of the whole frame converted to RGB (or to gray, for mattes), up to rounding,
    for crops that start with 0, 1 and 2 halvings. (The boxes' source regions start on even pixels,
    where 4:2:0 regions start, so both sides halve on the same grid.)"""
    from avat3r_core.extract import _crop_frame, halvings, read_yuv420

    video = next((capture / "raw/001/sequences/EXP-1-head/images").glob("cam_*.mp4"))
    colour = next(read_yuv420(video))
    matte = next(read_yuv420(video.parent.parent / "alpha" / video.name))
    whole_rgb, whole_gray = colour.rgb()[0], matte.gray()[0]
    assert whole_rgb.shape == (colour.height, colour.width, 3)
    for box, size in (((20.3, 10.7, 90.2, 90.2), 64), ((15.5, 21.0, 100.0, 100.0), 40), ((-9.0, 31.0, 101.0, 101.0), 16)):
        box = np.array(box)
        assert halvings(box[2], size) == {64: 0, 40: 1, 16: 2}[size]
        diff = np.abs(_crop_frame(colour, box, size).astype(int) - crop_image(whole_rgb, box, size))
        assert diff.mean() < 0.5 and diff.max() <= 3, (size, diff.mean(), diff.max())
        diff = np.abs(_crop_frame(matte, box, size, matte=True).astype(int) - crop_image(whole_gray, box, size))
        assert diff.mean() < 0.1 and diff.max() <= 1, (size, diff.mean(), diff.max())


def _full_range_video(path: Path, frames: list[np.ndarray]) -> None:
    """A lossless H.264 video in full range (yuvj420p), as phones and some capture rigs write."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=24, options={"qp": "0"})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuvj420p"
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p", dst_color_range=2)
            frame.color_range = 2
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_full_range_videos_keep_their_colours(tmp_path):
    """A full-range stream converts with the full-range matrix, whole or reduced on the planes, as
    FFmpeg's own RGB decode does (read as limited range, a (248, 11, 9) red came out (255, 0, 0));
    its luma is the matte's gray as it is, and the foreground threshold follows."""
    from avat3r_core.extract import halve, read_yuv420

    yy, xx = np.mgrid[0:64, 0:96]
    rgb = np.stack([xx * 255 // 95, yy * 255 // 63, np.full_like(xx, 128)], -1).astype(np.uint8)
    rgb[:16, :16] = (248, 11, 9)
    rgb[48:, 80:] = (4, 4, 4)
    _full_range_video(tmp_path / "full.mp4", [rgb])
    frame = next(read_yuv420(tmp_path / "full.mp4"))
    reference = next(read_frames(tmp_path / "full.mp4"))  # FFmpeg's conversion, range-aware
    assert frame.full_range and frame.luma_half == 127.5
    ours = frame.rgb()[0].astype(int)
    assert np.abs(ours - reference).max() <= 2 and np.abs(ours - rgb).mean() < 2
    assert np.abs(ours[2:14, 2:14] - (248, 11, 9)).max() <= 3  # not stretched to (255, 0, 0)
    reduced, _, scale = frame.rgb(reduce=2)
    assert scale == 4 and np.abs(reduced.astype(int) - halve(reference, 2)[0]).max() <= 3
    np.testing.assert_array_equal(frame.gray()[0], frame.y)


def test_extract_workers_never_import_torch(tmp_path):
    """A worker unpickles its stage factory (as the runner ships it) and sets the stage up; torch
    imported there would add ~0.9 s to every worker's start."""
    import cloudpickle

    config = ExtractConfig()
    factories = tmp_path / "factories.pkl"
    factories.write_bytes(cloudpickle.dumps([lambda: HeadCenterStage(config), lambda: ExtractStage(config)]))
    code = ("import pickle, sys\n"
            "for make in pickle.loads(open(sys.argv[1], 'rb').read()):\n"
            "    make().setup()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
    done = subprocess.run([sys.executable, "-c", code, str(factories)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_triangulate_recovers_a_point_seen_by_the_cameras(capture):
    """The workers' numpy triangulation against the camera model's own projection."""
    from avat3r_core.extract import triangulate
    from avat3r_core.formats.capture import scan_capture

    subject = next(iter(scan_capture(str(capture / "raw"), decode=False).subjects.values()))
    cams = subject.cameras.to(dtype=torch.float64)
    point = torch.tensor([0.01, -0.02, 0.03], dtype=torch.float64)
    uv = cams.project(point[None])[0][:, 0].numpy()
    uv[-1] += 100.0  # a wrong centre in a camera marked invalid must not count
    valid = np.arange(len(cams)) < len(cams) - 1
    w2c, K = cams.world_to_cam.numpy(), cams.K.numpy()
    np.testing.assert_allclose(triangulate(w2c, K, uv, valid), point.numpy(), atol=1e-9)
    assert triangulate(w2c, K, uv, np.arange(len(cams)) == 0) is None  # one view is not enough


def test_head_centre_views_pick_wide_baselines():
    """The head-centre pass's views: geometry.farthest_views, sorted (stages/extract.py)."""
    from avat3r_core.geometry import farthest_views

    def spread_views(centers, k):
        return sorted(farthest_views(centers, k))

    line = np.array([[x, 0.0, 0.0] for x in range(9)])
    assert spread_views(line, 3) == [0, 4, 8]
    assert spread_views(line, 20) == list(range(9))


def test_colour_correction_matches_the_reference_formula():
    """correct_colors (table lookups, terms built on demand, in-place sRGB encode) gives exactly
    the bytes of the plain formula, written out here independently."""
    from avat3r_core.extract import correct_colors

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    image[0, :256] = np.arange(256)[:, None]  # every level, so both branches of both transfer curves
    x = image.astype(np.float32) / np.float32(255.0)
    lin = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)
    r, g, b = lin[..., 0], lin[..., 1], lin[..., 2]
    terms = {3: [r, g, b], 10: [r, g, b, r * g, r * b, g * b, r * r, g * g, b * b, np.ones_like(r)]}
    for n, columns in terms.items():
        ccm = np.eye(3, n) + rng.normal(0, 0.05, (3, n))
        y = np.clip(np.stack(columns, -1) @ ccm.astype(np.float32).T, 0.0, 1.0)
        srgb = np.where(y <= 0.0031308, y * 12.92, 1.055 * np.power(y, 1 / 2.4) - 0.055).astype(np.float32)
        expected = np.clip(np.rint(srgb * 255.0), 0, 255).astype(np.uint8)
        assert np.array_equal(correct_colors(image, ccm), expected), n


def _reference_foreground_mask(frame, plate, threshold):
    """The plate matte's clean-up as first written (OpenCV's per-component statistics, a float
    matte of the flood): what foreground_mask must reproduce byte for byte."""
    import cv2

    diff = cv2.transform(cv2.absdiff(frame, plate).astype(np.float32), np.full((1, 3), 1.0 / (3 * 255.0), np.float32))
    mask = (diff > threshold).astype(np.uint8)
    size = max(3, int(round(min(frame.shape[:2]) / 100)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count > 1:
        mask = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    flood = mask.copy()
    h, w = mask.shape
    seed_mask = np.zeros((h + 2, w + 2), np.uint8)
    for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
        if flood[y, x] == 0:
            cv2.floodFill(flood, seed_mask, (x, y), 2)
    return np.rint(((flood != 2) | (mask == 1)).astype(np.float32) * 255).astype(np.uint8)


def test_foreground_mask_is_the_reference_clean_up_byte_for_byte():
    """Several blobs (the largest kept), a hole (filled), speckle, a blob on the border, and an
    empty frame: the cheaper clean-up gives exactly the reference's bytes."""
    import cv2

    from avat3r_core.extract import foreground_mask

    rng = np.random.default_rng(5)
    for case in range(6):
        h, w = int(rng.integers(60, 240)), int(rng.integers(60, 240))
        plate = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        frame = plate.copy()
        for _ in range(case):  # 0 .. 5 blobs of random sizes, some touching the border
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(frame, centre, int(rng.integers(3, min(h, w) // 3)), tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
        if case >= 2:  # a hole in the first blob's colour, and speckle
            cv2.circle(frame, (w // 2, h // 2), min(h, w) // 4, (250, 10, 120), -1)
            cv2.circle(frame, (w // 2, h // 2), min(h, w) // 12, tuple(int(v) for v in plate[h // 2, w // 2]), -1)
            frame[h // 2, w // 2] = plate[h // 2, w // 2]
        frame = cv2.add(frame, rng.integers(0, 25, frame.shape, dtype=np.uint8))
        got = foreground_mask(frame, plate, 0.06)
        assert got.dtype == np.uint8 and np.array_equal(got, _reference_foreground_mask(frame, plate, 0.06)), case
    assert not foreground_mask(plate, plate, 0.06).any()


def test_plate_pyramid_regions_are_the_regions_reduced():
    """A plate reduced once per video and sliced at an aligned origin gives the pixels of
    reducing that region of the plate itself, at every level."""
    from avat3r_core.extract import PlatePyramid, align, halve

    plate = np.random.default_rng(1).integers(0, 256, (203, 317, 3), dtype=np.uint8)
    pyramid = PlatePyramid(plate)
    for reduce in (1, 2, 3):
        for x0, y0, x1, y1 in ((0, 0, 317, 203), (37, 21, 200, 150), (101, 77, 317, 203), (5, 9, 70, 41)):
            x0, y0 = align(x0, reduce), align(y0, reduce)
            expected, done = halve(plate[y0:y1, x0:x1], reduce)
            assert done == reduce and x0 % 2 ** reduce == 0 and y0 % 2 ** reduce == 0
            assert np.array_equal(pyramid.region(x0, y0, expected.shape[:2], 2 ** reduce), expected), (reduce, x0, y0)


def test_kept_regions_read_back_the_frames_own_bytes(capture, tmp_path):
    """A region the head-centre pass keeps (reduced planes, written and read back) gives exactly
    the bytes of the decoded frame's :meth:`rgb` for every region inside it at that reduction or
    more; a region outside it, or less reduced, is refused."""
    from avat3r_core.extract import FrameStash, read_yuv420, save_region

    video = next((capture / "raw/001/sequences/EXP-1-head/images").glob("cam_*.mp4"))
    frames = list(read_yuv420(video))[:2]
    headers = {}
    with open(tmp_path / "regions.yuv", "wb") as handle:
        for index, frame in enumerate(frames):
            headers[index] = save_region(handle, frame.region(13 + index, 9, 117, 121, 1))
    stash = FrameStash(str(tmp_path / "regions.yuv"), headers)
    for index, frame in enumerate(frames):
        kept = stash[index]
        assert kept.shape == frame.shape and kept.reduce == 1
        for roi, reduce in (((20, 14, 100, 110), 1), ((17, 33, 90, 96), 2), ((24, 16, 116, 120), 3), ((31, 10, 60, 50), 1)):
            assert kept.covers(*roi, reduce), (roi, reduce)
            got, origin, scale = kept.rgb(*roi, reduce)
            expected, expected_origin, expected_scale = frame.rgb(*roi, reduce=reduce)
            assert (origin, scale) == (expected_origin, expected_scale) and np.array_equal(got, expected), (roi, reduce)
        assert not kept.covers(kept.x0 - 2, 14, 100, 110, 1) and not kept.covers(20, kept.y0 - 2, 100, 110, 1)
        assert not kept.covers(20, 14, 100, 110, 0)
        with pytest.raises(ValueError, match="not inside"):
            kept.rgb(0, 0, 128, 128, 1)


def test_srgb_encode_table_is_exact_at_every_bin_edge():
    """The table encode of linear → sRGB bytes equals the formula on every float32 within 40
    ulps of each of the 2^16 bin edges (where a table could go wrong), on random values and
    outside [0, 1]. (Every float32 in [0, 1] was checked once: no difference.)"""
    from avat3r_core.extract import _encode_srgb_exact, _srgb_to_uint8

    edges = (np.arange((1 << 16) + 1, dtype=np.float32) / (1 << 16)).view(np.int32)
    near = (edges[:, None] + np.arange(-40, 41, dtype=np.int32)).ravel().view(np.float32)
    x = np.concatenate([near[(near >= 0) & (near <= 1)], np.random.default_rng(2).random(200_000, np.float32),
                        np.array([-1.0, -1e-30, 1.0000001, 2.0, 1e30], np.float32)])
    assert np.array_equal(_srgb_to_uint8(x.copy()), _encode_srgb_exact(x.copy()))


def test_plate_route_crops_from_kept_regions_are_the_decoded_videos_crops(capture, tmp_path, monkeypatch):
    """Without alpha videos the head-centre pass decodes its views whole and keeps each frame's
    region around the head; their crop items read those instead of decoding again, and write
    exactly the bytes a decode would (the same run, the kept regions refused)."""
    import stages.extract as stage

    raw = tmp_path / "raw"
    shutil.copytree(capture / "raw", raw)
    for alpha_dir in raw.glob("*/sequences/*/alpha"):
        shutil.rmtree(alpha_dir)
    used, original = [], stage._stashed_frames

    def spy(item, job, size):
        stash = original(item, job, size)
        used.append(stash is not None)
        return stash

    monkeypatch.setattr(stage, "_stashed_frames", spy)
    _, kept = extract(raw, tmp_path / "kept", resolution=16, center_views=2)
    assert used.count(True) == 2 * STUDIO["subjects"]  # the two centre views of each subject
    assert not (tmp_path / "kept" / stage.STASH).exists()  # removed once the crop pass is done
    monkeypatch.setattr(stage, "_stashed_frames", lambda item, job, size: None)
    _, decoded = extract(raw, tmp_path / "decoded", resolution=16, center_views=2)
    rows = sorted(pq.read_table(kept.manifest).to_pylist(), key=lambda r: r["id"])
    again = sorted(pq.read_table(decoded.manifest).to_pylist(), key=lambda r: r["id"])
    assert len(rows) == STUDIO["subjects"] * STUDIO["frames"] * STUDIO["cameras"]
    for a, b in zip(rows, again):
        assert a["crop_box"] == b["crop_box"]
        for key in ("image", "alpha"):
            assert (tmp_path / "kept" / a[key]).read_bytes() == (tmp_path / "decoded" / b[key]).read_bytes(), a["id"]


def test_benchmark_replays_exactly_the_decoding_it_recorded(tmp_path):
    """``benchmarks/extract.py``'s ceiling figure: the recorder sees each decoder call with the
    frames the caller consumed (an early stop counts only what was taken) and each image read; the
    replay decodes as much again; the wrapped decoders are put back afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.extract import record_stage_decoding, stage_decodes_only

    import avat3r_core.video as video_module
    from avat3r_core.extract import ImageSequence, pick_frames, read_image, read_yuv420

    frames = [np.full((32, 48, 3), 10 * i, np.uint8) for i in range(10)]
    video = tmp_path / "clip.mp4"
    _full_range_video(video, frames)
    plate = tmp_path / "plate.png"
    Image.fromarray(frames[3]).save(plate)
    originals = (video_module.decoded_frames, video_module.reference_frames, ImageSequence.__getitem__)

    def run():
        assert [i for i, _ in pick_frames(read_yuv420(video, threads=1), [1, 4])] == [1, 4]  # stops after frame 4
        assert len(list(read_yuv420(video))) == 10
        read_image(str(plate))

    calls = record_stage_decoding(run)
    assert calls == [("decoded_frames", str(video), 1, 5), ("decoded_frames", str(video), 1, 10),
                     ("image", str(plate), False, 1)]
    assert (video_module.decoded_frames, video_module.reference_frames, ImageSequence.__getitem__) == originals
    assert stage_decodes_only(calls) == 16
