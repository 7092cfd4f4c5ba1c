"""Where a video fit's error sits (issue 23): runs ``track.py --video`` / ``--frames`` (any track.py arguments) and,
for its held-out frames, splits the squared error in the face mask into the mask's outer ring and its interior, and
the ring into the part along the projected FLAME face mask's silhouette and the part where the detector's face
outline cuts the mask; reports the rendered alpha and the signed colour error there, and two oracles (a per-frame
gain / bias of the render, a whole-pixel shift of the render) that say how much exposure or alignment could explain.
With ``--pictures DIR`` it writes per held-out frame a strip, upscaled: the unmasked photo with the projected FLAME
mask (red) and the detector outline (yellow) | the masked photo | the avatar | its alpha | |error| x 4 in the
face mask.

    python benchmarks/video_rim_diagnosis.py --pictures /tmp/pics --rim_px 3 -- --checkpoint output/cpu/model.pt \\
        --video clip.gif --out /tmp/female --device cpu --progress false

The pictures are made of the clip's frames: keep them out of the repository when the clip is third-party.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    """(H, W) bool ``mask`` eroded by ``px`` pixels (square neighbourhood; outside the image counts as outside)."""
    import cv2

    if px <= 0:
        return mask.astype(bool)
    k = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.erode(mask.astype(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def frame_stats(photo: np.ndarray, proj: np.ndarray, outline: np.ndarray, gt: np.ndarray, mask: np.ndarray,
                pred: np.ndarray, alpha: np.ndarray, rim_px: int) -> dict:
    """Error budget of one frame: photo (h, w, 3) unmasked, proj / outline / mask (h, w) bool (projected FLAME face
    mask, detector outline, their intersection), gt (h, w, 3) the masked photo, pred (h, w, 3), alpha (h, w)."""
    m = mask.astype(bool)
    se = ((pred - gt) ** 2).sum(-1)  # (h, w)
    ring = m & ~erode(m, rim_px)
    # ring pixels close to where the outline cuts (inside the projected mask, within rim_px of the outline's outside)
    cut = ring & erode(proj, rim_px) & ~erode(outline, rim_px)
    sil = ring & ~cut
    inner = m & ~ring
    tot = float(se[m].sum())

    def psnr(sel: np.ndarray, x: np.ndarray = pred) -> float:
        mse = float(((x - gt) ** 2)[sel].mean())
        return float(10 * np.log10(1.0 / max(mse, 1e-12)))

    # oracle 1: the best per-channel gain / bias of the render inside the mask (least squares)
    fitted = pred.copy()
    for c in range(3):
        a = np.stack([pred[..., c][m], np.ones(int(m.sum()))], 1)
        coef, *_ = np.linalg.lstsq(a, gt[..., c][m], rcond=None)
        fitted[..., c] = pred[..., c] * coef[0] + coef[1]
    # oracle 2: the best whole-pixel shift of the render (and its alpha) within +-2 px
    best = (-1.0, (0, 0))
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            sh = np.roll(np.roll(pred, dy, 0), dx, 1)
            best = max(best, (psnr(m, sh), (dy, dx)))
    d = (pred - gt).mean(-1)
    return {"psnr": psnr(m), "psnr_inner": psnr(inner), "ring_share": float(se[ring].sum()) / tot,
            "cut_share": float(se[cut].sum()) / tot, "silhouette_share": float(se[sil].sum()) / tot,
            "ring_px": int(ring.sum()), "cut_px": int(cut.sum()), "mask_px": int(m.sum()),
            "alpha_ring": float(alpha[ring].mean()), "alpha_cut": float(alpha[cut].mean()) if cut.any() else None,
            "alpha_silhouette": float(alpha[sil].mean()) if sil.any() else None,
            "alpha_inner": float(alpha[inner].mean()),
            "bias_ring": float(d[ring].mean()), "bias_cut": float(d[cut].mean()) if cut.any() else None,
            "bias_silhouette": float(d[sil].mean()) if sil.any() else None, "bias_inner": float(d[inner].mean()),
            "psnr_gain_bias_oracle": psnr(m, fitted), "psnr_shift_oracle": best[0], "shift_oracle": best[1],
            "outline_inside_proj_frac": float((proj & ~outline).sum()) / max(1, int(proj.sum()))}


def strip(photo: np.ndarray, proj: np.ndarray, outline: np.ndarray, gt: np.ndarray, mask: np.ndarray,
          pred: np.ndarray, alpha: np.ndarray, height: int = 512) -> np.ndarray:
    """(height, 5 w', 3) uint8: photo with the mask contours | masked photo | avatar | alpha | |error| x 4 in the
    face mask ``mask`` (h, w) bool."""
    import cv2

    u8 = lambda x: (np.clip(x, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    s = height / photo.shape[0]
    size = (round(photo.shape[1] * s), height)
    up = lambda x: cv2.resize(u8(x), size, interpolation=cv2.INTER_NEAREST)  # noqa: E731
    base = np.ascontiguousarray(up(photo))
    for m, col in ((proj, (255, 0, 0)), (outline, (255, 220, 0))):
        big = cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        cs, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(base, cs, -1, col, 1)
    err = (np.abs(pred - gt).mean(-1) * 4 * mask)[..., None].repeat(3, -1)  # inside the face mask (what is scored)
    return np.concatenate([base, up(gt), up(pred), up(alpha[..., None].repeat(3, -1)), up(err)], 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pictures", default="", help="folder for the per-frame strips (PNG); empty: none")
    p.add_argument("--rim_px", type=int, default=3, help="width of the mask's outer ring in pixels")
    p.add_argument("--json", default="", help="write the per-frame statistics here")
    p.add_argument("track_args", nargs=argparse.REMAINDER, help="-- then track.py's arguments (video mode)")
    args = p.parse_args(argv)
    targs = [a for a in args.track_args if a != "--"]

    import torch

    import track
    import utils.apps.track.video as V
    from models.renderer import render
    from utils.apps.track.targets import polygon_mask, projected_face_mask
    from utils.data.code_file import code_cloud
    from utils.data.dataset import crop_window

    rec: dict = {"frames": None, "masks": [], "crops": [], "eval": None}
    read_video0, dfm0, crop_view0, eval0 = V.read_video, V.detected_face_mask, V.crop_view, V.evaluate_frames

    def read_video(*a, **k):
        out = read_video0(*a, **k)
        rec["frames"] = out[0]
        return out

    def read_frame_folder(*a, **k):
        out = rff0(*a, **k)
        rec["frames"] = out
        return out
    rff0 = V.read_frame_folder

    def detected_face_mask(model, verts, faces, camera, outline=None, projected=None):
        proj = projected_face_mask(model, verts, faces, camera) if projected is None else projected
        o = polygon_mask(outline, camera.width, camera.height) if outline is not None and len(outline) >= 3 \
            else np.ones_like(proj)
        rec["masks"].append((proj > 0.5, o > 0.5))
        return dfm0(model, verts, faces, camera, outline, projected)

    def crop_view(image, mask, camera, cw, ch):
        rec["crops"].append((crop_window(mask, cw, ch), (cw, ch)))
        return crop_view0(image, mask, camera, cw, ch)

    def evaluate_frames(model, w, frames, idx, colour=None, backend="auto", gaussians=None, lpips=False,
                        exposure=None):  # the renders are under the frames' exposure when the fit has one
        out = eval0(model, w, frames, idx, colour, backend, gaussians, lpips, exposure)
        if rec["eval"] is None:  # the first call: the fit on the held-out frames
            alphas = []
            with torch.no_grad():
                for i in idx:
                    r = render(code_cloud(model, w, frames.bases[i], colour, gaussians), frames.views[i].camera,
                               backend=backend)
                    alphas.append(r["alpha"][..., 0].clamp(0, 1).cpu().numpy())
            rec["eval"] = ([frames.views[i] for i in idx], [x.cpu().numpy() for x in out[1]], alphas)
        return out

    V.read_video, V.read_frame_folder, V.detected_face_mask, V.crop_view, V.evaluate_frames = (
        read_video, read_frame_folder, detected_face_mask, crop_view, evaluate_frames)
    metrics = track.main(targs)
    used = sorted(metrics["train_frames"] + metrics["heldout_frames"])
    pos = {t: k for k, t in enumerate(used)}
    views, renders, alphas = rec["eval"]
    stats = {}
    pics = Path(args.pictures) if args.pictures else None
    if pics:
        pics.mkdir(parents=True, exist_ok=True)
    import cv2

    for k, t in enumerate(metrics["heldout_frames"]):
        j = pos[t]
        (x0, y0), (cw, ch) = rec["crops"][j]
        proj, outl = (m[y0:y0 + ch, x0:x0 + cw] for m in rec["masks"][j])
        photo = rec["frames"][t][y0:y0 + ch, x0:x0 + cw].astype(np.float32) / 255.0
        v = views[k]
        gt, mask = v.image.cpu().numpy(), v.mask.cpu().numpy()[..., 0] > 0.5
        st = frame_stats(photo, proj, outl, gt, mask, renders[k], alphas[k], args.rim_px)
        stats[str(t)] = st
        if pics:
            cv2.imwrite(str(pics / f"heldout_{t:03d}.png"),
                        cv2.cvtColor(strip(photo, proj, outl, gt, mask, renders[k], alphas[k]), cv2.COLOR_RGB2BGR))
    keys = [k for k in next(iter(stats.values())) if isinstance(next(iter(stats.values()))[k], float)]
    mean = {k: float(np.mean([s[k] for s in stats.values() if s[k] is not None])) for k in keys}
    doc = {k: metrics.get(k) for k in ("psnr_face_heldout", "psnr_face_train", "ssim_heldout", "ssim_face_heldout")}
    doc.update({"rim_px": args.rim_px, "mean": mean, "per_frame": stats})
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in mean.items()}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
