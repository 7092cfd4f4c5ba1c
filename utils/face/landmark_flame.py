"""FLAME evaluated only at the vertices its landmarks need, and the pinhole projection the landmark fit uses.

``LandmarkFlame`` is exactly FLAME (smplx's own ``lbs``) restricted to the vertices under the 51 static landmarks, the
17-point dynamic jaw contour and the two pupils, plus 5 virtual vertices that carry the joints (the joint regressor is
linear in the shape, so it folds into their blendshapes): a few hundred instead of 5,023 vertices, and no per-call copy
of the blendshape tensor.  Used by utils/face/flame_fit.py (fitting) and to draw or make landmark targets.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.flame import NUM_SHAPE, FlameModel, axis_angle_to_matrix


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

    def shaped(self, shape: Tensor, cache: bool = False) -> "LandmarkFlame":
        """A copy with the identity ``shape`` (1, 300) folded into the template: its forward takes ``shape=None`` and
        evaluates only the 100 expression blendshapes (a quarter of the work; for fits with a known shape).
        ``cache``: keep the copy and return it again for an equal shape (the per-frame tracker's fits)."""
        from copy import copy

        key = getattr(self, "_shaped_cache", None)
        if cache and key is not None and key[0].shape == shape.shape and torch.equal(key[0], shape):
            return key[1]
        out = copy(self)
        sd = self.shapedirs
        out.v_template = self.v_template + sd[..., :NUM_SHAPE] @ shape.reshape(-1).to(sd)
        out.shapedirs = sd[..., NUM_SHAPE:].contiguous()
        out.shape_folded = True
        # what posed_with_jacobian gathers per call, laid out once: the pose correctives of the jaw and eye joints
        # (3 joints, 9 rotation-matrix entries, V, 3) and the joints' expression blendshapes (5, 3, 100)
        V = out.v_template.shape[0]
        out.posedirs_jaw_eyes = self.posedirs.reshape(4, 9, V, 3)[1:].contiguous()
        out.joint_dirs = out.shapedirs[self.num_sub:]
        out.joint_template = out.v_template[self.num_sub:]
        out._shaped_cache = None
        # built per copy, for its blendshape columns
        for k in ("_lm_table", "_rows_key", "_rows_val", "_split_key", "_split_val", "_corner_key", "_corner_val",
                  "_np_tables"):
            out.__dict__.pop(k, None)
        prev = None if key is None else key[1]
        if cache and prev is not None:
            # the expression blendshapes, pose correctives and skinning weights do not depend on the shape: a new
            # shape (a stream's shape blended in over 16 frames: one per frame) keeps the last copy's landmark table
            # and the per-frame solver's NumPy tables, whose ~25 ms rebuild on one core was most of such a frame's
            # time (only the shaped template is new; utils/face/flame_fit.py _FrameTables.reshaped)
            if "_lm_table" in prev.__dict__:
                out._lm_table = prev._lm_table
            tabs = prev.__dict__.get("_np_tables")
            if tabs is not None:
                out._np_tables = tabs.reshaped(out)
        if cache:
            self._shaped_cache = (shape.detach().clone(), out)
        return out

    def free_shape(self) -> "LandmarkFlame":
        """A :meth:`shaped` copy of the mean shape whose blendshape columns are the 100 expression blendshapes THEN
        the 300 shape blendshapes: :meth:`posed_with_jacobian` given (T, 100 + S) coefficients [expression, shape]
        returns the landmarks' Jacobian with respect to the first S shape coefficients as well (the shape enters
        exactly as an expression does: through the shaped vertices and the joints).  For landmark fits that refine
        the shape with closed-form Jacobians (utils/face/flame_fit.py ``ShapeRefinement``).  Built once, cached."""
        out = getattr(self, "_free_shape", None)
        if out is None:
            out = self.shaped(torch.zeros(1, NUM_SHAPE, dtype=self.dtype, device=self.device))
            out.shapedirs = torch.cat([self.shapedirs[..., NUM_SHAPE:], self.shapedirs[..., :NUM_SHAPE]], -1)
            out.joint_dirs = out.shapedirs[self.num_sub:]
            out.__dict__.pop("_lm_table", None)
            self._free_shape = out
        return out

    shape_folded = False  # True on the copies made by :meth:`shaped`

    def corners(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Sub-model vertex ids (T, 70, 3) and barycentric weights (T, 70, 3) of the 68 iBUG landmarks (contour rows
        ``rows`` (T,), then the static ones) and the 2 pupils (one vertex, weight 1): the points of :meth:`forward`."""
        T = rows.shape[0]
        dev = self.static_tri.device
        ids = torch.cat([self.dyn_tri[rows], self.static_tri.expand(T, -1, -1),
                         self.pupils.reshape(1, 2, 1).expand(T, -1, 3)], 1)
        one = torch.tensor([1.0, 0.0, 0.0], dtype=self.dtype, device=dev).expand(T, 2, 3)
        bary = torch.cat([self.dyn_bary[rows], self.static_bary.expand(T, -1, -1), one], 1)
        return ids, bary

    def _landmark_table(self) -> Tensor:
        """(B * 17 + 53, 4, 3, C) the landmarks' blendshape Jacobian factors, built once per :meth:`shaped` copy
        (C its blendshape columns): rows b * 17 + i are contour point i of contour row b, then the 51 static points and
        the 2 pupils.  Entry 0 of the second axis is sum_c bary_c S_c (the corners' blendshapes blended), entry 1 + k
        M_k = sum_c bary_c w_kc (S_c - SJ_k) for the jaw and eye joints k (w their skinning weights, SJ_k their joint
        blendshapes), so that d landmark / d coefficients = entry 0 + sum_k (R_k - I) M_k (see
        :meth:`posed_with_jacobian`): the corners' (T, 210, 3, C) blendshapes are never gathered per evaluation."""
        tab = self.__dict__.get("_lm_table")
        if tab is None:
            ids, bary = self._all_corners()
            Sd = self.shapedirs[ids]  # (L, 3 corners, 3, C)
            w = self.lbs_weights[ids][..., 2:]  # (L, 3 corners, 3 joints)
            SJ = self.joint_dirs[2:]  # (3 joints, 3, C)
            bw = bary[..., None] * w  # (L, 3 corners, 3 joints)
            first = (Sd * bary[..., None, None]).sum(1)  # (L, 3, C)
            M = torch.einsum("lck,lcae->lkae", bw, Sd) - torch.einsum("lk,kae->lkae", bw.sum(1), SJ)
            tab = torch.cat([first[:, None], M], 1).contiguous()
            self._lm_table = tab
        return tab

    def _all_corners(self) -> tuple[Tensor, Tensor]:
        """Sub-model vertex ids (B * 17 + 53, 3) and barycentric weights of every contour row's 17 points, then the 51
        static points and the 2 pupils (the rows of :meth:`_landmark_table`)."""
        dev = self.static_tri.device
        ids = torch.cat([self.dyn_tri.reshape(-1, 3), self.static_tri, self.pupils.reshape(2, 1).expand(2, 3)])
        one = torch.tensor([[1.0, 0.0, 0.0]], dtype=self.dtype, device=dev).expand(2, 3)
        return ids, torch.cat([self.dyn_bary.reshape(-1, 3), self.static_bary, one])

    def _rows_table(self, rows: Tensor, E: int) -> Tensor:
        """(T, 70, 12, E) :meth:`_landmark_table` gathered for contour rows ``rows`` (T,), its first E columns; the
        last one is kept (a solve evaluates many times with the same rows: the calibration's (16, 70, 12, 400) gather
        costs more than the products it feeds)."""
        key = self.__dict__.get("_rows_key")
        if key is not None and key[1] == E and key[0].shape == rows.shape and torch.equal(key[0], rows):
            return self._rows_val
        tab = self._landmark_table()
        B = self.dyn_tri.shape[0]
        dev = rows.device
        lm = torch.cat([rows[:, None] * 17 + torch.arange(17, device=dev),
                        (B * 17 + torch.arange(53, device=dev)).expand(rows.shape[0], -1)], 1)  # (T, 70)
        val = tab[lm][..., :E].reshape(rows.shape[0], 70, 12, E)
        self._rows_key, self._rows_val = (rows.clone(), E), val
        return val

    def _split_tables(self, rows: Tensor, E: int) -> tuple[Tensor, Tensor]:
        """:meth:`_landmark_table`'s first E columns as the static points' (53, 12, E) -- the same for every frame --
        and the contour's for contour rows ``rows`` (T,): (T, 17, 12, E); the last one is kept (as :meth:`_rows_table`).
        A product over the frames then multiplies the static part once per point for all T frames at a time (one
        (2T x 12) @ (12 x E) product per point instead of T (2 x 12) ones) and never gathers it per frame."""
        key = self.__dict__.get("_split_key")
        if key is not None and key[1] == E and key[0].shape == rows.shape and torch.equal(key[0], rows):
            return self._split_val
        tab = self._landmark_table()
        B = self.dyn_tri.shape[0]
        static = tab[B * 17:, ..., :E].reshape(53, 12, E)
        lm = rows[:, None] * 17 + torch.arange(17, device=rows.device)  # (T, 17)
        val = (static, tab[lm][..., :E].reshape(rows.shape[0], 17, 12, E))
        self._split_key, self._split_val = (rows.clone(), E), val
        return val

    def _corner_tables(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What :meth:`posed_with_jacobian` reads per corner for contour rows ``rows`` (T,): vertex ids (T, N),
        barycentric weights (T, 70, 3), pose correctives (3 joints, 9, T, N, 3), jaw and eye skinning weights
        (T, N, 3), N = 210 corners; the last one is kept (a solve evaluates many times with the same rows)."""
        key = self.__dict__.get("_corner_key")
        if key is not None and key.shape == rows.shape and torch.equal(key, rows):
            return self._corner_val
        T = rows.shape[0]
        ids, bary = self.corners(rows)  # (T, 70, 3)
        ids, bary = ids.reshape(T, -1), bary.reshape(T, 70, 3)
        val = (ids, bary, self.posedirs_jaw_eyes[:, :, ids], self.lbs_weights[ids][..., 2:])
        self._corner_key, self._corner_val = rows.clone(), val
        return val

    def posed_with_jacobian(self, expression: Tensor, jaw: Tensor, eyes: Tensor, rows: Tensor, jacobian: bool = True,
                            factored: bool = False) -> tuple[Tensor, Tensor | tuple | None, Tensor | None]:
        """The 68 landmarks and 2 pupils of :meth:`forward` (model space, zero neck) with their exact Jacobians,
        written out instead of taken by autograd: only on a :meth:`shaped` copy and with contour rows ``rows`` (T,).

        With the global and neck rotations zero, smplx's linear blend skinning of a vertex v (shaped + pose
        correctives) reduces to x = v + sum_k w_k (R_k - I)(v - J_k) over the jaw and eye joints k, so x is linear in
        the expression (through v and the joints J_k) and only the three joint rotations enter non-linearly
        (their derivative: :func:`rotation_jacobian`).  The expression Jacobian of a landmark (bary-weighted corners)
        is therefore sum_c bary_c S_c + sum_k (R_k - I) M_k with per-landmark constants (:meth:`_landmark_table`).

        expression (T, E) (the first E <= 100 coefficients, the rest zero; on a :meth:`free_shape` copy E <= 400: the
        100 expression coefficients, then the first E - 100 shape coefficients), jaw (T, 3), eyes (T, 6) (left, right)
        -> points (T, 70, 3), d points / d expression (T, 70, 3, E), d points / d (jaw, eyes) (T, 70, 3, 9)
        (None without ``jacobian``).  ``factored``: d points / d expression as its two factors (T, 1, 3, 12) and the
        per-landmark tables of :meth:`_split_tables` (static (53, 12, E), contour (T, 17, 12, E)), whose product it
        is (a caller that multiplies it from the left by a (.., 70, m, 3) matrix saves a third of the work by
        multiplying the first factor first, and the static tables once for all frames:
        :func:`utils.face.flame_fit._factored_product`, the closed-form fit's Jacobians)."""
        from smplx.lbs import batch_rodrigues

        if not self.shape_folded or not self.has_contour:
            raise ValueError("LandmarkFlame.posed_with_jacobian needs a shaped() copy with a dynamic contour embedding")
        T, E = expression.shape
        ids, bary, P, w = self._corner_tables(rows)
        # every sub-model vertex (and joint) shaped once: (V, 3, E) @ (E, T), then the corners gathered
        v_all = self.v_template + torch.einsum("vae,te->tva", self.shapedirs[..., :E], expression)  # (T, V, 3)
        v = torch.gather(v_all, 1, ids[..., None].expand(-1, -1, 3))  # (T, N, 3) shaped corners
        J = v_all[:, self.num_sub + 2:]  # (T, 3, 3) jaw and eye joint positions
        aa = torch.stack([jaw, eyes[:, :3], eyes[:, 3:]], 1).reshape(-1, 3)  # (T * 3, 3)
        R = batch_rodrigues(aa).reshape(T, 3, 3, 3)
        eye3 = torch.eye(3, dtype=v.dtype, device=v.device)
        D = R - eye3  # (T, k, 3, 3)
        v = v + torch.einsum("tki,kitna->tna", D.reshape(T, 3, 9), P)  # + pose correctives (the neck's are zero)
        x = v + torch.einsum("tnk,tkab,tnkb->tna", w, D, v[:, :, None] - J[:, None])
        pts = (x.reshape(T, 70, 3, 3) * bary[..., None]).sum(2)
        if not jacobian:
            return pts, None, None
        # d pts / d expression = [I, D_jaw, D_eye, D_eye] (3 x 12) @ the landmark's (12, E) table
        Dcat = torch.cat([eye3.expand(T, 1, 3, 3), D], 1).permute(0, 2, 1, 3).reshape(T, 1, 3, 12)
        d_e = (Dcat, self._split_tables(rows, E)) if factored else Dcat @ self._rows_table(rows, E)  # (T, 70, 3, E)
        A = eye3 + torch.einsum("tnk,tkab->tnab", w, D)  # (T, N, 3, 3) d x / d v
        dR = rotation_jacobian(aa, R.reshape(-1, 3, 3)).reshape(T, 3, 3, 3, 3)  # d R / d axis-angle per joint
        dv = torch.einsum("tkip,kitna->tkpna", dR.reshape(T, 3, 9, 3), P)  # (T, k, 3, N, 3) pose correctives
        dx_p = torch.einsum("tnab,tkpnb->tnakp", A, dv) + torch.einsum("tnk,tkabp,tnkb->tnakp", w, dR,
                                                                        v[:, :, None] - J[:, None])
        d_p = (dx_p.reshape(T, 70, 3, 3, 9) * bary[:, :, :, None, None]).sum(2)
        return pts, d_e, d_p

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

    def contour_rows(self, rotation: Tensor, neck: Tensor | None) -> Tensor:
        """(T,) row of the dynamic embedding per frame: smplx's own lookup (find_dynamic_lmk_idx_and_bcoords, fed
        a table of row numbers), from the y rotation of the neck chain with the head's rotation relative to the
        camera (rotation (T, 3, 3), OpenGL camera axes as in the world of utils/face/flame_fit.py's ``W2C``) as its
        global pose; ``neck`` (T, 3), or None for a zero neck."""
        from smplx.lbs import find_dynamic_lmk_idx_and_bcoords

        T = rotation.shape[0]
        full = torch.eye(3, dtype=self.dtype, device=self.device).repeat(T, 5, 1, 1)
        full[:, 0] = rotation.detach()
        if neck is not None:  # None: a zero neck rotation (the identity already there)
            full[:, 1] = axis_angle_to_matrix(neck.detach())
        table = torch.arange(self.dyn_faces.shape[0], device=self.device)[:, None]
        rows, _ = find_dynamic_lmk_idx_and_bcoords(full.new_zeros(T, 1, 3), full.reshape(T, -1), table,
                                                   self.dyn_bary, self.neck_kin_chain, pose2rot=False)
        return rows[:, 0]


def _skew(v: Tensor) -> Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices [v]x."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(v.shape + (3,))


def rotation_jacobian(aa: Tensor, R: Tensor) -> Tensor:
    """d R / d aa of the Rodrigues rotation R (N, 3, 3) of axis-angle vectors aa (N, 3) -> (N, 3, 3, 3), the last
    index the parameter: dR/d aa_i = ((aa_i [aa]x + [aa x (I - R) e_i]x) / |aa|^2) R (Gallego & Yezzi, "A compact
    formula for the derivative of a 3-D rotation in exponential coordinates", 2015), [e_i]x at |aa| ~ 0."""
    n2 = aa.square().sum(-1)[:, None, None, None]  # (N, 1, 1, 1)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device)
    ImR_e = (eye - R).transpose(1, 2)  # (N, i, 3): row i = (I - R) e_i
    M = aa[:, :, None, None] * _skew(aa)[:, None] + _skew(torch.cross(aa[:, None].expand_as(ImR_e), ImR_e, dim=-1))
    small = n2 < 1e-12
    gen = torch.where(small, _skew(eye).expand(aa.shape[0], -1, -1, -1), M / torch.where(small, 1.0, n2))
    return (gen @ R[:, None]).permute(0, 2, 3, 1)


def project(points: Tensor, R: Tensor, t: Tensor, focal: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Model-space points (T, L, 3) through the head pose (R (T, 3, 3), t (T, 3)) and the fitted camera
    (utils/face/flame_fit.py ``make_camera``: principal point at the image centre, looking down world -z)
    -> pixels (T, L, 2)."""
    w, h = image_size
    world = points @ R.transpose(1, 2) + t[:, None]
    x, y, z = world.unbind(-1)
    z = (-z).clamp_min(1e-3)  # camera looks down world -z
    return torch.stack([focal * x / z + w / 2.0, focal * (-y) / z + h / 2.0], dim=-1)
