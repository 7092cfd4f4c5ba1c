"""FLAME and a pinhole camera from 2D face landmarks (one photo, or the T frames of a video with one identity).

``fit_flame_to_landmarks`` fits, to iBUG-68 points (utils/landmarks.py; FLAME's 51 static landmarks = iBUG 17..67,
the 17 jaw-contour points 0..16 through FLAME's optional dynamic embedding) and optionally the two iris centres:

    rigid      head rotation and translation (the mean shape, neutral face), started from OpenCV's PnP solution
    non-rigid  + FLAME shape (shared by all frames, or given and kept fixed), expression, jaw and eye rotations, and the
               focal length (one for all frames; principal point at the image centre)

Loss: a Geman-McClure robust error of the landmark residuals in units of each frame's inter-ocular distance (so it is
the same for any image size; a landmark the detector got badly wrong saturates instead of pulling the head), Gaussian
priors on shape, expression, jaw and eyes (the coefficients are in standard deviations in FLAME), a log-normal prior
of the focal length around the default, and for T > 1 a temporal smoothness term on pose, expression, jaw and eyes.

Conventions (models/flame.py, NeRSemble): FLAME runs with zero global rotation; the head pose is the similarity
``world = scale * R @ v + t`` (``FlameParams``; scale stays 1: the shape prior fixes the head's metric size).  The
world frame is the camera frame turned to FLAME's axes: the camera sits at the origin, ``w2c = diag(1, -1, -1)``
(OpenCV camera looking down world -z, world y up), so a head looking straight into the camera has R = identity.
Focal length default: ``focal_ratio`` (2.5) times the longer image side, the field of view of a portrait lens (about
85 mm full-frame equivalent; NeRSemble's cameras: 2.49 x the image height) -- it is refined where the landmarks'
perspective says more, which for a face 1 m away they barely do; a wrong focal length mostly changes the fitted
distance, not the fitted face.

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

from models.flame import NUM_EXPRESSION, NUM_SHAPE, FlameModel, FlameParams, axis_angle_to_matrix
from utils.cameras import Camera

# world -> camera of the fitted camera: the camera frame with y and z flipped (see the module docstring)
W2C = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))


@dataclass
class FlameFitConfig:
    """Fitting FLAME and the camera to landmarks (``flame_fit.*`` keys of configs/fit.yaml)."""

    focal: float = 0.0  # focal length in pixels; 0: focal_ratio * the longer image side
    focal_ratio: float = 2.5  # default focal length / longer image side (a portrait lens; see the module docstring)
    fit_focal: bool = True  # refine the focal length (log-normal prior around the default / given value)
    focal_prior: float = 1.0  # weight of (log(f / f0))^2
    rigid_iterations: int = 30  # L-BFGS iterations of the rigid stage (head rotation and translation)
    iterations: int = 200  # L-BFGS iterations of the non-rigid stage (two runs of half, see the code)
    num_shape: int = 300  # FLAME shape coefficients fitted (the rest stay 0)
    num_expression: int = 100  # FLAME expression coefficients fitted (the rest stay 0)
    shape_prior: float = 3e-5  # weight of the mean squared shape coefficient
    expression_prior: float = 1e-3  # weight of the mean squared expression coefficient
    jaw_prior: float = 1e-2  # weight of the squared jaw rotation (radians; sideways and twist x10)
    eyes_prior: float = 1e-2  # weight of the squared eye rotations (radians)
    robust_scale: float = 0.05  # Geman-McClure scale of the non-rigid stage, in inter-ocular distances ...
    robust_min_px: float = 2.0  # ... but at least this many pixels (detector noise on small faces)
    rigid_robust_scale: float = 0.5  # the same of the rigid stage (wide: the start may be far off)
    contour_weight: float = 1.0  # weight of the 17 jaw-contour points (needs flame_dynamic_embedding.npy; 0: off)
    iris_weight: float = 1.0  # weight of the iris centres (detector output with irises; 0: off)
    temporal_weight: float = 1.0  # T > 1: weight of the squared frame-to-frame change of pose, expression, jaw, eyes


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

    def forward(self, shape: Tensor, expression: Tensor, neck: Tensor, jaw: Tensor, eyes: Tensor,
                rotation: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """shape (1, 300), expression (T, 100), neck / jaw (T, 3), eyes (T, 6) (left, right eye), rotation (T, 3, 3)
        the head's rotation relative to the camera (for the contour lookup), or ``rows`` (T,) the contour rows to
        use (:meth:`contour_rows`) -> (landmarks (T, 68, 3), pupils (T, 2, 3)) in model space."""
        from smplx.lbs import lbs

        T = expression.shape[0]
        zeros = torch.zeros(T, 3, dtype=self.dtype, device=self.device)
        pose = torch.cat([zeros, neck, jaw, eyes[:, :3], eyes[:, 3:]], dim=1)
        betas = torch.cat([shape.expand(T, -1), expression], dim=1)
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


def fit_flame_to_landmarks(flame: FlameModel, targets: LandmarkTargets, cfg: FlameFitConfig | None = None,
                           shape: Tensor | None = None, camera_name: str = "222200037") -> FlameFitResult:
    """Fit FLAME (one shape; per frame expression, jaw, eyes, head rotation and translation) and one focal length to
    the landmarks of T frames.

    Args:
        flame: the FLAME model (with its 51-point static embedding; the dynamic one adds the contour).
        targets: LandmarkTargets: points (T, 68, 2) pixels, image_size (w, h), weights (T, 68), irises (T, 2, 2).
        cfg: FlameFitConfig.
        shape: (1, 300) a known identity shape, kept fixed (e.g. fitted on a neutral frame); None: fitted.
        camera_name: serial of the fitted camera (the NeRSemble frontal camera by default).
    Returns:
        FlameFitResult (params on ``flame``'s device; camera on the CPU).
    """
    cfg = cfg or FlameFitConfig()
    t_start = time.perf_counter()
    lf = LandmarkFlame(flame)
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
    scale_nr = (cfg.robust_min_px / iod).clamp_min(cfg.robust_scale)[:, None]  # (T, 1) in IOD units
    irises = None
    if targets.irises is not None and cfg.iris_weight > 0:
        irises = targets.irises.to(dev, dt)
    f0 = default_focal(size, cfg)

    # ---- initial pose per frame: PnP of the mean face's static landmarks
    zeros3 = torch.zeros(T, 3, dtype=dt, device=dev)
    with torch.no_grad():
        lm0, _ = lf.forward(torch.zeros(1, NUM_SHAPE, dtype=dt, device=dev),
                            torch.zeros(T, NUM_EXPRESSION, dtype=dt, device=dev), zeros3, zeros3,
                            torch.zeros(T, 6, dtype=dt, device=dev), torch.eye(3, dtype=dt, device=dev).repeat(T, 1, 1))
    rot0, trans0 = [], []
    for i in range(T):
        R, t = _pnp_init(lm0[i, 17:].cpu().numpy(), pts[i, 17:].cpu().numpy(), f0, size)
        rot0.append(_rotvec(R))
        trans0.append(t)
    depth = float(np.mean([-t[2] for t in trans0]))
    # translation is optimised in units of the head's distance: one learning rate suits any scene scale
    rot = torch.tensor(np.array(rot0), dtype=dt, device=dev).requires_grad_(True)
    trans = (torch.tensor(np.array(trans0), dtype=dt, device=dev) / depth).requires_grad_(True)
    log_f = torch.zeros(1, dtype=dt, device=dev, requires_grad=True)
    fit_shape = shape is None
    # preconditioning: the optimised variables are coefficients times c, with c chosen so that one unit moves the
    # landmarks by about 5 mm RMS (FLAME's components range from centimetres to a fraction of a millimetre; without
    # it L-BFGS spends most of its iterations on the conditioning); components that barely move them are capped
    c_all = (0.005 / lf.basis_rms.clamp_min(1e-9)).clamp(max=10.0)
    c_shape, c_expr = c_all[None, :cfg.num_shape], c_all[None, NUM_SHAPE:NUM_SHAPE + cfg.num_expression]
    beta_n = torch.zeros(1, cfg.num_shape, dtype=dt, device=dev, requires_grad=fit_shape)
    fixed_shape = None if fit_shape else shape.to(dev, dt).reshape(1, NUM_SHAPE)
    psi_n = torch.zeros(T, cfg.num_expression, dtype=dt, device=dev, requires_grad=True)
    jaw = torch.zeros(T, 3, dtype=dt, device=dev, requires_grad=True)
    eyes = torch.zeros(T, 6, dtype=dt, device=dev, requires_grad=True)
    jaw_w = torch.tensor([1.0, 10.0, 10.0], dtype=dt, device=dev)

    def full_shape() -> Tensor:
        if fixed_shape is not None:
            return fixed_shape
        return torch.cat([beta_n * c_shape, beta_n.new_zeros(1, NUM_SHAPE - cfg.num_shape)], 1)

    def full_expression() -> Tensor:
        return torch.cat([psi_n * c_expr, psi_n.new_zeros(T, NUM_EXPRESSION - cfg.num_expression)], 1)

    rows = None
    wide = True  # the first non-rigid run uses the wide robust scale too (big deformations are not outliers)

    def evaluate(rigid: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, fitted landmarks (T, 68, 2), per-point squared residuals in IOD units (T, 68))."""
        R = axis_angle_to_matrix(rot)
        lm, pupils = lf.forward(full_shape(), full_expression(), zeros3, jaw, eyes, R, rows)
        focal = f0 * torch.exp(log_f)
        t = trans * depth
        uv = project(lm, R, t, focal, size)
        r2 = ((torch.nan_to_num(uv) - pts) / iod[:, None, None]).square().sum(-1)  # (T, 68)
        w = wts if not rigid else wts * (torch.arange(68, device=dev) >= 17)  # rigid: static points only
        scale = cfg.rigid_robust_scale if (rigid or wide) else scale_nr
        loss = (w * geman_mcclure(r2, scale)).sum() / w.sum().clamp_min(1.0)
        if irises is not None and not rigid:
            uv_p = project(pupils, R, t, focal, size)
            ri = ((uv_p - irises) / iod[:, None, None]).square().sum(-1)
            loss = loss + cfg.iris_weight * geman_mcclure(ri, scale_nr).mean() * (2.0 / 51.0)
        if not rigid:
            if fit_shape:
                loss = loss + cfg.shape_prior * (beta_n * c_shape).square().mean()
            loss = loss + cfg.expression_prior * (psi_n * c_expr).square().mean()
            loss = loss + cfg.jaw_prior * (jaw.square() * jaw_w).sum(-1).mean()
            loss = loss + cfg.eyes_prior * eyes.square().sum(-1).mean()
            loss = loss + cfg.focal_prior * log_f.square().sum() * 1e-2
            if T > 1 and cfg.temporal_weight > 0:
                d = lambda x: (x[1:] - x[:-1]).square().sum(-1).mean()  # noqa: E731
                loss = loss + cfg.temporal_weight * 1e-2 * (d(rot) + d(trans) + d(jaw) + d(eyes)
                                                            + 0.1 * d(psi_n * c_expr))
        return loss, uv, r2

    losses = {}
    stages = [("rigid", [rot, trans], cfg.rigid_iterations)]
    free = [rot, trans, psi_n, jaw] + ([beta_n] if fit_shape else []) + ([log_f] if cfg.fit_focal else [])
    if irises is not None:
        free.append(eyes)
    # the contour rows jump with the head's yaw: they stay fixed within an L-BFGS run (a smooth objective) and are
    # looked up again between runs (the non-rigid stage is split in two)
    n1 = cfg.iterations // 2
    stages += [("non_rigid", free, n1), ("non_rigid", free, cfg.iterations - n1)]
    for name, params, n in stages:
        if n <= 0:
            continue
        if lf.has_contour:
            with torch.no_grad():
                rows = lf.contour_rows(axis_angle_to_matrix(rot), zeros3)
        wide = name == "rigid" or (name == "non_rigid" and not losses.get("non_rigid_wide_done", False))
        # L-BFGS with a strong-Wolfe line search: a small smooth least-squares problem, started close (PnP), where
        # Adam's fixed first steps would throw the pose away; ``n`` bounds the function evaluations
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=n, max_eval=int(n * 1.25), history_size=20,
                                tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")
        rigid = name == "rigid"

        def closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss, _, _ = evaluate(rigid)
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            losses[name] = float(evaluate(rigid)[0])
        if name == "non_rigid":
            losses["non_rigid_wide_done"] = True
        if not math.isfinite(losses[name]):
            raise FloatingPointError(f"FLAME landmark fit diverged in the {name} stage (loss {losses[name]})")
    with torch.no_grad():
        if lf.has_contour:
            rows = lf.contour_rows(axis_angle_to_matrix(rot), zeros3)
        _, uv, _ = evaluate(False)
        focal = float(f0 * torch.exp(log_f))
        R = axis_angle_to_matrix(rot)
        params = FlameParams(shape=full_shape().detach().clone(), expression=full_expression().detach().clone(),
                             rotation_matrix=R.detach().clone(), translation=(trans * depth).detach().clone(),
                             jaw=jaw.detach().clone(), neck=torch.zeros(T, 3, dtype=dt, device=dev),
                             eyes=eyes.detach().clone(), scale=torch.ones(T, 1, dtype=dt, device=dev))
        if not lf.has_contour:
            uv[:, :17] = float("nan")
        errors = (uv[:, 17:] - pts[:, 17:]).norm(dim=-1).mean(-1)
    return FlameFitResult(params=params, camera=make_camera(focal, size, camera_name), landmarks=uv.detach(),
                          errors=errors.detach(), losses=losses, seconds=time.perf_counter() - t_start)


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
