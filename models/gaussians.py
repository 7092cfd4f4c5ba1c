"""A container for 3D Gaussian clouds in activated (renderable) form.

Conventions (shared by every module, see README "Conventions"):
    means      (..., N, 3)   world-space centres, metres
    quats      (..., N, 4)   rotations as unit quaternions, **w, x, y, z**
    scales     (..., N, 3)   standard deviations along the local axes, linear (already exp'ed)
    opacities  (..., N)      in (0, 1)
    sh         (..., N, (d+1)^2, 3)  colour as real spherical-harmonics coefficients of degree d;
                             d = 0 stores only the DC term (RGB = SH_C0 * sh[..., 0, :] + 0.5)

Leading batch dimensions (``...``) are allowed so that a network can emit the Gaussians of B identities
at once; ``cloud[b]`` selects one.  PLY I/O works on unbatched clouds only.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from utils.core.atomic import atomic_write

# Zeroth-order real spherical harmonic, 1 / (2 sqrt(pi)).
SH_C0 = 0.28209479177387814


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """(..., 3) colours in [0, 1] -> (..., 3) DC coefficients."""
    return (rgb - 0.5) / SH_C0


def sh0_to_rgb(sh0: Tensor) -> Tensor:
    """(..., 3) DC coefficients -> (..., 3) colours (not clamped)."""
    return sh0 * SH_C0 + 0.5


def _logit(x: np.ndarray) -> np.ndarray:
    x = np.clip(x.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(x / (1 - x))


@dataclass
class GaussianCloud:
    """N anisotropic 3D Gaussians; see the module docstring for shapes and conventions."""

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    sh: Tensor

    # ------------------------------------------------------------------ basic container API
    def __post_init__(self) -> None:
        n = self.means.shape[-2] if self.means.dim() >= 2 else -1
        batch = tuple(self.means.shape[:-2])
        expected = {
            "means": batch + (n, 3),
            "quats": batch + (n, 4),
            "scales": batch + (n, 3),
            "opacities": batch + (n,),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if self.means.dim() < 2 or got != shape:
                raise ValueError(
                    f"GaussianCloud.{name} has shape {got}, expected {shape} "
                    f"(means must be (..., N, 3); got means {tuple(self.means.shape)})"
                )
        sh_shape = tuple(self.sh.shape)
        k = sh_shape[-2] if len(sh_shape) >= 2 else -1
        if (
            len(sh_shape) != len(batch) + 3
            or sh_shape[: len(batch) + 1] != batch + (n,)
            or sh_shape[-1] != 3
            or int(round(math.sqrt(max(k, 0)))) ** 2 != k
        ):
            raise ValueError(
                f"GaussianCloud.sh has shape {sh_shape}, expected {batch + (n,)} + ((d+1)^2, 3) for an SH degree d"
            )

    @property
    def sh_degree(self) -> int:
        return int(round(math.sqrt(self.sh.shape[-2]))) - 1

    @property
    def batch_shape(self) -> torch.Size:
        return self.means.shape[:-2]

    @property
    def device(self) -> torch.device:
        return self.means.device

    def __len__(self) -> int:
        """Number of Gaussians N (the last non-attribute dimension)."""
        return self.means.shape[-2]

    def __getitem__(self, index) -> "GaussianCloud":
        """Index the leading batch dimensions: ``cloud[b]`` of a (B, N, ...) cloud is an (N, ...) cloud."""
        if len(self.batch_shape) == 0:
            raise IndexError("GaussianCloud is not batched; there is nothing to index (use len() for N)")
        return self._map(lambda t: t[index])

    def _map(self, fn) -> "GaussianCloud":
        return GaussianCloud(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})

    def to(self, *args, **kwargs) -> "GaussianCloud":
        return self._map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "GaussianCloud":
        return self._map(lambda t: t.detach())

    def clone(self) -> "GaussianCloud":
        return self._map(lambda t: t.clone())

    def max_differences(self, other: "GaussianCloud") -> dict[str, float]:
        """Largest absolute difference of each attribute between two clouds of the same shape, as floats.

        ``quats`` is compared as a rotation: q and -q are the same rotation, and a unit quaternion whose w is near 0
        may come out with either sign under different rounding (GPU vs CPU, graph replay vs eager), so it counts
        min(|q1 - q2|, |q1 + q2|) per Gaussian; ``rotations`` is the largest entry of the rotation matrices' difference.
        """
        out = {k: float((getattr(self, k) - getattr(other, k)).abs().max())
               for k in ("means", "scales", "opacities", "sh")}
        a = self.quats / self.quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        b = other.quats / other.quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out["quats"] = float(torch.minimum((a - b).abs().amax(-1), (a + b).abs().amax(-1)).max())
        out["rotations"] = float((quat_to_rotmat(a) - quat_to_rotmat(b)).abs().max())
        return out

    @property
    def rgb(self) -> Tensor:
        """(..., N, 3) view-independent colour from the DC term."""
        return sh0_to_rgb(self.sh[..., 0, :])

    def covariances(self) -> Tensor:
        """(..., N, 3, 3) world-space covariances Sigma = R S S^T R^T (R from the quaternions, S = diag(scales))."""
        m = quat_to_rotmat(self.quats) * self.scales.unsqueeze(-2)  # R S
        return m @ m.transpose(-1, -2)

    @staticmethod
    def cat(clouds: Sequence["GaussianCloud"]) -> "GaussianCloud":
        """Concatenate clouds along the Gaussian dimension (all must share batch shape and SH degree)."""
        clouds = list(clouds)
        if not clouds:
            raise ValueError("GaussianCloud.cat needs at least one cloud")
        degrees = {c.sh_degree for c in clouds}
        if len(degrees) != 1:
            raise ValueError(f"cannot concatenate clouds of different SH degrees {sorted(degrees)}")
        return GaussianCloud(
            **{
                f.name: torch.cat(
                    [getattr(c, f.name) for c in clouds],
                    dim=-3 if f.name == "sh" else (-1 if f.name == "opacities" else -2),
                )
                for f in fields(GaussianCloud)
            }
        )

    @staticmethod
    def from_rgb(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, rgb: Tensor) -> "GaussianCloud":
        """Build a degree-0 cloud from plain colours (..., N, 3) in [0, 1]."""
        return GaussianCloud(means, quats, scales, opacities, rgb_to_sh0(rgb).unsqueeze(-2))

    def check_finite(self, what: str = "GaussianCloud") -> None:
        """Raise a ValueError naming the first attribute that holds NaN or Inf."""
        for f in fields(self):
            t = getattr(self, f.name)
            if not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{what}.{f.name} holds {bad} non-finite values (NaN or Inf)")

    # ------------------------------------------------------------------ PLY I/O (standard 3DGS layout)
    def save_ply(self, path: str | os.PathLike) -> None:
        """Write the standard 3DGS PLY layout read by SuperSplat, SIBR and other viewers.

        Properties: x y z nx ny nz f_dc_0..2 f_rest_0..(3*((d+1)^2-1)-1) opacity scale_0..2 rot_0..3, with opacity
        stored as a logit, scales as logs, rotation as w x y z, f_rest in channel-major order (all R, then G, then B)
        as the original 3DGS code writes it.  The file is written atomically.
        """
        from plyfile import PlyData, PlyElement

        if len(self.batch_shape) != 0:
            raise ValueError("save_ply needs an unbatched cloud; select one with cloud[b]")
        c = self.detach().to("cpu", torch.float32)
        n = len(c)
        k = c.sh.shape[-2]
        f_dc = c.sh[:, 0, :].numpy()
        f_rest = c.sh[:, 1:, :].permute(0, 2, 1).reshape(n, 3 * (k - 1)).numpy()
        names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
        names += [f"f_rest_{i}" for i in range(f_rest.shape[1])]
        names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
        columns = [
            c.means.numpy(),
            np.zeros((n, 3), np.float32),
            f_dc,
            f_rest,
            _logit(c.opacities.numpy())[:, None],
            np.log(np.clip(c.scales.numpy().astype(np.float64), 1e-30, None)),
            c.quats.numpy(),
        ]
        data = np.concatenate([col.astype(np.float32).reshape(n, -1) for col in columns], axis=1)
        vertex = np.empty(n, dtype=[(name, "f4") for name in names])
        for i, name in enumerate(names):
            vertex[name] = data[:, i]

        # unique O_EXCL temporary + rename (utils.core.atomic): no fixed "head.ply.tmp", never through a planted link
        atomic_write(path, lambda fh: PlyData([PlyElement.describe(vertex, "vertex")]).write(fh))

    @staticmethod
    def load_ply(path: str | os.PathLike, device: str | torch.device = "cpu") -> "GaussianCloud":
        """Read a PLY in the standard 3DGS layout (inverse of :meth:`save_ply`)."""
        from plyfile import PlyData

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Gaussian PLY not found: {path}")
        try:
            v = PlyData.read(str(path))["vertex"]
        except Exception as exc:  # plyfile raises several types for damaged files
            raise ValueError(f"{path} is not a readable PLY file with a 'vertex' element: {exc}") from exc
        props = [p.name for p in v.properties]
        required = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"] + [f"scale_{i}" for i in range(3)] + [
            f"rot_{i}" for i in range(4)
        ]
        missing = [p for p in required if p not in props]
        if missing:
            raise ValueError(f"{path} lacks 3DGS properties {missing}; found {props}")
        col = lambda name: np.asarray(v[name], dtype=np.float32)  # noqa: E731
        n_rest = len([p for p in props if p.startswith("f_rest_")])
        if n_rest % 3 != 0 or int(round(math.sqrt(n_rest // 3 + 1))) ** 2 != n_rest // 3 + 1:
            raise ValueError(f"{path} has {n_rest} f_rest properties, which fits no SH degree")
        n = len(v.data)
        f_dc = np.stack([col(f"f_dc_{i}") for i in range(3)], axis=1)[:, None, :]
        if n_rest:
            f_rest = np.stack([col(f"f_rest_{i}") for i in range(n_rest)], axis=1)
            f_rest = f_rest.reshape(n, 3, n_rest // 3).transpose(0, 2, 1)
            sh = np.concatenate([f_dc, f_rest], axis=1)
        else:
            sh = f_dc
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)  # noqa: E731
        opacity_logit = col("opacity").astype(np.float64)
        return GaussianCloud(
            means=t(np.stack([col("x"), col("y"), col("z")], axis=1)),
            quats=t(np.stack([col(f"rot_{i}") for i in range(4)], axis=1)),
            scales=t(np.exp(np.stack([col(f"scale_{i}") for i in range(3)], axis=1).astype(np.float64))),
            opacities=t(1.0 / (1.0 + np.exp(-opacity_logit))),
            sh=t(sh),
        )


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """(..., 4) quaternions w, x, y, z (normalised here) -> (..., 3, 3) rotation matrices."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(q.shape[:-1] + (3, 3))


def rotmat_to_quat(R: Tensor) -> Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions w, x, y, z with w >= 0."""
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cands = torch.stack(
        [
            torch.stack([1 + tr, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
            torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m[:, 0, 0] - m[:, 1, 1] - m[:, 2, 2],
                         m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0]], -1),
            torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0],
                         1 - m[:, 0, 0] + m[:, 1, 1] - m[:, 2, 2], m[:, 1, 2] + m[:, 2, 1]], -1),
            torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1],
                         1 - m[:, 0, 0] - m[:, 1, 1] + m[:, 2, 2]], -1),
        ],
        dim=1,
    )  # (M, 4 candidates, 4); the candidate with the largest diagonal term is numerically stable
    diag = torch.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    best = diag.argmax(-1)
    q = cands[torch.arange(m.shape[0], device=R.device), best]
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q = torch.where(q[:, :1] < 0, -q, q)
    return q.reshape(R.shape[:-2] + (4,))


def knn_scale_init(points: Tensor, k: int = 3) -> Tensor:
    """(N, 3) points -> (N,) mean distance to the k nearest neighbours.

    Replaces the original 3DGS repo's CUDA-only simple-knn with scipy's maintained cKDTree (CPU, any size).
    """
    from scipy.spatial import cKDTree

    pts = points.detach().cpu().double().numpy()
    if len(pts) < 2:
        return torch.full((len(pts),), 1e-3, dtype=points.dtype, device=points.device)
    kk = min(k, len(pts) - 1)
    dist, _ = cKDTree(pts).query(pts, k=kk + 1)
    d = np.asarray(dist)[:, 1:].mean(axis=1)
    return torch.from_numpy(np.maximum(d, 1e-7)).to(points.dtype).to(points.device)


def random_cloud(
    n: int,
    center: Iterable[float] = (0.0, 0.0, 0.0),
    radius: float = 0.1,
    scale_range: tuple[float, float] = (0.002, 0.01),
    sh_degree: int = 0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> GaussianCloud:
    """A random head-sized cloud for tests and benchmarks: N Gaussians inside a ball of ``radius`` metres."""
    g = generator
    c = torch.tensor(list(center), dtype=torch.float32)
    d = torch.randn(n, 3, generator=g)
    d = d / d.norm(dim=-1, keepdim=True) * torch.rand(n, 1, generator=g).pow(1 / 3) * radius
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    scales = torch.exp(lo + (hi - lo) * torch.rand(n, 3, generator=g))
    quats = torch.randn(n, 4, generator=g)
    quats = quats / quats.norm(dim=-1, keepdim=True)
    opac = 0.2 + 0.75 * torch.rand(n, generator=g)
    sh = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    sh[:, 0, :] = rgb_to_sh0(torch.rand(n, 3, generator=g))
    return GaussianCloud(c + d, quats, scales, opac, sh).to(device)
