"""Decoding a source once: display-oriented RGB frames at a working size, exact frame numbers.

The split stage reads every source through :func:`iter_source_frames`. Each
:class:`DecodedFrame` carries its frame number in the *source's own numbering*
(presentation order, 0-based, as PyAV/FFmpeg output it), its presentation time
relative to the stream start (correct for variable frame rates and late starts),
its duration, and the image turned display-side up (rotation applied, anamorphic
pixels squared) at ``even_size(display, max_area)``.

Backends: ``"pyav"`` (default; any storage, any container FFmpeg reads) and
``"decord"`` (local files only; sometimes faster on large H.264, but with known
issues: memory growth, wrong frames on some B-frame layouts, see OFFLINE.md). When
decord fails to open a file or breaks mid-file, decoding continues with PyAV from
the next frame number, so a backend failure never loses or duplicates a frame.

Starting at ``start_frame > 0`` seeks: the video packets are demuxed (not decoded)
once to list their presentation times (:func:`frame_pts_table`), the container
seeks to the keyframe before the wanted frame, and decoded frames are numbered by
their position in that table, so numbers equal those of a decode from the start.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import cv2
import numpy as np

from pipeline.stages.probe import display_size, open_source
from pipeline.video import even_size

__all__ = ["BACKENDS", "DecodedFrame", "frame_pts_table", "iter_pyav", "iter_source_frames"]

BACKENDS = ("pyav", "decord")


@dataclass(frozen=True)
class DecodedFrame:
    num: int  # source frame number: presentation order, 0-based
    time_s: float  # presentation time relative to the stream start
    duration_s: float  # until the next frame (the average frame duration if unknown)
    image: np.ndarray  # (H, W, 3) uint8 RGB, display-oriented, working size
    # (h, W, 3) uint8 BGR detection frame: the *coded* frame resized to ``detect_width``
    # wide with bilinear interpolation, exactly as PySceneDetect's own loop prepares it
    # (so detectors see what the ``scenedetect`` CLI sees); None when not asked for.
    small: np.ndarray | None = None


def _rate(stream: Any) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def frame_pts_table(container: Any) -> list[int]:
    """Sorted presentation times (in the stream's time base) of every video frame of the
    first video stream, from demuxing alone; position ``k`` holds frame ``k``'s pts.

    Packets FFmpeg marks to discard (edit lists) and packets without a pts are left out.
    Leaves the container at its end: seek before decoding.
    """
    stream = container.streams.video[0]
    pts = [
        int(p.pts)
        for p in container.demux(stream)
        if p.pts is not None and p.size and not p.is_discard
    ]
    return sorted(set(pts))


def _working_size(
    frame: Any, stream: Any, display: tuple[int, int] | None, max_area: int
) -> tuple[tuple[int, int], int]:
    """(decode size in coded orientation, rotation degrees ccw) for a stream's frames."""
    rotation = round(frame.rotation or 0) % 360
    sar = Fraction(stream.sample_aspect_ratio or 1)
    shown = display or display_size(frame.width, frame.height, sar, rotation)
    w, h = even_size(shown[0], shown[1], max_area)
    # Scale in coded orientation, then rotate: a quarter turn swaps the sides.
    return ((h, w) if rotation % 180 else (w, h)), rotation


def _frame_number(pts: int | None, pts_table: list[int] | None, previous: int) -> int:
    """A decoded frame's number: its pts's position in the table, else the next number."""
    if pts_table is not None and pts is not None:
        at = bisect.bisect_left(pts_table, int(pts))
        if at < len(pts_table) and pts_table[at] == int(pts):
            return at
    return previous + 1


def _images(
    frame: Any, size: tuple[int, int], detect_width: int | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(working-size RGB image in coded orientation, detection BGR frame or None)."""
    if detect_width is None:
        image = frame.to_ndarray(
            width=size[0], height=size[1], format="rgb24", interpolation="AREA"
        )
        return image, None
    # One full-size conversion feeds both: the detector's frame the way scenedetect makes
    # it (bilinear from the coded frame), the payload's with area averaging.
    full = frame.to_ndarray(format="bgr24")
    h, w = full.shape[:2]
    small = full
    if w > detect_width:
        dsize = (detect_width, max(1, round(h * detect_width / w)))
        small = cv2.resize(full, dsize, interpolation=cv2.INTER_LINEAR)
    work = full if (w, h) == size else cv2.resize(full, size, interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(work, cv2.COLOR_BGR2RGB), small


def iter_pyav(
    container: Any,
    display: tuple[int, int] | None,
    max_area: int,
    start_frame: int = 0,
    pts_table: list[int] | None = None,
    detect_width: int | None = None,
) -> Iterator[DecodedFrame]:
    """Decode the first video stream of an open PyAV ``container`` from ``start_frame``.

    ``display`` is the probed display size (None derives it from the stream). From
    ``start_frame > 0`` the container seeks; ``pts_table`` (from
    :func:`frame_pts_table`, computed when None) numbers the frames. ``detect_width``
    adds :attr:`DecodedFrame.small`.
    """
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    frame_s = 1.0 / _rate(stream) if _rate(stream) else 0.0
    tb = stream.time_base or Fraction(1, 1)
    start_pts: int | None = stream.start_time
    if start_frame > 0:
        if pts_table is None:
            pts_table = frame_pts_table(container)
        if start_frame >= len(pts_table):
            return
        if start_pts is None:
            start_pts = pts_table[0]
        container.seek(pts_table[start_frame], stream=stream, backward=True, any_frame=False)
    size: tuple[int, int] = (0, 0)
    rotation = 0
    num = start_frame - 1
    last_time = None
    for frame in container.decode(stream):
        num = _frame_number(frame.pts, pts_table, num)
        if num < start_frame:
            continue  # decoded from the keyframe before the seek point only to get here
        if size == (0, 0):
            size, rotation = _working_size(frame, stream, display, max_area)
        if frame.pts is not None:
            if start_pts is None:
                start_pts = int(frame.pts)
            time_s = float((int(frame.pts) - start_pts) * tb)
        else:
            time_s = (last_time + frame_s) if last_time is not None else num * frame_s
        last_time = time_s
        duration = float(frame.duration * frame.time_base) if frame.duration else frame_s
        image, small = _images(frame, size, detect_width)
        if rotation:
            # frame.rotation is counter-clockwise degrees, and so is np.rot90.
            image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
        yield DecodedFrame(num, time_s, duration, image, small)


def _iter_decord(
    path: str, display: tuple[int, int], rotation: int, max_area: int, start_frame: int
) -> Iterator[DecodedFrame]:
    """Frames of a local file via decord (coded orientation, then rotated), in batches."""
    import decord

    w, h = even_size(display[0], display[1], max_area)
    coded = (h, w) if rotation % 180 else (w, h)
    reader = decord.VideoReader(path, width=coded[0], height=coded[1], num_threads=0)
    count = len(reader)
    stamps = reader.get_frame_timestamp(range(count)) if count else np.zeros((0, 2))
    first = float(stamps[0, 0]) if count else 0.0
    batch = 16  # frames per call: decord's per-call overhead vs. memory
    for lo in range(start_frame, count, batch):
        frames = reader.get_batch(list(range(lo, min(lo + batch, count)))).asnumpy()
        for i, image in enumerate(frames):
            num = lo + i
            t0, t1 = float(stamps[num, 0]), float(stamps[num, 1])
            if rotation:
                image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
            yield DecodedFrame(num, t0 - first, max(0.0, t1 - t0), image)


def iter_source_frames(
    uri: str,
    display: tuple[int, int] | None,
    max_area: int,
    *,
    start_frame: int = 0,
    backend: str = "pyav",
    rotation: int = 0,
    detect_width: int | None = None,
) -> Iterator[DecodedFrame]:
    """Every frame of ``uri`` from ``start_frame`` on, decoded once (see the module doc).

    ``rotation`` (the probed display rotation) is needed by decord only; PyAV reads it
    off the frames. With ``backend="decord"``, a decord failure (at open or mid-file)
    falls back to PyAV at the first frame decord did not deliver.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}, expected one of {BACKENDS}")
    next_frame = start_frame
    local = not uri.startswith("s3://")
    if backend == "decord" and local and display is not None:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        try:
            for frame in _iter_decord(path, display, rotation, max_area, start_frame):
                yield frame
                next_frame = frame.num + 1
            return
        except Exception:  # decord's failure modes are many; PyAV takes over below
            pass
    with open_source(uri) as container:
        table = None
        if next_frame > 0:
            table = frame_pts_table(container)
        yield from iter_pyav(container, display, max_area, next_frame, table, detect_width)
