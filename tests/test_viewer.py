"""The browser viewer (utils/viewer.py, viewer.py, run_viewer.sh): controls -> served Gaussians from Python, update
coalescing, errors in the page, safe defaults, and the page itself in a real headless Chromium."""
from __future__ import annotations

import concurrent.futures
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_fitting import fit_model, write_foreign_code  # noqa: F401
from tests.test_interpolation import fitted_code  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def head_of(model, key: str):
    """The Gaussians of one identity (training name or code.pt) in FLAME's canonical frame, as the library makes
    them (code_cloud on the canonical geometry, colour residual included)."""
    from utils.codes import code_cloud
    from utils.interpolation import canonical_vertices, resolve_key

    k = resolve_key(model, key, torch.device("cpu"))
    with torch.no_grad():
        return code_cloud(model, k.w, canonical_vertices(model.template_base, k.base_vertices), k.colour)


def assert_same_cloud(a, b, atol: float = 1e-5) -> None:
    if a.device.type != b.device.type:  # the viewer's network runs on the GPU when there is one
        a, b, atol = a.to("cpu"), b.to("cpu"), max(atol, 1e-4)
    for name in ("means", "scales", "opacities", "sh"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=atol), name
    assert torch.allclose(a.quats.abs(), b.quats.abs(), atol=1e-4)  # q and -q are the same rotation


def settle(v, **values) -> None:
    """Set controls as a page would, then wait until the head is served."""
    for name, value in values.items():
        v.controls[name].value = value
    assert v.wait_idle(60), "the viewer did not finish its update"


def served_matches(v, cloud) -> None:
    """What the page receives (viser's buffer) is ``cloud`` in the display frame."""
    want = v.frame.splats(cloud)
    assert np.allclose(v.splats.centers, want["centers"], atol=1e-5)
    assert np.abs(v.splats.rgbs.astype(int) - np.rint(want["rgbs"] * 255).astype(int)).max() <= 1


@pytest.fixture(scope="module")
def viewer(fit_model, fitted_code, tmp_path_factory):  # noqa: F811
    from utils.viewer import HeadViewer, ViewerConfig

    logs: list[str] = []
    cfg = ViewerConfig(checkpoint=str(fit_model), code_dir=str(fitted_code.parent.parent), port=0, device="auto",
                       ply_dir=str(tmp_path_factory.mktemp("viewer_ply")))
    v = HeadViewer(cfg, log=logs.append)
    v.logs = logs
    assert v.wait_idle(60)
    yield v
    v.close()


@pytest.fixture(scope="module")
def model(fit_model):  # noqa: F811
    from utils.model_io import load_model

    return load_model(fit_model)


# ------------------------------------------------------------------------------------------------ controls
def test_starts_on_the_first_identity_with_codes_found(viewer, model, fitted_code):  # noqa: F811
    assert viewer.url.startswith("http://127.0.0.1:")
    options = viewer.controls["a"].options
    assert options == tuple(model.identities) + (str(fitted_code),)  # the code.pt found under --code_dir
    assert viewer.shown[1].a == model.identities[0]
    assert_same_cloud(viewer.cloud, head_of(model, model.identities[0]))
    served_matches(viewer, viewer.cloud)
    assert f"{model.field.num_gaussians:,} Gaussians" in viewer.controls["stats"].content
    assert "last update" in viewer.controls["stats"].content


def test_identity_switch(viewer, model, fitted_code):  # noqa: F811
    settle(viewer, blend=0.0, truncation=1.0)
    for key in (model.identities[1], str(fitted_code), model.identities[0]):
        before = viewer.splats.centers.copy()
        settle(viewer, a=key)
        want = head_of(model, key)  # a code.pt brings its colour residual
        assert_same_cloud(viewer.cloud, want)
        served_matches(viewer, want)
        assert not np.allclose(viewer.splats.centers, before, atol=1e-4)


@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_blend_end_points_are_the_two_identities(viewer, model, fitted_code, method):  # noqa: F811
    a, b = model.identities[0], str(fitted_code)  # z space meets w space: the blend runs in w
    settle(viewer, a=a, b=b, method=method, truncation=1.0, blend=1.0)
    assert_same_cloud(viewer.cloud, head_of(model, b), atol=1e-4)
    settle(viewer, blend=0.5)
    mid = viewer.cloud
    settle(viewer, blend=0.0)
    assert_same_cloud(viewer.cloud, head_of(model, a), atol=1e-4)
    assert not torch.allclose(mid.means.cpu(), viewer.cloud.means.cpu(), atol=1e-4)
    settle(viewer, b=model.identities[1], blend=1.0)  # two training identities: the blend runs in z
    assert_same_cloud(viewer.cloud, head_of(model, model.identities[1]), atol=1e-4)
    served_matches(viewer, viewer.cloud)


def test_slerp_and_linear_differ_midway(viewer, model):
    settle(viewer, a=model.identities[0], b=model.identities[1], truncation=1.0, blend=0.5, method="slerp")
    s = viewer.cloud
    settle(viewer, method="linear")
    assert not torch.allclose(s.sh.cpu(), viewer.cloud.sh.cpu(), atol=1e-5)


def test_truncation_zero_is_the_average_style(viewer, model, fitted_code):  # noqa: F811
    from utils.codes import code_cloud
    from utils.interpolation import canonical_vertices, resolve_key

    for key in (model.identities[1], str(fitted_code)):
        settle(viewer, a=key, blend=0.0, truncation=0.0)
        base = canonical_vertices(model.template_base, resolve_key(model, key, torch.device("cpu")).base_vertices)
        with torch.no_grad():
            want = code_cloud(model, model.field.mapping.w_avg, base)  # no colour residual at psi = 0
        assert_same_cloud(viewer.cloud, want)
        served_matches(viewer, want)
    settle(viewer, truncation=1.0)
    assert_same_cloud(viewer.cloud, head_of(model, str(fitted_code)))


def test_burst_of_slider_updates_coalesces(viewer, model, monkeypatch):
    """A drag's events arrive on a thread pool while the network runs: one run at a time, stale values skipped, the
    last value served."""
    import utils.viewer as uv

    settle(viewer, a=model.identities[0], b=model.identities[1], method="slerp", truncation=1.0, blend=0.0)
    gate, entered, active, overlap = threading.Event(), threading.Event(), [0], []
    real = uv.identity_head

    def slow_head(*args, **kwargs):  # the first run is held until the whole burst has arrived
        active[0] += 1
        overlap.append(active[0])
        entered.set()
        gate.wait(30)
        try:
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(uv, "identity_head", slow_head)
    runs0 = viewer.network_runs
    slider = viewer.controls["blend"]
    values = [round(0.01 * (i + 1), 2) for i in range(100)]
    slider.value = values[0]
    assert entered.wait(30)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # like viser's callback pool
        list(pool.map(lambda x: setattr(slider, "value", x), values[1:]))
    gate.set()
    assert viewer.wait_idle(60)
    assert viewer.network_runs - runs0 == 2  # the held run, then one run for all 99 later values
    assert max(overlap) == 1  # never two network runs at once
    assert viewer.shown[1].blend == slider.value
    monkeypatch.setattr(uv, "identity_head", real)

    # unhindered and in order, as a fast drag sends them: ends on the last value after a few runs
    runs0 = viewer.network_runs
    for x in reversed(values[:-1]):
        slider.value = x
    assert viewer.wait_idle(60)
    assert viewer.shown[1].blend == values[0]
    from utils.interpolation import resolve_key

    a, b = (resolve_key(model, k, torch.device("cpu")) for k in model.identities[:2])
    with torch.no_grad():
        assert_same_cloud(viewer.cloud, uv.identity_head(model, a, b, values[0], "slerp", 1.0))
    assert viewer.network_runs - runs0 <= 10, viewer.network_runs - runs0


def test_save_ply_button(viewer, model):
    from models.gaussians import GaussianCloud

    settle(viewer, a=model.identities[1], blend=0.0, truncation=1.0)
    viewer.controls["save_ply"].value = True  # a click
    path = Path(viewer.cfg.ply_dir) / f"head_{model.identities[1]}.ply"
    assert path.is_file() and str(path) in viewer.messages[0]
    back = GaussianCloud.load_ply(path)
    assert torch.allclose(back.means, viewer.cloud.means.cpu(), atol=1e-6)
    assert torch.allclose(back.rgb, viewer.cloud.rgb.cpu(), atol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_code_files_are_reported_in_the_page(viewer, model, tmp_path):
    settle(viewer, a=model.identities[0], blend=0.0, truncation=1.0)
    runs, shown = viewer.network_runs, viewer.shown
    foreign = write_foreign_code(tmp_path / "foreign" / "code.pt", model)
    for path, words in ((foreign, "code_dim"), (tmp_path / "missing" / "code.pt", "not found"),
                        (REPO / "README.md", "not a readable code file")):
        viewer.controls["code_path"].value = str(path)
        viewer.controls["add_code"].value = True
        assert viewer.wait_idle(60)
        top = viewer.messages[0]
        assert top.startswith("**Error:**") and str(path) in top and words in top, top
        assert str(path) in viewer.controls["messages"].content
        assert any(str(path) in line and "error" in line for line in viewer.logs)  # and in the terminal
        assert str(path) not in viewer.controls["a"].options
    assert viewer.shown is shown and viewer.network_runs == runs  # the head on screen stays
    settle(viewer, a=model.identities[1])  # and the server keeps serving
    assert viewer.shown[1].a == model.identities[1]


def test_add_good_code_file_selects_it(viewer, model, fitted_code, tmp_path):  # noqa: F811
    copy = tmp_path / "p2" / "code.pt"
    copy.parent.mkdir()
    shutil.copy(fitted_code, copy)
    viewer.controls["code_path"].value = str(copy)
    viewer.controls["add_code"].value = True
    assert viewer.wait_idle(60)
    assert str(copy) in viewer.controls["a"].options and viewer.shown[1].a == str(copy)
    assert_same_cloud(viewer.cloud, head_of(model, str(fitted_code)))


def test_missing_or_foreign_model_keeps_the_server_up(fit_model, tmp_path):  # noqa: F811
    from utils.viewer import HeadViewer, ViewerConfig

    logs: list[str] = []
    v = HeadViewer(ViewerConfig(checkpoint=str(tmp_path / "none" / "model.pt"), code_dir="", port=0, device="cpu",
                                codes=[str(tmp_path / "gone.pt")]), log=logs.append)
    try:
        assert v.wait_idle(60) and v.shown is None
        assert "No model loaded" in v.controls["stats"].content
        page = v.controls["messages"].content
        assert "model file not found" in page and str(tmp_path / "none" / "model.pt") in page
        assert any("model file not found" in line for line in logs)
        with urllib.request.urlopen(v.url, timeout=30) as r:  # the page is still served
            assert r.status == 200
        bad = tmp_path / "foreign.pt"
        torch.save({"format": "something-else"}, bad)
        v.controls["model_path"].value = str(bad)
        v.controls["load_model"].value = True
        assert v.wait_idle(60) and "is not an identity-field model.pt" in v.messages[0]
        v.controls["model_path"].value = str(fit_model)  # then the right file, from the page
        v.controls["load_model"].value = True
        assert v.wait_idle(60) and v.shown is not None and v.network_runs == 1
        assert "gone.pt" in "".join(v.messages) and "not found" in "".join(v.messages)  # --codes checked then
    finally:
        v.close()


# ------------------------------------------------------------------------------------------------ safe defaults
def test_loopback_by_default_warns_otherwise_and_never_shares(viewer):
    from utils.viewer import ViewerConfig, is_loopback

    assert ViewerConfig().host == "127.0.0.1" and viewer.server.get_host() == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    n = len(viewer.logs)
    assert viewer.server.request_share_url() is None  # what a page's share request calls: refused, no connection
    assert len(viewer.logs) == n + 1 and "share links are disabled" in viewer.logs[-1]
    assert "share links are disabled" in viewer.messages[0]


def test_other_host_prints_a_warning(tmp_path):
    from utils.viewer import HeadViewer, ViewerConfig

    logs: list[str] = []
    v = HeadViewer(ViewerConfig(checkpoint=str(tmp_path / "none.pt"), code_dir="", host="0.0.0.0", port=0,
                                device="cpu"), log=logs.append)
    try:
        assert any("WARNING" in line and "anyone" in line for line in logs)
        assert v.url.startswith("http://127.0.0.1:")
    finally:
        v.close()


def test_help_documents_every_flag(capsys):
    import viewer

    with pytest.raises(SystemExit):
        viewer.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--codes", "--code_dir", "--host", "--port", "--device", "--ply_dir", "--method"):
        assert flag in text, flag


def test_run_viewer_sh_prints_the_address_and_serves(fit_model, tmp_path):  # noqa: F811
    proc = subprocess.Popen(["bash", str(REPO / "run_viewer.sh"), "--checkpoint", str(fit_model), "--port", "0",
                             "--code_dir", "", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, start_new_session=True)
    try:
        url, lines, end = None, [], time.monotonic() + 120
        while url is None and time.monotonic() < end:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("[viewer]") and " on http://127.0.0.1:" in line:
                url = line.split(" on ")[1].split()[0]
        assert url, "".join(lines)
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# ------------------------------------------------------------------------------------------------ real browser
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # software WebGL (no GPU)
    "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
    "--disable-sync",  # the machine's network is closed: no background connections
]
VIEWPORT = {"width": 1200, "height": 640}  # wide enough that the control panel leaves the head free


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the browser test needs Chromium: apt-get install -y chromium (.ci/run installs it), or set "
                    "CHROMIUM=/path/to/chromium")
    return path


def screenshot(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(np.float32) / 255.0


def head_region(img: np.ndarray) -> np.ndarray:
    """The middle of the canvas, where the head is (left of the control panel)."""
    h, w = img.shape[:2]
    return img[int(0.1 * h):int(0.9 * h), w // 2 - int(0.3 * h):w // 2 + int(0.3 * h)]


def skin_fraction(img: np.ndarray) -> float:
    """Fraction of head-region pixels with a skin-like colour (warm: r > g > b, not dark, not grey)."""
    r, g, b = np.moveaxis(head_region(img), -1, 0)
    return float(((r > 0.25) & (r > g) & (g > b) & (r - b > 0.08)).mean())


def blocks(img: np.ndarray, k: int = 8) -> np.ndarray:
    """Grey levels averaged over k x k blocks, flattened: the picture without its pixel-level detail (thin Gaussians
    draw fine stripes whose exact pixels differ between rasterizers)."""
    h, w = (s - s % k for s in img.shape[:2])
    return img[:h, :w].mean(-1).reshape(h // k, k, w // k, k).mean((1, 3)).ravel()


def poll(page, ok, timeout: float = 40.0) -> np.ndarray:
    """Screenshots until ``ok(image)`` holds for two equal screenshots in a row (software WebGL takes a while to draw
    the first frame, and the page fades in)."""
    end = time.monotonic() + timeout
    prev, img = None, screenshot(page)
    while time.monotonic() < end and not (ok(img) and prev is not None and np.abs(img - prev).max() < 2 / 255):
        time.sleep(0.3)
        prev, img = img, screenshot(page)
    return img


def reference_render(viewer, width: int, height: int) -> np.ndarray:
    """The served head through the page's initial camera, by the project's own rasterizer."""
    from models.renderer import render
    from utils.cameras import Camera
    from utils.viewer import VIEW_DISTANCE, VIEW_FOV_DEG

    centre = torch.tensor(viewer.frame.centre, dtype=torch.float32)
    eye = centre + torch.tensor([0.0, 0.0, VIEW_DISTANCE / viewer.frame.scale])
    f = 0.5 * height / math.tan(math.radians(VIEW_FOV_DEG) / 2)
    cam = Camera.look_at(eye.tolist(), centre.tolist(), [0.0, 1.0, 0.0], width, height, fx=f, fy=f)
    with torch.no_grad():
        return render(viewer.cloud.to("cpu"), cam)["image"].clamp(0, 1).numpy()


def test_page_in_headless_chromium_shows_the_head_and_follows_a_slider(viewer, model, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright (requirements-dev.txt); it drives the "
                    "system Chromium, so no `playwright install` is needed")
    from PIL import Image

    settle(viewer, a=model.identities[0], b=model.identities[1], blend=0.0, truncation=1.0, method="slerp")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(viewer.url, timeout=30_000)
            first = poll(page, lambda im: skin_fraction(im) > 0.05)
            assert skin_fraction(first) > 0.05, f"no head in the page (skin-like fraction {skin_fraction(first):.3f})"
            # the browser draws what the project's rasterizer draws from the same camera
            ref = reference_render(viewer, VIEWPORT["width"], VIEWPORT["height"])
            corr = np.corrcoef(blocks(head_region(first)), blocks(head_region(ref)))[0, 1]
            mae = np.abs(blocks(head_region(first)) - blocks(head_region(ref))).mean()
            assert corr > 0.9 and mae < 0.03, (corr, mae)  # measured: 0.9999 and 0.001

            notice = page.locator(".mantine-Notification-closeButton")  # "software WebGL" notice: off the picture
            if notice.count():
                notice.first.click()
            shot = tmp_path / "viewer.png"
            page.screenshot(path=str(shot))
            if os.environ.get("VIEWER_SCREENSHOT"):  # README's picture: VIEWER_SCREENSHOT=docs/viewer.png pytest ...
                Image.open(shot).quantize(64).save(os.environ["VIEWER_SCREENSHOT"], optimize=True)

            # drag the A -> B slider to the right end with the mouse
            thumb = page.locator("[role=slider]").first
            box = thumb.bounding_box()
            track = thumb.evaluate("e => { const r = e.parentElement.getBoundingClientRect(); return r.width; }")
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            page.mouse.move(x, y)
            page.mouse.down()
            for k in range(1, 11):
                page.mouse.move(x + k * 0.11 * track, y)
            page.mouse.up()
            end = time.monotonic() + 30
            while viewer.controls["blend"].value != 1.0 and time.monotonic() < end:
                time.sleep(0.1)
            assert viewer.controls["blend"].value == 1.0
            assert viewer.wait_idle(60) and viewer.shown[1].blend == 1.0
            assert_same_cloud(viewer.cloud, head_of(model, model.identities[1]), atol=1e-4)

            def changed(im):
                return np.abs(head_region(im) - head_region(first)).mean() > 0.02 and skin_fraction(im) > 0.05
            after = poll(page, changed)
            assert changed(after), (np.abs(head_region(after) - head_region(first)).mean(), skin_fraction(after))
            assert not errors, errors
        finally:
            browser.close()
