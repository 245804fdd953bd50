"""``reelpack report ROOT --out report.html``: one self-contained HTML page about a corpus."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from pipeline.report import write_report
    from pipeline.storage import StorageError

    try:
        write_report(
            args.root, args.out, samples=args.samples, vae_path=args.vae, device=args.device
        )
    except (FileNotFoundError, IsADirectoryError, ValueError) as e:
        # not a corpus, --out a folder, a bad --samples
        print(f"reelpack report: {e}", file=sys.stderr)
        return 2
    except (StorageError, OSError) as e:
        print(f"reelpack report: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="write an HTML report (plots + sample gallery) of a corpus")
    p.add_argument("root", help="corpus root: a folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--samples", type=int, default=6, help="kept clips in the gallery (default 6)")
    p.add_argument("--vae", help="folder holding the corpus VAE, when not where the manifest says")
    p.add_argument(
        "--device",
        default="auto",
        help="where the VAE decodes the gallery's thumbnails: auto (a GPU when present, "
        "default), cpu, cuda, cuda:N",
    )
    p.set_defaults(func=run)
