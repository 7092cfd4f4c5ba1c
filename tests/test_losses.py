import logging
import math

import pytest
import torch

from utils import losses
from utils.losses import l1, lpips_metric, photometric_loss, psnr, ssim, ssim_metric


def _img(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g)


def test_l1_and_mask():
    a, b = torch.zeros(8, 8, 3), torch.ones(8, 8, 3)
    assert l1(a, b).item() == pytest.approx(1.0)
    b2 = b.clone()
    b2[:4] = 0.0  # top half identical
    mask = torch.zeros(8, 8, 1)
    mask[:4] = 1.0
    assert l1(a, b2, mask).item() == pytest.approx(0.0)
    assert l1(a, b2, 1 - mask).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mask"):
        l1(a, b, torch.ones(8, 8, 3))
    with pytest.raises(ValueError, match="same shape"):
        l1(a, b[:4])


def test_psnr_identical_and_known_noise():
    x = _img(2, 40, 60, 3)
    assert math.isinf(psnr(x, x).item())
    # Constant error of 0.1 everywhere -> MSE 0.01 -> exactly 20 dB.
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-3)
    # Gaussian noise: PSNR matches the formula on the empirical MSE.
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    per = psnr(x, x + n, reduction="none")
    assert per.shape == (2,)
    expected = -10 * torch.log10(n.square().flatten(1).mean(1).double())
    assert torch.allclose(per.double(), expected, atol=1e-4)
    assert per.mean().item() == pytest.approx(26.02, abs=0.3)  # 10 log10(1 / 0.05^2)
    # Mask: error only outside the mask -> inf inside.
    y = x.clone()
    y[:, 20:] += 0.2
    mask = torch.zeros(2, 40, 60, 1)
    mask[:, :20] = 1
    assert math.isinf(psnr(x, y, mask).item())
    assert psnr(x, y, 1 - mask).item() == pytest.approx(-10 * math.log10(0.04), abs=1e-3)


def test_ssim_identical_small_crop_and_errors():
    x = _img(40, 60, 3)  # the project's smallest crops
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    y = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    s = ssim(x, y).item()
    assert 0.0 < s < 0.95
    batch = torch.stack([x, y])
    per = ssim(batch, torch.stack([x, x]), reduction="none")
    assert per.shape == (2,)
    assert per[0].item() == pytest.approx(1.0, abs=1e-5) and per[1].item() == pytest.approx(s, abs=1e-5)
    assert ssim_metric(y, x).item() == pytest.approx(s, abs=1e-5)
    with pytest.raises(ValueError, match="window"):
        ssim(_img(8, 60, 3), _img(8, 60, 3, seed=1))


def test_ssim_matches_reference_formula():
    # Independent check of the library call (valid 11x11 Gaussian filtering, C1 = 0.01^2, C2 = 0.03^2).
    x, y = _img(24, 30, 3), _img(24, 30, 3, seed=5)
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-t ** 2 / (2 * 1.5 ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :])[None, None].repeat(3, 1, 1, 1)
    X, Y = x.double().permute(2, 0, 1)[None], y.double().permute(2, 0, 1)[None]
    f = lambda z: torch.nn.functional.conv2d(z, k, groups=3)  # noqa: E731
    mx, my = f(X), f(Y)
    sxx, syy, sxy = f(X * X) - mx ** 2, f(Y * Y) - my ** 2, f(X * Y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = ((2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean()
    for method in losses.SSIM_METHODS:
        assert ssim(x, y, method=method).item() == pytest.approx(ref.item(), abs=1e-5), method


def test_ssim_methods_agree_in_value_and_gradient():
    """The stacked-maps SSIM and the fused SSIM's hand-written backward (its torch passes, which are also the Triton
    kernels' arithmetic) equal pytorch_msssim, gradients included; per-image weights check the backward's scaling."""
    x, y = _img(2, 40, 33, 3), _img(2, 40, 33, 3, seed=7)
    weights = torch.tensor([0.7, -1.9])
    out = {}
    for method in ("msssim", "grouped", "fused"):
        xg = x.clone().requires_grad_(True)
        v = ssim(xg, y, reduction="none", method=method)
        (v * weights).sum().backward()
        out[method] = (v.detach(), xg.grad)
    for method in ("grouped", "fused"):
        torch.testing.assert_close(out[method][0], out["msssim"][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[method][1], out["msssim"][1], atol=1e-8, rtol=1e-4)
    with pytest.raises(ValueError, match="method"):
        ssim(x, y, method="fft")


def test_photometric_loss_value_and_gradient():
    gt = _img(2, 40, 60, 3)
    pred = _img(2, 40, 60, 3, seed=3).requires_grad_(True)
    loss = photometric_loss(pred, gt)
    expected = 0.8 * l1(pred, gt) + 0.2 * (1 - ssim(pred, gt))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert photometric_loss(gt, gt).item() == pytest.approx(0.0, abs=1e-6)


def test_lpips_optional(caplog, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lpips", None)  # force "not installed" even where it is
    monkeypatch.setattr(losses, "_LPIPS", {})
    monkeypatch.setattr(losses, "_LPIPS_UNAVAILABLE", [])
    x = _img(32, 32, 3)
    with caplog.at_level(logging.WARNING, logger="utils.losses"):
        assert lpips_metric(x, x) is None
        assert lpips_metric(x, x) is None
    assert sum("LPIPS skipped" in r.getMessage() for r in caplog.records) == 1


def test_module_does_not_import_torchvision():
    import subprocess
    import sys

    code = "import sys; import utils.losses; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=__file__.rsplit("/tests/", 1)[0], check=True)
    assert out.stdout.strip() == "False"


def test_rim_band_is_the_ring_outside_the_mask():
    from utils.losses import rim_band

    mask = torch.zeros(2, 3, 9, 9, 1)
    mask[:, :, 3:6, 3:6] = 1  # a 3x3 square
    band = rim_band(mask, 1)
    assert band.shape == mask.shape and band.dtype == mask.dtype
    assert float(band.sum()) == 2 * 3 * (25 - 9)  # the 5x5 square around it minus the square
    assert float((band * mask).sum()) == 0  # never inside the mask
    assert float(rim_band(mask, 2).sum()) == 2 * 3 * (49 - 9)
    assert float(rim_band(mask, 0).abs().sum()) == 0
    with pytest.raises(ValueError, match="width must be >= 0"):
        rim_band(mask, -1)


def test_coverage_loss_value_gradient_and_ignored_pixels():
    from utils.losses import coverage_loss, rim_band

    mask = torch.zeros(1, 8, 8, 1)
    mask[:, 2:6, 2:6] = 1
    alpha = (mask * 0.75).requires_grad_(True)  # a see-through surface inside the mask, nothing outside
    loss = coverage_loss(alpha, mask)
    assert math.isclose(float(loss.detach()), 0.25 * 16 / 64, rel_tol=1e-6)
    loss.backward()
    assert float(alpha.grad[0, 3, 3, 0]) < 0  # gradient descent raises alpha inside the mask
    # alpha spilling into the ignored ring costs nothing; the same spill further out does
    band = rim_band(mask, 1)
    spill = mask + band
    assert float(coverage_loss(spill, mask, band)) == 0
    assert float(coverage_loss(spill, mask)) > 0
    with pytest.raises(ValueError, match="alpha and mask must both be"):
        coverage_loss(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 8, 3))
