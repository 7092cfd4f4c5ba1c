"""Eye regions of a face in an image, and image metrics inside them.

The eye region of a view is built from FLAME's static landmark embedding: its 51 points are iBUG 17-67 (the jaw
contour 0-16 is in the dynamic embedding), so the eyes are rows 19..30 (iBUG 36-41: the subject's right eye, outer
corner, two upper-lid points, inner corner, two lower-lid points; iBUG 42-47: the left eye, inner corner first).
Each eye's six points are projected into the view, filled as a polygon and dilated by ``dilate`` times the eye's
corner-to-corner width in pixels, at least 1 px (so an eye inside the image never has an empty region, however small
the face: a pixel centre lies within 0.71 px of any point); an eye that faces more than ``max_angle`` degrees away
from the camera (the far eye of a profile view, seen edge-on or hidden behind the nose) is left out.  The region is
intersected with the face mask, as the photos are face-masked.

Where an eye faces (:func:`eye_directions`): the face's forward direction (the line between the two eyes' centres
crossed with the nose's up line) turned ``eye_yaw`` degrees outwards about the up line, towards that eye's side.  It
used to be each eye's own corner-to-corner line crossed with the up line, but that line's slope depends on the face's
shape and the six landmarks' placement (32 degrees on the synthetic template, 48 on one identity's right eye), so a
visible eye of a camera 25 degrees to the side and 15 above was left out (issue 25, 546-vertex FLAME eyeballs at
69x100 px); the yaw is now one fixed number, which leaves the far eye out beyond about 45 degrees of azimuth.

The landmarks are carried by the face-mask mesh (level-0 vertices), so they follow any face-mask geometry
(tracking, or a fitted geometry refinement) without the full FLAME mesh: :func:`eye_landmark_embedding` maps
FLAME's landmark triangles into the mask's vertex order once.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from utils.losses import masked_ssim, psnr

# Rows of the 51 static landmarks (iBUG 17-67): eyes iBUG 36-47, nose bridge top iBUG 27, nose base iBUG 33.
EYE_ROWS = tuple(range(19, 31))
NOSE_TOP_ROW, NOSE_BASE_ROW = 10, 16
DEFAULT_DILATE = 0.3  # dilation of each eye polygon, in units of that eye's corner-to-corner width
DEFAULT_MAX_ANGLE = 75.0  # an eye seen more than this many degrees off the direction it faces is not evaluated
# each eye faces the face's forward direction turned this many degrees outwards (about the slope of the line between
# its corners: the far eye of a view more than max_angle - eye_yaw = 45 degrees to the side is left out)
DEFAULT_EYE_YAW = 30.0


@dataclass
class EyeLandmarkEmbedding:
    """Eye (and two nose) landmarks as barycentric points of face-mask triangles.

    Attributes:
        vertex_ids: (14, 3) long, indices into the face-mask vertices (level 0, the model's mask order): rows 0-5
            right eye (iBUG 36-41), 6-11 left eye (iBUG 42-47), 12 nose bridge top (iBUG 27), 13 nose base (iBUG 33).
        bary: (14, 3) barycentric weights.
    """

    vertex_ids: Tensor
    bary: Tensor

    def __call__(self, base_vertices: Tensor) -> Tensor:
        """base_vertices (..., M, 3) face-mask vertices -> (..., 14, 3) landmark positions."""
        corners = base_vertices[..., self.vertex_ids.to(base_vertices.device), :]  # (..., 14, 3, 3)
        return (corners * self.bary.to(base_vertices)[..., None]).sum(-2)


def eye_landmark_embedding(lmk_faces_idx: np.ndarray | Tensor, lmk_bary_coords: np.ndarray | Tensor,
                           faces: np.ndarray | Tensor, mask_ids: np.ndarray | Tensor) -> EyeLandmarkEmbedding:
    """Map FLAME's static eye landmarks into the face mask's vertex order.

    Args:
        lmk_faces_idx: (51,) FLAME triangle of each static landmark (``flame_static_embedding.pkl``).
        lmk_bary_coords: (51, 3) barycentric coordinates.
        faces: (F, 3) FLAME triangles.
        mask_ids: (M,) FLAME vertex id of each face-mask vertex.
    Raises:
        ValueError: if the embedding does not have 51 points or an eye/nose landmark's triangle leaves the face mask.
    """
    as_np = lambda a: a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)  # noqa: E731
    idx, bc, f, ids = as_np(lmk_faces_idx).reshape(-1), as_np(lmk_bary_coords), as_np(faces), as_np(mask_ids)
    if len(idx) != 51 or bc.shape != (51, 3):
        raise ValueError(f"the static landmark embedding has {len(idx)} points (lmk_b_coords {bc.shape}); expected "
                         f"FLAME's 51 (iBUG 17-67) from flame_static_embedding.pkl")
    rows = list(EYE_ROWS) + [NOSE_TOP_ROW, NOSE_BASE_ROW]
    tri = f[idx[rows]].astype(np.int64)  # (14, 3) FLAME vertex ids
    remap = np.full(max(int(f.max()), int(ids.max())) + 1, -1, dtype=np.int64)
    remap[ids.astype(np.int64)] = np.arange(len(ids))
    local = remap[tri]
    if (local < 0).any():
        bad = sorted({rows[i] + 17 for i in np.nonzero((local < 0).any(1))[0]})
        raise ValueError(f"the triangles of landmarks iBUG {bad} leave the face mask: the eye-region metric needs the "
                         f"eye and nose landmarks on the face mask (FLAME_mask_vertexID.npy / FLAME_masks.pkl)")
    return EyeLandmarkEmbedding(torch.from_numpy(local), torch.as_tensor(bc[rows], dtype=torch.float32))


def embedding_for_flame(flame, mask_ids: np.ndarray | Tensor) -> EyeLandmarkEmbedding | None:
    """:func:`eye_landmark_embedding` of a ``models.flame.FlameModel``; None when there is no model, it has no static
    embedding, or the embedding leaves the face mask (with a warning: the eye-region metrics are then skipped)."""
    if flame is None or not getattr(flame, "has_landmarks", False):
        return None
    try:
        return eye_landmark_embedding(flame.lmk_faces_idx, flame.lmk_bary_coords, flame.faces, mask_ids)
    except ValueError as exc:
        warnings.warn(f"no eye-region metrics: {exc}")
        return None


def _polygon_region(poly: Tensor, radius: float, width: int, height: int) -> Tensor:
    """(H, W) bool: pixel centres inside the closed polygon poly (P, 2) or within ``radius`` px of its outline."""
    dev = poly.device
    ys = torch.arange(height, device=dev, dtype=poly.dtype) + 0.5
    xs = torch.arange(width, device=dev, dtype=poly.dtype) + 0.5
    q = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 1, 2)  # (HW, 1, 2)
    a, b = poly, poly.roll(-1, 0)  # edges a -> b, (P, 2)
    ab = b - a
    t = (((q - a) * ab).sum(-1) / ab.square().sum(-1).clamp_min(1e-12)).clamp(0, 1)  # (HW, P)
    dist = (q - (a + t[..., None] * ab)).norm(dim=-1).min(1).values
    # even-odd rule: edges crossing the horizontal ray to the right of the pixel centre
    qy, qx = q[..., 1], q[..., 0]
    crosses = ((a[:, 1] > qy) != (b[:, 1] > qy))
    x_at = a[:, 0] + (qy - a[:, 1]) * ab[:, 0] / torch.where(ab[:, 1] == 0, torch.ones_like(ab[:, 1]), ab[:, 1])
    inside = (crosses & (qx < x_at)).sum(1) % 2 == 1
    return (inside | (dist <= radius)).reshape(height, width)


def eye_directions(landmarks: Tensor, eye_yaw: float = DEFAULT_EYE_YAW) -> Tensor:
    """(2, 3) unit directions the two eyes face (row 0 the subject's right eye, iBUG 36-41; row 1 the left eye): the
    face's forward direction, (left eye centre - right eye centre) x (nose base -> bridge), turned ``eye_yaw`` degrees
    outwards about the up line.  landmarks: (14, 3) from :class:`EyeLandmarkEmbedding`."""
    lm = landmarks.float()
    up = lm[12] - lm[13]  # nose base -> bridge: the face's up
    across = lm[6:12].mean(0) - lm[0:6].mean(0)  # right eye -> left eye: the subject's left
    fwd = torch.linalg.cross(across, up)
    fwd = fwd / fwd.norm().clamp_min(1e-12)
    side = torch.linalg.cross(up, fwd)  # the subject's left, perpendicular to the forward direction
    side = side / side.norm().clamp_min(1e-12)
    c, s = math.cos(math.radians(eye_yaw)), math.sin(math.radians(eye_yaw))
    return torch.stack([c * fwd - s * side, c * fwd + s * side])


def eye_region_mask(landmarks: Tensor, camera: Camera, dilate: float = DEFAULT_DILATE,
                    max_angle: float = DEFAULT_MAX_ANGLE, eye_yaw: float = DEFAULT_EYE_YAW) -> Tensor:
    """(H, W, 1) float {0, 1} mask of both eyes' regions in ``camera``'s image.

    Args:
        landmarks: (14, 3) world-space landmarks from :class:`EyeLandmarkEmbedding`.
        camera: the view (its width x height is the mask size).
        dilate: growth of each eye polygon in units of the eye's projected corner-to-corner width (at least 1 px, so
            the region of an eye inside the image holds at least one pixel at any size).
        max_angle: an eye whose direction (:func:`eye_directions`) is more than this many degrees away from the
            direction to the camera is left out (it is seen edge-on or hidden behind the nose).
        eye_yaw: outward turn of each eye's direction from the face's forward direction, degrees.
    """
    lm = landmarks.to(camera.device, torch.float32)
    mask = torch.zeros(camera.height, camera.width, dtype=torch.bool, device=camera.device)
    cos_max = math.cos(math.radians(max_angle))
    dirs = eye_directions(lm, eye_yaw)
    for eye, (c0, c1), normal in ((lm[0:6], (0, 3), dirs[0]), (lm[6:12], (0, 3), dirs[1])):
        to_cam = camera.center.to(lm) - eye.mean(0)
        cos = (normal * to_cam).sum() / to_cam.norm().clamp_min(1e-12)
        uv, depth = camera.project(eye)
        if float(cos) < cos_max or bool((depth <= 0).any()):
            continue
        radius = max(1.0, dilate * float((uv[c1] - uv[c0]).norm()))
        mask |= _polygon_region(uv, radius, camera.width, camera.height)
    return mask[..., None].float()


def eye_region_masks(landmarks: Tensor, cameras: Sequence[Camera], face_masks: Tensor | None = None,
                     dilate: float = DEFAULT_DILATE, max_angle: float = DEFAULT_MAX_ANGLE,
                     eye_yaw: float = DEFAULT_EYE_YAW) -> Tensor:
    """(C, H, W, 1) eye-region masks of one face in C views of one size, times ``face_masks`` (C, H, W, 1) if given.

    landmarks: (14, 3) world-space landmarks (:class:`EyeLandmarkEmbedding`)."""
    masks = torch.stack([eye_region_mask(landmarks, c, dilate, max_angle, eye_yaw) for c in cameras])
    if face_masks is not None:
        masks = masks * (face_masks.to(masks) > 0.5)
    return masks


def region_metrics(pred: Tensor, gt: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-view PSNR and SSIM inside ``masks``: pred, gt (C, H, W, 3), masks (C, H, W, 1) -> ((C,), (C,)).

    Views whose mask is empty (both eyes turned away) give NaN; average with :func:`nanmean`."""
    p = psnr(pred.clamp(0, 1), gt, mask=masks, reduction="none").float()
    empty = masks.flatten(1).sum(1) == 0
    p = torch.where(empty, torch.full_like(p, float("nan")), p)
    s = masked_ssim(pred, gt, masks).float()
    return p, s


def nanmean(x: Tensor) -> float | None:
    """Mean of the finite entries (None if there is none)."""
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else None
