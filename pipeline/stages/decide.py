"""Keep or reject each clip from its stored scores: cheap, pure, re-runnable.

1:1 stage, one clip in, the same clip out with ``status`` ("kept" / "rejected")
and ``reasons`` (every failed threshold). Scoring is a separate stage
(``pipeline.stages.score``, ``pipeline.stages.aesthetic``), so thresholds can be
retuned over an existing index without decoding a single frame.

Threshold semantics: a signal with bounds ``(lo, hi)`` passes when
``lo <= value <= hi`` (both bounds inclusive; ``None`` means unbounded). A value
below ``lo`` gives the reason ``"<name><<lo>"``, above ``hi`` ``"<name>><hi>"``
(numbers in ``%g`` form, e.g. ``"motion<0.002"``, ``"exposure>0.95"``). A NaN or
absent score for a thresholded signal gives ``"<name>:missing"``: a clip is never
kept on a signal nobody measured. Reasons come in threshold order, duration last.

Example::

    cfg = DecideConfig(thresholds=(*DEFAULT_THRESHOLDS, ("aesthetic", (4.5, None))))
    batch = Decide(cfg)(batch)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from pipeline.stages.base import Batch, num_rows
from pipeline.stages.score import float_column, object_column, passes_through, require_columns
from schemas import SCORE_NAMES, score_column

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Bounds",
    "Decide",
    "DecideConfig",
    "decide",
    "duration_reasons",
]

Bounds = tuple[float | None, float | None]  # (min or None, max or None), both inclusive

# Defaults reject only the clearly unusable; tune per corpus (see the module docstring).
DEFAULT_THRESHOLDS: tuple[tuple[str, Bounds], ...] = (
    # Gaussian blur (sigma 3) of noise scores < 10, real footage at 256 px wide 400+
    ("sharpness", (20.0, None)),
    ("exposure", (0.05, 0.95)),  # near-black or blown-out on average
    ("dark_fraction", (None, 0.9)),
    ("bright_fraction", (None, 0.9)),
    # a still H.264 clip scores exactly 0; slow real footage ~0.01
    ("motion", (0.002, None)),
)


def _fmt(x: float) -> str:
    return f"{x:g}"


def decide(scores: Mapping[str, float], thresholds: Mapping[str, Bounds]) -> list[str]:
    """Every threshold ``scores`` fails, as readable stable strings (empty: keep).

    A signal absent from ``scores`` or NaN fails with ``"<name>:missing"``.
    """
    reasons: list[str] = []
    for name, (lo, hi) in thresholds.items():
        value = scores.get(name)
        if value is None or math.isnan(value):
            reasons.append(f"{name}:missing")
            continue
        if lo is not None and value < lo:
            reasons.append(f"{name}<{_fmt(lo)}")
        if hi is not None and value > hi:
            reasons.append(f"{name}>{_fmt(hi)}")
    return reasons


def duration_reasons(duration_s: float, min_duration_s: float) -> list[str]:
    """``["duration_s<min"]`` for a clip shorter than ``min_duration_s`` (inclusive bound,
    ``0`` disables), ``["duration_s:missing"]`` when the duration is unknown."""
    if min_duration_s <= 0:
        return []
    if math.isnan(duration_s):
        return ["duration_s:missing"]
    return [f"duration_s<{_fmt(min_duration_s)}"] if duration_s < min_duration_s else []


def _normalise(thresholds: Iterable[Any] | Mapping[str, Any]) -> tuple[tuple[str, Bounds], ...]:
    """Validate thresholds and make them hashable (JSON round-trips give lists)."""
    pairs: Iterable[Any] = thresholds.items() if isinstance(thresholds, Mapping) else thresholds
    out: list[tuple[str, Bounds]] = []
    for name, bounds in pairs:
        lo, hi = bounds
        if name not in SCORE_NAMES:
            raise ValueError(f"threshold on unknown signal {name!r}; known: {SCORE_NAMES}")
        if any(name == seen for seen, _ in out):
            raise ValueError(f"signal {name!r} has two thresholds")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"threshold {name!r}: min {lo} > max {hi}")
        out.append((name, (lo, hi)))
    return tuple(out)


@dataclass(frozen=True)
class DecideConfig:
    """Thresholds as ``((signal, (min or None, max or None)), ...)``; ``threshold_map()``
    is the mapping :func:`decide` takes. No aesthetic threshold by default: add one when
    an aesthetic head is configured, e.g. ``("aesthetic", (4.5, None))``."""

    # a mapping (as YAML writes it: ``{motion: [0.002, null]}``) is accepted too and
    # stored as the tuple form, so a config stays hashable and JSON round-trips
    thresholds: tuple[tuple[str, Bounds], ...] | Mapping[str, Bounds] = DEFAULT_THRESHOLDS
    min_duration_s: float = 0.0  # split already enforces its minimum; raise to retune

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", _normalise(self.thresholds))

    def threshold_map(self) -> dict[str, Bounds]:
        """The thresholds as the mapping :func:`decide` takes."""
        return dict(cast(tuple[tuple[str, Bounds], ...], self.thresholds))


class Decide:
    """1:1: write ``status`` ("kept" / "rejected") and ``reasons`` from the score columns.

    Rows with ``clip_id`` None (source placeholders) or status ``"error"`` are left
    untouched.
    """

    reads: tuple[str, ...] = (
        "clip_id",
        "status",
        "reasons",
        "start_s",
        "end_s",
        *(score_column(n) for n in SCORE_NAMES),
    )
    writes: tuple[str, ...] = ("status", "reasons")

    def __init__(self, cfg: DecideConfig | None = None) -> None:
        self.cfg = cfg or DecideConfig()
        self._thresholds = self.cfg.threshold_map()

    def __call__(self, batch: Batch) -> Batch:
        require_columns(batch, "decide", ("clip_id",))
        n = num_rows(batch)
        scores = {name: float_column(batch, score_column(name)) for name in self._thresholds}
        duration = float_column(batch, "end_s") - float_column(batch, "start_s")
        status = object_column(batch, "status")
        reasons = object_column(batch, "reasons")
        for i in range(n):
            if passes_through(batch["clip_id"][i], status[i]):
                continue
            row_reasons = decide({k: float(v[i]) for k, v in scores.items()}, self._thresholds)
            row_reasons += duration_reasons(float(duration[i]), self.cfg.min_duration_s)
            status[i] = "rejected" if row_reasons else "kept"
            reasons[i] = row_reasons
        return {**batch, "status": status, "reasons": reasons}
