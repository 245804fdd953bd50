"""Exponential moving average of a model's weights (the weights one samples with).

``ema = EMA(model, decay=0.999)``; after every optimizer step ``ema.update(model)``;
``ema.state_dict()`` goes into the checkpoint, ``ema.copy_to(model)`` swaps the
averaged weights in for sampling. The shadow copies are float32 whatever the
training dtype, and are tensors of the same kind as the parameters (DTensor shards
under FSDP), so the update never gathers a full model.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EMA"]


def _unwrap_name(name: str) -> str:
    # DDP (`module.`), torch.compile (`_orig_mod.`) and activation checkpointing wrappers
    # add prefixes; EMA keys are the plain model's parameter names.
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


class EMA:
    """Shadow weights ``s <- decay * s + (1 - decay) * p`` for every trainable parameter."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            _unwrap_name(name): p.detach().float().clone()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.shadow[_unwrap_name(name)].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the averaged ones."""
        for name, p in model.named_parameters():
            key = _unwrap_name(name)
            if key in self.shadow:
                p.copy_(self.shadow[key].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) float32 tensors by parameter name."""
        out = {}
        for name, t in self.shadow.items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor under FSDP
            out[name] = full.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        for name, t in self.shadow.items():
            full = state[name]
            if hasattr(t, "device_mesh"):  # DTensor: keep only this rank's shard
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full.to(t.device), t.device_mesh, t.placements)  # type: ignore[attr-defined]
            t.copy_(full)
