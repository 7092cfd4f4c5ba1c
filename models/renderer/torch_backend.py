"""Render 3D Gaussian clouds through pinhole cameras with one of three interchangeable backends.

Public functions:
    render(cloud, camera, background=None, backend="auto") -> {"image", "alpha", "depth"}
    render_batch(cloud, cameras, background=None, backend="auto") -> the same with a leading camera dimension

Backends:
    "torch"  pure PyTorch EWA splatting (CPU and GPU; what CI runs).  Same math as gsplat's classic mode (0.3 px
             dilation) or, with ``filter_2d``, its antialiased mode, opacity-aware boxes, alpha = min(MAX_ALPHA, o exp(-sigma)) skipped when sigma < 0 or
             alpha < 1/255, a pixel stops before the Gaussian that would take its transmittance to <= 1e-4.
             Work is laid out as Gaussian-tile pairs x TILE*TILE pixels, all cameras at once, with transmittance
             from a float64 segment-wise cumsum of log(1 - alpha) and a hand-written backward pass
             (``_TileRaster``) that keeps two floats per pixel-Gaussian candidate.
    "gsplat" the gsplat CUDA rasterizer (PyPI ``gsplat``; default on CUDA)
    "inria"  the original 3DGS rasterizer ``diff_gaussian_rasterization`` (not on PyPI; see ``_inria_inputs``)
    "auto"   gsplat when the cloud is on CUDA and gsplat imports, else torch
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch import Tensor

from models.gaussians import GaussianCloud, quat_to_rotmat
from models.camera import Camera, stack_cameras

NEAR_PLANE = 0.01
ALPHA_THRESHOLD = 1.0 / 255.0
TRANSMITTANCE_STOP = 1e-4
# Largest alpha of one Gaussian (Inria's 0.99; gsplat uses 0.999).  Read at every call, so a comparison script may
# set ``renderer.MAX_ALPHA = 0.999`` to match gsplat; the torch backend only.
MAX_ALPHA = 0.99
BLUR_EPS = 0.3  # screen-space dilation (px^2) that keeps every footprint at least about a pixel wide
# The 2D filter used when a call passes no ``filter_2d``: None = 3DGS's classic BLUR_EPS dilation (no opacity change);
# a number eps = Mip-Splatting's 2D mip filter (gsplat's "antialiased" mode): covariance + eps I with opacity times
# sqrt(det S / det(S + eps I)).  Process-wide like MAX_ALPHA; the tools set it from the loaded model
# (models.mip_filter.set_render_filter), training passes its own value explicitly.
FILTER_2D: float | None = None
_DEFAULT = object()  # "use FILTER_2D"
TILE = 4  # torch backend tile side; small tiles waste few pixel-Gaussian candidates on a CPU
# Per-candidate floats kept from forward for backward (2 per candidate); beyond this they are recomputed per chunk.
STORE_LIMIT_BYTES = 1 << 30
_LOG_T_STOP = math.log(TRANSMITTANCE_STOP)
BACKENDS = ("auto", "torch", "gsplat", "inria")
# The NaN/Inf check reads values back to the host: free on a CPU, a synchronisation per call on a GPU, so there it is
# off unless debugging (training still stops on a non-finite loss).
CHECK_FINITE_ON_GPU = False

# Real spherical-harmonics constants (degrees 0-3), as used throughout the 3DGS literature.
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def eval_sh(sh: Tensor, dirs: Tensor) -> Tensor:
    """Evaluate real SH colour.

    Args:
        sh: (..., K, 3) coefficients, K = (d+1)^2 with d <= 3.
        dirs: (..., 3) unit viewing directions (camera centre -> Gaussian).
    Returns:
        (..., 3) colour, clamped at 0 after the +0.5 offset (the convention of the 3DGS rasterizers).
    """
    k = sh.shape[-2]
    out = _C0 * sh[..., 0, :]
    if k > 1:
        x, y, z = (dirs[..., i : i + 1] for i in range(3))
        out = out - _C1 * y * sh[..., 1, :] + _C1 * z * sh[..., 2, :] - _C1 * x * sh[..., 3, :]
        if k > 4:
            xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
            out = (
                out
                + _C2[0] * xy * sh[..., 4, :]
                + _C2[1] * yz * sh[..., 5, :]
                + _C2[2] * (2 * zz - xx - yy) * sh[..., 6, :]
                + _C2[3] * xz * sh[..., 7, :]
                + _C2[4] * (xx - yy) * sh[..., 8, :]
            )
            if k > 9:
                out = (
                    out
                    + _C3[0] * y * (3 * xx - yy) * sh[..., 9, :]
                    + _C3[1] * xy * z * sh[..., 10, :]
                    + _C3[2] * y * (4 * zz - xx - yy) * sh[..., 11, :]
                    + _C3[3] * z * (2 * zz - 3 * xx - 3 * yy) * sh[..., 12, :]
                    + _C3[4] * x * (4 * zz - xx - yy) * sh[..., 13, :]
                    + _C3[5] * z * (xx - yy) * sh[..., 14, :]
                    + _C3[6] * x * (xx - 3 * yy) * sh[..., 15, :]
                )
    return torch.clamp_min(out + 0.5, 0.0)


# ---------------------------------------------------------------------------------------------------- checks
def _validate(cloud: GaussianCloud, cameras: Sequence[Camera], background: Tensor | None) -> None:
    if not isinstance(cloud, GaussianCloud):
        raise TypeError(f"render expects a GaussianCloud, got {type(cloud).__name__}")
    if len(cloud.batch_shape) != 0:
        raise ValueError(
            f"render expects an unbatched cloud (N, ...), got batch shape {tuple(cloud.batch_shape)}; use cloud[b]"
        )
    if len(cloud) == 0:
        raise ValueError("render got an empty GaussianCloud (N = 0)")
    if cloud.sh_degree > 3:
        raise ValueError(f"SH degree {cloud.sh_degree} is not supported (at most 3)")
    if cloud.device.type == "cpu" or CHECK_FINITE_ON_GPU:
        cloud.check_finite("render: GaussianCloud")
    if background is not None and tuple(background.shape) != (3,):
        raise ValueError(f"background must be a (3,) RGB tensor, got shape {tuple(background.shape)}")
    for cam in cameras:
        if not isinstance(cam, Camera):
            raise TypeError(f"render expects Camera objects, got {type(cam).__name__}")


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        import warnings

        warnings.warn(msg)


def available_backends() -> list[str]:
    """Backends usable on this machine right now (gsplat/inria need CUDA)."""
    out = ["torch"]
    if torch.cuda.is_available():
        for name, mod in (("gsplat", "gsplat"), ("inria", "diff_gaussian_rasterization")):
            try:
                __import__(mod)
                out.append(name)
            except Exception:
                pass
    return out


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown render backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            try:
                import gsplat  # noqa: F401

                return "gsplat"
            except Exception:
                return "torch"
        return "torch"
    if backend in ("gsplat", "inria") and device.type != "cuda":
        raise RuntimeError(
            f"the {backend} backend runs on CUDA only, but the cloud is on {device}; use backend='torch' on a CPU"
        )
    return backend


# ---------------------------------------------------------------------------------------------------- torch
def _resolve_filter(filter_2d) -> float | None:
    """The 2D filter of one call: the module default for ``_DEFAULT``; None or 0 = classic dilation."""
    f = FILTER_2D if filter_2d is _DEFAULT else filter_2d
    if f is None or f == 0:
        return None
    f = float(f)
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"filter_2d must be a positive variance in px^2 (or None for the classic 0.3 px^2 "
                         f"dilation), got {f}")
    return f


def _project_cameras(cloud: GaussianCloud, cameras: Sequence[Camera], filter_2d: float | None = None
                     ) -> dict[str, Tensor]:
    """EWA projection of every Gaussian into C cameras at once (3DGS math, as in gsplat's pinhole path).

    ``filter_2d``: None = classic mode (covariance + BLUR_EPS I); eps = antialiased mode (covariance + eps I and
    opacity times sqrt(det S / det(S + eps I)), gsplat's ``rasterize_mode="antialiased"``).

    Returns a dict of tensors with a leading camera dimension:
        means2d (C, N, 2) pixel centres, conic (C, N, 3) [A, B, C] of the inverse dilated 2D covariance,
        depth (C, N) camera-space z, colors (C, N, 3) SH colour seen from each camera, opac (C, N) (compensated in
        antialiased mode), radii (C, N, 2) integer half-sizes of the opacity-aware bounding box (0 = culled).
    """
    dev, dt = cloud.means.device, cloud.means.dtype
    K, w2c, W, H = stack_cameras([c.to(dev) for c in cameras])
    K, w2c = K.to(dt), w2c.to(dt)
    R, t = w2c[:, :3, :3], w2c[:, :3, 3]  # (C, 3, 3), (C, 3)
    pc = torch.matmul(cloud.means.unsqueeze(0), R.transpose(1, 2)) + t.unsqueeze(1)  # (C, N, 3)
    x, y, z = pc.unbind(-1)
    fx, fy, cx, cy = K[:, 0, 0, None], K[:, 1, 1, None], K[:, 0, 2, None], K[:, 1, 2, None]  # (C, 1)
    in_front = z > NEAR_PLANE
    zs = torch.where(in_front, z, torch.ones_like(z))  # keep culled Gaussians out of NaN land

    # Clamp the Jacobian's evaluation point to a guard band around the frustum (stabilises off-screen Gaussians).
    lim_x_pos = (W - cx) / fx + 0.3 * (0.5 * W / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * W / fx)
    lim_y_pos = (H - cy) / fy + 0.3 * (0.5 * H / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * H / fy)
    tx = zs * torch.minimum(lim_x_pos, torch.maximum(-lim_x_neg, x / zs))
    ty = zs * torch.minimum(lim_y_pos, torch.maximum(-lim_y_neg, y / zs))
    zero = torch.zeros_like(zs)
    J = torch.stack(
        [torch.stack([fx / zs, zero, -fx * tx / zs**2], -1), torch.stack([zero, fy / zs, -fy * ty / zs**2], -1)], -2
    )  # (C, N, 2, 3)

    M = quat_to_rotmat(cloud.quats) * cloud.scales.unsqueeze(-2)  # (N, 3, 3) = R S, so Sigma = M M^T
    T = torch.matmul(torch.matmul(J, R.unsqueeze(1)), M.unsqueeze(0))  # (C, N, 2, 3) = J W R S
    cov2d = torch.matmul(T, T.transpose(-1, -2))  # (C, N, 2, 2) = J W Sigma W^T J^T
    eps = BLUR_EPS if filter_2d is None else filter_2d
    a = cov2d[..., 0, 0] + eps
    b = cov2d[..., 0, 1]
    c = cov2d[..., 1, 1] + eps
    det = a * c - b * b
    ok = in_front & (det > 0)
    det_s = torch.where(ok, det, torch.ones_like(det))
    conic = torch.stack([c / det_s, -b / det_s, a / det_s], -1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)

    opac = cloud.opacities.unsqueeze(0).expand(len(cameras), -1)
    if filter_2d is not None:  # Mip-Splatting's 2D mip filter keeps each footprint's integral: opacity compensation
        det_orig = cov2d[..., 0, 0] * cov2d[..., 1, 1] - b * b
        opac = opac * torch.sqrt((det_orig / det_s).clamp_min(0.0))
    with torch.no_grad():
        ok = ok & (opac >= ALPHA_THRESHOLD)
        # Opacity-aware box: beyond it every alpha is under 1/255, so culling there changes nothing.
        extend = torch.clamp(torch.sqrt(2.0 * torch.log(opac.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)), max=3.33)
        rx = torch.ceil(extend * torch.sqrt(a.clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(c.clamp_min(0)))
        mx, my = means2d[..., 0], means2d[..., 1]
        ok = ok & (rx > 0) & (ry > 0)
        ok = ok & ~((mx + rx <= 0) | (mx - rx >= W) | (my + ry <= 0) | (my - ry >= H))
        radii = torch.stack([rx, ry], -1).long() * ok.unsqueeze(-1)

    centers = torch.stack([cam.center.to(dev, dt) for cam in cameras])  # (C, 3)
    dirs = cloud.means.unsqueeze(0) - centers.unsqueeze(1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if cloud.sh_degree == 0:  # view-independent: evaluate once
        colors = eval_sh(cloud.sh, dirs[0]).unsqueeze(0).expand(len(cameras), -1, -1)
    else:
        colors = eval_sh(cloud.sh.unsqueeze(0), dirs)
    return {"means2d": means2d, "conic": conic, "depth": zs, "colors": colors, "opac": opac, "radii": radii}


class _TilePlan:
    """Which Gaussian touches which tile, in compositing order, plus the chunking of that work.

    Tiles of all C cameras are numbered globally (camera-major).  The P Gaussian-tile pairs are sorted by tile and,
    inside a tile, front to back; S non-empty tiles form contiguous segments of that list.

    Attributes (all on the render device):
        gid (P,) flat Gaussian index (camera * N + gaussian); tile (P,) global tile id; row_seg (P,) segment of each
        pair; seg_tile (S,), seg_start (S,), seg_len (S,); tile_origin (n_tiles, 2) centre of each tile's first
        pixel minus (T-1)/2 (see _TileRaster); chunks: list of (row0, row1, seg0, seg1) with whole segments.
    """

    def __init__(self, means2d: Tensor, radii: Tensor, depth: Tensor, n_cams: int, n_per_cam: int,
                 width: int, height: int, tile: int, budget: int, max_alpha: float, need_grad: bool = True) -> None:
        dev = means2d.device
        self.T, self.max_alpha = tile, max_alpha
        self.need_grad = need_grad  # keep per-candidate values for a backward pass
        self.tiles_x, self.tiles_y = math.ceil(width / tile), math.ceil(height / tile)
        per_cam = self.tiles_x * self.tiles_y
        self.n_tiles = n_cams * per_cam
        with torch.no_grad():
            vis = (radii[:, 0] > 0).nonzero().squeeze(-1)
            order = vis[torch.argsort(depth[vis], stable=True)]  # front to back
            m = means2d[order]
            r = radii[order].to(m.dtype)
            x0 = torch.floor((m[:, 0] - r[:, 0]) / tile).clamp(0, self.tiles_x).long()
            x1 = torch.ceil((m[:, 0] + r[:, 0]) / tile).clamp(0, self.tiles_x).long()
            y0 = torch.floor((m[:, 1] - r[:, 1]) / tile).clamp(0, self.tiles_y).long()
            y1 = torch.ceil((m[:, 1] + r[:, 1]) / tile).clamp(0, self.tiles_y).long()
            wspan = (x1 - x0).clamp_min(0)
            counts = wspan * (y1 - y0).clamp_min(0)
            total = int(counts.sum())
            src = torch.repeat_interleave(torch.arange(len(order), device=dev), counts)
            starts = torch.cumsum(counts, 0) - counts
            local = torch.arange(total, device=dev) - starts[src]
            ws = wspan[src]
            ly = torch.div(local, ws, rounding_mode="floor")
            cam = torch.div(order, n_per_cam, rounding_mode="floor")
            tile_id = cam[src] * per_cam + (y0[src] + ly) * self.tiles_x + x0[src] + (local - ly * ws)
            # Stable radix sort on int32 keys keeps the depth order inside each tile.
            srt = torch.argsort(tile_id.int() if self.n_tiles < 2**31 else tile_id, stable=True)
            self.tile = tile_id[srt]
            self.gid = order[src[srt]]
            seg_tile, seg_len = torch.unique_consecutive(self.tile, return_counts=True)
            self.seg_tile, self.seg_len = seg_tile, seg_len
            self.seg_start = torch.cumsum(seg_len, 0) - seg_len
            self.row_seg = torch.repeat_interleave(torch.arange(len(seg_len), device=dev), seg_len)
            tid = torch.arange(self.n_tiles, device=dev) % per_cam
            half = 0.5 * (tile - 1)
            self.tile_origin = torch.stack([tid % self.tiles_x, tid // self.tiles_x], -1).to(m.dtype) * tile + 0.5 + half
            # Chunks of whole tiles with at most `budget` pixel-Gaussian candidates each (a bigger tile goes alone).
            cum = torch.cumsum(seg_len * (tile * tile), 0).tolist()
            starts_l, self.chunks = self.seg_start.tolist(), []
            s, n_seg = 0, len(cum)
            while s < n_seg:
                base = cum[s - 1] if s else 0
                e = max(s + 1, bisect.bisect_right(cum, base + budget, lo=s))
                r0 = starts_l[s]
                r1 = starts_l[e] if e < n_seg else len(self.gid)
                self.chunks.append((r0, r1, s, e))
                s = e
        local_px = torch.arange(tile * tile, device=dev)
        lx = (local_px % tile).to(m.dtype) - half
        ly_ = (local_px // tile).to(m.dtype) - half
        self.lx, self.ly = lx, ly_
        # Basis of the pixel-offset moments used by the backward pass: 1, lx, ly, lx^2, lx*ly, ly^2.
        self.basis = torch.stack([torch.ones_like(lx), lx, ly_, lx * lx, lx * ly_, ly_ * ly_], -1)


def _cumsum_rows(x: Tensor) -> Tensor:
    """Cumulative sum over dim 0 of a (P, K) tensor with small K.

    CUDA scans along an outer dimension one thread per column (K threads for millions of rows): far too slow, so
    there the scan runs along the contiguous dimension of the transpose.
    """
    if x.is_cuda:
        return torch.cumsum(x.t().contiguous(), 1).t()
    return torch.cumsum(x, 0)


def _chunk_forward(tab: Tensor, featpad: Tensor, plan: _TilePlan, r0: int, r1: int, s0: int, s1: int):
    """Composite one chunk of whole tiles.

    Args:
        tab: (M, 6) per-Gaussian [mx, my, A/2, B, C/2, opacity]; featpad: (M, F+1) features with a trailing 1.
    Returns:
        out (S', T*T, F+1) per-tile sums of w * featpad, vis (P', T*T) = exp(-sigma), tm (P', T*T) = exclusive
        transmittance where the pixel is still live, else 0 (P' pairs, S' tiles of this chunk).
    """
    gid, tile = plan.gid[r0:r1], plan.tile[r0:r1]
    tb = tab[gid]
    org = plan.tile_origin[tile]
    ox = (org[:, 0] - tb[:, 0]).unsqueeze(1)  # offset of the tile's (centred) origin from the mean
    oy = (org[:, 1] - tb[:, 1]).unsqueeze(1)
    dx = ox + plan.lx  # (P', T*T)
    dy = oy + plan.ly
    sigma = torch.addcmul(tb[:, 2:3] * dx, tb[:, 3:4], dy).mul_(dx).addcmul_(tb[:, 4:5] * dy, dy)
    vis = torch.exp(-sigma)
    a_raw = tb[:, 5:6] * vis
    keep = (a_raw >= ALPHA_THRESHOLD) & (sigma >= 0)
    alpha = torch.where(keep, a_raw.clamp_max(plan.max_alpha), 0.0)
    # Transmittance as a segment-wise cumulative sum of log(1 - alpha) in float64 (exact to ~1e-12).
    la = torch.log1p(-alpha).double()
    cs = _cumsum_rows(la)
    seg_start = plan.seg_start[s0:s1] - r0
    before = (cs[seg_start] - la[seg_start])[plan.row_seg[r0:r1] - s0]  # cumsum before each tile's first pair
    log_incl = cs - before
    live = log_incl > _LOG_T_STOP  # the pair that would push T to <= 1e-4 and all behind it are dropped
    tm = torch.exp((log_incl - la).to(alpha.dtype)).mul_(live)  # the local values are small: float32 is exact enough
    w = alpha * tm
    contrib = w.unsqueeze(-1) * featpad[gid].unsqueeze(1)  # (P', T*T, F+1)
    out = torch.segment_reduce(contrib, "sum", lengths=plan.seg_len[s0:s1], axis=0)
    return out, vis, tm


class _TileRaster(torch.autograd.Function):
    """Front-to-back alpha compositing of projected Gaussians with a hand-written backward pass.

    Inputs (M = cameras x Gaussians, flattened): means2d (M, 2), conic (M, 3), opac (M,), feats (M, F).
    Output: (n_tiles, T*T, F+1) per pixel sum_i w_i * [feats_i, 1], w_i = alpha_i * prod_{j<i} (1 - alpha_j).
    The backward pass keeps only two floats per pixel-Gaussian candidate (or recomputes them per chunk when they
    would exceed STORE_LIMIT_BYTES), instead of the dozen intermediates autograd would keep.
    """

    @staticmethod
    def forward(ctx, means2d: Tensor, conic: Tensor, opac: Tensor, feats: Tensor, plan: _TilePlan) -> Tensor:
        T2, F = plan.T * plan.T, feats.shape[1]
        tab = torch.cat([means2d, 0.5 * conic[:, :1], conic[:, 1:2], 0.5 * conic[:, 2:3], opac[:, None]], 1)
        featpad = torch.cat([feats, torch.ones_like(feats[:, :1])], 1)
        out = torch.zeros(plan.n_tiles, T2, F + 1, dtype=feats.dtype, device=feats.device)
        stored, used = [], 0
        for r0, r1, s0, s1 in plan.chunks:
            o, vis, tm = _chunk_forward(tab, featpad, plan, r0, r1, s0, s1)
            out[plan.seg_tile[s0:s1]] = o
            nbytes = 2 * vis.numel() * vis.element_size()
            if plan.need_grad and used + nbytes <= STORE_LIMIT_BYTES:
                stored.append((vis, tm))
                used += nbytes
            else:
                stored.append(None)  # recomputed in backward
        ctx.plan, ctx.stored = plan, stored
        ctx.save_for_backward(tab, featpad)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: Tensor):
        tab, featpad = ctx.saved_tensors
        plan: _TilePlan = ctx.plan
        F = featpad.shape[1] - 1
        gtab = torch.zeros(tab.shape[0], 6 + F, dtype=tab.dtype, device=tab.device)  # d/d[mx,my,A,B,C,o,feats]
        for (r0, r1, s0, s1), st in zip(plan.chunks, ctx.stored):
            vis, tm = st if st is not None else _chunk_forward(tab, featpad, plan, r0, r1, s0, s1)[1:]
            gid, tile = plan.gid[r0:r1], plan.tile[r0:r1]
            tb = tab[gid]
            o = tb[:, 5:6]
            a_raw = o * vis
            keep = (vis <= 1.0) & (a_raw >= ALPHA_THRESHOLD)  # vis <= 1  <=>  sigma >= 0
            alpha = torch.where(keep, a_raw.clamp_max(plan.max_alpha), 0.0)
            w = alpha * tm
            go = gout[tile]  # (P', T*T, F+1)
            fp = featpad[gid]
            g_w = torch.bmm(go, fp.unsqueeze(-1)).squeeze(-1)  # dL/dw per candidate
            # Everything composited behind a candidate: sum_{j>i} g_w_j w_j, from a float64 segment cumsum.
            gw = (g_w * w).double()
            cs = _cumsum_rows(gw)
            seg_end = plan.seg_start[s0:s1] + plan.seg_len[s0:s1] - 1 - r0
            behind = (cs[seg_end][plan.row_seg[r0:r1] - s0] - cs).to(w.dtype)
            g_alpha = g_w * tm - behind / (1.0 - alpha)
            g_araw = g_alpha * (keep & (a_raw <= plan.max_alpha))
            g_sigma = -g_araw * a_raw
            g_opac = (g_araw * vis).sum(1)
            g_feat = torch.bmm(w.unsqueeze(1), go[..., :F]).squeeze(1)  # (P', F)
            # sigma = A/2 dx^2 + B dx dy + C/2 dy^2 with dx = ox + lx: sum over pixels through offset moments.
            mom = g_sigma @ plan.basis  # (P', 6)
            org = plan.tile_origin[tile]
            ox, oy = org[:, 0] - tb[:, 0], org[:, 1] - tb[:, 1]
            m0, mx, my, mxx, mxy, myy = mom.unbind(1)
            s_dx, s_dy = ox * m0 + mx, oy * m0 + my
            s_xx = ox * ox * m0 + 2 * ox * mx + mxx
            s_xy = ox * oy * m0 + ox * my + oy * mx + mxy
            s_yy = oy * oy * m0 + 2 * oy * my + myy
            hA, B, hC = tb[:, 2], tb[:, 3], tb[:, 4]
            g_mx = -(2 * hA * s_dx + B * s_dy)  # d dx / d mx = -1
            g_my = -(2 * hC * s_dy + B * s_dx)
            pair = torch.cat([torch.stack([g_mx, g_my, 0.5 * s_xx, s_xy, 0.5 * s_yy, g_opac], 1), g_feat], 1)
            gtab.index_add_(0, gid, pair)
        return gtab[:, 0:2], gtab[:, 2:5], gtab[:, 5], gtab[:, 6:], None


def _rasterize_torch(
    cloud: GaussianCloud, cameras: Sequence[Camera], background: Tensor | None, budget: int,
    filter_2d: float | None = None,
) -> dict[str, Tensor]:
    """Render C cameras of one size with the pure-PyTorch tile rasterizer; returns (C, H, W, ...) tensors."""
    C, N = len(cameras), len(cloud)
    W, H = cameras[0].width, cameras[0].height
    proj = _project_cameras(cloud, cameras, filter_2d)
    dev, dt = cloud.means.device, cloud.means.dtype
    means2d = proj["means2d"].reshape(C * N, 2)
    plan = _TilePlan(
        means2d.detach(), proj["radii"].reshape(C * N, 2), proj["depth"].detach().reshape(C * N),
        C, N, W, H, TILE, budget, float(MAX_ALPHA),
        need_grad=torch.is_grad_enabled() and any(
            t.requires_grad for t in (cloud.means, cloud.quats, cloud.scales, cloud.opacities, cloud.sh)),
    )
    feats = torch.cat([proj["colors"], proj["depth"].unsqueeze(-1)], -1).reshape(C * N, 4)
    out = _TileRaster.apply(means2d, proj["conic"].reshape(C * N, 3), proj["opac"].reshape(C * N), feats, plan)
    T = plan.T
    img = out.reshape(C, plan.tiles_y, plan.tiles_x, T, T, 5).permute(0, 1, 3, 2, 4, 5)
    img = img.reshape(C, plan.tiles_y * T, plan.tiles_x * T, 5)[:, :H, :W]
    color, depth_acc, alpha = img[..., :3], img[..., 3:4], img[..., 4:5]
    depth_img = depth_acc / alpha.clamp_min(1e-10)
    if background is not None:
        color = color + (1.0 - alpha) * background.to(dev, dt)
    return {"image": color, "alpha": alpha, "depth": depth_img}


# ---------------------------------------------------------------------------------------------------- gsplat
def _gsplat_colors(cloud: GaussianCloud, w2c: Tensor) -> Tensor:
    """RGB per Gaussian for gsplat's ``sh_degree=None`` input: (..., N, 3) at SH degree 0, else (..., C, N, 3).

    Same values as gsplat's own SH path (``clamp_min(SH + 0.5, 0)``), but the camera centres come from the
    world-to-camera matrices in closed form (-R^T t): gsplat's path inverts the view matrices with torch.inverse,
    which synchronises the GPU with the host on every call, and at degree 0 the SH kernel is a scale and shift."""
    from gsplat import spherical_harmonics

    if cloud.sh_degree == 0:
        return (cloud.sh[..., 0, :] * _C0 + 0.5).clamp_min(0.0)
    R, t = w2c[..., :3, :3], w2c[..., :3, 3:]
    centres = -(R.transpose(-1, -2) @ t).squeeze(-1)  # (..., C, 3)
    dirs = cloud.means.unsqueeze(-3) - centres.unsqueeze(-2)  # (..., C, N, 3)
    shs = cloud.sh.unsqueeze(-4).expand(*dirs.shape[:-1], *cloud.sh.shape[-2:])
    return (spherical_harmonics(cloud.sh_degree, dirs, shs) + 0.5).clamp_min(0.0)


# gsplat's tile size in pixels and its packed mode (measured on an H200 at 46,987 Gaussians and 16 training views of
# 896x752, benchmarks/train_speed.py: packed was slower, 753 vs 785 views/s); module constants so benchmarks can
# try other values without a flag on every render call.
GSPLAT_TILE_SIZE = 16
GSPLAT_PACKED = False


def _render_gsplat(cloud: GaussianCloud, cameras: Sequence[Camera] | Sequence[Sequence[Camera]],
                   background: Tensor | None, stacked: tuple[Tensor, Tensor, int, int] | None = None,
                   depth: bool = True, filter_2d: float | None = None) -> dict[str, Tensor]:
    """One gsplat call; a batched cloud (B, N, ...) takes B lists of C cameras (outputs (B, C, H, W, ...)).
    ``stacked``: the cameras' ``stack_cameras`` result when the caller already has it (unbatched cloud only).
    ``depth=False``: no depth channel is blended (the output's "depth" is then None).
    ``filter_2d``: None = ``rasterize_mode="classic"`` (eps2d 0.3), else "antialiased" with ``eps2d=filter_2d``."""
    try:
        from gsplat import rasterization
    except ImportError as exc:
        raise ImportError("the gsplat backend needs the gsplat package: pip install gsplat==1.5.3") from exc
    if len(cloud.batch_shape):
        stacks = [stack_cameras([c.to(cloud.device) for c in cams]) for cams in cameras]  # checks each list
        sizes = {(s[2], s[3]) for s in stacks}
        if len(sizes) != 1:
            raise ValueError(f"cameras rendered together must share one image size, got {sorted(sizes)}")
        K, w2c = torch.stack([s[0] for s in stacks]), torch.stack([s[1] for s in stacks])
        (W, H), = sizes
    else:
        K, w2c, W, H = stacked if stacked is not None else stack_cameras([c.to(cloud.device) for c in cameras])
    bg = None if background is None else background.to(cloud.means).expand(*K.shape[:-2], 3)
    colors, alphas, _ = rasterization(
        means=cloud.means,
        quats=cloud.quats,
        scales=cloud.scales,
        opacities=cloud.opacities,
        colors=_gsplat_colors(cloud, w2c),
        viewmats=w2c,
        Ks=K,
        width=W,
        height=H,
        sh_degree=None,
        near_plane=NEAR_PLANE,
        render_mode="RGB+ED" if depth else "RGB",
        backgrounds=bg,
        packed=GSPLAT_PACKED and bg is None,  # gsplat 1.5.3 asserts when backgrounds are combined with packed mode
        tile_size=GSPLAT_TILE_SIZE,
        rasterize_mode="classic" if filter_2d is None else "antialiased",
        eps2d=BLUR_EPS if filter_2d is None else filter_2d,
    )
    return {"image": colors[..., :3], "alpha": alphas, "depth": colors[..., 3:4] if depth else None}


def render_identities(
    clouds: GaussianCloud,
    cameras: Sequence[Sequence[Camera]],
    background: Tensor | None = None,
    backend: str = "auto",
    depth: bool = True,
    filter_2d=_DEFAULT,
) -> dict[str, Tensor]:
    """Render B clouds, each through its own C cameras (all of one image size), e.g. B identities of a batch.

    Args:
        clouds: GaussianCloud with batch shape (B,), N Gaussians each.
        cameras: B lists of C cameras.
        background: (3,) RGB or None (black).
        backend: as in :func:`render_batch`; gsplat renders all B x C views in one call.
        depth: False when the caller needs no depth (training): gsplat then skips it and "depth" may be None.
        filter_2d: as in :func:`render_batch`.
    Returns:
        {"image": (B, C, H, W, 3), "alpha": (B, C, H, W, 1), "depth": (B, C, H, W, 1) or None}.
    """
    if len(clouds.batch_shape) != 1 or clouds.batch_shape[0] != len(cameras):
        raise ValueError(f"render_identities needs a (B, N, ...) cloud and B camera lists; got batch shape "
                         f"{tuple(clouds.batch_shape)} and {len(cameras)} lists")
    if len({len(c) for c in cameras}) != 1:
        raise ValueError("render_identities needs the same number of cameras for every identity")
    which = _pick_backend(backend, clouds.device)
    if which == "gsplat":
        if background is not None and tuple(background.shape) != (3,):
            raise ValueError(f"background must be a (3,) RGB tensor, got shape {tuple(background.shape)}")
        return _render_gsplat(clouds, cameras, background, depth=depth, filter_2d=_resolve_filter(filter_2d))
    outs = [render_batch(clouds[b], cameras[b], background, which, filter_2d=filter_2d) for b in range(len(cameras))]
    return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


# ---------------------------------------------------------------------------------------------------- inria
def _inria_projection(cam: Camera, znear: float, zfar: float) -> Tensor:
    """OpenGL-style projection of the Inria rasterizer, shifted so that any principal point renders right."""
    W, H = cam.width, cam.height
    fx, fy, cx, cy = cam.fx, cam.fy, cam.cx, cam.cy
    P = torch.zeros(4, 4)
    P[0, 0] = 2 * fx / W
    P[1, 1] = 2 * fy / H
    P[0, 2] = 2 * cx / W - 1
    P[1, 2] = 2 * cy / H - 1
    P[3, 2] = 1.0
    P[2, 2] = zfar / (zfar - znear)
    P[2, 3] = -(zfar * znear) / (zfar - znear)
    return P


def _inria_inputs(cloud: GaussianCloud) -> dict[str, Tensor]:
    """The per-Gaussian tensors handed to ``diff_gaussian_rasterization`` (both passes), prepared for its kernel.

    The original rasterizer builds each rotation from the quaternion it is given without normalising it and returns
    the gradient of that unnormalised formula (its 3DGS training code normalises in PyTorch before the call).  gsplat
    and the torch backend normalise inside, so their quaternion gradient has no radial part.  Normalising here,
    through autograd, makes the kernel see unit quaternions and gives ``cloud.quats`` the same gradient as the other
    backends.  Its backward pass also reads scales and rotations through raw pointers without making them contiguous
    (its forward does), so both are handed over contiguous.

    Returns: means (N, 3), quats (N, 4) unit, scales (N, 3), opacities (N, 1), sh (N, K, 3); float32, contiguous.
    """
    if cloud.means.dtype != torch.float32:
        raise TypeError(f"the inria backend needs a float32 GaussianCloud, got {cloud.means.dtype}; use cloud.float()")
    return {
        "means": cloud.means.contiguous(),
        "quats": torch.nn.functional.normalize(cloud.quats, dim=-1).contiguous(),
        "scales": cloud.scales.contiguous(),
        "opacities": cloud.opacities.unsqueeze(-1).contiguous(),
        "sh": cloud.sh.contiguous(),
    }


def _render_inria(cloud: GaussianCloud, cameras: Sequence[Camera], background: Tensor | None,
                  filter_2d: float | None = None) -> dict[str, Tensor]:
    """Render C cameras one by one with ``diff_gaussian_rasterization``; returns (C, H, W, ...) tensors.

    ``filter_2d``: the 2D mip filter needs a build with the ``antialiasing`` setting (graphdeco's rasterizer since
    2024), whose kernel has the dilation fixed at 0.3 px^2 with the same opacity compensation; older builds raise.

    Two passes per camera: SH colour over the background, then the precomputed colour (1, z, 0) over black, whose
    channels are the accumulated alpha and alpha-weighted camera-space depth (the kernel returns neither in every
    version; the depth some forks return is inverse depth).
    """
    try:
        from diff_gaussian_rasterization import GaussianRasterizationSettings, GaussianRasterizer
    except ImportError as exc:
        raise ImportError(
            "the inria backend needs diff_gaussian_rasterization, which is not on PyPI: clone "
            "graphdeco-inria/diff-gaussian-rasterization with its glm submodule (add '#include <cstdint>' to "
            "cuda_rasterizer/rasterizer_impl.h on new CUDA toolkits) and `pip install --no-build-isolation .` it"
        ) from exc
    dev = cloud.device
    has_aa = "antialiasing" in GaussianRasterizationSettings._fields
    if filter_2d is not None and not has_aa:
        raise RuntimeError("the installed diff_gaussian_rasterization has no 'antialiasing' setting, so it cannot apply "
                           "the model's 2D mip filter: install graphdeco-inria/diff-gaussian-rasterization from 2024 "
                           "or later, or render with backend='gsplat' or 'torch'")
    if filter_2d is not None and abs(filter_2d - 0.3) > 1e-9:
        _warn_once(f"inria backend: its antialiasing kernel dilates by a fixed 0.3 px^2, not the model's "
                   f"{filter_2d} px^2 (use gsplat or torch for the exact filter)")
    g = _inria_inputs(cloud)
    bg = torch.zeros(3, device=dev) if background is None else background.to(dev, torch.float32)
    black = torch.zeros(3, device=dev)
    images, alphas, depths = [], [], []
    for cam in cameras:
        w2c = cam.w2c.to(dev, torch.float32)
        # The row-vector convention of the Inria code wants transposed matrices.
        view = w2c.T.contiguous()
        proj = _inria_projection(cam, 0.01, 100.0).to(dev)
        full = (proj @ w2c).T.contiguous()
        settings = GaussianRasterizationSettings(
            image_height=cam.height,
            image_width=cam.width,
            tanfovx=0.5 * cam.width / cam.fx,
            tanfovy=0.5 * cam.height / cam.fy,
            bg=bg,
            scale_modifier=1.0,
            viewmatrix=view,
            projmatrix=full,
            sh_degree=cloud.sh_degree,
            campos=cam.center.to(dev, torch.float32),
            prefiltered=False,
            debug=False,
            **({"antialiasing": filter_2d is not None} if has_aa else {}),
        )
        common = {"opacities": g["opacities"], "scales": g["scales"], "rotations": g["quats"], "cov3D_precomp": None}
        # means2D only receives the kernel's screen-space gradient (NDC units), which nothing here uses.
        res = GaussianRasterizer(settings)(
            means3D=g["means"], means2D=torch.zeros_like(g["means"]), shs=g["sh"], colors_precomp=None, **common
        )
        z = g["means"] @ w2c[2, :3] + w2c[2, 3]  # (N,) camera-space depth, differentiable w.r.t. the means
        aux = torch.stack([torch.ones_like(z), z, torch.zeros_like(z)], -1).contiguous()
        res_a = GaussianRasterizer(settings._replace(bg=black, sh_degree=0))(
            means3D=g["means"], means2D=torch.zeros_like(g["means"]), shs=None, colors_precomp=aux, **common
        )
        alpha = res_a[0][0:1].permute(1, 2, 0)  # (H, W, 1)
        images.append(res[0].permute(1, 2, 0))
        alphas.append(alpha)
        depths.append(res_a[0][1:2].permute(1, 2, 0) / alpha.clamp_min(1e-10))
    return {"image": torch.stack(images), "alpha": torch.stack(alphas), "depth": torch.stack(depths)}


# ---------------------------------------------------------------------------------------------------- public
def render_batch(
    cloud: GaussianCloud,
    cameras: Sequence[Camera],
    background: Tensor | None = None,
    backend: str = "auto",
    chunk_elements: int = 1 << 22,
    filter_2d=_DEFAULT,
) -> dict[str, Tensor]:
    """Render one Gaussian cloud through several cameras of one image size.

    Args:
        cloud: unbatched GaussianCloud of N Gaussians (see models/gaussians.py for shapes).
        cameras: C cameras sharing width W and height H.
        background: (3,) RGB composited behind the Gaussians, or None for black.
        backend: "auto", "torch", "gsplat" or "inria".
        chunk_elements: torch backend only: pixel-Gaussian candidates evaluated at once (bounds the working
            memory: roughly 100 bytes per candidate; whole tiles per chunk).
        filter_2d: screen-space filter: None = 3DGS's classic 0.3 px^2 dilation; eps > 0 = Mip-Splatting's 2D mip
            filter of eps px^2 with opacity compensation (gsplat's antialiased mode); omitted = ``FILTER_2D``.
    Returns:
        dict with
            image: (C, H, W, 3) colour,
            alpha: (C, H, W, 1) accumulated opacity,
            depth: (C, H, W, 1) alpha-normalised expected camera-space depth (0 where alpha is 0),
        all differentiable w.r.t. every attribute of ``cloud``.
    """
    cameras = list(cameras)
    if not cameras:
        raise ValueError("render_batch needs at least one camera")
    _validate(cloud, cameras, background)
    which = _pick_backend(backend, cloud.device)
    f2d = _resolve_filter(filter_2d)
    if which == "gsplat":
        stacked = stack_cameras([c.to(cloud.device) for c in cameras])  # raises on mixed image sizes
        return _render_gsplat(cloud, cameras, background, stacked, filter_2d=f2d)
    stack_cameras(cameras)  # raises on mixed image sizes
    if which == "inria":
        return _render_inria(cloud, cameras, background, f2d)
    return _rasterize_torch(cloud, cameras, background, chunk_elements, f2d)


def render(
    cloud: GaussianCloud, camera: Camera, background: Tensor | None = None, backend: str = "auto",
    filter_2d=_DEFAULT,
) -> dict[str, Tensor]:
    """Render one Gaussian cloud through one camera.

    Args:
        cloud: unbatched GaussianCloud of N Gaussians.
        camera: the Camera (image size camera.width x camera.height).
        background: (3,) RGB behind the Gaussians, or None for black.
        backend: "auto", "torch", "gsplat" or "inria".
        filter_2d: as in :func:`render_batch`.
    Returns:
        {"image": (H, W, 3), "alpha": (H, W, 1), "depth": (H, W, 1)}, differentiable w.r.t. the cloud.
    """
    out = render_batch(cloud, [camera], background, backend, filter_2d=filter_2d)
    return {k: v[0] for k, v in out.items()}
