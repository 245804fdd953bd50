"""Near-duplicate index at corpus scale: seeding from an index, and lookups vs exhaustive search.

A resumed build's dedup actor seeds its index with every kept clip of the corpus
(:func:`pipeline.stages.dedup.seed_from_corpus`), then looks up each new clip. On
``--reps`` random unit embeddings (``--dim`` wide, float32 in an Arrow
``list<float>`` column, as the index parquet stores ``clip_embedding``) this measures:

- seeding (:meth:`DedupIndex.add_table`: every kept clip indexed as a representative,
  bucket by bucket) against looking each one up as it is indexed (:meth:`DedupIndex.add`
  on the same rows, the row path) and against only reading the column into a matrix
  (:func:`embedding_matrix`, the floor); the peak RSS seeding adds, as a ratio to the
  column's bytes;
- ``--queries`` lookups (:meth:`DedupIndex.add`; half near copies of a seeded clip at
  cosine 0.97, half new clips) against exhaustive search (every query's cosine with
  every representative, float32 matrix products in blocks of queries): time per query,
  and recall / false matches of the LSH index against the exhaustive answer.
  Exhaustive search grows with the representatives; an LSH lookup with them too, as
  ``lsh_tables * N / 2**lsh_bits`` candidates (raise ``lsh_bits`` as N grows).

Goals: seeding <= 0.2x the row path and <= 3x the column's bytes in added memory;
recall >= 0.99 at the default LSH layout.

    python benchmarks/dedup_bench.py                       # 100k x 768, 2000 queries
    python benchmarks/dedup_bench.py --reps 1000000        # a million (about 3 GB of vectors)
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.dedup import DedupConfig, DedupIndex, embedding_matrix

COSINE = 0.97  # of a near copy to its original


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_table(emb: np.ndarray) -> pa.Table:
    """Index rows as a corpus stores them: kept, no duplicate mark, an embedding each."""
    n, dim = emb.shape
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    column = pa.ListArray.from_arrays(offsets, pa.array(emb.ravel()))
    return pa.table(
        {
            "clip_id": [f"rep-{i}" for i in range(n)],
            "status": pa.array(["kept"] * n),
            "dup_of": pa.nulls(n, pa.string()),
            "frame_hash": pa.nulls(n, pa.string()),
            "clip_embedding": column,
        }
    )


def queries(rng: np.random.Generator, reps: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` queries: the first half near copies of random representatives (their
    rows), the rest new random clips (-1)."""
    copies = n // 2
    of = rng.choice(len(reps), copies, replace=False)
    noise = unit_rows(rng, copies, reps.shape[1])
    noise -= (noise * reps[of]).sum(axis=1, keepdims=True) * reps[of]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    near = COSINE * reps[of] + np.sqrt(1 - COSINE**2) * noise
    q = np.concatenate([near, unit_rows(rng, n - copies, reps.shape[1])]).astype(np.float32)
    return q, np.concatenate([of, np.full(n - copies, -1)])


def exhaustive(reps: np.ndarray, q: np.ndarray, threshold: float) -> np.ndarray:
    """Per query, the best representative at or above ``threshold`` (-1: none)."""
    out = np.full(len(q), -1)
    for lo in range(0, len(q), 256):
        sims = q[lo : lo + 256] @ reps.T
        best = sims.argmax(axis=1)
        hit = sims[np.arange(len(best)), best] >= threshold
        out[lo : lo + 256] = np.where(hit, best, -1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=100_000, help="seeded representatives")
    p.add_argument("--dim", type=int, default=768, help="embedding width (ViT-L/14: 768)")
    p.add_argument("--queries", type=int, default=2000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    reps = unit_rows(rng, args.reps, args.dim)
    table = index_table(reps)
    column_mib = table.column("clip_embedding").nbytes / 2**20
    cfg = DedupConfig()

    t0 = time.perf_counter()
    matrix = embedding_matrix(table.column("clip_embedding"))
    read_s = time.perf_counter() - t0
    assert matrix is not None
    del matrix

    rows = DedupIndex(cfg)
    t0 = time.perf_counter()
    rows.add(table.column("clip_id").to_pylist(), reps)
    row_s = time.perf_counter() - t0
    del rows

    base = peak_rss_mib()
    index = DedupIndex(cfg)
    t0 = time.perf_counter()
    seeded = index.add_table(table)
    seed_s = time.perf_counter() - t0
    seed_mib = peak_rss_mib() - base
    assert seeded == args.reps

    q, truth_of = queries(rng, reps, args.queries)
    ids = [f"q-{i}" for i in range(len(q))]
    t0 = time.perf_counter()
    found = index.add(ids, q)
    lookup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = exhaustive(reps, q, cfg.threshold)
    exact_s = time.perf_counter() - t0

    got = np.array([-1 if f is None else int(f.split("-")[1]) for f in found])
    want = exact >= 0
    recall = float((got[want] >= 0).mean()) if want.any() else 1.0
    false = int(((got >= 0) & ~want).sum())
    print(f"{args.reps:,} representatives x {args.dim}, {len(q):,} queries "
          f"({want.sum():,} near copies by exhaustive search); LSH {cfg.lsh_tables} tables "
          f"x {cfg.lsh_bits} bits")  # fmt: skip
    rows = [
        ("read column into a matrix", read_s, None),
        ("seed by lookups (add)", row_s, None),
        ("seed index (add_table)", seed_s, f"{seed_s / row_s:.3f}x lookups (goal <= 0.2), "
         f"{seed_s / read_s:.1f}x read"),
        ("added peak RSS, seeding", None, f"{seed_mib:,.0f} MiB = "
         f"{seed_mib / column_mib:.2f}x the column's {column_mib:,.0f} MiB (goal <= 3)"),
        ("lookups, exhaustive", exact_s, f"{exact_s / len(q) * 1e3:.2f} ms/query"),
        ("lookups, index (add)", lookup_s, f"{lookup_s / len(q) * 1e3:.2f} ms/query = "
         f"{lookup_s / exact_s:.2f}x exhaustive"),
    ]  # fmt: skip
    print(f"{'measure':<28} {'s':>8}  ratio")
    for name, seconds, note in rows:
        print(f"{name:<28} {'' if seconds is None else f'{seconds:8.2f}':>8}  {note or ''}")
    copies = truth_of >= 0
    right = int((got[copies] == truth_of[copies]).sum())
    print(f"recall {recall:.4f} (goal >= 0.99), false matches {false}, "
          f"near copies matched to their own original {right:,} of {copies.sum():,}")  # fmt: skip


if __name__ == "__main__":
    main()
