"""Small PyAV helpers: clip payloads as H.264 mp4 bytes, and back to frames.

The split stage decodes each source once and stores every clip as mp4 bytes at
a working resolution (``clip_bytes``); later stages call :func:`decode_mp4` (every
frame) or :func:`decode_mp4_sampled` (the frames they read) on those bytes and never
reopen the source.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import av
import numpy as np

__all__ = [
    "FIELD_MATCH",
    "IMAGE_SEQUENCE_BRANDS",
    "STILL_IMAGE_BRANDS",
    "TELECINE_CYCLE",
    "border_crop",
    "decode_mp4",
    "decode_mp4_sampled",
    "display_orientation",
    "encode_mp4",
    "even_size",
    "filter_graph",
    "frame_rate",
    "is_cover_art",
    "is_raw_stream",
    "is_telecine_rate",
    "opaque",
    "orient",
    "over_white",
    "pulled",
    "resample_indices",
    "telecine_repeats",
    "video_stream",
]


# Demuxers of raw streams: no container timing, only what the bitstream states. Their
# average rate is a placeholder (25 fps; raw DV's is its time base, 60000), while the
# rate FFmpeg derives from the bitstream (H.264/HEVC VUI timing, the MPEG-1/2 sequence
# header, MPEG-4 VOL timing, the DV frame's system) is the true one. The packet times
# FFmpeg's parsers make up are guesses too (a raw MPEG-1 stream's first step is two
# frames long), so frames of a raw stream are timed by their numbers at that rate.
RAW_STREAM_FORMATS = frozenset(
    {
        "h264",
        "hevc",
        "vvc",
        "mpegvideo",
        "m4v",
        "cavsvideo",
        "avs2",
        "avs3",
        "vc1",
        "h261",
        "h263",
        "dirac",
        "dnxhd",
        "dv",
        "obu",
        "mjpeg",  # Motion JPEG from cameras (.mjpeg): JPEG pictures one after another
        "mpjpeg",
    }
)


def is_raw_stream(stream: Any) -> bool:
    """Whether a PyAV video ``stream`` is a raw stream (:data:`RAW_STREAM_FORMATS`):
    its frames are timed by their numbers at :func:`frame_rate`."""
    container = getattr(stream, "container", None)
    return container is not None and container.format.name in RAW_STREAM_FORMATS


def frame_rate(stream: Any) -> float:
    """The average frame rate of a PyAV video ``stream`` (0.0 when unknown). A raw stream
    (:data:`RAW_STREAM_FORMATS`: an elementary H.264, HEVC, MPEG-2 or MPEG-4 stream, raw
    DV) has no container timing; the rate its bitstream states wins there (FFmpeg
    assumes 25 fps when it states none)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if is_raw_stream(stream):
        rate = stream.guessed_rate or stream.codec_context.framerate or rate
    return float(rate) if rate else 0.0


def is_cover_art(stream: Any) -> bool:
    """Whether a video stream is an attached picture (cover art), not a video."""
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


# ISO BMFF brands of still images in HEIF containers (AVIF), and of image sequences
STILL_IMAGE_BRANDS = frozenset({"avif", "mif1"})
IMAGE_SEQUENCE_BRANDS = frozenset({"avis", "msf1"})


def _picture_rank(stream: Any) -> tuple[bool, int]:
    """How :func:`video_stream` ranks a stream: one the container says holds a single
    frame (a thumbnail track not marked as cover art) below any other, then by area."""
    ctx = stream.codec_context
    return stream.frames != 1, (ctx.width or 0) * (ctx.height or 0)


def video_stream(container: Any) -> Any:
    """The source's video: of the container's video streams that are not cover art (an
    attached picture, as audio files and some downloads carry), the one of the largest
    picture, the first of those, as the ``ffmpeg`` command picks it (a camera's file
    with a proxy or depth track, a broadcast capture of several programmes); a track of
    one frame (a thumbnail) only when there is nothing else. In an image
    sequence (animated AVIF) the first stream is the still "primary item" shown where
    animation is not supported, so the sequence's own track is taken. Raises
    ``ValueError`` naming the streams there are when there is none."""
    streams = [s for s in container.streams.video if not is_cover_art(s)]
    if len(streams) > 1 and container.metadata.get("major_brand") in IMAGE_SEQUENCE_BRANDS:
        return max(streams, key=lambda s: s.frames or 0)
    if streams:
        return max(streams, key=_picture_rank)
    kinds = sorted(
        "cover art" if s.type == "video" else str(s.type) for s in container.streams
    ) or ["none"]
    raise ValueError(f"no video stream (streams: {', '.join(dict.fromkeys(kinds))})")


def orient(image: np.ndarray, degrees: int, mirrored: bool = False) -> np.ndarray:
    """``image`` (rows first) mirrored left-right when ``mirrored``, then turned
    ``degrees`` counter-clockwise (a multiple of 90): see :func:`display_orientation`."""
    return np.rot90(image[:, ::-1] if mirrored else image, k=(degrees // 90) % 4)


def _name_unknown_side_data() -> None:
    """Let PyAV list frame side data of types its enum does not name. Its side-data
    container raises ValueError on the first one, so a frame carrying one hides its
    display matrix; FFmpeg 8 puts such a type (the EXIF block) on every photo that has
    EXIF. An unknown type gets a stand-in member named ``UNKNOWN_<value>``."""
    from av.sidedata.sidedata import Type

    if "_missing_" in vars(Type):  # PyAV handles unknown types itself
        return

    def missing(cls: type[Type], value: object) -> Type | None:
        if not isinstance(value, int):
            return None
        member = object.__new__(cls)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value  # type: ignore[assignment]
        return member

    Type._missing_ = classmethod(missing)  # type: ignore[assignment,method-assign]


_name_unknown_side_data()


def _display_matrix(frame: Any) -> tuple[int, ...] | None:
    """The frame's display matrix (FFmpeg's nine 16.16 / 2.30 fixed-point numbers)."""
    try:
        sides = list(frame.side_data)
    except ValueError:  # a side data type PyAV cannot name after all
        return None
    for side in sides:
        if side.type.name == "DISPLAYMATRIX":
            return struct.unpack("=9i", bytes(side))
    return None


def display_orientation(frame: Any) -> tuple[int, bool]:
    """(degrees counter-clockwise, mirrored): how the decoded ``frame`` is shown, from its
    display matrix (an MP4/MOV track matrix, a photo's EXIF orientation, H.264/HEVC
    display orientation): mirrored left-right when ``mirrored``, then turned by the
    degrees (:func:`orient`). Read as ``ffmpeg``'s autorotate reads it, so a matrix
    that flips the picture (a mirrored selfie, EXIF orientations 2, 4, 5 and 7) is shown
    flipped, not turned upside down."""
    ccw = round((frame.rotation or 0) / 90) * 90 % 360
    matrix = _display_matrix(frame)
    if matrix is None:
        return ccw, False
    a, c, d = matrix[0], matrix[3], matrix[4]
    if ccw == 270:  # a clockwise quarter turn, or a transpose when the matrix flips
        return (90, True) if c > 0 else (270, False)
    if ccw == 90:  # a counter-clockwise quarter turn, or the other diagonal's flip
        return (270, True) if c < 0 else (90, False)
    if ccw == 180:  # turned, or mirrored along one axis only
        if a < 0 and d >= 0:
            return 0, True
        if d < 0 and a >= 0:
            return 180, True
        return 180, False
    return (180, True) if d < 0 else (0, False)  # upside down: mirrored top-bottom


def filter_graph(frame: Any, time_base: Fraction, filters: Sequence[tuple[str, str]]) -> Any:
    """A configured FFmpeg filter graph: a buffer for frames like ``frame``, then
    ``filters`` (name, arguments) in a chain, then a sink. Push frames (None at the
    end) and take the results with :func:`pulled`."""
    graph = av.filter.Graph()
    last = graph.add_buffer(
        width=frame.width, height=frame.height, format=frame.format.name, time_base=time_base
    )
    for name, args in [*filters, ("buffersink", "")]:
        node = graph.add(name, args)
        last.link_to(node)
        last = node
    graph.configure()
    return graph


def pulled(graph: Any) -> Iterator[Any]:
    """The frames a filter graph has ready."""
    while True:
        try:
            yield graph.pull()
        except (av.BlockingIOError, av.EOFError):
            return


def even_size(width: int, height: int, max_area: int) -> tuple[int, int]:
    """Scale ``(width, height)`` down (never up) to at most ``max_area`` pixels,
    keeping the aspect ratio, with even sides (H.264 4:2:0 needs them), each >= 2."""
    scale = min(1.0, (max_area / float(width * height)) ** 0.5)
    w = max(2, round(width * scale / 2) * 2)
    h = max(2, round(height * scale / 2) * 2)
    while w * h > max_area and (w > 2 or h > 2):
        if w >= h and w > 2:
            w -= 2
        else:
            h -= 2
    return w, h


def border_crop(
    lumas: Sequence[np.ndarray], black: float, tolerance: float, min_keep: float = 0.5
) -> tuple[int, int, int, int] | None:
    """``(x, y, w, h)`` (even) of the picture inside black bars: the rows and columns at
    the edges of the luma planes that stay within ``tolerance`` of ``black`` in every
    plane. None without bars, or when they would leave less than ``min_keep`` of a side
    (a dark or fading clip, not a letterbox)."""
    dark = np.stack(lumas) <= black + tolerance
    rows, cols = np.asarray(dark.all(axis=(0, 2))), np.asarray(dark.all(axis=(0, 1)))

    def edges(line: np.ndarray) -> tuple[int, int]:
        lead = int(np.argmin(line)) if not line.all() else line.size
        trail = int(np.argmin(line[::-1])) if not line.all() else line.size
        return lead + lead % 2, trail + trail % 2  # inward to even: I420 needs even sides

    (top, bottom), (left, right) = edges(rows), edges(cols)
    h, w = rows.size, cols.size
    keep_h, keep_w = h - top - bottom, w - left - right
    if top + bottom + left + right == 0 or keep_h < min_keep * h or keep_w < min_keep * w:
        return None
    return left, top, keep_w, keep_h


def _frame_size(frames: np.ndarray | Sequence[np.ndarray], pix_fmt: str) -> tuple[int, int]:
    """(width, height) of ``frames`` to encode; raises on frames H.264 cannot take."""
    if not len(frames):
        raise ValueError("need >= 1 frame, got none")
    first = frames[0]
    shape = (len(frames), *first.shape)
    if pix_fmt == "rgb24":
        if first.ndim != 3 or first.shape[-1] != 3 or first.dtype != np.uint8:
            raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {shape} {first.dtype}")
        h, w = first.shape[:2]
    elif pix_fmt == "yuv420p":
        if first.ndim != 2 or first.shape[0] % 3 or first.dtype != np.uint8:
            raise ValueError(f"expected (T, H*3/2, W) uint8 I420 frames, got {shape}")
        h, w = first.shape[0] * 2 // 3, first.shape[1]
    else:
        raise ValueError(f"pix_fmt must be 'rgb24' or 'yuv420p', got {pix_fmt!r}")
    if h % 2 or w % 2:
        raise ValueError(f"need >= 1 frame and even sides, got {shape}")
    if any(f.shape != first.shape for f in frames):
        raise ValueError(f"frames differ in size: {first.shape} vs others")
    return w, h


def encode_mp4(
    frames: np.ndarray | Sequence[np.ndarray],
    fps: float,
    crf: int = 18,
    preset: str = "veryfast",
    *,
    pix_fmt: str = "rgb24",
    colorspace: int | None = None,
    color_range: int | None = None,
    threads: int = 1,
) -> bytes:
    """Encode frames of one size with even H, W to H.264 mp4 bytes.

    ``pix_fmt="rgb24"``: (T, H, W, 3) uint8 RGB (an array, or a sequence of (H, W, 3)).
    ``pix_fmt="yuv420p"``: a sequence of (H * 3 / 2, W) uint8 I420 frames, encoded with
    no colour conversion; ``colorspace``/``color_range`` (FFmpeg AVColorSpace /
    AVColorRange values) tag the stream so decoders convert them back right.

    ``threads``: x264 threads. With 1 (the default) the bytes depend on the frames alone;
    0 lets x264 choose (about 1.5 per core), faster for long clips, but then the same
    frames now and then encode to different bytes (and slightly different pixels).

    The frame rate is stored as a rational approximation of ``fps`` so that
    fractional rates such as 29.97 round-trip.
    """
    w, h = _frame_size(frames, pix_fmt)
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        stream.codec_context.thread_count = threads
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        if color_range is not None:
            stream.codec_context.color_range = color_range
        for array in frames:
            frame = av.VideoFrame.from_ndarray(array, format=pix_fmt)
            if colorspace is not None:
                frame.colorspace = colorspace
            if color_range is not None:
                frame.color_range = color_range
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def decode_mp4(data: bytes, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode mp4 bytes to ``(frames (T, H, W, 3) uint8 RGB, fps)``."""
    frames: list[np.ndarray] = []
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError("clip payload holds no decodable frames")
    return np.stack(frames), fps


def decode_mp4_sampled(
    data: bytes, choose: Callable[[int, float], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Decode mp4 bytes, converting to RGB only the frames a stage reads:
    ``(frames (N, H, W, 3) uint8 RGB, indices (N,), total, fps)`` with ``indices =
    choose(total, fps)`` (any order, repeats allowed) and ``frames[k]`` frame
    ``indices[k]`` of the clip's ``total``; ``fps`` 0.0 when the stream has none.

    Every frame is decoded (H.264 frames depend on each other), but conversion to
    RGB, most of the cost at payload sizes, and the memory of the frames are paid
    only for the chosen ones. The choice is planned from the container's frame
    count; when that count is missing or wrong, the whole clip is decoded first.
    """
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        total = int(stream.frames or 0)
        if total > 0:
            indices = np.asarray(choose(total, fps), dtype=np.int64)
            wanted = set(indices.tolist())
            picked: dict[int, np.ndarray] = {}
            count = 0
            for frame in container.decode(stream):
                if count in wanted:
                    picked[count] = frame.to_ndarray(format="rgb24")
                count += 1
            if count == total and picked and picked.keys() == wanted:
                return np.stack([picked[int(i)] for i in indices]), indices, total, fps
    # no (or a wrong) frame count in the container: decode everything
    frames, fps = decode_mp4(data)
    indices = np.asarray(choose(len(frames), fps), dtype=np.int64)
    if not len(indices):
        raise ValueError("no frame chosen from the clip payload")
    return frames[indices], indices, len(frames), fps


def resample_indices(num_frames: int, fps: float, target_fps: float | None) -> np.ndarray:
    """Indices of the frames nearest to (at or before) a ``target_fps`` grid starting at
    frame 0 (never upsamples). Split keeps these frames of each clip as its payload and
    encode those of the payload fed to the VAE; with equal rates the second is all."""
    if target_fps is None or fps <= 0 or target_fps >= fps:
        return np.arange(num_frames)
    duration = num_frames / fps
    times = np.arange(0.0, duration - 1e-9, 1.0 / target_fps)
    return np.unique(np.minimum(np.floor(times * fps + 1e-6).astype(np.int64), num_frames - 1))


def resample_times(times: Sequence[float], end_s: float, fps: float) -> np.ndarray:
    """Indices of the frames shown at the ticks of an ``fps`` grid from ``times[0]`` up to
    ``end_s``: at each tick, the last frame at or before it. Frames of a
    variable-frame-rate clip (``times``: rising presentation times) so taken play at a
    constant ``fps`` in real time: a frame held through a gap repeats, frames between two
    ticks are skipped."""
    shown = np.asarray(times, dtype=np.float64)
    ticks = shown[0] + np.arange(0.0, max(end_s - shown[0], 0.0) - 1e-9, 1.0 / fps)
    if not len(ticks):
        return np.zeros(1, np.int64)
    return np.searchsorted(shown, ticks + 1e-6, side="right") - 1


# FFmpeg's fieldmatch, one frame out per frame in: each frame rebuilt from the fields that
# belong together (its own, or one of a neighbour's); frames it cannot match stay flagged
# interlaced (bwdif then deinterlaces them), matched ones come out progressive
FIELD_MATCH = "order=auto"

# 3:2 telecine: four film frames in five interlaced frames; after field matching, one
# frame in every five repeats the picture before it
TELECINE_CYCLE = 5
_REPEAT_SHARE = 0.4  # a repeat differs from its predecessor by at most this share of a new picture
_MIN_MOTION = 0.2  # mean luma levels between new pictures below which the cadence cannot show


def is_telecine_rate(fps: float) -> bool:
    """Whether ``fps`` is what 3:2 telecine makes of film: 30000/1001 (or 30) frames/s."""
    return abs(fps - 30000 / 1001) < 0.05 or abs(fps - 30.0) < 0.05


def telecine_repeats(lumas: Sequence[np.ndarray]) -> list[int]:
    """Indices of the frames that 3:2 telecine repeats in a field-matched clip: at one
    place in every cycle of five, a frame nearly equals the one before it.

    Judged on the whole clip (the median difference at each place of the cycle against
    the others), so noise and single still moments do not count. Empty when the clip
    does not show that cadence: film sent 2:2 or PsF, live video, or too little motion
    to tell (a clip of still pictures loses nothing by keeping them all), or frames
    of different sizes.
    """
    n = len(lumas)
    if n <= 2 * TELECINE_CYCLE or any(luma.shape != lumas[0].shape for luma in lumas):
        return []  # too short to judge, or the frame size changes (not one cadence)
    index = np.arange(1, n)
    # mean absolute difference of frame i from frame i - 1
    diffs = np.array([np.abs(lumas[i] - lumas[i - 1].astype(np.int16)).mean() for i in range(1, n)])
    phase = index % TELECINE_CYCLE
    medians = [float(np.median(diffs[phase == p])) for p in range(TELECINE_CYCLE)]
    repeat = int(np.argmin(medians))
    others = float(np.median(diffs[phase != repeat]))
    if others < _MIN_MOTION or medians[repeat] > _REPEAT_SHARE * others:
        return []
    return [int(i) for i in index[phase == repeat]]


def opaque(frame: Any) -> Any:
    """``frame`` without transparency: a frame with an alpha channel (PNG, WebP, GIF,
    ProRes 4444, VP9 with alpha) composited over white, as a viewer shows it. The
    colour under a transparent pixel is arbitrary (often black or a matte colour) and
    must not reach detection, scores or the corpus. Other frames are returned as they
    are."""
    fmt = frame.format
    if not fmt.has_palette and not any(c.is_alpha for c in fmt.components):
        return frame
    rgba = frame.to_ndarray(format="rgba")
    if rgba[..., 3].min() == 255:  # a palette without transparent entries, or all opaque
        return frame
    out = av.VideoFrame.from_ndarray(over_white(rgba), format="rgb24")
    out.pts, out.time_base = frame.pts, frame.time_base
    return out


def over_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 RGBA composited over white: (H, W, 3) uint8 RGB."""
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    weight = alpha.astype(np.float32) / 255.0
    return np.round(rgba[..., :3] * weight + 255.0 * (1.0 - weight)).astype(np.uint8)
