"""Where the held-out cameras' eye-region gap of a small training run comes from (issue 25, 69x100 px).

Loads a finished run as benchmarks/heldout_eyes.py does (its last checkpoint, the same preset and data) and measures,
on the held-out cameras of every training identity, per region (face mask, eye regions, face mask without the eyes):

* ``model``: the run's renders (the 2D filter it trained with) against the photos: training's own evaluation;
* ``render filter``: the same model rendered with other 2D mip filters (px^2; "classic" = 3DGS's 0.3 px^2
  dilation) and without its 3D filter: do the anti-aliasing filters blur the 1-2 px eye features?
* ``references`` that need no model: the photos (JPEG) against the clean ground-truth render they were written from
  (synthetic data only: the data's own noise floor), and the photos against themselves blurred by a Gaussian of
  sigma 0.5 / 0.7 / 1 px or shifted by one pixel (blur and shift inside the face mask, normalised so the black
  outside does not bleed in): what PSNR gap a uniform 1-px error makes in a high-contrast region;
* ``sharpness``: mean |finite difference| of photo, clean render and model render in each region;
* ``error spectrum``: PSNR after blurring prediction and photo alike (sigma 1 px): the share of the eye error that
  is sub-pixel detail rather than colour;
* ``gaussians``: per view, the model's Gaussians whose centres project into each region (count per pixel, their
  projected sigma along the major and minor axes in px, mean opacity);
* ``loss gradient``: share of each training loss term's gradient (|dLoss/dpred|) that lands on eye pixels, against
  their share of the face pixels and against the share of an MSE gradient (what PSNR measures), on every training
  identity's training views.

    python benchmarks/eye_gap.py --config configs/cpu.yaml --data_root output/syn546 --out output/cpu546 \\
        --steps 400 [--json output/eye_gap.json]

Per-view PSNRs are averaged as training's evaluation does (views with no eye pixels skipped).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.heldout_eyes import run_parser  # noqa: E402
from models import renderer  # noqa: E402
from models.mip_filter import display_filter, render_filter  # noqa: E402
from models.renderer import render_identities  # noqa: E402
from utils.apps.train.trainer import TrainConfig, Trainer, pool_pixels, training_compensation  # noqa: E402
from utils.core.config import build_config  # noqa: E402
from utils.losses import psnr  # noqa: E402

REGIONS = ("face", "eyes", "rest")  # face mask, eye regions, face mask without the eye regions


def gauss_kernel(sigma: float) -> Tensor:
    """(k,) normalised 1-D Gaussian, radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return g / g.sum()


def _sep_conv(x: Tensor, g: Tensor) -> Tensor:
    """x (N, C, H, W) blurred by the separable kernel g (k,), zero padding."""
    C, k = x.shape[1], g.numel()
    x = torch.nn.functional.conv2d(x, g.view(1, 1, 1, k).expand(C, 1, 1, k), padding=(0, k // 2), groups=C)
    return torch.nn.functional.conv2d(x, g.view(1, 1, k, 1).expand(C, 1, k, 1), padding=(k // 2, 0), groups=C)


def blur_in_mask(img: Tensor, mask: Tensor, sigma: float) -> Tensor:
    """Normalised convolution inside the mask: img (C, H, W, 3), mask (C, H, W, 1) -> (C, H, W, 3) blurred by a
    Gaussian of ``sigma`` px using only masked pixels (so the black outside the face mask does not darken the rim),
    times the mask."""
    g = gauss_kernel(sigma)
    x, m = (img * mask).permute(0, 3, 1, 2), mask.permute(0, 3, 1, 2)
    num, den = _sep_conv(x, g), _sep_conv(m, g)
    return (num / den.clamp_min(1e-6)).permute(0, 2, 3, 1) * mask


def shift_in_mask(img: Tensor, mask: Tensor, dx: int, dy: int) -> Tensor:
    """img moved by (dx, dy) px; pixels whose source lies outside the mask keep their own value (C, H, W, 3)."""
    moved = torch.roll(img, shifts=(dy, dx), dims=(1, 2))
    src_in = torch.roll(mask, shifts=(dy, dx), dims=(1, 2)) > 0.5
    return torch.where(src_in, moved, img) * mask


def sharpness(img: Tensor, region: Tensor) -> Tensor:
    """Per-view mean |horizontal| + |vertical| finite difference (summed over RGB) over the pixel pairs whose both
    pixels lie in ``region``: img (C, H, W, 3), region (C, H, W, 1) -> (C,)."""
    dx = (img[:, :, 1:] - img[:, :, :-1]).abs().sum(-1)
    dy = (img[:, 1:] - img[:, :-1]).abs().sum(-1)
    r = region[..., 0] > 0.5
    mx, my = r[:, :, 1:] & r[:, :, :-1], r[:, 1:] & r[:, :-1]
    total = (dx * mx).sum((1, 2)) + (dy * my).sum((1, 2))
    count = (mx.sum((1, 2)) + my.sum((1, 2))).clamp_min(1)
    return total / count


def region_masks(face: Tensor, eyes: Tensor) -> dict[str, Tensor]:
    """{'face', 'eyes', 'rest'}: (C, H, W, 1) float masks."""
    return {"face": face, "eyes": eyes, "rest": face * (1 - eyes)}


def region_psnr(pred: Tensor, gt: Tensor, regions: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-view PSNR (C,) in each region (NaN for an empty region)."""
    out = {}
    for k, m in regions.items():
        p = psnr(pred.clamp(0, 1), gt, mask=m, reduction="none").float()
        out[k] = torch.where(m.flatten(1).sum(1) == 0, torch.full_like(p, float("nan")), p)
    return out


def projected_sigmas(cloud, cam) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixel centres (N, 2), depth (N,) and projected standard deviations along the major / minor axes (N,), (N,)
    of one cloud (N Gaussians) in ``cam`` (EWA: J W Sigma W^T J^T, without any 2D filter)."""
    from models.gaussians import quat_to_rotmat

    R = quat_to_rotmat(cloud.quats)  # (N, 3, 3)
    cov = R @ torch.diag_embed(cloud.scales.square()) @ R.transpose(-1, -2)
    W = cam.w2c[:3, :3].to(cov)
    pc = cloud.means @ W.T + cam.w2c[:3, 3].to(cov)
    x, y, z = pc.unbind(-1)
    z = z.clamp_min(1e-6)
    J = torch.zeros(len(z), 2, 3, dtype=cov.dtype)
    J[:, 0, 0], J[:, 0, 2] = cam.fx / z, -cam.fx * x / (z * z)
    J[:, 1, 1], J[:, 1, 2] = cam.fy / z, -cam.fy * y / (z * z)
    T = J @ W
    c2 = T @ cov @ T.transpose(-1, -2)
    ev = torch.linalg.eigvalsh(c2).clamp_min(0)  # ascending
    uv = torch.stack([cam.fx * x / z + cam.cx, cam.fy * y / z + cam.cy], -1)
    return uv, z, ev[:, 1].sqrt(), ev[:, 0].sqrt()


def nanmean(x: Tensor) -> float:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


def build_parser() -> argparse.ArgumentParser:
    p = run_parser(__doc__.split("\n\n")[0])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further config overrides the run was trained with (e.g. loss.eye_weight=0.1)")
    p.add_argument("--filters", default="0.01,0.05,0.1,0.3,classic,display",
                   help="2D mip filters to render the model with: px^2 (training's compensation), 'classic' (3DGS's "
                        "0.3 px^2 dilation), 'display' (the model's render_filter_2d and render_compensation) or 'ssK' "
                        "(training's filter at K x the size, K x K blocks averaged: pixel areas integrated)")
    p.add_argument("--views", choices=("heldout", "train"), default="heldout",
                   help="which cameras of every training identity to measure on")
    p.add_argument("--no_model", action="store_true",
                   help="only the data references (no checkpoint needed; --out is then a scratch folder)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p


def _parse_value(v: str) -> int | float | str:
    """A --set value as int, float or (else) string."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def trained_run(args, resume: bool = True) -> Trainer:
    """The Trainer of run_parser's run (--config, --data_root, --out, --steps, --set overrides), resumed from its last
    checkpoint, which must be at exactly --steps (with ``resume``)."""
    overrides = {"data.root": args.data_root, "out": args.out, "steps": args.steps, "progress": False}
    overrides.update({k: _parse_value(v) for k, v in (s.split("=", 1) for s in args.set)})
    cfg = build_config(TrainConfig, args.config, overrides=overrides)
    tr = Trainer(cfg, resume=resume)
    if resume and tr.step != args.steps:
        raise SystemExit(f"{args.out}: the last checkpoint is at step {tr.step}, not {args.steps}")
    return tr


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tr = trained_run(args, resume=not args.no_model)
    data, field = tr.data, tr.field
    field.eval()
    held = data.serial_index(data.eval_serials if args.views == "heldout" else data.train_serials)
    # (label, 2D filter px^2 or None for the classic dilation, compensation): "display" = what the tools render a
    # loaded model with (its render_filter_2d and render_compensation, models.mip_filter.display_filter)
    # "ssK" = training's 2D filter at K x the size, K x K blocks averaged (pixel areas integrated, loss.supersample)
    filters = []
    for f in args.filters.split(","):
        if f == "display":
            filters.append(("display", *display_filter(field.cfg), 1))
        elif f.startswith("ss"):
            filters.append((f, tr.filter_2d, None, int(f[2:])))
        else:
            filters.append((f"{float(f):g}" if f != "classic" else f, None if f == "classic" else float(f), None, 1))
    if not any(f == tr.filter_2d and comp is None and k == 1 for _, f, comp, k in filters):  # sharpness rows need it
        filters.append(("classic" if tr.filter_2d is None else f"{tr.filter_2d:g}", tr.filter_2d, None, 1))
    try:
        from utils.data.synthetic.dataset import load_ground_truth
        from utils.data.synthetic.render import render_ground_truth
        synthetic = (Path(args.data_root) / "synthetic_info.json").exists()
    except ImportError:
        synthetic = False

    acc: dict[str, list[Tensor]] = {}

    def add(key: str, v: Tensor) -> None:
        acc.setdefault(key, []).append(v.float().cpu())

    gstats: dict[str, list[float]] = {}
    for i in range(len(data)):
        cams = [data.cameras[i][v] for v in held]
        gt = data.images[i, held].float() / 255.0
        face = data.masks[i, held].float() / 255.0
        face = (face > 0.5).float()
        eyes = tr._eval_eye_masks(i, held, face)
        regs = region_masks(face, eyes)
        for k, m in regs.items():
            add(f"pixels/{k}", m.flatten(1).sum(1))
        # references on the data alone
        for s in (0.5, 0.7, 1.0):
            for k, v in region_psnr(blur_in_mask(gt, face, s), gt, regs).items():
                add(f"ref_blur{s}/{k}", v)
        sh = [shift_in_mask(gt, face, dx, dy) for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        per = [region_psnr(s_, gt, regs) for s_ in sh]
        for k in REGIONS:
            add(f"ref_shift1/{k}", torch.stack([p[k] for p in per]).mean(0))
        for k, m in regs.items():
            add(f"sharp_photo/{k}", sharpness(gt, m))
            add(f"contrast_photo/{k}", torch.stack([gt[c][m[c, ..., 0] > 0.5].std() if m[c].sum() > 1
                                                    else torch.tensor(float("nan")) for c in range(len(held))]))
        if synthetic:
            gt_cloud, ident = load_ground_truth(args.data_root, data.identities[i])
            clean = render_ground_truth(gt_cloud, cams, ident, "studio", backend="torch")["image"].clamp(0, 1)
            clean = clean * face
            for k, v in region_psnr(gt, clean, regs).items():
                add(f"ref_jpeg_vs_clean/{k}", v)
            for k, m in regs.items():
                add(f"sharp_clean/{k}", sharpness(clean, m))
        if args.no_model:
            continue
        verts = tr.vertices(torch.tensor([i]))
        cloud = field(field.codes.weight[i : i + 1], verts)
        for name, f, comp, ss in filters:
            with training_compensation(), render_filter(renderer.FILTER_2D, comp):
                pred = render_identities(cloud, [[c.scaled(ss) for c in cams] if ss > 1 else cams],
                                         backend=tr.cfg.backend, depth=False, filter_2d=f)["image"][0]
            pred = (pool_pixels(pred, ss) if ss > 1 else pred).clamp(0, 1)
            for k, v in region_psnr(pred, gt, regs).items():
                add(f"model_f2d_{name}/{k}", v)
            if f == tr.filter_2d and comp is None and ss == 1:
                base_pred = pred
        with training_compensation():
            saved = field.filter_variance
            field.filter_variance = None
            cloud_nof3d = field(field.codes.weight[i : i + 1], verts)
            field.filter_variance = saved
            pred = render_identities(cloud_nof3d, [cams], backend=tr.cfg.backend, depth=False,
                                     filter_2d=tr.filter_2d)["image"][0].clamp(0, 1)
            for k, v in region_psnr(pred, gt, regs).items():
                add(f"model_no3d/{k}", v)
        pred = base_pred
        for k, m in regs.items():
            add(f"sharp_model/{k}", sharpness(pred, m))
        for k, v in region_psnr(blur_in_mask(pred, face, 1.0), blur_in_mask(gt, face, 1.0), regs).items():
            add(f"model_both_blur1/{k}", v)
        if synthetic:
            for k, v in region_psnr(pred, clean, regs).items():
                add(f"model_vs_clean/{k}", v)
        # Gaussians per region (centre pixel inside the region, in front of the camera)
        c0 = cloud[0]
        for cam, reg_c in zip(cams, zip(*[regs[k] for k in REGIONS])):
            uv, z, smaj, smin = projected_sigmas(c0, cam)
            px = uv.floor().long()
            inside = (px[:, 0] >= 0) & (px[:, 0] < cam.width) & (px[:, 1] >= 0) & (px[:, 1] < cam.height) & (z > 0)
            for k, m in zip(REGIONS, reg_c):
                sel = inside.clone()
                sel[inside] = m[px[inside, 1], px[inside, 0], 0] > 0.5
                npx = float(m.sum())
                if npx == 0:
                    continue
                gstats.setdefault(f"gauss_per_px/{k}", []).append(float(sel.sum()) / npx)
                if sel.any():
                    gstats.setdefault(f"gauss_sigma_major_px/{k}", []).append(float(smaj[sel].median()))
                    gstats.setdefault(f"gauss_sigma_minor_px/{k}", []).append(float(smin[sel].median()))
                    gstats.setdefault(f"gauss_opacity/{k}", []).append(float(c0.opacities[sel].mean()))

    result = {k: nanmean(torch.cat(v)) for k, v in acc.items()}
    result.update({k: sum(v) / len(v) for k, v in gstats.items()})
    if not args.no_model and args.views == "heldout":
        result.update(loss_gradient_shares(tr))
    tr.close()
    for k, v in result.items():
        print(f"{k}: {v:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def loss_gradient_shares(tr: Trainer) -> dict[str, float]:
    """Share of |dTerm/dpred| on eye pixels (of that on face-mask pixels) for each weighted training loss term, on
    every identity's training views; with the eye pixels' share of the face pixels and an MSE gradient's share."""
    data, field, lc = tr.data, tr.field, tr.cfg.loss
    from utils.apps.train.trainer import eye_masks_of
    from utils.losses import l1, ssim

    eye_all = eye_masks_of(data, tr.eye_landmarks).float()  # (I, S, h, w, 1), inside the face masks
    views = tr.train_ids
    sums: dict[str, list[float]] = {}
    for i in range(len(data)):
        ids = torch.tensor([i])
        with torch.no_grad():
            cloud = field(field.codes.weight[i : i + 1], tr.vertices(ids))
        with torch.no_grad():
            pred, gt = tr.render_views(cloud, ids, views[None], depth=False)
        face = (data.masks[i, views] > 127).float()[None]
        eyes = eye_all[i, views][None]
        terms = {"l1": lambda p: lc.l1_weight * l1(p, gt),
                 "ssim": lambda p: lc.ssim_weight * (1 - ssim(p.flatten(0, 1), gt.flatten(0, 1))),
                 "mse": lambda p: (p - gt).square().mean()}
        for w in (0.01, 0.1):  # the whole photometric loss with an eye term of weight w (loss.eye_weight)
            terms[f"l1+ssim+eye{w:g}"] = lambda p, w=w: terms["l1"](p) + terms["ssim"](p) + w * l1(p, gt, eyes)
        for name, fn in terms.items():
            with torch.enable_grad():
                p = pred.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(fn(p), p)
            a = g.abs().sum(-1, keepdim=True)
            sums.setdefault(f"{name}/eyes", []).append(float((a * eyes).sum()))
            sums.setdefault(f"{name}/face", []).append(float((a * face).sum()))
        sums.setdefault("px/eyes", []).append(float(eyes.sum()))
        sums.setdefault("px/face", []).append(float(face.sum()))
    share = lambda n: sum(sums[f"{n}/eyes"]) / sum(sums[f"{n}/face"])  # noqa: E731
    return {"grad_share_eyes/pixels": share("px"), "grad_share_eyes/l1": share("l1"),
            "grad_share_eyes/ssim": share("ssim"), "grad_share_eyes/mse": share("mse"),
            **{f"grad_share_eyes/l1+ssim+eye{w:g}": share(f"l1+ssim+eye{w:g}") for w in (0.01, 0.1)}}


if __name__ == "__main__":
    sys.exit(main())
