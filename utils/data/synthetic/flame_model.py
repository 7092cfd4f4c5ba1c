"""A synthetic FLAME-format head model (no real FLAME is needed for tests or the embedded dataset).

``make_flame_model(seed)`` returns a dict with the keys and shape semantics of FLAME 2023 (300 shape and 100
expression components, 5 joints) on the coarse synthetic head mesh (~2.9k vertices,
utils/data/synthetic/flame_mesh.py).  Metres, FLAME axes: y up, +z the direction the face looks; the subject's left
is +x (FLAME joint 3 = left eye).  Joints: 0 global (neck base), 1 neck, 2 jaw, 3 left eye, 4 right eye.  Its
regions, face mask and landmarks: flame_regions.py; the FLAME files written from it: flame_files.py.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import scipy.sparse as sp

from utils.data.synthetic.flame_mesh import (
    EYE_X,
    EYE_Y,
    EYEBALL_R,
    EYEBALL_VERTICES,
    HEAD_AXES,
    HEAD_C,
    MOUTH_Y,
    NECK_AXIS_Z,
    NECK_BOTTOM,
    NECK_R,
    NOSE_Y,
    _anchor,
    _build_mesh,
    _gauss,
    _smoothstep,
)

NUM_SHAPE, NUM_EXPRESSION = 300, 100


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


def make_flame_model(seed: int = 0, head_level: int = 4, eyeball_vertices: int = EYEBALL_VERTICES) -> dict:
    """See :func:`_make_flame_model`; results are cached per (seed, head_level, eyeball_vertices) and returned as
    copies."""
    return copy.deepcopy(_make_flame_model_cached(seed, head_level, int(eyeball_vertices)))


@functools.lru_cache(maxsize=4)
def _make_flame_model_cached(seed: int, head_level: int, eyeball_vertices: int) -> dict:
    return _make_flame_model(seed, head_level, eyeball_vertices)


def _make_flame_model(seed: int = 0, head_level: int = 4, eyeball_vertices: int = EYEBALL_VERTICES) -> dict:
    """Synthetic FLAME 2023-format model (plain numpy; deterministic for ``seed``).

    ``eyeball_vertices``: vertices of each eyeball (utils/data/synthetic/flame_mesh.py ``eyeball_mesh``): 162 (the
    default icosphere) or e.g. 546, FLAME's own count (a latitude/longitude sphere, denser at the front).

    Keys: v_template (V,3), f (F,3) uint32, shapedirs (V,3,400) (300 shape + 100 expression), posedirs
    (V,3,36), J_regressor (5,V) scipy.sparse.csc, kintree_table (2,5), weights (V,5); plus the helpers
    ``eyeball_ids`` (2, E), ``num_skin_vertices`` used by semantic_regions / face_regions
    (utils/data/synthetic/flame_regions.py).
    """
    rng = np.random.default_rng(seed)
    v, f, n_skin, eye_ids, eye_centers, patches = _build_mesh(head_level, eyeball_vertices)
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


def sample_identity_params(rng: np.random.Generator, num_active: int = 20, std: float = 1.0) -> dict:
    """Neutral-expression FLAME parameters of a random identity (numpy, FlameParams field names):
    shape (1,300) with N(0, std^2) on the first ``num_active`` dims, expression (1,100) zeros,
    rotation_matrix (1,3,3) identity, translation/jaw/neck (1,3), eyes (1,6) zeros, scale (1,1) ones."""
    shape = np.zeros((1, NUM_SHAPE))
    shape[0, :num_active] = std * rng.standard_normal(num_active)
    return {"shape": shape, "expression": np.zeros((1, NUM_EXPRESSION)), "rotation_matrix": np.eye(3)[None],
            "translation": np.zeros((1, 3)), "jaw": np.zeros((1, 3)), "neck": np.zeros((1, 3)),
            "eyes": np.zeros((1, 6)), "scale": np.ones((1, 1))}
