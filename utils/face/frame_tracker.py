"""Streaming FLAME tracking: one video frame at a time, warm-started from the previous frame.

``FrameTracker`` is the streaming counterpart of utils/face/reenactment.py's chunked batch fit: each frame is one
:func:`utils.face.flame_fit.fit_flame_to_landmarks` call (T = 1) with the person's shape and focal length held fixed
(:meth:`FrameTracker.calibrate`) and a frame-to-frame prior that looks only backwards.

The shape the first frames calibrate is refined as the stream goes on (:class:`ShapeRefineConfig`; since
2026-12-07 by default once, when the head first turns or nods, with the detector offset solved jointly with the
shape in the calibration: see there): the batch path fits the shape on frames spread over the whole video, and a
shape from the first (near-frontal, neutral) frames alone has the wrong depth (and takes the detector's systematic
offsets as shape), which turned or nodding frames then show and the expression and head rotation absorb (measured
on the benchmark's keyframe videos: brows correlation 0.06-0.39 against the batch path's 0.57-0.71).  So the
tracker keeps a few tracked frames chosen to differ in head pose, and when they show a new head pitch / yaw it
re-solves the shape (and the detector offset) on them in a background thread, never looking ahead; the new
shape is swapped in with the reference frame's expression and jaw re-anchored.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

from models.flame import NUM_SHAPE, FlameModel, FlameParams
from utils.core.config import Range
from utils.face.flame_fit import OFFSET_GROUPS, FlameFitConfig, LandmarkTargets, ShapeRefinement, fit_flame_to_landmarks
from utils.face.landmark_flame import LandmarkFlame


@dataclass
class ShapeRefineConfig:
    """How a stream's FLAME shape and detector offset keep improving after the first frames calibrated them
    (``stream_refine.*`` keys of animate.py; :class:`FrameTracker`).

    The calibration on the first frames solves the shape with the prior std ``calibration_shape_std`` (tight: those
    frames show one side of the face and leave its depth free).  The tracker then keeps up to ``frames`` tracked
    frames that differ most from each other (greedy max-min: a new frame replaces one of the two closest kept frames
    when it is farther from the rest than they are from each other; the first frame with a face, the reference of
    ``--pose relative``, always stays), by head rotation (``rotation_unit`` radians = one unit; with ``pose_only``
    off also jaw and expression).  When a kept frame widens the head pitch / yaw range the last solve saw by
    ``new_view`` radians, the shape is solved again on the kept frames (utils/face/flame_fit.py ShapeRefinement: all
    of them and the shape together, warm-started), whole, in a background thread (``background``; the frames go on
    being tracked) and swapped in at least ``delay_frames`` frames later, once done; with ``continuity`` /
    ``jaw_continuity`` the expression and jaw change the new shape gives the reference frame is removed from later
    frames (otherwise a swap shifts every expression and the jaw at once, and a jaw read under two shapes in one
    video loses its correlation: 85-frame video 0.90 -> 0.60).

    Measured (benchmarks/results/stream_shape_online_cpu_2026-12-06.md, benchmarks/stream_tracking.py, 2-core CPU
    container; jaw / smile / brows / turn correlations, batch / stream without / stream with, ``wait`` on so the
    swaps do not depend on the machine's speed): 337-frame video 0.962 / 0.878 / 0.575 / 0.999, 0.945 / 0.806 /
    0.057 / 0.960, 0.967 / 0.887 / 0.525 / 0.964; 85-frame 0.926 / 0.871 / 0.571 / 0.999, 0.905 / 0.850 / 0.178 /
    0.952, 0.903 / 0.871 / 0.567 / 0.989; 22-frame 0.942 / 0.823 / 0.708 / 0.998, 0.947 / 0.848 / 0.390 / 0.997,
    0.925 / 0.881 / 0.475 / 0.997.  The older mode (frames kept for pose, jaw and expression, a re-solve on every
    change, ``iterations_per_frame`` inside each frame, the fit's own calibration prior, no jaw re-anchoring) cost
    the 85-frame video's jaw (0.75) and the frames' time; ``blend_frames``, ``min_span`` and ``refit_previous``
    (benchmarks/results/stream_blend_cpu_2026-12-06.md) are kept for it.

    The default since 2026-12-07 (benchmarks/results/t-stream6_cpu_2026-12-07.md): the calibration with the fit's
    own prior and the detector offset solved jointly (``calibration_offset_px`` 6, ``calibration_offset_groups``
    "brows=1.5,nose=1.5"), then ONE re-solve (``max_updates`` 1, ``iterations`` 15) on the frames kept when the head
    first turns or nods by ``new_view``, in the background, blended in over ``blend_frames`` 16 frames: jaw / smile /
    brows / turn within 0.02 of the batch path on the 16 / 85 / 337-frame videos (min minus batch -0.008 / -0.014 /
    -0.003; before: -0.001 / -0.394 / -0.518).
    Every later swap would read the jaw and expressions at another scale; one early swap mixes little.  Sensitive to
    ``new_view`` (0.15 / 0.2: the 85- or 337-frame video's brows fall to ~0.46-0.49) and not better on every
    identity (other synthetic drivers, bench.py driving_video seeds 1-3, not tuned on: about even with the old
    default overall; seed 2's 85-frame video -0.133 with both, seed 1's 337-frame video -0.203 against -0.109).
    ``frames`` 0 turns the refinement off (the calibration options still apply; set ``calibration_offset_px`` 0 for
    the plain one).

    The history (earlier defaults: ``frames`` 0, ``calibration_shape_std`` 0.2, ``calibration_offset_px`` 0,
    ``iterations`` 20, no ``max_updates``): on tests/test_streaming.py's 16-frame video
    (smooth expression, jaw and +-0.1 rad yaw from the first frame on; no new view, so no re-solve) the tight
    calibration prior alone lowers the brows correlation from 0.924 to 0.876 (batch 0.925; 0.3: 0.883, 0.5: 0.900),
    outside the 0.02 that test allows, and with the fit's own prior the keyframe videos' first shape reads the head
    turn at a tenth of its size (337-frame video: no new view ever, no re-solve) or the jaw at a quarter (85-frame
    video: jaw 0.61 after the re-solves).  A calibration prior that is tight only where the first frames do not see
    the face (its depth) is the next step.

    That step, ``calibration_information`` (25: the 0.2 prior only along the shape directions whose information from
    the first frames is below the prior's own precision, utils/face/flame_fit.py ShapeRefinement.shape_information),
    measured (benchmarks/results/stream_shape_default_cpu_2026-12-06d.md): the 16-frame test video back to 0.889 /
    0.797 / 0.934 / 0.983 (batch 0.845 / 0.802 / 0.925 / 0.981), but the 85-frame video's brows 0.567 -> 0.449 and
    the 337-frame video's 0.525 -> 0.233: the first frames' shape goes wrong along well-informed directions too (the
    detector's offsets on the synthetic face, fitted as shape), so it stays off (0).  ``calibration_offset_px``
    (estimating that offset jointly with the shape in the calibration, no re-solves, ``frames`` 0) with 6 px: 85-frame
    0.910 / 0.861 / 0.716 / 0.993, 337-frame 0.937 / 0.847 / 0.707 / 0.997 at the default's per-frame cost, but the
    16-frame video's brows 0.882 (-0.043), so it is off (0) too.  Its two refinements
    (benchmarks/results/stream_offset_iter_cpu_2026-12-06d.md, min minus batch on the 16 / 85 / 337-frame videos):
    ``calibration_offset_rounds`` 2 (towards the joint optimum) -0.080 / -0.006 / -0.027; ``calibration_offset_groups``
    "brows=1.5,nose=1.5" (looser brows and nose offsets) -0.008 / -0.009 / -0.029 -- no setting within 0.02 on all
    three (the 337-frame video's smile / jaw stay 0.025-0.03 below), and the brows flip between ~0.2 and ~0.7 (long
    video) or ~0.88 and ~0.97 (test video) with small changes of the factors, so both stay off."""

    solve_shape_std: float = 0.0  # the re-solves' shape prior std (0: the fit's own, FlameFitConfig.shape_std)
    calibration_shape_std: float = 0.0  # with ``frames``: the calibration's shape prior std (0: the fit's own)
    # (FlameFitConfig.shape_std, 1 by default): the first frames show the face from one side and leave its depth
    # free, which the shape's 300 coefficients then bend to fit the first frames' mouth and brows (85-frame benchmark
    # video: the jaw read at 0.27 of its true opening, slope of fitted on true); a tight prior keeps that shape near
    # FLAME's mean (slope 1.00) until turned frames show the depth
    calibration_information: float = 0.0  # >0: calibration_shape_std only on directions with less information (0: all)
    # (information from the first frames in FLAME standard deviations^-2; 25 = the 0.2 prior's precision)
    # (the calibration solved with the fit's own prior, then re-solved from there with the prior std
    # ``calibration_shape_std`` along the eigen-directions of the shape's information from the first frames
    # (ShapeRefinement.shape_information: Gauss-Newton, per-frame variables eliminated, in FLAME standard deviations)
    # whose eigenvalue is below this, the fit's own along the rest: the depth those frames leave free stays near
    # FLAME's mean while what they do show is fitted freely; 0: ``calibration_shape_std`` along every direction)
    calibration_offset_px: float = 6.0  # >0: calibration solves detector offset with the shape, prior std px
    # (ShapeRefinement.offset_step, then a re-solve on the points less that offset; per static landmark, shared by
    # the frames; 0: the offset is the residual the shape leaves, as the batch fit's bias_correction; applies also
    # with ``frames`` 0)
    calibration_offset_rounds: int = 1  # with calibration_offset_px: joint offset steps, each with its re-solve
    # (ShapeRefinement.offset_step from the last round's offset and solve: more rounds move towards the joint
    # optimum of shape, frames and offset; 1: one linearised step, as first measured)
    calibration_offset_groups: str = "brows=1.5,nose=1.5"  # with calibration_offset_px: per-group std factors
    # (groups of the iBUG-68 static points: brows 17-26, nose 27-35, eyes 36-47, mouth 48-67; factor x
    # calibration_offset_px is that group's prior std, 0: its offset held at 0 in the step; unnamed groups 1)
    calibration_iterations: int = 20  # LM iterations of those two options' calibration re-solve
    # (12 saves 0.4-0.6 s CPU (85-frame video 3.86 -> 3.46 s, 16-frame 2.77 -> 2.18 s) and stays within 0.02 of 20's
    # on the goal and seed 1-3 videos (benchmarks/results/t-stream7_cpu_2026-12-07.md), but flips the 22-frame quick
    # video's brows from 0.642 to 0.158 (min minus batch -0.067 -> -0.551; 2026-12-07 review), so 20 stays)
    calibration_float32: bool = True  # the calibration's Schur products in float32 (FlameFitConfig.schur_float32)
    # (its solves only: the tracked frames and the background re-solves keep the fit's own setting; since 2026-12-07c,
    # benchmarks/results/t-calib_cpu_2026-12-07c.md: with the other speed-ups of that day the 16-frame calibration
    # ~1.3x faster on 1 and 2 threads, min minus batch with ``wait`` unchanged on the quick / 16 / 85 (seeds 0-3) /
    # 337 (seeds 0-1) / long_lead videos but seed 1's 337-frame (-0.117 -> -0.097); False: float64 throughout)
    frames: int = 12  # frames kept for the shape (0: off, the first frames' shape held)
    iterations: int = 15  # Levenberg-Marquardt iterations of one re-solve on the kept frames
    iterations_per_frame: int = 2  # without ``background``: at most this many run while one frame is tracked
    background: bool = True  # run each re-solve whole in a background thread that no frame waits for
    # (False: ``iterations_per_frame`` iterations inside each frame's step, which waits for them)
    background_nice: int = 10  # background: the re-solve thread's OS niceness (Linux only; 0: as the tracking thread)
    # (on cores shared with the tracking thread and the stream's other stages the frames waited for the re-solve's CPU,
    # the stream's slowest frames once the re-solve's setup left them; t-tail_cpu_2026-12-07h.md, 2-core container,
    # live stream, 3 runs each: latency p99 26.6 / 38.5 / 41.0 -> 26.8 / 29.5 / 30.1 ms, max 41-55 -> 32-35 ms, the
    # swap 10-19 -> 16-20 frames after the start, correlations within 0.002; free cores: no effect)
    delay_frames: int = 8  # background: swap a re-solve in no sooner than this many tracked frames after its start
    # (at the first frame from then on at which it is done)
    wait: bool = False  # background: swap exactly ``delay_frames`` frames after the start, waiting then if not done
    # (the same output on any machine: tests, benchmarks comparing variants; a frame may stall on a slow machine)
    min_distance: float = 1.0  # a frame closer than this to a kept one is not kept (while fewer than ``frames``)
    rotation_unit: float = 0.05  # radians of head rotation that count as one unit of difference
    jaw_unit: float = 0.05  # radians of jaw opening that count as one unit
    expression_unit: float = 0.5  # expression coefficient change that counts as one unit
    expression_dims: int = 10  # expression coefficients compared (the first ones: FLAME orders them by variance)
    pose_only: bool = True  # keep frames for their head rotation alone (``jaw_unit``, ``expression_*`` unused)
    # (the depth the first frames lack is seen on turned / nodding frames; frames kept for their jaw or expression
    # made more re-solves and moved the shape with what the face did: 85-frame video jaw 0.73, stream_blend_cpu_...)
    continuity: bool = True  # remove the expression change a new shape gives the reference frame from later frames
    jaw_continuity: bool = True  # with ``continuity``, remove the jaw rotation's change there too
    continuity_frames: bool = False  # with ``continuity``: the expression offset from all the solve's frames
    # (not the reference frame alone: each re-fitted as tracked under the new shape; the mean of new minus its
    # reading before the swap, added to the offset already removed; False: the reference frame's -- one frame's
    # reading sets the level of every later frame, and a weakly read expression (seed-1 337-frame video's brows,
    # read at 0.17 of its size) then sits at another level before and after the swap; measured,
    # t-stream7_cpu_2026-12-07.md: that video -0.203 -> -0.016 min minus batch, but the 337-frame goal video
    # -0.004 -> -0.032 and seed 2 -0.141 -> -0.208, so it stays off)
    # (a new shape reads the closed mouth at another jaw angle: without it, 85-frame video jaw 0.90 -> 0.60)
    blend_frames: int = 16  # a solved shape enters linearly over this many frames (0: at once)
    # (the detector offset and the ``continuity`` expression offset blend with it; the reference frame switches at
    # the end; 337-frame video: the largest frame-to-frame expression step at the swap 0.69 at once, 0.30 over 16
    # frames, jaw 0.023 -> 0.007 rad, the correlations unchanged within 0.003)
    refit_previous: bool = False  # re-fit the last frame under a changed shape (the prior then ties to its own shape)
    # (one more warm fit per change, each blended frame included)
    new_view: float = 0.1  # radians: re-solve only when the kept frames' pitch or yaw range grew this much
    # (relative to the reference frame, beyond the range the last solve's frames covered; 0: on every change of the
    # kept frames)
    max_updates: int = 1  # at most this many re-solves are started (0: no limit)
    # (a shape swapped in mid-video changes the scale the jaw / expressions are read at; the correlations over the
    # whole video mix the scales of every swap: fewer, later swaps mix fewer)
    min_span: float = 0.0  # re-solve only once the kept frames' head yaw or pitch spans this many radians (0: off)
    # (depth is only observable on turned / nodding frames; max - min of the kept frames' axis-angle x or y)

    RANGES = {"frames": Range(0), "iterations": Range(1), "iterations_per_frame": Range(1),
              "min_distance": Range(0), "rotation_unit": Range(0, lo_open=True), "jaw_unit": Range(0, lo_open=True),
              "expression_unit": Range(0, lo_open=True), "expression_dims": Range(0, 100), "blend_frames": Range(0),
              "min_span": Range(0), "new_view": Range(0), "delay_frames": Range(0), "calibration_shape_std": Range(0),
              "solve_shape_std": Range(0), "calibration_information": Range(0), "calibration_iterations": Range(0),
              "calibration_offset_px": Range(0), "calibration_offset_rounds": Range(1), "max_updates": Range(0),
              "background_nice": Range(0, 19)}

    def offset_std(self) -> Tensor:
        """(68,) the calibration offset's prior std per landmark in pixels: ``calibration_offset_px`` times the
        factor ``calibration_offset_groups`` gives that point's group (0 on the contour)."""
        std = torch.full((68,), float(self.calibration_offset_px))
        std[:17] = 0.0
        for item in filter(None, (t.strip() for t in self.calibration_offset_groups.split(","))):
            name, _, value = item.partition("=")
            if name.strip() not in OFFSET_GROUPS or not value:
                raise ValueError(f"calibration_offset_groups: {item!r} is not <group>=<factor> with a group of "
                                 f"{sorted(OFFSET_GROUPS)}")
            lo, hi = OFFSET_GROUPS[name.strip()]
            std[lo:hi] = float(self.calibration_offset_px) * float(value)
        return std



@dataclass
class _Kept:
    """One frame kept for the shape: raw points (68, 2) (detector offset NOT removed), irises (2, 2) or None, its
    parameters (1 frame, CPU; the last solve's or its tracked fit's), its diversity feature (D,)."""

    points: Tensor
    irises: Tensor | None
    params: FlameParams
    feature: Tensor
    index: int = 0  # the frame's position in the stream (the solve takes the kept frames in stream order)


@dataclass
class _SolveJob:
    """A background re-solve (``ShapeRefineConfig.background``): its thread builds the solve (``make``: the
    landmark tables and the problem, ~10 ms of CPU), runs it, and fits the reference frame under the solved shape
    (``swap``: what :meth:`FrameTracker._swap` needs) -- none of it on a tracked frame's critical path; before
    2026-12-07h the build ran in the step that started the solve and the reference fit in the step that swapped,
    the two slowest steps after the first (benchmarks/results/t-tail_cpu_2026-12-07h.md)."""

    make: Callable[[], ShapeRefinement]
    solve: ShapeRefinement | None = None
    swap: dict = field(default_factory=dict)  # shape, bias, reference (FlameParams, 1 frame, CPU) once done
    error: BaseException | None = None


class FrameTracker:
    """FLAME tracking of a video stream, one frame at a time, with the person's shape and the focal length known
    (:meth:`calibrate`): the streaming counterpart of utils/face/reenactment.py's chunked batch fit.

    Each frame's fit (:func:`fit_flame_to_landmarks` with T = 1) is warm-started from the previous frame's result and
    its frame-to-frame prior (the batch fit's ``temporal_std_*``) ties it to that frame only: the smoothing looks
    backwards, so a frame's parameters are final as soon as it is fitted (a batch fit's smoothing also pulls every
    frame towards the next one).  The first frame starts cold (PnP, rigid stage); a frame without a face holds the
    previous frame's parameters.

    Args:
        flame: the FLAME model the landmarks are fitted with (its device runs the fit's FLAME; the solver is on the
            CPU).
        image_size: (w, h) of the frames.
        shape: (1, 300) the person's FLAME shape, held fixed.
        focal: focal length in pixels, held fixed.
        cfg: the landmark fit's settings (as the batch fit's ``reenact.flame_fit``).
        bias: (68, 2) the detector's systematic per-landmark offset on this face (pixels), subtracted from every frame.
        iterations: Levenberg-Marquardt iterations of the warm-started frames (0: ``cfg.iterations``); the cold first
            frame uses ``cfg``'s.
        refine: how the shape and detector offset keep improving on the frames tracked so far
            (:class:`ShapeRefineConfig`); None (or ``frames`` 0): held fixed.
        bias_correction: with ``refine``, re-estimate the detector offset with the shape (as the calibration does).
        landmark_flame: a LandmarkFlame of ``flame`` to fit the frames with (:meth:`calibrate` hands over its own);
            None: built here.
        start: (1 frame) parameters the first frame's fit is warm-started from (the warm frames' settings, with
            ``cfg.far_start``'s wide stage when the start is far off); None: the first frame starts cold.

    Attributes (besides the settings): ``reference`` the parameters of the first frame with a face under the current
    shape (re-fitted when the shape changes: ``--pose relative`` measures head motion from it), ``shape_updates`` the
    shapes swapped in, ``refine_seconds`` the time spent re-solving, ``kept`` the frames kept for the shape,
    ``events`` what the last :meth:`step` did besides fitting its frame: "cold" / "warm_start" (the first frame's fit),
    "wide" (its fit ran the wide robust stage: ``far_start``), "solve_start", "solving" (a background re-solve ran
    meanwhile), "swap", "blend".
    """

    def __init__(self, flame: FlameModel, image_size: tuple[int, int], shape: Tensor, focal: float,
                 cfg: FlameFitConfig | None = None, bias: Tensor | None = None, iterations: int = 0,
                 refine: ShapeRefineConfig | None = None, bias_correction: bool = True,
                 landmark_flame: LandmarkFlame | None = None, start: FlameParams | None = None) -> None:
        cfg = cfg or FlameFitConfig()
        if iterations < 0:
            raise ValueError(f"FrameTracker: iterations must be >= 0, got {iterations}")
        self.flame = flame
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.shape = shape.detach().reshape(1, NUM_SHAPE).to("cpu", torch.float32)
        self.focal = float(focal)
        self.cold_cfg = replace(cfg, focal=self.focal, fit_focal=False)
        # a warm start is close to the optimum: no rigid stage, no wide-scale stage unless the motion outran the warm
        # start (cfg.far_start: on a keyframe video the narrow solve alone stalled at 29 px), an iteration that cannot
        # improve stops after a few rejected steps instead of raising the damping to 1e10 (most of the time otherwise),
        # a looser stopping tolerance, and at most one re-solve after the jaw-contour rows moved (not up to two; with
        # none, the rows lag a frame and the head turn with them: r 0.978 instead of 0.999 on the test motion)
        self.warm_cfg = replace(self.cold_cfg, rigid_iterations=0, iterations=iterations or cfg.iterations,
                                wide_stage=False, max_rejections=3, tolerance=1e-4, contour_passes=2)
        self.bias = torch.zeros(68, 2) if bias is None else bias.detach().reshape(68, 2).to("cpu", torch.float32)
        self.lf = landmark_flame if landmark_flame is not None else LandmarkFlame(flame)
        self.previous: FlameParams | None = None  # (1 frame, CPU) the last frame's parameters
        self.frames = 0  # frames tracked (with or without a face)
        self.refine = refine if refine is not None and refine.frames > 0 else None
        self.bias_correction = bool(bias_correction)
        self.reference: FlameParams | None = None  # (1 frame, CPU) the first frame with a face, current shape
        self.kept: list[_Kept] = []  # kept[0] is the reference frame
        self.changed = False  # the kept frames changed since the running / last solve started
        self.solve: ShapeRefinement | None = None  # the re-solve in progress
        self.solve_frames: list[_Kept] = []  # the kept frames it solves (entries may leave self.kept meanwhile)
        self.solved_views = torch.zeros(2, 2)  # (min, max) x (pitch, yaw) the last solve's frames covered
        self.shape_updates = 0
        self.solves_started = 0  # re-solves started (``max_updates``)
        self.refine_seconds = 0.0
        self.solve_seconds = 0.0  # time the re-solves ran (in the background thread with ``background``)
        self.solve_started = 0  # the frame count when the running re-solve started
        self.thread: threading.Thread | None = None  # the running background re-solve
        self.thread_error: BaseException | None = None
        self.lf_solve: LandmarkFlame | None = None  # the background re-solve's own (shares no cache with the fits)
        self.first_reference: FlameParams | None = None  # the reference frame as first fitted (first shape)
        self.offset: Tensor | None = None  # (1, 100) expression offset removed from the output (``continuity``)
        self.jaw_offset: Tensor | None = None  # (1, 3) jaw rotation offset removed from the output (``jaw_continuity``)
        # a shape being blended in (``blend_frames``): start and target of shape (1, 300), bias (68, 2), offset
        # (1, 100), the target's reference frame, and the frames blended so far
        self.blend: dict | None = None
        self.last: tuple[Tensor, Tensor | None] | None = None  # the last frame with a face: raw points, irises
        # (1 frame, CPU) where the first frame's fit starts from instead of cold (PnP, rigid and wide stages): a live
        # stream goes on from a frame just after the calibration's, which ``calibrate(warm_first=True)`` hands over
        self.start = None if start is None else start.to("cpu")
        self.events: list[str] = []  # what the last step did besides its fit (the stream's per-frame records)

    @property
    def started(self) -> bool:
        """A frame with a face was tracked (later frames without one hold it)."""
        return self.previous is not None

    @property
    def kept_frames(self) -> int:
        """Frames kept for the shape refinement."""
        return len(self.kept)

    @classmethod
    def calibrate(cls, flame: FlameModel, points: Tensor, irises: Tensor | None, image_size: tuple[int, int],
                  cfg: FlameFitConfig | None = None, bias_correction: bool = True, iterations: int = 0,
                  refine: ShapeRefineConfig | None = None, threads: int = 0,
                  warm_first: bool = False) -> tuple["FrameTracker", dict]:
        """The tracker of one person from N frames with a face (the first ones of a stream): one FLAME fit of all N
        (shared shape and, as ``cfg`` says, focal length), and the detector's mean per-landmark offset on this face
        (the static landmarks' mean residual, as the batch fit's ``bias_correction``).

        Args:
            points: (N, 68, 2) iBUG-68 pixels; irises: (N, 2, 2) or None.
            warm_first: the first tracked frame's fit starts from the last calibration frame's solution (a live
                stream, which drops the held frames and goes on from the newest one: 31 ms instead of ~7 ms of CPU
                for a cold start on the 2-core container, t-tail_cpu_2026-12-07h.md); False: from scratch (PnP).
            threads: torch intra-op threads for this solve, restored after (0: leave the count as it is).  A stream
                tracks one frame at a time on one thread (tiny tensors), but the calibration is one batched solve
                whose shape block (300 coefficients shared by N frames) is a few large matrix products: more
                threads shorten it (16 frames on the 2-core container before 2026-12-06c: 6.4-7.6 s on 1 thread,
                4.1-4.4 s on 2; since then 2.6 s CPU on 1 thread: benchmarks/results/
                stream_fit_speed_cpu_2026-12-06c.md).
        Returns:
            (FrameTracker, info: focal_px, detector_offset_rms_px, calibration_frames, seconds)."""
        cfg = cfg or FlameFitConfig()
        fit_cfg = cfg  # the tracker's (per-frame fits, background re-solves)
        if refine is not None and refine.calibration_float32:
            cfg = replace(cfg, schur_float32=True)
        calib_cfg = cfg
        weak = refine is not None and refine.frames > 0 and refine.calibration_shape_std > 0 and \
            refine.calibration_information > 0  # the tight prior along the weakly observed directions only
        if refine is not None and refine.frames > 0 and refine.calibration_shape_std > 0 and not weak:
            calib_cfg = replace(cfg, shape_std=refine.calibration_shape_std)
        t0 = time.perf_counter()
        # (``cfg.closed_form``: closed-form Jacobians, shape included; with autograd's batch of N x 140 copies this
        # took 30 s of CPU on the 85-frame benchmark video's 16 frames, 7 s in closed form, 2.6 s with the landmark
        # tables and the cheaper Schur complement of 2026-12-06c, while the stream waits)
        before = torch.get_num_threads()
        if threads > 0:
            torch.set_num_threads(threads)
        try:
            targets = LandmarkTargets(points, image_size, irises=irises)
            # one LandmarkFlame for the fit and the re-solves: its free-shape landmark tables (~0.1-0.2 s to build on
            # one core) and contour-row gathers are built once
            lf = LandmarkFlame(flame)
            first = fit_flame_to_landmarks(flame, targets, calib_cfg, landmark_flame=lf)
            if weak:
                first = cls._weak_prior_resolve(lf, targets, cfg, first, refine)
            if refine is not None and refine.calibration_offset_px > 0:
                first = cls._offset_resolve(lf, points, irises, image_size, cfg, first, refine)
        finally:
            torch.set_num_threads(before)
        bias = torch.zeros(68, 2)
        if bias_correction:
            bias[17:] = (points.cpu() - first.landmarks.cpu().to(points.dtype))[:, 17:].mean(0)
        tracker = cls(flame, image_size, first.params.shape, float(first.camera.fx), fit_cfg, bias, iterations, refine,
                      bias_correction, landmark_flame=lf,
                      start=first.params.frame(first.params.num_frames - 1) if warm_first else None)
        # one throwaway fit of the last calibration frame builds what the first tracked frame would otherwise build
        # while it is timed (the shaped landmark tables, NumPy's and threadpoolctl's first calls): the first step
        # took 22 ms instead of 4 ms warm-started on the 2-core container (t-tail_cpu_2026-12-07h.md); the tracker's
        # state is untouched
        last = first.params.frame(first.params.num_frames - 1)
        tracker._fit(points[-1].detach().to("cpu", torch.float32), None if irises is None else
                     irises[-1].detach().to("cpu", torch.float32), tracker.warm_cfg, last, None)
        info = {"focal_px": float(first.camera.fx), "calibration_frames": int(points.shape[0]),
                "detector_offset_rms_px": float(bias[17:].norm(dim=-1).square().mean().sqrt()),
                "seconds": time.perf_counter() - t0}
        return tracker, info

    @staticmethod
    def _weak_prior_resolve(lf: LandmarkFlame, targets: LandmarkTargets, cfg: FlameFitConfig, first,
                            refine: ShapeRefineConfig):
        """The calibration ``first`` (fitted with the fit's own shape prior) solved again, warm-started, with the
        shape prior std ``refine.calibration_shape_std`` along the eigen-directions of the shape's information (from
        these frames, at ``first``'s solution) below ``refine.calibration_information`` and ``cfg.shape_std`` along
        the others.  Returns the re-solve's FlameFitResult (params: N frames, the new shape; landmarks (N, 68, 2))."""
        solve_cfg = replace(cfg, focal=float(first.camera.fx), fit_focal=False)
        sr = ShapeRefinement(lf, targets, solve_cfg, first.params.shape.cpu(), first.params.to("cpu"),
                             refine.calibration_iterations)
        evals, vecs = torch.linalg.eigh(sr.shape_information())
        weak = evals < refine.calibration_information
        prec = torch.where(weak, 1.0 / refine.calibration_shape_std ** 2, 1.0 / cfg.shape_std ** 2).to(vecs.dtype)
        sr.set_shape_precision(vecs @ torch.diag(prec) @ vecs.T)
        sr.advance(sr.max_iterations)
        res = sr.result()
        res.losses["weak_directions"] = float(weak.sum())
        return res

    @staticmethod
    def _offset_resolve(lf: LandmarkFlame, points: Tensor, irises: Tensor | None, image_size: tuple[int, int],
                        cfg: FlameFitConfig, first, refine: ShapeRefineConfig):
        """``refine.calibration_offset_px``: from the calibration ``first``, one joint Gauss-Newton step of the shape
        and the detector's per-landmark offset (ShapeRefinement.offset_step), then the shape and frames solved again
        on the points less that offset.  Returns that solve's FlameFitResult (landmarks: the fitted points, so
        points - landmarks is the offset plus what is left)."""
        solve_cfg = replace(cfg, focal=float(first.camera.fx), fit_focal=False)
        params = first.params.to("cpu")
        sr = ShapeRefinement(lf, LandmarkTargets(points, image_size, irises=irises), solve_cfg, params.shape, params,
                             refine.calibration_iterations)
        std, offset = refine.offset_std(), None
        for _ in range(max(1, refine.calibration_offset_rounds)):
            # the joint step from the last solve (the offset's prior on the total), then shape and frames again on
            # the points less the new offset, warm-started from that solve's frames
            shape, offset = sr.offset_step(std, offset)
            sr = ShapeRefinement(lf, LandmarkTargets(points.cpu() - offset, image_size, irises=irises), solve_cfg,
                                 shape, params, refine.calibration_iterations)
            sr.advance(sr.max_iterations)
            params = sr.result().params
        return sr.result()

    def step(self, points: Tensor | None, irises: Tensor | None = None) -> tuple[FlameParams, float]:
        """Track the next frame: points (68, 2) iBUG-68 pixels (None: no face in this frame), irises (2, 2) or None.
        With ``refine``, first advance the shape's re-solve by at most ``iterations_per_frame`` iterations (swapping
        the new shape in when it is done), then fit this frame, then consider keeping it for the next re-solve.
        Returns (FlameParams, 1 frame on the CPU, NeRSemble pose convention, scale 1, ``shape`` the shape it was fitted
        with; mean static-landmark error in pixels, NaN for a held frame)."""
        self.frames += 1
        self.events = []
        if points is None:
            if self.previous is None:
                raise ValueError("FrameTracker.step: no face in the first frame to track (nothing to hold)")
            return self.previous, float("nan")
        raw = points.detach().reshape(68, 2).to("cpu", torch.float32)
        iris = None if irises is None else irises.detach().reshape(2, 2).to("cpu", torch.float32)
        if self.refine is not None:
            before = self.shape
            self._advance_refinement()
            self._advance_blend()
            if self.refine.refit_previous and self.shape is not before and self.last is not None:
                prev = self._fit(self.last[0], self.last[1], self.warm_cfg, self.previous, None)
                self.previous = prev.params.to("cpu")
        cfg, init = self.warm_cfg, self.previous
        if self.previous is None:
            if self.start is None:
                cfg = self.cold_cfg
            else:  # warm-started (no prior: there is no previous frame to tie to)
                init = self.start
            self.events.append("cold" if self.start is None else "warm_start")
        res = self._fit(raw, iris, cfg, init, self.previous)
        if "non_rigid_wide" in res.losses and self.previous is not None:
            self.events.append("wide")
        self.previous = res.params.to("cpu")
        self.last = (raw, iris)
        if self.reference is None:
            self.reference = self.first_reference = self.previous
        if self.refine is not None and not self._updates_spent():
            self._consider(raw, iris, self.previous)
        out = self.previous
        if self.offset is not None:
            out = replace(out, expression=out.expression - self.offset)
        if self.jaw_offset is not None:
            out = replace(out, jaw=out.jaw - self.jaw_offset)
        return out, float(res.errors[0])

    def close(self) -> None:
        """Wait for a background re-solve still running (the stream ended; its shape is not used)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _fit(self, raw: Tensor, iris: Tensor | None, cfg: FlameFitConfig, init: FlameParams | None,
             previous: FlameParams | None, lf: LandmarkFlame | None = None, shape: Tensor | None = None,
             bias: Tensor | None = None):
        """One frame's fit (raw points (68, 2), the detector offset removed here) with the current shape (or
        ``shape`` / ``bias`` on ``lf``: the background re-solve's thread, which shares no cache with the frames)."""
        pts = raw[None] - (self.bias if bias is None else bias)
        return fit_flame_to_landmarks(self.flame, LandmarkTargets(pts, self.image_size,
                                                                  irises=None if iris is None else iris[None]),
                                      cfg, shape=self.shape if shape is None else shape, init=init,
                                      previous=previous, landmark_flame=self.lf if lf is None else lf,
                                      tracking=True)

    # ------------------------------------------------------------------ the shape refined on the frames seen so far
    def _feature(self, params: FlameParams) -> Tensor:
        """(D,) what the kept frames should differ in: head rotation (axis-angle), jaw opening and the first
        expression coefficients, in :class:`ShapeRefineConfig`'s units."""
        from scipy.spatial.transform import Rotation

        rc = self.refine
        rot = Rotation.from_matrix(params.rotation_matrix[0].double().numpy()).as_rotvec()
        if rc.pose_only:
            return torch.as_tensor(rot, dtype=torch.float64) / rc.rotation_unit
        return torch.cat([torch.as_tensor(rot, dtype=torch.float64) / rc.rotation_unit,
                          params.jaw[0, :1].double() / rc.jaw_unit,
                          params.expression[0, :rc.expression_dims].double() / rc.expression_unit])

    def _consider(self, raw: Tensor, iris: Tensor | None, params: FlameParams) -> None:
        """Keep this frame if it widens the kept frames' spread (greedy max-min, see :class:`ShapeRefineConfig`)."""
        item = _Kept(raw, iris, params, self._feature(params), self.frames)
        if not self.kept:  # the reference frame: kept for good
            self.kept.append(item)
            return
        feats = torch.stack([k.feature for k in self.kept])  # (N, D)
        d_new = (feats - item.feature).norm(dim=1)  # (N,)
        if len(self.kept) < self.refine.frames:
            if float(d_new.min()) >= self.refine.min_distance:
                self.kept.append(item)
                self.changed = True
            return
        if len(self.kept) < 2:  # frames 1: the reference alone, nothing to replace
            return
        # full: the closest pair's member (never the reference) that the new frame would replace
        dist = torch.cdist(feats, feats)
        dist.fill_diagonal_(float("inf"))
        nearest = dist.min(dim=1).values  # (N,)
        nearest[0] = float("inf")
        victim = int(nearest.argmin())
        others = torch.cat([d_new[:victim], d_new[victim + 1:]])
        if float(others.min()) > float(nearest[victim]):
            self.kept[victim] = item
            self.changed = True

    def _advance_refinement(self) -> None:
        """Start a re-solve when the kept frames changed, run at most ``iterations_per_frame`` of its iterations,
        and swap its shape (and detector offset) in when it is done."""
        t = time.perf_counter()
        if self.solve is None and self.changed and len(self.kept) >= 2 and self._span_ok() and self._new_view() and \
                not self._updates_spent():
            self.solves_started += 1
            # in stream order: the solve ties consecutive kept frames by the frame-to-frame prior, as the batch
            # path's shape fit does its spread frames (without it the shape stayed near the first frames' one:
            # quick keyframe video brows 0.43 instead of 0.66 on the same 8 frames)
            frames = sorted(self.kept, key=lambda k: k.index)
            irises = None
            if all(k.irises is not None for k in frames):
                irises = torch.stack([k.irises for k in frames])
            init = FlameParams.cat([replace(k.params, shape=self.shape) for k in frames])
            solve_cfg = self.warm_cfg
            if self.refine.solve_shape_std > 0:
                solve_cfg = replace(solve_cfg, shape_std=self.refine.solve_shape_std)
            targets = LandmarkTargets(torch.stack([k.points for k in frames]), self.image_size, irises=irises)
            shape, iterations = self.shape, self.refine.iterations
            self.events.append("solve_start")
            if self.refine.background:  # built in its thread (the background solve's own LandmarkFlame: its tables
                # take ~10 ms to build, which the starting frame waited for before 2026-12-07h)
                def make() -> ShapeRefinement:
                    if self.lf_solve is None:
                        self.lf_solve = LandmarkFlame(self.flame)
                    return ShapeRefinement(self.lf_solve, targets, solve_cfg, shape, init, iterations)

                self.solve = _SolveJob(make)
            else:
                self.solve = ShapeRefinement(self.lf, targets, solve_cfg, shape, init, iterations)
            self.solve_frames = frames
            self.changed = False
            views = self._views(frames)
            self.solved_views = torch.stack([views.min(0).values, views.max(0).values])
            self.solve_started = self.frames
            if self.refine.background:
                self.thread_error = None
                self.thread = threading.Thread(target=self._run_solve, args=(self.solve, frames),
                                               daemon=False, name="FrameTracker shape re-solve")
                self.thread.start()
        if self.solve is None:
            done = False
        elif self.refine.background:
            done = self.frames - self.solve_started >= self.refine.delay_frames and (
                self.refine.wait or not self.thread.is_alive())
            if not done:
                self.events.append("solving")
            else:
                self.thread.join()
                self.thread = None
                if self.thread_error is not None:
                    raise RuntimeError("FrameTracker: the background shape re-solve failed") from self.thread_error
        else:
            done = self.solve.advance(self.refine.iterations_per_frame)
        if done:
            job = self.solve if isinstance(self.solve, _SolveJob) else None
            solve = job.solve if job is not None else self.solve
            res = solve.result() if job is None or "result" not in job.swap else job.swap["result"]
            self.solve_seconds += solve.seconds
            self.solve = None
            if bool(torch.isfinite(res.params.shape).all()) and bool(torch.isfinite(res.landmarks[:, 17:]).all()):
                self._swap(res, job.swap if job is not None else None)
        self.refine_seconds += time.perf_counter() - t

    def _run_solve(self, job: _SolveJob, frames: list[_Kept]) -> None:
        """The background thread: builds ``job``'s solve, runs all its iterations, then what the swap needs from
        the new shape (:meth:`_swap_inputs`; an error is raised by the step that swaps)."""
        try:
            if self.refine.background_nice > 0 and sys.platform.startswith("linux"):
                try:  # this thread only (on Linux a thread's id is a process id to setpriority)
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.refine.background_nice)
                except OSError:
                    pass
            job.solve = job.make()
            job.solve.advance(job.solve.max_iterations)
            res = job.solve.result()
            # (without bias_correction the offset kept is the tracker's at the swap: computed there)
            if self.bias_correction and bool(torch.isfinite(res.params.shape).all()) and \
                    bool(torch.isfinite(res.landmarks[:, 17:]).all()):
                job.swap = self._swap_inputs(res, frames, self.lf_solve)
                job.swap["result"] = res
        except BaseException as e:  # noqa: BLE001 -- handed to the tracking thread
            self.thread_error = e

    def _updates_spent(self) -> bool:
        """``max_updates`` re-solves were started (no more will be: the frames need not be considered for keeping)."""
        return 0 < self.refine.max_updates <= self.solves_started

    def _views(self, frames: list[_Kept]) -> Tensor:
        """(N, 2) head pitch and yaw of ``frames`` relative to the reference frame (axis-angle x, y; radians)."""
        from scipy.spatial.transform import Rotation

        ref = self.kept[0].params.rotation_matrix[0].double()
        rel = torch.stack([ref.T @ k.params.rotation_matrix[0].double() for k in frames])
        return torch.as_tensor(Rotation.from_matrix(rel.numpy()).as_rotvec()[:, :2], dtype=torch.float32)

    def _new_view(self) -> bool:
        """Some kept frame's head pitch or yaw lies ``new_view`` radians beyond the range the last solve covered
        (always true with ``new_view`` 0): depth, what the first frames' shape lacks, is only observed on turned or
        nodding frames, and a solve on frames that show no new view changes the shape (and the jaw's and brows'
        scale) without new information."""
        if self.refine.new_view <= 0:
            return True
        views = self._views(self.kept)
        beyond = torch.maximum(self.solved_views[0] - views.min(0).values, views.max(0).values - self.solved_views[1])
        return float(beyond.max()) >= self.refine.new_view

    def _span_ok(self) -> bool:
        """The kept frames' head yaw or pitch spans at least ``min_span`` radians (always true with ``min_span`` 0)."""
        if self.refine.min_span <= 0:
            return True
        rot = torch.stack([k.feature[:3] for k in self.kept]) * self.refine.rotation_unit  # (N, 3) axis-angle
        span = rot.max(0).values - rot.min(0).values  # (3,) per axis: x pitch, y yaw
        return float(span[:2].max()) >= self.refine.min_span

    def _swap_inputs(self, res, frames: list[_Kept], lf: LandmarkFlame | None = None) -> dict:
        """From a re-solve's result ``res`` on ``frames``: the new shape (1, 300), detector offset (68, 2) and the
        reference frame (``frames``' first: the kept reference) fitted again under them (FlameParams, 1 frame, CPU),
        on ``lf`` (None: the tracker's own; the background thread passes the solve's)."""
        params = res.params.to("cpu")
        shape = params.shape.detach().reshape(1, NUM_SHAPE).to(torch.float32)
        bias = self.bias
        if self.bias_correction:
            pts = torch.stack([k.points for k in frames])
            bias = torch.zeros(68, 2)
            bias[17:] = (pts - res.landmarks.cpu().to(pts.dtype))[:, 17:].mean(0)
        i = next(j for j, k in enumerate(frames) if k is self.kept[0])  # (the reference is never replaced)
        ref = frames[i]
        fit = self._fit(ref.points, ref.irises, self.warm_cfg, params.frame(i), None, lf=lf, shape=shape, bias=bias)
        return {"shape": shape, "bias": bias, "reference": fit.params.to("cpu")}

    def _swap(self, res, ready: dict | None = None) -> None:
        """The re-solve's shape and detector offset become the tracker's (at once, or over ``blend_frames`` frames);
        its frames keep their solved parameters; the reference frame is fitted again with the new shape (so relative
        head motion is measured under one shape) -- ``ready``: :meth:`_swap_inputs` already done (the background
        thread did it)."""
        self.events.append("swap")
        params = res.params.to("cpu")
        got = ready if ready else self._swap_inputs(res, self.solve_frames)
        shape, bias, reference = got["shape"], got["bias"], got["reference"]
        before = [k.params for k in self.solve_frames]  # their readings under the shape in use (continuity_frames)
        for i, k in enumerate(self.solve_frames):
            k.params = params.frame(i)
        old = (self.shape, self.bias)
        self.shape, self.bias = shape, bias
        ref = self.kept[0]
        offset = jaw_offset = None
        if self.refine.continuity:  # the reference frame's expression stays what it was first fitted as
            offset = reference.expression - self.first_reference.expression
            if self.refine.jaw_continuity:
                jaw_offset = reference.jaw - self.first_reference.jaw
            if self.refine.continuity_frames:  # the mean change over the solve's frames (the reference among them)
                fits = [reference if k is ref else
                        self._fit(k.points, k.irises, self.warm_cfg, k.params, None).params.to("cpu")
                        for k in self.solve_frames]
                # (the jaw keeps the reference frame's change: its level is the closed mouth the reference shows,
                # and on frames with the mouth open the change is the new shape's scale, not a level -- measured:
                # with the jaw too, seed-1 337-frame video jaw 0.972 -> 0.921)
                offset = (torch.zeros_like(offset) if self.offset is None else self.offset) + torch.stack(
                    [f.expression - b.expression for f, b in zip(fits, before)]).mean(0)
        self.shape_updates += 1
        if self.refine.blend_frames <= 0:
            self.reference, self.offset, self.jaw_offset = reference, offset, jaw_offset
            return
        # blend from where the tracker is now (a blend in progress included) towards the solved state
        self.shape, self.bias = old
        zero = torch.zeros(1, self.reference.expression.shape[1])
        self.blend = {"shape": (self.shape, shape), "bias": (self.bias, bias),
                      "offset": (zero if self.offset is None else self.offset, zero if offset is None else offset),
                      "jaw_offset": (torch.zeros(1, 3) if self.jaw_offset is None else self.jaw_offset,
                                     torch.zeros(1, 3) if jaw_offset is None else jaw_offset),
                      "reference": reference, "done": 0, "continuity": offset is not None}

    def _advance_blend(self) -> None:
        """One more frame of a shape being blended in (``blend_frames``): shape, detector offset and expression offset
        move linearly from their values at the swap to the solved ones; the reference frame switches at the end."""
        if self.blend is None:
            return
        self.events.append("blend")
        b = self.blend
        b["done"] += 1
        a = min(1.0, b["done"] / self.refine.blend_frames)
        mix = lambda pair: pair[0] + a * (pair[1] - pair[0])  # noqa: E731
        self.shape, self.bias = mix(b["shape"]), mix(b["bias"])
        if b["continuity"]:
            self.offset = mix(b["offset"])
            if self.refine.jaw_continuity:
                self.jaw_offset = mix(b["jaw_offset"])
        if a >= 1.0:
            self.reference = b["reference"]
            self.blend = None
