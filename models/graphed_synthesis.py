"""Frozen identity field -> Gaussians of ONE identity per call, replayed from CUDA graphs on a GPU.

Fitting a new face (Adam on one style vector) and rendering an interpolation (a new code every frame) call the
frozen network at batch 1 hundreds of times.  At that size the GPU work of the per-vertex network is a few tens of
microseconds; the time goes to launching its few hundred small kernels from Python (measured on an H100: see
benchmarks/README.md).  :class:`GraphedSynthesis` captures the network (forward, and backward when gradients are
wanted) once into CUDA graphs and replays them, so a call costs one or two graph launches.  On a CPU, or when
``use_graphs=False`` or capture fails (the reason is kept in ``fallback_reason``), the same function runs eagerly:
results are identical up to floating-point summation order.

The outputs of a replayed call live in static buffers that the next call overwrites (on the same CUDA stream, so
work already queued on them, e.g. a render, is unaffected).  Keep a copy (``cloud.clone()`` or ``.detach().clone()``
of the fields) if an output must outlive the next call.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.gaussians import GaussianCloud
from models.identity_field import IdentityField, normalize_2nd_moment

_SQRT2 = math.sqrt(2.0)

_FIELDS = ("means", "quats", "scales", "opacities", "sh")


def capture_forward(fn: Callable[..., tuple[Tensor, ...]], args: tuple[Tensor, ...], device: torch.device
                    ) -> Callable[..., tuple[Tensor, ...]]:
    """Capture ``fn(*args)`` (no gradients) into one CUDA graph with static input and output buffers.

    Returns ``replay(*new_args)``: copies the new arguments (same shapes) into the input buffers on the current stream,
    replays the graph and returns the static output tensors, which the next replay overwrites.  ``fn`` must not
    synchronise with the host (no ``.item()``, no data-dependent shapes)."""
    static_in = tuple(a.clone() for a in args)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm-up outside the graph (allocator, lazy kernels)
            fn(*static_in)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = fn(*static_in)

    def replay(*a: Tensor) -> tuple[Tensor, ...]:
        for dst, src in zip(static_in, a):
            dst.copy_(src)
        graph.replay()
        return static_out

    return replay


class FrozenNetwork:
    """``w (1, style_dim) -> raw (1, V, K, C)``: :meth:`IdentityField.synthesize_raw` of a frozen field at batch 1,
    with everything that depends on the parameters alone computed once (and :meth:`style`, its mapping network).

    At batch 1 the network is launch-bound (see the module docstring): each modulated layer spends ~15 tiny kernels on
    its 128 x 128 weight (the gains, the affine map, the casts) against two on its V vertices.  Here the parameter-only
    quantities (equalized-lr gains, the input features, the bf16 copies) are precomputed, the affine maps of all
    layers are one matmul, and the demodulation of all hidden layers is one batched computation (their weights padded
    to one input width with zeros, which leave the sums unchanged): one batch-1 call of GraphedSynthesis issues 85
    top-level ops instead of 169 (CPU profiler; benchmarks/results/lead_cpu_2026-12-07g.md).  Same function as the
    field's up to float rounding; the parameters are snapshots, so the field must not change while this is used.

    Args:
        field: the trained, frozen IdentityField.
        dtype: the per-vertex matmuls' precision (torch.float32, or torch.bfloat16 for display paths).
    """

    def __init__(self, field: IdentityField, dtype: torch.dtype = torch.float32) -> None:
        hidden, head = list(field.synthesis), field.head
        if any(m.activation != "lrelu" or not m.demodulate for m in hidden) or head.demodulate \
                or head.activation != "linear" or any(m.activation != "lrelu" for m in field.mapping.layers):
            raise ValueError("FrozenNetwork expects demodulated lrelu hidden layers, a linear head and an lrelu "
                             "mapping network")
        with torch.no_grad():
            x0 = field.fourier if field.template_features is None else torch.cat([field.template_features,
                                                                                  field.fourier], -1)
            self.x0 = x0.detach().to(dtype)  # (V, in0): the constant per-vertex input
            self.width = max([m.in_features for m in hidden], default=0)  # padded input width of the hidden layers
            rows, bias = [], []
            for m in hidden:  # affine rows padded to the common width (zero rows -> zero styles there)
                pad = self.width - m.in_features
                rows.append(F.pad(m.affine.effective_weight(), (0, 0, 0, pad)))
                bias.append(F.pad(m.affine.effective_bias(), (0, pad)))
            rows.append(head.affine.effective_weight())
            bias.append(head.affine.effective_bias())
            self.affine_w = torch.cat(rows).detach()  # (L * width + in_head, style_dim)
            self.affine_b = torch.cat(bias).detach()
            self.hidden_w = (torch.stack([F.pad(m.weight * m.weight_gain, (0, self.width - m.in_features))
                                          for m in hidden]).detach() if hidden else None)  # (L, out, width)
            self.hidden_in = [m.in_features for m in hidden]
            self.hidden_b = [(m.bias * _SQRT2).detach().to(dtype) for m in hidden]  # lrelu layers' gain sqrt(2)
            self.head_w = (head.weight * head.weight_gain).detach()  # (out, in): linear head, gain 1
            self.head_b = head.bias.detach().to(dtype)
            # mapping network: lrelu(x W^T g + b g') * sqrt(2) == lrelu(x (sqrt(2) W g)^T + sqrt(2) b g')
            self.mapping = [((m.effective_weight() * _SQRT2).t().detach(), (m.effective_bias() * _SQRT2).detach())
                            for m in field.mapping.layers]
            self.normalize = field.mapping.normalize
        self.dtype, self.V, self.K, self.C = dtype, field.num_vertices, field.K, field.channels

    def style(self, z: Tensor) -> Tensor:
        """z: (1, code_dim) -> w (1, style_dim), as ``field.style(z, update_w_avg=False)`` (no truncation)."""
        x = normalize_2nd_moment(z) if self.normalize else z
        for weight_t, bias in self.mapping:
            x = F.leaky_relu_(torch.addmm(bias, x, weight_t), 0.2)
        return x

    def __call__(self, w: Tensor) -> Tensor:
        """w: (1, style_dim) -> raw head output (1, V, K, C) in ``dtype``."""
        s = torch.addmm(self.affine_b, w, self.affine_w.t())[0]  # (L * width + in_head,) every layer's styles
        x = self.x0
        if self.hidden_w is not None:
            L = len(self.hidden_in)
            wb = self.hidden_w * s[:L * self.width].view(L, 1, self.width)  # (L, out, width) modulated
            wb = wb * ((wb.square().sum(-1, keepdim=True) + 1e-8).rsqrt() * _SQRT2)  # demodulated, lrelu gain
            wt = wb.transpose(1, 2).to(self.dtype)  # (L, width, out)
            for i, n_in in enumerate(self.hidden_in):
                x = F.leaky_relu_(torch.addmm(self.hidden_b[i], x, wt[i, :n_in]), 0.2)
        wh = (self.head_w * s[s.shape[0] - self.head_w.shape[1]:]).t().to(self.dtype)  # (in, out)
        return torch.addmm(self.head_b, x, wh).view(1, self.V, self.K, self.C)


class GraphedSynthesis:
    """Callable ``v (S,) or (D,) [, vertices (V, 3)] -> GaussianCloud (N, ...)`` of a frozen IdentityField.

    Args:
        field: the trained field; its parameters must not require gradients (frozen) while this object is used.
        vertices: (V, 3) posed, subdivided face-mask vertices.  With ``dynamic_geometry=False`` they are fixed for
            every call (surface frames computed once); with ``True`` every call passes its own (V, 3) vertices
            (an interpolation that morphs the geometry), and this tensor is only the capture example.
        space: "w": ``v`` is a style (style_dim,); "z": ``v`` is a latent code (code_dim,) that goes through the
            mapping network (no w_avg update).
        requires_grad: build the backward graph too, so ``loss.backward()`` reaches ``v`` (and the vertices with
            dynamic geometry) through the replayed network.
        use_graphs: None = on CUDA devices; False = always eager.
        precision: "fp32", or "bf16": the per-vertex matmuls in bfloat16 on CUDA (outputs stay float32);
            for display-only paths (viewer, animation), where a new code every frame makes the network the cost.
    """

    def __init__(self, field: IdentityField, vertices: Tensor, space: str = "w", requires_grad: bool = True,
                 dynamic_geometry: bool = False, use_graphs: bool | None = None, precision: str = "fp32") -> None:
        if space not in ("w", "z"):
            raise ValueError(f"GraphedSynthesis: space must be 'w' or 'z', got {space!r}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"GraphedSynthesis: precision must be 'fp32' or 'bf16', got {precision!r}")
        if vertices.dim() != 2 or vertices.shape != (field.num_vertices, 3):
            raise ValueError(f"GraphedSynthesis: vertices must be ({field.num_vertices}, 3), got "
                             f"{tuple(vertices.shape)}")
        if any(p.requires_grad for p in field.parameters()):
            raise ValueError("GraphedSynthesis needs a frozen field (parameters with requires_grad=False)")
        self.field, self.space, self.requires_grad = field, space, requires_grad
        self.dynamic_geometry = dynamic_geometry
        self.device = vertices.device
        self.fallback_reason: str | None = None
        verts = vertices.detach()[None]
        surface = None
        if not dynamic_geometry:
            with torch.no_grad():
                surface = field.attach_surface(verts)

        bf16 = precision == "bf16" and self.device.type == "cuda"
        network = FrozenNetwork(field, torch.bfloat16 if bf16 else torch.float32)

        def attributes(v: Tensor, *geometry: Tensor) -> tuple[Tensor, ...]:
            w = v[None] if space == "w" else network.style(v[None])
            vv = geometry[0][None] if geometry else verts
            cloud = field.attach(network(w).to(vv.dtype), vv, surface)[0]
            return tuple(getattr(cloud, k) for k in _FIELDS)

        self._eager = attributes
        self._fn: Callable[..., tuple[Tensor, ...]] = attributes
        dim = field.cfg.style_dim if space == "w" else field.cfg.code_dim
        want = (self.device.type == "cuda") if use_graphs is None else (use_graphs and self.device.type == "cuda")
        if want:
            example = torch.zeros(dim, device=self.device)
            if space == "w":
                example += field.mapping.w_avg.to(self.device)  # a plausible style for the warm-up runs
            args = (example,) + ((vertices.detach().clone(),) if dynamic_geometry else ())
            try:
                self._fn = self._capture(attributes, args)
            except Exception as exc:  # keep working (eagerly) where a capture is not possible
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                warnings.warn(f"GraphedSynthesis: CUDA graph capture failed, running eagerly ({self.fallback_reason})")
                torch.cuda.synchronize(self.device)
                self._fn = attributes

    @property
    def graphed(self) -> bool:
        """True when calls replay CUDA graphs."""
        return self._fn is not self._eager

    def _capture(self, fn: Callable[..., tuple[Tensor, ...]], args: tuple[Tensor, ...]):
        if self.requires_grad:
            sample = tuple(a.clone().requires_grad_(True) for a in args)
            return torch.cuda.make_graphed_callables(fn, sample)
        return capture_forward(fn, args, self.device)

    def __call__(self, v: Tensor, vertices: Tensor | None = None) -> GaussianCloud:
        """v: (style_dim,) or (code_dim,) -> unbatched GaussianCloud (N = V * K); ``vertices`` (V, 3) only (and
        always) with ``dynamic_geometry``."""
        if (vertices is not None) != self.dynamic_geometry:
            raise ValueError("GraphedSynthesis: pass vertices exactly when built with dynamic_geometry=True")
        args = (v,) if vertices is None else (v, vertices)
        if self.graphed and not self.requires_grad:
            with torch.no_grad():
                out = self._fn(*args)
        elif self.graphed and self.requires_grad and not any(a.requires_grad for a in args):
            with torch.no_grad():  # the backward graph expects inputs that require grad; without them run eagerly
                out = self._eager(*args)
        else:
            out = self._fn(*args)
        return GaussianCloud(**dict(zip(_FIELDS, out)))
