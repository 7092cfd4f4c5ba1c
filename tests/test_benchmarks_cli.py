"""Every benchmark script starts from any folder and documents its flags: ``python benchmarks/<name>.py --help``
(the scripts put the repository root on sys.path themselves; a project import above that line fails here)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the command-line scripts (real_mask.py is a library module the others import)
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if '__name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_help(name, tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, f"benchmarks/{name} --help failed:\n{run.stderr[-3000:]}"
    assert "usage:" in run.stdout


def test_bench_refuses_photo_with_the_real_size_stand_in(tmp_path):
    """--parts photo projects FLAME's own face mask, which the --gaussians stand-in mesh is not: refused up front
    (it used to train and fit first, then fail in the photo part)."""
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), "--gaussians", "46987", "--parts",
                          "fit,photo"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 2
    assert "--parts photo needs the FLAME-topology mask" in run.stderr
