"""utils/core/images.py and utils/core/video.py: images and videos with file names that are not UTF-8: OpenCV
crashed (segfault, exit 139, no
message) on such paths; images now go through bytes (imdecode / imencode), video paths and command-line paths are
refused with one line naming them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # in a child process: a regression is a segfault, which must fail this test, not kill pytest
    return subprocess.run([sys.executable, "-c", code, os.fsencode(tmp_path).decode("utf-8", "surrogateescape")],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_images_with_non_utf8_names_round_trip(tmp_path):
    code = r'''
import os, sys, numpy as np
from utils.core.images import read_image, save_image, imwrite_file, imread_file
import cv2
d = os.fsdecode(os.fsencode(sys.argv[1]) + b"/caf\xe9-\xff")
os.makedirs(d)
yy, xx = np.mgrid[0:12, 0:16] / 16.0
img = np.stack([xx, yy, 0.5 + 0 * xx], -1).astype(np.float32)  # smooth: JPEG keeps it within a few levels
for ext in (".png", ".jpg"):
    p = os.path.join(d, os.fsdecode(b"photo\xfe") + ext)
    save_image(p, img)
    back = read_image(p)
    assert back.shape == (12, 16, 3), back.shape
    tol = 1 / 255 + 1e-6 if ext == ".png" else 0.06
    assert np.abs(back - img).max() <= tol, (ext, np.abs(back - img).max())
gray = os.path.join(d, os.fsdecode(b"m\xff.png"))
imwrite_file(gray, (np.arange(20, dtype=np.uint8).reshape(4, 5) * 10))
assert imread_file(gray, cv2.IMREAD_GRAYSCALE).tolist() == (np.arange(20).reshape(4, 5) * 10).tolist()
assert sorted(n for n in os.listdir(d) if n.endswith(".tmp")) == []  # no temporaries left
print("ok")
'''
    r = _run(code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_video_paths_that_are_not_utf8_are_refused(tmp_path):
    code = r'''
import os, sys, numpy as np
from utils.core.video import write_video
p = os.fsdecode(os.fsencode(sys.argv[1]) + b"/v\xff.mp4")
try:
    write_video(p, [np.zeros((8, 8, 3), np.uint8)])
except ValueError as e:
    print("refused:", e)
'''
    r = _run(code, tmp_path)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "refused: the video path" in r.stdout and "is not valid UTF-8" in r.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script,argv", [
    ("track.py", ["--image", b"ph\xfe.png"]), ("track.py", ["--image", "x.png", "--out", b"o\xff"]),
    ("animate.py", ["--out", b"o\xff"]), ("animate.py", ["--motion", b"v\xff.mp4"]),
    ("interpolate.py", ["--out", b"o\xff"]), ("viewer.py", ["--ply_dir", b"o\xff"]),
    ("utils/preprocess/projection_ply.py", ["--data_root", b"d\xff"]),
])
def test_entry_points_refuse_non_utf8_paths_with_one_line(tmp_path, script, argv):
    args = [os.fsencode(tmp_path) + b"/" + a if isinstance(a, bytes) else a for a in argv]
    r = subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, timeout=120)
    err = r.stderr.decode("utf-8", "replace").strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, (r.returncode, err)
    assert "is not valid UTF-8" in err[0] and f"error: {argv[-2]}:" in err[0]


# ---------------------------------------------------------------------------------------------- class 8
def _png_declaring(w: int, h: int) -> bytes:
    """A small PNG whose header declares w x h pixels (8-bit RGB) with a few compressed rows of data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4 * (3 * w + 1)), 9))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("w,h", [(20000, 20000), (11000, 11000), (120001, 1000)])
def test_png_declaring_a_huge_size_is_refused_before_decoding(tmp_path, w, h):
    import time

    import cv2

    from utils.core.images import MAX_IMAGE_PIXELS, imread_file, read_image

    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(w, h))
    assert path.stat().st_size < 2_000_000 and w * h > MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    for read in (lambda: read_image(path, "photo"), lambda: imread_file(path, cv2.IMREAD_COLOR)):
        with pytest.raises(ValueError, match=r"bomb\.png.*(declares|megapixels)") as ei:
            read()
        assert "\n" not in str(ei.value)
    assert time.perf_counter() - t0 < 5  # nothing was decoded
    ok = tmp_path / "ok.png"
    ok.write_bytes(_png_declaring(64, 4))  # a real (if dull) image of an allowed size still reads
    assert imread_file(ok, cv2.IMREAD_COLOR).shape == (4, 64, 3)


def test_video_stream_writes_frames_as_they_come_and_aborts_cleanly(tmp_path):
    import cv2

    from utils.core.video import VideoStream, write_video

    def frames(n):
        for i in range(n):
            yield np.full((21, 30, 3), i * 8 % 256, np.uint8)

    path = write_video(tmp_path / "gen.mp4", frames(40), fps=10)  # a generator: one frame in memory at a time
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 40 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 30
    cap.release()
    with pytest.raises(ValueError, match="all video frames must be 30x21"):
        with VideoStream(tmp_path / "bad.mp4", 10) as s:
            s.write(np.zeros((21, 30, 3), np.uint8))
            s.write(np.zeros((20, 30, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.mp4"]  # no bad.mp4, no temporary
    with pytest.raises(ValueError, match="frame rate"):
        VideoStream(tmp_path / "x.mp4", float("nan"))
    with pytest.raises(ValueError, match="at least one frame"):
        write_video(tmp_path / "empty.mp4", [])


def test_read_video_frames_by_range_and_by_index(tmp_path):
    """The one video reader (utils/core/video.py read_video_frames): frames by start / stride / max_frames or by index
    (those past the end left out), RGB, with the file's frame rate; an unreadable file and an empty selection are
    ValueErrors that name the file."""
    from utils.core.video import read_video_frames, write_video

    colour = [(i * 20, 255 - i * 20, 128) for i in range(10)]  # RGB per frame, far apart after mp4v
    path = write_video(tmp_path / "v.mp4", [np.full((16, 24, 3), c, np.uint8) for c in colour], fps=12)
    frames, ids, fps = read_video_frames(path, start=1, stride=3)
    assert ids.tolist() == [1, 4, 7] and ids.dtype == np.int64 and fps == 12.0
    assert frames[0].shape == (16, 24, 3) and frames[0].dtype == np.uint8
    assert all(np.abs(f.reshape(-1, 3).mean(0) - colour[i]).max() < 12 for f, i in zip(frames, ids))  # RGB, not BGR
    assert read_video_frames(path, max_frames=4)[1].tolist() == [0, 1, 2, 3]
    frames, ids, _ = read_video_frames(path, frame_ids=np.array([8, 2, 2, 30]))
    assert ids.tolist() == [2, 8] and len(frames) == 2
    assert read_video_frames(path, frame_ids=[])[1].tolist() == []
    with pytest.raises(ValueError, match="no frames to use"):
        read_video_frames(path, start=10)
    with pytest.raises(ValueError, match="start >= 0"):
        read_video_frames(path, stride=0)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot open the video"):
        read_video_frames(tmp_path / "bad.mp4")
