"""Session-wide test data for training, tracking and interpolation tests.

``preprocessed_root``: a copy of the tiny synthetic dataset (tests/fixtures.py) with FLAME2PLY and projection_ply run
on it (face masks and masked images present), i.e. ready for training.
``trained_model_dir``: a folder with ``model.pt`` trained for a few steps with configs/tiny.yaml on it.
``fit_model``: the ``model.pt`` of a small model trained longer (FIT_MODEL_STEPS steps, FIT_MODEL_OVERRIDES), sharp
enough for fitting, encoder and interpolation tests to matter; trained once per session, single-threaded.
``sequence_root``: the same tiny dataset with ``SEQUENCE_FRAMES`` frames per subject (frames 1.. non-neutral; frame 0
byte-identical to the single-frame one, so models trained there apply), preprocessed on every frame.

Import the fixtures into a test module with ``from tests.training_fixtures import preprocessed_root,
trained_model_dir  # noqa: F401``. Both are cached per session and must be treated as read-only.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch

from tests.fixtures import get_synthetic_root

_CACHE: dict[str, Path] = {}


def get_preprocessed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "pre" not in _CACHE:
        from utils.preprocess import FLAME2PLY, projection_ply

        src = get_synthetic_root(tmp_path_factory)
        root = tmp_path_factory.mktemp("preprocessed") / "data"
        shutil.copytree(src, root)
        subjects, flame = str(root / "subjects"), str(root / "flame")
        FLAME2PLY.run(FLAME2PLY.build_parser().parse_args(
            ["--data_root", subjects, "--flame_dir", flame, "--max_level", "1", "--quiet"]))
        projection_ply.run(projection_ply.build_parser().parse_args(
            ["--data_root", subjects, "--mask_images", "--quiet"]))
        _CACHE["pre"] = root
    return _CACHE["pre"]


def tiny_config(root: Path, out: Path, **overrides):
    """configs/tiny.yaml on ``root`` writing to ``out``, with dotted-key ``overrides``."""
    from utils.apps.train.trainer import TrainConfig
    from utils.core.config import build_config

    repo = Path(__file__).resolve().parents[1]
    base = {"data.root": str(root), "out": str(out), "progress": False}
    base.update(overrides)
    return build_config(TrainConfig, repo / "configs" / "tiny.yaml", overrides=base)


def get_trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "model" not in _CACHE:
        from utils.apps.train.trainer import Trainer

        out = tmp_path_factory.mktemp("trained_model")
        Trainer(tiny_config(get_preprocessed_root(tmp_path_factory), out, steps=20)).run()
        _CACHE["model"] = out
    return _CACHE["model"]


FIT_MODEL_OVERRIDES = {
    "model.code_dim": 24, "model.style_dim": 64, "model.hidden": 64, "batch_views": 4,
    "optim.lr_network": 5e-3, "optim.lr_codes": 3e-2, "optim.lr_template": 1e-2,
    "eval_every": 100000, "ckpt_every": 100000, "seed": 0,
}
FIT_MODEL_STEPS = 120


@contextlib.contextmanager
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def get_fit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt of a small model trained a bit longer than the session fixture.  Cached on disk under the session's
    base temp folder, so every test module shares it whichever module object imports this function."""
    out = tmp_path_factory.getbasetemp() / "shared_fit_model"
    if not (out / "model.pt").is_file():
        from utils.apps.train.trainer import Trainer

        with single_thread():
            Trainer(tiny_config(get_preprocessed_root(tmp_path_factory), out, steps=FIT_MODEL_STEPS,
                                **FIT_MODEL_OVERRIDES)).run()
    return out / "model.pt"


SEQUENCE_FRAMES = 3


def get_sequence_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "seq" not in _CACHE:
        from tests.fixtures import SYNTHETIC_KW
        from utils.data.synthetic.dataset import make_synthetic_dataset
        from utils.preprocess import FLAME2PLY, projection_ply

        root = tmp_path_factory.mktemp("sequences") / "data"
        make_synthetic_dataset(root, progress=False, num_frames=SEQUENCE_FRAMES, **SYNTHETIC_KW)
        subjects, flame = str(root / "subjects"), str(root / "flame")
        FLAME2PLY.run(FLAME2PLY.build_parser().parse_args(
            ["--data_root", subjects, "--flame_dir", flame, "--max_level", "1", "--frames", "all", "--quiet"]))
        projection_ply.run(projection_ply.build_parser().parse_args(
            ["--data_root", subjects, "--mask_images", "--frames", "all", "--quiet"]))
        _CACHE["seq"] = root
    return _CACHE["seq"]


@pytest.fixture(scope="session")
def sequence_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return get_sequence_root(tmp_path_factory)


@pytest.fixture(scope="session")
def preprocessed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return get_preprocessed_root(tmp_path_factory)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return get_trained_model_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def fit_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return get_fit_model(tmp_path_factory)
