"""Small file helpers shared by every entry point: atomic writes and image/video output."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_tagged(path: str | os.PathLike, fmt: str, what: str, missing_hint: str, wrong: str) -> dict:
    """torch.load a dict written with ``{"format": fmt, ...}``; clear errors for a missing, unreadable or foreign
    file (``what`` names the kind of file, ``missing_hint`` says how to make it, ``wrong`` completes
    "<path> ..." for a file of another kind)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} ({missing_hint})")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable {what}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{path} {wrong}")
    return doc


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8 RGB (uint8 input is returned as is)."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def save_image(path: str | os.PathLike, image: Tensor | np.ndarray) -> Path:
    """Write an (H, W, 3) RGB float image in [0, 1] as PNG/JPEG (by extension)."""
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = to_uint8(image)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write image {path}")
    return path


def save_image_grid(path: str | os.PathLike, image: Tensor | np.ndarray) -> Path:
    """Alias of save_image for an already tiled grid (kept for readability at call sites)."""
    return save_image(path, image)


def write_video(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float = 25.0) -> Path:
    """Write uint8 RGB frames (H, W, 3) as an MP4 (OpenCV, mp4v codec); sizes are made even for players."""
    import cv2

    if not frames:
        raise ValueError("write_video needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    h2, w2 = h - h % 2, w - w % 2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w2, h2))
    if not writer.isOpened():
        raise OSError(f"OpenCV could not open a video writer for {path}")
    try:
        for f in frames:
            if f.shape[:2] != (h, w):
                raise ValueError(f"all video frames must be {w}x{h}, got {f.shape[1]}x{f.shape[0]}")
            writer.write(cv2.cvtColor(np.ascontiguousarray(f[:h2, :w2]), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return path
