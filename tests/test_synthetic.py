"""Synthetic NeRSemble-format dataset: layout, calibration, geometry consistency, identity diversity, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import SYNTHETIC_KW, synthetic_root  # noqa: F401  (pytest fixture)
from tests.training_fixtures import sequence_root  # noqa: F401  (pytest fixture)
from utils.data.camera_params import load_camera_params
from utils.data.nersemble import FRONTAL_SERIAL, HELDOUT_SERIALS, SERIALS, NersembleSubject, list_subjects
from utils.data.synthetic.dataset import load_ground_truth, make_synthetic_dataset, read_info
from utils.data.synthetic.identity import sample_identity
from utils.data.synthetic.render import render_ground_truth
from utils.data.synthetic.rig import image_size_for, make_rig

SEQ = Path("sequences") / "EXP-1-head"


def _flame(root: Path):
    from models.flame import FlameModel

    return FlameModel.from_data_dir(root / "flame")


def test_info_and_ids(synthetic_root):
    info = read_info(synthetic_root)
    assert info["training_ids"] == ["300", "301"]
    assert info["heldout_ids"] == ["017"]
    assert sorted(info["subjects"]) == list_subjects(synthetic_root / "subjects") == ["017", "300", "301"]
    assert info["seed"] == 0 and info["image_height"] == SYNTHETIC_KW["image_size"]
    assert info["frontal_serial"] == FRONTAL_SERIAL and info["heldout_serials"] == list(HELDOUT_SERIALS)
    for name in ("flame2023.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy",
                 "FLAME_mask_vertexID.npy"):
        assert (synthetic_root / "flame" / name).is_file(), name


def test_layout_and_image_sizes(synthetic_root):
    from PIL import Image

    w, h = image_size_for(SYNTHETIC_KW["image_size"])
    assert (w, h) == (round(64 * 1100 / 1604), 64)
    for sid in ("017", "300", "301"):
        d = synthetic_root / "subjects" / sid
        calib = json.loads((d / "calibration" / "camera_params.json").read_text())
        assert list(calib["world_2_cam"]) == list(SERIALS)
        # calibration is for the "full" frames, twice the images-2x (as 2200x3208 vs 1100x1604 in real data)
        assert (calib["width"], calib["height"]) == (2 * w, 2 * h)
        npz = np.load(d / SEQ / "annotations" / "tracking" / "FLAME2023_v2" / "tracked_flame_params.npz")
        shapes = {"shape": (1, 300), "expression": (1, 100), "rotation": (1, 3), "rotation_matrices": (1, 3, 3),
                  "translation": (1, 3), "jaw": (1, 3), "neck": (1, 3), "eyes": (1, 6), "scale": (1, 1)}
        for key, shape in shapes.items():
            assert npz[key].shape == shape, key
        assert abs(float(npz["scale"][0, 0]) - 1.0) < 0.06
        img_dir = d / SEQ / "timesteps" / "frame_00000" / "images-2x"
        assert sorted(p.name for p in img_dir.iterdir()) == sorted(f"cam_{s}.jpg" for s in SERIALS)
        for s in SERIALS:
            with Image.open(img_dir / f"cam_{s}.jpg") as im:
                assert im.size == (w, h) and im.format == "JPEG"


def test_calibration_ratio_from_images(synthetic_root):
    d = synthetic_root / "subjects" / "300"
    calib_path = d / "calibration" / "camera_params.json"
    full = load_camera_params(calib_path)
    cams = load_camera_params(calib_path, image_dir=d / SEQ / "timesteps" / "frame_00000" / "images-2x")
    w, h = image_size_for(SYNTHETIC_KW["image_size"])
    for s in SERIALS:
        assert (cams[s].width, cams[s].height) == (w, h)
        assert torch.allclose(cams[s].K[:2], 0.5 * full[s].K[:2])
        assert torch.allclose(cams[s].w2c, full[s].w2c)
        # about 1 m from the head, looking at it
        assert 0.9 < float(cams[s].center.norm()) < 1.1
        _, depth = cams[s].project(torch.zeros(1, 3))
        assert float(depth[0]) > 0.8


def test_rig_geometry():
    cams = make_rig(128)
    centres = torch.stack([c.center for c in cams.values()])
    az = torch.rad2deg(torch.atan2(centres[:, 0], centres[:, 2]))
    el = torch.rad2deg(torch.asin(centres[:, 1] / centres.norm(dim=-1)))
    assert float(az.abs().max()) <= 61 and float(az.abs().max()) >= 45  # a frontal arc of about +-60 degrees
    assert len(set(el.round().tolist())) == 3  # three vertical levels
    f = cams[FRONTAL_SERIAL]
    assert abs(float(az[SERIALS.index(FRONTAL_SERIAL)])) < 1e-4 and abs(float(el[SERIALS.index(FRONTAL_SERIAL)])) < 1e-4
    # portrait frames; world up appears upward in the image
    assert f.height > f.width
    uv, _ = f.project(torch.tensor([[0.0, 0.1, 0.0], [0.0, -0.1, 0.0]]))
    assert uv[0, 1] < uv[1, 1]


def test_flame_vertices_land_on_rendered_head(synthetic_root):
    """Tracking + FLAME (world space) projected through the calibration falls on the head in the photos."""
    flame = _flame(synthetic_root)
    subjects = synthetic_root / "subjects"
    for sid in ("017", "300"):
        subj = NersembleSubject(subjects, sid)
        verts = flame(subj.tracking())[0]
        cams = subj.cameras()
        cloud, identity = load_ground_truth(synthetic_root, sid)
        out = render_ground_truth(cloud, list(cams.values()), identity)
        for k, (s, cam) in enumerate(cams.items()):
            uv, depth = cam.project(verts)
            assert bool((depth > 0.5).all())
            px = uv.floor().long()
            inside = (px[:, 0] >= 0) & (px[:, 0] < cam.width) & (px[:, 1] >= 0) & (px[:, 1] < cam.height)
            assert float(inside.float().mean()) > 0.99, f"{sid} {s}: head leaves the frame"
            px = px[inside]
            alpha = out["alpha"][k, px[:, 1], px[:, 0], 0]
            assert float((alpha > 0.5).float().mean()) > 0.97, f"{sid} {s}"
            # the stored photo is that render (JPEG-compressed): the head silhouette differs from the background
            photo = torch.from_numpy(subj.image(s))
            err = (photo - out["image"][k]).abs().mean()
            assert float(err) < 0.03, f"{sid} {s}: stored photo differs from the ground-truth render by {float(err)}"
            rows = np.concatenate([subj.image(s)[:3].reshape(-1, 3), subj.image(s)[-3:].reshape(-1, 3)])
            bg = torch.from_numpy(np.median(rows, 0))
            off_head = (photo - bg).abs().amax(-1)[out["alpha"][k, ..., 0] < 0.01]
            assert float(off_head.mean()) < 0.05  # the background is plain away from the head


def test_frontal_camera_sees_the_face(synthetic_root):
    flame = _flame(synthetic_root)
    for sid in ("300", "301", "017"):
        subj = NersembleSubject(synthetic_root / "subjects", sid)
        cam = subj.cameras()[FRONTAL_SERIAL]
        verts = flame(subj.tracking())
        lmk = flame.landmarks(verts)[0]  # 51 face landmarks (brows, nose, eyes, mouth)
        uv, depth = cam.project(lmk)
        centre = uv.mean(0)
        assert abs(float(centre[0]) - cam.width / 2) < 0.15 * cam.width
        assert abs(float(centre[1]) - cam.height / 2) < 0.15 * cam.height
        # the face is turned towards the camera: landmarks are nearer than the head's centre
        _, d_all = cam.project(verts[0])
        assert float(depth.mean()) < float(d_all.mean())


def test_identities_differ(synthetic_root):
    subjects = synthetic_root / "subjects"
    imgs = {sid: NersembleSubject(subjects, sid).image(FRONTAL_SERIAL) for sid in ("017", "300", "301")}
    ids = list(imgs)
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            diff = np.abs(imgs[ids[i]] - imgs[ids[j]]).mean()
            assert diff > 0.03, f"{ids[i]} vs {ids[j]}: mean difference {diff:.4f}"
    # the ground-truth heads differ in shape and in colour, not only in pose
    c0, _ = load_ground_truth(synthetic_root, "300")
    c1, _ = load_ground_truth(synthetic_root, "301")
    assert float((c0.rgb - c1.rgb).abs().mean()) > 0.03
    t0 = NersembleSubject(subjects, "300").tracking()
    t1 = NersembleSubject(subjects, "301").tracking()
    assert float((t0.shape - t1.shape).abs().max()) > 0.1


def test_heldout_cameras_ground_truth(synthetic_root):
    """render_ground_truth reproduces the stored held-out views (what novel-view evaluation compares against)."""
    subj = NersembleSubject(synthetic_root / "subjects", "017")
    cams = subj.cameras(serials=list(HELDOUT_SERIALS))
    cloud, identity = load_ground_truth(synthetic_root, "017")
    out = render_ground_truth(cloud, list(cams.values()), identity)
    for k, s in enumerate(cams):
        mse = float(((out["image"][k] - torch.from_numpy(subj.image(s))) ** 2).mean())
        assert -10 * np.log10(mse) > 33, s


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_incremental(tmp_path, monkeypatch):
    kw = dict(num_heldout=0, image_size=32, seed=0, progress=False)
    a = make_synthetic_dataset(tmp_path / "a", num_identities=1, **kw)
    first = _tree(a / "subjects" / "300")
    mtimes = {p: p.stat().st_mtime_ns for p in (a / "subjects" / "300").rglob("*")}
    # adding an identity renders only the new one and leaves the first untouched
    make_synthetic_dataset(a, num_identities=2, **kw)
    assert {p: p.stat().st_mtime_ns for p in (a / "subjects" / "300").rglob("*")} == mtimes
    b = make_synthetic_dataset(tmp_path / "b", num_identities=2, **kw)
    assert _tree(a / "subjects") == _tree(b / "subjects")
    assert _tree(a / "flame") == _tree(b / "flame")
    assert _tree(a / "subjects" / "300") == first
    assert read_info(a)["training_ids"] == ["300", "301"]
    # a damaged subject (e.g. an interrupted run) is re-rendered identically
    victim = a / "subjects" / "301" / SEQ / "timesteps" / "frame_00000" / "images-2x" / f"cam_{FRONTAL_SERIAL}.jpg"
    victim.unlink()
    make_synthetic_dataset(a, num_identities=2, **kw)
    assert (a / "synthetic_info.json").is_file() and not (a / ".synthetic_pending.json").exists()
    assert _tree(a / "subjects") == _tree(b / "subjects")
    # an interrupted run: no synthetic_info.json (scripts test for it); the next run resumes and matches
    import utils.data.synthetic.dataset as syn

    real_write = syn.write_subject

    def failing(subject_dir, *args, **kwargs):
        if Path(subject_dir).name.endswith("301"):
            raise KeyboardInterrupt
        return real_write(subject_dir, *args, **kwargs)

    monkeypatch.setattr(syn, "write_subject", failing)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(tmp_path / "d", num_identities=2, **kw)
    assert not (tmp_path / "d" / "synthetic_info.json").exists()
    assert (tmp_path / "d" / ".synthetic_pending.json").exists()
    monkeypatch.setattr(syn, "write_subject", real_write)
    make_synthetic_dataset(tmp_path / "d", num_identities=2, **kw)
    assert _tree(tmp_path / "d" / "subjects") == _tree(b / "subjects")
    assert read_info(tmp_path / "d") == read_info(b)
    # shrinking removes the subjects no longer requested
    make_synthetic_dataset(a, num_identities=1, **kw)
    assert list_subjects(a / "subjects") == ["300"]
    # another dataset seed gives another identity for the same id
    from utils.data.synthetic.flame_model import make_flame_model

    model = make_flame_model(0)
    p3, p4 = (sample_identity(model, seed, "300") for seed in (3, 4))
    assert float((p3.params.shape - p4.params.shape).abs().max()) > 0.1
    assert not np.allclose(p3.appearance["skin"], p4.appearance["skin"])


def test_rerun_is_noop_and_conflicts_raise(synthetic_root, tmp_path):
    files = sorted(p for p in synthetic_root.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    make_synthetic_dataset(synthetic_root, progress=False, **SYNTHETIC_KW)
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic_dataset(synthetic_root, progress=False, **dict(SYNTHETIC_KW, image_size=48))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        make_synthetic_dataset(foreign, num_identities=1, num_heldout=0, image_size=32, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="held-out"):
        make_synthetic_dataset(tmp_path / "x", num_identities=1, num_heldout=9, image_size=32, progress=False)


def test_cli(tmp_path):
    from utils.make_synthetic_dataset import build_parser, main

    help_text = build_parser().format_help()
    for flag in ("--out", "--num_identities", "--num_heldout", "--image_size", "--seed", "--overwrite"):
        assert flag in help_text
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--num_identities", "0", "--num_heldout", "1", "--image_size", "24", "--quiet"]
    assert main(argv) == 0
    assert list_subjects(out / "subjects") == ["017"]
    assert read_info(out)["heldout_ids"] == ["017"] and read_info(out)["training_ids"] == []
    with pytest.raises(SystemExit):
        build_parser().parse_args([])  # --out is required


def test_sequences(synthetic_root, sequence_root):  # noqa: F811
    """--num_frames N: frame 0 and the calibration are byte-identical to the single-frame dataset; frames 1..N-1 hold
    non-neutral expression, jaw, neck and eyes with the identity's shape and placement, rendered from the same
    ground-truth head; the single-frame info carries no num_frames (its files are unchanged)."""
    from tests.training_fixtures import SEQUENCE_FRAMES

    assert read_info(sequence_root)["num_frames"] == SEQUENCE_FRAMES and "num_frames" not in read_info(synthetic_root)
    calib = Path("calibration") / "camera_params.json"
    for sid in ("017", "300", "301"):
        a, b = synthetic_root / "subjects" / sid, sequence_root / "subjects" / sid
        img0 = SEQ / "timesteps" / "frame_00000" / "images-2x"
        assert _tree(a / img0) == _tree(b / img0) and (a / calib).read_bytes() == (b / calib).read_bytes()
        one = NersembleSubject(a.parent, sid).tracking()
        seq = NersembleSubject(b.parent, sid).tracking()
        assert seq.num_frames == SEQUENCE_FRAMES
        assert torch.equal(seq.shape, one.shape)
        for n in ("expression", "rotation_matrix", "translation", "jaw", "neck", "eyes", "scale"):
            assert torch.equal(getattr(seq, n)[:1], getattr(one, n)), n  # frame 0 is the single-frame file's
        for t in range(1, SEQUENCE_FRAMES):
            assert torch.equal(seq.rotation_matrix[t], seq.rotation_matrix[0])
            assert torch.equal(seq.scale[t], seq.scale[0])
            for n in ("expression", "jaw", "neck", "eyes"):
                assert float(getattr(seq, n)[t].abs().max()) > 1e-3, (sid, t, n)
    subj = NersembleSubject(sequence_root / "subjects", "301", frame=SEQUENCE_FRAMES - 1)
    cams = subj.cameras(serials=[FRONTAL_SERIAL, HELDOUT_SERIALS[0]])
    cloud, identity = load_ground_truth(sequence_root, "301", frame=SEQUENCE_FRAMES - 1)
    still, _ = load_ground_truth(sequence_root, "301")
    out = render_ground_truth(cloud, list(cams.values()), identity)["image"]
    neutral = render_ground_truth(still, list(cams.values()), identity)["image"]
    for k, s in enumerate(cams):
        photo = torch.from_numpy(subj.image(s))
        assert -10 * np.log10(float(((out[k] - photo) ** 2).mean())) > 33, s
        assert -10 * np.log10(float(((neutral[k] - photo) ** 2).mean())) < 33, s  # the frame really moved
    with pytest.raises(FileExistsError, match="overwrite"):
        make_synthetic_dataset(sequence_root, progress=False, **SYNTHETIC_KW)  # another number of frames


# ------------------------------------------------------------------ issue 26 class 2: names from data files stay inside
HOSTILE_IDS = ["../../victim", "../victim", "/tmp/victim_abs", "..", ".", "", "a/../../victim", "..\\victim",
               ".hidden", "-rf", 17, None, "sub\x00id"]


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("precious")
    return victim


@pytest.mark.parametrize("where", ["pending", "info"])
@pytest.mark.parametrize("bad", HOSTILE_IDS, ids=repr)
def test_subject_ids_from_dataset_json_never_reach_rmtree(tmp_path, where, bad):
    """A downloaded syn_data/ whose json names ``../../victim`` as a stale subject: refused with one line naming the
    file, before anything is deleted (it used to reach shutil.rmtree)."""
    from utils.data.synthetic.dataset import INFO_NAME, PENDING_NAME, _dataset_key
    from utils.data.synthetic.rig import auto_subdivision

    victim = _victim(tmp_path)
    out = tmp_path / "a" / "b" / "syn"
    (out / "subjects").mkdir(parents=True)
    key = _dataset_key(0, 64, auto_subdivision(64))
    doc = dict({k: v for k, v in key.items() if k != "num_frames"}, subjects=["300", bad], identities={})
    path = out / (PENDING_NAME if where == "pending" else INFO_NAME)
    path.write_text(json.dumps(doc))
    targets = [victim]  # also the folder the id points at, when it lies in this test's folder
    if isinstance(bad, str) and "\x00" not in bad and not bad.startswith("/"):
        target = (out / "subjects" / bad).resolve()
        if target.is_relative_to(tmp_path):
            target.mkdir(parents=True, exist_ok=True)
            (target / "keep.txt").write_text("precious")
            targets.append(target)
    with pytest.raises(ValueError) as ei:
        make_synthetic_dataset(out, num_identities=1, num_heldout=0, image_size=64, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and "subject id" in msg, msg
    assert all((t / "keep.txt").read_text() == "precious" for t in targets)
    assert not Path("/tmp/victim_abs").exists()


@pytest.mark.parametrize("key", ["heldout_ids", "training_ids", "subjects"])
@pytest.mark.parametrize("bad", ["../../victim", "/etc", ".."])
def test_read_info_refuses_unsafe_ids(tmp_path, key, bad):
    from utils.apps.track.pipeline import heldout_subjects

    (tmp_path / "subjects").mkdir()
    doc = {"subjects": ["300"], "training_ids": ["300"], "heldout_ids": ["300"]}
    doc[key] = [bad]
    (tmp_path / "synthetic_info.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="synthetic_info.json: subject id"):
        heldout_subjects(tmp_path)


def test_stale_subject_that_is_a_link_out_is_refused(tmp_path):
    """A safe-looking stale id whose folder is a symlink to elsewhere: refused, the target survives."""
    from utils.data.synthetic.dataset import PENDING_NAME, _dataset_key
    from utils.data.synthetic.rig import auto_subdivision

    victim = _victim(tmp_path)
    out = tmp_path / "syn"
    (out / "subjects").mkdir(parents=True)
    (out / "subjects" / "999").symlink_to(victim, target_is_directory=True)
    key = _dataset_key(0, 64, auto_subdivision(64))
    (out / PENDING_NAME).write_text(json.dumps(dict({k: v for k, v in key.items() if k != "num_frames"},
                                                    subjects=["999"], identities={})))
    with pytest.raises(ValueError, match="resolves outside"):
        make_synthetic_dataset(out, num_identities=1, num_heldout=0, image_size=64, progress=False)
    assert (victim / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("field,bad", [("subject_id", "../301"), ("subject_id", "/tmp"), ("sequence", "../../x"),
                                       ("sequence", ".."), ("serial", "../../../../evil"), ("serial", "/x")])
def test_subject_paths_refuse_unsafe_names(synthetic_root, field, bad):
    from utils.core.names import UnsafeNameError

    root = synthetic_root / "subjects"
    with pytest.raises(UnsafeNameError):
        if field == "serial":
            s = NersembleSubject(root, "300")
            for fn in (s.image_path, s.facemask_path, s.masked_image_path):
                try:
                    fn(bad)
                except UnsafeNameError:
                    continue
                raise AssertionError(f"{fn.__name__} accepted {bad!r}")
            raise UnsafeNameError("all refused")
        NersembleSubject(root, **{"subject_id": "300", field: bad})


def test_head_turn_sequence(synthetic_root, tmp_path):  # noqa: F811
    """--motion head_turn: a held-out identity's frames 1..N-1 turn the whole head (+-35 deg yaw, +-15 deg pitch about
    its centre) on top of the expressions; frame 0 is byte-identical to the single-frame dataset's; every camera's
    image of a turned frame is the ground-truth head posed by the stored tracking (the other cameras: true novel
    views of the frontal camera's monocular video)."""
    from scipy.spatial.transform import Rotation

    from utils.data.synthetic.motion import head_turn_angles
    from utils.make_synthetic_dataset import main

    n = 8
    out = tmp_path / "turn"
    kw = dict(SYNTHETIC_KW, num_identities=0)
    assert main(["--out", str(out), "--num_identities", "0", "--num_heldout", "1", "--image_size",
                 str(kw["image_size"]), "--num_frames", str(n), "--motion", "head_turn", "--quiet"]) == 0
    info = read_info(out)
    assert info["motion"] == "head_turn" and info["num_frames"] == n and "motion" not in read_info(synthetic_root)
    img0 = SEQ / "timesteps" / "frame_00000" / "images-2x"
    assert _tree(synthetic_root / "subjects" / "017" / img0) == _tree(out / "subjects" / "017" / img0)
    seq = NersembleSubject(out / "subjects", "017").tracking()
    assert seq.num_frames == n
    yaws = []
    for t in range(1, n):
        rel = (seq.rotation_matrix[t] @ seq.rotation_matrix[0].T).double().numpy()
        yaw, pitch = head_turn_angles(t, n)
        want = Rotation.from_euler("YXZ", [yaw, pitch, 0.0], degrees=True).as_matrix()
        assert np.abs(rel - want).max() < 1e-4, t
        yaws.append(yaw)
        assert float(seq.expression[t].abs().max()) > 1e-3  # the expressions stay
    assert max(yaws) > 30 and min(yaws) < -30
    assert max(abs(head_turn_angles(t, n)[1]) for t in range(n)) > 12
    t = 2  # yaw ~ +35 degrees: the rendered images are the head posed by the stored tracking, and really turned
    subj = NersembleSubject(out / "subjects", "017", frame=t)
    cams = subj.cameras(serials=[FRONTAL_SERIAL, HELDOUT_SERIALS[0]])
    cloud, identity = load_ground_truth(out, "017", params=seq.frame(t))
    still, _ = load_ground_truth(out, "017", frame=t)  # the same expression without the turn
    got = render_ground_truth(cloud, list(cams.values()), identity)["image"]
    unturned = render_ground_truth(still, list(cams.values()), identity)["image"]
    for k, s in enumerate(cams):
        photo = torch.from_numpy(subj.image(s))
        assert -10 * np.log10(float(((got[k] - photo) ** 2).mean())) > 33, s
        assert -10 * np.log10(float(((unturned[k] - photo) ** 2).mean())) < 25, s
    with pytest.raises(ValueError, match="motion"):
        make_synthetic_dataset(tmp_path / "bad", progress=False, num_frames=2, motion="spin", **kw)


def test_ground_truth_ignores_the_process_wide_render_filter(synthetic_root, monkeypatch):  # noqa: F811
    """load_model sets the renderer's process-wide 2D filter to a Mip-Splatting model's (issue 21); the generator's
    ground truth must stay 3DGS's classic rendering whatever model was loaded before in the same process (a dataset
    generated after a model was loaded used to differ from the same dataset generated fresh)."""
    import models.renderer as R

    subj = NersembleSubject(synthetic_root / "subjects", "300")
    cams = list(subj.cameras(serials=[FRONTAL_SERIAL]).values())
    cloud, identity = load_ground_truth(synthetic_root, "300")
    monkeypatch.setattr(R, "FILTER_2D", None)
    classic = render_ground_truth(cloud, cams, identity)["image"]
    monkeypatch.setattr(R, "FILTER_2D", 0.3)
    assert torch.equal(render_ground_truth(cloud, cams, identity)["image"], classic)
    assert not torch.equal(R.render_batch(cloud, [c.to(cloud.device) for c in cams])["image"],
                           R.render_batch(cloud, [c.to(cloud.device) for c in cams], filter_2d=None)["image"])
