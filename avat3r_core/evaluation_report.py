"""The held-out evaluation's report: per-view rows and statuses → metrics (JSON), a Markdown table
with its notes, and per-view CSV. :func:`avat3r_core.evaluation.evaluate_report` fills it; the
protocol is described in :mod:`avat3r_core.evaluation`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avat3r_core.identity import NETWORK as IDENTITY_NETWORK
from avat3r_core.metrics import PSNR_CAP

__all__ = ["AKD_NOTE", "EvalReport", "LPIPS_NOT_COMPUTED", "PUBLISHED"]


LPIPS_NOT_COMPUTED = "LPIPS: not computed (no weights file supplied)"


#: Published Avat3r results (4 input views, novel view and novel expression), from the paper as
#: summarised in ../shared/AVAT3R.md. Different data (Ava-256, NeRSemble) and resolution (512²
#: crops): context only, not comparable with this project's numbers.
PUBLISHED: tuple[dict[str, Any], ...] = (
    {"dataset": "NeRSemble", "method": "Avat3r", "psnr": 20.5, "ssim": 0.75, "lpips": 0.33, "akd": 3.7, "csim": 0.50},
    {"dataset": "Ava-256", "method": "Avat3r", "psnr": 20.7, "ssim": 0.71, "lpips": 0.33, "akd": 4.8, "csim": 0.59},
)


AKD_NOTE = ("AKD: mean distance (px at the evaluated resolution) between landmarks detected on the rendered "
            "target view and that view's ground-truth landmarks, over the points visible in it")


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
        """The table (this data's rows, the AKD floor and CSIM reference rows, the published rows) and its notes."""
        return "\n".join(self._table_lines() + self._notes()) + "\n" + self.expression_markdown

    def _data_label(self) -> str:
        res = f"{self.resolution[1]}²" if self.resolution and self.resolution[0] == self.resolution[1] else (
            f"{self.resolution[1]}×{self.resolution[0]}" if self.resolution else "?")
        return f"{self.context.get('split', '?')} split, {res}"

    def _table_lines(self) -> list[str]:
        def fmt(v, spec):
            return "n/a" if v is None else spec.format(v)

        data = self._data_label()
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
        return lines

    def _notes(self) -> list[str]:
        ctx = self.context
        akd_ok = not self.akd_status
        csim_ok = not self.csim_status
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
        return notes

    # -- CSV
    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None or (isinstance(r.get(k), float) and math.isnan(r[k]))
                            else r.get(k)) for k in _FIELDS})
        return buf.getvalue()
