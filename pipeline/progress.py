"""Build progress and accounting.

Ray-free: :class:`BuildProgress` counts sources and clips as rows reach the
driver, and :class:`StageMeter` counts the rows each stage takes in and puts
out wherever it runs (in a Ray build it lives in one small actor that every
stage wrapper reports to, see :class:`RemoteMeter`). Every ``interval_s``
seconds the progress prints::

    [build] sources 12/40 (30%) | clips kept 88 rejected 14 error 1 | 2.1 sources/s 15.3 clips/s | ETA 13s
    [stages] probe 14 (2.0/s) | split 90 (12.1/s) | score 90 (12.0/s) | ... | encode 60 (8.2/s)

A stage's figures are the rows it has put out so far and its rate since the
previous line, so the stage whose rate lags is the bottleneck. The percentage and ETA
credit sources still in flight with the share of their duration that finished clips
already cover, so a build of a few long videos has an ETA long before the first one
is done.
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["BuildProgress", "RemoteMeter", "StageMeter", "error_reason", "stages_in_order"]

StageCounts = Mapping[str, Mapping[str, float]]


def stages_in_order(order: Sequence[str], counts: Mapping[str, Any]) -> list[str]:
    """``order``, then any other stage in ``counts`` by name."""
    return list(order) + sorted(set(counts) - set(order))


class StageMeter:
    """Rows in, rows out, batches and busy seconds of each stage, summed over workers."""

    def __init__(self) -> None:
        self._stats: dict[str, dict[str, float]] = {}

    def add(self, stage: str, rows_in: int, rows_out: int, busy_s: float) -> None:
        s = self._stats.setdefault(
            stage, {"rows_in": 0, "rows_out": 0, "batches": 0, "busy_s": 0.0}
        )
        s["rows_in"] += rows_in
        s["rows_out"] += rows_out
        s["batches"] += 1
        s["busy_s"] += busy_s

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {k: dict(v) for k, v in self._stats.items()}


class RemoteMeter:
    """A stage wrapper's reporting callable for a :class:`StageMeter` held by an actor:
    ``handle.add.remote(...)``, fire and forget (accounting never fails a batch)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __call__(self, stage: str, rows_in: int, rows_out: int, busy_s: float) -> None:
        # a lost meter actor costs the display, not the build
        with contextlib.suppress(Exception):
            self.handle.add.remote(stage, rows_in, rows_out, busy_s)


def error_reason(error: str, source: str) -> str:
    """A source's error as a cause other sources share: the source's own name left out
    (written ``<source>`` where the cause repeats it) and numbers written ``N``, so
    ``a.mp4: frame size 9000x9000 exceeds ...`` and ``b.mp4: frame size 12000x800
    exceeds ...`` count as one."""
    text = error.replace(source, "<source>").removeprefix("<source>: ") or "(no reason given)"
    # numbers, not the digits of names (MP4, H.264, x264, VP9); sizes as NxN
    text = _NUMBER.sub("N", text)
    return _SIZE.sub("NxN", text)[:300]


def cause_lines(causes: Mapping[str, int], shown: int, rest_where: str) -> list[str]:
    """Lines ``failed     N <cause>`` for the ``shown`` most common ``causes`` (as
    :func:`error_reason` writes them, most common first), then one line that sums the
    others and says where they are listed (``rest_where``)."""
    items = sorted(causes.items(), key=lambda kv: -kv[1])
    lines = []
    for i, (reason, n) in enumerate(items[:shown]):
        text = reason if len(reason) <= 120 else reason[:117] + "..."
        lines.append(f"{'failed' if i == 0 else '':<10} {n} {text}")
    if len(items) > shown:
        rest = sum(n for _, n in items[shown:])
        lines.append(f"{'':<10} {rest} of {len(items) - shown} other cause(s) ({rest_where})")
    return lines


_NUMBER = re.compile(r"(?<![A-Za-z0-9.])\d+(?:\.\d+)?")
_SIZE = re.compile(r"\bNx\d+\b")


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(value: Any) -> float:
    """A cell as a float; NaN for None."""
    return float("nan") if value is None else float(value)


class BuildProgress:
    """Counts sources done and clips by status and reason for one build run; clips are
    counted once their source is complete, as the writer commits them.

    Without :meth:`start`, :meth:`update` prints a line at most every ``interval_s``
    seconds as batches arrive. :meth:`start` prints from a background thread instead,
    also while no batch arrives, and adds the per-stage line when ``stages`` (display
    order) and ``poll`` (a :meth:`StageMeter.snapshot`) are given.
    """

    def __init__(
        self,
        total_sources: int,
        interval_s: float = 5.0,
        echo: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        stages: Sequence[str] = (),
        poll: Callable[[], StageCounts] | None = None,
    ) -> None:
        self.total_sources = total_sources
        self.stages = list(stages)
        self.poll = poll
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._prev_stages: tuple[float, dict[str, float]] | None = None
        self.interval_s = interval_s
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.started = clock()
        self._last_print = self.started
        self._received: Counter[str] = Counter()
        self._expected: dict[str, int] = {}
        # its error (None: the source did not fail), from its row with the count
        self._final: dict[str, str | None] = {}
        self._clips_of: dict[str, list[tuple[str, list[str]]]] = {}  # until the source is done
        # seconds of clips seen and the duration of each source not yet done (:meth:`observe`)
        self._covered: dict[str, float] = {}
        self._length: dict[str, float] = {}
        self.sources_done = 0
        self.sources_error = 0
        self.clips: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # failed sources by error_reason

    def update(self, batch: Mapping[str, Any]) -> None:
        """Account for one batch of stream rows (after the last stage)."""
        with self._lock:
            self._count(batch)
        now = self.clock()
        if (
            self._ticker is None
            and self.interval_s > 0
            and now - self._last_print >= self.interval_s
        ):
            self._last_print = now
            self.echo(self.line())

    def observe(self, batch: Mapping[str, Any]) -> None:
        """Credit unfinished sources with the seconds of the clips in one batch as it
        reaches the driver (before ranges of a long source are stitched back)."""
        with self._lock:
            starts, ends = batch.get("start_s"), batch.get("end_s")
            lengths = batch.get("src_duration_s")
            if starts is None or ends is None or lengths is None:
                return
            for i, source in enumerate(batch["source"]):
                span, length = _number(ends[i]) - _number(starts[i]), _number(lengths[i])
                if batch["clip_id"][i] is None or not span > 0 or not length > 0:
                    continue  # no clip, an image, or a row without times
                key = str(source)
                self._covered[key] = self._covered.get(key, 0.0) + span
                self._length[key] = length

    def fraction_done(self) -> float:
        """Sources done, plus the covered share of each source still in flight."""
        with self._lock:
            return self._fraction_done()

    def _fraction_done(self) -> float:
        partial = sum(min(self._covered[s] / n, 1.0) for s, n in self._length.items())
        return self.sources_done + partial

    def _count(self, batch: Mapping[str, Any]) -> None:
        n = len(batch.get("source", ()))
        for i in range(n):
            source = str(batch["source"][i])
            expected = batch["src_num_clips"][i]  # None / NaN on a streamed chunk's rows
            if expected is not None and expected == expected and source not in self._expected:
                self._expected[source] = max(1, int(expected))
                error = batch["src_error"][i] if "src_error" in batch else None
                failed = batch["src_status"][i] == "error"
                self._final[source] = (error if isinstance(error, str) else "") if failed else None
            self._received[source] += 1
            if batch["clip_id"][i] is not None:
                reasons = batch["reasons"][i] if batch["status"][i] == "rejected" else None
                self._clips_of.setdefault(source, []).append(
                    (
                        str(batch["status"][i]),
                        [str(r) for r in (reasons if reasons is not None else ())],
                    )
                )
            if self._received[source] == self._expected.get(source):
                self._source_done(source)

    def _source_done(self, source: str) -> None:
        """Count a complete source and its clips: none when it failed (the writer then
        records one error row, also for clips it had handed on before failing)."""
        self.sources_done += 1
        self._covered.pop(source, None)
        self._length.pop(source, None)
        error = self._final[source]
        failed = error is not None
        self.sources_error += failed
        if error is not None:
            self.errors[error_reason(error, source)] += 1
        for status, reasons in self._clips_of.pop(source, []):
            if not failed:
                self.clips[status] += 1
                self.reasons.update(reasons)

    def start(self) -> None:
        """Print every ``interval_s`` seconds from a daemon thread until :meth:`stop`."""
        if self.interval_s <= 0 or self._ticker is not None:
            return
        self._ticker = threading.Thread(target=self._tick, name="build-progress", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.echo(self.line())
            stages = self.stage_line() if self.poll is not None else None
            if stages is not None:
                self.echo(stages)

    def stage_line(self) -> str | None:
        """Rows out per stage so far and each stage's rate since the previous call; None
        when the counts did not come in time (a meter busy on loaded cores: the next
        line has them)."""
        try:
            counts = self.poll() if self.poll is not None else {}
        except TimeoutError:
            return None
        except Exception as e:  # the display never stops a build
            return f"[stages] unavailable: {type(e).__name__}: {e}"
        now = self.clock()
        since, before = self._prev_stages or (self.started, {})
        self._prev_stages = (now, {k: float(v["rows_out"]) for k, v in counts.items()})
        dt = max(now - since, 1e-9)
        cells = []
        for stage in stages_in_order(self.stages, counts):
            done = float(counts.get(stage, {}).get("rows_out", 0))
            rate = (done - before.get(stage, 0.0)) / dt
            cells.append(f"{stage} {done:.0f} ({rate:.1f}/s)")
        return "[stages] " + " | ".join(cells)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def line(self) -> str:
        with self._lock:
            return self._line()

    def _line(self) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        rate = self.sources_done / elapsed
        done = self._fraction_done()
        eta = elapsed * (self.total_sources - done) / done if done > 0 else float("inf")
        pct = 100.0 * done / max(self.total_sources, 1)
        return (
            f"[build] sources {self.sources_done}/{self.total_sources} ({pct:.0f}%)"
            f" | clips kept {self.clips['kept']} rejected {self.clips['rejected']}"
            f" error {self.clips['error']}"
            f" | {rate:.2f} sources/s {sum(self.clips.values()) / elapsed:.1f} clips/s"
            f" | ETA {_fmt_eta(eta)}"
        )

    def counts(self) -> dict[str, Any]:
        return {
            "sources_done": self.sources_done,
            "sources_error": self.sources_error,
            "clips_by_status": dict(self.clips),
            "rejected_by_reason": dict(self.reasons),
            # failed sources by cause, most common first
            "errors_by_reason": dict(self.errors.most_common()),
        }
