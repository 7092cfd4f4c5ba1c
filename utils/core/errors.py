"""How every entry point reports an error: the project's own errors (a bad input file, a bad flag value, a busy or
full output folder, a refused unsafe file) end in ONE line that names the file or flag and what was expected, and a
non-zero exit status; ``--debug`` shows the full Python traceback instead.

Used by train.py, track.py, interpolate.py and the preprocessing scripts (utils/preprocess/common.py)::

    def main(argv=None):
        parser = build_parser()          # with add_debug_flag(parser)
        return run_main("track.py", lambda: work(parser.parse_args(argv)), argv)
"""
from __future__ import annotations

import argparse
import pickle
import sys
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

# The exception types the project raises for bad input (messages name the file/flag); anything else is a bug and
# keeps its traceback.  OSError covers missing files, the lock on --out and a full disk.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, IndexError, FloatingPointError,
                                                 pickle.UnpicklingError)
EXIT_ERROR = 2  # the status argparse uses for a bad command line


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full Python traceback instead of the one-line message")


def wants_debug(argv: Sequence[str] | None) -> bool:
    """Whether the command line asks for --debug (read before the full parse, whose own errors it must cover)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "--debug" in args


def error_line(exc: BaseException) -> str:
    """The message of a project error on one line (KeyError without its quotes, OSError without "[Errno N]" when
    the message is the project's own)."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is None and len(exc.args) == 2:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def run_main(prog: str, fn: Callable[[], T], argv: Sequence[str] | None = None) -> T:
    """Run ``fn``; a project error prints ``<prog>: error: <message>`` to stderr and exits with EXIT_ERROR (raises
    SystemExit), unless ``--debug`` is in ``argv`` (default sys.argv), which lets the traceback through."""
    try:
        return fn()
    except USER_ERRORS as exc:
        if wants_debug(argv):
            raise
        print(f"{prog}: error: {error_line(exc)}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR) from None
