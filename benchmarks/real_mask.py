"""A stand-in face mask with the real FLAME mask's size, for benchmarks that must count exactly as real data does.

The real FLAME face mask (FLAME_masks.pkl "face", mouth closed) has 3,007 vertices, 8,832 edges and 5,828 triangles,
so midpoint subdivision gives 11,839 / 46,987 / 187,219 Gaussians at levels 1 / 2 / 3.  The synthetic FLAME's
mask is smaller (33,825 at level 2), so speed measured on it is optimistic.  This module builds a mesh with
exactly the real counts: a 43 x 43 triangulated grid with two interior vertices removed (1,847 V, 5,364 E,
3,516 F: the face sheet with two eye holes) plus two UV spheres of 34 segments x 18 rings (580 V, 1,734 E,
1,156 F each: the eyeballs).  Its vertices are embedded on the synthetic mask's surface (closest point,
barycentric weights, plus a constant offset for the spheres), so each identity's real-size mask follows that
identity's synthetic geometry and covers the same pixels.

Only the counts and the screen coverage are real; the mesh is not FLAME's, so it serves speed and memory figures,
not quality ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# counts of FLAME's face mask (checked by tests/test_real_mask.py through midpoint subdivision)
REAL_MASK_COUNTS = {"vertices": 3007, "edges": 8832, "faces": 5828}
REAL_MASK_GAUSSIANS = {0: 3007, 1: 11839, 2: 46987, 3: 187219}

_GRID = 43               # grid vertices per side of the face sheet
_SPHERE_SEGMENTS = 34    # longitude segments of each eyeball
_SPHERE_RINGS = 18       # latitude rings of each eyeball (17 vertex rings + 2 poles)


def _grid_sheet(n: int, holes: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(n*n - len(holes), 2) uv in [0, 1]^2 and the triangles of an n x n grid without the ``holes`` vertices."""
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    index = ii * n + jj
    tris = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = index[i, j], index[i, j + 1], index[i + 1, j], index[i + 1, j + 1]
            tris += [(a, b, d), (a, d, c)]
    tris = np.asarray(tris, dtype=np.int64)
    removed = np.asarray([i * n + j for i, j in holes])
    tris = tris[~np.isin(tris, removed).any(1)]
    keep = np.setdiff1d(np.arange(n * n), removed)
    remap = -np.ones(n * n, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    uv = np.stack([jj.ravel(), ii.ravel()], 1)[keep] / (n - 1)
    return uv.astype(np.float64), remap[tris]


def _uv_sphere(segments: int, rings: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit UV sphere: (segments*(rings-1) + 2, 3) vertices and its triangles (quads split, fans at the poles)."""
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    verts = np.concatenate([ring, [[0, 0, 1], [0, 0, -1]]])
    top, bottom = len(ring), len(ring) + 1
    idx = np.arange(len(ring)).reshape(rings - 1, segments)
    tris = []
    for r in range(rings - 2):
        for s in range(segments):
            a, b = idx[r, s], idx[r, (s + 1) % segments]
            c, d = idx[r + 1, s], idx[r + 1, (s + 1) % segments]
            tris += [(a, c, d), (a, d, b)]
    for s in range(segments):
        tris.append((top, idx[0, s], idx[0, (s + 1) % segments]))
        tris.append((bottom, idx[-1, (s + 1) % segments], idx[-1, s]))
    return verts, np.asarray(tris, dtype=np.int64)


def real_size_topology() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stand-in mask before embedding.

    Returns:
        uv: (1847, 2) face-sheet coordinates in [0, 1]^2 (x right, y down);
        sphere: (2 * 580, 3) unit-sphere directions of the two eyeballs (left first);
        faces: (5828, 3) triangles over the 3007 vertices (sheet first, then the two spheres).
    """
    c = _GRID // 2
    holes = [(int(0.4 * _GRID), c - 9), (int(0.4 * _GRID), c + 9)]
    uv, sheet = _grid_sheet(_GRID, holes)
    sv, sf = _uv_sphere(_SPHERE_SEGMENTS, _SPHERE_RINGS)
    n0 = len(uv)
    faces = np.concatenate([sheet, sf + n0, sf + n0 + len(sv)])
    return uv, np.concatenate([sv, sv]), faces


@dataclass
class RealSizeMask:
    """The stand-in mask embedded on a mesh: vertex k = sum_j bary[k, j] * verts[tri_vertices[k, j]] + offset[k].

    tri_vertices: (3007, 3) vertex ids of the host mesh; bary: (3007, 3); offset: (3007, 3) in the host's units;
    faces: (5828, 3) the stand-in's triangles.
    """

    tri_vertices: np.ndarray
    bary: np.ndarray
    offset: np.ndarray
    faces: np.ndarray

    def __call__(self, verts: Tensor) -> Tensor:
        """Host mesh vertices (..., M, 3) -> stand-in vertices (..., 3007, 3) on the same device."""
        idx = torch.as_tensor(self.tri_vertices, device=verts.device)
        w = torch.as_tensor(self.bary, dtype=verts.dtype, device=verts.device)
        off = torch.as_tensor(self.offset, dtype=verts.dtype, device=verts.device)
        return (verts[..., idx, :] * w[..., None]).sum(-2) + off


def _frontal_hits(tri: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast rays along -z from ``points`` (P, 2) (x, y) onto triangles ``tri`` (F, 3, 3); the front-most hit.

    A point that hits no triangle (a hole in the host, e.g. an eye) takes the triangle with the nearest centroid
    and clamped barycentrics.  Returns (triangle ids (P,), barycentrics (P, 3)).  Written here because trimesh's ray
    and proximity queries need the optional rtree/embree packages; P x F is small enough for plain numpy.
    """
    a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    v0, v1 = b - a, c - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    den = np.where(np.abs(den) < 1e-20, 1e-20, den)
    ids, bary = np.zeros(len(points), np.int64), np.zeros((len(points), 3))
    centroids = tri[:, :, :2].mean(1)
    for k, p in enumerate(points):
        d = p - a
        w1 = (d[:, 0] * v1[:, 1] - v1[:, 0] * d[:, 1]) / den
        w2 = (v0[:, 0] * d[:, 1] - d[:, 0] * v0[:, 1]) / den
        w = np.stack([1 - w1 - w2, w1, w2], 1)
        inside = (w >= -1e-9).all(1)
        if inside.any():
            z = (w * tri[:, :, 2]).sum(1)
            f = int(np.flatnonzero(inside)[np.argmax(z[inside])])
        else:
            f = int(np.argmin(((centroids - p) ** 2).sum(1)))
            w = np.clip(w, 0, None)
            w[f] /= max(w[f].sum(), 1e-12)
            if w[f].sum() == 0:
                w[f] = 1 / 3
        ids[k], bary[k] = f, w[f]
    return ids, bary


def embed_real_size_mask(template: np.ndarray, faces: np.ndarray, eye_radius_fraction: float = 0.08) -> RealSizeMask:
    """Embed the stand-in on a host mask (the synthetic FLAME's, in its canonical pose).

    The face sheet is laid over the host's frontal (x, y) bounding box, shrunk to 80 % so it stays on the face, and
    projected along -z onto the host's front-most surface; each eyeball is a sphere of ``eye_radius_fraction`` x the
    face width centred just behind the surface at an eye hole, attached to that surface point by constant offsets.

    Args:
        template: (M, 3) host vertices; faces: (F, 3) host triangles.
    """
    verts = np.asarray(template, np.float64)
    faces = np.asarray(faces, np.int64)
    tri = verts[faces]
    lo, hi = verts.min(0), verts.max(0)
    span, centre = hi - lo, 0.5 * (verts.min(0) + verts.max(0))
    uv, sphere, st_faces = real_size_topology()
    x = centre[0] + (uv[:, 0] - 0.5) * 0.8 * span[0]
    y = centre[1] - (uv[:, 1] - 0.5) * 0.8 * span[1]   # +y up, uv's y down
    sheet_tri, sheet_bary = _frontal_hits(tri, np.stack([x, y], 1))
    r = eye_radius_fraction * span[0]
    eye_xy = np.array([[centre[0] + s * 9 / (_GRID - 1) * 0.8 * span[0], centre[1] + 0.1 * 0.8 * span[1]]
                       for s in (-1, 1)])
    eye_tri, eye_bary = _frontal_hits(tri, eye_xy)
    half = len(sphere) // 2
    tri_ids, bary, offset = [sheet_tri], [sheet_bary], [np.zeros((len(uv), 3))]
    for e in range(2):
        # each eyeball vertex sits on the eye's surface point (its triangle and barycentrics) plus a constant offset
        tri_ids.append(np.full(half, eye_tri[e]))
        bary.append(np.repeat(eye_bary[e][None], half, 0))
        offset.append(np.array([0.0, 0.0, -1.2 * r]) + r * sphere[e * half:(e + 1) * half])
    tri_ids = np.concatenate(tri_ids)
    return RealSizeMask(faces[tri_ids], np.concatenate(bary), np.concatenate(offset), st_faces)
