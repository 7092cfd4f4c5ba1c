"""Latent-space interpolation (utils/apps/interpolate.py, interpolate.py): maths, frame counts, video, PLYs, errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.test_fitting import fit_model, single_thread, write_foreign_code  # noqa: F401
from tests.training_fixtures import preprocessed_root  # noqa: F401

SIZE = ["--width", "40", "--height", "48", "--progress", "false"]


def video_frames(path: Path) -> int:
    """Frames actually decodable from an MP4 (and the container's count must agree)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert declared == n
    return n


def key_colour(base: torch.Tensor) -> torch.Tensor:
    """A smooth per-vertex colour residual (M, 3) like the one track.py's colour stage fits."""
    x = (base[:, :1] - base[:, :1].mean()) / (base[:, :1].std() + 1e-9)
    return 0.05 * torch.tanh(x) * torch.tensor([1.0, -1.0, 0.5])


@pytest.fixture(scope="module")
def fitted_code(fit_model, tmp_path_factory):  # noqa: F811
    """A code.pt as track.py writes it (w-space fit, its own base vertices, a colour residual), without running a
    fit."""
    from utils.data.code_file import FittedCode, save_code
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    f = model.field
    with torch.no_grad():
        w = f.style(f.codes.weight, update_w_avg=False).mean(0) * 1.1
    base = model.base_vertices.mean(0) + 0.002
    return save_code(tmp_path_factory.mktemp("person") / "017" / "code.pt",
                     FittedCode(w, None, base, "017", colour=key_colour(base)), model, str(fit_model))


# ------------------------------------------------------------------------------------------------ maths
def test_slerp_and_lerp():
    from utils.identity import lerp, slerp

    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(1.5)  # length interpolated linearly
    assert torch.allclose(mid / mid.norm(), torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(slerp(a, 3 * a, 0.5), 2 * a)  # parallel: falls back to lerp
    assert torch.allclose(lerp(a, b, 0.25), torch.tensor([0.75, 0.5, 0.0]))


def test_schedule_and_frame_counts():
    from utils.identity import num_frames, schedule

    assert num_frames(3, 4, loop=False) == 9 and num_frames(3, 4, loop=True) == 12
    plan = schedule(3, 2, loop=True)
    assert plan == [(0, 1, 0.0), (0, 1, 0.5), (1, 2, 0.0), (1, 2, 0.5), (2, 0, 0.0), (2, 0, 0.5)]
    assert schedule(2, 2, loop=False)[-1] == (1, 1, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        num_frames(1, 5, False)
    with pytest.raises(ValueError, match="--frames"):
        num_frames(2, 0, False)


def test_geometry_interpolation_keeps_pose(fit_model):  # noqa: F811
    from models.geometry import head_pose
    from utils.apps.interpolate import GeometryInterpolator
    from utils.data.model_file import load_model
    from utils.identity import resolve_key

    model = load_model(fit_model)
    keys = [resolve_key(model, name, torch.device("cpu")) for name in model.identities[:2]]
    geo = GeometryInterpolator(model.template_base, keys)
    assert torch.allclose(geo(0, 1, 0.0), keys[0].base_vertices, atol=1e-5)
    assert all(k.colour is None for k in keys)  # training identities have no colour residual
    _, R0, _ = head_pose(model.template_base, keys[0].base_vertices)
    for t in (0.5, 1.0):  # every frame stays in the first key's head pose
        _, R, _ = head_pose(model.template_base, geo(0, 1, t))
        assert torch.allclose(R, R0, atol=1e-3)


def test_colour_residuals_interpolate_linearly(fit_model, fitted_code):  # noqa: F811
    from utils.data.model_file import load_model
    from utils.identity import interpolate_colours, resolve_key

    model = load_model(fit_model)
    cpu = torch.device("cpu")
    keys = [resolve_key(model, "300", cpu), resolve_key(model, str(fitted_code), cpu), resolve_key(model, "301", cpu)]
    c = keys[1].colour
    assert c is not None and torch.allclose(c, key_colour(keys[1].base_vertices))
    assert interpolate_colours(keys, 0, 2, 0.5) is None  # two training identities: nothing to add
    assert torch.allclose(interpolate_colours(keys, 0, 1, 0.25), 0.25 * c)  # training identity = zero residual
    assert torch.allclose(interpolate_colours(keys, 1, 2, 0.0), c)
    assert torch.allclose(interpolate_colours(keys, 1, 2, 1.0), torch.zeros_like(c))


# ------------------------------------------------------------------------------------------------ videos
def test_loop_with_fitted_code_frames_video_and_plys(fit_model, fitted_code, tmp_path):  # noqa: F811
    import interpolate
    from models.gaussians import GaussianCloud

    out = tmp_path / "loop"
    with single_thread():
        s = interpolate.main(["--checkpoint", str(fit_model), "--identities", "300", "301", str(fitted_code),
                              "--frames", "3", "--loop", "--orbit", "40", "--ply", "--out", str(out), *SIZE])
    assert s["num_frames"] == 9 and s["space"] == "w"  # the fitted code has no z: w space
    frames = sorted((out / "frames").glob("frame_*.png"))
    assert [f.name for f in frames] == [f"frame_{i:05d}.png" for i in range(9)]
    assert video_frames(out / "interpolation.mp4") == 9
    plys = sorted(p.name for p in (out / "keyframes").glob("*.ply"))
    assert plys == ["key_00_300.ply", "key_01_301.ply", "key_02_017.ply"]
    assert len(GaussianCloud.load_ply(out / "keyframes" / "key_02_017.ply")) > 0
    # the fitted key's frame carries its colour residual (colours do not depend on the geometry), a training key none
    from models.gaussians import SH_C0
    from utils.data.code_file import colour_offsets, load_code
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    code = load_code(fitted_code, model)
    with torch.no_grad():
        dc = model.field.synthesize(code.w[None], model.vertices(code.base_vertices)[None])[0].sh[:, 0]
    got = GaussianCloud.load_ply(out / "keyframes" / "key_02_017.ply").sh[:, 0]
    assert torch.allclose(got, dc + colour_offsets(model, code.colour) / SH_C0, atol=1e-4)
    assert s["colour_residuals"] == [False, False, True]


def test_no_loop_linear_z_space_and_still_camera(fit_model, tmp_path):  # noqa: F811
    import cv2

    import interpolate

    out = tmp_path / "lin"
    with single_thread():
        s = interpolate.main(["--checkpoint", str(fit_model), "--identities", "300,301", "--method", "linear",
                              "--frames", "2", "--out", str(out), *SIZE])
    assert s["num_frames"] == 3 and s["space"] == "z" and not s["loop"]
    assert video_frames(out / "interpolation.mp4") == 3
    first = cv2.imread(str(out / "frames" / "frame_00000.png"))
    assert first.shape == (48, 40, 3) and first.mean() > 1.0  # the head is in view, not a black frame


def test_calibrated_camera(fit_model, preprocessed_root, tmp_path):  # noqa: F811
    import cv2

    from utils.apps.interpolate import InterpolationConfig, interpolate

    calib = preprocessed_root / "subjects" / "300" / "calibration" / "camera_params.json"
    cfg = InterpolationConfig(checkpoint=str(fit_model), identities=["300", "301"], frames=1, camera_json=str(calib),
                              camera="222200037", width=44, out=str(tmp_path / "cal"), progress=False)
    with single_thread():
        s = interpolate(cfg)
    assert s["width"] == 44 and s["height"] == 64  # the calibrated aspect (88 x 128) is kept
    assert cv2.imread(str(tmp_path / "cal" / "frames" / "frame_00001.png")).shape == (64, 44, 3)
    cfg.camera = "123"
    with pytest.raises(ValueError, match="camera '123' is not in"):
        interpolate(cfg)


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_identity_and_missing_code(fit_model, tmp_path):  # noqa: F811
    from utils.apps.interpolate import InterpolationConfig, interpolate

    cfg = InterpolationConfig(checkpoint=str(fit_model), identities=["300", "nobody"], out=str(tmp_path),
                              progress=False)
    with pytest.raises(ValueError, match="'nobody' is neither a training identity"):
        interpolate(cfg)
    cfg.identities = ["300", str(tmp_path / "missing" / "code.pt")]
    with pytest.raises(FileNotFoundError, match="missing"):
        interpolate(cfg)
    cfg.identities = ["300"]
    with pytest.raises(ValueError, match="at least 2"):
        interpolate(cfg)


def test_code_from_another_model_config(fit_model, tmp_path):  # noqa: F811
    from utils.apps.interpolate import InterpolationConfig, interpolate
    from utils.data.model_file import load_model

    path = write_foreign_code(tmp_path / "other" / "code.pt", load_model(fit_model))
    cfg = InterpolationConfig(checkpoint=str(fit_model), identities=["300", str(path)], out=str(tmp_path / "o"),
                              progress=False)
    with pytest.raises(ValueError, match="code_dim=16 but the model has code_dim=24"):
        interpolate(cfg)
    cfg.identities, cfg.checkpoint = ["300", "301"], str(path)  # a code.pt is not a model.pt
    with pytest.raises(ValueError, match="not an identity-field model.pt"):
        interpolate(cfg)


def test_help_documents_every_flag(capsys):
    import interpolate

    with pytest.raises(SystemExit):
        interpolate.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--identities", "--method", "--frames", "--loop", "--orbit", "--ply", "--width",
                 "--height", "--camera_json", "--camera", "--out", "--geometry", "--space"):
        assert flag in text, flag


# ------------------------------------------------------------------ issue 26 class 4: only its own files are deleted
def test_interpolate_keeps_frames_it_does_not_own(fit_model, tmp_path, capsys):  # noqa: F811
    """frames/frame_*.png left by the user (ffmpeg's usual naming) are never deleted: a fresh run refuses the folder,
    --overwrite replaces only the names it writes, and a shorter rerun removes only frames it recorded."""
    import interpolate

    out = tmp_path / "o"
    (out / "frames").mkdir(parents=True)
    user = {out / "frames" / f"frame_{i:05d}.png": f"user {i}".encode() for i in range(8)}
    for p, b in user.items():
        p.write_bytes(b)
    base = ["--checkpoint", str(fit_model), "--identities", "300", "301", "--out", str(out), *SIZE]
    with pytest.raises(SystemExit) as ei:  # refused: it would replace frame_00000..2
        interpolate.main([*base, "--frames", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ei.value.code == 2 and len(err) == 1 and "--overwrite" in err[0], err
    assert all(p.read_bytes() == b for p, b in user.items())
    interpolate.main([*base, "--frames", "4", "--overwrite"])  # 5 frames of its own replace the user's first 5
    assert [p.read_bytes() for p in sorted(user)][5:] == [b"user 5", b"user 6", b"user 7"]
    with pytest.raises(SystemExit):  # its own run is not silently replaced either
        interpolate.main([*base, "--frames", "2"])
    interpolate.main([*base, "--frames", "2", "--overwrite"])  # shorter: its frames 3, 4 go, the user's 5-7 stay
    names = sorted(p.name for p in (out / "frames").iterdir())
    assert names == [f"frame_{i:05d}.png" for i in (0, 1, 2, 5, 6, 7)], names
    assert video_frames(out / "interpolation.mp4") == 3


def test_per_gaussian_residual_reaches_the_frames(fit_model, tmp_path):  # noqa: F811
    """A code.pt with a per-Gaussian residual (track.py's video refinement): its key frame's Gaussians carry it
    (opacity, which does not depend on the pose, equals code_cloud's with the residual)."""
    import interpolate
    from models.gaussians import GaussianCloud
    from utils.data.code_file import FittedCode, code_cloud, save_code
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    f = model.field
    with torch.no_grad():
        w = f.style(f.codes.weight, update_w_avg=False).mean(0)
    base = model.base_vertices.mean(0)
    g = torch.zeros(f.num_vertices, f.K, 7)
    g[..., 6] = torch.linspace(-2.0, 2.0, f.num_vertices)[:, None]  # opacity logits
    path = save_code(tmp_path / "g" / "code.pt", FittedCode(w, None, base, "g", gaussians=g), model, str(fit_model))
    out = tmp_path / "out"
    with single_thread():
        s = interpolate.main(["--checkpoint", str(fit_model), "--identities", str(path), "300", "--frames", "2",
                              "--ply", "--out", str(out), *SIZE])
    assert s["gaussian_residuals"] == [True, False]
    got = GaussianCloud.load_ply(out / "keyframes" / "key_00_g.ply").opacities
    with torch.no_grad():
        want, plain = code_cloud(model, w, base, None, g).opacities, code_cloud(model, w, base).opacities
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-2)


@pytest.fixture(scope="module")
def level1(fit_model):  # noqa: F811
    """The small fit model (level 0) as a level-1 head: its network on the face mask subdivided once
    (benchmarks/lod_quality.py's stand-in), so that --lod has a coarser level."""
    from dataclasses import replace

    from benchmarks.lod_quality import field_at_level
    from utils.data.model_file import load_model

    model = load_model(fit_model, torch.device("cpu"))
    field, plan = field_at_level(model, 1)
    return replace(model, field=field, plan=plan)


def test_network_level_of_detail(level1, fit_model, fitted_code, tmp_path):  # noqa: F811
    """--lod L: the network runs on the coarser mesh (coarser_field): the key frames' PLYs hold one Gaussian per
    level-L vertex with the fitted key's colour residual on them, the frames look like full detail's; --lod auto and
    a level beyond the model's are refused before anything is written."""
    from dataclasses import replace

    import cv2
    import numpy as np

    from models.gaussians import GaussianCloud
    from utils.apps.interpolate import InterpolationConfig, interpolate

    cfg = InterpolationConfig(checkpoint=str(fit_model), identities=["300", str(fitted_code)], frames=2, ply=True,
                              width=40, height=48, progress=False, device="cpu")
    with single_thread():
        full = interpolate(replace(cfg, out=str(tmp_path / "full")), level1)
        low = interpolate(replace(cfg, out=str(tmp_path / "low"), lod="0"), level1)
    nc = level1.plan.num_vertices(0) * level1.field.K
    assert low["network_level"] == 0 and low["gaussians"] == nc and full["network_level"] == 1
    assert full["gaussians"] == level1.field.num_gaussians > nc
    for key in ("key_00_300.ply", "key_01_017.ply"):
        a = GaussianCloud.load_ply(tmp_path / "full" / "keyframes" / key)
        b = GaussianCloud.load_ply(tmp_path / "low" / "keyframes" / key)
        assert len(b) == nc
        # the kept vertices' colours (network output + the fitted colour residual) are full detail's
        assert torch.allclose(b.sh[:, 0], a.sh[:nc, 0], atol=1e-5)
    for n in range(3):
        x = cv2.imread(str(tmp_path / "full" / "frames" / f"frame_{n:05d}.png")).astype(np.float64) / 255
        y = cv2.imread(str(tmp_path / "low" / "frames" / f"frame_{n:05d}.png")).astype(np.float64) / 255
        assert 10 * math.log10(1 / max(((x - y) ** 2).mean(), 1e-12)) > 20.0
    for bad in ("auto", "2"):
        with pytest.raises(ValueError, match="--lod"):
            interpolate(replace(cfg, out=str(tmp_path / f"bad_{bad}"), lod=bad), level1)
        assert not (tmp_path / f"bad_{bad}" / "frames").exists()
