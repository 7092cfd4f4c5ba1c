"""scripts/get_sample_clip.py: downloads are checked against the pinned git blob id (a file:// mirror stands in for
GitHub here; the tests never touch the network)."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("get_sample_clip", ROOT / "scripts" / "get_sample_clip.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_blob_id_matches_git(tmp_path):
    mod = _script()
    data = bytes(range(256)) * 7
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    want = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True, check=True).stdout.strip()
    assert mod.git_blob_id(data) == want


def test_download_checks_blob_id(tmp_path, monkeypatch):
    mod = _script()
    path, _ = mod.BLOBS[("female", "gif")]
    mirror = tmp_path / "mirror"
    (mirror / path).parent.mkdir(parents=True)
    (mirror / path).write_bytes(b"not the clip")
    base = mirror.as_uri() + "/"
    with pytest.raises(RuntimeError, match="expected 56b415e2"):
        mod.download("female", "gif", tmp_path / "out", base_url=base)
    assert not (tmp_path / "out").exists()  # nothing written
    monkeypatch.setitem(mod.BLOBS, ("female", "gif"), (path, mod.git_blob_id(b"not the clip")))
    got = mod.download("female", "gif", tmp_path / "out", base_url=base)
    assert got == tmp_path / "out" / "head-pose-face-detection-female.gif" and got.read_bytes() == b"not the clip"
    with pytest.raises(RuntimeError, match="could not download"):
        mod.download("male", "gif", tmp_path / "out", base_url=base)
