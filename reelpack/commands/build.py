"""``reelpack build SOURCE... --out ROOT``: build or resume a corpus."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from reelpack.commands import add_set_argument

__all__ = ["register", "summary_text"]


def run(args: argparse.Namespace) -> int:
    from model.raycluster import RayUnreachable
    from pipeline.compat import CorpusMismatch
    from pipeline.config import load_config
    from pipeline.graph import BuildNotStarted, PlacementError, build
    from pipeline.lock import CorpusLocked
    from pipeline.models import ModelUnavailable
    from pipeline.sources import SourceInCorpus
    from schemas import UnsupportedLocation

    overrides: dict[str, Any] = {}
    if args.ray_address:
        overrides["ray"] = {"address": args.ray_address}
    try:
        cfg = load_config(args.config, preset=args.preset, sets=args.set, **overrides)
    except (ValueError, OSError) as e:
        print(f"reelpack build: config error: {e}", file=sys.stderr)
        return 2
    try:
        # with --json, stdout carries the summary alone; the running lines go to stderr
        echo = (lambda line: print(line, file=sys.stderr)) if args.json else print
        summary = build(args.sources, args.out, cfg, echo=echo, retry_errors=args.retry_errors)
    except (
        FileNotFoundError,
        NotADirectoryError,
        UnsupportedLocation,
        PlacementError,
        CorpusMismatch,
        ModelUnavailable,
        RayUnreachable,
        SourceInCorpus,
    ) as e:
        # a missing source, --out a file, gs:// or another VAE's corpus, stages the cluster
        # cannot place, a model that cannot be loaded, no Ray cluster at --ray-address
        print(f"reelpack build: {e}", file=sys.stderr)
        return 2
    except CorpusLocked as e:  # another run writes this corpus
        print(f"reelpack build: {e}", file=sys.stderr)
        return 1
    except BuildNotStarted as e:  # storage unreachable before any work
        print(f"reelpack build: {e}\nnothing was built or written", file=sys.stderr)
        return 1
    except OSError as e:  # no space left, a storage failure after its retries
        print(
            f"reelpack build: {e}\nsources committed before it stay in the corpus; "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(summary_text(summary, args.out))
    return 130 if summary.get("interrupted") else 0  # 130: stopped by a signal


def summary_text(summary: dict[str, Any], out: str) -> str:
    """The run's summary in a few lines; the whole of it is ``<out>/summary.json``."""
    from collections import Counter

    from pipeline.progress import cause_lines
    from pipeline.sources import describe_skipped
    from pipeline.storage import join

    clips = summary["clips_by_status"]
    done = summary["committed"]
    skipped = summary["sources_total"] - summary["sources_built"]
    lines = [
        f"sources    {summary['sources_done']} done of {summary['sources_built']} "
        f"({summary['sources_error']} failed; {skipped} already in the corpus) "
        f"in {summary['wall_s']:.1f} s",
        f"clips      kept {clips.get('kept', 0)}, rejected {clips.get('rejected', 0)}, "
        f"error {clips.get('error', 0)}",
    ]
    note = describe_skipped(Counter(summary.get("files_skipped") or {}))
    if note:
        lines.insert(1, f"files      {note}")
    # the most common causes of failed sources
    causes = summary.get("errors_by_reason") or {}
    lines += cause_lines(causes, 3, "summary.json errors_by_reason lists them")
    reasons = sorted(summary["rejected_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
    if reasons:
        lines.append("rejected   " + ", ".join(f"{r} {n}" for r, n in reasons))
    lines += [
        f"committed  sources {done['sources']}, clips {done['clips']}, shards {done['shards']}, "
        f"latent tokens {done['latent_tokens']:,}",
        f"summary    {join(out, 'summary.json')} (--json prints it)",
    ]
    return "\n".join(lines)


def register(sub: Any) -> None:
    p = sub.add_parser("build", help="build or resume a corpus from videos")
    p.add_argument(
        "sources",
        nargs="+",
        help="files, folders (recursive), s3:// prefixes, or @LIST: a text file (local or "
        "s3://; @-: standard input) of them, one per line",
    )
    p.add_argument("--out", required=True, help="corpus root: a folder or s3://bucket/prefix")
    p.add_argument("--config", help="YAML config file (see pipeline/config.py)")
    p.add_argument("--preset", help="model preset: default (real models) or tiny (offline, random)")
    add_set_argument(p)
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="build again the sources earlier runs committed as errors (a storage outage, "
        "a file replaced while read or repaired since); their new rows replace the error",
    )
    p.add_argument("--json", action="store_true", help="print the whole run summary as JSON")
    p.set_defaults(func=run)
