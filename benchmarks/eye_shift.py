"""Is the held-out eye error a misplacement? The best sub-pixel shift of a trained run's render in each eye (issue 25).

Loads a finished run as benchmarks/eye_gap.py does and, on the held-out cameras of every training identity, renders
the model through the same camera with its principal point moved by (dx, dy) px on a grid (an exact sub-pixel
translation of the image: no resampling blur, which by itself would raise PSNR in the eyes).  Per view and per eye
(the subject's right / left eye region, split by the nearer eye's projected landmark centre) it keeps the shift with
the lowest squared error and reports:

* PSNR of each region unshifted and at its own best shift (the gain an exact re-placement of that region would buy);
* the same for a control: the face mask without the eyes, cut into the two halves of the face (left / right of the
  eyes' midpoint), whose best shift has the same selection bias (best of the grid) but holds no eye;
* the mean best shift (a systematic offset, e.g. the eyeballs sitting too deep) and the mean |best shift|.

If the eyes' best-shift gain is far above the control's, the eye error is geometry in the wrong place (eyeballs, lid
vertices); if it is about the same, it is not a shift but sub-pixel structure that no translation fixes.

On synthetic data (``--gt``) the same search is run with the ground-truth head (the cloud the photos were rendered
from, JPEG noise only): its best-shift gain is the search's selection bias on regions this small (best of the grid on
~35 pixels), the floor the model's gain must be read against.  ``fit3d``: per identity and eye, the 3D offset d of
the eye (world units) whose projection J_v d best explains the best shifts of all its views (least squares; J_v the
2x3 Jacobian of the projection at the eye's landmark centre): ``r2`` near 1 means the eye sits in the wrong place in
3D (e.g. an eyeball too deep), near the chance level (3 unknowns over 2 x views equations) means view-by-view scatter.

    python benchmarks/eye_shift.py --data_root output/syn546 --out output/base_s0 --steps 400 [--json f.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.heldout_eyes import run_parser  # noqa: E402
from models.camera import Camera  # noqa: E402
from models.renderer import render_identities  # noqa: E402
from utils.apps.train.trainer import Trainer, training_compensation  # noqa: E402


def shifted(cam: Camera, dx: float, dy: float) -> Camera:
    """``cam`` whose image content moves by (dx, dy) px (principal point + (dx, dy))."""
    K = cam.K.clone()
    K[0, 2] += dx
    K[1, 2] += dy
    return Camera(K, cam.w2c, cam.width, cam.height, cam.name)


def projection_jacobian(cam: Camera, point: Tensor) -> Tensor:
    """(2, 3) d(pixel position)/d(world position) of ``cam`` at the world point ``point`` (3,) (central differences)."""
    h = 1e-4
    cols = []
    for a in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[a] = h
        p = point.to(torch.float64)
        cols.append((cam.project(p + e)[0] - cam.project(p - e)[0]) / (2 * h))
    return torch.stack(cols, dim=1)


def model_renderer(tr: Trainer, i: int):
    """cameras -> (C, H, W, 3) renders of training identity ``i`` as the run trained (its 2D filter)."""
    cloud = tr.field(tr.field.codes.weight[i : i + 1], tr.vertices(torch.tensor([i])))

    def render(cams: list[Camera]) -> Tensor:
        with training_compensation():
            return render_identities(cloud, [cams], backend=tr.cfg.backend, depth=False,
                                     filter_2d=tr.filter_2d)["image"][0]
    return render


def gt_renderer(root: str, subject: str, face: Tensor):
    """cameras -> (C, H, W, 3) clean renders of the ground-truth head the photos of ``subject`` were made from,
    face-masked as the photos are (``face`` (C, H, W, 1))."""
    from utils.data.synthetic.dataset import load_ground_truth
    from utils.data.synthetic.render import render_ground_truth

    cloud, ident = load_ground_truth(root, subject)
    return lambda cams: render_ground_truth(cloud, cams, ident, "studio", backend="torch")["image"] * face


def sse(pred: Tensor, gt: Tensor, m: Tensor) -> Tensor:
    """Per-view squared error summed over the region: pred, gt (C, H, W, 3), m (C, H, W, 1) -> (C,)."""
    return ((pred.clamp(0, 1) - gt).square() * m).sum((1, 2, 3))


def to_psnr(sse_sum: float, n_values: float) -> float:
    return float(-10 * torch.log10(torch.tensor(sse_sum / max(n_values, 1.0))))


def build_parser():
    p = run_parser(__doc__.split("\n\n")[0])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="further config overrides the run was trained with (e.g. loss.eye_weight=0.1)")
    p.add_argument("--radius", type=float, default=0.75, help="largest shift tried along x and y, px")
    p.add_argument("--step", type=float, default=0.25, help="grid step of the shifts, px")
    p.add_argument("--views", choices=("heldout", "all"), default="heldout",
                   help="the held-out cameras, or all 16 (more equations for fit3d)")
    p.add_argument("--gt", action="store_true", help="also search the ground-truth head's shifts (synthetic data)")
    p.add_argument("--identities", type=int, default=0, help="measure the first N training identities (0: all)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks.eye_gap import trained_run

    tr = trained_run(args)
    data, field = tr.data, tr.field
    field.eval()
    held = data.serial_index(data.eval_serials) if args.views == "heldout" else list(range(len(data.serials)))
    n = int(round(args.radius / args.step))
    grid = [(i * args.step, j * args.step) for i in range(-n, n + 1) for j in range(-n, n + 1)]
    zero = grid.index((0.0, 0.0))
    # per region: sum of squared errors unshifted / at the best shift, value count, best shifts
    names = ("eye_r", "eye_l", "rest_r", "rest_l")
    sources = ("model", "gt") if args.gt else ("model",)
    tot = {(src, k): [0.0, 0.0, 0.0] for src in sources for k in names}
    shifts: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in tot}
    fits: dict[tuple[str, str], list[float]] = {(src, k): [0.0, 0.0, 0] for src in sources for k in ("eye_r", "eye_l")}
    for i in range(len(data) if args.identities <= 0 else min(args.identities, len(data))):
        cams = [data.cameras[i][v] for v in held]
        gt = data.images[i, held].float() / 255.0
        face = (data.masks[i, held].float() / 255.0 > 0.5).float()
        eyes = tr._eval_eye_masks(i, held, face)
        lm = tr.eye_landmarks(data.base_vertices[i])  # (14, 3): rows 0-5 right eye, 6-11 left eye
        regions = {k: torch.zeros_like(face) for k in names}
        for c, cam in enumerate(cams):
            uv, _ = cam.project(lm.to(cam.K))
            xr, xl = float(uv[0:6, 0].mean()), float(uv[6:12, 0].mean())
            xs = torch.arange(cam.width, dtype=torch.float32) + 0.5
            near_r = ((xs - xr).abs() < (xs - xl).abs()).view(1, -1, 1).expand(cam.height, -1, -1).float()
            regions["eye_r"][c] = eyes[c] * near_r
            regions["eye_l"][c] = eyes[c] * (1 - near_r)
            regions["rest_r"][c] = face[c] * (1 - eyes[c]) * near_r
            regions["rest_l"][c] = face[c] * (1 - eyes[c]) * (1 - near_r)
        for src in sources:
            render = model_renderer(tr, i) if src == "model" else gt_renderer(args.data_root, data.identities[i], face)
            errs = {k: [] for k in names}  # per shift: (C,)
            for dx, dy in grid:
                with training_compensation():
                    pred = render([shifted(c, dx, dy) for c in cams])
                for k in names:
                    errs[k].append(sse(pred, gt, regions[k]))
            for k in names:
                e = torch.stack(errs[k])  # (G, C)
                cnt = regions[k].sum((1, 2, 3)) * 3
                best = e.argmin(0)
                eqs = []
                for c in range(len(cams)):
                    if cnt[c] == 0:
                        continue
                    tot[(src, k)][0] += float(e[zero, c])
                    tot[(src, k)][1] += float(e[best[c], c])
                    tot[(src, k)][2] += float(cnt[c])
                    shifts[(src, k)].append(grid[int(best[c])])
                    eqs.append((c, grid[int(best[c])]))
                if k.startswith("eye") and len(eqs) >= 2:
                    centre = lm[0:6].mean(0) if k == "eye_r" else lm[6:12].mean(0)
                    J = torch.cat([projection_jacobian(cams[c], centre) for c, _ in eqs])  # (2n, 3)
                    b = torch.tensor([v for _, sh in eqs for v in sh], dtype=J.dtype)  # (2n,)
                    d = torch.linalg.lstsq(J, b[:, None]).solution
                    fits[(src, k)][0] += float((b - (J @ d)[:, 0]).square().sum())
                    fits[(src, k)][1] += float(b.square().sum())
                    fits[(src, k)][2] += len(b)
    tr.close()
    result = {}
    for (src, k), t in tot.items():
        sh = torch.tensor(shifts[(src, k)])
        r = {"psnr": to_psnr(t[0], t[2]), "psnr_best_shift": to_psnr(t[1], t[2]),
             "mean_shift_px": [round(float(v), 3) for v in sh.mean(0)],
             "mean_abs_shift_px": round(float(sh.norm(dim=1).mean()), 3), "views": len(sh)}
        if (src, k) in fits:
            res, tot2, n_eq = fits[(src, k)]
            r["fit3d_r2"] = round(1 - res / max(tot2, 1e-12), 3)
        result[f"{src}/{k}"] = r
        print(f"{src}/{k}: psnr {r['psnr']:.2f} -> {r['psnr_best_shift']:.2f} at its best shift "
              f"(+{r['psnr_best_shift'] - r['psnr']:.2f} dB); mean shift {r['mean_shift_px']} px, "
              f"mean |shift| {r['mean_abs_shift_px']} px, {r['views']} views"
              + (f"; fit3d r2 {r['fit3d_r2']:.2f}" if "fit3d_r2" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
