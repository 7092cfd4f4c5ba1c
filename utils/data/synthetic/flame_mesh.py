"""The synthetic FLAME head's mesh: a head built by ray-marching a smooth implicit surface (an ellipsoid skull
merged with a neck cylinder, nose, brows, cheeks, lips, chin and ear bumps, eye sockets) from an icosphere, with
FLAME-like openings (mouth slit, two eye holes, open neck bottom) and two separate eyeball spheres like FLAME.

Eyes and mouth as FLAME shapes them: almond lid openings a few millimetres high whose lids overhang eyeballs set back
behind the lid margins; lips that meet at rest along a slit and roll into the mouth.  Metres, FLAME axes: y up, +z
the direction the face looks; the subject's left is +x.  The model built on it: utils/data/synthetic/flame_model.py.
"""
from __future__ import annotations

import functools

import numpy as np

from models.flame import boundary_loops

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
EYEBALL_VERTICES = 162  # the default eyeball: the icosphere above; any other count N is a latitude/longitude sphere
FLAME_EYEBALL_VERTICES = 546  # FLAME's own eyeballs (``--eyeball_vertices 546``; :func:`latlong_sphere`)
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


def latlong_rings(num_vertices: int) -> tuple[int, int]:
    """(rings, segments) of a latitude/longitude sphere of ``num_vertices`` = rings * segments + 2 poles, with about
    twice as many segments as rings (square cells at the equator).  546 (FLAME's eyeballs): 17 rings of 32.

    Raises:
        ValueError: when num_vertices - 2 has no such factorisation with >= 3 rings and >= 6 segments.
    """
    n = int(num_vertices) - 2
    pairs = [(r, n // r) for r in range(3, n + 1) if n % r == 0 and n // r >= 6]
    if not pairs:
        raise ValueError(f"an eyeball of {num_vertices} vertices is not a latitude/longitude sphere (rings x segments "
                         f"+ 2 poles with >= 3 rings of >= 6 segments); use {EYEBALL_VERTICES} (icosphere) or e.g. "
                         f"{FLAME_EYEBALL_VERTICES} (FLAME's, 17 x 32 + 2)")
    return min(pairs, key=lambda rs: (abs(rs[1] / rs[0] - 2.0), -rs[0]))


def latlong_sphere(num_vertices: int, front: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Unit latitude/longitude sphere with its poles on the z axis: vertex 0 the front pole (+z), then the rings
    from the front backwards, then the back pole.  Returns (vertices (num_vertices, 3), faces (F, 3) outward).

    front: the polar angle theta of the uniformly spaced rings is warped by theta -> theta - front sin(theta)
        (0 <= front < 1): 1 / (1 - front) times the ring density at the front pole, 1 / (1 + front) at the back.
    """
    rings, seg = latlong_rings(num_vertices)
    th = np.linspace(0.0, np.pi, rings + 2)[1:-1]
    th = th - front * np.sin(th)
    ph = np.linspace(0.0, 2 * np.pi, seg, endpoint=False)
    ring_v = np.stack([np.sin(th)[:, None] * np.cos(ph)[None], np.sin(th)[:, None] * np.sin(ph)[None],
                       np.repeat(np.cos(th)[:, None], seg, 1)], -1).reshape(-1, 3)
    v = np.concatenate([[[0.0, 0.0, 1.0]], ring_v, [[0.0, 0.0, -1.0]]])
    ids = 1 + np.arange(rings * seg).reshape(rings, seg)
    nxt = np.roll(ids, -1, axis=1)
    back = len(v) - 1
    faces = [np.stack([np.zeros(seg, np.int64), ids[0], nxt[0]], 1)]  # front fan
    for r in range(rings - 1):  # quads between ring r and r + 1, two triangles each
        faces += [np.stack([ids[r], ids[r + 1], nxt[r + 1]], 1), np.stack([ids[r], nxt[r + 1], nxt[r]], 1)]
    faces.append(np.stack([np.full(seg, back), nxt[-1], ids[-1]], 1))  # back fan
    f = np.concatenate(faces).astype(np.int64)
    # outward orientation: (b - a) x (c - a) points away from the centre
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    flip = (np.cross(b - a, c - a) * (a + b + c)).sum(1) < 0
    f[flip] = f[flip][:, [0, 2, 1]]
    return v, f


def eyeball_mesh(num_vertices: int = EYEBALL_VERTICES) -> tuple[np.ndarray, np.ndarray]:
    """Unit eyeball sphere looking along +z, denser at the front (the cornea, the only part ever seen):
    (vertices (num_vertices, 3), faces (F, 3)).  ``EYEBALL_VERTICES`` (162): the icosphere of level
    ``EYEBALL_LEVEL`` warped by theta -> theta - EYEBALL_FRONT sin(theta) (the default, unchanged since generator
    version 2); any other count: :func:`latlong_sphere` with the same warp (546 = FLAME's eyeballs, 17 x 32 + 2)."""
    if int(num_vertices) == EYEBALL_VERTICES:
        e, ef = _icosphere(EYEBALL_LEVEL)
        th = np.arccos(np.clip(e[:, 2], -1, 1))
        ph = np.arctan2(e[:, 1], e[:, 0])
        th = th - EYEBALL_FRONT * np.sin(th)
        return np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], 1), ef
    return latlong_sphere(num_vertices, EYEBALL_FRONT)


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


def _build_mesh(head_level: int, eyeball_vertices: int = EYEBALL_VERTICES):
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
    e, ef = eyeball_mesh(eyeball_vertices)
    all_v, all_f = [v], [faces]
    for cen in centres:
        all_f.append(ef + sum(len(a) for a in all_v))
        all_v.append(cen + EYEBALL_R * e)
    verts = np.concatenate(all_v)
    faces = np.concatenate(all_f)
    eye_ids = [np.arange(n_skin, n_skin + len(e)), np.arange(n_skin + len(e), n_skin + 2 * len(e))]
    return verts, faces, n_skin, eye_ids, centres, patches
