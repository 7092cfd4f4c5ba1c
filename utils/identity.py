"""Identities as the applications use them: resolving a key (a training identity's name or a fitted code.pt), mixing
two identities (codes or styles, colour residuals, FLAME shape and geometry offsets), putting one on FLAME for the
pose path, and the still camera that frames a head.  Shared by interpolate.py, animate.py (batch and live) and the
viewer, which never import each other."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from models.camera import Camera
from models.flame import FlameModel, FlameParams, FlameSubset
from models.geometry import head_pose, similarity_fit
from models.identity_field import full_residual
from models.posing import HeadAnimator, PosableIdentity
from utils.data.camera_params import load_camera_params
from utils.data.code_file import FittedCode, load_code, use_code_filter
from utils.data.model_file import TrainedModel

# ====================================================================================== mixing
METHODS = ("linear", "slerp")


def lerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """(1 - t) a + t b for vectors / arrays of any shape."""
    return a + (b - a) * t


def slerp(a: Tensor, b: Tensor, t: float, eps: float = 1e-7) -> Tensor:
    """Spherical interpolation of two vectors (D,): the direction moves along the great circle at constant speed, the
    length is interpolated linearly (so codes of different norms still interpolate smoothly).  Falls back to lerp for
    (nearly) parallel or zero vectors."""
    na, nb = a.norm(), b.norm()
    if float(na) < eps or float(nb) < eps:
        return lerp(a, b, t)
    ua, ub = a / na, b / nb
    cos = float((ua * ub).sum().clamp(-1.0, 1.0))
    omega = math.acos(cos)
    if omega < 1e-4 or math.pi - omega < 1e-4:  # parallel: lerp; antiparallel: the great circle is undefined
        return lerp(a, b, t)
    direction = (math.sin((1 - t) * omega) * ua + math.sin(t * omega) * ub) / math.sin(omega)
    return direction * lerp(na, nb, t)


def num_frames(num_keys: int, frames: int, loop: bool) -> int:
    """Frames of a video over ``num_keys`` keys with ``frames`` per transition (see the module docstring)."""
    if num_keys < 2:
        raise ValueError(f"interpolation needs at least 2 key identities, got {num_keys}")
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    return frames * num_keys if loop else frames * (num_keys - 1) + 1


def schedule(num_keys: int, frames: int, loop: bool) -> list[tuple[int, int, float]]:
    """(key i, key j, t) of every frame: the frame shows (1 - t) key i + t key j."""
    n_trans = num_keys if loop else num_keys - 1
    out = [(k, (k + 1) % num_keys, f / frames) for k in range(n_trans) for f in range(frames)]
    if not loop:
        out.append((num_keys - 1, num_keys - 1, 0.0))
    assert len(out) == num_frames(num_keys, frames, loop)
    return out


def resolve_key(model: TrainedModel, key: str, device: torch.device) -> FittedCode:
    """A training identity (by name) or a fitted code.pt -> FittedCode (w, z or None, base vertices (M, 3)); a code.pt
    with its own 3D-filter sampling rate sets it on ``model`` (code_file.use_code_filter)."""
    if key in model.identities:
        i = model.identity_index(key)
        with torch.no_grad():
            z = model.field.codes.weight[i].detach()
            w = model.field.style(z[None], update_w_avg=False)[0]
        return FittedCode(w=w, z=z, base_vertices=model.base_vertices[i].detach(), name=key,
                          flame=None if model.flame_params is None else model.identity_flame(i).to(device))
    p = Path(key)
    if p.is_file():
        code = load_code(p, model, device)
        use_code_filter(model, code)  # a video fit's finer 3D filter (track.py --video_filter_3d clip)
        return code
    if p.suffix == ".pt" or os.sep in key:
        raise FileNotFoundError(f"fitted code not found: {p} (a code.pt written by track.py)")
    shown = model.identities[:10]
    raise ValueError(f"{key!r} is neither a training identity of the model (it has {len(model.identities)}: "
                     f"{shown}{' ...' if len(model.identities) > 10 else ''}) nor a code.pt file")


def interpolate_codes(keys: Sequence[FittedCode], i: int, j: int, t: float, method: str, space: str,
                      field_) -> Tensor:
    """Style (S,) of the frame between keys i and j at t (in z space the code is interpolated, then mapped)."""
    fn = slerp if method == "slerp" else lerp
    if space == "z":
        z = fn(keys[i].z, keys[j].z, t)
        return field_.style(z[None], update_w_avg=False)[0]
    return fn(keys[i].w, keys[j].w, t)


def interpolate_colours(keys: Sequence[FittedCode], i: int, j: int, t: float) -> Tensor | None:
    """Colour residual (M, 3) of the frame between keys i and j at t: linear, a key without one counts as zero;
    None when neither key has one."""
    return _lerp_residual(keys[i].colour, keys[j].colour, t)


def _lerp_residual(a: Tensor | None, b: Tensor | None, t: float) -> Tensor | None:
    """lerp of two optional residuals of one shape, a missing one counting as zero; None when both are missing.
    A per-Gaussian residual of 7 channels meeting one of every raw channel (pivotal tuning) is spread into those
    channels first (models.identity_field.full_residual)."""
    if a is None and b is None:
        return None
    if a is not None and b is not None and a.shape != b.shape:
        c = max(a.shape[-1], b.shape[-1])
        a, b = full_residual(a, c), full_residual(b, c)
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    return lerp(a, b, t)


def interpolate_gaussians(keys: Sequence[FittedCode], i: int, j: int, t: float) -> Tensor | None:
    """Per-Gaussian residual (V, K, 7 or C) between keys i and j at t, like :func:`interpolate_colours`: linear, a key
    without one counts as zero; None when neither key has one."""
    return _lerp_residual(keys[i].gaussians, keys[j].gaussians, t)


def blend_gaussians(a: FittedCode, b: FittedCode, t: float, truncation: float = 1.0) -> Tensor | None:
    """The per-Gaussian residual of the identity between a and b at t (see :func:`blend_style`): linear, scaled by
    ``truncation`` like the colour residual (both correct the fitted style)."""
    g = interpolate_gaussians((a, b), 0, 1, t)
    return g if g is None or truncation == 1.0 else g * truncation


def blend_style(model: TrainedModel, a: FittedCode, b: FittedCode, t: float, method: str, truncation: float = 1.0
                ) -> tuple[Tensor, Tensor | None]:
    """Style (S,) and colour residual ((M, 3) or None) of the identity between a and b at t (0 = a, 1 = b): codes
    interpolated with ``method`` in z when both keys have one, else in w, the colour residual linearly; then pulled
    towards the average style ``w_avg`` by ``truncation`` (psi: 1 = none, 0 = the average style), which scales the
    colour residual (a correction of the fitted style) with it."""
    keys = (a, b)
    w = interpolate_codes(keys, 0, 1, t, method, code_space(keys), model.field)
    colour = interpolate_colours(keys, 0, 1, t)
    if truncation != 1.0:
        w = model.field.mapping.w_avg.to(w).lerp(w, truncation)
        colour = None if colour is None else colour * truncation
    return w, colour


def canonical_vertices(template: Tensor, base: Tensor) -> Tensor:
    """World-space vertices base (M, 3) brought into FLAME's canonical frame of ``template`` (M, 3): the similarity
    (scale, rotation, translation) that best maps the template onto them, undone."""
    s, R, t = similarity_fit(template, base)
    R, t = R.to(base), t.to(base)
    return ((base - t) @ R) / s  # R^T (v - t) / s, row-vector form


def code_space(keys: Sequence[FittedCode]) -> str:
    """"z" when every key has a latent code (interpolate codes, then map), else "w" (interpolate styles)."""
    return "z" if all(k.z is not None for k in keys) else "w"


def base_camera(cfg: Any, template: Tensor, base: Tensor, device: torch.device) -> Camera:
    """The still camera of ``cfg`` (any config with camera_json, camera, width, height and fill: interpolate.py's,
    animate.py's, the viewer's): a calibrated one from ``cfg.camera_json`` scaled to ``cfg.width``, else a frontal
    look_at camera 1 m in front of the face (FLAME's +z axis) framing the head."""
    if cfg.camera_json:
        path = Path(cfg.camera_json)
        try:
            cam = load_camera_params(path, serials=[cfg.camera])[cfg.camera]
        except KeyError as exc:
            raise ValueError(f"camera {cfg.camera!r} is not in {path}: {exc.args[0] if exc.args else exc}") from exc
        return cam.scaled(cfg.width / cam.width).to(device)
    if cfg.width < 2 or cfg.height < 2:
        raise ValueError(f"--width and --height must be >= 2, got {cfg.width}x{cfg.height}")
    centre, R, radius = head_pose(template, base)
    eye = centre + R[:, 2] * 1.0
    f = 0.5 * min(cfg.width, cfg.height) * cfg.fill * 1.0 / max(radius, 1e-9)
    return Camera.look_at(eye.tolist(), centre.tolist(), R[:, 1].tolist(), cfg.width, cfg.height, fx=f, fy=f,
                          name="frontal").to(device)


def key_label(key: str) -> str:
    """File-name-safe label of a key: the identity name, or for a track.py output (.../<name>/code.pt) its folder."""
    p = Path(key)
    raw = p.parent.name if p.name == "code.pt" and p.parent.name else p.stem
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in raw) or "key"


# ====================================================================================== FLAME of an identity
def model_flame_dir(model: TrainedModel, flame_dir: str) -> Path:
    """FLAME files for a photo-only fit: ``flame_dir`` when given, else those the model was trained with (the
    training data root's flame/ for the synthetic layout, or its data.flame_dir), else data/."""
    if flame_dir:
        return Path(flame_dir)
    data = (model.config or {}).get("data", {})
    root = Path(str(data.get("root") or ""))
    if data.get("root") and (root / "flame").is_dir():
        return root / "flame"
    if data.get("flame_dir") and Path(data["flame_dir"]).is_dir():
        return Path(data["flame_dir"])
    return Path("data")


def load_flame(model: TrainedModel, flame_dir: Path) -> FlameModel:
    """The model's FlameModel from ``flame_dir``, with a message that says which folder is expected."""
    try:
        flame = FlameModel.from_data_dir(flame_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (animation needs the FLAME files the model was trained with; pass "
                                f"--flame_dir)") from exc
    model.check_flame(flame, flame_dir)
    return flame


def fit_flame_to_vertices(face: FlameSubset, vertices: Tensor, iterations: int = 4, ridge: float = 1e-4
                          ) -> FlameParams:
    """FLAME shape and head placement of stored face-mask vertices (for model.pt / code.pt files written before they
    held FLAME parameters): alternately a similarity (Umeyama) and the shape coefficients by ridge-regularised linear
    least squares, assuming a neutral expression and zero jaw / neck / eye rotation.

    Args:
        face: the FLAME rows of the face mask (models.flame.FlameSubset).
        vertices: (M, 3) world-space face-mask vertices.
    Returns:
        FlameParams (T = 1) on the vertices' device.  What it cannot explain (expression, pose, fitted offsets) stays
        as geometry offsets when the vertices are given to HeadAnimator.identity.
    """
    dev = vertices.device
    tmpl = face.template.detach().double().cpu()
    A = face.shapedirs.detach().double().cpu().reshape(-1, face.shapedirs.shape[-1])  # (M*3, 300)
    AtA = A.T @ A
    reg = ridge * torch.trace(AtA) / AtA.shape[0] * torch.eye(AtA.shape[0], dtype=torch.float64)
    target = vertices.detach().double().cpu()
    beta = torch.zeros(A.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        s, R, t = similarity_fit((tmpl + (A @ beta).view(-1, 3)).float(), target.float())
        canon = (target - t.double()) @ R.double() / s  # R^T (v - t) / s in row-vector form
        beta = torch.linalg.solve(AtA + reg, A.T @ (canon - tmpl).reshape(-1))
    s, R, t = similarity_fit((tmpl + (A @ beta).view(-1, 3)).float(), target.float())
    p = FlameParams.neutral(1)
    return replace(p, shape=beta.float()[None], rotation_matrix=R[None], translation=t[None],
                   scale=torch.full((1, 1), float(s))).to(dev)


@dataclass
class IdentityKey:
    """One identity as the pose path needs it, resolved without running the network.

    Attributes:
        code: its FittedCode (style, code, level-0 vertices, colour residual).
        base: FlameParams (T = 1) of its own frame: stored in model.pt / code.pt, or fitted for older files.
        offsets: (1, V, 3) geometry offsets from FLAME (HeadAnimator.geometry_offsets), or None.
        name: a label.
    """

    code: FittedCode
    base: FlameParams
    offsets: Tensor | None
    name: str


def identity_key(animator: HeadAnimator, model: TrainedModel, key: str, device: torch.device,
                 code: FittedCode | None = None) -> IdentityKey:
    """A training identity (by name) or a code.pt (``code``: already resolved with resolve_key) -> IdentityKey.  Files
    written before FLAME parameters were stored get FLAME's shape and head pose by least squares, with a warning."""
    code = resolve_key(model, key, device) if code is None else code
    base = code.flame
    if base is None:
        base = fit_flame_to_vertices(animator.face, code.base_vertices)
        with torch.no_grad():
            rms = float((animator.face(base)[0] - code.base_vertices).square().sum(-1).mean().sqrt())
        what = "model.pt" if key in model.identities else str(key)
        warnings.warn(f"{what} holds no FLAME parameters for {code.name or key!r} (written before they were stored): "
                      f"FLAME shape and head pose were fitted to its face-mask vertices by least squares (RMS "
                      f"residual {1000 * rms:.2f} mm, kept as geometry offsets; the neck and jaw pivots, which "
                      f"depend on the whole head, are approximate)")
    base = base.to(animator.device)
    return IdentityKey(code, base, animator.geometry_offsets(base, code.base_vertices), code.name or key)


def posable(animator: HeadAnimator, model: TrainedModel, key: str, device: torch.device
            ) -> tuple[PosableIdentity, FittedCode]:
    """A training identity (by name) or a code.pt -> (PosableIdentity, its FittedCode); the network runs once."""
    k = identity_key(animator, model, key, device)
    head = animator.identity(k.code.w, k.base, colour=k.code.colour, name=k.name, gaussians=k.code.gaussians)
    return replace(head, offsets=k.offsets), k.code


def mixed_identity(animator: HeadAnimator, model: TrainedModel, a: IdentityKey, b: IdentityKey, mix: float,
                   method: str, truncation: float = 1.0) -> PosableIdentity:
    """The interpolation between identities a and b at ``mix`` (0 = a), truncated by ``truncation`` (psi, 1 = none):
    style and colour residual by :func:`blend_style`, FLAME shape and geometry offsets linearly (the
    geometry does not truncate); a's head placement.  The network runs once."""
    with torch.no_grad():
        w, colour = blend_style(model, a.code, b.code, mix, method, truncation)
    base = replace(a.base, shape=lerp(a.base.shape, b.base.shape, mix))
    head = animator.identity(w, base, colour=colour, name=f"{a.name}+{b.name}@{mix:g}",
                             gaussians=blend_gaussians(a.code, b.code, mix, truncation))
    oa, ob = a.offsets, b.offsets
    if oa is not None or ob is not None:
        oa = torch.zeros_like(ob) if oa is None else oa
        ob = torch.zeros_like(oa) if ob is None else ob
        head = replace(head, offsets=lerp(oa, ob, mix))
    return head
