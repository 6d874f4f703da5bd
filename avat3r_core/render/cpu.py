"""CPU tile rasterizer: numba kernels wrapped in a ``torch.autograd.Function``.

Pipeline (all numba, ``parallel=True, cache=True``, compiled lazily on first use):

1. ``_bin_tiles``: per (camera, Gaussian) tile rectangle exactly as gsplat's ``isect_tiles``
   (``floor/ceil((mean ± radius) / tile_size)`` clamped to the grid), counts per (camera, tile),
   exclusive prefix sum -> ``offsets``, then a counting-sort fill that walks each camera's
   Gaussians in depth order (stable ``argsort``), so the entries of every tile come out sorted
   front to back with ties broken by Gaussian index (gsplat's stable radix sort does the same).
2. ``_raster_fwd``: parallel over (camera, tile); gathers the tile's Gaussians into contiguous
   local arrays and composites each pixel front to back with gsplat's rules. Records per pixel the
   final transmittance and the (tile-local) count of entries up to the last one used.
3. ``_raster_bwd``: parallel over (camera, tile); walks each pixel back to front, recovering T by
   dividing by ``1 - alpha`` as gsplat's backward does, and accumulates per-entry gradients in
   tile-local buffers (race free: one entry belongs to one tile).
4. ``_scatter``: parallel over cameras, sums per-entry gradients into per-(camera, Gaussian) ones.

Every kernel computes in float64 whatever the caller's dtype (inputs are converted once), so
there is a single compiled specialisation and float32 results are only rounded at the end.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
T_THRESHOLD = 1e-4
ALPHA_MAX = 0.999
# sigma beyond log(255 * o) + margin cannot give alpha >= 1/255: skip the exp there.
_SIGMA_MARGIN = 1e-3


@njit(parallel=True, cache=True, fastmath=False)
def _bin_tiles(means2d, radii, order, tile_size, tile_w, tile_h):
    n_cam = radii.shape[0]
    n_g = radii.shape[1]
    n_tiles = tile_w * tile_h
    rects = np.zeros((n_cam, n_g, 4), dtype=np.int32)
    counts = np.zeros(n_cam * n_tiles, dtype=np.int64)
    for c in prange(n_cam):
        base = c * n_tiles
        for n in range(n_g):
            rx = radii[c, n, 0]
            ry = radii[c, n, 1]
            if rx <= 0 or ry <= 0:
                continue
            tx = means2d[c, n, 0] / tile_size
            ty = means2d[c, n, 1] / tile_size
            trx = rx / tile_size
            try_ = ry / tile_size
            x0 = min(max(0.0, math.floor(tx - trx)), tile_w)
            y0 = min(max(0.0, math.floor(ty - try_)), tile_h)
            x1 = min(max(0.0, math.ceil(tx + trx)), tile_w)
            y1 = min(max(0.0, math.ceil(ty + try_)), tile_h)
            ix0, iy0, ix1, iy1 = int(x0), int(y0), int(x1), int(y1)
            rects[c, n, 0] = ix0
            rects[c, n, 1] = iy0
            rects[c, n, 2] = ix1
            rects[c, n, 3] = iy1
            for yy in range(iy0, iy1):
                for xx in range(ix0, ix1):
                    counts[base + yy * tile_w + xx] += 1
    offsets = np.zeros(n_cam * n_tiles + 1, dtype=np.int64)
    acc = 0
    for t in range(n_cam * n_tiles):
        offsets[t] = acc
        acc += counts[t]
    offsets[n_cam * n_tiles] = acc
    ids = np.empty(acc, dtype=np.int32)
    cursor = offsets[:-1].copy()
    for c in prange(n_cam):
        base = c * n_tiles
        for k in range(n_g):
            n = order[c, k]
            ix0 = rects[c, n, 0]
            iy0 = rects[c, n, 1]
            ix1 = rects[c, n, 2]
            iy1 = rects[c, n, 3]
            for yy in range(iy0, iy1):
                for xx in range(ix0, ix1):
                    t = base + yy * tile_w + xx
                    ids[cursor[t]] = n
                    cursor[t] += 1
    return offsets, ids


@njit(cache=True, fastmath=False)
def _gather(c, start, end, ids, means2d, conics, colors, opacities):
    n = end - start
    n_ch = colors.shape[2]
    gx = np.empty(n)
    gy = np.empty(n)
    ga = np.empty(n)
    gb = np.empty(n)
    gc = np.empty(n)
    go = np.empty(n)
    gthr = np.empty(n)
    gcol = np.empty((n, n_ch))
    for k in range(n):
        g = ids[start + k]
        gx[k] = means2d[c, g, 0]
        gy[k] = means2d[c, g, 1]
        ga[k] = conics[c, g, 0]
        gb[k] = conics[c, g, 1]
        gc[k] = conics[c, g, 2]
        o = opacities[c, g]
        go[k] = o
        gthr[k] = math.log(max(o, 1e-30) * 255.0) + _SIGMA_MARGIN
        for d in range(n_ch):
            gcol[k, d] = colors[c, g, d]
    return gx, gy, ga, gb, gc, go, gthr, gcol


@njit(cache=True, inline="always")
def _tile_of_job(job, n_tiles, tile_w, tile_size, width, height):
    """(camera, x0, y0, x1, y1) of the tile a parallel job covers (jobs run camera-major)."""
    c = job // n_tiles
    t = job - c * n_tiles
    ty0 = (t // tile_w) * tile_size
    tx0 = (t % tile_w) * tile_size
    return c, tx0, ty0, min(tx0 + tile_size, width), min(ty0 + tile_size, height)


@njit(parallel=True, cache=True, fastmath=False)
def _raster_fwd(means2d, conics, colors, opacities, backgrounds, offsets, ids,
                width, height, tile_size, tile_w, tile_h, out_color, out_t, out_last):
    n_cam = means2d.shape[0]
    n_ch = colors.shape[2]
    n_tiles = tile_w * tile_h
    for job in prange(n_cam * n_tiles):
        c, tx0, ty0, tx1, ty1 = _tile_of_job(job, n_tiles, tile_w, tile_size, width, height)
        start = offsets[job]
        end = offsets[job + 1]
        n = end - start
        gx, gy, ga, gb, gc, go, gthr, gcol = _gather(
            c, start, end, ids, means2d, conics, colors, opacities)
        pix = np.empty(n_ch)
        for py in range(ty0, ty1):
            fy = py + 0.5
            for px in range(tx0, tx1):
                fx = px + 0.5
                for d in range(n_ch):
                    pix[d] = 0.0
                T = 1.0
                last = 0
                for k in range(n):
                    dx = gx[k] - fx
                    dy = gy[k] - fy
                    sigma = 0.5 * (ga[k] * dx * dx + gc[k] * dy * dy) + gb[k] * dx * dy
                    if sigma < 0.0 or sigma > gthr[k]:
                        continue
                    alpha = min(ALPHA_MAX, go[k] * math.exp(-sigma))
                    if alpha < ALPHA_THRESHOLD:
                        continue
                    next_t = T * (1.0 - alpha)
                    if next_t <= T_THRESHOLD:
                        break
                    w = alpha * T
                    for d in range(n_ch):
                        pix[d] += gcol[k, d] * w
                    last = k + 1
                    T = next_t
                for d in range(n_ch):
                    out_color[c, py, px, d] = pix[d] + T * backgrounds[c, d]
                out_t[c, py, px] = T
                out_last[c, py, px] = last


@njit(parallel=True, cache=True, fastmath=False)
def _raster_bwd(means2d, conics, colors, opacities, backgrounds, offsets, ids,
                width, height, tile_size, tile_w, tile_h, out_t, out_last,
                v_color, v_alpha, e_xy, e_conic, e_col, e_op):
    n_cam = means2d.shape[0]
    n_ch = colors.shape[2]
    n_tiles = tile_w * tile_h
    for job in prange(n_cam * n_tiles):
        c, tx0, ty0, tx1, ty1 = _tile_of_job(job, n_tiles, tile_w, tile_size, width, height)
        start = offsets[job]
        end = offsets[job + 1]
        n = end - start
        if n == 0:
            continue
        gx, gy, ga, gb, gc, go, gthr, gcol = _gather(
            c, start, end, ids, means2d, conics, colors, opacities)
        lxy = np.zeros((n, 2))
        lcon = np.zeros((n, 3))
        lcol = np.zeros((n, n_ch))
        lop = np.zeros(n)
        buf = np.empty(n_ch)
        vc = np.empty(n_ch)
        for py in range(ty0, ty1):
            fy = py + 0.5
            for px in range(tx0, tx1):
                last = out_last[c, py, px]
                if last == 0:
                    continue
                fx = px + 0.5
                t_final = out_t[c, py, px]
                T = t_final
                bg_dot = 0.0
                for d in range(n_ch):
                    vc[d] = v_color[c, py, px, d]
                    bg_dot += backgrounds[c, d] * vc[d]
                    buf[d] = 0.0
                va = v_alpha[c, py, px]
                for k in range(last - 1, -1, -1):
                    dx = gx[k] - fx
                    dy = gy[k] - fy
                    sigma = 0.5 * (ga[k] * dx * dx + gc[k] * dy * dy) + gb[k] * dx * dy
                    if sigma < 0.0 or sigma > gthr[k]:
                        continue
                    vis = math.exp(-sigma)
                    o = go[k]
                    alpha = min(ALPHA_MAX, o * vis)
                    if alpha < ALPHA_THRESHOLD:
                        continue
                    ra = 1.0 / (1.0 - alpha)
                    T *= ra
                    fac = alpha * T
                    v_a = 0.0
                    for d in range(n_ch):
                        lcol[k, d] += fac * vc[d]
                        v_a += (gcol[k, d] * T - buf[d] * ra) * vc[d]
                    v_a += t_final * ra * va - t_final * ra * bg_dot
                    if o * vis <= ALPHA_MAX:
                        v_sigma = -o * vis * v_a
                        lcon[k, 0] += 0.5 * v_sigma * dx * dx
                        lcon[k, 1] += v_sigma * dx * dy
                        lcon[k, 2] += 0.5 * v_sigma * dy * dy
                        lxy[k, 0] += v_sigma * (ga[k] * dx + gb[k] * dy)
                        lxy[k, 1] += v_sigma * (gb[k] * dx + gc[k] * dy)
                        lop[k] += vis * v_a
                    for d in range(n_ch):
                        buf[d] += gcol[k, d] * fac
        for k in range(n):
            e = start + k
            e_xy[e, 0] = lxy[k, 0]
            e_xy[e, 1] = lxy[k, 1]
            e_conic[e, 0] = lcon[k, 0]
            e_conic[e, 1] = lcon[k, 1]
            e_conic[e, 2] = lcon[k, 2]
            e_op[e] = lop[k]
            for d in range(n_ch):
                e_col[e, d] = lcol[k, d]


@njit(parallel=True, cache=True, fastmath=False)
def _scatter(offsets, ids, n_tiles, e_xy, e_conic, e_col, e_op, g_xy, g_conic, g_col, g_op):
    n_cam = g_xy.shape[0]
    n_ch = e_col.shape[1]
    for c in prange(n_cam):
        for e in range(offsets[c * n_tiles], offsets[(c + 1) * n_tiles]):
            g = ids[e]
            g_xy[c, g, 0] += e_xy[e, 0]
            g_xy[c, g, 1] += e_xy[e, 1]
            g_conic[c, g, 0] += e_conic[e, 0]
            g_conic[c, g, 1] += e_conic[e, 1]
            g_conic[c, g, 2] += e_conic[e, 2]
            g_op[c, g] += e_op[e]
            for d in range(n_ch):
                g_col[c, g, d] += e_col[e, d]


def _np64(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float64).numpy())


def bin_tiles(means2d: Tensor, radii: Tensor, depths: Tensor, tile_size: int, tile_w: int, tile_h: int):
    """Sorted tile/Gaussian intersections: (offsets (C*T+1,) int64, ids (n_isects,) int32)."""
    with torch.no_grad():
        order = torch.argsort(depths.detach().to(torch.float64), dim=1, stable=True)
    return _bin_tiles(
        _np64(means2d),
        np.ascontiguousarray(radii.detach().cpu().numpy().astype(np.int32)),
        np.ascontiguousarray(order.cpu().numpy().astype(np.int64)),
        int(tile_size), int(tile_w), int(tile_h),
    )


class RasterizeTiles(torch.autograd.Function):
    """(means2d (C,N,2), conics (C,N,3), colors (C,N,D), opacities (C,N), backgrounds (C,D))
    -> (colors (C,H,W,D), alphas (C,H,W,1)); tile lists come precomputed from :func:`bin_tiles`."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, backgrounds, offsets, ids,
                width, height, tile_size):
        n_cam, _, n_ch = colors.shape
        tile_w = math.ceil(width / tile_size)
        tile_h = math.ceil(height / tile_size)
        m2, co, cl, op, bg = (_np64(t) for t in (means2d, conics, colors, opacities, backgrounds))
        out_color = np.empty((n_cam, height, width, n_ch))
        out_t = np.empty((n_cam, height, width))
        out_last = np.empty((n_cam, height, width), dtype=np.int32)
        _raster_fwd(m2, co, cl, op, bg, offsets, ids, width, height, tile_size, tile_w, tile_h,
                    out_color, out_t, out_last)
        ctx.arrays = (m2, co, cl, op, bg, offsets, ids, out_t, out_last)
        ctx.geom = (width, height, tile_size, tile_w, tile_h)
        ctx.dtypes = tuple(t.dtype for t in (means2d, conics, colors, opacities, backgrounds))
        ctx.mark_non_differentiable()
        dtype = colors.dtype
        rgb = torch.from_numpy(out_color).to(dtype)
        alpha = torch.from_numpy(1.0 - out_t).to(dtype).unsqueeze(-1)
        return rgb, alpha

    @staticmethod
    def backward(ctx, v_color, v_alpha):
        m2, co, cl, op, bg, offsets, ids, out_t, out_last = ctx.arrays
        width, height, tile_size, tile_w, tile_h = ctx.geom
        n_cam, n_g, n_ch = cl.shape
        n_e = ids.shape[0]
        if v_color is None:
            v_color = torch.zeros((n_cam, height, width, n_ch), dtype=torch.float64)
        if v_alpha is None:
            v_alpha = torch.zeros((n_cam, height, width, 1), dtype=torch.float64)
        vc = _np64(v_color)
        va = np.ascontiguousarray(_np64(v_alpha)[..., 0])
        e_xy = np.empty((n_e, 2))
        e_conic = np.empty((n_e, 3))
        e_col = np.empty((n_e, n_ch))
        e_op = np.empty(n_e)
        _raster_bwd(m2, co, cl, op, bg, offsets, ids, width, height, tile_size, tile_w, tile_h,
                    out_t, out_last, vc, va, e_xy, e_conic, e_col, e_op)
        g_xy = np.zeros((n_cam, n_g, 2))
        g_conic = np.zeros((n_cam, n_g, 3))
        g_col = np.zeros((n_cam, n_g, n_ch))
        g_op = np.zeros((n_cam, n_g))
        _scatter(offsets, ids, tile_w * tile_h, e_xy, e_conic, e_col, e_op,
                 g_xy, g_conic, g_col, g_op)
        g_bg = (vc * out_t[..., None]).sum(axis=(1, 2))
        dts = ctx.dtypes
        return (
            torch.from_numpy(g_xy).to(dts[0]),
            torch.from_numpy(g_conic).to(dts[1]),
            torch.from_numpy(g_col).to(dts[2]),
            torch.from_numpy(g_op).to(dts[3]),
            torch.from_numpy(g_bg).to(dts[4]),
            None, None, None, None, None,
        )


def rasterize_projected(means2d: Tensor, conics: Tensor, depths: Tensor, radii: Tensor,
                        colors: Tensor, opacities: Tensor, backgrounds: Tensor,
                        width: int, height: int, tile_size: int = 16) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians. colors (C,N,D), opacities (C,N), backgrounds (C,D)."""
    tile_w = math.ceil(width / tile_size)
    tile_h = math.ceil(height / tile_size)
    offsets, ids = bin_tiles(means2d, radii, depths, tile_size, tile_w, tile_h)
    return RasterizeTiles.apply(means2d, conics, colors, opacities, backgrounds, offsets, ids,
                                int(width), int(height), int(tile_size))
