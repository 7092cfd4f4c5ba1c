"""The viewer's page: :class:`HeadViewer`, a viser server whose controls drive a :class:`ViewerSession` (session.py:
model, identities, the coalesced network update) behind the token gate of access.py.

The page's controls: identities A and B (training identities and code.pt files), the A -> B blend and its method,
truncation, the pose and expression sliders with a keyframe dropdown (hidden without the model's FLAME files), a
Files folder to add a code.pt or load another model.pt (only inside the model's folder and --code_dir), Save PLY, and
the messages (newest first).  Callbacks never compute: they ask the session's worker for an update (session.py says
why), which reads the controls' current values through :meth:`HeadViewer._state`.
"""
from __future__ import annotations

import math
import secrets
import threading
from typing import Callable

import numpy as np

from models.level_of_detail import lod_mode
from utils.apps.viewer.access import is_loopback, serve_gated
from utils.apps.viewer.session import ViewerSession
from utils.apps.viewer.state import (
    NO_MODEL,
    POSE_CONTROLS,
    PRESET_PROMPT,
    VIEW_DISTANCE,
    VIEW_FOV_DEG,
    ViewerConfig,
    ViewState,
    keyframe_pose,
)
from utils.identity import METHODS
from utils.motion import KEYFRAMES


class HeadViewer(ViewerSession):
    """A viser server showing a trained identity field (see session.py for the update, access.py for the gate).

    Test hooks (besides ViewerSession's): ``controls`` (name -> viser handle; setting ``.value`` from Python runs the
    callbacks as a page event would; pose sliders are named as in POSE_CONTROLS), ``splats`` (the viser handle of
    the head in the page), ``token`` and ``url``.
    """

    def __init__(self, cfg: ViewerConfig, log: Callable[[str], None] | None = None) -> None:
        try:
            import viser  # imported here: nothing else in the project needs the web server stack
        except ImportError as exc:
            raise ImportError(f"the viewer needs viser ({exc}); install it with: pip install -r requirements.txt") \
                from exc

        super().__init__(cfg, log)
        if not is_loopback(cfg.host):
            self._log(f"[viewer] WARNING: serving on {cfg.host}: anyone who can reach this machine on the network can "
                      f"open the viewer (and save PLYs on this machine); use --host 127.0.0.1 and an SSH tunnel "
                      f"(ssh -L {cfg.port}:127.0.0.1:{cfg.port} host) to keep it private")
        self.token = secrets.token_urlsafe(16)  # this session's: in the printed URL, required by every request
        self.server = serve_gated(lambda: viser.ViserServer(host=cfg.host, port=cfg.port, label="Identity field",
                                                            verbose=False), self.token, cfg.host)
        # Never contact viser's public share service: the page's share button is hidden, and a share request that a
        # page sends anyway (the server handles them on its thread pool) is refused here.
        self.server.request_share_url = self._refuse_share  # type: ignore[method-assign]
        self.server.gui.configure_theme(show_share_button=False, show_logo=False)
        self.server.scene.set_up_direction("+y")  # FLAME's canonical frame: y up, the face looks along +z
        cam = self.server.initial_camera
        cam.position, cam.look_at, cam.up = (0.0, 0.0, VIEW_DISTANCE), (0.0, 0.0, 0.0), (0.0, 1.0, 0.0)
        cam.fov = np.radians(VIEW_FOV_DEG)
        # black behind the head, as in the face-masked training photos the model learnt from
        self.server.scene.set_background_image(np.zeros((8, 8, 3), np.uint8), format="png")

        # --lod auto: the view of the client that moved last picks the level (a view change re-sends a cached level)
        self._view_client = None
        if lod_mode(cfg.lod) == "auto":
            self.server.on_client_connect(self._watch_view)
        self._controls_lock = threading.RLock()  # a keyframe sets several sliders at once: the worker reads them after
        self.splats = None
        self.controls: dict = {}
        self._build_gui()
        # the last valid value of each control (restored when a client sends one that is not: _slider)
        self._good: dict[str, float | str] = {name: h.value for name, h in self.controls.items()
                                               if name in ("blend", "truncation", "method")
                                               or name in {pc.name for pc in POSE_CONTROLS}}
        self.start()

    @property
    def url(self) -> str:
        host = self.server.get_host()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{self.server.get_port()}/{self.token}/"

    def close(self) -> None:
        super().close()
        self.server.stop()

    # ------------------------------------------------------------------------------------------ GUI
    def _build_gui(self) -> None:
        gui, c = self.server.gui, self.controls
        c["stats"] = gui.add_markdown("starting ...")
        with gui.add_folder("Identity"):
            c["a"] = gui.add_dropdown("A", options=(NO_MODEL,), hint="a training identity or a fitted code.pt")
            c["b"] = gui.add_dropdown("B", options=(NO_MODEL,), hint="the identity to blend towards")
            c["blend"] = gui.add_slider("A → B", min=0.0, max=1.0, step=0.01, initial_value=0.0,
                                        hint="0 shows A, 1 shows B")
            c["method"] = gui.add_dropdown("blend", options=METHODS, initial_value=self.cfg.method,
                                           hint="linear or spherical (slerp) interpolation of the codes")
            c["truncation"] = gui.add_slider("truncation ψ", min=0.0, max=1.0, step=0.01, initial_value=1.0,
                                             hint="1 = the identity, 0 = the average style")
        # Pose sliders: hidden until the FLAME files of the loaded model are found (_setup_pose), never dead controls.
        c["pose_folder"] = gui.add_folder("Pose", visible=False)
        with c["pose_folder"]:
            c["preset"] = gui.add_dropdown("keyframe", options=(PRESET_PROMPT,) + tuple(KEYFRAMES),
                                           hint="sets every pose slider to a built-in keyframe (utils/motion.py); "
                                                "neutral resets them")
            for pc in (pc for pc in POSE_CONTROLS if pc.target != "expression"):
                c[pc.name] = gui.add_slider(pc.label, min=pc.low, max=pc.high, step=pc.step, initial_value=0.0,
                                            hint=pc.hint)
        c["expression_folder"] = gui.add_folder("Expression", visible=False)
        with c["expression_folder"]:
            for pc in (pc for pc in POSE_CONTROLS if pc.target == "expression"):
                c[pc.name] = gui.add_slider(pc.label, min=pc.low, max=pc.high, step=pc.step, initial_value=0.0,
                                            hint=pc.hint)
        with gui.add_folder("Files", expand_by_default=False):
            c["code_path"] = gui.add_text("code.pt", initial_value="", hint="path of a code.pt written by track.py")
            c["add_code"] = gui.add_button("Add code.pt")
            c["model_path"] = gui.add_text("model.pt", initial_value=self.cfg.checkpoint)
            c["load_model"] = gui.add_button("Load model")
        c["save_ply"] = gui.add_button("Save PLY", hint=f"writes the head on screen into {self.cfg.ply_dir}/")
        c["messages"] = gui.add_markdown("")

        for name in ("a", "b", "blend", "method", "truncation") + tuple(pc.name for pc in POSE_CONTROLS):
            c[name].on_update(lambda _event: self.request())
        c["preset"].on_update(lambda _event: self._apply_keyframe(c["preset"].value))
        c["add_code"].on_click(lambda _e: self.submit(lambda p=c["code_path"].value: self._add_code(
            p, select=True, from_page=True)))
        c["load_model"].on_click(lambda _e: self.submit(lambda p=c["model_path"].value: self._load_model(
            p, from_page=True)))
        c["save_ply"].on_click(lambda _e: self.save_ply())

    def _state(self) -> ViewState | None:
        """The controls' current values (None: no model, or A or B not offered); bad values are put back (_slider)."""
        c = self.controls
        with self._controls_lock:
            if self.model is None or c["a"].value not in self.sources or c["b"].value not in self.sources:
                return None
            if c["method"].value in METHODS:
                self._good["method"] = c["method"].value
            else:
                self._reject("method", c["method"].value)
            names = ("blend", "truncation") + (() if self.animator is None else tuple(pc.name for pc in POSE_CONTROLS))
            values = {name: self._slider(name) for name in names}
            pose = () if self.animator is None else tuple(values[pc.name] for pc in POSE_CONTROLS)
            return ViewState(self.sources[c["a"].value], self.sources[c["b"].value], values["blend"],
                             str(c["method"].value), values["truncation"], pose)

    def _slider(self, name: str) -> float:
        """A slider's value if it is a finite number inside the slider's range; else (a page or websocket client can
        send anything, e.g. NaN, which gave a NaN head saved under a clean name) the slider is put back to its
        last good value, the page says so, and that value is used."""
        h = self.controls[name]
        try:
            v = float(h.value)
        except (TypeError, ValueError):
            v = math.nan
        if math.isfinite(v) and h.min <= v <= h.max:
            self._good[name] = v
            return v
        return self._reject(name, h.value)

    def _reject(self, name: str, value) -> float | str:
        good = self._good.get(name, METHODS[0] if name == "method" else 0.0)
        self._message(f"ignored {name} = {str(value)[:40]!r}: not a value of this control; kept {good!r}",
                      error=True)
        self.controls[name].value = good
        return good

    def _apply_keyframe(self, name: str) -> None:
        """Set every pose slider to keyframe ``name`` at once (one head served for all), then rest the dropdown."""
        if name not in KEYFRAMES:
            return
        try:
            values = keyframe_pose(KEYFRAMES[name])
        except ValueError as exc:
            self._message(str(exc), error=True)
            return
        with self._controls_lock:
            for pc, v in zip(POSE_CONTROLS, values):
                self.controls[pc.name].value = v
        self.controls["preset"].value = PRESET_PROMPT  # so that the same keyframe can be picked again

    def _refuse_share(self, verbose: bool = True) -> None:
        self._message("share links are disabled in this viewer (it never contacts an outside server)", error=True)
        return None

    def _watch_view(self, client) -> None:
        """A client connected (--lod auto): every move of its view asks the worker to re-pick the level."""
        def moved(_camera) -> None:
            self._view_client = client
            self.request()

        client.camera.on_update(moved)

    # ------------------------------------------------------------------------------------------ the session's hooks
    def _view_camera(self):
        """The view of the client that moved last, in the canonical frame (None before any client reported one)."""
        client, frame = self._view_client, self.frame
        if client is None or frame is None:
            return None
        cam = client.camera
        if cam.image_height <= 0 or cam.image_width <= 0:
            return None
        return frame.camera(cam.position, cam.look_at, cam.up_direction, cam.fov, cam.image_width, cam.image_height)

    def _show_splats(self, splats: dict[str, np.ndarray]) -> None:
        if self.splats is None:
            self.splats = self.server.scene.add_gaussian_splats("/head", **splats)
        else:
            self.splats.set_gaussians(**splats)

    def _show_stats(self, text: str) -> None:
        self.controls["stats"].content = text

    def _show_messages(self) -> None:
        self.controls["messages"].content = "\n\n".join(self.messages)

    def _show_pose_controls(self, visible: bool) -> None:
        for name in ("pose_folder", "expression_folder"):
            self.controls[name].visible = visible

    def _select_a(self, label: str) -> None:
        self.controls["a"].value = label

    def _refresh_sources(self) -> None:
        labels = tuple(self.sources)
        for i, name in enumerate(("a", "b")):
            h = self.controls[name]
            keep = h.value if h.value in self.sources else labels[min(i, len(labels) - 1)]
            h.options = labels
            h.value = keep
