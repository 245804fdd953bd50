"""``reelpack train ROOT --out DIR``: train a DiT on a corpus."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from model.train import TrainConfig, train

    kwargs: dict[str, Any] = {"preset": args.preset, "steps": args.steps}
    if args.token_budget:
        kwargs["token_budget"] = args.token_budget
    losses = train(args.root, args.out, TrainConfig(**kwargs))
    print(f"trained {len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a DiT on a corpus")
    p.add_argument("root", help="corpus root: a folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="folder for checkpoints and the resolved config")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--preset", default="DiT-tiny", help="model size preset")
    p.add_argument("--token-budget", type=int, default=0, help="tokens per packed sequence")
    p.set_defaults(func=run)
