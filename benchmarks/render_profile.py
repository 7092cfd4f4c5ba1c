"""Where a cached head's 512x512 render spends its time, and what each rasterizer setting gives (issue 24's render FPS).

Trains a field briefly on bench.py's in-memory synthetic problem (so the Gaussians have trained sizes and opacities),
caches one identity's Gaussians, then times one frame per call for: the library path (``render_batch``), the same with
the head merged one level down (issue 24's level-of-detail head: FPS, PSNR against full detail, tile pairs), the gsplat
backend with / without the depth channel and with an anti-aliasing 2D filter, the opacity-pruned cloud, and raw
``gsplat.rasterization`` at tile sizes 8 / 16 / 32 and in packed mode; finally a torch.profiler table of the library
path (CUDA kernels by time, then host calls).  GPU only (the point is gsplat's kernels).

    python benchmarks/render_profile.py --level 3 --out benchmarks/results/render_profile_level3_h100.txt
"""
from __future__ import annotations

import argparse
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import models.renderer as renderer  # noqa: E402
from benchmarks.bench import build_problem, sync, timed  # noqa: E402
from benchmarks.real_mask import REAL_MASK_GAUSSIANS  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from models.camera import Camera, stack_cameras  # noqa: E402
from models.flame.subdivision import subdivide_vertices  # noqa: E402
from models.renderer import render_batch  # noqa: E402
from models.renderer.gsplat_backend import _render_gsplat  # noqa: E402
from utils.apps.train.trainer import TrainConfig, Trainer  # noqa: E402
from utils.core.config import build_config  # noqa: E402

SH_C0 = 0.28209479177387814  # degree-0 spherical-harmonics constant: colour = sh0 * C0 + 0.5


def profiled(fn: Callable[[], object], dev: torch.device, calls: int = 20):
    """torch.profiler over ``calls`` calls of ``fn`` (CPU and CUDA activity), the device synchronised at the end."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(dev)
    return prof


def kernel_table(fn: Callable[[], object], dev: torch.device, calls: int = 20) -> str:
    """The CUDA kernels of ``calls`` calls of ``fn`` by total time (the top 10)."""
    return profiled(fn, dev, calls).key_averages().table(sort_by="cuda_time_total", row_limit=10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--level", type=int, default=3, help="face-mask subdivision level (Gaussians = its vertices)")
    p.add_argument("--gaussians", type=int, default=None, choices=sorted(REAL_MASK_GAUSSIANS.values()),
                   help="use bench.py's real-size mask stand-in with exactly this many Gaussians (sets --level)")
    p.add_argument("--train_steps", type=int, default=50, help="training steps before the head is cached")
    p.add_argument("--repeats", type=int, default=200, help="timed renders per FPS figure")
    p.add_argument("--out", default=None, help="also write the report to this text file")
    args = p.parse_args()
    if args.gaussians is not None:
        args.level = {n: lvl for lvl, n in REAL_MASK_GAUSSIANS.items()}[args.gaussians]
    if not torch.cuda.is_available():
        p.error("render_profile.py measures gsplat's CUDA kernels: run it on the GPU machine")
    dev = torch.device("cuda")
    report = io.StringIO()
    with redirect_stdout(report):
        cfg = build_config(TrainConfig, "configs/nersemble.yaml", overrides={
            "data.subdivision": args.level, "progress": False, "batch_identities": 2, "compile": False,
            "out": scratch_dir("render_profile_"),
            "device": "cuda"})
        data, _ = build_problem(2, 1604, args.level, dev, cfg, gt_subdivision=2, real_size=args.gaussians is not None)
        trainer = Trainer(cfg, data=data)
        for _ in range(args.train_steps):
            trainer.train_step()
        field = trainer.field.eval()
        with torch.no_grad():
            verts = subdivide_vertices(data.base_vertices[:1].to(dev), data.plan)
            cloud = field(field.codes.weight[:1], verts)[0]
            c = verts[0].mean(0).tolist()
            cam = Camera.look_at((c[0], c[1], c[2] + 0.55), c, (0, 1, 0), 512, 512, fov_y_deg=25).to(dev)
            stacked = stack_cameras([cam])
            print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, level {args.level}, "
                  f"{len(cloud.means)} Gaussians, {args.train_steps} training steps, 512x512, one frame per call")
            print(f"opacity < 1/255: {float((cloud.opacities < 1 / 255).float().mean()):.4f} of the Gaussians")

            def fps(fn: Callable[[], object]) -> float:
                """Calls of ``fn`` per second after 10 warm-up calls."""
                return 1000.0 / timed(fn, args.repeats, dev, warmup=10)

            print(f"render_batch (library default): {fps(lambda: render_batch(cloud, [cam])):.0f} FPS")
            if args.level > 0:  # issue 24's level-of-detail head, opt-in (models/level_of_detail.py)
                from benchmarks.lod_quality import tile_pairs
                from models.level_of_detail import merge_shares, merge_to_coarser

                shares = merge_shares(data.plan, args.level, device=dev)  # once per topology: the merge alone is timed
                lod = merge_to_coarser(cloud, data.plan, args.level, shares=shares)
                full_img, lod_img = (render_batch(c_, [cam])["image"].clamp(0, 1) for c_ in (cloud, lod))
                lod_psnr = float(10 * torch.log10(1 / ((full_img - lod_img) ** 2).mean().clamp_min(1e-20)))
                pairs = tile_pairs(lod, cam, 16)[0] / max(tile_pairs(cloud, cam, 16)[0], 1)
                merge_ms = timed(lambda: merge_to_coarser(cloud, data.plan, args.level, shares=shares), 20, dev)
                print(f"render_batch, level-of-detail head (level {args.level - 1}, {len(lod.means)} Gaussians): "
                      f"{fps(lambda: render_batch(lod, [cam])):.0f} FPS, PSNR vs full {lod_psnr:.2f} dB, "
                      f"16 px tile pairs x{pairs:.3f}, merge {merge_ms:.2f} ms")
                # where the two renders' time goes, kernel by kernel (the stand-in's 1.29x for x0.32 tile pairs)
                for name, c_ in (("full detail", cloud), ("level of detail", lod)):
                    pairs_, box_px = tile_pairs(c_, cam, 16)
                    print(f"{name}: {len(c_.means)} Gaussians, 16 px tile pairs {pairs_}, bounding-box pixels {box_px}")
                    print(kernel_table(lambda: render_batch(c_, [cam]), dev))
            # gsplat's kernels called directly (the no-gradient default, GSPLAT_DIRECT) against its public autograd
            # path, at two tile sizes, for the full head and (level > 0) the level-of-detail head
            from benchmarks.bench import public_path

            heads = [("full detail", cloud)] + ([("level of detail", lod)] if args.level > 0 else [])
            for name, c_ in heads:
                for tile in (8, 16):
                    with renderer.settings_override(GSPLAT_TILE_SIZE=tile):
                        go = lambda: render_batch(c_, [cam], depth=False)  # noqa: E731
                        print(f"{name}, tile {tile}, no depth: direct kernels {fps(go):.0f} FPS, "
                              f"public path {public_path(lambda: fps(go)):.0f} FPS")
                print(f"{name}, direct kernels, host calls:")
                print(profiled(lambda: render_batch(c_, [cam], depth=False), dev).key_averages().table(
                    sort_by="cpu_time_total", row_limit=15))
            for depth in (False, True):
                print(f"gsplat backend, depth {depth}: "
                      f"{fps(lambda: _render_gsplat(cloud, [cam], None, stacked, depth=depth)):.0f}")
            print(f"gsplat backend, 2D filter 0.1: "
                  f"{fps(lambda: _render_gsplat(cloud, [cam], None, stacked, depth=False, filter_2d=0.1)):.0f}")
            keep = cloud.opacities > 1 / 255
            fields = ("means", "quats", "scales", "opacities", "sh")
            pruned = type(cloud)(**{k: getattr(cloud, k)[keep] for k in fields})
            print(f"opacity > 1/255 only ({len(pruned.means)} Gaussians): "
                  f"{fps(lambda: _render_gsplat(pruned, [cam], None, stacked, depth=False)):.0f}")
            from gsplat import rasterization

            K, w2c, W, H = stacked
            colors = (cloud.sh[..., 0, :] * SH_C0 + 0.5).clamp_min(0)

            def raw(**kw) -> float:
                return fps(lambda: rasterization(cloud.means, cloud.quats, cloud.scales, cloud.opacities, colors, w2c,
                                                 K, W, H, sh_degree=None, **kw))

            for tile in (8, 16, 32):
                print(f"raw gsplat.rasterization RGB, tile {tile}: {raw(tile_size=tile):.0f}")
            print(f"raw gsplat.rasterization RGB, packed: {raw(packed=True):.0f}")
            prof = profiled(lambda: render_batch(cloud, [cam]), dev)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18))
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    text = report.getvalue()
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
