"""Rectified flow (flow matching) on packed token sequences.

Time runs from data to noise: ``x_t = (1 - t) * x0 + t * noise`` with t in [0, 1],
and the model learns the constant velocity ``dx_t/dt = noise - x0``. Training times
come from a logit-normal distribution (Esser et al. 2024, "Scaling Rectified Flow
Transformers"), which spends more steps at intermediate noise levels.

In a packed batch every *sample* draws one t and the loss is averaged per sample
first, then over samples: a long clip with many tokens counts as much as a short
one, as it would in an unpacked batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "flow_loss",
    "interpolate",
    "per_sample_mean",
    "sample_timesteps",
    "velocity_target",
]

# (tokens, positions, sample_ids, t) -> predicted velocity, e.g. a `model.dit.DiT`
VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_timesteps(
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(S,) times in (0, 1) from a logit-normal: sigmoid(N(mean, std^2))."""
    z = torch.randn(num_samples, generator=generator, device=device) * std + mean
    return torch.sigmoid(z)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; t broadcasts per token (N, 1) or per element."""
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity d x_t / d t."""
    return noise - x0


def per_sample_mean(
    values: torch.Tensor, sample_ids: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """(N,) per-token values -> (S,) mean over each sample's tokens."""
    sums = torch.zeros(num_samples, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, sample_ids, values)
    counts = torch.bincount(sample_ids, minlength=num_samples).to(values.dtype)
    return sums / counts


def flow_loss(
    model: VelocityModel,
    x0: torch.Tensor,  # (N, D) clean packed tokens
    positions: torch.Tensor,  # (N, 3)
    sample_ids: torch.Tensor,  # (N,)
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean over samples of each sample's mean squared velocity error (a scalar)."""
    t = sample_timesteps(num_samples, generator, device=x0.device)  # (S,)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = interpolate(x0, noise, t[sample_ids, None])  # (N, D)
    pred = model(x_t, positions, sample_ids, t)  # (N, D)
    err = (pred - velocity_target(x0, noise)).pow(2).mean(dim=-1)  # (N,)
    return per_sample_mean(err, sample_ids, num_samples).mean()
