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
  resumed build seeds the index from the corpus (:func:`seed_from_corpus`); a clip
  that meets its own id (a source rebuilt after a refilter) is not a duplicate.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.stages.base import Batch, num_rows
from pipeline.stages.decide import DUPLICATE_REASON, list_cells
from pipeline.stages.score import object_column, require_columns

__all__ = ["Dedup", "DedupConfig", "DedupIndex", "find_duplicates", "seed_from_corpus"]

_HASH_BITS = 64


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

    def _codes(self, vec: np.ndarray) -> list[int]:
        assert self._planes is not None
        signs = (self._planes @ vec > 0).reshape(self.cfg.lsh_tables, self.cfg.lsh_bits)
        weights = 1 << np.arange(self.cfg.lsh_bits, dtype=np.int64)
        return (signs.astype(np.int64) * weights).sum(axis=1).tolist()

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
            self._add_one(str(i), _as_vector(e), _parse_hash(h))
            for i, e, h in zip(ids, embs, hs, strict=True)
        ]

    def _add_one(self, clip_id: str, vec: np.ndarray | None, h: int | None) -> str | None:
        if vec is None and h is None:
            return None
        if h is not None:
            rep = self._hash_match(h)
            if rep is not None:
                return self._name(rep, clip_id)
        codes: list[int] = []
        if vec is not None:
            if self.dim is None:
                self._init_embeddings(len(vec))
            if len(vec) != self.dim:
                raise ValueError(
                    f"clip {clip_id}: embedding width {len(vec)}, index has {self.dim}"
                )
            codes = self._codes(vec)
            rep = self._embedding_match(vec, codes)
            if rep is not None:
                return self._name(rep, clip_id)
        rep = len(self.ids)
        self.ids.append(clip_id)
        self._hashes.append(h or 0)
        self._emb_row.append(-1)
        if h is not None:
            for bucket, value in zip(self._hash_buckets, self._band_values(h), strict=True):
                bucket.setdefault(value, array("q")).append(rep)
        if vec is not None:
            self._store_embedding(rep, vec, codes)
        return None

    def _name(self, rep: int, clip_id: str) -> str | None:
        """The representative's id; None when it is this very clip (a source rebuilt on
        resume meets its own earlier row, seeded from the corpus)."""
        return None if self.ids[rep] == clip_id else self.ids[rep]

    def add_table(self, table: pa.Table) -> int:
        """Seed from index rows (:data:`SEED_COLUMNS`): every kept, non-duplicate row
        becomes a representative. Returns how many rows were added; read large indexes
        part by part."""
        names = set(table.column_names)
        col = {
            c: table.column(c).to_pylist() if c in names else [None] * table.num_rows
            for c in SEED_COLUMNS
        }
        keep = [
            i
            for i in range(table.num_rows)
            if col["status"][i] == "kept" and col["dup_of"][i] is None and col["clip_id"][i]
        ]
        self.add(
            [str(col["clip_id"][i]) for i in keep],
            [col["clip_embedding"][i] for i in keep],
            [col["frame_hash"][i] for i in keep],
        )
        return len(keep)


def find_duplicates(
    ids: Sequence[str],
    embeddings: Sequence[Any] | np.ndarray | None = None,
    hashes: Sequence[Any] | None = None,
    cfg: DedupConfig | None = None,
) -> list[str | None]:
    """One-shot :meth:`DedupIndex.add` over a fresh index: first copy wins."""
    return DedupIndex(cfg).add(ids, embeddings, hashes)


def seed_from_corpus(index: DedupIndex, root: str) -> int:
    """Add the kept clips of the committed corpus at ``root`` (a resumed build); 0 when
    there is no corpus yet. Returns how many representatives were added."""
    from pipeline.writer import read_index  # storage I/O only here, at actor start

    return index.add_table(read_index(root, columns=SEED_COLUMNS))


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
