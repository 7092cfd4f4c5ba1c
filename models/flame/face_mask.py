"""FLAME's face mask: the mask vertex ids, the masked submesh, and the triangles that close the mouth.

The face mask is the vertex ids of ``FLAME_mask_vertexID.npy`` or else the union of the ``FACE_MASK_REGIONS`` of
``FLAME_masks.pkl``: face, lips, nose, eyeballs and eye regions (the scalp, ears, neck and boundary regions are left
out).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from models.flame.files import FLAME_URL, MASK_VERTEX_IDS, MASKS_PKL, PathLike, load_pickle_no_chumpy
from models.flame.layer import FlameModel

# FLAME_masks.pkl regions whose union is the face mask (the scalp, ears, neck and boundary regions are left out).
FACE_MASK_REGIONS = ("face", "lips", "nose", "left_eyeball", "right_eyeball", "left_eye_region", "right_eye_region")


def load_face_mask(data_dir: PathLike) -> np.ndarray:
    """Face-mask vertex ids (sorted unique int64) from ``FLAME_mask_vertexID.npy`` or the union of the
    ``FACE_MASK_REGIONS`` of ``FLAME_masks.pkl`` in ``data_dir``."""
    data_dir = Path(data_dir)
    npy = data_dir / MASK_VERTEX_IDS
    if npy.is_file():
        try:
            ids = np.load(npy, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{npy}: could not read the face-mask vertex ids ({exc})") from exc
        ids = np.asarray(ids).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{npy}: expected integer vertex ids, found dtype {ids.dtype}")
        return np.unique(ids.astype(np.int64))
    pkl = data_dir / MASKS_PKL
    if pkl.is_file():
        masks = load_pickle_no_chumpy(pkl)
        missing = [r for r in FACE_MASK_REGIONS if not isinstance(masks, dict) or r not in masks]
        if missing:
            raise ValueError(f"{pkl}: missing region(s) {missing}; expected the FLAME_masks.pkl of {FLAME_URL}")
        return np.unique(np.concatenate([np.asarray(masks[r]).reshape(-1) for r in FACE_MASK_REGIONS]).astype(np.int64))
    raise FileNotFoundError(f"no face mask in {data_dir}: expected {MASK_VERTEX_IDS} (vertex ids) or {MASKS_PKL} "
                            f"(FLAME vertex masks, from {FLAME_URL}); put one of them in {data_dir}")


def face_mask_submesh(vertices: Union[np.ndarray, Tensor], faces: Union[np.ndarray, Tensor],
                      mask_ids: np.ndarray, extra_faces: Optional[np.ndarray] = None):
    """Cut the face mask out of a FLAME mesh.

    vertices (..., V, 3) numpy or torch; faces (F,3); mask_ids (M,) vertex ids.  Keeps the triangles whose
    three vertices are all in the mask (plus ``extra_faces``, given in original vertex ids, e.g. from
    :func:`mouth_closing_faces`).  New vertex i is old vertex ``mask_ids[i]``: vertices are re-indexed in the
    order of ``mask_ids`` (sorted ids from :func:`load_face_mask`) and every mask vertex is kept.
    Returns (verts (..., M, 3), faces (F',3) int64 numpy, kept_ids (M,) = mask_ids as int64).
    """
    ids = np.asarray(mask_ids, dtype=np.int64).reshape(-1)
    f = faces.detach().cpu().numpy() if isinstance(faces, Tensor) else np.asarray(faces)
    f = f.astype(np.int64)
    nv = vertices.shape[-2]
    if ids.size and (ids.min() < 0 or ids.max() >= nv):
        raise ValueError(f"mask vertex id {int(ids.max())} out of range for a mesh with {nv} vertices "
                         "(mask file for another FLAME version?)")
    if np.unique(ids).size != ids.size:
        raise ValueError("mask_ids contains duplicates")
    remap = np.full(nv, -1, dtype=np.int64)
    remap[ids] = np.arange(ids.size)
    if extra_faces is not None and len(extra_faces):
        f = np.concatenate([f, np.asarray(extra_faces, dtype=np.int64).reshape(-1, 3)])
    keep = (remap[f] >= 0).all(axis=1)
    new_faces = remap[f[keep]]
    if isinstance(vertices, Tensor):
        verts = vertices.index_select(-2, torch.as_tensor(ids, device=vertices.device))
    else:
        verts = np.asarray(vertices)[..., ids, :]
    return verts, new_faces, ids


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a triangle mesh, each (n,) vertex ids in the direction of the faces' edges."""
    f = np.asarray(faces, dtype=np.int64)
    directed = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    keys = np.sort(directed, axis=1)
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    bnd = directed[counts[inv.reshape(-1)] == 1]
    nxt: dict[int, list[int]] = {}
    for a, b in bnd:
        nxt.setdefault(int(a), []).append(int(b))
    loops, used = [], set()
    for start in list(nxt):
        for _ in range(len(nxt[start])):
            if (start, nxt[start][0]) in used and all((start, b) in used for b in nxt[start]):
                break
            loop, cur = [start], start
            while True:
                cands = [b for b in nxt.get(cur, []) if (cur, b) not in used]
                if not cands:
                    break
                b = cands[0]
                used.add((cur, b))
                if b == start:
                    break
                loop.append(b)
                cur = b
            if len(loop) >= 3:
                loops.append(np.array(loop, dtype=np.int64))
    return loops


def close_loop(loop: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Triangulate a hole without new vertices: a zig-zag strip starting at the loop vertex farthest from
    the loop centroid (a mouth corner), which suits slit-like holes.  Winding is opposite to the loop
    direction so the closing faces agree with the surrounding faces.  Returns (n-2, 3) int64."""
    loop = np.asarray(loop, dtype=np.int64)
    p = np.asarray(vertices)[loop]
    s = int(np.argmax(np.linalg.norm(p - p.mean(0), axis=1)))
    ring = np.roll(loop, -s)  # starts at the corner
    n = len(ring)
    tris, i, j = [], 0, n - 1  # two fronts walking towards each other
    while j - i > 1:
        if (i + (n - 1 - j)) % 2 == 0:
            tris.append((ring[i], ring[j], ring[i + 1]))
            i += 1
        else:
            tris.append((ring[i], ring[j], ring[j - 1]))
            j -= 1
    return np.array(tris, dtype=np.int64).reshape(-1, 3)


def mouth_closing_faces(vertices: np.ndarray, faces: np.ndarray, lip_vertex_ids: np.ndarray) -> np.ndarray:
    """Faces (original vertex ids) that close FLAME's open mouth: every boundary loop of the full mesh whose
    vertices all lie in ``lip_vertex_ids`` (the ``lips`` region of FLAME_masks.pkl) is triangulated with
    :func:`close_loop`.  Returns (K,3) int64 (empty, with a warning, if no such loop exists)."""
    lips = set(np.asarray(lip_vertex_ids).reshape(-1).tolist())
    out = [close_loop(lp, vertices) for lp in boundary_loops(faces) if all(int(v) in lips for v in lp)]
    if not out:
        warnings.warn("mouth_closing_faces: no boundary loop lies entirely in the lip region; nothing closed")
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(out)


def face_mask_topology(flame: FlameModel, data_dir: PathLike,
                       close_mouth: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The face-mask mesh topology shared by preprocessing and the network (one definition for both).

    Mask vertex ids from :func:`load_face_mask`; when ``close_mouth`` and ``FLAME_masks.pkl`` (with its ``lips``
    region) is in ``data_dir``, the triangles closing the mouth, computed on the template so that every subject gets
    the same topology.  Mask vertices used by no triangle are dropped (they would carry no surface).
    Returns (mask_ids (M,) FLAME vertex ids: new vertex i = FLAME vertex mask_ids[i], faces (F, 3) over the M).
    """
    data_dir = Path(data_dir)
    mask_ids = load_face_mask(data_dir)
    faces = flame.faces.cpu().numpy()
    extra = None
    pkl = data_dir / MASKS_PKL
    if close_mouth and pkl.is_file():
        regions = load_pickle_no_chumpy(pkl)
        if isinstance(regions, dict) and "lips" in regions:
            extra = mouth_closing_faces(flame.v_template.cpu().numpy(), faces, np.asarray(regions["lips"]).reshape(-1))
    _, mask_faces, ids = face_mask_submesh(flame.v_template.cpu().numpy(), faces, mask_ids, extra_faces=extra)
    used = np.zeros(len(ids), bool)
    used[mask_faces.reshape(-1)] = True
    if not used.all():
        keep = np.nonzero(used)[0]
        remap = np.full(len(ids), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        ids, mask_faces = ids[keep], remap[mask_faces]
    return ids, mask_faces

