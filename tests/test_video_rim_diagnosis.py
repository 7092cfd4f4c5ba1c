"""benchmarks/video_rim_diagnosis.py: the error budget of a frame splits the face mask's squared error into its outer
ring (where the outline cut the projected mask, and the silhouette) and the interior."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_frame_stats_puts_a_dark_rim_in_the_ring():
    from video_rim_diagnosis import frame_stats, strip

    h, w = 40, 40
    proj = np.zeros((h, w), bool)
    proj[5:35, 5:35] = True  # the projected FLAME face mask
    outline = np.zeros((h, w), bool)
    outline[:, :25] = True  # the detector's outline cuts its right part away
    mask = proj & outline
    photo = np.full((h, w, 3), 0.6, np.float32)
    gt = photo * mask[..., None]
    pred = gt.copy()
    alpha = mask.astype(np.float32)
    pred[10:30, 22:25] *= 0.5  # a darkened rim along the cut: 3 px inside the mask, away from its corners
    st = frame_stats(photo, proj, outline, gt, mask, pred, alpha, 3)
    assert st["ring_share"] > 0.99 and st["cut_share"] > 0.99 and st["silhouette_share"] < 0.01
    assert st["bias_cut"] < -0.05 and abs(st["bias_inner"]) < 1e-6
    assert st["psnr_inner"] > 100 > st["psnr"]
    assert abs(st["outline_inside_proj_frac"] - 10 / 30) < 1e-6
    pic = strip(photo, proj, outline, gt, mask, pred, alpha, height=80)
    assert pic.shape == (80, 5 * 80, 3) and pic.dtype == np.uint8
