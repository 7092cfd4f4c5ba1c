"""The frames of a subject's synthetic sequence: per-frame expression, jaw, neck and eye parameters
(:func:`sample_frame_params`) and, for ``motion="head_turn"``, a global head rotation over the clip."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from models.flame import (
    FlameParams,
)
from utils.data.synthetic.identity import SyntheticIdentity, _as_int, _rotation

MOTION_STREAM = 1_000_003  # seeds the frames of a sequence apart from the identity's own streams


def sample_frame_params(seed: int, subject_id: str, frame: int, neutral: Any) -> Any:
    """FLAME parameters (FlameParams, T = 1) of frame ``frame`` >= 1 of a subject's synthetic sequence.

    The identity's shape and head placement (rotation, translation, scale) stay those of its neutral frame
    ``neutral``; expression, jaw, neck and eyes are drawn afresh for every frame, from a generator seeded by
    (seed, subject_id, frame) alone, so adding frames never changes existing ones.  Ranges: the first seven
    expression coefficients (the synthetic FLAME's mouth open, smile, brows raise, frown, pucker, cheek puff, squint;
    utils/data/synthetic/flame_model.py) uniform in [0, 0.8] (mouth open) and [-1, 1], the next 13 N(0, 0.5^2); jaw
    opening uniform in [0, 0.12] rad about x (+ N(0, 0.01^2) about y and z); neck uniform in [-0.08, 0.08] rad per
    axis; one gaze for both eyes, yaw in [-0.15, 0.15] and pitch in [-0.1, 0.1] rad."""
    if frame < 1:
        raise ValueError(f"frame must be >= 1 (frame 0 is the neutral frame), got {frame}")
    r = np.random.default_rng(np.random.SeedSequence([int(seed), _as_int(subject_id), MOTION_STREAM, int(frame)]))
    expr = np.zeros((1, neutral.expression.shape[1]))
    expr[0, 0] = r.uniform(0.0, 0.8)
    expr[0, 1:7] = r.uniform(-1.0, 1.0, 6)
    expr[0, 7:20] = r.normal(0.0, 0.5, 13)
    jaw = np.array([[r.uniform(0.0, 0.12), r.normal(0.0, 0.01), r.normal(0.0, 0.01)]])
    neck = r.uniform(-0.08, 0.08, (1, 3))
    gaze = np.array([r.uniform(-0.1, 0.1), r.uniform(-0.15, 0.15), 0.0])
    eyes = np.tile(gaze, 2)[None]
    t = lambda a: torch.as_tensor(a, dtype=neutral.expression.dtype)  # noqa: E731
    return replace(neutral, expression=t(expr), jaw=t(jaw), neck=t(neck), eyes=t(eyes))


MOTIONS = ("expressions", "head_turn")  # what frames 1..N-1 of a sequence carry (see sequence_params)
HEAD_TURN_YAW_DEG = 35.0  # head_turn: peak global yaw (degrees) over the clip
HEAD_TURN_PITCH_DEG = 15.0  # head_turn: peak global pitch (degrees)


def head_turn_angles(frame: int, num_frames: int) -> tuple[float, float]:
    """(yaw, pitch) in degrees of frame ``frame`` of a head-turning sequence of ``num_frames`` frames: one full yaw
    sweep (0 -> +35 -> 0 -> -35 -> 0) and two pitch periods over the clip, so a monocular video sees the face from
    both sides and from above and below; frame 0 is (0, 0)."""
    phase = 2.0 * math.pi * frame / max(1, num_frames)
    return HEAD_TURN_YAW_DEG * math.sin(phase), HEAD_TURN_PITCH_DEG * math.sin(2.0 * phase)


def head_turned(params: Any, yaw: float, pitch: float, pivot: np.ndarray) -> Any:
    """``params`` (FlameParams, T = 1, rotate_about_root False) with the whole head additionally rotated by (yaw,
    pitch) degrees about the world point ``pivot`` (3,) (the head's centre): R' = Q R, t' = Q (t - p) + p."""
    Q = torch.as_tensor(_rotation(yaw, pitch, 0.0), dtype=params.rotation_matrix.dtype)
    p = torch.as_tensor(np.asarray(pivot, np.float64), dtype=params.translation.dtype)
    return replace(params, rotation_matrix=Q @ params.rotation_matrix,
                   translation=(params.translation - p) @ Q.T + p)


def sequence_params(identity: SyntheticIdentity, seed: int, num_frames: int, motion: str = "expressions",
                    pivot: np.ndarray | None = None) -> Any:
    """FlameParams (T = num_frames) of a subject's synthetic sequence: frame 0 is the identity's neutral frame,
    frames 1..T-1 come from :func:`sample_frame_params`; with ``motion="head_turn"`` they are also globally rotated
    about ``pivot`` (the head's world centre, (3,)) by :func:`head_turn_angles` (+-35 deg yaw, +-15 deg pitch)."""

    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    frames = [sample_frame_params(seed, identity.subject_id, t, identity.params) for t in range(1, num_frames)]
    if motion == "head_turn":
        if pivot is None:
            raise ValueError("motion='head_turn' needs the head's world centre (pivot)")
        frames = [head_turned(f, *head_turn_angles(t, num_frames), pivot) for t, f in enumerate(frames, 1)]
    return FlameParams.cat([identity.params] + frames)
