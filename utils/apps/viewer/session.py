"""The viewer's headless part (no viser): the loaded model and the identities it offers, the identity -> pose ->
display pipeline, and the one worker thread that serves updates.  :class:`ViewerSession` runs without a browser; the
viser page (server.py) subclasses it and fills in its hooks (the controls' values, where splats, stats and messages
go).

One update::

    controls --(read on the worker thread: _state)--> ViewState
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

Pose sliders (expression, jaw, eyes, neck, head pose; state.POSE_CONTROLS) drive the head through the FLAME pose
path (models/posing.py), in two stages::

    identity  ViewState.identity (keys, blend, method, truncation) --utils/identity.py mixed_identity--> a
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

import abc
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.gaussians import GaussianCloud
from models.geometry import head_pose
from models.level_of_detail import LevelOfDetail, coarsest_level, parse_lod
from models.posing import HeadAnimator, PosableIdentity
from utils.apps.viewer.access import page_error, path_inside
from utils.apps.viewer.state import MAX_MESSAGES, POSE_CONTROLS, ViewerConfig, ViewState, pose_params
from utils.core.device import resolve_device, synchronize
from utils.data.code_file import FittedCode, code_cloud
from utils.data.model_file import TrainedModel, load_model
from utils.identity import (
    METHODS,
    IdentityKey,
    blend_gaussians,
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
    return code_cloud(model, w, base, colour, blend_gaussians(a, b, blend, truncation))


class DisplayFrame:
    """Canonical metres -> page units: centred on the template's bounding box, template radius 1 (module docstring)."""

    def __init__(self, template: Tensor) -> None:
        centre, _, radius = head_pose(template, template)
        self.centre = centre.double().numpy()
        self.scale = 1.0 / max(radius, 1e-9)

    def camera(self, position: np.ndarray, look_at: np.ndarray, up: np.ndarray, fov_y: float, width: int,
               height: int) -> Camera:
        """The page's view (position, look-at point and up direction (3,) in page units, vertical field of view in
        radians, canvas size in px) as a Camera in the canonical frame (metres), for the level-of-detail pick."""
        eye, target = (np.asarray(v, np.float64) / self.scale + self.centre for v in (position, look_at))
        return Camera.look_at(eye.tolist(), target.tolist(), np.asarray(up, np.float64).tolist(), int(width),
                              int(height), fov_y_deg=float(np.degrees(fov_y)))

    def splats(self, cloud: GaussianCloud) -> dict[str, np.ndarray]:
        """Arguments of viser's add_gaussian_splats / set_gaussians: centers (N, 3), covariances (N, 3, 3),
        rgbs (N, 3) in [0, 1], opacities (N, 1)."""
        c = cloud.detach().to("cpu", torch.float64)
        return {"centers": ((c.means.numpy() - self.centre) * self.scale).astype(np.float32),
                "covariances": (c.covariances().numpy() * self.scale ** 2).astype(np.float32),
                "rgbs": c.rgb.clamp(0, 1).numpy().astype(np.float32),
                "opacities": c.opacities.numpy()[:, None].astype(np.float32)}


class CoalescingWorker(abc.ABC):
    """One worker thread that serves update requests from any thread, coalesced (see the module docstring): requests
    only bump a counter; the worker runs the queued jobs, then ONE :meth:`_update` for every request that arrived
    meanwhile.  Subclasses define :meth:`_update` and :meth:`_failed` (an exception of a job or an update; the worker
    keeps serving)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requested = 0
        self._served = 0
        self._jobs: list[Callable[[], None]] = []
        self._closing = False
        self._worker: threading.Thread | None = None

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

    def _start_worker(self) -> None:
        """Start the worker thread and ask it for a first update."""
        self._worker = threading.Thread(target=self._serve_forever, name="viewer-worker", daemon=True)
        self._worker.start()
        self.request()

    def _stop_worker(self) -> None:
        """Stop the worker (after the job or update it is running)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)

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
                    self._failed("a request", exc)
            try:
                self._update()
            except Exception as exc:  # keep serving: the next change may well work
                self._failed("update", exc)
            with self._cond:
                self._served = max(self._served, target)
                self._cond.notify_all()

    @abc.abstractmethod
    def _update(self) -> None:
        """Serve the newest state (runs on the worker thread, once per batch of requests)."""

    @abc.abstractmethod
    def _failed(self, what: str, exc: Exception) -> None:
        """Report an exception of a job or an update (``what`` names which); the worker keeps serving."""


class ViewerSession(CoalescingWorker):
    """A trained identity field served one head at a time (see the module docstring), without a page.

    The page (server.HeadViewer) overrides the hooks: :meth:`_state` (the controls' values), :meth:`_show_splats`,
    :meth:`_show_stats`, :meth:`_show_messages`, :meth:`_show_pose_controls`, :meth:`_refresh_sources` and
    :meth:`_select_a`.  Headless, the head shown is the one of ``view`` (set it, then :meth:`request`).

    Test hooks: :meth:`wait_idle` (CoalescingWorker), ``network_runs`` (updates that ran the network), ``updates``
    (heads served), ``animator`` (the pose path; None without FLAME files), ``cloud`` (the head served last,
    canonical metres, full detail), ``shown`` (that head and its ViewState), ``messages`` (newest first).

    Level of detail (``cfg.lod``, opt-in): each head served is merged once into its coarser levels (``lod``, a
    models/level_of_detail.py LevelOfDetail; ``lod_merges`` counts the merges); the page gets the level that the
    view picks (``shown_level``; ``auto``: from :meth:`_view_camera`, headless ``view_camera``, full detail while no
    view is known), and a view change only re-sends a cached level (no merge, no network).
    """

    def __init__(self, cfg: ViewerConfig, log: Callable[[str], None] | None = None) -> None:
        if cfg.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {cfg.method!r}")
        super().__init__()
        self.cfg = cfg
        self._log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.device = resolve_device(cfg.device)
        # files the page may name (Files folder): inside the model's folder and --code_dir only
        self.file_roots = [Path(os.path.realpath(Path(cfg.checkpoint).parent))] + \
            ([Path(os.path.realpath(cfg.code_dir))] if cfg.code_dir else [])

        self.model: TrainedModel | None = None
        self.frame: DisplayFrame | None = None
        self.sources: dict[str, str] = {}  # dropdown label -> key (training identity name or code.pt path)
        self._keys: dict[str, FittedCode] = {}  # resolved keys of the current model
        self.animator: HeadAnimator | None = None  # the pose path of the current model (None: no FLAME files)
        self._pose_keys: dict[str, IdentityKey] = {}  # keys resolved for the pose path (no network)
        self.view: ViewState | None = None  # the head to show when no page supplies the controls' values (_state)
        self.shown: tuple[GaussianCloud, ViewState] | None = None  # the head in the page and its state
        self.messages: list[str] = []
        self._msg_lock = threading.Lock()
        self.network_runs = 0
        self.updates = 0
        # (ViewState.identity, network output: a PosableIdentity, or a GaussianCloud without the pose path), cached
        self._identity: tuple[tuple, PosableIdentity | GaussianCloud] | None = None
        self._given_codes: list[str] = []
        parse_lod(cfg.lod, 10 ** 6)  # a bad --lod stops here; its level is checked against each model on load
        self.lod_setting: str | int = "off"  # cfg.lod for the loaded model (off when it asks for a finer level)
        self.lod: LevelOfDetail | None = None  # the merged levels of the head shown (None: --lod off)
        self.shown_level: int | None = None  # subdivision level of the Gaussians in the page
        self.lod_merges = 0
        self.view_camera: Camera | None = None  # headless: the view --lod auto picks a level for

    def start(self) -> None:
        """Load ``cfg.checkpoint`` (and the code files offered with any model), start the worker, serve a head."""
        self._given_codes = list(self.cfg.codes) + [str(p) for p in find_codes(self.cfg.code_dir)]
        self._load_model(self.cfg.checkpoint)
        self._start_worker()

    # ------------------------------------------------------------------------------------------ public
    @property
    def cloud(self) -> GaussianCloud | None:
        """The head served last (canonical frame, metres)."""
        return None if self.shown is None else self.shown[0]

    def close(self) -> None:
        """Stop the worker (after the job or update it is running)."""
        self._stop_worker()

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

    # ------------------------------------------------------------------------------------------ hooks of the page
    # (no-ops headless; server.HeadViewer shows each in the page)
    def _state(self) -> ViewState | None:
        """The values that determine the head now (read on the worker thread); None: nothing to show."""
        return self.view if self.model is not None else None

    def _show_splats(self, splats: dict[str, np.ndarray]) -> None:
        """Send the head (DisplayFrame.splats) to the page."""

    def _view_camera(self) -> Camera | None:
        """The page's current view in the canonical frame (DisplayFrame.camera), for --lod auto; None: unknown."""
        return self.view_camera

    def _show_stats(self, text: str) -> None:
        """Show the status line (markdown: Gaussians, update times, or why no model is loaded)."""

    def _show_messages(self) -> None:
        """Show ``messages`` (called with the message lock held)."""

    def _show_pose_controls(self, visible: bool) -> None:
        """Show or hide the pose sliders (shown only with a pose path)."""

    def _refresh_sources(self) -> None:
        """Offer the identities of ``sources`` in the page."""

    def _select_a(self, label: str) -> None:
        """Pick ``label`` (a key of ``sources``) as identity A in the page."""

    def _message(self, text: str, error: bool = False, detail: str = "") -> None:
        """Show ``text`` in the page (newest first) and print it to the terminal, with ``detail`` (a loader's own
        message, which can quote a file's bytes) in the terminal only."""
        self._log(f"[viewer] {'error: ' if error else ''}{text}{f' ({detail})' if detail else ''}")
        with self._msg_lock:
            self.messages = ([f"**Error:** {text}" if error else text] + self.messages)[:MAX_MESSAGES]
            self._show_messages()

    # ------------------------------------------------------------------------------------------ worker jobs
    def _page_path_allowed(self, path: str, kind: str) -> bool:
        """A path typed in the page must lie inside the model's folder or --code_dir (checked before the file is
        touched, so the page learns nothing about files elsewhere); False after saying so."""
        if path and path_inside(Path(path), self.file_roots):
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
                self._show_stats(f"**No model loaded** ({path}); train one with `bash run_training.sh`")
            return
        old_codes = [k for k in self.sources.values() if k not in (self.model.identities if self.model else [])]
        self.model, self.frame = model, DisplayFrame(model.template_base)
        self._keys, self._pose_keys, self._identity, self.shown = {}, {}, None, None
        self.lod, self.shown_level = None, None
        try:
            self.lod_setting = parse_lod(self.cfg.lod, model.plan.levels)
        except ValueError as exc:
            self.lod_setting = "off"
            self._message(f"{exc}: showing full detail", error=True)
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
        self._show_pose_controls(self.animator is not None)

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
            self._select_a(path)

    # ------------------------------------------------------------------------------------------ updates
    def _failed(self, what: str, exc: Exception) -> None:
        self._message(f"{what} failed ({type(exc).__name__})", error=True, detail=str(exc))

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

    def _lod_index(self) -> int:
        """Index into ``lod.levels`` of the level to show: a fixed --lod level's (the coarsest kept), or the one the
        view picks (--lod auto; full detail while the view is unknown)."""
        if self.lod_setting != "auto":
            return 0
        cam = self._view_camera()
        return len(self.lod.levels) - 1 if cam is None else self.lod.level_index(cam)

    def _send(self, cloud: GaussianCloud, level: int, note: str) -> None:
        """Send ``cloud`` (at subdivision ``level``) to the page, with the status line."""
        self._show_splats(self.frame.splats(cloud))
        self.shown_level = level
        lod = "" if self.lod is None else f" · level {level} of {self.model.plan.levels} (--lod {self.lod_setting})"
        self._show_stats(f"**{len(cloud):,} Gaussians**{lod} · {note}")

    def _update(self) -> None:
        state = self._state()
        if state is None:
            return
        if self.shown is not None and self.shown[1] == state:
            # the same head: with --lod auto the view may pick another of its cached levels (no merge, no network)
            if self.lod is not None and self.lod_setting == "auto":
                i = self._lod_index()
                if self.lod.level_numbers[i] != self.shown_level:
                    self._send(self.lod.levels[i], self.lod.level_numbers[i], "view changed: cached level, no merge")
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
        shown, level = cloud, self.model.plan.levels
        if self.lod_setting != "off":  # merged once per head, kept for view changes
            full = self.model.plan.levels
            coarsest = coarsest_level(self.lod_setting, full, self.cfg.lod_levels)
            if self.lod is None:  # per model: it keeps the merge's shares of this topology
                self.lod = LevelOfDetail(self.model.plan, full, self.model.field.K, threshold=self.cfg.lod_footprint)
            self.lod.update(cloud, coarsest)
            self.lod_merges += 1
            synchronize(self.device)
            i = self._lod_index()
            shown, level = self.lod.levels[i], self.lod.level_numbers[i]
        t3 = time.perf_counter()
        self.shown = (cloud, state)
        self.updates += 1
        parts = [f"network {(t1 - t0) * 1e3:.1f} ms" if ran else "network not run"]
        if self.animator is not None:
            parts.append(f"pose {(t2 - t1) * 1e3:.1f} ms")
        if self.lod is not None:
            parts.append(f"merge {(t3 - t2) * 1e3:.1f} ms")
        self._send(shown, level, f"last update {(time.perf_counter() - t0) * 1e3:.1f} ms ({', '.join(parts)}, "
                                 f"{self.device.type})")
