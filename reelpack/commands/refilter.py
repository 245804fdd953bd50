"""``reelpack refilter ROOT [--config FILE] [--set KEY=VALUE]``: re-decide a corpus from
its stored scores.

Applies the ``decide`` and ``dedup`` sections of FILE (a build config) and the
``--set`` items (keys they leave out keep the values the corpus was built with) to
the stored scores and embeddings, without decoding a frame or loading a model, and
records the new decisions as a new index part (shards are never rewritten). Clips
that become kept without latents are processed by the next ``reelpack build`` on
the same output. With neither FILE nor ``--set``, the corpus's own settings are
applied again, with this version's decision rules (e.g. after an upgrade). Prints a
JSON summary: counts by status and by reason, before and after. ``--dry-run`` only
prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from reelpack.commands import add_set_argument

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from pipeline.lock import CorpusLocked
    from pipeline.refilter import built_config, load_refilter_config, refilter
    from schemas import UnsupportedLocation

    try:
        built = built_config(args.root)
    except UnsupportedLocation as e:  # its text names the root
        print(f"reelpack refilter: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"reelpack refilter: {args.root}: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"reelpack refilter: {args.root}: {e}", file=sys.stderr)
        return 1
    try:
        decide, dedup = load_refilter_config(args.config, built, args.set)
    except (ValueError, OSError) as e:
        print(f"reelpack refilter: config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = refilter(args.root, decide, dedup, dry_run=args.dry_run)
    except CorpusLocked as e:  # a build (or another refilter) writes the corpus
        print(f"reelpack refilter: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"reelpack refilter: {args.root}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("refilter", help="re-decide a corpus from stored scores (index only)")
    p.add_argument("root", help="corpus root: a folder or s3://bucket/prefix")
    p.add_argument(
        "--config",
        help="config file with decide / dedup keys; keys it leaves out keep the values "
        "the corpus was built with (its manifest)",
    )
    add_set_argument(p, "decide or dedup")
    p.add_argument("--dry-run", action="store_true", help="print the new counts, write nothing")
    p.set_defaults(func=run)
