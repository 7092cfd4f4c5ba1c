"""Generate the synthetic NeRSemble-format dataset (FLAME-format model + subject folders rendered from known heads).

Usage (from the repository root):
    python utils/make_synthetic_dataset.py --out data/synthetic
    python utils/make_synthetic_dataset.py --out /tmp/syn --num_identities 4 --num_heldout 1 --image_size 64
    python utils/make_synthetic_dataset.py --out /tmp/seq --num_frames 8      # sequences: 8 frames per subject
    python utils/make_synthetic_dataset.py --out /tmp/turn --num_identities 0 --num_heldout 1 --num_frames 30 \
        --motion head_turn                          # held-out identity 017 turning its head (a monocular video)
    python utils/make_synthetic_dataset.py --out /tmp/e546 --image_size 100 --eyeball_vertices 546  # FLAME's eyeballs

Re-running with the same arguments does nothing; more identities are added without changing existing ones.
See utils/data/synthetic/dataset.py for what is written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Scripts run from the repository root; make the project importable when started as utils/make_synthetic_dataset.py.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.core.device import resolve_device
from utils.data.synthetic.dataset import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_HELDOUT,
    DEFAULT_NUM_IDENTITIES,
    make_synthetic_dataset,
)
from utils.data.synthetic.flame_mesh import EYEBALL_VERTICES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write a synthetic dataset in the real NeRSemble layout: <out>/flame (FLAME-format model files), "
        "<out>/subjects/<id>/... (calibration, FLAME tracking, 16 images-2x JPEGs) and <out>/synthetic_info.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True,
                   help="output folder (created; must be empty or an earlier synthetic dataset)")
    p.add_argument("--num_identities", type=int, default=DEFAULT_NUM_IDENTITIES,
                   help='number of training identities (subject ids "300", "301", ...)')
    p.add_argument("--num_heldout", type=int, default=DEFAULT_NUM_HELDOUT,
                   help="number of held-out test identities (protocol ids 017, 030, 033, ...; at most 8)")
    p.add_argument("--image_size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="HEIGHT in pixels of the written images-2x (width = round(S*1100/1604)); the calibration is "
                   "for frames twice that size, as in real NeRSemble (images-2x = 1100x1604 of 2200x3208)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (FLAME model and every identity)")
    p.add_argument("--subdivision", type=int, default=None,
                   help="subdivision levels of the ground-truth head mesh (default: 0 up to 160 px, 1 up to 400, "
                   "2 up to 1000, else 3)")
    p.add_argument("--num_frames", type=int, default=1,
                   help="frames per subject: frame 0 is neutral; frames 1..N-1 get non-neutral FLAME expression, jaw, "
                   "neck and eye parameters (tracking npz) and their 16 images in timesteps/frame_<t>/images-2x/ "
                   "(1 = the single neutral frame, byte-identical to datasets written before sequences existed)")
    p.add_argument("--motion", default="expressions", choices=["expressions", "head_turn"],
                   help="what frames 1..N-1 carry: expressions (expression, jaw, neck, eyes) or head_turn (the same "
                   "plus a global head rotation, +-35 deg yaw and +-15 deg pitch over the clip: the frontal "
                   "camera's frames form a monocular head-turning video, the other 15 cameras are novel views)")
    p.add_argument("--eyeball_vertices", type=int, default=EYEBALL_VERTICES,
                   help="vertices of each eyeball of the synthetic FLAME model: 162 (an icosphere; the datasets of "
                   "generator version 2) or FLAME's own 546 (a latitude/longitude sphere, 17 rings of 32 plus the "
                   "poles, denser at the front), to test eye handling on FLAME's eyeball layout")
    p.add_argument("--device", default="cpu",
                   help="device that renders the ground truth (cpu keeps the dataset bit-identical across machines; "
                   "auto or cuda is faster for large images)")
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate everything even if --out already holds a synthetic dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    device = resolve_device(args.device)
    t0 = time.time()
    out = make_synthetic_dataset(
        args.out,
        num_identities=args.num_identities,
        num_heldout=args.num_heldout,
        image_size=args.image_size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=not args.quiet,
        subdivision=args.subdivision,
        device=device,
        num_frames=args.num_frames,
        motion=args.motion,
        eyeball_vertices=args.eyeball_vertices,
    )
    print(f"synthetic dataset ready in {out} ({time.time() - t0:.1f} s): subjects in {out / 'subjects'}, "
          f"FLAME files in {out / 'flame'}, split in {out / 'synthetic_info.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
