"""The FLAME layer, one concern per module:

* :mod:`models.flame.params`: FlameParams (one identity over T frames), the coefficient counts, rotation helpers;
* :mod:`models.flame.files`: where FLAME's files go, reading them without chumpy or code execution, model checks;
* :mod:`models.flame.tracking_io`: NeRSemble / VHAP tracking files (read and write);
* :mod:`models.flame.layer`: FlameModel (smplx forward, world-space vertices, landmarks) and FlameSubset;
* :mod:`models.flame.face_mask`: the face-mask vertex ids, submesh and mouth-closing triangles;
* :mod:`models.flame.subdivision`: midpoint subdivision plans.

Every name is re-exported here, so ``from models.flame import X`` works for all of them.
"""
from models.flame.face_mask import (
    FACE_MASK_REGIONS,
    boundary_loops,
    close_loop,
    face_mask_submesh,
    face_mask_topology,
    load_face_mask,
    mouth_closing_faces,
)
from models.flame.files import (
    DYNAMIC_EMBEDDING,
    FLAME_URL,
    MASK_VERTEX_IDS,
    MASKS_PKL,
    MODEL_FILENAMES,
    STATIC_EMBEDDING,
    PathLike,
    UnsafePickleError,
    load_dynamic_embedding,
    load_flame_pickle,
    load_npy_no_chumpy,
    load_npz_no_chumpy,
    load_pickle_no_chumpy,
    load_static_embedding,
    smplx_files,
    validate_flame_dict,
)
from models.flame.files import _sparse_to_csr as _sparse_to_csr  # private, but tests/test_flame.py checks it
from models.flame.layer import FlameModel, FlameSubset
from models.flame.params import (
    EULER_CONVENTION,
    NUM_EXPRESSION,
    NUM_JOINTS,
    NUM_SHAPE,
    FlameParams,
    axis_angle_to_matrix,
)
from models.flame.subdivision import (
    SubdivisionPlan,
    make_subdivision_plan,
    subdivide,
    subdivide_vertices,
    subdivision_matrix,
)
from models.flame.tracking_io import load_tracking, save_nersemble_tracking, save_vhap_tracking
from models.geometry import vertex_normals  # defined with the other geometry; kept here for its former importers

__all__ = [
    "DYNAMIC_EMBEDDING", "EULER_CONVENTION", "FACE_MASK_REGIONS", "FLAME_URL", "MASKS_PKL", "MASK_VERTEX_IDS",
    "MODEL_FILENAMES", "NUM_EXPRESSION", "NUM_JOINTS", "NUM_SHAPE", "STATIC_EMBEDDING", "FlameModel", "FlameParams",
    "FlameSubset", "PathLike", "SubdivisionPlan", "UnsafePickleError", "axis_angle_to_matrix", "boundary_loops",
    "close_loop", "face_mask_submesh", "face_mask_topology", "load_dynamic_embedding", "load_face_mask",
    "load_flame_pickle", "load_npy_no_chumpy", "load_npz_no_chumpy", "load_pickle_no_chumpy", "load_static_embedding",
    "load_tracking", "make_subdivision_plan", "mouth_closing_faces", "save_nersemble_tracking", "save_vhap_tracking",
    "smplx_files", "subdivide", "subdivide_vertices", "subdivision_matrix", "validate_flame_dict", "vertex_normals",
]
