"""FLAME tracking files: reading NeRSemble and VHAP parameter npz files into :class:`FlameParams`, and writing them.

NeRSemble stores the head rotation as Euler angles (``EULER_CONVENTION``) and/or rotation matrices about the model
origin, with one scale per sequence; VHAP stores axis-angle rotations about FLAME's root joint and no scale.  When a
NeRSemble file holds both ``rotation`` and ``rotation_matrices`` the matrices are used and the Euler angles are only
checked against them (a warning names the mismatch).
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from models.flame.files import PathLike
from models.flame.layer import FlameModel
from models.flame.params import (
    EULER_CONVENTION,
    NUM_EXPRESSION,
    NUM_SHAPE,
    FlameParams,
    _euler_from_rot,
    _pad_coeffs,
    _rot_from_euler,
    axis_angle_to_matrix,
)
from utils.core.atomic import atomic_write

_NERSEMBLE_KEYS = ("shape", "expression", "translation", "jaw", "neck", "eyes")
_VHAP_KEYS = ("shape", "expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")


def load_tracking(npz_path: PathLike, frame: Optional[int] = None, dtype: torch.dtype = torch.float32,
                  flame: Optional[FlameModel] = None) -> FlameParams:
    """Read a tracked FLAME parameter file, NeRSemble FLAME2023 or VHAP variant (auto-detected).

    NeRSemble: shape (1,300), expression (T,100), rotation (T,3) Euler ``EULER_CONVENTION`` and/or
    rotation_matrices (T,3,3) (preferred), translation (T,3), jaw, neck (T,3), eyes (T,6), scale (1,1).
    VHAP: shape (300,) or (1,300), expr (T,n), rotation (T,3) axis-angle applied about the root joint,
    neck_pose, jaw_pose (T,3), eyes_pose (T,6), translation (T,3), no scale (-> 1).
    ``frame``: index into the T axis (None = all frames).  ``flame``: when given, VHAP's root-joint pivot is
    baked into the translation so the result behaves like a NeRSemble file.
    """
    path = Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"tracking file {path} not found (expected the NeRSemble layout "
                                "<subject>/sequences/<seq>/annotations/tracking/FLAME2023_v2/tracked_flame_params.npz)")
    try:
        z = np.load(path, allow_pickle=False)
        files = set(z.files)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: could not read tracking .npz ({type(exc).__name__}: {exc}); the file is "
                         "truncated or not an .npz") from exc

    def get(key: str) -> np.ndarray:
        try:
            return np.asarray(z[key], dtype=np.float64)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
            raise ValueError(f"{path}: could not read key '{key}' ({type(exc).__name__}: {exc}); the file is "
                             "truncated or corrupt") from exc

    with z:
        if "expr" in files or "jaw_pose" in files:
            missing = [k for k in _VHAP_KEYS if k not in files]
            if missing:
                raise ValueError(f"{path}: VHAP tracking file lacks key(s) {missing} (has {sorted(files)})")
            expr = get("expr")
            T = expr.reshape(expr.shape[0], -1).shape[0] if expr.ndim > 1 else 1
            expr = expr.reshape(T, -1)
            if "static_offset" in files:
                warnings.warn(f"{path}: VHAP 'static_offset' is ignored (not part of FLAME)")
            rot = torch.as_tensor(get("rotation").reshape(T, 3))
            d = dict(shape=get("shape").reshape(1, -1), expression=expr,
                     rotation_matrix=axis_angle_to_matrix(rot).numpy(), translation=get("translation").reshape(T, 3),
                     jaw=get("jaw_pose").reshape(T, 3), neck=get("neck_pose").reshape(T, 3),
                     eyes=get("eyes_pose").reshape(T, 6), scale=np.ones((T, 1)))
            about_root = True
            file_keys = dict(expression="expr", rotation_matrix="rotation", jaw="jaw_pose", neck="neck_pose",
                             eyes="eyes_pose")
        else:
            missing = [k for k in _NERSEMBLE_KEYS if k not in files]
            if "rotation" not in files and "rotation_matrices" not in files:
                missing.append("rotation_matrices (or rotation)")
            if missing:
                raise ValueError(f"{path}: NeRSemble tracking file lacks key(s) {missing} (has {sorted(files)}); "
                                 "expected shape, expression, rotation/rotation_matrices, translation, jaw, neck, "
                                 "eyes, scale")
            expr = get("expression")
            expr = expr.reshape(-1, expr.shape[-1])
            T = expr.shape[0]
            if "rotation_matrices" in files:
                R = get("rotation_matrices").reshape(T, 3, 3)
                if "rotation" in files:
                    R_e = _rot_from_euler(get("rotation").reshape(T, 3))
                    err = np.abs(R_e - R).max()
                    if err > 1e-3:
                        warnings.warn(f"{path}: 'rotation' (Euler {EULER_CONVENTION}) disagrees with "
                                      f"'rotation_matrices' by {err:.3g}; using rotation_matrices")
            else:
                R = _rot_from_euler(get("rotation").reshape(T, 3))
            scale = get("scale").reshape(-1, 1) if "scale" in files else np.ones((1, 1))
            if scale.shape[0] not in (1, T):
                raise ValueError(f"{path}: key 'scale' has {scale.shape[0]} entries for {T} frames")
            d = dict(shape=get("shape").reshape(1, -1), expression=expr, rotation_matrix=R,
                     translation=get("translation").reshape(T, 3), jaw=get("jaw").reshape(T, 3),
                     neck=get("neck").reshape(T, 3), eyes=get("eyes").reshape(T, 6),
                     scale=np.broadcast_to(scale, (T, 1)))
            about_root = False
            file_keys = dict(rotation_matrix="rotation_matrices" if "rotation_matrices" in files else "rotation")
    d["shape"] = _pad_coeffs(d["shape"], NUM_SHAPE, "shape", path)
    d["expression"] = _pad_coeffs(d["expression"], NUM_EXPRESSION, "expression" if not about_root else "expr", path)
    if frame is not None:
        if not -T <= frame < T:
            raise IndexError(f"{path}: frame {frame} out of range (file has {T} frames)")
        d = {k: (v if k == "shape" else v[frame:frame + 1]) for k, v in d.items()}
    for k, v in d.items():  # caught here, not later as non-finite Gaussians or a failed subdivision
        finite = np.isfinite(np.asarray(v, dtype=np.float64)).reshape(len(v), -1).all(1)
        if not finite.all():
            rows = np.nonzero(~finite)[0]
            where = "" if k == "shape" else f" in frame row(s) {rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}"
            raise ValueError(f"{path}: key '{file_keys.get(k, k)}' holds NaN or Inf values{where}; expected finite "
                             f"tracked FLAME parameters (the tracking of this sequence failed: track it again)")
    params = FlameParams(**{k: torch.as_tensor(np.array(v), dtype=dtype) for k, v in d.items()},
                         rotate_about_root=about_root)
    if flame is not None and about_root:
        params = flame.bake_root_pivot(params)
    return params


def _np(t: Tensor) -> np.ndarray:
    """A tensor as a host numpy array."""
    return t.detach().cpu().numpy()


def save_nersemble_tracking(path: PathLike, params: FlameParams, frames: Optional[np.ndarray] = None) -> None:
    """Write ``params`` as a NeRSemble FLAME2023 tracking npz (Euler angles with ``EULER_CONVENTION``).

    ``scale`` is stored as (1,1) (NeRSemble keeps one scale per sequence): all frames must share it."""
    if params.rotate_about_root:
        raise ValueError("bake the VHAP root pivot first (FlameModel.bake_root_pivot) before saving as NeRSemble")
    scale = _np(params.scale)
    if not np.allclose(scale, scale[0, 0]):
        raise ValueError("NeRSemble tracking stores one scale per sequence; params.scale varies over frames")
    R = _np(params.rotation_matrix).astype(np.float64)
    T = R.shape[0]
    atomic_write(path, lambda fh: np.savez(
        fh, shape=_np(params.shape).astype(np.float32), expression=_np(params.expression).astype(np.float32),
             rotation=_euler_from_rot(R).astype(np.float32), rotation_matrices=R.astype(np.float32),
             translation=_np(params.translation).astype(np.float32), jaw=_np(params.jaw).astype(np.float32),
             neck=_np(params.neck).astype(np.float32), eyes=_np(params.eyes).astype(np.float32),
             scale=scale[:1, :1].astype(np.float32),
             frames=np.arange(T, dtype=np.int64) if frames is None else np.asarray(frames)))


def save_vhap_tracking(path: PathLike, shape: np.ndarray, expr: np.ndarray, rotation: np.ndarray,
                       translation: np.ndarray, jaw_pose: np.ndarray, neck_pose: np.ndarray,
                       eyes_pose: np.ndarray) -> None:
    """Write a VHAP-style npz (axis-angle ``rotation`` about the root joint, no scale); used by tests."""
    atomic_write(path, lambda fh: np.savez(
        fh, shape=np.asarray(shape, np.float32).reshape(-1), expr=np.asarray(expr, np.float32),
             rotation=np.asarray(rotation, np.float32), translation=np.asarray(translation, np.float32),
             jaw_pose=np.asarray(jaw_pose, np.float32), neck_pose=np.asarray(neck_pose, np.float32),
             eyes_pose=np.asarray(eyes_pose, np.float32), timestep_id=np.arange(len(expr))))

