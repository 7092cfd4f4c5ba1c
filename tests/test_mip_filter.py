"""Tests of models/mip_filter.py and the Mip-Splatting filters in the renderer and the identity field."""
from __future__ import annotations

import math

import pytest
import torch

from models import renderer as R
from models.camera import Camera, stack_cameras
from models.gaussians import GaussianCloud, quat_to_rotmat, random_cloud
from models.identity_field import IdentityField, IdentityFieldConfig
from models.mip_filter import (
    apply_3d_filter,
    display_filter,
    filter_variance,
    render_filter,
    sampling_rate,
    set_render_filter,
)

F64 = torch.float64


def _cam(width=40, height=32, eye=(0.0, 0.0, 1.0), f=60.0) -> Camera:
    return Camera.look_at(eye, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), width, height, fx=f, fy=f)


# ------------------------------------------------------------------------------------------------- 3D filter
def test_apply_3d_filter_adds_variance_and_keeps_the_integral():
    g = torch.Generator().manual_seed(0)
    c = random_cloud(50, generator=g).to(dtype=F64)
    var = torch.rand(50, generator=g, dtype=F64) * 1e-4
    s, o = apply_3d_filter(c.scales, c.opacities, var)
    rot = quat_to_rotmat(c.quats)
    cov = rot @ torch.diag_embed(c.scales ** 2) @ rot.transpose(-1, -2)
    cov_f = rot @ torch.diag_embed(s ** 2) @ rot.transpose(-1, -2)
    assert torch.allclose(cov_f, cov + var[:, None, None] * torch.eye(3, dtype=F64), atol=1e-14)
    # integral of o * exp(-x^T S^-1 x / 2) is o * sqrt(det S) (2 pi)^1.5: unchanged by the filter
    assert torch.allclose(o * torch.linalg.det(cov_f).sqrt(), c.opacities * torch.linalg.det(cov).sqrt(), rtol=1e-10)
    assert bool((o <= c.opacities).all()) and bool((s >= c.scales).all())
    # surface variant: the ratio over the two largest axes (a flat disc keeps its face-on 2D integral)
    disc = torch.tensor([[1e-2, 2e-2, 1e-6]], dtype=F64)
    s_d, o_d = apply_3d_filter(disc, torch.tensor([0.9], dtype=F64), torch.tensor([1e-4], dtype=F64), surface=True)
    assert o_d.item() == pytest.approx(0.9 * float((disc[0, :2] / s_d[0, :2]).prod()), rel=1e-12)
    assert o_d.item() * float(s_d[0, :2].prod()) == pytest.approx(0.9 * float(disc[0, :2].prod()), rel=1e-12)
    _, o_full = apply_3d_filter(disc, torch.tensor([0.9], dtype=F64), torch.tensor([1e-4], dtype=F64))
    assert o_full.item() < 1e-3  # the full 3D ratio all but erases a flat disc
    # zero variance: identity
    s0, o0 = apply_3d_filter(c.scales, c.opacities, torch.zeros(50, dtype=F64))
    assert torch.equal(s0, c.scales) and torch.allclose(o0, c.opacities)


def _backward_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("surface", [False, True])
def test_apply_3d_filter_backward_has_no_host_sync(surface):
    """prod()'s backward counts zeros with ``.item()``: a host sync per training step on a GPU and a failed CUDA-graph
    capture of the fit's backward (measured on an H200: cudaErrorStreamCaptureUnsupported, 8 ms per training step).
    The filter must build its determinant ratio without it, and still equal the product of the per-axis ratios."""
    scales = (torch.rand(5, 7, 3) * 0.01 + 1e-4).requires_grad_(True)
    opac = torch.rand(5, 7).requires_grad_(True)
    var = torch.full((5, 7), 2e-5)
    s, o = apply_3d_filter(scales, opac, var, surface=surface)
    names = _backward_nodes(o.sum() + s.sum())
    assert not any(n.startswith("ProdBackward") for n in names), names
    per_axis = scales.detach() ** 2 / (scales.detach() ** 2 + var[..., None])
    ratio = per_axis.prod(-1) / (per_axis.min(-1).values if surface else 1.0)
    torch.testing.assert_close(o.detach(), opac.detach() * ratio.sqrt())


def test_sampling_rate_is_focal_over_depth_of_the_closest_seeing_camera():
    verts = torch.tensor([[[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [5.0, 0.0, 0.0]]])  # last: outside every view
    near, far = _cam(eye=(0, 0, 1.0), f=60.0), _cam(eye=(0, 0, 2.0), f=100.0)
    nu = sampling_rate(verts, [[near, far]])
    assert nu[0].item() == pytest.approx(60.0, rel=1e-6)  # 60 / 1 beats 100 / 2
    assert nu[1].item() == pytest.approx(60.0, rel=1e-6)
    assert nu[2].item() == pytest.approx(float(nu[:2].min()))  # unseen: the smallest seen rate (largest filter)
    # a camera behind the vertices sees nothing; the max over identities is taken
    verts2 = torch.cat([verts, verts * 0.5])
    nu2 = sampling_rate(verts2, [[near], [_cam(eye=(0, 0, 0.5), f=60.0)]])
    assert nu2[0].item() == pytest.approx(120.0, rel=1e-6)
    with pytest.raises(ValueError, match="no training camera"):
        sampling_rate(verts, [[Camera.look_at((0, 0, 1.0), (0, 0, 2.0))]])  # looks away from them
    assert torch.allclose(filter_variance(torch.tensor([10.0, 0.0]), 0.2), torch.tensor([0.002, 0.0]))


def test_identity_field_applies_the_3d_filter_in_its_output_path():
    from tests.test_identity_field import _mesh  # noqa: PLC0415  (the identity-field tests' small mesh)

    verts, faces = _mesh()
    field = IdentityField(IdentityFieldConfig(code_dim=8, style_dim=16, hidden=16, feat_dim=4, filter_3d=0.2,
                                              filter_3d_surface=False), 2, verts, faces)
    ids = torch.tensor([0, 1])
    base = field(ids, verts)
    rate = torch.full((field.num_vertices,), 50.0)
    field.set_sampling_rate(rate)
    filt = field(ids, verts)
    var = 0.2 / 50.0 ** 2
    assert torch.allclose(filt.scales, (base.scales ** 2 + var).sqrt(), rtol=1e-5)
    ratio = (base.scales ** 2 / (base.scales ** 2 + var)).prod(-1).sqrt()
    assert torch.allclose(filt.opacities, base.opacities * ratio, rtol=1e-5)
    assert torch.equal(filt.means, base.means)
    assert "filter_variance" not in field.state_dict()  # weights (and their fingerprint) unchanged
    field.set_sampling_rate(None)
    assert torch.equal(field(ids, verts).scales, base.scales)
    with pytest.raises(ValueError, match="positive finite"):
        field.set_sampling_rate(torch.zeros(field.num_vertices))


# ------------------------------------------------------------------------------------------------- 2D filter
def _gsplat_reference(cloud: GaussianCloud, cams: list[Camera], eps: float, antialiased: bool):
    """gsplat's own pure-PyTorch projection (gsplat.cuda._torch_impl, runs on CPU)."""
    from gsplat.cuda._torch_impl import _fully_fused_projection

    K, w2c, W, H = stack_cameras(cams)
    covars = cloud.covariances()
    return _fully_fused_projection(cloud.means, covars, w2c.to(cloud.means), K.to(cloud.means), W, H, eps2d=eps,
                                   calc_compensations=antialiased)


@pytest.mark.parametrize("eps,antialiased", [(0.3, False), (0.1, True), (0.3, True)])
def test_torch_projection_matches_gsplat_reference(eps, antialiased):
    pytest.importorskip("gsplat")
    g = torch.Generator().manual_seed(1)
    cloud = random_cloud(200, radius=0.1, scale_range=(1e-4, 0.01), generator=g).to(dtype=F64)
    cams = [_cam(), _cam(eye=(0.3, 0.1, 0.9), f=80.0)]
    radii, means2d, depths, conics, comp = _gsplat_reference(cloud, cams, eps, antialiased)
    proj = R._project_cameras(cloud, cams, eps if antialiased else None)
    ok = (proj["radii"][..., 0] > 0) & (radii[..., 0] > 0)
    assert int(ok.sum()) > 250
    assert torch.allclose(proj["means2d"][ok], means2d[ok], atol=1e-9)
    assert torch.allclose(proj["conic"][ok], conics[ok], rtol=1e-9, atol=1e-9)
    want = cloud.opacities.expand_as(ok) * (comp if antialiased else 1.0)
    assert torch.allclose(proj["opac"][ok], want[ok], rtol=1e-9)
    if antialiased:  # tiny Gaussians lose most of their opacity, large ones almost none
        assert float(comp[ok].min()) < 0.2 and float(comp[ok].max()) > 0.5


def test_2d_filter_keeps_a_tiny_gaussians_integral_and_default_follows_set_render_filter():
    cam = _cam(width=33, height=33, f=60.0)
    tiny = GaussianCloud.from_rgb(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 1e-5),
                                  torch.tensor([0.9]), torch.ones(1, 3))
    classic = R.render(tiny, cam, backend="torch", filter_2d=None)["alpha"].sum()
    aa = R.render(tiny, cam, backend="torch", filter_2d=0.1)["alpha"].sum()
    # classic dilation paints 0.9 * 2 pi 0.3 px^2 of alpha, the compensated filter ~the Gaussian's own tiny integral
    assert float(classic) == pytest.approx(0.9 * 2 * math.pi * 0.3, rel=0.05)
    assert float(aa) < 1e-3 * float(classic)
    set_render_filter(0.1)
    assert torch.equal(R.render(tiny, cam, backend="torch")["alpha"].sum(), aa)
    set_render_filter(None)
    assert torch.equal(R.render(tiny, cam, backend="torch")["alpha"].sum(), classic)
    with pytest.raises(ValueError, match="filter_2d"):
        R.render(tiny, cam, backend="torch", filter_2d=-1.0)


def test_render_filter_scope_restores_the_process_setting_and_display_filter_follows_the_config(monkeypatch):
    """render_filter sets the tools' 2D filter inside and gives the caller's setting back after (also on an error);
    display_filter: render_filter_2d, else the training filter_2d, None for a model trained with the dilation."""
    monkeypatch.setattr(R, "FILTER_2D", None)
    monkeypatch.setattr(R, "FILTER_2D_COMPENSATION", "opacity")
    with render_filter(0.3, "optical_depth"):
        assert (R.FILTER_2D, R.FILTER_2D_COMPENSATION) == (0.3, "optical_depth")
    assert (R.FILTER_2D, R.FILTER_2D_COMPENSATION) == (None, "opacity")
    with pytest.raises(RuntimeError), render_filter(0.2, "optical_depth"):
        raise RuntimeError("inside")
    assert (R.FILTER_2D, R.FILTER_2D_COMPENSATION) == (None, "opacity")
    cfg = IdentityFieldConfig()
    assert display_filter(cfg) == (cfg.render_filter_2d, cfg.render_compensation)
    cfg.render_filter_2d = 0.0
    assert display_filter(cfg)[0] == cfg.filter_2d
    cfg.filter_2d = 0.0
    assert display_filter(cfg)[0] is None


def test_2d_filter_gradients_flow_to_scales_and_opacities():
    g = torch.Generator().manual_seed(2)
    cloud = random_cloud(30, radius=0.05, scale_range=(1e-4, 0.005), generator=g)
    scales = cloud.scales.clone().requires_grad_(True)
    opac = cloud.opacities.clone().requires_grad_(True)
    c = GaussianCloud(cloud.means, cloud.quats, scales, opac, cloud.sh)
    R.render(c, _cam(), backend="torch", filter_2d=0.1)["image"].sum().backward()
    assert scales.grad is not None and float(scales.grad.abs().sum()) > 0
    assert opac.grad is not None and float(opac.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------- model.pt
from tests.training_fixtures import preprocessed_root, trained_model_dir  # noqa: E402,F401


def test_model_pt_stores_the_sampling_rate_and_old_files_load_without_filter(trained_model_dir, tmp_path, capsys):
    from utils.core.torch_files import safe_torch_load
    from utils.data.model_file import FORMAT_VERSION, load_model

    path = trained_model_dir / "model.pt"
    doc = safe_torch_load(path, "model file")
    assert doc["version"] == FORMAT_VERSION == 4
    rate = doc["sampling_rate"]
    assert rate.ndim == 1 and bool((rate > 0).all())
    m = load_model(path)
    assert m.config["model"]["filter_2d"] == pytest.approx(0.1)  # trained with 0.1 px^2, rendered with 0.3 px^2
    assert m.filter_2d == pytest.approx(0.3) and R.FILTER_2D == pytest.approx(0.3)
    assert R.FILTER_2D_COMPENSATION == "optical_depth"  # the model's render_compensation
    assert torch.equal(m.field.sampling_rate, rate) and m.field.filter_variance is not None
    verts = m.vertices(m.base_vertices[:1])
    filt = m.field(m.field.codes.weight[:1], verts)[0]
    # the stored rate is the training cameras' focal / depth: a Gaussian is at least sqrt(0.2) training px wide
    assert bool((filt.scales.min(-1).values * rate >= math.sqrt(0.2) * (1 - 1e-4)).all())
    # a PLY export carries the filtered Gaussians (the filter baked into scales and opacities)
    filt.save_ply(tmp_path / "head.ply")
    back = GaussianCloud.load_ply(tmp_path / "head.ply")
    assert torch.allclose(back.scales, filt.scales, rtol=1e-5) and torch.allclose(back.opacities, filt.opacities,
                                                                                   atol=1e-5)
    # a file of format 3 (no rate, no filter keys in its config): loads, says so in one line, renders unfiltered
    old = dict(doc)
    old.pop("sampling_rate")
    old["version"] = 3
    old["config"] = {**doc["config"], "model": {k: v for k, v in doc["config"]["model"].items()
                                                 if k not in ("filter_3d", "filter_2d")}}
    torch.save(old, tmp_path / "old.pt")
    capsys.readouterr()
    m3 = load_model(tmp_path / "old.pt")
    assert m3.field.filter_variance is None and m3.filter_2d is None and R.FILTER_2D is None
    plain = m3.field(m3.field.codes.weight[:1], verts)[0]
    assert bool((plain.scales < filt.scales).all())
    # a format-3 file whose config asks for the filter (trained with it but exported without the rate): a notice
    old["config"] = doc["config"]
    torch.save(old, tmp_path / "old2.pt")
    load_model(tmp_path / "old2.pt")
    out = capsys.readouterr().out
    assert out.count("no stored sampling rate") == 1


def test_optical_depth_compensation_keeps_an_opaque_surface_opaque_when_zoomed_out(monkeypatch):
    """``FILTER_2D_COMPENSATION``: "opacity" (o r) and "optical_depth" (1 - (1 - o)^r) agree for a faint Gaussian;
    for an opaque surface of overlapping Gaussians seen from far away (every footprint far below the filter),
    o r lets the composited alpha sink while 1 - (1 - o)^r keeps it near 1."""
    from models.renderer.common import compensate_opacity

    o, r = torch.tensor([0.01, 0.9, 0.99]), torch.tensor(0.2)
    faint_od, faint_op = compensate_opacity(o, r, "optical_depth")[0], compensate_opacity(o, r, "opacity")[0]
    assert float(faint_od) == pytest.approx(float(faint_op), rel=0.01)
    assert bool((compensate_opacity(o, r, "optical_depth") >= compensate_opacity(o, r, "opacity")).all())
    assert float(compensate_opacity(o, torch.tensor(1.0), "optical_depth")[1]) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="FILTER_2D_COMPENSATION must be one of"):
        compensate_opacity(o, r, "area")
    # a 20x20 grid of opaque (0.95) Gaussians 1 mm apart, 1 mm wide: a surface; seen from 2 m at 60 px focal its
    # Gaussians are ~0.03 px, the whole patch under a pixel
    n = 20
    g = torch.linspace(-0.01, 0.01, n)
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    means = torch.cat([xy, torch.zeros(len(xy), 1)], 1)
    quats = torch.tensor([[1.0, 0, 0, 0]]).expand(len(xy), 4)
    surf = GaussianCloud.from_rgb(means, quats, torch.full((len(xy), 3), 1e-3), torch.full((len(xy),), 0.95),
                                  torch.ones(len(xy), 3))
    far = _cam(width=9, height=9, eye=(0.0, 0.0, 2.0), f=60.0)
    near = _cam(width=41, height=41, eye=(0.0, 0.0, 0.05), f=600.0)
    peak = {}
    for mode in R.settings.COMPENSATIONS:
        monkeypatch.setattr(R, "FILTER_2D_COMPENSATION", mode)
        peak[mode] = float(R.render(surf, far, backend="torch", filter_2d=0.3)["alpha"].max())
        # close up the footprints dwarf the filter: both modes give the same image
        peak[mode, "near"] = R.render(surf, near, backend="torch", filter_2d=0.3)["alpha"]
    assert peak["optical_depth"] > 0.9 > peak["opacity"] + 0.1, peak
    assert torch.allclose(peak["optical_depth", "near"], peak["opacity", "near"], atol=0.02)
    set_render_filter(0.3, "optical_depth")
    assert R.FILTER_2D == pytest.approx(0.3) and R.FILTER_2D_COMPENSATION == "optical_depth"
    with pytest.raises(ValueError, match="compensation must be one of"):
        set_render_filter(0.3, "box")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat runs on CUDA only: run this file on the GPU machine")
def test_gsplat_matches_torch_in_both_compensation_modes_on_cuda(monkeypatch):
    """gsplat's "optical_depth" path (its projection / tile / rasterize steps run separately, the compensation in
    between) gives the torch backend's images, alphas, depths and gradients; in "opacity" mode rasterization() does.
    The zoomed-out opaque patch of the CPU test above tells the two modes apart on gsplat too."""
    pytest.importorskip("gsplat")
    monkeypatch.setattr(R, "MAX_ALPHA", 0.999)  # gsplat's largest alpha
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(3)
    cloud = random_cloud(3000, radius=0.12, scale_range=(5e-4, 0.008), generator=g).to(dev)
    cams = [_cam(64, 48, f=90.0), _cam(64, 48, eye=(0.4, 0.1, 0.9), f=60.0)]
    bg = torch.tensor([0.2, 0.3, 0.4], device=dev)
    alphas = {}
    for mode in R.settings.COMPENSATIONS:
        monkeypatch.setattr(R, "FILTER_2D_COMPENSATION", mode)
        res = {}
        for backend in ("torch", "gsplat"):
            leaves = [t.detach().clone().requires_grad_(True) for t in (cloud.means, cloud.scales, cloud.opacities,
                                                                         cloud.sh)]
            c = GaussianCloud(leaves[0], cloud.quats, leaves[1], leaves[2], leaves[3])
            out = R.render_batch(c, cams, bg, backend=backend, filter_2d=0.3)
            w = torch.linspace(0.5, 1.5, out["image"].numel(), device=dev).reshape(out["image"].shape)
            ((out["image"] * w).sum() + out["alpha"].sum()).backward()
            res[backend] = (out, [t.grad for t in leaves])
        (ot, gt), (og, gg) = res["torch"], res["gsplat"]
        assert float((ot["image"] - og["image"]).abs().max()) < 4e-3, mode
        assert float((ot["alpha"] - og["alpha"]).abs().max()) < 4e-3, mode
        both = (ot["alpha"] > 0.5) & (og["alpha"] > 0.5)
        assert int(both.sum()) > 300 and torch.allclose(ot["depth"][both], og["depth"][both], atol=1e-3), mode
        for a, b in zip(gt, gg):
            assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.999, mode
        alphas[mode] = og["alpha"]
    assert float((alphas["optical_depth"] - alphas["opacity"]).abs().max()) > 0.01  # the new path is not the old
    assert bool((alphas["optical_depth"] >= alphas["opacity"] - 1e-4).all())
