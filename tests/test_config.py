import argparse
from dataclasses import dataclass, field

import pytest

from utils.core.config import add_config_args, build_config, from_dict, to_dict


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


# ------------------------------------------------------------------------------------- range checks (NaN / inf)
def test_check_ranges_every_numeric_leaf_and_class_ranges():
    import math

    from utils.core.config import Range, check_ranges

    @dataclass
    class Sub:
        beta: float = 0.5
        RANGES = {"beta": Range(0, 1, hi_open=True)}

    @dataclass
    class Top:
        sub: Sub = field(default_factory=Sub)
        scale: float = 1.0  # no Range: still finite only
        count: int = 3
        names: list[str] = field(default_factory=list)
        RANGES = {"count": Range(1)}

    check_ranges(Top())
    for attr, val, msg in [("scale", math.inf, "--scale must be a finite number, got inf"),
                           ("scale", math.nan, "--scale must be a finite number, got nan"),
                           ("count", 0, "--count must be >= 1, got 0")]:
        cfg = Top()
        setattr(cfg, attr, val)
        with pytest.raises(ValueError, match=msg):
            check_ranges(cfg)
    for val, msg in [(math.nan, r"--sub.beta must be a finite number \(>= 0 and < 1\), got nan"),
                     (1.0, "--sub.beta must be >= 0 and < 1, got 1.0")]:
        cfg = Top()
        cfg.sub.beta = val
        with pytest.raises(ValueError, match=msg):
            check_ranges(cfg)
    # argparse namespaces: every number finite, the given ranges, None = unset
    check_ranges(argparse.Namespace(a=1.0, b=None, c="x"), {"b": Range(1)})
    with pytest.raises(ValueError, match="--a must be a finite number"):
        check_ranges(argparse.Namespace(a=float("-inf")))
    with pytest.raises(ValueError, match="--a must be >= 1, got 0"):
        check_ranges(argparse.Namespace(a=[2, 0]), {"a": Range(1)})


# every numeric flag of the entry points is checked before any work: one line naming the flag, exit status 2
ENTRY_CASES = [
    ("track", ["--fit.lr", "nan"], "--fit.lr must be a finite number (> 0), got nan"),
    ("track", ["--export.fps", "inf"], "--export.fps must be a finite number (> 0), got inf"),
    ("track", ["--frame", "-1"], "--frame must be >= 0, got -1"),
    ("track", ["--flame_fit.focal_ratio", "0"], "--flame_fit.focal_ratio must be > 0, got 0.0"),
    ("track", ["--image_scale", "-2"], "--image_scale must be > 0, got -2.0"),
    ("track", ["--min_face_px", "nan"], "--min_face_px must be a finite number (>= 1), got nan"),
    ("animate", ["--max_frames", "-1"], "--max_frames must be >= 0, got -1"),
    ("animate", ["--fps", "nan"], "--fps must be a finite number (> 0), got nan"),
    ("animate", ["--mix", "inf"], "--mix must be a finite number, got inf"),
    ("animate", ["--reenact.flame_fit.jaw_std", "-1"], "--reenact.flame_fit.jaw_std must be > 0, got -1.0"),
    ("animate", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("animate", ["--stride", "0"], "--stride must be >= 1, got 0"),
    ("interpolate", ["--frames", "0"], "--frames must be >= 1, got 0"),
    ("interpolate", ["--orbit", "nan"], "--orbit must be a finite number, got nan"),
    ("interpolate", ["--width", "1"], "--width must be >= 2, got 1"),
    ("interpolate", ["--fill=-inf"], "--fill must be a finite number (> 0), got -inf"),
    ("viewer", ["--port", "99999"], "--port must be >= 0 and <= 65535, got 99999"),
    ("viewer", ["--port", "-1"], "--port must be >= 0 and <= 65535, got -1"),
    ("viewer", ["--port", "nan"], "--port expects int, got 'nan'"),
]


@pytest.mark.parametrize("script,argv,line", ENTRY_CASES, ids=[f"{c[0]}{''.join(c[1])}" for c in ENTRY_CASES])
def test_entry_points_refuse_bad_numbers_up_front(tmp_path, capsys, script, argv, line):
    import importlib

    mod = importlib.import_module(script)
    with pytest.raises(SystemExit) as ei:
        mod.main(["--checkpoint", str(tmp_path / "none.pt"), "--out" if script != "viewer" else "--ply_dir",
                  str(tmp_path / "o"), *argv])
    assert ei.value.code == 2
    assert capsys.readouterr().err.strip() == f"{script}.py: error: {line}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,line", [
    (["--blur", "nan"], "--blur must be a finite number (>= 0), got nan"),
    (["--img_scale", "inf"], "--img_scale must be a finite number (> 0), got inf"),
    (["--img_width", "0"], "--img_width must be >= 1, got 0"),
    (["--frame", "-3"], "--frame must be >= 0, got -3"),
])
def test_preprocess_refuses_bad_numbers(tmp_path, capsys, argv, line):
    from utils.preprocess import projection_ply

    assert projection_ply.main(["--data_root", str(tmp_path / "none"), *argv]) == 2
    assert capsys.readouterr().err.strip() == f"projection_ply: error: {line}"


def test_motion_select_refuses_negative_max_frames():
    import torch

    from models.flame import FlameParams
    from utils.motion import Motion

    m = Motion(FlameParams.neutral(5), torch.arange(5).numpy(), "keyframes", "test")
    assert m.select(0, 1, 0).params.num_frames == 5
    assert m.select(0, 1, 4).params.num_frames == 4
    with pytest.raises(ValueError, match="--max_frames must be >= 0"):
        m.select(0, 1, -1)  # [: -1] used to drop the last frame silently
