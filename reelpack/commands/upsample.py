"""``reelpack upsample PROMPT...``: expand short prompts into training-style captions.

    reelpack upsample "a corgi on a beach"
    reelpack upsample --model Qwen/Qwen2.5-3B-Instruct --device cuda "a red kite" "rain"
    reelpack upsample --preset tiny "a corgi on a beach"   # offline, random weights
    reelpack upsample @prompts.txt > captions.txt         # one prompt per line

Prints one caption per prompt, each batch as it is done (``--json``: a JSON list of
{prompt, caption} at the end). ``@FILE`` reads prompts from a UTF-8 text file, one per
line (blank lines and lines starting with ``#`` skipped); ``@-`` from standard input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "tiny_lm_dir"]


def tiny_lm_dir() -> str:
    """Where ``--preset tiny`` builds its random causal LM (the build's model cache)."""
    root = os.environ.get("REELPACK_CACHE") or "~/.cache/reelpack"
    return str(Path(root).expanduser() / "tiny" / "lm")


def run(args: argparse.Namespace) -> int:
    from model.device import resolve_device
    from pipeline.models import model_problem
    from pipeline.upsample import UpsampleConfig, UpsampleError, Upsampler, check_prompts
    from reelpack.commands import read_prompts

    model = args.model
    if args.preset == "tiny" and model is None:
        from model.tiny_text import build_tiny_causal_lm

        model = build_tiny_causal_lm(tiny_lm_dir())
    given = {
        "model": model,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "batch_size": args.batch_size,
    }
    cfg = UpsampleConfig(device=args.device, **{k: v for k, v in given.items() if v is not None})
    try:  # what can be checked before the model loads
        prompts = read_prompts(args.prompts)
        check_prompts(prompts)
        cfg.validate()
        resolve_device(cfg.device)
    except (ValueError, OSError) as e:
        print(f"reelpack upsample: {e}", file=sys.stderr)
        return 2
    problem = model_problem(cfg.model)
    if problem:
        print(f"reelpack upsample: --model {cfg.model!r}: {problem}", file=sys.stderr)
        return 2
    try:
        upsampler = Upsampler(cfg)
    except OSError as e:  # a model folder that fails to load
        print(f"reelpack upsample: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    rows = []
    try:
        for at in range(0, len(prompts), cfg.batch_size):
            batch = prompts[at : at + cfg.batch_size]
            captions = upsampler(batch)
            rows += [{"prompt": p, "caption": c} for p, c in zip(batch, captions, strict=True)]
            if not args.json:
                print("\n".join(captions), flush=True)
    except UpsampleError as e:
        print(f"reelpack upsample: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "upsample", help="expand short prompts into detailed captions in the training style"
    )
    p.add_argument(
        "prompts",
        nargs="+",
        help="short prompts, e.g. 'a corgi on a beach'; @FILE: one per line (@-: stdin)",
    )
    p.add_argument("--model", help="instruct LLM: hub id or local folder (default: Qwen3-4B)")
    p.add_argument(
        "--preset",
        choices=("default", "tiny"),
        default="default",
        help="tiny: a random-weight offline LLM (meaningless output, for trying the command)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1, ...")
    p.add_argument("--max-new-tokens", type=int, help="generation budget")
    p.add_argument("--temperature", type=float, help="0 = greedy (default); > 0 samples")
    p.add_argument("--batch-size", type=int, help="prompts generated together (default 8)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {prompt, caption}")
    p.set_defaults(func=run)
