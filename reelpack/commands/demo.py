"""``reelpack demo --out DIR``: synthesize videos, build a tiny corpus, train a few steps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from reelpack.demo import run_demo

    try:
        run_demo(Path(args.out), steps=args.steps)
    except (ValueError, NotADirectoryError) as e:  # a bad --steps, --out a file
        print(f"reelpack demo: {e}", file=sys.stderr)
        return 2
    return 0


def register(sub: Any) -> None:
    from reelpack.demo import DEMO_STEPS

    p = sub.add_parser("demo", help="offline demo: synthesize videos, build, train")
    p.add_argument("--out", required=True, help="folder for the videos, corpus and checkpoint")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps")
    p.set_defaults(func=run)
