#!/usr/bin/env python3
"""Download a real head-turning clip for ``track.py --video`` (README, "A personal avatar from a video").

The clips are Intel's IoT DevKit sample videos (https://github.com/intel-iot-devkit/sample-videos), licensed under
Creative Commons Attribution 4.0 International (https://creativecommons.org/licenses/by/4.0/; the repository's
LICENSE file and README): a woman turning her head from a three-quarter view to the camera
(``head-pose-face-detection-female``), a man facing the camera with changing expressions
(``head-pose-face-detection-male``), and both (``head-pose-face-detection-female-and-male``).  ``--kind gif`` takes the
repository's preview GIF of the clip instead (480x270, 12.5 frames/s; what README's numbers were measured on);
``--kind mp4`` the full video.  Files are pinned to one commit of that repository and checked against their git blob
id, so a changed or truncated download is an error, never a silently different clip.  They go to data/clips/
(ignored by git): this project does not redistribute them.

    python scripts/get_sample_clip.py                          # data/clips/head-pose-face-detection-female.gif
    python scripts/get_sample_clip.py --clip male --kind mp4
    python track.py --checkpoint output/cpu/model.pt --video data/clips/head-pose-face-detection-female.gif \
        --out output/female
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.request
from pathlib import Path

REPO = "intel-iot-devkit/sample-videos"
COMMIT = "57978890822836f2b4743852f04f62fc511757e4"  # master on 2024-07-22 (the CC BY 4.0 LICENSE commit)
LICENSE = "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/), Intel IoT DevKit sample-videos"
# git blob ids of the files at COMMIT (git ls-tree): what a download must hash to
BLOBS = {
    ("female", "mp4"): ("head-pose-face-detection-female.mp4", "4a6ee1adf4be27d3f3db9ddc635eef1628d4d1ba"),
    ("female", "gif"): ("preview/head-pose-face-detection-female.gif", "56b415e2aba047bb6d47123ada59edb541a5679a"),
    ("male", "mp4"): ("head-pose-face-detection-male.mp4", "663997ab93a45766f4f89054f7dec3d3e38d5c33"),
    ("male", "gif"): ("preview/head-pose-face-detection-male.gif", "ba32a3394ed2207657777672dd3ce20c6bdaaa6e"),
    ("female-and-male", "mp4"): ("head-pose-face-detection-female-and-male.mp4",
                                 "573090fabc22ecada98b920c66df2404c1c21651"),
    ("female-and-male", "gif"): ("preview/head-pose-face-detection-female-and-male.gif",
                                 "13e353bd54ac43c021cc7d857e35d8b4219d1b26"),
}
BASE_URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/"


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (sha1 of "blob <size>\\0" + data)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def download(clip: str, kind: str, out_dir: str | os.PathLike, base_url: str = BASE_URL) -> Path:
    """Fetch one clip into ``out_dir`` (kept when already there and intact); returns its path.  A download whose
    git blob id differs from the pinned one is an error and leaves no file."""
    path, blob = BLOBS[(clip, kind)]
    out = Path(out_dir) / Path(path).name
    if out.is_file() and git_blob_id(out.read_bytes()) == blob:
        return out
    url = base_url + path
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as exc:
        raise RuntimeError(f"could not download {url} ({exc}); download it by hand from "
                           f"https://github.com/{REPO}/blob/{COMMIT}/{path} into {out.parent}") from exc
    got = git_blob_id(data)
    if got != blob:
        raise RuntimeError(f"{url}: downloaded {len(data)} bytes with git blob id {got}, expected {blob} (a different "
                           f"or truncated file); nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LICENSE)
    ap.add_argument("--clip", choices=sorted({c for c, _ in BLOBS}), default="female",
                    help="which sample video (default: female, the head turn)")
    ap.add_argument("--kind", choices=["gif", "mp4"], default="gif",
                    help="gif: the repository's 480x270 preview (default); mp4: the full video")
    ap.add_argument("--out", default="data/clips", help="folder to download into (default: data/clips)")
    args = ap.parse_args(argv)
    try:
        path = download(args.clip, args.kind, args.out)
    except RuntimeError as exc:
        sys.exit(f"get_sample_clip.py: error: {exc}")
    print(f"{path}  ({LICENSE}; source https://github.com/{REPO}/blob/{COMMIT}/{BLOBS[(args.clip, args.kind)][0]})")
    return path


if __name__ == "__main__":
    main()
