"""Build progress and accounting, fed by the batches the driver receives.

Ray-free: :class:`BuildProgress` counts sources and clips as rows arrive and
prints one line at most every ``interval_s`` seconds::

    [build] sources 12/40 (30%) | clips kept 88 rejected 14 error 1 | 2.1 sources/s 15.3 clips/s | ETA 13s
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["BuildProgress"]


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class BuildProgress:
    """Counts sources done and clips by status and reason for one build run."""

    def __init__(
        self,
        total_sources: int,
        interval_s: float = 5.0,
        echo: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_sources = total_sources
        self.interval_s = interval_s
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.started = clock()
        self._last_print = self.started
        self._received: Counter[str] = Counter()
        self._expected: dict[str, int] = {}
        self.sources_done = 0
        self.sources_error = 0
        self.clips: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    def update(self, batch: Mapping[str, Any]) -> None:
        """Account for one batch of stream rows (after the last stage)."""
        n = len(batch.get("source", ()))
        for i in range(n):
            source = str(batch["source"][i])
            expected = batch["src_num_clips"][i]
            self._expected[source] = max(1, int(expected) if expected == expected else 0)
            self._received[source] += 1
            if self._received[source] == self._expected[source]:
                self.sources_done += 1
                self.sources_error += batch["src_status"][i] == "error"
            if batch["clip_id"][i] is None:
                continue
            status = str(batch["status"][i])
            self.clips[status] += 1
            if status == "rejected":
                reasons = batch["reasons"][i]
                self.reasons.update(str(r) for r in (reasons if reasons is not None else ()))
        now = self.clock()
        if self.interval_s > 0 and now - self._last_print >= self.interval_s:
            self._last_print = now
            self.echo(self.line())

    def elapsed(self) -> float:
        return self.clock() - self.started

    def line(self) -> str:
        elapsed = max(self.elapsed(), 1e-9)
        rate = self.sources_done / elapsed
        left = self.total_sources - self.sources_done
        eta = left / rate if rate > 0 else float("inf")
        pct = 100.0 * self.sources_done / max(self.total_sources, 1)
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
        }
