"""Live driving: a video file or a camera drives a head of the field frame by frame (``animate.py --motion video.mp4
--stream``, ``--motion 0 --stream`` for camera 0), the streaming counterpart of utils/face/reenactment.py's batch path.

    reader      one thread: frames from OpenCV (a file, optionally paced at its frame rate as a camera delivers it, or
                a camera device index), into one bounded queue per landmark worker (frame n -> worker n mod W)
    landmarks   W threads, each with its own mediapipe face mesh in video mode (utils/face/landmarks.py): iBUG-68 points
                and iris centres, into a bounded output queue; frames are put back in order by their index.  Video
                mode tracks from the last frame the detector saw, so with W > 1 each detector sees every W-th frame
                and its points differ from one detector's (measured on tests/test_streaming.py's video: 1.05 px mean,
                10 px max, smile r 0.708 instead of 0.799): W = 1 (the default) unless detection is the bottleneck
    fit         the calling thread (or, with ``stream_fit_process``, a worker process it waits on: utils/face/
                tracker_process.py, the same tracker without sharing the GIL with the other stages): the first
                ``reenact.shape_frames`` frames with a face calibrate the person (FLAME shape, focal length, the
                detector's per-landmark offset: utils/face/frame_tracker.py FrameTracker.calibrate), then every frame is
                fitted on its own, warm-started from the previous frame with a temporal prior that looks only backwards
                (FrameTracker.step); a frame without a face holds the previous frame. The shape and detector offset keep
                improving on frames kept for their head-pose diversity (``stream_refine``, FrameTracker's
                ShapeRefineConfig: re-solved in a background thread when they show a new head pitch / yaw, never
                looking ahead; by default once, at the first new view; ``--stream_refine.frames 0``: off). Torch
                runs this stage's CPU work on ``stream_threads`` threads
    render      one thread: the motion put on the identity (models/posing.py retarget, relative to the first frame
                with a face), posed (PoseGraph: a CUDA graph on a GPU) and rasterised, the frame composed (beside the
                driving frame with side_by_side video) and appended to the MP4 as it goes (no whole-video buffer)

Every queue is bounded (``stream_queue`` frames per stage).  In file mode (a throughput measure) a slow stage holds
the reader back and every frame is kept.  In live mode (a camera, or a file with ``stream_realtime``) frames that are
stale because the stream is behind are dropped instead (landmark_stream's live mode: the newest frame wins before and
after detection; the frames held for the calibration are dropped once it is done), counted in the summary and left
out of the video and motion.npz alike.  Per frame the latency from its read to its encoded frame is kept; the summary
has its distribution (p50 / p90 / p99, over the frames after calibration and over all), the sustained frame rate and
every frame's record (``per_frame``: where its latency went, stage by stage, and what the tracker did meanwhile).
"""
from __future__ import annotations

import copy
import gc
import math
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from models.flame import FlameParams, save_nersemble_tracking
from models.posing import HeadAnimator, retarget
from models.renderer import render_identities
from utils.core.atomic import atomic_write_json
from utils.core.blas import restore_blas_threads, set_blas_threads
from utils.core.device import resolve_device, synchronize
from utils.core.images import fit_height, save_image, to_uint8
from utils.data.model_file import load_model
from utils.face.frame_tracker import FrameTracker
from utils.face.landmarks import LandmarkDetector, LandmarkError
from utils.face.tracker_process import TrackerProcess
from utils.identity import (
    base_camera,
    identity_key,
    load_flame,
    mixed_identity,
    model_flame_dir,
    posable,
)

STOP = object()  # end of a queue's stream


@dataclass
class Detected:
    """One frame after the landmark stage.

    Attributes:
        index: position in the stream (0, 1, ...); frame_id: the frame's index in the video (start / stride applied).
        rgb: (H, W, 3) uint8 RGB frame.  t_read: perf_counter() when it was read.
        points: (68, 2) iBUG-68 pixels or None (no usable face); irises: (2, 2) pixels (subject's right, left) or None.
        landmark_s: seconds the detector took; t_detected: perf_counter() when it was done.
    """

    index: int
    frame_id: int
    rgb: np.ndarray
    t_read: float
    points: Tensor | None = None
    irises: Tensor | None = None
    landmark_s: float = 0.0
    t_detected: float = 0.0


def is_camera(motion: str) -> bool:
    """A ``--motion`` that names a camera device index (digits only, e.g. "0")."""
    return motion.strip().isdigit()


class FrameSource:
    """Frames of a video file or a camera (OpenCV), as (frame_id, RGB uint8) in order.

    Args:
        motion: a video path or a camera device index ("0").
        start, stride, max_frames: frames start, start + stride, ... (at most max_frames; 0 = all / until the camera
            stops).
        realtime: a file is delivered at its frame rate (as a camera would), not as fast as it decodes.
    """

    def __init__(self, motion: str, start: int = 0, stride: int = 1, max_frames: int = 0,
                 realtime: bool = False) -> None:
        import cv2

        self.camera = is_camera(motion)
        if self.camera:
            self.cap = cv2.VideoCapture(int(motion))
            if not self.cap.isOpened():
                raise ValueError(f"--motion {motion}: OpenCV cannot open camera device {int(motion)} (no such "
                                 f"device, or no permission; list the devices with v4l2-ctl --list-devices)")
        else:
            path = Path(motion)
            if not path.is_file():
                raise FileNotFoundError(f"--motion {motion}: no such video file (or a camera device index: digits)")
            self.cap = cv2.VideoCapture(str(path))
            if not self.cap.isOpened():
                raise ValueError(f"--motion {motion}: OpenCV cannot open this video (a format OpenCV reads: mp4, avi, "
                                 f"mov, mkv, webm)")
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
        self.name = f"camera {int(motion)}" if self.camera else str(motion)
        self.start, self.stride, self.max_frames = int(start), int(stride), int(max_frames)
        self.realtime = bool(realtime) and not self.camera  # a camera paces itself

    @property
    def live(self) -> bool:
        """Frames come at the source's pace (a camera, or a file with ``realtime``): a stream that falls behind must
        drop stale frames, not queue them (landmark_stream's live mode)."""
        return self.camera or self.realtime

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        i = n = 0
        t0 = time.perf_counter()
        while not self.max_frames or n < self.max_frames:
            ok, frame = self.cap.read()
            if not ok:
                break
            if i >= self.start and (i - self.start) % self.stride == 0:
                if self.realtime:  # frame n of the selection is due n / fps seconds after the first
                    wait = t0 + n / self.fps * self.stride - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                yield i, np.ascontiguousarray(frame[..., ::-1])
                n += 1
            i += 1

    def close(self) -> None:
        self.cap.release()


def mediapipe_detector(min_face_px: float) -> Callable[[np.ndarray, str], tuple[Tensor | None, Tensor | None]]:
    """A per-thread landmark function: RGB frame -> (points (68, 2) or None, irises (2, 2) or None), mediapipe's face
    mesh in video mode (the same conversion as utils/face/reenactment.py detect_video_landmarks)."""

    det = LandmarkDetector(static_images=False, min_face_px=min_face_px)

    def detect(rgb: np.ndarray, name: str) -> tuple[Tensor | None, Tensor | None]:
        try:
            lm = det.detect(rgb, name)
        except LandmarkError:
            return None, None
        pts = torch.as_tensor(lm.ibug68, dtype=torch.float32)
        iris = None
        if len(lm.mesh) >= 478:  # iris centres 468 and 473; which one is the subject's right eye is measured
            a, b = lm.mesh[468, :2], lm.mesh[473, :2]
            right = lm.ibug68[36:42].mean(0)
            pair = [a, b] if np.linalg.norm(a - right) < np.linalg.norm(b - right) else [b, a]
            iris = torch.as_tensor(np.stack(pair), dtype=torch.float32)
        return pts, iris

    detect.close = det.close  # type: ignore[attr-defined]
    return detect


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Blocking put that gives up when ``stop`` is set (so no thread hangs on a full queue at shutdown)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


class _Mailbox:
    """A thread-safe box of at most ``capacity`` frames where a new frame pushes the OLDEST one out (live mode:
    "latest frame wins"), plus control items (STOP, an exception) that are never pushed out.

    ``put`` returns the frame it pushed out (None if none), for the caller to count as dropped; ``take`` hands one
    frame (or control item) to a worker and numbers frames in the order they are taken (``Detected.index``: the
    frames that go on get consecutive indices whatever was dropped before them); ``take_all`` hands everything that
    is in the box to the consumer."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.cond = threading.Condition()
        self.items: list[Any] = []  # frames and control items, oldest first
        self.frames = 0  # frames in ``items``
        self.taken = 0  # frames taken by ``take`` (the next one's index)

    def put(self, item: Any) -> Any:
        with self.cond:
            pushed = None
            if isinstance(item, Detected):
                if self.frames >= self.capacity:
                    k = next(i for i, x in enumerate(self.items) if isinstance(x, Detected))
                    pushed = self.items.pop(k)
                    self.frames -= 1
                self.frames += 1
            self.items.append(item)
            self.cond.notify_all()
            return pushed

    def take(self, timeout: float, number: bool = False) -> Any:
        """The oldest item, or None after ``timeout`` seconds; ``number``: set a frame's index (taken order)."""
        with self.cond:
            if not self.items and not self.cond.wait_for(lambda: bool(self.items), timeout):
                return None
            item = self.items.pop(0)
            if isinstance(item, Detected):
                self.frames -= 1
                if number:
                    item.index = self.taken
                    self.taken += 1
            return item

    def take_all(self, timeout: float) -> list[Any]:
        """Everything in the box (oldest first), waiting up to ``timeout`` seconds for at least one item."""
        with self.cond:
            if not self.items:
                self.cond.wait_for(lambda: bool(self.items), timeout)
            items, self.items, self.frames = self.items, [], 0
            return items


def landmark_stream(frames: Iterator[tuple[int, np.ndarray]], make_detector: Callable[[], Callable],
                    workers: int = 2, queue_size: int = 4, live: bool = False,
                    dropped: list[tuple[int, str]] | None = None) -> Iterator[Detected]:
    """Frames (frame_id, RGB) -> Detected frames IN ORDER, landmarks found by ``workers`` threads (each with its own
    detector from ``make_detector``) behind bounded queues of ``queue_size`` frames.  An error in any thread is raised
    here; closing the generator stops the threads.

    File mode (``live`` False, a throughput measure): every frame is kept; frame n goes to worker n mod workers; a
    slow consumer holds the reader back (the queues are bounded).

    Live mode (a camera, or a file paced at its frame rate): stale frames are dropped, not queued.  The reader never
    waits: a frame that no detector has taken when the next one is read is dropped ("reader"); a detected frame that
    the consumer has not taken when ``queue_size`` newer ones are detected is dropped, and when the consumer asks for
    the next frame it gets the newest detected one, the older ones dropped ("landmarks").  So what the consumer gets is
    at most one detection old however long it was busy (a calibration of seconds included), and the frames it gets
    come in read order, numbered 0, 1, 2, ... (``Detected.index``: the position among the frames that go on).
    ``dropped`` (a list) receives (frame_id, stage) of every dropped frame."""
    if workers < 1 or queue_size < 1:
        raise ValueError(f"landmark_stream: workers and queue_size must be >= 1, got {workers}, {queue_size}")
    stop = threading.Event()
    drops = dropped if dropped is not None else []
    if live:  # one slot in front of the detectors (the newest frame waits there), a drop-oldest box behind them
        inboxes: list[Any] = [_Mailbox(1)]
        outbox: Any = _Mailbox(queue_size)
    else:
        inboxes = [queue.Queue(maxsize=queue_size) for _ in range(workers)]
        outbox = queue.Queue(maxsize=queue_size * workers)

    def send(item: Any) -> bool:
        """Into the outbox: a live frame pushes the oldest waiting one out (dropped); file mode blocks."""
        if live:
            pushed = outbox.put(item)
            if pushed is not None:
                drops.append((pushed.frame_id, "landmarks"))
            return True
        return _put(outbox, item, stop)

    def reader() -> None:
        try:
            for n, (fid, rgb) in enumerate(frames):
                if stop.is_set():
                    return
                if live:  # index -1 until a detector takes it (_Mailbox.take numbers the frames that go on)
                    pushed = inboxes[0].put(Detected(-1, int(fid), rgb, time.perf_counter()))
                    if pushed is not None:
                        drops.append((pushed.frame_id, "reader"))
                elif not _put(inboxes[n % workers], Detected(n, int(fid), rgb, time.perf_counter()), stop):
                    return
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            send(exc)
        finally:
            if live:
                inboxes[0].put(STOP)  # the worker that takes it puts it back for the others
            else:
                for q in inboxes:
                    _put(q, STOP, stop)

    def worker(k: int) -> None:
        detect = None
        try:
            detect = make_detector()
            while not stop.is_set():
                if live:
                    item = inboxes[0].take(0.05, number=True)
                    if item is None:
                        continue
                    if item is STOP:
                        inboxes[0].put(STOP)  # left for the other workers
                        break
                else:
                    try:
                        item = inboxes[k].get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if item is STOP:
                        break
                t = time.perf_counter()
                item.points, item.irises = detect(item.rgb, f"frame {item.frame_id}")
                item.t_detected = time.perf_counter()
                item.landmark_s = item.t_detected - t
                if not send(item):
                    return
        except BaseException as exc:  # noqa: BLE001
            send(exc)
        finally:
            if detect is not None and hasattr(detect, "close"):
                detect.close()
            send(STOP)

    threads = [threading.Thread(target=reader, name="stream-reader", daemon=True)]
    threads += [threading.Thread(target=worker, args=(k,), name=f"stream-landmarks-{k}", daemon=True)
                for k in range(workers)]
    for t in threads:
        t.start()
    pending: dict[int, Detected] = {}  # arrived out of order (bounded by the frames in flight)
    nxt, done, yielded = 0, 0, 0
    try:
        if live:
            while True:
                items = outbox.take_all(0.05 if done < workers else 0.0)
                for item in items:
                    if item is STOP:
                        done += 1
                    elif isinstance(item, BaseException):
                        raise item
                    elif item.index < nxt:  # a slower worker's older frame: a newer one went on already
                        drops.append((item.frame_id, "landmarks"))
                    else:
                        pending[item.index] = item
                if pending:  # the newest detected frame wins
                    newest = max(pending)
                    for k in sorted(pending)[:-1]:
                        drops.append((pending.pop(k).frame_id, "landmarks"))
                    nxt = newest + 1
                    item = pending.pop(newest)
                    item.index = yielded  # its position among the frames that go on
                    yielded += 1
                    yield item
                elif done == workers and not items:
                    break
            return
        while done < workers or pending:
            while nxt in pending:
                yield pending.pop(nxt)
                nxt += 1
            if done == workers:
                if pending:  # a gap that will never fill (cannot happen unless a worker dropped a frame)
                    raise RuntimeError(f"landmark_stream: frame {nxt} never arrived (have {sorted(pending)[:5]})")
                break
            item = outbox.get()
            if item is STOP:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                pending[item.index] = item
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5.0)


def percentiles(x: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / max / mean of ``x`` (NaN when empty)."""
    if not x:
        return {k: float("nan") for k in ("p50", "p90", "p99", "max", "mean")}
    a = np.asarray(x, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


class VideoStreamWriter:
    """An MP4 written frame by frame (OpenCV, mp4v) into a temporary file beside ``path``, moved onto ``path`` by
    :meth:`close` (atomic: a crash never leaves a truncated animation.mp4 in its place)."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.fps, self.writer, self.size, self.frames = float(fps), None, None, 0

    def write(self, rgb: np.ndarray) -> None:
        import cv2

        h, w = rgb.shape[:2]
        if self.writer is None:
            self.size = (w - w % 2, h - h % 2)  # even sizes for players
            self.writer = cv2.VideoWriter(str(self.tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise OSError(f"OpenCV could not open a video writer for {self.tmp}")
        if (w - w % 2, h - h % 2) != self.size:
            raise ValueError(f"all video frames must be {self.size[0]}x{self.size[1]}, got {w}x{h}")
        self.writer.write(cv2.cvtColor(np.ascontiguousarray(rgb[:self.size[1], :self.size[0]]), cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self, keep: bool = True) -> Path | None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        if keep and self.frames and self.tmp.is_file():
            self.tmp.replace(self.path)
            return self.path
        self.tmp.unlink(missing_ok=True)
        return None


def animate_stream(cfg: Any, model: Any = None, make_detector: Callable[[], Callable] | None = None) -> dict:
    """animate.py --stream: drive one identity (utils/apps/animate/pipeline.py AnimationConfig) by a video file or
    camera frame by frame (see the module docstring); writes animation.mp4, motion.npz and animation.json into
    ``cfg.out`` and returns the summary (with ``stream``: latency distribution, sustained fps, stage times).
    ``make_detector`` replaces mediapipe (tests)."""

    if cfg.side_by_side not in ("none", "video"):
        raise ValueError(f"--stream supports --side_by_side none or video, got {cfg.side_by_side!r}")
    if cfg.evaluate:
        raise ValueError("--evaluate needs a subject's sequence (batch mode), not --stream")
    if cfg.pose == "relative" and cfg.reference_frame != 0:
        raise ValueError("--stream: the reference of --pose relative is the first frame with a face; "
                         f"--reference_frame must be 0, got {cfg.reference_frame}")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    threads_before, blas_before = torch.get_num_threads(), None
    if cfg.stream_threads > 0:  # the per-frame tensors are tiny: more threads mostly add wake-ups (and compete with
        torch.set_num_threads(cfg.stream_threads)  # the landmark threads); restored at the end
        # NumPy's / SciPy's OpenBLAS as well: the per-frame fit's NumPy products (utils/core/blas.py)
        blas_before = set_blas_threads(cfg.stream_threads)
    try:
        return _animate_stream(cfg, model, make_detector, times, t0)
    finally:
        torch.set_num_threads(threads_before)
        restore_blas_threads(blas_before)


def _animate_stream(cfg: Any, model: Any, make_detector: Callable[[], Callable] | None, times: dict[str, float],
                    t0: float) -> dict:
    """animate_stream's body (run with the stream's torch thread count)."""
    device = resolve_device(cfg.device)
    fit_device = device if cfg.stream_fit_device == "auto" else resolve_device(cfg.stream_fit_device)
    source = FrameSource(cfg.motion, cfg.start, cfg.stride, cfg.max_frames, cfg.stream_realtime)
    remote: TrackerProcess | None = None  # --stream_fit_process: the fit's worker process
    gc_log = GcLog()  # this process's garbage collections while streaming (they stop every thread)
    try:
        if model is None:
            model = load_model(cfg.checkpoint, device)
        flame_dir = model_flame_dir(model, cfg.flame_dir)
        flame = load_flame(model, flame_dir)

        animator = HeadAnimator(model.field, flame, model.mask_ids, model.plan)
        fit_flame = flame if fit_device == flame.v_template.device else copy.deepcopy(flame).to(fit_device)
        name = cfg.identity or model.identities[0]
        head = posable(animator, model, name, device)[0] if not cfg.identity_b else mixed_identity(
            animator, model, identity_key(animator, model, name, device),
            identity_key(animator, model, cfg.identity_b, device), cfg.mix, cfg.method)
        M = len(model.mask_ids)
        with torch.no_grad():
            cam = base_camera(cfg, model.template_base, animator.vertices(head, head.base)[0, :M], device)
        pose_graph = animator.graphed(head, num_frames=1)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for sub, pattern in (("frames", "frame_*.png"), ("ply", "frame_*.ply")):
            for old in (out / sub).glob(pattern):
                old.unlink()
        writer = VideoStreamWriter(out / "animation.mp4", source.fps)
        if cfg.stream_fit_process:  # the fit in its own process (no GIL shared with the landmark / render threads)
            remote = TrackerProcess(fit_flame, cfg.stream_threads, fit_device)
        synchronize(device)
        times["setup"] = time.perf_counter() - t0
        if make_detector is None:
            mediapipe_detector(cfg.reenact.min_face_px).close()  # fail here, with the install hint, not in a thread
            make_detector = lambda: mediapipe_detector(cfg.reenact.min_face_px)  # noqa: E731

        # ---- the render stage (its own thread): in-order (index, Detected, params or None) -> encoded frame
        render_q: queue.Queue = queue.Queue(maxsize=cfg.stream_queue)
        stop = threading.Event()
        records: list[dict] = []
        failure: list[BaseException] = []
        state: dict[str, Any] = {}

        def render(motion: FlameParams | None, reference: FlameParams | None) -> tuple[FlameParams, Any, np.ndarray]:
            """The driven head of one frame: (its parameters on the identity, its Gaussians, (H, W, 3) uint8)."""
            if motion is None:  # before the first face: the identity as it is
                params = head.base
            elif cfg.pose == "relative":  # (the driver's shape does not drive: the reference's is put on)
                pair = FlameParams.cat([reference, replace(motion, shape=reference.shape)]).to(device)
                params = retarget(pair, head.base, "relative", 0).frame(1)
            else:
                params = retarget(motion.to(device), head.base, cfg.pose, 0)
            with torch.no_grad():
                cloud = pose_graph(params)
                img = render_identities(cloud, [[cam]], backend=cfg.backend, depth=False)["image"][0, 0].clamp(0, 1)
                return params, cloud, to_uint8(img)

        # one frame rendered (not written) before the stream starts: the rasteriser's and retarget's first calls
        # (kernel loads, allocator growth) are not the first frame's latency -- in live mode the calibration frames
        # are dropped, so the first rendered frame is a steady one (t-tail_cpu_2026-12-07h.md)
        t = time.perf_counter()
        neutral = FlameParams.neutral(1)  # (through the motion's own path: retarget, --pose relative's pair)
        render(neutral, neutral)
        synchronize(device)
        times["warm_up_render"] = time.perf_counter() - t

        def render_loop() -> None:
            try:
                while True:
                    item = render_q.get()
                    if item is STOP:
                        return
                    det, rec, motion, reference = item
                    t = time.perf_counter()
                    rec["t_render"] = t
                    params, cloud, frame = render(motion, reference)
                    if cfg.side_by_side == "video":
                        frame = np.concatenate([frame, fit_height(det.rgb, cam.height)], axis=1)
                    t_render = time.perf_counter() - t
                    n_out = writer.frames  # the frame's position in the video (= in motion.npz)
                    writer.write(frame)
                    if cfg.png:
                        save_image(out / "frames" / f"frame_{n_out:05d}.png", frame)
                    if cfg.ply:
                        cloud[0].save_ply(out / "ply" / f"frame_{n_out:05d}.ply")
                    t_done = time.perf_counter()
                    rec.update(render_s=t_render, write_s=t_done - t - t_render, t_done=t_done,
                               latency_s=t_done - det.t_read)
                    state.setdefault("motion", []).append(params.to("cpu"))
                    state.setdefault("frame_ids", []).append(det.frame_id)  # what the video and motion.npz hold
            except BaseException as exc:  # noqa: BLE001  (raised again by the fit thread)
                failure.append(exc)
                stop.set()

        renderer = threading.Thread(target=render_loop, name="stream-render", daemon=True)
        renderer.start()

        def send(det: Detected, rec: dict, motion: FlameParams | None, reference: FlameParams | None) -> None:
            if failure:
                raise failure[0]
            if not _put(render_q, (det, rec, motion, reference), stop):
                raise failure[0] if failure else RuntimeError("render stage stopped")

        # ---- the fit stage (this thread)
        tracker: FrameTracker | TrackerProcess | None = None
        calib: list[Detected] = []  # frames held until the person is calibrated
        calib_info: dict = {}
        live = source.live  # a camera or a paced file: stale frames are dropped (landmark_stream), not queued
        dropped: list[tuple[int, str]] = []  # (frame_id, stage) of every dropped frame
        errors: list[float] = []
        with_face = 0
        size: tuple[int, int] | None = None

        def track(det: Detected, rec: dict, calibrating: bool) -> None:
            nonlocal with_face
            t, c = time.perf_counter(), time.thread_time()
            rec["t_fit"] = t
            params, err = (None, float("nan"))
            if det.points is not None or tracker.started:
                params, err = tracker.step(det.points, det.irises)
            # the fit's CPU time (this thread's, or the worker's): wall time well above it is time spent waiting
            # (for the GIL or a CPU core)
            cpu = tracker.step_cpu_s if isinstance(tracker, TrackerProcess) else time.thread_time() - c
            with_face += det.points is not None
            errors.append(err)
            rec.update(fit_s=time.perf_counter() - t, fit_cpu_s=cpu, calibration=calibrating,
                       events=list(tracker.events))
            # the reference of --pose relative: the first frame with a face, fitted again whenever the shape changes
            send(det, rec, params, tracker.reference)

        def track_held(held: list[tuple[Detected, dict]]) -> None:
            """The frames held for the calibration: tracked and rendered in file mode; in live mode they are stale
            by the calibration's time and dropped (the stream goes on with the newest frame)."""
            for d, rec in held:
                if live:
                    dropped.append((d.frame_id, "calibration"))
                    rec["dropped"] = True
                else:
                    track(d, rec, True)

        stream = landmark_stream(iter(source), make_detector, cfg.stream_workers, cfg.stream_queue, live=live,
                                 dropped=dropped)
        gc_log.start()
        t_start = time.perf_counter()
        try:
            for det in stream:
                rec = {"index": det.index, "frame_id": det.frame_id, "t_read": det.t_read,
                       "landmark_s": det.landmark_s, "t_detected": det.t_detected}
                records.append(rec)
                h, w = det.rgb.shape[:2]
                if size is None:
                    size = (w, h)
                elif size != (w, h):
                    raise ValueError(f"{source.name}: frame {det.frame_id} is {w}x{h}, the first was "
                                     f"{size[0]}x{size[1]}")
                if tracker is not None:
                    track(det, rec, False)
                    continue
                calib.append((det, rec))
                faces = [d for d, _ in calib if d.points is not None]
                if len(faces) >= cfg.reenact.shape_frames:
                    # (live: the stream goes on from a newer frame, whose fit starts from the last held one's)
                    tracker, calib_info = _calibrate(fit_flame, faces, size, cfg, remote, warm_first=live)
                    track_held(calib)
                    calib = []
            if tracker is None:  # the stream ended before shape_frames frames with a face
                faces = [d for d, _ in calib if d.points is not None]
                if not faces:
                    raise ValueError(f"no face in any frame of {source.name} (the detector needs a clearly visible, "
                                     f"roughly frontal face that fills a good part of the frame)")
                if live:  # the stream ended: nothing newer to go on with, so the held frames are the output
                    live = False
                tracker, calib_info = _calibrate(fit_flame, faces, size, cfg, remote)
                track_held(calib)
        except KeyboardInterrupt:  # a camera runs until interrupted: keep what was written
            warnings.warn("interrupted: the video holds the frames streamed so far")
        finally:
            stream.close()
            _put(render_q, STOP, stop)
            renderer.join()
            gc_log.stop()
        if failure:
            raise failure[0]
        synchronize(device)
        times["stream"] = time.perf_counter() - t_start
    except BaseException:
        if "writer" in locals():
            writer.close(keep=False)
        raise
    finally:
        source.close()
        gc_log.stop()
        if remote is not None:
            remote.close()
    video = writer.close()
    if video is None:
        raise ValueError(f"{source.name}: no frames to use (start {cfg.start}, stride {cfg.stride})")

    t0 = time.perf_counter()
    params = FlameParams.cat(state["motion"])
    motion_path = out / "motion.npz"
    frame_ids = state["frame_ids"]  # the frames the video and motion.npz hold (live mode: without the dropped ones)
    save_nersemble_tracking(motion_path, params, frames=np.asarray(frame_ids))
    times["write"] = time.perf_counter() - t0
    done = [r for r in records if "t_done" in r]
    steady = [r for r in done if not r.get("calibration", False)]
    lat_ms = lambda rs: percentiles([1000.0 * r["latency_s"] for r in rs])  # noqa: E731
    span = (steady[-1]["t_done"] - steady[0]["t_done"]) if len(steady) > 1 else 0.0
    stream_summary = {
        "frames": len(done), "calibration_frames": len(done) - len(steady), "workers": cfg.stream_workers,
        "queue": cfg.stream_queue, "fit_device": str(fit_device), "render_device": str(device),
        "fit_process": remote is not None,
        "realtime": bool(source.realtime), "camera": source.camera,
        # live mode (camera / --stream_realtime): stale frames dropped, not queued; never in file mode
        "live": source.live, "frames_read": len(done) + len(dropped), "dropped": len(dropped),
        "dropped_by_stage": {k: sum(st == k for _, st in dropped) for k in ("reader", "landmarks", "calibration")},
        "dropped_frame_ids": sorted(int(f) for f, _ in dropped),
        "latency_ms_steady": lat_ms(steady), "latency_ms_all": lat_ms(done),
        "sustained_fps": (len(steady) - 1) / span if span > 0 else float("nan"),
        "end_to_end_fps": len(done) / max(done[-1]["t_done"] - done[0]["t_read"], 1e-9),
        "stage_ms_mean": {k: 1000.0 * float(np.mean([r[k] for r in steady or done]))
                          for k in ("landmark_s", "fit_s", "render_s", "write_s")},
        # the fit stage per frame (FrameTracker.step, shape refinement included), frames after calibration
        "fit_ms_steady": percentiles([1000.0 * r["fit_s"] for r in steady]),
        # its CPU time (the fitting thread's, or the worker process's): the rest of fit_ms is waiting
        "fit_cpu_ms_steady": percentiles([1000.0 * r["fit_cpu_s"] for r in steady]),
        "calibration_s": calib_info.get("seconds", 0.0),
        "torch_threads": torch.get_num_threads(),
        "shape_updates": tracker.shape_updates if tracker is not None else 0,
        "shape_frames_kept": tracker.kept_frames if tracker is not None else 0,
        "shape_refine_s": tracker.refine_seconds if tracker is not None else 0.0,
        "gc_collections": len(gc_log.pauses), "gc_ms": 1000.0 * sum(b - a for a, b, _ in gc_log.pauses),
    }
    stream_summary["per_frame"] = per_frame_records(done, gc_log.pauses)
    stream_summary["slowest"] = sorted((r for r in stream_summary["per_frame"] if not r["calibration"]),
                                       key=lambda r: -r["latency_ms"])[:5]
    summary = {
        "identity": head.name, "identity_b": cfg.identity_b or None, "mix": cfg.mix if cfg.identity_b else None,
        "motion": source.name, "motion_kind": "camera" if source.camera else "video", "pose": cfg.pose,
        "num_frames": len(done), "frame_ids": [int(i) for i in frame_ids], "fps": source.fps,
        "width": int(writer.size[0]), "height": int(writer.size[1]), "side_by_side": cfg.side_by_side,
        "video": str(video), "motion_npz": str(motion_path), "num_gaussians": int(model.field.num_gaussians),
        "flame_dir": str(flame_dir), "device": str(device), "seconds": sum(times.values()),
        "seconds_per_phase": times, "render_fps": stream_summary["end_to_end_fps"],
        "motion_info": {"focal_px": calib_info.get("focal_px"), "frames_with_face": with_face, "frames": len(done),
                        "detector_offset_rms_px": calib_info.get("detector_offset_rms_px"),
                        "landmark_error_px": [None if math.isnan(e) else e for e in errors]},
        "stream": stream_summary,
    }
    atomic_write_json(summary, out / "animation.json")
    return summary


class GcLog:
    """The Python garbage collections of this process between :meth:`start` and :meth:`stop`, as ``pauses``:
    (perf_counter start, end, generation) -- a collection holds the GIL, so every thread of the stream waits."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._t0 = 0.0
        self._on = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((self._t0, time.perf_counter(), int(info.get("generation", -1))))

    def start(self) -> None:
        if not self._on:
            gc.callbacks.append(self._callback)
            self._on = True

    def stop(self) -> None:
        if self._on:
            gc.callbacks.remove(self._callback)
            self._on = False


def per_frame_records(done: list[dict], gc_pauses: list[tuple[float, float, int]] = ()) -> list[dict]:
    """animation.json's ``stream.per_frame``: per frame written (in video order), where its latency went, in ms --
    ``latency_ms`` (read to encoded), ``landmark_ms`` (the detector), ``wait_landmark_ms`` (read to the detector's
    start: the queue in front of it), ``wait_fit_ms`` (detected to the fit's start: the fit busy with earlier frames
    or the calibration), ``fit_ms`` / ``fit_cpu_ms``, ``wait_render_ms`` (fitted to the render's start), ``render_ms``,
    ``write_ms``, ``gc_ms`` (this process's garbage collections during the frame's life), ``events`` (the tracker's:
    "cold" / "warm_start" first fit, "wide" stage, "solve_start", "solving", "swap", "blend"; utils/face/
    frame_tracker.py FrameTracker.events), ``calibration`` (a frame held for the calibration), ``t_ms`` (read time
    from the first frame's read)."""

    if not done:
        return []
    t0 = min(r["t_read"] for r in done)
    ms = lambda x: round(1000.0 * x, 2)  # noqa: E731
    out = []
    for r in done:
        t_lm = r["t_detected"] - r["landmark_s"] if r.get("t_detected") else r["t_read"]
        t_fit, t_render = r.get("t_fit", t_lm), r.get("t_render", r["t_done"])
        gc_s = sum(max(0.0, min(b, r["t_done"]) - max(a, r["t_read"])) for a, b, _ in gc_pauses)
        out.append({"frame_id": int(r["frame_id"]), "t_ms": ms(r["t_read"] - t0), "latency_ms": ms(r["latency_s"]),
                    "wait_landmark_ms": ms(t_lm - r["t_read"]), "landmark_ms": ms(r["landmark_s"]),
                    "wait_fit_ms": ms(t_fit - r.get("t_detected", t_lm)), "fit_ms": ms(r.get("fit_s", 0.0)),
                    "fit_cpu_ms": ms(r.get("fit_cpu_s", 0.0)),
                    "wait_render_ms": ms(t_render - t_fit - r.get("fit_s", 0.0)), "render_ms": ms(r["render_s"]),
                    "write_ms": ms(r["write_s"]), "gc_ms": ms(gc_s), "events": list(r.get("events", [])),
                    "calibration": bool(r.get("calibration", False))})
    return out


def _calibrate(flame: Any, faces: list[Detected], size: tuple[int, int], cfg: Any,
               remote: TrackerProcess | None = None, warm_first: bool = False
               ) -> tuple[FrameTracker | TrackerProcess, dict]:
    """FrameTracker.calibrate on the held frames with a face (irises only when every one has them), in ``remote``'s
    worker process when given (which then is the tracker); ``warm_first``: the first tracked frame warm-started from
    the last held one (live mode)."""

    pts = torch.stack([d.points for d in faces])
    iris = torch.stack([d.irises for d in faces]) if all(d.irises is not None for d in faces) else None
    if remote is not None:
        return remote, remote.calibrate(pts, iris, size, cfg.reenact.flame_fit, cfg.reenact.bias_correction,
                                        cfg.stream_iterations, cfg.stream_refine, calibration_threads(cfg),
                                        warm_first)
    return FrameTracker.calibrate(flame, pts, iris, size, cfg.reenact.flame_fit, cfg.reenact.bias_correction,
                                  cfg.stream_iterations, cfg.stream_refine, calibration_threads(cfg), warm_first)


def calibration_threads(cfg: Any) -> int:
    """Torch threads of the stream's calibration solve: ``stream_calibration_threads``, or with 0 the machine's cores
    up to 8."""
    if cfg.stream_calibration_threads > 0:
        return int(cfg.stream_calibration_threads)
    return max(1, min(8, os.cpu_count() or 1))


def format_summary(s: dict) -> str:
    """The lines animate.py prints at the end of a stream."""
    st = s["stream"]
    a, b = st["latency_ms_steady"], st["latency_ms_all"]
    sm = st["stage_ms_mean"]
    dr = st["dropped_by_stage"]
    return (f"streamed {st['frames']} frames ({st['calibration_frames']} held for calibration, "
            f"{st['calibration_s']:.2f} s), {st['workers']} landmark workers, fit on {st['fit_device']}"
            f"{' (own process)' if st['fit_process'] else ''}, "
            f"render on {st['render_device']}{', paced at the source rate' if st['realtime'] else ''}\n"
            f"  sustained {st['sustained_fps']:.1f} frames/s (end to end {st['end_to_end_fps']:.1f} frames/s)\n"
            + (f"  live: dropped {st['dropped']} of {st['frames_read']} frames read (stale when the stream was behind: "
               f"{dr['reader']} before detection, {dr['landmarks']} after, {dr['calibration']} held for the "
               f"calibration); the video and motion.npz hold the {st['frames']} others\n" if st["live"] else "")
            + f"  latency ms after calibration: p50 {a['p50']:.1f}  p90 {a['p90']:.1f}  p99 {a['p99']:.1f}  "
            f"max {a['max']:.1f}; all frames: p50 {b['p50']:.1f}  p90 {b['p90']:.1f}  p99 {b['p99']:.1f}\n"
            f"  stage ms (mean): landmarks {sm['landmark_s']:.1f}  fit {sm['fit_s']:.1f}  "
            f"render {sm['render_s']:.1f}  write {sm['write_s']:.1f}\n"
            f"  fit ms after calibration: p50 {st['fit_ms_steady']['p50']:.1f}  p90 {st['fit_ms_steady']['p90']:.1f}  "
            f"p99 {st['fit_ms_steady']['p99']:.1f}, of it CPU p50 {st['fit_cpu_ms_steady']['p50']:.1f} "
            f"(torch threads {st['torch_threads']}; shape refined "
            f"{st['shape_updates']} times on {st['shape_frames_kept']} kept frames, {st['shape_refine_s']:.2f} s)"
            + ("\n  slowest after calibration (animation.json stream.per_frame): " + ", ".join(
                f"frame {r['frame_id']} {r['latency_ms']:.0f} ms (wait {r['wait_fit_ms']:.0f}, fit {r['fit_ms']:.0f}, "
                f"render {r['render_ms']:.0f}{', gc ' + format(r['gc_ms'], '.0f') if r['gc_ms'] >= 1 else ''}"
                f"{'; ' + '+'.join(r['events']) if r['events'] else ''})" for r in st.get("slowest", [])[:3])
               if st.get("slowest") else ""))

