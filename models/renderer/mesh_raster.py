"""Z-buffered triangle rasterization of a mesh into a pinhole camera (CPU or GPU, pure PyTorch).

Used by the preprocessing (utils/preprocess/projection_ply.py) to project the FLAME face mask into every camera,
with the rest of the head as occluder.  Conventions follow models/camera.py: OpenCV camera (x right, y down,
z forward), pixel (i, j) covers [j, j+1) x [i, i+1) and is sampled at its centre (j + 0.5, i + 0.5).

How it works (vectorised, no Python loop over triangles): every triangle is projected, the integer pixel
centres inside its screen bounding box are enumerated as "candidate fragments" (flat tensors built with
``repeat_interleave``), the three edge functions decide coverage, and depth is interpolated perspective-correctly
(``1/z`` is affine in screen space).  A z-buffer keeps the nearest fragment per pixel (``scatter_reduce`` amin).
Triangles are processed in chunks whose summed bounding-box area stays below ``max_fragments`` so memory is bounded
even for big triangles or big images.

Limitations (fine for heads seen by rig cameras): triangles with a vertex at or behind the near plane
(z <= ``near``) are skipped rather than clipped; no anti-aliasing (a pixel is covered when its centre is inside
the triangle, edges included, so neighbouring triangles leave no cracks).
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera

ArrayLike = Union[np.ndarray, Tensor]

# Default budget of candidate fragments per chunk (each costs ~100 bytes of temporaries in float64).
DEFAULT_MAX_FRAGMENTS = 4_000_000


def _to_tensor(x: ArrayLike, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _fragments(
    verts: ArrayLike,
    faces: ArrayLike,
    camera: Camera,
    near: float = 1e-6,
    max_fragments: int = DEFAULT_MAX_FRAGMENTS,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield covered fragments chunk by chunk.

    Args:
        verts: (V, 3) world-space vertices.
        faces: (F, 3) vertex ids.
        camera: the camera (OpenCV convention, image ``camera.width`` x ``camera.height``).
    Yields:
        pix (N,) int64 flat pixel index ``i * W + j``, depth (N,) float64 camera z, tri (N,) int64 face id.
    """
    dev = camera.device
    W, H = camera.width, camera.height
    v = _to_tensor(verts, torch.float64, dev)
    f = _to_tensor(faces, torch.int64, dev)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"verts must have shape (V, 3), got {tuple(v.shape)}")
    if f.numel() == 0:
        return
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(f.shape)}")
    if int(f.min()) < 0 or int(f.max()) >= v.shape[0]:
        raise ValueError(f"faces index vertex {int(f.max())} but there are only {v.shape[0]} vertices")

    # project in float64: pixel coordinates of ~2000 px with sub-pixel edge tests need the precision
    R = camera.w2c[:3, :3].to(torch.float64)
    t = camera.w2c[:3, 3].to(torch.float64)
    K = camera.K.to(torch.float64)
    pc = v @ R.T + t
    z = pc[:, 2]
    zs = torch.where(z > near, z, torch.ones_like(z))  # avoid division by ~0; those faces are dropped below
    u = K[0, 0] * pc[:, 0] / zs + K[0, 1] * pc[:, 1] / zs + K[0, 2]
    w_ = K[1, 1] * pc[:, 1] / zs + K[1, 2]

    fu, fv, fz = u[f], w_[f], z[f]  # (F, 3) each
    # signed doubled area (edge function of vertex 2 w.r.t. edge 0->1)
    area = (fu[:, 1] - fu[:, 0]) * (fv[:, 2] - fv[:, 0]) - (fv[:, 1] - fv[:, 0]) * (fu[:, 2] - fu[:, 0])
    # pixel-centre bounding box: centres x + 0.5 within [umin, umax] -> x in [ceil(umin - .5), floor(umax - .5)]
    x0 = torch.ceil(fu.min(1).values - 0.5).clamp(min=0)
    x1 = torch.floor(fu.max(1).values - 0.5).clamp(max=W - 1)
    y0 = torch.ceil(fv.min(1).values - 0.5).clamp(min=0)
    y1 = torch.floor(fv.max(1).values - 0.5).clamp(max=H - 1)
    valid = (fz > near).all(1) & (area.abs() > 1e-12) & (x1 >= x0) & (y1 >= y0)
    ids = torch.nonzero(valid).squeeze(1)
    if ids.numel() == 0:
        return
    fu, fv, fz, area = fu[ids], fv[ids], fz[ids], area[ids]
    x0, y0 = x0[ids].long(), y0[ids].long()
    # Per-triangle affine functions of the pixel centre (x, y), evaluated relative to the bbox corner
    # (x0 + .5, y0 + .5) so that float32 keeps sub-pixel precision even in 4k images:
    #   barycentric l_k = a_k * dx + b_k * dy + c_k;  1/z = p * dx + q * dy + r.
    ox, oy = x0.to(torch.float64) + 0.5, y0.to(torch.float64) + 0.5
    coef = []
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3  # edge i -> j opposite vertex k
        a = -(fv[:, j] - fv[:, i]) / area
        b = (fu[:, j] - fu[:, i]) / area
        c = ((fu[:, j] - fu[:, i]) * (oy - fv[:, i]) - (fv[:, j] - fv[:, i]) * (ox - fu[:, i])) / area
        coef += [a, b, c]
    inv = 1.0 / fz
    p = coef[0] * inv[:, 0] + coef[3] * inv[:, 1] + coef[6] * inv[:, 2]
    q = coef[1] * inv[:, 0] + coef[4] * inv[:, 1] + coef[7] * inv[:, 2]
    r = coef[2] * inv[:, 0] + coef[5] * inv[:, 1] + coef[8] * inv[:, 2]
    coef = torch.stack(coef + [p, q, r], dim=1).to(torch.float32)  # (F', 12)

    bw = x1[ids].long() - x0 + 1
    bh = y1[ids].long() - y0 + 1
    counts = bw * bh
    # chunk boundaries: consecutive runs of triangles whose summed bbox area fits the budget
    csum_cpu = torch.cumsum(counts, 0).cpu().numpy()
    starts = [0]
    budget = max(int(max_fragments), 1)
    while starts[-1] < len(csum_cpu):
        s = starts[-1]
        base = csum_cpu[s - 1] if s > 0 else 0
        e = int(np.searchsorted(csum_cpu, base + budget, side="right"))
        starts.append(max(e, s + 1))  # a single triangle larger than the budget still goes alone
    eps = -1e-6  # inclusive edges (with float32 slack): shared edges leave no cracks
    for s, e in zip(starts[:-1], starts[1:]):
        cnt = counts[s:e]
        loc_tri = torch.repeat_interleave(torch.arange(s, e, device=dev), cnt)
        local = torch.arange(int(cnt.sum()), device=dev) - torch.repeat_interleave(torch.cumsum(cnt, 0) - cnt, cnt)
        bwr = bw[loc_tri]
        dx = local % bwr
        dy = torch.div(local, bwr, rounding_mode="floor")
        cf = coef[loc_tri]  # (N, 12)
        dxf, dyf = dx.to(torch.float32), dy.to(torch.float32)
        l0 = cf[:, 0] * dxf + cf[:, 1] * dyf + cf[:, 2]
        l1 = cf[:, 3] * dxf + cf[:, 4] * dyf + cf[:, 5]
        l2 = cf[:, 6] * dxf + cf[:, 7] * dyf + cf[:, 8]
        inside = torch.nonzero((l0 >= eps) & (l1 >= eps) & (l2 >= eps)).squeeze(1)
        if inside.numel() == 0:
            continue
        t_in = loc_tri[inside]
        cfi = cf[inside]
        inv_z = cfi[:, 9] * dxf[inside] + cfi[:, 10] * dyf[inside] + cfi[:, 11]
        px = x0[t_in] + dx[inside]
        py = y0[t_in] + dy[inside]
        yield py * W + px, 1.0 / inv_z.to(torch.float64), ids[t_in]


def rasterize(
    verts: ArrayLike,
    faces: ArrayLike,
    camera: Camera,
    near: float = 1e-6,
    max_fragments: int = DEFAULT_MAX_FRAGMENTS,
) -> tuple[Tensor, Tensor]:
    """Z-buffer rasterization.

    Args:
        verts: (V, 3) world-space vertices (numpy or torch).
        faces: (F, 3) vertex ids.
        camera: OpenCV camera; its device is where the work happens.
        near: triangles with a vertex at camera z <= near are skipped.
        max_fragments: candidate fragments per chunk (memory bound).
    Returns:
        tri_id: (H, W) int64 id of the nearest face per pixel, -1 where empty.
        depth: (H, W) float32 camera-space z of that face, +inf where empty.
    """
    H, W = camera.height, camera.width
    dev = camera.device
    zbuf = torch.full((H * W,), float("inf"), dtype=torch.float64, device=dev)
    ibuf = torch.full((H * W,), -1, dtype=torch.int64, device=dev)
    for pix, depth, tri in _fragments(verts, faces, camera, near, max_fragments):
        cand = torch.full((H * W,), float("inf"), dtype=torch.float64, device=dev)
        cand.scatter_reduce_(0, pix, depth, reduce="amin")
        # the winning fragment of each pixel in this chunk (ties: the highest face id, deterministic)
        win = depth <= cand[pix]
        cid = torch.full((H * W,), -1, dtype=torch.int64, device=dev)
        cid.scatter_reduce_(0, pix[win], tri[win], reduce="amax")
        better = (cand < zbuf) | ((cand == zbuf) & (cid > ibuf))  # same tie rule across chunks
        zbuf = torch.where(better, cand, zbuf)
        ibuf = torch.where(better, cid, ibuf)
    return ibuf.view(H, W), zbuf.view(H, W).to(torch.float32)


def _paint_mask(paint_faces: Optional[ArrayLike], num_faces: int, device: torch.device) -> Optional[Tensor]:
    if paint_faces is None:
        return None
    p = _to_tensor(paint_faces, torch.int64 if not _is_bool(paint_faces) else torch.bool, device)
    if p.dtype == torch.bool:
        if p.shape != (num_faces,):
            raise ValueError(f"boolean paint_faces must have shape ({num_faces},), got {tuple(p.shape)}")
        return p
    m = torch.zeros(num_faces, dtype=torch.bool, device=device)
    if p.numel():
        if int(p.min()) < 0 or int(p.max()) >= num_faces:
            raise ValueError(f"paint_faces holds face ids outside [0, {num_faces})")
        m[p.reshape(-1)] = True
    return m


def _is_bool(x: ArrayLike) -> bool:
    return (x.dtype == torch.bool) if isinstance(x, Tensor) else (np.asarray(x).dtype == np.bool_)


def render_mask(
    verts: ArrayLike,
    faces: ArrayLike,
    camera: Camera,
    paint_faces: Optional[ArrayLike] = None,
    depth_tolerance: float = 1e-4,
    near: float = 1e-6,
    max_fragments: int = DEFAULT_MAX_FRAGMENTS,
) -> Tensor:
    """Pixels where a "paint" face is the visible (nearest) surface.

    Faces not in ``paint_faces`` only occlude.  A paint face wins ties with occluders within a relative depth
    ``depth_tolerance`` (so a face-mask triangle drawn on top of the identical head triangle, or of a coplanar
    subdivided copy of it, paints rather than z-fights).

    Args:
        verts: (V, 3) world-space vertices.
        faces: (F, 3) vertex ids.
        camera: OpenCV camera.
        paint_faces: (F,) bool or (P,) face ids; None = every face paints (plain silhouette).
    Returns:
        (H, W) bool mask on the camera's device.
    """
    H, W = camera.height, camera.width
    dev = camera.device
    nf = len(faces)
    paint = _paint_mask(paint_faces, nf, dev)
    z_all = torch.full((H * W,), float("inf"), dtype=torch.float64, device=dev)
    z_paint = torch.full((H * W,), float("inf"), dtype=torch.float64, device=dev)
    for pix, depth, tri in _fragments(verts, faces, camera, near, max_fragments):
        z_all.scatter_reduce_(0, pix, depth, reduce="amin")
        if paint is None:
            continue
        sel = paint[tri]
        if bool(sel.any()):
            z_paint.scatter_reduce_(0, pix[sel], depth[sel], reduce="amin")
    if paint is None:
        return torch.isfinite(z_all).view(H, W)
    visible = torch.isfinite(z_paint) & (z_paint <= z_all * (1.0 + depth_tolerance))
    return visible.view(H, W)
