"""Multi-GPU scaling of training under torchrun (NCCL), at the real recipe's size.

Each launch measures single-view steps per second for one fixed GLOBAL batch (``--batch_identities`` identities x
``--batch_views`` views, split across ranks) and records the global mean loss of every step, so runs on different
numbers of GPUs can be compared step for step. Then ``--summarize`` prints the table with scaling efficiency:

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=1 benchmarks/bench_distributed.py --out d1.json
    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --out d2.json
    python benchmarks/bench_distributed.py --summarize d1.json d2.json [--write table.md]

The problem is built in memory (synthetic identities, benchmarks/bench.py); every rank builds the same one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import build_problem, environment, peak_gb, sync  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from utils.apps.train.trainer import TrainConfig, Trainer, init_distributed  # noqa: E402
from utils.core.config import build_config  # noqa: E402


def run(args) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (shared hosts)
    device, rank, world = init_distributed("auto")
    cfg = build_config(TrainConfig, args.config, overrides={
        "data.subdivision": args.level, "progress": False, "out": scratch_dir("bench_dist_"),
        "batch_identities": args.batch_identities, "batch_views": args.batch_views, "backend": args.backend})
    data, _ = build_problem(args.identities, args.height, args.level, device, cfg)
    tr = Trainer(cfg, data=data)
    losses = []

    def step() -> None:
        loss = tr.train_step()["loss"].clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss)

    for _ in range(args.warmup):
        step()
    sync(device)
    if world > 1:
        dist.barrier()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = time.perf_counter() - t
    if rank == 0:
        views = args.steps * args.batch_identities * args.batch_views
        doc = {"world": world, "seconds": dt, "steps": args.steps, "single_view_steps_per_s": views / dt,
               "ms_per_step": 1000 * dt / args.steps, "losses": [float(x) for x in losses],
               "peak_gb_rank0": peak_gb(device),  # nan on a CPU
               "gaussians": tr.field.num_gaussians, "crop": list(data.crop_size), "env": environment(device),
               "global_batch": [args.batch_identities, args.batch_views]}
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print(f"world={world}: {doc['single_view_steps_per_s']:.1f} single-view steps/s, "
              f"{doc['ms_per_step']:.1f} ms/step, final loss {doc['losses'][-1]:.6f}")
    if world > 1:
        dist.destroy_process_group()


def summarize(paths, write: str | None, tol: float) -> int:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    docs.sort(key=lambda d: d["world"])
    base = docs[0]
    env = base["env"]
    lines = [f"# Multi-GPU training scaling ({env.get('card')}, driver {env.get('driver')}, torch {env.get('torch')}, "
             f"gsplat {env.get('gsplat')})", "",
             f"Global batch {base['global_batch'][0]} identities x {base['global_batch'][1]} views, "
             f"{base['gaussians']} Gaussians per identity, {base['crop'][0]}x{base['crop'][1]} crops, "
             f"{base['steps']} timed steps; NCCL, NCCL_NVLS_ENABLE=0.", "",
             "| GPUs | ms / step | single-view steps / s | speed-up | scaling efficiency | final loss | "
             "max rel. loss diff vs 1 GPU | peak GB (rank 0) |", "|---|---|---|---|---|---|---|---|"]
    ok = True
    for d in docs:
        sp = d["single_view_steps_per_s"] / base["single_view_steps_per_s"]
        eff = sp / (d["world"] / base["world"])
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(d["losses"], base["losses"]))
        ok &= diff <= tol
        lines.append(f"| {d['world']} | {d['ms_per_step']:.1f} | {d['single_view_steps_per_s']:.1f} | {sp:.2f}x | "
                     f"{100 * eff:.0f}% | {d['losses'][-1]:.6f} | {diff:.1e} | {d['peak_gb_rank0']:.2f} |")
    lines.append("")
    lines.append(f"Losses match within {tol:g} relative: {'yes' if ok else 'NO'}.")
    table = "\n".join(lines)
    print(table)
    if write:
        Path(write).parent.mkdir(parents=True, exist_ok=True)
        Path(write).write_text(table + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/nersemble.yaml", help="training preset")
    p.add_argument("--identities", type=int, default=8, help="synthetic identities on every rank")
    p.add_argument("--height", type=int, default=1604, help="image height (1604: images-2x)")
    p.add_argument("--level", type=int, default=2, help="face-mask subdivision level")
    p.add_argument("--batch_identities", type=int, default=8, help="global identities per step (divisible by GPUs)")
    p.add_argument("--batch_views", type=int, default=4, help="views per identity and step")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--backend", default="auto", help="rasterizer backend")
    p.add_argument("--out", default="bench_distributed.json", help="result file of this launch")
    p.add_argument("--summarize", nargs="+", metavar="JSON", help="print the scaling table of earlier launches")
    p.add_argument("--write", default=None, help="with --summarize: also write the table here")
    p.add_argument("--tol", type=float, default=2e-3, help="relative loss tolerance between GPU counts")
    a = p.parse_args()
    if a.summarize:
        sys.exit(summarize(a.summarize, a.write, a.tol))
    run(a)
