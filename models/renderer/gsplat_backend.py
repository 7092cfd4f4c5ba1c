"""The gsplat backend: the gsplat CUDA rasterizer (PyPI ``gsplat``; the default on CUDA).

gsplat is imported inside the functions: it is an optional dependency that needs CUDA, and the torch backend must
work without it.  Its tile size and packed mode are ``settings.GSPLAT_TILE_SIZE`` and ``settings.GSPLAT_PACKED``.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

from models.camera import Camera, stack_cameras
from models.gaussians import GaussianCloud
from models.renderer import settings
from models.renderer.common import _C0, compensate_opacity


def _gsplat_colors(cloud: GaussianCloud, w2c: Tensor, clamp: bool = True) -> Tensor:
    """RGB per Gaussian for gsplat's ``sh_degree=None`` input: (..., N, 3) at SH degree 0, else (..., C, N, 3).

    Same values as gsplat's own SH path (``clamp_min(SH + 0.5, 0)``), but the camera centres come from the
    world-to-camera matrices in closed form (-R^T t): gsplat's path inverts the view matrices with torch.inverse,
    which synchronises the GPU with the host on every call, and at degree 0 the SH kernel is a scale and shift.
    ``clamp=False``: the value before the clamp at 0 (the fixed-geometry colour render adds its offsets to it)."""
    from gsplat import spherical_harmonics  # optional CUDA dependency, imported only when this backend runs

    if cloud.sh_degree == 0:
        out = cloud.sh[..., 0, :] * _C0 + 0.5
    else:
        R, t = w2c[..., :3, :3], w2c[..., :3, 3:]
        centres = -(R.transpose(-1, -2) @ t).squeeze(-1)  # (..., C, 3)
        dirs = cloud.means.unsqueeze(-3) - centres.unsqueeze(-2)  # (..., C, N, 3)
        shs = cloud.sh.unsqueeze(-4).expand(*dirs.shape[:-1], *cloud.sh.shape[-2:])
        out = spherical_harmonics(cloud.sh_degree, dirs, shs) + 0.5
    return out.clamp_min(0.0) if clamp else out


def _render_gsplat(cloud: GaussianCloud, cameras: Sequence[Camera] | Sequence[Sequence[Camera]],
                   background: Tensor | None, stacked: tuple[Tensor, Tensor, int, int] | None = None,
                   depth: bool = True, filter_2d: float | None = None) -> dict[str, Tensor]:
    """One gsplat call; a batched cloud (B, N, ...) takes B lists of C cameras (outputs (B, C, H, W, ...)).
    ``stacked``: the cameras' ``stack_cameras`` result when the caller already has it (unbatched cloud only).
    ``depth=False``: no depth channel is blended (the output's "depth" is then None).
    ``filter_2d``: None = ``rasterize_mode="classic"`` (eps2d 0.3), else "antialiased" with ``eps2d=filter_2d`` and
    the opacity compensation ``settings.FILTER_2D_COMPENSATION`` (see ``_rasterize_steps``)."""
    try:
        from gsplat import rasterization  # optional CUDA dependency, imported only when this backend runs
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
    colors = _gsplat_colors(cloud, w2c)
    # no gradient wanted (viewer, animation, evaluation): gsplat's kernels without its autograd wrappers
    kernels = None if _needs_grad(cloud) or settings.GSPLAT_PACKED or not settings.GSPLAT_DIRECT else _direct_kernels()
    if kernels is not None or (filter_2d is not None and settings.FILTER_2D_COMPENSATION != "opacity"):
        colors, alphas = _rasterize_steps(cloud, colors, w2c, K, W, H, bg, depth, filter_2d, kernels)
    else:
        colors, alphas, _ = rasterization(
            means=cloud.means,
            quats=cloud.quats,
            scales=cloud.scales,
            opacities=cloud.opacities,
            colors=colors,
            viewmats=w2c,
            Ks=K,
            width=W,
            height=H,
            sh_degree=None,
            near_plane=settings.NEAR_PLANE,
            render_mode="RGB+ED" if depth else "RGB",
            backgrounds=bg,
            # gsplat 1.5.3 asserts when backgrounds are combined with packed mode
            packed=settings.GSPLAT_PACKED and bg is None,
            tile_size=settings.GSPLAT_TILE_SIZE,
            rasterize_mode="classic" if filter_2d is None else "antialiased",
            eps2d=settings.BLUR_EPS if filter_2d is None else filter_2d,
        )
    return {"image": colors[..., :3], "alpha": alphas, "depth": colors[..., 3:4] if depth else None}


def _needs_grad(cloud: GaussianCloud) -> bool:
    """Whether autograd should record this render (grad mode on and some attribute requires a gradient)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in (cloud.means, cloud.quats, cloud.scales,
                                                                     cloud.opacities, cloud.sh))


@functools.lru_cache(maxsize=1)
def _direct_kernels():
    """gsplat 1.5.3's compiled extension, for renders that need no gradient; None for any other gsplat version.

    Its public functions wrap every kernel in an autograd Function with shape asserts, and ``rasterization()`` adds
    its own bookkeeping: tens of host operations per call that cost more than the GPU work of a cached head's frame
    at 512x512 (benchmarks/results/gpu_h100_2026-12-07e.md: ~0.7 ms host against 0.39 ms GPU at 46,987 Gaussians).
    The extension's signatures are private, so they are used only for the version they were read from (the pinned
    one); any other version takes the public path.
    """
    import gsplat

    if gsplat.__version__ != "1.5.3":
        return None
    from gsplat.cuda._backend import _C  # compiles gsplat's CUDA code on first use, like the public functions

    return _C


def _rasterize_steps(cloud: GaussianCloud, colors: Tensor, w2c: Tensor, K: Tensor, W: int, H: int,
                     bg: Tensor | None, depth: bool, filter_2d: float | None, kernels=None) -> tuple[Tensor, Tensor]:
    """gsplat's unpacked pipeline spelled out: projection, tile intersection, offsets, rasterization.

    Used (1) for the 2D mip filter with an opacity compensation other than gsplat's built-in ``o r`` (e.g.
    "optical_depth": ``1 - (1 - o)^r``): ``rasterization()`` multiplies the opacities by its compensation r
    internally, so the steps run here and the compensation goes in between, every step differentiable through gsplat's
    public wrappers; and (2) with ``kernels`` (``_direct_kernels()``) for renders without gradient, which call the
    compiled kernels directly (same kernels, same arguments as the wrappers pass).

    Args:
        colors: (..., N, 3) or (..., C, N, 3) RGB per Gaussian; w2c: (..., C, 4, 4); K: (..., C, 3, 3);
        bg: (..., C, 3) or None; filter_2d: the 2D filter's variance eps in px^2, None for the classic dilation.
    Returns:
        colors (..., C, H, W, 3 or 4: RGB and, with ``depth``, the expected depth), alphas (..., C, H, W, 1).
    """
    eps2d = settings.BLUR_EPS if filter_2d is None else filter_2d
    tile = settings.GSPLAT_TILE_SIZE
    tw, th = math.ceil(W / tile), math.ceil(H / tile)
    if kernels is None:
        from gsplat import fully_fused_projection, isect_offset_encode, isect_tiles, rasterize_to_pixels

        radii, means2d, depths, conics, ratio = fully_fused_projection(
            cloud.means, None, cloud.quats, cloud.scales, w2c, K, W, H, eps2d=eps2d, near_plane=settings.NEAR_PLANE,
            calc_compensations=filter_2d is not None,
            # radii from the raw opacity: 1 - (1 - o)^r <= o for r <= 1, so the bound stays conservative
            opacities=cloud.opacities)
    else:
        radii, means2d, depths, conics, ratio = kernels.projection_ewa_3dgs_fused_fwd(
            cloud.means.contiguous(), None, cloud.quats.contiguous(), cloud.scales.contiguous(),
            cloud.opacities.contiguous(), w2c.contiguous(), K.contiguous(), W, H, eps2d, settings.NEAR_PLANE,
            1e10, 0.0, filter_2d is not None, kernels.CameraModelType.PINHOLE)
    opac = cloud.opacities.unsqueeze(-2)  # (..., 1, N): one row serves every camera
    if filter_2d is not None:
        opac = compensate_opacity(opac, ratio)  # (..., C, N)
    image_dims = means2d.shape[:-2]  # (..., C)
    opac = opac.expand(*image_dims, opac.shape[-1])
    if colors.dim() == means2d.dim() - 1:  # per-Gaussian colour: one copy per camera
        colors = colors.unsqueeze(-3).expand(*means2d.shape[:-1], colors.shape[-1])
    if depth:
        colors = torch.cat([colors, depths.unsqueeze(-1)], -1)
        bg = None if bg is None else torch.cat([bg, torch.zeros_like(bg[..., :1])], -1)
    n_images = math.prod(image_dims)
    if kernels is None:
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile, tw, th)
        offsets = isect_offset_encode(isect_ids, n_images, tw, th).reshape(*image_dims, th, tw)
        out, alphas = rasterize_to_pixels(means2d, conics, colors, opac, W, H, tile, offsets, flatten_ids,
                                          backgrounds=bg)
    else:
        _, isect_ids, flatten_ids = kernels.intersect_tile(means2d, radii, depths, None, None, n_images, tile, tw,
                                                           th, True, False)
        offsets = kernels.intersect_offset(isect_ids, n_images, tw, th).reshape(*image_dims, th, tw)
        out, alphas, _ = kernels.rasterize_to_pixels_3dgs_fwd(
            means2d, conics, colors.contiguous(), opac.contiguous(), None if bg is None else bg.contiguous(), None,
            W, H, tile, offsets, flatten_ids)
        alphas = alphas.float()
    if depth:  # accumulated depth -> expected depth, as rasterization()'s "RGB+ED"
        if kernels is not None:  # no autograd: divide in place instead of a new concatenated tensor
            out[..., 3:].div_(alphas.clamp_min(1e-10))
        else:
            out = torch.cat([out[..., :3], out[..., 3:] / alphas.clamp_min(1e-10)], -1)
    return out, alphas


class _GsplatColourPlan:
    """One cloud through one camera with its geometry fixed (the gsplat half of ``FixedGeometryRender``): gsplat's
    projection, the view's SH colour (before the clamp), tile intersection and offsets once, as ``_rasterize_steps``
    runs them (same arguments, so the same Gaussians, footprints and compensated opacities as the normal render);
    a call runs only ``rasterize_to_pixels`` with colours base + offsets clamped at 0, as ``_gsplat_colors`` clamps.

    Attributes: base (1, N, 3); means2d (1, N, 2); conics (1, N, 3); opac (1, N); isect_offsets (1, th, tw);
    flatten_ids (I,); bg (1, 3) or None.
    """

    def __init__(self, cloud: GaussianCloud, camera: Camera, background: Tensor | None,
                 filter_2d: float | None) -> None:
        from gsplat import fully_fused_projection, isect_offset_encode, isect_tiles

        K, w2c, W, H = stack_cameras([camera.to(cloud.device)])  # (1, 3, 3), (1, 4, 4)
        self.W, self.H, self.tile = W, H, settings.GSPLAT_TILE_SIZE
        tw, th = math.ceil(W / self.tile), math.ceil(H / self.tile)
        eps2d = settings.BLUR_EPS if filter_2d is None else filter_2d
        with torch.no_grad():
            self.base = _gsplat_colors(cloud, w2c, clamp=False).reshape(1, len(cloud), 3)
            radii, self.means2d, depths, self.conics, ratio = fully_fused_projection(
                cloud.means, None, cloud.quats, cloud.scales, w2c, K, W, H, eps2d=eps2d,
                near_plane=settings.NEAR_PLANE, calc_compensations=filter_2d is not None, opacities=cloud.opacities)
            opac = cloud.opacities.unsqueeze(-2)  # (1, N)
            if filter_2d is not None:  # rasterization()'s o * r, or the optical-depth mode of _rasterize_steps
                opac = compensate_opacity(opac, ratio)
            self.opac = opac.contiguous()
            _, isect_ids, self.flatten_ids = isect_tiles(self.means2d, radii, depths, self.tile, tw, th)
            self.isect_offsets = isect_offset_encode(isect_ids, 1, tw, th).reshape(1, th, tw)
        self.bg = None if background is None else background.to(cloud.means).reshape(1, 3)

    def render(self, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """offsets (N, 3) -> image (H, W, 3) composited over the background, alpha (H, W, 1); differentiable
        w.r.t. offsets."""
        from gsplat import rasterize_to_pixels

        colors = (self.base + offsets.to(self.base.dtype)).clamp_min(0.0)  # (1, N, 3)
        img, alphas = rasterize_to_pixels(self.means2d, self.conics, colors, self.opac, self.W, self.H, self.tile,
                                          self.isect_offsets, self.flatten_ids, backgrounds=self.bg)
        return img[0], alphas[0]
