"""Streamed vs batch FLAME tracking on bench.py's keyframe driving videos, landmarks detected once (issue 24).

The measurement behind benchmarks/README.md's "streamed vs batch correlations" tables, without the renderer and with
the landmarks cached, so tracker variants compare frame for frame on the same points:

    video       bench.py ``driving_video`` (a synthetic head through ``REENACT_KEYS``; quick: 3 frames per transition at
                256x256 = 22 frames, full: 12 at 512x512 = 85 frames), mediapipe video-mode landmarks detected once
                (one thread, as ``--stream_workers 1``) and cached in ``--cache``/video_<per>_<size>/data.pt
    batch       utils/face/reenactment.py ``fit_video_motion`` (the shape from ``shape_frames`` frames spread over the
                video), cached as batch_<shape_frames>.pt
    stream      utils/face/frame_tracker.py ``FrameTracker`` as animate.py --stream runs it: calibrated on the first
                ``shape_frames`` frames, then one frame at a time (``--stream_iterations``, animate.py's default),
                with the shape refined on kept frames (``--refine_frames``; 0: the first frames' shape only); head
                rotation measured from the tracker's reference frame as ``--pose relative`` does

Prints jaw / smile / brows / head-turn correlations with the truth (bench.py ``motion_correlations``) of both, their
differences, and the per-frame ``FrameTracker.step`` time (wall, and the tracking thread's CPU time: a background
shape re-solve is not in it) p50 / p90 / p99 after the first frame.  Example (the quick video without refinement,
with the online re-solve of ShapeRefineConfig's 12-frame mode, and that mode with its swaps at fixed frames):

    python benchmarks/stream_tracking.py --video quick --refine_frames 0 12 --variants frames=12,wait=1

``--video long`` is bench.py's --stream_per_transition 48 clip (337 frames; rendered and detected once, minutes);
``--pace_fps 30`` hands the frames over at a camera's rate.

Other ShapeRefineConfig settings as extra runs (one calibration shared by all runs of one call):

    python benchmarks/stream_tracking.py --video full --refine_frames 0 --variants frames=16,blend_frames=8 \
        frames=16,min_span=0.1 frames=16,iterations_per_frame=5,refit_previous=1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import STREAM_FPS, STREAM_LEAD_IN_S, driving_video, motion_correlations  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from models.flame import FlameModel, FlameParams  # noqa: E402
from utils.apps.animate.pipeline import AnimationConfig  # noqa: E402
from utils.core.blas import set_blas_threads  # noqa: E402
from utils.face.flame_fit import FlameFitConfig  # noqa: E402
from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig  # noqa: E402
from utils.face.reenactment import ReenactConfig, detect_video_landmarks, fit_video_motion, read_video  # noqa: E402

VIDEOS = {"quick": (3, 256, 8), "full": (12, 512, 16), "long": (48, 512, 16), "test": (0, 256, 8),
          "long_lead": (48, 512, 16), "mid_lead": (16, 512, 16)}
# frames of neutral lead-in: bench.py's paced runs' video (--stream_lead_in's default)
LEAD_IN = {name: int(round(STREAM_LEAD_IN_S * STREAM_FPS)) for name in ("long_lead", "mid_lead")}
# frames per transition, size, shape_frames (as bench.py; "long": bench.py --stream_per_transition 48, 337 frames;
# "long_lead": "long" after 2.5 s of the neutral first pose, the video of bench.py's paced runs; "mid_lead": bench.py
# --stream_per_transition 16 with that lead-in (188 frames: the GPU run of 2026-12-07e, fast motion);
# "test": tests/test_streaming.py's 16-frame video, tests/test_reenactment.py's ``driving_video``, which that test fits
# with 20 Levenberg-Marquardt iterations in the calibration and the batch fit: TEST_FIT)
TEST_FIT = {"iterations": 20}


def fit_config(name: str, **kw) -> FlameFitConfig:
    """The calibration's / batch fit's FlameFitConfig of video ``name`` (the test video: its test's settings)."""
    return FlameFitConfig(**(TEST_FIT if name == "test" else {}), **kw)


def test_video(cache: Path) -> dict:
    """tests/test_reenactment.py's 16-frame driving video (subject 301 of the tests' tiny synthetic dataset, jaw /
    smile / brows / +-0.1 rad head turn, 256 x 256, 10 fps), detected once: {truth, points, irises, found, size}."""
    path = cache / "video_0_256" / "data.pt"  # (per 0: VIDEOS["test"])
    if not path.is_file():
        import tempfile

        from tests.test_reenactment import SIZE, T, camera, true_motion
        from tests.training_fixtures import get_sequence_root
        from utils.core.images import to_uint8
        from utils.core.video import write_video
        from utils.data.synthetic.dataset import load_ground_truth
        from utils.data.synthetic.render import render_ground_truth

        tmp = Path(scratch_dir("stream_test_video_"))
        factory = types.SimpleNamespace(mktemp=lambda name: Path(tempfile.mkdtemp(prefix=name, dir=tmp)))
        root = get_sequence_root(factory)
        _, identity = load_ground_truth(root, "301")
        truth = true_motion(identity.params)
        frames = []
        for i in range(T):
            cloud, _ = load_ground_truth(root, "301", params=truth.frame(i))
            frames.append(to_uint8(render_ground_truth(cloud, [camera()], identity, "studio", "torch")["image"][0]))
        detect_to_cache(write_video(tmp / "driver.mp4", frames, fps=10), truth, SIZE, path,
                        flame_dir=str(root / "flame"))
    return torch.load(path, weights_only=False)


def detect_to_cache(video: Path, truth, size: int, path: Path, **extra) -> None:
    """Detect the landmarks of every frame of ``video`` once and save {truth, points, irises, found, size, **extra}
    to ``path`` (what cached_video / test_video load)."""
    frames, _, _ = read_video(video)
    pts, iris, found = detect_video_landmarks(frames, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"truth": truth, "points": pts, "irises": iris, "found": found, "size": (size, size), **extra}, path)


def cached_video(cache: Path, per: int, size: int, seed: int = 0, lead_in: int = 0) -> dict:
    """{truth, points, irises, found, size, flame_dir} of the driving video (made and detected once, then loaded);
    ``seed``: bench.py driving_video's seed (another synthetic FLAME model and identity; 0: bench.py's video);
    ``lead_in``: driving_video's neutral lead-in frames."""
    from utils.data.synthetic.flame_files import write_flame_files
    from utils.data.synthetic.flame_model import make_flame_model

    if per == 0:
        return test_video(cache)
    root = cache / ("flame" if not seed else f"flame_{seed}")
    if not (root.is_dir() and any(root.iterdir())):
        root.mkdir(parents=True, exist_ok=True)
        write_flame_files(root, make_flame_model(seed), seed)
    path = cache / video_dir(per, size, seed, lead_in) / "data.pt"
    if not path.is_file():
        video, truth = driving_video(types.SimpleNamespace(flame_dir=root), torch.device("cpu"), per, size,
                                     seed=seed, lead_in=lead_in)
        detect_to_cache(video, truth, size, path)
    d = torch.load(path, weights_only=False)
    d.setdefault("flame_dir", str(root))
    return d


def video_dir(per: int, size: int, seed: int = 0, lead_in: int = 0) -> str:
    """The cache folder of one video (its landmarks, batch fits)."""
    return f"video_{per}_{size}" + (f"_seed{seed}" if seed else "") + (f"_lead{lead_in}" if lead_in else "")


def relative_to_reference(params: list[FlameParams], references: list[FlameParams]) -> FlameParams:
    """Each frame's head rotation relative to the reference frame it was sent with (what --pose relative renders,
    up to the identity's own placement); one shape (the driver's shape does not drive)."""
    out = []
    for p, r in zip(params, references):
        out.append(replace(p, shape=params[0].shape, rotation_matrix=r.rotation_matrix.transpose(1, 2)
                           @ p.rotation_matrix))
    return FlameParams.cat(out)


def load_video(name: str, cache: Path = Path("output/stream_tracking"), seed: int = 0
               ) -> tuple[dict, FlameModel, int]:
    """The cached driving video ``name`` (a VIDEOS key; run this script first to fill ``cache``): (cached_video's
    dict, the synthetic FLAME model, its shape_frames) for the diagnostic scripts beside this one."""
    per, size, shape_frames = VIDEOS[name]
    d = cached_video(cache, per, size, seed, LEAD_IN.get(name, 0))
    return d, FlameModel.from_data_dir(d["flame_dir"]), shape_frames


def track_all(tracker: FrameTracker, d: dict, label: str = "") -> tuple[list, list, dict, list[float]]:
    """Every frame of ``d`` through ``tracker`` -> (per-frame params, references, the four correlations against the
    truth, per-frame wall ms); prints them under ``label`` when given."""
    out, refs, ms = [], [], []
    for i in range(d["points"].shape[0]):
        t = time.perf_counter()
        p, _ = tracker.step(d["points"][i], d["irises"][i])
        ms.append(1000.0 * (time.perf_counter() - t))
        out.append(p)
        refs.append(tracker.reference)
    r = motion_correlations(relative_to_reference(out, refs), d["truth"])
    if label:
        print(f"{label:40s}", " / ".join(f"{r[k]:.3f}" for k in ("jaw", "smile", "brows", "turn")), flush=True)
    return out, refs, r, ms


def run_stream(flame, d: dict, shape_frames: int, refine: ShapeRefineConfig, iterations: int = 10,
               calibrated: dict | None = None, bias_correction: bool = True, closed_form: bool = True,
               warm: dict | None = None, pace_fps: float = 0.0, fit: FlameFitConfig | None = None,
               first: int = 0) -> dict:
    """One streamed pass; ``calibrated`` (filled on the first call of each ``closed_form``) holds the first frames'
    calibration, so that variants start from the identical tracker without repeating the calibration (7-30 s CPU).
    ``iterations``: Levenberg-Marquardt iterations per warm-started frame (``--stream_iterations``); ``closed_form``:
    the calibration fit's ``FlameFitConfig.closed_form`` (False: autograd, as before 2026-12-06); ``pace_fps``: frames
    handed to the tracker at this rate, as a camera delivers them (0: as fast as it takes them); ``fit``: the
    calibration's and the cold first frame's FlameFitConfig (``closed_form`` set from the argument; None: defaults);
    ``first``: the first frame tracked after the calibration, as a live stream goes on (0: every frame, file mode;
    live, the held calibration frames and those that arrived during the calibration are dropped: see --live_skip),
    the correlations then over frames ``first``.. only."""
    fit = fit or FlameFitConfig()
    pts, iris, size = d["points"], d["irises"], d["size"]
    n = shape_frames
    calibrated = {} if calibrated is None else calibrated
    # (one calibration per Jacobian kind and calibration shape prior: ShapeRefineConfig.calibration_shape_std,
    # calibration_information, calibration_offset_px, calibration_iterations)
    prior = (refine.calibration_shape_std, refine.calibration_information, refine.calibration_iterations) \
        if refine.frames > 0 else 0.0
    prior = (prior, refine.calibration_offset_px, refine.calibration_iterations if refine.calibration_offset_px else 0,
             (refine.calibration_offset_rounds, refine.calibration_offset_groups)
             if refine.calibration_offset_px else 0, refine.calibration_float32)
    calibrated = calibrated.setdefault((bool(closed_form), prior), {})
    if not calibrated:
        t, c = time.perf_counter(), time.process_time()
        tr, _ = FrameTracker.calibrate(flame, pts[:n], None if iris is None else iris[:n], size,
                                       replace(fit, closed_form=closed_form), True, iterations, refine)
        calibrated.update(shape=tr.shape.clone(), focal=tr.focal, bias=tr.bias.clone(),
                          seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - c)
    tracker = FrameTracker(flame, size, calibrated["shape"], calibrated["focal"], fit, calibrated["bias"],
                           iterations, refine, bias_correction)
    if warm:  # FlameFitConfig fields of the warm-started frames' fit (FrameTracker.warm_cfg), e.g. tolerance
        tracker.warm_cfg = replace(tracker.warm_cfg, **warm)
    calib_s = calibrated["seconds"]
    out, refs, wall, cpu = [], [], [], []
    start = time.perf_counter()
    for i in range(first, pts.shape[0]):
        if pace_fps > 0:  # the camera's next frame is not there before its time
            time.sleep(max(0.0, start + (i - first) / pace_fps - time.perf_counter()))
        t, c = time.perf_counter(), time.thread_time()
        p, _ = tracker.step(pts[i], None if iris is None else iris[i])
        wall.append(1000.0 * (time.perf_counter() - t))
        cpu.append(1000.0 * (time.thread_time() - c))
        out.append(p)
        refs.append(tracker.reference)
    tracker.close()
    q = lambda x: [float(np.percentile(np.asarray(x[1:]), k)) for k in (50, 90, 99)]  # noqa: E731
    truth = d["truth"].frames(slice(first, None))
    return {"r": motion_correlations(relative_to_reference(out, refs), truth), "fit_ms_wall_p50_p90_p99": q(wall),
            "fit_ms_cpu_p50_p90_p99": q(cpu), "fit_ms_wall_max": max(wall[1:]), "calibration_s": calib_s,
            "calibration_cpu_s": calibrated["cpu_seconds"], "fit_ms_wall_mean": float(np.mean(wall[1:])),
            "fit_ms_cpu_mean": float(np.mean(cpu[1:])), "iterations": iterations, "closed_form": closed_form,
            "shape_updates": tracker.shape_updates, "kept": len(tracker.kept), "refine_s": tracker.refine_seconds,
            "solve_s": tracker.solve_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", choices=sorted(VIDEOS), default="quick",
                    help="bench.py's quick (22 frames), full (85) or long (337, --stream_per_transition 48) video, "
                         "long_lead (long after 75 frames of its neutral first pose: bench.py's paced runs' video), "
                         "mid_lead (188 frames: --stream_per_transition 16 after that lead-in, fast motion), "
                         "or tests/test_streaming.py's 16-frame one (test)")
    ap.add_argument("--seed", type=int, default=0,
                    help="bench.py driving_video's seed for the keyframe videos: another synthetic FLAME model and "
                         "driver identity (0: bench.py's own video)")
    ap.add_argument("--cache", default="output/stream_tracking",
                    help="folder of the cached videos, landmarks and batch fits")
    ap.add_argument("--refine_frames", type=int, nargs="*", default=[0, 12],
                    help="stream runs: ShapeRefineConfig.frames of each (0: no refinement, the first frames' shape)")
    ap.add_argument("--iterations_per_frame", type=int, default=ShapeRefineConfig.iterations_per_frame,
                    help="ShapeRefineConfig.iterations_per_frame")
    ap.add_argument("--refine_iterations", type=int, default=ShapeRefineConfig.iterations,
                    help="ShapeRefineConfig.iterations")
    ap.add_argument("--blend_frames", type=int, nargs="+", default=[ShapeRefineConfig.blend_frames],
                    help="ShapeRefineConfig.blend_frames values (each run with every --refine_frames / --min_span)")
    ap.add_argument("--min_span", type=float, nargs="+", default=[ShapeRefineConfig.min_span],
                    help="ShapeRefineConfig.min_span values (radians of kept head yaw / pitch before a re-solve)")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="more stream runs, each 'field=value,...' of ShapeRefineConfig (plus bias_correction=0/1: "
                         "re-estimate the detector offset with the shape; stream_iterations=N: LM iterations per "
                         "frame; closed_form=0/1: the calibration's Jacobians; warm.<FlameFitConfig field>=value: the "
                         "warm frames' fit setting, e.g. warm.tolerance=1e-3; "
                         "calibration_offset_groups=brows:1.5+nose:1.5), e.g. frames=16,blend_frames=8 or "
                         "frames=0,stream_iterations=5")
    ap.add_argument("--stream_iterations", type=int, default=AnimationConfig.stream_iterations,
                    help="Levenberg-Marquardt iterations per warm-started frame of the runs without their own")
    ap.add_argument("--pace_fps", type=float, default=0.0,
                    help="hand the frames to the tracker at this rate, as a camera does (0: as fast as it takes "
                         "them); a background shape re-solve (ShapeRefineConfig.background) runs between paced frames")
    ap.add_argument("--live_skip", type=int, default=0,
                    help="as a live stream (animate.py --stream_realtime / a camera) goes on after its calibration: "
                         "the calibration frames and this many more (those that arrive while it calibrates, e.g. 54 "
                         "for 1.8 s at 30 fps) are not tracked; stream and batch are scored on the rest only")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the list of stream runs this many times (timings on a shared machine vary)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (and NumPy's / SciPy's BLAS threads)")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    set_blas_threads(a.threads)  # NumPy's / SciPy's OpenBLAS too (the per-frame fit's products; utils/core/blas.py)
    per, size, shape_frames = VIDEOS[a.video]
    cache = Path(a.cache)
    lead = LEAD_IN.get(a.video, 0)
    d = cached_video(cache, per, size, a.seed, lead)
    flame = FlameModel.from_data_dir(d["flame_dir"])
    bpath = cache / video_dir(per, size, a.seed, lead) / f"batch_{shape_frames}.pt"
    if not bpath.is_file():
        batch, _ = fit_video_motion(flame, d["points"], d["irises"], d["found"], d["size"],
                                    ReenactConfig(shape_frames=shape_frames, flame_fit=fit_config(a.video)),
                                    progress=False)
        torch.save(batch.to("cpu"), bpath)
    first = shape_frames + a.live_skip if a.live_skip else 0
    rb = motion_correlations(torch.load(bpath, weights_only=False).frames(slice(first, None)),
                             d["truth"].frames(slice(first, None)))
    fmt = lambda r: " / ".join(f"{r[k]:.3f}" for k in ("jaw", "smile", "brows", "turn"))  # noqa: E731
    print(f"{a.video} video ({d['truth'].num_frames} frames{f', scored from frame {first}' if first else ''}): "
          "jaw / smile / brows / turn")
    print(f"  batch                  {fmt(rb)}")
    results = {"video": a.video, "batch": rb, "stream": {}}
    calibrated: dict = {}
    runs = [(f, b, m) for f in a.refine_frames for b in (a.blend_frames if f else [0])
            for m in (a.min_span if f else [0.0])]
    runs = [(f"{f}" if not f else f"frames={f},blend_frames={b},min_span={m:g}") for f, b, m in runs] + a.variants
    for rep, key in [(k, r) for k in range(a.repeat) for r in runs]:
        kw = {"iterations_per_frame": a.iterations_per_frame, "iterations": a.refine_iterations}
        warm = {}
        for item in key.split(",") if "=" in key else [f"frames={key}"]:
            name, value = item.split("=")
            if name.startswith("warm."):  # warm.<FlameFitConfig field>=value
                f = name[5:]
                warm[f] = type(getattr(FlameFitConfig, f))(float(value))
                continue
            if name == "calibration_offset_groups":  # brows:1.5+nose:1.5 -> "brows=1.5,nose=1.5"
                kw[name] = value.replace(":", "=").replace("+", ",")
                continue
            kind = int if name == "stream_iterations" else type(getattr(ShapeRefineConfig, name, True))
            # (bias_correction, closed_form: FrameTracker arguments (bool))
            kw[name] = bool(int(value)) if kind is bool else kind(float(value))
        bias_correction = kw.pop("bias_correction", True)
        iterations = int(kw.pop("stream_iterations", a.stream_iterations))
        closed_form = bool(kw.pop("closed_form", True))
        refine = ShapeRefineConfig(**kw)
        s = run_stream(flame, d, shape_frames, refine, iterations, calibrated=calibrated,
                       bias_correction=bias_correction, closed_form=closed_form, warm=warm,
                       pace_fps=a.pace_fps, fit=fit_config(a.video), first=first)
        results["stream"][key if not rep else f"{key} #{rep + 1}"] = s
        diff = min(s["r"][k] - rb[k] for k in rb)
        w, c = s["fit_ms_wall_p50_p90_p99"], s["fit_ms_cpu_p50_p90_p99"]
        print(f"  stream, {key}\n      {fmt(s['r'])}  (min minus batch {diff:+.3f}; shape updates "
              f"{s['shape_updates']}, kept {s['kept']})\n"
              f"      fit ms p50/p90/p99 wall {w[0]:.1f} / {w[1]:.1f} / {w[2]:.1f}, cpu {c[0]:.1f} / {c[1]:.1f} / "
              f"{c[2]:.1f}, max {s['fit_ms_wall_max']:.0f}; refinement {s['refine_s']:.2f} s in the frames, "
              f"{s['solve_s']:.2f} s solving; calibration "
              f"{s['calibration_s']:.1f} s wall, {s['calibration_cpu_s']:.1f} s CPU; mean fit ms wall "
              f"{s['fit_ms_wall_mean']:.1f}, cpu {s['fit_ms_cpu_mean']:.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
