"""``reelpack inspect ROOT [--verify] [--json]``: validate a corpus; exit 1 with the
problems if any. ``--verify`` also reads every sample's latents and checks them against
their CRC-32 (one full read of the shards)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from pipeline.inspect import inspect_corpus
    from schemas import UnsupportedLocation

    try:
        report = inspect_corpus(args.root, verify=args.verify)
    except (OSError, UnsupportedLocation) as e:  # storage unreachable, root unreadable, gs://
        print(f"reelpack inspect: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        s = report.stats
        if report.ok:
            print(
                f"OK {report.root}: {s.get('sources', 0)} sources, {s.get('clips', 0)} clips "
                f"({s.get('clips_kept', 0)} kept), {s.get('shards', 0)} shards, "
                f"{s.get('latent_tokens', 0)} latent tokens"
            )
        else:
            print(f"FAILED {report.root}: {len(report.problems)} problem(s)")
            for problem in report.problems:
                print(f"  - {problem}")
    return 0 if report.ok else 1


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="validate a corpus: index, shards and manifest agree")
    p.add_argument("root", help="corpus root: a folder or s3://bucket/prefix")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also read every sample's latents and check their CRC-32 (reads all shards)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)
