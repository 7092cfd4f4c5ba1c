"""Level-of-detail Gaussian clouds: a subdivided head merged back to a coarser level for display at small sizes.

A head at face-mask subdivision level L has one Gaussian per level-L vertex (K per vertex in general).  Midpoint
subdivision keeps level L-1's vertices as a prefix and appends one vertex per level-(L-1) edge at its midpoint
(models/flame/subdivision.py), so every fine vertex has an obvious coarse owner: a kept vertex belongs to itself,
an edge midpoint half to each end of its edge.  :func:`merge_to_coarser` merges the fine cloud along those shares
into one Gaussian per coarse vertex by moment matching; at display sizes where the fine Gaussians are about a
pixel apart, the coarse cloud looks nearly the same and costs the rasterizer far fewer Gaussian-tile pairs.

Merge of coarse vertex a from its children i (its own Gaussians and those of the midpoints of its edges), each with
share p_i (1 or 1/2), opacity o_i, scales s_i (two largest s_i1 >= s_i2), mean mu_i, covariance Sigma_i:

    weight       w_i  = p_i o_i s_i1 s_i2        (the child's opacity x footprint area on the surface: its share of
                                                  the splatted colour; the normal axis does not show on screen)
    mean         mu   = sum w_i mu_i / W,  W = sum w_i
    covariance   Sigma = sum w_i (Sigma_i + (mu_i - mu)(mu_i - mu)^T) / W
    colour (SH)  sh   = sum w_i sh_i / W
    opacity      o    : the merged splat's integrated optical depth equals its children's (see ``opacity``)
    coverage     the two surface axes widened, if needed, to keep the children's overlap (``coverage_floor``):
                 sqrt(s1 s2) >= min(2 x the children's weighted sqrt(s1 s2), OVERLAP x the coarse spacing); plain
                 moment matching leaves gaps between the merged splats (measured: -4.9 dB at 512x512)

Opacity: a splat of peak opacity o and screen standard deviations (a, b) removes, integrated over the screen,
``-integral log(1 - o g(x)) dx = 2 pi a b Li2(o)`` of optical depth (Li2 the dilogarithm: sum o^n / n^2), and optical
depths of overlapping splats add (log transmittance is a sum).  So ``Li2(o) s1 s2 = sum p_i Li2(o_i) s_i1 s_i2`` keeps
the light that the children let through, for faint children (Li2(o) ~ o: colour-opacity mass conserved) and for an
opaque, overlapping surface alike (the sum saturates: o is capped at ``max_opacity``, still opaque).  The
alternative ``opacity="mass"`` conserves o s1 s2 instead (first order only: an opaque surface gets o > 1, capped).
Both are measured in benchmarks/results/t-lod_cpu_2026-12-07.md.

Public: :func:`merge_to_coarser` (the merge; :func:`merge_shares` builds its per-topology sparse shares once for a
caller that merges repeatedly, no module-level cache), :func:`pick_level` (the coarsest level whose Gaussians stay
under a screen footprint for a camera) and :class:`LevelOfDetail` (an opt-in render path: the merged levels of one
posed head, built once, re-merged when the head is re-posed, rendered at the level the camera picks; it keeps its
shares).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.flame.subdivision import SubdivisionPlan
from models.gaussians import GaussianCloud, rotmat_to_quat
from models.identity_field import IdentityField

OPACITY_MODES = ("optical_depth", "mass")
# Largest merged opacity (the rasterizers cap one Gaussian's alpha at 0.99 / 0.999 anyway).
MAX_OPACITY = 0.99
# Largest relative width (footprint std / spacing of the Gaussians) the coverage floor keeps after a merge.
OVERLAP = 0.6
# Default screen footprint (px) of pick_level: the coarsest level whose median largest Gaussian standard deviation,
# seen by the camera, is at most this.  From benchmarks/results/t-lod_cpu_2026-12-07.md: one level down cost
# 41.6-50.3 dB face PSNR against full detail at every size measured, two levels 34.6-42.8 dB; 2 px lets the sharper
# stand-in's level-2 merge (1.75 px) serve the bench's 512x512 view and gives full detail back at 1024x1024 (3.5 px),
# where a merge would blur what the display can show.  LevelOfDetail merges one level down unless told otherwise.
FOOTPRINT_PX = 2.0


@lru_cache(maxsize=1)
def _li2_table(n: int = 4097) -> tuple[Tensor, Tensor]:
    """(n,) opacities o in [0, MAX_OPACITY] and (n,) Li2(o), float64, for the inverse by interpolation."""
    from scipy.special import spence  # Li2(z) = spence(1 - z)

    o = np.linspace(0.0, MAX_OPACITY, n)
    return torch.from_numpy(o), torch.from_numpy(spence(1.0 - o))


def _li2(o: Tensor) -> Tensor:
    """Dilogarithm Li2(o) of opacities in [0, MAX_OPACITY] (table lookup, linear interpolation)."""
    return _interp(o, *_li2_table())


def _li2_inverse(y: Tensor) -> Tensor:
    """The opacity o in [0, MAX_OPACITY] with Li2(o) = y (y beyond Li2(MAX_OPACITY) gives MAX_OPACITY)."""
    xs, ys = _li2_table()
    return _interp(y, ys, xs)


def _interp(x: Tensor, xs: Tensor, ys: Tensor) -> Tensor:
    """Piecewise-linear y(x) through increasing (xs, ys), clamped at both ends; x of any shape and dtype."""
    xs, ys = xs.to(x.device, torch.float64), ys.to(x.device, torch.float64)
    xd = x.double().clamp(float(xs[0]), float(xs[-1]))
    j = torch.searchsorted(xs, xd.reshape(-1)).clamp(1, len(xs) - 1).reshape(xd.shape)
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return (y0 + (y1 - y0) * (xd - x0) / (x1 - x0)).to(x.dtype)


@dataclass
class MergeShares:
    """Which fine Gaussians a coarse vertex merges, with what share (one level step; built once per topology by
    :func:`merge_shares`, kept by the caller: :class:`LevelOfDetail` holds its own).

    rows (P,) coarse vertex ids, cols (P,) fine Gaussian ids, share (P,) 1 for a kept vertex's own Gaussians, 1/2 for
    each Gaussian of a midpoint child; ``num_coarse`` coarse vertices M, ``num_fine`` fine Gaussians N.  ``matrix``
    (M, N) and ``mid_matrix`` (M, N, the midpoint children only, entries 1) are the same as float64 CSR matrices:
    the merge's sums are sparse products (one pass over the fine Gaussians, no per-child copies)."""

    rows: Tensor
    cols: Tensor
    share: Tensor
    num_coarse: int
    num_fine: int
    matrix: Tensor
    mid_matrix: Tensor


def merge_shares(plan: SubdivisionPlan, level: int, levels_down: int = 1, per_vertex: int = 1,
                 device: torch.device | str = "cpu") -> list[MergeShares]:
    """The shares of each step of :func:`merge_to_coarser` (level ``level`` -> ``level - levels_down``; the first
    step's fine side has K = ``per_vertex`` Gaussians per vertex, the later ones 1), on ``device``.

    Building them costs about a third of a merge (about 50 ms for the level-3 synthetic mask on one CPU thread), so a
    caller that merges the same topology repeatedly builds them once and passes them as ``shares=``."""
    if levels_down < 1 or level - levels_down < 0:
        raise ValueError(f"levels_down must be in 1..{level} for a level-{level} cloud, got {levels_down}")
    dev = torch.device(device)
    return [_build_shares(plan, level - step, per_vertex if step == 0 else 1, dev) for step in range(levels_down)]


def _build_shares(plan: SubdivisionPlan, level: int, per_vertex: int, device: torch.device) -> MergeShares:
    """Shares from level ``level`` (K = ``per_vertex`` Gaussians per vertex, vertex-major) to level ``level - 1``."""
    if not 1 <= level <= plan.levels:
        raise ValueError(f"level must be in 1..{plan.levels} to merge to a coarser level, got {level}")
    pairs = torch.as_tensor(plan.edges[level - 1], device=device).long()  # (E, 2) level-(level-1) vertex ids
    vc = plan.num_vertices(level - 1)
    mids = vc + torch.arange(len(pairs), device=device)
    rows_v = torch.cat([torch.arange(vc, device=device), pairs[:, 0], pairs[:, 1]])
    cols_v = torch.cat([torch.arange(vc, device=device), mids, mids])
    share_v = torch.cat([torch.ones(vc, device=device), torch.full((2 * len(pairs),), 0.5, device=device)])
    k = torch.arange(per_vertex, device=device)
    rows, cols = rows_v.repeat_interleave(per_vertex), (cols_v[:, None] * per_vertex + k).reshape(-1)
    share = share_v.repeat_interleave(per_vertex)
    n = plan.num_vertices(level) * per_vertex

    def csr(keep: Tensor, values: Tensor) -> Tensor:
        idx = torch.stack([rows[keep], cols[keep]])
        coo = torch.sparse_coo_tensor(idx, values[keep].double(), (vc, n), check_invariants=False).coalesce()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": CSR products are 2.4x COO's here
            warnings.simplefilter("ignore", UserWarning)
            return coo.to_sparse_csr()

    every = torch.ones_like(share, dtype=torch.bool)
    return MergeShares(rows, cols, share, vc, n, csr(every, share), csr(share < 1, torch.ones_like(share)))


def _footprint_area(scales: Tensor) -> Tensor:
    """(..., N, 3) standard deviations -> (..., N) product of the two largest: the surface footprint's area up to
    the constant 2 pi (only ratios matter: the merge compares it between children and their merged Gaussian)."""
    s = scales.sort(dim=-1, descending=True).values
    return s[..., 0] * s[..., 1]


def _sum_children(matrix: Tensor, x: Tensor, batch_dims: int) -> Tensor:
    """(M, N) sparse matrix times per-fine-Gaussian values x (B..., N, D...) -> (B..., M, D...) in float64."""
    lead, rest = tuple(x.shape[:batch_dims]), tuple(x.shape[batch_dims + 1:])
    n = x.shape[batch_dims]
    flat = x.double().movedim(batch_dims, 0).reshape(n, -1)  # (N, B... x D...)
    out = (matrix @ flat).reshape((matrix.shape[0],) + lead + rest)
    return out.movedim(0, batch_dims)


def _merge_moments(cloud: GaussianCloud, sh: MergeShares) -> dict[str, Tensor]:
    """Moment-matched merge of one level step, before the opacity (sums in float64, results in the cloud's dtype).

    Args:
        cloud: (..., N_fine) cloud (batch shape B...), N_fine = ``sh.num_fine``.
        sh: the level step's shares.
    Returns:
        dict of W (..., M) summed weights sum p_i o_i s_i1 s_i2, mean (..., M, 3), cov (..., M, 3, 3), sh
        (..., M, S, 3) weighted SH coefficients, optical (..., M) sum p_i Li2(o_i) s_i1 s_i2, floor (..., M) the
        coverage floor of the merged footprint sqrt(s1 s2): min(2 x the children's weighted mean footprint,
        2 x OVERLAP x the rms distance of the midpoint children to the merged mean); M = ``sh.num_coarse``.
    """
    if len(cloud) != sh.num_fine:
        raise ValueError(f"the cloud has {len(cloud)} Gaussians, the level step expects {sh.num_fine}")
    dt, d = cloud.means.dtype, len(cloud.batch_shape)
    o = cloud.opacities.double().clamp(0.0, MAX_OPACITY)
    area = _footprint_area(cloud.scales.double())
    w = o * area  # (..., N)
    # one pass: sum w (Sigma_i + mu_i mu_i^T) - W mu mu^T is the spread-included covariance; float64 keeps the
    # subtraction exact enough (head-sized positions, sub-millimetre spreads), positions taken about the cloud's centre
    mu = cloud.means.double()
    mu = mu - mu.mean(-2, keepdim=True).detach()
    second = cloud.covariances().double() + mu[..., :, None] * mu[..., None, :]
    W = _sum_children(sh.matrix, w, d)
    Ws = W.clamp_min(1e-300)
    mean = _sum_children(sh.matrix, w[..., None] * mu, d) / Ws[..., None]
    cov = _sum_children(sh.matrix, w[..., None, None] * second, d) / Ws[..., None, None]
    cov = cov - mean[..., :, None] * mean[..., None, :]
    shm = _sum_children(sh.matrix, w[..., None, None] * cloud.sh.double(), d) / Ws[..., None, None]
    optical = _sum_children(sh.matrix, _li2(o) * area, d)
    # Coverage floor.  Moment matching alone makes the merged Gaussian narrower, relative to the coarse spacing (twice
    # the fine one), than its children were to theirs: a flat patch of discs of width r x spacing merges to
    # sqrt(r^2 + 3/8) / 2 x the coarse spacing (0.43 for r = 0.6), and the gaps between the merged discs let the
    # background through.  So the merged footprint keeps the children's relative width (2 x theirs), at most
    # OVERLAP x the coarse spacing (wider fine Gaussians are already wide enough after the merge).
    fine_width = _sum_children(sh.matrix, w * area.sqrt(), d) / Ws
    count = _sum_children(sh.mid_matrix, torch.ones_like(w), d).clamp_min(1.0)
    m1 = _sum_children(sh.mid_matrix, mu, d) / count[..., None]
    m2 = _sum_children(sh.mid_matrix, (mu * mu).sum(-1), d) / count
    h = (m2 - 2 * (m1 * mean).sum(-1) + (mean * mean).sum(-1)).clamp_min(0.0).sqrt()
    floor = torch.minimum(2.0 * fine_width, 2.0 * OVERLAP * h)
    centre = cloud.means.mean(-2, keepdim=True).detach().double()
    return {"W": W.to(dt), "mean": (mean + centre).to(dt), "cov": cov.to(dt), "sh": shm.to(dt),
            "optical": optical.to(dt), "floor": floor.to(dt)}


def _cov_to_quat_scales(cov: Tensor, min_scale: float) -> tuple[Tensor, Tensor]:
    """(..., M, 3, 3) symmetric PSD covariances -> quats (..., M, 4) w, x, y, z and scales (..., M, 3), the scales
    ascending (the eigenvalues' order)."""
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    # eigh in the cloud's dtype: float32 left the merged scales of the level-3 stand-in within 4e-7 of float64's
    # (relative to each Gaussian's largest) at half the time
    evals, evecs = torch.linalg.eigh(cov)
    det = torch.linalg.det(evecs)
    evecs = torch.cat([evecs[..., :2], evecs[..., 2:] * det.sign()[..., None, None]], -1)  # a proper rotation
    scales = evals.clamp_min(min_scale ** 2).sqrt()
    return rotmat_to_quat(evecs).to(cov.dtype), scales.to(cov.dtype)


def merge_to_coarser(cloud: GaussianCloud, plan: SubdivisionPlan, level: int, levels_down: int = 1,
                     per_vertex: int = 1, opacity: str = "optical_depth", max_opacity: float = MAX_OPACITY,
                     coverage_floor: bool = True, shares: Sequence[MergeShares] | None = None) -> GaussianCloud:
    """Merge a level-``level`` cloud into one Gaussian per vertex of level ``level - levels_down``.

    Args:
        cloud: GaussianCloud of batch shape B... (any, e.g. () or (B,)) with N = V_level * per_vertex Gaussians,
            vertex-major (Gaussian n belongs to vertex n // per_vertex, as models/identity_field.py emits them):
            means (..., N, 3), quats (..., N, 4), scales (..., N, 3), opacities (..., N), sh (..., N, S, 3).
        plan: the face mask's SubdivisionPlan (at least ``level`` levels).
        level: the cloud's subdivision level L (V_L = ``plan.num_vertices(L)``).
        levels_down: how many levels to merge (>= 1; each step merges level l into level l - 1).
        per_vertex: Gaussians per vertex K of the input (the output has one per coarse vertex).
        opacity: "optical_depth" (default: Li2(o) s1 s2 summed over the children, see the module docstring) or
            "mass" (o s1 s2 summed).
        max_opacity: cap of the merged opacities.
        coverage_floor: widen merged footprints to keep the children's overlap (see ``_merge_moments``'s floor;
            False: plain moment matching).
        shares: the steps' shares from :func:`merge_shares` (same plan, level, levels_down, per_vertex, device),
            built once by a caller that merges repeatedly; None: built here (about a third of the merge's time).
    Returns:
        GaussianCloud of the same batch shape and dtype with M = ``plan.num_vertices(level - levels_down)``
        Gaussians (one per coarse vertex, its index): means (..., M, 3), quats (..., M, 4), scales (..., M, 3),
        opacities (..., M), sh (..., M, S, 3).  Differentiable except through the eigen-decomposition's degenerate
        cases (used without gradients here).
    """
    if opacity not in OPACITY_MODES:
        raise ValueError(f"opacity must be one of {OPACITY_MODES}, got {opacity!r}")
    if levels_down < 1 or level - levels_down < 0:
        raise ValueError(f"levels_down must be in 1..{level} for a level-{level} cloud, got {levels_down}")
    if per_vertex < 1:
        raise ValueError(f"per_vertex must be >= 1, got {per_vertex}")
    if shares is None:
        shares = merge_shares(plan, level, levels_down, per_vertex, cloud.device)
    elif len(shares) != levels_down:
        raise ValueError(f"{len(shares)} steps of shares given for levels_down = {levels_down}")
    out = cloud
    for step in range(levels_down):
        m = _merge_moments(out, shares[step])
        # smallest merged scale: a thousandth of the typical merged footprint (keeps flat discs flat, not singular)
        min_scale = 1e-3 * float(_footprint_area(out.scales).sqrt().median()) if len(out) else 1e-9
        quats, scales = _cov_to_quat_scales(m["cov"], min_scale)
        if coverage_floor:  # widen the two largest axes (the surface's) up to the floor; the normal axis stays
            grow = (m["floor"] / _footprint_area(scales).sqrt().clamp_min(1e-30)).clamp_min(1.0)
            scales = torch.cat([scales[..., :1], scales[..., 1:] * grow[..., None]], -1)  # eigh: ascending
        area = _footprint_area(scales)
        o = m["W"] / area if opacity == "mass" else _li2_inverse(m["optical"] / area)
        out = GaussianCloud(m["mean"], quats, scales, o.clamp(0.0, max_opacity).to(m["mean"].dtype), m["sh"])
    return out


def footprint_px(cloud: GaussianCloud, camera: Camera, quantile: float = 0.5) -> float:
    """A cloud's typical screen footprint through ``camera``: the ``quantile`` (default median) over its Gaussians
    in front of the camera of ``focal * s1 / depth`` px, s1 its largest standard deviation (no 2D filter).

    cloud: unbatched, N Gaussians; camera: K (3, 3), w2c (4, 4)."""
    w2c = camera.w2c.to(cloud.device, cloud.means.dtype)
    z = cloud.means @ w2c[2, :3] + w2c[2, 3]  # (N,) camera-space depth
    front = z > 1e-6
    if not bool(front.any()):
        return 0.0
    focal = float(camera.K[:2, :2].diagonal().max())
    px = focal * cloud.scales.max(-1).values[front] / z[front]
    return float(torch.quantile(px.float(), quantile))


def pick_level(footprints: Sequence[float], threshold: float = FOOTPRINT_PX) -> int:
    """Index of the coarsest level whose footprint (px, from :func:`footprint_px`) is at most ``threshold``.

    ``footprints[i]`` is level i's footprint (coarse levels have larger ones).  When even the finest level's exceeds
    the threshold (the camera is close: the fine Gaussians are seen larger than it), the finest level is picked:
    zooming in gets full detail back.
    """
    if not footprints:
        raise ValueError("pick_level needs at least one level's footprint")
    for i, f in enumerate(footprints):
        if f <= threshold:
            return i
    return len(footprints) - 1


LOD_MODES = ("off", "auto")  # the --lod settings of animate.py and viewer.py besides a subdivision level number


def lod_mode(value: str | int) -> str:
    """A ``--lod`` setting as written (any case, spaces around) -> its normalised text ("off", "auto", "2", ...);
    :func:`parse_lod` checks it against a model."""
    return str(value).strip().lower()


def coarsest_level(setting: str | int, full_level: int, levels: int) -> int:
    """The coarsest level a parsed ``--lod`` setting merges a head of ``full_level`` to: the fixed level itself, or
    for ``auto`` ``levels`` below the full one (never below 0)."""
    return max(0, full_level - levels) if setting == "auto" else int(setting)


def parse_lod(value: str | int, full_level: int) -> str | int:
    """A ``--lod`` setting -> "off", "auto" or a subdivision level in 0..``full_level`` (the model's); ValueError
    for anything else."""
    v = lod_mode(value)
    if v in LOD_MODES:
        return v
    if v.isdigit() and int(v) <= full_level:
        return int(v)
    raise ValueError(f"--lod must be off, auto or a subdivision level 0..{full_level} (the model's level), got "
                     f"{value!r}")


def coarser_field(field: IdentityField, plan: SubdivisionPlan, levels_down: int = 1) -> IdentityField:
    """The trained ``field`` (on ``plan``'s finest level L) evaluated on its own mesh ``levels_down`` levels coarser:
    the network-side level of detail, for renders whose network runs every frame (a new code per frame).

    Midpoint subdivision keeps the coarse vertices as a prefix, so the coarse field is the same network fed the
    first V_c vertices' inputs (template features and Fourier features, unchanged) on the coarse faces: its raw
    output at those vertices is bit-identical to the fine field's there, and the network does 1/4 of the work per
    level.  Gaussians are sized by the local edge length (:meth:`IdentityField.attach`), so on the coarse mesh each
    is about twice as wide and covers its dropped neighbours; colour and opacity are the vertex's own (a subsample,
    not an average as :func:`merge_to_coarser` takes: that merge needs the fine cloud, i.e. the full network, first).
    Quality against full detail: benchmarks/results/lead_cpu_2026-12-07d.md.  The 3D filter keeps the vertices'
    sampling rates.  Posed vertices: the first ``plan.num_vertices(L - levels_down)`` rows of the fine ones.

    Returns a new field on ``field``'s device in eval mode (no tensors shared; its parameters require gradients
    when ``field``'s do)."""
    level = plan.levels
    if field.num_vertices != plan.num_vertices(level):
        raise ValueError(f"coarser_field: the field has {field.num_vertices} vertices, the plan's level {level} has "
                         f"{plan.num_vertices(level)}")
    if not 1 <= levels_down <= level:
        raise ValueError(f"coarser_field: levels_down must be 1..{level}, got {levels_down}")
    vc = plan.num_vertices(level - levels_down)
    dev = field.template_verts.device
    coarse = IdentityField(field.cfg, field.num_identities, field.template_verts[:vc].cpu(),
                           torch.as_tensor(plan.faces[level - levels_down]))
    per_vertex = ("template_features", "template_verts", "faces")  # the coarse mesh's own
    state = {k: v for k, v in field.state_dict().items() if k not in per_vertex}
    missing, unexpected = coarse.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in per_vertex]:
        raise ValueError(f"coarser_field: state mismatch (missing {missing}, unexpected {unexpected})")
    coarse = coarse.to(dev)
    # the Fourier inputs the constructor computed are the fine ones' prefix: midpoints never leave the coarse
    # vertices' bounding box, which normalises them (tests/test_level_of_detail.py checks the raw outputs agree)
    if field.template_features is not None:
        with torch.no_grad():
            coarse.template_features.copy_(field.template_features[:vc])
    if field.sampling_rate is not None:
        coarse.set_sampling_rate(field.sampling_rate[:vc])
    trainable = any(q.requires_grad for q in field.parameters())
    for p_ in coarse.parameters():
        p_.requires_grad_(trainable)
    return coarse.eval()


@dataclass
class LevelOfDetail:
    """The level-of-detail versions of one posed head, for an opt-in render path (defaults elsewhere unchanged).

    ``levels[i]`` is the head merged down to ``full_level - (len(levels) - 1) + i``: ``levels[-1]`` is the full
    detail cloud itself.  Build with :meth:`build`, re-merge after re-posing with :meth:`update`, render with
    :meth:`cloud_for` (the level the camera picks) and ``models.renderer.render_batch``.  :meth:`merge` merges any
    other (e.g. batched) cloud of the same topology, and :meth:`estimate_index` picks a level for a re-posed head
    without merging it (animate.py's per-frame path).  The merge's shares (sparse matrices, one per level step) are
    built on first use and kept here, so re-merging after a re-pose costs the merge alone.

    Attributes:
        plan: the mask's SubdivisionPlan; full_level: the full cloud's level; per_vertex: its K;
        levels: unbatched clouds, coarsest first; footprints_world: (per level) the median largest standard
        deviation in world units, so a camera's footprint is focal * it / depth without projecting the cloud;
        threshold: pick_level's footprint in px; opacity: merge_to_coarser's opacity mode;
        shares: (fine level, K, device) -> MergeShares of that level step, built once.
    """

    plan: SubdivisionPlan
    full_level: int
    per_vertex: int = 1
    threshold: float = FOOTPRINT_PX
    opacity: str = "optical_depth"
    levels: list = field(default_factory=list)
    footprints_world: list = field(default_factory=list)
    shares: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, cloud: GaussianCloud, plan: SubdivisionPlan, full_level: int, coarsest_level: int | None = None,
              per_vertex: int = 1, threshold: float = FOOTPRINT_PX, opacity: str = "optical_depth"
              ) -> "LevelOfDetail":
        """Merge an unbatched level-``full_level`` cloud (N = V_full * per_vertex) down to ``coarsest_level``
        (default: one level coarser)."""
        lod = cls(plan, full_level, per_vertex, threshold, opacity)
        lod.update(cloud, full_level - 1 if coarsest_level is None else coarsest_level)
        return lod

    def _step(self, lvl: int, device: torch.device) -> MergeShares:
        """The kept shares of the step level ``lvl`` -> ``lvl - 1`` on ``device`` (built on first use)."""
        k = self.per_vertex if lvl == self.full_level else 1
        key = (lvl, k, str(device))
        if key not in self.shares:
            self.shares[key] = _build_shares(self.plan, lvl, k, torch.device(device))
        return self.shares[key]

    def merge(self, cloud: GaussianCloud, to_level: int) -> GaussianCloud:
        """A full-detail cloud of any batch shape B... (N = V_full * per_vertex) merged to level ``to_level``
        (< full_level; the cloud itself at full_level), with the kept shares: (B..., V_to_level) Gaussians."""
        if to_level == self.full_level:
            return cloud
        if not 0 <= to_level < self.full_level:
            raise ValueError(f"to_level must be in 0..{self.full_level}, got {to_level}")
        shares = [self._step(lvl, cloud.device) for lvl in range(self.full_level, to_level, -1)]
        with torch.no_grad():
            return merge_to_coarser(cloud, self.plan, self.full_level, self.full_level - to_level, self.per_vertex,
                                    opacity=self.opacity, shares=shares)

    def update(self, cloud: GaussianCloud, coarsest_level: int | None = None) -> None:
        """Re-merge after the head was re-posed (same topology): ``cloud`` unbatched, N = V_full * per_vertex."""
        if len(cloud.batch_shape) != 0:
            raise ValueError("LevelOfDetail holds one head: pass an unbatched cloud (cloud[b])")
        if coarsest_level is None:
            coarsest_level = self.full_level - (len(self.levels) - 1 if self.levels else 1)
        if not 0 <= coarsest_level <= self.full_level:
            raise ValueError(f"coarsest_level must be in 0..{self.full_level}, got {coarsest_level}")
        levels = [cloud]
        with torch.no_grad():
            # one step at a time from the level above (the same numbers as one merge_to_coarser call going down)
            for lvl in range(self.full_level, coarsest_level, -1):
                k = self.per_vertex if lvl == self.full_level else 1
                levels.append(merge_to_coarser(levels[-1], self.plan, lvl, per_vertex=k, opacity=self.opacity,
                                               shares=[self._step(lvl, cloud.device)]))
        self.levels = levels[::-1]
        self.footprints_world = [float(c.scales.max(-1).values.median()) for c in self.levels]

    @staticmethod
    def _depth_focal(cloud: GaussianCloud, camera: Camera) -> tuple[float, float]:
        """(median camera-space depth of an unbatched cloud's Gaussians, the camera's focal length in px)."""
        w2c = camera.w2c.to(cloud.device, cloud.means.dtype)
        depth = float((cloud.means @ w2c[2, :3] + w2c[2, 3]).median())
        return max(depth, 1e-6), float(camera.K[:2, :2].diagonal().max())

    def footprints(self, camera: Camera) -> list[float]:
        """Per level (coarsest first), the median footprint in px through ``camera`` (at the head's median depth)."""
        depth, focal = self._depth_focal(self.levels[-1], camera)
        return [focal * s / depth for s in self.footprints_world]

    def level_index(self, camera: Camera) -> int:
        """Index into :attr:`levels` that ``camera`` picks (see :func:`pick_level`)."""
        return pick_level(self.footprints(camera), self.threshold)

    def estimate_index(self, cloud: GaussianCloud, camera: Camera) -> int:
        """The index into :attr:`levels` that ``camera`` would pick for ``cloud``, an unbatched re-pose of the held
        head, without merging it: its own footprint at full detail, the coarser levels' scaled by their ratio to
        full detail in the held pose (re-posing moves and bends the Gaussians but keeps the merge's widening about
        the same).  So frames that get full detail never pay for a merge."""
        depth, focal = self._depth_focal(cloud, camera)
        full = focal * float(cloud.scales.max(-1).values.median()) / depth
        ref = max(self.footprints_world[-1], 1e-30)
        return pick_level([full * s / ref for s in self.footprints_world], self.threshold)

    def cloud_for(self, camera: Camera) -> GaussianCloud:
        """The cloud to render through ``camera``: the coarsest level whose footprint stays under the threshold."""
        return self.levels[self.level_index(camera)]

    @property
    def level_numbers(self) -> list[int]:
        """Subdivision level of each entry of :attr:`levels`."""
        return list(range(self.full_level - len(self.levels) + 1, self.full_level + 1))


__all__ = ["LOD_MODES", "LevelOfDetail", "MergeShares", "coarser_field", "coarsest_level", "lod_mode", "parse_lod",
           "footprint_px", "merge_shares", "merge_to_coarser", "pick_level", "OPACITY_MODES", "FOOTPRINT_PX"]
