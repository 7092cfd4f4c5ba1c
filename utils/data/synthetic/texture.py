"""The procedural texture of a ground-truth head: per-vertex albedo in canonical (template) space from an
identity's appearance parameters (utils/data/synthetic/identity.py), placed by feature anchors taken from the
synthetic FLAME's semantic regions."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from utils.data.synthetic.flame_mesh import _smoothstep
from utils.data.synthetic.flame_regions import face_regions, semantic_regions

SCLERA = np.array([0.93, 0.90, 0.86])
PUPIL = np.array([0.02, 0.02, 0.02])


@dataclass
class _Anchors:
    """Canonical feature locations derived from the semantic regions of the template."""

    eye_centres: np.ndarray  # (2, 3)
    eye_radius: float
    lips_centre: np.ndarray
    lips_half: np.ndarray  # (2,) half width / height
    nose_centre: np.ndarray
    brow_centres: np.ndarray  # (2, 3)
    brow_half_width: float
    top_y: float
    front_z: float
    ear_centres: np.ndarray  # (2, 3)
    neck_y: float


def _anchors(model: Mapping) -> _Anchors:

    v = np.asarray(model["v_template"], dtype=np.float64)
    sem = semantic_regions(model)
    reg = face_regions(model)
    eye_ids = [reg["left_eyeball"], reg["right_eyeball"]]
    eye_c = np.asarray(model["J_regressor"][3:5] @ v)  # the eye joints: the eyeballs' centres
    eye_r = float(np.mean([np.linalg.norm(v[i] - c, axis=1).mean() for i, c in zip(eye_ids, eye_c)]))
    lips = v[sem["lips"]]
    brows = v[sem["brows"]]
    bc = np.stack([brows[brows[:, 0] > 0].mean(0), brows[brows[:, 0] < 0].mean(0)])
    bhw = float(np.mean([np.abs(brows[brows[:, 0] > 0, 0] - bc[0, 0]).max(),
                         np.abs(brows[brows[:, 0] < 0, 0] - bc[1, 0]).max()]))
    skin = v[sem["skin"] | sem["hair"]]
    ears = np.stack([v[reg["left_ear"]].mean(0), v[reg["right_ear"]].mean(0)])
    neck = v[reg["neck"]] if len(reg["neck"]) else skin
    return _Anchors(
        eye_centres=eye_c,
        eye_radius=eye_r,
        lips_centre=lips.mean(0),
        lips_half=np.abs(lips[:, :2] - lips[:, :2].mean(0)).max(0),
        nose_centre=v[sem["nose"]].mean(0),
        brow_centres=bc,
        brow_half_width=bhw,
        top_y=float(skin[:, 1].max()),
        front_z=float(skin[:, 2].max()),
        ear_centres=ears,
        neck_y=float(np.median(neck[:, 1])),
    )


def albedo(canonical: np.ndarray, soft: Mapping[str, np.ndarray], anchors: _Anchors, app: Mapping) -> np.ndarray:
    """Per-vertex albedo of one identity.

    Args:
        canonical: (V, 3) template positions of the (subdivided) vertices (texture space).
        soft: soft region weights (V,) in [0, 1]: "eyes", "ears", "lips", "nose", "face_features", and (optional)
            "lash", "lid_fold", "mouth_inside" (utils.data.synthetic.flame_regions.painting_masks).
        anchors: canonical feature locations.
        app: appearance parameters from sample_identity.
    Returns:
        (V, 3) colours in [0, 1].
    """
    p = canonical
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    V = len(p)
    col = np.tile(app["skin"], (V, 1))
    front = _smoothstep((z - 0.02) / 0.03)

    # low-frequency blotches + fine per-vertex detail (pores)
    phase = p @ app["noise_k"].T + app["noise_phase"]
    col = col * (1 + app["noise_amp"] * np.cos(phase) @ app["noise_rgb"] / math.sqrt(len(app["noise_phase"])))
    fine = np.random.default_rng(app["detail_seed"]).normal(size=(V, 1))
    col = col * (1 + app["detail_amp"] * fine)

    # blush on the cheeks, warmer nose
    for sx in (1, -1):
        c = np.array([sx * 0.042, anchors.nose_centre[1] - 0.008])
        w = np.exp(-0.5 * (((x - c[0]) / 0.014) ** 2 + ((y - c[1]) / 0.012) ** 2)) * front
        col = col * (1 - app["blush"] * w[:, None] * np.array([0.0, 0.6, 0.6]))
    col = col * (1 - 0.5 * app["blush"] * soft["nose"][:, None] * np.array([0.0, 0.5, 0.5]))

    # freckles and moles (projected along z onto the front of the face)
    for pos, rad, s in zip(app["freckle_pos"], app["freckle_radius"], app["freckle_strength"]):
        w = np.exp(-0.5 * (((x - pos[0]) ** 2 + (y - pos[1]) ** 2) / rad**2)) * front
        col = col * (1 - s * w[:, None] * np.array([0.6, 0.9, 1.0]))
    for pos, rad in zip(app["mole_pos"], app["mole_radius"]):
        w = _smoothstep((rad - np.hypot(x - pos[0], y - pos[1])) / (0.4 * rad)) * front
        col = col * (1 - 0.55 * w[:, None])

    # beard shadow: lower face below the lips corners and along the jaw
    if app["beard"] > 0:
        lc = anchors.lips_centre
        w = _smoothstep((lc[1] + 0.004 - y) / 0.012) * _smoothstep((y - (anchors.neck_y - 0.01)) / 0.015)
        w = w * _smoothstep((z - 0.0) / 0.03) * (1 - soft["lips"])
        col = col * (1 - w[:, None] * app["beard"]) + w[:, None] * app["beard"] * app["hair"] * 0.8

    # lips: an ellipse around the semantic lips, scaled per identity
    lc, lh = anchors.lips_centre, anchors.lips_half * app["lip_scale"]
    d = ((x - lc[0]) / lh[0]) ** 2 + ((y - lc[1]) / lh[1]) ** 2
    w_lips = _smoothstep((1.0 - d) / 0.35) * front
    lip_col = app["skin"] * np.array([0.88, 0.62, 0.62]) + app["lip_redness"] * np.array([0.10, -0.04, -0.02])
    col = col * (1 - w_lips[:, None]) + w_lips[:, None] * np.clip(lip_col, 0, 1)

    # brows: arcs above the eyes
    w_brow = np.zeros(V)
    for k, sx in enumerate((1, -1)):
        c = anchors.brow_centres[k]
        hw = anchors.brow_half_width * app["brow_length"]
        u = (x - c[0]) / hw
        yc = c[1] + app["brow_arch"] * (1 - u**2) + app["brow_tilt"] * u * sx
        half = 0.5 * app["brow_thickness"] * (1 - 0.4 * np.clip(u * sx, 0, 1))  # thinner towards the temple
        w = _smoothstep((half - np.abs(y - yc)) / 0.001) * _smoothstep((1 - np.abs(u)) / 0.25) * front
        w_brow = np.maximum(w_brow, w)
    w_brow *= app["brow_density"] * (1 - soft["eyes"])
    col = col * (1 - w_brow[:, None]) + w_brow[:, None] * app["brow_colour"]

    # hair: front hairline (per identity height, temple recession) + sides above the ears + back down to the nape
    if not app["bald"]:
        brow_y = anchors.brow_centres[:, 1].mean()
        hl = brow_y + 0.04 + app["hairline"] + app["temple_recess"] * np.clip(np.abs(x) / 0.05, 0, 1) ** 2
        front_hair = _smoothstep((y - hl) / 0.006)
        ear_top = anchors.ear_centres[:, 1].mean() + 0.02
        ear_z = anchors.ear_centres[:, 2].mean()
        side_hair = _smoothstep((y - ear_top) / 0.006) * _smoothstep((ear_z + 0.03 - z) / 0.01)
        nape = anchors.ear_centres[:, 1].mean() - app["nape"]
        back_hair = _smoothstep((y - nape) / 0.01) * _smoothstep((ear_z - 0.012 - z) / 0.01)
        w_hair = np.maximum(front_hair, np.maximum(side_hair, back_hair))
        w_hair *= (1 - soft["ears"]) * (1 - soft["eyes"]) * (1 - soft["face_features"])
        streak = 1 + app["hair_streak_amp"] * np.sin(y * 900 + 40 * np.sin(x * 60) + z * 200)
        hair_col = np.clip(app["hair"] * streak[:, None], 0, 1)
        col = col * (1 - w_hair[:, None]) + w_hair[:, None] * hair_col

    # lids: lashes along the upper margins, the pink folds behind the margins that meet the eyeballs
    zeros = np.zeros(V)
    fold = soft.get("lid_fold", zeros)[:, None]
    col = col * (1 - fold) + fold * np.clip(app["skin"] * np.array([0.72, 0.5, 0.48]) + [0.04, 0.0, 0.0], 0, 1)
    lash = 0.9 * soft.get("lash", zeros)[:, None]
    col = col * (1 - lash) + lash * app["brow_colour"] * 0.45
    # the lips rolled into the mouth darken towards the mouth's inside
    inside = soft.get("mouth_inside", zeros)[:, None]
    dark = np.array([0.10, 0.03, 0.03])
    col = col * (1 - inside) + inside * (np.clip(lip_col, 0, 1) * 0.7 * (1 - inside) + dark * inside)

    # eyes: sclera, iris (with a darker limbal ring), pupil; angle from each eyeball's forward (+z) axis
    eye_w = soft["eyes"]
    if eye_w.any():
        k = np.argmin(np.linalg.norm(p[:, None, :] - anchors.eye_centres[None], axis=-1), axis=1)
        dvec = p - anchors.eye_centres[k]
        dvec = dvec / np.maximum(np.linalg.norm(dvec, axis=1, keepdims=True), 1e-9)
        ang = np.degrees(np.arccos(np.clip(dvec[:, 2], -1, 1)))
        ir, pr = app["iris_radius_deg"], app["pupil_radius_deg"]
        iris_w = _smoothstep((ir - ang) / 3.0)
        limbal = _smoothstep((ang - (ir - 6)) / 4.0) * iris_w
        iris_col = app["iris"][None] * (1 - 0.45 * limbal[:, None]) * (1 + 0.15 * np.cos(ang * 0.9)[:, None])
        pupil_w = _smoothstep((pr - ang) / 2.0)
        eye_col = SCLERA * (1 - iris_w[:, None]) + iris_col * iris_w[:, None]
        eye_col = eye_col * (1 - pupil_w[:, None]) + PUPIL * pupil_w[:, None]
        # the lids shade the eyeball: darker towards the lid margins (above and below) and the corners
        r = anchors.eye_radius
        occ = 1 - 0.3 * _smoothstep((np.abs(dvec[:, 1]) * r - 0.0015) / 0.0025) \
            - 0.2 * _smoothstep((np.abs(dvec[:, 0]) * r - 0.007) / 0.004)
        eye_col = eye_col * np.clip(occ, 0.4, 1)[:, None]
        col = col * (1 - eye_w[:, None]) + eye_w[:, None] * eye_col
    return np.clip(col, 0.0, 1.0)
