"""The synthetic FLAME's eyes and mouth as FLAME shapes them (utils/data/synthetic/flame_mesh.py, flame_model.py,
flame_regions.py): almond lid openings a few millimetres high, eyeballs set back behind overhanging lids and seen
only through the openings, lips that meet at rest and part when the jaw opens, landmarks on the lid and lip margins."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import flame as F
from models.camera import Camera
from models.renderer.mesh_raster import render_mask
from utils.data.synthetic.flame_files import write_flame_files
from utils.data.synthetic.flame_mesh import eye_centres
from utils.data.synthetic.flame_model import make_flame_model
from utils.data.synthetic.flame_regions import face_mask_ids, face_regions, semantic_regions
from utils.face.regions import _polygon_region


@pytest.fixture(scope="module")
def model():
    return make_flame_model(0)


@pytest.fixture(scope="module")
def flame(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("synthetic_flame")
    write_flame_files(d, model)
    return F.FlameModel.from_data_dir(d)


def _margin(model, name):
    info = model["patches"][name]
    return model["v_template"][info["rings"][info["margin_index"]]], info


def test_eye_openings_are_almond_and_a_few_mm_high(model):
    for name in ("left_eye", "right_eye"):
        m, info = _margin(model, name)
        width, height = np.ptp(m[:, 0]), np.ptp(m[:, 1])
        assert 0.020 < width < 0.030, width  # FLAME's openings are 25-30 mm wide ...
        assert 0.005 < height < 0.010, height  # ... and a few millimetres high
        # almond: the opening pinches to pointed corners (an ellipse would still be 0.44 of its height high at 90%
        # of its half-width)
        x = (m[:, 0] - 0.5 * (m[:, 0].min() + m[:, 0].max())) / (width / 2)
        h_mid = np.ptp(m[np.abs(x) < 0.2, 1])
        for end in (x > 0.9, x < -0.9):
            assert np.ptp(m[end, 1]) < 0.35 * h_mid, (np.ptp(m[end, 1]), h_mid)


def test_eyeballs_set_back_behind_overhanging_lids(model):
    v = model["v_template"]
    for k, name in enumerate(("left_eye", "right_eye")):
        eye = v[model["eyeball_ids"][k]]
        c = np.asarray(model["J_regressor"][3 + k] @ v)[0]  # the eye joint ...
        r = np.linalg.norm(eye - c, axis=1)
        assert np.ptp(r) < 1e-9 and np.allclose(c, eye_centres()[k])  # ... is the eyeball's centre
        r = r.mean()
        m, info = _margin(model, name)
        # the lid margins stand 2-4 mm off the eyeball all around the opening (radially from its centre) ...
        gap = np.linalg.norm(m - c, axis=1) - r
        assert 0.002 <= gap.min() and np.median(gap) <= 0.004, (gap.min(), np.median(gap))
        # ... and the apex of the eyeball lies 2-4 mm behind the margins at the middle of the opening
        mid = m[np.abs(np.sin(info["theta"])) > 0.95]
        setback = mid[:, 2].mean() - eye[:, 2].max()
        assert 0.002 <= setback <= 0.004, setback
        # the lids roll back until they meet the eyeball: no gap to see into the head through
        fold = v[info["rings"][-1]]
        assert np.abs(np.linalg.norm(fold - c, axis=1) - r).max() < 0.001


def _rig_camera(el: float, az: float, size: int = 160) -> Camera:
    el, az = np.radians(el), np.radians(az)
    target = np.array([0.0, 0.09, 0.07])  # the eyes
    eye = target + 0.5 * np.array([np.sin(az) * np.cos(el), np.sin(el), np.cos(az) * np.cos(el)])
    return Camera.look_at(tuple(eye), tuple(target), (0, 1, 0), size, size, fov_y_deg=12.0)


def test_eyeballs_visible_only_through_the_openings(model):
    v, f = model["v_template"], model["f"].astype(np.int64)
    eyeball_faces = (f >= model["num_skin_vertices"]).all(1)
    seen = {}
    for el, az in ((0, 0), (20, 0), (-20, 0), (0, 40), (0, -40), (20, 45), (-20, -45)):
        cam = _rig_camera(el, az)
        vis = render_mask(v, f, cam, paint_faces=eyeball_faces)
        opening = torch.zeros_like(vis)
        for name in ("left_eye", "right_eye"):
            uv, _ = cam.project(torch.as_tensor(_margin(model, name)[0]))
            opening |= _polygon_region(uv.float(), 1.0, cam.width, cam.height)
        assert int(vis.sum()) > 20, (el, az)  # the eyes are seen ...
        assert not bool((vis & ~opening).any()), (el, az)  # ... only through the lid openings
        seen[(el, az)] = int(vis.sum())
    # the lids overhang: seen from above or below they hide more of the eyeballs than from straight ahead
    assert seen[(20, 0)] < seen[(0, 0)] and seen[(-20, 0)] < seen[(0, 0)], seen


def test_lips_meet_and_part_when_the_jaw_opens(flame, model):
    p = F.FlameParams.neutral(2)
    p.jaw[1, 0] = 0.25  # radians about x: FLAME's jaw opening
    lm = flame.landmarks(flame(p))  # rows 43..50: inner lips iBUG 60-67
    upper, lower = lm[:, 43 + 2], lm[:, 43 + 6]  # iBUG 62 and 66, the middle of the lip line
    gap = (upper - lower).norm(dim=-1)
    assert float(gap[0]) < 0.002  # closed at rest ...
    assert float(gap[1]) > 0.010  # ... parted by the jaw
    assert float((upper[1] - upper[0]).norm()) < 0.001  # the upper lip stays
    # the face mask's closing triangles still close the mouth, open or not
    regions = face_regions(model)
    faces = model["f"].astype(np.int64)
    extra = F.mouth_closing_faces(model["v_template"], faces, regions["lips"])
    ids = face_mask_ids(model)
    _, open_f, _ = F.face_mask_submesh(model["v_template"], faces, ids)
    _, closed_f, _ = F.face_mask_submesh(model["v_template"], faces, ids, extra_faces=extra)
    assert len(F.boundary_loops(closed_f)) == len(F.boundary_loops(open_f)) - 1
    mouth_loop = model["patches"]["mouth"]["rings"][-1]
    assert set(np.unique(extra)) == set(mouth_loop.tolist())  # closed where the rolled-in lips end


def test_landmarks_on_lid_and_lip_margins(flame, model):
    lm = flame.landmarks(torch.as_tensor(model["v_template"], dtype=torch.float32)[None])[0].numpy()

    def dist_to_ring(points, ring):
        a, b = ring, np.roll(ring, -1, 0)
        ab = b - a
        t = np.clip(((points[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
        return np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1).min(1)

    for rows, name in ((slice(19, 25), "right_eye"), (slice(25, 31), "left_eye"), (slice(43, 51), "mouth")):
        ring = _margin(model, name)[0]
        assert dist_to_ring(lm[rows], ring).max() < 1e-6, name
    # iBUG order: 36 outer and 39 inner corner of the right eye (-x), 42 inner and 45 outer of the left eye
    assert lm[19, 0] < lm[22, 0] < 0 < lm[25, 0] < lm[28, 0]
    assert lm[20, 1] > lm[24, 1] and lm[26, 1] > lm[30, 1]  # upper-lid points above lower-lid ones


def test_regions_hold_the_new_features(model):
    regions = face_regions(model)
    mask = set(face_mask_ids(model).tolist())
    for name in ("left_eye", "right_eye", "mouth"):
        info = model["patches"][name]
        for ring in info["rings"]:
            assert set(ring.tolist()) <= mask, name  # the whole patch is in the face mask
    assert set(model["patches"]["mouth"]["rings"][-1].tolist()) <= set(regions["lips"].tolist())
    sem = semantic_regions(model)
    keys = ("skin", "hair", "eyes", "brows", "lips", "nose", "lids", "mouth")
    assert (sum(sem[k].astype(int) for k in keys) == 1).all()  # disjoint and complete
