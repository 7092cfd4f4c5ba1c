"""LPIPS in the video path's metrics.json (utils/apps/track/video.py evaluate_frames): computed inside the face mask
when the optional lpips package works, null with the reason when it does not (no torchvision, backbone weights not
downloadable offline) or when --export.lpips is false."""
from __future__ import annotations

import sys

import numpy as np
import torch

from tests.test_fitting import fit_model, single_thread  # noqa: F401
from tests.test_video_avatar import FAST, clip  # noqa: F401
from tests.training_fixtures import preprocessed_root  # noqa: F401


def _args(fit_model, clip, out):  # noqa: F811
    root, frames, lm = clip
    return ["--checkpoint", str(fit_model), "--frames", str(frames), "--landmarks", str(lm), "--flame_dir",
            str(root / "flame"), "--out", str(out), *FAST, "--fit.iterations", "10", "--fit.colour_iterations", "0",
            "--export.turntable", "false"]


def test_video_lpips_inside_face_mask(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """The pipeline hands LPIPS the render and the photo both multiplied by the face mask and averages the
    per-frame values (a stand-in distance here: the real LPIPS needs torchvision's downloaded backbone weights)."""
    import utils.apps.track.video as video
    from track import main

    seen = []

    def stand_in(pred, gt):  # records what LPIPS would see; mean absolute difference as the value
        seen.append((pred.clone(), gt.clone()))
        return (pred - gt).abs().mean()

    monkeypatch.setattr(video, "lpips_metric", stand_in)
    with single_thread():
        m = main(_args(fit_model, clip, tmp_path / "a"))
    n_held, n_train = len(m["heldout_frames"]), len(m["train_frames"])
    assert len(seen) == n_held + n_train  # held-out frames first, then the training frames
    for pred, gt in seen:
        outside = (gt.sum(-1) == 0) & (pred.sum(-1) == 0)
        assert outside.float().mean() > 0.2  # the crop's background is zero in both: only the face is compared
    vals = [float((p - g).abs().mean()) for p, g in seen]
    assert np.isclose(m["lpips_heldout"], np.mean(vals[:n_held]), rtol=0, atol=1e-5)  # metrics.json rounds to 5 digits
    assert np.isclose(m["lpips_train"], np.mean(vals[n_held:]), rtol=0, atol=1e-5)
    assert "face mask" in m["lpips_note"]


def test_video_lpips_null_with_reason(clip, fit_model, tmp_path, monkeypatch):  # noqa: F811
    """Without a usable lpips package metrics.json says null and why; --export.lpips false says so too."""
    import json

    import utils.losses as losses
    from track import main

    monkeypatch.setitem(sys.modules, "lpips", None)  # "not installed", even where it is
    monkeypatch.setattr(losses, "_LPIPS", {})
    monkeypatch.setattr(losses, "_LPIPS_UNAVAILABLE", [])
    with single_thread():
        m = main(_args(fit_model, clip, tmp_path / "a"))
    doc = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert doc["lpips_heldout"] is None and doc["lpips_train"] is None
    assert "lpips" in doc["lpips_note"] and "ModuleNotFoundError" in doc["lpips_note"], doc["lpips_note"]
    assert np.isfinite(m["psnr_face_heldout"])  # the other metrics are unaffected
    with single_thread():
        m2 = main(_args(fit_model, clip, tmp_path / "b") + ["--export.lpips", "false"])
    assert m2["lpips_heldout"] is None and "--export.lpips false" in m2["lpips_note"]
    assert torch.equal(torch.load(tmp_path / "a" / "code.pt")["w"], torch.load(tmp_path / "b" / "code.pt")["w"])
