"""One module per ``reelpack`` subcommand.

Each module defines ``register(subparsers)``, which adds its parser and sets
``func`` to a function ``(args) -> int`` (the exit code). Heavy imports happen
inside those functions, so ``reelpack --help`` stays fast.
"""

import argparse
import sys
from pathlib import Path

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


def read_prompts(args: list[str]) -> list[str]:
    """The prompts of the command line: each argument, or the lines of ``@FILE`` (``@-``:
    standard input), blank lines and ``#`` comments skipped."""
    prompts: list[str] = []
    for arg in args:
        if not arg.startswith("@") or arg == "@":
            prompts.append(arg)
            continue
        name = arg[1:]
        try:
            data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt file {name}: not UTF-8 text ({e.reason})") from None
        except OSError as e:
            raise OSError(f"prompt file {name}: {e.strerror or e}") from None
        lines = (line.strip() for line in text.splitlines())
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            raise ValueError(f"prompt file {name} holds no prompt")
        prompts += found
    return prompts
