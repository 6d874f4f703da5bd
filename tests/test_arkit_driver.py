"""ARKit-52 tracks in the Live Link Face CSV layout → expression codes."""

import numpy as np
import pytest

from avat3r_core.animation.arkit import (
    ARKIT52, DRIVEN, ArkitMapping, fit_arkit_mapping, mediapipe_to_arkit, read_live_link_csv)
from avat3r_core.errors import FormatError
from avat3r_core.tracking import expression_code as ec

# The header as Live Link Face writes it (typed out here, not generated from ARKIT52)
HEADER = ("Timecode,BlendShapeCount,EyeBlinkLeft,EyeLookDownLeft,EyeLookInLeft,EyeLookOutLeft,EyeLookUpLeft,"
          "EyeSquintLeft,EyeWideLeft,EyeBlinkRight,EyeLookDownRight,EyeLookInRight,EyeLookOutRight,EyeLookUpRight,"
          "EyeSquintRight,EyeWideRight,JawForward,JawRight,JawLeft,JawOpen,MouthClose,MouthFunnel,MouthPucker,"
          "MouthRight,MouthLeft,MouthSmileLeft,MouthSmileRight,MouthFrownLeft,MouthFrownRight,MouthDimpleLeft,"
          "MouthDimpleRight,MouthStretchLeft,MouthStretchRight,MouthRollLower,MouthRollUpper,MouthShrugLower,"
          "MouthShrugUpper,MouthPressLeft,MouthPressRight,MouthLowerDownLeft,MouthLowerDownRight,MouthUpperUpLeft,"
          "MouthUpperUpRight,BrowDownLeft,BrowDownRight,BrowInnerUp,BrowOuterUpLeft,BrowOuterUpRight,CheekPuff,"
          "CheekSquintLeft,CheekSquintRight,NoseSneerLeft,NoseSneerRight,TongueOut,HeadYaw,HeadPitch,HeadRoll,"
          "LeftEyeYaw,LeftEyePitch,LeftEyeRoll,RightEyeYaw,RightEyePitch,RightEyeRoll")


def _row(tc: str, jaw: float, blink: float = 0.0) -> str:
    vals = ["0"] * 52
    vals[0] = vals[7] = f"{blink:.4f}"  # EyeBlinkLeft, EyeBlinkRight
    vals[17] = f"{jaw:.4f}"  # JawOpen
    return ",".join([tc, "61", *vals, "0.01", "-0.02", "0.0", "0.1", "0.0", "0.0", "0.1", "0.0", "0.0"])


def test_reads_the_live_link_layout_by_name(tmp_path):
    path = tmp_path / "take.csv"
    path.write_text("\n".join([HEADER, _row("10:32:01:00.000", 0.0), _row("10:32:01:01.000", 0.55, 1.0),
                               _row("10:32:01:02.000", 1.02)]) + "\n")
    tcs, scores = read_live_link_csv(path)
    assert tcs[1] == "10:32:01:01.000" and scores.shape == (3, 52)
    jaw = ARKIT52.index("JawOpen")
    np.testing.assert_allclose(scores[:, jaw], [0.0, 0.55, 1.0])  # 1.02: solver overshoot, clipped
    assert scores[1, ARKIT52.index("EyeBlinkRight")] == 1.0 and scores[:, ARKIT52.index("TongueOut")].max() == 0


def test_missing_and_extra_columns_are_named(tmp_path):
    cols = HEADER.split(",")
    no_jaw = tmp_path / "no_jaw.csv"
    no_jaw.write_text(",".join(c for c in cols if c not in ("JawOpen", "MouthClose")) + "\n")
    with pytest.raises(FormatError, match="missing column.*JawOpen, MouthClose"):
        read_live_link_csv(no_jaw)
    extra = tmp_path / "extra.csv"
    extra.write_text(HEADER + ",Confidence\n" + _row("00:00:00:00.000", 0.1) + ",0.9\n")
    with pytest.raises(FormatError, match="unknown column.*Confidence"):
        read_live_link_csv(extra)
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "\n" + _row("00:00:00:00.000", 0.1).replace(",0.1000,", ",abc,") + "\n")
    with pytest.raises(FormatError, match="line 2, column JawOpen.*not a number"):
        read_live_link_csv(bad)
    far = tmp_path / "far.csv"
    far.write_text(HEADER + "\n" + _row("00:00:00:00.000", 3.0) + "\n")
    with pytest.raises(FormatError, match="JawOpen.*outside"):
        read_live_link_csv(far)


def test_mediapipe_names_map_to_arkit_order():
    names = ["_neutral", "browDownLeft", "jawOpen", "eyeBlinkLeft"]
    out = mediapipe_to_arkit(names, np.array([[0.9, 0.1, 0.7, 0.3]]))
    assert out[0, ARKIT52.index("JawOpen")] == pytest.approx(0.7)
    assert out[0, ARKIT52.index("BrowDownLeft")] == pytest.approx(0.1)
    assert out[0, ARKIT52.index("TongueOut")] == 0 and out.sum() == pytest.approx(1.1)


def test_fit_recovers_a_linear_map_and_reports_held_out_error(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (200, 52))
    scores[:, ARKIT52.index("TongueOut")] = 0  # as from MediaPipe
    jaw = 0.4 * scores[:, ARKIT52.index("JawOpen")]
    expr = np.zeros((200, 100))
    expr[:, 0] = 2.0 * scores[:, ARKIT52.index("JawOpen")]
    expr[:, 1] = 1.5 * scores[:, ARKIT52.index("MouthSmileLeft")] - 0.5 * scores[:, ARKIT52.index("MouthPucker")]
    codes = ec.encode({"expression": expr, "jaw": np.stack([jaw, 0 * jaw, 0 * jaw], 1)})
    codes[5, :] = np.nan  # a frame without a code is left out
    mapping = fit_arkit_mapping(scores, codes, ridge=1e-6, face_model_sha256="abc")
    err = mapping.fit_error
    held = err["held_out_rms"]
    assert err["pairs"] == 199 and held["expr"]["rms"] < 0.01 < held["expr"]["rms_mean_only"]
    assert held["jaw"]["rms"] < 0.01 < held["jaw"]["rms_mean_only"] and held["jaw_angle_correlation"] > 0.99
    path = tmp_path / "arkit_mapping.npz"
    mapping.save(path)
    again = ArkitMapping.load(path, face_model_sha256="abc")
    new = np.zeros((2, 52))
    new[1, ARKIT52.index("JawOpen")] = 1.0
    out = again.codes(new)
    params = ec.decode(out.astype(np.float64))
    assert params["jaw"][1, 0] == pytest.approx(0.4, abs=0.02) and params["expression"][1, 0] == pytest.approx(2.0, abs=0.05)
    assert abs(params["jaw"][0, 0]) < 0.02
    with pytest.raises(FormatError, match="another face model"):
        ArkitMapping.load(path, face_model_sha256="def")
    with pytest.raises(FormatError, match="expected \\(T, 52\\)"):
        again.codes(np.zeros((3, 51)))
    assert out.shape == (2, ec.DIM) and len(DRIVEN) == ec.HEAD_POSE.start


def test_csv_driver_codes_follow_jaw_open_with_the_head_at_the_reference(tmp_path):
    from avat3r_core.animation.drivers import csv_driver

    w = np.zeros((52, len(DRIVEN)))
    w[ARKIT52.index("JawOpen"), ec.EXPR.start] = 2.0
    rest = ec.encode({"expression": np.zeros((1, 100))})[0, DRIVEN]  # identity rotations at zero scores
    ArkitMapping(w.astype(np.float32), rest.astype(np.float32), {}, "").save(tmp_path / "map.npz")
    take = tmp_path / "take.csv"
    take.write_text("\n".join([HEADER, _row("00:00:00:00.000", 0.0), _row("00:00:00:01.000", 0.5)]) + "\n")
    d = csv_driver(take, tmp_path / "map.npz")
    codes = d.codes({"rotation": np.array([0.0, 0.2, 0.0]), "translation": np.zeros(3)})
    params = ec.decode(codes.astype(np.float64))
    np.testing.assert_allclose(params["expression"][:, 0], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(params["rotation"][:, 1], [0.2, 0.2], atol=1e-6)
    assert np.abs(params["jaw"]).max() < 1e-6
    assert "2 frames" in d.description and d.side_by_side([np.zeros((4, 4, 3))])[0].shape == (4, 4, 3)
