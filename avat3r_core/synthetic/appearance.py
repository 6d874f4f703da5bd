"""A studio subject's look on the procedural head of :mod:`avat3r_core.synthetic.head`: colours,
hair (coverage and volume), procedural surface detail, and the shaded render of the posed head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numba
import numpy as np

from avat3r_core.flame import FlameModel
from avat3r_core.synthetic.head import LABELS, smoothstep

__all__ = ["Appearance", "hair_mask", "hair_offsets", "render_head", "sample_appearance", "vertex_albedo"]


@dataclass
class Appearance:
    """Per-subject look (colours are sRGB-ish in [0, 1])."""

    skin: tuple
    hair: tuple
    iris: tuple
    lips: tuple
    brow: tuple
    hair_extent: float  # metres; > 0 lowers the hairline (more hair), < 0 receding
    hair_volume: float  # metres of hair thickness on top of the scalp
    freckles: float  # 0..1
    stubble: float  # 0..1
    noise_seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    def _waves(self, n, kmin, kmax, salt):
        rng = np.random.default_rng(self.noise_seed * 7919 + salt)
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        k = np.exp(rng.uniform(np.log(kmin), np.log(kmax), n))[:, None] * dirs
        return k, rng.uniform(0, 2 * np.pi, n)

    def _noise(self, p, n, kmin, kmax, salt):
        k, ph = self._waves(n, kmin, kmax, salt)
        out = np.empty(len(p))
        _sum_of_waves(np.ascontiguousarray(p, dtype=np.float64), k, ph, out)
        return out / np.sqrt(n / 2)

    def detail(self, points: np.ndarray, albedo: np.ndarray) -> np.ndarray:
        """Procedural surface detail at canonical points (N, >=5: xyz, hair mask, skin mask)."""
        p = points[:, :3]
        hair = points[:, 3] if points.shape[1] > 3 else np.zeros(len(p))
        skin = points[:, 4] if points.shape[1] > 4 else np.ones(len(p))
        low = self._noise(p, 12, 40.0, 160.0, 1)  # blotches, cm scale
        out = albedo.copy()
        # fine noise only where it shows (skin / hair): this is the studio's hottest loop
        on_skin = skin > 0
        if on_skin.any():
            ps = p[on_skin]
            mid = self._noise(ps, 16, 300.0, 900.0, 2)  # pores / mottling, mm scale
            gain = 1 + skin[on_skin] * (0.05 * low[on_skin] + 0.035 * mid)
            if self.freckles > 0:
                f = self._noise(ps, 20, 500.0, 1400.0, 3)
                spots = smoothstep(1.3, 1.9, f) * self.freckles * skin[on_skin] * smoothstep(0.0, 0.06, ps[:, 2])
                gain = gain * (1 - 0.28 * spots)
            out[on_skin] *= gain[:, None]
        # hair strands: fine stripes across the strand direction (mostly along y on the scalp)
        on_hair = hair > 0
        if on_hair.any():
            q = p[on_hair] * np.array([1.0, 0.12, 1.0])
            strands = self._noise(q, 18, 900.0, 2500.0, 4)
            out[on_hair] *= (1 + hair[on_hair] * (0.16 * strands + 0.08 * low[on_hair]))[:, None]
        return np.clip(out, 0, 1)


@numba.njit(parallel=True, cache=True)
def _sum_of_waves(p, k, phase, out):
    """out[i] = Σ_j sin(p_i · k_j + phase_j): the studio's texture noise, evaluated per fragment.

    The hottest loop of the studio (millions of fragments per frame); numpy's version materialises
    an (N, n_waves) temporary and runs ~5x slower.
    """
    for i in numba.prange(p.shape[0]):
        acc = 0.0
        for j in range(k.shape[0]):
            acc += np.sin(p[i, 0] * k[j, 0] + p[i, 1] * k[j, 1] + p[i, 2] * k[j, 2] + phase[j])
        out[i] = acc


def sample_appearance(seed: int) -> Appearance:
    rng = np.random.default_rng(seed + 1_000_003)
    tones = np.array([[0.95, 0.80, 0.70], [0.87, 0.68, 0.56], [0.76, 0.56, 0.42], [0.60, 0.42, 0.30],
                      [0.42, 0.28, 0.20]])
    t = rng.uniform(0, len(tones) - 1)
    i = int(t)
    skin = tones[i] * (1 - (t - i)) + tones[min(i + 1, len(tones) - 1)] * (t - i)
    skin = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 1)
    hairs = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.30, 0.16], [0.75, 0.60, 0.38],
                      [0.55, 0.22, 0.10], [0.55, 0.55, 0.55]])
    hair = hairs[rng.integers(len(hairs))] * rng.uniform(0.85, 1.15)
    irises = np.array([[0.30, 0.18, 0.08], [0.20, 0.35, 0.55], [0.30, 0.42, 0.22], [0.15, 0.10, 0.06]])
    iris = irises[rng.integers(len(irises))]
    lips = np.clip(skin * np.array([0.95, 0.62, 0.62]) + np.array([0.06, 0.0, 0.02]), 0, 1)
    brow = np.clip(hair * 0.8 + 0.03, 0, 1)
    return Appearance(
        skin=tuple(float(c) for c in skin), hair=tuple(float(c) for c in np.clip(hair, 0, 1)),
        iris=tuple(float(c) for c in iris), lips=tuple(float(c) for c in lips), brow=tuple(float(c) for c in brow),
        hair_extent=float(rng.uniform(-0.015, 0.012)), hair_volume=float(rng.uniform(0.003, 0.014)),
        freckles=float(rng.uniform(0, 1) ** 3), stubble=float(rng.uniform(0, 1) ** 2 * (rng.uniform() < 0.5)),
        noise_seed=int(rng.integers(2 ** 31)),
    )


def _extras(model) -> dict:
    if isinstance(model, FlameModel):
        return model.extras
    return model


def _region(model, name: str) -> np.ndarray:
    ex = _extras(model)
    names = [str(s) for s in np.asarray(ex["region_names"]).tolist()]
    return np.asarray(ex["region_masks"])[:, names.index(name)]


def hair_mask(model, appearance: Appearance) -> np.ndarray:
    """(V,) soft hair coverage in [0, 1] for this subject's hairline."""
    hc = _region(model, "hair_coord")
    labels = np.asarray(_extras(model)["vertex_labels"])
    shell = (labels == LABELS["skin"]) | (labels == LABELS["scalp"])
    return smoothstep(-0.004, 0.006, hc + appearance.hair_extent) * shell


def hair_offsets(model, appearance: Appearance) -> np.ndarray:
    """(V, 3) canonical displacement giving the hair volume (pass as ``offsets`` to FlameLayer)."""
    m = hair_mask(model, appearance)
    d = np.asarray(_extras(model)["hair_dir"])
    top = 0.55 + 0.45 * np.clip(d[:, 1], 0, 1)
    return (appearance.hair_volume * m * top)[:, None] * d


def vertex_albedo(model, appearance: Appearance) -> np.ndarray:
    """(V, 3) base colour per vertex."""
    ex = _extras(model)
    labels = np.asarray(ex["vertex_labels"])
    V = len(labels)
    skin = np.broadcast_to(np.asarray(appearance.skin), (V, 3)).copy()
    col = skin.copy()
    r = lambda name: _region(model, name)[:, None]  # noqa: E731
    col = col * (1 - 0.12 * r("cheek") * np.array([0.0, 1.0, 0.8]))  # flush
    col = col * (1 - r("lips")) + np.asarray(appearance.lips) * r("lips")
    col = col * (1 - 0.55 * r("lip_line"))
    col = col * (1 - 0.85 * r("brow")) + 0.85 * np.asarray(appearance.brow) * r("brow")
    col = col * (1 - 0.75 * np.clip(r("lid_line"), 0, 1)) + 0.75 * np.clip(r("lid_line"), 0, 1) * 0.12
    if appearance.stubble > 0:  # shaved beard shadow
        st = appearance.stubble * 0.45 * r("beard")
        col = col * (1 - st) + st * np.asarray(appearance.hair) * 0.8
    hm = hair_mask(model, appearance)[:, None]
    col = col * (1 - hm) + np.asarray(appearance.hair) * hm
    eye = (labels == LABELS["eye_left"]) | (labels == LABELS["eye_right"])
    sclera = np.array([0.93, 0.91, 0.88])
    ecol = sclera * r("sclera") + np.asarray(appearance.iris) * r("iris") + 0.03 * r("pupil")
    col[eye] = ecol[eye]
    mouth = labels == LABELS["mouth"]
    mcol = np.array([0.16, 0.04, 0.05]) * (1 - r("teeth")) + np.array([0.88, 0.85, 0.78]) * r("teeth")
    col[mouth] = mcol[mouth]
    ear = labels == LABELS["ear"]
    col[ear] = (skin * (1 - 0.3 * r("ear_inner")) * np.array([1.0, 0.96, 0.96]))[ear]
    neck = labels == LABELS["neck"]
    col[neck] = skin[neck] * 0.97
    return np.clip(col, 0, 1)


def render_head(layer, model, appearance: Appearance, world_to_cam, K, width: int, height: int,
                supersample: int = 2, background=None, **params):
    """Pose the head with ``layer`` (a FlameLayer on ``model``) and shade it in every camera.

    ``params`` go to ``layer.forward`` (shape, expr, rotation, neck, jaw, eyes, translation, scale;
    unbatched (n,) or batch 1). Returns (MeshRender, FlameOutput).
    """
    import torch

    from avat3r_core.synthetic.mesh_raster import shade_mesh

    offs = torch.as_tensor(hair_offsets(model, appearance), dtype=layer.v_template.dtype)[None]
    batched = {k: (torch.as_tensor(v, dtype=layer.v_template.dtype).reshape(1, -1) if v is not None else None)
               for k, v in params.items()}
    with torch.no_grad():
        out = layer(offsets=offs, **batched)
    verts = out.vertices[0].double().numpy()
    labels = np.asarray(_extras(model)["vertex_labels"])
    hm = hair_mask(model, appearance)
    skin_m = ((labels == LABELS["skin"]) | (labels == LABELS["scalp"]) | (labels == LABELS["ear"]) |
              (labels == LABELS["neck"])) * (1 - hm)
    canon = np.concatenate([layer.v_template.double().numpy(), hm[:, None], skin_m[:, None]], 1)
    eyes = ((labels == LABELS["eye_left"]) | (labels == LABELS["eye_right"])).astype(np.float64)
    render = shade_mesh(verts, layer.faces.numpy(), world_to_cam, K, width, height,
                        vertex_albedo(model, appearance), canonical=canon, detail=appearance.detail,
                        supersample=supersample, background=background, unlit=0.4 * eyes)
    return render, out
