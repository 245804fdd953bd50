"""The ``reelpack`` command line: maps flags onto configs and calls the library.

Subcommands live in ``reelpack.commands`` (one module each). Exit codes: 0 when
the work reached its end (for ``build``: every source reached a terminal state;
failed sources are rows in the corpus, not failures of the command); 2 for usage
or config errors; 1 for storage or runtime failures, printed as one line naming the
command and the cause (with ``-v`` also the traceback); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from reelpack.commands import COMMANDS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reelpack", description="Build video training corpora and train a DiT on them."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"reelpack.commands.{name}").register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # not foreseen by the command: one line; the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"reelpack {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
