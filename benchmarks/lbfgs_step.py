"""Cost of one SyncFreeLBFGS step (utils/apps/track/lbfgs.py, compact form) against the two-loop recursion it
replaced (tests/test_lbfgs.py TwoLoopLBFGS): aten ops per step (torch.profiler, all / those that compute) for a few
history lengths, and CPU microseconds per step (median) for a few problem sizes.

    OMP_NUM_THREADS=1 python benchmarks/lbfgs_step.py [--sizes 128 9000] [--histories 10 20] [--steps 300]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_lbfgs import TwoLoopLBFGS, aten_ops_per_step  # noqa: E402
from utils.apps.track.lbfgs import SyncFreeLBFGS  # noqa: E402

KINDS = {"two-loop (before)": TwoLoopLBFGS, "compact (after)": SyncFreeLBFGS}


def us_per_step(cls, n: int, history: int, steps: int) -> float:
    """Median wall-clock microseconds of step() on a diagonal quadratic in ``n`` dimensions (float32; the gradient
    is set outside the timed region), after ``history`` + 5 warm-up steps."""
    gen = torch.Generator().manual_seed(0)
    h, b = torch.logspace(0, 2, n), torch.randn(n, generator=gen)
    x = torch.zeros(n, requires_grad=True)
    opt, times = cls(x, history, 0.5), []
    for k in range(history + 5 + steps):
        x.grad = h * x.detach() - b
        t0 = time.perf_counter()
        opt.step()
        if k >= history + 5:
            times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 9000], help="problem sizes n for the timings")
    ap.add_argument("--histories", type=int, nargs="+", default=[10, 20], help="history lengths m")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per setting")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| optimiser | history | aten ops / step (all) | aten ops / step (compute) |")
    print("|---|---|---|---|")
    for name, cls in KINDS.items():
        for m in args.histories:
            total, compute = aten_ops_per_step(lambda v, cls=cls, m=m: cls(v, m, 0.5), 64, m + 3, 3)
            print(f"| {name} | {m} | {total:.0f} | {compute:.0f} |")
    print()
    print("| optimiser | history | n | us / step (median) |")
    print("|---|---|---|---|")
    for name, cls in KINDS.items():
        for m in args.histories:
            for n in args.sizes:
                print(f"| {name} | {m} | {n} | {us_per_step(cls, n, m, args.steps):.0f} |")


if __name__ == "__main__":
    main()
