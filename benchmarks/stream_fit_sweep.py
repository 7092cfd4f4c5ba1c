"""Stream-only fit settings against the brows gap (issue 24): each argument is a JSON dict of FlameFitConfig fields
(top level: calibration and tracking; "calib": calibration only; "track": tracking only); the stream is calibrated on
the first ``shape_frames`` frames and tracks every frame (cached landmarks of benchmarks/stream_tracking.py).

    python benchmarks/stream_fit_sweep.py quick '{}' '{"track": {"contour_weight": 0.3}}'
"""
import json
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench import motion_correlations
from benchmarks.stream_tracking import VIDEOS, cached_video, relative_to_reference
from models.flame import FlameModel
from utils.face.flame_fit import FlameFitConfig
from utils.face.frame_tracker import FrameTracker

torch.set_num_threads(1)
vid = sys.argv[1]
per, size, n = VIDEOS[vid]
cache = Path("output/stream_tracking")
d = cached_video(cache, per, size)
flame = FlameModel.from_data_dir(cache / "flame")
pts, iris = d["points"], d["irises"]
T = pts.shape[0]
base = FlameFitConfig()
for spec in sys.argv[2:]:
    kw = json.loads(spec)
    calib_kw = kw.pop("calib", {})
    track_kw = kw.pop("track", {})
    ccfg = replace(base, **kw, **calib_kw)
    t0 = time.perf_counter()
    tr, _ = FrameTracker.calibrate(flame, pts[:n], iris[:n], d["size"], ccfg, True, 10)
    if track_kw or calib_kw:
        tr.warm_cfg = replace(tr.warm_cfg, **{**{k: getattr(base, k) for k in calib_kw}, **track_kw})
        tr.cold_cfg = replace(tr.cold_cfg, **{**{k: getattr(base, k) for k in calib_kw}, **track_kw})
    out, refs, ms = [], [], []
    for i in range(T):
        t = time.perf_counter()
        p, _ = tr.step(pts[i], iris[i])
        out.append(p)
        refs.append(tr.reference)
        ms.append(1000 * (time.perf_counter() - t))
    r = motion_correlations(relative_to_reference(out, refs), d["truth"])
    print(f"{spec:60s}", " / ".join(f"{r[k]:.3f}" for k in ("jaw", "smile", "brows", "turn")),
          f" fit p50 {np.median(ms[1:]):.0f} ms", flush=True)
