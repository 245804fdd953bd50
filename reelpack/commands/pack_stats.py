"""``reelpack pack-stats ROOT [--budget N]``: how well a corpus packs into a token budget.

Runs `model.data.PackedLoader` over the corpus (one epoch, or ``--limit`` batches) and
prints the padding fraction, packed sequences, samples skipped / cropped / downscaled
by the oversize policy, and tokens/s — what to check before choosing a budget::

    reelpack pack-stats /data/corpus --budget 16384 --patch 1,2,2 --oversize crop --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

__all__ = ["register", "run"]


def _patch(text: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--patch wants pt,ph,pw (positive), got {text!r}")
    return parts[0], parts[1], parts[2]


def pack_stats(
    root: str,
    budget: int,
    *,
    patch: tuple[int, int, int] | None = None,
    oversize: str = "skip",
    limit: int | None = None,
    num_workers: int = 0,
    pack_buffer: int = 64,
    seed: int = 0,
    skip_corrupt: bool = False,
) -> dict[str, Any]:
    """The loader's stats after one epoch (or `limit` batches) as a JSON-able dict."""
    from model.data import PackedLoader

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")

    start = time.perf_counter()
    loader = PackedLoader(
        root,
        token_budget=budget,
        patch=patch,
        seed=seed,
        num_workers=num_workers,
        oversize=oversize,
        pack_buffer=pack_buffer,
        skip_corrupt=skip_corrupt,
    )
    plan_s = time.perf_counter() - start
    steps = len(loader)
    for n, _ in enumerate(loader, start=1):
        if limit is not None and n >= limit:
            break
    s = loader.stats
    fraction = s.padding_fraction()
    return {
        "root": root,
        "token_budget": budget,
        "patch": list(loader.patch),
        "oversize": oversize,
        "samples_indexed": len(loader.entries),
        "steps_per_epoch": steps,
        "sequences": s.batches,
        "samples_packed": s.samples_packed,
        "samples_skipped": s.samples_skipped,
        "samples_not_divisible_by_patch": s.samples_misfit,
        "samples_cropped": s.samples_cropped,
        "samples_downscaled": s.samples_downscaled,
        "samples_dropped_at_epoch_end": s.samples_dropped,
        "tokens": s.tokens,
        "padding_tokens": s.padding_tokens,
        "padding_fraction": None if math.isnan(fraction) else fraction,
        "mean_samples_per_sequence": s.samples_packed / s.batches if s.batches else None,
        "tokens_per_s": s.tokens_per_s() if s.seconds > 0 else None,
        "plan_s": plan_s,
        "skipped_examples": s.skipped_keys[:10],
        "samples_corrupt": s.samples_corrupt,
        "corrupt_examples": s.corrupt_samples[:10],
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:,.0f}"
    return str(value)


def run(args: argparse.Namespace) -> int:
    try:
        out = pack_stats(
            args.root,
            args.budget,
            patch=args.patch,
            oversize=args.oversize,
            limit=args.limit,
            num_workers=args.workers,
            pack_buffer=args.pack_buffer,
            skip_corrupt=args.skip_corrupt,
        )
    except (FileNotFoundError, ValueError) as e:  # not a corpus, a bad setting, a damaged shard
        print(f"reelpack pack-stats: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage that does not answer (the error names the object)
        print(f"reelpack pack-stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        width = max(len(k) for k in out)
        for key, value in out.items():
            print(f"{key:<{width}}  {_fmt(value)}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("pack-stats", help="padding and throughput of packing a corpus")
    p.add_argument("root", help="corpus root: a folder or s3://bucket/prefix")
    from model.train_config import TrainConfig  # torch-free

    train = TrainConfig()
    p.add_argument(
        "--budget",
        type=int,
        default=train.token_budget,
        help=f"tokens per packed sequence (default: train's, {train.token_budget})",
    )
    p.add_argument("--patch", type=_patch, help="pt,ph,pw (default: the manifest's)")
    p.add_argument("--oversize", choices=("skip", "crop", "downscale"), default=train.oversize)
    p.add_argument("--limit", type=int, help="stop after this many sequences")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--pack-buffer", type=int, default=64, help="samples per packing window")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out samples that cannot be read (counted in samples_corrupt), as "
        "training with --skip-corrupt does",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
