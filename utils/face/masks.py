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


def person_masks(frames: Sequence[np.ndarray], threshold: float = 0.5) -> list[np.ndarray]:
    """(H, W) float32 {0, 1} per RGB uint8 frame (H, W, 3): the pixels of the person (head, hair, neck, body) as
    opposed to the background, by mediapipe's selfie segmentation (its landscape model, bundled with the mediapipe
    package the landmark detector already needs).  Used by track.py --video to tell, where the face outline cut the
    projected FLAME face mask, hair and neck (the avatar's surface is there, covered) from background (it is not)."""
    try:
        import mediapipe as mp
    except ImportError as exc:  # the optional landmark dependency (requirements-landmarks.txt)
        raise ImportError("person_masks needs mediapipe (pip install -r requirements-landmarks.txt)") from exc
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=1) as seg:
        return [(seg.process(np.ascontiguousarray(f)).segmentation_mask > threshold).astype(np.float32)
                for f in frames]
