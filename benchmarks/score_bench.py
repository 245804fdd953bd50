"""CPU cost of the cheap quality signals per clip, as a ratio to decoding the clip.

The score stage decodes each clip payload (``clip_bytes``: H.264 mp4 at the
working resolution, as split writes it) once and computes every cheap signal
(sharpness, exposure, dark / bright, motion, black / blank frames, text coverage,
optical flow + still fraction, frame hash) on a few sampled frames. This measures,
on the same clips, the decode pass (``pipeline.video.decode_mp4``, the baseline)
and the signals (``pipeline.stages.score.score_clip``), and prints the ratio per
clip and per signal group. Goal: all signals together <= 0.3x the decode. It also
times what the stage runs, ``score_payload``: a decode that converts to RGB only the
frames the signals read, plus the signals, against a full decode plus the signals.

Clips: cuts of the real videos in ``../shared/videos`` (when present) and
synthetic pans, re-encoded as split would (640x360 budget, CRF 18), 3 s each.

    python benchmarks/score_bench.py              # default: 6 clips, 5 repeats
    python benchmarks/score_bench.py --repeats 3 --seconds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.score import (
    _LUMA_SIGNALS,
    ScoreConfig,
    _frame_hash,
    _text_coverage,
    flow_stats,
    frame_count,
    luma_at_width,
    sample_indices,
    score_clip,
    score_payload,
)
from pipeline.video import decode_mp4, encode_mp4, even_size

VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"
REAL = ("testvideo.mp4", "mmaction2_test.mp4", "issue-134-rotate.mp4", "fades.mp4")
WORK_AREA = 640 * 360  # SplitConfig.work_max_area


def _payload(frames: np.ndarray, fps: float) -> bytes:
    h, w = frames.shape[1:3]
    ew, eh = even_size(w, h, WORK_AREA)
    resized = np.stack([cv2.resize(f, (ew, eh), interpolation=cv2.INTER_AREA) for f in frames])
    return encode_mp4(resized, fps, crf=18)


def real_clip(name: str, seconds: float) -> tuple[str, bytes] | None:
    path = VIDEOS / name
    if not path.exists():
        return None
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 25)
        want = int(seconds * fps)
        frames = [
            f.to_ndarray(format="rgb24")
            for _, f in zip(range(want), container.decode(stream), strict=False)
        ]
    return f"{name} {len(frames)}f", _payload(np.stack(frames), fps)


def synthetic_clip(seed: int, seconds: float, fps: float = 24.0) -> tuple[str, bytes]:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (9, 16, 3)).astype(np.float32)
    base = np.clip(cv2.resize(small, (640, 360), interpolation=cv2.INTER_CUBIC), 0, 255)
    base = (base + rng.normal(0, 8, base.shape)).clip(0, 255).astype(np.uint8)
    frames = np.stack([np.roll(base, 3 * t, axis=1) for t in range(int(seconds * fps))])
    return f"synthetic pan {len(frames)}f", encode_mp4(frames, fps, crf=18)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU seconds of ``fn`` (all threads of this process): the cost, unlike wall
    time, does not depend on what else the shared machine is running."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def groups(frames: np.ndarray, fps: float, cfg: ScoreConfig) -> dict[str, Callable[[], object]]:
    """The steps of ``score_clip``, separately (for the breakdown)."""
    count = frame_count(len(frames), fps, cfg.num_frames, cfg.frames_per_second, cfg.max_frames)
    picked = frames[sample_indices(len(frames), count)]
    text = picked[sample_indices(len(picked), cfg.text_frames)]
    y = luma_at_width(picked, cfg.analysis_width)
    yt = luma_at_width(text, cfg.text_width)
    return {
        "luma+resize": lambda: (
            luma_at_width(picked, cfg.analysis_width),
            luma_at_width(text, cfg.text_width),
        ),
        "pixel stats": lambda: {name: fn(y) for name, fn in _LUMA_SIGNALS.items()},
        "text": lambda: _text_coverage(yt),
        "flow": lambda: flow_stats(frames, fps, cfg.flow_pairs, cfg.flow_width, cfg.still_flow),
        "hash": lambda: _frame_hash(y),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    cfg = ScoreConfig()
    clips = [c for c in (real_clip(n, args.seconds) for n in REAL) if c is not None]
    clips += [
        synthetic_clip(s, args.seconds) for s in range(6 - len(clips) if len(clips) < 6 else 0)
    ]
    clips += [synthetic_clip(99, args.seconds)] if len(clips) < 2 else []

    header = f"{'clip':34} {'size':>9} {'decode ms':>10} {'signals ms':>11} {'ratio':>6}"
    print("CPU time per clip (median of repeats), all threads of this process")
    steps = ("luma+resize", "pixel stats", "text", "flow", "hash")
    print(header + "   " + "  ".join(f"{g:>11}" for g in steps))
    ratios, dec_total, sig_total, stage_total = [], 0.0, 0.0, 0.0
    group_totals: dict[str, float] = {}
    for name, payload in clips:
        frames, fps = decode_mp4(payload)
        decode_s = median_time(lambda payload=payload: decode_mp4(payload), args.repeats)
        signals_s = median_time(
            lambda frames=frames, fps=fps: score_clip(frames, fps, cfg), args.repeats
        )
        # the stage itself: a decode that converts only the frames the signals read
        stage_total += median_time(
            lambda payload=payload: score_payload(payload, cfg), args.repeats
        )
        parts = {g: median_time(fn, args.repeats) for g, fn in groups(frames, fps, cfg).items()}
        for g, v in parts.items():
            group_totals[g] = group_totals.get(g, 0.0) + v
        ratios.append(signals_s / decode_s)
        dec_total += decode_s
        sig_total += signals_s
        size = f"{frames.shape[2]}x{frames.shape[1]}"
        row = f"{name[:34]:34} {size:>9} {decode_s * 1e3:10.1f} {signals_s * 1e3:11.1f}"
        print(
            f"{row} {ratios[-1]:6.3f}   " + "  ".join(f"{v * 1e3:8.1f} ms" for v in parts.values())
        )
    print()
    print(f"all clips: decode {dec_total * 1e3:.0f} ms, signals {sig_total * 1e3:.0f} ms, "
          f"ratio {sig_total / dec_total:.3f} (median per clip {statistics.median(ratios):.3f}; "
          f"goal <= 0.3)")  # fmt: skip
    print(f"score stage per payload (score_payload: sampled decode + signals) "
          f"{stage_total * 1e3:.0f} ms, {stage_total / (dec_total + sig_total):.2f}x "
          f"a full decode + signals")  # fmt: skip
    print("share of signal time: " + ", ".join(
        f"{g} {v / sum(group_totals.values()):.0%}" for g, v in group_totals.items()
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
