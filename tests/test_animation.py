"""Animation (models/posing.py pose path, utils/apps/animate/pipeline.py pipeline, animate.py, run_animation.sh) on the
tiny synthetic data: attachment and rigidity of the driven Gaussians, the network running once per identity, the FLAME
parameters that model.pt / code.pt store (and the fallback for older files), quality on unseen non-neutral frames of
the synthetic sequences, and the command line end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_fitting import fit_model, single_thread, track_cfg  # noqa: F401
from tests.test_interpolation import video_frames
from tests.training_fixtures import SEQUENCE_FRAMES, sequence_root  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--width", "40", "--height", "48", "--progress", "false", "--device", "cpu"]


@pytest.fixture(scope="module")
def rig(fit_model):  # noqa: F811
    """(model, HeadAnimator) of the shared small fit model."""
    from models.posing import HeadAnimator
    from utils.data.model_file import load_model
    from utils.identity import load_flame, model_flame_dir

    model = load_model(fit_model)
    return model, HeadAnimator.from_model(model, load_flame(model, model_flame_dir(model, "")))


def strong_motion(T: int, seed: int = 0):
    """FlameParams of T frames far from neutral: expression, jaw, neck, eyes and a head pose."""
    from models.flame import FlameParams, axis_angle_to_matrix

    g = torch.Generator().manual_seed(seed)
    r = lambda *s, a=1.0: a * torch.randn(*s, generator=g)  # noqa: E731
    p = FlameParams.neutral(T)
    return replace(p, expression=r(T, 100, a=0.8), jaw=r(T, 3, a=0.1).abs(), neck=r(T, 3, a=0.2),
                   eyes=r(T, 6, a=0.2), rotation_matrix=axis_angle_to_matrix(r(T, 3, a=0.3)),
                   translation=r(T, 3, a=0.05), scale=torch.full((T, 1), 1.05))


def training_head(model, animator, i: int = 0, base_vertices=None, colour=None):
    """(style, PosableIdentity) of training identity i (its own vertices unless ``base_vertices`` is given)."""
    with torch.no_grad():
        w = model.field.style(model.field.codes.weight[i:i + 1], update_w_avg=False)[0]
    base = model.base_vertices[i] if base_vertices is None else base_vertices
    return w, animator.identity(w, model.identity_flame(i), base, colour)


# ------------------------------------------------------------------------------------------------ pose path
def test_model_pt_stores_flame_params_of_every_identity(rig):
    model, animator = rig
    assert model.flame_params is not None and model.flame_params["shape"].shape == (len(model.identities), 300)
    for i in range(len(model.identities)):
        base = model.identity_flame(i)
        # the stored parameters reproduce the stored face-mask vertices (FLAME of the training frame)
        assert (animator.face(base)[0] - model.base_vertices[i]).abs().max() < 1e-6


def test_network_runs_once_and_the_base_pose_is_the_static_head(rig, monkeypatch):
    from utils.data.code_file import code_cloud

    model, animator = rig
    w, head = training_head(model, animator)
    assert head.offsets is None  # a training identity's vertices are FLAME's
    with torch.no_grad():
        static = code_cloud(model, w, model.base_vertices[0])  # the network on the training frame's vertices
    calls = []
    real = type(model.field).synthesize_raw
    monkeypatch.setattr(type(model.field), "synthesize_raw", lambda self, w: calls.append(1) or real(self, w))
    with torch.no_grad():
        frames = animator.gaussians(head, strong_motion(5))
        posed = animator.gaussians(head, head.base)[0]
    assert calls == [] and frames.means.shape == (5, model.field.num_gaussians, 3)
    torch.testing.assert_close(posed.means, static.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(posed.scales, static.scales, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(posed.sh, static.sh)
    torch.testing.assert_close(posed.opacities, static.opacities)


def test_driven_head_stays_attached(rig):
    """After any pose, every Gaussian's offset from its vertex, expressed in that vertex's surface frame in units of
    the local edge length, is exactly what the network produced; so are its scale (relative to the edge length),
    rotation (relative to the frame), opacity and colour (plus the colour residual)."""
    from models.gaussians import SH_C0, quat_to_rotmat

    model, animator = rig
    f = model.field
    M = model.base_vertices.shape[1]
    g = torch.Generator().manual_seed(3)
    colour = 0.05 * torch.randn(M, 3, generator=g)
    bumped = model.base_vertices[0] + 0.0005 * torch.randn(M, 3, generator=g)  # fitted geometry offsets
    _, head = training_head(model, animator, base_vertices=bumped, colour=colour)
    assert head.offsets is not None
    motion = strong_motion(3, seed=1)
    rate = f.sampling_rate
    assert rate is not None  # trained with the Mip-Splatting 3D filter (models/mip_filter.py)
    with torch.no_grad():
        filtered = animator.gaussians(head, motion)
        f.set_sampling_rate(None)  # the attachment itself, without the filter (checked against it below)
        try:
            cloud = animator.gaussians(head, motion)
        finally:
            f.set_sampling_rate(rate)
        v = animator.vertices(head, motion)  # (T, V, 3), offsets included
        frames, edge = f.surface_frames(v)
        raw = head.raw[0]  # (V, K, C)
    var = f.filter_variance[f.gaussian_vertex_ids]  # (N,) the filter's world-space variance per Gaussian
    torch.testing.assert_close(filtered.scales, (cloud.scales ** 2 + var[:, None]).sqrt(), atol=1e-7, rtol=1e-5)
    assert bool((filtered.opacities <= cloud.opacities + 1e-7).all()) and torch.equal(filtered.means, cloud.means)
    sl, ids = f._channel_slices(), f.gaussian_vertex_ids
    d = cloud.means - v[:, ids]  # (T, N, 3)
    local = (frames[:, ids].transpose(-1, -2) @ d[..., None])[..., 0] / edge[:, ids, None]
    want = f.cfg.max_offset * torch.tanh(raw[..., sl["offset"]]).reshape(-1, 3)
    assert float(want.abs().max()) > 0.01  # the network's offsets are not trivially zero
    torch.testing.assert_close(local, want.expand_as(local), atol=2e-5, rtol=1e-4)
    log_rel = torch.log(cloud.scales / edge[:, ids, None])
    want_s = raw[..., sl["scale"]].reshape(-1, 3) + f.log_scale_init
    torch.testing.assert_close(log_rel, want_s.expand_as(log_rel), atol=1e-4, rtol=1e-4)
    R_local = frames[:, ids].transpose(-1, -2) @ quat_to_rotmat(cloud.quats)
    q = torch.nn.functional.normalize(raw[..., sl["quat"]].reshape(-1, 4), dim=-1)
    torch.testing.assert_close(R_local, quat_to_rotmat(q).expand_as(R_local), atol=2e-5, rtol=1e-4)
    # colour: the network's DC term plus the residual, the same in every frame
    dc_net = raw[..., sl["sh"].start:sl["sh"].start + 3].reshape(-1, 3) - (model.vertices(colour) / SH_C0)[ids]
    with torch.no_grad():
        dc_ref = f.synthesize_raw(f.style(f.codes.weight[:1], update_w_avg=False))[0][..., sl["sh"]][..., :3]
    torch.testing.assert_close(dc_net, dc_ref.reshape(-1, 3), atol=1e-4, rtol=1e-5)
    assert torch.equal(cloud.sh[0], cloud.sh[2]) and torch.equal(cloud.opacities[0], cloud.opacities[1])


def test_rigid_head_motion_moves_every_gaussian_rigidly(rig):
    from models.flame import axis_angle_to_matrix
    from models.gaussians import quat_to_rotmat

    model, animator = rig
    _, head = training_head(model, animator, 1)
    a = strong_motion(2, seed=2)
    Rr = axis_angle_to_matrix(torch.tensor([0.3, -0.5, 0.2]))
    tr = torch.tensor([0.02, -0.05, 0.1])
    b = replace(a, rotation_matrix=Rr @ a.rotation_matrix, translation=a.translation @ Rr.T + tr)
    with torch.no_grad():
        ca, cb = animator.gaussians(head, a), animator.gaussians(head, b)
    torch.testing.assert_close(cb.means, ca.means @ Rr.T + tr, atol=2e-6, rtol=0)
    torch.testing.assert_close(cb.scales, ca.scales, atol=1e-7, rtol=1e-4)
    # float32 frames of the thin triangles where the lids and lips roll inwards: measured error up to 9e-5
    torch.testing.assert_close(quat_to_rotmat(cb.quats), Rr @ quat_to_rotmat(ca.quats), atol=2e-4, rtol=0)
    # opacities: equal up to the float rounding of the edge lengths (the 3D filter's compensation depends on scales)
    torch.testing.assert_close(cb.opacities, ca.opacities, atol=1e-6, rtol=1e-5)
    assert torch.equal(cb.sh, ca.sh)
    # a non-rigid change (the jaw) does move Gaussians relative to each other
    c = animator.gaussians(head, replace(a, jaw=a.jaw + torch.tensor([0.2, 0.0, 0.0])))
    assert float((c.means - ca.means).norm(dim=-1).max()) > 1e-3


def test_retarget_modes():
    from models.posing import retarget

    motion, base = strong_motion(4, seed=4), strong_motion(1, seed=5)
    base = replace(base, shape=torch.randn(1, 300))
    rel = retarget(motion, base, "relative", reference=0)
    torch.testing.assert_close(rel.shape, base.shape)
    torch.testing.assert_close(rel.expression, motion.expression)
    # frame 0 is the identity's own placement; the motion's movement relative to it is kept: M'_t = M_b M_0^-1 M_t
    M, Mb = motion.model_to_world(), base.model_to_world()
    torch.testing.assert_close(rel.model_to_world(), Mb @ torch.linalg.inv(M[:1]) @ M, atol=1e-5, rtol=0)
    torch.testing.assert_close(rel.model_to_world()[0], Mb[0], atol=1e-6, rtol=0)
    # the same person's own tracking is reproduced exactly
    own = retarget(motion, replace(motion.frame(0), shape=base.shape), "relative")
    torch.testing.assert_close(own.model_to_world(), M, atol=1e-6, rtol=0)
    torch.testing.assert_close(retarget(motion, base, "absolute").model_to_world(), M)
    fixed = retarget(motion, base, "fixed")
    torch.testing.assert_close(fixed.model_to_world(), Mb.expand(4, 4, 4))
    with pytest.raises(ValueError, match="pose must be"):
        retarget(motion, base, "sideways")


def test_pose_graph_matches_eager(rig):
    model, animator = rig
    _, head = training_head(model, animator)
    step = animator.graphed(head, num_frames=2)
    m = strong_motion(2, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(step(m).means, animator.gaussians(head, m).means)
    assert not step.graphed  # CPU: eager (CUDA graphs are measured by benchmarks/bench.py)
    with pytest.raises(ValueError, match="built for 2 frames"):
        step(strong_motion(3))


def test_old_files_without_flame_parameters(rig, fit_model, tmp_path):  # noqa: F811
    """model.pt written before FLAME parameters were stored: FLAME shape and head pose are fitted to the stored
    vertices by least squares (a warning says so), the residual rides along as geometry offsets (the neutral pose is
    reproduced); a code.pt of version 2 (no "flame") still loads."""
    from models.posing import retarget
    from utils.data.code_file import FittedCode, load_code, save_code
    from utils.data.model_file import load_model
    from utils.identity import posable

    model, animator = rig
    doc = torch.load(fit_model, map_location="cpu", weights_only=False)
    doc.pop("flame_params")
    torch.save(doc, tmp_path / "old_model.pt")
    old = load_model(tmp_path / "old_model.pt")
    assert old.flame_params is None and old.identity_flame(0) is None
    with pytest.warns(UserWarning, match="least squares"):
        head, code = posable(animator, old, old.identities[1], torch.device("cpu"))
    truth = model.identity_flame(1)
    fitted_only = animator.face(head.base)[0]
    rms = float((fitted_only - old.base_vertices[1]).square().sum(-1).mean().sqrt())
    assert rms < 7e-4, rms  # the synthetic heads are FLAME shapes: the linear fit explains them to 0.50 mm (measured)
    # driven by a strong motion it moves like the true FLAME up to the joints (neck / jaw pivots depend on the whole
    # head, which the face mask does not show): measured 2.6 / 3.6 mm RMS for the two training identities
    motion = strong_motion(4, seed=1)
    with torch.no_grad():
        d = animator.face(retarget(motion, head.base)) - animator.face(retarget(motion, truth))
    assert float(d.norm(dim=-1).square().mean().sqrt()) < 5e-3
    with torch.no_grad():
        v = animator.vertices(head, head.base)[0, :old.base_vertices.shape[1]]
    torch.testing.assert_close(v, old.base_vertices[1], atol=1e-5, rtol=0)
    # code.pt: FLAME parameters round-trip; without them (version 2) it loads with flame None
    c = FittedCode(code.w, None, code.base_vertices, "x", flame=truth)
    back = load_code(save_code(tmp_path / "code.pt", c, model), model)
    torch.testing.assert_close(back.flame.shape, truth.shape)
    d = torch.load(tmp_path / "code.pt", weights_only=False)
    d.pop("flame")
    d["version"] = 2
    torch.save(d, tmp_path / "code_v2.pt")
    assert load_code(tmp_path / "code_v2.pt", model).flame is None


# ------------------------------------------------------------------------------------------------ quality
@pytest.fixture(scope="module")
def tracked_017(sequence_root, fit_model, tmp_path_factory):  # noqa: F811
    """track.py's fit of the held-out identity 017 from its neutral frame 0 (frontal camera): code.pt."""
    from utils.apps.track.pipeline import track

    out = tmp_path_factory.mktemp("animate_track") / "017"
    cfg = track_cfg(sequence_root, fit_model, out, **{"export.turntable": False, "export.views": False,
                                                      "export.ply": False})
    with single_thread():
        track(cfg)
    return out / "code.pt"


def test_driven_renders_match_unseen_frames(rig, sequence_root, tracked_017):  # noqa: F811
    """Training identities and a track.py-fitted held-out identity, driven by the tracking of the unseen non-neutral
    frames 1..N-1 of their synthetic sequences: PSNR against those frames' face-masked photos on all 16 cameras is
    within 1 dB of the same identity's neutral-frame novel-view PSNR (training identities: the 4 held-out cameras;
    the fitted one: the 15 cameras it did not see).  One crop size for all frames (utils/apps/animate/pipeline.py
    sequence_views).  Control: the undriven neutral head against the same frames is clearly worse, so the
    comparison sees the driving."""
    from models.posing import retarget
    from utils.apps.animate.pipeline import evaluate_sequence, sequence_views
    from utils.data.nersemble import FRONTAL_SERIAL, NersembleSubject
    from utils.identity import posable

    model, animator = rig
    report = []
    for sid, key, neutral_key in (("300", "300", "psnr_heldout_cameras"), ("301", "301", "psnr_heldout_cameras"),
                                  ("017", str(tracked_017), "psnr_unseen")):
        head, code = posable(animator, model, key, torch.device("cpu"))
        assert code.flame is not None  # code.pt of track.py holds the photo's FLAME parameters
        subject = NersembleSubject(sequence_root / "subjects", sid)
        assert subject.frames() == list(range(SEQUENCE_FRAMES))
        tracking = subject.tracking()
        assert float(tracking.expression[1:].abs().max()) > 0.3 and float(tracking.jaw[1:, 0].max()) > 0.0
        views = sequence_views(subject, subject.frames(), torch.device("cpu"))
        with single_thread():
            driven = evaluate_sequence(animator, head, retarget(tracking, head.base), views, FRONTAL_SERIAL)
            still = evaluate_sequence(animator, head, retarget(tracking.frames([0] * SEQUENCE_FRAMES), head.base),
                                      views, FRONTAL_SERIAL)
        neutral = driven[0][neutral_key]
        frames = [r["psnr_all"] for r in driven[1:]]
        undriven = [r["psnr_all"] for r in still[1:]]
        report.append(f"{sid}: neutral novel-view {neutral:.2f}, driven {['%.2f' % p for p in frames]}, "
                      f"undriven {['%.2f' % p for p in undriven]}")
        assert min(frames) >= neutral - 1.0, report
        assert np.mean(frames) > np.mean(undriven) + 1.0, report
    print("\n".join(report))  # pytest -s shows the measured numbers


# ------------------------------------------------------------------------------------------------ command line
def test_cli_keyframes_png_ply_and_motion_npz(fit_model, tmp_path):  # noqa: F811
    import cv2

    import animate
    from models.flame import load_tracking

    out = tmp_path / "kf"
    with single_thread():
        s = animate.main(["--checkpoint", str(fit_model), "--out", str(out), "--keyframes", "neutral", "smile",
                          "open_mouth", "--keyframe_frames", "3", "--png", "--ply", *SMALL])
    T = 3 * 2 + 1
    assert s["num_frames"] == T and video_frames(out / "animation.mp4") == T
    assert len(list((out / "frames").glob("frame_*.png"))) == T and len(list((out / "ply").glob("*.ply"))) == T
    motion = load_tracking(out / "motion.npz")
    assert motion.num_frames == T and float(motion.jaw[-1, 0]) == pytest.approx(0.25, abs=1e-6)
    doc = json.loads((out / "animation.json").read_text())
    assert doc["identity"] == "300" and doc["motion_kind"] == "keyframes" and doc["pose"] == "relative"
    # the written motion drives the same animation again (reusable as --motion): same frames
    out2 = tmp_path / "again"
    with single_thread():
        animate.main(["--checkpoint", str(fit_model), "--out", str(out2), "--motion", str(out / "motion.npz"),
                      "--pose", "absolute", "--png", *SMALL])
    a = [cv2.imread(str(p)) for p in sorted((out / "frames").glob("*.png"))]
    b = [cv2.imread(str(p)) for p in sorted((out2 / "frames").glob("*.png"))]
    assert len(a) == len(b) and all(np.abs(x.astype(int) - y).max() <= 1 for x, y in zip(a, b))


def test_cli_sequence_interpolation_side_by_side_and_evaluate(fit_model, sequence_root, tmp_path):  # noqa: F811
    import animate

    subj = sequence_root / "subjects" / "301"
    out = tmp_path / "seq"
    with single_thread():
        s = animate.main(["--checkpoint", str(fit_model), "--identity", "300", "--identity_b", "301", "--mix", "0.3",
                          "--motion", str(subj), "--side_by_side", "video", "--evaluate", "--out", str(out), *SMALL])
    assert s["num_frames"] == SEQUENCE_FRAMES and s["frame_ids"] == list(range(SEQUENCE_FRAMES))
    assert s["width"] > 40  # the render and the driving photo side by side
    # measured 14.5 dB (the tiny model on frames whose lips part and eyes look around)
    assert len(s["evaluation"]["per_frame"]) == SEQUENCE_FRAMES and s["evaluation"]["mean_psnr_all"] > 12
    out = tmp_path / "driver"
    with single_thread():
        s = animate.main(["--checkpoint", str(fit_model), "--identity", "300", "--motion",
                          str(subj / "sequences" / "EXP-1-head" / "annotations" / "tracking" / "FLAME2023_v2" /
                              "tracked_flame_params.npz"), "--side_by_side", "driver", "--max_frames", "2",
                          "--out", str(out), *SMALL])
    assert s["num_frames"] == 2 and s["width"] == 80 and video_frames(out / "animation.mp4") == 2


def test_cli_errors_and_help(fit_model, tmp_path, capsys):  # noqa: F811
    """Bad input ends in one line naming what is wrong and exit status 2 (utils/core/errors.py); every flag in
    --help."""
    import animate
    from utils.apps.animate.pipeline import AnimationConfig

    base = ["--checkpoint", str(fit_model), "--out", str(tmp_path / "x"), *SMALL]
    for extra, msg in ((["--identity", "999"], "neither a training identity"),
                       (["--motion", "dance"], "--motion 'dance'"),
                       (["--keyframes", "neutral", "moonwalk"], "unknown keyframe 'moonwalk'"),
                       (["--flame_dir", str(tmp_path / "nowhere")], "--flame_dir"),
                       (["--side_by_side", "driver"], "--side_by_side driver needs --driver"),
                       (["--pose", "sideways"], "--pose must be one of")):
        with pytest.raises(SystemExit) as exc:
            animate.main(base + extra)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith("animate.py: error:") and msg in err and "\n" not in err, err
    with pytest.raises(ValueError, match="neither a training identity"):
        animate.main(base + ["--identity", "999", "--debug"])  # --debug: the exception itself
    with pytest.raises(SystemExit):
        animate.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for name in AnimationConfig.__dataclass_fields__:
        assert f"--{name}" in text, name


def test_run_animation_sh_passes_arguments(fit_model, tmp_path):  # noqa: F811
    out = tmp_path / "sh"
    r = subprocess.run(["bash", str(REPO / "run_animation.sh"), "--checkpoint", str(fit_model), "--out", str(out),
                        "--keyframes", "neutral", "nod", "--keyframe_frames", "2", *SMALL],
                       capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin",
                                                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert video_frames(out / "animation.mp4") == 3
    if not (REPO / "output" / "cpu" / "model.pt").is_file():  # with no arguments and no trained model: say so
        r = subprocess.run(["bash", str(REPO / "run_animation.sh")], capture_output=True, text=True, cwd=tmp_path,
                           env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
        assert r.returncode == 1 and "bash run_training.sh" in r.stderr


# ------------------------------------------------------------------ issue 26 class 4: only its own files are deleted
def test_animate_keeps_frames_and_plys_it_does_not_own(fit_model, tmp_path, capsys):  # noqa: F811
    import animate

    out = tmp_path / "a"
    (out / "frames").mkdir(parents=True)
    (out / "ply").mkdir()
    user = {out / "frames" / f"frame_{i:05d}.png": b"user png" for i in range(4)}
    user.update({out / "ply" / f"frame_{i:05d}.ply": b"user ply" for i in range(4)})
    for p, b in user.items():
        p.write_bytes(b)
    base = ["--checkpoint", str(fit_model), "--out", str(out), "--keyframes", "neutral", "smile",
            "--keyframe_frames", "2", *SMALL]
    with single_thread():
        animate.main(base)  # no --png/--ply: frames/ and ply/ are not its business (they used to be emptied)
    assert all(p.read_bytes() == b for p, b in user.items())
    for extra in (["--png"], ["--ply"], []):  # would replace the user's files, or its own run: refused
        with pytest.raises(SystemExit) as ei:
            animate.main([*base, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert ei.value.code == 2 and len(err) == 1 and "--overwrite" in err[0], err
    assert all(p.read_bytes() == b for p, b in user.items())
    with single_thread():
        animate.main([*base, "--png", "--overwrite"])  # 3 frames replace the user's first 3 PNGs, no PLY touched
    assert (out / "frames" / "frame_00003.png").read_bytes() == b"user png"
    assert all((out / "ply" / f"frame_{i:05d}.ply").read_bytes() == b"user ply" for i in range(4))


def test_frames_stream_to_the_video_writer(fit_model, tmp_path, monkeypatch):  # noqa: F811
    """A long motion never holds its frames in memory (a 1e6-frame motion at 256 x 256 kept ~196 GB): each batch is
    written to the encoder before the next one is rendered, and a failure mid-way leaves no animation.mp4 and no
    temporary behind."""
    import animate
    import utils.apps.animate.pipeline as ua

    events: list[str] = []
    real_render, real_write = ua._render, ua.VideoStream.write

    def render(*a, **k):
        events.append("render")
        if fail_at[0] and events.count("render") == fail_at[0]:
            raise RuntimeError("stop here")
        return real_render(*a, **k)

    def write(self, frame):
        events.append("write")
        return real_write(self, frame)

    monkeypatch.setattr(ua, "_render", render)
    monkeypatch.setattr(ua.VideoStream, "write", write)
    fail_at = [0]
    out = tmp_path / "long"
    args = ["--checkpoint", str(fit_model), "--keyframes", "neutral", "smile", "--keyframe_frames", "12",
            "--batch", "4", *SMALL]
    with single_thread():
        s = animate.main([*args, "--out", str(out)])
    T = 13
    assert s["num_frames"] == T and video_frames(out / "animation.mp4") == T
    assert events.count("render") == 4 and events.count("write") == T
    assert events[:6] == ["render", "write", "write", "write", "write", "render"]  # batch by batch
    assert (s["width"], s["height"]) == (40, 48)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    events.clear()
    fail_at[0] = 3  # the third batch fails: two batches were encoded already
    with single_thread(), pytest.raises(RuntimeError, match="stop here"):
        animate.main([*args, "--out", str(tmp_path / "failed")])  # not a user error: it passes run_main
    assert events.count("write") == 8
    assert not (tmp_path / "failed" / "animation.mp4").exists()
    assert not [p for p in (tmp_path / "failed").iterdir() if ".tmp" in p.name]


# ------------------------------------------------------------------------------------------------ --lod
def _frames(folder: Path) -> list[np.ndarray]:
    import cv2

    return [cv2.imread(str(p)).astype(np.float64) for p in sorted((folder / "frames").glob("frame_*.png"))]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) / 255.0).__pow__(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.fixture(scope="module")
def level1(fit_model):  # noqa: F811
    """The small fit model (level 0) as a level-1 head: its network on the face mask subdivided once
    (benchmarks/lod_quality.py's stand-in), so that --lod has a coarser level to merge to."""
    from benchmarks.lod_quality import field_at_level
    from utils.data.model_file import load_model

    model = load_model(fit_model, torch.device("cpu"))
    field, plan = field_at_level(model, 1)
    return replace(model, field=field, plan=plan)


def _lod_run(level1, fit_model, out: Path, **kw) -> dict:  # noqa: F811
    from utils.apps.animate.pipeline import AnimationConfig, animate

    cfg = AnimationConfig(checkpoint=str(fit_model), keyframes=["neutral", "smile"], keyframe_frames=3, png=True,
                          progress=False, device="cpu", width=160, height=160, out=str(out))
    with single_thread():
        return animate(replace(cfg, **kw), level1)


def test_lod_auto_keeps_full_detail_near_and_merges_far(level1, fit_model, tmp_path):  # noqa: F811
    """--lod auto: a head filling a 160x160 frame keeps full detail (its Gaussians exceed --lod_footprint px) and
    writes the frames of --lod off; the same head far away (--fill 0.15) is rendered one level down, every frame
    merged (the keyframes change the head every frame), close to full detail; --lod 0 forces the coarse level."""
    runs = {name: _lod_run(level1, fit_model, tmp_path / name, **kw) for name, kw in (
        ("off", {}), ("auto", {"lod": "auto"}), ("far_off", {"fill": 0.15}),
        ("far_auto", {"lod": "auto", "fill": 0.15}), ("zero", {"lod": "0"}))}
    T = runs["off"]["num_frames"]
    assert T == 4 and "lod" not in runs["off"]
    near = runs["auto"]["lod"]
    assert near["full_level"] == 1 and near["frames_per_level"] == {"1": T} and near["merges"] == 0
    assert near["first_frame_footprints_px"]["1"] > near["footprint_px"]  # why full detail: larger than 2 px
    for a, b in zip(_frames(tmp_path / "off"), _frames(tmp_path / "auto")):
        assert np.abs(a - b).max() == 0  # full detail: the very frames of --lod off
    far = runs["far_auto"]["lod"]
    assert far["frames_per_level"] == {"0": T} and far["merges"] == T and far["reused_merges"] == 0
    assert far["first_frame_footprints_px"]["0"] <= far["footprint_px"]
    fa, fo = _frames(tmp_path / "far_auto"), _frames(tmp_path / "far_off")
    assert max(np.abs(a - b).max() for a, b in zip(fa, fo)) > 0  # a different (coarser) cloud ...
    assert min(_psnr(a, b) for a, b in zip(fa, fo)) > 35.0  # ... that looks like full detail from afar
    zero = runs["zero"]["lod"]
    assert zero["frames_per_level"] == {"0": T} and zero["merges"] == T
    near_psnr = [_psnr(a, b) for a, b in zip(_frames(tmp_path / "zero"), _frames(tmp_path / "off"))]
    assert 20.0 < min(near_psnr) and max(near_psnr) < 60.0  # forced coarse close up: near, but not the same


def test_lod_reuses_the_merge_of_an_unchanged_head(level1, fit_model, tmp_path):  # noqa: F811
    """A held pose (the same keyframe twice) leaves the head the same every frame: one merge serves all frames,
    across batches too; a moving head (head_turn_left turns the neck joint, which --pose fixed keeps) is merged per
    frame."""
    s = _lod_run(level1, fit_model, tmp_path / "fixed", keyframes=["neutral", "neutral"], lod="0", batch=2)
    T = s["num_frames"]
    assert T == 4 and s["lod"]["merges"] == 1 and s["lod"]["reused_merges"] == T - 1
    frames = _frames(tmp_path / "fixed")
    assert all(np.abs(f - frames[0]).max() == 0 for f in frames)
    s = _lod_run(level1, fit_model, tmp_path / "turn", keyframes=["neutral", "head_turn_left"], pose="fixed",
                 lod="0", batch=2)
    assert s["lod"]["merges"] == 4 and s["lod"]["reused_merges"] == 0


def test_cli_lod_errors(fit_model, tmp_path, capsys):  # noqa: F811
    """Bad --lod values (the small fit model is at level 0) and --lod with --stream are refused in one line."""
    import animate

    base = ["--checkpoint", str(fit_model), "--keyframes", "neutral", "--keyframe_frames", "1", *SMALL]
    for extra, msg in ((["--lod", "1"], "--lod must be off, auto or a subdivision level 0..0"),
                       (["--lod", "fine"], "--lod must be off, auto"),
                       (["--lod", "auto", "--stream"], "--lod is not available with --stream")):
        with pytest.raises(SystemExit) as exc:
            animate.main(base + extra + ["--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and msg in err and "\n" not in err, err
