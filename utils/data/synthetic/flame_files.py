"""The synthetic FLAME model (utils/data/synthetic/flame_model.py) written in FLAME's real file formats:
flame2023.pkl (its ``shapedirs`` is pickled exactly as a chumpy ``Ch`` object so the chumpy-free loader is
exercised), flame_static_embedding.pkl, flame_dynamic_embedding.npy, FLAME_mask_vertexID.npy and FLAME_masks.pkl.
"""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path
from typing import Union

import numpy as np

from utils.data.synthetic.flame_model import make_flame_model
from utils.data.synthetic.flame_regions import face_mask_ids, face_regions, landmark_embeddings

PathLike = Union[str, os.PathLike]


class _FakeCh:
    """Pickles exactly like a chumpy ``Ch``: reference ``chumpy.ch.Ch``, state dict with the array in 'x'."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __reduce_ex__(self, protocol):  # what object.__reduce_ex__ emits for a chumpy Ch
        import copyreg
        # chumpy's Ch.__getstate__ returns a copy of __dict__ without '_parents' and '_cache'
        state = {"x": self.x, "_dirty_vars": set(), "_itr": None, "_make_dense": False, "_make_sparse": False,
                 "_depends_on_deps": {}}
        return (copyreg.__newobj__, (type(self),), state)


def _dump_with_chumpy(obj: dict, path: Path, chumpy_keys: tuple[str, ...]) -> None:
    """Pickle ``obj`` (protocol 2, as the Python-2 FLAME files) with ``chumpy_keys`` as chumpy Ch objects."""
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    mod, sub = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    Ch = type("Ch", (_FakeCh,), {"__module__": "chumpy.ch", "__qualname__": "Ch"})
    sub.Ch = Ch
    mod.ch = sub
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = mod, sub  # only while dumping
    try:
        data = {k: (Ch(v) if k in chumpy_keys else v) for k, v in obj.items()}
        with open(path, "wb") as fh:
            pickle.dump(data, fh, protocol=2)
    finally:
        for k, m in saved.items():
            if m is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = m


FLAME_KEYS = ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights",
              "bs_style", "bs_type")


def write_flame_files(out_dir: PathLike, model: dict | None = None, seed: int = 0) -> dict[str, Path]:
    """Write the synthetic model in FLAME's real file formats into ``out_dir``; returns {name: path}.

    Files: flame2023.pkl (shapedirs as a chumpy-style object), flame_static_embedding.pkl,
    flame_dynamic_embedding.npy, FLAME_mask_vertexID.npy, FLAME_masks.pkl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = make_flame_model(seed) if model is None else model
    paths = {n: out / n for n in ("flame2023.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy",
                                  "FLAME_mask_vertexID.npy", "FLAME_masks.pkl")}
    _dump_with_chumpy({k: model[k] for k in FLAME_KEYS if k in model}, paths["flame2023.pkl"], ("shapedirs",))
    static, dynamic = landmark_embeddings(model)
    with open(paths["flame_static_embedding.pkl"], "wb") as fh:
        pickle.dump(static, fh, protocol=2)
    np.save(paths["flame_dynamic_embedding.npy"], np.array(dynamic, dtype=object), allow_pickle=True)
    np.save(paths["FLAME_mask_vertexID.npy"], face_mask_ids(model))
    with open(paths["FLAME_masks.pkl"], "wb") as fh:
        pickle.dump(face_regions(model), fh, protocol=2)
    return paths
