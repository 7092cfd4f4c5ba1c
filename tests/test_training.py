"""Training: overfitting, bit-for-bit resume, self-contained model.pt, clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training_fixtures import preprocessed_root, tiny_config, trained_model_dir  # noqa: F401
from utils.apps.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def test_two_identities_overfit_training_views(preprocessed_root, tmp_path):
    cfg = tiny_config(preprocessed_root, tmp_path, steps=40, eval_every=40, batch_views=4,
                      **{"optim.lr_network": 5e-3, "optim.lr_template": 1e-2})
    tr = Trainer(cfg)
    before = tr.evaluate()["psnr_train_views"]
    after = tr.run()["psnr_train_views"]
    # Stated bar: 40 steps lift the two identities' training views by >= 3 dB and past 17 dB (measured ~18-19 dB).
    assert after >= before + 3.0, (before, after)
    assert after >= 17.0, after


def test_eye_weight_adds_an_eye_region_term(preprocessed_root, tmp_path):
    tr = Trainer(tiny_config(preprocessed_root, tmp_path, **{"loss.eye_weight": 1.0}))
    assert tr.eye_masks.shape[:2] == tr.data.images.shape[:2] and tr.eye_masks.dtype == torch.uint8
    frac = float(tr.eye_masks.float().mean() / (tr.data.masks.float() / 255).mean())
    assert 0.005 < frac < 0.2  # the eye regions are a small part of the face
    terms = tr.train_step()
    assert float(terms["l1_eyes"]) > 0
    # a dataset without FLAME's landmarks (built in memory) cannot weight the eyes: a clear error
    from utils.data.dataset import MultiViewDataset

    d = tr.data
    views = [[(d.images[i, s].float().numpy() / 255, d.masks[i, s].float().numpy() / 255, d.cameras[i][s])
              for s in range(len(d.serials))] for i in range(len(d))]
    bare = MultiViewDataset.from_views(d.cfg, d.identities, d.serials, views, d.base_vertices, d.template,
                                       d.mask_ids, d.base_faces)
    with pytest.raises(ValueError, match="loss.eye_weight needs FLAME's eye landmarks"):
        Trainer(tiny_config(preprocessed_root, tmp_path / "bare", **{"loss.eye_weight": 1.0}), data=bare)


def test_eye_weight_schedule():
    """loss.eye_weight_final: the eye term's weight falls linearly from eye_weight at the first step to
    eye_weight_final x eye_weight at the last, and loss_terms uses the weight it is given (0: no eye term)."""
    from utils.apps.train.config import LossConfig, validate_config
    from utils.apps.train.trainer import TrainConfig, eye_weight_at, loss_terms

    const, fade = LossConfig(eye_weight=0.1), LossConfig(eye_weight=0.1, eye_weight_final=0.0)
    assert [eye_weight_at(const, s, 101) for s in (0, 50, 100)] == pytest.approx([0.1, 0.1, 0.1])
    assert [eye_weight_at(fade, s, 101) for s in (0, 50, 100)] == pytest.approx([0.1, 0.05, 0.0])
    assert eye_weight_at(LossConfig(eye_weight=0.1, eye_weight_final=3.0), 100, 101) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="eye_weight_final"):
        validate_config(TrainConfig(loss=LossConfig(eye_weight_final=-0.5)))
    gt = torch.zeros(1, 1, 16, 16, 3)
    pred = torch.full((1, 1, 16, 16, 3), 0.2)
    eyes = torch.zeros(1, 1, 16, 16, 1)
    eyes[..., 4:6, 4:10, :] = 1
    aux = {"offset": torch.zeros(1, 4, 3), "log_scale_delta": torch.zeros(1, 4, 3)}
    base = float(loss_terms(fade, pred, gt, aux, eyes, eye_weight=0.0)["loss"])
    full = loss_terms(fade, pred, gt, aux, eyes)  # default: lc.eye_weight
    half = loss_terms(fade, pred, gt, aux, eyes, eye_weight=0.05)
    assert float(full["l1_eyes"]) == pytest.approx(0.2)
    assert float(full["loss"]) - base == pytest.approx(0.1 * 0.2, rel=1e-4)
    assert float(half["loss"]) - base == pytest.approx(0.05 * 0.2, rel=1e-4)


def test_eye_loss_mse():
    """loss.eye_loss mse: the eye term is the mean squared error inside the eye regions (what PSNR scores), not the
    mean |error|; an unknown choice is refused before anything runs."""
    from utils.apps.train.config import LossConfig, validate_config
    from utils.apps.train.trainer import TrainConfig, loss_terms

    gt = torch.zeros(1, 1, 16, 16, 3)
    pred = torch.full((1, 1, 16, 16, 3), 0.2)
    pred[..., 4:6, 4:10, :] = 0.5  # the eye pixels' error differs from the rest's
    eyes = torch.zeros(1, 1, 16, 16, 1)
    eyes[..., 4:6, 4:10, :] = 1
    aux = {"offset": torch.zeros(1, 4, 3), "log_scale_delta": torch.zeros(1, 4, 3)}
    l1_term = loss_terms(LossConfig(eye_weight=0.1), pred, gt, aux, eyes)
    mse_term = loss_terms(LossConfig(eye_weight=0.1, eye_loss="mse"), pred, gt, aux, eyes)
    assert float(l1_term["l1_eyes"]) == pytest.approx(0.5)
    assert float(mse_term["l1_eyes"]) == pytest.approx(0.25)
    assert float(mse_term["loss"]) - float(l1_term["loss"]) == pytest.approx(0.1 * (0.25 - 0.5), rel=1e-4)
    with pytest.raises(ValueError, match="eye_loss"):
        validate_config(TrainConfig(loss=LossConfig(eye_loss="l2")))


def test_supersample_integrates_pixel_areas(preprocessed_root, tmp_path):
    """loss.supersample k: training renders at k x the size and averages k x k blocks (each pixel's area, as a
    camera's sensor integrates it), so an edge through a pixel's middle gives it the mean of both sides; the
    result has the photos' size and stays close to the point-sampled render."""
    from utils.apps.train.config import validate_config
    from utils.apps.train.trainer import pool_pixels

    step = torch.zeros(1, 4, 8, 1)
    step[..., 3:, :] = 1.0  # an edge at x = 3 px of the fine image: through the middle of pooled pixel 1
    assert pool_pixels(step, 2)[0, 0, :, 0].tolist() == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="blocks"):
        pool_pixels(torch.zeros(1, 5, 8, 3), 2)
    with pytest.raises(ValueError, match="supersample"):
        validate_config(tiny_config(preprocessed_root, tmp_path / "bad", **{"loss.supersample": 0}))
    ss = Trainer(tiny_config(preprocessed_root, tmp_path / "ss", **{"loss.supersample": 2}))
    point = Trainer(tiny_config(preprocessed_root, tmp_path / "point"))
    ids, views = torch.tensor([0]), torch.tensor([[0, 1]])
    with torch.no_grad():
        cloud = ss.field(ss.field.codes.weight[:1], ss.vertices(ids))
        pred_ss, gt = ss.render_views(cloud, ids, views)
        pred_pt, _ = point.render_views(cloud, ids, views)
    assert pred_ss.shape == gt.shape == pred_pt.shape
    diff = (pred_ss - pred_pt).abs()
    assert 0 < float(diff.mean()) < 0.02, float(diff.mean())  # another sampling of one image, not another image
    terms = ss.train_step()
    assert torch.isfinite(terms["loss"])


def test_eye_term_closes_the_eye_gap(preprocessed_root, tmp_path):
    """loss.eye_weight (off in the presets): early in training the eyes of the FLAME-like synthetic heads lag the
    face; with the eye-region term (weight 1 here) the held-out cameras' eye regions catch up.  Measured (40 steps,
    seeds 0 / 1): eyes +2.3 / +4.3 dB, gap -1.9 / -0.1 dB with the term, 0.9 / 3.4 dB without.  At full resolution
    on an H200 weight 0.1 did the same at 1,500 steps without loss of face PSNR, but the held-out one-view fits lost
    0.9 dB of face PSNR (benchmarks/results/eyes_h200_sweep2.md, _sweep3.md), so the presets leave it off."""
    kw = dict(steps=40, eval_every=40, batch_views=4, **{"optim.lr_network": 5e-3, "optim.lr_template": 1e-2})
    off = Trainer(tiny_config(preprocessed_root, tmp_path / "off", **kw, **{"loss.eye_weight": 0.0})).run()
    on = Trainer(tiny_config(preprocessed_root, tmp_path / "on", **kw, **{"loss.eye_weight": 1.0})).run()
    assert on["psnr_eyes_heldout_views"] >= off["psnr_eyes_heldout_views"] + 1.5, (off, on)
    assert on["psnr_heldout_views"] - on["psnr_eyes_heldout_views"] <= 1.0, on


def test_alpha_weight_and_rim_band(preprocessed_root, tmp_path):
    """loss.alpha_weight asks for an opaque surface inside the face mask; loss.rim_band leaves the ring just
    outside the mask unsupervised (no gradient reaches the prediction there)."""
    from utils.apps.train.trainer import loss_terms

    tr = Trainer(tiny_config(preprocessed_root, tmp_path, **{"loss.alpha_weight": 0.5, "loss.rim_band": 1}))
    terms = tr.train_step()
    assert 0 < float(terms["alpha"]) < 1
    # loss_terms on a hand-made batch: one 16x16 view, the mask a 4x4 square
    lc = tr.cfg.loss
    mask = torch.zeros(1, 1, 16, 16, 1)
    mask[..., 6:10, 6:10, :] = 1
    gt = mask.expand(1, 1, 16, 16, 3) * 0.5
    pred = torch.full((1, 1, 16, 16, 3), 0.3, requires_grad=True)
    alpha = torch.full((1, 1, 16, 16, 1), 0.6, requires_grad=True)
    aux = {"offset": torch.zeros(1, 4, 3), "log_scale_delta": torch.zeros(1, 4, 3), }
    out = loss_terms(lc, pred, gt, aux, alpha=alpha, mask=mask)
    out["loss"].backward()
    band = torch.zeros(16, 16, dtype=torch.bool)
    band[5:11, 5:11] = True
    band[6:10, 6:10] = False
    assert float(pred.grad[0, 0][band].abs().sum()) == 0  # the ring: no colour gradient
    assert float(alpha.grad[0, 0][band].abs().sum()) == 0  # ... and no alpha gradient
    assert float(pred.grad[0, 0, 0, 0].abs().sum()) > 0  # beyond it: black is still asked for
    assert float(alpha.grad[0, 0, 7, 7, 0]) < 0  # inside the mask: alpha is pushed up
    with pytest.raises(ValueError, match="need the views' face masks"):
        loss_terms(lc, pred, gt, aux, alpha=alpha)


def _losses(cfg, steps):
    tr = Trainer(cfg, resume=True)
    return [float(tr.train_step()["loss"]) for _ in range(steps - tr.step)], tr


def test_resume_is_bit_for_bit(preprocessed_root, tmp_path):
    full = tiny_config(preprocessed_root, tmp_path / "full", steps=6)
    ref, _ = _losses(full, 6)
    part = tiny_config(preprocessed_root, tmp_path / "part", steps=6)
    tr = Trainer(part)
    first = [float(tr.train_step()["loss"]) for _ in range(3)]
    tr.save_checkpoint()
    del tr
    rest, tr2 = _losses(part, 6)
    assert tr2.step == 6 and len(rest) == 3
    assert first + rest == ref  # exact equality: same losses, step for step


def test_outputs_and_metrics(trained_model_dir):
    m = json.loads((trained_model_dir / "metrics.json").read_text())
    for key in ("psnr_heldout_views", "ssim_heldout_views", "psnr_train_views", "steps", "seconds", "device",
                "psnr_face_heldout_views", "psnr_eyes_heldout_views", "ssim_eyes_heldout_views",
                "psnr_eyes_train_views"):
        assert key in m
    # inside the face mask alone the error is higher than over the whole crop (black background matches black)
    assert m["psnr_face_heldout_views"] < m["psnr_heldout_views"] and m["psnr_eyes_heldout_views"] > 5
    assert m["steps"] == 20 and m["psnr_heldout_views"] > 5
    ckpts = sorted((trained_model_dir / "checkpoints").glob("ckpt_*.pt"))
    assert ckpts and not list(trained_model_dir.rglob("*.tmp"))
    assert list((trained_model_dir / "tb").iterdir())


def test_model_pt_loads_in_fresh_process_and_renders(trained_model_dir, tmp_path):
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from utils.data.model_file import load_model
from models.renderer import render
from models.camera import Camera
m = load_model({str(trained_model_dir / 'model.pt')!r})
verts = m.vertices(m.base_vertices[:1])
cloud = m.field(m.field.codes.weight[:1], verts)[0]
c = verts[0].mean(0).tolist()
cam = Camera.look_at((c[0], c[1], c[2] + 0.6), c, (0, 1, 0), 48, 64)
img = render(cloud, cam)["image"]
assert img.shape == (64, 48, 3) and float(img.sum()) > 0
print("ok", len(m.identities))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.startswith("ok 2"), res.stderr[-2000:]


def test_clear_errors(preprocessed_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="data root not found"):
        Trainer(tiny_config(tmp_path / "nowhere", tmp_path / "o"))
    with pytest.raises(ValueError, match="batch_identities=3 must be divisible|batch_views=99"):
        Trainer(tiny_config(preprocessed_root, tmp_path / "o2", batch_views=99))
    with pytest.raises(ValueError, match=r"--batch_identities=100 exceeds the \d+ training identities"):
        Trainer(tiny_config(preprocessed_root, tmp_path / "o3", batch_identities=100))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden: 3\n")
    res = subprocess.run([sys.executable, "train.py", "--config", str(bad), "--data_root", str(preprocessed_root)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "unknown config key 'model.hiden'" in res.stderr
    with pytest.raises(ValueError, match="--precision must be one of fp32, tf32, bf16"):
        Trainer(tiny_config(preprocessed_root, tmp_path / "o3", precision="fp16"))
    # LPIPS is optional and not installed in CI: asking for it must fail early and say how to get it.
    with pytest.raises(ValueError, match="pip install lpips"):
        Trainer(tiny_config(preprocessed_root, tmp_path / "o4", **{"loss.lpips_weight": 0.1}))
    empty = tmp_path / "empty_flame"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="flame2023.pkl"):
        Trainer(tiny_config(preprocessed_root, tmp_path / "o3", **{"data.flame_dir": str(empty)}))


def test_evaluation_reuses_eye_regions_and_repeats_exactly(preprocessed_root, tmp_path, monkeypatch):
    import utils.apps.train.trainer as trainer_mod

    tr = Trainer(tiny_config(preprocessed_root, tmp_path, steps=2))
    calls = []
    real = trainer_mod.eye_region_masks
    monkeypatch.setattr(trainer_mod, "eye_region_masks", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = tr.evaluate()
    n_first = len(calls)
    second = tr.evaluate()
    # eye regions depend only on the data: computed by the first evaluation (if the data has eye landmarks), not again
    assert len(calls) == n_first
    assert n_first == (0 if tr.eye_landmarks is None else
                       sum(1 for g in (tr.data.eval_serials, tr.data.train_serials) if g) * first["eval_identities"])
    assert {k: v for k, v in first.items() if k != "_grid"} == {k: v for k, v in second.items() if k != "_grid"}



def test_runs_in_one_process_are_bit_identical(preprocessed_root, tmp_path):
    """Same seed, same weights, whatever the process did before (pytest runs many trainings and tools in one
    process): a run after a load_model of the first run's model.pt (which sets the renderer's process-wide 2D filter
    and opacity compensation to the model's, models.mip_filter.set_render_filter) ends with bit-identical field
    weights, and the caller's renderer settings are left as they were.  Before the Trainer set its compensation
    explicitly the second run differed by 0.02 max abs in template_features."""
    from models import renderer
    from utils.data.model_file import load_model

    def weights(out: str) -> dict[str, torch.Tensor]:
        tr = Trainer(tiny_config(preprocessed_root, tmp_path / out, steps=4))
        tr.run()
        return {k: v.clone() for k, v in tr.field.state_dict().items()}

    first = weights("a")
    load_model(tmp_path / "a" / "model.pt")  # as any tool or fit test would, in the same process
    loaded = (renderer.FILTER_2D, renderer.FILTER_2D_COMPENSATION)
    assert loaded[1] != "opacity"  # else this test would not exercise a changed setting
    second = weights("b")
    diff = {k: float((first[k].double() - second[k].double()).abs().max())
            for k in first if not torch.equal(first[k], second[k])}
    assert not diff, f"the second run differs from the first (max abs per tensor): {diff}"
    assert (renderer.FILTER_2D, renderer.FILTER_2D_COMPENSATION) == loaded
