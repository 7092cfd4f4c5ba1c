"""Where an animation's motion comes from: FLAME parameter sequences (models.flame.FlameParams, T frames).

    built-in keyframes   a documented handful of expressions and head poses (``KEYFRAMES``), eased into each other
    a keyframes file     YAML / JSON: built-in names and/or keyframes of the same form (:func:`read_keyframes_file`)
    a tracking file      a NeRSemble ``tracked_flame_params.npz`` of any sequence (all its frames) or a VHAP npz
    a NeRSemble subject  ``<root>/<id>``: the tracking of one of its sequences, and its photos for a side-by-side video
    a video              reenactment: FLAME fitted to the landmarks of every frame (utils/face/reenactment.py)

Keyframe values are FLAME parameters: ``jaw``, ``neck`` (axis-angle, radians, about FLAME's x right-to-left of the
subject, y up, z out of the face) and ``eyes`` (left eye then right eye) are FLAME joints and mean the same on every
FLAME; ``expression`` coefficients do not: the expression keyframes (smile, raised brows, frown, pucker) are written
for the expression basis of the embedded synthetic FLAME (utils/data/synthetic/flame_model.py: components 0-6 are
mouth open, smile, brows raise, frown, pucker, cheek puff, squint).  FLAME 2023's expression space is a PCA basis
whose components carry no such names, so on real FLAME those keyframes show some expression, not necessarily the
named one; write a keyframes file with the coefficients you want there.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from models.flame import NUM_EXPRESSION, FlameParams, load_tracking
from utils.data.nersemble import (
    CALIBRATION_RELPATH,
    TRACKING_RELPATH,
    NersembleSubject,
    tracking_frame_ids,
)
from utils.identity import lerp, schedule

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
KEYFRAME_EXTENSIONS = (".yaml", ".yml", ".json")


@dataclass
class Keyframe:
    """One pose of a keyframe animation: FLAME expression coefficients by index (the rest 0), jaw, neck (axis-angle
    radians) and eyes (left eye then right eye, axis-angle radians)."""

    name: str
    expression: dict[int, float] = field(default_factory=dict)
    jaw: tuple[float, float, float] = (0.0, 0.0, 0.0)
    neck: tuple[float, float, float] = (0.0, 0.0, 0.0)
    eyes: tuple[float, ...] = (0.0,) * 6

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Keyframe":
        """From a mapping with optional keys name, expression ({index: value}), jaw (3), neck (3), eyes (3 for both
        eyes, or 6); unknown keys and wrong lengths raise ValueError naming ``where``."""
        known = {"name", "expression", "jaw", "neck", "eyes"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keyframe key(s) {unknown}; a keyframe has {sorted(known)}")
        expr = {}
        for k, v in dict(d.get("expression") or {}).items():
            if not 0 <= int(k) < NUM_EXPRESSION:
                raise ValueError(f"{where}: expression index {k} out of range 0..{NUM_EXPRESSION - 1}")
            expr[int(k)] = float(v)

        def vec(key: str, n: tuple[int, ...]) -> tuple[float, ...]:
            val = [float(x) for x in (d.get(key) or [0.0] * n[0])]
            if len(val) not in n:
                raise ValueError(f"{where}: '{key}' needs {' or '.join(map(str, n))} numbers, got {val}")
            return tuple(val * 2) if key == "eyes" and len(val) == 3 else tuple(val)

        return cls(str(d.get("name", "keyframe")), expr, vec("jaw", (3,)), vec("neck", (3,)), vec("eyes", (3, 6)))


# The built-in keyframes (see the module docstring for what the expression coefficients mean on which FLAME).
KEYFRAMES: dict[str, Keyframe] = {k.name: k for k in (
    Keyframe("neutral"),
    Keyframe("smile", expression={1: 1.5}, jaw=(0.03, 0.0, 0.0)),
    Keyframe("open_mouth", expression={0: 0.5}, jaw=(0.25, 0.0, 0.0)),
    Keyframe("raised_brows", expression={2: 1.5}),
    Keyframe("frown", expression={3: 1.5}),
    Keyframe("pucker", expression={4: 1.5}),
    Keyframe("head_turn_left", neck=(0.0, 0.35, 0.0)),    # the face turns towards the subject's left (+x)
    Keyframe("head_turn_right", neck=(0.0, -0.35, 0.0)),
    Keyframe("nod", neck=(0.25, 0.0, 0.0)),               # chin down
    Keyframe("tilt", neck=(0.0, 0.0, 0.2)),
    Keyframe("look_left", eyes=(0.0, 0.3, 0.0) * 2),
    Keyframe("look_right", eyes=(0.0, -0.3, 0.0) * 2),
)}
DEFAULT_KEYFRAMES = ("neutral", "smile", "neutral", "open_mouth", "neutral", "raised_brows", "frown", "neutral",
                     "head_turn_left", "head_turn_right", "neutral", "nod", "neutral", "look_left", "look_right",
                     "neutral")


def builtin_keyframe(name: str) -> Keyframe:
    if name not in KEYFRAMES:
        raise ValueError(f"unknown keyframe {name!r}; the built-in keyframes are {sorted(KEYFRAMES)}")
    return KEYFRAMES[name]


def keyframe_params(keys: Sequence[Keyframe], frames_per_transition: int) -> FlameParams:
    """FlameParams of an animation through ``keys``: ``frames_per_transition`` frames from each key to the next, eased
    (0.5 - 0.5 cos) so that the motion starts and stops smoothly at every key, plus the last key:
    frames_per_transition * (K - 1) + 1 frames.  Identity head placement (rotation I, translation 0, scale 1) and zero
    shape: :func:`models.posing.retarget` puts it on an identity."""

    keys = list(keys)
    if len(keys) == 1:
        keys = keys * 2
    if frames_per_transition < 1:
        raise ValueError(f"frames per keyframe transition must be >= 1, got {frames_per_transition}")

    def vec(k: Keyframe) -> torch.Tensor:
        e = torch.zeros(NUM_EXPRESSION)
        for i, v in k.expression.items():
            e[i] = v
        return torch.cat([e, torch.tensor(k.jaw), torch.tensor(k.neck), torch.tensor(k.eyes, dtype=torch.float32)])

    vecs = [vec(k) for k in keys]
    rows = [lerp(vecs[i], vecs[j], 0.5 - 0.5 * math.cos(math.pi * t))
            for i, j, t in schedule(len(keys), frames_per_transition, loop=False)]
    x = torch.stack(rows)  # (T, 100 + 3 + 3 + 6)
    p = FlameParams.neutral(len(rows))
    n = NUM_EXPRESSION
    return FlameParams(shape=p.shape, expression=x[:, :n].contiguous(), rotation_matrix=p.rotation_matrix,
                       translation=p.translation, jaw=x[:, n:n + 3].contiguous(), neck=x[:, n + 3:n + 6].contiguous(),
                       eyes=x[:, n + 6:].contiguous(), scale=p.scale)


def read_keyframes_file(path: str | os.PathLike) -> tuple[list[Keyframe], int | None]:
    """A keyframes file: YAML or JSON, either a list of keyframes or a mapping with ``keyframes`` (the list) and
    optionally ``frames_per_transition``.  Each keyframe is a built-in name or a mapping (:meth:`Keyframe.from_dict`).
    Returns (keyframes, frames_per_transition or None)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keyframes file not found: {path}")
    try:
        doc = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path} is not a valid keyframes file: {exc}") from exc
    per = None
    if isinstance(doc, dict):
        per = doc.get("frames_per_transition")
        doc = doc.get("keyframes")
    if not isinstance(doc, list) or not doc:
        raise ValueError(f"{path}: expected a non-empty list of keyframes (or a mapping with 'keyframes')")
    keys = [builtin_keyframe(k) if isinstance(k, str) else Keyframe.from_dict(k, f"{path} keyframe {i}")
            if isinstance(k, dict) else None for i, k in enumerate(doc)]
    if any(k is None for k in keys):
        raise ValueError(f"{path}: every keyframe must be a built-in name or a mapping")
    return keys, None if per is None else int(per)


@dataclass
class Motion:
    """A motion: FlameParams (T frames, NeRSemble head-pose convention) and where it came from.

    Attributes:
        params: the frames.
        frame_ids: (T,) frame numbers (the tracking file's ``frames`` key; 0..T-1 otherwise).
        kind: "keyframes", "tracking" or "video".
        source: a description (file or keyframe names).
        subject: the NeRSemble subject (any frame) when the motion is one of a subject's sequences, else None.
        video: the driving video's path (video motions).
        fps: the driving video's frame rate (video motions), else None.
        info: how the motion was made (reenactment: focal length, landmark errors, ...).
    """

    params: FlameParams
    frame_ids: np.ndarray
    kind: str
    source: str
    subject: NersembleSubject | None = None
    video: Path | None = None
    fps: float | None = None
    info: dict = field(default_factory=dict)

    def select(self, start: int = 0, stride: int = 1, max_frames: int = 0) -> "Motion":
        """Frames start, start + stride, ... (at most ``max_frames``; 0 = all)."""
        T = self.params.num_frames
        if max_frames < 0:  # [: -1] would silently drop the last frame
            raise ValueError(f"--max_frames must be >= 0 (0: all frames), got {max_frames}")
        if not 0 <= start < T or stride < 1:
            raise ValueError(f"frame selection start={start}, stride={stride} is empty for a motion of {T} frames")
        idx = list(range(start, T, stride))[: max_frames or None]
        return Motion(self.params.frames(idx), self.frame_ids[idx], self.kind, self.source, self.subject,
                      self.video, self.fps, self.info)

    def photo(self, t: int, serial: str) -> np.ndarray | None:
        """The subject's photo of camera ``serial`` for motion frame ``t`` (float32 (H, W, 3)), None when absent."""
        if self.subject is None:
            return None
        s = NersembleSubject(self.subject.root, self.subject.subject_id, self.subject.sequence,
                             int(self.frame_ids[t]))
        try:
            return s.image(serial)
        except FileNotFoundError:
            return None


def subject_of_tracking(path: Path) -> NersembleSubject | None:
    """The NeRSemble subject whose sequence a tracking file belongs to (``<root>/<id>/sequences/<seq>/`` +
    TRACKING_RELPATH), or None for a file elsewhere."""
    parts = TRACKING_RELPATH.parts
    p = path.resolve()
    if tuple(p.parts[-len(parts):]) != parts:
        return None
    seq_dir = p.parents[len(parts) - 1]
    subject_dir = seq_dir.parent.parent
    if seq_dir.parent.name != "sequences" or not (subject_dir / CALIBRATION_RELPATH).is_file():
        return None
    return NersembleSubject(subject_dir.parent, subject_dir.name, seq_dir.name)


def load_motion(source: str, flame: Any, keyframes: Sequence[str] = (), frames_per_transition: int = 12,
                sequence: str = "EXP-1-head", reenact: Any = None) -> Motion:
    """Resolve ``source`` into a Motion.

    Args:
        source: "keyframes" (built in; ``keyframes`` picks and orders them, default :data:`DEFAULT_KEYFRAMES`), a
            keyframes file (.yaml/.yml/.json), a tracking .npz (NeRSemble or VHAP), a NeRSemble subject folder (the
            tracking of ``sequence``), or a video file.
        flame: the FlameModel (bakes VHAP's root pivot).
        reenact: for a video, a callable ``(video path) -> Motion`` (utils/face/reenactment.py); None: videos are
            refused.
    """
    path = Path(source)
    if source == "keyframes":
        keys = [builtin_keyframe(k) for k in (keyframes or DEFAULT_KEYFRAMES)]
        params = keyframe_params(keys, frames_per_transition)
        names = ", ".join(k.name for k in keys)
        return Motion(params, np.arange(params.num_frames), "keyframes", f"keyframes: {names}")
    if path.suffix.lower() in KEYFRAME_EXTENSIONS:
        keys, per = read_keyframes_file(path)
        params = keyframe_params(keys, per or frames_per_transition)
        return Motion(params, np.arange(params.num_frames), "keyframes", str(path))
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        if not path.is_file():
            raise FileNotFoundError(f"driving video not found: {path}")
        if reenact is None:
            raise ValueError(f"{path}: video reenactment is not available here (it needs the landmark detector and "
                             f"the FLAME landmark fit, utils/face/landmarks.py and utils/face/flame_fit.py)")
        return reenact(path)
    if path.is_dir():
        if not (path / CALIBRATION_RELPATH).is_file():
            raise FileNotFoundError(f"{path} is not a NeRSemble subject folder (no {CALIBRATION_RELPATH.as_posix()}); "
                                    f"--motion takes keyframes, a keyframes file, a tracking .npz, a subject folder "
                                    f"or a video")
        subject = NersembleSubject(path.parent, path.name, sequence)
        path = subject.tracking_path
        if not path.is_file():
            have = subject.sequences()
            raise FileNotFoundError(f"no FLAME tracking for sequence {sequence!r} of {subject.subject_dir}: {path} "
                                    f"(its sequences: {have}; choose one with --sequence)")
    elif path.suffix.lower() == ".npz":
        subject = subject_of_tracking(path) if path.is_file() else None
    else:
        raise ValueError(f"--motion {source!r}: expected 'keyframes', a keyframes file "
                         f"({', '.join(KEYFRAME_EXTENSIONS)}), a tracking .npz, a NeRSemble subject folder or a video "
                         f"({', '.join(VIDEO_EXTENSIONS)})")
    params = load_tracking(path, flame=flame)  # FileNotFoundError / ValueError name the file
    return Motion(params, tracking_frame_ids(path, params.num_frames), "tracking", str(path), subject)
