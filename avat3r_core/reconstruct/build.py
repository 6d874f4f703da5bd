"""Building an avatar (encode once; neutral ``.ply``, preview, turntable, animation, picture
fidelity) and animating a built one from its cache (``avat3r animate``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avat3r_core import storage
from avat3r_core.cameras import Cameras
from avat3r_core.config import pick_device
from avat3r_core.errors import FormatError
from avat3r_core.formats.parsing import read_json
from avat3r_core.inference.drive import animation_frames, encoded_bytes, load_encoded, render_frames, view_orbit
from avat3r_core.inference.visuals import png_bytes, tile_images
from avat3r_core.reconstruct.expressions import head_motion_for, load_expression_track, neutral_code
from avat3r_core.reconstruct.prepared import PreparedAvatar

#: the files of a built avatar (``avatars/<id>/``)
CACHE_FILE, PLY_FILE, PREVIEW_FILE = "encoder_cache.pt", "gaussians_neutral.ply", "preview.png"
TURNTABLE_FILE, ANIMATION_FILE, META_FILE = "turntable.mp4", "animation.mp4", "meta.json"



@dataclass
class AvatarFiles:
    """What :func:`build_avatar` made (file name → bytes) and its numbers."""

    files: dict[str, bytes]
    stats: dict


#: yaw angles (degrees, around the input views' mean direction) at which picture avatars are compared with their photo
IDENTITY_YAWS = (0.0, -20.0, 20.0, -40.0, 40.0)


def yaw_key(yaw: float) -> str:
    """``yaw0``, ``yaw20``, ``yawm20`` ...: how fidelity figures name a yaw (index column suffixes)."""
    return f"yaw{'m' if yaw < 0 else ''}{abs(int(round(yaw)))}"


@torch.no_grad()
def picture_fidelity(gaussians, prepared: PreparedAvatar, orbit: dict, background: tuple[float, float, float],
                     identity=None) -> dict:
    """How well a picture avatar keeps its photo: re-render PSNR and identity similarity.

    * ``input_psnr``: each input view re-rendered at its own crop camera, PSNR (dB) over the pixels
      inside the person matte (``prepared.matte`` > 0.5), averaged over the views; what the avatar
      does not cover (hair and shoulders beyond a face-model position map) counts against it;
      ``input_psnr_covered``: the same over matte pixels that also have a Gaussian (confidence > 0.5);
    * identity (:class:`~avat3r_core.identity.FaceIdentity`, dlib's ResNet-128): the first input
      crop (resized to the render size) against the neutral avatar rendered at :data:`IDENTITY_YAWS`
      around the framing (yaw 0 = towards the mean input camera), framed like the crops (a field of
      view spanning ``meta["head_extent"]`` around the head centre): cosine ``similarity``, dlib
      ``distance`` and whether dlib found a face, per yaw.
    """
    import cv2

    from avat3r_core.identity import NETWORK, FaceIdentity

    device = gaussians.means.device
    renders = render_frames(gaussians, prepared.cameras(device), background)
    matte = prepared.matte if prepared.matte is not None else prepared.confidence

    def psnr_in(masks: np.ndarray) -> list[float]:
        out = []
        for v in range(prepared.num_views):
            if masks[v].any():
                err = (renders[v].astype(np.float64) - prepared.images[v].astype(np.float64))[masks[v]] / 255.0
                out.append(round(10.0 * math.log10(1.0 / max(float(np.mean(err ** 2)), 1e-10)), 3))
        return out

    psnrs = psnr_in(matte > 0.5)
    covered = psnr_in((matte > 0.5) & (prepared.confidence > 0.5))
    out: dict = {"input_psnr": round(float(np.mean(psnrs)), 3) if psnrs else None, "input_psnr_views": psnrs,
                 "input_psnr_covered": round(float(np.mean(covered)), 3) if covered else None}
    identity = identity if identity is not None else FaceIdentity()
    out["identity_network"] = NETWORK
    if not identity.available:
        out["identity_status"] = f"unavailable: {identity.reason}"
        return out
    size = int(orbit["size"])
    photo = cv2.resize(prepared.images[0], (size, size), interpolation=cv2.INTER_CUBIC)
    reference = identity.embed(photo)
    extent = float(prepared.meta.get("head_extent", 0.15))
    framed = {**orbit, "fov_deg": 2.0 * math.degrees(math.atan(extent / max(float(orbit["radius"]), 1e-6)))}
    views = render_frames(gaussians, view_orbit(yaw_values=IDENTITY_YAWS, pitch_deg=0.0, **framed), background)
    out["identity_status"] = "ok" if reference is not None else "no face found by dlib in the input crop"
    out["identity"] = {yaw_key(y): identity.compare(reference, img) for y, img in zip(IDENTITY_YAWS, views)}
    return out


@torch.no_grad()
def build_avatar(model, prepared: PreparedAvatar, codes: np.ndarray, turntable_frames: int = 24, size: int = 256,
                 preview_views: int = 4, fps: float = 24.0, yaw_deg: float = 45.0, fov_deg: float = 20.0,
                 background: tuple[float, float, float] = (1.0, 1.0, 1.0), chunk: int = 4,
                 motion: np.ndarray | None = None, identity=None) -> AvatarFiles:
    """Encode once, then the neutral Gaussians (``.ply``, preview, turntable) and the animation.

    Avatars from pictures also get :func:`picture_fidelity` (``stats["fidelity"]``; ``identity``:
    a :class:`~avat3r_core.identity.FaceIdentity` to reuse, else one is loaded).

    The animation is driven through the encoder cache (decoder only per frame), exactly as
    ``avat3r animate`` later drives it from the saved cache; ``motion`` (T, 4, 4): the head motion
    its camera replays (:func:`load_head_motion`).
    """

    from avat3r_core.video import encode_video

    device = next(model.parameters()).device
    timings = {}
    t0 = time.perf_counter()
    encoded = model.encode(prepared.inputs(device))
    timings["encode_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    neutral = torch.as_tensor(neutral_code(prepared.reference), device=device)[None]
    gaussians = model.decode(encoded, neutral).gaussians(0).detach().to(dtype=torch.float32)
    timings["decode_s"] = time.perf_counter() - t0
    files: dict[str, bytes] = {CACHE_FILE: encoded_bytes(encoded)}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        gaussians.to("cpu").save_ply(Path(tmp) / PLY_FILE)
        files[PLY_FILE] = (Path(tmp) / PLY_FILE).read_bytes()
    t0 = time.perf_counter()
    orbit = dict(center=prepared.center, radius=prepared.radius, front=prepared.front, up=prepared.up, size=size,
                 yaw_deg=yaw_deg, fov_deg=fov_deg, device=device)
    turntable = render_frames(gaussians, view_orbit(frames=turntable_frames, **orbit), background)
    files[TURNTABLE_FILE] = encode_video(list(turntable), fps=fps)
    # preview: the inputs (top row) above the neutral avatar seen from a few angles (bottom row)
    import cv2

    k = max(1, preview_views)
    views = render_frames(gaussians, view_orbit(yaw_values=np.linspace(-yaw_deg, yaw_deg, k) if k > 1 else [0.0],
                                                **orbit), background)
    top = [cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR) for img in prepared.images]
    cols = max(len(top), k)
    sheet = tile_images(top + [np.full((size, size, 3), 255, np.uint8)] * (cols - len(top)) + list(views), cols)
    files[PREVIEW_FILE] = png_bytes(sheet)
    timings["turntable_s"] = time.perf_counter() - t0
    fidelity = None
    if prepared.meta.get("mode") in ("photos", "image", "video"):
        t0 = time.perf_counter()
        fidelity = picture_fidelity(gaussians, prepared, orbit, background, identity)
        timings["fidelity_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    front_cam = view_orbit(frames=1, **orbit)
    anim = animation_frames(model, encoded, torch.as_tensor(codes, device=device), front_cam, chunk=chunk,
                            background=background, motion=motion)
    files[ANIMATION_FILE] = encode_video(list(anim), fps=fps)
    timings["animation_s"] = time.perf_counter() - t0
    stats = {"gaussians": len(gaussians), "views": prepared.num_views, "animation_frames": int(len(codes)),
             "turntable_frames": int(turntable_frames), **{k: round(v, 4) for k, v in timings.items()}}
    if fidelity is not None:
        stats["fidelity"] = fidelity
    return AvatarFiles(files, stats)


@torch.no_grad()
def drive_without_cache(model, prepared: PreparedAvatar, codes: np.ndarray, camera: Cameras,
                        background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """The reference for the cache: a full encode + decode per expression (N, H, W, 3) uint8."""

    device = next(model.parameters()).device
    inputs = prepared.inputs(device)
    frames = []
    for code in torch.as_tensor(codes, device=device):
        output = model(inputs, code[None])
        frames.append(render_frames(output.gaussians(0), camera, background)[0])
    return np.stack(frames)


def animate_avatar(avatar_dir: str | Path, expressions: str | None, out: str | Path, checkpoint: str | Path | None = None,
                   size: int | None = None, fps: float | None = None, device: str = "auto",
                   drive_head_pose: bool = False, driver=None, strip: str | Path | None = None,
                   strip_frames: int = 6) -> dict:
    """Drive a built avatar (its ``meta.json`` + encoder cache) with an expression track → MP4.

    ``driver``: an :class:`avat3r_core.animation.drivers.Driver` (a tracked video or an ARKit CSV)
    instead of ``expressions``; the video shows ``driver | avatar`` when the driver has frames.
    ``strip``: also a PNG of ``strip_frames`` evenly spaced frames of the video side by side (the
    frames as rendered, before video compression): what a person looks at before playing it.

    Only the decoder runs per frame. ``checkpoint`` defaults to the one the avatar was built with
    (recorded in ``meta.json``); the cache is read with the weights-only loader.
    """
    from avat3r_core.video import encode_video

    avatar_dir = Path(avatar_dir)
    meta_path = avatar_dir / META_FILE
    if not meta_path.exists():
        raise FormatError(meta_path, None, "not a built avatar directory (no meta.json)")
    meta = read_json(meta_path)
    try:
        framing = meta["framing"]
    except (KeyError, TypeError) as exc:
        raise FormatError(meta_path, str(exc), "unreadable avatar metadata") from None
    dev = pick_device(device)
    from avat3r_core.inference.checkpoint import load_trained_model

    model, _, _ = load_trained_model(checkpoint or meta["checkpoint"], dev)
    encoded = load_encoded(avatar_dir / CACHE_FILE, dev)
    reference = {k: np.asarray(v) for k, v in meta.get("reference", {}).items()}
    if driver is not None:
        codes, described, motion = driver.codes(reference), driver.description, None
    else:
        codes, described = load_expression_track(expressions, reference, drive_head_pose=drive_head_pose)
        motion = head_motion_for(model.config.frame, expressions, drive_head_pose)
    size = int(size or meta.get("render", {}).get("size", 256))
    fps = float(fps or meta.get("render", {}).get("fps", 24.0))
    camera = view_orbit(framing["center"], framing["radius"], framing["front"], framing["up"], frames=1, size=size,
                        fov_deg=meta.get("render", {}).get("fov_deg", 20.0), device=dev)
    start = time.perf_counter()
    frames = animation_frames(model, encoded, torch.as_tensor(codes, device=dev), camera, motion=motion)
    seconds = time.perf_counter() - start
    shown = driver.side_by_side(list(frames)) if driver is not None else list(frames)
    data = encode_video(shown, fps=fps)
    storage.atomic_write_bytes(str(out), data)
    result = {"out": str(out), "frames": int(len(frames)), "expressions": described, "seconds": round(seconds, 3),
              "frames_per_s": round(len(frames) / seconds, 2) if seconds > 0 else None, "bytes": len(data)}
    if strip is not None:
        picked = strip_indices(len(shown), strip_frames)
        storage.atomic_write_bytes(str(strip), png_bytes(tile_images([shown[i] for i in picked], len(picked))))
        result.update(strip=str(strip), strip_frames=picked)
    return result


def strip_indices(frames: int, count: int) -> list[int]:
    """``count`` evenly spaced frame indices from the first to the last (fewer for a short video)."""
    if count < 1:
        raise ValueError(f"strip_frames must be at least 1, got {count}")
    count = min(count, frames)
    return [round(i * (frames - 1) / max(count - 1, 1)) for i in range(count)]
