"""Near-duplicate clips across a whole build: one representative kept, the rest marked.

Two kinds of evidence, either one suffices:

- **exact duplicates**: ``frame_hash`` (a 64-bit dHash of the clip's mean sampled
  luma, written by ``pipeline.stages.score`` without any model) within
  ``hash_max_bits`` Hamming bits: the same footage, re-encoded or rescaled;
- **near duplicates**: cosine similarity of ``clip_embedding`` (the CLIP image
  embedding written by ``pipeline.stages.aesthetic``) at or above ``threshold``.

:class:`DedupIndex` is incremental: ``add(ids, embeddings, hashes)`` returns, per
item, the id of an earlier *representative* it duplicates, or None, in which case
the item becomes a representative itself. Items are taken in order, so within one
call later items are checked against earlier ones too. Whichever copy arrives
first wins; on Ray that order is not deterministic, ``reelpack refilter`` redoes
the pass in a fixed order (clips that already have latents first, then by id).

How it scales (memory and time per representative, not per clip pair):

- Hashes: multi-index hashing. The 64 bits are cut into ``hash_max_bits + 1`` bands;
  two hashes within ``hash_max_bits`` bits agree exactly on at least one band
  (pigeonhole), so a lookup probes one bucket per band and verifies the few hits.
  8 bytes per band plus the 8-byte hash per representative.
- Embeddings: random-hyperplane LSH (SimHash). ``lsh_tables`` tables, each keyed by
  ``lsh_bits`` signs of projections; a lookup verifies exact cosines only against
  the representatives sharing a bucket in some table. Two embeddings at cosine
  ``c`` (angle t) collide in one table with probability ``(1 - t/pi) ** lsh_bits``;
  the defaults (12 bits, 16 tables) find a pair at cosine 0.95 with probability
  0.995 (0.9995 at 0.97). Candidates per lookup ~ ``lsh_tables * N / 2**lsh_bits``:
  raise ``lsh_bits`` (and tables) as N grows, ``lsh_bits ~ log2(N / 100)``.
- The embeddings themselves (the only large part: D x 2 bytes as float16) live in
  blocks of ``block_rows`` rows; with ``spill_dir`` set, each full block is written
  to ``spill_dir/block-NNNNNN.npy`` and memory-mapped, so RAM holds the postings
  (8 bytes x tables), ids and hashes (~150 bytes per representative), not the
  vectors; lookups read only the candidate rows. Only representatives are stored:
  duplicates cost nothing.
- Only kept clips are indexed (a blurry copy must not suppress a sharp one), and a
  resumed build seeds the index from the corpus (:func:`seed_from_corpus`: one index
  part at a time, its embeddings read from Arrow's buffers, every kept clip indexed as
  a representative without a lookup, bucket by bucket; ``benchmarks/dedup_bench.py``);
  a clip that meets its own id (a source rebuilt after a refilter) is not a duplicate.

The :class:`Dedup` stage wraps one index: it must run as a single actor (one global
index) after ``Decide``; rows it marks get ``dup_of``, status ``"rejected"`` and the
reason ``"duplicate"`` (``Decide`` reproduces that reason from ``dup_of``).

Example::

    index = DedupIndex(DedupConfig(threshold=0.95))
    index.add(["a", "b"], embeddings=np.eye(2, 8), hashes=["00ff00ff00ff00ff", None])
    # -> [None, None]
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.base import Batch, num_rows
from pipeline.stages.decide import DUPLICATE_REASON, list_cells
from pipeline.stages.score import object_column, require_columns

__all__ = [
    "Dedup",
    "DedupConfig",
    "DedupIndex",
    "embedding_matrix",
    "find_duplicates",
    "seed_from_corpus",
]

_HASH_BITS = 64
_CODE_ROWS = 8192  # embeddings projected at once for their LSH codes, per lookup batch
_SEED_ROWS = 65536  # representatives indexed at once (each bucket extended once per batch)


@dataclass(frozen=True)
class DedupConfig:
    """When two clips are duplicates, and how the index is laid out."""

    enabled: bool = True
    threshold: float = 0.95  # cosine of clip embeddings at/above which clips are near-duplicates
    hash_max_bits: int = 4  # frame_hash Hamming distance at/below which clips are the same
    lsh_bits: int = 12  # hyperplanes per LSH table (buckets per table: 2**lsh_bits)
    lsh_tables: int = 16
    block_rows: int = 65536  # representatives per embedding block
    spill_dir: str | None = None  # write full blocks here and memory-map them (beyond RAM)
    seed: int = 0  # of the LSH hyperplanes

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"dedup threshold must be a cosine in [-1, 1], got {self.threshold}")
        if not 0 <= self.hash_max_bits < 16:
            raise ValueError(f"hash_max_bits must be in [0, 16), got {self.hash_max_bits}")
        if not 1 <= self.lsh_bits <= 62 or self.lsh_tables < 1 or self.block_rows < 1:
            raise ValueError(f"bad LSH layout: {self}")


def _parse_hash(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
        return None
    return int(value, 16) if isinstance(value, str) else int(value)


def _as_vector(value: Any) -> np.ndarray | None:
    """A stored embedding cell (list, array, None) as a normalised float32 vector."""
    if value is None:
        return None
    vec = np.asarray(value, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vec))
    if vec.size == 0 or not np.isfinite(norm) or norm == 0:
        return None
    return vec / norm


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """A ``list<float>`` column (``clip_embedding``) as an ``(n, D)`` float32 matrix,
    built from Arrow's buffers without a Python object per value: a null or empty cell
    is a row of zeros and a null value NaN, both "no embedding" to :class:`DedupIndex`.
    None when the cells holding values differ in width, or for another type."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not all(pa.types.is_list(c.type) or pa.types.is_large_list(c.type) for c in chunks):
        return None
    lengths = [c.value_lengths().fill_null(0).to_numpy(zero_copy_only=False) for c in chunks]
    widths = {int(w) for n in lengths for w in np.unique(n[n > 0])}
    if len(widths) > 1:
        return None
    dim = widths.pop() if widths else 0
    out = np.zeros((len(column), dim), np.float32)
    row = 0
    for chunk, n in zip(chunks, lengths, strict=True):
        if dim:  # flatten() skips null cells and honours the chunk's offset
            values = chunk.flatten().to_numpy(zero_copy_only=False)
            out[row : row + len(chunk)][n > 0] = values.reshape(-1, dim)
        row += len(chunk)
    return out


def _extend_buckets(buckets: dict[int, array], keys: np.ndarray, reps: np.ndarray) -> None:
    """Append each of ``reps`` (ascending) to the bucket of its key, one call per key."""
    if not len(keys):
        return
    order = np.argsort(keys, kind="stable")
    keys, reps = keys[order], reps[order].astype(np.int64)
    uniq, starts = np.unique(keys, return_index=True)
    ends = [*starts[1:].tolist(), len(keys)]
    for key, a, b in zip(uniq.tolist(), starts.tolist(), ends, strict=True):
        buckets.setdefault(int(key), array("q")).frombytes(reps[a:b].tobytes())


# the index columns a dedup index is seeded from
SEED_COLUMNS = ("clip_id", "status", "dup_of", "frame_hash", "clip_embedding")


class DedupIndex:
    """Incremental duplicate finder over representatives (see the module docstring)."""

    def __init__(self, cfg: DedupConfig | None = None) -> None:
        self.cfg = cfg or DedupConfig()
        self.ids: list[str] = []
        self._hashes = array("Q")  # per representative (0 when it has none: never probed)
        # multi-index hashing: band -> band value -> representative rows
        width = _HASH_BITS // (self.cfg.hash_max_bits + 1)
        self._bands = [
            (b * width, _HASH_BITS if b == self.cfg.hash_max_bits else (b + 1) * width)
            for b in range(self.cfg.hash_max_bits + 1)
        ]
        self._hash_buckets: list[dict[int, array]] = [{} for _ in self._bands]
        # embeddings: LSH tables and float16 blocks, created at the first embedding
        self.dim: int | None = None
        self._planes: np.ndarray | None = None  # (tables * bits, D)
        self._lsh_buckets: list[dict[int, array]] = [{} for _ in range(self.cfg.lsh_tables)]
        self._blocks: list[np.ndarray] = []  # full blocks (in RAM or memory-mapped)
        self._tail = np.zeros((0, 0), np.float16)  # the block being filled
        self._tail_rows = 0
        self._emb_row = array("q")  # representative -> embedding row, -1 = none
        self._num_embedded = 0

    def __len__(self) -> int:
        """Number of representatives."""
        return len(self.ids)

    # -- hashes ------------------------------------------------------------------------

    def _band_values(self, h: int) -> list[int]:
        return [(h >> (_HASH_BITS - hi)) & ((1 << (hi - lo)) - 1) for lo, hi in self._bands]

    def _hash_match(self, h: int) -> int | None:
        seen: set[int] = set()
        for bucket, value in zip(self._hash_buckets, self._band_values(h), strict=True):
            for rep in bucket.get(value, ()):
                if rep in seen:
                    continue
                seen.add(rep)
                if (self._hashes[rep] ^ h).bit_count() <= self.cfg.hash_max_bits:
                    return rep
        return None

    # -- embeddings --------------------------------------------------------------------

    def _init_embeddings(self, dim: int) -> None:
        rng = np.random.default_rng(self.cfg.seed)
        self.dim = dim
        self._planes = rng.standard_normal((self.cfg.lsh_tables * self.cfg.lsh_bits, dim)).astype(
            np.float32
        )
        self._tail = np.zeros((self.cfg.block_rows, dim), np.float16)

    def _codes(self, vecs: np.ndarray) -> list[list[int]]:
        """The LSH bucket of each row of ``vecs`` (n, D) in every table."""
        assert self._planes is not None
        tables, bits = self.cfg.lsh_tables, self.cfg.lsh_bits
        signs = (vecs @ self._planes.T > 0).reshape(-1, tables, bits)
        weights = 1 << np.arange(bits, dtype=np.int64)
        return (signs.astype(np.int64) * weights).sum(axis=2).tolist()

    def _prepared(
        self, ids: Sequence[Any], embeddings: Sequence[Any] | np.ndarray
    ) -> Iterator[tuple[np.ndarray | None, list[int] | None]]:
        """Per item, its unit vector and LSH codes (None, None: no embedding), computed
        :data:`_CODE_ROWS` items at a time."""
        for lo in range(0, len(embeddings), _CODE_ROWS):
            part = slice(lo, lo + _CODE_ROWS)
            units, ok = self._unit_rows(list(ids[part]), embeddings[part])
            if units is None:
                yield from ((None, None) for _ in ok)
                continue
            codes = self._codes(units)
            yield from (
                (u, c) if good else (None, None)
                for u, c, good in zip(units, codes, ok, strict=True)
            )

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored embeddings (len(rows), D) float32 of embedding rows."""
        block_of, offset = np.divmod(rows, self.cfg.block_rows)
        out = np.empty((len(rows), self.dim or 0), np.float32)
        for b in np.unique(block_of):
            sel = block_of == b
            block = self._blocks[b] if b < len(self._blocks) else self._tail
            out[sel] = block[offset[sel]]  # a memory-mapped block reads only these rows
        return out

    def _embedding_match(self, vec: np.ndarray, codes: list[int]) -> int | None:
        cand: set[int] = set()
        for bucket, code in zip(self._lsh_buckets, codes, strict=True):
            cand.update(bucket.get(code, ()))
        if not cand:
            return None
        reps = np.fromiter(cand, dtype=np.int64)
        rows = np.asarray([self._emb_row[r] for r in reps], dtype=np.int64)
        sims = self._vectors(rows) @ vec  # (C,)
        best = int(np.argmax(sims))
        # float16 storage rounds cosines by ~1e-3: fine against thresholds like 0.95
        return int(reps[best]) if sims[best] >= self.cfg.threshold else None

    def _store_embedding(self, rep: int, vec: np.ndarray, codes: list[int]) -> None:
        if self._tail_rows == self.cfg.block_rows:
            self._seal_block()
        row = self._num_embedded
        self._tail[self._tail_rows] = vec
        self._tail_rows += 1
        self._num_embedded += 1
        self._emb_row[rep] = row
        for bucket, code in zip(self._lsh_buckets, codes, strict=True):
            bucket.setdefault(code, array("q")).append(rep)

    def _seal_block(self) -> None:
        block = self._tail
        if self.cfg.spill_dir:
            os.makedirs(self.cfg.spill_dir, exist_ok=True)
            path = os.path.join(self.cfg.spill_dir, f"block-{len(self._blocks):06d}.npy")
            np.save(path, block)
            block = np.load(path, mmap_mode="r")  # pages in only the rows lookups touch
        self._blocks.append(block)
        self._tail = np.zeros_like(self._tail)
        self._tail_rows = 0

    # -- the API -----------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[str],
        embeddings: Sequence[Any] | np.ndarray | None = None,
        hashes: Sequence[Any] | None = None,
    ) -> list[str | None]:
        """For each item in order: the id of the representative it duplicates, or None
        (then it becomes a representative). ``embeddings`` rows (any norm; None / zero /
        NaN = absent) and ``hashes`` (16 hex digits or int; None = absent) are optional;
        an item with neither is never a duplicate and is not indexed."""
        n = len(ids)
        embs: Sequence[Any] | np.ndarray = [None] * n if embeddings is None else embeddings
        hs: Sequence[Any] = [None] * n if hashes is None else hashes
        if len(embs) != n or len(hs) != n:
            raise ValueError(f"{n} ids but {len(embs)} embeddings and {len(hs)} hashes")
        return [
            self._add_one(str(i), v, _parse_hash(h), c)
            for i, (v, c), h in zip(ids, self._prepared(ids, embs), hs, strict=True)
        ]

    def add_representatives(
        self,
        ids: Sequence[str],
        embeddings: Sequence[Any] | np.ndarray | None = None,
        hashes: Sequence[Any] | None = None,
    ) -> int:
        """Index items known to be no duplicates of each other (a corpus's kept clips)
        without looking each one up, :data:`_SEED_ROWS` at a time, bucket by bucket:
        :meth:`add`'s arguments; returns how many items were indexed (those with an
        embedding or a hash)."""
        n = len(ids)
        embs: Sequence[Any] | np.ndarray = [None] * n if embeddings is None else embeddings
        hs: Sequence[Any] = [None] * n if hashes is None else hashes
        if len(embs) != n or len(hs) != n:
            raise ValueError(f"{n} ids but {len(embs)} embeddings and {len(hs)} hashes")
        added = 0
        for lo in range(0, n, _SEED_ROWS):
            part = slice(lo, lo + _SEED_ROWS)
            units, has_vec = self._unit_rows(list(ids[part]), embs[part])
            values = [_parse_hash(h) for h in hs[part]]
            has_hash = np.array([v is not None for v in values], bool)
            take = np.flatnonzero(has_vec | has_hash)
            first = len(self.ids)
            reps = np.arange(first, first + len(take), dtype=np.int64)
            chosen = take.tolist()
            self.ids.extend(str(ids[lo + i]) for i in chosen)
            hash_of = np.array([values[i] or 0 for i in chosen], np.uint64)
            self._hashes.frombytes(hash_of.tobytes())
            with_vec = has_vec[take]
            emb_rows = np.full(len(take), -1, np.int64)
            emb_rows[with_vec] = self._num_embedded + np.arange(int(with_vec.sum()))
            self._emb_row.frombytes(emb_rows.tobytes())
            hashed = has_hash[take]
            for bucket, band in zip(
                self._hash_buckets, self._bands_of(hash_of[hashed]), strict=True
            ):
                _extend_buckets(bucket, band, reps[hashed])
            if units is not None and with_vec.any():
                self._store_embeddings(reps[with_vec], units[take[with_vec]])
            added += len(take)
        return added

    def _unit_rows(
        self, ids: list[Any], embeddings: Sequence[Any] | np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Unit rows ``(n, D)`` of ``embeddings`` (None when none has a value) and which
        rows have one; the index takes its width from the first."""
        if isinstance(embeddings, np.ndarray) and embeddings.ndim == 2:
            m = embeddings.astype(np.float32, copy=False)
            norms = np.sqrt(np.einsum("ij,ij->i", m, m))  # no (n, D) temporary
            ok = np.isfinite(norms) & (norms > 0)
            units = m / np.where(ok, norms, 1)[:, None]
            units[~ok] = 0  # no NaN or inf reaches a projection
            for i in np.flatnonzero(ok)[:1]:
                self._check_width(str(ids[i]), units[i])
            return (units if ok.any() else None), ok
        vecs = [_as_vector(e) for e in embeddings]
        for clip_id, vec in zip(ids, vecs, strict=True):
            self._check_width(str(clip_id), vec)
        ok = np.array([v is not None for v in vecs], bool)
        if not ok.any():
            return None, ok
        units = np.zeros((len(vecs), self.dim or 0), np.float32)
        for i in np.flatnonzero(ok):
            units[i] = vecs[i]
        return units, ok

    def _bands_of(self, hashes: np.ndarray) -> list[np.ndarray]:
        """:meth:`_band_values` of many ``uint64`` hashes at once, band by band."""
        return [
            (hashes >> np.uint64(_HASH_BITS - hi)) & np.uint64((1 << (hi - lo)) - 1)
            for lo, hi in self._bands
        ]

    def _store_embeddings(self, reps: np.ndarray, units: np.ndarray) -> None:
        """:meth:`_store_embedding` of many new representatives, block by block (their
        ``_emb_row`` entries are the next rows already)."""
        done = 0
        while done < len(reps):
            if self._tail_rows == self.cfg.block_rows:
                self._seal_block()
            k = min(len(reps) - done, self.cfg.block_rows - self._tail_rows)
            self._tail[self._tail_rows : self._tail_rows + k] = units[done : done + k]
            self._tail_rows += k
            self._num_embedded += k
            done += k
        codes = np.asarray(self._codes(units), np.int64)
        for t, bucket in enumerate(self._lsh_buckets):
            _extend_buckets(bucket, codes[:, t], reps)

    def _check_width(self, clip_id: str, vec: np.ndarray | None) -> None:
        """ValueError naming the clip when ``vec`` has another width than the index,
        which takes its width from the first embedding."""
        if vec is None:
            return
        if self.dim is None:
            self._init_embeddings(len(vec))
        if len(vec) != self.dim:
            raise ValueError(f"clip {clip_id}: embedding width {len(vec)}, index has {self.dim}")

    def _add_one(
        self, clip_id: str, vec: np.ndarray | None, h: int | None, codes: list[int] | None
    ) -> str | None:
        if vec is None and h is None:
            return None
        if h is not None:
            rep = self._hash_match(h)
            if rep is not None:
                return self._name(rep, clip_id)
        if vec is not None and codes is not None:
            rep = self._embedding_match(vec, codes)
            if rep is not None:
                return self._name(rep, clip_id)
        self._insert(clip_id, vec, h, codes)
        return None

    def _insert(
        self, clip_id: str, vec: np.ndarray | None, h: int | None, codes: list[int] | None
    ) -> None:
        """``clip_id`` becomes a representative."""
        rep = len(self.ids)
        self.ids.append(clip_id)
        self._hashes.append(h or 0)
        self._emb_row.append(-1)
        if h is not None:
            for bucket, value in zip(self._hash_buckets, self._band_values(h), strict=True):
                bucket.setdefault(value, array("q")).append(rep)
        if vec is not None and codes is not None:
            self._store_embedding(rep, vec, codes)

    def _name(self, rep: int, clip_id: str) -> str | None:
        """The representative's id; None when it is this very clip (a source rebuilt on
        resume meets its own earlier row, seeded from the corpus)."""
        return None if self.ids[rep] == clip_id else self.ids[rep]

    def add_table(self, table: pa.Table) -> int:
        """Seed from index rows (:data:`SEED_COLUMNS`): every kept, non-duplicate row
        becomes a representative (:meth:`add_representatives`). Returns how many rows
        were indexed; a large index is read part by part (:func:`seed_from_corpus`)."""
        names = set(table.column_names)
        if not {"clip_id", "status"} <= names:
            return 0
        ids = table.column("clip_id")
        keep = pc.and_(pc.equal(table.column("status"), "kept"), pc.not_equal(ids, ""))
        if "dup_of" in names:
            keep = pc.and_(keep, pc.is_null(table.column("dup_of")))
        keep = pc.fill_null(keep, False)  # a null status or id: not a representative
        mask = keep.to_numpy(zero_copy_only=False)
        small = table.select([c for c in ("clip_id", "frame_hash") if c in names]).filter(keep)
        embeddings: Sequence[Any] | np.ndarray | None = None
        if "clip_embedding" in names:
            column = table.column("clip_embedding")
            matrix = embedding_matrix(column)  # the whole column: no filtered copy of it
            if matrix is None:
                embeddings = column.filter(keep).to_pylist()
            else:
                embeddings = matrix if mask.all() else matrix[mask]
        hashes = small.column("frame_hash").to_pylist() if "frame_hash" in names else None
        return self.add_representatives(small.column("clip_id").to_pylist(), embeddings, hashes)


def find_duplicates(
    ids: Sequence[str],
    embeddings: Sequence[Any] | np.ndarray | None = None,
    hashes: Sequence[Any] | None = None,
    cfg: DedupConfig | None = None,
) -> list[str | None]:
    """One-shot :meth:`DedupIndex.add` over a fresh index: first copy wins."""
    return DedupIndex(cfg).add(ids, embeddings, hashes)


def seed_from_corpus(index: DedupIndex, root: str) -> int:
    """Add the kept clips of the committed corpus at ``root`` (a resumed build), one
    index part at a time; 0 when there is no corpus yet. Returns how many
    representatives were added."""
    from pipeline.writer import iter_index_parts  # storage I/O only here, at actor start

    return sum(index.add_table(part) for part in iter_index_parts(root, SEED_COLUMNS))


class Dedup:
    """1:1, stateful: mark kept clips that duplicate an earlier kept clip.

    Must run as ONE actor over the whole stream (a single global index), after
    ``Decide`` (only kept clips compete) and before captioning (duplicates are
    never captioned or encoded). Rows it marks get ``dup_of``, status
    ``"rejected"`` and the reason ``"duplicate"``; every other row passes unchanged.
    """

    reads: tuple[str, ...] = ("clip_id", "status", "reasons", "clip_embedding", "frame_hash")
    writes: tuple[str, ...] = ("dup_of", "status", "reasons")

    def __init__(self, cfg: DedupConfig | None = None, corpus_root: str | None = None) -> None:
        self.cfg = cfg or DedupConfig()
        self.index = DedupIndex(self.cfg)
        if corpus_root is not None and self.cfg.enabled:
            seed_from_corpus(self.index, corpus_root)

    def __call__(self, batch: Batch) -> Batch:
        require_columns(batch, "dedup", ("clip_id", "status"))
        status = object_column(batch, "status")
        reasons = object_column(batch, "reasons")
        dup_of = object_column(batch, "dup_of")
        if not self.cfg.enabled:
            return {**batch, "dup_of": dup_of}
        rows = [i for i in range(num_rows(batch)) if status[i] == "kept" and dup_of[i] is None]
        embeddings = object_column(batch, "clip_embedding")
        hashes = object_column(batch, "frame_hash")
        found = self.index.add(
            [str(batch["clip_id"][i]) for i in rows],
            [embeddings[i] for i in rows],
            [hashes[i] for i in rows],
        )
        for i, rep in zip(rows, found, strict=True):
            if rep is not None:
                dup_of[i] = rep
                status[i] = "rejected"
                reasons[i] = [*(reasons[i] if reasons[i] is not None else ()), DUPLICATE_REASON]
        return {**batch, "dup_of": dup_of, "status": status, "reasons": list_cells(reasons)}
