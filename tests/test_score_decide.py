"""Quality scoring and keep / reject: signals on generated clips with known properties,
the Score / AestheticScorer / Decide stages on batches without Ray, and the aesthetic
path end to end on a tiny random CLIP saved to disk and loaded back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from test_caption import _mkv

from pipeline.stages.aesthetic import AestheticConfig, AestheticScorer
from pipeline.stages.aesthetic_head import AestheticHead, load_head
from pipeline.stages.agreement import Agreement, AgreementConfig
from pipeline.stages.base import rows_to_batch
from pipeline.stages.decide import DEFAULT_THRESHOLDS, Decide, DecideConfig, decide
from pipeline.stages.dedup import Dedup
from pipeline.stages.score import (
    CHEAP_SIGNALS,
    Score,
    ScoreConfig,
    black_frame_fraction,
    blank_frame_fraction,
    bright_fraction,
    dark_fraction,
    exposure,
    flow_stats,
    frame_count,
    frame_hash,
    hamming,
    motion,
    resize_to_width,
    sample_indices,
    score_clip,
    score_frames,
    score_payload,
    sharpness,
    text_coverage,
    text_mask,
)
from pipeline.tiny_clip import TINY_CLIP_NAME, TinyClipPaths, build_tiny_clip
from pipeline.video import decode_mp4, decode_mp4_sampled, encode_mp4
from schemas import CLIP_STATUSES, SCORE_NAMES, STREAM_COLUMNS, score_column

T, H, W = 8, 64, 96
# scores of a clip that passes every default threshold
GOOD = {
    "sharpness": 300.0,
    "exposure": 0.5,
    "dark_fraction": 0.0,
    "bright_fraction": 0.0,
    "motion": 0.05,
    "still_fraction": 0.0,
    "black_frame_fraction": 0.0,
    "blank_frame_fraction": 0.0,
    "text_coverage": 0.0,
}
REPO = Path(__file__).resolve().parents[1]


# --- generated clips -----------------------------------------------------------------------


def noise_frame(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def static_clip(seed: int = 0) -> np.ndarray:
    return np.repeat(noise_frame(seed)[None], T, axis=0)


def moving_clip(seed: int = 0) -> np.ndarray:
    # the same texture panning 4 px per frame
    base = noise_frame(seed)
    return np.stack([np.roll(base, 4 * i, axis=1) for i in range(T)])


def blurred(frames: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    return np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in frames])


def checkerboard_clip(cell: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    return np.repeat(np.repeat(board[None, :, :, None], 3, axis=3), T, axis=0)


def flat_clip(value: int) -> np.ndarray:
    return np.full((T, H, W, 3), value, dtype=np.uint8)


def roundtrip(frames: np.ndarray) -> np.ndarray:
    """Frames as a later stage sees them: through the H.264 clip payload."""
    return decode_mp4(encode_mp4(frames, fps=8.0))[0]


# --- pure signal functions -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "num", "expected"),
    [(10, 4, [0, 3, 6, 9]), (3, 8, [0, 1, 2]), (9, 1, [4]), (8, 8, list(range(8))), (0, 4, [])],
)
def test_sample_indices(total: int, num: int, expected: list[int]) -> None:
    assert sample_indices(total, num).tolist() == expected


def test_sample_indices_distinct_and_in_range() -> None:
    for total in range(1, 40):
        for num in range(1, 12):
            idx = sample_indices(total, num)
            assert len(idx) == min(total, num) == len(set(idx.tolist()))
            assert idx.min() >= 0 and idx.max() < total


def test_resize_to_width_downscales_only_and_keeps_aspect() -> None:
    frames = np.zeros((2, 180, 320, 3), dtype=np.uint8)
    assert resize_to_width(frames, 160).shape == (2, 90, 160, 3)
    assert resize_to_width(frames, 640) is frames  # never upscale
    assert resize_to_width(frames, 0) is frames


def test_flat_frames_exact_values() -> None:
    grey, black, white = flat_clip(128), flat_clip(0), flat_clip(255)
    assert exposure(grey) == pytest.approx(128 / 255)
    assert (exposure(black), exposure(white)) == (0.0, 1.0)
    assert (dark_fraction(black), dark_fraction(grey), dark_fraction(white)) == (1.0, 0.0, 0.0)
    assert (bright_fraction(black), bright_fraction(grey), bright_fraction(white)) == (0, 0, 1)
    assert sharpness(grey) == 0.0 and motion(grey) == 0.0
    # luma thresholds are strict: 16 is not dark, 239 is not bright
    assert dark_fraction(flat_clip(15)) == 1.0 and dark_fraction(flat_clip(16)) == 0.0
    assert bright_fraction(flat_clip(240)) == 1.0 and bright_fraction(flat_clip(239)) == 0.0


def test_half_black_half_white() -> None:
    frames = flat_clip(0)
    frames[:, :, W // 2 :] = 255
    assert dark_fraction(frames) == 0.5 and bright_fraction(frames) == 0.5
    assert exposure(frames) == pytest.approx(0.5)
    assert sharpness(frames) > 0  # one vertical edge


def test_motion_is_mean_abs_difference_of_consecutive_frames() -> None:
    frames = np.stack([flat_clip(0)[0], flat_clip(51)[0], flat_clip(0)[0]])
    assert motion(frames) == pytest.approx(51 / 255)
    assert motion(frames[:1]) == 0.0
    assert motion(static_clip()) == 0.0
    assert 0.1 < motion(moving_clip()) <= 1.0


def test_signals_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        exposure(np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one frame"):
        sharpness(np.zeros((0, 4, 4, 3), dtype=np.uint8))


# --- signals on encoded clips (what the stage sees) ----------------------------------------


def test_static_vs_moving_after_encoding() -> None:
    still = score_frames(roundtrip(static_clip()))
    pan = score_frames(roundtrip(moving_clip()))
    assert still["motion"] < 0.002 < 0.1 < pan["motion"]


@pytest.mark.parametrize("make", [moving_clip, checkerboard_clip])
def test_sharp_vs_blurred_after_encoding(make: Callable[[], np.ndarray]) -> None:
    sharp = score_frames(roundtrip(make()))["sharpness"]
    soft = score_frames(roundtrip(blurred(make())))["sharpness"]
    min_sharpness = dict(DEFAULT_THRESHOLDS)["sharpness"][0]
    assert min_sharpness is not None
    assert soft < min_sharpness < sharp
    assert sharp > 50 * soft


@pytest.mark.parametrize(
    ("value", "exp", "dark", "bright"),
    [(0, 0.0, 1.0, 0.0), (128, 128 / 255, 0.0, 0.0), (255, 1.0, 0.0, 1.0)],
)
def test_black_grey_white_after_encoding(
    value: int, exp: float, dark: float, bright: float
) -> None:
    s = score_frames(roundtrip(flat_clip(value)))
    assert s["exposure"] == pytest.approx(exp, abs=0.01)
    assert s["dark_fraction"] == pytest.approx(dark, abs=0.01)
    assert s["bright_fraction"] == pytest.approx(bright, abs=0.01)
    assert s["sharpness"] < 1.0 and s["motion"] < 0.002


def test_analysis_width_bounds_the_work_not_the_exposure() -> None:
    frames = roundtrip(moving_clip())
    small = score_frames(frames, ScoreConfig(num_frames=3, analysis_width=32))
    full = score_frames(frames, ScoreConfig(num_frames=3, analysis_width=0))
    assert small["exposure"] == pytest.approx(full["exposure"], abs=0.01)
    assert small["sharpness"] != full["sharpness"]


# --- Score stage ----------------------------------------------------------------------------


def stage_batch(payloads: list[bytes | None], clip_ids: list[str | None]) -> dict[str, np.ndarray]:
    rows = [
        {"clip_id": cid, "source": f"/videos/{i}.mp4", "status": None, "clip_bytes": p}
        for i, (cid, p) in enumerate(zip(clip_ids, payloads, strict=True))
    ]
    return rows_to_batch(rows)


def test_stage_columns_are_in_schema() -> None:
    for stage in (Score, AestheticScorer, Decide, Agreement, Dedup):
        assert set(stage.reads) <= set(STREAM_COLUMNS), stage
        assert set(stage.writes) <= set(STREAM_COLUMNS), stage
    assert set(CHEAP_SIGNALS) | {"aesthetic", "agreement"} == set(SCORE_NAMES)


def test_score_stage_bad_rows_stay_alone() -> None:
    good = encode_mp4(moving_clip(), fps=8.0)
    batch = stage_batch(
        [good, b"\x00garbage, not an mp4", None, encode_mp4(static_clip(), fps=8.0), None],
        ["clip-good", "clip-bad", None, "clip-still", "clip-empty"],
    )
    batch["status"][3] = "error"  # failed upstream: must pass through untouched
    batch["error"] = np.array([None, None, None, "split: boom", None], dtype=object)
    out = Score(ScoreConfig(num_frames=4))(batch)

    assert len(out["clip_id"]) == 5 and out["source"].tolist() == batch["source"].tolist()
    assert out["status"].tolist() == [None, "error", None, "error", "error"]
    assert "clip-bad" in out["error"][1] and "InvalidData" in out["error"][1]
    assert out["error"][3] == "split: boom"
    assert "clip-empty" in out["error"][4] and "empty" in out["error"][4]
    for name in CHEAP_SIGNALS:
        col = out[score_column(name)]
        assert col.dtype == np.float64
        assert math.isfinite(col[0]), name
        assert np.isnan(col[1:]).all(), name
    assert out[score_column("motion")][0] > 0.1
    assert score_column("aesthetic") not in out  # not this stage's signal


# --- decide ---------------------------------------------------------------------------------


def test_decide_lists_every_failure_in_threshold_order() -> None:
    thresholds = dict(DEFAULT_THRESHOLDS)
    scores = {
        "sharpness": 3.0,
        "exposure": 0.97,
        "dark_fraction": 0.0,
        "bright_fraction": 0.95,
        "motion": 0.0,
        "still_fraction": 1.0,
        "black_frame_fraction": 0.0,
        "blank_frame_fraction": 1.0,
        "text_coverage": 0.5,
    }
    assert decide(scores, thresholds) == [
        "sharpness<20",
        "exposure>0.95",
        "bright_fraction>0.9",
        "motion<0.002",
        "still_fraction>0.9",
        "blank_frame_fraction>0.5",
        "text_coverage>0.15",
    ]
    assert decide({**GOOD, "motion": 0.05}, thresholds) == []


def test_decide_bounds_are_inclusive() -> None:
    thresholds = {"motion": (0.002, 0.5)}
    assert decide({"motion": 0.002}, thresholds) == []
    assert decide({"motion": 0.5}, thresholds) == []
    assert decide({"motion": 0.0019999}, thresholds) == ["motion<0.002"]
    assert decide({"motion": 0.5000001}, thresholds) == ["motion>0.5"]
    assert decide({"motion": 1e9}, {"motion": (None, None)}) == []


def test_decide_missing_or_nan_is_a_reason() -> None:
    thresholds = {"aesthetic": (4.5, None), "exposure": (0.05, None)}
    assert decide({"exposure": 0.5}, thresholds) == ["aesthetic:missing"]
    assert decide({"aesthetic": math.nan, "exposure": 0.0}, thresholds) == [
        "aesthetic:missing",
        "exposure<0.05",
    ]


def test_decide_config_validates_and_roundtrips_json() -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        DecideConfig(thresholds=(("brightness", (0.1, None)),))
    with pytest.raises(ValueError, match="min"):
        DecideConfig(thresholds=(("exposure", (0.9, 0.1)),))
    with pytest.raises(ValueError, match="two thresholds"):
        DecideConfig(thresholds=(("exposure", (0.1, None)), ("exposure", (None, 0.9))))
    cfg = DecideConfig()
    assert "aesthetic" not in cfg.threshold_map()
    loaded = json.loads(json.dumps(cfg.thresholds))  # lists, as a saved config comes back
    again = DecideConfig(thresholds=loaded)
    assert again == cfg and hash(again) == hash(cfg)
    # the mapping form a YAML file gives is stored as the same tuple form
    yaml_like: dict[str, Any] = {"motion": [0.002, None], "exposure": (0, 1)}
    as_mapping = DecideConfig(thresholds=yaml_like)
    assert as_mapping.thresholds == (("motion", (0.002, None)), ("exposure", (0.0, 1.0)))


def test_decide_stage() -> None:
    nan = math.nan
    good = {k: v for k, v in GOOD.items() if k != "motion"}
    rows: list[dict[str, Any]] = [
        {"clip_id": "keep", **good, "motion": 0.05, "aesthetic": 6.0},
        {"clip_id": "still", **good, "motion": 0.0, "aesthetic": 6.0},
        {"clip_id": "ugly", **good, "motion": 0.05, "aesthetic": 3.0},
        {"clip_id": "unscored", **good, "motion": 0.05, "aesthetic": nan},
        {"clip_id": "broken", **{k: nan for k in good}, "motion": nan, "status": "error"},
        {"clip_id": None, **{k: nan for k in good}, "motion": nan},
    ]
    batch = rows_to_batch(
        [
            {
                "clip_id": r["clip_id"],
                "status": r.get("status"),
                "start_s": 0.0,
                "end_s": 2.0,
                **{score_column(k): r[k] for k in SCORE_NAMES if k in r},
            }
            for r in rows
        ]
    )
    cfg = DecideConfig(thresholds=(*DEFAULT_THRESHOLDS, ("aesthetic", (4.5, None))))
    out = Decide(cfg)(batch)
    assert out["status"].tolist() == ["kept", "rejected", "rejected", "rejected", "error", None]
    assert out["reasons"].tolist() == [
        [],
        ["motion<0.002"],
        ["aesthetic<4.5"],
        ["aesthetic:missing"],
        None,
        None,
    ]
    assert set(out["status"].tolist()) - {None} <= set(CLIP_STATUSES)

    # no aesthetic column at all (stage not configured) while thresholding on it
    no_aesthetic = {k: v for k, v in batch.items() if k != score_column("aesthetic")}
    assert Decide(cfg)(no_aesthetic)["reasons"][0] == ["aesthetic:missing"]
    # the default config never asks for an aesthetic score
    assert Decide()(no_aesthetic)["status"][0] == "kept"
    # duration: inclusive bound, on end_s - start_s
    assert Decide(DecideConfig(min_duration_s=2.0))(batch)["reasons"][0] == []
    assert Decide(DecideConfig(min_duration_s=2.5))(batch)["reasons"][0] == ["duration_s<2.5"]


def test_score_then_decide_on_real_clips() -> None:
    clips = [moving_clip(), static_clip(), blurred(moving_clip()), flat_clip(0)]
    batch = stage_batch([encode_mp4(c, fps=8.0) for c in clips], ["pan", "still", "soft", "black"])
    out = Decide()(Score()(batch))
    assert out["status"].tolist() == ["kept", "rejected", "rejected", "rejected"]
    assert out["reasons"][1] == ["motion<0.002", "still_fraction>0.9"]
    assert out["reasons"][2] == ["sharpness<20"]
    assert out["reasons"][3] == [
        "sharpness<20",
        "exposure<0.05",
        "dark_fraction>0.9",
        "motion<0.002",
        "still_fraction>0.9",
        "black_frame_fraction>0.5",
        "blank_frame_fraction>0.5",
    ]


# --- aesthetic, end to end on a tiny random CLIP --------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyClipPaths:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_head_matches_laion_checkpoint_layout() -> None:
    shapes = {k: tuple(v.shape) for k, v in AestheticHead(768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }


def test_tiny_clip_loads_through_user_loaders(tiny: TinyClipPaths, tmp_path: Path) -> None:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        tiny["clip_model"], pretrained=tiny["clip_pretrained"]
    )
    state = torch.load(tiny["head"], map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(AestheticHead(32).state_dict())
    from PIL import Image

    pixels = preprocess(Image.fromarray(noise_frame()))
    assert tuple(pixels.shape) == (3, 32, 32)  # the tiny config's image size
    saved = torch.load(tiny["clip_pretrained"], map_location="cpu", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    # idempotent and seeded: a rebuild keeps the files, another folder gets the same weights
    before = {p: Path(p).read_bytes() for p in (tiny["clip_pretrained"], tiny["head"])}
    assert build_tiny_clip(Path(tiny["head"]).parent) == tiny
    assert all(Path(p).read_bytes() == b for p, b in before.items())
    other = build_tiny_clip(tmp_path)
    for key in ("clip_pretrained", "head"):
        a = torch.load(tiny[key], weights_only=True)
        b = torch.load(other[key], weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # a head of the wrong width is refused with a clear message
    torch.save(AestheticHead(16).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="32-wide"):
        load_head(tmp_path / "narrow.pth", 32)
    (tmp_path / "page.pth").write_text("<html>404</html>")  # a download that went wrong
    with pytest.raises(ValueError, match=r"aesthetic head .*page\.pth is not a torch weights"):
        load_head(tmp_path / "page.pth", 32)


def test_aesthetic_refuses_with_nothing_to_do() -> None:
    with pytest.raises(ValueError, match="LAION"):
        AestheticScorer(AestheticConfig(head=None, embeddings=False))


def test_aesthetic_scorer_end_to_end(tiny: TinyClipPaths) -> None:
    wide = moving_clip(1)
    tall = np.ascontiguousarray(np.transpose(checkerboard_clip(), (0, 2, 1, 3)))  # 96x64
    cfg = AestheticConfig(**tiny, num_frames=3, batch_size=2, device="cpu")
    batch = stage_batch(
        [encode_mp4(wide, 8.0), encode_mp4(tall, 8.0), b"not a clip", None],
        ["wide", "tall", "bad", None],
    )
    scorer = AestheticScorer(cfg)
    out = scorer(batch)
    col = out[score_column("aesthetic")]
    assert np.isfinite(col[:2]).all() and np.isnan(col[2:]).all()
    assert abs(col[0] - col[1]) > 1e-4  # different clips, different scores
    assert out["status"].tolist() == [None, None, "error", None]
    assert "bad" in out["error"][2]

    # the clip's score is the mean over its sampled frames
    frames = roundtrip(wide)
    per_frame = scorer.score_frames(list(frames[sample_indices(len(frames), 3)]))
    assert len(np.unique(per_frame)) == 3
    # batched and single-frame forward passes differ in float32 rounding only
    assert col[0] == pytest.approx(per_frame.mean(), abs=0.05 * float(np.ptp(per_frame)))

    # deterministic: a fresh scorer loaded from the same files gives the same numbers
    again = AestheticScorer(cfg)(batch)[score_column("aesthetic")]
    np.testing.assert_allclose(again[:2], col[:2], rtol=1e-6)


def test_aesthetic_in_a_fresh_process(tiny: TinyClipPaths) -> None:
    """A Ray worker knows nothing of this process's open_clip registry: the config
    path in AestheticConfig must be enough."""
    code = (
        "import json, sys, numpy as np\n"
        "from pipeline.stages.aesthetic import AestheticConfig, AestheticScorer\n"
        "from pipeline.video import encode_mp4\n"
        "cfg = AestheticConfig(**json.loads(sys.argv[1]), device='cpu')\n"
        "clip = np.full((2, 32, 32, 3), 100, dtype=np.uint8)\n"
        "batch = {'clip_id': np.array(['a'], dtype=object),\n"
        "         'clip_bytes': np.array([encode_mp4(clip, 8.0)], dtype=object)}\n"
        "print(AestheticScorer(cfg)(batch)['score_aesthetic'][0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(tiny)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert math.isfinite(float(done.stdout.strip().splitlines()[-1]))
    assert tiny["clip_model"] == TINY_CLIP_NAME


# --- new signals: flow, still / slideshow, black and blank frames, text, frame hash --------


def smooth_frame(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    """Natural-looking content: low-frequency colour blobs (no text-like edges)."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(
        np.uint8
    )


def pan_clip(step: int, frames: int = T, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    base = noise_frame(seed) if (h, w) == (H, W) else cv2.resize(noise_frame(seed), (w, h))
    return np.stack([np.roll(base, step * i, axis=1) for i in range(frames)])


def with_text(frames: np.ndarray, lines: list[tuple[str, int]], scale: float = 0.45) -> np.ndarray:
    out = frames.copy()
    for f in out:
        for text, y in lines:
            cv2.putText(f, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1)
    return out


@pytest.mark.parametrize(
    ("total", "fps", "num", "per_s", "cap", "expected"),
    [(48, 24.0, 8, 0.0, 32, 8), (48, 24.0, 8, 2.0, 32, 4), (240, 24.0, 8, 2.0, 5, 5),
     (5, 24.0, 8, 2.0, 32, 1), (48, 0.0, 8, 2.0, 32, 8)],
)  # fmt: skip
def test_frame_count_by_number_or_rate(
    total: int, fps: float, num: int, per_s: float, cap: int, expected: int
) -> None:
    assert frame_count(total, fps, num, per_s, cap) == expected


@pytest.mark.parametrize("container", ["mp4", "mkv (no frame count)"])
def test_sampled_decode_equals_indexing_a_full_decode(container: str) -> None:
    frames = np.stack([np.roll(checkerboard_clip(4)[0], 2 * i, axis=1) for i in range(11)])
    data = encode_mp4(frames, fps=8.0) if container == "mp4" else _mkv(frames, 8)
    full, fps = decode_mp4(data)
    seen: list[tuple[int, float]] = []

    def choose(total: int, rate: float) -> np.ndarray:
        seen.append((total, rate))
        return np.array([7, 0, 7, 10])  # any order, repeats allowed

    got, indices, total, got_fps = decode_mp4_sampled(data, choose)
    assert seen == [(11, fps)] and (total, got_fps) == (11, fps)
    assert indices.tolist() == [7, 0, 7, 10]
    np.testing.assert_array_equal(got, full[[7, 0, 7, 10]])
    with pytest.raises(ValueError, match="no frame chosen"):
        decode_mp4_sampled(data, lambda total, rate: np.zeros(0, dtype=np.int64))


@pytest.mark.parametrize("length", [1, 2, 5, 40])
def test_score_payload_equals_scoring_the_full_decode(length: int) -> None:
    """Score reads only the frames its signals sample; the values are those of a full
    decode, for every clip length (1 frame: no flow pair; 2: the pair is the clip)."""
    rng = np.random.default_rng(length)
    base = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 2.0)
    frames = np.stack([np.roll(base, 3 * i, axis=1) for i in range(length)])
    data = encode_mp4(frames, fps=8.0)
    for cfg in (ScoreConfig(), ScoreConfig(frames_per_second=2.0, flow_pairs=3, num_frames=3)):
        full, fps = decode_mp4(data)
        want, want_hash = score_clip(full, fps, cfg)
        got, got_hash = score_payload(data, cfg)
        assert got_hash == want_hash
        assert got.keys() == want.keys()
        for name, value in want.items():
            assert got[name] == pytest.approx(value, nan_ok=True), name


def test_flow_measures_motion_in_frame_diagonals_per_second() -> None:
    # 4 px per frame at 96x64 (no downscale below 128 px) and 8 fps
    expected = 4 / math.hypot(W, H) * 8.0
    flow, still = flow_stats(roundtrip(pan_clip(4)), fps=8.0)
    assert flow == pytest.approx(expected, rel=0.15) and still == 0.0
    # the same motion at twice the resolution is the same share of the frame
    big, _ = flow_stats(roundtrip(pan_clip(8, h=2 * H, w=2 * W)), fps=8.0, width=128)
    assert big == pytest.approx(flow, rel=0.2)
    # and per second: twice the frame rate, twice the flow
    assert flow_stats(roundtrip(pan_clip(4)), fps=16.0)[0] == pytest.approx(2 * flow, rel=0.01)
    # a still picture through H.264: on some CPUs x264 leaves a level's difference here
    # and there between frames (flow ~1e-5, far below still_flow)
    flow_still, still_still = flow_stats(roundtrip(static_clip()), fps=8.0)
    assert flow_still < 1e-4 and still_still == 1.0
    assert flow_stats(static_clip()[:1], fps=8.0) == (0.0, 1.0)


def test_slideshow_is_caught_by_still_fraction_not_by_motion() -> None:
    # three stills, cut hard: sampled frames differ a lot, consecutive frames barely
    slides = np.concatenate([np.repeat(smooth_frame(s)[None], 10, axis=0) for s in range(3)])
    values, _ = score_clip(roundtrip(slides), 8.0, ScoreConfig(flow_pairs=6))
    assert values["motion"] > 0.02  # passes the motion threshold...
    assert values["still_fraction"] >= 4 / 6  # ...but most frame pairs do not move
    pan, _ = score_clip(roundtrip(pan_clip(2)), 8.0)
    assert pan["still_fraction"] == 0.0 and pan["flow"] > 0.05
    out = Decide(DecideConfig(thresholds={"motion": (0.002, None), "still_fraction": (None, 0.6)}))(
        rows_to_batch([{"clip_id": "slides", **{score_column(k): v for k, v in values.items()}}])
    )
    assert out["reasons"][0] == ["still_fraction>0.6"]


def test_a_one_frame_clip_has_no_motion_signals_and_is_not_judged_on_them() -> None:
    """An image source: motion, flow and still fraction are not measurable (NaN), and
    decide does not apply their thresholds to it, whatever is stored (corpora scored
    before this rule hold 0 motion and a still fraction of 1 for images)."""
    image, _ = score_payload(encode_mp4(moving_clip()[:1], fps=8.0))
    assert all(math.isnan(image[k]) for k in ("motion", "flow", "still_fraction"))
    assert image["sharpness"] > 20 and not math.isnan(image["exposure"])
    still, _ = score_clip(roundtrip(static_clip()), 8.0)  # a video of a still picture
    assert still["motion"] < 1e-4 and still["still_fraction"] == 1.0  # up to codec noise

    def row(cid: str, frames: int, values: dict[str, float]) -> dict[str, Any]:
        scores = {score_column(k): v for k, v in values.items()}
        return {"clip_id": cid, "start_frame": 10, "end_frame": 10 + frames, **scores}

    old_image = {**image, "motion": 0.0, "flow": 0.0, "still_fraction": 1.0}
    black_image = {**image, "black_frame_fraction": 1.0}
    rows = [
        row("image", 1, image),
        row("old_image", 1, old_image),
        row("black_image", 1, black_image),
        row("still_video", 16, still),
        row("video_without_motion_scores", 16, image),
    ]
    out = Decide()(rows_to_batch(rows))
    assert list(out["status"]) == ["kept", "kept", "rejected", "rejected", "rejected"]
    assert out["reasons"][2] == ["black_frame_fraction>0.5"]
    assert out["reasons"][3] == ["motion<0.002", "still_fraction>0.9"]
    assert out["reasons"][4] == ["motion:missing", "still_fraction:missing"]


def test_black_and_blank_frames() -> None:
    clip = np.concatenate([flat_clip(5)[:4], moving_clip()[:4]])  # half near-black
    assert black_frame_fraction(clip) == 0.5 and blank_frame_fraction(clip) == 0.5
    red = np.zeros((4, H, W, 3), np.uint8)
    red[..., 0] = 200
    assert black_frame_fraction(red) == 0.0 and blank_frame_fraction(red) == 1.0
    # a dark but textured frame is not black; a black frame with a small logo still is
    dim = (noise_frame()[None] // 8).astype(np.uint8)  # luma 0..31, mostly above 25
    assert black_frame_fraction(dim) == 0.0
    logo = flat_clip(0)[:1].copy()
    logo[0, :4, :8] = 255  # 0.5% of the pixels
    assert black_frame_fraction(logo) == 1.0 and blank_frame_fraction(logo) == 0.0
    s = score_frames(roundtrip(np.concatenate([flat_clip(0), moving_clip()])))
    assert s["black_frame_fraction"] == 0.5 and s["blank_frame_fraction"] == 0.5


def test_text_coverage_with_and_without_burned_in_text() -> None:
    h, w = 216, 384
    scene = np.stack([smooth_frame(i % 3, h, w) for i in range(T)])
    subtitles = with_text(scene, [("Where are we going tonight?", 200)], scale=0.6)
    slide = with_text(
        np.full((T, h, w, 3), 40, np.uint8),
        [(f"Quarterly results line {k}: up 12%", 20 + 24 * k) for k in range(8)],
    )
    plain = [text_coverage(roundtrip(c)) for c in (scene, moving_clip(), checkerboard_clip())]
    assert max(plain) < 0.01, plain
    sub = text_coverage(roundtrip(subtitles))
    assert 0.02 < sub < 0.15  # one line: present, below the default slide threshold
    full = text_coverage(roundtrip(slide))
    assert full > 0.2
    mask = text_mask(cv2.cvtColor(roundtrip(subtitles)[0], cv2.COLOR_RGB2GRAY))
    rows = np.flatnonzero(mask.any(axis=1))
    assert rows.min() > 170  # the boxes sit on the subtitle line, nowhere else
    default_max = dict(DEFAULT_THRESHOLDS)["text_coverage"][1]
    assert default_max is not None and sub < default_max < full


def test_frame_hash_exact_copies_match_different_clips_do_not() -> None:
    clip = moving_clip(3)
    h0 = frame_hash(roundtrip(clip))
    rescaled = np.stack([cv2.resize(f, (2 * W, 2 * H)) for f in clip])
    copies = [
        frame_hash(decode_mp4(encode_mp4(clip, 8.0, crf=30))[0]),
        frame_hash(roundtrip(rescaled)),
    ]
    assert all(hamming(h0, c) <= 4 for c in copies), [hamming(h0, c) for c in copies]
    others = [frame_hash(roundtrip(c)) for c in (moving_clip(4), static_clip(3), pan_clip(2))]
    assert all(hamming(h0, o) > 12 for o in others), [hamming(h0, o) for o in others]
    assert len(h0) == 16 and int(h0, 16) == dhash_of_mean(roundtrip(clip))


def dhash_of_mean(frames: np.ndarray) -> int:
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).mean(axis=0)
    small = cv2.resize(gray.astype(np.float32), (9, 8), interpolation=cv2.INTER_AREA)
    return int("".join("1" if b else "0" for b in (small[:, :-1] > small[:, 1:]).ravel()), 2)


def test_score_stage_writes_every_cheap_signal_and_the_hash() -> None:
    batch = stage_batch(
        [encode_mp4(moving_clip(), 8.0), encode_mp4(static_clip(), 8.0), b"junk"],
        ["pan", "still", "bad"],
    )
    out = Score(ScoreConfig(frames_per_second=2.0, max_frames=3))(batch)
    for name in CHEAP_SIGNALS:
        assert np.isfinite(out[score_column(name)][:2]).all(), name
        assert np.isnan(out[score_column(name)][2]), name
    assert out[score_column("still_fraction")].tolist()[:2] == [0.0, 1.0]
    assert [len(h) for h in out["frame_hash"][:2]] == [16, 16] and out["frame_hash"][2] is None


# --- decide: late signals and duplicates ---------------------------------------------------


def test_decide_agreement_is_pending_without_caption() -> None:
    cfg = DecideConfig(thresholds={"agreement": (0.2, None)})
    rows = [
        {"clip_id": "uncaptioned", "caption": None, score_column("agreement"): math.nan},
        {"clip_id": "empty", "caption": "", score_column("agreement"): math.nan},
        {"clip_id": "unscored", "caption": "a dog", score_column("agreement"): math.nan},
        {"clip_id": "off", "caption": "a dog", score_column("agreement"): 0.1},
        {"clip_id": "on", "caption": "a dog", score_column("agreement"): 0.3},
    ]
    out = Decide(cfg)(rows_to_batch(rows))
    assert out["reasons"].tolist() == [[], [], ["agreement:missing"], ["agreement<0.2"], []]
    assert decide({}, {"agreement": (0.2, None)}, pending=["agreement"]) == []


def test_decide_rejects_marked_duplicates_unless_told_not_to() -> None:
    rows = [
        {"clip_id": "a", **{score_column(k): v for k, v in GOOD.items()}, "dup_of": None},
        {"clip_id": "b", **{score_column(k): v for k, v in GOOD.items()}, "dup_of": "a"},
    ]
    out = Decide()(rows_to_batch(rows))
    assert out["status"].tolist() == ["kept", "rejected"]
    assert out["reasons"][1] == ["duplicate"]
    assert Decide(DecideConfig(reject_duplicates=False))(rows_to_batch(rows))["reasons"][1] == []


# --- CLIP embeddings and clip-caption agreement on the tiny random CLIP --------------------


def test_aesthetic_writes_unit_clip_embeddings_with_or_without_head(tiny: TinyClipPaths) -> None:
    batch = stage_batch(
        [encode_mp4(moving_clip(1), 8.0), encode_mp4(moving_clip(1), 8.0), None,
         encode_mp4(moving_clip(2), 8.0)],
        ["a", "copy", "broken", "other"],
    )  # fmt: skip
    with_head = AestheticScorer(AestheticConfig(**tiny, num_frames=2, device="cpu"))(batch)
    no_head = AestheticScorer(
        AestheticConfig(**{**tiny, "head": None}, frames_per_second=2.0, device="cpu")
    )(batch)
    emb = np.asarray(with_head["clip_embedding"][0], dtype=np.float32)
    assert emb.shape == (32,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    # The same content embeds the same, up to float reordering: CPU kernels may sum a
    # frame's products in another order at another batch position. Another clip is
    # over 100x farther away than that.
    same, other = (1.0 - float(emb @ with_head["clip_embedding"][i]) for i in (1, 3))
    assert same < 1e-4 < other
    assert same < other / 100
    # one (N, D) array (a tensor column on Ray), all-NaN where there is no embedding
    assert with_head["clip_embedding"].shape == (4, 32)
    assert np.isnan(with_head["clip_embedding"][2]).all() and with_head["status"][2] == "error"
    # no head: embeddings still written, the aesthetic score is NaN, never invented
    assert np.isnan(no_head[score_column("aesthetic")]).all()
    assert np.isfinite(with_head[score_column("aesthetic")][[0, 1, 3]]).all()
    assert np.asarray(no_head["clip_embedding"][0]).shape == (32,)


def test_agreement_reuses_stored_embeddings_and_skips_uncaptioned(
    tiny: TinyClipPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip_cfg = {k: tiny[k] for k in ("clip_model", "clip_pretrained", "clip_config")}  # type: ignore[literal-required]
    payload = encode_mp4(moving_clip(2), 8.0)
    embedded = AestheticScorer(AestheticConfig(**tiny, num_frames=3, device="cpu"))(
        stage_batch([payload], ["c"])
    )["clip_embedding"][0]
    rows = [
        {"clip_id": "stored", "caption": "a red ball", "clip_embedding": embedded,
         "clip_bytes": payload},
        {"clip_id": "decoded", "caption": "a red ball", "clip_embedding": None,
         "clip_bytes": payload},
        {"clip_id": "other", "caption": "an old man reading", "clip_embedding": embedded,
         "clip_bytes": None},
        {"clip_id": "rejected", "caption": None, "clip_embedding": embedded, "clip_bytes": None},
        {"clip_id": "bad", "caption": "x", "clip_embedding": None, "clip_bytes": b"junk"},
    ]  # fmt: skip
    stage = Agreement(AgreementConfig(**clip_cfg, num_frames=3, device="cpu"))
    out = stage(rows_to_batch(rows))
    score = out[score_column("agreement")]
    assert np.isfinite(score[:3]).all() and (np.abs(score[:3]) <= 1.0).all()
    # stored == recomputed (up to float reordering); another caption, another score
    assert score[0] == pytest.approx(score[1], abs=1e-3)
    assert score[0] != pytest.approx(score[2], abs=1e-2)
    assert np.isnan(score[3]) and out["status"][3] is None  # pending, not an error
    assert out["status"][4] == "error" and "bad" in out["error"][4]

    # a stored embedding means no decode at all
    def no_decode(*_: Any, **__: Any) -> Any:
        raise AssertionError("decoded although an embedding was stored")

    monkeypatch.setattr("pipeline.stages.agreement.decode_mp4_sampled", no_decode)
    again = stage(rows_to_batch(rows[:1] + rows[2:4]))[score_column("agreement")]
    np.testing.assert_allclose(again[:2], score[[0, 2]], atol=1e-3)


def test_one_sampled_frame_still_measures_motion() -> None:
    """Motion compares sampled frames: a clip that moves never scores 0 because one
    frame was asked for (``num_frames: 1``, or one per second of a short clip)."""
    clip = moving_clip()
    full = score_clip(clip, 24.0, ScoreConfig(num_frames=2))[0]["motion"]
    assert full > 0.002
    for cfg in (ScoreConfig(num_frames=1), ScoreConfig(frames_per_second=0.1)):
        assert score_clip(clip, 24.0, cfg)[0]["motion"] == full
    assert score_frames(clip, ScoreConfig(num_frames=1))["motion"] == full


def test_building_the_tiny_clip_announces_nothing(tmp_path: Path) -> None:
    # a fresh process: an unconfigured root logger, as a user's `reelpack build` has
    code = (
        "import logging, sys; from pipeline.tiny_clip import build_tiny_clip; "
        "build_tiny_clip(sys.argv[1]); print(len(logging.getLogger().handlers))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "clip")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "No pretrained weights" not in out.stderr, out.stderr
    assert out.stdout.strip() == "0"  # the root logger left unconfigured
