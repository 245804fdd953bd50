"""Streams whose frame size changes mid-file (broadcast captures, joined recordings,
adaptive-bitrate captures): a picture of another aspect ratio starts a clip of its own
at its own size; the same aspect ratio at another resolution goes on as before."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.stages.base import batch_to_rows, rows_to_batch
from pipeline.stages.probe import Probe, describe
from pipeline.stages.split import Split, shots
from pipeline.stitching import RangeStitcher, expand_ranges
from pipeline.synth import iter_synth_frames, resized_stream

FPS = 24.0


def _frames(width: int, height: int, count: int, seed: int) -> list[np.ndarray]:
    return list(iter_synth_frames(width, height, [count], seed))


def _letterboxed(frames: list[np.ndarray], bar: int) -> list[np.ndarray]:
    out = []
    for f in frames:
        f = f.copy()
        f[:bar], f[-bar:] = 0, 0
        out.append(f)
    return out


def _split(cfg, path: str) -> list[dict]:
    return batch_to_rows(Split(cfg.split)(Probe(cfg.probe)(rows_to_batch([{"source": path}]))))


def _payload_size(payload: bytes) -> tuple[int, int, int]:
    with av.open(io.BytesIO(payload)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    sizes = {f.shape[:2] for f in frames}
    assert len(sizes) == 1, sizes
    h, w = sizes.pop()
    return w, h, len(frames)


@pytest.fixture(scope="module")
def aspect_change(tmp_path_factory) -> str:
    """16:9, then 1:1 with letterbox bars from frame 48, then 16:9 again from frame 96."""
    path = str(tmp_path_factory.mktemp("resized") / "aspect change.mkv")
    parts = [
        _frames(320, 180, 48, seed=1),
        _letterboxed(_frames(240, 240, 48, seed=2), bar=40),
        _frames(320, 180, 48, seed=3),
    ]
    resized_stream(path, parts, fps=FPS)
    return path


def test_a_picture_of_another_aspect_ratio_is_a_clip_of_its_own(aspect_change) -> None:
    cfg = load_config(split={"work_fps": None})
    rows = _split(cfg, aspect_change)
    assert {r["src_error"] for r in rows} == {None}
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 48), (48, 96), (96, 144)]
    # each clip's payload holds its own picture, unstretched, and its row says its size
    assert [_payload_size(r["clip_bytes"]) for r in rows] == [
        (320, 180, 48),
        (240, 160, 48),  # the square picture, its bars cropped off
        (320, 180, 48),
    ]
    assert [(r["width"], r["height"]) for r in rows] == [(320, 180), (240, 240), (320, 180)]
    assert [r["crop"] for r in rows] == [None, [0, 40, 240, 160], None]
    assert rows[1]["start_s"] == pytest.approx(2.0) and rows[1]["end_s"] == pytest.approx(4.0)
    # `reelpack shots` cuts where a build does
    assert [(s["start_frame"], s["end_frame"]) for s in shots(aspect_change)] == [
        (0, 48),
        (48, 96),
        (96, 144),
    ]


def _one_scene_resized(path: str, size: tuple[int, int], seed: int) -> list[dict]:
    """Split a 320x180 scene whose second half is resized to ``size`` mid-shot, with a
    min_scene longer than the video: no detector cut can count."""
    scene = _frames(320, 180, 96, seed=seed)
    resized = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in scene[48:]]
    resized_stream(path, [scene[:48], resized], fps=FPS)
    return _split(load_config(split={"work_fps": None, "min_scene_s": 10.0}), path)


def test_a_size_change_cuts_even_inside_one_shot(tmp_path) -> None:
    """The same scene going on, squeezed into a square picture: the detector may see no
    cut, but no clip may hold pictures of two shapes."""
    path = str(tmp_path / "squeezed.mkv")
    rows = _one_scene_resized(path, (180, 180), seed=4)
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 48), (48, 96)]
    assert [_payload_size(r["clip_bytes"])[:2] for r in rows] == [(320, 180), (180, 180)]
    long_scenes = load_config(split={"min_scene_s": 10.0}).split
    assert [(s["start_frame"], s["end_frame"]) for s in shots(path, cfg=long_scenes)] == [
        (0, 48),
        (48, 96),
    ]


def test_another_resolution_of_the_same_aspect_ratio_goes_on(tmp_path) -> None:
    """An adaptive-bitrate capture dropping from 320x180 to 160x90 mid-shot: one clip at
    the working size, the smaller frames scaled up to it."""
    rows = _one_scene_resized(str(tmp_path / "abr.mkv"), (160, 90), seed=5)
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 96)]
    assert _payload_size(rows[0]["clip_bytes"]) == (320, 180, 96)
    assert (rows[0]["width"], rows[0]["height"]) == (320, 180)


def test_a_change_of_pixel_shape_alone_is_a_change_of_picture(tmp_path) -> None:
    """An SD channel switching between 4:3 and 16:9 keeps its coded size and changes its
    pixels' shape (the bitstream's sample aspect ratio): 96x64 pixels shown 96x64, then
    twice as wide (192x64), then 96x64 again. Each picture is a clip at its own shape."""
    path = str(tmp_path / "anamorphic.mkv")
    parts = [_frames(96, 64, 30, seed=8), _frames(96, 64, 30, seed=9), _frames(96, 64, 30, seed=10)]
    resized_stream(path, parts, fps=FPS, sars=[Fraction(1), Fraction(2), Fraction(1)])
    cfg = load_config(split={"work_fps": None, "min_scene_s": 10.0, "crop_borders": False})
    rows = _split(cfg, path)
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 30), (30, 60), (60, 90)]
    assert [(r["width"], r["height"]) for r in rows] == [(96, 64), (192, 64), (96, 64)]
    assert [_payload_size(r["clip_bytes"])[:2] for r in rows] == [(96, 64), (192, 64), (96, 64)]


def test_ranges_across_a_size_change_equal_one_range(aspect_change) -> None:
    """A range that starts decoding inside the square part sizes its frames as a whole
    decode does; the stitched clips equal a single-range run."""
    cfg = load_config(split={"work_fps": None, "min_clip_s": 0.5, "max_clip_s": 1.5})
    probed = Probe(cfg.probe)(rows_to_batch([{"source": aspect_change}]))
    whole = batch_to_rows(Split(cfg.split)(probed))
    ranged = expand_ranges(probed, cfg.split, range_frames=40)
    assert len(ranged["source"]) == 4
    stitcher = RangeStitcher()
    out: list[dict] = []
    for i in range(len(ranged["source"])):
        one = {k: v[i : i + 1] for k, v in ranged.items()}
        for batch in stitcher(Split(cfg.split)(one)):
            out.extend(batch_to_rows(batch))
    keys = ("start_frame", "end_frame", "width", "height", "crop")
    assert [[r[k] for k in keys] for r in out] == [[r[k] for k in keys] for r in whole]
    assert [_payload_size(r["clip_bytes"]) for r in out] == [
        _payload_size(r["clip_bytes"]) for r in whole
    ]
    assert {r["start_frame"] for r in whole} >= {48, 96}


def test_the_corpus_keeps_the_source_size_and_each_clip_its_own(tmp_path) -> None:
    """A capture whose first picture is too short for a clip: its only clip is square;
    the sources table still gives the source's size, the index the clip's."""
    from pipeline.graph import run_in_process
    from pipeline.writer import read_index, read_sources

    path = str(tmp_path / "short then square.mkv")
    resized_stream(path, [_frames(320, 180, 8, seed=6), _frames(240, 240, 40, seed=7)], fps=FPS)
    cfg = load_config(preset="tiny", model_cache=str(tmp_path / "models"))
    out = str(tmp_path / "corpus")
    run_in_process([path], out, cfg)
    (source,) = read_sources(out).to_pylist()
    assert (source["width"], source["height"]) == (320, 180)
    assert source["status"] == "done" and source["num_clips"] == 1
    (clip,) = read_index(out).to_pylist()
    assert (clip["width"], clip["height"]) == (240, 240) and clip["start_frame"] == 8
    assert clip["encode_src_width"] == clip["encode_src_height"]  # square, unstretched


def test_an_error_without_a_message_is_named_by_its_type() -> None:
    assert describe(AssertionError()) == "AssertionError"
    assert describe(ValueError("bad header")) == "bad header"
