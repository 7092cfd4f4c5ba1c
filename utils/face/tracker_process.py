"""The streaming FLAME tracker (utils/face/frame_tracker.py ``FrameTracker``) in a worker process
(``animate.py --stream --stream_fit_process``).

Why: live driving runs the landmark detector (mediapipe), the per-frame fit and the render as Python threads of one
process.  The fit is thousands of tiny torch calls per frame; each gives up the GIL and has to take it back, and while
the detector or the render thread holds it the fit waits (CPython hands the GIL over after up to its 5 ms switch
interval).  In its own process the fit never waits for the GIL of the other stages; the calling thread only sends the
frame's 68 points and waits on a pipe (which releases the GIL).

The worker runs the very same ``FrameTracker`` code on the same inputs with the same torch thread count, so its
results are bit-identical to the in-process tracker's (tests/test_streaming.py).  Tensors cross the pipe as numpy
arrays (pickled bytes: a frame's points and parameters are a few kB; torch's shared-memory tensor passing would cost a
file descriptor per tensor).
"""
from __future__ import annotations

import copy
import io
import multiprocessing as mp
import signal
import time
import traceback
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.flame import FlameModel, FlameParams
from utils.core.blas import set_blas_threads
from utils.face.flame_fit import FlameFitConfig
from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig


def _pack(x: Tensor | None) -> np.ndarray | None:
    """A CPU tensor as a numpy array (exact: same dtype and bytes)."""
    return None if x is None else x.detach().to("cpu").numpy()


def _unpack(x: np.ndarray | None) -> Tensor | None:
    return None if x is None else torch.from_numpy(x)


def pack_params(p: FlameParams | None) -> tuple | None:
    """FlameParams -> (numpy arrays of its tensors in ``FlameParams._TENSORS`` order, rotate_about_root)."""
    if p is None:
        return None
    return tuple(_pack(getattr(p, n)) for n in FlameParams._TENSORS), bool(p.rotate_about_root)


def unpack_params(packed: tuple | None) -> FlameParams | None:
    """Inverse of :func:`pack_params` (CPU tensors)."""
    if packed is None:
        return None
    arrays, about_root = packed
    return FlameParams(**{n: torch.from_numpy(a) for n, a in zip(FlameParams._TENSORS, arrays)},
                       rotate_about_root=about_root)


def _state(tracker: FrameTracker, sent_reference: list) -> dict:
    """What the parent mirrors after every call; the reference parameters only when they changed (a shape swap)."""
    ref = tracker.reference
    state = {"started": tracker.started, "shape_updates": tracker.shape_updates, "kept_frames": len(tracker.kept),
             "refine_seconds": tracker.refine_seconds, "events": list(tracker.events)}
    if ref is not sent_reference[0]:
        sent_reference[0] = ref
        state["reference"] = pack_params(ref)
    return state


def _serve(conn: Any, flame_bytes: bytes, threads: int, device: str) -> None:
    """The worker: loads the FLAME model, then answers calibrate / step / close messages until closed."""
    # Ctrl-C reaches the whole process group: the parent handles it (a camera stream ends that way) and closes us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads > 0:
        torch.set_num_threads(threads)
        set_blas_threads(threads)  # the fit's NumPy products too (utils/core/blas.py: OpenBLAS takes every core)
    flame: FlameModel = torch.load(io.BytesIO(flame_bytes), weights_only=False).to(device)
    tracker: FrameTracker | None = None
    sent_reference: list = [None]
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        op = msg[0]
        try:
            if op == "close":
                if tracker is not None:  # a background shape re-solve still running
                    tracker.close()
                conn.send(("ok", None))
                return
            if op == "calibrate":
                _, points, irises, size, cfg, bias_correction, iterations, refine, calib_threads, warm = msg
                tracker, info = FrameTracker.calibrate(flame, _unpack(points), _unpack(irises), size, cfg,
                                                       bias_correction, iterations, refine, calib_threads, warm)
                conn.send(("ok", (info, _state(tracker, sent_reference))))
            elif op == "step":
                c = time.thread_time()
                params, err = tracker.step(_unpack(msg[1]), _unpack(msg[2]))
                state = _state(tracker, sent_reference)
                state["step_cpu_s"] = time.thread_time() - c
                conn.send(("ok", (pack_params(params), err, state)))
            else:
                raise ValueError(f"tracker process: unknown message {op!r}")
        except BaseException as exc:  # noqa: BLE001  (handed to the parent, which raises it)
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class TrackerProcess:
    """A :class:`FrameTracker` that runs in a worker process, with the attributes the stream reads mirrored here.

    Usage: ``TrackerProcess(flame, threads)`` (starts the worker, loads FLAME there: do it before the stream starts),
    then :meth:`calibrate` once and :meth:`step` per frame, exactly as ``FrameTracker.calibrate`` / ``step``;
    :meth:`close` (or the context manager) ends the worker.

    Args:
        flame: the FLAME model the tracker fits (sent once; the worker moves it to ``device``).
        threads: torch intra-op threads of the worker (0: torch's default).
        device: the fit's device in the worker ("cpu", "cuda:0", ...).

    Attributes (after each call): ``started`` (a frame with a face was tracked), ``reference`` (FlameParams, 1 frame,
    CPU, or None), ``shape_updates``, ``kept_frames``, ``refine_seconds``, ``events`` as FrameTracker's;
    ``step_cpu_s`` the worker thread's CPU time of the last step (against the round trip's wall time: what waiting
    costs).
    """

    def __init__(self, flame: FlameModel, threads: int = 1, device: str | torch.device = "cpu") -> None:
        buf = io.BytesIO()
        # (a copy: Module.to moves the caller's model in place)
        torch.save(copy.deepcopy(flame).to("cpu") if flame.v_template.device.type != "cpu" else flame, buf)
        # spawn, not fork: the parent already runs threads (mediapipe, torch), which fork would copy mid-state
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(child, buf.getvalue(), int(threads), str(device)),
                                   name="stream-fit", daemon=True)
        self.process.start()
        child.close()
        self.started = False
        self.reference: FlameParams | None = None
        self.shape_updates = 0
        self.kept_frames = 0
        self.refine_seconds = 0.0
        self.step_cpu_s = 0.0  # the worker's CPU time (its thread) of the last step
        self.events: list[str] = []
        self._call(None)  # wait for "ready" (FLAME loaded): startup is not a frame's latency

    def _call(self, msg: tuple | None) -> Any:
        if msg is not None:
            self.conn.send(msg)
        try:
            kind, payload = self.conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"the stream's fit process ended unexpectedly (exit code {self.process.exitcode})"
                               ) from exc
        if kind == "error":
            raise RuntimeError(f"in the stream's fit process: {payload}")
        return payload

    def _mirror(self, state: dict) -> None:
        self.started = state["started"]
        self.shape_updates = state["shape_updates"]
        self.kept_frames = state["kept_frames"]
        self.refine_seconds = state["refine_seconds"]
        self.step_cpu_s = state.get("step_cpu_s", 0.0)
        self.events = state.get("events", [])
        if "reference" in state:
            self.reference = unpack_params(state["reference"])

    def calibrate(self, points: Tensor, irises: Tensor | None, image_size: tuple[int, int],
                  cfg: FlameFitConfig | None = None, bias_correction: bool = True, iterations: int = 0,
                  refine: ShapeRefineConfig | None = None, threads: int = 0, warm_first: bool = False) -> dict:
        """FrameTracker.calibrate in the worker (points (N, 68, 2), irises (N, 2, 2) or None; ``threads`` its
        torch threads for the solve; ``warm_first`` as there); returns its info."""
        info, state = self._call(("calibrate", _pack(points), _pack(irises), tuple(image_size), cfg,
                                  bias_correction, iterations, refine, int(threads), bool(warm_first)))
        self._mirror(state)
        return info

    def step(self, points: Tensor | None, irises: Tensor | None = None) -> tuple[FlameParams, float]:
        """FrameTracker.step in the worker: points (68, 2) or None, irises (2, 2) or None -> (FlameParams, error)."""
        params, err, state = self._call(("step", _pack(points), _pack(irises)))
        self._mirror(state)
        return unpack_params(params), err

    def close(self) -> None:
        """End the worker (waits for it briefly, then terminates it)."""
        if self.process.is_alive():
            try:
                self.conn.send(("close",))
                self.conn.recv()
            except (EOFError, BrokenPipeError, OSError):
                pass
            self.process.join(timeout=5.0)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(timeout=5.0)
        self.conn.close()

    def __enter__(self) -> "TrackerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
