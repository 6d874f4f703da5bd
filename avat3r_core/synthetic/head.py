"""A procedural morphable head saved in FLAME's file layout.

The project runs end to end without the licence-gated FLAME file: :func:`build_head_model` makes a
head with FLAME's keys (``v_template``, ``f``, ``shapedirs`` (V, 3, 400) = 300 identity + 100
expression components, ``posedirs`` (V, 3, 36), sparse ``J_regressor`` (5, V), ``weights`` (V, 5),
``kintree_table`` with the root parent stored as 4294967295, ``J``), so
:func:`avat3r_core.flame.load_flame_model` and :class:`~avat3r_core.flame.FlameLayer` run on it
unchanged.

Units and axes as FLAME: metres, y up, z forward (out of the face), x towards the subject's left.
The head is centred near the origin (top of the skull y ~ +0.12, chin y ~ -0.11, nose tip z ~ 0.11),
the neck runs down to y = -0.20.

Parts: a skull/face shell (a radially parametrised super-ellipsoid, densest over the face, with
anatomical bumps and dents: brow ridge, eye sockets with almond lid openings, nose with alae,
cheekbones, cheeks, lips with a slit between them, chin, narrowing jaw), two eyeball spheres
(skinned to the eye joints, iris at their +z pole), a dark mouth cavity with tooth bands behind the
lips (upper half on the head, lower half on the jaw), two ears and a neck cylinder.

Extra keys (kept in :attr:`FlameModel.extras`): ``vertex_labels`` (V,) (see :data:`LABELS`),
``region_masks`` (V, R) soft masks named by ``region_names`` (R,), ``hair_dir`` (V, 3) the outward
direction for hair volume, and the 68-point landmark embedding ``lmk_face_idx``/``lmk_b_coords``.

Identity components (first 300; :data:`IDENTITY_NAMES`, 1 unit = 1 sigma) and expression
components (last 100; :data:`EXPRESSION_NAMES`, 1 unit = a clear, moderate change; blinks close the
eye fully at +2) are linear blendshapes; the rest are zero.

A subject's look (colours, hair, surface detail) and the shaded render are in
:mod:`avat3r_core.synthetic.appearance`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.optimize import nnls

from avat3r_core.flame import write_flame_model, write_landmark_embedding

__all__ = [
    "LABELS", "IDENTITY_NAMES", "EXPRESSION_NAMES", "REGION_NAMES", "build_head_model", "write_head_model",
    "sample_identity", "smoothstep", "N_SHAPE", "N_EXPR",
]

N_SHAPE, N_EXPR = 300, 100
LABELS = {"skin": 0, "scalp": 1, "eye_left": 2, "eye_right": 3, "mouth": 4, "ear": 5, "neck": 6}
IDENTITY_NAMES = (
    "head_width", "head_length", "head_height", "nose_size", "nose_length", "jaw_width", "cheek_fullness",
    "eye_spacing", "lip_thickness", "ear_size", "forehead_slope", "chin_protrusion", "brow_ridge",
    "nose_width", "face_depth", "cheekbones",
)
EXPRESSION_NAMES = (
    "jaw_open_corrective", "smile", "frown", "brow_raise", "brow_furrow", "blink_left", "blink_right",
    "squint", "pucker", "cheek_puff", "lip_press", "mouth_left", "mouth_right", "nose_wrinkle",
    "upper_lip_raise", "lower_lip_depress",
)
REGION_NAMES = ("hair_coord", "brow", "lips", "lip_line", "lid_line", "sclera", "iris", "pupil", "mouth",
                "teeth", "ear_inner", "cheek", "beard")

# layout constants (metres)
MOUTH_Y = -0.052
EYE_Y = 0.018
EYE_X = 0.032
EYE_R = 0.0125
ALMOND_HW, ALMOND_HH = 0.0135, 0.0056
DENT = 0.009
MOUTH_HW = 0.024
NECK_C = (0.0, -0.012)  # (x, z) of the neck axis
JOINTS = {"global": (0.0, -0.15, -0.012), "neck": (0.0, -0.075, -0.012), "jaw": (0.0, -0.018, 0.0)}


def smoothstep(e0, e1, x):
    """Smoothstep from e0 (0) to e1 (1); e0 > e1 allowed."""
    t = np.clip((np.asarray(x, dtype=np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _density_grid(n, lo, hi, centre, sigma, boost, periodic=False):
    """n samples in [lo, hi) (periodic) or (lo, hi) with density (1 + boost * gauss)."""
    s = np.linspace(lo, hi, 4001)
    rho = 1 + boost * np.exp(-0.5 * ((s - centre) / sigma) ** 2)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (rho[1:] + rho[:-1]) * np.diff(s))])
    cdf /= cdf[-1]
    q = (np.arange(n) / n) if periodic else (np.arange(1, n + 1) / (n + 1))
    return np.interp(q, cdf, s)


def _uv_sphere(rows, cols):
    """Unit sphere with poles on +-z: vertices (2 + rows*cols, 3), faces, polar angle per vertex."""
    th = np.linspace(0, np.pi, rows + 2)[1:-1]
    ph = np.linspace(0, 2 * np.pi, cols, endpoint=False)
    T, P = np.meshgrid(th, ph, indexing="ij")
    v = np.stack([np.sin(T) * np.cos(P), np.sin(T) * np.sin(P), np.cos(T)], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 0, 1.0]], v, [[0, 0, -1.0]]])
    faces = _grid_faces(rows, cols, offset=1, top=0, bottom=1 + rows * cols)
    return v, faces


def _grid_faces(rows, cols, offset, top=None, bottom=None, periodic=True, idx=None):
    if idx is None:
        idx = offset + np.arange(rows * cols).reshape(rows, cols)
    faces = []
    cmax = cols if periodic else cols - 1
    for i in range(rows - 1):
        for j in range(cmax):
            a, b = idx[i, j], idx[i, (j + 1) % cols]
            c, d = idx[i + 1, j], idx[i + 1, (j + 1) % cols]
            faces += [(a, c, b), (b, c, d)]
    if top is not None:
        for j in range(cols):
            faces.append((top, idx[0, j], idx[0, (j + 1) % cols]))
    if bottom is not None:
        for j in range(cols):
            faces.append((bottom, idx[-1, (j + 1) % cols], idx[-1, j]))
    return np.asarray(faces, dtype=np.int64)


class _HeadBuilder:
    """Fixed topology; :meth:`geometry` maps (identity, expression) parameters to vertices."""

    SH_ROWS, SH_COLS = 58, 84

    # Long (~90 lines): builds the procedural head's fixed topology part by part (shell with its
    # mouth slit, eyeballs, mouth cavity, ears); each part needs the vertex offsets of those before.
    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        # small per-seed jitter of the template's proportions (seed 0 is jittered too, deterministically)
        self.jitter = rng.normal(0, 0.15, len(IDENTITY_NAMES))
        R, C = self.SH_ROWS, self.SH_COLS
        theta = _density_grid(R, 0.0, np.pi, 1.85, 0.55, 2.2)
        phi = _density_grid(C, -np.pi, np.pi, 0.0, 0.8, 2.6, periodic=True)
        T, P = np.meshgrid(theta, phi, indexing="ij")
        dirs = np.stack([np.sin(T) * np.sin(P), np.cos(T), np.sin(T) * np.cos(P)], -1).reshape(-1, 3)
        self.dirs = np.concatenate([[[0, 1.0, 0]], dirs, [[0, -1.0, 0]]])  # top pole, grid, bottom pole
        grid = 1 + np.arange(R * C).reshape(R, C)
        n_shell = 2 + R * C
        # anchors: the default shell without features (front-face coordinates for feature placement)
        base = self._shell_base(np.zeros(len(IDENTITY_NAMES)), self.dirs)
        # mouth slit: duplicate the vertices of the row nearest MOUTH_Y at the front (lower copies)
        front_col = int(np.argmin(np.abs(phi)))
        row_y = base[grid[:, front_col], 1]
        self.slit_row = int(np.argmin(np.abs(row_y - MOUTH_Y)))
        slit_cols = [j for j in range(C) if abs(base[grid[self.slit_row, j], 0]) < MOUTH_HW
                     and base[grid[self.slit_row, j], 2] > 0]
        self.slit_upper = grid[self.slit_row, slit_cols]
        self.slit_lower = n_shell + np.arange(len(slit_cols))
        idx_lower = grid.copy()
        idx_lower[self.slit_row, slit_cols] = self.slit_lower
        faces = []
        for i in range(R - 1):
            for j in range(C):
                src = idx_lower if i == self.slit_row else grid  # faces below the slit row use lower copies
                a, b = src[i, j], src[i, (j + 1) % C]
                c, d = grid[i + 1, j], grid[i + 1, (j + 1) % C]
                faces += [(a, c, b), (b, c, d)]
        for j in range(C):
            faces.append((0, grid[0, (j + 1) % C], grid[0, j]))
            faces.append((n_shell - 1, grid[-1, j], grid[-1, (j + 1) % C]))
        faces = np.asarray(faces, dtype=np.int64)
        # orientation: make shell normals point outwards
        self.n_shell = n_shell
        self.shell_src = np.concatenate([np.arange(n_shell), self.slit_upper])  # vertex -> shell direction
        faces = self._orient_out(base[self.shell_src], faces, n_shell)
        n_sh_total = n_shell + len(slit_cols)
        self.anchor = base[self.shell_src]  # (n_sh_total, 3)
        self.is_lower = np.zeros(n_sh_total, bool)
        self.is_lower[self.slit_lower] = True
        self.is_upper = np.zeros(n_sh_total, bool)
        self.is_upper[self.slit_upper] = True
        parts = [faces]
        offset = n_sh_total
        # eyeballs (poles on +-z, iris at +z)
        self.eye_unit, eye_f = _uv_sphere(12, 20)
        self.eye_l = offset + np.arange(len(self.eye_unit))
        parts.append(eye_f + offset)
        offset += len(self.eye_unit)
        self.eye_r = offset + np.arange(len(self.eye_unit))
        parts.append(eye_f + offset)
        offset += len(self.eye_unit)
        # mouth cavity
        self.cav_unit, cav_f = _uv_sphere(10, 18)
        self.cav = offset + np.arange(len(self.cav_unit))
        parts.append(cav_f + offset)
        offset += len(self.cav_unit)
        # ears: flattened spheres (local frame: x = thickness, y = up, z = along the head)
        ear_unit, ear_f = _uv_sphere(8, 16)
        self.ear_unit = ear_unit[:, [2, 0, 1]]  # poles along local x (the ear's normal)
        ear_f = ear_f  # orientation preserved by a cyclic axis permutation
        self.ear_l = offset + np.arange(len(ear_unit))
        parts.append(ear_f + offset)
        offset += len(ear_unit)
        self.ear_r = offset + np.arange(len(ear_unit))
        parts.append(ear_f[:, [0, 2, 1]] + offset)  # mirrored -> flip winding
        offset += len(ear_unit)
        # neck: open elliptic cylinder, rows at fixed heights (two of them hold the root/neck joints)
        ys = np.unique(np.concatenate([np.linspace(-0.205, -0.03, 14), [JOINTS["global"][1], JOINTS["neck"][1]]]))
        self.neck_ys = ys
        self.neck_cols = 28
        self.neck = offset + np.arange(len(ys) * self.neck_cols)
        nidx = self.neck.reshape(len(ys), self.neck_cols)
        parts.append(_grid_faces(len(ys), self.neck_cols, 0, idx=nidx[::-1]))
        offset += len(self.neck)
        self.n_vertices = offset
        self.faces = np.concatenate(parts)
        # nearest default-shell vertices used to place eyes and ears (fixed weights -> smooth in params)
        self.eye_probe = {}
        for side, sx in (("l", 1.0), ("r", -1.0)):
            d2 = (self.anchor[:n_shell, 0] - sx * EYE_X) ** 2 + (self.anchor[:n_shell, 1] - EYE_Y) ** 2
            d2 = np.where(self.anchor[:n_shell, 2] > 0, d2, np.inf)
            near = np.argsort(d2)[:6]
            self.eye_probe[side] = near
        self.ear_probe = {}
        for side, sx in (("l", 1.0), ("r", -1.0)):
            d = self.dirs[:n_shell]
            score = d @ (np.array([sx, 0.02, -0.12]) / np.linalg.norm([sx, 0.02, -0.12]))
            self.ear_probe[side] = np.argsort(-score)[:4]

    # ------------------------------------------------------------------ shell
    def _shell_base(self, idp, dirs):
        """Feature-free super-ellipsoid along unit directions ``dirs``."""
        dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
        hw = 0.074 + 0.004 * idp[0]
        jaw_narrow = 0.27 - 0.04 * idp[5]
        ax = hw * (1 - jaw_narrow * smoothstep(-0.05, -0.85, dy)) * (1 - 0.06 * smoothstep(0.3, 1.0, dy))
        ay_top = 0.120 + 0.005 * idp[2]
        ay_bot = 0.075 + 0.040 * smoothstep(-0.4, 0.5, dz)
        ay = np.where(dy > 0, ay_top, ay_bot)
        az_front = (0.090 + 0.004 * idp[14]) * (1 - (0.07 + 0.03 * idp[10]) * smoothstep(0.35, 0.95, dy))
        az_back = 0.103 + 0.005 * idp[1]
        az = np.where(dz > 0, az_front, az_back)
        n = 2.3 + 1.6 * smoothstep(0.1, 0.6, dz) * smoothstep(0.0, -0.5, dy) + 0.5 * smoothstep(0.3, 0.8, dz) * smoothstep(0.5, 0.0, np.abs(dy))
        r = (np.abs(dx / ax) ** n + np.abs(dy / ay) ** n + np.abs(dz / az) ** n) ** (-1.0 / n)
        return dirs * r[:, None]

    @staticmethod
    def _orient_out(base, faces, n):
        c = base[faces].mean(1)
        nrm = np.cross(base[faces[:, 1]] - base[faces[:, 0]], base[faces[:, 2]] - base[faces[:, 0]])
        flip = (nrm * c).sum(1) < 0
        faces = faces.copy()
        faces[flip] = faces[flip][:, [0, 2, 1]]
        return faces

    def _almond(self, x, y, ex):
        """Soft mask of the eye opening around (ex, EYE_Y) and its (a, b) coordinates."""
        a = (x - ex) / ALMOND_HW
        side = np.sign(ex)
        tilt = 0.08 * side * (x - ex) / ALMOND_HW  # outer corner slightly up
        hh = ALMOND_HH * np.sqrt(np.clip(1 - a * a, 0.0, 1.0)) + 1e-4
        b = (y - EYE_Y - tilt * ALMOND_HH) / hh
        rad = np.maximum(np.abs(a), np.abs(b))
        return smoothstep(1.12, 0.82, rad) * (np.abs(a) < 1.15), a, b

    def shell_fields(self, idp):
        """Per shell vertex: (displacement along the direction, lateral/vertical extras)."""
        A = self.anchor
        x, y, z = A[:, 0], A[:, 1], A[:, 2]
        front = smoothstep(0.0, 0.05, z)
        disp = np.zeros(len(A))
        # nose
        bridge, tip = 0.026, -0.016 - 0.003 * idp[4]
        t = np.clip((bridge - y) / (bridge - tip), 0, 1)
        h = 0.003 + (0.019 + 0.003 * idp[3]) * t ** 1.35
        h = np.where(y < tip, (0.003 + 0.019 + 0.003 * idp[3]) * np.exp(-((y - tip) / 0.0075) ** 2), h)
        h = np.where(y > bridge, 0.003 * np.exp(-((y - bridge) / 0.01) ** 2), h)
        w = (0.0055 + 0.0065 * t) * (1 + 0.12 * idp[13])
        disp += h * np.exp(-0.5 * (x / w) ** 2)
        for sx in (1, -1):  # alae
            disp += 0.0065 * (1 + 0.12 * idp[13]) * _gauss(x, y, sx * 0.0145 * (1 + 0.12 * idp[13]), -0.021, 0.0055, 0.0055)
        # eye sockets (broad) and almond openings (deep)
        ex = EYE_X + 0.002 * idp[7]
        for sx in (1, -1):
            disp -= 0.0055 * _gauss(x, y, sx * ex, EYE_Y + 0.002, 0.019, 0.012)
            m, a, b = self._almond(x, y, sx * ex)
            disp -= DENT * m
            # lid fold above the eye, bag below
            disp += 0.0012 * _gauss(x, y, sx * ex, EYE_Y + 0.0085, 0.012, 0.0025)
            disp += 0.0010 * _gauss(x, y, sx * ex, EYE_Y - 0.0085, 0.012, 0.0025)
            # cheekbones, cheeks
            disp += (0.0055 + 0.002 * idp[15]) * _gauss(x, y, sx * 0.048, -0.004, 0.016, 0.012)
            disp += (0.0045 + 0.003 * idp[6]) * _gauss(x, y, sx * 0.044, -0.034, 0.018, 0.018)
            # temples
            disp -= 0.003 * _gauss(x, y, sx * 0.062, 0.04, 0.012, 0.018)
        # brow ridge
        disp += (0.0055 + 0.002 * idp[12]) * np.exp(-0.5 * ((y - 0.038) / 0.008) ** 2) * np.exp(
            -0.5 * ((np.abs(x) - 0.026) / 0.024) ** 2)
        # muzzle, lips, philtrum, mentolabial sulcus, chin
        disp += 0.007 * _gauss(x, y, 0.0, MOUTH_Y + 0.002, 0.03, 0.022)
        lipw = smoothstep(MOUTH_HW + 0.004, MOUTH_HW - 0.006, np.abs(x)) * np.sqrt(np.clip(1 - (x / (MOUTH_HW + 0.004)) ** 2, 0, 1))
        disp += (0.0042 + 0.0012 * idp[8]) * lipw * np.exp(-0.5 * ((y - MOUTH_Y - 0.0045) / 0.0035) ** 2)
        disp += (0.0050 + 0.0013 * idp[8]) * lipw * np.exp(-0.5 * ((y - MOUTH_Y + 0.006) / 0.0042) ** 2)
        disp -= 0.0012 * _gauss(x, y, 0.0, MOUTH_Y + 0.013, 0.003, 0.004)
        disp -= 0.0035 * _gauss(x, y, 0.0, MOUTH_Y - 0.018, 0.014, 0.004)
        disp += (0.0085 + 0.003 * idp[11]) * _gauss(x, y, 0.0, -0.094, 0.017, 0.012)
        disp *= front
        return disp

    def expression_fields(self, idp):
        """(n_shell_total, 3, 16) displacement of each expression at coefficient 1 (shell only)."""
        A = self.anchor
        x, y, z = A[:, 0], A[:, 1], A[:, 2]
        front = smoothstep(0.0, 0.05, z)
        d = self.dirs[self.shell_src]
        E = np.zeros((len(A), 3, len(EXPRESSION_NAMES)))
        lower = self.is_lower | ((y < MOUTH_Y - 1e-4) & ~self.is_upper)
        upper = ~lower
        mouth = _gauss(x, y, 0, MOUTH_Y, 0.028, 0.016) * front
        lip_lo = mouth * lower * np.exp(-0.5 * ((y - MOUTH_Y + 0.004) / 0.008) ** 2)
        lip_up = mouth * upper * np.exp(-0.5 * ((y - MOUTH_Y - 0.004) / 0.008) ** 2)
        ex = EYE_X + 0.002 * idp[7]
        # 0 jaw-open corrective: lower lip and chin drop a little, lips part
        E[:, 1, 0] = -0.0035 * lip_lo - 0.0015 * _gauss(x, y, 0, -0.09, 0.03, 0.03) * front
        E[:, 2, 0] = -0.0015 * lip_lo
        for k, sgn in ((1, 1.0), (2, -1.0)):  # smile / frown: mouth corners
            for sx in (1, -1):
                c = _gauss(x, y, sx * MOUTH_HW, MOUTH_Y, 0.011, 0.009) * front
                E[:, 0, k] += sx * 0.003 * c * (sgn > 0)
                E[:, 1, k] += sgn * 0.0045 * c
                E[:, 2, k] += -0.002 * c
                if sgn > 0:
                    ck = _gauss(x, y, sx * 0.036, -0.018, 0.016, 0.013) * front
                    E[:, 1, k] += 0.0025 * ck
                    E[:, 2, k] += 0.002 * ck
        brow_band = np.exp(-0.5 * ((y - 0.04) / 0.014) ** 2) * smoothstep(0.026, 0.034, y) * front
        E[:, 1, 3] = 0.0045 * brow_band * np.exp(-0.5 * (x / 0.05) ** 2)
        for sx in (1, -1):
            inner = _gauss(x, y, sx * 0.016, 0.036, 0.011, 0.009) * front
            E[:, 0, 4] += -sx * 0.0025 * inner
            E[:, 1, 4] += -0.0035 * inner
            E[:, 2, 4] += 0.001 * inner
        for k, sx in ((5, 1.0), (6, -1.0)):  # blink: the lid fills the almond opening (closed at +2)
            m, a, b = self._almond(x, y, sx * ex)
            m = smoothstep(1.25, 0.95, np.maximum(np.abs(a), np.abs(b)))
            E[:, :, k] = 0.5 * (DENT + 0.0016) * (m * front)[:, None] * d
        for sx in (1, -1):  # squint: lower lid rises, cheeks push up
            m, a, b = self._almond(x, y, sx * ex)
            m = smoothstep(1.25, 0.95, np.maximum(np.abs(a), np.abs(b))) * smoothstep(0.3, -0.4, b)
            E[:, :, 7] += 0.45 * DENT * (m * front)[:, None] * d
            E[:, 1, 7] += 0.002 * _gauss(x, y, sx * ex, EYE_Y - 0.014, 0.014, 0.007) * front
        E[:, 2, 8] = 0.006 * mouth  # pucker
        E[:, 0, 8] = -0.25 * x * mouth
        for sx in (1, -1):
            puff = _gauss(x, y, sx * 0.045, -0.035, 0.017, 0.017) * front
            E[:, :, 9] += 0.0065 * puff[:, None] * d
        E[:, 1, 10] = -0.0016 * lip_up + 0.0016 * lip_lo  # lip press
        E[:, 2, 10] = -0.0022 * (lip_up + lip_lo)
        E[:, 0, 11] = 0.0045 * mouth
        E[:, 0, 12] = -0.0045 * mouth
        for sx in (1, -1):
            nw = _gauss(x, y, sx * 0.011, 0.002, 0.007, 0.009) * front
            E[:, 1, 13] += 0.0028 * nw
            E[:, 2, 13] += 0.001 * nw
        E[:, 1, 13] += 0.001 * lip_up
        E[:, 1, 14] = 0.0035 * lip_up
        E[:, 2, 14] = 0.001 * lip_up
        E[:, 1, 15] = -0.0035 * lip_lo
        E[:, 2, 15] = 0.0008 * lip_lo
        return E

    def geometry(self, idp, expr=None):
        """All vertices for identity parameters ``idp`` (sigma units) and expression coefficients."""
        idp = np.asarray(idp, dtype=np.float64) + self.jitter
        shell_base = self._shell_base(idp, self.dirs)[self.shell_src]
        shell = shell_base + (self.shell_fields(idp))[:, None] * self.dirs[self.shell_src]
        if expr is not None:
            shell = shell + self.expression_fields(idp) @ np.asarray(expr, dtype=np.float64)
        V = np.zeros((self.n_vertices, 3))
        V[: len(shell)] = shell
        # eyeballs: behind the rim surface of their socket
        ex = EYE_X + 0.002 * idp[7]
        for side, sx, ids in (("l", 1.0, self.eye_l), ("r", -1.0, self.eye_r)):
            rim = shell_base[self.eye_probe[side]].mean(0)
            centre = np.array([sx * ex, EYE_Y, rim[2] - EYE_R + 0.0008])
            V[ids] = centre + EYE_R * self.eye_unit
        # mouth cavity behind the lips
        lip_z = shell[self.slit_upper].max(0)[2] if len(self.slit_upper) else 0.09
        cav_c = np.array([0.0, MOUTH_Y - 0.004, lip_z - 0.024])
        V[self.cav] = cav_c + self.cav_unit * np.array([0.029, 0.015, 0.019])
        # ears
        size = 1 + 0.08 * idp[9]
        for side, sx, ids in (("l", 1.0, self.ear_l), ("r", -1.0, self.ear_r)):
            side_pt = shell_base[self.ear_probe[side]].mean(0)
            u = self.ear_unit.copy()
            local = u * np.array([0.0045, 0.031 * size, 0.018 * size])
            # concha: the outer face is cupped
            outer = u[:, 0] > 0
            cup = 0.004 * np.exp(-0.5 * ((u[:, 1] / 0.55) ** 2 + ((u[:, 2] + 0.1) / 0.6) ** 2))
            local[outer, 0] -= cup[outer]
            local[:, 0] += 0.002 * (1 - u[:, 1] ** 2 - u[:, 2] ** 2)  # thicker near the middle
            ang = np.deg2rad(22.0)  # back edge sticks out
            rot = np.array([[np.cos(ang), 0, -np.sin(ang)], [0, 1, 0], [np.sin(ang), 0, np.cos(ang)]])
            p = local @ rot.T
            p[:, 0] *= sx
            V[ids] = p + np.array([side_pt[0] + sx * 0.002, 0.004, side_pt[2] - 0.004])
        # neck
        ang = np.linspace(0, 2 * np.pi, self.neck_cols, endpoint=False)
        Y = np.repeat(self.neck_ys, self.neck_cols)
        A = np.tile(ang, len(self.neck_ys))
        flare = 1 + 0.35 * smoothstep(-0.16, -0.205, Y)  # towards the shoulders
        V[self.neck] = np.stack([NECK_C[0] + 0.051 * flare * np.sin(A), Y,
                                 NECK_C[1] + 0.049 * flare * np.cos(A)], -1)
        return V

    def expression_full(self, idp):
        """(V, 3, 16) expression blendshapes on all vertices (the cavity follows the lips)."""
        E = np.zeros((self.n_vertices, 3, len(EXPRESSION_NAMES)))
        Es = self.expression_fields(np.asarray(idp) + self.jitter)
        E[: len(Es)] = Es
        cav = self.geometry(np.zeros(len(IDENTITY_NAMES)))[self.cav]
        cy = MOUTH_Y - 0.004
        low = smoothstep(cy + 0.003, cy - 0.006, cav[:, 1])
        lip_lo = Es[self.slit_lower].mean(0)
        lip_up = Es[self.slit_upper].mean(0)
        # the cavity's front follows the average lip motion, so it never pokes out
        frontness = smoothstep(-0.3, 0.6, self.cav_unit[:, 2])
        E[self.cav] = frontness[:, None, None] * (low[:, None, None] * lip_lo + (1 - low)[:, None, None] * lip_up)
        E[self.cav, 2, :] = np.minimum(E[self.cav, 2, :], 0.0)
        return E


def _nnls_regressor(points: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 with sum w_i p_i = target (target inside the hull)."""
    A = np.vstack([points.T, 100.0 * np.ones(len(points))])
    b = np.concatenate([target, [100.0]])
    w, _ = nnls(A, b)
    return w


def _skinning(builder: _HeadBuilder, V: np.ndarray) -> np.ndarray:
    W = np.zeros((builder.n_vertices, 5))
    n_sh = len(builder.anchor)
    A = builder.anchor
    y, z = A[:, 1], A[:, 2]
    jaw = smoothstep(MOUTH_Y + 0.001, MOUTH_Y - 0.012, y) * smoothstep(-0.035, 0.02, z)
    jaw = np.where(builder.is_upper, 0.0, jaw)
    low = builder.slit_lower
    jaw[low] = 1 - 0.55 * (np.abs(A[low, 0]) / MOUTH_HW) ** 4
    # below the jaw line towards the throat/back of the skull the head stays rigid
    jaw *= 1 - smoothstep(-0.01, -0.06, z - 0.55 * (y + 0.06))
    W[:n_sh, 2] = jaw
    W[:n_sh, 1] = 1 - jaw
    W[builder.eye_l, 3] = 1.0
    W[builder.eye_r, 4] = 1.0
    cav = V[builder.cav]
    cy = MOUTH_Y - 0.004
    cj = smoothstep(cy + 0.003, cy - 0.006, cav[:, 1])
    W[builder.cav, 2] = cj
    W[builder.cav, 1] = 1 - cj
    W[builder.ear_l, 1] = W[builder.ear_r, 1] = 1.0
    ny = V[builder.neck, 1]
    wn = smoothstep(JOINTS["global"][1] - 0.01, JOINTS["neck"][1] + 0.01, ny)
    W[builder.neck, 1] = wn
    W[builder.neck, 0] = 1 - wn
    return W


def _joint_regressor(builder: _HeadBuilder, V: np.ndarray) -> sp.csc_matrix:
    n = builder.n_vertices
    rows = []
    nidx = builder.neck.reshape(len(builder.neck_ys), builder.neck_cols)
    for name in ("global", "neck"):
        r = int(np.argmin(np.abs(builder.neck_ys - JOINTS[name][1])))
        row = np.zeros(n)
        row[nidx[r]] = 1.0 / builder.neck_cols
        rows.append(row)
    # jaw: NNLS over shell vertices in two bands around the hinge height
    y = builder.anchor[:, 1]
    cand = np.nonzero(np.abs(y - JOINTS["jaw"][1]) < 0.02)[0]
    w = _nnls_regressor(V[cand], np.array(JOINTS["jaw"]))
    row = np.zeros(n)
    row[cand] = w
    rows.append(row)
    for ids in (builder.eye_l, builder.eye_r):
        row = np.zeros(n)
        row[ids] = 1.0 / len(ids)
        rows.append(row)
    M = np.stack(rows)
    M[np.abs(M) < 1e-12] = 0
    return sp.csc_matrix(M)


# --------------------------------------------------------------------------- landmarks
def _ibug68_targets() -> np.ndarray:
    """68 target points (x, y) in the iBUG order; index 0 is on the subject's right (-x)."""
    pts = []
    for a in np.linspace(0, np.pi, 17):  # jaw line, subject's right ear -> chin -> left ear
        pts.append((-0.061 * np.cos(a), 0.010 - 0.112 * np.sin(a) ** 0.85))
    for sx, order in ((-1, range(5)), (1, range(5))):  # brows: right (17-21) outer->inner, left inner->outer
        xs = np.linspace(0.052, 0.013, 5)
        ys = 0.034 + 0.0065 * np.sin(np.linspace(0.2, 2.9, 5))
        seq = [(sx * xs[i], ys[i]) for i in order]
        pts += seq if sx < 0 else seq[::-1]
    for yy in (0.022, 0.010, -0.002, -0.013):  # nose bridge
        pts.append((0.0, yy))
    for xx in (-0.011, -0.0055, 0.0, 0.0055, 0.011):  # nostril base
        pts.append((xx, -0.0225 + 0.0025 * (xx == 0.0)))

    def eye(sx):
        ex, hw, hh = sx * EYE_X, ALMOND_HW * 0.97, ALMOND_HH * 0.9
        ring = []
        for a in (-1.0, -0.35, 0.35, 1.0):  # corner, upper, upper, corner (image left -> right)
            ring.append((ex + a * hw, EYE_Y + (hh * np.sqrt(1 - a * a) if abs(a) < 1 else 0.0)))
        for a in (0.35, -0.35):  # lower lid, right -> left
            ring.append((ex + a * hw, EYE_Y - hh * np.sqrt(1 - a * a)))
        return ring

    pts += eye(-1) + eye(1)
    mw = MOUTH_HW
    outer_up = [(-mw, MOUTH_Y)] + [(xx, MOUTH_Y + 0.0085 - (0.0015 if abs(xx) < 0.002 else 0)) for xx in
                                   (-0.016, -0.007, 0.0, 0.007, 0.016)] + [(mw, MOUTH_Y)]
    outer_lo = [(xx, MOUTH_Y - 0.0115) for xx in (0.016, 0.007, 0.0, -0.007, -0.016)]
    inner = [(-0.020, MOUTH_Y + 0.0006), (-0.008, MOUTH_Y + 0.0006), (0.0, MOUTH_Y + 0.0006),
             (0.008, MOUTH_Y + 0.0006), (0.020, MOUTH_Y + 0.0006), (0.008, MOUTH_Y - 0.0006),
             (0.0, MOUTH_Y - 0.0006), (-0.008, MOUTH_Y - 0.0006)]
    pts += outer_up + outer_lo + inner
    return np.asarray(pts)


def _embed_landmarks(builder: _HeadBuilder, V: np.ndarray, faces: np.ndarray):
    n_sh = len(builder.anchor)
    shell_faces = np.nonzero((faces < n_sh).all(1))[0]
    A = builder.anchor  # feature layout coordinates (x, y); faces chosen on the front
    tri = A[faces[shell_faces]]
    front = (tri[:, :, 2] > 0.0).all(1)
    shell_faces, tri = shell_faces[front], tri[front]
    # inner-lip targets must land on the right side of the slit: faces using lower copies are "lower"
    uses_lower = np.isin(faces[shell_faces], builder.slit_lower).any(1)
    uses_upper_row = np.isin(faces[shell_faces], builder.slit_upper).any(1)
    face_idx, bary = [], []
    targets = _ibug68_targets()
    sl = A[builder.slit_upper]
    order = np.argsort(sl[:, 0])
    for k in range(60, 68):  # inner lip: just above / below the actual slit row
        slit_y = np.interp(targets[k, 0], sl[order, 0], sl[order, 1])
        targets[k, 1] = slit_y + (0.0006 if k < 65 else -0.0006)
        if k in (60, 64):
            targets[k, 1] = slit_y + 0.0003
    for k, (px, py) in enumerate(targets):
        a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
        v0, v1, v2 = b - a, c - a, np.array([px, py]) - a
        den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
        den = np.where(np.abs(den) < 1e-15, 1e-15, den)
        l1 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / den
        l2 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / den
        l0 = 1 - l1 - l2
        inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
        if k >= 60:
            want_lower = k >= 65
            inside &= (uses_lower if want_lower else ~uses_lower)
        if not inside.any():
            raise RuntimeError(f"landmark {k} target ({px:.3f}, {py:.3f}) is not on the face")
        zs = (tri[:, :, 2] * np.stack([l0, l1, l2], 1)).sum(1)
        best = np.argmax(np.where(inside, zs, -np.inf))
        face_idx.append(shell_faces[best])
        bary.append(np.clip([l0[best], l1[best], l2[best]], 0, 1))
    bary = np.asarray(bary)
    bary /= bary.sum(1, keepdims=True)
    _ = uses_upper_row
    return np.asarray(face_idx, dtype=np.int64), bary


# --------------------------------------------------------------------------- regions
def _regions(builder: _HeadBuilder, V: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = builder.n_vertices
    R = np.zeros((n, len(REGION_NAMES)))
    col = {name: i for i, name in enumerate(REGION_NAMES)}
    labels = np.zeros(n, dtype=np.int64)
    n_sh = len(builder.anchor)
    A = builder.anchor
    x, y, z = A[:, 0], A[:, 1], A[:, 2]
    d = builder.dirs[builder.shell_src]
    # hairline height as a function of the horizontal direction; hair_coord > 0 = hair (metres)
    dzh = d[:, 2] / np.maximum(np.hypot(d[:, 0], d[:, 2]), 1e-9)
    hairline = np.interp(dzh, [-1.0, -0.5, -0.1, 0.25, 0.6, 1.0], [-0.065, -0.055, 0.030, 0.045, 0.066, 0.072])
    hair = y - hairline
    R[:n_sh, col["hair_coord"]] = hair
    labels[:n_sh] = np.where(hair > 0, LABELS["scalp"], LABELS["skin"])
    front = smoothstep(0.0, 0.05, z)
    brow = np.zeros(n_sh)
    for sx in (1, -1):
        xs = sx * x
        arc = 0.035 + 0.006 * np.sin(np.clip((0.054 - xs) / 0.042, 0, 1) * 2.9) - 0.002
        brow += smoothstep(0.0035, 0.0015, np.abs(y - arc)) * smoothstep(0.058, 0.050, xs) * smoothstep(0.008, 0.013, xs)
        m, a, b = builder._almond(x, y, sx * EYE_X)
        ring = np.maximum(np.abs(a), np.abs(b))
        R[:n_sh, col["lid_line"]] += smoothstep(0.75, 0.95, ring) * smoothstep(1.35, 1.0, ring) * (np.abs(a) < 1.25)
    R[:n_sh, col["brow"]] = np.clip(brow * front, 0, 1)
    lipx = smoothstep(MOUTH_HW + 0.001, MOUTH_HW - 0.002, np.abs(x))
    taper = np.sqrt(np.clip(1 - (x / (MOUTH_HW + 0.001)) ** 2, 0, 1)) ** 0.8
    bow = 0.0012 * np.exp(-0.5 * (x / 0.003) ** 2)  # cupid's bow dip
    top = MOUTH_Y + 0.0085 * taper - bow
    bot = MOUTH_Y - 0.0105 * taper
    lips = lipx * smoothstep(top + 0.0012, top - 0.0008, y) * smoothstep(bot - 0.0012, bot + 0.0008, y)
    R[:n_sh, col["lips"]] = lips * front
    R[:n_sh, col["lip_line"]] = lipx * smoothstep(0.002, 0.0, np.abs(y - MOUTH_Y)) * front
    R[:n_sh, col["beard"]] = (smoothstep(-0.028, -0.040, y) * smoothstep(0.064, 0.050, np.abs(x)) * front *
                              (1 - R[:n_sh, col["lips"]]) * smoothstep(-0.125, -0.105, y - 0.3 * z))
    R[:n_sh, col["cheek"]] = sum(_gauss(x, y, sx * 0.045, -0.015, 0.016, 0.014) for sx in (1, -1)) * front
    for ids, lab in ((builder.eye_l, "eye_left"), (builder.eye_r, "eye_right")):
        labels[ids] = LABELS[lab]
        ang = np.degrees(np.arccos(np.clip(builder.eye_unit[:, 2], -1, 1)))
        R[ids, col["pupil"]] = smoothstep(14, 10, ang)
        R[ids, col["iris"]] = smoothstep(33, 28, ang) - R[ids, col["pupil"]]
        R[ids, col["sclera"]] = 1 - smoothstep(33, 28, ang)
    labels[builder.cav] = LABELS["mouth"]
    R[builder.cav, col["mouth"]] = 1.0
    cu = builder.cav_unit
    teeth = smoothstep(0.15, 0.45, cu[:, 2]) * (smoothstep(0.15, 0.35, cu[:, 1]) * smoothstep(0.85, 0.65, cu[:, 1]) +
                                         smoothstep(-0.2, -0.4, cu[:, 1]) * smoothstep(-0.85, -0.65, cu[:, 1]))
    R[builder.cav, col["teeth"]] = np.clip(teeth, 0, 1)
    for ids in (builder.ear_l, builder.ear_r):
        labels[ids] = LABELS["ear"]
        u = builder.ear_unit
        R[ids, col["ear_inner"]] = (u[:, 0] > 0) * np.exp(-0.5 * ((u[:, 1] / 0.5) ** 2 + ((u[:, 2] + 0.1) / 0.55) ** 2))
    labels[builder.neck] = LABELS["neck"]
    # hair direction: radial on the shell, zero elsewhere
    hair_dir = np.zeros((n, 3))
    hair_dir[:n_sh] = d
    return labels, R, hair_dir


# --------------------------------------------------------------------------- model
def build_head_model(seed: int = 0) -> dict:
    """The procedural head as a FLAME-layout dict (float64 arrays, sparse J_regressor)."""
    b = _HeadBuilder(seed)
    n_id = len(IDENTITY_NAMES)
    zero = np.zeros(n_id)
    V0 = b.geometry(zero)
    shapedirs = np.zeros((b.n_vertices, 3, N_SHAPE + N_EXPR))
    for k in range(n_id):
        e = np.zeros(n_id)
        e[k] = 1.0
        shapedirs[:, :, k] = 0.5 * (b.geometry(e) - b.geometry(-e))
    shapedirs[:, :, N_SHAPE: N_SHAPE + len(EXPRESSION_NAMES)] = b.expression_full(zero)
    faces = b.faces
    weights = _skinning(b, V0)
    jreg = _joint_regressor(b, V0)
    J = np.asarray(jreg @ V0)
    labels, regions, hair_dir = _regions(b, V0)
    lmk_idx, lmk_bary = _embed_landmarks(b, V0, faces)
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    return {
        "v_template": V0, "f": faces.astype(np.uint32), "shapedirs": shapedirs,
        "posedirs": np.zeros((b.n_vertices, 3, 36)), "J_regressor": jreg, "weights": weights,
        "kintree_table": kintree, "J": J, "bs_style": "lbs", "bs_type": "lrotmin",
        "vertex_labels": labels, "region_masks": regions, "region_names": np.array(REGION_NAMES),
        "hair_dir": hair_dir, "lmk_face_idx": lmk_idx, "lmk_b_coords": lmk_bary,
        "identity_names": np.array(IDENTITY_NAMES), "expression_names": np.array(EXPRESSION_NAMES),
    }


def write_head_model(directory: str | Path, seed: int = 0, model: dict | None = None) -> tuple[Path, Path]:
    """Write ``head_model.pkl`` (FLAME layout) and ``head_landmark_embedding.npy`` into ``directory``."""
    from avat3r_core import storage

    directory = storage.as_path(directory)  # a local path or a URI
    model = build_head_model(seed) if model is None else model
    model_path = write_flame_model(directory / "head_model.pkl", model)
    emb_path = write_landmark_embedding(directory / "head_landmark_embedding.pkl", model["lmk_face_idx"],
                                        model["lmk_b_coords"])
    return model_path, emb_path


def sample_identity(seed: int, n: int = N_SHAPE, scale: float = 0.8) -> np.ndarray:
    """Identity coefficients (n,) for a subject: N(0, scale) on the active components, zeros elsewhere."""
    rng = np.random.default_rng(seed)
    out = np.zeros(n)
    k = min(n, len(IDENTITY_NAMES))
    out[:k] = np.clip(rng.normal(0.0, scale, k), -2.5, 2.5)
    return out
