"""Shared machinery of the preprocessing scripts: argparse flags, subject iteration, idempotent writes.

Every script in utils/preprocess/ is a thin wrapper: ``build_parser()`` adds its own flags to the shared ones
defined here, ``run(args)`` does the work and returns an :class:`Outputs` record (what was written / skipped),
``main(argv)`` parses and runs.  Tests call ``run(parse_args([...]))`` without a subprocess.

Idempotency: an output that already exists is skipped (and reported) unless ``--overwrite`` is given.  Files are
written to a temporary name in the same folder and renamed into place, so an interrupted run never leaves a
truncated file that a later run would mistake for a finished one.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from utils.core.atomic import atomic_write_path
from utils.core.config import Range, check_ranges, check_text, check_value
from utils.core.errors import add_debug_flag, run_main
from utils.data.nersemble import DEFAULT_SEQUENCE, NersembleSubject, list_subjects

DEFAULT_FLAME_DIR = "data"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show meaningful defaults and keep the module docstring's line breaks in --help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def make_parser(description: Optional[str], prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_debug_flag(parser)
    return parser


def add_subject_args(parser: argparse.ArgumentParser, frame: bool = True) -> None:
    """--data_root, --subjects/--subject_id, --sequence, --frame."""
    g = parser.add_argument_group("subjects")
    g.add_argument("--data_root", required=True,
                   help="folder holding the NeRSemble subject folders (<data_root>/<subject_id>/calibration/...)")
    g.add_argument("--subjects", "--subject_id", dest="subjects", nargs="+", default=None, metavar="ID",
                   help="subject ids to process (--subject_id is an alias); default: every subject in --data_root")
    g.add_argument("--sequence", default=DEFAULT_SEQUENCE, help="sequence folder under <subject>/sequences/")
    if frame:
        g.add_argument("--frame", type=int, default=0,
                       help="frame (timestep) index; files go to timesteps/frame_<frame:05d>/")
        g.add_argument("--frames", nargs="+", default=None, metavar="T",
                       help="several frames instead of --frame: indices, or 'all' for every timesteps/frame_<t> "
                            "folder of the sequence (a whole NeRSemble sequence, or a synthetic one from "
                            "make_synthetic_dataset.py --num_frames)")


def add_flame_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flame_dir", default=DEFAULT_FLAME_DIR,
                        help="folder with the FLAME files (flame2023.pkl, flame_static_embedding.pkl, "
                             "FLAME_mask_vertexID.npy or FLAME_masks.pkl)")


def add_overwrite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="rewrite outputs that already exist (without it they are skipped, and listed)")


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only errors and a summary line")


@dataclass
class Outputs:
    """What a run wrote and what it skipped because it existed (paths)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    def extend(self, other: "Outputs") -> None:
        self.written += other.written
        self.skipped += other.skipped

    def summary(self, what: str) -> str:
        s = f"{what}: wrote {len(self.written)} file(s)"
        if self.skipped:
            s += f", skipped {len(self.skipped)} existing file(s) (pass --overwrite to rewrite them)"
        return s


def subjects_of(args: argparse.Namespace) -> list[str]:
    """The subject ids to process: ``args.subjects`` or every subject under ``args.data_root``."""
    if args.subjects:
        root = Path(args.data_root)
        missing = [s for s in args.subjects if not (root / s).is_dir()]
        if missing:
            have = list_subjects(root) if root.is_dir() else []
            raise FileNotFoundError(f"subject folder(s) {missing} not found under {root} (subjects there: {have})")
        return list(args.subjects)
    ids = list_subjects(args.data_root)
    others = sorted(p.name for p in Path(args.data_root).iterdir()
                    if p.is_dir() and not p.name.startswith(".") and p.name not in ids)
    if others:  # say so: a subject whose calibration is missing would otherwise vanish silently
        log(f"note: ignoring folder(s) without calibration/camera_params.json in {args.data_root}: {others}")
    return ids


def frames_of(args: argparse.Namespace, subject: NersembleSubject) -> list[int]:
    """The frames to process for one subject: ``--frames`` (indices, or "all" = every frame folder), else
    ``--frame``."""
    frames = getattr(args, "frames", None)
    if not frames:
        return [int(getattr(args, "frame", 0))]
    if [str(f).lower() for f in frames] == ["all"]:
        found = subject.frames()
        if not found:
            raise FileNotFoundError(f"no frame folders (frame_<t>) in {subject.sequence_dir / 'timesteps'}")
        return found
    try:
        out = [int(f) for f in frames]
    except ValueError as exc:
        raise ValueError(f"--frames takes frame indices or 'all', got {frames}") from exc
    check_value("frames", out, Range(0))
    return out


def iter_subjects(args: argparse.Namespace, desc: str) -> Iterator[NersembleSubject]:
    """NersembleSubject of each selected subject and frame (``--frame``, or each of ``--frames``), with a tqdm bar
    over the subjects."""
    ids = subjects_of(args)
    for sid in progress(ids, desc=desc, args=args, unit="subject"):
        first = NersembleSubject(args.data_root, sid, sequence=args.sequence, frame=getattr(args, "frame", 0))
        for t in frames_of(args, first):
            yield NersembleSubject(args.data_root, sid, sequence=args.sequence, frame=t)


def progress(it: Iterable, desc: str, args: Optional[argparse.Namespace] = None, **kw) -> Iterable:
    """tqdm over ``it`` unless ``--quiet``; bars are left in place only at the outermost level."""
    disable = bool(getattr(args, "quiet", False)) if args is not None else False
    return tqdm(it, desc=desc, disable=disable, dynamic_ncols=True, leave=kw.pop("leave", True), **kw)


def log(msg: str) -> None:
    """Print without breaking tqdm bars."""
    tqdm.write(msg, file=sys.stdout)


def pending(paths: Sequence[Path], overwrite: bool) -> list[Path]:
    """The outputs that must be (re)written: all with ``overwrite``, else those that do not exist yet."""
    return list(paths) if overwrite else [p for p in paths if not Path(p).exists()]


def plan_outputs(paths: Sequence[Path], overwrite: bool, outputs: Outputs, label: str = "",
                 verbose: bool = True) -> list[Path]:
    """Split ``paths`` into to-write (returned) and skipped (recorded in ``outputs`` and printed)."""
    todo = pending(paths, overwrite)
    skipped = [p for p in paths if p not in todo]
    if skipped:
        outputs.skipped += skipped
        if verbose:
            names = ", ".join(Path(p).name for p in skipped[:4]) + (" ..." if len(skipped) > 4 else "")
            log(f"skip {label}{len(skipped)} existing file(s) in {Path(skipped[0]).parent}: {names}")
    return todo


def atomic_write(path: Path, write: Callable[[Path], None], outputs: Optional[Outputs] = None) -> None:
    """Call ``write(tmp)`` for a temporary file next to ``path``, then rename it into place
    (:func:`utils.core.atomic.atomic_write_path`: unique O_EXCL temporary with the same suffix, which writers such as
    cv2.imwrite pick the format from; removed on failure) and record ``path`` in ``outputs``."""
    atomic_write_path(path, write)
    if outputs is not None:
        outputs.written.append(path)


# Allowed values of the numeric flags of the preprocessing scripts (each script has some of them).
PREPROCESS_RANGES = {"frame": Range(0), "out_frame": Range(0), "img_width": Range(1), "img_height": Range(1),
                     "img_scale": Range(0, lo_open=True), "blur": Range(0), "max_level": Range(0)}


def script_main(build_parser: Callable[[], argparse.ArgumentParser], run: Callable[[argparse.Namespace], Outputs],
                what: str, argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, run, print the summary; missing inputs exit with status 2 and a one-line message."""
    args = build_parser().parse_args(argv)

    def checked_run(args: argparse.Namespace) -> Outputs:
        # every numeric flag before any work: NaN / inf never, and the ranges of the flags these scripts share
        check_ranges(args, {k: v for k, v in PREPROCESS_RANGES.items() if hasattr(args, k)})
        check_text(args)  # paths OpenCV would crash on
        frames = getattr(args, "frames", None)
        if frames and [str(f).lower() for f in frames] != ["all"]:
            try:
                check_value("frames", [int(f) for f in frames], Range(0))
            except (TypeError, ValueError) as exc:
                raise ValueError(str(exc) if str(exc).startswith("--frames") else
                                 f"--frames takes frame indices >= 0 or 'all', got {frames}") from exc
        return run(args)

    try:
        out = run_main(what, lambda: checked_run(args), argv)
    except SystemExit as exc:
        return int(exc.code)
    print(out.summary(what))
    return 0
