"""Training of the feed-forward encoder (models/encoder.py) after the identity field, with the field frozen
(:func:`train_encoder`), or during the field's training (``encoder.joint``, :class:`JointEncoder`: from
``joint_start`` of the field's steps on, the field's current styles as stop-gradient targets, the field frozen to the
encoder's losses, state in the training checkpoints).  Both run :class:`EncoderOptimisation`.

Training pairs (crop -> style w), each batch drawn from two pools:

    photos   the training identities' face-masked photos from every training camera (the dataset's views), target
             the identity's trained style ``field.style(codes[i])``;
    renders  sampled identities rendered by the frozen field, on the geometry and through the training cameras of a
             random training identity, face-masked with that view's mask; target the sampled style.  A sampled
             identity is either a code mixed from ``mix`` training codes (Dirichlet weights) plus Gaussian noise of
             ``noise`` times the codes' spread, or (share ``gauss_fraction``) a draw from the Gaussian of the
             training styles, spread ``gauss_scale``; a share ``residual_fraction`` of them carries a real photo's
             residual (the training photo minus the field's render of that identity, same camera) so that the
             renders look like photos of people the field cannot express exactly.  They are rendered once
             (``samples`` identities x ``views_per_sample`` views) before the loop: the held-out identities are new
             people, and 24 training identities alone are too few points for a regression to generalise from.

Every crop is jittered as a fit's crop varies (utils/apps/track/targets.py crops the photo tightly to its face mask; the
photo-only path crops around a fitted camera's projection): the window's centre by up to ``crop_jitter`` of its
side, its side by up to ``scale_jitter``; colours by a per-channel gain of up to ``colour_jitter`` and an exposure
factor of up to ``exposure_jitter`` (inside the face mask; the background stays black).

Loss (``loss``): "w", the mean squared error of the predicted style (or, with ``arch.space z``, code) in units of the
targets' per-channel spread (the encoder's ``w_std``); or "gaussians", the error in the metric of the frozen field's
output Gaussians (their colour and opacity, linearised in w, :func:`output_metric`; 90 % of that response lies in 33
of the CPU preset's 128 style channels) plus ``w_weight`` times the "w" loss.  ``style_weight`` scales that loss
(0: none).  With ``render_weight`` > 0 a photometric term is added: ``render_batch`` crops of each batch have their
predicted style rendered by the frozen field through the sample's own camera and geometry and compared with the
sample's (un-jittered) image, ``(1 - render_ssim) L1 + render_ssim (1 - SSIM)`` over the whole image, the black
background included (``render_region image``) or inside the face mask only (``face``).  Why: an error in w costs what
it costs in the renders, not what it costs in w, and on a model trained with ``loss.rim_band`` (the CPU preset) most
of a new person's whole-image error is the colour that the predicted style spills past the face mask, which a loss in
w does not see (benchmarks/results/encoder_alone_cpu_2026-12-06.md: on by default, weight 30, 2 crops every 2nd
step).  AdamW, cosine learning-rate decay.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.encoder import EncoderConfig, StyleEncoder, encoder_input, encoder_state
from models.flame import subdivide_vertices
from models.mip_filter import display_filter, render_filter
from models.renderer import render_batch, render_identities
from utils.core.config import from_dict, to_dict
from utils.core.device import resolve_device
from utils.data.dataset import DataConfig, MultiViewDataset
from utils.data.model_file import add_encoder, load_model
from utils.losses import l1, ssim


@dataclass
class EncoderTrainConfig:
    """Encoder training (``train.py --encoder`` / ``--encoder_only``)."""

    steps: int = 2000  # optimiser steps
    batch: int = 32  # crops per step
    lr: float = 2e-3  # AdamW learning rate (cosine decay to 5 % of it)
    weight_decay: float = 1e-4  # AdamW weight decay
    samples: int = 1024  # sampled identities rendered as training data (0: photos only)
    views_per_sample: int = 2  # training cameras each sampled identity is rendered through
    mix: int = 3  # training codes mixed into each sampled identity
    noise: float = 0.5  # Gaussian noise added to a mixed code, in units of the codes' per-channel spread
    gauss_fraction: float = 0.5  # share of the sampled identities drawn from a Gaussian of the training styles instead
    gauss_scale: float = 1.2  # that Gaussian's spread relative to the training styles' (> 1: more distinct people)
    residual_fraction: float = 1.0  # share of the sampled identities' renders given a photo's residual: the photo of
    #                                 the geometry's identity through that camera minus the field's render of it
    photo_fraction: float = 0.5  # share of each batch taken from the training identities' photos
    crop_jitter: float = 0.05  # crop centre shift, fraction of the crop side
    scale_jitter: float = 0.1  # crop side scaled by a factor in [1 - x, 1 + x]
    colour_jitter: float = 0.1  # per-channel colour gain in [1 - x, 1 + x]
    exposure_jitter: float = 0.2  # exposure factor in [1 - x, 1 + x]
    loss: str = "w"  # "w": squared error in units of the styles' spread; "gaussians": in the metric of the frozen
    #                 field's output Gaussians (colour and opacity, linearised in w; output_metric), plus w_weight
    #                 times the "w" loss
    w_weight: float = 0.1  # with loss "gaussians": weight of the plain squared error (keeps unseen directions in check)
    metric_identities: int = 4  # with loss "gaussians": training styles the Jacobian is averaged over
    style_weight: float = 1.0  # weight of the loss above (in w, or "gaussians"); 0: the photometric term alone
    render_weight: float = 30.0  # weight of the photometric term (predicted style rendered, vs the image); 0: off
    render_batch: int = 2  # crops of each batch that get the photometric term (each one render with its backward)
    render_every: int = 2  # the photometric term on every n-th step only (a render costs ~0.1-0.2 s on the CPU)
    render_ssim: float = 0.2  # share of (1 - SSIM) in the photometric term, the rest L1 (as the fit's 0.8 / 0.2)
    render_region: str = "image"  # photometric term over "image" (black background included) or "face" (mask only)
    seed: int = 0  # random seed
    backend: str = "auto"  # rasterizer of the renders
    joint: bool = False  # with --encoder: train the encoder during the field's training (field frozen to it, its
    #                      styles as stop-gradient targets, state in the checkpoints) instead of after it
    joint_start: float = 0.8  # with joint: the encoder starts after this fraction of the field's steps (its styles
    #                           are no meaningful targets before) and takes its `steps` over the remaining ones; 0.5
    #                           lost face-mask detail on the CPU preset (benchmarks/results/encoder_joint_cpu_*.md)
    joint_refresh: float = 1.0  # with joint: times the render bank is re-rendered by the moving field over those
    #                             steps, the oldest renders first (0: the bank stays as made at the start)
    arch: EncoderConfig = field(default_factory=EncoderConfig)


@dataclass
class BankSource:
    """What :func:`render_samples` draws sampled identities from (a snapshot of the field's identities)."""

    codes: Tensor  # (I, D) the training codes
    spread: Tensor  # (D,) their per-channel spread
    g_mean: Tensor  # (S,) mean of the Gaussian of new people, in the encoder's output space
    g_dev: Tensor  # (I, S) deviations of the training identities: the Gaussian's covariance is g_dev^T g_dev
    g_spread: Tensor  # (S,) per-channel spread of the training identities in that space
    train_ids: Tensor  # (T,) long: the training cameras (serial indices)
    residual: Tensor | None  # (I, T, h, w, 3): photo minus the field's render, every training camera; or None


@torch.no_grad()
def bank_source(field_, data, plan, cfg: EncoderTrainConfig, backend: str) -> BankSource:
    """The statistics and photo residuals that :func:`render_samples` samples from, of the field as it is now
    (the residual renders every training identity through every training camera once)."""
    dev = data.images.device
    codes = field_.codes.weight.detach()
    n_identities = codes.shape[0]
    spread = codes.std(0) if n_identities > 1 else torch.ones_like(codes[0])
    styles_ids = field_.style(codes, update_w_avg=False)
    # the Gaussian's space: the encoder's output (styles w, or codes z)
    g_pts = codes if cfg.arch.space == "z" else styles_ids
    g_mean = g_pts.mean(0)
    g_dev = (g_pts - g_mean) / math.sqrt(max(1, n_identities - 1))  # (I, S): cov = g_dev^T g_dev
    g_spread = g_pts.std(0) if n_identities > 1 else torch.ones_like(g_mean)
    train_ids = torch.as_tensor(data.serial_index(data.train_serials))
    residual = None
    if cfg.residual_fraction > 0:  # (I, T, h, w, 3): photo minus the field's render, every training camera
        residual = []
        for i in range(n_identities):
            verts = subdivide_vertices(data.base_vertices[i][None], plan)
            img = render_batch(field_.synthesize(styles_ids[i:i + 1], verts)[0],
                               [data.cameras[i][int(j)] for j in train_ids], backend=backend)["image"].clamp(0, 1)
            m = data.masks[i, train_ids.to(dev)].float() / 255
            residual.append(data.images[i, train_ids.to(dev)].float() / 255 - img * m)
        residual = torch.stack(residual)
    return BankSource(codes, spread, g_mean, g_dev, g_spread, train_ids, residual)


@torch.no_grad()
def render_bank(field_, data, plan, cfg: EncoderTrainConfig, gen: torch.Generator, backend: str,
                progress: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Renders of ``cfg.samples`` sampled identities: (images (N, h, w, 3) uint8, masks (N, h, w, 1) uint8,
    styles (N, S), codes (N, D), geometry identities (N,) long, camera indices (N,) long), N = samples *
    views_per_sample; each face-masked with its view's mask, rendered on the geometry of identity ``ids[n]`` through
    its camera ``data.cameras[ids[n]][cams[n]]``.

    A share ``1 - gauss_fraction`` of them mixes ``mix`` training codes (Dirichlet weights) plus ``noise`` times the
    codes' per-channel spread; the rest is drawn from the Gaussian of the training identities in the encoder's
    output space (their mean and the span of their deviations, spread times ``gauss_scale``, plus the same noise
    in that space's units): mixtures lie inside the training identities' hull and shrink towards their mean, while
    new people lie as far out as the training ones or further.  A Gaussian sample of w has no code: its row of
    codes is NaN (only an encoder of z uses the codes, and it samples z).

    A share ``residual_fraction`` of the samples gets, on each view, the residual of a real photo: the training
    photo of the identity whose geometry it is rendered on, through the same camera, minus the field's render of
    that identity's trained style.  Renders of the field alone are smooth and exactly representable; a new person's
    photo is neither (the encoder met such photos only for the 24 training identities, whose styles it learns by
    heart), so without it the encoder has never been asked to look past what the field cannot express."""
    return render_samples(field_, data, plan, cfg, gen, bank_source(field_, data, plan, cfg, backend), cfg.samples,
                          backend, progress)


@torch.no_grad()
def render_samples(field_, data, plan, cfg: EncoderTrainConfig, gen: torch.Generator, src: BankSource, n: int,
                   backend: str, progress: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``n`` sampled identities drawn from ``src`` (:func:`bank_source`) and rendered by ``field_``, as
    :func:`render_bank` describes: (images (N, h, w, 3) uint8, masks (N, h, w, 1) uint8, styles (N, S), codes (N, D),
    geometry identities (N,) long, camera indices (N,) long), N = n * views_per_sample."""
    dev = data.images.device
    codes, spread, train_ids, residual = src.codes, src.spread, src.train_ids, src.residual
    g_mean, g_dev, g_spread = src.g_mean, src.g_dev, src.g_spread
    n_identities = codes.shape[0]
    imgs, masks, styles, zs, ids, cams = [], [], [], [], [], []
    for _ in tqdm(range(n), desc="encoder: rendering", disable=not progress, leave=False):
        if float(torch.rand((), generator=gen)) < cfg.gauss_fraction:
            eps = torch.randn(n_identities, generator=gen).to(dev)
            x = g_mean + cfg.gauss_scale * (eps @ g_dev)
            x = x + cfg.noise * g_spread * torch.randn(x.shape, generator=gen).to(dev)
            if cfg.arch.space == "z":
                z, w = x, field_.style(x[None], update_w_avg=False)
            else:
                z, w = torch.full_like(codes[0], float("nan")), x[None]
        else:
            k = min(cfg.mix, n_identities)
            pick = torch.randperm(n_identities, generator=gen)[:k]
            a = torch.distributions.Dirichlet(torch.ones(k)).sample()  # seeded through torch.manual_seed below
            z = (a.to(dev)[:, None] * codes[pick.to(dev)]).sum(0)
            z = z + cfg.noise * spread * torch.randn(z.shape, generator=gen).to(dev)
            w = field_.style(z[None], update_w_avg=False)
        i = int(torch.randint(n_identities, (1,), generator=gen))
        pos = torch.randperm(len(train_ids), generator=gen)[:cfg.views_per_sample]
        v = train_ids[pos]
        verts = subdivide_vertices(data.base_vertices[i][None], plan)
        cloud = field_.synthesize(w, verts)[0]
        img = render_batch(cloud, [data.cameras[i][int(j)] for j in v], backend=backend)["image"]
        m = data.masks[i, v.to(dev)]
        img = img.clamp(0, 1) * (m.float() / 255)
        if residual is not None and float(torch.rand((), generator=gen)) < cfg.residual_fraction:
            img = (img + residual[i, pos.to(dev)]).clamp(0, 1) * (m.float() / 255)
        imgs.append((img * 255).round().to(torch.uint8))
        masks.append(m)
        styles.append(w.expand(len(v), -1))
        zs.append(z[None].expand(len(v), -1))
        ids.append(torch.full((len(v),), i, dtype=torch.long))
        cams.append(v.long())
    return (torch.cat(imgs), torch.cat(masks), torch.cat(styles), torch.cat(zs), torch.cat(ids).to(dev),
            torch.cat(cams).to(dev))


@torch.no_grad()
def output_metric(field_, w_ref: Tensor, w_std: Tensor, cfg: EncoderTrainConfig, gen: torch.Generator) -> Tensor:
    """(S, S) metric M of the style, in units of ``w_std`` (S,): the frozen field's Gaussians change their colour
    (SH coefficients) and opacity by about ``d^T M d`` (mean square over Gaussians and channels) when the style moves
    by ``d * w_std``.  Directions of w that the field ignores weigh nothing, so the encoder spends its capacity on
    what the renders show.

    M = mean over ``metric_identities`` training styles ``w_ref[i]`` of J^T J / outputs, with J the Jacobian of
    the Gaussians' SH coefficients and opacities w.r.t. the normalised style (central differences of 0.25 spread
    per channel; the network alone, no rendering).  Scaled to trace(M) = S (the plain squared error is M = I)."""
    S, dev = w_ref.shape[1], w_ref.device
    sl = field_._channel_slices()
    h = 0.25
    M = torch.zeros(S, S, device=dev, dtype=torch.float64)
    pick = torch.randperm(w_ref.shape[0], generator=gen)[:max(1, cfg.metric_identities)].tolist()

    def outputs(w: Tensor) -> Tensor:  # (B, S) -> (B, V * K * (3 num_sh + 1))
        raw = field_.synthesize_raw(w)
        opac = torch.sigmoid(raw[..., sl["opacity"]] + field_.opacity_logit_init)
        return torch.cat([raw[..., sl["sh"]], opac], -1).flatten(1)

    eye = torch.diag(h * w_std)  # (S, S): row k moves channel k by h spreads
    for i in pick:
        cols = []
        for k0 in range(0, S, 32):  # 32 directions per network call
            d = eye[k0:k0 + 32]
            cols.append((outputs(w_ref[i] + d) - outputs(w_ref[i] - d)) / (2 * h))
        J = torch.cat(cols).double()  # (S, outputs)
        M += J @ J.T / J.shape[1]
    M = M / len(pick)
    return (M * (S / float(torch.diagonal(M).sum().clamp_min(1e-30)))).float()


def jittered_batch(images: Tensor, masks: Tensor, cfg: EncoderTrainConfig, gen: torch.Generator) -> Tensor:
    """uint8 images (B, h, w, 3), masks (B, h, w, 1) -> jittered encoder crops (B, 4, size, size)."""
    B, dev = len(images), images.device

    def uni(*shape: int) -> Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1).to(dev)

    m = masks.float() / 255
    img = images.float() / 255
    gain = (1 + cfg.colour_jitter * uni(B, 1, 1, 3)) * (1 + cfg.exposure_jitter * uni(B, 1, 1, 1))
    img = (img * gain).clamp(0, 1) * m
    return encoder_input(img, m, cfg.arch.size, cfg.arch.margin, shift=cfg.crop_jitter * uni(B, 2),
                         scale=1 + cfg.scale_jitter * uni(B))


def render_loss(field_, verts: Tensor, cameras, pred: Tensor, images: Tensor, masks: Tensor, ids: Tensor,
                cams: Tensor, cfg: EncoderTrainConfig) -> Tensor:
    """Photometric term of ``cfg.render_*``: predicted styles pred (B, S) (codes (B, D) for an encoder of z) rendered
    by the frozen field on the subdivided vertices ``verts[ids]`` ((I, V, 3) per identity) through
    ``cameras[ids[b]][cams[b]]``, against images (B, h, w, 3) uint8 face-masked on black, masks (B, h, w, 1) uint8.
    Returns the scalar ``(1 - render_ssim) L1 + render_ssim (1 - SSIM)`` (whole image or face mask)."""
    w = pred if cfg.arch.space == "w" else field_.style(pred, update_w_avg=False)
    clouds = field_.synthesize(w, verts[ids])
    out = render_identities(clouds, [[cameras[int(i)][int(c)]] for i, c in zip(ids.tolist(), cams.tolist())],
                            backend=cfg.backend, depth=False)["image"][:, 0].clamp(0, 1)  # (B, h, w, 3)
    gt = images.float() / 255
    m = masks.float() / 255 if cfg.render_region == "face" else None
    if m is not None:
        out = out * m  # SSIM on the face-masked render: the background is black in both
    loss = (1 - cfg.render_ssim) * l1(out, gt, m)
    if cfg.render_ssim > 0:
        loss = loss + cfg.render_ssim * (1 - ssim(out, gt))
    return loss


def check_encoder_config(cfg: EncoderTrainConfig) -> None:
    """ValueError naming the flag when ``cfg`` cannot train an encoder."""
    if cfg.steps < 1 or cfg.batch < 1 or not 0 <= cfg.photo_fraction <= 1:
        raise ValueError(f"encoder training: steps and batch must be >= 1 and photo_fraction in [0, 1] (got "
                         f"{cfg.steps}, {cfg.batch}, {cfg.photo_fraction})")
    if cfg.loss not in ("w", "gaussians") or (cfg.loss == "gaussians" and cfg.arch.space != "w"):
        raise ValueError(f"encoder training: encoder.loss must be 'w' or 'gaussians' (the latter for an encoder of w, "
                         f"encoder.arch.space w), got {cfg.loss!r} with space {cfg.arch.space!r}")
    if not 0 <= cfg.gauss_fraction <= 1 or cfg.gauss_scale <= 0 or not 0 <= cfg.residual_fraction <= 1:
        raise ValueError(f"encoder training: encoder.gauss_fraction and encoder.residual_fraction must lie in [0, 1] "
                         f"and encoder.gauss_scale be > 0 (got {cfg.gauss_fraction}, {cfg.residual_fraction}, "
                         f"{cfg.gauss_scale})")
    if cfg.samples == 0 and cfg.photo_fraction < 1:
        raise ValueError("encoder training: encoder.samples 0 (no renders) needs encoder.photo_fraction 1")
    if (cfg.render_weight < 0 or cfg.style_weight < 0 or cfg.render_weight + cfg.style_weight <= 0
            or cfg.render_batch < 1 or cfg.render_every < 1 or not 0 <= cfg.render_ssim <= 1
            or cfg.render_region not in ("image", "face")):
        raise ValueError(f"encoder training: encoder.render_weight and encoder.style_weight must be >= 0 and not both "
                         f"0, encoder.render_batch and render_every >= 1, encoder.render_ssim in [0, 1], "
                         f"encoder.render_region 'image' or 'face' (got {cfg.render_weight}, {cfg.style_weight}, "
                         f"{cfg.render_batch}, {cfg.render_every}, {cfg.render_ssim}, {cfg.render_region!r})")
    if not 0 <= cfg.joint_start < 1 or cfg.joint_refresh < 0:
        raise ValueError(f"encoder training: encoder.joint_start must lie in [0, 1) and encoder.joint_refresh be >= 0 "
                         f"(got {cfg.joint_start}, {cfg.joint_refresh})")


@torch.no_grad()
def identity_targets(field_, cfg: EncoderTrainConfig) -> Tensor:
    """The training identities' regression targets (I, S) as the field gives them now, detached: their styles w, or
    (``arch.space z``) their codes z.  Detached is the stop-gradient of joint training: no loss of the encoder
    reaches the field through its targets."""
    codes = field_.codes.weight.detach()
    return field_.style(codes, update_w_avg=False) if cfg.arch.space == "w" else codes.clone()


class EncoderOptimisation:
    """One encoder's optimisation against an identity field: the training photos, the render bank, the encoder, its
    AdamW and its random generator; :meth:`step` takes one optimiser step.

    :func:`train_encoder` runs it after the field's training, on the frozen field; :class:`JointEncoder` runs it
    during the field's training, between the field's steps, refreshing the targets and the bank as the field moves.
    Every use of the field here is without gradient to its parameters (the caller freezes them: :func:`frozen`),
    and the photometric term's gradient stops at the predicted style."""

    def __init__(self, field_, plan: Tensor, data, cfg: EncoderTrainConfig, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        check_encoder_config(cfg)
        t0 = time.perf_counter()
        self.cfg, self.plan, self.data, self.log = cfg, plan, data, log
        self.gen = torch.Generator().manual_seed(cfg.seed)
        dev = self.dev = data.images.device
        n_identities = len(data.identities)
        # training photos: every (identity, training camera); the target of photo k is t_ids[p_id[k]]
        train_ids = torch.as_tensor(data.serial_index(data.train_serials), device=dev)
        self.p_img = data.images[:, train_ids].flatten(0, 1)
        self.p_msk = data.masks[:, train_ids].flatten(0, 1)
        self.p_id = torch.arange(n_identities, device=dev).repeat_interleave(len(train_ids))  # geometry of every photo
        self.p_cam = train_ids.repeat(n_identities)  # and its camera
        self.t_ids = identity_targets(field_, cfg)  # (I, S) regression targets: the styles w, or the codes z
        self.src: BankSource | None = None
        if cfg.samples > 0:
            self.src = bank_source(field_, data, plan, cfg, cfg.backend)
            r = render_samples(field_, data, plan, cfg, self.gen, self.src, cfg.samples, cfg.backend, progress)
            self.r_img, self.r_msk, r_w, r_z, self.r_id, self.r_cam = r
            self.r_w = r_w if cfg.arch.space == "w" else r_z
        else:
            self.r_img, self.r_msk, self.r_id, self.r_cam = (self.p_img[:0], self.p_msk[:0], self.p_id[:0],
                                                             self.p_cam[:0])
            self.r_w = self.t_ids[:0]
        self.refreshed = 0  # sampled identities re-rendered since the bank was made (joint training)
        self.verts = None
        if cfg.render_weight > 0:  # (I, V, 3) the subdivided geometry of every identity, for the photometric term
            with torch.no_grad():
                self.verts = torch.cat([subdivide_vertices(data.base_vertices[i][None], plan)
                                        for i in range(n_identities)])
        self.render_seconds = time.perf_counter() - t0
        all_w = torch.cat([self.t_ids[self.p_id], self.r_w])
        arch = EncoderConfig.from_dict({**cfg.arch.to_dict(), "style_dim": int(self.t_ids.shape[1])})
        self.enc = StyleEncoder(arch).to(dev)
        # output units: the targets' mean and spread when the encoder starts (kept: they are part of its function)
        self.enc.w_mean.copy_(all_w.mean(0))
        self.enc.w_std.copy_(all_w.std(0).clamp_min(1e-3 * float(all_w.std(0).mean()) + 1e-8))
        self.metric = None
        if cfg.loss == "gaussians":
            self.metric = output_metric(field_, self.t_ids, self.enc.w_std, cfg, self.gen)  # (S, S), trace S
        self.opt = torch.optim.AdamW(self.enc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.n_photo = round(cfg.batch * cfg.photo_fraction) if len(self.r_img) else cfg.batch
        self.done = 0  # optimiser steps taken
        self.losses: list[float] = []  # the loss's mean every 100 steps
        self.render_losses: list[float] = []  # the photometric term's mean every 100 steps (render_weight > 0)
        self._acc = [0.0, 0.0, 0, 0]  # loss sum, photometric sum, their counts since the last record
        self.seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ the moving field (joint training)
    @torch.no_grad()
    def refresh_targets(self, field_) -> None:
        """Take the training identities' targets from the field as it is now (stop-gradient)."""
        self.t_ids = identity_targets(field_, self.cfg)

    @torch.no_grad()
    def refresh_bank(self, field_, n: int) -> None:
        """Re-render the ``n`` oldest sampled identities of the bank with the field as it is now (their draw from
        the current codes and styles).  Each time the whole bank has been renewed, the residuals and the statistics
        they are drawn from (:func:`bank_source`) and the "gaussians" loss's metric are taken anew as well."""
        cfg, per = self.cfg, self.cfg.views_per_sample
        t0 = time.perf_counter()
        while n > 0 and self.src is not None:
            if self.refreshed >= cfg.samples:
                self.src = bank_source(field_, self.data, self.plan, cfg, cfg.backend)
                if self.metric is not None:
                    self.metric = output_metric(field_, self.t_ids, self.enc.w_std, cfg, self.gen)
                self.refreshed = 0
            k = min(n, cfg.samples - self.refreshed)
            img, msk, w, z, ids, cams = render_samples(field_, self.data, self.plan, cfg, self.gen, self.src, k,
                                                       cfg.backend)
            rows = slice(self.refreshed * per, self.refreshed * per + len(img))
            self.r_img[rows], self.r_msk[rows] = img, msk
            self.r_w[rows] = w if cfg.arch.space == "w" else z
            self.r_id[rows], self.r_cam[rows] = ids, cams
            self.refreshed += k
            n -= k
        dt = time.perf_counter() - t0
        self.seconds, self.render_seconds = self.seconds + dt, self.render_seconds + dt

    # ------------------------------------------------------------------ one step
    def step(self, field_, total: int) -> None:
        """One AdamW step of the encoder (cosine learning rate over ``total`` steps, to 5 %)."""
        cfg, dev, enc, gen = self.cfg, self.dev, self.enc, self.gen
        t0 = time.perf_counter()
        enc.train()
        self.opt.param_groups[0]["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * self.done / total)))
        pi = torch.randint(len(self.p_img), (self.n_photo,), generator=gen).to(dev)
        ri = torch.randint(max(1, len(self.r_img)), (cfg.batch - self.n_photo,), generator=gen).to(dev)
        imgs = torch.cat([self.p_img[pi], self.r_img[ri]])
        msks = torch.cat([self.p_msk[pi], self.r_msk[ri]])
        target = torch.cat([self.t_ids[self.p_id[pi]], self.r_w[ri]])
        x = jittered_batch(imgs, msks, cfg, gen)
        pred = enc(x)
        err = (pred - target) / enc.w_std  # (B, S)
        loss = err.square().mean()
        if self.metric is not None:  # e^T M e / S: the mean squared change of the Gaussians' colour and opacity
            loss = cfg.w_weight * loss + ((err @ self.metric) * err).sum(1).mean() / err.shape[1]
        loss = cfg.style_weight * loss
        r_loss = None
        if self.verts is not None and self.done % cfg.render_every == 0:  # a few crops rendered with their style
            sel = torch.randperm(len(imgs), generator=gen)[:cfg.render_batch].to(dev)
            ids = torch.cat([self.p_id[pi], self.r_id[ri]])[sel]
            cams = torch.cat([self.p_cam[pi], self.r_cam[ri]])[sel]
            r_loss = render_loss(field_, self.verts, self.data.cameras, pred[sel], imgs[sel], msks[sel], ids, cams,
                                 cfg)
            loss = loss + cfg.render_weight * r_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.done += 1
        self._record(float(loss.detach()), None if r_loss is None else float(r_loss.detach()), total)
        self.seconds += time.perf_counter() - t0

    def _record(self, loss: float, r_loss: float | None, total: int) -> None:
        """Running means of the loss (and of the photometric term), kept and logged every 100 steps."""
        acc = self._acc
        acc[0], acc[2] = acc[0] + loss, acc[2] + 1
        if r_loss is not None:
            acc[1], acc[3] = acc[1] + r_loss, acc[3] + 1
        if self.done % 100 == 0 or self.done == total:
            self.losses.append(acc[0] / acc[2])
            if self.verts is not None:
                self.render_losses.append(acc[1] / max(1, acc[3]))
            if self.log is not None:
                self.log(f"encoder step {self.done}/{total}: loss {acc[0] / acc[2]:.4f}"
                         + (f" (photometric {acc[1] / max(1, acc[3]):.4f})" if self.verts is not None else ""))
            self._acc = [0.0, 0.0, 0, 0]
            if not math.isfinite(self.losses[-1]):
                raise FloatingPointError(f"encoder training diverged (loss {self.losses[-1]}) at step {self.done}; "
                                         f"lower encoder.lr")

    def stats(self) -> dict:
        """The run's figures (train_encoder's stats; the seconds include the bank's renders, "render" those alone)."""
        return {"encoder_losses": list(self.losses), "encoder_render_losses": list(self.render_losses),
                "encoder_seconds": self.seconds, "encoder_render_seconds": self.render_seconds,
                "encoder_photos": len(self.p_img), "encoder_renders": len(self.r_img)}

    # ------------------------------------------------------------------ checkpoints (joint training)
    def state_dict(self) -> dict:
        """The optimisation's resumable state (the render bank is not in it: a resume renders a new one)."""
        return {"encoder": encoder_state(self.enc), "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(), "done": self.done, "losses": list(self.losses),
                "render_losses": list(self.render_losses), "accumulated": list(self._acc), "seconds": self.seconds,
                "render_seconds": self.render_seconds}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output: weights (and output units), optimiser, generator, counters."""
        self.enc.load_state_dict(state["encoder"]["state_dict"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self.done = int(state["done"])
        self.losses, self.render_losses = list(state["losses"]), list(state["render_losses"])
        self._acc = list(state["accumulated"])
        self.seconds += float(state["seconds"])  # the time before, plus this rebuild (its new bank)
        self.render_seconds += float(state["render_seconds"])


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode with no parameter requiring a gradient, restored on exit: a backward pass through it
    (the photometric term) reaches its inputs but leaves its parameters' gradients untouched."""
    flags = [p.requires_grad for p in module.parameters()]
    was = module.training
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was)


def train_encoder(model, data, cfg: EncoderTrainConfig, progress: bool = True, log=None) -> tuple[StyleEncoder, dict]:
    """Train an encoder for the frozen field of ``model`` (utils.data.model_file.TrainedModel) on ``data`` (its
    MultiViewDataset, identities in the model's order).  Returns (encoder in eval mode, stats)."""
    if list(data.identities) != list(model.identities):
        raise ValueError(f"encoder training: the dataset's identities {data.identities} are not the model's "
                         f"{model.identities} (train the encoder on the data the field was trained on)")
    check_encoder_config(cfg)
    torch.manual_seed(cfg.seed)
    f = model.field.eval()
    for p in f.parameters():
        p.requires_grad_(False)
    run = EncoderOptimisation(f, model.plan, data, cfg, progress, log)
    for _ in tqdm(range(cfg.steps), desc="encoder", disable=not progress, leave=False, dynamic_ncols=True):
        run.step(f, cfg.steps)
    run.enc.eval()
    return run.enc, run.stats()


class JointEncoder:
    """The encoder trained during the field's training (``train.py --encoder --encoder.joint true``).

    Nothing happens before the field's step ``start`` (``joint_start`` of its steps: before it the codes and styles
    are not yet meaningful targets, and styles that still move much make worse targets: 0.5 lost face-mask detail
    against 0.84 on the CPU preset).  Then, after each of the field's steps, the encoder takes its share of
    ``encoder.steps`` optimiser steps (spread evenly over the field's remaining steps, so it ends with the field) on
    its own AdamW and random generator, against the field's current codes/styles as targets through stop-gradient
    (:func:`identity_targets`), with the field frozen meanwhile (:func:`frozen`): the photometric term reaches the
    predicted style only, so the encoder never pulls the field.  The render bank is made at the start and renewed
    ``joint_refresh`` times over the remaining steps, the oldest renders first.  The encoder's draws from torch's
    global random generator run on a state of its own, so the field's training takes exactly the steps it takes
    without the encoder (same weights).

    Checkpoints hold :meth:`state_dict` (None before the start); a resume rebuilds the photos and renders a new bank
    from the restored field, then restores the encoder, its optimiser and its random states."""

    def __init__(self, cfg: EncoderTrainConfig, field_steps: int, field_, plan: Tensor, data,
                 log: Callable[[str], None] | None = None) -> None:
        check_encoder_config(cfg)
        self.cfg, self.field_steps, self.log = cfg, field_steps, log
        self.field, self.plan, self.data = field_, plan, data
        self.start = min(field_steps - 1, int(math.floor(cfg.joint_start * field_steps)))
        self.run: EncoderOptimisation | None = None
        self.rng_state: Tensor | None = None  # torch's global CPU random state of the encoder's draws

    def _due(self, step: int) -> tuple[int, int]:
        """After field step ``step``: (encoder steps, bank samples re-rendered) due in all since the start."""
        frac = (step - self.start) / (self.field_steps - self.start)
        return round(self.cfg.steps * frac), int(self.cfg.joint_refresh * self.cfg.samples * frac)

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Torch's global CPU generator on the encoder's own state inside, the field's state restored after."""
        with torch.random.fork_rng(devices=[]):
            if self.rng_state is None:
                torch.manual_seed(self.cfg.seed)
            else:
                torch.set_rng_state(self.rng_state)
            yield
            self.rng_state = torch.get_rng_state()

    def after_field_step(self, step: int) -> None:
        """Run what is due after the field's step ``step`` (1-based: the field has taken ``step`` steps)."""
        if step <= self.start:
            return
        # rendered as the tools render the saved model (its display 2D filter), as add_trained_encoder's renders are
        # after load_model, whatever this process's setting is; the field's own training renders keep theirs
        with self._own_rng(), frozen(self.field), torch.enable_grad(), render_filter(*display_filter(self.field.cfg)):
            if self.run is None:  # the start (or a resume from a checkpoint without the encoder): a fresh bank
                self.run = EncoderOptimisation(self.field, self.plan, self.data, self.cfg, log=self.log)
            else:  # the field moved by one step: its styles now, and the bank's due share re-rendered
                self.run.refresh_targets(self.field)
                self.run.refresh_bank(self.field, self._due(step)[1] - self._due(step - 1)[1])
            n_steps = self._due(step)[0]
            while self.run.done < n_steps:
                self.run.step(self.field, self.cfg.steps)

    @property
    def encoder(self) -> StyleEncoder | None:
        """The encoder (eval mode) once started, else None."""
        return None if self.run is None else self.run.enc.eval()

    def stats(self) -> dict:
        return {} if self.run is None else {**self.run.stats(), "encoder_joint_start": self.start}

    def state_dict(self) -> dict | None:
        """The checkpoint's "encoder" entry: config, start, optimisation state and random state; None before it."""
        if self.run is None:
            return None
        return {"train_config": to_dict(self.cfg), "start": self.start, "state": self.run.state_dict(),
                "rng_state": self.rng_state}

    def load_state_dict(self, state: dict | None, path: Path) -> None:
        """Continue from a checkpoint's "encoder" entry (``path``: the checkpoint, for messages); None: not started."""
        if state is None:
            return
        if state["train_config"] != to_dict(self.cfg):
            diff = sorted(k for k in set(state["train_config"]) | set(to_dict(self.cfg))
                          if state["train_config"].get(k) != to_dict(self.cfg).get(k))
            raise ValueError(f"--resume: {path} holds a joint encoder trained with other encoder settings ({diff}); "
                             f"resume with the same --encoder.* flags")
        rng, self.rng_state = state["rng_state"], None
        self.start = int(state["start"])  # a resume to more --steps spreads the remaining encoder steps anew
        with self._own_rng(), frozen(self.field), torch.enable_grad():
            self.run = EncoderOptimisation(self.field, self.plan, self.data, self.cfg, log=self.log)
        self.run.load_state_dict(state["state"])
        self.rng_state = rng


def add_trained_encoder(path: Path, ecfg: EncoderTrainConfig, device: str | torch.device, progress: bool,
                        data: MultiViewDataset | None = None, data_root: str | None = None,
                        flame_dir: str | None = None) -> dict:
    """Train the encoder for the trained model ``path`` (model.pt) and store it there; returns train_encoder's stats.

    ``data``: the training data already loaded (the Trainer's); else the data the model was trained on is read
    again, from ``data_root``/``flame_dir`` when given.  ``device``: a torch.device or a --device setting."""
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path} (--checkpoint; train the field first)")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model = load_model(path, device)
    if data is None:
        dcfg = from_dict(DataConfig, dict(model.config.get("data", {})), f"{path} data config")
        if data_root:
            dcfg.root = data_root
        if flame_dir:
            dcfg.flame_dir = flame_dir
        data = MultiViewDataset(dcfg, device, identities=model.identities, progress=progress)
    with torch.enable_grad():
        enc, stats = train_encoder(model, data, ecfg, progress=progress, log=print)
    add_encoder(path, enc)
    print(f"encoder: {stats['encoder_photos']} photos + {stats['encoder_renders']} renders, {ecfg.steps} steps, "
          f"final loss {stats['encoder_losses'][-1]:.4f}, {stats['encoder_seconds']:.0f} s -> {path}")
    return stats
