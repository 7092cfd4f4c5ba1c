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

import numpy as np
import torch

from benchmarks.stream_tracking import load_video, track_all
from utils.face.flame_fit import FlameFitConfig
from utils.face.frame_tracker import FrameTracker

torch.set_num_threads(1)
d, flame, n = load_video(sys.argv[1])
pts, iris = d["points"], d["irises"]
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
    _, _, r, ms = track_all(tr, d)
    print(f"{spec:60s}", " / ".join(f"{r[k]:.3f}" for k in ("jaw", "smile", "brows", "turn")),
          f" fit p50 {np.median(ms[1:]):.0f} ms", flush=True)
