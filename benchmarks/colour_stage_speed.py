"""Seconds per colour-stage iteration (issue 25): fit_colour alone, 10 and 40 iterations with the adam and the lbfgs
colour solver (3 repeats each, min taken), inside a real track.py fit of the CPU preset (20 code iterations).

    OMP_NUM_THREADS=1 python benchmarks/colour_stage_speed.py OUT_DIR [CHECKPOINT [SUBJECT_DIR]]

per iteration = (t40 - t10) / 30; "fixed" = t10 - 10 x that (cloud synthesis, render preparation, Laplacian).
"""
import dataclasses
import os
import runpy
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils.apps.track.fit as F  # noqa: E402

orig = F.fit_colour
times = {}


def wrapped(model, w, base, cam, gt, cfg, *a, **k):
    a = list(a)
    a[2] = False  # no progress bar
    for solver in ("adam", "lbfgs"):
        for n in (10, 40):
            for _ in range(3):
                c = dataclasses.replace(cfg, colour_iterations=n, colour_solver=solver)
                t0 = time.perf_counter()
                orig(model, w, base, cam, gt, c, *a, **k)
                times.setdefault((solver, n), []).append(time.perf_counter() - t0)
    return orig(model, w, base, cam, gt, cfg, *a, **k)


F.fit_colour = wrapped
checkpoint = sys.argv[2] if len(sys.argv) > 2 else "/work/base/output/cpu/model.pt"
subject = sys.argv[3] if len(sys.argv) > 3 else "/work/base/syn_data/subjects/017"
sys.argv = ["track.py", "--checkpoint", checkpoint, "--subject_dir", subject, "--out", sys.argv[1],
            "--fit.iterations", "20", "--fit.min_iterations", "20"]
runpy.run_path("track.py", run_name="__main__")
for solver in ("adam", "lbfgs"):
    t10, t40 = min(times[(solver, 10)]), min(times[(solver, 40)])
    per = (t40 - t10) / 30
    runs = {n: [round(x, 3) for x in times[(solver, n)]] for n in (10, 40)}
    print(f"RESULT {solver}: 10 it {t10:.3f} s, 40 it {t40:.3f} s (min of 3), per iteration {per * 1e3:.1f} ms, "
          f"fixed {max(0.0, t10 - 10 * per) * 1e3:.0f} ms  all={runs}")
