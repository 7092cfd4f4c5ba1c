"""Identity field: latent code -> per-vertex 3D Gaussians on a (subdivided FLAME face-mask) mesh.

Pipeline for B identities at once::

    code z (B, code_dim) --normalise 2nd moment--> mapping MLP (equalized lr) --> style w (B, style_dim)
    template features (V, feat_dim) ++ Fourier(canonical position) (V, 3 + 6 F)
        --> synthesis: modulated + demodulated linear layers driven by w (StyleGAN2)  (B, V, hidden)
        --> modulated (not demodulated) head                                        (B, V, K * C)
        --> Gaussian attributes relative to each posed vertex's tangent frame      GaussianCloud (B, V*K)

Gaussian n = v * K + k belongs to vertex v (vertex-major), see :attr:`IdentityField.gaussian_vertex_ids`.

Surface attachment: the network never outputs world quantities.  Offsets are in units of the local edge length and
expressed in the vertex's tangent frame (columns tangent, bitangent, normal), scales are multiplicative deltas of
``init_scale_mult * edge_length`` and rotations are relative to the frame.  Frame and edge lengths come from the
identity's own posed vertices, so translating/rotating the mesh moves the Gaussians rigidly with it.

The tangent direction of vertex v is a fixed linear combination ``alpha * e1 + beta * e2`` of two of its incident
edges (chosen once, on the canonical template, so that it reproduces a smooth global reference direction projected
into the tangent plane).  Being linear in posed edges, it is rigid-equivariant and smooth across the surface,
unlike "first neighbour" tangents that jump by tens of degrees from vertex to vertex.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.gaussians import SH_C0, GaussianCloud, rotmat_to_quat
from models.geometry import area_weighted_vertex_normals, safe_normalize
from models.mip_filter import apply_3d_filter, filter_variance

_SQRT2 = math.sqrt(2.0)


# ====================================================================================== configuration
@dataclass
class IdentityFieldConfig:
    """Hyper-parameters of :class:`IdentityField` (all have defaults; YAML presets override them by name)."""

    code_dim: int = 80  # identity latent code size (80 as in the reference implementation)
    code_init_std: float = 0.01  # codes start as N(0, std^2); the 2nd-moment normalisation makes the scale irrelevant
    normalize_codes: bool = True  # StyleGAN's x * rsqrt(mean(x^2) + eps) on the code before mapping
    style_dim: int = 256  # width of the mapping network and size of the style vector w
    mapping_layers: int = 4  # fully connected layers in the mapping network
    mapping_lr_mult: float = 0.01  # equalized-lr multiplier of the mapping net (StyleGAN: 0.01)
    w_avg_beta: float = 0.995  # EMA decay of the tracked average style (truncation centre)
    feat_dim: int = 32  # learned per-vertex template feature size (0 disables them)
    template_init_std: float = 0.01  # init std of the template features (small: Fourier features dominate at start)
    fourier_freqs: int = 6  # octaves of the positional encoding: sin/cos(2^k * pi * p), k = 0..F-1
    hidden: int = 128  # width of the synthesis network
    synth_layers: int = 4  # modulated+demodulated hidden layers of the synthesis network
    gaussians_per_vertex: int = 1  # K Gaussians emitted per vertex (N = V * K)
    sh_degree: int = 0  # spherical-harmonics degree of the colours (0 = view-independent RGB)
    max_offset: float = 1.0  # largest offset of a Gaussian from its vertex, in units of the local edge length
    init_scale_mult: float = 0.5  # initial Gaussian std = init_scale_mult * local edge length
    init_normal_scale_ratio: float = 1.0  # initial std along the normal relative to the tangent std (<1: flat discs)
    init_opacity: float = 0.8  # initial opacity of every Gaussian
    init_rgb: float = 0.5  # initial grey level of every Gaussian (0.5 = mid-grey, SH DC = 0)
    head_init_std: float = 1e-2  # effective weight std of the output head (small, not zero, so gradients reach
    #                              every layer from the first step while Gaussians start on their vertices)
    filter_3d: float = 0.2  # Mip-Splatting 3D filter variance, training px^2 (0: off); models/mip_filter.py
    filter_3d_surface: bool = True  # 3D filter opacity compensation over the two largest axes only (false: all 3)
    filter_2d: float = 0.1  # Mip-Splatting 2D mip filter, px^2 (0: 3DGS's 0.3 px^2 dilation, no compensation)
    render_filter_2d: float = 0.3  # 2D mip filter (px^2) the tools render a trained model with (0: filter_2d)
    render_compensation: str = "optical_depth"  # its opacity compensation: optical_depth or opacity (renderer settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "IdentityFieldConfig":
        """Build from a (YAML) dict, rejecting unknown keys with a clear message."""
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown IdentityFieldConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


# ====================================================================================== building blocks
# channels of a per-Gaussian residual (IdentityField.add_residual): offset (pre-tanh), log-scale, opacity logit
RESIDUAL_CHANNELS = ("offset_x", "offset_y", "offset_z", "log_scale_x", "log_scale_y", "log_scale_z", "opacity_logit")


def normalize_2nd_moment(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """x * rsqrt(mean(x^2) + eps) along ``dim`` (StyleGAN's pixel/code norm)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def full_residual(residual: Tensor, channels: int) -> Tensor:
    """A per-Gaussian residual (..., 7) (:data:`RESIDUAL_CHANNELS`) spread into all ``channels`` raw channels of
    :meth:`IdentityField.attach` (offset 3, SH 3 * num_sh, log-scale 3, quaternion 4, opacity 1; zeros in the SH
    and quaternion channels); a residual that already has ``channels`` channels is returned as it is."""
    if residual.shape[-1] == channels:
        return residual
    n_sh3 = channels - 3 - 3 - 4 - 1  # 3 * num_sh
    if residual.shape[-1] != len(RESIDUAL_CHANNELS) or n_sh3 < 3 or n_sh3 % 3:
        raise ValueError(f"full_residual: expected a (..., {len(RESIDUAL_CHANNELS)}) or (..., {channels}) residual, "
                         f"got {tuple(residual.shape)}")
    z = residual.new_zeros
    lead = residual.shape[:-1]
    return torch.cat([residual[..., 0:3], z(*lead, n_sh3), residual[..., 3:6], z(*lead, 4), residual[..., 6:7]], -1)


class EqualizedLinear(nn.Module):
    """Fully connected layer with equalized learning rate (Karras et al.).

    The parameter is stored as N(0, 1) / lr_mult and scaled at run time by ``lr_mult / sqrt(fan_in)``; the bias is
    stored as bias_init / lr_mult and scaled by ``lr_mult``.  With Adam this makes every layer learn at the same
    relative speed and slows the layer down by ``lr_mult`` (the mapping net uses 0.01).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
        lr_mult: float = 1.0, activation: str = "linear",
    ) -> None:
        super().__init__()
        if activation not in ("linear", "lrelu"):
            raise ValueError(f"EqualizedLinear activation must be 'linear' or 'lrelu', got {activation!r}")
        self.in_features, self.out_features = in_features, out_features
        self.lr_mult = float(lr_mult)
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mult)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mult)) if bias else None
        self.weight_gain = lr_mult / math.sqrt(in_features)
        self.bias_gain = lr_mult

    def effective_weight(self) -> Tensor:
        """(out, in) weight actually applied."""
        return self.weight * self.weight_gain

    def effective_bias(self) -> Tensor | None:
        return None if self.bias is None else self.bias * self.bias_gain

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in) -> (..., out)."""
        y = F.linear(x, self.effective_weight(), self.effective_bias())
        if self.activation == "lrelu":
            y = F.leaky_relu(y, 0.2) * _SQRT2
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, lr_mult={self.lr_mult}, act={self.activation}"


class MappingNetwork(nn.Module):
    """z (B, code_dim) -> w (B, style_dim); tracks ``w_avg`` (EMA of w over training batches) for truncation."""

    def __init__(self, code_dim: int, style_dim: int, num_layers: int, lr_mult: float, w_avg_beta: float,
                 normalize: bool = True) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"mapping_layers must be >= 1, got {num_layers}")
        dims = [code_dim] + [style_dim] * num_layers
        self.layers = nn.ModuleList(
            EqualizedLinear(dims[i], dims[i + 1], lr_mult=lr_mult, activation="lrelu") for i in range(num_layers)
        )
        self.normalize = normalize
        self.w_avg_beta = float(w_avg_beta)
        self.register_buffer("w_avg", torch.zeros(style_dim))

    def forward(self, z: Tensor, truncation_psi: float = 1.0, update_w_avg: bool | None = None) -> Tensor:
        """z: (B, code_dim) -> w: (B, style_dim).

        ``w_avg`` is updated (EMA) when ``update_w_avg`` is True, or, if None, whenever the module is in training mode
        and no truncation is requested.  Truncation: w = w_avg + psi * (w - w_avg).
        """
        x = normalize_2nd_moment(z) if self.normalize else z
        for layer in self.layers:
            x = layer(x)
        if update_w_avg is None:
            update_w_avg = self.training and truncation_psi == 1.0
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(0).to(self.w_avg.dtype).lerp(self.w_avg, self.w_avg_beta))
        if truncation_psi != 1.0:
            x = self.w_avg.to(x.dtype).lerp(x, truncation_psi)
        return x


class ModulatedLinear(nn.Module):
    """StyleGAN2 modulated (+ optionally demodulated) linear layer applied per vertex.

    For styles ``s = affine(w)`` (B, in):  y[b, v] = d[b] * (W @ (x[b, v] * s[b])) + bias, d[b, o] =
    rsqrt(sum_i (W[o, i] s[b, i])^2 + eps).  Computed as one batched matmul with the per-sample weight
    ``W'[b] = W * s[b] * d[b]`` folded (B x out x in, i.e. 64 KiB per identity at width 128): this avoids
    materialising (and saving for backward) the (B, V, in) product ``x * s`` that the textbook form needs.
    """

    def __init__(self, in_features: int, out_features: int, style_dim: int, demodulate: bool = True,
                 activation: str = "lrelu", weight_std: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.demodulate = demodulate
        self.activation = activation
        self.affine = EqualizedLinear(style_dim, in_features, bias_init=1.0)  # styles start near 1
        # Equalized lr: stored N(0, 1) * weight_std, applied with gain 1/sqrt(in).
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * weight_std)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.weight_gain = 1.0 / math.sqrt(in_features)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """x: (B, V, in) or (V, in) shared by the batch; w: (B, style_dim) -> (B, V, out)."""
        B = w.shape[0]
        s = self.affine(w)  # (B, in)
        weight = self.weight * self.weight_gain  # (out, in)
        wb = weight.unsqueeze(0) * s.unsqueeze(1)  # (B, out, in)
        if self.demodulate:
            wb = wb * (wb.square().sum(dim=2, keepdim=True) + 1e-8).rsqrt()
        gain = _SQRT2 if self.activation == "lrelu" else 1.0
        bias = (self.bias * gain).to(x.dtype)
        wt = (wb * gain).transpose(1, 2).to(x.dtype)  # (B, in, out); lrelu(y)*g == lrelu(y*g) for g > 0
        if x.dim() == 2:  # shared input: one GEMM (V, in) @ (in, B*out), no (B, V, in) expansion
            V = x.shape[0]
            y = (x @ wt.permute(1, 0, 2).reshape(self.in_features, B * self.out_features))
            y = y.view(V, B, self.out_features).transpose(0, 1) + bias
        else:
            y = torch.baddbmm(bias.expand(B, 1, self.out_features), x, wt)
        if self.activation == "lrelu":
            y = F.leaky_relu(y, 0.2, inplace=True)  # inplace is safe: baddbmm's backward does not need y
        return y


# ====================================================================================== geometry helpers
# Hamilton product as a matrix: q1 * q2 = L(q1) @ q2 with L(q)[i, j] = _QL_SIGN[i, j] * q[_QL_INDEX[i, j]].
_QL_INDEX = ((0, 1, 2, 3), (1, 0, 3, 2), (2, 3, 0, 1), (3, 2, 1, 0))
_QL_SIGN = ((1, -1, -1, -1), (1, 1, -1, 1), (1, 1, 1, -1), (1, -1, 1, 1))


def quat_left_matrix(q: Tensor) -> Tensor:
    """(..., 4) quaternions (w, x, y, z) -> (..., 4, 4) matrices L of the Hamilton product: q * p = L @ p, so that
    R(L @ p) = R(q) @ R(p)."""
    index = torch.tensor(_QL_INDEX, device=q.device)
    sign = torch.tensor(_QL_SIGN, dtype=q.dtype, device=q.device)
    return q[..., index] * sign


class AttachSurface(NamedTuple):
    """What :meth:`IdentityField.attach` takes from a posed mesh, computed once per pose by
    :meth:`IdentityField.attach_surface`: with fixed geometry (a fit, an interpolation between codes)
    a call is then only the per-Gaussian activations, a few dozen GPU kernels instead of ~150 (the quaternion of
    every frame alone is ~40 small kernels), which is what a CUDA-graph replay of a batch-1 network costs (one H100,
    41k-vertex field, bf16: 0.588 -> 0.407 ms per replay; benchmarks/results/gpu_h100_2026-12-07g.md)."""
    frames: Tensor  # (B, V, 3, 3) columns tangent, bitangent, normal
    edge_len: Tensor  # (B, V) mean length of the incident edges
    frames_scaled: Tensor  # (B, V, 1, 3, 3) frames * edge_len: offset in edge units, local frame -> world
    quat_left: Tensor  # (B, V, 1, 4, 4) quat_left_matrix of the frame's rotation
    log_scale_base: Tensor  # (B, V, 1, 3) log of the initial standard deviations (init_scale_mult * edge_len)


def fourier_features(p: Tensor, num_freqs: int) -> Tensor:
    """p (..., 3) roughly in [-1, 1] -> (..., 3 + 6 F): [p, sin(2^k pi p), cos(2^k pi p)]."""
    if num_freqs <= 0:
        return p
    freqs = (2.0 ** torch.arange(num_freqs, dtype=p.dtype, device=p.device)) * math.pi  # (F,)
    ang = (p.unsqueeze(-1) * freqs).flatten(-2)  # (..., 3F)
    return torch.cat([p, torch.sin(ang), torch.cos(ang)], dim=-1)


def _tangent_combination(verts: np.ndarray, faces: np.ndarray, normals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per vertex: two neighbour ids (V, 2) and coefficients (V, 2) so that alpha*e1 + beta*e2 reproduces, on the
    canonical mesh, a smooth reference direction projected into the vertex's tangent plane (computed once)."""
    V = len(verts)
    # Reference axis: the world axis that is least often (nearly) parallel to the normals; per-vertex fallback to
    # the next one where the normal is within ~25 deg of it.
    axes = np.eye(3)
    dots = np.abs(normals @ axes.T)  # (V, 3)
    order = np.lexsort(((dots ** 2).mean(0), (dots > 0.9).sum(0)))
    a = np.where((dots[:, order[0]] > 0.9)[:, None], axes[order[1]], axes[order[0]])  # (V, 3)
    a_t = a - normals * (normals * a).sum(1, keepdims=True)
    a_t /= np.linalg.norm(a_t, axis=1, keepdims=True).clip(1e-12)
    # Every (vertex, incident face) corner: the two edges leaving the vertex inside that face.
    corner_v = faces.reshape(-1)  # (3F,)
    nb1 = faces[:, [1, 2, 0]].reshape(-1)
    nb2 = faces[:, [2, 0, 1]].reshape(-1)
    e1 = verts[nb1] - verts[corner_v]
    e2 = verts[nb2] - verts[corner_v]
    cr = np.linalg.norm(np.cross(e1, e2), axis=1)
    quality = cr / (np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1)).clip(1e-30)  # sin(corner angle)
    # Best conditioned corner per vertex (largest sin of the corner angle).
    order_c = np.lexsort((-quality, corner_v))
    first = np.unique(corner_v[order_c], return_index=True)[1]
    best = order_c[first]  # (V,) corner index per vertex (all vertices are referenced: checked by the caller)
    E = np.stack([e1[best], e2[best]], axis=2)  # (V, 3, 2)
    coef = np.einsum("vij,vj->vi", np.linalg.pinv(E), a_t[np.arange(V)])  # least squares (V, 2)
    nbrs = np.stack([nb1[best], nb2[best]], axis=1)
    return nbrs, coef


# ====================================================================================== the identity field
class IdentityField(nn.Module):
    """Latent identity code -> Gaussian cloud attached to the identity's posed face-mask mesh.

    Args:
        cfg: :class:`IdentityFieldConfig`.
        num_identities: rows of the code table :attr:`codes` (one per training identity).
        template_verts: (V, 3) canonical (template) vertex positions; fixes the per-vertex inputs of the network
            (normalised to the template's bounding box) and the tangent construction.
        faces: (F, 3) triangle vertex ids of the mesh (every vertex must be used by a face).
    """

    def __init__(self, cfg: IdentityFieldConfig, num_identities: int, template_verts: Tensor | np.ndarray,
                 faces: Tensor | np.ndarray) -> None:
        super().__init__()
        self.cfg = cfg
        tv = torch.as_tensor(np.asarray(template_verts, dtype=np.float32) if not torch.is_tensor(template_verts)
                             else template_verts.detach().cpu().float())
        fc = torch.as_tensor(np.asarray(faces) if not torch.is_tensor(faces) else faces.detach().cpu()).long()
        if tv.dim() != 2 or tv.shape[1] != 3:
            raise ValueError(f"IdentityField: template_verts must be (V, 3), got {tuple(tv.shape)}")
        if fc.dim() != 2 or fc.shape[1] != 3 or len(fc) == 0:
            raise ValueError(f"IdentityField: faces must be a non-empty (F, 3) array, got {tuple(fc.shape)}")
        V = tv.shape[0]
        if int(fc.min()) < 0 or int(fc.max()) >= V:
            raise ValueError(f"IdentityField: faces index vertices {int(fc.min())}..{int(fc.max())}, but V = {V}")
        used = torch.zeros(V, dtype=torch.bool)
        used[fc.reshape(-1)] = True
        if not bool(used.all()):
            bad = torch.nonzero(~used).flatten()[:10].tolist()
            raise ValueError(f"IdentityField: {int((~used).sum())} vertices belong to no face (e.g. {bad}); "
                             "pass the face-mask submesh without unreferenced vertices")
        if num_identities < 1:
            raise ValueError(f"IdentityField: num_identities must be >= 1, got {num_identities}")
        if cfg.gaussians_per_vertex < 1 or cfg.sh_degree < 0 or not (0 < cfg.init_opacity < 1):
            raise ValueError(f"IdentityField: invalid config {cfg}")
        self.num_vertices = V
        self.K = cfg.gaussians_per_vertex
        self.num_sh = (cfg.sh_degree + 1) ** 2

        # ---- latent codes (auto-decoder table)
        self.codes = nn.Embedding(num_identities, cfg.code_dim)
        nn.init.normal_(self.codes.weight, 0.0, cfg.code_init_std)

        # ---- mapping network
        self.mapping = MappingNetwork(cfg.code_dim, cfg.style_dim, cfg.mapping_layers, cfg.mapping_lr_mult,
                                      cfg.w_avg_beta, normalize=cfg.normalize_codes)

        # ---- constant per-vertex inputs
        lo, hi = tv.min(0).values, tv.max(0).values
        center, half = (lo + hi) / 2, ((hi - lo) / 2).max().clamp_min(1e-12)  # isotropic: keeps aspect ratio
        pos = (tv - center) / half  # (V, 3) in [-1, 1]
        self.register_buffer("template_verts", tv.clone())
        self.register_buffer("faces", fc.clone())
        self.register_buffer("fourier", fourier_features(pos, cfg.fourier_freqs), persistent=False)
        self.template_features = nn.Parameter(torch.randn(V, cfg.feat_dim) * cfg.template_init_std) \
            if cfg.feat_dim > 0 else None
        in_dim = self.fourier.shape[1] + cfg.feat_dim

        # ---- synthesis network
        self.synthesis = nn.ModuleList()
        d = in_dim
        for _ in range(cfg.synth_layers):
            self.synthesis.append(ModulatedLinear(d, cfg.hidden, cfg.style_dim, demodulate=True, activation="lrelu"))
            d = cfg.hidden
        # Channels per Gaussian: offset 3, SH 3*(d+1)^2, log-scale 3, quat 4, opacity 1.
        self.channels = 3 + 3 * self.num_sh + 3 + 4 + 1
        # Head: modulated without demodulation (like StyleGAN2's toRGB); small weights so Gaussians start on their
        # vertices with edge-sized scales, grey colour and the initial opacity, yet gradients reach all layers.
        self.head = ModulatedLinear(d, self.K * self.channels, cfg.style_dim, demodulate=False, activation="linear",
                                    weight_std=cfg.head_init_std)
        self._sl = self._channel_slices()
        with torch.no_grad():
            b = self.head.bias.view(self.K, self.channels)
            b.zero_()  # offset 0, scale delta 0, opacity logit delta 0, higher SH bands 0
            b[:, self._sl["sh"].start:self._sl["sh"].start + 3] = (cfg.init_rgb - 0.5) / SH_C0
            b[:, self._sl["quat"].start] = 1.0  # identity rotation w = 1 relative to the surface frame

        # ---- topology for frames and edge lengths (fixed; computed once on the template)
        edges = torch.cat([fc[:, [0, 1]], fc[:, [1, 2]], fc[:, [2, 0]]], 0).sort(dim=1).values
        edges = torch.unique(edges, dim=0)  # (E, 2) undirected
        deg = torch.zeros(V).index_add_(0, edges.reshape(-1), torch.ones(edges.numel()))
        self.register_buffer("edges", edges, persistent=False)
        self.register_buffer("inv_degree", 1.0 / deg, persistent=False)
        n_c = area_weighted_vertex_normals(tv.double(), fc).numpy()
        nbrs, coef = _tangent_combination(tv.double().numpy(), fc.numpy(), n_c)
        self.register_buffer("tangent_nbrs", torch.from_numpy(nbrs).long(), persistent=False)
        self.register_buffer("tangent_coef", torch.from_numpy(coef).float(), persistent=False)
        log_init = torch.tensor([math.log(cfg.init_scale_mult)] * 2
                                + [math.log(cfg.init_scale_mult * cfg.init_normal_scale_ratio)])
        self.register_buffer("log_scale_init", log_init, persistent=False)
        self.register_buffer("gaussian_vertex_ids", torch.arange(V).repeat_interleave(self.K), persistent=False)
        # Mip-Splatting 3D filter: per-vertex world-space variance cfg.filter_3d / nu^2 (V,), or None (off) until the
        # training cameras' sampling rate is set.  Not in the state dict (model.pt stores the rate itself, so the
        # weights and their fingerprint are unchanged).
        self.register_buffer("filter_variance", None, persistent=False)
        self.sampling_rate: Tensor | None = None
        self.opacity_logit_init = math.log(cfg.init_opacity / (1 - cfg.init_opacity))

    # ------------------------------------------------------------------ Mip-Splatting 3D filter
    def set_sampling_rate(self, rate: Tensor | None) -> None:
        """Switch the 3D filter on with the per-vertex maximal sampling rate ``rate`` (V,) (px per world unit,
        models.mip_filter.sampling_rate), or off with None (also off when ``cfg.filter_3d`` is 0)."""

        if rate is None or self.cfg.filter_3d <= 0:
            self.sampling_rate, self.filter_variance = (None if rate is None else rate.detach().float().cpu()), None
            return
        rate = torch.as_tensor(rate).detach().float()
        if rate.shape != (self.num_vertices,) or not bool(torch.isfinite(rate).all()) or bool((rate <= 0).any()):
            raise ValueError(f"IdentityField.set_sampling_rate: expected ({self.num_vertices},) positive finite rates, "
                             f"got shape {tuple(rate.shape)}")
        self.sampling_rate = rate.cpu()
        dev = self.template_verts.device
        self.filter_variance = filter_variance(rate, self.cfg.filter_3d).to(dev)

    # ------------------------------------------------------------------ small helpers
    def _channel_slices(self) -> dict[str, slice]:
        s, out = 0, {}
        for name, n in (("offset", 3), ("sh", 3 * self.num_sh), ("scale", 3), ("quat", 4), ("opacity", 1)):
            out[name] = slice(s, s + n)
            s += n
        return out

    @property
    def num_gaussians(self) -> int:
        """N = V * K."""
        return self.num_vertices * self.K

    @property
    def num_identities(self) -> int:
        return self.codes.num_embeddings

    def mean_code(self) -> Tensor:
        """(code_dim,) mean of the code table (a starting point for fitting a new identity)."""
        return self.codes.weight.mean(0)

    def _as_codes(self, codes: Tensor) -> Tensor:
        if not torch.is_floating_point(codes):  # identity indices -> table rows
            return self.codes(codes)
        if codes.dim() == 1:
            codes = codes.unsqueeze(0)
        if codes.dim() != 2 or codes.shape[1] != self.cfg.code_dim:
            raise ValueError(f"IdentityField: codes must be (B, {self.cfg.code_dim}) floats or (B,) identity ids, "
                             f"got {tuple(codes.shape)} {codes.dtype}")
        return codes

    def style(self, codes: Tensor, truncation_psi: float = 1.0, update_w_avg: bool | None = None) -> Tensor:
        """codes (B, code_dim) (or (B,) long identity ids) -> styles w (B, style_dim)."""
        return self.mapping(self._as_codes(codes), truncation_psi=truncation_psi, update_w_avg=update_w_avg)

    # ------------------------------------------------------------------ geometry
    def surface_frames(self, vertices: Tensor) -> tuple[Tensor, Tensor]:
        """vertices (B, V, 3) posed world positions -> (frames (B, V, 3, 3) with columns tangent, bitangent,
        normal; edge_len (B, V) mean length of the incident edges)."""
        n = area_weighted_vertex_normals(vertices, self.faces)
        e1 = vertices[:, self.tangent_nbrs[:, 0]] - vertices
        e2 = vertices[:, self.tangent_nbrs[:, 1]] - vertices
        coef = self.tangent_coef.to(vertices.dtype)
        t = coef[:, 0:1] * e1 + coef[:, 1:2] * e2
        t = t - n * (n * t).sum(-1, keepdim=True)  # Gram-Schmidt against the normal
        # Fallback for degenerate (collapsed) neighbourhoods: any direction orthogonal to n.
        eye = torch.eye(3, dtype=n.dtype, device=n.device)  # built on the device: no host copy (CUDA-graph safe)
        alt = torch.where((n[..., :1].abs() < 0.9), eye[0], eye[1])
        alt = torch.cross(n, alt.expand_as(n), dim=-1)
        ok = t.square().sum(-1, keepdim=True) > 1e-20 * e1.square().sum(-1, keepdim=True).clamp_min(1e-30)
        t = safe_normalize(torch.where(ok, t, alt))
        b = torch.cross(n, t, dim=-1)  # right-handed: t x b = n
        frames = torch.stack([t, b, n], dim=-1)
        d = vertices[:, self.edges[:, 0]] - vertices[:, self.edges[:, 1]]
        elen = (d.square().sum(-1) + 1e-20).sqrt()  # (B, E)
        acc = torch.zeros(vertices.shape[:-1], dtype=vertices.dtype, device=vertices.device)
        acc = acc.index_add(1, self.edges[:, 0], elen).index_add(1, self.edges[:, 1], elen)
        return frames, acc * self.inv_degree.to(vertices.dtype)

    def attach_surface(self, vertices: Tensor, surface: tuple[Tensor, Tensor] | None = None) -> AttachSurface:
        """vertices (B, V, 3) posed (or (V, 3)) -> the :class:`AttachSurface` that :meth:`attach` uses; ``surface``:
        their ``surface_frames`` when the caller already has them."""
        if vertices.dim() == 2:
            vertices = vertices.unsqueeze(0)
        frames, edge_len = self.surface_frames(vertices) if surface is None else surface
        return AttachSurface(
            frames, edge_len, (frames * edge_len[..., None, None]).unsqueeze(2),
            quat_left_matrix(rotmat_to_quat(frames)).unsqueeze(2),
            (self.log_scale_init.to(frames.dtype) + torch.log(edge_len)[..., None]).unsqueeze(2))

    # ------------------------------------------------------------------ per-Gaussian residuals
    def add_residual(self, raw: Tensor, residual: Tensor | None) -> Tensor:
        """``raw`` (B, V, K, C) plus a per-Gaussian residual of a fitted person (track.py's video refinement,
        ``FittedCode.gaussians``), either (V, K, 7) in the pre-activation channels of :meth:`attach` position offset
        (3, before the tanh: edge units in the vertex's tangent frame, so it rides the surface when posed), log-scale
        (3) and opacity logit (1) (:data:`RESIDUAL_CHANNELS`), or (V, K, C) in every raw channel (a pivotal-tuning
        delta: the tuned network's output minus this one's, which also moves colour and rotation).  ``residual``
        None returns ``raw`` itself."""
        if residual is None:
            return raw
        if tuple(residual.shape) not in ((self.num_vertices, self.K, len(RESIDUAL_CHANNELS)),
                                         (self.num_vertices, self.K, self.channels)):
            raise ValueError(f"IdentityField: a per-Gaussian residual must be ({self.num_vertices}, {self.K}, "
                             f"{len(RESIDUAL_CHANNELS)}) ({', '.join(RESIDUAL_CHANNELS)}) or ({self.num_vertices}, "
                             f"{self.K}, {self.channels}) (every raw channel), got {tuple(residual.shape)}")
        return raw + full_residual(residual.to(raw.dtype), self.channels)

    # ------------------------------------------------------------------ forward
    def synthesize_raw(self, w: Tensor) -> Tensor:
        """styles (B, style_dim) -> raw head output (B, V, K, C) (pre-activation, identity independent of pose)."""
        x = self.fourier
        if self.template_features is not None:
            x = torch.cat([self.template_features, x], dim=-1)  # (V, in), shared by the batch
        for layer in self.synthesis:
            x = layer(x, w)
        y = self.head(x, w)
        return y.view(w.shape[0], self.num_vertices, self.K, self.channels)

    def synthesize(self, w: Tensor, vertices: Tensor, return_aux: bool = False,
                   surface: AttachSurface | tuple[Tensor, Tensor] | None = None):
        """Gaussians from styles (B, style_dim) directly (e.g. to fit in W space); see :meth:`forward`.

        ``surface``: precomputed ``attach_surface(vertices)`` for fixed geometry (saves work when fitting a style).
        Equals ``attach(synthesize_raw(w), vertices, surface)``.
        """
        if vertices.dim() == 2:
            vertices = vertices.unsqueeze(0).expand(w.shape[0], -1, -1)
        out = self.attach(self.synthesize_raw(w).to(vertices.dtype), vertices, surface, return_aux)
        if return_aux:
            out[1]["w"] = w
        return out

    def attach(self, raw: Tensor, vertices: Tensor, surface: AttachSurface | tuple[Tensor, Tensor] | None = None,
               return_aux: bool = False):
        """Place the network's raw output on posed vertices: the pose-dependent half of :meth:`synthesize`.

        The raw output does not depend on the pose, so an animation runs the network once per identity and calls
        this for every frame (models/posing.py).

        Args:
            raw: (B, V, K, C) from :meth:`synthesize_raw`, or (1, V, K, C) shared by all B posed meshes.
            vertices: (B, V, 3) posed world-space vertices (or (V, 3) with B = 1).
            surface: precomputed ``attach_surface(vertices)`` (or ``surface_frames(vertices)``) for these vertices.
            return_aux: also return ``offset`` (B, N, 3) in edge units in the local frame, ``log_scale_delta``
                (B, N, 3), ``edge_len`` (B, V), ``frames`` (B, V, 3, 3).
        Returns:
            GaussianCloud with batch shape (B,), N = V * K (or ``(cloud, aux)``).
        """
        if vertices.dim() == 2:
            vertices = vertices.unsqueeze(0)
        B, V = vertices.shape[0], self.num_vertices
        if vertices.shape != (B, V, 3):
            raise ValueError(f"IdentityField: vertices must be (B, V={V}, 3) or (V, 3), got {tuple(vertices.shape)}")
        if raw.dim() != 4 or raw.shape[1:] != (V, self.K, self.channels) or raw.shape[0] not in (1, B):
            raise ValueError(f"IdentityField: raw output must be (B={B} or 1, {V}, {self.K}, {self.channels}), got "
                             f"{tuple(raw.shape)}")
        raw = raw.expand(B, -1, -1, -1)
        sl, cfg, K = self._sl, self.cfg, self.K
        if not isinstance(surface, AttachSurface):
            surface = self.attach_surface(vertices, surface)
        frames, edge_len = surface.frames, surface.edge_len  # (B, V, 3, 3), (B, V)

        offset = cfg.max_offset * torch.tanh(raw[..., sl["offset"]])  # (B, V, K, 3), edge units, local frame
        # products written as multiply-and-sum, not matmul: float32 even under a caller's bf16 autocast
        means = vertices.unsqueeze(2) + (surface.frames_scaled * offset.unsqueeze(-2)).sum(-1)

        log_scale_delta = raw[..., sl["scale"]]
        scales = torch.exp(log_scale_delta + surface.log_scale_base)

        # frame rotation * local rotation; L(q_frame) is orthogonal, so one normalisation after the product suffices
        quats = safe_normalize((surface.quat_left * raw[..., sl["quat"]].unsqueeze(-2)).sum(-1))

        opac = torch.sigmoid(raw[..., sl["opacity"]].squeeze(-1) + self.opacity_logit_init)
        sh = raw[..., sl["sh"]].reshape(B, V, K, self.num_sh, 3)
        if self.filter_variance is not None:  # Mip-Splatting 3D filter: a per-vertex constant, no extra pass

            scales, opac = apply_3d_filter(scales, opac, self.filter_variance.to(scales.dtype)[None, :, None],
                                           surface=cfg.filter_3d_surface)

        N = V * K
        cloud = GaussianCloud(
            means=means.reshape(B, N, 3), quats=quats.reshape(B, N, 4), scales=scales.reshape(B, N, 3),
            opacities=opac.reshape(B, N), sh=sh.reshape(B, N, self.num_sh, 3),
        )
        if not return_aux:
            return cloud
        aux = {
            "offset": offset.reshape(B, N, 3),
            "log_scale_delta": log_scale_delta.reshape(B, N, 3),
            "edge_len": edge_len,
            "frames": frames,
        }
        return cloud, aux

    def forward(self, codes: Tensor, vertices: Tensor, truncation_psi: float = 1.0, return_aux: bool = False):
        """Gaussians of B identities.

        Args:
            codes: (B, code_dim) latent codes (e.g. ``self.codes(ids)`` or a free tensor being fitted), or (B,)
                long identity ids.
            vertices: (B, V, 3) posed world-space vertices of each identity's face-mask mesh, or (V, 3) shared.
            truncation_psi: StyleGAN truncation towards ``mapping.w_avg`` (1 = none).
            return_aux: also return a dict with ``codes`` (B, D), ``w`` (B, S), ``offset`` (B, N, 3) in edge units
                in the local frame, ``log_scale_delta`` (B, N, 3), ``edge_len`` (B, V), ``frames`` (B, V, 3, 3).

        Returns:
            GaussianCloud with batch shape (B,) and N = V * K Gaussians (vertex-major), or ``(cloud, aux)``.
        """
        codes = self._as_codes(codes)
        w = self.style(codes, truncation_psi=truncation_psi)
        out = self.synthesize(w, vertices, return_aux=return_aux)
        if return_aux:
            out[1]["codes"] = codes
        return out

    # ------------------------------------------------------------------ training helpers
    @staticmethod
    def regularizers(aux: dict[str, Tensor]) -> dict[str, Tensor]:
        """Scalar regularisers from the ``aux`` dict of ``forward(..., return_aux=True)``.

        ``code``: mean squared code norm (only meaningful with ``normalize_codes=False``: normalised codes are
        scale-free); ``offset``: mean squared offset in edge units (keeps Gaussians near their vertex);
        ``scale``: mean squared growth of log-scales beyond their initial size (shrinking is free: it only sharpens).
        """
        out = {
            "offset": aux["offset"].square().sum(-1).mean(),
            "scale": F.relu(aux["log_scale_delta"]).square().mean(),
        }
        if "codes" in aux:
            out["code"] = aux["codes"].square().sum(-1).mean()
        return out

    def param_groups(self, lr_network: float, lr_codes: float, lr_template: float | None = None,
                     lr_mapping: float | None = None, **extra: Any) -> list[dict[str, Any]]:
        """Adam parameter groups with names: ``codes``, ``mapping``, ``synthesis`` (incl. head), ``template``.

        The mapping net's equalized-lr multiplier already slows it by ``mapping_lr_mult``, so by default it shares
        ``lr_network``.  ``extra`` (e.g. ``betas``) is copied into every group.
        """
        groups = [
            {"name": "codes", "params": [self.codes.weight], "lr": lr_codes},
            {"name": "mapping", "params": list(self.mapping.parameters()),
             "lr": lr_network if lr_mapping is None else lr_mapping},
            {"name": "synthesis", "params": list(self.synthesis.parameters()) + list(self.head.parameters()),
             "lr": lr_network},
        ]
        if self.template_features is not None:
            groups.append({"name": "template", "params": [self.template_features],
                           "lr": lr_network if lr_template is None else lr_template})
        for g in groups:
            g.update(extra)
        return groups
