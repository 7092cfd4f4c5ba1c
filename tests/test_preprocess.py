"""Tests of the preprocessing scripts (utils/preprocess/) on a tiny synthetic NeRSemble dataset.

One dataset (2 identities, 64 px high images) is generated per test session; every test that changes files works on
a copy of its subject folders.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training_fixtures import sequence_root  # noqa: F401  (pytest fixture)
from utils.data.nersemble import FRONTAL_SERIAL, NersembleSubject

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "300"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def syn(tmp_path_factory) -> Path:
    """A synthetic dataset: <syn>/flame, <syn>/subjects/{300,301}."""
    from utils.data.synthetic.dataset import make_synthetic_dataset

    out = tmp_path_factory.mktemp("syn_preprocess")
    make_synthetic_dataset(out / "data", num_identities=2, num_heldout=0, image_size=64, progress=False)
    return out / "data"


def copy_dataset(syn: Path, dst: Path) -> tuple[Path, Path]:
    """Copy subjects/ and flame/ (writable) -> (data_root, flame_dir)."""
    shutil.copytree(syn / "subjects", dst / "subjects")
    shutil.copytree(syn / "flame", dst / "flame", ignore=shutil.ignore_patterns(".smplx_cache"))
    return dst / "subjects", dst / "flame"


def flame2ply(data_root, flame_dir, *extra):
    from utils.preprocess import FLAME2PLY

    return FLAME2PLY.run(FLAME2PLY.parse_args(["--data_root", str(data_root), "--flame_dir", str(flame_dir),
                                                "--quiet", *map(str, extra)]))


def projection(data_root, *extra):
    from utils.preprocess import projection_ply

    return projection_ply.run(projection_ply.parse_args(["--data_root", str(data_root), "--quiet",
                                                         "--device", "cpu", *map(str, extra)]))


@pytest.fixture(scope="module")
def prepared(syn, tmp_path_factory):
    """The whole pipeline run once: flamemask_creater, FLAME2PLY (levels 0-3), projection_ply --mask_images."""
    from utils.preprocess import flamemask_creater

    work = tmp_path_factory.mktemp("prepared")
    data_root, flame_dir = copy_dataset(syn, work)
    (flame_dir / "FLAME_mask_vertexID.npy").unlink()
    res = {}
    res["mask"] = flamemask_creater.run(flamemask_creater.parse_args(["--flame_dir", str(flame_dir)]))
    res["ply"] = flame2ply(data_root, flame_dir)
    res["proj"] = projection(data_root, "--mask_images")
    return data_root, flame_dir, res


# ---------------------------------------------------------------------------------------------- CLI
def test_help_of_every_script():
    flags = {
        "FLAME2PLY": ["--data_root", "--subjects", "--subject_id", "--flame_dir", "--sequence", "--frame",
                      "--max_level", "--overwrite"],
        "flamemask_creater": ["--flame_dir", "--regions", "--overwrite"],
        "projection_ply": ["--data_root", "--subject_id", "--facemask", "--blur", "--img_width", "--img_height",
                           "--img_scale", "--mask_images", "--mask_type", "--bg_color", "--overwrite"],
        "insta2nersemble": ["--insta_dir", "--actor", "--out_root", "--subject_id", "--frame", "--img_width",
                            "--img_height", "--overwrite"],
    }
    import importlib

    for script, want in flags.items():
        text = importlib.import_module(f"utils.preprocess.{script}").build_parser().format_help()
        for flag in want:
            assert flag in text, f"{script} --help does not document {flag}"
    # scripts run from the repository root as files (they put the root on sys.path themselves)
    r = subprocess.run([sys.executable, "utils/preprocess/projection_ply.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--mask_images" in r.stdout, r.stderr


# ---------------------------------------------------------------------------------------------- flamemask_creater
def test_flamemask_creater(prepared, syn, tmp_path):
    from models.flame import FACE_MASK_REGIONS, load_pickle_no_chumpy
    from utils.preprocess import flamemask_creater as fc

    _, flame_dir, res = prepared
    npy = flame_dir / "FLAME_mask_vertexID.npy"
    assert res["mask"].written == [npy]
    ids = np.load(npy)
    regions = load_pickle_no_chumpy(flame_dir / "FLAME_masks.pkl")
    union = np.unique(np.concatenate([np.asarray(regions[r]).reshape(-1) for r in FACE_MASK_REGIONS]))
    assert ids.dtype == np.int64 and np.array_equal(ids, union)
    assert np.array_equal(ids, np.unique(np.load(syn / "flame" / "FLAME_mask_vertexID.npy")))
    # idempotent; --regions + --overwrite rewrites
    again = fc.run(fc.parse_args(["--flame_dir", str(flame_dir), "--out", str(tmp_path / "m.npy")]))
    assert again.written and np.array_equal(np.load(tmp_path / "m.npy"), ids)
    skip = fc.run(fc.parse_args(["--flame_dir", str(flame_dir), "--out", str(tmp_path / "m.npy"), "--regions", "nose"]))
    assert skip.written == [] and skip.skipped == [tmp_path / "m.npy"]
    fc.run(fc.parse_args(["--flame_dir", str(flame_dir), "--out", str(tmp_path / "m.npy"), "--regions", "nose",
                          "--overwrite"]))
    assert np.array_equal(np.load(tmp_path / "m.npy"), np.unique(regions["nose"]))
    with pytest.raises(FileNotFoundError, match="FLAME_masks.pkl"):
        fc.run(fc.parse_args(["--flame_dir", str(tmp_path)]))
    with pytest.raises(ValueError, match="no_such_region"):
        fc.run(fc.parse_args(["--flame_dir", str(flame_dir), "--out", str(tmp_path / "x.npy"),
                              "--regions", "no_such_region"]))


# ---------------------------------------------------------------------------------------------- FLAME2PLY
def test_flame2ply_writes_meshes(prepared):
    from models.flame import FlameModel, load_face_mask

    data_root, flame_dir, res = prepared
    assert len(res["ply"].written) == 2 * 6 and not res["ply"].skipped
    flame = FlameModel.from_data_dir(flame_dir)
    mask_ids = load_face_mask(flame_dir)
    for sid in ("300", "301"):
        s = NersembleSubject(data_root, sid)
        v, f = s.flame_mesh()
        assert v.shape == (flame.num_vertices, 3) and np.array_equal(f, flame.faces.numpy())
        params = s.tracking().frame(0)
        with torch.no_grad():
            ref = flame(params)[0].numpy()
        assert np.allclose(v, ref, atol=1e-6)
        assert np.allclose(s.cano2world(), flame.model_to_world(params)[0].numpy(), atol=1e-6)
        v0, f0 = s.facemask_mesh(0)
        assert np.allclose(v0, v[mask_ids])  # vertex order = sorted mask ids
        # every face of the mask mesh is a FLAME face or one of the few mouth-closing faces
        flame_faces = {tuple(sorted(t)) for t in f.tolist()}
        extra = [t for t in mask_ids[f0].tolist() if tuple(sorted(t)) not in flame_faces]
        assert 0 < len(extra) < 0.05 * len(f0)
        prev_v, prev_f = v0, f0
        for level in (1, 2, 3):
            lv, lf = s.facemask_mesh(level)
            assert np.allclose(lv[: len(prev_v)], prev_v)  # prefix property
            assert len(lf) == 4 * len(prev_f)
            prev_v, prev_f = lv, lf


def test_flame2ply_idempotent_and_overwrite(prepared):
    data_root, flame_dir, _ = prepared
    s = NersembleSubject(data_root, SUBJECT)
    before = s.flame_mesh_path.stat().st_mtime_ns
    out = flame2ply(data_root, flame_dir, "--subjects", SUBJECT)
    assert out.written == [] and len(out.skipped) == 6
    assert s.flame_mesh_path.stat().st_mtime_ns == before
    # a deleted output is the only one rewritten
    s.cano2world_path.unlink()
    out = flame2ply(data_root, flame_dir, "--subject_id", SUBJECT)
    assert out.written == [s.cano2world_path] and len(out.skipped) == 5
    out = flame2ply(data_root, flame_dir, "--subjects", SUBJECT, "--overwrite", "--max_level", "1")
    assert len(out.written) == 4 and not out.skipped  # full, level 0, level 1, cano2world


def test_flame2ply_missing_tracking(syn, tmp_path):
    from utils.preprocess import FLAME2PLY

    data_root, flame_dir = copy_dataset(syn, tmp_path)
    s = NersembleSubject(data_root, "301")
    s.tracking_path.unlink()
    with pytest.raises(FileNotFoundError, match="tracked_flame_params.npz"):
        flame2ply(data_root, flame_dir, "--subjects", "301")
    rc = FLAME2PLY.main(["--data_root", str(data_root), "--flame_dir", str(flame_dir), "--subjects", "301",
                         "--quiet"])
    assert rc == 2
    with pytest.raises(FileNotFoundError, match="no FLAME model"):
        flame2ply(data_root, tmp_path / "nothing", "--subjects", SUBJECT)
    with pytest.raises(FileNotFoundError, match="not found under"):
        flame2ply(data_root, flame_dir, "--subjects", "999")


# ---------------------------------------------------------------------------------------------- projection_ply
def test_projection_outputs_and_coverage(prepared, syn):
    from utils.data.synthetic.dataset import load_ground_truth
    from utils.data.synthetic.render import render_ground_truth

    data_root, _, res = prepared
    s = NersembleSubject(data_root, SUBJECT)
    serials = s.serials()
    assert len(res["proj"].written) == 2 * 2 * len(serials)
    cams = s.cameras()
    cloud, _ = load_ground_truth(syn, SUBJECT)
    alpha = render_ground_truth(cloud, list(cams.values()), background=None)["alpha"][..., 0].numpy() > 0.5
    for k, serial in enumerate(serials):
        img = s.image(serial)
        m = s.facemask(serial)[..., 0]
        assert m.shape == img.shape[:2]
        assert set(np.unique(np.round(m * 255)).tolist()) <= {0.0, 255.0}
        mask = m > 0.5
        # the face mask lies on the rendered head and covers a good part of it
        assert (mask & ~alpha[k]).sum() <= 0.02 * mask.sum()
        assert mask.sum() >= 0.2 * alpha[k].sum()
        masked = s.masked_image(serial)  # read from filled_masked_images
        assert s.masked_image_path(serial).is_file()
        assert np.abs(masked - img * m[..., None]).max() < 2.5 / 255
    # the projected centre of the face-mask mesh falls into the frontal mask
    v0, _ = s.facemask_mesh(0)
    cam = cams[FRONTAL_SERIAL]
    uv, _ = cam.project(torch.as_tensor(v0).mean(0, keepdim=True))
    j, i = (int(x) for x in uv[0])
    assert s.facemask(FRONTAL_SERIAL)[i - 1:i + 2, j - 1:j + 2].max() > 0.5


def test_projection_occlusion_head_vs_face(prepared):
    """The face mask is inside the head silhouette; from the back camera-like side views the head hides it."""
    from models.renderer.mesh_raster import render_mask
    from utils.preprocess.projection_ply import load_meshes

    data_root, _, _ = prepared
    s = NersembleSubject(data_root, SUBJECT)
    cam = s.cameras()[FRONTAL_SERIAL]
    v, f, paint = load_meshes(s, "facemask", 0)
    face = render_mask(v, f, cam, paint).numpy()
    hv, hf, none = load_meshes(s, "head", 0)
    assert none is None
    head = render_mask(hv, hf, cam).numpy()
    assert (face & ~head).sum() == 0 and head.sum() > face.sum()
    # seen from behind, the back of the head occludes the whole face mask
    center = torch.as_tensor(hv).mean(0)
    front = cam.center - center
    back_eye = (center - front).tolist()
    from models.camera import Camera

    back = Camera(cam.K, _look_at_w2c(back_eye, center.tolist()), cam.width, cam.height)
    assert render_mask(hv, hf, back).any()  # the head is in view
    assert not render_mask(v, f, back, paint).any()
    fm_v, fm_f = s.facemask_mesh(0)
    assert render_mask(fm_v, fm_f, back).any()  # without the occluder the face mask would paint


def _look_at_w2c(eye, target):
    """OpenCV w2c of a camera at ``eye`` looking at ``target`` with world +y up in the image."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, [0.0, -1.0, 0.0])
    x = -x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = R, -R @ eye
    return w2c


def test_projection_idempotent_overwrite_blur_scale(prepared, tmp_path):
    data_root, _, _ = prepared
    s = NersembleSubject(data_root, SUBJECT)
    n = len(s.serials())
    out = projection(data_root, "--subjects", SUBJECT, "--mask_images")
    assert out.written == [] and len(out.skipped) == 2 * n
    hard = s.facemask(FRONTAL_SERIAL)[..., 0]
    # --overwrite with --blur rewrites the masks (only the masks: no --mask_images) with soft edges
    out = projection(data_root, "--subjects", SUBJECT, "--overwrite", "--blur", "1.5", "--serials", FRONTAL_SERIAL)
    assert out.written == [s.facemask_path(FRONTAL_SERIAL)]
    soft = s.facemask(FRONTAL_SERIAL)[..., 0]
    frac_hard = ((hard > 0.02) & (hard < 0.98)).mean()
    frac_soft = ((soft > 0.02) & (soft < 0.98)).mean()
    assert frac_hard == 0 and frac_soft > 0.01
    assert abs(soft.sum() - hard.sum()) < 0.1 * hard.sum()  # blur moves mass, does not add it
    # white background and half size, into a copy
    root2 = tmp_path / "subjects"
    shutil.copytree(data_root / SUBJECT, root2 / SUBJECT,
                    ignore=shutil.ignore_patterns("flamemask_proj", "filled_masked_images"))
    projection(root2, "--mask_images", "--bg_color", "white", "--img_scale", "0.5", "--serials", FRONTAL_SERIAL)
    s2 = NersembleSubject(root2, SUBJECT)
    import cv2

    m = cv2.imread(str(s2.facemask_path(FRONTAL_SERIAL)), cv2.IMREAD_UNCHANGED)
    w, h = s2.image_size(FRONTAL_SERIAL)
    assert m.dtype == np.uint8 and m.shape == (round(h * 0.5), round(w * 0.5))
    mi = cv2.imread(str(s2.masked_image_path(FRONTAL_SERIAL)))
    assert mi.shape == m.shape + (3,)
    assert (mi[m == 0] == 255).all()
    # explicit size
    projection(root2, "--overwrite", "--img_width", "20", "--img_height", "30", "--serials", FRONTAL_SERIAL)
    assert cv2.imread(str(s2.facemask_path(FRONTAL_SERIAL)), cv2.IMREAD_UNCHANGED).shape == (30, 20)


def test_projection_missing_inputs(prepared, tmp_path):
    from utils.preprocess import projection_ply

    data_root, _, _ = prepared
    root2 = tmp_path / "subjects"
    shutil.copytree(data_root / SUBJECT, root2 / SUBJECT,
                    ignore=shutil.ignore_patterns("flamemask_proj", "filled_masked_images"))
    s = NersembleSubject(root2, SUBJECT)
    s.facemask_mesh_path(0).unlink()
    with pytest.raises(FileNotFoundError, match="_facemask.ply"):
        projection(root2, "--subjects", SUBJECT)
    s.calibration_path.unlink()
    with pytest.raises(FileNotFoundError, match="camera_params.json"):
        projection(root2, "--subjects", SUBJECT)
    assert projection_ply.main(["--data_root", str(root2), "--subjects", SUBJECT, "--quiet"]) == 2


def test_bg_color_and_facemask_parsing():
    import argparse

    from utils.preprocess.projection_ply import parse_bg_color, parse_facemask_level

    assert parse_bg_color("black") == (0.0, 0.0, 0.0)
    assert parse_bg_color("WHITE") == (1.0, 1.0, 1.0)
    assert parse_bg_color("255,0,0") == (1.0, 0.0, 0.0)
    assert parse_bg_color("0.5,0.5,0.5") == (0.5, 0.5, 0.5)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_bg_color("300,0,0")
    assert [parse_facemask_level(x) for x in ("0", "3", "facemask", "facemask_subd", "subd2", "_facemask_subd3")] \
        == [0, 3, 0, 1, 2, 3]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_facemask_level("7")


# ---------------------------------------------------------------------------------------------- insta2nersemble
def _gl_look_at_c2w(eye, target):
    """OpenGL camera-to-world (x right, y up, looking along -z) at ``eye`` towards ``target``, world y up."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross([0.0, 1.0, 0.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, eye
    return c2w


def _gl_project(c2w, fx, fy, cx, cy, p):
    """Pixel (u, v) (v down, from the top-left) of world point p seen by an OpenGL camera."""
    q = np.linalg.inv(c2w) @ np.append(p, 1.0)
    x, y, z = q[:3]
    return np.array([cx + fx * x / -z, cy - fy * y / -z])


def make_fake_insta(root: Path, w=40, h=32) -> dict:
    import cv2

    actor = root / "actor_a"
    (actor / "images").mkdir(parents=True)
    (actor / "flame" / "exp").mkdir(parents=True)
    (actor / "meshes").mkdir()
    c2w = _gl_look_at_c2w([0.15, 0.05, 0.9], [0.0, 0.02, 0.0])
    meta = {"w": w, "h": h, "fl_x": 55.0, "fl_y": 57.0, "cx": 19.0, "cy": 17.5, "frames": []}
    rng = np.random.default_rng(0)
    for i in range(3):
        stem = f"{i:05d}"
        meta["frames"].append({"file_path": f"./images/{stem}.png", "transform_matrix": c2w.tolist(),
                               "mesh_path": f"./meshes/{stem}.obj", "exp_path": f"./flame/exp/{stem}.txt"})
        cv2.imwrite(str(actor / "images" / f"{stem}.png"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        np.savetxt(actor / "flame" / "exp" / f"{stem}.txt", np.full(50, 0.1 * (i + 1)))
    (actor / "transforms_train.json").write_text(json.dumps(meta))
    np.savetxt(actor / "flame" / "shape.txt", np.arange(20) * 0.01)
    return {"actor": actor, "c2w": c2w, "meta": meta}


def test_insta2nersemble(tmp_path):
    from models.flame import load_tracking
    from utils.preprocess import insta2nersemble as i2n

    fake = make_fake_insta(tmp_path / "insta")
    out_root = tmp_path / "out"
    args = ["--insta_dir", str(tmp_path / "insta"), "--actor", "actor_a", "--frame", "2",
            "--out_root", str(out_root), "--subject_id", "900"]
    res = i2n.run(i2n.parse_args(args))
    assert len(res.written) == 3
    s = NersembleSubject(out_root, "900")
    assert s.serials() == [FRONTAL_SERIAL]
    assert s.image_path(FRONTAL_SERIAL).suffix == ".png"
    cam = s.cameras()[FRONTAL_SERIAL]
    assert (cam.width, cam.height) == (40, 32)
    m = fake["meta"]
    rng = np.random.default_rng(1)
    pts = rng.uniform(-0.1, 0.1, (10, 3))
    uv, depth = cam.project(torch.as_tensor(pts, dtype=torch.float32))
    ref = np.stack([_gl_project(fake["c2w"], m["fl_x"], m["fl_y"], m["cx"], m["cy"], p) for p in pts])
    assert (depth > 0).all()
    assert np.allclose(uv.numpy(), ref, atol=1e-3)
    assert np.allclose(cam.center.numpy(), fake["c2w"][:3, 3], atol=1e-5)
    p = load_tracking(s.tracking_path)
    assert np.allclose(p.expression[0, :50].numpy(), 0.3) and (p.expression[0, 50:] == 0).all()
    assert np.allclose(p.shape[0, :20].numpy(), np.arange(20) * 0.01, atol=1e-6) and (p.shape[0, 20:] == 0).all()
    assert np.allclose(p.rotation_matrix[0].numpy(), np.eye(3)) and (p.translation == 0).all()
    assert float(p.scale) == 1.0
    # idempotent
    again = i2n.run(i2n.parse_args(args))
    assert again.written == [] and len(again.skipped) == 3
    # resized copy: intrinsics follow the image
    res = i2n.run(i2n.parse_args(args[:-1] + ["901", "--img_width", "80", "--img_height", "64"]))
    cam2 = NersembleSubject(out_root, "901").cameras()[FRONTAL_SERIAL]
    assert (cam2.width, cam2.height) == (80, 64)
    uv2, _ = cam2.project(torch.as_tensor(pts, dtype=torch.float32))
    assert np.allclose(uv2.numpy(), 2 * ref, atol=2e-3)
    with pytest.raises(ValueError, match="frame 7 not found"):
        i2n.run(i2n.parse_args(args[:5] + ["7"] + args[6:]))
    with pytest.raises(FileNotFoundError, match="actor folder not found"):
        i2n.run(i2n.parse_args(["--insta_dir", str(tmp_path), "--actor", "nobody", "--out_root", str(out_root)]))


@pytest.mark.parametrize("case", ["file_path_up", "file_path_abs", "exp_path_up", "subject_id", "sequence"])
def test_insta2nersemble_refuses_paths_leaving_their_folder(tmp_path, case):
    """Issue 26 class 2: names read from INSTA's transforms (file_path, exp_path) or given as ids stay inside."""
    from utils.core.names import UnsafeNameError
    from utils.preprocess import insta2nersemble as i2n

    fake = make_fake_insta(tmp_path / "insta")
    secret = tmp_path / "s" / "00002.png"
    secret.parent.mkdir()
    secret.write_bytes((fake["actor"] / "images" / "00002.png").read_bytes())
    meta = fake["meta"]
    if case.startswith("file_path") or case.startswith("exp_path"):
        key = case.rsplit("_", 1)[0]
        meta["frames"][2][key] = "../../s/00002.png" if case.endswith("up") else str(secret)
        (fake["actor"] / "transforms_train.json").write_text(json.dumps(meta))
    out_root = tmp_path / "out"
    args = ["--insta_dir", str(tmp_path / "insta"), "--actor", "actor_a", "--frame", "2", "--out_root",
            str(out_root), "--subject_id", "../900" if case == "subject_id" else "900"]
    if case == "sequence":
        args += ["--sequence", "../../x"]
    with pytest.raises(UnsafeNameError):
        i2n.run(i2n.parse_args(args))
    assert not out_root.exists() or not any(out_root.rglob("*.png"))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- sequences
def test_frames_all_preprocesses_every_frame(sequence_root):
    """--frames all (run by the sequence fixture) writes the meshes and masks of every frame from its own tracking
    row; the face mask follows the expression."""
    from models.flame import FlameModel, load_face_mask
    from tests.training_fixtures import SEQUENCE_FRAMES
    from utils.preprocess.common import frames_of
    from utils.preprocess.FLAME2PLY import build_parser

    subjects, flame_dir = sequence_root / "subjects", sequence_root / "flame"
    flame = FlameModel.from_data_dir(flame_dir)
    ids = load_face_mask(flame_dir)
    masks = []
    for t in range(SEQUENCE_FRAMES):
        s = NersembleSubject(subjects, SUBJECT, frame=t)
        v0, _ = s.facemask_mesh(0)
        with torch.no_grad():
            ref = flame(s.frame_params())[0].numpy()[ids]
        assert np.allclose(v0, ref, atol=1e-6)
        assert s.masked_image_path(FRONTAL_SERIAL).is_file()
        masks.append(s.facemask(FRONTAL_SERIAL))
    assert not np.array_equal(masks[0], masks[-1])
    args = build_parser().parse_args(["--data_root", str(subjects), "--frames", "0", "2"])
    assert frames_of(args, NersembleSubject(subjects, SUBJECT)) == [0, 2]
    args = build_parser().parse_args(["--data_root", str(subjects), "--frames", "all"])
    assert frames_of(args, NersembleSubject(subjects, SUBJECT)) == list(range(SEQUENCE_FRAMES))
    with pytest.raises(ValueError, match="--frames"):
        frames_of(build_parser().parse_args(["--data_root", str(subjects), "--frames", "x"]), None)
