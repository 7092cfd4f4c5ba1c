"""A synthetic FLAME-format head model (no real FLAME is needed for tests or the embedded dataset).

``make_flame_model(seed)`` returns a dict with the keys and shape semantics of FLAME 2023 (300 shape and
100 expression components, 5 joints, the face-mask and landmark files) on a coarse mesh (~2.9k vertices): a head built by ray-marching a smooth implicit surface (an
ellipsoid skull merged with a neck cylinder, nose, brows, cheeks, lips, chin and ear bumps, eye sockets)
from an icosphere, with FLAME-like openings (mouth slit, two eye holes, open neck bottom) and two separate
eyeball spheres like FLAME.  Metres, FLAME axes: y up, +z the direction the face looks; the subject's left
is +x (FLAME joint 3 = left eye).  Joints: 0 global (neck base), 1 neck, 2 jaw, 3 left eye, 4 right eye.

``write_flame_files(out_dir, model)`` writes the real file formats: flame2023.pkl (its ``shapedirs`` is
pickled exactly as a chumpy ``Ch`` object so the chumpy-free loader is exercised), flame_static_embedding.pkl,
flame_dynamic_embedding.npy, FLAME_mask_vertexID.npy and FLAME_masks.pkl.
"""
from __future__ import annotations

import copy
import functools
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Union

import numpy as np
import scipy.sparse as sp
from models.flame import boundary_loops

PathLike = Union[str, os.PathLike]

NUM_SHAPE, NUM_EXPRESSION = 300, 100

# Canonical anchors (metres).  The skull ellipsoid is centred at HEAD_C.
HEAD_C = np.array([0.0, 0.085, 0.0])
HEAD_AXES = np.array([0.076, 0.105, 0.095])
NECK_AXIS_Z, NECK_R, NECK_BOTTOM = -0.012, 0.052, -0.045
EYE_Y, EYE_X = 0.092, 0.032
MOUTH_Y, NOSE_Y = 0.034, 0.066
# Eyes as FLAME shapes them: almond lid openings a few millimetres high whose lids overhang eyeballs set back behind
# the lid margins, the margins rolling inwards to the eyeball (no gap to see into the head through).
EYEBALL_R = 0.0125
EYEBALL_LEVEL = 2  # icosphere level of each eyeball: 162 vertices, warped to the front (FLAME's have 546) ...
EYEBALL_FRONT = 0.5  # ... by theta -> theta - 0.5 sin(theta): twice the density at the cornea (what is ever seen),
#                      as dense there as FLAME's eyeballs, 2/3 of it at the back (hidden Gaussians cost training time)
EYE_OPEN = (0.0125, 0.0038)  # half-width, half-height of the lid opening (25 x 7.6 mm)
EYE_TILT = 0.08  # canthal tilt: the lateral corner sits higher (dy per dx, metres per metre)
LID_T = 0.003  # lid thickness over the eyeball: the margins stand about 2.5 mm in front of the eyeball's apex
LID_MARGIN = 0.0012  # radial thickness of the lid margin before it rolls back onto the eyeball
EYE_PATCH = (0.021, 0.015)  # half-axes of the structured skin patch that carries each eye opening
# Mouth: lips that meet at rest along a slit, roll into the mouth, and part when the jaw opens; FLAME's mouth hole is
# the loop where the rolled-in lips end, deep behind them (the face mask's closing triangles close it).
MOUTH_HALF_W, MOUTH_GAP = 0.024, 0.0006  # half-width of the lip line, half of the gap between the lips at rest
LIP_ROLL = (0.003, 0.009)  # depths behind the lip margin of the two rings of the rolled-in lips
MOUTH_PATCH = (0.034, 0.016)  # half-axes of the structured skin patch that carries the mouth


# ============================================================================ geometry helpers
def _icosphere(level: int) -> tuple[np.ndarray, np.ndarray]:
    import trimesh
    m = trimesh.creation.icosphere(subdivisions=level, radius=1.0)
    return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)


def _front_z(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """z of the skull ellipsoid's front surface at (x, y) (used to place feature anchors)."""
    u = 1 - ((x - HEAD_C[0]) / HEAD_AXES[0]) ** 2 - ((y - HEAD_C[1]) / HEAD_AXES[1]) ** 2
    return HEAD_C[2] + HEAD_AXES[2] * np.sqrt(np.clip(u, 0.0, None))


def _anchor(x: float, y: float, dz: float = 0.0) -> np.ndarray:
    return np.array([x, y, float(_front_z(np.array(x), np.array(y))) + dz])


def _gauss(p: np.ndarray, c: np.ndarray, s) -> np.ndarray:
    d = (p - c) / np.asarray(s, dtype=np.float64)
    return np.exp(-0.5 * (d ** 2).sum(-1))


def _features() -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(centre, sigma xyz, amplitude) of the bumps (+) and dents (-) of the canonical face."""
    ex = HEAD_AXES[0]
    f = [
        (_anchor(0, NOSE_Y + 0.004), [0.010, 0.022, 0.02], 0.020),   # nose ridge
        (_anchor(0, NOSE_Y - 0.008), [0.012, 0.009, 0.02], 0.010),   # nose tip
        (_anchor(0, 0.112), [0.045, 0.008, 0.03], 0.005),            # brow ridge
        (_anchor(EYE_X, EYE_Y), [0.014, 0.010, 0.03], -0.010),       # eye sockets
        (_anchor(-EYE_X, EYE_Y), [0.014, 0.010, 0.03], -0.010),
        (_anchor(0.043, 0.058), [0.015, 0.015, 0.03], 0.005),        # cheeks
        (_anchor(-0.043, 0.058), [0.015, 0.015, 0.03], 0.005),
        (_anchor(0, MOUTH_Y), [0.022, 0.010, 0.03], 0.007),          # lips
        (_anchor(0, 0.004), [0.018, 0.010, 0.03], 0.007),            # chin
        (np.array([ex, 0.082, -0.008]), [0.02, 0.026, 0.014], 0.012),  # ears
        (np.array([-ex, 0.082, -0.008]), [0.02, 0.026, 0.014], 0.012),
    ]
    return [(np.asarray(c, float), np.asarray(s, float), a) for c, s, a in f]


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two signed distances (polynomial smooth minimum, blend width k)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0, 1)
    return b * (1 - h) + a * h - k * h * (1 - h)


def _implicit(p: np.ndarray, lids: bool = True) -> np.ndarray:
    """Approximate signed distance (negative inside) of the canonical head with closed eyelids, p (N,3).

    ``lids``: include the eyelid shells (spheres LID_T thicker than the eyeballs) that the lid openings are cut into.
    """
    q = (p - HEAD_C) / HEAD_AXES
    d_head = (np.linalg.norm(q, axis=-1) - 1.0) * HEAD_AXES.min()
    r = np.hypot(p[:, 0], p[:, 2] - NECK_AXIS_Z)
    d_neck = np.maximum(np.maximum(r - NECK_R, p[:, 1] - 0.06), NECK_BOTTOM - 0.015 - p[:, 1])
    d = _smin(d_head, d_neck, 0.02)  # the neck blends into the skull
    for c, s, a in _features():
        d = d - a * _gauss(p, c, s)
    if lids:
        for c in eye_centres():
            d = _smin(d, np.linalg.norm(p - c, axis=-1) - (EYEBALL_R + LID_T), 0.003)
    return d


def _ray_march(dirs: np.ndarray, origin: np.ndarray, t_max: float = 0.30, fn=None) -> np.ndarray:
    """First surface crossing along origin + t * dir of the implicit ``fn`` (default :func:`_implicit`), from inside
    or outside; dirs (N,3) unit, origin (3,) or (N,3): (N,3) surface points."""
    fn = _implicit if fn is None else fn
    origin = np.broadcast_to(origin, dirs.shape)
    ts = np.linspace(0.0, t_max, 301)
    pts = origin[:, None, :] + ts[None, :, None] * dirs[:, None, :]
    outside = fn(pts.reshape(-1, 3)).reshape(len(dirs), len(ts)) > 0
    first = np.argmax(outside != outside[:, :1], axis=1)  # first sample on the other side
    lo, hi = ts[np.maximum(first - 1, 0)], ts[first]
    for _ in range(22):  # bisection refines the crossing
        mid = 0.5 * (lo + hi)
        crossed = (fn(origin + mid[:, None] * dirs) > 0) != outside[:, 0]
        hi = np.where(crossed, mid, hi)
        lo = np.where(crossed, lo, mid)
    return origin + 0.5 * (lo + hi)[:, None] * dirs


def _surface_at(xy: np.ndarray) -> np.ndarray:
    """Front surface points of the head (closed lids) above the (x, y) positions xy (N,2): marched along -z."""
    origins = np.c_[xy, np.full(len(xy), 0.25)]
    dirs = np.tile([0.0, 0.0, -1.0], (len(xy), 1))
    return _ray_march(dirs, origins, t_max=0.25)


def _remove_faces(verts: np.ndarray, faces: np.ndarray, drop: np.ndarray):
    faces = faces[~drop]
    used = np.unique(faces)
    remap = np.full(len(verts), -1, np.int64)
    remap[used] = np.arange(len(used))
    return verts[used], remap[faces], used


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@functools.lru_cache(maxsize=1)
def _eye_centres_cached() -> tuple[tuple[float, float, float], ...]:
    out = []
    for sx in (1.0, -1.0):  # left eye (+x) first: FLAME joint 3
        skin = _ray_march(np.array([[0.0, 0.0, -1.0]]), np.array([sx * EYE_X, EYE_Y, 0.25]), 0.25,
                          functools.partial(_implicit, lids=False))[0]
        # the closed lid shell stands 2 mm proud of the socket's skin
        z = skin[2] + 0.002 - (EYEBALL_R + LID_T)
        out.append((sx * EYE_X, EYE_Y, float(z)))
    return tuple(out)


def eye_centres() -> np.ndarray:
    """(2, 3) canonical eyeball centres (left eye, +x, first)."""
    return np.array(_eye_centres_cached())


# ============================================================================ the model
def _eye_margin(theta: np.ndarray, sx: float) -> np.ndarray:
    """(N,2) points of the almond lid margin of eye ``sx`` (+1 left) at angles theta (N,)."""
    u, w = np.cos(theta), np.sin(theta)
    x = sx * EYE_X + EYE_OPEN[0] * u
    y = EYE_Y + EYE_OPEN[1] * w * (1 - 0.4 * u * u) + EYE_TILT * sx * EYE_OPEN[0] * u  # pointed, tilted corners
    return np.stack([x, y], 1)


def _mouth_margin(theta: np.ndarray) -> np.ndarray:
    """(N,2) points of the lip margin (the slit between the lips at rest) at angles theta (N,)."""
    u, w = np.cos(theta), np.sin(theta)
    return np.stack([MOUTH_HALF_W * u, MOUTH_Y + MOUTH_GAP * w], 1)


def _quad_strip(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Faces between two closed rings of equal length (vertex ids), oriented so that the outer ring's edges run
    against the ring direction (the way the surrounding faces' boundary loop runs along it)."""
    o1, i1 = np.roll(outer, -1), np.roll(inner, -1)
    return np.concatenate([np.stack([o1, outer, inner], 1), np.stack([o1, inner, i1], 1)])


def _doubling_strip(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Faces between a closed ring of n vertices and one of 2n (inner[2j] beside outer[j]); orientation as
    :func:`_quad_strip`."""
    n = len(outer)
    j = np.arange(n)
    o0, o1 = outer, outer[(j + 1) % n]
    i0, i1, i2 = inner[2 * j], inner[2 * j + 1], inner[(2 * j + 2) % (2 * n)]
    return np.concatenate([np.stack([o1, o0, i1], 1), np.stack([o0, i0, i1], 1), np.stack([o1, i1, i2], 1)])


def _ring_patch(v: np.ndarray, faces: np.ndarray, centre: np.ndarray, axes: tuple[float, float], margin_fn,
                ledge_fn) -> tuple[np.ndarray, np.ndarray, dict]:
    """Replace the front mesh inside the ellipse (centre (2,), axes) by rings from the cut's boundary loop to a
    margin curve (an opening), then rings rolling back behind the margin (``ledge_fn``).

    margin_fn(theta (N,)) -> (N,2) margin points; ledge_fn(margin points (N,3)) -> list of (N,3) rings behind them.
    Ring vertices lie on the head's front surface (:func:`_surface_at`).  Returns the new vertices and faces and a
    dict of the rings' vertex ids: ``outer`` (the cut's loop), ``rings`` (every ring, outside in: the margin is
    ``rings[margin_index]``), ``margin_index``, ``theta`` (angles of the margin ring), and per new vertex (in the
    order of ``rings``) ``t`` (0 at the margin and behind it, 1 at the cut) and ``vertex_theta`` (its angle).
    """

    c = v[faces].mean(1)
    inside = (((c[:, 0] - centre[0]) / axes[0]) ** 2 + ((c[:, 1] - centre[1]) / axes[1]) ** 2 < 1) & (c[:, 2] > 0.03)
    kept = faces[~inside]
    cand = []
    for lp in boundary_loops(kept):
        m = v[lp].mean(0)
        if m[2] > 0.03:
            cand.append((np.hypot(*(m[:2] - centre)), lp))
    if not cand:
        raise RuntimeError("synthetic FLAME: cutting a feature patch left no boundary loop")
    loop = min(cand, key=lambda t: t[0])[1]
    if len(np.unique(loop)) != len(loop):
        raise RuntimeError("synthetic FLAME: a feature patch's cut is not a simple loop")
    uv = (v[loop, :2] - centre) / np.asarray(axes)  # the ellipse is the unit circle here
    actual = np.arctan2(uv[:, 1], uv[:, 0])
    winding = np.angle(np.exp(1j * (np.roll(actual, -1) - actual))).sum() / (2 * np.pi)
    if abs(abs(winding) - 1) > 1e-6:
        raise RuntimeError("synthetic FLAME: a feature patch's cut does not wind once around its centre")
    turn = np.sign(winding)
    # the rings' angles: arc length along the (jagged) cut, so that they advance monotonically with the loop
    seg = np.linalg.norm(np.diff(np.r_[uv, uv[:1]], axis=0), axis=1)
    param = turn * 2 * np.pi * np.r_[0.0, np.cumsum(seg)[:-1]] / seg.sum()
    theta = param + np.angle(np.exp(1j * (actual - param)).mean())
    n = len(loop)
    th2 = np.empty(2 * n)  # the doubled rings: every loop angle and the midpoints between them
    th2[0::2] = theta
    th2[1::2] = theta + 0.5 * np.diff(np.r_[theta, theta[0] + turn * 2 * np.pi])
    ref2 = np.empty((2 * n, 2))  # outer reference points of the doubled rings
    ref2[0::2] = v[loop, :2]
    ref2[1::2] = 0.5 * (v[loop, :2] + np.roll(v[loop, :2], -1, 0))
    margin1, margin2 = margin_fn(theta), margin_fn(th2)
    new_pts, rings, ts = [], [np.asarray(loop)], []
    nv = len(v)

    thetas = []

    def add(points: np.ndarray, t: float, th: np.ndarray) -> np.ndarray:
        nonlocal nv
        ids = np.arange(nv, nv + len(points))
        nv += len(points)
        new_pts.append(points)
        ts.append(np.full(len(points), t))
        thetas.append(th)
        rings.append(ids)
        return ids

    add(_surface_at(margin1 + 0.55 * (v[loop, :2] - margin1)), 0.55, theta)
    add(_surface_at(margin2 + 0.22 * (ref2 - margin2)), 0.22, th2)
    margin_pts = _surface_at(margin2)
    add(margin_pts, 0.0, th2)
    margin_index = len(rings) - 1
    for ring in ledge_fn(margin_pts):
        add(ring, 0.0, th2)
    f_new = [_quad_strip(rings[0], rings[1]), _doubling_strip(rings[1], rings[2])]
    f_new += [_quad_strip(rings[k], rings[k + 1]) for k in range(2, len(rings) - 1)]
    v_out = np.concatenate([v] + new_pts)
    f_out = np.concatenate([kept] + f_new)
    info = {"outer": rings[0], "rings": rings[1:], "margin_index": margin_index - 1, "theta": th2,
            "t": np.concatenate(ts), "vertex_theta": np.concatenate(thetas)}
    return v_out, f_out, info


def _eye_ledges(centre: np.ndarray):
    """Rings behind an eye's lid margin: the margin's back edge, then the fold that meets the eyeball."""
    def ledges(m: np.ndarray) -> list[np.ndarray]:
        d = m - centre
        r = np.linalg.norm(d, axis=1, keepdims=True)
        d = d / r
        return [centre + (r - LID_MARGIN) * d, centre + (EYEBALL_R - 0.0004) * d]
    return ledges


def _mouth_ledges(m: np.ndarray) -> list[np.ndarray]:
    """Rings of the lips rolling into the mouth behind the lip margin m (N,3): they part slightly as they go back."""
    side = np.sign(m[:, 1] - MOUTH_Y)[:, None]
    out = []
    for depth, spread, shrink in ((LIP_ROLL[0], 0.0006, 0.97), (LIP_ROLL[1], 0.003, 0.88)):
        q = m.copy()
        q[:, 0] *= shrink
        q[:, 1] += side[:, 0] * spread
        q[:, 2] -= depth
        out.append(q)
    return out


def _build_mesh(head_level: int):
    d, faces = _icosphere(head_level)
    # concentrate vertices on the face: theta from +z is warped so the front gets ~1.6x the linear density
    theta = np.arccos(np.clip(d[:, 2], -1, 1))
    theta_w = theta - 0.4 * np.sin(theta)
    phi = np.arctan2(d[:, 1], d[:, 0])
    d = np.stack([np.sin(theta_w) * np.cos(phi), np.sin(theta_w) * np.sin(phi), np.cos(theta_w)], 1)
    origin = np.array([0.0, 0.075, -0.005])
    v = _ray_march(d, origin)
    c = v[faces].mean(1)
    v, faces, _ = _remove_faces(v, faces, c[:, 1] < NECK_BOTTOM - 0.004)  # FLAME's open neck bottom
    # the eye openings and the mouth: structured ring patches cut into the front surface
    patches = {}
    centres = eye_centres()
    for name, sx, cen in (("left_eye", 1.0, centres[0]), ("right_eye", -1.0, centres[1])):
        v, faces, patches[name] = _ring_patch(v, faces, np.array([sx * EYE_X, EYE_Y]), EYE_PATCH,
                                              functools.partial(_eye_margin, sx=sx), _eye_ledges(cen))
    v, faces, patches["mouth"] = _ring_patch(v, faces, np.array([0.0, MOUTH_Y]), MOUTH_PATCH, _mouth_margin,
                                             _mouth_ledges)
    v, faces, used = _remove_faces(v, faces, np.zeros(len(faces), bool))  # drop the vertices the patches replaced
    remap = np.full(int(used.max()) + 1, -1, np.int64)
    remap[used] = np.arange(len(used))
    for info in patches.values():
        info["outer"] = remap[info["outer"]]
        info["rings"] = [remap[r] for r in info["rings"]]
    n_skin = len(v)
    # eyeballs: separate spheres behind the lid openings, as in FLAME
    e, ef = _icosphere(EYEBALL_LEVEL)
    th = np.arccos(np.clip(e[:, 2], -1, 1))
    ph = np.arctan2(e[:, 1], e[:, 0])
    th = th - EYEBALL_FRONT * np.sin(th)
    e = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], 1)
    all_v, all_f = [v], [faces]
    for cen in centres:
        all_f.append(ef + sum(len(a) for a in all_v))
        all_v.append(cen + EYEBALL_R * e)
    verts = np.concatenate(all_v)
    faces = np.concatenate(all_f)
    eye_ids = [np.arange(n_skin, n_skin + len(e)), np.arange(n_skin + len(e), n_skin + 2 * len(e))]
    return verts, faces, n_skin, eye_ids, centres, patches


def _smooth_random_field(p: np.ndarray, rng: np.random.Generator, n_rbf: int, sigma: tuple[float, float],
                         weight: np.ndarray, centers_from: np.ndarray) -> np.ndarray:
    """Sum of random Gaussian RBFs with random 3D directions; (N,3), max norm ~1 before scaling."""
    out = np.zeros_like(p)
    for _ in range(n_rbf):
        c = centers_from[rng.integers(len(centers_from))]
        s = rng.uniform(*sigma)
        out += _gauss(p, c, s)[:, None] * rng.standard_normal(3)[None]
    out *= weight[:, None]
    m = np.abs(out).max()
    return out / m if m > 0 else out


def make_flame_model(seed: int = 0, head_level: int = 4) -> dict:
    """See :func:`_make_flame_model`; results are cached per (seed, head_level) and returned as copies."""
    return copy.deepcopy(_make_flame_model_cached(seed, head_level))


@functools.lru_cache(maxsize=4)
def _make_flame_model_cached(seed: int, head_level: int) -> dict:
    return _make_flame_model(seed, head_level)


def _make_flame_model(seed: int = 0, head_level: int = 4) -> dict:
    """Synthetic FLAME 2023-format model (plain numpy; deterministic for ``seed``).

    Keys: v_template (V,3), f (F,3) uint32, shapedirs (V,3,400) (300 shape + 100 expression), posedirs
    (V,3,36), J_regressor (5,V) scipy.sparse.csc, kintree_table (2,5), weights (V,5); plus the helpers
    ``eyeball_ids`` (2, E), ``num_skin_vertices`` used by :func:`semantic_regions` / :func:`face_regions`.
    """
    rng = np.random.default_rng(seed)
    v, f, n_skin, eye_ids, eye_centers, patches = _build_mesh(head_level)
    V = len(v)
    skin = np.zeros(V, bool)
    skin[:n_skin] = True
    x, y, z = v.T

    # ---------------- joints via a regressor: uniform weights over chosen vertex sets
    def ring(sel: np.ndarray) -> np.ndarray:
        return np.nonzero(sel)[0]

    r_neck_axis = np.hypot(x, z - NECK_AXIS_Z)
    bottom = ring(skin & (y < NECK_BOTTOM + 0.012) & (r_neck_axis < NECK_R * 1.3))
    neck_ring = ring(skin & (np.abs(y - 0.012) < 0.008) & (r_neck_axis < NECK_R * 1.3))
    ears = ring(skin & (np.abs(np.abs(x) - HEAD_AXES[0]) < 0.02) & (np.abs(y - 0.062) < 0.012)
                & (np.abs(z - 0.012) < 0.02))
    sets = [bottom, neck_ring, ears, eye_ids[0], eye_ids[1]]
    rows, cols, vals = [], [], []
    for j, ids in enumerate(sets):
        if len(ids) < 3:
            raise RuntimeError(f"synthetic FLAME: joint {j} regressor set too small ({len(ids)})")
        w = np.full(len(ids), 1.0 / len(ids))
        if j >= 3:  # eyes: the eyeball's vertices crowd at its front; weights linear in z put the joint at the centre
            dz = (v[ids, 2] - eye_centers[j - 3][2]) / EYEBALL_R
            w = 1 - dz * dz.sum() / (dz * dz).sum()
            w = w / w.sum()
        rows += [j] * len(ids)
        cols += ids.tolist()
        vals += w.tolist()
    J_regressor = sp.csc_matrix((vals, (rows, cols)), shape=(5, V))
    J = J_regressor @ v  # (5,3)

    # ---------------- skinning weights
    W = np.zeros((V, 5))
    w_jaw = (_smoothstep((MOUTH_Y - 0.002 - y) / 0.010) * _smoothstep((z - (J[2, 2] + 0.015)) / 0.035)
             * _smoothstep((y - (J[1, 1] - 0.01)) / 0.02)) * skin
    # the mouth patch: the lower lip (and its rolled-in part) follows the jaw, the upper lip stays, the corners
    # stretch; towards the patch's outer loop the weights blend into the field above
    mp = patches["mouth"]
    ids = np.concatenate(mp["rings"])
    lower = _smoothstep((0.3 - np.sin(mp["vertex_theta"])) / 0.6)
    blend = _smoothstep(mp["t"])
    w_jaw[ids] = (1 - blend) * lower * _smoothstep((z[ids] - (J[2, 2] + 0.015)) / 0.035) + blend * w_jaw[ids]
    w_global = _smoothstep((0.005 - y) / 0.04) * skin
    w_jaw = np.minimum(w_jaw, 1 - w_global)
    W[:, 0] = w_global
    W[:, 2] = w_jaw
    W[:, 1] = (1 - w_global - w_jaw) * skin
    W[eye_ids[0], 3] = 1
    W[eye_ids[1], 4] = 1

    # ---------------- shape space: semantic fields first, then random smooth fields
    p = v.copy()
    pc = p - HEAD_C
    face_w = _smoothstep((z - 0.0) / 0.05) * skin
    lower_face = _smoothstep((MOUTH_Y + 0.01 - y) / 0.03) * face_w
    head_w = _smoothstep((y - 0.0) / 0.04)  # keeps the neck base still
    nose = _gauss(p, _anchor(0, NOSE_Y), [0.014, 0.025, 0.03])
    cheeks = _gauss(p, _anchor(0.045, 0.055), 0.018) + _gauss(p, _anchor(-0.045, 0.055), 0.018)
    chin = _gauss(p, _anchor(0, 0.004), [0.025, 0.018, 0.04])
    forehead = _gauss(p, _anchor(0, 0.14), [0.04, 0.03, 0.05])
    eyes_reg = _gauss(p, _anchor(EYE_X, EYE_Y), 0.02) + _gauss(p, _anchor(-EYE_X, EYE_Y), 0.02)
    brows = _gauss(p, _anchor(0, 0.11), [0.04, 0.008, 0.04])
    lips = _gauss(p, _anchor(0, MOUTH_Y), [0.022, 0.009, 0.03])
    back = _smoothstep((-z - 0.02) / 0.05) * head_w

    def normal_dir() -> np.ndarray:
        n = pc / np.maximum(np.linalg.norm(pc, axis=1, keepdims=True), 1e-9)
        return n

    nrm = normal_dir()
    e3 = np.eye(3)
    semantic = [
        0.09 * pc[:, [0]] * e3[0] * head_w[:, None],             # head width (~7 mm at the temples)
        0.07 * pc[:, [1]] * e3[1] * head_w[:, None],             # head height
        0.08 * pc[:, [2]] * e3[2] * head_w[:, None],             # head depth
        0.15 * pc[:, [0]] * e3[0] * lower_face[:, None],         # jaw width
        0.008 * nose[:, None] * e3[2],                           # nose length
        0.25 * pc[:, [0]] * e3[0] * nose[:, None],               # nose width
        0.006 * cheeks[:, None] * nrm,                           # cheek fullness
        -0.008 * chin[:, None] * e3[1],                          # chin length
        0.007 * forehead[:, None] * e3[2],                       # forehead slope
        0.004 * np.sign(pc[:, [0]]) * e3[0] * eyes_reg[:, None],  # eye spacing
        0.004 * brows[:, None] * nrm,                            # brow ridge
        0.004 * lips[:, None] * nrm,                             # lip fullness
        -0.010 * back[:, None] * e3[2],                          # back of the skull
        0.004 * pc[:, [1]] / 0.1 * e3[0] * face_w[:, None],       # face shear (asymmetry)
    ]
    shapedirs = np.zeros((V, 3, NUM_SHAPE + NUM_EXPRESSION))
    for k, field in enumerate(semantic):
        shapedirs[:, :, k] = field
    surf_pts = v[skin]
    for k in range(len(semantic), NUM_SHAPE):
        amp = 0.005 * np.exp(-(k - len(semantic)) / 40.0) + 2e-4
        shapedirs[:, :, k] = amp * _smooth_random_field(p, rng, 4, (0.03, 0.07), skin * head_w, surf_pts)

    # ---------------- expression space
    corners = [_anchor(0.024, MOUTH_Y), _anchor(-0.024, MOUTH_Y)]
    corner_w = [_gauss(p, c, 0.012) for c in corners]
    expr = [
        -0.008 * W[:, [2]] * e3[1],                                                         # mouth open
        (0.004 * e3[1] - 0.003 * e3[2])[None] * (corner_w[0] + corner_w[1])[:, None]
        + 0.003 * e3[0] * (corner_w[0] - corner_w[1])[:, None],                            # smile
        0.005 * brows[:, None] * e3[1],                                                    # brows raise
        (-0.003 * e3[1])[None] * brows[:, None] - 0.003 * np.sign(pc[:, [0]]) * e3[0]
        * (brows * _gauss(p, _anchor(0, 0.11), [0.02, 0.02, 0.04]))[:, None],              # frown
        0.006 * lips[:, None] * e3[2] - 0.004 * np.sign(pc[:, [0]]) * e3[0] * lips[:, None],  # pucker
        0.005 * cheeks[:, None] * nrm,                                                     # cheek puff
        -0.003 * eyes_reg[:, None] * e3[1] * face_w[:, None],                              # squint
    ]
    for k, field in enumerate(expr):
        shapedirs[:, :, NUM_SHAPE + k] = field
    face_pts = v[skin & (face_w > 0.5)]
    for k in range(len(expr), NUM_EXPRESSION):
        amp = 0.003 * np.exp(-(k - len(expr)) / 30.0) + 1e-4
        shapedirs[:, :, NUM_SHAPE + k] = amp * _smooth_random_field(p, rng, 2, (0.015, 0.03), face_w, face_pts)
    # eyeballs move rigidly with the lids around them (the displacement of the fold that meets each eyeball)
    for ids, name in zip(eye_ids, ("left_eye", "right_eye")):
        sock = patches[name]["rings"][-1]
        shapedirs[ids] = shapedirs[sock].mean(0, keepdims=True)

    # ---------------- small pose correctives (neck and jaw only, like FLAME's dominant ones)
    posedirs = np.zeros((V, 3, 36))
    for k in range(18):
        w = (W[:, 1] + W[:, 0]) if k < 9 else W[:, 2]
        posedirs[:, :, k] = 0.002 * _smooth_random_field(p, rng, 2, (0.03, 0.06), w * skin, surf_pts)

    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    return {
        "v_template": v,
        "f": f.astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": J_regressor,
        "kintree_table": kintree,
        "weights": W,
        "bs_style": "lbs",
        "bs_type": "lrotmin",
        # helpers (not FLAME keys; the writer drops them)
        "eyeball_ids": np.stack(eye_ids),
        "num_skin_vertices": n_skin,
        "patches": patches,  # rings of the eye openings and the mouth (see _ring_patch)
    }


# ============================================================================ regions, masks, landmarks
def face_regions(model: dict) -> dict[str, np.ndarray]:
    """FLAME_masks.pkl-style regions (sorted vertex ids): face, lips, nose, left/right_eyeball,
    left/right_eye_region, eye_region, forehead, scalp, neck, boundary, left/right_ear."""
    v = np.asarray(model["v_template"])
    x, y, z = v.T
    V = len(v)
    ns = int(model["num_skin_vertices"])
    skin = np.arange(V) < ns
    eyes = np.asarray(model["eyeball_ids"])
    r = {}
    ear = skin & (np.abs(x) > HEAD_AXES[0] - 0.012) & (np.abs(y - 0.082) < 0.035) & (z < 0.015)
    face = skin & (z > 0.035) & (y > -0.006) & (y < 0.155) & (np.abs(x) < 0.066) & ~ear
    r["face"] = face
    inner = _inner_ring_masks(model)
    r["lips"] = (skin & (((x / 0.03) ** 2 + ((y - MOUTH_Y) / 0.013) ** 2) < 1) & (z > 0.05)) | inner["mouth"]
    r["nose"] = skin & (((x / 0.018) ** 2 + ((y - NOSE_Y) / 0.026) ** 2) < 1) & (z > 0.06)
    for name, sx in (("left", 1), ("right", -1)):
        r[f"{name}_eye_region"] = (skin & ((((x - sx * EYE_X) / 0.024) ** 2 + ((y - EYE_Y) / 0.016) ** 2) < 1)
                                   & (z > 0.04)) | inner[f"{name}_eye"]
    r["left_eyeball"] = np.isin(np.arange(V), eyes[0])
    r["right_eyeball"] = np.isin(np.arange(V), eyes[1])
    r["eye_region"] = r["left_eye_region"] | r["right_eye_region"]
    r["forehead"] = face & (y > 0.11)
    r["left_ear"] = ear & (x > 0)
    r["right_ear"] = ear & (x < 0)
    r["neck"] = skin & (y < 0.02) & ~face
    r["boundary"] = skin & (y < -0.035)
    r["scalp"] = skin & ~face & ~ear & ~r["neck"] & (y > 0.08)
    return {k: np.nonzero(m)[0].astype(np.int64) for k, m in r.items()}


def _inner_ring_masks(model: dict) -> dict[str, np.ndarray]:
    """Boolean (V,) masks of each patch's rings from the margin inwards (margin and the rings rolled in behind it)."""
    V = len(model["v_template"])
    out = {}
    for name, info in model["patches"].items():
        m = np.zeros(V, bool)
        m[np.concatenate(info["rings"][info["margin_index"]:])] = True
        out[name] = m
    return out


def face_mask_ids(model: dict) -> np.ndarray:
    """The face mask (union of face, lips, nose, eyeballs, eye regions), sorted vertex ids."""
    reg = face_regions(model)
    names = ("face", "lips", "nose", "left_eyeball", "right_eyeball", "left_eye_region", "right_eye_region")
    return np.unique(np.concatenate([reg[n] for n in names]))


def semantic_regions(model: dict) -> dict[str, np.ndarray]:
    """Boolean (V,) masks for painting an identity: skin, hair (scalp), eyes (eyeballs), brows, lips, nose, lids (the
    lid margins and the folds behind them that meet the eyeballs), mouth (the lips rolled into the mouth).

    ``skin`` is every skin vertex not in hair/eyes/brows/lips/nose/lids/mouth, so the masks are disjoint."""
    v = np.asarray(model["v_template"])
    x, y, z = v.T
    V = len(v)
    ns = int(model["num_skin_vertices"])
    skin_all = np.arange(V) < ns
    eyes = ~skin_all
    hair = skin_all & (((y > 0.145) & (z < 0.075)) | ((y > 0.06) & (z < -0.035))) & (np.abs(x) < HEAD_AXES[0] - 0.004)
    brows = np.zeros(V, bool)
    for sx in (1, -1):
        brows |= skin_all & ((((x - sx * 0.034) / 0.02) ** 2 + ((y - 0.110) / 0.0055) ** 2) < 1) & (z > 0.05)
    inner = _inner_ring_masks(model)
    lids = inner["left_eye"] | inner["right_eye"]
    mouth = np.zeros(V, bool)
    mp = model["patches"]["mouth"]
    mouth[np.concatenate(mp["rings"][mp["margin_index"] + 1:])] = True  # behind the lip margin
    lips = skin_all & (((x / 0.026) ** 2 + ((y - MOUTH_Y) / 0.011) ** 2) < 1) & (z > 0.05) & ~mouth
    nose = skin_all & (((x / 0.016) ** 2 + ((y - NOSE_Y) / 0.024) ** 2) < 1) & (z > 0.07) & ~lips
    hair &= ~brows
    brows &= ~lids
    skin = skin_all & ~(hair | brows | lips | nose | lids | mouth)
    return {"skin": skin, "hair": hair, "eyes": eyes, "brows": brows, "lips": lips, "nose": nose, "lids": lids,
            "mouth": mouth}


def painting_masks(model: dict) -> dict[str, np.ndarray]:
    """Float (V,) weights in [0, 1] of the features painted on the eye and mouth patches.

    ``lash``: the upper lid margin and the skin ring just outside it (lashes and their shadow), fading towards the
    corners; ``lid_fold``: the lid margins' back edges and the folds that meet the eyeballs; ``mouth_inside``: the
    lips rolled into the mouth, 0.5 on the first ring behind the lip margin and 1 on the mouth hole's loop.
    """
    V = len(model["v_template"])
    out = {k: np.zeros(V) for k in ("lash", "lid_fold", "mouth_inside")}
    for name in ("left_eye", "right_eye"):
        info = model["patches"][name]
        k = info["margin_index"]
        upper = _smoothstep((np.sin(info["theta"]) - 0.1) / 0.4)
        out["lash"][info["rings"][k]] = np.maximum(out["lash"][info["rings"][k]], upper)
        out["lash"][info["rings"][k - 1]] = np.maximum(out["lash"][info["rings"][k - 1]], 0.6 * upper)
        for ring in info["rings"][k + 1:]:
            out["lid_fold"][ring] = 1.0
    mp = model["patches"]["mouth"]
    behind = mp["rings"][mp["margin_index"] + 1:]
    for i, ring in enumerate(behind):
        out["mouth_inside"][ring] = (i + 1) / len(behind)
    return out


def _front_face_hit(v: np.ndarray, f: np.ndarray, xy: np.ndarray, exclude: np.ndarray | None = None):
    """For each (x,y), the front-most triangle under it (projection along z) and barycentric coords."""
    tri = v[f]  # (F,3,3)
    a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    fidx, bary = [], []
    for q in xy:
        with np.errstate(divide="ignore", invalid="ignore"):
            l1 = ((b[:, 1] - c[:, 1]) * (q[0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (q[1] - c[:, 1])) / den
            l2 = ((c[:, 1] - a[:, 1]) * (q[0] - c[:, 0]) + (a[:, 0] - c[:, 0]) * (q[1] - c[:, 1])) / den
            l3 = 1 - l1 - l2
            inside = (l1 >= -1e-9) & (l2 >= -1e-9) & (l3 >= -1e-9) & np.isfinite(l1) & np.isfinite(l2)
        if exclude is not None:
            inside &= ~exclude
        if not inside.any():  # fall back to the nearest triangle centroid
            k = int(np.argmin(np.linalg.norm(tri[:, :, :2].mean(1) - q, axis=1) - 1e-3 * tri[:, :, 2].mean(1)))
            fidx.append(k)
            bary.append([1 / 3, 1 / 3, 1 / 3])
            continue
        cand = np.nonzero(inside)[0]
        zc = (tri[cand, :, 2] * np.stack([l1[cand], l2[cand], l3[cand]], 1)).sum(1)
        k = int(cand[np.argmax(zc)])
        fidx.append(k)
        bary.append([l1[k], l2[k], l3[k]])
    return np.array(fidx, np.int64), np.clip(np.array(bary), 0, 1)


def _margin_point(f: np.ndarray, info: dict, angle: float) -> tuple[int, np.ndarray]:
    """(face id, barycentric coords (3,)) of the point at ``angle`` on a patch's margin ring (see _ring_patch):
    interpolated along the margin edge that spans the angle, in the face of that edge on the skin side."""
    ring = info["rings"][info["margin_index"]]
    outside = set(info["rings"][info["margin_index"] - 1].tolist())
    theta = info["theta"]
    ahead = np.mod(angle - theta, 2 * np.pi)  # how far the wanted angle lies past each margin vertex
    k = int(np.argmin(ahead))  # the margin vertex just before it; the next one along increasing angles:
    nxt = (k + 1) % len(ring) if theta[1] > theta[0] else (k - 1) % len(ring)
    span = np.mod(theta[nxt] - theta[k], 2 * np.pi)
    s_ = float(np.clip(ahead[k] / span if span > 0 else 0.0, 0, 1))
    a, b = int(ring[k]), int(ring[nxt])
    for fi in np.nonzero(((f == a).any(1)) & ((f == b).any(1)))[0]:
        third = [int(u) for u in f[fi] if u not in (a, b)]
        if third and third[0] in outside:
            bary = np.array([(1 - s_) if u == a else (s_ if u == b else 0.0) for u in f[fi]])
            return int(fi), bary
    raise RuntimeError("synthetic FLAME: no skin-side face along the margin edge of a landmark")


def landmark_embeddings(model: dict) -> tuple[dict, dict]:
    """(static, dynamic) landmark embeddings in FLAME's formats: static 51 points (iBUG 68 without the jaw
    contour: brows 10, nose 9, eyes 12, mouth 20); dynamic (79 yaw bins, 17 contour points)."""
    v = np.asarray(model["v_template"])
    f = np.asarray(model["f"], np.int64)
    eyes_faces = (f >= int(model["num_skin_vertices"])).any(1)
    pts = []
    for sx in (-1, 1):  # iBUG order: right brow (image left = subject's right, -x) first
        xs = np.linspace(0.055, 0.012, 5) if sx < 0 else np.linspace(0.012, 0.055, 5)
        for xx in xs:
            pts.append((sx * xx, 0.108 + 0.006 * np.sin(np.pi * (xx - 0.012) / 0.043)))
    pts += [(0.0, y) for y in np.linspace(0.085, NOSE_Y - 0.006, 4)]
    pts += [(xx, NOSE_Y - 0.012) for xx in np.linspace(-0.012, 0.012, 5)]
    brows_nose = _front_face_hit(v, f, np.array(pts), exclude=eyes_faces)
    outer_lip = np.array([(0.026 * np.cos(a), MOUTH_Y + 0.011 * np.sin(a)) for a in np.linspace(np.pi, -np.pi, 13)[:12]])
    outer_lip = _front_face_hit(v, f, outer_lip, exclude=eyes_faces)
    # eyes and inner lips lie on the lid and lip margins: iBUG 36-41 (right eye, -x) and 42-47 start at the corner
    # on the image's left (-x), run along the upper margin, then back along the lower one; 60-67 likewise
    eye_angles = np.radians([180, 120, 60, 0, -60, -120])
    on_margin = [_margin_point(f, model["patches"][n], a) for n in ("right_eye", "left_eye") for a in eye_angles]
    inner_lip = [_margin_point(f, model["patches"]["mouth"], a) for a in np.linspace(np.pi, -np.pi, 9)[:8]]
    idx = np.concatenate([brows_nose[0], [p[0] for p in on_margin], outer_lip[0], [p[0] for p in inner_lip]])
    bc = np.concatenate([brows_nose[1], [p[1] for p in on_margin], outer_lip[1], [p[1] for p in inner_lip]])
    assert len(idx) == 51
    static = {"lmk_face_idx": idx.astype(np.int64), "lmk_b_coords": bc}
    # dynamic contour: for each yaw bin the 17 jaw-contour points of the silhouette seen from that yaw; rows in the
    # order of FLAME's file and smplx's lookup: 0..39 degrees, then -1..-39 degrees (the angle is minus the head's
    # y rotation relative to the camera)
    yaw = np.r_[np.arange(40), -np.arange(1, 40)] * np.pi / 180
    t = np.linspace(-1, 1, 17)
    didx = np.zeros((79, 17), np.int64)
    dbc = np.zeros((79, 17, 3))
    for k, a in enumerate(yaw):
        cx = 0.062 * np.sin(np.pi / 2 * t) + 0.02 * np.sin(a)
        cy = 0.075 - 0.068 * np.cos(np.pi / 2 * t)
        didx[k], dbc[k] = _front_face_hit(v, f, np.stack([np.clip(cx, -0.07, 0.07), cy], 1), exclude=eyes_faces)
    return static, {"lmk_face_idx": didx, "lmk_b_coords": dbc}


def sample_identity_params(rng: np.random.Generator, num_active: int = 20, std: float = 1.0) -> dict:
    """Neutral-expression FLAME parameters of a random identity (numpy, FlameParams field names):
    shape (1,300) with N(0, std^2) on the first ``num_active`` dims, expression (1,100) zeros,
    rotation_matrix (1,3,3) identity, translation/jaw/neck (1,3), eyes (1,6) zeros, scale (1,1) ones."""
    shape = np.zeros((1, NUM_SHAPE))
    shape[0, :num_active] = std * rng.standard_normal(num_active)
    return {"shape": shape, "expression": np.zeros((1, NUM_EXPRESSION)), "rotation_matrix": np.eye(3)[None],
            "translation": np.zeros((1, 3)), "jaw": np.zeros((1, 3)), "neck": np.zeros((1, 3)),
            "eyes": np.zeros((1, 6)), "scale": np.ones((1, 1))}


# ============================================================================ writing the files
class _FakeCh:
    """Pickles exactly like a chumpy ``Ch``: reference ``chumpy.ch.Ch``, state dict with the array in 'x'."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __reduce_ex__(self, protocol):  # what object.__reduce_ex__ emits for a chumpy Ch
        import copyreg
        # chumpy's Ch.__getstate__ returns a copy of __dict__ without '_parents' and '_cache'
        state = {"x": self.x, "_dirty_vars": set(), "_itr": None, "_make_dense": False, "_make_sparse": False,
                 "_depends_on_deps": {}}
        return (copyreg.__newobj__, (type(self),), state)


def _dump_with_chumpy(obj: dict, path: Path, chumpy_keys: tuple[str, ...]) -> None:
    """Pickle ``obj`` (protocol 2, as the Python-2 FLAME files) with ``chumpy_keys`` as chumpy Ch objects."""
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    mod, sub = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    Ch = type("Ch", (_FakeCh,), {"__module__": "chumpy.ch", "__qualname__": "Ch"})
    sub.Ch = Ch
    mod.ch = sub
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = mod, sub  # only while dumping
    try:
        data = {k: (Ch(v) if k in chumpy_keys else v) for k, v in obj.items()}
        with open(path, "wb") as fh:
            pickle.dump(data, fh, protocol=2)
    finally:
        for k, m in saved.items():
            if m is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = m


FLAME_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights",
              "bs_style", "bs_type")


def write_flame_files(out_dir: PathLike, model: dict | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic model in FLAME's real file formats into ``out_dir``; returns {name: path}.

    Files: flame2023.pkl (shapedirs as a chumpy-style object), flame_static_embedding.pkl,
    flame_dynamic_embedding.npy, FLAME_mask_vertexID.npy, FLAME_masks.pkl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_flame_model(seed) if model is None else model
    paths = {n: out / n for n in ("flame2023.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy",
                                  "FLAME_mask_vertexID.npy", "FLAME_masks.pkl")}
    _dump_with_chumpy({k: model[k] for k in FLAME_KEYS if k in model}, paths["flame2023.pkl"], ("shapedirs",))
    static, dynamic = landmark_embeddings(model)
    with open(paths["flame_static_embedding.pkl"], "wb") as fh:
        pickle.dump(static, fh, protocol=2)
    np.save(paths["flame_dynamic_embedding.npy"], np.array(dynamic, dtype=object), allow_pickle=True)
    np.save(paths["FLAME_mask_vertexID.npy"], face_mask_ids(model))
    with open(paths["FLAME_masks.pkl"], "wb") as fh:
        pickle.dump(face_regions(model), fh, protocol=2)
    return paths
