"""The FLAME layer (transitional: everything still lives in models/flame/files.py)."""
from models.flame.files import *  # noqa: F401,F403
from models.flame.files import _sparse_to_csr  # noqa: F401
