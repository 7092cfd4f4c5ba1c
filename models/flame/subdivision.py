"""Midpoint subdivision of a triangle mesh, recorded once as a :class:`SubdivisionPlan` and then applied to
batched vertices (torch, differentiable) or as a sparse matrix.  Each level's vertices are a prefix of the next."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


@dataclass
class SubdivisionPlan:
    """Midpoint subdivision recorded as, per level, the (E_l, 2) vertex pairs whose midpoints are appended.

    Level l+1 vertices = concat(level-l vertices, mean of the pairs): the prefix property by construction."""

    num_base_vertices: int
    edges: list  # list of (E_l, 2) int64 arrays
    faces: list  # faces at levels 0..L, each (F_l, 3) int64

    @property
    def levels(self) -> int:
        return len(self.edges)

    def num_vertices(self, level: int) -> int:
        return self.num_base_vertices + sum(len(e) for e in self.edges[:level])

    def to(self, device: Union[str, torch.device]) -> "SubdivisionPlan":
        """The plan with its edge pairs as index tensors on ``device`` (no host copy per subdivide_vertices call)."""
        return SubdivisionPlan(self.num_base_vertices, [torch.as_tensor(e, device=device) for e in self.edges],
                               self.faces)


def subdivide(verts: np.ndarray, faces: np.ndarray, levels: int, return_plan: bool = False):
    """Midpoint subdivision with trimesh, ``levels`` times.

    Returns a list of ``levels`` (verts (V_l,3), faces (F_l,3)) for levels 1..L (and the
    :class:`SubdivisionPlan` if ``return_plan``).  Each level's vertices are a prefix of the next (checked).
    """
    import trimesh  # here, not at the top: importing trimesh takes ~0.5 s, and only building a plan needs it

    v = np.asarray(verts, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    out, edges, all_faces = [], [], [f]
    for _ in range(levels):
        nv, fv = trimesh.remesh.subdivide(v, f)
        fv = np.asarray(fv, dtype=np.int64)
        if not np.array_equal(nv[: len(v)], v):
            raise RuntimeError("trimesh subdivision broke the prefix property")
        # trimesh writes each old face (a,b,c) as [a,m_ab,m_ca],[m_ab,b,m_bc],[m_ca,m_bc,c],[m_ab,m_bc,m_ca]
        q = fv.reshape(-1, 4, 3)
        mid = np.concatenate([q[:, 3, 0], q[:, 3, 1], q[:, 3, 2]])
        ends = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        pairs = np.zeros((len(nv) - len(v), 2), dtype=np.int64)
        pairs[mid - len(v)] = ends
        if not np.allclose(v[pairs].mean(1), nv[len(v):]):
            raise RuntimeError("could not recover trimesh's subdivision edges (trimesh version changed?)")
        edges.append(pairs)
        v, f = nv, fv
        out.append((v, f))
        all_faces.append(f)
    plan = SubdivisionPlan(len(np.asarray(verts)), edges, all_faces)
    return (out, plan) if return_plan else out


def make_subdivision_plan(num_verts: int, faces: np.ndarray, levels: int) -> SubdivisionPlan:
    """Subdivision plan of a mesh topology (positions do not matter; random ones are used)."""
    rng = np.random.default_rng(0)
    return subdivide(rng.standard_normal((num_verts, 3)), faces, levels, return_plan=True)[1]


def subdivide_vertices(verts: Tensor, plan: SubdivisionPlan, level: Optional[int] = None) -> Tensor:
    """Apply a plan to batched vertices: (..., V0, 3) -> (..., V_level, 3); differentiable, any device."""
    level = plan.levels if level is None else level
    if verts.shape[-2] != plan.num_base_vertices:
        raise ValueError(f"verts has {verts.shape[-2]} vertices, the plan expects {plan.num_base_vertices}")
    for e in plan.edges[:level]:
        idx = torch.as_tensor(e, device=verts.device)
        mid = 0.5 * (verts.index_select(-2, idx[:, 0]) + verts.index_select(-2, idx[:, 1]))
        verts = torch.cat([verts, mid], dim=-2)
    return verts


def subdivision_matrix(plan: SubdivisionPlan, level: Optional[int] = None) -> sp.csr_matrix:
    """(V_level, V0) sparse matrix S with subdivided = S @ base vertices."""
    level = plan.levels if level is None else level
    S = sp.identity(plan.num_base_vertices, format="csr")
    for e in plan.edges[:level]:
        n = S.shape[0]
        rows = np.repeat(np.arange(len(e)), 2)
        A = sp.csr_matrix((np.full(2 * len(e), 0.5), (rows, e.reshape(-1))), shape=(len(e), n))
        S = sp.vstack([S, A @ S]).tocsr()
    return S

