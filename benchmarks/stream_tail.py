"""Where a live stream's slowest frames go (issue 24's latency p99), on a CPU: ``animate.py --stream
--stream_realtime`` on bench.py's paced-run video, the render stood in for by a sleep of the GPU's render time.

    video       bench.py ``driving_video`` (``--per_transition`` 16: the 188-frame clip of bench.py --parts stream
                --stream_per_transition 16) after ``--lead_in_s`` seconds of its neutral first pose (bench.py's paced
                runs: 2.5 s; the default 10 s outlasts this container's 2-4 s calibration, as 2.5 s outlasts the GPU
                machine's 1.4 s), rendered once on the CPU and cached in ``--cache``
    stream      animate.py's stream (utils/apps/animate/stream.py), live at the video's 30 frames/s, the fit in its own
                process (``--stream_fit_process``), one landmark thread; with ``--stub_render_ms`` > 0 the head's pose
                and rasterisation are replaced by a sleep of that many ms (the GPU's render: 4.8 ms on the H100 of
                benchmarks/results/gpu_h100_2026-12-07f.md; a CPU render of the level-2 model takes ~90 ms, which
                would make the stream render-bound)

Prints the latency (frame read to frame encoded) p50 / p90 / p99 / max after calibration, the fit's, the slowest
frames with their stage breakdown and the tracker's events (animation.json ``stream.per_frame``), and the jaw / smile
/ brows / head-turn correlations of the kept frames with the truth (bench.py ``motion_correlations``).  Example
(benchmarks/results/t-tail_cpu_2026-12-07h.md):

    python benchmarks/stream_tail.py --checkpoint output/cpu/model.pt --out output/stream_tail/run1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import STREAM_FPS, driving_video, motion_correlations  # noqa: E402


def cached_lead_in_video(cache: Path, per_transition: int, lead_in_s: float) -> tuple[Path, object]:
    """(MP4, true FlameParams) of driving_video with ``lead_in_s`` seconds of lead-in, made once in ``cache``."""
    from utils.data.synthetic.flame_files import write_flame_files
    from utils.data.synthetic.flame_model import make_flame_model

    lead = int(round(lead_in_s * STREAM_FPS))
    folder = cache / f"video_{per_transition}_lead{lead}"
    if not (folder / "truth.pt").is_file():
        flame_dir = cache / "flame"
        if not (flame_dir.is_dir() and any(flame_dir.iterdir())):
            flame_dir.mkdir(parents=True, exist_ok=True)
            write_flame_files(flame_dir, make_flame_model(0), 0)
        path, truth = driving_video(types.SimpleNamespace(flame_dir=flame_dir), torch.device("cpu"), per_transition,
                                    512, lead_in=lead)
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(path, folder / "driver.mp4")
        torch.save(truth, folder / "truth.pt")
    return folder / "driver.mp4", torch.load(folder / "truth.pt", weights_only=False)


def stub_render(ms: float) -> None:
    """The stream's pose + rasterisation replaced by a sleep of ``ms`` (it releases the GIL, as a GPU render's wait
    does; the CPU work of launching kernels is not modelled)."""
    import utils.apps.animate.stream as stream
    from models.posing import HeadAnimator

    HeadAnimator.graphed = lambda self, head, num_frames=1, use_graphs=None: (lambda params: None)

    def render(cloud, cams, backend=None, depth=False):
        time.sleep(ms / 1000.0)
        cam = cams[0][0]
        return {"image": torch.zeros(1, 1, cam.height, cam.width, 3)}

    stream.render_identities = render


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained model (model.pt)")
    ap.add_argument("--out", required=True, help="output folder of the stream (animation.json, motion.npz, ...)")
    ap.add_argument("--cache", default="output/stream_tail", help="folder of the cached driving video")
    ap.add_argument("--per_transition", type=int, default=16, help="bench.py --stream_per_transition")
    ap.add_argument("--lead_in_s", type=float, default=10.0, help="seconds of neutral lead-in before the motion")
    ap.add_argument("--stub_render_ms", type=float, default=5.0,
                    help="render stood in for by a sleep of this many ms (0: the real render)")
    ap.add_argument("--size", type=int, default=128, help="rendered width and height")
    ap.add_argument("animate_args", nargs="*", help="more animate.py flags, after --, e.g. -- --stream_refine.frames 0")
    a = ap.parse_args()
    import animate

    path, truth = cached_lead_in_video(Path(a.cache), a.per_transition, a.lead_in_s)
    if a.stub_render_ms > 0:
        stub_render(a.stub_render_ms)
    flame_dir = Path(a.cache) / "flame"
    s = animate.main(["--checkpoint", a.checkpoint, "--motion", str(path), "--stream", "--stream_realtime",
                      "--stream_workers", "1", "--stream_fit_device", "cpu", "--stream_fit_process", "true",
                      "--width", str(a.size), "--height", str(a.size), "--reenact.shape_frames", "16",
                      "--flame_dir", str(flame_dir), "--out", a.out, "--progress", "false", *a.animate_args])
    from models.flame import load_tracking

    kept = np.load(Path(a.out) / "motion.npz")["frames"].astype(np.int64).tolist()
    r = motion_correlations(load_tracking(Path(a.out) / "motion.npz"), truth.frames(kept))
    st = s["stream"]
    pf = [x for x in st["per_frame"] if not x["calibration"]]
    q = lambda k: [round(float(np.percentile([x[k] for x in pf], p)), 1) for p in (50, 90, 99)]  # noqa: E731
    out = {"latency_ms_p50_p90_p99": q("latency_ms"), "latency_ms_max": max(x["latency_ms"] for x in pf),
           "fit_ms_p50_p90_p99": q("fit_ms"), "calibration_s": st["calibration_s"], "dropped": st["dropped"],
           "frames": len(pf), "r": {k: round(v, 3) for k, v in r.items()}, "slowest": st["slowest"][:4]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
