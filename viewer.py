"""Interactive browser viewer of a trained identity field: orbit a head, switch identities (training identities and
people fitted by track.py), blend between two (linear or spherical), truncate towards the average style, pose it with
expression, jaw, eye, neck and head-pose sliders (or a built-in keyframe), save the head on screen as a 3DGS PLY.
Open the printed address in a browser (the page draws the Gaussians itself, WebGL).

    python viewer.py                                      # output/cpu/model.pt, code.pt files under output/tracking/
    python viewer.py --checkpoint output/nersemble/model.pt --codes me/code.pt --port 8081
    python viewer.py --flame_dir data/                    # the FLAME files the model was trained with (pose sliders)
    python viewer.py --host 0.0.0.0                       # reachable from other machines (prints a warning)

Pose sliders move the head without running the network (FLAME, subdivision and attachment only); identity controls
run it once and keep the pose.  They need the FLAME files the model was trained with (found as animate.py finds them:
--flame_dir, else the training data's, else data/); without them the page shows no pose sliders and says why.

The printed address holds a per-session token (http://127.0.0.1:8080/<token>/): the server refuses every request
without it, a websocket from a page of another origin, and file names typed in the page outside the model's folder
and --code_dir.  The server binds 127.0.0.1 unless --host is given; from another machine use an SSH tunnel
(ssh -L 8080:127.0.0.1:8080 host, then open http://127.0.0.1:8080 there).  It never requests a public share link.
A missing or mismatched model.pt or code.pt is reported in the terminal and in the page; the server keeps running.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils.apps.viewer import VIEWER_LISTS, HeadViewer, ViewerConfig  # noqa: E402
from utils.core.config import config_parser, parse_cli_config  # noqa: E402
from utils.core.errors import run_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    return config_parser(__doc__, ViewerConfig, lists=VIEWER_LISTS)


def main(argv: list[str] | None = None) -> None:
    # bad flags or a server that cannot start: one clear line, like every other script (--debug: traceback)
    viewer, cfg = run_main("viewer.py", lambda: _start(argv), argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server as cleanly as Ctrl-C
    print(f"[viewer] {cfg.checkpoint} on {viewer.url}  (open it in a browser; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        viewer.close()


def _start(argv: list[str] | None) -> tuple[HeadViewer, ViewerConfig]:
    _, cfg = parse_cli_config(build_parser(), ViewerConfig, argv, lists=VIEWER_LISTS)
    return HeadViewer(cfg), cfg


if __name__ == "__main__":
    main()
