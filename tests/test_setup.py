"""scripts/setup.sh: README's commands and .ci/run use the same setup step, and it says what to do when it can't
install Chromium (run with a stub python so nothing is installed)."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_and_ci_run_the_same_setup_and_test_command():
    train_cmd, test_cmd = readme_commands()
    assert train_cmd == "bash scripts/setup.sh && bash run_training.sh"
    assert test_cmd == "bash scripts/setup.sh --dev && python3 -m pytest -q tests"
    ci = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    setup, pytest_cmd = test_cmd.split(" && ")
    # .ci/run is README's test command, split over two lines under `set -e`
    assert ci[-2:] == [setup, pytest_cmd]
    assert "set -euo pipefail" in ci


def _stub_env(tmp_path: Path, tools: dict[str, str]) -> dict[str, str]:
    """A PATH with only bash's basics and the given stub tools; PYTHON is a stub that records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    tools = {"python-stub": f'#!/bin/sh\necho "$@" >> {log}\nexit 0\n', **tools}
    for name, body in tools.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(stat.S_IRWXU)
    for name in ("sed", "id", "env", "cat", "dirname"):
        if name in tools:
            continue
        target = subprocess.run(["bash", "-c", f"command -v {name}"], capture_output=True, text=True).stdout.strip()
        (bindir / name).symlink_to(target)
    env = {k: v for k, v in os.environ.items() if k != "CHROMIUM"}
    env.update(PATH=str(bindir), PYTHON=str(bindir / "python-stub"))
    return env


def _bash() -> str:
    return subprocess.run(["bash", "-c", "command -v bash"], capture_output=True, text=True).stdout.strip()


def test_setup_installs_requirements_in_order(tmp_path):
    env = _stub_env(tmp_path, {"chromium": "#!/bin/sh\nexit 0\n"})
    r = subprocess.run([_bash(), str(REPO / "scripts/setup.sh"), "--dev"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    # the stub "has" torch (import succeeds), so torch is not reinstalled; dev requirements, then mediapipe --no-deps
    assert calls[0] == "-c import torch"
    assert "-r requirements-dev.txt" in calls[1]
    assert "--no-deps -r requirements-landmarks.txt" in calls[2]
    assert not any("torch==" in c for c in calls)


def test_setup_without_apt_says_what_to_install(tmp_path):
    env = _stub_env(tmp_path, {})  # no chromium, no apt-get
    r = subprocess.run([_bash(), str(REPO / "scripts/setup.sh"), "--dev"], env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert "needs Chromium" in r.stderr and "CHROMIUM=" in r.stderr
    # without --dev no browser is needed
    r = subprocess.run([_bash(), str(REPO / "scripts/setup.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_setup_uses_apt_with_sudo_when_not_root(tmp_path):
    log = tmp_path / "apt.log"
    env = _stub_env(tmp_path, {
        "apt-get": f'#!/bin/sh\necho "apt-get $@" >> {log}\nexit 0\n',
        "sudo": f'#!/bin/sh\necho "sudo" >> {log}\nexec "$@"\n',
        "id": "#!/bin/sh\necho 1000\n",  # not root
    })
    r = subprocess.run([_bash(), str(REPO / "scripts/setup.sh"), "--dev"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "sudo" and any("install -y -qq chromium" in line for line in lines)


def test_run_training_tunes_the_cpu_allocator_unless_told_otherwise(tmp_path):
    # run_training.sh with a stub python that records its environment: no data generation, no training
    log = tmp_path / "env.log"
    stub = tmp_path / "py"
    stub.write_text(f'#!/bin/sh\necho "$THP_MEM_ALLOC_ENABLE|$GLIBC_TUNABLES" >> {log}\nexit 0\n')
    stub.chmod(stat.S_IRWXU)
    (tmp_path / "syn").mkdir()
    (tmp_path / "syn" / "synthetic_info.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES")}
    env.update(PYTHON=str(stub), SYNTHETIC_DATA=str(tmp_path / "syn"))
    r = subprocess.run([_bash(), str(REPO / "run_training.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 3  # FLAME2PLY, projection_ply, train.py
    thp, tunables = lines[-1].split("|")
    assert thp == "1" and "glibc.malloc.mmap_threshold=" in tunables and "glibc.malloc.trim_threshold=" in tunables
    # the user's own settings win
    log.unlink()
    env.update(THP_MEM_ALLOC_ENABLE="0", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    r = subprocess.run([_bash(), str(REPO / "run_training.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert log.read_text().splitlines()[-1] == "0|glibc.malloc.arena_max=2"
