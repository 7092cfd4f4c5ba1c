"""The feed-forward encoder (models/encoder.py), its training (utils/apps/train/encoder.py), its place in model.pt
(utils/data/model_file.py) and the fit's start from it (utils/apps/track/fit.py fit.init), on the tiny synthetic dataset
with the small fit model of tests/training_fixtures.py."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.test_fitting import track_cfg
from tests.training_fixtures import fit_model, preprocessed_root, single_thread  # noqa: F401

# the loss in w alone (render_weight 0) keeps the shared fixture fast; the photometric term has its own tests below
ENC_OVERRIDES = {"steps": 300, "batch": 16, "samples": 48, "views_per_sample": 4, "lr": 3e-3, "render_weight": 0.0,
                 "arch.size": 32, "arch.channels": [16, 24, 32, 32], "arch.blocks": 1}


def model_and_data(path, preprocessed_root):
    """The model at ``path`` and its training identities' dataset from ``preprocessed_root`` (single-threaded)."""
    from utils.core.config import from_dict
    from utils.data.dataset import DataConfig, MultiViewDataset
    from utils.data.model_file import load_model

    model = load_model(path)
    dcfg = from_dict(DataConfig, dict(model.config["data"]))
    dcfg.root = str(preprocessed_root)
    with single_thread():
        return model, MultiViewDataset(dcfg, "cpu", identities=model.identities, progress=False)


def tiny_encoder_config(**over):
    from utils.apps.train.encoder import EncoderTrainConfig
    from utils.core.config import build_config

    return build_config(EncoderTrainConfig, overrides={**ENC_OVERRIDES, **over})


@pytest.fixture(scope="module")
def encoder_model(fit_model, preprocessed_root, tmp_path_factory):  # noqa: F811
    """A copy of the fit model with a tiny encoder trained on its data: (model.pt path, stats)."""
    from utils.apps.train.encoder import train_encoder
    from utils.data.model_file import add_encoder

    path = tmp_path_factory.mktemp("encoder") / "model.pt"
    shutil.copy(fit_model, path)
    model, data = model_and_data(path, preprocessed_root)
    with single_thread():
        enc, stats = train_encoder(model, data, tiny_encoder_config(), progress=False)
    add_encoder(path, enc)
    return path, stats


def test_encoder_input_crops_the_mask_box():
    from models.encoder import encoder_input, mask_boxes

    img = torch.zeros(2, 40, 30, 3)
    mask = torch.zeros(2, 40, 30, 1)
    mask[0, 10:20, 5:15] = 1  # a 10x10 box
    img[0, 10:20, 5:15] = torch.tensor([1.0, 0.5, 0.25])
    assert mask_boxes(mask)[0].tolist() == [5.0, 10.0, 15.0, 20.0]
    assert mask_boxes(mask)[1].tolist() == [0.0, 0.0, 30.0, 40.0]  # empty mask: the whole image
    x = encoder_input(img, mask, 16, margin=0.0)
    assert x.shape == (2, 4, 16, 16)
    # margin 0: the square window is the box itself, the mask channel is 1 inside (away from the edges)
    assert torch.allclose(x[0, 3, 2:-2, 2:-2], torch.ones(12, 12)) and torch.allclose(x[0, 0, 8, 8], torch.tensor(1.0))
    # margin 0.5: the box fills the middle half of the window (bilinear edges)
    y = encoder_input(img, mask, 16, margin=0.5)
    assert float(y[0, 3, 0, 0]) == 0 and float(y[0, 3, 8, 8]) == 1
    assert 0.2 < float(y[0, 3].mean()) < 0.3
    # a window moved right by a quarter of its side (5 px of the image, 4 px of the crop): the box moves left
    z = encoder_input(img, mask, 16, margin=0.5, shift=torch.tensor([[0.25, 0.0], [0.0, 0.0]]))
    assert float(y[0, 3, 8, 1]) == 0 and float(z[0, 3, 8, 2]) == 1
    assert float(y[0, 3, 8, 9]) == 1 and float(z[0, 3, 8, 11]) == 0


def test_encoder_shapes_and_mean_start():
    from models.encoder import EncoderConfig, StyleEncoder, encoder_from_state, encoder_state

    enc = StyleEncoder(EncoderConfig(size=32, channels=[8, 8, 16, 16], blocks=1, style_dim=12))
    enc.w_mean.copy_(torch.arange(12.0))
    x = torch.rand(3, 4, 32, 32)
    w = enc(x)
    assert w.shape == (3, 12) and torch.allclose(w, torch.arange(12.0).expand(3, 12))  # zero head: the mean style
    with pytest.raises(ValueError, match="expects"):
        enc(torch.rand(3, 3, 32, 32))
    again = encoder_from_state(encoder_state(enc))
    assert torch.equal(again(x), w)
    bad = encoder_state(enc)
    bad["state_dict"]["head.weight"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="do not fit"):
        encoder_from_state(bad)


def test_encoder_trains_round_trips_and_beats_the_mean_code(encoder_model, fit_model, preprocessed_root):  # noqa: F811
    from utils.data.model_file import load_model

    path, stats = encoder_model
    assert stats["encoder_losses"][-1] < 0.8 * stats["encoder_losses"][0], stats["encoder_losses"]
    model = load_model(path)
    assert model.encoder is not None and model.encoder_notice == ""
    assert model.fingerprint == load_model(fit_model).fingerprint  # the field is untouched
    psnr, target, w_enc = encoder_alone_psnr(model, preprocessed_root, path)
    # round trip: the stored encoder predicts what it predicted before saving (same crops, same weights)
    w2 = load_model(path).encoder.predict(target.fit_view.image, target.fit_view.mask)
    assert torch.allclose(w2, w_enc, atol=1e-5)
    assert psnr["encoder"] > psnr["mean_code"] + 0.3, psnr


def encoder_alone_psnr(model, preprocessed_root, path):
    """PSNR on the unseen views of the held-out identity 017 of the encoder's prediction alone and of the mean code,
    fitted from one photo (no iterations): ({"encoder": dB, "mean_code": dB}, the target, the encoder's style)."""
    from utils.apps.track.fit import start_candidates
    from utils.apps.track.targets import load_subject_target
    from utils.evaluation import evaluate_views

    cfg = track_cfg(preprocessed_root, path, path.parent / "track")
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        cands = start_candidates(model, "w", target)
        psnr = {}
        for name in ("mean_code", "encoder"):
            m, _ = evaluate_views(model, cands[name][0], target.base_vertices, target.eval_views,
                                  target.fit_view.serial, lpips=False)
            psnr[name] = m["psnr_unseen"]
    return psnr, target, cands["encoder"][0]


def test_fit_init_encoder_mean_best(encoder_model, preprocessed_root, tmp_path):  # noqa: F811
    from utils.apps.track.fit import fit_identity
    from utils.apps.track.targets import load_subject_target
    from utils.data.model_file import load_model

    path, _ = encoder_model
    model = load_model(path)
    cfg = track_cfg(preprocessed_root, path, tmp_path, **{"fit.iterations": 0, "fit.refine_colour": False})
    with single_thread():
        target = load_subject_target(model, cfg, torch.device("cpu"))
        starts = {}
        for init in ("auto", "encoder", "mean", "best"):
            cfg.fit.init = init
            res = fit_identity(model, target, cfg.fit, progress=False)
            starts[init] = (res.start, sorted(res.start_losses))
    assert starts["auto"][0] == "encoder" and starts["encoder"] == ("encoder", ["encoder"])
    assert starts["mean"] == ("mean_code", ["mean_code"])
    assert starts["best"][1] == ["encoder", "mean_code", "mean_w", "w_avg"]


def test_corrupt_or_missing_encoder_falls_back(encoder_model, fit_model, preprocessed_root, tmp_path,  # noqa: F811
                                               capsys):
    from utils.apps.track.fit import fit_identity
    from utils.apps.track.targets import load_subject_target
    from utils.core.torch_files import atomic_torch_save, safe_torch_load
    from utils.data.model_file import load_model

    path, _ = encoder_model
    bad = tmp_path / "model.pt"
    doc = safe_torch_load(path, "model file")
    doc["encoder"]["state_dict"]["head.bias"] = doc["encoder"]["state_dict"]["head.bias"] + 1.0  # fingerprint fails
    atomic_torch_save(doc, bad)
    capsys.readouterr()
    model = load_model(bad)
    err = capsys.readouterr().err
    assert model.encoder is None and "encoder is not usable" in model.encoder_notice
    assert err.count("\n") == 1 and str(bad) in err  # one line naming the file
    old = load_model(fit_model)  # a model.pt without an encoder (written before it existed) loads as before
    assert old.encoder is None and old.encoder_notice == ""
    cfg = track_cfg(preprocessed_root, bad, tmp_path, **{"fit.iterations": 0, "fit.refine_colour": False,
                                                         "fit.init": "encoder"})
    with single_thread():
        for m in (model, old):
            target = load_subject_target(m, cfg, torch.device("cpu"))
            capsys.readouterr()
            res = fit_identity(m, target, cfg.fit, progress=False)
            err = capsys.readouterr().err
            assert res.start == "mean_code" and err.count("\n") == 1 and "starting from the mean code" in err
        cfg.fit.init = "auto"  # without an encoder: the best of the old candidates, as before
        res = fit_identity(old, target, cfg.fit, progress=False)
        assert sorted(res.start_losses) == ["mean_code", "mean_w", "w_avg"]


def test_train_py_encoder_only(fit_model, preprocessed_root, tmp_path):  # noqa: F811
    import train
    from utils.data.model_file import load_model

    path = tmp_path / "model.pt"
    shutil.copy(fit_model, path)
    with single_thread():
        train.main(["--encoder_only", "--checkpoint", str(path), "--data_root", str(preprocessed_root),
                    "--progress", "false", "--encoder.steps", "3", "--encoder.samples", "2", "--encoder.batch", "4",
                    "--encoder.arch.size", "32", "--encoder.arch.channels", "[8,8,8,8]"])
    model = load_model(path)
    assert model.encoder is not None and model.encoder.cfg.size == 32
    with pytest.raises(SystemExit):
        train.main(["--encoder_only", "--checkpoint", str(tmp_path / "missing.pt")])


def test_encoder_of_the_code_z(fit_model, preprocessed_root, tmp_path):  # noqa: F811
    """encoder.arch.space z: the encoder predicts the code, the fit's start is its style through the mapping network
    (and the code itself in fit.space z)."""
    from utils.apps.track.fit import start_candidates
    from utils.apps.track.targets import load_subject_target
    from utils.apps.train.encoder import train_encoder
    from utils.data.model_file import add_encoder, load_model

    path = tmp_path / "model.pt"
    shutil.copy(fit_model, path)
    model, data = model_and_data(path, preprocessed_root)
    with single_thread():
        enc, _ = train_encoder(model, data, tiny_encoder_config(steps=3, samples=2, **{"arch.space": "z"}),
                               progress=False)
        add_encoder(path, enc)
        model = load_model(path)
        assert model.encoder.cfg.space == "z" and model.encoder.cfg.style_dim == model.field.cfg.code_dim
        target = load_subject_target(model, track_cfg(preprocessed_root, path, tmp_path), torch.device("cpu"))
        for space in ("w", "z"):
            w, z = start_candidates(model, space, target)["encoder"]
            assert z.shape == (model.field.cfg.code_dim,)
            assert torch.allclose(w, model.field.style(z[None], update_w_avg=False)[0])


def test_gaussian_samples_reach_past_the_training_styles(fit_model, preprocessed_root):  # noqa: F811
    """encoder.gauss_fraction: sampled identities drawn from the Gaussian of the training styles, their deviation
    from its mean proportional to encoder.gauss_scale (same seed, no noise), rendered face-masked; no code (NaN)."""
    from utils.apps.train.encoder import render_bank
    from utils.core.config import from_dict
    from utils.data.dataset import DataConfig, MultiViewDataset
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    dcfg = from_dict(DataConfig, dict(model.config["data"]))
    dcfg.root = str(preprocessed_root)
    f = model.field
    with single_thread(), torch.no_grad():
        data = MultiViewDataset(dcfg, "cpu", identities=model.identities, progress=False)
        mean = f.style(f.codes.weight, update_w_avg=False).mean(0)
        banks = {}
        for scale in (0.5, 3.0):
            cfg = tiny_encoder_config(samples=3, views_per_sample=1, gauss_fraction=1.0, gauss_scale=scale, noise=0.0)
            torch.manual_seed(0)
            banks[scale] = render_bank(f, data, model.plan, cfg, torch.Generator().manual_seed(1), "auto")
    imgs, masks, w_small, z, ids, cams = banks[0.5]
    w_big = banks[3.0][2]
    assert imgs.shape[0] == 3 and bool(torch.isnan(z).all())
    assert torch.allclose(w_big - mean, 6 * (w_small - mean), atol=1e-4)
    assert float(imgs[masks.expand_as(imgs) > 0].float().mean()) > 5  # rendered inside the face mask
    assert int(imgs[masks.expand_as(imgs) == 0].max()) == 0  # black outside it


def test_output_metric_predicts_the_gaussians_change(fit_model):  # noqa: F811
    """loss gaussians: d^T M d is (up to one scale) the mean squared change of the Gaussians' colour and opacity when
    the style moves by d spreads; M symmetric, positive semi-definite, trace S."""
    from utils.apps.train.encoder import output_metric
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    f = model.field
    sl = f._channel_slices()
    with single_thread(), torch.no_grad():
        W = f.style(f.codes.weight, update_w_avg=False)
        std = W.std(0)
        M = output_metric(f, W, std, tiny_encoder_config(metric_identities=len(W)), torch.Generator().manual_seed(0))
        S = W.shape[1]
        assert M.shape == (S, S) and torch.allclose(M, M.T, atol=1e-4 * S)
        assert abs(float(torch.diagonal(M).sum()) - S) < 1e-3 * S
        assert float(torch.linalg.eigvalsh(M.double()).min()) > -1e-4 * S

        def outputs(w):
            raw = f.synthesize_raw(w)
            return torch.cat([raw[..., sl["sh"]], torch.sigmoid(raw[..., sl["opacity"]] + f.opacity_logit_init)], -1)

        gen = torch.Generator().manual_seed(2)
        evecs = torch.linalg.eigh(M.double())[1].float()
        # the most and the least visible direction of the metric, and two random ones
        dirs = [evecs[:, -1], evecs[:, 0], torch.randn(S, generator=gen), torch.randn(S, generator=gen)]
        pred, real = [], []
        for d in dirs:
            d = 0.05 * d / d.norm()
            pred.append(float(d @ M @ d))
            real.append(sum(float((outputs(w[None] + d * std) - outputs(w[None])).square().mean()) for w in W))
    ratio = torch.tensor(real) / torch.tensor(pred).clamp_min(1e-12)
    assert real[0] > 20 * real[1]  # the metric's top direction changes the Gaussians far more than its last one
    assert float(ratio[[0, 2, 3]].max() / ratio[[0, 2, 3]].min()) < 1.3, (real, pred)


def test_render_loss_prefers_the_true_style(fit_model, preprocessed_root):  # noqa: F811
    """encoder.render_weight: the photometric term renders a style on the sample's own geometry and camera, so a
    training photo scores better with its identity's trained style than with the mean style (whole image and face
    mask), and the term has a gradient w.r.t. the style."""
    from models.flame import subdivide_vertices
    from utils.apps.train.encoder import render_loss
    from utils.core.config import from_dict
    from utils.data.dataset import DataConfig, MultiViewDataset
    from utils.data.model_file import load_model

    model = load_model(fit_model)
    dcfg = from_dict(DataConfig, dict(model.config["data"]))
    dcfg.root = str(preprocessed_root)
    f = model.field
    with single_thread():
        data = MultiViewDataset(dcfg, "cpu", identities=model.identities, progress=False)
        verts = torch.cat([subdivide_vertices(data.base_vertices[i][None], model.plan)
                           for i in range(len(data.identities))])
        cams = torch.as_tensor(data.serial_index(data.train_serials))[:2]
        ids = torch.tensor([0, 1])
        imgs = torch.stack([data.images[int(i), int(c)] for i, c in zip(ids, cams)])
        msks = torch.stack([data.masks[int(i), int(c)] for i, c in zip(ids, cams)])
        with torch.no_grad():
            w_true = f.style(f.codes.weight[ids], update_w_avg=False)
            w_mean = f.style(f.mean_code()[None], update_w_avg=False).expand(2, -1)
        for region in ("image", "face"):
            cfg = tiny_encoder_config(render_region=region)
            with torch.no_grad():
                true = float(render_loss(f, verts, data.cameras, w_true, imgs, msks, ids, cams, cfg))
                mean = float(render_loss(f, verts, data.cameras, w_mean, imgs, msks, ids, cams, cfg))
            assert true < 0.9 * mean, (region, true, mean)
        w = w_mean.clone().requires_grad_(True)
        render_loss(f, verts, data.cameras, w, imgs, msks, ids, cams, tiny_encoder_config()).backward()
        assert float(w.grad.abs().sum()) > 0


def test_photometric_training_round_trips(fit_model, preprocessed_root, tmp_path):  # noqa: F811
    """encoder.render_weight > 0 (with and without the loss in w) trains, logs the photometric term, lowers it, and
    the encoder round-trips through model.pt; bad settings are refused."""
    from utils.apps.train.encoder import train_encoder
    from utils.data.model_file import add_encoder, load_model

    path = tmp_path / "model.pt"
    shutil.copy(fit_model, path)
    model, data = model_and_data(path, preprocessed_root)
    with single_thread():
        with pytest.raises(ValueError, match="render_weight"):
            train_encoder(model, data, tiny_encoder_config(render_weight=0.0, style_weight=0.0), progress=False)
        cfg = tiny_encoder_config(steps=200, samples=8, views_per_sample=2, render_weight=1.0, style_weight=0.0,
                                  render_batch=2)
        enc, stats = train_encoder(model, data, cfg, progress=False)
        assert len(stats["encoder_render_losses"]) == 2
        assert stats["encoder_render_losses"][-1] < stats["encoder_render_losses"][0], stats
        add_encoder(path, enc)
        again = load_model(path).encoder
        x = torch.rand(2, 4, 32, 32)
        assert torch.allclose(again(x), enc(x), atol=1e-5)


# --------------------------------------------------------------------------- the encoder trained with the field
# (encoder.joint): the fit model's run continued from its last checkpoint (step 120, no encoder state, as any older
# checkpoint) to step 150, the encoder from step 120 (joint_start 0.8) on
JOINT_OVERRIDES = {**ENC_OVERRIDES, "joint": True, "joint_start": 0.8, "joint_refresh": 1.0}
JOINT_STEPS = 150


def continued_run(fit_model, preprocessed_root, out, **over):
    """A TrainConfig continuing the fit model's run in ``out`` (its last checkpoint copied there) to JOINT_STEPS."""
    from tests.training_fixtures import FIT_MODEL_OVERRIDES, tiny_config

    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(fit_model.parent / "checkpoints" / "ckpt_00000120.pt", out / "checkpoints")
    return tiny_config(preprocessed_root, out, steps=JOINT_STEPS, **{**FIT_MODEL_OVERRIDES, **over})


@pytest.fixture(scope="module")
def joint_run(fit_model, preprocessed_root, tmp_path_factory):  # noqa: F811
    """The fit model's run continued with a tiny encoder trained jointly, checkpoints every 10 steps: (run folder,
    metrics, encoder config)."""
    from utils.apps.train.trainer import Trainer

    out = tmp_path_factory.mktemp("joint") / "run"
    cfg = continued_run(fit_model, preprocessed_root, out, ckpt_every=10)
    ecfg = tiny_encoder_config(**JOINT_OVERRIDES)
    with single_thread():
        metrics = Trainer(cfg, resume=True, encoder=ecfg).run()
    return out, metrics, ecfg


def test_joint_encoder_trains_and_beats_the_mean_code(joint_run, preprocessed_root):  # noqa: F811
    """encoder.joint: the encoder starts at the field's step 120 (a checkpoint without encoder state resumes with
    it), takes its steps by the end, lowers its loss, lands in model.pt and beats the mean code on the held-out
    identity."""
    from utils.data.model_file import load_model

    out, metrics, ecfg = joint_run
    assert metrics["encoder_joint_start"] == 120 and len(metrics["encoder_losses"]) == ecfg.steps // 100
    assert metrics["encoder_losses"][-1] < 0.8 * metrics["encoder_losses"][0], metrics["encoder_losses"]
    model = load_model(out / "model.pt")
    assert model.encoder is not None and model.encoder_notice == ""
    psnr, _, _ = encoder_alone_psnr(model, preprocessed_root, out / "model.pt")
    assert psnr["encoder"] > psnr["mean_code"] + 0.3, psnr


def test_joint_encoder_leaves_the_field_alone(fit_model, preprocessed_root, tmp_path):  # noqa: F811
    """The field takes exactly the steps it takes without the encoder (stop-gradient targets, the field frozen to
    the encoder's photometric term, the encoder's own random state): same weights, optimiser, random states; the
    default run's checkpoints hold no encoder state."""
    from utils.apps.train.checkpoints import read_checkpoint
    from utils.apps.train.trainer import Trainer

    ecfg = tiny_encoder_config(**{**JOINT_OVERRIDES, "steps": 12, "samples": 4, "render_weight": 30.0,
                                  "render_every": 1, "joint_refresh": 2.0})
    states = {}
    with single_thread():
        for name in ("default", "joint"):
            cfg = continued_run(fit_model, preprocessed_root, tmp_path / name)
            tr = Trainer(cfg, resume=True, encoder=ecfg if name == "joint" else None)
            for _ in range(6):  # field steps 121..126, the encoder's 2 each (refreshing the bank)
                tr.train_step()
                if tr.joint is not None:
                    tr.joint.after_field_step(tr.step)
            states[name] = (tr.field.state_dict(), tr.opt.state_dict()["state"], tr.sampler.get_state(),
                            torch.get_rng_state())
            if name == "joint":
                assert tr.joint.run.done == 2 and tr.joint.run.refreshed > 0
                assert tr.save_checkpoint() is not None and "encoder" in read_checkpoint(tr.latest_checkpoint())
            else:
                assert "encoder" not in read_checkpoint(tr.save_checkpoint())
            tr.close()
    (fd, od, sd, rd), (fj, oj, sj, rj) = states["default"], states["joint"]
    assert all(torch.equal(fd[k], fj[k]) for k in fd)
    assert all(torch.equal(od[i]["exp_avg"], oj[i]["exp_avg"]) for i in od)
    assert torch.equal(sd, sj) and torch.equal(rd, rj)


def test_joint_encoder_resumes_from_a_checkpoint(joint_run, fit_model, preprocessed_root, tmp_path):  # noqa: F811
    """A joint run killed after its step-140 checkpoint resumes with the encoder's weights, optimiser, generator
    and counters as saved and ends with all its steps; its checkpoint refuses a resume without the joint encoder."""
    from tests.training_fixtures import FIT_MODEL_OVERRIDES, tiny_config
    from utils.apps.train.checkpoints import read_checkpoint
    from utils.apps.train.trainer import Trainer
    from utils.data.model_file import load_model

    src, _, ecfg = joint_run
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "checkpoints" / "ckpt_00000140.pt", out / "checkpoints")
    saved = read_checkpoint(out / "checkpoints" / "ckpt_00000140.pt")["encoder"]
    assert saved["start"] == 120 and saved["state"]["done"] == 200  # 20 of the encoder's 30 field steps
    cfg = tiny_config(preprocessed_root, out, steps=JOINT_STEPS, **{**FIT_MODEL_OVERRIDES, "ckpt_every": 10})
    with single_thread():
        with pytest.raises(ValueError, match="encoder.joint"):
            Trainer(cfg, resume=True)
        trainer = Trainer(cfg, resume=True, encoder=ecfg)
        run = trainer.joint.run
        assert trainer.step == 140 and run.done == 200
        for k, v in saved["state"]["encoder"]["state_dict"].items():
            assert torch.equal(run.enc.state_dict()[k], v), k
        assert int(run.opt.state_dict()["state"][0]["step"]) == 200
        assert torch.equal(run.gen.get_state(), saved["state"]["generator"])
        metrics = trainer.run()
    assert run.done == ecfg.steps and metrics["encoder_losses"] == saved["state"]["losses"] + metrics[
        "encoder_losses"][2:] and len(metrics["encoder_losses"]) == 3
    assert load_model(out / "model.pt").encoder is not None


def test_train_py_joint_flags(preprocessed_root, tmp_path):  # noqa: F811
    """train.py --encoder --encoder.joint true trains both into model.pt; the flag is documented and refused
    without --encoder or with --encoder_only."""
    import train
    from utils.data.model_file import load_model

    assert "--encoder.joint" in train.build_parser().format_help()
    base = ["--config", "configs/tiny.yaml", "--data_root", str(preprocessed_root), "--progress", "false"]
    enc = ["--encoder.joint", "true", "--encoder.steps", "4", "--encoder.samples", "2", "--encoder.batch", "4",
           "--encoder.arch.size", "32", "--encoder.arch.channels", "[8,8,8,8]"]
    with single_thread():
        for bad in (["--out", str(tmp_path / "a")], ["--encoder_only", "--checkpoint", str(tmp_path / "m.pt")]):
            with pytest.raises(SystemExit):
                train.main(base + bad + enc)
        train.main(base + ["--out", str(tmp_path / "b"), "--encoder"] + enc)
    assert load_model(tmp_path / "b" / "model.pt").encoder.cfg.size == 32
