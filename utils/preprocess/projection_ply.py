"""Project the FLAME face mask into every camera (z-buffered), optionally mask the photos.

Needs FLAME2PLY.py's output (``<t>.ply`` and ``<t>_facemask*.ply``) and the calibration.  For each camera of each
subject it writes into ``timesteps/frame_<t>/``:

    flamemask_proj/cam_<serial>.png        uint8 mask, 255 = face (0/255 unless --blur), at the images-2x size
                                           times --img_scale (or --img_width x --img_height)
    filled_masked_images/cam_<serial>.png  with --mask_images: photo * mask + bg_color * (1 - mask)

Visibility: the face-mask triangles are rasterized together with the whole FLAME head ``<t>.ply``, which only
occludes; a pixel is "face" where a face-mask triangle is the nearest surface (so the back of the head, ears or
the nose hide face parts that lie behind them).  --mask_type head writes the silhouette of the whole FLAME head
instead (training uses the face mask; "head" is for inspection or other methods).

Example (from the repository root):
    python utils/preprocess/projection_ply.py --data_root /data/nersemble --mask_images --bg_color black
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.camera import Camera  # noqa: E402
from models.renderer.mesh_raster import render_mask  # noqa: E402
from utils.core.device import default_device
from utils.core.images import imwrite_file, to_uint8  # noqa: E402
from utils.data.nersemble import FACEMASK_SUFFIX, NersembleSubject  # noqa: E402
from utils.face.masks import masked_photo, soft_mask  # noqa: E402
from utils.preprocess.common import (  # noqa: E402
    Outputs,
    add_overwrite_arg,
    add_quiet_arg,
    add_subject_args,
    atomic_write,
    iter_subjects,
    make_parser,
    plan_outputs,
    progress,
    script_main,
)

MASK_TYPES = ("facemask", "head")
NAMED_COLORS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "gray": (0.5, 0.5, 0.5), "grey": (0.5, 0.5, 0.5)}


def parse_facemask_level(s: str) -> int:
    """'0'..'3', or a file suffix: 'facemask', 'facemask_subd', 'subd2', '_facemask_subd3' -> level."""
    s = str(s).strip()
    if s.isdigit() and int(s) in FACEMASK_SUFFIX:
        return int(s)
    for level, suffix in FACEMASK_SUFFIX.items():
        if s.lstrip("_") in (suffix.lstrip("_"), suffix.replace("_facemask_", "").lstrip("_")):
            return level
    raise argparse.ArgumentTypeError(f"--facemask must be a level 0-3 or one of "
                                     f"{[s.lstrip('_') for s in FACEMASK_SUFFIX.values()]}, got {s!r}")


def parse_bg_color(s: str) -> tuple[float, float, float]:
    """'black'/'white'/'gray', 'R,G,B' in 0-255 (integers) or in 0-1 (any value with a '.') -> RGB in [0, 1]."""
    s = str(s).strip().lower()
    if s in NAMED_COLORS:
        return NAMED_COLORS[s]
    parts = [p for p in s.replace(" ", ",").split(",") if p]
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"--bg_color must be black, white, gray or 'R,G,B', got {s!r}")
    rgb = tuple(v if "." in s else v / 255.0 for v in vals)
    if not all(0.0 <= v <= 1.0 for v in rgb):
        raise argparse.ArgumentTypeError(f"--bg_color {s!r} is outside 0-255 (integers) / 0-1 (decimals)")
    return rgb  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="projection_ply.py")
    add_subject_args(p)
    p.add_argument("--facemask", type=parse_facemask_level, default=0, metavar="LEVEL",
                   help="which face-mask mesh to project: subdivision level 0-3 (<t>_facemask.ply, "
                        "<t>_facemask_subd.ply, ...) or its name (facemask, facemask_subd, subd2, subd3); the "
                        "levels cover the same surface, 0 is fastest")
    p.add_argument("--mask_type", choices=MASK_TYPES, default="facemask",
                   help="facemask: face-mask triangles visible in front of the whole head (what training "
                        "uses); head: silhouette of the whole FLAME head")
    p.add_argument("--img_scale", type=float, default=1.0,
                   help="output size = images-2x size times this factor")
    p.add_argument("--img_width", type=int, default=None, help="output width in pixels (overrides --img_scale)")
    p.add_argument("--img_height", type=int, default=None, help="output height in pixels (overrides --img_scale)")
    p.add_argument("--blur", type=float, default=0.0,
                   help="Gaussian blur of the mask, sigma in output pixels (0 = hard 0/255 mask)")
    p.add_argument("--mask_images", action="store_true",
                   help="also write filled_masked_images/cam_<serial>.png = photo * mask + bg * (1 - mask)")
    p.add_argument("--bg_color", type=parse_bg_color, default="black",
                   help="background of the masked images: black, white, gray, 'R,G,B' in 0-255, or '0.5,0.5,0.5'")
    p.add_argument("--serials", nargs="+", default=None, help="cameras to process (default: every image present)")
    p.add_argument("--device", default=None,
                   help="torch device for rasterization (when not given: cuda if available, else cpu)")
    add_overwrite_arg(p)
    add_quiet_arg(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def output_size(cam: Camera, img_scale: float, img_width: Optional[int], img_height: Optional[int]) -> tuple[int, int]:
    """(w, h) of the outputs for a camera of the stored image size; one of width/height alone keeps the aspect."""
    if img_width is None and img_height is None:
        return max(1, round(cam.width * img_scale)), max(1, round(cam.height * img_scale))
    if img_width is not None and img_height is not None:
        return int(img_width), int(img_height)
    if img_width is not None:
        return int(img_width), max(1, round(cam.height * img_width / cam.width))
    return max(1, round(cam.width * img_height / cam.height)), int(img_height)


def _write_png(path: Path, img: np.ndarray) -> None:
    """uint8 (H, W) gray or (H, W, 3) RGB -> PNG."""
    arr = img[..., ::-1] if img.ndim == 3 else img
    imwrite_file(path, arr)


def load_meshes(subject: NersembleSubject, mask_type: str,
                level: int) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Mesh to rasterize: verts (V, 3), faces (F, 3), paint (F,) bool or None (= every face paints)."""
    head_v, head_f = subject.flame_mesh()
    if mask_type == "head":
        return head_v, head_f, None
    fm_v, fm_f = subject.facemask_mesh(level)
    verts = np.concatenate([head_v, fm_v])
    faces = np.concatenate([head_f, fm_f + len(head_v)])
    paint = np.zeros(len(faces), dtype=bool)
    paint[len(head_f):] = True
    return verts, faces, paint


def process_subject(subject: NersembleSubject, args: argparse.Namespace, device: torch.device) -> Outputs:
    import cv2

    out = Outputs()
    serials = list(args.serials) if args.serials else subject.serials()
    if not serials:
        raise FileNotFoundError(f"no images in {subject.image_dir} (expected cam_<serial>.jpg/.png)")
    todo: dict[str, list[Path]] = {}
    for s in serials:
        paths = [subject.facemask_path(s)] + ([subject.masked_image_path(s)] if args.mask_images else [])
        want = plan_outputs(paths, args.overwrite, out, f"{subject.subject_id} cam {s}: ", verbose=not args.quiet)
        if want:
            todo[s] = want
    if not todo:
        return out
    cams = subject.cameras(serials=list(todo))  # FileNotFoundError naming camera_params.json when missing
    verts, faces, paint = load_meshes(subject, args.mask_type, args.facemask)
    v_t = torch.as_tensor(verts, dtype=torch.float32, device=device)
    f_t = torch.as_tensor(faces, dtype=torch.int64, device=device)
    p_t = None if paint is None else torch.as_tensor(paint, device=device)
    for s in progress(todo, desc=f"{subject.subject_id} cameras", args=args, leave=False, unit="cam"):
        cam = cams[s]
        w, h = output_size(cam, args.img_scale, args.img_width, args.img_height)
        cam = cam.resized(w, h).to(device)
        mask = render_mask(v_t, f_t, cam, paint_faces=p_t).cpu().numpy()
        m = soft_mask(mask, args.blur)
        if subject.facemask_path(s) in todo[s]:
            atomic_write(subject.facemask_path(s), lambda p: _write_png(p, to_uint8(m)), out)
        if subject.masked_image_path(s) in todo[s]:
            img = subject.image(s)
            if img.shape[:2] != (h, w):
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if w < img.shape[1] else cv2.INTER_LINEAR)
            filled = masked_photo(img, m, args.bg_color)
            atomic_write(subject.masked_image_path(s), lambda p: _write_png(p, to_uint8(filled)), out)
    return out


def run(args: argparse.Namespace) -> Outputs:

    if isinstance(args.bg_color, str):  # argparse applies `type` to string defaults, direct callers may not
        args.bg_color = parse_bg_color(args.bg_color)
    if args.img_scale <= 0:
        raise ValueError(f"--img_scale must be > 0, got {args.img_scale}")
    if args.blur < 0:
        raise ValueError(f"--blur must be >= 0, got {args.blur}")
    device = torch.device(args.device) if args.device else default_device()
    out = Outputs()
    for subject in iter_subjects(args, "projection_ply"):
        out.extend(process_subject(subject, args, device))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    return script_main(build_parser, run, "projection_ply", argv)


if __name__ == "__main__":
    sys.exit(main())
