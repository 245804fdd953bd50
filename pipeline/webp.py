"""Animated WebP: the one common animation format FFmpeg cannot decode.

FFmpeg's WebP decoder reads still images only (an animation's frames are ``ANMF``
chunks it does not know), so probe and split read animated WebP through Pillow's
libwebp bindings instead. The facts come from the RIFF chunk headers alone (canvas
size, one duration per frame), and frames are composited onto the canvas by libwebp's
animation decoder, then over white where they are transparent, as a browser shows them.

libwebp decodes from memory, so a source is read whole into memory (never to disk),
bounded by :data:`MAX_BYTES`; frames are decoded one at a time.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.decode import DecodedFrame, detection_bgr, rgb_to_i420
from pipeline.video import even_size, over_white

__all__ = [
    "MAX_BYTES",
    "WebPAnimation",
    "is_animated_webp",
    "iter_webp_frames",
    "parse_animation",
    "read_webp",
]

MAX_BYTES = 512 << 20  # an animated WebP larger than this is refused, not read whole
# A frame of 10 ms or less is shown for 100 ms by browsers (as for GIF): encoders
# write 0 for "as fast as possible" and mean the browser's pace.
MIN_FRAME_MS, SHORT_FRAME_MS = 11, 100
_ANIMATION, _ALPHA = 0x02, 0x10  # VP8X feature flags


@dataclass(frozen=True)
class WebPAnimation:
    """What the chunk headers of an animated WebP say (nothing decoded)."""

    width: int  # canvas size: every frame is composited onto it
    height: int
    durations_ms: tuple[int, ...]  # one per frame, as shown
    has_alpha: bool

    @property
    def num_frames(self) -> int:
        return len(self.durations_ms)

    @property
    def duration_s(self) -> float:
        return sum(self.durations_ms) / 1000.0

    @property
    def fps(self) -> float:
        """Average frame rate (frames per second shown)."""
        return self.num_frames / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def vfr(self) -> bool:
        return len(set(self.durations_ms)) > 1


def _u24(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 3], "little")


def is_animated_webp(head: bytes) -> bool:
    """Whether ``head`` (the first 21 bytes of a file, or more) starts an animated WebP:
    a RIFF/WEBP file whose first chunk is ``VP8X`` with the animation flag."""
    return (
        len(head) >= 21
        and head[:4] == b"RIFF"
        and head[8:16] == b"WEBPVP8X"
        and bool(head[20] & _ANIMATION)
    )


def parse_animation(data: bytes) -> WebPAnimation | None:
    """The canvas and frame durations of an animated WebP, or None when ``data`` is no
    animated WebP. Raises ``ValueError`` for one that is truncated (libwebp reads whole
    files only) or holds no frame."""
    if not is_animated_webp(data):
        return None
    vp8x = data[20:30]
    if len(vp8x) < 10:
        raise ValueError("an animated WebP truncated inside its header")
    width, height = _u24(vp8x, 4) + 1, _u24(vp8x, 7) + 1
    durations: list[int] = []
    at, riff_end = 12, 8 + struct.unpack_from("<I", data, 4)[0]
    while at + 8 <= riff_end:
        fourcc = data[at : at + 4]
        body = at + 8
        size = struct.unpack_from("<I", data, at + 4)[0] if body <= len(data) else 0
        if body + size > len(data):
            raise ValueError(
                f"an animated WebP truncated inside frame {len(durations) + 1} "
                f"({len(data)} of {riff_end} bytes)"
            )
        if fourcc == b"ANMF" and size >= 16:
            ms = _u24(data, body + 12)
            durations.append(SHORT_FRAME_MS if ms < MIN_FRAME_MS else ms)
        at = body + size + (size & 1)  # chunks are padded to an even size
    if not durations:
        raise ValueError("an animated WebP without a frame")
    return WebPAnimation(width, height, tuple(durations), bool(vp8x[0] & _ALPHA))


def read_webp(uri: str) -> bytes:
    """The whole file at ``uri`` (local path, ``file://`` or ``s3://``), at most
    :data:`MAX_BYTES`."""
    from pipeline.storage import read_limited

    return read_limited(uri, MAX_BYTES, "an animated WebP")


def iter_webp_frames(
    data: bytes,
    display: tuple[int, int] | None,
    max_area: int,
    start_frame: int = 0,
    detect_width: int | None = None,
) -> Iterator[DecodedFrame]:
    """The frames of an animated WebP from ``start_frame`` on, as
    :func:`pipeline.decode.iter_source_frames` yields them: the working image (I420,
    BT.601 limited range, at most ``max_area`` pixels of the ``display`` aspect;
    ``max_area <= 0`` skips it) and, with ``detect_width``, the BGR detection frame.
    Earlier frames are decoded too (each frame is drawn over the canvas the previous
    ones left) but not converted."""
    from PIL import Image

    animation = parse_animation(data)
    if animation is None:
        raise ValueError("not an animated WebP")
    canvas = (animation.width, animation.height)
    w, h = even_size(*(display or canvas), max_area) if max_area > 0 else (0, 0)
    elapsed_ms = 0
    with Image.open(io.BytesIO(data)) as image:
        count = min(animation.num_frames, getattr(image, "n_frames", 1))
        for num in range(count):
            duration_ms = animation.durations_ms[num]
            time_s, elapsed_ms = elapsed_ms / 1000.0, elapsed_ms + duration_ms
            if num < start_frame:
                continue
            image.seek(num)
            rgb = over_white(np.asarray(image.convert("RGBA")))
            yuv = np.empty(0, np.uint8)  # no working image asked for
            if w:
                interpolation = cv2.INTER_AREA if w < canvas[0] else cv2.INTER_LINEAR
                yuv = rgb_to_i420(cv2.resize(rgb, (w, h), interpolation=interpolation))
            small = None if detect_width is None else detection_bgr(rgb, detect_width)
            yield DecodedFrame(num, time_s, duration_ms / 1000.0, yuv, small)
