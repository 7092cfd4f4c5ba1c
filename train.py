"""Train the identity field on multi-view captures of many identities.

    python train.py --config configs/cpu.yaml --data_root DIR --out DIR [--steps N] [--resume] [--section.key VALUE ...]

Every key of the YAML preset can be overridden on the command line (see --help). Under torchrun the same command
trains on several GPUs/nodes (see README.md, "Distributed training").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.config import add_config_args, build_config  # noqa: E402
from utils.training import TrainConfig, Trainer  # noqa: E402

ALIASES = {"data_root": "data.root", "flame_dir": "data.flame_dir"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu.yaml", help="YAML preset in configs/ (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in <out>/checkpoints")
    add_config_args(parser, TrainConfig, aliases=ALIASES)
    args = parser.parse_args(argv)
    try:
        cfg = build_config(TrainConfig, args.config, args)
        return Trainer(cfg, resume=args.resume).run()
    except (FileNotFoundError, ValueError, KeyError) as exc:  # bad data or config: one clear line, no traceback
        parser.exit(2, f"train.py: error: {exc}\n")
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
