"""Headless Chromium for the browser viewer's pictures and tests (scripts/viewer_picture.py, tests/test_viewer.py):
Playwright drives the system's Chromium (nothing is downloaded) with software WebGL.  Only those two import it; the
viewer itself never starts a browser."""
from __future__ import annotations

import io
import os
import shutil

import numpy as np

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI and the GPU machines run as root
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # software WebGL (no GPU)
    "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",  # the machine's network is closed: no background connections
]
# wide enough that the control panel leaves the head free, tall enough to show the whole panel
VIEWPORT = {"width": 1200, "height": 860}
MISSING = ("no Chromium: `bash scripts/setup.sh --dev` installs Debian's chromium (README's test command), or set "
           "CHROMIUM=/path/to/chromium")


def find_chromium() -> str | None:
    """Path of the Chromium to drive: $CHROMIUM, else ``chromium`` / ``chromium-browser`` on PATH; None if none."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page) -> np.ndarray:
    """The Playwright page as an (H, W, 3) float32 image in [0, 1]."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(np.float32) / 255.0
