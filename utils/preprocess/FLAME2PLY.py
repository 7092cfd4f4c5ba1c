"""Posed FLAME meshes of one frame (--frame) or several (--frames) as PLY files, for every subject.

From the NeRSemble FLAME tracking (``<subject>/sequences/<seq>/annotations/tracking/FLAME2023_v2/
tracked_flame_params.npz``) and the FLAME model in --flame_dir, write into ``timesteps/frame_<t>/``:

    <t>.ply                     the whole FLAME mesh in world space (vertex order = FLAME's)
    <t>_facemask.ply            the face-mask sub-mesh (FLAME_mask_vertexID.npy or the FLAME_masks.pkl regions),
                                plus the triangles closing the mouth when FLAME_masks.pkl (its "lips") is present
    <t>_facemask_subd.ply       the face mask after 1 midpoint subdivision (levels 2, 3: _subd2, _subd3);
                                each level's vertices are a prefix of the next
    flame_cano2world.txt        4x4 FLAME-model-to-world similarity [scale * R | t]

Example (from the repository root):
    python utils/preprocess/FLAME2PLY.py --data_root /data/nersemble --flame_dir data --max_level 3
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.flame import FlameModel, face_mask_topology, subdivide
from utils.data.nersemble import NersembleSubject, tracking_row  # noqa: E402
from utils.preprocess.common import (  # noqa: E402
    Outputs,
    add_flame_dir_arg,
    add_overwrite_arg,
    add_quiet_arg,
    add_subject_args,
    atomic_write,
    iter_subjects,
    log,
    make_parser,
    plan_outputs,
    script_main,
)

MAX_LEVEL = 3


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="FLAME2PLY.py")
    add_subject_args(p)
    add_flame_dir_arg(p)
    p.add_argument("--max_level", type=int, default=MAX_LEVEL, choices=range(0, MAX_LEVEL + 1),
                   help="highest face-mask subdivision level to write (level 3 of real FLAME has ~187k vertices)")
    p.add_argument("--no_close_mouth", action="store_true",
                   help="do not add the triangles that close the mouth to the face mask")
    add_overwrite_arg(p)
    add_quiet_arg(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def write_ply(path: Path, verts: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY, vertex order kept (float32 x y z, int32 vertex_indices)."""
    from plyfile import PlyData, PlyElement

    v = np.asarray(verts, dtype=np.float32)
    f = np.asarray(faces, dtype=np.int32)
    vert_el = np.empty(len(v), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    vert_el["x"], vert_el["y"], vert_el["z"] = v[:, 0], v[:, 1], v[:, 2]
    face_el = np.empty(len(f), dtype=[("vertex_indices", "i4", (3,))])
    face_el["vertex_indices"] = f
    PlyData([PlyElement.describe(vert_el, "vertex"), PlyElement.describe(face_el, "face")],
            text=False, byte_order="<").write(str(path))


def output_paths(subject: NersembleSubject, max_level: int) -> dict[str, Path]:
    """{key: path} of everything this script writes for ``subject`` (keys: full, level0..N, cano2world)."""
    out = {"full": subject.flame_mesh_path}
    for level in range(max_level + 1):
        out[f"level{level}"] = subject.facemask_mesh_path(level)
    out["cano2world"] = subject.cano2world_path
    return out


class LazyFlame:
    """FlameModel + face-mask topology (models.flame.face_mask_topology), loaded on first use.

    A re-run with every output present loads nothing."""

    def __init__(self, flame_dir: Path, close_mouth: bool = True) -> None:
        self.flame_dir, self.close_mouth = Path(flame_dir), close_mouth
        self._flame, self._topo = None, None

    def get(self):
        if self._flame is None:

            self._flame = FlameModel.from_data_dir(self.flame_dir)
            if self.close_mouth and not (self.flame_dir / "FLAME_masks.pkl").is_file():
                log(f"note: {self.flame_dir / 'FLAME_masks.pkl'} not found; the face mask is not closed at the mouth")
            self._topo = face_mask_topology(self._flame, self.flame_dir, self.close_mouth)
        return self._flame, self._topo


def process_subject(subject: NersembleSubject, model: LazyFlame, max_level: int, overwrite: bool,
                    verbose: bool = True) -> Outputs:
    """Write the meshes of one subject/frame (only the missing ones unless ``overwrite``)."""

    out = Outputs()
    paths = output_paths(subject, max_level)
    todo = set(plan_outputs(list(paths.values()), overwrite, out, f"{subject.subject_id}: ", verbose))
    if not todo:
        return out
    params = subject.tracking()  # names the npz when missing, and the key when it holds NaN/Inf
    flame, topo = model.get()
    row = tracking_row(subject.tracking_path, subject.frame, params.num_frames)
    params = params.frame(row)
    with torch.no_grad():
        verts = flame(params)[0].cpu().numpy().astype(np.float64)  # (V, 3) world
        cano2world = flame.model_to_world(params)[0].cpu().numpy().astype(np.float64)
    if not (np.isfinite(verts).all() and np.isfinite(cano2world).all()):  # else a misleading subdivision error
        raise ValueError(f"{subject.tracking_path}: FLAME posed with frame row {row} of this tracking has NaN or Inf "
                         f"vertices; expected finite tracked parameters of a plausible size (track it again)")
    faces = flame.faces.cpu().numpy()
    mask_ids, mask_faces = topo
    fm_v = verts[mask_ids]
    fm_f = mask_faces
    levels = [(fm_v, fm_f)] + (subdivide(fm_v, fm_f, max_level) if max_level > 0 else [])

    def emit(key: str, writer) -> None:
        if paths[key] in todo:
            atomic_write(paths[key], writer, out)

    emit("full", lambda p: write_ply(p, verts, faces))
    for level, (lv, lf) in enumerate(levels):
        emit(f"level{level}", lambda p, lv=lv, lf=lf: write_ply(p, lv, lf))
    emit("cano2world", lambda p: np.savetxt(p, cano2world, fmt="%.10g"))
    return out


def run(args: argparse.Namespace) -> Outputs:
    """Write the PLYs of every selected subject; returns what was written/skipped."""
    model = LazyFlame(Path(args.flame_dir), close_mouth=not args.no_close_mouth)
    out = Outputs()
    for subject in iter_subjects(args, "FLAME2PLY"):
        out.extend(process_subject(subject, model, args.max_level, args.overwrite, not args.quiet))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    return script_main(build_parser, run, "FLAME2PLY", argv)


if __name__ == "__main__":
    sys.exit(main())
