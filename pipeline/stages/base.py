"""The batch contract shared by every stage.

A batch is Ray Data's ``numpy`` batch format: a dict of equal-length 1-D numpy
arrays, one per column (object arrays for strings, bytes and lists). Stages take
a batch and return a batch; a 1:1 stage returns the same rows with columns
added or replaced, a 1:N stage returns more rows. Stages never drop a row
silently: a failure becomes ``status="error"`` with a reason in ``error``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import STREAM_TYPES

__all__ = [
    "Batch",
    "batch_to_rows",
    "clean_batch",
    "fused_stages",
    "metered",
    "num_rows",
    "rows_to_batch",
    "stage_actor",
    "stage_task",
    "with_columns",
]

Batch = dict[str, np.ndarray]

# (stage, rows in, rows out, busy seconds) after each batch: see pipeline.progress.StageMeter
Meter = Callable[[str, int, int, float], None]


def num_rows(batch: Mapping[str, Any]) -> int:
    """Number of rows in a batch (0 for an empty dict)."""
    for values in batch.values():
        return len(values)
    return 0


def _to_array(values: Sequence[Any]) -> np.ndarray:
    """Column values to a 1-D array; anything non-numeric becomes an object array."""
    if values and all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=bool)
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if values and all(
        isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool)
        for v in values
    ):
        return np.asarray(values, dtype=np.float64)
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


def rows_to_batch(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] = ()) -> Batch:
    """Rows (dicts) to a batch; missing values become ``None``.

    ``columns`` fixes the column set even when ``rows`` is empty.
    """
    rows = list(rows)
    names: list[str] = list(columns)
    for row in rows:
        names.extend(k for k in row if k not in names)
    return {name: _to_array([row.get(name) for row in rows]) for name in names}


def batch_to_rows(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A batch to a list of plain row dicts (numpy scalars left as they are)."""
    n = num_rows(batch)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def with_columns(batch: Mapping[str, np.ndarray], **columns: Sequence[Any] | np.ndarray) -> Batch:
    """A copy of ``batch`` with ``columns`` added or replaced (same row count)."""
    n = num_rows(batch)
    out = dict(batch)
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values for {n} rows")
        out[name] = values if isinstance(values, np.ndarray) else _to_array(list(values))
    return out


def _is_list_type(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    )


def _is_nan(value: Any) -> bool:
    """Float NaN, numpy's included (``np.float32`` is no ``float``)."""
    return isinstance(value, (float, np.floating)) and value != value


def _plain(value: Any) -> Any:
    """A list cell as a plain (nested) Python list; None for missing."""
    if value is None or _is_nan(value):
        return None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def clean_batch(batch: Batch) -> Batch:
    """``batch`` with its columns in one form whatever the block, so that Ray can join
    the blocks of different sources into one batch:

    - missing values that arrived as float NaN in a column that is not a float column
      (text, flags, counts: a column with None in it that went through Arrow or
      pandas; or such NaN copied cell by cell into an object column by a stage) are
      None again, other values restored to their type; otherwise a block of one
      source (a flag all None) and one of another (flags set) cannot be concatenated;
    - list columns (``reasons``, ``latent_shape``, embeddings...) hold plain Python
      lists or None: equal-shape numpy cells (or a 2-D array) would become a tensor
      column in one block and an object column in another with a None, and Ray
      refuses to concatenate those.
    """
    for name, values in batch.items():
        kind = STREAM_TYPES.get(name)
        if kind is None:
            continue
        if _is_list_type(kind):
            out = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                out[i] = _plain(v)
            batch[name] = out
            continue
        if values.ndim != 1 or pa.types.is_floating(kind):
            continue
        if values.dtype.kind == "O":
            if any(_is_nan(v) for v in values):
                batch[name] = _none_for_nan(values)
            continue
        if values.dtype.kind != "f":
            continue
        cast: Callable[[Any], Any] | None = None
        if pa.types.is_boolean(kind):
            cast = bool
        elif pa.types.is_integer(kind):
            cast = int
        out = np.empty(len(values), dtype=object)
        for i, v in enumerate(values):
            out[i] = None if (cast is None or v != v) else cast(v)
        batch[name] = out
    return batch


def _none_for_nan(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = None if _is_nan(v) else v
    return out


def _timed(fn: Callable[[Batch], Batch], batch: Batch, name: str, meter: Meter | None) -> Batch:
    t0 = time.perf_counter()
    out = fn(batch)
    if meter is not None:
        meter(name, num_rows(batch), num_rows(out), time.perf_counter() - t0)
    return out


def _streamed(
    chunks: Iterator[Batch], rows_in: int, name: str, meter: Meter | None
) -> Iterator[Batch]:
    """The chunks of a streaming stage, cleaned, each reported to ``meter``."""
    t0 = time.perf_counter()
    for out in chunks:
        if meter is not None:
            meter(name, rows_in, num_rows(out), time.perf_counter() - t0)
            rows_in = 0
        yield clean_batch(out)
        t0 = time.perf_counter()


def metered(
    fn: Callable[[Batch], Batch], name: str, meter: Meter | None
) -> Callable[[Batch], Batch]:
    """``fn`` reporting each batch's rows and busy time to ``meter`` as stage ``name``."""
    if meter is None:
        return fn

    def run(batch: Batch) -> Batch:
        return _timed(fn, batch, name, meter)

    run.__name__ = run.__qualname__ = getattr(fn, "__name__", name)
    return run


def stage_task(
    stage_cls: Any, *args: Any, name: str | None = None, meter: Meter | None = None
) -> Callable[[Batch], Batch | Iterator[Batch]]:
    """A stateless stage as a batch function for Ray tasks: a fresh ``stage_cls(*args)``
    per call, named after the stage (Ray Data names operators and stats by it); with
    ``meter``, each batch is reported as stage ``name``. A stage with a ``stream(batch)``
    method is run through it: Ray Data takes the generator's chunks as they come.

    Defined in this small module, and pickled by value with only the stage class (by
    reference), its arguments and the meter, so a worker imports just the stage's own
    module.
    """
    label = name or str(getattr(stage_cls, "__name__", "stage"))

    def run(batch: Batch) -> Batch | Iterator[Batch]:
        stage = stage_cls(*args)
        if hasattr(stage, "stream"):  # a 1:N stage that hands rows on in chunks
            return _streamed(stage.stream(batch), num_rows(batch), label, meter)
        return _timed(lambda b: clean_batch(stage(b)), batch, label, meter)

    run.__name__ = run.__qualname__ = getattr(stage_cls, "__name__", "stage")
    return run


# Test hook: an actor stage's worker aborts (as a crashing kernel or the OOM killer ends
# it) on a batch holding a clip of a source whose URI contains the text after the colon,
# in the stage before it: "aesthetic:crashes" (as split's REELPACK_TEST_CRASH_ON).
ACTOR_CRASH_ENV = "REELPACK_TEST_CRASH_IN"


def _crash_hook(stage: str, batch: Batch) -> None:
    target, _, text = os.environ.get(ACTOR_CRASH_ENV, "").partition(":")
    if target != stage or not text or "clip_id" not in batch:
        return
    pairs = zip(batch["source"], batch["clip_id"], strict=True)
    if any(clip is not None and text in str(source) for source, clip in pairs):
        os.abort()


def stage_actor(stage_cls: Any, name: str | None = None, meter: Meter | None = None) -> type:
    """``stage_cls`` for a Ray actor pool: the same class, its output batches passed
    through :func:`clean_batch`, named after the stage; with ``meter``, each batch is
    reported as stage ``name``."""
    label = name or stage_cls.__name__

    def call(self: Any, batch: Batch) -> Batch:
        _crash_hook(label, batch)
        return _timed(lambda b: clean_batch(stage_cls.__call__(self, b)), batch, label, meter)

    return type(stage_cls.__name__, (stage_cls,), {"__call__": call})


# One member of fused_stages: (label, stage class, constructor args, model stage?, batch size)
Member = tuple[str, Any, tuple[Any, ...], bool, int | None]


def fused_stages(members: Sequence[Member], meter: Meter | None = None) -> type:
    """Consecutive stages as one actor class: each batch runs through the members in
    order. A model stage (``True``) is built once per actor, as :func:`stage_actor`
    builds it; a stateless stage afresh per batch, as :func:`stage_task` runs it. Each
    member sees slices of at most its own batch size (a VAE that encodes one clip at a
    time still does, in a pool fed the captioner's batches of four), and reports to
    ``meter`` under its own label, so progress and per-stage counts read as for
    separate pools."""
    specs = list(members)

    class Fused:
        def __init__(self) -> None:
            self.members: list[tuple[Callable[[Batch], Any], int | None]] = []
            for label, cls, args, is_model, size in specs:
                if is_model:
                    fn: Callable[[Batch], Any] = stage_actor(cls, label, meter)(*args)
                else:
                    fn = stage_task(cls, *args, name=label, meter=meter)
                self.members.append((fn, size))

        def __call__(self, batch: Batch) -> Batch:
            for fn, size in self.members:
                batch = _in_slices(fn, batch, size)
            return batch

    name = "+".join(str(cls.__name__) for _, cls, _, _, _ in specs)
    return type(name, (Fused,), {"__qualname__": name})


def _in_slices(fn: Callable[[Batch], Batch], batch: Batch, size: int | None) -> Batch:
    """``fn`` over ``batch`` in slices of at most ``size`` rows, joined again."""
    n = num_rows(batch)
    if size is None or n <= size:
        return fn(batch)
    rows: list[dict[str, Any]] = []
    for start in range(0, n, size):
        rows += batch_to_rows(fn({k: v[start : start + size] for k, v in batch.items()}))
    return clean_batch(rows_to_batch(rows))
