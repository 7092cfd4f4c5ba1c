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


def hair_mask(image: np.ndarray, skin: np.ndarray, candidates: np.ndarray, threshold: float = 3.0) -> np.ndarray:
    """(H, W) float32 {0, 1}: the ``candidates`` pixels whose chromaticity is not the frame's skin.

    ``image`` (H, W, 3) RGB in [0, 1] (or uint8), ``skin`` (H, W) bool / {0, 1}: pixels that are mostly skin (the
    face mask's data pixels), ``candidates`` (H, W): the pixels to classify.  The skin model is the median and the
    covariance of the skin pixels' chromaticity (r, g) = (R, G) / (R + G + B); a candidate more than ``threshold``
    Mahalanobis units from it is called not skin (hair, mostly: the video path asks this only of pixels the person
    segmentation calls the person).  Chromaticity, not RGB, so that skin in shadow (the neck under the chin) stays
    skin while grey, brown or black hair does not.  No mediapipe hair model ships with the pinned mediapipe
    (0.10.21 bundles the selfie segmentation's person / background only), hence colour statistics."""
    img = np.asarray(image, dtype=np.float32)
    if img.max() > 1.5:  # uint8 frames
        img = img / 255.0
    chroma = img[..., :2] / (img.sum(-1, keepdims=True) + 1e-3)  # (H, W, 2)
    s = np.asarray(skin) > 0.5
    out = np.zeros(img.shape[:2], np.float32)
    cand = np.asarray(candidates) > 0.5
    if s.sum() < 10 or not cand.any():  # no skin to learn from (or nothing to classify): call nothing hair
        return out
    f = chroma[s]
    mu = np.median(f, 0)
    # robust enough here: the face mask is mostly skin; the floor keeps a flat-coloured (synthetic) face finite
    cov = np.cov((f - mu).T) + np.eye(2) * 1e-5
    d = chroma[cand] - mu
    dist = np.sqrt(np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d))
    out[cand] = (dist > threshold).astype(np.float32)
    return out
