"""Scratch folders of the benchmark scripts, removed when the script exits.

Each bench.py run wrote its synthetic FLAME files (52 MB) and training output under a fresh temporary folder and
left them there: repeated runs (the CLI tests run bench.py a few times each) filled /tmp by gigabytes.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile


def scratch_dir(prefix: str = "bench_") -> str:
    """A new temporary folder (its path, as tempfile.mkdtemp gives it), deleted with its contents at exit."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
