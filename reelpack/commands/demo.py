"""``reelpack demo --out DIR``: synthesize videos, build a tiny corpus, train a few steps."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from reelpack.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0


def register(sub: Any) -> None:
    from reelpack.demo import DEMO_STEPS

    p = sub.add_parser("demo", help="offline demo: synthesize videos, build, train")
    p.add_argument("--out", required=True, help="folder for the videos, corpus and checkpoint")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")
    p.set_defaults(func=run)
