"""utils/core/blas.py: NumPy's / SciPy's OpenBLAS thread count set and restored at run time."""
from __future__ import annotations

import numpy as np
import pytest


def test_blas_threads_are_set_and_restored():
    """Every loaded OpenBLAS takes the count given (read back through its own getter) and gets its previous one back;
    a product still computes the same after the change."""
    import scipy.linalg.lapack  # noqa: F401  (SciPy's own OpenBLAS, loaded beside NumPy's)

    from utils.core import blas

    libs = blas._openblas_libraries()
    if not libs:
        pytest.skip("no OpenBLAS loaded (NumPy built against another BLAS)")
    a = np.random.default_rng(0).normal(size=(200, 150))
    want = a.T @ a
    before = blas.set_blas_threads(1)
    try:
        assert len(before) == len(libs) and all(n >= 1 for n in before)
        assert [int(get()) for _, get in libs] == [1] * len(libs)
        assert np.allclose(a.T @ a, want)
        blas.set_blas_threads(2)
        assert [int(get()) for _, get in libs] == [2] * len(libs)
    finally:
        blas.restore_blas_threads(before)
    assert [int(get()) for _, get in libs] == before
