"""Held-out evaluation: novel views at novel expressions, the model beside the non-learned baseline.

Protocol (one pass over a split's batches; the model and the baseline see the very same samples)
-------------------------------------------------------------------------------------------------
Each batch sample is one held-out (subject, sequence, target timestep): V input views from *other*
timesteps of that sequence (other expressions) and T target views at the target timestep (see
:mod:`avat3r_core.dataset.loader`). Every method renders the T target cameras; per target view:

* **PSNR / SSIM** (:mod:`avat3r_core.metrics`: ``10·log10(1/MSE)``, Gaussian-window SSIM with
  "valid" filtering) against the target composited on the evaluation background, exactly as
  :func:`avat3r_core.inference.predict.evaluate` does. Identical images have PSNR ``+inf`` per view; means
  cap each view at :data:`PSNR_CAP` dB (inference.predict.evaluate's cap), so a mean is always finite.
* **LPIPS** (v0.1, :mod:`avat3r_core.lpips`) only when the user supplies its weight files;
  otherwise the report says ``LPIPS: not computed (no weights file supplied)``.
* **AKD** (pixels at the evaluated resolution): a real image-based landmark detector (the tracking
  stage's ``mediapipe`` backend, :class:`~avat3r_core.tracking.landmarks.MediaPipeLandmarks`) runs
  on the rendered image; its 478 points are mapped to the 68 iBUG points
  (:data:`~avat3r_core.tracking.landmarks.MEDIAPIPE_TO_IBUG68`) and compared with the studio's ground-truth landmarks of that
  target view (the tracking stage's ``ground_truth`` backend,
  :class:`~avat3r_core.tracking.landmarks.GroundTruthLandmarks`, mapped into the crop), over the
  points visible in that view. Views where the detector finds no face have no AKD; the report
  counts them. Reported three ways:

  - ``akd``: all 68 points vs ground truth;
  - ``akd_inner``: the 51 inner points (brows, nose, eyes, mouth; iBUG 17–67), leaving out the jaw
    contour, whose definition differs between a silhouette-following detector and the studio's
    fixed points on the mesh;
  - ``akd_det``: detector on the render vs the same detector on the ground-truth target image
    (all 68 mapped points; the published papers' protocol, which needs no ground-truth landmarks).

  The **AKD floor** is the detector run on the ground-truth target images themselves, compared
  with the ground-truth landmarks: no rendering can score below it on ``akd``/``akd_inner``.
  Without the detector (mediapipe not installed, no model file) or without ground-truth landmarks,
  the affected AKD numbers are reported as unavailable with the reason, never estimated.
* **CSIM**: identity similarity with dlib's ResNet-128 face embedding
  (:class:`~avat3r_core.identity.FaceIdentity`; **not** the paper's ArcFace, so not comparable with
  the published CSIM column): per target view the cosine of the embeddings of the rendered view and
  of its ground-truth target, both enlarged ``identity_upscale`` times for dlib's HOG face detector.
  Views where dlib finds no face in the render or in the target have no CSIM; the report counts
  faces found on renders and on targets. dlib's embedding space is not centred (different people
  score high too), so the report gives a same-run reference: ``csim_other_people``, each target
  view against the targets of the *other* held-out people (what "a different person" scores on
  this data). Without dlib or its model files CSIM is reported unavailable with the reason.

Each target view is matched to its ``frames.parquet`` row (subject, sequence, frame, camera serial,
crop box) by sample key and camera extrinsics; the crop intrinsics must agree too. That row is what
the ground-truth backend looks landmarks up by, as in the tracking stage.

Outputs (:class:`EvalReport`): a JSON-ready metrics dict, a Markdown table (this data's rows and, for
context only, the published Avat3r numbers, marked as different data and resolution), per-view CSV
rows, and a PNG grid ``inputs | target | ours | baseline``.

This module never imports Ray or Prefect.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from avat3r_core import storage
from avat3r_core.config import Presets
from avat3r_core.errors import FormatError
from avat3r_core.batch import Avat3rBatch
from avat3r_core.ids import make_id
from avat3r_core.identity import NETWORK as IDENTITY_NETWORK
from avat3r_core.identity import FaceIdentity, similarities
from avat3r_core.metrics import lpips_metric, psnr, ssim

log = logging.getLogger("avat3r.evaluation")

__all__ = [
    "AKD_NOTE", "EvalConfig", "EvalReport", "GroundTruth68", "LPIPS_NOT_COMPUTED",
    "MediaPipe68", "PSNR_CAP", "PUBLISHED", "TargetViewIndex", "eval_loader_config", "evaluate_report",
    "make_detector68", "make_identity",
]

#: Per-view PSNR is capped here before averaging (``+inf`` for identical images), as in inference.predict.evaluate.
PSNR_CAP = 100.0
LPIPS_NOT_COMPUTED = "LPIPS: not computed (no weights file supplied)"
#: iBUG indices of the inner points (brows, nose, eyes, mouth): everything but the jaw contour 0–16.
INNER = slice(17, 68)


#: Published Avat3r results (4 input views, novel view and novel expression), from the paper as
#: summarised in ../shared/AVAT3R.md. Different data (Ava-256, NeRSemble) and resolution (512²
#: crops): context only, not comparable with this project's numbers.
PUBLISHED: tuple[dict[str, Any], ...] = (
    {"dataset": "NeRSemble", "method": "Avat3r", "psnr": 20.5, "ssim": 0.75, "lpips": 0.33, "akd": 3.7, "csim": 0.50},
    {"dataset": "Ava-256", "method": "Avat3r", "psnr": 20.7, "ssim": 0.71, "lpips": 0.33, "akd": 4.8, "csim": 0.59},
)

AKD_NOTE = ("AKD: mean distance (px at the evaluated resolution) between landmarks detected on the rendered "
            "target view and that view's ground-truth landmarks, over the points visible in it")


# --------------------------------------------------------------------------- config
@dataclass
class EvalConfig(Presets):
    """How a split is evaluated. ``tiny``: a quick look (4 samples); ``demo``: the whole split."""

    PRESETS: ClassVar[dict] = {
        "tiny": dict(max_samples=4, target_views=4, grid_samples=2),
        "demo": dict(target_views=8),
        "paper": dict(target_views=8, lpips_net="alex"),
    }

    input_views: int = 4  #: V per sample (as trained)
    target_views: int = 8  #: T novel views per sample (all cameras of the timestep when fewer)
    max_samples: int = 0  #: evaluate at most this many samples (0: the whole split, read once)
    seed: int = 0  #: loader seed: which inputs/targets each sample gets (same for every method)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bf16: bool = True  #: bf16 autocast of the network on CUDA (ignored on CPU)
    lpips_net: str = "alex"
    detector: str = "mediapipe"  #: landmark detector on rendered images: mediapipe | none
    detector_upscale: int = 2  #: images are upscaled by this factor (bicubic) before detection
    identity: str = "dlib"  #: CSIM's face-recognition network: dlib (ResNet-128) | none
    identity_upscale: int = 2  #: images are enlarged by this factor (bicubic) for dlib's face detector
    grid_samples: int = 4  #: samples in the PNG grid
    grid_views: int = 2  #: target views per sample in the grid

    def __post_init__(self) -> None:
        if min(self.input_views, self.target_views, self.detector_upscale, self.identity_upscale) < 1 or self.max_samples < 0:
            raise ValueError("input_views, target_views, detector_upscale, identity_upscale ≥ 1 and max_samples ≥ 0 "
                             "are required")
        if self.detector not in ("mediapipe", "none"):
            raise ValueError(f"EvalConfig.detector must be mediapipe or none, got {self.detector!r}")
        if self.identity not in ("dlib", "none"):
            raise ValueError(f"EvalConfig.identity must be dlib or none, got {self.identity!r}")


def eval_loader_config(config: EvalConfig, frame: str = "head"):
    """The loader settings of an evaluation: the split read once, in order, one sample per batch,
    in the coordinate ``frame`` the model was trained in."""
    from avat3r_core.dataset.loader import LoaderConfig

    return LoaderConfig(input_views=config.input_views, target_views=config.target_views,
                        random_timestep_inputs=True, frame=frame).read_once()


# --------------------------------------------------------------------------- target views → frames rows
class TargetViewIndex:
    """Finds each target view's ``frames.parquet`` row (camera serial, crop box) by sample key and
    world extrinsics (head-frame batches are mapped back through ``target_head_to_world``),
    checking that the crop intrinsics agree."""

    def __init__(self, frames_manifest: str | Path, atol_pose: float = 1e-4, rtol_k: float = 1e-4):
        self.path = str(frames_manifest)
        if not storage.exists(self.path):
            raise FormatError(self.path, None, "frames manifest not found")
        rows = storage.read_parquet(self.path).to_pylist()
        need = ("subject", "sequence", "frame", "camera", "world_to_cam", "K", "crop_box", "width", "height")
        if rows and any(k not in rows[0] for k in need):
            raise FormatError(self.path, ", ".join(k for k in need if k not in rows[0]), "missing column(s)")
        self.by_key: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            self.by_key[make_id(r["subject"], r["sequence"], int(r["frame"]))].append(r)
        self._poses = {k: np.array([r["world_to_cam"] for r in v], np.float64).reshape(-1, 16) for k, v in self.by_key.items()}
        self.atol_pose, self.rtol_k = atol_pose, rtol_k

    def rows_for(self, batch: Avat3rBatch) -> list[dict | None]:
        """One row (or None: not found) per target view, sample-major (B·T)."""
        T = batch.target_images.shape[1]
        cams = batch.target_cameras
        w2c = cams.world_to_cam.detach().double().cpu().numpy()
        if batch.target_head_to_world is not None:  # head-frame cameras → the capture's world cameras
            world = np.linalg.inv(batch.target_head_to_world.detach().double().cpu().numpy())
            w2c = w2c @ np.repeat(world, T, axis=0)
        w2c = w2c.reshape(-1, 16)
        K = cams.K.detach().double().cpu().numpy().reshape(-1, 9)
        out: list[dict | None] = []
        for b, key in enumerate(batch.keys):
            cands = self.by_key.get(key, [])
            for t in range(T):
                i = b * T + t
                row = None
                if cands:
                    err = np.abs(self._poses[key] - w2c[i]).max(axis=1)
                    j = int(err.argmin())
                    cand = cands[j]
                    if (err[j] <= self.atol_pose and (int(cand["width"]), int(cand["height"])) == (cams.width, cams.height)
                            and np.allclose(np.asarray(cand["K"], np.float64), K[i], rtol=self.rtol_k, atol=1e-3)):
                        row = cand
                out.append(row)
        return out


def _world_centers(cameras, head_to_world: Tensor | None, B: int, N: int) -> Tensor:
    """(B, N, 3) camera centres in the capture's world frame (float64, CPU)."""
    centers = cameras.centers.detach().double().cpu().reshape(B, N, 3)
    if head_to_world is None:
        return centers
    H = head_to_world.detach().double().cpu().reshape(B, N, 4, 4)
    return torch.einsum("bnij,bnj->bni", H[..., :3, :3], centers) + H[..., :3, 3]


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] → uint8 (N, H, W, 3)."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


class MediaPipe68:
    """The tracking stage's MediaPipe backend on images, upscaled first, as 68 iBUG points.

    ``__call__(images uint8 (N, H, W, 3), rows) -> (points (N, 68, 2) float64 in the images'
    pixels, found (N,) bool)``."""

    def __init__(self, model_path: str | None = None, upscale: int = 2):
        from avat3r_core.tracking.landmarks import MediaPipeLandmarks

        self.upscale = int(upscale)
        self.backend = MediaPipeLandmarks(model_path)
        self.name = f"mediapipe FaceLandmarker (478 points → iBUG-68), images upscaled {self.upscale}× (bicubic)"

    def __call__(self, images: np.ndarray, rows: Sequence[dict | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        from avat3r_core.tracking.landmarks import mediapipe_to_ibug68

        images = np.asarray(images)
        if self.upscale > 1:
            images = np.stack([cv2.resize(im, None, fx=self.upscale, fy=self.upscale, interpolation=cv2.INTER_CUBIC)
                               for im in images])
        det = self.backend.detect(images)
        return mediapipe_to_ibug68(det.points) / self.upscale, det.found.copy()

    def close(self) -> None:
        self.backend.close()


class GroundTruth68:
    """The studio's ground-truth landmarks of the views (the tracking stage's ``ground_truth``
    backend), mapped into the crops. ``__call__(images, rows) -> (points (N, 68, 2), visible (N, 68))``;
    a view without a row has no visible point. As a "detector" it ignores the images (an oracle)."""

    def __init__(self, gt_root: str | Path):
        from avat3r_core.tracking.landmarks import GroundTruthLandmarks

        self.root = str(gt_root)
        if not storage.exists(self.root):
            raise FormatError(self.root, None, "ground-truth root not found")
        self.backend = GroundTruthLandmarks(self.root)
        self.name = f"studio ground truth ({self.root})"

    def landmarks(self, rows: Sequence[dict | None]) -> tuple[np.ndarray, np.ndarray]:
        n = len(rows)
        pts, vis = np.zeros((n, 68, 2)), np.zeros((n, 68), bool)
        idx = [i for i, r in enumerate(rows) if r is not None]
        if idx:
            det = self.backend.detect(None, [rows[i] for i in idx])
            if det.points.shape[1] != 68:
                raise FormatError(self.root, "landmarks", f"expected 68 iBUG landmarks, got {det.points.shape[1]}")
            pts[idx], vis[idx] = det.points, det.confidence > 0
        return pts, vis

    def __call__(self, images, rows: Sequence[dict | None]) -> tuple[np.ndarray, np.ndarray]:
        pts, vis = self.landmarks(rows)
        return pts, vis.any(axis=1)

    def close(self) -> None:
        pass


def make_detector68(name: str = "mediapipe", model_path: str | None = None, upscale: int = 2):
    """(detector or None, status). ``mediapipe`` is unavailable (None, with the reason) when the
    package or its model file is missing, or its graph cannot be built."""
    if name == "none":
        return None, "no landmark detector configured (detector: none)"
    if name != "mediapipe":
        raise ValueError(f"unknown landmark detector {name!r} (mediapipe, none)")
    from avat3r_core.tracking.landmarks import find_mediapipe_model, mediapipe_available

    if not mediapipe_available():
        return None, "mediapipe is not installed (make setup installs it)"
    try:
        path = find_mediapipe_model(model_path)
    except (FileNotFoundError, FormatError) as exc:
        return None, f"no MediaPipe face_landmarker.task: {exc}"
    det = MediaPipe68(path, upscale)
    try:
        det.backend._build()
    except Exception as exc:  # noqa: BLE001 - any failure to build the graph makes AKD unavailable
        return None, f"the MediaPipe face landmarker could not be built: {type(exc).__name__}: {exc}"
    return det, det.name


def make_identity(name: str = "dlib") -> tuple[FaceIdentity | None, str]:
    """(identity network or None, status) for CSIM: ``dlib`` is unavailable (None, with the reason)
    without dlib or its model files."""
    if name == "none":
        return None, "no identity network configured (identity: none)"
    if name != "dlib":
        raise ValueError(f"unknown identity network {name!r} (dlib, none)")
    identity = FaceIdentity()
    return (identity, IDENTITY_NETWORK) if identity.available else (None, identity.reason)


def _akd(pred: np.ndarray, gt: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N,) mean distance over points with weight (NaN where none)."""
    d = np.linalg.norm(pred - gt, axis=-1)
    w = weights.astype(np.float64)
    n = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (d * w).sum(axis=1) / np.maximum(n, 1e-12), np.nan)


# --------------------------------------------------------------------------- the report
Predictor = Callable[[Avat3rBatch], Tensor]

_FIELDS = ["method", "key", "subject", "sequence", "frame", "camera", "view", "input_frames", "camera_in_inputs",
           "psnr", "ssim", "lpips", "akd", "akd_inner", "akd_det", "face_found", "target_face_found", "akd_floor",
           "akd_floor_inner", "csim", "identity_distance", "identity_face_found", "identity_target_face_found"]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


@dataclass
class EvalReport:
    """Per-view rows and the statuses of one evaluation; summaries, table, CSV and grid from them."""

    rows: list[dict] = field(default_factory=list)  #: one per (method, target view)
    methods: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  #: method → table label
    lpips_status: str = LPIPS_NOT_COMPUTED
    akd_status: str = ""  #: "" = computed; else why AKD is unavailable
    akd_gt_status: str = ""  #: "" = ground-truth landmarks found; else why not
    detector_name: str = ""
    csim_status: str = "no identity network given"  #: "" = computed; else why CSIM is unavailable
    #: target view vs the targets of the other held-out people (see the module docstring)
    csim_other_people: dict | None = None
    resolution: tuple[int, int] | None = None
    samples: int = 0
    grid: np.ndarray | None = None
    context: dict = field(default_factory=dict)  #: split, checkpoint, step, data description
    #: :class:`avat3r_core.animation.sensitivity.ExpressionProbe` summary and table (None: not measured)
    expression: dict | None = None
    expression_markdown: str = ""

    # -- summaries
    def method_rows(self, method: str) -> list[dict]:
        return [r for r in self.rows if r["method"] == method]

    def summary(self, method: str) -> dict:
        rows = self.method_rows(method)
        capped = [min(r["psnr"], PSNR_CAP) for r in rows]
        novel = [r for r in rows if not r["camera_in_inputs"]]
        return {
            "views": len(rows),
            "psnr": _mean(capped), "ssim": _mean(r["ssim"] for r in rows),
            "lpips": _mean(r["lpips"] for r in rows),
            "akd": _mean(r["akd"] for r in rows), "akd_inner": _mean(r["akd_inner"] for r in rows),
            "akd_det": _mean(r["akd_det"] for r in rows),
            "faces_found": sum(1 for r in rows if r["face_found"]),
            "akd_views": sum(1 for r in rows if r["akd"] is not None and not math.isnan(r["akd"])),
            "novel_camera_views": len(novel),
            "psnr_novel_cameras": _mean(min(r["psnr"], PSNR_CAP) for r in novel),
            "ssim_novel_cameras": _mean(r["ssim"] for r in novel),
            "csim": _mean(r["csim"] for r in rows), "identity_distance": _mean(r["identity_distance"] for r in rows),
            "csim_views": sum(1 for r in rows if r["csim"] is not None and not math.isnan(r["csim"])),
            "identity_faces_found": sum(1 for r in rows if r["identity_face_found"]),
        }

    def floor(self) -> dict:
        """The detector on the ground-truth targets vs the ground-truth landmarks (one row per view)."""
        views = {(r["key"], r["view"]): r for r in self.rows}.values()
        return {"views": len(views), "faces_found": sum(1 for r in views if r["target_face_found"]),
                "akd": _mean(r["akd_floor"] for r in views), "akd_inner": _mean(r["akd_floor_inner"] for r in views)}

    def identity_target_faces(self) -> int:
        """Ground-truth target views in which dlib found a face."""
        return sum(1 for r in {(r["key"], r["view"]): r for r in self.rows}.values() if r["identity_target_face_found"])

    def metrics(self) -> dict:
        """JSON-ready metrics (DVC metric file): per method, the floor, statuses, published context."""
        out: dict[str, Any] = {
            **self.context,
            "resolution": list(self.resolution) if self.resolution else None,
            "samples": self.samples,
            "views": len({(r["key"], r["view"]) for r in self.rows}),
            "psnr_cap_db": PSNR_CAP,
            **{m: self.summary(m) for m in self.methods},
            "detector_floor": self.floor() if not (self.akd_status or self.akd_gt_status) else None,
            "lpips_status": self.lpips_status,
            "akd_status": "computed" if not self.akd_status else f"unavailable: {self.akd_status}",
            "akd_vs_ground_truth_status": ("computed" if not (self.akd_status or self.akd_gt_status)
                                           else f"unavailable: {self.akd_status or self.akd_gt_status}"),
            "akd_detector": self.detector_name or None,
            "csim_status": (f"computed ({IDENTITY_NETWORK}; not ArcFace)" if not self.csim_status
                            else f"unavailable: {self.csim_status}"),
            "identity_target_faces_found": self.identity_target_faces() if not self.csim_status else None,
            "csim_other_people": self.csim_other_people,
            "expression_sensitivity": self.expression,
            "published_context": {"note": "published Avat3r numbers (paper, via AVAT3R.md): different data and "
                                  "resolution (512² crops); not comparable", "rows": [dict(r) for r in PUBLISHED]},
        }
        return _clean(out)

    # -- table
    def to_markdown(self) -> str:
        def fmt(v, spec):
            return "n/a" if v is None else spec.format(v)

        res = f"{self.resolution[1]}²" if self.resolution and self.resolution[0] == self.resolution[1] else (
            f"{self.resolution[1]}×{self.resolution[0]}" if self.resolution else "?")
        ctx = self.context
        data = f"{ctx.get('split', '?')} split, {res}"
        header = ["Method", "Data", "PSNR↑", "SSIM↑", "LPIPS↓", "AKD↓ (px)", "AKD inner-51↓", "AKD det-vs-det↓",
                  "faces found", "CSIM↑ (dlib)", "dlib faces found"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        akd_ok = not self.akd_status
        gt_ok = akd_ok and not self.akd_gt_status
        csim_ok = not self.csim_status
        for m in self.methods:
            s = self.summary(m)
            lines.append("| " + " | ".join([
                self.labels.get(m, m), data, fmt(s["psnr"], "{:.2f}"), fmt(s["ssim"], "{:.4f}"),
                fmt(s["lpips"], "{:.4f}"),
                fmt(s["akd"], "{:.2f}") if gt_ok else "unavailable", fmt(s["akd_inner"], "{:.2f}") if gt_ok else "unavailable",
                fmt(s["akd_det"], "{:.2f}") if akd_ok else "unavailable",
                f"{s['faces_found']}/{s['views']}" if akd_ok else "—",
                fmt(s["csim"], "{:.3f}") if csim_ok else "unavailable",
                f"{s['identity_faces_found']}/{s['views']}" if csim_ok else "—"]) + " |")
        if gt_ok:
            f = self.floor()
            lines.append("| " + " | ".join([
                "detector on the ground-truth targets (AKD floor)", data, "—", "—", "—", fmt(f["akd"], "{:.2f}"),
                fmt(f["akd_inner"], "{:.2f}"), "0 by definition", f"{f['faces_found']}/{f['views']}", "—", "—"]) + " |")
        if csim_ok and self.csim_other_people and self.csim_other_people.get("csim") is not None:
            o = self.csim_other_people
            lines.append("| " + " | ".join([
                "ground-truth targets vs other held-out people (CSIM reference)", data, "—", "—", "—", "—", "—", "—",
                "—", fmt(o["csim"], "{:.3f}"), f"{o['views']} targets, {o['people']} people"]) + " |")
        for p in PUBLISHED:
            lines.append("| " + " | ".join([
                f"{p['method']} — published, different data and resolution", f"{p['dataset']}, 512² crops",
                f"{p['psnr']:.1f}", f"{p['ssim']:.2f}", f"{p['lpips']:.2f}", f"{p['akd']:.1f}", "—", "—", "—",
                f"{p['csim']:.2f} (ArcFace)", "—"]) + " |")
        notes = [
            "",
            f"- Novel views at novel expressions: {self.samples} held-out samples × their target views "
            f"({len({(r['key'], r['view']) for r in self.rows})} views); the inputs of each sample come from other "
            "timesteps (other expressions) of the same sequence. "
            + (f"{sum(1 for r in self.rows if r['camera_in_inputs'] and r['method'] == self.methods[0])} of these "
               "target cameras also appear among the sample's input cameras (at another timestep); metrics.json "
               "also gives PSNR/SSIM over the strictly novel cameras." if self.methods else ""),
            f"- PSNR: per view 10·log10(1/MSE) on the target composited on the background; identical images are "
            f"+inf per view and capped at {PSNR_CAP:.0f} dB in the means. SSIM: 11×11 Gaussian window, σ 1.5, valid.",
            f"- {self.lpips_status}",
        ]
        if ctx.get("samples_skipped"):
            notes.insert(1, f"- **Skipped: {ctx['samples_skipped']} of the split's {ctx.get('index_samples', '?')} "
                         "samples (index)**, in shards that do not match the index: "
                         + "; ".join(f"{s['shard']} ({s['samples']} samples): {', '.join(s['problems'])}"
                                     for s in ctx.get("skipped_shards", [])) + ".")
        if akd_ok:
            notes.append(f"- {AKD_NOTE}. Detector: {self.detector_name}. Ground truth: the studio's 68 iBUG landmarks "
                         "with per-view visibility. AKD inner-51 leaves out the jaw contour (defined differently by "
                         "the detector and the studio). AKD det-vs-det: the detector on the render vs on the "
                         "ground-truth target (the published protocol). Views where the detector finds no face have "
                         "no AKD (faces found counts them). The AKD floor row is the detector on the ground-truth "
                         "target images themselves, i.e. what a render identical to the target would score on AKD / "
                         "AKD inner-51.")
            if self.akd_gt_status:
                notes.append(f"- AKD vs ground truth unavailable: {self.akd_gt_status}")
        else:
            notes.append(f"- AKD unavailable: {self.akd_status}")
        if csim_ok:
            notes.append(f"- CSIM: cosine of {IDENTITY_NETWORK} embeddings of each rendered target view and its "
                         "ground-truth target (dlib's HOG face detector on both, enlarged "
                         f"{self.context.get('identity_upscale', '?')}x); views where dlib finds no face in either have "
                         "no CSIM ('dlib faces found' counts faces on the renders; "
                         f"{self.identity_target_faces()} of the {len({(r['key'], r['view']) for r in self.rows})} "
                         "ground-truth targets have one). "
                         "Not ArcFace: not comparable with the published CSIM. dlib's embedding space is not centred; "
                         "read it against the reference row (targets vs the other held-out people"
                         + (")." if self.csim_other_people and self.csim_other_people.get("csim") is not None
                            else "; not measured: fewer than two held-out people with a face found)."))
        else:
            notes.append(f"- CSIM unavailable: {self.csim_status}.")
        notes.append("- Published rows: Avat3r as published (4 input views; Ava-256 and NeRSemble at 512² crops, "
                     "their own AKD detector), from ../shared/AVAT3R.md — different data and resolution, shown for "
                     "context only, not comparable with the rows above.")
        return "\n".join(lines + notes) + "\n" + self.expression_markdown

    # -- CSV
    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
                            else r.get(k)) for k in _FIELDS})
        return buf.getvalue()


def _other_people(target_ids: list[tuple[str, np.ndarray]]) -> dict:
    """CSIM of each target view against every target view of the other held-out people: the level
    "a different person" reaches on this data (views: target views with a face and someone else to
    compare with)."""
    if len({s for s, _ in target_ids}) < 2:
        return {"csim": None, "identity_distance": None, "views": len(target_ids),
                "note": "fewer than two held-out people with a face found"}
    subjects = np.array([s for s, _ in target_ids])
    emb = np.stack([e for _, e in target_ids])
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    other = subjects[:, None] != subjects[None, :]
    cos = unit @ unit.T
    dist = np.linalg.norm(emb[:, None] - emb[None, :], axis=-1)
    return {"csim": float(cos[other].mean()), "identity_distance": float(dist[other].mean()),
            "views": len(target_ids), "people": int(len(set(subjects.tolist())))}


# Long (~130 lines): the per-batch accumulation of every metric for every method shares its
# running state (rows, sheet rows, detector results); kept whole while issue 20 adds CSIM here.
@torch.no_grad()
def evaluate_report(batches: Iterable[Avat3rBatch], model=None, *, methods: Mapping[str, Any] | None = None,
                    labels: Mapping[str, str] | None = None, background: Sequence[float] = (1.0, 1.0, 1.0),
                    views: TargetViewIndex | None = None, ground_truth: GroundTruth68 | None = None,
                    detector=None, detector_status: str = "", ground_truth_status: str = "",
                    lpips_model=None, lpips_status: str = LPIPS_NOT_COMPUTED, bf16: bool = True,
                    grid_samples: int = 4, grid_views: int = 2, max_samples: int = 0,
                    context: Mapping[str, Any] | None = None, expression_probe=None,
                    identity: FaceIdentity | None = None, identity_status: str = "", identity_upscale: int = 2,
                    ) -> EvalReport:
    """Evaluate methods on ``batches`` (one pass; every method sees the same samples).

    ``methods``: name → a network (rendered through :func:`avat3r_core.inference.predict.predict_images`),
    ``None`` (the non-learned baseline, the same call with ``model=None``) or a callable
    ``batch -> (B·T, 3, H, W)`` images in [0, 1]. Default: ``{"ours": model, "baseline": None}``
    (just the baseline when ``model`` is None).
    ``views`` + ``ground_truth``: target view → frames row → ground-truth landmarks (AKD vs ground
    truth and its floor); ``detector``: a 68-point detector on images (e.g. :class:`MediaPipe68`);
    without it AKD is unavailable and ``detector_status`` says why. ``lpips_model``: a loaded LPIPS
    (None → not computed, ``lpips_status``). ``expression_probe``: an
    :class:`~avat3r_core.animation.sensitivity.ExpressionProbe` of the ``ours`` network, fed every
    batch with the ground-truth landmarks of its target views (its summary lands in the report).
    ``identity``: an available :class:`~avat3r_core.identity.FaceIdentity` for CSIM (images enlarged
    ``identity_upscale`` times); without it CSIM is unavailable and ``identity_status`` says why.
    """
    from avat3r_core.inference.predict import predict_images, targets_on_background
    from avat3r_core.inference.visuals import grid_rows, labelled_grid

    if methods is None:
        methods = {"ours": model, "baseline": None} if model is not None else {"baseline": None}
    default_labels = {"ours": "ours (this data)", "baseline": "non-learned baseline (this data)"}
    labels = {**default_labels, **dict(labels or {})}
    predictors: dict[str, Predictor] = {}
    for name, m in methods.items():
        if m is None or isinstance(m, torch.nn.Module):
            predictors[name] = (lambda b, m=m: predict_images(b, m, tuple(background), bf16))
        elif callable(m):
            predictors[name] = m
        else:
            raise TypeError(f"method {name!r}: expected a network, None (baseline) or a callable, got {type(m).__name__}")
    for m in methods.values():
        if isinstance(m, torch.nn.Module):
            m.eval()

    if detector is None and not detector_status:
        detector_status = "no landmark detector given"
    gt_status = ground_truth_status
    if detector is not None and (views is None or ground_truth is None) and not gt_status:
        gt_status = "no ground-truth landmarks (frames manifest and ground-truth root) given"
    report = EvalReport(methods=list(predictors), labels={m: labels.get(m, m) for m in predictors},
                        lpips_status=lpips_status, akd_status="" if detector is not None else detector_status,
                        akd_gt_status=gt_status, detector_name=getattr(detector, "name", "") if detector is not None else "",
                        context=dict(context or {}))
    if identity is not None and not identity.available:
        identity_status, identity = identity_status or identity.reason, None
    report.csim_status = "" if identity is not None else (identity_status or "no identity network given")
    if identity is not None:
        report.context["identity_upscale"] = identity_upscale
    target_ids: list[tuple[str, np.ndarray]] = []  # (subject, embedding) of every target view with a face

    def embed(images: Tensor) -> list:
        return [identity.embed(im, identity_upscale) for im in to_uint8(images)]

    sheet_rows: list[Tensor] = []
    unmatched = 0
    for batch in batches:
        if max_samples and report.samples >= max_samples:
            break
        B, V, T = batch.batch_size, batch.images.shape[1], batch.target_images.shape[1]
        H, W = batch.target_images.shape[-2:]
        report.resolution = (int(H), int(W))
        bg = torch.tensor(tuple(background), dtype=torch.float32, device=batch.images.device)
        targets = targets_on_background(batch, bg).float().clamp(0, 1)
        rows = views.rows_for(batch) if views is not None else [None] * (B * T)
        unmatched += sum(r is None for r in rows)
        gt_pts = gt_vis = None
        if detector is not None and ground_truth is not None and views is not None:
            gt_pts, gt_vis = ground_truth.landmarks(rows)
        tgt_pts = tgt_found = None
        if detector is not None:
            tgt_pts, tgt_found = detector(to_uint8(targets), rows)
        tgt_emb = embed(targets) if identity is not None else [None] * (B * T)
        # the person: the frames row's subject, else the sample key's first part (make_id's layout)
        target_ids += [(row["subject"] if row else batch.keys[i // T].split("_")[0], e)
                       for i, (row, e) in enumerate(zip(rows, tgt_emb)) if e is not None]
        floor = floor_inner = np.full(B * T, np.nan)
        if gt_pts is not None:
            ok = tgt_found[:, None] & gt_vis
            floor, floor_inner = _akd(tgt_pts, gt_pts, ok), _akd(tgt_pts[:, INNER], gt_pts[:, INNER], ok[:, INNER])
        # which target cameras are also input cameras (at another timestep) of their sample: the
        # same camera of the rig, so compared in the world (head-frame batches map back first)
        in_centers = _world_centers(batch.cameras, batch.input_head_to_world, B, V)
        tg_centers = _world_centers(batch.target_cameras, None if batch.target_head_to_world is None
                                    else batch.target_head_to_world[:, None].expand(B, T, 4, 4), B, T)
        seen = (torch.cdist(tg_centers, in_centers).min(dim=2).values < 1e-4 * (1 + tg_centers.norm(dim=-1))).reshape(-1)

        preds: dict[str, Tensor] = {}
        for name, predict in predictors.items():
            pred = predict(batch).float().clamp(0, 1)
            if pred.shape != targets.shape:
                raise ValueError(f"method {name!r} predicted {tuple(pred.shape)}, expected {tuple(targets.shape)}")
            preds[name] = pred
            p = psnr(pred, targets).cpu().double().numpy()
            s = ssim(pred, targets).cpu().double().numpy()
            lp = (lpips_metric(pred, targets, model=lpips_model).cpu().double().numpy()
                  if lpips_model is not None else np.full(B * T, np.nan))
            akd = akd_inner = akd_det = np.full(B * T, np.nan)
            found = np.zeros(B * T, bool)
            emb = embed(pred) if identity is not None else [None] * (B * T)
            sim, dist = similarities(tgt_emb, emb)
            if detector is not None:
                pts, found = detector(to_uint8(pred), rows)
                both = (found & tgt_found)[:, None] & np.ones((1, 68), bool)
                akd_det = _akd(pts, tgt_pts, both)
                if gt_pts is not None:
                    ok = found[:, None] & gt_vis
                    akd, akd_inner = _akd(pts, gt_pts, ok), _akd(pts[:, INNER], gt_pts[:, INNER], ok[:, INNER])
            for b in range(B):
                key = batch.keys[b]
                for t in range(T):
                    i = b * T + t
                    row = rows[i]
                    report.rows.append({
                        "method": name, "key": key,
                        "subject": row["subject"] if row else "", "sequence": row["sequence"] if row else "",
                        "frame": int(batch.target_frames[b]), "camera": row["camera"] if row else "", "view": t,
                        "input_frames": " ".join(str(int(f)) for f in batch.input_frames[b].tolist()),
                        "camera_in_inputs": bool(seen[i]),
                        "psnr": float(p[i]), "ssim": float(s[i]), "lpips": None if math.isnan(lp[i]) else float(lp[i]),
                        "akd": float(akd[i]), "akd_inner": float(akd_inner[i]), "akd_det": float(akd_det[i]),
                        "face_found": bool(found[i]), "target_face_found": bool(tgt_found[i]) if tgt_found is not None else False,
                        "akd_floor": float(floor[i]), "akd_floor_inner": float(floor_inner[i]),
                        "csim": float(sim[i]), "identity_distance": float(dist[i]),
                        "identity_face_found": emb[i] is not None, "identity_target_face_found": tgt_emb[i] is not None,
                    })
        if expression_probe is not None:
            if gt_pts is None and ground_truth is not None and views is not None:
                gt_pts, gt_vis = ground_truth.landmarks(rows)
            expression_probe.add(batch, targets, rows, gt_pts, gt_vis, preds.get("ours"))
        if len(sheet_rows) < grid_samples * grid_views:
            sheet_rows += grid_rows(batch, preds, bg, batch.batch_size, grid_views, targets)
        report.samples += B
    if identity is not None:
        report.csim_other_people = _other_people(target_ids)
    target_found = sum(1 for r in report.rows if r["target_face_found"]) if report.methods else 0
    if detector is not None and report.rows and target_found == 0:
        n = len({(r["key"], r["view"]) for r in report.rows})
        report.akd_status = f"the detector ({report.detector_name}) found no face on any of the {n} ground-truth target views"
    if sheet_rows:
        V = sheet_rows[0].shape[-1] // report.resolution[1] - 1 - len(predictors)
        names = [f"input {v + 1}" for v in range(V)] + ["target"] + list(predictors)
        report.grid = labelled_grid(sheet_rows[:grid_samples * grid_views], names, report.resolution[1])
    if views is not None and unmatched:
        log.warning("%d target view(s) had no matching frames-manifest row (no ground-truth landmarks for them)", unmatched)
        report.context["views_without_frames_row"] = unmatched
    if expression_probe is not None:
        report.expression, report.expression_markdown = expression_probe.summary(), expression_probe.to_markdown()
    return report
