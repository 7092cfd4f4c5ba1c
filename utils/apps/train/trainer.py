"""Auto-decoder training of the identity field: codes and network learned jointly from multi-view photos.

Each step draws B identities and C training cameras per identity, emits the B Gaussian clouds in one network pass,
renders each identity's C views in one rasterizer call, and minimises 0.8 * L1 + 0.2 * (1 - SSIM) against the
face-masked photos on black, plus light regularisers.  Runs on one device or under ``torchrun`` (DDP: the global batch
of B identities is split across ranks, so N ranks take the same steps as one process with the same global batch).

The run's configuration is in config.py, the process group and the DDP wrapper in distributed.py, the output folder
and the checkpoints in checkpoints.py; this module holds the Trainer (steps, loss terms, evaluation, logs, the loop).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from models import renderer
from models.flame import subdivide_vertices
from models.identity_field import IdentityField
from models.mip_filter import render_filter, sampling_rate
from models.renderer import render_identities
from utils.apps.train.checkpoints import (
    CHECKPOINT_KEYS,
    RUN_OUTPUTS,
    check_resumable,
    checkpoint_state,
    choose_checkpoint,
    claim_output,
    list_checkpoints,
    read_checkpoint,
    restore_checkpoint,
    run_outputs,
    write_checkpoint,
)
from utils.apps.train.config import PRECISIONS, TRAIN_RANGES, LossConfig, OptimConfig, TrainConfig, validate_config
from utils.apps.train.distributed import device_name, init_distributed, launched_by_torchrun, on_main, training_module
from utils.apps.train.encoder import EncoderTrainConfig, JointEncoder
from utils.core.atomic import atomic_write_json
from utils.core.config import to_dict
from utils.core.images import save_image_grid
from utils.core.locks import FolderLock
from utils.data.dataset import MultiViewDataset
from utils.data.model_file import save_model
from utils.face.regions import embedding_for_flame, eye_region_masks, nanmean, region_metrics
from utils.losses import coverage_loss, l1, lpips_available, lpips_loss, mse, psnr, rim_band, ssim

# names importers take from here (train.py, benchmarks/, tests/): the run's config and the distributed entry points
__all__ = ["CHECKPOINT_KEYS", "PRECISIONS", "RUN_OUTPUTS", "TRAIN_RANGES", "LossConfig", "OptimConfig", "TrainConfig",
           "Trainer", "init_distributed", "launched_by_torchrun", "run_outputs", "validate_config"]


def check_runnable(cfg: TrainConfig, world: int) -> None:
    """ValueError when ``cfg`` cannot run on ``world`` ranks here (the batch split, LPIPS availability)."""
    if cfg.batch_identities % world != 0:
        raise ValueError(
            f"batch_identities={cfg.batch_identities} must be divisible by the number of ranks ({world})"
        )
    if cfg.loss.lpips_weight > 0 and not lpips_available(cfg.loss.lpips_net):
        raise ValueError(
            f"loss.lpips_weight={cfg.loss.lpips_weight} needs LPIPS, which is not usable here: pip install lpips "
            f"(it needs torchvision and downloads the {cfg.loss.lpips_net} weights once), or set loss.lpips_weight 0"
        )


def build_field(cfg: TrainConfig, data: MultiViewDataset, device: torch.device) -> tuple[IdentityField, Tensor]:
    """The identity field of ``data``'s identities on its subdivided template, and the subdivision plan, on
    ``device``; with ``model.filter_3d`` the field's per-vertex sampling rates of the training views (Mip-Splatting)."""
    template = subdivide_vertices(data.template, data.plan)
    field = IdentityField(cfg.model, len(data), template, data.faces).to(device)
    plan = data.plan.to(device)
    if cfg.model.filter_3d > 0:  # Mip-Splatting: each vertex's highest sampling rate in the training views
        tr = data.serial_index(data.train_serials)
        verts = subdivide_vertices(data.base_vertices, plan)
        field.set_sampling_rate(sampling_rate(verts, [[cams[v] for v in tr] for cams in data.cameras]))
    return field, plan


def make_optimizer(field: IdentityField, o: OptimConfig, device: torch.device) -> torch.optim.Adam:
    """Adam over the field's parameter groups; each group remembers its ``initial_lr`` for the decay schedule."""
    groups = field.param_groups(o.lr_network, o.lr_codes, lr_template=o.lr_template)
    for g in groups:
        g["initial_lr"] = g["lr"]
    fused = device.type == "cuda"
    return torch.optim.Adam(groups, betas=(o.beta1, o.beta2), **({"fused": True} if fused else {}))


def open_tensorboard(out: Path):
    """A tensorboard SummaryWriter logging into ``out/tb``, or None (with a message) when tensorboard is missing."""
    try:
        # optional dependency, imported only here: training must not need it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # training must not fail for want of a logger
        print("tensorboard is not installed (pip install tensorboard): training without tensorboard logs")
        return None
    return SummaryWriter(str(out / "tb"))


@torch.no_grad()
def eye_masks_of(data: MultiViewDataset, eye_landmarks) -> Tensor:
    """Eye regions of every identity's views (I, S, h, w, 1) uint8 on the device, for ``loss.eye_weight``;
    ``eye_landmarks``: utils.face.regions.embedding_for_flame of the data (None: ValueError)."""
    if eye_landmarks is None:
        raise ValueError("loss.eye_weight needs FLAME's eye landmarks on the face mask (flame_static_embedding.pkl "
                         f"in {data.flame_dir}, and a face mask that holds the eyes); set loss.eye_weight 0")
    masks = [eye_region_masks(eye_landmarks(data.base_vertices[i]), data.cameras[i],
                              data.masks[i].float() / 255.0) for i in range(len(data))]
    return (torch.stack(masks) > 0.5).to(torch.uint8)


# The 2D mip filter's opacity compensation training renders with (models/renderer/common.py compensate_opacity):
# gsplat's antialiased mode, the renderer's default, with which every model so far was trained.  Set explicitly
# because the setting is process-wide and tools change it: load_model sets it to the loaded model's
# render_compensation ("optical_depth" by default), so a run after a load_model in the same process trained with
# another compensation (different weights for the same seed: 0.02 max abs in template_features after 4 tiny steps).
TRAIN_COMPENSATION = "opacity"


def training_compensation() -> contextlib.AbstractContextManager[None]:
    """``models.renderer.FILTER_2D_COMPENSATION`` is TRAIN_COMPENSATION inside, the caller's value again after
    (it is read when the renders are built, so the backward pass needs no scope); the trainer passes its 2D filter
    explicitly, so the process's FILTER_2D is kept as it is."""
    return render_filter(renderer.FILTER_2D, TRAIN_COMPENSATION)


def decay_lr(opt: torch.optim.Optimizer, step: int, steps: int, final_ratio: float) -> None:
    """Exponential decay: every group's learning rate is its ``initial_lr`` times ``final_ratio ** (step / steps)``."""
    frac = step / max(1, steps)
    mult = final_ratio ** frac
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] * mult


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Host index tensor -> device without a synchronisation: a copy from pageable host memory waits for the
    whole CUDA stream, one from pinned memory is queued behind it."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def eye_weight_at(lc: LossConfig, step: int, steps: int) -> float:
    """The eye term's weight at ``step`` of ``steps``: ``lc.eye_weight`` times a factor falling linearly from 1 at
    the first step to ``lc.eye_weight_final`` at the last."""
    frac = min(1.0, step / max(1, steps - 1))
    return lc.eye_weight * (1.0 + (lc.eye_weight_final - 1.0) * frac)


def pool_pixels(x: Tensor, k: int) -> Tensor:
    """(..., k*h, k*w, c) -> (..., h, w, c): the mean of each k x k block.  A render at k x the size whose blocks are
    averaged integrates every pixel's area as a camera's sensor does (pixel edges line up: Camera.scaled keeps pixel
    centres at +0.5), instead of sampling the pixel's centre only."""
    *lead, H, W, c = x.shape
    if H % k or W % k:
        raise ValueError(f"pool_pixels: a {H}x{W} image is not made of {k}x{k} blocks")
    return x.reshape(*lead, H // k, k, W // k, k, c).mean(dim=(-4, -2))


def loss_terms(lc: LossConfig, pred: Tensor, gt: Tensor, aux: dict, eyes: Tensor | None = None,
               alpha: Tensor | None = None, mask: Tensor | None = None,
               eye_weight: float | None = None) -> dict[str, Tensor]:
    """Loss terms of predictions and targets (B, C, h, w, 3) weighted by ``lc``; ``eyes`` (B, C, h, w, 1): the
    views' eye regions, weighted by ``eye_weight`` (None: ``lc.eye_weight``; the trainer passes its schedule,
    :func:`eye_weight_at`); ``aux``: the field's forward extras (for its regularisers); ``alpha`` (B, C, h, w, 1): the
    rendered alpha and ``mask`` (B, C, h, w, 1) in {0, 1}: the views' face masks (needed by ``lc.alpha_weight``
    and ``lc.rim_band``).  ``loss``: the weighted total."""
    if (lc.alpha_weight > 0 or lc.rim_band > 0) and mask is None:
        raise ValueError("loss.alpha_weight / loss.rim_band need the views' face masks (loss_terms(mask=...))")
    band = rim_band(mask, lc.rim_band) if lc.rim_band > 0 else None
    if band is not None:
        # the ring just outside the mask is no data (the surface goes on there; the photo is black only because it
        # was cut): the target's value there stands in for the prediction, so no gradient flows from it
        pred = torch.where(band > 0, gt, pred)
    terms = {"l1": l1(pred, gt), "ssim": ssim(pred.flatten(0, 1), gt.flatten(0, 1))}
    if lc.alpha_weight > 0:
        if alpha is None:
            raise ValueError("loss.alpha_weight needs the rendered alpha (loss_terms(alpha=...))")
        terms["alpha"] = coverage_loss(alpha, mask, band)
    regs = IdentityField.regularizers(aux)
    total = lc.l1_weight * terms["l1"] + lc.ssim_weight * (1.0 - terms["ssim"])
    if "alpha" in terms:
        total = total + lc.alpha_weight * terms["alpha"]
    w_eyes = lc.eye_weight if eye_weight is None else eye_weight
    if eyes is not None and lc.eye_weight > 0:
        terms["l1_eyes"] = l1(pred, gt, eyes) if lc.eye_loss == "l1" else mse(pred, gt, eyes)
        if w_eyes > 0:
            total = total + w_eyes * terms["l1_eyes"]
    total = total + lc.offset_reg * regs["offset"] + lc.scale_reg * regs["scale"]
    if lc.code_reg > 0:
        total = total + lc.code_reg * regs["code"]
    if lc.lpips_weight > 0:
        terms["lpips"] = lpips_loss(pred.flatten(0, 1), gt.flatten(0, 1), lc.lpips_net)
        total = total + lc.lpips_weight * terms["lpips"]
    terms.update({f"reg_{k}": v for k, v in regs.items()})
    terms["loss"] = total
    return terms


def view_metrics(pred: Tensor, gt: Tensor, face: Tensor, eyes: Tensor | None) -> dict[str, Tensor]:
    """Per-view metrics (C,) of predictions and photos (C, h, w, 3): ``psnr`` and ``ssim`` of the whole crops,
    ``psnr_face`` inside the face masks ``face`` (C, h, w, 1) and, given eye-region masks ``eyes``,
    ``psnr_eyes``/``ssim_eyes`` inside them (utils/face/regions.py)."""
    metrics = {"psnr": psnr(pred, gt, reduction="none"), "ssim": ssim(pred, gt, reduction="none"),
               "psnr_face": psnr(pred, gt, mask=face, reduction="none")}  # inside the face mask only
    if eyes is not None:
        metrics["psnr_eyes"], metrics["ssim_eyes"] = region_metrics(pred, gt, eyes)
    return metrics


def log_train(writer, terms: dict[str, float], step: int, lr_network: float) -> None:
    """Training scalars (loss terms and the network's learning rate) to tensorboard (``writer``; None: no logs)."""
    if writer is None:
        return
    for k, v in terms.items():
        writer.add_scalar(f"train/{k}", v, step)
    writer.add_scalar("train/lr_network", lr_network, step)


def log_eval(writer, metrics: dict, step: int, out: Path) -> None:
    """Evaluation scalars and the held-out views' grid (prediction above photo) to tensorboard (``writer``; None:
    no logs) and to ``out/eval_heldout_views.png``."""
    if writer is None:
        return
    for k, v in metrics.items():
        if not k.startswith("_") and isinstance(v, (int, float)):
            writer.add_scalar(f"eval/{k}", v, step)
    if "_grid" in metrics:
        grid = metrics["_grid"]  # (C, 2h, w, 3)
        row = torch.cat(list(grid), dim=1)  # (2h, C*w, 3)
        writer.add_image("eval/heldout_views", row.permute(2, 0, 1).cpu(), step)
        save_image_grid(out / "eval_heldout_views.png", row)


class Trainer:
    """Owns data, network, optimiser, checkpoints and logs of one training run.

    The output folder ``cfg.out`` is locked for the process (utils.core.locks.FolderLock) from construction until
    :meth:`close` (called at the end of :meth:`run`); a fresh run (no ``resume``) refuses a folder that already holds
    a run (RUN_OUTPUTS) unless ``overwrite``, which first removes those files.  ``resume`` continues from the newest
    readable checkpoint (older ones are tried when the newest is damaged, with a message).  ``encoder``: an
    EncoderTrainConfig with ``joint`` true trains the feed-forward encoder during the run (utils/apps/train/encoder.py
    JointEncoder: after each field step, into the checkpoints and model.pt; one process only).
    """

    read_checkpoint = staticmethod(read_checkpoint)

    def __init__(self, cfg: TrainConfig, resume: bool = False, data: MultiViewDataset | None = None,
                 overwrite: bool = False, encoder: EncoderTrainConfig | None = None) -> None:
        if resume and overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        validate_config(cfg)
        if encoder is not None and not encoder.joint:
            raise ValueError("Trainer(encoder=...) trains the encoder jointly (encoder.joint true); an encoder after "
                             "the field is utils/apps/train/encoder.py add_trained_encoder")
        self.cfg = cfg
        self.device, self.rank, self.world = init_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.ddp = dist.is_available() and dist.is_initialized()
        check_runnable(cfg, self.world)
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.lock = FolderLock(self.out) if self.is_main else None
        if self.lock is not None:
            weakref.finalize(self, self.lock.release)
        on_main(lambda: self._claim_output(resume, overwrite), self.is_main, self.ddp)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

        self.data = data if data is not None else MultiViewDataset(
            cfg.data, self.device, progress=cfg.progress and self.is_main)
        if cfg.batch_identities > len(self.data):
            # each identity would be rendered several times a step (a batch of 100 over 4 identities: ~100 renders)
            raise ValueError(f"--batch_identities={cfg.batch_identities} exceeds the {len(self.data)} training "
                             f"identities of {cfg.data.root}: use at most {len(self.data)}")
        self.field, self.plan = build_field(cfg, self.data, self.device)
        self.filter_2d = cfg.model.filter_2d if cfg.model.filter_2d > 0 else None  # None: classic 0.3 px^2 dilation
        self.eye_landmarks = embedding_for_flame(self.data.flame, self.data.mask_ids)  # None: no eye-region metrics
        eye_masks = eye_masks_of(self.data, self.eye_landmarks) if cfg.loss.eye_weight > 0 else None
        self.eye_masks = eye_masks  # (I, S, h, w, 1) uint8, or None
        self._eye_cache: dict[tuple[int, tuple[int, ...]], Tensor] = {}  # evaluate()'s eye regions, by view set
        self.module: nn.Module = training_module(self.field, self.device, cfg.compile, cfg.precision, self.ddp)
        self.opt = make_optimizer(self.field, cfg.optim, self.device)
        self.sampler = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.train_ids = torch.as_tensor(self.data.serial_index(self.data.train_serials))
        if len(self.train_ids) < cfg.batch_views:
            raise ValueError(
                f"batch_views={cfg.batch_views} but only {len(self.train_ids)} training cameras exist"
            )
        self.joint: JointEncoder | None = None  # the encoder trained during the field's training (encoder.joint)
        if encoder is not None:
            if self.ddp:  # it would train on rank 0 alone while the other ranks wait at every step
                raise ValueError("--encoder.joint true trains in one process only: under torchrun train the encoder "
                                 "after the field (--encoder without --encoder.joint, or --encoder_only)")
            self.joint = JointEncoder(encoder, cfg.steps, self.field, self.plan, self.data, log=tqdm.write)
        if resume:
            self._resume()
        self.writer = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.writer = open_tensorboard(self.out)

    # ------------------------------------------------------------------ the output folder
    def _claim_output(self, resume: bool, overwrite: bool) -> None:
        """Rank 0: lock ``out``; refuse a folder holding another run unless resuming it or told to overwrite."""
        claim_output(self.lock, self.out, self.ckpt_dir, resume, overwrite)

    def close(self) -> None:
        """Close the logs and release the lock on the output folder."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ schedule and sampling
    def sample_batch(self) -> tuple[Tensor, Tensor]:
        """Global batch: identity ids (B,) and training-camera ids (B, C), same on every rank."""
        B, C = self.cfg.batch_identities, self.cfg.batch_views
        n_identities = len(self.data)
        ids = torch.randperm(n_identities, generator=self.sampler)[: min(B, n_identities)]
        if B > n_identities:
            ids = torch.cat([ids, torch.randint(n_identities, (B - n_identities,), generator=self.sampler)])
        views = torch.stack([torch.randperm(len(self.train_ids), generator=self.sampler)[:C] for _ in range(B)])
        return ids, self.train_ids[views]

    def vertices(self, ids: Tensor) -> Tensor:
        """(B, V, 3) world-space subdivided face-mask vertices of identities ``ids``."""
        return subdivide_vertices(self.data.base_vertices[ids.to(self.device)], self.plan)

    # ------------------------------------------------------------------ one step
    def render_views(self, clouds, ids: Tensor, views: Tensor, on_device: tuple[Tensor, Tensor] | None = None,
                     depth: bool = True, with_alpha: bool = False):
        """Render (B, C) views of B identities (one rasterizer call on gsplat); predictions and targets
        (B, C, h, w, 3).  ``ids``/``views`` on the host; ``on_device``: their device copies if already made;
        ``depth=False``: the loss needs no depth channel (gsplat then blends 3 channels instead of 4);
        ``with_alpha``: also return the rendered alpha (B, C, h, w, 1) as a third value."""
        if on_device is None:
            on_device = (to_device(ids, self.device), to_device(views, self.device))
        d_ids, d_views = on_device
        gt = self.data.images[d_ids[:, None], d_views].float() / 255.0
        cams = [[self.data.cameras[i][v] for v in vs] for i, vs in zip(ids.tolist(), views.tolist())]
        k = self.cfg.loss.supersample
        with training_compensation():  # the same renders whatever model a tool loaded in this process before
            out = render_identities(clouds, [[c.scaled(k) for c in cs] for cs in cams] if k > 1 else cams,
                                    backend=self.cfg.backend, depth=depth, filter_2d=self.filter_2d)
        if k > 1:
            out = {n: None if v is None else pool_pixels(v, k) for n, v in out.items()}
        if with_alpha:
            return out["image"], gt, out["alpha"]
        return out["image"], gt

    def train_step(self) -> dict[str, Tensor]:
        """One optimisation step; returns detached scalar tensors (no host synchronisation here)."""
        self.field.train()
        decay_lr(self.opt, self.step, self.cfg.steps, self.cfg.optim.lr_final_ratio)
        ids, views = self.sample_batch()
        per_rank = len(ids) // self.world
        sl = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        ids, views = ids[sl], views[sl]
        d_ids, d_views = to_device(ids, self.device), to_device(views, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16,
                            enabled=self.cfg.precision == "bf16" and self.device.type == "cuda"):
            clouds, aux = self.module(d_ids, self.vertices(d_ids))
        clouds = clouds.to(torch.float32) if self.cfg.precision == "bf16" else clouds  # the rasterizers take fp32
        pred, gt, alpha = self.render_views(clouds, ids, views, (d_ids, d_views), depth=False, with_alpha=True)
        eyes = self.eye_masks[d_ids[:, None], d_views].float() if self.eye_masks is not None else None
        lc = self.cfg.loss
        mask = (self.data.masks[d_ids[:, None], d_views] > 127).float() if lc.alpha_weight > 0 or lc.rim_band > 0 \
            else None
        terms = loss_terms(lc, pred, gt, aux, eyes, alpha, mask, eye_weight_at(lc, self.step, self.cfg.steps))
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
        # each identity's cloud once for both groups (the field's output does not depend on the cameras)
        clouds = {i: self.field(self.field.codes.weight[i : i + 1], self.vertices(torch.tensor([i])))
                  for i in ids.tolist()}
        for name, serial_ids in groups.items():
            if not serial_ids:
                continue
            per_view: dict[str, list[Tensor]] = {}
            for i in ids.tolist():
                pred, gt = self.render_views(clouds[i], torch.tensor([i]), torch.tensor([serial_ids]))
                pred = pred[0].clamp(0, 1)
                face = self.data.masks[i, serial_ids].float() / 255.0
                eyes = self._eval_eye_masks(i, serial_ids, face)
                for k, v in view_metrics(pred, gt[0], face, eyes).items():
                    per_view.setdefault(k, []).append(v)
                if i == 0 and name == "heldout_views":
                    grid = torch.cat([pred, gt[0]], dim=1)  # (C, 2h, w, 3): prediction above photo
            for k in ("psnr", "ssim", "psnr_face"):
                out[f"{k}_{name}"] = float(torch.cat(per_view[k]).mean())
            for k in ("psnr_eyes", "ssim_eyes"):
                if k in per_view:
                    out[f"{k}_{name}"] = nanmean(torch.cat(per_view[k]))
        out["eval_identities"] = n
        if grid is not None:
            out["_grid"] = grid
        return out

    def _eval_eye_masks(self, i: int, serial_ids: list[int], face: Tensor) -> Tensor | None:
        """(C, h, w, 1) eye regions of identity ``i`` in views ``serial_ids`` inside its face masks ``face``
        (C, h, w, 1), or None without eye landmarks.  They depend only on the data (the identity's FLAME vertices,
        cameras and masks), so each evaluation after the first reuses them (utils/face/regions.py)."""
        if self.eye_landmarks is None:
            return None
        key = (i, tuple(serial_ids))
        if key not in self._eye_cache:
            self._eye_cache[key] = eye_region_masks(self.eye_landmarks(self.data.base_vertices[i]),
                                                    [self.data.cameras[i][v] for v in serial_ids], face)
        return self._eye_cache[key]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt_<step>.pt`` atomically, then delete this run's checkpoints beyond the newest
        ``keep_checkpoints`` of those at or before the current step (by step number, not by name)."""
        if not self.is_main:
            return None
        state = checkpoint_state(self.step, self.elapsed, self.cfg, self.data.identities, self.field, self.opt,
                                 self.sampler, self.history,
                                 encoder=self.joint.state_dict() if self.joint is not None else None)
        return write_checkpoint(state, self.ckpt_dir, self.step, self.cfg.keep_checkpoints)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of the checkpoints in ``ckpt_dir``, by step."""
        return list_checkpoints(self.ckpt_dir)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1][1] if found else None

    def _resume(self) -> None:
        chosen = choose_checkpoint(self.ckpt_dir, self.is_main, self.ddp)  # every rank takes rank 0's choice
        if chosen is None:
            if self.is_main:
                print(f"--resume: no checkpoint in {self.ckpt_dir}; starting from scratch")
            return
        path, state = chosen
        check_resumable(path, state, self.cfg.steps, self.data.identities, to_dict(self.cfg)["model"])
        if state.get("encoder") is not None and self.joint is None:
            raise ValueError(f"--resume: {path} holds the state of an encoder trained jointly with the field; resume "
                             f"with --encoder --encoder.joint true and the same --encoder.* flags")
        restore_checkpoint(state, self.field, self.opt, self.sampler)
        if self.joint is not None:  # older checkpoints, or ones before the encoder's start, have no encoder state
            self.joint.load_state_dict(state.get("encoder"), path)
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
        clean.update({"steps": self.step, "seconds": round(self.elapsed, 2), "device": device_name(self.device)})
        self.history.append(clean)
        doc = dict(clean)
        doc["history"] = self.history
        atomic_write_json(doc, self.out / "metrics.json")

    def export(self) -> Path | None:
        if not self.is_main:
            return None
        encoder = self.joint.encoder if self.joint is not None else None
        return save_model(self.out / "model.pt", self.field, self.data, to_dict(self.cfg), encoder=encoder)

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        cfg = self.cfg
        metrics: dict = {}
        bar = tqdm(total=cfg.steps, initial=self.step, desc="training", disable=not (cfg.progress and self.is_main),
                   dynamic_ncols=True)
        t0 = time.perf_counter() - self.elapsed
        while self.step < cfg.steps:
            terms = self.train_step()
            if self.joint is not None:  # the encoder's share of steps after this field step (its clock included)
                self.joint.after_field_step(self.step)
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
                log_train(self.writer, terms, self.step, self.opt.param_groups[-1]["lr"])
            last = self.step == cfg.steps
            if self.step % cfg.eval_every == 0 or last:
                metrics = self.evaluate() if self.is_main else {}
                log_eval(self.writer, metrics, self.step, self.out)
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
        out = {k: v for k, v in metrics.items() if not k.startswith("_")}
        if self.joint is not None and self.joint.run is not None:
            st = self.joint.stats()
            out.update(st)
            last = st["encoder_losses"][-1] if st["encoder_losses"] else float("nan")
            print(f"encoder (joint, from field step {st['encoder_joint_start']}): {st['encoder_photos']} photos + "
                  f"{st['encoder_renders']} renders, {self.joint.run.done} steps, final loss {last:.4f}, "
                  f"{st['encoder_seconds']:.0f} s -> {self.out / 'model.pt'}")
        return out

