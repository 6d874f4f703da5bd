"""FLAME tracking: landmark backends, the multi-view fitter, the 135-d expression code, overlays.

The ``tracking.parquet`` contract (one row per subject, sequence, frame) is :data:`TRACKING_SCHEMA`.
"""

from __future__ import annotations

import pyarrow as pa

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

__all__ = ["TRACKING_SCHEMA"]
