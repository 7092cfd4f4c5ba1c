"""The pose path: any identity of the field driven by FLAME parameters, batched over frames.

Every Gaussian rides its own vertex of the subdivided face mask in that vertex's tangent frame, and the network's raw
output does not depend on the pose (``IdentityField.synthesize_raw``).  So a head is animated by running the network
ONCE per identity and, per frame, only FLAME (the face-mask rows), the subdivision and the attachment::

    identity   style w --network (once)--> raw output (1, V, K, C)  [+ colour residual folded into the SH DC term,
               + per-Gaussian offset / log-scale / opacity residual (IdentityField.add_residual)]
               FLAME parameters of the identity's own frame ``base`` (its shape (1, 300) and head placement)
               geometry offsets (1, V, 3): fitted vertex offsets in the base frame's surface frames, edge units
    T frames   FlameParams (expression, jaw, neck, eyes, rotation, translation, scale; the identity's shape)
               --FlameSubset (face-mask rows)--> (T, M, 3) --subdivision--> (T, V, 3) [+ offsets, riding the surface]
               --IdentityField.attach--> GaussianCloud (T, N)

Every step is plain batched tensor maths with device-resident indices and no host synchronisation, so on a GPU the
per-frame path is captured into a CUDA graph (:meth:`HeadAnimator.graphed`).

API (used by animate.py and meant for interactive viewers, e.g. expression / jaw / head-pose sliders)::

    animator = HeadAnimator.from_model(model, flame)          # model.pt (utils/data/model_file.py) + its FLAME files
    head = animator.identity(w, base_params, base_vertices, colour)   # runs the network once: a PosableIdentity
    motion = FlameParams.neutral(T); motion.jaw[:, 0] = 0.2   # any expression / jaw / neck / eyes values
    cloud = animator.gaussians(head, retarget(motion, head.base))    # GaussianCloud (T, N), no network
    step = animator.graphed(head, num_frames=1)                # the same per call, replayed from a CUDA graph

:func:`retarget` puts a motion (e.g. another person's tracking) on an identity: the identity's shape, the motion's
expression, jaw, neck and eyes, and the head placed relative to the identity's own placement (or absolutely).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from models.flame import (
    FlameModel,
    FlameParams,
    FlameSubset,
    SubdivisionPlan,
    subdivide_vertices,
)
from models.gaussians import SH_C0, GaussianCloud
from models.graphed_synthesis import capture_forward
from models.identity_field import IdentityField

POSE_MODES = ("relative", "absolute", "fixed")
OFFSET_TOLERANCE = 1e-6  # metres: base vertices within this of FLAME's are FLAME's (no geometry offsets kept)
_FIELDS = ("means", "quats", "scales", "opacities", "sh")
_MOTION = ("expression", "jaw", "neck", "eyes", "rotation_matrix", "translation", "scale")


@dataclass
class PosableIdentity:
    """An identity ready to be posed (:meth:`HeadAnimator.identity`).

    Attributes:
        raw: (1, V, K, C) the network's raw output for the identity's style (colour and per-Gaussian residuals
            folded in).
        base: FlameParams (T = 1) of the identity's own frame: its FLAME shape, head placement and expression.
        offsets: (1, V, 3) geometry offsets of the subdivided vertices from FLAME's, in the surface frames of the base
            frame, in units of the local edge length (None: the identity's geometry is FLAME's).
        name: a label.
    """

    raw: Tensor
    base: FlameParams
    offsets: Tensor | None = None
    name: str = ""

    @property
    def shape(self) -> Tensor:
        """(1, 300) FLAME shape coefficients."""
        return self.base.shape


def retarget(motion: FlameParams, base: FlameParams, pose: str = "relative", reference: int = 0) -> FlameParams:
    """A motion put on an identity: the identity's shape (``base.shape``), the motion's expression, jaw, neck and eyes,
    and the head placed according to ``pose``.

    Args:
        motion: FlameParams (T frames) of the driving sequence (NeRSemble head-pose convention: bake VHAP's root
            pivot first, ``FlameModel.bake_root_pivot``).
        base: FlameParams (T = 1) of the identity's own frame (``PosableIdentity.base``).
        pose: "relative": the identity's placement composed with the motion's head movement relative to its frame
            ``reference`` (model_to_world_t = M_base M_ref^-1 M_t, so the same person's own tracking is reproduced
            exactly); "absolute": the motion's world placement as is; "fixed": the identity's placement in every frame
            (only expression, jaw, neck and eyes move).
        reference: the motion's frame whose head placement counts as "no movement" for ``pose="relative"``.
    Returns:
        FlameParams (T frames) with ``shape = base.shape``.
    """
    if pose not in POSE_MODES:
        raise ValueError(f"pose must be one of {POSE_MODES}, got {pose!r}")
    if motion.rotate_about_root or base.rotate_about_root:
        raise ValueError("retarget: bake VHAP's root pivot first (FlameModel.bake_root_pivot)")
    T = motion.num_frames
    base = base.to(motion.device, motion.expression.dtype)
    out = replace(motion, shape=base.shape)
    if pose == "absolute":
        return out
    if pose == "fixed":
        return replace(out, rotation_matrix=base.rotation_matrix.expand(T, 3, 3).clone(),
                       translation=base.translation.expand(T, 3).clone(), scale=base.scale.expand(T, 1).clone())
    if not -T <= reference < T:
        raise ValueError(f"reference frame {reference} out of range for a motion of {T} frames")
    Rb, tb, sb = base.rotation_matrix[0], base.translation[0], base.scale[0]
    Rr, tr, sr = motion.rotation_matrix[reference], motion.translation[reference], motion.scale[reference]
    rot = Rb @ Rr.T @ motion.rotation_matrix  # (T, 3, 3)
    trans = tb + sb / sr * ((motion.translation - tr) @ Rr) @ Rb.T  # s_b R_b R_r^T (t_t - t_r) / s_r + t_b
    return replace(out, rotation_matrix=rot, translation=trans, scale=sb * motion.scale / sr)


class HeadAnimator(nn.Module):
    """Poses identities of a trained identity field with FLAME parameters (see the module docstring).

    Args:
        field: the trained IdentityField (frozen; its device is used).
        flame: the FlameModel the field was trained with (its smplx buffers feed :class:`FlameSubset`).
        mask_ids: (M,) FLAME vertex ids of the face mask (level-0 vertex i = FLAME vertex mask_ids[i]).
        plan: subdivision plan from the M face-mask vertices to the field's V vertices.
    """

    def __init__(self, field: IdentityField, flame: FlameModel, mask_ids: np.ndarray | Tensor,
                 plan: SubdivisionPlan) -> None:
        super().__init__()
        device = field.template_verts.device
        if plan.num_vertices(plan.levels) != field.num_vertices:
            raise ValueError(f"HeadAnimator: the subdivision plan makes {plan.num_vertices(plan.levels)} vertices, the "
                             f"field has {field.num_vertices}")
        self.field = field
        self.face = FlameSubset(flame, mask_ids).to(device)
        self.plan = plan.to(device)
        dc = field._channel_slices()["sh"].start
        self._dc = slice(dc, dc + 3)  # raw channels of the SH DC term (the colour residual is added there)

    @classmethod
    def from_model(cls, model: Any, flame: FlameModel, flame_dir: str = "") -> "HeadAnimator":
        """From a loaded model.pt (utils.data.model_file.TrainedModel); checks that ``flame`` is the model's FLAME."""
        model.check_flame(flame, flame_dir or str(getattr(flame, "model_path", "the FLAME files")))
        return cls(model.field, flame, model.mask_ids, model.plan)

    @property
    def device(self) -> torch.device:
        return self.field.template_verts.device

    # ------------------------------------------------------------------ identities
    @torch.no_grad()
    def identity(self, w: Tensor, base: FlameParams, base_vertices: Tensor | None = None,
                 colour: Tensor | None = None, name: str = "", gaussians: Tensor | None = None) -> PosableIdentity:
        """Run the network once for style ``w`` and keep what posing needs.

        Args:
            w: (S,) style vector.
            base: FlameParams (T = 1) of the identity's own frame (its FLAME shape and head placement).
            base_vertices: (M, 3) the identity's world-space face-mask vertices at that frame, when they are not
                exactly FLAME's (e.g. track.py's ``--refine_geometry`` offsets, or a FLAME fit to stored vertices);
                their difference to FLAME is kept as geometry offsets that ride the surface.
            colour: (M, 3) per-vertex RGB residual of the level-0 vertices (track.py's colour stage).
            name: a label.
            gaussians: (V, K, 7) per-Gaussian residual of the position offset, log-scale and opacity, or (V, K, C)
                of every raw channel (pivotal tuning) (track.py's video refinement, ``IdentityField.add_residual``):
                in the raw output, so it costs nothing per frame.
        """
        dev = self.device
        base = base.to(dev)
        if base.num_frames != 1:
            raise ValueError(f"HeadAnimator.identity: base must hold one frame, got {base.num_frames}")
        if base.rotate_about_root:
            raise ValueError("HeadAnimator.identity: bake VHAP's root pivot first (FlameModel.bake_root_pivot)")
        raw = self.field.synthesize_raw(w.to(dev).reshape(1, -1)).float()  # (1, V, K, C)
        if colour is not None:
            # with_colour (utils/data/code_file.py) adds offsets / SH_C0 to the DC term after the network; the DC term
            # is the raw channel itself, so adding it here gives the same numbers and costs nothing per frame
            per_vertex = subdivide_vertices(colour.to(dev).float(), self.plan)  # (V, 3)
            raw = raw.clone()
            raw[..., self._dc] += (per_vertex / SH_C0)[None, :, None, :]
        if gaussians is not None:
            raw = self.field.add_residual(raw, gaussians.to(dev).float())
        offsets = None if base_vertices is None else self.geometry_offsets(base, base_vertices)
        return PosableIdentity(raw=raw, base=base, offsets=offsets, name=name)

    @torch.no_grad()
    def geometry_offsets(self, base: FlameParams, base_vertices: Tensor) -> Tensor | None:
        """(1, V, 3) offsets of an identity's face-mask vertices ``base_vertices`` (M, 3) from FLAME's at its frame
        ``base`` (T = 1), subdivided and expressed in the surface frames of that frame in units of the local edge
        length (``PosableIdentity.offsets``); None when the vertices are FLAME's (within OFFSET_TOLERANCE).  The
        network does not run: a viewer resolves identities with this and runs the network only for what it shows."""
        base = base.to(self.device)
        flame_base = self.face(base)  # (1, M, 3)
        d0 = base_vertices.to(self.device).float().reshape(flame_base.shape) - flame_base
        if float(d0.abs().max()) <= OFFSET_TOLERANCE:
            return None
        v = subdivide_vertices(flame_base, self.plan)
        frames, edge = self.field.surface_frames(v)  # (1, V, 3, 3), (1, V)
        d = subdivide_vertices(d0, self.plan)  # linear: offsets of the subdivided vertices
        return (frames.transpose(-1, -2) @ d[..., None])[..., 0] / edge[..., None]

    # ------------------------------------------------------------------ posing
    def vertices(self, head: PosableIdentity, params: FlameParams) -> Tensor:
        """(T, V, 3) world-space subdivided face-mask vertices of ``head`` posed by ``params`` (T frames; the shape
        used is the identity's, ``params.shape`` is ignored)."""
        p = replace(params, shape=head.base.shape).to(self.device)
        v = subdivide_vertices(self.face(p), self.plan)  # (T, V, 3)
        if head.offsets is not None:
            frames, edge = self.field.surface_frames(v)
            v = v + (frames @ head.offsets[..., None])[..., 0] * edge[..., None]
        return v

    def gaussians(self, head: PosableIdentity, params: FlameParams) -> GaussianCloud:
        """GaussianCloud (T, N) of ``head`` in the T frames of ``params`` (the network does not run)."""
        return self.field.attach(head.raw, self.vertices(head, params))

    def graphed(self, head: PosableIdentity, num_frames: int = 1, use_graphs: bool | None = None) -> "PoseGraph":
        """A callable ``params (num_frames frames) -> GaussianCloud (num_frames, N)`` for ``head``, replayed from a
        CUDA graph on a GPU (see :class:`PoseGraph`)."""
        return PoseGraph(self, head, num_frames, use_graphs)


class PoseGraph:
    """``params -> GaussianCloud (T, N)`` of one identity at a fixed number of frames T, replayed from a CUDA graph.

    On a GPU the whole per-frame path (FLAME rows, subdivision, offsets, attachment) is captured once and each call is
    a few device-to-device copies plus one graph launch; on a CPU, with ``use_graphs=False`` or when the capture
    fails (the reason is kept in ``fallback_reason``), it runs eagerly with the same results.  The outputs of a
    replayed call live in static buffers that the next call overwrites (on the same stream, so a render queued in
    between is unaffected); ``cloud.clone()`` keeps one.
    """

    def __init__(self, animator: HeadAnimator, head: PosableIdentity, num_frames: int,
                 use_graphs: bool | None = None) -> None:
        if num_frames < 1:
            raise ValueError(f"PoseGraph: num_frames must be >= 1, got {num_frames}")
        self.num_frames, self.head = int(num_frames), head
        self.fallback_reason: str | None = None
        device = animator.device
        base = head.base

        def attributes(*motion: Tensor) -> tuple[Tensor, ...]:
            p = FlameParams(shape=base.shape, **dict(zip(_MOTION, motion)))
            cloud = animator.gaussians(head, p)
            return tuple(getattr(cloud, k) for k in _FIELDS)

        self._eager: Callable[..., tuple[Tensor, ...]] = attributes
        self._fn = attributes
        want = device.type == "cuda" if use_graphs is None else (use_graphs and device.type == "cuda")
        if want:
            neutral = FlameParams.neutral(self.num_frames, device=device)
            example = tuple(getattr(retarget(neutral, base), k) for k in _MOTION)
            try:
                self._fn = capture_forward(attributes, example, device)
            except Exception as exc:  # keep working (eagerly) where a capture is not possible
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"PoseGraph: CUDA graph capture failed, running eagerly ({self.fallback_reason})")
                torch.cuda.synchronize(device)
                self._fn = attributes
        self.device = device

    @property
    def graphed(self) -> bool:
        return self._fn is not self._eager

    def __call__(self, params: FlameParams) -> GaussianCloud:
        """params: FlameParams of exactly ``num_frames`` frames (NeRSemble pose convention; shape ignored)."""
        if params.num_frames != self.num_frames:
            raise ValueError(f"PoseGraph was built for {self.num_frames} frames, got {params.num_frames}")
        if params.rotate_about_root:
            raise ValueError("PoseGraph: bake VHAP's root pivot first (FlameModel.bake_root_pivot)")
        args = tuple(getattr(params, k).to(self.device, torch.float32) for k in _MOTION)
        with torch.no_grad():
            out = self._fn(*args)
        return GaussianCloud(**dict(zip(_FIELDS, out)))

