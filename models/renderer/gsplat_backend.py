"""The gsplat backend: the gsplat CUDA rasterizer (PyPI ``gsplat``; the default on CUDA).

gsplat is imported inside the functions: it is an optional dependency that needs CUDA, and the torch backend must
work without it.  Its tile size and packed mode are ``settings.GSPLAT_TILE_SIZE`` and ``settings.GSPLAT_PACKED``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from models.camera import Camera, stack_cameras
from models.gaussians import GaussianCloud
from models.renderer import settings
from models.renderer.common import _C0, _warn_once


def _gsplat_colors(cloud: GaussianCloud, w2c: Tensor) -> Tensor:
    """RGB per Gaussian for gsplat's ``sh_degree=None`` input: (..., N, 3) at SH degree 0, else (..., C, N, 3).

    Same values as gsplat's own SH path (``clamp_min(SH + 0.5, 0)``), but the camera centres come from the
    world-to-camera matrices in closed form (-R^T t): gsplat's path inverts the view matrices with torch.inverse,
    which synchronises the GPU with the host on every call, and at degree 0 the SH kernel is a scale and shift."""
    from gsplat import spherical_harmonics  # optional CUDA dependency, imported only when this backend runs

    if cloud.sh_degree == 0:
        return (cloud.sh[..., 0, :] * _C0 + 0.5).clamp_min(0.0)
    R, t = w2c[..., :3, :3], w2c[..., :3, 3:]
    centres = -(R.transpose(-1, -2) @ t).squeeze(-1)  # (..., C, 3)
    dirs = cloud.means.unsqueeze(-3) - centres.unsqueeze(-2)  # (..., C, N, 3)
    shs = cloud.sh.unsqueeze(-4).expand(*dirs.shape[:-1], *cloud.sh.shape[-2:])
    return (spherical_harmonics(cloud.sh_degree, dirs, shs) + 0.5).clamp_min(0.0)


def _render_gsplat(cloud: GaussianCloud, cameras: Sequence[Camera] | Sequence[Sequence[Camera]],
                   background: Tensor | None, stacked: tuple[Tensor, Tensor, int, int] | None = None,
                   depth: bool = True, filter_2d: float | None = None) -> dict[str, Tensor]:
    """One gsplat call; a batched cloud (B, N, ...) takes B lists of C cameras (outputs (B, C, H, W, ...)).
    ``stacked``: the cameras' ``stack_cameras`` result when the caller already has it (unbatched cloud only).
    ``depth=False``: no depth channel is blended (the output's "depth" is then None).
    ``filter_2d``: None = ``rasterize_mode="classic"`` (eps2d 0.3), else "antialiased" with ``eps2d=filter_2d``."""
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
    if filter_2d is not None and settings.FILTER_2D_COMPENSATION != "opacity":
        # gsplat 1.5.3 multiplies opacities by its compensation inside rasterization(); the optical-depth form
        # needs a per-camera opacity there (not yet done: the GPU renders zoomed-out heads with "opacity")
        _warn_once(f"gsplat backend: the 2D filter compensates opacity (o r), not by "
                   f"{settings.FILTER_2D_COMPENSATION!r} (use torch for that compensation)")
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
