"""Expression sensitivity: lip gap, region boxes and scores, the four-code probe, sequence agreement."""

import dataclasses

import numpy as np
import pytest
import torch

from avat3r_core.animation.sensitivity import (
    ExpressionProbe, MOUTH, input_code, lip_gap, neutral_like, region_boxes, region_scores, sequence_agreement,
    with_head_pose)
from avat3r_core.config import build
from avat3r_core.model import Avat3r
from avat3r_core.model.config import Avat3rConfig
from avat3r_core.tracking import expression_code as ec
from avat3r_core.inference.predict import targets_on_background
from avat3r_core.train.synthetic import synthetic_sample


def _face68(gap: float, eye_dist: float = 40.0, cx: float = 64.0, cy: float = 64.0) -> np.ndarray:
    """Hand-placed iBUG-68 points: eyes on a line, the mouth below with a given inner-lip gap."""
    p = np.zeros((68, 2))
    p[36:42] = [cx - eye_dist / 2, cy - 20]  # right eye, outer corner 36
    p[42:48] = [cx + eye_dist / 2, cy - 20]  # left eye, outer corner 45
    p[48:60, 0] = np.linspace(cx - 15, cx + 15, 12)
    p[48:60, 1] = cy + 20
    p[60:68, 0] = np.linspace(cx - 10, cx + 10, 8)
    p[60:68, 1] = cy + 20
    p[[62, 66], 0] = cx  # inner-lip middles, one above the other
    p[62, 1] = cy + 20 - gap / 2
    p[66, 1] = cy + 20 + gap / 2
    return p


def test_lip_gap_is_gap_over_eye_corners_and_nan_when_hidden():
    pts = np.stack([_face68(8.0), _face68(0.0), _face68(8.0, eye_dist=80.0)])
    vis = np.ones((3, 68), bool)
    vis[2, 66] = False
    np.testing.assert_allclose(lip_gap(pts, vis)[:2], [0.2, 0.0])
    assert np.isnan(lip_gap(pts, vis)[2])
    np.testing.assert_allclose(lip_gap(pts)[2], 0.1)  # scale-invariant: twice the face, same gap → half


def test_region_psnr_sees_a_change_only_inside_the_mouth_box():
    H = W = 128
    pts = _face68(6.0)[None].repeat(2, 0)
    vis = np.ones((2, 68), bool)
    box = region_boxes(pts, vis, MOUTH, H, W)
    x0, y0, x1, y1 = box[0]
    assert x0 <= 49 and x1 >= 79 and y0 <= 81 and y1 >= 87 and (y1 - y0) >= 16  # padded around the mouth points (49..79, 81..87)
    target = torch.full((2, 3, H, W), 0.5)
    pred = target.clone()
    pred[1, :, 78:84, 60:68] = 1.0  # a mouth change (inside the box), view 1 only
    p, s = region_scores(pred, target, box)
    assert p[0] == 100.0 and s[0] == pytest.approx(1.0)
    mse = (0.5 ** 2) * 48 / ((x1 - x0) * (y1 - y0))
    assert p[1] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5) and s[1] < 0.9
    few = vis.copy()
    few[:, 48:66] = False  # two visible mouth points are no box
    assert (region_boxes(pts, few, MOUTH, H, W) == -1).all()


def test_sequence_agreement_correlation_and_range_ratio():
    truth = [0.01, 0.2, 0.38, 0.2, 0.01]
    half = [0.1 + x / 2 for x in truth]
    q = sequence_agreement(truth, half)
    assert q["correlation"] == pytest.approx(1.0) and q["range_ratio"] == pytest.approx(0.5)
    q = sequence_agreement(truth, [0.07, 0.08, 0.075, 0.072, float("nan")])
    assert q["frames"] == 4 and q["range_ratio"] == pytest.approx(0.01 / 0.37)
    assert sequence_agreement(truth, [0.1] * 5)["correlation"] is None  # a constant render has none


def test_neutral_keeps_head_pose_and_rests_the_rest():
    code = torch.as_tensor(ec.encode({"expression": np.full((1, 100), 0.7), "jaw": [[0.3, 0, 0]],
                                      "rotation": [[0.1, 0.2, 0.0]], "translation": [[0.0, 0.01, 0.2]]}), dtype=torch.float32)
    n = neutral_like(code)
    params = ec.decode(n.double())
    assert np.abs(params["expression"]).max() == 0 and np.abs(params["jaw"]).max() < 1e-7
    torch.testing.assert_close(n[:, ec.HEAD_POSE], code[:, ec.HEAD_POSE])


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    config = build(Avat3rConfig, {"image_size": 32, "feature_dim": 0}, preset="tiny")
    model = Avat3r(config).eval()
    batch = synthetic_sample(0, size=32, num_inputs=2, num_targets=2, expression_scale=1.0)
    codes = torch.randn(1, 2, 135, generator=torch.Generator().manual_seed(3))
    return model, dataclasses.replace(batch, input_expressions=codes)


def test_probe_measures_nothing_for_a_model_blind_to_the_code_and_something_otherwise():
    model, batch = _model_and_batch()
    targets = targets_on_background(batch, torch.ones(3)).clamp(0, 1)
    with torch.no_grad():  # a large head output so the expression's effect on the render is visible
        model.head.reset_output(0.5)
    probe = ExpressionProbe(model)
    probe.add(batch, targets)
    s = probe.summary()
    assert s["views"] == 2 and s["codes"]["inputs"]["mouth_psnr"] is None  # no landmarks, no regions
    assert abs(s["target_minus_inputs"]["psnr"]) > 1e-4
    torch.testing.assert_close(input_code(batch), batch.input_expressions.mean(1))
    with torch.no_grad():
        for layer in model.transformer.cross:
            layer.out.weight.zero_()
            layer.out.bias.zero_()
    blind = ExpressionProbe(model)
    blind.add(batch, targets)
    d = blind.summary()["target_minus_inputs"]
    assert d["psnr"] == pytest.approx(0.0, abs=1e-9) and d["ssim"] == pytest.approx(0.0, abs=1e-9)


def test_probe_tells_the_code_s_head_pose_from_its_expression():
    """A network that reads only the code's head pose gains over the inputs' code, and nothing over
    the inputs' expression posed as the target; one that reads only the expression the other way."""
    model, batch = _model_and_batch()
    t = batch.expression.clone()
    t[:, ec.HEAD_POSE] += 0.3  # the target's pose differs from the inputs' mean pose
    batch = dataclasses.replace(batch, expression=t)
    targets = targets_on_background(batch, torch.ones(3)).clamp(0, 1)
    with torch.no_grad():
        model.head.reset_output(0.5)
    fc1 = model.transformer.expression.fc1.weight
    pose = torch.zeros(fc1.shape[1], dtype=torch.bool)
    pose[ec.HEAD_POSE] = True
    torch.testing.assert_close(with_head_pose(input_code(batch), t)[:, ec.HEAD_POSE], t[:, ec.HEAD_POSE])
    deltas = {}
    for reads, keep in (("pose", pose), ("expression", ~pose)):
        with torch.no_grad():
            saved = fc1.clone()
            fc1[:, ~keep] = 0.0
        probe = ExpressionProbe(model)
        probe.add(batch, targets)
        with torch.no_grad():
            fc1.copy_(saved)
        s = probe.summary()
        deltas[reads] = (s["target_minus_inputs"]["psnr"], s["target_minus_inputs_expression"]["psnr"])
    assert abs(deltas["pose"][0]) > 1e-4 and deltas["pose"][1] == pytest.approx(0.0, abs=1e-9)
    assert abs(deltas["expression"][1]) > 1e-4
    assert deltas["expression"][1] == pytest.approx(deltas["expression"][0], abs=1e-9)


def test_probe_lip_gap_per_sequence_from_a_detector():
    model, batch = _model_and_batch()
    targets = targets_on_background(batch, torch.ones(3)).clamp(0, 1)
    gaps = iter([0.1, 0.3, 0.2, 0.22, 0.25])  # per call: truth, target, inputs, inputs' expression, neutral code

    def detector(images, rows):
        g = next(gaps)
        return np.stack([_face68(g * 40.0)] * len(images)), np.ones(len(images), bool)

    probe = ExpressionProbe(model, detector=detector)
    rows = [{"subject": "007", "sequence": "EXP-5-mouth"}] * 2
    probe.add(batch, targets, rows)
    s = probe.summary()
    (q,) = s["lip_gap_sequences"]
    assert (q["subject"], q["sequence"], q["frames"]) == ("007", "EXP-5-mouth", 1)
    assert q["truth_min"] == pytest.approx(0.1) and q["render_min"] == pytest.approx(0.3)
    assert "| 007 | EXP-5-mouth | 1 |" in probe.to_markdown()


# --------------------------------------------------------------------------- mouth weights
def test_box_weights_are_one_outside_and_one_plus_w_inside():
    from avat3r_core.animation.sensitivity import box_weights

    w = box_weights(np.array([[2, 3, 6, 5], [-1, -1, -1, -1]]), 8, 10, 4.0)
    assert w.shape == (2, 1, 8, 10)
    inside = torch.zeros(8, 10, dtype=torch.bool)
    inside[3:5, 2:6] = True
    assert (w[0, 0][inside] == 5.0).all() and (w[0, 0][~inside] == 1.0).all()
    assert (w[1] == 1.0).all()  # no box: no weight


@pytest.fixture(scope="module")
def face_model(tmp_path_factory):
    from avat3r_core.synthetic.studio import write_face_model

    return write_face_model(str(tmp_path_factory.mktemp("head")), seed=0)


def _front_batch(jaw: float, size: int = 128):
    """Two target views of the head frame from 1 m in front (z is out of the face) and 20° to the
    side; the code opens the jaw by ``jaw`` rad."""
    from avat3r_core.cameras import Cameras

    batch = synthetic_sample(0, size=size, num_inputs=2, num_targets=2)
    eyes = torch.tensor([[0.0, -0.03, 1.0], [np.sin(0.35), -0.03, np.cos(0.35)]])
    cams = Cameras.look_at(eyes, (0.0, -0.03, 0.0), fov_deg=18.0, width=size, height=size)
    code = torch.as_tensor(ec.encode({"expression": np.zeros((1, 100)), "jaw": np.array([[jaw, 0.0, 0.0]])}),
                           dtype=torch.float32)
    return dataclasses.replace(batch, target_cameras=cams, expression=code)


def test_mouth_weights_follow_the_landmarks_given_or_the_projected_face_models_mouth(face_model):
    from avat3r_core.animation.sensitivity import MouthWeights, box_weights

    mouth = MouthWeights(4.0, *face_model)
    closed, opened = _front_batch(0.0), _front_batch(0.3)
    w = mouth(closed)
    assert w.shape == (1, 2, 1, 128, 128) and set(w.unique().tolist()) == {1.0, 5.0}
    pts, vis = mouth.projected_landmarks(closed)
    lips, eyes = pts[0, MOUTH], pts[0, 36:48]
    # the raised box holds every lip point of the view and lies below the eyes
    rows, cols = torch.nonzero(w[0, 0, 0] == 5.0, as_tuple=True)
    assert rows.min() <= lips[:, 1].min() and rows.max() >= lips[:, 1].max() - 1
    assert cols.min() <= lips[:, 0].min() and cols.max() >= lips[:, 0].max() - 1
    assert rows.min() > eyes[:, 1].max()
    # the box follows the code: an open jaw makes it taller
    height = lambda x: int((x[0, 0, 0] == 5.0).any(1).sum())  # noqa: E731
    assert height(mouth(opened)) > height(w) + 8
    # ground-truth landmarks, when given, decide instead of the face model
    gt = np.stack([_face68(8.0, cx=20.0, cy=30.0)] * 2)
    given = mouth(closed, gt, np.ones((2, 68), bool))
    torch.testing.assert_close(given.flatten(0, 1), box_weights(
        region_boxes(gt, np.ones((2, 68), bool), MOUTH, 128, 128), 128, 128, 4.0))
    with pytest.raises(ValueError, match="> 0"):
        MouthWeights(0.0, *face_model)


def test_weighted_loss_differs_from_the_plain_one_only_through_the_mouth_pixels():
    from avat3r_core.animation.sensitivity import box_weights
    from avat3r_core.losses import Avat3rLoss, LossConfig

    loss = Avat3rLoss(LossConfig(l1_weight=1.0, ssim_weight=0.0))
    target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    weights = box_weights(np.array([[4, 4, 8, 8], [0, 0, 16, 4]]), 16, 16, 3.0)
    # the same error at every pixel: weighting changes nothing
    same = target + 0.1
    assert float(loss(same, target, mask=weights)[0]) == pytest.approx(float(loss(same, target)[0]), rel=1e-6)
    # all-ones weights are the plain loss exactly (the default path)
    pred = target + 0.2 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert float(loss(pred, target, mask=torch.ones(2, 1, 16, 16))[0]) == pytest.approx(float(loss(pred, target)[0]))
    # per pixel, the weighted loss's gradient is 1 + w times larger inside the box than outside
    p = pred.clone().requires_grad_(True)
    loss(p, target, mask=weights)[0].backward()
    g = p.grad.abs()[0, 0]
    inside = weights[0, 0] > 1
    ratio = g[inside].mean() / g[~inside].mean()
    assert float(ratio) == pytest.approx(4.0, rel=1e-5)
