"""Re-evaluate a finished training run on its held-out cameras with the current code: whole-crop, face-mask and
eye-region PSNR (utils/face/regions.py), as training's own evaluation computes them.

For runs whose ``metrics.json`` was written by an older eye-region rule (e.g. before each eye's direction became the
face's forward direction turned 30 degrees outwards, issue 25): the run's last checkpoint is loaded exactly as
``train.py --resume`` would (same preset, data and step count) and evaluated without training.

    python benchmarks/heldout_eyes.py --config configs/cpu.yaml --data_root output/syn546 --out output/cpu546 \\
        --steps 400 [--json output/heldout_eyes.json]

Prints one line per metric (held-out cameras, every training identity); ``--json`` also writes them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.apps.train.trainer import TrainConfig, Trainer  # noqa: E402
from utils.core.config import build_config  # noqa: E402


def run_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the flags that name one finished training run (--config, --data_root, --out, --steps), shared
    by the scripts that evaluate such a run (this one, eye_gap.py)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="configs/cpu.yaml", help="the preset the run was trained with")
    p.add_argument("--data_root", required=True, help="the run's dataset (preprocessed)")
    p.add_argument("--out", required=True, help="the run's output folder (its checkpoints/ are read)")
    p.add_argument("--steps", type=int, required=True, help="the run's --steps (its last checkpoint is at this step)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = run_parser(__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = build_config(TrainConfig, args.config, overrides={"data.root": args.data_root, "out": args.out,
                                                            "steps": args.steps, "progress": False})
    tr = Trainer(cfg, resume=True)
    if tr.step != args.steps:
        raise SystemExit(f"{args.out}: the last checkpoint is at step {tr.step}, not {args.steps}")
    metrics = {k: v for k, v in tr.evaluate().items() if not k.startswith("_")}
    tr.close()
    for k, v in metrics.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
