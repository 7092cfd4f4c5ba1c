"""The synthetic dataset's camera rig and image sizes.

The 16 real serials on a frontal arc about 1 m from the head (three rows: +20 deg, 0 deg, -20 deg elevation;
azimuths within +-60 deg; camera id 8 = 222200037 straight in front), portrait images.  As in the real data the
calibration describes "full" frames twice the size of the written ``images-2x`` (ratio 0.5); the width is
``round(image_size * 1100 / 1604)``.  Each subject has its own calibration with a few millimetres of jitter (real
rigs are recalibrated per session).

World frame: metres, y up, the frontal camera on +z looking at the origin; the head (FLAME model space: y up, face
towards +z) is placed with a small random rotation, translation and scale (utils/data/synthetic/identity.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from models.camera import Camera
from utils.data.nersemble import (
    SERIALS,
)

# Rig: (elevation deg, azimuth deg) of each camera id (index into SERIALS).  Camera 8 (222200037) is frontal;
# the held-out protocol cameras (ids 3, 6, 11, 15) land in different rows and on both sides.
RIG_ANGLES: tuple[tuple[float, float], ...] = (
    (20.0, -50.0), (20.0, -25.0), (20.0, 0.0), (20.0, 25.0), (20.0, 50.0),                     # ids 0-4
    (0.0, -60.0), (0.0, -40.0), (0.0, -20.0), (0.0, 0.0), (0.0, 20.0), (0.0, 40.0), (0.0, 60.0),  # ids 5-11
    (-20.0, -45.0), (-20.0, -15.0), (-20.0, 15.0), (-20.0, 45.0),                                # ids 12-15
)
RIG_DISTANCE = 1.0  # metres from the head
# Focal length of the full 2200x3208 NeRSemble frames that shows about 0.40 m at 1 m vertically.
REAL_FOCAL_FULL = 8000.0
NERSEMBLE_FULL_SIZE = (2200, 3208)
NERSEMBLE_2X_SIZE = (1100, 1604)


def image_size_for(height: int) -> tuple[int, int]:
    """(w, h) of the written images-2x for an image height (NeRSemble aspect 1100:1604)."""
    if height < 16:
        raise ValueError(f"image_size (height) must be >= 16 pixels, got {height}")
    return max(1, round(height * NERSEMBLE_2X_SIZE[0] / NERSEMBLE_2X_SIZE[1])), int(height)


def auto_subdivision(height: int) -> int:
    """Subdivision level of the ground-truth mesh: Gaussians about 1-2 pixels wide (the synthetic FLAME mesh has
    ~2.8k vertices, 8 mm apart; a level halves that), fewer Gaussians for the tiny CPU images."""
    return 0 if height <= 160 else (1 if height <= 400 else (2 if height <= 1000 else 3))


def make_rig(image_size: int, rng: np.random.Generator | None = None, jitter: float = 1.0) -> dict[str, Camera]:
    """The 16 NeRSemble cameras around a head at the origin, calibrated for the FULL frames.

    Args:
        image_size: height S of the images-2x; the calibration frames are 2x (w, h) = 2 * image_size_for(S).
        rng: source of the per-session jitter (None = the nominal rig).
        jitter: multiplier of the jitter (0 = nominal).
    Returns:
        {serial: Camera} in SERIALS order, width/height = the full-frame size.
    """
    w2x, h2x = image_size_for(image_size)
    W, H = 2 * w2x, 2 * h2x
    f = REAL_FOCAL_FULL * H / NERSEMBLE_FULL_SIZE[1]
    cams = {}
    for serial, (el, az) in zip(SERIALS, RIG_ANGLES):
        j = (lambda *s: rng.normal(size=s) * jitter) if rng is not None else (lambda *s: np.zeros(s))
        el_r, az_r = math.radians(el + 0.5 * j(1)[0]), math.radians(az + 0.5 * j(1)[0])
        r = RIG_DISTANCE * (1.0 + 0.01 * j(1)[0])
        eye = r * np.array([math.sin(az_r) * math.cos(el_r), math.sin(el_r), math.cos(az_r) * math.cos(el_r)])
        target = 0.004 * j(3)
        up = np.array([0.0, 1.0, 0.0]) + 0.01 * j(3)  # slight roll
        fs = f * (1.0 + 0.005 * j(1)[0])
        cx, cy = W / 2 + 0.005 * W * j(1)[0], H / 2 + 0.005 * H * j(1)[0]
        K = np.array([[fs, 0.0, cx], [0.0, fs, cy], [0.0, 0.0, 1.0]])
        cams[serial] = Camera(torch.tensor(K, dtype=torch.float32), _look_at_w2c(eye, target, up), W, H, serial)
    return cams


def _look_at_w2c(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(4, 4) OpenCV world-to-camera of a camera at ``eye`` looking at ``target``; world ``up`` appears upward."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)  # image right = forward x up
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)  # image down
    R = np.stack([x, y, z])
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = -R @ eye
    return w2c
