"""The renderer's process-wide settings and constants, in one place that every backend reads at call time.

Code sets them through the package, ``models.renderer.MAX_ALPHA = 0.999`` (or pytest's ``monkeypatch.setattr``): the
package forwards reads and writes of these names to this module (see ``models/renderer/__init__.py``), and the
backends read ``settings.<NAME>`` on every call, never a copy taken at import.
"""
from __future__ import annotations

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
# How the 2D mip filter compensates a footprint's opacity o by the determinant ratio r = sqrt(det S / det(S + eps I)):
# "opacity": o r (Mip-Splatting, gsplat's antialiased mode: keeps a single faint Gaussian's integral);
# "optical_depth": 1 - (1 - o)^r (scales the Gaussian's optical depth -log(1 - o) by r instead).  The two agree for
# faint Gaussians (o r for small o); for an opaque surface seen smaller than it was trained, many footprints overlap
# and "opacity" lets their composited alpha sink below 1 (1 - (1 - o r)^k < 1 - (1 - o)^(r k)), a see-through,
# darkened face on a few pixels; "optical_depth" keeps an opaque surface opaque.  torch and gsplat honour both (gsplat
# runs its pipeline's steps itself for "optical_depth"); inria applies its kernel's built-in "opacity" (a one-time
# notice).  The tools set it from the loaded model.
FILTER_2D_COMPENSATION: str = "opacity"
COMPENSATIONS = ("opacity", "optical_depth")
TILE = 4  # torch backend tile side; small tiles waste few pixel-Gaussian candidates on a CPU
# Per-candidate floats kept from forward for backward (2 per candidate); beyond this they are recomputed per chunk.
STORE_LIMIT_BYTES = 1 << 30
# The NaN/Inf check reads values back to the host: free on a CPU, a synchronisation per call on a GPU, so there it is
# off unless debugging (training still stops on a non-finite loss).
CHECK_FINITE_ON_GPU = False
# gsplat's tile size in pixels and its packed mode (measured on an H200 at 46,987 Gaussians and 16 training views of
# 896x752, benchmarks/train_speed.py: packed was slower, 753 vs 785 views/s); settings so benchmarks can try other
# values without a flag on every render call.
GSPLAT_TILE_SIZE = 16
GSPLAT_PACKED = False
# Renders that need no gradient (viewer, animation, evaluation) call gsplat 1.5.3's compiled kernels directly instead
# of its autograd wrappers and rasterization() (same kernels and arguments, fewer host operations per call; see
# gsplat_backend._direct_kernels).  False forces the public path (benchmarks compare the two).
GSPLAT_DIRECT = True
# FixedGeometryRender (the fit's colour stage) on gsplat: False renders the whole cloud per call (the path every other
# render takes); True prepares projection, SH colour and tile intersection once and runs only rasterize_to_pixels per
# call.  Off until the prepared path's GPU equality test (tests/test_renderer.py, CUDA) and its timing have run on a
# GPU: written 2026-12-07h without one (the torch backend's prepared path is on and tested on the CPU).
GSPLAT_PREPARED_COLOUR = False
