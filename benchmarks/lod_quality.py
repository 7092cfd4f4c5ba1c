"""Quality and rasterizer work of the level-of-detail head (models/level_of_detail.py) against full detail, on CPU.

A trained model's identity field is evaluated on its face mask subdivided further (``--level``, above the model's
own level): the per-vertex template features of the new vertices are the subdivision's interpolation of the trained
ones and their Fourier features are exact, so the network emits a trained-like head of the finer level.  That head is
merged 1..``--down`` levels down and rendered (torch backend, the model's display filter) at each ``--sizes`` from the
bench's framing (0.55 m, 25 degree field of view; the same view at each size); reported per size and level: PSNR /
SSIM against the full render (whole image and inside the full render's alpha > 0.5), the Gaussian-tile pairs at 16
and 8 px tiles (what gsplat's rasterize kernel loops over: its work per frame), the summed bounding-box pixels, the
median footprint (px), the level pick_level chooses, and the merge's CPU time.

    python benchmarks/lod_quality.py --model /work/base/output/cpu/model.pt --level 3 --png_dir /tmp/lod_png
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models.renderer as renderer  # noqa: E402
from models.camera import Camera  # noqa: E402
from models.flame.subdivision import make_subdivision_plan, subdivide_vertices  # noqa: E402
from models.gaussians import GaussianCloud  # noqa: E402
from models.identity_field import IdentityField  # noqa: E402
from models.level_of_detail import (  # noqa: E402
    FOOTPRINT_PX,
    OPACITY_MODES,
    footprint_px,
    merge_shares,
    merge_to_coarser,
    pick_level,
)
from models.renderer import render_batch  # noqa: E402
from models.renderer.torch_backend import _project_cameras  # noqa: E402
from utils.losses import psnr, ssim_metric  # noqa: E402


def field_at_level(model, level: int) -> tuple[IdentityField, object]:
    """The model's identity field on its face mask subdivided to ``level`` (>= the model's level) and that plan.

    Template features of the added vertices are the subdivision's average of their edge ends (what the subdivided
    mesh interpolates), Fourier features are recomputed at their canonical positions, the network is the trained one;
    the Mip-Splatting 3D filter's per-vertex sampling rate is interpolated the same way."""
    old = model.field
    plan = make_subdivision_plan(len(model.template_base), model.base_faces, level)
    template = subdivide_vertices(model.template_base.cpu().float(), plan)
    new = IdentityField(old.cfg, old.num_identities, template, torch.as_tensor(plan.faces[level]))
    state = {k: v for k, v in old.state_dict().items() if k not in ("template_features", "template_verts", "faces")}
    new.load_state_dict(state, strict=False)
    def up(x: torch.Tensor) -> torch.Tensor:
        """(V_model, D) per-vertex values -> (V_level, D): midpoints get their edge ends' mean, level by level."""
        for e in plan.edges[model.plan.levels:level]:
            e = torch.as_tensor(e)
            x = torch.cat([x, 0.5 * (x[e[:, 0]] + x[e[:, 1]])])
        return x

    with torch.no_grad():
        if old.template_features is not None:
            new.template_features.copy_(up(old.template_features.detach().cpu().float()))
    if old.sampling_rate is not None:
        new.set_sampling_rate(up(old.sampling_rate.float()[:, None])[:, 0])
    return new.eval(), plan


def tile_pairs(cloud: GaussianCloud, cam: Camera, tile: int) -> tuple[int, int]:
    """(Gaussian-tile pairs at ``tile`` px tiles, summed bounding-box pixels) of the cloud through ``cam``, with the
    torch backend's projection (gsplat's opacity-aware boxes and the same tile rounding)."""
    p = _project_cameras(cloud, [cam], renderer.FILTER_2D)
    r = p["radii"][0].double()
    m = p["means2d"][0].double()
    vis = r[:, 0] > 0
    r, m = r[vis], m[vis]
    tx, ty = math.ceil(cam.width / tile), math.ceil(cam.height / tile)
    x0 = torch.floor((m[:, 0] - r[:, 0]) / tile).clamp(0, tx)
    x1 = torch.ceil((m[:, 0] + r[:, 0]) / tile).clamp(0, tx)
    y0 = torch.floor((m[:, 1] - r[:, 1]) / tile).clamp(0, ty)
    y1 = torch.ceil((m[:, 1] + r[:, 1]) / tile).clamp(0, ty)
    pairs = int(((x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0)).sum())
    return pairs, int((4 * r[:, 0] * r[:, 1]).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="output/cpu/model.pt", help="trained model.pt")
    p.add_argument("--level", type=int, default=3, help="full-detail subdivision level (>= the model's)")
    p.add_argument("--down", type=int, default=2, help="merge 1..down levels below --level")
    p.add_argument("--sizes", default="256,512,1024", help="comma-separated square render sizes (px)")
    p.add_argument("--identity", type=int, default=0, help="training identity rendered")
    p.add_argument("--distance", type=float, default=0.55, help="camera distance from the head's centre (m)")
    p.add_argument("--opacity", default="optical_depth", choices=OPACITY_MODES + ("both",),
                   help="merge_to_coarser's opacity mode(s) measured")
    p.add_argument("--no_filter_3d", action="store_true",
                   help="switch the model's Mip-Splatting 3D filter off: the trained sizes alone, smaller Gaussians "
                        "(a sharper, harder stand-in for the merge)")
    p.add_argument("--no_coverage_floor", action="store_true",
                   help="merge by plain moment matching (merge_to_coarser(coverage_floor=False)), for comparison")
    p.add_argument("--png_dir", default=None, help="write full | LOD | 4x difference PNGs here")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    from utils.data.model_file import load_model

    model = load_model(args.model)
    field, plan = field_at_level(model, args.level)
    if args.no_filter_3d:
        field.set_sampling_rate(None)
    with torch.no_grad():
        verts = subdivide_vertices(model.base_vertices[args.identity:args.identity + 1].float(), plan)
        full = field(field.codes.weight[args.identity:args.identity + 1], verts)[0]
    c = verts[0].mean(0).tolist()
    modes = OPACITY_MODES if args.opacity == "both" else (args.opacity,)
    print(f"model {args.model}: level {model.plan.levels} -> stand-in level {args.level}, {len(full)} Gaussians; "
          f"display filter {renderer.FILTER_2D} ({renderer.FILTER_2D_COMPENSATION}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    merged, rows = {}, []
    for mode in modes:
        for k in range(1, args.down + 1):
            shares = merge_shares(plan, args.level, k, field.K)  # once per topology: the merge alone is timed
            t = time.perf_counter()
            with torch.no_grad():
                merged[mode, k] = merge_to_coarser(full, plan, args.level, levels_down=k, per_vertex=field.K,
                                                   opacity=mode, coverage_floor=not args.no_coverage_floor,
                                                   shares=shares)
            ms = 1000 * (time.perf_counter() - t)
            print(f"merge {mode} level {args.level} -> {args.level - k}: {len(merged[mode, k])} Gaussians, "
                  f"{ms:.0f} ms CPU")
            rows.append({"what": "merge", "opacity": mode, "to_level": args.level - k,
                         "gaussians": len(merged[mode, k]), "cpu_ms": ms})
    for size in [int(s) for s in args.sizes.split(",")]:
        cam = Camera.look_at((c[0], c[1], c[2] + args.distance), c, (0, 1, 0), size, size, fov_y_deg=25)
        with torch.no_grad():
            ref = render_batch(full, [cam], backend="torch")
        ref_img, mask = ref["image"][0], (ref["alpha"][0] > 0.5).float()
        pairs16, area = tile_pairs(full, cam, 16)
        pairs8, _ = tile_pairs(full, cam, 8)
        fp_full = footprint_px(full, cam)
        print(f"{size}x{size} full level {args.level}: {pairs16} pairs@16, {pairs8} pairs@8, {area} box px, "
              f"footprint {fp_full:.2f} px")
        rows.append({"what": "full", "size": size, "level": args.level, "pairs16": pairs16, "pairs8": pairs8,
                     "box_px": area, "footprint_px": fp_full})
        for mode in modes:
            fps_ = [footprint_px(merged[mode, k], cam) for k in range(args.down, 0, -1)] + [fp_full]
            pick = args.level - args.down + pick_level(fps_, FOOTPRINT_PX)
            for k in range(1, args.down + 1):
                cl = merged[mode, k]
                with torch.no_grad():
                    img = render_batch(cl, [cam], backend="torch")["image"][0]
                q16, qa = tile_pairs(cl, cam, 16)
                q8, _ = tile_pairs(cl, cam, 8)
                row = {"what": "lod", "size": size, "opacity": mode, "level": args.level - k, "gaussians": len(cl),
                       "psnr": float(psnr(img, ref_img)), "psnr_face": float(psnr(img, ref_img, mask=mask)),
                       "ssim": float(ssim_metric(img, ref_img)), "pairs16": q16, "pairs8": q8, "box_px": qa,
                       "pairs16_ratio": q16 / max(pairs16, 1), "pairs8_ratio": q8 / max(pairs8, 1),
                       "footprint_px": fps_[args.down - k], "picked_level": pick}
                rows.append(row)
                print("  " + ", ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}"
                                       for k_, v in row.items()))
                if args.png_dir and mode == modes[0]:
                    from PIL import Image

                    Path(args.png_dir).mkdir(parents=True, exist_ok=True)
                    diff = ((img - ref_img).abs() * 4).clamp(0, 1)
                    strip = torch.cat([ref_img.clamp(0, 1), img.clamp(0, 1), diff], 1)
                    tag = ("_nof3d" if args.no_filter_3d else "") + ("_nofloor" if args.no_coverage_floor else "")
                    Image.fromarray((strip.numpy() * 255).round().astype(np.uint8)).save(
                        Path(args.png_dir) / f"lod_{size}_L{args.level}_to_L{args.level - k}{tag}.png")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
