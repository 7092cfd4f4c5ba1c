"""Per-subject refinement of a video fit (track.py --video / --frames, issue 23), after the style fit: with the style w
fixed, jointly and with Adam, on batches of training frames,

    colour     the per-vertex RGB residual of the level-0 face-mask vertices (the colour stage of
               utils/apps/track/fit.py: Laplacian smoothness + L2 towards zero, fit.colour_* settings but the L2
               weight ``colour_weight`` of this config, weaker than the photo's; unlike the
               photo's, not held at zero on the mask's boundary rings: that cost the novel views 0.02-0.09 dB here)
    gaussians  a per-Gaussian residual (V, K, 7) of the network's pre-activation position offset, log-scale and
               opacity (models.identity_field.RESIDUAL_CHANNELS, IdentityField.add_residual): L2 towards zero (the
               prior: the frozen network's Gaussians) per group plus a Laplacian smoothness over the subdivided mesh
    gcolour    with ``gaussian_colour`` (default on): a per-Gaussian RGB residual (V, K, 3) added to every
               Gaussian's SH DC term, L2 towards zero plus a Laplacian over the subdivided mesh
               (``gaussian_colour_*``): the colour residual above lives on the level-0 vertices (2,208 for the CPU
               preset: about one per 2 x 2 pixels of a 100-pixel face) under a strong smoothness
               (fit.colour_laplacian_weight 10), and the network's colour follows the style alone, so nothing can
               draw an edge sharper than the level-0 mesh; returned inside a residual of every raw channel (V, K, C)
    shape      with ``flame_shape`` (default on): one correction of the clip's FLAME shape, shared by every frame
               (held-out frames included: it is the person's, learnt from the training frames), pulled towards the
               landmark fit (``flame_prior``, 1 shape standard deviation).  Landmarks alone leave the shape off by
               millimetres (synthetic clip: 3 mm mean after a similarity alignment, 10 mm at worst); on the novel
               cameras 42 % of the squared error then sat on the face mask's 1-pixel silhouette ring
    network    with ``network_lr`` > 0 (pivotal tuning, off by default): a copy of the synthesis network (its layers,
               head and template features; the mapping stays) tuned for this person at a low lr, optionally pulled
               towards the frozen network's output (``network_weight``); the result is returned as a (V, K, C)
               residual of every raw channel (the tuned output minus the model's for the final style, plus the
               per-Gaussian residual above), so the model itself is never changed and any code consumer applies it
    flame      every training frame's head rotation, translation, expression and jaw, as corrections of the
               landmark tracking, regularised towards it (a landmark fit is off by a few degrees)
    exposure   with ``exposure`` (on by default): every training frame's RGB gain (log gain (3,)) and with
               ``exposure_bias`` RGB offset of the render inside the face mask (:func:`apply_exposure`), pulled
               towards gain 1 / offset 0 (``exposure_prior``, scale EXPOSURE_SIGMA) and with zero mean over the
               training frames (the one gauge: a common gain would trade off against the colour residual), so the
               identity's colours keep the clip's mean exposure and not each frame's.  Held-out frames get the
               training frames' values interpolated linearly in frame number (:func:`interpolate_corrections`),
               never their own pixels; beyond the first / last training frame (``exposure_extrapolate``) by default
               the clip's mean exposure (gain 1): nothing brackets them, and a fitted frame's value also holds
               shading that changes with the head's pose (the synthetic clip, whose exposure is constant, gets
               gains of 0.96-1.04), so holding the last one's cost the synthetic clip's tail 0.3-1.3 dB
    coverage   with ``alpha_weight`` > 0 (default 5): the training frames' rendered alpha pulled to their face mask
               (mean |alpha - mask| over the pixels that are data, utils.losses.coverage_loss, as training's
               loss.alpha_weight; ``alpha_outside`` false: inside the mask only): the render is composited on black
               and the masked photo is dark in places (hair at the temple, the shadowed cheek), so the fit can make
               a pixel dark by making the face see-through; at another head pose that translucent rim lands on
               bright skin (the female clip's held-out frames in poses no training frame has: the avatar 0.07-0.10
               darker than the photo on the mask's outer ring; 0 -> 5: held-out female +0.50 dB, male +0.15)
    cut        with ``cut_photo``: where the detector's face outline cut the projected FLAME face mask and the person
               segmentation says person (hair over the temples and forehead, the neck under the chin), the target
               is the frame's own colours (data, opaque for the coverage term) instead of no data: left out, those
               Gaussians kept the network's skin colour (a pale flap at the temple where the clip shows hair);
               with ``cut_background`` the cut's pixels it calls background (beyond ``cut_background_margin`` px of
               the person) get alpha 0 in the coverage term (surface over the wall beside the male's jaw);
               with ``cut_hair`` (off) also the cut's person pixels whose chromaticity is not the face's skin
               (hair: utils.face.masks.hair_mask) get alpha 0 instead of their colour
    prune      with ``background_prune`` > 0: after the refinement, the Gaussians of every vertex whose blending
               weight over the training frames lies on the coverage term's alpha-0 pixels by more than that share
               (:func:`_vertex_observation`; the rest on data pixels) get opacity 0 (residual ``PRUNED_LOGIT``):
               the coverage term had only shrunk and dimmed them (the FLAME surface over the wall beside the male's
               jaw), and at display size they stayed a fringe of faint specks beyond the silhouette
    unobserved with ``unobserved_px`` > 0 (off): after the refinement the residuals of the vertices whose blending
               weight over the training frames' data pixels stays below it (:func:`_vertex_observation`) go back to
               zero (the prior): they only held the Laplacian's extrapolation from observed neighbours
    camera     with ``camera_focal`` / ``camera_principal`` (issue 23): the clip's one shared pinhole camera, its
               focal length (a log-scale correction) and / or principal point (a shift in units of the tracked
               focal length), pulled towards the tracked camera (``camera_prior``; sigmas FOCAL_SIGMA, PP_SIGMA).
               With ``camera_dolly`` (default) a focal change s moves every frame's head along the camera's z axis
               to s times its depth ("dolly zoom"), so the head keeps its image size and place and only the
               perspective changes: the landmarks fix the size, what they leave open is the perspective.  The
               refined camera is the clip's: held-out frames are evaluated through it too (their pixels never move
               it).  Needs a renderer backend with gradients w.r.t. the intrinsics (the torch backend; checked)

Each step renders ``batch`` training frames, each on its own (refined) FLAME, with one ``render_identities`` call.
Held-out frames are never read by the fit: their images reach only the progress bar's PSNR (under no_grad, never
used to steer anything), and their FLAME is the landmark tracking plus the correction of the neighbouring training
frames interpolated in time (``heldout_correction``): their own pixels never move their pose.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models.camera import Camera
from models.flame import FlameModel, FlameParams, FlameSubset, axis_angle_to_matrix
from models.gaussians import SH_C0, GaussianCloud
from models.geometry import UniformLaplacian
from models.identity_field import RESIDUAL_CHANNELS, full_residual
from models.renderer import render, render_identities
from utils.apps.track.config import EXPOSURE_EXTRAPOLATIONS, HELDOUT_CORRECTIONS, FitConfig, VideoRefineConfig
from utils.apps.track.fit import LossWindow, boundary_rings, photometric
from utils.data.code_file import colour_offsets, with_colour
from utils.data.model_file import TrainedModel
from utils.evaluation import View, evaluate_cloud
from utils.losses import coverage_loss, psnr

# scales of the FLAME corrections in the prior (one standard deviation each): 2 degrees of head rotation, 1 % of the
# camera distance of translation, 0.3 standard deviations of an expression coefficient, 0.05 rad of jaw rotation
ROT_SIGMA = math.radians(2.0)
TRANS_SIGMA = 0.01
EXPR_SIGMA = 0.3
JAW_SIGMA = 0.05
SHAPE_SIGMA = 1.0  # FLAME shape coefficients are in standard deviations of the shape space
# scales of the shared camera's corrections in the prior: 10 % of the focal length (log scale), a principal point
# shift of 5 % of the focal length (about 12 px for a 480 px wide clip tracked at f ~ 250 px)
FOCAL_SIGMA = 0.1
PP_SIGMA = 0.05
# scale of a frame's exposure in the prior: a log gain of 0.1 (10 %) and an offset of 0.1 of the range
EXPOSURE_SIGMA = 0.1
# background_prune: the opacity logit residual of a pruned Gaussian (sigmoid(-30) ~ 1e-13: invisible at any size)
# and the least blending weight (px, over the training frames' alpha-0 pixels) a vertex needs to be pruned at all
PRUNED_LOGIT = -30.0
PRUNE_MIN_PX = 0.1


@dataclass
class RefineResult:
    """What the refinement gives: the style w (S,) (refined with ``style_lr`` > 0, else the input), colour (M, 3)
    or None, gaussians (V, K, 7) or None ((V, K, C) of every raw channel with pivotal tuning), FlameParams (T = 1)
    and level-0 face-mask vertices (M, 3) of every frame (training frames refined, held-out frames corrected from their
    neighbours), losses, held-out PSNR history (progress bar only), the corrections' sizes and the shared camera's
    correction (``camera``: focal_scale s and principal_shift (2,) in tracked-focal units; identity when not
    refined; :func:`refined_camera` applies it) and the per-frame exposure (``exposure``: frame number -> (2, 3)
    [gain; offset], training frames fitted, held-out frames interpolated; None when not fitted)."""

    w: Tensor
    colour: Tensor | None
    gaussians: Tensor | None
    params: dict[int, FlameParams]
    bases: dict[int, Tensor]
    losses: list[float] = field(default_factory=list)
    heldout_psnr_history: list[float] = field(default_factory=list)
    correction: dict = field(default_factory=dict)
    camera: dict = field(default_factory=lambda: {"focal_scale": 1.0, "principal_shift": [0.0, 0.0]})
    exposure: dict[int, Tensor] | None = None


def apply_exposure(image: Tensor, mask: Tensor, gain: Tensor, bias: Tensor | None = None) -> Tensor:
    """``image`` (..., h, w, 3) times ``gain`` (..., 3) plus ``bias`` (..., 3) inside ``mask`` (..., h, w, 1), unchanged
    outside it: the camera's exposure acts where the photo is data; outside the face mask the photo is black only
    because the mask cut it."""
    out = image * (1.0 + mask * (gain[..., None, None, :] - 1.0))
    return out if bias is None else out + mask * bias[..., None, None, :]


def refined_camera(camera: Camera, focal_scale: float | Tensor, principal_shift, focal: float) -> Camera:
    """``camera`` (a crop of the clip's tracked camera) with the shared camera's correction: fx, fy times
    ``focal_scale`` and the principal point shifted by ``principal_shift`` (2,) x ``focal`` pixels (the tracked
    focal length).  Differentiable in ``focal_scale`` / ``principal_shift`` (tensors) for the refinement."""
    K = camera.K
    s = torch.as_tensor(focal_scale, dtype=K.dtype, device=K.device)
    d = torch.as_tensor(principal_shift, dtype=K.dtype, device=K.device) * focal
    row0 = torch.stack([K[0, 0] * s, K[0, 1] * s, K[0, 2] + d[0]])
    row1 = torch.stack([K[1, 0], K[1, 1] * s, K[1, 2] + d[1]])
    return Camera(torch.stack([row0, row1, K[2]]), camera.w2c, camera.width, camera.height, camera.name)


def interpolate_corrections(train: list[int], held: list[int], values: Tensor) -> Tensor:
    """(len(held), ...) per-frame corrections of the held-out frames: ``values`` (len(train), ...) of the training
    frames linearly interpolated in frame number (constant beyond the first / last training frame)."""
    if not held:
        return values.new_zeros((0, *values.shape[1:]))
    x = np.asarray(train, dtype=np.float64)
    flat = values.detach().reshape(len(train), -1).cpu().numpy()
    out = np.stack([np.interp(np.asarray(held, dtype=np.float64), x, flat[:, j]) for j in range(flat.shape[1])], 1)
    return torch.as_tensor(out, dtype=values.dtype, device=values.device).reshape(len(held), *values.shape[1:])


class _FrameCorrections(torch.nn.Module):
    """Corrections of the tracked FLAME of n frames: rotation (axis-angle, applied before the tracked rotation),
    translation (in camera distances), expression and jaw per frame, one shape correction (1, 300) shared by
    every frame (the clip's one person), and the shared camera's log focal scale (1,) and principal point shift (2,)
    (tracked-focal units); zero at the start.  ``w2c`` (4, 4): the clip's camera, for the dolly (``dolly``: a focal
    scale s moves each head to s times its camera-space depth)."""

    def __init__(self, params: FlameParams, distance: float, rot: bool, trans: bool, expr: bool, jaw: bool,
                 zero_mean: bool = False, shape: bool = False, focal: bool = False, principal: bool = False,
                 w2c: Tensor | None = None, dolly: bool = False) -> None:
        super().__init__()
        n, dev = params.num_frames, params.device
        self.params, self.distance, self.zero_mean, self.dolly = params, distance, zero_mean, dolly
        self.w2c = None if w2c is None else w2c.to(dev)
        self.rot = torch.nn.Parameter(torch.zeros(n, 3, device=dev), requires_grad=rot)
        self.trans = torch.nn.Parameter(torch.zeros(n, 3, device=dev), requires_grad=trans)
        self.expr = torch.nn.Parameter(torch.zeros_like(params.expression), requires_grad=expr)
        self.jaw = torch.nn.Parameter(torch.zeros(n, 3, device=dev), requires_grad=jaw)
        self.shape = torch.nn.Parameter(torch.zeros_like(params.shape), requires_grad=shape)
        self.focal = torch.nn.Parameter(torch.zeros(1, device=dev), requires_grad=focal)
        self.principal = torch.nn.Parameter(torch.zeros(2, device=dev), requires_grad=principal)

    def posed(self, idx: Tensor | list[int] | None = None, values: dict[str, Tensor] | None = None) -> FlameParams:
        """The corrected FlameParams of frames ``idx`` (all: None), with ``values`` instead of the parameters."""
        v = values or self.values()
        p = self.params if idx is None else self.params.frames(idx)
        pick = (lambda x: x) if idx is None or values is not None else (lambda x: x[idx])
        trans = p.translation + pick(v["trans"]) * self.distance  # (n, 3) world
        if self.dolly and self.w2c is not None and "focal" in v:
            # dolly zoom: focal x s and each head at s times its camera-space depth keep its image size
            R, t = self.w2c[:3, :3], self.w2c[:3, 3]
            z = (trans @ R.T + t)[:, 2:3]  # (n, 1) camera-space depth of the head
            s = v["focal"].exp()
            trans = trans + ((s - 1.0) * z) * R[2][None]  # camera z axis in world = R's third row
        return replace(p, rotation_matrix=axis_angle_to_matrix(pick(v["rot"])) @ p.rotation_matrix,
                       translation=trans, expression=p.expression + pick(v["expr"]), jaw=p.jaw + pick(v["jaw"]),
                       shape=p.shape + v["shape"])

    def values(self) -> dict[str, Tensor]:
        """The corrections (n, ...) by name; with ``zero_mean`` the head rotation and translation minus their mean
        over the frames (a common shift of every frame's head would trade off against the per-Gaussian residual)."""
        v = {"rot": self.rot, "trans": self.trans, "expr": self.expr, "jaw": self.jaw, "shape": self.shape,
             "focal": self.focal, "principal": self.principal}
        if self.zero_mean:
            v["rot"], v["trans"] = self.rot - self.rot.mean(0), self.trans - self.trans.mean(0)
        return v

    def prior(self, idx: list[int]) -> Tensor:
        """Mean over frames ``idx`` of the squared corrections in units of their scales (ROT_SIGMA, ...), plus the
        shared shape correction's."""
        v = self.values()
        per_frame = ((v["rot"][idx] / ROT_SIGMA).square().sum(-1) + (v["trans"][idx] / TRANS_SIGMA).square().sum(-1)
                     + (v["expr"][idx] / EXPR_SIGMA).square().sum(-1) + (v["jaw"][idx] / JAW_SIGMA).square().sum(-1))
        return per_frame.mean() + (v["shape"] / SHAPE_SIGMA).square().sum()

    def camera_prior(self) -> Tensor:
        """The shared camera's squared corrections in units of FOCAL_SIGMA (log focal) and PP_SIGMA."""
        return (self.focal / FOCAL_SIGMA).square().sum() + (self.principal / PP_SIGMA).square().sum()

    def camera(self, camera: Camera, focal: float) -> Camera:
        """``camera`` (a crop of the tracked one, tracked focal length ``focal``) with the current correction."""
        return refined_camera(camera, self.focal.exp()[0], self.principal, focal)


def colour_residual(rgb: Tensor, channels: int) -> Tensor:
    """A per-Gaussian RGB residual (V, K, 3) in colour units as a residual of every raw channel (V, K, ``channels``):
    zero except the SH DC term (raw channels 3..5, after the 3 offset channels; models.identity_field.full_residual's
    layout), which holds ``rgb / SH_C0`` (a Gaussian's colour is 0.5 + SH_C0 * DC with sh_degree 0)."""
    z = rgb.new_zeros(*rgb.shape[:-1], channels)
    return torch.cat([z[..., :3], rgb / SH_C0, z[..., 6:]], -1)


def _vertex_observation(model: TrainedModel, clouds: list[GaussianCloud], cameras: list[Camera],
                        pixels: list[Tensor], backend: str = "auto") -> Tensor:
    """(V,) per vertex of the subdivided mesh: how much the frames saw it, the largest over its K Gaussians of the
    sum over frames of the Gaussian's blending weight (alpha x transmittance) over ``pixels`` (h, w) weights of each
    frame (``clouds``: each frame's unbatched Gaussians, ``cameras``: its camera); in pixels.  Computed as the
    gradient of the weighted rendered colour w.r.t. a per-Gaussian colour offset (one render per frame)."""
    f = model.field
    gvid = f.gaussian_vertex_ids
    obs = torch.zeros(len(gvid), device=gvid.device)
    for cloud, cam, w in zip(clouds, cameras, pixels):
        o = torch.zeros(len(gvid), 1, device=gvid.device, requires_grad=True)
        with torch.enable_grad():
            img = render(with_colour(cloud, o.expand(-1, 3)), cam, backend=backend)["image"]
            (img.mean(-1) * w).sum().backward()
        obs += o.grad[:, 0].clamp_min(0)
    return torch.zeros(f.num_vertices, device=obs.device).scatter_reduce(0, gvid, obs, "amax")


def _batches(n: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        for a in range(0, n, batch):
            yield perm[a:a + batch]


def refine_video(model: TrainedModel, w: Tensor, flame: FlameModel, train: list[int], held: list[int],
                 params: dict[int, FlameParams], views: dict[int, View],
                 fit: FitConfig, cfg: VideoRefineConfig, batch: int, backend: str = "auto", progress: bool = True,
                 monitor: dict[int, View] | None = None, ignore: dict[int, Tensor] | None = None,
                 cut_targets: dict[int, Tensor] | None = None) -> RefineResult:
    """The refinement of the module docstring for style ``w`` (S,).

    Args:
        train, held: frame numbers of the training and held-out frames.
        params: FlameParams (T = 1, root pivot baked) of every frame in train + held (the landmark tracking).
        views: the TRAINING frames' views (camera, masked photo (h, w, 3), face mask): the only pixels the fit reads.
        fit: the fit's settings (loss, colour stage weights, Adam betas, lr decay, check_every).
        cfg: this stage's settings (VideoRefineConfig).
        batch: training frames per step (``cfg.batch`` when > 0, else this).
        monitor: held-out views whose face-mask PSNR the progress bar shows (read only).
        ignore: the training frames' no-data pixels ((h, w, 1), 1 = left out of the loss; video.no_data_mask), or
            None (every pixel is data).
        cut_targets: with ``cfg.cut_photo``, per training frame (h, w, 4): the frame's own colours (RGB) and a
            weight (1: fitted to them) on the person's pixels that the face outline cut from the projected face
            mask (hair, neck): there the target is the frame (not the masked photo's black), the pixel is data and,
            for the coverage term, inside (the surface is there, covered); with ``cfg.cut_background`` a 5th
            channel: the cut's background pixels (1: the coverage term pulls alpha to 0 there); None: off.
    Returns:
        RefineResult.
    """
    if set(views) != set(train) or set(views) & set(held):
        raise ValueError("refine_video: views must be exactly the training frames (held-out pixels never reach the "
                         "fit)")
    if cfg.heldout_correction not in HELDOUT_CORRECTIONS:
        raise ValueError(f"video_refine.heldout_correction must be one of {HELDOUT_CORRECTIONS}, got "
                         f"{cfg.heldout_correction!r}")
    if cfg.exposure_extrapolate not in EXPOSURE_EXTRAPOLATIONS:
        raise ValueError(f"video_refine.exposure_extrapolate must be one of {EXPOSURE_EXTRAPOLATIONS}, got "
                         f"{cfg.exposure_extrapolate!r}")
    dev = w.device
    f = model.field.eval()
    for p in f.parameters():
        p.requires_grad_(False)
    batch = cfg.batch if cfg.batch > 0 else max(1, batch)
    face = FlameSubset(flame, model.mask_ids).to(dev)
    tp = FlameParams.cat([params[t].to(dev) for t in train])
    cam0 = views[train[0]].camera
    distance = float((cam0.center.to(dev) - tp.translation[0]).norm())
    fl = cfg.flame and cfg.iterations > 0
    fs = cfg.flame_shape and cfg.iterations > 0  # the shared shape: on its own or with the per-frame corrections
    cf, cp = cfg.camera_focal and cfg.iterations > 0, cfg.camera_principal and cfg.iterations > 0
    focal0 = cam0.fx  # the tracked focal length (crops shift the principal point only)
    dolly = cf and cfg.camera_dolly
    corr = _FrameCorrections(tp, distance, fl and cfg.flame_rotation, fl and cfg.flame_translation,
                             fl and cfg.flame_expression, fl and cfg.flame_jaw, cfg.flame_zero_mean,
                             fs, cf, cp, cam0.w2c, dolly).to(dev)

    def camera_of(view: View) -> Camera:
        """The view's camera with the shared camera's current correction (as tracked when it is not refined)."""
        return corr.camera(view.camera, focal0) if cf or cp else view.camera
    wvar = w.detach().clone().requires_grad_(cfg.style_lr > 0)
    with torch.no_grad():
        raw0 = f.synthesize_raw(w[None]).float()  # (1, V, K, C): with the style fixed the network runs once
    M = len(model.mask_ids)
    use_colour = bool(fit.refine_colour and fit.colour_iterations > 0)  # fit.colour_iterations 0: no colour residual
    colour = torch.zeros(M, 3, device=dev, requires_grad=use_colour)
    gauss = torch.zeros(f.num_vertices, f.K, len(RESIDUAL_CHANNELS), device=dev, requires_grad=bool(cfg.gaussians))
    gcol = torch.zeros(f.num_vertices, f.K, 3, device=dev, requires_grad=bool(cfg.gaussian_colour))
    # per-frame exposure of the training frames: log gain and offset, zero-mean over the frames (the gauge)
    ex = cfg.exposure and cfg.iterations > 0
    log_gain = torch.zeros(len(train), 3, device=dev, requires_grad=ex)
    ebias = torch.zeros(len(train), 3, device=dev, requires_grad=ex and cfg.exposure_bias)

    def exposure_values() -> tuple[Tensor, Tensor]:
        """(log gains (n, 3), offsets (n, 3)) of the training frames, each minus its mean over the frames."""
        return log_gain - log_gain.mean(0), ebias - ebias.mean(0)
    groups = []
    # pivotal tuning: the person's own copy of the synthesis network (the model's stays frozen and shared)
    tune = cfg.network_lr > 0
    net = copy.deepcopy(f) if tune else f
    tuned = [p for name, p in net.named_parameters()
             if name.startswith(("synthesis.", "head.", "template_features"))] if tune else []
    for p in tuned:
        p.requires_grad_(True)
    if use_colour:
        groups.append({"params": [colour], "lr": fit.colour_lr})
    if cfg.gaussians:
        groups.append({"params": [gauss], "lr": cfg.gaussian_lr})
    if cfg.gaussian_colour:
        groups.append({"params": [gcol], "lr": cfg.gaussian_colour_lr})
    if cfg.style_lr > 0:
        groups.append({"params": [wvar], "lr": cfg.style_lr})
    if tune:
        groups.append({"params": tuned, "lr": cfg.network_lr})
    if fl:
        groups += [{"params": [corr.rot, corr.jaw], "lr": cfg.flame_lr},
                   {"params": [corr.trans], "lr": cfg.flame_lr},
                   {"params": [corr.expr], "lr": cfg.flame_expression_lr}]
    if fs:
        groups.append({"params": [corr.shape], "lr": cfg.flame_shape_lr})
    if cf or cp:
        groups.append({"params": [q for q, on in ((corr.focal, cf), (corr.principal, cp)) if on],
                       "lr": cfg.camera_lr})
    if ex:
        groups.append({"params": [log_gain, ebias] if cfg.exposure_bias else [log_gain], "lr": cfg.exposure_lr})
    for g in groups:
        g["initial_lr"] = g["lr"]
    # the outline's cut on the person (cut_photo): per training frame (h, w, 4 or 5), or None when off
    cut = cut_targets if cfg.cut_photo else None
    lap0 = UniformLaplacian(M, model.base_faces, dev)
    lapv = (UniformLaplacian(f.num_vertices, f.faces.cpu().numpy(), dev) if cfg.gaussians or cfg.gaussian_colour
            else None)
    # the per-Gaussian residual held at zero on the mesh's boundary rings (gaussian_boundary_rings): (V, 1, 1) 0 / 1
    hold = None
    if cfg.gaussians and cfg.gaussian_boundary_rings > 0:
        rim = boundary_rings(f.num_vertices, f.faces.cpu().numpy(), cfg.gaussian_boundary_rings).to(dev)
        hold = torch.ones(f.num_vertices, 1, len(RESIDUAL_CHANNELS), device=dev)
        held_ch = torch.tensor([c.startswith("log_scale") or not cfg.gaussian_boundary_scale_only
                             for c in RESIDUAL_CHANNELS], device=dev)
        hold[rim[:, None, None] & held_ch] = 0.0
    gw = torch.tensor([cfg.offset_weight] * 3 + [cfg.scale_weight] * 3 + [cfg.opacity_weight], device=dev)

    def network_raw() -> Tensor:
        """(1, V, K, C) raw output for the current style: the tuned copy's with pivotal tuning, else the model's."""
        if tune:
            return net.synthesize_raw(wvar[None]).float()
        return f.synthesize_raw(wvar[None]).float() if cfg.style_lr > 0 else raw0

    def clouds(params_b: FlameParams, col: Tensor | None, gs: Tensor | None, raw: Tensor | None = None
               ) -> GaussianCloud:
        raw = network_raw() if raw is None else raw
        raw = raw if gs is None else f.add_residual(raw, gs)
        if cfg.gaussian_colour:
            raw = raw + colour_residual(gcol, f.channels)
        c = f.attach(raw, model.vertices(face(params_b)))  # (B, N)
        return c if col is None else with_colour(c, colour_offsets(model, col))

    def held_params() -> dict[int, FlameParams]:
        """Held-out frames: tracked FLAME + the training frames' corrections interpolated in time."""
        if not held:
            return {}
        hp = FlameParams.cat([params[t].to(dev) for t in held])
        vals = corr.values()
        # the shared shape correction is the person's (learnt from the training frames): every frame gets it
        # as is the shared camera (its focal length and the dolly of every head)
        shared = ("shape", "focal", "principal")
        if cfg.heldout_correction == "interpolate":
            vals = {k: v if k in shared else interpolate_corrections(train, held, v) for k, v in vals.items()}
        else:  # "none": the landmark tracking as is (and the shared shape and camera)
            vals = {k: v if k in shared else torch.zeros((len(held), *v.shape[1:]), device=dev)
                    for k, v in vals.items()}
        hc = _FrameCorrections(hp, distance, False, False, False, False, w2c=cam0.w2c, dolly=dolly)
        p = hc.posed(None, vals)
        return {t: p.frame(i) for i, t in enumerate(held)}

    def held_exposure() -> dict[int, Tensor]:
        """Held-out frames' (2, 3) [gain; offset]: the training frames' interpolated in time (log gain linearly);
        outside the training frames' span the mean exposure (zero: the gauge) or the nearest one's."""
        g, b = exposure_values()
        g, b = interpolate_corrections(train, held, g), interpolate_corrections(train, held, b)
        if cfg.exposure_extrapolate == "mean":
            out = torch.tensor([t < min(train) or t > max(train) for t in held], device=dev)[:, None]
            g, b = g.masked_fill(out, 0.0), b.masked_fill(out, 0.0)
        return {t: torch.stack([g[i].exp(), b[i]]) for i, t in enumerate(held)}

    @torch.no_grad()
    def monitor_psnr() -> float:
        hp, gs, col = held_params(), gauss if cfg.gaussians else None, colour if use_colour else None
        he = held_exposure() if ex else {}
        vals = []
        for t in held:
            v = replace(monitor[t], camera=camera_of(monitor[t]))
            m, r = evaluate_cloud(clouds(hp[t], col, gs)[0], [v], backend=backend)
            if t in he:  # the interpolated exposure, as the evaluation applies it (face PSNR only: a progress bar)
                r = apply_exposure(r[0], v.mask, he[t][0], he[t][1]).clamp(0, 1)
                m = {"psnr_face_all": float(psnr(r, v.image, mask=v.mask))}
            vals.append(m["psnr_face_all"])
        return float(np.mean(vals))

    def _observed_pixels(i: int) -> Tensor:
        """(h, w) training frame i's pixels whose colour the fit reads: the face mask (and with cut_photo the
        outline's cut on the person) minus the no-data pixels."""
        t = train[i]
        m = views[t].mask[..., 0]
        keep = torch.ones_like(m) if ignore is None else 1.0 - ignore[t][..., 0]
        if cut is not None:
            cw1 = cut[t][..., 3]
            m, keep = torch.maximum(m, cw1), torch.maximum(keep, cw1)
        return m * keep

    n = cfg.iterations if groups else 0
    opt = torch.optim.Adam(groups, betas=(fit.beta1, fit.beta2)) if n else None
    hist: list[float] = []
    window = LossWindow(w.device, fit.check_every, "video refinement",
                        "lower --video_refine.gaussian_lr / --video_refine.flame_lr / --fit.colour_lr")
    batches = _batches(len(train), batch, seed=2)
    bar = tqdm(range(n), desc=f"refining ({len(train)} frames)", disable=not progress, leave=False)
    for it in bar:
        mult = fit.lr_final_ratio ** (it / max(1, n - 1))
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * mult
        idx = next(batches)
        col = colour if use_colour else None
        raw_t = network_raw()
        c = clouds(corr.posed(idx), col, gauss if cfg.gaussians else None, raw_t)
        out = render_identities(c, [[camera_of(views[train[i]])] for i in idx], backend=backend, depth=False)
        pred = out["image"][:, 0]  # (B, h, w, 3)
        gt = torch.stack([views[train[i]].image for i in idx])
        # the batch's face masks (B, h, w, 1), for the exposure and the coverage term
        mb = torch.stack([views[train[i]].mask for i in idx]) if ex or cfg.alpha_weight > 0 else None
        if ex:  # the frames' camera exposure on the render, so that the identity need not absorb it
            eg, eb = exposure_values()
            pred = apply_exposure(pred, mb, eg[idx].exp(), eb[idx] if cfg.exposure_bias else None)
        # no data there: the target stands in for the render (no gradient, no error)
        ign = None if ignore is None else torch.stack([ignore[train[i]] for i in idx])
        ct = None if cut is None else torch.stack([cut[train[i]] for i in idx])  # (B, h, w, 4 or 5)
        if ct is not None:  # the outline's cut on the person: the frame's own colours
            cw_ = ct[..., 3:4]
            gt = gt + cw_ * (ct[..., :3] - gt)
            ign = None if ign is None else ign * (1.0 - cw_)
            mb = None if mb is None else torch.maximum(mb, cw_)
        loss = photometric(pred, gt, fit, None, ignore=ign)
        total = loss
        if cfg.alpha_weight > 0:  # an opaque face inside the mask (not dark by being see-through), none outside it
            # alpha_outside false: the pixels outside the mask are left out too (only the inside is pulled to 1)
            cov_ignore = ign if cfg.alpha_outside else (1.0 - mb if ign is None else torch.maximum(ign, 1.0 - mb))
            if ct is not None and (cfg.cut_background or cfg.cut_hair) and ct.shape[-1] > 4:
                # the cut's background (and with cut_hair its hair) pixels: data for the coverage term, target
                # alpha 0 (mb is 0 there)
                bgc = ct[..., 4:5]
                cov_ignore = None if cov_ignore is None else cov_ignore * (1.0 - bgc)
            total = total + cfg.alpha_weight * coverage_loss(out["alpha"][:, 0], mb, cov_ignore)
        if use_colour:
            total = total + lap0.penalty(colour, fit.colour_laplacian_weight, cfg.colour_weight)
        if cfg.gaussians:
            gv = gauss.reshape(f.num_vertices, -1, len(RESIDUAL_CHANNELS))
            total = (total + (gv.square() * gw).sum(-1).mean()
                     + cfg.gaussian_laplacian_weight * lapv(gv.reshape(f.num_vertices, -1)).square().sum(-1).mean())
        if cfg.gaussian_colour:
            gc = gcol.reshape(f.num_vertices, -1)
            total = (total + cfg.gaussian_colour_weight * gc.square().sum(-1).mean()
                     + cfg.gaussian_colour_laplacian_weight * lapv(gc).square().sum(-1).mean())
        if fl or fs:  # corrections that are not refined stay zero and cost nothing
            total = total + cfg.flame_prior * corr.prior(idx)
        if cf or cp:
            total = total + cfg.camera_prior * corr.camera_prior()
        if ex:
            total = total + cfg.exposure_prior * ((eg[idx] / EXPOSURE_SIGMA).square().sum(-1)
                                                  + (eb[idx] / EXPOSURE_SIGMA).square().sum(-1)).mean()
        if cfg.style_lr > 0:
            total = total + fit.style_reg * (wvar - w).square().mean()
        if tune and cfg.network_weight > 0:  # the tuned output pulled towards the frozen network's (same style)
            with torch.no_grad():
                raw_f = f.synthesize_raw(wvar[None]).float() if cfg.style_lr > 0 else raw0
            total = total + cfg.network_weight * (raw_t - raw_f).square().mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        if it == 0 and (cf or cp) and all(q.grad is None for q in (corr.focal, corr.principal)):
            raise ValueError(f"--video_refine.camera_focal / camera_principal need a renderer backend with gradients "
                             f"w.r.t. the camera intrinsics (the torch backend: --backend torch); {backend!r} gives "
                             f"none")
        opt.step()
        if hold is not None:  # Adam moves the held entries (momentum); put them back before the next render
            with torch.no_grad():
                gauss.mul_(hold)
        cur = window.add(loss, it + 1, last=it + 1 == n)
        if cur is not None:
            post = {"loss": f"{cur:.4f}"}
            if monitor:
                hist.append(monitor_psnr())
                post["heldout_psnr"] = f"{hist[-1]:.2f}"
            bar.set_postfix(post)
    bar.close()

    n_unobserved = None
    if cfg.unobserved_px > 0 and n:
        # vertices the training frames never showed as data: their residuals are only the Laplacian's extrapolation
        # from observed neighbours; they go back to the prior (zero)
        with torch.no_grad():
            raw_f = network_raw()
            fitted = [clouds(corr.posed([i]), colour if use_colour else None, gauss if cfg.gaussians else None,
                             raw_f)[0] for i in range(len(train))]
            cams = [camera_of(views[t]) for t in train]
        obs_v = _vertex_observation(model, fitted, cams, [_observed_pixels(i) for i in range(len(train))], backend)
        with torch.no_grad():
            un_v = obs_v < cfg.unobserved_px
            gauss[un_v] = 0.0
            gcol[un_v] = 0.0
            x = torch.zeros(M, 1, device=dev, requires_grad=True)
            with torch.enable_grad():  # level-0 vertex j: sum over subdivided vertices of (its weight there x obs)
                (model.vertices(x.expand(M, 3))[:, 0] * obs_v).sum().backward()
            colour[x.grad[:, 0] < cfg.unobserved_px] = 0.0
            n_unobserved = int(un_v.sum())

    n_pruned = None
    if cfg.background_prune > 0 and n and cfg.gaussians and cut is not None and cut[train[0]].shape[-1] > 4:
        # Gaussians the training frames show (almost) only where the frame is background (the cut's background,
        # and with cut_hair its hair; the coverage term's alpha-0 pixels): the coverage term only shrank and dimmed
        # them, and at display size they stay a fringe of faint specks beyond the silhouette; opacity 0 instead
        with torch.no_grad():
            raw_f = network_raw()
            fitted = [clouds(corr.posed([i]), colour if use_colour else None, gauss, raw_f)[0]
                      for i in range(len(train))]
            cams = [camera_of(views[t]) for t in train]
        seen = _vertex_observation(model, fitted, cams, [_observed_pixels(i) for i in range(len(train))], backend)
        empty = _vertex_observation(model, fitted, cams, [cut[t][..., 4] for t in train], backend)
        with torch.no_grad():
            gone = (empty > cfg.background_prune * (empty + seen)) & (empty > PRUNE_MIN_PX)
            gauss[gone, ..., RESIDUAL_CHANNELS.index("opacity_logit")] = PRUNED_LOGIT
            n_pruned = int(gone.sum())

    with torch.no_grad():
        ptrain = corr.posed()
        out_params = {t: ptrain.frame(i) for i, t in enumerate(train)}
        out_params.update(held_params())
        out_params = {t: replace(p, **{k: getattr(p, k).detach().clone() for k in FlameParams._TENSORS
                                       if k != "shape"}) for t, p in out_params.items()}
        bases = {t: face(p)[0] for t, p in out_params.items()}
        cv = corr.values()
        stats = {"unobserved_vertices": n_unobserved, "pruned_vertices": n_pruned,
                 "rotation_deg_mean": float(cv["rot"].norm(dim=-1).mean()) * 180 / math.pi,
                 "rotation_deg_max": float(cv["rot"].norm(dim=-1).max()) * 180 / math.pi,
                 "translation_mm_mean": 1000 * float((cv["trans"] * distance).norm(dim=-1).mean()),
                 "expression_rms": float(cv["expr"].square().mean().sqrt()),
                 "jaw_rad_mean": float(cv["jaw"].norm(dim=-1).mean()),
                 "shape_rms": float(cv["shape"].square().mean().sqrt()),
                 "shape_norm": float(cv["shape"].norm())}
        residual = gauss.detach() if cfg.gaussians and n else None
        if tune and n:  # the tuning baked into a residual of every raw channel for the final style
            delta = (net.synthesize_raw(wvar[None]) - f.synthesize_raw(wvar[None]))[0].float()
            residual = delta if residual is None else delta + full_residual(residual, f.channels)
            stats["network_delta_rms"] = float(delta.square().mean().sqrt())
        if cfg.gaussian_colour and n:  # the per-Gaussian RGB residual joins the residual of every raw channel
            cres = colour_residual(gcol.detach(), f.channels)
            residual = cres if residual is None else full_residual(residual, f.channels) + cres
            stats["gaussian_colour_rms"] = float(gcol.detach().square().mean().sqrt())
        cam = {"focal_scale": float(corr.focal.exp()), "principal_shift": [float(x) for x in corr.principal],
               "focal_px": focal0 * float(corr.focal.exp()), "tracked_focal_px": focal0,
               "principal_shift_px": [focal0 * float(x) for x in corr.principal], "dolly": dolly}
        exposure = None
        if ex and n:
            g, b = exposure_values()
            exposure = {t: torch.stack([g[i].exp(), b[i]]).detach().clone() for i, t in enumerate(train)}
            exposure.update(held_exposure())
    return RefineResult(wvar.detach().clone(), colour.detach() if use_colour and n else None,
                        residual, out_params, bases, window.losses, hist, stats, cam, exposure)
