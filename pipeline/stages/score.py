"""Cheap per-clip quality signals: sharpness, exposure, clipping and motion.

1:1 stage, one clip in, the same clip out with ``score_<name>`` columns added.
No models: a few OpenCV / numpy reductions over a handful of frames sampled
evenly from the clip's payload (``clip_bytes``), downscaled to a fixed analysis
width so that the numbers are comparable across source resolutions.

Scores are always written, kept or not; the keep / reject decision is
``pipeline.stages.decide``, so thresholds can be retuned without re-scoring.
All signals are computed on BT.601 luma (``cv2.COLOR_RGB2GRAY``) in 0..255:

- ``sharpness``: variance of the Laplacian, mean over sampled frames (higher is sharper)
- ``exposure``: mean luma in [0, 1]
- ``dark_fraction`` / ``bright_fraction``: share of pixels with luma < 16 / > 239
- ``motion``: mean absolute luma difference between consecutive *sampled* frames, in
  [0, 1]; samples are spread over the whole clip, so this measures change across
  the clip rather than per frame; 0 for a one-frame clip.

Example::

    batch = Score(ScoreConfig(num_frames=8))(batch)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.stages.base import Batch, num_rows
from pipeline.video import decode_mp4
from schemas import SCORE_NAMES, score_column

__all__ = [
    "CHEAP_SIGNALS",
    "Score",
    "ScoreConfig",
    "bright_fraction",
    "dark_fraction",
    "exposure",
    "float_column",
    "luma",
    "motion",
    "object_column",
    "passes_through",
    "payload_bytes",
    "require_columns",
    "resize_to_width",
    "sample_indices",
    "score_frames",
    "sharpness",
]

# Luma bounds of "near black" / "near white": the limits of video (studio) range.
DARK_LUMA = 16
BRIGHT_LUMA = 239


@dataclass(frozen=True)
class ScoreConfig:
    """How the cheap signals look at a clip."""

    num_frames: int = 8  # frames sampled evenly over the clip (all frames if fewer)
    analysis_width: int = 256  # downscale wider frames to this width first; 0 = never


# --- frame helpers ----------------------------------------------------------------------


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(
            f"expected (T, H, W, 3) uint8 RGB frames, got {frames.shape} {frames.dtype}"
        )
    if frames.shape[0] == 0:
        raise ValueError("expected at least one frame")


def sample_indices(total: int, num: int) -> np.ndarray:
    """``num`` frame indices spread evenly over ``[0, total)``, first and last included;
    every frame when ``total <= num``; the middle frame when ``num == 1``."""
    if total <= 0 or num <= 0:
        return np.zeros(0, dtype=np.int64)
    if total <= num:
        return np.arange(total, dtype=np.int64)
    if num == 1:
        return np.array([total // 2], dtype=np.int64)
    # spacing (total - 1) / (num - 1) >= 1, so rounding never repeats an index
    return np.linspace(0, total - 1, num).round().astype(np.int64)


def resize_to_width(frames: np.ndarray, width: int) -> np.ndarray:
    """Downscale ``frames`` (T, H, W, C) to ``width`` keeping the aspect ratio.

    Never upscales: interpolation would invent blur and lower ``sharpness``.
    """
    h, w = frames.shape[1:3]
    if width <= 0 or w <= width:
        return frames
    new_h = max(1, round(h * width / w))
    # INTER_AREA averages source pixels: no aliasing when shrinking
    return np.stack([cv2.resize(f, (width, new_h), interpolation=cv2.INTER_AREA) for f in frames])


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma (T, H, W) uint8 of RGB frames (T, H, W, 3) uint8."""
    _check_frames(frames)
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


# --- signals: pure functions on uint8 RGB frames (T, H, W, 3) ----------------------------


def sharpness(frames: np.ndarray) -> float:
    """Variance of the Laplacian of luma (0..255 scale), mean over frames."""
    y = luma(frames)
    return float(np.mean([cv2.Laplacian(f, cv2.CV_64F).var() for f in y]))


def exposure(frames: np.ndarray) -> float:
    """Mean luma in [0, 1]."""
    return float(luma(frames).mean(dtype=np.float64) / 255.0)


def dark_fraction(frames: np.ndarray) -> float:
    """Share of pixels with luma < 16/255 (near black)."""
    return float((luma(frames) < DARK_LUMA).mean())


def bright_fraction(frames: np.ndarray) -> float:
    """Share of pixels with luma > 239/255 (near white)."""
    return float((luma(frames) > BRIGHT_LUMA).mean())


def motion(frames: np.ndarray) -> float:
    """Mean absolute luma difference between consecutive frames, in [0, 1]; 0 for one frame."""
    y = luma(frames).astype(np.int16)
    if len(y) < 2:
        return 0.0
    return float(np.abs(np.diff(y, axis=0)).mean(dtype=np.float64) / 255.0)


_SIGNAL_FUNCS: dict[str, Callable[[np.ndarray], float]] = {
    "sharpness": sharpness,
    "exposure": exposure,
    "dark_fraction": dark_fraction,
    "bright_fraction": bright_fraction,
    "motion": motion,
}
CHEAP_SIGNALS: tuple[str, ...] = tuple(_SIGNAL_FUNCS)
assert set(CHEAP_SIGNALS) <= set(SCORE_NAMES), "every signal needs a column in schemas"


def score_frames(frames: np.ndarray, cfg: ScoreConfig | None = None) -> dict[str, float]:
    """Every cheap signal of one clip's decoded frames (T, H, W, 3) uint8 RGB."""
    cfg = cfg or ScoreConfig()
    _check_frames(frames)
    picked = frames[sample_indices(len(frames), cfg.num_frames)]
    picked = resize_to_width(picked, cfg.analysis_width)
    return {name: fn(picked) for name, fn in _SIGNAL_FUNCS.items()}


# --- row helpers shared by the scoring stages --------------------------------------------


def passes_through(clip_id: Any, status: Any) -> bool:
    """Rows a scoring stage leaves alone: source placeholders and failed rows."""
    return clip_id is None or status == "error"


def payload_bytes(value: Any) -> bytes:
    """A ``clip_bytes`` cell as ``bytes`` (Arrow may hand over numpy bytes or memoryviews)."""
    if value is None:
        raise ValueError("clip_bytes is empty")
    if isinstance(value, np.ndarray):
        return value.tobytes()
    return bytes(value)


def float_column(batch: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """Column ``name`` as float64 (None -> NaN); all NaN when the column is absent."""
    n = num_rows(batch)
    if name not in batch:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else float(v) for v in batch[name]], dtype=np.float64)


def object_column(batch: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A copy of column ``name`` as an object array; all None when absent."""
    out = np.empty(num_rows(batch), dtype=object)
    if name in batch:
        # element by element: equal-length list cells (numpy arrays) must not broadcast
        for i, value in enumerate(batch[name]):
            out[i] = value
    return out


def require_columns(batch: Mapping[str, np.ndarray], stage: str, names: tuple[str, ...]) -> None:
    """A missing input column is a wiring bug, not a bad row: fail loudly."""
    missing = [c for c in names if c not in batch]
    if missing and num_rows(batch):
        raise ValueError(f"{stage}: batch lacks columns {missing}")


# --- the stage ---------------------------------------------------------------------------


class Score:
    """1:1: decode each clip's payload and write the cheap ``score_*`` columns.

    Rows with ``clip_id`` None (source placeholders) or status ``"error"`` pass
    through with their scores unchanged (NaN if absent). A payload that cannot be
    decoded turns that row alone into status ``"error"`` with the reason in ``error``.
    """

    reads: tuple[str, ...] = ("clip_id", "status", "clip_bytes")
    writes: tuple[str, ...] = (*(score_column(n) for n in CHEAP_SIGNALS), "status", "error")

    def __init__(self, cfg: ScoreConfig | None = None) -> None:
        self.cfg = cfg or ScoreConfig()

    def __call__(self, batch: Batch) -> Batch:
        require_columns(batch, "score", ("clip_id", "clip_bytes"))
        n = num_rows(batch)
        scores = {name: float_column(batch, score_column(name)) for name in CHEAP_SIGNALS}
        status = object_column(batch, "status")
        error = object_column(batch, "error")
        for i in range(n):
            clip_id = batch["clip_id"][i]
            if passes_through(clip_id, status[i]):
                continue
            try:
                frames, _ = decode_mp4(payload_bytes(batch["clip_bytes"][i]))
                values = score_frames(frames, self.cfg)
            except Exception as exc:  # any bad payload is this row's error, never the batch's
                status[i] = "error"
                error[i] = f"score: clip {clip_id}: {type(exc).__name__}: {exc}"
                for name in CHEAP_SIGNALS:
                    scores[name][i] = np.nan
                continue
            for name, value in values.items():
                scores[name][i] = value
        out = dict(batch)
        out.update({score_column(k): v for k, v in scores.items()}, status=status, error=error)
        return out
