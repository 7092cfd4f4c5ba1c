"""A personal avatar from a monocular video (utils/apps/track/video.py, track.py --frames / --video) on a tiny synthetic
head-turning clip (make_synthetic_dataset --motion head_turn, the frontal camera's frames): the whole command end to
end, held-out frames that never reach the fit, and the fit beating the mean code on them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from tests.fixtures import SYNTHETIC_KW
from tests.test_fitting import fit_model, single_thread  # noqa: F401
from tests.training_fixtures import preprocessed_root  # noqa: F401

CLIP_FRAMES = 12
FAST = ["--progress", "false", "--device", "cpu", "--flame_fit.iterations", "20", "--fit.iterations", "30",
        "--fit.colour_iterations", "10", "--video_refine.iterations", "10", "--video_refine.flame", "true",
        "--export.turntable_frames", "4", "--export.turntable_size", "32"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(dataset root, frames folder, landmarks .npy) of identity 017 turning its head over CLIP_FRAMES frames."""
    from utils.apps.track.video import synthetic_clip
    from utils.data.synthetic.dataset import make_synthetic_dataset

    root = tmp_path_factory.mktemp("turn") / "data"
    kw = dict(SYNTHETIC_KW, num_identities=0, num_heldout=1)
    with single_thread():
        make_synthetic_dataset(root, progress=False, num_frames=CLIP_FRAMES, motion="head_turn", **kw)
        frames, lm = synthetic_clip(root, "017", root.parent / "clip")
    return root, frames, lm


def _run(fit_model, root, frames, lm, out, progress=False, extra: Sequence[str] = ()):  # noqa: F811
    from track import main

    with single_thread():
        return main(["--checkpoint", str(fit_model), "--frames", str(frames), "--landmarks", str(lm),
                     "--flame_dir", str(root / "flame"), "--out", str(out), *FAST, "--progress", str(progress).lower(),
                     *extra])


def test_video_avatar_end_to_end(clip, fit_model, tmp_path):  # noqa: F811
    """Outputs exist and load like any fitted code; the split follows the rule; held-out frames do not influence
    the fit (replacing their images by noise leaves code.pt bit-identical); held-out PSNR beats the mean code's."""
    from utils.data.code_file import load_code
    from utils.data.model_file import load_model

    root, frames, lm = clip
    m = _run(fit_model, root, frames, lm, tmp_path / "a")
    out = tmp_path / "a"
    for name in ("code.pt", "flame_fit.npz", "camera_params.json", "metrics.json", "heldout.mp4", "turntable.mp4"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(tmp_path.glob(".*tmp*")), "the temporary output folder was left behind"
    doc = json.loads((out / "metrics.json").read_text())
    held, train = doc["heldout_frames"], doc["train_frames"]
    assert held == [7, 10, 11] and not set(held) & set(train) and len(held) + len(train) == CLIP_FRAMES
    assert doc["frames_skipped_no_face"] == 0
    # speed is a benchmark's job (benchmarks/video_avatar_synthetic.py), not a timed unit test: only that every
    # phase's time is recorded and the total is their sum
    phases = doc["seconds_per_phase"]
    assert {"track", "targets", "fit_style", "evaluate", "export"} <= set(phases) and min(phases.values()) > 0, phases
    assert abs(sum(phases.values()) - doc["seconds"]) < 1e-3, (phases, doc["seconds"])  # both rounded in the file
    parts = doc["seconds_tracking"]  # the tracking phase's parts add up to it
    assert set(parts) == {"read_frames", "load_model_flame", "landmarks", "flame_camera"}, parts
    assert min(parts.values()) >= 0 and abs(sum(parts.values()) - phases["track"]) < 1e-2, (parts, phases)
    for k in ("psnr_face_heldout", "psnr_face_train", "psnr_face_heldout_mean_code", "ssim_heldout"):
        assert np.isfinite(m[k]), k
    assert m["psnr_face_heldout"] > m["psnr_face_heldout_mean_code"], m
    model = load_model(fit_model, "cpu")
    code = load_code(out / "code.pt", model)
    assert code.colour is not None and code.flame is not None and code.meta["source"] == "video"
    # the refinement: a per-Gaussian residual that changes the render, training frames' FLAME corrected
    assert code.gaussians is not None and code.meta["refine_gaussians"] and code.meta["refine_flame"]
    assert float(code.gaussians.abs().max()) > 1e-4 and m["refine"]["flame_correction"]["rotation_deg_mean"] > 0
    from utils.data.code_file import code_cloud

    with torch.no_grad():
        a = code_cloud(model, code.w, code.base_vertices, code.colour, code.gaussians)
        b = code_cloud(model, code.w, code.base_vertices, code.colour)
    assert (a.means - b.means).abs().max() > 0 and (a.scales - b.scales).abs().max() > 0
    track = np.load(out / "flame_fit.npz")
    assert len(track["expression"]) == CLIP_FRAMES and list(track["frames"]) == list(range(CLIP_FRAMES))
    refined = np.load(out / "flame_refined.npz")
    assert list(refined["frames"]) == list(range(CLIP_FRAMES))
    assert not np.allclose(refined["expression"][train], track["expression"][train])
    # held-out frames never reach the fit: noise in their images changes nothing the fit produces
    noisy = tmp_path / "noisy_frames"
    noisy.mkdir()
    rng = np.random.default_rng(0)
    import cv2

    for p in sorted(frames.iterdir()):
        img = cv2.imread(str(p))
        if int(p.stem.split("_")[1]) in held:
            img = rng.integers(0, 256, img.shape, dtype=np.uint8)
        cv2.imwrite(str(noisy / p.name), img)
    m2 = _run(fit_model, root, noisy, lm, tmp_path / "b", progress=True)  # progress: held-out PSNR is monitored
    a, b = torch.load(out / "code.pt"), torch.load(tmp_path / "b" / "code.pt")
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["colour"], b["colour"])
    assert torch.equal(a["gaussians"], b["gaussians"])
    assert torch.equal(a["flame"]["expression"], b["flame"]["expression"])
    ra, rb = np.load(out / "flame_refined.npz"), np.load(tmp_path / "b" / "flame_refined.npz")
    assert all(np.array_equal(ra[k], rb[k]) for k in ra.files)  # held-out frames' pose too: from neighbours only
    assert len(m2["refine"]["heldout_psnr_history"]) >= 1 and m["refine"]["heldout_psnr_history"] == []
    assert len(m2["heldout_psnr_history"]) >= 1 and m["heldout_psnr_history"] == []
    assert m2["psnr_face_train"] == m["psnr_face_train"] and m2["psnr_face_heldout"] < m["psnr_face_heldout"] - 3


def test_bad_inputs(clip, fit_model, tmp_path):  # noqa: F811
    """One clear line naming the input, nothing written to --out: a zero-length video, no face in any frame, a clip
    too short to hold out frames."""
    from track import main

    root, frames, lm = clip
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(fit_model), "--video", str(empty), "--out", str(tmp_path / "o1"), *FAST])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(fit_model), "--video", str(corrupt), "--out", str(tmp_path / "o1"), *FAST])
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((CLIP_FRAMES, 68, 2), np.nan, np.float32))
    with pytest.raises(SystemExit):
        _run(fit_model, root, frames, nan, tmp_path / "o2")
    short = tmp_path / "short"
    short.mkdir()
    for p in sorted(frames.iterdir())[:1]:
        (short / p.name).write_bytes(p.read_bytes())
    lm1 = tmp_path / "lm1.npy"
    np.save(lm1, np.load(lm)[:1])
    with pytest.raises(SystemExit):
        _run(fit_model, root, short, lm1, tmp_path / "o3")
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_split_frames():
    from utils.apps.track.video import split_frames

    found = np.ones(20, bool)
    found[3] = False
    train, held = split_frames(found, 8, 0.1)
    assert held == [7, 15, 18, 19] and 3 not in train and len(train) == 15
    assert split_frames(found, 0, 0.0)[1] == []


def test_track_help_documents_video_flags():
    from track import build_parser

    text = build_parser().format_help()
    for flag in ("--video", "--frames", "--heldout_every", "--heldout_tail", "--video_batch", "--landmarks",
                 "--ignore_rim_band", "--ignore_cut", "--video_refine.exposure", "--video_refine.exposure_bias",
                 "--video_refine.exposure_extrapolate", "--video_refine.cut_photo",
                 "--video_refine.cut_background", "--video_refine.cut_background_margin",
                 "--video_refine.background_prune", "--video_refine.cut_hair", "--video_refine.cut_hair_threshold",
                 "--video_refine.cut_hair_margin"):
        assert flag in text, flag


def test_synthetic_clip_landmarks_land_on_face(clip):
    """The projected ground-truth landmarks of the clip lie inside the images and move with the head turn."""
    root, frames, lm = clip
    pts = np.load(lm)
    assert pts.shape == (CLIP_FRAMES, 68, 2) and np.isfinite(pts).all()
    img = next(iter(sorted(Path(frames).iterdir())))
    import cv2

    h, w = cv2.imread(str(img)).shape[:2]
    assert (pts[..., 0] > 0).all() and (pts[..., 0] < w).all() and (pts[..., 1] > 0).all() and (pts[..., 1] < h).all()
    nose_x = pts[:, 30, 0]
    assert nose_x.max() - nose_x.min() > 0.1 * w  # the nose tip sweeps sideways with the yaw


def test_video_file_input(clip, fit_model, tmp_path, capsys):  # noqa: F811
    """--video: an MP4 of the clip goes through the same pipeline (frames read with OpenCV); the bad-input line
    names the file."""
    import cv2

    from track import main
    from utils.core.video import write_video

    root, frames, lm = clip
    video = tmp_path / "clip.mp4"
    write_video(video, [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(frames.iterdir())],
                fps=10)
    with single_thread():
        m = main(["--checkpoint", str(fit_model), "--video", str(video), "--landmarks", str(lm), "--flame_dir",
                  str(root / "flame"), "--out", str(tmp_path / "v"), *FAST, "--fit.iterations", "10",
                  "--fit.colour_iterations", "0", "--export.turntable", "false"])
    assert m["frames"] == CLIP_FRAMES and np.isfinite(m["psnr_face_heldout"]) and not m["refine_colour"]
    assert (tmp_path / "v" / "heldout.mp4").is_file() and not (tmp_path / "v" / "turntable.mp4").exists()
    bad = tmp_path / "bad.npy"
    np.save(bad, np.load(lm)[:3])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(fit_model), "--video", str(video), "--landmarks", str(bad), "--flame_dir",
              str(root / "flame"), "--out", str(tmp_path / "w"), *FAST])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "bad.npy" in err and "(12, 68, 2)" in err and "(3, 68, 2)" in err and not (tmp_path / "w").exists()


def test_gaussian_residual_round_trip(fit_model, tmp_path):  # noqa: F811
    """A per-Gaussian residual (position offset, log-scale, opacity) survives code.pt, changes the Gaussians it
    should (not the colour), gives the same Gaussians through the pose path (animate.py, the viewer) as through
    code_cloud, blends like the colour residual; a code.pt of version 4 (no residual) still loads."""
    from models.posing import HeadAnimator
    from utils.data.code_file import FittedCode, code_cloud, load_code, save_code
    from utils.data.model_file import load_model
    from utils.identity import blend_gaussians, load_flame, model_flame_dir

    model = load_model(fit_model)
    f = model.field
    with torch.no_grad():
        w = f.style(f.codes.weight[:1], update_w_avg=False)[0]
    base, flame = model.base_vertices[0], model.identity_flame(0)
    g = 0.3 * torch.randn(f.num_vertices, f.K, 7, generator=torch.Generator().manual_seed(0))
    save_code(tmp_path / "code.pt", FittedCode(w=w, z=None, base_vertices=base, name="x", flame=flame, gaussians=g),
              model, str(fit_model))
    back = load_code(tmp_path / "code.pt", model)
    assert torch.equal(back.gaussians, g)
    with torch.no_grad():
        a, b = code_cloud(model, w, base, None, back.gaussians), code_cloud(model, w, base)
        animator = HeadAnimator.from_model(model, load_flame(model, model_flame_dir(model, "")))
        posed = animator.gaussians(animator.identity(w, flame, base, gaussians=back.gaussians), flame)
    for k in ("means", "scales", "opacities"):
        assert (getattr(a, k) - getattr(b, k)).abs().max() > 1e-3, k
        assert torch.allclose(getattr(posed, k)[0], getattr(a, k), atol=1e-4), k
    assert torch.equal(a.sh, b.sh) and torch.allclose(a.quats, b.quats)
    plain = FittedCode(w=w, z=None, base_vertices=base)
    assert torch.equal(blend_gaussians(back, plain, 0.0), g)
    assert float(blend_gaussians(back, plain, 1.0).abs().max()) == 0
    assert blend_gaussians(plain, plain, 0.5) is None
    doc = torch.load(tmp_path / "code.pt", weights_only=False)
    del doc["gaussians"]
    doc["version"] = 4
    torch.save(doc, tmp_path / "old.pt")
    old = load_code(tmp_path / "old.pt", model)
    assert old.gaussians is None and torch.equal(old.w, w)
    doc["gaussians"] = torch.zeros(3, 7)
    torch.save(doc, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        load_code(tmp_path / "bad.pt", model)


def test_refinement_rejects_heldout_views_and_interpolates_corrections():
    """refine_video takes the training frames' views only; held-out corrections come from neighbours in time."""
    from utils.apps.track.config import FitConfig, VideoRefineConfig
    from utils.apps.track.video_refine import interpolate_corrections, refine_video

    with pytest.raises(ValueError, match="training frames"):
        refine_video(None, torch.zeros(4), None, [0, 1], [2], {}, {0: None, 1: None, 2: None}, FitConfig(),
                     VideoRefineConfig(), 2)
    vals = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    out = interpolate_corrections([0, 2, 6], [1, 4, 9], vals)
    assert torch.allclose(out, torch.tensor([[1.0, 2.0], [3.0, 4.0], [4.0, 5.0]]))


def test_refined_camera_and_dolly_keep_the_head_in_place():
    """The shared camera's correction: refined_camera scales fx, fy and shifts the principal point (in tracked-focal
    units); with the dolly a focal change moves each head to s times its depth, so its image size and place stay
    (without it the head's image grows by s); the held-out frames share the correction (not interpolated)."""
    import math

    from models.flame import FlameParams
    from utils.apps.track.video_refine import _FrameCorrections, refined_camera
    from utils.face.flame_fit import W2C, make_camera

    cam = make_camera(300.0, (200, 100)).cropped(20, 10, 120, 80)
    rc = refined_camera(cam, 1.2, torch.tensor([0.01, -0.02]), 300.0)
    assert torch.allclose(rc.K, torch.tensor([[360.0, 0.0, 80.0 + 3.0], [0.0, 360.0, 40.0 - 6.0], [0, 0, 1]]))
    assert torch.equal(rc.w2c, cam.w2c) and (rc.width, rc.height) == (120, 80)
    # two heads 0.6 / 0.9 m in front of the camera (its z axis is world -z: W2C = diag(1, -1, -1))
    from dataclasses import replace

    p = replace(FlameParams.neutral(2), translation=torch.tensor([[0.02, 0.01, -0.6], [-0.03, 0.0, -0.9]]))
    s = 1.25
    for dolly in (True, False):
        corr = _FrameCorrections(p, 1.0, False, False, False, False, focal=True, w2c=W2C, dolly=dolly)
        with torch.no_grad():
            corr.focal.fill_(math.log(s))
        q = corr.posed()
        cam1 = corr.camera(cam, 300.0)
        offs = torch.tensor([[0.05, 0.0, 0.0], [0.0, 0.05, 0.0]])  # points 5 cm from each head's centre
        for i in range(2):
            c0, _ = cam.project(p.translation[i] + offs)
            c1, _ = cam1.project(q.translation[i] + offs)
            size0, size1 = (c0 - cam.project(p.translation[i])[0]).norm(dim=-1), \
                (c1 - cam1.project(q.translation[i])[0]).norm(dim=-1)
            centre0, centre1 = cam.project(p.translation[i])[0], cam1.project(q.translation[i])[0]
            if dolly:  # same place, size within the perspective of 5 cm
                assert torch.allclose(centre0, centre1, atol=1e-3) and torch.allclose(size0, size1, rtol=1e-3)
            else:
                assert torch.allclose(size1, s * size0, rtol=1e-3)
        assert torch.equal(q.rotation_matrix, p.rotation_matrix)


def test_camera_refinement_gets_gradients_and_moves_the_focal_length():
    """The focal length of a camera built by refined_camera gets a gradient through the torch renderer, and a few
    Adam steps on an image rendered at a 10 % longer focal length move the correction towards it."""
    from models.camera import Camera
    from models.gaussians import GaussianCloud
    from models.renderer import render
    from utils.apps.track.video_refine import refined_camera

    g = torch.Generator().manual_seed(0)
    n = 200
    means = torch.cat([torch.rand(n, 2, generator=g) * 0.2 - 0.1, torch.zeros(n, 1)], 1)
    cloud = GaussianCloud(means=means, quats=torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
                          scales=torch.full((n, 3), 0.006), opacities=torch.full((n,), 0.9),
                          sh=torch.rand(n, 1, 3, generator=g))
    cam = Camera.look_at((0.0, 0.0, 1.0), width=48, height=48, fx=60.0)
    with torch.no_grad():
        target = render(cloud, refined_camera(cam, 1.1, torch.zeros(2), 60.0), backend="torch")["image"]
    logf = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([logf], lr=0.01)
    losses = []
    for _ in range(25):
        img = render(cloud, refined_camera(cam, logf.exp()[0], torch.zeros(2), 60.0), backend="torch")["image"]
        loss = (img - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        assert logf.grad is not None and float(logf.grad.abs()) > 0
        opt.step()
        losses.append(float(loss.detach()))
    moved = float(logf.detach())
    assert 0.03 < moved < 0.2 and losses[-1] < 0.5 * losses[0], (moved, losses[0], losses[-1])


def test_camera_refinement_end_to_end_ignores_heldout_frames(clip, fit_model, tmp_path):  # noqa: F811
    """--video_refine.camera_focal / camera_principal: the refined camera lands in metrics.json and
    camera_params.json, and noise in the held-out frames leaves it (and code.pt) bit-identical."""
    import cv2

    root, frames, lm = clip
    cam_flags = ["--video_refine.camera_focal", "true", "--video_refine.camera_principal", "true",
                 "--video_refine.camera_lr", "0.01", "--backend", "torch"]
    from track import main

    def run(frames_dir, out):
        with single_thread():
            return main(["--checkpoint", str(fit_model), "--frames", str(frames_dir), "--landmarks", str(lm),
                         "--flame_dir", str(root / "flame"), "--out", str(out), *FAST, *cam_flags])

    m = run(frames, tmp_path / "a")
    rc = m["refine"]["camera"]
    assert m["refine"]["camera_focal"] and rc["dolly"] and rc["focal_px"] != rc["tracked_focal_px"]
    assert any(abs(x) > 0 for x in rc["principal_shift_px"]) and np.isfinite(m["psnr_face_heldout"])
    cp = json.loads((tmp_path / "a" / "camera_params.json").read_text())
    K = np.asarray(cp["intrinsics"]["video"] if isinstance(cp["intrinsics"], dict) else cp["intrinsics"])
    assert abs(K[0, 0] - rc["focal_px"]) < 1e-3 * rc["focal_px"], (K, rc)
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(1)
    for p in sorted(frames.iterdir()):
        img = cv2.imread(str(p))
        if int(p.stem.split("_")[1]) in m["heldout_frames"]:
            img = rng.integers(0, 256, img.shape, dtype=np.uint8)
        cv2.imwrite(str(noisy / p.name), img)
    m2 = run(noisy, tmp_path / "b")
    assert m2["refine"]["camera"] == rc
    a, b = torch.load(tmp_path / "a" / "code.pt"), torch.load(tmp_path / "b" / "code.pt")
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["gaussians"], b["gaussians"])


def _gained_clip(frames: Path, out: Path, log_gain: np.ndarray, noise_frames: Sequence[int] = ()) -> Path:
    """A copy of the clip's frames, frame t's RGB multiplied by exp(log_gain[t]) (T, 3) (a camera's exposure /
    white balance changing per frame); the frames in ``noise_frames`` replaced by noise."""
    import cv2

    out.mkdir()
    rng = np.random.default_rng(2)
    for p in sorted(frames.iterdir()):
        t = int(p.stem.split("_")[1])
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB).astype(np.float64)
        img = np.clip(rgb * np.exp(log_gain[t]), 0, 255).round().astype(np.uint8)
        if t in noise_frames:
            img = rng.integers(0, 256, img.shape, dtype=np.uint8)
        cv2.imwrite(str(out / p.name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return out


def test_exposure_is_fitted_on_training_frames_and_interpolated_for_heldout(clip, fit_model, tmp_path):  # noqa: F811
    """--video_refine.exposure on a clip whose frames got a known per-frame RGB gain: the fitted gains of the training
    frames follow it (zero-mean log gains: the clip's mean exposure is the avatar's colour), the held-out frames' are
    the training frames' interpolated linearly in frame number (the tail: the clip's mean, gain 1), noise in the
    held-out frames changes no fitted value, and code.pt keeps them in meta only."""
    from track import main

    root, frames, lm = clip
    t = np.arange(CLIP_FRAMES)
    # +-10 % alternating from frame to frame (unlike the head turn's slow shading), colour-dependent
    known = 0.1 * np.where(t % 2 == 0, 1.0, -1.0)[:, None] * np.array([1.0, 0.5, -0.5])[None]
    # the default pull towards gain 1 (exposure_prior 1e-4) shrinks them by about 5 % here (1e-3: to about 2/3)
    flags = ["--video_refine.exposure_lr", "0.03", "--video_refine.iterations", "40", "--video_refine.flame", "false"]

    def run(frames_dir, out):
        with single_thread():
            return main(["--checkpoint", str(fit_model), "--frames", str(frames_dir), "--landmarks", str(lm),
                         "--flame_dir", str(root / "flame"), "--out", str(out), *FAST, *flags,
                         "--export.turntable", "false"])

    m = run(_gained_clip(frames, tmp_path / "gained", known), tmp_path / "a")
    held, train = m["heldout_frames"], m["train_frames"]
    ex = m["exposure"]
    assert m["refine"]["exposure"] and m["heldout_exposure"].startswith("interpolated")
    assert {k: v["source"] for k, v in ex.items()} == {str(k): "fitted" if k in train else "interpolated"
                                                        for k in range(CLIP_FRAMES)}
    fitted = np.log(np.array([ex[str(k)]["gain"] for k in train]))
    assert np.allclose(fitted.mean(0), 0, atol=1e-4)  # the gauge: zero mean over the training frames
    want = known[train] - known[train].mean(0)
    slope = float((fitted * want).sum() / (want * want).sum())  # 1: the known gains recovered at full size
    corr = float(np.corrcoef(fitted.ravel(), want.ravel())[0, 1])
    assert 0.8 < slope < 1.2 and corr > 0.85 and np.abs(fitted - want).max() < 0.07, (slope, corr, fitted, want)
    assert all(v["bias"] == [0.0, 0.0, 0.0] for v in ex.values())  # no offset without --video_refine.exposure_bias
    # held-out frames: the training frames' log gains interpolated in frame number; past the last training frame
    # (frames 10, 11) the clip's mean exposure (gain 1, --video_refine.exposure_extrapolate mean)
    interp = np.stack([np.interp(held, train, fitted[:, c]) for c in range(3)], 1)
    interp[np.asarray(held) > max(train)] = 0.0
    assert held == [7, 10, 11] and np.abs(interp[0]).max() > 0.02  # frame 7 lies between 6 and 8: not gain 1
    assert np.allclose(np.log(np.array([ex[str(k)]["gain"] for k in held])), interp, atol=1e-4)
    # the fitted exposure explains the training frames better than none
    assert m["psnr_face_train"] > m["psnr_face_train_no_exposure"]
    assert np.isfinite(m["psnr_face_heldout_no_exposure"]) and np.isfinite(m["ssim_face_heldout_no_exposure"])
    code = torch.load(tmp_path / "a" / "code.pt", weights_only=False)
    assert code["meta"]["exposure"] == ex
    # the held-out frames' own pixels are never read: noise there leaves every fitted value bit-identical
    m2 = run(_gained_clip(frames, tmp_path / "noisy", known, held), tmp_path / "b")
    assert m2["exposure"] == ex and m2["psnr_face_train"] == m["psnr_face_train"]
    code2 = torch.load(tmp_path / "b" / "code.pt", weights_only=False)
    assert torch.equal(code["w"], code2["w"]) and torch.equal(code["colour"], code2["colour"])


def test_apply_exposure_acts_inside_the_mask_only():
    from utils.apps.track.video_refine import apply_exposure

    img = torch.full((2, 4, 5, 3), 0.5)
    mask = torch.zeros(2, 4, 5, 1)
    mask[:, 1:3, 1:4] = 1
    gain, bias = torch.tensor([[1.2, 1.0, 0.8], [1.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.1, 0.0], [0.05, 0, 0]])
    out = apply_exposure(img, mask, gain, bias)
    assert torch.allclose(out[0, 2, 2], torch.tensor([0.6, 0.6, 0.4])) and torch.allclose(out[1, 1, 1, 0],
                                                                                          torch.tensor(0.55))
    assert torch.equal(out[:, 0], img[:, 0]) and torch.equal(out[:, :, 0], img[:, :, 0])


def test_coverage_term_pulls_the_training_frames_alpha_to_their_masks(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """--video_refine.alpha_weight (default 5): off (0), the coverage term is never computed; on, every step scores
    the batch's rendered alpha (B, h, w, 1) against its training frames' face masks, leaving the no-data pixels out
    (and with --video_refine.alpha_outside false everything outside the masks), and the refinement lowers it."""
    import utils.apps.track.video_refine as vr
    from track import main

    root, frames, lm = clip
    seen: list[tuple[int, float, bool]] = []
    coverage = vr.coverage_loss

    def spy(alpha, mask, ignore=None):
        out = coverage(alpha, mask, ignore)
        assert alpha.shape == mask.shape and alpha.shape[-1] == 1 and alpha.requires_grad
        assert ignore is not None and ignore.shape == mask.shape and bool((ignore * mask).sum() == 0)
        seen.append((alpha.shape[0], float(out.detach()), bool((ignore >= 1 - mask).all())))
        return out
    monkeypatch.setattr(vr, "coverage_loss", spy)

    def run(out, *flags):
        with single_thread():
            return main(["--checkpoint", str(fit_model), "--frames", str(frames), "--landmarks", str(lm),
                         "--flame_dir", str(root / "flame"), "--out", str(out), *FAST, "--video_refine.iterations",
                         "20", "--export.turntable", "false", *flags])

    m0 = run(tmp_path / "a", "--video_refine.alpha_weight", "0")
    assert not seen and m0["refine"]["alpha_weight"] == 0.0
    m1 = run(tmp_path / "b", "--video_refine.alpha_weight", "20")
    assert len(seen) == 20 and m1["refine"]["alpha_weight"] == 20.0 and m1["refine"]["alpha_outside"]
    assert seen[0][0] == 4 and not any(s[2] for s in seen)  # --video_batch frames; outside the mask: scored
    first, last = seen[0][1], np.mean([s[1] for s in seen[-4:]])
    assert last < first, (first, [s[1] for s in seen])
    seen.clear()
    m2 = run(tmp_path / "c", "--video_refine.alpha_weight", "20", "--video_refine.alpha_outside", "false",
             "--video_refine.iterations", "4")
    assert len(seen) == 4 and all(s[2] for s in seen) and not m2["refine"]["alpha_outside"]


def test_gaussian_colour_residual_changes_each_gaussians_colour_only(fit_model):  # noqa: F811
    """colour_residual: a per-Gaussian RGB residual (V, K, 3) becomes a residual of every raw channel that adds
    exactly that RGB to each Gaussian's colour (0.5 + SH_C0 * DC) and leaves positions, scales, opacities alone."""
    from models.gaussians import SH_C0
    from utils.apps.track.video_refine import colour_residual
    from utils.data.code_file import code_cloud
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    f = model.field
    with torch.no_grad():
        w = f.style(f.codes.weight[:1], update_w_avg=False)[0]
        rgb = 0.1 * torch.randn(f.num_vertices, f.K, 3, generator=torch.Generator().manual_seed(0))
        res = colour_residual(rgb, f.channels)
        assert res.shape == (f.num_vertices, f.K, f.channels)
        a, b = code_cloud(model, w, model.base_vertices[0], None, res), code_cloud(model, w, model.base_vertices[0])
    assert torch.allclose(SH_C0 * (a.sh[:, 0] - b.sh[:, 0]), rgb.reshape(-1, 3), atol=1e-5)
    for k in ("means", "scales", "opacities", "quats"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_gaussian_colour_refinement_end_to_end(clip, fit_model, tmp_path):  # noqa: F811
    """--video_refine.gaussian_colour (default on): code.pt stores a residual of every raw channel whose SH DC part is
    not zero (the per-Gaussian colour was fitted), metrics.json records the option and the residual's size; off: the
    7-channel residual as before."""
    from utils.data.code_file import load_code
    from utils.data.model_file import load_model

    root, frames, lm = clip
    model = load_model(fit_model)
    C = model.field.channels
    m = _run(fit_model, root, frames, lm, tmp_path / "a", extra=["--export.turntable", "false"])  # the default
    code = load_code(tmp_path / "a" / "code.pt", model)
    assert code.gaussians.shape == (model.field.num_vertices, model.field.K, C)
    assert float(code.gaussians[..., 3:6].abs().max()) > 0 and m["refine"]["gaussian_colour"]
    assert m["refine"]["flame_correction"]["gaussian_colour_rms"] > 0
    m0 = _run(fit_model, root, frames, lm, tmp_path / "b", extra=["--video_refine.gaussian_colour", "false",
                                                                  "--export.turntable", "false"])
    assert load_code(tmp_path / "b" / "code.pt", model).gaussians.shape[-1] == 7 and not m0["refine"]["gaussian_colour"]


def test_gaussian_boundary_rings_hold_the_residual_at_zero_on_the_rim(clip, fit_model, tmp_path):  # noqa: F811
    """--video_refine.gaussian_boundary_rings R: the per-Gaussian position / log-scale / opacity residual is exactly
    zero on the subdivided mesh's open boundary and the R - 1 rings inside it, and still fitted elsewhere (0: the
    rim's residual is fitted like any other)."""
    from utils.apps.track.fit import boundary_rings
    from utils.data.code_file import load_code
    from utils.data.model_file import load_model

    root, frames, lm = clip
    model = load_model(fit_model)
    f = model.field
    rim = boundary_rings(f.num_vertices, f.faces.cpu().numpy(), 2)
    extra = ["--export.turntable", "false", "--video_refine.gaussian_colour", "false"]
    _run(fit_model, root, frames, lm, tmp_path / "a", extra=[*extra, "--video_refine.gaussian_boundary_rings", "2"])
    g = load_code(tmp_path / "a" / "code.pt", model).gaussians  # (V, K, 7): no per-Gaussian colour
    assert g.shape[-1] == 7
    assert float(g[rim].abs().max()) == 0.0 and float(g[~rim].abs().max()) > 0
    _run(fit_model, root, frames, lm, tmp_path / "b", extra=extra)
    assert float(load_code(tmp_path / "b" / "code.pt", model).gaussians[rim].abs().max()) > 0


def test_clip_sampling_rate_is_the_finer_of_the_models_and_the_clips():
    """--video_filter_3d clip: per vertex the larger of the model's rate and the clip's frames' (fx / depth);
    vertices no frame sees keep the model's rate."""
    from types import SimpleNamespace

    from utils.apps.track.video import clip_sampling_rate
    from utils.face.flame_fit import make_camera

    # the fitted camera looks down the world's -z axis from the origin: depth = -z
    verts = torch.tensor([[0.0, 0.0, -1.0], [0.01, 0.0, -1.0], [5.0, 0.0, -1.0]])  # the third: outside the frame
    field = SimpleNamespace(sampling_rate=torch.tensor([500.0, 2000.0, 500.0]), filter_variance=torch.ones(3))
    model = SimpleNamespace(field=field, vertices=lambda b: b)
    cams = [make_camera(1000.0, (200, 200)), make_camera(800.0, (200, 200))]
    rate = clip_sampling_rate(model, [verts, verts * 2.0], cams)  # the second frame: twice as far, shorter focal
    assert torch.allclose(rate, torch.tensor([1000.0, 2000.0, 500.0]))
    assert clip_sampling_rate(SimpleNamespace(field=SimpleNamespace(sampling_rate=None, filter_variance=None),
                                              vertices=lambda b: b), [verts], cams[:1]) is None


def test_clip_sampling_rate_foreshortening_keeps_the_models_rate_at_grazing_angles():
    """--video_filter_3d_foreshortening: a frame's rate counts times |cos| of its view angle, so a face the clip only
    sees edge-on keeps the model's rate (without it: the clip's full rate), a face seen head-on the clip's."""
    from types import SimpleNamespace

    from utils.apps.track.video import clip_sampling_rate
    from utils.face.flame_fit import make_camera

    # the camera at the origin looks down -z; triangle 0-2 faces it, triangle 3-5 is edge-on (normal along x)
    verts = torch.tensor([[0.0, 0.0, -1.0], [0.01, 0.0, -1.0], [0.0, 0.01, -1.0],
                          [0.1, 0.0, -1.0], [0.1, 0.01, -1.0], [0.1, 0.0, -1.01]])
    field = SimpleNamespace(sampling_rate=torch.full((6,), 100.0), filter_variance=torch.ones(6),
                            faces=torch.tensor([[0, 1, 2], [3, 4, 5]]))
    model = SimpleNamespace(field=field, vertices=lambda b: b)
    cams = [make_camera(1000.0, (200, 200))]
    plain = clip_sampling_rate(model, [verts], cams)
    fs = clip_sampling_rate(model, [verts], cams, foreshortening=True)
    assert float(plain[3:].min()) > 900  # fx / depth, whatever the angle
    assert torch.equal(fs[3:], torch.full((3,), 100.0))  # |cos| ~ 0.1: the model's rate wins
    assert float(fs[:3].min()) > 990 and torch.allclose(fs[:3], plain[:3], rtol=1e-3)
    # boundary_rings: every vertex of these two triangles is on the open boundary -> the model's rate everywhere
    assert torch.equal(clip_sampling_rate(model, [verts], cams, boundary_rings=1), field.sampling_rate)


def test_video_filter_3d_clip_end_to_end(clip, fit_model, tmp_path, capsys):  # noqa: F811
    """--video_filter_3d clip: code.pt carries the merged rate (never below the model's), metrics.json says so,
    code_filter applies it for a block and gives the model's back, resolve_key (animate.py, interpolate.py, the
    viewer) sets it on the model and lowers its 3D filter; the code.pt survives load_code; an unknown mode is refused
    with one line naming the option."""
    from utils.data.code_file import code_filter, load_code
    from utils.data.model_file import load_model
    from utils.identity import resolve_key

    root, frames, lm = clip
    model = load_model(fit_model)
    assert model.field.sampling_rate is not None, "the test model has no 3D filter: nothing to test"
    base_rate, base_var = model.field.sampling_rate.clone(), model.field.filter_variance.clone()
    m = _run(fit_model, root, frames, lm, tmp_path / "a", extra=["--video_filter_3d", "clip",
                                                                 "--export.turntable", "false"])
    assert m["filter_3d"]["mode"] == "clip" and 0 < m["filter_3d"]["sigma_ratio_median"] <= 1
    code = load_code(tmp_path / "a" / "code.pt", model)
    assert code.sampling_rate is not None and bool((code.sampling_rate >= base_rate).all())
    assert bool((code.sampling_rate > base_rate).any()), "the clip's frames should be finer somewhere"
    with code_filter(model, code):
        assert torch.equal(model.field.sampling_rate, code.sampling_rate)
    assert torch.equal(model.field.sampling_rate, base_rate) and torch.equal(model.field.filter_variance, base_var)
    resolve_key(model, str(tmp_path / "a" / "code.pt"), torch.device("cpu"))
    assert torch.equal(model.field.sampling_rate, code.sampling_rate)
    assert bool((model.field.filter_variance <= base_var + 1e-12).all())
    m0 = _run(fit_model, root, frames, lm, tmp_path / "b", extra=["--video_filter_3d", "model",
                                                                  "--export.turntable", "false"])
    assert m0["filter_3d"] == {"mode": "model", "sigma_ratio_median": None}
    assert load_code(tmp_path / "b" / "code.pt", model).sampling_rate is None
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _run(fit_model, root, frames, lm, tmp_path / "c", extra=["--video_filter_3d", "bogus"])
    assert "--video_filter_3d must be one of" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_highpass_ratio_scores_blur_below_the_photo():
    """highpass_ratio: 1 for the photo itself, lower the more the render is blurred, NaN without an interior."""
    from utils.apps.track.video import highpass_ratio

    g = torch.Generator().manual_seed(0)
    photo = torch.rand(40, 40, 3, generator=g)
    mask = torch.zeros(40, 40, 1)
    mask[5:35, 5:35] = 1.0
    k = torch.ones(1, 1, 3, 3) / 9.0
    blurred = torch.nn.functional.conv2d(photo.permute(2, 0, 1)[:, None], k, padding=1)[:, 0].permute(1, 2, 0)
    twice = torch.nn.functional.conv2d(blurred.permute(2, 0, 1)[:, None], k, padding=1)[:, 0].permute(1, 2, 0)
    assert highpass_ratio(photo, photo, mask) == pytest.approx(1.0)
    assert 0 < highpass_ratio(twice, photo, mask) < highpass_ratio(blurred, photo, mask) < 0.5
    assert np.isnan(highpass_ratio(photo, photo, torch.zeros(40, 40, 1)))


def _track_off_and_on(clip, fit_model, tmp_path, seen: list, flag: str, *extra: str) -> tuple[list, list]:
    """Two 2-iteration video fits of the synthetic clip, with the boolean option ``flag`` false then true (plus
    ``extra`` arguments); returns what a spy appended to ``seen`` during each (emptied in between)."""
    from track import main

    root, frames, lm = clip
    got = []
    for on in ("false", "true"):
        with single_thread():
            main(["--checkpoint", str(fit_model), "--frames", str(frames), "--landmarks", str(lm), "--flame_dir",
                  str(root / "flame"), "--out", str(tmp_path / on), *FAST, "--video_refine.iterations", "2",
                  "--export.turntable", "false", flag, on, *extra])
        got.append(list(seen))
        seen.clear()
    return got[0], got[1]


def _banded_outline(model, verts, faces, camera, outline=None, projected=None):
    """Stand-in for utils.apps.track.video.detected_face_mask: the projected FLAME face mask with 4 rows across the
    face cut out, as a detector's outline cuts hair over the forehead."""
    m = projected.copy()
    ys = np.nonzero(m.any(1))[0]
    a = ys.min() + (ys.max() - ys.min()) * 2 // 5
    m[a:a + 4] = 0
    return m


def test_cut_photo_fits_the_outlines_cut_to_the_frames_own_colours(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """--video_refine.cut_photo: where the detector's face outline cut the projected FLAME face mask (here a band of
    rows across the face, as hair over the forehead), the refinement's loss reads the frame's own colours (not the
    masked photo's black) instead of leaving the pixels out; off (the behaviour before 2026-12-07e): left out."""
    import utils.apps.track.video as video
    import utils.apps.track.video_refine as vr

    monkeypatch.setattr(video, "detected_face_mask", _banded_outline)
    # every pixel the person (the synthetic frames have no background to tell apart; mediapipe not needed)
    monkeypatch.setattr(video, "person_masks", lambda fr: [np.ones(f.shape[:2], np.float32) for f in fr])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    photometric = vr.photometric

    def spy(pred, gt, fit, eyes=None, eye_weight=None, ignore=None):
        seen.append((gt.detach().clone(), ignore.clone()))
        return photometric(pred, gt, fit, eyes, eye_weight, ignore=ignore)
    monkeypatch.setattr(vr, "photometric", spy)

    off, on = _track_off_and_on(clip, fit_model, tmp_path, seen, "--video_refine.cut_photo")
    assert len(off) == len(on) == 2
    for (g0, i0), (g1, i1) in zip(off, on):
        cut = (i0 > 0.5) & (i1 < 0.5)  # left out without the option, data with it: the outline's cut
        assert int(cut.sum()) > 0 and not bool(((i1 > 0.5) & (i0 < 0.5)).any())
        cut3 = cut.expand_as(g0)
        assert float(g0[cut3].abs().max()) == 0.0  # the masked photo is black there
        assert float(g1[cut3].mean()) > 0.05  # with the option: the frame's own colours
        assert torch.equal(g0[~cut3], g1[~cut3])  # elsewhere the same target


def _left_half(frames) -> list[np.ndarray]:
    """A person segmentation stand-in: the person is every frame's left half."""
    out = []
    for f in frames:
        p = np.zeros(f.shape[:2], np.float32)
        p[:, : f.shape[1] // 2] = 1.0
        out.append(p)
    return out


def test_cut_background_pulls_alpha_to_zero_on_the_cuts_background_only(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """--video_refine.cut_background: of the outline's cut (a band of rows across the face), the pixels the person
    segmentation calls background (here the frame's right half) become data for the coverage term with a target
    alpha of 0, except within cut_background_margin px of the person; the person's part and everything else keep
    their coverage targets, and off the background part stays left out."""
    import utils.apps.track.video as video
    import utils.apps.track.video_refine as vr

    monkeypatch.setattr(video, "detected_face_mask", _banded_outline)

    monkeypatch.setattr(video, "person_masks", _left_half)  # the face straddles the middle
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    coverage = vr.coverage_loss

    def spy(alpha, mask, ignore=None):
        seen.append((mask.detach().clone(), ignore.clone()))
        return coverage(alpha, mask, ignore)
    monkeypatch.setattr(vr, "coverage_loss", spy)

    off, on = _track_off_and_on(clip, fit_model, tmp_path, seen, "--video_refine.cut_background",
                                "--video_refine.cut_background_margin", "3")
    assert len(off) == len(on) == 2
    for (m0, i0), (m1, i1) in zip(off, on):
        assert torch.equal(m0, m1)  # the same coverage targets ...
        bg = (i0 > 0.5) & (i1 < 0.5)  # ... and, with the option, the cut's background pixels count
        assert int(bg.sum()) > 0 and not bool(((i1 > 0.5) & (i0 < 0.5)).any())
        assert float(m1[bg].max()) == 0.0  # target alpha 0 there
        # the margin: in every row, the background pixels start >= 4 columns right of the person's cut pixels
        # (mask 1 in the band's rows, the face mask being cut there)
        for b in range(bg.shape[0]):
            for r in torch.nonzero(bg[b, :, :, 0].any(1))[:, 0].tolist():
                person = torch.nonzero(m1[b, r, :, 0] > 0.5)[:, 0]
                cols = torch.nonzero(bg[b, r, :, 0])[:, 0]
                assert len(person) > 0 and int(cols.min()) - int(person.max()) >= 4


def test_vertex_observation_counts_what_the_frames_see():
    """video_refine._vertex_observation (--video_refine.unobserved_px): a Gaussian in view over the observed pixels
    gets about its footprint's blending weight, one outside the image or behind an opaque one (nearly) none, and a
    vertex takes the largest of its Gaussians'."""
    from types import SimpleNamespace

    from models.camera import Camera
    from models.gaussians import GaussianCloud
    from utils.apps.track.video_refine import _vertex_observation

    cam = Camera.look_at((0.0, 0.0, 1.0), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), 32, 32, fov_y_deg=40)
    # Gaussian 0 in front at the centre, 1 far outside the image, 2 right behind 0 (occluded), 3 in view at a corner
    means = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, -0.2], [0.12, 0.12, 0.0]])
    scales = torch.tensor([[0.03] * 3, [0.03] * 3, [0.01] * 3, [0.02] * 3])
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(4, 4)
    cloud = GaussianCloud.from_rgb(means, quats, scales, torch.tensor([0.99, 0.99, 0.99, 0.99]),
                                   torch.full((4, 3), 0.5))
    field = SimpleNamespace(gaussian_vertex_ids=torch.tensor([0, 1, 2, 2]), num_vertices=4)  # vertex 3: no Gaussian
    pixels = torch.ones(32, 32)
    obs = _vertex_observation(SimpleNamespace(field=field), [cloud], [cam], [pixels], backend="torch")
    assert obs.shape == (4,) and float(obs[0]) > 5.0  # several pixels' worth of weight
    assert float(obs[1]) == 0.0 and float(obs[3]) == 0.0
    # vertex 2: its occluded Gaussian sees ~nothing, its corner Gaussian is in view: the vertex gets the larger
    occluded = _vertex_observation(SimpleNamespace(field=SimpleNamespace(gaussian_vertex_ids=torch.tensor([0, 1, 2, 3]),
                                                                         num_vertices=4)),
                                   [cloud], [cam], [pixels], backend="torch")
    assert float(occluded[2]) < 0.05 * float(occluded[0]) and float(occluded[3]) > 1.0
    assert torch.isclose(obs[2], occluded[3])
    # only the observed pixels count: none observed, nothing seen
    assert float(_vertex_observation(SimpleNamespace(field=field), [cloud], [cam], [pixels * 0], "torch").max()) == 0


def test_unobserved_px_resets_the_residuals_of_vertices_no_frame_sees(clip, fit_model, tmp_path):  # noqa: F811
    """--video_refine.unobserved_px: after the refinement the residuals of the vertices the training frames saw less
    than that are exactly zero (every residual, for a threshold no vertex reaches), the others' untouched."""
    from utils.data.code_file import load_code
    from utils.data.model_file import load_model

    root, frames, lm = clip
    model = load_model(fit_model)
    extra = ["--export.turntable", "false"]
    m = _run(fit_model, root, frames, lm, tmp_path / "a", extra=[*extra, "--video_refine.unobserved_px", "0.5"])
    g = load_code(tmp_path / "a" / "code.pt", model).gaussians
    zero = (g.reshape(g.shape[0], -1).abs().amax(1) == 0)
    n = m["refine"]["flame_correction"]["unobserved_vertices"]
    assert 0 < n < model.field.num_vertices and int(zero.sum()) >= n and float(g.abs().max()) > 0
    _run(fit_model, root, frames, lm, tmp_path / "b", extra=[*extra, "--video_refine.unobserved_px", "1e12"])
    c = load_code(tmp_path / "b" / "code.pt", model)
    assert float(c.gaussians.abs().max()) == 0.0 and float(c.colour.abs().max()) == 0.0


def test_background_prune_hides_the_gaussians_only_the_cuts_background_shows(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """--video_refine.background_prune: after the refinement, the vertices whose blending weight over the training
    frames lies (by more than the share) on the coverage term's alpha-0 pixels (the outline's cut where the
    segmentation says background: here a band of rows across the face, right half) get opacity logit residual
    PRUNED_LOGIT in code.pt (invisible), every other residual untouched; the count is in metrics.json."""
    import utils.apps.track.video as video
    from models.identity_field import RESIDUAL_CHANNELS
    from utils.apps.track.video_refine import PRUNED_LOGIT
    from utils.data.code_file import code_cloud, load_code
    from utils.data.model_file import load_model

    def wide_band(model, verts, faces, camera, outline=None, projected=None):  # 12 rows cut across the face
        m = projected.copy()
        ys = np.nonzero(m.any(1))[0]
        a = ys.min() + (ys.max() - ys.min()) * 2 // 5
        m[a:a + 12] = 0
        return m
    monkeypatch.setattr(video, "detected_face_mask", wide_band)
    monkeypatch.setattr(video, "person_masks", _left_half)
    root, frames, lm = clip
    model = load_model(fit_model)
    m = _run(fit_model, root, frames, lm, tmp_path / "p", extra=[
        "--export.turntable", "false", "--video_refine.iterations", "2", "--video_refine.cut_background_margin", "0",
        "--video_refine.background_prune", "0.5"])
    n = m["refine"]["flame_correction"]["pruned_vertices"]
    c = load_code(tmp_path / "p" / "code.pt", model)
    # the opacity logit: the last raw channel of a residual of every channel (with the per-Gaussian colour, default)
    g = c.gaussians
    op = g[..., -1 if g.shape[-1] == model.field.channels else RESIDUAL_CHANNELS.index("opacity_logit")]  # (V, K)
    gone = (op <= PRUNED_LOGIT + 1.0).all(1)
    assert 0 < n < model.field.num_vertices // 4 and int(gone.sum()) == n
    assert float(op[~gone].abs().max()) < 10.0  # the others: ordinary fitted residuals
    with torch.no_grad():
        o = code_cloud(model, c.w, c.base_vertices, c.colour, g).opacities.reshape(len(gone), -1)
    assert float(o[gone].max()) < 1e-6 and float(o[~gone].min()) > 1e-3
