"""README picture of a video avatar: held-out frames of a ``track.py --video`` run, each real | avatar, at display size.

    python track.py --checkpoint output/cpu/model.pt --video data/clips/head-pose-face-detection-female.gif \
        --out output/female
    python benchmarks/video_figure.py output/female [output/male ...] --out docs/video_avatar_real.png --frames 3

Reads each run's ``heldout.mp4`` (each frame: the photo's face crop | the avatar's render of it, side by side),
takes ``--frames`` of its frames evenly spread, crops them to the face mask's bounding box (the non-black
pixels of both halves, plus a margin), scales each to ``--height`` pixels (bicubic) and places them side by side with
a thin white gap; one row per run (rows padded to the widest).  Prints the source frame numbers (metrics.json
``heldout_frames``) it used.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.core.video import read_video_frames  # noqa: E402


def face_box(frame: np.ndarray, margin: float = 0.08) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of one half's non-black pixels over both halves (the masked photo and render share a crop),
    grown by ``margin`` of its size; the whole half when nothing is lit."""
    h, w2 = frame.shape[:2]
    w = w2 // 2
    lit = (frame[:, :w].max(axis=2) > 8) | (frame[:, w:2 * w].max(axis=2) > 8)
    ys, xs = np.nonzero(lit)
    if len(ys) == 0:
        return 0, h, 0, w
    my, mx = int(margin * (ys.max() - ys.min() + 1)), int(margin * (xs.max() - xs.min() + 1))
    return max(0, ys.min() - my), min(h, ys.max() + 1 + my), max(0, xs.min() - mx), min(w, xs.max() + 1 + mx)


def figure(frames: list[np.ndarray], height: int, gap: int = 6) -> np.ndarray:
    """Real | avatar pairs, each cropped to its face box and scaled to ``height`` px, side by side."""
    tiles = []
    for f in frames:
        y0, y1, x0, x1 = face_box(f)
        w = f.shape[1] // 2
        pair = np.concatenate([f[y0:y1, x0:x1], np.full((y1 - y0, max(1, gap // 3), 3), 255, np.uint8),
                               f[y0:y1, w + x0:w + x1]], axis=1)
        s = height / pair.shape[0]
        tiles.append(cv2.resize(pair, (max(1, round(pair.shape[1] * s)), height), interpolation=cv2.INTER_CUBIC))
        tiles.append(np.full((height, gap, 3), 255, np.uint8))
    return np.concatenate(tiles[:-1], axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="track.py --video output folders (each holds heldout.mp4, "
                                                        "metrics.json): one row each")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--frames", type=int, default=3,
                   help="held-out frames shown per run, evenly spread over heldout.mp4")
    p.add_argument("--height", type=int, default=384, help="height of each real | avatar pair in pixels")
    a = p.parse_args()
    if a.frames < 1 or a.height < 16:
        p.error(f"--frames must be >= 1 and --height >= 16, got {a.frames} and {a.height}")
    rows = []
    for run in a.runs:
        try:
            frames, _, _ = read_video_frames(run / "heldout.mp4")
        except ValueError as e:
            raise SystemExit(f"{e} (expected track.py --video's heldout.mp4 in {run})")
        pick = np.unique(np.linspace(0, len(frames) - 1, min(a.frames, len(frames))).round().astype(int))
        rows.append(figure([frames[i] for i in pick], a.height))
        held = json.loads((run / "metrics.json").read_text()).get("heldout_frames") \
            if (run / "metrics.json").exists() else None
        used = [held[i] for i in pick] if held and len(held) == len(frames) else pick.tolist()
        print(f"{run}: held-out frames {used}")
    width = max(r.shape[1] for r in rows)
    gap = np.full((6, width, 3), 255, np.uint8)
    image = np.concatenate([x for r in rows for x in (np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)),
                                                             constant_values=255), gap)][:-1], axis=0)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(a.out), image[..., ::-1]):  # RGB -> BGR
        raise SystemExit(f"{a.out}: could not write the PNG")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
