"""models/graphed_synthesis.py: the batch-1 frozen-network callable used by fitting and interpolation.

CUDA-graph capture itself needs a GPU (benchmarks/profile_paths.py checks graphed == eager there); on the CPU these
tests pin down the interface and that the eager path is IdentityField.synthesize / forward up to float rounding (its
FrozenNetwork precomputes the parameter-only quantities)."""
import pytest
import torch

from models.graphed_synthesis import FrozenNetwork, GraphedSynthesis
from tests.test_identity_field import _field


def _frozen(**over):
    net, v, f = _field(num_ids=3, seed=1, **over)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, v + torch.tensor([0.0, 0.0, 0.5]), f


@pytest.mark.parametrize("space", ["w", "z"])
def test_matches_the_field(space):
    net, v, _ = _frozen(gaussians_per_vertex=2, sh_degree=1)
    synth = GraphedSynthesis(net, v, space=space, requires_grad=False)
    assert not synth.graphed and synth.fallback_reason is None  # CPU: eager by design, not by failure
    code = net.codes.weight[1]
    arg = net.style(code[None], update_w_avg=False)[0] if space == "w" else code
    ref = net(code[None], v[None])[0]
    out = synth(arg)
    for k in ("means", "quats", "scales", "opacities", "sh"):
        assert torch.allclose(getattr(out, k), getattr(ref, k), atol=1e-6), k


@pytest.mark.parametrize("over", [{}, {"synth_layers": 0}, {"hidden": 8, "feat_dim": 8}])
def test_frozen_network_is_the_fields_network(over):
    """FrozenNetwork (batched styles, padded demodulation, folded gains) == field.style / synthesize_raw, values and
    the gradient w.r.t. the style, for hidden layers wider, absent, or narrower than the input features."""
    net, _, _ = _frozen(gaussians_per_vertex=2, sh_degree=1, **over)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))  # away from the initial values (unit styles, zero biases)
    frozen = FrozenNetwork(net)
    z = net.codes.weight[2:3]
    w_ref = net.style(z, update_w_avg=False)
    assert torch.allclose(frozen.style(z), w_ref, atol=1e-5)
    w1, w2 = w_ref.clone().requires_grad_(True), w_ref.clone().requires_grad_(True)
    raw, ref = frozen(w1), net.synthesize_raw(w2)
    assert raw.shape == ref.shape and torch.allclose(raw, ref, atol=1e-5)
    weights = torch.randn_like(ref)
    (raw * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_style_and_the_vertices():
    net, v, _ = _frozen()
    w = net.mapping.w_avg.clone() + 0.1 * torch.randn(net.cfg.style_dim)
    fixed = GraphedSynthesis(net, v, space="w")
    wg = w.clone().requires_grad_(True)
    fixed(wg).means.square().sum().backward()
    assert wg.grad is not None and wg.grad.abs().sum() > 0

    moving = GraphedSynthesis(net, v, space="w", dynamic_geometry=True)
    vg = (v * 1.01).requires_grad_(True)
    wg2 = w.clone().requires_grad_(True)
    cloud = moving(wg2, vg)
    ref = net.synthesize(w[None], (v * 1.01)[None])[0]
    assert torch.allclose(cloud.means, ref.means, atol=1e-6)
    cloud.means.sum().backward()
    assert vg.grad is not None and torch.isfinite(vg.grad).all() and vg.grad.abs().sum() > 0
    wr = w.clone().requires_grad_(True)
    net.synthesize(wr[None], (v * 1.01)[None])[0].means.sum().backward()
    assert torch.allclose(wg2.grad, wr.grad, atol=1e-6)


def test_clear_errors():
    net, v, _ = _frozen()
    with pytest.raises(ValueError, match="space"):
        GraphedSynthesis(net, v, space="x")
    with pytest.raises(ValueError, match="precision must be"):
        GraphedSynthesis(net, v, precision="fp16")
    with pytest.raises(ValueError, match=r"vertices must be"):
        GraphedSynthesis(net, v[:5])
    synth = GraphedSynthesis(net, v)
    with pytest.raises(ValueError, match="dynamic_geometry"):
        synth(net.mapping.w_avg, v)
    net.head.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        GraphedSynthesis(net, v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU: run this file on the GPU machine")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_replayed_graphs_match_the_eager_field_on_cuda(precision):
    """On a GPU the FrozenNetwork's forward (and, for fits, backward) graphs replay the field: values within float
    rounding (bf16: within its precision) and the style gradient of the fp32 graphs within 1e-4."""
    net, v, _ = _frozen(gaussians_per_vertex=2, sh_degree=1)
    net, v = net.cuda(), v.cuda()
    code = net.codes.weight[1]
    synth = GraphedSynthesis(net, v, space="z", requires_grad=False, precision=precision)
    assert synth.graphed, synth.fallback_reason
    ref = net(code[None], v[None])[0]
    out = synth(code.clone())
    tol = 1e-5 if precision == "fp32" else 2e-2
    # quaternions up to sign: where a frame's w is near 0, GPU rounding may pick -q, the same rotation
    for k, diff in out.max_differences(ref).items():
        assert diff <= tol, (k, diff)
    if precision == "fp32":
        fit = GraphedSynthesis(net, v, space="w")
        w = net.style(code[None], update_w_avg=False)[0]
        wa, wb = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
        fit(wa).means.square().sum().backward()
        net.synthesize(wb[None], v[None])[0].means.square().sum().backward()
        assert fit.graphed and torch.allclose(wa.grad, wb.grad, rtol=1e-4, atol=1e-6)
