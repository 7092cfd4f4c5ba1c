"""Atomic writes: every output of the project is written under a unique temporary next to its final name, flushed
to disk and renamed into place (a crash never leaves a half-written file; a full disk gives an error naming the file),
and the temporaries a killed run left behind are removed."""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any, Callable

# Every output of the project is written under a temporary name unique to the process and call, next to its final
# name (same folder, so the rename is atomic), created with O_EXCL (never an existing file, never through a planted
# symlink), flushed to disk and renamed over the final name (a symlink planted there is replaced, not followed).
# The temporary keeps the final suffix (OpenCV and numpy pick the format from it): ".head.ply.<pid>.<hex>.tmp.ply".
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(?:\.[^./]*)?")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


def _open_temp(path: Path) -> tuple[IO[bytes], Path]:
    """A new temporary file next to ``path`` whose name is unique to this process and call (two runs writing the
    same file never share a temporary); returned open for binary writing.  Created with the permissions of a plain
    ``open`` (umask applies), so the renamed file gets them too."""
    while True:
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), tmp


def _is_disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _failed(path: Path, tmp: Path, exc: BaseException) -> None:
    """Remove the temporary after a failed write; raise an OSError naming ``path`` for a full disk or an OS error
    that does not name it (the original error otherwise)."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass
    if _is_disk_full(exc):
        raise OSError(errno.ENOSPC, f"no space left on the device of {path.parent} while writing {path.name} "
                      f"(nothing was replaced; the partial file was removed): free some space and run again"
                      ) from exc
    if isinstance(exc, OSError) and type(exc).__module__ == "builtins" and str(path) not in str(exc):
        raise type(exc)(exc.errno, f"could not write {path} ({exc.strerror or exc}; nothing was replaced)") from exc


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path``, flush it to disk, then rename it into place.

    A crash (kill -9 included) never leaves a half-written ``path``: it holds the old content or the new one.  On any
    error the temporary file is removed; a full disk (ENOSPC) becomes an OSError naming the folder and the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh, tmp = _open_temp(path)
    try:
        with fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _failed(path, tmp, exc)
        raise
    return path


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """:func:`atomic_write` for writers that need a file name (OpenCV's VideoWriter and imwrite, trimesh, ...):
    ``write(tmp)`` writes the reserved temporary (same suffix as ``path``), which is then flushed and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh, tmp = _open_temp(path)  # reserved with O_EXCL, so the writer opens a file of ours
    fh.close()
    try:
        write(tmp)
        if tmp.is_symlink() or not tmp.is_file():
            raise OSError(errno.EIO, f"writing {path} produced no file")
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        _failed(path, tmp, exc)
        raise
    return path


def remove_orphan_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that writers of this project (:data:`TEMP_NAME`) left in ``folder`` when killed
    (kill -9, power loss) and return them.  Call only while holding the folder's :class:`FolderLock`: no other run
    writes there then, so every such file is an orphan (those of this process are kept)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = TEMP_NAME.fullmatch(p.name)
            if m and int(m["pid"]) != os.getpid() and (p.is_file() or p.is_symlink()):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=1).encode()))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))
