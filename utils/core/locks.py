"""The lock of one process on an output folder (:class:`FolderLock`) and a run's claim on the files it writes there
(:class:`OutputClaim`)."""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from utils.core.atomic import atomic_write_json
from utils.core.names import UnsafeNameError


class FolderInUseError(OSError):
    """Another process holds the lock on an output folder."""


class FolderLock:
    """Exclusive lock of one process on an output folder (``<folder>/.lock``).

    Held with an fcntl record lock, which the kernel drops when the process ends (kill -9 included), so a crashed
    run never leaves a stale lock behind.  The lock belongs to the process: taking it again in the same process
    succeeds (several Trainer objects of one program may share a folder; it is released when the last of them
    releases it), another process gets FolderInUseError naming who holds it (pid, host, start time and command,
    written into the lock file).  Linux and macOS.
    """

    NAME = ".lock"
    # folder -> [descriptor, holders] of this process.  Needed because closing ANY descriptor of a file drops all
    # of the process's record locks on it: one descriptor per folder, closed when its last holder releases.
    _held: dict[str, list[int]] = {}

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._key: str | None = None

    def acquire(self) -> "FolderLock":
        import fcntl

        if self._key is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in self._held:
            self._held[key][1] += 1
            self._key = key
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise FolderInUseError(errno.EBUSY, f"{self.folder} is in use by another run ({self.holder()}); wait for "
                                   f"it to finish, stop it, or choose another output folder") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._held[key] = [fd, 1]
        self._key = key
        return self

    def holder(self) -> str:
        """Who holds the lock, as written into the lock file by its holder."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "holder unknown"
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}: {info.get('command')}"

    def release(self) -> None:
        """Give up this holder's share; the last one closes the descriptor, which releases the lock."""
        if self._key is None:
            return
        entry = self._held.get(self._key)
        self._key = None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            for key, val in list(self._held.items()):
                if val is entry:
                    del self._held[key]
            os.close(entry[0])

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class OutputClaim:
    """One run's claim on its output folder: the lock first, then the set of files it will write, recorded.

    ``with OutputClaim(out, "animate") as claim:`` locks ``out`` (:class:`FolderLock`: a second run into the same
    folder stops at once, naming the holder) for the whole run.  ``claim.plan(names, overwrite)`` (paths relative
    to ``out``) then refuses a folder that holds any of those files, or any file an earlier run of the same tool
    recorded, unless ``overwrite``; with ``overwrite`` it deletes exactly the files the earlier run recorded as its
    own and nothing else (a user's ``frames/frame_00001.png`` that this run does not write stays; one it writes is
    replaced).  The plan is recorded in ``<out>/.<tool>_outputs.json`` before anything is written, so a run killed
    halfway still owns its partial outputs; ``claim.finish()`` marks the set complete, after its last file.
    """

    def __init__(self, out: str | os.PathLike, tool: str) -> None:
        self.out = Path(out)
        self.tool = tool
        self.record = self.out / f".{tool}_outputs.json"
        self.lock = FolderLock(self.out)
        self.files: list[str] = []

    def __enter__(self) -> "OutputClaim":
        self.lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lock.release()

    def _own(self, rel: Any) -> Path:
        """``out/rel`` for a recorded name: relative, no "..", its folder inside ``out`` (the entry itself is never
        followed: it is only unlinked)."""
        norm = os.path.normpath(rel) if isinstance(rel, str) and rel and "\x00" not in rel else ""
        if not norm or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
            raise UnsafeNameError(f"{self.record}: recorded output {rel!r} is not a path inside {self.out}; delete "
                                  f"{self.record.name} (and the files you do not want) by hand")
        path = self.out / norm
        real_out, real_parent = os.path.realpath(self.out), os.path.realpath(path.parent)
        if os.path.commonpath([real_out, real_parent]) != real_out:
            raise UnsafeNameError(f"{self.record}: recorded output {rel!r} lies outside {self.out} (a linked folder?)")
        return path

    def previous(self) -> list[str]:
        """The files an earlier run of this tool recorded in ``out`` (checked to lie inside it)."""
        if not self.record.is_file():
            return []
        try:
            doc = json.loads(self.record.read_text())
            files = doc["files"]
            assert isinstance(files, list)
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.record} is not a record of {self.tool} outputs ({type(exc).__name__}); delete "
                             f"it, or choose another --out") from exc
        for rel in files:
            self._own(rel)
        return [str(rel) for rel in files]

    def check(self, names: Sequence[str], overwrite: bool) -> list[str]:
        """Without ``overwrite``: FileExistsError naming the folder and some of the files when any of ``names``
        exists or an earlier run's record does (call with no names to stop at once, before the outputs are known).
        Returns the files the earlier run recorded."""
        if self.lock._key is None:
            raise RuntimeError("OutputClaim used outside its 'with' block (the folder is not locked)")
        for rel in names:
            self._own(rel)
        previous = self.previous()
        found = [rel for rel in dict.fromkeys([*names, *previous, self.record.name])
                 if os.path.lexists(self.out / rel)]
        if found and not overwrite:
            shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise FileExistsError(f"{self.out} already holds output of an earlier run ({shown}); pass --overwrite to "
                                  f"replace it, or choose another --out")
        return previous

    def plan(self, names: Sequence[str], overwrite: bool) -> None:
        """Claim ``names`` (relative to ``out``): see the class docstring and :meth:`check`."""
        previous = self.check(names, overwrite)
        if overwrite:
            removed = 0
            for rel in previous:  # only what an earlier run recorded as its own; never a folder, never followed
                path = self._own(rel)
                if path.is_symlink() or path.is_file():
                    path.unlink()
                    removed += 1
            if removed:
                print(f"--overwrite: removed {removed} file(s) of the previous {self.tool} run in {self.out}")
        self.files = list(names)
        atomic_write_json({"tool": self.tool, "files": self.files, "finished": False}, self.record)

    def finish(self) -> None:
        """Mark the set complete (call after the last output is written)."""
        atomic_write_json({"tool": self.tool, "files": self.files, "finished": True}, self.record)
