"""The batch contract shared by every stage.

A batch is Ray Data's ``numpy`` batch format: a dict of equal-length 1-D numpy
arrays, one per column (object arrays for strings, bytes and lists). Stages take
a batch and return a batch; a 1:1 stage returns the same rows with columns
added or replaced, a 1:N stage returns more rows. Stages never drop a row
silently: a failure becomes ``status="error"`` with a reason in ``error``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Batch", "StageTask", "batch_to_rows", "num_rows", "rows_to_batch", "with_columns"]

Batch = dict[str, np.ndarray]


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


class StageTask:
    """A stateless stage as a batch function: a fresh ``stage_cls(*args)`` per call.

    What Ray tasks run. It lives in this small module so that a worker unpickling it
    imports only the stage's own module, not the graph and every model library.
    """

    def __init__(self, stage_cls: Any, *args: Any) -> None:
        self.stage_cls, self.args = stage_cls, args
        self.__name__ = getattr(stage_cls, "__name__", "stage")

    def __call__(self, batch: Batch) -> Batch:
        out: Batch = self.stage_cls(*self.args)(batch)
        return out
