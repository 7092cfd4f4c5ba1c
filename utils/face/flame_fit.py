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

Conventions (models/flame.py, NeRSemble): FLAME runs with zero global rotation; the head pose is the similarity
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

Speed: FLAME is evaluated only at the vertices the landmarks need (plus 5 virtual vertices that carry the joints: the
joint regressor is linear in the shape, so it folds into their blendshapes), with smplx's own ``lbs`` -- exactly
FLAME, a few hundred instead of 5,023 vertices, and no per-call copy of the blendshape tensor.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.flame import (
    NUM_EXPRESSION,
    NUM_SHAPE,
    FlameModel,
    FlameParams,
    axis_angle_to_matrix,
)
from utils.core.config import Range

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
    max_rejections: int = 0  # give up after this many rejected LM steps in a row (0: until the damping reaches 1e10)
    tolerance: float = 1e-6  # stop a stage when an accepted step lowers the loss by less than this fraction
    contour_passes: int = 3  # most narrow-scale solves, re-looking up the jaw-contour rows after each

    RANGES = {"focal": Range(0), "focal_ratio": Range(0, lo_open=True), "focal_std": Range(0, lo_open=True),
              "rigid_iterations": Range(0), "iterations": Range(0), "num_shape": Range(0), "num_expression": Range(0),
              "landmark_sigma_px": Range(0, lo_open=True), "landmark_sigma_iod": Range(0),
              "shape_std": Range(0, lo_open=True), "expression_std": Range(0, lo_open=True),
              "jaw_std": Range(0, lo_open=True), "eyes_std": Range(0, lo_open=True), "robust_k": Range(0, lo_open=True),
              "rigid_robust_scale": Range(0, lo_open=True), "contour_weight": Range(0), "iris_weight": Range(0),
              "temporal_weight": Range(0), "temporal_std_rotation": Range(0, lo_open=True),
              "temporal_std_translation": Range(0, lo_open=True), "temporal_std_jaw": Range(0, lo_open=True),
              "temporal_std_expression": Range(0, lo_open=True)}


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


class LandmarkFlame:
    """FLAME evaluated only where the landmarks live (static, dynamic contour, pupils), batched over frames.

    ``forward`` returns (T, 68, 3) iBUG landmarks in FLAME model space (contour rows selected per frame by the head's
    rotation relative to the camera through smplx's lookup; NaN without a dynamic embedding) and (T, 2, 3) pupils
    (subject's right, left)."""

    def __init__(self, flame: FlameModel) -> None:
        from smplx.utils import find_joint_kin_chain

        if not flame.has_landmarks or flame.lmk_faces_idx.numel() != 51:
            raise ValueError(f"{flame.model_path}: fitting to iBUG landmarks needs the 51-point static embedding "
                             f"(flame_static_embedding.pkl), found "
                             f"{flame.lmk_faces_idx.numel() if flame.has_landmarks else 0} points")
        sm = flame.flame
        dev, dt = flame.v_template.device, flame.v_template.dtype
        faces = flame.faces
        static_tri = faces[flame.lmk_faces_idx]  # (51, 3)
        dyn = flame.dynamic_embedding
        parts = [static_tri.reshape(-1)]
        if dyn is not None:
            self.dyn_faces = torch.as_tensor(dyn["lmk_face_idx"], device=dev)  # (B, 17)
            self.dyn_bary = torch.as_tensor(dyn["lmk_b_coords"], dtype=dt, device=dev)  # (B, 17, 3)
            parts.append(faces[self.dyn_faces].reshape(-1))
        weights = sm.lbs_weights
        v0 = sm.v_template
        pupils = []
        for j in (4, 3):  # right eye (joint 4) then left eye (joint 3): the front-most vertex of each eyeball
            ids = torch.nonzero(weights[:, j] > 0.99).reshape(-1)
            if len(ids) == 0:
                raise ValueError(f"{flame.model_path}: no eyeball vertices for joint {j}")
            pupils.append(ids[torch.argmax(v0[ids, 2])])
        self.has_pupils = True
        parts.append(torch.stack(pupils))
        sub, inv = torch.unique(torch.cat(parts), return_inverse=True)
        n_static = static_tri.numel()
        self.static_tri = inv[:n_static].reshape(51, 3)
        off = n_static
        if dyn is not None:
            n_dyn = self.dyn_faces.numel() * 3
            self.dyn_tri = inv[off:off + n_dyn].reshape(*self.dyn_faces.shape, 3)  # (B, 17, 3) sub-vertex ids
            off += n_dyn
        self.pupils = inv[off:off + 2]
        self.static_bary = flame.lmk_bary_coords.to(dt)
        self.has_contour = dyn is not None
        # sub-model: the selected vertices plus 5 virtual vertices at the joints (J = J_reg @ (T + S beta) is linear)
        J_reg = sm.J_regressor  # (5, V)
        sd = torch.cat([sm.shapedirs, sm.expr_dirs], dim=-1)  # (V, 3, 400)
        self.v_template = torch.cat([v0[sub], J_reg @ v0])
        self.shapedirs = torch.cat([sd[sub], torch.einsum("jv,vck->jck", J_reg, sd)])
        V = v0.shape[0]
        pd = sm.posedirs.reshape(-1, V, 3)  # smplx keeps (P, V * 3)
        self.posedirs = torch.cat([pd[:, sub], torch.zeros(pd.shape[0], 5, 3, dtype=dt, device=dev)], 1).reshape(
            pd.shape[0], -1)
        self.J_regressor = torch.cat([torch.zeros(5, len(sub), dtype=dt, device=dev), torch.eye(5, dtype=dt,
                                                                                                   device=dev)], 1)
        self.lbs_weights = torch.cat([weights[sub], torch.eye(5, dtype=dt, device=dev)])
        self.parents = sm.parents
        self.neck_kin_chain = torch.as_tensor(find_joint_kin_chain(1, sm.parents), device=dev)
        self.num_sub = len(sub)
        self.device, self.dtype = dev, dt
        # RMS landmark displacement of each blendshape (metres per coefficient), for the fit's preconditioning
        self.basis_rms = self.shapedirs[:len(sub)].square().sum(1).mean(0).sqrt()  # (400,)

    def shaped(self, shape: Tensor) -> "LandmarkFlame":
        """A copy with the identity ``shape`` (1, 300) folded into the template: its forward takes ``shape=None`` and
        evaluates only the 100 expression blendshapes (a quarter of the work; for fits with a known shape)."""
        from copy import copy

        out = copy(self)
        sd = self.shapedirs
        out.v_template = self.v_template + sd[..., :NUM_SHAPE] @ shape.reshape(-1).to(sd)
        out.shapedirs = sd[..., NUM_SHAPE:].contiguous()
        return out

    def forward(self, shape: Tensor | None, expression: Tensor, neck: Tensor, jaw: Tensor, eyes: Tensor,
                rotation: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """shape (1 or T, 300) (None after :meth:`shaped`), expression (T, 100), neck / jaw (T, 3), eyes (T, 6) (left,
        right eye), rotation (T, 3, 3) the head's rotation relative to the camera (for the contour lookup), or
        ``rows`` (T,) the contour rows to use (:meth:`contour_rows`) -> (landmarks (T, 68, 3), pupils (T, 2, 3)) in
        model space."""
        from smplx.lbs import lbs

        T = expression.shape[0]
        zeros = torch.zeros(T, 3, dtype=self.dtype, device=self.device)
        pose = torch.cat([zeros, neck, jaw, eyes[:, :3], eyes[:, 3:]], dim=1)
        betas = expression if shape is None else torch.cat([shape.expand(T, -1), expression], dim=1)
        verts, _ = lbs(betas, pose, self.v_template, self.shapedirs, self.posedirs, self.J_regressor, self.parents,
                       self.lbs_weights)
        verts = verts[:, :self.num_sub]
        static = (verts[:, self.static_tri] * self.static_bary[None, ..., None]).sum(-2)  # (T, 51, 3)
        if self.has_contour:
            rows = self.contour_rows(rotation, neck) if rows is None else rows
            corners = torch.gather(verts, 1, self.dyn_tri[rows].reshape(T, -1, 1).expand(-1, -1, 3))
            contour = (corners.reshape(T, 17, 3, 3) * self.dyn_bary[rows][..., None]).sum(-2)
        else:
            contour = torch.full((T, 17, 3), float("nan"), dtype=self.dtype, device=self.device)
        return torch.cat([contour, static], dim=1), verts[:, self.pupils]

    def contour_rows(self, rotation: Tensor, neck: Tensor) -> Tensor:
        """(T,) row of the dynamic embedding per frame: smplx's own lookup (find_dynamic_lmk_idx_and_bcoords, fed
        a table of row numbers), from the y rotation of the neck chain with the head's rotation relative to the
        camera (rotation (T, 3, 3), OpenGL camera axes as in :data:`W2C`'s world) as its global pose."""
        from smplx.lbs import find_dynamic_lmk_idx_and_bcoords

        T = rotation.shape[0]
        full = torch.eye(3, dtype=self.dtype, device=self.device).repeat(T, 5, 1, 1)
        full[:, 0] = rotation.detach()
        full[:, 1] = axis_angle_to_matrix(neck.detach())
        table = torch.arange(self.dyn_faces.shape[0], device=self.device)[:, None]
        rows, _ = find_dynamic_lmk_idx_and_bcoords(full.new_zeros(T, 1, 3), full.reshape(T, -1), table,
                                                   self.dyn_bary, self.neck_kin_chain, pose2rot=False)
        return rows[:, 0]


def project(points: Tensor, R: Tensor, t: Tensor, focal: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Model-space points (T, L, 3) through the head pose (R (T, 3, 3), t (T, 3)) and the fitted camera
    (:func:`make_camera`) -> pixels (T, L, 2)."""
    w, h = image_size
    world = points @ R.transpose(1, 2) + t[:, None]
    x, y, z = world.unbind(-1)
    z = (-z).clamp_min(1e-3)  # camera looks down world -z
    return torch.stack([focal * x / z + w / 2.0, focal * (-y) / z + h / 2.0], dim=-1)


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
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_rotvec()


def _whiten(r: Tensor, w: Tensor, scale: Tensor, sigma: Tensor) -> Tensor:
    """Residual vectors r (B, L, 2) (IOD units) -> (B, L, 2) whose squared norms are w * rho(|r|^2) / sigma^2, rho the
    Geman-McClure function of scale ``scale``: the square root of each point's robust cost, as least squares want it.
    w (B, L) weights; scale, sigma (B, 1)."""
    f = w.sqrt() * scale / (r.square().sum(-1) + scale.square()).sqrt() / sigma
    return r * f[..., None]


def fit_flame_to_landmarks(flame: FlameModel, targets: LandmarkTargets, cfg: FlameFitConfig | None = None,
                           shape: Tensor | None = None, camera_name: str = "222200037", init: FlameParams | None = None,
                           previous: FlameParams | None = None, landmark_flame: "LandmarkFlame | None" = None
                           ) -> FlameFitResult:
    """Fit FLAME (one shape; per frame expression, jaw, eyes, head rotation and translation) and one focal length to
    the landmarks of T frames.

    The loss (a MAP estimate, see :class:`FlameFitConfig`) is a sum of squares: whitened robust landmark residuals,
    the priors as standard scores and, for T > 1, the frame-to-frame changes.  It is minimised by scipy's
    trust-region least-squares solver (``scipy.optimize.least_squares``, method "trf") with the exact Jacobian from
    autograd: frames are independent given the shared shape and focal length, so one backward pass through a batch
    that repeats every frame once per residual yields every frame's Jacobian block.  Stages: rigid (head rotation and
    translation, static points, wide robust scale), then everything with the wide scale, then with the narrow one
    (``robust_k`` sigmas); the contour rows are looked up between stages.

    Args:
        flame: the FLAME model (with its 51-point static embedding; the dynamic one adds the contour).
        targets: LandmarkTargets: points (T, 68, 2) pixels, image_size (w, h), weights (T, 68), irises (T, 2, 2).
        cfg: FlameFitConfig.
        shape: (1, 300) a known identity shape, kept fixed (e.g. fitted on a neutral frame); None: fitted.
        camera_name: serial of the fitted camera (the NeRSemble frontal camera by default).
        init: FlameParams (1 or T frames) to start from instead of PnP's rigid pose of the mean face (a warm start,
            e.g. the previous frame of a video: :class:`FrameTracker`); its head pose, expression, jaw and eyes.
        previous: FlameParams (1 frame) of the frame BEFORE the first target frame: the frame-to-frame prior then
            also ties the first frame to it (smoothing that only looks backwards, for streaming).
        landmark_flame: a :class:`LandmarkFlame` of ``flame`` built once by the caller (per-frame fits skip its
            construction).
    Returns:
        FlameFitResult (params on ``flame``'s device; camera on the CPU).
    """
    cfg = cfg or FlameFitConfig()
    t_start = time.perf_counter()
    lf = landmark_flame if landmark_flame is not None else LandmarkFlame(flame)
    dev, dt = lf.device, lf.dtype
    T = targets.num_frames
    size = tuple(int(s) for s in targets.image_size)
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
    # landmark noise per frame in IOD units, and the robust scales (wide: rigid stage and first non-rigid run)
    sigma = (cfg.landmark_sigma_px / iod).clamp_min(cfg.landmark_sigma_iod)[:, None]  # (T, 1)
    scale_narrow = cfg.robust_k * sigma
    scale_wide = torch.full_like(sigma, cfg.rigid_robust_scale)
    irises = None
    if targets.irises is not None and cfg.iris_weight > 0:
        irises = targets.irises.to(dev, dt)
    f0 = default_focal(size, cfg)
    static_only = (torch.arange(68, device=dev) >= 17).to(dt)

    # ---- initial pose per frame: PnP of the mean face's static landmarks
    zeros3 = torch.zeros(T, 3, dtype=dt, device=dev)
    with torch.no_grad():
        lm0, _ = (None, None) if init is not None else lf.forward(torch.zeros(1, NUM_SHAPE, dtype=dt, device=dev),
                            torch.zeros(T, NUM_EXPRESSION, dtype=dt, device=dev), zeros3, zeros3,
                            torch.zeros(T, 6, dtype=dt, device=dev), torch.eye(3, dtype=dt, device=dev).repeat(T, 1, 1))
    rot0, trans0 = [], []
    if init is not None:  # warm start: the given head pose (one frame is repeated over the T frames)
        ip = init.to("cpu", torch.float64)
        pick = [min(i, ip.num_frames - 1) for i in range(T)]
        rot0 = [_rotvec(ip.rotation_matrix[i].numpy()) for i in pick]
        trans0 = [ip.translation[i].numpy() for i in pick]
    else:
        for i in range(T):
            R, t = _pnp_init(lm0[i, 17:].cpu().numpy(), pts[i, 17:].cpu().numpy(), f0, size)
            rot0.append(_rotvec(R))
            trans0.append(t)
    depth = float(np.mean([-t[2] for t in trans0]))
    if not depth > 0:
        raise ValueError(f"fit_flame_to_landmarks: the starting head is not in front of the camera (depth {depth})")

    # ---- the solver's vector: T per-frame blocks [rotation 3, translation 3 (in head distances: one scale suits any
    # scene), expression, jaw 3, eyes 6 (with irises)], then the shared [shape, log focal length].  Shape and
    # expression are preconditioned: coefficient = variable * c, one variable unit moving the landmarks ~5 mm RMS
    fit_shape = shape is None
    fixed_shape = None if fit_shape else shape.to(dev, dt).reshape(1, NUM_SHAPE)
    c_all = (0.005 / lf.basis_rms.clamp_min(1e-9)).clamp(max=10.0)
    ns, ne = (cfg.num_shape if fit_shape else 0), cfg.num_expression
    c_shape, c_expr = c_all[None, :ns], c_all[None, NUM_SHAPE:NUM_SHAPE + ne]
    n_eyes = 6 if irises is not None else 0
    f_sizes = [3, 3, ne, 3, n_eyes]
    s_sizes = [ns, 1 if cfg.fit_focal else 0]
    Qf, Qs = sum(f_sizes), sum(s_sizes)
    lf_eval = lf if fit_shape else lf.shaped(fixed_shape)  # a known shape is folded into the template once
    K = 68 * 2 + 2 * 2  # residuals per frame: 68 points and 2 iris centres, x and y

    def frame_residuals(F: Tensor, S: Tensor, idx: Tensor, rows: Tensor | None, scale: Tensor, rigid: bool
                        ) -> tuple[Tensor, Tensor]:
        """(B, K) whitened residuals and (B, 68, 2) fitted landmarks (pixels) of frames ``idx`` (B,) for parameter
        rows F (B, Qf), S (B, Qs): every row is evaluated on its own (what the Jacobian trick needs)."""
        B = F.shape[0]
        rot, trans, psi_n, jaw, eyes = F.split(f_sizes, 1)
        beta_n, log_f = S.split(s_sizes, 1)
        shp = None if not fit_shape else torch.cat([beta_n * c_shape, beta_n.new_zeros(B, NUM_SHAPE - ns)], 1)
        expr = torch.cat([psi_n * c_expr, psi_n.new_zeros(B, NUM_EXPRESSION - ne)], 1)
        eyes = eyes if n_eyes else F.new_zeros(B, 6)
        focal = f0 * (torch.exp(log_f) if cfg.fit_focal else F.new_ones(B, 1))  # (B, 1)
        R = axis_angle_to_matrix(rot)
        lm, pupils = lf_eval.forward(shp, expr, F.new_zeros(B, 3), jaw, eyes, R, None if rows is None else rows[idx])
        t = trans * depth
        uv = project(lm, R, t, focal, size)
        w = wts[idx] * static_only if rigid else wts[idx]
        res = _whiten((torch.nan_to_num(uv) - pts[idx]) / iod[idx, None, None], w, scale[idx], sigma[idx])
        if irises is not None and not rigid:
            uv_p = project(pupils, R, t, focal, size)
            ri = _whiten((uv_p - irises[idx]) / iod[idx, None, None], torch.full_like(uv_p[..., 0], cfg.iris_weight),
                         scale[idx], sigma[idx])
        else:
            ri = res.new_zeros(B, 2, 2)
        return torch.cat([res, ri], 1).reshape(B, K), uv

    # ---- the linear residuals: priors as standard scores (d * x) and, for T > 1, the frame-to-frame changes
    # ((x[t + 1] - x[t]) * tw over the per-frame blocks)
    def block(parts: list) -> Tensor:
        return torch.cat([torch.as_tensor(p, dtype=torch.float64).reshape(-1).expand(n) for p, n in parts])

    ce = c_expr[0].double().cpu()
    d_f = block([(0.0, 6), (ce / cfg.expression_std, ne), (1.0 / (cfg.jaw_std * torch.tensor([1.0, 0.1, 0.1])), 3),
                 (1.0 / cfg.eyes_std, n_eyes)])
    d_s = block([(c_shape[0].double().cpu() / cfg.shape_std, ns), (1.0 / cfg.focal_std, s_sizes[1])])
    tw = None
    if (T > 1 or previous is not None) and cfg.temporal_weight > 0:
        tw = math.sqrt(cfg.temporal_weight) * block([
            (1.0 / cfg.temporal_std_rotation, 3), (1.0 / cfg.temporal_std_translation, 3),
            (ce / cfg.temporal_std_expression, ne), (1.0 / cfg.temporal_std_jaw, 3),
            (1.0 / cfg.temporal_std_jaw, n_eyes)])
    n_points = float(wts.sum().clamp_min(1.0))
    frame_of = torch.arange(T, device=dev)
    sel = torch.eye(K, dtype=dt, device=dev).repeat(T, 1)  # row b = t * K + k picks residual k of frame t
    idx_rep = frame_of.repeat_interleave(K)
    X = torch.zeros(T, Qf, dtype=torch.float64)  # per-frame variables (solver state, float64 on the CPU)
    X[:, 0:3] = torch.as_tensor(np.array(rot0))
    X[:, 3:6] = torch.as_tensor(np.array(trans0) / depth)
    Y = torch.zeros(Qs, dtype=torch.float64)  # shared variables

    def variables(p: FlameParams, rows: list[int]) -> Tensor:
        """(len(rows), Qf) solver variables of frames ``rows`` of ``p`` (the inverse of the read-out at the end)."""
        p = p.to("cpu", torch.float64)
        out = torch.zeros(len(rows), Qf, dtype=torch.float64)
        out[:, 0:3] = torch.as_tensor(np.array([_rotvec(p.rotation_matrix[i].numpy()) for i in rows]))
        out[:, 3:6] = p.translation[rows] / depth
        out[:, 6:6 + ne] = p.expression[rows, :ne] / ce
        out[:, 6 + ne:9 + ne] = p.jaw[rows]
        if n_eyes:
            out[:, 9 + ne:] = p.eyes[rows]
        return out

    if init is not None:
        X = variables(init, [min(i, init.num_frames - 1) for i in range(T)])
    X_prev = None if previous is None or tw is None else variables(previous, [previous.num_frames - 1])[0]

    def data_terms(Xv: Tensor, Yv: Tensor, rows: Tensor | None, scale: Tensor, rigid: bool, jac: bool):
        """Data residuals (T, K) (float64) and, with ``jac``, their Jacobian blocks (T, K, Qf) and (T, K, Qs): one
        backward pass through a batch that repeats every frame once per residual (frames are independent given the
        shared variables, which every row gets a copy of)."""
        F, S = Xv.to(dev, dt), Yv.to(dev, dt)[None].expand(T, -1)
        if not jac:
            with torch.no_grad():
                return frame_residuals(F, S, frame_of, rows, scale, rigid)[0].double().cpu(), None, None
        rs, jfs, jss = [], [], []
        step = max(1, 4096 // K)  # frames per backward pass (bounds the memory of long videos)
        for a in range(0, T, step):
            n = min(step, T - a)
            Fr = F[a:a + n].repeat_interleave(K, 0).requires_grad_(True)
            Sr = S[a:a + n].repeat_interleave(K, 0).requires_grad_(True)
            with torch.enable_grad():
                r, _ = frame_residuals(Fr, Sr, idx_rep[:n * K] + a, rows, scale, rigid)
                (r * sel[:n * K]).sum().backward()
            rs.append(r.detach()[torch.arange(n * K, device=dev), torch.arange(K, device=dev).repeat(n)])
            jfs.append(Fr.grad)
            jss.append(Sr.grad if Sr.grad is not None else torch.zeros_like(Sr))  # Qs = 0: no shared variables
        return (torch.cat(rs).reshape(T, K).double().cpu(), torch.cat(jfs).reshape(T, K, Qf).double().cpu(),
                torch.cat(jss).reshape(T, K, Qs).double().cpu())

    def cost(r: Tensor, Xv: Tensor, Yv: Tensor) -> float:
        c = r.square().sum() + (d_f * Xv).square().sum() + (d_s * Yv).square().sum()
        if tw is not None:
            c = c + ((Xv[1:] - Xv[:-1]) * tw).square().sum()
        if X_prev is not None:
            c = c + ((Xv[0] - X_prev) * tw).square().sum()
        return float(c)

    def solve(free_f: Tensor, free_s: Tensor, rows: Tensor | None, scale: Tensor, rigid: bool, max_iter: int
              ) -> float:
        """Levenberg-Marquardt on the variables ``free_f`` (Qf,) / ``free_s`` (Qs,) (bool) of X, Y in place; returns
        the final loss.  Hand-written rather than scipy.optimize.least_squares: its dense trust-region step takes an
        SVD of the whole Jacobian per iteration (seconds here), while the normal equations of this problem have an
        arrow shape -- one small block per frame plus the shared shape -- solved through the Schur complement of the
        shared block in milliseconds.  For T > 1 the step neglects the frame-to-frame coupling of the temporal
        prior (its gradient is exact, so every accepted step still lowers the true loss)."""
        nonlocal X, Y
        fi, si = torch.nonzero(free_f)[:, 0], torch.nonzero(free_s)[:, 0]
        df2, ds2 = d_f[fi].square(), d_s[si].square()
        tdiag = torch.zeros(T, len(fi), dtype=torch.float64)
        if tw is not None:
            deg = torch.full((T, 1), 2.0, dtype=torch.float64)
            deg[0] = deg[-1] = 1.0
            if T == 1:
                deg[0] = 0.0
            if X_prev is not None:
                deg[0] += 1.0
            tdiag = deg * tw[fi].square()
        lam = 1e-3
        r, Jf, Js = data_terms(X, Y, rows, scale, rigid, True)
        c = cost(r, X, Y)
        for _ in range(max_iter):
            Jf_, Js_ = Jf[..., fi], Js[..., si]
            gf = torch.einsum("tkq,tk->tq", Jf_, r) + df2 * X[:, fi]
            if tw is not None:
                diff = (X[1:] - X[:-1]) * tw.square()
                gt = torch.zeros_like(X)
                gt[1:] += diff
                gt[:-1] -= diff
                if X_prev is not None:
                    gt[0] += (X[0] - X_prev) * tw.square()
                gf = gf + gt[:, fi]
            gs = torch.einsum("tkq,tk->q", Js_, r) + ds2 * Y[si]
            A = Jf_.transpose(1, 2) @ Jf_ + torch.diag_embed(df2 + tdiag)  # (T, qf, qf)
            B = Jf_.transpose(1, 2) @ Js_  # (T, qf, qs)
            C = torch.einsum("tkq,tkp->qp", Js_, Js_) + torch.diag(ds2)
            improved = False
            tries = 0
            while lam < 1e10 and (cfg.max_rejections <= 0 or tries <= cfg.max_rejections):
                tries += 1
                Ad = A + torch.diag_embed(lam * A.diagonal(dim1=1, dim2=2).clamp_min(1e-9))
                Cd = C + torch.diag(lam * C.diagonal().clamp_min(1e-9))
                L = torch.linalg.cholesky(Ad)
                AiB = torch.cholesky_solve(B, L)
                Aig = torch.cholesky_solve(gf[..., None], L)[..., 0]
                Sc = Cd - torch.einsum("tqp,tqr->pr", B, AiB)
                ds = torch.linalg.solve(Sc, -gs + torch.einsum("tqp,tq->p", B, Aig)) if len(si) else gs.new_zeros(0)
                dx = -Aig - (AiB @ ds[:, None])[..., 0] if len(si) else -Aig
                Xn, Yn = X.clone(), Y.clone()
                Xn[:, fi] += dx
                Yn[si] += ds
                rn, _, _ = data_terms(Xn, Yn, rows, scale, rigid, False)
                cn = cost(rn, Xn, Yn)
                if math.isfinite(cn) and cn < c:
                    improved = True
                    lam = max(lam / 3.0, 1e-7)
                    break
                lam *= 4.0
            if not improved:
                break
            X, Y, rel = Xn, Yn, (c - cn) / max(c, 1e-30)
            c = cn
            if rel < cfg.tolerance:
                break
            r, Jf, Js = data_terms(X, Y, rows, scale, rigid, True)
        return c / n_points

    def contour_rows() -> Tensor | None:
        if not lf.has_contour:
            return None
        return lf.contour_rows(axis_angle_to_matrix(X[:, :3].to(dev, dt)), zeros3)

    losses = {}
    pose_f = torch.arange(Qf) < 6
    all_f, all_s = torch.ones(Qf, dtype=torch.bool), torch.ones(Qs, dtype=torch.bool)
    no_s = torch.zeros(Qs, dtype=torch.bool)
    if cfg.rigid_iterations > 0:
        losses["rigid"] = solve(pose_f, no_s, contour_rows(), scale_wide, True, cfg.rigid_iterations)
    if cfg.iterations > 0:
        n = max(1, cfg.iterations // 2) if cfg.wide_stage else cfg.iterations
        if cfg.wide_stage:
            losses["non_rigid_wide"] = solve(all_f, all_s, contour_rows(), scale_wide, False, n)
        rows = contour_rows()
        for _ in range(max(1, cfg.contour_passes)):  # the contour rows jump with the head's yaw: solve again until
            # they stay
            losses["non_rigid"] = solve(all_f, all_s, rows, scale_narrow, False, n)
            new = contour_rows()
            if rows is None or torch.equal(new, rows):
                break
            rows = new
    if not all(math.isfinite(v) for v in losses.values()):
        raise FloatingPointError(f"FLAME landmark fit diverged (losses {losses})")

    with torch.no_grad():
        rows = contour_rows()
        F, S = X.to(dev, dt), Y.to(dev, dt)[None]
        _, uv = frame_residuals(F, S.expand(T, -1), frame_of, rows, scale_narrow, False)
        rot, trans, psi_n, jaw, eyes = F.split(f_sizes, 1)
        beta_n, log_f = S.split(s_sizes, 1)
        focal = f0 * (float(torch.exp(log_f)) if cfg.fit_focal else 1.0)
        shp = fixed_shape if not fit_shape else torch.cat([beta_n * c_shape, beta_n.new_zeros(1, NUM_SHAPE - ns)], 1)
        expr = torch.cat([psi_n * c_expr, psi_n.new_zeros(T, NUM_EXPRESSION - ne)], 1)
        params = FlameParams(shape=shp.clone(), expression=expr.clone(),
                             rotation_matrix=axis_angle_to_matrix(rot).clone(), translation=(trans * depth).clone(),
                             jaw=jaw.clone(), neck=torch.zeros(T, 3, dtype=dt, device=dev),
                             eyes=eyes.clone() if n_eyes else torch.zeros(T, 6, dtype=dt, device=dev),
                             scale=torch.ones(T, 1, dtype=dt, device=dev))
        if not lf.has_contour:
            uv[:, :17] = float("nan")
        errors = (uv[:, 17:] - pts[:, 17:]).norm(dim=-1).mean(-1)
    return FlameFitResult(params=params, camera=make_camera(focal, size, camera_name), landmarks=uv.detach(),
                          errors=errors.detach(), losses=losses, seconds=time.perf_counter() - t_start)


class FrameTracker:
    """FLAME tracking of a video stream, one frame at a time, with the person's shape and the focal length known
    (:meth:`calibrate`): the streaming counterpart of utils/face/reenactment.py's chunked batch fit.

    Each frame's fit (:func:`fit_flame_to_landmarks` with T = 1) is warm-started from the previous frame's result and
    its frame-to-frame prior (the batch fit's ``temporal_std_*``) ties it to that frame only: the smoothing looks
    backwards, so a frame's parameters are final as soon as it is fitted (a batch fit's smoothing also pulls every
    frame towards the next one).  The first frame starts cold (PnP, rigid stage); a frame without a face holds the
    previous frame's parameters.

    Args:
        flame: the FLAME model the landmarks are fitted with (its device runs the fit's FLAME; the solver is on the CPU).
        image_size: (w, h) of the frames.
        shape: (1, 300) the person's FLAME shape, held fixed.
        focal: focal length in pixels, held fixed.
        cfg: the landmark fit's settings (as the batch fit's ``reenact.flame_fit``).
        bias: (68, 2) the detector's systematic per-landmark offset on this face (pixels), subtracted from every frame.
        iterations: Levenberg-Marquardt iterations of the warm-started frames (0: ``cfg.iterations``); the cold first
            frame uses ``cfg``'s.
    """

    def __init__(self, flame: FlameModel, image_size: tuple[int, int], shape: Tensor, focal: float,
                 cfg: FlameFitConfig | None = None, bias: Tensor | None = None, iterations: int = 0) -> None:
        cfg = cfg or FlameFitConfig()
        if iterations < 0:
            raise ValueError(f"FrameTracker: iterations must be >= 0, got {iterations}")
        self.flame = flame
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.shape = shape.detach().reshape(1, NUM_SHAPE).to("cpu", torch.float32)
        self.focal = float(focal)
        self.cold_cfg = replace(cfg, focal=self.focal, fit_focal=False)
        # a warm start is close to the optimum: no rigid stage, no wide-scale stage, an iteration that cannot improve
        # stops after a few rejected steps instead of raising the damping to 1e10 (most of the time otherwise), a
        # looser stopping tolerance, and at most one re-solve after the jaw-contour rows moved (not up to two; with
        # none, the rows lag a frame and the head turn with them: r 0.978 instead of 0.999 on the test motion)
        self.warm_cfg = replace(self.cold_cfg, rigid_iterations=0, iterations=iterations or cfg.iterations,
                                wide_stage=False, max_rejections=3, tolerance=1e-4, contour_passes=2)
        self.bias = torch.zeros(68, 2) if bias is None else bias.detach().reshape(68, 2).to("cpu", torch.float32)
        self.lf = LandmarkFlame(flame)
        self.previous: FlameParams | None = None  # (1 frame, CPU) the last frame's parameters
        self.frames = 0  # frames tracked (with or without a face)

    @classmethod
    def calibrate(cls, flame: FlameModel, points: Tensor, irises: Tensor | None, image_size: tuple[int, int],
                  cfg: FlameFitConfig | None = None, bias_correction: bool = True, iterations: int = 0
                  ) -> tuple["FrameTracker", dict]:
        """The tracker of one person from N frames with a face (the first ones of a stream): one FLAME fit of all N
        (shared shape and, as ``cfg`` says, focal length), and the detector's mean per-landmark offset on this face
        (the static landmarks' mean residual, as the batch fit's ``bias_correction``).

        Args:
            points: (N, 68, 2) iBUG-68 pixels; irises: (N, 2, 2) or None.
        Returns:
            (FrameTracker, info: focal_px, detector_offset_rms_px, calibration_frames, seconds)."""
        cfg = cfg or FlameFitConfig()
        t0 = time.perf_counter()
        first = fit_flame_to_landmarks(flame, LandmarkTargets(points, image_size, irises=irises), cfg)
        bias = torch.zeros(68, 2)
        if bias_correction:
            bias[17:] = (points.cpu() - first.landmarks.cpu().to(points.dtype))[:, 17:].mean(0)
        tracker = cls(flame, image_size, first.params.shape, float(first.camera.fx), cfg, bias, iterations)
        info = {"focal_px": float(first.camera.fx), "calibration_frames": int(points.shape[0]),
                "detector_offset_rms_px": float(bias[17:].norm(dim=-1).square().mean().sqrt()),
                "seconds": time.perf_counter() - t0}
        return tracker, info

    def step(self, points: Tensor | None, irises: Tensor | None = None) -> tuple[FlameParams, float]:
        """Track the next frame: points (68, 2) iBUG-68 pixels (None: no face in this frame), irises (2, 2) or None.
        Returns (FlameParams, 1 frame on the CPU, NeRSemble pose convention, scale 1; mean static-landmark error in
        pixels, NaN for a held frame)."""
        self.frames += 1
        if points is None:
            if self.previous is None:
                raise ValueError("FrameTracker.step: no face in the first frame to track (nothing to hold)")
            return self.previous, float("nan")
        pts = points.detach().reshape(1, 68, 2).to("cpu", torch.float32) - self.bias
        iris = None if irises is None else irises.detach().reshape(1, 2, 2).to("cpu", torch.float32)
        cfg = self.cold_cfg if self.previous is None else self.warm_cfg
        res = fit_flame_to_landmarks(self.flame, LandmarkTargets(pts, self.image_size, irises=iris), cfg,
                                     shape=self.shape, init=self.previous, previous=self.previous,
                                     landmark_flame=self.lf)
        self.previous = res.params.to("cpu")
        return self.previous, float(res.errors[0])


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
