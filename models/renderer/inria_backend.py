"""The inria backend: the original 3DGS rasterizer ``diff_gaussian_rasterization`` (graphdeco-inria; not on PyPI).

The kernel is imported inside ``_render_inria``: an optional CUDA build that the other backends must work without
(how to install it: the ImportError there).  ``_inria_inputs`` says how its inputs are prepared, ``_render_inria`` how
alpha and depth are obtained from it.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from models.camera import Camera
from models.gaussians import GaussianCloud
from models.renderer import settings as render_settings
from models.renderer.common import _warn_once


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
        # optional CUDA dependency (not on PyPI), imported only when this backend runs
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
        raise RuntimeError("the installed diff_gaussian_rasterization has no 'antialiasing' setting, so it cannot "
                           "apply the model's 2D mip filter: install graphdeco-inria/diff-gaussian-rasterization from "
                           "2024 or later, or render with backend='gsplat' or 'torch'")
    if filter_2d is not None and abs(filter_2d - 0.3) > 1e-9:
        _warn_once(f"inria backend: its antialiasing kernel dilates by a fixed 0.3 px^2, not the model's "
                   f"{filter_2d} px^2 (use gsplat or torch for the exact filter)")
    if filter_2d is not None and render_settings.FILTER_2D_COMPENSATION != "opacity":
        _warn_once(f"inria backend: its antialiasing kernel compensates opacity (o r), not by "
                   f"{render_settings.FILTER_2D_COMPENSATION!r} (use torch for that compensation)")
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
