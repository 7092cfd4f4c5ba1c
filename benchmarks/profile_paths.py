"""Profile the batch-1 hot paths on the GPU: cached render, network in the loop, one fit iteration, one training step.

For each path it prints the wall time per call (synchronised), the CUDA kernel time per call and the top operators
by CPU time from torch.profiler, so one can tell launch/host-bound paths (wall >> kernel time) from GPU-bound ones;
and it times the network-in-the-loop and fit paths eagerly against CUDA-graph replay (models/graphed_synthesis.py),
checking that both give the same numbers.

    python benchmarks/profile_paths.py --out benchmarks/results/profile_h100.md   # GPU machine
    python benchmarks/profile_paths.py --quick                                   # CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import _fit_target, build_problem, environment, sync, timed  # noqa: E402
from benchmarks.real_mask import REAL_MASK_GAUSSIANS  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from models.camera import Camera  # noqa: E402
from models.graphed_synthesis import GraphedSynthesis  # noqa: E402
from models.identity_field import IdentityField, IdentityFieldConfig  # noqa: E402
from models.renderer import render, render_batch  # noqa: E402
from utils.apps.track.config import FitConfig  # noqa: E402
from utils.apps.track.fit import photometric
from utils.apps.train.trainer import TrainConfig, Trainer  # noqa: E402
from utils.core.config import build_config  # noqa: E402
from utils.core.device import default_device  # noqa: E402
from utils.data.model_file import load_model  # noqa: E402
from utils.data.nersemble import FRONTAL_SERIAL  # noqa: E402
from utils.losses import SSIM_METHODS, ssim  # noqa: E402


def profile(fn, repeats: int, device: torch.device, rows: int, sort: str = "self_cpu_time_total"
            ) -> tuple[str, float, int]:
    """(top-ops table, kernel ms per call, kernels per call) of ``repeats`` calls of fn."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    sync(device)
    with tprofile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    kernel_us, kernels = 0.0, 0
    for e in prof.events():
        if device.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
            kernel_us += e.device_time
            kernels += 1
    if sort == "self_cuda_time_total" and device.type != "cuda":
        sort = "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows)
    return table, kernel_us / 1000 / repeats, kernels // repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/nersemble.yaml", help="training preset (network and batch sizes)")
    p.add_argument("--identities", type=int, default=3, help="synthetic training identities")
    p.add_argument("--height", type=int, default=1604, help="image height (width = height * 1100/1604)")
    p.add_argument("--level", type=int, default=2, help="face-mask subdivision level")
    p.add_argument("--gaussians", type=int, default=None, choices=sorted(REAL_MASK_GAUSSIANS.values()),
                   help="profile at exactly the real FLAME mask's Gaussian count (46987 = level 2, 187219 = level 3) "
                        "on a stand-in mesh of the real mask's size (benchmarks/real_mask.py); sets --level")
    p.add_argument("--train_steps", type=int, default=100, help="training steps before profiling (a non-trivial model)")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per figure")
    p.add_argument("--rows", type=int, default=12, help="profiler table rows")
    p.add_argument("--sections", default="train,render,network,fit,ssim,capture",
                   help="comma-separated subset of: train, render, network, fit (need a trained model), ssim (SSIM "
                        "implementations, fwd+bwd at the fit and training shapes), capture (graph capture with "
                        "moving geometry and gradients, on a random field)")
    p.add_argument("--out", default=None, help="also write the report here")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    args = p.parse_args()
    device = default_device()
    sections = set(args.sections.split(","))
    report = [f"# profile_paths.py on {environment(device)['card']}", ""]
    if "ssim" in sections:
        report += ssim_speed(device, args.quick)
    if "capture" in sections:
        report += capture_check(device)
    if sections & {"train", "render", "network", "fit"}:
        report += model_paths(args, device, sections)
    text = "\n".join(report)
    if not args.out:
        print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


def ssim_speed(device: torch.device, quick: bool) -> list[str]:
    """fwd+bwd milliseconds of every SSIM implementation at the fit (1 crop) and training (16 crops) shapes."""

    shapes = {"fit 1x864x592": (1, 864, 592, 3), "train 16x912x752": (16, 912, 752, 3)}
    if quick:
        shapes = {"quick 2x64x48": (2, 64, 48, 3)}
    lines = ["## SSIM implementations (forward + backward, ms)", "", "| shape | " + " | ".join(
        f"{m}{'+bench' if b else ''}" for b in (False, True) for m in SSIM_METHODS) + " |",
        "|---|" + "---|" * (2 * len(SSIM_METHODS))]
    for name, shape in shapes.items():
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.rand(shape, device=device, generator=g).requires_grad_(True)
        b = torch.rand(shape, device=device, generator=g)
        cells, ref, ref_grad = [], None, None
        for bench_mode in (False, True):
            torch.backends.cudnn.benchmark = bench_mode
            for m in SSIM_METHODS:
                def step():
                    a.grad = None
                    ssim(a, b, method=m).backward()
                ms = timed(step, 3 if quick else 20, device)
                a.grad = None
                v = ssim(a, b, method=m)
                v.backward()
                val, grad = float(v), a.grad.clone()
                ref = val if ref is None else ref
                ref_grad = grad if ref_grad is None else ref_grad
                gdiff = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
                cells.append(f"{ms:.3f}" + ("" if abs(val - ref) < 1e-5 else f" (value {val:.6f} != {ref:.6f})")
                             + ("" if gdiff < 1e-3 else f" (grad rel diff {gdiff:.2g})"))
        torch.backends.cudnn.benchmark = False
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)
    return lines + [""]


def capture_check(device: torch.device) -> list[str]:
    """Graph capture of the frozen field with moving geometry and gradients (the fit with geometry refinement)."""
    import trimesh


    m = trimesh.creation.icosphere(subdivisions=4, radius=0.1)
    v = torch.tensor(m.vertices, dtype=torch.float32, device=device) + torch.tensor([0.0, 0.0, 0.5], device=device)
    torch.manual_seed(0)
    field = IdentityField(IdentityFieldConfig(), 2, v.cpu(), torch.as_tensor(m.faces)).to(device).eval()
    for prm in field.parameters():
        prm.requires_grad_(False)
    out = []
    for dyn in (False, True):
        eager = GraphedSynthesis(field, v, dynamic_geometry=dyn, use_graphs=False)
        graph = GraphedSynthesis(field, v, dynamic_geometry=dyn)
        res = []
        for synth in (eager, graph):
            w = (field.mapping.w_avg + 0.3).clone().requires_grad_(True)
            vg = (v * 1.02).requires_grad_(True)
            cloud = synth(w, vg) if dyn else synth(w)
            loss = sum(getattr(cloud, k).square().sum() for k in ("means", "quats", "scales", "opacities", "sh"))
            loss.backward()
            res.append((cloud.means.detach().clone(), w.grad.clone(), None if vg.grad is None else vg.grad.clone()))
        dm = float((res[0][0] - res[1][0]).abs().max())
        dw = float((res[0][1] - res[1][1]).abs().max() / res[0][1].abs().max())
        dv = float((res[0][2] - res[1][2]).abs().max() / res[0][2].abs().max()) if dyn else float("nan")
        out.append(f"capture dynamic_geometry={dyn}: graphed {graph.graphed} ({graph.fallback_reason}); "
                   f"max |means diff| {dm:.3g}, rel |grad w diff| {dw:.3g}, rel |grad vertices diff| {dv:.3g}")
    print("\n".join(out), flush=True)
    return out + [""]


def model_paths(args, device: torch.device, sections: set[str]) -> list[str]:
    """Train a model briefly on an in-memory problem, then profile the selected paths."""
    if args.gaussians is not None:
        args.level = {n: lvl for lvl, n in REAL_MASK_GAUSSIANS.items()}[args.gaussians]
    if args.quick:
        args.identities, args.height, args.train_steps, args.repeats = 2, 96, 2, 2
        args.level = 0 if args.gaussians is None else args.level
    cfg = build_config(TrainConfig, args.config, overrides={
        "data.subdivision": args.level, "progress": False, "out": scratch_dir("prof_"),
        "device": str(device)})
    if args.quick:
        cfg.batch_identities, cfg.batch_views = 2, 2
    data, heldout = build_problem(args.identities, args.height, args.level, device, cfg,
                                  real_size=args.gaussians is not None)
    trainer = Trainer(cfg, data=data)
    for _ in range(args.train_steps):
        trainer.train_step()
    report = [f"level {args.level}: {trainer.field.num_gaussians} Gaussians; config {args.config}", ""]

    def section(title: str, fn, n: int | None = None, sort: str = "self_cpu_time_total") -> float:
        n = n or args.repeats
        wall = timed(fn, n, device)
        table, kern, nk = profile(fn, min(n, 20), device, args.rows, sort)
        report.extend([f"## {title}", "", f"wall {wall:.3f} ms/call, CUDA kernels {kern:.3f} ms/call "
                       f"({nk} kernels/call)", "", "```", table, "```", ""])
        print(report[-6], flush=True)
        return wall

    if "train" in sections:
        section("training step (B identities x C views)", trainer.train_step, max(5, args.repeats // 5),
                sort="self_cuda_time_total")

    field = trainer.field.eval()
    for prm in field.parameters():
        prm.requires_grad_(False)
    verts = trainer.vertices(torch.tensor([0]))[0]
    code0, code1 = field.codes.weight[0].clone(), field.codes.weight[-1].clone()
    c = verts.mean(0).tolist()
    cam512 = Camera.look_at((c[0], c[1], c[2] + 0.55), c, (0, 1, 0), 512, 512, fov_y_deg=25).to(device)

    # ---- cached render
    with torch.no_grad():
        cloud = field(code0[None], verts[None])[0]
    if "render" in sections:
        section("cached render 512x512 (one camera per call)", lambda: render_batch(cloud, [cam512]))

    if "network" in sections:
        network_paths(field, verts, code0, code1, cam512, section, report)
    if "fit" in sections:
        fit_paths(trainer, heldout, device, args.quick, section, report)
    return report


def network_paths(field, verts, code0, code1, cam512, section, report) -> None:
    state = {"i": 0}

    def make_frame(synth):
        def frame():
            a = (state["i"] % 10) / 10
            state["i"] += 1
            render(synth((1 - a) * code0 + a * code1), cam512)
        return frame

    eager_z = GraphedSynthesis(field, verts, space="z", requires_grad=False, use_graphs=False)
    graph_z = GraphedSynthesis(field, verts, space="z", requires_grad=False)
    with torch.no_grad():
        a, b = eager_z(code1), graph_z(code1)
        diffs = a.max_differences(b)  # quaternions up to sign (q and -q are one rotation)
        raw_quats = float((a.quats - b.quats).abs().max())
    report.append(f"graphed forward: {graph_z.graphed} ({graph_z.fallback_reason}); max |graphed - eager| "
                  + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()) + f"; raw quaternion entries {raw_quats:.3g}")
    t_eager = section("network in the loop, eager (z -> Gaussians -> 512x512 render)", make_frame(eager_z))
    t_graph = section("network in the loop, CUDA graph", make_frame(graph_z))
    report.append(f"network in the loop: eager {1000 / t_eager:.0f} FPS, graphed {1000 / t_graph:.0f} FPS\n")


def fit_paths(trainer, heldout, device, quick, section, report) -> None:
    cfg = trainer.cfg
    model_path = Path(cfg.out) / "model.pt"
    trainer.export()

    model = load_model(model_path, device)
    for prm in model.field.parameters():
        prm.requires_grad_(False)
    target = _fit_target(model, heldout[0], heldout[1], FRONTAL_SERIAL, device)
    fcfg = FitConfig()
    v0 = model.vertices(target.base_vertices)
    w_start = model.field.mapping.w_avg.clone()

    def fit_loop(synth, iters: int) -> tuple[float, torch.Tensor]:
        var = w_start.clone().requires_grad_(True)
        opt = torch.optim.Adam([var], lr=fcfg.lr, betas=(fcfg.beta1, fcfg.beta2),
                               **({"fused": True} if device.type == "cuda" else {}))
        sync(device)
        t = time.perf_counter()
        for _ in range(iters):
            loss = photometric(render(synth(var), target.fit_view.camera)["image"], target.fit_view.image, fcfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return 1000 * (time.perf_counter() - t) / iters, var.detach()

    eager_w = GraphedSynthesis(model.field, v0, space="w", use_graphs=False)
    graph_w = GraphedSynthesis(model.field, v0, space="w")
    n_it = 100 if not quick else 3
    fit_loop(eager_w, 3)
    ms_e, w_e = fit_loop(eager_w, n_it)
    fit_loop(graph_w, 3)
    ms_g, w_g = fit_loop(graph_w, n_it)
    rel = float((w_e - w_g).norm() / (w_e - w_start).norm().clamp_min(1e-12))
    report.append(f"## fit iteration (w space, crop {target.fit_view.camera.width}x{target.fit_view.camera.height})\n")
    report.append(f"graphed fwd+bwd: {graph_w.graphed} ({graph_w.fallback_reason}); eager {ms_e:.2f} ms/iter, "
                  f"graphed {ms_g:.2f} ms/iter; after {n_it} iterations |w_eager - w_graphed| / |w_eager - w_start| "
                  f"= {rel:.3g}\n")
    var = w_start.clone().requires_grad_(True)

    def one_iter(synth):
        def it():
            loss = photometric(render(synth(var), target.fit_view.camera)["image"], target.fit_view.image, fcfg)
            loss.backward()
        return it

    section("fit iteration, eager (forward + backward, no optimiser)", one_iter(eager_w))
    section("fit iteration, CUDA graph", one_iter(graph_w))


if __name__ == "__main__":
    main()
