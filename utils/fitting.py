"""Single-image reconstruction ("tracking"): fit a new person's latent code to ONE photo, network frozen.

Pipeline (``track``)::

    load    model.pt (frozen IdentityField) + the photo, its camera and FLAME tracking (NeRSemble subject folder, or
            one's own image + camera_params.json + tracking npz); face-masked, cropped to the face-mask box
    fit     Adam on the style w (or the code z) from a start point (mean code / w_avg / mean training style, or the
            best of them on the photo), loss 0.8 * L1 + 0.2 * (1 - SSIM), exponential lr decay, early stopping on a
            loss plateau; optionally small regularised offsets of the base vertices (``fit.refine_geometry``)
    colour  (``fit.refine_colour``, on by default) with the fitted code fixed, Adam on a per-vertex RGB residual of
            the level-0 face-mask vertices (upsampled through the subdivision like the geometry, added to the
            Gaussians' SH DC term), same photometric loss plus a mesh-Laplacian smoothness and an L2 penalty: detail
            the frozen network cannot express for a new person; vertices the photo does not show get no data
            gradient and stay near zero (L2) and smooth with their seen neighbours (Laplacian)
    evaluate PSNR / SSIM (/ LPIPS) on every calibrated view with a photo, over all views and over the unseen ones
            (every camera but the fitted one), for the fitted identity (code + colour residual), for the code alone
            and for the mean code (the "before" baseline)
    export  code.pt, head.ply (3DGS layout), views/cam_<serial>.png (render | photo), grid.png, turntable.mp4,
            metrics.json

Speed: the per-iteration work is one network forward and backward (frozen weights, only the optimised vector needs
gradients; on a GPU replayed from CUDA graphs, models/graphed_synthesis.py), one rasterizer call on the cropped view
and the loss; the loop never synchronises with the host except every ``fit.check_every`` iterations for the
early-stopping test, so it runs asynchronously on a GPU.  The colour stage does not run the network at all: the
fitted Gaussians are synthesised once and each iteration only adds the residual to their colours, renders and steps
(again synchronising only every ``fit.check_every`` iterations).
"""
from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models.gaussians import SH_C0, GaussianCloud
from models.graphed_synthesis import GraphedSynthesis
from models.renderer import render, render_batch
from utils.cameras import Camera, load_camera_params
from utils.config import add_config_args, build_config, to_dict
from utils.dataset import crop_size, crop_view
from utils.device import resolve_device
from utils.io import atomic_torch_save, atomic_write_json, load_tagged, save_image, to_uint8, write_video
from utils.losses import l1, lpips_metric, psnr, ssim, ssim_metric
from utils.model_io import TrainedModel, load_model
from utils.nersemble import FRONTAL_SERIAL, HELDOUT_IDENTITIES, HELDOUT_SERIALS, NersembleSubject

CODE_FORMAT = "identity-field-code"
CODE_VERSION = 2  # 2: optional per-vertex colour residual ("colour"); version 1 files (without it) still load
INITS = ("auto", "mean_code", "w_avg", "mean_w")
SPACES = ("w", "z")


# ====================================================================================== configuration
@dataclass
class FitConfig:
    """Optimisation of one identity (the network stays frozen)."""

    space: str = "w"  # optimised vector: w (style, more expressive) or z (latent code, stays on the code manifold)
    init: str = "auto"  # start: mean_code, w_avg, mean_w (mean training style), auto (best on the photo), or a code.pt
    iterations: int = 100  # maximum Adam iterations
    lr: float = 0.2  # Adam learning rate of the code / style
    lr_final_ratio: float = 0.05  # the learning rate decays exponentially to lr * this at the last iteration
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.99  # Adam beta2
    check_every: int = 10  # early-stopping test every k iterations (the only host synchronisation of the loop)
    patience: int = 2  # stop after this many tests in a row without min_rel_improvement of the windowed loss
    min_rel_improvement: float = 0.005  # relative loss improvement that counts as progress
    min_iterations: int = 30  # never stop before this many iterations
    l1_weight: float = 0.8  # weight of L1 (paper: 0.8)
    ssim_weight: float = 0.2  # weight of 1 - SSIM (paper: 0.2)
    style_reg: float = 0.01  # weight of the mean squared distance of w from its start (w space only; 0: off)
    refine_geometry: bool = False  # also optimise small offsets of the base (level-0) face-mask vertices
    geometry_lr: float = 2e-4  # Adam learning rate of the vertex offsets, in metres
    laplacian_weight: float = 100.0  # weight of the squared uniform Laplacian of the offsets (edge-length units)
    offset_weight: float = 1.0  # weight of the squared offsets (edge-length units)
    refine_colour: bool = True  # after the code fit: a regularised per-vertex RGB residual of the level-0 vertices
    #                             (upsampled like the geometry, added to the Gaussians' colour; network not re-run)
    colour_iterations: int = 40  # Adam iterations of the colour stage (a fixed count; 0 skips the stage)
    colour_lr: float = 0.05  # Adam learning rate of the residual (RGB units, colours in [0, 1]); decays like fit.lr
    colour_laplacian_weight: float = 10.0  # weight of the squared uniform Laplacian of the residual (smoothness)
    colour_weight: float = 1.0  # weight of the squared residual (keeps it small; unseen vertices stay near 0)
    crop_margin: float = 0.1  # the fitted view is cropped to its face-mask box grown by this fraction per side
    crop_multiple: int = 16  # crop sizes are rounded up to a multiple of this
    cuda_graphs: bool = True  # on a GPU, replay the frozen network from CUDA graphs (false: run it eagerly)


@dataclass
class ExportConfig:
    """What ``track`` writes besides code.pt and metrics.json."""

    ply: bool = True  # head.ply, the fitted Gaussians in the standard 3DGS layout
    views: bool = True  # views/cam_<serial>.png (render | photo) and grid.png
    turntable: bool = True  # turntable.mp4
    turntable_frames: int = 60  # frames of the turntable video
    turntable_degrees: float = 120.0  # yaw range: >= 360 a full turn, else a swing of +-degrees/2 and back
    turntable_size: int = 256  # turntable frame height in pixels (width from the fitted camera's aspect)
    fps: float = 25.0  # video frame rate
    lpips: bool = True  # compute LPIPS when the optional lpips package works here (skipped with a message else)


@dataclass
class TrackConfig:
    """Inputs, outputs and settings of ``track.py``."""

    checkpoint: str = "output/cpu/model.pt"  # trained model.pt (written by train.py)
    subject_dir: str = ""  # a NeRSemble subject folder (<root>/<id>); the photo is camera --camera of it
    camera: str = FRONTAL_SERIAL  # serial of the camera whose photo is fitted
    sequence: str = "EXP-1-head"  # sequence of the subject folder
    frame: int = 0  # frame index of the sequence
    flame_dir: str = ""  # FLAME files; default: <subject_dir>/../../flame if it exists (synthetic layout), else data/
    image: str = ""  # one's own photo (instead of --subject_dir); needs --camera_json and --flame
    camera_json: str = ""  # NeRSemble-style camera_params.json holding --camera (own-photo mode)
    flame: str = ""  # FLAME tracking npz of the photo, NeRSemble or VHAP format (own-photo mode)
    mask: str = ""  # face mask of the photo (white = face); default: projected from the tracked FLAME face mask
    image_scale: float = 1.0  # resize factor applied to the photos (and cameras)
    out: str = "output/tracking"  # output folder
    all_heldout: bool = False  # fit every held-out identity of --data_root and print a Markdown table
    data_root: str = "syn_data"  # dataset for --all_heldout (a synthetic dataset folder or NeRSemble subjects)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    backend: str = "auto"  # rasterizer: auto (gsplat on CUDA, else torch), torch, gsplat, inria
    progress: bool = True  # tqdm progress bars
    seed: int = 0  # random seed (the fit itself is deterministic)
    fit: FitConfig = field(default_factory=FitConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


TRACK_ALIASES = {"refine_geometry": "fit.refine_geometry", "refine_colour": "fit.refine_colour",
                 "iterations": "fit.iterations", "init": "fit.init", "space": "fit.space"}
TRACK_FLAGS = ("all_heldout", "fit.refine_geometry", "fit.refine_colour", "progress")


# ====================================================================================== CLI helpers
def add_cli_config(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None,
                   flags: Sequence[str] = (), lists: Sequence[str] = ()) -> None:
    """``add_config_args`` plus: boolean keys in ``flags`` also work as bare switches (``--loop`` = ``--loop
    true``), keys in ``lists`` take several values (``--identities a b c`` as well as ``--identities a,b,c``)."""
    add_config_args(parser, cls, aliases)
    for action in parser._actions:
        key = action.dest[4:] if action.dest.startswith("cfg:") else None
        if key in flags:
            action.nargs, action.const = "?", "true"
            action.help = (action.help or "") + " [a bare flag means true]"
        elif key in lists:
            action.nargs = "+"


def parse_cli_config(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None,
                     lists: Sequence[str] = ()):
    """Parse ``argv`` into (namespace, config): defaults <- ``--config`` YAML <- command line."""
    args = parser.parse_args(argv)
    overrides = {}
    for key in lists:
        val = getattr(args, f"cfg:{key}", None)
        if isinstance(val, list):  # nargs="+": split any comma lists, keep the strings as given
            overrides[key] = [p for v in val for p in str(v).split(",") if p]
            setattr(args, f"cfg:{key}", None)
    return args, build_config(cls, getattr(args, "config", None), args, overrides=overrides)


# ====================================================================================== small geometry helpers
def similarity_fit(template: Tensor, vertices: Tensor) -> tuple[float, Tensor, Tensor]:
    """Least-squares similarity ``vertices ~ s R template + t`` (Umeyama).

    Args:
        template: (M, 3) canonical FLAME face-mask vertices (FLAME axes: +x the head's left, +y up, +z out of the face).
        vertices: (M, 3) the same vertices in world space.
    Returns:
        s (scale), R (3, 3) canonical -> world rotation (columns: the head's x, up and front directions in world
        space), t (3,); float32 CPU tensors.
    """
    a = template.detach().double().cpu()
    b = vertices.detach().double().cpu()
    ma, mb = a.mean(0), b.mean(0)
    a0, b0 = a - ma, b - mb
    U, S, Vt = torch.linalg.svd(b0.T @ a0)
    d = float(torch.sign(torch.linalg.det(U @ Vt)))
    D = torch.tensor([1.0, 1.0, d], dtype=torch.float64)
    R = U @ torch.diag(D) @ Vt
    s = float((S * D).sum() / a0.square().sum())
    t = mb - s * R @ ma
    return s, R.float(), t.float()


def head_pose(template: Tensor, vertices: Tensor) -> tuple[Tensor, Tensor, float]:
    """Where a head is and how it is turned.

    Args:
        template: (M, 3) canonical FLAME face-mask vertices; vertices: (M, 3) the same in world space.
    Returns:
        centre (3,) of the world vertices' bounding box, R (3, 3) canonical -> world rotation (R[:, 1] is the head's
        up direction, R[:, 2] the direction the face looks at), radius (largest distance of a vertex from the centre).
    """
    _, R, _ = similarity_fit(template, vertices)
    b = vertices.detach().float().cpu()
    centre = (b.min(0).values + b.max(0).values) / 2
    radius = float((b - centre).norm(dim=1).max())
    return centre, R, radius


def rotate_about(v: Tensor, axis: Tensor, degrees: float) -> Tensor:
    """Rotate vector(s) v (..., 3) about the unit ``axis`` (3,) by ``degrees`` (Rodrigues)."""
    k = axis / axis.norm()
    th = math.radians(degrees)
    return v * math.cos(th) + torch.linalg.cross(k.expand_as(v), v) * math.sin(th) + k * (v @ k)[..., None] * (
        1 - math.cos(th))


def orbit_camera(centre: Tensor, up: Tensor, eye0: Tensor, degrees: float, width: int, height: int, radius: float,
                 fill: float = 0.8, name: str = "") -> Camera:
    """A look_at camera at ``eye0`` rotated by ``degrees`` about the axis ``up`` through ``centre``; the focal length
    makes a sphere of ``radius`` around the centre fill ``fill`` of the smaller image side."""
    eye = centre + rotate_about(eye0 - centre, up, degrees)
    dist = float((eye0 - centre).norm())
    f = 0.5 * min(width, height) * fill * dist / max(radius, 1e-9)
    return Camera.look_at(eye.tolist(), centre.tolist(), up.tolist(), width, height, fx=f, fy=f, name=name)


class UniformLaplacian:
    """Uniform graph Laplacian of a triangle mesh: ``L(d)_i = d_i - mean of d over the neighbours of i``.

    Built once from faces (F, 3) over M vertices; applied with two gathers and an index_add (no sparse tensors)."""

    def __init__(self, num_vertices: int, faces: np.ndarray, device: torch.device) -> None:
        f = np.asarray(faces, dtype=np.int64)
        e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        e = np.unique(np.sort(e, axis=1), axis=0)
        self.i = torch.as_tensor(np.concatenate([e[:, 0], e[:, 1]]), device=device)
        self.j = torch.as_tensor(np.concatenate([e[:, 1], e[:, 0]]), device=device)
        deg = torch.zeros(num_vertices, device=device).index_add_(0, self.i, torch.ones(len(self.i), device=device))
        self.inv_deg = (1.0 / deg.clamp_min(1.0))[:, None]

    def __call__(self, d: Tensor) -> Tensor:
        """d: (M, C) per-vertex values -> (M, C)."""
        nb = torch.zeros_like(d).index_add(0, self.i, d.index_select(0, self.j))
        return d - nb * self.inv_deg

    def penalty(self, d: Tensor, smooth_weight: float, l2_weight: float) -> Tensor:
        """Regulariser of per-vertex offsets d (M, C): smooth_weight * mean |L d|^2 + l2_weight * mean |d|^2."""
        return smooth_weight * self(d).square().sum(-1).mean() + l2_weight * d.square().sum(-1).mean()


def mean_edge_length(vertices: Tensor, faces: np.ndarray) -> float:
    f = torch.as_tensor(np.asarray(faces), dtype=torch.long, device=vertices.device)
    e = vertices[f[:, [1, 2, 0]]] - vertices[f]
    return float(e.norm(dim=-1).mean())


# ====================================================================================== the target
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
    """

    name: str
    base_vertices: Tensor
    fit_view: View
    eval_views: list[View]
    extra_views: list[View]
    fit_camera_full: Camera
    source: dict[str, str]


def default_flame_dir(subject_dir: Path) -> Path:
    """FLAME folder of a subject: ``<root>/flame`` for the synthetic layout ``<root>/subjects/<id>``, else data/."""
    cand = subject_dir.resolve().parent.parent / "flame"
    return cand if cand.is_dir() else Path("data")


def _flame_vertices(model: TrainedModel, flame_dir: Path, tracking: Path | None, params=None,
                    frame: int = 0) -> tuple[Tensor, Tensor, Any]:
    """World-space FLAME vertices (V, 3) of a tracking file and the model's face-mask part (M, 3)."""
    from models.flame import FlameModel, load_tracking

    flame = FlameModel.from_data_dir(flame_dir)
    if params is None:
        params = load_tracking(tracking, flame=flame)
    params = params.frame(min(frame, params.num_frames - 1))
    mask_ids = torch.as_tensor(model.mask_ids)
    if int(mask_ids.max()) >= flame.num_vertices:
        raise ValueError(f"the model's face mask indexes FLAME vertex {int(mask_ids.max())} but the FLAME model in "
                         f"{flame_dir} has {flame.num_vertices} vertices: use the FLAME files the model was trained "
                         f"with (--flame_dir)")
    tmpl = flame.v_template[mask_ids].float()
    if not torch.allclose(tmpl, model.template_base.cpu().float(), atol=1e-4):
        raise ValueError(f"the FLAME template in {flame_dir} differs from the one the model was trained with: use "
                         f"the same FLAME files (--flame_dir)")
    with torch.no_grad():
        verts = flame(params)[0].float()
    return verts, verts[mask_ids], flame


def _to_tensor_img(a: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)


def _fit_and_eval_views(serials: Sequence[str], images: dict, masks: dict, cams: dict, fit_serial: str,
                        cfg: FitConfig, device: torch.device) -> tuple[View, list[View]]:
    """Crop the fitted view tightly and every view (incl. the fitted one) to one common size, as training does."""
    fw, fh = crop_size([masks[fit_serial]], cfg.crop_margin, cfg.crop_multiple)
    fi, fm, fc = crop_view(images[fit_serial], masks[fit_serial], cams[fit_serial], fw, fh)
    fit = View(fit_serial, fc.to(device), _to_tensor_img(fi, device), _to_tensor_img(fm, device))
    cw, ch = crop_size([masks[s] for s in serials], cfg.crop_margin, cfg.crop_multiple)
    views = []
    for s in serials:
        i, m, c = crop_view(images[s], masks[s], cams[s], cw, ch)
        views.append(View(s, c.to(device), _to_tensor_img(i, device), _to_tensor_img(m, device)))
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
    _, base, _ = _flame_vertices(model, flame_dir, subject.tracking_path, frame=cfg.frame)
    fit, views = _fit_and_eval_views(serials, images, masks, cams, cfg.camera, cfg.fit, device)
    return FitTarget(name=sdir.name, base_vertices=base.to(device), fit_view=fit, eval_views=views, extra_views=[],
                     fit_camera_full=cams[cfg.camera].to(device),
                     source={"subject_dir": str(sdir), "camera": cfg.camera, "flame_dir": str(flame_dir)})


def projected_face_mask(model: TrainedModel, flame_verts: Tensor, flame_faces: Tensor, camera: Camera) -> np.ndarray:
    """Face mask of a photo from its FLAME tracking, as preprocessing makes it (utils/preprocess/projection_ply.py):
    the model's face-mask triangles z-buffered against the whole FLAME head.  Returns (H, W) float32 in {0, 1}."""
    from utils.mesh_raster import render_mask
    from utils.preprocess.projection_ply import soft_mask

    fm_v = flame_verts[torch.as_tensor(model.mask_ids)]
    fm_f = torch.as_tensor(model.base_faces, dtype=torch.long)
    verts = torch.cat([flame_verts, fm_v])
    faces = torch.cat([flame_faces.cpu(), fm_f + len(flame_verts)])
    paint = torch.zeros(len(faces), dtype=torch.bool)
    paint[len(flame_faces):] = True  # the head only occludes; face-mask triangles paint
    mask = render_mask(verts, faces, camera.to("cpu"), paint_faces=paint).numpy()
    return soft_mask(mask, 0.0)


def _read_photo(path: Path, what: str, gray: bool = False) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot decode {what} {path} (not an image file OpenCV can read)")
    img = img.astype(np.float32) / 255.0
    return img[..., None] if gray else np.ascontiguousarray(img[..., ::-1])


def load_image_target(model: TrainedModel, cfg: TrackConfig, device: torch.device) -> FitTarget:
    """One's own photo (``cfg.image``) with its calibrated camera (``cfg.camera_json`` / ``cfg.camera``) and FLAME
    tracking (``cfg.flame``); the face mask is ``cfg.mask`` or projected from the tracking."""
    import cv2
    from utils.preprocess.projection_ply import masked_photo

    for key, what in (("camera_json", "--camera_json (camera_params.json)"), ("flame", "--flame (tracking npz)")):
        if not getattr(cfg, key):
            raise ValueError(f"--image needs {what}")
    img_path = Path(cfg.image)
    photo = _read_photo(img_path, "photo (--image)")
    h, w = photo.shape[:2]
    json_path = Path(cfg.camera_json)
    if not json_path.is_file():
        raise FileNotFoundError(f"camera file not found: {json_path} (--camera_json, a NeRSemble camera_params.json)")
    import json

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
    flame_verts, base, flame = _flame_vertices(model, flame_dir, Path(cfg.flame), frame=cfg.frame)
    if cfg.mask:
        mask = _read_photo(Path(cfg.mask), "face mask (--mask)", gray=True)
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
    masked = masked_photo(photo, mask[..., 0], (0.0, 0.0, 0.0)).astype(np.float32)
    s = cfg.camera
    fit, views = _fit_and_eval_views([s], {s: masked}, {s: mask}, {s: cam}, s, cfg.fit, device)
    extra = [View(k, c.to(device)) for k, c in cams.items() if k != s]
    return FitTarget(name=img_path.stem, base_vertices=base.to(device), fit_view=fit, eval_views=views,
                     extra_views=extra, fit_camera_full=cam.to(device),
                     source={"image": str(img_path), "camera_json": str(json_path), "camera": s,
                             "flame": str(cfg.flame), "mask": cfg.mask or "projected", "flame_dir": str(flame_dir)})


# ====================================================================================== codes
@dataclass
class FittedCode:
    """A fitted identity: style ``w`` (S,), code ``z`` (D,) when fitted in z space (else None), level-0 world-space
    face-mask vertices ``base_vertices`` (M, 3) (tracked, plus offsets when refined), and ``colour`` (M, 3): the
    per-vertex RGB residual of the colour stage on the level-0 vertices (None: no residual, e.g. a training identity
    or a code-only fit; render every FittedCode through :func:`code_cloud` so that it is applied)."""

    w: Tensor
    z: Tensor | None
    base_vertices: Tensor
    name: str = ""
    meta: dict = field(default_factory=dict)
    colour: Tensor | None = None


def colour_offsets(model: TrainedModel, colour: Tensor) -> Tensor:
    """Per-Gaussian RGB offsets (N, 3) of a level-0 residual (M, 3): upsampled through the subdivision plan (linear,
    like the geometry), then each Gaussian takes its vertex's value."""
    return model.vertices(colour).index_select(0, model.field.gaussian_vertex_ids)


def with_colour(cloud: GaussianCloud, offsets: Tensor | None) -> GaussianCloud:
    """``cloud`` (N Gaussians, unbatched) with RGB ``offsets`` (N, 3) added to its colour (the SH DC term; higher
    bands untouched); ``offsets`` None returns ``cloud`` itself."""
    if offsets is None:
        return cloud
    dc = cloud.sh[..., :1, :] + (offsets / SH_C0).unsqueeze(-2).to(cloud.sh.dtype)
    return GaussianCloud(cloud.means, cloud.quats, cloud.scales, cloud.opacities,
                         torch.cat([dc, cloud.sh[..., 1:, :]], dim=-2))


def code_cloud(model: TrainedModel, w: Tensor, base: Tensor, colour: Tensor | None = None) -> GaussianCloud:
    """The Gaussians (unbatched) of style w (S,) on level-0 vertices base (M, 3), plus the colour residual (M, 3)."""
    cloud = model.field.synthesize(w[None], model.vertices(base)[None])[0]
    return cloud if colour is None else with_colour(cloud, colour_offsets(model, colour))


def model_signature(model: TrainedModel) -> dict:
    """What a code.pt must agree with to be rendered by a model."""
    m = model.config.get("model", {})
    return {"code_dim": int(model.field.cfg.code_dim), "style_dim": int(model.field.cfg.style_dim),
            "num_base_vertices": int(model.template_base.shape[0]), "model_config": m}


def save_code(path: str | os.PathLike, code: FittedCode, model: TrainedModel, checkpoint: str = "") -> Path:
    """Write code.pt: the fitted style/code, base vertices and colour residual (None when there is none), plus what
    is needed to check compatibility."""
    doc = {
        "format": CODE_FORMAT, "version": CODE_VERSION, "name": code.name,
        "w": code.w.detach().cpu(), "z": None if code.z is None else code.z.detach().cpu(),
        "base_vertices": code.base_vertices.detach().cpu(),
        "colour": None if code.colour is None else code.colour.detach().cpu(),
        "checkpoint": str(checkpoint), "signature": model_signature(model), "meta": code.meta,
    }
    return atomic_torch_save(doc, path)


def load_code(path: str | os.PathLike, model: TrainedModel | None = None, device: torch.device | str = "cpu"
              ) -> FittedCode:
    """Read a code.pt written by track.py; with ``model``, check it fits that model (clear errors otherwise)."""
    path = Path(path)
    doc = load_tagged(path, CODE_FORMAT, "code file", "code.pt is written by track.py",
                      f"is not a code.pt written by track.py (format {CODE_FORMAT!r})")
    if model is not None:
        sig, want = doc.get("signature", {}), model_signature(model)
        for key in ("code_dim", "style_dim", "num_base_vertices"):
            if sig.get(key) != want[key]:
                raise ValueError(f"{path} was fitted with a model of {key}={sig.get(key)} but the model has "
                                 f"{key}={want[key]} (checkpoint {doc.get('checkpoint', '?')}); fit it again with "
                                 f"this model")
        if sig.get("model_config") != want["model_config"]:
            warnings.warn(f"{path} was fitted with another model config (checkpoint {doc.get('checkpoint')}); the "
                          f"code may not mean the same identity here")
    z, colour = doc.get("z"), doc.get("colour")  # version 1 files hold no colour residual
    base = doc["base_vertices"].float().to(device)
    if colour is not None and tuple(colour.shape) != tuple(base.shape):
        raise ValueError(f"{path}: colour residual of shape {tuple(colour.shape)} does not match the base vertices "
                         f"{tuple(base.shape)}")
    return FittedCode(w=doc["w"].float().to(device), z=None if z is None else z.float().to(device),
                      base_vertices=base, name=str(doc.get("name", path.stem)), meta=dict(doc.get("meta", {})),
                      colour=None if colour is None else colour.float().to(device))


@torch.no_grad()
def start_candidates(model: TrainedModel, space: str) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Starting points {name: (w (S,), z (D,) or None)}: in z space only the mean code; in w space also the tracked
    average style ``w_avg`` and the mean of the training identities' styles."""
    f = model.field
    z_mean = f.mean_code()
    out = {"mean_code": (f.style(z_mean[None], update_w_avg=False)[0], z_mean)}
    if space == "w":
        if float(f.mapping.w_avg.abs().sum()) > 0:  # w_avg stays zero in a model that was never trained
            out["w_avg"] = (f.mapping.w_avg.clone(), None)
        out["mean_w"] = (f.style(f.codes.weight, update_w_avg=False).mean(0), None)
    return out


# ====================================================================================== fitting
@dataclass
class FitResult:
    code: FittedCode
    iterations: int
    losses: list[float]  # windowed mean loss at every early-stopping check
    start: str  # name of the starting point
    start_losses: dict[str, float]  # loss of every candidate start on the fitted view
    stopped_early: bool
    start_w: Tensor | None = None  # (S,) style of the starting point
    colour_iterations: int = 0  # iterations of the colour stage (0: not run)
    colour_losses: list[float] = field(default_factory=list)  # its windowed mean photometric loss every check_every
    seconds_code: float = 0.0  # wall time of the code fit (start selection included)
    seconds_colour: float = 0.0  # wall time of the colour stage


def photometric(pred: Tensor, gt: Tensor, cfg: FitConfig) -> Tensor:
    """cfg.l1_weight * L1 + cfg.ssim_weight * (1 - SSIM); pred, gt (h, w, 3) or (C, h, w, 3)."""
    loss = cfg.l1_weight * l1(pred, gt)
    if cfg.ssim_weight > 0:
        loss = loss + cfg.ssim_weight * (1.0 - ssim(pred, gt))
    return loss


def render_style(model: TrainedModel, w: Tensor, base: Tensor, cameras: Sequence[Camera], backend: str = "auto",
                 colour: Tensor | None = None) -> Tensor:
    """Images (C, h, w, 3) of style w (S,) on level-0 vertices base (M, 3) (plus the colour residual (M, 3))
    through cameras of one size."""
    return render_batch(code_cloud(model, w, base, colour), list(cameras), backend=backend)["image"]


def fit_colour(model: TrainedModel, w: Tensor, base: Tensor, camera: Camera, gt: Tensor, cfg: FitConfig,
               backend: str = "auto", name: str = "", progress: bool = False) -> tuple[Tensor, list[float]]:
    """The colour stage: a per-vertex RGB residual (M, 3) of the level-0 vertices for the fixed style w and
    geometry base, fitted to the photo ``gt`` through ``camera``.

    Minimises ``photometric + colour_laplacian_weight * mean |L r|^2 + colour_weight * mean |r|^2`` (L: uniform
    Laplacian of the level-0 face-mask mesh) with Adam from r = 0, lr decaying like the code fit.  The Gaussians
    are synthesised once; an iteration adds the upsampled residual to their colours, renders and steps, and the
    loop synchronises with the host only every ``check_every`` iterations.  Returns (residual, windowed losses).
    """
    with torch.no_grad():
        cloud0 = model.field.synthesize(w[None], model.vertices(base)[None])[0].detach()
    res = torch.zeros_like(base, requires_grad=True)
    lap = UniformLaplacian(len(base), model.base_faces, base.device)
    fused = {"fused": True} if base.device.type == "cuda" else {}
    opt = torch.optim.Adam([res], lr=cfg.colour_lr, betas=(cfg.beta1, cfg.beta2), **fused)
    n = cfg.colour_iterations
    acc = torch.zeros((), device=base.device)
    losses: list[float] = []
    for it in tqdm(range(n), desc=f"colour {name}".rstrip(), disable=not progress, leave=False, dynamic_ncols=True):
        opt.param_groups[0]["lr"] = cfg.colour_lr * cfg.lr_final_ratio ** (it / max(1, n - 1))
        pred = render(with_colour(cloud0, colour_offsets(model, res)), camera, backend=backend)["image"]
        loss = photometric(pred, gt, cfg)
        total = loss + lap.penalty(res, cfg.colour_laplacian_weight, cfg.colour_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        acc = acc + loss.detach()
        if (it + 1) % cfg.check_every == 0 or it + 1 == n:
            k = (it % cfg.check_every) + 1
            cur = float(acc) / k  # the one host sync of the loop
            acc = torch.zeros_like(acc)
            losses.append(cur)
            if not math.isfinite(cur):
                raise FloatingPointError(f"colour stage of {name} diverged (loss {cur}) at iteration {it + 1}; lower "
                                         f"fit.colour_lr")
    return res.detach(), losses


def fit_identity(model: TrainedModel, target: FitTarget, cfg: FitConfig, backend: str = "auto",
                 progress: bool = True) -> FitResult:
    """Fit a style (or code) and optionally vertex offsets to ``target.fit_view``, then (``fit.refine_colour``)
    a per-vertex colour residual with the code fixed (:func:`fit_colour`); the network stays frozen."""
    if cfg.space not in SPACES:
        raise ValueError(f"fit.space must be one of {SPACES}, got {cfg.space!r}")
    if cfg.iterations < 0 or cfg.check_every < 1:
        raise ValueError(f"fit.iterations must be >= 0 and fit.check_every >= 1 (got {cfg.iterations}, "
                         f"{cfg.check_every})")
    if cfg.refine_colour and cfg.colour_iterations < 0:
        raise ValueError(f"fit.colour_iterations must be >= 0, got {cfg.colour_iterations}")
    t_start = time.perf_counter()
    f = model.field.eval()
    for p in f.parameters():
        p.requires_grad_(False)
    view = target.fit_view
    cam, gt = view.camera, view.image
    base0 = target.base_vertices

    # ---- starting point
    if cfg.init in INITS:
        cands = start_candidates(model, cfg.space)
        if cfg.init != "auto":
            if cfg.init not in cands:
                raise ValueError(f"fit.init={cfg.init!r} is not available for fit.space={cfg.space!r} "
                                 f"(available: {sorted(cands)})")
            cands = {cfg.init: cands[cfg.init]}
    else:  # a code.pt to start from (e.g. a previous fit)
        c = load_code(cfg.init, model, base0.device)
        if cfg.space == "z" and c.z is None:
            raise ValueError(f"fit.init={cfg.init} holds no z code (it was fitted in w space); use fit.space=w")
        cands = {Path(cfg.init).name: (c.w, c.z)}
    start_losses = {}
    with torch.no_grad():
        for name, (w_c, _) in cands.items():
            pred = render_style(model, w_c, base0, [cam], backend)[0]
            start_losses[name] = float(photometric(pred, gt, cfg))
    start = min(start_losses, key=start_losses.get)
    w0, z0 = cands[start]
    var = (w0 if cfg.space == "w" else z0).detach().clone().requires_grad_(True)
    groups = [{"params": [var], "lr": cfg.lr, "initial_lr": cfg.lr}]
    offsets = None
    if cfg.refine_geometry:
        offsets = torch.zeros_like(base0, requires_grad=True)
        groups.append({"params": [offsets], "lr": cfg.geometry_lr, "initial_lr": cfg.geometry_lr})
        lap = UniformLaplacian(len(base0), model.base_faces, base0.device)
        unit = mean_edge_length(base0, model.base_faces)
    fused = {"fused": True} if base0.device.type == "cuda" else {}
    opt = torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2), **fused)
    # without geometry refinement the subdivided vertices are constant and computed once (model.plan already holds
    # its index tensors on the model's device: no host-to-device copy per iteration)
    verts0 = model.vertices(base0)
    # The frozen network at batch 1 is launch-bound on a GPU: replay its forward and backward from CUDA graphs
    # (fixed geometry: surface frames computed once at capture).  Eager on a CPU or with fit.cuda_graphs=false.
    synth = GraphedSynthesis(f, verts0, space=cfg.space, dynamic_geometry=offsets is not None,
                             use_graphs=None if cfg.cuda_graphs else False)

    def style_of(v: Tensor) -> Tensor:
        return v if cfg.space == "w" else f.style(v[None], update_w_avg=False)[0]

    # ---- loop: no host synchronisation except every check_every iterations
    acc = torch.zeros((), device=base0.device)
    losses: list[float] = []
    best, bad, it, stopped = float("inf"), 0, 0, False
    bar = tqdm(total=cfg.iterations, desc=f"fitting {target.name}", disable=not progress, leave=False,
               dynamic_ncols=True)
    while it < cfg.iterations:
        mult = cfg.lr_final_ratio ** (it / max(1, cfg.iterations - 1))
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * mult
        cloud = synth(var) if offsets is None else synth(var, model.vertices(base0 + offsets))
        pred = render(cloud, cam, backend=backend)["image"]
        loss = photometric(pred, gt, cfg)
        total = loss
        if cfg.space == "w" and cfg.style_reg > 0:
            total = total + cfg.style_reg * (var - w0).square().mean()
        if offsets is not None:
            total = total + lap.penalty(offsets / unit, cfg.laplacian_weight, cfg.offset_weight)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        acc = acc + loss.detach()
        it += 1
        bar.update(1)
        if it % cfg.check_every == 0:
            cur = float(acc) / cfg.check_every  # the one host sync of the loop
            acc = torch.zeros_like(acc)
            losses.append(cur)
            bar.set_postfix(loss=f"{cur:.4f}")
            if not math.isfinite(cur):
                raise FloatingPointError(f"fit of {target.name} diverged (loss {cur}) at iteration {it}; lower fit.lr")
            if cur < best * (1 - cfg.min_rel_improvement):
                best, bad = cur, 0
            else:
                best, bad = min(best, cur), bad + 1
            if bad >= cfg.patience and it >= cfg.min_iterations:
                stopped = True
                break
    bar.close()
    with torch.no_grad():
        w_fit = style_of(var).detach()
        base_fit = (base0 if offsets is None else base0 + offsets).detach()
    _sync(base0.device)
    seconds_code = time.perf_counter() - t_start

    # ---- colour stage: code and geometry fixed, a regularised per-vertex RGB residual
    colour, colour_losses, seconds_colour = None, [], 0.0
    if cfg.refine_colour and cfg.colour_iterations > 0:
        t0 = time.perf_counter()
        colour, colour_losses = fit_colour(model, w_fit, base_fit, cam, gt, cfg, backend, target.name, progress)
        _sync(base0.device)
        seconds_colour = time.perf_counter() - t0
    code = FittedCode(w=w_fit, z=None if cfg.space == "w" else var.detach(), base_vertices=base_fit,
                      name=target.name, meta={"start": start, "space": cfg.space,
                                              "refine_geometry": bool(cfg.refine_geometry),
                                              "refine_colour": colour is not None,
                                              "tracked_base_vertices": base0.detach().cpu()},
                      colour=colour)
    return FitResult(code, it, losses, start, start_losses, stopped, w0.detach(),
                     colour_iterations=cfg.colour_iterations if colour is not None else 0, colour_losses=colour_losses,
                     seconds_code=seconds_code, seconds_colour=seconds_colour)


# ====================================================================================== evaluation
@torch.no_grad()
def evaluate_views(model: TrainedModel, w: Tensor, base: Tensor, views: Sequence[View], fit_serial: str,
                   backend: str = "auto", lpips: bool = True, colour: Tensor | None = None) -> tuple[dict, Tensor]:
    """PSNR / SSIM (/ LPIPS) of style w (plus the colour residual ``colour`` (M, 3), e.g. ``code.colour``) on
    every view with a photo; "all" and "unseen" (all but ``fit_serial``).

    Returns (metrics dict, renders (C, h, w, 3) clamped to [0, 1]).
    """
    pred = render_style(model, w, base, [v.camera for v in views], backend, colour).clamp(0, 1)
    gt = torch.stack([v.image for v in views])
    p = psnr(pred, gt, reduction="none").float()
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
           "psnr_heldout_cameras": mean(p, protocol), "num_views": len(views), "num_unseen_views": int(unseen.sum()),
           "per_view": {v.serial: {"psnr": float(p[i]), "ssim": float(s[i]),
                                   **({"lpips": float(lp[i])} if lp is not None else {})}
                        for i, v in enumerate(views)}}
    return out, pred


# ====================================================================================== export
def _pad_to(img: Tensor, h: int, w: int) -> Tensor:
    return torch.nn.functional.pad(img, (0, 0, 0, w - img.shape[1], 0, h - img.shape[0]))


def export_views(out: Path, views: Sequence[View], renders: Tensor, extra: Sequence[tuple[str, Tensor]]) -> None:
    """views/cam_<serial>.png = render | photo, and grid.png: renders in the top row, photos below."""
    for v, r in zip(views, renders):
        save_image(out / "views" / f"cam_{v.serial}.png", torch.cat([r, v.image.clamp(0, 1)], dim=1))
    for serial, r in extra:
        save_image(out / "views" / f"cam_{serial}.png", r)
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
    cloud = code_cloud(model, code.w, base, code.colour)
    frames = []
    for i in range(0, n, chunk):
        imgs = render_batch(cloud, cams[i:i + chunk], backend=backend)["image"].clamp(0, 1)
        frames.extend(to_uint8(im) for im in imgs)
    return frames


# ====================================================================================== the whole pipeline
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 5) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def track(cfg: TrackConfig, model: TrainedModel | None = None, subject_dir: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None) -> dict:
    """Fit one person (``cfg.subject_dir`` / ``subject_dir``, or ``cfg.image``) and write every output to ``out``.

    Returns the metrics dict that is also written to ``<out>/metrics.json``.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(out or cfg.out)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if model is None:
        model = load_model(cfg.checkpoint, device)
    if subject_dir is not None or cfg.subject_dir:
        if cfg.image:
            raise ValueError("give either --subject_dir or --image, not both")
        target = load_subject_target(model, cfg, device, subject_dir)
    elif cfg.image:
        target = load_image_target(model, cfg, device)
    else:
        raise ValueError("nothing to fit: pass --subject_dir DIR (a NeRSemble subject folder) or --image PHOTO "
                         "--camera_json JSON --flame NPZ (or --all_heldout)")
    _sync(device)
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = fit_identity(model, target, cfg.fit, cfg.backend, cfg.progress)
    _sync(device)
    times["fit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    f = model.field
    with torch.no_grad():
        z_mean = f.mean_code()
        w_mean = f.style(z_mean[None], update_w_avg=False)[0]
        w_start = res.start_w if res.start_w is not None else w_mean
    fit_serial = target.fit_view.serial
    code = res.code
    metrics, renders = evaluate_views(model, code.w, code.base_vertices, target.eval_views, fit_serial, cfg.backend,
                                      cfg.export.lpips, code.colour)
    code_only, _ = evaluate_views(model, code.w, code.base_vertices, target.eval_views, fit_serial, cfg.backend,
                                  False) if code.colour is not None else (dict(metrics), None)
    before, _ = evaluate_views(model, w_mean, target.base_vertices, target.eval_views, fit_serial, cfg.backend, False)
    start_m, _ = evaluate_views(model, w_start, target.base_vertices, target.eval_views, fit_serial, cfg.backend,
                                False) if res.start != "mean_code" else (before, None)
    _sync(device)
    times["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_code(out / "code.pt", code, model, cfg.checkpoint)
    if cfg.export.ply:
        with torch.no_grad():
            code_cloud(model, code.w, code.base_vertices, code.colour).save_ply(out / "head.ply")
    if cfg.export.views:
        extra = []
        with torch.no_grad():
            for v in target.extra_views:
                extra.append((v.serial, render_style(model, code.w, code.base_vertices, [v.camera], cfg.backend,
                                                     code.colour)[0].clamp(0, 1)))
        export_views(out, target.eval_views, renders, extra)
    if cfg.export.turntable:
        frames = turntable(model, code, target.fit_camera_full, cfg.export, cfg.backend)
        write_video(out / "turntable.mp4", frames, fps=cfg.export.fps)
    _sync(device)
    times["export"] = time.perf_counter() - t0

    per_view = metrics.pop("per_view")
    doc = {
        "identity": target.name,
        **metrics,
        "psnr_all_mean_code": before["psnr_all"], "psnr_unseen_mean_code": before["psnr_unseen"],
        "ssim_all_mean_code": before["ssim_all"], "ssim_unseen_mean_code": before["ssim_unseen"],
        "psnr_unseen_start": start_m["psnr_unseen"], "psnr_fit_view": per_view[fit_serial]["psnr"],
        "psnr_fit_view_mean_code": before["per_view"][fit_serial]["psnr"],
        # the code alone (the colour residual left out): what the colour stage adds is the difference
        "psnr_all_code_only": code_only["psnr_all"], "psnr_unseen_code_only": code_only["psnr_unseen"],
        "ssim_unseen_code_only": code_only["ssim_unseen"],
        "psnr_fit_view_code_only": code_only["per_view"][fit_serial]["psnr"],
        "iterations": res.iterations, "stopped_early": res.stopped_early,
        "start": res.start, "start_losses": res.start_losses, "loss_history": res.losses,
        "space": cfg.fit.space, "refine_geometry": bool(cfg.fit.refine_geometry),
        "refine_colour": code.colour is not None, "colour_iterations": res.colour_iterations,
        "colour_loss_history": res.colour_losses,
        "colour_residual_rms": None if code.colour is None else float(code.colour.square().sum(-1).mean().sqrt()),
        "colour_residual_max": None if code.colour is None else float(code.colour.norm(dim=-1).max()),
        "seconds": sum(times.values()), "seconds_fit": times["fit"],
        "seconds_fit_code": res.seconds_code, "seconds_fit_colour": res.seconds_colour,
        "seconds_per_iteration": res.seconds_code / max(1, res.iterations), "seconds_per_phase": times,
        "fit_crop": [target.fit_view.camera.width, target.fit_view.camera.height],
        "eval_crop": [target.eval_views[0].camera.width, target.eval_views[0].camera.height],
        "num_gaussians": int(f.num_gaussians), "fitted_camera": fit_serial,
        "unseen_views": [v.serial for v in target.eval_views if v.serial != fit_serial],
        "per_view": per_view, "source": target.source, "checkpoint": str(cfg.checkpoint),
        "device": str(device), "config": to_dict(cfg),
    }
    if cfg.export.lpips and metrics.get("lpips_all") is None:
        doc["lpips_note"] = "LPIPS skipped: the optional lpips package (torchvision + VGG weights) is not usable here"
    doc = _clean(doc)
    atomic_write_json(doc, out / "metrics.json")
    return doc


# ====================================================================================== all held-out identities
def heldout_subjects(data_root: str | os.PathLike) -> tuple[Path, list[str]]:
    """(subjects folder, held-out ids) of a dataset: a synthetic dataset folder (its synthetic_info.json
    "heldout_ids") or a folder of NeRSemble subjects (the protocol's held-out ids that are present)."""
    from utils.nersemble import list_subjects

    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root} (train first: bash run_training.sh generates syn_data)")
    subjects = root / "subjects" if (root / "subjects").is_dir() else root
    info = root / "synthetic_info.json"
    if info.is_file():
        from utils.synthetic import read_info

        ids = list(read_info(root).get("heldout_ids", []))
    else:
        present = set(list_subjects(subjects))
        ids = [s for s in HELDOUT_IDENTITIES if s in present]
    if not ids:
        raise ValueError(f"no held-out identities found in {root} (synthetic_info.json heldout_ids, or the "
                         f"protocol ids {list(HELDOUT_IDENTITIES)} as subject folders)")
    return subjects, ids


TABLE_COLUMNS = (
    ("identity", "identity", "{}"),
    ("PSNR unseen, mean code", "psnr_unseen_mean_code", "{:.2f}"),
    ("PSNR unseen, code only", "psnr_unseen_code_only", "{:.2f}"),
    ("PSNR unseen, fitted", "psnr_unseen", "{:.2f}"),
    ("gain dB", "gain_unseen", "{:+.2f}"),
    ("PSNR all", "psnr_all", "{:.2f}"),
    ("SSIM unseen", "ssim_unseen", "{:.3f}"),
    ("SSIM all", "ssim_all", "{:.3f}"),
    ("LPIPS unseen", "lpips_unseen", "{:.3f}"),
    ("iterations", "iterations", "{:.0f}"),
    ("fit s", "seconds_fit", "{:.2f}"),
    ("total s", "seconds", "{:.2f}"),
)


def markdown_table(rows: Sequence[dict]) -> str:
    """Markdown table of per-identity tracking metrics plus a mean row."""
    rows = [dict(r) for r in rows]
    for r in rows:
        a, b = r.get("psnr_unseen"), r.get("psnr_unseen_mean_code")
        r["gain_unseen"] = None if a is None or b is None else a - b

    def cell(val: Any, fmt: str) -> str:
        if val is None:
            return "n/a"
        return fmt.format(val) if not isinstance(val, str) else val

    lines = ["| " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(TABLE_COLUMNS))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k), fmt) for _, k, fmt in TABLE_COLUMNS) + " |")
    if rows:
        mean = {"identity": "**mean**"}
        for _, k, _ in TABLE_COLUMNS[1:]:
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            mean[k] = float(np.mean(vals)) if vals else None
        lines.append("| " + " | ".join(cell(mean.get(k), fmt) for _, k, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def track_all_heldout(cfg: TrackConfig) -> tuple[list[dict], str]:
    """Fit every held-out identity of ``cfg.data_root`` into ``<out>/<id>/``; returns (metrics list, table)."""
    subjects, ids = heldout_subjects(cfg.data_root)
    model = load_model(cfg.checkpoint, resolve_device(cfg.device))
    rows = []
    for sid in tqdm(ids, desc="held-out identities", disable=not cfg.progress):
        rows.append(track(cfg, model=model, subject_dir=subjects / sid, out=Path(cfg.out) / sid))
    table = markdown_table(rows)
    (Path(cfg.out) / "summary.md").write_text(table + "\n")
    atomic_write_json({"identities": ids, "rows": [{k: v for k, v in r.items() if k not in ("per_view", "config")}
                                                   for r in rows]}, Path(cfg.out) / "summary.json")
    return rows, table
