"""Single-image reconstruction ("tracking"): fit a new person's latent code to ONE photo, network frozen; the whole
pipeline behind track.py (config, load, fit, evaluate, export, all held-out identities).

Pipeline (``track``)::

    load     model.pt (frozen IdentityField) + the photo, its camera and FLAME tracking (utils/apps/track/targets.py: a
             NeRSemble subject folder, or one's own image + camera_params.json + tracking npz); face-masked, cropped
    fit      the style (or code), then the colour residual (utils/apps/track/fit.py)
    evaluate PSNR / SSIM (/ LPIPS) on every calibrated view with a photo, over all views and over the unseen ones
             (utils/evaluation.py), for the fitted identity, for the code alone and for the mean code ("before")
    export   code.pt (utils/data/code_file.py), head.ply (3DGS layout), views/cam_<serial>.png (render | photo),
             grid.png, turntable.mp4 (utils/apps/track/export.py), metrics.json
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from utils.apps.track.config import TrackConfig
from utils.apps.track.export import export_views, export_wild, turntable
from utils.apps.track.fit import fit_identity
from utils.apps.track.targets import (
    FitTarget,
    PhotoTools,
    load_image_target,
    load_subject_target,
    load_wild_target,
)
from utils.core.atomic import atomic_write_json, atomic_write_text
from utils.core.config import to_dict
from utils.core.device import resolve_device, synchronize
from utils.core.locks import OutputClaim
from utils.core.video import write_video
from utils.data.code_file import code_cloud, render_style, save_code
from utils.data.model_file import TrainedModel, load_model
from utils.data.nersemble import HELDOUT_IDENTITIES, list_subjects
from utils.data.synthetic.dataset import read_info
from utils.evaluation import evaluate_views
from utils.face.flame_fit import flame_landmarks_2d


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 5) if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def track(cfg: TrackConfig, model: TrainedModel | None = None, subject_dir: str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, tools: PhotoTools | None = None) -> dict:
    """Fit one person (``cfg.subject_dir`` / ``subject_dir``, or ``cfg.image``) and write every output to ``out``.

    Returns the metrics dict that is also written to ``<out>/metrics.json``.  ``out`` is claimed before anything
    else (utils.core.locks.OutputClaim: locked, and a folder holding files this fit would write, or an earlier fit's, is
    refused unless ``cfg.overwrite``) so a clash ends the run at once, not after the fit; the outputs are one set
    whose record ``<out>/.track_outputs.json`` says ``"finished": true`` only after metrics.json, the last file.
    ``tools``: the photo-only path's detector and FLAME model kept open across calls (:class:`PhotoTools`).
    """
    with OutputClaim(Path(out or cfg.out), "track") as claim:
        return _track(cfg, model, subject_dir, claim, tools)


def track_outputs(cfg: TrackConfig, target: FitTarget) -> list[str]:
    """The files :func:`track` writes for ``target`` (relative to --out), the finished marker's set."""
    names = ["code.pt", "metrics.json"] + (["head.ply"] if cfg.export.ply else [])
    if cfg.export.views:
        names += [f"views/cam_{v.serial}.png" for v in [*target.eval_views, *target.extra_views]]
        names += ["grid.png"] if len(target.eval_views) else []
    names += ["turntable.mp4"] if cfg.export.turntable else []
    names += ["flame_fit.npz", "camera_params.json", "landmarks.png"] if target.wild is not None else []
    return names


def _track(cfg: TrackConfig, model: TrainedModel | None, subject_dir: str | os.PathLike | None,
           claim: OutputClaim, tools: PhotoTools | None = None) -> dict:
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = claim.out
    claim.check([], cfg.overwrite)  # an earlier fit in --out: stop now, before loading anything (plan follows)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if model is None:
        model = load_model(cfg.checkpoint, device)
    if subject_dir is not None or cfg.subject_dir:
        if cfg.image:
            raise ValueError("give either --subject_dir or --image, not both")
        target = load_subject_target(model, cfg, device, subject_dir)
    elif cfg.image and (cfg.camera_json or cfg.flame):
        target = load_image_target(model, cfg, device)
    elif cfg.image:
        target = load_wild_target(model, cfg, device, tools)
    else:
        raise ValueError("nothing to fit: pass --image PHOTO (alone, or with its --camera_json JSON and --flame NPZ), "
                         "--subject_dir DIR (a NeRSemble subject folder) or --all_heldout")
    claim.plan(track_outputs(cfg, target), cfg.overwrite)  # before the fit: a clash costs no fitting time
    synchronize(device)
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = fit_identity(model, target, cfg.fit, cfg.backend, cfg.progress)
    synchronize(device)
    times["fit"] = time.perf_counter() - t0
    if res.flame_params is not None:  # photo-only: the FLAME refined through the renderer is what gets exported
        from dataclasses import replace


        fit0 = target.wild.fit
        params = res.flame_params.to(fit0.params.device)
        target.wild.refined = replace(fit0, params=params, landmarks=flame_landmarks_2d(target.wild.flame, params,
                                                                                         fit0.camera))

    t0 = time.perf_counter()
    f = model.field
    with torch.no_grad():
        z_mean = f.mean_code()
        w_mean = f.style(z_mean[None], update_w_avg=False)[0]
        w_start = res.start_w if res.start_w is not None else w_mean
    fit_serial = target.fit_view.serial
    code = res.code
    eyes = target.eye_landmarks
    metrics, renders = evaluate_views(model, code.w, code.base_vertices, target.eval_views, fit_serial, cfg.backend,
                                      cfg.export.lpips, code.colour, eyes, code.gaussians)
    # the code alone: no colour residual, no rim correction
    code_only, _ = evaluate_views(model, code.w, code.base_vertices, target.eval_views, fit_serial, cfg.backend,
                                  False, eyes=eyes) if code.colour is not None or code.gaussians is not None \
        else (dict(metrics), None)
    before, _ = evaluate_views(model, w_mean, target.base_vertices, target.eval_views, fit_serial, cfg.backend, False,
                               eyes=eyes)
    start_m, _ = evaluate_views(model, w_start, target.base_vertices, target.eval_views, fit_serial, cfg.backend,
                                False) if res.start != "mean_code" else (before, None)
    synchronize(device)
    times["evaluate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    save_code(out / "code.pt", code, model, cfg.checkpoint)
    if cfg.export.ply:
        with torch.no_grad():
            code_cloud(model, code.w, code.base_vertices, code.colour, code.gaussians).save_ply(out / "head.ply")
    if cfg.export.views:
        extra = []
        with torch.no_grad():
            for v in target.extra_views:
                extra.append((v.serial, render_style(model, code.w, code.base_vertices, [v.camera], cfg.backend,
                                                     code.colour)[0].clamp(0, 1)))
        export_views(out, target.eval_views, renders, extra)
    if cfg.export.turntable:
        frames = turntable(model, code, target.fit_camera_full, cfg.export, cfg.backend)
        write_video(out / "turntable.mp4", frames, fps=cfg.export.fps)
    wild = {}
    if target.wild is not None:
        wild = export_wild(out, target, renders[0])
    synchronize(device)
    times["export"] = time.perf_counter() - t0

    per_view = metrics.pop("per_view")
    doc = {
        "identity": target.name,
        **metrics,
        "psnr_all_mean_code": before["psnr_all"], "psnr_unseen_mean_code": before["psnr_unseen"],
        "ssim_all_mean_code": before["ssim_all"], "ssim_unseen_mean_code": before["ssim_unseen"],
        "psnr_unseen_start": start_m["psnr_unseen"], "psnr_fit_view": per_view[fit_serial]["psnr"],
        "psnr_fit_view_mean_code": before["per_view"][fit_serial]["psnr"],
        # the code alone (the colour residual left out): what the colour stage adds is the difference
        "psnr_all_code_only": code_only["psnr_all"], "psnr_unseen_code_only": code_only["psnr_unseen"],
        "ssim_unseen_code_only": code_only["ssim_unseen"],
        "psnr_eyes_unseen_mean_code": before.get("psnr_eyes_unseen"),
        "psnr_eyes_unseen_code_only": code_only.get("psnr_eyes_unseen"),
        "psnr_fit_view_code_only": code_only["per_view"][fit_serial]["psnr"],
        "iterations": res.iterations, "stopped_early": res.stopped_early, "eye_term_pixels": res.eye_term_pixels,
        "start": res.start, "start_losses": res.start_losses, "loss_history": res.losses,
        "space": cfg.fit.space, "refine_geometry": bool(cfg.fit.refine_geometry),
        "refine_colour": code.colour is not None, "colour_iterations": res.colour_iterations,
        "refine_rim": res.rim_params is not None, "rim_iterations": res.rim_iterations,
        "rim_params": None if res.rim_params is None else res.rim_params.cpu().tolist(),
        "rim_loss_history": res.rim_losses, "seconds_fit_rim": res.seconds_rim,
        "refine_flame": res.flame_params is not None, "flame_loss_history": res.flame_losses,
        "seconds_fit_flame": res.seconds_flame,
        "colour_loss_history": res.colour_losses,
        "colour_residual_rms": None if code.colour is None else float(code.colour.square().sum(-1).mean().sqrt()),
        "colour_residual_max": None if code.colour is None else float(code.colour.norm(dim=-1).max()),
        "seconds": sum(times.values()), "seconds_fit": times["fit"],
        "seconds_fit_code": res.seconds_code, "seconds_fit_colour": res.seconds_colour,
        "seconds_per_iteration": res.seconds_code / max(1, res.iterations), "seconds_per_phase": times,
        "fit_crop": [target.fit_view.camera.width, target.fit_view.camera.height],
        "eval_crop": [target.eval_views[0].camera.width, target.eval_views[0].camera.height],
        "num_gaussians": int(f.num_gaussians), "fitted_camera": fit_serial,
        "unseen_views": [v.serial for v in target.eval_views if v.serial != fit_serial],
        "per_view": per_view, "source": target.source, "checkpoint": str(cfg.checkpoint),
        "device": str(device), "config": to_dict(cfg), **wild,
    }
    if cfg.export.lpips and metrics.get("lpips_all") is None:
        doc["lpips_note"] = "LPIPS skipped: the optional lpips package (torchvision + VGG weights) is not usable here"
    doc = _clean(doc)
    atomic_write_json(doc, out / "metrics.json")
    claim.finish()  # the marker, last: code.pt without a finished record is an interrupted fit
    return doc


def heldout_subjects(data_root: str | os.PathLike) -> tuple[Path, list[str]]:
    """(subjects folder, held-out ids) of a dataset: a synthetic dataset folder (its synthetic_info.json
    "heldout_ids") or a folder of NeRSemble subjects (the protocol's held-out ids that are present)."""

    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"data root not found: {root} (train first: bash run_training.sh generates syn_data)")
    subjects = root / "subjects" if (root / "subjects").is_dir() else root
    info = root / "synthetic_info.json"
    if info.is_file():

        ids = list(read_info(root).get("heldout_ids", []))
    else:
        present = set(list_subjects(subjects))
        ids = [s for s in HELDOUT_IDENTITIES if s in present]
    if not ids:
        raise ValueError(f"no held-out identities found in {root} (synthetic_info.json heldout_ids, or the "
                         f"protocol ids {list(HELDOUT_IDENTITIES)} as subject folders)")
    return subjects, ids


TABLE_COLUMNS = (
    ("identity", "identity", "{}"),
    ("PSNR unseen, mean code", "psnr_unseen_mean_code", "{:.2f}"),
    ("PSNR unseen, code only", "psnr_unseen_code_only", "{:.2f}"),
    ("PSNR unseen, fitted", "psnr_unseen", "{:.2f}"),
    ("gain dB", "gain_unseen", "{:+.2f}"),
    ("PSNR all", "psnr_all", "{:.2f}"),
    ("PSNR eyes unseen, mean code", "psnr_eyes_unseen_mean_code", "{:.2f}"),
    ("PSNR eyes unseen, fitted", "psnr_eyes_unseen", "{:.2f}"),
    ("SSIM unseen", "ssim_unseen", "{:.3f}"),
    ("SSIM all", "ssim_all", "{:.3f}"),
    ("LPIPS unseen", "lpips_unseen", "{:.3f}"),
    ("iterations", "iterations", "{:.0f}"),
    ("fit s", "seconds_fit", "{:.2f}"),
    ("total s", "seconds", "{:.2f}"),
)


def markdown_table(rows: Sequence[dict]) -> str:
    """Markdown table of per-identity tracking metrics plus a mean row."""
    rows = [dict(r) for r in rows]
    for r in rows:
        a, b = r.get("psnr_unseen"), r.get("psnr_unseen_mean_code")
        r["gain_unseen"] = None if a is None or b is None else a - b

    def cell(val: Any, fmt: str) -> str:
        if val is None:
            return "n/a"
        return fmt.format(val) if not isinstance(val, str) else val

    lines = ["| " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(TABLE_COLUMNS))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(k), fmt) for _, k, fmt in TABLE_COLUMNS) + " |")
    if rows:
        mean = {"identity": "**mean**"}
        for _, k, _ in TABLE_COLUMNS[1:]:
            vals = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            mean[k] = float(np.mean(vals)) if vals else None
        lines.append("| " + " | ".join(cell(mean.get(k), fmt) for _, k, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def track_all_heldout(cfg: TrackConfig) -> tuple[list[dict], str]:
    """Fit every held-out identity of ``cfg.data_root`` into ``<out>/<id>/``; returns (metrics list, table)."""
    subjects, ids = heldout_subjects(cfg.data_root)
    with OutputClaim(cfg.out, "track_all_heldout") as claim:  # --out and the summary first, each identity's below
        claim.plan(["summary.md", "summary.json"], cfg.overwrite)
        model = load_model(cfg.checkpoint, resolve_device(cfg.device))
        rows = []
        for sid in tqdm(ids, desc="held-out identities", disable=not cfg.progress):
            rows.append(track(cfg, model=model, subject_dir=subjects / sid, out=Path(cfg.out) / sid))
        table = markdown_table(rows)
        atomic_write_text(table + "\n", Path(cfg.out) / "summary.md")
        atomic_write_json({"identities": ids, "rows": [{k: v for k, v in r.items() if k not in ("per_view", "config")}
                                                       for r in rows]}, Path(cfg.out) / "summary.json")
        claim.finish()
    return rows, table
