"""The interactive browser viewer behind viewer.py: a viser server that shows the Gaussians of a trained identity
field in the page and lets the user pick, blend and truncate identities.

One update::

    page controls --(read on the worker thread)--> ViewState
        --network--> GaussianCloud in FLAME's canonical frame (metres): keys resolved (training identity or code.pt),
                     code/style interpolated (linear or slerp), truncated towards the average style, code_cloud()
        --display frame--> splats in the page (viser's set_gaussians: 32 bytes a Gaussian on the wire)

Threading: viser runs a control's callbacks on a thread pool, so a fast slider drag delivers many events at once, in
any order.  Callbacks never compute: they bump a request counter and return.  ONE worker thread serves the requests:
it reads the controls' *current* values (so the latest value wins whatever order the events ran in), runs the network
once, sends the splats, and goes round again only if newer requests arrived meanwhile.  So at most one update runs at
a time, a drag never queues stale work, and the last head served is the one of the controls' final values.  Model
loads and added code files run on the same thread, between updates.

Display frame: every head is shown in FLAME's canonical frame (so switching or blending identities never moves the
head away from the camera), centred on the template's bounding box and scaled to a template radius of 1.  The scale
matters: viser sends covariances as float16, and the variance of a millimetre-sized Gaussian (1e-6 m^2) is a float16
subnormal with a few bits of precision; in head-radius units it is about 1e-4.  Colour is the SH DC term
(view-independent; viser 1.1 takes no spherical harmonics).

Pose sliders (expression, jaw, eyes, neck, head pose; :data:`POSE_CONTROLS`) drive the head through the FLAME pose
path (models/posing.py), in two stages::

    identity  ViewState.identity (keys, blend, method, truncation) --utils/apps/animate/pipeline.py mixed_identity--> a
              PosableIdentity: the network runs ONCE (style blended and truncated, FLAME shape and geometry offsets
              blended), cached until the identity changes
    pose      ViewState.pose (the sliders) --pose_params--> FlameParams --HeadAnimator.gaussians--> the head
              (FLAME face-mask rows, subdivision, attachment; no network)

so a pose slider never re-runs the network, and an identity change runs it once and keeps the pose.  The head stays
in FLAME's canonical frame (its model space: head rotation I, translation 0, scale 1, i.e. the identity's own
placement and scale are dropped as the canonical frame of the network-only path drops them); the head-pose sliders
are FLAME's global rotation (Euler XYZ angles, as the tracking files' ``rotation``) about that frame's origin, so
they turn the head visibly in the page.  All sliders at 0 is FLAME's neutral face of the identity's shape.  The pose
path needs the FLAME files the model was trained with (model.pt does not embed FLAME); they are found as animate.py
finds them (``--flame_dir``, default: the model's training data's, else data/).  Without them the page shows no pose
sliders and says why, and every head is the network's output on the identity's own vertices brought into the
canonical frame by a similarity (:func:`identity_head`).
"""
from __future__ import annotations

import ipaddress
import math
import os
import secrets
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from models.flame import EULER_CONVENTION, FlameParams
from models.gaussians import GaussianCloud
from models.geometry import head_pose
from models.posing import HeadAnimator, PosableIdentity
from utils.core.config import Range
from utils.core.device import resolve_device, synchronize
from utils.data.code_file import FittedCode, code_cloud
from utils.data.model_file import TrainedModel, load_model
from utils.identity import (
    METHODS,
    IdentityKey,
    blend_style,
    canonical_vertices,
    identity_key,
    key_label,
    lerp,
    load_flame,
    mixed_identity,
    model_flame_dir,
    resolve_key,
)
from utils.motion import KEYFRAMES, Keyframe, keyframe_params

NO_MODEL = "(no model loaded)"
MAX_MESSAGES = 6  # messages kept in the page (newest first)
VIEW_FOV_DEG = 40.0  # the page's initial camera: vertical field of view (viser's default, 75, distorts a close head)
VIEW_DISTANCE = 3.6  # ... and distance from the head's centre in template radii (the head fills about 3/4 of the height)
PRESET_PROMPT = "(pick a keyframe)"  # the keyframe dropdown's resting value: picking a keyframe sets the sliders


@dataclass(frozen=True)
class PoseControl:
    """One pose slider: sets the entries ``index`` of the FlameParams field ``target`` to its value ("rotation": the
    head's Euler XYZ angles (pitch, yaw, roll)).  Rotations are shown in degrees (FLAME takes radians)."""

    name: str
    label: str
    target: str  # expression, jaw, neck, eyes or rotation
    index: tuple[int, ...]
    low: float
    high: float
    step: float
    hint: str

    @property
    def degrees(self) -> bool:
        return self.target != "expression"


# The handful of pose sliders (README "Viewer").  Expression coefficients mean what the FLAME's expression basis means:
# on the embedded synthetic FLAME components 0-4 are mouth open, smile, brows raise, frown, pucker; on FLAME 2023
# they are PCA components without such names (utils/motion.py).  Joints (jaw, neck, eyes, head) mean the same on
# every FLAME: x right-to-left of the subject, y up, z out of the face.
_SYNTHETIC_EXPRESSIONS = ("mouth open", "smile", "brows raise", "frown", "pucker")
POSE_CONTROLS: tuple[PoseControl, ...] = (
    PoseControl("jaw", "jaw open", "jaw", (0,), 0.0, 30.0, 0.5, "jaw opening: FLAME's jaw joint about x, degrees"),
    PoseControl("head_yaw", "head yaw", "rotation", (1,), -60.0, 60.0, 1.0,
                "head pose about y (FLAME's global rotation), degrees; + turns the face to the subject's left"),
    PoseControl("head_pitch", "head pitch", "rotation", (0,), -45.0, 45.0, 1.0,
                "head pose about x (FLAME's global rotation), degrees; + tips the chin down"),
    PoseControl("head_roll", "head roll", "rotation", (2,), -45.0, 45.0, 1.0,
                "head pose about z (FLAME's global rotation), degrees"),
    PoseControl("neck_yaw", "neck yaw", "neck", (1,), -40.0, 40.0, 1.0,
                "the head turned on the neck joint about y, degrees"),
    PoseControl("neck_pitch", "neck pitch", "neck", (0,), -40.0, 40.0, 1.0,
                "the head nodded on the neck joint about x, degrees (+: chin down)"),
    PoseControl("neck_roll", "neck roll", "neck", (2,), -40.0, 40.0, 1.0,
                "the head tilted on the neck joint about z, degrees"),
    PoseControl("eyes_yaw", "eyes yaw", "eyes", (1, 4), -30.0, 30.0, 1.0,
                "both eyeballs about y, degrees (+: look to the subject's left)"),
) + tuple(PoseControl(f"expr{i}", f"expression {i}", "expression", (i,), -3.0, 3.0, 0.05,
                      f"FLAME expression coefficient {i} (on the synthetic FLAME: {n}; on FLAME 2023 a PCA component)")
          for i, n in enumerate(_SYNTHETIC_EXPRESSIONS))


def pose_params(values: Sequence[float], controls: Sequence[PoseControl] = POSE_CONTROLS) -> FlameParams:
    """FlameParams (T = 1, zero shape) of slider ``values`` (one per control, degrees for rotations) in FLAME's
    canonical frame: head rotation from the head sliders, translation 0, scale 1; every other value 0."""
    if len(values) != len(controls):
        raise ValueError(f"pose_params: {len(values)} values for {len(controls)} controls")
    p = FlameParams.neutral(1)
    euler = np.zeros(3)
    for c, v in zip(controls, values):
        v = math.radians(v) if c.degrees else float(v)
        if c.target == "rotation":
            euler[list(c.index)] = v
        else:
            getattr(p, c.target)[0, list(c.index)] = v
    if euler.any():
        from scipy.spatial.transform import Rotation

        p.rotation_matrix[0] = torch.from_numpy(Rotation.from_euler(EULER_CONVENTION, euler).as_matrix()).float()
    return p


def keyframe_pose(key: Keyframe, controls: Sequence[PoseControl] = POSE_CONTROLS) -> tuple[float, ...]:
    """The slider values (one per control) of a keyframe of utils/motion.py (head rotation 0); ValueError when it sets
    FLAME values that the sliders do not cover."""
    want = keyframe_params([key], 1).frame(0)
    values = []
    for c in controls:
        v = 0.0 if c.target == "rotation" else float(getattr(want, c.target)[0, c.index[0]])
        values.append(math.degrees(v) if c.degrees else v)
    got = pose_params(values, controls)
    for name in ("expression", "jaw", "neck", "eyes"):
        if not torch.allclose(getattr(got, name), getattr(want, name), atol=1e-6):
            raise ValueError(f"keyframe {key.name!r} sets FLAME {name} values that the viewer's sliders do not cover")
    return tuple(values)


@dataclass
class ViewerConfig:
    """Settings of viewer.py."""

    checkpoint: str = "output/cpu/model.pt"  # trained model.pt (written by train.py)
    codes: list[str] = field(default_factory=list)  # code.pt files of track.py to offer besides the training identities
    code_dir: str = "output/tracking"  # folder searched (recursively) for code.pt files to offer ("" = none)
    host: str = "127.0.0.1"  # address to serve on; anything but a loopback address lets others on the network connect
    port: int = 8080  # port to serve on (if taken, viser takes the next free one; 0 = any free port)
    device: str = "auto"  # where the network runs: auto (GPU when there is one), cpu, cuda or cuda:N
    ply_dir: str = "output/viewer"  # the page's "Save PLY" button writes here
    method: str = "slerp"  # initial interpolation method: linear or slerp (spherical)
    flame_dir: str = ""  # FLAME files of the model, for the pose sliders ("" = found as animate.py finds them)

    RANGES = {"port": Range(0, 65535)}  # checked with utils.core.config.check_ranges before the server starts


VIEWER_LISTS = ("codes",)


@dataclass(frozen=True)
class ViewState:
    """The controls' values that determine the head (a snapshot read on the worker thread)."""

    a: str  # identity key A: a training identity name or a code.pt path
    b: str  # identity key B
    blend: float  # 0 = A, 1 = B
    method: str  # linear or slerp
    truncation: float  # psi: 1 = the identity, 0 = the average style
    pose: tuple[float, ...] = ()  # pose slider values in POSE_CONTROLS order (empty without the pose path)

    @property
    def identity(self) -> tuple:
        """The fields the network's output depends on (the pose is not one of them)."""
        return (self.a, self.b, self.blend, self.method, self.truncation)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_codes(code_dir: str | Path) -> list[Path]:
    """code.pt files under ``code_dir`` (recursively, sorted); none when the folder does not exist."""
    root = Path(code_dir) if code_dir else None
    return sorted(root.rglob("code.pt")) if root is not None and root.is_dir() else []


def identity_head(model: TrainedModel, a: FittedCode, b: FittedCode, blend: float, method: str,
                  truncation: float) -> GaussianCloud:
    """The Gaussians (N, unbatched) of identities a and b blended at ``blend`` (0 = a, 1 = b) and truncated towards
    the average style by ``truncation`` (psi: 1 = none, 0 = the average style ``w_avg``), in FLAME's canonical frame.

    Codes are interpolated with ``method`` in z when both keys have a latent code, else in w; the canonical geometry
    and the colour residual linearly.  Truncation acts on the style and scales the colour residual (which corrects
    the fitted style) with it; the geometry is the identity's FLAME shape and stays."""
    w, colour = blend_style(model, a, b, blend, method, truncation)
    base = lerp(*(canonical_vertices(model.template_base, k.base_vertices) for k in (a, b)), blend)
    return code_cloud(model, w, base, colour)


class DisplayFrame:
    """Canonical metres -> page units: centred on the template's bounding box, template radius 1 (module docstring)."""

    def __init__(self, template: Tensor) -> None:
        centre, _, radius = head_pose(template, template)
        self.centre = centre.double().numpy()
        self.scale = 1.0 / max(radius, 1e-9)

    def splats(self, cloud: GaussianCloud) -> dict[str, np.ndarray]:
        """Arguments of viser's add_gaussian_splats / set_gaussians: centers (N, 3), covariances (N, 3, 3),
        rgbs (N, 3) in [0, 1], opacities (N, 1)."""
        c = cloud.detach().to("cpu", torch.float64)
        return {"centers": ((c.means.numpy() - self.centre) * self.scale).astype(np.float32),
                "covariances": (c.covariances().numpy() * self.scale ** 2).astype(np.float32),
                "rgbs": c.rgb.clamp(0, 1).numpy().astype(np.float32),
                "opacities": c.opacities.numpy()[:, None].astype(np.float32)}


# ---------------------------------------------------------------------------------------------- access control
# viser accepts a websocket from any page and any local process: a web page the user visits could connect to
# http://127.0.0.1:8080 and drive the viewer (open files, load a model.pt).  Every request must carry a per-session
# token in its path (the URL the viewer prints: http://host:port/<token>/), and a websocket from a browser must come
# from a page served by this server (its Origin is the Host it connected to, and that host is one this server is
# served as).  viser 1.1.1 has no hook for this: its websockets server is created with a process_request function
# of its own; ``_token_gate`` wraps it for the duration of the ViserServer constructor (which returns only once the
# server is listening), so every handshake passes the gate first.
_SERVE_PATCH = threading.Lock()


def _forbidden(text: str):
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    body = (text + "\n").encode()
    return Response(403, "Forbidden", Headers({"Content-Type": "text/plain; charset=utf-8",
                                                "Content-Length": str(len(body))}), body)


def _host_name(netloc: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:8080' -> '::1', 'localhost' -> 'localhost' (lower case)."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]")[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def check_request(path: str, headers, token: str, host: str) -> tuple[str | None, str]:
    """(refusal or None, the path with the token removed) for one HTTP or websocket request to the viewer.

    ``path``: the request target; ``headers``: its headers (Host, Origin, Upgrade); ``token``: the session token;
    ``host``: the address the server binds (--host).  Refused: a path that does not start with /<token>; a Host that
    is not a name of this server (DNS rebinding: a page of another site whose name resolves to 127.0.0.1), unless it
    binds every interface; a browser websocket (it always sends Origin) whose Origin is not http://<Host>."""
    import hmac
    from urllib.parse import urlsplit

    target, _, query = path.partition("?")
    first, _, rest = target.lstrip("/").partition("/")
    if not hmac.compare_digest(first.encode(), token.encode()):
        return "this viewer needs the address it printed (http://host:port/<session token>/)", path
    hosts, origins = _all(headers, "Host"), _all(headers, "Origin")
    if len(hosts) != 1 or len(origins) > 1:
        return "malformed request (one Host header, at most one Origin)", path
    req_host, origin = hosts[0], (origins[0] if origins else None)
    if host not in ("0.0.0.0", "::", "") and _host_name(req_host) not in _served_names(host):
        return f"unknown host {req_host!r}", path
    if headers.get("Upgrade", "").lower() == "websocket" and origin is not None:
        o = urlsplit(origin)
        if o.scheme not in ("http", "https") or o.netloc.lower() != req_host.lower():
            return f"websocket from another origin ({origin!r}) refused", path
    return None, "/" + rest + (f"?{query}" if query else "")


def _all(headers, name: str) -> list[str]:
    return list(headers.get_all(name)) if hasattr(headers, "get_all") else \
        ([headers[name]] if headers.get(name) is not None else [])


def _served_names(host: str) -> set[str]:
    names = {host.lower().strip("[]")}
    if is_loopback(host):
        names |= {"127.0.0.1", "localhost", "::1"}
    return names


def _token_gate(token: str, host: str):
    """A replacement of websockets.asyncio.server.serve that puts :func:`check_request` in front of viser's own
    process_request (the static page), handing it the path without the token."""
    import dataclasses as dc

    import websockets.asyncio.server as wss

    real = wss.serve

    def serve(handler, *args, process_request=None, **kwargs):
        def gate(connection, request):
            refusal, path = check_request(request.path, request.headers, token, host)
            if refusal is not None:
                return _forbidden(f"identity-field viewer: {refusal}")
            if process_request is None:
                return None
            return process_request(connection, dc.replace(request, path=path))

        return real(handler, *args, process_request=gate, **kwargs)

    return real, serve


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside one of ``roots``."""
    try:
        real = Path(os.path.realpath(path))
    except (OSError, ValueError):
        return False
    return any(real == r or real.is_relative_to(r) for r in roots)


def page_error(exc: BaseException, kind: str) -> str:
    """What the page says about a file that could not be used: a fixed phrase per kind of failure, never the
    loader's own text (which can quote a file's bytes); the terminal gets the full message."""
    from utils.core.io import UnsafeFileError

    if isinstance(exc, FileNotFoundError):
        return "not found"
    if isinstance(exc, UnsafeFileError):
        return "refused: it holds Python objects, not only tensors (loading it could run code)"
    if isinstance(exc, (ValueError, KeyError, IndexError)):
        return f"not a {kind} that fits (details in the terminal)"
    return f"cannot be read as a {kind} (details in the terminal)"


class HeadViewer:
    """A viser server showing a trained identity field (see the module docstring).

    Test hooks: ``controls`` (name -> viser handle; setting ``.value`` from Python runs the callbacks as a page event
    would; pose sliders are named as in POSE_CONTROLS), :meth:`wait_idle`, ``network_runs`` (updates that ran the
    network), ``updates`` (heads served), ``animator`` (the pose path; None without FLAME files), ``cloud`` (the head
    served last, canonical metres), ``splats`` (the viser handle of the head in the page), ``messages``.
    """

    def __init__(self, cfg: ViewerConfig, log: Callable[[str], None] | None = None) -> None:
        try:
            import viser  # imported here: nothing else in the project needs the web server stack
        except ImportError as exc:
            raise ImportError(f"the viewer needs viser ({exc}); install it with: pip install -r requirements.txt") \
                from exc

        if cfg.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {cfg.method!r}")
        self.cfg = cfg
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.device = resolve_device(cfg.device)
        if not is_loopback(cfg.host):
            self._log(f"[viewer] WARNING: serving on {cfg.host}: anyone who can reach this machine on the network can "
                      f"open the viewer (and save PLYs on this machine); use --host 127.0.0.1 and an SSH tunnel "
                      f"(ssh -L {cfg.port}:127.0.0.1:{cfg.port} host) to keep it private")
        self.token = secrets.token_urlsafe(16)  # this session's: in the printed URL, required by every request
        import websockets.asyncio.server as wss

        with _SERVE_PATCH:  # viser creates its websockets server inside the constructor: gate it (_token_gate)
            real, wss.serve = _token_gate(self.token, cfg.host)
            try:
                self.server = viser.ViserServer(host=cfg.host, port=cfg.port, label="Identity field", verbose=False)
            finally:
                wss.serve = real
        # files the page may name (Files folder): inside the model's folder and --code_dir only
        self.file_roots = [Path(os.path.realpath(Path(cfg.checkpoint).parent))] + \
            ([Path(os.path.realpath(cfg.code_dir))] if cfg.code_dir else [])
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

        self.model: TrainedModel | None = None
        self.frame: DisplayFrame | None = None
        self.sources: dict[str, str] = {}  # dropdown label -> key (training identity name or code.pt path)
        self._keys: dict[str, FittedCode] = {}  # resolved keys of the current model
        self.animator: HeadAnimator | None = None  # the pose path of the current model (None: no FLAME files)
        self._pose_keys: dict[str, IdentityKey] = {}  # keys resolved for the pose path (no network)
        self._controls_lock = threading.RLock()  # a keyframe sets several sliders at once: the worker reads them after
        self.shown: tuple[GaussianCloud, ViewState] | None = None  # the head in the page and its state
        self.splats = None
        self.messages: list[str] = []
        self._msg_lock = threading.Lock()
        self.network_runs = 0
        self.updates = 0
        # (ViewState.identity, network output: a PosableIdentity, or a GaussianCloud without the pose path), cached
        self._identity: tuple[tuple, PosableIdentity | GaussianCloud] | None = None
        self._cond = threading.Condition()
        self._requested = 0
        self._served = 0
        self._jobs: list[Callable[[], None]] = []
        self._closing = False

        self.controls: dict = {}
        self._build_gui()
        # the last valid value of each control (restored when a client sends one that is not: _slider)
        self._good: dict[str, float | str] = {name: h.value for name, h in self.controls.items()
                                               if name in ("blend", "truncation", "method")
                                               or name in {pc.name for pc in POSE_CONTROLS}}
        self._given_codes = list(cfg.codes) + [str(p) for p in find_codes(cfg.code_dir)]  # offered with any model
        self._load_model(cfg.checkpoint)
        self._worker = threading.Thread(target=self._serve_forever, name="viewer-worker", daemon=True)
        self._worker.start()
        self.request()

    # ------------------------------------------------------------------------------------------ public
    @property
    def url(self) -> str:
        host = self.server.get_host()
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else (f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{self.server.get_port()}/{self.token}/"

    @property
    def cloud(self) -> GaussianCloud | None:
        """The head served last (canonical frame, metres)."""
        return None if self.shown is None else self.shown[0]

    def request(self) -> None:
        """Ask the worker for an update (cheap; any thread)."""
        with self._cond:
            self._requested += 1
            self._cond.notify_all()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on the worker thread before the next update (model loads, added code files)."""
        with self._cond:
            self._jobs.append(job)
        self.request()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every update requested so far is served; False on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._served < self._requested:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout=30)
        self.server.stop()

    def save_ply(self) -> Path | None:
        """Write the head on screen (canonical frame, metres) as a 3DGS PLY into ``cfg.ply_dir``."""
        shown = self.shown
        if shown is None:
            self._message("nothing to save: no head is shown", error=True)
            return None
        cloud, state = shown
        name = key_label(state.a)
        if state.blend > 0:
            name += f"_{key_label(state.b)}_{state.method}{state.blend:.2f}"
        if state.truncation < 1:
            name += f"_psi{state.truncation:.2f}"
        name += "".join(f"_{c.name}{v:g}" for c, v in zip(POSE_CONTROLS, state.pose) if v)
        path = Path(self.cfg.ply_dir) / f"head_{name}.ply"
        try:
            cloud.save_ply(path)
        except OSError as exc:
            self._message(f"cannot write {path}: {exc}", error=True)
            return None
        self._message(f"saved {len(cloud):,} Gaussians to {path}")
        return path

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

    def _message(self, text: str, error: bool = False, detail: str = "") -> None:
        """Show ``text`` in the page (newest first) and print it to the terminal, with ``detail`` (a loader's own
        message, which can quote a file's bytes) in the terminal only."""
        self._log(f"[viewer] {'error: ' if error else ''}{text}{f' ({detail})' if detail else ''}")
        with self._msg_lock:
            self.messages = ([f"**Error:** {text}" if error else text] + self.messages)[:MAX_MESSAGES]
            self.controls["messages"].content = "\n\n".join(self.messages)

    def _refuse_share(self, verbose: bool = True) -> None:
        self._message("share links are disabled in this viewer (it never contacts an outside server)", error=True)
        return None

    # ------------------------------------------------------------------------------------------ worker jobs
    def _page_path_allowed(self, path: str, kind: str) -> bool:
        """A path typed in the page must lie inside the model's folder or --code_dir (checked before the file is
        touched, so the page learns nothing about files elsewhere); False after saying so."""
        if path and _inside(Path(path), self.file_roots):
            return True
        self._message(f"cannot open {path or 'an empty path'} as a {kind}: the page may open files only inside "
                      f"{' or '.join(str(r) for r in self.file_roots)} (the model's folder and --code_dir)",
                      error=True)
        return False

    def _load_model(self, path: str, from_page: bool = False) -> None:
        """Load model.pt; on success offer its identities, the code files of the command line and those added in the
        page (each checked against this model).  ``from_page``: typed in the page (restricted to the model's folder
        and --code_dir)."""
        path = str(path).strip()
        if from_page and not self._page_path_allowed(path, "model.pt"):
            return
        try:
            model = load_model(path, self.device)
        except Exception as exc:  # the server must stay up: report any failure of a user-given file
            self._message(f"cannot load the model {path}: {page_error(exc, 'model.pt written by train.py')}",
                          error=True, detail=str(exc))
            if self.model is None:
                self.controls["stats"].content = f"**No model loaded** ({path}); train one with `bash run_training.sh`"
            return
        old_codes = [k for k in self.sources.values() if k not in (self.model.identities if self.model else [])]
        self.model, self.frame = model, DisplayFrame(model.template_base)
        self._keys, self._pose_keys, self._identity, self.shown = {}, {}, None, None
        self._setup_pose(model)
        self.sources = {name: name for name in model.identities}
        for p in dict.fromkeys(self._given_codes + old_codes):
            self._add_code(p, select=False, refresh=False)
        self._refresh_sources()
        self._message(f"loaded {path}: {len(model.identities)} training identities, "
                      f"{len(self.sources) - len(model.identities)} fitted codes, "
                      f"{model.field.num_gaussians:,} Gaussians, network on {self.device}")

    def _setup_pose(self, model: TrainedModel) -> None:
        """The pose path of ``model`` (its FLAME files, found as animate.py finds them): pose sliders shown; without
        the files (or with other ones) no pose sliders, and the page says why."""
        flame_dir = model_flame_dir(model, self.cfg.flame_dir)
        try:
            self.animator = HeadAnimator(model.field, load_flame(model, flame_dir), model.mask_ids, model.plan)
        except Exception as exc:  # the viewer works without the pose path: say why it is off
            self.animator = None
            self._message(f"no expression / jaw / head-pose sliders: {exc}")
        for name in ("pose_folder", "expression_folder"):
            self.controls[name].visible = self.animator is not None

    def _add_code(self, path: str, select: bool, refresh: bool = True, from_page: bool = False) -> None:
        """Offer a code.pt (checked against the model now, so a bad file is reported when it is given).
        ``from_page``: typed in the page (restricted to the model's folder and --code_dir)."""
        path = str(path).strip()
        if from_page and path and not self._page_path_allowed(path, "code.pt"):
            return
        if self.model is None:
            self._message(f"cannot add {path or 'a code.pt'}: no model is loaded", error=True)
            return
        if not path:
            self._message("type the path of a code.pt first", error=True)
            return
        try:
            if not Path(path).is_file():
                raise FileNotFoundError(f"fitted code not found: {path} (a code.pt written by track.py)")
            key = resolve_key(self.model, path, self.device)
            self._keys[path] = key
            if self.animator is not None:
                self._pose_key(path)  # now, so that a file the pose path cannot use is reported when it is given
        except Exception as exc:  # the server must stay up: report any failure of a user-given file
            self._keys.pop(path, None)
            self._message(f"cannot use {path}: {page_error(exc, 'code.pt written by track.py for this model')}",
                          error=True, detail=str(exc))
            return
        self.sources[path] = path
        if refresh:
            self._refresh_sources()
            self._message(f"added {path}")
        if select:
            self.controls["a"].value = path

    def _refresh_sources(self) -> None:
        labels = tuple(self.sources)
        for i, name in enumerate(("a", "b")):
            h = self.controls[name]
            keep = h.value if h.value in self.sources else labels[min(i, len(labels) - 1)]
            h.options = labels
            h.value = keep

    # ------------------------------------------------------------------------------------------ updates
    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while self._served >= self._requested and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                target, jobs, self._jobs = self._requested, self._jobs, []
            for job in jobs:
                try:
                    job()
                except Exception as exc:  # keep serving whatever a job ran into
                    self._message(f"a request failed ({type(exc).__name__})", error=True, detail=str(exc))
            try:
                self._update()
            except Exception as exc:  # keep serving: the next change may well work
                self._message(f"update failed ({type(exc).__name__})", error=True, detail=str(exc))
            with self._cond:
                self._served = max(self._served, target)
                self._cond.notify_all()

    def _key(self, key: str) -> FittedCode:
        if key not in self._keys:
            self._keys[key] = resolve_key(self.model, key, self.device)
        return self._keys[key]

    def _pose_key(self, key: str) -> IdentityKey:
        """``key`` resolved for the pose path (cached); warnings (older files: FLAME fitted by least squares) are
        shown in the page."""
        if key not in self._pose_keys:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._pose_keys[key] = identity_key(self.animator, self.model, key, self.device, self._key(key))
            for w in caught:
                self._message(str(w.message))
        return self._pose_keys[key]

    def _network(self, state: ViewState) -> PosableIdentity | GaussianCloud:
        """The network's part of the head of ``state`` (runs the network once)."""
        with torch.no_grad():
            if self.animator is None:
                return identity_head(self.model, self._key(state.a), self._key(state.b), state.blend, state.method,
                                     state.truncation)
            return mixed_identity(self.animator, self.model, self._pose_key(state.a), self._pose_key(state.b),
                                  state.blend, state.method, state.truncation)

    def _posed(self, identity: PosableIdentity | GaussianCloud, state: ViewState) -> GaussianCloud:
        """The identity's head in the pose of ``state`` (canonical frame; FLAME, subdivision and attachment only).
        Eager rather than a CUDA graph (HeadAnimator.graphed): a graph is captured per identity, and a blend or
        truncation drag makes a new identity at every event."""
        if self.animator is None:
            return identity
        with torch.no_grad():
            return self.animator.gaussians(identity, pose_params(state.pose))[0]

    def _update(self) -> None:
        state = self._state()
        if state is None or (self.shown is not None and self.shown[1] == state):
            return
        t0 = time.perf_counter()
        ran = self._identity is None or self._identity[0] != state.identity
        if ran:  # the network runs only for a new identity
            self._identity = (state.identity, self._network(state))
            self.network_runs += 1
            synchronize(self.device)
        t1 = time.perf_counter()
        cloud = self._posed(self._identity[1], state)
        synchronize(self.device)
        t2 = time.perf_counter()
        splats = self.frame.splats(cloud)
        if self.splats is None:
            self.splats = self.server.scene.add_gaussian_splats("/head", **splats)
        else:
            self.splats.set_gaussians(**splats)
        self.shown = (cloud, state)
        self.updates += 1
        total = time.perf_counter() - t0
        parts = [f"network {(t1 - t0) * 1e3:.1f} ms" if ran else "network not run"]
        if self.animator is not None:
            parts.append(f"pose {(t2 - t1) * 1e3:.1f} ms")
        self.controls["stats"].content = (f"**{len(cloud):,} Gaussians** · last update {total * 1e3:.1f} ms "
                                          f"({', '.join(parts)}, {self.device.type})")
