"""One module per ``reelpack`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a function ``(args) -> int`` (the exit code). Heavy imports happen
inside those functions, so ``reelpack --help`` stays fast.
"""

import argparse

COMMANDS = (
    "build",
    "refilter",
    "inspect",
    "plan",
    "report",
    "shots",
    "train",
    "sample",
    "demo",
    "pack_stats",
    "upsample",
)


def add_set_argument(parser: argparse.ArgumentParser, what: str = "config") -> None:
    """``--set KEY=VALUE`` (repeatable): one config value by its dotted path, laid over
    ``--config`` (see :func:`pipeline.config.parse_overrides`)."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"set one {what} value by its dotted path, over --config; the value is read as "
        "YAML (repeatable), e.g. --set split.detector=content --set decide.thresholds.motion="
        "'[0.01, null]'",
    )
