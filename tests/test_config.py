import argparse
from dataclasses import dataclass, field

import pytest

from utils.config import add_config_args, build_config, from_dict, to_dict


@dataclass
class Inner:
    lr: float = 1e-3  # learning rate
    names: list[str] = field(default_factory=list)  # some names


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 10  # how many steps
    flag: bool = False  # a switch
    out: str = "x"


def _parse(argv, yaml_path=None):
    p = argparse.ArgumentParser()
    add_config_args(p, Outer, aliases={"lr": "inner.lr"})
    return build_config(Outer, yaml_path, p.parse_args(argv)), p


def test_defaults_yaml_and_cli_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 20\ninner:\n  lr: 0.5\n")
    cfg, _ = _parse(["--inner.names", "a,b", "--flag", "true", "--lr", "0.25"], y)
    assert cfg.steps == 20 and cfg.inner.lr == 0.25 and cfg.inner.names == ["a", "b"] and cfg.flag is True
    cfg2, _ = _parse(["--steps", "7"], y)
    assert cfg2.steps == 7 and cfg2.inner.lr == 0.5


def test_help_documents_every_leaf():
    _, p = _parse([])
    text = p.format_help()
    for flag, words in [("--inner.lr", "learning rate"), ("--steps", "how many steps"), ("--flag", "a switch"),
                        ("--out", "default")]:
        assert flag in text and words in text


def test_unknown_and_badly_typed_keys_are_clear(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("inner:\n  lrr: 1\n")
    with pytest.raises(ValueError, match="unknown config key 'inner.lrr'"):
        _parse([], y)
    y.write_text("steps: many\n")
    with pytest.raises(ValueError, match="steps must be int"):
        _parse([], y)
    with pytest.raises(ValueError, match="--steps expects int"):
        _parse(["--steps", "x"])
    with pytest.raises(FileNotFoundError, match="configs/"):
        _parse([], tmp_path / "missing.yaml")


def test_dict_round_trip():
    cfg = Outer(steps=3)
    cfg.inner.names = ["q"]
    assert from_dict(Outer, to_dict(cfg)) == cfg
