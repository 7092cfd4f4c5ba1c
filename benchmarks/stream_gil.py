"""Is the streamed FLAME fit slowed by the GIL?  The per-frame fit (``FrameTracker.step``) on cached landmarks, timed
alone and while other Python threads of the same process work as animate.py --stream's do (issue 24).

    alone       FrameTracker.step per frame on the cached landmarks of benchmarks/stream_tracking.py's video, nothing
                else running in the process
    threads     the same while a landmark thread runs mediapipe's face mesh (video mode) on the video's frames in a
                loop at ``--landmark_fps`` (30: a 30 fps stream), as the stream's landmark stage does, and
                (``--busy``) a pure-Python busy thread stands in for the render thread's Python work; the fit in the
                main thread (animate.py --stream's default)
    process     the same threads, the fit in a worker process (utils/face/tracker_process.py TrackerProcess,
                ``--stream_fit_process``): the main thread only waits on the pipe

Per mode: the fit's wall ms per frame (p50 / p90) and its CPU ms (the fitting thread's, or the worker's): wall well
above CPU is waiting -- for the GIL or, on a loaded machine, for a core; the process mode has the same competing threads
but no shared GIL, so threads minus process is what the GIL costs.  The results of all three are compared bit for
bit.  Example (2-core container: one landmark thread, no busy thread, so 2 busy threads on 2 cores):

    python benchmarks/stream_gil.py --video quick --repeat 2
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import driving_video  # noqa: E402
from benchmarks.stream_tracking import VIDEOS, load_video  # noqa: E402
from models.flame import FlameModel, FlameParams  # noqa: E402
from utils.face.flame_fit import FlameFitConfig  # noqa: E402
from utils.face.frame_tracker import FrameTracker  # noqa: E402
from utils.face.reenactment import read_video  # noqa: E402
from utils.face.tracker_process import TrackerProcess  # noqa: E402


def _landmark_loop(frames: list[np.ndarray], stop: threading.Event, counter: list[int], fps: float) -> None:
    """The stream's landmark stage without its queues: mediapipe on the frames, round and round, at most ``fps``
    frames a second (0: as fast as it goes)."""
    from utils.apps.animate.stream import mediapipe_detector

    detect = mediapipe_detector(1.0)
    try:
        i = 0
        t0 = time.perf_counter()
        while not stop.is_set():
            if fps > 0 and (wait := t0 + i / fps - time.perf_counter()) > 0:
                time.sleep(wait)
            detect(frames[i % len(frames)], f"frame {i}")
            i += 1
            counter[0] += 1
    finally:
        detect.close()


def _busy_loop(stop: threading.Event, counter: list[int]) -> None:
    """Pure-Python work (holds the GIL between CPython's switch intervals), a stand-in for the render thread's."""
    while not stop.is_set():
        x = 0
        for k in range(20000):
            x += k * k
        counter[0] += 1


def run(mode: str, flame: FlameModel, d: dict, shape_frames: int, frames: list[np.ndarray], busy: bool,
        worker: TrackerProcess | None, landmark_fps: float = 30.0) -> dict:
    """One pass over the video's landmarks: calibration, then FrameTracker.step per frame (timed)."""
    pts, iris, size = d["points"], d["irises"], d["size"]
    n = shape_frames
    stop = threading.Event()
    counts = {"landmarks": [0], "busy": [0]}
    threads = []
    if mode != "alone":
        threads.append(threading.Thread(target=_landmark_loop, args=(frames, stop, counts["landmarks"], landmark_fps),
                                        daemon=True))
        if busy:
            threads.append(threading.Thread(target=_busy_loop, args=(stop, counts["busy"]), daemon=True))
    if worker is not None:
        worker.calibrate(pts[:n], iris[:n], size, FlameFitConfig(), True, 10)
        tracker = worker
    else:
        tracker, _ = FrameTracker.calibrate(flame, pts[:n], iris[:n], size, FlameFitConfig(), True, 10)
    for t in threads:
        t.start()
    time.sleep(0.5 if threads else 0.0)  # the detector's graph built and running
    wall, cpu, out = [], [], []
    t_all = time.perf_counter()
    for i in range(pts.shape[0]):
        t, c = time.perf_counter(), time.thread_time()
        p, _ = tracker.step(pts[i], iris[i])
        wall.append(1000.0 * (time.perf_counter() - t))
        cpu.append(1000.0 * (worker.step_cpu_s if worker is not None else time.thread_time() - c))
        out.append(p)
    seconds = time.perf_counter() - t_all
    stop.set()
    for t in threads:
        t.join(timeout=10.0)
    q = lambda x: [float(np.percentile(np.asarray(x[1:]), k)) for k in (50, 90)]  # noqa: E731
    return {"wall_ms_p50_p90": q(wall), "cpu_ms_p50_p90": q(cpu), "params": FlameParams.cat(out),
            "landmark_frames_per_s": counts["landmarks"][0] / seconds, "busy_loops_per_s": counts["busy"][0] / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", choices=sorted(VIDEOS), default="quick", help="bench.py's quick or full driving video")
    ap.add_argument("--cache", default="output/stream_tracking", help="stream_tracking.py's cache folder")
    ap.add_argument("--busy", action="store_true", help="also a pure-Python busy thread (the render thread's stand-in)")
    ap.add_argument("--landmark_fps", type=float, default=30.0,
                    help="the landmark thread's rate (a 30 fps stream detects 30 frames a second; 0: flat out)")
    ap.add_argument("--repeat", type=int, default=1, help="passes of the three modes, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fit and worker)")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    per, size, _ = VIDEOS[a.video]
    cache = Path(a.cache)
    d, flame, shape_frames = load_video(a.video, cache)
    video, _ = driving_video(types.SimpleNamespace(flame_dir=cache / "flame"), torch.device("cpu"), per, size)
    frames, _, _ = read_video(video)
    results: dict[str, list] = {"alone": [], "threads": [], "process": []}
    ref = None
    with TrackerProcess(flame, threads=a.threads) as worker:
        for _ in range(a.repeat):
            for mode in results:
                r = run(mode, flame, d, shape_frames, frames, a.busy, worker if mode == "process" else None,
                      a.landmark_fps)
                p = r.pop("params")
                if ref is None:
                    ref = p
                r["identical_to_alone"] = all(torch.equal(getattr(p, k), getattr(ref, k)) for k in FlameParams._TENSORS)
                results[mode].append(r)
                w, c = r["wall_ms_p50_p90"], r["cpu_ms_p50_p90"]
                print(f"{mode:8s} fit wall ms p50 / p90 {w[0]:6.1f} / {w[1]:6.1f}   cpu {c[0]:6.1f} / {c[1]:6.1f}   "
                      f"landmark thread {r['landmark_frames_per_s']:5.1f} frames/s   busy {r['busy_loops_per_s']:6.1f}"
                      f"/s   identical {r['identical_to_alone']}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"video": a.video, "busy": a.busy, "results": results}, indent=1))


if __name__ == "__main__":
    main()
