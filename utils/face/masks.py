"""Face masks as images: a rasterized mask softened into [0, 1], and a photo composited over a background with it.

Used by the preprocessing script utils/preprocess/projection_ply.py (the projected FLAME face masks and the masked
photos it writes) and by the tracking application's targets (the same masks made on the fly for a photo or video).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def soft_mask(mask: np.ndarray, blur: float) -> np.ndarray:
    """(H, W) bool -> (H, W) float32 in [0, 1], Gaussian-blurred with sigma ``blur`` pixels when > 0."""
    import cv2  # OpenCV only where a mask is made (importing this module stays light)

    m = mask.astype(np.float32)
    if blur > 0:
        m = cv2.GaussianBlur(m, (0, 0), sigmaX=float(blur), sigmaY=float(blur), borderType=cv2.BORDER_CONSTANT)
    return np.clip(m, 0.0, 1.0)


def masked_photo(image: np.ndarray, mask: np.ndarray, bg: Sequence[float]) -> np.ndarray:
    """image (H, W, 3) float [0, 1], mask (H, W) float [0, 1] -> image * mask + bg * (1 - mask)."""
    m = mask[..., None]
    return image * m + np.asarray(bg, dtype=np.float32)[None, None] * (1.0 - m)
