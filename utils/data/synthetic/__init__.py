"""The embedded synthetic data: a synthetic FLAME-format head model and a NeRSemble-format dataset rendered from
known ground-truth Gaussian heads (one concept per module; see each module's docstring)."""
