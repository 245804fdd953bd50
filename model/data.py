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

`PackedLoader` (in `model.loader`, re-exported here) is what a trainer uses: it plans
each epoch from the corpus index, shuffles deterministically, splits the work across
ranks and DataLoader workers with equal step counts, packs with a best-fit packer,
and resumes mid-epoch from a small ``state_dict``. Corpora on ``s3://`` are read with
boto3 directly (``AWS_ENDPOINT_URL`` honoured); `iter_samples` reads local folders.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors

import schemas

__all__ = [
    "PackStats",
    "PackedBatch",
    "PackedLoader",
    "Sample",
    "check_latents",
    "decode_sample",
    "iter_samples",
    "pack",
    "patchify",
    "read_manifest",
    "shard_urls",
    "stored_crc",
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
def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket in s3 url")
    return bucket, key


_S3_CLIENTS: dict[int, Any] = {}


def s3_client() -> Any:
    """A boto3 S3 client for this process (standard credential chain, ``AWS_ENDPOINT_URL``).

    One per process id: boto3 clients must not cross a fork into DataLoader workers.
    """
    pid = os.getpid()
    if pid not in _S3_CLIENTS:
        import boto3
        from botocore.config import Config

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            # S3-compatible stores behind a custom endpoint rarely have wildcard DNS.
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        _S3_CLIENTS[pid] = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None, config=config
        )
    return _S3_CLIENTS[pid]


def read_bytes(uri: str) -> bytes:
    """A whole file from a local path, ``file://`` or ``s3://``; FileNotFoundError when it
    is missing."""
    uri = schemas.storage_location(uri)
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    client = s3_client()
    try:
        body: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        raise FileNotFoundError(uri) from None
    except Exception as exc:  # credentials, endpoint, permissions: name the object
        raise OSError(f"{uri}: {type(exc).__name__}: {exc}") from exc
    return body


def list_files(prefix: str, suffix: str) -> list[str]:
    """Files directly under folder `prefix` (local or ``s3://``) whose names end in `suffix`, sorted."""
    prefix = schemas.storage_location(prefix)
    if not is_s3(prefix):
        return sorted(str(p) for p in Path(prefix).glob(f"*{suffix}"))
    bucket, key = split_s3(prefix.rstrip("/") + "/")
    out = []
    pages = (
        s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=key, Delimiter="/")
    )
    try:
        for page in pages:
            out += [
                f"s3://{bucket}/{o['Key']}"
                for o in page.get("Contents", [])
                if o["Key"].endswith(suffix)
            ]
    except Exception as exc:  # credentials, endpoint, permissions: name the prefix
        raise OSError(f"listing {prefix}: {type(exc).__name__}: {exc}") from exc
    return sorted(out)


def join_uri(root: str, *parts: str) -> str:
    root = schemas.storage_location(root)
    if is_s3(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def read_manifest(root: str) -> dict[str, Any]:
    """The corpus manifest (``<root>/manifest.json``, local or ``s3://``) as a dict."""
    path = join_uri(root, schemas.MANIFEST_NAME)
    try:
        manifest: dict[str, Any] = json.loads(read_bytes(path))
    except (FileNotFoundError, NotADirectoryError):  # no such root, or a file
        raise FileNotFoundError(f"{path}: no corpus manifest; {root} is not a corpus") from None
    except ValueError as exc:  # JSON or UTF-8
        raise ValueError(f"{path}: the corpus manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: the corpus manifest is not a JSON object")
    for key in ("patch_size", "vae"):
        if key not in manifest:
            raise ValueError(f"{path}: manifest has no {key!r}")
    return manifest


def shard_urls(root: str) -> list[str]:
    """Shard urls of a corpus (local paths or ``s3://`` urls) in name order."""
    urls = list_files(join_uri(root, schemas.SHARDS_DIR), ".tar")
    if not urls:
        raise FileNotFoundError(f"{join_uri(root, schemas.SHARDS_DIR)}: no *.tar shards")
    return urls


def check_latents(blob: bytes, crc: int | None, url: str, key: str) -> None:
    """Raise ValueError naming the sample when ``blob`` (its latents member) does not
    match the CRC-32 recorded with it (``latents_crc32``; None: none recorded)."""
    if crc is not None and zlib.crc32(blob) != crc:
        raise ValueError(
            f"{url}: sample {key!r}: its latents fail their CRC-32 check: the shard is corrupt "
            "(`reelpack inspect ROOT --verify` lists every such sample; training with "
            "--skip-corrupt leaves them out)"
        )


_CRC_FIELD = re.compile(rb'"latents_crc32":\s*(\d+)')


def stored_crc(meta: bytes) -> int | None:
    """The ``latents_crc32`` of a sample's JSON member, found without parsing it all."""
    match = _CRC_FIELD.search(meta)
    return int(match.group(1)) if match else None


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
    meta = json.loads(members[_META].decode("utf-8"))
    check_latents(members[_LATENTS], meta.get("latents_crc32"), url, key)
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
        meta=meta,
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
    same per token (for gathers and the block-diagonal attention mask). Caption
    embeddings, when the corpus stores them, are packed the same way: sample ``i``
    owns ``text_embeds[text_cu_seqlens[i]:text_cu_seqlens[i+1]]``.
    """

    tokens: torch.Tensor  # (N, D) float32
    positions: torch.Tensor  # (N, 3) int64, (t, h, w) in patch units within the sample
    sample_ids: torch.Tensor  # (N,) int64 in [0, S)
    cu_seqlens: torch.Tensor  # (S + 1,) int32, cumulative token counts
    grids: list[Grid]  # per sample (t, h, w) tokens of the full (cropped/downscaled) latent
    captions: list[str]
    keys: list[str]
    text_embeds: torch.Tensor | None = None  # (M, Dt) float32, or None without embeddings
    text_cu_seqlens: torch.Tensor | None = None  # (S + 1,) int32, or None
    # Token dropping (NaViT): each kept token's raster index in its sample's full grid;
    # None when no token was dropped. Positions stay the true (t, h, w) either way.
    keep_index: torch.Tensor | None = None  # (N,) int64
    timesteps: torch.Tensor | None = None  # (S,) float32 placeholders (NaN): the trainer draws t
    token_budget: int = 0  # the sequence length the batch was packed for (0: unknown)
    batch_seed: int = 0  # deterministic per (seed, epoch, rank, step): seed per-step noise with it
    policies: list[str] = field(default_factory=list)  # per sample: "", "crop" or "downscale"
    # samples planned for this sequence but left out as unreadable or corrupt (the
    # loader's skip_corrupt), each "<shard>: sample '<key>': <why>"
    corrupt: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.grids)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_padding(self) -> int:
        """Tokens a fixed-length step would pad: ``token_budget - num_tokens`` (0 if unknown)."""
        return max(self.token_budget - self.num_tokens, 0)

    def to(self, device: str | torch.device) -> PackedBatch:
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device),
            positions=self.positions.to(device),
            sample_ids=self.sample_ids.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            text_embeds=move(self.text_embeds),
            text_cu_seqlens=move(self.text_cu_seqlens),
            keep_index=move(self.keep_index),
            timesteps=move(self.timesteps),
        )


@dataclass
class PackStats:
    """Running counts of a `pack` call or a `PackedLoader` (read them while it streams).

    A `PackedLoader` counts per rank: ``samples_packed``, ``batches``, ``tokens`` and
    ``padding_tokens`` are what this rank yielded; the per-policy counts (skipped,
    cropped, downscaled, dropped at the epoch end) are per epoch over the whole corpus,
    the same on every rank, added when an epoch starts.
    """

    samples_in: int = 0
    samples_packed: int = 0
    samples_skipped: int = 0  # larger than the token budget on their own (after the policy)
    skipped_keys: list[str] = field(default_factory=list)
    samples_misfit: int = 0  # latent shape not divisible by the patch: never packed
    batches: int = 0
    tokens: int = 0
    samples_cropped: int = 0  # temporally cropped to fit the budget
    samples_downscaled: int = 0  # read at a smaller stored resolution to fit the budget
    samples_dropped: int = 0  # in the < world_size packed sequences left over at an epoch's end
    padding_tokens: int = 0  # budget minus tokens, summed over batches
    tokens_dropped: int = 0  # removed by NaViT token dropping
    samples_corrupt: int = 0  # unreadable or corrupt, left out (PackedLoader's skip_corrupt)
    corrupt_samples: list[str] = field(default_factory=list)  # "<shard>: sample '<key>': <why>"
    seconds: float = 0.0  # wall time spent producing batches (loader only)
    _max_keys: int = 1000  # skipped_keys keeps at most this many examples

    def fill(self, token_budget: int) -> float:
        """Mean share of the budget used per batch."""
        return self.tokens / (self.batches * token_budget) if self.batches else math.nan

    def padding_fraction(self) -> float:
        """Share of the packed sequences' slots that are padding."""
        total = self.tokens + self.padding_tokens
        return self.padding_tokens / total if total else math.nan

    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def skip(self, key: str) -> None:
        self.samples_skipped += 1
        if len(self.skipped_keys) < self._max_keys:
            self.skipped_keys.append(key)

    def corrupt(self, problem: str) -> None:
        self.samples_corrupt += 1
        if len(self.corrupt_samples) < self._max_keys:
            self.corrupt_samples.append(problem)

    def summary(self) -> str:
        """The counts in one line for a person, e.g. after a training run."""
        line = f"{self.samples_packed} samples in {self.batches} packed sequences"
        if self.tokens + self.padding_tokens:
            line += f" ({self.tokens:,} tokens, {self.padding_fraction():.1%} padding)"
        fitted = [
            f"{n} {what}"
            for n, what in (
                (self.samples_skipped, "skipped as over the token budget"),
                (self.samples_misfit, "left out as not divisible by the patch"),
                (self.samples_cropped, "cropped to fit"),
                (self.samples_downscaled, "downscaled to fit"),
                (self.samples_dropped, "left over at epoch ends"),
                (self.tokens_dropped, "tokens dropped"),
                (self.samples_corrupt, "left out as corrupt"),
            )
            if n
        ]
        if fitted:
            line += "; " + ", ".join(fitted)
        if self.skipped_keys:
            more = "" if self.samples_skipped <= 3 else ", ..."
            line += f" (skipped: {', '.join(self.skipped_keys[:3])}{more})"
        return line

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["_max_keys"]
        out["skipped_keys"] = out["skipped_keys"][:20]
        out["corrupt_samples"] = out["corrupt_samples"][:20]
        out["padding_fraction"] = self.padding_fraction()
        out["tokens_per_s"] = self.tokens_per_s()
        return out


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
            stats.skip(sample.key)
            continue
        if used + n > token_budget:
            stats.batches += 1
            stats.tokens += used
            stats.padding_tokens += token_budget - used
            yield dataclasses.replace(_collate(parts), token_budget=token_budget)
            parts, used = [], 0
        _, t, h, w = sample.latents.shape
        parts.append((sample, tokens, positions, (t // patch[0], h // patch[1], w // patch[2])))
        used += n
        stats.samples_packed += 1
    if parts:
        stats.batches += 1
        stats.tokens += used
        stats.padding_tokens += token_budget - used
        yield dataclasses.replace(_collate(parts), token_budget=token_budget)


# The loader lives in its own module, which imports this one: re-export it lazily so
# that importing either module first works.
if TYPE_CHECKING:
    from model.loader import PackedLoader


def __getattr__(name: str) -> Any:
    if name == "PackedLoader":
        from model.loader import PackedLoader

        return PackedLoader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
