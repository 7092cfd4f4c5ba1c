"""Fused SSIM with a hand-written backward: four passes over the images instead of autograd's dozen.

Why a module of our own: SSIM was the largest single cost of a training step on the GPU (17 ms of 40 ms for
16 crops of 896x752 at 46,987 Gaussians on an H200, benchmarks/profile_paths.py), almost all of it memory traffic
of the blurred moment maps and autograd's saved intermediates.  The maintained ``pytorch_msssim`` has no fused
kernel, and the CUDA ``fused-ssim`` package publishes no wheels (it needs a compiler at install time), so the
passes are written here in Triton (shipped with every CUDA build of PyTorch) with the same arithmetic in torch as
the CPU path and the kernels' reference:

  forward  1. horizontal 'valid' Gaussian blur of x, y, x*x, y*y, x*y             (B, H, W)  -> 5 x (B, H, Wo)
           2. vertical blur -> SSIM map summed per plane, and dS/d(mu_x), dS/d(E[xx]), dS/d(E[xy])   3 x (B, Ho, Wo)
  backward 3. vertical transposed blur of the three derivative maps, scaled by the incoming gradient
           4. horizontal transposed blur, combined: dL/dx = T_mu + 2 x T_xx + y T_xy

Only the prediction ``x`` gets a gradient (the ground truth never needs one in training or fitting).
SSIM follows utils/losses.py: Gaussian window (k,) normalised, data range 1, 'valid' filtering,
C1 = 0.01^2, C2 = 0.03^2; the per-image value is the mean of the SSIM map over channels and pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton ships with CUDA builds of PyTorch; CPU builds (CI) use the torch passes below
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

_INT32_MAX = 2 ** 31 - 1
_BLOCK = 256


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on ``device`` (CUDA and Triton importable)."""
    return triton is not None and device.type == "cuda"


# --------------------------------------------------------------------------------------------------- torch passes
def _blur_valid(maps: Tensor, g: Tensor) -> Tensor:
    """'valid' separable blur: (N, M, H, W) -> (N, M, H-k+1, W-k+1) with the 1-D window g (k,)."""
    M, k = maps.shape[1], g.numel()
    x = F.conv2d(maps, g.view(1, 1, 1, k).expand(M, 1, 1, k), groups=M)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(M, 1, k, 1), groups=M)


def _blur_valid_t(maps: Tensor, g: Tensor) -> Tensor:
    """Adjoint of :func:`_blur_valid`: (N, M, Ho, Wo) -> (N, M, Ho+k-1, Wo+k-1)."""
    M, k = maps.shape[1], g.numel()
    x = F.conv_transpose2d(maps, g.view(1, 1, k, 1).expand(M, 1, k, 1), groups=M)
    return F.conv_transpose2d(x, g.view(1, 1, 1, k).expand(M, 1, 1, k), groups=M)


def ssim_and_derivatives(mu_x: Tensor, mu_y: Tensor, e_xx: Tensor, e_yy: Tensor, e_xy: Tensor,
                         c1: float, c2: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SSIM map S from the blurred moments (any equal shapes) and dS/d(mu_x), dS/d(E[xx]), dS/d(E[xy]).

    S = A1 B1 / (A2 B2) with A1 = 2 mu_x mu_y + C1, A2 = mu_x^2 + mu_y^2 + C1, B1 = 2 (E[xy] - mu_x mu_y) + C2,
    B2 = E[xx] - mu_x^2 + E[yy] - mu_y^2 + C2.
    """
    a1 = 2 * mu_x * mu_y + c1
    a2 = mu_x * mu_x + mu_y * mu_y + c1
    b1 = 2 * (e_xy - mu_x * mu_y) + c2
    b2 = (e_xx - mu_x * mu_x) + (e_yy - mu_y * mu_y) + c2
    den = a2 * b2
    s = a1 * b1 / den
    d_mu = (2 * mu_y * (b1 - a1) - 2 * mu_x * s * (b2 - a2)) / den
    d_xx = -s / b2
    d_xy = 2 * a1 / den
    return s, d_mu, d_xx, d_xy


def _forward_torch(x: Tensor, y: Tensor, g: Tensor, c1: float, c2: float) -> tuple[Tensor, Tensor]:
    """(N, C, H, W) pair -> (per-plane sums of S (N*C,), derivative maps (3, N*C, Ho, Wo))."""
    N, C = x.shape[:2]
    mu = _blur_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    s, d_mu, d_xx, d_xy = ssim_and_derivatives(*mu.split(C, dim=1), c1, c2)
    derivs = torch.stack([d_mu, d_xx, d_xy]).reshape(3, N * C, *s.shape[-2:])
    return s.sum((-2, -1)).reshape(N * C), derivs


def _backward_torch(x: Tensor, y: Tensor, g: Tensor, derivs: Tensor, scale: Tensor) -> Tensor:
    """dL/dx (N, C, H, W) from the derivative maps (3, N*C, Ho, Wo) and the per-plane scale (N*C,)."""
    N, C, H, W = x.shape
    d = (derivs * scale.view(1, -1, 1, 1)).reshape(3, N, C, *derivs.shape[-2:])
    t = _blur_valid_t(d.permute(1, 0, 2, 3, 4).reshape(N, 3 * C, *derivs.shape[-2:]), g)
    t_mu, t_xx, t_xy = t.split(C, dim=1)
    return t_mu + 2 * x * t_xx + y * t_xy


# -------------------------------------------------------------------------------------------------- Triton passes
# The image sizes are not specialised on (Triton by default compiles a kernel variant per integer argument's
# divisibility by 16): every photo's crop has its own size, and a fit at a new size waited for a fresh compile
# (0.9 s in bench.py's half-resolution fit variant on an H100, 2026-12-07).
if triton is not None:

    @triton.jit(do_not_specialize=["W", "Wo", "plane"])
    def _hblur_fwd(x_ptr, y_ptr, g_ptr, out_ptr, W, Wo, plane, WIN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < Wo
        src = row * W + cols
        ax = tl.zeros([BLOCK], dtype=tl.float32)
        ay = tl.zeros([BLOCK], dtype=tl.float32)
        axx = tl.zeros([BLOCK], dtype=tl.float32)
        ayy = tl.zeros([BLOCK], dtype=tl.float32)
        axy = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(WIN):
            w = tl.load(g_ptr + k)
            xv = tl.load(x_ptr + src + k, mask=m, other=0.0)
            yv = tl.load(y_ptr + src + k, mask=m, other=0.0)
            ax += w * xv
            ay += w * yv
            axx += w * xv * xv
            ayy += w * yv * yv
            axy += w * xv * yv
        dst = row * Wo + cols
        tl.store(out_ptr + dst, ax, mask=m)
        tl.store(out_ptr + plane + dst, ay, mask=m)
        tl.store(out_ptr + 2 * plane + dst, axx, mask=m)
        tl.store(out_ptr + 3 * plane + dst, ayy, mask=m)
        tl.store(out_ptr + 4 * plane + dst, axy, mask=m)

    @triton.jit(do_not_specialize=["H", "Ho", "Wo", "plane_h", "plane_d"])
    def _vblur_ssim(h_ptr, g_ptr, d_ptr, sum_ptr, H, Ho, Wo, plane_h, plane_d, C1, C2,
                    WIN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # plane * Ho + output row
        b = row // Ho
        i = row % Ho
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < Wo
        base = (b * H + i) * Wo + cols
        mx = tl.zeros([BLOCK], dtype=tl.float32)
        my = tl.zeros([BLOCK], dtype=tl.float32)
        exx = tl.zeros([BLOCK], dtype=tl.float32)
        eyy = tl.zeros([BLOCK], dtype=tl.float32)
        exy = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(WIN):
            w = tl.load(g_ptr + k)
            src = base + k * Wo
            mx += w * tl.load(h_ptr + src, mask=m, other=0.0)
            my += w * tl.load(h_ptr + plane_h + src, mask=m, other=0.0)
            exx += w * tl.load(h_ptr + 2 * plane_h + src, mask=m, other=0.0)
            eyy += w * tl.load(h_ptr + 3 * plane_h + src, mask=m, other=0.0)
            exy += w * tl.load(h_ptr + 4 * plane_h + src, mask=m, other=0.0)
        a1 = 2 * mx * my + C1
        a2 = mx * mx + my * my + C1
        b1 = 2 * (exy - mx * my) + C2
        b2 = (exx - mx * mx) + (eyy - my * my) + C2
        den = a2 * b2
        s = a1 * b1 / den
        dst = row * Wo + cols
        tl.store(d_ptr + dst, (2 * my * (b1 - a1) - 2 * mx * s * (b2 - a2)) / den, mask=m)
        tl.store(d_ptr + plane_d + dst, -s / b2, mask=m)
        tl.store(d_ptr + 2 * plane_d + dst, 2 * a1 / den, mask=m)
        tl.atomic_add(sum_ptr + b, tl.sum(tl.where(m, s, 0.0), axis=0))

    @triton.jit(do_not_specialize=["H", "Ho", "Wo", "plane_d", "plane_o"])
    def _vblur_bwd(d_ptr, g_ptr, scale_ptr, out_ptr, H, Ho, Wo, plane_d, plane_o,
                   WIN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # plane * H + input row
        b = row // H
        i = row % H
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < Wo
        am = tl.zeros([BLOCK], dtype=tl.float32)
        axx = tl.zeros([BLOCK], dtype=tl.float32)
        axy = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(WIN):
            w = tl.load(g_ptr + k)
            r = tl.full([BLOCK], 0, tl.int32) + (i - k)  # as a block: a scalar row mask is not portable
            ok = m & (r >= 0) & (r < Ho)
            src = (b * Ho + r) * Wo + cols
            am += w * tl.load(d_ptr + src, mask=ok, other=0.0)
            axx += w * tl.load(d_ptr + plane_d + src, mask=ok, other=0.0)
            axy += w * tl.load(d_ptr + 2 * plane_d + src, mask=ok, other=0.0)
        sc = tl.load(scale_ptr + b)
        dst = row * Wo + cols
        tl.store(out_ptr + dst, am * sc, mask=m)
        tl.store(out_ptr + plane_o + dst, axx * sc, mask=m)
        tl.store(out_ptr + 2 * plane_o + dst, axy * sc, mask=m)

    @triton.jit(do_not_specialize=["W", "Wo", "plane_t"])
    def _hblur_bwd(t_ptr, x_ptr, y_ptr, g_ptr, dx_ptr, W, Wo, plane_t, WIN: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < W
        am = tl.zeros([BLOCK], dtype=tl.float32)
        axx = tl.zeros([BLOCK], dtype=tl.float32)
        axy = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(WIN):
            w = tl.load(g_ptr + k)
            c = cols - k
            ok = m & (c >= 0) & (c < Wo)
            src = row * Wo + c
            am += w * tl.load(t_ptr + src, mask=ok, other=0.0)
            axx += w * tl.load(t_ptr + plane_t + src, mask=ok, other=0.0)
            axy += w * tl.load(t_ptr + 2 * plane_t + src, mask=ok, other=0.0)
        px = row * W + cols
        xv = tl.load(x_ptr + px, mask=m, other=0.0)
        yv = tl.load(y_ptr + px, mask=m, other=0.0)
        tl.store(dx_ptr + px, am + 2 * xv * axx + yv * axy, mask=m)


def _forward_triton(x: Tensor, y: Tensor, g: Tensor, c1: float, c2: float) -> tuple[Tensor, Tensor]:
    N, C, H, W = x.shape
    k = g.numel()
    B, Ho, Wo = N * C, H - k + 1, W - k + 1
    h = torch.empty(5, B, H, Wo, device=x.device, dtype=torch.float32)
    _hblur_fwd[(B * H, triton.cdiv(Wo, _BLOCK))](x, y, g, h, W, Wo, B * H * Wo, WIN=k, BLOCK=_BLOCK)
    derivs = torch.empty(3, B, Ho, Wo, device=x.device, dtype=torch.float32)
    sums = torch.zeros(B, device=x.device, dtype=torch.float32)
    _vblur_ssim[(B * Ho, triton.cdiv(Wo, _BLOCK))](h, g, derivs, sums, H, Ho, Wo, B * H * Wo, B * Ho * Wo,
                                                    c1, c2, WIN=k, BLOCK=_BLOCK)
    return sums, derivs


def _backward_triton(x: Tensor, y: Tensor, g: Tensor, derivs: Tensor, scale: Tensor) -> Tensor:
    N, C, H, W = x.shape
    k = g.numel()
    B, Ho, Wo = N * C, derivs.shape[-2], derivs.shape[-1]
    t = torch.empty(3, B, H, Wo, device=x.device, dtype=torch.float32)
    _vblur_bwd[(B * H, triton.cdiv(Wo, _BLOCK))](derivs, g, scale.contiguous(), t, H, Ho, Wo, B * Ho * Wo,
                                                  B * H * Wo, WIN=k, BLOCK=_BLOCK)
    dx = torch.empty_like(x)
    _hblur_bwd[(B * H, triton.cdiv(W, _BLOCK))](t, x, y, g, dx, W, Wo, B * H * Wo, WIN=k, BLOCK=_BLOCK)
    return dx


# ------------------------------------------------------------------------------------------------ autograd glue
class _FusedSSIM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, g: Tensor, c1: float, c2: float, use_triton: bool) -> Tensor:
        N, C, H, W = x.shape
        k = g.numel()
        fwd = _forward_triton if use_triton else _forward_torch
        sums, derivs = fwd(x, y, g, c1, c2)
        ctx.save_for_backward(x, y, g, derivs)
        ctx.use_triton = use_triton
        ctx.count = C * (H - k + 1) * (W - k + 1)
        return sums.view(N, C).sum(1) / ctx.count

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, g, derivs = ctx.saved_tensors
        C = x.shape[1]
        scale = (grad.float() / ctx.count).repeat_interleave(C)  # (N*C,): dL/dS of every pixel of the plane
        bwd = _backward_triton if ctx.use_triton else _backward_torch
        return bwd(x, y, g, derivs, scale), None, None, None, None, None


def fused_ssim(x: Tensor, y: Tensor, g: Tensor, c1: float = 0.01 ** 2, c2: float = 0.03 ** 2,
               use_triton: bool | None = None) -> Tensor:
    """Per-image SSIM of x against y.

    Args:
        x: (N, C, H, W) prediction (gets a gradient); y: (N, C, H, W) target (gets none);
        g: (k,) normalised 1-D Gaussian window (k odd, k <= H, W); c1, c2: SSIM constants for data range 1.
        use_triton: default: Triton kernels on CUDA when Triton is importable, else the same passes in torch.
    Returns:
        (N,) mean SSIM over channels and 'valid' pixels, float32.
    """
    x = x.float().contiguous()
    y = y.detach().float().contiguous()
    g = g.detach().float().contiguous()
    if use_triton is None:
        use_triton = triton_available(x.device)
    N, C, H, W = x.shape
    if use_triton and 5 * N * C * H * W > _INT32_MAX:  # the kernels index with int32
        use_triton = False
    return _FusedSSIM.apply(x, y, g, float(c1), float(c2), bool(use_triton))
