"""Colour handling: sRGB transfer functions and per-camera colour-correction matrices.

NeRSemble's ``calibration/color_calibration.json`` holds one CCM per camera serial. As the public
toolkit applies it: decode sRGB to linear, expand RGB into Cheung-2004 polynomial terms (the
number of terms is ``CCM.shape[-1]``; 3 terms is plain RGB), ``corrected = CCM @ terms``, encode
back to sRGB.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.formats.parsing import read_json


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    # in place, and the linear segment only where it applies: the same float32 operations as
    # np.where over both branches, at about half the cost (extraction runs this on every crop)
    out = np.power(x, 1 / 2.4, out=np.empty_like(x))  # an array even for 0-d input
    out *= 1.055
    out -= 0.055
    np.multiply(x, 12.92, out=out, where=x <= 0.0031308)
    return out


def cheung2004_terms(rgb: np.ndarray, terms: int) -> np.ndarray:
    """Polynomial expansion of (..., 3) RGB into Cheung et al. (2004) terms (..., terms)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # built on demand: computing every table's products for each call cost more than the matrix
    table = {
        3: lambda: [r, g, b],
        5: lambda: [r, g, b, r * g * b, np.ones_like(r)],
        7: lambda: [r, g, b, r * g, r * b, g * b, np.ones_like(r)],
        8: lambda: [r, g, b, r * g, r * b, g * b, r * g * b, np.ones_like(r)],
        10: lambda: [r, g, b, r * g, r * b, g * b, r * r, g * g, b * b, np.ones_like(r)],
    }
    if terms not in table:
        raise ValueError(f"unsupported Cheung-2004 term count {terms}; supported: {sorted(table)}")
    return np.stack(table[terms](), axis=-1)


def apply_ccm(image_srgb: np.ndarray, ccm: np.ndarray) -> np.ndarray:
    """Colour-correct an sRGB image in [0, 1] (H, W, 3) with a (3, terms) matrix; returns sRGB."""
    linear = srgb_to_linear(image_srgb)
    expanded = cheung2004_terms(linear, ccm.shape[-1])
    return linear_to_srgb(expanded @ np.asarray(ccm, dtype=np.float32).T)


def read_color_calibration(path: str | Path) -> dict[str, np.ndarray]:
    """``{serial: CCM (3, terms)}`` from a NeRSemble ``color_calibration.json``."""
    path = storage.as_path(path)  # a local path or a URI
    try:
        data = read_json(path)
    except OSError as exc:
        raise FormatError(path, None, f"unreadable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise FormatError(path, None, "expected an object {serial: matrix}")
    out = {}
    for serial, matrix in data.items():
        try:
            ccm = np.asarray(matrix, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise FormatError(path, str(serial), f"not a numeric matrix ({exc})") from exc
        if ccm.ndim != 2 or ccm.shape[0] != 3:
            raise FormatError(path, str(serial), f"expected a (3, terms) matrix, got shape {ccm.shape}")
        try:
            cheung2004_terms(np.zeros((1, 3)), ccm.shape[1])
        except ValueError as exc:
            raise FormatError(path, str(serial), str(exc)) from exc
        if not np.isfinite(ccm).all():
            raise FormatError(path, str(serial), "matrix holds NaN or Inf")
        out[str(serial)] = ccm
    return out


def color_calibration_json(ccms: dict[str, np.ndarray]) -> bytes:
    """Serialise ``{serial: CCM}`` in NeRSemble's ``color_calibration.json`` layout."""
    return json.dumps({serial: np.asarray(m).tolist() for serial, m in ccms.items()}, indent=1).encode()
