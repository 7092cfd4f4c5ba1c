"""Face landmarks (utils/face/landmarks.py): mediapipe face mesh -> iBUG-68 on the two public-domain portraits that ship
in packages (scikit-image's astronaut, matplotlib's grace_hopper), the semantics of the derived mapping table, and the
errors for photos that cannot be fitted."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from utils.face.landmarks import (
    IBUG68_FROM_MEDIAPIPE,
    FaceTooSmallError,
    LandmarkDetector,
    NoFaceError,
    draw_landmarks,
    load_landmarks_file,
    mapping_matrix,
    reprojection_error,
)

# iBUG-68 mirror pairs by the annotation's definition (contour 0..16 reversed, brows 17..21 <-> 26..22, nostrils,
# eye corners and lids, lip corners and lids); self-mirrored points map to themselves
_MIRROR = {**{i: 16 - i for i in range(17)}, **{17 + i: 26 - i for i in range(10)}, **{i: i for i in range(27, 31)},
           **{31 + i: 35 - i for i in range(5)},
           36: 45, 37: 44, 38: 43, 39: 42, 40: 47, 41: 46, 42: 39, 43: 38, 44: 37, 45: 36, 46: 41, 47: 40,
           48: 54, 49: 53, 50: 52, 51: 51, 52: 50, 53: 49, 54: 48, 55: 59, 56: 58, 57: 57, 58: 56, 59: 55,
           60: 64, 61: 63, 62: 62, 63: 61, 64: 60, 65: 67, 66: 66, 67: 65}
MIRROR = np.array([_MIRROR[i] for i in range(68)])


def portraits() -> dict[str, np.ndarray]:
    import cv2
    import matplotlib.cbook
    import skimage.data

    grace = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": np.ascontiguousarray(grace[..., ::-1])}


@pytest.fixture(scope="module")
def detector():
    with LandmarkDetector(static_images=True) as det:
        yield det


@pytest.fixture(scope="module")
def detected(detector):
    return {k: (img, detector.detect(img, k)) for k, img in portraits().items()}


def test_table_is_complete_and_normalised():
    assert len(IBUG68_FROM_MEDIAPIPE) == 68
    W = mapping_matrix()
    assert np.allclose(W.sum(1), 1.0) and (W >= 0).all()
    assert all(0 <= j < 468 for entry in IBUG68_FROM_MEDIAPIPE for j, _ in entry)


def test_detector_finds_both_portraits(detected):
    for name, (img, lm) in detected.items():
        h, w = img.shape[:2]
        assert lm.num_faces == 1, name
        assert lm.mesh.shape == (478, 3) and lm.ibug68.shape == (68, 2)
        assert lm.image_size == (w, h)
        assert 90 < lm.face_size < h, (name, lm.face_size)  # astronaut: 106 px, grace_hopper: ~200 px
        assert 40 < lm.inter_ocular < w / 2, (name, lm.inter_ocular)
        assert len(lm.outline) == 36  # mediapipe's face oval, ordered into a loop


def test_ibug_points_are_where_their_names_say(detected):
    """Semantic order on upright frontal portraits (x right, y down; subject's right eye on the image left)."""
    for name, (_, lm) in detected.items():
        p = lm.ibug68
        x, y = p[:, 0], p[:, 1]
        assert x[36] < x[39] < x[42] < x[45], name  # eye corners from image left to right
        assert y[[37, 38]].mean() < y[[40, 41]].mean() and y[[43, 44]].mean() < y[[46, 47]].mean(), name  # lids
        assert y[17:22].mean() < y[36:42].min() and y[22:27].mean() < y[42:48].min(), name  # brows above eyes
        assert x[17] < x[21] < x[22] < x[26], name
        assert y[27] < y[28] < y[29] < y[30], name  # nose bridge downwards to the tip
        assert x[31] < x[33] < x[35], name  # nostrils
        assert y[30] < y[48:68].min(), name  # mouth below the nose tip
        assert x[48] < x[51] < x[54] and x[60] < x[62] < x[64], name  # lip corners and middles
        assert y[51] < y[62] <= y[66] + 1 < y[57] + 1, name  # outer upper lip, inner lips, outer lower lip
        assert np.argmax(y[:17]) in (7, 8, 9), name  # chin is the lowest contour point
        assert (np.diff(x[:17]) > -2).all(), name  # contour runs from image left to image right
        mid = x[[27, 28, 29, 30, 33, 51, 57, 62, 66, 8]]
        assert np.abs(mid - mid.mean()).max() < 0.15 * lm.inter_ocular, name  # the midline points line up


def test_table_is_mirror_symmetric(detector, detected):
    """Mirroring the photo must give the mirrored iBUG points (label i <-> MIRROR[i]): a table that picked a point
    of one side for its mirror partner's role, or an asymmetric pair, fails this."""
    for name, (img, lm) in detected.items():
        w = img.shape[1]
        mir = detector.detect(np.ascontiguousarray(img[:, ::-1]), name + " mirrored")
        back = mir.ibug68[MIRROR].copy()
        back[:, 0] = w - back[:, 0]
        err = np.linalg.norm(back - lm.ibug68, axis=1) / lm.inter_ocular
        assert err[17:].mean() < 0.03 and err.max() < 0.1, (name, err.mean(), err.max(), int(err.argmax()))


def test_several_faces_fit_the_largest(detector):
    import cv2

    imgs = portraits()
    grace = cv2.resize(imgs["grace_hopper"], (409, 480), interpolation=cv2.INTER_AREA)
    canvas = np.full((512, 512 + 409, 3), 255, np.uint8)
    canvas[:, :512] = imgs["astronaut"]  # face about 106 px high
    canvas[:480, 512:] = grace  # face about 160 px high
    with pytest.warns(UserWarning, match="2 faces found; fitting the largest"):
        lm = detector.detect(canvas, "pair.png")
    assert lm.num_faces == 2 and lm.box[0] >= 512  # Grace Hopper's face


def test_small_faces_of_a_group_photo_are_found(detector, detected):
    """A group photo whose faces are 7-14 % of its height: the face mesh's own (short-range) detector finds none;
    the full-range detector on tiles finds both, the largest is fitted and the warning says which one (its size and
    centre) and where the others are.  The crop path's landmarks match the direct ones on a large face."""
    import cv2

    a = portraits()["astronaut"]  # its face: about 106 px high in 512
    canvas = np.full((1200, 1800, 3), 90, np.uint8)
    big = cv2.resize(a, None, fx=1.6, fy=1.6, interpolation=cv2.INTER_AREA)[:700, :700]
    small = cv2.resize(a, None, fx=1.28, fy=1.28, interpolation=cv2.INTER_AREA)[:600, :600]
    canvas[100:800, 100:800] = big
    canvas[400:1000, 1000:1600] = small
    assert not detector._mesh.process(canvas).multi_face_landmarks  # the case of the report: "no face found"
    with pytest.warns(UserWarning, match=r"2 faces found; fitting the largest: \d+ px wide, centred at pixel "
                                         r"\((\d+), (\d+)\) \(others: \d+ px at \(\d+, \d+\)\)") as rec:
        lm = detector.detect(canvas, "group.png")
    assert lm.num_faces == 2 and lm.box[2] < 800 and 0.1 < lm.face_size / 1200 < 0.2  # the larger, left face
    msg = str(rec[0].message)
    cx, cy = (int(v) for v in msg.split("centred at pixel (")[1].split(")")[0].split(", "))
    assert lm.box[0] < cx < lm.box[2] and lm.box[1] < cy < lm.box[3]
    # the same face through the crop path: within half a pixel of the direct mesh on average (106 px face)
    img, direct = detected["astronaut"]
    crop = detector.small_faces(np.ascontiguousarray(img))
    assert len(crop) == 1
    assert np.abs(crop[0][:, :2] - direct.mesh[:, :2]).mean() < 0.02 * direct.face_size


def test_no_face_names_the_file(detector):
    img = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError, match=r"no face found in noise\.png \(256x256 pixels\)"):
        detector.detect(img, "noise.png")


def test_face_too_small_says_size_and_minimum(detected):
    img, lm = detected["astronaut"]
    with LandmarkDetector(min_face_px=lm.face_size + 50) as det:
        with pytest.raises(FaceTooSmallError, match=rf"is {lm.face_size:.0f} pixels high .* minimum is "
                                                    rf"{lm.face_size + 50:.0f}"):
            det.detect(img, "astronaut.png")


def test_landmark_file_and_drawing(tmp_path, detected):
    img, lm = detected["grace_hopper"]
    np.save(tmp_path / "lm.npy", lm.ibug68)
    back = load_landmarks_file(tmp_path / "lm.npy", lm.image_size)
    assert np.allclose(back.ibug68, lm.ibug68)
    np.savetxt(tmp_path / "bad.txt", lm.ibug68[:51])
    with pytest.raises(ValueError, match=r"bad.txt: expected \(68, 2\)"):
        load_landmarks_file(tmp_path / "bad.txt", lm.image_size)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_landmarks_file(tmp_path / "nope.npy", lm.image_size)
    shifted = lm.ibug68 + 2.0
    e = reprojection_error(lm.ibug68, shifted)
    assert e["landmark_error_px"] == pytest.approx(2 * np.sqrt(2)) and e["landmark_error_iod"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pic = draw_landmarks(img, lm.ibug68, shifted, lm.outline)
        crop = draw_landmarks(img, lm.ibug68, shifted, lm.outline, margin=0.1)
    assert pic.dtype == np.uint8 and pic.shape[2] == 3 and pic.std() > 10
    # the crop holds the face (its outline box grown by 10 % of its size per side), drawn with the points in place
    bw, bh = np.ptp(np.concatenate([lm.outline, lm.ibug68]), axis=0) + 0.2 * np.ptp(lm.outline, axis=0).max()
    assert crop.shape[1] / crop.shape[0] == pytest.approx(bw / bh, rel=0.03)
    assert crop.shape[1] / crop.shape[0] != pytest.approx(pic.shape[1] / pic.shape[0], rel=0.03)
    green = (crop[..., 1] > 180) & (crop[..., 0] < 100) & (crop[..., 2] < 100)
    assert green.sum() > 68

    # a scaled copy of the landmarks is the same face in the resized image
    half = lm.scaled(0.5, 0.5)
    assert np.allclose(half.ibug68, lm.ibug68 / 2) and half.face_size == pytest.approx(lm.face_size / 2)
    assert half.image_size == (round(lm.image_size[0] / 2), round(lm.image_size[1] / 2))
