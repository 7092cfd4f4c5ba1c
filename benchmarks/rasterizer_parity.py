"""Parity and speed of the render backends on random head-sized clouds; prints one Markdown table.

For every cloud size and image size it renders through each available backend (``models.renderer.available_backends``,
or those named by ``--backends``) and reports, against a reference backend (gsplat when available, else torch):
    PSNR of the images, the largest alpha difference, the mean depth difference where both alphas exceed 0.5,
    cosine similarity of the gradients w.r.t. means, quats, scales, opacities and SH of a fixed random loss on image
    and alpha, median forward and forward+backward times (ms) and the peak memory of one forward+backward pass.
The torch backend is run twice on CUDA: with its default largest alpha (``MAX_ALPHA`` = 0.99, the Inria value) and
with 0.999 (gsplat's value).  Targets for every backend row against the reference: PSNR >= 40 dB and every gradient
cosine >= 0.99 (screen-space mean gradients are not compared: their units differ between backends).  The script
prints ``PARITY BELOW TARGET`` and exits with status 1 when a row misses a target or a backend fails on a case.
Torch cases whose pixel-Gaussian work exceeds ``--torch-max-candidates`` are skipped with a printed reason (not a
failure), so the whole script stays within a few minutes on an H100.

Usage (from the repository root):
    python benchmarks/rasterizer_parity.py            # full run (GPU): 20k/100k/500k at 512x512 and 1100x1604
    python benchmarks/rasterizer_parity.py --out      # ... and write benchmarks/results/rasterizer_parity_<device>.md
    python benchmarks/rasterizer_parity.py --quick    # tiny sizes, runs on a CPU (torch backend only)
    python benchmarks/rasterizer_parity.py --backends gsplat inria --out   # inria vs gsplat only (skips torch)
"""
from __future__ import annotations

import argparse
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import models.renderer as R  # noqa: E402
from models.camera import Camera  # noqa: E402
from models.gaussians import GaussianCloud, random_cloud  # noqa: E402
from utils.core.device import default_device  # noqa: E402

GRAD_NAMES = ("means", "quats", "scales", "opacities", "sh")
PSNR_TARGET = 40.0  # dB, every backend row against the reference
COSINE_TARGET = 0.99  # every gradient of every backend row against the reference


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_camera(width: int, height: int, device: torch.device) -> Camera:
    """A camera 0.55 m from a head-sized cloud, slightly off-axis, with an off-centre principal point."""
    fy = 0.5 * height / math.tan(math.radians(12.5))
    cam = Camera.look_at(
        (0.08, 0.03, 0.55), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), width, height, fx=fy, fy=fy,
        cx=0.5 * width + 0.013 * width, cy=0.5 * height - 0.011 * height,
    )
    return cam.to(device)


def _with_grad(cloud: GaussianCloud) -> GaussianCloud:
    c = cloud.detach().clone()
    for name in GRAD_NAMES:
        getattr(c, name).requires_grad_(True)
    return c


def _render(cloud: GaussianCloud, cam: Camera, backend: str, max_alpha: float) -> dict[str, torch.Tensor]:
    old = R.MAX_ALPHA
    R.MAX_ALPHA = max_alpha  # only the torch backend reads it
    try:
        return R.render(cloud, cam, backend=backend)
    finally:
        R.MAX_ALPHA = old


def _loss(out: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return (out["image"] * weights["image"]).sum() + (out["alpha"] * weights["alpha"]).sum()


def torch_candidates(cloud: GaussianCloud, cam: Camera) -> int:
    """Pixel-Gaussian candidates the torch backend would evaluate (its work), from its own tiling."""
    with torch.no_grad():
        proj = R._project_cameras(cloud, [cam])
        radii = proj["radii"][0]
        m = proj["means2d"][0]
        vis = radii[:, 0] > 0
        r, m = radii[vis].to(m.dtype), m[vis]
        T = R.TILE
        tx = (torch.ceil((m[:, 0] + r[:, 0]) / T).clamp(0, math.ceil(cam.width / T))
              - torch.floor((m[:, 0] - r[:, 0]) / T).clamp(0, math.ceil(cam.width / T))).clamp_min(0)
        ty = (torch.ceil((m[:, 1] + r[:, 1]) / T).clamp(0, math.ceil(cam.height / T))
              - torch.floor((m[:, 1] - r[:, 1]) / T).clamp(0, math.ceil(cam.height / T))).clamp_min(0)
        return int((tx * ty).sum().item()) * T * T


def measure(cloud: GaussianCloud, cam: Camera, backend: str, max_alpha: float, weights, reps: int,
            time_budget_s: float) -> dict:
    """Outputs, gradients, median timings and peak memory of one backend on one case."""
    dev = cloud.device
    c = _with_grad(cloud)
    # Warm-up (also compiles gsplat on its first call) and the values compared between backends.
    out = _render(c, cam, backend, max_alpha)
    _loss(out, weights).backward()
    _sync(dev)
    result = {
        "image": out["image"].detach(), "alpha": out["alpha"].detach(), "depth": out["depth"].detach(),
        "grads": {n: getattr(c, n).grad.detach().clone() for n in GRAD_NAMES},
    }
    del out
    fwd, full = [], []
    t_start = time.perf_counter()
    for i in range(reps):
        for g in GRAD_NAMES:
            getattr(c, g).grad = None
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            o = _render(c, cam, backend, max_alpha)
        _sync(dev)
        t1 = time.perf_counter()
        del o
        o = _render(c, cam, backend, max_alpha)
        _loss(o, weights).backward()
        _sync(dev)
        t2 = time.perf_counter()
        del o
        fwd.append((t1 - t0) * 1e3)
        full.append((t2 - t1) * 1e3)
        if dev.type == "cuda":
            result["peak_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        if time.perf_counter() - t_start > time_budget_s:
            break  # slow case: fewer repeats
    result["fwd_ms"], result["full_ms"], result["reps"] = statistics.median(fwd), statistics.median(full), len(fwd)
    return result


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two gradients; 1 when both are zero (they agree), 0 when only one is."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(a @ b) / (na * nb)


def depth_error(res: dict, ref: dict) -> float:
    """Mean |depth - reference depth| (m) over pixels where both alphas exceed 0.5 (NaN when there are none)."""
    m = (res["alpha"] > 0.5) & (ref["alpha"] > 0.5)
    return float((res["depth"] - ref["depth"]).abs()[m].mean()) if bool(m.any()) else float("nan")


def below_target(rows: list[dict], ref_label: str) -> list[str]:
    """Why each failing row fails: a compared row under the PSNR or cosine target, a backend that failed on a case,
    or a case without the reference.  Rows skipped on purpose (--torch-max-candidates) do not count."""
    bad = []
    for r in rows:
        case = f"N={r['n']} {r['size']} {r['label']}"
        if r.get("note", "").startswith("skipped"):
            continue
        if r.get("note", "").startswith("failed"):
            bad.append(f"{case}: {r['note']}")
        elif "psnr" in r:
            low = [f"cos {k} {v:.4f}" for k, v in r["cos"].items() if not v >= COSINE_TARGET]  # NaN fails too
            if not r["psnr"] >= PSNR_TARGET:
                low.insert(0, f"PSNR {r['psnr']:.1f} dB")
            if low:
                bad.append(f"{case}: " + ", ".join(low))
        elif r["label"] != ref_label and "fwd" in r:
            bad.append(f"{case}: no {ref_label} reference to compare with")
    return bad


def environment(dev: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import gsplat

        info["gsplat"] = getattr(gsplat, "__version__", "?")
    except Exception:
        info["gsplat"] = "not importable"
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        info["cuda"] = str(torch.version.cuda)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip().splitlines()[0]
        except Exception:
            info["driver"] = "unknown"
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        info["driver"] = "n/a"
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes; runs on a CPU in seconds")
    ap.add_argument("--out", nargs="?", const="auto", default=None,
                    help="write the table to this .md file (default: benchmarks/results/rasterizer_parity_<device>.md)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--backends", nargs="+", default=None, choices=("torch", "gsplat", "inria"),
                    help="backends to run (default: every available one); a named backend that is not available "
                         "is an error.  The reference is gsplat when it is among them, else torch")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per case (default 10, quick 3)")
    ap.add_argument("--sh-degree", type=int, default=3, help="SH degree of the random clouds (0-3)")
    ap.add_argument("--torch-max-candidates", type=float, default=5e9,
                    help="skip torch-backend cases with more pixel-Gaussian candidates than this")
    ap.add_argument("--time-budget", type=float, default=6.0, help="seconds of timed repeats per case at most")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--filter_2d", type=float, default=0.0,
                    help="compare the backends with Mip-Splatting's 2D mip filter of this many px^2 (gsplat's "
                         "antialiased mode, e.g. 0.1; inria: only 0.3 and only builds with 'antialiasing'); "
                         "0: classic 0.3 px^2 dilation")
    ap.add_argument("--compensation", default="opacity", choices=R.COMPENSATIONS,
                    help="the 2D filter's opacity compensation (models.renderer.FILTER_2D_COMPENSATION): 'opacity' "
                         "= o r (gsplat's antialiased mode), 'optical_depth' = 1 - (1 - o)^r (what the tools render "
                         "a trained model with; gsplat then runs its projection / tile / rasterize steps separately)")
    args = ap.parse_args(argv)
    R.FILTER_2D = args.filter_2d if args.filter_2d > 0 else None  # every backend of every case renders with it
    R.FILTER_2D_COMPENSATION = args.compensation

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device) if args.device else default_device()
    if args.quick:
        counts, sizes, reps = [500, 2000], [(64, 64), (96, 64)], args.reps or 3
    else:
        counts, sizes, reps = [20_000, 100_000, 500_000], [(512, 512), (1100, 1604)], args.reps or 10
    backends = [b for b in R.available_backends() if dev.type == "cuda" or b == "torch"]
    if args.backends:
        missing = [b for b in args.backends if b not in backends]
        if missing:
            print(f"error: backend(s) {missing} not available on {dev} (available: {backends}); "
                  f"gsplat and inria need CUDA and their packages (python -c 'import diff_gaussian_rasterization')",
                  file=sys.stderr)
            return 2
        backends = [b for b in backends if b in args.backends]
        if not {"gsplat", "torch"} & set(backends):
            print("error: --backends needs gsplat or torch among them as the reference", file=sys.stderr)
            return 2
    variants = []  # (label, backend, max_alpha)
    for b in backends:
        if b == "torch":
            variants.append(("torch", "torch", 0.99))
            variants.append(("torch@0.999", "torch", 0.999))
        else:
            variants.append((b, b, R.MAX_ALPHA))
    ref_label = "gsplat" if "gsplat" in backends else "torch"
    chunk = 1 << 26 if dev.type == "cuda" else 1 << 22  # bigger chunks on a GPU: fewer launches
    env = environment(dev)
    print(f"device: {env['device']}; driver {env['driver']}; torch {env['torch']}; gsplat {env['gsplat']}")
    print(f"backends: {[v[0] for v in variants]}; reference: {ref_label}; SH degree {args.sh_degree}; 2D filter "
          f"{'classic 0.3 px^2 dilation' if R.FILTER_2D is None else f'antialiased {R.FILTER_2D} px^2'}"
          f"{'' if R.FILTER_2D is None else f', compensation {R.FILTER_2D_COMPENSATION}'}", flush=True)

    rows = []
    t_all = time.perf_counter()
    for n in counts:
        g = torch.Generator().manual_seed(n)
        cloud = random_cloud(n, radius=0.1, scale_range=(0.002, 0.01), sh_degree=args.sh_degree, generator=g,
                             device=dev)
        for (w, h) in sizes:
            cam = make_camera(w, h, dev)
            gw = torch.Generator().manual_seed(1)
            weights = {"image": torch.randn(h, w, 3, generator=gw).to(dev),
                       "alpha": torch.randn(h, w, 1, generator=gw).to(dev)}
            results = {}
            for label, backend, max_alpha in variants:
                note = ""
                if backend == "torch":
                    cand = torch_candidates(cloud, cam)
                    if cand > args.torch_max_candidates:
                        msg = f"skipped: {cand:.2e} pixel-Gaussian candidates > --torch-max-candidates"
                        print(f"  N={n} {w}x{h} {label}: {msg}", flush=True)
                        rows.append({"n": n, "size": f"{w}x{h}", "label": label, "note": msg})
                        continue
                    note = f"{cand:.1e} cand."
                try:
                    t0 = time.perf_counter()
                    if backend == "torch":
                        res = _measure_torch(cloud, cam, max_alpha, weights, reps, args.time_budget, chunk)
                    else:
                        res = measure(cloud, cam, backend, max_alpha, weights, reps, args.time_budget)
                except torch.cuda.OutOfMemoryError as exc:
                    msg = f"failed: out of memory ({str(exc).splitlines()[0][:80]})"
                    print(f"  N={n} {w}x{h} {label}: {msg}", flush=True)
                    rows.append({"n": n, "size": f"{w}x{h}", "label": label, "note": msg})
                    torch.cuda.empty_cache()
                    continue
                res["note"] = note
                results[label] = res
                print(f"  N={n} {w}x{h} {label}: fwd {res['fwd_ms']:.2f} ms, fwd+bwd {res['full_ms']:.2f} ms "
                      f"({res['reps']} reps, {time.perf_counter() - t0:.1f} s)", flush=True)
            ref = results.get(ref_label)
            for label, res in results.items():
                row = {"n": n, "size": f"{w}x{h}", "label": label, "fwd": res["fwd_ms"], "full": res["full_ms"],
                       "peak": res.get("peak_mb"), "note": res["note"]}
                if ref is not None and label != ref_label:
                    row["psnr"] = psnr(res["image"], ref["image"])
                    row["dalpha"] = float((res["alpha"] - ref["alpha"]).abs().max())
                    row["ddepth"] = depth_error(res, ref)
                    row["cos"] = {k: cosine(res["grads"][k], ref["grads"][k]) for k in GRAD_NAMES}
                rows.append(row)
            del results, ref
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    elapsed = time.perf_counter() - t_all

    table = format_table(rows, ref_label, env, elapsed)
    if R.FILTER_2D is not None:
        table = (f"2D filter: antialiased, eps2d = {R.FILTER_2D} px^2 (--filter_2d), opacity compensation "
                 f"{R.FILTER_2D_COMPENSATION} (--compensation)\n\n" + table)
    if dev.type == "cpu":
        line = cpu_memory_check(torch.get_num_threads())
        print(line)
        table += "\n\n" + line
    print()
    print(table)
    if args.out is not None:
        if args.out == "auto":
            slug = re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_")
            out = ROOT / "benchmarks" / "results" / f"rasterizer_parity_{slug}.md"
        else:
            out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        print(f"\nwrote {out}")
    failed = below_target(rows, ref_label)
    if failed:
        print(f"\nPARITY BELOW TARGET in {len(failed)} case(s) (targets: PSNR >= {PSNR_TARGET:g} dB, every "
              f"gradient cosine >= {COSINE_TARGET}):\n  " + "\n  ".join(failed))
        return 1
    print(f"\nparity ok: every compared row within PSNR >= {PSNR_TARGET:g} dB and cosines >= {COSINE_TARGET}")
    return 0


_MEMORY_CHILD = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from models.gaussians import random_cloud
from models.renderer import render
from models.camera import Camera
c = random_cloud(20000, generator=torch.Generator().manual_seed(0))
for t in (c.means, c.quats, c.scales, c.opacities, c.sh):
    t.requires_grad_(True)
cam = Camera.look_at((0.0, 0.0, 0.5), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0), 256, 256, fov_y_deg=30)
t0 = time.perf_counter()
out = render(c, cam, backend="torch")
(out["image"].sum() + out["alpha"].sum()).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - t0)
"""


def cpu_memory_check(threads: int) -> str:
    """20k Gaussians at 256x256, forward + backward with the torch backend on the CPU in a child process.

    Returns a line with the child's peak RSS (torch included; the target is < 4 GB) and its time.
    """
    code = _MEMORY_CHILD.format(root=str(ROOT), threads=threads)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        return f"CPU memory check FAILED: {res.stderr.strip().splitlines()[-1] if res.stderr else res.returncode}"
    kb, secs = res.stdout.split()[-2:]
    mb = int(kb) / 1024
    verdict = "ok" if mb < 4096 else "ABOVE the 4 GB target"
    return (f"CPU memory check: 20k Gaussians, 256x256, torch fwd+bwd, {threads} threads: peak RSS {mb:.0f} MB "
            f"({verdict}), {float(secs):.2f} s")


def _measure_torch(cloud, cam, max_alpha, weights, reps, budget, chunk) -> dict:
    """measure() for the torch backend with a device-suited chunk size (render_batch's chunk_elements)."""
    orig = R.render

    def render_chunked(cl, ca, background=None, backend="auto"):
        out = R.render_batch(cl, [ca], background, backend, chunk_elements=chunk)
        return {k: v[0] for k, v in out.items()}

    R.render = render_chunked
    try:
        return measure(cloud, cam, "torch", max_alpha, weights, reps, budget)
    finally:
        R.render = orig


def format_table(rows: list[dict], ref_label: str, env: dict, elapsed: float) -> str:
    head = (
        f"Rasterizer parity on {env['device']} (driver {env['driver']}, torch {env['torch']}, gsplat {env['gsplat']}, "
        f"python {env['python']}); reference backend: {ref_label}; script time {elapsed:.0f} s.\n"
        f"Gradient cosines and PSNR compare each backend with the reference (targets for every row: PSNR >= "
        f"{PSNR_TARGET:g} dB, every cosine >= {COSINE_TARGET}); 'torch' uses the default largest alpha 0.99, "
        "'torch@0.999' gsplat's 0.999; depth MAE: mean |depth difference| where both alphas exceed 0.5 (no target)."
        "\n\n"
    )
    cols = ["N", "image", "backend", "fwd ms", "fwd+bwd ms", "peak MB", "PSNR dB", "max abs dalpha", "depth MAE mm",
            "cos means", "cos quats", "cos scales", "cos opac", "cos sh", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        cos = r.get("cos", {})
        vals = [f"{r['n']:,}", r["size"], r["label"], f(r.get("fwd"), ".2f"), f(r.get("full"), ".2f"),
                f(r.get("peak"), ".0f"), f(r.get("psnr"), ".1f"), f(r.get("dalpha"), ".1e"),
                f(None if r.get("ddepth") is None else 1e3 * r["ddepth"], ".3f")]
        vals += [f(cos.get(k), ".5f") for k in GRAD_NAMES] + [r.get("note", "")]
        lines.append("| " + " | ".join(vals) + " |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
