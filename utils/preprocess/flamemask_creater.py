"""Make the face-mask vertex list ``FLAME_mask_vertexID.npy`` from FLAME's ``FLAME_masks.pkl``.

The face mask is the union of FLAME_masks.pkl regions (default: face, lips, nose, left/right eyeball,
left/right eye_region), stored as sorted unique int64 vertex ids (3,007 vertices for FLAME 2023).
FLAME2PLY.py cuts the face-mask mesh with it (and closes the mouth with the "lips" region).

Example (from the repository root):
    python utils/preprocess/flamemask_creater.py --flame_dir data
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from models.flame import FACE_MASK_REGIONS, FLAME_URL, MASK_VERTEX_IDS, MASKS_PKL, load_pickle_no_chumpy
from utils.preprocess.common import (  # noqa: E402
    Outputs,
    add_flame_dir_arg,
    add_overwrite_arg,
    atomic_write,
    make_parser,
    plan_outputs,
    script_main,
)


def build_parser() -> argparse.ArgumentParser:

    p = make_parser(__doc__, prog="flamemask_creater.py")
    add_flame_dir_arg(p)
    p.add_argument("--masks_pkl", default=None,
                   help=f"FLAME vertex-mask file (default: <flame_dir>/{MASKS_PKL})")
    p.add_argument("--regions", nargs="+", default=list(FACE_MASK_REGIONS), metavar="REGION",
                   help="FLAME_masks.pkl regions whose union is the face mask")
    p.add_argument("--out", default=None, help=f"output .npy (default: <flame_dir>/{MASK_VERTEX_IDS})")
    add_overwrite_arg(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def mask_vertex_ids(masks_pkl: Path, regions: Sequence[str]) -> np.ndarray:
    """(M,) sorted unique int64 vertex ids: the union of ``regions`` of ``masks_pkl``."""

    masks_pkl = Path(masks_pkl)
    if not masks_pkl.is_file():
        raise FileNotFoundError(f"FLAME vertex masks not found: {masks_pkl} (FLAME_masks.pkl ships with the FLAME "
                                f"download, {FLAME_URL}; put it in --flame_dir or pass --masks_pkl)")
    masks = load_pickle_no_chumpy(masks_pkl)
    if not isinstance(masks, dict):
        raise ValueError(f"{masks_pkl}: expected a dict of region name -> vertex ids, got {type(masks).__name__}")
    missing = [r for r in regions if r not in masks]
    if missing:
        raise ValueError(f"{masks_pkl}: no region(s) {missing}; it has {sorted(masks)}")
    ids = np.concatenate([np.asarray(masks[r]).reshape(-1) for r in regions])
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        if not np.allclose(ids, np.round(ids)):
            raise ValueError(f"{masks_pkl}: regions {list(regions)} hold non-integer vertex ids")
    return np.unique(ids.astype(np.int64))


def run(args: argparse.Namespace) -> Outputs:

    flame_dir = Path(args.flame_dir)
    pkl = Path(args.masks_pkl) if args.masks_pkl else flame_dir / MASKS_PKL
    dst = Path(args.out) if args.out else flame_dir / MASK_VERTEX_IDS
    out = Outputs()
    if not plan_outputs([dst], args.overwrite, out):
        return out
    ids = mask_vertex_ids(pkl, args.regions)
    atomic_write(dst, lambda p: np.save(p, ids), out)
    print(f"{dst}: {ids.size} vertices from regions {', '.join(args.regions)}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    return script_main(build_parser, run, "flamemask_creater", argv)


if __name__ == "__main__":
    sys.exit(main())
