"""Video reenactment: the FLAME motion of the person in a video, to drive any head of the field (``animate.py --motion
video.mp4``, one person's head driven by another person's video).

    frames      the video's frames (``start`` / ``stride`` / ``max_frames`` of them), RGB
    landmarks   mediapipe face mesh in video mode (utils/face/landmarks.py): iBUG-68 points and the iris centres per
                frame; a frame without a usable face gets zero weight (its points, copied from the nearest frame with a
                face, only seed the fit) and is filled by the temporal smoothness
    shape       utils/face/flame_fit.py on ``shape_frames`` frames spread over the video: the person's FLAME shape (one
                for all frames), the focal length, and the detector's systematic per-landmark offset on this face (the
                mean residual of the static landmarks), which is subtracted from every frame: what varies over the
                frames is then what FLAME explains by expression, jaw, eyes and pose
    motion      utils/face/flame_fit.py on all frames, in chunks of ``chunk`` frames, with that shape and focal length
                held fixed: expression, jaw and eye rotations and head pose per frame, with temporal smoothness

The result is a utils/motion.py Motion (kind "video") in the fitted camera's world (NeRSemble head-pose convention):
``models.posing.retarget`` puts it on any identity, relative to the video's first frame by default.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models.flame import FlameModel, FlameParams
from utils.core.config import Range
from utils.core.video import read_video_frames
from utils.face.flame_fit import FlameFitConfig, LandmarkTargets, fit_flame_to_landmarks
from utils.face.landmarks import FaceTooSmallError, LandmarkDetector, LandmarkError
from utils.motion import Motion


@dataclass
class ReenactConfig:
    """How a driving video becomes FLAME parameters (``reenact.*`` keys of animate.py)."""

    shape_frames: int = 16  # frames, spread over the video, that fit the person's FLAME shape and the focal length
    chunk: int = 120  # frames fitted together (temporal smoothness acts within a chunk)
    bias_correction: bool = True  # subtract the detector's mean per-landmark offset from the shape fit's residuals
    min_face_px: float = 40.0  # smallest usable face (height of its landmark box, pixels); smaller: no face
    flame_fit: FlameFitConfig = field(default_factory=FlameFitConfig)  # the landmark fit (utils/face/flame_fit.py)

    RANGES = {"shape_frames": Range(1), "chunk": Range(1), "min_face_px": Range(1)}


def read_video(path: str | Path, start: int = 0, stride: int = 1, max_frames: int = 0
               ) -> tuple[list[np.ndarray], np.ndarray, float]:
    """(RGB uint8 frames (H, W, 3), their indices in the video, frames per second) of frames start, start + stride,
    ... (at most ``max_frames``; 0 = all): :func:`utils.core.video.read_video_frames`."""
    return read_video_frames(path, start=start, stride=stride, max_frames=max_frames)


@dataclass
class VideoFaces:
    """What the face detector found in a video's frames.

    Attributes:
        points: (T, 68, 2) iBUG-68 pixels, NaN rows where ``found`` is False.
        irises: (T, 2, 2) iris centres (subject's right eye, then left), or None when no frame has irises.
        found: (T,) bool, the frames with a usable face.
        outlines: per frame the detector's face outline polygon (K, 2) pixels ((0, 2) without a face): what the
            face masks are clipped to (the projected FLAME face mask reaches into hair and background).
        too_small: frames whose face was found but is under ``min_face_px`` (counted among the frames without one).
        largest_too_small_px: the tallest of those faces (pixels, forehead to chin; 0 when none), for the error
            message that tells how far the clip is from usable.
    """

    points: Tensor
    irises: Tensor | None
    found: Tensor
    outlines: list[np.ndarray]
    too_small: int = 0
    largest_too_small_px: float = 0.0


def detect_video_faces(frames: list[np.ndarray], min_face_px: float = 40.0, progress: bool = True) -> VideoFaces:
    """Landmarks, iris centres and face outlines of every frame (mediapipe's face mesh in video mode); frames
    without a face (or with one under ``min_face_px`` pixels high) get NaN points and an empty outline."""

    T = len(frames)
    pts = torch.full((T, 68, 2), float("nan"))
    irises = torch.full((T, 2, 2), float("nan"))
    found = torch.zeros(T, dtype=torch.bool)
    outlines = [np.zeros((0, 2), np.float32) for _ in range(T)]
    too_small, largest_small = 0, 0.0
    with LandmarkDetector(static_images=False, min_face_px=min_face_px) as det:
        for t, frame in enumerate(tqdm(frames, desc="landmarks", unit="frame", disable=not progress, leave=False)):
            try:
                lm = det.detect(frame, f"frame {t}")
            except FaceTooSmallError as exc:
                too_small, largest_small = too_small + 1, max(largest_small, exc.size)
                continue
            except LandmarkError:
                continue
            pts[t] = torch.as_tensor(lm.ibug68, dtype=torch.float32)
            found[t] = True
            outlines[t] = np.asarray(lm.outline, np.float32).reshape(-1, 2)
            if len(lm.mesh) >= 478:  # iris centres 468 and 473; which one is the subject's right eye is measured
                a, b = lm.mesh[468, :2], lm.mesh[473, :2]
                right = lm.ibug68[36:42].mean(0)
                pair = [a, b] if np.linalg.norm(a - right) < np.linalg.norm(b - right) else [b, a]
                irises[t] = torch.as_tensor(np.stack(pair), dtype=torch.float32)
    return VideoFaces(pts, irises if bool(torch.isfinite(irises).all(-1).all(-1).any()) else None, found, outlines,
                      too_small, largest_small)


def detect_video_landmarks(frames: list[np.ndarray], min_face_px: float = 40.0, progress: bool = True
                           ) -> tuple[Tensor, Tensor | None, Tensor]:
    """iBUG-68 points (T, 68, 2), iris centres (T, 2, 2) (subject's right eye, then left; None without irises) and a
    (T,) bool of the frames with a face, from mediapipe's face mesh in video mode (:func:`detect_video_faces`
    without the outlines).  Frames without a face get NaN."""
    faces = detect_video_faces(frames, min_face_px, progress)
    return faces.points, faces.irises, faces.found


def _seeded(x: Tensor | None, found: Tensor) -> tuple[Tensor | None, Tensor]:
    """Frames without a face take the values of the nearest frame with one (only to seed the fit); (x, weights)."""
    if x is None:
        return None, found.float()
    have = torch.nonzero(found).flatten()
    nearest = have[(torch.arange(len(found))[:, None] - have[None]).abs().argmin(1)]
    return x[nearest], found.float()


def fit_video_motion(flame: FlameModel, points: Tensor, irises: Tensor | None, found: Tensor,
                     image_size: tuple[int, int], cfg: ReenactConfig | None = None, progress: bool = True
                     ) -> tuple[FlameParams, dict]:
    """FLAME parameters (T frames, one shape) of a face's landmarks over a video (see the module docstring).

    Args:
        points: (T, 68, 2) iBUG-68 pixels (NaN rows where ``found`` is False); irises: (T, 2, 2) or None;
        found: (T,) frames with a face; image_size: (w, h).
    Returns:
        (FlameParams on ``flame``'s device, NeRSemble head-pose convention, scale 1; info dict with the focal length,
        the detector offset removed (pixels, RMS), the landmark error per frame and seconds).
    """
    cfg = cfg or ReenactConfig()
    t0 = time.perf_counter()
    T = points.shape[0]
    if not bool(found.any()):
        raise ValueError("no face in any frame of the driving video (the detector needs a clearly visible, roughly "
                         "frontal face that fills a good part of the frame)")
    pts, weights = _seeded(points, found)
    iris, _ = _seeded(irises, found)
    weights = weights[:, None].expand(T, 68).clone()
    with_face = torch.nonzero(found).flatten()
    pick = with_face[torch.linspace(0, len(with_face) - 1, min(cfg.shape_frames, len(with_face))).round().long()]
    first = fit_flame_to_landmarks(flame, LandmarkTargets(pts[pick], image_size, irises=None if iris is None
                                                          else iris[pick]), cfg.flame_fit)
    shape = first.params.shape
    bias = torch.zeros(1, 68, 2)
    if cfg.bias_correction:
        bias[:, 17:] = (pts[pick] - first.landmarks.to(pts))[:, 17:].mean(0, keepdim=True)
    fit_cfg = replace(cfg.flame_fit, focal=float(first.camera.fx), fit_focal=False)
    chunks, errors = [], []
    bar = tqdm(total=T, desc="FLAME fit", unit="frame", disable=not progress, leave=False)
    for a in range(0, T, max(1, cfg.chunk)):
        sel = slice(a, min(T, a + max(1, cfg.chunk)))
        res = fit_flame_to_landmarks(flame, LandmarkTargets(pts[sel] - bias, image_size, weights=weights[sel],
                                                            irises=None if iris is None else iris[sel]),
                                     fit_cfg, shape=shape)
        chunks.append(res.params)
        errors.append(res.errors)
        bar.update(sel.stop - sel.start)
    bar.close()
    info = {"focal_px": float(first.camera.fx), "frames_with_face": int(found.sum()), "frames": T,
            "detector_offset_rms_px": float(bias[0, 17:].norm(dim=-1).square().mean().sqrt()),
            "landmark_error_px": [float(e) for e in torch.cat(errors)], "seconds": time.perf_counter() - t0}
    return FlameParams.cat(chunks), info


def reenact_video(path: str | Path, flame: FlameModel, cfg: ReenactConfig | None = None, start: int = 0,
                  stride: int = 1, max_frames: int = 0, progress: bool = True) -> Motion:
    """A driving video -> Motion (kind "video"; ``frame_ids`` are the video's frame indices, ``fps`` its rate)."""
    cfg = cfg or ReenactConfig()
    frames, ids, fps = read_video(path, start, stride, max_frames)
    h, w = frames[0].shape[:2]
    points, irises, found = detect_video_landmarks(frames, cfg.min_face_px, progress)
    params, info = fit_video_motion(flame, points, irises, found, (w, h), cfg, progress)
    return Motion(params.to("cpu"), ids, "video", str(path), video=Path(path), fps=fps, info=info)
