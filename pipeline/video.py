"""Small PyAV helpers: clip payloads as H.264 mp4 bytes, and back to frames.

The split stage decodes each source once and stores every clip as mp4 bytes at
a working resolution (``clip_bytes``); later stages call :func:`decode_mp4` on
those bytes and never reopen the source.
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

__all__ = ["decode_mp4", "encode_mp4", "even_size"]


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


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18, preset: str = "veryfast") -> bytes:
    """Encode ``frames`` (T, H, W, 3) uint8 RGB with even H, W to H.264 mp4 bytes.

    The frame rate is stored as a rational approximation of ``fps`` so that
    fractional rates such as 29.97 round-trip.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if t == 0 or h % 2 or w % 2:
        raise ValueError(f"need >= 1 frame and even sides, got {frames.shape}")
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
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
