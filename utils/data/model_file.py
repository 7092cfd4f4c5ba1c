"""The self-contained trained model file ``model.pt``: everything needed to render, fit and interpolate identities
without the training data (config, identity names, codes, template mesh, per-identity face meshes, weights).

The file is a flat dict of tensors and plain Python values (no pickled classes), read with
``torch.load(weights_only=True)`` (utils.core.torch_files.safe_torch_load), so loading a model from someone else
runs no code.
New entries are added as further keys holding tensors, dicts of tensors or plain values; readers use ``doc.get``
for keys that older files lack.  ``fingerprint`` is a SHA-256 of the weights (:func:`weights_fingerprint`): it is
checked on load, and files derived from a model (code.pt) store it to name the model they belong to.

Optional entries (older files lack them and load as before): ``"encoder"``, the feed-forward encoder photo -> style
(models/encoder.py: {"config", "state_dict"}, with ``"encoder_fingerprint"`` over its weights).  A damaged or
unfitting encoder does not stop the model from loading: it is left out with a one-line notice, and fits start
from the mean code as without one.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from models.encoder import encoder_from_state, encoder_state
from models.flame import (
    FlameParams,
    SubdivisionPlan,
    make_subdivision_plan,
    subdivide_vertices,
)
from models.identity_field import IdentityField, IdentityFieldConfig
from models.level_of_detail import coarser_field
from models.mip_filter import display_filter, set_render_filter
from utils.core.torch_files import atomic_torch_save, load_tagged

FORMAT_VERSION = 4  # 2: adds "fingerprint"; 3: adds "flame_params" (FLAME parameters of every identity);
#                    4: adds "sampling_rate" (per-vertex maximal sampling rate of the training cameras, Mip-Splatting)
MODEL_FORMAT = "identity-field-model"


def weights_fingerprint(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 (hex) of a state dict: every entry's name, dtype, shape and bytes, in sorted name order.

    Equal for equal weights whatever the device they are on or the order of the dict; any changed value, entry,
    shape or dtype changes it."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(path: str | os.PathLike, field: IdentityField, data, config: dict, encoder=None) -> Path:
    """Write model.pt from a trained field and its MultiViewDataset (atomically); ``encoder``: an optional
    models.encoder.StyleEncoder stored beside the field."""
    state = {k: v.detach().cpu() for k, v in field.state_dict().items()}
    doc = {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "config": config,
        "identities": list(data.identities),
        "state_dict": state,
        "fingerprint": weights_fingerprint(state),
        "template_base": data.template.detach().cpu(),
        "base_faces": torch.as_tensor(data.base_faces).cpu(),
        "mask_ids": torch.as_tensor(data.mask_ids).cpu(),
        "subdivision": int(data.cfg.subdivision),
        "base_vertices": data.base_vertices.detach().cpu(),
        # FLAME parameters of each identity's frame, {field: (I, ...) tensor} (models.flame.FlameParams.as_dict),
        # so that animation knows every identity's FLAME shape and head placement; None when the data had none
        "flame_params": stack_flame_params(getattr(data, "flame_params", None)),
        # (V,) px per world unit: the Mip-Splatting 3D filter's sampling rate (models/mip_filter.py); None: no filter
        "sampling_rate": None if field.sampling_rate is None else field.sampling_rate.detach().float().cpu(),
    }
    if encoder is not None:
        doc.update(encoder_entries(encoder))
    return atomic_torch_save(doc, path)


def encoder_entries(encoder) -> dict:
    """model.pt keys of an encoder: "encoder" ({"config", "state_dict"}) and "encoder_fingerprint"."""

    state = encoder_state(encoder)
    return {"encoder": state, "encoder_fingerprint": weights_fingerprint(state["state_dict"])}


def add_encoder(path: str | os.PathLike, encoder) -> Path:
    """Store ``encoder`` in an existing model.pt (replacing any encoder it holds; atomically).  The field's weights
    and fingerprint are untouched, so code.pt files fitted with the model still belong to it."""
    doc = load_tagged(path, MODEL_FORMAT, "model file", "train one with: bash run_training.sh",
                      "is not an identity-field model.pt (a training checkpoint? use <out>/model.pt)")
    doc.update(encoder_entries(encoder))
    return atomic_torch_save(doc, path)


def load_encoder_entry(doc: dict, path: str | os.PathLike, device: torch.device | str):
    """(encoder or None, notice): the optional encoder of a model.pt document; a damaged one gives (None, a
    one-line notice naming the file) instead of an error, so the model still loads (fits then start from the mean
    code)."""
    if doc.get("encoder") is None:
        return None, ""

    try:
        entry = doc["encoder"]
        sd = entry.get("state_dict") if isinstance(entry, dict) else None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise ValueError("its 'state_dict' must map names to tensors")
        if doc.get("encoder_fingerprint") != weights_fingerprint(sd):
            raise ValueError("its weights do not match their fingerprint (damaged or edited)")
        return encoder_from_state(entry, device), ""
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return None, (f"notice: {path}: the encoder is not usable ({exc}); fits start without it (fit.init "
                      f"mean_code / best). Retrain it with: python train.py --encoder_only --checkpoint {path}")


def stack_flame_params(params: Sequence[FlameParams] | None) -> dict[str, Tensor] | None:
    """I FlameParams (T = 1 each) -> {field: (I, ...) plain CPU tensor} (None for None)."""
    if not params:
        return None
    dicts = [p.as_dict() for p in params]
    return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}


@dataclass
class TrainedModel:
    """A loaded model.pt.

    Attributes:
        field: the IdentityField (eval mode, on ``device``).
        identities: names of the I training identities (row i of ``field.codes``).
        base_vertices: (I, M, 3) world-space face-mask vertices of the training identities (level 0).
        template_base: (M, 3) canonical face-mask vertices; base_faces (F, 3); mask_ids (M,) FLAME vertex ids.
        plan: subdivision plan from level 0 to the network's level.
        config: the full training config (dict).
        fingerprint: SHA-256 of the weights (weights_fingerprint), as stored in the file and verified on load.
        path: the file it was loaded from ("" when built otherwise).
        flame_params: {field: (I, ...) tensor} FLAME parameters of each training identity's frame (shape and head
            placement, see :meth:`identity_flame`); None in model.pt files written before they were stored.
        filter_2d: the 2D mip filter (px^2) the model is rendered with (its config's render_filter_2d, else the
            filter_2d it was trained with), None for 3DGS's classic dilation (the renderer's default is set to it on
            load, models.mip_filter.set_render_filter).
        encoder: the feed-forward encoder photo crop -> style (models/encoder.py), None when the file has none or it
            is damaged (then ``encoder_notice`` says why, in one line).
    """

    field: IdentityField
    identities: list[str]
    base_vertices: Tensor
    template_base: Tensor
    base_faces: np.ndarray
    mask_ids: np.ndarray
    plan: SubdivisionPlan
    config: dict
    fingerprint: str = ""
    path: str = ""
    flame_params: dict | None = None
    filter_2d: float | None = None
    encoder: Any = None  # models.encoder.StyleEncoder (eval mode, on the device) or None
    encoder_notice: str = ""  # why a stored encoder was left out ("" when none was stored or it loaded)
    # derived(): key -> object; not an init argument, so dataclasses.replace gives a copy its own (empty) cache
    _derived: dict = dataclass_field(default_factory=dict, init=False, repr=False, compare=False)

    def coarse_field(self, levels_down: int) -> IdentityField:
        """The frozen ``field`` on its own mesh ``levels_down`` subdivision levels coarser
        (models/level_of_detail.coarser_field), built on first use and kept: a loaded model's field does not train.
        0 returns ``field`` itself."""
        if levels_down == 0:
            return self.field
        return self.derived(("coarse_field", levels_down), lambda: coarser_field(self.field, self.plan, levels_down))

    def derived(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` for ``key``, built on first use and kept with this model: what depends only on the frozen
        model (its mesh's Laplacian and boundary rings, a coarser field), which a fit would otherwise rebuild on the
        host for every photo.  Keys name the object and whatever it depends on beyond the model (e.g. the device)."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def vertices(self, base: Tensor) -> Tensor:
        """(..., M, 3) level-0 face-mask vertices -> (..., V, 3) at the network's subdivision level."""
        return subdivide_vertices(base, self.plan)

    def identity_index(self, name: str) -> int:
        if name not in self.identities:
            raise KeyError(f"identity {name!r} is not in the model (it has {self.identities})")
        return self.identities.index(name)

    def identity_flame(self, index: int) -> FlameParams | None:
        """FLAME parameters (T = 1) of training identity ``index``'s frame; None when model.pt predates them."""
        if self.flame_params is None:
            return None
        return FlameParams.from_dict({k: v[index:index + 1] for k, v in self.flame_params.items()},
                                     "model.pt flame_params")

    def check_flame(self, flame, flame_dir: str | os.PathLike) -> None:
        """Raise a clear error when a FlameModel (read from ``flame_dir``) is not the FLAME the model was trained
        with: the face mask must fit its vertex count and its template must match the model's."""
        ids = torch.as_tensor(self.mask_ids)
        if int(ids.max()) >= flame.num_vertices:
            raise ValueError(f"the model's face mask indexes FLAME vertex {int(ids.max())} but the FLAME model in "
                             f"{flame_dir} has {flame.num_vertices} vertices: use the FLAME files the model was "
                             f"trained with (--flame_dir)")
        if not torch.allclose(flame.v_template[ids].cpu().float(), self.template_base.cpu().float(), atol=1e-4):
            raise ValueError(f"the FLAME template in {flame_dir} differs from the one the model was trained with: use "
                             f"the same FLAME files (--flame_dir)")


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> TrainedModel:
    """Load model.pt (written by training) onto ``device``; clear errors for missing or foreign files."""
    doc = load_tagged(path, MODEL_FORMAT, "model file", "train one with: bash run_training.sh",
                      "is not an identity-field model.pt (a training checkpoint? use <out>/model.pt)")
    required = ("config", "identities", "state_dict", "template_base", "base_faces", "mask_ids", "subdivision",
                "base_vertices")
    missing = [k for k in required if k not in doc]
    if missing:
        raise ValueError(f"{path}: model file lacks the entries {missing}; export it again with this version")
    if not isinstance(doc["state_dict"], dict) or not all(isinstance(v, Tensor) for v in doc["state_dict"].values()):
        raise ValueError(f"{path}: 'state_dict' must map names to tensors")
    fingerprint = weights_fingerprint(doc["state_dict"])
    if doc.get("fingerprint") not in (None, fingerprint):  # files of format 1 have none
        raise ValueError(f"{path}: its weights do not match the fingerprint stored with them (the file was damaged or "
                         f"edited); use an intact copy of the model or export it again from its training checkpoint")
    model_cfg = dict(doc["config"]["model"])
    rate = doc.get("sampling_rate")
    if "filter_2d" not in model_cfg:  # trained before the Mip-Splatting filters: render it as it was trained
        model_cfg.update(filter_3d=0.0, filter_2d=0.0, filter_3d_surface=False, render_filter_2d=0.0)
    if rate is None and model_cfg.get("filter_3d", 0) > 0:
        print(f"[model] {path}: no stored sampling rate (written before format 4): the 3D smoothing filter is off")
    mcfg = IdentityFieldConfig.from_dict(model_cfg)
    level = int(doc["subdivision"])
    faces = doc["base_faces"].numpy()
    plan = make_subdivision_plan(len(doc["template_base"]), faces, level)
    template = subdivide_vertices(doc["template_base"], plan)
    field = IdentityField(mcfg, len(doc["identities"]), template, torch.as_tensor(plan.faces[level]))
    try:
        field.load_state_dict(doc["state_dict"])
    except RuntimeError as exc:  # names/shapes do not fit the stored model config
        raise ValueError(f"{path}: its weights do not fit the model config stored with them "
                         f"({str(exc).splitlines()[0]})") from exc
    if rate is not None:
        if not isinstance(rate, Tensor) or tuple(rate.shape) != (field.num_vertices,):
            raise ValueError(f"{path}: 'sampling_rate' must be a ({field.num_vertices},) tensor, got "
                             f"{getattr(rate, 'shape', type(rate).__name__)}")
        field.set_sampling_rate(rate)
    field.to(device).eval()
    if field.filter_variance is not None:
        field.filter_variance = field.filter_variance.to(device)
    filter_2d, compensation = display_filter(mcfg)
    set_render_filter(filter_2d, compensation)  # every tool renders the model with its 2D filter
    encoder, notice = load_encoder_entry(doc, path, device)
    if notice:
        import sys

        print(notice, file=sys.stderr)
    return TrainedModel(
        field=field,
        identities=list(doc["identities"]),
        base_vertices=doc["base_vertices"].to(device),
        template_base=doc["template_base"].to(device),
        base_faces=faces,
        mask_ids=doc["mask_ids"].numpy(),
        plan=plan.to(device),
        config=doc["config"],
        fingerprint=fingerprint,
        path=str(path),
        flame_params=doc.get("flame_params"),  # absent in model.pt files written before animation existed
        filter_2d=filter_2d,
        encoder=encoder,  # absent in model.pt files written before the encoder existed
        encoder_notice=notice,
    )
