"""Straggler handling: a long source split into frame ranges processed in parallel on
Ray gives exactly the clips of a single-range run, and the driver stitches every
source back before it is written."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline import decode as decode_mod
from pipeline.config import load_config
from pipeline.graph import build
from pipeline.stages import split as split_mod
from pipeline.stages.base import batch_to_rows, rows_to_batch
from pipeline.stages.probe import Probe, open_source
from pipeline.stages.split import Split
from pipeline.stitching import RangeStitcher, expand_ranges
from pipeline.synth import synth_video
from pipeline.writer import read_index, read_sources


def _probe(cfg, path: str):
    return Probe(cfg.probe)(rows_to_batch([{"source": path}]))


def test_expand_ranges_and_stitch_without_ray(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "long.mp4")
    # cuts at 30, 59 and 61 frames: one right at a range boundary, one just after it
    synth_video(path, width=96, height=64, fps=12.0, shots=[30, 29, 2, 45], seed=3)
    cfg = load_config(split={"min_clip_s": 0.5, "max_clip_s": 3.0})
    probed = _probe(cfg, path)
    whole = Split(cfg.split)(probed)

    ranged = expand_ranges(probed, cfg.split, range_frames=40)
    assert list(ranged["range_count"]) == [3, 3, 3]
    # the source was demuxed once, here: its ranges carry the frame table and never
    # demux the whole file themselves
    tables = {bytes(t) for t in ranged["range_frame_pts"]}
    assert len(tables) == 1 and len(tables.pop()) == 8 * 106
    demuxed: list[str] = []
    real_table = decode_mod.frame_pts_table
    monkeypatch.setattr(
        decode_mod, "frame_pts_table", lambda c: demuxed.append("x") or real_table(c)
    )
    stitcher = RangeStitcher()
    out = []
    # feed the ranges' split rows in reverse order, one range per batch, as Ray may;
    # the middle range streamed clip by clip, and sent twice (a retried task)
    streamed = replace(cfg.split, flush_mib=1e-6)
    for i in reversed(range(3)):
        one = {k: v[i : i + 1] for k, v in ranged.items()}
        parts = list(Split(streamed).stream(one)) * 2 if i == 1 else [Split(cfg.split)(one)]
        for part in parts:
            for batch in stitcher(part):
                out.extend(batch_to_rows(batch))
        if i:
            assert out == [], "a source must not be emitted before all its ranges arrived"
    assert stitcher.unfinished() == []
    assert demuxed == []
    assert all(r["range_frame_pts"] is None for r in out)  # not copied to every clip
    spans = [(r["start_frame"], r["end_frame"]) for r in out]
    assert spans == [(r["start_frame"], r["end_frame"]) for r in batch_to_rows(whole)]
    assert [r["clip_id"] for r in out] == list(whole["clip_id"])
    assert {r["src_num_clips"] for r in out} == {len(out)}


def test_a_source_whose_times_jump_back_stays_one_range(tmp_path) -> None:
    """Two recordings joined byte for byte (``cat a.ts b.ts``): the second one's times
    start again at zero, so a seek by time would land in the first one and the frame
    table would count each time once (half the frames). Such a source is not ranged,
    and its single decode keeps every clip of both halves."""
    parts = []
    for seed in (5, 6):
        part = tmp_path / f"part{seed}.ts"
        synth_video(str(part), width=96, height=64, fps=12.0, shots=[30, 30], seed=seed)
        parts.append(part.read_bytes())
    path = tmp_path / "joined.ts"
    path.write_bytes(b"".join(parts))
    with open_source(str(path)) as container, pytest.raises(decode_mod.TimestampJump):
        decode_mod.frame_pts_table(container)
    cfg = load_config(split={"min_clip_s": 0.5, "max_clip_s": 3.0})
    probed = _probe(cfg, str(path))
    ranged = expand_ranges(probed, cfg.split, range_frames=20)
    assert list(ranged["range_count"]) == [1] and ranged["range_start_frame"][0] is None
    rows = batch_to_rows(Split(cfg.split)(ranged))
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [
        (0, 30),
        (30, 60),
        (60, 90),
        (90, 120),
    ]
    # times go on rising through the join: 12 fps, frame 60 at 5 s
    assert [round(r["start_s"], 3) for r in rows] == [0.0, 2.5, 5.0, 7.5]


def test_a_raw_stream_without_times_stays_one_range(tmp_path) -> None:
    """A raw H.264 stream's packets carry no presentation times: no range could seek to
    its frames (each would decode nothing, and its clips would be lost). It is not
    ranged, its single decode keeps every clip, and a seek into it fails loudly."""
    path = str(tmp_path / "raw.h264")
    cuts = synth_video(path, width=96, height=64, fps=12.0, shots=[30, 29, 31], seed=4)
    with (
        open_source(path) as container,
        pytest.raises(decode_mod.Unseekable, match="presentation time"),
    ):
        decode_mod.frame_pts_table(container)
    cfg = load_config(split={"min_clip_s": 0.5, "max_clip_s": 3.0})
    probed = _probe(cfg, path)
    ranged = expand_ranges(probed, cfg.split, range_frames=20)
    assert list(ranged["range_count"]) == [1] and ranged["range_start_frame"][0] is None
    rows = batch_to_rows(Split(cfg.split)(ranged))
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [
        (0, cuts[0]),
        (cuts[0], cuts[1]),
        (cuts[1], 90),
    ]
    with pytest.raises(decode_mod.Unseekable):
        next(decode_mod.iter_source_frames(path, None, 96 * 64, start_frame=40))


def test_ranges_that_would_decode_their_predecessor_again_are_merged(tmp_path) -> None:
    """A seek starts decoding at a keyframe. In a stream with one keyframe (infinite GOP,
    as low-latency encoders with intra refresh write) every range would decode all the
    frames before it again: it stays one range. A keyframe past the first range's start
    keeps the ranges from there on."""
    cfg = load_config(split={"min_clip_s": 0.5, "max_clip_s": 3.0})

    def video(name: str, shots: list[int], gop: int) -> str:
        path = str(tmp_path / name)
        options = {"g": str(gop), "sc_threshold": "0", "bf": "0"}  # keyframes every gop
        synth_video(path, width=96, height=64, fps=12.0, shots=shots, seed=3, options=options)
        return path

    one_key = video("one_key.mp4", [30, 29, 2, 45], gop=1000)
    keyframes: list[int] = []
    with open_source(one_key) as container:
        assert len(decode_mod.frame_pts_table(container, keyframes=keyframes)) == 106
    assert keyframes == [0]
    probed = _probe(cfg, one_key)
    ranged = expand_ranges(probed, cfg.split, range_frames=30)
    assert list(ranged["range_count"]) == [1]
    assert batch_to_rows(Split(cfg.split)(ranged))[-1]["end_frame"] == 106

    two_keys = video("two_keys.mp4", [60, 46], gop=60)
    ranged = expand_ranges(_probe(cfg, two_keys), cfg.split, range_frames=30)
    # frame_ranges cuts 0, 26, 53, 80; from 26 and 53 a seek decodes from frame 0 again
    assert list(ranged["range_start_frame"]) == [0, 80]
    assert list(ranged["range_end_frame"]) == [80, None]


def test_stitcher_takes_batches_as_ray_hands_them_over() -> None:
    """Ranges that found no clip arrive as placeholder rows; in a batch of only those,
    Ray turns the empty clip_id and frame columns into NaN. They stitch to the one
    placeholder row of the source, not to clips with NaN frames."""
    nan = np.full(2, np.nan, dtype=np.float32)
    batch = {
        "source": np.array(["s.mp4", "s.mp4"], dtype=object),
        "clip_id": nan.copy(),
        "start_frame": nan.copy(),
        "end_frame": nan.copy(),
        "src_status": np.array(["done", "done"], dtype=object),
        "src_num_clips": np.zeros(2, dtype=np.int64),
        "range_index": np.arange(2),
        "range_count": np.full(2, 2),
    }
    (out,) = list(RangeStitcher()(batch))
    (row,) = batch_to_rows(out)
    assert row["clip_id"] is None and row["src_num_clips"] == 0 and row["src_status"] == "done"


def test_short_sources_are_not_ranged(tmp_path) -> None:
    path = str(tmp_path / "short.mp4")
    synth_video(path, width=64, height=64, fps=12.0, shots=[20], seed=1)
    cfg = load_config()
    out = expand_ranges(_probe(cfg, path), cfg.split, range_frames=100)
    assert list(out["range_count"]) == [1] and out["range_start_frame"][0] is None


@pytest.mark.slow
def test_ranged_build_equals_single_range(tmp_path, tmp_path_factory) -> None:
    path = tmp_path / "videos" / "long.mp4"
    path.parent.mkdir()
    synth_video(str(path), width=96, height=64, fps=12.0, shots=[30, 29, 2, 45], seed=3)
    cfg = load_config(
        preset="tiny",
        model_cache=str(tmp_path_factory.mktemp("models")),
        # every clip handed on as its own chunk: Ray Data streams split's generator
        split={"min_clip_s": 0.5, "max_clip_s": 3.0, "flush_mib": 1e-6},
        ray={"straggler_range_frames": 40, "progress_interval_s": 0},
    )
    root = str(tmp_path / "corpus")
    summary = build([str(path.parent)], root, cfg, echo=lambda s: None)
    split = summary["per_stage"]["split"]
    assert split["rows_in"] == summary["per_stage"]["ranges"]["rows_out"] > 1
    assert split["batches"] >= split["rows_in"]
    index = read_index(root).to_pylist()
    expected = Split(cfg.split)(_probe(cfg, str(path.resolve())))
    assert sorted(r["clip_id"] for r in index) == sorted(expected["clip_id"])
    (source,) = read_sources(root).to_pylist()
    assert source["num_clips"] == len(index) and source["status"] == "done"
    assert source["num_frames"] == 106  # the exact count, from the last range's last chunk


def test_a_range_inside_one_long_shot_stops_at_its_end(tmp_path) -> None:
    """A range no shot starts in stops decoding at its end instead of decoding on to
    the next cut (the whole rest of a long single-shot video); results still stitch
    to the single-range run."""
    path = str(tmp_path / "one_shot.mp4")
    # a keyframe every 2 s: each range seeks near its start (see seekable_ranges)
    synth_video(
        path, width=64, height=48, fps=12.0, shots=[20, 200, 20], seed=5, options={"g": "24"}
    )
    cfg = load_config(split={"min_clip_s": 0.5, "max_clip_s": 3.0})
    probed = _probe(cfg, path)
    ranged = expand_ranges(probed, cfg.split, range_frames=48)
    assert list(ranged["range_count"]) == [5] * 5
    middle = {k: v[2:3] for k, v in ranged.items()}  # frames 96..144, inside the long shot
    decoded: list[int] = []
    real = split_mod.iter_source_frames

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        for frame in real(*args, **kwargs):
            decoded.append(frame.num)
            yield frame

    split_mod.iter_source_frames = counting
    try:
        (row,) = batch_to_rows(Split(cfg.split)(middle))
    finally:
        split_mod.iter_source_frames = real
    assert row["clip_id"] is None and row["src_status"] == "done"
    end = int(middle["range_end_frame"][0])
    assert max(decoded) < end + 20, (end, max(decoded))  # not on to the cut at 220
    stitcher = RangeStitcher()
    out = []
    for i in range(5):
        for batch in stitcher(Split(cfg.split)({k: v[i : i + 1] for k, v in ranged.items()})):
            out.extend(batch_to_rows(batch))
    whole = Split(cfg.split)(probed)
    assert [r["clip_id"] for r in out] == list(whole["clip_id"])


def test_a_slow_frame_table_leaves_the_ranges_to_demux_on_their_own(tmp_path) -> None:
    path = str(tmp_path / "long.mp4")
    synth_video(path, width=96, height=64, fps=12.0, shots=[30, 29, 2, 45], seed=3)
    with open_source(path) as container, pytest.raises(TimeoutError, match="frame table"):
        decode_mod.frame_pts_table(container, timeout_s=1e-9)
    cfg = load_config(split={"min_clip_s": 0.5, "max_clip_s": 3.0, "timeout_s": 1e-9})
    ranged = expand_ranges(_probe(cfg, path), cfg.split, range_frames=40)
    assert list(ranged["range_count"]) == [3, 3, 3]  # from the probed frame count
    assert all(t is None for t in ranged["range_frame_pts"])


def test_a_frame_held_for_minutes_ends_its_clip_at_max_clip_s(tmp_path) -> None:
    """A screen recording paused for ten minutes holds one frame that long. Its clip
    lasted the ten minutes, with a payload of 9,601 copies of the frame at 16 fps;
    now it ends max_clip_s after it starts, whole or split in ranges."""
    from fractions import Fraction

    import av

    from pipeline.synth import iter_synth_frames
    from pipeline.video import decode_mp4

    path = str(tmp_path / "paused.mp4")
    ms = Fraction(1, 1000)
    pts = [round(i * 1000 / 24) for i in range(48)]
    pts += [602_000 + round(i * 1000 / 24) for i in range(48)]  # after 600 s of nothing
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.codec_context.time_base = ms
        for rgb, at in zip(iter_synth_frames(96, 64, [48, 48], seed=2), pts, strict=True):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = at, ms
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    cfg = load_config(split={"min_clip_s": 1.0, "max_clip_s": 10.0, "work_fps": 16.0})
    probed = _probe(cfg, path)
    assert bool(probed["src_vfr"][0])
    whole = batch_to_rows(Split(cfg.split)(probed))
    spans = [(r["start_frame"], r["end_frame"], r["start_s"], r["end_s"]) for r in whole]
    assert [s[:2] for s in spans] == [(0, 47), (47, 48), (48, 96)]
    assert spans[1][2:] == pytest.approx((47 / 24, 47 / 24 + 10.0), abs=0.01)
    assert spans[2][2] == pytest.approx(602.0, abs=0.01)
    for row in whole:
        assert row["end_s"] - row["start_s"] <= 10.0 + 1e-6
        assert len(decode_mp4(row["clip_bytes"])[0]) <= 10 * 16 + 1
    stitcher, out = RangeStitcher(), []
    ranged = expand_ranges(probed, cfg.split, range_frames=30)
    assert len(ranged["source"]) == 2
    for i in range(len(ranged["source"])):
        one = {k: v[i : i + 1] for k, v in ranged.items()}
        for batch in stitcher(Split(cfg.split)(one)):
            out.extend(batch_to_rows(batch))
    assert [(r["start_frame"], r["end_frame"], r["start_s"], r["end_s"]) for r in out] == spans
