"""Reliability and security: no code runs on load, output folders are never silently reused, every bad input is named.

One test (or a few) per class of fault, all on the tiny synthetic data (tests/fixtures.py, configs/tiny.yaml).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.fixtures import synthetic_root  # noqa: F401  (pytest fixture)
from tests.training_fixtures import preprocessed_root, tiny_config, trained_model_dir  # noqa: F401
from utils.core import atomic
from utils.core.atomic import atomic_write, atomic_write_json
from utils.core.images import save_image
from utils.core.locks import FolderInUseError, FolderLock, OutputClaim
from utils.core.names import UnsafeNameError
from utils.core.torch_files import UnsafeFileError, atomic_torch_save
from utils.core.video import write_video

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles as a call that creates ``path`` when unpickled: what a malicious file would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class TouchPayload:
    """The same through a method of a class (pickled as getattr + pathlib.Path)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


# ============================================================================ 1. no code runs on load
@pytest.mark.parametrize("protocol", [2, 4])
def test_flame_pickle_payload_is_refused(synthetic_root, tmp_path, protocol):
    from models.flame import UnsafePickleError, load_flame_pickle, load_pickle_no_chumpy

    marker = tmp_path / "ran"
    good = load_pickle_no_chumpy(synthetic_root / "flame" / "flame2023.pkl")
    bad = tmp_path / "flame2023.pkl"
    with open(bad, "wb") as fh:
        pickle.dump({**good, "bs_style": Payload(marker)}, fh, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=r"flame2023\.pkl: refused to unpickle (__builtin__|builtins|io)\.open"):
        load_flame_pickle(bad)
    assert not marker.exists()
    # the dynamic embedding (.npy of a pickled dict) goes through the same allow-list, not np.load's unpickler
    npy = tmp_path / "flame_dynamic_embedding.npy"
    np.save(npy, np.array({"lmk_face_idx": TouchPayload(marker)}, dtype=object), allow_pickle=True)
    from models.flame import load_dynamic_embedding

    with pytest.raises(UnsafePickleError, match=r"embedding\.npy: refused to unpickle .*(getattr|Path\.touch)"):
        load_dynamic_embedding(npy)
    assert not marker.exists()


def test_flame_allow_list_reads_what_flame_files_hold(tmp_path):
    """numpy arrays/scalars/dtypes, scipy sparse matrices, builtin containers, at every pickle protocol."""
    import collections

    import scipy.sparse as sp

    from models.flame import load_pickle_no_chumpy

    obj = {"a": np.arange(6.0).reshape(2, 3), "s": np.float64(1.5), "u": np.arange(3, dtype=np.uint32),
           "rec": np.zeros(2, dtype=[("x", "f4"), ("y", "i2")]), "J": sp.csc_matrix(np.eye(3)),
           "od": collections.OrderedDict(k=1), "misc": (1, 2.0, "x", None, True, b"raw", {3}, frozenset([4]))}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        got = load_pickle_no_chumpy(path)
        assert np.array_equal(got["a"], obj["a"]) and got["s"] == 1.5 and got["u"].dtype == np.uint32
        assert np.array_equal(got["rec"], obj["rec"]) and (got["J"] != obj["J"]).nnz == 0
        assert got["od"] == obj["od"] and got["misc"] == obj["misc"]


def _with_payload(doc: dict, marker: Path, path: Path) -> Path:
    torch.save({**doc, "extra": TouchPayload(marker)}, path)
    return path


def test_model_pt_payload_is_refused(trained_model_dir, tmp_path):
    from utils.data.model_file import load_model

    marker = tmp_path / "ran"
    doc = torch.load(trained_model_dir / "model.pt", weights_only=True)  # what we write is weights-only readable
    bad = _with_payload(doc, marker, tmp_path / "model.pt")
    with pytest.raises(UnsafeFileError, match=r"model\.pt: refused to load this model file: .*getattr"):
        load_model(bad)
    assert not marker.exists()


def test_code_pt_payload_is_refused(tmp_path):
    from utils.data.code_file import CODE_FORMAT, load_code

    marker = tmp_path / "ran"
    doc = {"format": CODE_FORMAT, "version": 2, "name": "x", "w": torch.zeros(4), "z": None,
           "base_vertices": torch.zeros(5, 3), "colour": None, "meta": {}}
    bad = _with_payload(doc, marker, tmp_path / "code.pt")
    with pytest.raises(UnsafeFileError, match=r"code\.pt: refused to load this code file"):
        load_code(bad)
    assert not marker.exists()


def test_checkpoint_payload_is_refused(trained_model_dir, preprocessed_root, tmp_path):
    from utils.apps.train.trainer import Trainer

    out = tmp_path / "run"
    shutil.copytree(trained_model_dir / "checkpoints", out / "checkpoints")
    newest = sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    marker = tmp_path / "ran"
    _with_payload(state, marker, newest)
    # a payload is no damage: resume refuses it instead of falling back past it
    with pytest.raises(UnsafeFileError, match=rf"{newest.name}: refused to load this training checkpoint"):
        Trainer(tiny_config(preprocessed_root, out, steps=20), resume=True)
    assert not marker.exists()


def test_model_fingerprint(trained_model_dir, tmp_path):
    from utils.data.model_file import load_model, weights_fingerprint

    doc = torch.load(trained_model_dir / "model.pt", weights_only=True)
    assert doc["fingerprint"] == weights_fingerprint(doc["state_dict"]) == load_model(
        trained_model_dir / "model.pt").fingerprint
    # the order of the dict does not matter, a changed value does
    assert weights_fingerprint(dict(reversed(list(doc["state_dict"].items())))) == doc["fingerprint"]
    edited = {k: v.clone() for k, v in doc["state_dict"].items()}
    name = next(iter(edited))
    edited[name].view(-1)[0] += 1e-3
    assert weights_fingerprint(edited) != doc["fingerprint"]
    torch.save({**doc, "state_dict": edited}, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="do not match the fingerprint"):
        load_model(tmp_path / "edited.pt")
    old = {k: v for k, v in doc.items() if k != "fingerprint"}  # files of format 1 have no fingerprint
    torch.save(old, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").fingerprint == doc["fingerprint"]


def test_code_pt_names_the_model_it_was_fitted_with(trained_model_dir, tmp_path):
    """A code.pt fitted with another model of the same config is refused, naming both files."""
    from utils.data.code_file import FittedCode, load_code, save_code
    from utils.data.model_file import load_model, weights_fingerprint

    model_a = load_model(trained_model_dir / "model.pt")
    doc = torch.load(trained_model_dir / "model.pt", weights_only=True)
    state = {k: v.clone() for k, v in doc["state_dict"].items()}
    state["codes.weight"][0, 0] += 0.5  # another training run: same config, other weights
    torch.save({**doc, "state_dict": state, "fingerprint": weights_fingerprint(state)}, tmp_path / "model_b.pt")
    model_b = load_model(tmp_path / "model_b.pt")
    code = FittedCode(torch.zeros(model_a.field.cfg.style_dim), None, model_a.base_vertices[0])
    path = save_code(tmp_path / "code.pt", code, model_a, str(trained_model_dir / "model.pt"))
    assert torch.equal(load_code(path, model_a).w, code.w)
    with pytest.raises(ValueError, match=rf"{path} was fitted with another model than .*model_b\.pt .*"
                                         rf"names checkpoint {trained_model_dir / 'model.pt'}"):
        load_code(path, model_b)
    old = torch.load(path, weights_only=True)
    del old["model_fingerprint"]  # written before fingerprints existed: a clear warning, still usable
    torch.save(old, path)
    with pytest.warns(UserWarning, match="predates model fingerprints: .* fitted with .*model_b\\.pt"):
        load_code(path, model_b)


# ============================================================================ 2. output folders
def test_atomic_writes_use_unique_temporary_names(tmp_path):
    target = tmp_path / "ckpt.pt"

    def outer(fh):  # a second writer of the same file while the first is half-way
        fh.write(b"first")
        atomic_torch_save({"x": torch.ones(2)}, target)

    atomic_write(target, outer)  # with a shared ".tmp" name the inner write would have taken the outer's file
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_only_plain_objects_are_written(tmp_path):
    """What atomic_torch_save writes, torch.load(weights_only=True) reads; anything else is refused at write time."""
    doc = {"format": "x", "w": torch.ones(2), "meta": {"cfg": [1, 2.5, "a", None, (True,)]}, "dt": torch.float16}
    path = atomic_torch_save(doc, tmp_path / "ok.pt")
    assert torch.load(path, weights_only=True)["meta"] == doc["meta"]
    with pytest.raises(TypeError, match=r"\['meta'\]\['score'\]: numpy\.float32 is not a tensor or plain value"):
        atomic_torch_save({"meta": {"score": np.float32(1)}}, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_disk_full_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "ckpts" / "ckpt_00000003.pt"
    atomic_torch_save({"x": torch.zeros(3)}, target)
    before = target.read_bytes()

    class FullDisk:  # a file on a disk that fills up after 100 bytes
        def __init__(self, fh):
            self.fh, self.n = fh, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.fh.close()

    real = atomic._open_temp  # atomic_torch_save writes through utils.core.atomic.atomic_write
    monkeypatch.setattr(atomic, "_open_temp", lambda p: (lambda fh, tmp: (FullDisk(fh), tmp))(*real(p)))
    with pytest.raises(OSError, match=r"no space left on the device of .*ckpts while writing ckpt_00000003\.pt") as ei:
        atomic_torch_save({"x": torch.zeros(10000)}, target)
    assert ei.value.errno == errno.ENOSPC
    assert [p.name for p in target.parent.iterdir()] == [target.name] and target.read_bytes() == before
    from utils.core.errors import error_line

    assert error_line(ei.value).startswith("no space left on the device of")  # one line, no "[Errno 28]"


def _train_cli(root: Path, out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    args = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--data_root", str(root), "--out", str(out),
            "--device", "cpu", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_second_run_into_a_locked_folder_is_refused(preprocessed_root, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
         f"from utils.core.locks import FolderLock; FolderLock({str(out)!r}).acquire(); print('held', flush=True); "
         f"sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = _train_cli(preprocessed_root, out, "--steps", "2")
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is in use by another run (pid {holder.pid} on" in lines[0], res.stderr
        assert not (out / "checkpoints").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the kernel dropped the lock with its holder: the folder is free again
    with FolderLock(out):
        pass


def test_fresh_run_refuses_a_finished_run_and_overwrite_replaces_it(trained_model_dir, preprocessed_root, tmp_path):
    from utils.apps.train.trainer import Trainer

    out = tmp_path / "run"
    shutil.copytree(trained_model_dir, out)
    model_bytes = (out / "model.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a training run .*pass --resume .* --overwrite"):
        Trainer(tiny_config(preprocessed_root, out, steps=3, seed=5))
    assert (out / "model.pt").read_bytes() == model_bytes  # nothing the user had was touched
    tr = Trainer(tiny_config(preprocessed_root, out, steps=3, seed=5, ckpt_every=3), overwrite=True)
    assert not list((out / "checkpoints").glob("*.pt")) and not (out / "model.pt").exists()
    tr.run()
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["ckpt_00000003.pt"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    with pytest.raises(ValueError, match="give one of them"):
        Trainer(tiny_config(preprocessed_root, out), resume=True, overwrite=True)


def test_pruning_keeps_this_runs_newest_steps(preprocessed_root, tmp_path):
    from utils.apps.train.trainer import Trainer

    tr = Trainer(tiny_config(preprocessed_root, tmp_path / "run", keep_checkpoints=2))
    tr.ckpt_dir.mkdir(parents=True)
    stale = tr.ckpt_dir / "ckpt_00000040.pt"  # a higher-numbered file this run did not write (yet)
    stale.write_bytes(b"stale")
    for step in (1, 2, 3):
        tr.step = step
        tr.save_checkpoint()
    names = sorted(p.name for p in tr.ckpt_dir.glob("*.pt"))
    assert names == ["ckpt_00000002.pt", "ckpt_00000003.pt", "ckpt_00000040.pt"]  # by name, 2 would have gone
    assert tr.checkpoints()[-1][0] == 40
    tr.close()


def test_resume_falls_back_past_a_truncated_checkpoint_bit_for_bit(preprocessed_root, tmp_path, capsys):
    from utils.apps.train.trainer import Trainer

    out = tmp_path / "run"
    ref = Trainer(tiny_config(preprocessed_root, out, steps=4, ckpt_every=2, eval_every=4))
    ref.run()
    final = {k: v.clone() for k, v in ref.field.state_dict().items()}
    newest = out / "checkpoints" / "ckpt_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:2000])  # as if the disk had failed while writing it
    (out / "model.pt").unlink()
    capsys.readouterr()
    tr = Trainer(tiny_config(preprocessed_root, out, steps=4, ckpt_every=2, eval_every=4), resume=True)
    msg = capsys.readouterr().out
    assert "skipped 1 unreadable checkpoint(s)" in msg and "ckpt_00000004.pt" in msg
    assert "resuming from ckpt_00000002.pt" in msg and tr.step == 2
    tr.run()
    for k, v in tr.field.state_dict().items():
        assert torch.equal(v, final[k]), k
    # a resume past --steps is an error, not a silent export of later weights
    with pytest.raises(ValueError, match=r"ckpt_00000004\.pt is at step 4, past --steps 3"):
        Trainer(tiny_config(preprocessed_root, out, steps=3), resume=True)
    # nothing readable at all: an error naming the folder, not a fresh start over the old run
    for p in (out / "checkpoints").glob("*.pt"):
        p.write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 2 checkpoints in .* can be read"):
        Trainer(tiny_config(preprocessed_root, out, steps=4), resume=True)


# ============================================================================ 3. inputs
@pytest.mark.parametrize("argv,flag", [
    (["--steps", "-5"], "--steps must be >= 1, got -5"),
    (["--eval_every", "0"], "--eval_every must be >= 1, got 0"),
    (["--batch_identities", "0"], "--batch_identities must be >= 1, got 0"),
    (["--data.subdivision", "7"], "--data.subdivision must be >= 0 and <= 3, got 7"),
    (["--model.w_avg_beta", "nan"], "--model.w_avg_beta must be a finite number (>= 0 and < 1), got nan"),
    (["--optim.grad_clip", "inf"], "--optim.grad_clip must be a finite number (>= 0), got inf"),
    (["--model.mapping_lr_mult", "nan"], "--model.mapping_lr_mult must be a finite number, got nan"),  # no Range
])
def test_bad_config_values_fail_up_front(tmp_path, capsys, argv, flag):
    import train

    with pytest.raises(SystemExit) as ei:
        train.main(["--config", "configs/tiny.yaml", "--data_root", str(tmp_path / "none"), "--out",
                    str(tmp_path / "o"), *argv])
    assert ei.value.code == 2
    assert capsys.readouterr().err.strip() == f"train.py: error: {flag}"
    assert not (tmp_path / "o").exists()  # checked before anything is written


@pytest.fixture
def subject(synthetic_root, tmp_path):
    from utils.data.nersemble import NersembleSubject

    shutil.copytree(synthetic_root / "subjects" / "300", tmp_path / "300")
    return NersembleSubject(tmp_path, "300")


def test_damaged_images_are_named(subject):
    from utils.data.nersemble import FRONTAL_SERIAL

    path = subject.image_path(FRONTAL_SERIAL)
    good = path.read_bytes()
    cases = {"empty": (b"", "file is empty"), "random": (np.random.default_rng(0).bytes(3000), "not a complete"),
             "cut in header": (good[:150], "not a complete"), "cut after header": (good[: len(good) * 3 // 5],
                                                                                   "truncated or damaged")}
    for name, (data, what) in cases.items():
        path.write_bytes(data)
        if name == "cut after header":  # OpenCV alone would decode it with grey rows
            assert cv2.imread(str(path)) is not None
        subject._size_cache.clear()
        with pytest.raises(ValueError, match=what) as ei:
            subject.cameras() if name != "cut after header" else subject.image(FRONTAL_SERIAL)
        assert str(path) in str(ei.value), name
    path.write_bytes(good)
    assert subject.image(FRONTAL_SERIAL).shape[2] == 3


def test_wrong_size_masked_image_is_named(subject):
    from utils.data.nersemble import FRONTAL_SERIAL

    w, h = subject.image_size(FRONTAL_SERIAL)
    masked = subject.masked_image_path(FRONTAL_SERIAL)
    masked.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(masked), np.zeros((h, w + 6, 3), np.uint8))
    with pytest.raises(ValueError, match=rf"{masked.name} is {w + 6}x{h} pixels but its photo is {w}x{h}"):
        subject.masked_image(FRONTAL_SERIAL)
    mask = subject.facemask_path(FRONTAL_SERIAL)
    mask.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(mask), np.zeros((h, w + 6), np.uint8))  # another aspect ratio: not a rescaled mask
    with pytest.raises(ValueError, match=rf"{mask.name} is {w + 6}x{h} pixels"):
        subject.facemask(FRONTAL_SERIAL)


def test_bad_camera_params_name_file_and_key(subject):
    from utils.data.camera_params import load_camera_params
    from utils.data.nersemble import FRONTAL_SERIAL

    path = subject.calibration_path
    data = json.loads(path.read_text())
    ragged = json.loads(json.dumps(data))
    if isinstance(ragged["intrinsics"], dict):
        ragged["intrinsics"][FRONTAL_SERIAL][1] = ragged["intrinsics"][FRONTAL_SERIAL][1][:2]
        key = rf"intrinsics\['{FRONTAL_SERIAL}'\]"
    else:
        ragged["intrinsics"][1] = ragged["intrinsics"][1][:2]
        key = "'intrinsics'"
    path.write_text(json.dumps(ragged))
    with pytest.raises(ValueError, match=rf"camera_params\.json: {key} must be a 3x3 matrix of numbers"):
        load_camera_params(path)
    short = json.loads(json.dumps(data))
    short["world_2_cam"][FRONTAL_SERIAL] = short["world_2_cam"][FRONTAL_SERIAL][:3]
    path.write_text(json.dumps(short))
    with pytest.raises(ValueError, match=rf"camera_params\.json: world_2_cam\['{FRONTAL_SERIAL}'\] must be a 4x4 "
                                         r"matrix, got shape \(3, 4\)"):
        load_camera_params(path)


def test_nan_tracking_is_named_at_load_and_in_flame2ply(subject, synthetic_root, capsys):
    from models.flame import load_tracking
    from utils.preprocess import FLAME2PLY

    path = subject.tracking_path
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["expression"] = arrays["expression"].copy()
    arrays["expression"][0, 3] = np.nan
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"tracked_flame_params\.npz: key 'expression' holds NaN or Inf values in "
                                         r"frame row\(s\) \[0\]"):
        load_tracking(path)
    code = FLAME2PLY.main(["--data_root", str(subject.root), "--subjects", "300", "--flame_dir",
                           str(synthetic_root / "flame"), "--max_level", "1", "--overwrite", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "key 'expression' holds NaN or Inf" in err[0], err


def test_entry_points_print_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    import interpolate
    import track

    missing = tmp_path / "nope" / "model.pt"
    for mod, argv in ((track, ["--checkpoint", str(missing), "--subject_dir", str(tmp_path), "--out", str(tmp_path)]),
                      (interpolate, ["--checkpoint", str(missing), "--out", str(tmp_path / "i")])):
        with pytest.raises(SystemExit) as ei:
            mod.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert ei.value.code == 2 and len(err) == 1 and str(missing) in err[0], err
        with pytest.raises(FileNotFoundError):
            mod.main([*argv, "--debug"])


# ============================================================================ issue 26 class 4: the output claim


def _user_frames(out: Path, n: int = 5) -> dict[Path, bytes]:
    """Frames a user (or ffmpeg) left in --out: frames/frame_00000.png ... that no run of ours wrote."""
    (out / "frames").mkdir(parents=True, exist_ok=True)
    files = {out / "frames" / f"frame_{i:05d}.png": f"user {i}".encode() for i in range(n)}
    for p, b in files.items():
        p.write_bytes(b)
    return files


def _run(out: Path, names: list[str], overwrite: bool = False) -> None:
    with OutputClaim(out, "tool") as claim:
        claim.plan(names, overwrite)
        for rel in names:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(b"ours")
        claim.finish()


FRAMES3 = [f"frames/frame_{i:05d}.png" for i in range(3)]
CLAIM_CASES = ["user_frames_not_written", "user_frames_clash", "user_frames_clash_overwrite", "rerun_refused",
               "rerun_overwrite_shorter", "record_dotdot", "record_absolute", "record_linked_folder",
               "lock_held_by_other_process"]


@pytest.mark.parametrize("case", CLAIM_CASES)
def test_output_claim_deletes_only_its_own_files(tmp_path, case):
    out = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    user = _user_frames(out, 5)
    if case == "user_frames_not_written":  # animate without --png: frames/ is not ours, nothing there is touched
        _run(out, ["animation.mp4"])
        assert all(p.read_bytes() == b for p, b in user.items())
    elif case == "user_frames_clash":
        with pytest.raises(FileExistsError, match="--overwrite"):
            _run(out, FRAMES3)
        assert all(p.read_bytes() == b for p, b in user.items())
    elif case == "user_frames_clash_overwrite":  # asked to: the 3 it writes are replaced, the 2 others stay
        _run(out, FRAMES3, overwrite=True)
        assert [p.read_bytes() for p in sorted(user)] == [b"ours"] * 3 + [b"user 3", b"user 4"]
    elif case == "rerun_refused":
        _run(out, ["animation.mp4"])
        with pytest.raises(FileExistsError, match="already holds output of an earlier run"):
            _run(out, ["animation.mp4"])
    elif case == "rerun_overwrite_shorter":  # own stale frames go, the user's frame added since stays
        names = [f"ply/frame_{i:05d}.ply" for i in range(6)]
        _run(out, names)
        (out / "ply" / "frame_99999.ply").write_bytes(b"user")
        _run(out, names[:2], overwrite=True)
        assert sorted(p.name for p in (out / "ply").iterdir()) == ["frame_00000.ply", "frame_00001.ply",
                                                                   "frame_99999.ply"]
        assert all(p.read_bytes() == b for p, b in user.items())
    else:
        if case == "lock_held_by_other_process":
            holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                                       "from utils.core.locks import FolderLock; FolderLock(sys.argv[2]).acquire(); "
                                       "print('held', flush=True); time.sleep(60)", str(REPO), str(out)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert holder.stdout.readline().strip() == "held"
                with pytest.raises(FolderInUseError, match="in use by another run"):
                    _run(out, FRAMES3, overwrite=True)
            finally:
                holder.kill()
                holder.wait()
        else:
            rel = {"record_dotdot": "../victim.txt", "record_absolute": str(victim),
                   "record_linked_folder": "linked/victim.txt"}[case]
            if case == "record_linked_folder":
                (out / "linked").symlink_to(tmp_path, target_is_directory=True)
            (out / ".tool_outputs.json").write_text(json.dumps({"tool": "tool", "files": [rel], "finished": True}))
            with pytest.raises(UnsafeNameError):
                _run(out, ["animation.mp4"], overwrite=True)
        assert all(p.read_bytes() == b for p, b in user.items())
    assert victim.read_text() == "precious"


# ============================================================================ issue 26 class 5: one atomic writer
def _writers():
    """(name, file name, write(path)) for every kind of output the project writes."""
    from models.flame import FlameParams, save_nersemble_tracking
    from models.gaussians import GaussianCloud
    from utils.preprocess.common import atomic_write as preprocess_write

    def ply(p):
        n = 4
        GaussianCloud(means=torch.rand(n, 3), scales=torch.full((n, 3), 0.01), quats=torch.tensor([[1.0, 0, 0, 0]] * n),
                      opacities=torch.full((n,), 0.5), sh=torch.rand(n, 1, 3)).save_ply(p)

    return [
        ("ply", "head.ply", ply),
        ("png", "grid.png", lambda p: save_image(p, np.full((8, 8, 3), 0.5, np.float32))),
        ("mp4", "turntable.mp4", lambda p: write_video(p, [np.full((16, 16, 3), 128, np.uint8)] * 3)),
        ("npz", "motion.npz", lambda p: save_nersemble_tracking(p, FlameParams.neutral(2))),
        ("json", "metrics.json", lambda p: atomic_write_json({"a": 1}, p)),
        ("pt", "code.pt", lambda p: atomic_torch_save({"w": torch.ones(3)}, p)),
        ("preprocess_png", "cam_1.png", lambda p: preprocess_write(
            p, lambda t: cv2.imwrite(str(t), np.zeros((4, 4, 3), np.uint8)))),
    ]


WRITER_NAMES = ["ply", "png", "mp4", "npz", "json", "pt", "preprocess_png"]


def _writer(name):
    return next(w for w in _writers() if w[0] == name)


@pytest.mark.parametrize("plant", ["link_at_final_name", "link_at_old_fixed_temp"])
@pytest.mark.parametrize("kind", WRITER_NAMES)
def test_writers_never_follow_a_planted_link(tmp_path, kind, plant):
    _, name, write = _writer(kind)
    out = tmp_path / "out"
    out.mkdir()
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    link = out / name if plant == "link_at_final_name" else out / f"{name}.tmp"
    link.symlink_to(outside)
    write(out / name)
    assert outside.read_bytes() == b"precious"
    assert (out / name).is_file() and not (out / name).is_symlink() and (out / name).stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == sorted({name, link.name})  # no temporary left


@pytest.mark.parametrize("kind", WRITER_NAMES)
def test_writers_on_a_full_disk_leave_nothing_and_name_the_file(tmp_path, monkeypatch, kind):
    """ENOSPC surfacing at fsync (as with delayed allocation): the old file stays, no temporary is left, and the
    error names the folder and the file."""
    _, name, write = _writer(kind)
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"no space left on the device of .*out while writing {name}") as ei:
        write(out / name)
    assert ei.value.errno == errno.ENOSPC
    assert [p.name for p in out.iterdir()] == [name] and (out / name).read_bytes() == b"old"


def test_resume_removes_orphaned_temporaries(tmp_path):
    """Temporaries of a writer killed by kill -9 (checkpoint, model, PNG) are removed when --resume claims the
    folder; other files, and a temporary of this very process, stay."""
    from types import SimpleNamespace

    from utils.apps.train.trainer import Trainer

    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    orphans = [ckpt / ".ckpt_00000200.pt.4242.deadbeef.tmp.pt", out / ".model.pt.77.0123abcd.tmp.pt",
               out / ".eval_heldout_views.png.5.ffffffff.tmp.png", out / ".metrics.json.9.aaaaaaaa.tmp"]
    keep = [ckpt / "ckpt_00000100.pt", out / "notes.tmp", out / ".hidden", ckpt / f".x.pt.{os.getpid()}.00000000.tmp"]
    for p in orphans + keep:
        p.write_bytes(b"x")
    fake = SimpleNamespace(lock=FolderLock(out), out=out, ckpt_dir=ckpt)
    try:
        Trainer._claim_output(fake, resume=True, overwrite=False)
    finally:
        fake.lock.release()
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in keep)
