"""Face masks of the video path (utils/apps/track/video.py, utils/apps/track/targets.py detected_face_mask): the
projected FLAME face mask intersected with the detector's face outline, as the photo path does; the synthetic path
(--landmarks, no outline) keeps the projected mask alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_fitting import fit_model, single_thread  # noqa: F401
from tests.test_video_avatar import CLIP_FRAMES, FAST, clip  # noqa: F401
from tests.training_fixtures import preprocessed_root  # noqa: F401


def _frame0(root, fit_model):  # noqa: F811
    """(model, FLAME vertices (V, 3), FLAME faces, camera) of frame 0 of the synthetic clip (frontal camera)."""
    from models.flame import FlameModel
    from utils.apps.track.targets import frame_flame
    from utils.data.model_file import load_model
    from utils.data.nersemble import FRONTAL_SERIAL, NersembleSubject

    model = load_model(fit_model, "cpu")
    flame = FlameModel.from_data_dir(root / "flame")
    subj = NersembleSubject(root / "subjects", "017", frame=0)
    cam = subj.cameras(serials=[FRONTAL_SERIAL])[FRONTAL_SERIAL]
    verts, _, _, _ = frame_flame(model, root / "flame", None, params=subj.tracking(), frame=0, flame=flame)
    return model, verts, flame.faces, cam


def test_detected_face_mask_is_within_outline(clip, fit_model):  # noqa: F811
    """The mask is the projected face mask where the outline covers it and empty elsewhere; no (or an empty) outline
    gives the projected mask unchanged."""
    from utils.apps.track.targets import detected_face_mask, polygon_mask, projected_face_mask

    root, _, _ = clip
    model, verts, faces, cam = _frame0(root, fit_model)
    full = projected_face_mask(model, verts, faces, cam)
    assert full.sum() > 50
    assert np.array_equal(detected_face_mask(model, verts, faces, cam, None), full)
    assert np.array_equal(detected_face_mask(model, verts, faces, cam, np.zeros((0, 2))), full)
    ys, xs = np.nonzero(full)
    x_mid = float(np.median(xs))  # an outline over the left half of the face's box
    outline = np.array([[xs.min() - 1, ys.min() - 1], [x_mid, ys.min() - 1], [x_mid, ys.max() + 1],
                        [xs.min() - 1, ys.max() + 1]], np.float32)
    cut = detected_face_mask(model, verts, faces, cam, outline)
    inside = polygon_mask(outline, cam.width, cam.height)
    assert np.array_equal(cut, full * inside)
    assert 0.3 * full.sum() < cut.sum() < 0.8 * full.sum()
    assert cut[:, int(np.ceil(x_mid)) + 1:].sum() == 0  # nothing right of the outline


def test_video_masks_use_detector_outlines(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """Without --landmarks the detector's outlines clip every frame's mask: with outlines over the upper part of the
    face only, the crop (fitted to the masks) is shorter than with the projected masks alone, and metrics.json says
    which masks were used."""
    import json

    import utils.apps.track.video as video
    from track import main
    from utils.face.reenactment import VideoFaces

    root, frames, lm = clip
    pts = np.load(lm)
    # the outline of each frame: the landmarks' box from the brows down to the nose tip (ibug 30)
    outlines = []
    for p in pts:
        x0, y0, x1 = p[:, 0].min() - 2, p[17:27, 1].min() - 40, p[:, 0].max() + 2
        y1 = p[30, 1]
        outlines.append(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32))
    calls = []

    def fake_detector(fr, min_face_px, progress):  # the detector's answer on real footage; these frames are tiny
        calls.append(len(fr))
        return VideoFaces(torch.as_tensor(pts), None, torch.ones(len(fr), dtype=torch.bool), outlines)

    monkeypatch.setattr(video, "detect_video_faces", fake_detector)
    args = ["--checkpoint", str(fit_model), "--frames", str(frames), "--flame_dir", str(root / "flame"), *FAST,
            "--fit.iterations", "10", "--fit.colour_iterations", "0", "--export.turntable", "false"]
    with single_thread():
        a = main([*args, "--out", str(tmp_path / "outline")])
        b = main([*args, "--landmarks", str(lm), "--out", str(tmp_path / "projected")])
    assert calls == [CLIP_FRAMES]  # the detector ran only without --landmarks
    assert "outline" in a["mask"] and "outline" not in b["mask"]
    assert json.loads((tmp_path / "outline" / "metrics.json").read_text())["mask"] == a["mask"]
    assert a["crop"][1] < b["crop"][1], (a["crop"], b["crop"])
    # the fit leaves out where the outline cut the projected mask (plus the 1-pixel ring): more than the ring alone
    na, nb = a["loss_no_data"], b["loss_no_data"]
    assert na["outline_cut"] and na["rim_band_px"] == 1, na
    assert na["fraction_of_crop"] > nb["fraction_of_crop"] > 0, (na, nb)


def test_detect_video_faces_outlines_and_small_faces():
    """The detector's outline of a real portrait surrounds its landmarks; faces under min_face_px are counted with
    their size (the video path's error message says how far the clip is from usable)."""
    import cv2

    from tests.test_landmarks import portraits
    from utils.apps.track.targets import polygon_mask
    from utils.face.reenactment import detect_video_faces

    img = portraits()["grace_hopper"]
    frames = [img, img]
    faces = detect_video_faces(frames, min_face_px=40, progress=False)
    assert faces.found.all() and faces.too_small == 0
    h, w = img.shape[:2]
    for t in range(2):
        assert len(faces.outlines[t]) >= 20
        inside = polygon_mask(faces.outlines[t], w, h)
        nose = faces.points[t, 30].round().long()
        assert inside[int(nose[1]), int(nose[0])] == 1 and 0.05 < inside.mean() < 0.6
    small = [cv2.resize(img, (w // 4, h // 4), interpolation=cv2.INTER_AREA)] * 2
    few = detect_video_faces(small, min_face_px=1000, progress=False)
    assert not few.found.any() and few.too_small == 2 and 20 < few.largest_too_small_px < 1000
    assert all(len(o) == 0 for o in few.outlines)


def test_video_too_small_faces_error(fit_model, tmp_path, capsys):  # noqa: F811
    """A clip whose faces are all under --min_face_px: one line naming the file, the size found and the flag;
    nothing written to --out."""
    from tests.test_landmarks import portraits
    from track import main
    from utils.core.video import write_video

    video = tmp_path / "far.mp4"
    write_video(video, [portraits()["grace_hopper"]] * 3, fps=5)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(fit_model), "--video", str(video), "--min_face_px", "2000", "--out",
              str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "far.mp4" in err and "too small" in err and "--min_face_px=2000" in err, err
    assert not (tmp_path / "o").exists()


def test_no_data_mask_is_the_rim_band_and_the_outline_cut():
    """The no-data pixels of a frame: the ring of rim_band_px just outside the face mask and, with ``cut``, the part
    of the projected FLAME face mask outside the detector's outline; never a pixel of the mask itself."""
    from utils.apps.track.targets import no_data_mask

    proj = np.zeros((20, 20), np.float32)
    proj[4:16, 4:16] = 1.0  # the projected FLAME face mask
    mask = proj.copy()
    mask[:, 11:] = 0.0  # the outline cut the right part away
    assert not no_data_mask(mask, proj, 0, False).any()
    band = no_data_mask(mask, proj, 1, False)
    grown = np.zeros_like(mask)
    grown[3:17, 3:12] = 1.0  # the mask (rows 4-15, cols 4-10) dilated by one pixel (square neighbourhood)
    assert np.array_equal(band, grown - mask)
    both = no_data_mask(mask, proj, 1, True)
    assert np.array_equal(both, np.maximum(grown - mask, proj * (1 - mask)))
    assert both[10, 15] == 1 and both[10, 17] == 0 and (both * mask).sum() == 0  # cut region yes, beyond it no
    assert np.array_equal(no_data_mask(mask, None, 0, True), np.zeros_like(mask))  # no outline: nothing was cut


def test_photometric_ignores_no_data_pixels():
    """photometric(ignore=) gives the no-data pixels neither error nor gradient; elsewhere it is the plain loss."""
    from utils.apps.track.config import FitConfig
    from utils.apps.track.fit import photometric

    g = torch.Generator().manual_seed(0)
    gt = torch.rand(16, 16, 3, generator=g)
    ignore = torch.zeros(16, 16, 1)
    ignore[:, :5] = 1.0
    pred = gt.clone()
    pred[:, :5] = 0.0  # wrong only where there is no data
    pred.requires_grad_(True)
    cfg = FitConfig()
    loss = photometric(pred, gt, cfg, ignore=ignore)
    assert float(loss.detach()) < 1e-6
    assert float(photometric(pred, gt, cfg, None).detach()) > 0.05  # the plain loss sees the black band
    pred2 = (gt + 0.2).clamp(0, 1).requires_grad_(True)
    photometric(pred2, gt, cfg, ignore=ignore).backward()
    assert float(pred2.grad[:, :5].abs().max()) == 0.0 and float(pred2.grad[:, 5:].abs().sum()) > 0
    assert torch.equal(photometric(pred2, gt, cfg, ignore=None), photometric(pred2, gt, cfg, None))


def test_person_masks_separate_the_person_from_the_background():
    """utils.face.masks.person_masks (video_refine.cut_photo's hair / neck vs background): on scikit-image's astronaut
    portrait the face is the person and the image's top-left corner is not; a black frame has no person."""
    pytest.importorskip("mediapipe")
    data = pytest.importorskip("skimage.data")
    from utils.face.masks import person_masks

    img = data.astronaut()  # (512, 512, 3) uint8
    m, empty = person_masks([img, np.zeros((64, 96, 3), np.uint8)])
    assert m.shape == img.shape[:2] and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
    assert m[100:250, 150:300].mean() > 0.7 and m[:60, :60].max() == 0.0
    assert empty.shape == (64, 96) and empty.max() == 0.0


def test_hair_mask_calls_other_chromaticities_hair_and_shadowed_skin_skin():
    """utils.face.masks.hair_mask (video_refine.cut_hair): of the candidate pixels, dark grey hair is hair, skin in
    shadow (half as bright, same chromaticity) is not; no skin to learn from calls nothing hair."""
    from utils.face.masks import hair_mask

    rng = np.random.default_rng(0)
    img = np.empty((20, 30, 3), np.float32)
    img[:] = (0.80, 0.55, 0.45)  # skin
    img[:, 20:25] *= 0.5  # the same skin in shadow (the neck under the chin)
    img[:, 25:] = (0.20, 0.20, 0.23)  # dark grey-blue hair
    img = np.clip(img + rng.normal(0.0, 0.005, img.shape), 0, 1).astype(np.float32)
    skin = np.zeros((20, 30), bool)
    skin[:, :15] = True
    cand = np.zeros((20, 30), np.float32)
    cand[:, 15:] = 1.0
    h = hair_mask(img, skin, cand)
    assert h.shape == (20, 30) and h.dtype == np.float32
    assert h[:, 25:].mean() > 0.95 and h[:, 15:25].mean() < 0.05 and h[:, :15].max() == 0.0  # only candidates
    assert hair_mask((img * 255).astype(np.uint8), skin, cand)[:, 25:].mean() > 0.95  # uint8 frames too
    assert hair_mask(img, np.zeros_like(skin), cand).max() == 0.0
