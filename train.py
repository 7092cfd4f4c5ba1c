"""Train the identity field on multi-view captures of many identities.

    python train.py --config configs/cpu.yaml --data_root DIR --out DIR [--steps N] [--resume | --overwrite] \
        [--section.key VALUE ...]

Every key of the YAML preset can be overridden on the command line (see --help). Under torchrun the same command
trains on several GPUs/nodes (see README.md, "Distributed training"). The output folder is locked while a run
writes to it; a fresh run refuses a folder that already holds a run (--resume continues it, --overwrite replaces it).

The feed-forward encoder (photo crop -> style, models/encoder.py) is trained after the field, with the field frozen,
or (--encoder.joint true) during the field's training, from --encoder.joint_start of its steps on, against the field's
current styles through stop-gradient (the field trains exactly as without it; the checkpoints hold the encoder too):

    python train.py --config configs/cpu.yaml --data_root DIR --out DIR --encoder [--encoder.steps N ...]
    python train.py --config configs/cpu.yaml --data_root DIR --out DIR --encoder --encoder.joint true
    python train.py --encoder_only --checkpoint DIR/model.pt [--data_root DIR]      # add one to a trained model

Either way model.pt gains an "encoder" entry (older model.pt files, without one, load as before).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.apps.train.distributed import shutdown_distributed  # noqa: E402
from utils.apps.train.encoder import EncoderTrainConfig, add_trained_encoder  # noqa: E402
from utils.apps.train.trainer import TrainConfig, Trainer  # noqa: E402
from utils.core.config import _field_comments, _leaf_fields, _parse_value, add_config_args, build_config  # noqa: E402
from utils.core.errors import add_debug_flag, run_main  # noqa: E402

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
    parser.add_argument("--encoder", action="store_true",
                        help="after the field (or during it: --encoder.joint true), train the feed-forward encoder "
                             "(photo crop -> style) and store it in model.pt (settings: --encoder.KEY VALUE)")
    parser.add_argument("--encoder_only", action="store_true",
                        help="train only the encoder for the trained model --checkpoint (default <out>/model.pt) on "
                             "its training data (--data_root, default the one it was trained on) and store it there")
    parser.add_argument("--checkpoint", default=None, help="with --encoder_only: the model.pt to add an encoder to")
    add_debug_flag(parser)
    add_config_args(parser, TrainConfig, aliases=ALIASES)
    group = parser.add_argument_group("encoder training (--encoder / --encoder_only)")
    for name, f, tp, owner in _leaf_fields(EncoderTrainConfig):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        help_text = _field_comments(owner).get(f.name, "")
        group.add_argument(f"--encoder.{name}", dest=f"enc:{name}", default=None,
                           metavar=getattr(tp, "__name__", "VALUE").upper(),
                           help=f"{help_text} (default: {default!r})".replace("%", "%%"))
    return parser


def encoder_config(args: argparse.Namespace) -> EncoderTrainConfig:
    """EncoderTrainConfig from the --encoder.KEY flags."""
    types = {name: tp for name, _, tp, _ in _leaf_fields(EncoderTrainConfig)}
    over = {k[4:]: _parse_value(v, types[k[4:]], "encoder." + k[4:]) for k, v in vars(args).items()
            if k.startswith("enc:") and v is not None}
    return build_config(EncoderTrainConfig, overrides=over)


def run_encoder(args: argparse.Namespace, cfg: TrainConfig, trainer: Trainer | None = None) -> dict:
    """Train the encoder for <out>/model.pt (or --checkpoint) and store it there."""
    path = Path(args.checkpoint) if args.checkpoint else Path(cfg.out) / "model.pt"
    if trainer is not None:
        return add_trained_encoder(path, encoder_config(args), trainer.device, cfg.progress, data=trainer.data)
    return add_trained_encoder(path, encoder_config(args), cfg.device, cfg.progress,
                               data_root=args.__dict__.get("cfg:data.root"),
                               flame_dir=args.__dict__.get("cfg:data.flame_dir"))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    def work() -> dict:
        cfg = build_config(TrainConfig, args.config, args)
        ecfg = encoder_config(args)
        if ecfg.joint and (args.encoder_only or not args.encoder):
            raise ValueError("--encoder.joint true trains the encoder during the field's training: it needs --encoder "
                             "(and not --encoder_only, which trains one for a field already trained)")
        if args.encoder_only:
            return run_encoder(args, cfg)
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, encoder=ecfg if ecfg.joint else None)
        metrics = trainer.run()
        if args.encoder and not ecfg.joint:
            metrics.update(run_encoder(args, cfg, trainer))
        return metrics

    try:
        return run_main("train.py", work, argv)  # bad data or config: one clear line, no traceback
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
