"""Capture readers: NeRSemble layout and nerfstudio transforms.json, with every problem named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.formats.calibration import write_nersemble_calibration, write_transforms_json
from avat3r_core.formats.capture import scan_capture
from avat3r_core.errors import FormatError
from avat3r_core.video import VideoInfo, encode_video, probe_video, read_frames


def frames(n, w=32, h=48, value=100):
    return [np.full((h, w, 3), (value + 7 * i) % 255, np.uint8) for i in range(n)]


def make_nersemble(root: Path, serials=("222200036", "222200037", "222200038"), n_frames=4):
    cams = Cameras.look_at(torch.tensor([[0.0, 0, 1], [0.3, 0, 1], [-0.3, 0, 1]], dtype=torch.float64)[: len(serials)],
                           (0, 0, 0), fov_deg=20, width=32, height=48, dtype=torch.float64)
    subject = root / "001"
    write_nersemble_calibration(subject / "calibration" / "camera_params.json", list(serials), cams)
    for seq in ("EXP-1-head", "BACKGROUND"):
        for serial in serials:
            path = subject / "sequences" / seq / "images" / f"cam_{serial}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_video(frames(n_frames if seq != "BACKGROUND" else 1)))
    return subject, cams


def test_nersemble_clean_capture_is_indexed(tmp_path):
    subject_dir, cams = make_nersemble(tmp_path)
    index = scan_capture(tmp_path)
    assert index.layout == "nersemble" and [p for p in index.problems if p.severity == "error"] == []
    subject = index.subjects["001"]
    assert subject.serials == ["222200036", "222200037", "222200038"]
    assert list(subject.sequences) == ["EXP-1-head"] and subject.background is not None
    seq = subject.sequences["EXP-1-head"]
    assert seq.frames == 4 and {m.width for m in seq.media.values()} == {32}
    # calibration at the media resolution: K unchanged
    torch.testing.assert_close(subject.cameras.K, cams.K)
    assert (subject.cameras.width, subject.cameras.height) == (32, 48)


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "header_only"])
def test_nersemble_problems_are_named_and_rest_is_indexed(tmp_path, decode):
    """Counting frames by decoding and trusting the header (extract's scan) find the same problems."""
    subject_dir, _ = make_nersemble(tmp_path)
    images = subject_dir / "sequences" / "EXP-1-head" / "images"
    good = (images / "cam_222200036.mp4").read_bytes()
    (images / "cam_222200037.mp4").write_bytes(good[: len(good) // 3])  # truncated
    (images / "cam_222200038.mp4").write_bytes(b"")  # zero bytes
    (images / "cam_999999999.mp4").write_bytes(good)  # not in calibration
    seq2 = subject_dir / "sequences" / "EXP-2-eyes" / "images"
    seq2.mkdir(parents=True)
    (seq2 / "cam_222200036.mp4").write_bytes(encode_video(frames(4)))
    (seq2 / "cam_222200037.mp4").write_bytes(encode_video(frames(6)))  # unequal length
    (seq2 / "cam_222200038.mp4").write_bytes(encode_video(frames(4, w=64, h=96)))  # wrong resolution
    index = scan_capture(tmp_path, decode=decode)
    messages = {(p.sequence, p.camera): p for p in index.problems}
    assert messages[("EXP-1-head", "222200037")].severity == "error"
    assert "cam_222200037.mp4" in messages[("EXP-1-head", "222200037")].path
    assert messages[("EXP-1-head", "222200038")].severity == "error"
    assert "no calibration" in messages[("EXP-1-head", "999999999")].message
    assert "unequal length" in messages[("EXP-2-eyes", None)].message
    assert "resolution 64x96 differs" in messages[("EXP-2-eyes", "222200038")].message
    subject = index.subjects["001"]
    assert list(subject.sequences["EXP-1-head"].media) == ["222200036"]  # the good one survives
    assert sorted(subject.sequences["EXP-2-eyes"].media) == ["222200036", "222200037"]


def test_header_probe_reads_what_a_decode_counts(tmp_path):
    """The header-only probe (FFmpeg's stream probe told to skip decoding) gets frame count, size
    and rate right, and the same container still decodes every frame afterwards."""
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_video(frames(7, w=48, h=32), fps=30))
    assert probe_video(path, decode=False) == probe_video(path, decode=True) == VideoInfo(7, 48, 32, 30.0)
    assert len(list(read_frames(path))) == 7
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 100)
    with pytest.raises(FormatError, match="unreadable video"):
        probe_video(tmp_path / "junk.mp4", decode=False)


def test_missing_and_malformed_calibration(tmp_path):
    subject_dir, _ = make_nersemble(tmp_path)
    calib = subject_dir / "calibration" / "camera_params.json"
    calib.write_text('{"world_2_cam": {"222200036": [[1, 0, 0], [0, 1, 0]]}, "intrinsics": [[1,0,0],[0,1,0],[0,0,1]]}')
    index = scan_capture(tmp_path)
    problem = next(p for p in index.problems if p.path == str(calib))
    assert "world_2_cam.222200036" in problem.message
    calib.unlink()
    index = scan_capture(tmp_path)
    assert any(p.message == "calibration file missing" for p in index.problems)


def test_downscaled_videos_scale_full_resolution_calibration(tmp_path):
    # a real NeRSemble calibration is at 2200x3208; videos downscaled 4x (550x802) must scale K
    K = torch.tensor([[8000.0, 0, 1100.0], [0, 8000.0, 1604.0], [0, 0, 1]], dtype=torch.float64)
    cams = Cameras(torch.eye(4, dtype=torch.float64)[None], K[None], 2200, 3208)
    subject = tmp_path / "017"
    write_nersemble_calibration(subject / "calibration" / "camera_params.json", ["220700191"], cams)
    video = subject / "sequences" / "EXP-1-head" / "images" / "cam_220700191.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(encode_video(frames(2, w=550, h=802)))
    index = scan_capture(tmp_path)
    scaled = index.subjects["017"].cameras
    assert (scaled.width, scaled.height) == (550, 802)
    torch.testing.assert_close(scaled.K[0], K * torch.tensor([[0.25], [0.25], [1.0]], dtype=torch.float64))


def test_transforms_json_layout_groups_cameras(tmp_path):
    from PIL import Image

    eyes = torch.tensor([[0.0, 0, 1], [0.4, 0, 1]], dtype=torch.float64)
    cams = Cameras.look_at(eyes, (0, 0, 0), fov_deg=30, width=16, height=16, dtype=torch.float64)
    subject = tmp_path / "alice"
    paths = []
    for t in range(3):
        for c in range(2):
            rel = f"frames/{t:03d}/cam{c}.png"
            (subject / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(subject / rel)
            paths.append(rel)
    write_transforms_json(subject / "transforms.json", paths, cams[[0, 1, 0, 1, 0, 1]])
    (subject / paths[-1]).unlink()
    index = scan_capture(tmp_path)
    assert index.layout == "transforms"
    sequence = index.subjects["alice"].sequences["default"]
    assert sorted(sequence.media) == ["cam00", "cam01"]
    # a missing image fails that (frame, camera) only, as in NeRSemble v1 (the camera keeps its
    # frame positions; the extract stage then names the one item that fails)
    assert sequence.media["cam00"].frames == sequence.media["cam01"].frames == 3
    missing = [p for p in index.problems if "image file missing" in p.message]
    assert [(p.camera, p.frame) for p in missing] == [("cam01", 2)]


def test_unknown_layout_is_a_clear_error(tmp_path):
    from avat3r_core.errors import FormatError

    with pytest.raises(FormatError, match="no known capture layout"):
        scan_capture(tmp_path)
