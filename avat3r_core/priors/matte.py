"""Foreground mattes for pictures: MediaPipe's person segmentation, or a labelled fallback.

Real photos have backgrounds; the studio's crops come with mattes from extraction, pictures do
not. :class:`PictureMatte` gives each picture an alpha matte (float32 in [0, 1], 1 = the person):

* ``selfie_segmentation``: MediaPipe's person-segmentation model
  ``selfie_segmentation.tflite`` (Apache-2.0). It ships in the mediapipe 0.10.21 wheel
  (``mediapipe/modules/selfie_segmentation/``), the last release with the legacy solution models;
  ``make setup`` takes only that file out of the wheel into ``<venv>/share/avat3r/`` (installing that
  mediapipe would pin numpy < 2). It runs with the installed mediapipe's Tasks ``ImageSegmenter``
  (one confidence mask, the person's probability); hair, shoulders and clothes count as person.
* fallback ``face_model_silhouette``: without the model file, the fitted face model's own coverage
  of each crop (the position map's confidence): the head without hair or shoulders. Labelled as such
  in every avatar's ``meta.json``.

``find_selfie_model`` looks at ``$AVAT3R_SELFIE_MODEL``, then the ``make setup`` copy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from avat3r_core.errors import FormatError
from avat3r_core.tracking.landmarks import shared_mediapipe_task

__all__ = ["SELFIE_SOURCE", "FALLBACK_SOURCE", "find_selfie_model", "PictureMatte"]

SELFIE_SOURCE = "selfie_segmentation"
FALLBACK_SOURCE = "face_model_silhouette"
SELFIE_FILE = "selfie_segmentation.tflite"


def find_selfie_model(model_path: str | None = None) -> str | None:
    """The segmentation model file: ``model_path`` (must exist), ``$AVAT3R_SELFIE_MODEL``, or the copy
    ``make setup`` puts at ``<venv>/share/avat3r/selfie_segmentation.tflite``; None when there is none."""
    model_path = model_path or os.environ.get("AVAT3R_SELFIE_MODEL")
    if model_path:
        if not Path(model_path).is_file():
            raise FormatError(model_path, None, "segmentation model file not found")
        return str(model_path)
    installed = Path(sys.prefix) / "share" / "avat3r" / SELFIE_FILE
    return str(installed) if installed.is_file() else None


class PictureMatte:
    """Person mattes of RGB pictures; ``source`` says which method (see the module docstring)."""

    def __init__(self, model_path: str | None = None):
        self.model_path = find_selfie_model(model_path)
        self.source = SELFIE_SOURCE if self.model_path else FALLBACK_SOURCE
        self._segmenter = None

    @property
    def available(self) -> bool:
        return self.model_path is not None

    def _build(self):
        if self._segmenter is None:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision

            def create():
                options = vision.ImageSegmenterOptions(
                    base_options=BaseOptions(model_asset_buffer=Path(self.model_path).read_bytes()),
                    running_mode=vision.RunningMode.IMAGE, output_confidence_masks=True,
                    output_category_mask=False)
                return vision.ImageSegmenter.create_from_options(options)

            self._mp = mp
            self._segmenter = shared_mediapipe_task(("image_segmenter", str(Path(self.model_path).resolve())), create)
        return self._segmenter

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 person probability of one uint8 RGB picture (the segmentation model only)."""
        if not self.available:
            raise RuntimeError("no segmentation model: use the face-model silhouette fallback")
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) RGB picture, got {image.dtype} {image.shape}")
        result = self._build().segment(self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=image))
        mask = np.asarray(result.confidence_masks[-1].numpy_view(), np.float32).reshape(image.shape[:2])
        return np.clip(mask, 0.0, 1.0)

    def close(self) -> None:
        """Let go of the segmenter (shared, closed at exit: see :func:`shared_mediapipe_task`)."""
        self._segmenter = None
