"""``reelpack plan SOURCE...``: estimate clips, tokens, storage and time before a build."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from reelpack.commands import add_set_argument

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from collections import Counter

    from pipeline.plan import format_plan, load_plan_config, make_plan
    from pipeline.sources import NoSources, describe_skipped, expand_sources
    from schemas import UnsupportedLocation

    try:
        cfg, rates = load_plan_config(args.config, args.preset, args.rate, args.set)
    except (ValueError, OSError) as e:
        print(f"reelpack plan: config error: {e}", file=sys.stderr)
        return 2
    skipped: Counter[str] = Counter()
    try:
        sources = expand_sources(args.sources, skipped=skipped)
    except (FileNotFoundError, UnsupportedLocation) as e:  # a missing path, gs://
        print(f"reelpack plan: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a listing that failed: credentials, endpoint, permissions
        print(f"reelpack plan: {e}", file=sys.stderr)
        return 1
    if not sources:
        print(f"reelpack plan: {NoSources(args.sources, skipped)}", file=sys.stderr)
        return 2
    note = describe_skipped(skipped)
    if note:
        print(f"reelpack plan: note: {note}", file=sys.stderr)
    try:
        plan = make_plan(
            sources, cfg, sample=args.sample, workers=args.workers, gpus=args.gpus, rates=rates
        )
    except ValueError as e:  # --sample, --workers or --gpus out of range
        print(f"reelpack plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_json(), indent=2, sort_keys=True))
    else:
        print(format_plan(plan))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="estimate clips, latent tokens, storage and time of a build (probes only)"
    )
    p.add_argument(
        "sources",
        nargs="+",
        help="files, folders (recursive), s3:// prefixes, or @LIST: a text file (local or "
        "s3://; @-: standard input) of them, one per line",
    )
    p.add_argument("--config", help="build config YAML; may hold a `plan:` section of rates")
    p.add_argument("--preset", help="model preset: default (real models) or tiny")
    add_set_argument(p)
    p.add_argument("--sample", type=int, default=32, help="sources to probe (default 32)")
    p.add_argument(
        "--workers", type=int, help="CPU slots for the task stages (default: this machine's cores)"
    )
    p.add_argument("--gpus", type=int, default=0, help="GPUs for the model stages (default 0)")
    p.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one rate of pipeline.plan.PlanRates (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
