"""Animated WebP sources: FFmpeg cannot decode them, so probe and split read them with
Pillow (:mod:`pipeline.webp`), with exact cuts and times, transparency over white, the
size limits checked before decoding, and truncated files as error rows."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.stages.base import batch_to_rows
from pipeline.stages.probe import Probe, ProbeConfig
from pipeline.stages.split import Split, SplitConfig, shots
from pipeline.synth import iter_synth_frames
from pipeline.video import decode_mp4
from pipeline.webp import iter_webp_frames, parse_animation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUTS = [30, 70]  # known cut frames of the animation below
SHOTS = [30, 40, 25]


def save_animation(path: str, frames: list[np.ndarray], durations_ms: list[int]) -> None:
    images = [Image.fromarray(f) for f in frames]  # RGB or RGBA, by the last axis
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations_ms, quality=90)


def probe_split(source: str, **split: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    probed = Probe(ProbeConfig())({"source": np.array([source], dtype=object)})
    return batch_to_rows(probed)[0], batch_to_rows(Split(SplitConfig(**split))(probed))


@pytest.fixture(scope="module")
def animation(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[int]]:
    """Three shots at varying frame durations (40 ms, then 60 ms from the second shot)."""
    path = str(tmp_path_factory.mktemp("webp") / "three shots.webp")
    durations = [40] * 30 + [60] * 65
    save_animation(path, list(iter_synth_frames(320, 180, SHOTS, 3)), durations)
    return path, durations


def test_chunks_give_canvas_durations_and_the_browser_frame_rule(
    tmp_path: os.PathLike[str],
) -> None:
    frames = [np.full((20, 30, 3), v, np.uint8) for v in (0, 80, 160, 240)]
    path = os.path.join(tmp_path, "rule.webp")
    save_animation(path, frames, [0, 10, 11, 500])
    with open(path, "rb") as f:
        found = parse_animation(f.read())
    assert found is not None and (found.width, found.height) == (30, 20)
    # 10 ms or less is shown for 100 ms, as browsers do
    assert found.durations_ms == (100, 100, 11, 500) and found.num_frames == 4
    assert found.duration_s == pytest.approx(0.711) and found.vfr


def test_a_still_webp_is_no_animation(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "still.webp")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    with open(path, "rb") as f:
        assert parse_animation(f.read()) is None
    row, clips = probe_split(path)
    assert row["src_media_kind"] == "image" and len(clips) == 1


def test_probe_reads_an_animation_as_a_vfr_video(animation: tuple[str, list[int]]) -> None:
    path, durations = animation
    row = Probe().probe_one(path)
    assert row["src_status"] == "done", row["src_error"]
    assert row["src_media_kind"] == "video" and row["src_codec"] == "webp"
    assert (row["width"], row["height"]) == (320, 180)
    assert row["src_num_frames"] == 95 and row["src_num_frames_exact"]
    assert row["src_duration_s"] == pytest.approx(sum(durations) / 1000)
    assert row["src_vfr"] and row["fps"] == pytest.approx(95 / (sum(durations) / 1000))


def test_split_cuts_an_animation_at_its_known_cuts(animation: tuple[str, list[int]]) -> None:
    path, durations = animation
    _, rows = probe_split(path, min_clip_s=0.5)
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 30), (30, 70), (70, 95)]
    starts = np.cumsum([0, *durations]) / 1000
    for r in rows:
        assert r["src_status"] == "done" and r["clip_id"], r["src_error"]
        assert r["start_s"] == pytest.approx(starts[r["start_frame"]])
        assert r["end_s"] == pytest.approx(starts[r["end_frame"]])
        frames, _ = decode_mp4(r["clip_bytes"])
        assert len(frames) >= 1 and frames.shape[1:3] == (180, 320)
    for detector in ("content", "transnetv2"):
        found = shots(path, detector=detector)
        assert [s["start_frame"] for s in found] == [0, *CUTS], detector
        assert found[-1]["end_s"] == pytest.approx(sum(durations) / 1000)


def test_transparency_is_composited_over_white(tmp_path: os.PathLike[str]) -> None:
    """A transparent pixel shows white, whatever colour it hides (here black)."""
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[8:24, 12:36, 3] = 0  # a transparent hole in an opaque black frame
    frames = [rgba.copy() for _ in range(3)]
    frames[1][:4, :, 0] = 200  # frames differ, so the encoder keeps all three
    path = os.path.join(tmp_path, "logo.webp")
    save_animation(path, frames, [100, 100, 100])
    with open(path, "rb") as f:
        decoded = list(iter_webp_frames(f.read(), None, 48 * 32, detect_width=48))
    assert [d.num for d in decoded] == [0, 1, 2]
    rgb = decoded[0].rgb()
    assert rgb[10:22, 14:34].min() > 235 and rgb[26:, :].max() < 30
    assert decoded[0].small is not None and decoded[0].small[10:22, 14:34].min() > 245


def test_size_limits_are_checked_before_decoding(animation: tuple[str, list[int]]) -> None:
    path, _ = animation
    row = Probe(ProbeConfig(max_pixels=320 * 100)).probe_one(path)
    assert row["src_status"] == "error" and "320x180 exceeds" in row["src_error"]
    assert path in row["src_error"] and row["src_coded_width"] == 320


def test_a_truncated_animation_is_an_error_row(
    animation: tuple[str, list[int]], tmp_path: os.PathLike[str]
) -> None:
    path, _ = animation
    with open(path, "rb") as f:
        data = f.read()
    for cut, words in ((len(data) // 2, "truncated inside frame"), (25, "inside its header")):
        broken = os.path.join(tmp_path, f"cut{cut}.webp")
        with open(broken, "wb") as f:
            f.write(data[:cut])
        _, clips = probe_split(broken)
        assert len(clips) == 1 and clips[0]["clip_id"] is None
        assert clips[0]["src_status"] == "error" and words in clips[0]["src_error"], clips[0]
        assert broken in clips[0]["src_error"]


def test_reelpack_shots_reads_an_animation(animation: tuple[str, list[int]]) -> None:
    path, _ = animation
    out = subprocess.run(
        [sys.executable, "-m", "reelpack.cli", "shots", path, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    import json

    assert [s["start_frame"] for s in json.loads(out.stdout)] == [0, *CUTS]


def test_an_animation_on_s3_is_split_like_a_local_one(
    animation: tuple[str, list[int]], s3_bucket: str
) -> None:
    from pipeline.storage import storage_for

    path, _ = animation
    uri = f"{s3_bucket}/anim/three shots.webp"
    storage_for(uri).upload(path, uri)
    _, local = probe_split(path, min_clip_s=0.5)
    _, remote = probe_split(uri, min_clip_s=0.5)
    assert [(r["start_frame"], r["end_frame"]) for r in remote] == [
        (r["start_frame"], r["end_frame"]) for r in local
    ]
    assert all(r["source"] == uri and r["src_status"] == "done" for r in remote)


def test_an_animation_too_large_to_hold_is_an_error_row(
    animation: tuple[str, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libwebp decodes from memory: a file over ``MAX_BYTES`` is refused, not read."""
    import pipeline.webp

    path, _ = animation
    monkeypatch.setattr(pipeline.webp, "MAX_BYTES", os.path.getsize(path) - 1)
    row = Probe().probe_one(path)
    assert row["src_status"] == "error" and path in row["src_error"]
    assert "an animated WebP of 2 MiB, over the 2 MiB it may take in memory" in row["src_error"]
