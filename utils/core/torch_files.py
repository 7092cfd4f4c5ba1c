"""Torch files of this project: written atomically with tensors and plain containers only
(:func:`atomic_torch_save`), read back with ``torch.load(weights_only=True)`` (:func:`safe_torch_load`,
:func:`load_tagged`), so loading a file from someone else runs no code."""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from utils.core.atomic import atomic_write

_PLAIN_LEAVES = (Tensor, str, bytes, int, float, bool, type(None), torch.dtype, torch.device)


def non_plain_entry(obj: Any, where: str = "") -> str | None:
    """Where ``obj`` holds something other than tensors, str/bytes/numbers/bool/None, dtypes, devices and
    dict/list/tuple containers of them (e.g. "['meta']['score']: numpy.float32"), or None when it holds nothing else.
    Such plain objects are what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, _PLAIN_LEAVES):
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = non_plain_entry(k, f"{where}[key {k!r}]") or non_plain_entry(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = non_plain_entry(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where or 'the object'}: {type(obj).__module__}.{type(obj).__qualname__}"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint.

    Only tensors and plain containers are written (TypeError otherwise, naming the entry), so that
    ``safe_torch_load`` (``torch.load(weights_only=True)``) reads every file back: convert numpy values, dataclasses
    and other objects to tensors, numbers or dicts first."""
    bad = non_plain_entry(obj)
    if bad is not None:
        raise TypeError(f"{path}: not written: {bad} is not a tensor or plain value (files of this project are read "
                        f"with torch.load(weights_only=True))")
    return atomic_write(path, lambda fh: torch.save(obj, fh))


class UnsafeFileError(ValueError):
    """A file holds a Python object that a safe load does not create (loading it could run code)."""


def _refused_global(exc: BaseException) -> str | None:
    """The class/function that a weights-only torch.load refused (from its message), or None when the load failed
    for another reason (a damaged or foreign file: every payload names a global before it can run)."""
    m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(exc))
    return m.group(1) if m else None


def safe_torch_load(path: str | os.PathLike, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, no code runs.

    A file that needs anything else (a pickled class or function, e.g. a ``__reduce__`` payload) is refused with
    UnsafeFileError naming the file and the class; a truncated or foreign file gives ValueError.  Every file this
    project writes (model.pt, code.pt, checkpoints, also those of earlier versions) holds only tensors and plain
    containers, so nothing it wrote is refused.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # zip/pickle damage surfaces as RuntimeError, OSError, EOFError, UnpicklingError, ...
        refused = _refused_global(exc) if isinstance(exc, pickle.UnpicklingError) else None
        if refused is not None:
            raise UnsafeFileError(
                f"{path}: refused to load this {what}: it holds the Python object {refused}, which files written by "
                f"this project never contain, and loading it could run code. Use a file written by this project "
                f"(re-export it from a trusted copy) or delete this one") from exc
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:")[1].strip()  # the reason, without torch's advice
        first = (text.splitlines() or [""])[0].split(". ")[0]
        raise ValueError(f"{path} is not a readable {what} (truncated or corrupt? {type(exc).__name__}: "
                         f"{first})") from exc


def load_tagged(path: str | os.PathLike, fmt: str, what: str, missing_hint: str, wrong: str) -> dict:
    """Safely load (:func:`safe_torch_load`) a dict written with ``{"format": fmt, ...}``; clear errors for a
    missing, unreadable, unsafe or foreign file (``what`` names the kind of file, ``missing_hint`` says how to make
    it, ``wrong`` completes "<path> ..." for a file of another kind)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} ({missing_hint})")
    doc = safe_torch_load(path, what)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"{path} {wrong}")
    return doc
