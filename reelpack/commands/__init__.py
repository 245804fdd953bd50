"""One module per ``reelpack`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a function ``(args) -> int`` (the exit code). Heavy imports happen
inside those functions, so ``reelpack --help`` stays fast.
"""

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
