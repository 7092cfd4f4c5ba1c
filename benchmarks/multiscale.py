"""Multi-scale test of trained models, the way Mip-Splatting measures it (zoom in and out of the training resolution).

A model trained on the synthetic data at one resolution renders the held-out cameras of its training identities at
several scales of that resolution (the same cameras, intrinsics scaled: ``Camera.scaled``); the synthetic generator
renders the ground truth through the very same cameras (its Gaussian heads are dense and hole-free at any scale).
Per scale it reports, inside each view's projected face mask (the face-mask mesh rasterised at that scale):

* ``psnr``: PSNR of the model's render against the ground truth, face-mask pixels only;
* ``ssim``: SSIM of both images with everything outside the face mask set to black;
* ``holes``: the fraction of face-mask pixels whose rendered alpha is below 0.9 (the ground truth's own figure,
  ``gt_holes``, is the floor; it is 0: the ground truth is a whole head, opaque beyond the mask's rim);
* ``holes_inner``: the same inside the face mask eroded by one *training* pixel (``ceil(scale)`` pixels): the
  model's Gaussians end at the mask's rim, so its alpha falls off over the last ~training pixel there at any scale
  (a band that is 10-20 % of a 64 px face at 1x); this measures the holes in the surface itself;
* ``psnr_inner``: PSNR inside that eroded mask (at 1/4 and 1/2 scale the rim is a third of a 10-20 px face, and
  a model's alpha there decides the plain PSNR);
* ``psnr_eyes``: PSNR inside the eye regions (utils/face/regions.py) when the data has FLAME's eye landmarks;
* ``ring_alpha``: the mean rendered alpha in the ring of ``ceil(scale)`` pixels just outside the face mask (how far a
  model paints past the mask's rim; the ground truth's head goes on there, the masked training photos are black);
* ``psnr_area`` (``--area_gt N``, scales below 1 only): face PSNR against the ground truth rendered at N times the
  scale and area-averaged down (Mip-Splatting's zoom-out ground truth), next to ``psnr``'s ground truth rendered
  directly at the low resolution with 3DGS's classic 0.3 px^2 dilation.

Each model renders with the filters stored with it (``load_model`` sets the renderer's 2D filter; the identity field
applies its 3D filter).  Usage (repository root)::

    python benchmarks/multiscale.py --model today=/work/main/output/cpu/model.pt --model mip=output/mip/model.pt \
        --data_root syn_data --out benchmarks/results/multiscale_cpu
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import renderer as R  # noqa: E402
from models.mip_filter import set_render_filter  # noqa: E402
from models.renderer import render_batch  # noqa: E402
from models.renderer.mesh_raster import render_mask  # noqa: E402
from utils.data.dataset import DataConfig, MultiViewDataset  # noqa: E402
from utils.data.model_file import load_model  # noqa: E402
from utils.data.synthetic.dataset import load_ground_truth  # noqa: E402
from utils.face.regions import embedding_for_flame, eye_region_masks  # noqa: E402
from utils.losses import psnr, ssim_metric  # noqa: E402

HOLE_ALPHA = 0.9


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="LABEL=PATH of a model.pt (repeat to compare models; the first is the reference of the deltas)")
    p.add_argument("--data_root", required=True, help="the synthetic dataset folder the models were trained on")
    p.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4, 8],
                   help="render scales relative to the training resolution")
    p.add_argument("--identities", type=int, default=2, help="first N training identities of the model")
    p.add_argument("--views", type=int, default=0, help="at most N held-out cameras per identity (0: all)")
    p.add_argument("--backend", default="torch", help="renderer backend (torch on a CPU)")
    p.add_argument("--out", default="", help="write OUT.json and OUT.md (atomically)")
    p.add_argument("--filter_2d", action="append", default=[],
                   help="LABEL=EPS: render that model with this 2D filter instead of its stored one (0: classic)")
    p.add_argument("--compensation", action="append", default=[],
                   help="LABEL=MODE: render that model's 2D filter with this opacity compensation (opacity or "
                        "optical_depth) instead of its stored render_compensation")
    p.add_argument("--area_gt", type=int, default=0,
                   help="also score scales below 1 against the GT rendered at N x the scale and area-averaged (0: off)")
    p.add_argument("--save_images", default="", help="folder for one view per model and scale: render | GT | holes")
    return p


def _face_views(data_root: str, model, n_ids: int):
    """Per identity: (name, index, held-out cropped cameras at 1x, GT cloud, face-mask mesh vertices)."""

    dcfg = DataConfig(**{**model.config["data"], "root": data_root, "flame_dir": "data"})
    # all identities, so that the crop window is the one the model was trained on (it depends on every face mask)
    data = MultiViewDataset(dcfg, "cpu", identities=model.identities, progress=False)
    names = model.identities[:n_ids]
    held = data.serial_index(data.eval_serials)
    out = []
    for k, name in enumerate(names):
        gt_cloud, _ = load_ground_truth(data_root, name)
        out.append((name, model.identity_index(name), [data.cameras[k][s] for s in held], gt_cloud,
                    data.base_vertices[k], data))
    return out


def _cpu(out: dict) -> dict:
    """A renderer's output dict with its tensors on the CPU."""
    return {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in out.items()}


def _erode(mask: Tensor, r: int) -> Tensor:
    """(C, H, W, 1) 0/1 mask eroded by r pixels (square structuring element)."""
    m = mask.permute(0, 3, 1, 2)
    return (1 - F.max_pool2d(1 - m, 2 * r + 1, stride=1, padding=r)).permute(0, 2, 3, 1)


def _save_strip(path: Path, pred: Tensor, gt: Tensor, alpha: Tensor, face: Tensor) -> None:
    """One view: render | ground truth | holes (red: face-mask pixels with alpha < 0.9), as a PNG."""
    import cv2

    holes = ((alpha < HOLE_ALPHA).float() * face)
    hole_img = gt * 0.35 + holes * torch.tensor([1.0, 0.0, 0.0]) * 0.65
    strip = torch.cat([pred, gt, hole_img], 1).clamp(0, 1)
    u8 = (strip * 255).round().byte().numpy()[..., ::-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), u8)


def _eye_masks(data, base_vertices, cams, face):

    emb = embedding_for_flame(data.flame, data.mask_ids)
    if emb is None:
        return None
    return eye_region_masks(emb(base_vertices), cams, face)


@torch.no_grad()
def measure(models: dict[str, str], data_root: str, scales: list[float], n_ids: int, n_views: int,
            backend: str, save_images: str = "", filter_2d: dict[str, float] | None = None,
            compensation: dict[str, str] | None = None, area_gt: int = 0) -> dict:
    results: dict = {"scales": scales, "models": {}, "hole_alpha": HOLE_ALPHA}
    # the models and the metrics stay on the CPU; the CUDA backends get each cloud on the GPU for the render only
    dev = torch.device("cuda" if backend in ("gsplat", "inria") else "cpu")
    first = load_model(next(iter(models.values())))
    views = _face_views(data_root, first, n_ids)
    gt_cache: dict = {}
    for label, path in models.items():
        model = load_model(path)
        if filter_2d and label in filter_2d:  # an experiment: another 2D filter than the model's

            set_render_filter(filter_2d[label])
            model.filter_2d = filter_2d[label] or None
        if compensation and label in compensation:  # an experiment: another opacity compensation of the 2D filter
            set_render_filter(R.FILTER_2D, compensation[label])
        rows = {}
        for s in scales:
            t0 = time.perf_counter()
            acc = {"psnr": [], "psnr_inner": [], "ssim": [], "holes": [], "holes_inner": [], "gt_holes": [],
                   "psnr_eyes": [], "ring_alpha": [], "psnr_area": []}
            for name, idx, cams, gt_cloud, base, data in views:
                cams_s = [c.scaled(s) for c in (cams[:n_views] if n_views else cams)]
                key = (name, s)
                if key not in gt_cache:

                    with R.settings_override(FILTER_2D=None):  # the generator renders with the classic dilation
                        gt = _cpu(render_batch(gt_cloud.to(dev), cams_s, backend=backend))
                    face = torch.stack([render_mask(base, data.base_faces, c) for c in cams_s]).unsqueeze(-1).float()
                    eyes = _eye_masks(data, base, cams_s, face)
                    r = math.ceil(s)  # one training pixel
                    ring = F.max_pool2d(face.permute(0, 3, 1, 2), 2 * r + 1, stride=1, padding=r).permute(0, 2, 3, 1)
                    area = None
                    if area_gt and s < 1:

                        big_cams = [c.scaled(s * area_gt) for c in (cams[:n_views] if n_views else cams)]
                        with R.settings_override(FILTER_2D=None):
                            big = _cpu(render_batch(gt_cloud.to(dev), big_cams, backend=backend))["image"].clamp(0, 1)
                        area = F.avg_pool2d(big.permute(0, 3, 1, 2), area_gt).permute(0, 2, 3, 1)
                    gt_cache[key] = (gt["image"].clamp(0, 1), gt["alpha"], face, _erode(face, math.ceil(s)), eyes,
                                     ring - face, area)
                gimg, galpha, face, inner, eyes, ring, area = gt_cache[key]
                verts = model.vertices(model.base_vertices[idx:idx + 1])
                cloud = model.field(model.field.codes.weight[idx:idx + 1], verts)[0]
                out = _cpu(render_batch(cloud.to(dev), cams_s, backend=backend))
                pred, alpha = out["image"].clamp(0, 1), out["alpha"]
                acc["psnr"] += psnr(pred, gimg, mask=face, reduction="none").tolist()
                acc["psnr_inner"] += psnr(pred, gimg, mask=inner, reduction="none").tolist()
                acc["ring_alpha"] += ((alpha * ring).sum((1, 2, 3)) / ring.sum((1, 2, 3)).clamp_min(1)).tolist()
                if area is not None and area.shape == pred.shape:
                    acc["psnr_area"] += psnr(pred, area, mask=face, reduction="none").tolist()
                if min(pred.shape[1:3]) >= 11:
                    acc["ssim"] += ssim_metric(pred * face, gimg * face, reduction="none").tolist()
                n_face = face.sum((1, 2, 3)).clamp_min(1)
                acc["holes"] += (((alpha < HOLE_ALPHA).float() * face).sum((1, 2, 3)) / n_face).tolist()
                acc["holes_inner"] += (((alpha < HOLE_ALPHA).float() * inner).sum((1, 2, 3))
                                       / inner.sum((1, 2, 3)).clamp_min(1)).tolist()
                if save_images and name == views[0][0]:
                    _save_strip(Path(save_images) / f"{label}_x{s:g}.png", pred[0], gimg[0], alpha[0], face[0])
                acc["gt_holes"] += (((galpha < HOLE_ALPHA).float() * face).sum((1, 2, 3)) / n_face).tolist()
                if eyes is not None:
                    for v in range(len(cams_s)):
                        m = eyes[v]
                        if float(m.sum()) >= 4:
                            acc["psnr_eyes"].append(float(psnr(pred[v], gimg[v], mask=m)))
            row = {k: (sum(v) / len(v) if v else None) for k, v in acc.items()}
            row["views"] = len(acc["psnr"])
            row["size"] = [cams_s[0].width, cams_s[0].height]
            row["seconds"] = time.perf_counter() - t0
            rows[str(s)] = row
            print(f"[multiscale] {label} x{s:g} ({row['size'][0]}x{row['size'][1]}): psnr {row['psnr']:.2f} "
                  f"ssim {row['ssim'] if row['ssim'] is None else round(row['ssim'], 4)} holes {row['holes']:.4f} "
                  f"inner {row['holes_inner']:.4f} "
                  f"(gt {row['gt_holes']:.4f}) eyes {row['psnr_eyes']} [{row['seconds']:.0f} s]", flush=True)
        results["models"][label] = {"path": str(path), "filter_2d": model.filter_2d,
                                    "compensation": R.FILTER_2D_COMPENSATION if model.filter_2d else None,
                                    "filter_3d": model.field.cfg.filter_3d if model.field.filter_variance is not None
                                    else 0.0, "rows": rows}
    return results


def to_markdown(res: dict) -> str:
    labels = list(res["models"])
    ref = labels[0]
    lines = ["| model | scale | size | PSNR face (dB) | d PSNR vs " + ref + " | PSNR, rim excluded | SSIM "
             "| holes (alpha<0.9) | holes, rim excluded | GT holes | PSNR eyes | alpha, ring outside mask "
             "| PSNR vs area-averaged GT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, p: "n/a" if v is None else f"{v:.{p}f}"  # noqa: E731
    for lab in labels:
        for s, r in res["models"][lab]["rows"].items():
            d = r["psnr"] - res["models"][ref]["rows"][s]["psnr"]
            lines.append(f"| {lab} | {float(s):g}x | {r['size'][0]}x{r['size'][1]} | {r['psnr']:.2f} | {d:+.2f} | "
                         f"{r['psnr_inner']:.2f} | "
                         f"{fmt(r['ssim'], 4)} | {100 * r['holes']:.2f} % | {100 * r['holes_inner']:.2f} % | "
                         f"{100 * r['gt_holes']:.2f} % | "
                         f"{fmt(r['psnr_eyes'], 2)} | {fmt(r.get('ring_alpha'), 3)} | {fmt(r.get('psnr_area'), 2)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = {}
    for spec in args.model:
        if "=" not in spec:
            raise SystemExit(f"--model expects LABEL=PATH, got {spec!r}")
        label, path = spec.split("=", 1)
        if not Path(path).is_file():
            raise SystemExit(f"--model {label}: {path} not found")
        models[label] = path
    f2d = {}
    for spec in args.filter_2d:
        label, _, val = spec.partition("=")
        if label not in models:
            raise SystemExit(f"--filter_2d {spec!r}: no --model labelled {label!r}")
        f2d[label] = float(val)
    comp = {}
    for spec in args.compensation:
        label, _, mode = spec.partition("=")
        if label not in models:
            raise SystemExit(f"--compensation {spec!r}: no --model labelled {label!r}")
        comp[label] = mode
    res = measure(models, args.data_root, args.scales, args.identities, args.views, args.backend, args.save_images,
                  f2d, comp, args.area_gt)
    res["machine"] = f"{os.cpu_count()} CPU cores visible, torch {torch.__version__}, backend {args.backend}"
    md = to_markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", md)):
            tmp = out.with_name(out.name + suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out.with_name(out.name + suffix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
