"""The procedural FLAME-layout head and the numba mesh rasterizer."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from avat3r_core.flame import FlameLayer, load_flame_model, load_landmark_embedding
from avat3r_core.synthetic.appearance import render_head, sample_appearance
from avat3r_core.synthetic.head import (EXPRESSION_NAMES, IDENTITY_NAMES, LABELS, N_SHAPE, build_head_model,
                                        sample_identity, write_head_model)
from avat3r_core.synthetic.mesh_raster import rasterize_mesh, shade_mesh


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """OpenCV world-to-camera looking from ``eye`` at ``target`` (x right, y down, z forward)."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, float))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    M = np.eye(4)
    M[:3, :3] = np.stack([x, y, z])
    M[:3, 3] = -M[:3, :3] @ eye
    return M


def intrinsics(size: int, fov_deg: float = 17.0) -> np.ndarray:
    f = 0.5 * size / np.tan(np.deg2rad(fov_deg / 2))
    return np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    d = build_head_model(0)
    out = tmp_path_factory.mktemp("head")
    model_path, emb_path = write_head_model(out, model=d)
    model = load_flame_model(model_path)
    emb = load_landmark_embedding(emb_path)
    layer = FlameLayer(model, landmarks=emb, dtype=torch.float64)
    return d, model, emb, layer


def test_saves_and_reloads_in_flame_layout(head):
    d, model, emb, layer = head
    np.testing.assert_array_equal(model.v_template, d["v_template"])
    np.testing.assert_array_equal(model.shapedirs, d["shapedirs"])
    assert model.parents.tolist() == [-1, 0, 1, 1, 1]
    assert model.shapedirs.shape == (model.n_vertices, 3, 400) and model.shapedirs.dtype == np.float64
    assert 3000 <= model.n_vertices <= 7000 and len(emb) == 68
    np.testing.assert_allclose(model.J_regressor @ model.v_template, model.J, atol=1e-9)
    np.testing.assert_allclose(model.weights.sum(1), 1.0, atol=1e-12)
    assert model.extras["vertex_labels"].shape == (model.n_vertices,)
    out = layer()
    np.testing.assert_allclose(out.vertices[0].numpy(), model.v_template, atol=1e-12)
    # units: metres, head ~0.2 m tall (skull top to chin), face towards +z
    v = model.v_template[model.extras["vertex_labels"] <= LABELS["scalp"]]
    assert 0.2 < v[:, 1].max() - v[:, 1].min() < 0.26
    assert v[:, 2].max() > 0.1 and v[:, 2].argmax() != v[:, 2].argmin()


def test_deterministic_per_seed():
    a, b, c = build_head_model(3), build_head_model(3), build_head_model(4)
    for key in ("v_template", "shapedirs", "weights", "lmk_face_idx"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["v_template"], c["v_template"])
    np.testing.assert_array_equal(sample_identity(5), sample_identity(5))
    assert sample_appearance(2) == sample_appearance(2) and sample_appearance(2) != sample_appearance(3)


def test_blendshapes_visible_and_localised(head):
    d, model, emb, layer = head
    sd = model.shapedirs
    for k in range(len(IDENTITY_NAMES)):
        assert np.linalg.norm(sd[:, :, k], axis=1).max() > 0.001, IDENTITY_NAMES[k]
    assert np.abs(sd[:, :, len(IDENTITY_NAMES):N_SHAPE]).max() == 0
    for k, name in enumerate(EXPRESSION_NAMES):
        assert np.linalg.norm(sd[:, :, N_SHAPE + k], axis=1).max() > 0.002, name
    assert np.abs(sd[:, :, N_SHAPE + len(EXPRESSION_NAMES):]).max() == 0
    v = model.v_template
    jaw_open = np.linalg.norm(sd[:, :, N_SHAPE + EXPRESSION_NAMES.index("jaw_open_corrective")], axis=1)
    forehead = (v[:, 1] > 0.05) & (v[:, 2] > 0.05)
    chin = (v[:, 1] < -0.07) & (v[:, 2] > 0.05)
    assert jaw_open[forehead].max() < 1e-4 and jaw_open[chin].max() > 0.001
    blink_l = np.linalg.norm(sd[:, :, N_SHAPE + EXPRESSION_NAMES.index("blink_left")], axis=1)
    assert (v[blink_l > 1e-4, 0] > 0).all()  # left eye = +x
    # eye rotation moves the left eyeball only
    out = layer(eyes=torch.tensor([[0.0, 0.4, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    moved = np.linalg.norm(out.vertices[0].numpy() - v, axis=1) > 1e-9
    assert (np.nonzero(moved)[0] == np.nonzero(model.extras["vertex_labels"] == LABELS["eye_left"])[0]).all()


def _render(head, size=128, cam=None, **params):
    d, model, emb, layer = head
    w2c = look_at((0, 0, 1.0)) if cam is None else cam
    app = sample_appearance(1)
    return render_head(layer, model, app, w2c[None], intrinsics(size)[None], size, size, supersample=1,
                       background=(0.5, 0.5, 0.5), **params)


def test_jaw_open_reveals_dark_mouth(head):
    d, model, emb, layer = head
    labels = model.extras["vertex_labels"]
    face_label = labels[model.faces[:, 0]]
    # the lips' landmark box (outer mouth corners 48/54, top 51, bottom 57)
    r0, out0 = _render(head)
    r1, out1 = _render(head, jaw=np.array([0.3, 0.0, 0.0]))
    K, w2c = intrinsics(128), look_at((0, 0, 1.0))
    lm = out0.landmarks[0].numpy() @ w2c[:3, :3].T + w2c[:3, 3]
    uv = (lm @ K.T)[:, :2] / lm[:, 2:]
    u0, u1 = int(uv[48, 0]), int(uv[54, 0]) + 1
    v0, v1 = int(uv[51, 1]), int(out1.landmarks.shape[1] and uv[57, 1] + 12)
    def dark_mouth(r):
        fid = r.face_id[0, v0:v1, u0:u1]
        lum = r.color[0, v0:v1, u0:u1].mean(-1)
        mouth = (fid >= 0) & (face_label[np.maximum(fid, 0)] == LABELS["mouth"])
        return int((mouth & (lum < 0.25)).sum())
    assert dark_mouth(r0) <= 2
    assert dark_mouth(r1) > 20


def test_landmarks_inside_face_alpha(head):
    d, model, emb, layer = head
    # frontal: all 68; a turned head seen from 3/4: the inner 51 (the jaw contour may reach the outline)
    for cam, rot, first in ((look_at((0, 0, 1.0)), (0.0, 0.0, 0.0), 0),
                            (look_at((0.25, 0.1, 0.96)), (0.05, 0.1, 0.0), 17)):
        r, out = _render(head, cam=cam, rotation=np.array(rot))
        lm = out.landmarks[0].numpy() @ cam[:3, :3].T + cam[:3, 3]
        uv = (lm @ intrinsics(128).T)[:, :2] / lm[:, 2:]
        cols, rows = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        assert (r.alpha[0, rows[first:], cols[first:]] > 0.99).all()
        # and they are in iBUG order: jaw 0 on the image left, nose below eyes, mouth below nose
        assert uv[0, 0] < uv[16, 0] and uv[30, 1] > uv[39, 1] and uv[62, 1] > uv[33, 1] and uv[8, 1] > uv[57, 1]


def test_single_triangle_coverage_and_depth():
    K = np.array([[60.0, 0, 20.5], [0, 55.0, 18.5], [0, 0, 1]])
    w2c = np.eye(4)
    v = np.array([[-0.21, -0.23, 1.0], [0.3, -0.1, 1.4], [0.05, 0.33, 2.2]])
    f = np.array([[0, 1, 2]])
    fid, bary, depth = rasterize_mesh(v, f, w2c, K, 41, 37)
    uv = (v @ K.T)[:, :2] / v[:, 2:]
    jj, ii = np.meshgrid(np.arange(41) + 0.5, np.arange(37) + 0.5)
    p = np.stack([jj, ii], -1)

    def edge(a, b):
        return (b[0] - a[0]) * (p[..., 1] - a[1]) - (b[1] - a[1]) * (p[..., 0] - a[0])

    e = np.stack([edge(uv[1], uv[2]), edge(uv[2], uv[0]), edge(uv[0], uv[1])])
    inside = (e > 0).all(0) | (e < 0).all(0)
    np.testing.assert_array_equal(fid[0] == 0, inside)
    assert inside.sum() > 50
    # depth = ray / plane intersection through each pixel centre; bary reproduces the 3D point
    n = np.cross(v[1] - v[0], v[2] - v[0])
    rays = np.stack([(p[..., 0] - K[0, 2]) / K[0, 0], (p[..., 1] - K[1, 2]) / K[1, 1], np.ones(p.shape[:2])], -1)
    z_true = (n @ v[0]) / (rays @ n)
    np.testing.assert_allclose(depth[0][inside], z_true[inside], rtol=1e-10)
    pts = bary[0][inside] @ v
    np.testing.assert_allclose(pts, rays[inside] * z_true[inside][:, None], atol=1e-10)
    assert np.isinf(depth[0][~inside]).all()
    # centroid of the projected triangle -> perspective-correct depth
    centroid_z = 3.0 / (1 / v[:, 2]).sum()  # depth at the image-space centroid
    c = uv.mean(0)
    fid2, _, d2 = rasterize_mesh(v - np.array([c[0] - 20.5, c[1] - 18.5, 0]) * 0, f, w2c,
                                 K - np.array([[0, 0, c[0] - 20.5], [0, 0, c[1] - 18.5], [0, 0, 0]]), 41, 37)
    assert fid2[0, 18, 20] == 0 and abs(d2[0, 18, 20] - centroid_z) < 1e-9


def test_shared_edges_tie_rule_and_near_plane():
    # a square split along a diagonal that passes exactly through pixel centres
    K = np.array([[10.0, 0, 8.0], [0, 10.0, 8.0], [0, 0, 1]])
    s = 0.55
    v = np.array([[-s, -s, 1.0], [s, -s, 1.0], [s, s, 1.0], [-s, s, 1.0]])
    tris = np.array([[0, 1, 2], [0, 2, 3]])
    a, _, _ = rasterize_mesh(v, tris[:1], np.eye(4), K, 16, 16)
    b, _, _ = rasterize_mesh(v, tris[1:], np.eye(4), K, 16, 16)
    both, _, _ = rasterize_mesh(v, tris, np.eye(4), K, 16, 16)
    assert not ((a >= 0) & (b >= 0)).any()
    np.testing.assert_array_equal((a >= 0) | (b >= 0), both >= 0)
    assert (both[0, 3:13, 3:13] >= 0).all()
    near = v.copy()
    near[0, 2] = 0.001
    fid, _, _ = rasterize_mesh(near, tris, np.eye(4), K, 16, 16, near=0.01)
    assert (fid[fid >= 0] == -1).all() and (fid == -1).all()


def test_cube_has_no_holes():
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) * 0.1
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = np.array([t for q in quads for t in ((q[0], q[1], q[2]), (q[0], q[2], q[3]))])
    eyes = [(0, 0, 1), (0, 0, -1), (1, 0, 0), (-1, 0, 0), (0, 1, 0.001), (0, -1, 0.001), (0.6, 0.5, 0.62)]
    w2c = np.stack([look_at(np.asarray(e) / np.linalg.norm(e) * 0.9) for e in eyes])
    K = intrinsics(65, 30.0)
    r = shade_mesh(corners, faces, w2c, K, 65, 65, np.full((8, 3), 0.8), supersample=1)
    from scipy.spatial import Delaunay

    for c in range(len(eyes)):
        cam = corners @ w2c[c, :3, :3].T + w2c[c, :3, 3]
        uv = (cam @ K.T)[:, :2] / cam[:, 2:]
        hull = Delaunay(uv)
        jj, ii = np.meshgrid(np.arange(65) + 0.5, np.arange(65) + 0.5)
        inside = hull.find_simplex(np.stack([jj, ii], -1).reshape(-1, 2)).reshape(65, 65) >= 0
        assert inside.sum() > 100
        assert (r.alpha[c][inside] == 1.0).all(), f"hole in view {c}"


def test_head_render_speed_and_antialiasing(head):
    d, model, emb, layer = head
    w2c, K = look_at((0, 0, 1.0))[None], intrinsics(256)[None]
    rasterize_mesh(model.v_template, model.faces, w2c, K, 256, 256)
    t = time.perf_counter()
    fid, _, depth = rasterize_mesh(model.v_template, model.faces, w2c, K, 256, 256)
    elapsed = time.perf_counter() - t
    assert elapsed < 0.1, elapsed
    assert ((fid >= 0) == np.isfinite(depth)).all()
    r = shade_mesh(model.v_template, model.faces, w2c, intrinsics(64)[None], 64, 64, np.full((model.n_vertices, 3), 0.7),
                   supersample=3)
    frac = (r.alpha > 0) & (r.alpha < 1)
    assert frac.sum() > 20  # fractional coverage on the silhouette
    assert np.isfinite(r.depth[r.alpha > 0]).all() and 0.85 < r.depth[r.alpha > 0].min() < 0.95
    assert (r.color >= 0).all() and (r.color <= 1).all()
