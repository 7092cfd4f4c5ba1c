"""The thread count of NumPy's and SciPy's BLAS (OpenBLAS) at run time, through threadpoolctl.

torch.set_num_threads sets torch's threads only; NumPy and SciPy each bundle their own OpenBLAS, which by default
runs a product on every core it finds once the product passes a small size (a (630 x 100) matrix-vector product
already).  The stream's per-frame FLAME fit (utils/face/flame_fit.py, NumPy) is hundreds of such small products a
frame: on threads that wake per call, and that the calling thread waits for by spinning when the cores are busy, the
same fit took 2.5x the CPU time with 2 OpenBLAS threads as with 1 on the 2-core container
(benchmarks/results/t-livefit_cpu_2026-12-07f.md).
"""
from __future__ import annotations

import functools

from threadpoolctl import ThreadpoolController, threadpool_limits


@functools.lru_cache(maxsize=1)
def _blas_controllers() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded when first asked (a scan of the process's libraries:
    done once, since :func:`blas_threads` runs every frame)."""
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def blas_threads() -> int:
    """The largest thread count of the BLAS libraries loaded when first called (0: none found); one library call each,
    for code that picks NumPy's BLAS only when it runs on one thread."""
    return max((int(c.num_threads) for c in _blas_controllers()), default=0)


def set_blas_threads(threads: int) -> threadpool_limits:
    """Limit every loaded BLAS (NumPy's and SciPy's OpenBLAS; import them first) to ``threads`` threads; returns the
    limiter, whose previous counts :func:`restore_blas_threads` puts back."""
    return threadpool_limits(limits=int(threads), user_api="blas")


def restore_blas_threads(before: threadpool_limits | None) -> None:
    """Undo :func:`set_blas_threads` (its return value; None: nothing to undo)."""
    if before is not None:
        before.restore_original_limits()
