"""Photometric losses and image metrics.

Images everywhere in this project are float tensors in [0, 1] shaped (H, W, 3) or (B, H, W, 3) (any leading dims);
masks are (..., H, W, 1) in {0, 1} (or soft).  SSIM comes from the maintained ``pytorch_msssim`` package, which
wants (N, C, H, W); :func:`_to_nchw` is the one place that converts.  LPIPS is an optional extra (``lpips`` needs
torchvision and downloaded VGG weights): :func:`lpips_metric` returns None with a one-time message without it.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _msssim_ssim
from torch import Tensor

from utils.fused_ssim import fused_ssim, triton_available

log = logging.getLogger(__name__)

__all__ = ["l1", "ssim", "photometric_loss", "psnr", "ssim_metric", "masked_ssim", "lpips_metric",
           "lpips_unavailable_reason", "rim_band", "coverage_loss"]


# ------------------------------------------------------------------ shape helpers
def _check_pair(pred: Tensor, gt: Tensor, what: str) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"{what}: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape")
    if pred.dim() < 3:
        raise ValueError(f"{what}: images must be (H, W, C) or (..., H, W, C), got {tuple(pred.shape)}")


def _to_nchw(img: Tensor) -> Tensor:
    """(..., H, W, C) -> (prod(...), C, H, W); the only layout conversion in this module."""
    H, W, C = img.shape[-3:]
    return img.reshape(-1, H, W, C).permute(0, 3, 1, 2)


def _reduce(per_image: Tensor, batch_shape: torch.Size, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image.reshape(batch_shape)
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_mask(mask: Tensor, img: Tensor, what: str) -> Tensor:
    if mask.shape[-1] != 1 or mask.shape[-3:-1] != img.shape[-3:-1]:
        raise ValueError(f"{what}: mask must be (..., H, W, 1) matching the image {tuple(img.shape)}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(img.dtype)


# ------------------------------------------------------------------ losses
def l1(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean absolute error (scalar).  With ``mask`` (..., H, W, 1): mean over the masked pixels only."""
    _check_pair(pred, gt, "l1")
    return _masked_mean((pred - gt).abs(), mask, "l1")


def mse(pred: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error (scalar), what PSNR scores.  With ``mask`` (..., H, W, 1): mean over the masked pixels."""
    _check_pair(pred, gt, "mse")
    return _masked_mean((pred - gt).square(), mask, "mse")


def _masked_mean(err: Tensor, mask: Tensor | None, what: str) -> Tensor:
    """Mean of a per-pixel error (..., H, W, C) (scalar); with ``mask`` (..., H, W, 1) over the masked pixels only."""
    if mask is None:
        return err.mean()
    m = _check_mask(mask, err, what)
    return (err * m).sum() / (m.expand_as(err).sum()).clamp_min(1.0)


def rim_band(mask: Tensor, width: int) -> Tensor:
    """The ring of pixels just outside a face mask: ``mask`` (..., H, W, 1) in {0, 1} dilated by ``width`` pixels
    (square neighbourhood) minus the mask itself; same shape and dtype (0 everywhere when ``width`` is 0).

    Why: the projected face mask cuts a surface that goes on (forehead, cheeks, neck) at a hard, pixel-centre-sampled
    edge.  The photo is black just outside it, so supervising those pixels teaches the model's alpha to fall off
    *inside* the mask's true (sub-pixel) edge, which shows as a band of see-through rim when the head is rendered
    larger, and as a dark, faded rim on a face of a few pixels.
    """
    if width < 0:
        raise ValueError(f"rim_band: width must be >= 0 pixels, got {width}")
    if width == 0:
        return torch.zeros_like(mask)
    m = mask.reshape(-1, *mask.shape[-3:]).movedim(-1, 1)  # (N, 1, H, W)
    grown = F.max_pool2d(m.float(), 2 * width + 1, stride=1, padding=width)
    return (grown - m.float()).clamp_min(0).movedim(1, -1).reshape(mask.shape).to(mask.dtype)


def coverage_loss(alpha: Tensor, mask: Tensor, ignore: Tensor | None = None) -> Tensor:
    """Mean |alpha - mask| (scalar) of rendered alpha (..., H, W, 1) against the face mask (..., H, W, 1), over the
    pixels where ``ignore`` (same shape; e.g. :func:`rim_band`) is 0.

    Why: on photos masked onto black only colour x alpha is supervised, so a model can trade opacity for brighter
    colour and leave a see-through surface; that translucency does not hold when the head is rendered at another
    size (the overlap of its Gaussians changes), which shows as holes and a faded face.  This term asks for an
    opaque surface inside the mask.
    """
    if alpha.shape != mask.shape or alpha.shape[-1] != 1:
        raise ValueError(f"coverage_loss: alpha and mask must both be (..., H, W, 1), got {tuple(alpha.shape)} and "
                         f"{tuple(mask.shape)}")
    keep = None if ignore is None else 1.0 - ignore.to(alpha.dtype)
    return l1(alpha, mask.to(alpha.dtype), keep)


_WIN_CACHE: dict[tuple, Tensor] = {}


def _gauss_window(window: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (C, 1, 1, window) separable Gaussian that pytorch_msssim expects, cached per device (no per-step H2D
    copy)."""
    key = (window, float(sigma), channels, str(device), dtype)
    win = _WIN_CACHE.get(key)
    if win is None:
        x = torch.arange(window, dtype=torch.float64) - window // 2
        g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
        g = (g / g.sum()).to(device=device, dtype=dtype)
        win = g.view(1, 1, 1, window).repeat(channels, 1, 1, 1)
        _WIN_CACHE[key] = win
    return win


# How SSIM applies its separable Gaussian window.  "msssim": the maintained pytorch_msssim (ten depthwise
# convolutions, one per map and direction); "grouped": the same filter as two depthwise convolutions over the five
# maps stacked.  Measured (forward + backward, benchmarks/profile_paths.py): on an H100 the stacked form takes
# 19.4 ms instead of 37.8 ms for a training batch of 16 crops of 752x912 (most of a training step) and 2.1 ms
# instead of 3.1 ms for one 592x864 fit crop; on a 2-core CPU pytorch_msssim is faster (5 vs 8 ms for 8 x 66x96).
# "fused": utils/fused_ssim.py, four Triton passes with a hand-written backward (17.0 -> 2.5 ms for the 16 crops of
# 896x752 on an H200, benchmarks/results/); on CPU the same passes in torch.
# "auto": fused on CUDA when Triton is importable (else grouped), msssim elsewhere.  All give the same values up to
# float rounding (tests/test_losses.py).
SSIM_METHODS = ("auto", "msssim", "grouped", "fused")
SSIM_METHOD = "auto"


def _blur_valid(maps: Tensor, g: Tensor) -> Tensor:
    """'valid' separable Gaussian blur of maps (N, M, H, W) with the 1-D window g (k,) -> (N, M, H-k+1, W-k+1):
    one depthwise convolution per direction over all M maps."""
    M, k = maps.shape[1], g.numel()
    x = torch.nn.functional.conv2d(maps, g.view(1, 1, 1, k).expand(M, 1, 1, k), groups=M)
    return torch.nn.functional.conv2d(x, g.view(1, 1, k, 1).expand(M, 1, k, 1), groups=M)


def _ssim_maps(x: Tensor, y: Tensor, g: Tensor, c1: float = 0.01 ** 2, c2: float = 0.03 ** 2) -> Tensor:
    """SSIM maps (data range 1) of x, y (N, C, H, W) with the 1-D Gaussian g (k,): (N, C, H-k+1, W-k+1)."""
    C = x.shape[1]
    mu = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mu_x, mu_y, e_xx, e_yy, e_xy = mu.split(C, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    cs = (2 * (e_xy - mu_xy) + c2) / ((e_xx - mu_xx) + (e_yy - mu_yy) + c2)
    return ((2 * mu_xy + c1) / (mu_xx + mu_yy + c1)) * cs


def _ssim_per_image(x: Tensor, y: Tensor, g: Tensor, c1: float = 0.01 ** 2, c2: float = 0.03 ** 2) -> Tensor:
    """SSIM (data range 1) of x, y (N, C, H, W) with the 1-D Gaussian g (k,): (N,) means of the SSIM maps."""
    return _ssim_maps(x, y, g, c1, c2).flatten(1).mean(1)


def ssim(pred: Tensor, gt: Tensor, window: int = 11, sigma: float = 1.5, reduction: str = "mean",
         method: str | None = None) -> Tensor:
    """Structural similarity (11x11 Gaussian window, sigma 1.5, data range 1, 'valid' filtering as in Wang et al.).

    pred, gt: (H, W, C) or (..., H, W, C) in [0, 1].  Returns a scalar (``reduction="mean"``, the mean over images)
    or per-image values of shape ``...`` (``"none"``).  Differentiable.  Images must be at least ``window`` pixels
    in each direction (pytorch_msssim would otherwise silently skip the blur and return a meaningless value).
    ``method``: how the window is applied (one of ``SSIM_METHODS``; default ``SSIM_METHOD``).
    """
    _check_pair(pred, gt, "ssim")
    H, W, C = pred.shape[-3:]
    if window % 2 != 1:
        raise ValueError(f"ssim: window must be odd, got {window}")
    if H < window or W < window:
        raise ValueError(f"ssim: images are {H}x{W} px but the SSIM window is {window} px; crop at least "
                         f"{window}x{window} px or pass a smaller window")
    method = SSIM_METHOD if method is None else method
    if method not in SSIM_METHODS:
        raise ValueError(f"ssim: method must be one of {SSIM_METHODS}, got {method!r}")
    if method == "auto":
        method = "msssim" if pred.device.type != "cuda" else ("fused" if triton_available(pred.device) else "grouped")
    if method == "fused" and gt.requires_grad:
        method = "grouped"  # the fused backward gives the prediction a gradient only
    x, y = _to_nchw(pred), _to_nchw(gt)
    win = _gauss_window(window, sigma, C, x.device, x.dtype)
    if method == "fused":
        per_image = fused_ssim(x, y, win[0, 0, 0]).to(pred.dtype)
    elif method == "msssim":
        per_image = _msssim_ssim(x, y, data_range=1.0, size_average=False, win=win)  # (N,)
    else:
        per_image = _ssim_per_image(x.contiguous(), y.contiguous(), win[0, 0, 0])
    return _reduce(per_image, pred.shape[:-3], reduction)


def photometric_loss(pred: Tensor, gt: Tensor, lambda_ssim: float = 0.2, mask: Tensor | None = None,
                     window: int = 11) -> Tensor:
    """(1 - lambda) * L1 + lambda * (1 - SSIM), the 3DGS loss (lambda = 0.2).  Scalar.

    ``mask`` restricts only the L1 term (SSIM is computed on the whole images, which in this project are already
    face-masked on black, as in the reference implementation).
    """
    loss = (1.0 - lambda_ssim) * l1(pred, gt, mask)
    if lambda_ssim > 0:
        loss = loss + lambda_ssim * (1.0 - ssim(pred, gt, window=window))
    return loss


# ------------------------------------------------------------------ metrics
def psnr(pred: Tensor, gt: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB for data range 1: 10 log10(1 / MSE) per image.

    pred, gt: (H, W, C) or (..., H, W, C); mask (..., H, W, 1) restricts the mean to the masked pixels.
    ``reduction="mean"``: mean of the per-image PSNRs (scalar); ``"none"``: shape ``...``.  Identical images give inf.
    """
    _check_pair(pred, gt, "psnr")
    H, W, C = pred.shape[-3:]
    se = (pred - gt).square().reshape(-1, H, W, C).to(torch.float64)
    if mask is None:
        mse = se.mean(dim=(1, 2, 3))
    else:
        m = _check_mask(mask, pred, "psnr").expand_as(pred).reshape(-1, H, W, C).to(torch.float64)
        mse = (se * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3)).clamp_min(1.0)
    per_image = (-10.0 * torch.log10(mse)).to(pred.dtype if pred.is_floating_point() else torch.float32)
    return _reduce(per_image, pred.shape[:-3], reduction)


@torch.no_grad()
def masked_ssim(pred: Tensor, gt: Tensor, mask: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM over the pixels of ``mask``: the SSIM map (11x11 Gaussian window, 'valid' filtering, channel mean)
    averaged over the window centres that lie in the mask, as a region metric.  Inputs clamped to [0, 1].

    pred, gt: (..., H, W, C) with H, W >= ``window``; mask: (..., H, W, 1).  Returns per-image values of shape ``...``
    (NaN where the mask holds no window centre, e.g. a region within window // 2 pixels of the image border).
    """
    _check_pair(pred, gt, "masked_ssim")
    H, W, C = pred.shape[-3:]
    if H < window or W < window:
        raise ValueError(f"masked_ssim: images are {H}x{W} px but the SSIM window is {window} px")
    m = _check_mask(mask, pred, "masked_ssim").reshape(-1, H, W)
    x, y = _to_nchw(pred.clamp(0, 1)), _to_nchw(gt.clamp(0, 1))
    maps = _ssim_maps(x.contiguous(), y.contiguous(), _gauss_window(window, sigma, C, x.device, x.dtype)[0, 0, 0])
    r = window // 2
    m = m[:, r:H - r, r:W - r]  # the valid map's pixel (i, j) is the window centred on image pixel (i + r, j + r)
    val = (maps.mean(1) * m).sum((1, 2)) / m.sum((1, 2))
    return val.reshape(pred.shape[:-3])


@torch.no_grad()
def ssim_metric(pred: Tensor, gt: Tensor, window: int = 11, sigma: float = 1.5, reduction: str = "mean") -> Tensor:
    """SSIM for evaluation: inputs clamped to [0, 1], no gradient (see :func:`ssim` for shapes)."""
    return ssim(pred.clamp(0, 1), gt.clamp(0, 1), window=window, sigma=sigma, reduction=reduction)


_LPIPS: dict[str, object] = {}
_LPIPS_UNAVAILABLE: list[str] = []


def lpips_available(net: str = "vgg") -> bool:
    """Whether LPIPS can be computed here (imports ``lpips`` lazily and loads its weights once)."""
    return _get_lpips(net, torch.device("cpu")) is not None


def lpips_unavailable_reason() -> str | None:
    """Why LPIPS could not be computed here (the message logged when loading it failed), or None when it has not
    failed (not tried yet, or working)."""
    return _LPIPS_UNAVAILABLE[0] if _LPIPS_UNAVAILABLE else None


def _get_lpips(net: str, device: torch.device):
    if _LPIPS_UNAVAILABLE:
        return None
    model = _LPIPS.get(net)
    if model is None:
        try:  # imported here, never at module import: lpips pulls in torchvision and downloads weights
            import lpips  # type: ignore

            model = lpips.LPIPS(net=net, verbose=False).eval()
            for p in model.parameters():
                p.requires_grad_(False)
        except Exception as exc:  # ImportError, torchvision operator errors, failed weight downloads, ...
            msg = (f"LPIPS skipped: the optional 'lpips' package (needs torchvision and its {net} weights) is not "
                   f"usable here ({type(exc).__name__}: {exc}); install it with `pip install lpips` where "
                   "torchvision works")
            _LPIPS_UNAVAILABLE.append(msg)
            log.warning(msg)
            return None
        _LPIPS[net] = model
    return model.to(device)


def _lpips_distance(model, pred: Tensor, gt: Tensor, reduction: str) -> Tensor:
    x = _to_nchw(pred.clamp(0, 1)) * 2 - 1  # lpips expects [-1, 1]
    y = _to_nchw(gt.clamp(0, 1)) * 2 - 1
    return _reduce(model(x, y).reshape(-1), pred.shape[:-3], reduction)


@torch.no_grad()
def lpips_metric(pred: Tensor, gt: Tensor, net: str = "vgg", reduction: str = "mean") -> Tensor | None:
    """LPIPS distance (lower is better) of (..., H, W, 3) images in [0, 1], or None (logged once) when unavailable."""
    _check_pair(pred, gt, "lpips_metric")
    model = _get_lpips(net, pred.device)
    return None if model is None else _lpips_distance(model, pred, gt, reduction)


def lpips_loss(pred: Tensor, gt: Tensor, net: str = "vgg") -> Tensor:
    """Differentiable mean LPIPS of (..., H, W, 3) images for training; RuntimeError when LPIPS is unavailable
    (asked for explicitly, so it must not be skipped silently)."""
    _check_pair(pred, gt, "lpips_loss")
    model = _get_lpips(net, pred.device)
    if model is None:
        raise RuntimeError(_LPIPS_UNAVAILABLE[0])
    return _lpips_distance(model, pred, gt, "mean")


def mse_to_psnr(mse: float) -> float:
    """Convenience for logs: dB of a mean squared error (data range 1)."""
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)
