"""The pure-PyTorch EWA splatting backend (CPU and GPU; what CI runs).

Same math as gsplat's classic mode (0.3 px^2 dilation) or, with ``filter_2d``, its antialiased mode: opacity-aware
boxes, alpha = min(MAX_ALPHA, o exp(-sigma)) skipped when sigma < 0 or alpha < 1/255, and a pixel stops before the
Gaussian that would take its transmittance to <= 1e-4.  Work is laid out as Gaussian-tile pairs x TILE*TILE pixels,
all cameras at once (``_TilePlan``), with transmittance from a float64 segment-wise cumsum of log(1 - alpha)
(``_chunk_forward``) and a hand-written backward pass (``_TileRaster``) that keeps two floats per pixel-Gaussian
candidate.  Entry point: ``_rasterize_torch``; ``_project_cameras`` is the EWA projection it composites.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch import Tensor

from models.camera import Camera, stack_cameras
from models.gaussians import GaussianCloud, quat_to_rotmat
from models.renderer import settings
from models.renderer.common import compensate_opacity, eval_sh, eval_sh_unclamped

_LOG_T_STOP = math.log(settings.TRANSMITTANCE_STOP)


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
    in_front = z > settings.NEAR_PLANE
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
    eps = settings.BLUR_EPS if filter_2d is None else filter_2d
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
        opac = compensate_opacity(opac, torch.sqrt((det_orig / det_s).clamp_min(0.0)))
    with torch.no_grad():
        ok = ok & (opac >= settings.ALPHA_THRESHOLD)
        # Opacity-aware box: beyond it every alpha is under 1/255, so culling there changes nothing.
        thr = settings.ALPHA_THRESHOLD
        extend = torch.clamp(torch.sqrt(2.0 * torch.log(opac.clamp_min(thr) / thr)), max=3.33)
        rx = torch.ceil(extend * torch.sqrt(a.clamp_min(0)))
        ry = torch.ceil(extend * torch.sqrt(c.clamp_min(0)))
        mx, my = means2d[..., 0], means2d[..., 1]
        ok = ok & (rx > 0) & (ry > 0)
        ok = ok & ~((mx + rx <= 0) | (mx - rx >= W) | (my + ry <= 0) | (my - ry >= H))
        radii = torch.stack([rx, ry], -1).long() * ok.unsqueeze(-1)

    colors = _view_colours(cloud, cameras)
    return {"means2d": means2d, "conic": conic, "depth": zs, "colors": colors, "opac": opac, "radii": radii}


def _view_colours(cloud: GaussianCloud, cameras: Sequence[Camera], clamp: bool = True) -> Tensor:
    """(C, N, 3) SH colour of every Gaussian seen from each camera centre (``clamp=False``: before the clamp at 0,
    :func:`eval_sh_unclamped`)."""
    dev, dt = cloud.means.device, cloud.means.dtype
    sh_colour = eval_sh if clamp else eval_sh_unclamped
    centers = torch.stack([cam.center.to(dev, dt) for cam in cameras])  # (C, 3)
    dirs = cloud.means.unsqueeze(0) - centers.unsqueeze(1)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if cloud.sh_degree == 0:  # view-independent: evaluate once
        return sh_colour(cloud.sh, dirs[0]).unsqueeze(0).expand(len(cameras), -1, -1)
    return sh_colour(cloud.sh.unsqueeze(0), dirs)


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
            tile_xy = torch.stack([tid % self.tiles_x, tid // self.tiles_x], -1).to(m.dtype)
            self.tile_origin = tile_xy * tile + 0.5 + half
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
    there the scan runs along the contiguous dimension of the transpose.  The CPU's scan along dim 0 is slow too
    (about twice the time of transposing, scanning the contiguous rows and transposing back, on a 2-core x86 CPU:
    benchmarks/results/run_training_cpu_2026-12-06b.md); each column is still summed in row order, so the result
    is bit-identical.
    """
    if x.is_cuda:
        return torch.cumsum(x.t().contiguous(), 1).t()
    return torch.cumsum(x.t().contiguous(), 1).t().contiguous()


def _chunk_forward(tab: Tensor, featpad: Tensor, plan: _TilePlan, r0: int, r1: int, s0: int, s1: int):
    """Composite one chunk of whole tiles.

    Args:
        tab: (M, 6) per-Gaussian [mx, my, A/2, B, C/2, opacity]; featpad: (M, F+1) features with a trailing 1.
    Returns:
        out (S', T*T, F+1) per-tile sums of w * featpad, vis (P', T*T) = exp(-sigma), tm (P', T*T) = exclusive
        transmittance where the pixel is still live, else 0, w (P', T*T) = alpha * tm, each candidate's compositing
        weight (P' pairs, S' tiles of this chunk).
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
    keep = (a_raw >= settings.ALPHA_THRESHOLD) & (sigma >= 0)
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
    return out, vis, tm, w


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
            o, vis, tm, _ = _chunk_forward(tab, featpad, plan, r0, r1, s0, s1)
            out[plan.seg_tile[s0:s1]] = o
            nbytes = 2 * vis.numel() * vis.element_size()
            if plan.need_grad and used + nbytes <= settings.STORE_LIMIT_BYTES:
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
            vis, tm = st if st is not None else _chunk_forward(tab, featpad, plan, r0, r1, s0, s1)[1:3]
            gid, tile = plan.gid[r0:r1], plan.tile[r0:r1]
            tb = tab[gid]
            o = tb[:, 5:6]
            a_raw = o * vis
            keep = (vis <= 1.0) & (a_raw >= settings.ALPHA_THRESHOLD)  # vis <= 1  <=>  sigma >= 0
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
        C, N, W, H, settings.TILE, budget, float(settings.MAX_ALPHA),
        need_grad=torch.is_grad_enabled() and any(
            t.requires_grad for t in (cloud.means, cloud.quats, cloud.scales, cloud.opacities, cloud.sh)),
    )
    feats = torch.cat([proj["colors"], proj["depth"].unsqueeze(-1)], -1).reshape(C * N, 4)
    out = _TileRaster.apply(means2d, proj["conic"].reshape(C * N, 3), proj["opac"].reshape(C * N), feats, plan)
    img = _tiles_to_images(out, plan, C, W, H)
    color, depth_acc, alpha = img[..., :3], img[..., 3:4], img[..., 4:5]
    depth_img = depth_acc / alpha.clamp_min(1e-10)
    if background is not None:
        color = color + (1.0 - alpha) * background.to(dev, dt)
    return {"image": color, "alpha": alpha, "depth": depth_img}


def _tiles_to_images(out: Tensor, plan: _TilePlan, C: int, W: int, H: int) -> Tensor:
    """(n_tiles, T*T, F) per-tile pixel values (tiles camera-major, row-major) -> (C, H, W, F) images."""
    T, F = plan.T, out.shape[-1]
    img = out.reshape(C, plan.tiles_y, plan.tiles_x, T, T, F).permute(0, 1, 3, 2, 4, 5)
    return img.reshape(C, plan.tiles_y * T, plan.tiles_x * T, F)[:, :H, :W]


# ---------------------------------------------------------------------------------------- fixed-geometry colour
class _TorchColourPlan:
    """One cloud through one camera with its geometry fixed (the torch half of ``FixedGeometryRender``).

    Colour enters the compositing linearly: pixel = sum_i w_i c_i with weights w_i = alpha_i T_i that depend on the
    geometry and opacities only.  So the projection, the tile plan and the weights of every pixel-Gaussian candidate
    are computed once here (the same ``_chunk_forward`` as the full render, so the same weights) and kept as a sparse
    (H*W, N) matrix A of the non-zero ones (about a quarter of the candidates at the CPU preset's size: the rest lie
    outside a footprint or behind an opaque pixel) and its transpose; a render of new colours is then A @ colours and
    its backward A^T @ grad, instead of the projection, SH evaluation, sort, exp/log1p and float64 scans of a full
    render.  Where A and A^T would exceed STORE_LIMIT_BYTES, each call recomputes the weights chunk by chunk
    (``_FixedColourRaster``), as the full render's backward recomputes its per-candidate values.

    Attributes: base (N, 3) the view's SH colour + 0.5 before the clamp at 0; alpha (H, W, 1) the fixed coverage;
    plan the ``_TilePlan``; tab (N, 6) per-Gaussian [mx, my, A/2, B, C/2, opacity]; A, At sparse CSR (H*W, N) and
    (N, H*W), or None.
    """

    def __init__(self, cloud: GaussianCloud, camera: Camera, budget: int, filter_2d: float | None) -> None:
        N, W, H = len(cloud), camera.width, camera.height
        self.N, self.W, self.H = N, W, H
        self.A = self.At = None
        with torch.no_grad():
            proj = _project_cameras(cloud, [camera], filter_2d)
            self.base = _view_colours(cloud, [camera], clamp=False)[0]  # (N, 3)
            means2d = proj["means2d"].reshape(N, 2)
            plan = self.plan = _TilePlan(means2d, proj["radii"].reshape(N, 2), proj["depth"].reshape(N), 1, N, W, H,
                                         settings.TILE, budget, float(settings.MAX_ALPHA))
            conic, opac = proj["conic"].reshape(N, 3), proj["opac"].reshape(N)
            self.tab = torch.cat([means2d, 0.5 * conic[:, :1], conic[:, 1:2], 0.5 * conic[:, 2:3], opac[:, None]], 1)
            self.ones = torch.ones_like(self.tab[:, :1])
            cover = torch.zeros(plan.n_tiles, plan.T ** 2, 1, dtype=opac.dtype, device=opac.device)
            local = torch.arange(plan.T ** 2, device=opac.device)
            entries: list[tuple[Tensor, Tensor, Tensor]] | None = []
            used = 0
            for r0, r1, s0, s1 in plan.chunks:
                # featpad of only the trailing 1: the chunk's output is the coverage sum_i w_i
                o, _, _, w = _chunk_forward(self.tab, self.ones, plan, r0, r1, s0, s1)
                cover[plan.seg_tile[s0:s1]] = o
                if entries is None:
                    continue
                tile = plan.tile[r0:r1, None]
                px = (tile % plan.tiles_x) * plan.T + local % plan.T  # (P', T*T) pixel column and row
                py = (tile // plan.tiles_x) * plan.T + local // plan.T
                keep = (w != 0) & (px < W) & (py < H)
                rows, cols = (py * W + px)[keep], plan.gid[r0:r1, None].expand_as(w)[keep]
                # indices and values, of A and of its transpose
                used += 2 * rows.numel() * (2 * rows.element_size() + w.element_size())
                entries = entries + [(rows, cols, w[keep])] if used <= settings.STORE_LIMIT_BYTES else None
            self.alpha = _tiles_to_images(cover, plan, 1, W, H)[0]  # (H, W, 1)
            if entries:
                rows, cols, vals = (torch.cat(t) for t in zip(*entries))
                self.A = _csr(rows, cols, vals, (H * W, N))
                self.At = _csr(cols, rows, vals, (N, H * W))

    def chunk_weights(self, i: int) -> Tensor:
        """(P', T*T) compositing weights of chunk i, recomputed."""
        return _chunk_forward(self.tab, self.ones, self.plan, *self.plan.chunks[i])[3]

    def render(self, colors: Tensor) -> Tensor:
        """(N, 3) per-Gaussian RGB -> (H, W, 3) composited colour (no background), differentiable w.r.t. colors."""
        if self.A is not None:
            return _SparseColour.apply(colors, self.A, self.At).reshape(self.H, self.W, colors.shape[1])
        out = _FixedColourRaster.apply(colors, self)
        return _tiles_to_images(out, self.plan, 1, self.W, self.H)[0]


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, size: tuple[int, int]) -> Tensor:
    """A sparse CSR matrix of ``size`` from unique (row, col) entries (rows, cols (E,) long; vals (E,))."""
    import warnings

    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, size, check_invariants=False).coalesce()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matmul with a dense matrix is all we use
        warnings.simplefilter("ignore", UserWarning)
        return coo.to_sparse_csr()


class _SparseColour(torch.autograd.Function):
    """(N, F) colours -> (H*W, F) = A @ colours with a fixed sparse A; backward A^T @ grad (A^T kept as CSR, since
    a transposed CSR product is slower)."""

    @staticmethod
    def forward(ctx, colors: Tensor, A: Tensor, At: Tensor) -> Tensor:
        ctx.At = At
        return A @ colors.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        return ctx.At @ g.contiguous(), None, None


class _FixedColourRaster(torch.autograd.Function):
    """(N, F) colours -> (n_tiles, T*T, F) per-tile sums of w * colour with the weights of a ``_TorchColourPlan``
    recomputed chunk by chunk (no room to keep them); the backward pass is the transpose of that linear map."""

    @staticmethod
    def forward(ctx, colors: Tensor, prep: _TorchColourPlan) -> Tensor:
        plan = prep.plan
        out = colors.new_zeros(plan.n_tiles, plan.T ** 2, colors.shape[1])
        for r0, r1, s0, s1 in plan.chunks:  # the full render's chunk with the colours as its features
            out[plan.seg_tile[s0:s1]] = _chunk_forward(prep.tab, colors, plan, r0, r1, s0, s1)[0]
        ctx.prep, ctx.shape = prep, colors.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout: Tensor):
        prep: _TorchColourPlan = ctx.prep
        plan = prep.plan
        g = gout.new_zeros(ctx.shape)
        for i, (r0, r1, s0, s1) in enumerate(plan.chunks):
            w = prep.chunk_weights(i)
            g_feat = torch.bmm(w.unsqueeze(1), gout[plan.tile[r0:r1]]).squeeze(1)  # (P', F)
            g.index_add_(0, plan.gid[r0:r1], g_feat)
        return g, None
