"""Synthetic test videos with known shot boundaries.

Tests and the demo need videos whose cut frames are known exactly, in any
aspect ratio, written in milliseconds. :func:`synth_video` draws each shot as
its own colour field with a drifting texture and a moving shape (so frames are
not static and a detector has something to track), and makes consecutive shots
differ strongly in hue, brightness and pattern so that every hard cut is
unambiguous. :func:`demo_videos` writes a small, varied set for
``reelpack demo``::

    python -c "from pipeline.synth import demo_videos; print(demo_videos('/tmp/demo'))"
"""

from __future__ import annotations

import colorsys
import io
import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

import av
import numpy as np

__all__ = ["demo_videos", "iter_synth_frames", "synth_video"]

# Hue steps of the golden ratio keep any two consecutive shots far apart on the colour wheel.
_GOLDEN = 0.618033988749895


def _shot_style(index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Two RGB colours in [0, 1] and a stripe angle for shot ``index``."""
    hue = (0.11 + index * _GOLDEN) % 1.0
    # Alternate bright and mid-dark fields so luma jumps at every cut, not only hue.
    value = 0.9 if index % 2 == 0 else 0.45
    base = np.array(colorsys.hsv_to_rgb(hue, 0.85, value))
    accent = np.array(colorsys.hsv_to_rgb((hue + 0.5) % 1.0, 0.7, 1.0 - value / 2))
    angle = float(rng.uniform(0, np.pi)) + index * np.pi / 3
    return base, accent, angle


def _bounce(position: float, low: float, high: float) -> float:
    """Fold ``position`` into ``[low, high]`` like a ball bouncing off both walls, so a
    moving shape stays in view however long the shot is."""
    span = high - low
    if span <= 0:
        return low
    folded = (position - low) % (2 * span)
    return low + (folded if folded <= span else 2 * span - folded)


class _ShotPainter:
    """Draws frame ``t`` of one shot on demand (stateless per frame, so a video of any
    length streams): striped colour field + drifting texture + moving disc.

    ``style``: "normal"; "fast" (fast camera-like motion: stripes and disc race);
    "static" (nothing moves); "dark" (almost black, almost static).
    """

    def __init__(
        self, width: int, height: int, index: int, rng: np.random.Generator, style: str
    ) -> None:
        self.style = style
        self.base, self.accent, angle = _shot_style(index, rng)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.xx, self.yy = xx, yy
        self.period = max(6.0, min(width, height) / rng.uniform(3.0, 6.0))
        self.phase_axis = np.cos(angle) * xx + np.sin(angle) * yy
        # A fixed texture per shot, shifted a little each frame: motion without new content.
        self.texture = rng.normal(0.0, 0.06, size=(height, width, 1)).astype(np.float32)
        self.radius = max(2.0, min(width, height) / 6)
        r = self.radius
        self.c0 = (rng.uniform(r, max(r, width - r)), rng.uniform(r, max(r, height - r)))
        self.v = rng.uniform(-1.5, 1.5, size=2) * max(1.0, min(width, height) / 100)
        self.speed = {"fast": 6.0, "static": 0.0}.get(style, 1.0)
        self.size = (width, height)
        level = rng.integers(3, 9)
        noise = rng.integers(0, 3, size=(height, width, 1))
        self.dark = np.clip(level + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)

    def frame(self, t: int) -> np.ndarray:
        if self.style == "dark":
            return self.dark
        width, height = self.size
        tm = t * self.speed
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (self.phase_axis + 1.5 * tm) / self.period)
        img = self.base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
        img = img + np.roll(self.texture, shift=round(tm), axis=1)
        cx = _bounce(self.c0[0] + self.v[0] * tm, self.radius, width - self.radius)
        cy = _bounce(self.c0[1] + self.v[1] * tm, self.radius, height - self.radius)
        disc = (self.xx - cx) ** 2 + (self.yy - cy) ** 2 <= self.radius**2
        img[disc] = self.accent
        return np.clip(img * 255.0, 0, 255).astype(np.uint8)


def _transition_weight(f: int, cut: int, kind: str, n: int) -> tuple[float, float] | None:
    """(weight of the outgoing shot, weight of the incoming one) at frame ``f`` inside a
    transition around ``cut``, or None outside it. Fades pass through black."""
    if kind == "dissolve":
        lo = cut - n // 2
        if lo <= f < lo + n:
            a = (f - lo + 1) / (n + 1)
            return 1.0 - a, a
    elif kind == "fade":
        if cut - n <= f < cut:
            return (cut - f - 1) / n, 0.0
        if cut <= f < cut + n:
            return 0.0, (f - cut + 1) / n
    return None


def iter_synth_frames(
    width: int,
    height: int,
    shots: list[int],
    seed: int,
    styles: dict[int, str] | None = None,
    transitions: dict[int, tuple[str, int]] | None = None,
    flashes: tuple[int, ...] = (),
) -> Iterator[np.ndarray]:
    """The frames of :func:`synth_video`, one at a time (memory independent of length)."""
    rng = np.random.default_rng(seed)
    styles = styles or {}
    transitions = transitions or {}
    painters = [
        _ShotPainter(width, height, i, rng, styles.get(i, "normal")) for i in range(len(shots))
    ]
    starts = [0, *np.cumsum(shots).tolist()]
    for f in range(starts[-1]):
        k = int(np.searchsorted(starts, f, side="right")) - 1
        image = painters[k].frame(f - starts[k])
        for j in (k, k + 1):  # a transition belongs to the cut starting shot j
            if j < 1 or j >= len(shots) or j not in transitions:
                continue
            kind, n = transitions[j]
            weights = _transition_weight(f, starts[j], kind, n)
            if weights is not None:
                out = painters[j - 1].frame(f - starts[j - 1]).astype(np.float32) * weights[0]
                inc = painters[j].frame(max(0, f - starts[j])).astype(np.float32) * weights[1]
                image = np.clip(out + inc, 0, 255).astype(np.uint8)
        if f in flashes:
            # A camera flash: one frame blown out towards white.
            image = (255 - (255 - image.astype(np.uint16)) // 6).astype(np.uint8)
        yield image


def synth_video(
    path: str,
    *,
    width: int,
    height: int,
    fps: float,
    shots: list[int],
    seed: int,
    codec: str = "libx264",
    dark_shots: tuple[int, ...] = (),
    styles: dict[int, str] | None = None,
    transitions: dict[int, tuple[str, int]] | None = None,
    flashes: tuple[int, ...] = (),
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    fmt: str | None = None,
) -> list[int]:
    """Write a video of ``len(shots)`` visually distinct shots; return the cut frames.

    ``shots`` holds the number of frames of each shot; the returned list holds the
    first frame of every shot after the first (so ``[30, 70]`` for ``[30, 40, 25]``).
    ``dark_shots`` lists shot indices drawn as near-black static frames instead;
    ``styles`` maps shot indices to "fast", "static" or "dark". ``transitions`` maps a
    shot index ``k >= 1`` to ``("dissolve", n)`` (an ``n``-frame cross-fade centred on
    the cut: frames ``cut - n//2 .. cut - n//2 + n``) or ``("fade", n)`` (``n`` frames
    fading to black before the cut and ``n`` fading in after it). ``flashes`` lists
    frames blown out to near-white (camera flashes: not cuts). ``width`` and ``height``
    must be even (4:2:0 chroma) unless ``pix_fmt`` allows odd sizes. ``fmt`` names the
    muxer when the extension does not (``"m4v"``: a raw MPEG-4 stream).
    """
    if (pix_fmt == "yuv420p" and (width % 2 or height % 2)) or width < 1 or height < 1:
        raise ValueError(f"{path}: width and height must be even and >= 2, got {width}x{height}")
    if not shots or any(n < 1 for n in shots):
        raise ValueError(f"{path}: every shot needs >= 1 frame, got {shots}")
    styles = {**(styles or {}), **{i: "dark" for i in dark_shots}}
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate)
        if not isinstance(stream, av.VideoStream):
            raise ValueError(f"{path}: {codec!r} is not a video codec")
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if options is not None:
            stream.options = dict(options)
        elif codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        _encode_rgb(
            out, stream, iter_synth_frames(width, height, shots, seed, styles, transitions, flashes)
        )
    return [int(c) for c in np.cumsum(shots)[:-1]]


def _encode_rgb(out: Any, stream: Any, frames: Iterable[np.ndarray]) -> None:
    """Encode RGB frames with ``stream``, mux them into ``out``, flush the encoder."""
    for image in frames:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


# name, width, height, fps, frames per shot, near-black shot indices
_DEMO = (
    ("landscape_16x9.mp4", 320, 180, 24.0, [30, 36, 30], ()),
    ("portrait_9x16.mp4", 180, 320, 24.0, [40, 32], ()),
    ("square.mp4", 240, 240, 25.0, [30, 30, 30], ()),
    ("classic_4x3.mp4", 240, 180, 30.0, [45, 45], ()),
    ("dark_shot.mp4", 320, 180, 24.0, [36, 36], (1,)),
    ("single_shot.mp4", 256, 144, 24.0, [60], ()),
)


def demo_videos(out_dir: str) -> list[str]:
    """Write six short demo videos (2-4 s, at most 320 px on the long side) into
    ``out_dir`` and return their paths: 16:9, 9:16, square, 4:3, one with a near-black
    static shot, one with a single shot."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for seed, (name, width, height, fps, shots, dark) in enumerate(_DEMO):
        path = os.path.join(out_dir, name)
        synth_video(
            path, width=width, height=height, fps=fps, shots=shots, seed=seed, dark_shots=dark
        )
        paths.append(path)
    return paths


def resized_stream(
    path: str,
    parts: list[list[np.ndarray]],
    *,
    fps: float = 24.0,
    fmt: str | None = None,
    sars: list[Fraction] | None = None,
) -> None:
    """One H.264 stream whose frame size (or with ``sars``, its pixel aspect ratio)
    changes between ``parts`` (lists of RGB frames, one size each), as a broadcast
    capture or joined recordings hold: each part encoded with its own parameter sets,
    the packets muxed in order into ``path`` (container by ``fmt`` or the file name),
    one frame every ``1 / fps`` seconds, a keyframe every second (as broadcast has)."""
    raw = bytearray()
    for i, frames in enumerate(parts):
        sink = _Pipe()
        with av.open(sink, mode="w", format="h264") as out:
            stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            assert isinstance(stream, av.VideoStream)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "ultrafast", "crf": "23", "g": str(max(1, round(fps)))}
            if sars is not None:
                stream.codec_context.sample_aspect_ratio = sars[i]
            _encode_rgb(out, stream, frames)
        raw += sink.data
    tick = Fraction(fps).limit_denominator(1001) ** -1
    src = av.open(io.BytesIO(bytes(raw)), mode="r", format="h264")
    with src, av.open(path, mode="w", format=fmt) as out:
        video = src.streams.video[0]
        stream = out.add_stream_from_template(video)
        stream.time_base = tick
        packets = (p for p in src.demux(video) if p.size)
        for i, packet in enumerate(packets):  # no B-frames: decode order is display order
            packet.stream = stream
            packet.time_base, packet.pts, packet.dts, packet.duration = tick, i, i, 1
            out.mux(packet)


# --- a corpus of bad and unusual inputs ---------------------------------------------------------


def _encode_frames(
    path: str,
    frames: list[np.ndarray] | Iterator[np.ndarray],
    *,
    fps: float = 10.0,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    fmt: str | None = None,
    rotation: int = 0,
    pts_s: list[float] | None = None,
    pipe: bool = False,
    muxer_options: dict[str, str] | None = None,
) -> None:
    """Encode RGB frames; ``pts_s`` gives each frame's own time (variable frame rate).
    With ``pipe``, the muxer writes to a stream it cannot seek back in, as a recorder
    writing to a pipe does: headers that need the end (Matroska's duration) stay empty.
    ``options`` go to the encoder, ``muxer_options`` to the muxer."""
    frames = iter(frames)
    first = next(frames)
    height, width = first.shape[:2]
    sink = _Pipe() if pipe else None
    target = sink if sink is not None else path
    with av.open(target, mode="w", format=fmt, options=muxer_options or {}) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = dict(options)
        if rotation:
            stream.set_display_rotation(rotation)
        if pts_s is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate([first, *frames]):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts_s is not None:
                frame.pts, frame.time_base = round(pts_s[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if sink is not None:
        with open(path, "wb") as f:
            f.write(sink.data)


class _Pipe(io.RawIOBase):
    """A write-only byte sink that cannot seek, like a pipe."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b: Any) -> int:
        self.data += bytes(b)
        return len(b)


def _shots_frames(width: int, height: int, shots: list[int], seed: int) -> list[np.ndarray]:
    return list(iter_synth_frames(width, height, shots, seed))


def _audio(path: str, cover: np.ndarray | None = None) -> None:
    """One second of a tone as AAC in MP4, with ``cover`` (RGB) as its cover art: an
    attached picture, which FFmpeg lists as a video stream."""
    with av.open(path, "w") as out:
        astream = out.add_stream("aac", rate=16000, layout="mono")
        if cover is not None:
            art = out.add_stream("mjpeg", rate=1)
            art.width, art.height, art.pix_fmt = cover.shape[1], cover.shape[0], "yuvj420p"
            art.disposition = av.stream.Disposition.attached_pic
            picture = av.VideoFrame.from_ndarray(cover, format="rgb24").reformat(format="yuvj420p")
            for packet in [*art.encode(picture), *art.encode()]:
                out.mux(packet)
        samples = (np.sin(np.arange(16000) / 10.0) * 0.3).astype(np.float32)[None]
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(
                samples[:, start : start + 1024], format="fltp", layout="mono"
            )
            frame.sample_rate = 16000
            for packet in astream.encode(frame):
                out.mux(packet)
        for packet in astream.encode():
            out.mux(packet)


def bad_input_corpus(out_dir: str, long_minutes: float = 15.0) -> dict[str, str]:
    """Write the bad / unusual input corpus of the ingest tests into ``out_dir``.

    Returns ``{file name: what it is}``. Every file is tiny except the ``long_minutes``
    static video, which is 16x16 at 10 fps so that it is quick to write and decode.
    """
    os.makedirs(out_dir, exist_ok=True)
    p = lambda name: os.path.join(out_dir, name)  # noqa: E731
    rng = np.random.default_rng(0)
    made: dict[str, str] = {}

    def note(name: str, what: str) -> None:
        made[name] = what

    open(p("zero_bytes.mp4"), "wb").close()
    note("zero_bytes.mp4", "zero-byte file")
    with open(p("random_bytes.mp4"), "wb") as f:
        f.write(rng.integers(0, 256, 64 << 10, dtype=np.uint8).tobytes())
    note("random_bytes.mp4", "random bytes")
    with open(p("text.mp4"), "w") as text:
        text.write("this is not a video\n" * 50)
    note("text.mp4", "text named .mp4")

    good = _shots_frames(96, 64, [25, 25], seed=1)
    _encode_frames(p("_good.mp4"), good)
    with open(p("_good.mp4"), "rb") as src:
        data = src.read()
    os.remove(p("_good.mp4"))
    with open(p("no_moov.mp4"), "wb") as f:  # moov is at the end: cut before it
        f.write(data[: len(data) // 2])
    note("no_moov.mp4", "mp4 truncated before its index (no moov)")
    _encode_frames(p("_fast.mp4"), good, muxer_options={"movflags": "faststart"})
    with open(p("_fast.mp4"), "rb") as src:
        fast = src.read()
    os.remove(p("_fast.mp4"))
    with open(p("truncated_mdat.mp4"), "wb") as f:
        f.write(fast[: len(fast) * 2 // 3])
    note("truncated_mdat.mp4", "mp4 with truncated media data")
    corrupt = bytearray(data)
    mid = len(corrupt) // 2
    corrupt[mid : mid + 2048] = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    with open(p("corrupt_mid.mp4"), "wb") as f:
        f.write(bytes(corrupt))
    note("corrupt_mid.mp4", "bytes corrupted mid-stream")

    _audio(p("audio_only.mp4"))
    note("audio_only.mp4", "audio only")
    _audio(p("audio_cover_art.mp4"), cover=good[0])
    note("audio_cover_art.mp4", "audio with cover art (an attached picture, not a video)")
    _encode_frames(p("image_named.mp4"), good[:1], codec="png", pix_fmt="rgb24", fmt="image2pipe")
    note("image_named.mp4", "a PNG image named .mp4")
    _encode_frames(p("one_frame.mp4"), good[:1])
    note("one_frame.mp4", "1-frame video")
    _encode_frames(p("tiny_2x2.mp4"), [f[:2, :2] for f in good])
    note("tiny_2x2.mp4", "2x2 pixels")
    _encode_frames(p("odd_641x359.mp4"), _shots_frames(641, 359, [12, 12], 2), pix_fmt="yuv444p")
    note("odd_641x359.mp4", "odd dimensions 641x359")
    _encode_frames(p("extreme_16x1024.mp4"), _shots_frames(16, 1024, [15, 15], 3))
    note("extreme_16x1024.mp4", "extreme aspect 16x1024")
    huge = np.full((8192, 8192, 3), 90, np.uint8)
    _encode_frames(p("huge_8192.mov"), [huge], codec="png", pix_fmt="rgb24")
    note("huge_8192.mov", "an 8192x8192 frame")
    vfr_times = np.cumsum([0.0] + [0.05 if i % 3 else 0.15 for i in range(59)]).tolist()
    _encode_frames(p("vfr.mkv"), _shots_frames(64, 48, [30, 30], 4), pts_s=vfr_times)
    note("vfr.mkv", "variable frame rate")
    _encode_frames(
        p("hevc_10bit.mp4"),
        _shots_frames(64, 64, [12, 12], 5),
        codec="libx265",
        pix_fmt="yuv420p10le",
        options={"preset": "ultrafast", "x265-params": "log-level=none"},
    )
    note("hevc_10bit.mp4", "10-bit HEVC")
    _encode_frames(
        p("vp9.webm"),
        _shots_frames(64, 48, [12, 12], 6),
        codec="libvpx-vp9",
        options={"deadline": "realtime", "cpu-used": "8"},
    )
    note("vp9.webm", "VP9 WebM")
    _encode_frames(
        p("animated.gif"), _shots_frames(48, 32, [12, 12], 7), codec="gif", pix_fmt="rgb8"
    )
    note("animated.gif", "animated GIF")
    _encode_frames(p("rotated_90.mp4"), _shots_frames(96, 48, [15, 15], 8), rotation=90)
    note("rotated_90.mp4", "rotated 90 degrees")
    _encode_frames(p("vidéo 東京 clip.mp4"), _shots_frames(64, 48, [15, 15], 9))
    note("vidéo 東京 clip.mp4", "non-ASCII file name with spaces")
    frames2 = _shots_frames(64, 48, [15, 15], 10)
    with av.open(p("two_video_streams.mkv"), "w") as out:
        streams = []
        for _ in range(2):
            s = out.add_stream("libx264", rate=10)
            assert isinstance(s, av.VideoStream)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            streams.append(s)
        for image in frames2:
            for s in streams:
                for packet in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    out.mux(packet)
        for s in streams:
            for packet in s.encode():
                out.mux(packet)
    note("two_video_streams.mkv", "two video streams")
    _encode_frames(
        p("recorded.webm"),
        _shots_frames(64, 48, [12, 12], 11),
        codec="libvpx-vp9",
        options={"deadline": "realtime", "cpu-used": "8"},
        fmt="webm",
        pipe=True,
    )
    note("recorded.webm", "WebM without a duration (written to a pipe, as recorders do)")
    _encode_frames(p("raw.h264"), _shots_frames(64, 48, [30, 30], 12), fmt="h264")
    note("raw.h264", "a raw H.264 elementary stream (no container, no timestamps)")
    _encode_frames(p("_whole.mkv"), _shots_frames(96, 64, [30, 30, 30, 30], 14))
    with open(p("_whole.mkv"), "rb") as src, open(p("cut_off.mkv"), "wb") as dst:
        whole = src.read()
        dst.write(whole[: len(whole) * 2 // 3])
    os.remove(p("_whole.mkv"))
    note("cut_off.mkv", "Matroska cut off (its header announces the whole duration)")
    resized_stream(
        p("resized.mkv"),
        [_shots_frames(96, 64, [20], 15), _shots_frames(64, 64, [20], 16)],
        fps=10.0,
    )
    note("resized.mkv", "one stream changing its frame size and aspect ratio mid-file")
    from PIL import Image

    stills = [Image.fromarray(f) for f in _shots_frames(48, 32, [12, 12], 13)]
    stills[0].save(p("animated.webp"), save_all=True, append_images=stills[1:], duration=100)
    note("animated.webp", "an animated WebP (FFmpeg cannot decode it)")
    with open(p("animated.webp"), "rb") as src, open(p("truncated_animated.webp"), "wb") as dst:
        animation = src.read()
        dst.write(animation[: len(animation) * 2 // 3])
    note("truncated_animated.webp", "an animated WebP cut off mid-frame")
    still = np.full((16, 16, 3), 120, np.uint8)
    n = round(long_minutes * 60 * 10)
    _encode_frames(
        p("static_long.mp4"),
        (still for _ in range(n)),
        options={"preset": "ultrafast", "crf": "30"},
    )
    note("static_long.mp4", f"{long_minutes:g}-minute static video (16x16)")
    return made
