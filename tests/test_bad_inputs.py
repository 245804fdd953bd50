"""Bad input never crashes a build, never hangs, never disappears.

The corpus (:func:`pipeline.synth.bad_input_corpus`) goes through Probe -> Split ->
Score -> Decide without Ray: every source ends in exactly one terminal outcome (clips,
or one placeholder row with a reason naming the cause), no temp file is left, the
whole corpus finishes in bounded time, a per-source timeout exists, memory stays flat
in video length, and ``s3://`` sources are streamed, not downloaded.

Run: ``python -m pytest tests/test_bad_inputs.py -q``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from pipeline.sources import expand_sources
from pipeline.stages.base import batch_to_rows
from pipeline.stages.decide import Decide, DecideConfig
from pipeline.stages.probe import Probe, ProbeConfig
from pipeline.stages.score import Score, ScoreConfig
from pipeline.stages.split import Split, SplitConfig
from pipeline.synth import bad_input_corpus, iter_synth_frames, synth_video
from schemas import CLIP_STATUSES, SOURCE_STATUSES

# What each file must end as: ("error", words the reason names) or ("clips", None) or
# ("done", words of the no-clip note).
EXPECTED: dict[str, tuple[str, str | re.Pattern[str] | None]] = {
    "zero_bytes.mp4": ("error", "not a readable video or image: an empty file (0 bytes)"),
    "random_bytes.mp4": ("error", "not a readable video"),
    "text.mp4": ("error", "not a readable video"),
    "no_moov.mp4": ("error", "an MP4/MOV without its index (no moov box): the file was cut off"),
    # the index is at the front: the frames before the cut make clips, and a note
    "truncated_mdat.mp4": ("clips", "file cut off"),
    # decoding goes on past the corrupt bytes; the frames they damage are left out: from
    # the damaged frame 16 to the next keyframe, and with FFmpeg's frame threads under
    # load the B-frames 14 and 15 that refer to it may fail too (rather than conceal it)
    "corrupt_mid.mp4": ("clips", re.compile(r"frames left out \(frames 1[4-6]\.\.24\)")),
    "audio_only.mp4": ("error", "no video stream (streams: audio)"),
    "audio_cover_art.mp4": ("error", "no video stream (streams: audio, cover art)"),
    "image_named.mp4": ("clips", None),  # a PNG whatever its name: a 1-frame clip
    "one_frame.mp4": ("done", "no clips"),
    "tiny_2x2.mp4": ("error", "has a side under 16 px"),
    "odd_641x359.mp4": ("clips", None),
    "extreme_16x1024.mp4": ("clips", None),
    "huge_8192.mov": ("error", "8192x8192 exceeds"),
    "vfr.mkv": ("clips", None),
    "hevc_10bit.mp4": ("clips", None),
    "vp9.webm": ("clips", None),
    "animated.gif": ("clips", None),
    "rotated_90.mp4": ("clips", None),
    "vidéo 東京 clip.mp4": ("clips", None),
    "two_video_streams.mkv": ("clips", None),
    "recorded.webm": ("clips", None),  # no duration in its header: found from the packets
    "raw.h264": ("clips", None),
    # demuxes cleanly to where it stops: clips before it, and a note
    "cut_off.mkv": ("clips", "file cut off"),
    "resized.mkv": ("clips", None),  # a clip for each picture size
    "animated.webp": ("clips", None),  # decoded by Pillow: FFmpeg cannot
    "truncated_animated.webp": ("error", "an animated WebP truncated inside frame"),
    "static_long.mp4": ("clips", None),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("bad"))
    made = bad_input_corpus(root, long_minutes=15.0)
    assert set(made) == set(EXPECTED)
    return root


def _says(note: str, words: str | re.Pattern[str]) -> bool:
    return bool(words.search(note)) if isinstance(words, re.Pattern) else words in note


def run_stages(paths: list[str], split_cfg: SplitConfig | None = None) -> list[dict[str, Any]]:
    batch: dict[str, np.ndarray] = {"source": np.array(paths, dtype=object)}
    batch = Probe(ProbeConfig())(batch)
    batch = Split(split_cfg or SplitConfig())(batch)
    batch = Score(ScoreConfig())(batch)
    batch = Decide(DecideConfig())(batch)
    return batch_to_rows(batch)


def test_every_bad_input_ends_in_one_terminal_outcome(
    corpus: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = os.path.join(tmp_path, "tmp")
    os.makedirs(private_tmp)
    monkeypatch.setenv("TMPDIR", private_tmp)
    monkeypatch.setattr(tempfile, "tempdir", private_tmp)
    before = sorted(os.listdir(corpus))
    t0 = time.monotonic()
    by_source: dict[str, list[dict[str, Any]]] = {}
    for name in EXPECTED:  # one source per batch, as the graph runs probe and split
        for row in run_stages([os.path.join(corpus, name)]):
            by_source.setdefault(str(row["source"]), []).append(row)
    elapsed = time.monotonic() - t0
    assert sorted(os.path.basename(s) for s in by_source) == sorted(EXPECTED)
    for source, rows in by_source.items():
        name = os.path.basename(source)
        kind, words = EXPECTED[name]
        statuses = {r["src_status"] for r in rows}
        assert len(statuses) == 1 and statuses <= set(SOURCE_STATUSES), (name, statuses)
        num_clips = int(rows[0]["src_num_clips"])
        if kind == "clips":
            assert rows[0]["src_status"] == "done" and num_clips == len(rows) >= 1, name
            assert all(r["clip_id"] and r["status"] in CLIP_STATUSES for r in rows), name
            if words:  # a note on a source that is done
                note = rows[-1]["src_error"]
                assert source in note and _says(note, words), (name, note)
            for r in rows:  # a rejected or failed clip says why
                assert r["status"] == "kept" or r["reasons"] is not None or r["error"], name
        else:
            assert len(rows) == 1 and rows[0]["clip_id"] is None and num_clips == 0, name
            assert rows[0]["src_status"] == kind, (name, rows[0]["src_error"])
            reason = rows[0]["src_error"]
            assert reason and source in reason and str(words) in reason, (name, reason)
    assert os.listdir(private_tmp) == [], "temp files left behind"
    assert sorted(os.listdir(corpus)) == before
    assert elapsed < 240, f"the corpus took {elapsed:.0f} s"


@pytest.mark.timeout(120)
def test_links_pipes_and_folders_found_as_sources_are_error_rows(tmp_path: Any) -> None:
    """What a folder walk lists but is no file (a link into a disk not mounted, a named
    pipe, a folder with a video's name) ends as one error row saying what it is, at
    once: opening a named pipe would otherwise wait forever for a writer."""
    videos = tmp_path / "videos"
    (videos / "folder.mp4").mkdir(parents=True)
    (videos / "unmounted.mp4").symlink_to("/mnt/disk9/unmounted.mp4")
    os.mkfifo(videos / "pipe.mov")
    sources = expand_sources([str(videos)])
    assert [os.path.basename(s) for s in sources] == ["pipe.mov", "unmounted.mp4"]
    sources.append(str(videos / "folder.mp4"))  # as a source list may name it
    expected = {
        "pipe.mov": "not a regular file but a named pipe",
        "unmounted.mp4": "a broken link (its target /mnt/disk9/unmounted.mp4 does not exist)",
        "folder.mp4": "not a regular file but a folder",
    }
    for source in sources:
        (row,) = run_stages([source])
        assert row["src_status"] == "error" and row["clip_id"] is None
        assert row["src_error"].startswith(f"{source}: ")
        assert expected[os.path.basename(source)] in row["src_error"], row["src_error"]


def test_file_names_of_any_bytes_end_as_rows_a_table_can_hold(tmp_path: Any) -> None:
    """Names with a newline, a backslash, URL and glob characters are built like any
    other; a name that is not UTF-8 (a Latin-1 name copied from an old disk), in a
    file or in a folder above it, is listed with its bytes written ``\\xe9`` and ends as
    an error row saying so: corpus tables hold names as text."""
    import pyarrow as pa

    videos = tmp_path / "videos"
    videos.mkdir()
    base = str(tmp_path / "base.mp4")
    synth_video(base, width=96, height=64, fps=24, shots=[30], seed=7)
    odd = ["new\nline.mp4", "back\\slash.mp4", "pct%20 plus+ hash#q?.mp4", "*glob[1].mp4"]
    for name in odd:
        os.link(base, videos / name)
    os.link(base, os.path.join(bytes(videos), b"caf\xe9.mp4"))
    os.mkdir(os.path.join(bytes(videos), b"d\xe9j\xe0"))
    os.link(base, os.path.join(bytes(videos), b"d\xe9j\xe0", b"clip.mp4"))
    sources = expand_sources([str(videos)])
    misnamed = [str(videos / "caf\\xe9.mp4"), str(videos / "d\\xe9j\\xe0" / "clip.mp4")]
    assert sources == sorted([str(videos / name) for name in odd] + misnamed)
    for source in sources:
        rows = run_stages([source])
        pa.Table.from_pylist(rows)  # text columns encode
        if source in misnamed:
            (row,) = rows
            assert row["src_status"] == "error" and row["src_error"].startswith(f"{source}: ")
            assert "its path is not UTF-8 text (as bytes: b'/" in row["src_error"]
            assert "\\xe9" in row["src_error"] and "rename the file" in row["src_error"]
        else:
            assert rows[0]["src_status"] == "done" and rows[0]["source"] == source
            assert [r["status"] for r in rows] == ["kept"]


@pytest.mark.slow
def test_the_bad_corpus_builds_on_ray(
    corpus: str, tmp_path: os.PathLike[str], fresh_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole corpus through a real build: on Ray, blocks of failed sources (text
    columns all missing) and good ones meet in one actor batch, which must not fail.
    The build reads its sources from a list, which also names a file that is gone."""
    from pipeline.config import load_config
    from pipeline.graph import build
    from pipeline.writer import read_index, read_sources

    monkeypatch.setenv("RAY_ADDRESS", "local")
    cfg = load_config(preset="tiny", model_cache=os.path.join(tmp_path, "models"))
    out = os.path.join(tmp_path, "corpus")
    listed = os.path.join(tmp_path, "sources.txt")
    other = os.path.join(tmp_path, "other")
    os.makedirs(other)
    with open(os.path.join(other, "notes.txt"), "w") as f:
        f.write("not a video")
    with open(listed, "w") as f:
        f.write(f"# the bad corpus\n{corpus}\n{os.path.join(tmp_path, 'deleted.mp4')}\n{other}\n")
    said: list[str] = []
    summary = build([f"@{listed}"], out, cfg, echo=said.append)
    expected = {**EXPECTED, "deleted.mp4": ("error", "not found")}
    assert summary["sources_done"] == len(expected)  # every source reached an end
    # a file in a source folder that is no media file is not a source, and is said so
    assert summary["files_skipped"] == {".txt": 1}
    assert "note: skipped 1 file that is not video or image by extension (.txt 1)" in said
    clips: dict[str, int] = {}
    for row in read_index(out).to_pylist():
        clips[os.path.basename(row["source"])] = clips.get(os.path.basename(row["source"]), 0) + 1
    sources = {os.path.basename(r["source"]): r for r in read_sources(out).to_pylist()}
    assert sorted(sources) == sorted(expected)
    for name, (kind, words) in expected.items():
        row = sources[name]
        if kind == "clips":
            assert row["status"] == "done" and row["num_clips"] == clips[name] >= 1, row
            assert words is None or _says(row["error"], words), row
        else:
            assert row["status"] == kind and str(words) in row["error"], row
            assert name not in clips


def test_image_named_mp4_and_rotation_facts(corpus: str) -> None:
    probed = batch_to_rows(
        Probe()(
            {
                "source": np.array(
                    [os.path.join(corpus, n) for n in ("image_named.mp4", "rotated_90.mp4")],
                    dtype=object,
                )
            }
        )
    )
    image, rotated = probed
    assert image["src_media_kind"] == "image" and image["src_num_frames"] == 1
    assert rotated["src_rotation_deg"] == 90 and (rotated["width"], rotated["height"]) == (48, 96)
    assert rotated["src_coded_width"] == 96 and not rotated["src_has_audio"]


def _ranged(probed: dict[str, Any], cfg: SplitConfig, range_frames: int) -> list[dict[str, Any]]:
    """Rows of a source split in ranges of ``range_frames`` and stitched back."""
    from pipeline.stitching import RangeStitcher, expand_ranges

    ranged = expand_ranges(probed, cfg, range_frames=range_frames)
    assert len(ranged["source"]) > 1
    stitcher = RangeStitcher()
    out: list[dict[str, Any]] = []
    for i in range(len(ranged["source"])):
        one = {k: v[i : i + 1] for k, v in ranged.items()}
        for batch in stitcher(Split(cfg)(one)):
            out.extend(batch_to_rows(batch))
    return out


def _facts(rows: list[dict[str, Any]]) -> list[list[Any]]:
    keys = ("start_frame", "end_frame", "src_num_frames", "src_duration_s", "src_error")
    return [[r[k] for k in keys] for r in rows]


def _with_corrupt_packets(src: str, dst: str, frames: list[int]) -> list[int]:
    """A copy of the mp4 ``src`` whose packets of ``frames`` (presentation order) hold
    random bytes after their first NAL's length; returns the keyframes' numbers."""
    import av

    with av.open(src) as container:
        stream = container.streams.video[0]
        demuxed = [(p.pts, p.pos, p.size, p.is_keyframe) for p in container.demux(stream)]
    packets = sorted(p for p in demuxed if p[0] is not None and p[2])
    with open(src, "rb") as f:
        data = bytearray(f.read())
    rng = np.random.default_rng(7)
    for n in frames:
        _, pos, size, _ = packets[n]
        data[pos + 4 : pos + size] = rng.integers(
            0, 256, max(0, size - 4), dtype=np.uint8
        ).tobytes()
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return [i for i, p in enumerate(packets) if p[3]]


@pytest.fixture(scope="module")
def five_shots(tmp_path_factory: pytest.TempPathFactory) -> str:
    """10 s at 24 fps, five shots of 2 s, a keyframe at each cut (and only there)."""
    path = str(tmp_path_factory.mktemp("damage") / "good.mp4")
    gop = {"x264-params": "keyint=48:min-keyint=48:scenecut=0"}
    synth_video(path, width=128, height=72, fps=24, shots=[48] * 5, seed=3, options=gop)
    return path


def _spans(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(int(r["start_frame"]), int(r["end_frame"])) for r in rows if r["clip_id"]]


@pytest.mark.parametrize(
    "corrupt",
    [[100], [144], [200], list(range(100, 240))],
    ids=["mid-gop", "keyframe", "last-gop", "to-the-end"],
)
def test_decoding_goes_on_past_corrupt_packets_and_leaves_out_their_frames(
    five_shots: str, tmp_path: Any, corrupt: list[int]
) -> None:
    """Packets that do not decode cost only the frames they damage, as ``ffmpeg``
    decodes on: the frames from the first bad packet to the next keyframe are left out
    (concealed pictures are no training data), every clip outside them stands with its
    own frame numbers and times, the frame count and duration stay exact, and the note
    says which frames were left out. A lost keyframe makes the decoder hand frames out
    of order; their numbers still come out right. A ranged split says the same, and so
    does one by decord, which PyAV takes over from at the damage."""
    from pipeline.stages.split import shots

    path = str(tmp_path / "damaged.mp4")
    keyframes = _with_corrupt_packets(five_shots, path, corrupt)
    assert keyframes == [0, 48, 96, 144, 192]
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=5.0, work_max_area=64 * 36)
    good = batch_to_rows(Split(cfg)(Probe()({"source": np.array([five_shots], dtype=object)})))
    assert _spans(good) == [(0, 48), (48, 96), (96, 144), (144, 192), (192, 240)]
    probed = Probe()({"source": np.array([path], dtype=object)})
    rows = batch_to_rows(Split(cfg)(probed))
    last = rows[-1]
    assert all(r["src_status"] == "done" for r in rows)
    assert last["src_num_frames"] == 240 and last["src_num_frames_exact"]
    assert last["src_duration_s"] == pytest.approx(10.0)
    note = last["src_error"]
    assert note.startswith(f"{path}: corrupt data (") and "cut off" not in note
    # the frames left out: from the first bad one, or B-frames before it that refer to
    # it (after the keyframe before), to the next keyframe
    first, after = (
        int(note.split("(frames ")[1].split("..")[0]),
        int(note.split("(frames ")[1].split("..")[1].split(")")[0]) + 1,
    )
    assert max(k for k in keyframes if k < corrupt[0]) < first <= corrupt[0]
    assert after == next((k for k in keyframes if k > corrupt[-1]), 240)
    assert f"{after - first} frames left out" in note
    spans = _spans(rows)
    assert spans and all(b <= first or a >= after for a, b in spans)
    # every clip away from the damage is the undamaged file's, frames and times alike
    by_start = {r["start_frame"]: r for r in rows if r["clip_id"]}
    for r in good:
        a, b = r["start_frame"], r["end_frame"]
        if b <= first - 2 or a >= after:
            assert (by_start[a]["end_frame"], by_start[a]["start_s"]) == (b, r["start_s"])
            assert by_start[a]["end_s"] == pytest.approx(r["end_s"])
    assert [s for s in spans if s[0] >= after] == [s for s in _spans(good) if s[0] >= after]
    # split in ranges, the same clips and notes
    assert _facts(_ranged(probed, cfg, range_frames=40)) == _facts(rows)
    # with decord, which gives up at the damage: PyAV goes on from its last frame, with
    # detection frames of decord's size (decord's come from the small working image)
    with_decord = batch_to_rows(Split(replace(cfg, decoder="decord"))(probed))
    assert _facts(with_decord) == _facts(rows)
    # `reelpack shots`: no shot holds a frame left out
    found = [(s["start_frame"], s["end_frame"]) for s in shots(path)]
    assert all(b <= first or a >= after for a, b in found)
    assert found[-1][1] == (240 if after < 240 else first)


@pytest.mark.slow
def test_a_build_of_only_bad_sources_ends_with_their_error_rows(
    tmp_path: os.PathLike[str], fresh_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every source fails: the model stages get blocks of placeholder rows only, whose
    clip ids Ray hands over as a column of nulls (NaN), and pass them on; the build
    commits each source's error row."""
    from pipeline.config import load_config
    from pipeline.graph import build
    from pipeline.writer import read_index, read_sources

    monkeypatch.setenv("RAY_ADDRESS", "local")
    videos = os.path.join(tmp_path, "videos")
    os.makedirs(videos)
    with open(os.path.join(videos, "text.mp4"), "w") as f:
        f.write("not a video")
    with open(os.path.join(videos, "noise.mkv"), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    cfg = load_config(preset="tiny", model_cache=os.path.join(tmp_path, "models"))
    out = os.path.join(tmp_path, "corpus")
    summary = build([videos], out, cfg, echo=lambda line: None)
    assert (summary["sources_done"], summary["sources_error"]) == (2, 2), summary
    causes = summary["errors_by_reason"]  # the failed sources by cause, in the summary
    assert sum(causes.values()) == 2 and all("not a readable video" in c for c in causes), causes
    rows = read_sources(out).to_pylist()
    assert sorted(os.path.basename(r["source"]) for r in rows) == ["noise.mkv", "text.mp4"]
    assert all(r["status"] == "error" and "not a readable video" in r["error"] for r in rows)
    assert read_index(out).num_rows == 0


def test_an_avi_whose_index_disagrees_with_its_data_never_fails_a_ranged_build(
    tmp_path: Any,
) -> None:
    """Bytes overwritten in an AVI's data: a decode from the start loses the frames in
    them and numbers the rest on, but a seek goes by the index to the frames' old
    places. Split in ranges, such a source becomes one error row that says why (or the
    same clips as in one range), never an exception that stops the build."""
    src = str(tmp_path / "good.avi")
    synth_video(src, width=128, height=72, fps=24, shots=[48] * 5, seed=3, codec="mpeg4")
    with open(src, "rb") as f:
        data = bytearray(f.read())
    at = int(len(data) * 0.45)
    data[at : at + 2048] = np.random.default_rng(1).integers(0, 256, 2048, np.uint8).tobytes()
    path = str(tmp_path / "damaged.avi")
    with open(path, "wb") as f:
        f.write(bytes(data))
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=5.0, work_max_area=64 * 36)
    probed = Probe()({"source": np.array([path], dtype=object)})
    whole = batch_to_rows(Split(cfg)(probed))
    assert whole[-1]["src_status"] == "done" and whole[-1]["src_num_frames"] < 240
    ranged = _ranged(probed, cfg, range_frames=40)
    if _facts(ranged) != _facts(whole):
        (row,) = ranged
        assert row["src_status"] == "error" and "its ranges disagree" in row["src_error"]


def test_a_video_whose_every_packet_is_corrupt_is_an_error(five_shots: str, tmp_path: Any) -> None:
    path = str(tmp_path / "all.mp4")
    _with_corrupt_packets(five_shots, path, list(range(240)))
    (row,) = batch_to_rows(Split()(Probe()({"source": np.array([path], dtype=object)})))
    assert row["clip_id"] is None and row["src_status"] == "error"
    assert row["src_error"].startswith(f"{path}: not a readable video")
    assert "Invalid data" in row["src_error"]


def test_a_file_cut_off_gets_its_true_length_and_a_note(corpus: str) -> None:
    """Matroska cut off: its header announces 12 s, its stream ends near 8 s. The source
    is done, its clips before the end stand, its duration and frame count are what
    decoding found, and the note says so; a ranged split says the same."""
    path = os.path.join(corpus, "cut_off.mkv")
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=1.5)
    probed = Probe()({"source": np.array([path], dtype=object)})
    assert batch_to_rows(probed)[0]["src_duration_s"] == pytest.approx(12.0)
    rows = batch_to_rows(Split(cfg)(probed))
    last = rows[-1]
    frames = int(last["src_num_frames"])
    assert last["src_num_frames_exact"] and 40 <= frames < 120
    assert last["src_duration_s"] == pytest.approx(frames / 10.0)
    assert rows[-1]["end_frame"] <= frames and last["src_status"] == "done"
    assert f"the stream ends at {frames / 10:.2f} s, short of the 12.00 s" in last["src_error"]

    assert _facts(_ranged(probed, cfg, range_frames=20)) == _facts(rows)

    whole = os.path.join(corpus, "vfr.mkv")  # one that is not cut off has no note
    done = batch_to_rows(Split(cfg)(Probe()({"source": np.array([whole], dtype=object)})))
    assert {r["src_error"] for r in done} == {None}


def _mkv_with_audio(path: str, video_s: float, audio_s: float, keep: float = 1.0) -> None:
    """Matroska with a 10 fps video of ``video_s`` and a tone of ``audio_s``, muxed in
    time order; ``keep < 1`` cuts the file off after that fraction of its bytes."""
    import av

    fps, rate, hop = 10, 8000, 1024
    half = round(video_s * fps) // 2
    images = iter_synth_frames(96, 64, [half, half], seed=3)
    tone = (np.sin(np.arange(round(audio_s * rate)) / 7.0) * 0.3).astype(np.float32)[None]
    with av.open(path, "w", format="matroska") as out:
        # audio first: the video, stream 1, must still be drained at the end
        audio = out.add_stream("flac", rate=rate, layout="mono")
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        done = 0  # audio samples muxed

        def audio_until(t: float) -> None:
            nonlocal done
            while done < tone.shape[1] and done / rate <= t:
                frame = av.AudioFrame.from_ndarray(tone[:, done : done + hop], "fltp", "mono")
                frame.sample_rate, frame.pts = rate, done
                out.mux(audio.encode(frame))
                done += hop

        for i, image in enumerate(images):
            audio_until(i / fps)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode())
        audio_until(audio_s)
        out.mux(audio.encode())
    if keep < 1:
        with open(path, "r+b") as f:
            f.truncate(int(os.path.getsize(path) * keep))


def test_audio_that_runs_past_the_video_is_not_a_file_cut_off(tmp_path: Any) -> None:
    """Matroska states one duration for all its streams: a 4 s video with 10 s of audio
    announces 10 s. Its video's length is 4 s, and it is no cut-off file: no note, split
    whole or in ranges. A file cut off in the middle of both streams gets the note."""
    cfg = SplitConfig(min_clip_s=0.5, max_clip_s=1.5)
    whole = str(tmp_path / "long_audio.mkv")
    _mkv_with_audio(whole, video_s=4.0, audio_s=10.0)
    probed = Probe()({"source": np.array([whole], dtype=object)})
    assert batch_to_rows(probed)[0]["src_duration_s"] == pytest.approx(10.0, abs=0.2)
    rows = batch_to_rows(Split(cfg)(probed))
    assert rows and all(r["clip_id"] is not None for r in rows)
    assert {r["src_error"] for r in rows} == {None}
    assert rows[-1]["src_duration_s"] == pytest.approx(4.0)
    assert _facts(_ranged(probed, cfg, range_frames=15)) == _facts(rows)

    cut = str(tmp_path / "cut_with_audio.mkv")
    _mkv_with_audio(cut, video_s=10.0, audio_s=10.0, keep=0.5)
    probed = Probe()({"source": np.array([cut], dtype=object)})
    assert batch_to_rows(probed)[0]["src_duration_s"] == pytest.approx(10.0, abs=0.2)
    rows = batch_to_rows(Split(cfg)(probed))
    end_s = rows[-1]["src_duration_s"]
    assert 2.0 < end_s < 8.0
    assert f"the stream ends at {end_s:.2f} s, short of the 10." in rows[-1]["src_error"]


def test_a_cut_off_file_without_clips_is_done_with_both_notes(corpus: str) -> None:
    """No shot of a cut-off file is long enough for a clip: its one row is done, and
    says both why no clip came out and where the stream ended."""
    path = os.path.join(corpus, "cut_off.mkv")
    probed = Probe()({"source": np.array([path], dtype=object)})
    (row,) = batch_to_rows(Split(SplitConfig(min_clip_s=20.0, max_clip_s=30.0))(probed))
    assert row["clip_id"] is None and row["src_status"] == "done"
    note = row["src_error"]
    assert note.startswith(f"{path}: no clips: no shot of at least min_clip_s=20 s; ")
    assert "short of the 12.00 s its header announces (file cut off?)" in note
    assert row["src_num_frames_exact"] and row["src_duration_s"] < 10.0


def test_per_source_timeout_ends_the_source_as_an_error(corpus: str) -> None:
    path = os.path.join(corpus, "static_long.mp4")
    t0 = time.monotonic()
    (row,) = run_stages([path], SplitConfig(timeout_s=0.5))
    assert time.monotonic() - t0 < 20
    assert row["clip_id"] is None and row["src_status"] == "error"
    assert "timeout after 0.5 s" in row["src_error"] and path in row["src_error"]


# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a child would report
# its parent's (pytest's) peak when that is higher than its own.
_RSS_SCRIPT = """
import sys
from pipeline.stages.probe import Probe
from pipeline.stages.split import Split, SplitConfig
import numpy as np

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

b = Probe()({"source": np.array([sys.argv[1]], dtype=object)})
before = peak_kib()
clips = 0
for chunk in Split(SplitConfig(max_clip_s=10.0)).stream(b):  # as a build runs it
    clips += len(chunk["clip_id"])
after = peak_kib()
print(clips, before, after)
"""


def _split_rss_kib(path: str) -> tuple[int, int]:
    """(clips, peak RSS growth in KiB while splitting ``path``) in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, path],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    clips, before, after = (int(x) for x in out.stdout.split()[-3:])
    return clips, after - before


def test_memory_is_flat_in_video_length(corpus: str, tmp_path: os.PathLike[str]) -> None:
    """A 15-minute and a 1-minute video of the same (tiny) size peak at the same memory."""
    short = os.path.join(tmp_path, "one_minute.mp4")
    synth_video(short, width=16, height=16, fps=10, shots=[600], seed=0, styles={0: "static"})
    clips_short, grow_short = _split_rss_kib(short)
    clips_long, grow_long = _split_rss_kib(os.path.join(corpus, "static_long.mp4"))
    assert (clips_short, clips_long) == (6, 90)
    assert grow_long - grow_short < 32 * 1024, (grow_short, grow_long)


def test_s3_sources_are_streamed_not_downloaded(
    s3_bucket: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.storage as storage

    local = os.path.join(tmp_path, "remote.mp4")
    cuts = synth_video(local, width=192, height=108, fps=24, shots=[30, 40, 30], seed=4)
    uri = f"{s3_bucket}/videos/remote.mp4"
    storage.storage_for(uri).upload(local, uri)
    size = os.path.getsize(local)
    readers: list[Any] = []
    real_open = storage.S3Storage.open

    def small_read_ahead(self: Any, u: str) -> Any:
        # A read-ahead far below the file size, so reading it takes many ranged GETs.
        reader = storage.S3RangeReader(self, u, read_ahead=16 << 10)
        readers.append(reader)
        return reader

    monkeypatch.setattr(storage.S3Storage, "open", small_read_ahead)
    private_tmp = os.path.join(tmp_path, "tmp")
    os.makedirs(private_tmp)
    monkeypatch.setattr(tempfile, "tempdir", private_tmp)
    rows = run_stages([uri])
    assert real_open is not None and size > 4 * (16 << 10)
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 30), (30, 70), (70, 100)]
    assert cuts == [30, 70] and all(r["source"] == uri for r in rows)
    assert len(readers) == 2  # probe, then split's single decode pass
    probe_reader, split_reader = readers
    print(
        "\nS3 bytes fetched / object size: probe",
        probe_reader.bytes_fetched / size,
        "split",
        split_reader.bytes_fetched / size,
    )
    # The probe reads the header, one frame and the first packets (here: the whole
    # short file, plus the index at its end).
    assert probe_reader.bytes_fetched <= 1.5 * size
    # One decode pass reads the object about once, not a multiple of it.
    assert size <= split_reader.bytes_fetched <= 1.25 * size + (64 << 10)
    assert os.listdir(private_tmp) == []


def test_an_s3_source_replaced_while_it_is_read_is_an_error_not_a_mix(
    s3_bucket: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream sync replaces the object while split decodes it: the rest of the
    bytes would come from another video. The reader pins the version it opened, so the
    source ends as an error row saying so, with no clip of the first part either (the
    build takes it whole on a later run)."""
    import pipeline.storage as storage

    first, second = (os.path.join(tmp_path, f"v{i}.mp4") for i in (1, 2))
    synth_video(first, width=192, height=108, fps=24, shots=[120, 160, 120], seed=4)
    synth_video(second, width=192, height=108, fps=24, shots=[50, 50], seed=9)
    uri = f"{s3_bucket}/videos/synced.mp4"
    st = storage.storage_for(uri)
    st.upload(first, uri)
    readers: list[Any] = []
    replaced = []

    class Replacing(storage.S3RangeReader):
        def _fetch(self, start: int, length: int) -> bytes:
            # split's reader (probe's is the first) is a third of the way through
            if len(readers) == 2 and self.bytes_fetched > self.size // 3 and not replaced:
                st.upload(second, uri)
                replaced.append(self.bytes_fetched)
            return super()._fetch(start, length)

    def open_small(self: Any, u: str) -> Any:
        readers.append(Replacing(self, u, read_ahead=16 << 10))
        return readers[-1]

    monkeypatch.setattr(storage.S3Storage, "open", open_small)
    rows = run_stages([uri])
    assert len(readers) == 2 and replaced and st.size(uri) == os.path.getsize(second)
    (row,) = rows
    assert row["src_status"] == "error" and row["clip_id"] is None, row
    problem = row["src_error"]
    assert re.match(rf"{re.escape(uri)}: split failed: failed after frame \d+: ", problem), problem
    assert "the object was replaced while it was read (its ETag changed)" in problem


def test_a_large_s3_source_is_read_about_once(
    s3_bucket: str, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ~7 MB object with its index at the end: the probe reads the head and the tail,
    not the whole object; the one decode pass reads it about once."""
    import av

    import pipeline.storage as storage

    local = os.path.join(tmp_path, "large.mp4")
    rng = np.random.default_rng(0)
    with av.open(local, "w") as out:  # noise at CRF 0: large, fast to write
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        stream.options = {"crf": "0", "preset": "ultrafast"}
        for _ in range(72):
            image = rng.integers(0, 256, (180, 320, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    size = os.path.getsize(local)
    uri = f"{s3_bucket}/videos/large.mp4"
    storage.storage_for(uri).upload(local, uri)
    readers: list[Any] = []

    def open_with_read_ahead(self: Any, u: str) -> Any:
        reader = storage.S3RangeReader(self, u, read_ahead=256 << 10)
        readers.append(reader)
        return reader

    monkeypatch.setattr(storage.S3Storage, "open", open_with_read_ahead)
    rows = run_stages([uri], SplitConfig(min_clip_s=0.5, max_clip_s=1.0))
    assert size > 6 << 20
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 24), (24, 48), (48, 72)]
    probe_reader, split_reader = readers
    print(
        f"\n{size / 2**20:.1f} MB object, bytes fetched / size: probe "
        f"{probe_reader.bytes_fetched / size:.3f}, split {split_reader.bytes_fetched / size:.3f}"
    )
    assert probe_reader.bytes_fetched <= 0.15 * size
    assert size <= split_reader.bytes_fetched <= 1.05 * size
