"""The driver-side corpus writer: webdataset shards + parquet tables, exactly once.

The stream reaching the writer has one row per clip (``clip_id`` set) plus one
placeholder row (``clip_id`` None) per source without clips; every row carries its
source's ``src_*`` facts. Rows of one source may arrive in any batches, interleaved
with other sources. The writer buffers a source until it has all
``max(src_num_clips, 1)`` rows, then appends it to the current *part*:

    shards/shard-{n:06d}.tar       kept clips (only when the part has any)
    index/part-{n:06d}.parquet     every clip row of the part's sources (CLIP_SCHEMA)
    sources/part-{n:06d}.parquet   one row per source (SOURCE_SCHEMA), the commit marker

They are written in that order, each atomically, so a source is done iff it
appears in a committed ``sources`` part. Opening a corpus deletes what a killed
run left behind (parts and shards without a ``sources`` part) and continues the
numbering, so resuming never shows a partial shard and never writes a clip twice.
Only one writer may work on a corpus root at a time.

    writer = CorpusWriter("s3://bucket/corpus")
    todo = [s for s in sources if s not in writer.done_sources()]
    for batch in stream(todo):
        writer.add(batch)
    writer.close()
    writer.write_manifest({"vae": ..., "config": ...})
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset

import schemas
from pipeline.storage import Storage, join, storage_for

__all__ = [
    "CorpusWriter",
    "WriteConfig",
    "corpus_counts",
    "read_index",
    "read_sources",
]

_PART_RE = re.compile(r"part-(\d{6})\.parquet$")
_SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")
_TAR_BLOCK = 512
_REQUIRED = ("source", "clip_id", "src_status", "src_num_clips")


@dataclass(frozen=True)
class WriteConfig:
    """When a shard (and with it a part) is committed."""

    shard_max_bytes: int = 1 << 30
    shard_max_samples: int = 100_000
    # Bounds driver memory when most clips are rejected and shards fill slowly.
    part_max_rows: int = 1_000_000


def _part_name(n: int) -> str:
    return f"part-{n:06d}.parquet"


def _shard_rel(n: int) -> str:
    return f"{schemas.SHARDS_DIR}/shard-{n:06d}.tar"


def _numbered(uris: list[str], pattern: re.Pattern[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for uri in uris:
        m = pattern.search(uri.rsplit("/", 1)[-1])
        if m:
            out[int(m.group(1))] = uri
    return out


# --- casting stream values to the schema --------------------------------------------------


def _cast(value: Any, typ: pa.DataType) -> Any:
    """A stream value (numpy scalar, array, bytes...) as the Python value ``typ`` stores."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if pa.types.is_list(typ):
        return [_cast(v, typ.value_type) for v in list(value)]
    if pa.types.is_string(typ):
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if pa.types.is_floating(typ):
        return float(value)  # NaN stays NaN: "not computed" is a score value
    if pa.types.is_integer(typ):
        if isinstance(value, float) and math.isnan(value):
            return None
        return int(value)
    raise TypeError(f"no cast for arrow type {typ}")


def _cast_row(
    row: Mapping[str, Any], schema: pa.Schema, names: Mapping[str, str]
) -> dict[str, Any]:
    """``{field: cast(row[names.get(field, field)])}`` for every field of ``schema``."""
    out: dict[str, Any] = {}
    for f in schema:
        src = names.get(f.name, f.name)
        try:
            out[f.name] = _cast(row.get(src), f.type)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"source {row.get('source')!r} clip {row.get('clip_id')!r}: column {src!r} "
                f"value {row.get(src)!r} does not fit {f.type}: {exc}"
            ) from None
    return out


_SOURCE_NAMES = {
    "status": "src_status",
    "error": "src_error",
    "duration_s": "src_duration_s",
    "num_clips": "src_num_clips",
    "num_frames": "src_num_frames",
    "codec": "src_codec",
}


def _json_safe(value: Any) -> Any:
    """NaN/inf to null so the sample's JSON is strict JSON any parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# --- reading committed parts ----------------------------------------------------------------


def _committed(root: str, st: Storage) -> dict[int, str]:
    return _numbered(st.list(join(root, schemas.SOURCES_DIR)), _PART_RE)


def _read_parts(root: str, directory: str, schema: pa.Schema) -> pa.Table:
    st = storage_for(root)
    tables = [
        pq.read_table(io.BytesIO(st.read(join(root, directory, _part_name(n)))))
        for n in sorted(_committed(root, st))
    ]
    if not tables:
        return schema.empty_table()
    return pa.concat_tables([t.cast(schema) for t in tables])


def read_index(root: str) -> pa.Table:
    """Every clip row of every committed part (CLIP_SCHEMA)."""
    return _read_parts(root, schemas.INDEX_DIR, schemas.CLIP_SCHEMA)


def read_sources(root: str) -> pa.Table:
    """Every source row of every committed part (SOURCE_SCHEMA)."""
    return _read_parts(root, schemas.SOURCES_DIR, schemas.SOURCE_SCHEMA)


def _counts(index: pa.Table, sources: pa.Table) -> dict[str, int]:
    clip_status = index.column("status").to_pylist()
    tokens = [
        t or 0
        for t, s in zip(index.column("num_tokens").to_pylist(), clip_status, strict=True)
        if s == "kept"
    ]
    shards = {s for s in index.column("shard").to_pylist() if s}
    counts = {
        "sources": sources.num_rows,
        "sources_error": sources.column("status").to_pylist().count("error"),
        "clips": index.num_rows,
        "clips_kept": clip_status.count("kept"),
        "clips_rejected": clip_status.count("rejected"),
        "clips_error": clip_status.count("error"),
        "shards": len(shards),
        "latent_tokens": int(sum(tokens)),
    }
    assert tuple(counts) == schemas.COUNT_KEYS  # one definition of the counts
    return counts


def corpus_counts(root: str) -> dict[str, int]:
    """``schemas.COUNT_KEYS`` over the whole committed corpus at ``root``."""
    return _counts(read_index(root), read_sources(root))


# --- the writer -------------------------------------------------------------------------------


@dataclass
class _Pending:
    """One source's rows, until all ``expected`` have arrived."""

    expected: int
    rows: dict[str | None, dict[str, Any]] = field(default_factory=dict)


class CorpusWriter:
    """Writes a stream of clip rows into a corpus at ``root`` (local folder or ``s3://``)."""

    def __init__(self, root: str, cfg: WriteConfig = WriteConfig()) -> None:
        self.root = root
        self.cfg = cfg
        self._st = storage_for(root)
        self._tmp: str | None = None  # local folder of the shard being written, made on demand
        self._pending: dict[str, _Pending] = {}
        self._done: set[str] = set()  # committed
        self._in_part: set[str] = set()  # complete, in the part being assembled
        self._index_rows: list[dict[str, Any]] = []
        self._source_rows: list[dict[str, Any]] = []
        self._tar: webdataset.TarWriter | None = None
        self._tar_file: Any = None
        self._samples = 0
        self._run_counts = dict.fromkeys(schemas.COUNT_KEYS, 0)
        self.duplicates_skipped = 0
        self._next = self._recover()

    def __repr__(self) -> str:
        return f"CorpusWriter({self.root!r}, next_part={self._next})"

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- open / resume ---------------------------------------------------------------------

    def _recover(self) -> int:
        """Delete a killed run's leftovers; load committed sources; return the next part number."""
        committed = _committed(self.root, self._st)
        index = _numbered(self._st.list(join(self.root, schemas.INDEX_DIR)), _PART_RE)
        shards = _numbered(self._st.list(join(self.root, schemas.SHARDS_DIR)), _SHARD_RE)
        for table in (index, shards):
            for n, uri in table.items():
                if n not in committed:
                    self._st.delete(uri)
        for uri in committed.values():
            table = pq.read_table(io.BytesIO(self._st.read(uri)), columns=["source"])
            self._done.update(table.column("source").to_pylist())
        return max(committed, default=-1) + 1

    def done_sources(self) -> set[str]:
        """Sources in committed parts (earlier runs, and this one so far): skip them on resume."""
        return set(self._done)

    # -- adding rows -----------------------------------------------------------------------

    def add(self, batch: Mapping[str, Any]) -> None:
        """Take a stream batch (dict of equal-length columns); commits parts as they fill."""
        unknown = sorted(set(batch) - set(schemas.STREAM_COLUMNS))
        if unknown:
            raise ValueError(
                f"unknown columns {unknown} reached the corpus writer; every column must be "
                "declared in schemas (CLIP_SCHEMA or STREAM_ONLY_COLUMNS)"
            )
        n = max((len(v) for v in batch.values()), default=0)
        if n == 0:
            return  # Ray may hand over empty blocks, with or without columns
        missing = [c for c in _REQUIRED if c not in batch]
        if missing:
            raise ValueError(f"batch lacks required columns {missing}")
        for i in range(n):
            row = {k: v[i] for k, v in batch.items() if k != "clip_bytes"}
            self._add_row(row)

    def _add_row(self, row: dict[str, Any]) -> None:
        source = str(row["source"])
        clip_id = None if row["clip_id"] is None else str(row["clip_id"])
        if source in self._done or source in self._in_part:
            self.duplicates_skipped += 1  # complete already: exactly once
            return
        num_clips = _cast(row["src_num_clips"], pa.int64()) or 0
        pending = self._pending.get(source)
        if pending is None:
            pending = self._pending[source] = _Pending(expected=max(num_clips, 1))
        if (clip_id is None) != (num_clips == 0):
            raise ValueError(
                f"source {source!r}: row with clip_id={clip_id!r} but src_num_clips={num_clips}; "
                "a placeholder row (clip_id None) belongs only to a source without clips"
            )
        if clip_id in pending.rows:
            self.duplicates_skipped += 1
            return
        pending.rows[clip_id] = row
        if len(pending.rows) >= pending.expected:
            del self._pending[source]
            self._complete(source, list(pending.rows.values()))

    def _complete(self, source: str, rows: list[dict[str, Any]]) -> None:
        """Put one complete source into the current part; commit the part when full."""
        clips = [r for r in rows if r["clip_id"] is not None]
        index_rows = [_cast_row(r, schemas.CLIP_SCHEMA, {}) for r in clips]
        source_row = _cast_row(rows[0], schemas.SOURCE_SCHEMA, _SOURCE_NAMES)
        if source_row["status"] not in schemas.SOURCE_STATUSES:
            raise ValueError(f"source {source!r}: unknown src_status {source_row['status']!r}")
        samples: list[tuple[dict[str, Any], bytes]] = []
        for out, row in zip(index_rows, clips, strict=True):
            self._check_clip(out)
            out["shard"] = out["key"] = None  # set below for clips that get a sample
            latents = row.get("latents")
            if out["status"] == "kept":
                if not latents:
                    out["status"] = "error"
                    out["error"] = (
                        f"clip {out['clip_id']} of {source} was kept but reached the writer without latents"
                    )
                else:
                    samples.append((out, bytes(latents)))
        if samples and self._samples and self._would_overflow(samples):
            self._commit()
        shard = _shard_rel(self._next)
        for out, latents in samples:
            out["shard"], out["key"] = shard, out["clip_id"]
            self._write_sample(out, latents)
        self._index_rows.extend(index_rows)
        self._source_rows.append(source_row)
        self._in_part.add(source)
        if (
            self._tar_bytes() >= self.cfg.shard_max_bytes
            or self._samples >= self.cfg.shard_max_samples
            or len(self._index_rows) >= self.cfg.part_max_rows
        ):
            self._commit()

    @staticmethod
    def _check_clip(row: dict[str, Any]) -> None:
        cid = row["clip_id"]
        if "." in cid or "/" in cid:
            # webdataset splits sample keys at the first dot of the member name.
            raise ValueError(
                f"clip_id {cid!r} of {row['source']!r} cannot be a shard key (has . or /)"
            )
        if row["status"] not in schemas.CLIP_STATUSES:
            raise ValueError(f"clip {cid!r} of {row['source']!r}: unknown status {row['status']!r}")

    # -- shards ------------------------------------------------------------------------------

    def _tar_bytes(self, extra: int = 0) -> int:
        """Size of the finished shard file if ``extra`` more member bytes were added."""
        offset = (int(self._tar.tarstream.offset) if self._tar is not None else 0) + extra
        if offset == 0:
            return 0
        # Closing adds two zero blocks and pads to a whole tar record.
        return -(-(offset + 2 * _TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def _would_overflow(self, samples: list[tuple[dict[str, Any], bytes]]) -> bool:
        if self._samples + len(samples) > self.cfg.shard_max_samples:
            return True

        def blocks(size: int) -> int:  # a tar member: one header block + data in whole blocks
            return _TAR_BLOCK * (1 + -(-size // _TAR_BLOCK))

        # The JSON gets ``shard`` and ``key`` later: allow for them.
        extra = sum(
            blocks(len(latents))
            + blocks(len(json.dumps(out)) + 128)
            + blocks(len((out["caption"] or "").encode("utf-8")))
            for out, latents in samples
        )
        return self._tar_bytes(extra) > self.cfg.shard_max_bytes

    def _write_sample(self, row: dict[str, Any], latents: bytes) -> None:
        if self._tar is None:
            self._tmp = self._tmp or tempfile.mkdtemp(prefix="reelpack-shard-")
            self._tar_file = open(self._tar_path(), "wb")  # noqa: SIM115 - closed in _close_tar
            # Fixed mtime: re-running a build produces byte-identical shards.
            self._tar = webdataset.TarWriter(self._tar_file, encoder=False, mtime=0)
        meta = json.dumps({k: _json_safe(v) for k, v in row.items()}, allow_nan=False)
        self._tar.write(
            {
                "__key__": row["key"],
                schemas.SAMPLE_LATENTS: latents,
                schemas.SAMPLE_META: meta.encode("utf-8"),
                schemas.SAMPLE_CAPTION: (row["caption"] or "").encode("utf-8"),
            }
        )
        self._samples += 1

    def _tar_path(self) -> str:
        assert self._tmp is not None
        return os.path.join(self._tmp, "shard.tar")

    def _drop_tmp(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar_file.close()
            self._tar = self._tar_file = None

    # -- commit ------------------------------------------------------------------------------

    def _commit(self) -> None:
        """Shard, then index part, then sources part (the marker); each write atomic."""
        if not self._source_rows:
            return
        n = self._next
        self._close_tar()
        if self._samples:
            self._st.upload(self._tar_path(), join(self.root, _shard_rel(n)))
            os.remove(self._tar_path())
        index = _table(self._index_rows, schemas.CLIP_SCHEMA)
        sources = _table(self._source_rows, schemas.SOURCE_SCHEMA)
        self._st.write(join(self.root, schemas.INDEX_DIR, _part_name(n)), _parquet_bytes(index))
        self._st.write(join(self.root, schemas.SOURCES_DIR, _part_name(n)), _parquet_bytes(sources))
        for key, value in _counts(index, sources).items():
            self._run_counts[key] += value
        self._done |= self._in_part
        self._in_part = set()
        self._index_rows, self._source_rows, self._samples = [], [], 0
        self._next = n + 1

    def close(self) -> dict[str, int]:
        """Commit everything complete; return this run's counts (``schemas.COUNT_KEYS``).

        Raises ``ValueError`` naming the sources still missing rows: they were not
        committed and will be rebuilt by the next run.
        """
        self._commit()
        self._close_tar()
        self._drop_tmp()
        if self._pending:
            missing = {
                s: f"{len(p.rows)}/{p.expected} rows" for s, p in sorted(self._pending.items())
            }
            raise ValueError(f"incomplete sources at close (not committed): {missing}")
        return dict(self._run_counts)

    def abort(self) -> None:
        """Drop everything uncommitted (the stream failed); committed parts stay."""
        self._close_tar()
        self._drop_tmp()
        self._pending.clear()
        self._in_part = set()
        self._index_rows, self._source_rows, self._samples = [], [], 0

    def write_manifest(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` atomically: ``extra`` plus schema version, time and
        counts over the whole corpus on storage. Returns what was written."""
        manifest = {
            **extra,
            "schema_version": schemas.SCHEMA_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "counts": corpus_counts(self.root),
        }
        data = json.dumps(manifest, indent=2, allow_nan=False).encode("utf-8")
        self._st.write(join(self.root, schemas.MANIFEST_NAME), data)
        return manifest
