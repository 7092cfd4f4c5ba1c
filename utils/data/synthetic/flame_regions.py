"""Regions, face mask and landmark embeddings of the synthetic FLAME model (utils/data/synthetic/flame_model.py):
FLAME_masks.pkl-style regions, the FLAME_mask_vertexID.npy face mask, semantic regions and painting masks for the
ground-truth texture, and the static/dynamic landmark embeddings on the lid and lip margins."""
from __future__ import annotations

import numpy as np

from utils.data.synthetic.flame_mesh import EYE_X, EYE_Y, HEAD_AXES, MOUTH_Y, NOSE_Y, _smoothstep


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
    outer_lip = np.array([(0.026 * np.cos(a), MOUTH_Y + 0.011 * np.sin(a))
                          for a in np.linspace(np.pi, -np.pi, 13)[:12]])
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
