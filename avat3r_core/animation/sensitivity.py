"""Expression sensitivity: does the expression code change the render the way the target changed?

Held-out PSNR is earned mostly by view synthesis: a model that ignores its expression code still
scores well when the target's expression is close to the inputs'. So every held-out sample is
rendered four times from the *same inputs and cameras*, only the code differing:

* ``target``  — the target timestep's code (what evaluation scores anyway);
* ``inputs``  — the mean code of the input views' own timesteps (``Avat3rBatch.input_expressions``):
  what the input images already show;
* ``inputs_expression`` — that code with the target's head pose dims (:func:`with_head_pose`): what
  the inputs show, posed as the target. ``target − inputs_expression`` is what the *expression*
  earns; ``inputs_expression − inputs`` is what the code's head pose alone earns. The two differ:
  in the head frame the pose still changes the image (light fixed in the world re-shades the face
  as the head turns; the shoulders do not turn with it), over far more pixels than a mouth, so a
  network can learn to use the code's pose long before its expression
  (a 3000-step demo run: +0.63 dB over the inputs' code, −0.03 dB over the inputs' expression);
* ``neutral`` — expression, eyelids zero, eyes / neck / jaw at rest; the head pose dims kept from the
  target (pose is not expression).

Per target view and code: PSNR / SSIM over the view and inside the **mouth** and **eye** boxes
(the box of the view's ground-truth iBUG-68 points 48–67, resp. 36–47, padded by
:data:`BOX_PAD` of its size on each side, at least :data:`BOX_MIN` px a side so SSIM's 11-px
window fits). A model whose expression path works scores clearly higher with the target code than
with the inputs' code inside the mouth box whenever the target's mouth differs from the inputs'.

**Lip gap** (:func:`lip_gap`): inner-lip gap ``|p66 − p62|`` over the eye-corner distance
``|p45 − p36|`` (iBUG-68, 0-based), scale- and roughly view-invariant. On renders it comes from
the image detector (MediaPipe mapped to iBUG-68); on the ground-truth target from the same detector,
or from the projected face-model landmarks when it finds no face. Per (subject, sequence), frames
in order, each frame the mean over its target views: Pearson **correlation** of the render's lip
gap (target code) with the ground truth's, and the **range ratio** ``ptp(render) / ptp(truth)``
(1 = the mouth opens as far as the person's).

**Mouth weights** (:class:`MouthWeights`, training's ``train.data.mouth_weight``): the mouth is a
few percent of a view's pixels, so the photometric loss barely sees whether it opens; the weights
count each pixel of the view's mouth box ``1 + weight`` times (:func:`box_weights`).

No Ray, no Prefect; used by :func:`avat3r_core.evaluation.evaluate_report` (with landmarks) and
by training's validation (whole-view numbers only: no landmarks there).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from avat3r_core.batch import Avat3rBatch
from avat3r_core.metrics import PSNR_CAP, psnr, ssim
from avat3r_core.tracking import expression_code as ec

__all__ = ["BOX_MIN", "BOX_PAD", "CODES", "ExpressionProbe", "MOUTH", "EYES", "MouthWeights", "box_weights", "input_code",
           "lip_gap", "neutral_like", "region_boxes", "region_scores", "sequence_agreement", "with_head_pose"]

CODES = ("target", "inputs", "inputs_expression", "neutral")
MOUTH = slice(48, 68)
EYES = slice(36, 48)
INNER_LIP_UPPER, INNER_LIP_LOWER = 62, 66
EYE_OUTER_RIGHT, EYE_OUTER_LEFT = 36, 45
BOX_PAD = 0.3
BOX_MIN = 16


def input_code(batch: Avat3rBatch) -> Tensor:
    """(B, 135) the mean code of the input views' timesteps."""
    if batch.input_expressions is None:
        raise ValueError(f"batch {batch.keys[:2]}: no input_expressions (shards read by an older loader?)")
    return batch.input_expressions.mean(dim=1)


def with_head_pose(code: Tensor, pose_of: Tensor) -> Tensor:
    """``code`` (B, 135) with the head pose dims of ``pose_of`` (B, 135)."""
    out = code.clone()
    out[:, ec.HEAD_POSE] = pose_of[:, ec.HEAD_POSE]
    return out


def neutral_like(code: Tensor) -> Tensor:
    """``code`` (B, 135) with the expression at rest and its head pose dims kept."""
    rest = torch.as_tensor(ec.encode({"expression": np.zeros((1, ec.N_EXPR))})[0], dtype=code.dtype, device=code.device)
    return with_head_pose(rest.expand_as(code), code)


def lip_gap(points: np.ndarray, visible: np.ndarray | None = None) -> np.ndarray:
    """(N, 68, 2) iBUG points → (N,) inner-lip gap over eye-corner distance (NaN where a needed point
    is not visible or the eyes coincide)."""
    points = np.asarray(points, np.float64)
    need = [INNER_LIP_UPPER, INNER_LIP_LOWER, EYE_OUTER_RIGHT, EYE_OUTER_LEFT]
    gap = np.linalg.norm(points[:, INNER_LIP_LOWER] - points[:, INNER_LIP_UPPER], axis=-1)
    eyes = np.linalg.norm(points[:, EYE_OUTER_LEFT] - points[:, EYE_OUTER_RIGHT], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(eyes > 1e-6, gap / eyes, np.nan)
    if visible is not None:
        visible = np.asarray(visible, bool)
        ok = visible[:, need].all(axis=1) if visible.ndim == 2 else visible
        out = np.where(ok, out, np.nan)
    return out


def region_boxes(points: np.ndarray, visible: np.ndarray, region: slice, height: int, width: int,
                 pad: float = BOX_PAD, min_size: int = BOX_MIN) -> np.ndarray:
    """(N, 4) integer boxes ``x0, y0, x1, y1`` (exclusive) around the visible points of ``region``,
    clipped to the image; a row of -1 where fewer than 3 of its points are visible."""
    boxes = np.full((len(points), 4), -1, np.int64)
    for i, (p, v) in enumerate(zip(np.asarray(points)[:, region], np.asarray(visible, bool)[:, region])):
        if v.sum() < 3:
            continue
        lo, hi = p[v].min(0), p[v].max(0)
        size = np.maximum((hi - lo) * (1 + 2 * pad), min_size)
        c = 0.5 * (lo + hi)
        x0, y0 = np.floor(c - size / 2).astype(int)
        x1, y1 = np.ceil(c + size / 2).astype(int)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x1 - x0 >= 11 and y1 - y0 >= 11:  # SSIM's window must fit
            boxes[i] = (x0, y0, x1, y1)
    return boxes


def box_weights(boxes: np.ndarray, height: int, width: int, weight: float) -> Tensor:
    """(N, 1, H, W) per-pixel loss weights: 1 everywhere, ``1 + weight`` inside each row's box
    (``x0, y0, x1, y1``, exclusive, as :func:`region_boxes` gives them; a row of -1: no box, all 1)."""
    out = torch.ones(len(boxes), 1, height, width)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes).tolist()):
        if x0 >= 0:
            out[i, :, y0:y1, x0:x1] += weight
    return out


class MouthWeights:
    """Loss weights raising the mouth of every target view of a batch: (B, T, 1, H, W), 1 outside
    the view's mouth box (:func:`region_boxes` of iBUG points 48–67), ``1 + weight`` inside.

    The box comes from the view's ground-truth landmarks when the caller has them, else from the
    face model's mouth projected into the view: the model (FLAME layout with a 68-point iBUG
    embedding, the one tracking fitted) with the target's expression, jaw and eyes, at rest shape
    and no head or neck pose. In the head frame that is where the mouth is, up to the person's
    shape and scale (:meth:`~avat3r_core.flame.FlameLayer.head_to_world`: points of the head frame
    are the unposed head times the scale), which the box's padding absorbs; so the batch must be
    in the head frame (the loader's default).
    """

    def __init__(self, weight: float, face_model: str, landmark_embedding: str):
        from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding

        if not weight > 0:
            raise ValueError(f"mouth weight must be > 0 (0 is off: build no MouthWeights), got {weight}")
        embedding = load_landmark_embedding(landmark_embedding)
        if len(embedding) != 68:
            raise ValueError(f"{landmark_embedding}: mouth weights need a 68-point iBUG landmark embedding, "
                             f"this one embeds {len(embedding)} points")
        self.weight = float(weight)
        self.layer = FlameLayer(load_flame_model(face_model), landmarks=embedding).eval()

    @torch.no_grad()
    def projected_landmarks(self, batch: Avat3rBatch) -> tuple[np.ndarray, np.ndarray]:
        """(B·T, 68, 2) the face model's iBUG points in each target view (head-frame cameras) and
        (B·T, 68) whether each is in front of the camera."""
        params = ec.decode(batch.expression.detach().cpu().double())
        t = lambda key: torch.as_tensor(params[key], dtype=self.layer.v_template.dtype)  # noqa: E731
        points = self.layer(expr=t("expression")[:, :self.layer.n_expr], jaw=t("jaw"), eyes=t("eyes")).landmarks
        T = batch.target_images.shape[1]
        cams = batch.target_cameras
        uv, depth = cams.project(points.repeat_interleave(T, 0).to(cams.world_to_cam))
        return uv.cpu().numpy(), (depth > 0).cpu().numpy()

    def __call__(self, batch: Avat3rBatch, points: np.ndarray | None = None,
                 visible: np.ndarray | None = None) -> Tensor:
        """The weights of ``batch``'s target views; ``points``/``visible`` (B·T, 68, ·): their
        ground-truth landmarks, when there are any."""
        B, T, _, H, W = batch.target_images.shape
        if points is None:
            points, visible = self.projected_landmarks(batch)
        boxes = region_boxes(points, visible, MOUTH, H, W)
        return box_weights(boxes, H, W, self.weight).view(B, T, 1, H, W).to(batch.target_images.device)


def region_scores(pred: Tensor, target: Tensor, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSNR and SSIM (N,) of ``pred`` vs ``target`` (N, 3, H, W) inside each box (NaN without one)."""
    p_out, s_out = np.full(len(boxes), np.nan), np.full(len(boxes), np.nan)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        if x0 < 0:
            continue
        a, b = pred[i:i + 1, :, y0:y1, x0:x1], target[i:i + 1, :, y0:y1, x0:x1]
        p_out[i] = float(psnr(a, b).clamp(max=PSNR_CAP))
        s_out[i] = float(ssim(a, b))
    return p_out, s_out


def sequence_agreement(truth: Sequence[float], render: Sequence[float]) -> dict:
    """Correlation and range ratio of a render's lip-gap series against the truth's (NaNs dropped)."""
    t, r = np.asarray(truth, np.float64), np.asarray(render, np.float64)
    ok = np.isfinite(t) & np.isfinite(r)
    t, r = t[ok], r[ok]
    out = {"frames": int(ok.sum()), "truth_min": None, "truth_max": None, "render_min": None, "render_max": None,
           "correlation": None, "range_ratio": None}
    if len(t) == 0:
        return out
    out.update(truth_min=float(t.min()), truth_max=float(t.max()), render_min=float(r.min()), render_max=float(r.max()))
    if len(t) >= 3 and np.ptp(t) > 0 and np.ptp(r) > 0:
        out["correlation"] = float(np.corrcoef(t, r)[0, 1])
    if np.ptp(t) > 0:
        out["range_ratio"] = float(np.ptp(r) / np.ptp(t))
    return out


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return sum(v) / len(v) if v else None


class ExpressionProbe:
    """Collects the four-code renders of every batch it is given; :meth:`summary` reduces them.

    ``detector``: ``images (N, H, W, 3) uint8, rows -> (points (N, 68, 2), found (N,))`` (e.g.
    :class:`avat3r_core.evaluation.MediaPipe68`) for the lip gap; without it there is none.
    """

    def __init__(self, model, background: Sequence[float] = (1.0, 1.0, 1.0), bf16: bool = True, detector=None,
                 detector_status: str = ""):
        self.model, self.background, self.bf16 = model, tuple(background), bf16
        self.detector = detector
        self.detector_status = detector_status if detector is None else ""
        self.rows: list[dict] = []
        self.code_distance: list[float] = []  # per sample: mean |target − inputs| over expression + jaw dims

    def _render(self, batch: Avat3rBatch, code: Tensor) -> Tensor:
        from avat3r_core.inference.predict import predict_images

        return predict_images(dataclasses.replace(batch, expression=code), self.model, self.background,
                              self.bf16).float().clamp(0, 1)

    @torch.no_grad()
    def add(self, batch: Avat3rBatch, targets: Tensor, rows: Sequence[dict | None] | None = None,
            gt_points: np.ndarray | None = None, gt_visible: np.ndarray | None = None,
            pred_target: Tensor | None = None) -> None:
        """One batch: ``targets`` (B·T, 3, H, W) as evaluated; ``rows`` its frames-manifest rows;
        ``gt_points``/``gt_visible`` (B·T, 68, ·) ground-truth landmarks of the target views;
        ``pred_target`` the render with the target code when the caller has it already."""
        from avat3r_core.evaluation import to_uint8

        B, T = batch.batch_size, batch.target_images.shape[1]
        H, W = targets.shape[-2:]
        codes = {"target": batch.expression, "inputs": input_code(batch)}
        codes["inputs_expression"] = with_head_pose(codes["inputs"], codes["target"])
        codes["neutral"] = neutral_like(codes["target"])
        sel = torch.cat([torch.arange(ec.N_EXPR), torch.arange(ec.JAW.start, ec.JAW.stop)])
        self.code_distance += (codes["target"] - codes["inputs"])[:, sel].abs().mean(1).tolist()
        boxes = {}
        if gt_points is not None:
            boxes = {name: region_boxes(gt_points, gt_visible, region, H, W)
                     for name, region in (("mouth", MOUTH), ("eyes", EYES))}
        truth_gap = np.full(B * T, np.nan)
        if self.detector is not None:
            pts, found = self.detector(to_uint8(targets), rows)
            truth_gap = np.where(found, lip_gap(pts), np.nan)
        if gt_points is not None:  # the projected face-model landmarks where the detector found no face
            truth_gap = np.where(np.isfinite(truth_gap), truth_gap, lip_gap(gt_points, gt_visible))
        for name, code in codes.items():
            pred = pred_target if (name == "target" and pred_target is not None) else self._render(batch, code)
            p = psnr(pred, targets).clamp(max=PSNR_CAP).cpu().double().numpy()
            s = ssim(pred, targets).cpu().double().numpy()
            regions = {k: region_scores(pred, targets, b) for k, b in boxes.items()}
            gap = np.full(B * T, np.nan)
            if self.detector is not None:
                pts, found = self.detector(to_uint8(pred), rows)
                gap = np.where(found, lip_gap(pts), np.nan)
            for b in range(B):
                for t in range(T):
                    i = b * T + t
                    row = rows[i] if rows is not None else None
                    out = {"code": name, "key": batch.keys[b], "view": t, "frame": int(batch.target_frames[b]),
                           "subject": row["subject"] if row else batch.keys[b].split("_")[0],
                           "sequence": row["sequence"] if row else "", "psnr": float(p[i]), "ssim": float(s[i]),
                           "lip_gap": float(gap[i]), "truth_lip_gap": float(truth_gap[i])}
                    for k, (rp, rs) in regions.items():
                        out[f"{k}_psnr"], out[f"{k}_ssim"] = float(rp[i]), float(rs[i])
                    self.rows.append(out)

    def summary(self) -> dict:
        metrics = ("psnr", "ssim", "mouth_psnr", "mouth_ssim", "eyes_psnr", "eyes_ssim")
        per_code = {c: {m: _mean(r.get(m) for r in self.rows if r["code"] == c) for m in metrics} for c in CODES}

        def delta(a: str, b: str) -> dict:
            return {m: (None if per_code[a][m] is None or per_code[b][m] is None else per_code[a][m] - per_code[b][m])
                    for m in metrics}

        sequences = []
        groups: dict[tuple[str, str], dict[int, dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in self.rows:
            g = groups[(r["subject"], r["sequence"])][r["frame"]]
            g[r["code"]].append(r["lip_gap"])
            if r["code"] == "target":
                g["truth"].append(r["truth_lip_gap"])
        for (subject, sequence), frames in sorted(groups.items()):
            order = sorted(frames)
            series = {k: [_mean(frames[f][k]) for f in order] for k in ("truth", *CODES)}
            series = {k: [np.nan if x is None else x for x in v] for k, v in series.items()}
            agree = sequence_agreement(series["truth"], series["target"])
            agree_inputs = sequence_agreement(series["truth"], series["inputs"])
            sequences.append({"subject": subject, "sequence": sequence, **agree,
                              "inputs_code_correlation": agree_inputs["correlation"],
                              "inputs_code_range_ratio": agree_inputs["range_ratio"]})
        lip_status = ("computed" if self.detector is not None else
                      f"unavailable: {self.detector_status or 'no landmark detector given'}")
        return {
            "views": sum(1 for r in self.rows if r["code"] == "target"),
            "codes": per_code,
            "target_minus_inputs": delta("target", "inputs"),
            "target_minus_inputs_expression": delta("target", "inputs_expression"),
            "target_minus_neutral": delta("target", "neutral"),
            "mean_code_distance_target_vs_inputs": _mean(self.code_distance),
            "lip_gap_status": lip_status,
            "lip_gap_sequences": sequences if self.detector is not None else [],
        }

    def to_markdown(self) -> str:
        s = self.summary()

        def f(v, spec="{:.2f}"):
            return "n/a" if v is None else spec.format(v)

        lines = ["", "## Expression sensitivity", "",
                 "Same inputs and cameras, only the expression code differs (target's / the input frames' mean / "
                 "the input frames' mean with the target's head pose / neutral). Mouth and eye boxes from the "
                 "ground-truth landmarks of each target view.", "",
                 "| code | PSNR↑ | SSIM↑ | mouth PSNR↑ | mouth SSIM↑ | eyes PSNR↑ | eyes SSIM↑ |", "|---|---|---|---|---|---|---|"]
        for c in CODES:
            m = s["codes"][c]
            lines.append(f"| {c} | {f(m['psnr'])} | {f(m['ssim'], '{:.4f}')} | {f(m['mouth_psnr'])} | "
                         f"{f(m['mouth_ssim'], '{:.4f}')} | {f(m['eyes_psnr'])} | {f(m['eyes_ssim'], '{:.4f}')} |")
        d = s["target_minus_inputs"]
        lines += ["", f"- target − inputs code: PSNR {f(d['psnr'], '{:+.2f}')} dB, mouth {f(d['mouth_psnr'], '{:+.2f}')} dB, "
                  f"eyes {f(d['eyes_psnr'], '{:+.2f}')} dB ({s['views']} views; mean |Δcode| over expression + jaw dims "
                  f"{f(s['mean_code_distance_target_vs_inputs'], '{:.3f}')})."]
        e = s["target_minus_inputs_expression"]
        lines += [f"- target − inputs' expression (both with the target's head pose): what the expression earns: PSNR "
                  f"{f(e['psnr'], '{:+.2f}')} dB, mouth {f(e['mouth_psnr'], '{:+.2f}')} dB, eyes "
                  f"{f(e['eyes_psnr'], '{:+.2f}')} dB."]
        if s["lip_gap_sequences"]:
            lines += ["", "| subject | sequence | frames | lip gap truth | lip gap render | correlation | range ratio | "
                      "correlation with the inputs' code |", "|---|---|---|---|---|---|---|---|"]
            for q in s["lip_gap_sequences"]:
                lines.append(f"| {q['subject']} | {q['sequence']} | {q['frames']} | {f(q['truth_min'], '{:.3f}')}–"
                             f"{f(q['truth_max'], '{:.3f}')} | {f(q['render_min'], '{:.3f}')}–{f(q['render_max'], '{:.3f}')} | "
                             f"{f(q['correlation'])} | {f(q['range_ratio'])} | {f(q['inputs_code_correlation'])} |")
        else:
            lines.append(f"- Lip gap {s['lip_gap_status']}.")
        return "\n".join(lines) + "\n"

