"""The driver-side corpus writer: webdataset shards + parquet tables, exactly once.

The stream reaching the writer has one row per clip (``clip_id`` set) plus one
placeholder row (``clip_id`` None) per source without clips; every row carries its
source's ``src_*`` facts. Rows of one source may arrive in any batches, interleaved
with other sources. A long source streamed by split in chunks has rows whose
``src_num_clips`` is None until its last chunk, whose rows carry the count and the
final facts (applied to all its rows; a source that failed after some clips were
handed on is recorded as one error row). The writer buffers a source until it has all
``max(src_num_clips, 1)`` rows, then appends it to the current *part*:

    shards/shard-{n:06d}.tar       kept clips (only when the part has any)
    index/part-{n:06d}.parquet     every clip row of the part's sources (CLIP_SCHEMA)
    sources/part-{n:06d}.parquet   one row per source (SOURCE_SCHEMA), the commit marker

They are written in that order, each atomically (a local shard is written under a
hidden temporary name in ``shards/`` and renamed at commit; an S3 shard becomes
visible when its upload completes), so a source is done iff it appears in a
committed ``sources`` part. Opening a corpus deletes what a killed run left behind
(parts and shards without a ``sources`` part, temporary files, unfinished multipart
uploads) and continues the numbering, so resuming never shows a partial shard and
never writes a clip twice. One writer works on a corpus root at a time: the writer
holds ``<root>/lock.json`` (``pipeline.lock``) from opening until :meth:`CorpusWriter.unlock`.

With ``WriteConfig.clip_files``, each kept clip's payload is also written as
``clips/<key>.mp4`` the moment its row arrives (so the writer holds no payloads); such
a file may appear before its source commits, and a resume rewrites it alike.

**Latest part wins.** A source may appear in several committed parts (a refilter
records new decisions with :func:`rewrite_sources_rows`; a rebuild of a source that
:func:`sources_needing_work` names writes it again). Readers take, per source, the
rows of the highest-numbered committed part that holds it and ignore the rest:
:func:`read_index`, :func:`read_sources`, :func:`corpus_counts`,
``CorpusWriter.done_sources`` and ``reelpack inspect`` all apply this rule. Shards
are never rewritten, so a superseded sample may stay in its old shard; only index
rows say which samples are live.

**Test hook.** ``REELPACK_TEST_KILL_AFTER=<event>[:<n>[:<SIGNAL>]]`` makes the process
send itself SIGKILL (or ``SIG<SIGNAL>``, e.g. ``INT``) right after the ``n``-th (default
first) ``event`` of this process, one of
``sample`` (a sample went into the temporary tar), ``shard`` (a shard reached its
final name), ``index`` (an index part was written), ``sources`` (a commit marker was
written) and ``manifest``. Only the crash tests set it (tests/test_store_resume.py).

    writer = CorpusWriter("s3://bucket/corpus")
    todo = [s for s in sources if s not in writer.done_sources()]
    for batch in stream(todo):
        writer.add(batch)
    writer.close()
    writer.write_manifest({"vae": ..., "config": ...})
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import signal
import tarfile
import tempfile
import time
import uuid
import weakref
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import schemas
from pipeline.lock import CorpusLock
from pipeline.storage import LocalStorage, S3Storage, Storage, is_s3, join, naming, storage_for

__all__ = [
    "KILL_ENV",
    "SAMPLE_KEY_RE",
    "Committed",
    "CorpusWriter",
    "WriteConfig",
    "corpus_counts",
    "iter_index_parts",
    "not_a_folder",
    "read_committed",
    "read_index",
    "read_sources",
    "require_manifest",
    "rewrite_sources_rows",
    "sources_needing_work",
]

_PART_RE = re.compile(r"^part-(\d{6})\.parquet$")
_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
_TMP_MARK = ".tmp-"  # hidden temporary files: ".<final name>.tmp-<uuid>"
_TAR_BLOCK = 512
_REQUIRED = ("source", "clip_id", "src_status", "src_num_clips")
# A sample key becomes tar member names ``<key>.<suffix>``: no dots (webdataset splits
# there), no slashes or ``..`` (path traversal on extraction), nothing unprintable.
SAMPLE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

KILL_ENV = "REELPACK_TEST_KILL_AFTER"
_KILL_EVENTS = ("sample", "shard", "index", "sources", "manifest")
_kill_seen: Counter[str] = Counter()


def _kill_point(event: str) -> None:
    """Test hook: signal this process after the n-th ``event`` (see the module docstring)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, nth, sig = [*spec.split(":"), "", ""][:3]
    if name not in _KILL_EVENTS:
        raise ValueError(f"{KILL_ENV}={spec!r}: event must be one of {_KILL_EVENTS}")
    if name != event:
        return
    _kill_seen[event] += 1
    if _kill_seen[event] == int(nth or 1):
        os.kill(os.getpid(), signal.Signals[f"SIG{sig or 'KILL'}"])


@dataclass(frozen=True)
class WriteConfig:
    """When a shard (and with it a part) is committed."""

    shard_max_bytes: int = 1 << 30
    shard_max_samples: int = 100_000
    # Bounds driver memory when most clips are rejected and shards fill slowly.
    part_max_rows: int = 1_000_000
    # Commit at least this often (seconds since the part's first source; 0: only when
    # full), so a crashed driver loses at most this much finished work.
    commit_interval_s: float = 300.0
    # Also write each kept clip's payload as ``clips/<key>.mp4`` (schemas.clip_file).
    clip_files: bool = False


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
    if isinstance(value, float) and math.isnan(value) and not pa.types.is_floating(typ):
        return None  # Ray Data hands an all-null column of a block over as NaN floats
    if pa.types.is_list(typ):
        if pa.types.is_floating(typ.value_type):
            vector = _float_vector(value, typ.value_type)
            if vector is not None:
                return vector
        return [_cast(v, typ.value_type) for v in list(value)]
    if pa.types.is_string(typ):
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if pa.types.is_floating(typ):
        return float(value)  # NaN stays NaN: "not computed" is a score value
    if pa.types.is_boolean(typ):
        return bool(value)
    if pa.types.is_integer(typ):
        if isinstance(value, float) and math.isnan(value):
            return None
        return int(value)
    raise TypeError(f"no cast for arrow type {typ}")


def _float_vector(value: Any, typ: pa.DataType) -> np.ndarray | None:
    """A flat sequence of numbers (an embedding) as one numpy array of ``typ``, which
    Arrow takes as a list cell whole; None when an element is None or not a number
    (then :func:`_cast` goes element by element). A million 768-d embeddings are 25 GB
    as Python floats and 3 GB as arrays."""
    dtype = typ.to_pandas_dtype()
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "fiub":
            return None
        return value.astype(dtype, copy=False)
    if not isinstance(value, list | tuple) or None in value:
        return None  # a null element stays null, not NaN
    try:
        vector = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        return None
    return vector if vector.ndim == 1 else None


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


# A sources-table column comes from the stream column of the same name with "src_"
# in front (``width``/``height``: the source's display size, where a clip's own may
# differ); ``source`` and the probe's ``fps`` keep their names; ``config_hash`` is the
# run's.
_SOURCE_NAMES = {
    f.name: f"src_{f.name}"
    for f in schemas.SOURCE_SCHEMA
    if f.name not in ("source", "fps", "config_hash")
}


_META_EXCLUDED = frozenset({"clip_embedding"})


def _json_safe(value: Any) -> Any:
    """NaN/inf to null so the sample's JSON is strict JSON any parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _sample_meta(row: Mapping[str, Any]) -> str:
    """A sample's ``.json``: its index row minus bulky vectors (the CLIP embedding stays
    in the parquet index), strict JSON."""
    return json.dumps(
        {k: _json_safe(v) for k, v in row.items() if k not in _META_EXCLUDED}, allow_nan=False
    )


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# --- reading committed parts ----------------------------------------------------------------


def _committed(root: str, st: Storage) -> dict[int, str]:
    return _numbered(st.list(join(root, schemas.SOURCES_DIR)), _PART_RE)


def _read_part(
    st: Storage,
    root: str,
    directory: str,
    n: int,
    schema: pa.Schema,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """Part ``n`` as ``schema`` (only ``columns`` of it, and ``source``, when given)."""
    if columns is not None:
        wanted = set(columns) | {"source"}
        schema = pa.schema([f for f in schema if f.name in wanted])
    data = pq.ParquetFile(io.BytesIO(st.read(join(root, directory, _part_name(n)))))
    present = [name for name in schema.names if name in data.schema_arrow.names]
    table = data.read(columns=present)
    # Parts written before a column was added lack it: add it as nulls, then order as schema.
    for f in schema:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def _source_parts(root: str, st: Storage) -> dict[int, pa.Table]:
    return {
        n: _read_part(st, root, schemas.SOURCES_DIR, n, schemas.SOURCE_SCHEMA)
        for n in sorted(_committed(root, st))
    }


def _latest_part(source_parts: Mapping[int, pa.Table]) -> dict[str, int]:
    """Per source, the highest committed part that holds it ("latest part wins")."""
    latest: dict[str, int] = {}
    for n in sorted(source_parts):
        for source in source_parts[n].column("source").to_pylist():
            latest[source] = n
    return latest


def _live(table: pa.Table, n: int, latest: Mapping[str, int]) -> pa.Table:
    """The rows of part ``n`` whose source's latest part is ``n``."""
    sources = set(table.column("source").to_pylist())
    live = [s for s in sources if latest.get(s) == n]
    if len(live) == len(sources):
        return table
    return table.filter(pc.is_in(table.column("source"), value_set=pa.array(live, pa.string())))


def _concat(tables: Iterable[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = list(tables)
    return pa.concat_tables(tables) if tables else schema.empty_table()


class Committed(NamedTuple):
    """What :func:`read_committed` read of a corpus, each part once."""

    index: pa.Table  # the live clip rows (latest part per source), the columns asked for
    sources: pa.Table  # the live source rows (SOURCE_SCHEMA)
    history: pa.Table | None  # every committed clip row, superseded ones included


def read_committed(
    root: str,
    columns: Sequence[str] | None = None,
    history_columns: Sequence[str] | None = None,
    *,
    history: bool = False,
) -> Committed:
    """The committed corpus at ``root``, every part read once: its live index rows
    with ``columns`` (None: all; ``source`` always), its live source rows and, with
    ``history``, every committed index row with ``history_columns`` (None: all).

    A reader that needs the live rows and the history (``inspect``, ``refilter``)
    gets both from one read; :func:`read_index` and :func:`read_sources` are the
    single-table forms.
    """
    return _read_committed(root, columns, history_columns, live=True, history=history)


def _read_committed(
    root: str,
    live_columns: Sequence[str] | None,
    history_columns: Sequence[str] | None,
    *,
    live: bool,
    history: bool,
) -> Committed:
    """:func:`read_committed`, with the live index rows (``live``) and the history
    (``history``) each asked for or not: no index part is read when neither is."""
    read: list[str] | None = []  # the union of the columns the tables asked for
    for wanted, cols in ((live, live_columns), (history, history_columns)):
        if wanted:
            read = None if cols is None or read is None else [*read, *cols]
    st = storage_for(root)
    source_parts = _source_parts(root, st)
    latest = _latest_part(source_parts)
    live_schema, history_schema = _index_schema(live_columns), _index_schema(history_columns)
    index_parts: list[pa.Table] = []
    all_parts: list[pa.Table] = []
    sources: list[pa.Table] = []
    for n, table in source_parts.items():
        sources.append(_live(table, n, latest))
        if not (live or history):
            continue
        part = _read_part(st, root, schemas.INDEX_DIR, n, schemas.CLIP_SCHEMA, read)
        if live:
            index_parts.append(_live(part, n, latest).select(live_schema.names))
        if history:
            all_parts.append(part.select(history_schema.names))
    return Committed(
        _concat(index_parts, live_schema),
        _concat(sources, schemas.SOURCE_SCHEMA),
        _concat(all_parts, history_schema) if history else None,
    )


def iter_index_parts(root: str, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """The live index rows of the committed corpus at ``root`` (as :func:`read_index`),
    one committed part at a time: a reader that folds rows into its own structure
    holds one part's columns, not the whole index's."""
    st = storage_for(root)
    source_parts = _source_parts(root, st)
    latest = _latest_part(source_parts)
    schema = _index_schema(columns)
    for n in source_parts:
        part = _read_part(st, root, schemas.INDEX_DIR, n, schemas.CLIP_SCHEMA, columns)
        yield _live(part, n, latest).select(schema.names)


def _read_tables(root: str, columns: Sequence[str] | None = None) -> tuple[pa.Table, pa.Table]:
    """(index, sources) of the committed corpus, latest part per source; the index with
    only ``columns`` (and ``source``) when given."""
    index, sources, _ = read_committed(root, columns)
    return index, sources


def _index_schema(columns: Sequence[str] | None) -> pa.Schema:
    if columns is None:
        return schemas.CLIP_SCHEMA
    wanted = set(columns) | {"source"}
    return pa.schema([f for f in schemas.CLIP_SCHEMA if f.name in wanted])


def read_index(
    root: str, include_superseded: bool = False, columns: Sequence[str] | None = None
) -> pa.Table:
    """Every clip row of the committed corpus (CLIP_SCHEMA), latest part per source.

    ``include_superseded=True`` returns the rows of every committed part instead
    (history: a source then appears once per part that holds it). ``columns``: only
    those (and ``source``), in schema order; a reader that needs no embeddings reads
    none (a million ViT-L/14 embeddings are 3 GB).
    """
    if include_superseded:
        everything = _read_committed(root, None, columns, live=False, history=True).history
        assert everything is not None
        return everything
    return read_committed(root, columns).index


def read_sources(root: str, include_superseded: bool = False) -> pa.Table:
    """Every source row of the committed corpus (SOURCE_SCHEMA), latest part per source;
    no index part is read."""
    if include_superseded:
        return _concat(_source_parts(root, storage_for(root)).values(), schemas.SOURCE_SCHEMA)
    return _read_committed(root, None, None, live=False, history=False).sources


def _counts(index: pa.Table, sources: pa.Table) -> dict[str, int]:
    clip_status = index.column("status").to_pylist()
    tokens = [
        t or 0
        for t, s in zip(index.column("num_tokens").to_pylist(), clip_status, strict=True)
        if s == "kept"
    ]
    shards = {
        sh
        for sh, s in zip(index.column("shard").to_pylist(), clip_status, strict=True)
        if sh and s == "kept"
    }
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


def read_manifest(root: str) -> dict[str, Any] | None:
    """The corpus's ``manifest.json`` (None when there is none: not a corpus, or one that
    never committed); ValueError naming the file when it is not a JSON object."""
    st = storage_for(root)
    uri = join(root, schemas.MANIFEST_NAME)
    if not st.exists(uri):
        return None
    try:
        manifest = json.loads(st.read(uri))
    except ValueError as exc:  # JSON or UTF-8
        raise ValueError(f"{uri}: the corpus manifest is not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{uri}: the corpus manifest is not a JSON object")
    return manifest


def require_manifest(root: str) -> dict[str, Any]:
    """:func:`read_manifest`, or FileNotFoundError saying what ``root`` is instead of a
    corpus: no such folder, a file, or a folder (or prefix) with no manifest."""
    manifest = read_manifest(root)
    if manifest is not None:
        return manifest
    raise FileNotFoundError(
        not_a_folder(root) or f"no {schemas.MANIFEST_NAME}; not a reelpack corpus"
    )


def not_a_folder(root: str) -> str | None:
    """What a local corpus root is when it is no folder ("no such folder", "a file, not
    a corpus"); None for a folder or an ``s3://`` prefix."""
    local = None if is_s3(root) else schemas.storage_location(root)  # file:// as a path
    if local is None or os.path.isdir(local):
        return None
    return "no such folder" if not os.path.exists(local) else "a file, not a corpus"


def corpus_counts(root: str) -> dict[str, int]:
    """``schemas.COUNT_KEYS`` over the whole committed corpus at ``root`` (latest rows).

    ``shards`` counts the shards that hold at least one live (kept, latest) sample.
    """
    return _counts(*_read_tables(root, columns=_COUNT_COLUMNS))


# the index columns each reader below needs: never the embeddings (a million clips' are GBs)
_COUNT_COLUMNS = ("status", "num_tokens", "shard")
_WORK_COLUMNS = ("status", "shard", "key")


def _needing_work(index: pa.Table) -> set[str]:
    out = set()
    for source, status, shard, key in zip(
        index.column("source").to_pylist(),
        index.column("status").to_pylist(),
        index.column("shard").to_pylist(),
        index.column("key").to_pylist(),
        strict=True,
    ):
        if status == "kept" and (not shard or not key):
            out.add(source)
    return out


def sources_needing_work(root: str) -> set[str]:
    """Committed sources whose latest rows have a ``kept`` clip without a sample
    (no shard/key: e.g. a refilter turned a rejected clip into a kept one).

    A build must process them again; ``CorpusWriter.done_sources`` already leaves
    them out, and the writer accepts their rows again (the new part supersedes).
    """
    return _needing_work(read_index(root, columns=_WORK_COLUMNS))


# --- the writer -------------------------------------------------------------------------------


@dataclass
class _Pending:
    """One source's rows, until all ``expected`` have arrived. A streaming split hands
    a long source on in chunks whose rows lack the count; ``final`` is the first row
    that has it (the last chunk's), which also holds the source's final facts."""

    expected: int | None = None
    rows: dict[str | None, dict[str, Any]] = field(default_factory=dict)
    final: dict[str, Any] | None = None

    def whole(self) -> list[dict[str, Any]]:
        """The rows with the final ``src_*`` facts; one error row when the source failed
        after some of its clips were handed on (as for any failed split)."""
        assert self.final is not None
        facts = {k: v for k, v in self.final.items() if k.startswith("src_")}
        if facts.get("src_status") == "error":
            return [dict(self.final, clip_id=None, status=None, src_num_clips=0, latents=None)]
        return [dict(r, **facts) for r in self.rows.values()]


class CorpusWriter:
    """Writes a stream of clip rows into a corpus at ``root`` (local folder or ``s3://``)."""

    def __init__(
        self,
        root: str,
        cfg: WriteConfig = WriteConfig(),
        build_config: tuple[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``build_config``: (hash, resolved config) of the build writing new sources,
        stored as ``configs/<hash>.json`` and named by their ``config_hash``."""
        self.root = root
        self.cfg = cfg
        self._config_hash = build_config[0] if build_config else None
        self._st = storage_for(root)
        self._local = isinstance(self._st, LocalStorage)
        self._tmp: str | None = None  # S3: local folder of the shard being written
        self._tar_tmp_path: str | None = None  # the shard being written, temporary name
        self._pending: dict[str, _Pending] = {}
        self._done: set[str] = set()  # committed and complete
        self._errored: set[str] = set()  # committed, and an error row (latest part)
        self._in_part: set[str] = set()  # complete, in the part being assembled
        self._index_rows: list[dict[str, Any]] = []
        self._source_rows: list[dict[str, Any]] = []
        self._tar: _TarStream | None = None
        self._tar_file: Any = None
        self._samples = 0
        self._part_started = 0.0  # time.monotonic() when the part got its first source
        self._clip_files: set[str] = set()  # clip files written for incomplete sources
        self._run_counts = dict.fromkeys(schemas.COUNT_KEYS, 0)
        self.duplicates_skipped = 0
        self._lock = CorpusLock(root, self._st)
        self._lock.acquire()  # before deleting what a dead run left: no live run's files
        # A writer dropped without unlock() can write no more: its lock goes with it
        # (not at interpreter exit, when storage may be gone; a dead run's lock is
        # taken over anyway).
        weakref.finalize(self, self._lock.release, quick=True).atexit = False
        try:
            self._next = self._recover()
            if build_config is not None:  # before any source row names it
                blob = json.dumps(build_config[1], indent=2, sort_keys=True).encode()
                self._st.write(join(root, schemas.config_file(build_config[0])), blob)
        except BaseException:
            self._lock.release()
            raise

    def __repr__(self) -> str:
        return f"CorpusWriter({self.root!r}, next_part={self._next})"

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.close()
            else:
                self.abort()
        finally:
            self.unlock()

    def unlock(self) -> None:
        """Release the corpus lock (``pipeline.lock``): after the last commit and the
        manifest. Without it, the next writer takes the lock over once this process
        has exited (or its heartbeat is stale)."""
        self._lock.release()

    # -- open / resume ---------------------------------------------------------------------

    def _recover(self) -> int:
        """Delete a killed run's leftovers; load committed sources; return the next part number."""
        committed = _committed(self.root, self._st)
        for directory, pattern in (
            (schemas.INDEX_DIR, _PART_RE),
            (schemas.SHARDS_DIR, _SHARD_RE),
            (schemas.SOURCES_DIR, _PART_RE),
        ):
            for uri in self._st.list(join(self.root, directory)):
                name = uri.rsplit("/", 1)[-1]
                m = pattern.search(name)
                if (m is None and name.startswith(".") and _TMP_MARK in name) or (
                    m is not None and int(m.group(1)) not in committed
                ):
                    self._st.delete(uri)  # a killed run's temp file or uncommitted part
        self._abort_uploads()
        index, sources = _read_tables(self.root, columns=_WORK_COLUMNS)
        self._done = set(sources.column("source").to_pylist()) - _needing_work(index)
        errors = sources.filter(pc.equal(sources.column("status"), "error"))
        self._errored = set(errors.column("source").to_pylist())
        return max(committed, default=-1) + 1

    def _abort_uploads(self) -> None:
        """S3: abort multipart uploads a killed run left unfinished below the root."""
        if not isinstance(self._st, S3Storage):
            return
        # A store without the listing call: nothing there is visible anyway.
        with contextlib.suppress(OSError):
            self._st.abort_uploads(self.root)

    def done_sources(self) -> set[str]:
        """Committed sources that are complete (earlier runs, and this one so far): skip
        them on resume. Sources that :func:`sources_needing_work` names are not done."""
        return set(self._done)

    def errored_sources(self) -> set[str]:
        """Sources that earlier runs committed as error rows (latest part per source)."""
        return set(self._errored)

    def redo(self, sources: set[str]) -> None:
        """Take rows of these committed sources again (a build retrying its errors):
        the part that commits them supersedes their earlier rows."""
        self._done -= sources

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
        payloads = batch.get("clip_bytes") if self.cfg.clip_files else None
        for i in range(n):
            row = {k: v[i] for k, v in batch.items() if k != "clip_bytes"}
            if payloads is not None:
                self._write_clip_file(row, payloads[i])
            self._add_row(row)

    def _write_clip_file(self, row: dict[str, Any], payload: Any) -> None:
        """A kept clip's payload as its file, at once (the writer holds no payloads):
        visible before its source commits, rewritten alike by a resume."""
        cid = row["clip_id"]
        if row.get("status") != "kept" or not _has_bytes(payload):
            return
        if not isinstance(cid, str) or not SAMPLE_KEY_RE.match(cid):
            return  # refused with a reason when the source completes (_check_clip)
        self._st.write(join(self.root, schemas.clip_file(cid)), bytes(payload))
        self._clip_files.add(cid)

    def _add_row(self, row: dict[str, Any]) -> None:
        source = str(row["source"])
        clip_id = None if row["clip_id"] is None else str(row["clip_id"])
        if source in self._done or source in self._in_part:
            self.duplicates_skipped += 1  # complete already: exactly once
            return
        num_clips = _cast(row["src_num_clips"], pa.int64())  # None: not the last chunk
        if (clip_id is None) != (num_clips == 0):
            raise ValueError(
                f"source {source!r}: row with clip_id={clip_id!r} but src_num_clips={num_clips}; "
                "a placeholder row (clip_id None) belongs only to a source without clips"
            )
        pending = self._pending.setdefault(source, _Pending())
        if num_clips is not None and pending.final is None:
            pending.expected, pending.final = max(num_clips, 1), row
        if clip_id in pending.rows:
            self.duplicates_skipped += 1
            return
        pending.rows[clip_id] = row
        if pending.expected is not None and len(pending.rows) >= pending.expected:
            del self._pending[source]
            self._complete(source, pending.whole())

    def _complete(self, source: str, rows: list[dict[str, Any]]) -> None:
        """Put one complete source into the current part; commit the part when full."""
        clips = [r for r in rows if r["clip_id"] is not None]
        index_rows = [_cast_row(r, schemas.CLIP_SCHEMA, {}) for r in clips]
        first = dict(rows[0])
        for side in ("width", "height"):  # rows split did not see: the probe's size
            if _cast(first.get(f"src_{side}"), pa.int64()) is None:
                first[f"src_{side}"] = first.get(side)
        source_row = _cast_row(first, schemas.SOURCE_SCHEMA, _SOURCE_NAMES)
        source_row["config_hash"] = self._config_hash
        if source_row["status"] not in schemas.SOURCE_STATUSES:
            raise ValueError(f"source {source!r}: unknown src_status {source_row['status']!r}")
        samples: list[tuple[dict[str, Any], bytes]] = []
        for out, row in zip(index_rows, clips, strict=True):
            _check_clip(out)
            out["shard"] = out["key"] = None  # set below for clips that get a sample
            latents = row.get("latents")
            if out["status"] == "kept":
                if not latents:
                    _kept_without(out, source, "latents")
                elif self.cfg.clip_files and out["clip_id"] not in self._clip_files:
                    _kept_without(out, source, "its clip payload")
                else:
                    samples.append((out, bytes(latents)))
            self._clip_files.discard(out["clip_id"])
        if samples and self._samples and self._would_overflow(samples):
            self._commit()
        shard = _shard_rel(self._next)
        for out, latents in samples:
            out["shard"], out["key"] = shard, out["clip_id"]
            out["latents_crc32"] = zlib.crc32(latents)
            self._write_sample(out, latents)
        if not self._source_rows:
            self._part_started = time.monotonic()
        self._index_rows.extend(index_rows)
        self._source_rows.append(source_row)
        self._in_part.add(source)
        interval = self.cfg.commit_interval_s
        if (
            self._tar_bytes() >= self.cfg.shard_max_bytes
            or self._samples >= self.cfg.shard_max_samples
            or len(self._index_rows) >= self.cfg.part_max_rows
            or (interval > 0 and time.monotonic() - self._part_started >= interval)
        ):
            self._commit()

    # -- shards ------------------------------------------------------------------------------

    def _tar_bytes(self, extra: int = 0) -> int:
        """Size of the finished shard file if ``extra`` more member bytes were added."""
        offset = (int(self._tar.offset) if self._tar is not None else 0) + extra
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
            + blocks(len(_sample_meta(out)) + 128)
            + blocks(len((out["caption"] or "").encode("utf-8")))
            for out, latents in samples
        )
        return self._tar_bytes(extra) > self.cfg.shard_max_bytes

    def _open_tar(self) -> None:
        if self._local:
            # Written in place under a hidden temporary name and renamed at commit: one
            # write of the bytes, and a killed run leaves only a ``.tmp-`` file to delete.
            folder = join(self.root, schemas.SHARDS_DIR)
            os.makedirs(folder, exist_ok=True)
            name = f"shard-{self._next:06d}.tar"
            self._tar_tmp_path = os.path.join(folder, f".{name}{_TMP_MARK}{uuid.uuid4().hex}")
        else:
            self._tmp = self._tmp or tempfile.mkdtemp(prefix="reelpack-shard-")
            self._tar_tmp_path = os.path.join(self._tmp, "shard.tar")
        self._tar_file = open(self._tar_tmp_path, "wb")  # noqa: SIM115 - closed in _close_tar
        self._tar = _TarStream(self._tar_file)

    def _write_sample(self, row: dict[str, Any], latents: bytes) -> None:
        if self._tar is None:
            self._open_tar()
        assert self._tar is not None
        meta = _sample_meta(row)
        try:
            for suffix, data in (
                (schemas.SAMPLE_LATENTS, latents),
                (schemas.SAMPLE_META, meta.encode("utf-8")),
                (schemas.SAMPLE_CAPTION, (row["caption"] or "").encode("utf-8")),
            ):
                self._tar.add(f"{row['key']}.{suffix}", data)
        except OSError as e:  # e.g. no space left: name the shard being written
            raise naming(e, self._tar_tmp_path or "") from e
        self._samples += 1
        _kill_point("sample")

    def _drop_tmp(self) -> None:
        if self._tar_tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tar_tmp_path)
            self._tar_tmp_path = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _close_tar(self, sync: bool = False) -> None:
        if self._tar is None:
            return
        tar, f = self._tar, self._tar_file
        self._tar = self._tar_file = None  # closed even when ending it fails (no space left)
        try:
            try:
                tar.close()  # ends the tar stream, not the file under it
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                f.close()
        except OSError as e:
            raise naming(e, self._tar_tmp_path or "") from e

    def _publish_shard(self, n: int) -> None:
        """Move the finished temporary shard to its final name (the shard's commit)."""
        assert self._tar_tmp_path is not None
        final = join(self.root, _shard_rel(n))
        if self._local:
            os.replace(self._tar_tmp_path, final)
            fd = os.open(os.path.dirname(final), os.O_RDONLY)
            try:
                os.fsync(fd)  # make the rename durable
            finally:
                os.close(fd)
        else:
            self._st.upload(self._tar_tmp_path, final)
            os.remove(self._tar_tmp_path)
        self._tar_tmp_path = None
        _kill_point("shard")

    # -- commit ------------------------------------------------------------------------------

    def _commit(self) -> None:
        """Shard, then index part, then sources part (the marker); each write atomic."""
        if not self._source_rows:
            return
        self._lock.check()
        n = self._next
        self._close_tar(sync=self._local)
        if self._samples:
            self._publish_shard(n)
        index = _table(self._index_rows, schemas.CLIP_SCHEMA)
        sources = _table(self._source_rows, schemas.SOURCE_SCHEMA)
        self._write_part(n, index, sources)
        for key, value in _counts(index, sources).items():
            self._run_counts[key] += value
        self._done |= self._in_part
        self._in_part = set()
        self._index_rows, self._source_rows, self._samples = [], [], 0

    def _write_part(self, n: int, index: pa.Table, sources: pa.Table) -> None:
        self._lock.check()
        self._st.write(join(self.root, schemas.INDEX_DIR, _part_name(n)), _parquet_bytes(index))
        _kill_point("index")
        self._st.write(join(self.root, schemas.SOURCES_DIR, _part_name(n)), _parquet_bytes(sources))
        _kill_point("sources")
        self._next = n + 1

    def rewrite(self, rows_by_source: Mapping[str, Sequence[Mapping[str, Any]]]) -> int:
        """Commit a part (no shard) that replaces the index rows of committed sources.

        See :func:`rewrite_sources_rows`. Returns the part number written (-1 if empty).
        """
        if self._pending or self._index_rows or self._source_rows:
            raise ValueError("rewrite needs a writer with nothing uncommitted")
        if not rows_by_source:
            return -1
        _, live_sources, index_all = _read_committed(
            self.root, None, ("shard", "key"), live=False, history=True
        )
        assert index_all is not None
        samples = set(
            zip(
                index_all.column("shard").to_pylist(),
                index_all.column("key").to_pylist(),
                strict=True,
            )
        )
        samples.discard((None, None))
        latest_sources = {r["source"]: r for r in live_sources.to_pylist()}
        index_rows: list[dict[str, Any]] = []
        source_rows: list[dict[str, Any]] = []
        for source, rows in rows_by_source.items():
            if source not in latest_sources:
                raise ValueError(f"rewrite: {source!r} is not a committed source of {self.root}")
            for row in rows:
                out = _cast_row(row, schemas.CLIP_SCHEMA, {})
                if out["source"] != source:
                    raise ValueError(f"rewrite: row of {out['source']!r} given for {source!r}")
                _check_clip(out)
                if out["status"] != "kept":
                    out["shard"] = out["key"] = None  # only kept clips point at samples
                elif (out["shard"] or out["key"]) and (out["shard"], out["key"]) not in samples:
                    raise ValueError(
                        f"rewrite: clip {out['clip_id']} of {source!r} points at "
                        f"{out['shard']}:{out['key']}, which no committed part wrote"
                    )
                index_rows.append(out)
            source_rows.append({**latest_sources[source], "num_clips": len(rows)})
        n = self._next
        self._write_part(
            n,
            _table(index_rows, schemas.CLIP_SCHEMA),
            _table(source_rows, schemas.SOURCE_SCHEMA),
        )
        needing = _needing_work(_table(index_rows, schemas.CLIP_SCHEMA))
        self._done = (self._done | set(rows_by_source)) - needing
        return n

    def close(self, drop_incomplete: bool = False) -> dict[str, int]:
        """Commit everything complete; return this run's counts (``schemas.COUNT_KEYS``).

        Sources still missing rows are not committed (the next run builds them): an
        error naming them, or with ``drop_incomplete`` (the stream was stopped early)
        dropped silently.
        """
        self._commit()
        self._close_tar()
        self._drop_tmp()
        if drop_incomplete:
            self._pending.clear()
        if self._pending:
            missing = {
                s: f"{len(p.rows)}/{p.expected or '?'} rows"
                for s, p in sorted(self._pending.items())
            }
            raise ValueError(f"incomplete sources at close (not committed): {missing}")
        return dict(self._run_counts)

    def abort(self) -> None:
        """Drop everything uncommitted (the stream failed); committed parts stay."""
        with contextlib.suppress(OSError):  # e.g. the disk is full: the file goes anyway
            self._close_tar()
        self._drop_tmp()
        self._pending.clear()
        self._in_part = set()
        self._index_rows, self._source_rows, self._samples = [], [], 0

    def write_manifest(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``manifest.json`` atomically: ``extra`` plus schema version, package
        version, time and counts over the whole corpus on storage. Returns what was written."""
        manifest = {
            "reelpack_version": _package_version(),
            **extra,
            "schema_version": schemas.SCHEMA_VERSION,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "counts": corpus_counts(self.root),
        }
        data = json.dumps(manifest, indent=2, allow_nan=False).encode("utf-8")
        self._lock.check()
        self._st.write(join(self.root, schemas.MANIFEST_NAME), data)
        _kill_point("manifest")
        return manifest


class _TarStream:
    """A write-only tar stream, byte for byte what ``tarfile`` (mode "w", PAX) writes.

    ``tarfile.addfile`` copies member data in 16 KiB pieces; shards are mostly large
    latents, so this writes each member's header, data and padding in three calls.
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self.offset = 0  # bytes written so far

    def add(self, name: str, data: bytes) -> None:
        """One read-only regular file. Fixed mtime and owner: a re-run writes identical bytes."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "reelpack"
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        pad = -len(data) % _TAR_BLOCK
        self._f.write(header)
        self._f.write(data)
        self._f.write(b"\0" * pad)
        self.offset += len(header) + len(data) + pad

    def close(self) -> None:
        """The end-of-archive marker (two zero blocks), padded to a whole record."""
        end = self.offset + 2 * _TAR_BLOCK
        end += -end % tarfile.RECORDSIZE
        self._f.write(b"\0" * (end - self.offset))
        self.offset = end


def _kept_without(out: dict[str, Any], source: str, what: str) -> None:
    """A kept clip the writer cannot store: an error row saying what it lacked."""
    out["status"] = "error"
    out["error"] = (
        f"clip {out['clip_id']} of {source} was kept but reached the writer without {what}"
    )


def _has_bytes(value: Any) -> bool:
    return (
        value is not None
        and not (isinstance(value, float) and math.isnan(value))
        and len(value) > 0
    )


def _check_clip(row: dict[str, Any]) -> None:
    cid = row["clip_id"]
    if not isinstance(cid, str) or not SAMPLE_KEY_RE.match(cid):
        # The id becomes the sample key and tar member names: no dots (webdataset splits
        # keys at the first dot), no path separators or "..", nothing unprintable.
        raise ValueError(
            f"clip_id {cid!r} of {row['source']!r} cannot be a shard key "
            f"(must match {SAMPLE_KEY_RE.pattern})"
        )
    if row["status"] not in schemas.CLIP_STATUSES:
        raise ValueError(f"clip {cid!r} of {row['source']!r}: unknown status {row['status']!r}")


def _package_version() -> str:
    try:
        return importlib.metadata.version("reelpack")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def rewrite_sources_rows(
    root: str, rows_by_source: Mapping[str, Sequence[Mapping[str, Any]]]
) -> int:
    """Record new index rows for committed sources without touching old files.

    Appends one committed part (``index/part-N`` then ``sources/part-N``, no shard)
    whose rows replace, by "latest part wins", every earlier row of each given
    source. ``rows_by_source[source]`` is the source's complete new list of clip rows
    (CLIP_SCHEMA columns; typically the latest rows from :func:`read_index` with
    ``status``/``reasons`` changed). Rows that are not ``kept`` lose ``shard``/``key``;
    a ``kept`` row either keeps a (shard, key) that a committed part wrote, or has none,
    which puts its source into :func:`sources_needing_work` for the next build. The
    source's row is carried over with ``num_clips`` updated. Raises ValueError for an
    uncommitted source or a row that does not fit; nothing is written then. Like any
    writer, it must not run while a build writes to the same root.
    """
    with CorpusWriter(root) as writer:
        return writer.rewrite(rows_by_source)
