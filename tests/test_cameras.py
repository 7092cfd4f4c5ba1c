"""Tests of models/camera.py: projection, derived cameras, look_at conventions, camera_params.json I/O."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from models.camera import Camera, stack_cameras
from utils.data.camera_params import NERSEMBLE_CALIB_SIZE, load_camera_params, write_camera_params


def _w2c(angle_deg=20.0, t=(0.1, -0.05, 1.5)) -> torch.Tensor:
    a = math.radians(angle_deg)
    R = torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])
    w2c = torch.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, torch.tensor(t)
    return w2c


def _cam(cx=50.0, cy=40.0, name="c") -> Camera:
    K = torch.tensor([[120.0, 0.0, cx], [0.0, 110.0, cy], [0.0, 0.0, 1.0]])
    return Camera(K, _w2c(), 100, 80, name)


def test_project_hand_computed():
    K = torch.tensor([[100.0, 0.0, 30.0], [0.0, 200.0, 20.0], [0.0, 0.0, 1.0]])  # off-centre principal point
    w2c = torch.eye(4)
    w2c[:3, 3] = torch.tensor([0.0, 0.0, 2.0])  # world origin 2 m in front
    cam = Camera(K, w2c, 64, 48)
    uv, z = cam.project(torch.tensor([[0.0, 0.0, 0.0], [0.2, -0.1, 0.0], [0.0, 0.0, 2.0]]))
    torch.testing.assert_close(uv[0], torch.tensor([30.0, 20.0]))
    torch.testing.assert_close(uv[1], torch.tensor([30.0 + 100 * 0.2 / 2, 20.0 - 200 * 0.1 / 2]))
    torch.testing.assert_close(uv[2], torch.tensor([30.0, 20.0]))
    torch.testing.assert_close(z, torch.tensor([2.0, 2.0, 4.0]))
    torch.testing.assert_close(cam.center, torch.tensor([0.0, 0.0, -2.0]))
    torch.testing.assert_close(cam.c2w @ cam.w2c, torch.eye(4))
    # batched points keep their leading shape
    uv, z = cam.project(torch.zeros(2, 5, 3))
    assert uv.shape == (2, 5, 2) and z.shape == (2, 5)


def test_scaled_resized_cropped_consistency():
    cam = _cam(cx=47.3, cy=41.9)
    pts = torch.tensor([[0.05, 0.02, 0.0], [-0.1, 0.08, 0.2], [0.0, -0.05, -0.1]])
    uv, _ = cam.project(pts)
    s = cam.scaled(0.5)
    assert (s.width, s.height) == (50, 40)
    torch.testing.assert_close(s.project(pts)[0], uv * 0.5)
    r = cam.resized(200, 120)
    torch.testing.assert_close(r.project(pts)[0], uv * torch.tensor([2.0, 1.5]))
    c = cam.cropped(10, 5, 60, 50)
    assert (c.width, c.height) == (60, 50)
    torch.testing.assert_close(c.project(pts)[0], uv - torch.tensor([10.0, 5.0]))
    # derived cameras leave the original alone
    assert cam.width == 100 and float(cam.K[0, 2]) == pytest.approx(47.3)
    moved = cam.to("cpu")
    torch.testing.assert_close(moved.K, cam.K)


def test_look_at_conventions():
    eye, target = (0.3, 0.2, 1.0), (0.0, 0.05, 0.0)
    cam = Camera.look_at(eye, target, (0.0, 1.0, 0.0), 64, 48, fov_y_deg=40, cx=30.0, cy=25.0)
    uv, z = cam.project(torch.tensor([target]))
    torch.testing.assert_close(uv[0], torch.tensor([30.0, 25.0]), atol=1e-4, rtol=0)  # target -> principal point
    assert float(z[0]) == pytest.approx(float(np.linalg.norm(np.subtract(eye, target))), rel=1e-5)
    above = torch.tensor([target]) + torch.tensor([[0.0, 0.1, 0.0]])
    assert float(cam.project(above)[0][0, 1]) < 25.0  # world 'up' points to smaller v (image up)
    # world direction to the camera's right (up x backward) maps to larger u
    back = torch.tensor(eye) - torch.tensor(target)
    right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), back)
    assert float(cam.project(torch.tensor([target]) + 0.05 * right / right.norm())[0][0, 0]) > 30.0
    R = cam.w2c[:3, :3]
    torch.testing.assert_close(R @ R.T, torch.eye(3), atol=1e-6, rtol=0)
    assert float(torch.linalg.det(R)) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(cam.center, torch.tensor(eye), atol=1e-6, rtol=0)
    assert cam.fy == pytest.approx(0.5 * 48 / math.tan(math.radians(20)), rel=1e-6)
    with pytest.raises(ValueError, match="coincide"):
        Camera.look_at(eye, eye)
    with pytest.raises(ValueError, match="parallel"):
        Camera.look_at((0.0, 1.0, 0.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0))


def test_camera_validation_and_stack():
    with pytest.raises(ValueError, match="K"):
        Camera(torch.eye(2), torch.eye(4), 10, 10)
    with pytest.raises(ValueError, match="non-finite"):
        Camera(torch.eye(3), torch.full((4, 4), float("nan")), 10, 10)
    with pytest.raises(ValueError, match="size"):
        Camera(torch.eye(3), torch.eye(4), 0, 10)
    K, w2c, w, h = stack_cameras([_cam(name="a"), _cam(name="b")])
    assert K.shape == (2, 3, 3) and w2c.shape == (2, 4, 4) and (w, h) == (100, 80)
    with pytest.raises(ValueError, match="one image size"):
        stack_cameras([_cam(), _cam().scaled(0.5)])
    with pytest.raises(ValueError, match="at least one"):
        stack_cameras([])


def _calib(tmp_path, shared: bool):
    w, h = NERSEMBLE_CALIB_SIZE
    cams = {}
    for i, serial in enumerate(["220700191", "221501007", "222200037"]):
        K = torch.tensor([[7000.0 + 10 * i, 0.0, 1100.0 + i], [0.0, 7000.0 + 10 * i, 1604.0 - i], [0.0, 0.0, 1.0]])
        if shared:
            K = torch.tensor([[7000.0, 0.0, 1100.0], [0.0, 7000.0, 1604.0], [0.0, 0.0, 1.0]])
        cams[serial] = Camera(K, _w2c(10.0 * i, (0.01 * i, 0.0, 1.2)), w, h, serial)
    path = tmp_path / "calibration" / "camera_params.json"
    write_camera_params(path, cams, shared_intrinsics=shared)
    return path, cams


@pytest.mark.parametrize("shared", [True, False])
def test_camera_params_round_trip(tmp_path, shared):
    path, cams = _calib(tmp_path, shared)
    data = json.loads(path.read_text())
    assert isinstance(data["intrinsics"], list) == shared
    back = load_camera_params(path)
    assert list(back) == list(cams)
    for s, cam in cams.items():
        torch.testing.assert_close(back[s].K, cam.K)
        torch.testing.assert_close(back[s].w2c, cam.w2c)
        assert (back[s].width, back[s].height, back[s].name) == (cam.width, cam.height, s)
    # explicit size and subset / order of serials
    half = load_camera_params(path, image_size=(1100, 1604), serials=["222200037", "220700191"])
    assert list(half) == ["222200037", "220700191"]
    torch.testing.assert_close(half["220700191"].K[:2], cams["220700191"].K[:2] * 0.5)
    per = load_camera_params(path, image_size={s: (550, 802) for s in cams})
    torch.testing.assert_close(per["221501007"].K[:2], cams["221501007"].K[:2] * 0.25)


def test_camera_params_ratio_from_image_files(tmp_path):
    path, cams = _calib(tmp_path, shared=False)
    img_dir = tmp_path / "images-2x"
    img_dir.mkdir()
    for i, s in enumerate(cams):
        ext = "jpg" if i % 2 == 0 else "png"
        Image.fromarray(np.zeros((401, 275, 3), np.uint8)).save(img_dir / f"cam_{s}.{ext}")  # 1/8 size (w 275, h 401)
    got = load_camera_params(path, image_dir=img_dir)
    for s, cam in cams.items():
        assert (got[s].width, got[s].height) == (275, 401)
        torch.testing.assert_close(got[s].K[:2], cam.K[:2] / 8)
    # a point projects to the same relative image position
    p = torch.tensor([[0.02, 0.01, 0.0]])
    s = "221501007"
    torch.testing.assert_close(got[s].project(p)[0] * 8, cams[s].project(p)[0], rtol=1e-5, atol=1e-3)


def test_camera_params_errors(tmp_path):
    path, cams = _calib(tmp_path, shared=False)
    with pytest.raises(ValueError, match="uniform scaling"):
        load_camera_params(path, image_size=(1100, 1000))
    with pytest.raises(ValueError, match="inconsistent scales"):
        load_camera_params(path, image_size={"220700191": (1100, 1604), "221501007": (550, 802),
                                             "222200037": (550, 802)})
    with pytest.raises(FileNotFoundError, match="camera_params.json"):
        load_camera_params(tmp_path / "nope" / "camera_params.json")
    with pytest.raises(KeyError, match="999"):
        load_camera_params(path, serials=["999"])
    with pytest.raises(FileNotFoundError, match="cam_220700191"):
        load_camera_params(path, image_dir=tmp_path)
    with pytest.raises(KeyError, match="image_size"):
        load_camera_params(path, image_size={"220700191": (1100, 1604)})
    data = json.loads(path.read_text())
    del data["intrinsics"]["221501007"]
    bad = tmp_path / "bad_intr.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(KeyError, match="no intrinsics"):
        load_camera_params(bad)
    del data["world_2_cam"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="world_2_cam"):
        load_camera_params(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_camera_params(bad)
    (tmp_path / "cam_220700191.jpg").write_text("garbage")
    with pytest.raises(ValueError, match="cannot read the image"):
        load_camera_params(path, image_dir=tmp_path, serials=["220700191"])
    with pytest.raises(ValueError, match="share an image size"):
        write_camera_params(tmp_path / "x.json", [_cam(name="a"), _cam(name="b").scaled(0.5)])


def test_camera_params_bad_intrinsics_fail_instead_of_empty_masks(tmp_path):
    """A zero focal length, or a file without width/height written for frames other than NeRSemble's, used to give
    cameras that see nothing (empty face masks); both are errors naming the file."""
    path, cams = _calib(tmp_path, shared=True)
    data = json.loads(path.read_text())
    for fx in (0.0, -5.0):
        data["intrinsics"][0][0] = fx
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"camera_params.json: camera \d+: focal lengths must be > 0"):
            load_camera_params(path)
    data["intrinsics"] = [[480.0, 0.0, 66.0], [0.0, 480.0, 96.0], [0.0, 0.0, 1.0]]  # for 132x192 frames
    path.write_text(json.dumps({**data, "width": 132, "height": 192}))
    assert load_camera_params(path)["222200037"].width == 132
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in ("width", "height")}))
    with pytest.raises(ValueError, match="has no 'width'/'height'.*add \"width\" and \"height\""):
        load_camera_params(path)
    path.write_text(json.dumps({**data, "width": 50, "height": 192}))
    with pytest.raises(ValueError, match="principal point .* outside"):
        load_camera_params(path)


# ------------------------------------------------------------------ issue 26 class 3: serials never leave views/
HOSTILE_SERIALS = ["../../evil", "../evil", "/tmp/evil_abs", "..", "", "a/b", ".x", "x\x00y", "-x"]


@pytest.mark.parametrize("bad", HOSTILE_SERIALS, ids=repr)
def test_unsafe_serial_in_camera_json_is_refused(tmp_path, bad):
    path, cams = _calib(tmp_path, shared=True)
    doc = json.loads(path.read_text())
    doc["world_2_cam"][bad] = doc["world_2_cam"]["222200037"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as ei:
        load_camera_params(path)
    assert str(path) in str(ei.value) and "camera serial" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("bad", HOSTILE_SERIALS + ["link"], ids=repr)
def test_export_views_stay_inside_views(tmp_path, bad):
    """views/cam_<serial>.png for a serial that would leave views/, or a planted link: refused, nothing written."""
    from utils.apps.track.export import export_views
    from utils.core.names import UnsafeNameError

    out = tmp_path / "out"
    (out / "views").mkdir(parents=True)
    outside = tmp_path / "outside.png"
    if bad == "link":  # a safe serial whose file is a planted symlink to a file outside --out
        outside.write_bytes(b"precious")
        (out / "views" / "cam_123.png").symlink_to(outside)
        bad = "123"
    with pytest.raises(UnsafeNameError):
        export_views(out, [], [], [(bad, torch.zeros(4, 4, 3))])
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "cam_evil.png").exists()
    assert not outside.exists() or outside.read_bytes() == b"precious"
    assert sorted(p.name for p in (out / "views").iterdir()) in ([], ["cam_123.png"])
