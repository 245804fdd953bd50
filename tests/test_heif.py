"""HEIC/HEIF photos: decoded by libheif (pillow-heif, the ``heif`` extra), as shown
(rotation applied, the primary image of several), checked against the size limits
before decoding; without the extra, an error row that names it."""

from __future__ import annotations

import os
import sys

import numpy as np
import pillow_heif
import pytest
from PIL import Image
from still_images import payload, photo, probe_split

from pipeline.sources import expand_sources
from pipeline.stages.split import shots

pillow_heif.register_heif_opener()


def test_a_heic_photo_is_a_one_frame_clip(tmp_path: os.PathLike[str]) -> None:
    image = photo(1)
    path = os.path.join(tmp_path, "IMG_0001.HEIC")
    Image.fromarray(image).save(path, quality=95)
    assert expand_sources([str(tmp_path)]) == [path]  # found in folders
    row, (clip,) = probe_split(path)
    assert row["src_status"] == "done" and row["src_media_kind"] == "image"
    assert (row["width"], row["height"]) == (160, 96) and row["src_container"] == "heif"
    assert (clip["start_frame"], clip["end_frame"]) == (0, 1) and clip["status"] == "kept"
    assert float(np.abs(payload(clip) - image).mean()) < 8
    assert shots(path) == [{"start_frame": 0, "end_frame": 1, "start_s": 0.0, "end_s": 1.0}]


def test_a_rotated_photo_is_upright(tmp_path: os.PathLike[str]) -> None:
    """Stored rotation (EXIF orientation 6, written as HEIF's own transform) applies."""
    image = photo(2)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    path = os.path.join(tmp_path, "portrait.heic")
    Image.fromarray(image).save(path, exif=exif.tobytes(), quality=95)
    row, (clip,) = probe_split(path)
    assert (row["width"], row["height"]) == (96, 160)
    assert float(np.abs(payload(clip) - np.rot90(image, k=-1)).mean()) < 8


def test_the_primary_image_of_several_is_the_photo(tmp_path: os.PathLike[str]) -> None:
    first, second = photo(3), photo(4)
    stored = pillow_heif.from_pillow(Image.fromarray(first))
    stored.add_from_pillow(Image.fromarray(second))
    path = os.path.join(tmp_path, "burst.heic")
    stored.save(path, quality=95)
    _, (clip,) = probe_split(path)
    assert float(np.abs(payload(clip) - first).mean()) < 8
    assert float(np.abs(payload(clip) - second).mean()) > 20


def test_the_size_limit_is_checked_before_decoding(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "big.heic")
    Image.fromarray(photo(5)).save(path)
    row, (placeholder,) = probe_split(path, max_pixels=100 * 96)
    assert row["src_status"] == "error" and "160x96 exceeds" in row["src_error"]
    assert placeholder["clip_id"] is None and path in placeholder["src_error"]


def test_without_the_extra_a_heic_is_an_error_row_naming_it(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = os.path.join(tmp_path, "photo.heic")
    Image.fromarray(photo(6)).save(path)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails
    row, _ = probe_split(path)
    assert row["src_status"] == "error" and path in row["src_error"]
    assert "pip install 'reelpack[heif]'" in row["src_error"]
