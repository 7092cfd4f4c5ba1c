"""The FLAME layer: chumpy-free model loading, the smplx forward, tracking files, face mask and subdivision.

Where the files go (see README): put the FLAME 2023 model at ``data/flame2023.pkl`` (or the CC-BY
``flame2023_Open.pkl``; older ``generic_model.pkl`` / ``FLAME_NEUTRAL.pkl`` also work) next to
``flame_static_embedding.pkl`` (+ optional ``flame_dynamic_embedding.npy``) and the face mask
``FLAME_mask_vertexID.npy`` (or ``FLAME_masks.pkl``). The model is a licensed download from
https://flame.is.tue.mpg.de (registration required); ``flame2023_Open.pkl`` is released under CC-BY.

Conventions (design.md section 3):
    * FLAME model space: metres, y up, the face looks along +z.  FLAME always runs with zero global
      rotation; the tracked head pose is a similarity ``model_to_world = [scale * R | t]`` applied after it.
    * ``FlameParams`` holds one identity (``shape`` (1, 300)) over T frames.
    * Euler angles of NeRSemble's ``rotation`` key are read with ``EULER_CONVENTION`` (scipy notation,
      "XYZ" = intrinsic x, then y, then z: ``R = Rx(a) @ Ry(b) @ Rz(c)``, the same as pytorch3d's
      ``euler_angles_to_matrix(angles, "XYZ")``).  When the file also stores ``rotation_matrices`` those are
      used and the Euler angles are only checked against them (a warning names the mismatch).
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

PathLike = Union[str, os.PathLike]

NUM_SHAPE = 300
NUM_EXPRESSION = 100
NUM_JOINTS = 5  # global, neck, jaw, left eye, right eye
EULER_CONVENTION = "XYZ"  # scipy.spatial.transform notation (upper case = intrinsic)

FLAME_URL = "https://flame.is.tue.mpg.de"
MODEL_FILENAMES = ("flame2023.pkl", "flame2023_Open.pkl", "generic_model.pkl", "FLAME_NEUTRAL.pkl")
STATIC_EMBEDDING = "flame_static_embedding.pkl"
DYNAMIC_EMBEDDING = "flame_dynamic_embedding.npy"
MASK_VERTEX_IDS = "FLAME_mask_vertexID.npy"
MASKS_PKL = "FLAME_masks.pkl"
# FLAME_masks.pkl regions whose union is the face mask of the paper (design.md section 4).
FACE_MASK_REGIONS = ("face", "lips", "nose", "left_eyeball", "right_eyeball", "left_eye_region", "right_eye_region")

_WHERE = (
    "Put the FLAME 2023 model at data/flame2023.pkl (or flame2023_Open.pkl). It is a licensed download from "
    f"{FLAME_URL} (registration required); flame2023_Open.pkl is the CC-BY release."
)


# ============================================================================ chumpy-free loading
class _ChumpyStandIn:
    """Takes the place of any ``chumpy`` class while unpickling.

    chumpy's ``Ch`` objects pickle through the default ``object.__reduce_ex__``: the class is created without
    arguments and then ``__setstate__`` receives the instance ``__dict__``, whose key ``'x'`` holds the
    plain numpy array.  We keep that state and turn the object into the array after loading.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._args = args
        self._state: Any = None

    def __setstate__(self, state: Any) -> None:
        # protocol 0/1 may wrap the dict as (state, slotstate)
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        self._state = state

    def to_array(self, where: str) -> np.ndarray:
        state = getattr(self, "_state", None)
        if isinstance(state, dict) and "x" in state:
            return np.asarray(state["x"])
        args = getattr(self, "_args", ())  # NEWOBJ creates the object with __new__ only
        if args and isinstance(args[0], np.ndarray):
            return np.asarray(args[0])
        raise ValueError(
            f"{where}: a chumpy object of class {type(self).__name__} has no stored array ('x'); only plain chumpy "
            "Ch values are supported (re-export the model with plain numpy arrays)."
        )


def _standin_class(name: str) -> type:
    return type(name, (_ChumpyStandIn,), {})


def _numpy_pickle_functions() -> dict[str, Any]:
    try:  # numpy >= 2 keeps them in numpy._core; pickles of numpy 1 name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar, "_frombuffer": numeric._frombuffer}


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocols < 3 (always latin1); other codecs are refused."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"_codecs.encode with codec {encoding!r}")
    return text.encode("latin1", errors)


_BUILTIN_TYPES = {t.__name__: t for t in (object, dict, list, tuple, set, frozenset, int, float, complex, str, bytes,
                                          bytearray, bool)}
_BUILTIN_TYPES.update(unicode=str, long=int)  # Python 2 names


def _safe_global(module: str, name: str) -> Any:
    """The object a FLAME pickle may name, or None: numpy arrays/dtypes/scalars, scipy sparse matrices, builtin
    containers and numbers, and the two pickle helpers that rebuild them (copyreg._reconstructor, latin1 bytes)."""
    if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric"):
        return _numpy_pickle_functions().get(name)
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name)
    if module in ("builtins", "__builtin__"):
        return _BUILTIN_TYPES.get(name)
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
        import copyreg

        return copyreg._reconstructor  # builds an instance of an (allowed) class without running its __init__
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    if module == "scipy.sparse" or module.startswith("scipy.sparse."):
        # pickles from old scipy name private modules (scipy.sparse.csc) that newer scipy removes
        cls = getattr(sp, name, None)
        sparse_types = tuple(t for t in (getattr(sp, "spmatrix", None), getattr(sp, "sparray", None)) if t)
        if isinstance(cls, type) and issubclass(cls, sparse_types):
            return cls
    return None


class UnsafePickleError(ValueError):
    """A pickle names a class or function outside the FLAME allow-list (loading it could run code)."""


class _FlameUnpickler(pickle.Unpickler):
    """Unpickles only what FLAME files hold: chumpy classes become inert stand-ins, and everything else must be on
    the allow-list of :func:`_safe_global` (numpy, scipy.sparse, builtin containers).  Any other class or function
    (e.g. a ``__reduce__`` payload naming ``os.system``) is refused before it can run."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            return _standin_class(name)
        obj = _safe_global(module, name)
        if obj is None:
            raise UnsafePickleError(f"{module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"persistent id {pid!r}")


def _resolve_standins(obj: Any, where: str) -> Any:
    if isinstance(obj, _ChumpyStandIn):
        return obj.to_array(where)
    if isinstance(obj, dict):
        return {k: _resolve_standins(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_standins(v, where) for v in obj)
    return obj


def _unsafe(path: Any, exc: UnsafePickleError) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused to unpickle {exc.args[0]}: FLAME files hold only numpy arrays, scipy sparse matrices, "
        f"chumpy values and plain containers, and loading anything else could run code. Use the file as downloaded "
        f"from {FLAME_URL} (or re-export it with plain numpy arrays)")


def _restricted_unpickle(fh: Any, where: Any) -> Any:
    try:
        obj = _FlameUnpickler(fh, encoding="latin1").load()
    except UnsafePickleError as exc:
        raise _unsafe(where, exc) from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError, OverflowError) as exc:
        raise ValueError(f"{where}: could not unpickle ({type(exc).__name__}: {exc}); the file is truncated or "
                         "not a pickle") from exc
    return _resolve_standins(obj, str(where))


def load_pickle_no_chumpy(path: PathLike) -> Any:
    """Unpickle ``path`` (latin1, Python-2 pickles allowed) with every chumpy object turned into a numpy array.

    Only the allow-list of :class:`_FlameUnpickler` is created; any other class or function raises
    UnsafePickleError (a ValueError) naming the file and the class, before anything of it runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as fh:
        return _restricted_unpickle(fh, path)


def _read_npy(fh: Any, where: Any) -> np.ndarray:
    """One .npy stream; object arrays (pickled inside the file) go through the FLAME allow-list, never np.load's
    unrestricted unpickler."""
    fmt = np.lib.format
    start = fh.tell()
    version = fmt.read_magic(fh)
    if version == (1, 0):
        _, _, dtype = fmt.read_array_header_1_0(fh)
    elif version == (2, 0):
        _, _, dtype = fmt.read_array_header_2_0(fh)
    else:  # pragma: no cover - version 3 (utf8 field names) has no public header reader
        _, _, dtype = fmt._read_array_header(fh, version)
    if not dtype.hasobject:
        fh.seek(start)
        return fmt.read_array(fh, allow_pickle=False)
    arr = _restricted_unpickle(fh, where)
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{where}: expected a numpy array, found {type(arr).__name__}")
    return arr


def load_npy_no_chumpy(path: PathLike) -> np.ndarray:
    """``np.load`` of a .npy file, with object arrays unpickled through the FLAME allow-list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with open(path, "rb") as fh:
            return _read_npy(fh, path)
    except UnsafePickleError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: could not read .npy ({type(exc).__name__}: {exc}); the file is truncated or "
                         "not an .npy file") from exc


def load_npz_no_chumpy(path: PathLike) -> dict[str, Any]:
    """Every array of an .npz (0-d object arrays unwrapped), object arrays through the FLAME allow-list."""
    path = Path(path)
    out: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                val = _read_npy(io.BytesIO(zf.read(member)), f"{path}[{member[:-4]!r}]")
                out[member[:-4]] = val.item() if val.dtype == object and val.ndim == 0 else val
    except UnsafePickleError:
        raise
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: could not read .npz ({exc}); the file is truncated or corrupt") from exc
    return out


def _sparse_to_csr(m: Any) -> sp.csr_matrix:
    """Sparse matrix (possibly unpickled from an old scipy) -> csr; rebuilt from its raw state if needed."""
    try:
        return sp.csr_matrix(m)
    except Exception:
        d = m.__dict__  # old pickles: data/indices/indptr plus '_shape' or 'shape'
        shape = d.get("_shape", d.get("shape"))
        cls = sp.csc_matrix if type(m).__name__.startswith("csc") else sp.csr_matrix
        return sp.csr_matrix(cls((d["data"], d["indices"], d["indptr"]), shape=shape))


def validate_flame_dict(data: dict, path: PathLike, min_coeffs: int = NUM_SHAPE + NUM_EXPRESSION) -> dict:
    """Check keys and shapes of a FLAME model dict; return it with arrays normalised.

    Output: ``v_template`` (V,3) float, ``f`` (F,3) int64, ``shapedirs`` (V,3,K>=min_coeffs) float,
    ``posedirs`` (V,3,36) float (the (V*3,36) and (36,V*3) layouts are reshaped), ``J_regressor`` (5,V)
    dense or scipy sparse, ``kintree_table`` (2,5) int64, ``weights`` (V,5) float.
    """
    def err(msg: str) -> ValueError:
        return ValueError(f"{path}: {msg}. {_WHERE}")

    if not isinstance(data, dict):
        raise err(f"expected a dict of arrays, found {type(data).__name__}")
    required = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights")
    missing = [k for k in required if k not in data]
    if missing:
        raise err(f"missing key(s) {missing} (found {sorted(data.keys())})")
    out = dict(data)
    v = np.asarray(data["v_template"], dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise err(f"key 'v_template' has shape {v.shape}, expected (V, 3)")
    nv = v.shape[0]
    out["v_template"] = v
    f = np.asarray(data["f"])
    if f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
        raise err(f"key 'f' has shape {f.shape} dtype {f.dtype}, expected (F, 3) integers")
    if f.size and (f.min() < 0 or f.max() >= nv):
        raise err(f"key 'f' indexes vertex {int(f.max())} but v_template has {nv} vertices")
    out["f"] = f.astype(np.int64)
    sd = np.asarray(data["shapedirs"], dtype=np.float64)
    if sd.ndim != 3 or sd.shape[:2] != (nv, 3):
        raise err(f"key 'shapedirs' has shape {sd.shape}, expected ({nv}, 3, K)")
    if sd.shape[2] < min_coeffs:
        raise err(f"key 'shapedirs' has {sd.shape[2]} components, need at least {min_coeffs} "
                  f"({NUM_SHAPE} shape + {NUM_EXPRESSION} expression, the FLAME 2020/2023 layout)")
    out["shapedirs"] = sd
    pd = np.asarray(data["posedirs"], dtype=np.float64)
    npose = (NUM_JOINTS - 1) * 9
    if pd.shape == (nv, 3, npose):
        pass
    elif pd.shape == (nv * 3, npose):  # flattened vertex-major layout, same memory order as (V,3,36)
        pd = pd.reshape(nv, 3, npose)
    elif pd.shape == (npose, nv * 3):  # the transposed layout smplx keeps internally
        pd = pd.T.reshape(nv, 3, npose)
    else:
        raise err(f"key 'posedirs' has shape {pd.shape}, expected ({nv}, 3, {npose}) or ({nv * 3}, {npose})")
    out["posedirs"] = pd
    jr = data["J_regressor"]
    if sp.issparse(jr):
        try:
            jr = _sparse_to_csr(jr)
        except Exception as exc:  # pragma: no cover - depends on the scipy that wrote the file
            raise err(f"key 'J_regressor' is a scipy sparse matrix that cannot be read ({exc})") from exc
    else:
        jr = np.asarray(jr, dtype=np.float64)
    if jr.shape != (NUM_JOINTS, nv):
        raise err(f"key 'J_regressor' has shape {jr.shape}, expected ({NUM_JOINTS}, {nv})")
    out["J_regressor"] = jr
    kt = np.asarray(data["kintree_table"])
    if kt.shape != (2, NUM_JOINTS):
        raise err(f"key 'kintree_table' has shape {kt.shape}, expected (2, {NUM_JOINTS})")
    out["kintree_table"] = kt.astype(np.int64)
    w = np.asarray(data["weights"], dtype=np.float64)
    if w.shape != (nv, NUM_JOINTS):
        raise err(f"key 'weights' has shape {w.shape}, expected ({nv}, {NUM_JOINTS})")
    out["weights"] = w
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        vals = out[key].data if sp.issparse(out[key]) else out[key]
        if not np.isfinite(vals).all():
            raise err(f"key '{key}' holds NaN or Inf values")
    return out


def load_flame_pickle(path: PathLike, validate: bool = True) -> dict:
    """Load a FLAME 2020/2023 model (.pkl, possibly with chumpy objects, or .npz) without chumpy.

    Returns a dict of numpy arrays (``J_regressor`` may be scipy sparse), validated by
    :func:`validate_flame_dict` unless ``validate=False``.  Errors name the file and the offending key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME model {path} not found. {_WHERE}")
    if path.suffix == ".npz":
        data = load_npz_no_chumpy(path)  # 0-d object arrays (sparse matrices, dicts) come back unwrapped
    else:
        data = load_pickle_no_chumpy(path)
    return validate_flame_dict(data, path) if validate else data


def load_static_embedding(path: PathLike) -> dict:
    """``flame_static_embedding.pkl`` -> {"lmk_face_idx": (L,) int64, "lmk_b_coords": (L,3) float}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark embedding {path} not found; it ships with the FLAME download "
                                f"({FLAME_URL}) and belongs next to the model, e.g. data/{STATIC_EMBEDDING}")
    d = load_pickle_no_chumpy(path)
    for key in ("lmk_face_idx", "lmk_b_coords"):
        if not isinstance(d, dict) or key not in d:
            raise ValueError(f"{path}: missing key '{key}' (expected lmk_face_idx (L,), lmk_b_coords (L,3))")
    idx = np.asarray(d["lmk_face_idx"]).astype(np.int64).reshape(-1)
    bc = np.asarray(d["lmk_b_coords"], dtype=np.float64)
    if bc.shape != (idx.shape[0], 3):
        raise ValueError(f"{path}: key 'lmk_b_coords' has shape {bc.shape}, expected ({idx.shape[0]}, 3)")
    return {"lmk_face_idx": idx, "lmk_b_coords": bc}


def load_dynamic_embedding(path: PathLike) -> dict:
    """``flame_dynamic_embedding.npy`` (pickled dict) -> lmk_face_idx (B,K) int64, lmk_b_coords (B,K,3)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dynamic landmark embedding {path} not found (optional; from {FLAME_URL}, "
                                f"goes to data/{DYNAMIC_EMBEDDING})")
    arr = load_npy_no_chumpy(path)
    d = arr[()] if arr.ndim == 0 else arr
    for key in ("lmk_face_idx", "lmk_b_coords"):
        if not isinstance(d, dict) or key not in d:
            raise ValueError(f"{path}: missing key '{key}' (expected lmk_face_idx (79,17), lmk_b_coords (79,17,3))")
    idx = np.asarray(d["lmk_face_idx"]).astype(np.int64)
    bc = np.asarray(d["lmk_b_coords"], dtype=np.float64)
    if bc.shape != idx.shape + (3,):
        raise ValueError(f"{path}: key 'lmk_b_coords' has shape {bc.shape}, expected {idx.shape + (3,)}")
    return {"lmk_face_idx": idx, "lmk_b_coords": bc}


def _smplx_plain_model(model: dict) -> dict[str, np.ndarray]:
    """The plain-numpy model dict that smplx.FLAME reads (no chumpy, no sparse matrices)."""
    return {
        "v_template": np.asarray(model["v_template"], dtype=np.float32),
        "f": np.asarray(model["f"], dtype=np.int64),
        "shapedirs": np.asarray(model["shapedirs"], dtype=np.float32),
        "posedirs": np.asarray(model["posedirs"], dtype=np.float32),
        "J_regressor": (model["J_regressor"].toarray() if sp.issparse(model["J_regressor"])
                        else np.asarray(model["J_regressor"])).astype(np.float32),
        "kintree_table": np.asarray(model["kintree_table"], dtype=np.int64),
        "weights": np.asarray(model["weights"], dtype=np.float32),
    }


@contextlib.contextmanager
def smplx_files(model: dict, static_embedding: Optional[dict]) -> Iterator[Path]:
    """A fresh private folder holding the plain-numpy ``FLAME_NEUTRAL.pkl`` + ``flame_static_embedding.pkl`` that
    smplx.FLAME reads; removed on exit.

    Why: smplx opens both files with the stock ``pickle.load``, which runs any code a pickle names.  So smplx never
    gets a file that came with the data or was left on disk by an earlier run (a cache could be replaced between
    our check and smplx's load): the folder is made by ``mkdtemp`` (mode 0700, unique name, so no one else can
    plant or swap a file in it), the files are created here with O_EXCL from arrays that already went through the
    FLAME allow-list, and the folder is deleted as soon as smplx has read them.  No cache is kept (writing the
    model takes well under a second), so nothing is ever written into the data folder.
    """
    plain = _smplx_plain_model(model)
    if static_embedding is None:  # smplx insists on the file; a single dummy landmark keeps it happy
        static_embedding = {"lmk_face_idx": np.zeros(1, np.int64), "lmk_b_coords": np.array([[1.0, 0.0, 0.0]])}
    static = {k: np.asarray(v) for k, v in static_embedding.items()}
    folder = Path(tempfile.mkdtemp(prefix="flame_smplx_"))
    try:
        for name, obj in (("FLAME_NEUTRAL.pkl", plain), (STATIC_EMBEDDING, static)):
            with open(folder / name, "xb") as fh:  # "x": O_EXCL, never an existing file or link
                pickle.dump(obj, fh, protocol=4)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ============================================================================ parameters / tracking
def _rot_from_euler(angles: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_euler(EULER_CONVENTION, angles).as_matrix()


def _euler_from_rot(mats: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(mats).as_euler(EULER_CONVENTION)


def axis_angle_to_matrix(aa: Tensor) -> Tensor:
    """Rodrigues: (..., 3) axis-angle -> (..., 3, 3), differentiable and safe at zero."""
    theta = aa.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = aa / theta
    kx, ky, kz = k.unbind(-1)
    zero = torch.zeros_like(kx)
    K = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], dim=-1).reshape(aa.shape[:-1] + (3, 3))
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(K)
    return eye + s * K + (1 - c) * (K @ K)


@dataclass
class FlameParams:
    """FLAME parameters of one identity over T frames (torch tensors).

    shape (1,300), expression (T,100), rotation_matrix (T,3,3), translation (T,3), jaw (T,3) axis-angle,
    neck (T,3), eyes (T,6) (left eye then right eye, axis-angle), scale (T,1).
    ``rotate_about_root``: False (NeRSemble): world = scale * R @ v + t.  True (VHAP): the rotation acts
    about FLAME's root joint J0 (which depends on shape/expression): world = R @ (v - J0) + J0 + t; use
    :meth:`FlameModel.model_to_world` or :meth:`FlameModel.bake_root_pivot` to resolve it.
    """

    shape: Tensor
    expression: Tensor
    rotation_matrix: Tensor
    translation: Tensor
    jaw: Tensor
    neck: Tensor
    eyes: Tensor
    scale: Tensor
    rotate_about_root: bool = False

    _TENSORS = ("shape", "expression", "rotation_matrix", "translation", "jaw", "neck", "eyes", "scale")

    def __post_init__(self) -> None:
        T = self.expression.shape[0]
        expected = {"shape": (1, NUM_SHAPE), "expression": (T, NUM_EXPRESSION), "rotation_matrix": (T, 3, 3),
                    "translation": (T, 3), "jaw": (T, 3), "neck": (T, 3), "eyes": (T, 6), "scale": (T, 1)}
        for name, shp in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shp:
                raise ValueError(f"FlameParams.{name} has shape {got}, expected {shp}")

    @property
    def num_frames(self) -> int:
        return self.expression.shape[0]

    @property
    def device(self) -> torch.device:
        return self.expression.device

    def to(self, *args: Any, **kwargs: Any) -> "FlameParams":
        return replace(self, **{n: getattr(self, n).to(*args, **kwargs) for n in self._TENSORS})

    def frame(self, i: int) -> "FlameParams":
        """Select frame ``i`` (keeps a T=1 leading dim)."""
        return replace(self, **{n: getattr(self, n)[i:i + 1] for n in self._TENSORS if n != "shape"})

    def frames(self, index: Union[slice, Sequence[int], Tensor]) -> "FlameParams":
        """Select several frames (a slice, a list of indices or an index tensor); the shape is shared."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return replace(self, **{n: getattr(self, n)[index] for n in self._TENSORS if n != "shape"})

    @classmethod
    def cat(cls, params: Sequence["FlameParams"]) -> "FlameParams":
        """Concatenate the frames of several FlameParams of one identity (their shapes must agree)."""
        params = list(params)
        if not params:
            raise ValueError("FlameParams.cat needs at least one FlameParams")
        first = params[0]
        for p in params[1:]:
            if p.rotate_about_root != first.rotate_about_root or not torch.equal(p.shape, first.shape):
                raise ValueError("FlameParams.cat: the parts differ in shape coefficients or head-pose convention")
        return replace(first, **{n: torch.cat([getattr(p, n) for p in params]) for n in cls._TENSORS if n != "shape"})

    def as_dict(self) -> dict[str, Tensor]:
        """Plain CPU tensors by field name (what model.pt and code.pt store; loads with torch.load(weights_only=True)).

        The head pose must be in the NeRSemble convention (``FlameModel.bake_root_pivot`` first for VHAP files)."""
        if self.rotate_about_root:
            raise ValueError("FlameParams.as_dict: bake the VHAP root pivot first (FlameModel.bake_root_pivot)")
        return {n: getattr(self, n).detach().cpu().clone() for n in self._TENSORS}

    @classmethod
    def from_dict(cls, d: dict, where: str = "<dict>") -> "FlameParams":
        """Inverse of :meth:`as_dict`; a missing key or a wrong shape raises ValueError naming ``where``."""
        missing = [n for n in cls._TENSORS if n not in d]
        if missing:
            raise ValueError(f"{where}: FLAME parameters lack {missing} (have {sorted(d)})")
        try:
            return cls(**{n: torch.as_tensor(d[n]).float() for n in cls._TENSORS})
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    @classmethod
    def neutral(cls, num_frames: int = 1, dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> "FlameParams":
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return cls(shape=z(1, NUM_SHAPE), expression=z(num_frames, NUM_EXPRESSION),
                   rotation_matrix=torch.eye(3, dtype=dtype, device=device).repeat(num_frames, 1, 1),
                   translation=z(num_frames, 3), jaw=z(num_frames, 3), neck=z(num_frames, 3),
                   eyes=z(num_frames, 6), scale=torch.ones(num_frames, 1, dtype=dtype, device=device))

    @classmethod
    def from_numpy(cls, d: dict, dtype: torch.dtype = torch.float32) -> "FlameParams":
        """Build from a dict of arrays with the field names (shorter shape/expression are zero-padded)."""
        T = np.asarray(d["expression"]).reshape(-1, np.asarray(d["expression"]).shape[-1]).shape[0]
        vals = {}
        for n in cls._TENSORS:
            a = np.asarray(d[n], dtype=np.float64)
            if n == "shape":
                a = _pad_coeffs(a.reshape(1, -1), NUM_SHAPE, "shape", "<dict>")
            elif n == "expression":
                a = _pad_coeffs(a.reshape(T, -1), NUM_EXPRESSION, "expression", "<dict>")
            elif n == "scale":
                a = np.broadcast_to(a.reshape(-1, 1), (T, 1))
            vals[n] = torch.as_tensor(np.array(a), dtype=dtype)
        return cls(**vals, rotate_about_root=bool(d.get("rotate_about_root", False)))

    def model_to_world(self, root_joint: Optional[Tensor] = None) -> Tensor:
        """(T,4,4) similarity [scale*R | t] mapping FLAME model space (zero global rotation) to world.

        ``root_joint`` (T,3) or (3,) is needed only when ``rotate_about_root`` (VHAP files)."""
        T = self.num_frames
        M = torch.zeros(T, 4, 4, dtype=self.translation.dtype, device=self.device)
        sR = self.scale[:, :, None] * self.rotation_matrix
        M[:, :3, :3] = sR
        t = self.translation
        if self.rotate_about_root:
            if root_joint is None:
                raise ValueError("these FlameParams rotate about FLAME's root joint (VHAP tracking); call "
                                 "FlameModel.model_to_world(params) or pass root_joint")
            j = root_joint.reshape(-1, 3).expand(T, 3)
            t = t + j - (sR @ j[:, :, None])[..., 0]
        M[:, :3, 3] = t
        M[:, 3, 3] = 1
        return M


def _pad_coeffs(a: np.ndarray, n: int, key: str, path: Any) -> np.ndarray:
    if a.shape[-1] > n:
        raise ValueError(f"{path}: key '{key}' has {a.shape[-1]} coefficients, FLAME 2023 uses at most {n}")
    if a.shape[-1] < n:  # fewer coefficients = the rest are zero
        a = np.concatenate([a, np.zeros(a.shape[:-1] + (n - a.shape[-1],), a.dtype)], axis=-1)
    return a


_NERSEMBLE_KEYS = ("shape", "expression", "translation", "jaw", "neck", "eyes")
_VHAP_KEYS = ("shape", "expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "translation")


def load_tracking(npz_path: PathLike, frame: Optional[int] = None, dtype: torch.dtype = torch.float32,
                  flame: Optional["FlameModel"] = None) -> FlameParams:
    """Read a tracked FLAME parameter file, NeRSemble FLAME2023 or VHAP variant (auto-detected).

    NeRSemble: shape (1,300), expression (T,100), rotation (T,3) Euler ``EULER_CONVENTION`` and/or
    rotation_matrices (T,3,3) (preferred), translation (T,3), jaw, neck (T,3), eyes (T,6), scale (1,1).
    VHAP: shape (300,) or (1,300), expr (T,n), rotation (T,3) axis-angle applied about the root joint,
    neck_pose, jaw_pose (T,3), eyes_pose (T,6), translation (T,3), no scale (-> 1).
    ``frame``: index into the T axis (None = all frames).  ``flame``: when given, VHAP's root-joint pivot is
    baked into the translation so the result behaves like a NeRSemble file.
    """
    path = Path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"tracking file {path} not found (expected the NeRSemble layout "
                                "<subject>/sequences/<seq>/annotations/tracking/FLAME2023_v2/tracked_flame_params.npz)")
    try:
        z = np.load(path, allow_pickle=False)
        files = set(z.files)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"{path}: could not read tracking .npz ({type(exc).__name__}: {exc}); the file is "
                         "truncated or not an .npz") from exc

    def get(key: str) -> np.ndarray:
        try:
            return np.asarray(z[key], dtype=np.float64)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
            raise ValueError(f"{path}: could not read key '{key}' ({type(exc).__name__}: {exc}); the file is "
                             "truncated or corrupt") from exc

    with z:
        if "expr" in files or "jaw_pose" in files:
            missing = [k for k in _VHAP_KEYS if k not in files]
            if missing:
                raise ValueError(f"{path}: VHAP tracking file lacks key(s) {missing} (has {sorted(files)})")
            expr = get("expr")
            T = expr.reshape(expr.shape[0], -1).shape[0] if expr.ndim > 1 else 1
            expr = expr.reshape(T, -1)
            if "static_offset" in files:
                warnings.warn(f"{path}: VHAP 'static_offset' is ignored (not part of FLAME)")
            rot = torch.as_tensor(get("rotation").reshape(T, 3))
            d = dict(shape=get("shape").reshape(1, -1), expression=expr,
                     rotation_matrix=axis_angle_to_matrix(rot).numpy(), translation=get("translation").reshape(T, 3),
                     jaw=get("jaw_pose").reshape(T, 3), neck=get("neck_pose").reshape(T, 3),
                     eyes=get("eyes_pose").reshape(T, 6), scale=np.ones((T, 1)))
            about_root = True
            file_keys = dict(expression="expr", rotation_matrix="rotation", jaw="jaw_pose", neck="neck_pose",
                             eyes="eyes_pose")
        else:
            missing = [k for k in _NERSEMBLE_KEYS if k not in files]
            if "rotation" not in files and "rotation_matrices" not in files:
                missing.append("rotation_matrices (or rotation)")
            if missing:
                raise ValueError(f"{path}: NeRSemble tracking file lacks key(s) {missing} (has {sorted(files)}); "
                                 "expected shape, expression, rotation/rotation_matrices, translation, jaw, neck, "
                                 "eyes, scale")
            expr = get("expression")
            expr = expr.reshape(-1, expr.shape[-1])
            T = expr.shape[0]
            if "rotation_matrices" in files:
                R = get("rotation_matrices").reshape(T, 3, 3)
                if "rotation" in files:
                    R_e = _rot_from_euler(get("rotation").reshape(T, 3))
                    err = np.abs(R_e - R).max()
                    if err > 1e-3:
                        warnings.warn(f"{path}: 'rotation' (Euler {EULER_CONVENTION}) disagrees with "
                                      f"'rotation_matrices' by {err:.3g}; using rotation_matrices")
            else:
                R = _rot_from_euler(get("rotation").reshape(T, 3))
            scale = get("scale").reshape(-1, 1) if "scale" in files else np.ones((1, 1))
            if scale.shape[0] not in (1, T):
                raise ValueError(f"{path}: key 'scale' has {scale.shape[0]} entries for {T} frames")
            d = dict(shape=get("shape").reshape(1, -1), expression=expr, rotation_matrix=R,
                     translation=get("translation").reshape(T, 3), jaw=get("jaw").reshape(T, 3),
                     neck=get("neck").reshape(T, 3), eyes=get("eyes").reshape(T, 6),
                     scale=np.broadcast_to(scale, (T, 1)))
            about_root = False
            file_keys = dict(rotation_matrix="rotation_matrices" if "rotation_matrices" in files else "rotation")
    d["shape"] = _pad_coeffs(d["shape"], NUM_SHAPE, "shape", path)
    d["expression"] = _pad_coeffs(d["expression"], NUM_EXPRESSION, "expression" if not about_root else "expr", path)
    if frame is not None:
        if not -T <= frame < T:
            raise IndexError(f"{path}: frame {frame} out of range (file has {T} frames)")
        d = {k: (v if k == "shape" else v[frame:frame + 1]) for k, v in d.items()}
    for k, v in d.items():  # caught here, not later as non-finite Gaussians or a failed subdivision
        finite = np.isfinite(np.asarray(v, dtype=np.float64)).reshape(len(v), -1).all(1)
        if not finite.all():
            rows = np.nonzero(~finite)[0]
            where = "" if k == "shape" else f" in frame row(s) {rows[:5].tolist()}{' ...' if len(rows) > 5 else ''}"
            raise ValueError(f"{path}: key '{file_keys.get(k, k)}' holds NaN or Inf values{where}; expected finite "
                             f"tracked FLAME parameters (the tracking of this sequence failed: track it again)")
    params = FlameParams(**{k: torch.as_tensor(np.array(v), dtype=dtype) for k, v in d.items()},
                         rotate_about_root=about_root)
    if flame is not None and about_root:
        params = flame.bake_root_pivot(params)
    return params


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def save_nersemble_tracking(path: PathLike, params: FlameParams, frames: Optional[np.ndarray] = None) -> None:
    """Write ``params`` as a NeRSemble FLAME2023 tracking npz (Euler angles with ``EULER_CONVENTION``).

    ``scale`` is stored as (1,1) (NeRSemble keeps one scale per sequence): all frames must share it."""
    if params.rotate_about_root:
        raise ValueError("bake the VHAP root pivot first (FlameModel.bake_root_pivot) before saving as NeRSemble")
    scale = _np(params.scale)
    if not np.allclose(scale, scale[0, 0]):
        raise ValueError("NeRSemble tracking stores one scale per sequence; params.scale varies over frames")
    R = _np(params.rotation_matrix).astype(np.float64)
    T = R.shape[0]
    from utils.core.io import atomic_write

    atomic_write(path, lambda fh: np.savez(
        fh, shape=_np(params.shape).astype(np.float32), expression=_np(params.expression).astype(np.float32),
             rotation=_euler_from_rot(R).astype(np.float32), rotation_matrices=R.astype(np.float32),
             translation=_np(params.translation).astype(np.float32), jaw=_np(params.jaw).astype(np.float32),
             neck=_np(params.neck).astype(np.float32), eyes=_np(params.eyes).astype(np.float32),
             scale=scale[:1, :1].astype(np.float32),
             frames=np.arange(T, dtype=np.int64) if frames is None else np.asarray(frames)))


def save_vhap_tracking(path: PathLike, shape: np.ndarray, expr: np.ndarray, rotation: np.ndarray,
                       translation: np.ndarray, jaw_pose: np.ndarray, neck_pose: np.ndarray,
                       eyes_pose: np.ndarray) -> None:
    """Write a VHAP-style npz (axis-angle ``rotation`` about the root joint, no scale); used by tests."""
    from utils.core.io import atomic_write

    atomic_write(path, lambda fh: np.savez(
        fh, shape=np.asarray(shape, np.float32).reshape(-1), expr=np.asarray(expr, np.float32),
             rotation=np.asarray(rotation, np.float32), translation=np.asarray(translation, np.float32),
             jaw_pose=np.asarray(jaw_pose, np.float32), neck_pose=np.asarray(neck_pose, np.float32),
             eyes_pose=np.asarray(eyes_pose, np.float32), timestep_id=np.arange(len(expr))))


# ============================================================================ the FLAME module
def _find_file(data_dir: Path, names: Sequence[str]) -> Optional[Path]:
    for n in names:
        if (data_dir / n).is_file():
            return data_dir / n
    return None


class FlameModel(nn.Module):
    """FLAME 2023 (300 shape / 100 expression) on top of ``smplx.FLAME``, returning world-space vertices.

    Buffers: ``faces`` (F,3) long, ``v_template`` (V,3), ``lmk_faces_idx`` (L,), ``lmk_bary_coords`` (L,3).
    """

    def __init__(self, model_path: PathLike, static_embedding_path: Optional[PathLike] = None,
                 dynamic_embedding_path: Optional[PathLike] = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        import smplx  # imported here so that the rest of this module works without smplx

        model_path = Path(model_path)
        model = load_flame_pickle(model_path)
        static = load_static_embedding(static_embedding_path) if static_embedding_path is not None else None
        self.has_landmarks = static is not None
        nf = model["f"].shape[0]
        if static is not None and static["lmk_face_idx"].size and static["lmk_face_idx"].max() >= nf:
            raise ValueError(f"{static_embedding_path}: lmk_face_idx refers to face {static['lmk_face_idx'].max()} "
                             f"but the model {model_path} has {nf} faces (embedding of another FLAME version?)")
        # smplx reads only files written just now into a private folder (see smplx_files); smplx's defaults are
        # 10/10 coefficients: pass the FLAME 2023 sizes explicitly
        with smplx_files(model, static) as folder:
            self.flame = smplx.FLAME(model_path=str(folder), num_betas=NUM_SHAPE,
                                     num_expression_coeffs=NUM_EXPRESSION, create_betas=False,
                                     create_expression=False, create_global_orient=False, create_neck_pose=False,
                                     create_jaw_pose=False, create_leye_pose=False, create_reye_pose=False,
                                     create_transl=False, dtype=dtype, batch_size=1)
        self.register_buffer("faces", torch.as_tensor(model["f"], dtype=torch.long), persistent=False)
        self.register_buffer("v_template", torch.as_tensor(model["v_template"], dtype=dtype), persistent=False)
        if static is not None:
            self.register_buffer("lmk_faces_idx", torch.as_tensor(static["lmk_face_idx"]), persistent=False)
            self.register_buffer("lmk_bary_coords", torch.as_tensor(static["lmk_b_coords"], dtype=dtype),
                                 persistent=False)
        self.dynamic_embedding = load_dynamic_embedding(dynamic_embedding_path) if dynamic_embedding_path else None
        self.model_path = model_path

    @classmethod
    def from_data_dir(cls, data_dir: PathLike, **kwargs: Any) -> "FlameModel":
        """Find the model (flame2023.pkl, flame2023_Open.pkl, generic_model.pkl or FLAME_NEUTRAL.pkl) and the
        embeddings in ``data_dir``; missing files raise FileNotFoundError saying where to get them."""
        data_dir = Path(data_dir)
        model = _find_file(data_dir, MODEL_FILENAMES)
        if model is None:
            raise FileNotFoundError(f"no FLAME model in {data_dir} (looked for {', '.join(MODEL_FILENAMES)}). "
                                    f"{_WHERE}")
        static = data_dir / STATIC_EMBEDDING
        if not static.is_file():
            raise FileNotFoundError(f"{static} not found: the landmark embedding ships with the FLAME download "
                                    f"({FLAME_URL}); copy {STATIC_EMBEDDING} next to {model.name} in {data_dir}")
        dyn = data_dir / DYNAMIC_EMBEDDING
        return cls(model, static, dyn if dyn.is_file() else None, **kwargs)

    # ---------------------------------------------------------------- properties
    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_faces(self) -> int:
        return self.faces.shape[0]

    def _smplx(self, params: FlameParams):
        T = params.num_frames
        dev, dt = self.v_template.device, self.v_template.dtype
        p = params.to(device=dev, dtype=dt)
        zeros = torch.zeros(T, 3, dtype=dt, device=dev)
        return self.flame(betas=p.shape.expand(T, -1), expression=p.expression, global_orient=zeros,
                          neck_pose=p.neck, jaw_pose=p.jaw, leye_pose=p.eyes[:, :3], reye_pose=p.eyes[:, 3:],
                          transl=zeros, return_verts=True)

    def canonical_vertices(self, params: FlameParams) -> Tensor:
        """(T,V,3) model-space vertices: shape, expression, neck/jaw/eyes pose; no global pose."""
        return self._smplx(params).vertices

    def model_space(self, params: FlameParams) -> tuple[Tensor, Tensor]:
        """(vertices (T,V,3), joints (T,5,3)) in model space."""
        out = self._smplx(params)
        return out.vertices, out.joints[:, :NUM_JOINTS]

    def model_to_world(self, params: FlameParams) -> Tensor:
        """(T,4,4) model-to-world, resolving VHAP's root-joint pivot when needed."""
        root = self.model_space(params)[1][:, 0] if params.rotate_about_root else None
        return params.to(self.v_template.device).model_to_world(root)

    def bake_root_pivot(self, params: FlameParams) -> FlameParams:
        """Return equivalent params with ``rotate_about_root=False`` (pivot folded into the translation)."""
        if not params.rotate_about_root:
            return params
        M = self.model_to_world(params)
        return replace(params.to(self.v_template.device), translation=M[:, :3, 3].detach().clone(),
                       rotate_about_root=False)

    def forward(self, params: FlameParams) -> Tensor:
        """(T,V,3) WORLD-space vertices: FLAME with zero global rotation, then [scale*R | t]."""
        verts, joints = self.model_space(params)
        M = params.to(device=verts.device, dtype=verts.dtype).model_to_world(
            joints[:, 0] if params.rotate_about_root else None)
        return verts @ M[:, :3, :3].transpose(1, 2) + M[:, None, :3, 3]

    def landmarks(self, vertices: Tensor) -> Tensor:
        """(..., V, 3) vertices -> (..., L, 3) static landmarks (51 for FLAME) by barycentric interpolation."""
        if not self.has_landmarks:
            raise RuntimeError(f"no static landmark embedding was given for {self.model_path}")
        tri = self.faces[self.lmk_faces_idx]  # (L,3)
        corners = vertices[..., tri, :]  # (..., L, 3, 3)
        return (corners * self.lmk_bary_coords.to(vertices.dtype)[..., None]).sum(-2)


class FlameSubset(nn.Module):
    """FLAME's forward for a subset of its vertices (e.g. the face mask): FlameParams (T frames) -> (T, M, 3).

    The maths of smplx's ``lbs`` (checked against :class:`FlameModel` in tests/test_flame.py) on the M subset rows
    only, with the joints regressed through precomputed (5, 3, K) regressions of the shape and expression
    blendshapes.  Written out rather than calling smplx because smplx's ``lbs`` walks the kinematic chain by indexing
    a Python list with device tensors (one host synchronisation per joint on a GPU, which also rules out CUDA-graph
    capture) and always poses every vertex and the landmarks; the per-frame animation path (models/posing.py)
    needs neither.  Built from a FlameModel's smplx buffers, so both use the same model data.
    """

    def __init__(self, flame: FlameModel, vertex_ids: Union[np.ndarray, Tensor, Sequence[int]]) -> None:
        super().__init__()
        fl = flame.flame
        ids = torch.as_tensor(np.asarray(vertex_ids), dtype=torch.long, device=fl.v_template.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= flame.num_vertices):
            raise ValueError(f"FlameSubset: vertex ids must lie in [0, {flame.num_vertices}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        V = flame.num_vertices
        jr = fl.J_regressor  # (5, V) dense in smplx
        self.register_buffer("template", fl.v_template[ids].clone(), persistent=False)  # (M, 3)
        self.register_buffer("shapedirs", fl.shapedirs[ids].clone(), persistent=False)  # (M, 3, 300)
        self.register_buffer("exprdirs", fl.expr_dirs[ids].clone(), persistent=False)  # (M, 3, 100)
        self.register_buffer("posedirs", fl.posedirs.view(-1, V, 3)[:, ids].reshape(fl.posedirs.shape[0], -1).clone(),
                             persistent=False)  # (36, M * 3)
        self.register_buffer("weights", fl.lbs_weights[ids].clone(), persistent=False)  # (M, 5)
        self.register_buffer("j_template", jr @ fl.v_template, persistent=False)  # (5, 3)
        self.register_buffer("j_shapedirs", torch.einsum("jv,vck->jck", jr, fl.shapedirs), persistent=False)
        self.register_buffer("j_exprdirs", torch.einsum("jv,vck->jck", jr, fl.expr_dirs), persistent=False)
        self.parents = [int(p) for p in fl.parents.tolist()]  # constant kinematic tree, on the host
        # parents of joints 1.. as a device index (indexing with a Python list would copy it to the device per call)
        self.register_buffer("parent_index", torch.tensor(self.parents[1:], dtype=torch.long,
                                                          device=ids.device), persistent=False)
        self.num_vertices = int(ids.numel())

    def model_space(self, params: FlameParams) -> tuple[Tensor, Tensor]:
        """(vertices (T, M, 3), posed joints (T, 5, 3)) in FLAME model space (zero global rotation)."""
        dt = self.template.dtype
        beta = params.shape.to(dt)  # (1, 300)
        psi = params.expression.to(dt)  # (T, 100)
        T = psi.shape[0]
        v = (self.template + torch.einsum("bk,mck->bmc", beta, self.shapedirs)
             + torch.einsum("tk,mck->tmc", psi, self.exprdirs))  # (T, M, 3)
        J = (self.j_template + torch.einsum("bk,jck->bjc", beta, self.j_shapedirs)
             + torch.einsum("tk,jck->tjc", psi, self.j_exprdirs))  # (T, 5, 3)
        pose = torch.stack([torch.zeros_like(params.neck), params.neck, params.jaw, params.eyes[:, :3],
                            params.eyes[:, 3:]], dim=1).to(dt)  # (T, 5, 3) axis-angle, global rotation zero
        rot = axis_angle_to_matrix(pose)  # (T, 5, 3, 3)
        eye = torch.eye(3, dtype=dt, device=rot.device)
        v = v + ((rot[:, 1:] - eye).reshape(T, -1) @ self.posedirs).view(T, -1, 3)  # pose blendshapes
        # kinematic chain: world transform of each joint, then relative to its rest position (smplx's A)
        rel = torch.cat([J[:, :1], J[:, 1:] - J.index_select(1, self.parent_index)], dim=1)  # (T, 5, 3)
        chain: list[tuple[Tensor, Tensor]] = []
        for j, parent in enumerate(self.parents):
            if parent < 0:
                chain.append((rot[:, j], rel[:, j]))
            else:
                Rp, tp = chain[parent]
                chain.append((Rp @ rot[:, j], tp + (Rp @ rel[:, j, :, None])[..., 0]))
        Rj = torch.stack([c[0] for c in chain], dim=1)  # (T, 5, 3, 3)
        tj = torch.stack([c[1] for c in chain], dim=1)  # (T, 5, 3) posed joints
        ta = tj - (Rj @ J[..., None])[..., 0]  # translation of the rest-relative transforms
        Rv = torch.einsum("mj,tjab->tmab", self.weights, Rj)  # blended per vertex (T, M, 3, 3)
        tv = torch.einsum("mj,tja->tma", self.weights, ta)
        return (Rv @ v[..., None])[..., 0] + tv, tj

    def forward(self, params: FlameParams) -> Tensor:
        """(T, M, 3) WORLD-space vertices of the subset: FLAME, then [scale * R | t] (VHAP's root pivot resolved)."""
        verts, joints = self.model_space(params)
        M = params.to(device=verts.device, dtype=verts.dtype).model_to_world(
            joints[:, 0] if params.rotate_about_root else None)
        return verts @ M[:, :3, :3].transpose(1, 2) + M[:, None, :3, 3]


# ============================================================================ face mask
def load_face_mask(data_dir: PathLike) -> np.ndarray:
    """Face-mask vertex ids (sorted unique int64) from ``FLAME_mask_vertexID.npy`` or the union of the
    ``FACE_MASK_REGIONS`` of ``FLAME_masks.pkl`` in ``data_dir``."""
    data_dir = Path(data_dir)
    npy = data_dir / MASK_VERTEX_IDS
    if npy.is_file():
        try:
            ids = np.load(npy, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{npy}: could not read the face-mask vertex ids ({exc})") from exc
        ids = np.asarray(ids).reshape(-1)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{npy}: expected integer vertex ids, found dtype {ids.dtype}")
        return np.unique(ids.astype(np.int64))
    pkl = data_dir / MASKS_PKL
    if pkl.is_file():
        masks = load_pickle_no_chumpy(pkl)
        missing = [r for r in FACE_MASK_REGIONS if not isinstance(masks, dict) or r not in masks]
        if missing:
            raise ValueError(f"{pkl}: missing region(s) {missing}; expected the FLAME_masks.pkl of {FLAME_URL}")
        return np.unique(np.concatenate([np.asarray(masks[r]).reshape(-1) for r in FACE_MASK_REGIONS]).astype(np.int64))
    raise FileNotFoundError(f"no face mask in {data_dir}: expected {MASK_VERTEX_IDS} (vertex ids) or {MASKS_PKL} "
                            f"(FLAME vertex masks, from {FLAME_URL}); put one of them in {data_dir}")


def face_mask_submesh(vertices: Union[np.ndarray, Tensor], faces: Union[np.ndarray, Tensor],
                      mask_ids: np.ndarray, extra_faces: Optional[np.ndarray] = None):
    """Cut the face mask out of a FLAME mesh.

    vertices (..., V, 3) numpy or torch; faces (F,3); mask_ids (M,) vertex ids.  Keeps the triangles whose
    three vertices are all in the mask (plus ``extra_faces``, given in original vertex ids, e.g. from
    :func:`mouth_closing_faces`).  New vertex i is old vertex ``mask_ids[i]``: vertices are re-indexed in the
    order of ``mask_ids`` (sorted ids from :func:`load_face_mask`) and every mask vertex is kept.
    Returns (verts (..., M, 3), faces (F',3) int64 numpy, kept_ids (M,) = mask_ids as int64).
    """
    ids = np.asarray(mask_ids, dtype=np.int64).reshape(-1)
    f = faces.detach().cpu().numpy() if isinstance(faces, Tensor) else np.asarray(faces)
    f = f.astype(np.int64)
    nv = vertices.shape[-2]
    if ids.size and (ids.min() < 0 or ids.max() >= nv):
        raise ValueError(f"mask vertex id {int(ids.max())} out of range for a mesh with {nv} vertices "
                         "(mask file for another FLAME version?)")
    if np.unique(ids).size != ids.size:
        raise ValueError("mask_ids contains duplicates")
    remap = np.full(nv, -1, dtype=np.int64)
    remap[ids] = np.arange(ids.size)
    if extra_faces is not None and len(extra_faces):
        f = np.concatenate([f, np.asarray(extra_faces, dtype=np.int64).reshape(-1, 3)])
    keep = (remap[f] >= 0).all(axis=1)
    new_faces = remap[f[keep]]
    if isinstance(vertices, Tensor):
        verts = vertices.index_select(-2, torch.as_tensor(ids, device=vertices.device))
    else:
        verts = np.asarray(vertices)[..., ids, :]
    return verts, new_faces, ids


def boundary_loops(faces: np.ndarray) -> list[np.ndarray]:
    """Closed boundary loops of a triangle mesh, each (n,) vertex ids in the direction of the faces' edges."""
    f = np.asarray(faces, dtype=np.int64)
    directed = f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    keys = np.sort(directed, axis=1)
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    bnd = directed[counts[inv.reshape(-1)] == 1]
    nxt: dict[int, list[int]] = {}
    for a, b in bnd:
        nxt.setdefault(int(a), []).append(int(b))
    loops, used = [], set()
    for start in list(nxt):
        for _ in range(len(nxt[start])):
            if (start, nxt[start][0]) in used and all((start, b) in used for b in nxt[start]):
                break
            loop, cur = [start], start
            while True:
                cands = [b for b in nxt.get(cur, []) if (cur, b) not in used]
                if not cands:
                    break
                b = cands[0]
                used.add((cur, b))
                if b == start:
                    break
                loop.append(b)
                cur = b
            if len(loop) >= 3:
                loops.append(np.array(loop, dtype=np.int64))
    return loops


def close_loop(loop: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Triangulate a hole without new vertices: a zig-zag strip starting at the loop vertex farthest from
    the loop centroid (a mouth corner), which suits slit-like holes.  Winding is opposite to the loop
    direction so the closing faces agree with the surrounding faces.  Returns (n-2, 3) int64."""
    loop = np.asarray(loop, dtype=np.int64)
    p = np.asarray(vertices)[loop]
    s = int(np.argmax(np.linalg.norm(p - p.mean(0), axis=1)))
    l = np.roll(loop, -s)
    n = len(l)
    tris, i, j = [], 0, n - 1  # two fronts walking towards each other
    while j - i > 1:
        if (i + (n - 1 - j)) % 2 == 0:
            tris.append((l[i], l[j], l[i + 1]))
            i += 1
        else:
            tris.append((l[i], l[j], l[j - 1]))
            j -= 1
    return np.array(tris, dtype=np.int64).reshape(-1, 3)


def mouth_closing_faces(vertices: np.ndarray, faces: np.ndarray, lip_vertex_ids: np.ndarray) -> np.ndarray:
    """Faces (original vertex ids) that close FLAME's open mouth: every boundary loop of the full mesh whose
    vertices all lie in ``lip_vertex_ids`` (the ``lips`` region of FLAME_masks.pkl) is triangulated with
    :func:`close_loop`.  Returns (K,3) int64 (empty, with a warning, if no such loop exists)."""
    lips = set(np.asarray(lip_vertex_ids).reshape(-1).tolist())
    out = [close_loop(lp, vertices) for lp in boundary_loops(faces) if all(int(v) in lips for v in lp)]
    if not out:
        warnings.warn("mouth_closing_faces: no boundary loop lies entirely in the lip region; nothing closed")
        return np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(out)


def face_mask_topology(flame: "FlameModel", data_dir: PathLike, close_mouth: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The face-mask mesh topology shared by preprocessing and the network (one definition for both).

    Mask vertex ids from :func:`load_face_mask`; when ``close_mouth`` and ``FLAME_masks.pkl`` (with its ``lips``
    region) is in ``data_dir``, the triangles closing the mouth, computed on the template so that every subject gets
    the same topology.  Mask vertices used by no triangle are dropped (they would carry no surface).
    Returns (mask_ids (M,) FLAME vertex ids: new vertex i = FLAME vertex mask_ids[i], faces (F, 3) over the M).
    """
    data_dir = Path(data_dir)
    mask_ids = load_face_mask(data_dir)
    faces = flame.faces.cpu().numpy()
    extra = None
    pkl = data_dir / MASKS_PKL
    if close_mouth and pkl.is_file():
        regions = load_pickle_no_chumpy(pkl)
        if isinstance(regions, dict) and "lips" in regions:
            extra = mouth_closing_faces(flame.v_template.cpu().numpy(), faces, np.asarray(regions["lips"]).reshape(-1))
    _, mask_faces, ids = face_mask_submesh(flame.v_template.cpu().numpy(), faces, mask_ids, extra_faces=extra)
    used = np.zeros(len(ids), bool)
    used[mask_faces.reshape(-1)] = True
    if not used.all():
        keep = np.nonzero(used)[0]
        remap = np.full(len(ids), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        ids, mask_faces = ids[keep], remap[mask_faces]
    return ids, mask_faces


# ============================================================================ subdivision
@dataclass
class SubdivisionPlan:
    """Midpoint subdivision recorded as, per level, the (E_l, 2) vertex pairs whose midpoints are appended.

    Level l+1 vertices = concat(level-l vertices, mean of the pairs): the prefix property by construction."""

    num_base_vertices: int
    edges: list  # list of (E_l, 2) int64 arrays
    faces: list  # faces at levels 0..L, each (F_l, 3) int64

    @property
    def levels(self) -> int:
        return len(self.edges)

    def num_vertices(self, level: int) -> int:
        return self.num_base_vertices + sum(len(e) for e in self.edges[:level])

    def to(self, device: Union[str, torch.device]) -> "SubdivisionPlan":
        """The plan with its edge pairs as index tensors on ``device`` (no host copy per subdivide_vertices call)."""
        return SubdivisionPlan(self.num_base_vertices, [torch.as_tensor(e, device=device) for e in self.edges],
                               self.faces)


def subdivide(verts: np.ndarray, faces: np.ndarray, levels: int, return_plan: bool = False):
    """Midpoint subdivision with trimesh, ``levels`` times.

    Returns a list of ``levels`` (verts (V_l,3), faces (F_l,3)) for levels 1..L (and the
    :class:`SubdivisionPlan` if ``return_plan``).  Each level's vertices are a prefix of the next (checked).
    """
    import trimesh

    v = np.asarray(verts, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    out, edges, all_faces = [], [], [f]
    for _ in range(levels):
        nv, fv = trimesh.remesh.subdivide(v, f)
        fv = np.asarray(fv, dtype=np.int64)
        if not np.array_equal(nv[: len(v)], v):
            raise RuntimeError("trimesh subdivision broke the prefix property")
        # trimesh writes each old face (a,b,c) as [a,m_ab,m_ca],[m_ab,b,m_bc],[m_ca,m_bc,c],[m_ab,m_bc,m_ca]
        q = fv.reshape(-1, 4, 3)
        mid = np.concatenate([q[:, 3, 0], q[:, 3, 1], q[:, 3, 2]])
        ends = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
        pairs = np.zeros((len(nv) - len(v), 2), dtype=np.int64)
        pairs[mid - len(v)] = ends
        if not np.allclose(v[pairs].mean(1), nv[len(v):]):
            raise RuntimeError("could not recover trimesh's subdivision edges (trimesh version changed?)")
        edges.append(pairs)
        v, f = nv, fv
        out.append((v, f))
        all_faces.append(f)
    plan = SubdivisionPlan(len(np.asarray(verts)), edges, all_faces)
    return (out, plan) if return_plan else out


def make_subdivision_plan(num_verts: int, faces: np.ndarray, levels: int) -> SubdivisionPlan:
    """Subdivision plan of a mesh topology (positions do not matter; random ones are used)."""
    rng = np.random.default_rng(0)
    return subdivide(rng.standard_normal((num_verts, 3)), faces, levels, return_plan=True)[1]


def subdivide_vertices(verts: Tensor, plan: SubdivisionPlan, level: Optional[int] = None) -> Tensor:
    """Apply a plan to batched vertices: (..., V0, 3) -> (..., V_level, 3); differentiable, any device."""
    level = plan.levels if level is None else level
    if verts.shape[-2] != plan.num_base_vertices:
        raise ValueError(f"verts has {verts.shape[-2]} vertices, the plan expects {plan.num_base_vertices}")
    for e in plan.edges[:level]:
        idx = torch.as_tensor(e, device=verts.device)
        mid = 0.5 * (verts.index_select(-2, idx[:, 0]) + verts.index_select(-2, idx[:, 1]))
        verts = torch.cat([verts, mid], dim=-2)
    return verts


def subdivision_matrix(plan: SubdivisionPlan, level: Optional[int] = None) -> sp.csr_matrix:
    """(V_level, V0) sparse matrix S with subdivided = S @ base vertices."""
    level = plan.levels if level is None else level
    S = sp.identity(plan.num_base_vertices, format="csr")
    for e in plan.edges[:level]:
        n = S.shape[0]
        rows = np.repeat(np.arange(len(e)), 2)
        A = sp.csr_matrix((np.full(2 * len(e), 0.5), (rows, e.reshape(-1))), shape=(len(e), n))
        S = sp.vstack([S, A @ S]).tocsr()
    return S


# ============================================================================ normals
def vertex_normals(verts: Tensor, faces: Union[Tensor, np.ndarray]) -> Tensor:
    """Area-weighted unit vertex normals: verts (..., V, 3), faces (F,3) -> (..., V, 3).

    Winding is FLAME's (counter-clockwise seen from outside), so normals point out of the head."""
    f = torch.as_tensor(np.asarray(faces) if not isinstance(faces, Tensor) else faces, device=verts.device).long()
    v0, v1, v2 = (verts.index_select(-2, f[:, k]) for k in range(3))
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)  # length = 2 * area: area weighting for free
    n = torch.zeros_like(verts)
    for k in range(3):
        n = n.index_add(-2, f[:, k], fn)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-12)
