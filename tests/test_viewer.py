"""The browser viewer (utils/apps/viewer/, viewer.py, run_viewer.sh): controls -> served Gaussians from Python
(identity controls run the network, pose sliders only the FLAME pose path), update coalescing, errors in the page, safe
defaults, and the page itself in a real headless Chromium."""
from __future__ import annotations

import concurrent.futures
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_fitting import fit_model, write_foreign_code  # noqa: F401
from tests.test_interpolation import fitted_code  # noqa: F401
from utils.apps.viewer.browser import CHROMIUM_ARGS, MISSING, VIEWPORT, find_chromium, screenshot

REPO = Path(__file__).resolve().parents[1]


def flat_head(model, key: str):
    """Without the pose path: the Gaussians of one identity (training name or code.pt) in FLAME's canonical frame, as
    the library makes them (code_cloud on the identity's vertices brought into the canonical frame, colour residual
    included)."""
    from utils.data.code_file import code_cloud
    from utils.identity import canonical_vertices, resolve_key

    k = resolve_key(model, key, torch.device("cpu"))
    with torch.no_grad():
        return code_cloud(model, k.w, canonical_vertices(model.template_base, k.base_vertices), k.colour)


def head_of(rig, key: str, params=None):
    """With the pose path: one identity (training name or code.pt) as animate.py poses it (utils/identity.py posable:
    the network once, then HeadAnimator.gaussians) with FLAME parameters ``params`` (default: the neutral
    face in FLAME's canonical frame, i.e. head rotation I, translation 0, scale 1)."""
    from models.flame import FlameParams
    from utils.identity import posable

    model, animator = rig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's code.pt predates stored FLAME parameters (least squares)
        head = posable(animator, model, key, torch.device("cpu"))[0]
    with torch.no_grad():
        return animator.gaussians(head, FlameParams.neutral(1) if params is None else params)[0]


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
    from utils.apps.viewer import HeadViewer, ViewerConfig

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
    from utils.data.model_file import load_model

    return load_model(fit_model)


@pytest.fixture(scope="module")
def rig(model):
    """(model, HeadAnimator) with the model's FLAME files, found as the viewer finds them."""
    from models.posing import HeadAnimator
    from utils.identity import load_flame, model_flame_dir

    return model, HeadAnimator.from_model(model, load_flame(model, model_flame_dir(model, "")))


def neutral() -> dict[str, float]:
    from utils.apps.viewer import POSE_CONTROLS

    return {pc.name: 0.0 for pc in POSE_CONTROLS}


@pytest.fixture
def posing(viewer):
    """The viewer, with its pose sliders back at 0 afterwards (the viewer is shared by the module's tests)."""
    yield viewer
    settle(viewer, **neutral())


def yaw(degrees: float) -> torch.Tensor:
    """(3, 3) rotation about FLAME's y axis (up)."""
    from models.flame import axis_angle_to_matrix

    return axis_angle_to_matrix(torch.tensor([0.0, math.radians(degrees), 0.0]))


def count_network_calls(viewer, monkeypatch) -> list:
    """A list that grows by one per call of the network (IdentityField.synthesize_raw) on the viewer's worker thread
    from now on (the tests' reference heads run it too, on the test's thread)."""
    calls: list = []
    cls = type(viewer.model.field)
    real = cls.synthesize_raw

    def counted(self, w):
        if threading.current_thread() is viewer._worker:
            calls.append(1)
        return real(self, w)

    monkeypatch.setattr(cls, "synthesize_raw", counted)
    return calls


# ------------------------------------------------------------------------------------------------ controls
def test_starts_on_the_first_identity_with_codes_found(viewer, rig, fitted_code):  # noqa: F811
    model = rig[0]
    assert viewer.url.startswith("http://127.0.0.1:")
    options = viewer.controls["a"].options
    assert options == tuple(model.identities) + (str(fitted_code),)  # the code.pt found under --code_dir
    assert viewer.shown[1].a == model.identities[0]
    assert_same_cloud(viewer.cloud, head_of(rig, model.identities[0]))
    served_matches(viewer, viewer.cloud)
    assert f"{model.field.num_gaussians:,} Gaussians" in viewer.controls["stats"].content
    assert "last update" in viewer.controls["stats"].content
    # the model's FLAME files were found: pose sliders shown; the fixture's code.pt predates stored FLAME parameters,
    # so its FLAME shape was fitted by least squares, which the page says
    assert viewer.animator is not None
    assert viewer.controls["pose_folder"].visible and viewer.controls["expression_folder"].visible
    assert any("least squares" in line and str(fitted_code) in line for line in viewer.logs)


def test_identity_switch(viewer, rig, fitted_code):  # noqa: F811
    model = rig[0]
    settle(viewer, blend=0.0, truncation=1.0)
    for key in (model.identities[1], str(fitted_code), model.identities[0]):
        before = viewer.splats.centers.copy()
        settle(viewer, a=key)
        want = head_of(rig, key)  # a code.pt brings its colour residual
        assert_same_cloud(viewer.cloud, want)
        served_matches(viewer, want)
        assert not np.allclose(viewer.splats.centers, before, atol=1e-4)


@pytest.mark.parametrize("method", ["slerp", "linear"])
def test_blend_end_points_are_the_two_identities(viewer, rig, fitted_code, method):  # noqa: F811
    model = rig[0]
    a, b = model.identities[0], str(fitted_code)  # z space meets w space: the blend runs in w
    settle(viewer, a=a, b=b, method=method, truncation=1.0, blend=1.0)
    assert_same_cloud(viewer.cloud, head_of(rig, b), atol=1e-4)
    settle(viewer, blend=0.5)
    mid = viewer.cloud
    settle(viewer, blend=0.0)
    assert_same_cloud(viewer.cloud, head_of(rig, a), atol=1e-4)
    assert not torch.allclose(mid.means.cpu(), viewer.cloud.means.cpu(), atol=1e-4)
    settle(viewer, b=model.identities[1], blend=1.0)  # two training identities: the blend runs in z
    assert_same_cloud(viewer.cloud, head_of(rig, model.identities[1]), atol=1e-4)
    served_matches(viewer, viewer.cloud)


def test_slerp_and_linear_differ_midway(viewer, model):
    settle(viewer, a=model.identities[0], b=model.identities[1], truncation=1.0, blend=0.5, method="slerp")
    s = viewer.cloud
    settle(viewer, method="linear")
    assert not torch.allclose(s.sh.cpu(), viewer.cloud.sh.cpu(), atol=1e-5)


def test_truncation_zero_is_the_average_style(viewer, rig, fitted_code):  # noqa: F811
    from models.flame import FlameParams
    from utils.identity import identity_key

    model, animator = rig
    for key in (model.identities[1], str(fitted_code)):
        settle(viewer, a=key, blend=0.0, truncation=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = identity_key(animator, model, key, torch.device("cpu"))
        with torch.no_grad():  # the average style on the identity's geometry, no colour residual at psi = 0
            head = animator.identity(model.field.mapping.w_avg, k.base, k.code.base_vertices)
            want = animator.gaussians(head, FlameParams.neutral(1))[0]
        assert_same_cloud(viewer.cloud, want)
        served_matches(viewer, want)
    settle(viewer, truncation=1.0)
    assert_same_cloud(viewer.cloud, head_of(rig, str(fitted_code)))


def held_burst(viewer, monkeypatch, held: str, slider: str, values: list[float]) -> int:
    """Set control ``slider`` to values[0] and hold the worker inside ``utils.apps.viewer.session.<held>`` (the
    worker's update calls it through that module) until values[1:] have all been set from a thread pool (like viser's
    callback pool), then let it go and wait until the viewer is idle.  Returns the most calls of ``held`` that ran at
    once."""
    import utils.apps.viewer.session as session

    gate, entered, active, overlap = threading.Event(), threading.Event(), [0], []
    real = getattr(session, held)

    def slow(*args, **kwargs):  # the first call is held until the whole burst has arrived
        active[0] += 1
        overlap.append(active[0])
        entered.set()
        gate.wait(30)
        try:
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(session, held, slow)
    handle = viewer.controls[slider]
    handle.value = values[0]
    assert entered.wait(30)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda x: setattr(handle, "value", x), values[1:]))
    gate.set()
    assert viewer.wait_idle(60)
    monkeypatch.setattr(session, held, real)
    return max(overlap)


def fast_drag(viewer, slider: str, values: list[float]) -> None:
    """Set control ``slider`` to each value in turn from this thread, as fast as a drag sends them; wait until idle."""
    for x in values:
        viewer.controls[slider].value = x
    assert viewer.wait_idle(60)


def test_burst_of_slider_updates_coalesces(viewer, rig, monkeypatch):
    """A drag's events arrive on a thread pool while the network runs: one run at a time, stale values skipped, the
    last value served."""
    from models.flame import FlameParams
    from utils.identity import identity_key, mixed_identity

    model, animator = rig
    settle(viewer, a=model.identities[0], b=model.identities[1], method="slerp", truncation=1.0, blend=0.0)
    runs0 = viewer.network_runs
    values = [round(0.01 * (i + 1), 2) for i in range(100)]
    assert held_burst(viewer, monkeypatch, "mixed_identity", "blend", values) == 1  # never two network runs at once
    assert viewer.network_runs - runs0 == 2  # the held run, then one run for all 99 later values
    assert viewer.shown[1].blend == viewer.controls["blend"].value

    # unhindered and in order, as a fast drag sends them: ends on the last value after a few runs
    runs0 = viewer.network_runs
    fast_drag(viewer, "blend", values[-2::-1])
    assert viewer.shown[1].blend == values[0]
    a, b = (identity_key(animator, model, k, torch.device("cpu")) for k in model.identities[:2])
    with torch.no_grad():
        head = mixed_identity(animator, model, a, b, values[0], "slerp", 1.0)
        assert_same_cloud(viewer.cloud, animator.gaussians(head, FlameParams.neutral(1))[0])
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


# ------------------------------------------------------------------------------------------------ pose sliders
def test_pose_sliders_follow_the_pose_path_without_the_network(posing, rig, monkeypatch):
    """Pose sliders -> FLAME parameters (degrees -> radians, Euler XYZ head rotation in the canonical frame) -> the
    head of HeadAnimator.gaussians, with no network run."""
    from models.flame import FlameParams

    model, animator = rig
    v = posing
    settle(v, a=model.identities[1], b=model.identities[0], blend=0.0, truncation=1.0, **neutral())
    calls, runs, neutral_head = count_network_calls(v, monkeypatch), v.network_runs, v.cloud
    settle(v, jaw=12.0, neck_pitch=10.0, eyes_yaw=-8.0, expr1=1.2, expr3=-0.7)
    want = FlameParams.neutral(1)
    want.jaw[0, 0], want.neck[0, 0], want.eyes[0, [1, 4]] = math.radians(12), math.radians(10), math.radians(-8)
    want.expression[0, 1], want.expression[0, 3] = 1.2, -0.7
    assert_same_cloud(v.cloud, head_of(rig, model.identities[1], want))
    served_matches(v, v.cloud)
    assert not torch.allclose(v.cloud.means.cpu(), neutral_head.means.cpu(), atol=1e-4)
    assert "network not run" in v.controls["stats"].content and "pose" in v.controls["stats"].content

    # the head-pose sliders turn the head about the canonical frame's origin: a rigid rotation of the whole head
    settle(v, **neutral())
    assert_same_cloud(v.cloud, neutral_head)
    settle(v, head_yaw=30.0)
    assert torch.allclose(v.cloud.means.cpu(), neutral_head.means.cpu() @ yaw(30.0).T, atol=1e-6)
    assert torch.allclose(v.cloud.scales.cpu(), neutral_head.scales.cpu(), rtol=1e-4)
    assert float(v.cloud.means[:, 0].mean() - neutral_head.means[:, 0].mean()) > 0.005  # the face turns to +x
    assert calls == [] and v.network_runs == runs  # none of this ran the network


def test_jaw_opens_the_lower_face_and_leaves_the_forehead(posing, rig):
    model = rig[0]
    v = posing
    settle(v, a=model.identities[0], blend=0.0, truncation=1.0, **neutral())
    closed = v.cloud.means.cpu()
    settle(v, jaw=20.0)
    moved = (v.cloud.means.cpu() - closed).norm(dim=-1)
    y = closed[:, 1]
    lower, upper = y < torch.quantile(y, 0.2), y > torch.quantile(y, 0.5)
    # measured: the lowest fifth moves 8 mm on average (up to 27 mm at the chin), the upper half not at all
    assert float(moved[lower].mean()) > 0.003, float(moved[lower].mean())
    assert float(moved[upper].max()) < 1e-6, float(moved[upper].max())


def test_identity_changes_keep_the_pose_and_run_the_network_once(posing, rig, fitted_code, monkeypatch):  # noqa: F811
    from models.flame import FlameParams

    model = rig[0]
    v = posing
    settle(v, a=model.identities[0], b=model.identities[1], blend=0.0, truncation=1.0, method="linear")
    settle(v, jaw=15.0, head_yaw=-20.0, expr2=1.0)
    pose = v.shown[1].pose
    want = FlameParams.neutral(1)
    want.jaw[0, 0], want.expression[0, 2] = math.radians(15), 1.0
    want.rotation_matrix[0] = yaw(-20.0)
    calls = count_network_calls(v, monkeypatch)
    for key in (model.identities[1], str(fitted_code)):
        runs = v.network_runs
        settle(v, a=key)
        assert v.network_runs == runs + 1 and v.shown[1].pose == pose
        assert_same_cloud(v.cloud, head_of(rig, key, want))
    assert len(calls) == 2  # one network call per identity switch
    for change in ({"blend": 0.4}, {"truncation": 0.5}):  # blends and truncation: one network run each, same pose
        runs, n = v.network_runs, len(calls)
        settle(v, **change)
        assert v.network_runs == runs + 1 and len(calls) == n + 1 and v.shown[1].pose == pose


def test_burst_of_pose_updates_ends_on_the_last_value(posing, rig, monkeypatch):
    """100 head-yaw events from a thread pool while a pose update is held: one update at a time, then one update for
    the 99 later values, the last value served, the network never run."""
    import utils.apps.viewer as uv
    from models.flame import FlameParams

    model = rig[0]
    v = posing
    settle(v, a=model.identities[0], blend=0.0, truncation=1.0, **neutral())
    runs, updates0 = v.network_runs, v.updates
    values = [round(-49.5 + i, 1) for i in range(100)]
    assert held_burst(v, monkeypatch, "pose_params", "head_yaw", values) == 1
    assert v.updates - updates0 == 2
    last = v.controls["head_yaw"].value
    assert v.shown[1].pose == tuple(last if pc.name == "head_yaw" else 0.0 for pc in uv.POSE_CONTROLS)
    want = FlameParams.neutral(1)
    want.rotation_matrix[0] = yaw(last)
    assert_same_cloud(v.cloud, head_of(rig, model.identities[0], want))

    updates0 = v.updates  # unhindered and in order, as a fast drag sends them
    fast_drag(v, "head_yaw", values[-2::-1])
    assert v.shown[1].pose[[pc.name for pc in uv.POSE_CONTROLS].index("head_yaw")] == values[0]
    assert v.updates - updates0 <= 10, v.updates - updates0  # measured: 2 (2 CPU cores)
    assert v.network_runs == runs


def test_keyframe_dropdown_sets_the_sliders(posing, rig, monkeypatch):
    from utils.apps.viewer import PRESET_PROMPT, keyframe_pose
    from utils.motion import KEYFRAMES, keyframe_params

    model = rig[0]
    v = posing
    for key in KEYFRAMES.values():  # every built-in keyframe is within the sliders' reach
        keyframe_pose(key)
    settle(v, a=model.identities[0], blend=0.0, truncation=1.0, head_yaw=25.0)
    calls, updates0 = count_network_calls(v, monkeypatch), v.updates
    for name in ("open_mouth", "nod", "open_mouth"):  # the same keyframe can be picked again
        settle(v, preset=name)
        assert v.controls["preset"].value == PRESET_PROMPT
        # a keyframe is a whole pose in FLAME's canonical placement (keyframe_params: rotation I): head yaw back to 0
        assert_same_cloud(v.cloud, head_of(rig, model.identities[0], keyframe_params([KEYFRAMES[name]], 1).frame(0)))
    assert v.controls["jaw"].value == pytest.approx(math.degrees(0.25)) and v.controls["expr0"].value == 0.5
    assert calls == [] and v.updates - updates0 <= 6


def test_save_ply_names_the_pose(posing, rig):
    from models.gaussians import GaussianCloud

    model = rig[0]
    v = posing
    settle(v, a=model.identities[0], blend=0.0, truncation=1.0, jaw=10.0)
    v.controls["save_ply"].value = True
    path = Path(v.cfg.ply_dir) / f"head_{model.identities[0]}_jaw10.ply"
    assert path.is_file()
    assert torch.allclose(GaussianCloud.load_ply(path).means, v.cloud.means.cpu(), atol=1e-6)


def test_without_flame_files_no_pose_sliders_and_the_page_says_why(fit_model, model, tmp_path):  # noqa: F811
    from utils.apps.viewer import HeadViewer, ViewerConfig

    logs: list[str] = []
    empty = tmp_path / "no_flame"
    empty.mkdir()
    v = HeadViewer(ViewerConfig(checkpoint=str(fit_model), code_dir="", port=0, device="cpu",
                                flame_dir=str(empty)), log=logs.append)
    try:
        assert v.wait_idle(60) and v.animator is None
        assert not v.controls["pose_folder"].visible and not v.controls["expression_folder"].visible
        page = v.controls["messages"].content
        assert "no expression / jaw / head-pose sliders" in page and "no FLAME model in" in page
        assert "--flame_dir" in page and str(empty) in page
        assert v.shown[1].pose == ()
        assert_same_cloud(v.cloud, flat_head(model, model.identities[0]))  # the network's head, canonical frame
        v.controls["jaw"].value = 20.0  # a hidden slider changes nothing
        assert v.wait_idle(60) and v.shown[1].pose == () and v.updates == 1
        settle(v, a=model.identities[1])
        assert_same_cloud(v.cloud, flat_head(model, model.identities[1]))
    finally:
        v.close()


def test_headless_session_serves_its_view_without_a_page(fit_model, rig, tmp_path):  # noqa: F811
    """ViewerSession (the viewer without viser) serves the head of its ``view``: the page's head, saved as the page
    saves it; importing it starts no web stack."""
    from utils.apps.viewer import POSE_CONTROLS, ViewerConfig, ViewerSession, ViewState

    model = rig[0]
    logs: list[str] = []
    s = ViewerSession(ViewerConfig(checkpoint=str(fit_model), code_dir="", device="cpu", ply_dir=str(tmp_path)),
                      log=logs.append)
    s.start()
    try:
        assert s.wait_idle(60) and s.shown is None and s.animator is not None  # no view yet: nothing served
        s.view = ViewState(model.identities[1], model.identities[0], 0.0, "slerp", 1.0, (0.0,) * len(POSE_CONTROLS))
        s.request()
        assert s.wait_idle(60) and s.network_runs == 1 and s.updates == 1
        assert_same_cloud(s.cloud, head_of(rig, model.identities[1]))
        assert s.save_ply() == tmp_path / f"head_{model.identities[1]}.ply"
    finally:
        s.close()
    code = "import sys, utils.apps.viewer.session; assert 'viser' not in sys.modules, 'viser imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_code_files_are_reported_in_the_page(viewer, model, tmp_path):
    """Bad files inside the allowed folders are reported with a fixed phrase (the loader's own message, which can
    quote a file's bytes, goes to the terminal only); files elsewhere are refused before they are touched."""
    settle(viewer, a=model.identities[0], blend=0.0, truncation=1.0)
    runs, shown = viewer.network_runs, viewer.shown
    inside = Path(viewer.cfg.code_dir) / "bad_codes_test"  # --code_dir: files the page may name
    try:
        foreign = write_foreign_code(inside / "foreign" / "code.pt", model)
        junk = inside / "junk" / "code.pt"
        junk.parent.mkdir(parents=True)
        junk.write_bytes(b"Q" + bytes(100))
        outside = tmp_path / "secret" / "code.pt"
        shutil.copy(foreign, tmp_path / "exists.pt")
        for path, words in ((foreign, "not a code.pt written by track.py for this model that fits"),
                            (inside / "missing" / "code.pt", "not found"),
                            (junk, "(details in the terminal)"),
                            (REPO / "README.md", "the page may open files only inside"),
                            (outside, "the page may open files only inside"),
                            (tmp_path / "exists.pt", "the page may open files only inside")):
            viewer.controls["code_path"].value = str(path)
            viewer.controls["add_code"].value = True
            assert viewer.wait_idle(60)
            top = viewer.messages[0]
            assert top.startswith("**Error:**") and str(path) in top and words in top, top
            assert str(path) in viewer.controls["messages"].content
            assert any(str(path) in line and "error" in line for line in viewer.logs)  # and in the terminal
            assert str(path) not in viewer.controls["a"].options
        page = viewer.controls["messages"].content
        assert "code_dim" not in page and "'Q'" not in page  # the loaders' own words stay in the terminal
        assert any("code_dim" in line for line in viewer.logs)
        # the same phrase whether a file outside exists or not: the page learns nothing about it
        assert viewer.messages[0].replace(str(tmp_path / "exists.pt"), "X") == \
            viewer.messages[1].replace(str(outside), "X")
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    assert viewer.shown is shown and viewer.network_runs == runs  # the head on screen stays
    settle(viewer, a=model.identities[1])  # and the server keeps serving
    assert viewer.shown[1].a == model.identities[1]


def test_add_good_code_file_selects_it(viewer, rig, fitted_code, tmp_path):  # noqa: F811
    copy = Path(viewer.cfg.code_dir) / "p2_copy_test" / "code.pt"
    copy.parent.mkdir()
    try:
        shutil.copy(fitted_code, copy)
        viewer.controls["code_path"].value = str(copy)
        viewer.controls["add_code"].value = True
        assert viewer.wait_idle(60)
        assert str(copy) in viewer.controls["a"].options and viewer.shown[1].a == str(copy)
        assert_same_cloud(viewer.cloud, head_of(rig, str(fitted_code)))
    finally:
        shutil.rmtree(copy.parent)


def test_non_finite_slider_values_are_refused(viewer, model):
    """A page (or a websocket client) can send any number: NaN or out-of-range values put the slider back to its last
    good value and never reach the network (a NaN blend gave an all-NaN head saved under a clean name)."""
    settle(viewer, a=model.identities[0], b=model.identities[1], blend=0.25, truncation=1.0)
    good = viewer.shown
    for name, bad in (("blend", float("nan")), ("truncation", float("inf")), ("blend", 7.0), ("jaw", float("-inf")),
                      ("method", "cubic")):
        viewer.controls[name].value = bad
        assert viewer.wait_idle(60)
        assert "ignored " + name in viewer.messages[0], viewer.messages[0]
        value = viewer.controls[name].value
        assert value == good[1].method if name == "method" else math.isfinite(value), (name, value)
        assert viewer.shown[1] == good[1] and torch.isfinite(viewer.cloud.means).all()
    path = viewer.save_ply()
    assert path is not None and "nan" not in path.name.lower() and "inf" not in path.name.lower()


def test_missing_or_foreign_model_keeps_the_server_up(fit_model, tmp_path):  # noqa: F811
    from utils.apps.viewer import HeadViewer, ViewerConfig

    logs: list[str] = []
    folder = tmp_path / "models"  # the model's folder: the page may open files here
    v = HeadViewer(ViewerConfig(checkpoint=str(folder / "model.pt"), code_dir="", port=0, device="cpu",
                                codes=[str(tmp_path / "gone.pt")]), log=logs.append)
    try:
        assert v.wait_idle(60) and v.shown is None
        assert "No model loaded" in v.controls["stats"].content
        assert v.animator is None and not v.controls["pose_folder"].visible  # no model: no pose sliders either
        page = v.controls["messages"].content
        assert "not found" in page and str(folder / "model.pt") in page
        assert any("model file not found" in line for line in logs)
        with urllib.request.urlopen(v.url, timeout=30) as r:  # the page is still served
            assert r.status == 200
        folder.mkdir()
        bad = folder / "foreign.pt"
        torch.save({"format": "something-else"}, bad)
        v.controls["model_path"].value = str(bad)
        v.controls["load_model"].value = True
        assert v.wait_idle(60) and "not a model.pt written by train.py that fits" in v.messages[0]
        assert any("is not an identity-field model.pt" in line for line in logs)
        v.controls["model_path"].value = str(fit_model)  # a model elsewhere: refused from the page
        v.controls["load_model"].value = True
        assert v.wait_idle(60) and "the page may open files only inside" in v.messages[0] and v.shown is None
        shutil.copy(fit_model, folder / "model.pt")  # then the right file in the model's folder, from the page
        v.controls["model_path"].value = str(folder / "model.pt")
        v.controls["load_model"].value = True
        assert v.wait_idle(60) and v.shown is not None and v.network_runs == 1
        assert v.animator is not None and v.controls["pose_folder"].visible  # its FLAME files found: sliders shown
        assert "gone.pt" in "".join(v.messages) and "not found" in "".join(v.messages)  # --codes checked then
    finally:
        v.close()


# ------------------------------------------------------------------------------------------------ access control
def test_check_request_token_host_and_origin():
    from utils.apps.viewer import check_request

    tok = "T0k3n"
    H = {"Host": "127.0.0.1:8080"}
    assert check_request(f"/{tok}/", H, tok, "127.0.0.1") == (None, "/")
    assert check_request(f"/{tok}/x.js?a=1", H, tok, "127.0.0.1") == (None, "/x.js?a=1")
    ws = {**H, "Upgrade": "websocket"}
    assert check_request(f"/{tok}", {**ws, "Origin": "http://127.0.0.1:8080"}, tok, "127.0.0.1")[0] is None
    assert check_request(f"/{tok}", ws, tok, "127.0.0.1")[0] is None  # no Origin: not a browser, has the token
    for path, headers in (("/", H), ("/x/", H), (f"/{tok}x/", H), (f"/{tok[:-1]}/", H),
                          (f"/{tok}/", {"Host": "evil.example:8080"}),  # DNS rebinding
                          (f"/{tok}", {**ws, "Origin": "http://evil.example"}),
                          (f"/{tok}", {**ws, "Origin": "null"}),
                          (f"/{tok}", {**ws, "Origin": "http://127.0.0.1:9999"})):
        assert check_request(path, headers, tok, "127.0.0.1")[0] is not None, (path, headers)
    # bound to every interface: any Host, but a browser websocket still needs its own origin
    assert check_request(f"/{tok}/", {"Host": "10.0.0.5:8080"}, tok, "0.0.0.0")[0] is None
    assert check_request(f"/{tok}", {"Host": "10.0.0.5:8080", "Upgrade": "websocket",
                                     "Origin": "http://evil.example"}, tok, "0.0.0.0")[0] is not None


def test_live_server_needs_the_token_and_its_own_origin(viewer):
    import urllib.error

    import viser
    from websockets.sync.client import connect

    assert viewer.url.endswith(f"/{viewer.token}/") and len(viewer.token) >= 16
    with urllib.request.urlopen(viewer.url, timeout=30) as r:
        assert r.status == 200
    base = viewer.url.split("/")[2]
    for url in (f"http://{base}/", f"http://{base}/wrong/"):
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(url, timeout=30)
        assert ei.value.code == 403
    proto = [f"viser-v{viser.__version__}"]
    with connect(f"ws://{base}/{viewer.token}", origin=f"http://{base}", subprotocols=proto, open_timeout=30):
        pass
    for path, origin in (("/", f"http://{base}"), (f"/{viewer.token}", "http://evil.example")):
        with pytest.raises(Exception, match="403"):
            with connect(f"ws://{base}{path}", origin=origin, subprotocols=proto, open_timeout=30):
                pass


# ------------------------------------------------------------------------------------------------ safe defaults
def test_loopback_by_default_warns_otherwise_and_never_shares(viewer):
    from utils.apps.viewer import ViewerConfig, is_loopback

    assert ViewerConfig().host == "127.0.0.1" and viewer.server.get_host() == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("myhost")
    n = len(viewer.logs)
    assert viewer.server.request_share_url() is None  # what a page's share request calls: refused, no connection
    assert len(viewer.logs) == n + 1 and "share links are disabled" in viewer.logs[-1]
    assert "share links are disabled" in viewer.messages[0]


def test_other_host_prints_a_warning(tmp_path):
    from utils.apps.viewer import HeadViewer, ViewerConfig

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
    for flag in ("--checkpoint", "--codes", "--code_dir", "--host", "--port", "--device", "--ply_dir", "--method",
                 "--flame_dir", "--lod", "--lod_levels", "--lod_footprint"):
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
        try:  # serving is what is tested, not the shutdown: in the full suite it sometimes outlived a 30 s wait
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# ------------------------------------------------------------------------------------------------ real browser
def chromium_path() -> str:
    path = find_chromium()
    if not path:
        pytest.fail(f"the browser test needs Chromium: {MISSING}")
    return path


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
    from models.camera import Camera
    from models.renderer import render
    from utils.apps.viewer import VIEW_DISTANCE, VIEW_FOV_DEG

    centre = torch.tensor(viewer.frame.centre, dtype=torch.float32)
    eye = centre + torch.tensor([0.0, 0.0, VIEW_DISTANCE / viewer.frame.scale])
    f = 0.5 * height / math.tan(math.radians(VIEW_FOV_DEG) / 2)
    cam = Camera.look_at(eye.tolist(), centre.tolist(), [0.0, 1.0, 0.0], width, height, fx=f, fy=f)
    with torch.no_grad():
        return render(viewer.cloud.to("cpu"), cam)["image"].clamp(0, 1).numpy()


def drag_to_right_end(page, thumb) -> None:
    """Drag a slider's thumb past the right end of its track with the mouse, in steps as a hand would."""
    thumb.scroll_into_view_if_needed()
    box = thumb.bounding_box()
    track = thumb.evaluate("e => { const r = e.parentElement.getBoundingClientRect(); return r.width; }")
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(x + k * 0.11 * track, y)
    page.mouse.up()


def changed(img: np.ndarray, before: np.ndarray) -> bool:
    """The head region differs from ``before`` and still shows a head."""
    return np.abs(head_region(img) - head_region(before)).mean() > 0.02 and skin_fraction(img) > 0.05


def assert_like_reference(img: np.ndarray, viewer) -> None:
    """The page's picture matches the project's rasterizer's render of the served head from the page's camera."""
    ref = reference_render(viewer, VIEWPORT["width"], VIEWPORT["height"])
    corr = np.corrcoef(blocks(head_region(img)), blocks(head_region(ref)))[0, 1]
    mae = np.abs(blocks(head_region(img)) - blocks(head_region(ref))).mean()
    assert corr > 0.9 and mae < 0.03, (corr, mae)  # measured: 0.99997 and 0.0010 (neutral), 0.99998 and 0.0004 (turned)


def test_page_in_headless_chromium_shows_the_head_and_follows_sliders(posing, rig, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install playwright (requirements-dev.txt); it drives the "
                    "system Chromium, so no `playwright install` is needed")
    from PIL import Image

    model, viewer = rig[0], posing
    settle(viewer, a=model.identities[0], b=model.identities[1], blend=0.0, truncation=1.0, method="slerp",
           **neutral())
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
            assert_like_reference(first, viewer)

            notice = page.locator(".mantine-Notification-closeButton")  # "software WebGL" notice: off the picture
            if notice.count():
                notice.first.click()
                page.locator(".mantine-Notification-root").first.wait_for(state="detached", timeout=10_000)
            shot = tmp_path / "viewer.png"
            page.screenshot(path=str(shot))
            if os.environ.get("VIEWER_SCREENSHOT"):  # README's picture: VIEWER_SCREENSHOT=docs/viewer.png pytest ...
                Image.open(shot).quantize(64).save(os.environ["VIEWER_SCREENSHOT"], optimize=True)

            # drag the A -> B slider to the right end with the mouse
            drag_to_right_end(page, page.locator("[role=slider]").first)
            end = time.monotonic() + 30
            while viewer.controls["blend"].value != 1.0 and time.monotonic() < end:
                time.sleep(0.1)
            assert viewer.controls["blend"].value == 1.0
            assert viewer.wait_idle(60) and viewer.shown[1].blend == 1.0
            assert_same_cloud(viewer.cloud, head_of(rig, model.identities[1]), atol=1e-4)
            after = poll(page, lambda im: changed(im, first))
            assert changed(after, first), (np.abs(head_region(after) - head_region(first)).mean(), skin_fraction(after))

            # drag the head-yaw slider (the only one from -60) from its middle to the right end: the head turns in the
            # page as the project's rasterizer draws it, and the network does not run
            runs = viewer.network_runs
            drag_to_right_end(page, page.locator("[role=slider][aria-valuemin='-60']"))
            end = time.monotonic() + 30
            while viewer.controls["head_yaw"].value != 60.0 and time.monotonic() < end:
                time.sleep(0.1)
            assert viewer.controls["head_yaw"].value == 60.0
            assert viewer.wait_idle(60) and viewer.network_runs == runs
            turned = poll(page, lambda im: changed(im, after))
            assert changed(turned, after), np.abs(head_region(turned) - head_region(after)).mean()
            assert_like_reference(turned, viewer)
            assert not errors, errors
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------ --lod
def test_lod_auto_follows_the_view_with_cached_merges(fit_model, model, tmp_path, monkeypatch):  # noqa: F811
    """--lod auto (headless ViewerSession): full detail while no view is known; a far view gets the head merged one
    level down and a near one full detail back, from the merge made once per head (no network, no new merge); a pose
    change merges again; --lod 0 always sends the coarse level; DisplayFrame.camera puts the page's view in metres.
    The small fit model is at level 0, so the session is given it as a level-1 head (lod_quality.py's stand-in)."""
    from benchmarks.lod_quality import field_at_level
    from models.camera import Camera
    from utils.apps.viewer import POSE_CONTROLS, VIEW_DISTANCE, VIEW_FOV_DEG, ViewerConfig, ViewerSession, ViewState

    field, plan = field_at_level(model, 1)
    level1 = replace(model, field=field, plan=plan)
    monkeypatch.setattr("utils.apps.viewer.session.load_model", lambda path, device: level1)
    sent: list[int] = []

    class Recording(ViewerSession):
        def _show_splats(self, splats):
            sent.append(len(splats["centers"]))

    s = Recording(ViewerConfig(checkpoint=str(fit_model), code_dir="", device="cpu", ply_dir=str(tmp_path),
                               lod="auto"), log=lambda _t: None)
    s.start()
    full, coarse = plan.num_vertices(1) * field.K, plan.num_vertices(0)
    try:
        pose = [0.0] * len(POSE_CONTROLS)
        s.view = ViewState(model.identities[0], model.identities[0], 0.0, "slerp", 1.0, tuple(pose))
        s.request()
        assert s.wait_idle(60) and s.shown_level == 1 and sent == [full] and s.lod_merges == 1
        assert len(s.cloud) == full  # the served head (Save PLY) is full detail

        def view(height: int) -> Camera:
            """The page's initial view, in metres through DisplayFrame.camera, ``height`` px high."""
            return s.frame.camera((0.0, 0.0, VIEW_DISTANCE), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0),
                                  np.radians(VIEW_FOV_DEG), height, height)

        small, big = view(64), view(4000)
        depth = float(small.w2c[2, :3] @ torch.as_tensor(s.frame.centre, dtype=torch.float32) + small.w2c[2, 3])
        assert depth == pytest.approx(VIEW_DISTANCE / s.frame.scale, rel=1e-4)
        assert s.lod.footprints(small)[0] < 2.0 < s.lod.footprints(big)[1]
        s.view_camera = small
        s.request()
        assert s.wait_idle(60) and s.shown_level == 0 and sent[-1] == coarse
        s.view_camera = big  # zoomed in: full detail again, from the cache
        s.request()
        assert s.wait_idle(60) and s.shown_level == 1 and sent[-1] == full
        assert s.lod_merges == 1 and s.network_runs == 1 and s.updates == 1 and len(sent) == 3
        pose[[pc.name for pc in POSE_CONTROLS].index("jaw")] = 20.0
        s.view = replace(s.view, pose=tuple(pose))
        s.request()
        assert s.wait_idle(60) and s.lod_merges == 2 and s.network_runs == 1 and sent[-1] == full
    finally:
        s.close()
    fixed = Recording(ViewerConfig(checkpoint=str(fit_model), code_dir="", device="cpu", ply_dir=str(tmp_path),
                                   lod="0"), log=lambda _t: None)
    fixed.start()
    try:
        fixed.view = ViewState(model.identities[0], model.identities[0], 0.0, "slerp", 1.0,
                               (0.0,) * len(POSE_CONTROLS))
        fixed.request()
        assert fixed.wait_idle(60) and fixed.shown_level == 0 and sent[-1] == coarse
    finally:
        fixed.close()
    with pytest.raises(ValueError, match="--lod must be"):
        ViewerSession(ViewerConfig(checkpoint=str(fit_model), lod="coarse"))
