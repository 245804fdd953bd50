"""Stills FFmpeg decodes wrong or not at all (a TIFF with JPEG, LZMA or Zstandard
compression, a float TIFF, a PNG over FFmpeg's size limit) are read by Pillow
(:mod:`pipeline.stills`): a one-frame clip of the picture as shown, or an error row
naming the size limit it breaks; the stills FFmpeg reads stay with FFmpeg, whatever
image format its demuxer reads them as."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from still_images import payload, photo, probe_split

from pipeline.sources import expand_sources
from pipeline.stages.split import shots
from pipeline.stills import PILLOW_CONTAINER


@pytest.mark.parametrize(
    ("compression", "reader"),
    [
        ("jpeg", PILLOW_CONTAINER),  # FFmpeg: a black picture, no error
        ("tiff_jpeg", PILLOW_CONTAINER),  # the same, old-style JPEG tags
        ("lzma", PILLOW_CONTAINER),  # FFmpeg: "Function not implemented"
        ("zstd", PILLOW_CONTAINER),  # FFmpeg: "Invalid data found"
        ("tiff_lzw", "tiff_pipe"),  # FFmpeg reads it
        ("tiff_deflate", "tiff_pipe"),
    ],
)
def test_a_tiff_is_read_by_whatever_decodes_it_right(
    tmp_path: os.PathLike[str], compression: str, reader: str
) -> None:
    image = photo(1)
    path = os.path.join(tmp_path, f"scan {compression}.tif")
    Image.fromarray(image).save(path, compression=compression)
    row, (clip,) = probe_split(path)
    assert row["src_status"] == "done" and row["src_media_kind"] == "image"
    assert row["src_container"] == reader and (row["width"], row["height"]) == (160, 96)
    assert clip["status"] == "kept" and (clip["start_frame"], clip["end_frame"]) == (0, 1)
    assert float(np.abs(payload(clip) - image).mean()) < 8
    assert shots(path) == [{"start_frame": 0, "end_frame": 1, "start_s": 0.0, "end_s": 1.0}]


def test_a_jpeg_tiff_is_shown_as_its_orientation_says(tmp_path: os.PathLike[str]) -> None:
    image = photo(2)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter clockwise
    path = os.path.join(tmp_path, "portrait.tif")
    Image.fromarray(image).save(path, compression="jpeg", exif=exif)
    row, (clip,) = probe_split(path)
    assert row["src_container"] == PILLOW_CONTAINER
    assert (row["width"], row["height"]) == (96, 160)
    assert float(np.abs(payload(clip) - np.rot90(image, k=-1)).mean()) < 8


def test_a_float_tiff_is_read_as_0_to_1(tmp_path: os.PathLike[str]) -> None:
    """FFmpeg finds no frame size in a 32-bit float TIFF."""
    ramp = np.tile(np.linspace(0.0, 1.0, 160, dtype=np.float32), (96, 1))
    ramp[:8] = 3.0  # over 1: white
    ramp[8:16] = np.nan  # black
    path = os.path.join(tmp_path, "depth.tif")
    Image.fromarray(ramp, mode="F").save(path)
    row, (clip,) = probe_split(path)
    assert row["src_status"] == "done" and row["src_container"] == PILLOW_CONTAINER
    grey = payload(clip).mean(axis=2)
    expected = np.round(np.nan_to_num(np.clip(ramp, 0, 1), nan=0.0) * 255)
    assert float(np.abs(grey[20:-4, 4:-4] - expected[20:-4, 4:-4]).mean()) < 6
    assert grey[2:6].mean() > 240 and grey[10:14].mean() < 20


def test_a_png_over_ffmpegs_size_limit_is_refused_by_its_size(tmp_path: os.PathLike[str]) -> None:
    """FFmpeg gives a PNG of (w + 128) * (h + 128) >= 2^28 pixels no size at all; its
    header says 1900000x20, which the pixel limit refuses before anything is decoded."""
    path = os.path.join(tmp_path, "panorama.png")
    Image.new("L", (1_900_000, 20)).save(path)
    row, (placeholder,) = probe_split(path)
    assert row["src_status"] == "error" and path in row["src_error"]
    assert "frame size 1900000x20 exceeds 33177600 pixels (max_pixels)" in row["src_error"]
    assert placeholder["clip_id"] is None


def test_a_jpeg_tiff_on_s3_is_read_like_a_local_one(
    tmp_path: os.PathLike[str], s3_bucket: str
) -> None:
    from pipeline.storage import storage_for

    path = os.path.join(tmp_path, "scan.tif")
    Image.fromarray(photo(3)).save(path, compression="jpeg")
    uri = f"{s3_bucket}/stills/scan.tif"
    storage_for(uri).upload(path, uri)
    _, (local,) = probe_split(path)
    row, (remote,) = probe_split(uri)
    assert row["src_status"] == "done" and row["src_container"] == PILLOW_CONTAINER
    assert remote["source"] == uri
    assert np.array_equal(payload(remote), payload(local))


def test_a_still_neither_decodes_is_an_error_row_naming_both(tmp_path: os.PathLike[str]) -> None:
    """A Zstandard TIFF whose compressed strip is garbage: FFmpeg and Pillow fail on
    it, and the row says so."""
    path = os.path.join(tmp_path, "garbled.tif")
    Image.fromarray(photo(4)).save(path, compression="zstd")
    with Image.open(path) as image:
        (offset,), (length,) = image.tag_v2[273], image.tag_v2[279]  # the strip
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * length)
    row, (placeholder,) = probe_split(path)
    assert row["src_status"] == "error" and path in row["src_error"]
    assert (
        "a TIFF image (zstd compression) that FFmpeg cannot decode, and Pillow fails on:"
        in (row["src_error"])
    )
    assert placeholder["clip_id"] is None


@pytest.mark.parametrize("extension", ["tga", "ppm", "pgm", "pcx", "sgi", "qoi", "jp2"])
def test_a_still_in_another_image_format_is_an_image(
    tmp_path: os.PathLike[str], extension: str
) -> None:
    """FFmpeg's image demuxers read TGA, Netpbm, PCX, SGI, QOI and JPEG 2000 as one-frame
    streams: each is an image (a 1-frame clip), not a 1-frame video too short to cut."""
    image = photo(5)
    if extension == "pgm":
        image = np.repeat(np.asarray(Image.fromarray(image).convert("L"))[..., None], 3, axis=2)
    path = os.path.join(tmp_path, f"frame.{extension}")
    Image.fromarray(image).save(path)
    if extension not in ("pcx", "sgi"):
        assert expand_sources([str(tmp_path)]) == [path]  # found in folders
    row, (clip,) = probe_split(path)
    assert row["src_status"] == "done" and row["src_media_kind"] == "image"
    assert clip["status"] == "kept" and (clip["start_frame"], clip["end_frame"]) == (0, 1)
    assert float(np.abs(payload(clip) - image).mean()) < 8
