"""Time the live stream's calibration (utils/face/frame_tracker.py ``FrameTracker.calibrate``) by stage (issue 24).

The calibration is what a live stream waits for before its first tracked frame (utils/apps/animate/stream.py
``_calibrate``).  Its stages, each timed (wall and process CPU seconds):

    first       the joint fit of the first frames (utils/face/flame_fit.py ``fit_flame_to_landmarks``: rigid, wide,
                narrow stages, the shape shared by the frames)
    weak        ``FrameTracker._weak_prior_resolve`` (only with ShapeRefineConfig.calibration_information)
    offset      ``FrameTracker._offset_resolve``: the joint shape / detector-offset step and the re-solve
                (ShapeRefineConfig.calibration_offset_px, on by default)
    rest        the detector offset (bias) and the tracker's construction

on the cached landmarks of benchmarks/stream_tracking.py's videos (run that first to fill ``--cache``).  Each config
runs once to warm up, then ``--repeat`` times, the configs alternating (a shared machine's load drifts); the table
gives the median per stage.  Example (the default against the calibration solved in float64 throughout):

    python benchmarks/calibration_speed.py --cache output/stream_tracking --video long --threads 1 2 \
        --variants "" calibration_float32=0

Variants are ``field=value,...`` of ShapeRefineConfig ("" = its defaults).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils.face.frame_tracker as frame_tracker  # noqa: E402
from benchmarks.stream_tracking import VIDEOS, fit_config, load_video  # noqa: E402
from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig  # noqa: E402

STAGES = ("first", "weak", "offset")


def refine_config(spec: str) -> ShapeRefineConfig:
    """'field=value,...' of ShapeRefineConfig -> the config (booleans as 0 / 1)."""
    kinds = {f.name: type(getattr(ShapeRefineConfig, f.name)) for f in fields(ShapeRefineConfig)}
    kw = {}
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        kind = kinds[name]
        kw[name] = bool(int(value)) if kind is bool else (value if kind is str else kind(float(value)))
    return ShapeRefineConfig(**kw)


class StageClock:
    """Wraps the calibration's stage functions to add up their wall / CPU seconds per call of :meth:`run`."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        fit = frame_tracker.fit_flame_to_landmarks
        frame_tracker.fit_flame_to_landmarks = self._timed("first", fit)
        for name, attr in (("weak", "_weak_prior_resolve"), ("offset", "_offset_resolve")):
            setattr(FrameTracker, attr, staticmethod(self._timed(name, getattr(FrameTracker, attr))))

    def _timed(self, name: str, f):
        def g(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return f(*a, **k)
            finally:
                w = self.times.setdefault(name, [0.0, 0.0])
                w[0] += time.perf_counter() - t
                w[1] += time.process_time() - c
        return g

    def run(self, flame, d: dict, n: int, fit, refine: ShapeRefineConfig, threads: int) -> dict:
        """One calibration on the first ``n`` frames of ``d`` -> {stage: (wall, cpu)}, 'total', the tracker."""
        self.times = {}
        t, c = time.perf_counter(), time.process_time()
        tracker, _ = FrameTracker.calibrate(flame, d["points"][:n], d["irises"][:n], d["size"], fit, True, 10,
                                            refine, threads)
        total = (time.perf_counter() - t, time.process_time() - c)
        out = {s: tuple(self.times.get(s, (0.0, 0.0))) for s in STAGES}
        out["rest"] = tuple(total[i] - sum(out[s][i] for s in STAGES) for i in range(2))
        out["total"] = total
        out["tracker"] = tracker
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", nargs="+", default=["long"], choices=sorted(VIDEOS),
                    help="benchmarks/stream_tracking.py videos (their cached landmarks): the calibration frames are "
                         "the first shape_frames of each")
    ap.add_argument("--seed", type=int, default=0, help="bench.py driving_video's seed of the videos")
    ap.add_argument("--cache", default="output/stream_tracking", help="benchmarks/stream_tracking.py's --cache")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads of the calibration (FrameTracker.calibrate's threads), each timed")
    ap.add_argument("--variants", nargs="+", default=[""],
                    help="ShapeRefineConfig settings 'field=value,...' to compare ('' = the defaults)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per config after one warm-up run")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()
    clock = StageClock()
    results = []
    for name in a.video:
        d, flame, n = load_video(name, Path(a.cache), a.seed)
        fit = fit_config(name)
        for th in a.threads:
            runs = {v: [] for v in a.variants}
            trackers = {}
            for v in a.variants:  # warm-up (first use of the landmark tables, the allocator)
                clock.run(flame, d, n, fit, refine_config(v), th)
            for _ in range(a.repeat):
                for v in a.variants:
                    r = clock.run(flame, d, n, fit, refine_config(v), th)
                    trackers[v] = r.pop("tracker")
                    runs[v].append(r)
            ref = trackers[a.variants[0]]
            print(f"{name} video, {n} calibration frames, {th} thread(s): median of {a.repeat} (wall / CPU s)")
            for v in a.variants:
                med = {k: [statistics.median(r[k][i] for r in runs[v]) for i in range(2)]
                       for k in (*STAGES, "rest", "total")}
                tr = trackers[v]
                diff = {"shape": float((tr.shape - ref.shape).abs().max()),
                        "bias_px": float((tr.bias - ref.bias).abs().max()), "focal_px": abs(tr.focal - ref.focal)}
                print(f"  {v or 'defaults':34s} " + "  ".join(f"{k} {med[k][0]:.3f} / {med[k][1]:.3f}"
                                                            for k in med if med[k][0] > 0 or k == "total")
                      + f"  (max change against {a.variants[0] or 'defaults'}: shape {diff['shape']:.1e}, "
                        f"bias {diff['bias_px']:.1e} px)", flush=True)
                results.append({"video": name, "seed": a.seed, "threads": th, "variant": v, "median": med,
                                "runs": [{k: list(x[k]) for k in x} for x in runs[v]], "change": diff})
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
