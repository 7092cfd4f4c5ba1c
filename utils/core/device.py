"""The one place that picks a torch device, so no module hard-codes one."""
from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    """Map a user setting ("auto", "cpu", "cuda", "cuda:1", None) to a device, with a clear error for bad values."""
    if name in (None, "", "auto"):
        return default_device()
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU.  Used around wall-clock timings only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
