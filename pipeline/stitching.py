"""Straggler handling: split long sources into frame ranges, and stitch them back.

A source longer than ``range_frames`` becomes several rows after probe, one per
frame range (:func:`expand_ranges`, 1:N); each range is split, scored, captioned
and encoded independently, so one long video no longer holds back a build. On the
driver, :class:`RangeStitcher` waits until every range of a source has arrived and
merges them with :func:`pipeline.stages.split.stitch`, which gives exactly the rows
of a single-range run (shots crossing a range boundary are decoded whole by the
range they start in). Ray-free.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.decode import Unseekable, frame_pts_table
from pipeline.stages.base import Batch, batch_to_rows, clean_batch, rows_to_batch
from pipeline.stages.probe import open_source
from pipeline.stages.split import SplitConfig, frame_ranges, stitch, supports_ranges

__all__ = ["RangeStitcher", "expand_ranges"]


def _int_or_none(value: Any) -> int | None:
    if value is None or value != value:  # None or NaN (Ray turns missing ints into NaN)
        return None
    return int(value)


def _frame_table(
    source: str, timeout_s: float, keyframes: list[int] | None = None
) -> list[int] | None:
    """Every frame's presentation time (:func:`pipeline.decode.frame_pts_table`; the
    keyframes' numbers into ``keyframes``), or None when the source cannot be demuxed
    within ``timeout_s`` (its ranges then demux on their own, under split's per-source
    time limit, and fail there with a reason). Raises
    :class:`pipeline.decode.Unseekable` for times no range could seek by."""
    try:
        with open_source(source) as container:
            return frame_pts_table(container, timeout_s, keyframes) or None
    except Unseekable:
        raise
    except Exception:
        return None


def seekable_ranges(ranges: list[tuple[int, int]], keyframes: list[int]) -> list[tuple[int, int]]:
    """``ranges`` (as :func:`pipeline.stages.split.frame_ranges` cuts them) merged where
    a range's decode would start at a keyframe at or before the previous range's start:
    a seek can only start at a keyframe, so in a stream with keyframes further apart
    than a range (one keyframe, intra refresh) each range would decode all before it
    again. Kept ranges start decoding less than a range before their start."""
    if len(ranges) <= 1 or not keyframes:
        return ranges
    starts = [ranges[0][0]]
    for start, _ in ranges[1:]:
        at = bisect.bisect_right(keyframes, start) - 1  # the keyframe a seek decodes from
        if at >= 0 and keyframes[at] > starts[-1]:
            starts.append(start)
    return [*itertools.pairwise(starts), (starts[-1], -1)]


def expand_ranges(batch: Mapping[str, Any], split_cfg: SplitConfig, range_frames: int) -> Batch:
    """1:N. Probe rows of long sources become one row per frame range; other rows pass
    through with ``range_count = 1``.

    A long source is demuxed once here for its frame table: the ranges are cut from its
    exact frame count, and every range row carries the table (``range_frame_pts``), so
    a range seeks and numbers its frames without reading the whole file itself; ranges
    that would decode their predecessor again are merged (:func:`seekable_ranges`). A
    source no range could seek into (:class:`pipeline.decode.Unseekable`: its times
    jump back, or its packets have none) stays whole."""
    out: list[dict[str, Any]] = []
    for row in batch_to_rows(batch):
        frames = _int_or_none(row.get("src_num_frames"))
        ranges = [(0, -1)]
        table = None
        if (
            range_frames > 0
            and row.get("src_status") == "done"
            and frames is not None
            and frames > range_frames
            and supports_ranges(split_cfg)
        ):
            keyframes: list[int] = []
            try:
                table = _frame_table(str(row["source"]), split_cfg.timeout_s, keyframes)
                ranges = frame_ranges(len(table) if table else frames, range_frames)
                ranges = seekable_ranges(ranges, keyframes) if table else ranges
            except Unseekable:
                pass  # decoded whole, from the start: one range

        ranged = len(ranges) > 1
        packed = np.asarray(table, "<i8").tobytes() if ranged and table else None
        for i, (start, end) in enumerate(ranges):
            out.append(
                dict(
                    row,
                    range_start_frame=start if ranged else None,
                    range_end_frame=(None if end < 0 else end) if ranged else None,
                    range_index=i,
                    range_count=len(ranges),
                    range_frame_pts=packed,
                )
            )
    return rows_to_batch(out, columns=list(batch))


@dataclass
class _Pending:
    count: int
    # per range, its rows by clip_id (a row seen twice, from a retried task, counts once)
    parts: dict[int, dict[Any, dict[str, Any]]] = field(default_factory=dict)
    expected: dict[int, int] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.expected) == self.count and all(
            len(self.parts.get(i, ())) == n for i, n in self.expected.items()
        )


class RangeStitcher:
    """Buffers the rows of ranged sources until all their ranges have arrived."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def __call__(self, batch: Mapping[str, Any]) -> Iterator[Batch]:
        """Rows of unranged sources right away; a ranged source once it is whole.

        ``batch`` is as Ray hands it to the driver: a column with no value in it (the
        clip ids of a batch of placeholder rows) arrives as NaN, and is None again here.
        """
        passthrough: list[dict[str, Any]] = []
        for row in batch_to_rows(clean_batch(dict(batch))):
            count = _int_or_none(row.get("range_count")) or 1
            if count <= 1:
                passthrough.append(row)
                continue
            source = str(row["source"])
            pending = self._pending.setdefault(source, _Pending(count))
            i = int(row["range_index"])
            pending.parts.setdefault(i, {})[row.get("clip_id")] = row
            clips = _int_or_none(row.get("src_num_clips"))  # None: not the range's last chunk
            if clips is not None:
                pending.expected[i] = max(clips, 1)
            if pending.complete():
                del self._pending[source]
                stitched = stitch([list(pending.parts[k].values()) for k in range(count)])
                passthrough.extend(stitched)
        if passthrough:
            yield rows_to_batch(passthrough, columns=list(batch))

    def unfinished(self) -> list[str]:
        """Sources some of whose ranges never arrived (a bug upstream if non-empty at the end)."""
        return sorted(self._pending)
