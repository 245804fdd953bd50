"""HEIC/HEIF photos, decoded with libheif (the optional ``pillow-heif``).

A phone's HEIC stores its picture as a grid of 512x512 HEVC tiles, which FFmpeg hands
out one tile at a time; libheif assembles the grid and applies the stored rotation and
mirroring. Probe sends a HEVC-coded HEIF still here (:func:`is_heif_still`); other
HEIF brands (AVIF) stay with FFmpeg. Install with ``pip install 'reelpack[heif]'``;
without it such a file is an error row that says so.

libheif decodes from memory: a file is read whole (never to disk), up to
:data:`MAX_BYTES`.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from pipeline.video import over_white

__all__ = ["HEIF_BRANDS", "MAX_BYTES", "heif_rgb", "heif_size", "is_heif_still", "read_heif"]

MAX_BYTES = 256 << 20
# ISO BMFF major brands of HEVC-coded HEIF images ("mif1": any HEIF image)
HEIF_BRANDS = frozenset({"heic", "heix", "heim", "heis", "mif1"})


def is_heif_still(brand: str | None, codec: str) -> bool:
    """Whether a container of major ``brand`` whose (first) video stream has ``codec``
    is a HEVC-coded HEIF image."""
    return brand in HEIF_BRANDS and codec == "hevc"


def _open(data: bytes) -> Any:
    try:
        import pillow_heif
    except ImportError:
        raise ValueError(
            "a HEIC/HEIF image: reading one needs pillow-heif (pip install 'reelpack[heif]')"
        ) from None
    return pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)


def read_heif(uri: str) -> bytes:
    """The whole file at ``uri`` (local path, ``file://`` or ``s3://``), at most
    :data:`MAX_BYTES`."""
    from pipeline.storage import read_limited

    return read_limited(uri, MAX_BYTES, "a HEIC/HEIF image")


def heif_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the primary image as shown (rotation applied), from the
    header alone."""
    width, height = _open(data).size
    return int(width), int(height)


def heif_rgb(data: bytes) -> np.ndarray:
    """The primary image as (H, W, 3) uint8 RGB, as shown: the tile grid assembled,
    rotated and mirrored as stored, transparency composited over white."""
    image = _open(data)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 4:
        return over_white(pixels)
    return np.ascontiguousarray(pixels[..., :3])
