"""``reelpack demo``: the whole system on a CPU in a few minutes, offline.

Synthesizes a handful of short videos with known cuts (landscape, portrait,
square), builds a corpus with the ``tiny`` preset (random-weight models built
from small configs, loaded through the real loaders), trains a tiny DiT for a
few steps, and prints what happened. Captions and latents come from random
weights: the demo shows the machinery, not model quality.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.train import TrainConfig

__all__ = ["DEMO_STEPS", "demo_train_config", "run_demo", "summarize_corpus"]

DEMO_STEPS = 100  # about 6 s on one CPU core; the loss falls by about 85%


def summarize_corpus(root: str) -> dict[str, Any]:
    """Counts a person checks after a build: sources, clips by status and reason, tokens."""
    from pipeline.writer import read_index, read_sources

    index = read_index(root, columns=("status", "reasons", "shard", "num_tokens")).to_pylist()
    sources = read_sources(root).to_pylist()
    reasons: Counter[str] = Counter()
    for row in index:
        if row["status"] == "rejected":
            reasons.update(row["reasons"] or [])
    return {
        "sources": len(sources),
        "sources_error": sum(s["status"] == "error" for s in sources),
        "clips": dict(Counter(r["status"] for r in index)),
        "rejected_by_reason": dict(reasons),
        "shards": len({r["shard"] for r in index if r["shard"]}),
        "latent_tokens": sum(r["num_tokens"] or 0 for r in index if r["status"] == "kept"),
    }


def demo_train_config(steps: int = DEMO_STEPS) -> TrainConfig:
    """What the demo trains: DiT-tiny at lr 2e-3, its EMA (which the sample uses)
    averaging about the last 20 steps, so that even a short run samples trained weights.
    The demo corpus holds about 2,000 latent tokens: 1,024-token sequences pack it into
    two nearly full sequences (about 5% padding), where the default 4,096 would pad
    half of every step."""
    from model.train import TrainConfig

    return TrainConfig(preset="DiT-tiny", steps=steps, lr=2e-3, ema_decay=0.95, token_budget=1024)


def run_demo(out: Path, steps: int = DEMO_STEPS) -> dict[str, Any]:
    from model.sample import sample_to_file
    from model.train import train
    from pipeline.config import load_config
    from pipeline.graph import build
    from pipeline.synth import demo_videos

    train_cfg = demo_train_config(steps)
    train_cfg.validate()  # before a minute of synthesis and building
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; the demo writes a folder")
    out.mkdir(parents=True, exist_ok=True)
    videos = demo_videos(str(out / "videos"))
    print(f"[demo] synthesized {len(videos)} videos in {out / 'videos'}")
    cfg = load_config(preset="tiny")
    corpus = str(out / "corpus")
    build([str(out / "videos")], corpus, cfg, echo=lambda s: print(f"[demo] {s}"))
    summary = summarize_corpus(corpus)
    print(f"[demo] corpus at {corpus}")
    print(f"[demo]   sources: {summary['sources']} ({summary['sources_error']} failed)")
    print(f"[demo]   clips: {summary['clips']}")
    print(f"[demo]   rejected by reason: {summary['rejected_by_reason']}")
    print(f"[demo]   shards: {summary['shards']}, latent tokens: {summary['latent_tokens']}")
    shutil.rmtree(out / "train", ignore_errors=True)  # a demo run again trains afresh
    losses = train(corpus, str(out / "train"), train_cfg)
    summary["loss_first"], summary["loss_last"] = losses[0], losses[-1]
    print(f"[demo] trained {len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    # 9 frames (1 + 4k for the Wan VAE) at 32x48: sides are multiples of VAE factor x patch
    sample = sample_to_file(
        str(out / "train" / "checkpoint.pt"),
        corpus,
        "a demo clip",
        frames=9,
        height=32,
        width=48,
        steps=8,
        cfg_scale=4.0,
        out=str(out / "sample.mp4"),
    )
    summary["sample"] = sample
    print(f"[demo] generated a sample: {sample}")
    print("[demo] models had random weights (tiny preset): captions and latents are test data")
    return summary
