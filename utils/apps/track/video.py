"""A personal avatar from a monocular video (``track.py --video clip.mp4`` / ``--frames DIR``): the pipeline behind
track.py's video mode, built from the reenactment tracker (utils/face/reenactment.py) and the single-image fit's pieces
(utils/apps/track/fit.py, utils/apps/track/targets.py, utils/evaluation.py).

    frames    the video's frames (``max_frames``, ``stride``) or the images of a folder (sorted by name)
    tracking  landmarks per frame (mediapipe video mode, or ``--landmarks`` (T, 68, 2) .npy), then one FLAME shape and
              one pinhole camera for the clip and per-frame expression / jaw / eyes / head pose (the reenactment
              path, :func:`utils.face.reenactment.fit_video_motion`); frames without a face are skipped and counted
    masks     per frame the model's face-mask triangles projected from the tracked FLAME (z-buffered against the
              head), intersected with the detector's face outline when the landmarks come from the detector (as the
              photo path does, utils/apps/track/targets.py detected_face_mask); with --landmarks: the projected
              mask alone; the fit's loss leaves out the pixels that are no data (:func:`no_data_mask`: the
              ``ignore_rim_band`` ring just outside the mask and, with ``ignore_cut``, where the outline cut the
              projected mask): the photo is black there only because the mask cut it; with
              ``video_refine.cut_photo`` the refinement fits the cut's pixels that the person segmentation
              (utils.face.masks.person_masks) calls the person (hair over the temples, the neck) to the frame's
              own colours; with ``video_refine.cut_background`` the cut's background pixels (beyond a margin
              around the person) are pulled transparent by the coverage term (no data for the colour), with
              ``video_refine.cut_hair`` (off) also its hair by colour (utils.face.masks.hair_mask)
    split     every ``heldout_every``-th frame and the last ``heldout_tail`` of the clip are held out: they are
              tracked (so that they can be rendered) but never enter the fit
    fit       the style w on many training frames at once (``video_batch`` frames per Adam step, each frame with its
              own tracked face-mask vertices), loss and schedule of the single-image fit; then the refinement
              (utils/apps/track/video_refine.py, ``video_refine``): the regularised per-vertex colour residual, a
              per-Gaussian position-offset / log-scale / opacity residual and every training frame's FLAME, jointly
              on batches of training frames (``video_refine.iterations 0``: the colour residual alone); with
              ``video_refine.exposure`` also a per-frame RGB gain (/ offset) of the render: the camera's exposure
    evaluate  PSNR / SSIM in the face mask; with the per-frame exposure the reported figures are of the render under
              each frame's exposure (held-out frames: interpolated from the training frames, ``heldout_exposure``)
              and the ``*_no_exposure`` ones of the avatar as rendered
    outputs   code.pt (like any fitted code: animate.py, interpolate.py, the viewer), flame_fit.npz (all frames,
              NeRSemble tracking layout; the landmark tracking), flame_refined.npz (the frames' FLAME after the
              refinement), camera_params.json (the fitted camera; refined with video_refine.camera_*),
              metrics.json (PSNR / SSIM / LPIPS in the face mask on held-out and training frames, for the fit, the
              code alone and the mean code; seconds per phase, and the tracking phase's parts in
              seconds_tracking), heldout.mp4 (real | avatar on the held-out frames) and turntable.mp4; written to a
              temporary folder first, so a failing run leaves nothing half-written in --out

Pivotal tuning (``video_refine.network_lr`` > 0) is baked into code.pt as a per-Gaussian residual of every raw channel
(utils/apps/track/video_refine.py), so the shared model file is never changed.  ``video_refine.camera_focal`` /
``camera_principal`` refine the clip's one camera (torch backend only: it needs gradients w.r.t. the intrinsics);
camera_params.json then holds the refined camera.  LPIPS needs the optional lpips package with torchvision and their
ImageNet backbone weights (downloaded once by torchvision; metrics.json records null and the reason where that is not
possible).  The progress bars show the held-out frames' PSNR (the style fit's: code only)
at every check; it is read, never used to steer the fit.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from models.camera import Camera
from models.flame import FlameModel, FlameParams, save_nersemble_tracking
from models.geometry import vertex_normals
from models.mip_filter import sampling_rate
from models.renderer import render
from utils.apps.track.config import VIDEO_FILTERS_3D, FitConfig, TrackConfig
from utils.apps.track.export import turntable
from utils.apps.track.fit import LossWindow, mesh_laplacian, photometric, plateau, start_candidates
from utils.apps.track.fit import boundary_rings as boundary_rings_mask
from utils.apps.track.pipeline import _clean
from utils.apps.track.targets import detected_face_mask, frame_flame, no_data_mask, projected_face_mask
from utils.apps.track.video_refine import apply_exposure, refine_video, refined_camera
from utils.core.atomic import atomic_write_json
from utils.core.device import resolve_device
from utils.core.images import read_image, to_uint8
from utils.core.video import write_video
from utils.data.camera_params import write_camera_params
from utils.data.code_file import (
    FittedCode,
    code_cloud,
    code_filter,
    colour_offsets,
    save_code,
    with_colour,
)
from utils.data.dataset import crop_size, crop_view
from utils.data.model_file import TrainedModel, load_model
from utils.data.nersemble import FRONTAL_SERIAL, NersembleSubject
from utils.evaluation import View, evaluate_cloud, to_tensor_img, view_metrics
from utils.face.flame_fit import flame_landmarks_2d, make_camera
from utils.face.masks import hair_mask, masked_photo, person_masks
from utils.face.reenactment import ReenactConfig, detect_video_faces, fit_video_motion, read_video
from utils.identity import model_flame_dir
from utils.losses import _blur_valid, _gauss_window, lpips_metric, lpips_unavailable_reason, ssim_metric

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ====================================================================================== inputs
def read_frame_folder(folder: str | os.PathLike, stride: int = 1, max_frames: int = 0) -> list[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of the images in ``folder`` (sorted by file name), every ``stride``-th."""

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder not found: {folder} (--frames expects a folder of images)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)[::max(1, stride)]
    if max_frames:
        files = files[:max_frames]
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) to use as frames (--frames)")
    frames = [to_uint8(read_image(p, "frame (--frames)")) for p in files]
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError(f"{folder}: the frames must all have one size (got {sorted({f.shape for f in frames})})")
    return frames


def split_frames(found: np.ndarray, heldout_every: int, heldout_tail: float) -> tuple[list[int], list[int]]:
    """(training frames, held-out frames) among the frames with a face (``found`` (T,) bool): held out are every
    ``heldout_every``-th frame (frames k-1, 2k-1, ...; 0: none) and the last ``heldout_tail`` fraction of the clip."""
    T = len(found)
    tail = T - int(math.ceil(heldout_tail * T)) if heldout_tail > 0 else T
    held = [t for t in range(T) if found[t] and ((heldout_every > 0 and (t + 1) % heldout_every == 0) or t >= tail)]
    train = [t for t in range(T) if found[t] and t not in held]
    return train, held


# ====================================================================================== fitting

def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """(H, W) float {0, 1} mask grown by ``px`` pixels (a (2 px + 1)^2 disc; px 0: unchanged).  Why: the person
    segmentation's edge is uncertain by a few pixels, and a cheek pixel wrongly called background would be pulled
    transparent."""
    if px <= 0:
        return mask
    import cv2
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return cv2.dilate(mask.astype(np.float32), k)


@dataclass
class FrameTargets:
    """The frames of one clip that a fit sees: views (cropped to one size: camera, masked image (h, w, 3), face mask
    (h, w, 1)), their tracked level-0 face-mask vertices (each (M, 3)) and optionally their no-data pixels (each
    (h, w, 1) in {0, 1}, :func:`no_data_mask`; None: every pixel is data)."""

    views: list[View]
    bases: list[Tensor]
    ignore: list[Tensor] | None = None

    def ignore_at(self, i: int) -> Tensor | None:
        """Frame ``i``'s no-data pixels (h, w, 1), or None when every pixel is data."""
        return None if self.ignore is None else self.ignore[i]


def _batches(n: int, batch: int, seed: int = 0):
    """Endless batches of frame indices: shuffled passes over range(n), ``batch`` at a time."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g).tolist()
        for a in range(0, n, batch):
            yield perm[a:a + batch]


def fit_video_style(model: TrainedModel, frames: FrameTargets, cfg: FitConfig, batch: int = 4,
                    backend: str = "auto", progress: bool = True, name: str = "video",
                    monitor: FrameTargets | None = None) -> tuple[Tensor, dict]:
    """The style w (S,) of one person from many frames: Adam on w from the best start (mean code / w_avg / mean
    training style, by the mean loss over the frames), ``batch`` frames per step (each rendered on its own tracked
    vertices), cfg's loss, lr schedule, style regulariser and early stopping.  ``monitor``: held-out frames whose
    face-mask PSNR is shown in the progress bar and recorded at every check (read only: it never steers the fit).
    Returns (w, info)."""
    f = model.field.eval()
    for p in f.parameters():
        p.requires_grad_(False)
    n = len(frames.views)
    cands = start_candidates(model, "w")
    probe = list(range(0, n, max(1, n // 8)))[:8]  # a spread of frames scores the start points
    start_losses = {}
    with torch.no_grad():
        for k, (w_c, _) in cands.items():
            start_losses[k] = float(np.mean([float(photometric(
                render(code_cloud(model, w_c, frames.bases[i]), frames.views[i].camera, backend=backend)["image"],
                frames.views[i].image, cfg, ignore=frames.ignore_at(i)))
                for i in probe]))
    start = min(start_losses, key=start_losses.get)
    w0 = cands[start][0].detach()
    var = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([var], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    verts = [model.vertices(b) for b in frames.bases]  # fixed geometry per frame: subdivided once
    monitor_psnr: list[float] = []
    window = LossWindow(var.device, cfg.check_every, "video fit", "lower fit.lr")
    best, bad, it, stopped = float("inf"), 0, 0, False
    batches = _batches(n, max(1, batch))
    bar = tqdm(total=cfg.iterations, desc=f"fitting {name} ({n} frames)", disable=not progress, leave=False)
    while it < cfg.iterations:
        opt.param_groups[0]["lr"] = cfg.lr * cfg.lr_final_ratio ** (it / max(1, cfg.iterations - 1))
        idx = next(batches)
        raw = f.synthesize_raw(var[None])  # the network once per step; the frames differ only in geometry
        loss = 0.0
        for i in idx:
            cloud = f.attach(raw, verts[i][None])[0]
            pred = render(cloud, frames.views[i].camera, backend=backend)["image"]
            loss = loss + photometric(pred, frames.views[i].image, cfg, ignore=frames.ignore_at(i)) / len(idx)
        total = loss + cfg.style_reg * (var - w0).square().mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        it += 1
        bar.update(1)
        cur = window.add(loss, it)
        if cur is not None:
            post = {"loss": f"{cur:.4f}"}
            if monitor is not None and monitor.views:
                mon, _ = evaluate_frames(model, var.detach(), monitor, range(len(monitor.views)), None, backend)
                monitor_psnr.append(mon["psnr_face"])
                post["heldout_psnr"] = f"{mon['psnr_face']:.2f}"
            bar.set_postfix(post)
            best, bad, stopped = plateau(cur, best, bad, it, cfg)
            if stopped:
                break
    bar.close()
    return var.detach().clone(), {"start": start, "start_losses": start_losses, "iterations": it,
                                  "loss_history": window.losses, "stopped_early": stopped,
                                  "heldout_psnr_history": monitor_psnr}


def fit_video_colour(model: TrainedModel, w: Tensor, frames: FrameTargets, cfg: FitConfig, batch: int = 4,
                     backend: str = "auto", progress: bool = True) -> tuple[Tensor, list[float]]:
    """The colour stage of utils/apps/track/fit.py on many frames: a per-vertex RGB residual (M, 3) of the level-0
    vertices for the fixed style w, ``batch`` training frames per Adam step, photometric loss plus the same Laplacian
    smoothness and L2 pull towards zero (the prior).  The Gaussians of every frame are synthesised once."""
    with torch.no_grad():
        raw = model.field.synthesize_raw(w[None])
        clouds = [model.field.attach(raw, model.vertices(b)[None])[0].detach() for b in frames.bases]
    base = frames.bases[0]
    res = torch.zeros_like(base, requires_grad=True)
    lap = mesh_laplacian(model, base.device)
    opt = torch.optim.Adam([res], lr=cfg.colour_lr, betas=(cfg.beta1, cfg.beta2))
    n = cfg.colour_iterations
    window = LossWindow(base.device, cfg.check_every, "video colour stage", "lower fit.colour_lr")
    batches = _batches(len(clouds), max(1, batch), seed=1)
    for it in tqdm(range(n), desc="colour", disable=not progress, leave=False):
        opt.param_groups[0]["lr"] = cfg.colour_lr * cfg.lr_final_ratio ** (it / max(1, n - 1))
        idx = next(batches)
        off = colour_offsets(model, res)
        loss = sum(photometric(render(with_colour(clouds[i], off), frames.views[i].camera, backend=backend)["image"],
                              frames.views[i].image, cfg, ignore=frames.ignore_at(i))
                   for i in idx) / len(idx)
        total = loss + lap.penalty(res, cfg.colour_laplacian_weight, cfg.colour_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        window.add(loss, it + 1, last=it + 1 == n)
    return res.detach(), window.losses


@torch.no_grad()
def highpass_ratio(render: Tensor, photo: Tensor, mask: Tensor, sigma: float = 1.0, erode: int = 3) -> float:
    """Sharpness of a render against its photo: the energy of the luminance's high-pass (the image minus its Gaussian
    blur of ``sigma`` px) of ``render`` over that of ``photo`` (h, w, 3), inside the face ``mask`` (h, w, 1) eroded by
    ``erode`` px (the silhouette's edge, where the masked photo jumps to black, is left out).  1: as much fine detail
    as the photo (the real female clip's frames blurred by 1 px score 0.16-0.20, by 2 px 0.07-0.12)."""
    r = max(1, int(math.ceil(3 * sigma)))
    g = _gauss_window(2 * r + 1, sigma, 1, render.device, render.dtype).view(-1)  # SSIM's 1-D Gaussian

    def highpass(img: Tensor) -> Tensor:
        y = img.mean(-1)[None, None]  # (1, 1, h, w)
        return (y - _blur_valid(F.pad(y, (r, r, r, r), mode="replicate"), g))[0, 0]
    m = mask[..., 0][None, None]
    inner = -F.max_pool2d(-m, 2 * erode + 1, 1, erode)[0, 0] if erode > 0 else m[0, 0]
    if float(inner.sum()) == 0:
        return float("nan")
    e_r, e_p = (highpass(render).square() * inner).sum(), (highpass(photo).square() * inner).sum()
    return float(e_r / e_p.clamp_min(1e-12))


def evaluate_frames(model: TrainedModel, w: Tensor, frames: FrameTargets, idx: Sequence[int],
                    colour: Tensor | None = None, backend: str = "auto", gaussians: Tensor | None = None,
                    lpips: bool = False, exposure: Sequence[Tensor] | None = None) -> tuple[dict, list[Tensor]]:
    """Mean PSNR in the face mask (``psnr_face``), PSNR and SSIM of the crop, SSIM in the face mask (``ssim_face``:
    the render multiplied by the frame's mask against the masked photo, so that what the avatar draws outside the
    mask, where the photo is black because the mask cut it, is not scored) over frames ``idx`` (with the colour
    residual (M, 3) and the per-Gaussian residual (V, K, 7)); with ``lpips`` also the mean LPIPS (VGG;
    utils/losses.py lpips_metric) inside the face mask (render and photo both multiplied by the frame's mask, so that
    only the face is compared), None when the optional lpips package is not usable here.  ``exposure``: per frame of
    ``idx`` a (2, 3) [gain; offset] applied to the (clamped) render inside the face mask, then clamped again
    (video_refine.apply_exposure), and the metrics of the render without it under ``no_exposure`` (psnr_face,
    ssim_face, per_frame_psnr_face; the same renders); None: the avatar as rendered.
    Returns (metrics with a per-frame list, renders (h, w, 3) per frame)."""
    pf, p, s, sf, lp, renders, pf0, sf0, hp = [], [], [], [], [], [], [], [], []
    for i in idx:
        v = frames.views[i]
        m, r = evaluate_cloud(code_cloud(model, w, frames.bases[i], colour, gaussians), [v], backend=backend)
        if exposure is not None:  # the frame's camera exposure on the render: the metrics of the exposed render
            pf0.append(m["psnr_face_all"])
            sf0.append(float(ssim_metric(r[0] * v.mask, v.image * v.mask)))
            e = exposure[len(renders)]
            r = apply_exposure(r[0], v.mask, e[0], e[1]).clamp(0, 1)[None]
            m = view_metrics(r, [v])
        pf.append(m["psnr_face_all"])
        p.append(m["psnr_all"])
        s.append(m["ssim_all"])
        sf.append(float(ssim_metric(r[0] * v.mask, v.image * v.mask)))
        hp.append(highpass_ratio(r[0], v.image, v.mask))
        renders.append(r[0])
        d = lpips_metric(r[0] * v.mask, v.image * v.mask) if lpips else None
        if d is not None:
            lp.append(float(d))
    mean = lambda x: float(np.mean(x)) if x else None  # noqa: E731
    out = {"psnr_face": mean(pf), "psnr": mean(p), "ssim": mean(s), "ssim_face": mean(sf),
           "lpips": mean(lp) if lp else None, "per_frame_psnr_face": pf, "sharpness_face": mean(hp)}
    if exposure is not None:
        out["no_exposure"] = {"psnr_face": mean(pf0), "ssim_face": mean(sf0), "per_frame_psnr_face": pf0}
    return out, renders


def clip_sampling_rate(model: TrainedModel, bases: Sequence[Tensor], cameras: Sequence[Camera],
                       foreshortening: bool = False, boundary_rings: int = 0) -> Tensor | None:
    """(V,) per-vertex sampling rate of the 3D filter for a video fit (``--video_filter_3d clip``): the larger of the
    model's (its training cameras) and the clip's training frames' (level-0 vertices ``bases`` (M, 3) each seen by
    its camera), as Mip-Splatting takes the maximum over all training views (vertices no frame sees keep the model's
    rate); None for a model without the filter.

    ``foreshortening``: each frame's rate times |cos| of the angle between the vertex normal and its ray to the
    camera, the rate at which the frame samples the surface across its foreshortened direction: a vertex the clip
    only sees at a grazing angle (neck, chin underside, where the frames end) was not sampled finely and keeps
    (nearly) the model's rate.

    ``boundary_rings`` > 0: the subdivided mesh's open boundary and the ``boundary_rings - 1`` rings inside it keep
    the model's rate (where the clip's frames end its fine filter let the rim's Gaussians break into blobs)."""
    if model.field.sampling_rate is None or model.field.filter_variance is None:
        return None
    verts = torch.stack([model.vertices(b.detach()) for b in bases])  # (T, V, 3)
    if foreshortening:
        normals = vertex_normals(verts, model.field.faces)  # (T, V, 3)
        clip = torch.zeros_like(model.field.sampling_rate)
        for t, cam in enumerate(cameras):
            ray = F.normalize(cam.center.to(verts) - verts[t], dim=-1)  # (V, 3) vertex -> camera
            cos = (normals[t] * ray).sum(-1).abs()
            rate_t = sampling_rate(verts[t:t + 1], [[cam]], unseen_smallest=False)
            clip = torch.maximum(clip, (rate_t * cos).float().cpu())
    else:
        clip = sampling_rate(verts, [[c] for c in cameras], unseen_smallest=False).cpu()
    if boundary_rings > 0:
        rim = boundary_rings_mask(len(clip), model.field.faces.cpu().numpy(), boundary_rings)
        clip = torch.where(rim, torch.zeros_like(clip), clip)
    return torch.maximum(model.field.sampling_rate, clip)


def _exposure_doc(expo: dict[int, Tensor] | None, train: Sequence[int], held: Sequence[int]) -> dict | None:
    """The per-frame exposure for metrics.json / code.pt: frame number -> gain (3,), offset (3,) and whether it was
    fitted (training frame) or interpolated (held-out frame); None when not fitted."""
    if expo is None:
        return None
    return {str(t): {"gain": [round(float(x), 5) for x in expo[t][0]], "bias": [round(float(x), 5) for x in expo[t][1]],
                     "source": "fitted" if t in train else "interpolated"} for t in sorted([*train, *held])}


def _lpips_note(cfg: TrackConfig, held: dict) -> str:
    """What metrics.json's lpips_* values are, or why they are null."""
    if not cfg.export.lpips:
        return "LPIPS not computed (--export.lpips false)"
    if held["lpips"] is None:
        return lpips_unavailable_reason() or "LPIPS not computed"
    return "LPIPS (VGG, the lpips package) of render and photo, both multiplied by the frame's face mask"


# ====================================================================================== the pipeline
def track_video(cfg: TrackConfig) -> dict:
    """track.py --video / --frames: track, fit, evaluate and export into ``cfg.out`` (see the module docstring).
    Returns the metrics dict written to metrics.json."""

    if bool(cfg.video) == bool(cfg.frames):
        raise ValueError("give exactly one of --video FILE and --frames DIR")
    if cfg.video_filter_3d not in VIDEO_FILTERS_3D:
        raise ValueError(f"--video_filter_3d must be one of {VIDEO_FILTERS_3D}, got {cfg.video_filter_3d!r}")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    src = cfg.video or cfg.frames
    if cfg.video:
        if not Path(cfg.video).is_file():
            raise FileNotFoundError(f"video not found: {cfg.video} (--video)")
        if Path(cfg.video).stat().st_size == 0:
            raise ValueError(f"{cfg.video} is empty (0 bytes): not a video (--video)")
        frames, frame_ids, fps = read_video(cfg.video, 0, cfg.stride, cfg.max_frames)
    else:
        frames, fps = read_frame_folder(cfg.frames, cfg.stride, cfg.max_frames), cfg.export.fps
        frame_ids = np.arange(len(frames)) * max(1, cfg.stride)  # index among the folder's images
    T = len(frames)
    h, w = frames[0].shape[:2]
    # the tracking phase's parts (metrics.json seconds_tracking; their sum is seconds_per_phase["track"])
    sub = {"read_frames": time.perf_counter() - t0}
    t1 = time.perf_counter()
    model = load_model(cfg.checkpoint, device)
    flame_dir = model_flame_dir(model, cfg.flame_dir)
    flame = FlameModel.from_data_dir(flame_dir)
    sub["load_model_flame"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if cfg.landmarks:  # (T, 68, 2) pixels; NaN rows: no face in that frame
        pts = torch.as_tensor(np.load(cfg.landmarks), dtype=torch.float32)
        if tuple(pts.shape) != (T, 68, 2):
            raise ValueError(f"--landmarks {cfg.landmarks}: expected ({T}, 68, 2) iBUG-68 pixels (one row per frame "
                             f"of {src}), got {tuple(pts.shape)}")
        irises, found = None, torch.isfinite(pts).all(-1).all(-1)
        outlines, too_small = None, ""  # no detector outline: the projected FLAME face mask alone
    else:
        faces = detect_video_faces(frames, cfg.min_face_px, cfg.progress)
        pts, irises, found, outlines = faces.points, faces.irises, faces.found, faces.outlines
        too_small = (f"; in {faces.too_small} of them the face found is too small (at most "
                     f"{faces.largest_too_small_px:.0f} px high, under --min_face_px={cfg.min_face_px:g}): use a "
                     f"closer or higher-resolution clip" if faces.too_small else "")
    if not bool(found.any()):
        if too_small:
            raise ValueError(f"{src}: no usable face in any of its {T} frames{too_small}")
        raise ValueError(f"{src}: no face in any of its {T} frames (the detector needs a clearly visible face at "
                         f"least --min_face_px={cfg.min_face_px:g} px high)")
    train, held = split_frames(found.numpy(), cfg.heldout_every, cfg.heldout_tail)
    if not train or not held:
        raise ValueError(f"{src}: {int(found.sum())} of {T} frames have a face, too few to hold out frames (every "
                         f"{cfg.heldout_every}th and the last {cfg.heldout_tail:.0%}) and still fit; use a longer clip")
    sub["landmarks"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    rcfg = ReenactConfig(min_face_px=cfg.min_face_px, flame_fit=cfg.flame_fit)
    params, info = fit_video_motion(flame, pts, irises, found, (w, h), rcfg, cfg.progress)
    params = params.to("cpu")
    cam = make_camera(info["focal_px"], (w, h), name="video")
    sub["flame_camera"] = time.perf_counter() - t1
    times["track"] = time.perf_counter() - t0

    # ---- per-frame targets: face mask (projected FLAME face mask within the detector's outline, as the photo path
    # does), masked photo, one crop size for all frames
    t0 = time.perf_counter()
    used = sorted(train + held)
    photos, masks, bases, fparams, nodata, cut = {}, {}, {}, {}, {}, {}
    for t in used:
        verts, base, _, p = frame_flame(model, flame_dir, None, params=params, frame=t, flame=flame)
        proj = projected_face_mask(model, verts, flame.faces, cam)  # without an outline, the mask: nothing cut
        m = detected_face_mask(model, verts, flame.faces, cam, None if outlines is None else outlines[t],
                               projected=proj)[..., None]
        if m.sum() == 0:
            raise ValueError(f"{src}: the tracked face of frame {t} does not project into the frame (or misses the "
                             f"detector's face outline there)")
        photos[t] = masked_photo(frames[t].astype(np.float32) / 255.0, m[..., 0], (0.0, 0.0, 0.0)).astype(np.float32)
        masks[t], bases[t], fparams[t] = m.astype(np.float32), base.to(device), p
        nodata[t] = no_data_mask(m[..., 0], proj, cfg.ignore_rim_band, cfg.ignore_cut)
        # the outline's cut, the rim band excluded
        cut[t] = nodata[t] * (1.0 - no_data_mask(m[..., 0], None, cfg.ignore_rim_band, False))
    # video_refine.cut_photo: the cut's pixels on the person (hair, neck; not the background) are fitted to the
    # frame's own colours: per frame its RGB and where (4th channel); the segmentation runs only where a cut exists
    cut_photo = cfg.video_refine.cut_photo and cfg.ignore_cut
    need = [t for t in used if cut_photo and cut[t].any()]
    person = dict(zip(need, person_masks([frames[t] for t in need]))) if need else {}
    # video_refine.cut_background: the cut's pixels the segmentation calls background (farther than
    # cut_background_margin px from the person) are not the avatar: alpha 0 there (the 5th channel)
    margin = cfg.video_refine.cut_background_margin
    for t in used:
        fitted = cut[t] * person[t] if t in person else np.zeros_like(cut[t])
        bg = (cut[t] * (1.0 - _dilate(person[t], margin)) if t in person and cfg.video_refine.cut_background
              else np.zeros_like(cut[t]))
        if t in person and cfg.video_refine.cut_hair:
            # video_refine.cut_hair: the cut's person pixels whose colour is not the face's skin (hair over the
            # temples and beside the neck) are not the FLAME surface's colour: alpha 0 there (5th channel), except
            # within cut_hair_margin px of the face mask (no data: the skin / hair boundary is uncertain)
            face = masks[t][..., 0]
            hair = hair_mask(frames[t], face * (1.0 - nodata[t]), fitted, cfg.video_refine.cut_hair_threshold)
            fitted = fitted * (1.0 - hair)
            bg = np.maximum(bg, hair * (1.0 - _dilate((face > 0.5).astype(np.float32),
                                                      cfg.video_refine.cut_hair_margin)))
        cut[t] = np.concatenate([frames[t].astype(np.float32) / 255.0 * (fitted[..., None] > 0), fitted[..., None],
                                 bg[..., None]], -1).astype(np.float32)
    cw, ch = crop_size([masks[t] for t in used], cfg.fit.crop_margin, cfg.fit.crop_multiple)
    views, ignore, cut_targets = {}, {}, {}
    for t in used:
        # the no-data map and the cut's colours travel as extra channels so that they get the same crop window
        i, m, c = crop_view(np.concatenate([photos[t], nodata[t][..., None], cut[t]], -1), masks[t], cam, cw, ch)
        views[t] = View(f"frame_{t:05d}", c.to(device), to_tensor_img(i[..., :3], device), to_tensor_img(m, device))
        ignore[t] = to_tensor_img(i[..., 3:4], device)
        cut_targets[t] = to_tensor_img(i[..., 4:9], device)
    use_ignore = cfg.ignore_rim_band > 0 or cfg.ignore_cut
    allf = FrameTargets([views[t] for t in used], [bases[t] for t in used])
    pos = {t: k for k, t in enumerate(used)}
    train_set = FrameTargets([views[t] for t in train], [bases[t] for t in train],  # held-out frames never enter
                             [ignore[t] for t in train] if use_ignore else None)
    # the 3D filter at the clip's own sampling rate where it saw the face finer than the model's training cameras
    model_rate = model.field.sampling_rate
    rate = (clip_sampling_rate(model, [bases[t] for t in train], [views[t].camera for t in train],
                               cfg.video_filter_3d_foreshortening, cfg.video_filter_3d_boundary_rings)
            if cfg.video_filter_3d == "clip" else None)
    if rate is not None:
        model.field.set_sampling_rate(rate)
    times["targets"] = time.perf_counter() - t0

    # ---- fit: style on many frames, then the colour residual
    t0 = time.perf_counter()
    held_set = FrameTargets([views[t] for t in held], [bases[t] for t in held])  # monitored only (progress bar)
    w_fit, fit_info = fit_video_style(model, train_set, cfg.fit, cfg.video_batch, cfg.backend, cfg.progress,
                                      Path(src).stem, held_set if cfg.progress else None)
    times["fit_style"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    colour, colour_losses, gaussians, refined = None, [], None, None
    if cfg.video_refine.iterations > 0:  # colour, per-Gaussian and per-frame FLAME refinement, jointly
        refined = refine_video(model, w_fit, flame, train, held, fparams, {t: views[t] for t in train}, cfg.fit,
                               cfg.video_refine, cfg.video_batch, cfg.backend, cfg.progress,
                               {t: views[t] for t in held} if cfg.progress else None,
                               {t: ignore[t] for t in train} if use_ignore else None,
                               {t: cut_targets[t] for t in train} if person else None)
        w_fit, colour, gaussians, colour_losses = refined.w, refined.colour, refined.gaussians, refined.losses
        bases.update({t: b.to(device) for t, b in refined.bases.items()})
        fparams.update({t: p.to("cpu") for t, p in refined.params.items()})
        if cfg.video_refine.camera_focal or cfg.video_refine.camera_principal:
            # the clip's refined camera: every frame (held-out ones too) is seen through it from here on
            rc = refined.camera

            def corrected(c: Camera) -> Camera:
                return refined_camera(c, rc["focal_scale"], rc["principal_shift"], rc["tracked_focal_px"])

            cam = corrected(cam)
            views = {t: replace(v, camera=corrected(v.camera)) for t, v in views.items()}
        allf = FrameTargets([views[t] for t in used], [bases[t] for t in used])
        times["fit_refine"] = time.perf_counter() - t0
    elif cfg.fit.refine_colour and cfg.fit.colour_iterations > 0:
        colour, colour_losses = fit_video_colour(model, w_fit, train_set, cfg.fit, cfg.video_batch, cfg.backend,
                                                 cfg.progress)
        times["fit_colour"] = time.perf_counter() - t0

    # ---- evaluate on held-out and training frames: the fit, the code alone, the mean code
    t0 = time.perf_counter()
    with torch.no_grad():
        w_mean = model.field.style(model.field.mean_code()[None], update_w_avg=False)[0]
    hi, ti = [pos[t] for t in held], [pos[t] for t in train]
    # with the per-frame exposure the reported figures are of the exposed render (training frames: fitted; held-out
    # frames: interpolated from the training frames, never their own pixels); the "_no_exposure" ones of the avatar
    # as rendered (identity exposure)
    expo = None if refined is None else refined.exposure
    e_held, e_train = (None, None) if expo is None else ([expo[t] for t in held], [expo[t] for t in train])
    m_held, r_held = evaluate_frames(model, w_fit, allf, hi, colour, cfg.backend, gaussians, cfg.export.lpips, e_held)
    m_train, _ = evaluate_frames(model, w_fit, allf, ti, colour, cfg.backend, gaussians, cfg.export.lpips, e_train)
    n_held, n_train = (m_held, m_train) if expo is None else (m_held["no_exposure"], m_train["no_exposure"])
    c_held, _ = evaluate_frames(model, w_fit, allf, hi, None, cfg.backend)
    b_held, _ = evaluate_frames(model, w_mean, allf, hi, None, cfg.backend)
    b_train, _ = evaluate_frames(model, w_mean, allf, ti, None, cfg.backend)
    times["evaluate"] = time.perf_counter() - t0

    # ---- outputs: everything into a temporary folder, then moved into --out
    t0 = time.perf_counter()
    out = Path(cfg.out)
    tmp = out.parent / f".{out.name}.tmp-video"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ref = train[0]  # the code's frame: the first training frame (its FLAME is the person's shape and placement)
        code = FittedCode(w=w_fit, z=None, base_vertices=bases[ref], name=Path(src).stem,
                          meta={"start": fit_info["start"], "space": "w", "refine_geometry": False,
                                "refine_flame": refined is not None and cfg.video_refine.flame,
                                "refine_shape": refined is not None and cfg.video_refine.flame_shape,
                                "refine_colour": colour is not None, "refine_gaussians": gaussians is not None,
                                "refine_network": refined is not None and cfg.video_refine.network_lr > 0,
                                "source": "video", "frame": ref, "tracked_base_vertices": bases[ref].detach().cpu(),
                                # the clip's camera exposure per frame: a property of the footage, never applied
                                # to the avatar (animate.py, interpolate.py and the viewer do not read it)
                                "exposure": _exposure_doc(expo, train, held)},
                          colour=colour, flame=fparams[ref], gaussians=gaussians, sampling_rate=rate)
        save_code(tmp / "code.pt", code, model, cfg.checkpoint)
        save_nersemble_tracking(tmp / "flame_fit.npz", params, frames=np.asarray(frame_ids))  # source frame numbers
        if refined is not None:  # the frames with a face, after the refinement (held-out: corrected from neighbours)
            save_nersemble_tracking(tmp / "flame_refined.npz", FlameParams.cat([fparams[t] for t in used]),
                                    frames=np.asarray(frame_ids)[used])
        write_camera_params(tmp / "camera_params.json", {"video": cam})
        side = [np.concatenate([to_uint8(allf.views[k].image), to_uint8(r)], axis=1) for k, r in zip(hi, r_held)]
        write_video(tmp / "heldout.mp4", side, fps=max(1.0, min(fps, 10.0)))
        if cfg.export.turntable:
            write_video(tmp / "turntable.mp4", turntable(model, code, cam.to(device), cfg.export, cfg.backend),
                        fps=cfg.export.fps)
        times["export"] = time.perf_counter() - t0
        doc = _clean({
            "identity": Path(src).stem, "source": str(src), "frames": T, "frames_with_face": int(found.sum()),
            "frames_skipped_no_face": int(T - found.sum()), "train_frames": train, "heldout_frames": held,
            "heldout_rule": {"every": cfg.heldout_every, "tail": cfg.heldout_tail},
            "psnr_face_heldout": m_held["psnr_face"], "psnr_face_train": m_train["psnr_face"],
            "heldout_exposure": "none" if expo is None else
            f"interpolated from the training frames ({cfg.video_refine.exposure_extrapolate} beyond them)",
            "psnr_face_heldout_no_exposure": n_held["psnr_face"], "psnr_face_train_no_exposure": n_train["psnr_face"],
            "ssim_face_heldout_no_exposure": n_held["ssim_face"], "ssim_face_train_no_exposure": n_train["ssim_face"],
            "exposure": _exposure_doc(expo, train, held),
            "ssim_heldout": m_held["ssim"], "ssim_train": m_train["ssim"],
            "ssim_face_heldout": m_held["ssim_face"], "ssim_face_train": m_train["ssim_face"],
            # high-pass energy of the avatar over the photo's in the eroded face mask (1: as sharp; highpass_ratio)
            "sharpness_face_heldout": m_held["sharpness_face"], "sharpness_face_train": m_train["sharpness_face"],
            "psnr_heldout": m_held["psnr"], "psnr_train": m_train["psnr"],
            "psnr_face_heldout_code_only": c_held["psnr_face"],
            "psnr_face_heldout_mean_code": b_held["psnr_face"], "psnr_face_train_mean_code": b_train["psnr_face"],
            "ssim_heldout_mean_code": b_held["ssim"],
            "per_frame_psnr_face_heldout": dict(zip(map(str, held), m_held["per_frame_psnr_face"])),
            "per_frame_psnr_face_heldout_no_exposure": dict(zip(map(str, held), n_held["per_frame_psnr_face"])),
            "lpips_heldout": m_held["lpips"], "lpips_train": m_train["lpips"], "lpips_note": _lpips_note(cfg, m_held),
            "iterations": fit_info["iterations"], "start": fit_info["start"], "loss_history": fit_info["loss_history"],
            "heldout_psnr_history": fit_info["heldout_psnr_history"],
            "colour_loss_history": colour_losses, "refine_colour": colour is not None,
            "refine_gaussians": gaussians is not None, "refine": None if refined is None else {
                "iterations": cfg.video_refine.iterations, "flame": cfg.video_refine.flame,
                "flame_shape": cfg.video_refine.flame_shape,
                "network_lr": cfg.video_refine.network_lr, "network_weight": cfg.video_refine.network_weight,
                "heldout_correction": cfg.video_refine.heldout_correction, "loss_history": refined.losses,
                "heldout_psnr_history": refined.heldout_psnr_history, "flame_correction": refined.correction,
                "camera_focal": cfg.video_refine.camera_focal, "camera_principal": cfg.video_refine.camera_principal,
                "camera": refined.camera, "exposure": cfg.video_refine.exposure,
                "exposure_bias": cfg.video_refine.exposure_bias, "exposure_prior": cfg.video_refine.exposure_prior,
                "exposure_extrapolate": cfg.video_refine.exposure_extrapolate,
                "alpha_weight": cfg.video_refine.alpha_weight,
                "gaussian_colour": cfg.video_refine.gaussian_colour,
                "alpha_outside": cfg.video_refine.alpha_outside,
                "gaussian_residual_rms": None if gaussians is None else
                [float(x) for x in gaussians.reshape(-1, gaussians.shape[-1]).square().mean(0).sqrt()]},
            "tracking": {k: v for k, v in info.items() if k != "landmark_error_px"},
            "landmark_error_px_mean": float(np.nanmean(np.asarray(info["landmark_error_px"])[found.numpy()])),
            "filter_3d": {"mode": cfg.video_filter_3d, "sigma_ratio_median": None if rate is None else
                          float((model_rate / rate).median())},
            "mask": "projected FLAME face mask" + (" within the detector's face outline" if outlines else ""),
            "loss_no_data": {"rim_band_px": cfg.ignore_rim_band, "outline_cut": cfg.ignore_cut,
                             "fraction_of_crop": float(np.mean([float(ignore[t].mean()) for t in train])),
                             # video_refine.cut_photo: the part of the crop fitted to the frame's own colours
                             "cut_photo_fraction_of_crop": float(np.mean([float(cut_targets[t][..., 3].mean())
                                                                          for t in train])),
                             # video_refine.cut_background: the part of the crop pulled transparent
                             "cut_background_fraction_of_crop": float(np.mean(
                                 [float(cut_targets[t][..., 4].mean()) for t in train])),
                             "cut_hair": cfg.video_refine.cut_hair},
            "crop": [cw, ch], "seconds": sum(times.values()), "seconds_per_phase": times,
            "seconds_tracking": sub,
            "device": str(device), "checkpoint": str(cfg.checkpoint),
        })
        atomic_write_json(doc, tmp / "metrics.json")
        out.mkdir(parents=True, exist_ok=True)
        for p in tmp.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return doc


# ====================================================================================== synthetic clips (tests)
def synthetic_clip(root: str | os.PathLike, subject: str, out_dir: str | os.PathLike, serial: str | None = None
                   ) -> tuple[Path, Path]:
    """A monocular clip of a synthetic sequence (``make_synthetic_dataset.py --num_frames N --motion head_turn``):
    camera ``serial``'s (default the frontal one) image of every frame as ``<out_dir>/frames/frame_<t>.png`` and
    the ground-truth FLAME landmarks projected into it as ``<out_dir>/landmarks.npy`` (T, 68, 2) (the detector finds
    no face in images this small).  Returns (frames folder, landmarks file)."""
    import cv2


    serial = serial or FRONTAL_SERIAL
    root, out_dir = Path(root), Path(out_dir)
    flame = FlameModel.from_data_dir(root / "flame")
    seq = NersembleSubject(root / "subjects", subject).tracking()
    fdir = out_dir / "frames"
    fdir.mkdir(parents=True, exist_ok=True)
    pts = []
    for t in range(seq.num_frames):
        subj = NersembleSubject(root / "subjects", subject, frame=t)
        img = subj.image(serial)
        cam = subj.cameras(serials=[serial])[serial]
        cv2.imwrite(str(fdir / f"frame_{t:05d}.png"), cv2.cvtColor(np.ascontiguousarray(
            (np.clip(img, 0, 1) * 255).round().astype(np.uint8)), cv2.COLOR_RGB2BGR))
        pts.append(flame_landmarks_2d(flame, flame.bake_root_pivot(seq.frame(t)), cam)[0].cpu().numpy())
    lm = out_dir / "landmarks.npy"
    np.save(lm, np.stack(pts).astype(np.float32))
    return fdir, lm


@torch.no_grad()
def novel_camera_psnr(model: TrainedModel, code: FittedCode, root: str | os.PathLike, subject: str,
                      frames: Sequence[int], skip_serial: str | None = None, backend: str = "auto") -> float:
    """Mean PSNR in the face mask of ``code`` (style + colour residual) rendered on the ground-truth FLAME of
    ``frames`` of a synthetic subject through every rig camera but ``skip_serial`` (the video's camera), against the
    ground-truth images: how well the fitted identity generalises to views the video never showed.  The code is
    rendered as the tools render it: with its own 3D filter when it has one (code_file.code_filter; ``model``'s own
    comes back afterwards)."""

    with code_filter(model, code):
        return _novel_camera_psnr(model, code, Path(root), subject, frames, skip_serial, backend)


def _novel_camera_psnr(model: TrainedModel, code: FittedCode, root: Path, subject: str, frames: Sequence[int],
                       skip_serial: str | None, backend: str) -> float:
    """novel_camera_psnr without the code's 3D filter handling."""
    skip_serial = skip_serial or FRONTAL_SERIAL
    flame = FlameModel.from_data_dir(root / "flame")
    seq = NersembleSubject(root / "subjects", subject).tracking()
    dev = code.w.device
    vals = []
    for t in frames:
        subj = NersembleSubject(root / "subjects", subject, frame=t)
        serials = [s for s in subj.serials() if s != skip_serial]
        cams = subj.cameras(serials=serials)
        verts, base, _, _ = frame_flame(model, root / "flame", None, params=seq, frame=t, flame=flame)
        for s in serials:
            m = projected_face_mask(model, verts, flame.faces, cams[s])
            if m.sum() < 16:
                continue
            gt = masked_photo(subj.image(s).astype(np.float32), m, (0.0, 0.0, 0.0)).astype(np.float32)
            v = View(s, cams[s].to(dev), torch.from_numpy(gt).to(dev), torch.from_numpy(m[..., None]).to(dev))
            res, _ = evaluate_cloud(code_cloud(model, code.w, base.to(dev), code.colour, code.gaussians), [v],
                                    backend=backend)
            vals.append(res["psnr_face_all"])
    return float(np.mean(vals))
