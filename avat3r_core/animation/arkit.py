"""ARKit-52 blendshape tracks (Live Link Face CSV) → expression codes, through a fitted linear map.

Live Link Face CSV (Epic's iPhone app): one row per frame, ``Timecode`` (``HH:MM:SS:FF.mmm``),
``BlendShapeCount``, the 52 ARKit blendshape names in Apple's order (:data:`ARKIT52`, each in
[0, 1]), then head and eye rotations (:data:`LIVE_LINK_ROTATIONS`). :func:`read_live_link_csv`
takes columns by name (any order), and names every missing blendshape column and every column it
does not know.

The map (:class:`ArkitMapping`): ``code = bias + scores @ weights`` over the expression dims of the
135-d code (expression, eyes, eyelids, neck, jaw; the head pose comes from the avatar's reference).
It is fitted (:func:`fit_arkit_mapping`, ridge least squares) on pairs of MediaPipe FaceLandmarker
blendshape scores of studio renders and the studio's ground-truth codes of those frames: MediaPipe
scores the same 52 names (lower-camel, plus ``_neutral``; it has no ``tongueOut``, whose weight
stays 0). The fit error (RMS per part of the code on a held-out share of the pairs) is stored with
the map, as is the face model's checksum, so a map is only used with the face model it was fitted
for.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.tracking import expression_code as ec

__all__ = ["ARKIT52", "LIVE_LINK_ROTATIONS", "ArkitMapping", "fit_arkit_mapping", "mediapipe_to_arkit",
           "read_live_link_csv", "studio_pairs"]

ARKIT52 = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft", "EyeSquintLeft",
    "EyeWideLeft", "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight", "EyeLookUpRight",
    "EyeSquintRight", "EyeWideRight", "JawForward", "JawRight", "JawLeft", "JawOpen", "MouthClose", "MouthFunnel",
    "MouthPucker", "MouthRight", "MouthLeft", "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft",
    "MouthFrownRight", "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper", "MouthPressLeft", "MouthPressRight",
    "MouthLowerDownLeft", "MouthLowerDownRight", "MouthUpperUpLeft", "MouthUpperUpRight", "BrowDownLeft",
    "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight", "CheekPuff", "CheekSquintLeft",
    "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight", "TongueOut",
)
LIVE_LINK_ROTATIONS = ("HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll",
                       "RightEyeYaw", "RightEyePitch", "RightEyeRoll")
_KNOWN = {"Timecode", "BlendShapeCount", *ARKIT52, *LIVE_LINK_ROTATIONS}
#: the code dims a blendshape track drives (everything but the head pose)
DRIVEN = np.r_[0:ec.HEAD_POSE.start]
#: scores may overshoot [0, 1] by this much (solver noise) before a value is called out of range
_RANGE_SLACK = 0.05


def read_live_link_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(timecodes, scores (T, 52) float32 in :data:`ARKIT52` order) of a Live Link Face CSV."""
    path = str(path)
    if not storage.exists(path):
        raise FormatError(path, None, "blendshape CSV not found")
    text = storage.read_bytes(path).decode("utf-8-sig", errors="replace")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise FormatError(path, None, "empty file: expected a Live Link Face CSV header")
    header = [h.strip() for h in header]
    missing = [n for n in ("Timecode", *ARKIT52) if n not in header]
    extra = [h for h in header if h not in _KNOWN]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown column(s) {', '.join(extra)}")
        raise FormatError(path, "header", "; ".join(parts) + " (Live Link Face layout: Timecode, BlendShapeCount, "
                          "the 52 ARKit names, head/eye rotations)")
    col = {h: i for i, h in enumerate(header)}
    idx = [col[n] for n in ARKIT52]
    timecodes, rows = [], []
    for line, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise FormatError(path, f"line {line}", f"{len(cells)} cells, the header has {len(header)}")
        try:
            values = [float(cells[i]) for i in idx]
        except ValueError:
            bad = next(n for n, i in zip(ARKIT52, idx) if not _is_float(cells[i]))
            raise FormatError(path, f"line {line}, column {bad}", f"not a number: {cells[col[bad]]!r}") from None
        for n, v in zip(ARKIT52, values):
            if not (-_RANGE_SLACK <= v <= 1 + _RANGE_SLACK):
                raise FormatError(path, f"line {line}, column {n}", f"score {v} outside [0, 1]")
        timecodes.append(cells[col["Timecode"]].strip())
        rows.append(values)
    if not rows:
        raise FormatError(path, None, "no frames after the header")
    return timecodes, np.clip(np.asarray(rows, np.float32), 0.0, 1.0)


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def mediapipe_to_arkit(names, scores: np.ndarray) -> np.ndarray:
    """MediaPipe blendshape scores (N, K) with category ``names`` → (N, 52) in :data:`ARKIT52`
    order (a name MediaPipe lacks, ``TongueOut``, is 0; ``_neutral`` is dropped)."""
    scores = np.asarray(scores, np.float32)
    index = {str(n)[:1].upper() + str(n)[1:]: i for i, n in enumerate(names)}
    out = np.zeros((scores.shape[0], len(ARKIT52)), np.float32)
    for j, name in enumerate(ARKIT52):
        if name in index:
            out[:, j] = scores[:, index[name]]
    return out


@dataclass
class ArkitMapping:
    weights: np.ndarray  # (52, len(DRIVEN))
    bias: np.ndarray  # (len(DRIVEN),)
    fit_error: dict = field(default_factory=dict)  #: RMS per code part, held-out and fitted pairs
    face_model_sha256: str = ""

    def codes(self, scores: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
        """(T, 52) scores → (T, 135) float32 codes; the head pose dims from ``reference`` (135,)
        (a neutral head when None); rotations orthonormalised by a decode/encode round trip."""
        scores = np.asarray(scores, np.float64)
        if scores.ndim != 2 or scores.shape[1] != len(ARKIT52):
            raise FormatError("ARKit scores", None, f"expected (T, {len(ARKIT52)}) scores, got {scores.shape}")
        ref = np.asarray(reference if reference is not None else ec.encode({"expression": np.zeros((1, 100))})[0],
                         np.float64).reshape(-1)
        if ref.shape != (ec.DIM,):
            raise FormatError("reference code", None, f"expected {ec.DIM} values, got {ref.shape[0]}")
        code = np.tile(ref, (len(scores), 1))
        code[:, DRIVEN] = self.bias + scores @ self.weights
        return ec.encode(ec.decode(code)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, weights=self.weights, bias=self.bias, names=np.array(ARKIT52),
                 meta=np.array(json.dumps({"fit_error": self.fit_error, "face_model_sha256": self.face_model_sha256})))
        storage.atomic_write_bytes(str(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, face_model_sha256: str | None = None) -> "ArkitMapping":
        path = str(path)
        if not storage.exists(path):
            raise FormatError(path, None, "ARKit mapping not found (fit it with fit_arkit_mapping)")
        try:
            z = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
            weights, bias, names = z["weights"], z["bias"], [str(n) for n in z["names"]]
            meta = json.loads(str(z["meta"]))
        except Exception as exc:
            raise FormatError(path, None, f"not a readable ARKit mapping: {exc}") from None
        if tuple(names) != ARKIT52 or weights.shape != (len(ARKIT52), len(DRIVEN)) or bias.shape != (len(DRIVEN),):
            raise FormatError(path, None, f"unexpected mapping layout (weights {weights.shape}, bias {bias.shape})")
        if face_model_sha256 and meta.get("face_model_sha256") and meta["face_model_sha256"] != face_model_sha256:
            raise FormatError(path, "face_model_sha256", "fitted for another face model; refit it for this one")
        return cls(weights, bias, meta.get("fit_error", {}), meta.get("face_model_sha256", ""))


def fit_arkit_mapping(scores: np.ndarray, codes: np.ndarray, ridge: float = 1e-2, holdout: float = 0.2,
                      seed: int = 0, face_model_sha256: str = "") -> ArkitMapping:
    """Ridge least squares ``codes[:, DRIVEN] ≈ bias + scores @ W`` over the pairs with scores
    (rows with NaN scores — no face found — are left out). The fit error is measured on a random
    ``holdout`` share of the pairs with a map fitted on the rest; the returned map uses all pairs."""
    scores, codes = np.asarray(scores, np.float64), np.asarray(codes, np.float64)
    if scores.shape[0] != codes.shape[0] or scores.shape[1:] != (len(ARKIT52),) or codes.shape[1:] != (ec.DIM,):
        raise ValueError(f"expected (N, 52) scores and (N, {ec.DIM}) codes, got {scores.shape} and {codes.shape}")
    ok = np.isfinite(scores).all(1) & np.isfinite(codes).all(1)
    scores, target = scores[ok], codes[ok][:, DRIVEN]
    if len(scores) < 8:
        raise ValueError(f"{len(scores)} usable pairs; at least 8 are needed to fit the map")

    def solve(x, y):
        xm, ym = x.mean(0), y.mean(0)
        xc = x - xm
        w = np.linalg.solve(xc.T @ xc + ridge * len(x) * np.eye(x.shape[1]), xc.T @ (y - ym))
        return w, ym - xm @ w

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scores))
    n_hold = max(1, int(round(holdout * len(scores))))
    hold, fit = order[:n_hold], order[n_hold:]
    w, b = solve(scores[fit], target[fit])
    parts = {"expr": ec.EXPR, "eyes": ec.EYES, "eyelids": ec.EYELIDS, "neck": ec.NECK, "jaw": ec.JAW}

    def rms(x, y):
        """Per part: RMS of the residual beside the RMS of predicting every code by the fitted pairs'
        mean (what a map that ignored the scores would score), and the jaw angle's correlation."""
        r = x @ w + b - y
        r0 = target[fit].mean(0) - y
        out = {k: {"rms": float(np.sqrt((r[:, s] ** 2).mean())), "rms_mean_only": float(np.sqrt((r0[:, s] ** 2).mean()))}
               for k, s in parts.items()}
        jaw_true = np.linalg.norm(ec.decode(_full(y))["jaw"], axis=1)
        jaw_pred = np.linalg.norm(ec.decode(_full(x @ w + b))["jaw"], axis=1)
        out["jaw_angle_correlation"] = (float(np.corrcoef(jaw_true, jaw_pred)[0, 1])
                                        if jaw_true.std() > 0 and jaw_pred.std() > 0 else None)
        return out

    error = {"pairs": int(len(scores)), "held_out": int(n_hold), "held_out_rms": rms(scores[hold], target[hold]),
             "fitted_rms": rms(scores[fit], target[fit])}
    w, b = solve(scores, target)
    return ArkitMapping(w.astype(np.float32), b.astype(np.float32), error, face_model_sha256)


def _full(driven: np.ndarray) -> np.ndarray:
    """Driven dims (N, len(DRIVEN)) → (N, 135) codes with the head at rest (for decoding)."""
    code = np.tile(ec.encode({"expression": np.zeros((1, ec.N_EXPR))})[0], (len(driven), 1))
    code[:, DRIVEN] = driven
    return code


def studio_pairs(frames_manifest: str | Path, ground_truth_root: str | Path, detector, cameras: int = 4,
                 upscale: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(scores (N, 52), codes (N, 135)) for fitting the map: MediaPipe blendshape scores of the
    extracted studio crops (the ``cameras`` most frontal per frame — the crop camera looking most
    nearly along the head's forward axis — upscaled ``upscale``×, as evaluation's detector does)
    against the studio's ground-truth codes of those frames (``flame_params.npz``). ``detector``:
    a :class:`~avat3r_core.tracking.landmarks.MediaPipeLandmarks`."""
    from PIL import Image

    frames_manifest = str(frames_manifest)
    root = str(Path(frames_manifest).parent)
    rows = storage.read_parquet(frames_manifest).to_pylist()
    by_frame: dict[tuple, list[dict]] = {}
    for r in rows:
        by_frame.setdefault((r["subject"], r["sequence"], int(r["frame"])), []).append(r)
    params_cache: dict[tuple, dict] = {}
    scores, codes = [], []
    for (subject, sequence, frame), views in sorted(by_frame.items()):
        key = (subject, sequence)
        if key not in params_cache:
            gt = f"{ground_truth_root}/{subject}/sequences/{sequence}/flame_params.npz"
            if not storage.exists(gt):
                raise FormatError(gt, None, "ground-truth FLAME parameters not found")
            z = np.load(io.BytesIO(storage.read_bytes(gt)), allow_pickle=False)
            params_cache[key] = {k: z[k] for k in ("expression", "jaw", "neck", "eyes", "frames")}
        p = params_cache[key]
        t = int(np.flatnonzero(p["frames"] == frame)[0])
        code = ec.encode({k: p[k][t:t + 1] for k in ("expression", "jaw", "neck", "eyes")})[0]
        # most frontal: the camera's optical axis most nearly opposite the world +z the studio's heads face
        views = sorted(views, key=lambda r: np.asarray(r["world_to_cam"], np.float64).reshape(4, 4)[2, 2])[:cameras]
        images = []
        for r in views:
            im = Image.open(io.BytesIO(storage.read_bytes(f"{root}/{r['image']}"))).convert("RGB")
            images.append(np.asarray(im.resize((im.width * upscale, im.height * upscale), Image.BICUBIC)))
        det = detector.detect(np.stack(images))
        names = det.extras.get("blendshape_names", [])
        for i in np.flatnonzero(det.found):
            scores.append(mediapipe_to_arkit(names, det.extras["blendshapes"][i:i + 1])[0])
            codes.append(code)
    if not scores:
        raise FormatError(frames_manifest, None, "MediaPipe found no face on any studio crop: no pairs to fit the map")
    return np.asarray(scores, np.float32), np.asarray(codes, np.float64)
