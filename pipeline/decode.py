"""Decoding a source once: display-oriented frames at a working size, exact frame numbers.

The split stage reads every source through :func:`iter_source_frames`. Each
:class:`DecodedFrame` carries its frame number in the *source's own numbering*
(presentation order, 0-based, as PyAV/FFmpeg output it), its presentation time
relative to the stream start (correct for variable frame rates and late starts),
its duration, the image turned display-side up (rotation applied, anamorphic pixels
squared) at ``even_size(display, max_area)``, and the small BGR frame shot detectors
read. Frames the decoder flags interlaced are deinterlaced first (:func:`deinterlaced`).

The image stays in the decoder's own 4:2:0 YUV, resized plane by plane, and carries
the source's colour tags: clip payloads are encoded from it with no RGB round trip.
The detection frame is built at its small size and converted by swscale exactly as
PySceneDetect's loop (full-size BGR conversion, then a linear resize) would make it,
so detectors see what the ``scenedetect`` CLI sees without a full-size conversion.
:class:`Prefetcher` runs any of these iterators on a background thread.

Backends: ``"pyav"`` (default; any storage, any container FFmpeg reads) and
``"decord"`` (local files only; sometimes faster on large H.264, but with known
issues: memory growth, wrong frames on some B-frame layouts, see OFFLINE.md). When
decord fails to open a file or breaks mid-file, decoding continues with PyAV from
the next frame number, so a backend failure never loses or duplicates a frame.

Starting at ``start_frame > 0`` seeks: the video packets are demuxed (not decoded)
once to list their presentation times (:func:`frame_pts_table`), the container
seeks to the keyframe before the wanted frame, and decoded frames are numbered by
their position in that table, so numbers equal those of a decode from the start
(times as :func:`rising_pts` corrects them, for streams whose labels are shuffled).

A packet the decoder cannot decode (FFmpeg's "invalid data": corrupt bytes) does not
end the decode when a :class:`DecodeDamage` is handed in: decoding goes on, as
``ffmpeg`` does, and the frames from the damage to the next keyframe (missing, or
concealed from broken references) are left out. Frame numbers stay the source's own
across the gap: the frames left out are counted from the video packets' times.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import heapq
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Generic, TypeVar

import av
import cv2
import numpy as np

from pipeline.hdr import (
    DEFAULT_PEAK_NITS,
    TRC_PQ,
    content_peak_nits,
    is_hdr,
    is_wide_gamut_sdr,
    tone_map_i420,
)
from pipeline.stages.probe import describe, display_size, open_source
from pipeline.video import (
    FIELD_MATCH,
    display_orientation,
    even_size,
    filter_graph,
    frame_rate,
    is_cover_art,
    is_raw_stream,
    opaque,
    orient,
    pulled,
    video_stream,
)

__all__ = [
    "BACKENDS",
    "DecodedFrame",
    "OtherStreams",
    "Prefetcher",
    "TimestampJump",
    "Unseekable",
    "deinterlaced",
    "detection_bgr",
    "frame_pts_table",
    "i420_planes",
    "i420_to_rgb",
    "iter_pyav",
    "iter_source_frames",
    "join_i420",
    "rgb_to_i420",
    "rising_pts",
    "rotate_i420",
]

BACKENDS = ("pyav", "decord")

# FFmpeg's AVColorSpace / AVColorRange values used here.
COLORSPACE_UNSPECIFIED = 2
RANGE_UNSPECIFIED, RANGE_MPEG, RANGE_JPEG = 0, 1, 2

T = TypeVar("T")


@dataclass(frozen=True)
class DecodedFrame:
    num: int  # source frame number: presentation order, 0-based
    time_s: float  # presentation time relative to the stream start
    duration_s: float  # until the next frame (the average frame duration if unknown)
    # (H * 3 / 2, W) uint8 I420 (planar Y, then U, then V; 4:2:0), display-oriented, at
    # the working size: what clip payloads are encoded from, with no colour conversion.
    yuv: np.ndarray
    # (h, W, 3) uint8 BGR detection frame: the *coded* frame at ``detect_width`` wide
    # (what PySceneDetect's detectors expect); None when not asked for.
    small: np.ndarray | None = None
    colorspace: int = COLORSPACE_UNSPECIFIED  # FFmpeg AVColorSpace of ``yuv``
    color_range: int = RANGE_UNSPECIFIED  # FFmpeg AVColorRange of ``yuv``
    # The display (width, height) of a frame whose picture has another aspect ratio than
    # the stream's header (a stream that changes frame size or pixel shape mid-file,
    # :class:`_Geometry`):
    # ``yuv`` is then at a working size of that aspect. None: the header's (probed) one.
    display: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the working image."""
        return self.yuv.shape[1], self.yuv.shape[0] * 2 // 3

    def rgb(self) -> np.ndarray:
        """The working image as (H, W, 3) uint8 RGB (converted with its colour tags)."""
        return i420_to_rgb(self.yuv, self.colorspace, self.color_range)


class Unseekable(ValueError):
    """A stream whose frames cannot be found by their presentation times: it is decoded
    from the start, never seeked into (and never split into ranges)."""


class TimestampJump(Unseekable):
    """A stream whose presentation times jump back (or repeat): concatenated recordings,
    an encoder restart, a 33-bit MPEG-TS wrap."""


# a drop in pts beyond this (seconds) is a jump, not B-frame reordering
_REORDER_S = 2.0


def frame_pts_table(
    container: Any, timeout_s: float = 0.0, keyframes: list[int] | None = None
) -> list[int]:
    """Sorted presentation times (in the stream's time base) of every frame the source's
    video stream (:func:`pipeline.video.video_stream`) decodes to, from demuxing alone;
    position ``k`` holds frame ``k``'s pts.

    Packets FFmpeg marks to discard (edit lists) and packets without a pts are left out,
    and so are those a decoder cannot show: before the first keyframe (a recording that
    starts mid-GOP, as broadcast captures do) and, after it, pictures shown before it
    (they lean on the missing GOP). So frame ``k`` is the ``k``-th frame a decode from
    the start delivers, as unranged decoding numbers them. Leaves the container at its
    end: seek before decoding. With ``timeout_s > 0``, raises TimeoutError once
    demuxing has taken that long; raises :class:`TimestampJump` when times jump back
    or repeat, and :class:`Unseekable` when no packet has a time (a raw elementary
    stream: the demuxer only counts frames). ``keyframes``, when given, receives the
    numbers of the frames a seek can start decoding at (the keyframes), in order.
    """
    stream = video_stream(container)
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    reorder = int(_REORDER_S / (stream.time_base or Fraction(1, 90000)))
    pts: list[int] = []
    lead: list[int] = []  # packets before the first keyframe
    key_pts: int | None = None
    top: int | None = None
    untimed = 0  # packets with data but no time
    keys: list[int] = []  # keyframes' times
    for i, p in enumerate(container.demux(stream)):
        untimed += p.pts is None and p.size > 0
        if p.pts is not None and p.size:
            t = int(p.pts)
            if top is not None and t < top - reorder:
                raise TimestampJump(
                    f"presentation times jump back at packet {i} ({t} after {top}, "
                    f"time base {stream.time_base})"
                )
            top = t if top is None else max(top, t)
            if key_pts is None and p.is_keyframe:  # a discarded one still decodes
                key_pts = t
            if p.is_keyframe:
                keys.append(t)
            if not p.is_discard:
                (lead if key_pts is None else pts).append(t)
        if deadline is not None and i % 256 == 0 and time.monotonic() > deadline:
            raise TimeoutError(f"demuxing the frame table took over {timeout_s:g} s")
    if not pts and not lead and untimed:
        raise Unseekable(f"none of its {untimed} packets has a presentation time")
    shown = lead if key_pts is None else [t for t in pts if t >= key_pts]
    if len(set(shown)) < len(shown):
        raise TimestampJump(f"{len(shown) - len(set(shown))} frames repeat a presentation time")
    table = sorted(shown)
    if keyframes is not None and table:
        keyframes[:] = sorted({bisect.bisect_left(table, t) for t in keys if t >= table[0]})
    return table


def _coded(size: tuple[int, int], rotation: int) -> tuple[int, int]:
    """A display-oriented size in coded orientation: a quarter turn swaps the sides."""
    return (size[1], size[0]) if rotation % 180 else size


def _natural_detection_size(width: int, height: int, detect_width: int) -> tuple[int, int]:
    """The size PySceneDetect's loop shrinks a ``width`` x ``height`` frame to."""
    if width <= detect_width:
        return width, height
    return detect_width, max(1, round(height * detect_width / width))


class _Geometry:
    """Sizes for each picture geometry a stream decodes to.

    The stream's header (what probe reports) fixes the reference: its working size
    (from the probed ``display``) and its detection size. A frame of another coded size
    or pixel aspect ratio (a stream that changes mid-file: a broadcast capture going
    from an HD programme to an SD advert, or an SD channel switching between 4:3 and
    16:9 by its pixel shape; joined recordings; adaptive-bitrate captures) keeps the
    detection size (stretched if need be: the detector's frames must not change shape),
    and the working size too while its display aspect ratio is the header's (within
    1 %); with another aspect ratio it gets a working size of its own, which
    :class:`DecodedFrame.display` announces, so that its pictures are never stretched.

    The header's pixel aspect ratio is the stream's (a container's own, as players
    prefer it); a frame's counts where its bitstream states another than the header's
    bitstream did. Every size depends only on the header and the frame, never on what
    was decoded before: a range decoded from mid-stream gets the sizes a whole decode
    gets.
    """

    def __init__(
        self,
        coded: tuple[int, int],
        sar: Fraction,
        coded_sar: Fraction | None,
        display: tuple[int, int] | None,
        max_area: int,
        detect_width: int | None,
        rotation: int,
    ) -> None:
        self.coded, self.sar, self.rotation, self.max_area = coded, sar, rotation, max_area
        self.coded_sar = coded_sar  # the header's bitstream pixel aspect ratio, if stated
        self.display = display or display_size(*coded, sar, rotation)
        self.detect: tuple[int, int] | None = None
        if detect_width is not None:
            self.detect = _natural_detection_size(*coded, detect_width)
        self._sizes: dict[
            tuple[int, int, Fraction], tuple[tuple[int, int], tuple[int, int] | None]
        ] = {}

    def sizes(
        self, width: int, height: int, coded_sar: Fraction | None = None
    ) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(working size in coded orientation, its display size when not the header's)
        for a frame of ``width`` x ``height`` coded pixels whose bitstream states
        ``coded_sar`` (None or 0: not stated)."""
        sar = self.sar
        if coded_sar and self.coded_sar and coded_sar != self.coded_sar:
            sar = coded_sar
        known = self._sizes.get((width, height, sar))
        if known is not None:
            return known
        shown, own = self.display, None
        if (width, height, sar) != (*self.coded, self.sar):
            frame_shown = display_size(width, height, sar, self.rotation)
            aspect, header_aspect = frame_shown[0] / frame_shown[1], shown[0] / shown[1]
            if abs(aspect / header_aspect - 1) > 0.01:
                shown = own = frame_shown
        size = (0, 0)
        if self.max_area > 0:
            size = _coded(even_size(shown[0], shown[1], self.max_area), self.rotation)
        self._sizes[(width, height, sar)] = (size, own)
        return size, own


def _stated_sar(ctx: Any) -> Fraction | None:
    """The pixel aspect ratio the decoder has read from the bitstream (None: none)."""
    sar = ctx.sample_aspect_ratio
    return Fraction(sar) if sar else None


def _frame_number(pts: int | None, pts_table: list[int] | None, previous: int) -> int:
    """A decoded frame's number: its pts's position in the table, else the next number."""
    if pts_table is not None and pts is not None:
        at = bisect.bisect_left(pts_table, int(pts))
        if at < len(pts_table) and pts_table[at] == int(pts):
            return at
    return previous + 1


def _planes(frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(Y, U, V, full_range) views of a 4:2:0 8-bit frame (converted first if it is not;
    a transparent one composited over white first, :func:`opaque`)."""
    frame = opaque(frame)
    name = frame.format.name
    if name not in ("yuv420p", "yuvj420p"):
        # 10-bit, 4:2:2/4:4:4, RGB, palette, grey: one swscale pass to 8-bit 4:2:0.
        frame = frame.reformat(format="yuv420p")
        name = "yuv420p"
    full = name == "yuvj420p" or frame.color_range == RANGE_JPEG
    views = []
    for plane in frame.planes[:3]:
        rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        views.append(rows[:, : plane.width])
    return views[0], views[1], views[2], full


@functools.lru_cache(maxsize=16)
def _chroma_maps(h: int, w: int, dh: int, dw: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``cv2.remap`` maps that sample a 4:2:0 chroma plane where ``cv2.resize(luma, (dw,
    dh), INTER_LINEAR)`` samples luma, each luma pixel paired with its nearest chroma
    sample (as the unscaled YUV->RGB conversion pairs them); None when
    ``cv2.resize(chroma, (dw, dh), INTER_NEAREST_EXACT)`` reads exactly those samples.

    OpenCV's linear resize reads source position ``(i + 0.5) * n_in / n_out - 0.5``,
    blending pixels ``floor`` and ``floor + 1``; their chroma samples are ``floor // 2``
    and ``(floor + 1) // 2``, so the chroma position is ``floor // 2`` plus the weight
    when the two differ. Integer positions (a resize that samples single pixels) read
    chroma exactly.
    """

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, bool]:
        x = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        x0 = np.floor(x).astype(np.int64)
        x1 = np.minimum(x0 + 1, n_in - 1)
        pos = x0 // 2 + (x - x0) * (x1 // 2 - x0 // 2)
        chroma = (n_in + 1) // 2
        nearest = np.minimum(np.floor((np.arange(n_out) + 0.5) * (chroma / n_out)), chroma - 1)
        return pos.astype(np.float32), bool(np.array_equal(pos, nearest))

    (xs, x_exact), (ys, y_exact) = axis(dw, w), axis(dh, h)
    if x_exact and y_exact:
        return None
    fixed, frac = cv2.convertMaps(
        np.ascontiguousarray(np.broadcast_to(xs[None, :], (dh, dw))),
        np.ascontiguousarray(np.broadcast_to(ys[:, None], (dh, dw))),
        cv2.CV_16SC2,
    )
    return fixed, frac


@functools.lru_cache(maxsize=4)
def _bgr_tables(colorspace: int, color_range: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """swscale's YUV->BGR conversion of 8-bit 4:2:0 video as lookup tables: blue indexed
    by ``Y << 8 | U``, red by ``Y << 8 | V``, green by ``Y << 16 | U << 8 | V``.

    Built once per colour tags by converting a frame that holds every (Y, U, V) triple
    (each chroma pair shared by a 2x2 block of four luma values), so a lookup equals
    the conversion PySceneDetect's loop gets from FFmpeg, bit for bit. The frame is
    laid out so that each table is a transpose of the converted pixels (no scatter):
    chroma sample ``U << 14 | V << 6 | k`` (a 2048 x 2048 plane) covers the luma block
    ``4k .. 4k + 3``, so the picture's rows are ``(U, V >> 5, dy)`` and its columns
    ``(V & 31, k, dx)``, with ``Y = 4k + 2dy + dx``. swscale's blue does not depend on
    V, nor its red on U.
    """
    blocks = np.arange(1 << 22, dtype=np.uint32)  # 2048 x 2048 chroma samples
    uv = blocks >> 6  # each (U, V) pair has 64 blocks of 4 luma values
    u = (uv >> 8).astype(np.uint8).reshape(2048, 2048)
    v = (uv & 255).astype(np.uint8).reshape(2048, 2048)
    first = ((blocks & 63) << 2).astype(np.uint8).reshape(2048, 2048)
    y = np.empty((4096, 4096), np.uint8)
    for dy in range(2):
        for dx in range(2):
            y[dy::2, dx::2] = first + (2 * dy + dx)
    frame = av.VideoFrame.from_ndarray(
        np.concatenate([y.ravel(), u.ravel(), v.ravel()]).reshape(6144, 4096), format="yuv420p"
    )
    frame.colorspace, frame.color_range = colorspace, color_range
    # axes: U, V >> 5, dy, V & 31, k, dx, channel
    bgr = frame.reformat(format="bgr24").to_ndarray().reshape(256, 8, 2, 32, 64, 2, 3)
    del frame
    green = bgr[..., 1].transpose(4, 2, 5, 0, 1, 3).reshape(1 << 24)  # k dy dx U V>>5 V&31
    blue = bgr[:, 0, :, 0, :, :, 0].transpose(2, 1, 3, 0).reshape(1 << 16)  # at V = 0
    red = bgr[0, :, :, :, :, :, 2].transpose(3, 1, 4, 0, 2).reshape(1 << 16)  # at U = 0
    return blue, green, red


def _detection_frame(
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    colorspace: int,
    color_range: int,
    size: tuple[int, int],
) -> np.ndarray:
    """The BGR frame PySceneDetect's loop would make: the whole frame converted to BGR
    by swscale, then ``cv2.resize(..., INTER_LINEAR)`` to ``size`` (its
    :func:`_natural_detection_size`, or the header's for a frame of another size,
    :class:`_Geometry`), computed at the small size.

    Luma is resized as OpenCV would, each small pixel gets the chroma of the source
    pixel it samples (:func:`_chroma_maps`), and swscale's own conversion is applied
    through lookup tables (:func:`_bgr_tables`). Where the resize samples single pixels
    (an odd integer scale, e.g. 1280 to 256) the result equals the full-size path bit
    for bit; elsewhere it interpolates before converting instead of after: under a
    level apart on average, more at sharp colour edges.
    """
    h, w = y.shape
    dw, dh = size
    if (dw, dh) == (w, h):
        ys = np.ascontiguousarray(y)
    else:
        ys = cv2.resize(y, (dw, dh), interpolation=cv2.INTER_LINEAR)
    maps = _chroma_maps(h, w, dh, dw)
    if maps is None:  # single chroma samples, exactly where nearest-neighbour reads
        us = cv2.resize(u, (dw, dh), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.int32)
        vs = cv2.resize(v, (dw, dh), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.int32)
    else:
        us = cv2.remap(u, *maps, cv2.INTER_LINEAR).astype(np.int32)
        vs = cv2.remap(v, *maps, cv2.INTER_LINEAR).astype(np.int32)
    blue, green, red = _bgr_tables(colorspace, color_range)
    yu = (ys.astype(np.int32) << 8) | us
    yv = (ys.astype(np.int32) << 8) | vs
    return cv2.merge([np.take(blue, yu), np.take(green, (yu << 8) | vs), np.take(red, yv)])


def _shrink(plane: np.ndarray, w: int, h: int) -> np.ndarray:
    """``plane`` downscaled to ``w`` x ``h``, anti-aliased: area averaging when the scale
    is a whole number (OpenCV's fast path), else halvings by ``pyrDown`` (Gaussian,
    then every other pixel) while the scale is 2 or more and a linear resize for the
    rest: about as sharp as area averaging at a quarter of its cost."""
    ph, pw = plane.shape
    if pw % w == 0 and ph % h == 0 and pw // w == ph // h:
        return cv2.resize(plane, (w, h), interpolation=cv2.INTER_AREA)
    while plane.shape[1] >= 2 * w and plane.shape[0] >= 2 * h:
        plane = cv2.pyrDown(plane)
    if plane.shape[:2] == (h, w):
        return plane
    return cv2.resize(plane, (w, h), interpolation=cv2.INTER_LINEAR)


def _hdr_images(
    frame: Any, size: tuple[int, int], detect: tuple[int, int] | None, peak_nits: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_images` of a PQ or HLG frame, tone-mapped to SDR, or of a BT.2020 SDR
    frame, brought to BT.709 primaries (:mod:`pipeline.hdr`): at the working size, or
    at the detection size when no working image is asked for."""
    if frame.format.name != "yuv420p10le":
        frame = frame.reformat(format="yuv420p10le")
    y, u, v = (
        np.frombuffer(p, np.uint16).reshape(p.height, p.line_size // 2)[:, : p.width]
        for p in frame.planes[:3]
    )
    w = size[0]
    if w == 0:
        dw, dh = detect or (frame.width, frame.height)
        target = (max(2, dw - dw % 2), max(2, dh - dh % 2))
    else:
        target = size
    sdr = tone_map_i420(y, u, v, frame.color_trc, target, peak_nits=peak_nits)
    small = None
    if detect is not None:
        small = _detection_frame(*i420_planes(sdr), COLORSPACE_UNSPECIFIED, RANGE_MPEG, detect)
    return (sdr if w else np.empty((0, 0), np.uint8)), small


def _images(
    frame: Any,
    size: tuple[int, int],
    detect: tuple[int, int] | None,
    tone_map: bool = True,
    peak_nits: float = DEFAULT_PEAK_NITS,
) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    """(working-size I420 image in coded orientation, detection BGR frame or None, and
    the image's FFmpeg colorspace and range), from the decoder's planes: the payload is
    never converted to RGB and back, and the detection frame is converted at its small
    size. With ``tone_map``, HDR frames become SDR (:func:`_hdr_images`), their
    highlights rolled off from ``peak_nits``, and BT.2020 SDR frames get BT.709
    colours."""
    if tone_map and (
        is_hdr(frame.color_trc) or is_wide_gamut_sdr(frame.color_primaries, frame.color_trc)
    ):
        yuv, small = _hdr_images(frame, size, detect, peak_nits)
        return yuv, small, COLORSPACE_UNSPECIFIED, RANGE_MPEG
    y, u, v, full = _planes(frame)
    w, h = size
    if w == 0:
        yuv = np.empty(0, np.uint8)  # no working image asked for
    elif (y.shape[1], y.shape[0]) == (w, h):
        yuv = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    else:
        yuv = np.concatenate(
            [
                _shrink(y, w, h).ravel(),
                _shrink(u, w // 2, h // 2).ravel(),
                _shrink(v, w // 2, h // 2).ravel(),
            ]
        )
    small = None
    color_range = RANGE_JPEG if full else RANGE_MPEG
    if detect is not None:
        small = _detection_frame(y, u, v, frame.colorspace, color_range, detect)
    return yuv.reshape(h * 3 // 2, w), small, frame.colorspace, color_range


def i420_planes(yuv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y, U, V) views of an ``(H * 3 / 2, W)`` I420 image (chroma ``(H / 2, W / 2)``)."""
    h, w = yuv.shape[0] * 2 // 3, yuv.shape[1]
    flat = yuv.reshape(-1)
    u = flat[w * h : w * h * 5 // 4].reshape(h // 2, w // 2)
    return flat[: w * h].reshape(h, w), u, flat[w * h * 5 // 4 :].reshape(h // 2, w // 2)


def join_i420(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Planes back into one ``(H * 3 / 2, W)`` I420 image."""
    h, w = y.shape
    return np.concatenate([p.ravel() for p in (y, u, v)]).reshape(h * 3 // 2, w)


def rotate_i420(yuv: np.ndarray, degrees: int, mirrored: bool = False) -> np.ndarray:
    """An I420 image shown display-side up: each plane through
    :func:`~pipeline.video.orient`."""
    y, u, v = (orient(p, degrees, mirrored) for p in i420_planes(yuv))
    return join_i420(y, u, v)


def i420_to_rgb(yuv: np.ndarray, colorspace: int, color_range: int) -> np.ndarray:
    """(H * 3 / 2, W) I420 -> (H, W, 3) RGB, honouring the colour tags."""
    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    frame.colorspace, frame.color_range = colorspace, color_range
    return frame.to_ndarray(format="rgb24")


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB with even sides -> (H * 3 / 2, W) I420 (BT.601, limited range)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)


# FFmpeg's bwdif, one frame out per frame in, only on frames flagged interlaced
_DEINTERLACE = "mode=send_frame:parity=auto:deint=interlaced"


def _deinterlacer(frame: Any, time_base: Fraction, field_match: bool) -> Any:
    """A configured filter graph: [fieldmatch ->] bwdif, for frames like ``frame``."""
    chain = [("fieldmatch", FIELD_MATCH)] if field_match else []
    return filter_graph(frame, time_base, [*chain, ("bwdif", _DEINTERLACE)])


def _pull(graph: Any, time_base: Fraction) -> Iterator[Any]:
    """Frames the filter graph has ready, their times back in the input's time base."""
    for frame in pulled(graph):
        if frame.pts is not None and frame.time_base is not None:
            frame.pts = round(frame.pts * frame.time_base / time_base)
        yield frame


def deinterlaced(frames: Iterable[Any], field_match: bool = False) -> Iterator[Any]:
    """Decoded frames with the ones the decoder flags interlaced deinterlaced by FFmpeg's
    bwdif (motion-adaptive, both fields, one frame per frame: frame count and times
    stay). Progressive frames pass untouched; the filter starts at the first interlaced
    frame, so a progressive stream costs nothing. It holds one frame back (it looks a
    frame ahead) and is rebuilt when the frame size or format changes.

    ``field_match`` is for interlaced video that carries progressive pictures (film
    telecined 3:2, or sent 2:2 / PsF; probe's ``pulldown``): FFmpeg's fieldmatch first
    puts each picture's two fields back together, so those frames keep their full
    vertical detail; bwdif then only deinterlaces frames left without a match. It costs
    several times what bwdif does (on one core here, about 2 ms more per 720x480
    frame, 15 ms per 1920x1080 frame), so it runs only when asked.
    """
    graph: Any = None
    shape: tuple[int, int, str] | None = None
    time_base = Fraction(1, 90000)
    for frame in frames:
        if graph is None and not frame.interlaced_frame:
            yield frame
            continue
        here = (frame.width, frame.height, frame.format.name)
        if graph is None or here != shape:
            if graph is not None:
                graph.push(None)
                yield from _pull(graph, time_base)
            time_base = frame.time_base or Fraction(1, 90000)
            graph, shape = _deinterlacer(frame, time_base, field_match), here
        graph.push(frame)
        yield from _pull(graph, time_base)
    if graph is not None:
        graph.push(None)
        yield from _pull(graph, time_base)


def rising_pts(frames: Iterable[Any], window: int = 2) -> Iterator[tuple[Any, int | None]]:
    """Decoded frames (output order) with presentation times that rise.

    Decoders emit frames in display order, but some streams label them with the
    presentation times of their neighbours: MPEG-4 Part 2 with packed B-frames in AVI
    (DivX/Xvid, as in UCF101 and HMDB51) labels frames 1, 2, 4, 3, 5, 7, 6, ... So each
    frame gets the smallest time among itself and the next ``window`` frames not yet
    given theirs. Rising times pass through unchanged, and so does a jump back that
    reordering cannot explain (a timestamp reset): that frame keeps its own time.
    Frames without a time get None.
    """
    pending: deque[Any] = deque()
    heap: list[int] = []
    last: int | None = None

    def assign(frame: Any) -> int | None:
        nonlocal last
        if frame.pts is None:
            return None
        own = int(frame.pts)
        if last is not None and heap[0] <= last:  # a reset, not a local reorder
            if own in heap:
                heap.remove(own)
                heapq.heapify(heap)
            else:  # an earlier frame took it: drop another, one time per frame
                heapq.heappop(heap)
            last = own
        else:
            last = heapq.heappop(heap)
        return last

    for frame in frames:
        pending.append(frame)
        if frame.pts is not None:
            heapq.heappush(heap, int(frame.pts))
        if len(pending) > window:
            first = pending.popleft()
            yield first, assign(first)
    while pending:
        first = pending.popleft()
        yield first, assign(first)


@dataclass
class DecodeDamage:
    """Corrupt data a decode (:func:`iter_pyav`) went on past, filled in as it goes.

    A packet that fails to decode is skipped. The frames after it until the next
    keyframe are left out too: their references are broken, so they show the damage
    (FFmpeg conceals it, but not well enough for training data), and a decoder that
    lost a keyframe may hand them out of order. From the first failure on, frames are
    numbered by their presentation times among the video packets sent to the decoder,
    as :func:`frame_pts_table` numbers them: lost frames are counted, and frame numbers
    stay the source's own.

    :attr:`spans` lists each stretch left out as ``(first frame, first frame after)``
    in source frame numbers; :attr:`count` is the number of frames in the stream so far,
    left out ones included. However many packets fail, decoding goes on to the end of
    the stream (the split's per-source timeout bounds it): a decode from the start finds
    the frames after a long corrupt stretch, as one that starts after it does.
    """

    errors: int = 0
    first_error: str = ""
    spans: list[tuple[int, int]] = field(default_factory=list)
    count: int = 0
    end_s: float = 0.0  # when the last frame (left out or not) ends, from the stream start
    max_pts: int | None = None  # the latest packet time sent
    # Sorted times of the packets sent and not yet passed by a frame handed out (from
    # the first failure on, by a clean frame), and how many were passed since then.
    _sent: list[int] = field(default_factory=list)
    _passed: int = 0
    # The last frame handed out before the first failure (the anchor: its pts, and its
    # number once iter_pyav numbers it).
    _anchor_pts: int | None = None
    _anchor_num: int | None = None
    _last_out: int | None = None  # pts of the last frame handed out
    _floor: int | None = None  # pts of the last clean frame since the failure
    _broken: bool = False  # a packet failed since the last keyframe came out
    _marks: dict[int, tuple[int | None, bool]] = field(default_factory=dict)
    _gap_from: int | None = None  # first frame of the stretch being left out
    _last: int = -1  # the number of the frame before

    def sent(self, packet: Any) -> None:
        """A video packet goes to the decoder (one it is told to discard, as an edit
        list does, shows no frame: not counted)."""
        if packet.pts is None or not packet.size or packet.is_discard:
            return
        pts = int(packet.pts)
        self.max_pts = pts if self.max_pts is None else max(self.max_pts, pts)
        if self._floor is None or pts > self._floor:
            bisect.insort(self._sent, pts)

    def seeked(self) -> None:
        """The container seeked: packets sent before are not waited for."""
        self._sent.clear()
        self._floor = self._last_out = self._anchor_pts = None
        self._passed = 0

    def failed(self, exc: Exception) -> None:
        """The decoder could not decode a packet."""
        if not self.errors:  # number from here on by packet times, after the anchor's
            floor = self._anchor_pts = self._floor = self._last_out
            self._sent = [p for p in self._sent if floor is None or p > floor]
        self.errors += 1
        self.first_error = self.first_error or describe(exc)
        self._broken = True

    def arrived(self, frame: Any) -> None:
        """The decoder hands out ``frame`` (output order)."""
        if frame.pts is None:
            return
        pts = int(frame.pts)
        self._last_out = pts
        if not self.errors:
            del self._sent[: bisect.bisect_right(self._sent, pts)]
            return
        if self._broken and frame.key_frame:
            self._broken = False
        if self._floor is not None and pts <= self._floor:
            self._marks[pts] = (None, True)  # out of order after the damage
            return
        # 1 + the packets between the anchor and this frame
        offset = 1 + self._passed + bisect.bisect_left(self._sent, pts)
        self._marks[pts] = (offset, self._broken)
        if not self._broken:
            passed = bisect.bisect_right(self._sent, pts)
            del self._sent[:passed]
            self._passed += passed
            self._floor = pts

    def number(self, frame: Any, num: int, table: list[int] | None) -> tuple[int, bool]:
        """``frame``'s number and whether it is left out, given ``num``: its number
        from ``table`` (:func:`frame_pts_table`) or as counted. Records the stretches
        left out."""
        pts = int(frame.pts) if frame.pts is not None else None
        if pts is not None and pts == self._anchor_pts and self._anchor_num is None:
            self._anchor_num = num
        offset, left_out = self._marks.pop(pts, (0, False)) if pts is not None else (0, False)
        if offset is None:
            left_out = True
        elif offset:
            if self._anchor_num is not None:
                num = self._anchor_num + offset
            elif table is not None and pts is not None:  # no frame before the failure
                at = bisect.bisect_left(table, pts)
                left_out = left_out or at >= len(table) or table[at] != pts
                num = at
            else:  # ... from the stream start
                num = offset - 1
        left_out = left_out or (self.errors > 0 and num <= self._last)  # no number twice
        # a stretch left out begins after the frame before (or, when the decode has
        # numbered none yet, as a seek starts it, at this frame)
        jumped = self._last >= 0 and num > self._last + 1
        if self.errors and (left_out or jumped) and self._gap_from is None:
            self._gap_from = self._last + 1 if self._last >= 0 else num
        if left_out:
            if offset is not None:
                self.count = max(self.count, num + 1)
            return num, True
        if self._gap_from is not None:
            self.spans.append((self._gap_from, num))
            self._gap_from = None
        self._last = num
        self.count = num + 1
        return num, False

    def finish(self) -> None:
        """The stream ended: packets sent but never decoded are lost frames at its end."""
        if self.errors:
            self.count = max(self.count, self._last + 1 + len(self._sent))
            if self._gap_from is None and self.count > self._last + 1:
                self._gap_from = self._last + 1
        if self._gap_from is not None:
            self.spans.append((self._gap_from, max(self.count, self._gap_from)))
            self._gap_from = None

    def note(self) -> str | None:
        """What was left out, for the source's note (None: nothing)."""
        if not self.spans:
            return None
        shown = ", ".join(f"{a}..{b - 1}" for a, b in self.spans[:3])
        more = f" and {len(self.spans) - 3} more" if len(self.spans) > 3 else ""
        frames = sum(b - a for a, b in self.spans)
        packets = f"{self.errors} packet{'s' if self.errors != 1 else ''} undecodable"
        return (
            f"corrupt data ({packets}: {self.first_error}): {frames} frames left out "
            f"(frames {shown}{more})"
        )


@dataclass
class OtherStreams:
    """Filled in by a decode (:func:`iter_pyav`): how far the source's other streams
    (audio, subtitles) go, as the latest end of their packets, in seconds from the video
    stream's start; None while none came. Decoding reads their packets anyway, so this
    costs nothing extra. A file cut off ends all its streams together; a file whose
    audio runs on past its video does not."""

    end_s: float | None = None

    def note(self, packet: Any, start_s: float) -> None:
        if packet.pts is None or packet.time_base is None:
            return
        end = float((packet.pts + (packet.duration or 0)) * packet.time_base) - start_s
        self.end_s = end if self.end_s is None else max(self.end_s, end)


def has_alpha_layer(stream: Any) -> bool:
    """Whether ``stream`` is VP8/VP9 with an alpha layer (Matroska/WebM ``alpha_mode``
    1): the alpha plane rides in each block's additional data, which only libvpx's
    decoders read; FFmpeg's own VP8/VP9 decoders drop it."""
    name = stream.codec_context.name
    return name in ("vp8", "vp9") and str(stream.metadata.get("alpha_mode", "")) == "1"


def _alpha_decoder(stream: Any) -> Any:
    """A libvpx decoder for ``stream`` when it has an alpha layer (:func:`has_alpha_layer`)
    and FFmpeg was built with libvpx; else None (the stream's own decoder)."""
    if not has_alpha_layer(stream):
        return None
    name = {"vp8": "libvpx", "vp9": "libvpx-vp9"}[stream.codec_context.name]
    try:
        decoder: Any = av.CodecContext.create(name, "r")
    except (av.FFmpegError, ValueError):  # no libvpx: decoded without its alpha
        return None
    decoder.width, decoder.height = stream.codec_context.width, stream.codec_context.height
    decoder.thread_count = 0  # libvpx's own choice
    return decoder


def _decode(
    container: Any,
    stream: Any,
    others: OtherStreams | None,
    damage: DecodeDamage | None = None,
    decoder: Any = None,
) -> Iterator[Any]:
    """``container.decode(stream)`` from where the container is; with ``others``, the
    packets of the other streams, which that skips, are read too, and noted in it; with
    ``damage``, packets that fail to decode are skipped and noted in it. ``decoder``
    (:func:`_alpha_decoder`) decodes the stream's packets instead of its own."""
    if others is None and damage is None and decoder is None:
        yield from container.decode(stream)
        return
    tb = stream.time_base or Fraction(1, 1)
    start_s = float(stream.start_time * tb) if stream.start_time is not None else 0.0
    decode = packet_decoder(decoder)
    for packet in container.demux():
        # (the empty packets that flush decoders at the end all say stream_index 0)
        if packet.stream.index != stream.index:
            if others is not None:
                others.note(packet, start_s)
            continue
        if damage is None:
            yield from decode(packet)
            continue
        damage.sent(packet)
        try:
            frames = decode(packet)
        except av.error.InvalidDataError as exc:
            damage.failed(exc)
            continue
        for frame in frames:
            damage.arrived(frame)
            yield frame
    if decoder is not None:  # the container's flush packet went to the stream's decoder
        with contextlib.suppress(av.error.EOFError):
            yield from decoder.decode(None)


def packet_decoder(decoder: Any) -> Callable[[Any], list[Any]]:
    """How a packet of the stream is decoded: by ``decoder``, or by its stream's own."""
    if decoder is None:
        return lambda packet: packet.decode()
    return lambda packet: decoder.decode(packet)


_MAX_BACK_OFF_S = 86400.0  # a seek that still lands late: decode from the start


def _decode_from(
    container: Any,
    stream: Any,
    wanted_pts: int,
    others: OtherStreams | None = None,
    damage: DecodeDamage | None = None,
    decoder: Any = None,
) -> Iterator[Any]:
    """Decoded frames from a keyframe at or before ``wanted_pts`` (other streams and
    damage noted in ``others`` and ``damage``, as :func:`_decode`). Containers without
    an index (MPEG-TS, elementary streams) can land past the wanted time, so a seek that
    does is retried 1, 2, 4, ... seconds earlier, and from the start at last."""
    tb = stream.time_base or Fraction(1, 1)
    back_s = 0.0
    while True:
        target = wanted_pts - int(back_s / tb)
        before_start = stream.start_time is not None and target < stream.start_time
        if before_start or back_s > _MAX_BACK_OFF_S:
            container.seek(0)
            if decoder is not None:
                decoder.flush_buffers()
            yield from _decode(container, stream, others, damage, decoder)
            return
        container.seek(target, stream=stream, backward=True, any_frame=False)
        if decoder is not None:  # a seek flushes the stream's own decoder only
            decoder.flush_buffers()
        if damage is not None:
            damage.seeked()
        frames = _decode(container, stream, others, damage, decoder)
        first = next(frames, None)
        if first is not None and (first.pts is None or first.pts <= wanted_pts):
            yield first
            yield from frames
            return
        back_s = max(1.0, 2 * back_s)


def _timed_frames(
    container: Any,
    stream: Any,
    wanted_pts: int | None,
    deinterlace: bool,
    field_match: bool,
    others: OtherStreams | None = None,
    damage: DecodeDamage | None = None,
) -> Iterator[tuple[Any, int | None]]:
    """The stream's decoded frames, from a seek to ``wanted_pts`` (None: from where the
    container is), deinterlaced when asked (:func:`deinterlaced`), with rising times;
    the other streams' packets noted in ``others``, corrupt ones in ``damage``."""
    decoder = _alpha_decoder(stream)  # VP8/VP9 with an alpha layer: libvpx
    if wanted_pts is None:
        decoded: Iterable[Any] = _decode(container, stream, others, damage, decoder)
    else:
        decoded = _decode_from(container, stream, wanted_pts, others, damage, decoder)
    decoded = _with_stated_sar(decoded, decoder or stream.codec_context)
    return rising_pts(deinterlaced(decoded, field_match) if deinterlace else decoded)


def _with_stated_sar(frames: Iterable[Any], ctx: Any) -> Iterator[Any]:
    """``frames`` as the decoder hands them out, each carrying (as ``frame.opaque``) the
    pixel aspect ratio its bitstream states: PyAV's frames do not expose their own, and
    the decoder's reflects the latest frame out, which is ahead of the frames that
    :func:`rising_pts` and :func:`deinterlaced` hold back."""
    for frame in frames:
        frame.opaque = _stated_sar(ctx)
        yield frame


class _Clock:
    """Presentation times relative to the stream start: from a frame's pts, else one
    average frame after the previous frame's time. Where times jump back (a reset that
    :func:`rising_pts` lets through: joined recordings), the clock goes on one frame
    after the previous time, so times keep rising through the whole source."""

    def __init__(self, start_pts: int | None, time_base: Fraction, frame_s: float) -> None:
        self.start_pts, self.time_base, self.frame_s = start_pts, time_base, frame_s
        self.last: float | None = None
        self.shift = 0.0  # added to times after a jump back

    def peek(self, pts: int) -> float | None:
        """The time :meth:`time_of` would give ``pts`` now, if it rises (else None)."""
        if self.start_pts is None:
            return None
        t = float((pts - self.start_pts) * self.time_base) + self.shift
        return t if self.last is None or t >= self.last else None

    def time_of(self, pts: int | None, num: int) -> float:
        if pts is None:
            self.last = self.last + self.frame_s if self.last is not None else num * self.frame_s
            return self.last
        if self.start_pts is None:
            self.start_pts = pts
        t = float((pts - self.start_pts) * self.time_base) + self.shift
        if self.last is not None and t < self.last:
            self.shift += self.last + self.frame_s - t
            t = self.last + self.frame_s
        self.last = t
        return t


def iter_pyav(
    container: Any,
    display: tuple[int, int] | None,
    max_area: int,
    start_frame: int = 0,
    pts_table: list[int] | None = None,
    detect_width: int | None = None,
    deinterlace: bool = True,
    tone_map: bool = True,
    field_match: bool = False,
    others: OtherStreams | None = None,
    damage: DecodeDamage | None = None,
) -> Iterator[DecodedFrame]:
    """Decode the first video stream of an open PyAV ``container`` from ``start_frame``.

    ``display`` is the probed display size (None derives it from the stream);
    ``max_area <= 0`` skips the working image (``yuv`` is then empty). From
    ``start_frame > 0`` the container seeks; ``pts_table`` (from
    :func:`frame_pts_table`, computed when None) numbers the frames. ``detect_width``
    adds :attr:`DecodedFrame.small`. ``deinterlace`` runs frames flagged interlaced
    through :func:`deinterlaced` (field-matched first with ``field_match``); ``tone_map``
    turns HDR (PQ, HLG) frames into SDR. ``others`` notes how far the other streams go.
    With ``damage``, corrupt packets are decoded past (:class:`DecodeDamage`): the
    frames left out are not yielded, and the frame numbers skip them.
    """
    stream = video_stream(container)
    stream.thread_type = "AUTO"
    rate = frame_rate(stream)
    frame_s = 1.0 / rate if rate else 0.0
    tb = stream.time_base or Fraction(1, 1)
    start_pts: int | None = stream.start_time
    wanted_pts = None
    if start_frame > 0:
        if pts_table is None:
            pts_table = frame_pts_table(container)
        if start_frame >= len(pts_table):
            return
        if start_pts is None:
            start_pts = pts_table[0]
        wanted_pts = pts_table[start_frame]
    # the header's picture geometry (read before decoding, which may change it mid-stream)
    ctx = stream.codec_context
    header = (int(ctx.width or 0), int(ctx.height or 0))
    sar, header_sar = Fraction(stream.sample_aspect_ratio or 1), _stated_sar(ctx)
    geometry: _Geometry | None = None
    mirrored = False
    clock = _Clock(start_pts, tb, frame_s)
    untimed = is_raw_stream(stream)  # its packet times are the parser's guesses
    peak_nits = DEFAULT_PEAK_NITS
    timed = _timed_frames(container, stream, wanted_pts, deinterlace, field_match, others, damage)
    for frame, pts, num in _numbered(timed, pts_table, start_frame, damage, clock, frame_s):
        if geometry is None:
            rotation, mirrored = display_orientation(frame)
            coded = header if min(header) > 0 else (frame.width, frame.height)
            geometry = _Geometry(coded, sar, header_sar, display, max_area, detect_width, rotation)
        stated = frame.opaque if isinstance(frame.opaque, Fraction) else _stated_sar(ctx)
        size, shown = geometry.sizes(frame.width, frame.height, stated)
        time_s = num * frame_s if untimed else clock.time_of(pts, num)
        duration = float(frame.duration * frame.time_base) if frame.duration else frame_s
        if tone_map and frame.color_trc == TRC_PQ:
            peak_nits = content_peak_nits(frame) or peak_nits
        yuv, small, colorspace, color_range = _images(
            frame, size, geometry.detect, tone_map, peak_nits
        )
        if (geometry.rotation or mirrored) and yuv.size:
            yuv = rotate_i420(yuv, geometry.rotation, mirrored)
        if damage is not None:
            damage.end_s = time_s + duration
        yield DecodedFrame(num, time_s, duration, yuv, small, colorspace, color_range, shown)


def _numbered(
    timed: Iterable[tuple[Any, int | None]],
    pts_table: list[int] | None,
    start_frame: int,
    damage: DecodeDamage | None,
    clock: _Clock,
    frame_s: float,
) -> Iterator[tuple[Any, int | None, int]]:
    """``(frame, pts, number)`` of the decoded frames from ``start_frame`` on, numbered
    by ``pts_table`` or as they come; without the frames ``damage`` leaves out, whose
    numbers are skipped (:class:`DecodeDamage`), and noting there when the stream ends."""
    num = start_frame - 1
    for frame, pts in timed:
        num = _frame_number(pts, pts_table, num)
        if damage is not None:
            num, left_out = damage.number(frame, num, pts_table)
            if left_out:
                continue
        if num >= start_frame:  # (else decoded from the keyframe before a seek point)
            yield frame, pts, num
    if damage is not None:
        damage.finish()
        last = None if damage.max_pts is None else clock.peek(damage.max_pts)
        if damage.errors and last is not None:  # frames lost at the end end the stream
            damage.end_s = max(damage.end_s, last + frame_s)


def detection_bgr(rgb: np.ndarray, width: int) -> np.ndarray:
    """The detection frame of an (H, W, 3) RGB image: BGR, resized to ``width`` wide
    (``cv2.resize``, INTER_LINEAR, as PySceneDetect does) when wider."""
    small = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    h, w = int(small.shape[0]), int(small.shape[1])
    if w > width:
        size = (width, max(1, round(h * width / w)))
        small = cv2.resize(small, size, interpolation=cv2.INTER_LINEAR)
    return np.asarray(small)


def _iter_decord(
    path: str,
    display: tuple[int, int],
    max_area: int,
    start_frame: int,
    detect_width: int | None,
) -> Iterator[DecodedFrame]:
    """Frames of a local file shown as coded (no display rotation or mirroring) via
    decord, in batches."""
    import decord

    w, h = even_size(display[0], display[1], max_area)
    reader = decord.VideoReader(path, width=w, height=h, num_threads=0)
    count = len(reader)
    stamps = reader.get_frame_timestamp(range(count)) if count else np.zeros((0, 2))
    starts = stamps[:, 0]
    # decord reports frames without a time as about -3.7e17 s, and times as it reads
    # them (out of order in AVIs of packed B-frames); in an MP4 whose edit list hides
    # its first frames (a file trimmed without re-encoding) it counts them with times
    # before zero, yet hands out only the shown ones, the last repeated for the hidden
    # ones. PyAV takes over from the start
    if count and not (
        np.isfinite(stamps).all() and starts[0] >= -1e-3 and np.all(np.diff(starts) > 0)
    ):
        raise ValueError(f"decord gives {path} no rising frame times from zero")
    first = float(stamps[0, 0]) if count else 0.0
    batch = 16  # frames per call: decord's per-call overhead vs. memory
    for lo in range(start_frame, count, batch):
        frames = reader.get_batch(list(range(lo, min(lo + batch, count)))).asnumpy()
        for i, image in enumerate(frames):
            num = lo + i
            t0, t1 = float(stamps[num, 0]), float(stamps[num, 1])
            small = None if detect_width is None else detection_bgr(image, detect_width)
            # decord hands out RGB: back to I420 (BT.601, limited range) for the payload.
            yield DecodedFrame(num, t0 - first, max(0.0, t1 - t0), rgb_to_i420(image), small)


def _decord_misreads(path: str) -> bool:
    """Whether decord would decode ``path`` otherwise than PyAV, from its header: a video
    stream with an alpha channel, an alpha layer (:func:`has_alpha_layer`) or a palette
    (which may hold transparent colours), all of which decord drops; or more than one
    video stream, of which decord takes the one FFmpeg ranks best rather than the one
    probe describes (:func:`~pipeline.video.video_stream`). No when it cannot be read."""
    try:
        with av.open(path) as container:
            stream = video_stream(container)
            if sum(not is_cover_art(s) for s in container.streams.video) > 1:
                return True
            name = stream.codec_context.pix_fmt
            if has_alpha_layer(stream):
                return True
    except (av.FFmpegError, OSError, ValueError):
        return False
    if not name:
        return False
    fmt = av.VideoFormat(name)
    return fmt.has_palette or any(c.is_alpha for c in fmt.components)


def iter_source_frames(
    uri: str,
    display: tuple[int, int] | None,
    max_area: int,
    *,
    start_frame: int = 0,
    backend: str = "pyav",
    rotation: int = 0,
    mirrored: bool = False,
    detect_width: int | None = None,
    deinterlace: bool = True,
    tone_map: bool = True,
    field_match: bool = False,
    pyav_only: bool = False,
    pts_table: list[int] | None = None,
    animated_webp: bool = False,
    others: OtherStreams | None = None,
    damage: DecodeDamage | None = None,
) -> Iterator[DecodedFrame]:
    """Every frame of ``uri`` from ``start_frame`` on, decoded once (see the module doc).

    ``rotation`` and ``mirrored`` are the probed display orientation: decord turns some
    rotated videos itself (before scaling to the size it is asked for) and mirrors none,
    so a source not shown as coded is decoded by PyAV, which reads the orientation off
    the frames. With ``backend="decord"``, a decord failure (at open or mid-file)
    falls back to PyAV at the first frame decord did not deliver. ``deinterlace``,
    ``tone_map`` and ``field_match`` are as in :func:`iter_pyav`; decord does none of
    them, so a source that needs them (``pyav_only``: probed interlaced or HDR) is
    decoded by PyAV; so is one with transparency (alpha or a palette), which decord
    drops.
    ``pts_table`` (:func:`frame_pts_table`) saves demuxing the file to start mid-stream.
    An ``animated_webp`` (probed as one) is decoded by Pillow (:mod:`pipeline.webp`),
    whatever the backend: FFmpeg cannot. PyAV notes in ``others`` how far the source's
    other streams go, and decodes past corrupt packets into ``damage``
    (:class:`DecodeDamage`; decord and Pillow do neither).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}, expected one of {BACKENDS}")
    if animated_webp:
        from pipeline.webp import iter_webp_frames, read_webp  # imports this module

        data = read_webp(uri)
        yield from iter_webp_frames(data, display, max_area, start_frame, detect_width)
        return
    next_frame = start_frame
    local = not uri.startswith("s3://")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    shown_as_coded = rotation % 360 == 0 and not mirrored
    decord = backend == "decord" and local and not pyav_only and shown_as_coded
    detect_shape = None  # of decord's detection frames, which PyAV's must go on with
    # decord drops transparency, which PyAV composites over white, and picks its own
    # stream among several
    if decord and display is not None and not _decord_misreads(path):
        try:
            frames = _iter_decord(path, display, max_area, start_frame, detect_width)
            for frame in frames:
                yield frame
                next_frame = frame.num + 1
                detect_shape = None if frame.small is None else frame.small.shape
            return
        except Exception:  # decord's failure modes are many; PyAV takes over below
            pass
    with open_source(uri) as container:
        table = None  # from the start, frames are numbered as they come
        if next_frame > 0:
            table = pts_table if pts_table is not None else frame_pts_table(container)
        pyav = iter_pyav(
            container,
            display,
            max_area,
            next_frame,
            table,
            detect_width,
            deinterlace,
            tone_map,
            field_match,
            others,
            damage,
        )
        yield from pyav if detect_shape is None else _detected_as(pyav, detect_shape)


def _detected_as(frames: Iterable[DecodedFrame], shape: tuple[int, ...]) -> Iterator[DecodedFrame]:
    """``frames`` with their detection frames at ``shape``: where PyAV takes over from
    decord mid-file, the detector must go on with frames of one size. decord's come
    from its working image (square pixels, never enlarged), PyAV's from the coded frame
    (an anamorphic one is taller or shorter)."""
    height, width = int(shape[0]), int(shape[1])
    for frame in frames:
        small = frame.small
        if small is not None and small.shape[:2] != (height, width):
            small = cv2.resize(small, (width, height), interpolation=cv2.INTER_AREA)
            frame = replace(frame, small=small)
        yield frame


class Prefetcher(Iterator[T], Generic[T]):
    """Iterates ``source`` on a background thread, up to ``depth`` items ahead.

    Decoding and colour conversion run in FFmpeg/OpenCV code that releases the GIL, so
    a consumer doing its own work per frame (shot detection, clip encoding) overlaps
    with the decode instead of waiting for it. Items and the producer's exception (if
    any) arrive in order; :meth:`close` (or garbage collection of an abandoned
    iterator) stops the producer and closes ``source`` on the producer's thread.

    With ``deadline`` (a ``time.monotonic()`` value), waiting past it for the next item
    raises :class:`TimeoutError`, so a decode that hangs inside FFmpeg cannot hang
    the consumer.
    """

    _ITEM, _END, _ERROR = 0, 1, 2
    _POLL_S = 0.2

    def __init__(self, source: Iterator[T], depth: int = 8, deadline: float | None = None) -> None:
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._deadline = deadline
        self._finished = False
        self._thread = threading.Thread(
            target=self._produce, args=(source,), name="reelpack-decode", daemon=True
        )
        self._thread.start()

    def _put(self, kind: int, value: Any) -> bool:
        """Queue one message; False when the consumer stopped listening."""
        while not self._stop.is_set():
            try:
                self._queue.put((kind, value), timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(self._ITEM, item):
                    return
            self._put(self._END, None)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(self._ERROR, exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        while True:
            timeout = self._POLL_S
            if self._deadline is not None:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise TimeoutError("no frame decoded before the deadline")
                timeout = min(timeout, left)
            try:
                kind, value = self._queue.get(timeout=timeout)
                break
            except queue.Empty:
                continue
        if kind == self._ITEM:
            return value
        self._finished = True
        self._stop.set()
        if kind == self._ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the producer; returns without waiting for a decode call in progress."""
        self._finished = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __del__(self) -> None:
        self._stop.set()
