"""Check that training under ``torchrun --nproc_per_node=1`` (process group + DDP) takes the same steps as a plain
process. Run it once each way, then compare:

    python benchmarks/torchrun_check.py --out plain.json
    torchrun --nproc_per_node=1 benchmarks/torchrun_check.py --out ddp.json
    python benchmarks/torchrun_check.py --out plain2.json            # run-to-run spread of plain runs
    python benchmarks/torchrun_check.py --compare plain.json ddp.json --noise plain2.json

The problem is built in memory (synthetic identities, see benchmarks/bench.py), so no dataset files are needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import build_problem  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from utils.apps.train.trainer import TrainConfig, Trainer, init_distributed  # noqa: E402
from utils.core.config import build_config  # noqa: E402


def run(args) -> None:
    device, rank, world = init_distributed("auto")
    cfg = build_config(TrainConfig, "configs/nersemble.yaml", overrides={
        "data.subdivision": args.level, "progress": False, "out": scratch_dir("trcheck_"),
        "batch_identities": 2, "batch_views": 4})
    torch.manual_seed(0)
    data, _ = build_problem(args.identities, args.height, args.level, device, cfg)
    tr = Trainer(cfg, data=data)
    losses = [float(tr.train_step()["loss"]) for _ in range(args.steps)]
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "ddp": tr.module is not tr.field and
                                              type(tr.module).__name__ == "DistributedDataParallel",
                                              "device": str(device), "losses": losses}))
        print(f"world={world} losses[0]={losses[0]:.6f} losses[-1]={losses[-1]:.6f}")


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def compare(a: str, b: str, tol: float, noise: str | None = None) -> int:
    """Pass when B's losses follow A's within ``tol``, or within 3x the run-to-run spread of two plain runs
    (A and ``noise``): on CUDA, gsplat's backward accumulates with atomics, so two identical plain runs differ too."""
    A, B = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    docs = [(a, A), (b, B)]
    worst = _max_rel_diff(A["losses"], B["losses"])
    spread = None
    if noise:
        N = json.loads(Path(noise).read_text())
        docs.append((noise, N))
        spread = _max_rel_diff(A["losses"], N["losses"])
    bound = max(tol, 3 * spread) if spread is not None else tol
    ok = len(A["losses"]) == len(B["losses"]) and worst <= bound
    print("| run | ddp | steps | first loss | last loss |\n|---|---|---|---|---|")
    for name, d in docs:
        print(f"| {Path(name).name} | {d['ddp']} | {len(d['losses'])} | {d['losses'][0]:.6f} | {d['losses'][-1]:.6f} |")
    print(f"\nlargest relative loss difference, {Path(a).name} vs {Path(b).name}: {worst:.2e}")
    if spread is not None:
        print(f"largest relative loss difference between the two plain runs (run-to-run spread): {spread:.2e}")
    print(f"-> {'MATCH' if ok else 'MISMATCH'} (bound {bound:.2e})")
    return 0 if ok else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="torchrun_check.json", help="where to write the per-step losses")
    p.add_argument("--steps", type=int, default=30, help="training steps")
    p.add_argument("--identities", type=int, default=4, help="synthetic identities")
    p.add_argument("--height", type=int, default=802, help="image height")
    p.add_argument("--level", type=int, default=1, help="face-mask subdivision level")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two result files and exit")
    p.add_argument("--noise", default=None, help="with --compare: a second plain run (run-to-run spread)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative loss tolerance for --compare")
    a = p.parse_args()
    if a.compare:
        sys.exit(compare(*a.compare, a.tol, a.noise))
    run(a)
