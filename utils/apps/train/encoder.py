"""Training of the feed-forward encoder (models/encoder.py) after the identity field, with the field frozen.

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from models.encoder import EncoderConfig, StyleEncoder, encoder_input
from models.flame import subdivide_vertices
from models.renderer import render_batch, render_identities
from utils.core.config import from_dict
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
    arch: EncoderConfig = field(default_factory=EncoderConfig)


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
    imgs, masks, styles, zs, ids, cams = [], [], [], [], [], []
    for _ in tqdm(range(cfg.samples), desc="encoder: rendering", disable=not progress, leave=False):
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


def train_encoder(model, data, cfg: EncoderTrainConfig, progress: bool = True, log=None) -> tuple[StyleEncoder, dict]:
    """Train an encoder for the frozen field of ``model`` (utils.data.model_file.TrainedModel) on ``data`` (its
    MultiViewDataset, identities in the model's order).  Returns (encoder in eval mode, stats)."""
    if list(data.identities) != list(model.identities):
        raise ValueError(f"encoder training: the dataset's identities {data.identities} are not the model's "
                         f"{model.identities} (train the encoder on the data the field was trained on)")
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
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    f = model.field.eval()
    dev = data.images.device
    for p in f.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        w_ids = f.style(f.codes.weight, update_w_avg=False)  # (I, S)
    # training photos: every (identity, training camera)
    train_ids = torch.as_tensor(data.serial_index(data.train_serials), device=dev)
    n_identities = len(data.identities)
    p_img = data.images[:, train_ids].flatten(0, 1)
    p_msk = data.masks[:, train_ids].flatten(0, 1)
    # regression targets: the styles w, or (arch.space z) the codes z
    t_ids = w_ids if cfg.arch.space == "w" else f.codes.weight.detach()
    p_w = t_ids[:, None].expand(n_identities, len(train_ids), -1).flatten(0, 1)
    p_id = torch.arange(n_identities, device=dev).repeat_interleave(len(train_ids))  # geometry of every photo
    p_cam = train_ids.repeat(n_identities)  # and its camera
    if cfg.samples > 0:
        r_img, r_msk, r_w, r_z, r_id, r_cam = render_bank(f, data, model.plan, cfg, gen, cfg.backend, progress)
        r_w = r_w if cfg.arch.space == "w" else r_z
    else:
        r_img, r_msk, r_w, r_id, r_cam = p_img[:0], p_msk[:0], p_w[:0], p_id[:0], p_cam[:0]
    verts = None
    if cfg.render_weight > 0:  # (I, V, 3) the subdivided geometry of every identity, for the photometric term
        with torch.no_grad():
            verts = torch.cat([subdivide_vertices(data.base_vertices[i][None], model.plan)
                               for i in range(n_identities)])
    t_render = time.perf_counter() - t0
    all_w = torch.cat([p_w, r_w])
    arch = EncoderConfig.from_dict({**cfg.arch.to_dict(), "style_dim": int(t_ids.shape[1])})
    enc = StyleEncoder(arch).to(dev)
    enc.w_mean.copy_(all_w.mean(0))
    enc.w_std.copy_(all_w.std(0).clamp_min(1e-3 * float(all_w.std(0).mean()) + 1e-8))
    metric = None
    if cfg.loss == "gaussians":
        metric = output_metric(f, w_ids, enc.w_std, cfg, gen)  # (S, S), trace S
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_photo = round(cfg.batch * cfg.photo_fraction) if len(r_img) else cfg.batch
    losses: list[float] = []
    render_losses: list[float] = []  # the photometric term's mean every 100 steps (render_weight > 0)
    acc, acc_r, k, k_r = 0.0, 0.0, 0, 0
    enc.train()
    for step in tqdm(range(cfg.steps), desc="encoder", disable=not progress, leave=False, dynamic_ncols=True):
        opt.param_groups[0]["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        pi = torch.randint(len(p_img), (n_photo,), generator=gen).to(dev)
        ri = torch.randint(max(1, len(r_img)), (cfg.batch - n_photo,), generator=gen).to(dev)
        imgs = torch.cat([p_img[pi], r_img[ri]])
        msks = torch.cat([p_msk[pi], r_msk[ri]])
        target = torch.cat([p_w[pi], r_w[ri]])
        x = jittered_batch(imgs, msks, cfg, gen)
        pred = enc(x)
        err = (pred - target) / enc.w_std  # (B, S)
        loss = err.square().mean()
        if metric is not None:  # e^T M e / S: the mean squared change of the Gaussians' colour and opacity
            loss = cfg.w_weight * loss + ((err @ metric) * err).sum(1).mean() / err.shape[1]
        loss = cfg.style_weight * loss
        if verts is not None and step % cfg.render_every == 0:  # a few crops rendered with their predicted style
            sel = torch.randperm(len(imgs), generator=gen)[:cfg.render_batch].to(dev)
            ids, cams = torch.cat([p_id[pi], r_id[ri]])[sel], torch.cat([p_cam[pi], r_cam[ri]])[sel]
            r_loss = render_loss(f, verts, data.cameras, pred[sel], imgs[sel], msks[sel], ids, cams, cfg)
            loss = loss + cfg.render_weight * r_loss
            acc_r, k_r = acc_r + float(r_loss.detach()), k_r + 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc, k = acc + float(loss.detach()), k + 1
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            losses.append(acc / k)
            if verts is not None:
                render_losses.append(acc_r / max(1, k_r))
            if log is not None:
                log(f"encoder step {step + 1}/{cfg.steps}: loss {acc / k:.4f}"
                    + (f" (photometric {acc_r / max(1, k_r):.4f})" if verts is not None else ""))
            acc, acc_r, k, k_r = 0.0, 0.0, 0, 0
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"encoder training diverged (loss {losses[-1]}) at step {step + 1}; lower "
                                         f"encoder.lr")
    enc.eval()
    stats = {"encoder_losses": losses, "encoder_render_losses": render_losses,
             "encoder_seconds": time.perf_counter() - t0,
             "encoder_render_seconds": t_render, "encoder_photos": len(p_img), "encoder_renders": len(r_img)}
    return enc, stats


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
