"""Validate a corpus on storage: index, shards and manifest agree, nothing is unsafe.

``inspect_corpus(root)`` reads a corpus (local folder or ``s3://``) the way a
trainer would and lists every problem it finds:

- files: only ``part-NNNNNN.parquet`` / ``shard-NNNNNN.tar`` names; every committed
  part has its index part; no uncommitted leftovers (a part or shard without a
  ``sources`` part: a killed run that was not resumed yet);
- index (latest part per source, see ``pipeline.writer``): unique clip ids, known
  statuses, ``num_clips`` of each source equals its clip rows, every kept row has a
  shard and key, ``num_tokens`` matches ``latent_shape`` at the manifest's patch size;
- shards: every member is a regular file named ``<key>.<suffix>`` with a safe key and
  a known suffix (never ``.pyd``/``.pickle`` or any other code-carrying member, no
  absolute paths or ``..``); every sample is complete; every kept row points at an
  existing sample whose safetensors header has the recorded latent shape (bf16) and
  extra resolutions and caption embeddings (``text_embeds``, ``[L, dim]`` of the
  manifest's ``text_encoder``; none when it names none), whose JSON names the clip
  and whose caption matches; no member
  belongs to no committed row (orphan). Samples of superseded rows (a refilter) are
  counted as ``stale_samples``, not problems;
- manifest: present, current schema version, counts equal to the index;
- clip files, when the manifest's config wrote them (``write.clip_files``): every kept
  row has its ``clips/<key>.mp4``. Files of clips no longer kept (a refilter) are
  counted as ``stale_clip_files``, not problems;
- build configs: the config each source names (``config_hash``) is stored as
  ``configs/<hash>.json``.

Only safetensors headers, JSON and text are parsed; nothing is unpickled and
latent tensors are not loaded (the header gives dtype and shape). With ``verify``,
every kept sample's latents are read whole and checked against the CRC-32 its index
row records (``latents_crc32``): a corrupt shard (a bad disk, a copy cut short) is
found, at the cost of reading every shard once.

    report = inspect_corpus("s3://bucket/corpus")
    if not report.ok:
        print("\\n".join(report.problems))
"""

from __future__ import annotations

import itertools
import json
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas
from pipeline.storage import Storage, join, storage_for
from pipeline.writer import (
    _PART_RE,
    _SHARD_RE,
    SAMPLE_KEY_RE,
    _counts,
    not_a_folder,
    read_committed,
)

__all__ = ["ALLOWED_SUFFIXES", "InspectReport", "inspect_corpus"]

ALLOWED_SUFFIXES = (schemas.SAMPLE_LATENTS, schemas.SAMPLE_META, schemas.SAMPLE_CAPTION)
_PICKLE_SUFFIXES = ("pyd", "pickle", "pkl", "pth", "pt", "npy", "npz", "ckpt", "bin")
_MAX_HEADER = 1 << 24  # a safetensors header larger than 16 MiB is not ours


@dataclass
class InspectReport:
    """What :func:`inspect_corpus` found; ``ok`` when ``problems`` is empty."""

    root: str
    problems: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "ok": self.ok, "problems": self.problems, "stats": self.stats}


@dataclass
class _Member:
    """One sample's members in one shard."""

    suffixes: dict[str, tuple[int, int]] = field(default_factory=dict)  # suffix -> (offset, size)


def _numbered(
    st: Storage, root: str, directory: str, pattern: Any, problems: list[str]
) -> dict[int, str]:
    out: dict[int, str] = {}
    for uri in st.list(join(root, directory)):
        name = uri.rsplit("/", 1)[-1]
        m = pattern.search(name)
        if m is None:
            problems.append(f"{directory}/{name}: unexpected file (leftover or foreign)")
        else:
            out[int(m.group(1))] = uri
    return out


def _check_files(st: Storage, root: str, problems: list[str]) -> tuple[dict[int, str], set[int]]:
    """Shard files by number, and the committed part numbers."""
    sources = _numbered(st, root, schemas.SOURCES_DIR, _PART_RE, problems)
    index = _numbered(st, root, schemas.INDEX_DIR, _PART_RE, problems)
    shards = _numbered(st, root, schemas.SHARDS_DIR, _SHARD_RE, problems)
    committed = set(sources)
    for n in sorted(committed - set(index)):
        problems.append(f"sources part {n:06d} is committed but index part {n:06d} is missing")
    for n in sorted(set(index) - committed):
        problems.append(f"index part {n:06d} is not committed (leftover of a killed run)")
    for n in sorted(set(shards) - committed):
        problems.append(f"shards/shard-{n:06d}.tar is not committed (leftover of a killed run)")
    return shards, committed


def _tokens(shape: list[int], patch: list[int]) -> int | None:
    if len(shape) != 4 or len(patch) != 3:
        return None
    _, t, h, w = shape
    if t % patch[0] or h % patch[1] or w % patch[2]:
        return None
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


# the index columns the checks read (and ``source``): no score, embedding or frame list
# a check does not read (a million clips' CLIP embeddings are 3 GB)
_CHECKED_COLUMNS = [
    "clip_id",
    "status",
    "shard",
    "key",
    "num_tokens",
    "latent_shape",
    "latents_crc32",
    "caption",
    "extra_latents",
    "extra_latent_shapes",
]
_BATCH_ROWS = 65_536  # rows made Python objects at a time by the row checks


class _ByShard:
    """A table's rows grouped by their ``shard`` (sorted by it, stably: one shard's rows
    keep their order). Only one shard's rows are made Python objects at a time, so
    checking a corpus of millions of clips holds Arrow columns, not millions of dicts."""

    def __init__(self, table: pa.Table) -> None:
        table = table.set_column(
            table.schema.get_field_index("shard"), "shard", pc.fill_null(table["shard"], "")
        )
        self.table = table.take(pc.sort_indices(table, sort_keys=[("shard", "ascending")]))
        codes = pc.dictionary_encode(self.table["shard"]).combine_chunks()
        order = codes.indices.to_numpy(zero_copy_only=False)
        names = codes.dictionary.to_pylist()
        starts = np.flatnonzero(np.diff(order)) + 1 if len(order) else np.zeros(0, np.int64)
        bounds = [0, *starts.tolist(), len(order)] if len(order) else []
        self.spans: dict[str, tuple[int, int]] = {
            names[order[a]]: (a, b) for a, b in itertools.pairwise(bounds)
        }

    def _slice(self, shard: str) -> pa.Table:
        a, b = self.spans.get(shard, (0, 0))
        return self.table.slice(a, b - a)

    def rows(self, shard: str) -> dict[str, dict[str, Any]]:
        """The rows of ``shard`` by key (of two with one key, the later)."""
        return {r["key"]: r for r in self._slice(shard).to_pylist()}

    def keys(self, shard: str) -> set[str]:
        return set(self._slice(shard).column("key").to_pylist())

    def num_keys(self, shard: str) -> int:
        return int(pc.count_distinct(self._slice(shard).column("key")).as_py())


def _check_rows(
    index: pa.Table, sources: pa.Table, patch: list[int] | None, problems: list[str]
) -> _ByShard:
    """Row-level checks on the latest index; returns the kept rows that point at a
    sample, by shard."""
    ids = pc.value_counts(index["clip_id"])
    counts = ids.field("counts").to_numpy()
    for n in np.flatnonzero(counts > 1):
        cid = ids.field("values")[int(n)].as_py()
        problems += [f"clip {cid}: more than one index row"] * (int(counts[n]) - 1)
    status = index["status"]
    known = pc.is_in(status, value_set=pa.array(list(schemas.CLIP_STATUSES)), skip_nulls=False)
    for r in _pylist(index.filter(pc.invert(known)), ["clip_id", "status"]):
        problems.append(f"clip {r['clip_id']}: unknown status {r['status']!r}")
    kept = pc.fill_null(pc.equal(status, "kept"), False)
    shard, key = pc.fill_null(index["shard"], ""), pc.fill_null(index["key"], "")
    has_shard, has_key = pc.not_equal(shard, ""), pc.not_equal(key, "")
    pointing = pc.and_(pc.invert(kept), pc.or_(has_shard, has_key))
    for r in _pylist(index.filter(pointing), ["clip_id", "status"]):
        problems.append(f"clip {r['clip_id']}: status {r['status']} but points at a sample")
    for r in _pylist(
        index.filter(pc.and_(kept, pc.invert(pc.and_(has_shard, has_key)))), ["clip_id"]
    ):
        problems.append(f"clip {r['clip_id']}: kept but has no shard/key (needs a rebuild)")
    live = index.filter(pc.and_(kept, pc.and_(has_shard, has_key)))
    _check_claims(live, problems)
    if patch is not None:
        for r in _pylist(live, ["clip_id", "num_tokens", "latent_shape"]):
            if r["num_tokens"] != _tokens(r["latent_shape"] or [], patch):
                problems.append(
                    f"clip {r['clip_id']}: num_tokens {r['num_tokens']} does not match "
                    f"latent_shape {r['latent_shape']} at patch {patch}"
                )
    by_source = pc.value_counts(index["source"])
    per_source = dict(
        zip(
            by_source.field("values").to_pylist(),
            by_source.field("counts").to_pylist(),
            strict=True,
        )
    )
    for s in _pylist(sources, ["source", "num_clips"]):
        got = per_source.get(s["source"], 0)
        if (s["num_clips"] or 0) != got:
            problems.append(
                f"source {s['source']}: num_clips {s['num_clips']} but {got} index rows"
            )
    for s in set(per_source) - set(sources.column("source").to_pylist()):
        problems.append(f"source {s}: has index rows but no committed source row")
    return _ByShard(live)


def _check_claims(live: pa.Table, problems: list[str]) -> None:
    """Two kept rows pointing at one sample: each row after the first is named."""
    pairs = live.group_by(["shard", "key"]).aggregate([([], "count_all")])
    twice = pairs.filter(pc.greater(pairs["count_all"], 1))
    if twice.num_rows == 0:
        return
    claimed = set(zip(twice["shard"].to_pylist(), twice["key"].to_pylist(), strict=True))
    seen: set[tuple[str, str]] = set()
    suspects = live.filter(pc.is_in(live["shard"], value_set=twice["shard"].combine_chunks()))
    for r in _pylist(suspects, ["clip_id", "shard", "key"]):
        pair = (r["shard"], r["key"])
        if pair in claimed and pair in seen:
            problems.append(f"clip {r['clip_id']}: sample {pair[0]}:{pair[1]} claimed twice")
        seen.add(pair)


def _pylist(table: pa.Table, columns: list[str]) -> Iterator[dict[str, Any]]:
    """``columns`` of ``table``'s rows as dicts, a batch at a time."""
    for batch in table.select(columns).to_batches(max_chunksize=_BATCH_ROWS):
        yield from batch.to_pylist()


def _member_name(name: str, shard: str, problems: list[str]) -> tuple[str, str] | None:
    """(key, suffix) of a safe, known member name; None (and a problem) otherwise."""
    if name.startswith("/") or "\\" in name or ".." in name.split("/") or "/" in name:
        problems.append(f"{shard}: unsafe member name {name!r} (absolute, nested or '..')")
        return None
    key, _, suffix = name.partition(".")
    if suffix.rsplit(".", 1)[-1].lower() in _PICKLE_SUFFIXES:
        problems.append(f"{shard}: member {name!r} would need unpickling; refused")
        return None
    if not SAMPLE_KEY_RE.match(key) or suffix not in ALLOWED_SUFFIXES:
        problems.append(f"{shard}: unexpected member {name!r}")
        return None
    return key, suffix


def _read_shard(st: Storage, uri: str, shard: str, problems: list[str]) -> dict[str, _Member]:
    samples: dict[str, _Member] = {}
    with st.open(uri) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                problems.append(f"{shard}: member {info.name!r} is not a regular file")
                continue
            parsed = _member_name(info.name, shard, problems)
            if parsed is None:
                continue
            key, suffix = parsed
            member = samples.setdefault(key, _Member())
            if suffix in member.suffixes:
                problems.append(f"{shard}: member {info.name!r} appears twice")
            member.suffixes[suffix] = (info.offset_data, info.size)
    return samples


def _read_at(st: Storage, uri: str, offset: int, size: int) -> bytes:
    return st.read_range(uri, offset, offset + size)


def _safetensors_header(data_head: bytes, size: int) -> dict[str, Any]:
    if len(data_head) < 8:
        raise ValueError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data_head[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise ValueError(f"header length {n} does not fit a {size}-byte member")
    header: dict[str, Any] = json.loads(data_head[8 : 8 + n])
    return header


def _check_sample(
    st: Storage,
    uri: str,
    shard: str,
    key: str,
    member: _Member,
    row: dict[str, Any],
    problems: list[str],
    verify: bool = False,
    text_dim: int | None = None,
) -> None:
    cid = row["clip_id"]
    off, size = member.suffixes[schemas.SAMPLE_LATENTS]
    crc = row.get("latents_crc32")
    if verify and crc is not None:
        read = zlib.crc32(_read_at(st, uri, off, size))
        if read != crc:
            problems.append(
                f"{shard}:{key}: latents fail their CRC-32 (index {crc:08x}, read {read:08x}): "
                f"the shard is corrupt (clip {cid})"
            )
    head = _read_at(st, uri, off, min(size, 8))
    try:
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = _safetensors_header(_read_at(st, uri, off, min(size, 8 + n)), size)
    except (ValueError, struct.error) as e:
        problems.append(f"{shard}:{key}: latents are not safetensors: {e}")
        return
    want = {schemas.TENSOR_LATENTS: row["latent_shape"]}
    for name, shape in zip(
        row["extra_latents"] or [], row["extra_latent_shapes"] or [], strict=False
    ):
        want[name] = shape
    for name, shape in want.items():
        got = header.get(name)
        if not isinstance(got, dict):
            problems.append(f"{shard}:{key}: tensor {name!r} missing (clip {cid})")
        elif got.get("shape") != shape or got.get("dtype") != "BF16":
            problems.append(
                f"{shard}:{key}: tensor {name!r} is {got.get('dtype')} {got.get('shape')}, "
                f"index says BF16 {shape} (clip {cid})"
            )
    _check_text_embeds(header.get(schemas.TENSOR_TEXT_EMBEDS), text_dim, f"{shard}:{key}", problems)
    off, size = member.suffixes[schemas.SAMPLE_META]
    try:
        meta = json.loads(_read_at(st, uri, off, size))
    except ValueError as e:
        problems.append(f"{shard}:{key}: metadata is not JSON: {e}")
        meta = {}
    if meta and meta.get("clip_id") != cid:
        problems.append(f"{shard}:{key}: metadata names clip {meta.get('clip_id')!r}, not {cid}")
    off, size = member.suffixes[schemas.SAMPLE_CAPTION]
    if _read_at(st, uri, off, size).decode("utf-8", "replace") != (row["caption"] or ""):
        problems.append(f"{shard}:{key}: caption differs from the index (clip {cid})")


def _check_text_embeds(got: Any, text_dim: int | None, where: str, problems: list[str]) -> None:
    """A sample's caption embeddings against the manifest's text encoder (``text_dim``:
    its width, None when the manifest names none): the trainer sizes the DiT by it."""
    name = schemas.TENSOR_TEXT_EMBEDS
    if text_dim is None:
        if isinstance(got, dict):
            problems.append(
                f"{where}: holds {name!r} but {schemas.MANIFEST_NAME} names no text_encoder: "
                "a trainer would leave the caption embeddings out (running the build "
                "again, nothing left to build, rewrites the manifest)"
            )
        return
    shape = got.get("shape") if isinstance(got, dict) else None
    if not (isinstance(shape, list) and len(shape) == 2 and shape[0] >= 1 and shape[1] == text_dim):
        what = f"is {shape}" if isinstance(got, dict) else "missing"
        problems.append(
            f"{where}: tensor {name!r} {what}, the manifest's text encoder gives "
            f"[L, {text_dim}] embeddings"
        )


def _check_shards(
    st: Storage,
    shards: dict[int, str],
    committed: set[int],
    live: _ByShard,
    history: pa.Table,
    problems: list[str],
    verify: bool = False,
    text_dim: int | None = None,
) -> dict[str, int]:
    ever = _ByShard(history)
    stats = {"shards_read": 0, "samples": 0, "stale_samples": 0, "orphan_samples": 0}
    read: set[str] = set()
    unreadable: dict[str, str] = {}
    for n, uri in sorted(shards.items()):
        if n not in committed:
            continue
        shard = f"{schemas.SHARDS_DIR}/shard-{n:06d}.tar"
        try:
            samples = _read_shard(st, uri, shard, problems)
        except (tarfile.TarError, OSError) as e:
            unreadable[shard] = f"unreadable tar ({e})"
            continue
        read.add(shard)
        stats["shards_read"] += 1
        rows = live.rows(shard)
        superseded: set[str] | None = None  # the shard's keys of every committed row
        for key, member in samples.items():
            stats["samples"] += 1
            missing = sorted(set(ALLOWED_SUFFIXES) - set(member.suffixes))
            if missing:
                problems.append(f"{shard}:{key}: incomplete sample, missing {missing}")
                rows.pop(key, None)  # found, if incomplete
                continue
            row = rows.pop(key, None)
            if row is not None:
                _check_sample(st, uri, shard, key, member, row, problems, verify, text_dim)
                continue
            superseded = ever.keys(shard) if superseded is None else superseded
            if key in superseded:
                stats["stale_samples"] += 1  # superseded by a later part: not live, not lost
            else:
                stats["orphan_samples"] += 1
                problems.append(f"{shard}:{key}: orphan sample (no committed index row)")
        for key in sorted(rows):  # live rows whose sample the shard does not hold
            problems.append(
                f"clip {rows[key]['clip_id']}: sample {shard}:{key} is not in the shard"
            )
    # a shard missing or unreadable as a whole: one line for all the clips it held
    held = {shard: live.num_keys(shard) for shard in live.spans if shard not in read}
    for shard in sorted(set(held) | set(unreadable)):
        what = unreadable.get(shard, "missing")
        lost_here = (
            f": the samples of {held[shard]} kept clip(s) are lost" if held.get(shard) else ""
        )
        problems.append(f"{shard}: {what}{lost_here}")
    return stats


def _read_manifest(st: Storage, root: str, problems: list[str]) -> dict[str, Any] | None:
    uri = join(root, schemas.MANIFEST_NAME)
    if not st.exists(uri):
        problems.append(f"{schemas.MANIFEST_NAME}: missing")
        return None
    try:
        manifest = json.loads(st.read(uri))
    except ValueError as e:
        problems.append(f"{schemas.MANIFEST_NAME}: not JSON: {e}")
        return None
    return manifest if isinstance(manifest, dict) else {}


def _check_manifest(
    manifest: dict[str, Any], counts: dict[str, int], problems: list[str]
) -> list[int] | None:
    """Manifest checks; returns its patch size when it has a usable one."""
    if manifest.get("schema_version") != schemas.SCHEMA_VERSION:
        problems.append(
            f"{schemas.MANIFEST_NAME}: schema_version {manifest.get('schema_version')!r}, "
            f"this reelpack reads {schemas.SCHEMA_VERSION}"
        )
    for key in ("vae", "patch_size", "counts"):
        if key not in manifest:
            problems.append(f"{schemas.MANIFEST_NAME}: no {key!r}")
    got = manifest.get("counts") or {}
    for key, value in counts.items():
        if got.get(key) != value:
            problems.append(
                f"{schemas.MANIFEST_NAME}: counts.{key} is {got.get(key)!r}, the index gives {value}"
            )
    patch = manifest.get("patch_size")
    if isinstance(patch, list) and len(patch) == 3 and all(isinstance(p, int) for p in patch):
        return patch
    return None


def _check_clip_files(
    st: Storage, root: str, live: _ByShard, problems: list[str]
) -> dict[str, int]:
    """Every kept row's ``clips/<key>.mp4`` exists; files of no kept row are stale."""
    names = {uri.rsplit("/", 1)[-1] for uri in st.list(join(root, schemas.CLIPS_DIR))}
    wanted = {
        schemas.clip_file(r["key"]).rsplit("/", 1)[-1]: r["clip_id"]
        for r in _pylist(live.table, ["key", "clip_id"])
    }
    for name, cid in sorted(wanted.items()):
        if name not in names:
            problems.append(f"clip {cid}: kept but {schemas.CLIPS_DIR}/{name} is missing")
    return {"clip_files": len(names & set(wanted)), "stale_clip_files": len(names - set(wanted))}


def _check_configs(st: Storage, root: str, sources: pa.Table, problems: list[str]) -> int:
    """Every source's ``config_hash`` names a stored config; the number of configs."""
    names = {uri.rsplit("/", 1)[-1] for uri in st.list(join(root, schemas.CONFIGS_DIR))}
    hashes = {h for h in sources.column("config_hash").to_pylist() if h is not None}
    for h in sorted(hashes):
        if schemas.config_file(h).rsplit("/", 1)[-1] not in names:
            problems.append(f"sources built with config {h}: {schemas.config_file(h)} is missing")
    return len(hashes)


def inspect_corpus(root: str, verify: bool = False) -> InspectReport:
    """Check the corpus at ``root``; see the module docstring for what is checked
    (``verify``: also every sample's latents against their checksum)."""
    st = storage_for(root)
    report = InspectReport(root)
    problems = report.problems
    not_folder = not_a_folder(root)
    if not_folder:  # nothing else to check
        problems.append(not_folder)
        return report
    shards, committed = _check_files(st, root, problems)
    if not committed:
        problems.append("no committed parts: not a corpus (or an empty one)")
    try:
        index, sources, history = read_committed(
            root, _CHECKED_COLUMNS, ("shard", "key"), history=True
        )
        assert history is not None
    except (OSError, pa.ArrowException) as e:
        problems.append(f"index unreadable: {e}")
        return report
    counts = _counts(index, sources)
    manifest = _read_manifest(st, root, problems)
    patch = None if manifest is None else _check_manifest(manifest, counts, problems)
    live = _check_rows(index, sources, patch, problems)
    text = (manifest or {}).get("text_encoder")
    text_dim = text.get("dim") if isinstance(text, dict) else None
    if text is not None and not (isinstance(text_dim, int) and text_dim > 0):
        problems.append(f"{schemas.MANIFEST_NAME}: text_encoder has no embedding width (dim)")
        text_dim = None
    stats = _check_shards(st, shards, committed, live, history, problems, verify, text_dim)
    write_cfg = ((manifest or {}).get("config") or {}).get("write") or {}
    if write_cfg.get("clip_files"):
        stats.update(_check_clip_files(st, root, live, problems))
    stats["build_configs"] = _check_configs(st, root, sources, problems)
    report.stats = {
        **counts,
        **stats,
        "parts": len(committed),
        "superseded_rows": history.num_rows - index.num_rows,
    }
    return report
