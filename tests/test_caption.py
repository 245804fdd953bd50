"""Caption stage: frame sampling, caption hygiene, and a tiny random-weight Qwen3-VL
loaded through the same ``Captioner`` path as a real checkpoint.

    python -m pytest tests/test_caption.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.stages.base import batch_to_rows, rows_to_batch
from pipeline.stages.caption import (
    CaptionConfig,
    Captioner,
    clean_caption,
    fit_frames,
    prepare_clip,
    sample_frame_indices,
)
from pipeline.tiny_vlm import MARKER_NAME, build_tiny_vlm, is_tiny_vlm
from pipeline.video import encode_mp4
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
        ("The video footage is grainy.", "The video footage is grainy."),  # not boilerplate
        ("The video is dark and blurry.", "The video is dark and blurry."),
        ("A bell\x07 rings\x00.", "A bell rings."),
        ("   \n\t ", ""),
        ("", ""),
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
        assert row["caption"] == clean_caption(row["caption"])
        assert row["error"] is None
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


def test_empty_output_becomes_error(
    captioner: Captioner, clip_batch: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a model that answers only whitespace
    monkeypatch.setattr(
        captioner, "_generate", lambda clips: [" \n "] + ["A scene."] * (len(clips) - 1)
    )
    out = captioner({k: v[:2] for k, v in clip_batch.items()})
    assert out["status"].tolist() == ["error", "kept"]
    assert "empty caption" in out["error"][0] and "landscape" in out["error"][0]
    assert out["caption"].tolist() == [None, "A scene."]


def test_captioner_rejects_bad_config(tiny_vlm_dir: str) -> None:
    with pytest.raises(ValueError):
        Captioner(CaptionConfig(model=tiny_vlm_dir, num_frames=0, device="cpu"))
    with pytest.raises(ValueError):
        Captioner(CaptionConfig(model=tiny_vlm_dir, dtype="float33", device="cpu"))


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
