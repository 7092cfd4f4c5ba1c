"""Small geometry helpers shared by fitting, exports, interpolation and animation: similarity (Umeyama) fits, head
pose, rotations about an axis, orbit cameras, a uniform mesh Laplacian, the mean edge length and vertex normals."""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.camera import Camera


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


def safe_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit vectors along the last dim; finite gradients even for zero vectors."""
    return x * x.square().sum(-1, keepdim=True).clamp_min(eps * eps).rsqrt()


def _summed_face_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """verts (..., V, 3), faces (F, 3) long -> (..., V, 3): per vertex, the sum of its faces' normals, each as long as
    twice the face's area (so the sum is area-weighted)."""
    v0, v1, v2 = verts[..., faces[:, 0], :], verts[..., faces[:, 1], :], verts[..., faces[:, 2], :]
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)  # (..., F, 3), length = 2 * area -> area weighting for free
    n = torch.zeros_like(verts)
    for i in range(3):  # three corners, not a loop over vertices
        n = n.index_add(-2, faces[:, i], fn)
    return n


# Two area-weighted normals, the same up to rounding: they normalise differently (x / |x| vs x * rsqrt(|x|^2)), which
# changes the last bit of ~60 % of the normals, and each call site's bits must stay as they are.
def vertex_normals(verts: Tensor, faces: Union[Tensor, np.ndarray]) -> Tensor:
    """Area-weighted unit vertex normals: verts (..., V, 3), faces (F,3) (numpy or torch) -> (..., V, 3).

    Winding is FLAME's (counter-clockwise seen from outside), so normals point out of the head.  Normalised with
    ``F.normalize``: the numbers the synthetic datasets (utils/data/synthetic/render.py) are generated with."""
    f = torch.as_tensor(np.asarray(faces) if not isinstance(faces, Tensor) else faces, device=verts.device).long()
    return F.normalize(_summed_face_normals(verts, f), dim=-1, eps=1e-12)


def area_weighted_vertex_normals(verts: Tensor, faces: Tensor) -> Tensor:
    """verts (..., V, 3), faces (F, 3) long -> unit normals (..., V, 3), each the area-weighted mean of its faces'.

    Normalised with :func:`safe_normalize` (finite gradients for a zero normal): the numbers the identity field
    (models/identity_field.py) is trained with."""
    return safe_normalize(_summed_face_normals(verts, faces))
