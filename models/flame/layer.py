"""The FLAME layer: :class:`FlameModel` (the full model on top of ``smplx.FLAME``, world-space vertices and
landmarks) and :class:`FlameSubset` (the same forward on a subset of the vertices, e.g. the face mask).

FLAME runs with zero global rotation; the head pose of :class:`FlameParams` (``model_to_world = [scale * R | t]``,
or VHAP's rotation about the root joint) is applied after it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import smplx
import torch
from torch import Tensor, nn

from models.flame.files import (
    _WHERE,
    DYNAMIC_EMBEDDING,
    FLAME_URL,
    MODEL_FILENAMES,
    STATIC_EMBEDDING,
    PathLike,
    _find_file,
    load_dynamic_embedding,
    load_flame_pickle,
    load_static_embedding,
    smplx_files,
)
from models.flame.params import NUM_EXPRESSION, NUM_JOINTS, NUM_SHAPE, FlameParams, axis_angle_to_matrix


class FlameModel(nn.Module):
    """FLAME 2023 (300 shape / 100 expression) on top of ``smplx.FLAME``, returning world-space vertices.

    Buffers: ``faces`` (F,3) long, ``v_template`` (V,3), ``lmk_faces_idx`` (L,), ``lmk_bary_coords`` (L,3).
    """

    def __init__(self, model_path: PathLike, static_embedding_path: Optional[PathLike] = None,
                 dynamic_embedding_path: Optional[PathLike] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        model_path = Path(model_path)
        model = load_flame_pickle(model_path)
        static = load_static_embedding(static_embedding_path) if static_embedding_path is not None else None
        self.has_landmarks = static is not None
        nf = model["f"].shape[0]
        if static is not None and static["lmk_face_idx"].size and static["lmk_face_idx"].max() >= nf:
            raise ValueError(f"{static_embedding_path}: lmk_face_idx refers to face {static['lmk_face_idx'].max()} "
                             f"but the model {model_path} has {nf} faces (embedding of another FLAME version?)")
        # smplx reads only files written just now into a private folder (see smplx_files); smplx's defaults are
        # 10/10 coefficients: pass the FLAME 2023 sizes explicitly
        with smplx_files(model, static) as folder:
            self.flame = smplx.FLAME(model_path=str(folder), num_betas=NUM_SHAPE,
                                     num_expression_coeffs=NUM_EXPRESSION, create_betas=False,
                                     create_expression=False, create_global_orient=False, create_neck_pose=False,
                                     create_jaw_pose=False, create_leye_pose=False, create_reye_pose=False,
                                     create_transl=False, dtype=dtype, batch_size=1)
        self.register_buffer("faces", torch.as_tensor(model["f"], dtype=torch.long), persistent=False)
        self.register_buffer("v_template", torch.as_tensor(model["v_template"], dtype=dtype), persistent=False)
        if static is not None:
            self.register_buffer("lmk_faces_idx", torch.as_tensor(static["lmk_face_idx"]), persistent=False)
            self.register_buffer("lmk_bary_coords", torch.as_tensor(static["lmk_b_coords"], dtype=dtype),
                                 persistent=False)
        self.dynamic_embedding = load_dynamic_embedding(dynamic_embedding_path) if dynamic_embedding_path else None
        self.model_path = model_path

    @classmethod
    def from_data_dir(cls, data_dir: PathLike, **kwargs: Any) -> "FlameModel":
        """Find the model (flame2023.pkl, flame2023_Open.pkl, generic_model.pkl or FLAME_NEUTRAL.pkl) and the
        embeddings in ``data_dir``; missing files raise FileNotFoundError saying where to get them."""
        data_dir = Path(data_dir)
        model = _find_file(data_dir, MODEL_FILENAMES)
        if model is None:
            raise FileNotFoundError(f"no FLAME model in {data_dir} (looked for {', '.join(MODEL_FILENAMES)}). "
                                    f"{_WHERE}")
        static = data_dir / STATIC_EMBEDDING
        if not static.is_file():
            raise FileNotFoundError(f"{static} not found: the landmark embedding ships with the FLAME download "
                                    f"({FLAME_URL}); copy {STATIC_EMBEDDING} next to {model.name} in {data_dir}")
        dyn = data_dir / DYNAMIC_EMBEDDING
        return cls(model, static, dyn if dyn.is_file() else None, **kwargs)

    # ---------------------------------------------------------------- properties
    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[0]

    def _smplx(self, params: FlameParams):
        T = params.num_frames
        dev, dt = self.v_template.device, self.v_template.dtype
        p = params.to(device=dev, dtype=dt)
        zeros = torch.zeros(T, 3, dtype=dt, device=dev)
        return self.flame(betas=p.shape.expand(T, -1), expression=p.expression, global_orient=zeros,
                          neck_pose=p.neck, jaw_pose=p.jaw, leye_pose=p.eyes[:, :3], reye_pose=p.eyes[:, 3:],
                          transl=zeros, return_verts=True)

    def canonical_vertices(self, params: FlameParams) -> Tensor:
        """(T,V,3) model-space vertices: shape, expression, neck/jaw/eyes pose; no global pose."""
        return self._smplx(params).vertices

    def model_space(self, params: FlameParams) -> tuple[Tensor, Tensor]:
        """(vertices (T,V,3), joints (T,5,3)) in model space."""
        out = self._smplx(params)
        return out.vertices, out.joints[:, :NUM_JOINTS]

    def model_to_world(self, params: FlameParams) -> Tensor:
        """(T,4,4) model-to-world, resolving VHAP's root-joint pivot when needed."""
        root = self.model_space(params)[1][:, 0] if params.rotate_about_root else None
        return params.to(self.v_template.device).model_to_world(root)

    def bake_root_pivot(self, params: FlameParams) -> FlameParams:
        """Return equivalent params with ``rotate_about_root=False`` (pivot folded into the translation)."""
        if not params.rotate_about_root:
            return params
        M = self.model_to_world(params)
        return replace(params.to(self.v_template.device), translation=M[:, :3, 3].detach().clone(),
                       rotate_about_root=False)

    def forward(self, params: FlameParams) -> Tensor:
        """(T,V,3) WORLD-space vertices: FLAME with zero global rotation, then [scale*R | t]."""
        verts, joints = self.model_space(params)
        M = params.to(device=verts.device, dtype=verts.dtype).model_to_world(
            joints[:, 0] if params.rotate_about_root else None)
        return verts @ M[:, :3, :3].transpose(1, 2) + M[:, None, :3, 3]

    def landmarks(self, vertices: Tensor) -> Tensor:
        """(..., V, 3) vertices -> (..., L, 3) static landmarks (51 for FLAME) by barycentric interpolation."""
        if not self.has_landmarks:
            raise RuntimeError(f"no static landmark embedding was given for {self.model_path}")
        tri = self.faces[self.lmk_faces_idx]  # (L,3)
        corners = vertices[..., tri, :]  # (..., L, 3, 3)
        return (corners * self.lmk_bary_coords.to(vertices.dtype)[..., None]).sum(-2)


class FlameSubset(nn.Module):
    """FLAME's forward for a subset of its vertices (e.g. the face mask): FlameParams (T frames) -> (T, M, 3).

    The maths of smplx's ``lbs`` (checked against :class:`FlameModel` in tests/test_flame.py) on the M subset rows
    only, with the joints regressed through precomputed (5, 3, K) regressions of the shape and expression
    blendshapes.  Written out rather than calling smplx because smplx's ``lbs`` walks the kinematic chain by indexing
    a Python list with device tensors (one host synchronisation per joint on a GPU, which also rules out CUDA-graph
    capture) and always poses every vertex and the landmarks; the per-frame animation path (models/posing.py)
    needs neither.  Built from a FlameModel's smplx buffers, so both use the same model data.
    """

    def __init__(self, flame: FlameModel, vertex_ids: Union[np.ndarray, Tensor, Sequence[int]]) -> None:
        super().__init__()
        fl = flame.flame
        ids = torch.as_tensor(np.asarray(vertex_ids), dtype=torch.long, device=fl.v_template.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= flame.num_vertices):
            raise ValueError(f"FlameSubset: vertex ids must lie in [0, {flame.num_vertices}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        V = flame.num_vertices
        jr = fl.J_regressor  # (5, V) dense in smplx
        self.register_buffer("template", fl.v_template[ids].clone(), persistent=False)  # (M, 3)
        self.register_buffer("shapedirs", fl.shapedirs[ids].clone(), persistent=False)  # (M, 3, 300)
        self.register_buffer("exprdirs", fl.expr_dirs[ids].clone(), persistent=False)  # (M, 3, 100)
        self.register_buffer("posedirs", fl.posedirs.view(-1, V, 3)[:, ids].reshape(fl.posedirs.shape[0], -1).clone(),
                             persistent=False)  # (36, M * 3)
        self.register_buffer("weights", fl.lbs_weights[ids].clone(), persistent=False)  # (M, 5)
        self.register_buffer("j_template", jr @ fl.v_template, persistent=False)  # (5, 3)
        self.register_buffer("j_shapedirs", torch.einsum("jv,vck->jck", jr, fl.shapedirs), persistent=False)
        self.register_buffer("j_exprdirs", torch.einsum("jv,vck->jck", jr, fl.expr_dirs), persistent=False)
        self.parents = [int(p) for p in fl.parents.tolist()]  # constant kinematic tree, on the host
        # parents of joints 1.. as a device index (indexing with a Python list would copy it to the device per call)
        self.register_buffer("parent_index", torch.tensor(self.parents[1:], dtype=torch.long,
                                                          device=ids.device), persistent=False)
        self.num_vertices = int(ids.numel())

    def model_space(self, params: FlameParams) -> tuple[Tensor, Tensor]:
        """(vertices (T, M, 3), posed joints (T, 5, 3)) in FLAME model space (zero global rotation)."""
        dt = self.template.dtype
        beta = params.shape.to(dt)  # (1, 300)
        psi = params.expression.to(dt)  # (T, 100)
        T = psi.shape[0]
        v = (self.template + torch.einsum("bk,mck->bmc", beta, self.shapedirs)
             + torch.einsum("tk,mck->tmc", psi, self.exprdirs))  # (T, M, 3)
        J = (self.j_template + torch.einsum("bk,jck->bjc", beta, self.j_shapedirs)
             + torch.einsum("tk,jck->tjc", psi, self.j_exprdirs))  # (T, 5, 3)
        pose = torch.stack([torch.zeros_like(params.neck), params.neck, params.jaw, params.eyes[:, :3],
                            params.eyes[:, 3:]], dim=1).to(dt)  # (T, 5, 3) axis-angle, global rotation zero
        rot = axis_angle_to_matrix(pose)  # (T, 5, 3, 3)
        eye = torch.eye(3, dtype=dt, device=rot.device)
        v = v + ((rot[:, 1:] - eye).reshape(T, -1) @ self.posedirs).view(T, -1, 3)  # pose blendshapes
        # kinematic chain: world transform of each joint, then relative to its rest position (smplx's A)
        rel = torch.cat([J[:, :1], J[:, 1:] - J.index_select(1, self.parent_index)], dim=1)  # (T, 5, 3)
        chain: list[tuple[Tensor, Tensor]] = []
        for j, parent in enumerate(self.parents):
            if parent < 0:
                chain.append((rot[:, j], rel[:, j]))
            else:
                Rp, tp = chain[parent]
                chain.append((Rp @ rot[:, j], tp + (Rp @ rel[:, j, :, None])[..., 0]))
        Rj = torch.stack([c[0] for c in chain], dim=1)  # (T, 5, 3, 3)
        tj = torch.stack([c[1] for c in chain], dim=1)  # (T, 5, 3) posed joints
        ta = tj - (Rj @ J[..., None])[..., 0]  # translation of the rest-relative transforms
        Rv = torch.einsum("mj,tjab->tmab", self.weights, Rj)  # blended per vertex (T, M, 3, 3)
        tv = torch.einsum("mj,tja->tma", self.weights, ta)
        return (Rv @ v[..., None])[..., 0] + tv, tj

    def forward(self, params: FlameParams) -> Tensor:
        """(T, M, 3) WORLD-space vertices of the subset: FLAME, then [scale * R | t] (VHAP's root pivot resolved)."""
        verts, joints = self.model_space(params)
        M = params.to(device=verts.device, dtype=verts.dtype).model_to_world(
            joints[:, 0] if params.rotate_about_root else None)
        return verts @ M[:, :3, :3].transpose(1, 2) + M[:, None, :3, 3]
