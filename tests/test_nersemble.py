"""NeRSemble subject reader (utils/data/nersemble.py) on the synthetic dataset and on hand-made preprocessing
outputs."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from tests.fixtures import synthetic_root  # noqa: F401  (pytest fixture)
from tests.training_fixtures import sequence_root  # noqa: F401  (pytest fixture)
from utils.data.nersemble import (
    DEFAULT_SEQUENCE,
    FRONTAL_SERIAL,
    HELDOUT_IDENTITIES,
    HELDOUT_SERIALS,
    SERIALS,
    NersembleSubject,
    list_subjects,
    load_views,
    read_ply_mesh,
    timestep_name,
)
from utils.data.synthetic.rig import image_size_for

H = 64
W = image_size_for(H)[0]


def test_constants():
    assert len(SERIALS) == 16 and len(set(SERIALS)) == 16
    assert SERIALS[8] == FRONTAL_SERIAL == "222200037"
    assert SERIALS[0] == "222200042" and SERIALS[15] == "221501007"
    assert set(HELDOUT_SERIALS) <= set(SERIALS) and [SERIALS.index(s) for s in HELDOUT_SERIALS] == [3, 6, 11, 15]
    assert HELDOUT_IDENTITIES == ("017", "030", "033", "038", "113", "124", "126", "211")
    assert DEFAULT_SEQUENCE == "EXP-1-head" and timestep_name(0) == "00000"


@pytest.fixture
def subject_copy(synthetic_root, tmp_path) -> NersembleSubject:
    """A private copy of subject 017 (tests may add or delete files)."""
    shutil.copytree(synthetic_root / "subjects" / "017", tmp_path / "017")
    return NersembleSubject(tmp_path, "017")


def test_list_subjects(synthetic_root, tmp_path):
    assert list_subjects(synthetic_root / "subjects") == ["017", "300", "301"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_subjects(tmp_path / "nope")
    (tmp_path / "empty" / "not_a_subject").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="camera_params.json"):
        list_subjects(tmp_path / "empty")


def test_paths(synthetic_root):
    s = NersembleSubject(synthetic_root / "subjects", "300")
    frame = synthetic_root / "subjects" / "300" / "sequences" / "EXP-1-head" / "timesteps" / "frame_00000"
    assert s.frame_dir == frame and s.image_dir == frame / "images-2x"
    assert s.tracking_path.name == "tracked_flame_params.npz" and s.tracking_path.parent.name == "FLAME2023_v2"
    assert s.flame_mesh_path == frame / "00000.ply"
    assert [s.facemask_mesh_path(k).name for k in range(4)] == [
        "00000_facemask.ply", "00000_facemask_subd.ply", "00000_facemask_subd2.ply", "00000_facemask_subd3.ply"]
    assert s.facemask_path(FRONTAL_SERIAL) == frame / "flamemask_proj" / "cam_222200037.png"
    assert s.masked_image_path(FRONTAL_SERIAL) == frame / "filled_masked_images" / "cam_222200037.png"
    assert s.cano2world_path == frame / "flame_cano2world.txt"
    assert NersembleSubject(synthetic_root / "subjects", "300", frame=12).frame_dir.name == "frame_00012"
    with pytest.raises(ValueError):
        s.facemask_mesh_path(4)


def test_cameras_and_images(synthetic_root):
    s = NersembleSubject(synthetic_root / "subjects", "300")
    assert s.serials() == list(SERIALS)
    cams = s.cameras()
    assert list(cams) == list(SERIALS)
    img = s.image(FRONTAL_SERIAL)
    assert img.dtype == np.float32 and img.shape == (H, W, 3) and 0 <= img.min() and img.max() <= 1
    assert (cams[FRONTAL_SERIAL].width, cams[FRONTAL_SERIAL].height) == (W, H)
    half = s.cameras(0.5)
    small = s.image(FRONTAL_SERIAL, 0.5)
    c = half[FRONTAL_SERIAL]
    assert small.shape == (c.height, c.width, 3) == (round(H * 0.5), round(W * 0.5), 3)
    assert np.isclose(c.fx, cams[FRONTAL_SERIAL].fx * c.width / W)
    assert s.cameras(image_scale=0.5)[FRONTAL_SERIAL].width == c.width  # alias of scale
    # BGR -> RGB: the image is the same as PIL's RGB decoding
    from PIL import Image

    with Image.open(s.image_path(FRONTAL_SERIAL)) as im:
        ref = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
    assert np.abs(ref - img).max() < 2 / 255
    sub = s.cameras(serials=[FRONTAL_SERIAL, HELDOUT_SERIALS[0]])
    assert list(sub) == [FRONTAL_SERIAL, HELDOUT_SERIALS[0]]


def test_tracking(synthetic_root):
    from models.flame import FlameParams

    p = NersembleSubject(synthetic_root / "subjects", "301").tracking()
    assert isinstance(p, FlameParams) and tuple(p.shape.shape) == (1, 300) and p.num_frames == 1


def test_load_views(synthetic_root):
    s = NersembleSubject(synthetic_root / "subjects", "300")
    imgs, masks, cams = load_views(s, [FRONTAL_SERIAL, SERIALS[0]], scale=0.5, masks="none")
    h, w = round(H * 0.5), round(W * 0.5)
    assert imgs.shape == (2, h, w, 3) and masks.shape == (2, h, w, 1) and imgs.dtype == torch.float32
    assert bool((masks == 1).all()) and [c.name for c in cams] == [FRONTAL_SERIAL, SERIALS[0]]
    assert (cams[0].width, cams[0].height) == (w, h)
    with pytest.raises(FileNotFoundError, match="flamemask_proj"):
        load_views(s, [FRONTAL_SERIAL])  # no preprocessing outputs in the raw synthetic dataset
    with pytest.raises(ValueError, match="masks"):
        load_views(s, masks="alpha")


def test_missing_files_name_the_file_and_the_script(subject_copy):
    s = subject_copy
    with pytest.raises(FileNotFoundError, match=r"cam_222200037\.png.*projection_ply\.py"):
        s.facemask(FRONTAL_SERIAL)
    with pytest.raises(FileNotFoundError, match=r"filled_masked_images.*projection_ply\.py"):
        s.masked_image(FRONTAL_SERIAL)
    with pytest.raises(FileNotFoundError, match=r"00000_facemask_subd2\.ply.*FLAME2PLY\.py"):
        s.facemask_mesh(2)
    with pytest.raises(FileNotFoundError, match=r"00000\.ply.*FLAME2PLY\.py"):
        s.flame_mesh()
    with pytest.raises(FileNotFoundError, match=r"flame_cano2world\.txt.*FLAME2PLY\.py"):
        s.cano2world()
    (s.image_dir / f"cam_{SERIALS[0]}.jpg").unlink()
    assert SERIALS[0] not in s.serials() and len(s.serials()) == 15
    with pytest.raises(FileNotFoundError, match=rf"cam_{SERIALS[0]}\.jpg"):
        s.image(SERIALS[0])
    s.tracking_path.unlink()
    with pytest.raises(FileNotFoundError, match="tracked_flame_params.npz"):
        s.tracking()
    s.calibration_path.unlink()
    with pytest.raises(FileNotFoundError, match="camera_params.json"):
        s.cameras()
    with pytest.raises(FileNotFoundError, match="subject folder not found"):
        NersembleSubject(s.root, "999")


def test_preprocessing_outputs_are_read(subject_copy):
    """Face masks, masked images, meshes and cano2world as the preprocessing scripts write them."""
    import trimesh

    s = subject_copy
    img = s.image(FRONTAL_SERIAL)
    mask = np.zeros((H, W), np.uint8)
    mask[H // 4 : 3 * H // 4, W // 4 : 3 * W // 4] = 255
    (s.frame_dir / "flamemask_proj").mkdir()
    cv2.imwrite(str(s.facemask_path(FRONTAL_SERIAL)), mask)
    m = s.facemask(FRONTAL_SERIAL)
    assert m.shape == (H, W, 1) and m.dtype == np.float32 and set(np.unique(m)) == {0.0, 1.0}
    # no filled_masked_images: image * mask
    assert np.allclose(s.masked_image(FRONTAL_SERIAL), img * m)
    assert s.facemask(FRONTAL_SERIAL, 0.5).shape == (round(H * 0.5), round(W * 0.5), 1)
    # a mask written at another size is resized to the image's
    half = cv2.resize(mask, (W // 2, H // 2), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(s.facemask_path(FRONTAL_SERIAL)), half)
    assert s.facemask(FRONTAL_SERIAL).shape == (H, W, 1)
    # filled_masked_images wins when present (RGB order kept)
    (s.frame_dir / "filled_masked_images").mkdir()
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 2] = 255  # BGR on disk
    cv2.imwrite(str(s.masked_image_path(FRONTAL_SERIAL)), red)
    mi = s.masked_image(FRONTAL_SERIAL)
    assert mi.shape == (H, W, 3) and np.allclose(mi[..., 0], 1) and np.allclose(mi[..., 1:], 0)
    # load_views with face masks
    imgs, masks, _ = load_views(s, [FRONTAL_SERIAL])
    assert imgs.shape == (1, H, W, 3) and masks.shape == (1, H, W, 1)

    # meshes: vertex order is preserved (no merging of duplicate vertices)
    rng = np.random.default_rng(0)
    verts = rng.normal(size=(50, 3)).astype(np.float32)
    verts[7] = verts[3]  # a duplicate position that process=True would merge
    faces = rng.integers(0, 50, size=(60, 3))
    faces = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])]
    trimesh.Trimesh(verts, faces, process=False).export(s.facemask_mesh_path(1))
    v, f = s.facemask_mesh(1)
    assert v.dtype == np.float32 and f.dtype == np.int64
    assert np.allclose(v, verts) and np.array_equal(f, faces)
    trimesh.Trimesh(verts, faces, process=False).export(s.flame_mesh_path)
    assert np.allclose(s.flame_mesh()[0], verts)
    assert np.allclose(read_ply_mesh(s.flame_mesh_path)[0], verts)

    M = np.eye(4)
    M[:3, 3] = [0.1, 0.2, 0.3]
    np.savetxt(s.cano2world_path, M)
    assert np.allclose(s.cano2world(), M)
    np.savetxt(s.cano2world_path, np.eye(3))
    with pytest.raises(ValueError, match="4x4"):
        s.cano2world()


def test_any_frame_of_a_sequence(sequence_root, tmp_path):  # noqa: F811
    from tests.training_fixtures import SEQUENCE_FRAMES
    from utils.data.nersemble import tracking_frame_ids, tracking_row

    s = NersembleSubject(sequence_root / "subjects", "300", frame=2)
    assert s.frames() == list(range(SEQUENCE_FRAMES)) and s.sequences() == [DEFAULT_SEQUENCE]
    full = s.tracking()
    assert full.num_frames == SEQUENCE_FRAMES
    p = s.frame_params()
    assert p.num_frames == 1 and torch.equal(p.expression, full.expression[2:3]) and torch.equal(p.jaw, full.jaw[2:3])
    assert s.image(FRONTAL_SERIAL).shape == (H, W, 3) and s.masked_image(FRONTAL_SERIAL).shape == (H, W, 3)
    assert not np.array_equal(s.image(FRONTAL_SERIAL), NersembleSubject(s.root, "300").image(FRONTAL_SERIAL))
    # frame numbers of the tracking file: rows are found by them, not by position
    np.savez(tmp_path / "t.npz", frames=np.array([10, 20]), expression=np.zeros((2, 100)))
    assert tracking_row(tmp_path / "t.npz", 20, 2) == 1
    assert tracking_frame_ids(tmp_path / "t.npz", 2).tolist() == [10, 20]
    with pytest.raises(ValueError, match="not tracked"):
        tracking_row(tmp_path / "t.npz", 0, 2)
    np.savez(tmp_path / "u.npz", expression=np.zeros((2, 100)))
    assert tracking_row(tmp_path / "u.npz", 1, 2) == 1 and tracking_frame_ids(tmp_path / "u.npz", 2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="out of range"):
        tracking_row(tmp_path / "u.npz", 2, 2)
