"""FLAME and a pinhole camera from 2D face landmarks (one photo, or the T frames of a video with one identity).

``fit_flame_to_landmarks`` fits, to iBUG-68 points (utils/face/landmarks.py; FLAME's 51 static landmarks = iBUG 17..67,
the 17 jaw-contour points 0..16 through FLAME's optional dynamic embedding) and optionally the two iris centres:

    rigid      head rotation and translation (the mean shape, neutral face), started from OpenCV's PnP solution
    non-rigid  + FLAME shape (shared by all frames, or given and kept fixed), expression, jaw and eye rotations, and the
               focal length (one for all frames; principal point at the image centre)

Loss: a MAP estimate.  Landmark residuals, in units of each frame's inter-ocular distance (IOD), are Gaussian with a
standard deviation of max(1 px, 2 % IOD) per coordinate (``landmark_sigma_px`` / ``landmark_sigma_iod``: the
detector's precision, and how far a real face departs from FLAME's landmark embedding), robustified by Geman-McClure
at 3 sigmas (a landmark the detector got badly wrong saturates instead of pulling the head); the priors are Gaussian
with standard deviations in the parameters' own units (FLAME's shape and expression coefficients: 1; jaw and eyes:
radians; focal length: log-normal around the default); for T > 1 the frame-to-frame changes of pose, expression, jaw
and eyes have Gaussian priors too.  So the weight of each prior relative to the landmarks follows from the noise model
instead of being tuned: the same settings fit synthetic landmarks with 1 px noise and a detector on real portraits.
Solver: Levenberg-Marquardt with autograd Jacobians (converges in 10-20 iterations where a first-order method needed
hundreds and stopped short of the optimum; see :func:`fit_flame_to_landmarks`).

Conventions (models/flame/params.py, NeRSemble): FLAME runs with zero global rotation; the head pose is the similarity
``world = scale * R @ v + t`` (``FlameParams``; scale stays 1: the shape prior fixes the head's metric size).  The
world frame is the camera frame turned to FLAME's axes: the camera sits at the origin, ``w2c = diag(1, -1, -1)``
(OpenCV camera looking down world -z, world y up), so a head looking straight into the camera has R = identity.
Focal length: ``focal`` if given, else ``focal_ratio`` (2.5) times the longer image side, the field of view of a
portrait lens (about 85 mm full-frame equivalent; NeRSemble's cameras: 2.49 x the image height).  It is not fitted by
default (``fit_focal``): the landmarks of a face about 1 m away carry too little perspective to tell the focal length
from the head's distance and proportions -- measured on synthetic faces seen through focal lengths 0.8-1.2 x the
default, the fitted focal length moved 5-9 % from the default whatever the truth was, the face-mask error was the same
with and without it (2.23 mm mean), and on the held-out identity's photo (true focal length = the default) fitting it
put the head 7 % too close, costing 3 dB on the unseen views (tests/test_wild.py).  A wrong focal length mostly changes
the fitted distance, not the fitted face.

Speed: FLAME is evaluated only at the vertices the landmarks need (utils/face/landmark_flame.py ``LandmarkFlame``);
the per-frame tracker's one-frame fits evaluate in NumPy (:func:`_frame_terms_np`, ``NUMPY_FRAMES``: torch's per-call
dispatch was most of their time), and the calibration's shape block goes through per-landmark Jacobian tables and a
Schur complement formed with L^-1 Jf^T (benchmarks/results/stream_fit_speed_cpu_2026-12-06c.md).

Code: :func:`fit_flame_to_landmarks` runs one function per stage on a shared :class:`FitProblem` (targets, starting
pose, variable layout and priors: :func:`_make_problem`; :func:`_rigid_stage`; :func:`_non_rigid_stage`;
:func:`_assemble_result`), all solved by :func:`_levenberg_marquardt`.  The streaming tracker built on it is
utils/face/frame_tracker.py.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.linalg.lapack import dpotrf, dpotrs
from torch import Tensor

from models.camera import Camera
from models.flame import (
    NUM_EXPRESSION,
    NUM_SHAPE,
    FlameModel,
    FlameParams,
    axis_angle_to_matrix,
)
from utils.core.blas import blas_threads
from utils.core.config import Range
from utils.face.landmark_flame import LandmarkFlame, project, rotation_jacobian

# world -> camera of the fitted camera: the camera frame with y and z flipped (see the module docstring)
W2C = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class FlameFitConfig:
    """Fitting FLAME and the camera to landmarks (``flame_fit.*`` keys of configs/fit.yaml).

    The loss is a MAP estimate: landmark residuals are Gaussian (robustified) with a standard deviation ``sigma``
    per image coordinate of max(landmark_sigma_px pixels, landmark_sigma_iod x the inter-ocular distance), and every
    prior is written as a standard deviation in the parameter's own units (FLAME's shape and expression coefficients
    are in standard deviations of its training scans, so their prior std is 1)."""

    focal: float = 0.0  # focal length in pixels; 0: focal_ratio * the longer image side
    focal_ratio: float = 2.5  # default focal length / longer image side (a portrait lens; see the module docstring)
    fit_focal: bool = False  # also fit the focal length (not identifiable at ~1 m: see the module docstring)
    focal_std: float = 0.3  # with fit_focal: prior std of log(focal / default focal)
    rigid_iterations: int = 10  # Levenberg-Marquardt iterations of the rigid stage (head pose)
    iterations: int = 40  # Levenberg-Marquardt iterations of the non-rigid stage (two runs of at most half)
    num_shape: int = 300  # FLAME shape coefficients fitted (the rest stay 0)
    num_expression: int = 100  # FLAME expression coefficients fitted (the rest stay 0)
    landmark_sigma_px: float = 1.0  # landmark noise std per coordinate in pixels, or landmark_sigma_iod if larger
    landmark_sigma_iod: float = 0.02  # landmark noise std as a fraction of the inter-ocular distance (see above)
    shape_std: float = 1.0  # prior std of FLAME's shape coefficients (1: FLAME's own distribution)
    expression_std: float = 1.0  # prior std of FLAME's expression coefficients
    jaw_std: float = 0.2  # prior std of the jaw's opening rotation, radians (sideways and twist: a tenth)
    eyes_std: float = 0.3  # prior std of the eye rotations, radians
    robust_k: float = 3.0  # Geman-McClure scale of the non-rigid stage, in sigmas (residuals beyond it saturate)
    rigid_robust_scale: float = 0.5  # Geman-McClure scale (IOD) of the rigid stage and the first non-rigid run
    contour_weight: float = 1.0  # weight of the 17 jaw-contour points (needs flame_dynamic_embedding.npy; 0: off)
    iris_weight: float = 1.0  # weight of the iris centres (detector output with irises; 0: off)
    temporal_weight: float = 1.0  # T > 1: weight of the frame-to-frame smoothness prior (temporal_std_* below)
    temporal_std_rotation: float = 0.1  # std of the head rotation's change between frames, radians
    temporal_std_translation: float = 0.05  # std of the head translation's change between frames, head distances
    temporal_std_jaw: float = 0.1  # std of the jaw and eye rotations' change between frames, radians
    temporal_std_expression: float = 1.0  # std of the expression coefficients' change between frames
    wide_stage: bool = True  # run the non-rigid stage first with the wide robust scale (off: warm-started tracking)
    # far_start: the motion outran the warm start; beyond the robust scale the loss has almost no gradient and the
    # narrow solve stalls where it started (measured on a keyframe video: a tracker stuck at 29 px)
    far_start: float = 1.0  # wide_stage off: run it anyway if the start's median error > this many robust scales
    max_rejections: int = 0  # give up after this many rejected LM steps in a row (0: until the damping reaches 1e10)
    tolerance: float = 1e-6  # stop a stage when an accepted step lowers the loss by less than this fraction
    contour_passes: int = 3  # most narrow-scale solves, re-looking up the jaw-contour rows after each
    # the Jacobians in closed form (LandmarkFlame.posed_with_jacobian; the shape through LandmarkFlame.free_shape)
    # whenever the focal length is fixed and FLAME has its dynamic contour embedding: the same numbers as autograd's
    # (tests/test_flame_fit.py), without a backward pass through T x K copies of the frames.  false: autograd always
    closed_form: bool = True
    schur_float32: bool = False  # the shape solve's two largest products in float32 (false: float64 throughout)
    # (the Schur complement Js^T (I - Z^T Z) Js of the shared shape: (T, K, K) @ (T, K, qs), then (qs, T K) @
    # (T K, qs); the rest of the solve, the Jacobians' float64 copies and the gradient stay float64: half those
    # products' time, ~60% of an iteration's work in the 16-frame stream calibration on one core; the solution moves
    # by rounding only.  FrameTracker.calibrate sets it for its own solves: ShapeRefineConfig.calibration_float32)

    RANGES = {"focal": Range(0), "focal_ratio": Range(0, lo_open=True), "focal_std": Range(0, lo_open=True),
              "rigid_iterations": Range(0), "iterations": Range(0), "num_shape": Range(0), "num_expression": Range(0),
              "landmark_sigma_px": Range(0, lo_open=True), "landmark_sigma_iod": Range(0),
              "shape_std": Range(0, lo_open=True), "expression_std": Range(0, lo_open=True),
              "jaw_std": Range(0, lo_open=True), "eyes_std": Range(0, lo_open=True), "robust_k": Range(0, lo_open=True),
              "rigid_robust_scale": Range(0, lo_open=True), "contour_weight": Range(0), "iris_weight": Range(0),
              "temporal_weight": Range(0), "temporal_std_rotation": Range(0, lo_open=True),
              "temporal_std_translation": Range(0, lo_open=True), "temporal_std_jaw": Range(0, lo_open=True),
              "temporal_std_expression": Range(0, lo_open=True), "far_start": Range(0)}


@dataclass
class LandmarkTargets:
    """What is fitted, for T frames of one size.

    Attributes:
        points: (T, 68, 2) iBUG-68 points in pixels.
        image_size: (width, height) in pixels.
        weights: (T, 68) per-point weights (0: missing), default ones.
        irises: (T, 2, 2) iris centres in pixels (subject's right eye, then left) or None.
    """

    points: Tensor
    image_size: tuple[int, int]
    weights: Tensor | None = None
    irises: Tensor | None = None

    @property
    def num_frames(self) -> int:
        return self.points.shape[0]


@dataclass
class FlameFitResult:
    """params: FlameParams (T frames, one shape, scale 1); camera: the fitted Camera (w2c = W2C, K at the image size);
    landmarks: (T, 68, 2) fitted iBUG points in pixels (contour points NaN without a dynamic embedding);
    errors: mean static-landmark error per frame, pixels (T,); losses: loss after each stage."""

    params: FlameParams
    camera: Camera
    landmarks: Tensor
    errors: Tensor
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def default_focal(image_size: tuple[int, int], cfg: FlameFitConfig) -> float:
    """The focal length used without other information: cfg.focal, else cfg.focal_ratio * the longer image side."""
    return float(cfg.focal) if cfg.focal > 0 else float(cfg.focal_ratio) * max(image_size)


def make_camera(focal: float, image_size: tuple[int, int], name: str = "222200037") -> Camera:
    """The fitted camera: principal point at the image centre, square pixels, w2c = :data:`W2C`."""
    w, h = image_size
    K = torch.tensor([[focal, 0.0, w / 2.0], [0.0, focal, h / 2.0], [0.0, 0.0, 1.0]])
    return Camera(K, W2C.clone(), w, h, name)


def geman_mcclure(r2: Tensor, scale: float | Tensor) -> Tensor:
    """rho(r) = s^2 r^2 / (r^2 + s^2) of squared residuals r2: quadratic near 0, saturates at s^2."""
    s2 = scale * scale
    return s2 * r2 / (r2 + s2)


def _pnp_init(model_pts: np.ndarray, image_pts: np.ndarray, focal: float, image_size: tuple[int, int]
              ) -> tuple[np.ndarray, np.ndarray]:
    """Head rotation (3, 3) and translation (3,) in the fitted camera's world (W2C) from OpenCV's PnP."""
    import cv2

    w, h = image_size
    K = np.array([[focal, 0, w / 2.0], [0, focal, h / 2.0], [0, 0, 1]])
    ok, rvec, tvec = cv2.solvePnP(model_pts.astype(np.float64), image_pts.astype(np.float64), K, None,
                                  flags=cv2.SOLVEPNP_EPNP)
    if ok:
        ok, rvec, tvec = cv2.solvePnP(model_pts.astype(np.float64), image_pts.astype(np.float64), K, None, rvec,
                                      tvec, useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    D = np.diag([1.0, -1.0, -1.0])
    if not ok or tvec[2, 0] <= 0:  # fall back to a frontal head at the distance its size suggests
        span = np.ptp(image_pts, axis=0).max() / max(np.ptp(model_pts[:, :2], axis=0).max(), 1e-6)
        c = image_pts.mean(0)
        z = focal / span
        return np.eye(3), np.array([(c[0] - w / 2) * z / focal, -(c[1] - h / 2) * z / focal, -z])
    return D @ cv2.Rodrigues(rvec)[0], D @ tvec[:, 0]


def _rotvec(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (3,) axis-angle: the log map in closed form (scipy's Rotation, ~0.2 ms a call, only within
    0.01 rad of a half turn, where the closed form loses precision)."""
    R = np.asarray(R, dtype=np.float64)
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])  # 2 sin(theta) * axis
    s = 0.5 * math.sqrt(float(w @ w))
    theta = math.atan2(s, 0.5 * (float(np.trace(R)) - 1.0))
    if not math.isfinite(theta) or theta > math.pi - 1e-2:
        from scipy.spatial.transform import Rotation

        return Rotation.from_matrix(R).as_rotvec()
    return w * (0.5 if s < 1e-12 else theta / (2.0 * s))


def _whiten(r: Tensor, w: Tensor, scale: Tensor, sigma: Tensor) -> Tensor:
    """Residual vectors r (B, L, 2) (IOD units) -> (B, L, 2) whose squared norms are w * rho(|r|^2) / sigma^2, rho the
    Geman-McClure function of scale ``scale``: the square root of each point's robust cost, as least squares want it.
    w (B, L) weights; scale, sigma (B, 1)."""
    f = w.sqrt() * scale / (r.square().sum(-1) + scale.square()).sqrt() / sigma
    return r * f[..., None]


@dataclass
class FitProblem:
    """The shared state of one landmark fit (what its stages read, and the solver's variables they update).

    The solver's vector: T per-frame blocks X (T, Qf) = [rotation 3 (axis-angle), translation 3 (in head distances
    ``depth``: one scale suits any scene), expression ne, jaw 3, eyes 6 (with irises)], then the shared Y (Qs,) =
    [shape ns, log focal length (with ``fit_focal``)].  Shape and expression are preconditioned: coefficient =
    variable * c (``c_shape``, ``c_expr``), one variable unit moving the landmarks ~5 mm RMS.  X and Y are float64 on
    the CPU; FLAME runs on ``dev`` in ``dt``."""

    cfg: FlameFitConfig
    lf: LandmarkFlame  # the landmark sub-model of FLAME
    lf_eval: LandmarkFlame  # what the residuals evaluate: ``lf``, or with a known shape folded into its template
    dev: torch.device
    dt: torch.dtype
    T: int  # frames
    size: tuple[int, int]  # image (width, height)
    pts: Tensor  # (T, 68, 2) target points, pixels (missing ones zeroed; their weight is 0)
    wts: Tensor  # (T, 68) point weights (contour scaled by ``contour_weight``)
    iod: Tensor  # (T,) inter-ocular distance, pixels
    sigma: Tensor  # (T, 1) landmark noise in IOD units
    scale_narrow: Tensor  # (T, 1) robust scale of the final non-rigid runs
    scale_wide: Tensor  # (T, 1) robust scale of the rigid stage and the first non-rigid run
    irises: Tensor | None  # (T, 2, 2) iris centres, pixels (None: not fitted)
    f0: float  # default focal length, pixels
    static_only: Tensor  # (68,) 1 for the static points, 0 for the contour (the rigid stage's mask)
    depth: float  # mean starting head distance (the unit of the translation variables)
    fixed_shape: Tensor | None  # (1, 300) a known shape, or None: fitted
    ns: int  # shape coefficients fitted
    ne: int  # expression coefficients fitted
    c_shape: Tensor  # (1, ns) shape preconditioner
    c_expr: Tensor  # (1, ne) expression preconditioner
    n_eyes: int  # 6 with irises, else 0
    f_sizes: list[int]  # sizes of the per-frame blocks
    s_sizes: list[int]  # sizes of the shared blocks
    d_f: Tensor  # (Qf,) prior weights of the per-frame variables (standard scores d * x)
    d_s: Tensor  # (Qs,) prior weights of the shared variables
    tw: Tensor | None  # (Qf,) weights of the frame-to-frame changes, or None: no temporal prior
    n_points: float  # total point weight (the reported loss is per point)
    frame_of: Tensor  # (T,) frame indices
    sel: Tensor  # (T * K, K) row b = t * K + k picks residual k of frame t (the Jacobian batch of :func:`_data_terms`)
    idx_rep: Tensor  # (T * K,) the frame of each row of that batch
    X: Tensor  # (T, Qf) per-frame variables
    Y: Tensor  # (Qs,) shared variables
    X_prev: Tensor | None = None  # (Qf,) the variables of the frame before the first one (``previous``)
    # the per-frame tracker's solver (``fit_flame_to_landmarks(tracking=True)``): Jacobians written out
    # (:func:`_analytic_terms`), stop on a negligible predicted step
    tracking: bool = False
    # tracking with the shape fitted (ShapeRefinement): LandmarkFlame.free_shape(), whose closed-form Jacobian
    # includes the shape coefficients
    lf_free: LandmarkFlame | None = None
    # the Jacobians in closed form (:func:`_analytic_terms`) without the tracker's early stop (a full fit with
    # ``FlameFitConfig.closed_form``); ``tracking`` implies it
    analytic: bool = False

    @property
    def closed(self) -> bool:
        """The Jacobians come in closed form (:func:`_analytic_terms`): the tracker's solver or ``analytic``."""
        return self.tracking or self.analytic
    # memos of the closed-form solver (one frame's fit looks both up twice at the same variables): the contour rows
    # of the head rotations p.X[:, :3] (key: that tensor object and its values), and the pixels (T, 68, 2) of the
    # last evaluation (key: the X object evaluated, with its rows); see :func:`_contour_rows`, :func:`_fitted_points`
    rows_memo: tuple | None = None
    uv_memo: tuple | None = None
    np_cache: dict | None = None  # the targets as NumPy arrays (:func:`_frame_terms_np`)
    # (x, row, scale, rigid, r, J, pixels) of the far-start check's evaluation (:func:`_levenberg_marquardt_np`)
    np_memo: tuple | None = None
    # (Qs, Qs) a full prior precision of the shared variables replacing diag(d_s^2) (None: the diagonal prior):
    # ShapeRefinement.set_shape_precision, a prior tight only along some shape directions
    prior_s: Tensor | None = None
    lam: float = 1e-3  # Levenberg-Marquardt damping where a resumed solve left it (_levenberg_marquardt(resume=True))
    converged: bool = False  # the last _levenberg_marquardt call stopped before max_iter (converged or stuck)
    js32_memo: tuple | None = None  # (Js float64, the float32 Js it was made from) of the last closed-form evaluation
    K: int = 68 * 2 + 2 * 2  # residuals per frame: 68 points and 2 iris centres, x and y

    @property
    def fit_shape(self) -> bool:
        return self.fixed_shape is None

    @property
    def Qf(self) -> int:
        return sum(self.f_sizes)

    @property
    def Qs(self) -> int:
        return sum(self.s_sizes)


def _target_terms(lf: LandmarkFlame, targets: LandmarkTargets, cfg: FlameFitConfig
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The targets as the fit weighs them -> pts (T, 68, 2) (NaN zeroed), wts (T, 68), iod (T,), sigma (T, 1) the
    landmark noise per frame in IOD units, irises (T, 2, 2) or None."""
    dev, dt = lf.device, lf.dtype
    T = targets.num_frames
    pts = targets.points.to(dev, dt)
    if pts.shape[1:] != (68, 2):
        raise ValueError(f"landmark targets must be (T, 68, 2) iBUG points, got {tuple(pts.shape)}")
    wts = torch.ones(T, 68, dtype=dt, device=dev) if targets.weights is None else targets.weights.to(dev, dt)
    wts = wts * torch.isfinite(pts).all(-1)
    if not lf.has_contour or cfg.contour_weight <= 0:
        wts[:, :17] = 0
    else:
        wts[:, :17] *= cfg.contour_weight
    pts = torch.nan_to_num(pts)
    iod = (pts[:, 36] - pts[:, 45]).norm(dim=-1).clamp_min(1.0)  # (T,)
    sigma = (cfg.landmark_sigma_px / iod).clamp_min(cfg.landmark_sigma_iod)[:, None]  # (T, 1)
    irises = None
    if targets.irises is not None and cfg.iris_weight > 0:
        irises = targets.irises.to(dev, dt)
    return pts, wts, iod, sigma, irises


def _initial_pose(lf: LandmarkFlame, pts: Tensor, init: FlameParams | None, focal: float, size: tuple[int, int]
                  ) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Starting head pose per frame: ``init``'s (one frame is repeated over the T frames), else OpenCV's PnP of the
    mean face's static landmarks to pts (T, 68, 2) -> (T rotation vectors (3,) (zeros with ``init``: the caller
    reads init's rotations with :func:`_variables`), T translations (3,), the mean head distance)."""
    dev, dt = lf.device, lf.dtype
    T = pts.shape[0]
    zeros3 = torch.zeros(T, 3, dtype=dt, device=dev)
    with torch.no_grad():
        lm0, _ = (None, None) if init is not None else lf.forward(torch.zeros(1, NUM_SHAPE, dtype=dt, device=dev),
                            torch.zeros(T, NUM_EXPRESSION, dtype=dt, device=dev), zeros3, zeros3,
                            torch.zeros(T, 6, dtype=dt, device=dev), torch.eye(3, dtype=dt, device=dev).repeat(T, 1, 1))
    rot0, trans0 = [], []
    if init is not None:  # warm start: the given head pose (one frame is repeated over the T frames)
        tr = init.translation.detach().to("cpu", torch.float64)  # (only the translation: not every field)
        pick = [min(i, init.num_frames - 1) for i in range(T)]
        rot0 = [np.zeros(3)] * T  # (not needed: _make_problem takes init's variables from _variables)
        trans0 = [tr[i].numpy() for i in pick]
    else:
        for i in range(T):
            R, t = _pnp_init(lm0[i, 17:].cpu().numpy(), pts[i, 17:].cpu().numpy(), focal, size)
            rot0.append(_rotvec(R))
            trans0.append(t)
    depth = float(np.mean([-t[2] for t in trans0]))
    if not depth > 0:
        raise ValueError(f"fit_flame_to_landmarks: the starting head is not in front of the camera (depth {depth})")
    return rot0, trans0, depth


def _stacked(parts: list) -> Tensor:
    """Per-variable weights (float64): each part (a value or a (1,) / (n,) tensor, n) repeated to n entries, then
    concatenated."""
    return torch.cat([torch.as_tensor(p, dtype=torch.float64).reshape(-1).expand(n) for p, n in parts])


def _variables(p: FitProblem, params: FlameParams, rows: list[int]) -> Tensor:
    """(len(rows), Qf) solver variables of frames ``rows`` of ``params`` (the inverse of :func:`_assemble_result`'s
    read-out)."""
    ne, ce = p.ne, p.c_expr[0].double().cpu()
    f = lambda t: t.detach()[rows].to("cpu", torch.float64)  # noqa: E731  (the fields read, not every one)
    out = torch.zeros(len(rows), p.Qf, dtype=torch.float64)
    out[:, 0:3] = torch.as_tensor(np.array([_rotvec(R) for R in f(params.rotation_matrix).numpy()]))
    out[:, 3:6] = f(params.translation) / p.depth
    out[:, 6:6 + ne] = f(params.expression)[:, :ne] / ce
    out[:, 6 + ne:9 + ne] = f(params.jaw)
    if p.n_eyes:
        out[:, 9 + ne:] = f(params.eyes)
    return out


def _prior_terms(lf: LandmarkFlame, cfg: FlameFitConfig, ns: int, n_eyes: int, temporal: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The preconditioners c_shape (1, ns), c_expr (1, ne), the prior weights d_f (Qf,), d_s (Qs,) and the
    frame-to-frame weights tw (Qf,) or None of :func:`_make_problem`.  They depend only on the settings, so the last
    ones are kept on ``lf`` (the per-frame tracker builds one problem per frame with the same ``cfg`` object: ~30 small
    tensor operations a frame otherwise).  Read-only: callers must not modify them in place."""
    key = (cfg, ns, n_eyes, temporal)
    memo = lf.__dict__.get("_prior_memo")
    if memo is not None and memo[0][0] is cfg and memo[0][1:] == key[1:] and memo[1] == repr(cfg):
        return memo[2]
    ne = cfg.num_expression
    c_all = (0.005 / lf.basis_rms.clamp_min(1e-9)).clamp(max=10.0)
    c_shape, c_expr = c_all[None, :ns], c_all[None, NUM_SHAPE:NUM_SHAPE + ne]
    ce = c_expr[0].double().cpu()
    d_f = _stacked([(0.0, 6), (ce / cfg.expression_std, ne),
                    (1.0 / (cfg.jaw_std * torch.tensor([1.0, 0.1, 0.1])), 3), (1.0 / cfg.eyes_std, n_eyes)])
    d_s = _stacked([(c_shape[0].double().cpu() / cfg.shape_std, ns), (1.0 / cfg.focal_std, 1 if cfg.fit_focal else 0)])
    tw = None
    if temporal:
        tw = math.sqrt(cfg.temporal_weight) * _stacked([
            (1.0 / cfg.temporal_std_rotation, 3), (1.0 / cfg.temporal_std_translation, 3),
            (ce / cfg.temporal_std_expression, ne), (1.0 / cfg.temporal_std_jaw, 3),
            (1.0 / cfg.temporal_std_jaw, n_eyes)])
    out = (c_shape, c_expr, d_f, d_s, tw)
    lf._prior_memo = (key, repr(cfg), out)
    return out


def _make_problem(lf: LandmarkFlame, targets: LandmarkTargets, cfg: FlameFitConfig, shape: Tensor | None,
                  init: FlameParams | None, previous: FlameParams | None) -> FitProblem:
    """The fit's state before its first stage: weighted targets, robust scales, the starting pose (PnP or ``init``),
    the variable layout, the priors as standard scores (d * x) and, for T > 1 or with ``previous``, the weights of the
    frame-to-frame changes ((x[t + 1] - x[t]) * tw over the per-frame blocks)."""
    dev, dt = lf.device, lf.dtype
    T = targets.num_frames
    size = tuple(int(s) for s in targets.image_size)
    pts, wts, iod, sigma, irises = _target_terms(lf, targets, cfg)
    f0 = default_focal(size, cfg)
    rot0, trans0, depth = _initial_pose(lf, pts, init, f0, size)

    fit_shape = shape is None
    fixed_shape = None if fit_shape else shape.to(dev, dt).reshape(1, NUM_SHAPE)
    ns, ne = (cfg.num_shape if fit_shape else 0), cfg.num_expression
    n_eyes = 6 if irises is not None else 0
    f_sizes = [3, 3, ne, 3, n_eyes]
    s_sizes = [ns, 1 if cfg.fit_focal else 0]
    temporal = (T > 1 or previous is not None) and cfg.temporal_weight > 0
    c_shape, c_expr, d_f, d_s, tw = _prior_terms(lf, cfg, ns, n_eyes, temporal)
    K = FitProblem.K
    frame_of = torch.arange(T, device=dev)
    X = torch.zeros(T, sum(f_sizes), dtype=torch.float64)
    X[:, 0:3] = torch.as_tensor(np.array(rot0))
    X[:, 3:6] = torch.as_tensor(np.array(trans0) / depth)
    lf_eval = lf if fit_shape else lf.shaped(fixed_shape, cache=True)
    p = FitProblem(cfg=cfg, lf=lf, lf_eval=lf_eval, dev=dev, dt=dt, T=T, size=size,
                   pts=pts, wts=wts, iod=iod, sigma=sigma, scale_narrow=cfg.robust_k * sigma,
                   scale_wide=torch.full_like(sigma, cfg.rigid_robust_scale), irises=irises, f0=f0,
                   static_only=(torch.arange(68, device=dev) >= 17).to(dt), depth=depth, fixed_shape=fixed_shape,
                   ns=ns, ne=ne, c_shape=c_shape, c_expr=c_expr, n_eyes=n_eyes, f_sizes=f_sizes, s_sizes=s_sizes,
                   d_f=d_f, d_s=d_s, tw=tw, n_points=float(wts.sum().clamp_min(1.0)), frame_of=frame_of,
                   sel=torch.eye(K, dtype=dt, device=dev).repeat(T, 1), idx_rep=frame_of.repeat_interleave(K), X=X,
                   Y=torch.zeros(sum(s_sizes), dtype=torch.float64))
    if init is not None:
        p.X = _variables(p, init, [min(i, init.num_frames - 1) for i in range(T)])
    if previous is not None and tw is not None:
        if previous is init and init.num_frames == 1:  # the tracker's warm start: the same frame's variables
            p.X_prev = p.X[0].clone()
        else:
            p.X_prev = _variables(p, previous, [previous.num_frames - 1])[0]
    return p


def _frame_residuals(p: FitProblem, F: Tensor, S: Tensor, idx: Tensor, rows: Tensor | None, scale: Tensor,
                     rigid: bool) -> tuple[Tensor, Tensor]:
    """(B, K) whitened residuals and (B, 68, 2) fitted landmarks (pixels) of frames ``idx`` (B,) for parameter rows
    F (B, Qf), S (B, Qs): every row is evaluated on its own (what the Jacobian trick of :func:`_data_terms` needs).
    ``rigid``: static points only, no irises."""
    B = F.shape[0]
    rot, trans, psi_n, jaw, eyes = F.split(p.f_sizes, 1)
    beta_n, log_f = S.split(p.s_sizes, 1)
    shp = None if not p.fit_shape else torch.cat([beta_n * p.c_shape, beta_n.new_zeros(B, NUM_SHAPE - p.ns)], 1)
    expr = torch.cat([psi_n * p.c_expr, psi_n.new_zeros(B, NUM_EXPRESSION - p.ne)], 1)
    eyes = eyes if p.n_eyes else F.new_zeros(B, 6)
    focal = p.f0 * (torch.exp(log_f) if p.cfg.fit_focal else F.new_ones(B, 1))  # (B, 1)
    R = axis_angle_to_matrix(rot)
    lm, pupils = p.lf_eval.forward(shp, expr, F.new_zeros(B, 3), jaw, eyes, R, None if rows is None else rows[idx])
    t = trans * p.depth
    uv = project(lm, R, t, focal, p.size)
    w = p.wts[idx] * p.static_only if rigid else p.wts[idx]
    iod = p.iod[idx, None, None]
    res = _whiten((torch.nan_to_num(uv) - p.pts[idx]) / iod, w, scale[idx], p.sigma[idx])
    if p.irises is not None and not rigid:
        uv_p = project(pupils, R, t, focal, p.size)
        ri = _whiten((uv_p - p.irises[idx]) / iod, torch.full_like(uv_p[..., 0], p.cfg.iris_weight), scale[idx],
                     p.sigma[idx])
    else:
        ri = res.new_zeros(B, 2, 2)
    return torch.cat([res, ri], 1).reshape(B, p.K), uv


def _data_terms(p: FitProblem, Xv: Tensor, Yv: Tensor, rows: Tensor | None, scale: Tensor, rigid: bool, jac: bool
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Data residuals (T, K) (float64) and, with ``jac``, their Jacobian blocks (T, K, Qf) and (T, K, Qs): one
    backward pass through a batch that repeats every frame once per residual (frames are independent given the
    shared variables, which every row gets a copy of)."""
    if p.closed:
        return _analytic_terms(p, Xv, Yv, rows, scale, rigid, jac)
    T, K, dev, sel, idx_rep = p.T, p.K, p.dev, p.sel, p.idx_rep
    F, S = Xv.to(dev, p.dt), Yv.to(dev, p.dt)[None].expand(T, -1)
    if not jac:
        with torch.no_grad():
            return _frame_residuals(p, F, S, p.frame_of, rows, scale, rigid)[0].double().cpu(), None, None
    rs, jfs, jss = [], [], []
    step = max(1, 4096 // K)  # frames per backward pass (bounds the memory of long videos)
    for a in range(0, T, step):
        n = min(step, T - a)
        Fr = F[a:a + n].repeat_interleave(K, 0).requires_grad_(True)
        Sr = S[a:a + n].repeat_interleave(K, 0).requires_grad_(True)
        with torch.enable_grad():
            r, _ = _frame_residuals(p, Fr, Sr, idx_rep[:n * K] + a, rows, scale, rigid)
            (r * sel[:n * K]).sum().backward()
        rs.append(r.detach()[torch.arange(n * K, device=dev), torch.arange(K, device=dev).repeat(n)])
        jfs.append(Fr.grad)
        jss.append(Sr.grad if Sr.grad is not None else torch.zeros_like(Sr))  # Qs = 0: no shared variables
    return (torch.cat(rs).reshape(T, K).double().cpu(), torch.cat(jfs).reshape(T, K, p.Qf).double().cpu(),
            torch.cat(jss).reshape(T, K, p.Qs).double().cpu())


def _posed_points(p: FitProblem, Xv: Tensor, Yv: Tensor, rows: Tensor | None, jac: bool
                  ) -> tuple[Tensor, Tensor, Tensor, tuple | None, Tensor | None]:
    """The closed-form solver's 70 points in model space at the variables Xv (T, Qf) / Yv (Qs,): (head rotation
    (T, 3) axis-angle, translation (T, 3) in camera distances, points (T, 70, 3), and with ``jac`` their Jacobian
    w.r.t. the blendshape coefficients -- [expression (100, zero beyond ne), shape (ns)] for a fitted shape, the ne
    expression ones for a fixed shape -- as :meth:`LandmarkFlame.posed_with_jacobian`'s ``factored`` factors
    (T, 1, 3, 12) and (static (53, 12, E), contour (T, 17, 12, E)) (:func:`_factored_product`), and jaw + eyes
    (T, 70, 3, 9); else None)."""
    F = Xv.to(p.dev, p.dt)
    rot, trans, psi_n, jaw, eyes = F.split(p.f_sizes, 1)
    expr = psi_n * p.c_expr
    eyes = eyes if p.n_eyes else F.new_zeros(p.T, 6)
    if p.fit_shape:  # [expression (100, zero beyond ne), shape (ns)] on the free-shape sub-model
        beta = (Yv[:p.ns].to(p.dev, p.dt) * p.c_shape[0])[None].expand(p.T, -1)
        coeffs = torch.cat([expr, expr.new_zeros(p.T, NUM_EXPRESSION - p.ne), beta], 1)
        pts, d_c, d_p = p.lf_free.posed_with_jacobian(coeffs, jaw, eyes, rows, jac, factored=True)
    else:
        pts, d_c, d_p = p.lf_eval.posed_with_jacobian(expr, jaw, eyes, rows, jac, factored=True)
    return rot, trans, pts, d_c, d_p


def _factored_product(dr_F: Tensor, tables: tuple[Tensor, Tensor], cols: slice, scale: Tensor) -> Tensor:
    """(T, 70, m, 12) @ the landmarks' factored blendshape tables (static (53, 12, E), contour (T, 17, 12, E):
    LandmarkFlame._split_tables), columns ``cols`` times ``scale`` (the preconditioner, broadcast over them)
    -> (T, 70, m, len(cols)).  The static points' table is the same for every frame, so their products run per
    point over all T frames at once ((T m x 12) @ (12 x E)): T (m x 12) @ (12 x E) products of a per-frame gathered
    table read T copies of it (16-frame calibration: ~1 instead of ~4 ms an evaluation on one core).  The same sums
    as the per-frame products, so the same numbers up to rounding."""
    static, contour = tables
    T, _, m, _ = dr_F.shape
    out_s = dr_F[:, 17:].transpose(0, 1).reshape(53, T * m, 12) @ static[..., cols]  # (53, T m, C)
    out = torch.empty(T, 70, m, out_s.shape[-1], dtype=out_s.dtype, device=out_s.device)
    torch.mul(dr_F[:, :17] @ contour[..., cols], scale, out=out[:, :17])
    torch.mul(out_s.reshape(53, T, m, -1).transpose(0, 1), scale, out=out[:, 17:])
    return out


def _numpy_frame(p: FitProblem, rows: Tensor | None) -> bool:
    """One frame with a fixed shape on the CPU (the per-frame tracker's fits): :func:`_frame_terms_np` evaluates it."""
    return (NUMPY_FRAMES and p.T == 1 and not p.fit_shape and rows is not None and p.dev.type == "cpu"
            and p.lf_eval.shape_folded)


def _analytic_terms(p: FitProblem, Xv: Tensor, Yv: Tensor, rows: Tensor | None, scale: Tensor, rigid: bool, jac: bool
                    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`_data_terms` for a fixed focal length, with the Jacobian written out:
    the landmarks' own (:meth:`LandmarkFlame.posed_with_jacobian`) chained through the head pose, the pinhole
    projection and the robust whitening.  Same residuals as :func:`_frame_residuals`; one evaluation of the T frames
    instead of a backward pass through a batch of T x K copies (the per-frame tracker's step: ~1 ms instead of ~15).
    A fitted shape (``p.lf_free``, :class:`ShapeRefinement`) enters as 300 more blendshape coefficients shared by the
    frames (:meth:`LandmarkFlame.free_shape`), its Jacobian the shared block Js.
    Returns r (T, K), Jf (T, K, Qf), Js (T, K, Qs) (float64, CPU; Jacobians None without ``jac``)."""
    T, dev, dt = p.T, p.dev, p.dt
    if _numpy_frame(p, rows):
        r, Jf, uv = _frame_terms_np(p, Xv, rows, scale, rigid, jac)
        p.uv_memo = (Xv, Xv.clone(), Yv.clone(), rows.clone(), torch.from_numpy(uv[None, :68]).to(dt))
        return r, Jf, None if Jf is None else Jf.new_zeros(T, p.K, 0)
    rot, trans, pts, d_c, d_p = _posed_points(p, Xv, Yv, rows, jac)
    R = axis_angle_to_matrix(rot)
    world = pts @ R.transpose(1, 2) + (trans * p.depth)[:, None]
    x, y, z = world.unbind(-1)
    zc = (-z).clamp_min(1e-3)  # camera looks down world -z
    w_, h_ = p.size
    f = p.f0
    uv = torch.stack([f * x / zc + w_ / 2.0, f * (-y) / zc + h_ / 2.0], dim=-1)  # (T, 70, 2)
    # (the same arithmetic as :func:`project`: _fitted_points may take these pixels when p.X is this Xv)
    p.uv_memo = (Xv, Xv.clone(), Yv.clone(), None if rows is None else rows.clone(), uv[:, :68])
    # targets and weights of the 70 points: 68 landmarks, then the pupils at the iris centres (weight 0 without)
    wts = p.wts * p.static_only if rigid else p.wts
    if p.irises is not None and not rigid:
        tgt = torch.cat([p.pts, p.irises], 1)
        wts = torch.cat([wts, torch.full_like(wts[:, :2], p.cfg.iris_weight)], 1)
    else:
        tgt = torch.cat([p.pts, p.pts.new_zeros(T, 2, 2)], 1)
        wts = torch.cat([wts, wts.new_zeros(T, 2)], 1)
    iod = p.iod[:, None, None]
    e = (uv - tgt) / iod
    s2 = scale[:, :, None].square()  # (T, 1, 1)
    n2 = e.square().sum(-1, keepdim=True) + s2  # (T, 70, 1)
    g = wts[..., None].sqrt() * scale[:, :, None] / n2.sqrt() / p.sigma[:, :, None]  # _whiten's factor
    r = (e * g).reshape(T, p.K).double().cpu()
    if not jac:
        return r, None, None
    # d r / d uv per point: g (I - e e^T / (|e|^2 + s^2)) / iod  (Geman-McClure whitening, see _whiten)
    dr_duv = g[..., None] * (torch.eye(2, dtype=dt, device=dev) - e[..., :, None] * e[..., None, :] / n2[..., None])
    dr_duv = dr_duv / iod[..., None]  # (T, 70, 2, 2)
    z2 = zc.square()
    zero = torch.zeros_like(zc)
    duv_dw = torch.stack([torch.stack([f / zc, zero, f * x / z2], -1),
                          torch.stack([zero, -f / zc, -f * y / z2], -1)], -2)  # (T, 70, 2, 3)
    dr_dw = dr_duv @ duv_dw  # (T, 70, 2, 3)
    dR = rotation_jacobian(rot, R)  # (T, 3, 3, 3 parameters)
    d_rot = torch.einsum("tlia,tabp,tlb->tlip", dr_dw, dR, pts)  # via world = R pts + t
    d_trans = dr_dw * p.depth
    dr_dm = dr_dw @ R[:, None]  # (T, 70, 2, 3) d r / d model-space point
    # the landmark Jacobians come factored (LandmarkFlame.posed_with_jacobian): d points / d coefficients =
    # F (T, 1, 3, 12) @ table (70, 12, E), so dr_dm @ F first, then the (2 x 12) @ (12 x E) products
    dr_F = dr_dm @ d_c[0]  # (T, 70, 2, 12)
    d_expr = _factored_product(dr_F, d_c[1], slice(0, p.ne), p.c_expr[0])
    d_pose = torch.einsum("tlia,tlap->tlip", dr_dm, d_p)  # jaw 3, eyes 6
    parts = [d_rot, d_trans, d_expr, d_pose[..., :3]] + ([d_pose[..., 3:]] if p.n_eyes else [])
    Jf = torch.cat(parts, -1).reshape(T, p.K, p.Qf).double().cpu()
    if not p.fit_shape:
        return r, Jf, Jf.new_zeros(T, p.K, 0)
    d_shape = _factored_product(dr_F, d_c[1], slice(NUM_EXPRESSION, NUM_EXPRESSION + p.ns), p.c_shape[0])
    d_shape = d_shape.reshape(T, p.K, p.ns)
    Js = d_shape.double().cpu()
    if p.cfg.schur_float32:  # the solver's float32 Schur products take these numbers as they are
        p.js32_memo = (Js, d_shape.cpu())
    return r, Jf, Js


# ---------------------------------------------------------------- one frame's closed-form terms in NumPy (float64)
# The per-frame tracker evaluates one frame (T = 1) about 6 times per video frame; in torch each evaluation is ~150
# small kernel launches (~2 ms on one core, most of it dispatch), in NumPy the same arithmetic on arrays of a few
# hundred entries takes a fraction of that.  Off: the torch path (:func:`_analytic_terms`) for every closed-form fit.
NUMPY_FRAMES = True


def _rodrigues_np(aa: np.ndarray, eps: float) -> np.ndarray:
    """(N, 3) axis-angle -> (N, 3, 3).  ``eps`` > 0: smplx's batch_rodrigues (angle |aa + eps|, the joints' lbs);
    0: models.flame.axis_angle_to_matrix (angle clamped at 1e-12, the head pose)."""
    theta = (np.linalg.norm(aa + eps, axis=1) if eps > 0 else np.maximum(np.linalg.norm(aa, axis=1), 1e-12))[:, None]
    k = aa / theta
    K = _skew_np(k)
    s, c = np.sin(theta)[:, :, None], np.cos(theta)[:, :, None]
    return _EYE3 + s * K + (1.0 - c) * (K @ K)


def _skew_np(v: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    out = np.zeros(v.shape + (3,))
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    out[..., 0, 1], out[..., 0, 2], out[..., 1, 0] = -z, y, z
    out[..., 1, 2], out[..., 2, 0], out[..., 2, 1] = -x, -y, x
    return out


_EYE2, _EYE3 = np.eye(2), np.eye(3)  # (read-only constants: np.eye per use was ~8 calls an evaluation)
_SKEW_E = _skew_np(_EYE3)  # (3, 3, 3): [e_i]x


def _rotation_jacobian_np(aa: np.ndarray, R: np.ndarray) -> np.ndarray:
    """NumPy :func:`utils.face.landmark_flame.rotation_jacobian`: (N, 3), (N, 3, 3) -> (N, 3, 3, 3 parameters)."""
    n2 = np.square(aa).sum(-1)
    S = _skew_np(aa)  # (N, 3, 3)
    ImR_e = np.swapaxes(_EYE3 - R, 1, 2)  # (N, i, 3): row i = (I - R) e_i
    cross = ImR_e @ np.swapaxes(S, 1, 2)  # (N, i, 3): row i = aa x (I - R) e_i
    M = aa[:, :, None, None] * S[:, None] + _skew_np(cross)
    small = n2 < 1e-12
    gen = np.where(small[:, None, None, None], _SKEW_E[None], M / np.where(small, 1.0, n2)[:, None, None, None])
    return np.moveaxis(gen @ R[:, None], 1, 3)


class _FrameTables:
    """What one frame's closed-form evaluation reads from a :meth:`LandmarkFlame.shaped` copy, as float64 NumPy
    arrays, per jaw-contour row (built on first use, kept on the copy: a fixed shape's tables are the same for every
    frame of a stream)."""

    MAX_ROWS = 24  # contour rows kept (of 79: one per degree of head yaw; a stream visits a few at a time)

    def __init__(self, lf: LandmarkFlame, ne: int) -> None:
        f = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
        self.ne = ne
        self.rows: dict[int, tuple] = {}
        self.row_ids: dict[int, np.ndarray] = {}  # the corners (N,) of each kept row (:meth:`reshaped`)
        self.joint_t = f(lf.joint_template[2:])  # (3, 3) jaw and eye joints
        self.joint_d = f(lf.joint_dirs[2:, :, :ne])  # (3, 3, ne)
        # the whole sub-model once, rows gathered from it by NumPy indexing (a row's tables: ~0.1 ms, not 3.5)
        self.v_template = f(lf.v_template)  # (V, 3)
        self.shapedirs = f(lf.shapedirs[..., :ne])  # (V, 3, ne)
        self.posedirs = f(lf.posedirs_jaw_eyes)  # (3, 9, V, 3)
        self.weights = f(lf.lbs_weights[:, 2:])  # (V, 3)
        self.table = f(lf._landmark_table()[..., :ne])  # (B * 17 + 53, 4, 3, ne)
        self.dyn_tri, self.dyn_bary = lf.dyn_tri.cpu().numpy(), f(lf.dyn_bary)  # (B, 17, 3)
        self.static_tri = np.concatenate([lf.static_tri.cpu().numpy(),
                                          np.repeat(lf.pupils.cpu().numpy()[:, None], 3, 1)])  # (53, 3)
        one = np.zeros((2, 3))
        one[:, 0] = 1.0
        self.static_bary = np.concatenate([f(lf.static_bary), one])  # (53, 3)

    def row(self, b: int) -> tuple:
        """Contour row b -> (corner template (N, 3), corner blendshapes (N * 3, ne), pose correctives
        (3 joints * 9, N * 3), skinning weights (N, 3 joints), barycentric weights (70, 3), landmark table
        (70, 12, ne)), N = 210 corners (the 17 contour points of row b, the 51 static ones, the 2 pupils)."""
        out = self.rows.get(b)
        if out is None:
            ids = np.concatenate([self.dyn_tri[b], self.static_tri]).reshape(-1)  # (N,)
            N = ids.shape[0]
            B17 = self.dyn_tri.shape[0] * 17
            lm = np.concatenate([b * 17 + np.arange(17), B17 + np.arange(53)])
            out = (self.v_template[ids], self.shapedirs[ids].reshape(N * 3, self.ne),
                   np.ascontiguousarray(self.posedirs[:, :, ids].reshape(27, N * 3)), self.weights[ids],
                   np.concatenate([self.dyn_bary[b], self.static_bary]),
                   np.ascontiguousarray(self.table[lm].reshape(70, 12, self.ne)))
            if len(self.rows) >= self.MAX_ROWS:  # bounded: ~1.3 MB a row (the oldest row goes first)
                self.row_ids.pop(next(iter(self.rows)), None)
                self.rows.pop(next(iter(self.rows)))
            self.rows[b], self.row_ids[b] = out, ids
        return out

    def reshaped(self, lf: LandmarkFlame) -> "_FrameTables":
        """These tables for ``lf``, another :meth:`LandmarkFlame.shaped` copy of the same model (another shape):
        only the shaped template and the joints depend on the shape, everything else (the expression blendshapes,
        pose correctives, skinning and barycentric weights, the landmark table) is shared; the kept rows keep their
        gathers with the new template's corners."""
        from copy import copy

        out = copy(self)
        out.v_template = lf.v_template.detach().to("cpu", torch.float64).numpy()
        out.joint_t = lf.joint_template[2:].detach().to("cpu", torch.float64).numpy()
        out.row_ids = dict(self.row_ids)
        out.rows = {b: (out.v_template[out.row_ids[b]],) + t[1:] for b, t in self.rows.items()}
        return out


def _frame_terms_np(p: "FitProblem", Xv: Tensor, rows: Tensor, scale: Tensor, rigid: bool, jac: bool
                    ) -> tuple[Tensor, Tensor | None, np.ndarray]:
    """:func:`_analytic_terms` of one frame with a fixed shape (T = 1, ``p.lf_eval`` a shaped copy), in float64
    NumPy: the same equations (LandmarkFlame.posed_with_jacobian's skinning, the head pose, the pinhole projection,
    the Geman-McClure whitening).  Returns r (1, K), Jf (1, K, Qf) or None, and the 70 points' pixels (70, 2)."""
    r, J, uv = _frame_eval_np(p, Xv[0].numpy(), int(rows[0]), float(scale[0, 0]), rigid, jac)
    return torch.from_numpy(r[None]), None if J is None else torch.from_numpy(J[None]), uv


def _frame_eval_np(p: "FitProblem", x: np.ndarray, row: int, s: float, rigid: bool, jac: bool
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`_frame_terms_np` on NumPy: variables x (Qf,), contour row, robust scale s -> r (K,), J (K, Qf) or None,
    pixels (70, 2)."""
    r, uv, state = _frame_forward_np(p, x, row, s, rigid)
    return r, _frame_jacobian_np(p, state) if jac else None, uv


def _frame_forward_np(p: "FitProblem", x: np.ndarray, row: int, s: float, rigid: bool
                      ) -> tuple[np.ndarray, np.ndarray, tuple]:
    """The residuals of :func:`_frame_eval_np` -> r (K,), pixels (70, 2) and what :func:`_frame_jacobian_np` needs
    for the Jacobian at x (~0.15 of the ~0.5 ms an evaluation with the Jacobian takes on one core: a candidate step
    that is rejected, or the last one, needs no Jacobian)."""
    lf = p.lf_eval
    tabs = lf.__dict__.get("_np_tables")
    if tabs is None or tabs.ne != p.ne:
        tabs = lf._np_tables = _FrameTables(lf, p.ne)
    tc, Sd, P, w, bary, tab = tabs.row(row)
    c = p.np_cache
    if c is None:  # the problem's constants as NumPy, once per problem
        f = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
        tgt = np.zeros((70, 2))
        tgt[:68] = f(p.pts[0])
        if p.irises is not None:
            tgt[68:] = f(p.irises[0])
        c = p.np_cache = {"tgt": tgt, "wts": f(p.wts[0]), "static": f(p.static_only), "c_expr": f(p.c_expr[0]),
                          "iod": float(p.iod[0]), "sigma": float(p.sigma[0, 0])}
    ne = p.ne
    rot, trans, psi = x[0:3], x[3:6], x[6:6 + ne]
    jaw = x[6 + ne:9 + ne]
    eyes = x[9 + ne:15 + ne] if p.n_eyes else np.zeros(6)
    e = psi * c["c_expr"]
    N = tc.shape[0]
    # the shaped, pose-corrected corners and their skinning about the jaw and eye joints (see posed_with_jacobian)
    v = tc + (Sd @ e).reshape(N, 3)
    J = tabs.joint_t + tabs.joint_d @ e  # (3, 3)
    aa = np.stack([jaw, eyes[:3], eyes[3:]])
    Rk = _rodrigues_np(aa, 1e-8)  # (3, 3, 3)
    D = Rk - _EYE3
    v = v + (D.reshape(27) @ P).reshape(N, 3)
    vJ = v[:, None] - J[None]  # (N, 3 joints, 3)
    DvJ = np.einsum("kab,nkb->nka", D, vJ)  # (N, k, 3)
    xs = v + np.einsum("nk,nka->na", w, DvJ)
    pts = np.einsum("lc,lca->la", bary, xs.reshape(70, 3, 3))  # (70, 3)
    # head pose and projection
    Rh = _rodrigues_np(rot[None], 0.0)[0]
    world = pts @ Rh.T + trans * p.depth
    zc = np.maximum(-world[:, 2], 1e-3)
    f0 = p.f0
    w_, h_ = p.size
    uv = np.stack([f0 * world[:, 0] / zc + w_ / 2.0, f0 * (-world[:, 1]) / zc + h_ / 2.0], -1)  # (70, 2)
    wts = c["wts"] * c["static"] if rigid else c["wts"]
    if p.irises is not None and not rigid:
        wts = np.concatenate([wts, np.full(2, p.cfg.iris_weight)])
    else:
        wts = np.concatenate([wts, np.zeros(2)])
    iod, sigma = c["iod"], c["sigma"]
    tgt = c["tgt"] if p.irises is not None else np.concatenate([c["tgt"][:68], np.zeros((2, 2))])
    err = (uv - tgt) / iod
    n2 = np.square(err).sum(-1) + s * s  # (70,)
    g = np.sqrt(wts) * s / np.sqrt(n2) / sigma
    r = (err * g[:, None]).reshape(p.K)
    return r, uv, (g, err, n2, iod, zc, world, rot, Rh, pts, D, tab, c, aa, Rk, P, N, w, vJ, bary)


def _frame_jacobian_np(p: "FitProblem", state: tuple) -> np.ndarray:
    """J (K, Qf) of :func:`_frame_forward_np`'s residuals at its variables (its ``state``)."""
    g, err, n2, iod, zc, world, rot, Rh, pts, D, tab, c, aa, Rk, P, N, w, vJ, bary = state
    f0 = p.f0
    dr_duv = g[:, None, None] * (_EYE2 - err[:, :, None] * err[:, None, :] / n2[:, None, None]) / iod
    z2 = zc * zc
    duv_dw = np.zeros((70, 2, 3))
    duv_dw[:, 0, 0] = f0 / zc
    duv_dw[:, 0, 2] = f0 * world[:, 0] / z2
    duv_dw[:, 1, 1] = -f0 / zc
    duv_dw[:, 1, 2] = -f0 * world[:, 1] / z2
    dr_dw = dr_duv @ duv_dw  # (70, 2, 3)
    dRh = _rotation_jacobian_np(rot[None], Rh[None])[0]  # (3, 3, 3 parameters)
    d_rot = dr_dw @ np.tensordot(pts, dRh, axes=([1], [1]))  # (70, 2, 3): via world = R pts + t
    d_trans = dr_dw * p.depth
    dr_dm = dr_dw @ Rh  # (70, 2, 3)
    # expression: [I, D_jaw, D_eye, D_eye] (3 x 12) @ the landmark table (12, ne)
    Dcat = np.concatenate([_EYE3[None], D], 0).transpose(1, 0, 2).reshape(3, 12)
    d_expr = ((dr_dm @ Dcat) @ tab) * c["c_expr"]  # (70, 2, ne)
    # jaw and eyes: d x / d aa = A dv + w dR (v - J) per corner, A = I + sum_k w_k D_k
    dR = _rotation_jacobian_np(aa, Rk)  # (3 joints, 3, 3, 3 parameters)
    dv = np.swapaxes(dR.reshape(3, 9, 3), 1, 2) @ P.reshape(3, 9, N * 3)  # (k, p, N * 3) pose correctives
    dv = dv.reshape(9, N, 3).transpose(1, 2, 0)  # (N, b, k * 3 + p)
    A = _EYE3 + (w @ D.reshape(3, 9)).reshape(N, 3, 3)  # (N, 3, 3) d x / d v
    # w_k dR_k (v - J_k): per joint k one (N x 3) @ (3 x 9) product (an einsum over (N, a, k, p) took 4x longer)
    dRt = dR.transpose(0, 2, 1, 3).reshape(3, 3, 9)  # (k, b, a * 3 + p)
    T2 = (vJ.transpose(1, 0, 2) @ dRt) * w.T[:, :, None]  # (k, N, a * 3 + p)
    T2 = T2.reshape(3, N, 3, 3).transpose(1, 2, 0, 3)  # (N, a, k, p)
    dx_p = A @ dv + T2.reshape(N, 3, 9)  # (N, 3, 9)
    d_p = (dx_p.reshape(70, 3, 27) * bary[..., None]).sum(1).reshape(70, 3, 9)
    d_pose = dr_dm @ d_p  # (70, 2, 9)
    parts = [d_rot, d_trans, d_expr, d_pose[..., :3]] + ([d_pose[..., 3:]] if p.n_eyes else [])
    return np.concatenate(parts, -1).reshape(p.K, p.Qf)


def _temporal_degree(T: int, has_prev: bool) -> Tensor:
    """(T, 1) float64: how many frame-to-frame prior terms touch each of T frames (its neighbours in the sequence,
    plus the frame before the sequence for frame 0 when ``has_prev``): times tw^2, that prior's Hessian diagonal."""
    deg = torch.full((T, 1), 2.0, dtype=torch.float64)
    deg[0] = deg[-1] = 1.0
    if T == 1:
        deg[0] = 0.0
    if has_prev:
        deg[0] += 1.0
    return deg


def _cost(p: FitProblem, r: Tensor, Xv: Tensor, Yv: Tensor) -> float:
    """The loss: data residuals r (T, K) plus the priors of Xv (T, Qf), Yv (Qs,) and the frame-to-frame changes."""
    c = r.square().sum() + (p.d_f * Xv).square().sum()
    c = c + ((p.d_s * Yv).square().sum() if p.prior_s is None else Yv @ p.prior_s @ Yv)
    if p.tw is not None:
        c = c + ((Xv[1:] - Xv[:-1]) * p.tw).square().sum()
    if p.X_prev is not None:
        c = c + ((Xv[0] - p.X_prev) * p.tw).square().sum()
    return float(c)


# The per-frame tracker's Levenberg-Marquardt (one frame, fixed shape, every variable free) in NumPy as well: the same
# steps as :func:`_levenberg_marquardt`, whose ~25 torch calls per iteration on (115,)-sized tensors cost more than
# their arithmetic.  Off: the torch loop for every fit.
NUMPY_SOLVER = True


def _np_solver(p: FitProblem, free_f: Tensor, free_s: Tensor, rows: Tensor | None) -> bool:
    """:func:`_levenberg_marquardt_np` can run this call: the tracker's one-frame fit with every variable free."""
    return (NUMPY_SOLVER and p.tracking and p.prior_s is None and not bool(free_s.any()) and bool(free_f.all())
            and _numpy_frame(p, rows))


def _levenberg_marquardt_np(p: FitProblem, rows: Tensor, scale: Tensor, rigid: bool, max_iter: int,
                            resume: bool = False) -> float:
    """:func:`_levenberg_marquardt` for one frame with a fixed shape and every variable free (T = 1, no shared
    variables; :func:`_np_solver`), on NumPy float64 arrays: the same damping schedule, stopping rules (the
    predicted decrease, ``tolerance``, ``max_rejections``) and priors; the evaluation is :func:`_frame_eval_np`.
    Leaves p.X, p.lam, p.converged and the fitted pixels' memo (:func:`_fitted_points`) as that function does."""
    cfg = p.cfg
    row, s = int(rows[0]), float(scale[0, 0])
    x = p.X[0].numpy().copy()
    d_f = p.d_f.numpy()
    df2 = np.square(d_f)
    tw2 = None if p.tw is None or p.X_prev is None else np.square(p.tw.numpy())  # T = 1: only the tie to X_prev
    x_prev = None if tw2 is None else p.X_prev.numpy()
    diag = df2 if tw2 is None else df2 + tw2
    lam = p.lam if resume else 1e-3
    p.converged = False
    m = p.np_memo  # the far-start check's evaluation at this start (:func:`_far_start`)
    if m is not None and m[1] == row and m[2] == s and m[3] == rigid and np.array_equal(m[0], x):
        r, J, uv = m[4], m[5], m[6]
    else:
        r, J, uv = _frame_eval_np(p, x, row, s, rigid, True)
    p.np_memo = None

    def cost(r_: np.ndarray, x_: np.ndarray) -> float:  # :func:`_cost` with T = 1, no shared variables
        c_ = float(r_ @ r_) + float(np.square(d_f * x_).sum())
        if tw2 is not None:
            c_ += float((np.square(x_ - x_prev) * tw2).sum())
        return c_

    c = cost(r, x)
    idx = np.arange(x.shape[0])
    # the Gram product J^T J (140 x 115): on NumPy's BLAS when that runs on one thread (the stream pins it:
    # utils/core/blas.py; half torch's time there), else in torch on torch's threads -- OpenBLAS would run it on every
    # core it finds (2.9x slower a frame with 2 threads on the 2-core container)
    numpy_gram = blas_threads() == 1
    for it in range(max_iter):
        g = J.T @ r + df2 * x
        if tw2 is not None:
            g = g + (x - x_prev) * tw2
        if numpy_gram:
            A = J.T @ J
        else:
            Jt = torch.from_numpy(J)
            A = (Jt.T @ Jt).numpy()
        A[idx, idx] += diag
        Adiag = np.maximum(A.diagonal(), 1e-9)
        improved = False
        tries = 0
        while lam < 1e10 and (cfg.max_rejections <= 0 or tries <= cfg.max_rejections):
            tries += 1
            Ad = A.copy()
            Ad[idx, idx] += lam * Adiag
            dx = -_cho_solve_np(Ad, g)
            if tries == 1:  # the predicted decrease below tolerance: stop without evaluating (as the torch loop)
                pred = -(2.0 * float(g @ dx) + float(dx @ A @ dx))
                if pred < cfg.tolerance * c:
                    p.converged = True
                    break
            xn = x + dx
            # the residuals only: the Jacobian is taken below when the step is accepted and another follows
            rn, uvn, state = _frame_forward_np(p, xn, row, s, rigid)
            cn = cost(rn, xn)
            if math.isfinite(cn) and cn < c:
                improved = True
                lam = max(lam / 3.0, 1e-7)
                break
            lam *= 4.0
        if not improved:
            p.converged = True
            break
        rel = (c - cn) / max(c, 1e-30)
        x, r, uv, c = xn, rn, uvn, cn
        if rel < cfg.tolerance:
            p.converged = True
            break
        if it + 1 < max_iter:
            J = _frame_jacobian_np(p, state)
    p.lam = lam
    X = torch.from_numpy(x[None].copy())
    p.X = X
    p.uv_memo = (X, X.clone(), p.Y.clone(), rows.clone(), torch.from_numpy(uv[None, :68]).to(p.dt))
    return c / p.n_points


def _cho_solve_np(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A^-1 b for a symmetric positive definite A (LAPACK's Cholesky, potrf / potrs, without scipy.linalg's checks)."""
    L, info = dpotrf(A, lower=1, clean=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky of the Levenberg-Marquardt system failed (info {info})")
    out, info = dpotrs(L, b, lower=1)
    return out


def _levenberg_marquardt(p: FitProblem, free_f: Tensor, free_s: Tensor, rows: Tensor | None, scale: Tensor,
                         rigid: bool, max_iter: int, resume: bool = False) -> float:
    """Levenberg-Marquardt on the variables ``free_f`` (Qf,) / ``free_s`` (Qs,) (bool) of p.X, p.Y (updated); returns
    the final loss per point.  Hand-written rather than scipy.optimize.least_squares: its dense trust-region step takes
    an SVD of the whole Jacobian per iteration (seconds here), while the normal equations of this problem have an
    arrow shape -- one small block per frame plus the shared shape -- solved through the Schur complement of the
    shared block in milliseconds.  For T > 1 the step neglects the frame-to-frame coupling of the temporal prior (its
    gradient is exact, so every accepted step still lowers the true loss).  ``resume``: start from the damping the last
    call left in ``p.lam`` (a solve run a few iterations at a time: :class:`ShapeRefinement`); ``p.converged`` tells
    whether this call stopped before ``max_iter``."""
    if _np_solver(p, free_f, free_s, rows):
        return _levenberg_marquardt_np(p, rows, scale, rigid, max_iter, resume)
    cfg, T, tw, X_prev, X, Y = p.cfg, p.T, p.tw, p.X_prev, p.X, p.Y
    fi, si = torch.nonzero(free_f)[:, 0], torch.nonzero(free_s)[:, 0]
    df2, ds2 = p.d_f[fi].square(), p.d_s[si].square()
    Ps = None if p.prior_s is None else p.prior_s[si][:, si]  # a full shared prior precision instead of diag(ds2)
    if Ps is not None:
        ds2 = Ps.diagonal()
    tdiag = torch.zeros(T, len(fi), dtype=torch.float64)
    if tw is not None:
        tdiag = _temporal_degree(T, X_prev is not None) * tw[fi].square()
    lam = p.lam if resume else 1e-3
    p.converged = False
    closed = p.closed  # the Jacobian comes with a candidate's residuals
    r, Jf, Js = _data_terms(p, X, Y, rows, scale, rigid, True)
    c = _cost(p, r, X, Y)
    all_f, all_s = len(fi) == p.Qf, len(si) == p.Qs  # every variable free: no (T, K, Q) copies by index
    for _ in range(max_iter):
        Jf_ = Jf if all_f else Jf[..., fi]
        Js_ = Js if all_s else Js[..., si]
        gf = torch.einsum("tkq,tk->tq", Jf_, r) + df2 * X[:, fi]
        if tw is not None:
            diff = (X[1:] - X[:-1]) * tw.square()
            gt = torch.zeros_like(X)
            gt[1:] += diff
            gt[:-1] -= diff
            if X_prev is not None:
                gt[0] += (X[0] - X_prev) * tw.square()
            gf = gf + gt[:, fi]
        shared = len(si) > 0  # no shared variables (the tracker's frames): no Schur complement to form
        A = Jf_.transpose(1, 2) @ Jf_ + torch.diag_embed(df2 + tdiag)  # (T, qf, qf)
        if shared:
            # (as (T K, qs) matrix-vector products: einsum's "tkq,tk->q" copied Js to (qs, K, T) order each time)
            Js_2 = Js_.reshape(-1, Js_.shape[2])
            gs = Js_2.T @ r.reshape(-1) + (ds2 * Y[si] if Ps is None else Ps @ Y[si])
            c_diag = torch.linalg.vector_norm(Js_2, dim=0).square() + ds2  # the diagonal of C = Js^T Js + priors
            eye_k = torch.eye(Js_.shape[1], dtype=Js_.dtype)
            qs = Js_.shape[2]
            Js32 = None  # (the same for every try of this iteration)
            if cfg.schur_float32:  # the Jacobian's own float32 numbers when _analytic_terms made Js from them
                m = p.js32_memo
                Js32 = m[1] if m is not None and m[0] is Js_ else Js_.float()
        improved = False
        tries = 0
        while lam < 1e10 and (cfg.max_rejections <= 0 or tries <= cfg.max_rejections):
            tries += 1
            Ad = A + torch.diag_embed(lam * A.diagonal(dim1=1, dim2=2).clamp_min(1e-9))
            L = torch.linalg.cholesky(Ad)
            Aig = torch.cholesky_solve(gf[..., None], L)[..., 0]
            if shared:
                # Schur complement of the frame blocks, B = Jf^T Js: C - B^T A^-1 B = Js^T (I - Z^T Z) Js + priors
                # with Z = L^-1 Jf^T (T, qf, K): the (K x K) projection per frame instead of A^-1 B (qf x qs) and
                # two (qs x qs) products (16-frame calibration, qs = 300, K = 140: 0.33 instead of 0.57 G
                # multiply-adds per iteration)
                Z = torch.linalg.solve_triangular(L, Jf_.transpose(1, 2), upper=False)
                M = eye_k - Z.transpose(1, 2) @ Z  # (T, K, K) float64: the cancellation happens here
                if Js32 is not None:  # cfg.schur_float32: the two large products in float32
                    Sc = (Js32.reshape(-1, qs).T @ (M.float() @ Js32).reshape(-1, qs)).double()
                else:
                    Sc = Js_2.T @ (M @ Js_).reshape(-1, qs)
                if Ps is None:
                    Sc = Sc + torch.diag(ds2 + lam * c_diag.clamp_min(1e-9))
                else:
                    Sc = Sc + Ps + torch.diag(lam * c_diag.clamp_min(1e-9))
                BtAig = Js_2.T @ (Jf_ @ Aig[..., None]).reshape(-1)  # B^T A^-1 gf
                # Sc is symmetric positive definite (the shape prior): Cholesky, half the work of LU (which stays the
                # fallback should rounding make it fail)
                Lc, info = torch.linalg.cholesky_ex(Sc)
                if int(info) == 0:
                    ds = torch.cholesky_solve((-gs + BtAig)[:, None], Lc)[:, 0]
                else:
                    ds = torch.linalg.solve(Sc, -gs + BtAig)
                dx = -Aig - torch.cholesky_solve(Jf_.transpose(1, 2) @ (Js_ @ ds)[..., None], L)[..., 0]
            else:
                ds, dx = Y.new_zeros(0), -Aig
            if p.tracking and not len(si) and tries == 1:
                # the Gauss-Newton model's decrease of the loss for this step: below tolerance, stop without
                # evaluating it (the last evaluations of a converged solve otherwise only confirm it)
                pred = -(2.0 * (gf * dx).sum() + (dx[..., None, :] @ A @ dx[..., None]).sum())
                if float(pred) < cfg.tolerance * c:
                    p.converged = True
                    break
            Xn, Yn = X.clone(), Y.clone()
            Xn[:, fi] += dx
            Yn[si] += ds
            # closed form: the Jacobian comes with the candidate's residuals (cheap), so an accepted step needs no
            # second evaluation
            rn, Jfn, Jsn = _data_terms(p, Xn, Yn, rows, scale, rigid, closed)
            cn = _cost(p, rn, Xn, Yn)
            if math.isfinite(cn) and cn < c:
                improved = True
                lam = max(lam / 3.0, 1e-7)
                break
            lam *= 4.0
        if not improved:
            p.converged = True
            break
        X, Y, rel = Xn, Yn, (c - cn) / max(c, 1e-30)
        p.X, p.Y = X, Y
        c = cn
        if rel < cfg.tolerance:
            p.converged = True
            break
        r, Jf, Js = (rn, Jfn, Jsn) if closed else _data_terms(p, X, Y, rows, scale, rigid, True)
    p.lam = lam
    return c / p.n_points


def _contour_rows(p: FitProblem) -> Tensor | None:
    """(T,) jaw-contour rows of the dynamic embedding for the current head rotations (None without one)."""
    if not p.lf.has_contour:
        return None
    m = p.rows_memo
    if m is not None and m[0] is p.X and torch.equal(m[1], p.X[:, :3]):
        return m[2]
    if p.tracking and p.dev.type == "cpu":  # the tracker's frame: the same lookup in NumPy (~20 torch calls)
        rows = torch.from_numpy(_contour_rows_np(p.X[:, :3].numpy(), p.lf.dyn_tri.shape[0]))
    else:
        rows = p.lf.contour_rows(axis_angle_to_matrix(p.X[:, :3].to(p.dev, p.dt)), None)
    p.rows_memo = (p.X, p.X[:, :3].clone(), rows)
    return rows


def _contour_rows_np(rot: np.ndarray, num_rows: int) -> np.ndarray:
    """(T,) int64 jaw-contour rows for head rotations rot (T, 3) (axis-angle, zero neck): smplx's
    find_dynamic_lmk_idx_and_bcoords as :meth:`LandmarkFlame.contour_rows` calls it (the y Euler angle in whole
    degrees, 0..39 for one side, 40..78 for the other), in float64 (a row can differ from the float32 lookup's at a
    half-degree boundary)."""
    R = _rodrigues_np(rot, 0.0)
    yaw = np.arctan2(-R[:, 2, 0], np.sqrt(R[:, 0, 0] ** 2 + R[:, 1, 0] ** 2))
    y = np.round(np.minimum(-yaw * 180.0 / np.pi, 39.0)).astype(np.int64)
    y = np.where(y < 0, np.where(y < -39, 78, 39 - y), y)
    if num_rows != 79:
        raise ValueError(f"the dynamic contour embedding has {num_rows} rows, smplx's lookup expects 79")
    return y


def _rigid_stage(p: FitProblem) -> float:
    """Head rotation and translation only (the mean shape, neutral face): static points, wide robust scale."""
    pose_f = torch.arange(p.Qf) < 6
    no_s = torch.zeros(p.Qs, dtype=torch.bool)
    return _levenberg_marquardt(p, pose_f, no_s, _contour_rows(p), p.scale_wide, True, p.cfg.rigid_iterations)


def _fitted_points(p: FitProblem, rows: Tensor | None) -> Tensor:
    """(T, 68, 2) fitted landmarks (pixels) at the current variables with contour rows ``rows``.  A closed-form solver
    (``p.tracking`` / ``p.analytic``) takes them from :meth:`LandmarkFlame.posed_with_jacobian` without its Jacobian
    (the points its residuals use: 70 corners blended instead of a skinning of the whole face mask; the per-frame
    tracker calls this twice a frame: 0.8 instead of 1.0 ms each on one core of the 2-core container), else from
    :func:`_frame_residuals`."""
    with torch.no_grad():
        if not p.closed:
            F, S = p.X.to(p.dev, p.dt), p.Y.to(p.dev, p.dt)[None].expand(p.T, -1)
            return _frame_residuals(p, F, S, p.frame_of, rows, p.scale_narrow, False)[1]
        m = p.uv_memo
        if m is not None and m[0] is p.X and torch.equal(m[1], p.X) and torch.equal(m[2], p.Y) and (
                (m[3] is None and rows is None) or (m[3] is not None and rows is not None and torch.equal(m[3], rows))):
            return m[4]
        if _numpy_frame(p, rows):
            return torch.from_numpy(_frame_terms_np(p, p.X, rows, p.scale_narrow, False, False)[2][None, :68]).to(p.dt)
        rot, trans, pts, _, _ = _posed_points(p, p.X, p.Y, rows, False)
        return project(pts[:, :68], axis_angle_to_matrix(rot), trans * p.depth, p.f0, p.size)


def _far_start(p: FitProblem) -> float:
    """The largest over the frames of the median static-landmark error at the current variables, in narrow robust
    scales (how far a warm start is from its targets: above 1, most points sit where the robust loss is flat)."""
    with torch.no_grad():
        rows = _contour_rows(p)
        if NUMPY_SOLVER and p.tracking and _numpy_frame(p, rows):
            # the tracker's frame: evaluated with its Jacobian, kept for the narrow solve that starts here (one
            # evaluation a frame fewer; :func:`_levenberg_marquardt_np`)
            x, row, s = p.X[0].numpy().copy(), int(rows[0]), float(p.scale_narrow[0, 0])
            r, J, uv_np = _frame_eval_np(p, x, row, s, False, True)
            p.np_memo = (x, row, s, False, r, J, uv_np)
            c = p.np_cache
            err = np.linalg.norm(uv_np[17:68] - c["tgt"][17:68], axis=-1) / c["iod"]  # (51,) IOD units
            err = err[c["wts"][17:] > 0]
            # (the lower middle value for an even count, as torch's nanmedian below)
            return float(np.partition(err, (err.size - 1) // 2)[(err.size - 1) // 2]) / s if err.size else 0.0
        else:
            uv = _fitted_points(p, rows)
        err = (uv[:, 17:] - p.pts[:, 17:]).norm(dim=-1) / p.iod[:, None]  # (T, 51) IOD units
        err = torch.where(p.wts[:, 17:] > 0, err, torch.full_like(err, float("nan")))
        return float((err.nanmedian(dim=1).values / p.scale_narrow[:, 0]).nan_to_num(0.0).max())


def _non_rigid_stage(p: FitProblem, losses: dict[str, float]) -> None:
    """Every variable (pose, expression, jaw, eyes, shape, focal): first with the wide robust scale (``wide_stage``, or
    a start more than ``far_start`` narrow scales away: :func:`_far_start`), then with the narrow one, solved again
    while the jaw-contour rows (which jump with the head's yaw) move, at most ``contour_passes`` times.
    Writes the losses ``non_rigid_wide`` (when the wide stage ran) and ``non_rigid``."""
    cfg = p.cfg
    all_f, all_s = torch.ones(p.Qf, dtype=torch.bool), torch.ones(p.Qs, dtype=torch.bool)
    wide = cfg.wide_stage or (cfg.far_start > 0 and _far_start(p) > cfg.far_start)
    n = max(1, cfg.iterations // 2) if wide else cfg.iterations
    if wide:
        losses["non_rigid_wide"] = _levenberg_marquardt(p, all_f, all_s, _contour_rows(p), p.scale_wide, False, n)
    rows = _contour_rows(p)
    for _ in range(max(1, cfg.contour_passes)):
        losses["non_rigid"] = _levenberg_marquardt(p, all_f, all_s, rows, p.scale_narrow, False, n)
        new = _contour_rows(p)
        if rows is None or torch.equal(new, rows):
            break
        rows = new


def _assemble_result(p: FitProblem, losses: dict[str, float], camera_name: str, t_start: float) -> FlameFitResult:
    """The solver's variables read out as FlameParams (scale 1, zero neck), the fitted camera, the fitted landmarks
    (pixels; contour NaN without a dynamic embedding) and the per-frame static-landmark error."""
    T, dev, dt = p.T, p.dev, p.dt
    if p.tracking and T == 1 and not p.fit_shape and dev.type == "cpu" and not p.cfg.fit_focal:
        return _assemble_frame_np(p, losses, camera_name, t_start)
    with torch.no_grad():
        F, S = p.X.to(dev, dt), p.Y.to(dev, dt)[None]
        uv = _fitted_points(p, _contour_rows(p))
        rot, trans, psi_n, jaw, eyes = F.split(p.f_sizes, 1)
        beta_n, log_f = S.split(p.s_sizes, 1)
        focal = p.f0 * (float(torch.exp(log_f)) if p.cfg.fit_focal else 1.0)
        shp = p.fixed_shape if not p.fit_shape else torch.cat([beta_n * p.c_shape,
                                                               beta_n.new_zeros(1, NUM_SHAPE - p.ns)], 1)
        expr = torch.cat([psi_n * p.c_expr, psi_n.new_zeros(T, NUM_EXPRESSION - p.ne)], 1)
        params = FlameParams(shape=shp.clone(), expression=expr.clone(),
                             rotation_matrix=axis_angle_to_matrix(rot).clone(), translation=(trans * p.depth).clone(),
                             jaw=jaw.clone(), neck=torch.zeros(T, 3, dtype=dt, device=dev),
                             eyes=eyes.clone() if p.n_eyes else torch.zeros(T, 6, dtype=dt, device=dev),
                             scale=torch.ones(T, 1, dtype=dt, device=dev))
        if not p.lf.has_contour:
            uv[:, :17] = float("nan")
        errors = (uv[:, 17:] - p.pts[:, 17:]).norm(dim=-1).mean(-1)
    return FlameFitResult(params=params, camera=make_camera(focal, p.size, camera_name), landmarks=uv.detach(),
                          errors=errors.detach(), losses=losses, seconds=time.perf_counter() - t_start)


def _assemble_frame_np(p: FitProblem, losses: dict[str, float], camera_name: str, t_start: float) -> FlameFitResult:
    """:func:`_assemble_result` of the tracker's one frame (fixed shape and focal length, CPU), read out in NumPy (the
    same values up to float32 rounding; ~25 torch calls fewer a frame)."""
    dt = p.dt
    uv = _fitted_points(p, _contour_rows(p))
    x = p.X[0].numpy()
    ne = p.ne
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)[None]).to(dt)  # noqa: E731  (1, ...) in FLAME's dtype
    expr = np.zeros(NUM_EXPRESSION)
    expr[:ne] = x[6:6 + ne] * p.np_cache["c_expr"] if p.np_cache is not None else \
        x[6:6 + ne] * p.c_expr[0].double().numpy()
    params = FlameParams(shape=p.fixed_shape.clone(), expression=t(expr),
                         rotation_matrix=t(_rodrigues_np(x[None, 0:3], 0.0)[0]), translation=t(x[3:6] * p.depth),
                         jaw=t(x[6 + ne:9 + ne]), neck=torch.zeros(1, 3, dtype=dt),
                         eyes=t(x[9 + ne:15 + ne]) if p.n_eyes else torch.zeros(1, 6, dtype=dt),
                         scale=torch.ones(1, 1, dtype=dt))
    errors = (uv[:, 17:] - p.pts[:, 17:]).norm(dim=-1).mean(-1)
    return FlameFitResult(params=params, camera=make_camera(p.f0, p.size, camera_name), landmarks=uv.detach(),
                          errors=errors.detach(), losses=losses, seconds=time.perf_counter() - t_start)


def fit_flame_to_landmarks(flame: FlameModel, targets: LandmarkTargets, cfg: FlameFitConfig | None = None,
                           shape: Tensor | None = None, camera_name: str = "222200037", init: FlameParams | None = None,
                           previous: FlameParams | None = None, landmark_flame: "LandmarkFlame | None" = None,
                           tracking: bool = False) -> FlameFitResult:
    """Fit FLAME (one shape; per frame expression, jaw, eyes, head rotation and translation) and one focal length to
    the landmarks of T frames.

    The loss (a MAP estimate, see :class:`FlameFitConfig`) is a sum of squares: whitened robust landmark residuals,
    the priors as standard scores and, for T > 1, the frame-to-frame changes.  It is minimised by Levenberg-Marquardt
    (:func:`_levenberg_marquardt`) with the exact Jacobian: in closed form (:func:`_analytic_terms`) when the focal
    length is fixed and FLAME has its contour embedding (``cfg.closed_form``), else from autograd (frames are
    independent given the shared shape and focal length, so one backward pass through a batch that repeats every
    frame once per residual yields every frame's Jacobian block).  Stages: the starting pose (:func:`_initial_pose`:
    PnP or ``init``), rigid (:func:`_rigid_stage`: head rotation and translation, static points, wide robust scale),
    then everything with the wide scale, then with the narrow one (``robust_k`` sigmas; :func:`_non_rigid_stage`);
    the contour rows are looked up between stages.

    Args:
        flame: the FLAME model (with its 51-point static embedding; the dynamic one adds the contour).
        targets: LandmarkTargets: points (T, 68, 2) pixels, image_size (w, h), weights (T, 68), irises (T, 2, 2).
        cfg: FlameFitConfig.
        shape: (1, 300) a known identity shape, kept fixed (e.g. fitted on a neutral frame); None: fitted.
        camera_name: serial of the fitted camera (the NeRSemble frontal camera by default).
        init: FlameParams (1 or T frames) to start from instead of PnP's rigid pose of the mean face (a warm start,
            e.g. the previous frame of a video: utils/face/frame_tracker.py); its head pose, expression, jaw and eyes.
        previous: FlameParams (1 frame) of the frame BEFORE the first target frame: the frame-to-frame prior then
            also ties the first frame to it (smoothing that only looks backwards, for streaming).
        landmark_flame: a :class:`LandmarkFlame` of ``flame`` built once by the caller (per-frame fits skip its
            construction).
        tracking: the per-frame tracker's solver (needs a known ``shape``, a fixed focal length and the dynamic
            contour embedding; ignored otherwise): the Jacobians in closed form (:func:`_analytic_terms`, the same
            numbers as autograd's an order of magnitude faster) and a stop as soon as the next step's predicted
            decrease of the loss is below ``tolerance``.
    Returns:
        FlameFitResult (params on ``flame``'s device; camera on the CPU).
    """
    cfg = cfg or FlameFitConfig()
    t_start = time.perf_counter()
    lf = landmark_flame if landmark_flame is not None else LandmarkFlame(flame)
    p = _make_problem(lf, targets, cfg, shape, init, previous)
    closed_ok = not cfg.fit_focal and lf.has_contour
    p.tracking = tracking and not p.fit_shape and closed_ok
    p.analytic = cfg.closed_form and closed_ok
    if p.analytic and p.fit_shape:  # the shape's Jacobian: its blendshapes as 300 more coefficients
        p.lf_free = lf.free_shape()
    losses: dict[str, float] = {}
    if cfg.rigid_iterations > 0:
        losses["rigid"] = _rigid_stage(p)
    if cfg.iterations > 0:
        _non_rigid_stage(p, losses)
    if not all(math.isfinite(v) for v in losses.values()):
        raise FloatingPointError(f"FLAME landmark fit diverged (losses {losses})")
    return _assemble_result(p, losses, camera_name, t_start)


# the iBUG-68 static points' groups (first index, end): utils/face/frame_tracker.py
# ShapeRefineConfig.calibration_offset_groups
OFFSET_GROUPS = {"brows": (17, 27), "nose": (27, 36), "eyes": (36, 48), "mouth": (48, 68)}


class ShapeRefinement:
    """A joint landmark fit of N frames -- their shared FLAME shape and each frame's head pose, expression, jaw and
    eyes -- warm-started from a shape and the frames' tracked parameters and run a few Levenberg-Marquardt iterations
    at a time (:meth:`advance`): how utils/face/frame_tracker.py refines a stream's shape on the frames it has seen
    without holding one frame for the whole solve.  The narrow robust scale only (the start is a tracked fit), no
    frame-to-frame prior (the frames are not consecutive), the focal length fixed, the Jacobians in closed form
    (:func:`_analytic_terms` with :meth:`LandmarkFlame.free_shape`; measured ~40-50 ms an iteration for 8-16 frames
    on one core of the 2-core CPU container, where the autograd calibration of 8 frames takes ~14 s).

    Args:
        lf: the LandmarkFlame of the FLAME model (with the dynamic contour embedding).
        targets: the N frames (points (N, 68, 2) as the detector gave them: the result's mean static residual is the
            detector's offset on this face, as in the batch fit).
        cfg: the fit's settings (``focal`` set: it stays fixed; ``temporal_weight`` and ``fit_focal`` are ignored).
        shape: (1, 300) the starting shape; init: FlameParams (N frames), the starting per-frame parameters.
        max_iterations: Levenberg-Marquardt iterations of the whole solve (it stops earlier when converged).
    """

    def __init__(self, lf: LandmarkFlame, targets: LandmarkTargets, cfg: FlameFitConfig, shape: Tensor,
                 init: FlameParams, max_iterations: int = 10, frame_prior: bool = True) -> None:
        if not lf.has_contour:
            raise ValueError("ShapeRefinement needs FLAME's dynamic contour embedding (flame_dynamic_embedding.npy)")
        if init.num_frames != targets.num_frames:
            raise ValueError(f"ShapeRefinement: init has {init.num_frames} frames, the targets {targets.num_frames}")
        self.t_start = time.perf_counter()
        cfg = replace(cfg, fit_focal=False, temporal_weight=cfg.temporal_weight if frame_prior else 0.0)
        self.p = _make_problem(lf, targets, cfg, None, init, None)
        self.p.tracking = True
        self.p.lf_free = lf.free_shape()
        ns = self.p.ns
        self.p.Y[:ns] = shape.detach().reshape(-1)[:ns].to("cpu", torch.float64) / self.p.c_shape[0].to(
            "cpu", torch.float64)
        self.max_iterations = int(max_iterations)
        self.iterations = 0
        self.done = self.max_iterations <= 0
        self.loss = float("nan")
        self.seconds = 0.0  # time spent in advance()

    def advance(self, iterations: int = 1) -> bool:
        """Run up to ``iterations`` more Levenberg-Marquardt iterations (contour rows looked up at the current head
        rotations); True when the solve is done (converged, stuck, or ``max_iterations`` reached)."""
        if self.done:
            return True
        t = time.perf_counter()
        p = self.p
        n = max(1, min(int(iterations), self.max_iterations - self.iterations))
        self.loss = _levenberg_marquardt(p, torch.ones(p.Qf, dtype=torch.bool), torch.ones(p.Qs, dtype=torch.bool),
                                         _contour_rows(p), p.scale_narrow, False, n, resume=self.iterations > 0)
        self.iterations += n
        self.done = p.converged or self.iterations >= self.max_iterations
        self.seconds += time.perf_counter() - t
        return self.done

    def result(self) -> FlameFitResult:
        """The solve's current state: params (N frames, the refined shape), fitted landmarks (N, 68, 2), errors."""
        return _assemble_result(self.p, {"non_rigid": self.loss}, "222200037", self.t_start)

    def shape_information(self, frame_priors: bool = True) -> Tensor:
        """(ns, ns) float64: what the N frames tell about the shape at the current state -- the Gauss-Newton Hessian
        of the loss without the shape prior, the per-frame variables eliminated (Schur complement; their own priors
        and the frame-to-frame prior's diagonal kept, as the solver's step does), in shape coefficients (FLAME's
        standard deviations: the fit's own prior adds the identity / ``shape_std``^2).  Small eigenvalues: shape
        directions these frames do not determine (e.g. the face's depth on frontal frames, which a per-frame jaw or
        head rotation can trade against).  ``frame_priors`` False: the data alone (the per-frame priors left out, a
        tiny ridge instead): then a shape direction a per-frame expression could mimic counts as unobserved (measured
        on the benchmark's first 16 frames: largest eigenvalue 12, against 1547 with the priors)."""
        p = self.p
        with torch.no_grad():
            _, Jf, Js = _data_terms(p, p.X, p.Y, _contour_rows(p), p.scale_narrow, False, True)
            diag = p.d_f.square().expand(p.T, -1).clone()
            if not frame_priors:  # the data alone (a tiny ridge: some expression directions move no landmark)
                diag = 1e-6 * Jf.square().sum(1).mean(0).expand(p.T, -1).clone()
            if p.tw is not None and frame_priors:  # the frame-to-frame diagonal (as the step: no coupling)
                diag = diag + _temporal_degree(p.T, False) * p.tw.square()
            A = Jf.transpose(1, 2) @ Jf + torch.diag_embed(diag)  # (T, Qf, Qf)
            B = Jf.transpose(1, 2) @ Js[..., :p.ns]  # (T, Qf, ns)
            H = (Js[..., :p.ns].transpose(1, 2) @ Js[..., :p.ns] - B.transpose(1, 2) @ torch.linalg.solve(A, B)).sum(0)
            c = p.c_shape[0].to("cpu", torch.float64)
            H = H / (c[:, None] * c[None, :])  # variables -> coefficients (coefficient = variable * c)
        return 0.5 * (H + H.T)

    def offset_step(self, offset_std_px: float | Tensor, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One Gauss-Newton step, from the current state, of the shape jointly with a per-landmark detector offset
        b (the static points', shared by the N frames, prior N(0, ``offset_std_px``^2) pixels; the frames' variables
        eliminated as in :meth:`shape_information`).  A fit with the offset fixed at 0 lets the shape take whatever
        static 2D pattern the detector adds (on near-frontal, near-duplicate frames the two are alike); here the two
        priors share it out, and different views tell them apart.

        Args:
            offset_std_px: the prior std in pixels, one for all static points or (68,) per point (0: that point's
                offset stays where it is; the contour's 17 are never estimated).
            offset: (68, 2) the offset the targets already have removed (this solve's points are the detector's
                less it), where the step starts; None: 0.  Repeated steps with re-solves between them
                (FrameTracker's ``calibration_offset_rounds``) move towards the joint optimum.
        Returns:
            (shape (1, 300) coefficients, offset (68, 2) pixels: the new total offset, targets = points - offset;
            0 on the contour)."""
        p = self.p
        ns, T, K = p.ns, p.T, p.K
        std = torch.as_tensor(offset_std_px, dtype=torch.float64).reshape(-1).expand(68).clone()
        std[:17] = 0.0
        b0 = torch.zeros(68, 2, dtype=torch.float64) if offset is None else offset.detach().to(torch.float64).cpu()
        with torch.no_grad():
            rows = _contour_rows(p)
            r, Jf, Js = _data_terms(p, p.X, p.Y, rows, p.scale_narrow, False, True)
            # d residual / d offset by central differences on the targets (a residual depends on uv - (pts - b) of
            # its own point only, so one shift of every point's x (then y) gives all 2 x 2 blocks)
            lm = torch.nonzero(std > 0).reshape(-1)
            Jb = torch.zeros(T, K, 2 * len(lm), dtype=torch.float64)
            pts0, eps = p.pts, 0.05
            for c in range(2):
                rr = []
                for sgn in (1.0, -1.0):
                    shift = torch.zeros_like(pts0)
                    shift[:, 17:, c] = sgn * eps
                    p.pts, p.np_cache, p.uv_memo = pts0 - shift, None, None  # b + shift: targets pts - b - shift
                    rr.append(_data_terms(p, p.X, p.Y, rows, p.scale_narrow, False, False)[0])
                p.pts, p.np_cache, p.uv_memo = pts0, None, None
                dr = (rr[0] - rr[1]) / (2.0 * eps)  # (T, K)
                for cc in range(2):
                    Jb[:, 2 * lm + cc, 2 * torch.arange(len(lm)) + c] = dr[:, 2 * lm + cc]
            diag = p.d_f.square().expand(T, -1).clone()
            gf = torch.einsum("tkq,tk->tq", Jf, r) + p.d_f.square() * p.X
            if p.tw is not None:
                diag = diag + _temporal_degree(T, False) * p.tw.square()
                diff = (p.X[1:] - p.X[:-1]) * p.tw.square()
                gf[1:] += diff
                gf[:-1] -= diff
            JS = torch.cat([Js[..., :ns], Jb], -1)  # (T, K, nS)
            nS = JS.shape[-1]
            P = torch.zeros(nS, nS, dtype=torch.float64)
            P[:ns, :ns] = p.prior_s[:ns, :ns] if p.prior_s is not None else torch.diag(p.d_s[:ns].square())
            P[ns:, ns:] = torch.diag((1.0 / std[lm].square()).repeat_interleave(2))
            xS = torch.cat([p.Y[:ns], b0[lm].reshape(-1)])  # the offset's prior acts on the total b0 + step
            A = Jf.transpose(1, 2) @ Jf + torch.diag_embed(diag)
            B = Jf.transpose(1, 2) @ JS  # (T, Qf, nS)
            AiB, Aig = torch.linalg.solve(A, B), torch.linalg.solve(A, gf[..., None])
            S = (JS.transpose(1, 2) @ JS - B.transpose(1, 2) @ AiB).sum(0) + P
            g = (JS.transpose(1, 2) @ r[..., None] - B.transpose(1, 2) @ Aig).sum(0)[:, 0] + P @ xS
            d = -torch.linalg.solve(S, g)
            c = p.c_shape[0].to("cpu", torch.float64)
            shape = torch.zeros(1, NUM_SHAPE, dtype=torch.float32)
            shape[0, :ns] = ((p.Y[:ns] + d[:ns]) * c).float()
            out = b0.clone()
            out[lm] += d[ns:].reshape(-1, 2)
            out[:17] = 0.0
        return shape, out.float()

    def set_shape_precision(self, precision: Tensor) -> None:
        """Replace the shape's diagonal prior by the full precision ``precision`` (ns, ns), in shape coefficients
        (the fit's own prior: identity / ``shape_std``^2): the loss's shape term becomes beta^T precision beta."""
        p = self.p
        c = p.c_shape[0].to("cpu", torch.float64)
        P = torch.zeros(p.Qs, p.Qs, dtype=torch.float64)
        P[:p.ns, :p.ns] = precision.to("cpu", torch.float64)[:p.ns, :p.ns] * (c[:, None] * c[None, :])
        if p.Qs > p.ns:  # the focal length keeps its own prior
            P[p.ns:, p.ns:] = torch.diag(p.d_s[p.ns:].square())
        p.prior_s = 0.5 * (P + P.T)


def flame_landmarks_2d(flame: FlameModel, params: FlameParams, camera: Camera) -> Tensor:
    """(T, 68, 2) pixel positions of FLAME's landmarks for ``params`` seen through ``camera`` (any camera; the
    contour rows by the head's rotation; NaN without a dynamic embedding).  Used to make test targets and to draw."""
    lf = LandmarkFlame(flame)
    p = params.to(lf.device, lf.dtype)
    with torch.no_grad():
        # the head's rotation relative to this camera, in the OpenGL camera axes the contour lookup expects
        rel = W2C[:3, :3].to(lf.device, lf.dtype) @ camera.w2c[:3, :3].to(lf.device, lf.dtype) @ p.rotation_matrix
        lm, _ = lf.forward(p.shape, p.expression, p.neck, p.jaw, p.eyes, rel)
        world = lm * p.scale[:, :, None] @ p.rotation_matrix.transpose(1, 2) + p.translation[:, None]
        uv, _ = camera.to(lf.device).project(world)
    return uv


def with_scale_about(params: FlameParams, centre: Tensor, k: float) -> FlameParams:
    """The head scaled by ``k`` about the point ``centre`` (3,): the same picture for a camera at ``centre``."""
    c = centre.to(params.translation)
    return replace(params, scale=params.scale * k, translation=c + k * (params.translation - c))
