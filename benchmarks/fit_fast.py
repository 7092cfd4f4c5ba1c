"""Short fit schedules against a long fit (issue 25's "within 0.1 dB of a 1,000-step fit"), on any device.

benchmarks/bench.py --parts fit measures the same gap, but on a model it trains itself in the run; this script takes
a trained model.pt (e.g. the CPU preset's with an encoder) and the held-out identities of a synthetic dataset, as
track.py fits them.  Each identity's reference (``--reference_iterations`` code iterations without early stopping,
then the default colour stage; bench.py's "long" run) is computed once and cached in ``<out>_reference.json`` (keyed by
checkpoint, identity and reference settings); then every schedule is fitted and evaluated on the 15 unseen views.

Schedules are ``NAME:KEY=VALUE,...`` with FitConfig keys, as bench.py's ``--fit_variant`` takes them (the same string
runs there on a GPU); the other keys come from configs/fit.yaml, as in track.py:

    python benchmarks/fit_fast.py --checkpoint work/model.pt --data_root /work/base/syn_data \\
        --schedule enc_60_10:init=encoder,iterations=60,min_iterations=60,colour_iterations=10 \\
        --out benchmarks/results/fit_fast_cpu

Writes <out>.md and <out>.json: per schedule and identity the code / colour iterations, unseen-view PSNR (whole image
and face mask), its gap to the reference (dB under it) and the wall seconds of fit_identity.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import _variants  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from utils.apps.track.config import TrackConfig  # noqa: E402
from utils.apps.track.fit import fit_identity  # noqa: E402
from utils.apps.track.pipeline import heldout_subjects  # noqa: E402
from utils.apps.track.targets import load_subject_target  # noqa: E402
from utils.core.atomic import atomic_write_json  # noqa: E402
from utils.core.config import build_config  # noqa: E402
from utils.core.device import resolve_device  # noqa: E402
from utils.data.model_file import load_model  # noqa: E402
from utils.evaluation import evaluate_views  # noqa: E402
from utils.losses import psnr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = ("psnr_unseen", "psnr_face_unseen", "psnr_eyes_unseen")


def fit_row(model, target, cfg: TrackConfig, backend: str) -> tuple[dict, dict, torch.Tensor]:
    """Fit ``target`` with ``cfg.fit`` and evaluate it -> (row: unseen-view PSNR (whole, face mask, eyes), fitted
    view's PSNR, iterations, seconds; the fitted code {w, colour, base}; the renders of every view (C, h, w, 3))."""
    t0 = time.perf_counter()
    res = fit_identity(model, target, cfg.fit, backend, progress=False)
    seconds = time.perf_counter() - t0
    m, pred = evaluate(model, target, res.code.w, res.code.colour, res.code.base_vertices, backend)
    row = {**{k: m.get(k) for k in KEYS}, "psnr_fit_view": m["per_view"][target.fit_view.serial]["psnr"],
           "iterations": res.iterations, "colour_iterations": res.colour_iterations,
           "stopped_early": res.stopped_early, "start": res.start, "seconds": seconds,
           "seconds_code": res.seconds_code, "seconds_colour": res.seconds_colour}
    return row, {"w": res.code.w.cpu(), "colour": None if res.code.colour is None else res.code.colour.cpu(),
                 "base": res.code.base_vertices.cpu()}, pred


def evaluate(model, target, w, colour, base, backend: str) -> tuple[dict, torch.Tensor]:
    dev = target.base_vertices.device
    return evaluate_views(model, w.to(dev), base.to(dev), target.eval_views, target.fit_view.serial, backend, False,
                          None if colour is None else colour.to(dev), target.eye_landmarks)


def agreement(pred: torch.Tensor, ref: torch.Tensor, target) -> float:
    """Mean PSNR of the renders ``pred`` against the reference fit's renders ``ref`` (C, h, w, 3) over the unseen
    views: how close a schedule's result is to the reference's (its convergence), whichever scores better."""
    unseen = torch.tensor([v.serial != target.fit_view.serial for v in target.eval_views])
    return float(psnr(pred, ref, reduction="none")[unseen].mean())


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device)
    subjects, ids = heldout_subjects(args.data_root)
    ids = args.ids or ids
    base = {"checkpoint": str(args.checkpoint), "progress": False, "backend": args.backend}
    schedules = _variants(args.schedule)
    cache_path = Path(f"{args.out}_reference.json") if args.out else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.is_file() else {}
    codes_path = cache_path.with_suffix(".pt") if cache_path else None  # the reference fits' codes
    codes = torch.load(codes_path) if codes_path and codes_path.is_file() else {}
    n = args.reference_iterations
    ref_over = {"fit.iterations": n, "fit.min_iterations": n, "fit.patience": 10**9, "fit.init": args.reference_init}
    out: dict = {"checkpoint": str(args.checkpoint), "device": str(device), "torch_threads": torch.get_num_threads(),
                 "reference": ref_over, "schedules": schedules, "identities": {}}
    for sid in ids:
        cfg = build_config(TrackConfig, REPO / "configs" / "fit.yaml", overrides={**base, **ref_over})
        target = load_subject_target(model, cfg, device, subjects / sid)
        key = f"{Path(args.checkpoint).resolve()}|{sid}|{n}|{args.reference_init}"
        if key not in cache or key not in codes:
            cache[key], codes[key], ref_pred = fit_row(model, target, cfg, args.backend)
            if cache_path:
                torch.save(codes, codes_path)
                atomic_write_json(cache, cache_path)
        else:
            c = codes[key]
            ref_pred = evaluate(model, target, c["w"], c["colour"], c["base"], args.backend)[1]
        ref = cache[key]
        c = codes[key]  # schedules without a colour stage are compared with the reference's code stage alone
        ref_code_pred = evaluate(model, target, c["w"], None, c["base"], args.backend)[1]
        print(f"{sid} reference: unseen {ref['psnr_unseen']:.3f} face {ref['psnr_face_unseen']:.3f} "
              f"({ref['iterations']}+{ref['colour_iterations']} it, {ref['seconds']:.1f} s)", flush=True)
        rows = {"reference": ref}
        for name, over in schedules.items():
            cfg = build_config(TrackConfig, REPO / "configs" / "fit.yaml",
                               overrides={**base, **{f"fit.{k}": v for k, v in over.items()}})
            row, _, pred = fit_row(model, target, cfg, args.backend)
            row["agree"] = agreement(pred, ref_pred if row["colour_iterations"] else ref_code_pred, target)
            row["gap"] = ref["psnr_unseen"] - row["psnr_unseen"]
            row["gap_face"] = ref["psnr_face_unseen"] - row["psnr_face_unseen"]
            rows[name] = row
            print(f"{sid} {name}: unseen {row['psnr_unseen']:.3f} (gap {row['gap']:+.3f}) face "
                  f"{row['psnr_face_unseen']:.3f} (gap {row['gap_face']:+.3f}) {row['iterations']}+"
                  f"{row['colour_iterations']} it, agree {row['agree']:.2f} dB, fitted view {row['psnr_fit_view']:.2f} "
                  f"(ref {ref.get('psnr_fit_view', float('nan')):.2f}), {row['seconds']:.2f} s", flush=True)
        out["identities"][sid] = rows
    return out


def markdown(res: dict) -> str:
    ids = list(res["identities"])
    names = list(next(iter(res["identities"].values())))
    head = " | ".join(f"{s} PSNR / face | {s} gap / face | {s} agree | {s} s" for s in ids)
    lines = [f"`{res['checkpoint']}` ({res['device']}, {res['torch_threads']} torch threads).  PSNR: unseen views, "
             f"whole image / face mask; gap: the reference minus the schedule (dB; negative: the schedule scores "
             f"higher); agree: PSNR of the schedule's unseen-view renders against the reference fit's (how close it "
             f"came to the reference's result; a schedule without colour stage against the reference's code "
             f"alone)", "",
             f"| schedule | it (code+colour) | {head} |", "|---|---|" + "---:|---:|---:|---:|" * len(ids)]
    for n in names:
        cells = []
        for s in ids:
            r = res["identities"][s][n]
            gap = "" if n == "reference" else f"{r['gap']:+.3f} / {r['gap_face']:+.3f}"
            agree = "" if n == "reference" else f"{r['agree']:.1f}"
            cells.append(f"{r['psnr_unseen']:.3f} / {r['psnr_face_unseen']:.3f} | {gap} | {agree} | "
                         f"{r['seconds']:.2f}")
        its = "/".join(sorted({f"{res['identities'][s][n]['iterations']}+{res['identities'][s][n]['colour_iterations']}"
                               for s in ids}))
        lines.append(f"| {n} | {its} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="output/cpu/model.pt", help="trained model.pt")
    p.add_argument("--data_root", default="syn_data", help="dataset with held-out identities (synthetic_info.json)")
    p.add_argument("--ids", nargs="*", default=None, help="identities to fit (default: every held-out one)")
    p.add_argument("--schedule", nargs="*", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a fit schedule: a name and FitConfig overrides (bench.py --fit_variant's format)")
    p.add_argument("--reference_iterations", type=int, default=1000, help="code iterations of the reference fit")
    p.add_argument("--reference_init", default="auto", help="fit.init of the reference fit")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="auto", help="rasterizer backend")
    p.add_argument("--out", default=None, help="write <out>.md and <out>.json (and cache <out>_reference.json)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    res = run(args)
    text = markdown(res)
    print(text)
    if args.out:
        write_report(args.out, text, res)
    return res


if __name__ == "__main__":
    main()
