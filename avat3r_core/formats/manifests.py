"""The data contracts between stages: one Arrow schema per manifest.

Paths in manifests are relative to the manifest's own directory, so a stage directory can be
moved (or pushed to object storage) as a unit. Cameras are stored flat: ``world_to_cam`` as 16
row-major floats (OpenCV world-to-camera), ``K`` as 9 row-major floats, at the image size given
by ``width``/``height`` of the row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from avat3r_core.cameras import Cameras

#: extract → ``frames/frames.parquet``: one row per (subject, sequence, frame, camera).
FRAMES_SCHEMA = pa.schema([
    ("id", pa.string()),  # <pid>_<seq>_<frame:06d>_<serial>
    ("subject", pa.string()),
    ("sequence", pa.string()),
    ("frame", pa.int32()),  # index in the source video
    ("camera", pa.string()),  # serial
    ("image", pa.string()),  # relative path of the cropped RGB image
    ("alpha", pa.string()),  # relative path of the cropped foreground matte (8-bit PNG)
    ("width", pa.int32()),  # crop size in pixels
    ("height", pa.int32()),
    ("world_to_cam", pa.list_(pa.float64(), 16)),  # crop camera
    ("K", pa.list_(pa.float64(), 9)),
    ("crop_box", pa.list_(pa.float64(), 4)),  # x0, y0, w, h in source pixels
    ("source_width", pa.int32()),
    ("source_height", pa.int32()),
    ("alpha_source", pa.string()),  # "alpha_video" | "alpha_map" | "background_difference" | "temporal_median_plate"
    ("color_corrected", pa.bool_()),
])


def cameras_to_columns(cams: Cameras) -> dict[str, list]:
    """Flat manifest columns for a batch of cameras."""
    w2c = cams.world_to_cam.detach().cpu().double().reshape(len(cams), 16).numpy()
    K = cams.K.detach().cpu().double().reshape(len(cams), 9).numpy()
    return {"world_to_cam": w2c.tolist(), "K": K.tolist()}  # Python floats: numpy scalars serialise one by one


def cameras_from_rows(rows: list[dict], dtype: torch.dtype = torch.float32) -> Cameras:
    """Cameras from manifest rows (all rows must share one image size)."""
    sizes = {(int(r["width"]), int(r["height"])) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"rows have different image sizes {sorted(sizes)}")
    (width, height), = sizes
    w2c = torch.tensor(np.array([r["world_to_cam"] for r in rows], dtype=np.float64).reshape(-1, 4, 4), dtype=dtype)
    K = torch.tensor(np.array([r["K"] for r in rows], dtype=np.float64).reshape(-1, 3, 3), dtype=dtype)
    return Cameras(w2c, K, width, height)


#: track → ``tracking/tracking.parquet``: one row per (subject, sequence, frame). FLAME parameters
#: are float lists; ``expression_code`` is the 135-d code the model consumes
#: (``avat3r_core.tracking.expression_code`` documents its layout).
TRACKING_COLUMNS = ("id", "subject", "sequence", "frame", "shape", "expression", "rotation", "translation",
                    "jaw", "neck", "eyes", "expression_code", "residual_px", "backend")

#: priors → ``priors/priors.parquet``: one row per frames row (same ``id``). Maps are stored at the
#: crop resolution as compressed ``.npz`` files (float16): ``position`` (H, W, 3) world-space
#: points and ``confidence`` (H, W) in [0, 1] (DUSt3R's conf mapped by 1 − 1/conf, so the paper's
#: "> 0.5" threshold means conf > 2); ``features`` (C, h, w) on the feature grid.
PRIORS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("subject", pa.string()),
    ("sequence", pa.string()),
    ("frame", pa.int32()),
    ("camera", pa.string()),
    ("position", pa.string()),  # relative path of an .npz with `position` and `confidence`
    ("position_source", pa.string()),  # dust3r | ground_truth | face_model
    ("features", pa.string()),  # relative path of an .npz with `features`, or "" when none
    ("feature_source", pa.string()),  # sapiens_<size> | efficientnet_lite0_imagenet | none
    ("feature_dim", pa.int32()),
])
