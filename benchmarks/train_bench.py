"""Packed vs padded DiT training steps on the same realistic mix of clip sizes (CPU).

    python benchmarks/train_bench.py                 # tiny preset, ~1-3 minutes on 2 cores
    python benchmarks/train_bench.py --preset DiT-S --budget 4096 --steps 5

The same samples go through both: a mix of images and short clips in four aspect
ratios (16:9, 9:16, 1:1, 4:3) and 1-5 latent frames, grouped into steps of at most
``--budget`` real tokens.

- **packed**: one sequence per step, block-diagonal attention (``split`` backend:
  one attention per sample, no masked-out work), the loss per sample on real tokens.
- **padded**: the same samples of a step as a batch padded to the longest one
  (B x L_max token slots, attention over L_max per sample): what a trainer without
  packing computes. Padding tokens go through every layer; the loss ignores them.
- **packed, dense mask**: packed, but attention with an (N, N) block-diagonal mask,
  i.e. the whole pack's N^2 scores: why a varlen / block-diagonal kernel matters.

Reports step-time ratios against the padded baseline measured in the same run, the
padding share, and model FLOPs (`model.dit.estimate_flops`, forward x 3 for training).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from model.dit import DiT, build_dit, estimate_flops, grid_positions
from model.flow import per_sample_mean

ASPECTS = [(9, 16), (16, 9), (12, 12), (10, 13)]  # (h, w) tokens per frame at scale 1
FRAMES = [1, 1, 2, 3, 5]  # latent frames: images and short clips


def length_mix(count: int, scale: float, seed: int) -> list[tuple[int, int, int]]:
    """`count` token grids (t, h, w): four aspect ratios, sizes 0.6-1x, 1-5 frames."""
    rng = random.Random(seed)
    grids = []
    for _ in range(count):
        h, w = rng.choice(ASPECTS)
        s = scale * rng.uniform(0.6, 1.0)
        grids.append((rng.choice(FRAMES), max(1, round(h * s)), max(1, round(w * s))))
    return grids


def group(grids: list[tuple[int, int, int]], budget: int) -> list[list[tuple[int, int, int]]]:
    """Greedy in-order groups of at most `budget` tokens (one group = one step)."""
    steps: list[list[tuple[int, int, int]]] = [[]]
    used = 0
    for g in grids:
        n = g[0] * g[1] * g[2]
        if n > budget:
            continue
        if used + n > budget:
            steps.append([])
            used = 0
        steps[-1].append(g)
        used += n
    return [s for s in steps if s]


def make_inputs(
    model: DiT, grids: list[tuple[int, int, int]], pad_to: int | None, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """Packed inputs; with `pad_to`, each sample occupies `pad_to` slots (padded batch)."""
    lengths = [a * b * c for a, b, c in grids]
    slots = [pad_to or n for n in lengths]
    total = sum(slots)
    positions = torch.zeros(total, 3, dtype=torch.long)
    real = torch.zeros(total, dtype=torch.bool)
    at = 0
    for grid, n, s in zip(grids, lengths, slots, strict=True):
        positions[at : at + n] = grid_positions(grid)
        real[at : at + n] = True
        at += s
    slot_t = torch.tensor(slots)
    return {
        "tokens": torch.randn(total, model.config.token_dim, generator=g),
        "target": torch.randn(total, model.config.token_dim, generator=g),
        "positions": positions,
        "sample_ids": torch.repeat_interleave(torch.arange(len(grids)), slot_t),
        "cu": torch.nn.functional.pad(slot_t.cumsum(0), (1, 0)).int(),
        "t": torch.rand(len(grids), generator=g),
        "real": real,
    }


def step_fn(
    model: DiT, opt: torch.optim.Optimizer, b: dict[str, torch.Tensor]
) -> Callable[[], None]:
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        pred = model(b["tokens"], b["positions"], b["sample_ids"], b["t"], cu_seqlens=b["cu"])
        err = (pred - b["target"]).pow(2).mean(-1) * b["real"]  # padding slots count 0
        ids, s = b["sample_ids"], b["t"].shape[0]
        per = per_sample_mean(err, ids, s) * (
            torch.bincount(ids, minlength=s) / torch.bincount(ids[b["real"]], minlength=s)
        )
        per.mean().backward()
        opt.step()

    return run


def time_steps(fns: list[Callable[[], None]], repeats: int) -> float:
    """Median over `repeats` of the total time of one pass over the steps."""
    fns[0]()  # warm up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        for fn in fns:
            fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="DiT-tiny")
    p.add_argument("--budget", type=int, default=1024, help="real tokens per step")
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--scale", type=float, default=1.0, help="frame size multiplier")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_dit(args.preset, in_channels=16, patch_size=(1, 2, 2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = group(length_mix(args.samples, args.scale, args.seed), args.budget)
    g = torch.Generator().manual_seed(args.seed)

    real = sum(a * b * c for s in steps for a, b, c in s)
    rows: list[tuple[str, float, int, float]] = []
    for name, backend, padded in (
        ("padded batch (baseline)", "split", True),
        ("packed, block-diagonal", "split", False),
        ("packed, dense (N,N) mask", "dense", False),
    ):
        fns, flops, slots = [], 0.0, 0
        for s in steps:
            lengths = [a * b * c for a, b, c in s]
            pad_to = max(lengths) if padded else None
            fns.append(step_fn(model, opt, make_inputs(model, s, pad_to, g)))
            seqs = [pad_to] * len(s) if pad_to else lengths
            slots += sum(seqs)
            if backend == "dense":  # every query scores every key of the pack
                f = estimate_flops(model.config, lengths)
                n = sum(lengths)
                f["attention"] = model.config.depth * 4 * model.config.hidden_size * n * n
                flops += 3 * (f["linear"] + f["attention"])
            else:
                flops += 3 * estimate_flops(model.config, seqs)["total"]
        model.attn_backend = backend
        seconds = time_steps(fns, args.repeats)
        rows.append((name, seconds, slots, flops))

    _, base_s, _, base_flops = rows[0]
    print(
        f"{args.preset}, {args.samples} samples ({real} real tokens) in {len(steps)} steps, "
        f"budget {args.budget}, {args.threads} thread(s)"
    )
    print(
        f"{'mode':28s} {'s/epoch':>8s} {'speedup':>8s} {'token slots':>12s} {'padding':>8s} "
        f"{'train GFLOP':>12s} {'FLOPs saved':>12s} {'real tok/s':>11s}"
    )
    for name, seconds, slots, flops in rows:
        print(
            f"{name:28s} {seconds:8.3f} {base_s / seconds:7.2f}x {slots:12d} "
            f"{1 - real / slots:8.1%} {flops / 1e9:12.3f} {1 - flops / base_flops:12.1%} "
            f"{real / seconds:11.0f}"
        )


if __name__ == "__main__":
    main()
