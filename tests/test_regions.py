"""Eye regions (utils/face/regions.py): landmark embedding on the face mask, masks per view, metrics inside them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures import synthetic_root  # noqa: F401  (pytest fixture)
from utils.face.regions import (
    EYE_ROWS,
    _polygon_region,
    embedding_for_flame,
    eye_directions,
    eye_landmark_embedding,
    eye_region_mask,
    eye_region_masks,
    region_metrics,
)
from utils.losses import masked_ssim, psnr, ssim


@pytest.fixture(scope="module")
def face(synthetic_root):
    """FLAME model, mask ids, the embedding and identity 300's posed FLAME vertices and cameras."""
    from models.flame import FlameModel, face_mask_topology
    from utils.data.nersemble import NersembleSubject

    flame = FlameModel.from_data_dir(synthetic_root / "flame")
    mask_ids, _ = face_mask_topology(flame, synthetic_root / "flame")
    subj = NersembleSubject(synthetic_root / "subjects", "300")
    verts = flame(subj.tracking())[0]
    return flame, mask_ids, embedding_for_flame(flame, mask_ids), verts, subj.cameras()


def test_embedding_follows_flame_landmarks(face):
    flame, mask_ids, emb, verts, _ = face
    lm = emb(verts[torch.as_tensor(mask_ids)])
    full = flame.landmarks(verts)
    torch.testing.assert_close(lm[:12], full[list(EYE_ROWS)], atol=1e-6, rtol=0)
    torch.testing.assert_close(lm[12], full[10], atol=1e-6, rtol=0)  # nose bridge (iBUG 27)
    torch.testing.assert_close(lm[13], full[16], atol=1e-6, rtol=0)  # nose base (iBUG 33)
    # works on a batch of face-mask vertex sets too
    assert emb(verts[torch.as_tensor(mask_ids)].expand(3, -1, -1)).shape == (3, 14, 3)


def test_embedding_errors(face):
    flame, mask_ids, _, _, _ = face
    tri = flame.faces[flame.lmk_faces_idx[EYE_ROWS[0]]]
    outside = np.setdiff1d(mask_ids, tri.numpy())  # a mask without the right outer eye corner's triangle
    with pytest.raises(ValueError, match="iBUG \\[36\\]"):
        eye_landmark_embedding(flame.lmk_faces_idx, flame.lmk_bary_coords, flame.faces, outside)
    with pytest.warns(UserWarning, match="no eye-region metrics"):
        assert embedding_for_flame(flame, outside) is None
    with pytest.raises(ValueError, match="expected FLAME's 51"):
        eye_landmark_embedding(flame.lmk_faces_idx[:50], flame.lmk_bary_coords[:50], flame.faces, mask_ids)


def test_polygon_region():
    square = torch.tensor([[2.0, 2.0], [6.0, 2.0], [6.0, 6.0], [2.0, 6.0]])
    m = _polygon_region(square, 0.0, 10, 8)
    assert m.shape == (8, 10) and int(m.sum()) == 16  # pixel centres 2.5..5.5 in x and y
    assert bool(m[2:6, 2:6].all())
    grown = _polygon_region(square, 1.0, 10, 8)
    assert int(grown.sum()) == 36 and bool(grown[1:7, 1:7].all())  # centres 1.5..6.5 lie within 1 px of the square
    tri = _polygon_region(torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 7.0]]), 0.0, 10, 8)
    assert bool(tri[1, 1]) and not bool(tri[6, 8])  # a triangle: inside near its right angle, not across


def test_eye_masks_cover_the_eyes_and_skip_hidden_ones(face, synthetic_root):
    from models.renderer.mesh_raster import render_mask
    from utils.data.nersemble import FRONTAL_SERIAL
    from utils.data.synthetic.flame_model import make_flame_model

    flame, mask_ids, emb, verts, cams = face
    lm = emb(verts[torch.as_tensor(mask_ids)])
    model = make_flame_model(0)
    eyeball = torch.as_tensor((model["f"].astype(np.int64) >= model["num_skin_vertices"]).all(1))
    sizes = {}
    for serial in (FRONTAL_SERIAL, "220700191", "222200040", "222200043", "221501007"):  # front, sides, held-out
        cam = cams[serial].scaled(3.0)  # 192 px: the eyes are a few pixels tall
        m = eye_region_mask(lm, cam)[..., 0] > 0
        seen = render_mask(verts, flame.faces, cam, paint_faces=eyeball)
        assert not bool((seen & ~m).any()), serial  # every visible bit of an eyeball is in the region
        sizes[serial] = int(m.sum())
    front = sizes[FRONTAL_SERIAL]
    eye_w = float((lm[3] - lm[0]).norm())  # about 25 mm: the region is a few eye-widths across, not the face
    assert 0 < front < 0.25 * cams[FRONTAL_SERIAL].scaled(3.0).height ** 2
    assert eye_w > 0.02
    # a profile view (azimuth 60 degrees) sees one eye: its region is about half the frontal one
    assert sizes["221501007"] < 0.8 * front or sizes["222200043"] < 0.8 * front
    # masks of several views, limited to the face masks
    views = list(cams.values())[:3]
    face_masks = torch.zeros(3, views[0].height, views[0].width, 1)
    both = eye_region_masks(lm, views, face_masks)
    assert both.shape == (3, views[0].height, views[0].width, 1) and float(both.sum()) == 0


def _toy_landmarks(corner_depth: float = 0.015) -> torch.Tensor:
    """(14, 3) eye and nose landmarks of a symmetric face looking along +z: eye corners 25 mm apart whose outer
    corners lie ``corner_depth`` behind the inner ones (the synthetic template: 15.5 mm)."""
    eye = []
    for sx in (-1.0, 1.0):  # the subject's right eye (-x) first, each from its image-left corner as iBUG runs
        xs = np.array([44.5, 38, 26, 19.5, 26, 38]) * 1e-3 * sx
        ys = np.array([93, 95.5, 94.5, 91, 88.5, 89.5]) * 1e-3
        zs = 0.085 - corner_depth * (np.abs(xs) - 0.0195) / 0.025
        pts = np.stack([xs, ys, zs], 1)
        eye.append(pts if sx < 0 else pts[[3, 2, 1, 0, 5, 4]])
    nose = np.array([[0.0, 0.085, 0.095], [0.0, 0.055, 0.097]])  # iBUG 27, 33: the up line leans back 4 degrees
    return torch.as_tensor(np.concatenate(eye + [nose]), dtype=torch.float32)


def test_eye_directions_and_side_views():
    """Each eye faces the face's forward direction turned 30 degrees outwards, whatever the slope of its corner line
    (which left a visible far eye out 25 degrees to the side, issue 25); the far eye of a profile view is left out."""
    from models.camera import Camera

    lm = _toy_landmarks()
    d = eye_directions(lm)
    fwd = torch.tensor([0.0, 0.0, 1.0])
    up_tilt = float(torch.nn.functional.normalize(lm[12] - lm[13], dim=0)[2])
    for k, sx in ((0, -1.0), (1, 1.0)):
        assert float(d[k] @ fwd) == pytest.approx(np.cos(np.radians(30)) * np.sqrt(1 - up_tilt ** 2), abs=0.02)
        assert float(d[k, 0]) * sx > 0.45  # turned outwards, towards the eye's own side
    torch.testing.assert_close(eye_directions(_toy_landmarks(0.03)), d, atol=1e-2, rtol=0)  # deeper corners: same
    centre = lm[:12].mean(0).numpy()

    def cam(az: float, el: float) -> Camera:
        a, e = np.radians(az), np.radians(el)
        pos = centre + 0.6 * np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)])
        return Camera.look_at(tuple(pos), tuple(centre), (0, 1, 0), 64, 64, fov_y_deg=15.0)

    def eyes_kept(az: float, el: float, points: torch.Tensor = lm) -> tuple[bool, bool]:
        m = eye_region_mask(points, cam(az, el))[..., 0] > 0
        uv, _ = cam(az, el).project(points[:12])
        return tuple(bool(m[int(p[1]), int(p[0])]) for p in (uv[:6].mean(0), uv[6:].mean(0)))

    assert eyes_kept(0, 0) == (True, True)
    # the camera of the issue (az 25, el 15): both eyes kept, also with corners 50 degrees deep (one identity's right
    # eye on the synthetic data: the corner-line rule had left it out)
    assert eyes_kept(25, 15) == (True, True) and eyes_kept(25, 15, _toy_landmarks(0.03)) == (True, True)
    assert eyes_kept(-40, -5) == (True, True)
    assert eyes_kept(60, 0) == (False, True)  # profile from the left (+x): the right eye is left out ...
    assert eyes_kept(-60, 0) == (True, False)  # ... and the mirror view


def test_region_metrics():
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 32, 40, 3, generator=g)
    pred = gt.clone()
    pred[:, :, :20] += 0.1 * torch.randn(2, 32, 20, 3, generator=g)  # error only on the left half
    left = torch.zeros(2, 32, 40, 1)
    left[:, :, :20] = 1
    right = 1 - left
    p_left, s_left = region_metrics(pred, gt, left)
    p_right, s_right = region_metrics(pred, gt, right)
    torch.testing.assert_close(p_left, psnr(pred[:, :, :20].clamp(0, 1), gt[:, :, :20], reduction="none"))
    assert bool((p_right > 80).all()) or bool(torch.isinf(p_right).all())
    assert bool((s_left < 0.99).all()) and bool((s_right > s_left).all())
    # SSIM over the whole image equals the masked SSIM with a mask that holds every window centre
    full = torch.ones(2, 32, 40, 1)
    torch.testing.assert_close(masked_ssim(pred, gt, full), ssim(pred.clamp(0, 1), gt, reduction="none"),
                               atol=1e-5, rtol=0)
    # an empty region is NaN, not a number that would bias a mean
    p_none, s_none = region_metrics(pred, gt, torch.zeros(2, 32, 40, 1))
    assert bool(torch.isnan(p_none).all()) and bool(torch.isnan(s_none).all())
