"""inspect's row checks and its by-shard grouping, on index tables built here: every
problem a row can have is named, and kept rows become Python objects a shard at a time."""

from __future__ import annotations

import pyarrow as pa

from pipeline.inspect import _ByShard, _check_rows


def _index(rows: list[dict]) -> pa.Table:
    base = {
        "clip_id": None,
        "source": "/v/a.mp4",
        "status": "kept",
        "shard": "",
        "key": "",
        "num_tokens": 6,
        "latent_shape": [16, 1, 4, 6],
    }
    table = [{**base, **r} for r in rows]
    return pa.table(
        {
            "clip_id": pa.array([r["clip_id"] for r in table], pa.string()),
            "source": pa.array([r["source"] for r in table], pa.string()),
            "status": pa.array([r["status"] for r in table], pa.string()),
            "shard": pa.array([r["shard"] for r in table], pa.string()),
            "key": pa.array([r["key"] for r in table], pa.string()),
            "num_tokens": pa.array([r["num_tokens"] for r in table], pa.int64()),
            "latent_shape": pa.array([r["latent_shape"] for r in table], pa.list_(pa.int64())),
        }
    )


def _sources(counts: dict[str, int]) -> pa.Table:
    return pa.table({"source": list(counts), "num_clips": list(counts.values())})


def test_every_row_problem_is_named() -> None:
    s0, s1 = "shards/shard-000000.tar", "shards/shard-000001.tar"
    index = _index(
        [
            {"clip_id": "a", "shard": s1, "key": "k1"},
            {"clip_id": "b", "shard": s0, "key": "k0"},
            {"clip_id": "a", "shard": s0, "key": "k9"},  # a second row of clip a
            {"clip_id": "a", "status": "rejected"},  # and a third
            {"clip_id": "c", "status": "maybe"},
            {"clip_id": "d", "status": None},  # neither points at a sample
            {"clip_id": "d2", "status": None, "shard": s0, "key": "k7"},
            {"clip_id": "e", "status": "rejected", "shard": s0, "key": "k5"},
            {"clip_id": "f", "key": "k6"},  # kept without a shard
            {"clip_id": "g", "shard": s0, "key": "k0"},  # b's sample again
            {"clip_id": "h", "shard": s1, "key": "k2", "num_tokens": 7},
            {"clip_id": "i", "shard": s1, "key": "k3", "latent_shape": None, "num_tokens": None},
            {"clip_id": "j", "source": "/v/b.mp4", "status": "rejected"},
        ]
    )
    problems: list[str] = []
    live = _check_rows(index, _sources({"/v/a.mp4": 12, "/v/c.mp4": 0}), [1, 2, 2], problems)
    assert sorted(problems) == sorted(
        [
            "clip a: more than one index row",
            "clip a: more than one index row",
            "clip c: unknown status 'maybe'",
            "clip d: unknown status None",
            "clip d2: unknown status None",
            "clip d2: status None but points at a sample",
            "clip e: status rejected but points at a sample",
            "clip f: kept but has no shard/key (needs a rebuild)",
            f"clip g: sample {s0}:k0 claimed twice",
            "clip h: num_tokens 7 does not match latent_shape [16, 1, 4, 6] at patch [1, 2, 2]",
            "source /v/b.mp4: has index rows but no committed source row",
        ]
    )
    # the kept rows that point at a sample, by shard; of two rows with one sample, the
    # later (as the writer's latest part wins)
    assert set(live.spans) == {s0, s1}
    assert {k: r["clip_id"] for k, r in live.rows(s0).items()} == {"k0": "g", "k9": "a"}
    assert sorted(live.rows(s1)) == ["k1", "k2", "k3"]
    assert live.keys(s1) == {"k1", "k2", "k3"} and live.num_keys(s0) == 2
    assert live.rows("shards/shard-000002.tar") == {} and live.num_keys("nowhere") == 0


def test_a_source_whose_clip_count_differs_is_named() -> None:
    index = _index([{"clip_id": "a", "status": "rejected"}, {"clip_id": "b", "status": "error"}])
    problems: list[str] = []
    _check_rows(index, _sources({"/v/a.mp4": 3}), None, problems)
    assert problems == ["source /v/a.mp4: num_clips 3 but 2 index rows"]


def test_grouping_keeps_each_shards_row_order_and_reads_null_shards_as_empty() -> None:
    shards = ["s2", "s1", None, "s2", "s1", "s2", ""]
    table = pa.table({"shard": shards, "key": [f"k{i}" for i in range(len(shards))]})
    grouped = _ByShard(table)
    assert list(grouped.spans) == ["", "s1", "s2"]
    assert list(grouped.rows("s2")) == ["k0", "k3", "k5"]
    assert list(grouped.rows("s1")) == ["k1", "k4"]
    assert grouped.keys("") == {"k2", "k6"}
    assert _ByShard(table.slice(0, 0)).spans == {}
