"""benchmarks/video_figure.py: the README's real | avatar picture of a track.py --video run."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from benchmarks.video_figure import face_box, figure
from utils.core.video import write_video

ROOT = Path(__file__).resolve().parents[1]


def _pair(y0: int, x0: int) -> np.ndarray:
    """A 64 x 128 heldout.mp4 frame: a lit 20 x 10 block in both halves (photo | avatar), black elsewhere."""
    f = np.zeros((64, 128, 3), np.uint8)
    f[y0:y0 + 20, x0:x0 + 10] = 200
    f[y0:y0 + 20, 64 + x0:64 + x0 + 10] = 100
    return f


def test_face_box_covers_the_lit_block_with_a_margin():
    y0, y1, x0, x1 = face_box(_pair(10, 30), margin=0.1)
    assert (y0, y1, x0, x1) == (8, 32, 29, 41)
    assert face_box(np.zeros((8, 16, 3), np.uint8)) == (0, 8, 0, 8)  # nothing lit: the whole half


def test_figure_scales_every_pair_to_the_height():
    out = figure([_pair(10, 30), _pair(30, 5)], height=48, gap=6)
    assert out.shape[0] == 48 and out.dtype == np.uint8
    assert (out[:, :, :] == 255).all(axis=(0, 2)).sum() >= 6  # the white gap between the pairs
    assert out.max() == 255 and out[out < 255].max() >= 150  # photo and avatar both present


def test_script_writes_the_png_and_names_a_missing_video(tmp_path):
    write_video(tmp_path / "run" / "heldout.mp4", [_pair(10, 30)] * 4, fps=4)
    script = [sys.executable, "benchmarks/video_figure.py"]
    r = subprocess.run(script + [str(tmp_path / "run"), str(tmp_path / "run"), "--out", str(tmp_path / "f.png"),
                                 "--frames", "2", "--height", "32"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert cv2.imread(str(tmp_path / "f.png")).shape[0] == 2 * 32 + 6  # two rows and the gap between them
    r = subprocess.run(script + [str(tmp_path / "none"), "--out", str(tmp_path / "g.png")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "heldout.mp4" in r.stderr
