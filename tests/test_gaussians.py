"""Tests of models/gaussians.py: container API, PLY I/O in the standard 3DGS layout, rotations, KNN scale init."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from models.gaussians import (
    GaussianCloud,
    knn_scale_init,
    quat_to_rotmat,
    random_cloud,
    rgb_to_sh0,
    rotmat_to_quat,
    sh0_to_rgb,
)


def _cloud(n=50, degree=0, seed=0) -> GaussianCloud:
    return random_cloud(n, sh_degree=degree, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_ply_round_trip_exact_to_float32(tmp_path, degree):
    c = _cloud(40, degree)
    path = tmp_path / "sub" / "cloud.ply"
    c.save_ply(path)
    back = GaussianCloud.load_ply(path)
    assert back.sh_degree == degree
    torch.testing.assert_close(back.means, c.means, rtol=0, atol=0)  # stored verbatim
    torch.testing.assert_close(back.quats, c.quats, rtol=0, atol=0)
    torch.testing.assert_close(back.sh, c.sh, rtol=0, atol=0)
    # log / logit storage: exact up to float32 rounding of the stored value
    torch.testing.assert_close(back.scales, c.scales, rtol=2e-6, atol=0)
    torch.testing.assert_close(back.opacities, c.opacities, rtol=2e-6, atol=1e-7)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_ply_property_names_and_f_rest_order(tmp_path):
    degree = 2
    c = _cloud(3, degree)
    c.save_ply(tmp_path / "c.ply")
    v = PlyData.read(str(tmp_path / "c.ply"))["vertex"]
    names = [p.name for p in v.properties]
    k_rest = 3 * ((degree + 1) ** 2 - 1)
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    expected += [f"f_rest_{i}" for i in range(k_rest)]
    expected += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == expected
    assert all(p.val_dtype in ("f4", "float32") for p in v.properties)
    # f_rest is channel-major: all coefficients of R, then G, then B (the original 3DGS layout).
    n_coef = (degree + 1) ** 2 - 1
    for ch in range(3):
        for j in range(n_coef):
            np.testing.assert_array_equal(v[f"f_rest_{ch * n_coef + j}"], c.sh[:, 1 + j, ch].numpy())
    np.testing.assert_allclose(v["opacity"], torch.logit(c.opacities.double()).numpy(), rtol=1e-5)
    np.testing.assert_allclose(v["scale_1"], torch.log(c.scales[:, 1].double()).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(v["rot_0"], c.quats[:, 0].numpy())  # w first


def test_load_ply_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ply"):
        GaussianCloud.load_ply(tmp_path / "missing.ply")
    vert = np.zeros(2, dtype=[(n, "f4") for n in ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]])
    PlyData([PlyElement.describe(vert, "vertex")]).write(str(tmp_path / "partial.ply"))
    with pytest.raises(ValueError, match="scale_0"):
        GaussianCloud.load_ply(tmp_path / "partial.ply")
    (tmp_path / "junk.ply").write_text("not a ply")
    with pytest.raises(ValueError, match="junk.ply"):
        GaussianCloud.load_ply(tmp_path / "junk.ply")
    with pytest.raises(ValueError, match="unbatched"):
        c = _cloud(2)
        GaussianCloud(c.means[None], c.quats[None], c.scales[None], c.opacities[None], c.sh[None]).save_ply(
            tmp_path / "b.ply"
        )


def test_container_api():
    a, b = _cloud(5, 1, seed=1), _cloud(7, 1, seed=2)
    c = GaussianCloud.cat([a, b])
    assert len(c) == 12 and c.sh.shape == (12, 4, 3) and c.opacities.shape == (12,)
    torch.testing.assert_close(c.means[5:], b.means)
    torch.testing.assert_close(c.sh[:5], a.sh)
    with pytest.raises(ValueError, match="SH degrees"):
        GaussianCloud.cat([a, _cloud(3, 0)])
    with pytest.raises(ValueError, match="at least one"):
        GaussianCloud.cat([])
    # batched clouds: index, cat along N keeps the batch
    batched = GaussianCloud(*(torch.stack([getattr(a, f), getattr(a, f) * 2]) for f in
                              ("means", "quats", "scales", "opacities", "sh")))
    assert batched.batch_shape == (2,) and len(batched) == 5
    torch.testing.assert_close(batched[1].means, a.means * 2)
    assert len(GaussianCloud.cat([batched, batched])) == 10
    with pytest.raises(IndexError):
        a[0]
    d = a.to(torch.float64)
    assert d.means.dtype == torch.float64 and d.sh.dtype == torch.float64
    p = a.clone()
    p.means.requires_grad_(True)
    assert not p.detach().means.requires_grad
    q = p.clone()
    q.scales.mul_(2)
    torch.testing.assert_close(p.scales, a.scales)  # clone copies
    torch.testing.assert_close(a.rgb, sh0_to_rgb(a.sh[:, 0]))
    rgb = torch.rand(4, 3)
    torch.testing.assert_close(sh0_to_rgb(rgb_to_sh0(rgb)), rgb)
    f = GaussianCloud.from_rgb(a.means[:4], a.quats[:4], a.scales[:4], a.opacities[:4], rgb)
    assert f.sh_degree == 0
    torch.testing.assert_close(f.rgb, rgb)


@pytest.mark.parametrize(
    "field,shape",
    [("means", (5, 2)), ("quats", (5, 3)), ("scales", (4, 3)), ("opacities", (5, 1)), ("sh", (5, 3, 3)),
     ("sh", (5, 4, 2))],
)
def test_bad_shapes_raise(field, shape):
    kw = {f: getattr(_cloud(5, 1), f) for f in ("means", "quats", "scales", "opacities", "sh")}
    kw[field] = torch.zeros(shape)
    with pytest.raises(ValueError, match="GaussianCloud"):
        GaussianCloud(**kw)


def test_check_finite_names_the_attribute():
    c = _cloud(4)
    c.scales[1, 2] = float("inf")
    with pytest.raises(ValueError, match="scales"):
        c.check_finite()


def test_quat_rotmat_round_trip():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(500, 4, generator=g, dtype=torch.float64), dim=-1)
    q = torch.cat([q, torch.eye(4, dtype=torch.float64)])  # axis-aligned cases (w = 0 included)
    R = quat_to_rotmat(q)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand_as(R))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(len(q), dtype=torch.float64))
    q2 = rotmat_to_quat(R)
    assert (q2[:, 0] >= 0).all()
    torch.testing.assert_close(quat_to_rotmat(q2), R)
    torch.testing.assert_close(q2, q * torch.where(q[:, :1] < 0, -1.0, 1.0).double())  # same up to sign
    # 90 degrees about z maps x to y (w, x, y, z order)
    qz = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]])
    torch.testing.assert_close(quat_to_rotmat(qz)[0] @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0]),
                               atol=1e-6, rtol=0)
    # unnormalised quaternions are normalised
    torch.testing.assert_close(quat_to_rotmat(q[:5] * 3.0), R[:5])


def test_knn_scale_init_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(300, 3, generator=g)
    got = knn_scale_init(pts, k=3)
    d = torch.cdist(pts.double(), pts.double())
    d.fill_diagonal_(float("inf"))
    expect = d.topk(3, largest=False).values.mean(1)
    torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-7)
    assert got.dtype == pts.dtype and got.shape == (300,)
    assert knn_scale_init(pts[:1]).shape == (1,)
    assert knn_scale_init(pts[:2], k=3).shape == (2,)  # fewer points than k


def test_random_cloud_is_valid():
    c = random_cloud(200, center=(0.0, 0.0, 1.0), radius=0.1, sh_degree=2, generator=torch.Generator().manual_seed(0))
    assert (c.means - torch.tensor([0.0, 0.0, 1.0])).norm(dim=-1).max() <= 0.1 + 1e-6
    torch.testing.assert_close(c.quats.norm(dim=-1), torch.ones(200))
    assert ((c.opacities > 0) & (c.opacities < 1)).all() and (c.scales > 0).all()
    assert c.sh_degree == 2


def test_covariances_are_r_s2_rt():
    cloud = random_cloud(50, generator=torch.Generator().manual_seed(3)).to(torch.float64)
    cov = cloud.covariances()
    assert cov.shape == (50, 3, 3) and torch.allclose(cov, cov.transpose(-1, -2))
    # eigenvalues are the squared scales, eigenvectors the rotation's columns
    evals = torch.linalg.eigvalsh(cov)
    assert torch.allclose(evals, cloud.scales.square().sort(-1).values, rtol=1e-9, atol=1e-15)
    R = quat_to_rotmat(cloud.quats)
    for k in range(3):
        axis = R[..., :, k]
        assert torch.allclose((cov @ axis[..., None])[..., 0], cloud.scales[:, k:k + 1] ** 2 * axis, atol=1e-15)
    batched = GaussianCloud(*(t[None].expand(2, *t.shape) for t in (cloud.means, cloud.quats, cloud.scales,
                                                                     cloud.opacities, cloud.sh)))
    assert torch.allclose(batched.covariances()[1], cov)


def test_max_differences_treats_q_and_minus_q_as_one_rotation():
    a = random_cloud(50, generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b.quats[:10] = -b.quats[:10]  # the same rotations
    d = a.max_differences(b)
    assert d["quats"] < 1e-6 and d["rotations"] < 1e-6 and d["means"] == 0.0
    b.quats[20] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a different rotation is still seen
    b.means[5, 1] += 0.25
    d = a.max_differences(b)
    assert d["quats"] > 1e-3 and d["rotations"] > 1e-3 and abs(d["means"] - 0.25) < 1e-6
