"""``reelpack train ROOT --out DIR [--config FILE] [--preset NAME] [--steps N] [--resume]``.

Every `model.train.TrainConfig` field is also a flag (``--lr``, ``--token-budget``,
``--grad-accum``, ``--fsdp true`` ...); flags override the config file. Several GPUs:
run this under ``torchrun`` (see ``jobs/train.py``) or pass ``--ray-workers N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

__all__ = ["register"]


def run(args: argparse.Namespace) -> int:
    from model.raycluster import RayUnreachable
    from model.train import (
        TrainConfig,
        TrainingInterrupted,
        load_train_config,
        train,
        train_with_ray,
    )
    from schemas import UnsupportedLocation

    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = load_train_config(args.config, **overrides)
    except (ValueError, OSError) as e:
        print(f"reelpack train: {e}", file=sys.stderr)
        return 2
    try:
        if args.ray_workers:
            losses = train_with_ray(
                args.root,
                args.out,
                cfg,
                num_workers=args.ray_workers,
                use_gpu=args.ray_gpu,
                resume=args.resume,
                ray_address=args.ray_address,
            )
        else:
            losses = train(args.root, args.out, cfg, resume=args.resume)
    except TrainingInterrupted as e:  # SIGINT or SIGTERM: stopped with a checkpoint
        print(f"reelpack train: {e}", file=sys.stderr)
        return 130
    except (
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        RayUnreachable,
        UnsupportedLocation,
    ) as e:
        # another run's checkpoint or a corpus in --out, a root that is no corpus, --out a
        # file, no Ray cluster at --ray-address, a gs:// root or --out
        print(f"reelpack train: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # nothing to train on, a damaged shard or checkpoint
        print(f"reelpack train: {e}", file=sys.stderr)
        return 1
    if losses:
        print(f"trained {len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    else:
        print(f"nothing to do: {args.out} is already at step {cfg.steps}")
    return 0


def register(sub: Any) -> None:
    from model.train_config import add_config_flags

    p = sub.add_parser("train", help="train a DiT on a corpus")
    p.add_argument("root", help="corpus root: a folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="folder for checkpoints and the resolved config")
    p.add_argument("--config", help="YAML/JSON file of TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--ray-workers", type=int, default=0, help="train on N Ray Train workers")
    p.add_argument("--ray-gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument(
        "--ray-address",
        help="Ray cluster for --ray-workers (default: RAY_ADDRESS, else start a local Ray)",
    )
    add_config_flags(p)
    p.set_defaults(func=run)
