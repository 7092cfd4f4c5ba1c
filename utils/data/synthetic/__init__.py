"""The embedded synthetic data: a synthetic FLAME-format head model and a NeRSemble-format dataset rendered from
known ground-truth Gaussian heads, one concept per module:

    flame_mesh.py     the head mesh (implicit surface, eye and mouth openings, eyeballs)
    flame_model.py    the FLAME-format model dict on that mesh; random identity parameters
    flame_regions.py  regions, face mask, semantic / painting masks, landmark embeddings
    flame_files.py    the model written in FLAME's file formats
    rig.py            the 16-camera rig and image sizes
    identity.py       one identity: shape, head placement, appearance, background
    motion.py         the frames of a sequence (expressions, head turn)
    texture.py        per-vertex albedo from the appearance
    render.py         ground-truth Gaussian heads and their rendering
    dataset.py        writing / completing a dataset folder, reading it back

The dataset-level names are re-exported here; everything else is imported from its module.
"""
from utils.data.synthetic.dataset import load_ground_truth, make_synthetic_dataset, read_info

__all__ = ["load_ground_truth", "make_synthetic_dataset", "read_info"]
