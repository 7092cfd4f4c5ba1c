"""Evaluation of a fitted identity on every calibrated view: PSNR / SSIM (/ LPIPS) over all views and the unseen ones,
on the face mask and inside the eye regions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.gaussians import GaussianCloud
from models.renderer import render_batch
from utils.data.code_file import code_cloud
from utils.data.model_file import TrainedModel
from utils.data.nersemble import HELDOUT_SERIALS
from utils.face.regions import (
    EyeLandmarkEmbedding,
    eye_region_masks,
    nanmean,
    region_metrics,
)
from utils.losses import lpips_metric, psnr, ssim_metric


@dataclass
class View:
    """One calibrated view, cropped around the face mask.

    image: (h, w, 3) face-masked photo on black (or None when the camera has no photo), mask: (h, w, 1) or None,
    camera: the cropped Camera (or the full one when there is no photo), serial: camera name.
    """

    serial: str
    camera: Camera
    image: Tensor | None = None
    mask: Tensor | None = None




def to_tensor_img(a: np.ndarray, device: torch.device) -> Tensor:
    """(h, w, c) float image array -> a float32 tensor on ``device`` (a View's image or mask)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


@torch.no_grad()
def evaluate_views(model: TrainedModel, w: Tensor, base: Tensor, views: Sequence[View], fit_serial: str,
                   backend: str = "auto", lpips: bool = True, colour: Tensor | None = None,
                   eyes: EyeLandmarkEmbedding | None = None, gaussians: Tensor | None = None) -> tuple[dict, Tensor]:
    """PSNR / SSIM (/ LPIPS) of style w (plus the colour residual ``colour`` (M, 3), e.g. ``code.colour``, and the
    per-Gaussian residual ``gaussians`` (V, K, 7), ``code.gaussians``) on
    every view with a photo; "all" and "unseen" (all but ``fit_serial``).  With ``eyes`` (the eye landmarks on the
    face mask, ``FitTarget.eye_landmarks``) also PSNR / SSIM inside the eye regions (``psnr_eyes_*``,
    ``ssim_eyes_*``; utils/face/regions.py) of the landmarks on ``base``.

    Returns (metrics dict, renders (C, h, w, 3) clamped to [0, 1]).
    """
    return evaluate_cloud(code_cloud(model, w, base, colour, gaussians), views, fit_serial, backend, lpips,
                          eyes(base) if eyes is not None else None)


@torch.no_grad()
def evaluate_cloud(cloud: GaussianCloud, views: Sequence[View], fit_serial: str = "", backend: str = "auto",
                   lpips: bool = False, eye_points: Tensor | None = None) -> tuple[dict, Tensor]:
    """PSNR / SSIM (/ LPIPS) of any Gaussian cloud (unbatched, e.g. one frame of an animation) on every view with a
    photo: "all", "unseen" (all but ``fit_serial``) and "heldout_cameras" (the protocol's novel views); PSNR inside
    the face mask alone (``psnr_face_*``: the crops' black background left out); with ``eye_points`` (14, 3) (an
    ``EyeLandmarkEmbedding`` applied to the face-mask vertices) PSNR / SSIM inside the eye regions (``psnr_eyes_*``,
    ``ssim_eyes_*``; utils/face/regions.py).

    Returns (metrics dict, renders (C, h, w, 3) clamped to [0, 1]).
    """
    pred = render_batch(cloud, [v.camera for v in views], backend=backend)["image"].clamp(0, 1)
    return view_metrics(pred, views, fit_serial, lpips, eye_points), pred


def view_metrics(pred: Tensor, views: Sequence[View], fit_serial: str = "", lpips: bool = False,
                 eye_points: Tensor | None = None) -> dict:
    """:func:`evaluate_cloud`'s metrics of given renders ``pred`` (C, h, w, 3), clamped to [0, 1], one per view of
    ``views`` (e.g. a render changed after rasterising, such as a video frame's camera exposure)."""
    gt = torch.stack([v.image for v in views])
    p = psnr(pred, gt, reduction="none").float()
    face = torch.stack([v.mask for v in views])
    pf = psnr(pred, gt, mask=face, reduction="none").float()
    s = ssim_metric(pred, gt, reduction="none").float()
    lp = lpips_metric(pred, gt, reduction="none") if lpips else None
    unseen = torch.tensor([v.serial != fit_serial for v in views], device=p.device)
    protocol = torch.tensor([v.serial in HELDOUT_SERIALS for v in views], device=p.device)

    def mean(x: Tensor | None, sel: Tensor | None = None) -> float | None:
        if x is None:
            return None
        x = x.float() if sel is None else x.float()[sel]
        return float(x.mean()) if x.numel() else None

    out = {"psnr_all": mean(p), "ssim_all": mean(s), "psnr_unseen": mean(p, unseen), "ssim_unseen": mean(s, unseen),
           "lpips_all": mean(lp), "lpips_unseen": mean(lp, unseen),
           "psnr_face_all": mean(pf), "psnr_face_unseen": mean(pf, unseen),
           "psnr_heldout_cameras": mean(p, protocol), "num_views": len(views), "num_unseen_views": int(unseen.sum()),
           "per_view": {v.serial: {"psnr": float(p[i]), "ssim": float(s[i]),
                                   **({"lpips": float(lp[i])} if lp is not None else {})}
                        for i, v in enumerate(views)}}
    if eye_points is not None:
        masks = eye_region_masks(eye_points, [v.camera for v in views], face)
        pe, se = region_metrics(pred, gt, masks)
        out.update({"psnr_eyes_all": nanmean(pe), "ssim_eyes_all": nanmean(se),
                    "psnr_eyes_unseen": nanmean(pe[unseen]), "ssim_eyes_unseen": nanmean(se[unseen])})
        for i, v in enumerate(views):
            out["per_view"][v.serial]["psnr_eyes"] = float(pe[i])
    return out
