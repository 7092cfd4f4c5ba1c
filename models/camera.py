"""Pinhole cameras in the OpenCV convention and NeRSemble ``camera_params.json`` I/O.

Convention: x right, y down, z forward; ``w2c`` (4, 4) maps world to camera coordinates; ``K`` (3, 3) is in pixels
of the image actually used, with pixel centres at +0.5 (the pixel (i, j) covers [j, j+1) x [i, i+1)).
No projection matrix is ever stored; renderers derive what they need from K, width and height.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.core.io import atomic_write_text, safe_name
from utils.core.io import image_size as stored_image_size

# Full-resolution NeRSemble frames are 2200 x 3208 (w x h, portrait); calibration refers to them.
NERSEMBLE_CALIB_SIZE = (2200, 3208)


def _as_tensor(x, shape: tuple[int, ...], what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, Tensor) else x, dtype=torch.float32)
    if tuple(t.shape) != shape:
        raise ValueError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    # Checked on the CPU only: on a GPU the check would cost a host synchronisation per camera.
    if t.device.type == "cpu" and not torch.isfinite(t).all():
        raise ValueError(f"{what} holds non-finite values")
    return t


@dataclass
class Camera:
    """One pinhole camera.

    Attributes:
        K: (3, 3) intrinsics in pixels of a ``width`` x ``height`` image.
        w2c: (4, 4) world-to-camera rigid transform (OpenCV axes).
        width, height: image size in pixels.
        name: free label, usually the NeRSemble serial.
    """

    K: Tensor
    w2c: Tensor
    width: int
    height: int
    name: str = ""

    def __post_init__(self) -> None:
        dev = self.K.device if isinstance(self.K, Tensor) else None
        self.K = _as_tensor(self.K, (3, 3), f"Camera {self.name!r} K")
        self.w2c = _as_tensor(self.w2c, (4, 4), f"Camera {self.name!r} w2c").to(self.K.device)
        if dev is not None:
            self.w2c = self.w2c.to(dev)
        self.width, self.height = int(self.width), int(self.height)
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"Camera {self.name!r} has non-positive size {self.width}x{self.height}")

    # ------------------------------------------------------------------ geometry
    @property
    def device(self) -> torch.device:
        return self.K.device

    @property
    def c2w(self) -> Tensor:
        """(4, 4) camera-to-world transform."""
        return torch.linalg.inv(self.w2c)

    @property
    def center(self) -> Tensor:
        """(3,) camera centre in world coordinates."""
        R, t = self.w2c[:3, :3], self.w2c[:3, 3]
        return -R.T @ t

    @property
    def fx(self) -> float:
        return float(self.K[0, 0])

    @property
    def fy(self) -> float:
        return float(self.K[1, 1])

    @property
    def cx(self) -> float:
        return float(self.K[0, 2])

    @property
    def cy(self) -> float:
        return float(self.K[1, 2])

    def world_to_camera(self, points: Tensor) -> Tensor:
        """(..., 3) world points -> (..., 3) camera-space points."""
        R, t = self.w2c[:3, :3].to(points), self.w2c[:3, 3].to(points)
        return points @ R.T + t

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points.

        Args:
            points: (..., 3) world coordinates.
        Returns:
            uv: (..., 2) pixel coordinates (x to the right, y down; pixel centres at +0.5).
            depth: (...,) camera-space z (positive in front of the camera).
        """
        pc = self.world_to_camera(points)
        z = pc[..., 2]
        K = self.K.to(points)
        u = K[0, 0] * pc[..., 0] / z + K[0, 1] * pc[..., 1] / z + K[0, 2]
        v = K[1, 1] * pc[..., 1] / z + K[1, 2]
        return torch.stack([u, v], dim=-1), z

    # ------------------------------------------------------------------ derived cameras
    def scaled(self, factor: float) -> "Camera":
        """The same camera for an image resized by ``factor`` (K rows 0-1 scale, size rounds)."""
        K = self.K.clone()
        K[:2] *= factor
        return Camera(K, self.w2c.clone(), round(self.width * factor), round(self.height * factor), self.name)

    def resized(self, width: int, height: int) -> "Camera":
        """The same camera for an image resized to exactly ``width`` x ``height`` (independent x/y factors)."""
        K = self.K.clone()
        K[0] *= width / self.width
        K[1] *= height / self.height
        return Camera(K, self.w2c.clone(), width, height, self.name)

    def cropped(self, x0: int, y0: int, width: int, height: int) -> "Camera":
        """The camera that sees the window [x0, x0+width) x [y0, y0+height) of this camera's image."""
        K = self.K.clone()
        K[0, 2] -= x0
        K[1, 2] -= y0
        return Camera(K, self.w2c.clone(), width, height, self.name)

    def to(self, device: str | torch.device) -> "Camera":
        if self.K.device == torch.device(device) and self.w2c.device == self.K.device:
            return self  # cameras are immutable in use: no copy (and no re-validation) in hot loops
        return Camera(self.K.to(device), self.w2c.to(device), self.width, self.height, self.name)

    @staticmethod
    def look_at(
        eye: Sequence[float] | Tensor,
        target: Sequence[float] | Tensor = (0.0, 0.0, 0.0),
        up: Sequence[float] | Tensor = (0.0, 1.0, 0.0),
        width: int = 512,
        height: int = 512,
        fx: float | None = None,
        fy: float | None = None,
        fov_y_deg: float = 30.0,
        cx: float | None = None,
        cy: float | None = None,
        name: str = "",
    ) -> "Camera":
        """A camera at ``eye`` looking at ``target``; ``up`` is the world direction that appears upward.

        Focal length: ``fx``/``fy`` in pixels, or from the vertical field of view when not given.
        """
        eye_t = torch.as_tensor(eye, dtype=torch.float64)
        tgt = torch.as_tensor(target, dtype=torch.float64)
        up_t = torch.as_tensor(up, dtype=torch.float64)
        z = tgt - eye_t
        if z.norm() < 1e-12:
            raise ValueError("look_at: eye and target coincide")
        z = z / z.norm()
        # OpenCV axes (x right, y down, z forward) form a right-handed frame: x = z cross up points to the image's
        # right when 'up' is to appear upward, and y = z cross x then points down (away from 'up').
        x = torch.linalg.cross(z, up_t)
        if x.norm() < 1e-9:
            raise ValueError("look_at: viewing direction is parallel to 'up'")
        x = x / x.norm()
        y = torch.linalg.cross(z, x)
        R = torch.stack([x, y, z], dim=0)
        w2c = torch.eye(4, dtype=torch.float64)
        w2c[:3, :3] = R
        w2c[:3, 3] = -R @ eye_t
        if fy is None:
            fy = 0.5 * height / np.tan(np.deg2rad(fov_y_deg) / 2)
        if fx is None:
            fx = fy
        K = torch.tensor(
            [[fx, 0.0, width / 2 if cx is None else cx], [0.0, fy, height / 2 if cy is None else cy], [0.0, 0.0, 1.0]]
        )
        return Camera(K.float(), w2c.float(), width, height, name)


def stack_cameras(cameras: Sequence[Camera]) -> tuple[Tensor, Tensor, int, int]:
    """Stack cameras of one image size.

    Returns:
        K: (C, 3, 3), w2c: (C, 4, 4), width, height.
    """
    if len(cameras) == 0:
        raise ValueError("stack_cameras needs at least one camera")
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) != 1:
        raise ValueError(f"cameras rendered together must share one image size, got {sorted(sizes)}")
    if len(cameras) == 1:  # views, not copies: one camera per call is the hot path of interactive rendering
        return cameras[0].K[None], cameras[0].w2c[None], cameras[0].width, cameras[0].height
    K = torch.stack([c.K for c in cameras])
    w2c = torch.stack([c.w2c.to(K.device) for c in cameras])
    w, h = sizes.pop()
    return K, w2c, w, h


# ---------------------------------------------------------------------- NeRSemble camera_params.json
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
