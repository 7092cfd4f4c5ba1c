"""Train the identity field on multi-view captures of many identities.

    python train.py --config configs/cpu.yaml --data_root DIR --out DIR [--steps N] [--resume | --overwrite] \
        [--section.key VALUE ...]

Every key of the YAML preset can be overridden on the command line (see --help). Under torchrun the same command
trains on several GPUs/nodes (see README.md, "Distributed training"). The output folder is locked while a run
writes to it; a fresh run refuses a folder that already holds a run (--resume continues it, --overwrite replaces it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.config import add_config_args, build_config  # noqa: E402
from utils.errors import add_debug_flag, run_main  # noqa: E402
from utils.training import TrainConfig, Trainer  # noqa: E402

ALIASES = {"data_root": "data.root", "flame_dir": "data.flame_dir"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/cpu.yaml", help="YAML preset in configs/ (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest readable checkpoint in <out>/checkpoints (to --steps, which "
                             "must not be below the checkpoint's step)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (its model.pt, metrics.json, checkpoints and logs are "
                             "deleted); without it a fresh run refuses a folder that holds a run")
    add_debug_flag(parser)
    add_config_args(parser, TrainConfig, aliases=ALIASES)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    def work() -> dict:
        cfg = build_config(TrainConfig, args.config, args)
        return Trainer(cfg, resume=args.resume, overwrite=args.overwrite).run()

    try:
        return run_main("train.py", work, argv)  # bad data or config: one clear line, no traceback
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
