"""Convert one frame of an INSTA (monocular) actor into a NeRSemble subject folder with one camera.

INSTA actor folder (Zielonka et al., CVPR 2023; 512x512 frames tracked with metrical-tracker):

    transforms.json / transforms_train.json / transforms_val.json / transforms_test.json
        w, h, cx, cy, fl_x, fl_y (pixels) and "frames": [{file_path, transform_matrix, mesh_path, exp_path}, ...];
        transform_matrix is camera-to-world in the OpenGL/Blender convention (x right, y up, camera looks along -z)
    images/<id>.png, meshes/<id>.obj (tracked FLAME mesh), flame/exp/<id>.txt (expression coefficients)

Written (``<out_root>/<subject_id>/``), camera serial 222200037 (NeRSemble's frontal camera, the one the tracking /
fitting step uses):

    calibration/camera_params.json       world_2_cam in OpenCV convention (y and z camera axes flipped), intrinsics
                                         in pixels of the written image, width/height = that image's size
    sequences/<seq>/timesteps/frame_<t>/images-2x/cam_222200037.<png|jpg>    the frame (resized if asked)
    sequences/<seq>/annotations/tracking/FLAME2023_v2/tracked_flame_params.npz   NeRSemble-format tracking, 1 frame

What INSTA provides and what not: the expression comes from flame/exp/<id>.txt (zero-padded to 100
coefficients, truncated with a warning if longer); the identity shape only if a shape file exists
(--shape_file, or flame/shape.txt / flame/shape.npy / identity.npy in the actor folder; otherwise zeros = the
FLAME mean head, and FLAME2PLY's meshes will not match the person).  INSTA bakes the head pose into the camera and
the mesh, so rotation = identity, translation = 0, scale = 1; jaw, neck and eye poses are not converted (zeros).
The tracked mesh meshes/<id>.obj is not used.

Example (from the repository root):
    python utils/preprocess/insta2nersemble.py --insta_dir /data/insta --actor wojtek_1 --frame 0 \\
        --out_root /data/insta_nersemble --subject_id wojtek_1
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.camera import Camera  # noqa: E402
from models.flame import NUM_EXPRESSION, NUM_SHAPE, FlameParams, save_nersemble_tracking
from utils.core.images import imread_file, imwrite_file  # noqa: E402
from utils.core.names import safe_name, safe_relative
from utils.data.camera_params import write_camera_params
from utils.data.nersemble import (
    CALIBRATION_RELPATH,
    DEFAULT_IMAGE_FOLDER,
    DEFAULT_SEQUENCE,
    FRONTAL_SERIAL,
    TRACKING_RELPATH,
    timestep_name,
)
from utils.preprocess.common import (  # noqa: E402
    Outputs,
    add_overwrite_arg,
    atomic_write,
    make_parser,
    plan_outputs,
    script_main,
)

TRANSFORM_FILES = ("transforms.json", "transforms_train.json", "transforms_val.json", "transforms_test.json")
SHAPE_FILES = ("flame/shape.txt", "flame/shape.npy", "identity.npy", "shape.txt")
# OpenGL camera (x right, y up, looks along -z) -> OpenCV camera (x right, y down, looks along +z)
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="insta2nersemble.py")
    p.add_argument("--insta_dir", required=True, help="INSTA data folder (holding actor folders, or one actor)")
    p.add_argument("--actor", default=None, help="actor folder name inside --insta_dir (default: --insta_dir is it)")
    p.add_argument("--transforms", default=None,
                   help=f"transforms file inside the actor folder (default: search {', '.join(TRANSFORM_FILES)})")
    p.add_argument("--frame", type=int, default=0,
                   help="INSTA frame to convert: the frame whose image file name is this number (e.g. 00000.png "
                        "for 0); when names are not numbers, the index in the sorted frame list")
    p.add_argument("--out_root", required=True, help="folder receiving the NeRSemble-layout subject folder")
    p.add_argument("--subject_id", default=None, help="output subject id (default: the actor name)")
    p.add_argument("--sequence", default=DEFAULT_SEQUENCE, help="output sequence name")
    p.add_argument("--out_frame", type=int, default=0, help="output timestep index (folder frame_<out_frame:05d>)")
    p.add_argument("--img_width", type=int, default=None, help="resize the image to this width (default: keep)")
    p.add_argument("--img_height", type=int, default=None, help="resize the image to this height (default: keep)")
    p.add_argument("--shape_file", default=None, help="FLAME shape coefficients (.txt or .npy) if INSTA has them")
    p.add_argument("--convention", choices=("opengl", "opencv"), default="opengl",
                   help="camera axes of transform_matrix (INSTA/Blender: opengl)")
    add_overwrite_arg(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# ---------------------------------------------------------------------------------------------- reading INSTA
def actor_dir(args: argparse.Namespace) -> Path:
    d = Path(args.insta_dir) / args.actor if args.actor else Path(args.insta_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"INSTA actor folder not found: {d}")
    return d


def _num(stem: str) -> Optional[int]:
    return int(stem) if stem.isdigit() else None


def find_frame(actor: Path, frame: int, transforms: Optional[str] = None) -> tuple[dict, dict, Path]:
    """(transforms dict, frame dict, transforms path) of INSTA frame ``frame``."""
    files = [actor / transforms] if transforms else [actor / n for n in TRANSFORM_FILES if (actor / n).is_file()]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"no INSTA transforms file in {actor} (looked for "
                                f"{transforms or ', '.join(TRANSFORM_FILES)})")
    everything = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if "frames" not in data:
            raise ValueError(f"{path} lacks the key 'frames'")
        for fr in data["frames"]:
            if "file_path" not in fr or "transform_matrix" not in fr:
                raise ValueError(f"{path}: a frame lacks 'file_path' or 'transform_matrix': {sorted(fr)}")
            everything.append((data, fr, path))
        by_id = [e for e in everything if _num(Path(e[1]["file_path"]).stem) == frame]
        if by_id:
            return by_id[0]
    if all(_num(Path(e[1]["file_path"]).stem) is None for e in everything):
        everything.sort(key=lambda e: e[1]["file_path"])
        if 0 <= frame < len(everything):
            return everything[frame]
    ids = sorted({Path(e[1]["file_path"]).stem for e in everything})
    raise ValueError(f"INSTA frame {frame} not found in {[str(f) for f in files]} (frames: {ids[:6]}"
                     f"{' ...' if len(ids) > 6 else ''})")


def _resolve(actor: Path, rel: str, exts: Sequence[str] = (), source: str | Path = "the INSTA transforms") -> Path:

    p = safe_relative(actor, rel, "file_path", source)  # a name read from the data stays inside the actor folder
    if p.is_file():
        return p
    for ext in exts:  # INSTA's file_path may omit the extension
        if p.with_suffix(ext).is_file():
            return p.with_suffix(ext)
    raise FileNotFoundError(f"INSTA file not found: {p}")


def insta_camera(meta: dict, fr: dict, convention: str = "opengl") -> Camera:
    """OpenCV Camera of an INSTA frame (K from fl_x, fl_y, cx, cy; w2c from the camera-to-world matrix)."""
    def get(k: str, default=None):
        v = fr.get(k, meta.get(k, default))
        if v is None:
            raise ValueError(f"INSTA transforms lack '{k}' (needed for the intrinsics)")
        return float(v)

    w, h = int(get("w")), int(get("h"))
    fx = get("fl_x", fr.get("fl_y", meta.get("fl_y")))
    fy = get("fl_y", fx)
    K = np.array([[fx, 0.0, get("cx", w / 2)], [0.0, fy, get("cy", h / 2)], [0.0, 0.0, 1.0]])
    c2w = np.asarray(fr["transform_matrix"], dtype=np.float64)
    if c2w.shape == (3, 4):
        c2w = np.vstack([c2w, [0, 0, 0, 1]])
    if c2w.shape != (4, 4):
        raise ValueError(f"transform_matrix of {fr.get('file_path')} has shape {c2w.shape}, expected 4x4")
    if convention == "opengl":
        c2w = c2w @ GL_TO_CV  # flip the camera's y and z axes (columns), keep its centre
    w2c = np.linalg.inv(c2w)
    return Camera(torch.tensor(K, dtype=torch.float32), w2c, w, h, FRONTAL_SERIAL)


def read_coeffs(path: Path, n: int, what: str) -> np.ndarray:
    """(1, n) coefficients from a .txt/.npy, zero-padded (or truncated with a warning) to n."""
    a = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=1)
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    if a.size > n:
        warnings.warn(f"{path}: {a.size} {what} coefficients, keeping the first {n}")
        a = a[:n]
    return np.concatenate([a, np.zeros(n - a.size)])[None]


def tracking_params(actor: Path, fr: dict, shape_file: Optional[str] = None):
    """FlameParams (T=1) in the NeRSemble convention from INSTA's per-frame files."""

    d = {k: v.numpy() for k, v in vars(FlameParams.neutral(1)).items() if isinstance(v, torch.Tensor)}
    if "exp_path" in fr:
        d["expression"] = read_coeffs(_resolve(actor, fr["exp_path"], (".txt",)), NUM_EXPRESSION, "expression")
    else:
        stem = Path(fr["file_path"]).stem
        p = actor / "flame" / "exp" / f"{stem}.txt"
        if p.is_file():
            d["expression"] = read_coeffs(p, NUM_EXPRESSION, "expression")
        else:
            warnings.warn(f"no expression for INSTA frame {stem} (no exp_path, no {p}); using zeros")
    shape = Path(shape_file) if shape_file else next((actor / s for s in SHAPE_FILES if (actor / s).is_file()), None)
    if shape is not None:
        if not shape.is_file():
            raise FileNotFoundError(f"FLAME shape file not found: {shape}")
        d["shape"] = read_coeffs(shape, NUM_SHAPE, "shape")
    return FlameParams.from_numpy(d), shape


# ---------------------------------------------------------------------------------------------- writing
def run(args: argparse.Namespace) -> Outputs:
    import cv2


    actor = actor_dir(args)
    meta, fr, tpath = find_frame(actor, args.frame, args.transforms)
    image_src = _resolve(actor, fr["file_path"], (".png", ".jpg", ".jpeg"), tpath)
    subject = safe_name(args.subject_id or actor.name, "subject id", "--subject_id" if args.subject_id else actor)
    safe_name(args.sequence, "sequence name", "--sequence")
    sdir = Path(args.out_root) / subject
    seq = sdir / "sequences" / args.sequence
    ext = ".jpg" if image_src.suffix.lower() in (".jpg", ".jpeg") else ".png"
    paths = {
        "calib": sdir / CALIBRATION_RELPATH,
        "image": seq / "timesteps" / f"frame_{timestep_name(args.out_frame)}" / DEFAULT_IMAGE_FOLDER
        / f"cam_{FRONTAL_SERIAL}{ext}",
        "tracking": seq / TRACKING_RELPATH,
    }
    out = Outputs()
    todo = set(plan_outputs(list(paths.values()), args.overwrite, out, f"{subject}: "))
    if not todo:
        return out

    cam = insta_camera(meta, fr, args.convention)
    img = imread_file(image_src, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot decode the INSTA image {image_src}")
    ih, iw = img.shape[:2]
    if (iw, ih) != (cam.width, cam.height):  # the image is the truth; transforms' w/h may be stale
        cam = cam.resized(iw, ih)
    tw = args.img_width or (round(iw * args.img_height / ih) if args.img_height else iw)
    th = args.img_height or (round(ih * args.img_width / iw) if args.img_width else ih)
    resize = (tw, th) != (iw, ih)
    cam = cam.resized(tw, th) if resize else cam

    # read every input first (the FLAME files too), so a refused name leaves no partial subject behind
    tracked = tracking_params(actor, fr, args.shape_file) if paths["tracking"] in todo else None
    if paths["calib"] in todo:
        atomic_write(paths["calib"], lambda p: write_camera_params(p, {FRONTAL_SERIAL: cam}), out)
    if paths["image"] in todo:
        if resize:
            small = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA if tw < iw else cv2.INTER_LINEAR)
            atomic_write(paths["image"], lambda p: _imwrite(p, small), out)
        else:
            atomic_write(paths["image"], lambda p: shutil.copyfile(image_src, p), out)
    if tracked is not None:
        params, shape = tracked
        if shape is None:
            print(f"note: no FLAME shape file for {actor.name} (looked for {', '.join(SHAPE_FILES)}); shape = 0")
        atomic_write(paths["tracking"],
                     lambda p: save_nersemble_tracking(p, params, frames=np.array([args.out_frame])), out)
    print(f"{tpath.name} frame {Path(fr['file_path']).name} -> {sdir} (camera {FRONTAL_SERIAL}, {tw}x{th})")
    return out


def _imwrite(path: Path, img: np.ndarray) -> None:
    imwrite_file(path, img)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return script_main(build_parser, run, "insta2nersemble", argv)


if __name__ == "__main__":
    sys.exit(main())
