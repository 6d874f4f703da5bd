"""Captures as users download them, written by writers other than the project's studio.

Each capture films one "head" (a textured disk centred on the projection of a known world point)
in front of a textured backdrop, with a calibration written by hand as JSON at NeRSemble's full
3208x2200 and media downscaled from it:

* v2, current toolkit: OpenCV ``mp4v`` videos, JPEG plates ``BACKGROUND/image_<serial>.jpg`` (one
  camera without a plate), ``metadata_participants.csv``, planted faults in a second sequence;
* v2, older download, one codec per camera (PyAV HEVC, HEVC 10-bit, yuvj420p and yuv444p H.264,
  OpenCV MJPEG, VP9), plates as ``BACKGROUND/images/cam_<serial>.mp4``, intrinsics per serial;
* v1 frame folders: OpenCV-written PNGs, alpha maps, colour correction ``.npy``, planted zero-byte
  PNG and missing alpha map.

For each: inspect and extract end to end, crops centred on the head within 1 px at 128^2, crop
intrinsics as the scaled full-size calibration, every planted fault a named row.
"""

from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from avat3r_core.cameras import Cameras
from avat3r_core.extract import ExtractConfig, background_matte, median_plate
from avat3r_core.formats.capture import scan_capture
from avat3r_core.formats.manifests import cameras_from_rows
from avat3r_core.video import probe_video
from stages.extract import run_extract

FULL_W, FULL_H = 2200, 3208  # portrait, as NeRSemble's cameras
#: full-size intrinsics (principal point a little off centre, as a real calibration)
K_FULL = np.array([[7000.0, 0.0, 1096.0], [0.0, 7000.0, 1611.0], [0.0, 0.0, 1.0]])
HEAD = np.array([0.02, -0.015, 0.03])  # the head's centre in the world (metres)
HEAD_RADIUS = 0.06
SERIALS = ["220700191", "221501007", "222200036", "222200037", "222200038", "222200039"]
CROP = 128
#: AV1 is tested where this FFmpeg build can encode it (PyAV's wheels have SVT-AV1)
NO_AV1 = pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="this FFmpeg build has no AV1 encoder")


def rig(n: int) -> np.ndarray:
    """World-to-camera (n, 4, 4), OpenCV convention, on an arc 1.2 m from the origin."""
    angles = np.linspace(-0.5, 0.5, n)
    eyes = torch.tensor(np.stack([1.2 * np.sin(angles), 0.05 * np.cos(3 * angles), 1.2 * np.cos(angles)], 1))
    return Cameras.look_at(eyes, (0, 0, 0), fov_deg=20, width=FULL_W, height=FULL_H,
                           dtype=torch.float64).world_to_cam.numpy()


def project(w2c: np.ndarray, K: np.ndarray, point: np.ndarray) -> tuple[np.ndarray, float]:
    p = w2c[:3, :3] @ point + w2c[:3, 3]
    return (K[:2, :2] @ (p[:2] / p[2]) + K[:2, 2]), float(p[2])


def backdrop(width: int, height: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [70 + 25 * np.sin(x / (19 + 4 * c) + seed) + 20 * np.cos(y / (23 + 3 * c) - seed) for c in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def render(w2c: np.ndarray, K: np.ndarray, width: int, height: int, seed: int, head: bool = True,
           head_color=(215, 160, 120), at: np.ndarray = HEAD) -> tuple[np.ndarray, np.ndarray]:
    """RGB frame and its true matte: the head as a disk centred on the projection of its centre
    ``at`` (pixel centres at +0.5), over the camera's backdrop."""
    image = backdrop(width, height, seed)
    (u, v), depth = project(w2c, K, at)
    radius = K[0, 0] * HEAD_RADIUS / depth
    y, x = np.mgrid[0:height, 0:width] + 0.5
    inside = (x - u) ** 2 + (y - v) ** 2 < radius ** 2
    if head:
        shade = np.clip(np.array(head_color, np.float32) + 12 * np.sin(x / 7.0)[..., None], 0, 255)
        image[inside] = shade[inside].astype(np.uint8)
    return image, (inside & head).astype(np.uint8) * 255


def write_calibration(path: Path, serials: list[str], w2c: np.ndarray, per_serial: bool = False) -> None:
    """camera_params.json by hand, as the public release gives it (no image size)."""
    intrinsics = {s: K_FULL.tolist() for s in serials} if per_serial else K_FULL.tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"world_2_cam": {s: m.tolist() for s, m in zip(serials, w2c)}, "intrinsics": intrinsics}))


def write_opencv(path: Path, frames: list[np.ndarray], fourcc: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25, frames[0].shape[1::-1])
    assert writer.isOpened(), fourcc
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def write_pyav(path: Path, frames: list[np.ndarray], codec: str, pix_fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        # x265 single-threaded, no B-frames: with its thread pool, muxing the flushed packets into
        # MP4 failed now and then ("Not yet implemented in FFmpeg")
        stream.options = ({"crf": "12"} if codec != "libx265" else
                          {"crf": "12", "x265-params": "log-level=error:bframes=0:frame-threads=1:pools=none"})
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def check_crops(rows: list[dict], scale: float, tolerance_px: float = 1.0, alpha_dir: Path | None = None,
                head=lambda frame: HEAD) -> None:
    """Every crop: the known head centre (``head(frame)``) projects within ``tolerance_px`` of the
    crop centre, the crop K is the full-size K scaled to the media and then to the crop, and
    (``alpha_dir``) the matte's centroid sits on the head."""
    assert rows
    for row in rows:
        cam = cameras_from_rows([row], torch.float64)
        uv, _ = cam.project(torch.tensor(head(row["frame"]))[None])
        assert np.abs(uv[0, 0].numpy() - CROP / 2).max() < tolerance_px, (row["id"], uv)
        x0, y0, side, _ = row["crop_box"]
        K = np.array(row["K"]).reshape(3, 3)
        np.testing.assert_allclose(K[0, 0], K_FULL[0, 0] * scale * CROP / side, rtol=1e-9)
        np.testing.assert_allclose(K[:2, 2], (K_FULL[:2, 2] * scale - [x0, y0]) * CROP / side, rtol=1e-9, atol=1e-6)
        if alpha_dir is not None:
            alpha = np.array(Image.open(alpha_dir / row["alpha"])) > 127
            ys, xs = np.nonzero(alpha)
            assert abs(xs.mean() + 0.5 - CROP / 2) < tolerance_px and abs(ys.mean() + 0.5 - CROP / 2) < tolerance_px, row["id"]


def extract(root: Path, out: Path, **config):
    return run_extract(ExtractConfig(**{"resolution": CROP, **config}), str(root), str(out), executor="local")


def inspect(root: Path, *args: str):
    from pipelines.cli import app

    return CliRunner().invoke(app, ["ingest", "inspect", str(root), *args])


# --------------------------------------------------------------------------- v2, current toolkit
V2_FRAMES = 7


def moving_head(frame: int) -> np.ndarray:
    """The v2 capture's head moves up 4 cm a frame: a camera without a plate can make one from
    the temporal median of its frames (each pixel is backdrop in most of them)."""
    return HEAD + [0.0, 0.04 * (frame - V2_FRAMES // 2), 0.0]


@pytest.fixture(scope="module")
def v2_capture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v2")
    serials, w2c = SERIALS[:4], rig(4)
    scale = 0.25
    width, height = int(FULL_W * scale), int(FULL_H * scale)  # 550x802
    K = K_FULL * [[scale], [scale], [1]]
    subject = root / "017"
    write_calibration(subject / "calibration" / "camera_params.json", serials, w2c)
    (root / "metadata_participants.csv").write_text("ID,age,gender\n17,31,f\n18,40,m\n")
    for c, serial in enumerate(serials):
        video = [render(w2c[c], K, width, height, seed=c, at=moving_head(t))[0] for t in range(V2_FRAMES)]
        write_opencv(subject / "sequences" / "EXP-1-head" / "images" / f"cam_{serial}.mp4", video, "mp4v")
        if c != 3:  # camera 3 has no plate: warned, matted against its temporal median
            plate, _ = render(w2c[c], K, width, height, seed=c, head=False)
            (subject / "sequences" / "BACKGROUND").mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(subject / "sequences" / "BACKGROUND" / f"image_{serial}.jpg"),
                        cv2.cvtColor(plate, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        faulty = subject / "sequences" / "EXP-2-eyes" / "images" / f"cam_{serial}.mp4"
        if c == 2:  # wrong size
            write_opencv(faulty, [cv2.resize(f, (276, 400)) for f in video], "mp4v")
        else:
            write_opencv(faulty, video, "mp4v")
    truncated = subject / "sequences" / "EXP-2-eyes" / "images" / f"cam_{serials[0]}.mp4"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    stray = subject / "sequences" / "EXP-2-eyes" / "images" / "cam_299999999.mp4"  # not in the calibration
    stray.write_bytes((subject / "sequences" / "EXP-2-eyes" / "images" / f"cam_{serials[1]}.mp4").read_bytes())
    return root


def test_v2_toolkit_layout_inspect(v2_capture):
    index = scan_capture(v2_capture, decode=False)
    assert index.layout == "nersemble"
    subject = index.subjects["017"]
    assert list(subject.sequences) == ["EXP-1-head", "EXP-2-eyes"]  # BACKGROUND is plates, not a sequence
    assert sorted(subject.background.media) == SERIALS[:3]
    assert (subject.cameras.width, subject.cameras.height) == (550, 802)  # mp4v probed right, not 0x0
    torch.testing.assert_close(subject.cameras.K[0], torch.tensor(K_FULL * [[0.25], [0.25], [1]]))
    errors = {(p.sequence, p.camera): p.message for p in index.problems if p.severity == "error"}
    assert set(errors) == {("EXP-2-eyes", SERIALS[0]), ("EXP-2-eyes", "299999999"), ("EXP-2-eyes", SERIALS[2])}
    assert "no calibration" in errors[("EXP-2-eyes", "299999999")]
    assert "resolution 276x400 differs" in errors[("EXP-2-eyes", SERIALS[2])]
    warning = next(p for p in index.problems if p.camera == SERIALS[3] and p.severity == "warning")
    assert "no background plate" in warning.message and "temporal median" in warning.message

    result = inspect(v2_capture)
    assert result.exit_code == 3, result.output
    lines = result.output.splitlines()
    assert not any("BACKGROUND" in line and "│" in line for line in lines)  # not a table row
    assert "metadata_participants.csv: 2 row(s), 1 for these subjects" in result.output
    assert any("31" in line and "17" in line for line in lines)
    # off a terminal nothing is cut: the faulty file's full path is on its problem line
    assert any(line.startswith("error\t017/EXP-2-eyes/" + SERIALS[0]) and line.endswith(str(
        v2_capture / "017/sequences/EXP-2-eyes/images" / f"cam_{SERIALS[0]}.mp4")) for line in lines)
    assert "…" not in result.output


def test_v2_toolkit_layout_extracts_centred_crops(v2_capture, tmp_path):
    centers, frames = extract(v2_capture, tmp_path / "frames")
    assert centers.items_failed == 0
    rows = pq.read_table(frames.manifest).to_pylist()
    assert {r["sequence"] for r in rows} == {"EXP-1-head", "EXP-2-eyes"}
    assert len([r for r in rows if r["sequence"] == "EXP-1-head"]) == 4 * V2_FRAMES
    assert {r["camera"] for r in rows if r["sequence"] == "EXP-2-eyes"} == {SERIALS[1], SERIALS[3]}
    sources = {r["camera"]: r["alpha_source"] for r in rows}
    assert sources == {**{s: "background_difference" for s in SERIALS[:3]}, SERIALS[3]: "temporal_median_plate"}
    check_crops(rows, 0.25, alpha_dir=tmp_path / "frames", head=moving_head)
    errors = {r["id"]: r["message"] for r in pq.read_table(frames.errors_manifest).to_pylist()}
    assert set(errors) == {f"017_EXP-2-eyes_{s}" for s in (SERIALS[0], "299999999", SERIALS[2])}
    assert "no calibration" in errors["017_EXP-2-eyes_299999999"]
    assert "resolution" in errors[f"017_EXP-2-eyes_{SERIALS[2]}"]


def test_median_plate_mattes_a_moving_head():
    """The route for a camera without alpha or plate: a plate from the temporal median of its
    frames mattes a head that moves (each pixel backdrop in most frames) like the true plate."""
    w2c, scale = rig(1)[0], 0.125
    K = K_FULL * [[scale], [scale], [1]]
    frames, truths = [], []
    for t in range(7):
        K_t = K.copy()
        K_t[1, 2] += (t - 3) * 30.0  # the head moves 30 px a frame (up to 90 px from the middle)
        frame, truth = render(w2c, K_t, 275, 401, seed=0)
        # the backdrop stays: re-render it with the original principal point
        backdrop_only, _ = render(w2c, K, 275, 401, seed=0, head=False)
        frames.append(np.where(truth[..., None] > 0, frame, backdrop_only))
        truths.append(truth > 0)
    plate = median_plate(frames)
    for frame, truth in zip(frames, truths):
        matte = background_matte(frame, plate, ExtractConfig().alpha_threshold) > 0.5
        assert (matte & truth).sum() / (matte | truth).sum() > 0.95


# --------------------------------------------------------------------------- v2, every codec
CODECS = {  # serial → writer; all at the same size, each camera a different codec / pixel format
    SERIALS[0]: lambda p, f: write_pyav(p, f, "libx265", "yuv420p"),
    SERIALS[1]: lambda p, f: write_pyav(p, f, "libx264", "yuvj420p"),
    SERIALS[2]: lambda p, f: write_opencv(p.with_suffix(".avi"), f, "MJPG"),  # OpenCV's MJPEG goes in .avi
    SERIALS[3]: lambda p, f: write_pyav(p, f, "libx264", "yuv444p"),
    SERIALS[4]: lambda p, f: write_pyav(p, f, "libx265", "yuv420p10le"),
    SERIALS[5]: lambda p, f: write_pyav(p, f, "libvpx-vp9", "yuv420p"),
}


@pytest.fixture(scope="module")
def codec_capture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codecs")
    w2c, scale = rig(len(SERIALS)), 0.125
    width, height = 276, 402  # even (4:2:0 codecs), within a pixel of 1/8 of the full size
    K = K_FULL * [[width / FULL_W], [height / FULL_H], [1]]
    subject = root / "018"
    write_calibration(subject / "calibration" / "camera_params.json", SERIALS, w2c, per_serial=True)
    for c, serial in enumerate(SERIALS):
        frame, _ = render(w2c[c], K, width, height, seed=c)
        CODECS[serial](subject / "sequences" / "EXP-1-head" / "images" / f"cam_{serial}.mp4", [frame] * 3)
        plate, _ = render(w2c[c], K, width, height, seed=c, head=False)
        write_pyav(subject / "sequences" / "BACKGROUND" / "images" / f"cam_{serial}.mp4", [plate], "libx264", "yuv420p")
    return root


def test_every_codec_probes_its_size_and_extracts_centred_crops(codec_capture, tmp_path):
    videos = sorted(codec_capture.glob("018/sequences/EXP-1-head/images/cam_*"))
    assert len(videos) == len(SERIALS)
    for video in videos:
        header, decoded = probe_video(video, decode=False), probe_video(video, decode=True)
        assert (header.frames, header.width, header.height) == (decoded.frames, decoded.width, decoded.height) \
            == (3, 276, 402), video
    index = scan_capture(codec_capture, decode=False)
    assert [p for p in index.problems if p.severity == "error"] == []
    assert sorted(index.subjects["018"].background.media) == SERIALS  # the older plate videos
    _, frames = extract(codec_capture, tmp_path / "frames")
    rows = pq.read_table(frames.manifest).to_pylist()
    assert sorted({r["camera"] for r in rows}) == SERIALS and len(rows) == 3 * len(SERIALS)
    assert {r["source_width"] for r in rows} == {276}
    # the media size is not an exact 1/8 (276/2200 across, 402/3208 down): K scales per axis
    for row in rows:
        cam = cameras_from_rows([row], torch.float64)
        uv, _ = cam.project(torch.tensor(HEAD)[None])
        assert np.abs(uv[0, 0].numpy() - CROP / 2).max() < 1.0, row["id"]
        alpha = np.array(Image.open(tmp_path / "frames" / row["alpha"])) > 127
        ys, xs = np.nonzero(alpha)
        assert abs(xs.mean() + 0.5 - CROP / 2) < 1.0 and abs(ys.mean() + 0.5 - CROP / 2) < 1.0, row["id"]
        # the head keeps its colour whatever the range / chroma layout of the stream
        image = np.array(Image.open(tmp_path / "frames" / row["image"]))
        assert np.abs(np.median(image[alpha], axis=0) - (215, 160, 120)).max() < 12, (row["camera"], np.median(image[alpha], axis=0))


# --------------------------------------------------------------------------- v1 frame folders
#: v1 colour correction: an affine map of RGB in [0, 1] (rgb @ A[:3, :3] + A[:3, 3], nersemble's convention)
AFFINE = np.array([[0.9, 0.02, 0.0], [0.0, 0.95, 0.03], [0.05, 0.0, 0.85]])


@pytest.fixture(scope="module")
def v1_capture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("v1")
    serials, w2c, scale = SERIALS[:4], rig(4), 0.125
    width, height = round(FULL_W * scale), round(FULL_H * scale)  # 275x401: PNGs need no even size
    K = K_FULL * [[scale], [scale], [1]]
    subject = root / "031"
    write_calibration(subject / "camera_params.json", serials, w2c)
    affine = np.eye(4)  # 4x4 with an offset, as nersemble's loader indexes it ([:3, :3], [:3, 3])
    affine[:3, :3], affine[:3, 3] = AFFINE, [0.02, -0.01, 0.0]
    for c, serial in enumerate(serials):
        frame, alpha = render(w2c[c], K, width, height, seed=c)
        for t in range(3):
            folder = subject / "sequences" / "EXP-1-head" / f"frame_{t:05d}"
            (folder / "images-2x-73fps").mkdir(parents=True, exist_ok=True)
            (folder / "alpha_map-73fps").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / "images-2x-73fps" / f"cam_{serial}.png"), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(folder / "alpha_map-73fps" / f"cam_{serial}.png"), alpha)
        ccm = subject / "annotations" / "EXP-1-head" / "color_correction" / f"{serial}.npy"
        ccm.parent.mkdir(parents=True, exist_ok=True)
        np.save(ccm, affine)
    sequence = subject / "sequences" / "EXP-1-head"
    (sequence / "frame_00001" / "images-2x-73fps" / f"cam_{serials[0]}.png").write_bytes(b"")  # zero bytes
    (sequence / "frame_00002" / "alpha_map-73fps" / f"cam_{serials[1]}.png").unlink()  # missing alpha
    return root


def test_v1_frame_folders_are_detected_and_faults_named_per_frame(v1_capture):
    index = scan_capture(v1_capture)
    assert index.layout == "nersemble_v1"
    subject = index.subjects["031"]
    sequence = subject.sequences["EXP-1-head"]
    assert sequence.frames == 3 and sorted(sequence.media) == SERIALS[:4]
    assert (subject.cameras.width, subject.cameras.height) == (275, 401)
    np.testing.assert_allclose(np.array(sequence.media[SERIALS[2]].color_correction)[:3, :3], AFFINE)
    errors = {(p.camera, p.frame): p for p in index.problems if p.severity == "error"}
    assert set(errors) == {(SERIALS[0], 1), (SERIALS[1], 2)}
    assert "image is an empty file (0 bytes)" in errors[(SERIALS[0], 1)].message
    assert "alpha map missing" in errors[(SERIALS[1], 2)].message
    assert errors[(SERIALS[1], 2)].path.endswith(f"frame_00002/alpha_map-73fps/cam_{SERIALS[1]}.png")
    result = inspect(v1_capture, "--json", str(v1_capture.parent / "v1_report.json"))
    assert result.exit_code == 3 and f"error\t031/EXP-1-head/{SERIALS[0]}/frame 1\t" in result.output
    report = json.loads((v1_capture.parent / "v1_report.json").read_text())
    assert report["layout"] == "nersemble_v1"
    assert {(p["camera"], p["frame"]) for p in report["problems"] if p["severity"] == "error"} == {(SERIALS[0], 1), (SERIALS[1], 2)}
    assert len(report["subjects"]["031"]["sequences"]["EXP-1-head"][SERIALS[2]]["images"]) == 3


def test_v1_frame_folders_extract_with_alpha_maps_and_colour_correction(v1_capture, tmp_path):
    _, frames = extract(v1_capture, tmp_path / "frames")
    rows = pq.read_table(frames.manifest).to_pylist()
    assert len(rows) == 4 * 3 - 2  # all but the two broken (frame, camera) pairs
    assert {r["alpha_source"] for r in rows} == {"alpha_map"} and all(r["color_corrected"] for r in rows)
    check_crops(rows, 0.125, alpha_dir=tmp_path / "frames")
    errors = {r["id"]: r["message"] for r in pq.read_table(frames.errors_manifest).to_pylist()}
    assert set(errors) == {f"031_EXP-1-head_000001_{SERIALS[0]}", f"031_EXP-1-head_000002_{SERIALS[1]}"}
    # the head's colour is the affine correction of the rendered one
    expected = np.clip(np.array([215, 160, 120]) / 255 @ AFFINE + [0.02, -0.01, 0.0], 0, 1) * 255
    row = rows[0]
    image = np.array(Image.open(tmp_path / "frames" / row["image"]))
    alpha = np.array(Image.open(tmp_path / "frames" / row["alpha"])) > 127
    assert np.abs(np.median(image[alpha], axis=0) - expected).max() < 8


def test_v1_colour_correction_is_nersembles_own():
    """The same uint8 values as tobias-kirschstein/nersemble's loader
    (src/nersemble/nerfstudio/dataset/nersemble_dataset.py): [0, 1] row vectors, affine, clipped,
    x255 truncated."""
    from avat3r_core.extract import affine_color_correct

    image = np.random.default_rng(0).integers(0, 256, (37, 41, 3), dtype=np.uint8)
    A = np.eye(4)
    A[:3, :3], A[:3, 3] = AFFINE * 1.2, [0.05, -0.03, 0.01]  # some values clip at both ends
    theirs = np.clip(np.array(image, dtype="float") / 255 @ A[:3, :3] + A[np.newaxis, :3, 3], 0, 1)
    np.testing.assert_array_equal(affine_color_correct(image, A), (theirs * 255).astype(np.uint8))


# --------------------------------------------------------------------------- calibration variants
def test_calibration_variants(tmp_path):
    from avat3r_core.formats.calibration import read_nersemble_calibration, read_transforms_json

    w2c = rig(2)
    path = tmp_path / "camera_params.json"
    K2 = K_FULL.copy()
    K2[0, 0] = 7100.0
    path.write_text(json.dumps({"world_2_cam": {s: m.tolist() for s, m in zip(SERIALS[:2], w2c)},
                                "intrinsics": {SERIALS[0]: K_FULL.tolist(), SERIALS[1]: K2.tolist()}}))
    serials, cams = read_nersemble_calibration(path, dtype=torch.float64)
    assert serials == SERIALS[:2] and cams.fx.tolist() == [7000.0, 7100.0] and (cams.width, cams.height) == (FULL_W, FULL_H)
    path.write_text(json.dumps({"world_2_cam": {s: m.tolist() for s, m in zip(SERIALS[:2], w2c)},
                                "intrinsics": {SERIALS[0]: K_FULL.tolist()}}))
    from avat3r_core.errors import FormatError

    with pytest.raises(FormatError, match=f"intrinsics.{SERIALS[1]}"):
        read_nersemble_calibration(path)
    # transforms.json without w/h: the image decides
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "transforms.json").write_text(json.dumps({"fl_x": 50, "fl_y": 50, "cx": 20, "cy": 15, "frames": [
        {"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]}))
    _, cams = read_transforms_json(tmp_path / "transforms.json")
    assert (cams.width, cams.height) == (40, 30)


def test_principal_point_fitting_neither_size_is_a_named_warning(tmp_path):
    subject = tmp_path / "020"
    w2c = rig(1)
    K = K_FULL.copy()
    K[:2, 2] = [400.0, 2600.0]  # neither 1100,1604 (full) nor the media centre
    (subject / "calibration").mkdir(parents=True)
    (subject / "calibration" / "camera_params.json").write_text(json.dumps(
        {"world_2_cam": {SERIALS[0]: w2c[0].tolist()}, "intrinsics": K.tolist()}))
    frame, _ = render(w2c[0], K_FULL * [[0.125], [0.125], [1]], 276, 402, seed=0)
    write_opencv(subject / "sequences" / "EXP-1-head" / "images" / f"cam_{SERIALS[0]}.mp4", [frame], "mp4v")
    index = scan_capture(tmp_path, decode=False)
    warning = next(p for p in index.problems if "principal point" in p.message)
    assert warning.severity == "warning" and warning.path.endswith("camera_params.json")
    assert "fits neither the media size 276x402 nor the full size 2200x3208" in warning.message


@pytest.mark.parametrize("codec,pix_fmt,container", [
    ("libx264", "yuv420p", "mp4"), ("libx264", "yuvj420p", "mp4"), ("libx264", "yuv444p", "mp4"),
    ("libx264", "yuv422p", "mp4"), ("libx264", "yuv420p10le", "mp4"), ("libx265", "yuv420p10le", "mp4"),
    ("mjpeg", "yuvj422p", "avi"), ("mjpeg", "yuvj444p", "avi"), ("libvpx-vp9", "yuv444p", "webm"),
    pytest.param("libsvtav1", "yuv420p", "mkv", marks=NO_AV1),
    pytest.param("libsvtav1", "yuv420p10le", "mp4", marks=NO_AV1),
])
def test_decode_path_keeps_colours_for_every_pixel_format(tmp_path, codec, pix_fmt, container):
    """The stage's 4:2:0 path (read_yuv420 → Yuv420Frame) on streams that are not 4:2:0 8-bit
    limited range: flat patches keep their colour (range and matrix right), sizes are right."""
    from avat3r_core.extract import read_yuv420

    colours = np.array([[200, 40, 30], [30, 180, 60], [40, 60, 210], [235, 235, 20]], np.uint8)
    image = np.zeros((64, 96, 3), np.uint8)
    for i, colour in enumerate(colours):
        image[(i // 2) * 32:(i // 2 + 1) * 32, (i % 2) * 48:(i % 2 + 1) * 48] = colour
    path = tmp_path / f"clip.{container}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, pix_fmt
        stream.options = {"crf": "4"} if codec.startswith("lib") and codec != "libvpx-vp9" else {}
        if codec == "libx265":
            stream.options = {"crf": "4", "x265-params": "log-level=error:bframes=0:frame-threads=1:pools=none"}  # see write_pyav
        if codec == "mjpeg":
            stream.codec_context.qmin = stream.codec_context.qmax = 2
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    info = probe_video(path, decode=False)
    assert (info.width, info.height) == (96, 64)
    frames = list(read_yuv420(path))
    assert len(frames) == 2
    rgb = frames[0].rgb()[0]
    for i, colour in enumerate(colours):
        y, x = (i // 2) * 32 + 16, (i % 2) * 48 + 24
        patch = rgb[y - 8:y + 8, x - 12:x + 12].reshape(-1, 3).astype(float).mean(0)
        assert np.abs(patch - colour).max() < 6, (pix_fmt, colour, patch)


# --------------------------------------------------------------------------- the head-centre pass's sparse decode
def _write_clip(path: Path, codec: str, frames: list[np.ndarray], pix_fmt: str = "yuv420p") -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error:bframes=2:frame-threads=1:pools=none"}  # see write_pyav
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _ramp(n: int = 20) -> list[np.ndarray]:
    """Frames that differ from each other (a brightness ramp and a moving bar)."""
    frames = [np.full((64, 96, 3), 10 + 9 * i, np.uint8) for i in range(n)]
    for i, frame in enumerate(frames):
        frame[(3 * i) % 60:(3 * i) % 60 + 4] = 250
    return frames


@pytest.mark.parametrize("codec,container", [
    ("libx264", "mp4"), ("libx264", "mkv"), ("libx265", "mp4"), ("libvpx-vp9", "webm"),
    pytest.param("libsvtav1", "mp4", marks=NO_AV1),
    pytest.param("libsvtav1", "webm", marks=NO_AV1),
])
def test_reference_frames_are_the_full_decodes_frames_at_their_index(tmp_path, codec, container):
    """The head-centre pass decodes only the frames other frames reference: each one it yields is
    the frame a full decode gives at that index; x264's and x265's B-frames are skipped."""
    from avat3r_core.video import decoded_frames, reference_frames

    path = tmp_path / f"clip.{container}"
    _write_clip(path, codec, _ramp())
    full = [f.to_ndarray(format="gray") for f in decoded_frames(path, threads=1)]
    sparse = [(i, f.to_ndarray(format="gray")) for i, f in reference_frames(path)]
    assert len(full) == 20 and sparse[0][0] == 0
    assert [i for i, _ in sparse] == sorted({i for i, _ in sparse})
    for i, frame in sparse:
        np.testing.assert_array_equal(frame, full[i])
    if codec in ("libx264", "libx265"):
        assert len(sparse) < len(full)


@pytest.mark.parametrize("codec,container", [
    ("libx264", "mp4"), ("libx265", "mp4"), ("mpeg4", "mp4"), ("mjpeg", "avi"), ("libvpx-vp9", "webm"),
    pytest.param("libsvtav1", "mkv", marks=NO_AV1),
])
def test_decoders_opening_without_the_stream_probe_give_every_frame_unchanged(tmp_path, codec, container):
    """Every open (the probes', decoded_frames', reference_frames') skips FFmpeg's decoding stream probe
    (it costs ~6 ms a video and its frames are thrown away): the frames are those a default open
    decodes, every one, byte for byte — also for MPEG-4 Part 2, whose size is not in the header."""
    from avat3r_core.video import decoded_frames, reference_frames

    path = tmp_path / f"clip.{container}"
    _write_clip(path, codec, _ramp(15), "yuvj420p" if codec == "mjpeg" else "yuv420p")
    with av.open(str(path)) as c:  # PyAV's default open: the probe decodes the first frames
        stream = c.streams.video[0]
        stream.codec_context.thread_count = 1
        expected = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
    got = [f.to_ndarray(format="rgb24") for f in decoded_frames(path, threads=1)]
    assert len(expected) == len(got) == 15
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)
    for i, frame in reference_frames(path):
        np.testing.assert_array_equal(frame.to_ndarray(format="rgb24"), expected[i])
    # the counting probe opens the same way: every frame counted, the size from the decoder
    info = probe_video(path, decode=True)
    assert (info.frames, info.width, info.height) == (15, 96, 64)


@pytest.mark.parametrize("codec,container", [
    ("libvpx-vp9", "webm"), ("libx264", "mkv"),
    pytest.param("libsvtav1", "webm", marks=NO_AV1),
    pytest.param("libsvtav1", "mp4", marks=NO_AV1),
])
def test_frame_count_and_size_when_the_header_has_no_count(tmp_path, codec, container):
    """WebM / Matroska headers carry no frame count (AV1 in MP4 does): the header-only probe then
    counts by decoding, and the size is right for AV1 too."""
    from avat3r_core.extract import read_yuv420

    path = tmp_path / f"clip.{container}"
    _write_clip(path, codec, _ramp(13))
    with av.open(str(path)) as c:
        header_count = c.streams.video[0].frames
    assert (header_count == 0) == (container != "mp4")
    info = probe_video(path, decode=False)
    assert (info.frames, info.width, info.height) == (13, 96, 64)
    assert len(list(read_yuv420(path))) == 13


def test_sparse_centres_are_interpolated_between_decoded_neighbours():
    from avat3r_core.extract import centers_of_sparse_frames

    seen = []

    def center(frame):
        seen.append(frame)
        return None if frame == 9 else np.array([10.0 * frame, 1.0])

    decoded = [(i, i) for i in (0, 2, 4, 5, 7, 9, 11)]  # (index, "frame")
    out = centers_of_sparse_frames([1, 2, 3, 6, 10, 12], iter(decoded), center)
    np.testing.assert_allclose(out[1], [10.0, 1.0])  # between 0 and 2
    np.testing.assert_allclose(out[2], [20.0, 1.0])
    np.testing.assert_allclose(out[3], [30.0, 1.0])
    np.testing.assert_allclose(out[6], [60.0, 1.0])
    assert out[10] is None  # a neighbour without foreground: no centre made up
    np.testing.assert_allclose(out[12], [110.0, 1.0])  # after the last decoded frame: its centre
    assert seen == [0, 2, 4, 5, 7, 9, 11]  # wanted frames and their neighbours only


def test_plate_route_on_b_frames_centres_a_moving_head(tmp_path):
    """JPEG plates, no alpha, H.264 with B-frames (the head-centre pass skips those and
    interpolates): crops still centred on a moving head within 1 px."""
    root = tmp_path / "v2b"
    serials, w2c, scale = SERIALS[:4], rig(4), 0.25
    width, height = 550, 802
    K = K_FULL * [[scale], [scale], [1]]
    subject = root / "019"
    write_calibration(subject / "calibration" / "camera_params.json", serials, w2c)
    for c, serial in enumerate(serials):
        video = [render(w2c[c], K, width, height, seed=c, at=moving_head(t))[0] for t in range(V2_FRAMES)]
        write_pyav(subject / "sequences" / "EXP-1-head" / "images" / f"cam_{serial}.mp4", video, "libx264", "yuv420p")
        plate, _ = render(w2c[c], K, width, height, seed=c, head=False)
        (subject / "sequences" / "BACKGROUND").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(subject / "sequences" / "BACKGROUND" / f"image_{serial}.jpg"), cv2.cvtColor(plate, cv2.COLOR_RGB2BGR))
    from avat3r_core.video import reference_frames

    video = subject / "sequences" / "EXP-1-head" / "images" / f"cam_{serials[0]}.mp4"
    assert len(list(reference_frames(video))) < V2_FRAMES  # frames were skipped and interpolated
    _, frames = extract(root, tmp_path / "frames")
    rows = pq.read_table(frames.manifest).to_pylist()
    assert len(rows) == 4 * V2_FRAMES and {r["alpha_source"] for r in rows} == {"background_difference"}
    check_crops(rows, 0.25, alpha_dir=tmp_path / "frames", head=moving_head)


# --------------------------------------------------------------------------- transforms.json with fg_mask_path
def test_transforms_json_fg_masks_are_the_mattes(tmp_path):
    """A VHAP-style export (nerfstudio transforms.json, OpenGL camera-to-world, per-frame
    ``fg_mask_path`` as vhap/export_as_nerf_dataset.py writes it): the masks matte the crops
    (``alpha_map``), crops centred on the head; a missing mask is a named error."""
    root = tmp_path / "export" / "031"
    serials, w2c, scale = SERIALS[:4], rig(4), 0.125
    width, height = 275, 401
    K = K_FULL * [[scale], [scale], [1]]
    frames = []
    for c in range(4):
        image, mask = render(w2c[c], K, width, height, seed=c)
        c2w = np.linalg.inv(w2c[c])
        c2w[:3, 1:3] *= -1  # OpenCV -> OpenGL camera axes
        for t in range(2):
            name = f"{t:05d}_{c:02d}.png"
            for folder, data in (("images", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), ("fg_masks", mask)):
                (root / folder).mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / folder / name), data)
            frames.append({"file_path": f"images/{name}", "fg_mask_path": f"fg_masks/{name}",
                           "transform_matrix": c2w.tolist(), "timestep_index": t, "camera_index": c,
                           "fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2], "cy": K[1, 2], "w": width, "h": height})
    (root / "transforms.json").write_text(json.dumps({"frames": frames}))
    (root / "fg_masks" / "00001_02.png").unlink()
    index = scan_capture(tmp_path / "export")
    assert index.layout == "transforms"
    errors = [p for p in index.problems if p.severity == "error"]
    assert len(errors) == 1 and "fg_mask_path" in errors[0].message and errors[0].path.endswith("00001_02.png")
    _, out = extract(tmp_path / "export", tmp_path / "frames")
    rows = pq.read_table(out.manifest).to_pylist()
    assert len(rows) == 4 * 2 - 1 and {r["alpha_source"] for r in rows} == {"alpha_map"}
    check_crops(rows, scale, alpha_dir=tmp_path / "frames")
