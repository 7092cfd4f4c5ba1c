"""Streaming FLAME tracking: one video frame at a time, warm-started from the previous frame.

``FrameTracker`` is the streaming counterpart of utils/face/reenactment.py's chunked batch fit: each frame is one
:func:`utils.face.flame_fit.fit_flame_to_landmarks` call (T = 1) with the person's shape and focal length held fixed
(:meth:`FrameTracker.calibrate`) and a frame-to-frame prior that looks only backwards.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import Tensor

from models.flame import NUM_SHAPE, FlameModel, FlameParams
from utils.face.flame_fit import FlameFitConfig, LandmarkTargets, fit_flame_to_landmarks
from utils.face.landmark_flame import LandmarkFlame


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
    """

    def __init__(self, flame: FlameModel, image_size: tuple[int, int], shape: Tensor, focal: float,
                 cfg: FlameFitConfig | None = None, bias: Tensor | None = None, iterations: int = 0) -> None:
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
        self.lf = LandmarkFlame(flame)
        self.previous: FlameParams | None = None  # (1 frame, CPU) the last frame's parameters
        self.frames = 0  # frames tracked (with or without a face)

    @classmethod
    def calibrate(cls, flame: FlameModel, points: Tensor, irises: Tensor | None, image_size: tuple[int, int],
                  cfg: FlameFitConfig | None = None, bias_correction: bool = True, iterations: int = 0
                  ) -> tuple["FrameTracker", dict]:
        """The tracker of one person from N frames with a face (the first ones of a stream): one FLAME fit of all N
        (shared shape and, as ``cfg`` says, focal length), and the detector's mean per-landmark offset on this face
        (the static landmarks' mean residual, as the batch fit's ``bias_correction``).

        Args:
            points: (N, 68, 2) iBUG-68 pixels; irises: (N, 2, 2) or None.
        Returns:
            (FrameTracker, info: focal_px, detector_offset_rms_px, calibration_frames, seconds)."""
        cfg = cfg or FlameFitConfig()
        t0 = time.perf_counter()
        first = fit_flame_to_landmarks(flame, LandmarkTargets(points, image_size, irises=irises), cfg)
        bias = torch.zeros(68, 2)
        if bias_correction:
            bias[17:] = (points.cpu() - first.landmarks.cpu().to(points.dtype))[:, 17:].mean(0)
        tracker = cls(flame, image_size, first.params.shape, float(first.camera.fx), cfg, bias, iterations)
        info = {"focal_px": float(first.camera.fx), "calibration_frames": int(points.shape[0]),
                "detector_offset_rms_px": float(bias[17:].norm(dim=-1).square().mean().sqrt()),
                "seconds": time.perf_counter() - t0}
        return tracker, info

    def step(self, points: Tensor | None, irises: Tensor | None = None) -> tuple[FlameParams, float]:
        """Track the next frame: points (68, 2) iBUG-68 pixels (None: no face in this frame), irises (2, 2) or None.
        Returns (FlameParams, 1 frame on the CPU, NeRSemble pose convention, scale 1; mean static-landmark error in
        pixels, NaN for a held frame)."""
        self.frames += 1
        if points is None:
            if self.previous is None:
                raise ValueError("FrameTracker.step: no face in the first frame to track (nothing to hold)")
            return self.previous, float("nan")
        pts = points.detach().reshape(1, 68, 2).to("cpu", torch.float32) - self.bias
        iris = None if irises is None else irises.detach().reshape(1, 2, 2).to("cpu", torch.float32)
        cfg = self.cold_cfg if self.previous is None else self.warm_cfg
        res = fit_flame_to_landmarks(self.flame, LandmarkTargets(pts, self.image_size, irises=iris), cfg,
                                     shape=self.shape, init=self.previous, previous=self.previous,
                                     landmark_flame=self.lf, tracking=True)
        self.previous = res.params.to("cpu")
        return self.previous, float(res.errors[0])
