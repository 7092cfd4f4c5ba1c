"""Morph between identities of a trained identity field: training identities by name and/or people fitted by
track.py (their code.pt); renders PNG frames and an MP4.

    python interpolate.py --checkpoint output/cpu/model.pt --identities 300 301 302 --loop
    python interpolate.py --identities 300 output/tracking/017/code.pt --method linear --frames 20 --orbit 30 --ply
    python interpolate.py --identities 300 301 --camera_json syn_data/subjects/300/calibration/camera_params.json \\
        --camera 222200037 --width 512

A video over K keys has frames*(K-1)+1 frames, or frames*K with --loop (back to the first key).
Writes <out>/frames/frame_00000.png ..., <out>/interpolation.mp4, <out>/keys.json (and <out>/keyframes/*.ply).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.apps.interpolate import (  # noqa: E402
    INTERP_FLAGS,
    INTERP_LISTS,
    InterpolationConfig,
    interpolate,
)
from utils.core.config import config_parser, parse_cli_config  # noqa: E402
from utils.core.errors import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return config_parser(__doc__, InterpolationConfig, flags=INTERP_FLAGS, lists=INTERP_LISTS)


def main(argv: list[str] | None = None) -> dict:
    return run_main("interpolate.py", lambda: _run(argv), argv)  # bad input: one clear line (--debug: traceback)


def _run(argv: list[str] | None) -> dict:
    _, cfg = parse_cli_config(build_parser(), InterpolationConfig, argv, lists=INTERP_LISTS)
    summary = interpolate(cfg)
    print(f"{summary['num_frames']} frames ({' -> '.join(summary['keys'])}{' -> loop' if cfg.loop else ''}, "
          f"{summary['space']}-space {summary['method']}) -> {summary['video']}")
    return summary


if __name__ == "__main__":
    main()
