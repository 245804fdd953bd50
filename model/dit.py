"""A small diffusion transformer over packed spacetime-patch sequences.

Follows facebookresearch/DiT ``models.py`` (adaLN-Zero blocks, zero-initialised
modulation and output layers, size presets), changed for native-size video:

- the input is already patchified and *packed*: one sequence of tokens from several
  samples of different durations, sizes and aspect ratios (see `model.data.pack`);
- positions are a 3D rotary embedding of each token's integer (t, h, w) patch
  coordinates, so any grid works without a learned or fixed-size table;
- the timestep embedding is per sample and broadcast to that sample's tokens;
- self-attention is block-diagonal: a token attends only to tokens of its own sample.

The block-diagonal mask is a dense (N, N) boolean mask for torch SDPA, which is right
everywhere and fine for short CPU sequences; a varlen flash-attention kernel fed
``cu_seqlens`` is the drop-in for long GPU sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "block_diagonal_mask",
    "build_dit",
    "rope_3d",
]


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT; saved as JSON beside every checkpoint."""

    in_channels: int = 16  # latent channels of the VAE
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent cells per token
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0

    @property
    def token_dim(self) -> int:
        """Features per token: pt * ph * pw * C."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_channels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def block_diagonal_mask(sample_ids: torch.Tensor) -> torch.Tensor:
    """(N,) sample index per token -> (N, N) bool, True where attention is allowed."""
    return sample_ids[:, None] == sample_ids[None, :]


# --- 3D rotary position embedding ------------------------------------------------------
def _rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split a head's channels over (t, h, w); each part even, h and w equal.

    About a quarter goes to time, the rest is shared by the two spatial axes
    (64 -> 16/24/24, 32 -> 8/12/12).
    """
    if head_dim % 4 or head_dim < 8:
        raise ValueError(f"head_dim must be a multiple of 4 and >= 8 for 3D RoPE, got {head_dim}")
    spatial = 2 * (3 * head_dim // 16)
    return head_dim - 2 * spatial, spatial, spatial


def rope_3d(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3) integer (t, h, w) -> cos, sin of shape (N, head_dim // 2).

    Each axis gets its own standard 1D RoPE frequencies over its share of the head.
    """
    angles = []
    for axis, dim in enumerate(_rope_axis_dims(head_dim)):
        freqs = theta ** (
            -torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
        )
        angles.append(positions[:, axis, None].double() * freqs[None, :])  # (N, dim/2)
    angle = torch.cat(angles, dim=-1).float()  # (N, head_dim/2)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x (N, H, hd) by the angles in cos/sin (N, hd/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (N, H, hd/2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # (N, 1, hd/2)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (N, H, hd/2, 2)
    return out.flatten(-2).type_as(x)  # (N, H, hd)


# --- layers ----------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Scalar flow time t in [0, 1] -> vector, via sinusoids and an MLP (as in DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        # Scale [0, 1] to DiT's [0, 1000) step range so the sinusoids span their usual periods.
        args = (t.float() * 1000.0)[:, None] * freqs[None]  # (S, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (S, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (S, D)


class Attention(nn.Module):
    """Multi-head self-attention with 3D RoPE on q, k and an attention mask."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        n, d = x.shape
        q, k, v = (
            self.qkv(x).view(n, 3, self.num_heads, d // self.num_heads).unbind(1)
        )  # (N, H, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (z.transpose(0, 1)[None] for z in (q, k, v))  # (1, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (1, H, N, hd)
        return self.proj(out[0].transpose(0, 1).reshape(n, d))  # (N, D)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        # Extension point: caption cross-attention (over the sample's own caption tokens,
        # again block-diagonal) goes between attn and mlp. Not implemented yet.
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,  # (N, D)
        c: torch.Tensor,  # (N, D) conditioning, per token
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,  # (N, N)
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=-1)  # 6 x (N, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin, mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, D)


class FinalLayer(nn.Module):
    """adaLN, then a linear map back to token features."""

    def __init__(self, hidden_size: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, out_dim)


def _linear(module: nn.Module) -> nn.Linear:
    assert isinstance(module, nn.Linear)
    return module


def _zero(layer: nn.Linear) -> None:
    nn.init.constant_(layer.weight, 0)
    if layer.bias is not None:
        nn.init.constant_(layer.bias, 0)


# --- the model -------------------------------------------------------------------------
class DiT(nn.Module):
    """Diffusion transformer over a packed sequence; predicts the flow velocity per token."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} not divisible by {config.num_heads} heads"
            )
        self.config = config
        self.head_dim = config.hidden_size // config.num_heads
        _rope_axis_dims(self.head_dim)  # fail early on an unusable head size
        self.x_embedder = nn.Linear(config.token_dim, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.blocks = nn.ModuleList(
            DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.hidden_size, config.token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Initialize transformer layers:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Initialize timestep embedding MLP:
        nn.init.normal_(_linear(self.t_embedder.mlp[0]).weight, std=0.02)
        nn.init.normal_(_linear(self.t_embedder.mlp[2]).weight, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks, so every block starts as the
        # identity (the "Zero" in adaLN-Zero):
        for block in self.blocks:
            assert isinstance(block, DiTBlock)
            _zero(_linear(block.adaLN_modulation[-1]))

        # Zero-out output layers, so the initial prediction is 0:
        _zero(_linear(self.final_layer.adaLN_modulation[-1]))
        _zero(self.final_layer.linear)

    def forward(
        self,
        tokens: torch.Tensor,  # (N, token_dim) noisy latent patches, packed
        positions: torch.Tensor,  # (N, 3) int (t, h, w) in patch units within each sample
        sample_ids: torch.Tensor,  # (N,) int, which sample each token belongs to
        t: torch.Tensor,  # (S,) flow time per sample, in [0, 1]
    ) -> torch.Tensor:
        x = self.x_embedder(tokens)  # (N, D)
        cos, sin = rope_3d(positions, self.head_dim, self.config.rope_theta)  # (N, hd/2) each
        mask = block_diagonal_mask(sample_ids)  # (N, N)
        c = self.t_embedder(t)  # (S, D)
        # Extension point: caption conditioning adds a pooled caption embedding to c here
        # (and cross-attention in DiTBlock). Not implemented yet.
        c = c[sample_ids]  # (N, D), each token gets its own sample's conditioning
        for block in self.blocks:
            x = block(x, c, cos, sin, mask)  # (N, D)
        return self.final_layer(x, c)  # (N, token_dim)


# --- presets (as DiT's `DiT_models`) -----------------------------------------------------
def DiT_tiny(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(depth=2, hidden_size=64, num_heads=2, **kwargs))


def DiT_S(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(depth=12, hidden_size=384, num_heads=6, **kwargs))


def DiT_B(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(depth=12, hidden_size=768, num_heads=12, **kwargs))


def DiT_L(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(depth=24, hidden_size=1024, num_heads=16, **kwargs))


def DiT_XL(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(depth=28, hidden_size=1152, num_heads=16, **kwargs))


DIT_PRESETS: dict[str, Callable[..., DiT]] = {
    "DiT-tiny": DiT_tiny,
    "DiT-S": DiT_S,
    "DiT-B": DiT_B,
    "DiT-L": DiT_L,
    "DiT-XL": DiT_XL,
}


def build_dit(preset: str, **kwargs: Any) -> DiT:
    """A preset by name, e.g. ``build_dit("DiT-S", in_channels=16, patch_size=(1, 2, 2))``."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; one of {sorted(DIT_PRESETS)}")
    return DIT_PRESETS[preset](**kwargs)
