"""Synthetic NeRSemble-format dataset rendered from known ground-truth Gaussian heads (the same files and
layout as a preprocessed NeRSemble subject, utils/data/nersemble.py, so every script runs on it unchanged).

``make_synthetic_dataset(out, ...)`` writes::

    <out>/flame/                 FLAME-format model files (utils.data.synthetic.flame_model.write_flame_files)
    <out>/subjects/<id>/calibration/camera_params.json
    <out>/subjects/<id>/sequences/EXP-1-head/annotations/tracking/FLAME2023_v2/tracked_flame_params.npz
    <out>/subjects/<id>/sequences/EXP-1-head/timesteps/frame_00000/images-2x/cam_<serial>.jpg   (16 cameras)
    <out>/subjects/<id>/sequences/EXP-1-head/timesteps/frame_<t>/images-2x/...   frames 1..N-1 with num_frames N > 1:
                                 non-neutral expression, jaw, neck and eyes (sample_frame_params), same head
    <out>/synthetic_info.json    seed, sizes, training / held-out ids (the split), per-identity appearance summary;
                                 written last (while generating, <out>/.synthetic_pending.json claims the folder)

exactly in the real NeRSemble layout (section 4), so every reader and preprocessing script runs on it unchanged.

The rig: the 16 real serials on a frontal arc about 1 m from the head (three rows: +20 deg, 0 deg, -20 deg
elevation; azimuths within +-60 deg; camera id 8 = 222200037 straight in front), portrait images.  As in the real
data the calibration describes "full" frames twice the size of the written ``images-2x`` (ratio 0.5); the width is
``round(image_size * 1100 / 1604)``.  Each subject has its own calibration with a few millimetres of jitter (real
rigs are recalibrated per session).

World frame: metres, y up, the frontal camera on +z looking at the origin; the head (FLAME model space: y up, face
towards +z) is placed with a small random rotation, translation and scale (the tracking npz holds that pose).

Ground truth: each identity is a Gaussian head on its posed FLAME surface (the whole head: face, scalp/hair, ears,
neck, eyeballs), one flat Gaussian per vertex of the mesh subdivided ``subdivision`` times, coloured by a procedural
per-identity texture (skin tone, freckles/moles, blush, brows, lips, iris colour, hair colour and hairline, beard
shadow, fine noise) with baked studio lighting, over a plain studio background.  Everything is deterministic for a
seed; identity ``<id>`` is seeded from ``(seed, int(id))``, so adding identities never changes existing ones.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.gaussians import GaussianCloud, rotmat_to_quat
from utils.core.io import atomic_write_json, imwrite_file, safe_child
from utils.data.camera_params import load_camera_params, write_camera_params
from utils.data.nersemble import (
    CALIBRATION_RELPATH,
    DEFAULT_SEQUENCE,
    FRONTAL_SERIAL,
    HELDOUT_IDENTITIES,
    HELDOUT_SERIALS,
    SERIALS,
    TRACKING_RELPATH,
    timestep_name,
)
from models.flame import FlameParams
from utils.data.synthetic.flame_model import sample_identity_params
from utils.data.synthetic.flame_model import face_regions, semantic_regions
from models.flame import FlameModel, make_subdivision_plan, mouth_closing_faces, subdivision_matrix
from utils.data.synthetic.flame_model import face_regions, painting_masks, semantic_regions
from models.flame import subdivide_vertices
from models.flame import vertex_normals
from models.renderer import render_batch
from utils.core.io import safe_name
from models.flame import save_nersemble_tracking
from utils.data.synthetic.flame_model import make_flame_model, write_flame_files
from utils.data.synthetic.flame_model import make_flame_model

GENERATOR_VERSION = 2  # 2: FLAME-like eyes (almond lid openings, eyeballs set back) and mouth (lips that part)
INFO_NAME = "synthetic_info.json"  # written last: its presence means the dataset is complete
PENDING_NAME = ".synthetic_pending.json"  # claims the folder while generating (an interrupted run resumes from it)
DEFAULT_NUM_IDENTITIES = 24  # training identities; ~24 span the appearance distribution (see README)
DEFAULT_NUM_HELDOUT = 2
DEFAULT_IMAGE_SIZE = 96  # height of the written images-2x (width = round(S * 1100 / 1604))
FIRST_TRAINING_ID = 300
JPEG_QUALITY = 95

# Rig: (elevation deg, azimuth deg) of each camera id (index into SERIALS).  Camera 8 (222200037) is frontal;
# the held-out protocol cameras (ids 3, 6, 11, 15) land in different rows and on both sides.
RIG_ANGLES: tuple[tuple[float, float], ...] = (
    (20.0, -50.0), (20.0, -25.0), (20.0, 0.0), (20.0, 25.0), (20.0, 50.0),                     # ids 0-4
    (0.0, -60.0), (0.0, -40.0), (0.0, -20.0), (0.0, 0.0), (0.0, 20.0), (0.0, 40.0), (0.0, 60.0),  # ids 5-11
    (-20.0, -45.0), (-20.0, -15.0), (-20.0, 15.0), (-20.0, 45.0),                                # ids 12-15
)
RIG_DISTANCE = 1.0  # metres from the head
# Focal length of the full 2200x3208 NeRSemble frames that shows about 0.40 m at 1 m vertically.
REAL_FOCAL_FULL = 8000.0
NERSEMBLE_FULL_SIZE = (2200, 3208)
NERSEMBLE_2X_SIZE = (1100, 1604)

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
SCLERA = np.array([0.93, 0.90, 0.86])
PUPIL = np.array([0.02, 0.02, 0.02])
LIGHT_DIR = np.array([0.35, 0.55, 1.0]) / np.linalg.norm([0.35, 0.55, 1.0])  # key light (towards the light)


# ============================================================================================== ids and seeds
def default_subject_ids(num_identities: int, num_heldout: int) -> tuple[list[str], list[str]]:
    """(training ids "300", "301", ..., held-out ids HELDOUT_IDENTITIES[:num_heldout])."""
    if num_identities < 0 or num_heldout < 0:
        raise ValueError(f"identity counts must be >= 0, got {num_identities} training and {num_heldout} held-out")
    if num_heldout > len(HELDOUT_IDENTITIES):
        raise ValueError(f"at most {len(HELDOUT_IDENTITIES)} held-out identities (the protocol ids), got {num_heldout}")
    return [str(FIRST_TRAINING_ID + i) for i in range(num_identities)], list(HELDOUT_IDENTITIES[:num_heldout])


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


def image_size_for(height: int) -> tuple[int, int]:
    """(w, h) of the written images-2x for an image height (NeRSemble aspect 1100:1604)."""
    if height < 16:
        raise ValueError(f"image_size (height) must be >= 16 pixels, got {height}")
    return max(1, round(height * NERSEMBLE_2X_SIZE[0] / NERSEMBLE_2X_SIZE[1])), int(height)


def auto_subdivision(height: int) -> int:
    """Subdivision level of the ground-truth mesh: Gaussians about 1-2 pixels wide (the synthetic FLAME mesh has
    ~2.8k vertices, 8 mm apart; a level halves that), fewer Gaussians for the tiny CPU images."""
    return 0 if height <= 160 else (1 if height <= 400 else (2 if height <= 1000 else 3))


# ============================================================================================== rig
def make_rig(image_size: int, rng: np.random.Generator | None = None, jitter: float = 1.0) -> dict[str, Camera]:
    """The 16 NeRSemble cameras around a head at the origin, calibrated for the FULL frames.

    Args:
        image_size: height S of the images-2x; the calibration frames are 2x (w, h) = 2 * image_size_for(S).
        rng: source of the per-session jitter (None = the nominal rig).
        jitter: multiplier of the jitter (0 = nominal).
    Returns:
        {serial: Camera} in SERIALS order, width/height = the full-frame size.
    """
    w2x, h2x = image_size_for(image_size)
    W, H = 2 * w2x, 2 * h2x
    f = REAL_FOCAL_FULL * H / NERSEMBLE_FULL_SIZE[1]
    cams = {}
    for serial, (el, az) in zip(SERIALS, RIG_ANGLES):
        j = (lambda *s: rng.normal(size=s) * jitter) if rng is not None else (lambda *s: np.zeros(s))
        el_r, az_r = math.radians(el + 0.5 * j(1)[0]), math.radians(az + 0.5 * j(1)[0])
        r = RIG_DISTANCE * (1.0 + 0.01 * j(1)[0])
        eye = r * np.array([math.sin(az_r) * math.cos(el_r), math.sin(el_r), math.cos(az_r) * math.cos(el_r)])
        target = 0.004 * j(3)
        up = np.array([0.0, 1.0, 0.0]) + 0.01 * j(3)  # slight roll
        fs = f * (1.0 + 0.005 * j(1)[0])
        cx, cy = W / 2 + 0.005 * W * j(1)[0], H / 2 + 0.005 * H * j(1)[0]
        K = np.array([[fs, 0.0, cx], [0.0, fs, cy], [0.0, 0.0, 1.0]])
        cams[serial] = Camera(torch.tensor(K, dtype=torch.float32), _look_at_w2c(eye, target, up), W, H, serial)
    return cams


def _look_at_w2c(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(4, 4) OpenCV world-to-camera of a camera at ``eye`` looking at ``target``; world ``up`` appears upward."""
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)  # image right = forward x up
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)  # image down
    R = np.stack([x, y, z])
    w2c = np.eye(4)
    w2c[:3, :3] = R
    w2c[:3, 3] = -R @ eye
    return w2c


# ============================================================================================== identities
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


# ============================================================================================== sequences
MOTION_STREAM = 1_000_003  # seeds the frames of a sequence apart from the identity's own streams


def sample_frame_params(seed: int, subject_id: str, frame: int, neutral: Any) -> Any:
    """FLAME parameters (FlameParams, T = 1) of frame ``frame`` >= 1 of a subject's synthetic sequence.

    The identity's shape and head placement (rotation, translation, scale) stay those of its neutral frame
    ``neutral``; expression, jaw, neck and eyes are drawn afresh for every frame, from a generator seeded by
    (seed, subject_id, frame) alone, so adding frames never changes existing ones.  Ranges: the first seven
    expression coefficients (the synthetic FLAME's mouth open, smile, brows raise, frown, pucker, cheek puff, squint;
    utils/data/synthetic/flame_model.py) uniform in [0, 0.8] (mouth open) and [-1, 1], the next 13 N(0, 0.5^2); jaw opening
    uniform in [0, 0.12] rad about x (+ N(0, 0.01^2) about y and z); neck uniform in [-0.08, 0.08] rad per axis; one
    gaze for both eyes, yaw in [-0.15, 0.15] and pitch in [-0.1, 0.1] rad."""
    from dataclasses import replace

    if frame < 1:
        raise ValueError(f"frame must be >= 1 (frame 0 is the neutral frame), got {frame}")
    r = np.random.default_rng(np.random.SeedSequence([int(seed), _as_int(subject_id), MOTION_STREAM, int(frame)]))
    expr = np.zeros((1, neutral.expression.shape[1]))
    expr[0, 0] = r.uniform(0.0, 0.8)
    expr[0, 1:7] = r.uniform(-1.0, 1.0, 6)
    expr[0, 7:20] = r.normal(0.0, 0.5, 13)
    jaw = np.array([[r.uniform(0.0, 0.12), r.normal(0.0, 0.01), r.normal(0.0, 0.01)]])
    neck = r.uniform(-0.08, 0.08, (1, 3))
    gaze = np.array([r.uniform(-0.1, 0.1), r.uniform(-0.15, 0.15), 0.0])
    eyes = np.tile(gaze, 2)[None]
    t = lambda a: torch.as_tensor(a, dtype=neutral.expression.dtype)  # noqa: E731
    return replace(neutral, expression=t(expr), jaw=t(jaw), neck=t(neck), eyes=t(eyes))


MOTIONS = ("expressions", "head_turn")  # what frames 1..N-1 of a sequence carry (see sequence_params)
HEAD_TURN_YAW_DEG = 35.0  # head_turn: peak global yaw (degrees) over the clip
HEAD_TURN_PITCH_DEG = 15.0  # head_turn: peak global pitch (degrees)


def head_turn_angles(frame: int, num_frames: int) -> tuple[float, float]:
    """(yaw, pitch) in degrees of frame ``frame`` of a head-turning sequence of ``num_frames`` frames: one full yaw
    sweep (0 -> +35 -> 0 -> -35 -> 0) and two pitch periods over the clip, so a monocular video sees the face from
    both sides and from above and below; frame 0 is (0, 0)."""
    phase = 2.0 * math.pi * frame / max(1, num_frames)
    return HEAD_TURN_YAW_DEG * math.sin(phase), HEAD_TURN_PITCH_DEG * math.sin(2.0 * phase)


def head_turned(params: Any, yaw: float, pitch: float, pivot: np.ndarray) -> Any:
    """``params`` (FlameParams, T = 1, rotate_about_root False) with the whole head additionally rotated by (yaw,
    pitch) degrees about the world point ``pivot`` (3,) (the head's centre): R' = Q R, t' = Q (t - p) + p."""
    from dataclasses import replace

    Q = torch.as_tensor(_rotation(yaw, pitch, 0.0), dtype=params.rotation_matrix.dtype)
    p = torch.as_tensor(np.asarray(pivot, np.float64), dtype=params.translation.dtype)
    return replace(params, rotation_matrix=Q @ params.rotation_matrix,
                   translation=(params.translation - p) @ Q.T + p)


def sequence_params(identity: SyntheticIdentity, seed: int, num_frames: int, motion: str = "expressions",
                    pivot: np.ndarray | None = None) -> Any:
    """FlameParams (T = num_frames) of a subject's synthetic sequence: frame 0 is the identity's neutral frame,
    frames 1..T-1 come from :func:`sample_frame_params`; with ``motion="head_turn"`` they are also globally rotated
    about ``pivot`` (the head's world centre, (3,)) by :func:`head_turn_angles` (+-35 deg yaw, +-15 deg pitch)."""

    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    frames = [sample_frame_params(seed, identity.subject_id, t, identity.params) for t in range(1, num_frames)]
    if motion == "head_turn":
        if pivot is None:
            raise ValueError("motion='head_turn' needs the head's world centre (pivot)")
        frames = [head_turned(f, *head_turn_angles(t, num_frames), pivot) for t, f in enumerate(frames, 1)]
    return FlameParams.cat([identity.params] + frames)


# ============================================================================================== texture
def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


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
            "lash", "lid_fold", "mouth_inside" (utils.data.synthetic.flame_model.painting_masks).
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


# ============================================================================================== ground-truth heads
class GroundTruthHeads:
    """Builds the ground-truth Gaussian head of any identity of one synthetic FLAME model.

    Args:
        flame_dir: folder with the FLAME-format files (read through models.flame.FlameModel, so the written files
            are what the heads are built from).
        model: the model dict (utils.data.synthetic.flame_model.make_flame_model) the files were written from; it carries
            the semantic regions.
        subdivision: midpoint subdivision levels of the whole head mesh (1 Gaussian per vertex).
    """

    def __init__(self, flame_dir: str | os.PathLike, model: Mapping, subdivision: int = 1) -> None:

        self.flame = FlameModel.from_data_dir(flame_dir)
        self.model = model
        self.subdivision = int(subdivision)
        faces = self.flame.faces.cpu().numpy()
        reg = face_regions(model)
        # the mouth's inside: FLAME's mouth hole closed where the rolled-in lips end, dark like a real mouth's inside
        faces = np.concatenate([faces, mouth_closing_faces(np.asarray(model["v_template"]), faces, reg["lips"])])
        self.plan = make_subdivision_plan(self.flame.num_vertices, faces, self.subdivision)
        self.faces = self.plan.faces[self.subdivision]
        S = subdivision_matrix(self.plan, self.subdivision)
        v0 = np.asarray(model["v_template"], dtype=np.float64)
        self.canonical = np.asarray(S @ v0)
        sem = semantic_regions(model)
        to_soft = lambda m: np.clip(np.asarray(S @ np.asarray(m, dtype=np.float64)), 0, 1)  # noqa: E731
        self.soft = {
            "eyes": to_soft(sem["eyes"]),
            "ears": to_soft(np.isin(np.arange(len(v0)), np.r_[reg["left_ear"], reg["right_ear"]])),
            "lips": to_soft(sem["lips"]),
            "nose": to_soft(sem["nose"]),
            "face_features": to_soft(sem["lips"] | sem["nose"] | sem["brows"] | sem["eyes"] | sem["lids"]
                                     | sem["mouth"]),
        }
        self.soft.update({k: to_soft(m) for k, m in painting_masks(model).items()})
        self.anchors = _anchors(model)
        # one edge list for per-vertex spacing
        f = self.faces
        e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        self.edges = np.unique(np.sort(e, axis=1), axis=0)

    @torch.no_grad()
    def vertices(self, identity: SyntheticIdentity, params: Any = None) -> Tensor:
        """(V_L, 3) world-space vertices of the subdivided posed FLAME mesh (of ``params``, FlameParams T = 1 such
        as a frame of :func:`sequence_params`; default: the identity's neutral frame 0)."""

        v = self.flame(identity.params if params is None else params)[0].double()
        return subdivide_vertices(v, self.plan, self.subdivision)

    @torch.no_grad()
    def cloud(self, identity: SyntheticIdentity, params: Any = None) -> GaussianCloud:
        """The identity's ground-truth Gaussian head in world space (degree-0 SH, N = V_L Gaussians), posed by
        ``params`` (FlameParams T = 1; default: its neutral frame 0).  The texture lives in canonical space, so it
        follows the surface; the baked lighting uses the posed normals."""

        verts = self.vertices(identity, params)
        n = vertex_normals(verts, torch.as_tensor(self.faces))
        vn = verts.numpy()
        # spacing: mean length of the edges at each vertex
        el = np.linalg.norm(vn[self.edges[:, 0]] - vn[self.edges[:, 1]], axis=1)
        cnt = np.bincount(self.edges.ravel(), minlength=len(vn))
        spacing = np.bincount(self.edges.ravel(), weights=np.repeat(el, 2).reshape(-1, 2).ravel(), minlength=len(vn))
        spacing = spacing / np.maximum(cnt, 1)
        spacing = np.where(cnt > 0, spacing, np.median(el))
        # frame: z axis = normal, x/y any tangent pair
        nn = n.numpy()
        helper = np.where(np.abs(nn[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
        t1 = np.cross(nn, helper)
        t1 /= np.linalg.norm(t1, axis=1, keepdims=True)
        t2 = np.cross(nn, t1)
        R = np.stack([t1, t2, nn], axis=-1)  # columns
        quats = rotmat_to_quat(torch.as_tensor(R))
        s = 0.55 * spacing
        scales = np.stack([s, s, 0.12 * s], axis=1)

        col = albedo(self.canonical, self.soft, self.anchors, identity.appearance)
        # baked studio lighting: ambient + key light, slightly cooler fill from below
        ndl = np.clip(nn @ LIGHT_DIR, 0, 1)
        fill = np.clip(nn @ np.array([-0.3, -0.4, 0.87]), 0, 1)
        shade = 0.50 + 0.45 * ndl + 0.10 * fill
        rgb = np.clip(col * shade[:, None], 0, 1)
        return GaussianCloud.from_rgb(
            verts.float(),
            quats.float(),
            torch.as_tensor(scales, dtype=torch.float32),
            torch.full((len(vn),), 0.97),
            torch.as_tensor(rgb, dtype=torch.float32),
        )


def studio_background(identity: SyntheticIdentity, serial: str, width: int, height: int) -> np.ndarray:
    """(H, W, 3) slightly varying studio background of one view (per-camera tint and a vertical gradient)."""
    rng = np.random.default_rng([_as_int(identity.subject_id), _as_int(serial)])
    base = np.clip(identity.background + rng.normal(0, 0.006, 3), 0, 1)
    g = np.linspace(1.04, 0.94, height)[:, None, None]  # lit from above
    return np.clip(np.broadcast_to(base * g, (height, width, 3)), 0, 1).astype(np.float32)


@torch.no_grad()
def render_ground_truth(
    cloud: GaussianCloud,
    cameras: Sequence[Camera],
    identity: SyntheticIdentity | None = None,
    background: str | Tensor | None = "studio",
    backend: str = "auto",
) -> dict[str, Tensor]:
    """Render a ground-truth head through any cameras (e.g. the held-out ones, or a crop).

    Args:
        cloud: from GroundTruthHeads.cloud (or ground_truth_cloud).
        cameras: C cameras of one size.
        identity: needed for background="studio".
        background: "studio" (the identity's backdrop, as in the written photos), None (black) or a (3,) tensor.
        backend: renderer backend ("auto": gsplat on CUDA, else torch).
    Returns:
        {"image": (C, H, W, 3), "alpha": (C, H, W, 1), "depth": (C, H, W, 1)} on the cloud's device.
    """

    cameras = [c.to(cloud.device) for c in cameras]
    bg = background if isinstance(background, Tensor) else None
    # Ground truth is always 3DGS's classic rendering: the process-wide 2D filter that load_model sets for a
    # Mip-Splatting model (models.mip_filter.set_render_filter) must not change the data.
    out = render_batch(cloud, cameras, background=bg, backend=backend, filter_2d=None)
    if isinstance(background, str):
        if background != "studio":
            raise ValueError(f"background must be 'studio', None or a (3,) tensor, got {background!r}")
        if identity is None:
            raise ValueError("background='studio' needs the identity (its backdrop colour)")
        bgs = torch.stack(
            [torch.from_numpy(studio_background(identity, c.name, c.width, c.height)) for c in cameras]
        ).to(out["image"])
        out["image"] = out["image"] + (1 - out["alpha"]) * bgs
    return out


# ============================================================================================== the dataset
def _dataset_key(seed: int, image_size: int, subdivision: int, num_frames: int = 1,
                 motion: str = "expressions") -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "image_size": int(image_size),
            "subdivision": int(subdivision), "num_frames": int(num_frames), "motion": str(motion)}


def _key_of(info: dict) -> dict:
    """The dataset key of a synthetic_info.json (files written before sequences existed have one frame)."""
    defaults = {"num_frames": 1, "motion": "expressions"}  # left implicit in files written before they existed
    return {k: info.get(k, defaults.get(k)) for k in _dataset_key(0, 0, 0)}


def _read_dataset_json(path: Path) -> dict:
    """synthetic_info.json or .synthetic_pending.json, with every subject id checked by :func:`utils.core.io.safe_name`
    (the ids become folder names under subjects/ that are read, replaced and deleted: "../x" must never reach
    shutil.rmtree).  ValueError naming the file for anything else than a JSON object with lists of ids."""

    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it or generate the dataset again") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    for key in ("subjects", "training_ids", "heldout_ids"):
        ids = doc.get(key, [])
        if not isinstance(ids, list):
            raise ValueError(f"{path}: {key!r} must be a list of subject ids, got {type(ids).__name__}")
        for sid in ids:
            safe_name(sid, f"subject id in {key!r}", path)
    if not isinstance(doc.get("identities", {}), dict):
        raise ValueError(f"{path}: 'identities' must be an object")
    return doc


def read_info(root: str | os.PathLike) -> dict:
    """The synthetic_info.json of a synthetic dataset folder (FileNotFoundError when it is not one); subject ids
    are checked to be safe folder names (ValueError naming the file)."""
    path = Path(root) / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a synthetic dataset folder (generate one with "
            f"python utils/make_synthetic_dataset.py --out {root})"
        )
    return _read_dataset_json(path)


def _frame_image_dir(subject_dir: Path, frame: int) -> Path:
    return subject_dir / "sequences" / DEFAULT_SEQUENCE / "timesteps" / f"frame_{timestep_name(frame)}" / "images-2x"


def _subject_complete(subject_dir: Path, num_frames: int = 1) -> bool:
    return (
        (subject_dir / CALIBRATION_RELPATH).is_file()
        and (subject_dir / "sequences" / DEFAULT_SEQUENCE / TRACKING_RELPATH).is_file()
        and all((_frame_image_dir(subject_dir, t) / f"cam_{s}.jpg").is_file()
                for t in range(num_frames) for s in SERIALS)
    )


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    import cv2

    u8 = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)[..., ::-1]  # RGB -> BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):  # 4:4:4: no chroma blur on tiny images
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    imwrite_file(path, u8, params)


def write_subject(
    subject_dir: str | os.PathLike,
    heads: GroundTruthHeads,
    identity: SyntheticIdentity,
    image_size: int,
    rig_rng: np.random.Generator,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    num_frames: int = 1,
    seed: int = 0,
    motion: str = "expressions",
) -> None:
    """Write one subject folder (calibration, tracking, 16 images-2x JPEGs per frame) in the NeRSemble layout.

    Frame 0 is the identity's neutral frame; frames 1..num_frames-1 (:func:`sequence_params` with the dataset
    ``seed``) are rendered from the same ground-truth head driven by their FLAME parameters, all in one tracking npz.
    """

    subject_dir = Path(subject_dir)
    calib = make_rig(image_size, rig_rng)
    calib_path = subject_dir / CALIBRATION_RELPATH
    write_camera_params(calib_path, calib)
    pivot = None
    if motion == "head_turn":  # rotate about the centre of the neutral head's bounding box (world space)
        with torch.no_grad():
            v = heads.flame(identity.params)[0].double().numpy()
        pivot = 0.5 * (v.min(0) + v.max(0))
    params = identity.params if num_frames == 1 else sequence_params(identity, seed, num_frames, motion, pivot)
    save_nersemble_tracking(subject_dir / "sequences" / DEFAULT_SEQUENCE / TRACKING_RELPATH, params)
    w, h = image_size_for(image_size)
    # render through the cameras exactly as a reader gets them from the json (ratio 0.5)
    cams = load_camera_params(calib_path, image_size=(w, h), serials=list(SERIALS))
    for t in range(num_frames):
        cloud = heads.cloud(identity, None if t == 0 else params.frame(t)).to(device)
        out = render_ground_truth(cloud, list(cams.values()), identity, "studio", backend)
        img_dir = _frame_image_dir(subject_dir, t)
        img_dir.mkdir(parents=True, exist_ok=True)
        images = out["image"].cpu().numpy()
        for serial, image in zip(cams, images):
            _write_jpeg(img_dir / f"cam_{serial}.jpg", image)


def make_synthetic_dataset(
    out: str | os.PathLike,
    num_identities: int = DEFAULT_NUM_IDENTITIES,
    num_heldout: int = DEFAULT_NUM_HELDOUT,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    subdivision: int | None = None,
    device: str | torch.device = "cpu",
    num_frames: int = 1,
    motion: str = "expressions",
) -> Path:
    """Generate (or complete) a synthetic NeRSemble-format dataset; returns ``out``.

    Args:
        out: dataset folder (created); holds flame/, subjects/ and synthetic_info.json.
        num_identities: training identities, ids "300", "301", ...
        num_heldout: held-out identities, ids HELDOUT_IDENTITIES[:num_heldout] ("017", "030", ...).
        image_size: height of the written images-2x (width = round(S * 1100 / 1604)); calibration is for 2x that.
        seed: dataset seed (FLAME model and every identity).
        overwrite: regenerate everything (only in a folder that is a synthetic dataset or empty).
        progress: tqdm progress bar.
        subdivision: ground-truth mesh subdivision (None: auto_subdivision(image_size): 0 up to 160 px, 1 up to 400,
            2 up to 1000, else 3).
        device: where the ground truth is rendered ("cpu" keeps datasets bit-identical across machines).
        num_frames: frames of each subject's sequence: frame 0 is neutral, frames 1..N-1 carry non-neutral
            expression, jaw, neck and eye parameters (:func:`sample_frame_params`); the default 1 writes exactly the
            single-frame dataset of before (same bytes).
        motion: "expressions" (default) or "head_turn": frames 1..N-1 also turn the whole head (+-35 deg yaw,
            +-15 deg pitch about its centre, :func:`head_turn_angles`), so the frontal camera's frames form a
            monocular head-turning video and the other 15 cameras are novel views of every frame.

    Idempotent: a complete dataset as requested is left untouched; one with the same seed/image_size/subdivision
    is completed (missing subjects rendered, subjects no longer requested removed); synthetic_info.json is
    written last (absent while generating, so scripts may test for it); a different one raises unless ``overwrite``.
    """
    from tqdm import tqdm


    out = Path(out)
    image_size = int(image_size)
    image_size_for(image_size)  # validates
    subdivision = auto_subdivision(image_size) if subdivision is None else int(subdivision)
    train_ids, heldout_ids = default_subject_ids(num_identities, num_heldout)
    all_ids = heldout_ids + train_ids
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    key = _dataset_key(seed, image_size, subdivision, int(num_frames), motion)
    # what the json files hold: one frame and the default motion are left implicit so datasets written before they
    # existed stay byte-identical
    stored = {k: v for k, v in key.items() if not (k == "num_frames" and v == 1)
              and not (k == "motion" and v == "expressions")}

    info_path, pending_path = out / INFO_NAME, out / PENDING_NAME
    old = next((_read_dataset_json(p) for p in (pending_path, info_path) if p.is_file()), None)
    if out.exists() and old is None and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists, is not empty and is not a synthetic dataset (no {INFO_NAME}); choose an empty or new folder"
        )
    if old is not None and (overwrite or _key_of(old) != key):
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a synthetic dataset generated with {_key_of(old)}, not {key}; "
                f"pass --overwrite (overwrite=True) to regenerate it, or choose another --out"
            )
        for name in ("subjects", "flame"):
            shutil.rmtree(out / name, ignore_errors=True)
        info_path.unlink(missing_ok=True)
        pending_path.unlink(missing_ok=True)
        old = None

    subjects_dir = out / "subjects"
    flame_dir = out / "flame"
    flame_files = ("flame2023.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy",
                   "FLAME_mask_vertexID.npy")
    flame_ok = all((flame_dir / f).is_file() for f in flame_files)
    stale = set(old.get("subjects", [])) - set(all_ids) if old else set()
    todo = [sid for sid in all_ids if not _subject_complete(subjects_dir / sid, key["num_frames"])]
    if info_path.is_file() and not pending_path.is_file() and flame_ok and not stale and not todo \
            and old.get("subjects") == all_ids and old.get("training_ids") == train_ids:
        return out  # complete and as requested: nothing to do (files untouched)

    subjects_dir.mkdir(parents=True, exist_ok=True)
    # claim the folder first; synthetic_info.json is removed until the dataset is complete again (scripts test for
    # it), and an interrupted run leaves the pending file that the next run resumes from
    pending = dict(stored, subjects=sorted(set(old.get("subjects", []) if old else []) | set(all_ids)),
                   identities=old.get("identities", {}) if old else {})
    _write_json(pending_path, pending)
    info_path.unlink(missing_ok=True)
    if not flame_ok:
        tmp = out / ".tmp-flame"
        shutil.rmtree(tmp, ignore_errors=True)
        write_flame_files(tmp, make_flame_model(seed), seed)
        shutil.rmtree(flame_dir, ignore_errors=True)
        os.replace(tmp, flame_dir)

    # drop subjects an earlier run generated that are not requested now (they would join training otherwise)
    for sid in stale:  # ids checked by _read_dataset_json; safe_child also refuses a link pointing out
        _remove_tree(safe_child(subjects_dir, sid, "subject id", pending_path))
    for leftover in subjects_dir.glob(".tmp-*"):  # interrupted earlier runs
        shutil.rmtree(leftover, ignore_errors=True)

    summaries = dict(old.get("identities", {})) if old else {}
    # the model is built only when something is missing (a re-run with the same arguments is a quick no-op)
    model = make_flame_model(seed) if todo or any(sid not in summaries for sid in all_ids) else None
    heads = GroundTruthHeads(flame_dir, model, subdivision) if todo else None
    bar = tqdm(todo, desc=f"synthetic subjects ({image_size_for(image_size)[0]}x{image_size} px)", disable=not progress)
    for sid in bar:
        bar.set_postfix_str(sid)
        identity = sample_identity(model, seed, sid)
        tmp = subjects_dir / f".tmp-{sid}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_subject(tmp, heads, identity, image_size, identity_rngs(seed, sid)["rig"], device,
                      num_frames=key["num_frames"], seed=seed, motion=motion)
        _remove_tree(subjects_dir / sid)
        os.replace(tmp, subjects_dir / sid)  # a subject folder appears only when complete
        summaries[sid] = identity.summary()
    for sid in all_ids:
        if sid not in summaries:
            summaries[sid] = sample_identity(model, seed, sid).summary()

    w, h = image_size_for(image_size)
    info = dict(
        stored,
        format="NeRSemble subject layout (synthetic)",
        image_width=w,
        image_height=h,
        calibration_size=[2 * w, 2 * h],
        num_identities=len(train_ids),
        num_heldout=len(heldout_ids),
        training_ids=train_ids,
        heldout_ids=heldout_ids,
        subjects=all_ids,
        serials=list(SERIALS),
        frontal_serial=FRONTAL_SERIAL,
        heldout_serials=list(HELDOUT_SERIALS),
        sequence=DEFAULT_SEQUENCE,
        frame=0,
        subjects_dir="subjects",
        flame_dir="flame",
        identities={sid: summaries[sid] for sid in all_ids},
    )
    _write_json(info_path, info)
    pending_path.unlink(missing_ok=True)
    return out


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(data, path)


def _remove_tree(path: Path) -> None:
    """Delete a folder of the dataset; a symbolic link in its place is removed itself, never followed."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


# ============================================================================================== reuse for tests
def load_ground_truth(root: str | os.PathLike, subject_id: str, frame: int = 0, params: Any = None
                      ) -> tuple[GaussianCloud, SyntheticIdentity]:
    """Rebuild the ground-truth Gaussian head of a generated subject (deterministic; nothing is stored).

    ``frame``: the frame of its sequence (0 = neutral; frames >= 1 as :func:`sample_frame_params` makes them, whether
    or not the dataset wrote that many); ``params``: FlameParams (T = 1) to pose the head with instead (any motion,
    e.g. a synthetic driving video).
    Returns:
        (cloud in world space, the identity).  Render it with :func:`render_ground_truth` through any cameras.
    """

    root = Path(root)
    info = read_info(root)
    if subject_id not in info["subjects"]:
        raise KeyError(f"subject {subject_id!r} is not in the synthetic dataset {root} (it has {info['subjects']})")
    key = (str(root.resolve()), info["seed"], info["subdivision"])
    if key not in _HEADS_CACHE:
        model = make_flame_model(info["seed"])
        _HEADS_CACHE.clear()  # keep one dataset's model in memory
        _HEADS_CACHE[key] = GroundTruthHeads(root / info["flame_dir"], model, info["subdivision"])
    heads = _HEADS_CACHE[key]
    identity = sample_identity(heads.model, info["seed"], subject_id)
    if params is None and frame > 0:
        params = sample_frame_params(info["seed"], subject_id, frame, identity.params)
    return heads.cloud(identity, params), identity


_HEADS_CACHE: dict[tuple, GroundTruthHeads] = {}
