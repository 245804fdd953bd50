"""Probe: container and stream facts of each source video, errors as values.

1:1, one source row in, one row out. Reads the container header with PyAV and
decodes the first frame (which proves the stream decodes and carries the
display-matrix rotation), then checks the limits of :class:`ProbeConfig`. A
source that is not a video, has no video stream, no frames, or breaks a limit
gets ``src_status="error"`` and a reason naming the file; it is never dropped.

Sources are opened only through :func:`open_source`, so a storage backend
(``s3://``) plugs in at one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any

import av

from pipeline.stages.base import Batch, num_rows, with_columns

__all__ = [
    "Probe",
    "ProbeConfig",
    "check_limits",
    "container_facts",
    "describe",
    "display_size",
    "open_source",
    "probe_video",
]


@dataclass(frozen=True)
class ProbeConfig:
    """Limits a source must meet to be split."""

    max_pixels: int = 8192 * 8192  # coded width * height
    max_duration_s: float = 4 * 3600
    min_side: int = 2  # smallest allowed display side, px


@contextmanager
def open_source(uri: str) -> Iterator[Any]:
    """Open ``uri`` (a local path, ``file://`` URI or ``s3://`` URI) as a PyAV input
    container. The one place sources are opened; the caller closes it by leaving
    the ``with`` block."""
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
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    with av.open(path, mode="r") as container:
        yield container


def display_size(width: int, height: int, sar: Fraction, rotation: int) -> tuple[int, int]:
    """Displayed ``(width, height)``: width stretched by the sample aspect ratio, then
    swapped for a quarter-turn rotation (as players and ``ffmpeg -autorotate`` do)."""
    if sar <= 0:
        sar = Fraction(1)
    w, h = max(1, round(width * sar)), height
    if rotation % 180 != 0:
        w, h = h, w
    return int(w), int(h)


def _first_frame_rotation(container: Any, stream: Any) -> int:
    """Rotation in degrees counter-clockwise from the display matrix, read off the first
    decoded frame (PyAV exposes the stream's matrix only there). Raises when no frame
    decodes."""
    for frame in container.decode(stream):
        return round(frame.rotation or 0) % 360
    raise ValueError("no decodable frames")


def probe_video(source: str | IO[bytes]) -> dict[str, Any]:
    """Container and stream facts of a video file (path or binary file object).

    Returns codec, coded ``width``/``height``, ``sar`` (Fraction), ``rotation``
    (degrees counter-clockwise, 0/90/180/270), ``display_width``/``display_height``,
    ``fps`` (average), ``duration_s``, ``num_frames`` (exact when the container
    records it, else estimated from duration and fps), ``num_frames_exact``, and
    ``start_s`` (stream start time). Raises on anything that is not a decodable video.
    """
    with av.open(source, mode="r") as container:
        return container_facts(container)


def container_facts(container: Any) -> dict[str, Any]:
    """:func:`probe_video` on an open PyAV input container (decodes its first frame)."""
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    width, height = int(ctx.width or stream.width or 0), int(ctx.height or stream.height or 0)
    sar = Fraction(stream.sample_aspect_ratio or ctx.sample_aspect_ratio or 1)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    time_base = stream.time_base or Fraction(1, 1)
    start_s = float(stream.start_time * time_base) if stream.start_time is not None else 0.0
    if stream.duration is not None and stream.duration > 0:
        duration_s = float(stream.duration * time_base)
    elif container.duration is not None and container.duration > 0:
        duration_s = container.duration / av.time_base
    else:
        duration_s = 0.0
    exact = bool(stream.frames and stream.frames > 0)
    num_frames = int(stream.frames) if exact else round(duration_s * fps)
    rotation = _first_frame_rotation(container, stream)
    display_w, display_h = display_size(width, height, sar, rotation)
    return {
        "codec": ctx.name,
        "width": width,
        "height": height,
        "sar": sar,
        "rotation": rotation,
        "display_width": display_w,
        "display_height": display_h,
        "fps": fps,
        "duration_s": duration_s,
        "num_frames": num_frames,
        "num_frames_exact": exact,
        "start_s": start_s,
    }


def check_limits(facts: dict[str, Any], cfg: ProbeConfig) -> str | None:
    """The first limit ``facts`` (from :func:`probe_video`) breaks, or None."""
    if facts["width"] <= 0 or facts["height"] <= 0:
        return f"no frame size ({facts['width']}x{facts['height']})"
    if min(facts["display_width"], facts["display_height"]) < cfg.min_side:
        return (
            f"display size {facts['display_width']}x{facts['display_height']} "
            f"has a side under {cfg.min_side} px"
        )
    if facts["width"] * facts["height"] > cfg.max_pixels:
        return f"{facts['width']}x{facts['height']} exceeds {cfg.max_pixels} pixels"
    if not math.isfinite(facts["fps"]) or facts["fps"] <= 0:
        return f"no usable frame rate ({facts['fps']})"
    if facts["duration_s"] > cfg.max_duration_s:
        return f"duration {facts['duration_s']:.1f} s exceeds {cfg.max_duration_s:.1f} s"
    if facts["num_frames"] <= 0:
        return "zero frames"
    return None


def describe(exc: BaseException) -> str:
    """A short cause for an error message (FFmpeg's own text, without the path it repeats)."""
    return str(getattr(exc, "strerror", None) or exc or type(exc).__name__)


class Probe:
    """1:1 stage: one row per source, ``src_*`` facts and the display ``fps``/size."""

    reads: tuple[str, ...] = ("source",)
    writes: tuple[str, ...] = (
        "src_status",
        "src_error",
        "src_duration_s",
        "src_num_frames",
        "src_codec",
        "fps",
        "width",
        "height",
    )

    def __init__(self, cfg: ProbeConfig | None = None) -> None:
        self.cfg = cfg or ProbeConfig()

    def probe_one(self, source: str) -> dict[str, Any]:
        """The output columns of one source; never raises."""
        out: dict[str, Any] = dict.fromkeys(self.writes)
        try:
            with open_source(source) as container:
                facts = container_facts(container)
        except Exception as exc:  # any failure of one file is that row's error value
            out.update(
                src_status="error", src_error=f"{source}: not a readable video: {describe(exc)}"
            )
            return out
        out.update(
            src_duration_s=facts["duration_s"],
            src_num_frames=facts["num_frames"],
            src_codec=facts["codec"],
            fps=facts["fps"],
            width=facts["display_width"],
            height=facts["display_height"],
        )
        problem = check_limits(facts, self.cfg)
        if problem is None:
            out.update(src_status="done")
        else:
            out.update(src_status="error", src_error=f"{source}: {problem}")
        return out

    def __call__(self, batch: Batch) -> Batch:
        rows = [self.probe_one(str(s)) for s in batch["source"]] if num_rows(batch) else []
        return with_columns(batch, **{name: [row[name] for row in rows] for name in self.writes})
