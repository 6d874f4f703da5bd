"""Expression tracks for animations: the built-in set, tracked sequences, ``.npy`` codes, head motion."""

from __future__ import annotations

import io
import math

import numpy as np

from avat3r_core import storage
from avat3r_core.errors import FormatError
from avat3r_core.tracking import EXPRESSION_DIM
from avat3r_core.geometry import HeadFrameError, head_frames
from avat3r_core.tracking import check_tracking_rows

#: the built-in expression set: (label, FLAME parameters of the key), covering jaw open, smile,
#: pucker, brows up and down and eyes closed. ``expression`` moves component k of the face model's
#: expression basis by the given number of standard deviations (FLAME coefficients are in sigma
#: units; on the studio head (``synthetic.head.EXPRESSION_NAMES``) 0 is the jaw-open corrective,
#: 1 "smile", 3 "brow_raise", 4 "brow_furrow", 5/6 the blinks (closed at +2), 8 "pucker");
#: ``jaw`` rotates the jaw joint. 7 transitions: at the demo's 11 frames per key and 24 fps, 3.2 s.
BUILTIN_KEYS: tuple[tuple[str, dict], ...] = (
    ("neutral", {}),
    ("jaw_open", {"expression": {0: 1.5}, "jaw": (0.3, 0.0, 0.0)}),
    ("smile", {"expression": {1: 2.0}}),
    ("pucker", {"expression": {8: 2.0}}),
    ("brows_up", {"expression": {3: 2.0}}),
    ("brows_down", {"expression": {4: 2.0}}),
    ("eyes_closed", {"expression": {5: 2.0, 6: 2.0}}),
    ("neutral", {}),
)


def _key_params(spec: dict) -> dict[str, np.ndarray]:
    expr = np.zeros(100)
    for k, v in spec.get("expression", {}).items():
        expr[k] = v
    return {"expression": expr, "jaw": np.asarray(spec.get("jaw", (0.0, 0.0, 0.0)), np.float64)}


def builtin_expressions(reference: dict | None = None, frames_per_key: int = 8) -> tuple[np.ndarray, list[str]]:
    """Codes (T, 135) float32 easing between :data:`BUILTIN_KEYS` (cosine), head at ``reference``."""
    keys = [_key_params(spec) for _, spec in BUILTIN_KEYS]
    params: dict[str, list] = {"expression": [], "jaw": []}
    labels = []
    for a in range(len(keys) - 1):
        for s in range(frames_per_key):
            w = 0.5 - 0.5 * math.cos(math.pi * s / frames_per_key)
            for k in params:
                params[k].append((1 - w) * keys[a][k] + w * keys[a + 1][k])
            labels.append(BUILTIN_KEYS[a][0] if w < 0.5 else BUILTIN_KEYS[a + 1][0])
    return _encode({k: np.stack(v) for k, v in params.items()}, reference), labels


def _encode(params: dict[str, np.ndarray], reference: dict | None) -> np.ndarray:
    from avat3r_core.tracking import expression_code

    T = len(next(iter(params.values())))
    ref = reference or {}
    full = dict(params)
    for key in ("rotation", "translation"):
        if key not in full:
            full[key] = np.tile(np.asarray(ref.get(key, np.zeros(3)), np.float64).reshape(1, 3), (T, 1))
    return expression_code.encode(full).astype(np.float32)


def neutral_code(reference: dict | None = None) -> np.ndarray:
    """(135,) the neutral expression with the head at its reference pose."""
    return _encode({"expression": np.zeros((1, 100))}, reference)[0]


def _tracked_rows(spec: str) -> list[dict]:
    """The frames of one tracked sequence, ``<tracking.parquet>[#subject/sequence]``, in frame order."""
    path, _, selector = spec.partition("#")
    if not storage.exists(path):
        raise FormatError(path, None, "expression track not found")
    rows = storage.read_parquet(path).to_pylist()
    if selector:
        subject, _, sequence = selector.partition("/")
        rows = [r for r in rows if str(r["subject"]) == subject and (not sequence or str(r["sequence"]) == sequence)]
    groups = {(str(r["subject"]), str(r["sequence"])) for r in rows}
    if not rows:
        raise FormatError(path, selector or None, "no tracked frames for this selector")
    if len(groups) > 1:
        raise FormatError(path, None, f"holds {len(groups)} sequences; pick one with '{path}#<subject>/<sequence>'")
    rows = sorted(rows, key=lambda r: int(r["frame"]))
    check_tracking_rows(rows, path)  # one NaN frame would render white, not fail
    return rows


def load_head_motion(spec: str | None) -> np.ndarray | None:
    """A tracked sequence's rigid head motion relative to its first frame, (T, 4, 4)
    ``H₀⁻¹ Hₜ`` (the frames of :func:`load_expression_track`); None for built-in or ``.npy`` codes.

    A head-frame avatar replays it with its camera: a camera fixed in the world is
    ``camera @ H₀⁻¹ Hₜ`` in the head frame at time t.
    """
    if not spec or spec == "builtin" or spec.partition("#")[0].endswith(".npy"):
        return None
    rows = _tracked_rows(spec)
    try:
        H = head_frames([r.get("head_to_world") for r in rows])
    except HeadFrameError as bad:
        if bad.missing:
            raise FormatError(spec.partition("#")[0], "head_to_world", "tracking without head frames (re-run the track "
                              "stage) cannot drive the head pose") from None
        raise FormatError(spec.partition("#")[0], f"frame {rows[bad.not_rigid[0]]['frame']}",
                          f"head_to_world is not a rigid transform ({len(bad.not_rigid)} of {len(rows)} frames)") from None
    return np.linalg.inv(H[0]) @ H


def load_expression_track(spec: str | None, reference: dict | None = None, frames_per_key: int = 8,
                          drive_head_pose: bool = False) -> tuple[np.ndarray, str]:
    """Expression codes (T, 135) float32 and a description of where they came from.

    ``spec``: ``None``/``builtin`` → :func:`builtin_expressions`; ``<tracking.parquet>[#subject/sequence]``
    → that sequence's tracked FLAME expression, jaw, neck and eyes, in frame order (the file must
    hold one sequence when no selector is given); ``<codes>.npy`` → (T, 135) codes as they are.
    The head stays at ``reference`` unless ``drive_head_pose`` (the tracked head motion is in its
    own capture's world frame, which is not the avatar's).
    """
    if not spec or spec == "builtin":
        codes, _ = builtin_expressions(reference, frames_per_key)
        return codes, "builtin"
    path, _, selector = spec.partition("#")
    if not storage.exists(path):
        raise FormatError(path, None, "expression track not found")
    if path.endswith(".npy"):
        try:
            codes = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
        except Exception as exc:
            raise FormatError(path, None, f"not a readable .npy of codes: {exc}") from None
        if codes.ndim != 2 or codes.shape[1] != EXPRESSION_DIM or len(codes) == 0:
            raise FormatError(path, None, f"expected (T, {EXPRESSION_DIM}) expression codes, got {codes.shape}")
        if not np.isfinite(codes).all():
            raise FormatError(path, None, "codes hold NaN/Inf")
        return codes.astype(np.float32), spec
    rows = _tracked_rows(spec)
    try:
        params = {k: np.array([r[k] for r in rows], np.float64) for k in ("expression", "jaw", "neck", "eyes")}
        if drive_head_pose:
            params.update({k: np.array([r[k] for r in rows], np.float64) for k in ("rotation", "translation")})
    except KeyError as exc:
        raise FormatError(path, str(exc).strip("'"), "missing tracking column") from None
    return _encode(params, reference), spec


def head_motion_for(frame: str, spec: str | None, drive_head_pose: bool) -> np.ndarray | None:
    """What an animation's camera replays: a head-frame model shows the tracked head motion
    through its camera (a world-frame model through the codes' head pose, so None here)."""
    return load_head_motion(spec) if drive_head_pose and frame == "head" else None
