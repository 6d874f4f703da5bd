"""Tests of avat3r_core.cameras: geometry, image-space edits, builders and calibration IO."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from avat3r_core.cameras import Cameras
from avat3r_core.formats.calibration import (
    read_nersemble_calibration,
    read_transforms_json,
    write_nersemble_calibration,
    write_transforms_json,
)
from avat3r_core.geometry import is_rigid, not_rigid
from avat3r_core.errors import FormatError


def _rig(n: int = 6, dtype=torch.float64) -> Cameras:
    """Cameras around the origin with distinct, slightly off-centre intrinsics."""
    g = torch.Generator().manual_seed(0)
    eye = torch.randn(n, 3, generator=g, dtype=torch.float64)
    eye = 3.0 * eye / eye.norm(dim=-1, keepdim=True)
    target = 0.1 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    cams = Cameras.look_at(eye, target, fov_deg=30.0, width=320, height=240, dtype=torch.float64)
    K = cams.K.clone()
    K[:, 0, 0] *= 1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    K[:, 0, 2] += 5 * torch.randn(n, generator=g, dtype=torch.float64)
    K[:, 1, 2] -= 3 * torch.randn(n, generator=g, dtype=torch.float64)
    return Cameras(cams.world_to_cam, K, cams.width, cams.height).to(dtype=dtype)


def _points(n: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)


def _simple_cam(fx=100.0, fy=100.0, cx=64.0, cy=48.0, w=128, h=96) -> Cameras:
    K = torch.tensor([[[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    return Cameras(torch.eye(4, dtype=torch.float64)[None], K, w, h)


# ---------------------------------------------------------------------- projection by hand


def test_known_projections():
    cam = _simple_cam()
    uv, depth = cam.project(torch.tensor([[0.0, 0.0, 3.0], [1.0, 0.0, 2.0], [0.0, -1.0, 4.0]]))
    assert uv.shape == (1, 3, 2) and depth.shape == (1, 3)
    assert torch.allclose(uv[0, 0], torch.tensor([64.0, 48.0], dtype=torch.float64))
    assert torch.allclose(uv[0, 1], torch.tensor([64.0 + 50.0, 48.0], dtype=torch.float64))
    assert torch.allclose(uv[0, 2], torch.tensor([64.0, 48.0 - 25.0], dtype=torch.float64))  # camera -y is up
    assert torch.allclose(depth[0], torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64))


def test_properties_and_pose_inverse():
    cams = _rig()
    assert len(cams) == 6 and cams.dtype == torch.float64 and cams.device.type == "cpu"
    eye = torch.eye(4, dtype=torch.float64).expand(6, 4, 4)
    assert torch.allclose(cams.cam_to_world @ cams.world_to_cam, eye, atol=1e-12)
    assert torch.allclose(cams.cam_to_world[:, :3, 3], cams.centers)
    # camera centres sit at depth 0 of their own camera
    _, d = cams.project(cams.centers[:, None, :])
    assert torch.allclose(d, torch.zeros_like(d), atol=1e-12)
    assert torch.allclose(cams.fx, cams.K[:, 0, 0]) and torch.allclose(cams.cy, cams.K[:, 1, 2])
    assert cams.R.shape == (6, 3, 3) and cams.t.shape == (6, 3)


def test_project_unproject_round_trip_shared_and_batched():
    cams = _rig()
    pts = _points()
    uv, depth = cams.project(pts)
    assert uv.shape == (6, 50, 2) and bool((depth > 0).all())
    back = cams.unproject(uv, depth)
    assert torch.allclose(back, pts.expand(6, -1, -1), atol=1e-9)
    # per-camera points with extra spatial dims
    pts_b = pts.reshape(1, 5, 10, 3).expand(6, -1, -1, -1)
    uv_b, depth_b = cams.project(pts_b)
    assert uv_b.shape == (6, 5, 10, 2) and depth_b.shape == (6, 5, 10)
    assert torch.allclose(uv_b.reshape(6, 50, 2), uv)
    assert torch.allclose(cams.unproject(uv_b, depth_b), pts_b, atol=1e-9)


def test_project_is_differentiable():
    cams = _rig(3)
    pts = _points(4).requires_grad_(True)
    w2c = cams.world_to_cam.clone().requires_grad_(True)
    K = cams.K.clone().requires_grad_(True)
    uv, depth = Cameras(w2c, K, cams.width, cams.height).project(pts)
    (uv.sum() + depth.sum()).backward()
    for g in (pts.grad, w2c.grad, K.grad):
        assert g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0


def test_pixel_grid_and_rays():
    cams = _rig(2)
    grid = cams.pixel_grid()
    assert grid.shape == (240, 320, 2)
    assert grid[0, 0].tolist() == [0.5, 0.5] and grid[2, 5].tolist() == [5.5, 2.5]
    o, d = cams.rays()
    assert o.shape == d.shape == (2, 240, 320, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(2, 240, 320, dtype=torch.float64))
    # a point along each ray projects back onto its pixel centre
    p = o + 2.5 * d
    uv, depth = cams.project(p)
    assert torch.allclose(uv, grid.expand(2, -1, -1, -1), atol=1e-8) and bool((depth > 0).all())


def test_plucker_moment_constant_along_ray_and_unit_direction():
    cams = _rig(2).resize(40, 30)
    pl = cams.plucker()
    assert pl.shape == (2, 6, 30, 40)
    d, m = pl[:, :3], pl[:, 3:]
    assert torch.allclose(d.norm(dim=1), torch.ones(2, 30, 40, dtype=torch.float64))
    o, _ = cams.rays()
    o = o.permute(0, 3, 1, 2)
    for s in (-1.0, 0.7, 5.0):
        p = o + s * d
        assert torch.allclose(torch.linalg.cross(p, d, dim=1), m, atol=1e-12)
    assert torch.allclose((d * m).sum(dim=1), torch.zeros(2, 30, 40, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------------- container protocol


def test_indexing_to_and_cat():
    cams = _rig(6)
    assert len(cams[2]) == 1 and torch.equal(cams[2].world_to_cam[0], cams.world_to_cam[2])
    assert torch.equal(cams[-1].K[0], cams.K[5])
    assert len(cams[1:4]) == 3
    sel = cams[torch.tensor([4, 0])]
    assert torch.equal(sel.world_to_cam, cams.world_to_cam[[4, 0]])
    mask = torch.tensor([True, False, True, False, False, True])
    assert len(cams[mask]) == 3 and len(cams[[1, 2]]) == 2
    with pytest.raises(IndexError):
        cams[6]
    f32 = cams.to(dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32.K.dtype == torch.float32
    both = Cameras.cat([cams[:2], f32[2:]])
    assert len(both) == 6 and both.dtype == torch.float64
    with pytest.raises(ValueError):
        Cameras.cat([cams, cams.resize(10, 10)])


# ---------------------------------------------------------------------- crop / resize


def test_crop_matches_shifted_projection_including_outside_boxes():
    cams = _rig()
    pts = _points()
    uv, _ = cams.project(pts)
    x0 = torch.tensor([-30.0, 0.0, 100.0, 250.0, 10.0, -5.0], dtype=torch.float64)  # boxes leave the image
    y0 = torch.tensor([-20.0, 200.0, 10.0, 0.0, -40.0, 150.0], dtype=torch.float64)
    cropped = cams.crop(x0, y0, 128, 128)
    assert (cropped.width, cropped.height) == (128, 128)
    uv_c, _ = cropped.project(pts)
    assert torch.allclose(uv_c, uv - torch.stack([x0, y0], -1)[:, None], atol=1e-9)
    # scalar offsets
    uv_s, _ = cams.crop(7, 3, 50, 60).project(pts)
    assert torch.allclose(uv_s, uv - torch.tensor([7.0, 3.0], dtype=torch.float64), atol=1e-9)


def test_resize_scales_continuous_coordinates():
    cams = _rig()
    pts = _points()
    uv, _ = cams.project(pts)
    small = cams.resize(80, 120)  # anisotropic: 320x240 -> 80x120
    uv_r, _ = small.project(pts)
    assert torch.allclose(uv_r, uv * torch.tensor([0.25, 0.5], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(small.cx, cams.cx * 0.25) and torch.allclose(small.cy, cams.cy * 0.5)
    # pixel centres map onto pixel centres under an integer downscale (align_corners=False)
    half = _simple_cam(w=4, h=4).resize(2, 2)
    assert half.pixel_grid()[0, 0].tolist() == [0.5, 0.5]
    assert (_simple_cam(w=4, h=4).pixel_grid()[0:2, 0:2].mean(dim=(0, 1)) / 2).tolist() == [0.5, 0.5]


def test_crop_resize_per_camera_boxes():
    cams = _rig()
    pts = _points()
    uv, _ = cams.project(pts)
    boxes = torch.tensor(
        [[-50, -50, 200, 200], [0, 0, 320, 240], [100, 20, 64, 32], [300, 200, 100, 100],
         [10, 10, 30, 60], [-10, 100, 400, 300]],
        dtype=torch.float64,
    )
    out = cams.crop_resize(boxes, (64, 48))
    assert (out.width, out.height) == (64, 48)
    scale = torch.tensor([64.0, 48.0], dtype=torch.float64) / boxes[:, 2:]
    expected = (uv - boxes[:, None, :2]) * scale[:, None]
    assert torch.allclose(out.project(pts)[0], expected, atol=1e-9)
    # equals crop followed by resize for a common box size
    a = cams.crop_resize(torch.tensor([5.0, 6.0, 100.0, 80.0]).expand(6, 4), 32)
    b = cams.crop(5, 6, 100, 80).resize(32, 32)
    assert torch.allclose(a.K, b.K)


# ---------------------------------------------------------------------- builders


def test_look_at_centres_target_and_axes():
    eye = torch.tensor([[0.0, 0.0, 5.0], [3.0, 1.0, -2.0], [-1.0, 4.0, 0.5]])
    target = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.3, 0.0]])
    cams = Cameras.look_at(eye, target, up=(0.0, 1.0, 0.0), fov_deg=40.0, width=300, height=200)
    uv, depth = cams.project(target[:, None, :])
    assert torch.allclose(uv[:, 0], torch.tensor([150.0, 100.0]).expand(3, 2), atol=1e-4)
    assert torch.allclose(depth[:, 0], (eye - target).norm(dim=-1), atol=1e-5)
    # world up appears up in the image (smaller v), camera 0 looks along -z so +x world is image right
    up_uv, _ = cams.project(target[:, None, :] + torch.tensor([0.0, 0.1, 0.0]))
    assert bool((up_uv[:, 0, 1] < 100.0).all())
    right_uv, _ = cams[0].project(torch.tensor([[0.1, 0.0, 0.0]]))
    assert right_uv[0, 0, 0] > 150.0
    # vertical field of view
    assert math.isclose(float(cams.fy[0]), 100.0 / math.tan(math.radians(20.0)), rel_tol=1e-6)
    # explicit K
    K = cams.K[0]
    cams_k = Cameras.look_at(eye, target, K=K, width=300, height=200)
    assert torch.allclose(cams_k.K, cams.K)
    with pytest.raises(ValueError):
        Cameras.look_at(eye[:1], torch.tensor([0.0, 10.0, 5.0]), fov_deg=30.0)  # parallel to up


def test_rig_arc_sees_target():
    target = (0.0, 0.05, 0.1)
    cams = Cameras.rig_arc(n=16, radius=1.2, target=target, yaw_range_deg=(-60, 60), pitch_deg_levels=(-10, 15))
    assert len(cams) == 16
    uv, depth = cams.project(torch.tensor([target]))
    assert bool((depth > 0).all())
    centre = torch.tensor([cams.width / 2, cams.height / 2])
    assert torch.allclose(uv[:, 0], centre.expand(16, 2), atol=1e-3)
    dist = (cams.centers - torch.tensor(target)).norm(dim=-1)
    assert torch.allclose(dist, torch.full((16,), 1.2), atol=1e-5)
    # all cameras in front of the face (+z side), spanning about +-60 degrees of yaw
    offs = cams.centers - torch.tensor(target)
    yaw = torch.rad2deg(torch.atan2(offs[:, 0], offs[:, 2]))
    assert bool((offs[:, 2] > 0).all()) and math.isclose(float(yaw.max()), 60.0, abs_tol=0.1)
    odd = Cameras.rig_arc(n=5, pitch_deg_levels=(0.0, 10.0, 20.0))
    assert len(odd) == 5


# ---------------------------------------------------------------------- NeRSemble IO


def test_nersemble_round_trip(tmp_path):
    cams = _rig(4, dtype=torch.float32)
    K = cams.K[:1].expand(4, 3, 3)
    cams = Cameras(cams.world_to_cam, K, 2200, 3208)
    serials = ["222200037", "220700191", "221501007", "222200036"]
    path = tmp_path / "camera_params.json"
    write_nersemble_calibration(path, serials, cams)
    raw = json.loads(path.read_text())
    assert set(raw) == {"world_2_cam", "intrinsics"} and len(raw["intrinsics"]) == 3
    got_serials, got = read_nersemble_calibration(path, width=2200, height=3208)
    assert got_serials == sorted(serials)
    order = [serials.index(s) for s in got_serials]
    assert torch.equal(got.world_to_cam, cams.world_to_cam[order])
    assert torch.equal(got.K, cams.K[order])
    assert (got.width, got.height) == (2200, 3208)


def test_nersemble_default_size_orientation(tmp_path):
    path = tmp_path / "camera_params.json"
    for cx, cy, expect in ((1100.0, 1604.0, (2200, 3208)), (1604.0, 1100.0, (3208, 2200))):
        K = [[7000.0, 0.0, cx], [0.0, 7000.0, cy], [0.0, 0.0, 1.0]]
        path.write_text(json.dumps({"world_2_cam": {"1": np.eye(4).tolist()}, "intrinsics": K}))
        _, cams = read_nersemble_calibration(path)
        assert (cams.width, cams.height) == expect


def test_nersemble_write_rejects_differing_intrinsics(tmp_path):
    cams = _rig(3)
    with pytest.raises(FormatError, match=r"camera_params\.json \[intrinsics\]"):
        write_nersemble_calibration(tmp_path / "camera_params.json", ["a", "b", "c"], cams)


def _write(path, obj) -> None:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d["world_2_cam"].__setitem__("222200037", np.eye(4)[:3].tolist()), "world_2_cam.222200037"),
        (lambda d: d.pop("intrinsics"), "intrinsics"),
        (lambda d: d["intrinsics"][0].__setitem__(0, "1000"), "intrinsics"),
        (lambda d: d["world_2_cam"]["220700191"][1].__setitem__(3, float("nan")), "world_2_cam.220700191"),
        (lambda d: d["world_2_cam"]["220700191"][3].__setitem__(0, 1.0), "world_2_cam.220700191"),
        (lambda d: d.pop("world_2_cam"), "world_2_cam"),
        (lambda d: d.__setitem__("world_2_cam", [1, 2]), "world_2_cam"),
    ],
)
def test_nersemble_malformed(tmp_path, mutate, field):
    data = {
        "world_2_cam": {"222200037": np.eye(4).tolist(), "220700191": np.eye(4).tolist()},
        "intrinsics": [[7000.0, 0.0, 1100.0], [0.0, 7000.0, 1604.0], [0.0, 0.0, 1.0]],
    }
    mutate(data)
    path = tmp_path / "camera_params.json"
    _write(path, json.dumps(data))  # json.dumps writes NaN as a bare token, which json.loads accepts
    with pytest.raises(FormatError) as err:
        read_nersemble_calibration(path)
    assert "camera_params.json" in str(err.value) and f"[{field}]" in str(err.value)
    assert err.value.field == field


def test_nersemble_matrix_shape_message(tmp_path):
    path = tmp_path / "camera_params.json"
    _write(path, {"world_2_cam": {"222200037": np.eye(4)[:3].tolist()}, "intrinsics": np.eye(3).tolist()})
    with pytest.raises(FormatError, match=r"\[world_2_cam\.222200037\]: expected a 4x4 matrix, got 3x4"):
        read_nersemble_calibration(path)


def test_invalid_json(tmp_path):
    path = tmp_path / "camera_params.json"
    _write(path, '{"world_2_cam": {')
    with pytest.raises(FormatError, match=r"camera_params\.json: invalid JSON"):
        read_nersemble_calibration(path)
    tpath = tmp_path / "transforms.json"
    _write(tpath, "[1, 2,")
    with pytest.raises(FormatError, match=r"transforms\.json: invalid JSON"):
        read_transforms_json(tpath)


# ---------------------------------------------------------------------- transforms.json IO


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transforms_round_trip(tmp_path, dtype):
    cams = _rig(5, dtype=dtype)  # distinct intrinsics -> written per frame
    files = [f"images/frame_{i:05d}.png" for i in range(5)]
    path = tmp_path / "transforms.json"
    write_transforms_json(path, files, cams)
    got_files, got = read_transforms_json(path, dtype=dtype)
    assert got_files == files and (got.width, got.height) == (cams.width, cams.height)
    assert torch.allclose(got.world_to_cam, cams.world_to_cam, atol=1e-6, rtol=0)
    assert torch.allclose(got.K, cams.K, atol=1e-6, rtol=0)
    # shared intrinsics -> written at top level
    shared = Cameras(cams.world_to_cam, cams.K[:1].expand(5, 3, 3), cams.width, cams.height)
    write_transforms_json(path, files, shared)
    raw = json.loads(path.read_text())
    assert "fl_x" in raw and "fl_x" not in raw["frames"][0]
    _, got = read_transforms_json(path, dtype=dtype)
    assert torch.allclose(got.K, shared.K, atol=1e-6, rtol=0)


def test_transforms_opengl_convention(tmp_path):
    # OpenGL camera at (0, 0, 5): identity rotation looks down -z, i.e. at the origin, y up.
    c2w = np.eye(4)
    c2w[2, 3] = 5.0
    data = {
        "fl_x": 200.0, "fl_y": 210.0, "cx": 60.0, "cy": 40.0, "w": 128, "h": 96, "k1": 0.0, "p2": 0,
        "frames": [{"file_path": "a.png", "transform_matrix": c2w.tolist()}],
    }
    path = tmp_path / "transforms.json"
    _write(path, data)
    _, cams = read_transforms_json(path)
    uv, depth = cams.project(torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert torch.allclose(uv[0, 0], torch.tensor([60.0, 40.0])) and math.isclose(float(depth[0, 0]), 5.0)
    assert uv[0, 1, 1] < 40.0  # world +y (OpenGL up) is up in the image
    assert torch.allclose(cams.centers[0], torch.tensor([0.0, 0.0, 5.0]))


def test_transforms_per_frame_overrides_top_level(tmp_path):
    data = {
        "fl_x": 200.0, "fl_y": 200.0, "cx": 64.0, "cy": 48.0, "w": 128, "h": 96,
        "frames": [
            {"file_path": "a.png", "transform_matrix": np.eye(4).tolist()},
            {"file_path": "b.png", "transform_matrix": np.eye(4).tolist(), "fl_x": 300.0, "cy": 50.0},
        ],
    }
    path = tmp_path / "transforms.json"
    _write(path, data)
    _, cams = read_transforms_json(path)
    assert cams.fx.tolist() == [200.0, 300.0] and cams.cy.tolist() == [48.0, 50.0]
    assert cams.fy.tolist() == [200.0, 200.0]


def _transforms_base() -> dict:
    return {
        "fl_x": 200.0, "fl_y": 200.0, "cx": 64.0, "cy": 48.0, "w": 128, "h": 96,
        "frames": [
            {"file_path": "a.png", "transform_matrix": np.eye(4).tolist()},
            {"file_path": "b.png", "transform_matrix": np.eye(4).tolist()},
        ],
    }


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.__setitem__("k1", 0.01), "k1"),
        (lambda d: d["frames"][1].__setitem__("p2", -0.002), "frames[1].p2"),
        (lambda d: d.pop("fl_x"), "frames[0].fl_x"),
        (lambda d: d.__setitem__("cy", "48"), "cy"),
        (lambda d: d["frames"][1].__setitem__("transform_matrix", np.eye(4)[:3].tolist()), "frames[1].transform_matrix"),
        (lambda d: d["frames"][0]["transform_matrix"][0].__setitem__(3, float("inf")), "frames[0].transform_matrix"),
        (lambda d: d["frames"][0].pop("file_path"), "frames[0].file_path"),
        (lambda d: d["frames"][1].__setitem__("w", 64), "frames[1].w"),
        (lambda d: d.__setitem__("camera_model", "OPENCV_FISHEYE"), "camera_model"),
        (lambda d: d.pop("frames"), "frames"),
        (lambda d: d.__setitem__("h", 96.5), "h"),
    ],
)
def test_transforms_malformed(tmp_path, mutate, field):
    data = _transforms_base()
    mutate(data)
    path = tmp_path / "transforms.json"
    _write(path, json.dumps(data))
    with pytest.raises(FormatError) as err:
        read_transforms_json(path)
    assert "transforms.json" in str(err.value) and f"[{field}]" in str(err.value)
    assert err.value.field == field


# ---------------------------------------------------------------------- in-memory validation


def test_not_rigid_names_each_kind_of_bad_transform():
    good = np.eye(4)
    good[:3, :3] = Cameras.look_at(torch.tensor([[0.3, 0.2, 1.0]]), (0, 0, 0), fov_deg=30,
                                    dtype=torch.float64).world_to_cam[0, :3, :3].numpy()
    good[:3, 3] = (0.1, -2.0, 5.0)
    nan, scaled, mirrored, last_row = good.copy(), good.copy(), good.copy(), good.copy()
    nan[1, 2] = np.nan
    scaled[:3, :3] *= 1.01
    mirrored[:3, 0] *= -1  # still orthonormal, but a reflection
    last_row[3, 0] = 0.5
    transforms = np.stack([good, np.eye(4), nan, scaled, mirrored, last_row])
    np.testing.assert_array_equal(not_rigid(transforms), [2, 3, 4, 5])
    assert is_rigid(good.ravel().tolist()) and is_rigid(good)  # a manifest's flat 16 values, or a 4x4
    assert not is_rigid(scaled) and not is_rigid(good[:3])


def test_cameras_validation():
    w2c = torch.eye(4)[None]
    K = torch.tensor([[[100.0, 0, 50], [0, 100.0, 50], [0, 0, 1]]])
    Cameras(w2c, K, 100, 100)
    with pytest.raises(FormatError, match="world_to_cam"):
        Cameras(torch.eye(4)[None, :3], K, 100, 100)
    with pytest.raises(FormatError, match="K"):
        Cameras(w2c, K[:, :2], 100, 100)
    bad = w2c.clone()
    bad[0, 3, 0] = 1.0
    with pytest.raises(FormatError, match=r"world_to_cam\[0\]"):
        Cameras(bad, K, 100, 100)
    nan = K.clone()
    nan[0, 0, 2] = float("nan")
    with pytest.raises(FormatError, match="K"):
        Cameras(w2c, nan, 100, 100)
    with pytest.raises(FormatError, match="width"):
        Cameras(w2c, K, 0, 100)
    with pytest.raises(FormatError, match="height"):
        Cameras(w2c, K, 100, 1.5)
    with pytest.raises(FormatError, match="world_to_cam"):
        Cameras(w2c, K.expand(2, 3, 3), 100, 100)
