"""Pivotal tuning in the video refinement (utils/apps/track/video_refine.py, ``--video_refine.network_lr``): the
person's copy of the synthesis network is tuned, the shared model is not, and code.pt carries the tuning as a
per-Gaussian residual of every raw channel that every code consumer (code_cloud, the pose path of animate.py and the
viewer, interpolate.py's blending) applies."""
from __future__ import annotations

import copy

import pytest
import torch

from tests.test_fitting import fit_model, single_thread  # noqa: F401
from tests.test_video_avatar import FAST, clip  # noqa: F401
from tests.training_fixtures import preprocessed_root  # noqa: F401


def test_pivotal_tuning_is_baked_into_code(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """track.py --frames with network tuning: the tuned network's raw output for the fitted style equals the shared
    network's plus code.pt's (V, K, C) residual; the shared weights are bit-identical afterwards; the residual moves
    colour (which the 7-channel residual cannot); code.pt loads and renders the same through code_cloud and the pose
    path; it blends with a plain code and with a 7-channel one.  The shared FLAME shape is refined (default)."""
    from models.identity_field import IdentityField
    from models.posing import HeadAnimator
    from track import main
    from utils.apps.track import video_refine as VR
    from utils.data.code_file import FittedCode, code_cloud, load_code
    from utils.data.model_file import load_model
    from utils.identity import blend_gaussians, load_flame, model_flame_dir

    root, frames, lm = clip
    before = {k: v.clone() for k, v in load_model(fit_model).field.state_dict().items()}
    copies, real = [], copy.deepcopy

    def spy(obj, memo=None):  # records the person's network copy made by refine_video
        out = real(obj, memo)
        if isinstance(obj, IdentityField):
            copies.append(out)
        return out

    monkeypatch.setattr(VR.copy, "deepcopy", spy)
    out = tmp_path / "pti"
    with single_thread():
        m = main(["--checkpoint", str(fit_model), "--frames", str(frames), "--landmarks", str(lm),
                  "--flame_dir", str(root / "flame"), "--out", str(out), *FAST, "--video_refine.flame", "false",
                  "--video_refine.gaussians", "false", "--video_refine.network_lr", "0.01",
                  "--video_refine.gaussian_colour", "false"])  # the residual then holds the tuning alone
    assert len(copies) == 1 and m["refine"]["network_lr"] == 0.01
    model = load_model(fit_model)
    f, net = model.field, copies[0]
    after = f.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the shared model's weights changed"
    code = load_code(out / "code.pt", model)
    assert code.meta["refine_network"] and tuple(code.gaussians.shape) == (f.num_vertices, f.K, f.channels)
    with torch.no_grad():
        tuned = net.synthesize_raw(code.w[None])
        baked = f.add_residual(f.synthesize_raw(code.w[None]), code.gaussians)
        assert (tuned - f.synthesize_raw(code.w[None])).abs().max() > 1e-4, "the network was not tuned"
        assert torch.allclose(baked, tuned, atol=1e-5), float((baked - tuned).abs().max())
        sh = f._sl["sh"]
        assert code.gaussians[..., sh].abs().max() > 1e-5, "the tuning moved no colour"
        a = code_cloud(model, code.w, code.base_vertices, code.colour, code.gaussians)
        animator = HeadAnimator.from_model(model, load_flame(model, model_flame_dir(model, str(root / "flame"))))
        posed = animator.gaussians(animator.identity(code.w, code.flame, code.base_vertices, colour=code.colour,
                                                     gaussians=code.gaussians), code.flame)
    for k in ("means", "scales", "opacities", "sh"):
        assert torch.allclose(getattr(posed, k)[0], getattr(a, k), atol=1e-4), k
    plain = FittedCode(w=code.w, z=None, base_vertices=code.base_vertices)
    assert torch.equal(blend_gaussians(code, plain, 0.0), code.gaussians)
    seven = FittedCode(w=code.w, z=None, base_vertices=code.base_vertices, gaussians=torch.ones(f.num_vertices, f.K, 7))
    mid = blend_gaussians(code, seven, 0.5)  # the 7 channels spread into all C, zeros elsewhere
    assert tuple(mid.shape) == tuple(code.gaussians.shape)
    assert torch.allclose(mid[..., sh], 0.5 * code.gaussians[..., sh])
    assert torch.allclose(mid[..., 0:3], 0.5 * code.gaussians[..., 0:3] + 0.5)
    # the shared FLAME shape (--video_refine.flame_shape, on by default) is refined: one shape for every frame,
    # held-out ones included, moved away from the landmark fit, and code.pt's FLAME carries it
    import numpy as np

    track, refined = np.load(out / "flame_fit.npz"), np.load(out / "flame_refined.npz")
    assert code.meta["refine_shape"] and m["refine"]["flame_correction"]["shape_norm"] > 1e-4
    assert np.abs(refined["shape"] - track["shape"]).max() > 1e-5
    assert np.allclose(code.flame.shape.cpu().numpy().reshape(-1), refined["shape"].reshape(-1), atol=1e-6)
    assert np.array_equal(refined["expression"], track["expression"])  # per-frame corrections stay off
    with pytest.raises(ValueError, match="per-Gaussian residual"):
        f.add_residual(f.synthesize_raw(code.w[None]), torch.zeros(f.num_vertices, f.K, 5))
