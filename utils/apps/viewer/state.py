"""What the viewer shows, as plain values (no viser, no network): the settings of viewer.py (:class:`ViewerConfig`),
the controls' values that determine the head (:class:`ViewState`), the pose sliders (:data:`POSE_CONTROLS`) and their
mapping to FLAME parameters (:func:`pose_params`, :func:`keyframe_pose`), and the page's constants.

Pose sliders (expression, jaw, eyes, neck, head pose) drive the head in FLAME's canonical frame (its model space:
head rotation I, translation 0, scale 1); the head-pose sliders are FLAME's global rotation (Euler XYZ angles, as the
tracking files' ``rotation``) about that frame's origin.  All sliders at 0 is FLAME's neutral face of the identity's
shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from models.flame import EULER_CONVENTION, FlameParams
from utils.core.config import Range
from utils.motion import Keyframe, keyframe_params

NO_MODEL = "(no model loaded)"
MAX_MESSAGES = 6  # messages kept in the page (newest first)
VIEW_FOV_DEG = 40.0  # the page's initial camera: vertical field of view (viser's default, 75, distorts a close head)
VIEW_DISTANCE = 3.6  # ... and distance from the head's centre in template radii (the head fills ~3/4 of the height)
PRESET_PROMPT = "(pick a keyframe)"  # the keyframe dropdown's resting value: picking a keyframe sets the sliders


@dataclass(frozen=True)
class PoseControl:
    """One pose slider: sets the entries ``index`` of the FlameParams field ``target`` to its value ("rotation": the
    head's Euler XYZ angles (pitch, yaw, roll)).  Rotations are shown in degrees (FLAME takes radians)."""

    name: str
    label: str
    target: str  # expression, jaw, neck, eyes or rotation
    index: tuple[int, ...]
    low: float
    high: float
    step: float
    hint: str

    @property
    def degrees(self) -> bool:
        return self.target != "expression"


# The handful of pose sliders (README "Viewer").  Expression coefficients mean what the FLAME's expression basis means:
# on the embedded synthetic FLAME components 0-4 are mouth open, smile, brows raise, frown, pucker; on FLAME 2023
# they are PCA components without such names (utils/motion.py).  Joints (jaw, neck, eyes, head) mean the same on
# every FLAME: x right-to-left of the subject, y up, z out of the face.
_SYNTHETIC_EXPRESSIONS = ("mouth open", "smile", "brows raise", "frown", "pucker")
POSE_CONTROLS: tuple[PoseControl, ...] = (
    PoseControl("jaw", "jaw open", "jaw", (0,), 0.0, 30.0, 0.5, "jaw opening: FLAME's jaw joint about x, degrees"),
    PoseControl("head_yaw", "head yaw", "rotation", (1,), -60.0, 60.0, 1.0,
                "head pose about y (FLAME's global rotation), degrees; + turns the face to the subject's left"),
    PoseControl("head_pitch", "head pitch", "rotation", (0,), -45.0, 45.0, 1.0,
                "head pose about x (FLAME's global rotation), degrees; + tips the chin down"),
    PoseControl("head_roll", "head roll", "rotation", (2,), -45.0, 45.0, 1.0,
                "head pose about z (FLAME's global rotation), degrees"),
    PoseControl("neck_yaw", "neck yaw", "neck", (1,), -40.0, 40.0, 1.0,
                "the head turned on the neck joint about y, degrees"),
    PoseControl("neck_pitch", "neck pitch", "neck", (0,), -40.0, 40.0, 1.0,
                "the head nodded on the neck joint about x, degrees (+: chin down)"),
    PoseControl("neck_roll", "neck roll", "neck", (2,), -40.0, 40.0, 1.0,
                "the head tilted on the neck joint about z, degrees"),
    PoseControl("eyes_yaw", "eyes yaw", "eyes", (1, 4), -30.0, 30.0, 1.0,
                "both eyeballs about y, degrees (+: look to the subject's left)"),
) + tuple(PoseControl(f"expr{i}", f"expression {i}", "expression", (i,), -3.0, 3.0, 0.05,
                      f"FLAME expression coefficient {i} (on the synthetic FLAME: {n}; on FLAME 2023 a PCA component)")
          for i, n in enumerate(_SYNTHETIC_EXPRESSIONS))


def pose_params(values: Sequence[float], controls: Sequence[PoseControl] = POSE_CONTROLS) -> FlameParams:
    """FlameParams (T = 1, zero shape) of slider ``values`` (one per control, degrees for rotations) in FLAME's
    canonical frame: head rotation from the head sliders, translation 0, scale 1; every other value 0."""
    if len(values) != len(controls):
        raise ValueError(f"pose_params: {len(values)} values for {len(controls)} controls")
    p = FlameParams.neutral(1)
    euler = np.zeros(3)
    for c, v in zip(controls, values):
        v = math.radians(v) if c.degrees else float(v)
        if c.target == "rotation":
            euler[list(c.index)] = v
        else:
            getattr(p, c.target)[0, list(c.index)] = v
    if euler.any():
        from scipy.spatial.transform import Rotation

        p.rotation_matrix[0] = torch.from_numpy(Rotation.from_euler(EULER_CONVENTION, euler).as_matrix()).float()
    return p


def keyframe_pose(key: Keyframe, controls: Sequence[PoseControl] = POSE_CONTROLS) -> tuple[float, ...]:
    """The slider values (one per control) of a keyframe of utils/motion.py (head rotation 0); ValueError when it sets
    FLAME values that the sliders do not cover."""
    want = keyframe_params([key], 1).frame(0)
    values = []
    for c in controls:
        v = 0.0 if c.target == "rotation" else float(getattr(want, c.target)[0, c.index[0]])
        values.append(math.degrees(v) if c.degrees else v)
    got = pose_params(values, controls)
    for name in ("expression", "jaw", "neck", "eyes"):
        if not torch.allclose(getattr(got, name), getattr(want, name), atol=1e-6):
            raise ValueError(f"keyframe {key.name!r} sets FLAME {name} values that the viewer's sliders do not cover")
    return tuple(values)


@dataclass
class ViewerConfig:
    """Settings of viewer.py."""

    checkpoint: str = "output/cpu/model.pt"  # trained model.pt (written by train.py)
    codes: list[str] = field(default_factory=list)  # code.pt files of track.py to offer besides the training identities
    code_dir: str = "output/tracking"  # folder searched (recursively) for code.pt files to offer ("" = none)
    host: str = "127.0.0.1"  # address to serve on; anything but a loopback address lets others on the network connect
    port: int = 8080  # port to serve on (if taken, viser takes the next free one; 0 = any free port)
    device: str = "auto"  # where the network runs: auto (GPU when there is one), cpu, cuda or cuda:N
    ply_dir: str = "output/viewer"  # the page's "Save PLY" button writes here
    method: str = "slerp"  # initial interpolation method: linear or slerp (spherical)
    flame_dir: str = ""  # FLAME files of the model, for the pose sliders ("" = found as animate.py finds them)
    lod: str = "off"  # level of detail sent to the page (opt-in, models/level_of_detail.py): off (full detail); auto
    #                   (the coarsest of the --lod_levels levels below the model's whose Gaussians stay under
    #                   --lod_footprint px in the browser's view, re-picked as the view orbits or zooms: zooming in
    #                   gets full detail back); or a subdivision level 0..the model's.  Each head (identity or pose
    #                   change) is merged once (one CPU thread: ~43 ms at level 2, 33,825 Gaussians; ~150 ms at level
    #                   3, 134,319) and cached: moving the view only switches between the cached levels.  Fewer
    #                   Gaussians on the wire and in the page's sort; Save PLY still writes full detail
    lod_levels: int = 1  # --lod auto: how many levels below the model's it may use (merged once per head)
    lod_footprint: float = 2.0  # --lod auto: screen footprint (px, median largest Gaussian std) a merged level may
    #                             reach (models/level_of_detail.py FOOTPRINT_PX)

    # checked with utils.core.config.check_ranges before the server starts
    RANGES = {"port": Range(0, 65535), "lod_levels": Range(1), "lod_footprint": Range(0, lo_open=True)}


VIEWER_LISTS = ("codes",)


@dataclass(frozen=True)
class ViewState:
    """The controls' values that determine the head (a snapshot read on the worker thread)."""

    a: str  # identity key A: a training identity name or a code.pt path
    b: str  # identity key B
    blend: float  # 0 = A, 1 = B
    method: str  # linear or slerp
    truncation: float  # psi: 1 = the identity, 0 = the average style
    pose: tuple[float, ...] = ()  # pose slider values in POSE_CONTROLS order (empty without the pose path)

    @property
    def identity(self) -> tuple:
        """The fields the network's output depends on (the pose is not one of them)."""
        return (self.a, self.b, self.blend, self.method, self.truncation)

