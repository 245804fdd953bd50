"""Caption stage: frame sampling, caption hygiene, and a tiny random-weight Qwen3-VL
loaded through the same ``Captioner`` path as a real checkpoint.

    python -m pytest tests/test_caption.py -q
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.stages.base import batch_to_rows, rows_to_batch
from pipeline.stages.caption import (
    CAPTION_FACETS,
    DEFAULT_PROMPT,
    RANDOM_WEIGHTS_PREFIX,
    CaptionConfig,
    Captioner,
    ClipFacts,
    PreparedClip,
    RawCaption,
    aspect_name,
    cap_tokens,
    clean_caption,
    clip_facts,
    decode_sampled,
    degenerate_reason,
    describe_facts,
    finish_caption,
    first_sentence,
    fit_frames,
    prepare_clip,
    sample_frame_indices,
    sample_frame_indices_fps,
    trim_to_sentence,
)
from pipeline.tiny_vlm import MARKER_NAME, build_tiny_vlm, is_tiny_vlm
from pipeline.video import decode_mp4, encode_mp4
from schemas import STREAM_COLUMNS

# --- pure helpers --------------------------------------------------------------------


def test_sample_frame_indices_even_and_inclusive() -> None:
    idx = sample_frame_indices(9, 8)
    assert idx.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert sample_frame_indices(100, 5).tolist() == [0, 25, 50, 74, 99]
    gaps = np.diff(sample_frame_indices(1000, 8))
    assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_sample_frame_indices_short_clips() -> None:
    # never more distinct frames than exist, never fewer than one temporal patch
    assert sample_frame_indices(3, 8).tolist() == [0, 1, 2]
    assert sample_frame_indices(1, 8).tolist() == [0, 0]
    assert sample_frame_indices(5, 1).tolist() == [0, 4]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError):
        sample_frame_indices(10, 0)


def test_fit_frames_keeps_aspect_and_never_upscales() -> None:
    frames = np.zeros((2, 720, 1280, 3), np.uint8)
    out = fit_frames(frames, 256 * 384)
    t, h, w, _ = out.shape
    assert t == 2 and h * w <= 256 * 384
    assert abs(w / h - 1280 / 720) < 0.02
    portrait = fit_frames(np.zeros((1, 1920, 1080, 3), np.uint8), 100_000)
    assert (
        portrait.shape[1] > portrait.shape[2] and portrait.shape[1] * portrait.shape[2] <= 100_000
    )
    small = np.ones((3, 48, 64, 3), np.uint8)
    assert fit_frames(small, 256 * 384) is small


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  A man   walks\n\nhis dog. ", "A man walks his dog."),
        ("The video shows a red car on a road.", "A red car on a road."),
        ("this clip depicts: two cats sleeping", "Two cats sleeping"),
        ("In the video, a woman reads.", "A woman reads."),
        ("The image shows a red barn in snow.", "A red barn in snow."),  # an image source
        ("In this photo, a child laughs.", "A child laughs."),
        ("The image is overexposed.", "The image is overexposed."),  # not boilerplate
        ("The video footage is grainy.", "The video footage is grainy."),  # not boilerplate
        ("The video is dark and blurry.", "The video is dark and blurry."),
        ("A bell\x07 rings\x00.", "A bell rings."),
        ("   \n\t ", ""),
        ("", ""),
        ("Caption: A dog runs.", "A dog runs."),
        ("**Description:** a dog runs.", "a dog runs."),
        ('"A dog runs on grass."', "A dog runs on grass."),
        ("<think>it is a dog</think> The video shows a dog.", "A dog."),
        ("\u201cA quiet street.\u201d", "A quiet street."),
        ('A sign reads "stop"', 'A sign reads "stop"'),  # not wrapping quotes
    ],
)
def test_clean_caption(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


# --- clips ---------------------------------------------------------------------------


def _moving_square(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """(t, h, w, 3) uint8: a coloured square moving over a gradient."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    color = rng.integers(0, 256, 3)
    frames = np.empty((t, h, w, 3), np.uint8)
    side = min(h, w) // 3
    for i in range(t):
        frame = base.copy()
        x = (i * 4) % (w - side)
        frame[h // 3 : h // 3 + side, x : x + side] = color
        frames[i] = frame.astype(np.uint8)
    return frames


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_vlm(str(tmp_path_factory.mktemp("tiny_vlm")))


@pytest.fixture(scope="session")
def captioner(tiny_vlm_dir: str) -> Captioner:
    # batch_size 2 so the 3 good clips span two generate() calls; a short prompt so
    # the video tokens are a large share of the sequence and move the random model
    cfg = CaptionConfig(
        model=tiny_vlm_dir,
        prompt="Describe this video.",
        max_new_tokens=6,
        batch_size=2,
        device="cpu",
    )
    return Captioner(cfg)


@pytest.fixture(scope="session")
def clip_batch() -> dict[str, np.ndarray]:
    rows: list[dict[str, Any]] = [
        {
            "clip_id": "landscape",
            "status": "kept",
            "clip_bytes": encode_mp4(_moving_square(9, 48, 64, 0), 24.0),
        },
        {
            "clip_id": "portrait",
            "status": "kept",
            "clip_bytes": encode_mp4(_moving_square(9, 64, 36, 1), 30.0),
        },
        {"clip_id": "garbage", "status": "kept", "clip_bytes": b"\x00\x01 not an mp4 at all"},
        {
            "clip_id": "rejected",
            "status": "rejected",
            "clip_bytes": encode_mp4(_moving_square(5, 32, 32, 2), 24.0),
            "error": None,
        },
        {
            "clip_id": "one_frame",
            "status": "kept",
            "clip_bytes": encode_mp4(_moving_square(1, 40, 40, 3), 25.0),
        },
    ]
    for row in rows:
        row.setdefault("error", None)
        row["caption"] = None
        row["reasons"] = ["sharpness"] if row["status"] == "rejected" else []
    return rows_to_batch(rows)


def test_stage_columns_are_in_schema() -> None:
    assert set(Captioner.reads) <= set(STREAM_COLUMNS)
    assert set(Captioner.writes) <= set(STREAM_COLUMNS)


def test_tiny_vlm_is_marked_and_idempotent(tiny_vlm_dir: str) -> None:
    marker = json.loads((Path(tiny_vlm_dir) / MARKER_NAME).read_text())
    assert marker["random_weights"] is True and marker["family"] == "qwen3_vl"
    assert is_tiny_vlm(tiny_vlm_dir)
    weights = Path(tiny_vlm_dir) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_vlm(tiny_vlm_dir) == tiny_vlm_dir
    assert weights.stat().st_mtime_ns == before  # complete build left alone


def test_tiny_vlm_build_is_deterministic(tiny_vlm_dir: str, tmp_path: Path) -> None:
    again = Path(build_tiny_vlm(str(tmp_path / "again")))
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        a = hashlib.sha256((Path(tiny_vlm_dir) / name).read_bytes()).hexdigest()
        b = hashlib.sha256((again / name).read_bytes()).hexdigest()
        assert a == b, name


def test_tiny_vlm_loads_as_qwen3_vl(captioner: Captioner) -> None:
    assert type(captioner.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert type(captioner.processor).__name__ == "Qwen3VLProcessor"
    assert "<|video_pad|>" in captioner.prompt_text
    assert captioner.prompt_text.endswith("<|im_start|>assistant\n")


def test_prepare_clip_samples_and_reports_positions(clip_batch: dict[str, np.ndarray]) -> None:
    clip = prepare_clip(clip_batch["clip_bytes"][0], num_frames=4, max_pixels=32 * 32)
    assert clip.total_frames == 9 and clip.indices == [0, 3, 5, 8]
    assert clip.frames.shape[0] == 4 and clip.frames.shape[1] * clip.frames.shape[2] <= 32 * 32
    assert clip.fps == pytest.approx(24.0)


def test_caption_batch(captioner: Captioner, clip_batch: dict[str, np.ndarray]) -> None:
    out = captioner(clip_batch)
    rows = {r["clip_id"]: r for r in batch_to_rows(out)}
    assert len(rows) == 5  # no row dropped
    for clip_id in ("landscape", "portrait", "one_frame"):
        row = rows[clip_id]
        assert row["status"] == "kept", row["error"]
        assert isinstance(row["caption"], str) and row["caption"].strip()
        # a random-weight model's caption says so
        assert row["caption"].startswith(RANDOM_WEIGHTS_PREFIX)
        body = row["caption"][len(RANDOM_WEIGHTS_PREFIX) :]
        assert body.strip() and body == clean_caption(body)
        assert degenerate_reason(body) is None
        assert row["error"] is None
        assert row["caption_short"] is None  # short captions are off by default
    bad = rows["garbage"]
    assert bad["status"] == "error" and bad["caption"] is None
    assert "garbage" in bad["error"] and len(bad["error"]) > len(
        "caption failed for clip garbage: "
    )
    rejected = rows["rejected"]
    assert rejected["status"] == "rejected" and rejected["caption"] is None
    assert rejected["error"] is None and list(rejected["reasons"]) == ["sharpness"]
    assert rejected["clip_bytes"] == clip_batch["clip_bytes"][3]
    # the input batch is not modified in place
    assert clip_batch["status"][2] == "kept" and clip_batch["caption"][0] is None


def test_greedy_captions_are_deterministic(
    captioner: Captioner, clip_batch: dict[str, np.ndarray]
) -> None:
    first = captioner(clip_batch)["caption"].tolist()
    second = captioner(clip_batch)["caption"].tolist()
    assert first == second


def test_captions_follow_their_clips(
    captioner: Captioner, clip_batch: dict[str, np.ndarray]
) -> None:
    batched = captioner(clip_batch)["caption"]
    good = [0, 1, 4]
    # the video reaches the model: different clips, different answers
    assert len({batched[i] for i in good}) > 1
    # each caption belongs to its own row, whatever its neighbours and padding
    for i in good:
        alone = captioner({k: v[i : i + 1] for k, v in clip_batch.items()})["caption"][0]
        assert alone == batched[i], clip_batch["clip_id"][i]


def test_batch_failure_falls_back_to_single_clips(
    captioner: Captioner, clip_batch: dict[str, np.ndarray]
) -> None:
    # 2 x 402 px decodes fine but the Qwen processor refuses aspect ratios over 200:1,
    # which fails the whole batched call; only that clip may fail.
    sliver = encode_mp4(np.full((4, 2, 402, 3), 128, np.uint8), 24.0)
    rows = [
        {
            "clip_id": "sliver",
            "status": "kept",
            "clip_bytes": sliver,
            "caption": None,
            "error": None,
        },
        {
            "clip_id": "ok",
            "status": "kept",
            "clip_bytes": clip_batch["clip_bytes"][0],
            "caption": None,
            "error": None,
        },
        {"clip_id": "empty", "status": "kept", "clip_bytes": b"", "caption": None, "error": None},
    ]
    out = {r["clip_id"]: r for r in batch_to_rows(captioner(rows_to_batch(rows)))}
    assert out["sliver"]["status"] == "error" and "sliver" in out["sliver"]["error"]
    assert "aspect ratio" in out["sliver"]["error"]
    assert out["ok"]["status"] == "kept" and out["ok"]["caption"]
    assert out["empty"]["status"] == "error" and "no clip_bytes" in out["empty"]["error"]


def test_captioner_rejects_bad_config(tiny_vlm_dir: str) -> None:
    with pytest.raises(ValueError, match=r"^caption config: num_frames must be >= 1, got 0$"):
        Captioner(CaptionConfig(model=tiny_vlm_dir, num_frames=0, device="cpu"))
    bad = CaptionConfig(model=tiny_vlm_dir, max_pixels=2, sample_fps=0.0, device="cpu")
    with pytest.raises(ValueError, match=r"max_pixels must be >= 4, got 2; sample_fps must be"):
        Captioner(bad)  # each field named, not the whole config's repr
    with pytest.raises(ValueError):
        Captioner(CaptionConfig(model=tiny_vlm_dir, dtype="float33", device="cpu"))


# --- hygiene on crafted strings ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty caption"),
        ("   ", "empty caption"),
        ("1234 5678 90.12 %%%% ####", "non-language"),
        ("\ufffd\ufffd\ufffd\ufffd ab", "non-language"),
        ("A dog barks hahahahahahahahahahaha", "looping characters"),
        ("Wow, a dog barks loudly at the cat!!!!!!!!!!!!!!!!", "looping characters"),
        ("the dog runs the dog runs the dog runs the dog runs the dog runs", "repeated 3-grams"),
        (
            "A man walks along the beach at dawn. Then a man walks along the beach at dawn "
            "while gulls circle, and again a man walks along the beach at dawn.",
            "repeats 3 times",
        ),
    ],
)
def test_degenerate_outputs_are_detected(text: str, reason: str) -> None:
    found = degenerate_reason(text)
    assert found is not None and reason in found, found


@pytest.mark.parametrize(
    "text",
    [
        "A corgi runs along a wet sandy beach toward the camera.",
        "Close-up, static camera: a hand pours tea. Steam rises; soft window light from the left.",
        "Ein Hund läuft über eine Wiese.",  # not English, still language
        "一只狗在草地上奔跑。",
        # long and rich, with some natural repetition of short phrases
        "A woman in a red coat walks down a street. The camera follows her. She stops at a "
        "corner, looks left, then crosses. The camera pans right to follow her as she walks "
        "past a bakery; the street is wet and reflects the warm light of the shop windows.",
    ],
)
def test_real_captions_are_not_degenerate(text: str) -> None:
    assert degenerate_reason(text) is None


def _words(text: str) -> list[int]:
    """A whitespace 'tokenizer': token i is the i-th word of ``_VOCAB``."""
    return [_VOCAB.setdefault(w, len(_VOCAB)) for w in text.split()]


_VOCAB: dict[str, int] = {}


def _unwords(ids: Any) -> str:
    inverse = {v: k for k, v in _VOCAB.items()}
    return " ".join(inverse[i] for i in ids)


def test_cap_tokens_and_sentence_trimming() -> None:
    text = "A man walks. He sits on a bench. A dog"
    assert cap_tokens(text, 100, _words, _unwords) == (text, False)
    assert cap_tokens(text, 0, _words, _unwords) == (text, False)  # 0: no cap
    assert cap_tokens(text, 5, _words, _unwords) == ("A man walks. He sits", True)
    assert trim_to_sentence("A man walks. He sits") == "A man walks."
    assert trim_to_sentence('He said "go." Then') == 'He said "go."'
    assert trim_to_sentence("no sentence end here") == "no sentence end here"
    assert first_sentence("A dog runs. It barks.") == "A dog runs."
    assert first_sentence("A dog runs") == "A dog runs"
    # cut by the cap or by max_new_tokens: end at the last full sentence
    finish = finish_caption
    assert finish(RawCaption(text, truncated=False), 6, _words, _unwords) == "A man walks."
    assert finish(RawCaption(text, truncated=False), 8, _words, _unwords) == (
        "A man walks. He sits on a bench."
    )
    assert finish(RawCaption(text, truncated=True), 100, _words, _unwords) == (
        "A man walks. He sits on a bench."
    )
    assert finish(RawCaption(text, truncated=False), 100, _words, _unwords) == text
    assert finish(RawCaption("The video shows a cat", True), 100, _words, _unwords) == "A cat"


def test_aspect_and_facts() -> None:
    assert aspect_name(1920, 1080) == "16:9 landscape"
    assert aspect_name(1080, 1920) == "9:16 portrait"
    assert aspect_name(640, 480) == "4:3 landscape"
    assert aspect_name(500, 500) == "1:1 square"
    assert aspect_name(2100, 1000) == "2.10:1 landscape"
    text = describe_facts(ClipFacts(duration_s=4.25, width=1280, height=720, motion=0.002))
    assert "4.2 seconds" in text and "1280x720" in text and "16:9 landscape" in text
    assert "very little change" in text
    assert "a lot of change" in describe_facts(ClipFacts(motion=0.2))
    assert describe_facts(ClipFacts()) == ""
    batch = rows_to_batch(
        [
            {"start_s": 1.0, "end_s": 3.5, "width": 640, "height": 360, "score_motion": 0.02},
            {"start_s": None, "end_s": None, "width": None, "height": None, "score_motion": np.nan},
        ]
    )
    assert clip_facts(batch, 0) == ClipFacts(2.5, 640, 360, 0.02)
    assert clip_facts(batch, 1) == ClipFacts()
    assert clip_facts({"clip_id": np.array(["x"], dtype=object)}, 0) == ClipFacts()


def test_default_prompt_covers_the_facets() -> None:
    assert CAPTION_FACETS in DEFAULT_PROMPT
    for facet in ("subjects", "over time", "setting", "camera", "framing", "lighting", "style"):
        assert facet in CAPTION_FACETS


def test_sample_frames_by_rate(clip_batch: dict[str, np.ndarray]) -> None:
    # 10 s at 30 fps, 1 frame/s -> 10 frames, but never more than the cap
    assert len(sample_frame_indices_fps(300, 30.0, 1.0, 16)) == 10
    assert len(sample_frame_indices_fps(300, 30.0, 4.0, 16)) == 16
    assert sample_frame_indices_fps(300, 30.0, 1.0, 16)[[0, -1]].tolist() == [0, 299]
    assert len(sample_frame_indices_fps(6, 24.0, 1.0, 8)) == 2  # one temporal patch minimum
    with pytest.raises(ValueError):
        sample_frame_indices_fps(10, 0.0, 1.0, 8)
    # 9 frames at 24 fps = 0.375 s; at 8 frames/s that is 3 frames
    clip = prepare_clip(clip_batch["clip_bytes"][0], 8, 32 * 32, sample_fps=8.0)
    assert clip.indices == [0, 4, 8]


def _mkv(frames: np.ndarray, fps: int) -> bytes:
    """Matroska bytes: a container that stores no frame count."""
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode(None))
    return buf.getvalue()


def test_decode_sampled_matches_a_full_decode() -> None:
    frames = _moving_square(13, 48, 64, 5)
    for payload in (encode_mp4(frames, 24.0), _mkv(frames, 24)):
        full, _ = decode_mp4(payload)
        for num, rate in ((4, None), (8, None), (8, 24.0)):
            got, indices, total, fps = decode_sampled(payload, num, rate)
            assert total == 13 and fps == pytest.approx(24.0)
            assert indices == prepare_clip(payload, num, 10**6, rate).indices
            np.testing.assert_array_equal(got, full[indices])


# --- retries, out-of-memory, degenerate output (model calls simulated) ---------------


def _variant(captioner: Captioner, **changes: Any) -> Captioner:
    """The session captioner (same loaded model) with other config values."""
    cap = copy.copy(captioner)
    cap.cfg = replace(captioner.cfg, **changes)
    cap.batch_limit = cap.cfg.batch_size
    return cap


def _kept_rows(clip_batch: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    payload = clip_batch["clip_bytes"][0]
    return rows_to_batch(
        [
            {"clip_id": f"c{k}", "status": "kept", "clip_bytes": payload, "error": None}
            for k in range(n)
        ]
    )


def test_cuda_oom_halves_the_batch_and_retries(
    captioner: Captioner, clip_batch: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    cap = _variant(captioner, batch_size=4)
    sizes: list[int] = []

    def generate(clips: list[PreparedClip], prompts: list[str], **kw: Any) -> list[RawCaption]:
        sizes.append(len(clips))
        if len(clips) > 1:  # only one clip fits in "GPU memory"
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [RawCaption(f"A scene number {len(sizes)}.")]

    monkeypatch.setattr(cap, "_generate", generate)
    out = cap(_kept_rows(clip_batch, 5))
    # first chunk of 4: OOM at 4, OOM at 2, then 1 by 1; the second chunk starts at 1
    assert sizes == [4, 2, 1, 1, 1, 1, 1]
    assert cap.batch_limit == 1
    assert out["status"].tolist() == ["kept"] * 5
    assert len(set(out["caption"])) == 5  # every clip got its own answer, in order
    assert out["caption"][0].endswith("number 3.")

    # out of memory even for one clip: that clip fails alone, with the cause
    def always_oom(clips: list[PreparedClip], prompts: list[str], **kw: Any) -> list[RawCaption]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cap, "_generate", always_oom)
    out = cap(_kept_rows(clip_batch, 2))
    assert out["status"].tolist() == ["error", "error"]
    assert "OutOfMemoryError" in out["error"][0] and "c0" in out["error"][0]


def test_degenerate_output_is_retried_with_a_penalty(
    captioner: Captioner, clip_batch: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    loop = "the dog runs " * 12

    def generate(clips: list[PreparedClip], prompts: list[str], **kw: Any) -> list[RawCaption]:
        calls.append(dict(kw, n=len(clips)))
        if "repetition_penalty" in kw:  # the retry helps the second clip only
            return [RawCaption(""), RawCaption("A dog runs across a lawn.")][: len(clips)]
        return [RawCaption(" \n "), RawCaption(loop), RawCaption("A calm lake.")][: len(clips)]

    cap = _variant(captioner, batch_size=3)
    monkeypatch.setattr(cap, "_generate", generate)
    out = cap(_kept_rows(clip_batch, 3))
    assert calls[0]["n"] == 3 and "repetition_penalty" not in calls[0]
    assert calls[1]["n"] == 2 and calls[1]["repetition_penalty"] == cap.cfg.retry_repetition_penalty
    assert out["status"].tolist() == ["error", "kept", "kept"]
    assert "empty caption" in out["error"][0] and "after a retry" in out["error"][0]
    assert "degenerate" in out["error"][0] and "c0" in out["error"][0]
    assert out["caption"].tolist() == [
        None,
        RANDOM_WEIGHTS_PREFIX + "A dog runs across a lawn.",
        RANDOM_WEIGHTS_PREFIX + "A calm lake.",
    ]
    # a still-looping answer names the loop
    monkeypatch.setattr(
        cap, "_generate", lambda clips, prompts, **kw: [RawCaption(loop)] * len(clips)
    )
    out = cap(_kept_rows(clip_batch, 1))
    assert out["status"][0] == "error" and "repeated 3-grams" in out["error"][0]


def test_captions_are_capped_in_tokens(
    captioner: Captioner, clip_batch: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    long = (
        "A red car drives down a winding road. Pine trees line both sides. Fog hangs over "
        "the hills and the sky is pale grey. The camera tracks it from"
    )
    cap = _variant(captioner, max_caption_tokens=24)
    monkeypatch.setattr(
        cap, "_generate", lambda clips, prompts, **kw: [RawCaption(long)] * len(clips)
    )
    text = cap(_kept_rows(clip_batch, 1))["caption"][0][len(RANDOM_WEIGHTS_PREFIX) :]
    assert len(cap._encode_text(text)) <= 24
    assert text.startswith("A red car drives") and text.endswith("road.")
    # cut by generation: the dangling sentence goes too
    monkeypatch.setattr(
        captioner, "_generate", lambda clips, prompts, **kw: [RawCaption(long, True)] * len(clips)
    )
    text = captioner(_kept_rows(clip_batch, 1))["caption"][0]
    assert text.endswith("pale grey.") and "tracks" not in text


def test_no_prefix_without_the_tiny_marker(tiny_vlm_dir: str, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_vlm_dir, plain, ignore=shutil.ignore_patterns(MARKER_NAME))
    cap = Captioner(CaptionConfig(model=str(plain), max_new_tokens=4, device="cpu"))
    assert cap.prefix == "" and not cap.random_weights
    out = cap(_kept_rows_from(encode_mp4(_moving_square(9, 48, 64, 0), 24.0)))
    assert out["status"][0] == "kept" and not out["caption"][0].startswith("[")


def _kept_rows_from(payload: bytes) -> dict[str, np.ndarray]:
    return rows_to_batch([{"clip_id": "x", "status": "kept", "clip_bytes": payload}])


# --- the real tiny model with hints and short captions -------------------------------


def test_hints_and_short_captions_with_the_tiny_model(
    captioner: Captioner, clip_batch: dict[str, np.ndarray]
) -> None:
    cap = _variant(captioner, hints=True, short_caption=True, short_max_new_tokens=8)
    batch = dict(clip_batch)
    n = len(batch["clip_id"])
    batch["start_s"] = np.array([0.0, 1.0, 0.0, 0.0, 2.0])
    batch["end_s"] = np.array([0.375, 1.3, 1.0, 1.0, 2.04])
    batch["width"] = np.array([640, 360, 10, 10, 400])
    batch["height"] = np.array([480, 640, 10, 10, 400])
    batch["score_motion"] = np.array([0.001, 0.05, np.nan, np.nan, np.nan])
    prompt = cap.prompt_for(batch, 0)
    assert prompt.startswith(cap.cfg.prompt) and "0.4 seconds" in prompt and "4:3" in prompt
    assert "9:16 portrait" in cap.prompt_for(batch, 1)
    assert cap.prompt_for(batch, 0) != cap.prompt_for(batch, 1)
    out = cap(batch)
    assert out["status"].tolist() == ["kept", "kept", "error", "rejected", "kept"]
    for i in (0, 1, 4):
        short = out["caption_short"][i]
        assert short.startswith(RANDOM_WEIGHTS_PREFIX)
        body = short[len(RANDOM_WEIGHTS_PREFIX) :]
        assert body and first_sentence(body) == body
    assert out["caption_short"][2] is None and out["caption_short"][3] is None
    assert len(out["caption"]) == n


@pytest.mark.gpu
def test_caption_on_cuda_bf16(tiny_vlm_dir: str, clip_batch: dict[str, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    cap = Captioner(CaptionConfig(model=tiny_vlm_dir, max_new_tokens=6))  # auto: cuda + bf16
    assert cap.device.type == "cuda" and cap.dtype == torch.bfloat16
    out = cap(clip_batch)
    assert out["status"].tolist() == ["kept", "kept", "error", "rejected", "kept"]
    assert all(isinstance(c, str) and c for c in out["caption"][[0, 1, 4]])


def test_a_one_frame_clip_is_captioned_as_an_image(
    captioner: Captioner, clip_batch: dict[str, np.ndarray]
) -> None:
    """An image source (a one-frame clip) goes to the model as an image, with the image
    prompt and no duration or motion facts; videos in the same batch stay videos."""
    image = prepare_clip(clip_batch["clip_bytes"][4], 8, 256 * 384)
    video = prepare_clip(clip_batch["clip_bytes"][0], 8, 256 * 384)
    assert image.is_image and image.frames.shape[0] == 1 and image.indices == [0]
    assert not video.is_image
    inputs = captioner.model_inputs([video, image], ["a", "b"])
    assert "pixel_values" in inputs and "pixel_values_videos" in inputs
    text = captioner.processor.batch_decode(inputs["input_ids"])
    assert "<|video_pad|>" in text[0] and "<|image_pad|>" not in text[0]
    assert "<|image_pad|>" in text[1] and "<|video_pad|>" not in text[1]
    alone = captioner.model_inputs([image], ["b"])
    assert "pixel_values" in alone and "pixel_values_videos" not in alone

    cap = _variant(captioner, hints=True)
    batch = {
        **clip_batch,
        "start_s": np.array([0.0, 0.0, 0.0, 0.0, 0.0]),
        "end_s": np.array([0.375, 0.3, 1.0, 1.0, 0.04]),
        "width": np.array([64, 36, 10, 10, 40]),
        "height": np.array([48, 64, 10, 10, 40]),
        "score_motion": np.array([0.05, 0.05, np.nan, np.nan, 0.0]),
    }
    prompt = cap.prompt_for(batch, 4, image=True)
    assert prompt.startswith(cap.cfg.image_prompt) and "Describe this image" in prompt
    assert "1:1 square" in prompt and "seconds" not in prompt and "change" not in prompt
    out = cap(batch)
    assert out["status"][4] == "kept" and out["caption"][4].startswith(RANDOM_WEIGHTS_PREFIX)
