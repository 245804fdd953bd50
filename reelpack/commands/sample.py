"""``reelpack sample CKPT --prompt TEXT [--frames N --height H --width W] --steps S --cfg G --out FILE``.

Writes the file ``--out`` names, in the format of its suffix (.mp4, .mkv, .mov, .webm,
.gif; .png, .jpg or .webp for ``--frames 1``). The VAE and text encoder come from the
corpus manifest (``--corpus``, default: the corpus the checkpoint was trained on). A
size not given is that of the corpus's most common sample (frames: 1 for an image).

Many clips in one run load the model once: ``--prompt`` repeats (``@FILE``: one prompt
per line; ``@-``: standard input), ``--num-samples K`` makes K clips per prompt with
seeds ``--seed``, ``--seed`` + 1, ..., and ``--batch-size`` clips are generated at once.
Their files are named from ``--out``: ``{n}``, ``{seed}`` and ``{prompt}`` (the prompt's
number) are filled in, and a name with none of them gets ``-N`` before its suffix.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from model.sample import Sample, plan_samples, sample_to_files
    from reelpack.commands import read_prompts

    def written(each: Sample) -> None:
        if len(samples) == 1:
            print(f"wrote {each.out}", flush=True)
        else:
            print(f"wrote {each.out}  seed {each.seed}  {each.prompt}", flush=True)

    try:
        prompts = read_prompts(args.prompt) if args.prompt else [""]
        samples = plan_samples(prompts, args.seed, args.num_samples, args.out, args.frames)
        sample_to_files(
            args.ckpt,
            args.corpus,
            samples,
            args.frames,
            args.height,
            args.width,
            args.steps,
            args.cfg,
            fps=args.fps,
            device=args.device,
            ema=not args.no_ema,
            batch_size=args.batch_size,
            written=written,
        )
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        # a bad size or setting, a file that is not a checkpoint, no corpus manifest
        print(f"reelpack sample: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output cannot be written, or a prompt file read
        print(f"reelpack sample: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("sample", help="generate clips (or images) from a DiT checkpoint")
    p.add_argument("ckpt", help="checkpoint.pt written by `reelpack train`")
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="caption to condition on (repeatable; @FILE: one per line, @-: standard input; "
        "default: one empty caption)",
    )
    like = "default: the corpus's most common sample's"
    p.add_argument(
        "--frames",
        type=int,
        help=f"frame count, following the VAE rule ({like}; 1 for an image file)",
    )
    p.add_argument("--height", type=int, help=f"pixels ({like})")
    p.add_argument("--width", type=int, help=f"pixels ({like})")
    p.add_argument("--steps", type=int, default=30, help="Euler steps")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument(
        "--out",
        required=True,
        help="output file: .mp4 .m4v .mov .mkv .webm .gif, or .png .jpg .webp for one frame; "
        "for several clips a name template with {n}, {seed}, {prompt} (default: FILE-N)",
    )
    p.add_argument("--corpus", default=None, help="corpus root whose manifest names the VAE")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first clip")
    p.add_argument(
        "--num-samples", type=int, default=1, help="clips per prompt, seeds --seed, --seed + 1, ..."
    )
    p.add_argument("--batch-size", type=int, default=4, help="clips generated at once")
    p.add_argument(
        "--fps", type=float, default=None, help="frame rate (default: the corpus's encode rate)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.set_defaults(func=run)
