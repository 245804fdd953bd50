"""Probe and split: generated videos with known cuts, real videos for metadata,
bad files as error rows. Run: ``python -m pytest tests/test_probe_split.py -q``."""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import struct
import types
import uuid
from collections.abc import Iterator
from dataclasses import replace
from fractions import Fraction
from typing import Any

import av
import cv2
import numpy as np
import pytest

from pipeline.decode import (
    DecodedFrame,
    frame_pts_table,
    iter_pyav,
    iter_source_frames,
    rgb_to_i420,
    rising_pts,
)
from pipeline.stages import split as split_mod
from pipeline.stages.base import batch_to_rows, stage_task
from pipeline.stages.encode import EncodeConfig, plan_clip
from pipeline.stages.probe import (
    Probe,
    ProbeConfig,
    _film_like,
    _idet,
    container_facts,
    open_source,
    probe_video,
)
from pipeline.stages.split import (
    CLIP_NAMESPACE,
    Split,
    SplitConfig,
    _Frame,
    _SourceSplitter,
    border_crop,
    chunks_by_time,
    clip_spans,
    crop_i420,
    cut_clips,
    detect_shots,
    frame_ranges,
    shots,
    stitch,
)
from pipeline.synth import demo_videos, synth_video
from pipeline.video import (
    RAW_STREAM_FORMATS,
    decode_mp4,
    encode_mp4,
    even_size,
    resample_indices,
    telecine_repeats,
)
from schemas import STREAM_COLUMNS

VIDEOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "videos")
if not os.path.isdir(VIDEOS):
    VIDEOS = "/work/shared/videos"


def shared(name: str) -> str:
    path = os.path.join(VIDEOS, name)
    if not os.path.exists(path):
        pytest.skip(f"shared test video {name} not available")
    return path


SHOTS = [30, 42, 26, 36]  # frames per shot at 24 fps: 1.25 s, 1.75 s, 1.08 s, 1.5 s


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def landscape(synth_dir: str) -> tuple[str, list[int]]:
    path = os.path.join(synth_dir, "landscape.mp4")
    return path, synth_video(path, width=160, height=90, fps=24, shots=SHOTS, seed=0)


def _iter_frames(
    container: Any, display: tuple[int, int] | None, max_area: int
) -> Iterator[tuple[DecodedFrame, float]]:
    for frame in iter_pyav(container, display, max_area):
        yield frame, frame.duration_s


def probe_batch(*sources: str) -> dict[str, np.ndarray]:
    column = np.empty(len(sources), dtype=object)
    column[:] = list(sources)
    return Probe(ProbeConfig())({"source": column})


def decoded(path: str, max_area: int = 160 * 90) -> list[np.ndarray]:
    with open_source(path) as container:
        return [frame.rgb() for frame, _ in _iter_frames(container, None, max_area)]


# --- synthetic videos and shot detection -------------------------------------------------


def test_synth_returns_cut_frames_and_writes_every_frame(landscape: tuple[str, list[int]]) -> None:
    path, cuts = landscape
    assert cuts == [30, 72, 98]
    facts = probe_video(path)
    assert facts["num_frames"] == sum(SHOTS)
    assert (facts["display_width"], facts["display_height"]) == (160, 90)
    assert facts["fps"] == pytest.approx(24.0)


@pytest.mark.parametrize(("width", "height"), [(160, 90), (90, 160), (128, 128)])
def test_detected_boundaries_match_known_cuts(synth_dir: str, width: int, height: int) -> None:
    path = os.path.join(synth_dir, f"cuts_{width}x{height}.mp4")
    cuts = synth_video(path, width=width, height=height, fps=24, shots=SHOTS, seed=width)
    found = shots(path)
    starts = [s["start_frame"] for s in found]
    assert len(starts) == len(SHOTS), found
    assert starts[0] == 0 and found[-1]["end_frame"] == sum(SHOTS)
    for got, want in zip(starts[1:], cuts, strict=True):
        assert abs(got - want) <= 1, (starts, cuts)
    # times come from the frames' pts: shot k starts at cut / fps
    for shot, want in zip(found[1:], cuts, strict=True):
        assert shot["start_s"] == pytest.approx(shot["start_frame"] / 24.0, abs=1e-3)
        assert abs(shot["start_s"] - want / 24.0) <= 1 / 24.0 + 1e-6
    assert found[-1]["end_s"] == pytest.approx(sum(SHOTS) / 24.0, abs=1e-3)


@pytest.mark.parametrize("detector", ["content", "histogram"])
def test_other_detectors_find_the_cuts(landscape: tuple[str, list[int]], detector: str) -> None:
    path, cuts = landscape
    found = detect_shots(decoded(path), 24.0, SplitConfig(detector=detector))
    starts = [a for a, _ in found[1:]]
    assert len(starts) == len(cuts)
    assert all(abs(a - b) <= 1 for a, b in zip(starts, cuts, strict=True)), (starts, cuts)


def test_unknown_detector_is_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="unknown detector"):
        Split(SplitConfig(detector="nope"))


def test_demo_videos_are_small_and_varied(tmp_path: os.PathLike[str]) -> None:
    paths = demo_videos(str(tmp_path))
    assert len(paths) == 6
    aspects = set()
    for path in paths:
        facts = probe_video(path)
        assert 2.0 <= facts["duration_s"] <= 4.0 + 1e-6
        assert max(facts["width"], facts["height"]) <= 320
        aspects.add(round(facts["width"] / facts["height"], 2))
    assert {1.78, 0.56, 1.0, 1.33} <= aspects
    dark = next(p for p in paths if "dark" in p)
    frames = decoded(dark, 320 * 180)
    assert frames[-1].mean() < 16 < frames[0].mean()


# --- clip rules ----------------------------------------------------------------------------


def test_short_shots_are_dropped_and_long_ones_chunked() -> None:
    cfg = SplitConfig(min_clip_s=1.0, max_clip_s=2.0)
    fps = 10.0
    assert clip_spans(0, 9, fps, cfg) == []  # 0.9 s < min
    assert clip_spans(0, 10, fps, cfg) == [(0, 10)]
    assert clip_spans(5, 25, fps, cfg) == [(5, 25)]  # exactly max
    assert clip_spans(0, 21, fps, cfg) == [(0, 10), (10, 21)]  # similar halves
    spans = cut_clips([(0, 9), (9, 104), (104, 120)], fps, cfg)
    long = [s for s in spans if s[1] <= 104]
    assert long[0][0] == 9 and long[-1][1] == 104  # the long shot is covered end to end
    assert all(b == c for (_, b), (c, _) in itertools.pairwise(long))
    lengths = [b - a for a, b in long]
    assert all(10 <= n <= 20 for n in lengths) and max(lengths) - min(lengths) <= 10
    assert spans[-1] == (104, 120)


def test_chunks_respect_min_even_when_min_exceeds_half_max() -> None:
    cfg = SplitConfig(min_clip_s=1.5, max_clip_s=2.0)
    spans = clip_spans(0, 25, 10.0, cfg)  # halves of 12.5 frames would be under 15
    assert spans == [(0, 20)]
    for start, end in [(0, 15), (0, 47), (3, 100), (0, 61)]:
        for a, b in clip_spans(start, end, 10.0, cfg):
            assert 15 <= b - a <= 20 and start <= a < b <= end


@pytest.mark.parametrize("fps", [24.0, 29.97, 30000 / 1001])
def test_frame_limits_tolerate_fractional_rates(fps: float) -> None:
    cfg = SplitConfig(min_clip_s=1.0, max_clip_s=2.0)
    spans = clip_spans(0, 1000, fps, cfg)
    assert spans[0][0] == 0 and spans[-1][1] == 1000
    assert all(1.0 <= (b - a) / fps <= 2.0 for a, b in spans)
    n = int(2.0 * fps + 1e-6)  # the most frames that fit in 2.0 s
    assert clip_spans(0, n, fps, cfg) == [(0, n)]
    assert len(clip_spans(0, n + 1, fps, cfg)) == 2


# --- streaming split -------------------------------------------------------------------


def test_split_batch_with_good_and_bad_sources(
    landscape: tuple[str, list[int]], tmp_path: os.PathLike[str]
) -> None:
    good, _ = landscape
    empty = os.path.join(tmp_path, "empty.mp4")
    text = os.path.join(tmp_path, "notes.mp4")
    open(empty, "wb").close()
    with open(text, "w") as f:
        f.write("this is not a video\n")
    probed = probe_batch(good, empty, text)
    assert list(probed["src_status"]) == ["done", "error", "error"]
    out = Split(SplitConfig())(probed)
    rows = batch_to_rows(out)
    clips = [r for r in rows if r["source"] == good]
    expected = cut_clips(detect_shots(decoded(good), 24.0, SplitConfig()), 24.0, SplitConfig())
    assert [(r["start_frame"], r["end_frame"]) for r in clips] == expected
    assert len(clips) == len(SHOTS)  # every synthetic shot is 1-2 s: one clip each
    for r in clips:
        assert r["status"] == "kept" and list(r["reasons"]) == []
        assert r["src_status"] == "done" and r["src_num_clips"] == len(SHOTS)
        assert r["src_codec"] == "h264" and r["src_num_frames"] == sum(SHOTS)
        assert (r["width"], r["height"]) == (160, 90) and r["fps"] == pytest.approx(24.0)
    for bad, why in ((empty, "an empty file (0 bytes)"), (text, "Invalid data")):
        (row,) = [r for r in rows if r["source"] == bad]
        assert row["clip_id"] is None and row["clip_bytes"] is None
        assert row["src_status"] == "error" and row["src_num_clips"] == 0
        assert bad in row["src_error"] and why in row["src_error"]
    assert set(out) <= set(STREAM_COLUMNS)


def test_clip_bytes_decode_to_the_recorded_frames(landscape: tuple[str, list[int]]) -> None:
    path, _ = landscape
    out = Split(SplitConfig(work_max_area=96 * 54))(probe_batch(path))
    for row in batch_to_rows(out):
        frames, fps = decode_mp4(row["clip_bytes"])
        assert frames.shape == (row["end_frame"] - row["start_frame"], 54, 96, 3)
        assert fps == pytest.approx(24.0)
        assert row["start_s"] == pytest.approx(row["start_frame"] / 24.0, abs=1e-3)
        assert row["end_s"] == pytest.approx(row["end_frame"] / 24.0, abs=1e-3)


def moving_bar_video(path: str, n: int, fps: float) -> str:
    """``n`` frames of 96x48 at ``fps``: a bright bar moving 2 px a frame on grey."""
    frames = np.full((n, 48, 96, 3), 40, np.uint8)
    for i in range(n):
        frames[i, 16:32, 2 * i : 2 * i + 8] = 230
    with open(path, "wb") as f:
        f.write(encode_mp4(frames, fps, crf=10))
    return path


def test_payload_at_work_fps_holds_the_frames_the_vae_sees(tmp_path: Any) -> None:
    """With ``work_fps`` a payload keeps only the frames on the encode stage's frame-rate
    grid, and encode then picks the same source frames as from a full-rate payload."""
    n, fps = 36, 24.0
    path = moving_bar_video(str(tmp_path / "bar.mp4"), n, fps)
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=10.0, work_max_area=96 * 48)
    (full,) = batch_to_rows(Split(cfg)(probe_batch(path)))
    (low,) = batch_to_rows(Split(replace(cfg, work_fps=8.0))(probe_batch(path)))
    assert (low["clip_id"], low["start_frame"], low["end_frame"]) == (full["clip_id"], 0, n)
    assert low["end_s"] == pytest.approx(full["end_s"])
    a, fps_a = decode_mp4(full["clip_bytes"])
    b, fps_b = decode_mp4(low["clip_bytes"])
    assert (len(a), fps_a, fps_b) == (n, pytest.approx(24.0), pytest.approx(8.0))
    keep = resample_indices(n, fps, 8.0)
    assert keep.tolist() == list(range(0, n, 3)) and len(b) == len(keep)
    for j, i in enumerate(keep):  # each kept frame is that source frame
        mad = np.abs(b[j].astype(np.int16) - a.astype(np.int16)).mean(axis=(1, 2, 3))
        assert int(mad.argmin()) == i, (j, mad.round(1))
    enc = EncodeConfig(target_fps=8.0, max_frames=64)
    from_full = plan_clip(n, fps_a, 96, 48, enc, 8, 4).frame_indices
    from_low = plan_clip(len(b), fps_b, 96, 48, enc, 8, 4).frame_indices
    assert keep[from_low].tolist() == from_full.tolist()
    assert len(from_low) > 1


def test_a_sparse_vae_rate_leaves_score_two_frames_per_clip(tmp_path: Any) -> None:
    """``encode.target_fps`` below two frames in the shortest clip: a build's payloads
    keep two frames, so score measures motion, and encode still takes its own rate."""
    from pipeline.config import load_config
    from pipeline.stages.score import score_payload

    path = moving_bar_video(str(tmp_path / "bar.mp4"), 36, 24.0)  # 1.5 s
    split = {"min_clip_s": 1.0, "max_clip_s": 10.0, "work_max_area": 96 * 48}
    cfg = load_config(encode={"target_fps": 0.5}, split=split)
    (row,) = batch_to_rows(Split(cfg.split)(probe_batch(path)))
    clip, clip_fps = decode_mp4(row["clip_bytes"])
    assert (len(clip), clip_fps) == (3, pytest.approx(2.0))  # 0, 0.5 and 1.0 s
    values, _ = score_payload(row["clip_bytes"])
    assert values["motion"] > 0.01 and values["still_fraction"] == 0  # every pair moves
    assert plan_clip(len(clip), clip_fps, 96, 48, cfg.encode, 8, 4).frame_indices.tolist() == [0]


def test_stream_hands_clips_on_in_chunks(landscape: tuple[str, list[int]]) -> None:
    """Split.stream (what a build runs) gives __call__'s rows in chunks as payloads
    finish; only the last chunk carries the source's totals."""
    path, _ = landscape
    cfg = SplitConfig(work_max_area=96 * 54, flush_mib=1e-6)  # hand on every clip
    whole = batch_to_rows(Split(cfg)(probe_batch(path)))
    chunks = [batch_to_rows(c) for c in Split(cfg).stream(probe_batch(path))]
    assert len(whole) == 4 and len(chunks) >= 2
    # the same chunks every time (a retried Ray task must cut the same ones)
    again = [list(c["clip_id"]) for c in Split(cfg).stream(probe_batch(path))]
    assert again == [[r["clip_id"] for r in c] for c in chunks]
    streamed = [r for c in chunks for r in c]
    keys = ("clip_id", "start_frame", "end_frame", "start_s", "end_s")
    assert [[r[k] for k in keys] for r in streamed] == [[r[k] for k in keys] for r in whole]
    for a, b in zip(streamed, whole, strict=True):
        assert len(decode_mp4(a["clip_bytes"])[0]) == b["end_frame"] - b["start_frame"]
    assert all(r["src_num_clips"] is None for c in chunks[:-1] for r in c)
    assert chunks[-1] and all(r["src_num_clips"] == 4 for r in chunks[-1])
    assert chunks[-1][0]["src_num_frames_exact"]
    # the build's task wrapper hands Ray Data the generator itself
    run = stage_task(Split, cfg)(probe_batch(path))
    assert isinstance(run, types.GeneratorType)
    assert [r["clip_id"] for c in run for r in batch_to_rows(c)] == [r["clip_id"] for r in whole]
    # without a flush size everything comes at the end, as one chunk
    (one,) = list(Split(replace(cfg, flush_mib=0)).stream(probe_batch(path)))
    assert list(one["src_num_clips"]) == [4] * 4


def test_corrupt_data_ends_the_stream_and_the_clips_before_it_stand(
    landscape: tuple[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FFmpeg's "invalid data" that decoding cannot go past (a broken container, a file
    cut off mid-frame; a packet that fails to decode is decoded past instead, see
    test_bad_inputs) ends the source there, as the end of the stream would: its shots
    before stand, streamed or not, and the source's note says where and why decoding
    stopped."""
    path, _ = landscape
    real = split_mod.iter_source_frames

    def breaks_at_frame_125(*args: Any, **kwargs: Any) -> Iterator[DecodedFrame]:
        for frame in real(*args, **kwargs):
            if frame.num == 125:
                raise av.InvalidDataError(1094995529, "Invalid data found when processing input")
            yield frame

    monkeypatch.setattr(split_mod, "iter_source_frames", breaks_at_frame_125)
    cfg = SplitConfig(work_max_area=96 * 54, flush_mib=1e-6)
    chunks = [batch_to_rows(c) for c in Split(cfg).stream(probe_batch(path))]
    *early, last = chunks
    handed_on = [r for c in early for r in c]
    assert handed_on and all(r["src_num_clips"] is None for r in handed_on)
    streamed = handed_on + last
    assert all(r["src_status"] == "done" for r in streamed)
    assert (
        last[-1]["src_num_clips"] == len(streamed) and max(r["end_frame"] for r in streamed) == 125
    )
    note = last[-1]["src_error"]
    assert note.startswith(f"{path}: decoding stopped after frame 124 (corrupt data: Invalid data")
    # all at once: the same clips and note
    rows = batch_to_rows(Split(replace(cfg, flush_mib=0))(probe_batch(path)))
    assert [r["clip_id"] for r in rows] == [r["clip_id"] for r in streamed]
    assert all(r["src_status"] == "done" and r["src_error"] == note for r in rows)
    # `reelpack shots` stops there too, and says so
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.split"):
        found = shots(path)
    assert found[-1]["end_frame"] == 125
    assert "decoding stopped after frame 124 (corrupt data: Invalid data" in caplog.text


def test_corrupt_data_at_the_first_frame_is_an_error_row(
    landscape: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = landscape

    def breaks_at_once(*args: Any, **kwargs: Any) -> Iterator[DecodedFrame]:
        raise av.InvalidDataError(1094995529, "Invalid data found when processing input")
        yield  # a generator

    monkeypatch.setattr(split_mod, "iter_source_frames", breaks_at_once)
    (row,) = batch_to_rows(Split()(probe_batch(path)))
    assert row["clip_id"] is None and row["src_status"] == "error"
    assert "no frame decodes (corrupt data): Invalid data" in row["src_error"]


def test_clip_ids_are_deterministic(landscape: tuple[str, list[int]]) -> None:
    path, _ = landscape
    first = Split()(probe_batch(path))
    second = Split()(probe_batch(path))
    assert list(first["clip_id"]) == list(second["clip_id"])
    ids = set(first["clip_id"])
    assert len(ids) == len(first["clip_id"])
    row = batch_to_rows(first)[0]
    key = f"{path}|{row['start_frame']}|{row['end_frame']}"
    assert row["clip_id"] == uuid.uuid5(CLIP_NAMESPACE, key).hex


def test_long_shot_streams_in_bounded_memory(synth_dir: str) -> None:
    path = os.path.join(synth_dir, "long.mp4")
    synth_video(path, width=64, height=36, fps=20, shots=[40, 230, 30], seed=7)
    cfg = SplitConfig(min_clip_s=1.0, max_clip_s=1.5, work_max_area=64 * 36)
    frames = decoded(path, 64 * 36)
    splitter = _SourceSplitter(cfg, 20.0)
    peak = 0
    for num, image in enumerate(frames):
        small = splitter.tracker.small_bgr(image)
        splitter.push(_Frame(num, num / 20.0, rgb_to_i420(image)), 1 / 20.0, small)
        peak = max(peak, len(splitter.buffer))
    spans = [(c.start_frame, c.end_frame) for c in splitter.finish()]
    # the streaming result equals the offline rule on the whole video ...
    assert spans == cut_clips(detect_shots(frames, 20.0, cfg), 20.0, cfg)
    assert all(20 <= b - a <= 30 for a, b in spans)
    # ... while holding at most two chunks (+ the detector's delay), not the 230-frame shot
    assert peak <= 2 * 30 + splitter.tracker.delay + 1 < 230


class _LateMarks:
    """A detector like TransNetV2 at a video's end: it reports a cut at frame 20 (at
    frame 22) but judges frames 20-24 part of a transition only once the stream ends."""

    event_buffer_length = 4

    def __init__(self) -> None:
        self.ended = False

    def process_frame(self, timecode: Any, _: np.ndarray) -> list[Any]:
        return [timecode - 2] if timecode.frame_num == 22 else []

    def post_process(self, _: Any) -> list[Any]:
        self.ended = True
        return []

    def in_transition(self, num: int) -> bool | None:
        return 20 <= num < 25 if self.ended else None


def test_the_last_shot_waits_for_transition_marks_that_come_at_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(split_mod, "make_detector", lambda cfg, fps: _LateMarks())
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=10.0, drop_fades=True)
    splitter = _SourceSplitter(cfg, 20.0)
    gray = np.full((24, 32), 128, np.uint8)
    for num in range(60):
        splitter.push(_Frame(num, num / 20.0, gray), 1 / 20.0, np.zeros((9, 16, 3), np.uint8))
    spans = [(c.start_frame, c.end_frame) for c in splitter.finish()]
    assert spans == [(0, 20), (25, 60)]


def test_other_mid_decode_failures_become_one_error_row(
    landscape: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that is not corrupt data (storage, a bug) must not pass for the end of
    the stream: the source fails, and its clips are not kept."""
    path, _ = landscape
    real = split_mod.iter_source_frames

    def breaks_halfway(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 80:
                raise ValueError("corrupt packet")
            yield item

    monkeypatch.setattr(split_mod, "iter_source_frames", breaks_halfway)
    rows = batch_to_rows(Split()(probe_batch(path)))
    assert len(rows) == 1  # the clips found before the failure are discarded
    assert rows[0]["clip_id"] is None and rows[0]["src_status"] == "error"
    assert path in rows[0]["src_error"] and "corrupt packet" in rows[0]["src_error"]


def test_source_without_clips_emits_done_placeholder() -> None:
    path = shared("delayed_start.mp4")  # 24 frames at 25 fps: shorter than min_clip_s
    (row,) = batch_to_rows(Split()(probe_batch(path)))
    assert row["clip_id"] is None and row["src_status"] == "done"
    assert row["src_num_clips"] == 0
    assert "no clips" in row["src_error"] and "min_clip_s=1" in row["src_error"]


def test_times_are_relative_to_a_late_stream_start() -> None:
    path = shared("delayed_start.mp4")
    assert probe_video(path)["start_s"] == pytest.approx(1.075)
    rows = batch_to_rows(Split(SplitConfig(min_clip_s=0.5))(probe_batch(path)))
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 24)]
    assert rows[0]["start_s"] == pytest.approx(0.0)
    assert rows[0]["end_s"] == pytest.approx(0.96)


def test_split_on_empty_batch() -> None:
    out = Split()({"source": np.empty(0, dtype=object)})
    assert set(Split.writes) <= set(out) and all(len(v) == 0 for v in out.values())


# --- probe -------------------------------------------------------------------------------


def test_probe_rotation_gives_portrait_display_size() -> None:
    facts = probe_video(shared("issue-134-rotate.mp4"))
    assert (facts["width"], facts["height"]) == (1280, 544)
    assert facts["rotation"] % 180 == 90
    assert (facts["display_width"], facts["display_height"]) == (544, 1280)
    (row,) = batch_to_rows(probe_batch(shared("issue-134-rotate.mp4")))
    assert (row["width"], row["height"]) == (544, 1280)
    assert row["src_num_frames"] == 240 and row["fps"] == pytest.approx(24000 / 1001)


def test_probe_anamorphic_display_aspect() -> None:
    facts = probe_video(shared("mmaction2_test.mp4"))
    assert (facts["width"], facts["height"]) == (340, 256)
    assert facts["display_width"] / facts["display_height"] == pytest.approx(16 / 9, rel=0.01)
    assert facts["num_frames"] == 300 and facts["num_frames_exact"]


def test_split_frames_are_display_oriented() -> None:
    path = shared("issue-134-rotate.mp4")
    with open_source(path) as container:
        frame, _ = next(_iter_frames(container, (544, 1280), 128 * 300))
    assert frame.size == even_size(544, 1280, 128 * 300)
    image = frame.rgb()
    assert image.shape[:2][::-1] == frame.size and image.shape[0] > image.shape[1]


def test_probe_limits_and_errors_are_values(landscape: tuple[str, list[int]]) -> None:
    path, _ = landscape
    column = np.array([path, path + ".missing"], dtype=object)
    out = Probe(ProbeConfig(max_pixels=100 * 100))({"source": column})
    rows = batch_to_rows(out)
    assert [r["src_status"] for r in rows] == ["error", "error"]
    assert path in rows[0]["src_error"] and "exceeds 10000 pixels" in rows[0]["src_error"]
    assert rows[0]["width"] == 160  # facts are kept even when a limit fails
    assert "No such file" in rows[1]["src_error"]
    short = Probe(ProbeConfig(max_duration_s=1.0))({"source": column[:1]})
    assert "duration" in short["src_error"][0]
    assert set(Probe.writes) <= set(STREAM_COLUMNS) and set(Probe.reads) <= set(STREAM_COLUMNS)
    assert set(Split.writes) <= set(STREAM_COLUMNS) and set(Split.reads) <= set(STREAM_COLUMNS)


def test_s3_sources_open_through_the_storage_layer(
    landscape: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.storage

    path, _ = landscape
    opened: list[str] = []

    class FakeStorage:
        def open(self, uri: str) -> Any:
            opened.append(uri)
            return open(path, "rb")

    monkeypatch.setattr(pipeline.storage, "storage_for", lambda uri: FakeStorage())
    uri = "s3://bucket/videos/landscape.mp4"
    (row,) = batch_to_rows(probe_batch(uri))
    assert row["src_status"] == "done" and row["src_num_frames"] == sum(SHOTS)
    out = batch_to_rows(Split()(probe_batch(uri)))
    assert len(out) == len(SHOTS) and all(r["source"] == uri for r in out)
    assert opened and set(opened) == {uri}


def test_missing_values_from_ray_stay_missing(landscape: tuple[str, list[int]]) -> None:
    path, _ = landscape
    batch = probe_batch(path)
    # Ray Data turns None into NaN in mixed columns; the split must not echo "nan".
    batch["src_error"] = np.array([np.nan])
    rows = batch_to_rows(Split()(batch))
    assert rows and all(r["src_error"] is None for r in rows)
    failed = {"source": np.array([path], dtype=object), "src_status": np.array(["error"])}
    failed["src_error"] = np.array([np.nan])
    (row,) = batch_to_rows(Split()(failed))
    assert (
        row["src_status"] == "error"
        and row["src_error"] == f"{path}: probe failed (no reason recorded)"
    )


@pytest.mark.parametrize(("rotation", "corner"), [(-90, "top_right"), (90, "bottom_left")])
def test_rotation_direction_matches_players(
    tmp_path: os.PathLike[str], rotation: int, corner: str
) -> None:
    """A display matrix of -90 degrees (counter-clockwise) is a clockwise quarter turn on
    screen, as ffmpeg's autorotate shows it: the coded top-left corner lands top-right."""
    path = os.path.join(tmp_path, "marker.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(24))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(rotation)
        image = np.zeros((32, 64, 3), np.uint8)
        image[:16, :32] = 255  # coded top-left quadrant
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    facts = probe_video(path)
    assert (facts["display_width"], facts["display_height"]) == (32, 64)
    with open_source(path) as container:
        frame, _ = next(_iter_frames(container, None, 64 * 32))
    luma = frame.rgb().mean(axis=2)
    quadrants = {
        "top_left": luma[:32, :16],
        "top_right": luma[:32, 16:],
        "bottom_left": luma[32:, :16],
        "bottom_right": luma[32:, 16:],
    }
    assert max(quadrants, key=lambda k: quadrants[k].mean()) == corner


def _quadrant_picture(height: int = 48, width: int = 64) -> np.ndarray:
    """Top-left red, top-right blue, bottom half green: any turn or flip tells."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2 :] = (0, 0, 255)
    image[height // 2 :] = (0, 255, 0)
    return image


def _corners(rgb: np.ndarray) -> list[str]:
    """The dominant colour near each corner: top-left, top-right, bottom-left, bottom-right."""
    h, w = rgb.shape[:2]
    names = ("red", "green", "blue")
    patches = [rgb[: h // 4, : w // 4], rgb[: h // 4, -w // 4 :]]
    patches += [rgb[-h // 4 :, : w // 4], rgb[-h // 4 :, -w // 4 :]]
    return [names[int(np.argmax(p.reshape(-1, 3).mean(axis=0)))] for p in patches]


def _payload_picture(path: str, decoder: str = "pyav") -> np.ndarray:
    rows = batch_to_rows(Split(SplitConfig(decoder=decoder))(probe_batch(path)))
    assert rows and rows[0]["clip_id"], rows[0]["src_error"]
    frames, _ = decode_mp4(rows[0]["clip_bytes"], max_frames=1)
    return frames[0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_photo_exif_orientations_are_shown_as_pillow_shows_them(
    tmp_path: os.PathLike[str], orientation: int
) -> None:
    """All eight EXIF orientations, the mirrored ones (2, 4, 5, 7) included: FFmpeg
    reads them into a display matrix, whose flips a rotation angle alone loses (a
    left-right mirror reads as a half turn, and the photo would end upside down)."""
    from PIL import Image, ImageOps

    path = os.path.join(tmp_path, f"photo{orientation}.jpg")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_quadrant_picture()).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as image:
        shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    facts = probe_video(path)
    assert (facts["display_height"], facts["display_width"]) == shown.shape[:2]
    assert facts["mirrored"] == (orientation in (2, 4, 5, 7))
    (row,) = batch_to_rows(probe_batch(path))
    assert row["src_mirrored"] == facts["mirrored"]
    payload = _payload_picture(path)
    assert payload.shape[:2] == shown.shape[:2]
    assert _corners(payload) == _corners(shown)


def _with_track_matrix(src: str, dst: str, matrix: tuple[int, ...]) -> None:
    """A copy of the MP4 ``src`` whose video track header carries display ``matrix``
    (nine numbers as the tkhd box stores them: a, b, u, c, d, v, x, y, w)."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    at = data.index(b"tkhd")
    version = data[at + 4]
    # version+flags, creation/modification times, track id, reserved, duration, then
    # reserved (8), layer, alternate group, volume, reserved (8): the matrix follows
    offset = at + 8 + (20 if version == 0 else 32) + 16
    data[offset : offset + 36] = struct.pack(">9i", *matrix)
    with open(dst, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_videos_mirrored_by_their_display_matrix_are_shown_mirrored(
    tmp_path: os.PathLike[str], decoder: str
) -> None:
    """A track matrix that mirrors, turns, or both, as a player shows it, whichever
    decoder is asked for (decord turns some rotated videos itself and mirrors none: such
    a source goes to PyAV)."""
    plain = os.path.join(tmp_path, "plain.mp4")
    with av.open(plain, "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(24))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        frame = av.VideoFrame.from_ndarray(_quadrant_picture(), format="rgb24")
        for _ in range(36):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    one, w, h, z = 0x10000, 64 << 16, 48 << 16, 0x40000000
    cases = {  # matrix -> (rotation, mirrored, corners as a player shows them)
        (-one, 0, 0, 0, one, 0, w, 0, z): (0, True, ["blue", "red", "green", "green"]),
        (one, 0, 0, 0, -one, 0, 0, h, z): (180, True, ["green", "green", "red", "blue"]),
        (-one, 0, 0, 0, -one, 0, w, h, z): (180, False, ["green", "green", "blue", "red"]),
        (one, 0, 0, 0, one, 0, 0, 0, z): (0, False, ["red", "blue", "green", "green"]),
        (0, one, 0, -one, 0, 0, h, 0, z): (270, False, ["green", "red", "green", "blue"]),
        (0, one, 0, one, 0, 0, 0, 0, z): (90, True, ["red", "green", "blue", "green"]),
    }
    for i, (matrix, (rotation, mirrored, corners)) in enumerate(cases.items()):
        path = os.path.join(tmp_path, f"m{i}.mp4")
        _with_track_matrix(plain, path, matrix)
        facts = probe_video(path)
        assert (facts["rotation"], facts["mirrored"]) == (rotation, mirrored), matrix
        assert _corners(_payload_picture(path, decoder)) == corners, matrix


# --- payload colours ---------------------------------------------------------------------

_PATCHES = [(235, 40, 40), (40, 200, 60), (50, 60, 230), (240, 230, 60), (128, 128, 128)]


def _colour_video(path: str, pix_fmt: str, colorspace: int | None, color_range: int | None) -> None:
    """2 s of five flat colour bars, encoded as ``pix_fmt`` with the given tags."""
    image = np.zeros((96, 160, 3), np.uint8)
    for i, colour in enumerate(_PATCHES):
        image[:, i * 32 : (i + 1) * 32] = colour
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 160, 96, pix_fmt
        stream.options = {"crf": "10"}
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        if color_range is not None:
            stream.codec_context.color_range = color_range
        for _ in range(48):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format=pix_fmt, dst_colorspace=colorspace, dst_color_range=color_range
            )
            if colorspace is not None:
                frame.colorspace = colorspace
            if color_range is not None:
                frame.color_range = color_range
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize(
    ("pix_fmt", "colorspace", "color_range"),
    [("yuv420p", None, None), ("yuv420p", 1, 1), ("yuvj420p", None, 2), ("yuv444p", 1, 1)],
    ids=["untagged", "bt709", "full-range", "yuv444-bt709"],
)
def test_payload_colours_match_the_source(
    tmp_path: Any, pix_fmt: str, colorspace: int | None, color_range: int | None
) -> None:
    """Payloads are encoded from the decoder's own planes with the source's colour tags
    carried over, so a payload decodes to the colours the source decodes to."""
    path = str(tmp_path / f"{pix_fmt}-{colorspace}.mp4")
    _colour_video(path, pix_fmt, colorspace, color_range)
    (row,) = batch_to_rows(Split(SplitConfig(min_clip_s=0.5))(probe_batch(path)))
    frames, _ = decode_mp4(row["clip_bytes"])
    with av.open(path) as container:
        source = next(container.decode(video=0)).to_ndarray(format="rgb24")
    for i, colour in enumerate(_PATCHES):
        centre = (slice(40, 56), slice(i * 32 + 10, i * 32 + 22))
        got = frames[0][centre].reshape(-1, 3).mean(axis=0)
        want = source[centre].reshape(-1, 3).mean(axis=0)
        assert np.abs(got - want).max() <= 3, (colour, got, want)
        assert np.abs(got - np.array(colour)).max() <= 8, (colour, got)


@pytest.mark.parametrize(
    ("name", "codec", "fmt", "fps", "size", "pix_fmt"),
    [
        ("es.m2v", "mpeg2video", "mpeg2video", 30000 / 1001, (128, 96), "yuv420p"),
        ("es.m4v", "mpeg4", "m4v", 24.0, (128, 96), "yuv420p"),
        ("es.h264", "libx264", "h264", 50.0, (128, 96), "yuv420p"),
        # variable rate: its header states 104.9 Mb/s, from which FFmpeg times it 6 ms long
        ("vbr.m1v", "mpeg1video", "mpeg1video", 25.0, (128, 96), "yuv420p"),
        # a camera's Motion JPEG stream: no rate (FFmpeg's 25 fps) nor frame count
        ("camera.mjpeg", "mjpeg", "mjpeg", 25.0, (128, 96), "yuvj420p"),
        ("ntsc.dv", "dvvideo", "dv", 30000 / 1001, (720, 480), "yuv411p"),
        ("pal.dv", "dvvideo", "dv", 25.0, (720, 576), "yuv420p"),
    ],
)
def test_raw_streams_run_at_the_rate_their_bitstream_states(
    tmp_path: Any, name: str, codec: str, fmt: str, fps: float, size: tuple[int, int], pix_fmt: str
) -> None:
    """An elementary stream (MPEG-1/2, MPEG-4, H.264, Motion JPEG) or raw DV has no
    container timing: FFmpeg's average rate for it is a placeholder (25 fps; raw DV's is
    60000), and its duration a guess from the bit rate. The rate the bitstream states is
    the stream's rate and its packets count its frames: the clips, their times and their
    payloads keep the source's speed."""
    path = str(tmp_path / name)
    shots = [30, 36]
    options = {"b": "4M"} if codec != "libx264" else None  # not FFmpeg's 200 kb/s
    cuts = synth_video(
        path,
        width=size[0],
        height=size[1],
        fps=fps,
        shots=shots,
        seed=7,
        codec=codec,
        pix_fmt=pix_fmt,
        fmt=fmt,
        options=options,
    )
    facts = probe_video(path)
    assert facts["container"] in RAW_STREAM_FORMATS
    assert facts["fps"] == pytest.approx(fps, rel=1e-4)
    assert facts["num_frames"] == pytest.approx(sum(shots), abs=1)
    rows = batch_to_rows(Split(SplitConfig(min_clip_s=0.3, max_clip_s=5.0))(probe_batch(path)))
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, cuts[0]), (cuts[0], 66)]
    assert rows[1]["start_s"] == pytest.approx(cuts[0] / fps, abs=1e-3)
    assert rows[1]["end_s"] == pytest.approx(66 / fps, abs=1e-3)
    frames, payload_fps = decode_mp4(rows[1]["clip_bytes"])
    assert len(frames) / payload_fps == pytest.approx(36 / fps, abs=0.07)


def test_one_picture_in_a_stream_that_does_not_count_its_frames_is_a_still(tmp_path) -> None:
    """A raw Motion JPEG stream states no frame count: one of many pictures is a video
    (above), one of a single picture a still image, as a .jpg of it would be."""
    path = str(tmp_path / "snapshot.mjpeg")
    synth_video(
        path,
        width=128,
        height=96,
        fps=25,
        shots=[1],
        seed=2,
        codec="mjpeg",
        pix_fmt="yuvj420p",
        fmt="mjpeg",
    )
    facts = probe_video(path)
    assert (facts["media_kind"], facts["num_frames"]) == ("image", 1)
    (row,) = batch_to_rows(Split(SplitConfig())(probe_batch(path)))
    assert (row["start_frame"], row["end_frame"]) == (0, 1)
    assert decode_mp4(row["clip_bytes"])[0].shape == (1, 96, 128, 3)


def _vfr_bar_video(path: str) -> None:
    """3 s at 10 fps, then 3 s at 30 fps (a phone slowing its rate in the dark; nominally
    30 fps), of a bar moving 40 px/s: frame time t shows it at x = 20 + 40 t."""
    times = [i / 10 for i in range(30)] + [3 + i / 30 for i in range(90)]
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 96, "yuv420p"
        stream.options = {"g": "10"}  # keyframes a range can seek to
        stream.codec_context.time_base = Fraction(1, 1000)
        for t in times:
            image = np.full((96, 320, 3), 40, np.uint8)
            x = round(20 + 40 * t)
            image[:, x : x + 4] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def test_a_variable_frame_rate_payload_plays_in_real_time(tmp_path: Any) -> None:
    """Taken by number at the nominal rate (30 fps), the payload of :func:`_vfr_bar_video`
    ran its first part three times too fast and lasted 4 s of 6. Taken by time, each
    payload frame shows the bar where it was at that frame's time (within the 0.1 s a
    10 fps frame is held)."""
    path = str(tmp_path / "vfr.mkv")
    _vfr_bar_video(path)
    probed = probe_batch(path)
    (row,) = batch_to_rows(probed)
    assert row["src_vfr"]
    for work_fps, rate in ((16.0, 16.0), (None, row["fps"])):  # None: the source's rate
        cfg = SplitConfig(min_clip_s=0.5, max_clip_s=10.0, work_fps=work_fps, crop_borders=False)
        (clip,) = batch_to_rows(Split(cfg)(probed))
        frames, fps = decode_mp4(clip["clip_bytes"])
        assert fps == pytest.approx(rate) and len(frames) == pytest.approx(6.0 * rate, abs=1)
        shown = np.array([(np.argmax(f[48, :, 0] > 150) - 20) / 40 for f in frames])
        assert np.abs(shown - np.arange(len(frames)) / fps).max() <= 0.11


def test_variable_frame_rate_clips_last_min_to_max_clip_s(tmp_path: Any) -> None:
    """Clip lengths are seconds: counted in frames at the nominal 30 fps, a 60-frame
    piece of :func:`_vfr_bar_video` lasted 4 s with max_clip_s=2. By the frames' times
    every clip lasts 0.5-2 s, whole or split into ranges."""
    from pipeline.stitching import RangeStitcher, expand_ranges

    path = str(tmp_path / "vfr.mkv")
    _vfr_bar_video(path)
    probed = probe_batch(path)
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=2.0, crop_borders=False)
    rows = batch_to_rows(Split(cfg)(probed))
    spans = [(r["start_frame"], r["end_frame"]) for r in rows]
    assert spans == [(0, 20), (20, 60), (60, 120)]  # 2 s each (a CFR count: 60 frames)
    assert all(0.5 <= r["end_s"] - r["start_s"] <= 2.0 + 1e-6 for r in rows)
    ranged = expand_ranges(probed, cfg, range_frames=40)
    assert len(ranged["source"]) == 3
    stitcher, out = RangeStitcher(), []
    for i in range(3):
        for batch in stitcher(Split(cfg)({k: v[i : i + 1] for k, v in ranged.items()})):
            out += [(r["start_frame"], r["end_frame"]) for r in batch_to_rows(batch)]
    assert out == spans


def test_chunks_by_time_cut_variable_rate_frames_within_the_limits() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        steps = rng.choice([1 / 60, 1 / 30, 1 / 10, 0.2], size=int(rng.integers(5, 400)))
        times = np.concatenate([[0.0], np.cumsum(steps[:-1])]).tolist()
        end_s = float(np.sum(steps))
        min_s, max_s = float(rng.choice([0.5, 1.0])), float(rng.choice([2.0, 5.0]))
        pieces = chunks_by_time(times, end_s, min_s, max_s)
        ends = [*times, end_s]
        if end_s < min_s:
            continue
        assert pieces and pieces[0][0] == 0
        assert all(a < b for a, b in pieces)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(pieces))  # no gaps
        longest = max(b - a for a, b in itertools.pairwise(ends))
        for a, b in pieces:
            # where no frame starts in the window an even split needs, a piece ends at
            # the nearest frame: within one frame of the limits
            assert min_s - longest - 1e-6 <= ends[b] - ends[a] <= max_s + longest + 1e-6
        assert sum(ends[b] - ends[a] > max_s + 1e-6 for a, b in pieces) <= 1
        # what is left over after the last piece is less than a piece
        assert end_s - ends[pieces[-1][1]] < min_s + longest + 1e-6


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_probe_tells_variable_from_constant_frame_rate(tmp_path: Any, ext: str) -> None:
    """MP4 is judged from its index (no media bytes read), MKV by demuxing packets."""
    image = np.zeros((32, 48, 3), np.uint8)

    def write(path: str, steps_ms: list[int]) -> None:
        with av.open(path, "w") as out:
            stream = out.add_stream("libx264", rate=1000)
            stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
            pts = 0
            for step in steps_ms:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += step
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)

    vfr, cfr = str(tmp_path / f"vfr.{ext}"), str(tmp_path / f"cfr.{ext}")
    write(vfr, [50 if i % 3 else 150 for i in range(40)])
    write(cfr, [40] * 40)
    assert probe_video(vfr)["vfr"] is True
    assert probe_video(cfr)["vfr"] is False


def test_rising_pts_undoes_neighbour_swaps_but_not_resets() -> None:
    def times(labels: list[int | None]) -> list[int | None]:
        return [pts for _, pts in rising_pts([types.SimpleNamespace(pts=x) for x in labels])]

    # packed B-frames: display order, neighbours' labels
    assert times([1, 2, 4, 3, 5, 7, 6, 8]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert times([0, 3, 1, 2, 6, 4, 5]) == [0, 1, 2, 3, 4, 5, 6]
    assert times([0, 1, 2, 3]) == [0, 1, 2, 3]  # rising: unchanged
    assert times([998, 999, 1000, 1001, 0, 1, 2]) == [998, 999, 1000, 1001, 0, 1, 2]  # a reset
    assert times([0, None, 2, 1, 3]) == [0, None, 1, 2, 3]
    assert times([4, 2, 3, 1, 5]) == [2, 2, 3, 4, 5]  # garbage in: one time per frame, no crash


def test_avi_with_packed_b_frames_gets_rising_times_and_exact_seek_numbers() -> None:
    """mmaction2_test.avi (Xvid-style MPEG-4 Part 2 in AVI) labels its decoded frames with
    pts 1, 2, 4, 3, ...: times must still rise one frame at a time, and a decode that
    seeks (a straggler range) must number its frames as a decode from the start does."""
    path = shared("mmaction2_test.avi")
    with av.open(path) as c:
        labels = [f.pts for f in c.decode(video=0)]
    assert any(b < a for a, b in itertools.pairwise(labels))  # the file is as described
    full = list(iter_source_frames(path, None, 320 * 240))
    assert [f.num for f in full] == list(range(164))
    first = full[0].time_s
    assert [round(f.time_s - first, 6) for f in full] == [round(i / 25, 6) for i in range(164)]
    part = list(iter_source_frames(path, None, 320 * 240, start_frame=61))
    assert [f.num for f in part] == list(range(61, 164))
    assert [f.time_s for f in part] == [f.time_s for f in full[61:]]
    assert all(np.array_equal(a.yuv, b.yuv) for a, b in zip(part, full[61:], strict=True))


def test_a_recording_that_starts_mid_gop_numbers_frames_alike_in_ranges(tmp_path: Any) -> None:
    """An MPEG-TS capture cut mid-GOP starts with packets no decoder can show. Frames are
    numbered as a decode from the start delivers them, and the frame table that ranges
    seek by numbers them the same way: a seek lands on the same frame, and a ranged
    split gives the unranged clips (before, ranges numbered from the first packet and
    their clips shifted by the undecodable lead)."""
    whole = str(tmp_path / "whole.ts")
    synth_video(whole, width=160, height=96, fps=25, shots=[60, 60, 60, 60], seed=4)
    data = (tmp_path / "whole.ts").read_bytes()
    path = str(tmp_path / "mid_gop.ts")
    (tmp_path / "mid_gop.ts").write_bytes(data[len(data) // 3 // 188 * 188 :])  # at a TS packet
    with av.open(path) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    assert not packets[0].is_keyframe  # the file is as described
    full = list(iter_source_frames(path, None, 160 * 96))
    with open_source(path) as container:
        assert len(frame_pts_table(container)) == len(full) < len(packets)
    part = list(iter_source_frames(path, None, 160 * 96, start_frame=60))
    assert (part[0].num, part[0].time_s) == (60, full[60].time_s)
    assert np.array_equal(part[0].yuv, full[60].yuv)
    (row,) = batch_to_rows(Probe()({"source": np.array([path], dtype=object)}))
    cfg = SplitConfig(min_clip_s=0.5)
    single = [(r["start_frame"], r["end_frame"]) for r in Split(cfg).split_row(row)]
    assert len(single) >= 2
    parts = [
        Split(cfg).split_row(
            {**row, "range_start_frame": a, "range_end_frame": None if b < 0 else b}
        )
        for a, b in frame_ranges(len(full), 50)
    ]
    assert [(r["start_frame"], r["end_frame"]) for r in stitch(parts)] == single


def _interlaced_video(path: str, codec: str, frames: int = 20) -> None:
    """A bar moving right, captured interlaced: even lines at time t, odd lines half a
    frame later (so a frame shown as is combs), encoded as interlaced video."""
    options = {"flags": "+ildct+ilme"}
    if codec == "libx264":
        options.update({"x264-params": "tff=1", "preset": "ultrafast"})
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=25, options=options)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for t in range(frames):
            image = np.full((240, 320, 3), 40, np.uint8)
            for field in (0, 1):
                x = int(10 + 8 * (t + 0.5 * field))
                image[field::2, x : x + 40] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _combing(yuv: np.ndarray, height: int) -> float:
    """Mean distance of each luma line from the average of its neighbours: high when
    the two fields of a frame show different moments."""
    luma = yuv[:height].astype(np.float32)
    return float(np.abs(luma[1:-1] - 0.5 * (luma[:-2] + luma[2:])).mean())


@pytest.mark.parametrize("name, codec", [("i.mp4", "libx264"), ("i.ts", "mpeg2video")])
def test_interlaced_sources_are_probed_and_deinterlaced(
    tmp_path: Any, name: str, codec: str
) -> None:
    path = str(tmp_path / name)
    _interlaced_video(path, codec)
    assert probe_video(path)["interlaced"] is True
    assert probe_video(shared("testvideo.mp4"))["interlaced"] is False
    shown = list(iter_source_frames(path, None, 320 * 240, deinterlace=False))
    clean = list(iter_source_frames(path, None, 320 * 240))
    # one frame out per frame in, same numbers and times
    assert [(f.num, f.time_s) for f in clean] == [(f.num, f.time_s) for f in shown]
    assert [f.num for f in clean] == list(range(20))
    assert min(_combing(f.yuv, 240) for f in shown[1:]) > 2.0
    assert max(_combing(f.yuv, 240) for f in clean[1:]) < 0.1
    # a seek (a straggler range) gives the same frames; MPEG-TS has no index, so its
    # seek lands past the wanted frame and must back off
    part = list(iter_source_frames(path, None, 320 * 240, start_frame=7))
    assert [f.num for f in part] == list(range(7, 20))
    assert all(np.array_equal(a.yuv, b.yuv) for a, b in zip(part, clean[7:], strict=True))
    # the Split stage's payloads are progressive, whichever decoder is configured
    # (decord cannot deinterlace: the probed fact sends the source to PyAV)
    probed = Probe(ProbeConfig())({"source": np.array([path], dtype=object)})
    assert probed["src_interlaced"][0]
    for decoder in ("pyav", "decord"):
        cfg = SplitConfig(min_clip_s=0.2, work_max_area=320 * 240, decoder=decoder)
        (row,) = batch_to_rows(Split(cfg)(probed))
        frames, _ = decode_mp4(row["clip_bytes"])
        assert len(frames) == 20
        assert max(_combing(rgb_to_i420(f), 240) for f in frames[1:]) < 0.5
    assert probe_video(path)["pulldown"] is False  # live interlaced: bwdif alone


def _film(frames: int) -> np.ndarray:
    """(frames, 240, 320) luma of film: a fine texture panning 5 px a frame, detail a
    deinterlacer working from one field would blur."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(
        rng.integers(30, 220, (240, 320 + 5 * frames)).astype(np.float32), (0, 0), 1.0
    )
    return np.stack([texture[:, 5 * i : 5 * i + 320] for i in range(frames)]).astype(np.uint8)


def _i420(luma: np.ndarray) -> av.VideoFrame:
    return av.VideoFrame.from_ndarray(
        np.concatenate([luma, np.full((120, 320), 128, np.uint8)]), format="yuv420p"
    )


def _pulldown_video(path: str, film: np.ndarray, pattern: str, bit_rate: int | None = None) -> None:
    """``film`` (24 fps) in interlaced MPEG-2: telecined 3:2 to 29.97 fps by FFmpeg's
    telecine (``pattern="3:2"``: two of every five frames mix two film frames' fields),
    or sent 2:2 at 25 fps (each frame's two fields from one film frame). Near lossless,
    or at ``bit_rate`` (bits/s) as a DVD or broadcast codes it."""
    pictures: list[av.VideoFrame] = [_i420(f) for f in film]
    rate = Fraction(25)
    if pattern == "3:2":
        graph = av.filter.Graph()
        src = graph.add("buffer", "video_size=320x240:pix_fmt=yuv420p:time_base=1/24:frame_rate=24")
        telecine, sink = (
            graph.add("telecine", "first_field=top:pattern=23"),
            graph.add("buffersink"),
        )
        src.link_to(telecine)
        telecine.link_to(sink)
        graph.configure()
        telecined = []
        for i, picture in enumerate([*pictures, None]):
            if picture is not None:
                picture.pts, picture.time_base = i, Fraction(1, 24)
            graph.push(picture)
            with contextlib.suppress(av.BlockingIOError, av.EOFError):
                while True:
                    telecined.append(graph.pull())  # field order flags set: top first
        pictures, rate = telecined, Fraction(30000, 1001)
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg2video", rate=rate, options={"flags": "+ildct+ilme"})
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        if bit_rate is None:
            stream.codec_context.qmin, stream.codec_context.qmax = 1, 2  # near lossless
        else:
            stream.bit_rate = bit_rate
        for i, picture in enumerate(pictures):
            picture.pts = i
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _film_psnr(luma: np.ndarray, film: np.ndarray) -> float:
    """PSNR (dB) of a frame's luma against the film frame nearest to it."""
    mse = ((film.astype(np.float32) - luma.astype(np.float32)) ** 2).reshape(len(film), -1)
    return float(10 * np.log10(255**2 / mse.mean(axis=1).min()))


@pytest.mark.parametrize("pattern, frames", [("3:2", 60), ("2:2", 48)])
def test_film_in_interlaced_video_gets_its_pictures_back(
    tmp_path: Any, pattern: str, frames: int
) -> None:
    """Film telecined 3:2 (DVD, US broadcast) or sent 2:2 (PAL broadcast, PsF) is coded
    interlaced, but its pictures are progressive. bwdif alone treats every frame as two
    moments and blurs them; probe finds the pulldown and field matching restores every
    film frame, with frame numbers and times unchanged."""
    film = _film(48)
    path = str(tmp_path / f"film{pattern.replace(':', '')}.ts")
    _pulldown_video(path, film, pattern)
    facts = probe_video(path)
    assert facts["interlaced"] is True and facts["pulldown"] is True
    bwdif = list(iter_source_frames(path, None, 320 * 240))
    matched = list(iter_source_frames(path, None, 320 * 240, field_match=True))
    assert [(f.num, f.time_s) for f in matched] == [(f.num, f.time_s) for f in bwdif]
    assert len(matched) == frames
    assert min(_film_psnr(f.yuv[:240], film) for f in matched) > 40.0
    assert min(_film_psnr(f.yuv[:240], film) for f in bwdif) < 38.0

    # The Split stage field-matches by the probed fact, and only with field_match on. Its
    # payload of 3:2 film then holds each film frame once, at the film's rate; the clip
    # keeps the source's frame numbers and times.
    probed = Probe(ProbeConfig())({"source": np.array([path], dtype=object)})
    assert probed["src_pulldown"][0]
    quality = {}
    for on, decimate in ((True, True), (True, False), (False, True)):
        cfg = SplitConfig(
            min_clip_s=0.2, work_max_area=320 * 240, work_crf=4, field_match=on, decimate=decimate
        )
        (row,) = batch_to_rows(Split(cfg)(probed))
        assert (row["start_frame"], row["end_frame"]) == (0, frames)
        with av.open(io.BytesIO(row["clip_bytes"])) as payload:
            rate = payload.streams.video[0].average_rate
            lumas = [f.to_ndarray(format="yuv420p")[:240] for f in payload.decode(video=0)]
        nearest = [_nearest_film_frame(luma, film) for luma in lumas]
        if on and decimate:
            assert nearest == list(range(len(film)))  # every film frame, once, in order
            assert rate == (Fraction(24000, 1001) if pattern == "3:2" else 25)
        else:
            assert len(lumas) == frames
        quality[on, decimate] = min(_film_psnr(luma, film) for luma in lumas)
    assert quality[True, True] > 40.0 and quality[True, False] > 40.0 > quality[False, True]


def test_lossy_telecined_film_is_found_by_its_cadence(tmp_path: Any) -> None:
    """Real footage telecined 3:2 and coded lossy at DVD rates: idet tells few fields
    apart, but the field-matched frames repeat one picture in five, so probe finds the
    film and the payload holds each film frame once at 23.976 fps."""
    with av.open(shared("mmaction2_demo_skeleton.mp4")) as source:
        film = np.stack(
            [
                cv2.resize(f.to_ndarray(format="gray"), (320, 240), interpolation=cv2.INTER_AREA)
                for f in itertools.islice(source.decode(video=0), 60)
            ]
        )
    path = str(tmp_path / "dvd.ts")
    _pulldown_video(path, film, "3:2", bit_rate=1_500_000)
    with av.open(path) as container:  # idet alone: too few film-like frames to say yes
        judged = [_film_like(m) for m in _idet(container.decode(video=0))]
    assert sum(judged) < 0.2 * len(judged)
    probed = Probe(ProbeConfig())({"source": np.array([path], dtype=object)})
    assert probed["src_pulldown"][0]
    cfg = SplitConfig(min_clip_s=0.2, max_clip_s=30.0, work_max_area=320 * 240)
    (row,) = batch_to_rows(Split(cfg)(probed))
    assert (row["start_frame"], row["end_frame"]) == (0, 75)
    with av.open(io.BytesIO(row["clip_bytes"])) as payload:
        assert payload.streams.video[0].average_rate == Fraction(24000, 1001)
        nearest = [
            _nearest_film_frame(f.to_ndarray(format="yuv420p")[:240], film)
            for f in payload.decode(video=0)
        ]
    assert len(nearest) == 60
    assert len(set(nearest)) >= 58  # the stream's first cycle may be matched otherwise


class _CountingFile(io.FileIO):
    """A file that counts the bytes read from it."""

    read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = super().read(size)
        self.read_bytes += len(data)
        return data


def test_probe_samples_do_not_decode_the_rest_of_a_stream_without_keyframes(
    tmp_path: Any,
) -> None:
    """After a seek, a stream whose next keyframe never comes (one keyframe, intra
    refresh) shows no frame: probe's samples (black bars, pulldown) read a bounded
    number of packets, not the rest of the file from each place."""
    path = str(tmp_path / "one_keyframe.ts")
    with av.open(path, "w") as out:
        opts = {"x264-params": "tff=1:keyint=infinite:scenecut=0", "preset": "ultrafast"}
        stream = out.add_stream("libx264", rate=30, options=opts)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(3600):  # 2 minutes of noise: every packet large
            image = rng.integers(0, 256, (180, 160), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    counting = _CountingFile(path, "rb")
    with counting, av.open(counting) as container:
        facts = container_facts(container)
    assert facts["interlaced"] is True and facts["num_frames"] >= 3500
    # two samples of at most _SEEK_PACKETS packets, not twice the rest of the file
    assert 0 < counting.read_bytes < 0.5 * os.path.getsize(path), counting.read_bytes


def _nearest_film_frame(luma: np.ndarray, film: np.ndarray) -> int:
    mse = ((film.astype(np.float32) - luma.astype(np.float32)) ** 2).reshape(len(film), -1)
    return int(mse.mean(axis=1).argmin())


def test_telecine_repeats_are_found_only_in_the_3_2_cadence() -> None:
    """After field matching, 3:2 film repeats one picture in every five; 2:2 film, live
    video and still pictures show no such cadence and lose nothing."""
    rng = np.random.default_rng(3)
    texture = rng.integers(0, 256, (60, 400), dtype=np.uint8)
    film = [texture[:, 4 * i : 4 * i + 80] for i in range(60)]  # 24 fps, panning
    noise = lambda f: cv2.add(f, rng.integers(0, 2, f.shape, dtype=np.uint8))  # noqa: E731
    # cycles of five frames from film frames 0, 1, 2, 2, 3: the repeat is the 4th (k % 5 == 3)
    telecined = [noise(film[k // 5 * 4 + (0, 1, 2, 2, 3)[k % 5]]) for k in range(40)]
    assert telecine_repeats(telecined) == [3, 8, 13, 18, 23, 28, 33, 38]
    assert telecine_repeats(telecined[2:]) == [1, 6, 11, 16, 21, 26, 31, 36]  # any phase
    assert telecine_repeats([noise(f) for f in film[:40]]) == []  # 2:2: every frame new
    still = [noise(film[0]) for _ in range(40)]
    assert telecine_repeats(still) == []  # nothing moves: the cadence cannot show
    assert telecine_repeats(telecined[:10]) == []  # under two cycles: not judged
    resized = telecined[:20] + [cv2.resize(f, (40, 30)) for f in telecined[20:]]
    assert telecine_repeats(resized) == []  # the size changes mid-clip: not judged


def _pq_code(nits: float) -> float:
    """SMPTE ST 2084 (PQ) code value 0..1 of a display light in nits."""
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    y = (nits / 10000) ** m1
    return float(((c1 + c2 * y) / (1 + c3 * y)) ** m2)


def _hdr_video(path: str, transfer: str, codes: list[float], extra: str = "") -> None:
    """Four neutral grey bands at the given non-linear code values (0..1), as 10-bit
    limited-range BT.2020 HEVC tagged with ``transfer``, losslessly coded."""
    params = f"colorprim=bt2020:transfer={transfer}:colormatrix=bt2020nc:lossless=1:log-level=error"
    params += extra
    with av.open(path, "w") as out:
        stream = out.add_stream(
            "libx265", rate=25, options={"x265-params": params, "preset": "ultrafast"}
        )
        stream.width, stream.height, stream.pix_fmt = 128, 64, "yuv420p10le"
        image = np.full((96, 128), 512, np.uint16)  # neutral chroma
        for i, code in enumerate(codes):
            image[:64, 32 * i : 32 * (i + 1)] = round(64 + 876 * code)
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="yuv420p10le")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _band_means(yuv: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean luma and mean |chroma - 128| of the four bands of a 128x64 I420 image."""
    luma, u, v = yuv[:64], yuv[64:80].reshape(32, 64), yuv[80:96].reshape(32, 64)
    bands = [float(luma[8:56, 32 * i + 4 : 32 * i + 28].mean()) for i in range(4)]
    tint = max(float(np.abs(c.astype(int) - 128).mean()) for c in (u, v))
    return bands, [tint]


def test_hdr_sources_are_tone_mapped_to_sdr(tmp_path: Any) -> None:
    """PQ greys of 0.1, 20, 203 (HDR reference white) and 1000 nits come out as SDR greys
    (BT.601 limited-range luma): black stays near black, reference white lands where
    an SDR white would sit below its peak, 1000 nits at SDR peak, no tint. An HLG grey at
    75 % (its reference white) lands near the PQ one. Shown untouched, the PQ white is
    a dull grey."""
    pq = str(tmp_path / "pq.mp4")
    _hdr_video(pq, "smpte2084", [_pq_code(n) for n in (0.1, 20, 203, 1000)])
    assert probe_video(pq)["color_transfer"] == "smpte2084"
    assert probe_video(shared("testvideo.mp4"))["color_transfer"] in ("bt709", "unknown", None)
    (frame, *_) = list(iter_source_frames(pq, None, 128 * 64))
    bands, tint = _band_means(frame.yuv)
    assert bands == pytest.approx([25, 96, 183, 235], abs=6)
    assert tint[0] < 2
    (raw, *_) = list(iter_source_frames(pq, None, 128 * 64, tone_map=False))
    assert _band_means(raw.yuv)[0][2] == pytest.approx(143, abs=6)  # PQ code 0.58 as SDR
    # a master that peaks at 4000 nits (its MaxCLL): 1000 nits is no longer SDR white
    bright = str(tmp_path / "pq4000.mp4")
    _hdr_video(
        bright, "smpte2084", [_pq_code(n) for n in (0.1, 20, 203, 1000)], ":max-cll=4000,400"
    )
    (frame, *_) = list(iter_source_frames(bright, None, 128 * 64))
    brighter, _ = _band_means(frame.yuv)
    assert brighter[3] < 225 and brighter[2] > bands[2] - 6

    hlg = str(tmp_path / "hlg.mp4")
    _hdr_video(hlg, "arib-std-b67", [0.0, 0.25, 0.75, 1.0])
    assert probe_video(hlg)["color_transfer"] == "arib-std-b67"
    (frame, *_) = list(iter_source_frames(hlg, None, 128 * 64))
    hlg_bands, _ = _band_means(frame.yuv)
    assert hlg_bands[2] == pytest.approx(bands[2], abs=12)
    assert hlg_bands == sorted(hlg_bands) and hlg_bands[0] < 20

    # through the Split stage: the payload holds the SDR picture
    probed = Probe(ProbeConfig(min_side=16))({"source": np.array([pq], dtype=object)})
    assert probed["src_color_transfer"][0] == "smpte2084"
    # (no border crop: the 0.1-nit band at the left edge is as dark as a pillarbox bar)
    cfg = SplitConfig(min_clip_s=0.0, work_max_area=128 * 64, crop_borders=False)
    (row,) = batch_to_rows(Split(cfg)(probed))
    frames, _ = decode_mp4(row["clip_bytes"])
    white = frames[0][8:56, 68:92].mean()  # RGB of the 203-nit band
    assert white == pytest.approx(194, abs=8)


def _bt2020_sdr_video(path: str, colours: list[tuple[float, float, float]]) -> None:
    """Bands of the given BT.2020 R'G'B' colours (0..1), as 10-bit limited-range BT.2020
    SDR HEVC (transfer bt2020-10), losslessly coded."""
    params = "colorprim=bt2020:transfer=bt2020-10:colormatrix=bt2020nc:lossless=1:log-level=error"
    with av.open(path, "w") as out:
        stream = out.add_stream(
            "libx265", rate=25, options={"x265-params": params, "preset": "ultrafast"}
        )
        stream.width, stream.height, stream.pix_fmt = 32 * len(colours), 64, "yuv420p10le"
        w = stream.width
        image = np.empty((96, w), np.uint16)
        chroma = image[64:].reshape(64, w // 2)  # U rows, then V rows
        for i, (r, g, b) in enumerate(colours):
            y = 0.2627 * r + 0.6780 * g + 0.0593 * b
            image[:64, 32 * i : 32 * (i + 1)] = round(64 + 876 * y)
            chroma[:32, 16 * i : 16 * (i + 1)] = round(512 + 896 * (b - y) / 1.8814)
            chroma[32:, 16 * i : 16 * (i + 1)] = round(512 + 896 * (r - y) / 1.4746)
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="yuv420p10le")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_bt2020_sdr_colours_are_brought_to_bt709(tmp_path: Any) -> None:
    """SDR with BT.2020 primaries: each colour becomes the BT.709 colour that shows the
    same light (BT.1886 linear light, BT.2087 matrix), greys stay greys. Read as BT.709
    without conversion, the colours come out washed out."""
    colours = [(0.5, 0.6, 0.4), (0.7, 0.3, 0.35), (0.5, 0.5, 0.5)]
    path = str(tmp_path / "bt2020.mp4")
    _bt2020_sdr_video(path, colours)
    to_709 = np.array(
        [[1.6605, -0.5876, -0.0728], [-0.1246, 1.1329, -0.0083], [-0.0182, -0.1006, 1.1187]]
    )

    def bands(tone_map: bool) -> np.ndarray:
        (frame, *_) = list(iter_source_frames(path, None, 96 * 64, tone_map=tone_map))
        rgb = frame.rgb().astype(float)
        return np.array([rgb[8:56, 32 * i + 6 : 32 * i + 26].mean((0, 1)) for i in range(3)])

    want = 255 * np.clip(np.array(colours) ** 2.4 @ to_709.T, 0, 1) ** (1 / 2.4)
    got = bands(True)
    assert np.abs(got - want).max() < 4, (got, want)
    assert np.ptp(got[2]) < 2  # grey stays grey
    raw = bands(False)
    assert np.abs(raw - want)[:2].max() > 15  # the test can tell

    # probe names the primaries, so that split sends such a source to PyAV even when
    # decord is the decoder (decord knows nothing of colours)
    facts = probe_video(path)
    assert (facts["color_primaries"], facts["color_transfer"]) == ("bt2020", "bt2020-10")
    assert probe_video(shared("testvideo.mp4"))["color_primaries"] in ("bt709", "unknown", None)
    mp4 = {"src_container": "mov,mp4,m4a,3gp,3g2,mj2"}
    row = {**mp4, "src_color_primaries": "bt2020", "src_color_transfer": "bt2020-10"}
    assert Split(SplitConfig(decoder="decord"))._needs_pyav(row)
    assert not Split(SplitConfig(decoder="decord", tone_map=False))._needs_pyav(row)
    sdr = {**mp4, "src_color_primaries": "bt709"}
    assert not Split(SplitConfig(decoder="decord"))._needs_pyav(sdr)


def _boxed_video(path: str, box: tuple[int, int, int, int], frames: int = 30) -> None:
    """A 192x108 video whose moving texture fills only ``box`` (x, y, w, h); black
    (RGB 0) elsewhere, as a letterboxed or pillarboxed transfer is."""
    rng = np.random.default_rng(7)
    texture = cv2.GaussianBlur(rng.integers(30, 230, (108, 420, 3), dtype=np.uint8), (5, 5), 0)
    x, y, w, h = box
    video = np.zeros((frames, 108, 192, 3), np.uint8)
    for t in range(frames):
        video[t, y : y + h, x : x + w] = texture[y : y + h, 4 * t + x : 4 * t + x + w]
    with open(path, "wb") as f:
        f.write(encode_mp4(video, 12.0, crf=18))


def test_border_crop_finds_bars_and_leaves_dark_pictures_alone() -> None:
    luma = np.full((100, 160), 16, np.uint8)
    luma[12:88, 20:140] = 120  # picture
    luma[11, 20:140] = 22  # ringing next to the picture: still bar-dark
    assert border_crop([luma], 16, 10) == (20, 12, 120, 76)
    luma[13, :] = 16  # a black line inside the picture does not count
    assert border_crop([luma, luma], 16, 10) == (20, 12, 120, 76)
    moving = luma.copy()
    moving[5, 70] = 200  # one frame shows something up there: not a bar from that row
    assert border_crop([luma, moving], 16, 10) == (20, 6, 120, 82)
    assert border_crop([np.full((100, 160), 120, np.uint8)], 16, 10) is None  # no bars
    dark = np.full((100, 160), 18, np.uint8)
    dark[45:55, 70:90] = 90  # mostly black: a fade, not a letterbox
    assert border_crop([dark], 16, 10) is None
    yuv = rgb_to_i420(np.zeros((100, 160, 3), np.uint8))
    assert crop_i420(yuv, (20, 12, 120, 76)).shape == (114, 120)


@pytest.mark.parametrize(
    "box",
    [(0, 14, 192, 80), (32, 0, 128, 108), (0, 0, 192, 108)],
    ids=["letterbox", "pillarbox", "full"],
)
def test_split_crops_black_bars_off_clip_payloads(
    tmp_path: Any, box: tuple[int, int, int, int]
) -> None:
    path = str(tmp_path / "boxed.mp4")
    _boxed_video(path, box)
    probed = Probe(ProbeConfig())({"source": np.array([path], dtype=object)})
    cfg = SplitConfig(min_clip_s=0.5, work_max_area=192 * 108)
    (row,) = batch_to_rows(Split(cfg)(probed))
    frames, _ = decode_mp4(row["clip_bytes"])
    if box == (0, 0, 192, 108):
        assert row["crop"] is None and frames.shape[1:3] == (108, 192)
        return
    assert row["crop"] == list(box)
    assert frames.shape[1:3] == (box[3], box[2])
    assert frames[:, :2].mean() > 40 and frames[:, -2:].mean() > 40  # no bar left
    assert frames[:, :, :2].mean() > 40 and frames[:, :, -2:].mean() > 40
    (whole,) = batch_to_rows(Split(replace(cfg, crop_borders=False))(probed))
    assert whole["crop"] is None and decode_mp4(whole["clip_bytes"])[0].shape[1:3] == (108, 192)
    # probe saw the bars, so split decodes larger: the cropped picture fills the budget
    assert probed["src_picture_fraction"][0] == pytest.approx(box[2] * box[3] / (192 * 108))
    budget = 96 * 54
    (small,) = batch_to_rows(Split(replace(cfg, work_max_area=budget))(probed))
    h, w = decode_mp4(small["clip_bytes"])[0].shape[1:3]
    assert 0.9 * budget <= w * h <= budget * 1.02
    assert w / h == pytest.approx(box[2] / box[3], rel=0.06)
    assert small["crop"] == pytest.approx(list(box), abs=3)


def test_probe_reads_no_more_frames_when_the_first_shows_no_bars() -> None:
    from pipeline.stages.probe import _picture_fraction

    class NoSeeking:
        def seek(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("probe sought frames for bars the first frame rules out")

    lit = np.full((64, 96, 3), 120, np.uint8)
    first = av.VideoFrame.from_ndarray(lit, format="rgb24")
    assert _picture_fraction(NoSeeking(), None, 10.0, first) == 1.0
    lit[:8] = 0  # a bar at the top: probe must look further
    with pytest.raises(AssertionError, match="sought"):
        _picture_fraction(
            NoSeeking(),
            types.SimpleNamespace(time_base=None, start_time=0),
            10.0,
            av.VideoFrame.from_ndarray(lit, format="rgb24"),
        )


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_transparent_pixels_are_white_not_the_colour_they_hide(tmp_path: Any, decoder: str) -> None:
    """A transparent PNG (hiding black margins, which would also read as black bars)
    and a video with alpha (PNG in MOV, hiding magenta) reach the payload composited
    over white, as a viewer shows them, whichever decoder is configured (decord drops
    alpha: such a source goes to PyAV)."""
    from PIL import Image

    rgba = np.zeros((96, 128, 4), np.uint8)  # transparent black all round
    rgba[16:80, 24:104] = (0, 160, 0, 255)  # an opaque green box
    rgba[16:80, 24:40, 3] = 128  # its left strip half transparent
    png = os.path.join(tmp_path, "logo.png")
    Image.fromarray(rgba, "RGBA").save(png)
    mov = os.path.join(tmp_path, "alpha.mov")
    with av.open(mov, "w") as container:
        stream = container.add_stream("png", rate=12)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "rgba"
        for i in range(24):
            frame = np.zeros((96, 128, 4), np.uint8)
            frame[..., :3] = (255, 0, 255)  # magenta under full transparency
            frame[40:56, 4 * i : 4 * i + 16] = (0, 0, 200, 255)  # a moving blue square
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgba")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = Split(SplitConfig(min_clip_s=0.5, decoder=decoder))(probe_batch(png, mov))
    image, video = (decode_mp4(payload)[0] for payload in out["clip_bytes"])
    assert image.shape == (1, 96, 128, 3) and out["crop"][0] is None  # no bars cut off
    assert (image[0, :8] >= 250).all() and (image[0, :, -8:] >= 250).all()  # white margins
    assert np.abs(image[0, 48, 80].astype(int) - (0, 160, 0)).max() <= 6
    assert np.abs(image[0, 48, 30].astype(int) - (128, 207, 128)).max() <= 8  # half over white
    assert len(video) > 1
    assert (video[:, :20] >= 245).all(), video[:, :20].min(axis=(0, 1, 2))  # not magenta


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_an_mp4_trimmed_by_its_edit_list_starts_at_its_first_shown_frame(
    tmp_path: Any, decoder: str
) -> None:
    """A file cut without re-encoding starts at a keyframe before the cut; its edit list
    hides the frames up to the cut. Frames are counted and numbered from the first shown
    one and end at the last (decord counts the hidden ones too, and repeats the last
    frame for them: such a file is decoded by PyAV)."""
    whole, trimmed = str(tmp_path / "whole.mp4"), str(tmp_path / "trimmed.mp4")
    synth_video(
        whole,
        width=160,
        height=96,
        fps=12,
        shots=[30, 30, 30],
        seed=5,
        options={"g": "12", "bf": "0"},
    )
    with av.open(whole) as source, av.open(trimmed, "w") as out:
        stream = source.streams.video[0]
        copy = out.add_stream_from_template(stream)
        step = round(1 / (12 * stream.time_base))  # one frame in the stream's time base
        for packet in source.demux(stream):
            if packet.dts is None or packet.pts < 12 * step:
                continue  # from the keyframe at frame 12; the cut at frame 14
            packet.pts -= 14 * step
            packet.dts -= 14 * step
            packet.stream = copy
            out.mux(packet)
    probed = probe_batch(trimmed)
    # the container counts 78 frames, two of them hidden
    assert (probed["src_num_frames"][0], probed["src_num_frames_exact"][0]) == (76, True)
    rows = batch_to_rows(Split(SplitConfig(min_clip_s=0.5, decoder=decoder))(probed))
    # the cuts at frames 30 and 60 of the whole file, 14 frames in: 16 and 46, of 76
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 16), (16, 46), (46, 76)]
    assert [len(decode_mp4(r["clip_bytes"])[0]) for r in rows] == [16, 30, 30]


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
def test_the_largest_of_several_video_streams_is_the_video(tmp_path: Any, decoder: str) -> None:
    """A camera's file whose first track is a small proxy (or a depth map), the picture
    second, and a larger thumbnail of one frame third: the picture is the source, as the
    ``ffmpeg`` command takes it, under either decoder (decord would pick a stream of its
    own: such a file is decoded by PyAV)."""
    from pipeline.decode import _decord_misreads
    from pipeline.synth import iter_synth_frames

    path = str(tmp_path / "camera.mp4")
    proxy = iter_synth_frames(96, 64, [24, 24], seed=1)  # its cut at frame 24
    picture = iter_synth_frames(320, 240, [16, 32], seed=2)  # its cut at 16
    with av.open(path, "w") as out:
        streams = []
        for w, h in ((96, 64), (320, 240), (640, 480)):
            stream = out.add_stream("libx264", rate=12)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            streams.append(stream)
        thumbnail = np.full((480, 640, 3), 200, np.uint8)
        for packet in streams[2].encode(av.VideoFrame.from_ndarray(thumbnail, format="rgb24")):
            out.mux(packet)
        for images in zip(proxy, picture, strict=True):
            for stream, image in zip(streams[:2], images, strict=True):
                for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    out.mux(packet)
        for stream in streams:
            for packet in stream.encode():
                out.mux(packet)
    with av.open(path) as container:
        assert [s.frames for s in container.streams.video] == [48, 48, 1]
    probed = probe_batch(path)
    assert (probed["width"][0], probed["height"][0]) == (320, 240)
    rows = batch_to_rows(Split(SplitConfig(min_clip_s=0.5, decoder=decoder))(probed))
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 16), (16, 48)]
    assert [decode_mp4(r["clip_bytes"])[0].shape for r in rows] == [
        (16, 240, 320, 3),
        (32, 240, 320, 3),
    ]
    assert _decord_misreads(path)


@pytest.mark.parametrize("decoder", ["pyav", "decord"])
@pytest.mark.parametrize("encoder", ["libvpx-vp9", "libvpx"])
def test_a_vp8_or_vp9_alpha_layer_is_read(tmp_path: Any, decoder: str, encoder: str) -> None:
    """WebM keeps a VP8 or VP9 video's alpha as a separate layer, which FFmpeg's own
    decoders drop: the colour under transparent pixels (red here) showed. libvpx reads
    it, from the start and after a seek, so they come out white."""
    from pipeline.decode import iter_pyav

    path = os.path.join(tmp_path, "sticker.webm")
    with av.open(path, "w") as container:
        stream = container.add_stream(encoder, rate=12)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuva420p"
        if encoder == "libvpx":  # VP8's alpha layer needs no alternate reference frames
            stream.options = {"auto-alt-ref": "0"}
            stream.codec_context.bit_rate = 1_000_000
        for i in range(24):
            frame = np.zeros((96, 128, 4), np.uint8)
            frame[..., 0], frame[..., 3] = 200, 255  # opaque red
            frame[:, :48, 3] = 0  # the left part transparent
            frame[40:56, 64 + i : 80 + i, :3] = (0, 0, 200)  # a moving blue square
            image = av.VideoFrame.from_ndarray(frame, format="rgba").reformat(format="yuva420p")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = Split(SplitConfig(min_clip_s=0.5, decoder=decoder))(probe_batch(path))
    (video,) = (decode_mp4(payload)[0] for payload in out["clip_bytes"])
    assert len(video) == 24
    assert (video[:, 4:-4, 4:40] >= 245).all(), video[:, :, :40].min()  # white, not red
    assert np.abs(video[:, 8, 100].astype(int) - (200, 0, 0)).max() <= 12  # opaque red
    with av.open(path) as container:  # a range's decode starts with a seek
        later = list(iter_pyav(container, (128, 96), 128 * 96, start_frame=12))
    assert [f.num for f in later] == list(range(12, 24))
    from pipeline.decode import i420_to_rgb

    rgb = i420_to_rgb(later[0].yuv, later[0].colorspace, later[0].color_range)
    assert (rgb[4:-4, 4:40] >= 245).all()


@pytest.mark.parametrize(
    "name",
    [
        "counter.mp4",
        "fades.mp4",
        "issue-134-rotate.mp4",
        "mmaction2_test.avi",
        "mmaction2_test.mp4",
        "synth.ts",
    ],
)
def test_decord_gives_the_clips_pyav_gives(name: str, tmp_path: os.PathLike[str]) -> None:
    """Frame numbers, times and payload sizes do not depend on the decoder. decord
    repeats frames of an MPEG-TS with B-frames (it found other cuts), and gives the Xvid
    AVI's first frames no time (about -3.7e17 s: a clip ended 3.7e17 s after it began):
    such containers decode through PyAV."""
    if name == "synth.ts":
        path = os.path.join(tmp_path, name)
        synth_video(path, width=160, height=96, fps=25, shots=[36, 30, 40], seed=1)
    else:
        path = shared(name)
    probed = probe_batch(path)
    by = {
        decoder: batch_to_rows(Split(SplitConfig(decoder=decoder))(probed))
        for decoder in ("pyav", "decord")
    }
    for rows in by.values():
        assert rows[0]["clip_id"], rows[0]["src_error"]
    spans = {
        decoder: [(r["start_frame"], r["end_frame"]) for r in rows] for decoder, rows in by.items()
    }
    assert spans["decord"] == spans["pyav"]
    for a, b in zip(by["pyav"], by["decord"], strict=True):
        assert (b["start_s"], b["end_s"]) == pytest.approx((a["start_s"], a["end_s"]), abs=1e-3)
        assert decode_mp4(b["clip_bytes"])[0].shape == decode_mp4(a["clip_bytes"])[0].shape


def test_decord_frame_times_that_do_not_rise_hand_the_decode_to_pyav() -> None:
    """Whatever the container, frames decord gives no rising times (the Xvid AVI's first
    ones at about -3.7e17 s) are decoded by PyAV, with its times."""
    path = shared("mmaction2_test.avi")
    times = {
        backend: [
            (f.num, round(f.time_s, 6))
            for f in iter_source_frames(path, (320, 240), 0, backend=backend)
        ]
        for backend in ("pyav", "decord")
    }
    assert times["decord"] == times["pyav"] and times["pyav"][0] == (0, 0.04)


@pytest.mark.parametrize(
    ("codec", "ext", "fps"), [("libx264", "h264", 24), ("libx265", "hevc", 30)]
)
def test_a_raw_stream_is_timed_by_the_rate_its_bitstream_states(
    tmp_path: os.PathLike[str], codec: str, ext: str, fps: int
) -> None:
    """A raw elementary stream has no container timing (FFmpeg's demuxer assumes 25
    fps); the rate in its bitstream (VUI) times the clips."""
    from pipeline.synth import iter_synth_frames

    path = os.path.join(tmp_path, f"camera.{ext}")
    frames = list(iter_synth_frames(96, 64, [fps, 2 * fps], seed=5))
    with av.open(path, "w", format=ext) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=none"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    probed = Probe()({"source": np.array([path], dtype=object)})
    (row,) = batch_to_rows(probed)
    assert row["fps"] == pytest.approx(fps) and row["src_duration_s"] == pytest.approx(3.0)
    clips = batch_to_rows(Split(SplitConfig(min_clip_s=0.5))(probed))
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, fps), (fps, 3 * fps)]
    assert [(c["start_s"], c["end_s"]) for c in clips] == [
        pytest.approx((0.0, 1.0)),
        pytest.approx((1.0, 3.0)),
    ]
