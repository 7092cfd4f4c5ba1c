"""torchrun + DDP (gloo on CPU): 2 ranks end with the same parameters as 1 process on the same global batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.training_fixtures import preprocessed_root  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(root: Path, out: Path, nproc: int, *extra: str) -> dict:
    args = ["--config", "configs/tiny.yaml", "--data_root", str(root), "--out", str(out), "--device", "cpu",
            "--steps", "4", "--eval_every", "4", "--ckpt_every", "4", "--batch_identities", "2", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "train.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "train.py", *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    doc["_stdout"] = res.stdout
    return doc


def test_two_gloo_ranks_match_one_process(preprocessed_root, tmp_path):
    from tests.training_fixtures import tiny_config
    from utils.apps.train.trainer import Trainer

    initial = Trainer(tiny_config(preprocessed_root, tmp_path / "init", device="cpu")).field.state_dict()
    single = _train(preprocessed_root, tmp_path / "single", 1)["state_dict"]
    multi = _train(preprocessed_root, tmp_path / "ddp", 2)["state_dict"]
    moved = 0
    for name, a in single.items():
        if name.endswith("w_avg"):  # a buffer, not a parameter: each rank averages its own half of the batch
            continue
        b = multi[name]
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"{name} differs by {(a - b).abs().max():.3g}"
        moved += int(not torch.equal(a, initial[name]))
    # Training must have changed the parameters, or their equality would prove nothing.
    assert moved >= len(single) // 2


def test_resume_on_another_number_of_ranks(preprocessed_root, tmp_path):
    """Checkpoints hold the global state: 2 ranks to step 2, then 1 process to step 4 == 1 process throughout."""
    single = _train(preprocessed_root, tmp_path / "single", 1)["state_dict"]
    out = tmp_path / "switch"
    _train(preprocessed_root, out, 2, "--ckpt_every", "2")
    (out / "checkpoints" / "ckpt_00000004.pt").unlink()  # as if the 2-rank job had stopped after step 2
    (out / "model.pt").unlink()
    run = _train(preprocessed_root, out, 1, "--resume")
    assert "ckpt_00000002.pt at step 2" in run["_stdout"]  # it really continued the 2-rank run
    resumed = run["state_dict"]
    for name, a in single.items():
        if not name.endswith("w_avg"):
            assert torch.allclose(a, resumed[name], rtol=1e-4, atol=1e-5), f"{name} differs"
