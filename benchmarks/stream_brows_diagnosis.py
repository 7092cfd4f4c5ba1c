"""Why the streamed brows correlation drops (issue 24): the stream's two calibrated quantities -- the driver's FLAME
shape and the detector's per-landmark offset -- taken from the first ``shape_frames`` frames (what the stream can
know) or from frames spread over the video (the batch path's choice, looking ahead), swapped one at a time, the same
``FrameTracker`` tracking every frame; cached landmarks of benchmarks/stream_tracking.py (run it first).  With a
second argument it also prints the fitted brows coefficient (expression 2) frame by frame against the truth.

    python benchmarks/stream_brows_diagnosis.py quick [trace]
"""
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

import torch

from benchmarks.stream_tracking import load_video, track_all
from utils.face.flame_fit import FlameFitConfig, LandmarkTargets, fit_flame_to_landmarks
from utils.face.frame_tracker import FrameTracker

torch.set_num_threads(1)
vid = sys.argv[1]
d, flame, n = load_video(vid)
pts, iris, found = d["points"], d["irises"], d["found"]
T = pts.shape[0]
cfg = FlameFitConfig()
def calib(idx):
    first = fit_flame_to_landmarks(flame, LandmarkTargets(pts[idx], d["size"], irises=iris[idx]), cfg)
    bias = torch.zeros(68, 2)
    bias[17:] = (pts[idx] - first.landmarks.to(pts))[:, 17:].mean(0)
    return first.params.shape, float(first.camera.fx), bias, first
spread = torch.linspace(0, T - 1, n).round().long()
firstk = torch.arange(n)
S = {"first": calib(firstk), "spread": calib(spread)}
def run(shape, fx, bias, label):
    return track_all(FrameTracker(flame, d["size"], shape, fx, cfg, bias, 10), d, label)[0]
print("truth expr2 range", d["truth"].expression[:, 2].min().item(), d["truth"].expression[:, 2].max().item())
for a in (() if len(sys.argv) > 2 else ("first", "spread")):
    for b in ("first", "spread"):
        run(S[a][0], S[a][1], S[b][2], f"shape {a}, bias {b}")
run(S["first"][0], S["first"][1], torch.zeros(68, 2), "shape first, no bias")
print("shape diff norm", (S["first"][0] - S["spread"][0]).norm().item(), "fx", S["first"][1], S["spread"][1])
print("bias diff rms", (S["first"][2] - S["spread"][2])[17:].norm(dim=-1).pow(2).mean().sqrt().item())
bd = (S["first"][2] - S["spread"][2]).norm(dim=-1)
print("bias diff per lm (brows 17-26)", [round(x, 2) for x in bd[17:27].tolist()])
print("bias diff per lm max idx", bd.argsort(descending=True)[:10].tolist())
if len(sys.argv) > 2:
    import numpy as np
    a = run(S["first"][0], S["first"][1], S["first"][2], "first")
    b = run(S["spread"][0], S["spread"][1], S["spread"][2], "spread")
    np.set_printoptions(precision=2, suppress=True, linewidth=200)
    print("truth e2 ", d["truth"].expression[:, 2].numpy())
    print("first e2 ", torch.cat([p.expression[:, 2] for p in a]).numpy())
    print("spread e2", torch.cat([p.expression[:, 2] for p in b]).numpy())
    print("first e0:6 at brow peak", a[15].expression[0, :8].numpy(), "spread", b[15].expression[0, :8].numpy())
    print("truth expr at 15", d["truth"].expression[15, :8].numpy())
    print("first shape[:10]", S["first"][0][0, :10].numpy(), "\nspread shape[:10]", S["spread"][0][0, :10].numpy())
