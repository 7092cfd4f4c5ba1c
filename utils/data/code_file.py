"""A fitted identity and its file: ``FittedCode`` (style, optional code, level-0 vertices, colour residual), the
Gaussians it renders to, and ``code.pt`` (written by track.py, read by interpolate.py, animate.py and the viewer)."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from models.camera import Camera
from models.flame import FlameParams
from models.gaussians import SH_C0, GaussianCloud
from models.identity_field import RESIDUAL_CHANNELS
from models.renderer import render_batch
from utils.core.torch_files import atomic_torch_save, load_tagged
from utils.data.model_file import TrainedModel

CODE_FORMAT = "identity-field-code"
CODE_VERSION = 6  # 2: optional per-vertex colour residual ("colour"); 3: "model_fingerprint"; 4: FLAME parameters of
#                    the fitted frame ("flame"); 5: optional per-Gaussian residual ("gaussians"); 6: optional
#                    per-vertex 3D-filter sampling rate ("sampling_rate"); older files still load


@dataclass
class FittedCode:
    """A fitted identity: style ``w`` (S,), code ``z`` (D,) when fitted in z space (else None), level-0 world-space
    face-mask vertices ``base_vertices`` (M, 3) (tracked, plus offsets when refined), and ``colour`` (M, 3): the
    per-vertex RGB residual of the colour stage on the level-0 vertices (None: no residual, e.g. a training identity
    or a code-only fit; render every FittedCode through :func:`code_cloud` so that it is applied), and ``flame``: the
    FLAME parameters (models.flame.FlameParams, T = 1) of the fitted photo's frame, i.e. the person's FLAME shape and
    head placement, which animation drives (None: unknown, e.g. a code.pt written before they were stored), and
    ``gaussians`` (V, K, 7): a per-Gaussian residual of the network's pre-activation position offset, log-scale and
    opacity (``models.identity_field.RESIDUAL_CHANNELS``, added by ``IdentityField.add_residual``; track.py's video
    refinement; None: none), or (V, K, C) in every raw channel (the video refinement with pivotal tuning: the tuned
    network's output for ``w`` minus the model's, so that the model itself stays as it is), and ``sampling_rate``
    (V,): the per-vertex sampling rate of the Mip-Splatting 3D filter the code was fitted with when it is not the
    model's (track.py --video_filter_3d clip: the model's and the clip's, the larger), None: the model's;
    :func:`use_code_filter` sets it on the model."""

    w: Tensor
    z: Tensor | None
    base_vertices: Tensor
    name: str = ""
    meta: dict = field(default_factory=dict)
    colour: Tensor | None = None
    flame: FlameParams | None = None
    gaussians: Tensor | None = None
    sampling_rate: Tensor | None = None


def use_code_filter(model: TrainedModel, code: FittedCode) -> None:
    """Render ``model`` with the 3D filter ``code`` was fitted with: the field's per-vertex sampling rate becomes the
    larger of its own and the code's (a finer filter where the code's frames saw the face larger; several codes in
    one process, e.g. interpolate.py's keys, each lower it where they need).  Nothing happens for a code without
    one or a model without the 3D filter."""
    f = model.field
    if code.sampling_rate is None or f.sampling_rate is None or f.filter_variance is None:
        return
    f.set_sampling_rate(torch.maximum(f.sampling_rate, code.sampling_rate.detach().float().cpu()))


@contextmanager
def code_filter(model: TrainedModel, code: FittedCode) -> Iterator[None]:
    """:func:`use_code_filter` for the ``with`` block only: the model's own 3D filter comes back after it (a benchmark
    that renders several codes with one model, e.g. a video fit's and a photo fit's, must not render the second with
    the first one's filter)."""
    f = model.field
    rate = f.sampling_rate
    use_code_filter(model, code)
    try:
        yield
    finally:
        if f.sampling_rate is not rate:
            f.set_sampling_rate(rate)


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


def code_cloud(model: TrainedModel, w: Tensor, base: Tensor, colour: Tensor | None = None,
               gaussians: Tensor | None = None) -> GaussianCloud:
    """The Gaussians (unbatched) of style w (S,) on level-0 vertices base (M, 3), plus the colour residual (M, 3)
    and the per-Gaussian residual (V, K, 7) or (V, K, C) (``FittedCode.gaussians``)."""
    if gaussians is None:
        cloud = model.field.synthesize(w[None], model.vertices(base)[None])[0]
    else:
        raw = model.field.add_residual(model.field.synthesize_raw(w[None]), gaussians)
        cloud = model.field.attach(raw, model.vertices(base)[None])[0]
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
        "gaussians": None if code.gaussians is None else code.gaussians.detach().cpu(),
        "sampling_rate": None if code.sampling_rate is None else code.sampling_rate.detach().float().cpu(),
        "flame": None if code.flame is None else code.flame.as_dict(),  # plain tensors (FlameParams.as_dict)
        "checkpoint": str(checkpoint), "signature": model_signature(model), "meta": code.meta,
        "model_fingerprint": model.fingerprint,  # SHA-256 of the weights it was fitted with (utils.data.model_file)
    }
    return atomic_torch_save(doc, path)


def check_model_fingerprint(path: Path, doc: dict, model: TrainedModel) -> bool:
    """Whether code.pt ``doc`` was fitted with ``model``'s weights: ValueError naming both files when its stored
    fingerprint differs; a warning (and False) when the file predates fingerprints; True when they match."""
    stored = doc.get("model_fingerprint") or ""
    model_file = model.path or "the given model"
    if not stored or not model.fingerprint:
        warnings.warn(f"{path} predates model fingerprints: it cannot be checked that it was fitted with "
                      f"{model_file} (it names checkpoint {doc.get('checkpoint') or '?'}); fit it again to be sure")
        return False
    if stored != model.fingerprint:
        raise ValueError(f"{path} was fitted with another model than {model_file} (weights fingerprint "
                         f"{stored[:12]}... vs {model.fingerprint[:12]}...; the code file names checkpoint "
                         f"{doc.get('checkpoint') or '?'}): its code means another identity there; fit it again "
                         f"with {model_file}")
    return True


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
        if not check_model_fingerprint(path, doc, model) and sig.get("model_config") != want["model_config"]:
            warnings.warn(f"{path} was fitted with another model config (checkpoint {doc.get('checkpoint')}); the "
                          f"code may not mean the same identity here")
    z, colour = doc.get("z"), doc.get("colour")  # version 1 files hold no colour residual
    flame = doc.get("flame")  # version 1 and 2 files hold no FLAME parameters
    base = doc["base_vertices"].float().to(device)
    gaussians = doc.get("gaussians")  # version 1 to 4 files hold no per-Gaussian residual
    if gaussians is not None and model is not None:
        f = model.field
        want = [(f.num_vertices, f.K, len(RESIDUAL_CHANNELS)), (f.num_vertices, f.K, f.channels)]
        if tuple(gaussians.shape) not in want:
            raise ValueError(f"{path}: per-Gaussian residual of shape {tuple(gaussians.shape)} does not match the "
                             f"model's {want[0]} or {want[1]} (vertices x Gaussians per vertex x channels); fit it "
                             f"again with this model")
    rate = doc.get("sampling_rate")  # version 1 to 5 files: the model's 3D filter
    if rate is not None and model is not None and tuple(rate.shape) != (model.field.num_vertices,):
        raise ValueError(f"{path}: 3D-filter sampling rate of shape {tuple(rate.shape)} does not match the model's "
                         f"{model.field.num_vertices} vertices; fit it again with this model")
    if colour is not None and tuple(colour.shape) != tuple(base.shape):
        raise ValueError(f"{path}: colour residual of shape {tuple(colour.shape)} does not match the base vertices "
                         f"{tuple(base.shape)}")
    return FittedCode(w=doc["w"].float().to(device), z=None if z is None else z.float().to(device),
                      base_vertices=base, name=str(doc.get("name", path.stem)), meta=dict(doc.get("meta", {})),
                      colour=None if colour is None else colour.float().to(device),
                      flame=None if flame is None else FlameParams.from_dict(flame, str(path)).to(device),
                      gaussians=None if gaussians is None else gaussians.float().to(device),
                      sampling_rate=None if rate is None else rate.float().cpu())


def render_style(model: TrainedModel, w: Tensor, base: Tensor, cameras: Sequence[Camera], backend: str = "auto",
                 colour: Tensor | None = None, gaussians: Tensor | None = None) -> Tensor:
    """Images (C, h, w, 3) of style w (S,) on level-0 vertices base (M, 3) (plus the colour residual (M, 3) and the
    per-Gaussian residual (V, K, 7)) through cameras of one size."""
    return render_batch(code_cloud(model, w, base, colour, gaussians), list(cameras), backend=backend,
                        depth=False)["image"]
