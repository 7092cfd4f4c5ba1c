"""utils/face/frame_tracker.py: the stream's shape re-solved on pose-diverse kept frames as they arrive (issue 24),
in a background thread that no frame waits for, only when the kept frames show a new head pitch / yaw, with the
reference frame's jaw and expression kept across a shape swap.  The older refinement modes (iterations inside each
frame, blending, span gate) are tested in tests/test_flame_fit.py."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.fixtures import synthetic_root  # noqa: F401
from tests.test_fitting import single_thread
from tests.test_flame_fit import SIZE, _case, flame_and_truth  # noqa: F401

# the calibration as before 2026-12-07 (no joint detector offset, no re-solves): what the calibration tests compare
_PLAIN = dict(calibration_offset_px=0.0)
# (yaw, pitch) degrees per frame: frontal frames, a turn, a nod, then turned the other way
KEYS = [(0.0, 0.0)] * 5 + [(y, 0.0) for y in (8.0, 16.0, 24.0, 16.0, 8.0)] + [(0.0, p) for p in (6.0, 12.0, 6.0)] \
    + [(-10.0, 4.0)] * 5


def _points(flame, truth, keys, seed: int) -> torch.Tensor:
    """(T, 68, 2) landmarks (1 px noise) of ``truth``'s identity, neutral, turned by each (yaw, pitch) of ``keys``."""
    rng = np.random.default_rng(seed)
    neutral = replace(truth, expression=torch.zeros(1, 100), jaw=torch.zeros(1, 3))
    return torch.cat([_case(flame, neutral, y, p, 1.0, rng)[2] for y, p in keys])


def _tracker(flame, truth, refine):
    """A tracker started from FLAME's mean shape: what a calibration on frontal frames with a tight shape prior
    (ShapeRefineConfig.calibration_shape_std) leaves, far from the identity's depth."""
    from utils.face.flame_fit import FlameFitConfig, default_focal
    from utils.face.frame_tracker import FrameTracker

    cfg = FlameFitConfig(iterations=20)
    return FrameTracker(flame, SIZE, torch.zeros_like(truth.shape), default_focal(SIZE, cfg), cfg, iterations=8,
                        refine=refine)


def test_shape_is_re_solved_on_new_views_and_moves_towards_the_truth(flame_and_truth):  # noqa: F811
    """Frontal frames give no re-solve (no new view: the shape stays exactly the start); the turned and nodding
    frames that follow do, and the swapped-in shape is nearer the truth; the reference frame, shown again at the end,
    reads the same jaw and expression as when it was first tracked (``jaw_continuity`` / ``continuity``), where
    without the jaw's re-anchoring it reads the new shape's different jaw."""
    from utils.face.frame_tracker import ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, KEYS + [(0.0, 0.0)] * 3, 0)
    pts[-3:] = pts[0]  # the reference frame again
    refine = ShapeRefineConfig(frames=8, iterations=6, delay_frames=2, wait=True, new_view=0.1, max_updates=0,
                               blend_frames=0)

    def stream(cfg):
        tracker = _tracker(flame, truth, cfg)
        shapes, out = [], []
        for t in range(pts.shape[0]):
            out.append(tracker.step(pts[t])[0])
            shapes.append(tracker.shape.clone())
        tracker.close()
        return torch.cat(shapes), out, tracker

    with single_thread():
        shapes, out, tracker = stream(refine)
        _, out_nojaw, t_nojaw = stream(replace(refine, jaw_continuity=False))
    err0 = float(truth.shape.norm())
    err = float((shapes[-1] - truth.shape[0]).norm())
    first_change = int(((shapes - shapes[:1]).norm(dim=1) > 0).nonzero()[0])
    jaw_back = float((out[-1].jaw[0, 0] - out[0].jaw[0, 0]).abs())
    jaw_back_nojaw = float((out_nojaw[-1].jaw[0, 0] - out_nojaw[0].jaw[0, 0]).abs())
    print(f"updates {tracker.shape_updates}, first shape change at frame {first_change}, shape error {err0:.2f} -> "
          f"{err:.2f}; reference frame's jaw again: {jaw_back:.4f} (without jaw_continuity {jaw_back_nojaw:.4f}), "
          f"jaw offset {tracker.jaw_offset}")
    assert tracker.shape_updates >= 1 and t_nojaw.shape_updates == tracker.shape_updates
    # frame 5 (8 deg yaw) is the first new view: kept after its fit, the solve starts at frame 6's step and is swapped
    # in delay_frames frames later; before, the shape is exactly the start
    assert first_change >= 6 + refine.delay_frames, first_change
    assert err < 0.8 * err0, (err0, err)
    assert jaw_back < 0.5 * jaw_back_nojaw, (jaw_back, jaw_back_nojaw)
    e_back = float((out[-1].expression[0, :10] - out[0].expression[0, :10]).norm())
    assert e_back < 0.5, e_back


def test_max_updates_limits_the_re_solves_and_stops_keeping_frames(flame_and_truth):  # noqa: F811
    """ShapeRefineConfig.max_updates (the default 1): the turn, the nod and the other turn of KEYS start several
    re-solves without a limit; with max_updates 1 exactly one starts and is swapped in, and once it started the
    kept frames no longer change (no later solve can use them: the per-frame keeping work stops too)."""
    from utils.face.frame_tracker import ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, KEYS, 6)
    base = dict(frames=8, iterations=4, delay_frames=2, wait=True, new_view=0.1)
    runs = {}
    with single_thread():
        for limit in (0, 1):
            tracker = _tracker(flame, truth, ShapeRefineConfig(**base, max_updates=limit))
            kept_after = []
            for t in range(pts.shape[0]):
                tracker.step(pts[t])
                if tracker.solves_started:
                    kept_after.append([k.index for k in tracker.kept])
            tracker.close()
            runs[limit] = (tracker.solves_started, tracker.shape_updates, kept_after)
    print(f"re-solves started / swapped: unlimited {runs[0][:2]}, max_updates 1 {runs[1][:2]}")
    assert ShapeRefineConfig().max_updates == 1
    assert runs[0][0] >= 2 and runs[0][1] >= 2, runs[0][:2]
    assert runs[1][0] == 1 and runs[1][1] == 1, runs[1][:2]
    assert all(k == runs[1][2][0] for k in runs[1][2])  # the kept frames frozen once the one solve started


def test_background_re_solve_never_holds_a_frame_unless_told_to_wait(flame_and_truth, monkeypatch):  # noqa: F811
    """With ``background`` the re-solve runs in its own thread: while it is not done, frames past ``delay_frames``
    are tracked without waiting and without a swap; the first frame after it finished swaps its shape in.  With
    ``wait`` the frame ``delay_frames`` after the start waits for it (the same output on any machine)."""
    import utils.face.frame_tracker as ft
    from utils.face.frame_tracker import ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, KEYS, 1)
    release = threading.Event()

    class HeldSolve(ft.ShapeRefinement):
        def advance(self, iterations: int = 1) -> bool:
            release.wait(10.0)  # the test says when the solve may run
            return super().advance(iterations)

    monkeypatch.setattr(ft, "ShapeRefinement", HeldSolve)
    refine = ShapeRefineConfig(frames=8, iterations=3, delay_frames=2, new_view=0.1)
    with single_thread():
        tracker = _tracker(flame, truth, refine)
        t = 0
        while tracker.thread is None:  # frames until a new view starts a solve
            tracker.step(pts[t])
            t += 1
            assert t < 10, "no re-solve started on the turned frames"
        held = []
        for _ in range(refine.delay_frames + 2):  # past the delay: no wait, no swap
            t0 = time.perf_counter()
            tracker.step(pts[t])
            held.append(time.perf_counter() - t0)
            t += 1
        assert tracker.shape_updates == 0 and tracker.thread.is_alive()
        release.set()
        tracker.thread.join(10.0)
        tracker.step(pts[t])
        assert tracker.shape_updates == 1, "the finished solve was not swapped in"
        tracker.close()

        release.clear()
        waiting = _tracker(flame, truth, replace(refine, wait=True))
        t = 0
        while waiting.thread is None:
            waiting.step(pts[t])
            t += 1
        for _ in range(refine.delay_frames - 1):
            waiting.step(pts[t])
            t += 1
        threading.Timer(0.5, release.set).start()
        t0 = time.perf_counter()
        waiting.step(pts[t])  # delay_frames after the start: waits for the held solve
        waited = time.perf_counter() - t0
        waiting.close()
    print(f"frames past the delay while the solve was held: {[round(1000 * s) for s in held]} ms; wait: "
          f"{1000 * waited:.0f} ms")
    assert max(held) < 0.4, held  # a frame's fit is ~10-50 ms here; the held solve would be 10 s
    assert waiting.shape_updates == 1 and waited >= 0.3, waited


def test_background_re_solve_is_built_and_its_reference_fitted_off_the_frames_thread(flame_and_truth,  # noqa: F811
                                                                                     monkeypatch):
    """A background re-solve's setup (its landmark tables, the problem) and the reference frame's fit under the new
    shape run in the solve's thread: the step that starts the solve builds nothing, the step that swaps fits only
    its own frame (before 2026-12-07h the two slowest steps after the first, t-tail_cpu_2026-12-07h.md); in the
    foreground mode the swapping step still fits the reference itself.  ``events`` names what each step did."""
    import utils.face.frame_tracker as ft
    from utils.face.frame_tracker import ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, KEYS, 2)
    on_main: list[str] = []
    fit, solve = ft.fit_flame_to_landmarks, ft.ShapeRefinement

    def counted_fit(*a, **k):
        if threading.current_thread() is threading.main_thread():
            on_main.append("fit")
        return fit(*a, **k)

    class CountedSolve(solve):
        def __init__(self, *a, **k):
            if threading.current_thread() is threading.main_thread():
                on_main.append("build")
            super().__init__(*a, **k)

    monkeypatch.setattr(ft, "fit_flame_to_landmarks", counted_fit)
    monkeypatch.setattr(ft, "ShapeRefinement", CountedSolve)
    refine = ShapeRefineConfig(frames=8, iterations=3, delay_frames=2, wait=True, new_view=0.1, blend_frames=0)
    work = {}
    with single_thread():
        for background in (True, False):
            tracker = _tracker(flame, truth, replace(refine, background=background, iterations_per_frame=3))
            steps = []
            for t in range(pts.shape[0]):
                on_main.clear()
                tracker.step(pts[t])
                steps.append((list(tracker.events), list(on_main)))
            tracker.close()
            work[background] = steps
    for background, steps in work.items():
        print(f"background {background}: " + ", ".join(f"{t}: {ev} {m.count('fit')} fits"
                                                        f"{' + build' if 'build' in m else ''}"
                                                        for t, (ev, m) in enumerate(steps) if ev))
    bg = work[True]
    start = next(t for t, (ev, _) in enumerate(bg) if "solve_start" in ev)
    swap = next(t for t, (ev, _) in enumerate(bg) if "swap" in ev)
    assert bg[0][0] == ["cold"] and swap == start + refine.delay_frames
    assert all("solving" in ev for ev, _ in bg[start:swap])
    assert bg[start][1] == ["fit"] and bg[swap][1] == ["fit"], (bg[start], bg[swap])  # the frame's own fit only
    fg_swap = next(m for ev, m in work[False] if "swap" in ev)
    assert "build" in next(m for ev, m in work[False] if "solve_start" in ev) and fg_swap.count("fit") == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread niceness: Linux only")
def test_background_re_solve_thread_runs_at_a_lower_priority(flame_and_truth, monkeypatch):  # noqa: F811
    """ShapeRefineConfig.background_nice (default 10): the re-solve thread renices itself -- that thread only, not the
    tracking thread -- so on shared cores the tracked frames get the CPU first; 0 leaves it alone."""
    import os

    from utils.face.frame_tracker import ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, KEYS, 3)
    calls: list[tuple[int, int, bool]] = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, prio: calls.append(
        (who, prio, who == threading.get_native_id())))
    assert ShapeRefineConfig().background_nice == 10
    got = {}
    with single_thread():
        for nice in (10, 0):
            calls.clear()
            tracker = _tracker(flame, truth, ShapeRefineConfig(frames=8, iterations=2, delay_frames=2,
                                                                new_view=0.1, background_nice=nice))
            t = 0
            while tracker.thread is None:
                tracker.step(pts[t])
                t += 1
                assert t < 10, "no re-solve started on the turned frames"
            tracker.close()
            got[nice] = list(calls)
    assert len(got[10]) == 1 and got[10][0][1] == 10 and got[10][0][2]  # called from the re-solve thread itself
    assert got[10][0][0] != threading.main_thread().native_id and got[0] == []


def test_warm_first_starts_the_first_frame_from_the_calibration(flame_and_truth):  # noqa: F811
    """FrameTracker.calibrate(warm_first=True), as a live stream calibrates: the first tracked frame (a newer one
    than the calibration's) is fitted from the last calibration frame's solution instead of from scratch (PnP, rigid
    and wide stages), to within 0.05 px of the cold fit's landmark error; without it the first frame is cold."""
    from utils.face.flame_fit import FlameFitConfig
    from utils.face.frame_tracker import FrameTracker

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, [(0.0, 0.0)] * 4 + [(3.0, 1.0)] * 2, 4)
    cfg = FlameFitConfig(iterations=20)
    got = {}
    with single_thread():
        for warm in (False, True):
            tracker, _ = FrameTracker.calibrate(flame, pts[:4], None, SIZE, cfg, iterations=4, warm_first=warm)
            params, err = tracker.step(pts[5])
            got[warm] = (list(tracker.events), err, params)
    print({k: (v[0], round(v[1], 3)) for k, v in got.items()})
    assert got[False][0] == ["cold"] and got[True][0] == ["warm_start"]
    assert got[True][1] <= got[False][1] + 0.05, (got[True][1], got[False][1])
    assert torch.allclose(got[True][2].rotation_matrix, got[False][2].rotation_matrix, atol=0.01)


def test_calibration_shape_prior_keeps_the_first_frames_shape_near_the_mean(flame_and_truth):  # noqa: F811
    """ShapeRefineConfig.calibration_shape_std tightens the calibration's shape prior (only with the refinement on):
    the frontal first frames' shape stays nearer FLAME's mean than with the fit's own prior."""
    from utils.face.flame_fit import FlameFitConfig
    from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, [(0.0, 0.0), (2.0, 0.0), (0.0, 2.0)], 2)
    cfg = FlameFitConfig(iterations=10)
    with single_thread():
        loose, _ = FrameTracker.calibrate(flame, pts, None, SIZE, cfg, refine=ShapeRefineConfig(frames=0, **_PLAIN))
        tight, _ = FrameTracker.calibrate(flame, pts, None, SIZE, cfg,
                                          refine=ShapeRefineConfig(**_PLAIN, frames=12, calibration_shape_std=0.2))
    print(f"calibrated shape norm: fit's prior {float(loose.shape.norm()):.2f}, tight {float(tight.shape.norm()):.2f}")
    assert float(tight.shape.norm()) < 0.7 * float(loose.shape.norm())


def test_shape_information_finds_the_frontal_frames_weak_directions_and_the_weak_prior_keeps_them(
        flame_and_truth):  # noqa: F811
    """ShapeRefinement.shape_information on frontal frames has many near-zero eigenvalues (directions those frames
    leave free); turned frames inform those directions more.  A full shape precision equal to the fit's own diagonal
    prior gives the diagonal prior's solve (the solver's matrix-prior path); the calibration with
    ``calibration_information`` keeps the weak directions near the mean (like the uniform tight prior) while the
    strongly observed ones stay as freely fitted as with the fit's own prior."""
    from utils.face.flame_fit import FlameFitConfig, LandmarkTargets, ShapeRefinement, fit_flame_to_landmarks
    from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig
    from utils.face.landmark_flame import LandmarkFlame

    flame, _, truth = flame_and_truth
    frontal = _points(flame, truth, [(0.0, 0.0), (2.0, 0.0), (0.0, 2.0)], 3)
    turned = _points(flame, truth, [(0.0, 0.0), (25.0, 0.0), (0.0, 15.0)], 3)
    cfg = FlameFitConfig(iterations=10)
    lf = LandmarkFlame(flame)
    with single_thread():
        first = fit_flame_to_landmarks(flame, LandmarkTargets(frontal, SIZE), cfg)
        fixed = replace(cfg, focal=float(first.camera.fx))
        # the turned frames' own poses, under the frontal frames' shape (the information is taken at one shape)
        posed = fit_flame_to_landmarks(flame, LandmarkTargets(turned, SIZE), fixed, shape=first.params.shape).params

        def solve(pts, precision=None, iterations=3, init=first.params):
            sr = ShapeRefinement(lf, LandmarkTargets(pts, SIZE), fixed, first.params.shape, init, iterations)
            if precision is not None:
                sr.set_shape_precision(precision)
            sr.advance(iterations)
            return sr

        h_front = solve(frontal, iterations=0).shape_information()
        h_turn = solve(turned, iterations=0, init=posed).shape_information()
        diag = solve(frontal).result().params.shape
        full = solve(frontal, torch.eye(300, dtype=torch.float64)).result().params.shape
        loose, _ = FrameTracker.calibrate(flame, frontal, None, SIZE, cfg, refine=ShapeRefineConfig(frames=0, **_PLAIN))
        uniform, _ = FrameTracker.calibrate(flame, frontal, None, SIZE, cfg,
                                            refine=ShapeRefineConfig(**_PLAIN, frames=12, calibration_shape_std=0.2))
        weak, _ = FrameTracker.calibrate(flame, frontal, None, SIZE, cfg,
                                         refine=ShapeRefineConfig(**_PLAIN, frames=12, calibration_shape_std=0.2,
                                                                  calibration_information=25.0))
    evals, vecs = torch.linalg.eigh(h_front)
    n_strong_turn = int((torch.linalg.eigvalsh(h_turn) >= 25.0).sum())
    n_weak = int((evals < 25.0).sum())
    V_weak, V_strong = vecs[:, evals < 25.0], vecs[:, evals >= 25.0]
    info_front = float(torch.trace(V_weak.T @ h_front @ V_weak))
    info_turn = float(torch.trace(V_weak.T @ h_turn @ V_weak))
    assert torch.allclose(diag, full, atol=1e-5), float((diag - full).abs().max())
    along = {name: (float((t.shape.double() @ V_weak).norm()), float((t.shape.double() @ V_strong).norm()))
             for name, t in (("loose", loose), ("uniform", uniform), ("weak", weak))}
    print(f"frontal: {n_weak} of 300 eigenvalues < 25 (max {float(evals.max()):.0f}); information along them "
          f"frontal {info_front:.1f}, turned {info_turn:.1f}; shape norm along weak / strong directions {along}")
    print(f"strong directions: frontal {300 - n_weak}, turned {n_strong_turn}")
    assert torch.allclose(h_front, h_front.T) and float(evals.min()) > -1e-6 * float(evals.max())
    assert 100 < n_weak < 300
    assert info_turn > 1.3 * info_front  # measured 1.5x
    assert along["weak"][0] < 0.5 * along["loose"][0], along  # the weak directions held near the mean
    # the strong ones as fitted with the fit's own prior (the uniform tight prior shrinks them)
    assert abs(along["weak"][1] - along["loose"][1]) < abs(along["uniform"][1] - along["loose"][1]), along


def test_offset_step_shares_a_static_detector_offset_between_shape_and_offset(flame_and_truth):  # noqa: F811
    """ShapeRefinement.offset_step: near-frontal frames whose static landmarks carry a detector offset (a fixed
    random pattern, 3 px std) fitted with the offset at 0 put it into the shape; the joint step (offset prior 3 px)
    estimates an offset along the injected one and moves the shape back towards the truth; the calibration with
    ``calibration_offset_px`` uses it (its detector offset follows the injected one more closely than the plain
    calibration's residual does)."""
    from utils.face.flame_fit import FlameFitConfig, LandmarkTargets, ShapeRefinement, fit_flame_to_landmarks
    from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig
    from utils.face.landmark_flame import LandmarkFlame

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, [(0.0, 0.0), (3.0, 0.0), (0.0, 3.0), (-3.0, 1.0)], 4)
    injected = torch.zeros(68, 2)
    injected[17:] = 3.0 * torch.randn(51, 2, generator=torch.Generator().manual_seed(0))
    pts = pts + injected
    cfg = FlameFitConfig(iterations=10)
    with single_thread():
        first = fit_flame_to_landmarks(flame, LandmarkTargets(pts, SIZE), cfg)
        fixed = replace(cfg, focal=float(first.camera.fx))
        sr = ShapeRefinement(LandmarkFlame(flame), LandmarkTargets(pts, SIZE), fixed, first.params.shape,
                             first.params, 10)
        shape, offset = sr.offset_step(3.0)
        plain, _ = FrameTracker.calibrate(flame, pts, None, SIZE, cfg, refine=ShapeRefineConfig(frames=0, **_PLAIN))
        joint, _ = FrameTracker.calibrate(flame, pts, None, SIZE, cfg,
                                          refine=ShapeRefineConfig(frames=0, calibration_offset_px=3.0,
                                                                   calibration_offset_groups=""))
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))  # noqa: E731
    err_loose = float((first.params.shape - truth.shape).norm())
    err_joint = float((shape - truth.shape).norm())
    rms = float(offset[17:].norm(dim=-1).square().mean().sqrt())
    print(f"offset estimate vs injected: cos {cos(offset[17:], injected[17:]):.2f}, rms {rms:.2f} px; shape error "
          f"loose {err_loose:.2f} -> joint {err_joint:.2f}; calibrated offset vs injected: plain "
          f"{cos(plain.bias[17:], injected[17:]):.2f}, joint {cos(joint.bias[17:], injected[17:]):.2f}; calibrated "
          f"shape error plain {float((plain.shape - truth.shape).norm()):.2f}, joint "
          f"{float((joint.shape - truth.shape).norm()):.2f}")
    assert offset[:17].abs().max() == 0 and cos(offset[17:], injected[17:]) > 0.5  # measured 0.92
    assert err_joint < 0.95 * err_loose  # measured 3.48 -> 2.94
    # the calibration's own detector offset (estimate + what the re-solve leaves) still follows the injected one
    assert cos(joint.bias[17:], injected[17:]) > 0.8 and bool(torch.isfinite(joint.shape).all())
    assert float((joint.shape - truth.shape).norm()) < float((plain.shape - truth.shape).norm())


def test_offset_rounds_groups_and_start(flame_and_truth):  # noqa: F811
    """The calibration offset's options (ShapeRefineConfig.calibration_offset_groups / _rounds,
    ShapeRefinement.offset_step's per-point std and start offset): a group with factor 0 keeps a zero offset, the
    factors scale calibration_offset_px per group, a step started from an offset counts it in the total its prior
    holds near 0 (a stiff prior pulls the total, not only the step, to 0), and a second round (step + re-solve from
    the first's solution) follows an injected brows-heavy detector offset at least as well as one round."""
    from utils.face.flame_fit import FlameFitConfig, LandmarkTargets, ShapeRefinement, fit_flame_to_landmarks
    from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig
    from utils.face.landmark_flame import LandmarkFlame

    std = ShapeRefineConfig(calibration_offset_px=6.0, calibration_offset_groups="brows=2, eyes=0").offset_std()
    assert float(std[:17].abs().max()) == 0 and float(std[17]) == 12.0 and float(std[30]) == 6.0
    assert float(std[36:48].abs().max()) == 0 and float(std[48]) == 6.0
    with pytest.raises(ValueError):
        ShapeRefineConfig(calibration_offset_px=6.0, calibration_offset_groups="jaw=1").offset_std()

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, [(0.0, 0.0), (3.0, 0.0), (0.0, 3.0), (-3.0, 1.0)], 4)
    injected = torch.zeros(68, 2)
    injected[17:] = 1.5 * torch.randn(51, 2, generator=torch.Generator().manual_seed(1))
    injected[17:27, 1] -= 4.0  # brows detected 4 px too high
    pts = pts + injected
    cfg = FlameFitConfig(iterations=10)
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()))  # noqa: E731
    with single_thread():
        first = fit_flame_to_landmarks(flame, LandmarkTargets(pts, SIZE), cfg)
        fixed = replace(cfg, focal=float(first.camera.fx))
        lf = LandmarkFlame(flame)
        sr = ShapeRefinement(lf, LandmarkTargets(pts, SIZE), fixed, first.params.shape, first.params, 10)
        held = torch.full((68,), 3.0)
        held[36:48] = 0.0  # eyes held at their start
        _, off = sr.offset_step(held)
        # from a start offset: the targets are the points less it, the prior is centred on 0 for the total
        sr2 = ShapeRefinement(lf, LandmarkTargets(pts - injected, SIZE), fixed, first.params.shape, first.params, 10)
        _, off2 = sr2.offset_step(held, injected)
        _, pulled = sr2.offset_step(0.01, injected)  # a stiff prior pulls the total (not the step) to 0
        rounds = {}
        for k in (1, 2):
            tr, _ = FrameTracker.calibrate(flame, pts, None, SIZE, cfg, refine=ShapeRefineConfig(
                frames=0, calibration_offset_px=3.0, calibration_offset_rounds=k, calibration_offset_groups=""))
            rounds[k] = (cos(tr.bias[17:], injected[17:]), float((tr.shape - truth.shape).norm()))
    print(f"held eyes: max {float(off[36:48].abs().max()):.3g}; from the injected start: eyes "
          f"{float((off2[36:48] - injected[36:48]).abs().max()):.3g}, cos {cos(off2[17:], injected[17:]):.3f}, stiff "
          f"prior {float(pulled[17:].norm()):.3g} of {float(injected[17:].norm()):.3g}; "
          f"rounds (cos, shape error) "
          f"{rounds}")
    assert float(off[:17].abs().max()) == 0 and float(off[36:48].abs().max()) == 0
    assert cos(off[17:], injected[17:]) > 0.5
    # started at the injected offset: the held points keep it exactly; the prior acts on the total offset
    assert float((off2[36:48] - injected[36:48]).abs().max()) < 1e-5
    assert float(pulled[17:].norm()) < 0.05 * float(injected[17:].norm())
    assert rounds[2][0] >= rounds[1][0] - 0.02 and rounds[2][1] <= rounds[1][1] + 0.1


def test_continuity_frames_keeps_the_solve_frames_mean_expression_across_the_swap(flame_and_truth):  # noqa: F811
    """ShapeRefineConfig.continuity_frames: the expression offset removed after a swap is the mean change the new
    shape gives all the solve's frames, so those frames, shown again after the swap, read on average the expression
    they were tracked with before it (to a fraction of the change without the option, which keeps only the reference
    frame's); the jaw keeps the reference frame's anchoring either way."""
    from utils.face.frame_tracker import ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, KEYS, 3)
    base = ShapeRefineConfig(frames=8, iterations=6, delay_frames=2, wait=True, new_view=0.1, max_updates=1,
                             blend_frames=0)
    gaps, jaws = {}, {}
    with single_thread():
        for on in (False, True):
            tracker = _tracker(flame, truth, replace(base, continuity_frames=on))
            out = [tracker.step(pts[t])[0] for t in range(pts.shape[0])]
            assert tracker.shape_updates == 1
            idx = [k.index - 1 for k in tracker.solve_frames]  # (index: frames tracked when kept, from 1)
            # the solve's frames shown again after the swap, each 3 times (the last read: the frame-to-frame prior
            # ties a frame to the one before, another pose here)
            again = [[tracker.step(pts[i])[0] for _ in range(3)][-1] for i in idx]
            tracker.close()
            d = torch.stack([a.expression[0, :10] - out[i].expression[0, :10] for a, i in zip(again, idx)])
            gaps[on] = float(d.mean(0).norm())
            jaws[on] = float((again[0].jaw[0, 0] - out[idx[0]].jaw[0, 0]).abs())
    print(f"solve frames' mean expression change across the swap: reference only {gaps[False]:.4f}, "
          f"continuity_frames {gaps[True]:.4f}; reference frame's jaw change {jaws[False]:.4f} / {jaws[True]:.4f}")
    assert ShapeRefineConfig().continuity_frames is False
    assert gaps[True] < 0.25 * gaps[False], gaps
    assert abs(jaws[True] - jaws[False]) < 1e-3, jaws


def test_float32_schur_calibration_matches_the_float64_one(flame_and_truth):  # noqa: F811
    """ShapeRefineConfig.calibration_float32 (the default since 2026-12-07c; FlameFitConfig.schur_float32 for the
    calibration's solves: the Schur complement's two large products in float32) calibrates the same shape, detector
    offset and focal length as the float64 solve within rounding, on frames with a detector offset and the default
    joint-offset calibration; the tracker it returns fits its frames in float64 (the setting stays in the
    calibration) with the calibration's LandmarkFlame (its free-shape tables built once)."""
    from utils.face.flame_fit import FlameFitConfig
    from utils.face.frame_tracker import FrameTracker, ShapeRefineConfig

    flame, _, truth = flame_and_truth
    pts = _points(flame, truth, [(0.0, 0.0), (4.0, 0.0), (0.0, 3.0), (-4.0, 1.0), (2.0, -2.0), (0.0, 0.0)], 5)
    injected = torch.zeros(68, 2)
    injected[17:] = 2.0 * torch.randn(51, 2, generator=torch.Generator().manual_seed(2))
    pts = pts + injected
    cfg = FlameFitConfig(iterations=12)
    with single_thread():
        f64, _ = FrameTracker.calibrate(flame, pts, None, SIZE, cfg, iterations=8,
                                        refine=ShapeRefineConfig(calibration_iterations=10, calibration_float32=False))
        f32, _ = FrameTracker.calibrate(flame, pts, None, SIZE, cfg, iterations=8,
                                        refine=ShapeRefineConfig(calibration_iterations=10, calibration_float32=True))
    d_shape = float((f32.shape - f64.shape).abs().max())
    d_bias = float((f32.bias - f64.bias).abs().max())
    print(f"float32 vs float64 Schur: shape {d_shape:.2e} (of {float(f64.shape.abs().max()):.2f}), bias {d_bias:.2e} "
          f"px (of {float(f64.bias.abs().max()):.2f}), focal {abs(f32.focal - f64.focal):.1e}")
    assert float(f64.shape.abs().max()) > 0.1 and float(f64.bias.abs().max()) > 0.5  # a real solve, not the start
    assert d_shape < 1e-2 and d_bias < 0.02 and f32.focal == f64.focal
    assert not f32.cold_cfg.schur_float32 and not f32.warm_cfg.schur_float32
    assert getattr(f32.lf, "_free_shape", None) is not None  # the calibration's LandmarkFlame, tables built
