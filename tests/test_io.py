"""Tests of utils/io.py: the output claim (lock + recorded outputs + --overwrite) and safe names."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.io import FolderInUseError, OutputClaim, UnsafeNameError

REPO = Path(__file__).resolve().parents[1]


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
                                       "from utils.io import FolderLock; FolderLock(sys.argv[2]).acquire(); "
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
