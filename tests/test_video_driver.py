"""A monocular video drives an avatar: MediaPipe → face-model fit → smoothed codes; frames without a face."""

import logging
import os

import numpy as np
import pytest

from avat3r_core.animation.drivers import Driver, fill_missing, smooth, video_driver
from avat3r_core.tracking import expression_code as ec
from avat3r_core.tracking.landmarks import mediapipe_available

needs_mediapipe = pytest.mark.skipif(not mediapipe_available(), reason="mediapipe is installed by make setup")


def _photo() -> np.ndarray:
    import matplotlib
    from PIL import Image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return np.asarray(Image.open(path).convert("RGB"))


def _write_video(path, frames, fps=12):
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _moving_camera(n=6, size=192, blank=()):
    """A virtual camera panning and zooming over a real photo; ``blank`` frames show no face."""
    from PIL import Image

    src = _photo()
    out = []
    for i in range(n):
        x0, y0, side = 60 + 8 * i, 20 + 4 * i, 420 - 10 * i
        if i in blank:
            out.append(np.full((size, size, 3), 90, np.uint8))
        else:
            out.append(np.asarray(Image.fromarray(src[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.BILINEAR)))
    return out


def test_fill_missing_interpolates_and_holds_ends_and_smooth_is_a_moving_average():
    v = np.array([[0.0], [9.0], [9.0], [3.0], [9.0]])
    found = np.array([False, True, False, True, False])
    np.testing.assert_allclose(fill_missing(v, found)[:, 0], [9.0, 9.0, 6.0, 3.0, 3.0])
    np.testing.assert_allclose(smooth(np.array([[0.0], [3.0], [6.0], [0.0]]))[:, 0], [1.0, 3.0, 3.0, 2.0])
    with pytest.raises(ValueError):
        fill_missing(v, np.zeros(5, bool))


def test_driver_side_by_side_and_head_at_reference():
    params = {"expression": np.zeros((2, 100)), "jaw": np.array([[0.2, 0, 0], [0.0, 0, 0]]),
              "neck": np.zeros((2, 3)), "eyes": np.zeros((2, 6))}
    d = Driver(params, "test", frames=[np.zeros((100, 50, 3), np.uint8)] * 2)
    codes = d.codes({"rotation": np.array([0.0, 0.3, 0.0]), "translation": np.array([0.0, 0.0, 0.1])})
    back = ec.decode(codes.astype(np.float64))
    np.testing.assert_allclose(back["jaw"][:, 0], [0.2, 0.0], atol=1e-6)
    np.testing.assert_allclose(back["rotation"][:, 1], [0.3, 0.3], atol=1e-6)
    out = d.side_by_side([np.ones((64, 64, 3), np.uint8)] * 2)
    assert out[0].shape == (64, 32 + 64, 3) and (out[0][:, 32:] == 1).all()


@needs_mediapipe
def test_video_of_a_real_photo_with_faceless_frames(tmp_path, caplog):
    from avat3r_core.synthetic.studio import write_face_model

    video = tmp_path / "driver.mp4"
    _write_video(video, _moving_camera(5, blank=(2, 3)))
    model, embedding = write_face_model(str(tmp_path / "face"), 0)
    with caplog.at_level(logging.WARNING, logger="avat3r.animation"):
        d = video_driver(video, model, embedding)
    assert d.missing == [2, 3] and "no face in 2 of 5 frames (2, 3)" in caplog.text
    codes = d.codes()
    assert codes.shape == (5, ec.DIM) and np.isfinite(codes).all() and len(d.frames) == 5
    jaw = np.linalg.norm(d.params["jaw"], axis=1)
    assert jaw.max() < 0.5  # a closed-mouth photo: no wild jaw
    # interpolated frames lie between their neighbours with a face (before/after the gap)
    e = d.params["expression"][:, :10]
    lo, hi = np.minimum(e[1], e[4]), np.maximum(e[1], e[4])
    assert ((e[2:4] >= lo - 0.5) & (e[2:4] <= hi + 0.5)).all()


@needs_mediapipe
def test_video_without_any_face_is_named(tmp_path):
    from avat3r_core.reconstruct.errors import NoFaceError
    from avat3r_core.synthetic.studio import write_face_model

    video = tmp_path / "wall.mp4"
    _write_video(video, [np.full((96, 96, 3), 120, np.uint8)] * 3)
    model, embedding = write_face_model(str(tmp_path / "face"), 0)
    with pytest.raises(NoFaceError, match="wall.mp4.*no face in any of the 3 frames"):
        video_driver(video, model, embedding)
