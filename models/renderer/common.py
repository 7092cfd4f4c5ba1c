"""What the renderer's entry points and backends share: SH colour, input checks, backend choice, 2D-filter choice."""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor

from models.camera import Camera
from models.gaussians import GaussianCloud
from models.renderer import settings

BACKENDS = ("auto", "torch", "gsplat", "inria")
_DEFAULT = object()  # "use settings.FILTER_2D" (the default of every ``filter_2d`` argument)

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
    return torch.clamp_min(eval_sh_unclamped(sh, dirs), 0.0)


def eval_sh_unclamped(sh: Tensor, dirs: Tensor) -> Tensor:
    """:func:`eval_sh` before its clamp at 0: (..., 3) SH colour + 0.5 (sh (..., K, 3), dirs (..., 3)).  A colour
    offset added to the SH DC term adds exactly offset to this value, so a fixed-geometry render
    (``models.renderer.fixed_colour``) adds offsets here and clamps afterwards, as the renderer would."""
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
    return out + 0.5


# ---------------------------------------------------------------------------------------------------- checks
def _validate(cloud: GaussianCloud, cameras: Sequence[Camera], background: Tensor | None) -> None:
    """Raise a clear error for anything render_batch cannot render: an unbatched, non-empty cloud of SH degree
    <= 3 with finite values (checked on a CPU, on a GPU only with ``settings.CHECK_FINITE_ON_GPU``), a (3,)
    background or None, Camera objects."""
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
    if cloud.device.type == "cpu" or settings.CHECK_FINITE_ON_GPU:
        cloud.check_finite("render: GaussianCloud")
    if background is not None and tuple(background.shape) != (3,):
        raise ValueError(f"background must be a (3,) RGB tensor, got shape {tuple(background.shape)}")
    for cam in cameras:
        if not isinstance(cam, Camera):
            raise TypeError(f"render expects Camera objects, got {type(cam).__name__}")


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    """``warnings.warn(msg)`` the first time this process sees ``msg`` (one per render call would flood a log)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg)


def available_backends() -> list[str]:
    """Backends usable on this machine right now (gsplat/inria need CUDA)."""
    out = ["torch"]
    if torch.cuda.is_available():
        for name, mod in (("gsplat", "gsplat"), ("inria", "diff_gaussian_rasterization")):
            try:  # optional CUDA packages: importable or not
                __import__(mod)
                out.append(name)
            except Exception:
                pass
    return out


def _pick_backend(backend: str, device: torch.device) -> str:
    """The backend that renders a cloud on ``device``: "auto" resolved, unknown names and CUDA-only backends on a CPU
    refused."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown render backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            try:
                import gsplat  # noqa: F401  (optional CUDA dependency: only whether it imports matters)

                return "gsplat"
            except Exception:
                return "torch"
        return "torch"
    if backend in ("gsplat", "inria") and device.type != "cuda":
        raise RuntimeError(
            f"the {backend} backend runs on CUDA only, but the cloud is on {device}; use backend='torch' on a CPU"
        )
    return backend


# ---------------------------------------------------------------------------------------------------- filter
def _resolve_filter(filter_2d) -> float | None:
    """The 2D filter of one call: ``settings.FILTER_2D`` for ``_DEFAULT``; None or 0 = classic dilation."""
    f = settings.FILTER_2D if filter_2d is _DEFAULT else filter_2d
    if f is None or f == 0:
        return None
    f = float(f)
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"filter_2d must be a positive variance in px^2 (or None for the classic 0.3 px^2 "
                         f"dilation), got {f}")
    return f


def compensate_opacity(opac: Tensor, ratio: Tensor, mode: str | None = None) -> Tensor:
    """The 2D mip filter's opacity compensation (see ``settings.FILTER_2D_COMPENSATION``, the default of ``mode``).

    Args:
        opac: (..., N) opacities in (0, 1); ratio: broadcastable, sqrt(det S / det(S + eps I)) in [0, 1].
    Returns:
        (..., N) compensated opacities, differentiable in both.
    """
    mode = settings.FILTER_2D_COMPENSATION if mode is None else mode
    if mode == "opacity":
        return opac * ratio
    if mode == "optical_depth":
        # 1 - (1 - o)^r with o capped at the rasterizer's largest alpha (finite optical depth and gradient)
        return -torch.expm1(ratio * torch.log1p(-opac.clamp_max(settings.MAX_ALPHA)))
    raise ValueError(f"models.renderer.FILTER_2D_COMPENSATION must be one of {settings.COMPENSATIONS}, got {mode!r}")
