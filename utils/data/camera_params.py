"""NeRSemble ``camera_params.json`` files: reading them into Cameras (every matrix checked, intrinsics scaled to the
images actually used) and writing them.

The file holds ``world_2_cam`` {serial: (4, 4)} and ``intrinsics`` ((3, 3) shared, or {serial: (3, 3)}) for the
calibration frames, whose size is ``width`` / ``height`` when present, else NeRSemble's 2200 x 3208."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from models.camera import Camera
from utils.core.atomic import atomic_write_text
from utils.core.images import image_size as stored_image_size
from utils.core.names import safe_name

# Full-resolution NeRSemble frames are 2200 x 3208 (w x h, portrait); calibration refers to them.
NERSEMBLE_CALIB_SIZE = (2200, 3208)


def _matrix(value, shape: tuple[int, int], path: Path, key: str) -> np.ndarray:
    """A (rows, cols) matrix of finite numbers from camera_params.json, else ValueError naming the file and key."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):  # ragged rows or non-numbers
        rows = [len(r) if isinstance(r, (list, tuple)) else type(r).__name__ for r in value] \
            if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"{path}: {key} must be a {shape[0]}x{shape[1]} matrix of numbers, got rows of lengths "
                         f"{rows}") from None
    if m.shape != shape:
        raise ValueError(f"{path}: {key} must be a {shape[0]}x{shape[1]} matrix, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError(f"{path}: {key} holds NaN or Inf values")
    return m


def _check_intrinsics(K: np.ndarray, calib_w: int, calib_h: int, size_given: bool, path: Path, serial: str) -> None:
    """ValueError naming the file unless K is a pinhole matrix of the calibration frames: positive focal lengths
    and the principal point inside the frame.  Without "width"/"height" the frames are assumed to be NeRSemble's
    2200 x 3208, and a principal point far from their centre means the file was written for other frames (scaling
    it as if it were NeRSemble's puts the face outside the image and gives empty face masks)."""
    fx, fy, cx, cy = float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])
    if fx <= 0 or fy <= 0:
        raise ValueError(f"{path}: camera {serial}: focal lengths must be > 0 pixels, got fx={fx:g}, fy={fy:g}")
    if not np.allclose(K[2], (0.0, 0.0, 1.0)):
        raise ValueError(f"{path}: camera {serial}: the intrinsics' last row must be [0, 0, 1], got {K[2].tolist()}")
    lo, hi = (0.0, 1.0) if size_given else (0.2, 0.8)
    if not (lo * calib_w < cx < hi * calib_w and lo * calib_h < cy < hi * calib_h):
        if size_given:
            raise ValueError(f"{path}: camera {serial}: principal point ({cx:g}, {cy:g}) lies outside the "
                             f"{calib_w}x{calib_h} calibration frame given by 'width'/'height'")
        raise ValueError(f"{path} has no 'width'/'height', so its intrinsics are taken to be for NeRSemble's "
                         f"{calib_w}x{calib_h} frames, but camera {serial}'s principal point ({cx:g}, {cy:g}) is far "
                         f"from their centre: add \"width\" and \"height\" (the calibration images' size in pixels)")


def load_camera_params(
    path: str | os.PathLike,
    image_size: tuple[int, int] | Mapping[str, tuple[int, int]] | None = None,
    image_dir: str | os.PathLike | None = None,
    serials: Sequence[str] | None = None,
    tolerance: float = 0.01,
) -> dict[str, Camera]:
    """Read a NeRSemble ``camera_params.json`` into cameras for the images actually used.

    The file holds ``"world_2_cam"``: {serial: 4x4}, ``"intrinsics"``: one shared 3x3 or {serial: 3x3}, both for the
    calibration frames (``"width"``/``"height"`` when present, else 2200 x 3208).  Intrinsics are rescaled to the
    image size: given as ``image_size`` (w, h) or {serial: (w, h)}, or read from ``image_dir/cam_<serial>.(jpg|png)``.
    The x and y ratios must agree (within ``tolerance``) with each other and across cameras, else ValueError.

    Returns:
        {serial: Camera} in the order of ``serials`` (default: the file's order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"camera calibration not found: {path} (expected <subject>/calibration/camera_params.json from NeRSemble)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'world_2_cam' and 'intrinsics', "
                         f"got {type(data).__name__}")
    for key in ("world_2_cam", "intrinsics"):
        if key not in data:
            raise ValueError(f"{path} lacks the key {key!r}; found keys {sorted(data)}")
    w2c_all = data["world_2_cam"]
    if not isinstance(w2c_all, dict):
        raise ValueError(f"{path}: 'world_2_cam' must map camera serials to 4x4 matrices, got {type(w2c_all).__name__}")
    calib = []
    for key, default in (("width", NERSEMBLE_CALIB_SIZE[0]), ("height", NERSEMBLE_CALIB_SIZE[1])):
        val = data.get(key, default)
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val != int(val) or val <= 0:
            raise ValueError(f"{path}: '{key}' must be a positive whole number of pixels, got {val!r}")
        calib.append(int(val))
    calib_w, calib_h = calib
    intr = data["intrinsics"]
    wanted = list(serials) if serials is not None else list(w2c_all)
    cams: dict[str, Camera] = {}
    ratios: dict[str, float] = {}
    for serial in wanted:
        # serials name image files (cam_<serial>.png) that are read and written: one safe component each
        safe_name(serial, "camera serial", path)
        if serial not in w2c_all:
            raise KeyError(f"camera {serial} is not in {path} (it has {sorted(w2c_all)})")
        if isinstance(intr, dict) and serial not in intr:
            raise KeyError(f"camera {serial} has no intrinsics in {path} (it has intrinsics for {sorted(intr)})")
        K = _matrix(intr[serial] if isinstance(intr, dict) else intr, (3, 3), path,
                    f"intrinsics[{serial!r}]" if isinstance(intr, dict) else "'intrinsics'")
        w2c = _matrix(w2c_all[serial], (4, 4), path, f"world_2_cam[{serial!r}]")
        _check_intrinsics(K, calib_w, calib_h, "width" in data and "height" in data, path, serial)
        if image_size is None and image_dir is None:
            size = (calib_w, calib_h)
        elif isinstance(image_size, Mapping):
            if serial not in image_size:
                raise KeyError(f"image_size has no entry for camera {serial} (it has {sorted(image_size)})")
            size = tuple(image_size[serial])
        elif image_size is not None:
            size = tuple(image_size)
        else:
            d = Path(image_dir)
            cands = [d / f"cam_{serial}.{ext}" for ext in ("jpg", "png", "jpeg")]
            found = [c for c in cands if c.is_file()]
            if not found:
                raise FileNotFoundError(f"no image for camera {serial} in {d} (looked for cam_{serial}.jpg/.png)")
            size = stored_image_size(found[0], f"image of camera {serial}")
        w, h = int(size[0]), int(size[1])
        rx, ry = w / calib_w, h / calib_h
        if abs(rx - ry) > tolerance * max(rx, ry):
            raise ValueError(
                f"camera {serial}: image size {w}x{h} is not a uniform scaling of the calibration size "
                f"{calib_w}x{calib_h} (x ratio {rx:.4f}, y ratio {ry:.4f}); {path}"
            )
        ratios[serial] = rx
        K[0] *= rx
        K[1] *= ry
        cams[serial] = Camera(torch.tensor(K, dtype=torch.float32), w2c, w, h, serial)
    if ratios:
        lo, hi = min(ratios.values()), max(ratios.values())
        if hi - lo > tolerance * hi:
            raise ValueError(f"{path}: images have inconsistent scales relative to the calibration ({ratios})")
    return cams


def write_camera_params(
    path: str | os.PathLike, cameras: Mapping[str, Camera] | Sequence[Camera], shared_intrinsics: bool = False
) -> None:
    """Write cameras as a NeRSemble ``camera_params.json`` (calibration size = the cameras' image size)."""
    cams = list(cameras.values()) if isinstance(cameras, Mapping) else list(cameras)
    if not cams:
        raise ValueError("write_camera_params needs at least one camera")
    sizes = {(c.width, c.height) for c in cams}
    if len(sizes) != 1:
        raise ValueError(f"cameras of one calibration file must share an image size, got {sorted(sizes)}")
    w, h = sizes.pop()
    data: dict = {"world_2_cam": {c.name: c.w2c.cpu().double().tolist() for c in cams}}
    if shared_intrinsics:
        data["intrinsics"] = cams[0].K.cpu().double().tolist()
    else:
        data["intrinsics"] = {c.name: c.K.cpu().double().tolist() for c in cams}
    data["width"], data["height"] = w, h
    atomic_write_text(json.dumps(data, indent=1), path)
