"""benchmarks/real_mask.py: the stand-in has the real FLAME mask's counts at every level and follows its host."""
import numpy as np
import torch
import trimesh

from benchmarks.real_mask import REAL_MASK_COUNTS, REAL_MASK_GAUSSIANS, embed_real_size_mask, real_size_topology
from models.flame import subdivide


def test_counts_match_the_real_mask_at_every_level():
    uv, sphere, faces = real_size_topology()
    n = len(uv) + len(sphere)
    edges = trimesh.Trimesh(np.zeros((n, 3)), faces, process=False).edges_unique
    assert (n, len(edges), len(faces)) == tuple(REAL_MASK_COUNTS.values())
    levels = subdivide(np.random.default_rng(0).random((n, 3)), faces, 3)
    assert [n] + [len(v) for v, _ in levels] == [REAL_MASK_GAUSSIANS[k] for k in range(4)]


def test_embedding_follows_the_host_surface():
    grid = trimesh.creation.icosphere(subdivisions=3)
    front = grid.vertices[:, 2] > -0.2   # a cap facing +z as the host "face"
    host = grid.submesh([front[grid.faces].all(1)], append=True)
    stand_in = embed_real_size_mask(host.vertices, host.faces)
    v = stand_in(torch.as_tensor(host.vertices))
    assert v.shape == (REAL_MASK_COUNTS["vertices"], 3)
    sheet = v[: len(real_size_topology()[0])].numpy()
    assert np.allclose(np.linalg.norm(sheet, axis=1), 1.0, atol=0.05)  # on the unit sphere's surface
    moved = stand_in(torch.as_tensor(host.vertices) * 2.0)
    assert torch.allclose(moved[: len(sheet)], 2.0 * v[: len(sheet)], atol=1e-9)  # barycentric: follows the host
