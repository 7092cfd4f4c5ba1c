"""models/level_of_detail.py: merging a subdivided head's Gaussians into a coarser level, and picking the level."""
import math

import numpy as np
import pytest
import torch

from models.camera import Camera
from models.flame.subdivision import subdivide
from models.gaussians import GaussianCloud, sh0_to_rgb
from models.level_of_detail import (
    LevelOfDetail,
    _merge_moments,
    coarsest_level,
    merge_shares,
    merge_to_coarser,
    parse_lod,
    pick_level,
)
from models.renderer import render
from utils.losses import psnr


def _grid(n: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """An n x n triangulated grid in the z = 0 plane centred on the origin: (n*n, 3) vertices, faces."""
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    v = np.stack([(jj - (n - 1) / 2) * spacing, (ii - (n - 1) / 2) * spacing, 0 * ii], -1).reshape(-1, 3)
    idx = ii * n + jj
    f = []
    for i in range(n - 1):
        for j in range(n - 1):
            f += [(idx[i, j], idx[i, j + 1], idx[i + 1, j + 1]), (idx[i, j], idx[i + 1, j + 1], idx[i + 1, j])]
    return v.astype(np.float64), np.asarray(f, dtype=np.int64)


def _patch(levels: int = 1, n: int = 9, spacing: float = 0.02, opacity: float = 0.8, rgb=(0.8, 0.4, 0.2),
           sigma_rel: float = 0.6, seed: int | None = None):
    """Flat discs (tangent std sigma_rel x the finest spacing, normal std 1/10 of it) on a grid subdivided ``levels``
    times: (finest-level cloud, plan).  ``seed``: random colours and opacities instead of constant ones."""
    v0, f0 = _grid(n, spacing)
    out, plan = subdivide(v0, f0, levels, return_plan=True)
    v = torch.as_tensor(out[-1][0], dtype=torch.float32)
    N = len(v)
    s = sigma_rel * spacing / 2 ** levels
    scales = torch.tensor([s, s, 0.1 * s]).expand(N, 3).clone()
    quats = torch.tensor([1.0, 0, 0, 0]).expand(N, 4).clone()
    if seed is None:
        opac, col = torch.full((N,), opacity), torch.tensor(rgb).expand(N, 3).clone()
    else:
        g = torch.Generator().manual_seed(seed)
        opac, col = 0.02 + 0.06 * torch.rand(N, generator=g), torch.rand(N, 3, generator=g)
        scales = scales * (0.5 + torch.rand(N, 1, generator=g))
    return GaussianCloud.from_rgb(v, quats, scales, opac, col), plan


def _camera(distance: float, size: int = 64) -> Camera:
    return Camera.look_at((0.0, 0.0, distance), (0.0, 0.0, 0.0), (0, 1, 0), size, size, fov_y_deg=25)


def test_merged_count_is_the_coarse_vertex_count():
    fine, plan = _patch(levels=2)
    assert len(fine) == plan.num_vertices(2)
    assert len(merge_to_coarser(fine, plan, 2)) == plan.num_vertices(1)
    assert len(merge_to_coarser(fine, plan, 2, levels_down=2)) == plan.num_vertices(0)
    # K = 2 Gaussians per vertex (vertex-major) merge into one per coarse vertex
    two = GaussianCloud(*(torch.repeat_interleave(getattr(fine, k), 2, dim=0)
                          for k in ("means", "quats", "scales", "opacities", "sh")))
    assert len(merge_to_coarser(two, plan, 2, per_vertex=2)) == plan.num_vertices(1)
    with pytest.raises(ValueError):
        merge_to_coarser(two, plan, 2)  # the count does not fit K = 1


def test_flat_patch_of_identical_gaussians_renders_like_the_fine_one():
    fine, plan = _patch(levels=1, opacity=0.8)
    cam = _camera(0.6)  # the patch fills the middle of the frame, fine discs ~2.4 px apart
    inner = slice(22, 42)  # away from the patch's border (border vertices have fewer children)
    a = render(fine, cam, backend="torch")
    ia = a["image"][inner, inner]
    for mode in ("optical_depth", "mass"):
        coarse = merge_to_coarser(fine, plan, 1, opacity=mode)
        b = render(coarse, cam, backend="torch")
        assert abs(float(b["alpha"][inner, inner].min()) - float(a["alpha"][inner, inner].min())) < 0.03, mode
        assert float(psnr(b["image"][inner, inner], ia)) > 35.0, mode
        # the merged discs are flat discs in the same plane, larger than the fine ones, as opaque as them
        assert float(coarse.means[:, 2].abs().max()) < 1e-6
        assert float(coarse.scales.min(-1).values.max()) < 0.5 * float(coarse.scales.max(-1).values.min())
        assert float(coarse.scales.max()) > 1.5 * float(fine.scales.max())
        assert torch.allclose(coarse.opacities.median(), torch.tensor(0.8), atol=0.02)
    # why the coverage floor: plain moment matching leaves gaps between the (too narrow) merged discs
    plain = render(merge_to_coarser(fine, plan, 1, coverage_floor=False), cam, backend="torch")
    assert float(plain["alpha"][inner, inner].min()) < float(a["alpha"][inner, inner].min()) - 0.08
    assert float(psnr(plain["image"][inner, inner], ia)) < 32.0


def test_weights_conserve_colour_opacity_mass():
    fine, plan = _patch(levels=1, seed=0)
    shares = merge_shares(plan, 1)[0]
    m = _merge_moments(fine, shares)
    W, sh = m["W"], m["sh"]
    s = fine.scales.sort(-1, descending=True).values
    w = fine.opacities * s[:, 0] * s[:, 1]
    assert torch.allclose(W.sum(), w.sum(), rtol=1e-5)  # every fine Gaussian's shares sum to 1
    rgb = sh0_to_rgb(sh[:, 0])  # weighted SH means -> weighted colour means (the DC term is linear)
    assert torch.allclose((W[:, None] * rgb).sum(0), (w[:, None] * fine.rgb).sum(0), rtol=1e-5)
    # with faint Gaussians nothing is capped: the merged cloud carries the same colour-opacity mass o s1 s2 rgb
    coarse = merge_to_coarser(fine, plan, 1, opacity="mass")
    sc = coarse.scales.sort(-1, descending=True).values
    mass = lambda c, ss: (c.opacities * ss[:, 0] * ss[:, 1])[:, None] * c.rgb  # noqa: E731
    assert float(coarse.opacities.max()) < 0.9
    assert torch.allclose(mass(coarse, sc).sum(0), mass(fine, s).sum(0), rtol=1e-4)
    # optical-depth mode: for faint Gaussians Li2(o) ~ o, the same mass within a few per cent
    od = merge_to_coarser(fine, plan, 1)
    so = od.scales.sort(-1, descending=True).values
    assert torch.allclose(mass(od, so).sum(0), mass(fine, s).sum(0), rtol=0.03)


def test_batched_merge_equals_per_head_merge():
    fine, plan = _patch(levels=1, seed=1)
    moved = fine.clone()
    moved.means = moved.means + torch.tensor([0.01, -0.02, 0.3])
    batch = GaussianCloud(*(torch.stack([getattr(fine, k), getattr(moved, k)])
                            for k in ("means", "quats", "scales", "opacities", "sh")))
    out = merge_to_coarser(batch, plan, 1)
    one = merge_to_coarser(moved, plan, 1)
    assert out.batch_shape == (2,)
    assert torch.allclose(out[1].means, one.means, atol=1e-6)
    assert torch.allclose(out[1].covariances(), one.covariances(), atol=1e-9)
    assert torch.allclose(out[1].opacities, one.opacities, atol=1e-6)


def test_pick_level_gets_full_detail_back_when_zoomed_in():
    assert pick_level([0.8, 0.4, 0.2], 1.0) == 0   # the coarsest level already stays under the threshold
    assert pick_level([2.0, 0.9, 0.5], 1.0) == 1
    assert pick_level([8.0, 4.0, 2.0], 1.0) == 2   # even the finest exceeds it: full detail
    fine, plan = _patch(levels=2, n=5)
    lod = LevelOfDetail.build(fine, plan, 2, coarsest_level=0)
    assert [len(c) for c in lod.levels] == [plan.num_vertices(i) for i in range(3)]
    assert lod.level_numbers == [0, 1, 2]
    far, near = _camera(5.0), _camera(0.05)
    assert lod.level_index(far) == 0 and len(lod.cloud_for(far)) == plan.num_vertices(0)
    assert lod.level_index(near) == 2 and lod.cloud_for(near) is fine
    fp = lod.footprints(_camera(0.5))
    assert fp[0] > fp[1] > fp[2] > 0  # coarser levels have larger footprints
    # re-posed head: update keeps the levels and follows the new positions
    moved = fine.clone()
    moved.means = moved.means + torch.tensor([0.0, 0.0, 0.1])
    lod.update(moved)
    assert math.isclose(float(lod.levels[0].means[:, 2].mean()), 0.1, rel_tol=1e-5)


def test_prebuilt_and_kept_shares_give_the_same_merge():
    """merge_to_coarser with shares built once (merge_shares) or by LevelOfDetail (kept on the object, no module
    cache) gives the merge of shares built per call; shares of another step count are refused."""
    fine, plan = _patch(levels=2, n=5, seed=3)
    ref = merge_to_coarser(fine, plan, 2, levels_down=2)
    pre = merge_to_coarser(fine, plan, 2, levels_down=2, shares=merge_shares(plan, 2, 2))
    lod = LevelOfDetail(plan, 2)
    kept = lod.merge(fine, 0)
    for got in (pre, kept):
        for name in ("means", "quats", "scales", "opacities", "sh"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
    assert len(lod.shares) == 2  # one per level step, built on first use ...
    first = dict(lod.shares)
    lod.merge(fine, 0)
    assert all(lod.shares[k] is first[k] for k in first)  # ... and kept
    # a batch through LevelOfDetail.merge: each head merged as alone
    moved = fine.clone()
    moved.means = moved.means + 0.05
    batch = GaussianCloud(*(torch.stack([getattr(fine, k), getattr(moved, k)])
                            for k in ("means", "quats", "scales", "opacities", "sh")))
    assert torch.allclose(lod.merge(batch, 1)[1].means, lod.merge(moved, 1).means, atol=1e-6)
    assert lod.merge(fine, 2) is fine
    with pytest.raises(ValueError):
        merge_to_coarser(fine, plan, 2, levels_down=2, shares=merge_shares(plan, 2, 1))


def test_estimate_index_picks_as_level_index_without_merging():
    """A re-posed head's level from its own full-detail footprint and the held pose's level ratios: the held pose
    itself gives level_index's pick, and a head moved far away picks the coarsest level without a merge."""
    fine, plan = _patch(levels=2, n=5)
    lod = LevelOfDetail.build(fine, plan, 2, coarsest_level=0)
    for d in (0.05, 0.3, 0.6, 1.0, 5.0):
        assert lod.estimate_index(fine, _camera(d)) == lod.level_index(_camera(d)), d
    far = fine.clone()
    far.means = far.means + torch.tensor([0.0, 0.0, -4.85])  # 5 m from the camera at 0.15
    held = [c.means.clone() for c in lod.levels]
    assert lod.level_index(_camera(0.15)) == 2 and lod.estimate_index(far, _camera(0.15)) == 0
    assert all(torch.equal(c.means, h) for c, h in zip(lod.levels, held))  # nothing re-merged


def test_parse_lod_and_coarsest_level():
    """--lod as users write it: any case and spaces; a level above the model's, or anything else, is an error;
    the coarsest level merged is the fixed level itself, or --lod_levels below the full one (not below 0) for auto."""
    assert parse_lod(" AUTO ", 3) == "auto" and parse_lod("Off", 3) == "off" and parse_lod(2, 3) == 2
    for bad in ("4", "-1", "fast", ""):
        with pytest.raises(ValueError, match="--lod must be"):
            parse_lod(bad, 3)
    assert coarsest_level("auto", 3, 1) == 2 and coarsest_level("auto", 1, 3) == 0
    assert coarsest_level(parse_lod("1", 3), 3, 1) == 1


def test_coarser_field_runs_the_same_network_on_the_coarse_prefix():
    """coarser_field: the raw network output at the kept (prefix) vertices is the fine field's, Gaussians there are
    about twice as wide (edge length), the 3D filter's rates follow the prefix, and a flat grid's coarse render
    looks like the fine one."""
    from models.identity_field import IdentityField, IdentityFieldConfig
    from models.level_of_detail import coarser_field

    v0, f0 = _grid(7, 0.03)
    out, plan = subdivide(v0, f0, 2, return_plan=True)
    verts = torch.as_tensor(out[-1][0], dtype=torch.float32)
    torch.manual_seed(0)
    fine = IdentityField(IdentityFieldConfig(hidden=16, synth_layers=2, style_dim=32, code_dim=8, feat_dim=4,
                                             head_init_std=0.1), 2, verts, out[-1][1])
    with torch.no_grad():
        fine.template_features.normal_()
    fine.set_sampling_rate(torch.linspace(100.0, 400.0, fine.num_vertices))
    coarse = coarser_field(fine, plan, 1)
    vc = plan.num_vertices(1)
    assert coarse.num_vertices == vc and not coarse.training
    assert torch.equal(coarse.sampling_rate, fine.sampling_rate[:vc])
    with torch.no_grad():
        w = fine.style(fine.codes.weight[:1], update_w_avg=False)
        assert torch.allclose(coarse.synthesize_raw(w), fine.synthesize_raw(w)[:, :vc], atol=1e-6)
        a, b = fine.synthesize(w, verts[None]), coarse.synthesize(w, verts[None, :vc])
    inner = (verts[:vc, :2].abs() < 0.05).all(-1)  # away from the border (edge lengths there are one-sided)
    ratio = (b.scales[0, inner, :2] / a.scales[0, :vc][inner, :2]).median()
    assert 1.6 < float(ratio) < 2.4, float(ratio)
    assert bool((b.opacities[0] >= a.opacities[0, :vc] - 1e-6).all())  # wider under the same filter: damped less
    with pytest.raises(ValueError, match="levels_down"):
        coarser_field(fine, plan, 3)
    cam = _camera(0.4)
    full, low = render(a[0], cam)["image"], render(b[0], cam)["image"]
    assert float(psnr(low, full)) > 20.0
