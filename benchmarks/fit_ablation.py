"""Per-stage ablation of the single-image fit (issue 25): which stage wins or loses the gain over the mean code.

Fits every held-out identity of ``--data_root`` (017 and 030 on the synthetic data) from camera 222200037 with the
model ``--checkpoint`` once per fit variant and evaluates every variant on the unseen views: whole-image PSNR,
face-mask PSNR (the crop's black background left out) and eye-region PSNR (utils/face/regions.py), each beside the mean
code's, and the gain over the mean code.  The targets (photo crops, tracked vertices) are built once per crop
setting and reused by every variant.

Variants (``--variants`` picks a subset; ``--variant NAME KEY=VALUE ...`` adds one; keys are TrackConfig keys, e.g.
fit.iterations or fit.crop_margin):

    preset        configs/fit.yaml as it is (code stage, colour stage, early stop, eye term as configured)
    code_only     the code stage alone (fit.refine_colour false)
    no_early_stop every code iteration (fit.patience 1000)
    long_code     the code stage alone for 300 iterations, no early stop (what the code stage can reach)
    eye_off       no eye term in either stage (fit.eye_weight 0, fit.colour_eye_weight 0)
    eye_threshold the eye term before issue 25: full weight, left out below 1,000 eye pixels (fit.eye_min_pixels 1000,
                  fit.eye_pixels 0, fit.colour_eye_pixels 0)
    eye_unscaled  the eye term at full weight whatever the eye regions' size (fit.eye_min_pixels 0, fit.eye_pixels 0,
                  fit.colour_eye_pixels 0)
    style_reg0    no pull of w towards its start (fit.style_reg 0)
    init_mean     start from the mean code (not the best of mean code / w_avg / mean style)
    z_space       fit the code z instead of the style w
    crop_wide     fitted view cropped with a 25 % margin (fit.crop_margin 0.25; the evaluation crops follow)
    colour_only   no code stage (fit.iterations 0): the colour residual on the starting style
    rim_off       no rim stage (fit.refine_rim false): the fit as it was before the rim stage
    rim_only      the code stage and the rim stage, no colour stage
    init_best     start from the best of mean code / w_avg / mean style (/ encoder) on the photo
    encoder_alone the encoder's prediction alone (no iterations, no colour stage)
    encoder_code  the code stage from the encoder's prediction, no colour stage
    encoder_half  the fit from the encoder's prediction with half the code iterations (50, no early stop before)
    encoder_fit   the whole fit from the encoder's prediction
(the encoder variants are left out of the default set; pick them with --variants or --encoder_variants)

Besides the variants it reports where the mean code's and the preset fit's squared error sits on the unseen views:
the share inside the eye regions, on the 1-pixel silhouette ring of the face mask, and elsewhere in the face mask;
and, as a diagnostic (not the protocol's metric), the gain when every render is clipped to its view's face mask
("clipped gain"; the mean code's clipped PSNR in brackets).

    python benchmarks/fit_ablation.py --checkpoint output/cpu/model.pt --data_root syn_data \\
        --out benchmarks/results/fit_ablation_cpu                                      # 2 identities, ~2 min on CPU
    python benchmarks/fit_ablation.py --variants preset code_only --ids 017             # a subset

Writes <out>.md (one table per identity plus a gain summary) and <out>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_report  # noqa: E402
from utils.apps.track.config import TrackConfig  # noqa: E402
from utils.apps.track.fit import fit_identity  # noqa: E402
from utils.apps.track.pipeline import heldout_subjects
from utils.apps.track.targets import load_subject_target  # noqa: E402
from utils.core.config import build_config  # noqa: E402
from utils.core.device import resolve_device  # noqa: E402
from utils.data.model_file import load_model  # noqa: E402
from utils.evaluation import evaluate_views  # noqa: E402
from utils.face.regions import eye_region_masks  # noqa: E402
from utils.losses import psnr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, object]] = {
    "preset": {},
    "code_only": {"fit.refine_colour": False},
    "no_early_stop": {"fit.patience": 1000},
    "long_code": {"fit.refine_colour": False, "fit.iterations": 300, "fit.patience": 1000},
    "eye_off": {"fit.eye_weight": 0.0, "fit.colour_eye_weight": 0.0},
    "eye_threshold": {"fit.eye_min_pixels": 1000, "fit.eye_pixels": 0, "fit.colour_eye_pixels": 0},
    "eye_unscaled": {"fit.eye_min_pixels": 0, "fit.eye_pixels": 0, "fit.colour_eye_pixels": 0},
    "style_reg0": {"fit.style_reg": 0.0},
    "init_mean": {"fit.init": "mean_code"},
    "z_space": {"fit.space": "z"},
    "crop_wide": {"fit.crop_margin": 0.25},
    "colour_only": {"fit.iterations": 0},
    "rim_off": {"fit.refine_rim": False},
    "rim_only": {"fit.refine_colour": False},
    "init_best": {"fit.init": "best"},
    "encoder_alone": {"fit.init": "encoder", "fit.iterations": 0, "fit.refine_colour": False},
    "encoder_code": {"fit.init": "encoder", "fit.refine_colour": False},
    "encoder_half": {"fit.init": "encoder", "fit.iterations": 50, "fit.min_iterations": 50},
    "encoder_fit": {"fit.init": "encoder"},
}
# the variants of the encoder (models/encoder.py), run only with --encoder_variants (the model needs an encoder)
ENCODER_VARIANTS = ("init_best", "encoder_alone", "encoder_code", "encoder_half", "encoder_fit")
CROP_KEYS = ("fit.crop_margin", "fit.crop_multiple")


def parse_value(text: str):
    """'0.3' -> 0.3, '10' -> 10, 'true' -> True, anything else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            pass
    return text


@torch.no_grad()
def clipped_psnr(pred: torch.Tensor, views, unseen: torch.Tensor) -> float:
    """Mean unseen-view PSNR of the renders (C, h, w, 3) multiplied by each view's face mask, i.e. with the splats
    clipped to the tracked face mask's silhouette as the photos are (a diagnostic of the silhouette ring's share,
    not the protocol's metric)."""

    gt = torch.stack([v.image for v in views])
    mask = torch.stack([v.mask for v in views])
    return float(psnr(pred * mask, gt, reduction="none")[unseen].mean())


@torch.no_grad()
def error_shares(pred: torch.Tensor, views, eye_points, unseen: torch.Tensor) -> dict[str, float]:
    """Share of the unseen views' squared error (summed over them) inside the eye regions, on the face mask's
    1-pixel silhouette ring (mask pixels with a non-mask 4-neighbour, and the non-mask pixels next to them), and
    in the rest of the image.  pred (C, h, w, 3); unseen (C,) bool."""
    gt = torch.stack([v.image for v in views])
    mask = torch.stack([v.mask for v in views])[..., 0] > 0.5  # (C, h, w)
    m = mask.float()[:, None]
    grown = torch.nn.functional.max_pool2d(m, 3, 1, 1)[:, 0] > 0
    shrunk = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[:, 0] > 0
    ring = grown & ~shrunk
    eyes = eye_region_masks(eye_points, [v.camera for v in views], torch.stack([v.mask for v in views]))[..., 0] > 0
    se = (pred - gt).square().sum(-1)[unseen]
    ring, eyes = ring[unseen], eyes[unseen] & ~ring[unseen]
    total = float(se.sum())
    return {"share_eyes": float(se[eyes].sum()) / total, "share_ring": float(se[ring].sum()) / total,
            "share_rest": float(se[~(eyes | ring)].sum()) / total}


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = load_model(args.checkpoint, device)
    subjects, ids = heldout_subjects(args.data_root)
    ids = args.ids or ids
    names = args.variants or [k for k in VARIANTS if k not in ENCODER_VARIANTS]
    if args.encoder_variants:
        names = list(dict.fromkeys(list(names) + list(ENCODER_VARIANTS)))
    variants = {k: VARIANTS[k] for k in names}
    for spec in args.variant or []:
        variants[spec[0]] = {kv.split("=", 1)[0]: parse_value(kv.split("=", 1)[1]) for kv in spec[1:]}
    base = {"checkpoint": str(args.checkpoint), "progress": False, "backend": args.backend}
    results: dict = {"checkpoint": str(args.checkpoint), "data_root": str(args.data_root), "identities": {},
                     "variants": {k: {kk: v for kk, v in o.items()} for k, o in variants.items()},
                     "torch_threads": torch.get_num_threads(), "device": str(device)}
    for sid in ids:
        targets: dict[tuple, object] = {}
        rows: dict[str, dict] = {}
        for name, over in variants.items():
            cfg = build_config(TrackConfig, REPO / "configs" / "fit.yaml", overrides={**base, **over})
            key = tuple(over.get(k) for k in CROP_KEYS)
            if key not in targets:
                targets[key] = load_subject_target(model, cfg, device, subjects / sid)
            target = targets[key]
            fit_serial = target.fit_view.serial
            eyes = target.eye_landmarks
            if "mean_code" not in rows and key == (None, None):
                with torch.no_grad():
                    w_mean = model.field.style(model.field.mean_code()[None], update_w_avg=False)[0]
                m, pred = evaluate_views(model, w_mean, target.base_vertices, target.eval_views, fit_serial,
                                         args.backend, False, eyes=eyes)
                unseen = torch.tensor([v.serial != fit_serial for v in target.eval_views])
                rows["mean_code"] = {**{k: m.get(k) for k in ("psnr_unseen", "psnr_face_unseen", "psnr_eyes_unseen",
                                                              "psnr_all")},
                                     "psnr_unseen_clipped": clipped_psnr(pred, target.eval_views, unseen),
                                     **error_shares(pred, target.eval_views, eyes(target.base_vertices), unseen)}
            t0 = time.perf_counter()
            res = fit_identity(model, target, cfg.fit, args.backend, progress=False)
            seconds = time.perf_counter() - t0
            m, pred = evaluate_views(model, res.code.w, res.code.base_vertices, target.eval_views, fit_serial,
                                     args.backend, False, res.code.colour, eyes, res.code.gaussians)
            row = {k: m.get(k) for k in ("psnr_unseen", "psnr_face_unseen", "psnr_eyes_unseen", "psnr_all")}
            row.update(psnr_fit_view=m["per_view"][fit_serial]["psnr"], iterations=res.iterations,
                       stopped_early=res.stopped_early, start=res.start, eye_term_pixels=res.eye_term_pixels,
                       colour_iterations=res.colour_iterations, seconds=seconds,
                       fit_crop=[target.fit_view.camera.width, target.fit_view.camera.height])
            unseen = torch.tensor([v.serial != fit_serial for v in target.eval_views])
            row["psnr_unseen_clipped"] = clipped_psnr(pred, target.eval_views, unseen)
            if name == "preset":
                row.update(error_shares(pred, target.eval_views, eyes(res.code.base_vertices), unseen))
            if key != (None, None):  # another crop: its own mean-code reference on the same crops
                with torch.no_grad():
                    w_mean = model.field.style(model.field.mean_code()[None], update_w_avg=False)[0]
                mm, _ = evaluate_views(model, w_mean, target.base_vertices, target.eval_views, fit_serial,
                                       args.backend, False, eyes=eyes)
                row["mean_code_same_crop"] = {k: mm.get(k) for k in ("psnr_unseen", "psnr_face_unseen",
                                                                     "psnr_eyes_unseen")}
                row["mean_code_same_crop"]["psnr_unseen_clipped"] = float("nan")
            rows[name] = row
            print(f"{sid} {name}: unseen {row['psnr_unseen']:.2f} face {row['psnr_face_unseen']:.2f} eyes "
                  f"{row['psnr_eyes_unseen']:.2f} ({row['iterations']} it, {seconds:.1f} s)", flush=True)
        results["identities"][sid] = rows
    return results


def gain(row: dict, ref: dict, key: str) -> float:
    r = row.get("mean_code_same_crop", ref)
    return row[key] - r[key]


def markdown(res: dict) -> str:
    lines = [f"Fit ablation: `{res['checkpoint']}` on `{res['data_root']}`, fitted from camera 222200037, evaluated "
             f"on the 15 unseen views ({res['device']}, {res['torch_threads']} torch threads).", ""]
    for sid, rows in res["identities"].items():
        ref = rows["mean_code"]
        lines += [f"#### {sid}", "",
                  "| variant | PSNR unseen | gain dB | face PSNR | face gain | eye PSNR | eye gain | clipped gain | "
                  "fitted view | code it | eye px | s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| mean code | {ref['psnr_unseen']:.2f} | | {ref['psnr_face_unseen']:.2f} | | "
                  f"{ref['psnr_eyes_unseen']:.2f} | | ({ref['psnr_unseen_clipped']:.2f}) | | | | |"]
        for name, r in rows.items():
            if name == "mean_code":
                continue
            lines.append(f"| {name} | {r['psnr_unseen']:.2f} | {gain(r, ref, 'psnr_unseen'):+.2f} | "
                         f"{r['psnr_face_unseen']:.2f} | {gain(r, ref, 'psnr_face_unseen'):+.2f} | "
                         f"{r['psnr_eyes_unseen']:.2f} | {gain(r, ref, 'psnr_eyes_unseen'):+.2f} | "
                         f"{gain(r, ref, 'psnr_unseen_clipped'):+.2f} | {r['psnr_fit_view']:.2f} | "
                         f"{r['iterations']} | {r['eye_term_pixels']} | "
                         f"{r['seconds']:.1f} |")
        if "share_ring" in rows.get("preset", {}):
            p = rows["preset"]
            lines += ["", f"Unseen views' squared error, share in eye regions / silhouette ring / rest: mean code "
                          f"{ref['share_eyes']:.0%} / {ref['share_ring']:.0%} / {ref['share_rest']:.0%}, preset fit "
                          f"{p['share_eyes']:.0%} / {p['share_ring']:.0%} / {p['share_rest']:.0%}."]
        lines.append("")
    names = [n for n in next(iter(res["identities"].values())) if n != "mean_code"]
    lines += ["#### gain over the mean code, unseen views (whole image / face mask / eyes)", "",
              "| variant | " + " | ".join(res["identities"]) + " |", "|---|" + "---:|" * len(res["identities"])]
    for n in names:
        cells = []
        for rows in res["identities"].values():
            r, ref = rows[n], rows["mean_code"]
            cells.append(f"{gain(r, ref, 'psnr_unseen'):+.2f} / {gain(r, ref, 'psnr_face_unseen'):+.2f} / "
                         f"{gain(r, ref, 'psnr_eyes_unseen'):+.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="output/cpu/model.pt", help="trained model.pt")
    p.add_argument("--data_root", default="syn_data", help="dataset with held-out identities (synthetic_info.json)")
    p.add_argument("--ids", nargs="*", default=None, help="identities to fit (default: every held-out one)")
    p.add_argument("--variants", nargs="*", default=None, choices=sorted(VARIANTS),
                   help="built-in variants to run (default: all but the encoder variants)")
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME KEY=VALUE",
                   help="an extra variant: a name and TrackConfig overrides (repeatable)")
    p.add_argument("--encoder_variants", action="store_true",
                   help="also run the encoder variants (init_best, encoder_alone, encoder_code, encoder_half, "
                        "encoder_fit); the model needs an encoder (train.py --encoder_only)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", help="rasterizer backend")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    for spec in args.variant or []:
        bad = [kv for kv in spec[1:] if "=" not in kv]
        if len(spec) < 2 or bad:
            raise SystemExit(f"fit_ablation.py: --variant wants NAME KEY=VALUE ..., got {spec}")
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"fit_ablation.py: --checkpoint {args.checkpoint} not found (train one: bash "
                         f"run_training.sh)")
    res = run(args)
    text = markdown(res)
    print(text)
    if args.out:
        write_report(args.out, text, res)
    return res


if __name__ == "__main__":
    main()
