"""Auto-decoder training of the identity field: codes and network learned jointly from multi-view photos.

Each step draws B identities and C training cameras per identity, emits the B Gaussian clouds in one network pass,
renders each identity's C views in one rasterizer call, and minimises 0.8 * L1 + 0.2 * (1 - SSIM) against the
face-masked photos on black, plus light regularisers.  Runs on one device or under ``torchrun`` (DDP: the global batch
of B identities is split across ranks, so N ranks take the same steps as one process with the same global batch).
"""
from __future__ import annotations

import math
import os
import random
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from models.flame import subdivide_vertices
from models.identity_field import IdentityField, IdentityFieldConfig
from models.mip_filter import sampling_rate
from models.renderer import render_identities
from utils.core.config import Range, check_ranges, to_dict
from utils.core.device import resolve_device
from utils.core.io import (
    FolderInUseError,
    FolderLock,
    UnsafeFileError,
    atomic_torch_save,
    atomic_write_json,
    remove_orphan_temps,
    safe_torch_load,
    save_image_grid,
)
from utils.data.dataset import DataConfig, MultiViewDataset
from utils.data.model_file import save_model
from utils.face.regions import (
    embedding_for_flame,
    eye_region_masks,
    nanmean,
    region_metrics,
)
from utils.losses import l1, lpips_available, lpips_loss, psnr, ssim


@dataclass
class LossConfig:
    l1_weight: float = 0.8  # weight of the L1 photometric term (paper: 0.8)
    ssim_weight: float = 0.2  # weight of (1 - SSIM) (paper: 0.2)
    lpips_weight: float = 0.0  # weight of LPIPS (optional: needs the lpips package, torchvision and its weights)
    lpips_net: str = "vgg"  # LPIPS backbone
    code_reg: float = 0.0  # weight of the mean squared code norm (the paper's cs_reg_weight)
    offset_reg: float = 1e-3  # weight of the squared Gaussian offsets (edge units): keeps Gaussians on the surface
    scale_reg: float = 1e-3  # weight of squared log-scale growth beyond the edge-length initialisation
    eye_weight: float = 0.0  # weight of an extra L1 term inside each view's eye regions (utils/face/regions.py; 0: off)


@dataclass
class OptimConfig:
    lr_network: float = 5e-3  # Adam learning rate of the mapping and synthesis networks
    lr_codes: float = 1e-2  # Adam learning rate of the identity codes
    lr_template: float = 1e-2  # Adam learning rate of the per-vertex template features
    lr_final_ratio: float = 0.1  # learning rates decay exponentially to this fraction at the last step
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.99  # Adam beta2
    grad_clip: float = 0.0  # clip the global gradient norm to this value (0: off)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: IdentityFieldConfig = field(default_factory=IdentityFieldConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    out: str = "output/train"  # output folder: checkpoints, model.pt, metrics.json, tensorboard logs
    steps: int = 300000  # optimisation steps
    batch_identities: int = 4  # identities per step (global batch, split across ranks)
    batch_views: int = 4  # training cameras rendered per identity and step
    eval_every: int = 5000  # evaluate on the held-out cameras every N steps (and at the end)
    eval_identities: int = 16  # identities evaluated (the first N; 0: all)
    log_every: int = 50  # tensorboard scalars every N steps
    image_every: int = 1000  # tensorboard image grid every N steps
    ckpt_every: int = 5000  # resumable checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2  # how many checkpoints to keep on disk
    seed: int = 0  # seed of the network initialisation and of the batch sampler
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    backend: str = "auto"  # rasterizer: auto (gsplat on CUDA, else torch), torch, gsplat, inria
    precision: str = "tf32"  # CUDA matmuls of the network: fp32, tf32 (TensorFloat-32) or bf16 (autocast); no effect on CPU
    compile: bool = False  # torch.compile the network's forward (CUDA; the first steps compile for a minute)
    progress: bool = True  # show tqdm progress bars


# Allowed values, checked before anything runs (a bad value must not train for minutes or export an empty model).
TRAIN_RANGES: dict[str, Range] = {
    "steps": Range(1), "batch_identities": Range(1), "batch_views": Range(1), "eval_every": Range(1),
    "eval_identities": Range(0), "log_every": Range(1), "image_every": Range(1), "ckpt_every": Range(1),
    "keep_checkpoints": Range(1), "seed": Range(0),
    "data.subdivision": Range(0, 3),  # level 3 of real FLAME: 187,219 vertices; each level has 4x the triangles
    "data.frame": Range(0), "data.image_scale": Range(0, 1, lo_open=True), "data.crop_margin": Range(0),
    "data.crop_multiple": Range(1),
    "model.code_dim": Range(1), "model.style_dim": Range(1), "model.mapping_layers": Range(1), "model.hidden": Range(1),
    "model.synth_layers": Range(0), "model.feat_dim": Range(0), "model.fourier_freqs": Range(0),
    "model.gaussians_per_vertex": Range(1), "model.sh_degree": Range(0, 3),
    "model.init_opacity": Range(0, 1, lo_open=True, hi_open=True), "model.filter_3d": Range(0),
    "model.filter_2d": Range(0),
    "model.w_avg_beta": Range(0, 1, hi_open=True),  # EMA decay; 1 would keep the average style at zero
    "loss.l1_weight": Range(0), "loss.ssim_weight": Range(0), "loss.lpips_weight": Range(0), "loss.code_reg": Range(0),
    "loss.offset_reg": Range(0), "loss.scale_reg": Range(0), "loss.eye_weight": Range(0),
    "optim.lr_network": Range(0), "optim.lr_codes": Range(0), "optim.lr_template": Range(0),
    "optim.lr_final_ratio": Range(0, 1, lo_open=True), "optim.beta1": Range(0, 1, hi_open=True),
    "optim.beta2": Range(0, 1, hi_open=True), "optim.grad_clip": Range(0),
}
# What a training run writes into --out (a fresh run refuses a folder holding any of them unless told to overwrite).
RUN_OUTPUTS = ("model.pt", "metrics.json", "eval_heldout_views.png", "checkpoints/ckpt_*.pt",
               "tb/events.out.tfevents.*")
CHECKPOINT_KEYS = ("step", "elapsed", "config", "identities", "field", "optimizer", "sampler", "torch_rng")


PRECISIONS = ("fp32", "tf32", "bf16")


def validate_config(cfg: "TrainConfig") -> None:
    """Range checks of TRAIN_RANGES and the choice fields (ValueError naming the flag)."""
    check_ranges(cfg, TRAIN_RANGES)
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")


def run_outputs(out: Path) -> list[Path]:
    """Files of a training run present in the folder ``out`` (see RUN_OUTPUTS)."""
    return sorted(p for pattern in RUN_OUTPUTS for p in out.glob(pattern) if p.is_file())


# ---------------------------------------------------------------------------------------------- distributed
def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def launched_by_torchrun() -> bool:
    """True under torchrun (it sets RANK, WORLD_SIZE and the rendezvous address for every process)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device_name: str) -> tuple[torch.device, int, int]:
    """Join the process group when launched by torchrun (also with one process, so that the DDP path is the one
    that runs); return (device, rank, world size)."""
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if launched_by_torchrun() and dist.is_available() and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world, local = _dist_info()
    if dist.is_available() and dist.is_initialized():
        dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    else:
        dev = resolve_device(device_name)
    return dev, rank, world


class _BatchForward(nn.Module):
    """Codes lookup + network forward in one module, so DDP sees every parameter in its forward."""

    def __init__(self, field: IdentityField) -> None:
        super().__init__()
        self.field = field

    def forward(self, ids: Tensor, vertices: Tensor):
        return self.field(self.field.codes(ids), vertices, return_aux=True)


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns data, network, optimiser, checkpoints and logs of one training run.

    The output folder ``cfg.out`` is locked for the process (utils.core.io.FolderLock) from construction until
    :meth:`close` (called at the end of :meth:`run`); a fresh run (no ``resume``) refuses a folder that already holds
    a run (RUN_OUTPUTS) unless ``overwrite``, which first removes those files.  ``resume`` continues from the newest
    readable checkpoint (older ones are tried when the newest is damaged, with a message).
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, data: MultiViewDataset | None = None,
                 overwrite: bool = False) -> None:
        if resume and overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        validate_config(cfg)
        self.cfg = cfg
        self.device, self.rank, self.world = init_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.ddp = dist.is_available() and dist.is_initialized()
        if cfg.batch_identities % self.world != 0:
            raise ValueError(
                f"batch_identities={cfg.batch_identities} must be divisible by the number of ranks ({self.world})"
            )
        if cfg.loss.lpips_weight > 0 and not lpips_available(cfg.loss.lpips_net):
            raise ValueError(
                f"loss.lpips_weight={cfg.loss.lpips_weight} needs LPIPS, which is not usable here: pip install lpips "
                f"(it needs torchvision and downloads the {cfg.loss.lpips_net} weights once), or set loss.lpips_weight 0"
            )
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.lock = FolderLock(self.out) if self.is_main else None
        if self.lock is not None:
            weakref.finalize(self, self.lock.release)
        self._on_main(lambda: self._claim_output(resume, overwrite))
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.data = data if data is not None else MultiViewDataset(
            cfg.data, self.device, progress=cfg.progress and self.is_main)
        template = subdivide_vertices(self.data.template, self.data.plan)
        if cfg.batch_identities > len(self.data):
            # each identity would be rendered several times a step (a batch of 100 over 4 identities: ~100 renders)
            raise ValueError(f"--batch_identities={cfg.batch_identities} exceeds the {len(self.data)} training "
                             f"identities of {cfg.data.root}: use at most {len(self.data)}")
        self.field = IdentityField(cfg.model, len(self.data), template, self.data.faces).to(self.device)
        self.plan = self.data.plan.to(self.device)
        if cfg.model.filter_3d > 0:  # Mip-Splatting: each vertex's highest sampling rate in the training views
            tr = self.data.serial_index(self.data.train_serials)
            verts = subdivide_vertices(self.data.base_vertices, self.plan)
            self.field.set_sampling_rate(sampling_rate(verts, [[cams[v] for v in tr] for cams in self.data.cameras]))
        self.filter_2d = cfg.model.filter_2d if cfg.model.filter_2d > 0 else None  # None: classic 0.3 px^2 dilation
        self.eye_landmarks = embedding_for_flame(self.data.flame, self.data.mask_ids)  # None: no eye-region metrics
        self.eye_masks = self._eye_masks() if cfg.loss.eye_weight > 0 else None  # (I, S, h, w, 1) uint8
        self.module: nn.Module = _BatchForward(self.field)
        if cfg.compile and self.device.type == "cuda":
            self.module = torch.compile(self.module)
        if self.device.type == "cuda":
            # process-wide switch (torch has no per-module one); only the network's matmuls are affected:
            # the rasterizer and SSIM kernels compute in fp32 regardless
            torch.backends.cuda.matmul.allow_tf32 = cfg.precision in ("tf32", "bf16")
            torch.backends.cudnn.allow_tf32 = cfg.precision in ("tf32", "bf16")
        if self.ddp:
            self.module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        o = cfg.optim
        groups = self.field.param_groups(o.lr_network, o.lr_codes, lr_template=o.lr_template)
        for g in groups:
            g["initial_lr"] = g["lr"]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.Adam(groups, betas=(o.beta1, o.beta2), **({"fused": True} if fused else {}))
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.train_ids = torch.as_tensor(self.data.serial_index(self.data.train_serials))
        if len(self.train_ids) < cfg.batch_views:
            raise ValueError(
                f"batch_views={cfg.batch_views} but only {len(self.train_ids)} training cameras exist"
            )
        if resume:
            self._resume()
        self.writer = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # training must not fail for want of a logger
                print("tensorboard is not installed (pip install tensorboard): training without tensorboard logs")
            else:
                self.writer = SummaryWriter(str(self.out / "tb"))

    @torch.no_grad()
    def _eye_masks(self) -> Tensor:
        """Eye regions of every identity's views (I, S, h, w, 1) uint8 on the device, for ``loss.eye_weight``."""
        if self.eye_landmarks is None:
            raise ValueError("loss.eye_weight needs FLAME's eye landmarks on the face mask (flame_static_embedding.pkl "
                             f"in {self.data.flame_dir}, and a face mask that holds the eyes); set loss.eye_weight 0")
        masks = [eye_region_masks(self.eye_landmarks(self.data.base_vertices[i]), self.data.cameras[i],
                                  self.data.masks[i].float() / 255.0) for i in range(len(self.data))]
        return (torch.stack(masks) > 0.5).to(torch.uint8)

    # ------------------------------------------------------------------ the output folder
    def _on_main(self, fn):
        """Run ``fn`` on rank 0 and hand its result to every rank; an error there is raised on every rank (one rank
        failing alone would leave the others waiting in a collective)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except (OSError, ValueError) as exc:
                if not self.ddp:
                    raise
                error = exc
        if self.ddp:
            box = [result, None if error is None else (type(error).__name__, str(error))]
            dist.broadcast_object_list(box, src=0)
            result, err = box
            if err is not None:
                if error is not None:
                    raise error
                kinds = {c.__name__: c for c in (FileExistsError, FolderInUseError, UnsafeFileError, OSError)}
                raise kinds.get(err[0], ValueError)(err[1])
        return result

    def _claim_output(self, resume: bool, overwrite: bool) -> None:
        """Rank 0: lock ``out``; refuse a folder holding another run unless resuming it or told to overwrite."""
        self.lock.acquire()
        # temporaries of writers killed halfway (kill -9) in an earlier run: orphans now that the folder is ours
        orphans = [p for d in (self.out, self.ckpt_dir) for p in remove_orphan_temps(d)]
        if orphans:
            print(f"removed {len(orphans)} temporary file(s) left by an interrupted run in {self.out}: "
                  f"{', '.join(str(p.relative_to(self.out)) for p in orphans[:4])}{' ...' if len(orphans) > 4 else ''}")
        found = run_outputs(self.out)
        has_ckpt = any(p.parent == self.ckpt_dir for p in found)
        # --resume without a checkpoint starts from scratch, as a run killed before its first checkpoint needs (its
        # logs and metrics are replaced); only a finished run's model.pt, written after its last checkpoint, stops it
        if not found or (resume and (has_ckpt or not (self.out / "model.pt").is_file())):
            return
        if overwrite:
            for p in found:
                p.unlink(missing_ok=True)
            print(f"--overwrite: removed {len(found)} file(s) of the previous run in {self.out}")
            return
        names = ", ".join(str(p.relative_to(self.out)) for p in found[:4]) + (" ..." if len(found) > 4 else "")
        if resume:
            raise FileExistsError(f"--resume: {self.ckpt_dir} holds no checkpoint, but {self.out} holds the model.pt "
                                  f"of a finished run ({names}); pass --overwrite (without --resume) to replace it, "
                                  f"or choose another --out")
        raise FileExistsError(f"{self.out} already holds a training run ({names}); pass --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")

    def close(self) -> None:
        """Close the logs and release the lock on the output folder."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ schedule and sampling
    def _set_lr(self) -> None:
        frac = self.step / max(1, self.cfg.steps)
        mult = self.cfg.optim.lr_final_ratio ** frac
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * mult

    def sample_batch(self) -> tuple[Tensor, Tensor]:
        """Global batch: identity ids (B,) and training-camera ids (B, C), same on every rank."""
        B, C = self.cfg.batch_identities, self.cfg.batch_views
        I = len(self.data)
        ids = torch.randperm(I, generator=self.sampler)[: min(B, I)]
        if B > I:
            ids = torch.cat([ids, torch.randint(I, (B - I,), generator=self.sampler)])
        views = torch.stack([torch.randperm(len(self.train_ids), generator=self.sampler)[:C] for _ in range(B)])
        return ids, self.train_ids[views]

    def vertices(self, ids: Tensor) -> Tensor:
        """(B, V, 3) world-space subdivided face-mask vertices of identities ``ids``."""
        return subdivide_vertices(self.data.base_vertices[ids.to(self.device)], self.plan)

    # ------------------------------------------------------------------ one step
    def to_device(self, x: Tensor) -> Tensor:
        """Host index tensor -> device without a synchronisation: a copy from pageable host memory waits for the
        whole CUDA stream, one from pinned memory is queued behind it."""
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def render_views(self, clouds, ids: Tensor, views: Tensor, on_device: tuple[Tensor, Tensor] | None = None,
                     depth: bool = True) -> tuple[Tensor, Tensor]:
        """Render (B, C) views of B identities (one rasterizer call on gsplat); predictions and targets
        (B, C, h, w, 3).  ``ids``/``views`` on the host; ``on_device``: their device copies if already made;
        ``depth=False``: the loss needs no depth channel (gsplat then blends 3 channels instead of 4)."""
        d_ids, d_views = on_device if on_device is not None else (self.to_device(ids), self.to_device(views))
        gt = self.data.images[d_ids[:, None], d_views].float() / 255.0
        cams = [[self.data.cameras[i][v] for v in vs] for i, vs in zip(ids.tolist(), views.tolist())]
        out = render_identities(clouds, cams, backend=self.cfg.backend, depth=depth, filter_2d=self.filter_2d)
        return out["image"], gt

    def loss_terms(self, pred: Tensor, gt: Tensor, aux: dict, eyes: Tensor | None = None) -> dict[str, Tensor]:
        """Loss terms of predictions and targets (B, C, h, w, 3); ``eyes`` (B, C, h, w, 1): the views' eye regions."""
        lc = self.cfg.loss
        terms = {"l1": l1(pred, gt), "ssim": ssim(pred.flatten(0, 1), gt.flatten(0, 1))}
        regs = IdentityField.regularizers(aux)
        total = lc.l1_weight * terms["l1"] + lc.ssim_weight * (1.0 - terms["ssim"])
        if eyes is not None and lc.eye_weight > 0:
            terms["l1_eyes"] = l1(pred, gt, eyes)
            total = total + lc.eye_weight * terms["l1_eyes"]
        total = total + lc.offset_reg * regs["offset"] + lc.scale_reg * regs["scale"]
        if lc.code_reg > 0:
            total = total + lc.code_reg * regs["code"]
        if lc.lpips_weight > 0:
            terms["lpips"] = lpips_loss(pred.flatten(0, 1), gt.flatten(0, 1), lc.lpips_net)
            total = total + lc.lpips_weight * terms["lpips"]
        terms.update({f"reg_{k}": v for k, v in regs.items()})
        terms["loss"] = total
        return terms

    def train_step(self) -> dict[str, Tensor]:
        """One optimisation step; returns detached scalar tensors (no host synchronisation here)."""
        self.field.train()
        self._set_lr()
        ids, views = self.sample_batch()
        per_rank = len(ids) // self.world
        sl = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        ids, views = ids[sl], views[sl]
        d_ids, d_views = self.to_device(ids), self.to_device(views)
        with torch.autocast("cuda", dtype=torch.bfloat16,
                            enabled=self.cfg.precision == "bf16" and self.device.type == "cuda"):
            clouds, aux = self.module(d_ids, self.vertices(d_ids))
        clouds = clouds.to(torch.float32) if self.cfg.precision == "bf16" else clouds  # the rasterizers take fp32
        pred, gt = self.render_views(clouds, ids, views, (d_ids, d_views), depth=False)
        eyes = self.eye_masks[d_ids[:, None], d_views].float() if self.eye_masks is not None else None
        terms = self.loss_terms(pred, gt, aux, eyes)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.field.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.step += 1
        return {k: v.detach() for k, v in terms.items()}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """PSNR/SSIM on held-out cameras and on training cameras of the first ``eval_identities`` identities: of the
        face-masked crops (``psnr_*``, ``ssim_*``), of the face-mask pixels alone (``psnr_face_*``) and of the eye
        regions (``psnr_eyes_*``, ``ssim_eyes_*``; utils/face/regions.py)."""
        self.field.eval()
        n = len(self.data) if self.cfg.eval_identities <= 0 else min(self.cfg.eval_identities, len(self.data))
        ids = torch.arange(n)
        out: dict = {}
        groups = {"heldout_views": self.data.serial_index(self.data.eval_serials),
                  "train_views": self.train_ids.tolist()}
        grid = None
        for name, serial_ids in groups.items():
            if not serial_ids:
                continue
            p_all, s_all, pf_all, pe_all, se_all = [], [], [], [], []
            for i in ids.tolist():
                verts = self.vertices(torch.tensor([i]))
                cloud = self.field(self.field.codes.weight[i : i + 1], verts)
                pred, gt = self.render_views(cloud, torch.tensor([i]), torch.tensor([serial_ids]))
                pred = pred[0].clamp(0, 1)
                p_all.append(psnr(pred, gt[0], reduction="none"))
                s_all.append(ssim(pred, gt[0], reduction="none"))
                face = self.data.masks[i, serial_ids].float() / 255.0
                pf_all.append(psnr(pred, gt[0], mask=face, reduction="none"))  # inside the face mask only
                if self.eye_landmarks is not None:  # the same views inside the eye regions (utils/face/regions.py)
                    masks = eye_region_masks(self.eye_landmarks(self.data.base_vertices[i]),
                                             [self.data.cameras[i][v] for v in serial_ids], face)
                    pe, se = region_metrics(pred, gt[0], masks)
                    pe_all.append(pe)
                    se_all.append(se)
                if i == 0 and name == "heldout_views":
                    grid = torch.cat([pred, gt[0]], dim=1)  # (C, 2h, w, 3): prediction above photo
            out[f"psnr_{name}"] = float(torch.cat(p_all).mean())
            out[f"ssim_{name}"] = float(torch.cat(s_all).mean())
            out[f"psnr_face_{name}"] = float(torch.cat(pf_all).mean())
            if pe_all:
                out[f"psnr_eyes_{name}"] = nanmean(torch.cat(pe_all))
                out[f"ssim_eyes_{name}"] = nanmean(torch.cat(se_all))
        out["eval_identities"] = n
        if grid is not None:
            out["_grid"] = grid
        return out

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self) -> dict:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "config": to_dict(self.cfg),
            "identities": self.data.identities,
            "field": self.field.state_dict(),
            "optimizer": self.opt.state_dict(),
            "sampler": self.sampler.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "history": self.history,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt_<step>.pt`` atomically, then delete this run's checkpoints beyond the newest
        ``keep_checkpoints`` of those at or before the current step (by step number, not by name)."""
        if not self.is_main:
            return None
        path = self.ckpt_dir / f"ckpt_{self.step:08d}.pt"
        atomic_torch_save(self._checkpoint_state(), path)
        own = [p for step, p in self.checkpoints() if step <= self.step]
        for p in own[: -self.cfg.keep_checkpoints]:
            p.unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of the checkpoints in ``ckpt_dir``, by step."""
        found = []
        for p in self.ckpt_dir.glob("ckpt_*.pt"):
            m = re.fullmatch(r"ckpt_(\d+)\.pt", p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    @staticmethod
    def read_checkpoint(path: Path) -> dict:
        """A checkpoint's state (weights-only load: no code runs); ValueError when unreadable or incomplete."""
        state = safe_torch_load(path, "training checkpoint")
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise ValueError(f"{path} is not a training checkpoint of this project (it lacks {missing})")
        return state

    def _newest_readable(self) -> tuple[Path, dict] | None:
        """Rank 0: the newest checkpoint that reads and its state; damaged newer ones are skipped with a message."""
        ckpts = self.checkpoints()
        skipped = []
        for _, path in reversed(ckpts):
            try:
                state = self.read_checkpoint(path)
            except UnsafeFileError:
                raise  # a payload is not damage: never fall back silently past it
            except (OSError, ValueError) as exc:
                skipped.append(f"{path.name} ({exc})")
                continue
            if skipped:
                print(f"--resume: skipped {len(skipped)} unreadable checkpoint(s), newest first: {'; '.join(skipped)}; "
                      f"resuming from {path.name} instead (the damaged file stays until a new checkpoint of its step "
                      f"replaces it)")
            return path, state
        if ckpts:
            raise ValueError(f"--resume: none of the {len(ckpts)} checkpoints in {self.ckpt_dir} can be read: "
                             f"{'; '.join(skipped)}")
        return None

    def _resume(self) -> None:
        found = None

        def choose() -> str | None:
            nonlocal found
            found = self._newest_readable()
            return None if found is None else str(found[0])

        chosen = self._on_main(choose)  # every rank resumes from the checkpoint that rank 0 chose
        if chosen is None:
            if self.is_main:
                print(f"--resume: no checkpoint in {self.ckpt_dir}; starting from scratch")
            return
        path = Path(chosen)
        state = found[1] if found is not None else self.read_checkpoint(path)
        if int(state["step"]) > self.cfg.steps:
            raise ValueError(f"--resume: {path} is at step {int(state['step'])}, past --steps {self.cfg.steps}; pass "
                             f"--steps {int(state['step'])} or more to continue it (or --overwrite to start again)")
        if state["identities"] != self.data.identities:
            raise ValueError(
                f"{path} was trained on identities {state['identities'][:5]}... but the data now gives "
                f"{self.data.identities[:5]}...: use the same data options to resume"
            )
        if state["config"]["model"] != to_dict(self.cfg)["model"]:
            raise ValueError(f"{path} was made with another model config; resume with the same --config/model keys")
        self.field.load_state_dict(state["field"])
        self.opt.load_state_dict(state["optimizer"])
        self.sampler.set_state(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.history = list(state.get("history", []))
        if self.is_main:
            print(f"resumed from {path} at step {self.step}")

    # ------------------------------------------------------------------ outputs
    def write_metrics(self, metrics: dict) -> None:
        if not self.is_main:
            return
        clean = {k: v for k, v in metrics.items() if not k.startswith("_")}
        clean.update({"steps": self.step, "seconds": round(self.elapsed, 2), "device": _device_name(self.device)})
        self.history.append(clean)
        doc = dict(clean)
        doc["history"] = self.history
        atomic_write_json(doc, self.out / "metrics.json")

    def export(self) -> Path | None:
        if not self.is_main:
            return None
        return save_model(self.out / "model.pt", self.field, self.data, to_dict(self.cfg))

    def _log(self, terms: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in terms.items():
            self.writer.add_scalar(f"train/{k}", v, self.step)
        self.writer.add_scalar("train/lr_network", self.opt.param_groups[-1]["lr"], self.step)

    def _log_eval(self, metrics: dict) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            if not k.startswith("_") and isinstance(v, (int, float)):
                self.writer.add_scalar(f"eval/{k}", v, self.step)
        if "_grid" in metrics:
            grid = metrics["_grid"]  # (C, 2h, w, 3)
            row = torch.cat(list(grid), dim=1)  # (2h, C*w, 3)
            self.writer.add_image("eval/heldout_views", row.permute(2, 0, 1).cpu(), self.step)
            save_image_grid(self.out / "eval_heldout_views.png", row)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg = self.cfg
        metrics: dict = {}
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True)
        t0 = time.perf_counter() - self.elapsed
        while self.step < cfg.steps:
            terms = self.train_step()
            self.elapsed = time.perf_counter() - t0
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == 1:  # the only per-step host sync, every log_every
                terms = {k: float(v) for k, v in terms.items()}
                if not math.isfinite(terms["loss"]):
                    raise FloatingPointError(
                        f"loss became {terms['loss']} at step {self.step}; lower the learning rates (optim.*) "
                        f"and resume from the last checkpoint"
                    )
                bar.set_postfix(loss=f"{terms['loss']:.4f}", l1=f"{terms['l1']:.4f}")
                self._log(terms)
            last = self.step == cfg.steps
            if self.step % cfg.eval_every == 0 or last:
                metrics = self.evaluate() if self.is_main else {}
                self._log_eval(metrics)
                self.write_metrics(metrics)
                if self.is_main:
                    msg = ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                    if k.startswith(("psnr", "ssim")) and v is not None)
                    bar.write(f"step {self.step}: {msg}")
            if self.step % cfg.ckpt_every == 0 or last:
                self.save_checkpoint()
        bar.close()
        if self.step >= cfg.steps and not metrics and self.is_main:
            metrics = self.evaluate()
            self.write_metrics(metrics)
        self.export()
        self.close()
        if self.ddp:
            dist.barrier()
        return {k: v for k, v in metrics.items() if not k.startswith("_")}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
