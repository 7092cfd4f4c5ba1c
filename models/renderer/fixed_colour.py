"""Renders of one Gaussian cloud through one camera whose geometry stays fixed while only the colours change.

A fit that adjusts colours alone (the single-image fit's colour stage, ``utils/apps/track/fit.py: fit_colour``) would
otherwise re-run the whole render every iteration: projection, SH evaluation, tile intersection and sorting (a host
synchronisation on gsplat), although none of it depends on the colours.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.camera import Camera
from models.gaussians import GaussianCloud
from models.renderer import settings
from models.renderer.common import _C0, _DEFAULT, _pick_backend, _resolve_filter, _validate


class FixedGeometryRender:
    """A render of ``cloud`` through ``camera`` prepared once; each call renders the cloud with per-Gaussian RGB
    offsets added to its colour, differentiably w.r.t. the offsets only.

    ``FixedGeometryRender(cloud, camera, background, backend, filter_2d)(offsets)["image"]`` equals
    ``render(with_colour(cloud, offsets), camera, background, backend, filter_2d)["image"]`` (``with_colour`` of
    utils/data/code_file.py: offsets / C0 added to the SH DC term) up to float rounding, with the same 2D filter,
    opacity compensation and background.  The offset adds to the view's SH colour + 0.5 evaluated once, and the
    sum is clamped at 0 as the renderer clamps SH colours.

    Backends: "gsplat" prepares gsplat's projection, tile intersection and offsets once and runs only
    ``rasterize_to_pixels`` per call; "torch" prepares its projection, tile plan and every pixel-Gaussian
    candidate's compositing weight once (colour enters the compositing linearly), so a call is a weighted sum;
    "inria" renders in full per call (its kernel projects, sorts and rasterises in one call with no entry point for a
    prepared geometry), and so does "gsplat" unless ``GSPLAT_PREPARED_COLOUR`` is set (models/renderer/settings.py:
    the prepared gsplat path is not yet verified on a GPU).  Renderer settings (FILTER_2D, TILE, MAX_ALPHA,
    GSPLAT_TILE_SIZE, ...) are read when the render is prepared.

    Args:
        cloud: unbatched GaussianCloud of N Gaussians (means (N, 3), quats (N, 4), scales (N, 3), opacities (N,),
            sh (N, K, 3)); used detached: no gradient reaches it.
        camera: one Camera; image size W x H = camera.width x camera.height.
        background: (3,) RGB behind the Gaussians, or None for black.
        backend, filter_2d: as in :func:`models.renderer.render_batch`.
        chunk_elements: torch backend only: pixel-Gaussian candidates per chunk (as in ``render_batch``).
    Call:
        offsets (N, 3) RGB offsets (any autograd graph) -> {"image": (H, W, 3) composited over the background,
        "alpha": (H, W, 1) accumulated opacity (fixed, no gradient)}.
    """

    def __init__(self, cloud: GaussianCloud, camera: Camera, background: Tensor | None = None,
                 backend: str = "auto", filter_2d=_DEFAULT, chunk_elements: int = 1 << 22) -> None:
        _validate(cloud, [camera], background)
        cloud = cloud.detach()
        self.n = len(cloud)
        self.backend = _pick_backend(backend, cloud.device)
        f2d = _resolve_filter(filter_2d)
        self.background = background
        if self.backend == "gsplat" and settings.GSPLAT_PREPARED_COLOUR:
            from models.renderer.gsplat_backend import _GsplatColourPlan

            self._plan = _GsplatColourPlan(cloud, camera, background, f2d)
        elif self.backend == "torch":
            from models.renderer.torch_backend import _TorchColourPlan

            self._plan = _TorchColourPlan(cloud, camera, chunk_elements, f2d)
        else:  # inria, and gsplat unless GSPLAT_PREPARED_COLOUR: the full render per call (the class docstring)
            self._plan = None
            self._cloud, self._camera, self._f2d = cloud, camera, f2d

    def __call__(self, offsets: Tensor) -> dict[str, Tensor]:
        if tuple(offsets.shape) != (self.n, 3):
            raise ValueError(f"FixedGeometryRender expects offsets of shape ({self.n}, 3), got {tuple(offsets.shape)}")
        if self.backend == "gsplat" and self._plan is not None:
            image, alpha = self._plan.render(offsets)
            return {"image": image, "alpha": alpha}
        if self.backend == "torch":
            plan = self._plan
            image = plan.render((plan.base + offsets.to(plan.base.dtype)).clamp_min(0.0))
            if self.background is not None:
                image = image + (1.0 - plan.alpha) * self.background.to(image)
            return {"image": image, "alpha": plan.alpha}
        c = self._cloud
        dc = c.sh[:, :1, :] + (offsets / _C0).unsqueeze(-2).to(c.sh.dtype)
        cloud = GaussianCloud(c.means, c.quats, c.scales, c.opacities, torch.cat([dc, c.sh[:, 1:, :]], dim=-2))
        if self.backend == "gsplat":  # the backends as render_batch calls them (the package imports this module)
            from models.renderer.gsplat_backend import _render_gsplat

            out = _render_gsplat(cloud, [self._camera], self.background, depth=False, filter_2d=self._f2d)
        else:
            from models.renderer.inria_backend import _render_inria

            out = _render_inria(cloud, [self._camera], self.background, self._f2d)
        return {"image": out["image"][0], "alpha": out["alpha"][0]}
