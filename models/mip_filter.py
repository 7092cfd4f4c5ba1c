"""Mip-Splatting's filters (Yu et al., CVPR 2024) for the identity field: heads that hold up at any size.

Two filters, both set once per model:

* **3D smoothing filter.**  Every Gaussian gets a minimum world-space size from the highest sampling rate at which
  the training cameras saw it: ``Sigma' = Sigma + (k / nu^2) I`` with ``nu = focal / depth`` (pixels per metre) the
  largest over the training views that see its vertex.  Opacity is scaled by ``sqrt(det Sigma / det Sigma')`` so
  that the Gaussian's integral (its "mass") is unchanged.  ``k`` is a variance in *training pixels squared*
  (Mip-Splatting: 0.2).  The filter is a per-Gaussian constant: the identity field applies it in its output path
  (:meth:`models.identity_field.IdentityField.attach`), so every backend, every tool and every PLY export sees the
  filtered Gaussians, and a Gaussian can no longer shrink below what the training cameras could resolve (the cause
  of the stripes and holes of a head rendered larger than it was trained).
* **2D mip filter.**  In place of 3DGS's fixed 0.3 px^2 screen-space dilation, a box-filter-like dilation of
  ``eps`` px^2 whose opacity is compensated by ``sqrt(det S / det (S + eps I))`` (gsplat's
  ``rasterize_mode="antialiased"``; Mip-Splatting: 0.1).  It lives in the renderer (``models/renderer/``,
  ``filter_2d``); see :func:`set_render_filter`.

Because the Gaussians of vertex v of every identity are the "same" Gaussian of one network, the sampling rate is
per vertex: the maximum over the training identities and their training cameras.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor

from models import renderer
from models.camera import Camera

FILTER_3D = 0.2  # Mip-Splatting's 3D filter variance, in training pixels^2 (its code: sqrt(0.2) * depth / focal)
FILTER_2D = 0.1  # Mip-Splatting's 2D mip filter variance in pixels^2 (3DGS's dilation is 0.3)
# A view "sees" a vertex when it projects inside the image grown by this fraction on each side (Mip-Splatting uses
# the same guard band: a vertex just outside a crop is still sampled at that rate by the neighbouring pixels).
GUARD = 0.15


@torch.no_grad()
def sampling_rate(vertices: Tensor, cameras: Sequence[Sequence[Camera]], near: float = 0.01,
                  unseen_smallest: bool = True) -> Tensor:
    """Per-vertex maximal sampling rate nu (pixels per world unit) of the training views.

    Args:
        vertices: (I, V, 3) world-space vertices of I identities (the subdivided face mask the Gaussians sit on).
        cameras: I lists of that identity's training cameras.
        near: vertices closer than this to a camera (camera-space z) do not count.
        unseen_smallest: vertices that no view sees get the smallest rate of the seen ones (the largest filter), as
            Mip-Splatting does; False: 0 (no rate of their own, e.g. to keep another set of views' rate there).
    Returns:
        (V,) float32 on the vertices' device: max over identities and cameras that see the vertex of
        ``max(fx, fy) / z``, unseen vertices as above; ValueError when no vertex is seen at all.
    """
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"sampling_rate: vertices must be (I, V, 3), got {tuple(vertices.shape)}")
    if len(cameras) != vertices.shape[0]:
        raise ValueError(f"sampling_rate: {vertices.shape[0]} identities but {len(cameras)} camera lists")
    v = vertices.double()
    nu = torch.zeros(v.shape[1], dtype=torch.float64, device=v.device)
    for i, cams in enumerate(cameras):
        for cam in cams:
            w2c = cam.w2c.to(v.device, torch.float64)
            pc = v[i] @ w2c[:3, :3].T + w2c[:3, 3]
            z = pc[:, 2]
            zs = z.clamp_min(near)
            u = cam.fx * pc[:, 0] / zs + cam.cx
            y = cam.fy * pc[:, 1] / zs + cam.cy
            seen = (z > near) & (u >= -GUARD * cam.width) & (u <= (1 + GUARD) * cam.width) \
                & (y >= -GUARD * cam.height) & (y <= (1 + GUARD) * cam.height)
            rate = torch.where(seen, max(float(cam.fx), float(cam.fy)) / zs, torch.zeros_like(zs))
            nu = torch.maximum(nu, rate)
    seen = nu > 0
    if not bool(seen.any()):
        raise ValueError("sampling_rate: no training camera sees any vertex (check the cameras and the vertices)")
    if unseen_smallest:
        nu = torch.where(seen, nu, nu[seen].min())
    return nu.float()


def filter_variance(rate: Tensor, filter_3d: float = FILTER_3D) -> Tensor:
    """(...,) sampling rates nu (px per world unit) -> (...,) world-space variance ``filter_3d / nu^2`` of the 3D
    filter (0 where the rate is 0: no filter)."""
    r = rate.clamp_min(1e-12)
    return torch.where(rate > 0, filter_3d / (r * r), torch.zeros_like(r))


def apply_3d_filter(scales: Tensor, opacities: Tensor, variance: Tensor, surface: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """Convolve Gaussians with an isotropic 3D Gaussian of ``variance``: ``Sigma + variance I``.

    Sigma = R diag(s^2) R^T, so the sum keeps R and adds the variance to every squared scale.  Opacity is scaled by
    ``sqrt(det Sigma / det Sigma')`` = prod_i s_i / sqrt(s_i^2 + variance) (the filtered Gaussian has the same
    3D integral; Mip-Splatting).

    ``surface=True``: the product runs over the two largest axes only.  A rasterised Gaussian's alpha is its
    *projected* 2D footprint, and for a flat, surface-attached Gaussian seen face-on that footprint is spanned by
    its two large (tangent) axes: thickening the flat normal axis by the filter does not spread its 2D mass, yet
    the full 3D ratio divides its opacity by ``sqrt(1 + variance / s_normal^2)`` (-> 0 for a flat disc), which
    leaves see-through surfaces and holes when the head is magnified.  Compensating over the tangent axes keeps
    the face-on 2D integral exactly (per-Gaussian constant, so it still bakes into a PLY).

    Args:
        scales: (..., N, 3) standard deviations; opacities: (..., N); variance: (..., N) or broadcastable, >= 0.
    Returns:
        (scales (..., N, 3), opacities (..., N)), differentiable.
    """
    var = variance.to(scales.dtype).unsqueeze(-1)
    s2 = scales * scales
    filtered = s2 + var
    per_axis = s2 / filtered  # increasing in s: the smallest axis has the smallest ratio
    # det Sigma / det Sigma' (per axis, no catastrophic product of tiny numbers).  Written out rather than
    # ``prod(-1)``: prod's backward counts zeros with a host sync (``.item()``), which stalls every training step
    # and makes CUDA-graph capture of the backward fail (cudaErrorStreamCaptureUnsupported).
    ratio = per_axis[..., 0] * per_axis[..., 1] * per_axis[..., 2]
    if surface:
        ratio = ratio / per_axis.min(-1).values.clamp_min(1e-30)  # leave the flat (normal) axis out
    return filtered.sqrt(), opacities * ratio.sqrt()


def display_filter(model_cfg) -> tuple[float | None, str]:
    """(2D filter px^2 or None, compensation) a trained model is rendered with by the tools (``ModelConfig``:
    its render_filter_2d, else the filter_2d it was trained with; None for a model trained with the classic
    dilation).  benchmarks/results/multiscale_cpu_render_eps.md: a model trained with 0.1 px^2 and rendered with 0.3
    px^2 scored higher at every scale."""
    filter_2d = (model_cfg.render_filter_2d or model_cfg.filter_2d) if model_cfg.filter_2d > 0 else None
    return filter_2d, model_cfg.render_compensation


@contextlib.contextmanager
def render_filter(filter_2d: float | None, compensation: str | None = None) -> Iterator[None]:
    """:func:`set_render_filter` inside, the caller's FILTER_2D and FILTER_2D_COMPENSATION again after (for code
    that renders a model as the tools do without changing the process's setting for whatever runs next)."""
    saved = (renderer.FILTER_2D, renderer.FILTER_2D_COMPENSATION)
    set_render_filter(filter_2d, compensation)
    try:
        yield
    finally:
        renderer.FILTER_2D, renderer.FILTER_2D_COMPENSATION = saved


def set_render_filter(filter_2d: float | None, compensation: str | None = None) -> None:
    """Make ``filter_2d`` (px^2; None or 0: 3DGS's classic 0.3 px^2 dilation without compensation) the renderer's
    process-wide default 2D filter, as the tools do when they load a model (models.renderer.FILTER_2D), and, when
    given, its opacity ``compensation`` ("opacity" or "optical_depth": models.renderer.FILTER_2D_COMPENSATION)."""
    if compensation is not None and compensation not in renderer.settings.COMPENSATIONS:
        raise ValueError(f"2D filter compensation must be one of {renderer.settings.COMPENSATIONS}, got "
                         f"{compensation!r}")
    renderer.FILTER_2D = float(filter_2d) if filter_2d else None
    if compensation is not None:
        renderer.FILTER_2D_COMPENSATION = compensation
