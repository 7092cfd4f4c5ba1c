"""The README's picture of a photo-only fit: landmarks.png | the fitted render beside the photo | turntable frames.

    python track.py --checkpoint output/cpu/model.pt --image astronaut.png --out output/photo/astronaut
    python benchmarks/wild_figure.py output/photo/astronaut docs/astronaut_fit.png
"""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np


def figure(run: Path, height: int = 256, frames: int = 4) -> np.ndarray:
    """(height, W, 3) uint8 BGR: the three panels of a track.py photo-only output folder, side by side."""
    def fit_h(img: np.ndarray) -> np.ndarray:
        return cv2.resize(img, (round(img.shape[1] * height / img.shape[0]), height), interpolation=cv2.INTER_AREA)

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
    for i in np.linspace(0, len(video) // 2, frames).astype(int) if video else []:
        panels.append(fit_h(video[i]))
    gap = np.full((height, 4, 3), 255, np.uint8)
    out = []
    for p in panels:
        out += [p, gap]
    return np.concatenate(out[:-1], axis=1)


if __name__ == "__main__":
    run, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dst), figure(run))
    print(dst)
