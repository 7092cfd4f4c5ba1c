"""Photo-only fit (track.py --image, no camera, no FLAME tracking) of a synthetic held-out identity's frontal photo with
fit variants (Adam defaults vs L-BFGS), scored on the unseen calibrated views as tests/test_wild.py's
test_image_only_path_vs_calibrated_fit does: landmarks projected from the true FLAME + 1 px noise at a 512-pixel-high
photo, the fitted head placed in the rig through its fitted pose and scaled about the camera to the true face-mask
distance ("depth-aligned"; one photo cannot tell head size from distance).

    OMP_NUM_THREADS=1 python benchmarks/photo_lbfgs.py --data /work/base/syn_data \
        --checkpoint /work/base/output/cpu/model.pt --out /tmp/photo_lbfgs --variants adam lbfgs lbfgs_15_10

Prints one JSON line per variant: seconds of the fit (track()'s ``seconds_fit``), the photo's own view in the mask,
the unseen views raw and depth-aligned.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRONTAL = "222200037"
LB = {"fit.optimizer": "lbfgs", "fit.colour_solver": "lbfgs"}
VARIANTS: dict[str, dict] = {
    "adam": {},
    "lbfgs": dict(LB),
    "adam_15_10": {"fit.iterations": 15, "fit.min_iterations": 15, "fit.colour_iterations": 10},
    "lbfgs_15_10": {**LB, "fit.iterations": 15, "fit.min_iterations": 15, "fit.colour_iterations": 10},
    "lbfgs_20_10": {**LB, "fit.iterations": 20, "fit.min_iterations": 20, "fit.colour_iterations": 10},
    "adam_flame": {"fit.refine_flame": True},
    "lbfgs_flame": {**LB, "fit.refine_flame": True},
}


def run(data: Path, checkpoint: Path, out: Path, name: str, over: dict, sid: str) -> dict:
    """Fit the photo with ``over`` config overrides; the metrics of the fitted view and the unseen views."""
    from models.flame import FlameModel, load_tracking
    from utils.apps.track.config import TrackConfig
    from utils.apps.track.pipeline import track
    from utils.apps.track.targets import flame_vertices, load_subject_target
    from utils.core.config import build_config
    from utils.data.model_file import load_model
    from utils.data.nersemble import NersembleSubject
    from utils.evaluation import evaluate_views
    from utils.face.flame_fit import W2C, flame_landmarks_2d, with_scale_about

    repo = Path(__file__).resolve().parents[1]
    subj = data / "subjects" / sid
    seq = subj / "sequences" / "EXP-1-head"
    flame_dir = data / "flame"
    flame = FlameModel.from_data_dir(flame_dir)
    truth = load_tracking(seq / "annotations" / "tracking" / "FLAME2023_v2" / "tracked_flame_params.npz", flame=flame)
    cam = NersembleSubject(data / "subjects", sid).cameras(1.0, [FRONTAL])[FRONTAL]
    noise = cam.height / 512.0  # 1 px on a 512-pixel-high photo
    uv = flame_landmarks_2d(flame, truth, cam)[0].numpy()
    uv = uv + noise * np.random.default_rng(0).standard_normal(uv.shape)
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    np.save(run_dir / "lm.npy", uv)
    base = {"checkpoint": str(checkpoint), "out": str(run_dir / "fit"), "progress": False,
            "image": str(seq / "timesteps" / "frame_00000" / "images-2x" / f"cam_{FRONTAL}.jpg"),
            "landmarks": str(run_dir / "lm.npy"), "flame_dir": str(flame_dir), "flame_fit.landmark_sigma_px": noise}
    cfg = build_config(TrackConfig, repo / "configs" / "fit.yaml", overrides={**base, **over})
    t0 = time.perf_counter()
    m = track(cfg)
    wall = time.perf_counter() - t0
    model = load_model(checkpoint)
    code = torch.load(run_dir / "fit" / "code.pt", weights_only=False)
    fitted = load_tracking(run_dir / "fit" / "flame_fit.npz", flame=flame)
    to_rig = cam.c2w @ W2C  # fitted world -> fitted camera -> rig world
    eval_cfg = build_config(TrackConfig, repo / "configs" / "fit.yaml",
                            overrides={"checkpoint": str(checkpoint), "subject_dir": str(subj), "out": str(run_dir)})
    views = load_subject_target(model, eval_cfg, torch.device("cpu"))
    mask_ids = torch.as_tensor(model.mask_ids)
    true_depth = float(cam.world_to_camera(flame(truth)[0][mask_ids].mean(0))[2])
    fit_depth = float(-flame(fitted)[0][mask_ids].mean(0)[2])
    res = {"variant": name, "subject": sid, "track_wall_s": round(wall, 2)}
    for key in ("seconds_fit", "seconds_fit_code", "seconds_fit_colour", "iterations", "psnr_photo_in_mask", "psnr_all",
                "ssim_photo_in_mask", "landmark_error_iod"):
        res[key] = m.get(key)
    for label, k in (("unseen_raw", 1.0), ("unseen_aligned", true_depth / fit_depth)):
        params = with_scale_about(fitted, torch.zeros(3), k)
        _, vb, _ = flame_vertices(model, flame_dir, None, params=params, flame=flame)
        vb = vb @ to_rig[:3, :3].T + to_rig[:3, 3]
        ev, _ = evaluate_views(model, code["w"], vb, views.eval_views, FRONTAL, "torch", False, code.get("colour"))
        res[label] = round(float(ev["psnr_unseen"]), 3)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="synthetic data root (subjects/, flame/)")
    p.add_argument("--checkpoint", type=Path, required=True, help="model.pt")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs")
    p.add_argument("--subject", default="017", help="held-out subject id")
    p.add_argument("--variants", nargs="+", default=["adam", "lbfgs"], choices=sorted(VARIANTS))
    args = p.parse_args()
    for name in args.variants:
        print(json.dumps(run(args.data, args.checkpoint, args.out, name, VARIANTS[name], args.subject)), flush=True)


if __name__ == "__main__":
    main()
