"""`PackedLoader`: a trainer's epoch of packed latent sequences, planned from the index.

    loader = PackedLoader("s3://bucket/corpus", token_budget=16384, rank=r, world_size=w,
                          num_workers=4)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # PackedBatch, one per optimizer step
            ...
            checkpoint["data"] = loader.state_dict()   # small JSON dict

How an epoch is made (everything up to step 5 reads only the index, never a shard):

1. **Catalog**: the kept rows of ``<root>/index/part-*.parquet`` (a later part wins for
   a source present in several parts; parts without a ``sources/`` commit marker are
   ignored), filtered by the optional ``where(row)`` predicate and ``keep_key(key)``
   (a sample key test that reads no more of the index: a held-out set). Each row's
   ``latent_shape`` gives its token count at the loader's patch. Without an index the
   shards are scanned once for their safetensors headers instead.
2. **Order**: shards shuffled by (seed, epoch), then samples through a bounded shuffle
   buffer (``shuffle_buffer``) — a deterministic simulation of webdataset's buffer.
3. **Policy** for samples over the budget: ``skip``; ``crop`` (keep the first latent
   frames that fit: a causal VAE's first latent frame encodes one frame, so a prefix is
   the latent of a shorter clip); ``downscale`` (read a smaller stored resolution,
   tensors ``latents@<H>x<W>`` in the same safetensors blob, found by reading only
   the blob's header; skipped when none fits). Counted in `PackStats`.
4. **Pack**: `best_fit_pack`, best-fit decreasing over windows of ``pack_buffer``
   samples with a bounded set of open sequences.
5. **Split**: the packed sequences are cut into ``world_size`` contiguous runs of equal
   length ``len(bins) // world_size``, so every rank takes the same number of steps
   (no DDP hang) and reads about ``1/world_size`` of the shards. The leftover
   ``< world_size`` sequences are the documented drop at an epoch's end
   (``drop_last=False`` instead pads every rank to equal length by repeating sequences
   from the epoch's start). Optionally (``balance_window``) each rank orders its steps
   in blocks so that the s-th step of every rank has a similar attention cost Σ L².
6. **Stream**: DataLoader worker ``w`` of ``num_workers`` builds the rank's sequences
   ``position + w, position + w + num_workers, ...``; the DataLoader hands them out
   round robin, so the batch order is the same for any number of workers. A worker
   reads only the samples its sequences need, in plan order, from the shards (local
   tar files with seeks; ``s3://`` via boto3 streaming ``get_object`` bodies), keeping
   only samples that arrived ahead of their sequence.

**Resume.** ``state_dict()`` is ``{epoch, position, ...}``: ``position`` counts the
batches this rank has yielded in the epoch. Loading it into a fresh loader with the
same corpus, seed and settings continues with exactly the batches an uninterrupted run
would yield next — also with a different ``num_workers``. With a different
``world_size`` the per-rank runs change, so an exact continuation does not exist: the
loader keeps the epoch and continues at the same *fraction* of it (a warning says so);
some samples of that epoch may then be seen twice or not at all, and every later epoch
is exact again.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import math
import re
import struct
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from webdataset.tariterators import base_plus_ext

import schemas
from model.data import (
    Grid,
    PackedBatch,
    PackStats,
    Patch,
    check_latents,
    is_s3,
    join_uri,
    list_files,
    patchify,
    read_bytes,
    read_manifest,
    s3_client,
    split_s3,
    stored_crc,
)

__all__ = [
    "WHERE_SKIPS",
    "CatalogEntry",
    "EpochPlan",
    "PackedLoader",
    "PlannedSample",
    "best_fit_pack",
    "read_catalog",
]

OVERSIZE_POLICIES = ("skip", "crop", "downscale")

log = logging.getLogger(__name__)
_STATE_VERSION = 1
_PART_RE = re.compile(r"part-(\d+)\.parquet$")
_ALT_RE = re.compile(r"^" + re.escape(schemas.TENSOR_LATENTS) + r"@(\d+)x(\d+)$")
_ALLOWED = (schemas.SAMPLE_LATENTS, schemas.SAMPLE_META, schemas.SAMPLE_CAPTION)
_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
Shape = tuple[int, int, int, int]  # (C, T, H, W)


# --- catalog: what the index says --------------------------------------------------------
@dataclass(frozen=True)
class CatalogEntry:
    """One kept sample as the index describes it."""

    key: str
    shard: str  # full url of the shard (local path or s3://)
    shape: Shape  # latent (C, T, H, W)
    # other stored resolutions (name, shape); None: unknown (the index does not list them)
    alt_shapes: tuple[tuple[str, Shape], ...] | None = None


def _index_parts(root: str) -> list[tuple[int, str]]:
    """Committed index parts in part order: those with a ``sources/`` marker if any exist."""
    parts = {}
    for uri in list_files(join_uri(root, schemas.INDEX_DIR), ".parquet"):
        m = _PART_RE.search(uri.rsplit("/", 1)[-1])
        if m:
            parts[int(m.group(1))] = uri
    markers = {
        int(m.group(1))
        for uri in list_files(join_uri(root, schemas.SOURCES_DIR), ".parquet")
        if (m := _PART_RE.search(uri.rsplit("/", 1)[-1]))
    }
    if markers:  # a writer commits index then sources: a part without its marker is partial
        parts = {n: u for n, u in parts.items() if n in markers}
    return sorted(parts.items())


_CATALOG_COLUMNS = ("source", "status", "shard", "key", "latent_shape")
_EXTRA_COLUMNS = ("extra_latents", "extra_latent_shapes")
# what a `where` predicate is not given: one float per dimension per clip (a million
# ViT-L/14 embeddings are 3 GB, and many times that as Python floats)
WHERE_SKIPS = ("clip_embedding",)


def _read_parquet(uri: str, all_columns: bool) -> pa.Table:
    """An index part; only the columns the catalog needs unless `all_columns` (for
    `where`: all but :data:`WHERE_SKIPS`)."""
    f = pq.ParquetFile(io.BytesIO(read_bytes(uri)) if is_s3(uri) else uri)
    names = f.schema_arrow.names
    missing = sorted(set(_CATALOG_COLUMNS) - set(names))
    if missing:
        raise ValueError(f"{uri}: index part lacks columns {missing}")
    if all_columns:
        return f.read(columns=[c for c in names if c not in WHERE_SKIPS])
    return f.read(columns=[c for c in (*_CATALOG_COLUMNS, *_EXTRA_COLUMNS) if c in names])


def _alt_from_row(row: dict[str, Any], uri: str) -> tuple[tuple[str, Shape], ...] | None:
    names, shapes = row.get("extra_latents"), row.get("extra_latent_shapes")
    if names is None and shapes is None:
        return None if "extra_latents" not in row else ()
    names, shapes = names or [], shapes or []
    if len(names) != len(shapes):
        raise ValueError(f"{uri}: clip {row['key']!r} extra_latents and shapes differ in length")
    return tuple(
        (str(n), tuple(int(x) for x in s))  # type: ignore[misc]
        for n, s in zip(names, shapes, strict=True)
        if len(s) == 4
    )


def read_catalog(
    root: str, where: Callable[[dict[str, Any]], bool] | None = None
) -> list[CatalogEntry]:
    """Kept samples of the corpus at `root` in index order, filtered by `where(row)`.

    `where` gets the clip's index row (``schemas.CLIP_SCHEMA`` columns but
    :data:`WHERE_SKIPS`) as a dict; rows become dicts a batch at a time. A corpus
    without ``index/`` parts is scanned once through its shards instead (safetensors
    headers and the JSON metadata only).
    """
    parts = _index_parts(root)
    if not parts:
        return _scan_catalog(root, where)
    tables = []
    latest: dict[str, int] = {}  # source -> highest part number holding it
    for n, uri in parts:  # in part order: a later part wins
        table = _read_parquet(uri, where is not None)
        tables.append((n, uri, table))
        latest.update(dict.fromkeys(table.column("source").to_pylist(), n))
    out = []
    for n, uri, table in tables:
        for r in (row for batch in table.to_batches(4096) for row in batch.to_pylist()):
            if r["status"] != "kept" or latest[r["source"]] != n:
                continue
            if not r["shard"] or not r["key"] or not r["latent_shape"]:
                raise ValueError(
                    f"{uri}: kept clip {r.get('clip_id')!r} has no shard, key or latent_shape"
                )
            if where is not None and not where(r):
                continue
            shape = tuple(int(x) for x in r["latent_shape"])
            if len(shape) != 4:
                raise ValueError(f"{uri}: clip {r['key']!r} latent_shape {shape} is not C,T,H,W")
            alts = _alt_from_row(r, uri)
            out.append(CatalogEntry(r["key"], join_uri(root, r["shard"]), shape, alts))
    return out


def _scan_catalog(root: str, where: Callable[[dict[str, Any]], bool] | None) -> list[CatalogEntry]:
    from model.data import shard_urls

    out = []
    for url in shard_urls(root):
        for key, (shapes, meta) in _probe_shard(url, None).items():
            if meta.get("status", "kept") != "kept":
                continue
            if where is not None and not where(meta):
                continue
            if schemas.TENSOR_LATENTS not in shapes:
                raise ValueError(f"{url}: sample {key!r} has no tensor {schemas.TENSOR_LATENTS!r}")
            out.append(_entry(key, url, shapes))
    return out


def _entry(key: str, url: str, shapes: dict[str, tuple[int, ...]]) -> CatalogEntry:
    main = shapes[schemas.TENSOR_LATENTS]
    if len(main) != 4:
        raise ValueError(f"{url}: sample {key!r} latents are {main}, not [C,T,H,W]")
    alts = tuple(
        sorted(
            (name, tuple(s)) for name, s in shapes.items() if _ALT_RE.match(name) and len(s) == 4
        )
    )
    return CatalogEntry(key, url, tuple(main), alts)  # type: ignore[arg-type]


# --- shard access --------------------------------------------------------------------------
class _S3RangeFile(io.RawIOBase):
    """A seekable read-only view of one S3 object through ranged GETs (for header probes)."""

    def __init__(self, url: str) -> None:
        self.bucket, self.key = split_s3(url)
        self.client = s3_client()
        self.size = int(self.client.head_object(Bucket=self.bucket, Key=self.key)["ContentLength"])
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        rng = f"bytes={self.pos}-{self.pos + n - 1}"
        data = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=rng)["Body"].read()
        buf[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _open_tar(url: str, *, seekable: bool) -> tarfile.TarFile:
    """A tar reader: local files seek over unneeded members; s3 streams the body (or,
    for header probes, reads ranges)."""
    if not is_s3(url):
        try:
            return tarfile.open(url, mode="r:")
        except FileNotFoundError:
            raise FileNotFoundError(f"{url}: shard listed in the index is missing") from None
    if seekable:
        return tarfile.open(fileobj=io.BufferedReader(_S3RangeFile(url), 1 << 16), mode="r:")
    bucket, key = split_s3(url)
    client = s3_client()
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
    except client.exceptions.NoSuchKey:
        raise FileNotFoundError(f"{url}: shard listed in the index is missing") from None
    return tarfile.open(fileobj=body, mode="r|")


def _split_name(url: str, name: str) -> tuple[str, str]:
    key, suffix = base_plus_ext(name)
    if key is None:
        raise ValueError(f"{url}: tar member {name!r} is not <key>.<suffix>")
    return key, suffix


_MAX_ST_HEADER = 1 << 24  # a safetensors header larger than 16 MiB is not a latent blob


def _st_parse_header(blob: bytes | memoryview, url: str, key: str) -> tuple[int, dict[str, Any]]:
    if len(blob) < 8:
        raise ValueError(f"{url}: sample {key!r} latents blob is truncated")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > _MAX_ST_HEADER or 8 + n > len(blob):
        raise ValueError(f"{url}: sample {key!r} latents blob has a bad safetensors header")
    header: dict[str, Any] = json.loads(bytes(blob[8 : 8 + n]))
    header.pop("__metadata__", None)
    return 8 + n, header


def _st_tensor(
    blob: bytes, name: str, url: str, key: str, *, as_float: bool = True
) -> torch.Tensor | None:
    """One tensor of a safetensors blob, or None when absent. Decodes only that one.

    ``as_float=False`` returns a read-only view of `blob` in the stored dtype (no copy):
    the caller must copy out of it, never write to it.
    """
    start, header = _st_parse_header(memoryview(blob), url, key)
    info = header.get(name)
    if info is None:
        return None
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{url}: sample {key!r} tensor {name!r} has dtype {info['dtype']}")
    lo, hi = (start + int(o) for o in info["data_offsets"])
    shape = [int(s) for s in info["shape"]]
    if hi > len(blob) or hi - lo != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
        raise ValueError(f"{url}: sample {key!r} tensor {name!r} has bad offsets")
    if hi == lo:
        return torch.zeros(shape)
    with warnings.catch_warnings():  # "non-writable buffer": the view is only read
        warnings.simplefilter("ignore", UserWarning)
        x = torch.frombuffer(blob, dtype=dtype, count=math.prod(shape), offset=lo).reshape(shape)
    return x.float() if as_float else x


def _probe_shard(
    url: str, keys: set[str] | None
) -> dict[str, tuple[dict[str, tuple[int, ...]], dict[str, Any]]]:
    """Tensor shapes (from safetensors headers) and JSON metadata of samples in a shard.

    Reads only tar headers, the safetensors headers and the small JSON members.
    """
    out: dict[str, tuple[dict[str, tuple[int, ...]], dict[str, Any]]] = {}
    with _open_tar(url, seekable=True) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, suffix = _split_name(url, member.name)
            if keys is not None and key not in keys:
                continue
            shapes, meta = out.setdefault(key, ({}, {}))
            f = tar.extractfile(member)
            assert f is not None  # a regular file
            if suffix == schemas.SAMPLE_LATENTS:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                _, header = _st_parse_header(head + f.read(min(n, _MAX_ST_HEADER + 1)), url, key)
                shapes.update({k: tuple(int(x) for x in v["shape"]) for k, v in header.items()})
            elif suffix == schemas.SAMPLE_META:
                meta.update(json.loads(f.read()))
    return out


RawSample = dict[str, bytes]  # suffix -> member bytes


def _iter_wanted(url: str, wanted: set[str]) -> Iterator[tuple[str, RawSample]]:
    """(key, members) of the samples in `wanted`, in stored order; others are skipped
    without reading their data where the storage allows (local seeks)."""
    with _open_tar(url, seekable=False) as tar:
        current: str | None = None
        members: RawSample = {}
        for member in tar:
            if not member.isfile():
                continue
            key, suffix = _split_name(url, member.name)
            if key != current:
                if current is not None and members:
                    yield current, members
                current, members = key, {}
            if key not in wanted:
                continue
            if suffix not in _ALLOWED:
                # never decode anything else: a shard is data, not code
                raise ValueError(
                    f"{url}: sample {key!r} has member {suffix!r}; only {list(_ALLOWED)} are read"
                )
            f = tar.extractfile(member)
            assert f is not None
            members[suffix] = f.read(member.size)  # one read, not 8 KiB chunks
        if current is not None and members:
            yield current, members


class _Reader:
    """Fetches planned samples from their shards in plan order, keeping those that arrive
    early until used. One per worker."""

    def __init__(self, needs: dict[tuple[str, str], int]) -> None:
        self.left = dict(needs)  # (shard, key) -> times still needed
        self.wanted: dict[str, set[str]] = {}
        for shard, key in needs:
            self.wanted.setdefault(shard, set()).add(key)
        self.cache: dict[tuple[str, str], RawSample] = {}
        self.open: dict[str, Iterator[tuple[str, RawSample]]] = {}

    def get(self, shard: str, key: str) -> RawSample:
        sid = (shard, key)
        if sid not in self.cache:
            self._fetch(shard, key)
        raw = self.cache[sid]
        self.left[sid] -= 1
        if self.left[sid] <= 0:
            del self.cache[sid]
            self.wanted[shard].discard(key)
            if not self.wanted[shard]:  # nothing more from this shard: stop reading it
                it = self.open.pop(shard, None)
                if it is not None:
                    it.close()  # type: ignore[attr-defined]
        return raw

    def _fetch(self, shard: str, key: str) -> None:
        # A sample needed twice (drop_last=False repeats) stays cached until its last use,
        # so one pass over each shard is enough.
        it = self.open.get(shard)
        if it is None:
            it = self.open[shard] = _iter_wanted(shard, set(self.wanted[shard]))
        for k, raw in it:
            if self.left.get((shard, k), 0) > 0:
                self.cache[(shard, k)] = raw
            if k == key:
                return
        del self.open[shard]
        raise ValueError(f"{shard}: sample {key!r} listed in the index is not in the shard")


# --- packing ---------------------------------------------------------------------------------
def best_fit_pack(
    sizes: list[int], budget: int, window: int = 64, max_open: int | None = None
) -> list[list[int]]:
    """Bins of item indices, each bin's sizes summing to at most `budget`.

    Items arrive in order and are taken in windows of `window`; each window is sorted
    by size, largest first, and every item goes to the open bin it fits most tightly
    (best fit decreasing), or a new one. Bins are emitted (in the returned order) when
    nothing of the window's smallest size fits any more, or, beyond `max_open` open
    bins (default `window`), fullest first. Memory stays bounded by the window and the
    open bins; every item lands in exactly one bin. Items larger than `budget` are a
    ValueError: apply an oversize policy first.
    """
    if budget < 1:
        raise ValueError(f"budget must be positive, got {budget}")
    window = max(window, 1)
    max_open = max(max_open if max_open is not None else window, 1)
    out: list[list[int]] = []
    rems: list[tuple[int, int]] = []  # sorted (remaining space, bin id) of open bins
    bins: dict[int, list[int]] = {}
    next_id = 0
    for start in range(0, len(sizes), window):
        order = sorted(range(start, min(start + window, len(sizes))), key=lambda i: -sizes[i])
        for i in order:
            s = sizes[i]
            if not 0 < s <= budget:
                raise ValueError(f"item {i} has {s} tokens; budget is {budget}")
            j = bisect.bisect_left(rems, (s, -1))
            if j < len(rems):
                rem, b = rems.pop(j)
                bins[b].append(i)
                bisect.insort(rems, (rem - s, b))
            else:
                bins[next_id] = [i]
                bisect.insort(rems, (budget - s, next_id))
                next_id += 1
        smallest = min(sizes[i] for i in order)
        # bins that cannot take even the smallest item seen lately are done
        while rems and rems[0][0] < smallest:
            out.append(bins.pop(rems.pop(0)[1]))
        while len(rems) > max_open:
            out.append(bins.pop(rems.pop(0)[1]))
    # the open rest, in creation order (stable across runs)
    out += [bins[b] for b in sorted(bins)]
    return out


# --- the epoch plan -------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedSample:
    """How one sample enters a packed sequence."""

    key: str
    shard: str
    tensor: str  # "latents" or a stored smaller resolution "latents@HxW"
    shape: Shape  # of that tensor
    frames: int  # latent frames used (a prefix: temporal crop when < shape[1])
    grid: Grid  # tokens per axis after the policy
    keep: int  # tokens kept after token dropping (== prod(grid) without dropping)
    drop_seed: int
    policy: str  # "", "crop" or "downscale"

    @property
    def length(self) -> int:
        return self.keep


@dataclass
class EpochPlan:
    """Every rank's packed sequences of one epoch, from the index alone."""

    epoch: int
    world_size: int
    bins: list[list[PlannedSample]]  # all packed sequences, in packing order
    per_rank: int  # sequences (= steps) per rank
    rank_order: list[list[int]]  # rank -> indices into `bins`, step order
    skipped: list[str] = field(default_factory=list)  # over the budget after the policy
    misfit: list[str] = field(default_factory=list)  # latent shape not divisible by the patch
    cropped: int = 0
    downscaled: int = 0
    dropped: list[str] = field(default_factory=list)  # samples in leftover sequences

    def rank_bins(self, rank: int) -> list[list[PlannedSample]]:
        return [self.bins[i] for i in self.rank_order[rank]]


def _grid(shape: Shape, frames: int, patch: Patch) -> Grid | None:
    _, _, h, w = shape
    pt, ph, pw = patch
    if frames % pt or h % ph or w % pw:
        return None
    return frames // pt, h // ph, w // pw


def _apply_policy(
    e: CatalogEntry, budget: int, patch: Patch, oversize: str
) -> tuple[str, Shape, int, str] | None:
    """(tensor, shape, frames, policy) that fits `budget`, or None (skip)."""
    grid = _grid(e.shape, e.shape[1], patch)
    if grid is None:
        return None
    if math.prod(grid) <= budget:
        return schemas.TENSOR_LATENTS, e.shape, e.shape[1], ""
    if oversize == "crop":
        per_frame = grid[1] * grid[2]
        frames = (budget // per_frame) * patch[0]
        if frames >= patch[0]:
            return schemas.TENSOR_LATENTS, e.shape, frames, "crop"
    elif oversize == "downscale":
        best: tuple[int, str, Shape] | None = None
        for name, shape in e.alt_shapes or ():
            g = _grid(shape, shape[1], patch)
            fits = g is not None and shape[0] == e.shape[0] and math.prod(g) <= budget
            if g is not None and fits and (best is None or math.prod(g) > best[0]):
                best = (math.prod(g), name, shape)
        if best is not None:
            return best[1], best[2], best[2][1], "downscale"
    return None


def _shuffled(entries: list[CatalogEntry], seed: int, epoch: int, buffer: int) -> list[int]:
    """Entry order: shards shuffled, then a bounded shuffle buffer (webdataset's rule)."""
    rng = np.random.default_rng([seed, epoch, 0])
    by_shard: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        by_shard.setdefault(e.shard, []).append(i)
    shards = sorted(by_shard)
    seq = [i for s in rng.permutation(len(shards)) for i in by_shard[shards[s]]]
    if buffer <= 1:
        return seq
    draws = rng.random(len(seq) + buffer)
    out: list[int] = []
    buf: list[int] = []
    d = 0
    for x in seq:
        buf.append(x)
        if len(buf) >= buffer:
            j = int(draws[d] * len(buf))
            d += 1
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = int(draws[d] * len(buf))
        d += 1
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


@dataclass(frozen=True)
class PlanConfig:
    token_budget: int
    patch: Patch
    seed: int = 0
    shuffle_buffer: int = 256
    pack_buffer: int = 64
    oversize: str = "skip"
    token_drop: float = 0.0
    drop_last: bool = True
    balance_window: int = 0


def plan_epoch(
    entries: list[CatalogEntry], cfg: PlanConfig, epoch: int, world_size: int
) -> EpochPlan:
    """The whole epoch, deterministic in (entries, cfg, epoch, world_size)."""
    order = _shuffled(entries, cfg.seed, epoch, cfg.shuffle_buffer)
    rng = np.random.default_rng([cfg.seed, epoch, 1])
    rates = rng.uniform(0.0, cfg.token_drop, size=len(order)) if cfg.token_drop > 0 else None
    seeds = rng.integers(0, 2**62, size=len(order))
    planned: list[PlannedSample] = []
    plan = EpochPlan(epoch, world_size, [], 0, [])
    for n, i in enumerate(order):
        e = entries[i]
        if _grid(e.shape, e.shape[1], cfg.patch) is None:
            plan.misfit.append(e.key)
            continue
        choice = _apply_policy(e, cfg.token_budget, cfg.patch, cfg.oversize)
        if choice is None:
            plan.skipped.append(e.key)
            continue
        tensor, shape, frames, policy = choice
        grid = _grid(shape, frames, cfg.patch)
        assert grid is not None  # checked by the policy
        total = math.prod(grid)
        keep = total if rates is None else max(1, total - int(total * rates[n]))
        plan.cropped += policy == "crop"
        plan.downscaled += policy == "downscale"
        planned.append(
            PlannedSample(e.key, e.shard, tensor, shape, frames, grid, keep, int(seeds[n]), policy)
        )
    packed = best_fit_pack([p.length for p in planned], cfg.token_budget, cfg.pack_buffer)
    plan.bins = [[planned[i] for i in b] for b in packed]
    num = len(plan.bins)
    if cfg.drop_last:
        per = num // world_size
        plan.dropped = [p.key for b in plan.bins[per * world_size :] for p in b]
        runs = [list(range(r * per, (r + 1) * per)) for r in range(world_size)]
    else:
        per = -(-num // world_size) if num else 0
        runs = [[(r * per + s) % num for s in range(per)] for r in range(world_size)]
    plan.per_rank = per
    if cfg.balance_window > 1:
        runs = _balance(plan.bins, runs, cfg.balance_window, cfg.seed, epoch)
    plan.rank_order = runs
    return plan


def attention_cost(bin_: list[PlannedSample]) -> int:
    """Σ L² over a sequence's samples: the attention work of block-diagonal attention."""
    return sum(p.length**2 for p in bin_)


def _balance(
    bins: list[list[PlannedSample]], runs: list[list[int]], window: int, seed: int, epoch: int
) -> list[list[int]]:
    """Within blocks of `window` steps, order each rank's sequences by attention cost and
    then apply one shared random permutation: at every step all ranks hold sequences of
    the same cost rank in their block, so the slowest rank waits less."""
    out: list[list[int]] = [[] for _ in runs]
    per = len(runs[0]) if runs else 0
    for block, start in enumerate(range(0, per, window)):
        size = min(window, per - start)
        perm = np.random.default_rng([seed, epoch, 2, block]).permutation(size)
        for r, run in enumerate(runs):
            chunk = sorted(run[start : start + size], key=lambda i: (attention_cost(bins[i]), i))
            out[r] += [chunk[int(k)] for k in perm]
    return out


# --- building batches ------------------------------------------------------------------------
def _positions(grid: Grid) -> torch.Tensor:
    """(t, h, w) of every token in raster order, as `patchify` returns them: (n, 3) int64."""
    axes = [torch.arange(g) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _patchify_into(out: torch.Tensor, x: torch.Tensor, grid: Grid, patch: Patch) -> None:
    """`patchify(x)` tokens written into `out` (n, D) in one pass (dtype cast included)."""
    c = x.shape[0]
    (gt, gh, gw), (pt, ph, pw) = grid, patch
    src = x.reshape(c, gt, pt, gh, ph, gw, pw).permute(1, 3, 5, 2, 4, 6, 0)  # a view
    out.view(gt, gh, gw, pt, ph, pw, c).copy_(src)


def _checked(p: PlannedSample, raw: RawSample | Exception, channels: int) -> torch.Tensor:
    """The planned tensor of sample ``p`` read from its members ``raw``; ValueError naming
    the sample when it cannot be read, is corrupt, or does not match the index."""
    if isinstance(raw, Exception):
        raise raw
    for suffix in _ALLOWED:
        if suffix not in raw:
            raise ValueError(f"{p.shard}: sample {p.key!r} lacks {suffix!r}")
    blob = raw[schemas.SAMPLE_LATENTS]
    check_latents(blob, stored_crc(raw[schemas.SAMPLE_META]), p.shard, p.key)
    x = _st_tensor(blob, p.tensor, p.shard, p.key, as_float=False)
    if x is None:
        raise ValueError(f"{p.shard}: sample {p.key!r} has no tensor {p.tensor!r}")
    if tuple(x.shape) != p.shape or x.shape[0] != channels:
        raise ValueError(
            f"{p.shard}: sample {p.key!r} tensor {p.tensor!r} is {tuple(x.shape)}; the "
            f"index says {p.shape} and the manifest {channels} channels"
        )
    return x


def _build_batch(
    items: list[PlannedSample],
    raws: list[RawSample | Exception],
    patch: Patch,
    channels: int,
    budget: int,
    batch_seed: int,
    dropping: bool,
    skip_corrupt: bool = False,
) -> PackedBatch:
    """The packed sequence of ``items`` from their members ``raws`` (an exception: the
    sample could not be read). A sample that fails (:func:`_checked`) raises, or with
    ``skip_corrupt`` is left out of the sequence and named in its ``corrupt``."""
    views, poss, texts, keeps = [], [], [], []
    captions, keys, grids, policies, corrupt = [], [], [], [], []
    for p, raw in zip(items, raws, strict=True):
        try:
            x = _checked(p, raw, channels)
        except ValueError as exc:
            if not skip_corrupt:
                raise
            corrupt.append(str(exc))
            continue
        blob = raw[schemas.SAMPLE_LATENTS]  # type: ignore[index]
        positions = _positions(p.grid)  # (n, 3)
        index = torch.arange(positions.shape[0])
        if p.keep < positions.shape[0]:
            g = torch.Generator().manual_seed(p.drop_seed)
            index = torch.randperm(positions.shape[0], generator=g)[: p.keep].sort().values
            positions = positions[index]
        views.append(x[:, : p.frames])
        poss.append(positions)
        keeps.append(index)
        texts.append(_st_tensor(blob, schemas.TENSOR_TEXT_EMBEDS, p.shard, p.key))
        captions.append(raw[schemas.SAMPLE_CAPTION].decode("utf-8"))  # type: ignore[index]
        keys.append(p.key)
        grids.append(p.grid)
        policies.append(p.policy)
    dim = channels * math.prod(patch)
    if not views:  # all left out: a batch of nothing, which the loader counts, not yields
        return PackedBatch(
            tokens=torch.empty(0, dim),
            positions=torch.empty(0, 3, dtype=torch.int64),
            sample_ids=torch.empty(0, dtype=torch.int64),
            cu_seqlens=torch.zeros(1, dtype=torch.int32),
            grids=[],
            captions=[],
            keys=[],
            token_budget=budget,
            batch_seed=batch_seed,
            corrupt=corrupt,
        )
    lengths = torch.tensor([i.shape[0] for i in keeps])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    tokens = torch.empty(int(cu[-1]), dim)  # (N, D) float32, filled sample by sample
    for i, (x, index) in enumerate(zip(views, keeps, strict=True)):
        lo, hi = int(cu[i]), int(cu[i + 1])
        if hi - lo == math.prod(grids[i]):
            _patchify_into(tokens[lo:hi], x, grids[i], patch)
        else:  # token dropping: gather the kept ones
            tokens[lo:hi] = patchify(x.float(), patch)[0][index]
    text_embeds = text_cu = None
    if any(t is not None for t in texts):
        dims = {t.shape[-1] for t in texts if t is not None}
        if len(dims) != 1:
            raise ValueError(f"samples {keys} have text embeddings of widths {sorted(dims)}")
        width = dims.pop()
        parts = [t if t is not None else torch.zeros(0, width) for t in texts]
        text_embeds = torch.cat(parts)  # (M, Dt)
        text_lengths = torch.tensor([t.shape[0] for t in parts])
        text_cu = torch.nn.functional.pad(text_lengths.cumsum(0), (1, 0)).to(torch.int32)
    return PackedBatch(
        tokens=tokens,  # (N, D)
        positions=torch.cat(poss),  # (N, 3)
        sample_ids=torch.repeat_interleave(torch.arange(len(views)), lengths),  # (N,)
        cu_seqlens=cu.to(torch.int32),
        grids=grids,
        captions=captions,
        keys=keys,
        text_embeds=text_embeds,
        text_cu_seqlens=text_cu,
        keep_index=torch.cat(keeps) if dropping else None,
        timesteps=torch.full((len(views),), math.nan),
        token_budget=budget,
        batch_seed=batch_seed,
        policies=policies,
        corrupt=corrupt,
    )


def _batch_seed(seed: int, epoch: int, global_bin: int) -> int:
    return int(
        np.random.SeedSequence([seed, epoch, 3, global_bin]).generate_state(1, np.uint64)[0] >> 1
    )


class _RankStream(torch.utils.data.IterableDataset[PackedBatch]):
    """One rank's sequences from `start` on; DataLoader worker w builds every
    num_workers-th one, so the round-robin merge restores plan order."""

    def __init__(
        self,
        bins: list[list[PlannedSample]],
        bin_ids: list[int],
        start: int,
        patch: Patch,
        channels: int,
        budget: int,
        seed: int,
        epoch: int,
        dropping: bool,
        skip_corrupt: bool = False,
    ) -> None:
        super().__init__()
        self.bins, self.bin_ids, self.start = bins, bin_ids, start
        self.patch, self.channels, self.budget = patch, channels, budget
        self.seed, self.epoch, self.dropping = seed, epoch, dropping
        self.skip_corrupt = skip_corrupt

    def __iter__(self) -> Iterator[PackedBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = list(range(self.start + worker, len(self.bins), workers))
        needs: dict[tuple[str, str], int] = {}
        for j in mine:
            for p in self.bins[j]:
                needs[(p.shard, p.key)] = needs.get((p.shard, p.key), 0) + 1
        reader = _Reader(needs)
        for j in mine:
            items = self.bins[j]
            raws: list[RawSample | Exception] = []
            for p in items:
                try:
                    raws.append(reader.get(p.shard, p.key))
                except ValueError as exc:  # not in the shard (as the index says it is)
                    if not self.skip_corrupt:
                        raise
                    raws.append(exc)
                except (tarfile.TarError, FileNotFoundError) as exc:  # cut short, garbled, gone
                    why = f"the shard cannot be read from here on ({exc})"
                    if isinstance(exc, FileNotFoundError):
                        why = "the shard is missing"
                    problem = ValueError(f"{p.shard}: sample {p.key!r}: {why}")
                    if not self.skip_corrupt:
                        raise ValueError(
                            f"{problem} (`reelpack inspect ROOT` lists what is damaged; "
                            "training with --skip-corrupt leaves such samples out)"
                        ) from exc
                    raws.append(problem)
            yield _build_batch(
                items,
                raws,
                self.patch,
                self.channels,
                self.budget,
                _batch_seed(self.seed, self.epoch, self.bin_ids[j]),
                self.dropping,
                self.skip_corrupt,
            )


def _identity(x: Any) -> Any:
    return x


# --- the loader ------------------------------------------------------------------------------
class PackedLoader:
    """Packed batches of a corpus for one rank, one epoch per iteration (see module doc)."""

    def __init__(
        self,
        root: str,
        *,
        token_budget: int,
        patch: tuple[int, int, int] | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        pack_buffer: int = 64,
        where: Callable[[dict[str, Any]], bool] | None = None,
        keep_key: Callable[[str], bool] | None = None,
        catalog: Sequence[CatalogEntry] | None = None,
        oversize: str = "skip",
        token_drop: float = 0.0,
        drop_last: bool = True,
        balance_window: int = 0,
        skip_corrupt: bool = False,
    ) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {token_budget}")
        if pack_buffer < 1:
            raise ValueError(f"pack_buffer must be positive, got {pack_buffer}")
        for name, value in (
            ("num_workers", num_workers),
            ("shuffle_buffer", shuffle_buffer),
            ("balance_window", balance_window),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if oversize not in OVERSIZE_POLICIES:
            raise ValueError(f"oversize must be one of {OVERSIZE_POLICIES}, got {oversize!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {token_drop}")
        manifest = read_manifest(root)
        if patch is None:
            if len(manifest["patch_size"]) != 3:
                raise ValueError(f"{root}: manifest patch_size {manifest['patch_size']} is not 3-D")
            patch = tuple(int(p) for p in manifest["patch_size"])  # type: ignore[assignment]
        assert patch is not None
        self.root = root
        self.patch: Patch = (int(patch[0]), int(patch[1]), int(patch[2]))
        self.channels = int(manifest["vae"]["latent_channels"])
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.skip_corrupt = skip_corrupt
        self.cfg = PlanConfig(
            token_budget=token_budget,
            patch=self.patch,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            pack_buffer=pack_buffer,
            oversize=oversize,
            token_drop=token_drop,
            drop_last=drop_last,
            balance_window=balance_window,
        )
        # `catalog`: read_catalog(root, where) read before, shared by several loaders
        self.entries = list(catalog) if catalog is not None else read_catalog(root, where)
        if keep_key is not None:  # e.g. a held-out validation set, in or out
            self.entries = [e for e in self.entries if keep_key(e.key)]
        if oversize == "downscale":
            self.entries = self._probe_alternatives(self.entries)
        self.stats = PackStats()
        self.epoch = 0
        self.position = 0  # batches this rank yielded in `epoch`
        self._plan: EpochPlan | None = None
        self._counted: set[int] = set()

    @property
    def token_budget(self) -> int:
        return self.cfg.token_budget

    def _probe_alternatives(self, entries: list[CatalogEntry]) -> list[CatalogEntry]:
        """Stored smaller resolutions of the samples over the budget (headers only)."""
        over: dict[str, set[str]] = {}
        for e in entries:
            g = _grid(e.shape, e.shape[1], self.patch)
            if g is not None and math.prod(g) > self.cfg.token_budget and e.alt_shapes is None:
                over.setdefault(e.shard, set()).add(e.key)
        found = {}
        for shard, keys in sorted(over.items()):
            for key, (shapes, _) in _probe_shard(shard, keys).items():
                if schemas.TENSOR_LATENTS in shapes:
                    found[(shard, key)] = _entry(key, shard, shapes).alt_shapes
        return [
            dataclasses.replace(e, alt_shapes=found[(e.shard, e.key)])
            if (e.shard, e.key) in found
            else e
            for e in entries
        ]

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's plan (every rank's sequences); cheap to call again for the same epoch."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = plan_epoch(self.entries, self.cfg, epoch, self.world_size)
        return self._plan

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank; fewer where
        ``skip_corrupt`` left every sample of a sequence out)."""
        return self.plan().per_rank

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning on the next iteration (a no-op if already there)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[PackedBatch]:
        plan = self.plan()
        if plan.epoch not in self._counted:
            self._counted.add(plan.epoch)
            for key in plan.skipped:
                self.stats.skip(key)
            self.stats.samples_misfit += len(plan.misfit)
            self.stats.samples_cropped += plan.cropped
            self.stats.samples_downscaled += plan.downscaled
            self.stats.samples_dropped += len(plan.dropped)
        order = plan.rank_order[self.rank]
        stream = _RankStream(
            [plan.bins[i] for i in order],
            order,
            self.position,
            self.patch,
            self.channels,
            self.cfg.token_budget,
            self.cfg.seed,
            plan.epoch,
            self.cfg.token_drop > 0,
            self.skip_corrupt,
        )
        source: Any = stream
        if self.num_workers > 0 and len(order) - self.position > 0:
            source = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity
            )
        tick = time.perf_counter()
        for batch in source:
            self.position += 1  # counts sequences, so that a resume continues exactly
            s = self.stats
            for problem in batch.corrupt:
                s.corrupt(problem)
                log.warning("left out of batch %d: %s", self.position - 1, problem)
            if not batch.num_samples:  # every sample of it left out: no step
                continue
            s.samples_in += batch.num_samples
            s.samples_packed += batch.num_samples
            s.batches += 1
            s.tokens += batch.num_tokens
            s.padding_tokens += batch.num_padding
            s.tokens_dropped += sum(math.prod(g) for g in batch.grids) - batch.num_tokens
            now = time.perf_counter()
            s.seconds += now - tick
            yield batch
            tick = time.perf_counter()
        self.epoch, self.position = plan.epoch + 1, 0

    def _fingerprint(self) -> str:
        cfg = dataclasses.asdict(self.cfg)
        cfg["samples"] = len(self.entries)
        return json.dumps(cfg, sort_keys=True)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: JSON-able; put it in the trainer's checkpoint."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "world_size": self.world_size,
            "steps_per_epoch": len(self),
            "config": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken (see the module doc for a changed world size)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r} is not {_STATE_VERSION}"
            )
        if state["config"] != self._fingerprint():
            raise ValueError(
                "loader state was taken with other settings or another corpus: "
                f"{state['config']} != {self._fingerprint()}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if int(state["world_size"]) != self.world_size:
            old = int(state["steps_per_epoch"])
            frac = self.position / old if old else 0.0
            self.position = min(round(frac * len(self)), len(self))
            warnings.warn(
                f"world size changed {state['world_size']} -> {self.world_size}: resuming "
                f"epoch {self.epoch} at the same fraction ({frac:.3f}); this epoch is not "
                "exactly-once, later ones are",
                stacklevel=2,
            )
