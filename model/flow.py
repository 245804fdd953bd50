"""Rectified flow (flow matching) on packed token sequences: the loss and the sampler.

Time runs from data to noise: ``x_t = (1 - t) * x0 + t * noise`` with t in [0, 1],
and the model learns the constant velocity ``dx_t/dt = noise - x0``. Training times
come from a logit-normal distribution (Esser et al. 2024, "Scaling Rectified Flow
Transformers"), which spends more steps at intermediate noise levels, and are then
*shifted* towards noise for samples with many tokens: a large or long clip keeps
more of its signal at a given t (neighbouring tokens average the noise away), so it
needs more noise to be equally hard (SD3's resolution-dependent shift,
``shift = sqrt(tokens / base_tokens)``, applied per sample, which covers duration too).

In a packed batch every *sample* draws one t and, by default, the loss is averaged
per sample first, then over samples: a long clip with many tokens counts as much as
a short one, as it would in an unpacked batch (``reduction="token"`` weighs tokens).

Sampling integrates the velocity from t = 1 (noise) to t = 0 with Euler steps on the
same shifted schedule (`euler_sample`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "REDUCTIONS",
    "caption_keep_mask",
    "euler_sample",
    "flow_loss",
    "interpolate",
    "per_sample_mean",
    "resolution_shift",
    "sample_timesteps",
    "shift_timesteps",
    "velocity_target",
]

REDUCTIONS = ("sample", "token")

# (tokens, positions, sample_ids, t, **conditioning) -> predicted velocity, e.g. a `model.dit.DiT`
VelocityModel = Callable[..., torch.Tensor]


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


def resolution_shift(num_tokens: torch.Tensor, base_tokens: int) -> torch.Tensor:
    """(S,) tokens per sample -> (S,) shift sqrt(tokens / base_tokens); 1 when base is 0."""
    if base_tokens <= 0:
        return torch.ones_like(num_tokens, dtype=torch.float32)
    return (num_tokens.float() / base_tokens).sqrt()


def shift_timesteps(t: torch.Tensor, shift: torch.Tensor | float) -> torch.Tensor:
    """t -> s t / (1 + (s - 1) t): monotone, fixes 0 and 1, moves t towards 1 for s > 1."""
    return shift * t / (1 + (shift - 1) * t)


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


def caption_keep_mask(
    num_samples: int,
    dropout: float,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(S,) bool, False for the samples whose caption is dropped (trains the CFG null)."""
    u = torch.rand(num_samples, generator=generator, device=device)
    return u >= dropout


def flow_loss(
    model: VelocityModel,
    x0: torch.Tensor,  # (N, D) clean packed tokens
    positions: torch.Tensor,  # (N, 3)
    sample_ids: torch.Tensor,  # (N,)
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    shift: torch.Tensor | None = None,  # (S,) per-sample timestep shift; None = no shift
    reduction: str = "sample",
    timestep_mean: float = 0.0,
    timestep_std: float = 1.0,
    model_kwargs: dict[str, Any] | None = None,  # conditioning passed through to the model
) -> torch.Tensor:
    """The velocity MSE (a scalar), averaged per sample then over samples by default."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown loss reduction {reduction!r}; one of {REDUCTIONS}")
    t = sample_timesteps(
        num_samples, generator, mean=timestep_mean, std=timestep_std, device=x0.device
    )  # (S,)
    if shift is not None:
        t = shift_timesteps(t, shift.to(t.device))
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = interpolate(x0, noise, t[sample_ids, None])  # (N, D)
    pred = model(x_t, positions, sample_ids, t, **(model_kwargs or {}))  # (N, D)
    err = (pred.float() - velocity_target(x0, noise).float()).pow(2).mean(dim=-1)  # (N,)
    if reduction == "token":
        return err.mean()
    return per_sample_mean(err, sample_ids, num_samples).mean()


def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,  # (N, D) packed Gaussian noise
    sample_ids: torch.Tensor,  # (N,)
    num_samples: int,
    steps: int,
    shift: torch.Tensor | float = 1.0,  # (S,) or scalar, as in training
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 to t = 0 in `steps` Euler steps.

    `velocity(x (N, D), t (S,)) -> (N, D)`. Each sample follows its own shifted
    schedule; returns the packed clean estimate x_0 (N, D).
    """
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    grid = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)  # (steps + 1,)
    shift_t = torch.as_tensor(shift, dtype=torch.float32, device=noise.device)
    shift_t = shift_t.expand(num_samples) if shift_t.ndim == 0 else shift_t  # (S,)
    x = noise
    for k in range(steps):
        t_now = shift_timesteps(grid[k].expand(num_samples), shift_t)  # (S,)
        t_next = shift_timesteps(grid[k + 1].expand(num_samples), shift_t)  # (S,)
        v = velocity(x, t_now)  # (N, D)
        x = x + (t_next - t_now)[sample_ids, None].to(x.dtype) * v  # dt < 0: towards data
    return x
