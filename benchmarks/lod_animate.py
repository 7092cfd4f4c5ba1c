"""animate.py's ``--lod`` against full detail, on CPU: wall time per frame and PSNR of the frames it writes.

Runs animate.py's pipeline (utils/apps/animate/pipeline.py ``animate``) on the built-in keyframes once per ``--lods``
setting (off first: the reference), with ``--png``, and compares every written frame with the ``off`` run's: PSNR
over the whole frame and inside the face (the full-detail render's alpha > 0.5, re-rendered here from the same
posed heads).  ``--level`` above the model's own evaluates the model as benchmarks/lod_quality.py's stand-in (its
trained network on the face mask subdivided further), so a level-1 CPU model stands in for a level-3 head.  Writes a
side-by-side PNG (full | each setting | 4x difference) of one frame.

    python benchmarks/lod_animate.py --model /work/base/output/cpu/model.pt --flame_dir /work/base/syn_data/flame \\
        --level 3 --size 512 --frames 8 --png lod_animate.png
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.scratch import scratch_dir  # noqa: E402


def stand_in(model, level: int, no_filter_3d: bool):
    """``model`` with its identity field evaluated at subdivision ``level`` (lod_quality.field_at_level)."""
    from benchmarks.lod_quality import field_at_level

    if level == model.plan.levels and not no_filter_3d:
        return model
    field, plan = field_at_level(model, level)
    if no_filter_3d:
        field.set_sampling_rate(None)
    return replace(model, field=field, plan=plan)


def face_masks(model, cfg, frames: int) -> list[np.ndarray]:
    """(H, W) bool per frame: the full-detail render's alpha > 0.5, the frames posed as animate.py poses them."""
    from models.posing import HeadAnimator, retarget
    from models.renderer import render_identities
    from utils.identity import base_camera, load_flame, model_flame_dir, posable
    from utils.motion import load_motion

    flame = load_flame(model, model_flame_dir(model, cfg.flame_dir))
    animator = HeadAnimator(model.field, flame, model.mask_ids, model.plan)
    motion = load_motion(cfg.motion, flame, cfg.keyframes, cfg.keyframe_frames, cfg.sequence, None)
    motion = motion.select(cfg.start, cfg.stride, cfg.max_frames)
    dev = torch.device("cpu")
    head = posable(animator, model, model.identities[0], dev)[0]
    params = retarget(motion.params, head.base, cfg.pose, cfg.reference_frame)
    out = []
    with torch.no_grad():
        cam = base_camera(cfg, model.template_base, animator.vertices(head, head.base)[0, :len(model.mask_ids)], dev)
        for t in range(params.num_frames):
            cloud = animator.gaussians(head, params.frames(slice(t, t + 1)))
            out.append((render_identities(cloud, [[cam]], backend=cfg.backend)["alpha"][0, 0, ..., 0] > 0.5).numpy())
    return out


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR (dB) of two uint8 frames (whole, or the pixels of ``mask``)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    mse = float((d[mask] if mask is not None else d).__pow__(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="output/cpu/model.pt", help="trained model.pt")
    p.add_argument("--flame_dir", default="", help="the model's FLAME files (default: found as animate.py finds them)")
    p.add_argument("--level", type=int, default=-1, help="subdivision level of the head (-1: the model's own; above "
                                                         "it: lod_quality.py's stand-in)")
    p.add_argument("--no_filter_3d", action="store_true", help="the stand-in without the Mip-Splatting 3D filter")
    p.add_argument("--size", type=int, default=512, help="square frame size (px)")
    p.add_argument("--fill", type=float, default=0.8, help="animate.py --fill (smaller: a farther head)")
    p.add_argument("--frames", type=int, default=8, help="frames of the built-in keyframes (animate --max_frames)")
    p.add_argument("--keyframe_frames", type=int, default=4, help="animate --keyframe_frames")
    p.add_argument("--lods", default="off,auto", help="comma-separated --lod settings (off is always run first)")
    p.add_argument("--png", default=None, help="write full | settings | 4x difference of --png_frame here")
    p.add_argument("--png_frame", type=int, default=-1, help="frame of the PNG (-1: the middle one)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    from PIL import Image

    from utils.apps.animate.pipeline import AnimationConfig, animate
    from utils.data.model_file import load_model

    model = load_model(args.model, torch.device("cpu"))
    level = model.plan.levels if args.level < 0 else args.level
    model = stand_in(model, level, args.no_filter_3d)
    lods = ["off"] + [s for s in args.lods.split(",") if s and s != "off"]
    tmp = Path(scratch_dir("lod_animate_"))
    base = AnimationConfig(checkpoint=args.model, flame_dir=args.flame_dir, width=args.size, height=args.size,
                           fill=args.fill, max_frames=args.frames, keyframe_frames=args.keyframe_frames, png=True,
                           progress=False, device="cpu", backend="torch", overwrite=True)
    print(f"level {level} head, {model.field.num_gaussians} Gaussians, {args.size}x{args.size}, fill {args.fill}, "
          f"{args.frames} frames, torch {torch.__version__}, {torch.get_num_threads()} threads")
    frames, rows = {}, []
    for lod in lods:
        cfg = replace(base, lod=lod, out=str(tmp / lod))
        s = animate(cfg, model)
        T = s["num_frames"]
        frames[lod] = [np.asarray(Image.open(tmp / lod / "frames" / f"frame_{n:05d}.png").convert("RGB"))
                       for n in range(T)]
        row = {"lod": lod, "frames": T, "render_s_per_frame": s["seconds_per_phase"]["render"] / T,
               "setup_s": s["seconds_per_phase"]["identity"], **({"lod_summary": s["lod"]} if "lod" in s else {})}
        if "lod" in s and s["lod"]["merges"]:
            row["merge_s_per_merge"] = s["lod"]["merge_seconds"] / s["lod"]["merges"]
        rows.append(row)
    masks = face_masks(model, replace(base, out=str(tmp / "mask")), args.frames)
    for row in rows:
        ref, got = frames["off"], frames[row["lod"]]
        row["psnr_whole"] = [psnr(a, b) for a, b in zip(got, ref)]
        row["psnr_face"] = [psnr(a, b, m) for a, b, m in zip(got, ref, masks)]
        fin = [v for v in row["psnr_face"] if np.isfinite(v)]
        row["psnr_face_min"] = min(fin) if fin else float("inf")
        row["psnr_face_mean"] = float(np.mean(fin)) if fin else float("inf")
        print(json.dumps({k: v for k, v in row.items() if k not in ("psnr_whole", "psnr_face")}))
    if args.png:
        k = len(frames["off"]) // 2 if args.png_frame < 0 else args.png_frame
        ref = frames["off"][k]
        tiles = [ref] + [frames[lod][k] for lod in lods[1:]]
        tiles += [np.clip(np.abs(frames[lod][k].astype(int) - ref.astype(int)) * 4, 0, 255).astype(np.uint8)
                  for lod in lods[1:]]
        Image.fromarray(np.concatenate(tiles, 1)).save(args.png)
        print(f"wrote {args.png}: frame {k}, " + " | ".join(["off"] + lods[1:] + [f"4x |{lod} - off|"
                                                                                for lod in lods[1:]]))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
