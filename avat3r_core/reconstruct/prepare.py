"""Turning one library row into the model's inputs: :class:`Preparer` (its shared, lazily loaded
models); the capture path is :mod:`.prepare_capture`, the picture path :mod:`.prepare_pictures`."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from avat3r_core.priors.sources import read_feature_projection
from avat3r_core.geometry import FRAMES
from avat3r_core.config import pick_device
from avat3r_core.errors import FormatError
from avat3r_core.reconstruct.errors import NoFaceError
from avat3r_core.reconstruct.library import LibraryEntry
from avat3r_core.reconstruct.pictures import read_landmarks_beside, read_picture, read_video_frames
from avat3r_core.reconstruct.prepare_capture import CapturePreparation
from avat3r_core.reconstruct.prepare_pictures import PicturePreparation
from avat3r_core.reconstruct.prepared import PrepareConfig, PreparedAvatar

log = logging.getLogger("avat3r.reconstruct")




class Preparer(CapturePreparation, PicturePreparation):
    """Turns library rows into :class:`PreparedAvatar`; heavy models are loaded once, lazily.

    ``image_size``, ``feature_dim`` and ``frame`` come from the checkpoint's model config (the
    crops and coordinates must be what the network was trained on); ``features_enabled`` says
    whether it takes features at all. ``frame="head"``: every view's camera and position map is
    expressed in the tracked head frame of its own timestep (capture mode: the tracking
    manifest's ``head_to_world``; pictures: the fitted face model's).
    """

    def __init__(self, config: PrepareConfig, image_size: int, feature_dim: int = 0, features_enabled: bool = False,
                 *, frame: str):
        if frame not in FRAMES:
            raise ValueError(f"frame must be head or world, got {frame!r}")
        self.frame = frame
        self.config = config
        self.image_size = int(image_size)
        self.feature_dim = int(feature_dim)
        self.features_enabled = bool(features_enabled)
        self.device = pick_device(config.device)
        self.position_source = config.resolved_position_source
        self.feature_source = config.resolved_feature_source(self.features_enabled)
        self._layer = None
        self._embedding = None
        self._detector = None
        self._dust3r = None
        self._matte = None  # priors.matte.PictureMatte, loaded on first use
        self._features = None  # sources.FeatureExtractor, loaded on first use
        self._projection: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.feature_source in ("efficientnet", "sapiens") and config.feature_projection:
            path = config.feature_projection
            matrix, mean, self.projection_meta = read_feature_projection(path)
            self._projection = (matrix, mean)
            if self._projection[0].shape[1] != self.feature_dim:
                raise FormatError(path, "matrix", f"projects to {self._projection[0].shape[1]} channels, the model "
                                  f"takes {self.feature_dim}")

    def check_picture_features(self) -> None:
        """Raise FormatError now if pictures' features could never match the model's width (a
        missing projection); capture mode reads the priors stage's stored features instead."""
        if self.features_enabled and self._projection is None and self.feature_source == "efficientnet" \
                and self.feature_dim != 112:
            raise FormatError("PrepareConfig", "feature_projection",
                              f"the model takes {self.feature_dim} feature channels, EfficientNet-Lite0 gives 112: give "
                              "the training data's feature_projection.npz")

    # ------------------------------------------------------------------ lazily loaded models
    def face_layer(self):
        if self._layer is None:
            from avat3r_core.flame import (
                FlameLayer,
                load_flame_model,
                load_landmark_embedding,
            )

            cfg = self.config
            if not cfg.face_model or not cfg.landmark_embedding:
                raise FormatError("PrepareConfig", "face_model", "photos/image/video modes need face_model and "
                                  "landmark_embedding (a FLAME-format model and its landmark embedding)")
            self._embedding = load_landmark_embedding(cfg.landmark_embedding)
            self._layer = FlameLayer(load_flame_model(cfg.face_model), landmarks=self._embedding,
                                     dtype=torch.float64).eval()
        return self._layer

    def _mediapipe(self):
        if self._detector is None:
            from avat3r_core.tracking.landmarks import MediaPipeLandmarks

            self._detector = MediaPipeLandmarks(self.config.mediapipe_model or None, num_faces=self.config.max_faces)
        return self._detector

    def matte(self):
        if self._matte is None:
            from avat3r_core.priors.matte import PictureMatte

            self._matte = PictureMatte(self.config.segmentation_model or None)
        return self._matte

    def detect_one(self, image: np.ndarray, picture: str, scale: float = 1.0) -> tuple[np.ndarray | None, np.ndarray | None, dict]:
        """Landmarks of one picture in its decoded pixels: points (L, 2), confidence (L,) (None, None
        when no face), and what the detector saw (``faces_found``, ``face_box``, ``other_faces``).
        ``scale``: decoded / stored pixels (landmark files are in stored pixels)."""
        if self.config.landmarks == "file":
            try:
                pts, conf = read_landmarks_beside(picture)
            except NoFaceError:
                return None, None, {"faces_found": 0}
            return pts[0] * scale, conf[0], {"faces_found": 1}
        d = self._mediapipe().detect(image[None])
        info: dict = {"faces_found": int(d.extras["faces_found"][0])}
        if not d.found[0]:
            return None, None, info
        info["face_box"] = [round(float(v), 1) for v in d.extras["face_box"][0]]
        info["other_faces"] = [[round(v, 1) for v in b] for b in d.extras["face_boxes"][0] if
                               [round(v, 1) for v in b] != info["face_box"]]
        return d.points[0].astype(np.float64), d.confidence[0].astype(np.float64), info

    def _features_of(self, crops: np.ndarray) -> np.ndarray | None:
        if self.feature_source == "none":
            return None
        self.check_picture_features()
        from avat3r_core.priors import sources

        if self._features is None:
            self._features = sources.FeatureExtractor(self.feature_source, self.device, self.config.sapiens_model,
                                                      self.config.sapiens_input_size)
        raw = self._features(crops)
        feats = sources.features_to_store(raw.cpu(), self._projection).astype(np.float32)
        if feats.shape[1] != self.feature_dim:
            raise FormatError(self.config.feature_projection or self._features.source, "feature_dim",
                              f"{self._features.source} features have {feats.shape[1]} channels after projection, the "
                              f"model takes {self.feature_dim} (give the training data's feature_projection.npz)")
        return feats

    def feature_source_name(self) -> str:
        if self.feature_source == "none":
            return "none"
        if self._features is not None:
            return self._features.source
        return "efficientnet_lite0_imagenet" if self.feature_source == "efficientnet" else "sapiens"

    # ------------------------------------------------------------------ entry point
    def prepare(self, entry: LibraryEntry) -> PreparedAvatar:
        start = time.perf_counter()
        if entry.mode == "capture":
            out = self.prepare_capture(entry)
        elif entry.mode in ("photos", "image"):
            out = self.prepare_pictures(entry, entry.image_paths() if entry.mode == "photos" else [entry.source])
        elif entry.mode == "video":
            cfg = self.config
            frames, scale = read_video_frames(entry.source, cfg.video_max_frames, cfg.max_side, self._max_bytes)
            out = self.prepare_pictures(entry, [entry.source], frames=frames, frame_scale=scale)
        else:  # read_library already refuses this
            raise FormatError(entry.library, f"row {entry.row}: mode", f"unknown mode {entry.mode!r}")
        out.meta["prepare_s"] = round(time.perf_counter() - start, 3)
        return out

    @property
    def _max_bytes(self) -> int:
        return int(self.config.max_input_mb * 2 ** 20)

    def read_picture(self, path: str) -> tuple[np.ndarray, dict]:
        cfg = self.config
        return read_picture(path, cfg.max_megapixels, cfg.max_side, self._max_bytes)
