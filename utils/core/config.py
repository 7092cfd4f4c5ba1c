"""Typed dataclass configuration: YAML presets plus command-line overrides of any (nested) key.

A config is a dataclass whose fields are plain values or nested dataclasses. ``add_config_args`` turns every leaf into
a ``--section.key`` flag (help text from the field's ``metadata["help"]`` or its trailing ``# comment``), and
``build_config`` merges defaults <- YAML preset <- command line, rejecting unknown keys with a clear message.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import re
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from utils.core.atomic import atomic_write_text
from utils.core.errors import add_debug_flag

T = TypeVar("T")


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comments`` of a dataclass's field lines, used as --help text when no metadata is given.  A
    comment-only line whose text starts in the same column as the field line's comment text continues it (a help
    longer than one source line); any other line ends it."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    name, col = None, -1  # the field whose comment may continue, and the column of its comment text
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            name, col = m.group(1), m.start(2)
            out[name] = m.group(2).strip()
            continue
        c = re.match(r"\s*#\s*(.+)$", line)
        if name is not None and c and c.start(1) == col:
            out[name] += " " + c.group(1).strip()
        else:
            name = None
    return out


def _leaf_fields(cls: type, prefix: str = ""):
    """Yield (dotted name, field, resolved type, owning class) for every non-dataclass leaf."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, Any)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, name + ".")
        else:
            yield name, f, tp, cls


def _parse_value(text: str, tp: Any, name: str) -> Any:
    """Convert a command-line string to the field's type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if text.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true/false, got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError as exc:
            raise ValueError(f"--{name} expects {tp.__name__}, got {text!r}") from exc
    if origin in (list, tuple):
        try:
            val = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            val = [v for v in text.split(",") if v != ""]
        if not isinstance(val, (list, tuple)):
            val = [val]
        inner = args[0] if args else str
        if inner in (int, float, str):
            val = [inner(v) for v in val]
        return list(val) if origin is list else tuple(val)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def add_config_args(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None) -> None:
    """Add one ``--dotted.key`` flag per leaf of dataclass ``cls`` (values stay strings until build_config).

    ``aliases`` maps short flags to dotted keys, e.g. {"data_root": "data.root"} adds ``--data_root``.
    """
    group = parser.add_argument_group("configuration (any key of the YAML preset)")
    rev = {v: k for k, v in (aliases or {}).items()}
    comments: dict[type, dict[str, str]] = {}
    for name, f, tp, owner in _leaf_fields(cls):
        if owner not in comments:
            comments[owner] = _field_comments(owner)
        help_text = f.metadata.get("help") or comments[owner].get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        flags = [f"--{name}"] + ([f"--{rev[name]}"] if name in rev else [])
        group.add_argument(
            *flags, dest=f"cfg:{name}", default=None, metavar=tname.upper(),
            help=f"{help_text} (default: {default!r})".replace("%", "%%"),  # argparse formats help with %
        )


def _set(obj: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def _merge_dict(cfg: Any, data: dict, where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping at {prefix or 'top level'}, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for key, val in data.items():
        if key not in names:
            raise ValueError(
                f"{where}: unknown config key {prefix + key!r}; valid keys here: {sorted(names)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _merge_dict(getattr(cfg, key), val, where, prefix + key + ".")
        else:
            setattr(cfg, key, _coerce(val, tp, where, prefix + key))


def _coerce(val: Any, tp: Any, where: str, name: str) -> Any:
    """Light type check of YAML values (ints accepted for floats, lists for tuples)."""
    if val is None:
        return None
    base = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if base is typing.Union:
        return val
    if tp is float and isinstance(val, int) and not isinstance(val, bool):
        return float(val)
    if base in (list, tuple):
        if not isinstance(val, (list, tuple)):
            raise ValueError(f"{where}: {name} must be a list, got {val!r}")
        return list(val) if base is list else tuple(val)
    if tp in (int, float, str, bool) and not isinstance(val, tp):
        raise ValueError(f"{where}: {name} must be {tp.__name__}, got {val!r}")
    del args
    return val


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (presets live in configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    return data


def build_config(cls: type[T], yaml_path: str | Path | None = None, args: argparse.Namespace | None = None,
                 overrides: dict[str, Any] | None = None) -> T:
    """defaults <- YAML preset <- parsed ``--dotted.key`` flags <- ``overrides`` (dotted keys, typed values)."""
    cfg = cls()
    if yaml_path:
        _merge_dict(cfg, load_yaml(yaml_path), str(yaml_path))
    types = {name: tp for name, _, tp, _ in _leaf_fields(cls)}
    if args is not None:
        for key, text in vars(args).items():
            if key.startswith("cfg:") and text is not None:
                name = key[4:]
                _set(cfg, name, _parse_value(text, types[name], name))
    for name, value in (overrides or {}).items():
        if name not in types:
            raise ValueError(f"unknown config key {name!r}")
        _set(cfg, name, value)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict, where: str = "checkpoint") -> T:
    cfg = cls()
    _merge_dict(cfg, data, where)
    return cfg


def save_yaml(cfg: Any, path: str | Path) -> None:

    atomic_write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), path)


def add_cli_config(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None,
                   flags: Sequence[str] = (), lists: Sequence[str] = ()) -> None:
    """``add_config_args`` plus: boolean keys in ``flags`` also work as bare switches (``--loop`` = ``--loop
    true``), keys in ``lists`` take several values (``--identities a b c`` as well as ``--identities a,b,c``)."""
    add_config_args(parser, cls, aliases)
    for action in parser._actions:
        key = action.dest[4:] if action.dest.startswith("cfg:") else None
        if key in flags:
            action.nargs, action.const = "?", "true"
            action.help = (action.help or "") + " [a bare flag means true]"
        elif key in lists:
            action.nargs = "+"


def config_parser(description: str | None, cls: type, config_default: str | None = None,
                  aliases: dict[str, str] | None = None, flags: Sequence[str] = (), lists: Sequence[str] = (),
                  debug: bool = True) -> argparse.ArgumentParser:
    """The parser of an entry point: ``--config`` (a YAML preset, ``config_default`` when given), ``--debug`` (see
    utils/core/errors.py) and one flag per key of the dataclass ``cls`` (:func:`add_cli_config`)."""

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_default is None:
        parser.add_argument("--config", default=None, help="optional YAML file with any of the keys below")
    else:
        parser.add_argument("--config", default=config_default, help="YAML preset (default: %(default)s)")
    if debug:
        add_debug_flag(parser)
    add_cli_config(parser, cls, aliases=aliases, flags=flags, lists=lists)
    return parser


def parse_cli_config(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None,
                     lists: Sequence[str] = ()):
    """Parse ``argv`` into (namespace, config): defaults <- ``--config`` YAML <- command line."""
    args = parser.parse_args(argv)
    overrides = {}
    for key in lists:
        val = getattr(args, f"cfg:{key}", None)
        if isinstance(val, list):  # nargs="+": split any comma lists, keep the strings as given
            overrides[key] = [p for v in val for p in str(v).split(",") if p]
            setattr(args, f"cfg:{key}", None)
    cfg = build_config(cls, getattr(args, "config", None), args, overrides=overrides)
    check_ranges(cfg)  # every numeric flag, before any work (the config's RANGES; NaN / inf never)
    check_text(cfg)  # and every path: valid UTF-8
    return args, cfg


class Range(typing.NamedTuple):
    """Allowed values of a numeric config key: ``lo``/``hi`` bounds (None: unbounded), open or closed."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return " and ".join(parts) or "a number"


def check_value(name: str, value: Any, rng: Range | None = None) -> None:
    """ValueError naming ``--name`` unless ``value`` is a finite number (in ``rng`` when given) or None (unset).

    NaN and +-inf are refused for every numeric flag: no flag of this project means anything with them, and they
    pass every ``<`` / ``>`` test silently (a NaN decay gave an all-NaN average style; inf hung loops)."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for v in value:
            check_value(name, v, rng)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if rng is None:
            return
        raise ValueError(f"--{name} must be a number ({rng.describe()}), got {value!r}")
    bounds = rng.describe() if rng is not None and (rng.lo is not None or rng.hi is not None) else ""
    if not math.isfinite(value):
        raise ValueError(f"--{name} must be a finite number{f' ({bounds})' if bounds else ''}, got {value!r}")
    if bounds and not rng.contains(value):
        raise ValueError(f"--{name} must be {bounds}, got {value!r}")


def config_ranges(cls: type, prefix: str = "") -> dict[str, Range]:
    """The ``RANGES`` class attributes of the dataclass ``cls`` and of its nested dataclass fields, as dotted keys
    (a config declares its own allowed values next to its fields; the nested ones come along)."""
    out = {f"{prefix}{k}": v for k, v in (getattr(cls, "RANGES", None) or {}).items()}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name)
        if dataclasses.is_dataclass(tp):
            out.update(config_ranges(tp, f"{prefix}{f.name}."))
    return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_text(cfg: Any) -> None:
    """ValueError naming the flag for the first text value of ``cfg`` (a config dataclass or an argparse Namespace)
    that is not valid UTF-8.  Such values are paths whose bytes the file system allows but OpenCV crashes on
    (segfault, no message); refusing them up front is one clear line instead of a crash minutes later."""
    if dataclasses.is_dataclass(cfg):
        items = [(name, _get(cfg, name)) for name, *_ in _leaf_fields(type(cfg))]
    else:
        items = list(vars(cfg).items())
    for name, value in items:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"--{name}: {v.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8 (OpenCV "
                                     f"cannot open such paths): rename the file or folder") from None


def check_ranges(cfg: Any, ranges: dict[str, Range] | None = None) -> None:
    """Raise ValueError naming the flag for the first numeric value of ``cfg`` that is NaN / inf or lies outside its
    Range (checked before any work starts, so a bad value never runs for minutes or writes an empty result).

    ``cfg``: a config dataclass (every numeric leaf is checked; Ranges: the classes' ``RANGES`` plus ``ranges``) or
    an argparse Namespace (its float / int attributes, and ``ranges``).  None means unset and is not checked."""
    ranges = dict(ranges or {})
    if dataclasses.is_dataclass(cfg):
        ranges = {**config_ranges(type(cfg)), **ranges}
        names = [name for name, *_ in _leaf_fields(type(cfg))]
    else:
        names = [k for k, v in vars(cfg).items() if isinstance(v, (int, float, list, tuple))]
    for name in dict.fromkeys([*names, *ranges]):
        check_value(name, _get(cfg, name), ranges.get(name))
