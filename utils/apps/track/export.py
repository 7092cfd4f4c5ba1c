"""What track.py writes besides code.pt and metrics.json: render | photo views, a grid, a turntable video and, for a
photo-only fit, the fitted FLAME and camera (flame_fit.npz, camera_params.json) and landmarks.png."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.flame import save_nersemble_tracking
from models.geometry import head_pose, orbit_camera
from models.renderer import render_batch
from utils.apps.track.config import ExportConfig
from utils.apps.track.targets import FitTarget
from utils.core.images import save_image, to_uint8
from utils.core.names import safe_child
from utils.data.camera_params import write_camera_params
from utils.data.code_file import FittedCode, code_cloud
from utils.data.model_file import TrainedModel
from utils.evaluation import View
from utils.face.landmarks import draw_landmarks, reprojection_error
from utils.losses import psnr, ssim_metric


def export_views(out: Path, views: Sequence[View], renders: Tensor, extra: Sequence[tuple[str, Tensor]]) -> None:
    """views/cam_<serial>.png = render | photo, and grid.png: renders in the top row, photos below."""
    # serials come from camera_params.json / --camera: checked to stay one file name inside views/
    for v, r in zip(views, renders):
        save_image(safe_child(out / "views", v.serial, "camera serial", "the camera file", "cam_", ".png"),
                   torch.cat([r, v.image.clamp(0, 1)], dim=1))
    for serial, r in extra:
        save_image(safe_child(out / "views", serial, "camera serial", "the camera file", "cam_", ".png"), r)
    if len(views):
        grid = torch.cat([torch.cat(list(renders), dim=1), torch.cat([v.image.clamp(0, 1) for v in views], dim=1)], 0)
        save_image(out / "grid.png", grid)


@torch.no_grad()
def turntable(model: TrainedModel, code: FittedCode, start_camera: Camera, cfg: ExportConfig, backend: str = "auto",
              chunk: int = 8) -> list[np.ndarray]:
    """uint8 frames orbiting the head about its up axis, starting at ``start_camera``'s position."""
    base = code.base_vertices
    centre, R, radius = head_pose(model.template_base, base)
    centre, up = centre.to(base.device), R[:, 1].to(base.device)
    eye0 = start_camera.center.to(base.device).float()
    H = int(cfg.turntable_size)
    W = max(2, int(round(H * start_camera.width / start_camera.height)))
    n = max(1, int(cfg.turntable_frames))
    if cfg.turntable_degrees >= 360:
        angles = [360.0 * i / n for i in range(n)]
    else:
        angles = [0.5 * cfg.turntable_degrees * math.sin(2 * math.pi * i / n) for i in range(n)]
    cams = [orbit_camera(centre.cpu(), up.cpu(), eye0.cpu(), a, W, H, radius).to(base.device) for a in angles]
    cloud = code_cloud(model, code.w, base, code.colour, code.gaussians)
    frames = []
    for i in range(0, n, chunk):
        imgs = render_batch(cloud, cams[i:i + chunk], backend=backend)["image"].clamp(0, 1)
        frames.extend(to_uint8(im) for im in imgs)
    return frames


@torch.no_grad()
def export_wild(out: Path, target: FitTarget, render: Tensor) -> dict:
    """Outputs of a photo-only fit (``target.wild``), in the project's formats so that every script reuses them:
    flame_fit.npz (NeRSemble tracking layout), camera_params.json (NeRSemble layout, the fitted camera under its
    serial, intrinsics and "width"/"height" of the photo), landmarks.png (detected vs fitted points on the photo,
    cropped around the face).

    ``render``: (h, w, 3) the fitted head rendered into the photo's evaluation crop.  Returns metrics: landmark
    reprojection error (pixels and inter-ocular distances, FLAME's 51 static points), PSNR / SSIM of the render
    against the photo inside the face mask, the fitted focal length and head distance, faces found.  With the
    photometric FLAME stage the files and the drawing hold the refined FLAME; ``landmark_error_*`` stay those of the
    landmark fit (``landmark_error_iod_refined``: after the refinement)."""

    wild = target.wild
    fit = wild.refined if wild.refined is not None else wild.fit  # what the head was fitted with
    save_nersemble_tracking(out / "flame_fit.npz", fit.params.to("cpu"))
    # the camera of the photo file as given (the fit may have worked on a scaled copy, --max_face_px)
    write_camera_params(out / "camera_params.json",
                        [fit.camera if wild.original_size is None else fit.camera.resized(*wild.original_size)])
    detected = wild.landmarks.ibug68
    fitted = fit.landmarks[0].cpu().numpy()
    fitted = np.where(np.isfinite(fitted), fitted, np.nan)
    save_image(out / "landmarks.png",
               draw_landmarks(wild.photo, detected, fitted, wild.landmarks.outline, margin=0.25) / 255.0)
    view = target.eval_views[0]
    m = view.mask
    pred = render.clamp(0, 1)
    doc = reprojection_error(detected, wild.fit.landmarks[0].cpu().numpy())  # the landmark fit's own error
    if wild.refined is not None:
        doc["landmark_error_iod_refined"] = reprojection_error(detected, fitted)["landmark_error_iod"]
    doc.update({
        "psnr_photo_in_mask": float(psnr(pred, view.image, mask=m)),
        "ssim_photo": float(ssim_metric(pred, view.image)),
        # the render times the mask against the masked photo: what the head draws outside the mask (where the photo
        # is black because the mask cut it, and the fit leaves it out: --ignore_cut / --ignore_rim_band) not scored
        "ssim_photo_in_mask": float(ssim_metric(pred * m, view.image * m)),
        "mask_pixels": int(m.sum()),
        "focal_px": fit.camera.fx,
        "head_distance_m": float(-fit.params.translation[0, 2]),
        "faces_found": int(wild.landmarks.num_faces), "face_size_px": wild.landmarks.face_size,
        "seconds_flame_fit": fit.seconds, "flame_fit_losses": fit.losses,
    })
    return doc
