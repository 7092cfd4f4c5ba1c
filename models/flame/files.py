"""FLAME's files: where they go, reading them without chumpy or code execution, checking the model, and the
private folder of plain files that smplx reads.

Where the files go (see README): put the FLAME 2023 model at ``data/flame2023.pkl`` (or the CC-BY
``flame2023_Open.pkl``; older ``generic_model.pkl`` / ``FLAME_NEUTRAL.pkl`` also work) next to
``flame_static_embedding.pkl`` (+ optional ``flame_dynamic_embedding.npy``) and the face mask
``FLAME_mask_vertexID.npy`` (or ``FLAME_masks.pkl``). The model is a licensed download from
https://flame.is.tue.mpg.de (registration required); ``flame2023_Open.pkl`` is released under CC-BY.

FLAME pickles name chumpy classes; they are read by a restricted unpickler that turns chumpy objects into numpy
arrays and refuses every class or function outside a small allow-list (numpy, scipy.sparse, builtin containers),
so a planted pickle cannot run code.
"""
from __future__ import annotations

import collections
import contextlib
import copyreg
import io
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import scipy.sparse as sp

from models.flame.params import NUM_EXPRESSION, NUM_JOINTS, NUM_SHAPE

try:  # numpy >= 2 keeps them in numpy._core; pickles of numpy 1 name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

PathLike = Union[str, os.PathLike]

FLAME_URL = "https://flame.is.tue.mpg.de"
MODEL_FILENAMES = ("flame2023.pkl", "flame2023_Open.pkl", "generic_model.pkl", "FLAME_NEUTRAL.pkl")
STATIC_EMBEDDING = "flame_static_embedding.pkl"
DYNAMIC_EMBEDDING = "flame_dynamic_embedding.npy"
MASK_VERTEX_IDS = "FLAME_mask_vertexID.npy"
MASKS_PKL = "FLAME_masks.pkl"

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


# the numpy functions that rebuild arrays and scalars in a pickle
_NUMPY_PICKLE_FUNCTIONS = {"_reconstruct": _multiarray._reconstruct, "scalar": _multiarray.scalar,
                           "_frombuffer": _numeric._frombuffer}


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
        return _NUMPY_PICKLE_FUNCTIONS.get(name)
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name)
    if module in ("builtins", "__builtin__"):
        return _BUILTIN_TYPES.get(name)
    if module in ("copyreg", "copy_reg") and name == "_reconstructor":
        return copyreg._reconstructor  # builds an instance of an (allowed) class without running its __init__
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module == "collections" and name == "OrderedDict":
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


def _find_file(data_dir: Path, names: Sequence[str]) -> Optional[Path]:
    """The first of ``names`` that is a file in ``data_dir``, or None."""
    for n in names:
        if (data_dir / n).is_file():
            return data_dir / n
    return None
