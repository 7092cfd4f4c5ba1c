"""Is the streamed shape refinement's jaw loss (issue 24) a bad shape or the change of shape mid-video?  On the cached
landmarks of benchmarks/stream_tracking.py (run it first): the stream with the first frames' shape held fixed, with
``--stream_refine.frames 16``, then the refinement's FINAL shape (and detector offset) held fixed from the first frame
(a diagnostic: it looks ahead), and the jaw coefficient frame by frame against the truth.

    python benchmarks/stream_blend_diagnosis.py full
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.stream_tracking import load_video, track_all  # noqa: E402
from utils.face.flame_fit import FlameFitConfig  # noqa: E402
from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig  # noqa: E402

torch.set_num_threads(1)
d, flame, n = load_video(sys.argv[1])
pts, iris = d["points"], d["irises"]
T = pts.shape[0]
cfg = FlameFitConfig()
cal, _ = FrameTracker.calibrate(flame, pts[:n], iris[:n], d["size"], cfg, True, 10)


def run(tr: FrameTracker, label: str):
    """Track every frame with ``tr``; print the four correlations; (per-frame params, tracker)."""
    return track_all(tr, d, label)[0], tr


o_fix, _ = run(FrameTracker(flame, d["size"], cal.shape, cal.focal, cfg, cal.bias, 10), "fixed first")
o_ref, tr = run(FrameTracker(flame, d["size"], cal.shape, cal.focal, cfg, cal.bias, 10,
                             ShapeRefineConfig(frames=16)), "refine16")
print("kept idx", sorted(k.index for k in tr.kept))
o_fin, _ = run(FrameTracker(flame, d["size"], tr.shape, cal.focal, cfg, tr.bias, 10), "fixed final refined shape+bias")
run(FrameTracker(flame, d["size"], tr.shape, cal.focal, cfg, cal.bias, 10), "fixed final refined shape, first bias")
np.set_printoptions(precision=2, suppress=True, linewidth=250)
print("truth jaw", d["truth"].jaw[:, 0].numpy())
for lab, o in (("fixed", o_fix), ("refine", o_ref), ("final", o_fin)):
    print(lab, torch.cat([p.jaw[:, 0] for p in o]).numpy())
print("shape diff", float((tr.shape - cal.shape).norm()))
