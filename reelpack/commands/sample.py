"""``reelpack sample CKPT --prompt TEXT --frames N --height H --width W --steps S --cfg G --out FILE``.

Writes the file ``--out`` names, in the format of its suffix (.mp4, .mkv, .mov, .webm,
.gif; .png, .jpg or .webp for ``--frames 1``). The VAE and text encoder come from the
corpus manifest (``--corpus``, default: the corpus the checkpoint was trained on).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from model.sample import sample_to_file

    try:
        path = sample_to_file(
            args.ckpt,
            args.corpus,
            args.prompt,
            args.frames,
            args.height,
            args.width,
            args.steps,
            args.cfg,
            args.out,
            seed=args.seed,
            fps=args.fps,
            device=args.device,
            ema=not args.no_ema,
        )
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        # a bad size or setting, a file that is not a checkpoint, no corpus manifest
        print(f"reelpack sample: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output cannot be written
        print(f"reelpack sample: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("sample", help="generate a clip (or an image) from a DiT checkpoint")
    p.add_argument("ckpt", help="checkpoint.pt written by `reelpack train`")
    p.add_argument("--prompt", default="", help="caption to condition on")
    p.add_argument("--frames", type=int, default=1, help="frame count; must follow the VAE rule")
    p.add_argument("--height", type=int, required=True, help="pixels")
    p.add_argument("--width", type=int, required=True, help="pixels")
    p.add_argument("--steps", type=int, default=30, help="Euler steps")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument(
        "--out",
        required=True,
        help="output file: .mp4 .m4v .mov .mkv .webm .gif, or .png .jpg .webp for one frame",
    )
    p.add_argument("--corpus", default=None, help="corpus root whose manifest names the VAE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fps", type=float, default=None, help="frame rate (default: the corpus's encode rate)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.set_defaults(func=run)
