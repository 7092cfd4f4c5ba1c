"""Configuration of track.py: the fit of one identity (FitConfig), what is written (ExportConfig) and the
inputs and outputs of a run (TrackConfig), as plain dataclasses that every stage of the tracking application
(targets, fit, export, pipeline, video) imports from here."""

from __future__ import annotations

from dataclasses import dataclass, field

from utils.core.config import Range
from utils.data.nersemble import FRONTAL_SERIAL
from utils.face.flame_fit import FlameFitConfig

INITS = ("auto", "encoder", "best", "mean", "mean_code", "w_avg", "mean_w")


SPACES = ("w", "z")
COLOUR_SOLVERS = ("adam", "lbfgs")
OPTIMIZERS = ("adam", "lbfgs")


@dataclass
class FitConfig:
    """Optimisation of one identity (the network stays frozen)."""

    space: str = "w"  # optimised vector: w (style, more expressive) or z (latent code, stays on the code manifold)
    # start: encoder (the model's feed-forward encoder on the photo), mean (= mean_code), w_avg, mean_w (the mean
    # training style), best (the best of them on the photo), auto (the encoder when the model has one, else best)
    init: str = "auto"  # start: encoder, mean, best, auto (encoder if present, else best), w_avg, mean_w, a code.pt
    iterations: int = 100  # maximum Adam iterations
    # The code stage's optimiser: adam (fit.lr, fit.lr_final_ratio, fit.beta1/2), or lbfgs: L-BFGS with unit steps and
    # no line search, so no host synchronisation (utils/apps/track/lbfgs.py SyncFreeLBFGS); it reaches the long fit's
    # result in far fewer iterations (benchmarks/results/t-fitfast_cpu_2026-12-07h.md); lr / betas are not used then
    optimizer: str = "adam"  # code stage optimiser: adam or lbfgs (not with refine_geometry)
    lbfgs_history: int = 10  # lbfgs: curvature pairs kept (the last this many steps)
    lbfgs_max_step: float = 0.5  # lbfgs: cap on every step's largest coordinate change and the first step's (0: none)
    lr: float = 0.2  # Adam learning rate of the code / style
    lr_final_ratio: float = 0.05  # the learning rate decays exponentially to lr * this at the last iteration
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.99  # Adam beta2
    check_every: int = 10  # early-stopping test every k iterations (the only host synchronisation of the loop)
    patience: int = 2  # stop after this many tests in a row without min_rel_improvement of the windowed loss
    min_rel_improvement: float = 0.005  # relative loss improvement that counts as progress
    min_iterations: int = 30  # never stop before this many iterations
    l1_weight: float = 0.8  # weight of L1 (paper: 0.8)
    ssim_weight: float = 0.2  # weight of 1 - SSIM (paper: 0.2)
    # An extra L1 term inside the fitted view's eye regions (utils/face/regions.py): the eyes are ~1 % of the face's
    # pixels, and without it one-view fits at full resolution left the unseen views' eyes 4-5.5 dB below the face
    # and gave them the iris of the nearest training identities.  Weighted lightly in the code stage (a heavier weight
    # moved the whole head's code: face PSNR -0.1..-0.4 dB) and strongly in the colour stage, whose per-vertex
    # residual paints the iris without touching the rest of the face (benchmarks/results/eyes_h200_colour.md).
    # The term is a mean over the eye pixels, so on a small face each eye pixel weighs more: at eyes a few pixels
    # wide (CPU preset, ~70x100 photos) the colour stage's full weight fitted noise and lowered the unseen eyes'
    # PSNR.  Rather than switching the term off below a size (it was off below 1,000 eye pixels), each stage's weight
    # is scaled by min(1, eye pixels / its *_eye_pixels): a fixed weight per eye pixel on small faces, the full weight
    # on large ones (benchmarks/fit_ablation.py, tests/test_fitting.py).
    eye_weight: float = 0.3  # weight of the L1 term inside the photo's eye regions in the code fit (0: off)
    colour_eye_weight: float = 10.0  # the eye term's weight in the colour stage (0: off)
    eye_pixels: int = 0  # code stage: the eye weight is scaled by min(1, eye pixels / this) (0: never scaled)
    colour_eye_pixels: int = 4000  # colour stage: colour_eye_weight scaled by min(1, eye pixels / this) (0: never)
    eye_min_pixels: int = 0  # the eye term is left out when the fitted view's eye regions hold fewer pixels (0: never)
    style_reg: float = 0.01  # weight of the mean squared distance of w from its start (w space only; 0: off)
    refine_geometry: bool = False  # also optimise small offsets of the base (level-0) face-mask vertices
    geometry_lr: float = 2e-4  # Adam learning rate of the vertex offsets, in metres
    laplacian_weight: float = 100.0  # weight of the squared uniform Laplacian of the offsets (edge-length units)
    offset_weight: float = 1.0  # weight of the squared offsets (edge-length units)
    refine_colour: bool = True  # after the code fit: a regularised per-vertex RGB residual of the level-0 vertices
    #                             (upsampled like the geometry, added to the Gaussians' colour; network not re-run)
    colour_iterations: int = 40  # Adam iterations of the colour stage (a fixed count; 0 skips the stage)
    colour_lr: float = 0.05  # Adam learning rate of the residual (RGB units, colours in [0, 1]); decays like fit.lr
    colour_laplacian_weight: float = 10.0  # weight of the squared uniform Laplacian of the residual (smoothness)
    colour_weight: float = 1.0  # weight of the squared residual (keeps it small; unseen vertices stay near 0)
    # The colour stage's optimiser: adam, or lbfgs (utils/apps/track/lbfgs.py SyncFreeLBFGS, steps capped at colour_lr
    # per RGB entry, fit.lbfgs_history pairs): it lowers the loss at every step where Adam's first steps overshoot
    colour_solver: str = "adam"  # colour stage optimiser: adam or lbfgs
    # The Gaussians on the face mask's open boundary (outer rim, lid and lip margins) straddle its silhouette: colour
    # on them spills onto the black background of the unseen views (benchmarks/results/fit_ablation_cpu_fixed.md).
    colour_boundary_rings: int = 2  # colour residual held at 0 on the mask's open boundary + (this - 1) rings (0: off)
    # The photos are black outside the face mask; a model trained with loss.rim_band (CPU preset) paints its boundary
    # Gaussians a pixel or two past it, and on the unseen views that ring held most of a fit's whole-image error
    # (benchmarks/results/fit_ablation_cpu_rim_2026-12-05.md).  The rim stage fits, on the photo, one opacity-logit and
    # one log-scale shift per ring of the mask's open boundary, shared along the whole boundary (utils/apps/track/fit.py
    # fit_rim), stored as the code's per-Gaussian residual (FittedCode.gaussians).  Off by default: on the rim model
    # (2026-12-05) it lowered the unseen views' face-mask PSNR by 2.3 / 2.4 dB (a fainter rim darkens the face's edge)
    # and left the whole image within 0.1 dB; the code stage already pulls the spill back (see that results file).
    refine_rim: bool = False  # after the code fit: the rim stage (off: it did not help, see below)
    rim_rings: int = 2  # rings of the subdivided mesh from the open boundary that get a correction (one per ring)
    rim_iterations: int = 30  # Adam iterations of the rim stage (0 skips it)
    rim_lr: float = 0.1  # Adam lr of the shifts (logit / log units); decays like fit.lr
    rim_weight: float = 0.001  # weight of the mean squared shift (keeps it small when the photo says little)
    refine_flame: bool = False  # photo-only: after the code fit, refine FLAME pose/expression/jaw photometrically
    # (jointly with the style, through the renderer; off by default: on the synthetic test it raised the fitted view's
    # PSNR but moved the head away from the true pose and lowered the unseen views', see README)
    flame_iterations: int = 30  # Adam iterations of the refine_flame stage (0 skips it)
    flame_lr: float = 0.002  # refine_flame: Adam lr of head rotation (rad), translation (head distances) and jaw
    flame_expression_lr: float = 0.02  # refine_flame: Adam lr of the expression coefficients (standard deviations)
    flame_style_lr: float = 0.01  # refine_flame: Adam lr of the style w refined with the head (0: w stays fixed)
    flame_prior: float = 1e-4  # refine_flame: weight of |expression|^2 + |jaw / 0.2 rad|^2
    crop_margin: float = 0.1  # the fitted view is cropped to its face-mask box grown by this fraction per side
    crop_multiple: int = 16  # crop sizes are rounded up to a multiple of this
    cuda_graphs: bool = True  # on a GPU, replay the frozen network from CUDA graphs (false: run it eagerly)
    precision: str = "fp32"  # the frozen network's per-vertex matmuls in the code stage: fp32, or bf16 (CUDA only)
    # The code stage moves one style vector: a coarse view of the photo constrains it nearly as well as the full one,
    # at a fraction of the rasterizer's and SSIM's cost per iteration (full-resolution GPU fits); the colour stage,
    # which paints per-vertex detail, always runs at full resolution.
    code_scale: float = 1.0  # code stage (and start selection) on the photo area-downsampled by this factor (<= 1)
    # Same style space on the coarser mesh: its vertices' raw outputs are the fine ones' (coarser_field).
    code_levels_down: int = 0  # code stage through the network on its mesh this many levels coarser (a quarter
                               # of the Gaussians per level; colour stage at the full level)

    RANGES = {"iterations": Range(1), "lr": Range(0, lo_open=True), "lr_final_ratio": Range(0, 1, lo_open=True),
              "beta1": Range(0, 1, hi_open=True), "beta2": Range(0, 1, hi_open=True), "check_every": Range(1),
              "patience": Range(1), "min_rel_improvement": Range(0), "min_iterations": Range(0),
              "l1_weight": Range(0), "ssim_weight": Range(0), "eye_weight": Range(0), "colour_eye_weight": Range(0),
              "eye_min_pixels": Range(0), "style_reg": Range(0), "geometry_lr": Range(0),
              "laplacian_weight": Range(0), "offset_weight": Range(0), "colour_iterations": Range(0),
              "colour_lr": Range(0), "colour_laplacian_weight": Range(0), "colour_weight": Range(0),
              "flame_iterations": Range(0), "flame_lr": Range(0), "flame_expression_lr": Range(0),
              "flame_style_lr": Range(0), "flame_prior": Range(0), "crop_margin": Range(0), "crop_multiple": Range(1),
              "rim_rings": Range(0), "rim_iterations": Range(0), "rim_lr": Range(0), "rim_weight": Range(0),
              "code_scale": Range(0, 1, lo_open=True), "code_levels_down": Range(0), "lbfgs_history": Range(1),
              "lbfgs_max_step": Range(0)}



@dataclass
class ExportConfig:
    """What ``track`` writes besides code.pt and metrics.json."""

    ply: bool = True  # head.ply, the fitted Gaussians in the standard 3DGS layout
    views: bool = True  # views/cam_<serial>.png (render | photo) and grid.png
    turntable: bool = True  # turntable.mp4
    turntable_frames: int = 60  # frames of the turntable video
    turntable_degrees: float = 120.0  # yaw range: >= 360 a full turn, else a swing of +-degrees/2 and back
    turntable_size: int = 256  # turntable frame height in pixels (width from the fitted camera's aspect)
    fps: float = 25.0  # video frame rate
    lpips: bool = True  # compute LPIPS when the optional lpips package works here (skipped with a message else)

    RANGES = {"turntable_frames": Range(1), "turntable_degrees": Range(0), "turntable_size": Range(2),
              "fps": Range(0, lo_open=True)}



@dataclass
class VideoRefineConfig:
    """Video mode: the per-subject refinement after the style fit (utils/apps/track/video_refine.py), with the style
    fixed: the colour residual (fit.refine_colour, fit.colour_* weights), a per-Gaussian position-offset / log-scale /
    opacity residual and every training frame's FLAME, jointly on batches of training frames.  iterations 0: the
    colour stage alone (fit.colour_iterations), as before the refinement existed; fit.refine_colour false or
    fit.colour_iterations 0 leave the colour residual out of both."""

    iterations: int = 120  # Adam steps of the joint refinement (0: off)
    batch: int = 0  # training frames per step (0: --video_batch)
    gaussians: bool = True  # per-Gaussian residual of the pre-activation position offset, log-scale and opacity
    gaussian_lr: float = 0.05  # its Adam learning rate (pre-activation units); decays like fit.lr
    offset_weight: float = 1.0  # L2 pull of the offset residual towards zero (pre-tanh, edge units)
    # Weaker pulls than the one-photo fit's: many frames see each Gaussian.  2026-12-06 (CPU preset, 2-core container;
    # benchmarks/results/video_avatar_priors_cpu_2026-12-06.md), colour 1.0 / scale 1.0 / opacity 0.1 -> 0.05 / 0.1 /
    # 0.01: real clips' held-out frames female 16.90 -> 18.03 dB, male 24.34 -> 25.63 dB; synthetic clip held-out
    # 25.34 -> 25.69 dB, its 15 novel cameras 26.59 -> 26.57 dB
    scale_weight: float = 0.1  # L2 pull of the log-scale residual towards zero
    opacity_weight: float = 0.01  # L2 pull of the opacity-logit residual towards zero
    colour_weight: float = 0.05  # L2 pull of the colour residual towards zero (the photo fit's is fit.colour_weight)
    gaussian_laplacian_weight: float = 1.0  # squared uniform Laplacian of the residual over the subdivided mesh
    # Where the clip's frames end (neck, chin underside) the residual's log-scale / opacity parts are 3-4x the
    # interior's and, under --video_filter_3d clip, draw a speckled fringe at display size.  Holding them at zero
    # there smooths it but cost the female clip's held-out frames 0.22-0.59 dB, so off
    # (benchmarks/results/t-fringe_cpu_2026-12-07d.md)
    gaussian_boundary_rings: int = 0  # residual held at 0 on the mesh's open boundary + (this - 1) rings (0: off)
    gaussian_boundary_scale_only: bool = False  # hold only the log-scale residual there (offset / opacity free)
    # a per-Gaussian RGB residual (every Gaussian of the subdivided mesh, not the level-0 vertices the colour
    # residual above lives on, and with its own smoothness): code.pt then stores the per-Gaussian residual
    # with every raw channel (V, K, C), which animate.py / interpolate.py / the viewer apply like any other.  On by
    # default since 2026-12-07d with Laplacian weight 10 (held-out frames female +0.29, male +1.06, synthetic +0.30 /
    # +0.09 dB; synthetic novel cameras +0.05 / -0.04 dB); weight 1 or 3 cost identity 030's novel cameras 0.05-0.07
    # dB (benchmarks/results/t-sharp_cpu_2026-12-07d.md)
    gaussian_colour: bool = True  # refine a per-Gaussian RGB residual (added to the SH DC term)
    gaussian_colour_lr: float = 0.02  # its Adam learning rate (RGB units); decays like fit.lr
    gaussian_colour_weight: float = 0.05  # L2 pull of the per-Gaussian RGB residual towards zero
    gaussian_colour_laplacian_weight: float = 10.0  # squared uniform Laplacian of it over the subdivided mesh
    # refine the training frames' FLAME photometrically (corrections of the landmark tracking).  Off by default: on
    # the synthetic clip (exact landmarks) it raised the held-out frames' PSNR by 0.3-0.4 dB but lowered the novel
    # cameras' by 0.1-0.2 dB (benchmarks/results/video_avatar_refine_cpu.md); worth trying on noisy real tracking
    flame: bool = False  # photometric per-frame FLAME refinement of the training frames (see above)
    flame_rotation: bool = True  # ... their head rotation
    flame_translation: bool = True  # ... their head translation
    flame_expression: bool = True  # ... their expression coefficients
    flame_jaw: bool = True  # ... their jaw rotation
    flame_lr: float = 0.002  # Adam lr of the rotation (rad), translation (camera distances) and jaw corrections
    flame_expression_lr: float = 0.02  # Adam lr of the expression corrections (standard deviations)
    flame_prior: float = 1e-2  # weight of the corrections' squared size in units of 2 deg, 1 percent of the camera
    #                            distance, 0.3 expression std and 0.05 rad jaw (the pull towards the landmark fit)
    # the clip's one FLAME shape, shared by every frame, refined photometrically (independent of --video_refine.flame):
    # on the synthetic clip novel cameras +0.86 dB, held-out frames -0.13 dB
    # (benchmarks/results/video_avatar_shape_cpu_2026-12-05.md)
    flame_shape: bool = True  # refine the clip's one FLAME shape photometrically (shared by all frames)
    flame_shape_lr: float = 0.01  # Adam lr of the shape correction (shape standard deviations; prior sigma 1)
    flame_zero_mean: bool = False  # the head rotation / translation corrections minus their mean over the frames
    # the clip's one shared camera refined photometrically (issue 23), pulled towards the tracked camera; held-out
    # frames are evaluated through the refined camera (their pixels never move it); needs --backend torch (gradients
    # w.r.t. the intrinsics).  Off: within +-0.11 dB on the held-out frames of the real female clip and -0.03 dB on the
    # synthetic novel cameras (benchmarks/results/video_avatar_real_cpu_2026-12-06.md)
    camera_focal: bool = False  # refine the shared focal length (a log-scale correction, prior sigma 10 percent)
    camera_principal: bool = False  # refine the shared principal point (prior sigma 5 percent of the focal length)
    camera_dolly: bool = True  # a focal change s also moves every head to s times its depth (keeps its image size)
    camera_lr: float = 0.002  # Adam lr of the camera corrections (log focal; principal point in focal lengths)
    camera_prior: float = 1e-2  # weight of the camera corrections' squared size in units of their sigmas
    # the training frames' rendered alpha pulled to their face mask (mean |alpha - mask| over the data pixels, as
    # training's loss.alpha_weight): without it the fit can darken a pixel by letting the black background through,
    # and at another head pose that see-through rim lands on bright skin.  2026-12-07 (CPU preset, 2-core container;
    # benchmarks/results/t-realclip_cpu_2026-12-07b.md), 0 -> 5, held-out PSNR in the face mask: female 23.35 ->
    # 23.85 dB, male 32.21 -> 32.36, synthetic novel cameras 27.35 -> 27.45, but the synthetic clip's own held-out
    # frames 28.63 -> 28.43 (weight 1: female 23.58, synthetic 28.50, novel cameras 27.48)
    alpha_weight: float = 5.0  # weight of the coverage term (0: off)
    # false: the inside only (alpha 5: synthetic held-out 28.82 dB but its novel cameras 26.46: the rim grows outwards)
    alpha_outside: bool = True  # ... also alpha to 0 outside the mask (beyond the no-data pixels); false: inside only
    # where the detector's face outline cut the projected FLAME face mask (--ignore_cut: no data) the avatar's
    # Gaussians got no colour at all and kept the network's skin: a pale flap at the female clip's temple where the
    # clip shows hair, "horns" at the male's temples, brown smears on the necks.  true (default since 2026-12-07e):
    # the cut's pixels that mediapipe's person segmentation calls the person (hair, neck) are fitted to the frame's
    # own colours (and opaque); its background pixels stay no data (pulling the whole cut transparent instead cost
    # the female clip 4.9 dB: the far cheek is "background" in the turned frames).  Held-out PSNR in the face mask:
    # female 25.15 -> 25.43 dB, male 34.59 -> 34.60; no effect without the detector's outline (--landmarks: the
    # synthetic clips) (benchmarks/results/t-temple_cpu_2026-12-07e.md)
    cut_photo: bool = True  # fit the outline's cut on the person (hair, neck) to the frame's own colours
    # the cut's pixels the person segmentation calls background (farther than cut_background_margin px from the
    # person, so that a cheek pixel at the segmentation's uncertain edge is spared): the coverage term pulls the
    # avatar's alpha to 0 there (the frame shows background: no surface) instead of leaving them no data.  The
    # male clip's grey-white jaw-side patches were per-Gaussian residuals of FLAME surface lying over the wall beside
    # his jaw in every training frame (never data, never told to be transparent).  true (default since
    # 2026-12-07e): those patches and the temple "ear" corners go, the silhouette follows his jaw; the female's temple
    # flap stays (the segmentation calls it hair in every training frame).  Held-out PSNR in the face mask: female
    # 25.434 -> 25.430 dB, male 34.603 -> 34.612; synthetic clips (no outline) unchanged
    # (benchmarks/results/t-flap_cpu_2026-12-07e.md)
    cut_background: bool = True  # with cut_photo, alpha 0 on the cut's background pixels
    # 0 (default since 2026-12-07f, with background_prune): female 25.430 -> 25.466, male 34.612 -> 34.639 dB over
    # 3 px; alone it left a wider fringe of dark specks at the male's jaw and neck edge at 512 px, which
    # background_prune removes (benchmarks/results/t-flap2_cpu_2026-12-07f.md; 3 px: t-flap_cpu_2026-12-07e.md)
    cut_background_margin: int = 0  # px: the cut's background this close to the person stays no data
    # the cut's person pixels whose chromaticity is not the frame's skin (utils.face.masks.hair_mask: farther than
    # cut_hair_threshold Mahalanobis units from the face mask's skin; mostly hair over the temples and beside the
    # neck): the FLAME surface is under the hair there, so the coverage term pulls alpha to 0 (as on the
    # background) instead of fitting the hair's colour; within cut_hair_margin px of the face mask they stay no data.
    # Off: it cuts the female's pointed temple flap, but held-out female 25.43 -> 24.53 dB (margin 6 px: 25.18):
    # the held-out frames' outlines keep temple hair the training frames' cut, and the cut flap is a ragged dark
    # remnant at 512 px (benchmarks/results/t-flap2_cpu_2026-12-07f.md)
    cut_hair: bool = False  # with cut_photo, alpha 0 (not the frame's colour) on the cut's hair pixels
    cut_hair_threshold: float = 3.0  # Mahalanobis distance in (r, g) chromaticity from the skin beyond which: hair
    cut_hair_margin: int = 2  # px: the cut's hair this close to the face mask stays no data
    # > 0: after the refinement, every Gaussian of a vertex whose blending weight over the training frames lies on
    # the coverage term's alpha-0 pixels (cut_background) for more than this share (the rest: on data pixels) gets
    # opacity 0 (its opacity residual -30, stored in code.pt): the coverage term only shrinks and dims the FLAME
    # surface over the wall, which at display size (512 px) stays a fringe of faint specks beyond the silhouette.
    # Needs video_refine.gaussians and a cut (the detector's outline; nothing happens with --landmarks).  0.9 (default
    # since 2026-12-07f): the male's jaw fringe and the specks above his temple go (80 of 8,580 vertices; female 0),
    # held-out PSNR within 0.005 dB of 0 (benchmarks/results/t-flap2_cpu_2026-12-07f.md)
    background_prune: float = 0.9  # share of a vertex's observation on alpha-0 pixels above which it is pruned (0: off)
    # vertices no training frame shows as data get their residuals only from the Laplacian's extrapolation of their
    # observed neighbours (a third of the female clip's vertices: < 0.1 px of blending weight over all its frames);
    # > 0: after the refinement, every residual (per-Gaussian, per-Gaussian colour, level-0 colour) of a vertex
    # observed less than this is reset to the prior (zero).  Off: at 0.1 px held-out frames female / male +0.000,
    # synthetic 017 / 030 +0.03 / +0.004 dB, but the synthetic novel cameras -0.035 / -0.032 dB (they see those
    # vertices, and the extrapolated residuals help there) (benchmarks/results/t-temple_cpu_2026-12-07e.md)
    unobserved_px: float = 0.0  # residuals of vertices seen less than this (px of blending weight) reset (0: off)
    style_lr: float = 0.03  # Adam lr of the style w refined with the rest (network forward every step; 0: w fixed)
    # pivotal tuning (issue 23): the synthesis network (its layers, head and template features; not the mapping)
    # tuned for this person at a low lr jointly with the rest; code.pt stores the result as a (V, K, C) per-Gaussian
    # residual of every raw channel (tuned output minus the model's for the fitted style), so the model file stays
    # shared and animate.py / interpolate.py / the viewer apply it like any per-Gaussian residual
    network_lr: float = 0.0  # Adam lr of the tuned network's weights (0: off)
    network_weight: float = 0.0  # L2 pull of the tuned network's raw output towards the model's (per channel mean)
    heldout_correction: str = "interpolate"  # held-out frames' FLAME: "interpolate" (tracking + the neighbouring
    #                                          training frames' corrections, interpolated in time) or "none" (tracking)
    # per-frame photometric exposure (issue 23): every training frame's render gets its own RGB gain (and with
    # exposure_bias an RGB offset) inside the face mask in the loss, fitted jointly with the rest and pulled towards
    # gain 1 / offset 0, so the identity's colours stay free of the camera's exposure changes; the log gains (and
    # offsets) have zero mean over the training frames (the avatar's colours are the clip's mean exposure).  Held-out
    # frames are never fitted: they get the training frames' values interpolated linearly in frame number; beyond the
    # first / last training frame (the clip's held-out tail) see exposure_extrapolate.  code.pt keeps them in
    # meta["exposure"] (never applied to the avatar)
    exposure: bool = True  # fit a per-frame RGB gain of the render (the camera's exposure / white balance)
    # the offset: female 23.35 -> 23.68 dB, synthetic 28.63 -> 28.71, but male 32.21 -> 32.19: off
    exposure_bias: bool = False  # ... and a per-frame RGB offset
    exposure_lr: float = 0.01  # Adam lr of the log gains (and offsets)
    # 2026-12-07 (CPU preset, 2-core container): exposure on vs off, held-out PSNR in the face mask, female 21.61 ->
    # 23.35 dB, male 32.21 -> 32.21, synthetic 28.38 -> 28.63 (its novel cameras 27.35 -> 27.35); prior 1e-4 rather
    # than 1e-3: female 23.35 vs 22.98 dB, synthetic 28.63 vs 28.61
    exposure_prior: float = 1e-4  # weight of the squared log gain (and offset) in units of 0.1 (the pull to 1 / 0)
    # held-out frames beyond the first / last training frame: "mean" (the clip's mean exposure, gain 1: nothing
    # brackets them) or "hold" (the nearest training frame's).  With exposure_prior 1e-3, "mean" vs "hold": female
    # clip 22.98 vs 22.97 dB, synthetic 28.61 vs 28.26 (benchmarks/results/t-gain_cpu_2026-12-07.md)
    exposure_extrapolate: str = "mean"  # held-out frames past the training frames: "mean" (gain 1) or "hold"

    RANGES = {"iterations": Range(0), "batch": Range(0), "gaussian_lr": Range(0), "offset_weight": Range(0),
              "scale_weight": Range(0), "opacity_weight": Range(0), "colour_weight": Range(0),
              "gaussian_laplacian_weight": Range(0), "gaussian_boundary_rings": Range(0),
              "gaussian_colour_lr": Range(0),
              "gaussian_colour_weight": Range(0), "gaussian_colour_laplacian_weight": Range(0),
              "flame_lr": Range(0), "flame_expression_lr": Range(0), "flame_prior": Range(0),
              "style_lr": Range(0), "network_lr": Range(0), "network_weight": Range(0),
              "flame_shape_lr": Range(0), "camera_lr": Range(0), "camera_prior": Range(0),
              "exposure_lr": Range(0), "exposure_prior": Range(0), "alpha_weight": Range(0),
              "unobserved_px": Range(0), "cut_hair_threshold": Range(0), "cut_hair_margin": Range(0),
              "background_prune": Range(0, 1)}


HELDOUT_CORRECTIONS = ("interpolate", "none")
VIDEO_FILTERS_3D = ("model", "clip")
EXPOSURE_EXTRAPOLATIONS = ("mean", "hold")


@dataclass
class TrackConfig:
    """Inputs, outputs and settings of ``track.py``."""

    checkpoint: str = "output/cpu/model.pt"  # trained model.pt (written by train.py)
    subject_dir: str = ""  # a NeRSemble subject folder (<root>/<id>); the photo is camera --camera of it
    camera: str = FRONTAL_SERIAL  # serial of the camera whose photo is fitted
    sequence: str = "EXP-1-head"  # sequence of the subject folder
    frame: int = 0  # frame index of the sequence
    flame_dir: str = ""  # FLAME files; default: <subject_dir>/../../flame if it exists (synthetic layout), else data/
    image: str = ""  # one's own photo (instead of --subject_dir); alone: landmarks -> FLAME and camera are fitted;
    #                  with --camera_json and --flame: that calibrated camera and FLAME tracking
    camera_json: str = ""  # NeRSemble-style camera_params.json holding --camera (own-photo mode)
    flame: str = ""  # FLAME tracking npz of the photo, NeRSemble or VHAP format (own-photo mode)
    landmarks: str = ""  # iBUG-68 pixels instead of the detector: photo (68, 2) .npy/text; video (T, 68, 2) .npy
    min_face_px: float = 64.0  # photo-only and video modes: smallest face (landmark box height, pixels) that is fitted
    max_face_px: float = 0.0  # photo-only mode: after detection, scale the photo down to a face this high (px; 0: keep)
    video: str = ""  # video of one person (mp4, avi, ...): an avatar fitted on many frames (utils/apps/track/video.py)
    frames: str = ""  # instead of --video: a folder of frames (images sorted by name)
    stride: int = 1  # video mode: use every stride-th frame
    max_frames: int = 0  # video mode: at most this many frames (0: all)
    heldout_every: int = 8  # video mode: every k-th frame is held out (never fitted; 0: none)
    heldout_tail: float = 0.1  # video mode: the last fraction of the clip is held out too
    video_batch: int = 4  # video mode: frames per Adam step of the fit
    # video mode: the model's Mip-Splatting 3D filter (a minimum world size per Gaussian) is set by the rate at which
    # its TRAINING cameras sampled each vertex; a clip that sees the face larger is blurred to that rate (female clip:
    # a 1.6 px filter sigma on Gaussians of 0.7-0.9 px).  "clip" (default since 2026-12-07d: held-out frames female
    # +1.0, male +1.2 dB, synthetic novel cameras unchanged; benchmarks/results/t-sharp_cpu_2026-12-07d.md): the rate
    # is the larger of the model's and the clip's training frames' per vertex (Mip-Splatting's rule, with the clip as
    # more training views), for the fit, the evaluation and code.pt (``sampling_rate``, applied by animate.py /
    # interpolate.py / the viewer); "model": as trained
    video_filter_3d: str = "clip"  # video mode: 3D filter rate: "clip" (finer of the model's and the clip's), "model"
    # Two tries at the speckled neck / chin fringe of "clip" at display size, both off: they cost the female clip's
    # held-out frames 0.12 / 1.19 dB (benchmarks/results/t-fringe_cpu_2026-12-07d.md)
    video_filter_3d_foreshortening: bool = False  # "clip": each frame's rate times |cos| of its view angle
    video_filter_3d_boundary_rings: int = 0  # "clip": the mask's boundary + (this - 1) rings keep the model's rate
    # photo-only (--image) and video modes: pixels of a photo / frame that are no data, left out of the fit's loss
    # (the render stands in for the photo there, as training's loss.rim_band does): the photos are black outside the
    # face mask only because the mask cut them, but the avatar's surface goes on there; supervising them as black
    # darkened and faded the face inside the mask's edge, where 74-83 % of the video's held-out error sat.  2026-12-06
    # (CPU preset, 2-core container; benchmarks/results/video_avatar_rim_cpu_2026-12-06d.md), video, both on vs both
    # off, held-out PSNR in the face mask: female 18.03 -> 21.61 dB, male 25.63 -> 32.21, synthetic 25.69 -> 28.38
    # (its novel cameras 26.57 -> 27.35); the photo-only path: benchmarks/results/photo_no_data_cpu_2026-12-06d.md.
    # Calibrated NeRSemble subjects (--subject_dir / --data_root) are not affected.
    ignore_rim_band: int = 1  # --image / --video fits: px just outside the face mask left out of the loss (0: off)
    ignore_cut: bool = True  # --image / --video fits: leave out where the face outline cut the projected FLAME mask
    video_refine: VideoRefineConfig = field(default_factory=VideoRefineConfig)  # video mode: the refinement stage
    mask: str = ""  # face mask of the photo (white = face); default: projected from the tracked FLAME face mask
    image_scale: float = 1.0  # resize factor applied to the photos (and cameras)
    out: str = "output/tracking"  # output folder
    all_heldout: bool = False  # fit every held-out identity of --data_root and print a Markdown table
    data_root: str = "syn_data"  # dataset for --all_heldout (a synthetic dataset folder or NeRSemble subjects)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    backend: str = "auto"  # rasterizer: auto (gsplat on CUDA, else torch), torch, gsplat, inria
    progress: bool = True  # tqdm progress bars
    seed: int = 0  # random seed (the fit itself is deterministic)
    overwrite: bool = False  # replace the outputs of an earlier run in --out (only files it recorded are deleted)
    fit: FitConfig = field(default_factory=FitConfig)
    flame_fit: FlameFitConfig = field(default_factory=FlameFitConfig)  # photo-only mode: FLAME from landmarks
    export: ExportConfig = field(default_factory=ExportConfig)

    # allowed values of the numeric keys (checked with utils.core.config.check_ranges before any work; NaN / inf never)
    RANGES = {"frame": Range(0), "min_face_px": Range(1), "max_face_px": Range(0), "ignore_rim_band": Range(0),
              "image_scale": Range(0, lo_open=True), "seed": Range(0)}


TRACK_ALIASES = {"refine_geometry": "fit.refine_geometry", "refine_colour": "fit.refine_colour",
                 "iterations": "fit.iterations", "init": "fit.init", "space": "fit.space"}


TRACK_FLAGS = ("all_heldout", "fit.refine_geometry", "fit.refine_colour", "fit.refine_rim", "progress",
               "overwrite")
