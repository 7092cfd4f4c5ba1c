"""A head from a photo alone (track.py --image PHOTO, no camera, no FLAME tracking): the real package portraits end to
end, the synthetic held-out identity against the calibrated fit of the same photo, and the errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_fitting import FRONTAL, fit_model, single_thread, subject_paths, track_cfg  # noqa: F401
from tests.training_fixtures import preprocessed_root  # noqa: F401

FAST = ["--iterations", "30", "--fit.colour_iterations", "10", "--progress", "false",
        "--export.turntable_frames", "4", "--export.turntable_size", "48"]


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_package_portraits_end_to_end(name, fit_model, preprocessed_root, tmp_path):  # noqa: F811
    """Both portraits through track.py; the astronaut also with the optional photometric FLAME stage."""
    import cv2

    import track
    from tests.test_landmarks import portraits

    photo = tmp_path / f"{name}.jpg"
    cv2.imwrite(str(photo), portraits()[name][..., ::-1])
    out = tmp_path / "out"
    # the astronaut also with the photometric FLAME stage, grace_hopper fitted on a copy scaled to a 128 px face
    refine = ["--fit.refine_flame", "true", "--fit.flame_iterations", "10"] if name == "astronaut" else []
    refine_or_scale = refine or ["--max_face_px", "128"]
    with single_thread():
        m = track.main(["--checkpoint", str(fit_model), "--image", str(photo), "--out", str(out),
                        "--flame_dir", str(preprocessed_root / "flame")] + FAST + refine_or_scale)
    for f in ("head.ply", "turntable.mp4", "landmarks.png", "metrics.json", "flame_fit.npz", "camera_params.json",
              "code.pt"):
        assert (out / f).is_file(), f
    assert m["faces_found"] == 1 and m["source"]["landmarks"] == "mediapipe face mesh"
    # the bar: fitted landmarks within 5 % of the inter-ocular distance on average (measured with the
    # synthetic FLAME of the test data: astronaut 4.3 %, grace_hopper 4.3 %)
    assert m["landmark_error_iod"] < 0.05, m["landmark_error_iod"]
    assert m["refine_flame"] == bool(refine)
    if refine:  # the refined FLAME is what flame_fit.npz holds
        assert len(m["flame_loss_history"]) == 1 and m["flame_loss_history"][0] > 0
        assert np.isfinite(m["landmark_error_iod_refined"])
        assert m["landmark_error_iod_refined"] != m["landmark_error_iod"]  # the refined FLAME was exported
    assert np.isfinite(m["psnr_photo_in_mask"]) and 0 < m["ssim_photo"] <= 1 and 0 < m["ssim_photo_in_mask"] <= 1
    assert m["num_views"] == 1 and m["psnr_unseen"] is None
    from models.flame import load_tracking
    from utils.data.camera_params import load_camera_params

    img = cv2.imread(str(photo))
    cams = load_camera_params(out / "camera_params.json", image_size=(img.shape[1], img.shape[0]))
    assert list(cams) == [FRONTAL]
    cam = cams[FRONTAL]  # written for the photo file, also when the fit worked on a scaled copy
    assert (cam.width, cam.height) == (img.shape[1], img.shape[0])
    assert cam.cx == pytest.approx(img.shape[1] / 2) and cam.fx == pytest.approx(2.5 * max(img.shape[:2]), rel=1e-3)
    if not refine:
        assert float(m["source"]["photo_scale"]) < 1 and m["face_size_px"] <= 128.5
    assert load_tracking(out / "flame_fit.npz").num_frames == 1


def test_image_only_path_vs_calibrated_fit(fit_model, preprocessed_root, tmp_path):  # noqa: F811
    """The held-out identity's frontal photo, fitted (a) with its calibrated camera and tracking (--subject_dir) and
    (b) from the photo alone with landmarks projected from the true FLAME + noise of 1 px at a 512-pixel-high photo
    (the test photo is 64 px high: 0.125 px, which the fitter is told through flame_fit.landmark_sigma_px); (b)'s
    head is placed in the rig through its fitted pose (fitted camera -> the true camera 222200037) and evaluated on
    the 15 unseen calibrated views.  A head seen by one camera is known only up to a scale about that camera (the
    photo is the same when head size and distance scale together; the shape prior, not the photo, sets the size), so
    that one degree of freedom is also aligned: the fitted scene scaled about the camera to the true face-mask
    distance ("depth-aligned"); rotation, shape and the position in the image are left as fitted."""
    from models.flame import FlameModel, load_tracking
    from utils.apps.track.pipeline import track
    from utils.apps.track.targets import flame_vertices, load_subject_target
    from utils.data.model_file import load_model
    from utils.data.nersemble import NersembleSubject
    from utils.evaluation import evaluate_views
    from utils.face.flame_fit import W2C, flame_landmarks_2d, with_scale_about

    p = subject_paths(preprocessed_root)
    flame_dir = preprocessed_root / "flame"
    flame = FlameModel.from_data_dir(flame_dir)
    truth = load_tracking(p["tracking"], flame=flame)
    cam = NersembleSubject(preprocessed_root / "subjects", "017").cameras(1.0, [FRONTAL])[FRONTAL]
    noise = cam.height / 512.0
    uv = flame_landmarks_2d(flame, truth, cam)[0].numpy()
    uv = uv + noise * np.random.default_rng(0).standard_normal(uv.shape)
    np.save(tmp_path / "lm.npy", uv)
    photo = p["frame"] / "images-2x" / f"cam_{FRONTAL}.jpg"
    with single_thread():
        calibrated = track(track_cfg(preprocessed_root, fit_model, tmp_path / "cal"))
        wild_cfg = track_cfg(preprocessed_root, fit_model, tmp_path / "wild", subject_dir="", image=str(photo),
                             landmarks=str(tmp_path / "lm.npy"), flame_dir=str(flame_dir),
                             **{"flame_fit.landmark_sigma_px": noise})
        wild = track(wild_cfg)
        model = load_model(fit_model)
        code = torch.load(tmp_path / "wild" / "code.pt", weights_only=False)
        fitted = load_tracking(tmp_path / "wild" / "flame_fit.npz", flame=flame)
        # fitted world -> fitted camera (W2C) -> rig world (the true camera's c2w)
        to_rig = cam.c2w @ W2C
        views = load_subject_target(model, track_cfg(preprocessed_root, fit_model, tmp_path), torch.device("cpu"))
        mask_ids = torch.as_tensor(model.mask_ids)
        true_depth = float(cam.world_to_camera(flame(truth)[0][mask_ids].mean(0))[2])
        fit_depth = float(-flame(fitted)[0][mask_ids].mean(0)[2])
        res = {}
        for label, k in (("raw", 1.0), ("depth-aligned", true_depth / fit_depth)):
            params = with_scale_about(fitted, torch.zeros(3), k)
            _, base, _ = flame_vertices(model, flame_dir, None, params=params, flame=flame)
            base_rig = base @ to_rig[:3, :3].T + to_rig[:3, 3]
            m, _ = evaluate_views(model, code["w"], base_rig, views.eval_views, FRONTAL, "torch", False,
                                  code.get("colour"))
            res[label] = m["psnr_unseen"]
    msg = (f"calibrated fit: unseen {calibrated['psnr_unseen']:.2f} dB; photo only: raw {res['raw']:.2f} dB, "
           f"depth-aligned {res['depth-aligned']:.2f} dB (face-mask depth {fit_depth:.3f} m fitted vs {true_depth:.3f} "
           f"m); landmark error {wild['landmark_error_px']:.2f} px")
    print(msg)
    # Measured (2-core CPU): calibrated 27.67 dB; photo only 27.14 dB depth-aligned (0.53 dB under), 23.35 dB raw
    # (face mask 1.3 % too close: the scale the photo cannot tell)
    assert calibrated["psnr_unseen"] - res["depth-aligned"] < 1.5, msg
    assert abs(fit_depth / true_depth - 1) < 0.05, msg


def test_photo_only_errors(fit_model, preprocessed_root, tmp_path):  # noqa: F811
    import cv2

    from utils.apps.track.pipeline import track
    from utils.face.landmarks import NoFaceError

    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path / "o", subject_dir="", image=str(noise),
                    flame_dir=str(preprocessed_root / "flame"))
    with pytest.raises(NoFaceError, match="noise.png"):
        track(cfg)
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    cfg.image = str(bad)
    with pytest.raises(ValueError, match="cannot decode"):
        track(cfg)
    cfg.image, cfg.camera_json = str(noise), str(tmp_path / "cams.json")  # --camera_json without --flame
    with pytest.raises(ValueError, match="--flame"):
        track(cfg)
