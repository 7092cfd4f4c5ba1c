"""Where a video avatar's error sits, frame by frame (issue 23): runs ``track.py --video`` / ``--frames`` (any
track.py arguments) and splits the squared error in the face mask of every held-out AND training frame (the reported
renders: under the frame's exposure when the fit has one)

    by ring    the face mask's outer 1-pixel ring, its second ring (1-2 px in), and the interior
    by region  the interior further into eyes, brows, mouth and nose (polygons of the frame's detected iBUG-68
               landmarks, dilated by ``--region_dilate`` times the inter-ocular distance) and skin (the rest)

and relates each frame's PSNR to its head pose (yaw / pitch of the tracked FLAME head's forward axis, in degrees,
0 = facing the camera) and its distance in frames to the nearest training frame; held-out frames are grouped into
the interleaved ones (between training frames) and the tail (after the last training frame).  Per frame also the
signed error (avatar - photo) and the rendered alpha per ring, and two oracles that read the frame's own pixels
(diagnostic only): the best per-channel gain of the render, and the best per-channel gain field linear in x / y.
With ``--picture`` it draws the worst held-out frame as real (masked crop) | avatar | |error| x 4, upscaled, the
regions outlined on the error panel; ``--npz`` keeps every frame's masked photo, render, alpha and mask.

    python benchmarks/video_error_decomposition.py --json /tmp/dec.json --picture /tmp/worst.png -- \\
        --checkpoint output/cpu/model.pt --video clip.gif --out /tmp/female --device cpu --progress false

Needs the detector's landmarks (not ``--landmarks``; the regions are drawn from them).  The picture is made of the
clip's frames: keep it out of the repository when the clip is third-party.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.video_rim_diagnosis import erode  # noqa: E402

# iBUG-68 rows of the regions (closed polygons; the brows are polylines, dilated into bands)
REGIONS = {"eyes": ((36, 42), (42, 48)), "brows": ((17, 22), (22, 27)), "mouth": ((48, 60),),
           "nose": ((27, 36),)}


def region_masks(points: np.ndarray, mask: np.ndarray, dilate: float = 0.12) -> dict[str, np.ndarray]:
    """(h, w) bool masks of the eyes, brows, mouth and nose of a frame: ``points`` (68, 2) iBUG-68 landmarks in the
    crop's pixels; each polygon (brows: polyline) filled and dilated by ``dilate`` x the inter-ocular distance, within
    ``mask`` (h, w) bool.  Earlier regions take the pixels they share with later ones (eyes before brows)."""
    import cv2

    h, w = mask.shape
    iod = float(np.linalg.norm(points[36:42].mean(0) - points[42:48].mean(0)))
    r = max(1, int(round(dilate * iod)))
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    taken = np.zeros((h, w), bool)
    out = {}
    for name, parts in REGIONS.items():
        m = np.zeros((h, w), np.uint8)
        for a, b in parts:
            poly = np.round(points[a:b]).astype(np.int32)
            if name in ("brows",):
                cv2.polylines(m, [poly], False, 1, 1)
            elif name == "nose":
                cv2.fillPoly(m, [cv2.convexHull(poly)], 1)
            else:
                cv2.fillPoly(m, [poly], 1)
        m = cv2.dilate(m, k).astype(bool) & mask & ~taken
        taken |= m
        out[name] = m
    return out


def head_yaw_pitch(rotation: np.ndarray) -> tuple[float, float]:
    """Yaw and pitch (degrees) of a FLAME head rotation (3, 3) in the tracked camera's world (the camera looks down
    world -z; utils/face/flame_fit.W2C): the angles of the head's forward axis R @ (0, 0, 1) from the world z axis,
    about the up (y) and side (x) axes; 0 / 0 = facing the camera."""
    f = rotation @ np.array([0.0, 0.0, 1.0])
    return math.degrees(math.atan2(f[0], f[2])), math.degrees(math.atan2(f[1], math.hypot(f[0], f[2])))


def frame_budget(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, regions: dict[str, np.ndarray],
                 alpha: np.ndarray | None = None) -> dict:
    """Error budget of one frame: pred / gt (h, w, 3), mask (h, w) bool.  Shares of the squared error in the mask
    (ring1: outer 1-px ring, ring2: the next one in, interior split into ``regions`` and skin), pixel counts and
    PSNR per part; with the render's ``alpha`` (h, w) also its mean per ring and the share of the error on the face
    mask's pixels that the avatar covers less than 0.9 (where it shows the black background instead of a face)."""
    se = ((pred - gt) ** 2).sum(-1)  # (h, w)
    e1, e2 = erode(mask, 1), erode(mask, 2)
    parts = {"ring1": mask & ~e1, "ring2": e1 & ~e2}
    rest = e2.copy()
    for name, m in regions.items():
        parts[name] = m & e2
        rest &= ~m
    parts["skin"] = rest
    tot = float(se[mask].sum())
    out = {"psnr": float(10 * np.log10(3 * mask.sum() / max(tot, 1e-12))), "mask_px": int(mask.sum())}
    for name, m in parts.items():
        out[f"share_{name}"] = float(se[m].sum()) / tot
        out[f"px_{name}"] = int(m.sum())
        out[f"psnr_{name}"] = float(10 * np.log10(3 * m.sum() / max(float(se[m].sum()), 1e-12))) if m.any() else None
    d = (pred - gt).mean(-1)
    out.update(bias=float(d[mask].mean()), bias_ring1=float(d[parts["ring1"]].mean()),
               bias_ring2=float(d[parts["ring2"]].mean()), bias_interior=float(d[e2].mean()))
    if alpha is not None:
        out.update(alpha_ring1=float(alpha[parts["ring1"]].mean()), alpha_ring2=float(alpha[parts["ring2"]].mean()),
                   alpha_interior=float(alpha[e2].mean()), share_alpha_below_0_9=float(se[mask & (alpha < 0.9)].sum())
                   / tot, px_alpha_below_0_9=int((mask & (alpha < 0.9)).sum()))
    # oracles (diagnostic only: they read the frame's own pixels): the best per-channel gain of the render over the
    # mask, and the best per-channel gain field linear in the pixel position (a crude shading change across the face)
    ys, xs = np.nonzero(mask)
    pos = np.stack([np.ones(len(xs)), (xs - xs.mean()) / w_(mask), (ys - ys.mean()) / w_(mask)], 1)  # (P, 3)
    for name, basis in (("gain", pos[:, :1]), ("gain_field", pos)):
        fitted = pred.copy()
        for c in range(3):
            a = basis * pred[ys, xs, c][:, None]
            coef, *_ = np.linalg.lstsq(a, gt[ys, xs, c], rcond=None)
            fitted[ys, xs, c] = a @ coef
        out[f"psnr_oracle_{name}"] = float(10 * np.log10(3 * mask.sum() / max(float(((fitted - gt) ** 2)[mask].sum()),
                                                                                1e-12)))
    return out


def w_(mask: np.ndarray) -> float:
    """The mask's bounding-box width in pixels (the position scale of the gain-field oracle)."""
    xs = np.nonzero(mask.any(0))[0]
    return float(max(1, xs.max() - xs.min() + 1))


def picture(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray, regions: dict[str, np.ndarray],
            height: int = 384) -> np.ndarray:
    """(height, 3 w', 3) uint8: masked photo | avatar | |error| x 4 in the mask, regions outlined on the error."""
    import cv2

    s = height / gt.shape[0]
    size = (round(gt.shape[1] * s), height)
    u8 = lambda x: cv2.resize((np.clip(x, 0, 1) * 255).round().astype(np.uint8), size,  # noqa: E731
                              interpolation=cv2.INTER_NEAREST)
    err = np.ascontiguousarray(u8((np.abs(pred - gt).mean(-1) * 4 * mask)[..., None].repeat(3, -1)))
    cols = {"eyes": (0, 200, 255), "brows": (255, 200, 0), "mouth": (255, 60, 60), "nose": (60, 255, 60)}
    for name, m in regions.items():
        big = cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        cs, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(err, cs, -1, cols[name], 1)
    return np.concatenate([u8(gt), u8(pred), err], 1)


def summarise(stats: dict[int, dict], frames: list[int]) -> dict:
    """Mean PSNR (of the frames' mean squared error, as a whole) and summed error shares over ``frames``."""
    if not frames:
        return {}
    keys = [k for k in stats[frames[0]] if k.startswith("share_") and k != "share_alpha_below_0_9"]
    # shares of the group's total squared error: weight each frame's shares by its squared error
    sse = {t: 3 * stats[t]["mask_px"] * 10 ** (-stats[t]["psnr"] / 10) for t in frames}
    tot = sum(sse.values())
    out = {"n": len(frames), "psnr_mean": float(np.mean([stats[t]["psnr"] for t in frames]))}
    out.update({k: float(sum(stats[t][k] * sse[t] for t in frames) / tot)
                for k in keys + [k for k in ("share_alpha_below_0_9",) if k in stats[frames[0]]]})
    for k in [k for k in stats[frames[0]] if k.startswith(("psnr_oracle_", "alpha_"))]:
        out[k] = float(np.mean([stats[t][k] for t in frames]))
    for name in [k[6:] for k in keys]:  # the part's PSNR over the group's pixels
        px = sum(stats[t][f"px_{name}"] for t in frames)
        part = sum(stats[t][f"share_{name}"] * sse[t] for t in frames)
        out[f"psnr_{name}"] = float(10 * np.log10(3 * px / max(part, 1e-12))) if px else None
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="", help="write the per-frame statistics and the summary here")
    p.add_argument("--picture", default="", help="PNG of the worst held-out frame (real | avatar | error x 4)")
    p.add_argument("--npz", default="", help="save every frame's masked photo, render and mask here (for later "
                   "analysis; made of the clip's frames: keep it out of the repository)")
    p.add_argument("--region_dilate", type=float, default=0.12, help="region dilation, x inter-ocular distance")
    p.add_argument("track_args", nargs=argparse.REMAINDER, help="-- then track.py's arguments (video mode)")
    args = p.parse_args(argv)
    targs = [a for a in args.track_args if a != "--"]

    import torch

    import track
    import utils.apps.track.video as V
    from models.renderer import render
    from utils.data.code_file import code_cloud
    from utils.data.dataset import crop_window

    rec: dict = {"pts": None, "params": None, "crops": [], "evals": [], "refined": None}
    dvf0, fvm0, crop_view0, eval0, refine0 = (V.detect_video_faces, V.fit_video_motion, V.crop_view,
                                              V.evaluate_frames, V.refine_video)

    def detect_video_faces(*a, **k):
        out = dvf0(*a, **k)
        rec["pts"] = out.points.numpy()
        return out

    def fit_video_motion(*a, **k):
        out = fvm0(*a, **k)
        rec["params"] = out[0]
        return out

    def crop_view(image, mask, camera, cw, ch):
        rec["crops"].append(crop_window(mask, cw, ch))
        return crop_view0(image, mask, camera, cw, ch)

    def evaluate_frames(model, w, frames, idx, colour=None, backend="auto", gaussians=None, *a, **k):
        out = eval0(model, w, frames, idx, colour, backend, gaussians, *a, **k)
        if len(rec["evals"]) < 2:  # the fit on the held-out, then the training frames (video.track_video's order)
            with torch.no_grad():  # the avatar's alpha (exposure does not change it)
                alphas = [render(code_cloud(model, w, frames.bases[i], colour, gaussians), frames.views[i].camera,
                                 backend=backend)["alpha"][..., 0].clamp(0, 1).cpu().numpy() for i in idx]
            rec["evals"].append(([frames.views[i] for i in idx], [x.cpu().numpy() for x in out[1]], alphas))
        return out

    def refine_video(*a, **k):
        out = refine0(*a, **k)
        rec["refined"] = out.params
        return out

    V.detect_video_faces, V.fit_video_motion, V.crop_view, V.evaluate_frames, V.refine_video = (
        detect_video_faces, fit_video_motion, crop_view, evaluate_frames, refine_video)
    metrics = track.main(targs)
    train, held = metrics["train_frames"], metrics["heldout_frames"]
    used = sorted(train + held)
    stats: dict[int, dict] = {}
    pics: dict[int, np.ndarray] = {}
    for group, frames in ((held, rec["evals"][0]), (train, rec["evals"][1])):
        for t, v, pred, alpha in zip(group, *frames):
            x0, y0 = rec["crops"][used.index(t)]
            gt, mask = v.image.cpu().numpy(), v.mask.cpu().numpy()[..., 0] > 0.5
            regions = region_masks(rec["pts"][t] - np.array([x0, y0]), mask, args.region_dilate)
            st = frame_budget(pred, gt, mask, regions, alpha)
            rot = rec["params"].rotation_matrix[t].cpu().numpy()
            st["yaw_deg"], st["pitch_deg"] = head_yaw_pitch(rot)
            if rec["refined"] is not None:
                st["yaw_deg_refined"], st["pitch_deg_refined"] = head_yaw_pitch(
                    rec["refined"][t].rotation_matrix[0].cpu().numpy())
            st["frames_to_train"] = int(min(abs(t - s) for s in train))
            st["kind"] = "train" if t in train else ("tail" if t > max(train) else "interleaved")
            stats[t] = st
            if t in held:
                pics[t] = picture(gt, pred, mask, regions)
    if args.npz:
        arrays = {}
        for group, frames in ((held, rec["evals"][0]), (train, rec["evals"][1])):
            for t, v, pred, alpha in zip(group, *frames):
                arrays.update({f"gt_{t}": v.image.cpu().numpy(), f"pred_{t}": pred, f"alpha_{t}": alpha,
                               f"mask_{t}": v.mask.cpu().numpy()[..., 0] > 0.5})
        np.savez_compressed(args.npz, **arrays)
    groups = {k: [t for t in sorted(stats) if stats[t]["kind"] == k] for k in ("interleaved", "tail", "train")}
    groups["heldout"] = sorted(held)
    summary = {k: summarise(stats, v) for k, v in groups.items()}
    tr = groups["train"]
    if len(tr) > 2:  # training frames: how PSNR goes with |yaw|
        yaw = np.array([abs(stats[t]["yaw_deg"]) for t in tr])
        ps = np.array([stats[t]["psnr"] for t in tr])
        summary["train_psnr_vs_abs_yaw_corr"] = float(np.corrcoef(yaw, ps)[0, 1])
    worst = min(held, key=lambda t: stats[t]["psnr"])
    if args.picture:
        import cv2

        Path(args.picture).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(args.picture, cv2.cvtColor(pics[worst], cv2.COLOR_RGB2BGR))
    doc = {k: metrics.get(k) for k in ("psnr_face_heldout", "psnr_face_train", "seconds")}
    doc.update({"worst_heldout": worst, "summary": summary, "per_frame": {str(t): stats[t] for t in sorted(stats)}})
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    _ = torch
    return doc


if __name__ == "__main__":
    main()
