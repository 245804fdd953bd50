"""pipeline.writer: exactly-once shards + parquet parts, on local folders and real S3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap
from typing import Any

import numpy as np
import pytest
import torch
import webdataset
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import schemas
from pipeline.stages.base import rows_to_batch
from pipeline.storage import is_s3, join, split_s3, storage_for
from pipeline.writer import CorpusWriter, WriteConfig, corpus_counts, read_index, read_sources


def latents_bytes(seed: int, shape: tuple[int, ...] = (4, 2, 3, 5)) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    tensor = torch.randn(*shape, generator=gen).to(torch.bfloat16)
    return st_save({schemas.TENSOR_LATENTS: tensor})


def src_facts(source: str, num_clips: int, status: str = "done", error: str | None = None) -> dict:
    return {
        "source": source,
        "src_status": status,
        "src_error": error,
        "src_duration_s": 4.0,
        "src_num_clips": num_clips,
        "src_num_frames": 96,
        "src_codec": "h264",
        "fps": 24.0,
        "width": 320,
        "height": 180,
    }


def clip(source: str, i: int, num_clips: int, status: str = "kept", **extra: Any) -> dict:
    cid = f"{source.replace('/', '_').replace('.', '_')}-{i}"
    row = {
        **src_facts(source, num_clips),
        "clip_id": cid,
        "status": status,
        "reasons": np.array(["too_dark"]) if status == "rejected" else np.array([], dtype=object),
        "error": "decode failed" if status == "error" else None,
        "start_s": float(i),
        "end_s": float(i + 1),
        "start_frame": 24 * i,
        "end_frame": 24 * (i + 1),
        "caption": f"caption of {cid}" if status == "kept" else None,
        "latent_shape": np.array([4, 2, 3, 5], dtype=np.int64) if status == "kept" else None,
        "num_tokens": 6 if status == "kept" else None,
        "clip_bytes": b"mp4 bytes, never persisted",
        "latents": latents_bytes(hash(cid) % 1000) if status == "kept" else b"",
        **{schemas.score_column(n): 0.5 for n in schemas.SCORE_NAMES},
    }
    row[schemas.score_column("aesthetic")] = float("nan")  # a signal that was not computed
    row.update(extra)
    return row


def placeholder(source: str, status: str = "error", error: str | None = "cannot open") -> dict:
    return {**src_facts(source, 0, status, error), "clip_id": None, "status": None}


def batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return rows_to_batch(rows, columns=schemas.STREAM_COLUMNS)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "corpus")
    return str(request.getfixturevalue("s3_bucket"))


def local_copy(root: str, tmp_path) -> str:
    """The corpus as a local folder, fetched with plain boto3 for S3 (no reelpack)."""
    if not is_s3(root):
        return root
    import boto3

    bucket, prefix = split_s3(root)
    s3 = boto3.client("s3")
    dest = tmp_path / "fetched"
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out = dest / obj["Key"][len(prefix) + 1 :]
            out.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(out))
    return str(dest)


def interleaved_stream() -> tuple[list[dict[str, np.ndarray]], dict[str, dict]]:
    a = [clip("/v/a.mp4", i, 3, s) for i, s in enumerate(["kept", "rejected", "kept"])]
    c = [clip("/v/c.mp4", i, 2, s) for i, s in enumerate(["error", "kept"])]
    b = placeholder("/v/b.mp4")
    d = placeholder("/v/d.mp4", status="done", error=None)  # decoded fine, no usable shot
    batches = [batch([a[0], c[0], b]), batch([a[1], d]), batch([c[1], a[2]])]
    clips = {r["clip_id"]: r for r in a + c}
    return batches, clips


def test_interleaved_stream_round_trip(root: str, tmp_path) -> None:
    batches, clips = interleaved_stream()
    writer = CorpusWriter(root, WriteConfig(shard_max_samples=2))
    for b in batches:
        writer.add(b)
    run = writer.close()
    writer.write_manifest({"vae": {"id": "tiny"}, "config": {"x": 1}})
    assert run == {
        "sources": 4,
        "sources_error": 1,
        "clips": 5,
        "clips_kept": 3,
        "clips_rejected": 1,
        "clips_error": 1,
        "shards": 2,
        "latent_tokens": 18,
    }

    index = read_index(root).to_pylist()
    assert sorted(r["clip_id"] for r in index) == sorted(clips)  # one row per clip
    by_id = {r["clip_id"]: r for r in index}
    for cid, row in by_id.items():
        assert (row["shard"] is not None) == (row["status"] == "kept"), cid
        assert math.isnan(row["score_aesthetic"]) and row["score_sharpness"] == 0.5
    assert by_id["_v_a_mp4-1"]["reasons"] == ["too_dark"]
    assert by_id["_v_a_mp4-0"]["latent_shape"] == [4, 2, 3, 5]
    sources = {r["source"]: r for r in read_sources(root).to_pylist()}
    assert (
        sources["/v/b.mp4"]["status"] == "error" and sources["/v/b.mp4"]["error"] == "cannot open"
    )
    assert sources["/v/d.mp4"]["num_clips"] == 0 and sources["/v/a.mp4"]["num_clips"] == 3
    assert writer.done_sources() == set(sources)

    local = local_copy(root, tmp_path)
    with open(os.path.join(local, schemas.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert manifest["counts"] == run and manifest["vae"] == {"id": "tiny"}
    assert manifest["schema_version"] == schemas.SCHEMA_VERSION

    # Plain webdataset reads the shards back.
    urls = sorted(
        os.path.join(local, schemas.SHARDS_DIR, n)
        for n in os.listdir(os.path.join(local, "shards"))
    )
    assert [os.path.basename(u) for u in urls] == ["shard-000000.tar", "shard-000001.tar"]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(
        cid for cid, r in clips.items() if r["status"] == "kept"
    )
    for s in samples:
        meta = json.loads(s[schemas.SAMPLE_META])
        assert meta["score_aesthetic"] is None  # strict JSON: NaN becomes null
        assert meta["shard"] == by_id[s["__key__"]]["shard"] and meta["key"] == s["__key__"]
        assert s[schemas.SAMPLE_CAPTION].decode() == clips[s["__key__"]]["caption"]
        got = st_load(s[schemas.SAMPLE_LATENTS])[schemas.TENSOR_LATENTS]
        want = st_load(clips[s["__key__"]]["latents"])[schemas.TENSOR_LATENTS]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_corpus_reads_without_reelpack(tmp_path) -> None:
    """pandas, duckdb and webdataset read the corpus in a process that cannot import reelpack."""
    root = str(tmp_path / "corpus")
    batches, _ = interleaved_stream()
    writer = CorpusWriter(root)
    for b in batches:
        writer.add(b)
    writer.close()
    script = textwrap.dedent(
        f"""
        import glob, json, sys
        import duckdb, pandas, webdataset
        root = {root!r}
        df = pandas.read_parquet(root + "/index")
        n = duckdb.sql(f"select count(*) from read_parquet('{{root}}/index/*.parquet')").fetchall()[0][0]
        kept = duckdb.sql(
            f"select count(*) from read_parquet('{{root}}/index/*.parquet') where status = 'kept'"
        ).fetchall()[0][0]
        keys = [s["__key__"] for s in webdataset.WebDataset(
            sorted(glob.glob(root + "/shards/*.tar")), shardshuffle=False)]
        leaked = [m for m in ("pipeline", "schemas", "reelpack") if m in sys.modules]
        print(json.dumps({{"rows": len(df), "n": n, "kept": kept, "keys": len(keys), "leaked": leaked}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "rows": 5,
        "n": 5,
        "kept": 3,
        "keys": 3,
        "leaked": [],
    }


def test_resume_cleans_leftovers_and_skips_done_sources(root: str) -> None:
    st = storage_for(root)
    writer = CorpusWriter(root, WriteConfig(shard_max_samples=1))
    writer.add(batch([clip("/v/a.mp4", 0, 1), clip("/v/b.mp4", 0, 1)]))
    assert writer.close()["shards"] == 2

    # A killed run: shard 2 and index part 2 were written, sources part 2 never was;
    # shard 3 was uploaded before the kill. Neither may ever become visible.
    shard0 = st.read(join(root, "shards", "shard-000000.tar"))
    st.write(join(root, "shards", "shard-000002.tar"), shard0)
    st.write(
        join(root, "index", "part-000002.parquet"),
        st.read(join(root, "index", "part-000000.parquet")),
    )
    st.write(join(root, "shards", "shard-000003.tar"), shard0)
    assert len(read_index(root)) == 2  # readers only see committed parts

    writer = CorpusWriter(root, WriteConfig(shard_max_samples=1))
    assert writer.done_sources() == {"/v/a.mp4", "/v/b.mp4"}
    assert st.list(join(root, "shards")) == [
        join(root, "shards", "shard-000000.tar"),
        join(root, "shards", "shard-000001.tar"),
    ]
    assert len(st.list(join(root, "index"))) == 2
    # The resumed stream repeats a done source: it is skipped, not written twice.
    writer.add(batch([clip("/v/a.mp4", 0, 1), clip("/v/c.mp4", 0, 1)]))
    assert writer.duplicates_skipped == 1
    assert writer.close()["clips"] == 1
    ids = read_index(root).column("clip_id").to_pylist()
    assert sorted(ids) == ["_v_a_mp4-0", "_v_b_mp4-0", "_v_c_mp4-0"]
    assert st.exists(join(root, "shards", "shard-000002.tar"))
    assert corpus_counts(root)["shards"] == 3


def test_incomplete_source_at_close_is_not_committed(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    writer = CorpusWriter(root)
    writer.add(batch([clip("/v/a.mp4", 0, 1), clip("/v/big.mp4", 0, 3)]))
    with pytest.raises(ValueError, match=r"/v/big.mp4.*1/3"):
        writer.close()
    assert CorpusWriter(root).done_sources() == {"/v/a.mp4"}
    assert read_index(root).column("source").to_pylist() == ["/v/a.mp4"]


def test_shard_rollover_by_size(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    max_bytes = 48 << 10
    writer = CorpusWriter(root, WriteConfig(shard_max_bytes=max_bytes))
    rows = [clip(f"/v/s{i}.mp4", 0, 1, latents=latents_bytes(i, (4, 3, 16, 16))) for i in range(12)]
    for i in range(0, len(rows), 5):
        writer.add(batch(rows[i : i + 5]))
    run = writer.close()
    shards = sorted((tmp_path / "corpus" / "shards").iterdir())
    assert run["shards"] == len(shards) >= 3
    for path in shards:
        assert path.stat().st_size <= max_bytes, path
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) % 3 == 0
    samples = list(webdataset.WebDataset([str(p) for p in shards], shardshuffle=False))
    assert len(samples) == 12


def test_unknown_column_is_rejected_up_front(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    writer = CorpusWriter(root)
    writer.add({})  # an empty block is fine
    writer.add(batch([]))
    bad = batch([clip("/v/a.mp4", 0, 1)])
    bad["aesthetics_score"] = np.array([1.0])
    with pytest.raises(ValueError, match="aesthetics_score"):
        writer.add(bad)
    assert writer.close()["sources"] == 0
    assert not os.path.exists(os.path.join(root, "index"))


def test_kept_clip_without_latents_becomes_an_error_row(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    writer = CorpusWriter(root)
    writer.add(batch([clip("/v/a.mp4", 0, 1, latents=b"")]))
    assert writer.close()["clips_error"] == 1
    (row,) = read_index(root).to_pylist()
    assert row["status"] == "error" and "without latents" in row["error"] and row["shard"] is None
    assert not os.path.exists(os.path.join(root, "shards"))
