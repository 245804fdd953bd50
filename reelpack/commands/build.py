"""``reelpack build SOURCE... --out ROOT``: build or resume a corpus."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.graph import build

    overrides: dict[str, Any] = {}
    if args.ray_address:
        overrides["ray"] = {"address": args.ray_address}
    try:
        cfg = load_config(args.config, preset=args.preset, **overrides)
    except (ValueError, OSError) as e:
        print(f"reelpack build: config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = build(args.sources, args.out, cfg)
    except FileNotFoundError as e:
        print(f"reelpack build: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 130 if summary.get("interrupted") else 0  # 130: stopped by a signal


def register(sub: Any) -> None:
    p = sub.add_parser("build", help="build or resume a corpus from videos")
    p.add_argument("sources", nargs="+", help="files, folders (recursive) or s3:// prefixes")
    p.add_argument("--out", required=True, help="corpus root: a folder or s3://bucket/prefix")
    p.add_argument("--config", help="YAML config file (see pipeline/config.py)")
    p.add_argument("--preset", help="model preset: default (real models) or tiny (offline, random)")
    p.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=run)
