"""Video files: an MP4 written one frame at a time and renamed into place (:class:`VideoStream`,
:func:`write_video`) and frames read by range or index (:func:`read_video_frames`)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# the temporary and its clean-up on failure are those of every atomic write (the encoder needs a file name)
from utils.core.atomic import _failed, _open_temp
from utils.core.images import cv2_path


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 25.0) -> Path:
    """Write uint8 RGB frames (H, W, 3) as an MP4 (OpenCV, mp4v codec); sizes are made even for players.  ``frames``
    may be any iterable (a generator keeps one frame in memory at a time; see :class:`VideoStream`)."""
    with VideoStream(path, fps) as stream:
        for f in frames:
            stream.write(f)
    if not stream.count:
        raise ValueError("write_video needs at least one frame")
    return stream.path


def read_video_frames(path: str | os.PathLike, frame_ids: Sequence[int] | np.ndarray | None = None, start: int = 0,
                      stride: int = 1, max_frames: int = 0) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Frames of a video file (OpenCV, read in order) -> (RGB uint8 frames (H, W, 3), their indices in the video (N,)
    int64, frames per second (25 when the file does not say)).

    Which frames: ``frame_ids`` (indices; reading stops after the last one wanted, those past the video's end are left
    out), else start, start + stride, ... (at most ``max_frames``; 0 = all; a ValueError when none is left).  A file
    OpenCV cannot open is a ValueError.  (:class:`VideoStream` is the writer.)"""
    import cv2

    if start < 0 or stride < 1 or max_frames < 0:
        raise ValueError(f"video frame selection needs start >= 0, stride >= 1 and max_frames >= 0, got start={start}, "
                         f"stride={stride}, max_frames={max_frames}")
    path = Path(path)
    cap = cv2.VideoCapture(cv2_path(path, "video"))
    if not cap.isOpened():
        raise ValueError(f"cannot open the video {path} (a format OpenCV reads: mp4, avi, mov, mkv, webm)")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
    want = None if frame_ids is None else {int(i) for i in frame_ids}
    frames, ids, i = [], [], 0
    try:
        while (not max_frames or len(frames) < max_frames) and (want is None or len(ids) < len(want)):
            ok, frame = cap.read()
            if not ok:
                break
            if (i in want) if want is not None else (i >= start and (i - start) % stride == 0):
                frames.append(np.ascontiguousarray(frame[..., ::-1]))  # BGR -> RGB
                ids.append(i)
            i += 1
    finally:
        cap.release()
    if not frames and want is None:
        raise ValueError(f"{path}: no frames to use (the video has {i} frames; start {start}, stride {stride})")
    return frames, np.asarray(ids, dtype=np.int64), fps


class VideoStream:
    """An MP4 written one frame at a time (a long motion never holds its frames in memory: a 1e6-frame motion at
    256 x 256 would be 196 GB).  Encoded into a temporary next to ``path`` (unique, O_EXCL, same suffix) and renamed
    by :meth:`close`; leaving the ``with`` block on an error removes the temporary, so there is never a half-written
    MP4 and never a write through a link planted at ``path``.

    ``write(frame)``: (H, W, 3) uint8 RGB, every frame of one size (odd sizes are cropped to even ones)."""

    def __init__(self, path: str | os.PathLike, fps: float = 25.0) -> None:
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"video frame rate must be a finite number > 0, got {fps!r}")
        self.path, self.fps = Path(path), float(fps)
        self.count = 0
        self.size: tuple[int, int] | None = None  # (w, h) of the frames given
        self._writer = None
        self._tmp: Path | None = None

    def write(self, frame: np.ndarray) -> None:
        import cv2

        h, w = frame.shape[:2]
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh, self._tmp = _open_temp(self.path)  # reserved with O_EXCL: the encoder opens a file of ours
            fh.close()
            self.size = (w, h)
            self._writer = cv2.VideoWriter(cv2_path(self._tmp, "video"), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                           (w - w % 2, h - h % 2))
            if not self._writer.isOpened():
                raise OSError(f"OpenCV could not open a video writer for {self.path}")
        if (w, h) != self.size:
            raise ValueError(f"all video frames must be {self.size[0]}x{self.size[1]}, got {w}x{h}")
        w2, h2 = w - w % 2, h - h % 2
        self._writer.write(cv2.cvtColor(np.ascontiguousarray(frame[:h2, :w2]), cv2.COLOR_RGB2BGR))
        self.count += 1

    def close(self) -> Path:
        """Finish the video and rename it into place; returns its path."""
        if self._writer is None:
            raise ValueError(f"{self.path}: a video needs at least one frame")
        self._writer.release()
        self._writer = None
        tmp, self._tmp = self._tmp, None
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException as exc:
            _failed(self.path, tmp, exc)
            raise
        return self.path

    def abort(self) -> None:
        """Drop the video: the temporary is removed, ``path`` is left as it was."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> "VideoStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._writer is not None:
            self.close()
