"""Pinhole cameras in the OpenCV convention (camera_params.json files: utils/data/camera_params.py).

Convention: x right, y down, z forward; ``w2c`` (4, 4) maps world to camera coordinates; ``K`` (3, 3) is in pixels
of the image actually used, with pixel centres at +0.5 (the pixel (i, j) covers [j, j+1) x [i, i+1)).
No projection matrix is ever stored; renderers derive what they need from K, width and height.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


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
