"""GPU performance benchmark: training throughput, single-image fit, rendering FPS, peak memory.

Builds a synthetic problem at the real recipe's size in memory (no files): synthetic FLAME identities, the 16
NeRSemble cameras at images-2x resolution (1100 x 1604), face-masked ground-truth photos rendered on the device,
the face mask subdivided to ``--level``. Then measures
  * training: single-view steps per second (B identities x C views per optimiser step) and the projected time of
    the reference's 295,680 single-view steps; peak memory;
  * single-image fit: wall seconds from a loaded model to the fitted result, PSNR on the unseen views;
  * rendering: FPS of a cached head at 512x512 and 1100x1604, and with the network in the loop.
Prints one Markdown table and writes it to --out.

    python benchmarks/bench.py --out benchmarks/results/bench_h100.md        # on the GPU machine
    python benchmarks/bench.py --quick                                       # CPU smoke run, tiny sizes
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.flame import face_mask_topology, subdivide_vertices  # noqa: E402
from models.renderer import render_batch  # noqa: E402
from utils.cameras import Camera  # noqa: E402
from utils.config import build_config  # noqa: E402
from utils.dataset import MultiViewDataset  # noqa: E402
from utils.device import default_device  # noqa: E402
from utils.mesh_raster import render_mask  # noqa: E402
from utils.nersemble import FRONTAL_SERIAL, SERIALS  # noqa: E402
from utils.training import TrainConfig, Trainer  # noqa: E402

REFERENCE_STEPS = 295_680  # single-view steps of the reference training (about 9 h on an RTX 3080)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_problem(num_ids: int, height: int, level: int, device: torch.device, cfg: TrainConfig, seed: int = 0):
    """In-memory synthetic identities -> (MultiViewDataset, held-out identity views for fitting)."""
    from utils.synthetic import GroundTruthHeads, make_rig, render_ground_truth, sample_identity
    from utils.synthetic_flame import make_flame_model, write_flame_files

    tmp = Path(tempfile.mkdtemp(prefix="bench_flame_"))
    model = make_flame_model(seed)
    write_flame_files(tmp, model, seed)
    heads = GroundTruthHeads(tmp, model, subdivision=2)
    flame = heads.flame
    mask_ids, mask_faces = face_mask_topology(flame, tmp)
    full_faces = flame.faces.cpu().numpy()
    all_faces = torch.as_tensor(np.concatenate([full_faces, mask_ids[mask_faces]]), device=device)
    paint = torch.zeros(len(all_faces), dtype=torch.bool, device=device)
    paint[len(full_faces):] = True
    rig = {s: c.scaled(0.5) for s, c in make_rig(height).items()}  # calibration is for 2x frames

    def views_of(subject_id: str):
        ident = sample_identity(model, seed, subject_id)
        cloud = heads.cloud(ident).to(device)
        cams = [rig[s].to(device) for s in SERIALS]
        with torch.no_grad():
            img = render_ground_truth(cloud, cams, ident, background="studio")["image"]
            verts = flame(ident.params)[0].to(device)
        out = []
        for i, cam in enumerate(cams):
            m = render_mask(verts, all_faces, cam, paint_faces=paint).float()[..., None]
            out.append(((img[i] * m).cpu().numpy(), m.cpu().numpy(), cam))
        return out, verts[torch.as_tensor(mask_ids, device=device)].cpu()

    ids = [f"{300 + i}" for i in range(num_ids)]
    views, base = [], []
    for sid in ids:
        v, b = views_of(sid)
        views.append(v)
        base.append(b)
    template = flame.v_template[torch.as_tensor(mask_ids)].cpu()
    data = MultiViewDataset.from_views(cfg.data, ids, list(SERIALS), views, torch.stack(base), template, mask_ids,
                                       mask_faces, device)
    heldout_views, heldout_base = views_of("017")
    return data, (heldout_views, heldout_base)


def bench_training(trainer: Trainer, warmup: int, steps: int) -> dict:
    dev = trainer.device
    for _ in range(warmup):
        trainer.train_step()
    sync(dev)
    reset_peak(dev)
    t = time.perf_counter()
    for _ in range(steps):
        last = trainer.train_step()
    sync(dev)
    dt = time.perf_counter() - t
    views = steps * trainer.cfg.batch_identities * trainer.cfg.batch_views
    vps = views / dt
    return {"ms_per_step": 1000 * dt / steps, "views_per_step": trainer.cfg.batch_identities * trainer.cfg.batch_views,
            "single_view_steps_per_s": vps, "projected_reference_minutes": REFERENCE_STEPS / vps / 60,
            "peak_gb": peak_gb(dev), "loss": float(last["loss"])}


@torch.no_grad()
def bench_render(field, base_vertices, plan, cam_full: Camera, device: torch.device, repeats: int,
                 backend: str) -> dict:
    verts = subdivide_vertices(base_vertices[:1].to(device), plan)
    code = field.codes.weight[:1]
    cloud = field(code, verts)[0]
    center = verts[0].mean(0)
    c = center.tolist()
    cam512 = Camera.look_at((c[0], c[1], c[2] + 0.55), c, (0, 1, 0), 512, 512, fov_y_deg=25).to(device)
    out = {}
    for name, cam in (("512x512", cam512), (f"{cam_full.width}x{cam_full.height}", cam_full.to(device))):
        for _ in range(5):
            render_batch(cloud, [cam], backend=backend)
        sync(device)
        reset_peak(device)
        t = time.perf_counter()
        for _ in range(repeats):
            render_batch(cloud, [cam], backend=backend)
        sync(device)
        out[f"fps_cached_{name}"] = repeats / (time.perf_counter() - t)
        out[f"peak_gb_cached_{name}"] = peak_gb(device)
    # network in the loop (interpolation): a new code every frame
    codes = field.codes.weight
    for _ in range(5):
        render_batch(field(codes[:1], verts)[0], [cam512], backend=backend)
    sync(device)
    reset_peak(device)
    t = time.perf_counter()
    for i in range(repeats):
        a = (i % 10) / 10
        code = (1 - a) * codes[0:1] + a * codes[-1:]
        render_batch(field(code, verts)[0], [cam512], backend=backend)
    sync(device)
    out["fps_network_512x512"] = repeats / (time.perf_counter() - t)
    out["peak_gb_network_512x512"] = peak_gb(device)
    return out


def bench_fit(model_path: Path, heldout, device: torch.device, fit_overrides: dict) -> dict | None:
    """Single-image fit through the library used by track.py (utils/fitting.py), if present."""
    try:
        from utils import fitting
    except ImportError:
        return None
    if not hasattr(fitting, "benchmark_fit"):
        return None
    views, base = heldout
    return fitting.benchmark_fit(model_path, views, base, FRONTAL_SERIAL, list(SERIALS), device, **fit_overrides)


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import gsplat

        env["gsplat"] = gsplat.__version__
    except Exception:
        env["gsplat"] = "not installed"
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except Exception:
            env["driver"] = "?"
    else:
        env["card"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/nersemble.yaml", help="training preset whose sizes are measured")
    p.add_argument("--identities", type=int, default=8, help="synthetic training identities held on the device")
    p.add_argument("--height", type=int, default=1604, help="image height (width = height * 1100/1604)")
    p.add_argument("--level", type=int, default=2, help="face-mask subdivision level (Gaussians = its vertices)")
    p.add_argument("--warmup", type=int, default=10, help="training steps before timing")
    p.add_argument("--steps", type=int, default=50, help="timed training steps")
    p.add_argument("--train_steps_for_fit", type=int, default=300,
                   help="training steps before the fit benchmark (a model worth fitting)")
    p.add_argument("--render_repeats", type=int, default=100, help="timed renders per FPS figure")
    p.add_argument("--backend", default="auto", help="rasterizer backend")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra training config overrides")
    p.add_argument("--out", default=None, help="write the Markdown table (and a .json) here")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    args = p.parse_args()
    device = default_device()
    if args.quick:
        args.identities, args.height, args.level, args.warmup, args.steps = 2, 96, 0, 1, 2
        args.train_steps_for_fit, args.render_repeats = 2, 2
    overrides = {"data.subdivision": args.level, "backend": args.backend, "progress": False,
                 "out": tempfile.mkdtemp(prefix="bench_out_"), "device": str(device)}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = _auto(v)
    cfg = build_config(TrainConfig, args.config, overrides=overrides)
    if args.quick:
        cfg.batch_identities, cfg.batch_views = 2, 2

    t0 = time.perf_counter()
    data, heldout = build_problem(args.identities, args.height, args.level, device, cfg)
    setup_s = time.perf_counter() - t0
    trainer = Trainer(cfg, data=data)
    rows = {"setup_seconds": setup_s, "gaussians": trainer.field.num_gaussians, "crop": f"{data.crop_size[0]}x{data.crop_size[1]}"}
    rows.update({f"train_{k}": v for k, v in bench_training(trainer, args.warmup, args.steps).items()})
    for _ in range(args.train_steps_for_fit):
        trainer.train_step()
    trainer.export()
    cam_full = heldout[0][SERIALS.index(FRONTAL_SERIAL)][2]
    rows.update(bench_render(trainer.field.eval(), data.base_vertices, data.plan, cam_full, device,
                             args.render_repeats, cfg.backend))
    fit = bench_fit(Path(cfg.out) / "model.pt", heldout, device, {})
    if fit is not None:
        rows.update({f"fit_{k}": v for k, v in fit.items()})
    env = environment(device)
    lines = [f"# bench.py on {env['card']}", "",
             "| " + " | ".join(f"{k}: {v}" for k, v in env.items()) + " |", "",
             f"config {args.config}, level {args.level}, {args.identities} identities, "
             f"{data.images.shape[-2]}x{data.images.shape[-3]} crops of {cam_full.width}x{cam_full.height} views", "",
             "| metric | value |", "|---|---|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))


def _auto(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


if __name__ == "__main__":
    main()
