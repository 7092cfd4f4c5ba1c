"""torchrun + DDP (gloo on CPU): 2 ranks end with the same parameters as 1 process on the same global batch; the
process group's threads end at shutdown."""
import json
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


# One rank as torchrun starts it: join the group, wrap a module in DDP (its constructor imports
# torch.distributed.nn.functional), leave the group; the OS threads of the process at each point.
_SHUTDOWN_SCRIPT = """
import json, os, sys, torch
from utils.apps.train.distributed import init_distributed, shutdown_distributed
def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
before = threads()
init_distributed("cpu")
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
ddp(torch.ones(1, 2)).sum().backward()
during = threads()
del ddp
shutdown_distributed()
print(json.dumps({"before": before, "during": during, "after": threads()}))
"""


def test_shutdown_ends_the_process_group_threads():
    """shutdown_distributed() must destroy the gloo group while Python runs: a group that outlives it (pinned by a
    module imported after init, see distributed._import_before_process_group) is destroyed during interpreter
    teardown, where its threads can abort the process ("terminate called without an active exception")."""
    if not os.path.isdir("/proc/self/task"):
        import pytest

        pytest.skip("needs Linux /proc to list the threads")
    env = dict(os.environ, OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    res = subprocess.run([sys.executable, "-c", _SHUTDOWN_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(seen["during"]) > len(seen["before"]), seen  # the group had threads of its own, or this proves nothing
    assert seen["after"] == seen["before"], f"threads left after shutdown_distributed(): {seen}"
