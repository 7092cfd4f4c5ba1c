"""GPU benchmark of the eyes: today's configuration against the fixed one, at full resolution (issue 17).

Builds the synthetic problem of benchmarks/bench.py at the real size (1100 x 1604 images-2x, 16 cameras, face-masked
ground-truth photos rendered on the device from the FLAME-like synthetic heads: almond lid openings, eyeballs set back
behind overhanging lids), trains the identity field briefly twice on it (``TODAY``: the configuration before the fix,
``FIXED``: the preset as it is now), evaluates both on the 4 held-out cameras of the training identities (PSNR / SSIM on
the face mask and inside the eye regions of utils/regions.py) and after a one-view fit of the held-out identity 017,
and writes

    <out>.md     one table: whole-face and eye-region PSNR / SSIM, their gap, training and fit seconds
    <out>.json   the same numbers and the environment
    <out>.png    eye crops side by side, one row per held-out camera: photo | today's render | fixed render

    python benchmarks/eyes.py --out benchmarks/results/eyes_h200            # on the GPU machine, about 5 minutes
    python benchmarks/eyes.py --quick --out /tmp/eyes_quick                 # CPU smoke run, tiny sizes
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import _auto, _fit_target, build_problem, environment, sync  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.device import default_device  # noqa: E402
from utils.io import save_image_grid  # noqa: E402
from utils.nersemble import FRONTAL_SERIAL, HELDOUT_SERIALS, SERIALS  # noqa: E402
from utils.regions import embedding_for_flame, eye_region_masks  # noqa: E402
from utils.synthetic import auto_subdivision  # noqa: E402
from utils.training import TrainConfig, Trainer  # noqa: E402

# Config overrides that give back the configuration before the fix of issue 17, on top of the preset as it is now.
TODAY: dict[str, object] = {"loss.eye_weight": 0.0}
FIXED: dict[str, object] = {}  # the preset as it is


def train_variant(name: str, cfg: TrainConfig, data, steps: int) -> tuple[Trainer, dict]:
    """Train ``steps`` steps on the in-memory data; evaluate on the held-out cameras."""
    trainer = Trainer(cfg, data=data)
    sync(trainer.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(trainer.device)
    seconds = time.perf_counter() - t0
    trainer.export()
    m = trainer.evaluate()
    out = {k: m[k] for k in ("psnr_heldout_views", "psnr_face_heldout_views", "ssim_heldout_views",
                             "psnr_eyes_heldout_views", "ssim_eyes_heldout_views", "psnr_face_train_views",
                             "psnr_eyes_train_views") if k in m}
    # the gap against the face mask's own PSNR (the crop's black background, matched exactly, left out)
    out["eye_gap_heldout_db"] = out["psnr_face_heldout_views"] - out["psnr_eyes_heldout_views"]
    out["train_seconds"] = seconds
    out["steps"] = steps
    print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return trainer, out


def fit_variant(model_path: Path, heldout, eyes, device: torch.device, backend: str, quick: bool = False) -> dict:
    """One-view fit of the held-out identity (camera 222200037), evaluated on its 15 unseen views (``quick``: a few
    iterations only, for the CPU smoke run)."""
    from utils.evaluation import evaluate_views
    from utils.fitting import FitConfig, fit_identity
    from utils.model_io import load_model

    views, base = heldout
    model = load_model(model_path, device)
    target = _fit_target(model, views, base, FRONTAL_SERIAL, device)
    target.eye_landmarks = eyes
    sync(device)
    t0 = time.perf_counter()
    cfg = FitConfig(iterations=2, min_iterations=1, colour_iterations=1, init="mean_code") if quick else FitConfig()
    res = fit_identity(model, target, cfg, backend=backend, progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    m, _ = evaluate_views(model, res.code.w, res.code.base_vertices, target.eval_views, FRONTAL_SERIAL,
                          backend=backend, lpips=False, colour=res.code.colour, eyes=eyes)
    return {"fit_psnr_unseen": m["psnr_unseen"], "fit_psnr_face_unseen": m["psnr_face_unseen"],
            "fit_psnr_eyes_unseen": m["psnr_eyes_unseen"], "fit_ssim_eyes_unseen": m["ssim_eyes_unseen"],
            "fit_eye_gap_unseen_db": m["psnr_face_unseen"] - m["psnr_eyes_unseen"], "fit_seconds": seconds}


@torch.no_grad()
def eye_crops(trainers: list[Trainer], identity: int = 0, margin: float = 0.15, height: int = 160) -> torch.Tensor:
    """(H, W, 3) image: per held-out camera one row photo | render of each trainer, cropped to the eye regions."""
    import torch.nn.functional as F

    t0 = trainers[0]
    data = t0.data
    serials = [s for s in HELDOUT_SERIALS if s in data.serials]
    ids = data.serial_index(serials)
    renders = []
    for tr in trainers:
        verts = tr.vertices(torch.tensor([identity]))
        cloud = tr.field(tr.field.codes.weight[identity : identity + 1], verts)
        pred, gt = tr.render_views(cloud, torch.tensor([identity]), torch.tensor([ids]))
        renders.append(pred[0].clamp(0, 1))
    lm = t0.eye_landmarks(data.base_vertices[identity])
    masks = eye_region_masks(lm, [data.cameras[identity][i] for i in ids], data.masks[identity, ids].float() / 255)
    rows = []
    for k in range(len(ids)):
        ys, xs = torch.nonzero(masks[k, ..., 0] > 0, as_tuple=True)
        if len(xs) == 0:
            continue
        h, w = masks.shape[1:3]
        my, mx = int(margin * (ys.max() - ys.min() + 1)) + 2, int(margin * (xs.max() - xs.min() + 1)) + 2
        y0, y1 = max(0, int(ys.min()) - my), min(h, int(ys.max()) + 1 + my)
        x0, x1 = max(0, int(xs.min()) - mx), min(w, int(xs.max()) + 1 + mx)
        tiles = [gt[0, k]] + [r[k] for r in renders]
        tiles = [t[y0:y1, x0:x1].permute(2, 0, 1)[None] for t in tiles]
        scale = height / (y1 - y0)
        size = (height, max(1, round((x1 - x0) * scale)))
        tiles = [F.interpolate(t.float(), size=size, mode="nearest")[0].permute(1, 2, 0) for t in tiles]
        sep = torch.ones(height, 4, 3, device=tiles[0].device)
        row = [tiles[0]]
        for t in tiles[1:]:
            row += [sep, t]
        rows.append(torch.cat(row, dim=1))
    width = max(r.shape[1] for r in rows)
    rows = [torch.cat([r, torch.ones(r.shape[0], width - r.shape[1], 3, device=r.device)], 1) for r in rows]
    sep = torch.ones(4, width, 3, device=rows[0].device)
    return torch.cat([x for r in rows for x in (r, sep)][:-1], dim=0).cpu()


def resume_trainer(out_dir: str, data_root: str) -> Trainer:
    """A Trainer restored from the latest checkpoint of a finished run in ``out_dir`` (its data from ``data_root``)."""
    from utils.config import from_dict

    ckpts = sorted((Path(out_dir) / "checkpoints").glob("ckpt_*.pt"))
    if not ckpts:
        raise FileNotFoundError(f"no checkpoint in {out_dir}/checkpoints (train with train.py --out {out_dir})")
    cfg = from_dict(TrainConfig, torch.load(ckpts[-1], map_location="cpu", weights_only=False)["config"])
    cfg.data.root, cfg.out, cfg.progress = data_root, str(out_dir), False
    return Trainer(cfg, resume=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/nersemble.yaml", help="training preset (the FIXED configuration)")
    p.add_argument("--identities", type=int, default=8, help="synthetic training identities held on the device")
    p.add_argument("--height", type=int, default=1604, help="image height (width = height * 1100/1604)")
    p.add_argument("--level", type=int, default=2, help="face-mask subdivision level (Gaussians = its vertices)")
    p.add_argument("--steps", type=int, default=2000, help="training steps of each configuration")
    p.add_argument("--batch_identities", type=int, default=4, help="identities per training step")
    p.add_argument("--batch_views", type=int, default=4, help="views per identity and training step")
    p.add_argument("--today", nargs="*", default=None, metavar="KEY=VALUE",
                   help=f"overrides that give today's configuration (default: {TODAY})")
    p.add_argument("--fixed", nargs="*", default=None, metavar="KEY=VALUE",
                   help=f"overrides of the fixed configuration (default: {FIXED or 'none, the preset'})")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME_OR_KEY=VALUE",
                   help="an extra configuration to compare (repeatable): a name, then overrides of the preset, e.g. "
                        "--variant sh1 model.sh_degree=1 loss.eye_weight=1")
    p.add_argument("--no_fit", action="store_true", help="skip the one-view fits of the held-out identity")
    p.add_argument("--backend", default="auto", help="rasterizer backend")
    p.add_argument("--out", default="benchmarks/results/eyes", help="output prefix: <out>.md, <out>.json, <out>.png")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (2 identities, 96 px, a few steps)")
    p.add_argument("--runs", nargs=2, default=None, metavar=("TODAY_DIR", "FIXED_DIR"),
                   help="no training: eye crops (<out>.png) of two finished train.py runs on --data_root")
    p.add_argument("--data_root", default="syn_data", help="dataset of the --runs")
    args = p.parse_args()
    if args.runs:
        trainers = [resume_trainer(d, args.data_root) for d in args.runs]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(Path(args.out).with_suffix(".png"), eye_crops(trainers))
        print(f"wrote {Path(args.out).with_suffix('.png')}")
        return
    device = default_device()
    if args.quick:
        args.identities, args.height, args.level, args.steps = 2, 96, 0, 3
        args.batch_identities, args.batch_views = 2, 2

    def kv(items, default):
        if items is None:
            return dict(default)
        return {k: _auto(v) for k, v in (x.split("=", 1) for x in items)}

    variants = {"today": kv(args.today, TODAY), "fixed": kv(args.fixed, FIXED)}
    for name, *items in args.variant:
        if "=" in name or name in variants:
            raise SystemExit(f"--variant {name}: start with a new name for the configuration, then KEY=VALUE pairs")
        variants[name] = kv(items, {})
    base = {"data.subdivision": args.level, "backend": args.backend, "progress": False, "device": str(device),
            "batch_identities": args.batch_identities, "batch_views": args.batch_views, "steps": args.steps,
            "eval_identities": args.identities}
    cfgs = {n: build_config(TrainConfig, args.config, overrides=dict(base, out=tempfile.mkdtemp(prefix=f"eyes_{n}_"),
                                                                       **o)) for n, o in variants.items()}
    t0 = time.perf_counter()
    data, heldout = build_problem(args.identities, args.height, args.level, device, cfgs["today"],
                                  gt_subdivision=auto_subdivision(args.height))  # as make_synthetic_dataset
    setup_s = time.perf_counter() - t0
    print(f"setup (synthetic heads, photos, masks): {setup_s:.1f} s", flush=True)
    eyes = embedding_for_flame(data.flame, data.mask_ids)
    if eyes is None:
        raise RuntimeError("the synthetic FLAME has no eye landmarks on the face mask: cannot measure the eyes")
    rows, trainers = {}, []
    for name, cfg in cfgs.items():
        tr, r = train_variant(name, cfg, data, args.steps)
        if not args.no_fit:
            r.update(fit_variant(Path(cfg.out) / "model.pt", heldout, eyes, device, cfg.backend, args.quick))
        rows[name] = r
        trainers.append(tr)
    crops = eye_crops(trainers)
    env = environment(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(out.with_suffix(".png"), crops)
    keys = list(rows["today"])
    names = list(rows)
    lines = [f"# benchmarks/eyes.py on {env['card']}", "",
             "| " + " | ".join(f"{k}: {v}" for k, v in env.items()) + " |", "",
             f"{args.config}, level {args.level}, {args.identities} training identities, "
             f"{data.images.shape[-2]}x{data.images.shape[-3]} crops of {args.height} px high views, "
             f"{args.steps} steps of {args.batch_identities}x{args.batch_views} views; setup {setup_s:.0f} s; "
             + "; ".join(f"{n} = preset + {variants[n]}" for n in names) + "; "
             f"eye crops: {out.with_suffix('.png').name} (photo | {' | '.join(names)}, held-out cameras "
             f"{len(SERIALS) - 12})", "", "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    fmt = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(fmt(rows[n].get(k)) for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": env, "setup_seconds": setup_s, "variants": variants,
                                                    "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
