"""``reelpack shots VIDEO [--json] [--detector NAME]``: print one file's shots.

Each shot is its first frame, end frame (exclusive), and start/end seconds, in the
source's own frame numbering and presentation times (decoded once, at detection size)::

    reelpack shots clip.mp4
    reelpack shots clip.mp4 --json --detector content --threshold 30
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pipeline.stages.probe import why_unreadable
    from pipeline.stages.split import DETECTORS, SplitConfig, shots
    from schemas import UnsupportedLocation, storage_location

    if args.detector not in DETECTORS:
        print(
            f"reelpack shots: unknown detector {args.detector!r}; known: {DETECTORS}",
            file=sys.stderr,
        )
        return 2
    bad = []
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold > 0):
        bad.append(f"--threshold must be a number > 0, got {args.threshold}")
    if not (math.isfinite(args.min_scene_s) and args.min_scene_s >= 0):
        bad.append(f"--min-scene-s must be a number >= 0, got {args.min_scene_s}")
    try:
        storage_location(args.video)
    except UnsupportedLocation as exc:  # gs://, s3:/bucket: a usage error, like a bad flag
        bad.append(str(exc))
    if bad:
        print(f"reelpack shots: {'; '.join(bad)}", file=sys.stderr)
        return 2
    cfg = replace(
        SplitConfig(detector=args.detector), threshold=args.threshold, min_scene_s=args.min_scene_s
    )
    try:
        found = shots(args.video, cfg=cfg)
    except ImportError as exc:
        print(f"reelpack shots: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bad file is a message, not a traceback
        print(f"reelpack shots: {args.video}: {why_unreadable(exc, args.video)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"{'shot':>4}  {'start_frame':>11}  {'end_frame':>9}  {'start_s':>9}  {'end_s':>9}")
    for i, shot in enumerate(found):
        print(
            f"{i:>4}  {shot['start_frame']:>11}  {shot['end_frame']:>9}  "
            f"{shot['start_s']:>9.3f}  {shot['end_s']:>9.3f}"
        )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("shots", help="print the shots of one video")
    p.add_argument("video", help="a video file or s3:// URI")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--detector",
        default="adaptive",
        help="adaptive (default), content, "
        "histogram, hash, threshold (fades) or transnetv2 (optional extra)",
    )
    p.add_argument("--threshold", type=float, default=None, help="the detector's threshold")
    p.add_argument("--min-scene-s", type=float, default=0.6, help="minimum shot length, s")
    p.set_defaults(func=run)
