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
kept on a signal nobody measured. Reasons come in threshold order, then duration,
then ``"duplicate"`` (the row has ``dup_of`` set, see ``pipeline.stages.dedup``).

Motion signals (``TEMPORAL_SIGNALS``: motion, flow, still_fraction) are measured
between frames: their thresholds do not apply to a one-frame clip (an image source,
``end_frame - start_frame == 1``), whose scores for them are NaN (or, in corpora scored
before that rule, 0 motion and a still fraction of 1).

Late signals (``LATE_SIGNALS``) need something that only exists after the decision:
``agreement`` needs the caption, and only kept clips are captioned. Their thresholds
apply only to rows that have that input; without it the signal is *pending*, not
missing. So one config serves every step: the first ``Decide`` (before captioning)
skips agreement, a second one after ``pipeline.stages.agreement`` applies it, and
``reelpack refilter`` keeps a newly passing, not yet captioned clip (the next build
captions it, scores agreement and decides again).

Example::

    cfg = DecideConfig(thresholds=(*DEFAULT_THRESHOLDS, ("aesthetic", (4.5, None))))
    batch = Decide(cfg)(batch)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from pipeline.stages.base import Batch, num_rows
from pipeline.stages.score import (
    TEMPORAL_SIGNALS,
    float_column,
    object_column,
    passes_through,
    require_columns,
)
from schemas import SCORE_NAMES, score_column

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DUPLICATE_REASON",
    "LATE_SIGNALS",
    "Bounds",
    "Decide",
    "DecideConfig",
    "decide",
    "duration_reasons",
    "edit_thresholds",
    "list_cells",
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
    # every sampled frame pair without optical flow: a still image or a slideshow
    ("still_fraction", (None, 0.9)),
    ("black_frame_fraction", (None, 0.5)),  # mostly black frames (fades, dead air)
    ("blank_frame_fraction", (None, 0.5)),  # mostly uniform frames (colour cards)
    # slides and text-heavy frames; burned-in subtitles alone score ~0.05..0.1
    ("text_coverage", (None, 0.15)),
)

# signal -> the column it needs; without that input the signal is pending, not missing
LATE_SIGNALS: dict[str, str] = {"agreement": "caption"}
DUPLICATE_REASON = "duplicate"


def _fmt(x: float) -> str:
    return f"{x:g}"


def decide(
    scores: Mapping[str, float],
    thresholds: Mapping[str, Bounds],
    pending: Iterable[str] = (),
) -> list[str]:
    """Every threshold ``scores`` fails, as readable stable strings (empty: keep).

    A signal absent from ``scores`` or NaN fails with ``"<name>:missing"``, unless it
    is in ``pending`` (not measurable yet, or not for this clip): then its threshold is
    skipped.
    """
    reasons: list[str] = []
    skip = set(pending)
    for name, (lo, hi) in thresholds.items():
        if name in skip:
            continue
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


def list_cells(column: np.ndarray) -> np.ndarray:
    """An object column of list cells with every cell a plain Python list (or None).

    On Ray, a list<string> column arrives as numpy arrays per cell; returned as they
    are, Ray stores them as pickled objects, and blocks with plain lists (list<string>)
    then fail to concatenate with them. Plain lists keep one Arrow type everywhere.
    """
    out = np.empty(len(column), dtype=object)
    for i, value in enumerate(column):
        out[i] = None if value is None else [str(v) for v in value]
    return out


def _normalise(thresholds: Iterable[Any] | Mapping[str, Any]) -> tuple[tuple[str, Bounds], ...]:
    """Validate thresholds and make them hashable (JSON round-trips give lists)."""
    pairs: Iterable[Any] = thresholds.items() if isinstance(thresholds, Mapping) else thresholds
    out: list[tuple[str, Bounds]] = []
    for name, bounds in pairs:
        if name not in SCORE_NAMES:
            raise ValueError(f"threshold on unknown signal {name!r}; known: {SCORE_NAMES}")
        if any(name == seen for seen, _ in out):
            raise ValueError(f"signal {name!r} has two thresholds")
        if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Iterable):
            raise ValueError(f"threshold {name!r}: expected [min, max], got {bounds!r}")
        bounds = list(bounds)
        if len(bounds) != 2:
            raise ValueError(f"threshold {name!r}: expected [min, max], got {bounds!r}")
        lo, hi = (_bound(name, value) for value in bounds)
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"threshold {name!r}: min {lo} > max {hi}")
        out.append((name, (lo, hi)))
    return tuple(out)


def _bound(name: str, value: Any) -> float | None:
    """One end of a threshold: a number, or None for no bound."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"threshold {name!r}: bounds are numbers or null, got {value!r}")
    if np.isnan(value):
        raise ValueError(f"threshold {name!r}: a bound is NaN (null leaves a side open)")
    return float(value)


def edit_thresholds(base: Any, edits: Any) -> tuple[tuple[str, Bounds], ...]:
    """``edits`` applied to the thresholds ``base``, as config files and ``--set`` give
    them: a mapping edits signal by signal (``{aesthetic: [4.5, null]}`` adds or
    changes one threshold, ``{motion: null}`` removes one) and leaves the others as
    they are; a sequence of pairs (the form a stored config holds) is the whole set."""
    if not isinstance(edits, Mapping):
        return _normalise(edits)
    out = dict(_normalise(base))
    for name, bounds in edits.items():
        if name not in SCORE_NAMES:
            raise ValueError(f"threshold on unknown signal {name!r}; known: {SCORE_NAMES}")
        if bounds is None:
            out.pop(name, None)
        else:
            out[name] = bounds
    return _normalise(out)


@dataclass(frozen=True)
class DecideConfig:
    """Thresholds as ``((signal, (min or None, max or None)), ...)``; ``threshold_map()``
    is the mapping :func:`decide` takes. No aesthetic threshold by default: add one when
    an aesthetic head is configured, e.g. ``("aesthetic", (4.5, None))``."""

    # a mapping (as YAML writes it: ``{motion: [0.002, null]}``) is accepted too and
    # stored as the tuple form, so a config stays hashable and JSON round-trips. Here
    # either form is the whole set; config files edit the defaults (edit_thresholds)
    thresholds: tuple[tuple[str, Bounds], ...] | Mapping[str, Bounds] = DEFAULT_THRESHOLDS
    min_duration_s: float = 0.0  # split already enforces its minimum; raise to retune
    reject_duplicates: bool = True  # a row with dup_of set is rejected ("duplicate")

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
        "start_frame",
        "end_frame",
        "dup_of",
        *LATE_SIGNALS.values(),
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
        frames = float_column(batch, "end_frame") - float_column(batch, "start_frame")
        status = object_column(batch, "status")
        reasons = object_column(batch, "reasons")
        dup_of = object_column(batch, "dup_of")
        late_inputs = {name: object_column(batch, col) for name, col in LATE_SIGNALS.items()}
        for i in range(n):
            if passes_through(batch["clip_id"][i], status[i]):
                continue
            pending = [name for name, col in late_inputs.items() if not col[i]]
            if frames[i] == 1:  # an image: nothing to measure between frames
                pending += TEMPORAL_SIGNALS
            row_reasons = decide(
                {k: float(v[i]) for k, v in scores.items()}, self._thresholds, pending
            )
            row_reasons += duration_reasons(float(duration[i]), self.cfg.min_duration_s)
            if self.cfg.reject_duplicates and isinstance(dup_of[i], str) and dup_of[i]:
                row_reasons.append(DUPLICATE_REASON)
            status[i] = "rejected" if row_reasons else "kept"
            reasons[i] = row_reasons
        return {**batch, "status": status, "reasons": list_cells(reasons)}
