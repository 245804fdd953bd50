"""Stream a reelpack corpus and pack its latents into token sequences for the DiT.

The pipeline is a flat list of small iterator stages (webdataset style)::

    shard_urls(root) -> iter_samples -> pack(token_budget) -> PackedBatch

- `iter_samples` reads ``<root>/shards/*.tar`` with plain ``webdataset`` and decodes
  each member by its suffix: ``.latents.safetensors`` with safetensors, ``.json`` and
  ``.txt`` as UTF-8. Nothing is unpickled; a sample with any other member is refused.
- `patchify` cuts a latent ``[C, T, H, W]`` into spacetime patches, one token each,
  with its integer (t, h, w) position in patch units.
- `pack` concatenates the tokens of several samples of any size and aspect into one
  sequence up to a token budget (NaViT's "Patch n' Pack"), recording which sample
  each token belongs to so attention and the loss stay per sample.

Only local corpus folders are listed today; `shard_urls` is where other storage
(``s3://`` through a ``pipe:`` url) plugs in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors

import schemas

__all__ = [
    "PackStats",
    "PackedBatch",
    "Sample",
    "decode_sample",
    "iter_samples",
    "pack",
    "patchify",
    "read_manifest",
    "shard_urls",
    "unpatchify",
]

Patch = tuple[int, int, int]  # (pt, ph, pw) latent cells per token
Grid = tuple[int, int, int]  # (t, h, w) tokens per axis

_LATENTS = schemas.SAMPLE_LATENTS
_META = schemas.SAMPLE_META
_CAPTION = schemas.SAMPLE_CAPTION
_ALLOWED = (_LATENTS, _META, _CAPTION)


@dataclass
class Sample:
    """One decoded shard sample."""

    key: str
    latents: torch.Tensor  # (C, T, H, W) float32, normalised as the manifest says
    caption: str
    meta: dict[str, Any]  # the clip's index row
    text_embeds: torch.Tensor | None = None  # (L, D) float32 when the corpus has them


# --- reading ---------------------------------------------------------------------------
def read_manifest(root: str) -> dict[str, Any]:
    """The corpus manifest (``<root>/manifest.json``) as a dict."""
    path = Path(root) / schemas.MANIFEST_NAME
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no corpus manifest") from None
    for key in ("patch_size", "vae"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest has no {key!r}")
    return manifest


def shard_urls(root: str) -> list[str]:
    """Shard urls of a corpus in name order (deterministic epochs)."""
    urls = sorted(str(p) for p in (Path(root) / schemas.SHARDS_DIR).glob("*.tar"))
    if not urls:
        raise FileNotFoundError(f"{Path(root) / schemas.SHARDS_DIR}: no *.tar shards")
    return urls


def decode_sample(raw: dict[str, Any]) -> Sample:
    """A raw webdataset sample (suffix -> bytes) to a `Sample`; ValueError if unexpected.

    Only safetensors, JSON and text are decoded: a shard is data, never code.
    """
    key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
    members = {k: v for k, v in raw.items() if not k.startswith("__")}
    unknown = sorted(set(members) - set(_ALLOWED))
    if unknown:
        raise ValueError(
            f"{url}: sample {key!r} has members {unknown}; only {list(_ALLOWED)} are read"
        )
    missing = [s for s in _ALLOWED if s not in members]
    if missing:
        raise ValueError(f"{url}: sample {key!r} lacks {missing}")
    tensors = load_safetensors(members[_LATENTS])
    if schemas.TENSOR_LATENTS not in tensors:
        raise ValueError(f"{url}: sample {key!r} has no tensor {schemas.TENSOR_LATENTS!r}")
    latents = tensors[schemas.TENSOR_LATENTS]
    if latents.ndim != 4:
        raise ValueError(f"{url}: sample {key!r} latents are {tuple(latents.shape)}, not [C,T,H,W]")
    embeds = tensors.get(schemas.TENSOR_TEXT_EMBEDS)
    return Sample(
        key=key,
        latents=latents.float(),
        caption=members[_CAPTION].decode("utf-8"),
        meta=json.loads(members[_META].decode("utf-8")),
        text_embeds=None if embeds is None else embeds.float(),
    )


def iter_samples(
    root: str,
    *,
    handler: Callable[[Exception], bool] = wds.reraise_exception,
) -> Iterator[Sample]:
    """Every sample of the corpus at `root`, shard by shard, in stored order.

    `handler` is webdataset's error policy for a bad shard or sample: the default
    raises; ``wds.warn_and_continue`` skips and warns.
    """
    channels = int(read_manifest(root)["vae"]["latent_channels"])
    dataset = wds.WebDataset(
        shard_urls(root), shardshuffle=False, handler=handler, empty_check=False
    )
    for raw in dataset:
        try:
            sample = decode_sample(raw)
            if sample.latents.shape[0] != channels:
                raise ValueError(
                    f"{raw.get('__url__')}: sample {sample.key!r} has {sample.latents.shape[0]} "
                    f"latent channels, the manifest says {channels}"
                )
        except Exception as exn:
            if handler(exn):
                continue
            break
        yield sample


# --- patches ---------------------------------------------------------------------------
def patchify(latents: torch.Tensor, patch: Patch = (1, 2, 2)) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent (C, T, H, W) -> tokens (N, pt*ph*pw*C) and positions (N, 3) int64.

    Tokens run in (t, h, w) raster order; a token's features are its patch cells in
    (pt, ph, pw) order, channels last, as DiT's unpatchify expects.
    """
    c, t, h, w = latents.shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent shape {tuple(latents.shape)} is not divisible by patch {patch}")
    gt, gh, gw = t // pt, h // ph, w // pw
    x = latents.reshape(c, gt, pt, gh, ph, gw, pw)
    x = x.permute(1, 3, 5, 2, 4, 6, 0)  # (gt, gh, gw, pt, ph, pw, C)
    tokens = x.reshape(gt * gh * gw, pt * ph * pw * c)  # (N, D)
    positions = torch.stack(
        torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij"), dim=-1
    ).reshape(-1, 3)  # (N, 3) int64
    return tokens, positions


def unpatchify(tokens: torch.Tensor, grid: Grid, patch: Patch, channels: int) -> torch.Tensor:
    """Inverse of `patchify`: tokens (N, D) of one sample -> latent (C, T, H, W)."""
    gt, gh, gw = grid
    pt, ph, pw = patch
    x = tokens.reshape(gt, gh, gw, pt, ph, pw, channels)
    x = x.permute(6, 0, 3, 1, 4, 2, 5)  # (C, gt, pt, gh, ph, gw, pw)
    return x.reshape(channels, gt * pt, gh * ph, gw * pw)


# --- packing ---------------------------------------------------------------------------
@dataclass
class PackedBatch:
    """Several samples' tokens concatenated into one sequence.

    Sample ``i`` owns tokens ``cu_seqlens[i]:cu_seqlens[i+1]``; ``sample_ids`` says the
    same per token (for gathers and the block-diagonal attention mask).
    """

    tokens: torch.Tensor  # (N, D) float32
    positions: torch.Tensor  # (N, 3) int64, (t, h, w) in patch units within the sample
    sample_ids: torch.Tensor  # (N,) int64 in [0, S)
    cu_seqlens: torch.Tensor  # (S + 1,) int32, cumulative token counts
    grids: list[Grid]  # per sample (t, h, w) tokens
    captions: list[str]
    keys: list[str]

    @property
    def num_samples(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: str | torch.device) -> PackedBatch:
        return PackedBatch(
            tokens=self.tokens.to(device),
            positions=self.positions.to(device),
            sample_ids=self.sample_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            grids=self.grids,
            captions=self.captions,
            keys=self.keys,
        )


@dataclass
class PackStats:
    """Running counts of a `pack` call (pass one in to read them while it streams)."""

    samples_in: int = 0
    samples_packed: int = 0
    samples_skipped: int = 0  # larger than the token budget on their own
    skipped_keys: list[str] = field(default_factory=list)
    batches: int = 0
    tokens: int = 0

    def fill(self, token_budget: int) -> float:
        """Mean share of the budget used per batch."""
        return self.tokens / (self.batches * token_budget) if self.batches else math.nan


def _collate(parts: list[tuple[Sample, torch.Tensor, torch.Tensor, Grid]]) -> PackedBatch:
    lengths = torch.tensor([p[1].shape[0] for p in parts])
    return PackedBatch(
        tokens=torch.cat([p[1] for p in parts]),
        positions=torch.cat([p[2] for p in parts]),
        sample_ids=torch.repeat_interleave(torch.arange(len(parts)), lengths),
        cu_seqlens=torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32),
        grids=[p[3] for p in parts],
        captions=[p[0].caption for p in parts],
        keys=[p[0].key for p in parts],
    )


def pack(
    samples: Iterable[Sample],
    token_budget: int,
    patch: Patch = (1, 2, 2),
    stats: PackStats | None = None,
) -> Iterator[PackedBatch]:
    """Greedy in-order packing: fill a sequence until the next sample would overflow it.

    A sample with more tokens than `token_budget` is skipped and counted in `stats`.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    stats = stats if stats is not None else PackStats()
    parts: list[tuple[Sample, torch.Tensor, torch.Tensor, Grid]] = []
    used = 0
    for sample in samples:
        stats.samples_in += 1
        tokens, positions = patchify(sample.latents, patch)
        n = tokens.shape[0]
        if n > token_budget:
            stats.samples_skipped += 1
            stats.skipped_keys.append(sample.key)
            continue
        if used + n > token_budget:
            stats.batches += 1
            stats.tokens += used
            yield _collate(parts)
            parts, used = [], 0
        _, t, h, w = sample.latents.shape
        parts.append((sample, tokens, positions, (t // patch[0], h // patch[1], w // patch[2])))
        used += n
        stats.samples_packed += 1
    if parts:
        stats.batches += 1
        stats.tokens += used
        yield _collate(parts)
