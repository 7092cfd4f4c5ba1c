import math

import pytest
import torch
import trimesh

from models.gaussians import GaussianCloud, quat_to_rotmat
from models.identity_field import (
    EqualizedLinear,
    IdentityField,
    IdentityFieldConfig,
    ModulatedLinear,
    area_weighted_vertex_normals,
    quat_left_matrix,
)

SMALL = dict(style_dim=32, mapping_layers=2, feat_dim=8, fourier_freqs=3, hidden=32, synth_layers=2)


def _mesh(subdiv=2):
    m = trimesh.creation.icosphere(subdivisions=subdiv, radius=0.1)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.long)


def _field(num_ids=3, seed=0, **over):
    torch.manual_seed(seed)
    v, f = _mesh()
    cfg = IdentityFieldConfig(**{**SMALL, **over})
    return IdentityField(cfg, num_ids, v, f), v, f


def _random_rotation(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    return q * torch.sign(torch.det(q))


def test_shapes_and_conventions():
    net, v, _ = _field(gaussians_per_vertex=2, sh_degree=1)
    B, V = 2, v.shape[0]
    verts = v.expand(B, V, 3) + torch.tensor([0.0, 0.0, 1.0])
    cloud, aux = net(net.codes(torch.tensor([0, 2])), verts, return_aux=True)
    assert isinstance(cloud, GaussianCloud)
    N = V * 2
    assert net.num_gaussians == N
    assert cloud.means.shape == (B, N, 3) and cloud.quats.shape == (B, N, 4)
    assert cloud.scales.shape == (B, N, 3) and cloud.opacities.shape == (B, N)
    assert cloud.sh.shape == (B, N, 4, 3) and cloud.sh_degree == 1
    assert aux["offset"].shape == (B, N, 3) and aux["log_scale_delta"].shape == (B, N, 3)
    cloud.check_finite()
    assert torch.allclose(cloud.quats.norm(dim=-1), torch.ones(B, N), atol=1e-5)
    assert (cloud.scales > 0).all()
    assert ((cloud.opacities > 0) & (cloud.opacities < 1)).all()
    # Long identity ids and a shared (V, 3) mesh are accepted too.
    c2 = net(torch.tensor([0, 2]), verts[0])
    assert c2.means.shape == (B, N, 3)
    with pytest.raises(ValueError, match="vertices"):
        net(torch.tensor([0, 2]), verts[:, :10])


def test_init_state_on_vertices_with_edge_scales():
    cfg_over = dict(max_offset=1.0, init_scale_mult=0.5, init_opacity=0.8)
    net, v, f = _field(**cfg_over)
    B = 3
    verts = v.expand(B, -1, -1) * torch.tensor([1.0, 1.3, 0.8])  # non-uniform shapes per identity are fine
    cloud, aux = net(torch.arange(B), verts, return_aux=True)
    edge = aux["edge_len"]  # (B, V)
    d = (cloud.means - verts).norm(dim=-1)
    assert (d <= 1.0 * edge + 1e-7).all()  # the hard bound: max_offset * edge
    assert (d <= 0.1 * edge).all()  # and in fact the head starts (nearly) zero
    rel = cloud.scales / (0.5 * edge[..., None])
    assert torch.allclose(rel, torch.ones_like(rel), atol=0.1)
    assert torch.allclose(cloud.opacities, torch.full_like(cloud.opacities, 0.8), atol=0.02)
    assert torch.allclose(cloud.rgb, torch.full_like(cloud.rgb, 0.5), atol=0.05)
    # Edge length is the mean incident edge length: check one vertex by brute force.
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).sort(1).values.unique(dim=0)
    inc = e[(e == 5).any(1)]
    ref = (verts[0, inc[:, 0]] - verts[0, inc[:, 1]]).norm(dim=-1).mean()
    assert edge[0, 5].item() == pytest.approx(ref.item(), rel=1e-5)


def test_frames_are_orthonormal_with_normal_outward():
    net, v, f = _field()
    frames, _ = net.surface_frames(v[None])
    R = frames[0]
    eye = torch.eye(3).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-5)
    assert torch.allclose(torch.det(R), torch.ones(len(v)), atol=1e-5)
    n = area_weighted_vertex_normals(v, f)
    assert torch.allclose(R[..., 2], n, atol=1e-6)
    assert ((n * v).sum(-1) > 0).all()  # icosphere faces wind outward
    # The tangent field is smooth: neighbouring tangents mostly agree (a first-neighbour tangent would not).
    e = net.edges
    cos = (R[e[:, 0], :, 0] * R[e[:, 1], :, 0]).sum(-1)
    assert cos.median() > 0.9


def test_different_codes_give_different_outputs():
    net, v, _ = _field()
    cloud = net(torch.arange(3), v)
    for a, b in [(0, 1), (1, 2)]:
        assert not torch.allclose(cloud.means[a], cloud.means[b])
        assert not torch.allclose(cloud.sh[a], cloud.sh[b])


def test_gradients_reach_all_parts():
    net, v, _ = _field()
    cloud, aux = net(torch.tensor([0, 1]), v, return_aux=True)
    loss = cloud.means.sum() + cloud.sh.square().sum() + cloud.scales.sum() + cloud.opacities.sum() \
        + cloud.quats[..., 1].sum()
    loss.backward()
    groups = {g["name"]: g["params"] for g in net.param_groups(1e-3, 1e-2)}
    assert set(groups) == {"codes", "mapping", "synthesis", "template"}
    for name, params in groups.items():
        gsum = sum(p.grad.abs().sum().item() for p in params if p.grad is not None)
        assert gsum > 0 and math.isfinite(gsum), name
    # Only the used rows of the code table get gradients.
    g = net.codes.weight.grad
    assert g[:2].abs().sum() > 0 and g[2].abs().sum() == 0
    # Groups cover each parameter exactly once.
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    torch.optim.Adam(net.param_groups(1e-3, 1e-2, betas=(0.9, 0.99)))  # accepted by Adam


def test_rigid_motion_moves_gaussians_rigidly():
    net, v, _ = _field(gaussians_per_vertex=2)
    net.eval()
    # Make the head output non-trivial so offsets and local rotations matter.
    with torch.no_grad():
        net.head.weight.mul_(30.0)
    R = _random_rotation(3)
    t = torch.tensor([0.3, -0.2, 1.5])
    verts = v * torch.tensor([1.0, 1.2, 0.9])
    moved = verts @ R.T + t
    codes = net.codes(torch.tensor([1]))
    c0, aux0 = net(codes, verts[None], return_aux=True)
    c1 = net(codes, moved[None])
    assert aux0["offset"].abs().max() > 0.05  # offsets really are in play
    assert torch.allclose(c1.means, c0.means @ R.T + t, atol=1e-5)
    assert torch.allclose(c1.scales, c0.scales, atol=1e-6)
    assert torch.allclose(c1.opacities, c0.opacities, atol=1e-6)
    R0, R1 = quat_to_rotmat(c0.quats), quat_to_rotmat(c1.quats)
    assert torch.allclose(R1, R @ R0, atol=1e-5)


def test_attach_is_the_pose_half_of_synthesize():
    """synthesize == attach(synthesize_raw): the raw output is computed once and attached to any posed vertices; a
    (1, V, K, C) raw output serves a batch of poses bit for bit as synthesize does for each."""
    net, v, _ = _field(gaussians_per_vertex=2, sh_degree=1)
    net.eval()
    with torch.no_grad():
        net.head.weight.mul_(30.0)
        w = net.style(net.codes(torch.tensor([2])))
        raw = net.synthesize_raw(w)
        poses = torch.stack([v * 1.1, v @ _random_rotation(4).T + 0.3, v * torch.tensor([1.0, 0.8, 1.2])])
        batch, aux = net.attach(raw, poses, return_aux=True)
        for i in range(3):
            ref, ref_aux = net.synthesize(w, poses[i:i + 1], return_aux=True)
            for k in ("means", "quats", "scales", "opacities", "sh"):
                assert torch.equal(getattr(batch, k)[i], getattr(ref, k)[0]), k
            assert torch.equal(aux["offset"][i], ref_aux["offset"][0]) and torch.equal(ref_aux["w"], w)
    with pytest.raises(ValueError, match="raw output"):
        net.attach(raw[..., :-1], poses)


def test_quat_left_matrix_composes_rotations():
    """L(q) @ p is the Hamilton product: its rotation is R(q) @ R(p) (checked through rotation matrices, not the
    product's formula)."""
    g = torch.Generator().manual_seed(3)
    q, p = torch.nn.functional.normalize(torch.randn(2, 64, 4, generator=g), dim=-1)
    qp = (quat_left_matrix(q) @ p[..., None])[..., 0]
    assert torch.allclose(qp.norm(dim=-1), torch.ones(64), atol=1e-6)
    assert torch.allclose(quat_to_rotmat(qp), quat_to_rotmat(q) @ quat_to_rotmat(p), atol=1e-5)


def test_precomputed_attach_surface_gives_the_same_gaussians():
    """attach with a precomputed AttachSurface (fixed geometry: fits, interpolation) equals attach computing it, and
    the frame's rotation is applied: a rotated pose rotates each Gaussian's quaternion rotation by the same R."""
    net, v, _ = _field(gaussians_per_vertex=2)
    with torch.no_grad():
        net.head.weight.mul_(30.0)
        raw = net.synthesize_raw(net.style(net.codes(torch.tensor([1]))))
        surface = net.attach_surface(v)
        a, b = net.attach(raw, v, surface), net.attach(raw, v)
        for k in ("means", "quats", "scales", "opacities", "sh"):
            assert torch.equal(getattr(a, k), getattr(b, k)), k
        R = _random_rotation(7)
        c = net.attach(raw, v @ R.T, net.attach_surface(v @ R.T))
        assert torch.allclose(quat_to_rotmat(c.quats[0]), R @ quat_to_rotmat(a.quats[0]), atol=1e-4)


def test_equalized_lr_scaling():
    torch.manual_seed(0)
    fan_in, lr_mult = 64, 0.01
    layer = EqualizedLinear(fan_in, 16, bias_init=0.5, lr_mult=lr_mult)
    # Stored N(0, 1) / lr_mult, applied as N(0, 1 / fan_in).
    assert layer.weight.std().item() == pytest.approx(1 / lr_mult, rel=0.1)
    assert layer.effective_weight().std().item() == pytest.approx(1 / math.sqrt(fan_in), rel=0.1)
    assert torch.allclose(layer.effective_bias(), torch.full((16,), 0.5))
    x = torch.randn(5, fan_in)
    assert torch.allclose(layer(x), x @ layer.effective_weight().T + 0.5, atol=1e-5)
    # The parameter gradient is the effective-weight gradient times the gain, so an SGD step of lr moves the
    # effective weight by lr * gain^2 * grad: lr_mult^2 / fan_in of a plain layer.
    w_eff = layer.effective_weight().detach().requires_grad_(True)
    (x @ w_eff.T).square().sum().backward()
    layer(x).sub(0.5).square().sum().backward()
    gain = lr_mult / math.sqrt(fan_in)
    assert torch.allclose(layer.weight.grad, w_eff.grad * gain, rtol=1e-4, atol=1e-8)
    assert layer.bias.grad is not None
    # Mapping layers of the field use the configured multiplier.
    net, _, _ = _field(mapping_lr_mult=0.01)
    assert all(mapping_layer.lr_mult == 0.01 for mapping_layer in net.mapping.layers)


def test_modulated_linear_matches_textbook_form():
    torch.manual_seed(1)
    B, V, cin, cout, S = 3, 7, 5, 4, 6
    layer = ModulatedLinear(cin, cout, S, demodulate=True, activation="linear")
    with torch.no_grad():
        layer.bias.normal_()
    x, w = torch.randn(B, V, cin), torch.randn(B, S)
    s = layer.affine(w)
    W = layer.weight * layer.weight_gain
    d = ((W[None] * s[:, None]).square().sum(-1) + 1e-8).rsqrt()  # (B, out)
    ref = ((x * s[:, None, :]) @ W.T) * d[:, None, :] + layer.bias
    assert torch.allclose(layer(x, w), ref, atol=1e-5)
    assert torch.allclose(layer(x[0], w), ((x[0][None] * s[:, None, :]) @ W.T) * d[:, None, :] + layer.bias,
                          atol=1e-5)  # shared (V, in) input path
    lrelu = ModulatedLinear(cin, cout, S, demodulate=False, activation="lrelu")
    ref2 = torch.nn.functional.leaky_relu((x * lrelu.affine(w)[:, None, :]) @ (lrelu.weight * lrelu.weight_gain).T
                                          + lrelu.bias, 0.2) * math.sqrt(2)
    assert torch.allclose(lrelu(x, w), ref2, atol=1e-5)


def test_w_avg_updates_only_in_training_and_truncation():
    net, v, _ = _field()
    net.eval()
    net(torch.arange(3), v)
    assert net.mapping.w_avg.abs().sum() == 0
    net.train()
    net(torch.arange(3), v)
    w = net.style(torch.arange(3), update_w_avg=False)
    expected = (1 - net.cfg.w_avg_beta) * w.detach().mean(0)
    assert torch.allclose(net.mapping.w_avg, expected, atol=1e-6)
    before = net.mapping.w_avg.clone()
    net(torch.arange(3), v, truncation_psi=0.5)  # truncated calls do not update the average
    assert torch.equal(net.mapping.w_avg, before)
    net.eval()
    w0 = net.style(torch.arange(3), truncation_psi=0.0)
    assert torch.allclose(w0, before.expand_as(w0))
    assert "mapping.w_avg" in net.state_dict()


def test_mean_code_and_config():
    net, _, _ = _field()
    assert torch.allclose(net.mean_code(), net.codes.weight.mean(0))
    assert net.mean_code().shape == (80,)
    assert net.codes.weight.std().item() == pytest.approx(0.01, rel=0.5)
    cfg = IdentityFieldConfig.from_dict({"hidden": 64})
    assert cfg.hidden == 64 and IdentityFieldConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        IdentityFieldConfig.from_dict({"hiden": 64})


def test_bad_mesh_errors():
    v, f = _mesh(1)
    cfg = IdentityFieldConfig(**SMALL)
    with pytest.raises(ValueError, match="no face"):
        IdentityField(cfg, 1, torch.cat([v, torch.zeros(1, 3)]), f)
    with pytest.raises(ValueError, match="faces"):
        IdentityField(cfg, 1, v, f[:, :2])


def test_regularizers():
    net, v, _ = _field()
    cloud, aux = net(torch.arange(2), v, return_aux=True)
    reg = net.regularizers(aux)
    assert set(reg) == {"offset", "scale", "code"}
    assert all(r.dim() == 0 and torch.isfinite(r) for r in reg.values())
    sum(reg.values()).backward()


def test_tiny_fit_reduces_colour_loss():
    torch.manual_seed(0)
    net, v, _ = _field(num_ids=1)
    # Target: a smooth colour pattern over the sphere.
    target = torch.stack([0.5 + 0.4 * torch.sin(30 * v[:, 0]), 0.5 + 0.4 * torch.cos(25 * v[:, 1]),
                          0.5 + 0.3 * torch.sin(20 * v[:, 2])], -1)
    opt = torch.optim.Adam(net.param_groups(lr_network=3e-3, lr_codes=1e-2))
    ids = torch.tensor([0])
    losses = []
    for _ in range(50):
        cloud = net(ids, v)
        loss = (cloud.rgb[0] - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
