"""Caption stage: CPU time preparing frames per clip vs time in the model.

A captioning actor does three things per clip: decode the payload and sample and
resize frames (``prepare_clip``, CPU), run the processor (chat template, tokens,
patchified pixels; CPU), and run the model (``generate``: GPU in production). The
GPU is starved when the CPU work per clip takes longer than the model's. This
script measures all three on the same clips, in the same run, and prints them as
a ratio to the model time, plus the decode rate at which a model would be starved
(``max_new_tokens`` / CPU time per clip): a GPU model generating slower than that
per clip stream is never waiting for frames.

Clips: synthetic moving scenes encoded as split writes payloads (H.264 at the
working resolution, 640x360 by default). Model: the tiny random Qwen3-VL
(``pipeline.tiny_vlm``) on CPU by default; any VLM by hub id or folder with
``--model``.

    python benchmarks/caption_bench.py                  # default: 8 clips, tiny model, CPU
    python benchmarks/caption_bench.py --clips 4 --seconds 4 --size 1280x720

On a GPU machine, measure the real model the same way (weights must be cached)::

    python benchmarks/caption_bench.py --model Qwen/Qwen3-VL-8B-Instruct --device cuda \\
        --max-new-tokens 256 --batch-size 4

and read ``cpu / model``: below 1 / (CPU cores per captioning actor), the actor's CPU
work keeps up with its GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.stages.caption import (
    CaptionConfig,
    Captioner,
    PreparedClip,
    decode_sampled,
    fit_frames,
    prepare_clip,
)
from pipeline.tiny_vlm import build_tiny_vlm
from pipeline.video import decode_mp4, encode_mp4


def synthetic_clip(frames: int, width: int, height: int, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a smooth textured background panning under a moving square."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 8), 3), dtype=np.uint8)
    texture = cv2.resize(coarse, (width * 2, height), interpolation=cv2.INTER_CUBIC)
    out = np.empty((frames, height, width, 3), np.uint8)
    side = min(height, width) // 4
    color = rng.integers(0, 256, 3, dtype=np.uint8)
    for t in range(frames):
        x0 = (t * 3) % width
        out[t] = texture[:, x0 : x0 + width]
        x = (t * 7) % max(1, width - side)
        out[t, height // 3 : height // 3 + side, x : x + side] = color
    return out


T = TypeVar("T")


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """Result, wall seconds, CPU seconds of this process (all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=2.0, help="clip length")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--size", default="640x360", help="payload size WxH (split's working size)")
    p.add_argument("--model", help="VLM hub id or folder (default: tiny random Qwen3-VL)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-frames", type=int, default=CaptionConfig.num_frames)
    p.add_argument("--max-pixels", type=int, default=CaptionConfig.max_pixels)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    width, height = (int(v) for v in args.size.lower().split("x"))
    frames_per_clip = max(2, round(args.seconds * args.fps))
    payloads = [
        encode_mp4(synthetic_clip(frames_per_clip, width, height, seed), args.fps)
        for seed in range(args.clips)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_vlm(str(Path(tmp) / "tiny-vlm"))
        cfg = CaptionConfig(
            model=model,
            num_frames=args.num_frames,
            max_pixels=args.max_pixels,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            device=args.device,
        )
        cap = Captioner(cfg)
        # the model must generate max_new_tokens, as a real model writing a full caption
        cap.model.generation_config = replace_eos(cap.model.generation_config)
        run(cap, payloads, args, width, height, frames_per_clip)


def replace_eos(generation_config: Any) -> Any:
    """A copy that never stops early, so every clip costs ``max_new_tokens`` steps."""
    out = generation_config.__class__.from_dict(generation_config.to_dict())
    out.eos_token_id = None
    return out


def run(
    cap: Captioner, payloads: list[bytes], args: argparse.Namespace, width: int, height: int, t: int
) -> None:
    cfg = cap.cfg
    n = len(payloads)
    cuda = cap.device.type == "cuda"
    # step -> per-repeat (wall, cpu) seconds per clip
    steps = ("decode all", "decode sampled", "resize", "prepare", "processor", "model")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
    # warm-up: first calls allocate buffers and pick kernels
    clips = [prepare_clip(b, cfg.num_frames, cfg.max_pixels) for b in payloads[: cfg.batch_size]]
    cap._generate(clips, [cfg.prompt] * len(clips))
    for _ in range(args.repeats):
        acc = {k: [0.0, 0.0] for k in steps}

        def add(step: str, wall: float, cpu: float, acc: dict[str, list[float]] = acc) -> None:
            acc[step][0] += wall
            acc[step][1] += cpu

        prepared: list[PreparedClip] = []
        for b in payloads:
            _, w, c = _timed(decode_mp4, b)  # the baseline decode: every frame to RGB
            add("decode all", w, c)
            (frames, _, _, _), w, c = _timed(decode_sampled, b, cfg.num_frames)
            add("decode sampled", w, c)
            _, w, c = _timed(fit_frames, frames, cfg.max_pixels)
            add("resize", w, c)
            clip, w, c = _timed(prepare_clip, b, cfg.num_frames, cfg.max_pixels)
            add("prepare", w, c)
            prepared.append(clip)
        for start in range(0, n, cfg.batch_size):
            chunk = prepared[start : start + cfg.batch_size]
            inputs, w, c = _timed(cap.model_inputs, chunk, [cfg.prompt] * len(chunk))
            add("processor", w, c)
            w0, c0 = time.perf_counter(), time.process_time()
            cap.generate_from_inputs(inputs)
            if cuda:
                import torch

                torch.cuda.synchronize()
            add("model", time.perf_counter() - w0, time.process_time() - c0)
        for k in steps:
            times[k].append((acc[k][0] / n, acc[k][1] / n))

    def med(step: str, which: int) -> float:
        return statistics.median(x[which] for x in times[step])

    # CPU time is robust on a shared machine; a GPU model is measured by the wall clock
    model = med("model", 0) if cuda else med("model", 1)
    cpu = med("prepare", 1) + med("processor", 1)
    params = sum(p.numel() for p in cap.model.parameters())
    print(
        f"caption_bench: {n} clips of {t} frames at {width}x{height}, {cfg.num_frames} frames "
        f"sampled, max_pixels {cfg.max_pixels}, batch {cfg.batch_size}, "
        f"{cfg.max_new_tokens} new tokens; model {Path(cfg.model).name} "
        f"({params / 1e6:.2f} M params) on {cap.device}; median of {args.repeats}"
    )
    rows = [
        ("decode every frame to RGB (decode_mp4)", "decode all"),
        ("decode, RGB of sampled frames only", "decode sampled"),
        ("resize sampled frames to max_pixels", "resize"),
        ("prepare_clip = CPU frame prep", "prepare"),
        ("processor: template, tokens, patches", "processor"),
        (f"model generate ({'wall' if cuda else 'CPU'}, baseline)", "model"),
    ]
    print(f"{'step (per clip)':<42}{'cpu ms':>9}{'wall ms':>9}{'x model':>9}")
    for name, step in rows:
        c, w = med(step, 1), med(step, 0)
        print(f"{name:<42}{c * 1e3:>9.1f}{w * 1e3:>9.1f}{c / model:>9.3f}")
    print(
        f"CPU per clip (prepare + processor) / model = {cpu / model:.3f}; "
        f"decode sampled / decode all = {med('decode sampled', 1) / med('decode all', 1):.2f}"
    )
    print(
        f"a model is starved by one CPU core only if it generates {cfg.max_new_tokens} tokens "
        f"in under {cpu * 1e3:.0f} ms per clip ({cfg.max_new_tokens / cpu:,.0f} tokens/s per clip)"
    )
    default = CaptionConfig.max_new_tokens
    print(
        f"at the default max_new_tokens={default}: starved only above "
        f"{default / cpu:,.0f} tokens/s per clip"
    )


if __name__ == "__main__":
    main()
