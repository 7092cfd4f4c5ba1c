"""benchmarks/video_error_decomposition.py: a frame's squared error in the face mask is split into the mask's two
outer rings, the landmark regions and the skin; the head's yaw / pitch come from its rotation."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _face_points(cx: float, cy: float, iod: float) -> np.ndarray:
    """(68, 2) iBUG-68-like points: eyes at (cx -+ iod / 2, cy), brows above, nose below, mouth further down."""
    p = np.zeros((68, 2))
    ring = lambda x, y, r, n: np.stack([x + r * np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),  # noqa: E731
                                        y + r * np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False))], 1)
    p[36:42] = ring(cx - iod / 2, cy, 3, 6)
    p[42:48] = ring(cx + iod / 2, cy, 3, 6)
    p[17:22] = np.stack([np.linspace(cx - iod / 2 - 4, cx - iod / 2 + 4, 5), np.full(5, cy - 7)], 1)
    p[22:27] = np.stack([np.linspace(cx + iod / 2 - 4, cx + iod / 2 + 4, 5), np.full(5, cy - 7)], 1)
    p[27:36] = ring(cx, cy + 8, 2, 9)
    p[48:60] = ring(cx, cy + 18, 5, 12)
    p[60:68] = ring(cx, cy + 18, 3, 8)
    return p


def test_error_in_the_mouth_and_on_the_rim_lands_in_those_parts():
    from benchmarks.video_error_decomposition import frame_budget, picture, region_masks, summarise

    h, w = 60, 60
    mask = np.zeros((h, w), bool)
    mask[5:55, 8:52] = True
    regions = region_masks(_face_points(30, 22, 20), mask, dilate=0.1)
    assert all(regions[k].any() for k in ("eyes", "brows", "mouth", "nose"))
    assert not (regions["eyes"] & regions["brows"]).any()  # each pixel in one region
    gt = np.full((h, w, 3), 0.5, np.float32) * mask[..., None]
    pred = gt.copy()
    pred[regions["mouth"]] += 0.2  # a wrong mouth
    st = frame_budget(pred, gt, mask, regions)
    assert st["share_mouth"] > 0.99 and st["share_ring1"] == 0
    assert st["psnr_skin"] is None or st["psnr_skin"] > 100  # no error on the skin
    pred = gt.copy()
    pred[5, 20:40] = 0.0  # the top edge of the mask: the outer 1-px ring
    pred[6, 20:40] = 0.0  # ... and the next one in
    st = frame_budget(pred, gt, mask, regions)
    assert abs(st["share_ring1"] - 0.5) < 1e-6 and abs(st["share_ring2"] - 0.5) < 1e-6
    assert abs(sum(v for k, v in st.items() if k.startswith("share_")) - 1.0) < 1e-6
    both = summarise({0: st, 1: st}, [0, 1])
    assert abs(both["share_ring1"] - 0.5) < 1e-6 and abs(both["psnr_mean"] - st["psnr"]) < 1e-9
    pic = picture(gt, pred, mask, regions, height=120)
    assert pic.shape == (120, 360, 3) and pic.dtype == np.uint8


def test_head_yaw_pitch():
    from benchmarks.video_error_decomposition import head_yaw_pitch

    assert head_yaw_pitch(np.eye(3)) == (0.0, 0.0)
    a = math.radians(30)
    ry = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    yaw, pitch = head_yaw_pitch(ry)
    assert abs(yaw - 30) < 1e-9 and abs(pitch) < 1e-9
