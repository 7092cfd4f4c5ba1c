"""benchmarks/eyes.py (issue 17's GPU benchmark): its targets check, and a tiny end-to-end run on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.eyes import check_targets

REPO = Path(__file__).resolve().parents[1]


def test_targets_flag_an_eye_gap_and_a_face_loss():
    fixed = {"fit[fixed]_eye_gap_unseen_db": -0.03, "fit[fixed]_psnr_face_unseen": 32.62,
             "fit[today]_psnr_face_unseen": 32.50}  # benchmarks/results/eyes_h200_colour.md
    assert check_targets({"preset": fixed}) == []
    gap = dict(fixed, **{"fit[fixed]_eye_gap_unseen_db": 4.09})
    lost = dict(fixed, **{"fit[fixed]_psnr_face_unseen": 32.30})
    msgs = check_targets({"gap": gap, "lost": lost})
    assert len(msgs) == 2 and "gap: the fixed fit's eyes are 4.09 dB" in msgs[0] and "lost:" in msgs[1]


def test_quick_run_writes_tables_and_crops(tmp_path):
    out = tmp_path / "eyes"
    run = subprocess.run([sys.executable, "benchmarks/eyes.py", "--quick", "--out", str(out),
                          "--fit_variant", "forced", "fit.colour_eye_pixels=0"],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    row = doc["rows"]["preset"]
    # the quick crops hold a few eye pixels: the preset uses the eye term at every size (scaled down, issue 25), as
    # does the unscaled variant; "today" (eye weights 0) does not
    assert row["fit[today]_eye_term_pixels"] == 0
    assert row["fit[fixed]_eye_term_pixels"] == row["fit[forced]_eye_term_pixels"] > 0
    for k in ("psnr_face_heldout_views", "psnr_eyes_heldout_views", "fit[fixed]_psnr_eyes_unseen"):
        assert isinstance(row[k], float), k
    assert out.with_suffix(".png").is_file() and (tmp_path / "eyes_fit.png").is_file()
    assert "| fit[forced]_eye_gap_unseen_db |" in out.with_suffix(".md").read_text()
