"""Shared test data: a tiny synthetic NeRSemble-format dataset, generated once per test session.

Use it from any test module with::

    from tests.fixtures import synthetic_root  # noqa: F401  (pytest fixture)

    def test_something(synthetic_root):
        subjects = synthetic_root / "subjects"   # NeRSemble subject folders; FLAME files in synthetic_root / "flame"

The dataset (2 training identities "300", "301" and 1 held-out identity "017", 16 cameras, images-2x of 44x64 px)
is cached at module level, so every module that imports the fixture shares one copy (a fixture imported into
several modules would otherwise be run once per module).
"""
from __future__ import annotations

from pathlib import Path

import pytest

SYNTHETIC_KW = dict(num_identities=2, num_heldout=1, image_size=64, seed=0)
_CACHE: dict[str, Path] = {}


def get_synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generate (once per session) and return the tiny synthetic dataset folder."""
    if "root" not in _CACHE:
        from utils.data.synthetic.dataset import make_synthetic_dataset

        root = tmp_path_factory.mktemp("synthetic_dataset")
        make_synthetic_dataset(root, progress=False, **SYNTHETIC_KW)
        _CACHE["root"] = root
    return _CACHE["root"]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with flame/, subjects/ and synthetic_info.json (see module docstring). Treat it as read-only."""
    return get_synthetic_root(tmp_path_factory)
