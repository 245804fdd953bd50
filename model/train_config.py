"""`TrainConfig`, the settings of a training run, readable without torch.

The command line builds its ``train`` flags from it (:func:`add_config_flags`) on
every start, so this module imports no ML library; :meth:`TrainConfig.validate`
imports the model modules whose options it checks only when called.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainConfig", "add_config_flags", "load_train_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved resolved in ``config.json`` and the checkpoint."""

    preset: str = "DiT-tiny"
    steps: int = 100
    lr: float = 1e-4
    token_budget: int = 4096  # tokens per packed sequence, per rank and micro-step
    # a sample larger than token_budget: "skip" it, "crop" it to fewer frames, or
    # "downscale" it to a smaller resolution the corpus stores (encode.extra_pixel_budgets)
    oversize: str = "skip"
    seed: int = 0
    log_every: int = 10
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    weight_decay: float = 0.0  # on matrices only, never on biases, norms or embeddings
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at `steps`
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    grad_accum: int = 1  # packed sequences per optimizer step
    ema_decay: float = 0.999  # 0 = no EMA
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA), "bf16" or "fp32"
    caption_dropout: float = 0.1  # share of samples trained with the null caption (CFG)
    loss_reduction: str = "sample"  # "sample": per-sample mean first; "token": flat mean
    timestep_mean: float = 0.0  # logit-normal timestep distribution
    timestep_std: float = 1.0
    shift_base_tokens: int = 256  # timestep shift sqrt(tokens / base); 0 = no shift
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at the end only
    attn_backend: str = "auto"  # see model.dit.ATTN_BACKENDS
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2)
    gradient_checkpointing: bool = False
    num_workers: int = 0  # loader worker processes
    # a sample that cannot be read or fails its CRC: stop the run (False), or leave it out
    # of its packed sequence with a warning naming it and train on (True)
    skip_corrupt: bool = False
    shuffle_buffer: int = 256  # samples; used by the shuffling loader
    # kept samples held out of training for a validation loss (model.train.held_out_keys:
    # the same ones on every run and rank); 0 = none
    val_samples: int = 0
    val_every: int = 0  # steps between validation losses; 0 = at the last step only

    def validate(self) -> None:
        from model.dit import ATTN_BACKENDS
        from model.flow import REDUCTIONS
        from model.loader import OVERSIZE_POLICIES

        problems = [
            f"{name} must be positive, not {getattr(self, name)}"
            for name in ("steps", "grad_accum", "token_budget", "log_every")
            if getattr(self, name) < 1
        ]
        problems += [
            f"{name} {getattr(self, name)!r} is not one of {options}"
            for name, options in (
                ("precision", ("auto", "bf16", "fp32")),
                ("loss_reduction", REDUCTIONS),
                ("oversize", OVERSIZE_POLICIES),
                ("attn_backend", ATTN_BACKENDS),
            )
            if getattr(self, name) not in options
        ]
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            problems.append(f"device {self.device!r} is not auto, cpu, cuda or cuda:N")
        for name in ("lr", "timestep_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                problems.append(f"{name} must be a positive number, not {value}")
        if not math.isfinite(self.timestep_mean):
            problems.append(f"timestep_mean must be a number, not {self.timestep_mean}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            problems.append(f"caption_dropout must be in [0, 1], not {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), not {self.ema_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        problems += [
            f"{name} must be >= 0, not {getattr(self, name)}"
            for name in (
                "seed",
                "weight_decay",
                "warmup_steps",
                "grad_clip",
                "shift_base_tokens",
                "checkpoint_every",
                "num_workers",
                "shuffle_buffer",
                "val_samples",
                "val_every",
            )
            if not getattr(self, name) >= 0
        ]
        if problems:
            raise ValueError("bad TrainConfig: " + "; ".join(problems))


def load_train_config(path: str | None = None, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from a YAML/JSON file of its fields, then `overrides` (None = unset)."""
    values: dict[str, Any] = {}
    if path:
        from schemas.yamltext import read_config_file

        loaded = read_config_file(path)
        values.update(loaded.get("train", loaded))  # a saved config.json has a "train" key
    values.update({k: v for k, v in overrides.items() if v is not None})
    kinds = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ValueError(f"{path or 'overrides'}: unknown TrainConfig fields {unknown}")
    for name, value in values.items():
        kind = kinds[name]
        # YAML's 1 is a fine float, but true is no number and 2.5 no step count
        if isinstance(value, bool) != (kind is bool) or not isinstance(
            value, (int, float) if kind is float else kind
        ):
            raise ValueError(
                f"{path or 'overrides'}: {name} must be {kind.__name__}, got {value!r}"
            )
        values[name] = float(value) if kind is float else value
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per `TrainConfig` field, default None (= the file's or the default)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        kind = type(getattr(TrainConfig(), f.name))
        # a bool flag alone means true (--skip-corrupt); it also takes a value (--ema false)
        flag: dict[str, Any] = {"nargs": "?", "const": True} if kind is bool else {}
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=_parse_bool if kind is bool else kind,
            default=None,
            help=f"(default {getattr(TrainConfig(), f.name)!r})",
            **flag,
        )
