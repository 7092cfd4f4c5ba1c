"""Multi-identity, multi-view training data held on the device: cropped face-masked photos, cameras, face meshes.

Every identity contributes one frame seen by up to 16 cameras.  Photos are face-masked on black (the paper's
protocol), cropped to a window of one common size around each view's face mask (the mask covers a fraction of a
NeRSemble frame, so rendering and losses need not touch the rest), and stored as uint8 on the training device:
a batch is then a gather, with no host transfer in the training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from models.camera import Camera
from models.flame import FlameModel, face_mask_topology, make_subdivision_plan
from utils.data.nersemble import (
    HELDOUT_IDENTITIES,
    HELDOUT_SERIALS,
    NersembleSubject,
    list_subjects,
)


@dataclass
class DataConfig:
    root: str = ""  # folder of NeRSemble subject folders (or a synthetic dataset folder holding subjects/ and flame/)
    flame_dir: str = "data"  # folder with flame2023.pkl, flame_static_embedding.pkl and the face mask
    subjects: list[str] = field(default_factory=list)  # identities to use (empty: every subject in root)
    exclude_heldout_identities: bool = True  # drop the 8 protocol test identities from training
    heldout_identities: list[str] = field(default_factory=lambda: list(HELDOUT_IDENTITIES))  # protocol test ids
    heldout_serials: list[str] = field(default_factory=lambda: list(HELDOUT_SERIALS))  # novel-view test cameras
    sequence: str = "EXP-1-head"  # sequence whose frame is used
    frame: int = 0  # frame index within the sequence
    image_scale: float = 1.0  # resize factor applied to the images-2x photos
    crop_margin: float = 0.1  # crop = face-mask box grown by this fraction on each side
    crop_multiple: int = 16  # crop sizes are rounded up to a multiple of this (tile-friendly)
    subdivision: int = 2  # subdivision level of the face-mask mesh carrying the Gaussians (paper: 2)
    close_mouth: bool = True  # add triangles that close FLAME's open mouth to the face mask


def resolve_roots(cfg: DataConfig) -> tuple[Path, Path]:
    """(subjects folder, FLAME folder); a synthetic dataset folder holds both as subjects/ and flame/."""
    root = Path(cfg.root)
    if not cfg.root:
        raise ValueError("no data root given: pass --data_root DIR (a folder of NeRSemble subjects)")
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root}")
    flame_dir = Path(cfg.flame_dir)
    if (root / "subjects").is_dir():
        if (root / "flame").is_dir() and cfg.flame_dir in ("", "data"):
            flame_dir = root / "flame"
        root = root / "subjects"
    return root, flame_dir


def crop_window(mask: np.ndarray, cw: int, ch: int) -> tuple[int, int]:
    """Top-left corner (x0, y0) of a cw x ch window centred on the bounding box of ``mask`` (H, W, 1), kept inside
    the image."""
    H, W = mask.shape[:2]
    ys, xs = np.nonzero(mask[..., 0] > 0.5)
    cy, cx = ((ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2) if len(xs) else (H / 2, W / 2)
    x0 = int(round(cx - cw / 2))
    y0 = int(round(cy - ch / 2))
    return min(max(0, x0), max(0, W - cw)), min(max(0, y0), max(0, H - ch))


def crop_size(masks: Sequence[np.ndarray], margin: float, multiple: int) -> tuple[int, int]:
    """One crop size (cw, ch) that holds every mask's bounding box grown by ``margin`` on each side, rounded up to
    a multiple of ``multiple`` and at most the image size.  masks: (H, W, 1) arrays of one image size."""
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask[..., 0] > 0.5)
        if len(xs):
            boxes.append((xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
    H, W = masks[0].shape[:2]
    bw = max((b[0] for b in boxes), default=W)
    bh = max((b[1] for b in boxes), default=H)
    cw = min(W, int(math.ceil(bw * (1 + 2 * margin) / multiple) * multiple))
    ch = min(H, int(math.ceil(bh * (1 + 2 * margin) / multiple) * multiple))
    return cw, ch


def crop_view(image: np.ndarray, mask: np.ndarray, camera: Camera, cw: int, ch: int
              ) -> tuple[np.ndarray, np.ndarray, Camera]:
    """Crop one view (image (H, W, C), mask (H, W, 1), its camera) to the cw x ch window around the mask."""
    x0, y0 = crop_window(mask, cw, ch)
    return image[y0 : y0 + ch, x0 : x0 + cw], mask[y0 : y0 + ch, x0 : x0 + cw], camera.cropped(x0, y0, cw, ch)


class MultiViewDataset:
    """Face-masked, cropped views of many identities, on one device.

    Attributes:
        identities: list of I subject ids.
        serials: list of S camera serials present for every identity.
        images: (I, S, h, w, 3) uint8 face-masked photos on black, cropped.
        masks: (I, S, h, w, 1) uint8 face masks (0/255), cropped.
        cameras: I lists of S cropped Cameras (on the device).
        base_vertices: (I, M, 3) world-space face-mask vertices (subdivision level 0).
        flame_params: I FlameParams (T = 1) of the frames the base vertices come from (None when built from views
            without them).
        template: (M, 3) canonical face-mask vertices (FLAME template), base_faces (F, 3).
        plan: the subdivision plan from level 0 to ``cfg.subdivision``.
    """

    def __init__(self, cfg: DataConfig, device: torch.device | str = "cpu", identities: Sequence[str] | None = None,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        root, flame_dir = resolve_roots(cfg)
        self.root, self.flame_dir = root, flame_dir
        if identities is None:
            identities = list(cfg.subjects) or list_subjects(root)
            if cfg.exclude_heldout_identities:
                identities = [s for s in identities if s not in set(cfg.heldout_identities)]
        if not identities:
            raise ValueError(f"no training identities in {root} "
                             f"(after excluding held-out ids {cfg.heldout_identities})")
        self.identities = list(identities)
        self.flame = FlameModel.from_data_dir(flame_dir)
        self.mask_ids, self.base_faces = face_mask_topology(self.flame, flame_dir, cfg.close_mouth)
        self.template = self.flame.v_template[torch.as_tensor(self.mask_ids)].float()
        self.plan = make_subdivision_plan(len(self.mask_ids), self.base_faces, cfg.subdivision)
        self.faces = torch.as_tensor(self.plan.faces[cfg.subdivision])

        subjects = [NersembleSubject(root, s, cfg.sequence, cfg.frame) for s in self.identities]
        serial_sets = [set(s.serials()) for s in subjects]
        common = [s for s in subjects[0].serials() if all(s in ss for ss in serial_sets)]
        if not common:
            raise ValueError(f"the identities {self.identities} share no camera with an image")
        self.serials = common
        self.train_serials = [s for s in common if s not in set(cfg.heldout_serials)]
        self.eval_serials = [s for s in common if s in set(cfg.heldout_serials)]
        if not self.train_serials:
            raise ValueError(f"every camera {common} is a held-out camera; nothing to train on")

        raw = []
        it = tqdm(subjects, desc="loading identities", disable=not progress, leave=False)
        for subj in it:
            cams = subj.cameras(cfg.image_scale, common)
            views = []
            for s in common:
                img = subj.masked_image(s, cfg.image_scale)
                mask = subj.facemask(s, cfg.image_scale)
                if img.shape[:2] != (cams[s].height, cams[s].width) or mask.shape[:2] != img.shape[:2]:
                    raise ValueError(f"{subj}: camera {s} image/mask/camera sizes disagree")
                views.append((img, mask, cams[s]))
            raw.append(views)
        with torch.no_grad():
            verts, self.flame_params = [], []
            for subj in subjects:
                params = subj.frame_params(self.flame)  # the tracking row of cfg.frame, VHAP pivot baked
                self.flame_params.append(params)
                verts.append(self.flame(params)[0, torch.as_tensor(self.mask_ids)])
        self._set_views(raw, torch.stack(verts).float())

    @classmethod
    def from_views(cls, cfg: DataConfig, identities: Sequence[str], serials: Sequence[str], views: list,
                   base_vertices: Tensor, template: Tensor, mask_ids: np.ndarray, base_faces: np.ndarray,
                   device: torch.device | str = "cpu", flame_params: list | None = None) -> "MultiViewDataset":
        """Build from data already in memory (benchmarks, tests): no files are read.

        Args:
            views: per identity, per serial, a tuple (masked image (H, W, 3) float in [0, 1], mask (H, W, 1),
                Camera), as the subject reader returns them.
            base_vertices: (I, M, 3) world-space face-mask vertices; template (M, 3) canonical ones;
            mask_ids (M,) FLAME vertex ids; base_faces (F, 3) mask triangles.
            flame_params: optional FlameParams (T = 1) of each identity's frame (model.pt stores them).
        """
        self = cls.__new__(cls)
        self.cfg, self.device = cfg, torch.device(device)
        self.root = self.flame_dir = None
        self.flame = None
        self.flame_params = flame_params
        self.identities = list(identities)
        self.mask_ids, self.base_faces = np.asarray(mask_ids), np.asarray(base_faces)
        self.template = torch.as_tensor(template).float()
        self.plan = make_subdivision_plan(len(self.mask_ids), self.base_faces, cfg.subdivision)
        self.faces = torch.as_tensor(self.plan.faces[cfg.subdivision])
        self.serials = list(serials)
        self.train_serials = [s for s in self.serials if s not in set(cfg.heldout_serials)]
        self.eval_serials = [s for s in self.serials if s in set(cfg.heldout_serials)]
        self._set_views(views, torch.as_tensor(base_vertices).float())
        return self

    def _set_views(self, raw: list, base_vertices: Tensor) -> None:
        """Crop every view to one common window around its face mask and move everything to the device."""
        cfg = self.cfg
        cw, ch = crop_size([np.asarray(m) for views in raw for _, m, _ in views], cfg.crop_margin, cfg.crop_multiple)
        self.crop_size = (cw, ch)
        imgs, msks, cams_all = [], [], []
        for views in raw:
            cropped = [crop_view(np.asarray(i), np.asarray(m), c, cw, ch) for i, m, c in views]
            imgs.append(np.stack([v[0] for v in cropped]))
            msks.append(np.stack([v[1] for v in cropped]))
            cams_all.append([v[2].to(self.device) for v in cropped])
        to_u8 = lambda a: torch.from_numpy(np.clip(np.rint(np.stack(a) * 255), 0, 255).astype(np.uint8))  # noqa: E731
        self.images = to_u8(imgs).to(self.device)
        self.masks = to_u8(msks).to(self.device)
        self.cameras = cams_all
        self.base_vertices = base_vertices.to(self.device)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.identities)

    def serial_index(self, serials: Sequence[str]) -> list[int]:
        return [self.serials.index(s) for s in serials]
