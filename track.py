"""Reconstruct a person from ONE photo with the trained identity field frozen (fit a latent code / style, then a
small regularised per-vertex colour residual; --refine_colour false for the code alone).

    python track.py --checkpoint output/cpu/model.pt --image photo.jpg --out output/photo      # a photo alone
    python track.py --checkpoint output/cpu/model.pt --subject_dir syn_data/subjects/017 --out output/tracking/017
    python track.py --checkpoint model.pt --image me.jpg --camera_json camera_params.json --camera 222200037 \\
        --flame tracked_flame_params.npz [--mask me_mask.png] --flame_dir data --out output/me
    python track.py --all_heldout --data_root syn_data --checkpoint output/cpu/model.pt --out output/tracking
    python track.py --checkpoint output/cpu/model.pt --video clip.mp4 --out output/me      # an avatar from a video
    python track.py --checkpoint output/cpu/model.pt --frames frames/ [--landmarks lm.npy] --out output/me

Video mode (--video / --frames, utils/apps/track/video.py) tracks every frame (landmarks -> FLAME, one shape and
camera), fits the style and the colour residual on many frames, holds out every --heldout_every-th frame and the last
--heldout_tail of the clip, and writes code.pt, flame_fit.npz, camera_params.json, metrics.json (PSNR/SSIM in the
face mask on held-out and training frames), heldout.mp4 (real | avatar) and turntable.mp4.

Writes code.pt, head.ply, views/cam_<serial>.png, grid.png, turntable.mp4 and metrics.json into --out (with
--all_heldout: one folder per identity, summary.md / summary.json, and the Markdown table on stdout).  A photo alone
also writes flame_fit.npz (NeRSemble tracking layout), camera_params.json (camera 222200037) and landmarks.png.
Every key of configs/fit.yaml can be overridden on the command line (--fit.lr 0.02, --export.turntable false, ...).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.apps.track.config import TRACK_ALIASES, TRACK_FLAGS, TrackConfig  # noqa: E402
from utils.apps.track.pipeline import track, track_all_heldout
from utils.apps.track.video import track_video  # noqa: E402
from utils.core.config import config_parser, parse_cli_config  # noqa: E402
from utils.core.errors import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return config_parser(__doc__, TrackConfig, "configs/fit.yaml", aliases=TRACK_ALIASES, flags=TRACK_FLAGS)


def main(argv: list[str] | None = None):
    return run_main("track.py", lambda: _run(argv), argv)  # bad input: one clear line (--debug: traceback)


def _run(argv: list[str] | None):
    _, cfg = parse_cli_config(build_parser(), TrackConfig, argv)
    if cfg.video or cfg.frames:

        m = track_video(cfg)
        print(", ".join(f"{k}={m[k]}" for k in ("frames", "frames_skipped_no_face", "psnr_face_heldout",
                                                 "psnr_face_train", "psnr_face_heldout_mean_code", "ssim_heldout",
                                                 "iterations", "seconds")), f"-> {cfg.out}")
        return m
    if cfg.all_heldout:
        rows, table = track_all_heldout(cfg)
        print(table)
        return rows
    metrics = track(cfg)
    keys = ("psnr_unseen_mean_code", "psnr_unseen", "psnr_all", "ssim_unseen", "ssim_all", "iterations", "seconds")
    print(", ".join(f"{k}={metrics[k]}" for k in keys if metrics.get(k) is not None), f"-> {cfg.out}")
    return metrics


if __name__ == "__main__":
    main()
