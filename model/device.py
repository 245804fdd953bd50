"""The torch device a command or stage runs on, from a config's ``device`` string."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a device is resolved: a config imports without torch
    import torch

__all__ = ["resolve_device", "resolve_device_dtype"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: the first CUDA device when torch sees one, else the CPU; any other
    value as torch reads it. A CUDA device torch does not see here is a ValueError that
    names it (instead of torch's first failed allocation, deep in a model load)."""
    import torch

    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch lists all twenty device types it knows
        raise ValueError(
            f"device {str(device)!r}: not a torch device; use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            hint = "" if count else " (no GPU, or a torch build without CUDA)"
            raise ValueError(f"device {str(device)!r}: torch sees {count} CUDA device(s){hint}")
    return dev


def resolve_device_dtype(
    device: str | torch.device, dtype: str
) -> tuple[torch.device, torch.dtype]:
    """:func:`resolve_device`, and the dtype a model runs in there: ``"auto"`` is
    bfloat16 on CUDA (not float16, which T5's and other models' activations overflow)
    and float32 elsewhere; any other value names a torch dtype ("float16", "float32")."""
    import torch

    dev = resolve_device(device)
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return dev, resolved
