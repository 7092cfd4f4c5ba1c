"""Small file helpers shared by every entry point: atomic writes, safe loading of torch files, the lock on an
output folder, and image/video input and output."""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------- atomic writes
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


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=1).encode()))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode()))


# ---------------------------------------------------------------------------------------------- names from data files
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


# ---------------------------------------------------------------------------------------------- safe loading
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


# ---------------------------------------------------------------------------------------------- output-folder lock
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


# ---------------------------------------------------------------------------------------------- images
_IMAGE_END = {".jpg": (b"\xff\xd9",), ".jpeg": (b"\xff\xd9",), ".png": (b"IEND\xaeB`\x82",)}


def image_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(w, h) of an image from its header; ValueError naming the file when it is no readable image."""
    from PIL import Image

    path = Path(path)
    check_image_pixels(path, what)  # a declared size too large to decode is refused here already, by name
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... without the path
        raise ValueError(f"cannot read the {what} {path}: {_image_damage(path, exc)}") from exc


def _image_damage(path: Path, exc: BaseException | None = None) -> str:
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        return "the file is empty (0 bytes); expected a JPEG or PNG image"
    reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return f"the file ({size} bytes) is not a complete JPEG or PNG image{reason}; copy or export it again"


def check_image_complete(path: str | os.PathLike, what: str = "image") -> None:
    """Raise ValueError naming ``path`` when a JPEG or PNG file is truncated or damaged.

    Decoders (OpenCV included) accept a JPEG cut after its header and fill the missing rows with grey, so the end
    marker is checked (cheap); only a file without it is decoded in full by PIL, which fails on real truncation and
    accepts a complete image with trailing bytes after its end marker."""
    from PIL import Image

    path = Path(path)
    ends = _IMAGE_END.get(path.suffix.lower())
    if ends is None:
        return
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64))
        tail = fh.read().rstrip(b"\x00\r\n\t ")
    if tail.endswith(ends):
        return
    try:
        im = Image.open(path)
    except Exception as exc:  # not even a header: empty, random bytes, another format, cut inside the header
        raise ValueError(f"cannot decode the {what} {path}: {_image_damage(path, exc)}") from exc
    try:
        with im:
            im.load()
    except Exception as exc:
        raise ValueError(f"{what} {path} is truncated or damaged: {_image_damage(path, exc)}") from exc


def cv2_path(path: str | os.PathLike, what: str = "file") -> str:
    """``path`` as the str that OpenCV's path-taking functions (VideoCapture, VideoWriter) get, or ValueError naming
    it when its name is not valid UTF-8: OpenCV crashes the whole process (segfault, no message) on such a str
    (undecodable bytes arrive as lone surrogates).  Images never need this: :func:`imread_file` and
    :func:`imwrite_file` pass bytes, not paths, to OpenCV."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the {what} path {text.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8, which "
                         f"OpenCV cannot open: rename it (or the folder) with a UTF-8 name") from None
    return text


MAX_IMAGE_PIXELS = 120_000_000  # larger images are refused before decoding (a 120-megapixel RGB photo: 360 MB)


def check_image_pixels(path: str | os.PathLike, what: str = "image") -> None:
    """ValueError naming the file when its header declares more than MAX_IMAGE_PIXELS pixels (width x height, read
    from the header without decoding): a small file can declare a huge image (a 389 KB PNG of 20000 x 20000 pixels
    allocated ~10 GB when decoded), and every decoder allocates the declared size first."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError as exc:  # PIL's own limit (2 x its MAX_IMAGE_PIXELS) is below ours too
        raise ValueError(f"{what} {path}: {exc}; this project decodes at most {MAX_IMAGE_PIXELS / 1e6:.0f} "
                         f"megapixels: scale the image down first") from None
    except Exception:  # not an image PIL knows: the decoder reports it (with the path)
        return
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} {path} declares {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), more than the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels this project decodes (refused before decoding): "
                         f"scale the image down first")


def imread_file(path: str | os.PathLike, flags: int) -> np.ndarray | None:
    """``cv2.imread`` for any path: Python reads the bytes, ``cv2.imdecode`` decodes them (same flags, EXIF
    orientation included), so a file name that is not UTF-8 works instead of crashing OpenCV.  None when the bytes
    are no image OpenCV decodes (as cv2.imread)."""
    import cv2

    check_image_pixels(path)  # before any decoder allocates the declared size
    buf = np.fromfile(os.fspath(path), dtype=np.uint8)
    if buf.size == 0:
        return None
    return cv2.imdecode(buf, flags)


def imwrite_file(path: str | os.PathLike, img: np.ndarray, params: Sequence[int] = ()) -> Path:
    """``cv2.imwrite`` for any path (format from the suffix): ``cv2.imencode`` in memory, then an atomic write of the
    bytes (:func:`atomic_write`), so a name that is not UTF-8 works and a crash never leaves half a file."""
    import cv2

    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(img), list(params))
    if not ok:
        raise OSError(f"OpenCV could not encode the image {path} (format {path.suffix!r})")
    return atomic_write(path, lambda fh: fh.write(buf.tobytes()))


def read_image(path: str | os.PathLike, what: str = "image", mode: str = "color") -> np.ndarray:
    """Read a complete image file as float32 in [0, 1] (8- or 16-bit files).

    ``mode``: "color" -> (H, W, 3) RGB (OpenCV's IMREAD_COLOR: EXIF orientation applied); "gray" -> (H, W);
    "unchanged" -> the stored channels, colour as RGB and alpha dropped.  Errors name the file and what was expected
    (missing, empty, truncated, undecodable)."""
    import cv2

    flags = {"color": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE, "unchanged": cv2.IMREAD_UNCHANGED}
    if mode not in flags:
        raise ValueError(f"read_image: mode must be one of {sorted(flags)}, got {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    check_image_pixels(path, what)  # first: a decompression bomb is refused before anything decodes it
    check_image_complete(path, what)  # OpenCV would decode a truncated JPEG with grey rows
    img = imread_file(path, flags[mode])
    if img is None:
        raise ValueError(f"cannot decode the {what} {path}: {_image_damage(path)}")
    maxval = 65535.0 if img.dtype == np.uint16 else 255.0
    if img.ndim == 3:
        img = img[..., :3][..., ::-1]  # BGR(A) -> RGB, alpha dropped
    return np.ascontiguousarray(img).astype(np.float32) / maxval


def to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8 RGB (uint8 input is returned as is)."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def fit_height(image: np.ndarray, height: int) -> np.ndarray:
    """uint8 or float (h, w, 3) -> uint8 (height, w * height / h, 3)."""
    import cv2

    img = to_uint8(image)
    if img.shape[0] != height:
        w = max(2, int(round(img.shape[1] * height / img.shape[0])))
        img = cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA if img.shape[0] > height else cv2.INTER_LINEAR)
    return img


def save_image(path: str | os.PathLike, image: Tensor | np.ndarray) -> Path:
    """Write an (H, W, 3) RGB float image in [0, 1] as PNG/JPEG (by extension)."""
    import cv2

    path = Path(path)
    rgb = to_uint8(image)
    return imwrite_file(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # atomic, never through a link planted at ``path``


def save_image_grid(path: str | os.PathLike, image: Tensor | np.ndarray) -> Path:
    """Alias of save_image for an already tiled grid (kept for readability at call sites)."""
    return save_image(path, image)


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float = 25.0) -> Path:
    """Write uint8 RGB frames (H, W, 3) as an MP4 (OpenCV, mp4v codec); sizes are made even for players.  ``frames``
    may be any iterable (a generator keeps one frame in memory at a time; see :class:`VideoStream`)."""
    with VideoStream(path, fps) as stream:
        for f in frames:
            stream.write(f)
    if not stream.count:
        raise ValueError("write_video needs at least one frame")
    return stream.path


def read_video_frames(path: str | os.PathLike, frame_ids: Sequence[int] | np.ndarray | None = None, start: int = 0,
                      stride: int = 1, max_frames: int = 0) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Frames of a video file (OpenCV, read in order) -> (RGB uint8 frames (H, W, 3), their indices in the video (N,)
    int64, frames per second (25 when the file does not say)).

    Which frames: ``frame_ids`` (indices; reading stops after the last one wanted, those past the video's end are left
    out), else start, start + stride, ... (at most ``max_frames``; 0 = all; a ValueError when none is left).  A file
    OpenCV cannot open is a ValueError.  (:class:`VideoStream` is the writer.)"""
    import cv2

    if start < 0 or stride < 1 or max_frames < 0:
        raise ValueError(f"video frame selection needs start >= 0, stride >= 1 and max_frames >= 0, got start={start}, "
                         f"stride={stride}, max_frames={max_frames}")
    path = Path(path)
    cap = cv2.VideoCapture(cv2_path(path, "video"))
    if not cap.isOpened():
        raise ValueError(f"cannot open the video {path} (a format OpenCV reads: mp4, avi, mov, mkv, webm)")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 25.0
    want = None if frame_ids is None else {int(i) for i in frame_ids}
    frames, ids, i = [], [], 0
    try:
        while (not max_frames or len(frames) < max_frames) and (want is None or len(ids) < len(want)):
            ok, frame = cap.read()
            if not ok:
                break
            if (i in want) if want is not None else (i >= start and (i - start) % stride == 0):
                frames.append(np.ascontiguousarray(frame[..., ::-1]))  # BGR -> RGB
                ids.append(i)
            i += 1
    finally:
        cap.release()
    if not frames and want is None:
        raise ValueError(f"{path}: no frames to use (the video has {i} frames; start {start}, stride {stride})")
    return frames, np.asarray(ids, dtype=np.int64), fps


class VideoStream:
    """An MP4 written one frame at a time (a long motion never holds its frames in memory: a 1e6-frame motion at
    256 x 256 would be 196 GB).  Encoded into a temporary next to ``path`` (unique, O_EXCL, same suffix) and renamed
    by :meth:`close`; leaving the ``with`` block on an error removes the temporary, so there is never a half-written
    MP4 and never a write through a link planted at ``path``.

    ``write(frame)``: (H, W, 3) uint8 RGB, every frame of one size (odd sizes are cropped to even ones)."""

    def __init__(self, path: str | os.PathLike, fps: float = 25.0) -> None:
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"video frame rate must be a finite number > 0, got {fps!r}")
        self.path, self.fps = Path(path), float(fps)
        self.count = 0
        self.size: tuple[int, int] | None = None  # (w, h) of the frames given
        self._writer = None
        self._tmp: Path | None = None

    def write(self, frame: np.ndarray) -> None:
        import cv2

        h, w = frame.shape[:2]
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh, self._tmp = _open_temp(self.path)  # reserved with O_EXCL: the encoder opens a file of ours
            fh.close()
            self.size = (w, h)
            self._writer = cv2.VideoWriter(cv2_path(self._tmp, "video"), cv2.VideoWriter_fourcc(*"mp4v"), self.fps,
                                           (w - w % 2, h - h % 2))
            if not self._writer.isOpened():
                raise OSError(f"OpenCV could not open a video writer for {self.path}")
        if (w, h) != self.size:
            raise ValueError(f"all video frames must be {self.size[0]}x{self.size[1]}, got {w}x{h}")
        w2, h2 = w - w % 2, h - h % 2
        self._writer.write(cv2.cvtColor(np.ascontiguousarray(frame[:h2, :w2]), cv2.COLOR_RGB2BGR))
        self.count += 1

    def close(self) -> Path:
        """Finish the video and rename it into place; returns its path."""
        if self._writer is None:
            raise ValueError(f"{self.path}: a video needs at least one frame")
        self._writer.release()
        self._writer = None
        tmp, self._tmp = self._tmp, None
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException as exc:
            _failed(self.path, tmp, exc)
            raise
        return self.path

    def abort(self) -> None:
        """Drop the video: the temporary is removed, ``path`` is left as it was."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> "VideoStream":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._writer is not None:
            self.close()

