"""Ground-truth Gaussian heads and their rendering.

Each identity is a Gaussian head on its posed FLAME surface (the whole head: face, scalp/hair, ears, neck,
eyeballs), one flat Gaussian per vertex of the mesh subdivided ``subdivision`` times, coloured by the procedural
per-identity texture (utils/data/synthetic/texture.py) with baked studio lighting, over a plain studio background.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.flame import (
    FlameModel,
    make_subdivision_plan,
    mouth_closing_faces,
    subdivide_vertices,
    subdivision_matrix,
    vertex_normals,
)
from models.gaussians import GaussianCloud, rotmat_to_quat
from models.renderer import render_batch
from utils.data.synthetic.flame_regions import face_regions, painting_masks, semantic_regions
from utils.data.synthetic.identity import SyntheticIdentity, _as_int
from utils.data.synthetic.texture import _anchors, albedo

LIGHT_DIR = np.array([0.35, 0.55, 1.0]) / np.linalg.norm([0.35, 0.55, 1.0])  # key light (towards the light)


class GroundTruthHeads:
    """Builds the ground-truth Gaussian head of any identity of one synthetic FLAME model.

    Args:
        flame_dir: folder with the FLAME-format files (read through models.flame.FlameModel, so the written files
            are what the heads are built from).
        model: the model dict (utils.data.synthetic.flame_model.make_flame_model) the files were written from; it
            carries the semantic regions.
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
