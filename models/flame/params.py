"""FLAME parameters of one identity over T frames (:class:`FlameParams`), their sizes and the rotation helpers.

Conventions:
    * FLAME model space: metres, y up, the face looks along +z.  FLAME always runs with zero global
      rotation; the tracked head pose is a similarity ``model_to_world = [scale * R | t]`` applied after it.
    * ``FlameParams`` holds one identity (``shape`` (1, 300)) over T frames.
    * Euler angles of NeRSemble's ``rotation`` key are read with ``EULER_CONVENTION`` (scipy notation,
      "XYZ" = intrinsic x, then y, then z: ``R = Rx(a) @ Ry(b) @ Rz(c)``, the same as pytorch3d's
      ``euler_angles_to_matrix(angles, "XYZ")``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from scipy.spatial.transform import Rotation
from torch import Tensor

NUM_SHAPE = 300
NUM_EXPRESSION = 100
NUM_JOINTS = 5  # global, neck, jaw, left eye, right eye
EULER_CONVENTION = "XYZ"  # scipy.spatial.transform notation (upper case = intrinsic)


def _rot_from_euler(angles: np.ndarray) -> np.ndarray:
    """(..., 3) Euler angles (``EULER_CONVENTION``) -> (..., 3, 3) rotation matrices."""
    return Rotation.from_euler(EULER_CONVENTION, angles).as_matrix()


def _euler_from_rot(mats: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotation matrices -> (..., 3) Euler angles (``EULER_CONVENTION``)."""
    return Rotation.from_matrix(mats).as_euler(EULER_CONVENTION)


def axis_angle_to_matrix(aa: Tensor) -> Tensor:
    """Rodrigues: (..., 3) axis-angle -> (..., 3, 3), differentiable and safe at zero."""
    theta = aa.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = aa / theta
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    K = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], dim=-1).reshape(aa.shape[:-1] + (3, 3))
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(K)
    return eye + s * K + (1 - c) * (K @ K)



@dataclass
class FlameParams:
    """FLAME parameters of one identity over T frames (torch tensors).

    shape (1,300), expression (T,100), rotation_matrix (T,3,3), translation (T,3), jaw (T,3) axis-angle,
    neck (T,3), eyes (T,6) (left eye then right eye, axis-angle), scale (T,1).
    ``rotate_about_root``: False (NeRSemble): world = scale * R @ v + t.  True (VHAP): the rotation acts
    about FLAME's root joint J0 (which depends on shape/expression): world = R @ (v - J0) + J0 + t; use
    :meth:`FlameModel.model_to_world` or :meth:`FlameModel.bake_root_pivot` to resolve it.
    """

    shape: Tensor
    expression: Tensor
    rotation_matrix: Tensor
    translation: Tensor
    jaw: Tensor
    neck: Tensor
    eyes: Tensor
    scale: Tensor
    rotate_about_root: bool = False

    _TENSORS = ("shape", "expression", "rotation_matrix", "translation", "jaw", "neck", "eyes", "scale")

    def __post_init__(self) -> None:
        T = self.expression.shape[0]
        expected = {"shape": (1, NUM_SHAPE), "expression": (T, NUM_EXPRESSION), "rotation_matrix": (T, 3, 3),
                    "translation": (T, 3), "jaw": (T, 3), "neck": (T, 3), "eyes": (T, 6), "scale": (T, 1)}
        for name, shp in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shp:
                raise ValueError(f"FlameParams.{name} has shape {got}, expected {shp}")

    @property
    def num_frames(self) -> int:
        return self.expression.shape[0]

    @property
    def device(self) -> torch.device:
        return self.expression.device

    def to(self, *args: Any, **kwargs: Any) -> "FlameParams":
        return replace(self, **{n: getattr(self, n).to(*args, **kwargs) for n in self._TENSORS})

    def frame(self, i: int) -> "FlameParams":
        """Select frame ``i`` (keeps a T=1 leading dim)."""
        return replace(self, **{n: getattr(self, n)[i:i + 1] for n in self._TENSORS if n != "shape"})

    def frames(self, index: Union[slice, Sequence[int], Tensor]) -> "FlameParams":
        """Select several frames (a slice, a list of indices or an index tensor); the shape is shared."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return replace(self, **{n: getattr(self, n)[index] for n in self._TENSORS if n != "shape"})

    @classmethod
    def cat(cls, params: Sequence["FlameParams"]) -> "FlameParams":
        """Concatenate the frames of several FlameParams of one identity (their shapes must agree)."""
        params = list(params)
        if not params:
            raise ValueError("FlameParams.cat needs at least one FlameParams")
        first = params[0]
        for p in params[1:]:
            if p.rotate_about_root != first.rotate_about_root or not torch.equal(p.shape, first.shape):
                raise ValueError("FlameParams.cat: the parts differ in shape coefficients or head-pose convention")
        return replace(first, **{n: torch.cat([getattr(p, n) for p in params]) for n in cls._TENSORS if n != "shape"})

    def as_dict(self) -> dict[str, Tensor]:
        """Plain CPU tensors by field name (what model.pt and code.pt store; loads with torch.load(weights_only=True)).

        The head pose must be in the NeRSemble convention (``FlameModel.bake_root_pivot`` first for VHAP files)."""
        if self.rotate_about_root:
            raise ValueError("FlameParams.as_dict: bake the VHAP root pivot first (FlameModel.bake_root_pivot)")
        return {n: getattr(self, n).detach().cpu().clone() for n in self._TENSORS}

    @classmethod
    def from_dict(cls, d: dict, where: str = "<dict>") -> "FlameParams":
        """Inverse of :meth:`as_dict`; a missing key or a wrong shape raises ValueError naming ``where``."""
        missing = [n for n in cls._TENSORS if n not in d]
        if missing:
            raise ValueError(f"{where}: FLAME parameters lack {missing} (have {sorted(d)})")
        try:
            return cls(**{n: torch.as_tensor(d[n]).float() for n in cls._TENSORS})
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    @classmethod
    def neutral(cls, num_frames: int = 1, dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> "FlameParams":
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(shape=z(1, NUM_SHAPE), expression=z(num_frames, NUM_EXPRESSION),
                   rotation_matrix=torch.eye(3, dtype=dtype, device=device).repeat(num_frames, 1, 1),
                   translation=z(num_frames, 3), jaw=z(num_frames, 3), neck=z(num_frames, 3),
                   eyes=z(num_frames, 6), scale=torch.ones(num_frames, 1, dtype=dtype, device=device))

    @classmethod
    def from_numpy(cls, d: dict, dtype: torch.dtype = torch.float32) -> "FlameParams":
        """Build from a dict of arrays with the field names (shorter shape/expression are zero-padded)."""
        T = np.asarray(d["expression"]).reshape(-1, np.asarray(d["expression"]).shape[-1]).shape[0]
        vals = {}
        for n in cls._TENSORS:
            a = np.asarray(d[n], dtype=np.float64)
            if n == "shape":
                a = _pad_coeffs(a.reshape(1, -1), NUM_SHAPE, "shape", "<dict>")
            elif n == "expression":
                a = _pad_coeffs(a.reshape(T, -1), NUM_EXPRESSION, "expression", "<dict>")
            elif n == "scale":
                a = np.broadcast_to(a.reshape(-1, 1), (T, 1))
            vals[n] = torch.as_tensor(np.array(a), dtype=dtype)
        return cls(**vals, rotate_about_root=bool(d.get("rotate_about_root", False)))

    def model_to_world(self, root_joint: Optional[Tensor] = None) -> Tensor:
        """(T,4,4) similarity [scale*R | t] mapping FLAME model space (zero global rotation) to world.

        ``root_joint`` (T,3) or (3,) is needed only when ``rotate_about_root`` (VHAP files)."""
        T = self.num_frames
        M = torch.zeros(T, 4, 4, dtype=self.translation.dtype, device=self.device)
        sR = self.scale[:, :, None] * self.rotation_matrix
        M[:, :3, :3] = sR
        t = self.translation
        if self.rotate_about_root:
            if root_joint is None:
                raise ValueError("these FlameParams rotate about FLAME's root joint (VHAP tracking); call "
                                 "FlameModel.model_to_world(params) or pass root_joint")
            j = root_joint.reshape(-1, 3).expand(T, 3)
            t = t + j - (sR @ j[:, :, None])[..., 0]
        M[:, :3, 3] = t
        M[:, 3, 3] = 1
        return M


def _pad_coeffs(a: np.ndarray, n: int, key: str, path: Any) -> np.ndarray:
    """(..., k) coefficients -> (..., n), zero-padded; more than n raise ValueError naming ``path`` and ``key``."""
    if a.shape[-1] > n:
        raise ValueError(f"{path}: key '{key}' has {a.shape[-1]} coefficients, FLAME 2023 uses at most {n}")
    if a.shape[-1] < n:  # fewer coefficients = the rest are zero
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (n - a.shape[-1],), a.dtype)], axis=-1)
    return a
