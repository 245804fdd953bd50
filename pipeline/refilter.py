"""Re-decide a built corpus from its stored scores: no decoding, no models.

``reelpack refilter ROOT --config FILE [--set KEY=VALUE]`` reads the index, applies the
``decide`` (and ``dedup``) sections of FILE and the ``--set`` items, laid over the
config the corpus was built with (:func:`load_refilter_config`), to the stored
``score_*``, ``frame_hash`` and ``clip_embedding`` columns, and records the new
decisions as one new index part (:func:`pipeline.writer.rewrite_sources_rows`: "latest
part wins", no shard is touched). Then:

- a clip that becomes rejected loses its sample pointer in the index (its sample
  stays in its shard, unreferenced);
- a clip that becomes kept gets its sample pointer back when an earlier part
  wrote one for it (it was kept once), else it is kept without latents, and its
  source is in ``pipeline.writer.sources_needing_work``: the next ``reelpack build``
  on the same output re-processes it (caption, encode);
- near-duplicates are redone over the clips that now pass, in a fixed order
  (clips with a sample first, then by clip id), so a rejected representative
  never suppresses a kept copy;
- ``manifest.json`` gets the new counts and the new ``decide`` / ``dedup`` config.

Nothing here imports a decoder or a model; ``tests/test_refilter.py`` proves it by
making every decoder and model loader raise.

Example::

    python -m reelpack.cli refilter /data/corpus --config retune.yaml --dry-run
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.stages.decide import DUPLICATE_REASON, LATE_SIGNALS, Decide, DecideConfig
from pipeline.stages.dedup import DedupConfig, DedupIndex, embedding_matrix
from schemas.yamltext import read_config_file

if TYPE_CHECKING:
    from pipeline.writer import CorpusWriter

__all__ = [
    "built_config",
    "load_refilter_config",
    "reason_counts",
    "redecide",
    "refilter",
    "status_counts",
]

_DECISION_COLUMNS = ("status", "reasons", "dup_of", "shard", "key")


def built_config(root: str) -> dict[str, Any]:
    """The resolved build config stored in the corpus's manifest; FileNotFoundError when
    ``root`` has no manifest (not a corpus, or one that never committed)."""
    from pipeline.writer import require_manifest

    config = require_manifest(root).get("config")
    return config if isinstance(config, dict) else {}


def _section(cls: type[Any], name: str, built: dict[str, Any], given: Any) -> Any:
    """Section ``name`` as the corpus was built (keys this version no longer knows
    dropped), with the file's keys laid over it."""
    from pipeline.config import from_dict

    known = {f.name for f in fields(cls)}
    base = {k: v for k, v in (built.get(name) or {}).items() if k in known}
    return from_dict(cls, {**base, **(given or {})}, name)


def load_refilter_config(
    path: str | Path | None,
    built: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> tuple[DecideConfig, DedupConfig]:
    """The ``decide`` and ``dedup`` settings to refilter with: ``built`` (the config the
    corpus was built with, :func:`built_config`; defaults where it is empty) with the
    file's ``decide`` and ``dedup`` keys, then the ``sets`` items (``KEY=VALUE``, as
    ``--set`` gives them), laid over it. A key they leave out keeps its value from the
    build: a file that retunes thresholds does not also change, say, the dedup
    threshold the build's preset chose, and a ``thresholds`` mapping changes only the
    signals it names (:func:`pipeline.stages.decide.edit_thresholds`).

    The whole file is validated like a build config (unknown keys are errors); model
    presets are *not* resolved: refiltering needs no model. ``sets`` may only name
    ``decide`` and ``dedup`` keys.
    """
    from pipeline.config import BuildConfig, from_dict, merge_layers, parse_overrides, validate

    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(path)
    over = parse_overrides(sets)
    outside = sorted(set(over) - {"decide", "dedup"})
    if outside:
        raise ValueError(f"--set {', '.join(outside)}: refilter changes only decide and dedup")
    built = built or {}
    built_decide = built.get("decide")
    base = DecideConfig().thresholds
    if isinstance(built_decide, dict) and "thresholds" in built_decide:
        base = built_decide["thresholds"]
    merged = merge_layers(base, [data, over])
    validate(from_dict(BuildConfig, merged))  # validation only
    return (
        _section(DecideConfig, "decide", built, merged.get("decide")),
        _section(DedupConfig, "dedup", built, merged.get("dedup")),
    )


def status_counts(table: pa.Table) -> dict[str, int]:
    """Clips by status."""
    return dict(Counter(table.column("status").to_pylist()))


def reason_counts(table: pa.Table) -> dict[str, int]:
    """Rejected clips by reason (a clip with several reasons counts under each)."""
    out: Counter[str] = Counter()
    for status, reasons in zip(
        table.column("status").to_pylist(), table.column("reasons").to_pylist(), strict=True
    ):
        if status == "rejected":
            out.update(reasons or ())
    return dict(sorted(out.items()))


def _batch(table: pa.Table) -> dict[str, np.ndarray]:
    """The columns Decide reads, as a numpy batch (no embeddings: they are large)."""
    names = [c for c in Decide.reads if c in table.column_names and c != "dup_of"]
    out: dict[str, np.ndarray] = {}
    for name in names:
        values = table.column(name).to_pylist()
        if name.startswith("score_") or name in ("start_s", "end_s"):
            out[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        else:
            col = np.empty(len(values), dtype=object)
            col[:] = values
            out[name] = col
    return out


_POINTER_COLUMNS = ("clip_id", "shard", "key")  # what _sample_pointers reads


def _sample_pointers(history: pa.Table | None) -> dict[str, tuple[str, str]]:
    """clip_id -> (shard, key) of the latest sample any committed part wrote for it."""
    if history is None:
        return {}
    out: dict[str, tuple[str, str]] = {}
    for cid, shard, key in zip(
        history.column("clip_id").to_pylist(),
        history.column("shard").to_pylist(),
        history.column("key").to_pylist(),
        strict=True,
    ):
        if shard and key:
            out[cid] = (shard, key)
    return out


def _dedup_order(kept: np.ndarray, has_sample: list[bool], ids: list[Any]) -> list[int]:
    """Clips that have (or had) a sample first (no re-encode), then by clip id."""
    return sorted(kept.tolist(), key=lambda i: (not has_sample[i], str(ids[i])))


def redecide(
    table: pa.Table,
    decide: DecideConfig,
    dedup: DedupConfig | None = None,
    history: pa.Table | None = None,
) -> pa.Table:
    """``table`` (index rows, CLIP_SCHEMA) with ``status``, ``reasons``, ``dup_of``,
    ``shard`` and ``key`` recomputed from the stored scores. Pure: no I/O.

    ``history`` (every committed index row, superseded ones included) lets a clip that
    becomes kept again point at the sample an earlier part wrote for it.
    """
    n = table.num_rows
    ids = table.column("clip_id").to_pylist()
    shards = table.column("shard").to_pylist()
    keys = table.column("key").to_pylist()
    # 1. thresholds, with every duplicate mark cleared (dedup is redone below)
    out = Decide(replace(decide, reject_duplicates=False))(_batch(table))
    status, reasons = out["status"], out["reasons"]
    dup_of = np.full(n, None, dtype=object)
    pointers = _sample_pointers(history)
    # 2. near-duplicates among the clips that pass, in a fixed order
    if dedup is not None and dedup.enabled and decide.reject_duplicates:
        has_sample = [bool(shards[i] and keys[i]) or ids[i] in pointers for i in range(n)]
        order = _dedup_order(np.flatnonzero(status == "kept"), has_sample, ids)
        take = pa.array(order, pa.int64())
        column = table.column("clip_embedding").take(take)
        matrix = embedding_matrix(column)  # no Python float per value
        embeddings = matrix if matrix is not None else column.to_pylist()
        hashes = table.column("frame_hash").take(take).to_pylist()
        found = DedupIndex(dedup).add([str(ids[i]) for i in order], embeddings, hashes)
        for i, rep in zip(order, found, strict=True):
            if rep is not None:
                dup_of[i], status[i] = rep, "rejected"
                reasons[i] = [*reasons[i], DUPLICATE_REASON]
    # 3. sample pointers: only kept clips have one; a clip kept again gets its old one
    for i in range(n):
        if status[i] != "kept":
            shards[i] = keys[i] = None
        elif not (shards[i] and keys[i]) and ids[i] in pointers:
            shards[i], keys[i] = pointers[ids[i]]
    new = {
        "status": pa.array(status.tolist(), pa.string()),
        "reasons": pa.array(
            [None if r is None else list(r) for r in reasons], pa.list_(pa.string())
        ),
        "dup_of": pa.array(dup_of.tolist(), pa.string()),
        "shard": pa.array(shards, pa.string()),
        "key": pa.array(keys, pa.string()),
    }
    for name, values in new.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _changed_sources(before: pa.Table, after: pa.Table) -> list[str]:
    changed: set[str] = set()
    sources = before.column("source").to_pylist()
    for name in _DECISION_COLUMNS:
        old, new = before.column(name).to_pylist(), after.column(name).to_pylist()
        changed.update(s for s, a, b in zip(sources, old, new, strict=True) if a != b)
    return sorted(changed)


def _write_manifest(
    writer: CorpusWriter, decide: DecideConfig, dedup: DedupConfig | None
) -> dict[str, Any] | None:
    """Refresh counts and the decide / dedup config of ``manifest.json``, if there is one."""
    from pipeline.config import to_dict
    from pipeline.writer import read_manifest

    manifest = read_manifest(writer.root)
    if manifest is None:
        return None
    extra = {
        k: v for k, v in manifest.items() if k not in ("schema_version", "created_at", "counts")
    }
    config = dict(extra.get("config") or {})
    config["decide"] = to_dict(decide)
    if dedup is not None and "dedup" in config:
        config["dedup"] = to_dict(dedup)
    extra["config"] = config
    if "config_hash" in extra:
        try:
            from pipeline.config import BuildConfig, config_hash, from_dict

            extra["config_hash"] = config_hash(from_dict(BuildConfig, config))
        except (TypeError, ValueError):
            extra.pop("config_hash")  # an older config layout: better none than a stale one
    return writer.write_manifest(extra)


def _rows_by_source(table: pa.Table, sources: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The rows of ``sources`` as dicts, each embedding one numpy array (not a Python
    float per value: a million 768-d embeddings are 25 GB as floats)."""
    subset = table.filter(pc.is_in(table.column("source"), value_set=pa.array(sources)))
    vectors: list[Any] | None = None
    if "clip_embedding" in subset.column_names:
        column = subset.column("clip_embedding")
        matrix = embedding_matrix(column)
        if matrix is not None and pc.list_flatten(column).null_count == 0:
            lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
            valid = column.is_valid().to_numpy(zero_copy_only=False)
            vectors = [  # a null cell stays None and an empty list empty
                row if n > 0 else ([] if ok else None)
                for row, n, ok in zip(matrix, lengths, valid, strict=True)
            ]
            subset = subset.drop_columns(["clip_embedding"])
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in sources}
    for i, row in enumerate(subset.to_pylist()):
        if vectors is not None:
            row["clip_embedding"] = vectors[i]
        out[row["source"]].append(row)
    return out


def refilter(
    root: str,
    decide: DecideConfig,
    dedup: DedupConfig | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Re-decide the corpus at ``root`` from its stored scores; rewrite only the index.

    Returns a summary: clips by status and rejections by reason, before and after;
    how many clips changed; the sources rewritten; the part written (None on a dry
    run or when nothing changed); and the sources the next build must re-process.
    """
    from pipeline.writer import CorpusWriter, read_committed, sources_needing_work

    # the live rows whole (they are rewritten), and of every committed row what leads
    # to its sample; each index part is read once
    before, _, history = read_committed(root, None, _POINTER_COLUMNS, history=True)
    after = redecide(before, decide, dedup, history)
    sources = _changed_sources(before, after)
    fields = ("status", "reasons", "dup_of")
    changed = sum(  # clips whose status, reasons or duplicate link changed
        a != b
        for a, b in zip(
            zip(*(before.column(name).to_pylist() for name in fields), strict=True),
            zip(*(after.column(name).to_pylist() for name in fields), strict=True),
            strict=True,
        )
    )
    part = None
    if sources and not dry_run:
        with CorpusWriter(root) as writer:  # the corpus lock, for the part and the manifest
            part = writer.rewrite(_rows_by_source(after, sources))
            _write_manifest(writer, decide, dedup)
    late = [s for s in LATE_SIGNALS if s in dict(decide.thresholds)]
    return {
        "root": root,
        "dry_run": dry_run,
        "clips": before.num_rows,
        "before": {"by_status": status_counts(before), "rejected_by_reason": reason_counts(before)},
        "after": {"by_status": status_counts(after), "rejected_by_reason": reason_counts(after)},
        "decision_changes": int(changed),
        "sources_rewritten": len(sources),
        "part": part,
        "sources_needing_work": sorted(sources_needing_work(root)) if not dry_run else None,
        "pending_signals": late,  # thresholds applied once the next build captions
    }
