"""The detection frame split computes at its small size against what PySceneDetect's
own loop computes: FFmpeg's conversion of the whole frame to BGR, then OpenCV's linear
resize."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest

from pipeline.decode import _bgr_tables, _detection_frame, _natural_detection_size, _planes

# FFmpeg's colorspace and range tags: unspecified, BT.709, BT.601 (FCC, 470BG, SMPTE
# 170M), BT.2020 non-constant; limited (MPEG) and full (JPEG) range
TAGS = [(2, 1), (1, 1), (1, 2), (5, 1), (6, 2), (9, 1), (4, 1)]


def _frame(width: int, height: int, seed: int, colorspace: int, color_range: int) -> av.VideoFrame:
    """A 4:2:0 frame of smooth noise (every level present), tagged as given."""
    rng = np.random.default_rng(seed)
    planes = [
        cv2.resize(rng.integers(0, 256, (h // 8, w // 8), dtype=np.uint8), (w, h))
        for w, h in ((width, height), (width // 2, height // 2), (width // 2, height // 2))
    ]
    planes[0] = cv2.add(planes[0], rng.integers(0, 8, (height, width), dtype=np.uint8))
    data = np.concatenate([p.ravel() for p in planes]).reshape(height * 3 // 2, width)
    frame = av.VideoFrame.from_ndarray(data, format="yuv420p")
    frame.colorspace, frame.color_range = colorspace, color_range
    return frame


@pytest.mark.parametrize(("colorspace", "color_range"), TAGS)
def test_the_lookup_tables_are_ffmpegs_conversion(colorspace: int, color_range: int) -> None:
    frame = _frame(320, 240, colorspace, colorspace, color_range)
    y, u, v, _ = _planes(frame)
    blue, green, red = _bgr_tables(colorspace, color_range)
    ys = y.astype(np.int32) << 8
    us = np.repeat(np.repeat(u, 2, axis=0), 2, axis=1).astype(np.int32)
    vs = np.repeat(np.repeat(v, 2, axis=0), 2, axis=1).astype(np.int32)
    looked_up = np.dstack([blue[ys | us], green[(ys | us) << 8 | vs], red[ys | vs]])
    assert np.array_equal(looked_up, frame.reformat(format="bgr24").to_ndarray())


@pytest.mark.parametrize(("colorspace", "color_range"), TAGS[:3])
def test_an_odd_whole_scale_equals_pyscenedetects_frame_bit_for_bit(
    colorspace: int, color_range: int
) -> None:
    frame = _frame(1280, 720, 7, colorspace, color_range)
    size = _natural_detection_size(1280, 720, 256)
    assert size == (256, 144)  # a scale of 5: the linear resize reads single pixels
    theirs = cv2.resize(frame.to_ndarray(format="bgr24"), size, interpolation=cv2.INTER_LINEAR)
    y, u, v, _ = _planes(frame)
    ours = _detection_frame(y, u, v, colorspace, color_range, size)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (640, 360), (854, 480), (720, 1280)])
def test_other_scales_stay_close(width: int, height: int) -> None:
    frame = _frame(width, height, 3, 1, 1)
    size = _natural_detection_size(width, height, 256)
    theirs = cv2.resize(frame.to_ndarray(format="bgr24"), size, interpolation=cv2.INTER_LINEAR)
    y, u, v, _ = _planes(frame)
    ours = _detection_frame(y, u, v, 1, 1, size)
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert ours.shape == theirs.shape
    # interpolated before the conversion instead of after: apart at sharp colour edges
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8
