"""Split: decode each source once, find its shots, cut them into clips.

1:N, one source row in, one row per clip out. The source is decoded a single
time with PyAV, streaming: every frame is turned display-side up (rotation
applied, anamorphic pixels squared via the probed display size) at a working
resolution; a downscaled copy goes to a PySceneDetect detector through its
``process_frame`` API, and the working-resolution frames of the *open* shot are
buffered until the detector closes it (or it grows past ``max_clip_s``, when
full chunks are flushed early), so memory is bounded by the clip length, not
the video length. Each clip is stored as H.264 mp4 bytes (``clip_bytes``) so no
later stage ever reads the source again.

The pure cores are :func:`detect_shots` (frames -> shots) and
:func:`cut_clips` (shots -> clip spans); :class:`Split` streams the same rules.
A source that failed probe, breaks during decoding or yields no clip becomes
exactly one placeholder row (``clip_id`` None) carrying its ``src_*`` columns.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import cv2
import numpy as np
from scenedetect import (
    AdaptiveDetector,
    ContentDetector,
    FrameTimecode,
    HistogramDetector,
    SceneDetector,
    ThresholdDetector,
)

from pipeline.stages.base import Batch, batch_to_rows, num_rows, rows_to_batch
from pipeline.stages.probe import describe, display_size, open_source
from pipeline.video import encode_mp4, even_size

__all__ = [
    "CLIP_NAMESPACE",
    "DETECTORS",
    "ShotTracker",
    "Split",
    "SplitConfig",
    "clip_id",
    "clip_spans",
    "cut_clips",
    "detect_shots",
    "make_detector",
    "shots",
]

DETECTORS = ("adaptive", "content", "histogram", "threshold")

# Fixed forever: clip ids are uuid5(CLIP_NAMESPACE, f"{source}|{start}|{end}"), so a
# re-run over the same sources yields the same ids (and shard keys).
CLIP_NAMESPACE = uuid.UUID("5b1f0c4e-2d7a-5e43-9a61-7f3c2b8e4d10")

# PySceneDetect's CLI default minimum scene length; shorter shots merge into a neighbour.
_MIN_SCENE_S = 0.6
# Slack for float frame rates: 2.0 s at 29.97 fps is 59.94 frames, keep 59 + epsilon.
_EPS = 1e-6


@dataclass(frozen=True)
class SplitConfig:
    """Shot detection and clip cutting.

    Peak memory per source is about ``2 * max_clip_s * fps`` working-resolution
    frames (a long shot is chunked only once its length guarantees an equal cut).
    """

    detector: str = "adaptive"  # one of DETECTORS
    threshold: float | None = None  # None: the detector's own default
    min_clip_s: float = 1.0  # shots shorter than this are dropped
    max_clip_s: float = 10.0  # longer shots are cut into chunks of similar length
    detect_width: int = 256  # frames are downscaled to this width for detection
    work_max_area: int = 640 * 360  # pixel budget of clip payloads (aspect kept, even sides)
    work_crf: int = 18  # x264 CRF of clip payloads


def make_detector(cfg: SplitConfig, fps: float) -> SceneDetector:
    """A fresh scenedetect detector as ``cfg`` names it."""
    min_len = max(1, round(_MIN_SCENE_S * fps))
    kwargs: dict[str, Any] = {"min_scene_len": min_len}
    if cfg.detector == "adaptive":
        if cfg.threshold is not None:
            kwargs["adaptive_threshold"] = cfg.threshold
        return AdaptiveDetector(**kwargs)
    if cfg.threshold is not None:
        kwargs["threshold"] = cfg.threshold
    if cfg.detector == "content":
        return ContentDetector(**kwargs)
    if cfg.detector == "histogram":
        return HistogramDetector(**kwargs)
    if cfg.detector == "threshold":
        return ThresholdDetector(**kwargs)
    raise ValueError(f"unknown detector {cfg.detector!r}, expected one of {DETECTORS}")


class ShotTracker:
    """Feeds frames to a detector one at a time and reports cut frames.

    A cut frame is the first frame of a new shot. Detectors may report a cut a few
    frames late; :attr:`delay` bounds how late (for the threshold detector, whose
    cut sits mid-fade, it is a lower bound).
    """

    def __init__(self, cfg: SplitConfig, fps: float) -> None:
        if not fps > 0:
            raise ValueError(f"need a positive frame rate, got {fps}")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.detect_width = cfg.detect_width
        self.detector = make_detector(cfg, fps)
        self.delay = int(self.detector.event_buffer_length)
        self._last = -1

    def _small_bgr(self, frame: np.ndarray) -> np.ndarray:
        """RGB frame -> BGR (what scenedetect expects), at most ``detect_width`` wide."""
        h, w = frame.shape[:2]
        if w > self.detect_width:
            size = (self.detect_width, max(1, round(h * self.detect_width / w)))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)

    def push(self, frame_num: int, frame: np.ndarray) -> list[int]:
        """Process frame ``frame_num`` (RGB uint8 (H, W, 3)); cut frames found so far."""
        self._last = frame_num
        timecode = FrameTimecode(frame_num, fps=self.fps)
        return [
            tc.frame_num for tc in self.detector.process_frame(timecode, self._small_bgr(frame))
        ]

    def finish(self) -> list[int]:
        """Cuts the detector holds back until the stream ends."""
        if self._last < 0:
            return []
        timecode = FrameTimecode(self._last, fps=self.fps)
        return [tc.frame_num for tc in self.detector.post_process(timecode)]


def detect_shots(
    frames: Iterable[np.ndarray], fps: float, cfg: SplitConfig
) -> list[tuple[int, int]]:
    """Shots ``[(start, end), ...]`` (end exclusive) of a sequence of RGB frames."""
    tracker = ShotTracker(cfg, fps)
    cuts: list[int] = []
    count = 0
    for frame_num, frame in enumerate(frames):
        cuts += tracker.push(frame_num, frame)
        count = frame_num + 1
    cuts += tracker.finish()
    bounds = [0, *sorted({c for c in cuts if 0 < c < count}), count]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def _frame_limits(fps: float, cfg: SplitConfig) -> tuple[int, int]:
    """(min, max) clip length in frames; max is never below min."""
    min_frames = max(1, math.ceil(cfg.min_clip_s * fps - _EPS))
    max_frames = max(min_frames, math.floor(cfg.max_clip_s * fps + _EPS))
    return min_frames, max_frames


def _chunks(start: int, end: int, min_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into pieces of ``min_frames..max_frames`` frames.

    Full-length pieces while more than two remain, then the rest split evenly (or,
    when even pieces would fall under ``min_frames``, as many full pieces as fit,
    dropping the leftover). The rule only looks forward from ``start``, which is
    what lets :class:`Split` flush pieces of a shot that is still open.
    """
    out = []
    while end - start > 2 * max_frames:
        out.append((start, start + max_frames))
        start += max_frames
    rest = end - start
    n = math.ceil(rest / max_frames)
    if n == 0 or rest // n < min_frames:
        n = rest // max_frames
        end = start + n * max_frames
    bounds = [start + round(i * (end - start) / n) for i in range(n + 1)] if n else [start]
    return out + list(itertools.pairwise(bounds))


def clip_spans(start: int, end: int, fps: float, cfg: SplitConfig) -> list[tuple[int, int]]:
    """The clips of one shot ``[start, end)``: none when the shot is shorter than
    ``min_clip_s``, else pieces of ``min_clip_s..max_clip_s`` (see :func:`_chunks`)."""
    min_frames, max_frames = _frame_limits(fps, cfg)
    if end - start < min_frames:
        return []
    return _chunks(start, end, min_frames, max_frames)


def cut_clips(
    shots: Iterable[tuple[int, int]], fps: float, cfg: SplitConfig
) -> list[tuple[int, int]]:
    """Clip spans ``[(start, end), ...]`` of all ``shots`` (see :func:`clip_spans`)."""
    return [span for a, b in shots for span in clip_spans(a, b, fps, cfg)]


def clip_id(source: str, start_frame: int, end_frame: int) -> str:
    """Deterministic clip id (hex uuid5) of a span of a source."""
    return uuid.uuid5(CLIP_NAMESPACE, f"{source}|{start_frame}|{end_frame}").hex


# --- decoding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    num: int  # decode-order index = source frame number
    time_s: float  # presentation time relative to the stream start
    image: np.ndarray  # (H, W, 3) uint8 RGB, display-oriented


def _iter_frames(
    container: Any, display: tuple[int, int] | None, max_area: int
) -> Iterator[tuple[_Frame, float]]:
    """Decode the first video stream of ``container`` once, yielding each frame at
    ``even_size(display, max_area)`` display-side up, with its duration in seconds.

    ``display`` is the probed display size; None derives it from the stream.
    """
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    frame_s = 1.0 / float(rate) if rate else 0.0
    start_s = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
    size: tuple[int, int] = (0, 0)
    rotation = 0
    last_time = -frame_s
    for num, frame in enumerate(container.decode(stream)):
        if num == 0:
            rotation = round(frame.rotation or 0) % 360
            sar = Fraction(stream.sample_aspect_ratio or 1)
            shown = display or display_size(frame.width, frame.height, sar, rotation)
            w, h = even_size(shown[0], shown[1], max_area)
            # Scale in coded orientation, then rotate: a quarter turn swaps the sides.
            size = (h, w) if rotation % 180 else (w, h)
        image = frame.to_ndarray(
            width=size[0], height=size[1], format="rgb24", interpolation="AREA"
        )
        if rotation:
            # frame.rotation is counter-clockwise degrees, and so is np.rot90.
            image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
        if frame.time is not None:
            if start_s is None:
                start_s = float(frame.time)
            time_s = float(frame.time) - start_s
        else:
            time_s = last_time + frame_s
        last_time = time_s
        duration = float(frame.duration * frame.time_base) if frame.duration else frame_s
        yield _Frame(num, time_s, image), duration


# --- the streaming splitter ------------------------------------------------------------------


@dataclass(frozen=True)
class _Clip:
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    payload: bytes


class _SourceSplitter:
    """Streaming state of one source: the open shot's buffered frames and the clips
    emitted so far. Emits exactly ``cut_clips(detect_shots(frames))`` (the threshold
    detector aside, whose mid-fade cuts can come later than any fixed delay)."""

    def __init__(self, cfg: SplitConfig, fps: float) -> None:
        self.cfg, self.fps = cfg, fps
        self.tracker = ShotTracker(cfg, fps)
        self.min_frames, self.max_frames = _frame_limits(fps, cfg)
        self.buffer: deque[_Frame] = deque()
        self.shot_start = 0  # first frame of the open shot
        self.pending = 0  # first frame of the open shot not yet emitted or dropped
        self.clips: list[_Clip] = []
        self.count = 0
        self.end_s = 0.0

    def push(self, frame: _Frame, duration_s: float) -> None:
        self.buffer.append(frame)
        self.count = frame.num + 1
        self.end_s = frame.time_s + duration_s
        for cut in self.tracker.push(frame.num, frame.image):
            self._close_shot(cut)
        # Frames before `safe` cannot be reached by a late cut: when more than two
        # full chunks of the open shot are safe, the offline rule emits the first one.
        safe = self.count - self.tracker.delay
        while safe - self.pending > 2 * self.max_frames:
            self._emit(self.pending, self.pending + self.max_frames)

    def finish(self) -> list[_Clip]:
        for cut in self.tracker.finish():
            self._close_shot(cut)
        self._close_shot(self.count)
        return self.clips

    def _close_shot(self, cut: int) -> None:
        if cut <= self.shot_start:
            return
        # A cut reported later than `delay` (mid-fade cuts) may land inside an
        # already flushed chunk; it then ends the shot at the flushed boundary.
        cut = max(cut, self.pending)
        if cut - self.shot_start >= self.min_frames:
            for a, b in clip_spans(self.pending, cut, self.fps, self.cfg):
                self._emit(a, b)
        self._drop_until(cut)
        self.shot_start = self.pending = cut

    def _drop_until(self, frame_num: int) -> None:
        while self.buffer and self.buffer[0].num < frame_num:
            self.buffer.popleft()

    def _emit(self, start: int, end: int) -> None:
        self._drop_until(start)
        frames = [f for f in self.buffer if f.num < end] if self.buffer else []
        following = next((f for f in self.buffer if f.num >= end), None)
        end_s = following.time_s if following is not None else self.end_s
        payload = encode_mp4(np.stack([f.image for f in frames]), self.fps, crf=self.cfg.work_crf)
        self.clips.append(_Clip(start, end, frames[0].time_s, end_s, payload))
        self._drop_until(end)
        self.pending = end


def _split_source(uri: str, display: tuple[int, int], fps: float, cfg: SplitConfig) -> list[_Clip]:
    """All clips of one source; raises on decode failure or an empty stream."""
    splitter = _SourceSplitter(cfg, fps)
    with open_source(uri) as container:
        for frame, duration_s in _iter_frames(container, display, cfg.work_max_area):
            splitter.push(frame, duration_s)
    if splitter.count == 0:
        raise ValueError("no decodable frames")
    return splitter.finish()


def shots(path: str, detector: str = "adaptive") -> list[dict[str, Any]]:
    """Shots of a video: ``start_frame``, ``end_frame`` (exclusive), ``start_s``, ``end_s``.

    Decodes once at detection size; for ``reelpack shots``.
    """
    cfg = SplitConfig(detector=detector)
    with open_source(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        tracker = ShotTracker(cfg, float(rate or 0))
        times: list[float] = []
        cuts: list[int] = []
        end_s = 0.0
        # The detection size doubles as the decode size: nothing else is kept.
        area = cfg.detect_width * cfg.detect_width
        for frame, duration_s in _iter_frames(container, None, area):
            cuts += tracker.push(frame.num, frame.image)
            times.append(frame.time_s)
            end_s = frame.time_s + duration_s
        cuts += tracker.finish()
    count = len(times)
    bounds = [0, *sorted({c for c in cuts if 0 < c < count}), count]
    return [
        {
            "start_frame": a,
            "end_frame": b,
            "start_s": times[a],
            "end_s": times[b] if b < count else end_s,
        }
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]


# --- the stage -------------------------------------------------------------------------------

_SRC_COLUMNS = (
    "src_status",
    "src_error",
    "src_duration_s",
    "src_num_frames",
    "src_codec",
)


class Split:
    """1:N stage: one source row in, one row per clip out (or one placeholder row)."""

    reads: tuple[str, ...] = ("source", *_SRC_COLUMNS, "fps", "width", "height")
    writes: tuple[str, ...] = (
        "clip_id",
        "source",
        "status",
        "reasons",
        "start_frame",
        "end_frame",
        "start_s",
        "end_s",
        "fps",
        "width",
        "height",
        "clip_bytes",
        *_SRC_COLUMNS,
        "src_num_clips",
    )

    def __init__(self, cfg: SplitConfig | None = None) -> None:
        self.cfg = cfg or SplitConfig()
        make_detector(self.cfg, 30.0)  # fail at construction on a bad detector name

    def split_row(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Output rows of one source row; never raises."""
        base = dict(row)
        source = str(row["source"])
        # Ray turns missing strings into NaN between stages; keep them None.
        error = row.get("src_error")
        base["src_error"] = error if isinstance(error, str) else None
        if row.get("src_status") != "done":
            reason = base["src_error"] or f"{source}: probe failed (no reason recorded)"
            return [self._placeholder(base, source, status="error", error=reason)]
        try:
            fps = float(row["fps"])
            display = (int(row["width"]), int(row["height"]))
            clips = _split_source(source, display, fps, self.cfg)
        except Exception as exc:  # one broken source is that row's error value
            return [
                self._placeholder(
                    base, source, status="error", error=f"{source}: split failed: {describe(exc)}"
                )
            ]
        if not clips:
            return [self._placeholder(base, source, status="done", error=None)]
        out = []
        for clip in clips:
            out.append(
                {
                    **base,
                    "clip_id": clip_id(source, clip.start_frame, clip.end_frame),
                    "source": source,
                    "status": "kept",
                    "reasons": [],
                    "start_frame": clip.start_frame,
                    "end_frame": clip.end_frame,
                    "start_s": clip.start_s,
                    "end_s": clip.end_s,
                    "clip_bytes": clip.payload,
                    "src_num_clips": len(clips),
                }
            )
        return out

    @staticmethod
    def _placeholder(
        base: dict[str, Any], source: str, status: str, error: str | None
    ) -> dict[str, Any]:
        return {
            **base,
            "clip_id": None,
            "source": source,
            "status": None,
            "reasons": [],
            "clip_bytes": None,
            "src_status": status,
            "src_error": error,
            "src_num_clips": 0,
        }

    def __call__(self, batch: Batch) -> Batch:
        rows = [out for row in batch_to_rows(batch) for out in self.split_row(row)]
        columns = [*batch.keys(), *(c for c in self.writes if c not in batch)]
        if not num_rows(batch):
            return rows_to_batch([], columns)
        return rows_to_batch(rows, columns)
