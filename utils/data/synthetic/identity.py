"""One synthetic identity: its FLAME shape, head placement, procedural appearance and studio background.

Everything is deterministic for a seed; identity ``<id>`` is seeded from ``(seed, int(id))`` with one generator per
aspect (:func:`identity_rngs`), so adding identities never changes existing ones.  The appearance parameters (skin
tone, freckles/moles, blush, brows, lips, iris colour, hair colour and hairline, beard shadow, fine noise) are painted
onto the head by utils/data/synthetic/texture.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from models.flame import (
    FlameParams,
)
from utils.data.synthetic.flame_model import sample_identity_params

# Appearance palettes (linear-ish sRGB in [0, 1]).
SKIN_TONES = np.array(
    [
        [0.95, 0.80, 0.70], [0.89, 0.70, 0.58], [0.80, 0.59, 0.45], [0.68, 0.48, 0.34],
        [0.52, 0.35, 0.24], [0.38, 0.25, 0.17], [0.27, 0.18, 0.12],
    ]
)
IRIS_COLOURS = {
    "blue": [0.32, 0.48, 0.68], "brown": [0.36, 0.21, 0.10], "dark brown": [0.17, 0.10, 0.06],
    "green": [0.33, 0.47, 0.27], "gray": [0.47, 0.50, 0.52], "hazel": [0.46, 0.36, 0.16],
}
HAIR_COLOURS = {
    "black": [0.05, 0.04, 0.035], "dark brown": [0.16, 0.10, 0.06], "brown": [0.32, 0.20, 0.11],
    "auburn": [0.48, 0.21, 0.09], "blond": [0.76, 0.61, 0.38], "gray": [0.55, 0.54, 0.53], "white": [0.86, 0.85, 0.82],
}


def _as_int(name: str) -> int:
    """Numeric ids/serials as themselves, other names by a stable hash (seeding must not depend on PYTHONHASHSEED)."""
    import zlib

    return int(name) if str(name).isdigit() else zlib.crc32(str(name).encode())


def identity_rngs(seed: int, subject_id: str) -> dict[str, np.random.Generator]:
    """Independent generators of one identity, seeded from (seed, int(subject_id)).

    Separate streams per aspect, so changing how one aspect is sampled leaves the others unchanged."""
    ss = np.random.SeedSequence([int(seed), _as_int(subject_id)])
    names = ("shape", "pose", "appearance", "rig", "background")
    return {n: np.random.default_rng(s) for n, s in zip(names, ss.spawn(len(names)))}


@dataclass
class SyntheticIdentity:
    """Everything sampled for one identity.

    Attributes:
        subject_id: the folder name.
        params: FLAME parameters (models.flame.FlameParams, T = 1) incl. the world pose.
        appearance: dict of the sampled appearance parameters (numpy arrays / floats / names).
        background: (3,) studio background colour.
    """

    subject_id: str
    params: Any
    appearance: dict
    background: np.ndarray

    def summary(self) -> dict:
        """JSON-friendly description (for synthetic_info.json)."""
        a = self.appearance
        return {
            "skin_tone": round(float(a["skin_tone"]), 3),
            "iris": a["iris_name"],
            "hair": a["hair_name"],
            "bald": bool(a["bald"]),
            "beard": round(float(a["beard"]), 3),
            "freckles": int(len(a["freckle_pos"])),
            "scale": round(float(self.params.scale[0, 0]), 4),
        }


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("YXZ", [yaw, pitch, roll], degrees=True).as_matrix()


def sample_identity(model: Mapping, seed: int, subject_id: str) -> SyntheticIdentity:
    """Sample shape, pose and appearance of identity ``subject_id`` (deterministic for (seed, subject_id)).

    Args:
        model: the synthetic FLAME model dict (utils.data.synthetic.flame_model.make_flame_model).
    """

    rngs = identity_rngs(seed, subject_id)
    p = sample_identity_params(rngs["shape"])
    r = rngs["pose"]
    v = np.asarray(model["v_template"])
    centre = 0.5 * (v.min(0) + v.max(0))  # head centre in model space; placed near the world origin
    R = _rotation(r.uniform(-10, 10), r.uniform(-8, 8), r.uniform(-4, 4))
    s = r.uniform(0.95, 1.05)
    t = -s * R @ centre + r.uniform(-0.015, 0.015, size=3)
    p["rotation_matrix"] = R[None]
    p["scale"] = np.array([[s]])
    p["translation"] = t[None]
    p["eyes"] = np.tile(np.radians(np.r_[r.uniform(-4, 4), r.uniform(-4, 4), 0.0]), 2)[None]  # same gaze, both eyes
    params = FlameParams.from_numpy(p)
    app = _sample_appearance(rngs["appearance"])
    bg = rngs["background"]
    grey = bg.uniform(0.55, 0.85)
    background = np.clip(grey + bg.normal(0, 0.02, size=3), 0, 1)
    return SyntheticIdentity(str(subject_id), params, app, background)


def _sample_appearance(rng: np.random.Generator) -> dict:
    """Procedural appearance parameters of one identity."""
    a: dict[str, Any] = {}
    tone = (len(SKIN_TONES) - 1) * rng.beta(1.6, 2.0)  # every tone, lighter-to-medium a little more often
    a["skin_tone"] = tone
    i = min(int(tone), len(SKIN_TONES) - 2)
    skin = SKIN_TONES[i] * (1 - (tone - i)) + SKIN_TONES[i + 1] * (tone - i)
    a["skin"] = np.clip(skin * rng.uniform(0.95, 1.05) + rng.normal(0, 0.015, 3), 0.05, 1)
    # darker skin -> brown eyes and dark hair more likely
    dark = tone / (len(SKIN_TONES) - 1)
    iris_names = list(IRIS_COLOURS)
    w_iris = np.array([1.0 - dark, 1.0 + dark, 0.5 + 2 * dark, 0.7 * (1 - dark), 0.5 * (1 - dark), 0.6])
    a["iris_name"] = iris_names[rng.choice(len(iris_names), p=w_iris / w_iris.sum())]
    a["iris"] = np.clip(np.array(IRIS_COLOURS[a["iris_name"]]) * rng.uniform(0.85, 1.15) + rng.normal(0, 0.02, 3), 0, 1)
    a["iris_radius_deg"] = rng.uniform(28, 34)
    a["pupil_radius_deg"] = rng.uniform(10, 14)
    hair_names = list(HAIR_COLOURS)
    w_hair = np.array([0.6 + 2 * dark, 1.0 + dark, 1.0, 0.35 * (1 - dark), 0.7 * (1 - dark), 0.35, 0.15])
    a["hair_name"] = hair_names[rng.choice(len(hair_names), p=w_hair / w_hair.sum())]
    hair = np.array(HAIR_COLOURS[a["hair_name"]]) * rng.uniform(0.85, 1.15) + rng.normal(0, 0.015, 3)
    a["hair"] = np.clip(hair, 0, 1)
    a["bald"] = bool(rng.random() < 0.1)
    a["hairline"] = rng.uniform(-0.01, 0.015)  # + = receding (metres, along y)
    a["temple_recess"] = rng.uniform(0.0, 0.02)  # M-shaped recession
    a["nape"] = rng.uniform(-0.01, 0.04)  # how low the hair reaches at the back
    a["hair_streak_amp"] = rng.uniform(0.03, 0.12)
    grey = 0.02 if a["hair_name"] in ("gray", "white") else 0.0
    a["brow_colour"] = np.clip(a["hair"] * rng.uniform(0.55, 0.9) + grey, 0, 1)
    a["brow_thickness"] = rng.uniform(0.0035, 0.0075)
    a["brow_arch"] = rng.uniform(0.0, 0.004)
    a["brow_tilt"] = rng.uniform(-0.002, 0.003)
    a["brow_length"] = rng.uniform(0.85, 1.2)
    a["brow_density"] = rng.uniform(0.55, 0.95)
    a["lip_redness"] = rng.uniform(0.2, 0.8)
    a["lip_scale"] = np.array([rng.uniform(0.85, 1.12), rng.uniform(0.8, 1.3)])
    a["blush"] = rng.uniform(0.0, 0.08)
    a["beard"] = float(rng.uniform(0.15, 0.55)) if rng.random() < 0.3 else 0.0
    n_freckles = int(rng.integers(40, 160)) if rng.random() < 0.3 else 0
    # (x, y) canonical positions, spread over cheeks and nose
    a["freckle_pos"] = rng.normal(size=(n_freckles, 2)) * [0.028, 0.015] + [0.0, 0.07]
    a["freckle_radius"] = rng.uniform(0.0012, 0.0026, size=n_freckles)
    a["freckle_strength"] = rng.uniform(0.1, 0.25, size=n_freckles)
    n_moles = int(rng.integers(0, 4))
    a["mole_pos"] = np.c_[rng.uniform(-0.06, 0.06, n_moles), rng.uniform(0.0, 0.13, n_moles)]
    a["mole_radius"] = rng.uniform(0.0015, 0.003, size=n_moles)
    # smooth low-frequency blotches and fine pore-scale noise (3D cosines in canonical space)
    k = 10
    dirs = rng.normal(size=(k, 3))
    a["noise_k"] = dirs / np.linalg.norm(dirs, axis=1, keepdims=True) * rng.uniform(30, 120, size=(k, 1))
    a["noise_phase"] = rng.uniform(0, 2 * np.pi, size=k)
    a["noise_rgb"] = rng.normal(0, 1, size=(k, 3)) * [1.0, 0.8, 0.7]
    a["noise_amp"] = rng.uniform(0.01, 0.03)
    a["detail_seed"] = int(rng.integers(0, 2**31 - 1))
    a["detail_amp"] = rng.uniform(0.01, 0.025)
    return a
