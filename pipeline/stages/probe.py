"""Probe: container and stream facts of each source, errors as values, limits up front.

1:1, one source row in, one row out. Cheap by design (no full decode): PyAV reads the
container header, the limits of :class:`ProbeConfig` on the coded size are checked
*before* anything is decoded (an 8192x8192 stream is rejected without allocating a
frame), then one frame is decoded (it proves the stream decodes and carries the
display-matrix rotation) and the first packets are demuxed, not decoded, to tell a
variable frame rate from a constant one. A source that is not a video or image, has no
video stream, no frames, or breaks a limit gets ``src_status="error"`` and a reason
naming the file and the cause; it is never dropped.

Stills (jpg, png, webp, bmp, tiff, avif; PyAV's image demuxers; a GIF of one frame)
are ``media_kind="image"``: one frame at ``IMAGE_FPS``, which split turns into one
1-frame clip. An animated GIF is a video, and so is an animated WebP, read through
Pillow (:mod:`pipeline.webp`): FFmpeg cannot decode one. Stills FFmpeg decodes wrong or
not at all (a JPEG-compressed or float TIFF, a PNG over its size limit) are read by
Pillow too (:mod:`pipeline.stills`).

Sources are opened only through :func:`open_source`, so a storage backend (``s3://``,
streamed with ranged GETs, never copied to local disk) plugs in at one place.
"""

from __future__ import annotations

import errno
import itertools
import math
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any

import av
import numpy as np

import schemas
from pipeline.hdr import primaries_name, transfer_name
from pipeline.stages.base import Batch, num_rows, with_columns
from pipeline.video import (
    FIELD_MATCH,
    RAW_STREAM_FORMATS,
    STILL_IMAGE_BRANDS,
    border_crop,
    display_orientation,
    filter_graph,
    frame_rate,
    is_cover_art,
    is_raw_stream,
    is_telecine_rate,
    opaque,
    pulled,
    telecine_repeats,
    video_stream,
)

__all__ = [
    "IMAGE_CODECS",
    "IMAGE_FPS",
    "LimitError",
    "Probe",
    "ProbeConfig",
    "check_limits",
    "check_size",
    "container_facts",
    "describe",
    "display_size",
    "heif_facts",
    "open_source",
    "pillow_facts",
    "probe_video",
    "webp_facts",
    "why_unreadable",
]

# Decoders of still-image formats: a stream of one of these with one frame is an image.
IMAGE_CODECS = frozenset({"png", "mjpeg", "jpegls", "webp", "bmp", "tiff", "jpeg2000", "qoi"})
# A still has no frame rate; its one frame is given this rate, so it lasts 1 s.
IMAGE_FPS = 1.0
# Packets demuxed (not decoded) to tell a variable frame rate from a constant one.
_VFR_PACKETS = 240


@dataclass(frozen=True)
class ProbeConfig:
    """Limits a source must meet to be split."""

    # coded width * height; 8K UHD. Checked before any decode: an 8192x8192 frame
    # (~200 MB as RGB, seconds to decode) is rejected from its header alone.
    max_pixels: int = 7680 * 4320
    max_duration_s: float = 4 * 3600
    min_side: int = 16  # smallest allowed display side, px (quality signals need >= 12)
    max_aspect: float = 0.0  # longest / shortest display side; 0 disables


@contextmanager
def open_source(uri: str) -> Iterator[Any]:
    """Open ``uri`` (a local path, ``file://`` URI or ``s3://`` URI) as a PyAV input
    container. The one place sources are opened; the caller closes it by leaving
    the ``with`` block. ``s3://`` objects are read through the storage layer's seekable
    ranged-GET reader (:class:`pipeline.storage.S3RangeReader`): nothing is copied to
    local disk."""
    try:
        path = schemas.storage_location(uri)
    except schemas.UnsupportedLocation as e:  # gs://, https://, ...: an error row says so
        raise ValueError(str(e).removeprefix(f"{uri}: ")) from None
    if uri.startswith("s3://"):
        # Imported lazily: local runs never need boto3 or the storage layer.
        from pipeline.storage import storage_for

        handle: IO[bytes] = storage_for(uri).open(uri)
        try:
            with av.open(handle, mode="r") as container:
                yield container
        finally:
            handle.close()
        return
    check_regular_file(path)
    with av.open(path, mode="r") as container:
        yield container


_NOT_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_regular_file(path: str) -> None:
    """Raise unless ``path`` is a regular file (or a link to one), before anything opens
    it: opening a named pipe blocks until something writes to it, and a source is read
    by seeking, which no pipe, socket or device allows. A broken link raises
    ``FileNotFoundError`` naming its target; a name that is not UTF-8 (listed
    :func:`~pipeline.sources.printable`) raises ``ValueError`` saying so."""
    from pipeline.sources import misnamed, printable

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            target = printable(os.readlink(path))
            raise FileNotFoundError(
                errno.ENOENT, f"a broken link (its target {target} does not exist)", path
            ) from None
        real = misnamed(path)
        if real is not None:
            raise ValueError(
                f"its path is not UTF-8 text (as bytes: {real!r}); corpus tables hold "
                "names as text: rename the file (convmv converts a folder of them)"
            ) from None
        raise
    for test, kind in _NOT_REGULAR:
        if test(mode):
            raise ValueError(f"not a regular file but {kind}: a source must be a seekable file")


def display_size(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    """Displayed ``(width, height)``: width stretched by the sample aspect ratio, then
    swapped for a quarter-turn rotation (as players and ``ffmpeg -autorotate`` do)."""
    if sar <= 0:
        sar = Fraction(1)
    w, h = max(1, round(width * sar)), height
    if rotation % 180 != 0:
        w, h = h, w
    return int(w), int(h)


def _index_times(stream: Any) -> list[int] | None:
    """The first frames' timestamps from the demuxer's index, when it lists every frame
    (MP4/MOV): no media bytes need reading, which matters for sources on S3."""
    entries = getattr(stream, "index_entries", None)
    if entries is None or not stream.frames or len(entries) < stream.frames:
        return None  # no index, or one of keyframes only (Matroska cues)
    n = min(len(entries), _VFR_PACKETS)
    return [int(entries[i].timestamp) for i in range(n) if not entries[i].is_discard]


# index entries at each end of a stream that are looked at for frames an edit list hides
_EDGE_ENTRIES = 256


def _hidden_frames(stream: Any) -> int:
    """Frames the container counts but its edit list hides (an MP4 trimmed without
    re-encoding keeps the frames from the keyframe before the cut, marked discarded),
    from the index entries at either end of the stream; 0 without an index."""
    entries = getattr(stream, "index_entries", None)
    if not entries:
        return 0
    n = len(entries)
    edge = _EDGE_ENTRIES
    ends = range(n) if n <= 2 * edge else (*range(edge), *range(n - edge, n))
    return sum(bool(entries[i].is_discard) for i in ends)


def _varies(times: list[int]) -> bool:
    """Whether frame times have unequal steps: sorted first (B-frames reorder them),
    steps differing by more than a tenth of the median step."""
    if len(times) < 3:
        return False
    steps = np.diff(np.unique(np.asarray(times, dtype=np.int64)))
    if steps.size < 2:
        return False
    median = float(np.median(steps))
    return bool(median > 0 and float(steps.max() - steps.min()) > 0.1 * median)


def _first_frame_facts(
    container: Any, stream: Any, video: bool
) -> tuple[tuple[int, bool], Any, bool, bool]:
    """(orientation, first decoded frame, variable frame rate, one frame only) in one pass
    over the first packets.

    The orientation is (degrees counter-clockwise, mirrored) from the display matrix
    (:func:`~pipeline.video.display_orientation`), read off the first decoded frame
    (PyAV exposes the stream's matrix only there). The frame rate is
    judged from the index (:func:`_index_times`) or the first ``_VFR_PACKETS`` packets'
    times; "one frame only" when the stream ended after a single packet among them.
    Raises when no frame decodes.
    """
    times = _index_times(stream) if video else []
    demuxed: list[int] = []
    packets = 0
    rotation: tuple[int, bool] | None = None
    first = None
    for packet in container.demux(stream):
        packets += packet.size > 0
        if times is None and packet.pts is not None:
            demuxed.append(int(packet.pts))
        if rotation is None:
            for first in packet.decode():
                rotation = display_orientation(first)
                break
        if rotation is not None and (times is not None or len(demuxed) >= _VFR_PACKETS):
            break
    else:
        if rotation is not None:  # demuxed to the end
            return rotation, first, _varies(demuxed if times is None else times), packets == 1
    if rotation is None:
        raise ValueError("zero frames: no frame decodes")
    return rotation, first, _varies(demuxed if times is None else times), False


def probe_video(
    source: str, cfg: ProbeConfig | None = None, *, bars: bool = True
) -> dict[str, Any]:
    """Container and stream facts of a video or image (a path, ``file://`` or ``s3://``
    URI, opened with :func:`open_source`).

    Returns ``container``, ``media_kind`` ("video"/"image"), ``codec``, coded
    ``width``/``height``, ``sar`` (Fraction), ``rotation`` (degrees counter-clockwise,
    0/90/180/270), ``display_width``/``display_height``, ``fps`` (average), ``vfr``,
    ``duration_s``, ``num_frames`` (exact when the container records it, else estimated
    from duration and fps), ``num_frames_exact``, ``start_s`` (stream start time),
    ``has_audio``, ``num_video_streams``, ``interlaced`` (the decoder flags the first
    frame interlaced), ``pulldown`` (interlaced video carrying progressive pictures,
    :func:`_pulldown`), ``color_transfer`` (its transfer characteristic, FFmpeg's
    name: "smpte2084" is PQ, "arib-std-b67" HLG), ``color_primaries`` (FFmpeg's name:
    "bt2020" with an SDR transfer is wide-gamut SDR) and ``picture_fraction`` (the share of
    the frame inside black bars, :func:`_picture_fraction`). A header without a
    duration is timed from the packets (:func:`packet_timing`); an animated WebP is
    read from its chunks (:func:`webp_facts`), a HEIC photo by libheif
    (:func:`heif_facts`). With ``cfg``, the frame size limits are
    checked before anything is decoded (:class:`LimitError`). ``bars=False`` skips
    looking for black bars (a few frames decoded across the video; ``picture_fraction``
    is then None). Raises on anything that is not a decodable video or image.
    """
    from pipeline.heif import is_heif_still
    from pipeline.stills import NotAPillowStill, pillow_reads

    with open_source(source) as container:
        header = _header_facts(container, video_stream(container))
        codec, image = header["codec"], header["media_kind"] == "image"
        # FFmpeg's WebP decoder reads stills only: an animation has no size
        animated_webp = codec == "webp" and header["width"] <= 0
        # FFmpeg hands out a HEIC's tiles one by one: libheif assembles them
        heif = is_heif_still(container.metadata.get("major_brand"), codec)
        # a still FFmpeg finds no size for, or decodes as black: Pillow reads it
        pillow = (
            image
            and not animated_webp
            and pillow_reads(source, codec, header["width"], header["height"])
        )
        facts, failed = {}, None
        if not (animated_webp or heif or pillow):
            try:
                facts = container_facts(container, cfg, bars=bars)
            except av.FFmpegError as exc:
                if not image:
                    raise
                failed = exc  # a still whose frame FFmpeg fails on: Pillow may read it
    if animated_webp:
        return webp_facts(source, cfg)
    if heif:
        return heif_facts(source, cfg)
    if pillow:
        return pillow_facts(source, codec, cfg)
    if failed is not None:
        try:
            return pillow_facts(source, codec, cfg)
        except NotAPillowStill:
            raise failed from None
    if facts["media_kind"] == "video" and facts["duration_s"] <= 0:
        with open_source(source) as container:  # a header without a duration
            facts.update(packet_timing(container, facts["fps"]))
    return facts


def packet_timing(container: Any, fps: float) -> dict[str, Any]:
    """``duration_s`` and ``num_frames`` (estimated) from one pass over the packets,
    nothing decoded: for a video whose header records neither, as Matroska and WebM
    written to a pipe or by a recorder (OBS, a browser's MediaRecorder) and raw
    elementary streams (.h264, .hevc) are. The duration spans the packets' timestamps
    (plus one frame); without timestamps, or in a raw stream (whose timestamps are
    guesses), it is the packet count at ``fps``. Packets after
    a point the demuxer cannot read past are not counted (split then ends the source
    there too)."""
    stream = video_stream(container)
    frame_s = 1.0 / fps if fps > 0 else 0.0
    tb = stream.time_base or Fraction(1, 1)
    one_frame = round(frame_s / tb)  # a packet without a duration shows for one frame
    count, first, end = 0, None, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            count += 1
            if packet.pts is not None:
                first = packet.pts if first is None else min(first, packet.pts)
                shown = packet.pts + (packet.duration or one_frame)
                end = shown if end is None else max(end, shown)
    except (av.FFmpegError, OSError):  # a broken tail: the packets before it count
        pass
    if first is not None and end is not None and end > first and not is_raw_stream(stream):
        duration_s = float((end - first) * tb)
    else:
        duration_s = count * frame_s
    return {"duration_s": duration_s, "num_frames": count, "num_frames_exact": False}


def _header_facts(container: Any, stream: Any) -> dict[str, Any]:
    """Everything knowable from the header alone (nothing decoded)."""
    ctx = stream.codec_context
    width, height = int(ctx.width or stream.width or 0), int(ctx.height or stream.height or 0)
    sar = Fraction(stream.sample_aspect_ratio or ctx.sample_aspect_ratio or 1)
    fps = frame_rate(stream)
    time_base = stream.time_base or Fraction(1, 1)
    start_s = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
    fmt = container.format.name if container.format is not None else ""
    if fmt in RAW_STREAM_FORMATS and fmt != "dv":
        # a raw elementary stream holds no timing: a duration FFmpeg states is its size
        # over the bit rate its header states, and an MPEG-1/2 video of variable rate
        # states 104.9 Mb/s there (6 ms for a 6 s video): its packets time it instead
        # (a raw DV file's frames are all one size, so its duration is exact)
        duration_s = 0.0
    elif stream.duration is not None and stream.duration > 0:
        duration_s = float(stream.duration * time_base)
    elif container.duration is not None and container.duration > 0:
        duration_s = container.duration / av.time_base
    else:
        duration_s = 0.0
    exact = bool(stream.frames and stream.frames > 0)
    num_frames = int(stream.frames) - _hidden_frames(stream) if exact else round(duration_s * fps)
    still_heif = container.metadata.get("major_brand") in STILL_IMAGE_BRANDS  # AVIF
    # FFmpeg's image demuxers ("image2", "png_pipe", "ppm_pipe", ...) read stills of any
    # codec (TGA, PPM, PCX, SGI, ...); a still-image codec in a container is a still
    # when it holds one frame. One that does not say how many (a raw Motion JPEG stream
    # from a camera, .mjpeg) is a video until its packets show only one
    # (container_facts)
    image_demuxer = fmt.endswith("_pipe") or fmt == "image2"
    counted = exact or duration_s > 0
    image = image_demuxer or (
        (ctx.name in IMAGE_CODECS or still_heif) and num_frames <= 1 and (counted or still_heif)
    )
    facts = {
        "container": fmt,
        "media_kind": "video",
        "codec": ctx.name,
        "width": width,
        "height": height,
        "sar": sar,
        "fps": fps,
        "duration_s": duration_s,
        "num_frames": num_frames,
        "num_frames_exact": exact,
        "start_s": start_s,
        "has_audio": bool(container.streams.audio),
        "num_video_streams": sum(not is_cover_art(s) for s in container.streams.video),
    }
    return _as_still(facts) if image else facts


def _as_still(facts: dict[str, Any]) -> dict[str, Any]:
    """``facts`` of a still image: exactly one frame, shown for 1/IMAGE_FPS seconds."""
    return {
        **facts,
        "media_kind": "image",
        "fps": IMAGE_FPS,
        "num_frames": 1,
        "num_frames_exact": True,
        "duration_s": 1.0 / IMAGE_FPS,
    }


_BAR_SAMPLES = (0.25, 0.5, 0.75)  # where in a video probe looks for black bars
_BAR_LUMA = 12.0  # full-range luma levels above black that still count as a bar


def _picture_fraction(container: Any, stream: Any, duration_s: float, first: Any) -> float | None:
    """Share of the frame's area inside the black bars (letterbox, pillarbox) common to
    frames decoded a quarter, half and three quarters of the way in; 1.0 without bars,
    None when those frames cannot be read. A hint: split sizes its working images by it
    so that a clip cropped of its bars still fills the pixel budget. When the ``first``
    decoded frame has picture on all four edges there are no bars common to the whole
    video, and nothing more is read."""
    luma = opaque(first).to_ndarray(format="gray")
    if all((edge > _BAR_LUMA).any() for edge in (luma[0], luma[-1], luma[:, 0], luma[:, -1])):
        return 1.0
    tb = stream.time_base or Fraction(1, 1)
    start = stream.start_time or 0
    lumas = []
    try:
        for at in _BAR_SAMPLES:
            target = start + int(at * duration_s / tb)
            container.seek(target, stream=stream, backward=True, any_frame=False)
            frames = _decoded_after_seek(container, stream, 1)
            if not frames:
                return None
            lumas.append(opaque(frames[0]).to_ndarray(format="gray"))
    except (av.FFmpegError, OSError, ValueError):  # only a hint: no seek, no hint
        return None
    if any(luma.shape != lumas[0].shape for luma in lumas):
        return None
    rect = border_crop(lumas, 0.0, _BAR_LUMA)
    return 1.0 if rect is None else rect[2] * rect[3] / lumas[0].size


# packets probe reads after a seek for the frames it samples: a stream whose next
# keyframe is far away (or never comes: intra refresh) shows no frame for that long
_SEEK_PACKETS = 300


def _decoded_after_seek(container: Any, stream: Any, count: int) -> list[Any]:
    """Up to ``count`` frames decoded from where a seek left ``container``, reading at
    most ``_SEEK_PACKETS`` packets, so a sample never turns into decoding the rest of
    the file."""
    frames: list[Any] = []
    for packet in itertools.islice(container.demux(stream), _SEEK_PACKETS):
        frames += packet.decode()
        if len(frames) >= count:
            break
    return frames[:count]


_PULLDOWN_SAMPLES = (0.25, 0.6)  # where in an interlaced video probe looks for pulldown
_PULLDOWN_FRAMES = 40  # consecutive frames judged at each place
_PULLDOWN_SHARE = 0.2  # share of them that must show a progressive picture


def _pulldown(container: Any, stream: Any, duration_s: float) -> bool:
    """Whether interlaced-coded video carries progressive pictures: film telecined 3:2
    (two of every five frames repeat a field) or sent 2:2 / PsF (both fields of a frame
    show the same moment). ``_PULLDOWN_FRAMES`` frames are judged at each of
    ``_PULLDOWN_SAMPLES``: a yes when FFmpeg's idet finds a repeated field or a
    progressive picture in at least ``_PULLDOWN_SHARE`` of them, or, at 3:2 telecine's
    rate, when the frames field-matched show its cadence (one picture in five repeated:
    :func:`pipeline.video.telecine_repeats`; for lossy film, where idet tells few
    fields apart). Live interlaced video, each field its own moment, shows neither. A
    static picture looks progressive too, so a wrong yes is possible; it costs only time
    (field matching leaves what it cannot match to bwdif). A seek or decode that fails
    is a no."""
    tb = stream.time_base or Fraction(1, 1)
    start = stream.start_time or 0
    telecine = is_telecine_rate(float(stream.average_rate or stream.guessed_rate or 0))
    try:
        for at in _PULLDOWN_SAMPLES:
            container.seek(start + int(at * duration_s / tb), stream=stream, backward=True)
            frames = _decoded_after_seek(container, stream, _PULLDOWN_FRAMES)
            metas = list(_idet(iter(frames)))
            if metas and sum(map(_film_like, metas)) >= _PULLDOWN_SHARE * len(metas):
                return True
            # idet saw a repeated field: look for the cadence (live video shows none)
            repeated = any(map(_repeated_field, metas))
            if telecine and repeated and telecine_repeats(_field_matched_lumas(frames)):
                return True
    except (av.FFmpegError, OSError, ValueError):
        return False
    return False


_CADENCE_AREA = (640, 360)  # the middle of the frame field-matched to find 3:2 cadence


def _field_matched_lumas(frames: list[Any]) -> list[np.ndarray]:
    """Luma of the middle of ``frames`` (one size and format; at most
    ``_CADENCE_AREA``, cut on even rows so the fields stay whole) after FFmpeg's
    fieldmatch, at half size (averaged, which also halves coding noise)."""
    first = frames[0]
    w, h = (
        min(side, limit) // 2 * 2
        for side, limit in zip((first.width, first.height), _CADENCE_AREA, strict=True)
    )
    x, y = (first.width - w) // 4 * 2, (first.height - h) // 4 * 2
    graph = filter_graph(
        first,
        first.time_base or Fraction(1, 90000),
        [("crop", f"{w}:{h}:{x}:{y}"), ("fieldmatch", FIELD_MATCH)],
    )
    out: list[Any] = []
    for frame in [*frames, None]:
        graph.push(frame)
        out += pulled(graph)
    half = {"width": max(1, w // 2), "height": max(1, h // 2)}
    return [f.reformat(**half, format="gray", interpolation="AREA").to_ndarray() for f in out]


def _film_like(meta: dict[str, str]) -> bool:
    """idet's verdict on one frame: a repeated field, or a progressive picture."""
    return _repeated_field(meta) or meta.get("lavfi.idet.single.current_frame") == "progressive"


def _repeated_field(meta: dict[str, str]) -> bool:
    return meta.get("lavfi.idet.repeated.current_frame") in ("top", "bottom")


def _idet(frames: Iterator[Any]) -> Iterator[dict[str, str]]:
    """FFmpeg idet's metadata for each of ``frames`` (one size and format)."""
    graph: Any = None
    for frame in frames:
        if graph is None:
            graph = filter_graph(frame, frame.time_base or Fraction(1, 90000), [("idet", "")])
        graph.push(frame)
        yield from (dict(out.metadata) for out in pulled(graph))
    if graph is not None:
        graph.push(None)
        yield from (dict(out.metadata) for out in pulled(graph))


def container_facts(
    container: Any, cfg: ProbeConfig | None = None, *, bars: bool = True
) -> dict[str, Any]:
    """:func:`probe_video` on an open PyAV input container.

    With ``cfg``, the coded frame size is checked against its limits before the first
    frame is decoded; a breach raises ``ValueError`` naming the limit.
    """
    stream = video_stream(container)
    facts = _header_facts(container, stream)
    if cfg is not None:
        problem = check_size(facts["width"], facts["height"], cfg)
        if problem:
            raise LimitError(problem, facts)
    video = facts["media_kind"] == "video"
    (rotation, mirrored), first, vfr, one_frame = _first_frame_facts(container, stream, video)
    vfr = vfr and not is_raw_stream(stream)  # a raw stream's packet times are guesses
    if video and one_frame and (facts["codec"] == "gif" or facts["codec"] in IMAGE_CODECS):
        # a GIF still, or one picture in a stream that does not count its frames: an image
        facts, video = _as_still(facts), False
    display_w, display_h = display_size(facts["width"], facts["height"], facts["sar"], rotation)
    interlaced = bool(first.interlaced_frame)
    return {
        **facts,
        "rotation": rotation,
        "mirrored": mirrored,
        "display_width": display_w,
        "display_height": display_h,
        "vfr": vfr,
        "interlaced": interlaced,
        "color_transfer": transfer_name(first.color_trc),
        "color_primaries": primaries_name(first.color_primaries),
        "picture_fraction": (
            (_picture_fraction(container, stream, facts["duration_s"], first) if bars else None)
            if video and facts["duration_s"] > 0
            else 1.0
        ),
        "pulldown": interlaced and video and _pulldown(container, stream, facts["duration_s"]),
    }


def webp_facts(source: str, cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """The facts of an animated WebP (:mod:`pipeline.webp`), in the keys of
    :func:`container_facts`: a video of the canvas size, timed by its frame durations.
    With ``cfg``, the canvas is checked against the size limits before its first frame
    is decoded."""
    from pipeline.webp import iter_webp_frames, parse_animation, read_webp  # imports decode

    data = read_webp(source)
    animation = parse_animation(data)
    if animation is None:
        raise ValueError("a WebP that FFmpeg cannot decode and that is no animation")
    header = {
        "container": "webp",
        "media_kind": "video",
        "codec": "webp",
        "width": animation.width,
        "height": animation.height,
        "fps": animation.fps,
        "duration_s": animation.duration_s,
        "num_frames": animation.num_frames,
        "num_frames_exact": True,
    }
    return _decoded_elsewhere(
        header, cfg, lambda: next(iter_webp_frames(data, None, 0)), vfr=animation.vfr
    )


def heif_facts(source: str, cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """The facts of a HEIC/HEIF photo (:mod:`pipeline.heif`), in the keys of
    :func:`container_facts`: an image of its displayed size (libheif applies the stored
    rotation). With ``cfg``, the size is checked against the limits before the image
    is decoded."""
    from pipeline.heif import heif_rgb, heif_size, read_heif

    data = read_heif(source)
    w, h = heif_size(data)
    header = _as_still({"container": "heif", "codec": "hevc", "width": w, "height": h})
    return _decoded_elsewhere(header, cfg, lambda: heif_rgb(data))


def pillow_facts(source: str, codec: str, cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """The facts of a still that Pillow reads (:mod:`pipeline.stills`), in the keys of
    :func:`container_facts`: an image of its displayed size (its EXIF orientation
    applied). With ``cfg``, the size is checked against the limits before the image is
    decoded."""
    from pipeline.stills import PILLOW_CONTAINER, still_rgb, still_size

    w, h = still_size(source, codec)
    header = _as_still({"container": PILLOW_CONTAINER, "codec": codec, "width": w, "height": h})
    return _decoded_elsewhere(header, cfg, lambda: still_rgb(source, codec))


def _decoded_elsewhere(
    header: dict[str, Any],
    cfg: ProbeConfig | None,
    decode_first: Callable[[], Any],
    vfr: bool = False,
) -> dict[str, Any]:
    """The facts of a source that a decoder other than FFmpeg reads, shown as decoded
    (no rotation, bars, interlacing or HDR to find): ``header`` checked against the
    size limits of ``cfg``, then ``decode_first`` run to prove that it decodes."""
    defaults = {"sar": Fraction(1), "start_s": 0.0, "has_audio": False, "num_video_streams": 1}
    facts: dict[str, Any] = {**defaults, **header}
    problem = check_size(facts["width"], facts["height"], cfg) if cfg is not None else None
    if problem:
        raise LimitError(problem, facts)
    decode_first()
    return {
        **facts,
        "rotation": 0,
        "mirrored": False,
        "display_width": facts["width"],
        "display_height": facts["height"],
        "vfr": vfr,
        "interlaced": False,
        "color_transfer": None,
        "color_primaries": None,
        "picture_fraction": 1.0,
        "pulldown": False,
    }


class LimitError(ValueError):
    """A source breaks a limit found from its header; ``facts`` holds what is known."""

    def __init__(self, problem: str, facts: dict[str, Any]) -> None:
        super().__init__(problem)
        self.facts = facts


def check_size(width: int, height: int, cfg: ProbeConfig) -> str | None:
    """The coded-size limit ``width x height`` breaks, or None (checked before decoding)."""
    if width <= 0 or height <= 0:
        return f"no frame size ({width}x{height})"
    if width * height > cfg.max_pixels:
        return f"frame size {width}x{height} exceeds {cfg.max_pixels} pixels (max_pixels)"
    return None


def check_limits(facts: dict[str, Any], cfg: ProbeConfig) -> str | None:
    """The first limit ``facts`` (from :func:`probe_video`) breaks, or None."""
    problem = check_size(facts["width"], facts["height"], cfg)
    if problem:
        return problem
    short, long = sorted((facts["display_width"], facts["display_height"]))
    if short < cfg.min_side:
        return (
            f"display size {facts['display_width']}x{facts['display_height']} "
            f"has a side under {cfg.min_side} px"
        )
    if cfg.max_aspect > 0 and long / short > cfg.max_aspect:
        return f"aspect ratio {long / short:.1f}:1 exceeds {cfg.max_aspect:g}:1"
    if not math.isfinite(facts["fps"]) or facts["fps"] <= 0:
        return f"no usable frame rate ({facts['fps']})"
    if facts["duration_s"] > cfg.max_duration_s:
        return f"duration {facts['duration_s']:.1f} s exceeds {cfg.max_duration_s:.1f} s"
    if facts["num_frames"] <= 0:
        return "zero frames"
    return None


def describe(exc: BaseException) -> str:
    """A short cause for an error message (FFmpeg's own text, without the path it repeats)."""
    return str(getattr(exc, "strerror", None) or exc) or type(exc).__name__


class Probe:
    """1:1 stage: one row per source, ``src_*`` facts and the display ``fps``/size."""

    reads: tuple[str, ...] = ("source",)
    writes: tuple[str, ...] = (
        "src_status",
        "src_error",
        "src_duration_s",
        "src_num_frames",
        "src_codec",
        "src_container",
        "src_media_kind",
        "src_coded_width",
        "src_coded_height",
        "src_sar",
        "src_rotation_deg",
        "src_mirrored",
        "src_vfr",
        "src_interlaced",
        "src_pulldown",
        "src_color_transfer",
        "src_color_primaries",
        "src_picture_fraction",
        "src_start_s",
        "src_num_frames_exact",
        "src_has_audio",
        "fps",
        "width",
        "height",
    )

    def __init__(
        self, cfg: ProbeConfig | None = None, failed: Mapping[str, str] | None = None
    ) -> None:
        self.cfg = cfg or ProbeConfig()
        # sources known to fail without being opened again (a build's sources whose
        # workers died on them): the reason of each
        self.failed = dict(failed or {})

    def probe_one(self, source: str) -> dict[str, Any]:
        """The output columns of one source; never raises."""
        out: dict[str, Any] = dict.fromkeys(self.writes)
        if source in self.failed:
            out.update(src_status="error", src_error=f"{source}: {self.failed[source]}")
            return out
        try:
            facts = probe_video(source, self.cfg)
        except LimitError as exc:  # keep the header facts: they say why
            unknown = dict.fromkeys(
                (
                    "rotation",
                    "mirrored",
                    "vfr",
                    "interlaced",
                    "pulldown",
                    "color_transfer",
                    "color_primaries",
                    "picture_fraction",
                )
            )
            self._fill(out, {**exc.facts, **unknown})
            out.update(src_status="error", src_error=f"{source}: {exc}")
            return out
        except Exception as exc:  # any failure of one file is that row's error value
            why = why_unreadable(exc, source)
            out.update(src_status="error", src_error=f"{source}: {why}")
            return out
        self._fill(out, facts)
        problem = check_limits(facts, self.cfg)
        if problem is None:
            out.update(src_status="done")
        else:
            out.update(src_status="error", src_error=f"{source}: {problem}")
        return out

    @staticmethod
    def _fill(out: dict[str, Any], facts: dict[str, Any]) -> None:
        """The fact columns of ``out`` from ``facts`` (unrotated display size when the
        rotation is unknown, i.e. no frame was decoded)."""
        rotation = facts["rotation"]
        if rotation is None:
            display = display_size(facts["width"], facts["height"], facts["sar"], 0)
        else:
            display = (facts["display_width"], facts["display_height"])
        out.update(
            src_duration_s=facts["duration_s"],
            src_num_frames=facts["num_frames"],
            src_codec=facts["codec"],
            src_container=facts["container"],
            src_media_kind=facts["media_kind"],
            src_coded_width=facts["width"],
            src_coded_height=facts["height"],
            src_sar=float(facts["sar"]),
            src_rotation_deg=rotation,
            src_mirrored=facts["mirrored"],
            src_vfr=facts["vfr"],
            src_interlaced=facts["interlaced"],
            src_pulldown=facts["pulldown"],
            src_color_transfer=facts["color_transfer"],
            src_color_primaries=facts["color_primaries"],
            src_picture_fraction=facts["picture_fraction"],
            src_start_s=facts["start_s"],
            src_num_frames_exact=facts["num_frames_exact"],
            src_has_audio=facts["has_audio"],
            fps=facts["fps"],
            width=display[0],
            height=display[1],
        )

    def __call__(self, batch: Batch) -> Batch:
        rows = [self.probe_one(str(s)) for s in batch["source"]] if num_rows(batch) else []
        return with_columns(batch, **{name: [row[name] for row in rows] for name in self.writes})


def why_unreadable(exc: BaseException, source: str | None = None) -> str:
    """Why a source could not be probed, in words a reader of the index understands
    (with ``source``, an empty file or an MP4 without its index is named as such)."""
    text = describe(exc)
    if isinstance(exc, FileNotFoundError):
        return f"not found: {text}"
    if isinstance(exc, (av.error.InvalidDataError, av.error.EOFError)) or "Invalid data" in text:
        known = _known_damage(source) if source is not None else None
        if known is not None:
            return f"not a readable video or image: {known}"
        return f"not a readable video or image (unknown or corrupt container): {text}"
    if isinstance(exc, ValueError):
        return text  # our own checks already say what is wrong
    return f"not a readable video or image: {text}"


def _known_damage(source: str) -> str | None:
    """What is wrong with a source FFmpeg cannot open, where that can be told from its
    size and top-level boxes: an empty file, or an MP4/MOV cut off before its index (the
    ``moov`` box a recorder or uploader writes last). None otherwise, or when it cannot
    be read."""
    from pipeline.storage import storage_for

    try:
        with storage_for(source).open(source) as f:
            f.seek(0, 2)
            size = f.tell()
            if size == 0:
                return "an empty file (0 bytes)"
            boxes = _top_level_boxes(f, size)
    except Exception:  # unreadable here too: the decoder's own words stand
        return None
    if boxes[:1] == [b"ftyp"] and b"mdat" in boxes and b"moov" not in boxes:
        return (
            "an MP4/MOV without its index (no moov box): the file was cut off before "
            "its end was written (an interrupted recording, upload or download)"
        )
    return None


def _top_level_boxes(f: IO[bytes], size: int, limit: int = 64) -> list[bytes]:
    """The types of the ISO-BMFF boxes at the top level of ``f`` (``size`` bytes), up
    to ``limit`` of them or to the first box that runs past the end."""
    types: list[bytes] = []
    offset = 0
    while offset + 8 <= size and len(types) < limit:
        f.seek(offset)
        head = f.read(16)
        length, kind = int.from_bytes(head[:4], "big"), head[4:8]
        if length == 1 and len(head) == 16:
            length = int.from_bytes(head[8:16], "big")
        elif length == 0:
            length = size - offset
        if length < 8 or not kind.isalnum():
            break
        types.append(kind)
        offset += length
    return types
