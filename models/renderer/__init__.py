"""Render 3D Gaussian clouds through pinhole cameras with one of three interchangeable backends.

Public functions:
    render(cloud, camera, background=None, backend="auto") -> {"image", "alpha", "depth"}
    render_batch(cloud, cameras, background=None, backend="auto") -> the same with a leading camera dimension
    render_identities(clouds, cameras, ...) -> the same with leading identity and camera dimensions
    available_backends() -> the backends usable on this machine
    FixedGeometryRender(cloud, camera, ...)(offsets) -> {"image", "alpha"}: one cloud through one camera with the
        geometry prepared once, rendered with new per-Gaussian RGB offsets per call (``fixed_colour``; colour fits)

Backends (one module each):
    "torch"  ``torch_backend``: pure PyTorch EWA splatting (CPU and GPU; what CI runs).  Same math as gsplat's
             classic mode (0.3 px dilation) or, with ``filter_2d``, its antialiased mode, opacity-aware boxes,
             alpha = min(MAX_ALPHA, o exp(-sigma)) skipped when sigma < 0 or alpha < 1/255, a pixel stops before the
             Gaussian that would take its transmittance to <= 1e-4.
             Work is laid out as Gaussian-tile pairs x TILE*TILE pixels, all cameras at once, with transmittance
             from a float64 segment-wise cumsum of log(1 - alpha) and a hand-written backward pass
             (``_TileRaster``) that keeps two floats per pixel-Gaussian candidate.
    "gsplat" ``gsplat_backend``: the gsplat CUDA rasterizer (PyPI ``gsplat``; default on CUDA)
    "inria"  ``inria_backend``: the original 3DGS rasterizer ``diff_gaussian_rasterization`` (not on PyPI; see
             ``_inria_inputs``)
    "auto"   gsplat when the cloud is on CUDA and gsplat imports, else torch
Also here: ``common`` (SH colour, input checks, backend choice), ``mesh_raster`` (the z-buffered triangle-mesh
rasterizer used for face masks; it renders meshes, not Gaussians).

Settings: ``models.renderer.MAX_ALPHA``, ``FILTER_2D``, ``TILE``, ``STORE_LIMIT_BYTES``, ``CHECK_FINITE_ON_GPU``,
``GSPLAT_TILE_SIZE``, ``GSPLAT_PACKED``, ``GSPLAT_DIRECT`` and the constants ``NEAR_PLANE``, ``ALPHA_THRESHOLD``,
``TRANSMITTANCE_STOP``, ``BLUR_EPS`` live in ``models.renderer.settings``.  Reading or assigning them on this package
(``models.renderer.FILTER_2D = 0.1``, pytest's ``monkeypatch.setattr``) reads or assigns that module, which the
backends read on every call, so a change takes effect in whichever backend uses it.
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from models.camera import Camera, stack_cameras
from models.gaussians import GaussianCloud
from models.renderer import settings
from models.renderer.common import (
    _DEFAULT,
    BACKENDS,
    _pick_backend,
    _resolve_filter,
    _validate,
    available_backends,
    eval_sh,
)
from models.renderer.fixed_colour import FixedGeometryRender

# _gsplat_colors and _project_cameras are backend internals that tests and benchmarks reach through the package.
from models.renderer.gsplat_backend import _gsplat_colors, _render_gsplat  # noqa: F401
from models.renderer.inria_backend import _render_inria
from models.renderer.torch_backend import _project_cameras, _rasterize_torch  # noqa: F401

__all__ = ["BACKENDS", "FixedGeometryRender", "available_backends", "eval_sh", "render", "render_batch",
           "render_identities", "settings_override"]


def render(
    cloud: GaussianCloud, camera: Camera, background: Tensor | None = None, backend: str = "auto",
    filter_2d=_DEFAULT, depth: bool = True,
) -> dict[str, Tensor]:
    """Render one Gaussian cloud through one camera.

    Args:
        cloud: unbatched GaussianCloud of N Gaussians (shapes in :func:`render_batch`).
        camera: the Camera: K (3, 3) intrinsics, w2c (4, 4) world-to-camera; image size W x H =
            camera.width x camera.height.
        background: (3,) RGB behind the Gaussians, or None for black.
        backend: "auto", "torch", "gsplat" or "inria".
        filter_2d, depth: as in :func:`render_batch`.
    Returns:
        {"image": (H, W, 3), "alpha": (H, W, 1), "depth": (H, W, 1) or None}: colour, accumulated opacity and
        alpha-normalised camera-space depth as in :func:`render_batch`, differentiable w.r.t. the cloud.
    """
    out = render_batch(cloud, [camera], background, backend, filter_2d=filter_2d, depth=depth)
    return {k: None if v is None else v[0] for k, v in out.items()}


def render_batch(
    cloud: GaussianCloud,
    cameras: Sequence[Camera],
    background: Tensor | None = None,
    backend: str = "auto",
    chunk_elements: int = 1 << 22,
    filter_2d=_DEFAULT,
    depth: bool = True,
) -> dict[str, Tensor]:
    """Render one Gaussian cloud through several cameras of one image size.

    Args:
        cloud: unbatched GaussianCloud of N Gaussians (conventions in models/gaussians.py):
            means (N, 3) world-space centres; quats (N, 4) rotations as unit quaternions (w, x, y, z);
            scales (N, 3) standard deviations along the local axes (linear); opacities (N,) in (0, 1);
            sh (N, K, 3) real SH colour coefficients, K = (d+1)^2 with degree d <= 3.
        cameras: C cameras sharing width W and height H; each has K (3, 3) pinhole intrinsics in pixels and
            w2c (4, 4) world-to-camera transform (OpenCV axes: x right, y down, z forward).
        background: (3,) RGB composited behind the Gaussians, or None for black.
        backend: "auto", "torch", "gsplat" or "inria".
        chunk_elements: torch backend only: pixel-Gaussian candidates evaluated at once (bounds the working
            memory: roughly 100 bytes per candidate; whole tiles per chunk).
        filter_2d: screen-space filter: None = 3DGS's classic 0.3 px^2 dilation; eps > 0 = Mip-Splatting's 2D mip
            filter of eps px^2 with opacity compensation (gsplat's antialiased mode); omitted =
            ``models.renderer.FILTER_2D``.
        depth: False when the caller needs no depth (viewer, animation): gsplat then blends no depth channel and
            "depth" may be None (the torch and inria backends compute it anyway).
    Returns:
        dict with
            image: (C, H, W, 3) colour, composited over ``background``,
            alpha: (C, H, W, 1) accumulated opacity (1 - the transmittance left behind the last Gaussian),
            depth: (C, H, W, 1) alpha-normalised expected camera-space depth (0 where alpha is 0), or None
                with ``depth=False`` on gsplat,
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
        return _render_gsplat(cloud, cameras, background, stacked, depth=depth, filter_2d=f2d)
    stack_cameras(cameras)  # raises on mixed image sizes
    if which == "inria":
        return _render_inria(cloud, cameras, background, f2d)
    return _rasterize_torch(cloud, cameras, background, chunk_elements, f2d)


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
        clouds: GaussianCloud with batch shape (B,), N Gaussians each: means (B, N, 3), quats (B, N, 4),
            scales (B, N, 3), opacities (B, N), sh (B, N, K, 3) (meanings as in :func:`render_batch`).
        cameras: B lists of C cameras, all of one image size W x H; list b views cloud b.
        background: (3,) RGB or None (black).
        backend: as in :func:`render_batch`; gsplat renders all B x C views in one call.
        depth: False when the caller needs no depth (training): gsplat then skips it and "depth" may be None.
        filter_2d: as in :func:`render_batch`.
    Returns:
        {"image": (B, C, H, W, 3), "alpha": (B, C, H, W, 1), "depth": (B, C, H, W, 1) or None}, entry [b, c] being
        cloud b seen by cameras[b][c] (meanings as in :func:`render_batch`).
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


# ---------------------------------------------------------------------------------------------------- settings
_SETTINGS = frozenset(name for name in vars(settings) if name.isupper())


@contextlib.contextmanager
def settings_override(**values: Any) -> Iterator[None]:
    """The renderer settings ``values`` (names of ``models.renderer.settings``, e.g. ``GSPLAT_TILE_SIZE=8``) inside
    the ``with`` block and the previous ones again after it, also when the block raises (benchmarks comparing
    settings within one process)."""
    unknown = sorted(set(values) - _SETTINGS)
    if unknown:
        raise ValueError(f"settings_override: unknown renderer settings {unknown}; known: {sorted(_SETTINGS)}")
    saved = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)


class _RendererPackage(types.ModuleType):
    """The type of this package's module object: its setting names read and write ``models.renderer.settings``.

    A module cannot intercept assignments to its own globals, so the package's class is swapped for this subclass
    (the mechanism of the Python data model, "Customizing module attribute access").  The names are deliberately not
    imported into the package namespace, so every read comes here and sees the current value.
    """

    def __getattr__(self, name: str) -> Any:
        if name in _SETTINGS:
            return getattr(settings, name)
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SETTINGS:
            setattr(settings, name, value)
        else:
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | _SETTINGS)


sys.modules[__name__].__class__ = _RendererPackage
