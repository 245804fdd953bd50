"""Still images that FFmpeg decodes wrong or not at all, read by Pillow.

FFmpeg reads most stills (probe and split open them as one-frame videos), except:

- a TIFF with JPEG compression, which FFmpeg (8) decodes as a black picture without an
  error;
- a still FFmpeg gives no frame size, or whose frame fails to decode: a float TIFF, a
  PNG over FFmpeg's 268-megapixel limit.

Probe sends those here (:func:`pillow_reads`); their ``src_container`` is
:data:`PILLOW_CONTAINER`, so split decodes them here too. The header is read without
Pillow's decompression-bomb check: probe checks the size against its own limit
(``probe.max_pixels``) before anything is decoded. Files are read through the storage
layer, an ``s3://`` object by ranged GETs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline.video import over_white

__all__ = ["PILLOW_CONTAINER", "NotAPillowStill", "pillow_reads", "still_rgb", "still_size"]

PILLOW_CONTAINER = "pillow"
# TIFF compressions FFmpeg decodes as a black picture, without an error
_BLACK_IN_FFMPEG = frozenset({"jpeg", "tiff_jpeg"})
# EXIF orientations that swap the sides: 5-8 (a quarter turn, mirrored or not)
_SIDES_SWAPPED = frozenset({5, 6, 7, 8})


def _plugin(codec: str) -> Any:
    """The Pillow image class of FFmpeg's still decoder ``codec``, or None."""
    from PIL import (
        BmpImagePlugin,
        Jpeg2KImagePlugin,
        JpegImagePlugin,
        PngImagePlugin,
        TiffImagePlugin,
        WebPImagePlugin,
    )

    return {
        "tiff": TiffImagePlugin.TiffImageFile,
        "png": PngImagePlugin.PngImageFile,
        "mjpeg": JpegImagePlugin.JpegImageFile,
        "bmp": BmpImagePlugin.BmpImageFile,
        "webp": WebPImagePlugin.WebPImageFile,
        "jpeg2000": Jpeg2KImagePlugin.Jpeg2KImageFile,
    }.get(codec)


class NotAPillowStill(ValueError):
    """Pillow cannot read the header of a still."""


@contextmanager
def _opened(uri: str, codec: str) -> Iterator[Any]:
    """The image at ``uri`` (local path, ``file://`` or ``s3://``) opened by the Pillow
    class of ``codec``: its header read, nothing decoded. Raises
    :class:`NotAPillowStill` when Pillow has no such class or cannot read the header."""
    from pipeline.storage import storage_for

    plugin = _plugin(codec)
    if plugin is None:
        raise NotAPillowStill(f"Pillow cannot read {codec!r} images")
    with storage_for(uri).open(uri) as raw:
        handle: Any = raw
        if not isinstance(raw, io.BufferedIOBase):  # an S3 object's ranged-GET reader
            handle = io.BufferedReader(raw, 1 << 20)
        try:
            # the class itself, not Image.open: that would refuse a large image before
            # probe can name its size and the limit it breaks
            image = plugin(handle)
        except (SyntaxError, ValueError, OSError, IndexError, KeyError) as exc:
            raise NotAPillowStill(f"Pillow cannot read it as {codec}: {exc}") from exc
        try:
            yield image
        finally:
            image.close()


def _orientation(image: Any) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except (ValueError, TypeError, OSError, SyntaxError):
        return 1


def pillow_reads(uri: str, codec: str, width: int, height: int) -> bool:
    """Whether a still that FFmpeg probed as ``codec`` of ``width`` x ``height`` is read
    by Pillow instead: FFmpeg found no size, or it is a TIFF whose compression
    FFmpeg decodes as black (only then is the header read)."""
    if _plugin(codec) is None:
        return False
    if width > 0 and height > 0 and codec != "tiff":
        return False
    try:
        with _opened(uri, codec) as image:
            compression = image.info.get("compression")
    except NotAPillowStill:
        return False
    return width <= 0 or height <= 0 or compression in _BLACK_IN_FFMPEG


def still_size(uri: str, codec: str) -> tuple[int, int]:
    """(width, height) of the still at ``uri`` as shown (its EXIF orientation applied),
    from the header alone."""
    with _opened(uri, codec) as image:
        tags = getattr(image, "tag_v2", {})
        if 256 in tags and 257 in tags:  # a TIFF: its ImageWidth and ImageLength as stored
            width, height = tags[256], tags[257]  # (newer Pillow gives its size turned)
        else:
            width, height = image.size
        if _orientation(image) in _SIDES_SWAPPED:
            width, height = height, width
    return int(width), int(height)


def still_rgb(uri: str, codec: str) -> np.ndarray:
    """The still at ``uri`` (its first page) as (H, W, 3) uint8 RGB, as shown: turned
    and mirrored as its EXIF orientation says, transparency composited over white.
    16-bit and 32-bit integer grey keep their top 8 bits; float grey is read as 0-1
    (clipped, NaN as 0), as FFmpeg reads float pixels."""
    from PIL import ImageOps

    with _opened(uri, codec) as image:
        try:
            image.load()  # newer Pillow turns a TIFF here, and drops its orientation tag
        except (OSError, ValueError, SyntaxError, IndexError, EOFError) as exc:
            raise ValueError(
                f"{_kind(image)} that FFmpeg cannot decode, and Pillow fails on: {exc}"
            ) from exc
        return _rgb8(ImageOps.exif_transpose(image))


def _kind(image: Any) -> str:
    """What the image is, in words: "a TIFF image (zstd compression)", say."""
    compression = str(image.info.get("compression") or "raw").removeprefix("tiff_")
    return f"a {image.format} image" + (
        "" if compression == "raw" else f" ({compression} compression)"
    )


def _rgb8(image: Any) -> np.ndarray:
    mode = image.mode
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        grey = np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif mode == "I" or mode.startswith("I;16"):
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = np.right_shift(values, 8).astype(np.uint8)
    else:
        return over_white(np.asarray(image.convert("RGBA")))
    return np.repeat(grey[..., None], 3, axis=2)
