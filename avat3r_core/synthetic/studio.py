"""The synthetic capture studio: procedural people filmed by a calibrated NeRSemble-like rig.

Output is written in the NeRSemble raw layout, so the same ingestion code reads it and a real
capture::

    <raw>/<pid:03d>/calibration/camera_params.json      world_2_cam per serial (OpenCV), shared K
    <raw>/<pid:03d>/calibration/color_calibration.json  CCM per serial (undoes each camera's cast)
    <raw>/<pid:03d>/sequences/<SEQ>/images/cam_<serial>.mp4
    <raw>/<pid:03d>/sequences/<SEQ>/alpha/cam_<serial>.mp4   foreground mattes (studio extra)
    <raw>/<pid:03d>/sequences/BACKGROUND/images/cam_<serial>.mp4   empty-scene plates

Ground truth goes to a separate tree that no stage reads by accident::

    <gt>/<pid:03d>/identity.json                         shape coefficients, appearance
    <gt>/<pid:03d>/sequences/<SEQ>/flame_params.npz      NeRSemble-benchmark tracking layout
    <gt>/<pid:03d>/sequences/<SEQ>/landmarks2d.npz       (T, C, 68, 2) pixels + visibility
    <gt>/<pid:03d>/sequences/<SEQ>/depth/cam_<serial>.npz   (T, H, W) float16 metres, 0 = empty
    <gt>/previews/<pid:03d>.png                          contact sheet (with ``preview``)

The face model the studio renders (a procedural head in the FLAME file format) is written once to
``<face_model>/head_model.pkl`` with its 68-point landmark embedding
(``head_landmark_embedding.pkl``), like a user-supplied FLAME.
Every array is a pure function of (seed, subject index): same seed, same dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.color import linear_to_srgb, srgb_to_linear
from avat3r_core.inference.visuals import tile_images

#: NeRSemble sequence names, used in order (BACKGROUND is always added).
SEQUENCE_NAMES = (
    "EXP-1-head", "EXP-2-eyes", "EXP-3-cheeks+mouth", "EXP-4-lips", "EXP-5-mouth", "EXP-6-tongue-1",
    "EXP-8-jaw-1", "EXP-9-jaw-2", "EMO-1-shout+laugh", "EMO-2-surprise+fear", "EMO-3-angry+sad",
    "EMO-4-disgust+happy", "FREE",
)
BACKGROUND = "BACKGROUND"
#: NeRSemble's frames are portrait; the studio keeps that aspect (width / height).
PORTRAIT_ASPECT = 2200 / 3208


@dataclass
class StudioConfig:
    PRESETS: ClassVar[dict] = {
        "tiny": dict(subjects=2, sequences=1, frames=4, cameras=4, resolution=96),
        "demo": dict(subjects=8, sequences=3, frames=10, cameras=16, resolution=224),
        "large": dict(subjects=32, sequences=8, frames=48, cameras=16, resolution=512),
    }

    subjects: int = 8
    sequences: int = 3
    frames: int = 10
    cameras: int = 16
    resolution: int = 224  # image height; width follows NeRSemble's portrait aspect
    seed: int = 0
    fps: float = 24.0
    background_frames: int = 2
    camera_radius: float = 1.0  # metres from the head
    fov_deg: float = 24.0  # vertical field of view: the whole head with margin in every camera
    color_calibration: bool = True  # give each camera a colour cast and write the CCM that undoes it
    supersample: int = 2  # anti-aliasing factor of the renderer
    crf: int = 14  # H.264 quality of the colour videos (alpha videos are lossless)
    preview: bool = False

    def __post_init__(self) -> None:
        checks = {
            "subjects": self.subjects >= 1, "sequences": 1 <= self.sequences <= len(SEQUENCE_NAMES),
            "frames": self.frames >= 2, "cameras": 1 <= self.cameras <= 64,
            "resolution": 32 <= self.resolution <= 4096, "background_frames": self.background_frames >= 1,
            "supersample": 1 <= self.supersample <= 4, "fps": self.fps > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = {name: getattr(self, name) for name in bad}
            raise ValueError(f"invalid studio settings {values} (sequences ≤ {len(SEQUENCE_NAMES)}, "
                             "frames ≥ 2, cameras 1–64, resolution 32–4096, supersample 1–4)")

    @property
    def width(self) -> int:
        return max(2, int(round(self.resolution * PORTRAIT_ASPECT / 2)) * 2)

    @property
    def height(self) -> int:
        return self.resolution + (self.resolution % 2)

    @property
    def sequence_names(self) -> list[str]:
        return list(SEQUENCE_NAMES[: self.sequences])


def subject_ids(config: StudioConfig) -> list[str]:
    return [f"{i + 1:03d}" for i in range(config.subjects)]


def subject_seed(seed: int, pid: str, salt: str = "") -> int:
    """A stable 63-bit seed per (dataset seed, subject, purpose); independent of Python's hash."""
    digest = hashlib.sha256(f"{seed}/{pid}/{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def camera_serials(n: int) -> list[str]:
    """Nine-digit serials like NeRSemble's (e.g. 222200037); fixed for the studio."""
    return [str(222200036 + i) for i in range(n)]


def make_rig(config: StudioConfig) -> tuple[list[str], Cameras]:
    """16 cameras by default, in two rows over ±55° yaw, all looking at the head centre."""
    rows = (-10.0, 12.0) if config.cameras >= 6 else (0.0,)
    cams = Cameras.rig_arc(
        n=config.cameras, radius=config.camera_radius, target=(0.0, 0.0, 0.0),
        yaw_range_deg=(-55.0, 55.0) if config.cameras > 1 else (0.0, 0.0), pitch_deg_levels=rows,
        fov_deg=config.fov_deg, width=config.width, height=config.height, dtype=torch.float64,
    )
    return camera_serials(config.cameras), cams


# --------------------------------------------------------------------------- motion
def _smooth_keyframes(rng: np.random.Generator, frames: int, dims: int, scale: np.ndarray | float,
                      n_keys: int) -> np.ndarray:
    """(frames, dims) trajectory: random keyframes joined by cosine easing, starting neutral."""
    keys = rng.normal(0.0, 1.0, size=(n_keys, dims)) * scale
    keys[0] = 0.0
    positions = np.linspace(0, frames - 1, n_keys)
    t = np.arange(frames, dtype=np.float64)
    seg = np.clip(np.searchsorted(positions, t, side="right") - 1, 0, n_keys - 2)
    local = (t - positions[seg]) / (positions[seg + 1] - positions[seg])
    ease = 0.5 - 0.5 * np.cos(np.pi * local)
    return keys[seg] * (1 - ease[:, None]) + keys[seg + 1] * ease[:, None]


def sequence_motion(seed: int, pid: str, sequence: str, frames: int, n_expr_active: int) -> dict[str, np.ndarray]:
    """Per-frame FLAME parameters of one sequence, in the NeRSemble-benchmark tracking layout.

    Expression, jaw, eye gaze and head pose follow smooth random trajectories; each sequence
    stresses something (head motion for EXP-1, eyes for EXP-2, jaw for EXP-8/9, ...), so sequences
    differ the way a real capture protocol's do.
    """
    rng = np.random.default_rng(subject_seed(seed, pid, f"motion/{sequence}"))
    n_keys = max(2, min(5, frames // 4 + 1))
    head_scale = np.array([0.18, 0.35, 0.08])  # pitch, yaw, roll (radians)
    jaw_scale, expr_scale, eye_scale = 0.12, 0.8, 0.15
    if sequence.startswith("EXP-1"):
        head_scale = head_scale * 1.6
    if "eyes" in sequence:
        eye_scale = 0.3
    if "jaw" in sequence or "mouth" in sequence or "shout" in sequence:
        jaw_scale = 0.2
    expression = np.zeros((frames, 100))
    expression[:, :n_expr_active] = _smooth_keyframes(rng, frames, n_expr_active, expr_scale, n_keys)
    rotation = _smooth_keyframes(rng, frames, 3, head_scale, n_keys)
    jaw = np.zeros((frames, 3))
    jaw[:, 0] = np.abs(_smooth_keyframes(rng, frames, 1, jaw_scale, n_keys)[:, 0])  # open only
    neck = _smooth_keyframes(rng, frames, 3, np.array([0.05, 0.08, 0.03]), n_keys)
    gaze = _smooth_keyframes(rng, frames, 2, eye_scale, n_keys)
    eyes = np.zeros((frames, 6))
    eyes[:, [0, 3]] = gaze[:, [0]]  # both eyes pitch together
    eyes[:, [1, 4]] = gaze[:, [1]]  # ... and yaw together
    translation = _smooth_keyframes(rng, frames, 3, 0.01, n_keys)
    # component 0 of the studio head is the jaw-open corrective: it follows the jaw, as in FLAME fits
    expression[:, 0] = jaw[:, 0] / 0.2
    from scipy.spatial.transform import Rotation

    return {
        "expression": expression.astype(np.float32),
        "rotation": rotation.astype(np.float32),
        "rotation_matrices": Rotation.from_rotvec(rotation).as_matrix().astype(np.float32),
        "translation": translation.astype(np.float32),
        "jaw": jaw.astype(np.float32),
        "neck": neck.astype(np.float32),
        "eyes": eyes.astype(np.float32),
        "frames": np.arange(frames, dtype=np.int32),
    }


# --------------------------------------------------------------------------- studio look
def background_plate(camera_index: int, width: int, height: int) -> np.ndarray:
    """A static studio backdrop per camera: a lit grey wall with low-frequency mottling (sRGB)."""
    rng = np.random.default_rng(1000 + camera_index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    base = 0.42 + 0.12 * (1 - v) + 0.05 * np.cos(np.pi * (u - 0.5))
    mottling = np.zeros_like(u)
    for _ in range(6):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        mottling += 0.012 * np.sin(2 * np.pi * (fx * u + fy * v) + phase)
    tint = np.array([1.0, 0.98, 0.95], dtype=np.float32) * rng.uniform(0.95, 1.05)
    return np.clip((base + mottling)[..., None] * tint, 0, 1).astype(np.float32)


def camera_color_casts(seed: int, serials: list[str]) -> dict[str, np.ndarray]:
    """Per camera a mild 3×3 colour cast M (linear RGB); the calibration CCM is its inverse."""
    casts = {}
    for serial in serials:
        rng = np.random.default_rng(subject_seed(seed, serial, "cast"))
        casts[serial] = np.eye(3) + rng.normal(0, 0.015, (3, 3)) + np.diag(rng.normal(0, 0.03, 3))
    return casts


def apply_cast(image_srgb: np.ndarray, cast: np.ndarray) -> np.ndarray:
    return linear_to_srgb(srgb_to_linear(image_srgb) @ cast.T.astype(np.float32))


def sensor_noise(rng: np.random.Generator, shape: tuple, sigma: float = 1.0 / 255) -> np.ndarray:
    return rng.normal(0.0, sigma, size=shape).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode()


def config_json(config: StudioConfig) -> dict:
    return asdict(config)




# --------------------------------------------------------------------------- filming
@dataclass
class HeadAssets:
    """The face model, loaded once per worker from the written FLAME-format files."""

    model: object  # avat3r_core.flame.FlameModel (with the studio's region extras)
    layer: torch.nn.Module  # avat3r_core.flame.FlameLayer with the 68-point embedding

    @classmethod
    def load(cls, model_path: str, embedding_path: str) -> "HeadAssets":
        from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding

        model = load_flame_model(model_path)
        layer = FlameLayer(model, landmarks=load_landmark_embedding(embedding_path), dtype=torch.float64)
        return cls(model, layer.eval())


def face_model_paths(face_model_dir: str) -> tuple[str, str]:
    return (f"{face_model_dir}/head_model.pkl", f"{face_model_dir}/head_landmark_embedding.pkl")


def write_face_model(face_model_dir: str, seed: int) -> tuple[str, str]:
    """Write the studio head (FLAME layout) once; every worker then loads it like a user's FLAME.

    Beside it, when MediaPipe's ``face_landmarker.task`` is installed, its MediaPipe landmark
    embedding (``head_mediapipe_embedding.npz``, :func:`~avat3r_core.tracking.landmarks.write_mediapipe_embedding`),
    so real photos fit with MediaPipe's points; without the model file that step is skipped (logged).
    """
    import logging

    from avat3r_core import storage
    from avat3r_core.synthetic.head import write_head_model
    from avat3r_core.tracking.landmarks import MEDIAPIPE_EMBEDDING_FILE, find_mediapipe_model, write_mediapipe_embedding

    model_path, embedding_path = face_model_paths(face_model_dir)
    if not (storage.exists(model_path) and storage.exists(embedding_path)):
        write_head_model(face_model_dir, seed=seed)
    mp_path = storage.join(face_model_dir, MEDIAPIPE_EMBEDDING_FILE)
    if not storage.exists(mp_path):
        try:
            task = find_mediapipe_model()
        except FileNotFoundError as exc:
            logging.getLogger("avat3r.synth").warning("no MediaPipe embedding for the studio head: %s", exc)
        else:
            write_mediapipe_embedding(model_path, embedding_path, mp_path, task)
    return model_path, embedding_path


@dataclass
class FilmedSequence:
    name: str
    frames: dict[str, list[np.ndarray]]  # serial → RGB uint8 frames as the camera records them
    alphas: dict[str, list[np.ndarray]]  # serial → alpha uint8
    depth: dict[str, np.ndarray]  # serial → (T, H, W) float16 metres, 0 = empty
    landmarks: np.ndarray  # (T, C, 68, 2) pixels
    visible: np.ndarray  # (T, C, 68) bool
    params: dict[str, np.ndarray]  # FLAME parameters per frame (benchmark tracking layout)


def film_sequence(config: StudioConfig, head: HeadAssets, pid: str, sequence: str, serials: list[str],
                  cams: Cameras, plates: np.ndarray, casts: dict[str, np.ndarray] | None,
                  identity: np.ndarray, appearance) -> FilmedSequence:
    """Render one sequence of one subject in every camera: what the cameras record, plus truth."""
    from avat3r_core.synthetic.appearance import render_head
    from avat3r_core.synthetic.head import EXPRESSION_NAMES

    motion = sequence_motion(config.seed, pid, sequence, config.frames, len(EXPRESSION_NAMES))
    noise_rng = np.random.default_rng(subject_seed(config.seed, pid, f"noise/{sequence}"))
    w2c, K = cams.world_to_cam.numpy(), cams.K.numpy()
    frames = {s: [] for s in serials}
    alphas = {s: [] for s in serials}
    depth = {s: np.zeros((config.frames, config.height, config.width), np.float16) for s in serials}
    landmarks = np.zeros((config.frames, len(serials), 68, 2), np.float32)
    visible = np.zeros((config.frames, len(serials), 68), bool)
    for t in range(config.frames):
        render, posed = render_head(
            head.layer, head.model, appearance, w2c, K, config.width, config.height,
            supersample=config.supersample, background=plates, shape=identity,
            expr=motion["expression"][t], rotation=motion["rotation"][t], neck=motion["neck"][t],
            jaw=motion["jaw"][t], eyes=motion["eyes"][t], translation=motion["translation"][t],
        )
        uv, z = cams.project(posed.landmarks[0].to(cams.dtype))
        uv, z = uv.numpy(), z.numpy()
        landmarks[t] = uv
        facing = _landmark_facing(head, posed.vertices[0].numpy(), posed.landmarks[0].numpy(), cams)
        for c, serial in enumerate(serials):
            image = render.color[c]
            if casts is not None:
                image = apply_cast(image, casts[serial])
            image = image + sensor_noise(noise_rng, image.shape)
            frames[serial].append(to_uint8(image))
            alphas[serial].append(to_uint8(render.alpha[c]))
            d = render.depth[c]
            depth[serial][t] = np.where(np.isfinite(d), d, 0).astype(np.float16)
            col = np.clip(np.floor(uv[c, :, 0]).astype(int), 0, config.width - 1)
            row = np.clip(np.floor(uv[c, :, 1]).astype(int), 0, config.height - 1)
            inside = (uv[c, :, 0] >= 0) & (uv[c, :, 0] < config.width) & (uv[c, :, 1] >= 0) & (uv[c, :, 1] < config.height)
            # visible: in the image, not behind the surface, and not seen at a grazing angle
            visible[t, c] = inside & (z[c] <= d[row, col] + 0.004) & (facing[c] > 0.2)
    params = dict(motion)
    params["shape"] = identity[None].astype(np.float32)
    params["scale"] = np.ones((1, 1), np.float32)
    return FilmedSequence(sequence, frames, alphas, depth, landmarks, visible, params)


def _landmark_facing(head: HeadAssets, vertices: np.ndarray, landmarks: np.ndarray, cams: Cameras) -> np.ndarray:
    """(C, L) cosine between each landmark's surface normal and its direction to each camera."""
    from avat3r_core.synthetic.mesh_raster import vertex_normals

    normals = vertex_normals(vertices, head.layer.faces.numpy())
    tri = head.layer.lmk_faces.numpy()
    bary = head.layer.lmk_bary.numpy()
    n = (normals[tri] * bary[..., None]).sum(1)
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    to_cam = cams.centers.numpy()[:, None, :] - landmarks[None]
    to_cam /= np.linalg.norm(to_cam, axis=2, keepdims=True)
    return np.einsum("cld,ld->cl", to_cam, n)


def film_background(config: StudioConfig, pid: str, serials: list[str], plates: np.ndarray,
                    casts: dict[str, np.ndarray] | None) -> dict[str, list[np.ndarray]]:
    """The BACKGROUND sequence: the empty studio as each camera records it."""
    rng = np.random.default_rng(subject_seed(config.seed, pid, "noise/background"))
    out = {}
    for c, serial in enumerate(serials):
        plate = apply_cast(plates[c], casts[serial]) if casts is not None else plates[c]
        out[serial] = [to_uint8(plate + sensor_noise(rng, plate.shape)) for _ in range(config.background_frames)]
    return out


def contact_sheet(sequence: FilmedSequence, serials: list[str], frontal: str, max_cols: int = 8) -> np.ndarray:
    """All cameras at the middle frame (top rows) and the frontal camera over time (bottom rows)."""
    t_mid = len(sequence.frames[serials[0]]) // 2
    views = [sequence.frames[s][t_mid] for s in serials]
    over_time = sequence.frames[frontal]
    step = max(1, len(over_time) // max_cols)
    times = over_time[::step][:max_cols]

    top, bottom = tile_images(views, max_cols), tile_images(times, max_cols)
    gap = np.full((8, top.shape[1], 3), 255, np.uint8)
    return np.concatenate([top, gap, bottom], axis=0)
