"""Cheap per-clip quality signals: sharpness, exposure, motion, black frames, text.

1:1 stage, one clip in, the same clip out with ``score_<name>`` columns and a
perceptual ``frame_hash`` added. No models: OpenCV / numpy reductions over frames
sampled from the clip's payload (``clip_bytes``, decoded once here; the source is
never reopened), downscaled to fixed analysis widths so that the numbers are
comparable across source resolutions.

Scores are always written, kept or not; the keep / reject decision is
``pipeline.stages.decide``, so thresholds can be retuned without re-scoring.
All signals are computed on BT.601 luma (``cv2.COLOR_RGB2GRAY``) in 0..255:

- ``sharpness``: variance of the Laplacian, mean over sampled frames (higher is sharper)
- ``exposure``: mean luma in [0, 1]
- ``dark_fraction`` / ``bright_fraction``: share of pixels with luma < 16 / > 239
- ``motion``: mean absolute luma difference between consecutive *sampled* frames, in
  [0, 1]; samples are spread over the whole clip, so this measures change across
  the clip rather than per frame.
- ``flow``: dense optical flow (OpenCV DIS, ultrafast preset) between *consecutive*
  frames at a few positions of the clip, at ``flow_width``: mean flow magnitude in
  frame diagonals per second (resolution- and frame-rate-free; a slow pan ~0.05,
  walking ~0.3). DIS over Farneback: ~8x cheaper here at the same accuracy on pans.
- ``still_fraction``: share of those frame pairs whose flow is below ``still_flow``:
  1.0 for a video of a still picture, high with a few jumps for a slideshow. This is
  the static/slideshow flag, kept as a number so its cut-off stays retunable.

The three motion signals (``TEMPORAL_SIGNALS``) need two frames: a one-frame clip (an
image source) gets NaN for them, and ``decide`` does not apply their thresholds to it.
- ``black_frame_fraction``: share of sampled frames that are black, by FFmpeg
  ``blackdetect``'s defaults: >= 98% of pixels at luma <= 10% of full scale.
- ``blank_frame_fraction``: share of sampled frames whose luma standard deviation is
  below 4 / 255: uniform frames of any colour (black, white, a colour card).
- ``text_coverage``: share of the frame covered by overlaid text, mean over a few
  frames, from :func:`text_mask` (a cheap edge-based proxy, see there for why).

``frame_hash`` is a 64-bit difference hash (dHash) of the mean of the sampled luma
frames: identical or re-encoded copies of a clip get (nearly) the same hash, which
``pipeline.stages.dedup`` uses to catch exact duplicates without any model.

Frames are sampled by count (``num_frames``) or, with ``frames_per_second > 0``, by
rate (capped by ``max_frames``).

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
from pipeline.video import decode_mp4_sampled
from schemas import SCORE_NAMES, score_column

__all__ = [
    "CHEAP_SIGNALS",
    "TEMPORAL_SIGNALS",
    "Score",
    "ScoreConfig",
    "black_frame_fraction",
    "blank_frame_fraction",
    "bright_fraction",
    "dark_fraction",
    "dhash",
    "exposure",
    "float_column",
    "flow_starts",
    "flow_stats",
    "frame_count",
    "frame_hash",
    "hamming",
    "luma",
    "luma_at_width",
    "motion",
    "object_column",
    "pair_flow",
    "passes_through",
    "payload_bytes",
    "pixel_signals",
    "require_columns",
    "resize_to_width",
    "sample_indices",
    "score_clip",
    "score_frames",
    "score_payload",
    "sharpness",
    "text_coverage",
    "text_mask",
]

# Luma bounds of "near black" / "near white": the limits of video (studio) range.
DARK_LUMA = 16
BRIGHT_LUMA = 239
# FFmpeg blackdetect defaults: a pixel is black at <= 10% of full scale, a frame is black
# when >= 98% of its pixels are.
BLACK_PIXEL_LUMA = 25
BLACK_FRAME_SHARE = 0.98
BLANK_LUMA_STD = 4.0  # a frame with luma std below this (0..255) is blank / uniform
TEXT_EDGE_MIN = 64  # overlaid text is high-contrast; weaker edges are mostly texture


@dataclass(frozen=True)
class ScoreConfig:
    """How the cheap signals look at a clip."""

    # frames sampled evenly over the clip (all frames if fewer; two at least: motion
    # compares them)
    num_frames: int = 8
    # > 0: sample this many frames per second of clip instead of num_frames (max_frames cap)
    frames_per_second: float = 0.0
    max_frames: int = 32
    analysis_width: int = 256  # downscale wider frames to this width first; 0 = never
    flow_width: int = 128  # optical flow on frame pairs downscaled to this width
    flow_pairs: int = 4  # consecutive-frame pairs spread over the clip
    # a pair is still below this flow (frame diagonals per second; ~0.03 px/frame at
    # 128 px wide and 24 fps); H.264 of a still image gives 0 or codec noise (~1e-5)
    still_flow: float = 0.005
    text_width: int = 384  # text needs more pixels than the other signals
    text_frames: int = 3  # frames (of the sampled ones) searched for text


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


def frame_count(
    total: int, fps: float, num_frames: int, frames_per_second: float = 0.0, max_frames: int = 32
) -> int:
    """How many frames to sample from a clip of ``total`` frames at ``fps``: ``num_frames``,
    or with ``frames_per_second > 0`` one per ``1 / frames_per_second`` seconds (at least
    1, at most ``max_frames``; ``num_frames`` when the frame rate is unknown)."""
    if frames_per_second <= 0 or fps <= 0:
        return num_frames
    return int(min(max(1, round(total / fps * frames_per_second)), max(1, max_frames)))


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


def luma_at_width(frames: np.ndarray, width: int) -> np.ndarray:
    """Luma (T, h, w) uint8 of RGB frames downscaled to ``width`` (never up): luma first,
    then one channel to resize, a third of the work of resizing RGB."""
    y = luma(frames)
    h, w = y.shape[1:]
    if width <= 0 or w <= width:
        return y
    size = (width, max(1, round(h * width / w)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in y])


# --- signals: pure functions on uint8 RGB frames (T, H, W, 3) ----------------------------
# Each has a core on luma (T, H, W) uint8, so score_clip converts the frames once.


def _sharpness(y: np.ndarray) -> float:
    return float(np.mean([cv2.Laplacian(f, cv2.CV_64F).var() for f in y]))


def _exposure(y: np.ndarray) -> float:
    return float(y.mean(dtype=np.float64) / 255.0)


def _dark_fraction(y: np.ndarray) -> float:
    return float(np.count_nonzero(y < DARK_LUMA) / y.size)


def _bright_fraction(y: np.ndarray) -> float:
    return float(np.count_nonzero(y > BRIGHT_LUMA) / y.size)


def _motion(y: np.ndarray) -> float:
    if len(y) < 2:
        return 0.0
    return float(np.abs(np.diff(y.astype(np.int16), axis=0)).mean(dtype=np.float64) / 255.0)


def _black_frame_fraction(y: np.ndarray) -> float:
    black_share = (y <= BLACK_PIXEL_LUMA).reshape(len(y), -1).mean(axis=1)
    return float((black_share >= BLACK_FRAME_SHARE).mean())


def _blank_frame_fraction(y: np.ndarray) -> float:
    stds = [float(cv2.meanStdDev(f)[1][0, 0]) for f in y]
    return float((np.asarray(stds) < BLANK_LUMA_STD).mean())


def sharpness(frames: np.ndarray) -> float:
    """Variance of the Laplacian of luma (0..255 scale), mean over frames."""
    return _sharpness(luma(frames))


def exposure(frames: np.ndarray) -> float:
    """Mean luma in [0, 1]."""
    return _exposure(luma(frames))


def dark_fraction(frames: np.ndarray) -> float:
    """Share of pixels with luma < 16/255 (near black)."""
    return _dark_fraction(luma(frames))


def bright_fraction(frames: np.ndarray) -> float:
    """Share of pixels with luma > 239/255 (near white)."""
    return _bright_fraction(luma(frames))


def motion(frames: np.ndarray) -> float:
    """Mean absolute luma difference between consecutive frames, in [0, 1]; 0 for one frame."""
    return _motion(luma(frames))


def black_frame_fraction(frames: np.ndarray) -> float:
    """Share of frames that are black: >= 98% of pixels at luma <= 25 (FFmpeg blackdetect)."""
    return _black_frame_fraction(luma(frames))


def blank_frame_fraction(frames: np.ndarray) -> float:
    """Share of frames of (nearly) uniform luma: standard deviation < 4 / 255."""
    return _blank_frame_fraction(luma(frames))


def flow_stats(
    frames: np.ndarray, fps: float, pairs: int = 4, width: int = 128, still_flow: float = 0.005
) -> tuple[float, float]:
    """``(flow, still_fraction)`` of a clip's frames (T, H, W, 3), all of them in order.

    ``pairs`` consecutive-frame pairs ``(t, t + 1)`` spread evenly over the clip, each
    downscaled to ``width``; per pair the mean magnitude of the DIS optical flow, divided
    by the frame diagonal (pixels at ``width``) and multiplied by ``fps``. ``flow`` is the
    mean over pairs in frame diagonals per second; ``still_fraction`` the share of pairs
    below ``still_flow``. A one-frame clip is still: ``(0.0, 1.0)``. With an unknown frame
    rate (``fps <= 0``) the flow is per frame instead.
    """
    _check_frames(frames)
    if len(frames) < 2:
        return 0.0, 1.0
    starts = flow_starts(len(frames), pairs)
    return pair_flow(frames[starts], frames[starts + 1], fps, width, still_flow)


def flow_starts(total: int, pairs: int) -> np.ndarray:
    """First frames of the ``pairs`` consecutive-frame pairs :func:`flow_stats` measures
    in a clip of ``total`` frames (none for a 1-frame clip)."""
    return sample_indices(total - 1, pairs) if total >= 2 else np.zeros(0, dtype=np.int64)


def pair_flow(
    first: np.ndarray, second: np.ndarray, fps: float, width: int, still_flow: float
) -> tuple[float, float]:
    """:func:`flow_stats` of the frame pairs ``(first[k], second[k])`` (P, H, W, 3)."""
    if not len(first):
        return 0.0, 1.0
    y = luma_at_width(np.concatenate([first, second]), width)
    h, w = y.shape[1:]
    per_second = fps if fps > 0 else 1.0
    # ULTRAFAST preset: multi-scale patch search, ~0.2 ms per 128 px pair; one object per
    # call keeps the function thread-safe
    dis = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
    values = []
    for k in range(len(first)):
        a, b = y[k], y[len(first) + k]
        if np.array_equal(a, b):
            values.append(0.0)  # identical frames: no flow, and DIS need not run
            continue
        field = np.asarray(dis.calc(a, b, None))  # type: ignore[call-overload]  # (h, w, 2) px
        magnitude = float(np.sqrt((field.astype(np.float64) ** 2).sum(axis=-1)).mean())
        values.append(magnitude / float(np.hypot(h, w)) * per_second)
    arr = np.asarray(values)
    return float(arr.mean()), float((arr < still_flow).mean())


_ELLIPSE3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def text_mask(gray: np.ndarray) -> np.ndarray:
    """Boolean mask (H, W) of the boxes of text-like regions in one luma frame (H, W) uint8.

    A documented cheap proxy, not an OCR detector. Why: the score stage's budget is a
    fraction of the clip's decode (``benchmarks/score_bench.py``: all cheap signals
    together ~0.2x), which a neural text detector (DBNet-style, e.g. the ONNX models
    that ``rapidocr-onnxruntime`` bundles in its wheel) cannot meet on a CPU, and it
    would add onnxruntime and model files to every install; none is installed here,
    so none is offered as an option either. Overlaid text (subtitles, watermarks,
    slides) is high-contrast, horizontal and dense in strokes, which edge statistics
    capture at ~1 ms per frame. Steps (the morphological-gradient text localisation
    known from OpenCV practice):

    1. morphological gradient (3x3 ellipse), kept where strong (Otsu and >= 64 / 255:
       fine film grain or noise textures stay below, text outlines do not);
    2. horizontal closing (width / 40) joins the strokes of a word or line into blobs;
    3. a blob is text when its box is 2..20% of the frame tall, at least 1.5x wider than
       tall, at least 20% filled with edges, and has >= 1 rising stroke edge per row per
       box height of width (letters; a lone edge or stripe has far fewer);
    4. the mask is the union of those boxes.

    Natural texture (foliage, water, noise) joins into blobs too tall or too sparse in
    strokes; long straight edges fail the stroke density. Small text (< 4 px tall at the
    analysis width) is missed, and dense regular patterns (fences, tiled text-like
    facades) can pass: treat the score as "how much of the frame looks like text".
    """
    h, w = gray.shape
    grad = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, _ELLIPSE3)
    _, edges = cv2.threshold(grad, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    edges[grad < TEXT_EDGE_MIN] = 0
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, w // 40), 1))
    closed = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, kernel)
    count, _, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    mask = np.zeros((h, w), dtype=bool)
    min_h, max_h = max(4, round(0.02 * h)), 0.2 * h
    for x, y, bw, bh, _area in stats[1:count]:
        if bh < min_h or bh > max_h or bw < 1.5 * bh:
            continue
        box = edges[y : y + bh, x : x + bw] > 0
        rising = np.count_nonzero(box[:, 1:] & ~box[:, :-1]) / bh  # stroke edges per row
        if box.mean() < 0.2 or rising / (bw / bh) < 1.0:
            continue
        mask[y : y + bh, x : x + bw] = True
    return mask


def text_coverage(frames: np.ndarray) -> float:
    """Share of the frame area inside :func:`text_mask` boxes, mean over frames."""
    return _text_coverage(luma(frames))


def _text_coverage(y: np.ndarray) -> float:
    return float(np.mean([np.count_nonzero(text_mask(f)) / f.size for f in y]))


def dhash(gray: np.ndarray) -> int:
    """64-bit difference hash of one luma image (H, W): 9x8 area-downscale, one bit per
    horizontally adjacent pair (left brighter than right), row-major, MSB first."""
    small = cv2.resize(gray, (9, 8), interpolation=cv2.INTER_AREA).astype(np.float32)
    bits = (small[:, :-1] > small[:, 1:]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def frame_hash(frames: np.ndarray) -> str:
    """:func:`dhash` of the mean luma of ``frames``, as 16 hex digits. The temporal mean
    makes one hash describe the whole clip and shrugs off re-encoding noise."""
    return _frame_hash(luma(frames))


def _frame_hash(y: np.ndarray) -> str:
    return f"{dhash(y.mean(axis=0, dtype=np.float64).astype(np.float32)):016x}"


def hamming(a: str | int, b: str | int) -> int:
    """Bits in which two 64-bit hashes (ints or hex strings) differ."""
    x = int(a, 16) if isinstance(a, str) else a
    y = int(b, 16) if isinstance(b, str) else b
    return (x ^ y).bit_count()


_LUMA_SIGNALS: dict[str, Callable[[np.ndarray], float]] = {
    "sharpness": _sharpness,
    "exposure": _exposure,
    "dark_fraction": _dark_fraction,
    "bright_fraction": _bright_fraction,
    "motion": _motion,
    "black_frame_fraction": _black_frame_fraction,
    "blank_frame_fraction": _blank_frame_fraction,
}
CHEAP_SIGNALS: tuple[str, ...] = (*_LUMA_SIGNALS, "flow", "still_fraction", "text_coverage")
# measured between frames: NaN (not measurable) for a one-frame clip
TEMPORAL_SIGNALS: tuple[str, ...] = ("motion", "flow", "still_fraction")
assert set(CHEAP_SIGNALS) <= set(SCORE_NAMES), "every signal needs a column in schemas"


def pixel_signals(frames: np.ndarray) -> dict[str, float]:
    """The per-pixel statistics (sharpness, exposure, dark / bright, motion, black /
    blank frames) of frames (T, H, W, 3) uint8 RGB, as given (no sampling, no resize)."""
    y = luma(frames)
    return {name: fn(y) for name, fn in _LUMA_SIGNALS.items()}


def _sampled_signals(picked: np.ndarray, cfg: ScoreConfig) -> tuple[dict[str, float], str]:
    """Pixel statistics, text coverage and frame hash of the sampled frames."""
    y = luma_at_width(picked, cfg.analysis_width)
    out = {name: fn(y) for name, fn in _LUMA_SIGNALS.items()}
    text = picked[sample_indices(len(picked), cfg.text_frames)]
    # text_frames = 0 turns the text signal off (NaN: a threshold on it then rejects)
    out["text_coverage"] = (
        _text_coverage(luma_at_width(text, cfg.text_width)) if len(text) else float("nan")
    )
    return out, _frame_hash(y)


def score_frames(frames: np.ndarray, cfg: ScoreConfig | None = None) -> dict[str, float]:
    """The per-frame signals of one clip's decoded frames (T, H, W, 3) uint8 RGB, all
    frames in order (no flow: that needs the frame rate, see :func:`score_clip`)."""
    cfg = cfg or ScoreConfig()
    _check_frames(frames)
    return _sampled_signals(frames[sample_indices(len(frames), max(cfg.num_frames, 2))], cfg)[0]


def score_clip(
    frames: np.ndarray, fps: float, cfg: ScoreConfig | None = None
) -> tuple[dict[str, float], str]:
    """Every cheap signal (``CHEAP_SIGNALS``) and the ``frame_hash`` of one clip's decoded
    frames (T, H, W, 3) uint8 RGB, all frames in order, at ``fps``."""
    cfg = cfg or ScoreConfig()
    _check_frames(frames)
    return _score(lambda at: frames[at], len(frames), fps, cfg)


def score_payload(data: bytes, cfg: ScoreConfig | None = None) -> tuple[dict[str, float], str]:
    """:func:`score_clip` of a clip payload (mp4 bytes), equal to scoring its full
    decode, but with only the frames the signals read converted to RGB
    (:func:`pipeline.video.decode_mp4_sampled`)."""
    cfg = cfg or ScoreConfig()

    def choose(total: int, fps: float) -> np.ndarray:
        sampled, starts = _frames_read(total, fps, cfg)
        return np.unique(np.concatenate([sampled, starts, starts + 1]))

    frames, indices, total, fps = decode_mp4_sampled(data, choose)
    _check_frames(frames)
    row = {int(i): k for k, i in enumerate(indices)}
    return _score(lambda at: frames[[row[int(i)] for i in at]], total, fps, cfg)


def _frames_read(total: int, fps: float, cfg: ScoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """(frames sampled for the per-frame signals, first frames of the flow pairs)."""
    count = frame_count(total, fps, cfg.num_frames, cfg.frames_per_second, cfg.max_frames)
    # motion compares sampled frames: two at least, or a clip that moves would score 0
    return sample_indices(total, max(count, 2)), flow_starts(total, cfg.flow_pairs)


def _score(
    frames_at: Callable[[np.ndarray], np.ndarray], total: int, fps: float, cfg: ScoreConfig
) -> tuple[dict[str, float], str]:
    """Every cheap signal of a clip of ``total`` frames, reading frames by index."""
    sampled, starts = _frames_read(total, fps, cfg)
    out, hashed = _sampled_signals(frames_at(sampled), cfg)
    out["flow"], out["still_fraction"] = (
        pair_flow(frames_at(starts), frames_at(starts + 1), fps, cfg.flow_width, cfg.still_flow)
        if len(starts)
        else (0.0, 1.0)
    )
    if total < 2:  # an image: nothing moves or stands still
        out.update(dict.fromkeys(TEMPORAL_SIGNALS, float("nan")))
    return out, hashed


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
    """1:1: decode each clip's payload and write the cheap ``score_*`` columns and
    ``frame_hash``.

    Rows with ``clip_id`` None (source placeholders) or status ``"error"`` pass
    through with their scores unchanged (NaN if absent). A payload that cannot be
    decoded turns that row alone into status ``"error"`` with the reason in ``error``.
    """

    reads: tuple[str, ...] = ("clip_id", "status", "clip_bytes")
    writes: tuple[str, ...] = (
        *(score_column(n) for n in CHEAP_SIGNALS),
        "frame_hash",
        "status",
        "error",
    )

    def __init__(self, cfg: ScoreConfig | None = None) -> None:
        self.cfg = cfg or ScoreConfig()

    def __call__(self, batch: Batch) -> Batch:
        require_columns(batch, "score", ("clip_id", "clip_bytes"))
        n = num_rows(batch)
        scores = {name: float_column(batch, score_column(name)) for name in CHEAP_SIGNALS}
        hashes = object_column(batch, "frame_hash")
        status = object_column(batch, "status")
        error = object_column(batch, "error")
        for i in range(n):
            clip_id = batch["clip_id"][i]
            if passes_through(clip_id, status[i]):
                continue
            try:
                values, hashes[i] = score_payload(payload_bytes(batch["clip_bytes"][i]), self.cfg)
            except Exception as exc:  # any bad payload is this row's error, never the batch's
                status[i] = "error"
                error[i] = f"score: clip {clip_id}: {type(exc).__name__}: {exc}"
                hashes[i] = None
                for name in CHEAP_SIGNALS:
                    scores[name][i] = np.nan
                continue
            for name, value in values.items():
                scores[name][i] = value
        out = dict(batch)
        out.update({score_column(k): v for k, v in scores.items()})
        out.update(frame_hash=hashes, status=status, error=error)
        return out
