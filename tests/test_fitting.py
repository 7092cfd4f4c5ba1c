"""Single-image fitting (utils/apps/track/fit.py, track.py) on the tiny synthetic dataset.

The 20-step session model is too blurry for the fit to matter, so these tests use the session's small fit model
(tests/training_fixtures.py ``fit_model``: the tiny preset with a wider network, ~120 steps, about 10-20 s on 2 cores)
and fit the held-out identity "017" from its frontal photo.  Everything runs single-threaded: these workloads are far
too small for intra-op threads, which only cost time (a lot of it when the 2 cores are shared).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.training_fixtures import (  # noqa: F401  (fixtures, and names other test modules import from here)
    fit_model,
    get_fit_model,
    preprocessed_root,
    single_thread,
    tiny_config,
)

FIT_ITERATIONS = 40
FRONTAL = "222200037"


def subject_paths(root: Path, sid: str = "017") -> dict[str, Path]:
    s = root / "subjects" / sid
    seq = s / "sequences" / "EXP-1-head"
    return {"subject": s, "calib": s / "calibration" / "camera_params.json",
            "tracking": seq / "annotations" / "tracking" / "FLAME2023_v2" / "tracked_flame_params.npz",
            "frame": seq / "timesteps" / "frame_00000"}


def track_cfg(root: Path, checkpoint: Path, out: Path, **over):
    from utils.apps.track.config import TrackConfig
    from utils.core.config import build_config

    base = {"checkpoint": str(checkpoint), "subject_dir": str(subject_paths(root)["subject"]), "out": str(out),
            "progress": False, "fit.iterations": FIT_ITERATIONS, "export.turntable_frames": 6,
            "export.turntable_size": 48}
    base.update(over)
    repo = Path(__file__).resolve().parents[1]
    return build_config(TrackConfig, repo / "configs" / "fit.yaml", overrides=base)


@pytest.fixture(scope="module")
def fitted(preprocessed_root, fit_model, tmp_path_factory):  # noqa: F811
    """One full track() run on the held-out identity: (output folder, metrics)."""
    from utils.apps.track.pipeline import track

    out = tmp_path_factory.mktemp("track") / "017"
    with single_thread():
        metrics = track(track_cfg(preprocessed_root, fit_model, out))
    return out, metrics


# ------------------------------------------------------------------------------------------------ quality
def test_fit_beats_mean_code_on_unseen_views(fitted):
    _, m = fitted
    gain = m["psnr_unseen"] - m["psnr_unseen_mean_code"]
    fit_gain = m["psnr_fit_view"] - m["psnr_fit_view_mean_code"]
    colour_gain = m["psnr_unseen"] - m["psnr_unseen_code_only"]
    msg = (f"unseen PSNR mean code {m['psnr_unseen_mean_code']:.2f} -> code only {m['psnr_unseen_code_only']:.2f} "
           f"-> fitted {m['psnr_unseen']:.2f} ({gain:+.2f} dB); fitted view {m['psnr_fit_view_mean_code']:.2f} -> "
           f"{m['psnr_fit_view']:.2f}")
    # Measured on 2 CPU cores with this fixture (2 training identities, 120 steps; 40 code + 40 colour iterations),
    # unseen-view gain over the mean code for training seeds 0/1/2/3 of the fit model, on the synthetic heads before
    # issue 17 (wide eye holes):
    #   code only, style_reg 0 (the old fit): +4.04/+1.82/+2.27/+2.70 dB
    #   code + colour residual, fit.lr 0.2:   +4.45/+2.19/+2.77/+3.18 dB   (fitted view +6.79/+4.39/+5.35/+5.10)
    # On the FLAME-like heads of issue 17 (almond lid openings, lips that part), seed 0: +2.46 dB; the colour stage
    # adds +4.7 dB on the fitted view but -0.05 dB on the unseen ones at this 32 px size (at full resolution on an H200
    # it adds +0.9 dB on the unseen views: benchmarks/results/eyes_h200_sweep3.md, fit[nocol] against fit[today]).
    colour_fit_gain = m["psnr_fit_view"] - m["psnr_fit_view_code_only"]
    assert gain >= 2.0, msg
    assert fit_gain >= 3.0, msg
    # With the Mip-Splatting filters (issue 21; the per-vertex colour is smoothed by the 3D filter, about half a
    # training pixel, a large part of this 32 px crop's detail) the colour stage added +0.82 dB on the fitted view
    # (seed 0), from +4.7 dB before: the bar is 0.5 dB. The residual is also held at zero on the mask's boundary
    # rings (fit.colour_boundary_rings 2, issue 25).
    assert colour_fit_gain >= 0.5 and colour_gain >= -0.25, (colour_fit_gain, colour_gain, msg)
    assert m["ssim_unseen"] > m["ssim_unseen_mean_code"], msg


def test_colour_residual_is_small_saved_and_in_head_ply(fitted, fit_model):  # noqa: F811
    from models.gaussians import SH_C0, GaussianCloud
    from utils.data.code_file import colour_offsets, load_code
    from utils.data.model_file import load_model

    out, m = fitted
    model = load_model(fit_model)
    code = load_code(out / "code.pt", model)
    assert m["refine_colour"] and m["colour_iterations"] == 40 and code.meta["refine_colour"]
    assert code.colour is not None and code.colour.shape == code.base_vertices.shape
    rms = float(code.colour.square().sum(-1).mean().sqrt())
    assert 0.0 < rms < 0.1 and float(code.colour.norm(dim=-1).max()) < 0.5  # a small correction (RGB in [0, 1])
    assert m["colour_residual_rms"] == pytest.approx(rms, abs=1e-4)
    # head.ply holds the network's colours plus the residual
    with torch.no_grad():
        dc = model.field.synthesize(code.w[None], model.vertices(code.base_vertices)[None])[0].sh[:, 0]
        want = dc + colour_offsets(model, code.colour) / SH_C0
    got = GaussianCloud.load_ply(out / "head.ply").sh[:, 0]
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, dc, atol=1e-3)


def test_colour_residual_reproduces_metrics_after_reload(fitted, fit_model, preprocessed_root):  # noqa: F811
    from utils.apps.track.targets import load_subject_target
    from utils.data.code_file import load_code
    from utils.data.model_file import load_model
    from utils.evaluation import evaluate_views

    out, m = fitted
    model = load_model(fit_model)
    code = load_code(out / "code.pt", model)
    cfg = track_cfg(preprocessed_root, fit_model, out)
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        full, _ = evaluate_views(model, code.w, code.base_vertices, target.eval_views, FRONTAL, lpips=False,
                                 colour=code.colour, gaussians=code.gaussians)
        alone, _ = evaluate_views(model, code.w, code.base_vertices, target.eval_views, FRONTAL, lpips=False)
    assert full["psnr_unseen"] == pytest.approx(m["psnr_unseen"], abs=1e-3)
    assert alone["psnr_unseen"] == pytest.approx(m["psnr_unseen_code_only"], abs=1e-3)


def test_eye_term_of_the_fit(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    """fit.eye_weight / fit.colour_eye_weight add an L1 term inside the fitted view's eye regions at every image size,
    each stage's weight scaled by min(1, eye pixels / fit.eye_pixels, fit.colour_eye_pixels).  At this fixture's
    44x64 photos (32 px crops, 29 eye pixels) the term is on (it was left out below 1,000 eye pixels), scaled down;
    at full weight it fitted noise: measured unseen eye PSNR 28.15 dB without the term, 27.90 scaled (4,000 px),
    24.77 at full weight; a term at full weight lowers the unseen eyes, the scaled one does not (within 0.4 dB)."""
    from utils.apps.track.fit import fit_identity, fit_view_eyes, photometric, scaled_eye_weight
    from utils.apps.track.targets import load_subject_target
    from utils.data.model_file import load_model
    from utils.evaluation import evaluate_views

    model = load_model(fit_model)
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path)
    f = cfg.fit
    assert (f.eye_weight, f.colour_eye_weight, f.eye_pixels, f.colour_eye_pixels, f.eye_min_pixels) == \
        (0.3, 10.0, 0, 4000, 0)  # fit.yaml
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        assert target.eye_landmarks is not None
        eyes = fit_view_eyes(target, f)  # on at this size
        n = int(eyes.sum())
        assert eyes.shape == target.fit_view.mask.shape and 5 < n < 0.3 * float(target.fit_view.mask.sum())
        # the colour stage's weight per eye pixel is fixed below colour_eye_pixels, the full weight above it
        assert scaled_eye_weight(10.0, eyes, 4000) == pytest.approx(10.0 * n / 4000)
        assert scaled_eye_weight(10.0, torch.ones(80, 80, 1), 4000) == 10.0
        assert scaled_eye_weight(0.3, eyes, 0) == 0.3 and scaled_eye_weight(10.0, None, 4000) == 0.0
        gt = target.fit_view.image
        pred = gt.flip(1)  # a wrong image: the eye term adds its L1 inside the regions
        assert float(photometric(pred, gt, f, eyes)) > float(photometric(pred, gt, f))
        psnr_eyes = {}
        variants = {"scaled": {}, "off": {"eye_weight": 0.0, "colour_eye_weight": 0.0},
                    "full": {"colour_eye_pixels": 0}}
        for name, over in variants.items():
            fc = replace(f, **over)
            res = fit_identity(model, target, fc, progress=False)
            assert res.eye_term_pixels == (0 if name == "off" else n)
            m, _ = evaluate_views(model, res.code.w, res.code.base_vertices, target.eval_views,
                                  target.fit_view.serial, lpips=False, colour=res.code.colour,
                                  eyes=target.eye_landmarks)
            psnr_eyes[name] = m["psnr_eyes_unseen"]
    assert psnr_eyes["full"] < psnr_eyes["off"] - 1.0, psnr_eyes
    assert psnr_eyes["scaled"] > psnr_eyes["off"] - 0.4, psnr_eyes


def test_colour_stage_off_and_regularised(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    from utils.apps.track.fit import fit_colour, fit_identity
    from utils.apps.track.targets import load_subject_target
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, **{"fit.iterations": 5, "fit.min_iterations": 5,
                                                               "fit.refine_colour": False})
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        res = fit_identity(model, target, cfg.fit, progress=False)
        assert res.code.colour is None and res.colour_iterations == 0 and not res.code.meta["refine_colour"]
        # Adam moves every residual entry by about the learning rate per step whatever the gradient's size, so the
        # penalty shows once the residual has settled (40 iterations, the preset's count), not within a few steps
        cfg.fit.colour_iterations = 40
        norms = []
        for weight in (1.0, 100.0):  # a stronger L2 penalty keeps the residual closer to zero
            cfg.fit.colour_weight = weight
            colour, losses = fit_colour(model, res.code.w, target.base_vertices, target.fit_view.camera,
                                        target.fit_view.image, cfg.fit)
            assert colour.shape == target.base_vertices.shape and len(losses) == 4
            norms.append(float(colour.norm(dim=-1).mean()))
    assert 0 < norms[1] < 0.5 * norms[0], norms


def test_code_without_colour_still_loads(fit_model, tmp_path):  # noqa: F811
    """code.pt files written before the colour stage (version 1, no "colour" entry) load with colour None."""
    from utils.data.code_file import FittedCode, load_code, save_code
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    w = model.field.mapping.w_avg.clone()
    path = save_code(tmp_path / "code.pt", FittedCode(w, None, model.base_vertices[0]), model)
    doc = torch.load(path, weights_only=False)
    del doc["colour"]
    doc["version"] = 1
    torch.save(doc, path)
    code = load_code(path, model)
    assert code.colour is None and torch.equal(code.w, w)
    colour = torch.full_like(model.base_vertices[0], 0.05)
    path2 = save_code(tmp_path / "c2.pt", FittedCode(w, None, model.base_vertices[0], colour=colour), model)
    assert torch.equal(load_code(path2, model).colour, colour)


# ------------------------------------------------------------------------------------------------ outputs
def test_metrics_json_fields(fitted):
    out, m = fitted
    doc = json.loads((out / "metrics.json").read_text())
    for key in ("psnr_all", "psnr_unseen", "ssim_all", "ssim_unseen", "psnr_unseen_mean_code", "iterations",
                "seconds", "seconds_per_phase", "lpips_all", "lpips_unseen", "per_view", "start",
                "psnr_unseen_code_only", "colour_iterations", "seconds_fit_code", "seconds_fit_colour"):
        assert key in doc, key
    assert set(doc["seconds_per_phase"]) == {"load", "fit", "evaluate", "export"}
    assert doc["seconds"] == pytest.approx(sum(doc["seconds_per_phase"].values()), abs=1e-3)
    assert 1 <= doc["iterations"] <= FIT_ITERATIONS
    assert doc["num_views"] == 16 and doc["num_unseen_views"] == 15
    assert FRONTAL not in doc["unseen_views"] and len(doc["per_view"]) == 16
    assert doc["start"] in ("mean_code", "w_avg", "mean_w")
    if doc["lpips_all"] is None:
        assert "lpips_note" in doc
    # the eye regions (utils/face/regions.py) beside the face-mask figures; the eyes are harder than the face on average
    for key in ("psnr_eyes_all", "psnr_eyes_unseen", "ssim_eyes_all", "ssim_eyes_unseen",
                "psnr_eyes_unseen_mean_code", "psnr_eyes_unseen_code_only"):
        assert isinstance(doc[key], float), key
    assert 5 < doc["psnr_eyes_unseen"] < doc["psnr_unseen"] + 10
    assert sum("psnr_eyes" in v for v in doc["per_view"].values()) == 16


def test_head_ply_is_3dgs_and_loads_back(fitted, fit_model):  # noqa: F811
    from plyfile import PlyData

    from models.gaussians import GaussianCloud
    from utils.data.model_file import load_model

    out, _ = fitted
    props = [p.name for p in PlyData.read(str(out / "head.ply"))["vertex"].properties]
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1",
                "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert [p for p in props if not p.startswith("f_rest_")] == expected
    cloud = GaussianCloud.load_ply(out / "head.ply")
    assert len(cloud) == load_model(fit_model).field.num_gaussians
    cloud.check_finite()


def test_views_turntable_and_code(fitted, fit_model):  # noqa: F811
    import cv2

    from utils.data.code_file import load_code
    from utils.data.model_file import load_model
    from utils.data.nersemble import SERIALS

    out, _ = fitted
    for s in SERIALS:
        img = cv2.imread(str(out / "views" / f"cam_{s}.png"))
        assert img is not None and img.shape[1] % 2 == 0  # render | photo side by side
    assert cv2.imread(str(out / "grid.png")) is not None
    cap = cv2.VideoCapture(str(out / "turntable.mp4"))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    assert n == 6
    model = load_model(fit_model)
    code = load_code(out / "code.pt", model)
    assert code.w.shape == (model.field.cfg.style_dim,)
    assert code.base_vertices.shape == model.template_base.shape


def test_refine_geometry_moves_vertices_a_little(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    from utils.apps.track.fit import fit_identity
    from utils.apps.track.targets import load_subject_target
    from utils.data.model_file import load_model

    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, **{"fit.refine_geometry": True, "fit.iterations": 10,
                                                               "fit.min_iterations": 10})
    model = load_model(fit_model)
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        res = fit_identity(model, target, cfg.fit, progress=False)
    d = (res.code.base_vertices - target.base_vertices).norm(dim=-1)
    assert res.iterations == 10
    assert float(d.max()) > 0 and float(d.max()) < 0.01  # moved, by less than a centimetre


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_own_photo_with_projected_mask(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    import cv2

    import track

    p = subject_paths(preprocessed_root)
    out = tmp_path / "me"
    photo = p["frame"] / "images-2x" / f"cam_{FRONTAL}.jpg"
    with single_thread():
        m = track.main(["--checkpoint", str(fit_model), "--image", str(photo), "--camera_json", str(p["calib"]),
                        "--flame", str(p["tracking"]), "--flame_dir", str(preprocessed_root / "flame"),
                        "--out", str(out), "--iterations", "5", "--progress", "false",
                        "--export.turntable", "false", "--export.ply", "false"])
    assert m["num_views"] == 1 and m["psnr_unseen"] is None and m["psnr_all"] is not None
    assert m["source"]["mask"] == "projected"
    assert len(list((out / "views").glob("cam_*.png"))) == 16  # every calibrated camera is rendered
    assert not (out / "turntable.mp4").exists() and (out / "code.pt").is_file()

    # the projected mask is the one preprocessing made (same functions)
    from utils.apps.track.targets import flame_vertices, projected_face_mask
    from utils.data.model_file import load_model
    from utils.data.nersemble import NersembleSubject

    model = load_model(fit_model)
    verts, _, flame = flame_vertices(model, preprocessed_root / "flame", p["tracking"])
    cam = NersembleSubject(preprocessed_root / "subjects", "017").cameras(1.0, [FRONTAL])[FRONTAL]
    ours = projected_face_mask(model, verts, flame.faces, cam) > 0.5
    ref = cv2.imread(str(p["frame"] / "flamemask_proj" / f"cam_{FRONTAL}.png"), cv2.IMREAD_GRAYSCALE) > 127
    iou = (ours & ref).sum() / max(1, (ours | ref).sum())
    assert iou > 0.95, iou


def test_cli_all_heldout_prints_table(preprocessed_root, fit_model, tmp_path, capsys):  # noqa: F811
    import track

    with single_thread():
        rows = track.main(["--all_heldout", "--data_root", str(preprocessed_root), "--checkpoint", str(fit_model),
                           "--out", str(tmp_path), "--iterations", "3", "--fit.min_iterations", "3", "--refine_colour",
                           "false", "--progress", "false", "--export.turntable", "false", "--export.views", "false"])
    printed = capsys.readouterr().out
    assert [r["identity"] for r in rows] == ["017"]
    assert rows[0]["colour_iterations"] == 0 and rows[0]["psnr_unseen_code_only"] == rows[0]["psnr_unseen"]
    assert "| 017 |" in printed and "**mean**" in printed and "PSNR unseen, fitted" in printed
    assert "PSNR unseen, code only" in printed
    assert (tmp_path / "017" / "metrics.json").is_file() and (tmp_path / "summary.md").is_file()


def test_help_documents_every_flag(capsys):
    import track

    with pytest.raises(SystemExit):
        track.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--subject_dir", "--camera", "--flame_dir", "--image", "--camera_json", "--flame",
                 "--mask", "--out", "--refine_geometry", "--refine_colour", "--fit.colour_iterations", "--all_heldout",
                 "--fit.iterations", "--export.turntable"):
        assert flag in text, flag


# ------------------------------------------------------------------------------------------------ errors
def test_bad_image_path(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    from utils.apps.track.pipeline import track

    p = subject_paths(preprocessed_root)
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, subject_dir="", image=str(tmp_path / "nope.jpg"),
                    camera_json=str(p["calib"]), flame=str(p["tracking"]))
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        track(cfg)
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    cfg.image = str(bad)
    with pytest.raises(ValueError, match="cannot decode"):
        track(cfg)


def test_camera_missing_from_json(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    from utils.apps.track.pipeline import track

    p = subject_paths(preprocessed_root)
    photo = p["frame"] / "images-2x" / f"cam_{FRONTAL}.jpg"
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, subject_dir="", image=str(photo), camera="999999999",
                    camera_json=str(p["calib"]), flame=str(p["tracking"]))
    with pytest.raises(ValueError, match=r"camera '999999999' is not in .*camera_params.json"):
        track(cfg)
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, camera="999999999")
    with pytest.raises(ValueError, match="camera 999999999 has no image"):
        track(cfg)


def test_wrong_checkpoint_files(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    from utils.apps.track.pipeline import track
    from utils.data.model_file import load_model

    # a training checkpoint is not a model.pt
    ckpt = sorted((fit_model.parent / "checkpoints").glob("ckpt_*.pt"))[-1]
    with pytest.raises(ValueError, match="not an identity-field model.pt"):
        track(track_cfg(preprocessed_root, ckpt, tmp_path))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable model file"):
        track(track_cfg(preprocessed_root, junk, tmp_path))
    # a code fitted with a model of another config (code dimension 16, this model has 24)
    path = write_foreign_code(tmp_path / "other" / "code.pt", load_model(fit_model))
    with pytest.raises(ValueError, match="code_dim=16 but the model has code_dim=24"):
        track(track_cfg(preprocessed_root, fit_model, tmp_path, **{"fit.init": str(path), "fit.space": "z"}))


def write_foreign_code(path: Path, model) -> Path:
    """A code.pt as a model with code_dim 16 (another config) would write it."""
    from utils.data.code_file import FittedCode, save_code

    f = model.field
    save_code(path, FittedCode(w=torch.zeros(f.cfg.style_dim), z=torch.zeros(16),
                               base_vertices=model.base_vertices[0]), model, "other/model.pt")
    doc = torch.load(path, weights_only=False)
    doc["signature"]["code_dim"] = 16
    doc["signature"]["model_config"] = dict(doc["signature"]["model_config"], code_dim=16)
    torch.save(doc, path)
    return path


def test_flame_files_must_match_the_model(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    from utils.apps.track.pipeline import track

    # a FLAME folder whose template differs from the training one
    flame = tmp_path / "flame"
    shutil.copytree(preprocessed_root / "flame", flame)
    import pickle

    from models.flame import MODEL_FILENAMES, load_flame_pickle  # noqa: F401

    pkl = next(flame / n for n in MODEL_FILENAMES if (flame / n).is_file())
    model = load_flame_pickle(pkl, validate=False)
    model["v_template"] = np.asarray(model["v_template"]) * 1.1
    with open(pkl, "wb") as fh:
        pickle.dump(model, fh)
    with pytest.raises(ValueError, match="FLAME template"):
        track(track_cfg(preprocessed_root, fit_model, tmp_path, flame_dir=str(flame)))


# ------------------------------------------------------------------ issue 26 class 10: --out claimed first, one set
def test_fitted_outputs_form_one_finished_set(fitted):
    out, _ = fitted
    rec = json.loads((out / ".track_outputs.json").read_text())
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert rec["finished"] is True and sorted(rec["files"]) == on_disk, (rec, on_disk)


@pytest.mark.parametrize("case", ["earlier_fit", "locked_by_another_process", "user_file_at_a_view_name",
                                  "all_heldout_earlier_summary"])
def test_out_is_claimed_before_the_fit(preprocessed_root, fit_model, fitted, tmp_path, monkeypatch, case):  # noqa: F811
    """A folder track.py may not write ends the run before any fitting (it used to fail 35-45 s in, after the fit,
    possibly leaving code.pt without metrics.json)."""
    import subprocess
    import sys

    import utils.apps.track.pipeline as T
    from utils.core.locks import FolderInUseError

    def no_fit(*a, **k):
        raise AssertionError("the fit ran although --out could not be written")

    monkeypatch.setattr(T, "fit_identity", no_fit)
    out = tmp_path / "o"
    holder = None
    if case == "earlier_fit":
        shutil.copytree(fitted[0], out)
    elif case == "user_file_at_a_view_name":
        (out / "views").mkdir(parents=True)
        (out / "views" / f"cam_{FRONTAL}.png").write_bytes(b"mine")
    elif case == "all_heldout_earlier_summary":
        out.mkdir()
        (out / "summary.md").write_text("mine")
    else:
        repo = Path(__file__).resolve().parents[1]
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                                   "from utils.core.locks import FolderLock; FolderLock(sys.argv[2]).acquire(); "
                                   "print('held', flush=True); time.sleep(60)", str(repo), str(out)],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    try:
        with pytest.raises(FolderInUseError if holder else FileExistsError):
            if case.startswith("all_heldout"):
                T.track_all_heldout(track_cfg(preprocessed_root, fit_model, out, all_heldout=True,
                                              data_root=str(preprocessed_root)))
            else:
                T.track(track_cfg(preprocessed_root, fit_model, out))
    finally:
        if holder:
            holder.kill()
            holder.wait()
    after = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    assert after == before


def test_interrupted_fit_is_unfinished_and_overwrite_replaces_only_its_files(preprocessed_root, fit_model, tmp_path,
                                                                             monkeypatch):  # noqa: F811
    import utils.apps.track.pipeline as T

    out = tmp_path / "o"
    (out / "frames").mkdir(parents=True)
    (out / "frames" / "frame_00000.png").write_bytes(b"mine")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(T, "write_video", disk_full)  # dies after code.pt, head.ply and the views
    with single_thread(), pytest.raises(OSError):
        T.track(track_cfg(preprocessed_root, fit_model, out, **{"fit.iterations": 2, "fit.colour_iterations": 2}))
    rec = json.loads((out / ".track_outputs.json").read_text())
    assert rec["finished"] is False and (out / "code.pt").is_file() and not (out / "metrics.json").exists()
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--overwrite"):
        T.track(track_cfg(preprocessed_root, fit_model, out))
    with single_thread():
        T.track(track_cfg(preprocessed_root, fit_model, out, overwrite=True,
                          **{"fit.iterations": 2, "fit.colour_iterations": 2, "export.views": False}))
    rec = json.loads((out / ".track_outputs.json").read_text())
    assert rec["finished"] is True and not any((out / "views").glob("*.png"))  # the earlier views were its own
    assert (out / "frames" / "frame_00000.png").read_bytes() == b"mine"


def test_colour_boundary_rings(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    """fit.colour_boundary_rings holds the colour residual at zero on the face mask's open boundary (and rings inside
    it): the Gaussians there straddle the silhouette, and colour on them spills onto the black background."""
    from utils.apps.track.fit import boundary_rings, fit_colour, fit_identity
    from utils.apps.track.targets import load_subject_target
    from utils.data.model_file import load_model

    # a 3x3 grid of vertices (8 triangles): the 8 outer vertices are the boundary, the centre is one ring inside
    faces = np.array([[0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4], [3, 4, 7], [3, 7, 6], [4, 5, 8], [4, 8, 7]])
    assert boundary_rings(9, faces, 1).tolist() == [True] * 4 + [False] + [True] * 4
    assert boundary_rings(9, faces, 2).all()
    model = load_model(fit_model)
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, **{"fit.iterations": 5, "fit.min_iterations": 5,
                                                               "fit.refine_colour": False})
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        res = fit_identity(model, target, cfg.fit, progress=False)
        cfg.fit.colour_iterations = 10
        edge = boundary_rings(len(target.base_vertices), model.base_faces, 1)
        assert 0 < int(edge.sum()) < len(edge) // 2
        out = {}
        for rings in (0, 1):
            cfg.fit.colour_boundary_rings = rings
            out[rings], _ = fit_colour(model, res.code.w, target.base_vertices, target.fit_view.camera,
                                       target.fit_view.image, cfg.fit)
    assert float(out[0][edge].abs().max()) > 1e-3 and float(out[1][edge].abs().max()) == 0.0
    assert float(out[1][~edge].abs().max()) > 1e-3
    # the stage's mesh tables are built once per loaded model (a fit per photo does not rebuild them on the host)
    interior = model.derived(("interior", 1, "cpu"), lambda: None)
    assert interior is not None and torch.equal(interior[:, 0], ~edge)
    assert model.derived(("laplacian", "cpu"), lambda: None) is not None


def test_rim_stage(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    """fit.refine_rim: one opacity-logit and one log-scale shift per ring of the face mask's open boundary (subdivided
    mesh), fitted to the photo with the style fixed, stored as the code's per-Gaussian residual.  On a photo rendered
    with a known rim correction it recovers the correction's sign and most of the photo's PSNR; zero elsewhere."""
    from utils.apps.track.fit import boundary_ring_index, fit_identity, fit_rim, rim_residual
    from utils.apps.track.targets import load_subject_target
    from utils.data.code_file import code_cloud, load_code, save_code
    from utils.data.model_file import load_model
    from utils.evaluation import evaluate_views
    from utils.losses import psnr

    faces = np.array([[0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4], [3, 4, 7], [3, 7, 6], [4, 5, 8], [4, 8, 7]])
    assert boundary_ring_index(9, faces, 2).tolist() == [0] * 4 + [1] + [0] * 4
    assert boundary_ring_index(9, faces, 1).tolist() == [0] * 4 + [-1] + [0] * 4
    model = load_model(fit_model)
    f = model.field
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, **{"fit.iterations": 5, "fit.min_iterations": 5,
                                                               "fit.refine_colour": False, "fit.refine_rim": True})
    ring = boundary_ring_index(f.num_vertices, f.faces.cpu().numpy(), 2)
    assert 0 < int((ring == 0).sum()) < f.num_vertices // 3 and int((ring == 1).sum()) > 0
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        res = fit_identity(model, target, cfg.fit, progress=False)
        assert res.rim_params is not None and res.rim_params.shape == (2, 2) and res.rim_iterations == 30
        g = res.code.gaussians
        assert g.shape == (f.num_vertices, f.K, 7) and float(g[ring < 0].abs().max()) == 0.0
        assert float(g[..., :3].abs().max()) == 0.0  # no position change
        # the code.pt round trip keeps the residual and the metrics
        path = save_code(tmp_path / "code.pt", res.code, model)
        back = load_code(path, model)
        assert torch.equal(back.gaussians, g)
        a, _ = evaluate_views(model, res.code.w, res.code.base_vertices, target.eval_views, FRONTAL, lpips=False,
                              gaussians=g)
        b, _ = evaluate_views(model, back.w, back.base_vertices, target.eval_views, FRONTAL, lpips=False,
                              gaussians=back.gaussians)
        assert a["psnr_unseen"] == pytest.approx(b["psnr_unseen"], abs=1e-5)
        # a photo of the fitted style with a thinner, fainter rim: the stage finds negative shifts
        true = torch.tensor([[-3.0, -0.7], [-1.5, -0.3]])
        cam = target.fit_view.camera
        with torch.no_grad():
            photo = render_cloud(code_cloud(model, res.code.w, target.base_vertices,
                                            gaussians=rim_residual(true, ring, f.K)), cam)
            plain = render_cloud(code_cloud(model, res.code.w, target.base_vertices), cam)
        cfg.fit.rim_iterations = 60
        params, resid, losses = fit_rim(model, res.code.w, target.base_vertices, cam, photo, cfg.fit)
        with torch.no_grad():
            got = render_cloud(code_cloud(model, res.code.w, target.base_vertices, gaussians=resid), cam)
    assert losses[-1] < losses[0], losses
    assert float(params[0, 0]) < -0.5 and float(params[0, 1]) < 0.0, params
    before, after = float(psnr(plain, photo)), float(psnr(got, photo))
    assert after > before + 3.0, (before, after, params)


def render_cloud(cloud, camera):
    from models.renderer import render

    return render(cloud, camera)["image"]


def test_downscaled_view_keeps_means_and_scales_camera():
    from models.camera import Camera
    from utils.apps.track.fit import downscaled_view

    cam = Camera.look_at((0, 0, 0.6), (0, 0, 0), (0, 1, 0), 40, 64)
    img = torch.rand(64, 40, 3)
    eyes = torch.zeros(64, 40, 1)
    eyes[10:20, 8:16] = 1
    c2, i2, e2 = downscaled_view(cam, img, eyes, 0.5)
    assert (c2.width, c2.height) == (20, 32) and i2.shape == (32, 20, 3) and e2.shape == (32, 20, 1)
    assert torch.allclose(i2.mean((0, 1)), img.mean((0, 1)), atol=1e-5)  # area averaging keeps the mean colour
    assert float(e2.sum()) == pytest.approx(float(eyes.sum()) / 4)
    assert c2.fx == pytest.approx(cam.fx / 2) and c2.cx == pytest.approx(cam.cx / 2)
    same = downscaled_view(cam, img, eyes, 1.0)
    assert same[0] is cam and same[1] is img and same[2] is eyes


def finer_model(model):
    """The level-0 ``model`` on its mesh one level finer (a level-1 TrainedModel whose coarse_field(1) is ``model``'s
    field): the network's weights as they are, the per-vertex template features and 3D-filter rates interpolated at
    the edge midpoints (subdivision keeps the level-0 vertices as a prefix)."""
    import dataclasses

    from models.flame.subdivision import make_subdivision_plan, subdivide_vertices
    from models.identity_field import IdentityField

    f0 = model.field
    assert model.plan.levels == 0
    plan = make_subdivision_plan(len(model.template_base), model.base_faces, 1)
    f1 = IdentityField(f0.cfg, f0.num_identities, subdivide_vertices(model.template_base.cpu(), plan),
                       torch.as_tensor(plan.faces[1]))
    per_vertex = ("template_features", "template_verts", "faces")
    f1.load_state_dict({k: v for k, v in f0.state_dict().items() if k not in per_vertex}, strict=False)
    with torch.no_grad():
        if f0.template_features is not None:
            f1.template_features.copy_(subdivide_vertices(f0.template_features.cpu(), plan))
    if f0.sampling_rate is not None:
        f1.set_sampling_rate(subdivide_vertices(f0.sampling_rate[:, None].cpu(), plan)[:, 0])
    for q in f1.parameters():
        q.requires_grad_(False)
    return dataclasses.replace(model, field=f1.eval(), plan=plan)


def test_code_stage_at_a_lower_resolution(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    """fit.code_scale: the code stage on a half-resolution copy of the photo still gets most of the full fit's gain
    on the fitted view; so does fit.code_levels_down 1 (the code stage through the network on its mesh one level
    coarser; the gain is measured at the full level); the colour stage runs at full resolution; a single start is not
    rendered before the loop (its loss is the first iteration's); a level below the base mesh is refused."""
    from models.renderer import render
    from utils.apps.track.fit import fit_identity
    from utils.apps.track.targets import load_subject_target
    from utils.data.code_file import code_cloud
    from utils.data.model_file import load_model
    from utils.losses import psnr

    model = finer_model(load_model(fit_model))  # level 1, so the code stage can go one level down
    gains = {}
    with single_thread():
        for scale, down in ((1.0, 0), (0.5, 0), (1.0, 1)):
            cfg = track_cfg(preprocessed_root, fit_model, tmp_path, **{
                "fit.iterations": 30, "fit.min_iterations": 30, "fit.refine_colour": False, "fit.init": "mean",
                "fit.code_scale": scale, "fit.code_levels_down": down})
            target = load_subject_target(model, cfg, torch.device("cpu"))
            res = fit_identity(model, target, cfg.fit, progress=False)
            assert list(res.start_losses) == ["mean_code"] and res.start_losses["mean_code"] > 0
            v = target.fit_view
            img = lambda w: render(code_cloud(model, w, target.base_vertices), v.camera)["image"]  # noqa: E731
            gains[scale, down] = float(psnr(img(res.code.w), v.image) - psnr(img(res.start_w), v.image))
            assert res.seconds_code_loop > 0 and res.seconds_start >= 0 and res.seconds_capture >= 0
        assert model.coarse_field(1) is model.coarse_field(1)  # built once per loaded model
        cfg.fit.code_levels_down = model.plan.levels + 1
        with pytest.raises(ValueError, match="code_levels_down"):
            fit_identity(model, target, cfg.fit, progress=False)
    full = gains[1.0, 0]
    assert full > 1.0 and gains[0.5, 0] > 0.6 * full and gains[1.0, 1] > 0.6 * full, gains


def test_photo_target_crops_the_no_data_pixels_with_the_fitted_view():
    """photo_target: the no-data map (outline cut + rim band, targets.no_data_mask) is cropped exactly like the
    fitted view, so the fit leaves out the same pixels the photo lost to the mask; without one there is none."""
    from models.camera import Camera
    from utils.apps.track.config import TrackConfig
    from utils.apps.track.targets import no_data_mask, photo_target
    from utils.data.dataset import crop_size, crop_view

    cam = Camera.look_at((0, 0, 0.6), (0, 0, 0), (0, 1, 0), 80, 96)
    photo = np.random.default_rng(0).random((96, 80, 3)).astype(np.float32)
    proj = np.zeros((96, 80), np.float32)
    proj[20:70, 15:60] = 1.0  # projected FLAME face mask
    mask = proj.copy()
    mask[:, 45:] = 0.0  # the detector's outline cut its right part
    ignore = no_data_mask(mask, proj, 1, True)
    cfg = TrackConfig()
    t = photo_target("x", photo, mask[..., None], cam, torch.zeros(5, 3), cfg, torch.device("cpu"), ignore=ignore)
    assert t.ignore is not None and t.ignore.shape == t.fit_view.mask.shape
    # the crop keeps the mask and the no-data map aligned: never both, and the cut region is in the map
    assert float((t.ignore * t.fit_view.mask).sum()) == 0.0
    fw, fh = crop_size([mask[..., None]], cfg.fit.crop_margin, cfg.fit.crop_multiple)
    want, m_crop, _ = crop_view(ignore[..., None], mask[..., None], cam, fw, fh)
    assert np.array_equal(t.ignore.numpy(), want) and np.array_equal(t.fit_view.mask.numpy(), m_crop)
    assert float(t.ignore.sum()) > 0
    assert photo_target("x", photo, mask[..., None], cam, torch.zeros(5, 3), cfg, torch.device("cpu")).ignore is None


def test_code_and_colour_stage_lbfgs(preprocessed_root, fit_model, tmp_path):  # noqa: F811
    """fit.optimizer lbfgs reaches a lower fitted-view loss than Adam in the same (few) code iterations (with the
    default step cap: uncapped unit steps diverged on this model); fit.colour_solver lbfgs lowers the colour stage's
    loss at every step, with the boundary rings at zero; lbfgs with refine_geometry or an unknown optimiser is
    refused."""
    from utils.apps.track.fit import boundary_rings, fit_colour, fit_identity
    from utils.apps.track.targets import load_subject_target
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    cfg = track_cfg(preprocessed_root, fit_model, tmp_path, **{"fit.iterations": 12, "fit.min_iterations": 12,
                                                               "fit.refine_colour": False, "fit.check_every": 1})
    edge = boundary_rings(len(model.template_base), model.base_faces, cfg.fit.colour_boundary_rings)
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        code = {opt: fit_identity(model, target, replace(cfg.fit, optimizer=opt), progress=False)
                for opt in ("adam", "lbfgs")}
        assert code["lbfgs"].iterations == 12 and code["lbfgs"].losses[-1] < code["adam"].losses[-1], \
            (code["lbfgs"].losses, code["adam"].losses)
        v, w = target.fit_view, code["lbfgs"].code.w
        colour = {}
        for solver in ("adam", "lbfgs"):
            c = replace(cfg.fit, colour_solver=solver, colour_iterations=8)
            res, losses = fit_colour(model, w, target.base_vertices, v.camera, v.image, c)
            assert float(res[edge].abs().max()) == 0.0 and float(res.abs().max()) > 1e-3
            colour[solver] = losses
        lb = colour["lbfgs"]
        assert all(b < a for a, b in zip(lb, lb[1:])) and lb[-1] < 0.8 * lb[0], colour
        for bad in ({"optimizer": "lbfgs", "refine_geometry": True}, {"optimizer": "sgd"},
                    {"colour_solver": "newton"}):
            with pytest.raises(ValueError, match="optimi|colour_solver"):
                fit_identity(model, target, replace(cfg.fit, **bad), progress=False)
