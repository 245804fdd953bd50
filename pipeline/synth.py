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
import os
from fractions import Fraction

import av
import numpy as np

__all__ = ["demo_videos", "synth_video"]

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


def _draw_shot(
    num_frames: int, width: int, height: int, index: int, rng: np.random.Generator
) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of one shot: striped colour field + texture + moving disc."""
    base, accent, angle = _shot_style(index, rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    period = max(6.0, min(width, height) / rng.uniform(3.0, 6.0))
    phase_axis = np.cos(angle) * xx + np.sin(angle) * yy
    # A fixed texture per shot, shifted a little each frame: motion without new content.
    texture = rng.normal(0.0, 0.06, size=(height, width, 1)).astype(np.float32)
    radius = max(2.0, min(width, height) / 6)
    cx0, cy0 = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    vx, vy = rng.uniform(-1.5, 1.5, size=2) * max(1.0, min(width, height) / 100)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (phase_axis + 1.5 * t) / period)
        img = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
        img = img + np.roll(texture, shift=t, axis=1)
        cx = _bounce(cx0 + vx * t, radius, width - radius)
        cy = _bounce(cy0 + vy * t, radius, height - radius)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        img[disc] = accent
        frames[t] = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return frames


def _draw_dark_shot(
    num_frames: int, width: int, height: int, rng: np.random.Generator
) -> np.ndarray:
    """An almost black, almost static shot (what a quality filter should reject)."""
    level = rng.integers(3, 9)
    noise = rng.integers(0, 3, size=(height, width, 1))
    frame = np.clip(level + noise, 0, 255).astype(np.uint8).repeat(3, axis=2)
    return np.broadcast_to(frame, (num_frames, height, width, 3))


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
) -> list[int]:
    """Write a video of ``len(shots)`` visually distinct shots; return the cut frames.

    ``shots`` holds the number of frames of each shot; the returned list holds the
    first frame of every shot after the first (so ``[30, 70]`` for ``[30, 40, 25]``).
    ``dark_shots`` lists shot indices drawn as near-black static frames instead.
    ``width`` and ``height`` must be even (4:2:0 chroma).
    """
    if width % 2 or height % 2 or width < 2 or height < 2:
        raise ValueError(f"{path}: width and height must be even and >= 2, got {width}x{height}")
    if not shots or any(n < 1 for n in shots):
        raise ValueError(f"{path}: every shot needs >= 1 frame, got {shots}")
    rng = np.random.default_rng(seed)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(path, mode="w") as out:
        stream = out.add_stream(codec, rate=rate)
        if not isinstance(stream, av.VideoStream):
            raise ValueError(f"{path}: {codec!r} is not a video codec")
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "20", "preset": "veryfast"}
        for index, num_frames in enumerate(shots):
            if index in dark_shots:
                frames = _draw_dark_shot(num_frames, width, height, rng)
            else:
                frames = _draw_shot(num_frames, width, height, index, rng)
            for frame in frames:
                video_frame = av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(frame), format="rgb24"
                )
                for packet in stream.encode(video_frame):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return [int(c) for c in np.cumsum(shots)[:-1]]


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
