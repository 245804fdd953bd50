"""A diffusion transformer over packed, variable-size spacetime-patch sequences.

Follows facebookresearch/DiT ``models.py`` (adaLN-Zero blocks, zero-initialised
modulation and output layers, size presets), changed for native-size video:

- the input is already patchified and *packed*: one sequence of tokens from several
  samples of different durations, sizes and aspect ratios (see `model.data`);
  ``cu_seqlens`` (S + 1,) says where each sample starts, as in varlen attention kernels;
- positions are a 3D rotary embedding of each token's integer (t, h, w) patch
  coordinates, the head dimension split across the three axes, so any grid works
  without a learned or fixed-size table;
- the timestep embedding is per sample and broadcast to that sample's tokens;
- self-attention is block-diagonal: a token attends only to tokens of its own sample;
- cross-attention reads the sample's own caption embeddings (also block-diagonal),
  always preceded by a learned null token: a sample whose caption is dropped (for
  classifier-free guidance) or absent sees only that token.

Attention backends (``DiT.attn_backend``; the same maths, checked against each other
in the tests): ``varlen`` (``torch.nn.attention.varlen``, flash attention on CUDA in
bf16/fp16), ``flex`` (``flex_attention`` with a document mask; compiled on CUDA),
``split`` (one SDPA call per sample: exact, no wasted FLOPs, the CPU default) and
``dense`` (SDPA with an (N, N) block-diagonal mask, the reference). ``auto`` picks
varlen / flex on CUDA and split on the CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ATTN_BACKENDS",
    "DIT_PRESETS",
    "DiT",
    "DiTConfig",
    "PackedLayout",
    "apply_rope",
    "block_diagonal_mask",
    "build_dit",
    "estimate_flops",
    "grid_positions",
    "packed_attention",
    "rope_3d",
]

ATTN_BACKENDS = ("auto", "varlen", "flex", "split", "dense")
Grid = tuple[int, int, int]  # (t, h, w) tokens per axis


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
    text_dim: int = 0  # caption embedding width; 0 = no cross-attention (unconditional)
    qk_norm: bool = True  # RMSNorm on queries and keys: keeps attention logits bounded

    @property
    def token_dim(self) -> int:
        """Features per token: pt * ph * pw * C."""
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_channels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def block_diagonal_mask(
    sample_ids: torch.Tensor, key_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """(Nq,) and (Nk,) sample index per token -> (Nq, Nk) bool, True where attention is allowed."""
    key_ids = sample_ids if key_ids is None else key_ids
    return sample_ids[:, None] == key_ids[None, :]


def grid_positions(grid: Grid, device: str | torch.device = "cpu") -> torch.Tensor:
    """(t, h, w) token grid -> (t*h*w, 3) int64 positions in raster order (as patchify)."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


# --- packed attention ------------------------------------------------------------------
@dataclass
class PackedLayout:
    """Where each sample's queries and keys sit in a packed sequence.

    Built once per forward and shared by every block. ``q_ids``/``k_ids`` are the
    sample index per token; ``cu_q``/``cu_k`` the (S + 1,) int32 offsets.
    """

    q_ids: torch.Tensor
    k_ids: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    backend: str
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        q_ids: torch.Tensor,
        cu_q: torch.Tensor,
        k_ids: torch.Tensor,
        cu_k: torch.Tensor,
        backend: str,
        *,
        device_type: str,
        half: bool,
    ) -> PackedLayout:
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; one of {ATTN_BACKENDS}")
        if backend == "auto":
            backend = ("varlen" if half else "flex") if device_type == "cuda" else "split"
        return cls(q_ids, k_ids, cu_q.to(torch.int32), cu_k.to(torch.int32), backend)

    def bounds(self) -> tuple[list[int], list[int]]:
        """Python offsets (one host sync, cached)."""
        if "bounds" not in self._cache:
            self._cache["bounds"] = (self.cu_q.tolist(), self.cu_k.tolist())
        return self._cache["bounds"]

    def max_lengths(self) -> tuple[int, int]:
        if "max" not in self._cache:
            self._cache["max"] = (
                int((self.cu_q[1:] - self.cu_q[:-1]).max()),
                int((self.cu_k[1:] - self.cu_k[:-1]).max()),
            )
        return self._cache["max"]

    def block_mask(self) -> Any:
        if "block_mask" not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            q_ids, k_ids = self.q_ids, self.k_ids

            def document(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
                return q_ids[q_idx] == k_ids[kv_idx]

            self._cache["block_mask"] = create_block_mask(
                document, None, None, len(q_ids), len(k_ids), device=str(q_ids.device)
            )
        return self._cache["block_mask"]


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    compiled: Callable[..., torch.Tensor] = torch.compile(flex_attention, dynamic=True)
    return compiled


def packed_attention(
    q: torch.Tensor,  # (Nq, H, hd)
    k: torch.Tensor,  # (Nk, H, hd)
    v: torch.Tensor,  # (Nk, H, hd)
    layout: PackedLayout,
) -> torch.Tensor:
    """Attention of each sample's queries over that sample's keys only -> (Nq, H, hd)."""
    if layout.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        max_q, max_k = layout.max_lengths()
        out = varlen_attn(q, k, v, layout.cu_q, layout.cu_k, max_q, max_k)
        assert isinstance(out, torch.Tensor)
        return out
    if layout.backend == "split":
        cu_q, cu_k = layout.bounds()
        parts = []
        for s in range(len(cu_q) - 1):
            qs, ks, vs = (
                z[lo:hi].transpose(0, 1)  # (H, L, hd)
                for z, lo, hi in (
                    (q, cu_q[s], cu_q[s + 1]),
                    (k, cu_k[s], cu_k[s + 1]),
                    (v, cu_k[s], cu_k[s + 1]),
                )
            )
            parts.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))  # (L, H, hd)
        return torch.cat(parts)
    qb, kb, vb = (z.transpose(0, 1)[None] for z in (q, k, v))  # (1, H, N, hd)
    if layout.backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        flex: Any = _compiled_flex() if q.is_cuda else flex_attention
        out = flex(qb, kb, vb, block_mask=layout.block_mask())
    else:  # dense
        mask = block_diagonal_mask(layout.q_ids, layout.k_ids)  # (Nq, Nk)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
    assert isinstance(out, torch.Tensor)
    return out[0].transpose(0, 1)  # (Nq, H, hd)


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
    """Multi-head self-attention with 3D RoPE on q, k, restricted to each sample."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm: nn.Module = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PackedLayout
    ) -> torch.Tensor:
        n, d = x.shape
        q, k, v = (
            self.qkv(x).view(n, 3, self.num_heads, d // self.num_heads).unbind(1)
        )  # (N, H, hd)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        out = packed_attention(q, k, v, layout)  # (N, H, hd)
        return self.proj(out.reshape(n, d))  # (N, D)


class CrossAttention(nn.Module):
    """Each sample's tokens attend to that sample's caption tokens (no positions)."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.q_norm: nn.Module = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, y: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        n, d = x.shape
        m = y.shape[0]
        hd = d // self.num_heads
        q = self.q_norm(self.q(x).view(n, self.num_heads, hd))  # (N, H, hd)
        k, v = self.kv(y).view(m, 2, self.num_heads, hd).unbind(1)  # (M, H, hd)
        out = packed_attention(q, self.k_norm(k), v, layout)  # (N, H, hd)
        return self.proj(out.reshape(n, d))  # (N, D)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float) -> None:
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning, plus optional caption cross-attention."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, cross: bool, qk_norm: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        # Cross-attention is not modulated by t (as in PixArt-alpha): the caption is the
        # same at every noise level; its output projection starts at zero instead.
        self.norm_cross: nn.Module | None = None
        self.cross_attn: CrossAttention | None = None
        if cross:
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,  # (N, D)
        c: torch.Tensor,  # (N, D) conditioning, per token
        cos: torch.Tensor,  # (N, hd/2)
        sin: torch.Tensor,  # (N, hd/2)
        self_layout: PackedLayout,
        y: torch.Tensor | None,  # (M, D) caption tokens, packed
        cross_layout: PackedLayout | None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=-1)  # 6 x (N, D)
        x = x + gate_msa * self.attn(
            modulate(self.norm1(x), shift_msa, scale_msa), cos, sin, self_layout
        )
        if self.cross_attn is not None and self.norm_cross is not None:
            assert y is not None and cross_layout is not None
            x = x + self.cross_attn(self.norm_cross(x), y, cross_layout)  # (N, D)
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


def _cu_from_ids(sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    counts = torch.bincount(sample_ids, minlength=num_samples)
    return F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)  # (S + 1,)


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
        self.attn_backend = "auto"  # runtime choice, not architecture: see module docstring
        self.gradient_checkpointing = False  # recompute blocks in backward to save memory
        d = config.hidden_size
        self.x_embedder = nn.Linear(config.token_dim, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder: nn.Module | None = None
        self.null_text: nn.Parameter | None = None
        if config.text_dim:
            # caption embeddings (any text encoder's width) -> hidden size, as PixArt's
            # caption projection; the null token is the "no caption" of CFG
            self.y_embedder = nn.Sequential(
                nn.LayerNorm(config.text_dim),
                nn.Linear(config.text_dim, d),
                nn.GELU(approximate="tanh"),
                nn.Linear(d, d),
            )
            self.null_text = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio, bool(config.text_dim), config.qk_norm)
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, config.token_dim)
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
        if self.null_text is not None:
            nn.init.normal_(self.null_text, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks, so every block starts as the
        # identity (the "Zero" in adaLN-Zero), and cross-attention outputs likewise:
        for block in self.blocks:
            assert isinstance(block, DiTBlock)
            _zero(_linear(block.adaLN_modulation[-1]))
            if block.cross_attn is not None:
                _zero(block.cross_attn.proj)

        # Zero-out output layers, so the initial prediction is 0:
        _zero(_linear(self.final_layer.adaLN_modulation[-1]))
        _zero(self.final_layer.linear)

    def caption_tokens(
        self,
        text_embeds: torch.Tensor | None,  # (M, Dt) unpadded captions, concatenated
        text_cu_seqlens: torch.Tensor | None,  # (S + 1,)
        text_keep: torch.Tensor | None,  # (S,) bool; False = caption dropped (CFG)
        num_samples: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed cross-attention keys: per sample [null] + its caption (if kept).

        Returns y (M', D), the sample index per y token (M',), and cu_seqlens (S + 1,).
        """
        assert self.y_embedder is not None and self.null_text is not None
        device = self.null_text.device
        if text_embeds is None or text_cu_seqlens is None:
            lengths = torch.zeros(num_samples, dtype=torch.long, device=device)
            pool: torch.Tensor = self.null_text  # (1, D)
            starts = torch.zeros(num_samples, dtype=torch.long, device=device)
        else:
            if text_embeds.shape[-1] != self.config.text_dim:
                raise ValueError(
                    f"caption embeddings are {text_embeds.shape[-1]}-d, the model takes "
                    f"{self.config.text_dim}-d (text_dim)"
                )
            cu = text_cu_seqlens.to(device=device, dtype=torch.long)
            lengths, starts = cu[1:] - cu[:-1], cu[:-1]  # (S,)
            if text_keep is not None:
                lengths = lengths * text_keep.to(device=device, dtype=torch.long)
            y_text = self.y_embedder(text_embeds)  # (M, D)
            pool = torch.cat([self.null_text, y_text.to(self.null_text.dtype)])  # (1 + M, D)
        out_len = lengths + 1  # (S,)
        out_cu = F.pad(out_len.cumsum(0), (1, 0))  # (S + 1,)
        ids = torch.repeat_interleave(torch.arange(num_samples, device=device), out_len)  # (M',)
        offset = torch.arange(len(ids), device=device) - out_cu[ids]  # (M',) 0 = the null token
        index = torch.where(offset == 0, 0, 1 + starts[ids] + offset - 1)
        return pool[index], ids, out_cu.to(torch.int32)

    def forward(
        self,
        tokens: torch.Tensor,  # (N, token_dim) noisy latent patches, packed
        positions: torch.Tensor,  # (N, 3) int (t, h, w) in patch units within each sample
        sample_ids: torch.Tensor,  # (N,) int, which sample each token belongs to (sorted)
        t: torch.Tensor,  # (S,) flow time per sample, in [0, 1]
        *,
        cu_seqlens: torch.Tensor | None = None,  # (S + 1,); derived from sample_ids if None
        text_embeds: torch.Tensor | None = None,  # (M, text_dim) captions, concatenated
        text_cu_seqlens: torch.Tensor | None = None,  # (S + 1,)
        text_keep: torch.Tensor | None = None,  # (S,) bool, False = use the null caption
    ) -> torch.Tensor:
        num_samples = t.shape[0]
        cu = _cu_from_ids(sample_ids, num_samples) if cu_seqlens is None else cu_seqlens
        x = self.x_embedder(tokens)  # (N, D)
        half = torch.is_autocast_enabled(x.device.type) or x.dtype in (
            torch.float16,
            torch.bfloat16,
        )
        build = functools.partial(
            PackedLayout.build, backend=self.attn_backend, device_type=x.device.type, half=half
        )
        self_layout = build(sample_ids, cu, sample_ids, cu)
        cos, sin = rope_3d(positions, self.head_dim, self.config.rope_theta)  # (N, hd/2) each
        y, cross_layout = None, None
        if self.y_embedder is not None:
            y, y_ids, y_cu = self.caption_tokens(
                text_embeds, text_cu_seqlens, text_keep, num_samples
            )
            cross_layout = build(sample_ids, cu, y_ids, y_cu)  # y (M', D)
        c = self.t_embedder(t)  # (S, D)
        c = c[sample_ids]  # (N, D), each token gets its own sample's conditioning
        for block in self.blocks:
            args = (x, c, cos, sin, self_layout, y, cross_layout)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, *args, use_reentrant=False)  # (N, D)
            else:
                x = block(*args)  # (N, D)
        return self.final_layer(x, c)  # (N, token_dim)

    def unpatchify(
        self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, grids: Sequence[Grid]
    ) -> list[torch.Tensor]:
        """Packed (N, token_dim) -> each sample's latent (C, T, H, W), as `model.data.unpatchify`."""
        c = self.config.in_channels
        pt, ph, pw = self.config.patch_size
        bounds = cu_seqlens.tolist()
        out = []
        for i, (gt, gh, gw) in enumerate(grids):
            x = tokens[bounds[i] : bounds[i + 1]].reshape(gt, gh, gw, pt, ph, pw, c)
            x = x.permute(6, 0, 3, 1, 4, 2, 5)  # (C, gt, pt, gh, ph, gw, pw)
            out.append(x.reshape(c, gt * pt, gh * ph, gw * pw))
        return out


def estimate_flops(
    config: DiTConfig, seqlens: Sequence[int], text_lens: Sequence[int] | None = None
) -> dict[str, float]:
    """Forward FLOPs of one packed sequence (multiply-adds x 2); training is ~3x this.

    ``linear`` grows with the total token count, ``attention`` with sum(L_i^2): packing
    pays only for real tokens and for attention within each sample, while padding to a
    common length L pays B * L tokens and B * L^2 attention.
    """
    d, depth, r = config.hidden_size, config.depth, config.mlp_ratio
    n = float(sum(seqlens))
    per_token = 2 * (4 * d * d + 2 * r * d * d + 6 * d * d)  # qkv+proj, mlp, adaLN
    embed = 2 * 2 * config.token_dim * d  # x_embedder + final linear
    linear = n * (per_token * depth + embed)
    attention = depth * 2 * 2 * d * sum(float(length) ** 2 for length in seqlens)  # QK^T, AV
    cross = 0.0
    if config.text_dim:
        # keys per sample: the null token + the caption
        keys = [1 + (text_lens[i] if text_lens is not None else 0) for i in range(len(seqlens))]
        cross_linear = n * 2 * 2 * d * d + sum(keys) * 2 * 2 * d * d  # q, proj; kv
        cross_attn = 2 * 2 * d * sum(float(q * k) for q, k in zip(seqlens, keys, strict=True))
        cross = depth * (cross_linear + cross_attn)
    return {
        "linear": linear,
        "attention": attention,
        "cross": cross,
        "total": linear + attention + cross,
    }


# --- presets (as DiT's `DiT_models`) -----------------------------------------------------
def DiT_tiny(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(**{"depth": 2, "hidden_size": 64, "num_heads": 2, **kwargs}))


def DiT_S(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(**{"depth": 12, "hidden_size": 384, "num_heads": 6, **kwargs}))


def DiT_B(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(**{"depth": 12, "hidden_size": 768, "num_heads": 12, **kwargs}))


def DiT_L(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(**{"depth": 24, "hidden_size": 1024, "num_heads": 16, **kwargs}))


def DiT_XL(**kwargs: Any) -> DiT:
    return DiT(DiTConfig(**{"depth": 28, "hidden_size": 1152, "num_heads": 16, **kwargs}))


DIT_PRESETS: dict[str, Callable[..., DiT]] = {
    "DiT-tiny": DiT_tiny,
    "DiT-S": DiT_S,
    "DiT-B": DiT_B,
    "DiT-L": DiT_L,
    "DiT-XL": DiT_XL,
}


def build_dit(preset: str, **kwargs: Any) -> DiT:
    """A preset by name, e.g. ``build_dit("DiT-S", in_channels=16, patch_size=(1, 2, 2))``.

    Keyword arguments are `DiTConfig` fields and override the preset's.
    """
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; one of {sorted(DIT_PRESETS)}")
    return DIT_PRESETS[preset](**kwargs)
