"""The thread count of NumPy's and SciPy's BLAS (OpenBLAS) at run time, without threadpoolctl.

torch.set_num_threads sets torch's threads only; NumPy and SciPy each bundle their own OpenBLAS, which by default
runs a product on every core it finds once the product passes a small size (a (630 x 100) matrix-vector product
already).  The stream's per-frame FLAME fit (utils/face/flame_fit.py, NumPy) is hundreds of such small products a
frame: on threads that wake per call, and that the calling thread waits for by spinning when the cores are busy, the
same fit took 2.5x the CPU time with 2 OpenBLAS threads as with 1 on the 2-core container
(benchmarks/results/t-livefit_cpu_2026-12-07f.md).
"""
from __future__ import annotations

import ctypes
import os

# the OpenBLAS builds' names of openblas_set_num_threads / openblas_get_num_threads: plain, and the prefixed and
# 64-bit-integer ones of NumPy's and SciPy's wheels (scipy_openblas_set_num_threads64_)
_NAMES = [(f"{pre}openblas_set_num_threads{suf}", f"{pre}openblas_get_num_threads{suf}")
          for pre in ("", "scipy_") for suf in ("", "64_")]


def _openblas_libraries() -> list[tuple]:
    """(set, get) ctypes functions of every OpenBLAS loaded in this process (Linux: from /proc/self/maps; elsewhere
    none)."""
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()})
    except OSError:
        return []
    out = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _NAMES:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                out.append((getattr(lib, set_name), getattr(lib, get_name)))
                break
    return out


_LIBRARIES: list[tuple] | None = None  # :func:`blas_threads`' libraries, found once


def blas_threads() -> int:
    """The largest thread count of the OpenBLAS libraries loaded when first called (0: none found); a ctypes call
    each, for code that picks NumPy's BLAS only when it runs on one thread."""
    global _LIBRARIES
    if _LIBRARIES is None:
        _LIBRARIES = _openblas_libraries()
        for _, get_fn in _LIBRARIES:
            get_fn.restype = ctypes.c_int
    return max((int(get_fn()) for _, get_fn in _LIBRARIES), default=0)


def set_blas_threads(threads: int) -> list[int]:
    """Set every loaded OpenBLAS to ``threads`` threads (import NumPy / SciPy's BLAS users first); returns the
    previous counts (one per library, for :func:`restore_blas_threads`; empty when none was found)."""
    libs = _openblas_libraries()
    before = []
    for set_fn, get_fn in libs:
        get_fn.restype = ctypes.c_int
        before.append(int(get_fn()))
        set_fn(ctypes.c_int(int(threads)))
    return before


def restore_blas_threads(before: list[int]) -> None:
    """Undo :func:`set_blas_threads` (its return value)."""
    for (set_fn, _), n in zip(_openblas_libraries(), before):
        set_fn(ctypes.c_int(n))
