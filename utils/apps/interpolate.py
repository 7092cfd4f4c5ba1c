"""Morph between identities: interpolate latent codes (or styles) and face geometry, render frames and a video.

Key identities are training identities of the model (by name) and/or people fitted by track.py (their code.pt, which
holds the style, the code when fitted in z space, and the base vertices).  Between consecutive keys ``frames``
frames are rendered at t = 0, 1/N, ..., (N-1)/N; without ``loop`` the last key is appended as a final frame, with
``loop`` the last transition goes back to the first key (a seamless loop), so a video has

    frames * (K - 1) + 1  frames (K keys, no loop)     or     frames * K  frames (loop).

Codes: linear or spherical (slerp) interpolation, in z (the latent code; needs every key to have one) or in w (the
style).  Geometry: every key's base vertices are brought into FLAME's canonical frame (similarity fit to the
template), interpolated there and placed in the first key's head pose, so a morph changes the face, not the pose.
Colour residuals (the per-vertex RGB residual of track.py's colour stage, stored in code.pt) are interpolated
linearly like the geometry; a training identity (or a code.pt without one) has a zero residual.  Per-Gaussian
residuals (position offset, log-scale, opacity; track.py's video refinement) likewise, added to the network's output
before the Gaussians are attached (those frames run the network eagerly, without CUDA graphs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from models.camera import Camera
from models.geometry import head_pose, similarity_fit
from models.graphed_synthesis import GraphedSynthesis
from models.level_of_detail import coarser_field, parse_lod
from models.renderer import render
from utils.core.atomic import atomic_write_json
from utils.core.config import Range
from utils.core.device import resolve_device
from utils.core.images import save_image, to_uint8
from utils.core.locks import OutputClaim
from utils.core.video import VideoStream
from utils.data.code_file import FittedCode, colour_offsets, with_colour
from utils.data.model_file import TrainedModel, load_model
from utils.identity import (
    METHODS,
    base_camera,
    canonical_vertices,
    code_space,
    interpolate_codes,
    interpolate_colours,
    interpolate_gaussians,
    key_label,
    lerp,
    num_frames,
    resolve_key,
    schedule,
)


@dataclass
class InterpolationConfig:
    """Settings of interpolate.py."""

    checkpoint: str = "output/cpu/model.pt"  # trained model.pt (written by train.py)
    identities: list[str] = field(default_factory=list)  # keys: training identity names and/or code.pt files
    num_default: int = 3  # with no --identities: the first N training identities of the model
    method: str = "slerp"  # code interpolation: linear or slerp (spherical)
    space: str = "auto"  # interpolate the code z, the style w, or auto (z when every key has a z code, else w)
    geometry: bool = True  # interpolate the face geometry too (else every frame uses the first key's geometry)
    frames: int = 30  # frames per transition between two keys
    loop: bool = False  # go back from the last key to the first (a seamless loop)
    orbit: float = 0.0  # degrees the camera orbits about the head over the whole video (0: still camera)
    width: int = 256  # frame width (with --camera_json: the calibrated camera is scaled to this width)
    height: int = 256  # frame height (ignored with --camera_json: the calibrated aspect is kept)
    fill: float = 0.8  # frontal camera: fraction of the smaller image side the head fills
    camera_json: str = ""  # optional camera_params.json to render through a calibrated camera
    camera: str = "222200037"  # serial of the calibrated camera in --camera_json
    out: str = "output/interpolation"  # output folder: frames/, interpolation.mp4, keys.json, keyframes/*.ply
    ply: bool = False  # also write a Gaussian PLY (3DGS layout) per key frame
    fps: float = 25.0  # video frame rate
    # "off", or a subdivision level below the model's: the network runs every frame on the face mask at that coarser
    # level (models/level_of_detail.coarser_field: per level down, a quarter of the network's work and about a third
    # of the rasterizer's; a softer head; benchmarks/results/lead_cpu_2026-12-07d.md)
    lod: str = "off"  # network level of detail: off, or a subdivision level 0..(the model's level - 1)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    backend: str = "auto"  # rasterizer: auto, torch, gsplat, inria
    progress: bool = True  # tqdm progress bar
    overwrite: bool = False  # replace the outputs of an earlier run in --out (only files it recorded are deleted)

    # allowed values of the numeric keys (checked with utils.core.config.check_ranges before any work; NaN / inf never)
    RANGES = {"num_default": Range(1), "frames": Range(1), "width": Range(2), "height": Range(2),
              "fill": Range(0, lo_open=True), "fps": Range(0, lo_open=True)}


INTERP_FLAGS = ("loop", "ply", "geometry", "progress", "overwrite")
INTERP_LISTS = ("identities",)


class GeometryInterpolator:
    """Interpolates key geometries in FLAME's canonical frame and poses the result like the first key."""

    def __init__(self, template: Tensor, keys: Sequence[FittedCode]) -> None:
        self.canonical = [canonical_vertices(template, k.base_vertices) for k in keys]
        s0, R0, t0 = similarity_fit(template, keys[0].base_vertices)
        self.pose = (s0, R0.to(keys[0].base_vertices), t0.to(keys[0].base_vertices))

    def __call__(self, i: int, j: int, t: float) -> Tensor:
        """(M, 3) world-space base vertices between keys i and j."""
        s, R, tr = self.pose
        c = lerp(self.canonical[i], self.canonical[j], t)
        return s * c @ R.T + tr


# ====================================================================================== cameras
def orbit(camera: Camera, centre: Tensor, up: Tensor, degrees: float) -> Camera:
    """The camera moved by a rotation of ``degrees`` about the axis ``up`` through ``centre`` (intrinsics kept)."""
    if degrees == 0:
        return camera
    k = (up / up.norm()).double().cpu()
    th = math.radians(degrees)
    Kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    Rot = torch.eye(3, dtype=torch.float64) + math.sin(th) * Kx + (1 - math.cos(th)) * Kx @ Kx
    M = torch.eye(4, dtype=torch.float64)  # world motion x -> Rot (x - c) + c
    c = centre.double().cpu()
    M[:3, :3] = Rot
    M[:3, 3] = c - Rot @ c
    w2c = camera.w2c.double().cpu() @ torch.linalg.inv(M)  # new c2w = M @ c2w
    return Camera(camera.K.cpu(), w2c.float(), camera.width, camera.height, camera.name).to(camera.device)


def interpolate(cfg: InterpolationConfig, model: TrainedModel | None = None) -> dict:
    """Render the morph; writes ``frames/frame_%05d.png``, ``interpolation.mp4``, ``keys.json`` (and
    ``keyframes/key_<k>_<name>.ply`` with ``cfg.ply``) into ``cfg.out``.  Returns a summary dict.

    ``cfg.out`` is locked first (a second run into it stops at once); a folder holding files this run writes, or
    files an earlier interpolate run recorded, is refused unless ``cfg.overwrite`` (utils.core.locks.OutputClaim)."""
    with OutputClaim(cfg.out, "interpolate") as claim:
        return _interpolate(cfg, model, claim)


def _interpolate(cfg: InterpolationConfig, model: TrainedModel | None, claim: OutputClaim) -> dict:
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.space not in ("auto", "z", "w"):
        raise ValueError(f"--space must be auto, z or w, got {cfg.space!r}")
    device = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.checkpoint, device)
    lod = parse_lod(cfg.lod, model.plan.levels)
    if lod == "auto":
        raise ValueError(f"interpolate.py --lod takes off or a subdivision level 0..{model.plan.levels - 1}, got "
                         f"{cfg.lod!r} (auto picks per camera in animate.py / viewer.py)")
    names = list(cfg.identities) or model.identities[: cfg.num_default]
    keys = [resolve_key(model, k, device) for k in names]
    total = num_frames(len(keys), cfg.frames, cfg.loop)
    space = cfg.space
    if space == "auto":
        space = code_space(keys)
    if space == "z":
        missing = [n for n, k in zip(names, keys) if k.z is None]
        if missing:
            raise ValueError(f"--space z needs a latent code for every key, but {missing} were fitted in w space; "
                             f"use --space w (or auto)")
    geo = GeometryInterpolator(model.template_base, keys)
    cam0 = base_camera(cfg, model.template_base, geo(0, 0, 0.0), device)
    centre, R, _ = head_pose(model.template_base, geo(0, 0, 0.0))

    out = Path(cfg.out)
    frame_dir = out / "frames"
    plan = schedule(len(keys), cfg.frames, cfg.loop)
    # only files of this run, or recorded by an earlier one, are replaced or removed (never a user's frame_*.png)
    claim.plan([f"frames/frame_{n:05d}.png" for n in range(len(plan))] + ["interpolation.mp4", "keys.json"]
               + [f"keyframes/key_{i:02d}_{key_label(names[i])}.ply"
                  for n, (i, _, _) in enumerate(plan) if cfg.ply and n % cfg.frames == 0], cfg.overwrite)
    frame_dir.mkdir(parents=True, exist_ok=True)
    f = model.field.eval()
    for p in f.parameters():
        p.requires_grad_(False)
    if lod != "off" and lod < model.plan.levels:  # the network on the coarser mesh: its vertices are a prefix
        f = coarser_field(f, model.plan, model.plan.levels - lod)
    vc, nc = f.num_vertices, f.num_gaussians
    verts = lambda base: model.vertices(base)[..., :vc, :]  # noqa: E731  (level-L vertices -> the field's)
    # a new style every frame through the frozen network at batch 1: replayed from CUDA graphs on a GPU
    synth = GraphedSynthesis(f, verts(geo(0, 0, 0.0)), space="w", requires_grad=False,
                             dynamic_geometry=cfg.geometry)
    with VideoStream(out / "interpolation.mp4", cfg.fps) as stream, torch.no_grad():  # one frame in memory
        for n, (i, j, t) in enumerate(tqdm(plan, desc="interpolating", disable=not cfg.progress, leave=False)):
            w = interpolate_codes(keys, i, j, t, cfg.method, space, f)
            gaussians = interpolate_gaussians(keys, i, j, t)
            if gaussians is not None:  # per-Gaussian residuals (video fits) enter before the attachment: no graph
                cloud = f.attach(f.add_residual(f.synthesize_raw(w[None]), gaussians[:vc]),
                                 verts(geo(i, j, t))[None])[0]
            else:
                cloud = synth(w, verts(geo(i, j, t))) if cfg.geometry else synth(w)
            colour = interpolate_colours(keys, i, j, t)
            if colour is not None:
                cloud = with_colour(cloud, colour_offsets(model, colour)[:nc])
            deg = cfg.orbit * n / (total if cfg.loop else max(1, total - 1))
            cam = orbit(cam0, centre.to(device), R[:, 1].to(device), deg)
            img = render(cloud, cam, backend=cfg.backend, depth=False)["image"].clamp(0, 1)
            save_image(frame_dir / f"frame_{n:05d}.png", img)
            stream.write(to_uint8(img))
            if cfg.ply and n % cfg.frames == 0:  # frame k * frames shows key k exactly (t = 0)
                cloud.save_ply(out / "keyframes" / f"key_{i:02d}_{key_label(names[i])}.ply")
    video = stream.path  # written and renamed into place when the with block ended
    summary = {"keys": names, "space": space, "method": cfg.method, "frames_per_transition": cfg.frames,
               "loop": cfg.loop, "orbit": cfg.orbit, "num_frames": total, "width": cam0.width, "height": cam0.height,
               "video": str(video), "key_frames": [k * cfg.frames for k in range(len(keys))],
               "colour_residuals": [k.colour is not None for k in keys],
               "gaussian_residuals": [k.gaussians is not None for k in keys],
               "network_level": model.plan.levels if lod == "off" else lod, "gaussians": nc}
    atomic_write_json(summary, out / "keys.json")
    claim.finish()
    return summary
