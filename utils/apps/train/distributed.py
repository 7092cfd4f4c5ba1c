"""Training on one device or under ``torchrun``: the process group, the DDP-wrapped network, rank-0 work.

Under torchrun every process joins the process group (also a single one, so that the DDP path is the one that
runs); the global batch of identities is split across the ranks by the Trainer, and DDP averages the gradients.
"""
from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from models.identity_field import IdentityField
from utils.core.device import resolve_device
from utils.core.locks import FolderInUseError
from utils.core.torch_files import UnsafeFileError

T = TypeVar("T")


def _dist_info() -> tuple[int, int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def launched_by_torchrun() -> bool:
    """True under torchrun (it sets RANK, WORLD_SIZE and the rendezvous address for every process)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _import_before_process_group() -> None:
    """Import torch.distributed.nn.functional before the process group exists.

    Its collectives take ``group=group.WORLD`` as a default argument, evaluated at import; DDP's constructor imports
    it (torch._dynamo -> torch.distributed.fsdp -> _shard).  Imported after init_process_group, those defaults hold
    the default group until the interpreter tears the module down, so destroy_process_group() frees nothing: gloo's
    worker and transport threads run on, and the group is destroyed inside interpreter teardown, where a gloo thread
    that still holds work (a tensor whose Python object needs the GIL to be freed) is ended mid-destructor and the
    process aborts with "terminate called without an active exception" (a timing race).  Imported first, the
    defaults are None and shutdown_distributed() joins the group's threads while Python still runs
    (tests/test_distributed.py::test_shutdown_ends_the_process_group_threads).
    """
    import torch.distributed.nn.functional  # noqa: F401


def init_distributed(device_name: str) -> tuple[torch.device, int, int]:
    """Join the process group when launched by torchrun (also with one process, so that the DDP path is the one
    that runs); return (device, rank, world size)."""
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if launched_by_torchrun() and dist.is_available() and not dist.is_initialized():
        _import_before_process_group()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world, local = _dist_info()
    if dist.is_available() and dist.is_initialized():
        dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    else:
        dev = resolve_device(device_name)
    return dev, rank, world


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_name(device: torch.device) -> str:
    """The device as metrics.json names it: the GPU's model, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class BatchForward(nn.Module):
    """Codes lookup + network forward in one module, so DDP sees every parameter in its forward."""

    def __init__(self, field: IdentityField) -> None:
        super().__init__()
        self.field = field

    def forward(self, ids: Tensor, vertices: Tensor):
        return self.field(self.field.codes(ids), vertices, return_aux=True)


def training_module(field: IdentityField, device: torch.device, compile_network: bool, precision: str,
                    ddp: bool) -> nn.Module:
    """The module a training step calls, ``(ids (B,), vertices (B, V, 3)) -> (clouds, aux)``: the field's
    BatchForward, compiled when asked (CUDA only), wrapped in DistributedDataParallel under torchrun.  Also sets
    the process-wide TensorFloat-32 switches of ``precision`` on CUDA."""
    module: nn.Module = BatchForward(field)
    if compile_network and device.type == "cuda":
        module = torch.compile(module)
    if device.type == "cuda":
        # process-wide switch (torch has no per-module one); only the network's matmuls are affected:
        # the rasterizer and SSIM kernels compute in fp32 regardless
        torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")
    if ddp:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    return module


def on_main(fn: Callable[[], T], is_main: bool, ddp: bool) -> T | None:
    """Run ``fn`` on rank 0 and hand its result to every rank; an error there is raised on every rank (one rank
    failing alone would leave the others waiting in a collective)."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except (OSError, ValueError) as exc:
            if not ddp:
                raise
            error = exc
    if ddp:
        box = [result, None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(box, src=0)
        result, err = box
        if err is not None:
            if error is not None:
                raise error
            kinds = {c.__name__: c for c in (FileExistsError, FolderInUseError, UnsafeFileError, OSError)}
            raise kinds.get(err[0], ValueError)(err[1])
    return result
