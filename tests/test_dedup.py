"""Near-duplicates: the incremental index against brute force, its scaling knobs (LSH,
spilled blocks), the Dedup stage, and exact / near copies of generated clips found
through the real Score and CLIP stages."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from pipeline.stages.aesthetic import AestheticConfig, AestheticScorer
from pipeline.stages.base import rows_to_batch
from pipeline.stages.decide import Decide, DecideConfig
from pipeline.stages.dedup import (
    Dedup,
    DedupConfig,
    DedupIndex,
    embedding_matrix,
    find_duplicates,
)
from pipeline.stages.score import Score
from pipeline.tiny_clip import build_tiny_clip
from pipeline.video import encode_mp4
from schemas import CLIP_SCHEMA

DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def at_cosine(base: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly cosine ``cos`` from unit vector ``base``."""
    noise = rng.standard_normal(base.shape)
    ortho = unit(noise - (noise @ base) * base)
    return cos * base + math.sqrt(1 - cos**2) * ortho


def brute_force(ids: list[str], emb: np.ndarray, threshold: float) -> list[str | None]:
    """First-copy-wins greedy dedup by exhaustive cosine: the reference."""
    reps: list[int] = []
    out: list[str | None] = []
    for i, e in enumerate(emb):
        sims = [float(emb[r] @ e) for r in reps]
        best = int(np.argmax(sims)) if sims else -1
        if sims and sims[best] >= threshold:
            out.append(ids[reps[best]])
        else:
            reps.append(i)
            out.append(None)
    return out


def clustered(n_bases: int, copies: int, cos: float, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    bases = unit(rng.standard_normal((n_bases, DIM)))
    rows = [b for b in bases] + [at_cosine(b, cos, rng) for b in bases for _ in range(copies)]
    order = rng.permutation(len(rows))
    return [f"c{i}" for i in order], np.stack([rows[i] for i in order])


# --- the index ------------------------------------------------------------------------------


def test_embedding_threshold_and_first_copy_wins() -> None:
    rng = np.random.default_rng(1)
    a = unit(rng.standard_normal(DIM))
    near, far = at_cosine(a, 0.97, rng), at_cosine(a, 0.90, rng)
    index = DedupIndex(DedupConfig(threshold=0.95))
    assert index.add(["a", "near", "far"], np.stack([a, near, far])) == [None, "a", None]
    assert len(index) == 2  # duplicates are not stored
    # later calls see earlier representatives; any norm is fine
    assert index.add(["again"], [3.0 * a]) == ["a"]
    assert index.add(["far2"], [far.tolist()]) == ["far"]


def test_hash_within_max_bits_is_a_duplicate() -> None:
    h = 0x0123456789ABCDEF
    flips = [h ^ (1 << 3), h ^ 0b1111, h ^ 0b11111, h ^ (0b11111 << 40)]
    out = find_duplicates(
        ["h", "1bit", "4bits", "5bits", "5bits-far"],
        hashes=[f"{h:016x}", *(f"{x:016x}" for x in flips)],
        cfg=DedupConfig(hash_max_bits=4),
    )
    assert out == [None, "h", "h", None, None]


def test_hash_lookup_finds_every_pair_within_max_bits() -> None:
    """Multi-index hashing is exact: no pair within the bound is ever missed."""
    rng = np.random.default_rng(2)
    cfg = DedupConfig(hash_max_bits=4)
    index = DedupIndex(cfg)
    bases = [int(x) for x in rng.integers(0, 2**63, 300, dtype=np.int64)]
    assert index.add([f"b{i}" for i in range(300)], hashes=bases) == [None] * 300
    for i, base in enumerate(bases):
        bits = rng.choice(64, size=int(rng.integers(0, 5)), replace=False)
        flipped = base ^ sum(1 << int(b) for b in bits)
        assert index.add([f"q{i}"], hashes=[flipped]) == [f"b{i}"]


def test_either_signal_suffices_and_no_signal_never_matches() -> None:
    rng = np.random.default_rng(3)
    a, b = unit(rng.standard_normal((2, DIM)))
    out = find_duplicates(
        ["a", "same-hash", "same-emb", "none", "none2"],
        [a, b, a, None, None],
        ["00000000000000ff", "00000000000000ff", "ffff000000000000", None, None],
    )
    assert out == [None, "a", "a", None, None]


@pytest.mark.parametrize("cos", [0.97, 0.99])
def test_lsh_matches_brute_force(cos: float) -> None:
    ids, emb = clustered(n_bases=150, copies=2, cos=cos)
    # random 64-d bases are far apart (|cos| < 0.5): the only duplicates are the copies
    expected = brute_force(ids, emb, 0.95)
    got = DedupIndex(DedupConfig(threshold=0.95, lsh_bits=10, lsh_tables=16)).add(ids, emb)
    # the same clips are duplicates; the representative named may be any one above the
    # threshold (LSH verifies candidates, brute force takes the most similar)
    assert [x is None for x in got] == [x is None for x in expected]
    position = {cid: i for i, cid in enumerate(ids)}
    for i, rep in enumerate(got):
        if rep is not None:
            assert emb[position[rep]] @ emb[i] >= 0.95 - 1e-3  # float16 storage
    assert sum(x is not None for x in got) >= 150  # at least one per cluster of three


def test_spilled_blocks_are_memory_mapped_and_give_the_same_answers(tmp_path: Path) -> None:
    ids, emb = clustered(n_bases=40, copies=1, cos=0.98, seed=5)
    in_ram = DedupIndex(DedupConfig(block_rows=8)).add(ids, emb)
    cfg = DedupConfig(block_rows=8, spill_dir=str(tmp_path / "blocks"))
    index = DedupIndex(cfg)
    assert index.add(ids, emb) == in_ram
    files = sorted((tmp_path / "blocks").glob("block-*.npy"))
    assert len(files) == (len(index) - 1) // 8  # every full block went to disk
    assert all(isinstance(b, np.memmap) for b in index._blocks)
    # lookups against spilled rows still work
    assert index.add(["late"], [emb[0]]) == [in_ram[0] or ids[0]]


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="cosine"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="hash_max_bits"):
        DedupConfig(hash_max_bits=16)
    with pytest.raises(ValueError, match="width"):
        DedupIndex().add(["a", "b"], [np.ones(4), np.ones(5)])


def test_seed_from_table_takes_kept_representatives_only() -> None:
    rng = np.random.default_rng(6)
    a, b, c = unit(rng.standard_normal((3, DIM)))
    rows = [
        {"clip_id": "a", "status": "kept", "dup_of": None, "clip_embedding": a.tolist()},
        {"clip_id": "b", "status": "rejected", "dup_of": None, "clip_embedding": b.tolist()},
        {"clip_id": "c", "status": "kept", "dup_of": "a", "clip_embedding": c.tolist()},
        {"clip_id": "h", "status": "kept", "dup_of": None, "frame_hash": "00ff00ff00ff00ff"},
    ]
    table = pa.Table.from_pylist(rows, schema=pa.schema([CLIP_SCHEMA.field(k) for k in
                                 ("clip_id", "status", "dup_of", "clip_embedding", "frame_hash")]))  # fmt: skip
    index = DedupIndex()
    assert index.add_table(table) == 2
    assert index.add(["a2", "b2", "c2"], [a, b, c]) == ["a", None, None]
    assert index.add(["h2"], hashes=["00ff00ff00ff00fe"]) == ["h"]
    # a source rebuilt on resume meets its own seeded rows: not a duplicate of itself
    assert index.add(["a", "h"], [a, None], [None, "00ff00ff00ff00ff"]) == [None, None]


def test_embedding_matrix_reads_arrow_without_python_floats() -> None:
    """Null and empty cells become zero rows, null values NaN, a sliced chunk is read
    from its offset; cells of two widths (or another type) are left to the row path."""
    first = pa.array([[1.0, 2.0], None, [3.0, 4.0], [9.0, 9.0]], pa.list_(pa.float32()))
    second = pa.array([[], [5.0, None], [6.0, 7.0]], pa.list_(pa.float32()))
    column = pa.chunked_array([first.slice(1), second])
    m = embedding_matrix(column)
    assert m is not None and m.dtype == np.float32 and m.shape == (6, 2)
    np.testing.assert_array_equal(m[[0, 1, 2, 3, 5]], [[0, 0], [3, 4], [9, 9], [0, 0], [6, 7]])
    assert m[4, 0] == 5.0 and np.isnan(m[4, 1])
    assert embedding_matrix(pa.array([[1.0], [1.0, 2.0]], pa.list_(pa.float32()))) is None
    assert embedding_matrix(pa.array(["x"])) is None
    empty = embedding_matrix(pa.array([None, []], pa.list_(pa.float32())))
    assert empty is not None and empty.shape == (2, 0)
    # every one of those rows is "no embedding" to the index, as the row path says
    ids = [str(i) for i in range(6)]
    assert DedupIndex().add(ids, m) == DedupIndex().add(ids, column.to_pylist())


def test_array_and_row_inputs_agree_across_code_batches() -> None:
    """An (n, D) array is normalised and hashed in batches of rows; rows given one by
    one (lists, unnormalised) reach the same decisions, past a batch boundary."""
    ids, emb = clustered(300, 2, cos=0.97, seed=5)
    emb = emb * np.random.default_rng(1).uniform(0.5, 3.0, (len(emb), 1))  # any norm
    cfg = DedupConfig(threshold=0.95)
    with_batches = DedupIndex(cfg)
    import pipeline.stages.dedup as dedup_module

    old, dedup_module._CODE_ROWS = dedup_module._CODE_ROWS, 256  # 900 rows: four batches
    try:
        got = with_batches.add(ids, emb.astype(np.float32))
    finally:
        dedup_module._CODE_ROWS = old
    assert got == DedupIndex(cfg).add(ids, [list(map(float, e)) for e in emb])
    # the same items are duplicates as by exhaustive search (float16 storage may pick
    # another of two near-equal representatives)
    assert [r is None for r in got] == [r is None for r in brute_force(ids, unit(emb), 0.95)]


def test_representatives_are_indexed_without_lookups() -> None:
    """Seeding takes every given item as a representative, even two that would match
    each other; later items are looked up against all of them."""
    rng = np.random.default_rng(9)
    a = unit(rng.standard_normal(DIM))
    index = DedupIndex()
    assert index.add_representatives(["a", "a2", "none"], np.stack([a, a, np.zeros(DIM)])) == 2
    assert index.add_representatives(["h"], None, ["00ff00ff00ff00ff"]) == 1
    assert index.ids == ["a", "a2", "h"]
    assert index.add(["x", "h2"], [a, None], [None, "00ff00ff00ff00fe"]) in (
        ["a", "h"],
        ["a2", "h"],
    )
    with pytest.raises(ValueError, match="clip b: embedding width 5, index has 64"):
        index.add_representatives(["b"], [np.ones(5)])


def test_bulk_seeding_builds_the_index_the_row_path_builds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """add_representatives (in batches, bucket by bucket, across embedding blocks) gives
    the same index as adding the same non-duplicate items one by one: the same
    representatives, hashes, embedding rows, buckets and stored vectors."""
    import pipeline.stages.dedup as dedup_module

    rng = np.random.default_rng(11)
    n = 23
    emb: list[np.ndarray | None] = list(unit(rng.standard_normal((n, DIM))))
    hashes: list[str | None] = [f"{int(x):016x}" for x in rng.integers(0, 2**63, n)]
    for i in (2, 9):
        emb[i] = None  # hash only
    for i in (4, 9, 15):
        hashes[i] = None  # embedding only (9: neither, not indexed)
    ids = [f"c{i}" for i in range(n)]
    cfg = DedupConfig(block_rows=8)
    rows = DedupIndex(cfg)
    assert rows.add(ids, emb, hashes) == [None] * n
    monkeypatch.setattr(dedup_module, "_SEED_ROWS", 5)
    bulk = DedupIndex(cfg)
    assert bulk.add_representatives(ids, emb, hashes) == n - 1
    matrix = np.stack([np.zeros(DIM) if e is None else e * 3.0 for e in emb])
    bulk_array = DedupIndex(cfg)
    assert bulk_array.add_representatives(ids, matrix, hashes) == n - 1

    def layout(index: DedupIndex) -> tuple[object, ...]:
        buckets = [
            {k: list(v) for k, v in b.items()} for b in index._lsh_buckets + index._hash_buckets
        ]
        return (index.ids, list(index._hashes), list(index._emb_row), buckets)

    assert layout(bulk) == layout(rows) == layout(bulk_array)
    stored = [i._vectors(np.arange(i._num_embedded)) for i in (rows, bulk, bulk_array)]
    np.testing.assert_allclose(stored[1], stored[0], atol=1e-3)  # float16, rounded alike
    np.testing.assert_allclose(stored[2], stored[0], atol=1e-3)
    assert len(bulk._blocks) == 2  # 21 embeddings in blocks of 8
    # and it answers lookups alike
    probe = [emb[0], None, emb[20]]
    probe_hashes = [None, hashes[2], None]
    assert bulk.add(["x", "y", "z"], probe, probe_hashes) == ["c0", "c2", "c20"]


# --- the stage ------------------------------------------------------------------------------


def test_dedup_stage_marks_kept_copies_across_batches() -> None:
    rng = np.random.default_rng(7)
    a, b = unit(rng.standard_normal((2, DIM)))
    stage = Dedup(DedupConfig())
    first = stage(
        rows_to_batch(
            [
                {"clip_id": "blurry-a", "status": "rejected", "reasons": ["sharpness<20"],
                 "clip_embedding": a.tolist()},
                {"clip_id": "a", "status": "kept", "reasons": [], "clip_embedding": a.tolist()},
                {"clip_id": "a-copy", "status": "kept", "reasons": [],
                 "clip_embedding": (a * 2).tolist()},
                {"clip_id": None, "status": None, "reasons": None, "clip_embedding": None},
            ]
        )
    )  # fmt: skip
    # a rejected clip never becomes a representative, so the sharp copy is kept
    assert first["dup_of"].tolist() == [None, None, "a", None]
    assert first["status"].tolist() == ["rejected", "kept", "rejected", None]
    assert first["reasons"].tolist() == [["sharpness<20"], [], ["duplicate"], None]
    second = stage(
        rows_to_batch(
            [
                {"clip_id": "a-later", "status": "kept", "reasons": [], "clip_embedding": a},
                {"clip_id": "b", "status": "kept", "reasons": [], "clip_embedding": b},
            ]
        )
    )
    assert second["dup_of"].tolist() == ["a", None]
    # Decide reproduces the rejection from dup_of (a later Decide must not undo it)
    redecided = Decide(DecideConfig(thresholds={}))(second)
    assert redecided["status"].tolist() == ["rejected", "kept"]
    off = Dedup(DedupConfig(enabled=False))(second)
    assert off["status"].tolist() == ["rejected", "kept"]  # leaves marks alone


# --- on generated clips, through the real stages ---------------------------------------------


def smooth_clip(seed: int, w: int = 96, h: int = 64, frames: int = 8) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.float32)
    base = np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255)
    return np.stack([np.roll(base, 2 * i, axis=1) for i in range(frames)]).astype(np.uint8)


def test_exact_and_near_duplicates_across_sources(tmp_path: Path) -> None:
    original = smooth_clip(0)
    clips = {
        "a/orig": original,
        # an exact copy in another source, re-encoded at another size and quality
        "b/rescaled": np.stack([cv2.resize(f, (192, 128)) for f in original]),
        # a near copy: cropped a little and rescaled back (not the same frames)
        "c/cropped": np.stack([cv2.resize(f[2:-2, 3:-3], (96, 64)) for f in original]),
        "d/other": smooth_clip(1),
        "e/other": smooth_clip(2),
    }
    rows = [
        {"clip_id": name.replace("/", "-"), "source": name.split("/")[0], "status": None,
         "clip_bytes": encode_mp4(c, 8.0, crf=18 if i != 1 else 28)}
        for i, (name, c) in enumerate(clips.items())
    ]  # fmt: skip
    scored = Decide(DecideConfig(thresholds={}))(Score()(rows_to_batch(rows)))
    assert scored["status"].tolist() == ["kept"] * 5

    # without any model: the frame hash finds the exact copy only
    by_hash = Dedup(DedupConfig())(scored)
    assert by_hash["dup_of"].tolist() == [None, "a-orig", None, None, None]

    # with CLIP embeddings the near copy is found too. The tiny random CLIP squeezes all
    # images into a narrow cone (unrelated clips at cosine ~0.99), hence the strict
    # threshold here; real ViT-L/14 separates them far more (defaults: 0.95).
    tiny = build_tiny_clip(tmp_path / "clip")
    embedded = AestheticScorer(AestheticConfig(**tiny, num_frames=3, device="cpu"))(scored)
    emb = np.stack([np.asarray(e) for e in embedded["clip_embedding"]])
    sims = emb @ emb[0]
    assert sims[2] > 0.9985 > sims[3:].max(), sims
    both = Dedup(DedupConfig(threshold=0.9985))(embedded)
    assert both["dup_of"].tolist() == [None, "a-orig", "a-orig", None, None]
    assert both["reasons"].tolist() == [[], ["duplicate"], ["duplicate"], [], []]
