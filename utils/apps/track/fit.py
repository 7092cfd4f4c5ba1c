"""The single-image fit: a new person's style (or code) and, optionally, a per-vertex colour residual, with the trained
identity field frozen (the pipeline around it, loading, evaluation and exports, is utils/apps/track/pipeline.py).

    fit     Adam on the style w (or the code z) from a start point (mean code / w_avg / mean training style, or the
            best of them on the photo), loss 0.8 * L1 + 0.2 * (1 - SSIM), exponential lr decay, early stopping on a
            loss plateau; optionally small regularised offsets of the base vertices (``fit.refine_geometry``)
    flame   (``fit.refine_flame``, photo-only fits) the head pose, expression and jaw of the FLAME fitted to the
            landmarks, jointly with the style, through the renderer (the face mask vertices follow FLAME each step):
            corrects the pose the landmarks leave uncertain (a few degrees, see utils/face/flame_fit.py)
    colour  (``fit.refine_colour``, on by default) with the fitted code fixed, Adam on a per-vertex RGB residual of
            the level-0 face-mask vertices (upsampled through the subdivision like the geometry, added to the
            Gaussians' SH DC term), same photometric loss plus a mesh-Laplacian smoothness and an L2 penalty: detail
            the frozen network cannot express for a new person; vertices the photo does not show get no data
            gradient and stay near zero (L2) and smooth with their seen neighbours (Laplacian)

Speed: the per-iteration work is one network forward and backward (frozen weights, only the optimised vector needs
gradients; on a GPU replayed from CUDA graphs, models/graphed_synthesis.py), one rasterizer call on the cropped view
and the loss; the loop never synchronises with the host except every ``fit.check_every`` iterations for the
early-stopping test, so it runs asynchronously on a GPU.  The colour stage does not run the network at all: the
fitted Gaussians are synthesised once and each iteration only adds the residual to their colours, renders and steps
(again synchronising only every ``fit.check_every`` iterations).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models.camera import Camera
from models.flame import FlameModel, FlameParams, axis_angle_to_matrix
from models.geometry import UniformLaplacian, mean_edge_length
from models.graphed_synthesis import GraphedSynthesis
from models.renderer import FixedGeometryRender, render
from utils.apps.track.config import COLOUR_SOLVERS, INITS, OPTIMIZERS, SPACES, FitConfig
from utils.apps.track.lbfgs import SyncFreeLBFGS
from utils.apps.track.targets import FitTarget
from utils.core.device import synchronize
from utils.data.code_file import (
    FittedCode,
    code_cloud,
    colour_offsets,
    load_code,
    render_style,
)
from utils.data.model_file import TrainedModel
from utils.face.regions import eye_region_masks
from utils.losses import l1, ssim


@torch.no_grad()
def start_candidates(model: TrainedModel, space: str, target: FitTarget | None = None
                     ) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Starting points {name: (w (S,), z (D,) or None)}: the mean code; in w space also the tracked average style
    ``w_avg`` and the mean of the training identities' styles; when the model has an encoder and a ``target`` is
    given, the encoder's prediction from the target's photo (``encoder``; in z space only an encoder of z)."""
    f = model.field
    z_mean = f.mean_code()
    out = {"mean_code": (f.style(z_mean[None], update_w_avg=False)[0], z_mean)}
    if space == "w":
        if float(f.mapping.w_avg.abs().sum()) > 0:  # w_avg stays zero in a model that was never trained
            out["w_avg"] = (f.mapping.w_avg.clone(), None)
        out["mean_w"] = (f.style(f.codes.weight, update_w_avg=False).mean(0), None)
    enc = getattr(model, "encoder", None)
    if enc is not None and target is not None and (space == "w" or enc.cfg.space == "z"):
        view = target.fit_view
        mask = view.mask if view.mask is not None else (view.image.sum(-1, keepdim=True) > 0).float()
        pred = enc.predict(view.image, mask).to(z_mean)
        # an encoder of the code z (EncoderConfig.space) gives its style through the mapping network
        out["encoder"] = (pred, None) if enc.cfg.space == "w" else (f.style(pred[None], update_w_avg=False)[0], pred)
    return out


def resolve_init(model: TrainedModel, cfg: FitConfig, cands: dict[str, tuple[Tensor, Tensor | None]]
                 ) -> dict[str, tuple[Tensor, Tensor | None]]:
    """The candidates fit.init asks for (one, or all for best).  ``encoder`` without a usable encoder (none in the
    model, a damaged one, or an encoder of w with fit.space z) falls back to the mean code with a one-line notice."""
    import sys

    init = {"mean": "mean_code"}.get(cfg.init, cfg.init)
    if init == "auto":
        init = "encoder" if "encoder" in cands else "best"
    if init == "best":
        return cands
    if init == "encoder" and "encoder" not in cands:
        why = (getattr(model, "encoder_notice", "") or "the model has no encoder (train one: python train.py "
               "--encoder_only --checkpoint MODEL.pt)") if cfg.space == "w" or getattr(model, "encoder", None) is None \
            else "fit.space z needs an encoder of z (encoder.arch.space z); this one predicts w"
        print(f"notice: fit.init=encoder: {why.removeprefix('notice: ')}; starting from the mean code",
              file=sys.stderr)
        init = "mean_code"
    if init not in cands:
        raise ValueError(f"fit.init={cfg.init!r} is not available for fit.space={cfg.space!r} "
                         f"(available: {sorted(cands)})")
    return {init: cands[init]}


# ====================================================================================== fitting
@dataclass
class FitResult:
    code: FittedCode
    iterations: int
    losses: list[float]  # windowed mean loss at every early-stopping check
    start: str  # name of the starting point
    start_losses: dict[str, float]  # loss of every candidate start on the fitted view
    stopped_early: bool
    start_w: Tensor | None = None  # (S,) style of the starting point
    eye_term_pixels: int = 0  # pixels of the fitted view's eye regions in the loss (fit.eye_weight; 0: no eye term)
    colour_iterations: int = 0  # iterations of the colour stage (0: not run)
    colour_losses: list[float] = field(default_factory=list)  # its windowed mean photometric loss every check_every
    seconds_code: float = 0.0  # wall time of the code fit (start selection included)
    seconds_colour: float = 0.0  # wall time of the colour stage
    flame_params: "FlameParams | None" = None  # photo-only fits: the FLAME after the photometric refinement
    flame_losses: list[float] = field(default_factory=list)  # its windowed photometric loss every check_every
    seconds_flame: float = 0.0  # wall time of that stage
    rim_iterations: int = 0  # iterations of the rim stage (0: not run)
    rim_params: Tensor | None = None  # (R, 2) its opacity-logit and log-scale shift per boundary ring
    rim_losses: list[float] = field(default_factory=list)  # its windowed photometric loss every check_every
    seconds_rim: float = 0.0  # wall time of the rim stage
    # parts of seconds_code: targets, start candidates and their renders (the encoder's forward included); the
    # frozen network's CUDA-graph capture; the Adam iterations
    seconds_start: float = 0.0
    seconds_capture: float = 0.0
    seconds_code_loop: float = 0.0


def photometric(pred: Tensor, gt: Tensor, cfg: FitConfig, eyes: Tensor | None = None,
                eye_weight: float | None = None, ignore: Tensor | None = None) -> Tensor:
    """cfg.l1_weight * L1 + cfg.ssim_weight * (1 - SSIM) (+ ``eye_weight`` (default cfg.eye_weight) * L1 inside
    ``eyes``, the view's eye regions (h, w, 1) or (C, h, w, 1)); pred, gt (h, w, 3) or (C, h, w, 3).

    ``ignore`` ((h, w, 1) or (C, h, w, 1), 1 = no data; None: every pixel is data): pixels left out of the loss, the
    photo standing in for the render there (no error, no gradient), as training's loss.rim_band does: the photo is
    black there only because a mask cut it (targets.no_data_mask)."""
    eye_weight = cfg.eye_weight if eye_weight is None else eye_weight
    if ignore is not None:
        pred = torch.where(ignore > 0.5, gt, pred)
    loss = cfg.l1_weight * l1(pred, gt)
    if cfg.ssim_weight > 0:
        loss = loss + cfg.ssim_weight * (1.0 - ssim(pred, gt))
    if eyes is not None and eye_weight > 0:
        loss = loss + eye_weight * l1(pred, gt, eyes)
    return loss


def scaled_eye_weight(weight: float, eyes: Tensor | None, full_pixels: int) -> float:
    """``weight`` * min(1, eye pixels / ``full_pixels``) (``full_pixels`` 0: ``weight``); 0 without ``eyes``."""
    if eyes is None:
        return 0.0
    if full_pixels <= 0:
        return float(weight)
    return float(weight) * min(1.0, float(eyes.sum()) / full_pixels)


def fit_view_eyes(target: FitTarget, cfg: FitConfig) -> Tensor | None:
    """The fitted view's eye regions (h, w, 1) for ``fit.eye_weight``; None (no eye term) when the weight is 0, the
    FLAME files give no eye landmarks on the face mask, the regions are empty or hold fewer than
    ``fit.eye_min_pixels``."""
    if max(cfg.eye_weight, cfg.colour_eye_weight if cfg.refine_colour else 0.0) <= 0 or target.eye_landmarks is None:
        return None
    view = target.fit_view
    mask = view.mask if view.mask is not None else torch.ones_like(view.image[..., :1])
    eyes = eye_region_masks(target.eye_landmarks(target.base_vertices), [view.camera], mask[None])[0]
    n = float(eyes.sum())
    return eyes if n > 0 and n >= cfg.eye_min_pixels else None


def downscaled_view(camera: Camera, image: Tensor, eyes: Tensor | None, scale: float
                    ) -> tuple[Camera, Tensor, Tensor | None]:
    """The fitted view at ``scale`` (<= 1) of its resolution: the camera with scaled intrinsics and the photo
    ``image`` (h, w, 3) and ``eyes`` (h, w, 1) area-averaged to its (round(h * scale), round(w * scale)) pixels (eye
    weights become fractional at the edges).  ``scale`` 1 returns the inputs unchanged."""
    if scale >= 1.0:
        return camera, image, eyes
    cam = camera.scaled(scale)

    def area(a: Tensor) -> Tensor:
        return torch.nn.functional.interpolate(a.permute(2, 0, 1)[None].float(), size=(cam.height, cam.width),
                                               mode="area")[0].permute(1, 2, 0).contiguous()

    return cam, area(image), None if eyes is None else area(eyes)


def mesh_laplacian(model: TrainedModel, device: torch.device) -> UniformLaplacian:
    """The uniform Laplacian of the model's level-0 face-mask mesh on ``device``, built once per model
    (``TrainedModel.derived``): the colour stage and the geometry refinement share it."""
    return model.derived(("laplacian", str(device)),
                         lambda: UniformLaplacian(model.base_vertices.shape[-2], model.base_faces, device))


def fit_colour(model: TrainedModel, w: Tensor, base: Tensor, camera: Camera, gt: Tensor, cfg: FitConfig,
               backend: str = "auto", name: str = "", progress: bool = False,
               eyes: Tensor | None = None, gaussians: Tensor | None = None,
               ignore: Tensor | None = None) -> tuple[Tensor, list[float]]:
    """The colour stage: a per-vertex RGB residual (M, 3) of the level-0 vertices for the fixed style w and
    geometry base, fitted to the photo ``gt`` through ``camera`` (``eyes``: its eye regions, for fit.eye_weight;
    ``gaussians``: a per-Gaussian residual (V, K, 7) kept fixed, e.g. the rim stage's; ``ignore``: (h, w, 1) no-data
    pixels left out of the loss, :func:`photometric`).

    Minimises ``photometric + colour_laplacian_weight * mean |L r|^2 + colour_weight * mean |r|^2`` (L: uniform
    Laplacian of the level-0 face-mask mesh) with Adam from r = 0, lr decaying like the code fit.  The Gaussians
    are synthesised and their render through ``camera`` prepared once (projection, view-dependent colour, tile
    sorting: models.renderer.FixedGeometryRender, the same image as rendering ``with_colour``); an iteration adds
    the upsampled residual to their colours, renders and steps, and the loop synchronises with the host only every
    ``check_every`` iterations.  Returns (residual, windowed losses).
    """
    with torch.no_grad():
        cloud0 = code_cloud(model, w, base, gaussians=gaussians).detach()
    # only the colours change below: the geometry's share of the render is done once (issue 25)
    fixed = FixedGeometryRender(cloud0, camera, backend=backend)
    res = torch.zeros_like(base, requires_grad=True)
    lap = mesh_laplacian(model, base.device)
    free = None
    if cfg.colour_boundary_rings > 0:
        free = model.derived(("interior", cfg.colour_boundary_rings, str(base.device)), lambda: (~boundary_rings(
            len(base), model.base_faces, cfg.colour_boundary_rings)).to(base.device)[:, None])
    n = cfg.colour_iterations
    eye_w = scaled_eye_weight(cfg.colour_eye_weight, eyes, cfg.colour_eye_pixels)
    fused = {"fused": True} if base.device.type == "cuda" else {}
    if cfg.colour_solver == "lbfgs":  # steps of at most colour_lr per RGB entry
        opt = SyncFreeLBFGS(res, cfg.lbfgs_history, cfg.colour_lr)
    else:
        opt = torch.optim.Adam([res], lr=cfg.colour_lr, betas=(cfg.beta1, cfg.beta2), **fused)
    window = LossWindow(base.device, cfg.check_every, f"colour stage of {name}", "lower fit.colour_lr")
    for it in tqdm(range(n), desc=f"colour {name}".rstrip(), disable=not progress, leave=False, dynamic_ncols=True):
        for g in getattr(opt, "param_groups", []):
            g["lr"] = cfg.colour_lr * cfg.lr_final_ratio ** (it / max(1, n - 1))
        r = res if free is None else res * free
        pred = fixed(colour_offsets(model, r))["image"]
        loss = photometric(pred, gt, cfg, eyes, eye_w, ignore)
        total = loss + lap.penalty(res, cfg.colour_laplacian_weight, cfg.colour_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        window.add(loss, it + 1, last=it + 1 == n)
    out = res.detach() if free is None else (res * free).detach()
    return out, window.losses


def boundary_rings(num_vertices: int, faces: np.ndarray, rings: int) -> Tensor:
    """(M,) bool: the vertices of the mesh's open boundary (edges of one triangle) and of the ``rings - 1`` vertex
    rings inside it."""
    f = np.asarray(faces, dtype=np.int64)
    e = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    uniq, count = np.unique(e, axis=0, return_counts=True)
    sel = np.zeros(num_vertices, bool)
    sel[uniq[count == 1].ravel()] = True
    for _ in range(rings - 1):
        grow = sel.copy()
        grow[uniq[sel[uniq[:, 0]], 1]] = True
        grow[uniq[sel[uniq[:, 1]], 0]] = True
        sel = grow
    return torch.from_numpy(sel)


def boundary_ring_index(num_vertices: int, faces: np.ndarray, rings: int) -> Tensor:
    """(num_vertices,) long: each vertex's ring from the mesh's open boundary (0: on it, 1: the next ring inwards,
    ...) for rings < ``rings``, else -1."""
    idx = torch.full((num_vertices,), -1, dtype=torch.long)
    prev = torch.zeros(num_vertices, dtype=torch.bool)
    for r in range(rings):
        cur = boundary_rings(num_vertices, faces, r + 1)
        idx[cur & ~prev] = r
        prev = cur
    return idx


def rim_residual(params: Tensor, ring: Tensor, K: int) -> Tensor:
    """The per-Gaussian residual (V, K, 7) (models.identity_field.RESIDUAL_CHANNELS) of the rim corrections
    ``params`` (R, 2): ring r's Gaussians get ``params[r, 0]`` on their opacity logit and ``params[r, 1]`` on their
    three log-scales; ``ring`` (V,) from :func:`boundary_ring_index` (-1: no correction)."""
    sel = (ring >= 0).to(params.dtype)[:, None]  # (V, 1)
    p = params[ring.clamp_min(0)] * sel  # (V, 2)
    per_vertex = torch.cat([p.new_zeros(len(ring), 3), p[:, 1:2].expand(-1, 3), p[:, 0:1]], dim=1)  # (V, 7)
    return per_vertex[:, None, :].expand(-1, K, -1)


def fit_rim(model: TrainedModel, w: Tensor, base: Tensor, camera: Camera, gt: Tensor, cfg: FitConfig,
            backend: str = "auto", name: str = "", progress: bool = False, ignore: Tensor | None = None
            ) -> tuple[Tensor, Tensor, list[float]]:
    """The rim stage: with the style w (S,) and the geometry base (M, 3) fixed, one opacity-logit shift and one
    log-scale shift per ring of the face mask's open boundary (``fit.rim_rings`` rings of the subdivided mesh), shared
    by all Gaussians of the ring, fitted to the photo ``gt`` (h, w, 3) through ``camera`` (``ignore``: (h, w, 1)
    no-data pixels left out of the loss).

    Why: the photos are black outside the face mask, but a model trained with ``loss.rim_band`` (the CPU preset)
    paints its boundary Gaussians a pixel or two past the mask; the whole-image error of a fit was mostly that ring
    (benchmarks/results/fit_ablation_cpu_*.md).  A style cannot remove it.  The photo's own edge (its face against
    the black outside) says how far the rim should reach; a few parameters shared along the whole boundary carry
    that to the parts of the rim the photo does not show (the sides of the face seen from other cameras), which a
    per-vertex correction fitted on one view could not.

    Minimises ``photometric + rim_weight * mean params^2`` with Adam from zero (lr decaying like fit.lr), the network
    run once.  Returns (params (R, 2), residual (V, K, 7), windowed losses)."""
    f = model.field
    ring = model.derived(("rim_ring_index", cfg.rim_rings, str(base.device)), lambda: boundary_ring_index(
        f.num_vertices, f.faces.cpu().numpy(), cfg.rim_rings).to(base.device))
    verts = model.vertices(base)[None]
    with torch.no_grad():
        raw = f.synthesize_raw(w[None]).to(verts.dtype)
        surface = f.attach_surface(verts)
    params = torch.zeros(cfg.rim_rings, 2, device=base.device, requires_grad=True)
    fused = {"fused": True} if base.device.type == "cuda" else {}
    opt = torch.optim.Adam([params], lr=cfg.rim_lr, betas=(cfg.beta1, cfg.beta2), **fused)
    n = cfg.rim_iterations
    window = LossWindow(base.device, cfg.check_every, f"rim stage of {name}", "lower fit.rim_lr")
    for it in tqdm(range(n), desc=f"rim {name}".rstrip(), disable=not progress, leave=False, dynamic_ncols=True):
        opt.param_groups[0]["lr"] = cfg.rim_lr * cfg.lr_final_ratio ** (it / max(1, n - 1))
        cloud = f.attach(f.add_residual(raw, rim_residual(params, ring, f.K)), verts, surface)[0]
        loss = photometric(render(cloud, camera, backend=backend)["image"], gt, cfg, eye_weight=0.0, ignore=ignore)
        total = loss + cfg.rim_weight * params.square().mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        window.add(loss, it + 1, last=it + 1 == n)
    params = params.detach()
    return params, rim_residual(params, ring, f.K).contiguous(), window.losses


def refine_flame(model: TrainedModel, w: Tensor, flame: FlameModel, params: FlameParams, camera: Camera,
                 gt: Tensor, cfg: FitConfig, backend: str = "auto", name: str = "", progress: bool = False,
                 ignore: Tensor | None = None) -> tuple[FlameParams, Tensor, Tensor, list[float]]:
    """The FLAME stage: head rotation (a rotation applied before the fitted one), translation, expression and jaw of
    ``params`` (one frame), jointly with the style ``w`` (S,), fitted to the photo ``gt`` (h, w, 3) through
    ``camera`` with the network frozen; the face-mask vertices are re-evaluated from FLAME every iteration
    (``ignore``: (h, w, 1) no-data pixels left out of the loss).

    Minimises ``photometric + style_reg * mean |w - w0|^2 + flame_prior * (|expression|^2 + |jaw / 0.2|^2)`` with
    Adam.  Returns (refined FlameParams, refined style (S,), face-mask vertices (M, 3), windowed losses)."""
    from dataclasses import replace


    dev = w.device
    flame = flame.to(dev)
    p0 = params.to(dev).frame(0)
    mask_ids = torch.as_tensor(model.mask_ids, device=dev)
    dist = float((camera.center.to(dev) - p0.translation[0]).norm())  # translation steps in head distances
    d_rot = torch.zeros(1, 3, device=dev, requires_grad=True)
    d_t = torch.zeros(1, 3, device=dev, requires_grad=True)
    expr = p0.expression.detach().clone().requires_grad_(True)
    jaw = p0.jaw.detach().clone().requires_grad_(True)
    var = w.detach().clone().requires_grad_(True)
    fused = {"fused": True} if dev.type == "cuda" else {}
    opt = torch.optim.Adam([{"params": [d_rot, d_t, jaw], "lr": cfg.flame_lr},
                            {"params": [expr], "lr": cfg.flame_expression_lr},
                            {"params": [var], "lr": cfg.flame_style_lr}], betas=(cfg.beta1, cfg.beta2), **fused)
    jaw_std = torch.tensor([0.2, 0.02, 0.02], device=dev)

    def posed() -> FlameParams:
        return replace(p0, rotation_matrix=axis_angle_to_matrix(d_rot) @ p0.rotation_matrix,
                       translation=p0.translation + d_t * dist, expression=expr, jaw=jaw)

    with torch.no_grad():
        base0 = flame(p0)[0][mask_ids]
    synth = GraphedSynthesis(model.field, model.vertices(base0), space="w", dynamic_geometry=True,
                             use_graphs=None if cfg.cuda_graphs else False)
    n = cfg.flame_iterations
    window = LossWindow(dev, cfg.check_every, f"FLAME stage of {name}", "lower fit.flame_lr")
    for it in tqdm(range(n), desc=f"FLAME {name}".rstrip(), disable=not progress, leave=False, dynamic_ncols=True):
        base = flame(posed())[0][mask_ids]
        pred = render(synth(var, model.vertices(base)), camera, backend=backend)["image"]
        loss = photometric(pred, gt, cfg, ignore=ignore)
        total = (loss + cfg.style_reg * (var - w).square().mean()
                 + cfg.flame_prior * (expr.square().sum() + (jaw / jaw_std).square().sum()))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        window.add(loss, it + 1, last=it + 1 == n)
    with torch.no_grad():
        p = posed()
        p = replace(p, **{k: getattr(p, k).detach().clone() for k in ("rotation_matrix", "translation", "expression",
                                                                        "jaw")})
        base = flame(p)[0][mask_ids]
    return p, var.detach().clone(), base, window.losses


class LossWindow:
    """A stage's photometric loss averaged over windows of ``every`` iterations: summed on the device and read back
    once per window (one host synchronisation per window, not per step, on a GPU).  A non-finite window stops the
    loop: ``FloatingPointError("<what> diverged (loss L) at iteration I; <hint>")``.  ``losses`` keeps every window's
    mean."""

    def __init__(self, device: torch.device, every: int, what: str, hint: str):
        self.every, self.what, self.hint = every, what, hint
        self.acc = torch.zeros((), device=device)
        self.count = 0
        self.losses: list[float] = []

    def add(self, loss: Tensor, iteration: int, last: bool = False) -> float | None:
        """Adds iteration ``iteration``'s (1-based) loss; returns the window's mean when the window is full (or
        ``last``, for a partial final window), else None."""
        self.acc = self.acc + loss.detach()
        self.count += 1
        if self.count < self.every and not last:
            return None
        cur = float(self.acc) / self.count  # the one host sync of the window
        self.acc, self.count = torch.zeros_like(self.acc), 0
        self.losses.append(cur)
        if not math.isfinite(cur):
            raise FloatingPointError(f"{self.what} diverged (loss {cur}) at iteration {iteration}; {self.hint}")
        return cur


def plateau(cur: float, best: float, bad: int, it: int, cfg: FitConfig) -> tuple[float, int, bool]:
    """One early-stopping test of a windowed loss ``cur`` at iteration ``it``: (best so far, tests in a row without
    ``cfg.min_rel_improvement``, whether to stop: ``cfg.patience`` such tests and at least ``cfg.min_iterations``)."""
    if cur < best * (1 - cfg.min_rel_improvement):
        best, bad = cur, 0
    else:
        best, bad = min(best, cur), bad + 1
    return best, bad, bad >= cfg.patience and it >= cfg.min_iterations


def fit_identity(model: TrainedModel, target: FitTarget, cfg: FitConfig, backend: str = "auto",
                 progress: bool = True) -> FitResult:
    """Fit a style (or code) and optionally vertex offsets to ``target.fit_view``, then (``fit.refine_colour``)
    a per-vertex colour residual with the code fixed (:func:`fit_colour`); the network stays frozen."""
    if cfg.space not in SPACES:
        raise ValueError(f"fit.space must be one of {SPACES}, got {cfg.space!r}")
    if cfg.iterations < 0 or cfg.check_every < 1:
        raise ValueError(f"fit.iterations must be >= 0 and fit.check_every >= 1 (got {cfg.iterations}, "
                         f"{cfg.check_every})")
    if min(cfg.eye_weight, cfg.colour_eye_weight, cfg.eye_pixels, cfg.colour_eye_pixels, cfg.eye_min_pixels) < 0:
        raise ValueError(f"fit.eye_weight, fit.colour_eye_weight, fit.eye_pixels, fit.colour_eye_pixels and "
                         f"fit.eye_min_pixels must be >= 0, got {cfg.eye_weight}, {cfg.colour_eye_weight}, "
                         f"{cfg.eye_pixels}, {cfg.colour_eye_pixels}, {cfg.eye_min_pixels}")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"fit.precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"fit.optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    if cfg.optimizer == "lbfgs" and cfg.refine_geometry:
        raise ValueError("fit.optimizer lbfgs optimises the code alone; fit.refine_geometry needs fit.optimizer adam")
    if cfg.colour_solver not in COLOUR_SOLVERS:
        raise ValueError(f"fit.colour_solver must be one of {COLOUR_SOLVERS}, got {cfg.colour_solver!r}")
    if cfg.refine_colour and cfg.colour_iterations < 0:
        raise ValueError(f"fit.colour_iterations must be >= 0, got {cfg.colour_iterations}")
    if not 0 <= cfg.code_levels_down <= model.plan.levels:
        raise ValueError(f"fit.code_levels_down must be 0..{model.plan.levels} (the model's subdivision level), got "
                         f"{cfg.code_levels_down}")
    t_start = time.perf_counter()
    f = model.field.eval()
    for p in f.parameters():
        p.requires_grad_(False)
    view = target.fit_view
    cam, gt = view.camera, view.image
    base0 = target.base_vertices
    eyes = fit_view_eyes(target, cfg)
    # the code stage (start selection included) may see a coarser copy of the photo (fit.code_scale)
    cam_c, gt_c, eyes_c = downscaled_view(cam, gt, eyes, cfg.code_scale)
    ign = target.ignore  # photo-only targets: pixels that are no data (outline cut, rim band)
    ign_c = None if ign is None else downscaled_view(cam, ign, None, cfg.code_scale)[1]
    code_eye_w = scaled_eye_weight(cfg.eye_weight, eyes, cfg.eye_pixels)

    # ---- starting point
    if cfg.init in INITS:
        # the encoder runs only when the start may be it
        wants_encoder = cfg.init in ("auto", "encoder", "best")
        cands = resolve_init(model, cfg, start_candidates(model, cfg.space, target if wants_encoder else None))
    else:  # a code.pt to start from (e.g. a previous fit)
        c = load_code(cfg.init, model, base0.device)
        if cfg.space == "z" and c.z is None:
            raise ValueError(f"fit.init={cfg.init} holds no z code (it was fitted in w space); use fit.space=w")
        cands = {Path(cfg.init).name: (c.w, c.z)}
    @torch.no_grad()
    def start_loss(w_c: Tensor) -> float:
        return float(photometric(render_style(model, w_c, base0, [cam_c], backend)[0], gt_c, cfg, eyes_c, code_eye_w,
                                 ign_c))

    # a choice to make: every candidate rendered; a single start's loss is the first iteration's (read after the loop)
    start_losses = {name: start_loss(w_c) for name, (w_c, _) in cands.items()} if len(cands) > 1 else {}
    start = min(start_losses, key=start_losses.get) if start_losses else next(iter(cands))
    w0, z0 = cands[start]
    var = (w0 if cfg.space == "w" else z0).detach().clone().requires_grad_(True)
    groups = [{"params": [var], "lr": cfg.lr, "initial_lr": cfg.lr}]
    offsets = None
    if cfg.refine_geometry:
        offsets = torch.zeros_like(base0, requires_grad=True)
        groups.append({"params": [offsets], "lr": cfg.geometry_lr, "initial_lr": cfg.geometry_lr})
        lap = mesh_laplacian(model, base0.device)
        unit = mean_edge_length(base0, model.base_faces)
    fused = {"fused": True} if base0.device.type == "cuda" else {}
    if cfg.optimizer == "lbfgs":
        opt = SyncFreeLBFGS(var, cfg.lbfgs_history, cfg.lbfgs_max_step)
    else:
        opt = torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2), **fused)
    # without geometry refinement the subdivided vertices are constant and computed once (model.plan already holds
    # its index tensors on the model's device: no host-to-device copy per iteration)
    # fit.code_levels_down: the code stage on the network's own coarser mesh (a prefix of the fine vertices)
    f_code = model.coarse_field(cfg.code_levels_down)
    n_code = model.plan.num_vertices(model.plan.levels - cfg.code_levels_down)
    verts0 = model.vertices(base0)[:n_code]
    # The frozen network at batch 1 is launch-bound on a GPU: replay its forward and backward from CUDA graphs
    # (fixed geometry: surface frames computed once at capture).  Eager on a CPU or with fit.cuda_graphs=false.
    synchronize(base0.device)
    t_capture = time.perf_counter()
    synth = GraphedSynthesis(f_code, verts0, space=cfg.space, dynamic_geometry=offsets is not None,
                             use_graphs=None if cfg.cuda_graphs else False, precision=cfg.precision)
    synchronize(base0.device)
    t_loop = time.perf_counter()

    def style_of(v: Tensor) -> Tensor:
        return v if cfg.space == "w" else f.style(v[None], update_w_avg=False)[0]

    # ---- loop: no host synchronisation except every check_every iterations
    window = LossWindow(base0.device, cfg.check_every, f"fit of {target.name}", "lower fit.lr")
    best, bad, it, stopped = float("inf"), 0, 0, False
    bar = tqdm(total=cfg.iterations, desc=f"fitting {target.name}", disable=not progress, leave=False,
               dynamic_ncols=True)
    while it < cfg.iterations:
        mult = cfg.lr_final_ratio ** (it / max(1, cfg.iterations - 1))
        for g in getattr(opt, "param_groups", []):  # (L-BFGS: unit steps, no learning rate)
            g["lr"] = g["initial_lr"] * mult
        cloud = synth(var) if offsets is None else synth(var, model.vertices(base0 + offsets)[:n_code])
        pred = render(cloud, cam_c, backend=backend)["image"]
        loss = photometric(pred, gt_c, cfg, eyes_c, code_eye_w, ign_c)
        total = loss
        if cfg.space == "w" and cfg.style_reg > 0:
            total = total + cfg.style_reg * (var - w0).square().mean()
        if offsets is not None:
            total = total + lap.penalty(offsets / unit, cfg.laplacian_weight, cfg.offset_weight)
        if it == 0 and not start_losses:
            first_loss = loss.detach()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        it += 1
        bar.update(1)
        cur = window.add(loss, it)
        if cur is not None:
            bar.set_postfix(loss=f"{cur:.4f}")
            best, bad, stopped = plateau(cur, best, bad, it, cfg)
            if stopped:
                break
    bar.close()
    if not start_losses:  # no iterations (fit.iterations 0): the start rendered once for its loss
        start_losses[start] = float(first_loss) if it > 0 else start_loss(w0)
    with torch.no_grad():
        w_fit = style_of(var).detach()
        base_fit = (base0 if offsets is None else base0 + offsets).detach()
    synchronize(base0.device)
    t_end = time.perf_counter()
    seconds_code = t_end - t_start

    # ---- FLAME stage (photo-only targets): head pose, expression and jaw with the style, photometric
    flame_params, flame_losses, seconds_flame = None, [], 0.0
    wild = getattr(target, "wild", None)
    if cfg.refine_flame and cfg.flame_iterations > 0 and wild is not None and offsets is None:
        t0 = time.perf_counter()
        flame_params, w_fit, base_fit, flame_losses = refine_flame(model, w_fit, wild.flame, wild.fit.params, cam, gt,
                                                                   cfg, backend, target.name, progress, ign)
        synchronize(base0.device)
        seconds_flame = time.perf_counter() - t0

    # ---- rim stage: code and geometry fixed, how far the Gaussians on the mask's open boundary reach
    rim_params, gaussians, rim_losses, seconds_rim = None, None, [], 0.0
    if cfg.refine_rim and cfg.rim_iterations > 0 and cfg.rim_rings > 0:
        t0 = time.perf_counter()
        rim_params, gaussians, rim_losses = fit_rim(model, w_fit, base_fit, cam, gt, cfg, backend, target.name,
                                                    progress, ign)
        synchronize(base0.device)
        seconds_rim = time.perf_counter() - t0

    # ---- colour stage: code and geometry fixed, a regularised per-vertex RGB residual
    colour, colour_losses, seconds_colour = None, [], 0.0
    if cfg.refine_colour and cfg.colour_iterations > 0:
        t0 = time.perf_counter()
        colour, colour_losses = fit_colour(model, w_fit, base_fit, cam, gt, cfg, backend, target.name, progress,
                                           eyes, gaussians, ign)
        synchronize(base0.device)
        seconds_colour = time.perf_counter() - t0
    # the FLAME stage moves w off the mapping network's output: no z then
    code = FittedCode(w=w_fit, z=None if cfg.space == "w" or flame_params is not None else var.detach(),
                      base_vertices=base_fit, name=target.name,
                      meta={"start": start, "space": cfg.space, "refine_geometry": bool(cfg.refine_geometry),
                            "refine_flame": flame_params is not None, "refine_colour": colour is not None,
                            "refine_rim": rim_params is not None,
                            "rim_params": None if rim_params is None else rim_params.cpu().tolist(),
                            "tracked_base_vertices": base0.detach().cpu()},
                      colour=colour, flame=target.flame if flame_params is None else flame_params.to("cpu"),
                      gaussians=gaussians)
    return FitResult(code, it, window.losses, start, start_losses, stopped, w0.detach(),
                     colour_iterations=cfg.colour_iterations if colour is not None else 0, colour_losses=colour_losses,
                     seconds_code=seconds_code, seconds_colour=seconds_colour, flame_params=flame_params,
                     flame_losses=flame_losses, seconds_flame=seconds_flame,
                     eye_term_pixels=0 if eyes is None else int(eyes.sum()),
                     rim_iterations=cfg.rim_iterations if rim_params is not None else 0, rim_params=rim_params,
                     rim_losses=rim_losses, seconds_rim=seconds_rim, seconds_start=t_capture - t_start,
                     seconds_capture=t_loop - t_capture, seconds_code_loop=t_end - t_loop)
