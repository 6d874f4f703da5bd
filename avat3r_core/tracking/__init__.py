"""FLAME tracking: landmark backends, the multi-view fitter, the 135-d expression code, overlays.

The ``tracking.parquet`` contract (one row per subject, sequence, frame) is :data:`TRACKING_SCHEMA`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

#: width of the expression code (``expression_code``; layout in :mod:`avat3r_core.tracking.expression_code`):
#: the one home of the number, read by the tracker, the packer and loader, the model config and reconstruction
EXPRESSION_DIM = 135

#: track → ``tracking/tracking.parquet``: one row per (subject, sequence, frame). Types are what the
#: stage runner infers from the rows (float64 lists; the fixed widths are in the comments); the
#: runner adds ``item_id`` (``<pid>_<seq>``).
TRACKING_SCHEMA = pa.schema([
    ("id", pa.string()),  # <pid>_<seq>_<frame:06d>
    ("subject", pa.string()),
    ("sequence", pa.string()),
    ("frame", pa.int64()),
    ("shape", pa.list_(pa.float64())),  # (n_shape,) shared by the sequence, repeated per frame
    ("expression", pa.list_(pa.float64())),  # (n_expr,)
    ("jaw", pa.list_(pa.float64())),  # (3,) axis-angle
    ("neck", pa.list_(pa.float64())),  # (3,)
    ("eyes", pa.list_(pa.float64())),  # (6,) left, right axis-angle
    ("rotation", pa.list_(pa.float64())),  # (3,) global, about the root joint (FLAME)
    ("translation", pa.list_(pa.float64())),  # (3,) metres, world frame of the cameras
    ("scale", pa.float64()),
    ("expression_code", pa.list_(pa.float64())),  # (135,) see avat3r_core.tracking.expression_code
    # (16,) row-major rigid head-to-world 4x4 of the frame (FlameLayer.head_to_world): the head
    # frame that training and reconstruction express cameras and position maps in
    ("head_to_world", pa.list_(pa.float64())),
    ("residual_px", pa.float64()),  # mean landmark reprojection error of the frame (crop pixels)
    ("camera_residuals_px", pa.list_(pa.float64())),  # per camera, order of ``cameras`` (NaN: none visible)
    ("cameras", pa.list_(pa.string())),
    ("backend", pa.string()),  # landmark backend name
    ("converged", pa.bool_()),
])

#: The tracked values consumers use (the fit, the expression code, the head frame); the residual
#: columns are diagnostics and may be NaN by contract (a camera that saw no landmark).
TRACKED_VALUES = ("shape", "expression", "jaw", "neck", "eyes", "rotation", "translation", "scale", "expression_code",
                  "head_to_world")


def nonfinite_value(row: dict) -> str | None:
    """The first of a tracking row's :data:`TRACKED_VALUES` holding NaN or Inf, or None."""
    for name in TRACKED_VALUES:
        value = row.get(name)
        if value is None:
            continue
        try:
            finite = np.isfinite(np.asarray(value, dtype=np.float64)).all()
        except (TypeError, ValueError):
            return name  # not numbers at all
        if not finite:
            return name
    return None


def check_tracking_rows(rows: Iterable[dict], path: str) -> None:
    """Raise :class:`~avat3r_core.errors.NonFiniteError` naming ``path``, the subject/sequence,
    frame and value of the first tracking row with a NaN/Inf tracked value: every consumer of
    ``tracking.parquet`` calls this on the rows it uses."""
    from avat3r_core.errors import NonFiniteError

    for row in rows:
        bad = nonfinite_value(row)
        if bad is not None:
            raise NonFiniteError(path, f"{row.get('subject')}/{row.get('sequence')} frame {row.get('frame')}: {bad}",
                                 "NaN or Inf in the tracked values (a failed fit?): re-run the track stage for it")


__all__ = ["TRACKING_SCHEMA", "TRACKED_VALUES", "check_tracking_rows", "nonfinite_value"]
