"""What a single-image fit fits: ``FitTarget`` (the photo, cropped to its face mask, the tracked face-mask vertices and
every calibrated view for evaluation), built from a NeRSemble subject folder, from one's own photo with its
calibrated camera and FLAME tracking, or from a photo alone ("in the wild": landmarks -> FLAME and camera,
utils/face/landmarks.py and utils/face/flame_fit.py)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.flame import FlameModel, load_tracking
from models.renderer.mesh_raster import render_mask
from utils.apps.track.config import FitConfig, TrackConfig
from utils.core.images import read_image
from utils.data.camera_params import load_camera_params
from utils.data.dataset import crop_size, crop_view
from utils.data.model_file import TrainedModel
from utils.data.nersemble import NersembleSubject, tracking_row
from utils.evaluation import View, to_tensor_img
from utils.face.flame_fit import LandmarkTargets, fit_flame_to_landmarks
from utils.face.landmarks import detect_landmarks, load_landmarks_file
from utils.face.masks import masked_photo, soft_mask
from utils.face.regions import EyeLandmarkEmbedding, embedding_for_flame
from utils.identity import model_flame_dir


@dataclass
class FitTarget:
    """Everything one fit needs.

    Attributes:
        name: label of the person (subject id or image stem).
        base_vertices: (M, 3) tracked world-space face-mask vertices (level 0, in the model's mask order).
        fit_view: the photo being fitted, cropped tightly to its face mask.
        eval_views: every calibrated view with a photo (fitted one included), cropped to one common size.
        extra_views: calibrated cameras without a photo (rendered only).
        fit_camera_full: the fitted camera for the whole photo (turntable start).
        eye_landmarks: FLAME's eye landmarks on the face mask, for the eye-region metrics (None when the FLAME files
            have no landmark embedding on the mask).
        flame: the photo's FLAME parameters (models.flame.FlameParams, T = 1; None when unknown), stored in code.pt
            so that the fitted person can be animated.
        ignore: (h, w, 1) on ``fit_view``'s crop, 1 = no data (:func:`no_data_mask`): left out of the fit's loss;
            None: every pixel is data (calibrated subjects).
    """

    name: str
    base_vertices: Tensor
    fit_view: View
    eval_views: list[View]
    extra_views: list[View]
    fit_camera_full: Camera
    source: dict[str, str]
    eye_landmarks: EyeLandmarkEmbedding | None = None
    wild: "WildFit | None" = None  # photo-only targets: the landmarks and the FLAME fit behind base_vertices
    flame: Any = None
    ignore: Tensor | None = None


@dataclass
class WildFit:
    """How a photo-only target was made: its landmarks, the FLAME + camera fit and the FLAME model used (and the
    FLAME after the optional photometric refinement).

    photo: (H, W, 3) the whole photo in [0, 1]; mask: (H, W) the face mask used (projected FLAME face mask, within
    the detector's face outline when there is one)."""

    landmarks: Any  # utils.face.landmarks.FaceLandmarks
    fit: Any  # utils.face.flame_fit.FlameFitResult
    flame: Any  # models.flame.FlameModel
    photo: np.ndarray
    mask: np.ndarray
    refined: Any = None  # the FlameFitResult after the photometric FLAME stage (fit.refine_flame), else None
    original_size: tuple[int, int] | None = None  # (width, height) of the photo file when it was scaled for the fit


def default_flame_dir(subject_dir: Path) -> Path:
    """FLAME folder of a subject: ``<root>/flame`` for the synthetic layout ``<root>/subjects/<id>``, else data/."""
    cand = subject_dir.resolve().parent.parent / "flame"
    return cand if cand.is_dir() else Path("data")


def frame_flame(model: TrainedModel, flame_dir: Path, tracking: Path | None, params=None, frame: int = 0,
                flame=None, frame_ids: bool = False) -> tuple[Tensor, Tensor, Any, Any]:
    """FLAME of one tracked frame: (world-space vertices (V, 3), the model's face-mask part (M, 3), the FlameModel,
    the frame's FlameParams (T = 1, VHAP's root pivot baked)).

    ``frame`` picks the row of ``params`` (or of the ``tracking`` file): with ``frame_ids`` the row whose frame number
    (the npz's ``frames`` key, utils/data/nersemble.py tracking_row) is ``frame``, else row min(frame, T - 1).
    ``flame``: an already loaded FlameModel of ``flame_dir``."""

    flame = flame if flame is not None else FlameModel.from_data_dir(flame_dir)
    if params is None:
        params = load_tracking(tracking, flame=flame)
    row = tracking_row(tracking, frame, params.num_frames) if frame_ids and tracking is not None \
        else min(frame, params.num_frames - 1)
    params = flame.bake_root_pivot(params.frame(row))
    model.check_flame(flame, flame_dir)
    with torch.no_grad():
        verts = flame(params)[0].float()
    return verts, verts[torch.as_tensor(model.mask_ids)], flame, params


def flame_vertices(model: TrainedModel, flame_dir: Path, tracking: Path | None, params=None,
                   frame: int = 0, flame=None) -> tuple[Tensor, Tensor, Any]:
    """World-space FLAME vertices (V, 3) of a tracking file (or ``params``) and the model's face-mask part (M, 3),
    and the FlameModel (:func:`frame_flame` without the parameters)."""
    return frame_flame(model, flame_dir, tracking, params, frame, flame)[:3]


def fit_and_eval_views(serials: Sequence[str], images: dict, masks: dict, cams: dict, fit_serial: str,
                        cfg: FitConfig, device: torch.device) -> tuple[View, list[View]]:
    """Crop the fitted view tightly and every view (incl. the fitted one) to one common size, as training does."""
    fw, fh = crop_size([masks[fit_serial]], cfg.crop_margin, cfg.crop_multiple)
    fi, fm, fc = crop_view(images[fit_serial], masks[fit_serial], cams[fit_serial], fw, fh)
    fit = View(fit_serial, fc.to(device), to_tensor_img(fi, device), to_tensor_img(fm, device))
    cw, ch = crop_size([masks[s] for s in serials], cfg.crop_margin, cfg.crop_multiple)
    views = []
    for s in serials:
        i, m, c = crop_view(images[s], masks[s], cams[s], cw, ch)
        views.append(View(s, c.to(device), to_tensor_img(i, device), to_tensor_img(m, device)))
    return fit, views


def load_subject_target(model: TrainedModel, cfg: TrackConfig, device: torch.device,
                        subject_dir: str | os.PathLike | None = None) -> FitTarget:
    """The photo of camera ``cfg.camera`` of a NeRSemble subject folder (preprocessed: face masks present), plus
    every other calibrated view with a photo for evaluation."""
    sdir = Path(subject_dir or cfg.subject_dir)
    if not sdir.is_dir():
        raise FileNotFoundError(f"subject folder not found: {sdir} (expected a NeRSemble subject folder "
                                f"<root>/<id> with calibration/ and sequences/)")
    subject = NersembleSubject(sdir.parent, sdir.name, cfg.sequence, cfg.frame)
    serials = subject.serials()
    if cfg.camera not in serials:
        raise ValueError(f"camera {cfg.camera} has no image in {subject.image_dir} (cameras with images: {serials})")
    cams = subject.cameras(cfg.image_scale, serials)
    images, masks = {}, {}
    for s in serials:
        images[s] = subject.masked_image(s, cfg.image_scale)
        masks[s] = subject.facemask(s, cfg.image_scale)
    flame_dir = Path(cfg.flame_dir) if cfg.flame_dir else default_flame_dir(sdir)
    _, base, flame, params = frame_flame(model, flame_dir, subject.tracking_path, frame=cfg.frame, frame_ids=True)
    fit, views = fit_and_eval_views(serials, images, masks, cams, cfg.camera, cfg.fit, device)
    return FitTarget(name=sdir.name, base_vertices=base.to(device), fit_view=fit, eval_views=views, extra_views=[],
                     fit_camera_full=cams[cfg.camera].to(device), flame=params,
                     eye_landmarks=embedding_for_flame(flame, model.mask_ids),
                     source={"subject_dir": str(sdir), "camera": cfg.camera, "flame_dir": str(flame_dir)})


def projected_face_mask(model: TrainedModel, flame_verts: Tensor, flame_faces: Tensor, camera: Camera) -> np.ndarray:
    """Face mask of a photo from its FLAME tracking, as preprocessing makes it (utils/preprocess/projection_ply.py):
    the model's face-mask triangles z-buffered against the whole FLAME head.  Returns (H, W) float32 in {0, 1}."""

    fm_v = flame_verts[torch.as_tensor(model.mask_ids)]
    fm_f = torch.as_tensor(model.base_faces, dtype=torch.long)
    verts = torch.cat([flame_verts, fm_v])
    faces = torch.cat([flame_faces.cpu(), fm_f + len(flame_verts)])
    paint = torch.zeros(len(faces), dtype=torch.bool)
    paint[len(flame_faces):] = True  # the head only occludes; face-mask triangles paint
    mask = render_mask(verts, faces, camera.to("cpu"), paint_faces=paint).numpy()
    return soft_mask(mask, 0.0)


def read_photo(path: Path, what: str, gray: bool = False) -> np.ndarray:
    """(H, W, 3) RGB or, with ``gray``, (H, W, 1) float32 in [0, 1]; a missing, empty, truncated or undecodable file
    is an error naming it (utils.core.images.read_image)."""
    img = read_image(path, what, "gray" if gray else "color")
    return img[..., None] if gray else img


def load_image_target(model: TrainedModel, cfg: TrackConfig, device: torch.device) -> FitTarget:
    """One's own photo (``cfg.image``) with its calibrated camera (``cfg.camera_json`` / ``cfg.camera``) and FLAME
    tracking (``cfg.flame``); the face mask is ``cfg.mask`` or projected from the tracking."""
    import cv2

    for key, what in (("camera_json", "--camera_json (camera_params.json)"), ("flame", "--flame (tracking npz)")):
        if not getattr(cfg, key):
            raise ValueError(f"--image needs {what}")
    img_path = Path(cfg.image)
    photo = read_photo(img_path, "photo (--image)")
    h, w = photo.shape[:2]
    json_path = Path(cfg.camera_json)
    if not json_path.is_file():
        raise FileNotFoundError(f"camera file not found: {json_path} (--camera_json, a NeRSemble camera_params.json)")
    try:
        all_serials = list(json.loads(json_path.read_text()).get("world_2_cam", {}))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path} is not valid JSON: {exc}") from exc
    if cfg.camera not in all_serials:
        raise ValueError(f"camera {cfg.camera!r} is not in {json_path} (it has cameras {all_serials}); choose one "
                         f"with --camera")
    # every camera of the file is rendered at the photo's size (the photo fixes the calibration ratio)
    cams = load_camera_params(json_path, image_size=(w, h), serials=all_serials)
    if cfg.image_scale != 1.0:
        cams = {s: c.scaled(cfg.image_scale) for s, c in cams.items()}
        photo = cv2.resize(photo, (cams[cfg.camera].width, cams[cfg.camera].height), interpolation=cv2.INTER_AREA)
    cam = cams[cfg.camera]
    flame_dir = Path(cfg.flame_dir) if cfg.flame_dir else Path("data")
    flame_verts, base, flame, params = frame_flame(model, flame_dir, Path(cfg.flame), frame=cfg.frame)
    if cfg.mask:
        mask = read_photo(Path(cfg.mask), "face mask (--mask)", gray=True)
        if mask.shape[:2] != (h, w):
            raise ValueError(f"face mask {cfg.mask} is {mask.shape[1]}x{mask.shape[0]} but the photo {img_path} is "
                             f"{w}x{h}")
        if cfg.image_scale != 1.0:
            mask = cv2.resize(mask, (cam.width, cam.height), interpolation=cv2.INTER_AREA)[..., None]
        mask = (mask > 0.5).astype(np.float32)
    else:
        mask = projected_face_mask(model, flame_verts, flame.faces, cam)[..., None]
    if mask.sum() == 0:
        raise ValueError(f"the face mask of {img_path} is empty: the FLAME tracking {cfg.flame} does not project into "
                         f"camera {cfg.camera} of {json_path} (wrong camera or tracking?)")
    extra = [View(k, c.to(device)) for k, c in cams.items() if k != cfg.camera]
    return photo_target(img_path.stem, photo, mask, cam, base, cfg, device, extra,
                        {"image": str(img_path), "camera_json": str(json_path), "camera": cfg.camera,
                         "flame": str(cfg.flame), "mask": cfg.mask or "projected", "flame_dir": str(flame_dir)},
                        flame=params, eyes=embedding_for_flame(flame, model.mask_ids))


def photo_target(name: str, photo: np.ndarray, mask: np.ndarray, cam: Camera, base: Tensor, cfg: TrackConfig,
                 device: torch.device, extra: Sequence[View] = (), source: dict | None = None,
                 wild: WildFit | None = None, flame: Any = None,
                 eyes: EyeLandmarkEmbedding | None = None, ignore: np.ndarray | None = None) -> FitTarget:
    """A one-photo FitTarget: photo (H, W, 3), mask (H, W, 1) in {0, 1}, its camera and face-mask vertices (M, 3);
    ``flame``: the photo's FlameParams (T = 1); ``eyes``: FLAME's eye landmarks on the face mask (eye metrics);
    ``ignore``: (H, W) the photo's no-data pixels (:func:`no_data_mask`; None: none), cropped with the fitted view."""

    masked = masked_photo(photo, mask[..., 0], (0.0, 0.0, 0.0)).astype(np.float32)
    s = cam.name
    fit, views = fit_and_eval_views([s], {s: masked}, {s: mask}, {s: cam}, s, cfg.fit, device)
    ign = None
    if ignore is not None and ignore.any():
        fw, fh = crop_size([mask], cfg.fit.crop_margin, cfg.fit.crop_multiple)
        ign = to_tensor_img(crop_view(ignore[..., None].astype(np.float32), mask, cam, fw, fh)[0], device)
    return FitTarget(name=name, base_vertices=base.to(device), fit_view=fit, eval_views=views,
                     extra_views=list(extra), fit_camera_full=cam.to(device), source=source or {}, wild=wild,
                     flame=flame, eye_landmarks=eyes, ignore=ign)


def no_data_mask(mask: np.ndarray, projected: np.ndarray | None, rim_band_px: int, cut: bool) -> np.ndarray:
    """(H, W) float32 {0, 1}: the pixels of a frame the fit must not read as black.  ``mask`` (H, W): the frame's
    face mask (the projected FLAME face mask ``projected`` (H, W), within the detector's outline when there is one).

    Why: the frame is black outside its face mask only because the mask cut it; the avatar's surface goes on there.
    Supervising those pixels as black pulls the straddling rim Gaussians' opacity, size and colour down, which
    darkens and fades the face just inside the mask's edge (the model itself was trained with that ring
    unsupervised, loss.rim_band).  Left out: the ``rim_band_px`` pixels just outside the mask and, with ``cut``,
    the part of the projected FLAME face mask that the detector's outline removed (forehead under the hair, cheeks
    beyond the outline: the avatar renders a face there, the photo shows hair or background)."""
    from utils.losses import rim_band

    m = torch.as_tensor(mask, dtype=torch.float32)[..., None]
    out = rim_band(m, rim_band_px)[..., 0].numpy() if rim_band_px > 0 else np.zeros(mask.shape, np.float32)
    if cut and projected is not None:
        out = np.maximum(out, ((projected > 0.5) & (mask <= 0.5)).astype(np.float32))
    return out.astype(np.float32)


def polygon_mask(polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) float32 {0, 1}: pixels whose centre lies inside ``polygon`` (K, 2) pixel coordinates."""
    import cv2

    m = np.zeros((height, width), np.uint8)
    # cv2 treats integer vertex (i, j) as pixel centre (i + 0.5, j + 0.5): shift by -0.5 and draw with sub-pixels
    pts = np.round((np.asarray(polygon, np.float64) - 0.5) * 16).astype(np.int32)
    cv2.fillPoly(m, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return m.astype(np.float32)


def detected_face_mask(model: TrainedModel, flame_verts: Tensor, flame_faces: Tensor, camera: Camera,
                       outline: np.ndarray | None = None, projected: np.ndarray | None = None) -> np.ndarray:
    """The face mask of a photo or video frame tracked from detected landmarks: the projected FLAME face mask
    (:func:`projected_face_mask`) intersected with the detector's face outline ``outline`` (K, 2) pixels, which keeps
    hair, ears and background out where the FLAME face mask reaches beyond the face; None or an empty outline: the
    projected mask alone.  ``projected``: that projected mask when the caller already has it.  Returns (H, W) float32
    in {0, 1} at ``camera``'s size."""
    mask = projected_face_mask(model, flame_verts, flame_faces, camera) if projected is None else projected
    if outline is not None and len(outline) >= 3:
        mask = mask * polygon_mask(outline, camera.width, camera.height)
    return mask


@dataclass
class PhotoTools:
    """What the photo-only path loads once and can keep across photos (a service, a benchmark): the landmark
    detector (``LandmarkDetector(static_images=True)``, or None: one is opened per photo) and the FLAME model of the
    trained model's FLAME folder (or None: loaded per photo).  The caller owns and closes the detector."""

    detector: Any = None
    flame: FlameModel | None = None


def load_wild_target(model: TrainedModel, cfg: TrackConfig, device: torch.device,
                     tools: PhotoTools | None = None) -> FitTarget:
    """A photo alone (``cfg.image``): landmarks (mediapipe, or ``cfg.landmarks``), then FLAME and a pinhole camera
    fitted to them (utils/face/flame_fit.py), then the face mask projected from the fitted FLAME face mask, intersected
    with the detector's face outline where there is one.  ``tools``: a detector and FLAME model kept open by the
    caller (:class:`PhotoTools`; the FLAME model must be the one of the model's FLAME folder)."""
    import cv2


    img_path = Path(cfg.image)
    photo = read_photo(img_path, "photo (--image)")
    h0, w0 = photo.shape[:2]
    # landmarks at the photo's own resolution (most precise), then the photo is scaled: by --image_scale, and down so
    # the face is at most --max_face_px high (a model renders no more detail than it was trained with; on a CPU the
    # fit's time grows with the face's pixels)
    if cfg.landmarks:
        lms = load_landmarks_file(cfg.landmarks, (w0, h0))
    else:
        lms = detect_landmarks(photo, name=str(img_path), min_face_px=cfg.min_face_px,
                               detector=tools.detector if tools is not None else None)
    scale = float(cfg.image_scale)
    if cfg.max_face_px > 0:
        scale = min(scale, cfg.max_face_px / max(lms.face_size, 1.0))
    flame_cfg = cfg.flame_fit
    if scale != 1.0:
        w, h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        photo = cv2.resize(photo, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        lms = lms.scaled(w / w0, h / h0)
        # the landmarks' noise floor is in pixels of the photo they were found in
        flame_cfg = replace(flame_cfg, landmark_sigma_px=flame_cfg.landmark_sigma_px * scale)
    h, w = photo.shape[:2]
    flame_dir = model_flame_dir(model, cfg.flame_dir)

    flame = tools.flame if tools is not None and tools.flame is not None else FlameModel.from_data_dir(flame_dir)
    irises = None
    if len(lms.mesh) >= 478:  # mediapipe's iris centres: 468 and 473; which is the subject's right eye is measured
        a, b = lms.mesh[468, :2], lms.mesh[473, :2]
        right = lms.ibug68[36:42].mean(0)
        irises = np.stack([a, b] if np.linalg.norm(a - right) < np.linalg.norm(b - right) else [b, a])[None]
    targets = LandmarkTargets(torch.as_tensor(lms.ibug68[None], dtype=torch.float32), (w, h),
                              irises=None if irises is None else torch.as_tensor(irises, dtype=torch.float32))
    res = fit_flame_to_landmarks(flame, targets, flame_cfg, camera_name=cfg.camera)
    cam = res.camera
    flame_verts, base, _, params = frame_flame(model, flame_dir, None, params=res.params, flame=flame)
    projected = projected_face_mask(model, flame_verts, flame.faces, cam)
    mask = detected_face_mask(model, flame_verts, flame.faces, cam, lms.outline, projected=projected)
    if mask.sum() == 0:
        raise ValueError(f"the face mask of {img_path} is empty: the FLAME fitted to its landmarks does not project "
                         f"into the photo")
    wild = WildFit(landmarks=lms, fit=res, flame=flame, photo=photo, mask=mask,
                   original_size=None if (w, h) == (w0, h0) else (w0, h0))
    return photo_target(img_path.stem, photo, mask[..., None], cam, base, cfg, device, (),
                        {"image": str(img_path), "landmarks": cfg.landmarks or "mediapipe face mesh",
                         "camera": "fitted", "flame": "fitted", "flame_dir": str(flame_dir),
                         "photo_scale": f"{w / w0:.4f}"}, wild, params, embedding_for_flame(flame, model.mask_ids),
                        no_data_mask(mask, projected, cfg.ignore_rim_band, cfg.ignore_cut))
