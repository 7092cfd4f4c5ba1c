"""Screenshot of the browser viewer as a user sees it: starts ``viewer.py`` on a model, opens the printed address in
headless Chromium (Playwright driving the system browser, software WebGL; nothing is downloaded), waits until the
head is drawn and stands still, and saves the page (README's docs/viewer.png).

    python scripts/viewer_picture.py --checkpoint output/cpu/model.pt --out docs/viewer.png

Needs the dev requirements (``bash scripts/setup.sh --dev``: Playwright and Chromium).  The viewport is the browser
test's (tests/test_viewer.py), 1200x860; the head fills what the viewer's default camera gives it.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from utils.apps.viewer.browser import CHROMIUM_ARGS, MISSING, VIEWPORT, find_chromium, screenshot  # noqa: E402


def _start_viewer(checkpoint: str, port: int, timeout: float) -> tuple[subprocess.Popen, str]:
    """viewer.py in a child process; returns it and the address it prints."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "viewer.py"), "--checkpoint", checkpoint, "--port", str(port),
                             "--code_dir", ""], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + timeout
    lines = []
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        m = re.search(r"on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("viewer.py did not print its address:\n" + "".join(lines[-20:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="output/cpu/model.pt", help="model.pt the viewer serves")
    ap.add_argument("--out", default="docs/viewer.png", help="PNG to write (64-colour palette, as README's pictures)")
    ap.add_argument("--port", type=int, default=8097, help="port of the temporary viewer (127.0.0.1)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the viewer and the first frame")
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"{args.checkpoint}: no such model.pt (train one with `bash run_training.sh`)")
    browser_path = find_chromium()
    if not browser_path:
        raise SystemExit(MISSING)
    from PIL import Image
    from playwright.sync_api import sync_playwright

    proc, url = _start_viewer(args.checkpoint, args.port, args.timeout)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, timeout=30_000)
            # software WebGL draws the first frame slowly and the page fades in: wait for two equal screenshots
            end, prev, img = time.monotonic() + args.timeout, None, screenshot(page)
            while time.monotonic() < end and (prev is None or np.abs(img - prev).max() >= 2 / 255
                                              or img.std() < 0.02):
                time.sleep(0.5)
                prev, img = img, screenshot(page)
            notice = page.locator(".mantine-Notification-closeButton")  # the "software WebGL" notice
            if notice.count():
                notice.first.click()
                page.locator(".mantine-Notification-root").first.wait_for(state="detached", timeout=10_000)
            tmp = Path(args.out).with_suffix(".tmp.png")
            page.screenshot(path=str(tmp))
            browser.close()
        Image.open(tmp).quantize(64).save(args.out, optimize=True)
        tmp.unlink()
        print(f"wrote {args.out}")
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
