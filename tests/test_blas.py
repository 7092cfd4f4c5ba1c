"""utils/core/blas.py: NumPy's / SciPy's BLAS thread count set and restored at run time."""
from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_info


def _counts() -> list[int]:
    return [int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]


def test_blas_threads_are_set_and_restored():
    """Every loaded BLAS takes the count given (read back through threadpoolctl) and gets its previous one back;
    :func:`blas_threads` reads the current count; a product still computes the same after the change."""
    import scipy.linalg.lapack  # noqa: F401  (SciPy's own OpenBLAS, loaded beside NumPy's)

    from utils.core import blas

    original = _counts()
    if not original:
        pytest.skip("no BLAS that threadpoolctl knows is loaded")
    a = np.random.default_rng(0).normal(size=(200, 150))
    want = a.T @ a
    before = blas.set_blas_threads(1)
    try:
        assert _counts() == [1] * len(original)
        assert blas.blas_threads() == 1
        assert np.allclose(a.T @ a, want)
        second = blas.set_blas_threads(2)
        assert _counts() == [2] * len(original)
        assert blas.blas_threads() == 2
        blas.restore_blas_threads(second)
        assert _counts() == [1] * len(original)
    finally:
        blas.restore_blas_threads(before)
    assert _counts() == original
    blas.restore_blas_threads(None)  # nothing set: nothing to undo
