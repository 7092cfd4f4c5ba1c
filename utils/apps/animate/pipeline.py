"""Animate any head of a trained identity field with FLAME: the pipeline behind animate.py.

    identity  a training identity of model.pt, a person fitted by track.py (code.pt), or an interpolation between two
              -> its style, FLAME shape and head placement (model.pt / code.pt store the FLAME parameters of the
              frame; for files written before they did, FLAME's shape and head pose are fitted to the stored
              face-mask vertices by linear least squares), colour residual and geometry offsets
              -> models/posing.py HeadAnimator.identity: the network runs once
    motion    built-in or file keyframes, a NeRSemble / VHAP tracking file, a NeRSemble subject's sequence, or a
              video (reenactment) (utils/motion.py), put on the identity with models/posing.py retarget
    frames    posed in batches of ``batch`` frames (FLAME face-mask rows, subdivision, attachment) and rasterised in
              one call per batch (render_identities)
    outputs   animation.mp4 (optionally beside the driving photos / video or the driving identity's renders),
              frames/frame_<n>.png and ply/frame_<n>.ply on request, motion.npz (the motion as it drove the identity,
              NeRSemble layout, reusable as --motion) and animation.json
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from models.camera import Camera
from models.flame import FlameParams, save_nersemble_tracking
from models.level_of_detail import lod_mode, parse_lod
from models.posing import POSE_MODES, HeadAnimator, PosableIdentity, retarget
from models.renderer import render_identities
from utils.apps.animate.lod import FrameLod
from utils.apps.animate.stream import animate_stream
from utils.core.atomic import atomic_write_json
from utils.core.config import Range
from utils.core.device import resolve_device, synchronize
from utils.core.images import fit_height, save_image, to_uint8
from utils.core.locks import OutputClaim
from utils.core.video import VideoStream, read_video_frames
from utils.data.dataset import crop_size, crop_view
from utils.data.model_file import TrainedModel, load_model
from utils.data.nersemble import FRONTAL_SERIAL, NersembleSubject
from utils.evaluation import View, evaluate_cloud, to_tensor_img
from utils.face.frame_tracker import ShapeRefineConfig
from utils.face.reenactment import ReenactConfig, reenact_video
from utils.identity import (
    METHODS,
    base_camera,
    identity_key,
    load_flame,
    mixed_identity,
    model_flame_dir,
    posable,
)
from utils.motion import Motion, load_motion

SIDE_BY_SIDE = ("none", "video", "driver")


@dataclass
class AnimationConfig:
    """Settings of animate.py."""

    checkpoint: str = "output/cpu/model.pt"  # trained model.pt (written by train.py)
    identity: str = ""  # who is animated: a training identity of the model or a code.pt (default: the first identity)
    identity_b: str = ""  # optional second identity (name or code.pt): animate the interpolation of the two
    mix: float = 0.5  # interpolation weight of --identity_b (0: --identity, 1: --identity_b)
    method: str = "slerp"  # code interpolation with --identity_b: slerp or linear
    motion: str = "keyframes"  # keyframes (built in), a keyframes .yaml/.json, a tracking .npz (NeRSemble or VHAP),
    #                            a NeRSemble subject folder (its --sequence), or a video (reenactment)
    keyframes: list[str] = field(default_factory=list)  # built-in keyframes in order (default: the demo sequence
    #                            neutral smile neutral open_mouth ... look_right neutral); names: utils/motion.py
    keyframe_frames: int = 12  # frames from one keyframe to the next
    sequence: str = "EXP-1-head"  # sequence of a subject-folder motion
    start: int = 0  # first frame of the motion to use
    stride: int = 1  # use every stride-th frame of the motion
    max_frames: int = 0  # at most this many frames (0: all)
    pose: str = "relative"  # head pose: relative (the motion's head movement relative to its --reference_frame,
    #                         from the identity's own placement), absolute (the motion's world pose), fixed (the
    #                         identity's placement; only expression, jaw, neck and eyes move)
    reference_frame: int = 0  # frame of the (selected) motion whose head pose counts as no movement (pose relative)
    flame_dir: str = ""  # FLAME files the model was trained with (default: its training data's, else data/)
    camera_json: str = ""  # optional camera_params.json to render through a calibrated camera
    camera: str = FRONTAL_SERIAL  # serial of the calibrated camera (also the photos shown with side_by_side video)
    width: int = 256  # frame width (with --camera_json: the calibrated camera is scaled to this width)
    height: int = 256  # frame height (ignored with --camera_json: the calibrated aspect is kept)
    fill: float = 0.8  # frontal camera: fraction of the smaller image side the head fills
    side_by_side: str = "none"  # none; video: beside the driving photos (a subject's sequence) or video frames;
    #                             driver: beside renders of the driving identity (--driver) in the same motion
    driver: str = ""  # driving identity for --side_by_side driver (name or code.pt; default: the motion's subject
    #                   when it is a training identity of the model)
    evaluate: bool = False  # motion = a subject's sequence: PSNR / SSIM of every frame against its photos (all
    #                         cameras, one crop size; needs projection_ply.py --mask_images on those frames), in
    #                         animation.json (meaningful when the identity is that subject, e.g. its track.py fit)
    png: bool = False  # also write every frame as frames/frame_<n>.png
    ply: bool = False  # also write every frame's Gaussians as ply/frame_<n>.ply (standard 3DGS layout)
    batch: int = 16  # frames posed and rendered per call
    lod: str = "off"  # level of detail (opt-in, models/level_of_detail.py): off (full detail); auto (per frame, the
    #                   coarsest of the --lod_levels levels below the model's whose Gaussians stay under
    #                   --lod_footprint px on screen; frames that keep full detail cost nothing extra); or a
    #                   subdivision level 0..the model's (every frame merged to it).  The animated head changes every
    #                   frame, so every merged frame pays a merge: measured on one CPU thread 157 ms a frame for a
    #                   level-3 head (134,319 Gaussians), 7 ms for a level-1 head (8,580)
    #                   (benchmarks/results/t-lodwire_cpu_2026-12-07b.md); a frame whose head equals the one merged
    #                   before it (a held pose) reuses that merge.  Not with --stream; --ply and --evaluate use full
    #                   detail
    lod_levels: int = 1  # --lod auto: how many levels below the model's it may merge to (1: one level, ~42-50 dB face
    #                      PSNR against full detail where picked; 2 levels cost ~35 dB on a sharp head)
    lod_footprint: float = 2.0  # --lod auto: screen footprint (px, median largest Gaussian std) a merged level may
    #                             reach (models/level_of_detail.py FOOTPRINT_PX)
    fps: float = 25.0  # video frame rate (a driving video's own rate when the motion is one)
    out: str = "output/animation"  # output folder
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    backend: str = "auto"  # rasterizer: auto (gsplat on CUDA, else torch), torch, gsplat, inria
    progress: bool = True  # tqdm progress bars
    overwrite: bool = False  # replace the outputs of an earlier run in --out (only files it recorded are deleted)
    reenact: ReenactConfig = field(default_factory=ReenactConfig)  # a video as --motion (utils/face/reenactment.py)
    stream: bool = False  # live driving: the --motion video, or a camera device index (e.g. 0), tracked and rendered
    #                       frame by frame, written as it goes; prints the latency distribution
    #                       (utils/apps/animate/stream.py)
    stream_workers: int = 1  # --stream: landmark detector threads (1-32), overlapped with the FLAME fit and render;
    #                          more than 1 only when detection is the bottleneck: each thread's mediapipe (video mode)
    #                          then tracks from every W-th frame, which detects differently (README)
    stream_queue: int = 4  # --stream: frames each bounded queue between the stages holds (1-256)
    stream_fit_device: str = "cpu"  # --stream: device of the per-frame FLAME fit: cpu, auto (= --device), cuda[:N]
    stream_iterations: int = 4  # --stream: Levenberg-Marquardt iterations per warm-started frame (1-200); 4 (was
    #                          10): a warm start converges in ~4 anyway, the correlations stay within 0.01 of 10's
    #                          (benchmarks/results/stream_speed_cpu_2026-12-06b.md; 3 lost 0.04 of brows)
    stream_realtime: bool = False  # --stream with a file: deliver its frames at its frame rate, as a camera would;
    #                          live mode then, as with a camera: frames that are stale when the stream is behind are
    #                          dropped (counted in animation.json 'stream'), not queued; without it every frame is kept
    stream_threads: int = 1  # --stream: torch intra-op and NumPy BLAS CPU threads while it streams, restored after
    #                          (0: as they are)
    stream_calibration_threads: int = 0  # --stream: torch threads of the calibration solve (0: the cores, at most 8)
    #                          the per-frame fit's tensors are tiny (one frame, ~70 points), so extra threads mostly add
    #                          wake-ups and compete with the landmark threads (the GPU machine: 16 cores)
    stream_fit_process: bool = False  # --stream: run the per-frame FLAME fit in a worker process
    #                          (utils/face/tracker_process.py): the same results, without waiting for the GIL behind
    #                          the landmark and render threads
    stream_refine: ShapeRefineConfig = field(default_factory=ShapeRefineConfig)  # --stream: the shape refined on
    #                          frames kept for their head-pose diversity, in a background thread
    #                          (utils/face/frame_tracker.py; by default one re-solve at the first new head view;
    #                          --stream_refine.frames 0: off)

    # allowed values of the numeric keys (checked with utils.core.config.check_ranges before any work; NaN / inf never)
    RANGES = {"keyframe_frames": Range(1), "start": Range(0), "stride": Range(1), "max_frames": Range(0),
              "reference_frame": Range(0), "width": Range(2), "height": Range(2), "fill": Range(0, lo_open=True),
              "batch": Range(1), "fps": Range(0, lo_open=True),
              "lod_levels": Range(1), "lod_footprint": Range(0, lo_open=True), "stream_workers": Range(1, 32),
              "stream_queue": Range(1, 256), "stream_iterations": Range(1, 200), "stream_threads": Range(0, 256),
              "stream_calibration_threads": Range(0, 256),
              "reenact.shape_frames": Range(1)}


ANIM_FLAGS = ("png", "ply", "progress", "evaluate", "overwrite", "stream", "stream_realtime",
              "stream_fit_process")
ANIM_LISTS = ("keyframes",)


# ====================================================================================== evaluation
def sequence_views(subject: NersembleSubject, frames: Sequence[int], device: torch.device, scale: float = 1.0,
                   margin: float = 0.1, multiple: int = 16) -> list[list[View]]:
    """Every camera's face-masked photo of several frames of a preprocessed subject sequence (projection_ply.py
    --mask_images run on those frames), each view cropped around its face mask to ONE crop size for all frames and
    cameras: PSNR is a mean over the crop, so frames must share the crop size to be comparable (the crop of one frame
    rounded to a multiple of 16 pixels can differ from another's by a third, i.e. up to 1.8 dB for the same error).
    Returns per frame a list of View (utils/apps/track/targets.py) in camera order."""

    raw = []
    for f in frames:
        s = NersembleSubject(subject.root, subject.subject_id, subject.sequence, int(f))
        serials = s.serials()
        cams = s.cameras(scale, serials)
        raw.append([(ser, s.masked_image(ser, scale), s.facemask(ser, scale), cams[ser]) for ser in serials])
    cw, ch = crop_size([m for views in raw for _, _, m, _ in views], margin, multiple)
    out = []
    for views in raw:
        row = []
        for ser, img, mask, cam in views:
            i, m, c = crop_view(img, mask, cam, cw, ch)
            row.append(View(ser, c.to(device), to_tensor_img(i, device), to_tensor_img(m, device)))
        out.append(row)
    return out


@torch.no_grad()
def evaluate_sequence(animator: HeadAnimator, head: PosableIdentity, params: FlameParams,
                      views: Sequence[Sequence[View]], fit_serial: str = "", backend: str = "auto") -> list[dict]:
    """PSNR / SSIM of ``head`` posed by each frame of ``params`` against that frame's views (:func:`sequence_views`):
    per frame the metrics of utils/evaluation.py evaluate_cloud ("all" cameras, "unseen" = all but ``fit_serial``,
    "heldout_cameras" = the protocol's novel views)."""

    if params.num_frames != len(views):
        raise ValueError(f"evaluate_sequence: {params.num_frames} frames of parameters but {len(views)} of views")
    rows = []
    for t in range(params.num_frames):
        metrics, _ = evaluate_cloud(animator.gaussians(head, params.frame(t))[0], views[t], fit_serial, backend)
        rows.append({k: v for k, v in metrics.items() if k != "per_view"})
    return rows




class _Panels:
    """The right-hand panel of a side-by-side video: driving photos / video frames."""

    def __init__(self, motion: Motion, serial: str, height: int) -> None:
        self.motion, self.serial, self.height = motion, serial, height
        self.video = None  # frame index in the video -> RGB uint8 frame
        if motion.video is not None:
            frames, ids, _ = read_video_frames(motion.video, frame_ids=motion.frame_ids)
            self.video = dict(zip(ids.tolist(), frames))
        self.missing = 0

    def __call__(self, t: int) -> np.ndarray | None:
        if self.video is not None:
            img = self.video.get(int(self.motion.frame_ids[t]))
        else:
            img = self.motion.photo(t, self.serial)
        if img is None:
            self.missing += 1
            return None
        return fit_height(img, self.height)


def _render(animator: HeadAnimator, head: PosableIdentity, params: FlameParams, cam: Camera, backend: str,
            lod: FrameLod | None = None):
    """(B, H, W, 3) images of B frames through one camera and their full-detail GaussianCloud (B, N); with ``lod``
    each frame at its level of detail (frames grouped by level, one rasterizer call per group)."""
    cloud = animator.gaussians(head, params)
    if lod is None:
        imgs = render_identities(cloud, [[cam]] * params.num_frames, backend=backend, depth=False)["image"][:, 0]
        return imgs.clamp(0, 1), cloud
    imgs = torch.empty(params.num_frames, cam.height, cam.width, 3, device=cloud.device)
    for idx, sub in lod.clouds(cloud):
        imgs[idx] = render_identities(sub, [[cam]] * len(idx), backend=backend, depth=False)["image"][:, 0]
    return imgs.clamp(0, 1), cloud


def animate(cfg: AnimationConfig, model: TrainedModel | None = None) -> dict:
    """Animate one identity with one motion; writes into ``cfg.out`` (see the module docstring); returns a summary.

    ``cfg.out`` is locked first (a second run into it stops at once); a folder holding files this run writes, or
    files an earlier animate run recorded, is refused unless ``cfg.overwrite`` (utils.core.locks.OutputClaim)."""
    with OutputClaim(cfg.out, "animate") as claim:
        return _animate(cfg, model, claim)


def _animate(cfg: AnimationConfig, model: TrainedModel | None, claim: OutputClaim) -> dict:
    if cfg.pose not in POSE_MODES:
        raise ValueError(f"--pose must be one of {POSE_MODES}, got {cfg.pose!r}")
    if cfg.side_by_side not in SIDE_BY_SIDE:
        raise ValueError(f"--side_by_side must be one of {SIDE_BY_SIDE}, got {cfg.side_by_side!r}")
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {cfg.batch}")
    if cfg.stream and lod_mode(cfg.lod) != "off":
        raise ValueError("--lod is not available with --stream (the live path renders full detail)")
    if cfg.stream:  # live driving: frame by frame (utils/apps/animate/stream.py)

        return animate_stream(cfg, model)
    if cfg.motion.strip().isdigit():
        raise ValueError(f"--motion {cfg.motion}: a camera device index needs --stream")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.checkpoint, device)
    flame_dir = model_flame_dir(model, cfg.flame_dir)
    flame = load_flame(model, flame_dir)
    animator = HeadAnimator(model.field, flame, model.mask_ids, model.plan)
    motion = load_motion(cfg.motion, flame, cfg.keyframes, cfg.keyframe_frames, cfg.sequence,
                         lambda video: reenact_video(video, flame, cfg.reenact, cfg.start, cfg.stride, cfg.max_frames,
                                                     cfg.progress))
    if motion.kind != "video":  # a video's frames were selected while reading it
        motion = motion.select(cfg.start, cfg.stride, cfg.max_frames)
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    name = cfg.identity or model.identities[0]
    head = posable(animator, model, name, device)[0] if not cfg.identity_b else mixed_identity(
        animator, model, identity_key(animator, model, name, device),
        identity_key(animator, model, cfg.identity_b, device), cfg.mix, cfg.method)
    params = retarget(motion.params.to(device), head.base, cfg.pose, cfg.reference_frame)
    driver = None
    if cfg.side_by_side == "driver":
        key = cfg.driver or (motion.subject.subject_id if motion.subject is not None else "")
        if not key:
            raise ValueError("--side_by_side driver needs --driver (a training identity or code.pt) when the motion "
                             "is not a subject's sequence")
        dhead = posable(animator, model, key, device)[0]
        driver = (dhead, retarget(motion.params.to(device), dhead.base, cfg.pose, cfg.reference_frame))
    M = len(model.mask_ids)
    with torch.no_grad():
        cam = base_camera(cfg, model.template_base, animator.vertices(head, head.base)[0, :M], device)
        dcam = None if driver is None else base_camera(cfg, model.template_base,
                                                       animator.vertices(driver[0], driver[0].base)[0, :M], device)
    panels = _Panels(motion, cfg.camera, cam.height) if cfg.side_by_side == "video" else None
    lod_setting = parse_lod(cfg.lod, model.plan.levels)
    lod = None
    if lod_setting != "off":  # opt-in level of detail (FrameLod); the driving identity's panel stays full detail
        if lod_setting == "auto" and model.plan.levels == 0:
            warnings.warn("--lod auto: the model is at subdivision level 0, there is no coarser level; full detail")
        with torch.no_grad():
            first = animator.gaussians(head, params.frames(slice(0, 1)))[0]
            lod = FrameLod(lod_setting, model.plan, model.plan.levels, model.field.K, first, cam, cfg.lod_levels,
                           cfg.lod_footprint)
    synchronize(device)
    times["identity"] = time.perf_counter() - t0

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    T = params.num_frames
    # only files of this run, or recorded by an earlier one, are replaced or removed (never a user's frame_*.png)
    claim.plan(["animation.mp4", "animation.json", "motion.npz"]
               + [f"frames/frame_{n:05d}.png" for n in range(T) if cfg.png]
               + [f"ply/frame_{n:05d}.ply" for n in range(T) if cfg.ply], cfg.overwrite)
    t0 = time.perf_counter()
    fps = motion.fps or cfg.fps
    # frames go straight to the encoder: memory stays one batch of frames whatever the motion's length
    stream = VideoStream(out / "animation.mp4", fps)
    bar = tqdm(total=T, desc=f"animating {head.name}", unit="frame", disable=not cfg.progress, leave=False)
    try:
        with torch.no_grad():
            for a in range(0, T, cfg.batch):
                sel = slice(a, min(T, a + cfg.batch))
                imgs, cloud = _render(animator, head, params.frames(sel), cam, cfg.backend, lod)
                dimgs = None if driver is None else _render(animator, driver[0], driver[1].frames(sel), dcam,
                                                            cfg.backend)[0]
                for k in range(imgs.shape[0]):
                    n = a + k
                    row = [to_uint8(imgs[k])]
                    if dimgs is not None:
                        row.append(fit_height(to_uint8(dimgs[k]), cam.height))
                    elif panels is not None:
                        panel = panels(n)
                        row.append(panel if panel is not None else np.zeros_like(row[0]))
                    frame = np.concatenate(row, axis=1)
                    stream.write(frame)
                    if cfg.png:
                        save_image(out / "frames" / f"frame_{n:05d}.png", frame)
                    if cfg.ply:
                        cloud[k].save_ply(out / "ply" / f"frame_{n:05d}.ply")
                bar.update(imgs.shape[0])
        video = stream.close()  # (the time of encoding counts as rendering: it happens frame by frame)
    except BaseException:
        stream.abort()  # no half-written animation.mp4 left behind
        raise
    bar.close()
    times["render"] = time.perf_counter() - t0
    if panels is not None and panels.missing:
        warnings.warn(f"{panels.missing} of {T} frames have no driving photo (camera {cfg.camera}); their panel is "
                      f"black")

    evaluation = None
    if cfg.evaluate:
        if motion.subject is None:
            raise ValueError("--evaluate needs a subject's sequence as --motion (a subject folder or its tracking npz)")
        t0 = time.perf_counter()
        views = sequence_views(motion.subject, motion.frame_ids, device)
        evaluation = evaluate_sequence(animator, head, params, views, cfg.camera, cfg.backend)
        times["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    motion_path = None
    scale = params.scale
    if torch.allclose(scale, scale[:1]):
        motion_path = out / "motion.npz"
        save_nersemble_tracking(motion_path, params.to("cpu"), frames=motion.frame_ids)
    else:
        warnings.warn("motion.npz not written: the head scale varies over the frames (NeRSemble stores one)")
    times["write"] = time.perf_counter() - t0
    summary = {
        "identity": head.name, "identity_b": cfg.identity_b or None, "mix": cfg.mix if cfg.identity_b else None,
        "motion": motion.source, "motion_kind": motion.kind, "pose": cfg.pose, "num_frames": T,
        "frame_ids": [int(i) for i in motion.frame_ids], "fps": fps, "width": int(stream.size[0]),
        "height": int(stream.size[1]), "side_by_side": cfg.side_by_side, "video": str(video),
        "motion_npz": None if motion_path is None else str(motion_path), "geometry_offsets": head.offsets is not None,
        "num_gaussians": int(model.field.num_gaussians), "flame_dir": str(flame_dir), "device": str(device),
        "seconds": sum(times.values()), "seconds_per_phase": times,
        "render_fps": T / max(times["render"], 1e-9),
    }
    if lod is not None:
        summary["lod"] = lod.summary()
    if motion.info:
        summary["motion_info"] = motion.info
    if evaluation is not None:
        summary["evaluation"] = {"per_frame": evaluation, **{f"mean_{k}": float(np.mean([r[k] for r in evaluation]))
                                                             for k in ("psnr_all", "psnr_unseen", "ssim_all")}}
    atomic_write_json(summary, out / "animation.json")
    claim.finish()
    return summary
