"""pipeline.writer: exactly-once shards + parquet parts, on local folders and real S3."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import schemas
from pipeline.inspect import inspect_corpus
from pipeline.stages.base import rows_to_batch
from pipeline.storage import is_s3, join, split_s3, storage_for
from pipeline.writer import (
    CorpusWriter,
    WriteConfig,
    corpus_counts,
    read_index,
    read_sources,
    rewrite_sources_rows,
    sources_needing_work,
)


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
        # probe facts; src_start_s differs from every clip's start_s on purpose
        "src_container": "mov,mp4,m4a,3gp,3g2,mj2",
        "src_media_kind": "video",
        "src_coded_width": 180,
        "src_coded_height": 320,
        "src_sar": 1.0,
        "src_rotation_deg": 90,
        "src_vfr": False,
        "src_start_s": 1.075,
        "src_num_frames_exact": False,
        "src_has_audio": True,
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
    # every probe fact lands in the sources column of the same name without "src_"
    for name in schemas.SOURCE_SCHEMA.names:
        if name not in ("source", "status", "error", "num_clips"):
            want = src_facts("/v/a.mp4", 3).get(f"src_{name}", src_facts("/v/a.mp4", 3).get(name))
            assert sources["/v/a.mp4"][name] == want, name
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
    writer.unlock()
    with CorpusWriter(root) as again:
        assert again.done_sources() == {"/v/a.mp4"}
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


# --- latest part wins, refilter support --------------------------------------------------------


def _small_corpus(root: str) -> None:
    writer = CorpusWriter(root, WriteConfig(shard_max_samples=2))
    writer.add(batch([clip("/v/a.mp4", i, 2) for i in range(2)] + [clip("/v/b.mp4", 0, 1)]))
    writer.add(batch([clip("/v/c.mp4", 0, 2, "rejected"), clip("/v/c.mp4", 1, 2)]))
    writer.close()
    writer.write_manifest({"vae": {"id": "tiny"}, "patch_size": [1, 1, 1]})


def test_rewrite_rows_latest_part_wins(root: str) -> None:
    _small_corpus(root)
    before = {r["clip_id"]: r for r in read_index(root).to_pylist()}
    assert corpus_counts(root)["clips_kept"] == 4 and sources_needing_work(root) == set()

    # A refilter: a's first clip becomes rejected, c's rejected clip becomes kept.
    a = [dict(before["_v_a_mp4-0"], status="rejected", reasons=["too_dark"]), before["_v_a_mp4-1"]]
    c = [dict(before["_v_c_mp4-0"], status="kept", reasons=[]), before["_v_c_mp4-1"]]
    part = rewrite_sources_rows(root, {"/v/a.mp4": a, "/v/c.mp4": c})
    assert part == 2  # after parts 0 and 1 of the build; no new shard
    assert len(storage_for(root).list(join(root, "shards"))) == 2

    after = {r["clip_id"]: r for r in read_index(root).to_pylist()}
    assert sorted(after) == sorted(before)  # one row per clip: the latest
    assert after["_v_a_mp4-0"]["status"] == "rejected" and after["_v_a_mp4-0"]["shard"] is None
    assert after["_v_a_mp4-1"]["shard"] == before["_v_a_mp4-1"]["shard"]  # still live
    assert after["_v_c_mp4-0"]["status"] == "kept" and after["_v_c_mp4-0"]["key"] is None
    assert len(read_index(root, include_superseded=True)) == 5 + 4
    # a reader that needs a few columns gets those (and the source), same rows, latest wins
    few = read_index(root, columns=["status", "clip_id"])
    assert few.column_names == ["clip_id", "source", "status"]
    assert sorted(zip(few["clip_id"].to_pylist(), few["status"].to_pylist(), strict=True)) == (
        sorted((k, r["status"]) for k, r in after.items())
    )
    assert read_index(root, columns=["clip_embedding"]).num_rows == 5
    assert len(read_sources(root)) == 3 and len(read_sources(root, include_superseded=True)) == 5
    counts = corpus_counts(root)
    assert (counts["clips"], counts["clips_kept"], counts["clips_rejected"]) == (5, 4, 1)
    assert counts["latent_tokens"] == 3 * 6  # the kept clip without a sample has no tokens yet

    # c has a kept clip without a sample: a build must redo it, and the writer accepts it.
    assert sources_needing_work(root) == {"/v/c.mp4"}
    writer = CorpusWriter(root, WriteConfig(shard_max_samples=2))
    assert writer.done_sources() == {"/v/a.mp4", "/v/b.mp4"}
    writer.add(batch([clip("/v/c.mp4", 0, 2), clip("/v/c.mp4", 1, 2), clip("/v/a.mp4", 0, 2)]))
    assert writer.duplicates_skipped == 1  # a is done: skipped
    writer.close()
    assert sources_needing_work(root) == set()
    final = {r["clip_id"]: r for r in read_index(root).to_pylist()}
    assert final["_v_c_mp4-0"]["shard"] == "shards/shard-000003.tar"
    assert final["_v_a_mp4-0"]["status"] == "rejected"  # the refilter's decision stays
    assert corpus_counts(root)["clips_kept"] == 4


def test_readers_read_each_index_part_once_and_only_the_columns_they_need(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sources alone read no index part; inspect and refilter, which need the live rows
    and the history, read each part once; nobody but refilter reads the embeddings."""
    import pipeline.writer
    from pipeline.refilter import refilter
    from pipeline.stages.decide import DecideConfig

    root = str(tmp_path / "corpus")
    _small_corpus(root)
    before = {r["clip_id"]: r for r in read_index(root).to_pylist()}
    rewrite_sources_rows(root, {"/v/a.mp4": [before["_v_a_mp4-0"], before["_v_a_mp4-1"]]})
    parts = sorted(p.name for p in (tmp_path / "corpus" / schemas.INDEX_DIR).glob("*.parquet"))
    assert len(parts) == 3
    reads: list[tuple[str, int, frozenset[str] | None]] = []
    real = pipeline.writer._read_part

    def counted(st, root, directory, n, schema, columns=None):  # type: ignore[no-untyped-def]
        reads.append((directory, n, None if columns is None else frozenset(columns)))
        return real(st, root, directory, n, schema, columns)

    monkeypatch.setattr(pipeline.writer, "_read_part", counted)

    def index_reads() -> list[tuple[int, frozenset[str] | None]]:
        out = [(n, cols) for d, n, cols in reads if d == schemas.INDEX_DIR]
        reads.clear()
        return out

    assert len(read_sources(root)) == 3 and index_reads() == []
    report = inspect_corpus(root)  # (its rows' token counts do not fit the patch)
    assert report.stats["parts"] == 3 and report.stats["superseded_rows"] == 2
    checked = index_reads()
    assert sorted(n for n, _ in checked) == [0, 1, 2]
    assert all(cols is not None and "clip_embedding" not in cols for _, cols in checked)
    # and no score: its rows become Python dicts, so only the columns its checks read
    assert not any(c.startswith("score_") for _, cols in checked for c in cols or ())
    from pipeline.writer import read_committed

    live, sources, history = read_committed(root, ["status"], ["shard", "key"], history=True)
    assert sorted(n for n, _ in index_reads()) == [0, 1, 2]
    assert live.column_names == ["source", "status"] and live.num_rows == 5
    assert history is not None and history.column_names == ["source", "shard", "key"]
    assert history.num_rows == 7 and sources.num_rows == 3
    assert read_index(root, include_superseded=True).num_rows == 7
    bare = read_index(root, columns=())  # no column asked for: the rows, by source
    assert bare.column_names == ["source"] and bare.num_rows == 5
    whole, committed = read_index(root), read_committed(root).index
    assert whole.schema == committed.schema == schemas.CLIP_SCHEMA
    assert whole.drop_columns(schemas.score_column("aesthetic")).equals(  # NaN != NaN
        committed.drop_columns(schemas.score_column("aesthetic"))
    )
    index_reads()
    summary = refilter(root, DecideConfig(), dry_run=True)
    assert summary["clips"] == 5
    # the live rows whole, once; the rewrite and the work check read only what they need
    assert sorted(n for n, _ in index_reads()) == [0, 1, 2]


def test_a_part_written_before_a_column_existed_reads_it_as_nulls(tmp_path) -> None:
    """Whole or a few columns at a time: a column an older part lacks comes back null."""
    import pyarrow.parquet as pq

    root = str(tmp_path / "corpus")
    _small_corpus(root)
    for part in sorted((tmp_path / "corpus" / schemas.INDEX_DIR).glob("*.parquet")):
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(["caption_short", "latents_crc32"]), part)
    for index in (read_index(root), read_index(root, columns=["caption_short", "status"])):
        assert index.num_rows == 5 and index["caption_short"].null_count == 5
        assert index["status"].to_pylist().count("kept") == 4


def test_inspect_names_a_root_that_is_no_folder(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    _small_corpus(root)
    # a file:// URI is its folder: the same checks find the same things
    assert inspect_corpus(f"file://{root}").problems == inspect_corpus(root).problems
    assert inspect_corpus(root).stats["samples"] == 4
    assert inspect_corpus(str(tmp_path / "nowhere")).problems == ["no such folder"]
    (tmp_path / "corpus.tar").write_bytes(b"")
    assert inspect_corpus(str(tmp_path / "corpus.tar")).problems == ["a file, not a corpus"]


def test_rewrite_refuses_what_does_not_fit(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    _small_corpus(root)
    rows = {r["clip_id"]: r for r in read_index(root).to_pylist()}
    with pytest.raises(ValueError, match="not a committed source"):
        rewrite_sources_rows(root, {"/v/zzz.mp4": []})
    forged = dict(rows["_v_b_mp4-0"], key="_v_a_mp4-0")  # a sample b never had
    with pytest.raises(ValueError, match="no committed part wrote"):
        rewrite_sources_rows(root, {"/v/b.mp4": [forged]})
    with pytest.raises(ValueError, match="given for"):
        rewrite_sources_rows(root, {"/v/b.mp4": [rows["_v_a_mp4-0"]]})
    assert len(read_index(root, include_superseded=True)) == 5  # nothing written


def test_unsafe_clip_ids_never_become_member_names(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    for bad in ("../evil", "/abs", "a.b", "", "x" * 200, "sp ace"):
        writer = CorpusWriter(root)
        with pytest.raises(ValueError, match="cannot be a shard key"):
            writer.add(batch([clip("/v/a.mp4", 0, 1, clip_id=bad)]))
        writer.abort()
    assert not os.path.exists(os.path.join(root, "shards"))


def test_recover_removes_temp_files_and_unfinished_uploads(root: str) -> None:
    _small_corpus(root)
    st = storage_for(root)
    if is_s3(root):
        import boto3

        bucket, prefix = split_s3(root)
        s3 = boto3.client("s3")
        s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/shards/shard-000002.tar")

        def uploads() -> list:
            resp = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/")
            return resp.get("Uploads", [])

        assert len(uploads()) == 1
    else:
        leftover = join(root, "shards", ".shard-000002.tar.tmp-0123abcd")
        with open(leftover, "wb") as f:
            f.write(b"half a tar")
    CorpusWriter(root).unlock()  # opening cleans up
    if is_s3(root):
        assert uploads() == []
    else:
        assert not os.path.exists(leftover)
    assert len(st.list(join(root, "shards"))) == 2


def test_local_shard_is_hidden_until_commit(tmp_path) -> None:
    root = str(tmp_path / "corpus")
    writer = CorpusWriter(root, WriteConfig(shard_max_samples=3))
    writer.add(batch([clip("/v/a.mp4", 0, 1)]))
    names = os.listdir(os.path.join(root, "shards"))
    assert len(names) == 1 and names[0].startswith(".shard-000000.tar.tmp-")
    writer.close()
    assert os.listdir(os.path.join(root, "shards")) == ["shard-000000.tar"]


def test_manifest_names_the_package_version(tmp_path) -> None:
    import importlib.metadata

    root = str(tmp_path / "corpus")
    _small_corpus(root)
    with open(os.path.join(root, schemas.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert manifest["reelpack_version"] == importlib.metadata.version("reelpack")


_KILL_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from safetensors.numpy import save
    from pipeline.writer import CorpusWriter, WriteConfig
    writer = CorpusWriter({root!r}, WriteConfig(shard_max_samples=2))
    for i in range(4):
        col = lambda *v: np.array(list(v), dtype=object)
        writer.add({{
            "source": col(f"/v/s{{i}}.mp4", f"/v/s{{i}}.mp4"),
            "clip_id": col(f"_v_s{{i}}_mp4-0", f"_v_s{{i}}_mp4-1"),
            "status": col("kept", "kept"),
            "caption": col(f"clip {{i}} 0", f"clip {{i}} 1"),
            "latent_shape": col([4, 1, 2, i + 1], [4, 1, 2, i + 1]),
            "latents": col(*[save({{"latents": np.full((4, 1, 2, i + 1), j, np.float32)}})
                             for j in range(2)]),
            "src_status": col("done", "done"),
            "src_num_clips": np.array([2, 2]),
        }})
    writer.close()
    writer.write_manifest({{"vae": {{"id": "tiny"}}, "patch_size": [1, 1, 1]}})
    """
)


@pytest.mark.parametrize(
    ("where", "event"),
    [
        ("local", "sample:3"),
        ("local", "shard:2"),
        ("local", "index:2"),
        ("local", "sources:2"),
        ("local", "manifest"),
        ("s3", "shard:2"),
        ("s3", "index:1"),
    ],
)
def test_kill_hook_then_resume_equals_uninterrupted(
    where: str, event: str, request, tmp_path
) -> None:
    """A writer process SIGKILLed at each commit step, then resumed, gives the same corpus."""
    root = str(tmp_path / "corpus") if where == "local" else request.getfixturevalue("s3_bucket")
    script = _KILL_SCRIPT.format(root=root)
    env = dict(os.environ, REELPACK_TEST_KILL_AFTER=event)
    killed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr.decode()
    # readers never see more than what was committed before the kill
    committed = read_index(root).column("clip_id").to_pylist()
    assert len(committed) == len(set(committed)) <= 8
    env.pop("REELPACK_TEST_KILL_AFTER")
    resumed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr.decode()
    rows = read_index(root).to_pylist()
    assert sorted(r["clip_id"] for r in rows) == sorted(
        f"_v_s{i}_mp4-{j}" for i in range(4) for j in range(2)
    )
    local = local_copy(root, tmp_path)
    names = sorted(os.listdir(os.path.join(local, "shards")))
    assert all(n.startswith("shard-") for n in names)  # no temporary leftovers
    samples = list(
        webdataset.WebDataset([os.path.join(local, "shards", n) for n in names], shardshuffle=False)
    )
    assert sorted(s["__key__"] for s in samples) == sorted(r["clip_id"] for r in rows)
    by_key = {r["key"]: r for r in rows}
    for s in samples:
        z = st_load(s[schemas.SAMPLE_LATENTS])[schemas.TENSOR_LATENTS]
        assert list(z.shape) == by_key[s["__key__"]]["latent_shape"]
        assert z.flatten()[0].item() == int(s["__key__"][-1])  # the right sample's bytes
        assert s[schemas.SAMPLE_CAPTION].decode() == by_key[s["__key__"]]["caption"]


def test_streamed_chunks_complete_on_the_row_with_the_count(tmp_path) -> None:
    """A long source reaches the writer in chunks: rows without ``src_num_clips`` until
    its last chunk, whose rows carry the count and the final source facts; in any order."""
    rows = [clip("/v/long.mp4", i, 4) for i in range(4)]
    for r in rows[:3]:
        r["src_num_clips"] = None
        r["src_num_frames"] = 80  # the probe's estimate, before decoding finished
    rows[3]["src_num_frames"] = 96
    w = CorpusWriter(str(tmp_path / "c"), WriteConfig(shard_max_samples=100))
    w.add(batch([rows[3], rows[0]]))  # the last chunk may arrive first
    w.add(batch([rows[1]]))
    assert w._pending, "complete before every row arrived"
    w.add(batch([rows[2], rows[1]]))  # a retried chunk's rows are skipped
    assert not w._pending and w.duplicates_skipped == 1
    w.close()
    (src,) = read_sources(str(tmp_path / "c")).to_pylist()
    assert (src["num_clips"], src["num_frames"], src["status"]) == (4, 96, "done")
    assert read_index(str(tmp_path / "c")).num_rows == 4


def test_source_failing_after_streamed_chunks_is_one_error_row(tmp_path) -> None:
    rows = [clip("/v/bad.mp4", i, 3) for i in range(3)]
    for r in rows[:2]:
        r["src_num_clips"] = None
    rows[2].update(src_status="error", src_error="/v/bad.mp4: split failed: corrupt data")
    w = CorpusWriter(str(tmp_path / "c"), WriteConfig())
    w.add(batch(rows))
    w.close()
    (src,) = read_sources(str(tmp_path / "c")).to_pylist()
    assert src["status"] == "error" and "corrupt data" in src["error"]
    assert read_index(str(tmp_path / "c")).num_rows == 0
    assert not list((tmp_path / "c" / "shards").glob("*.tar"))


def test_part_committed_after_the_commit_interval(tmp_path, monkeypatch) -> None:
    """Finished sources are committed at least every ``commit_interval_s``, full shard
    or not, so a crashed driver loses little work."""
    now = [1000.0]
    monkeypatch.setattr("pipeline.writer.time.monotonic", lambda: now[0])
    root = str(tmp_path / "c")
    w = CorpusWriter(root, WriteConfig(commit_interval_s=60.0))
    w.add(batch([clip("/v/a.mp4", 0, 1)]))
    now[0] += 30.0
    w.add(batch([clip("/v/b.mp4", 0, 1)]))
    assert read_index(root).num_rows == 0  # 30 s after the part's first source: waits
    now[0] += 31.0
    w.add(batch([clip("/v/c.mp4", 0, 1)]))
    assert {r["source"] for r in read_index(root).to_pylist()} == {
        "/v/a.mp4",
        "/v/b.mp4",
        "/v/c.mp4",
    }
    w.add(batch([clip("/v/d.mp4", 0, 1)]))  # a new part: its own clock
    now[0] += 59.0
    w.add(batch([clip("/v/e.mp4", 0, 1)]))
    assert read_index(root).num_rows == 3
    w.close()
    assert read_index(root).num_rows == 5


def test_close_can_drop_incomplete_sources(tmp_path) -> None:
    w = CorpusWriter(str(tmp_path / "c"))
    w.add(batch([clip("/v/a.mp4", 0, 1), clip("/v/b.mp4", 0, 2)]))  # b: 1 of 2 rows
    with pytest.raises(ValueError, match=r"incomplete sources .*/v/b\.mp4"):
        w.close()
    w = CorpusWriter(str(tmp_path / "e"))
    w.add(batch([clip("/v/a.mp4", 0, 1), clip("/v/b.mp4", 0, 2)]))
    assert w.close(drop_incomplete=True)["sources"] == 1
    with CorpusWriter(str(tmp_path / "e")) as again:
        assert again.done_sources() == {"/v/a.mp4"}


def test_clip_files_of_kept_clips(root: str, tmp_path) -> None:
    """With ``clip_files`` each kept clip's payload is also ``clips/<key>.mp4``; other
    clips get none, and a kept clip without its payload becomes an error row."""
    rows = [clip("/v/a.mp4", i, 3, s) for i, s in enumerate(["kept", "rejected", "kept"])]
    for i, r in enumerate(rows):
        r["clip_bytes"] = f"payload {i}".encode()
    rows[2]["clip_bytes"] = None
    w = CorpusWriter(root, WriteConfig(clip_files=True))
    w.add(batch(rows))
    w.close()
    w.write_manifest({"config": {"write": {"clip_files": True}}})
    by_id = {r["clip_id"]: r for r in read_index(root).to_pylist()}
    assert by_id[rows[2]["clip_id"]]["status"] == "error"
    assert "without its clip payload" in by_id[rows[2]["clip_id"]]["error"]
    local = local_copy(root, tmp_path)
    files = sorted(p.name for p in (Path(local) / schemas.CLIPS_DIR).iterdir())
    kept = by_id[rows[0]["clip_id"]]
    assert files == [f"{kept['key']}.mp4"]
    assert (Path(local) / schemas.clip_file(kept["key"])).read_bytes() == b"payload 0"
    report = inspect_corpus(root)  # (this manifest lacks a VAE: only clip checks matter)
    assert report.stats["clip_files"] == 1 and not any("clips/" in p for p in report.problems)
    if not is_s3(root):  # a lost clip file is a problem inspect names
        os.remove(Path(root) / schemas.clip_file(kept["key"]))
        assert any("is missing" in p for p in inspect_corpus(root).problems)


_FULL_DISK_SCRIPT = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
from test_writer import batch, clip
from pipeline.writer import CorpusWriter

writer = CorpusWriter(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
try:
    writer.add(batch([clip("/v/a.mp4", 0, 1)]))
    writer.close()
except OSError as e:
    writer.abort()
    print("failed:", e)
finally:
    writer.unlock()
from pipeline.storage import LocalStorage
try:
    LocalStorage().write(sys.argv[1] + "/big.bin", bytes(4096))
except OSError as e:
    print("write failed:", e)
"""


def test_a_failed_shard_write_names_the_shard_and_leaves_no_partial_file(tmp_path) -> None:
    """A write that the file system refuses (here a file size limit, as a full disk
    refuses one) names the shard, and aborting removes its partial file."""
    root = tmp_path / "corpus"
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(root), os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "failed: [Errno 27] File too large" in out.stdout, out.stdout
    assert str(root / "shards" / ".shard-000000.tar.tmp-") in out.stdout
    assert os.listdir(root / "shards") == []
    assert read_sources(str(root)).num_rows == 0  # nothing committed, nothing half-written
    # any atomic write names the file it was writing, and leaves no temporary one
    assert f"write failed: [Errno 27] File too large: '{root / 'big.bin'}'" in out.stdout
    assert not [n for n in os.listdir(root) if "big.bin" in n]


def test_a_build_that_fails_leaves_no_partial_shard(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`build` aborts its writer on any failure (here one after a sample was written),
    then releases the corpus lock."""
    import errno

    from pipeline import graph
    from pipeline.config import load_config

    video = tmp_path / "v.mp4"
    video.write_bytes(b"not read")

    def fail(sources, out, cfg, echo, writer, *rest):  # type: ignore[no-untyped-def]
        writer.add(batch([clip("/v/a.mp4", i, 2) for i in range(2)]))  # written, not committed
        assert any(".tmp-" in n for n in os.listdir(os.path.join(out, "shards")))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(graph, "_build", fail)
    root = tmp_path / "corpus"
    with pytest.raises(OSError, match="No space left"):
        graph.build([str(video)], str(root), load_config(preset="tiny"), echo=lambda _: None)
    assert os.listdir(root / "shards") == []
    with CorpusWriter(str(root)) as writer:  # the lock is free
        assert writer.done_sources() == set()


def test_a_corrupt_sample_is_found_by_its_checksum(tmp_path) -> None:
    """Each sample's latents carry a CRC-32 (index row and sample JSON). Bytes changed
    in a shard after the build pass its tar and safetensors structure, but `inspect
    --verify` and the trainer's reader name the sample."""
    import zlib

    from model.data import iter_samples

    root = str(tmp_path / "corpus")
    writer = CorpusWriter(root)
    writer.add(batch([clip("/v/a.mp4", i, 2, num_tokens=30) for i in range(2)]))
    writer.close()
    writer.write_manifest({"vae": {"id": "tiny", "latent_channels": 4}, "patch_size": [1, 1, 1]})
    rows = {r["key"]: r for r in read_index(root).to_pylist()}
    shard = os.path.join(root, "shards", "shard-000000.tar")
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for key, row in rows.items():
            data = tar.extractfile(members[f"{key}.{schemas.SAMPLE_LATENTS}"]).read()
            meta = json.loads(tar.extractfile(members[f"{key}.{schemas.SAMPLE_META}"]).read())
            assert row["latents_crc32"] == meta["latents_crc32"] == zlib.crc32(data)
    assert len(list(iter_samples(root))) == 2 and inspect_corpus(root, verify=True).ok

    key = sorted(rows)[1]
    latents = members[f"{key}.{schemas.SAMPLE_LATENTS}"]
    with open(shard, "r+b") as f:  # zero the last bytes of its tensor data
        f.seek(latents.offset_data + latents.size - 16)
        f.write(bytes(16))
    assert inspect_corpus(root).ok  # the structure is intact
    report = inspect_corpus(root, verify=True)
    assert report.problems == [
        f"shards/shard-000000.tar:{key}: latents fail their CRC-32 (index "
        f"{rows[key]['latents_crc32']:08x}, read {report.problems[0].split('read ')[1][:8]}): "
        f"the shard is corrupt (clip {rows[key]['clip_id']})"
    ]
    with pytest.raises(ValueError, match=rf"shard-000000.tar: sample '{key}': .*CRC-32"):
        list(iter_samples(root))
    # the trainer's packed loader (planned from the index) checks every sample it reads
    from model.loader import PackedLoader

    with pytest.raises(ValueError, match=rf"shard-000000.tar: sample '{key}': .*CRC-32"):
        list(PackedLoader(root, token_budget=64, patch=(1, 1, 1)))


@pytest.mark.parametrize("workers", [0, 1])
def test_the_loader_can_leave_corrupt_samples_out(
    tmp_path, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    """With ``skip_corrupt`` a sample whose latents fail their CRC, and one in the part of
    a shard cut off, are left out of their packed sequences (a sequence of nothing is not
    yielded), counted and named in a warning; every other sample is trained on, once."""
    from model.loader import PackedLoader

    root = str(tmp_path / "corpus")
    writer = CorpusWriter(root)
    writer.add(batch([clip("/v/a.mp4", i, 4, num_tokens=30) for i in range(4)]))
    writer.close()
    writer.write_manifest({"vae": {"id": "tiny", "latent_channels": 4}, "patch_size": [1, 1, 1]})
    keys = sorted(r["key"] for r in read_index(root).to_pylist())
    shard = os.path.join(root, "shards", "shard-000000.tar")
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
    latents = members[f"{keys[1]}.{schemas.SAMPLE_LATENTS}"]
    with open(shard, "r+b") as f:
        f.seek(latents.offset_data + latents.size - 16)
        f.write(bytes(16))
        f.seek(members[f"{keys[3]}.{schemas.SAMPLE_META}"].offset - 512)  # its first header
        f.truncate()  # the shard is cut before the last sample
    loader = PackedLoader(
        root, token_budget=64, patch=(1, 1, 1), num_workers=workers, skip_corrupt=True
    )
    with caplog.at_level("WARNING", logger="model.loader"):
        seen = [k for b in loader for k in b.keys]
    assert sorted(seen) == [keys[0], keys[2]]
    assert loader.stats.samples_corrupt == 2
    problems = sorted(loader.stats.corrupt_samples)
    assert f"sample '{keys[1]}': its latents fail their CRC-32 check" in problems[0]
    assert f"sample '{keys[3]}': the shard cannot be read from here on" in problems[1]
    assert "2 left out as corrupt" in loader.stats.summary()
    warned = [r.getMessage() for r in caplog.records if "left out of batch" in r.getMessage()]
    assert len(warned) == 2 and all("shard-000000.tar: sample" in w for w in warned)
    # one sample per sequence: a sequence of nothing is counted, not yielded
    alone = PackedLoader(
        root, token_budget=30, patch=(1, 1, 1), num_workers=workers, skip_corrupt=True
    )
    assert len(alone) == 4
    assert sorted(k for b in alone for k in b.keys) == [keys[0], keys[2]]
    assert alone.stats.batches == 2 and alone.state_dict()["epoch"] == 1


def test_embedding_cells_are_stored_as_given_whichever_form_they_come_in(tmp_path) -> None:
    """An embedding reaches the index as a numpy array (a stage), a list (a refilter's
    rows) or with holes; each is stored as the element-by-element cast would store it,
    without a Python float per value where it can."""
    import pyarrow as pa

    from pipeline.writer import _cast

    typ = schemas.CLIP_SCHEMA.field("clip_embedding").type
    cells = [
        np.array([0.1, -2.5, 3e38], dtype=np.float64),  # rounded to float32 as Arrow would
        np.array([1.5, np.nan], dtype=np.float32),
        np.arange(3, dtype=np.int64),
        [0.25, 1, 7.0],
        (1.0, 2.0),
        [1.0, None, 3.0],  # a null element stays null, not NaN
        ["0.5", "2"],  # numbers as text, as float() reads them
        [],
        None,
    ]
    fast = pa.array([_cast(c, typ) for c in cells], typ)
    slow = pa.array(
        [None if c is None else [None if v is None else float(v) for v in c] for c in cells], typ
    )
    assert nan_safe(fast.to_pylist()) == nan_safe(slow.to_pylist())
    assert isinstance(_cast(cells[0], typ), np.ndarray)  # one array, not 3 Python floats
    with pytest.raises(ValueError, match="could not convert string to float"):
        _cast(["x"], typ)
    # through a writer: stored as given
    rows = [clip("/v/e.mp4", i, 3, "rejected", clip_embedding=e) for i, e in enumerate(cells[:3])]
    with CorpusWriter(str(tmp_path / "c")) as writer:
        writer.add(batch(rows))
    stored = read_index(str(tmp_path / "c"), columns=["clip_embedding"]).column("clip_embedding")
    assert nan_safe(stored.to_pylist()) == nan_safe(slow[:3].to_pylist())


def nan_safe(cells: list) -> list:
    """Cells with NaN written "nan" (NaN equals nothing, itself included)."""
    return [c if c is None else ["nan" if v != v else v for v in c] for c in cells]
