"""Names and relative paths read from data files (or flags) that become file and folder names: checked to stay one
safe path component, or a path inside their folder (:class:`UnsafeNameError` otherwise)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# One path component: letters, digits and _ . + = @ , - ; not starting with '.' or '-' (no hidden files, no "..",
# nothing an argument parser reads as a flag), no '/', '\\' or control characters.  NeRSemble's ids ("017"),
# serials ("222200037"), sequences ("EXP-1-head", "EMO-1-shout+laugh") and frame folders ("frame_00000") all match.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=@,-]{0,199}")


class UnsafeNameError(ValueError):
    """A name read from a data file (or a flag) would not stay one file name inside its folder."""


def safe_name(name: Any, what: str, source: str | os.PathLike) -> str:
    """``name`` when it can be used as one path component (see ``SAFE_NAME``), else UnsafeNameError (one line naming
    ``source``, the file or flag the name came from, and ``what`` it is, e.g. "subject id").

    Why: ids, serials, sequence and frame names in data files (synthetic_info.json, camera_params.json, ...) become
    folder and file names that are written, read and deleted; ``../x`` or ``/x`` would reach outside the dataset
    or the output folder."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise UnsafeNameError(
            f"{source}: {what} {name!r} is not a safe file name (expected letters, digits and _.+=@,- only, not "
            f"starting with '.' or '-', no '..'); refusing to use it as a path")
    return name


def safe_child(folder: str | os.PathLike, name: Any, what: str, source: str | os.PathLike, prefix: str = "",
               suffix: str = "") -> Path:
    """``folder/<prefix><name><suffix>`` after :func:`safe_name`, checked to resolve inside ``folder`` (an existing
    entry that is a symlink pointing elsewhere is refused too, so a write or delete never follows it out)."""
    safe_name(name, what, source)
    folder = Path(folder)
    child = folder / f"{prefix}{name}{suffix}"
    real_folder = os.path.realpath(folder)
    if os.path.dirname(os.path.realpath(child)) != real_folder:
        raise UnsafeNameError(f"{source}: {what} {name!r}: {child} resolves outside {folder} (a symbolic link?); "
                              f"refusing to use it")
    return child


def safe_relative(folder: str | os.PathLike, rel: Any, what: str, source: str | os.PathLike) -> Path:
    """``folder/rel`` for a relative path read from a data file (e.g. INSTA's "images/00000.png"), when it is not
    absolute and resolves (symlinks included) inside ``folder``; else UnsafeNameError naming ``source``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel):
        raise UnsafeNameError(f"{source}: {what} {rel!r} must be a relative path inside {folder}")
    folder = Path(folder)
    real_folder, real = os.path.realpath(folder), os.path.realpath(folder / rel)
    if os.path.commonpath([real_folder, real]) != real_folder:
        raise UnsafeNameError(f"{source}: {what} {rel!r} resolves outside {folder}; refusing to use it")
    return folder / rel
