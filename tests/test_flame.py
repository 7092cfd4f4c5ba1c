"""Tests of models/flame/ on the synthetic FLAME-format model (utils/data/synthetic/flame_*.py)."""
from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import trimesh
from scipy.spatial.transform import Rotation

from models import flame as F
from utils.data.synthetic.flame_files import FLAME_KEYS, write_flame_files
from utils.data.synthetic.flame_mesh import HEAD_C
from utils.data.synthetic.flame_model import make_flame_model, sample_identity_params
from utils.data.synthetic.flame_regions import face_mask_ids


@pytest.fixture(scope="module")
def model_dict():
    return make_flame_model(seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, model_dict):
    d = tmp_path_factory.mktemp("flame")
    write_flame_files(d, model_dict)
    return d


@pytest.fixture(scope="module")
def flame(data_dir):
    return F.FlameModel.from_data_dir(data_dir)


def _random_params(T: int, seed: int = 1) -> F.FlameParams:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, a=1.0: a * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    shape = torch.zeros(1, 300, dtype=torch.float64)
    shape[:, :30] = r(1, 30)
    R = torch.as_tensor(Rotation.from_rotvec(r(T, 3, a=0.3).numpy()).as_matrix())
    return F.FlameParams(shape=shape, expression=r(T, 100, a=0.5), rotation_matrix=R, translation=r(T, 3, a=0.1),
                         jaw=r(T, 3, a=0.15), neck=r(T, 3, a=0.15), eyes=r(T, 6, a=0.2),
                         scale=torch.full((T, 1), 1.3, dtype=torch.float64))


def _rodrigues(aa: np.ndarray) -> np.ndarray:
    th = np.linalg.norm(aa)
    if th < 1e-12:
        return np.eye(3)
    k = aa / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


def _numpy_flame(m: dict, p: F.FlameParams, t: int) -> np.ndarray:
    """Independent FLAME: shape/expression blend, pose blend, LBS, then [s R | t]."""
    beta = np.concatenate([p.shape[0].numpy(), p.expression[t].numpy()])
    v = m["v_template"] + m["shapedirs"] @ beta
    J = np.asarray(m["J_regressor"] @ v)
    poses = [np.zeros(3), p.neck[t].numpy(), p.jaw[t].numpy(), p.eyes[t, :3].numpy(), p.eyes[t, 3:].numpy()]
    Rs = [_rodrigues(a) for a in poses]
    feat = np.concatenate([(R - np.eye(3)).ravel() for R in Rs[1:]])
    v = v + m["posedirs"] @ feat
    parents = m["kintree_table"][0]
    G = []
    for j in range(5):
        L = np.eye(4)
        L[:3, :3] = Rs[j]
        L[:3, 3] = J[j] - (J[parents[j]] if j else 0)
        G.append(L if j == 0 else G[parents[j]] @ L)
    A = np.stack([G[j] @ np.block([[np.eye(3), -J[j][:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
                  for j in range(5)])
    T = np.einsum("vj,jab->vab", m["weights"], A)
    vh = np.concatenate([v, np.ones((len(v), 1))], 1)
    posed = np.einsum("vab,vb->va", T, vh)[:, :3]
    s, R, tr = p.scale[t, 0].item(), p.rotation_matrix[t].numpy(), p.translation[t].numpy()
    return s * posed @ R.T + tr


def test_forward_matches_numpy_lbs(flame, model_dict):
    p = _random_params(2)
    out = flame(p)
    assert out.shape == (2, model_dict["v_template"].shape[0], 3)
    for t in range(2):
        ref = _numpy_flame(model_dict, p, t)
        assert np.abs(out[t].double().numpy() - ref).max() < 2e-5
    # the jaw moves the chin but not the forehead
    p2 = F.FlameParams.neutral(1)
    p3 = F.FlameParams.neutral(1)
    p3.jaw[0, 0] = 0.3
    d = (flame(p3) - flame(p2))[0].norm(dim=-1).numpy()
    v = model_dict["v_template"]
    assert d[(v[:, 1] < 0.02) & (v[:, 2] > 0.06)].max() > 0.005
    assert d[v[:, 1] > 0.13].max() < 1e-6


def test_identities_differ_visibly(flame):
    rng = np.random.default_rng(0)
    a = F.FlameParams.from_numpy(sample_identity_params(rng))
    b = F.FlameParams.from_numpy(sample_identity_params(rng))
    d = (flame(a) - flame(b))[0].norm(dim=-1)
    assert 0.003 < d.mean().item() < 0.03 and d.max().item() > 0.008


def test_chumpy_style_pickle(data_dir, model_dict):
    path = data_dir / "flame2023.pkl"
    raw = path.read_bytes()
    assert b"chumpy.ch" in raw  # the file really references chumpy ...
    with pytest.raises(ModuleNotFoundError):
        with open(path, "rb") as fh:  # ... so a plain unpickler fails without chumpy
            pickle.load(fh, encoding="latin1")
    d = F.load_flame_pickle(path)
    assert isinstance(d["shapedirs"], np.ndarray)
    np.testing.assert_array_equal(d["shapedirs"], model_dict["shapedirs"])
    np.testing.assert_array_equal(d["v_template"], model_dict["v_template"])
    assert sp.issparse(d["J_regressor"]) and d["J_regressor"].shape == (5, len(model_dict["v_template"]))
    assert d["f"].dtype == np.int64
    # FLAME 2020 files name scipy's old private module (scipy.sparse.csc): still readable
    blob = pickle.dumps({"J": sp.csc_matrix(np.eye(3))}, protocol=2)
    assert b"scipy.sparse._csc" in blob
    old = path.parent / "old_scipy.pkl"
    old.write_bytes(blob.replace(b"scipy.sparse._csc", b"scipy.sparse.csc"))
    J = F.load_pickle_no_chumpy(old)["J"]
    np.testing.assert_array_equal(F._sparse_to_csr(J).toarray(), np.eye(3))


def test_npz_and_posedirs_layouts(tmp_path, model_dict):
    m = {k: model_dict[k] for k in FLAME_KEYS if k in model_dict}
    V = len(m["v_template"])
    ref = F.validate_flame_dict(dict(m), "x")["posedirs"]
    for pd in (m["posedirs"].reshape(V * 3, 36), m["posedirs"].reshape(V * 3, 36).T):
        d = F.validate_flame_dict({**m, "posedirs": pd}, "x")
        np.testing.assert_array_equal(d["posedirs"], ref)
    np.savez(tmp_path / "m.npz", **{**m, "J_regressor": m["J_regressor"].toarray()})
    d = F.load_flame_pickle(tmp_path / "m.npz")
    np.testing.assert_allclose(d["J_regressor"], m["J_regressor"].toarray())


def test_tracking_variants_agree(tmp_path, flame):
    p = _random_params(3, seed=2)
    p.scale[:] = 1.0  # VHAP has no scale
    p = F.FlameParams(**{n: getattr(p, n).float() for n in F.FlameParams._TENSORS})
    ners = tmp_path / "tracked_flame_params.npz"
    F.save_nersemble_tracking(ners, p)
    z = np.load(ners)
    assert z["shape"].shape == (1, 300) and z["rotation"].shape == (3, 3) and z["scale"].shape == (1, 1)
    # the stored Euler angles and matrices agree with the documented convention
    np.testing.assert_allclose(Rotation.from_euler(F.EULER_CONVENTION, z["rotation"]).as_matrix(),
                               z["rotation_matrices"], atol=1e-5)
    # a file with only Euler angles reads the same as one with matrices
    np.savez(tmp_path / "euler_only.npz", **{k: z[k] for k in z.files if k != "rotation_matrices"})
    a = F.load_tracking(ners)
    b = F.load_tracking(tmp_path / "euler_only.npz")
    torch.testing.assert_close(a.rotation_matrix, b.rotation_matrix, atol=1e-5, rtol=0)
    # VHAP stores fewer coefficients (zero-padded on load) and rotates about the root joint J0:
    # choose its translation so that it is the same world pose
    p_tr = F.FlameParams(**{n: getattr(p, n).clone() for n in F.FlameParams._TENSORS})
    p_tr.shape[:, 200:] = 0
    p_tr.expression[:, 50:] = 0
    F.save_nersemble_tracking(ners, p_tr)
    a = F.load_tracking(ners)
    # rotation about J0 of the *truncated* shape: recompute the VHAP translation for it
    _, joints = flame.model_space(p_tr)
    j0 = joints[:, 0]
    t_vhap = p_tr.translation - j0 + (p_tr.rotation_matrix @ j0[..., None])[..., 0]
    F.save_vhap_tracking(tmp_path / "vhap.npz", shape=p_tr.shape[0, :200].numpy(),
                         expr=p_tr.expression[:, :50].numpy(),
                         rotation=Rotation.from_matrix(p_tr.rotation_matrix.numpy()).as_rotvec(),
                         translation=t_vhap.numpy(), jaw_pose=p_tr.jaw.numpy(), neck_pose=p_tr.neck.numpy(),
                         eyes_pose=p_tr.eyes.numpy())
    v = F.load_tracking(tmp_path / "vhap.npz")
    assert v.rotate_about_root and not a.rotate_about_root
    wa, wv = flame(a), flame(v)
    assert (wa - wv).abs().max() < 1e-5
    baked = F.load_tracking(tmp_path / "vhap.npz", flame=flame)
    assert not baked.rotate_about_root and (flame(baked) - wa).abs().max() < 1e-5
    torch.testing.assert_close(flame.model_to_world(v), a.model_to_world(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="root joint"):
        v.model_to_world()
    one = F.load_tracking(ners, frame=1)
    assert one.num_frames == 1 and (flame(one)[0] - wa[1]).abs().max() < 1e-6


def test_model_to_world(flame):
    p = _random_params(2, seed=3).to(torch.float32)
    M = p.model_to_world()
    assert M.shape == (2, 4, 4)
    torch.testing.assert_close(M[:, 3], torch.tensor([[0, 0, 0, 1.0]] * 2))
    cano = flame.canonical_vertices(p)
    homo = torch.cat([cano, torch.ones_like(cano[..., :1])], -1)
    world = (homo @ M.transpose(1, 2))[..., :3]
    torch.testing.assert_close(world, flame(p), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(M[:, :3, :3]), p.scale[:, 0] ** 3)


def test_flame_subset_matches_smplx_forward(flame, data_dir):
    """FlameSubset (the sync-free face-mask rows of the animation path) poses exactly like FlameModel (smplx), for
    NeRSemble and VHAP (root-pivot) head poses and large expression / jaw / neck / eye values."""
    ids = F.load_face_mask(data_dir)
    sub = F.FlameSubset(flame, ids)
    p = _random_params(4, seed=5).to(torch.float32)
    p.expression.mul_(3)
    ref = flame(p)[:, torch.as_tensor(ids)]
    got = sub(p)
    assert got.shape == (4, len(ids), 3)
    assert (got - ref).abs().max() < 2e-6, float((got - ref).abs().max())
    vhap = F.FlameParams(**{n: getattr(p, n) for n in F.FlameParams._TENSORS}, rotate_about_root=True)
    assert (sub(vhap) - flame(vhap)[:, torch.as_tensor(ids)]).abs().max() < 2e-6
    _, joints = sub.model_space(p)
    torch.testing.assert_close(joints, flame.model_space(p)[1], atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="vertex ids"):
        F.FlameSubset(flame, [flame.num_vertices])


def test_flame_params_frames_cat_and_plain_dict(tmp_path):
    p = _random_params(5, seed=6).to(torch.float32)
    sel = p.frames([4, 0, 2])
    torch.testing.assert_close(sel.expression, p.expression[[4, 0, 2]])
    assert p.frames(slice(1, 3)).num_frames == 2 and torch.equal(sel.shape, p.shape)
    cat = F.FlameParams.cat([p.frame(1), p.frames(slice(2, 5))])
    torch.testing.assert_close(cat.jaw, p.jaw[1:])
    with pytest.raises(ValueError, match="shape"):
        F.FlameParams.cat([p, F.FlameParams.neutral(1)])
    d = p.as_dict()
    torch.save(d, tmp_path / "p.pt")  # plain tensors in a plain dict: loads with weights_only=True
    back = F.FlameParams.from_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    for n in F.FlameParams._TENSORS:
        torch.testing.assert_close(getattr(back, n), getattr(p, n))
    with pytest.raises(ValueError, match="lack"):
        F.FlameParams.from_dict({k: v for k, v in d.items() if k != "jaw"}, "x.pt")
    with pytest.raises(ValueError, match="bake"):
        F.FlameParams(**{n: getattr(p, n) for n in F.FlameParams._TENSORS}, rotate_about_root=True).as_dict()


def test_face_mask_submesh_and_mouth(data_dir, model_dict):
    ids = F.load_face_mask(data_dir)
    np.testing.assert_array_equal(ids, np.load(data_dir / "FLAME_mask_vertexID.npy"))
    (data_dir / "FLAME_mask_vertexID.npy").rename(data_dir / "hidden.npy")
    try:
        np.testing.assert_array_equal(F.load_face_mask(data_dir), ids)  # from FLAME_masks.pkl regions
    finally:
        (data_dir / "hidden.npy").rename(data_dir / "FLAME_mask_vertexID.npy")
    v, f = model_dict["v_template"], model_dict["f"].astype(np.int64)
    sv, sf, kept = F.face_mask_submesh(v, f, ids)
    np.testing.assert_array_equal(sv, v[ids])
    np.testing.assert_array_equal(kept, ids)
    np.testing.assert_array_equal(ids[sf], f[np.isin(f, ids).all(1)])  # same triangles, re-indexed
    # torch input keeps autograd
    tv = torch.tensor(v, requires_grad=True)
    tsv, _, _ = F.face_mask_submesh(tv, f, ids)
    tsv.sum().backward()
    assert tv.grad[ids].abs().sum() > 0
    # mouth: a boundary loop inside the lip region gets closed, with consistent winding
    lips = pickle.load(open(data_dir / "FLAME_masks.pkl", "rb"))["lips"]
    extra = F.mouth_closing_faces(v, f, lips)
    assert len(extra) > 0
    _, cf, _ = F.face_mask_submesh(v, f, ids, extra_faces=extra)
    assert len(cf) == len(sf) + len(extra)
    n_loops_open, n_loops_closed = len(F.boundary_loops(sf)), len(F.boundary_loops(cf))
    assert n_loops_closed == n_loops_open - 1
    assert trimesh.Trimesh(v[ids], cf, process=False).is_winding_consistent
    # front-facing: the mask holds the nose tip, not the back of the head
    assert v[ids][:, 2].min() > 0.0 and np.argmax(v[:, 2]) in ids


def test_subdivision(model_dict):
    v, f = model_dict["v_template"], model_dict["f"].astype(np.int64)
    ids = face_mask_ids(model_dict)
    sv, sf, _ = F.face_mask_submesh(v, f, ids)
    levels, plan = F.subdivide(sv, sf, 2, return_plan=True)
    n_edges = len(np.unique(np.sort(sf[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), 1), axis=0))
    assert len(levels[0][0]) == len(sv) + n_edges and len(levels[0][1]) == 4 * len(sf)
    assert len(levels[1][1]) == 16 * len(sf)
    np.testing.assert_array_equal(levels[1][0][: len(levels[0][0])], levels[0][0])  # prefix property
    assert plan.num_vertices(2) == len(levels[1][0])
    # the plan applied to a NEW (posed, batched) mesh equals trimesh's subdivision of that mesh
    posed = torch.tensor(sv) + 0.01 * torch.randn(2, *sv.shape, dtype=torch.float64)
    out = F.subdivide_vertices(posed, plan)
    for b in range(2):
        ref = F.subdivide(posed[b].numpy(), sf, 2)[-1][0]
        np.testing.assert_allclose(out[b].numpy(), ref, atol=1e-12)
    S2 = F.subdivision_matrix(plan)
    np.testing.assert_allclose(S2 @ posed[0].numpy(), out[0].numpy(), atol=1e-12)
    assert F.subdivide_vertices(posed, plan, level=1).shape[-2] == len(levels[0][0])


def test_vertex_normals_point_outward(flame, model_dict):
    v = flame.canonical_vertices(F.FlameParams.neutral(2))
    n = F.vertex_normals(v, flame.faces)
    assert n.shape == v.shape
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(v.shape[:2]), atol=1e-5, rtol=0)
    skin = torch.arange(v.shape[1]) < model_dict["num_skin_vertices"]
    centre = torch.tensor(HEAD_C, dtype=v.dtype)
    head = skin & (v[0, :, 1] > 0.06)  # skull part: star-shaped around the centre
    outward = ((v[0, head] - centre) * n[0, head]).sum(-1)
    assert (outward > 0).float().mean() > 0.97
    eye = torch.as_tensor(model_dict["eyeball_ids"][0])
    c = v[0, eye].mean(0)
    assert (((v[0, eye] - c) * n[0, eye]).sum(-1) > 0).all()


def test_landmarks(flame):
    p = F.FlameParams.neutral(1)
    lm = flame.landmarks(flame(p))
    assert lm.shape == (1, 51, 3)
    assert lm[0, :, 2].min() > 0.04  # all on the front of the face
    assert flame.dynamic_embedding["lmk_face_idx"].shape == (79, 17)


def test_errors(tmp_path, data_dir, model_dict):
    # missing files name the file and where it comes from
    with pytest.raises(FileNotFoundError, match="flame2023.pkl.*flame.is.tue.mpg.de"):
        F.FlameModel.from_data_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="FLAME_mask_vertexID.npy"):
        F.load_face_mask(tmp_path)
    with pytest.raises(FileNotFoundError, match="tracked_flame_params"):
        F.load_tracking(tmp_path / "nope.npz")
    # truncated pickle
    raw = (data_dir / "flame2023.pkl").read_bytes()
    (tmp_path / "flame2023.pkl").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(ValueError, match="flame2023.pkl.*truncated"):
        F.load_flame_pickle(tmp_path / "flame2023.pkl")
    # missing / misshaped keys
    m = {k: model_dict[k] for k in FLAME_KEYS if k in model_dict}
    bad = dict(m)
    del bad["weights"]
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump(bad, fh)
    with pytest.raises(ValueError, match=r"bad.pkl.*'weights'.*data/flame2023.pkl"):
        F.load_flame_pickle(tmp_path / "bad.pkl")
    bad = {**m, "shapedirs": m["shapedirs"][:, :, :100]}
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump(bad, fh)
    with pytest.raises(ValueError, match="'shapedirs' has 100 components, need at least 400"):
        F.load_flame_pickle(tmp_path / "bad.pkl")
    bad = {**m, "posedirs": m["posedirs"][:, :, :20]}
    with open(tmp_path / "bad.pkl", "wb") as fh:
        pickle.dump(bad, fh)
    with pytest.raises(ValueError, match="'posedirs' has shape"):
        F.load_flame_pickle(tmp_path / "bad.pkl")
    # tracking: truncated and missing keys
    p = F.FlameParams.neutral(2)
    F.save_nersemble_tracking(tmp_path / "t.npz", p)
    raw = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.npz.*truncated"):
        F.load_tracking(tmp_path / "trunc.npz")
    z = dict(np.load(tmp_path / "t.npz"))
    del z["jaw"]
    np.savez(tmp_path / "nojaw.npz", **z)
    with pytest.raises(ValueError, match=r"nojaw.npz.*'jaw'"):
        F.load_tracking(tmp_path / "nojaw.npz")
    z = dict(np.load(tmp_path / "t.npz"))
    z["shape"] = np.zeros((1, 400))
    np.savez(tmp_path / "big.npz", **z)
    with pytest.raises(ValueError, match="'shape' has 400 coefficients"):
        F.load_tracking(tmp_path / "big.npz")


# ------------------------------------------------------------------ issue 26 class 1: smplx never unpickles data files
def _chumpy_payload(cmd: str) -> bytes:
    """A protocol-4 pickle calling ``chumpy.ch.os.system(cmd)``: what the allow-list used to pass for cache files
    (it lets chumpy names through as stand-ins) and smplx's plain pickle.load then ran."""
    def s(text: str) -> bytes:
        b = text.encode()
        return b"\x8c" + bytes([len(b)]) + b

    return b"\x80\x04" + s("chumpy.ch") + s("os.system") + b"\x93" + s(cmd) + b"\x85R."


class _Trojan:
    """Pickles as ``chumpy.ch.os.system(cmd)`` followed by BUILD with {'x': array}: through the FLAME allow-list
    (chumpy names become stand-ins) it reads back as ``array``, so a cache check compares equal, while a plain
    pickle.load runs the command."""

    def __init__(self, cmd: str, array: np.ndarray) -> None:
        self.cmd, self.array = cmd, array

    def __reduce__(self):
        return (_Trojan, (self.cmd,), {"x": self.array})


def _trojan_pickle(obj: dict) -> bytes:
    """Pickle ``obj`` with every _Trojan named as chumpy.ch.os.system."""
    import sys
    import types

    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    ch = types.ModuleType("chumpy.ch")
    ch.os = types.SimpleNamespace(system=_Trojan)
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = types.ModuleType("chumpy"), ch
    _Trojan.__module__, _Trojan.__qualname__ = "chumpy.ch", "os.system"
    try:
        return pickle.dumps(obj, protocol=4)
    finally:
        _Trojan.__module__, _Trojan.__qualname__ = __name__, "_Trojan"
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _OsSystem:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        import os

        return (os.system, (self.cmd,))


@pytest.fixture
def fake_chumpy(tmp_path, monkeypatch):
    """An importable ``chumpy`` package whose ``ch`` module imports os, as the real one does."""
    pkg = tmp_path / "site" / "chumpy"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ch.py").write_text("import os\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield
    import sys

    for name in ("chumpy.ch", "chumpy"):
        sys.modules.pop(name, None)


SMPLX_CACHE_CASES = ["data_cache_model_chumpy", "data_cache_static_chumpy", "data_cache_model_os_system",
                     "tmp_cache_model_chumpy", "tmp_cache_static_os_system", "model_file_chumpy",
                     "static_file_chumpy"]


@pytest.mark.parametrize("case", SMPLX_CACHE_CASES)
def test_smplx_never_unpickles_a_planted_file(case, tmp_path, monkeypatch, model_dict, fake_chumpy):
    import hashlib
    import os
    import tempfile

    d = tmp_path / "flame"
    write_flame_files(d, model_dict)
    marker = tmp_path / "ran"
    cmd = f"touch {marker}"
    payload = _chumpy_payload(cmd) if "chumpy" in case else pickle.dumps(_OsSystem(cmd), protocol=2)
    if case == "data_cache_model_chumpy":  # the file the former cache check accepted as equal to the model
        m = F.load_flame_pickle(d / "flame2023.pkl")
        plain = {k: np.asarray(m[k].toarray() if sp.issparse(m[k]) else m[k], dtype=t) for k, t in (
            ("v_template", np.float32), ("f", np.int64), ("shapedirs", np.float32), ("posedirs", np.float32),
            ("J_regressor", np.float32), ("kintree_table", np.int64), ("weights", np.float32))}
        plain["kintree_table"] = _Trojan(cmd, plain["kintree_table"])
        payload = _trojan_pickle(plain)
        (tmp_path / "check.pkl").write_bytes(payload)  # the allow-list reads it as the model's own arrays
        assert np.array_equal(F.load_pickle_no_chumpy(tmp_path / "check.pkl")["kintree_table"],
                              plain["kintree_table"].array)
    if "chumpy" in case:  # the case is live: a plain pickle.load of it runs the command
        try:
            pickle.loads(payload)
        except AttributeError:  # the trojan's BUILD fails on os.system's return value, after it ran
            pass
        assert marker.exists()
        marker.unlink()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    model_file = d / "flame2023.pkl"
    key = hashlib.sha1(model_file.read_bytes()).hexdigest()[:16]  # the key of the former cache folders
    name = "FLAME_NEUTRAL.pkl" if "model" in case else F.STATIC_EMBEDDING
    if case.startswith("data_cache"):
        (d / ".smplx_cache" / key).mkdir(parents=True)
        (d / ".smplx_cache" / key / name).write_bytes(payload)
    elif case.startswith("tmp_cache"):
        folder = tmp / f"flame_smplx_cache_{os.getuid()}" / key
        folder.mkdir(parents=True)
        (folder / name).write_bytes(payload)
    else:  # the data file itself: read through the allow-list, where chumpy names are inert stand-ins
        (model_file if "model" in case else d / F.STATIC_EMBEDDING).write_bytes(payload)
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    tmp_before = sorted(tmp.iterdir())
    if case.endswith("_file_chumpy"):
        with pytest.raises(ValueError, match="flame"):
            F.FlameModel.from_data_dir(d)
    else:
        m = F.FlameModel.from_data_dir(d)
        assert torch.equal(m.flame.v_template, torch.as_tensor(np.asarray(model_dict["v_template"], np.float32)))
    assert not marker.exists(), f"{case}: the planted pickle ran"
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before, "nothing is written into the data folder"
    assert sorted(tmp.iterdir()) == tmp_before, "the private folder is removed"
