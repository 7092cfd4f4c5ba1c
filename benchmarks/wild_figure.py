"""The README's picture of a photo-only fit: landmarks.png | the fitted render beside the photo | turntable frames.

    python -c "import cv2, skimage.data; cv2.imwrite('astronaut.png', skimage.data.astronaut()[..., ::-1])"
    python track.py --checkpoint output/cpu/model.pt --image astronaut.png --out output/photo/astronaut
    python benchmarks/wild_figure.py output/photo/astronaut docs/astronaut_fit.png

The turntable frames shown are those nearest the yaw angles of ``--angles`` (degrees), found from the run's
metrics.json (export.turntable_frames / turntable_degrees: the swing of utils/apps/track/export.py's turntable).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import cv2
import numpy as np


def turntable_angles(frames: int, degrees: float) -> np.ndarray:
    """Yaw of every turntable frame, as utils.apps.track.export.turntable makes them."""
    if degrees >= 360:
        return np.array([360.0 * i / frames for i in range(frames)])
    return np.array([0.5 * degrees * math.sin(2 * math.pi * i / frames) for i in range(frames)])


def figure(run: Path, height: int = 256, angles: tuple[float, ...] = (-40.0, 0.0, 40.0)) -> np.ndarray:
    """(height, W, 3) uint8 BGR: the panels of a track.py photo-only output folder, side by side."""
    def fit_h(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (round(img.shape[1] * height / img.shape[0]), height), interpolation=cv2.INTER_AREA)

    for name in ("landmarks.png", "metrics.json", "turntable.mp4"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: expected the output folder of a photo-only track.py run")
    panels = [fit_h(cv2.imread(str(run / "landmarks.png")))]
    views = sorted((run / "views").glob("cam_*.png"))
    if views:
        panels.append(fit_h(cv2.imread(str(views[0]))))
    cap = cv2.VideoCapture(str(run / "turntable.mp4"))
    video = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        video.append(f)
    export = json.loads((run / "metrics.json").read_text())["config"]["export"]
    yaw = turntable_angles(len(video), float(export["turntable_degrees"]))
    chosen = [video[int(np.argmin(np.abs(yaw - a)))] for a in angles] if video else []
    if chosen:  # one crop for all frames: the union of the rendered head's boxes, 10 % margin
        ys, xs = np.nonzero(np.max([f.max(-1) for f in chosen], axis=0) > 12)
        if len(xs):
            pad = int(0.1 * max(np.ptp(xs), np.ptp(ys)))
            y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, chosen[0].shape[0])
            x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, chosen[0].shape[1])
            chosen = [f[y0:y1, x0:x1] for f in chosen]
    panels += [fit_h(f) for f in chosen]
    gap = np.full((height, 4, 3), 255, np.uint8)
    out = []
    for p in panels:
        out += [p, gap]
    return np.concatenate(out[:-1], axis=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="output folder of a photo-only track.py run")
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--height", type=int, default=256, help="panel height in pixels")
    p.add_argument("--angles", type=float, nargs="+", default=[-40.0, 0.0, 40.0],
                   help="yaw angles (degrees) of the turntable frames shown")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), figure(args.run, args.height, tuple(args.angles)), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(args.out)


if __name__ == "__main__":
    main()
