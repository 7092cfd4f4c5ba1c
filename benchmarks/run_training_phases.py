"""Where the time of ``bash run_training.sh`` (the CPU preset) goes, phase by phase, in one process.

Times, with wall clock and this process's CPU time (user + system, so a shared machine's load shows as wall > CPU):
imports, the Trainer's construction (data loading, model build), ``--steps`` training steps of the preset's own
schedule (the learning-rate decay of its 600 steps), one evaluation (held-out + training cameras of every identity),
one checkpoint write and the model export.  It also records every step's loss terms, so two checkouts can be
compared bit for bit on the same first steps:

    python benchmarks/run_training_phases.py --data_root syn_data --steps 30 --json /tmp/after.json
    python benchmarks/run_training_phases.py --repo /tmp/main --data_root syn_data --steps 30 --json /tmp/before.json
    python benchmarks/run_training_phases.py --compare /tmp/before.json /tmp/after.json

``--repo``: the checkout whose code is timed (default: this one).  Writes only under ``--out`` (a temporary folder).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


class Phases:
    """Accumulates wall / user / system seconds per named phase."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn):
        w0, (u0, s0) = time.perf_counter(), cpu_seconds()
        result = fn()
        w1, (u1, s1) = time.perf_counter(), cpu_seconds()
        self.rows[name] = {"wall_s": round(w1 - w0, 3), "user_s": round(u1 - u0, 3), "sys_s": round(s1 - s0, 3)}
        return result


def compare(a_path: str, b_path: str) -> int:
    """Print both files' phases side by side and whether their per-step losses are bit-identical; 1 if not."""
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    print(f"{'phase':<24}{'A wall':>9}{'A user':>9}{'A sys':>8}{'B wall':>9}{'B user':>9}{'B sys':>8}")
    for k in a["phases"]:
        ra, rb = a["phases"][k], b["phases"].get(k, {})
        print(f"{k:<24}{ra['wall_s']:>9.2f}{ra['user_s']:>9.2f}{ra['sys_s']:>8.2f}"
              f"{rb.get('wall_s', float('nan')):>9.2f}{rb.get('user_s', float('nan')):>9.2f}"
              f"{rb.get('sys_s', float('nan')):>8.2f}")
    n = min(len(a["losses"]), len(b["losses"]))
    same = a["losses"][:n] == b["losses"][:n]
    print(f"per-step loss terms of the first {n} steps bit-identical: {same}")
    if not same:
        for i in range(n):
            if a["losses"][i] != b["losses"][i]:
                print(f"first difference at step {i + 1}: {a['losses'][i]} vs {b['losses'][i]}")
                break
    ea, eb = a.get("evaluation", {}), b.get("evaluation", {})
    for k in ea:
        print(f"eval {k}: {ea[k]!r} vs {eb.get(k)!r}")
    return 0 if same else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                   help="checkout whose code is timed (default: this one)")
    p.add_argument("--config", default="configs/cpu.yaml", help="preset, relative to --repo (default: %(default)s)")
    p.add_argument("--data_root", default="syn_data", help="preprocessed synthetic dataset (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="training steps timed (of the preset's schedule)")
    p.add_argument("--eval", type=int, default=1, help="evaluations timed (default: %(default)s)")
    p.add_argument("--out", default=None, help="scratch output folder (default: a temporary one)")
    p.add_argument("--resume_from", default=None,
                   help="a run folder of the same preset and data (e.g. output/cpu): its checkpoints are copied into "
                   "--out and the timed steps continue from the newest one (late steps: smaller Gaussians, faster)")
    p.add_argument("--json", default=None, help="write phases, losses and evaluation metrics here")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two --json files and exit")
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)

    repo = Path(args.repo).resolve()
    data_root = str(Path(args.data_root).resolve())
    os.chdir(repo)
    sys.path.insert(0, str(repo))
    ph = Phases()

    def imports():
        import torch  # noqa: F401

        from utils.apps.train.trainer import TrainConfig, Trainer
        from utils.core.config import build_config
        return torch, TrainConfig, Trainer, build_config

    torch, TrainConfig, Trainer, build_config = ph.run("imports", imports)
    out = args.out or tempfile.mkdtemp(prefix="phases_")
    cfg = build_config(TrainConfig, args.config, overrides={"data.root": data_root, "out": out, "progress": False})
    if args.resume_from:
        shutil.copytree(Path(args.resume_from) / "checkpoints", Path(out) / "checkpoints", dirs_exist_ok=True)
    trainer = ph.run("build (data + model)", lambda: Trainer(cfg, resume=bool(args.resume_from),
                                                             overwrite=not args.resume_from))
    losses: list[dict[str, float]] = []

    def steps():
        for _ in range(args.steps):
            terms = trainer.train_step()
            losses.append({k: float(v) for k, v in terms.items()})

    ph.run(f"train {args.steps} steps", steps)
    metrics: dict = {}

    def evals():
        nonlocal metrics
        for _ in range(args.eval):
            metrics = trainer.evaluate()

    if args.eval > 0:
        ph.run(f"evaluate x{args.eval}", evals)
    ph.run("checkpoint write", trainer.save_checkpoint)
    ph.run("export model.pt", trainer.export)
    trainer.close()
    doc = {"repo": str(repo), "start_step": trainer.step - args.steps, "torch_threads": torch.get_num_threads(),
           "load_avg": os.getloadavg(),
           "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")},
           "phases": ph.rows, "losses": losses,
           "evaluation": {k: v for k, v in metrics.items() if not k.startswith("_")}}
    for k, r in ph.rows.items():
        print(f"{k:<24} wall {r['wall_s']:8.2f} s  user {r['user_s']:8.2f} s  sys {r['sys_s']:6.2f} s")
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
