"""Animate any head of a trained identity field with FLAME expressions, jaw, neck, eyes and head pose: a training
identity, a person fitted by track.py (code.pt) or an interpolation of two, driven by built-in keyframes, a keyframes
file, a NeRSemble / VHAP tracking file, a NeRSemble subject's sequence or a video; renders an MP4.

    python animate.py --checkpoint output/cpu/model.pt                       # first training identity, keyframes
    python animate.py --identity output/tracking/017/code.pt --keyframes neutral smile open_mouth neutral
    python animate.py --identity 300 --motion syn_data/subjects/301 --side_by_side driver     # 301's sequence on 300
    python animate.py --identity 300 --identity_b 301 --mix 0.5 --motion tracked_flame_params.npz --pose absolute \\
        --camera_json syn_data/subjects/301/calibration/camera_params.json --side_by_side video --png --ply

Built-in keyframes: neutral, smile, open_mouth, raised_brows, frown, pucker, head_turn_left, head_turn_right, nod,
tilt, look_left, look_right (utils/motion.py: jaw / neck / eyes are FLAME joints; the expression keyframes use the
synthetic FLAME's named expression components, see README).  A keyframes file (.yaml/.json) lists built-in names
and/or mappings {name, expression: {index: value}, jaw: [x, y, z], neck: [...], eyes: [...]}.

Live driving (--stream, utils/apps/animate/stream.py): a video file or a camera device index as --motion is tracked and
rendered frame by frame (landmark threads overlapped with the FLAME fit and the render, bounded queues, frames in
order), the MP4 written as it goes; at the end the per-frame latency distribution and the sustained frame rate:

    python animate.py --identity 300 --motion driver.mp4 --stream --side_by_side video
    python animate.py --identity 300 --motion 0 --stream --max_frames 300     # camera 0 (Ctrl-C stops it)

Writes <out>/animation.mp4, <out>/motion.npz (the motion as it drove the identity, NeRSemble layout, reusable as
--motion), <out>/animation.json, and with --png / --ply <out>/frames/frame_<n>.png / <out>/ply/frame_<n>.ply.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.apps.animate.pipeline import ANIM_FLAGS, ANIM_LISTS, AnimationConfig, animate  # noqa: E402
from utils.apps.animate.stream import format_summary  # noqa: E402
from utils.core.config import config_parser, parse_cli_config  # noqa: E402
from utils.core.errors import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return config_parser(__doc__, AnimationConfig, flags=ANIM_FLAGS, lists=ANIM_LISTS)


def main(argv: list[str] | None = None) -> dict:
    return run_main("animate.py", lambda: _run(argv), argv)  # bad input: one clear line (--debug: traceback)


def _run(argv: list[str] | None) -> dict:
    _, cfg = parse_cli_config(build_parser(), AnimationConfig, argv, lists=ANIM_LISTS)
    summary = animate(cfg)
    if "stream" in summary:

        print(format_summary(summary))
    print(f"{summary['num_frames']} frames of {summary['identity']} driven by {summary['motion']} "
          f"({summary['render_fps']:.1f} frames/s posed and rendered) -> {summary['video']}")
    return summary


if __name__ == "__main__":
    main()
