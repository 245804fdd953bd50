"""Train a DiT with rectified flow on a reelpack corpus (streamed, packed, native size).

Tiny CPU run (seconds), on a corpus built with the tiny preset::

    python -m model.train --root /tmp/corpus --out /tmp/run --preset DiT-tiny --steps 50
    reelpack train /tmp/corpus --out /tmp/run --steps 50 [--resume]

Several GPUs (DDP; FSDP with ``--fsdp true`` for the large presets)::

    torchrun --nproc_per_node 8 jobs/train.py /data/corpus --out /ckpt/run1 \\
        --device cuda --preset DiT-XL --fsdp true

or Ray Train (`train_with_ray`: ``reelpack train ... --ray-workers 8 --ray-gpu``).
`evaluate` scores a model on fixed (x0, noise, t) triples, e.g. before and after training.

One optimizer step = ``grad_accum`` packed sequences of at most ``token_budget``
tokens per rank. AdamW, linear warmup then cosine decay, gradient clipping, bf16
autocast on CUDA, EMA weights. Writes ``<out>/config.json`` (resolved config),
``<out>/metrics.jsonl`` (one line per log step) and ``<out>/checkpoint.pt``: model,
EMA, optimizer, scheduler, every rank's RNG and loader state, step and resolved
config, all plain tensors and dicts (``torch.load(..., weights_only=True)``).

Resuming (``resume=True``) restores all of it, so the next losses are exactly those
the uninterrupted run would have produced (on the CPU; on GPUs up to kernel
non-determinism). Only `RESUMABLE_CHANGES` may differ from the checkpoint's config.

SIGINT or SIGTERM (Ctrl-C, a preempted pod, torchrun passing one on) ends the run after
the step in progress, with a checkpoint: every rank stops at the same step, and
`TrainingInterrupted` says where; a second signal stops at once, without one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

import schemas
from model.data import PackedLoader, is_s3, read_manifest
from model.device import resolve_device
from model.dit import DiT, DiTConfig, build_dit
from model.ema import EMA
from model.flow import caption_keep_mask, flow_loss, resolution_shift
from model.loader import CatalogEntry, read_catalog
from model.raycluster import join_cluster, sigint_ignored
from model.train_config import TrainConfig, add_config_flags, load_train_config

__all__ = [
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "TrainingInterrupted",
    "evaluate",
    "held_out_keys",
    "init_model",
    "load_checkpoint",
    "load_train_config",
    "make_loader",
    "model_from_checkpoint",
    "read_checkpoint",
    "train",
    "train_with_ray",
]

CHECKPOINT_NAME = "checkpoint.pt"
# TrainConfig fields a resumed run may change without changing what it computes next
# (`steps` extends or shortens the schedule, which does change the lr from then on).
RESUMABLE_CHANGES = (
    "steps",
    "log_every",
    "val_every",
    "checkpoint_every",
    "device",
    "num_workers",
    "skip_corrupt",  # a run stopped by a corrupt sample resumes past it
)


# --- data ------------------------------------------------------------------------------
class Loader(Protocol):
    """What the trainer needs from a loader (`model.data.PackedLoader` has it)."""

    stats: Any
    cfg: Any  # its model.loader.PlanConfig

    def __iter__(self) -> Iterator[Any]: ...
    def plan(self, epoch: int | None = None) -> Any: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def held_out_keys(
    root: str, count: int, catalog: Sequence[CatalogEntry] | None = None
) -> frozenset[str]:
    """The ``count`` kept samples of the corpus at `root` (its ``catalog``, when read
    already) held out for validation: those whose keys hash lowest (CRC-32), so every
    run and rank holds out the same ones and a corpus that grows keeps most of them.
    ValueError when no sample would be left to train on."""
    if count <= 0:
        return frozenset()
    entries = catalog if catalog is not None else read_catalog(root)
    keys = sorted({e.key for e in entries}, key=lambda k: (zlib.crc32(k.encode()), k))
    if count >= len(keys):
        raise ValueError(
            f"{root}: val_samples {count} holds out all {len(keys)} kept samples; "
            "none is left to train on"
        )
    return frozenset(keys[:count])


def make_loader(
    root: str,
    cfg: TrainConfig,
    patch: tuple[int, int, int],
    rank: int,
    world_size: int,
    held_out: frozenset[str] = frozenset(),
    catalog: Sequence[CatalogEntry] | None = None,
) -> Loader:
    """This rank's `model.data.PackedLoader` (planned from the index, shuffled, resumable),
    without the samples ``held_out`` for validation (``catalog``: the index read already)."""
    return PackedLoader(
        root,
        token_budget=cfg.token_budget,
        patch=patch,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        oversize=cfg.oversize,
        skip_corrupt=cfg.skip_corrupt,
        keep_key=(lambda key: key not in held_out) if held_out else None,
        catalog=catalog,
    )


class _Validation:
    """The validation loss on the held-out samples: every rank packs its share of them
    (the same number of batches on each, for FSDP), each batch gets the same noise and
    timesteps at every evaluation, and the loss is the mean over all ranks' samples."""

    def __init__(
        self,
        root: str,
        cfg: TrainConfig,
        patch: tuple[int, int, int],
        d: _Dist,
        keys: frozenset[str],
        catalog: Sequence[CatalogEntry] | None = None,
    ) -> None:
        self.cfg, self.d = dataclasses.replace(cfg, caption_dropout=0.0), d
        self.loader = PackedLoader(
            root,
            token_budget=cfg.token_budget,
            patch=patch,
            seed=cfg.seed,
            rank=d.rank,
            world_size=d.world_size,
            shuffle_buffer=0,
            oversize=cfg.oversize,
            drop_last=False,  # every rank gets batches, however few samples
            skip_corrupt=cfg.skip_corrupt,
            keep_key=keys.__contains__,
            catalog=catalog,
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"{root}: the {len(keys)} held-out samples pack into no batch at token "
                f"budget {cfg.token_budget} ({self.loader.stats})"
            )

    def loss(self, model: nn.Module, text: bool) -> float:
        generator = torch.Generator(device=self.d.device).manual_seed(self.cfg.seed + 7919)
        self.loader.set_epoch(0)
        total, weight = _summed_loss(model, self.loader, self.cfg, text, generator, draws=1)
        return self.d.all_sum(total) / max(self.d.all_sum(weight), 1.0)

    def log(self, step: int, model: nn.Module, text: bool, metrics: Path) -> None:
        """Compute the loss (on every rank) and record it (rank 0): printed, and a
        ``{"step", "val_loss"}`` line in ``metrics.jsonl``."""
        value = self.loss(model, text)
        if self.d.rank == 0:
            print(f"step {step} val_loss {value:.4f}", flush=True)
            with metrics.open("a") as f:
                f.write(json.dumps({"step": step, "val_loss": value}) + "\n")


class _Stream:
    """Batches from `loader`, epoch after epoch; remembers which epoch it is in."""

    def __init__(self, loader: Loader, epoch: int, fresh: bool, where: str) -> None:
        self.loader, self.epoch, self.where = loader, epoch, where
        self._it = self._run(fresh)
        self._peeked: list[Any] = []

    def peek(self) -> None:
        """Fetch the next batch now (ValueError now when there is none); ``next`` returns it."""
        if not self._peeked:
            self._peeked.append(next(self._it))

    def _run(self, fresh: bool) -> Iterator[Any]:
        while True:
            if fresh:
                self.loader.set_epoch(self.epoch)
            count, corrupt = 0, self.loader.stats.samples_corrupt
            for batch in self.loader:
                count += 1
                yield batch
            if count == 0 and fresh:
                left_out = self.loader.stats.samples_corrupt - corrupt
                reason = (
                    f"no batch: all {left_out} samples this rank read were left out as "
                    "unreadable or corrupt (--skip-corrupt); `reelpack inspect ROOT` lists "
                    "what is damaged"
                    if left_out
                    else _no_batch_reason(self.loader.plan(self.epoch), self.loader.cfg)
                )
                raise ValueError(f"{self.where}: {reason}")
            self.epoch, fresh = self.epoch + 1, True

    def __next__(self) -> Any:
        return self._peeked.pop() if self._peeked else next(self._it)


def _no_batch_reason(plan: Any, cfg: Any) -> str:
    """Why an epoch gave this rank nothing to train on, from the loader's epoch plan
    (``model.loader.EpochPlan``) and its ``PlanConfig``."""
    skipped, bins = len(plan.skipped), plan.bins
    misfit = len(getattr(plan, "misfit", ()))
    if not bins and misfit and not skipped:
        return (
            f"no batch: the latent shapes of all {misfit} samples are not divisible by the "
            f"patch {tuple(cfg.patch)}; the corpus was encoded for another patch size"
        )
    if not bins and skipped:
        fits = (
            "or fit them with --oversize crop (fewer frames)"
            if cfg.oversize != "crop"
            else "or rebuild with smaller encode.pixel_budget"
        )
        if cfg.oversize == "skip":
            fits += (
                " or --oversize downscale (a smaller resolution the corpus stores: "
                "encode.extra_pixel_budgets)"
            )
        others = (
            f" (the other {misfit} are not divisible by the patch {tuple(cfg.patch)})"
            if misfit
            else ""
        )
        return (
            f"no batch: {'all ' if not misfit else ''}{skipped} samples are larger than the "
            f"token budget ({cfg.token_budget}) and were left out (--oversize {cfg.oversize})"
            f"{others}; raise --token-budget, {fits}"
        )
    if not bins:
        return "no batch: the corpus has no kept samples"
    samples = sum(len(b) for b in bins)
    ranks = plan.world_size
    return (
        f"no batch for this rank: the epoch's {samples} samples pack into {len(bins)} "
        f"sequence{'s' if len(bins) != 1 else ''} of {cfg.token_budget} tokens, fewer than "
        f"the {ranks} ranks; a smaller --token-budget makes more, or train on fewer workers"
    )


def _to_device(batch: Any, device: torch.device) -> dict[str, Any]:
    """The tensors the loss needs, from a `PackedBatch` (old or new), on `device`."""
    out: dict[str, Any] = {}
    for name in (
        "tokens",
        "positions",
        "sample_ids",
        "cu_seqlens",
        "text_embeds",
        "text_cu_seqlens",
    ):
        value = getattr(batch, name, None)
        out[name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else None
    out["num_samples"] = int(out["cu_seqlens"].numel() - 1)
    padding = getattr(batch, "num_padding", None)
    budget = getattr(batch, "token_budget", None)
    out["num_slots"] = int(budget) if budget else int(out["tokens"].shape[0]) + int(padding or 0)
    return out


# --- distributed -----------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool

    def all_mean(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def all_sum(self, value: float) -> float:
        return self.all_mean(value) * self.world_size

    def mean_and_any(self, value: float, flag: bool) -> tuple[float, bool]:
        """:meth:`all_mean` of ``value`` and whether any rank's ``flag`` is set, in one
        all-reduce (the step's loss, and a stop every rank must agree on)."""
        if self.world_size == 1:
            return value, flag
        t = torch.tensor([value, float(flag)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0].item()) / self.world_size, bool(t[1].item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


# The last collective of each process group this process left, kept until exit.
_LAST_WORK: list[Any] = []


def _leave_group() -> None:
    """Leave the process group :func:`_setup_distributed` started.

    A finished collective is freed by the c10d worker thread that ran it, and freeing
    its Python tensors takes the GIL: when that happens during interpreter shutdown the
    process aborts at exit ("terminate called without an active exception"). A barrier
    holds every collective still in flight; keeping the barrier referenced until exit
    means the worker thread never drops the last reference, so no tensor is freed there.
    """
    last = dist.barrier(async_op=True)
    if last is not None:
        last.wait()
        _LAST_WORK.append(last)
    dist.destroy_process_group()


def _setup_distributed(cfg: TrainConfig) -> _Dist:
    """Join (or start, under torchrun) the process group; choose this rank's device."""
    want_cuda = cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()
    )
    if cfg.device.startswith("cuda"):
        resolve_device(cfg.device)  # a GPU torch does not see here: named, not a crash
    owns = False
    if (
        dist.is_available()
        and not dist.is_initialized()
        and int(os.environ.get("WORLD_SIZE", "1")) > 1
    ):
        dist.init_process_group("nccl" if want_cuda else "gloo")
        owns = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if want_cuda:
        if cfg.device.startswith("cuda:"):
            device = torch.device(cfg.device)
        else:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return _Dist(rank, world, device, owns)


def _wrap(model: DiT, cfg: TrainConfig, d: _Dist) -> nn.Module:
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise ValueError("fsdp=True needs a process group (torchrun or Ray Train)")
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: biases, norm gains and the null caption stay unregularised.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2 and p.shape[0] > 1]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _lr_lambda(cfg: TrainConfig) -> Any:
    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# --- checkpoints -----------------------------------------------------------------------
def _model_and_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (gathered) state dicts; collective under FSDP, so every rank calls it."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (
            get_model_state_dict(model, options=opts),
            dict(get_optimizer_state_dict(model, optimizer, options=opts)),
        )
    inner = model.module if hasattr(model, "module") else model
    assert isinstance(inner, nn.Module)
    return inner.state_dict(), optimizer.state_dict()


def _load_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], cfg: TrainConfig
) -> None:
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any], device: torch.device) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader never sees a half-written checkpoint


def _resolved_config(
    cfg: TrainConfig,
    model_cfg: DiTConfig,
    root: str,
    manifest: dict[str, Any],
    patch: tuple[int, int, int],
) -> dict[str, Any]:
    resolved = {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model_cfg),
        "corpus": {
            "root": root,
            "vae": manifest["vae"],
            "patch_size": list(patch),
            "text_encoder": manifest.get("text_encoder"),
        },
    }
    loaded: dict[str, Any] = json.loads(json.dumps(resolved))  # plain JSON types, as stored
    return loaded


def _check_resumable(saved: dict[str, Any], resolved: dict[str, Any], path: Path) -> None:
    if saved["model"] != resolved["model"]:
        raise ValueError(f"{path}: the checkpoint's model config differs from this run's")
    # a field the checkpoint predates ran with its default
    defaults = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    changed = sorted(
        k
        for k, v in resolved["train"].items()
        if saved["train"].get(k, defaults[k]) != v and k not in RESUMABLE_CHANGES
    )
    if changed:
        raise ValueError(
            f"{path}: cannot resume with changed {changed} (only {list(RESUMABLE_CHANGES)} may change)"
        )


# --- the loop --------------------------------------------------------------------------
def _corpus_facts(root: str) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """The corpus manifest and its (pt, ph, pw) patch size."""
    manifest = read_manifest(root)
    if len(manifest["patch_size"]) != 3:
        raise ValueError(
            f"{root}: manifest patch_size {manifest['patch_size']} is not [pt, ph, pw]"
        )
    pt, ph, pw = (int(p) for p in manifest["patch_size"])
    return manifest, (pt, ph, pw)


def _initial_model(manifest: dict[str, Any], patch: tuple[int, int, int], cfg: TrainConfig) -> DiT:
    torch.manual_seed(cfg.seed)
    text_entry = manifest.get("text_encoder") or {}
    model = build_dit(
        cfg.preset,
        in_channels=int(manifest["vae"]["latent_channels"]),
        patch_size=patch,
        text_dim=int(text_entry.get("dim") or 0),
    )
    model.attn_backend = cfg.attn_backend
    return model


def init_model(root: str, cfg: TrainConfig) -> DiT:
    """The DiT that `train` starts from on the corpus at `root` (same seed, same weights)."""
    manifest, patch = _corpus_facts(root)
    return _initial_model(manifest, patch, cfg)


def _autocast_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return (device.type == "cuda" and cfg.precision == "auto") or cfg.precision == "bf16"


def _loss(
    model: nn.Module, b: dict[str, Any], cfg: TrainConfig, text: bool, generator: torch.Generator
) -> torch.Tensor:
    s = b["num_samples"]
    cu = b["cu_seqlens"]
    shift = (
        resolution_shift((cu[1:] - cu[:-1]).float(), cfg.shift_base_tokens)
        if cfg.shift_base_tokens
        else None
    )
    kwargs: dict[str, Any] = {"cu_seqlens": cu}
    if text:
        kwargs["text_embeds"] = b["text_embeds"]
        kwargs["text_cu_seqlens"] = b["text_cu_seqlens"]
        kwargs["text_keep"] = caption_keep_mask(
            s, cfg.caption_dropout, generator, b["tokens"].device
        )
    return flow_loss(
        model,
        b["tokens"],
        b["positions"],
        b["sample_ids"],
        s,
        generator,
        shift=shift,
        reduction=cfg.loss_reduction,
        timestep_mean=cfg.timestep_mean,
        timestep_std=cfg.timestep_std,
        model_kwargs=kwargs,
    )


class TrainingInterrupted(Exception):
    """A signal ended the run early, after a checkpoint at ``step`` (the message says
    how to go on)."""

    def __init__(self, message: str, step: int, losses: list[float] | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.losses = list(losses or [])  # this run's losses, up to and with ``step``


class _StopSignals:
    """While open, SIGINT and SIGTERM set :attr:`name` instead of ending the process, so
    that the loop saves a checkpoint first; a second one raises KeyboardInterrupt. Only
    in the main thread, where Python runs signal handlers. Ray Train runs the loop in
    another thread: its driver takes the signals and writes ``stop_file``, whose
    contents (the signal's name) :meth:`requested` reads as a signal here."""

    def __init__(self, stop_file: str | None = None) -> None:
        self.name: str | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()
        self._stop_file = Path(stop_file) if stop_file else None

    def requested(self) -> bool:
        """Whether a signal (here, or at the Ray Train driver) asks the run to stop."""
        if self.name is None and self._stop_file is not None:
            with contextlib.suppress(OSError):  # not there: no stop asked
                self.name = self._stop_file.read_text().strip() or "stop"
        return self.name is not None

    def __enter__(self) -> _StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: the trainer stops it
            return
        if self.name is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        print(
            f"{self.name}: stopping after this step, with a checkpoint (again: stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def _check_out(out: str, resume: bool) -> str:
    """``out`` as a folder path (a ``file://`` URI's path). Checkpoints are written with
    file I/O, to a local or shared filesystem: ``s3://`` (or ``gs://``) would become a
    local folder ``s3:``, so it is refused. A fresh run never overwrites another run's
    checkpoint (or appends to its metrics), and no run writes into a corpus's root."""
    folder = schemas.storage_location(out)
    if is_s3(folder):
        raise ValueError(
            f"--out {out}: the trainer writes its checkpoints to a folder (local, or a "
            "filesystem every worker shares); copy it to object storage afterwards"
        )
    blocker = next((p for p in (Path(folder), *Path(folder).parents) if p.is_file()), None)
    if blocker is not None:
        raise NotADirectoryError(f"--out {out}: {blocker} is a file; training writes a folder")
    if (Path(folder) / schemas.MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"--out {out}: the folder holds a corpus ({schemas.MANIFEST_NAME}); "
            "train into a folder of its own"
        )
    ckpt_path = Path(folder) / CHECKPOINT_NAME
    if not resume and ckpt_path.is_file():
        raise FileExistsError(
            f"{ckpt_path} exists: pass --resume to continue that run, or train into another --out"
        )
    return folder


def train(  # noqa: C901
    root: str,
    out: str,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    until: int | None = None,
    stop_file: str | None = None,
) -> list[float]:
    """Train to step `cfg.steps` on the corpus at `root`; save to `out`; return this run's losses.

    With `resume`, continue from ``<out>/checkpoint.pt`` (a missing one starts fresh);
    without it, an existing checkpoint there is an error, never overwritten. `until` stops early at that step with a checkpoint (a time-sliced or preempted job):
    the schedule is still the one of `cfg.steps`.
    Under torchrun or Ray Train every rank calls this; losses are means over ranks.

    SIGINT or SIGTERM (or `stop_file` appearing, written by :func:`train_with_ray`'s
    driver on one) ends the run after the step in progress, with a checkpoint:
    :class:`TrainingInterrupted`, which carries the losses so far.
    """
    cfg.validate()
    out = _check_out(out, resume)
    manifest, patch = _corpus_facts(root)
    d = _setup_distributed(cfg)
    out_dir = Path(out)
    ckpt_path = out_dir / CHECKPOINT_NAME
    state: dict[str, Any] | None = None
    if resume and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
    elif resume and d.rank == 0:
        print(f"no checkpoint at {ckpt_path}: starting at step 0", flush=True)

    raw = _initial_model(manifest, patch, cfg)  # identical initial weights on every rank
    raw.gradient_checkpointing = cfg.gradient_checkpointing
    resolved = _resolved_config(cfg, raw.config, root, manifest, patch)
    if state is not None:
        _check_resumable(state["config"], resolved, ckpt_path)
        raw.load_state_dict(state["model"])
    raw.to(d.device)
    model = _wrap(raw, cfg, d)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed + 1_000_003 * d.rank)
    # with a validation set, the index is read once for it and both loaders
    catalog = read_catalog(root) if cfg.val_samples > 0 else None
    held_out = held_out_keys(root, cfg.val_samples, catalog)
    loader = make_loader(root, cfg, patch, d.rank, d.world_size, held_out, catalog)
    validation = _Validation(root, cfg, patch, d, held_out, catalog) if held_out else None
    start, epoch, fresh = 0, 0, True
    if state is not None:
        _load_optimizer(model, optimizer, state["optimizer"], cfg)
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if len(state["rng"]) != d.world_size:
            raise ValueError(
                f"{ckpt_path}: saved by {len(state['rng'])} ranks, resuming on {d.world_size}"
            )
        _set_rng_state(generator, state["rng"][d.rank], d.device)
        loader.load_state_dict(state["loader"][d.rank])
        start, epoch, fresh = int(state["step"]), int(state["epoch"][d.rank]), False
    batches = _Stream(loader, epoch, fresh, root)
    autocast_bf16 = _autocast_bf16(cfg, d.device)
    text = raw.config.text_dim > 0

    last = cfg.steps if until is None else min(until, cfg.steps)
    if start < last:
        batches.peek()  # a corpus that packs into no batch fails here, before --out is written
    if d.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    metrics = out_dir / "metrics.jsonl"

    def save(step: int) -> None:
        model_state, optim_state = _model_and_optimizer_state(model, optimizer, cfg)
        ema_state = ema.state_dict() if ema is not None else None
        rng = d.gather(_rng_state(generator, d.device))
        loader_states = d.gather(loader.state_dict())
        epochs = d.gather(batches.epoch)
        if d.rank == 0:
            _atomic_save(
                {
                    "model": model_state,
                    "ema": ema_state,
                    "optimizer": optim_state,
                    "scheduler": scheduler.state_dict(),
                    "rng": rng,
                    "loader": loader_states,
                    "epoch": epochs,
                    "step": step,
                    "steps": step,
                    "config": resolved,
                },
                ckpt_path,
            )

    losses: list[float] = []
    model.train()
    stopped_at: int | None = None
    with _StopSignals(stop_file) as signals:
        for step in range(start + 1, last + 1):
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss, tokens, slots = 0.0, 0, 0
            for micro in range(cfg.grad_accum):
                b = _to_device(next(batches), d.device)
                tokens, slots = tokens + b["tokens"].shape[0], slots + b["num_slots"]
                sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                with (
                    contextlib.nullcontext() if sync else model.no_sync(),  # type: ignore[operator]
                    torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=autocast_bf16),
                ):
                    loss = _loss(model, b, cfg, text, generator)
                (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
            grad_norm = (
                float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                if cfg.grad_clip > 0
                else math.nan
            )
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            # the step's mean loss, and whether a signal stops the run on any rank
            mean, stop = d.mean_and_any(step_loss, signals.requested())
            losses.append(mean)
            if step % cfg.log_every == 0 or step == cfg.steps:
                seconds = time.perf_counter() - began
                all_tokens, all_slots = d.all_sum(tokens), d.all_sum(slots)
                record = {
                    "step": step,
                    "loss": losses[-1],
                    "tokens_per_s": all_tokens / seconds,
                    "padding": 1.0 - all_tokens / max(all_slots, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                }
                if d.rank == 0:
                    print(
                        f"step {step} loss {record['loss']:.4f} tokens/s {record['tokens_per_s']:.0f} "
                        f"pad {record['padding']:.3f} lr {record['lr']:.2e} grad_norm {grad_norm:.3f}",
                        flush=True,
                    )
                    with metrics.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if validation is not None and (
                step == cfg.steps or (cfg.val_every and step % cfg.val_every == 0)
            ):
                validation.log(step, model, text, metrics)
            if stop and step != last:
                save(step)
                stopped_at = step
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != last:
                save(step)
    if stopped_at is None and (start < last or state is None):
        save(last)
    if d.rank == 0 and start < last:
        print(f"loader: {loader.stats.summary()}", flush=True)
    if d.owns_group:
        _leave_group()
    if stopped_at is not None:
        raise TrainingInterrupted(
            f"{signals.name or 'a signal to another rank'}: stopped after step {stopped_at} "
            f"of {cfg.steps}, checkpoint {ckpt_path}; run again with --resume to go on",
            stopped_at,
            losses,
        )
    return losses


@torch.no_grad()
def evaluate(model: DiT, root: str, cfg: TrainConfig, *, seed: int = 0, draws: int = 1) -> float:
    """The flow-matching loss of `model` on fixed (x0, noise, t) triples of the corpus.

    One pass over every sample at `root` (rank 0 of 1, epoch 0, packed as `cfg` packs
    them), `draws` times each, with noise and timesteps from a generator seeded with
    `seed`: models scored with the same `root`, `cfg`, `seed` and `draws` (e.g. before
    and after training) see identical triples, so their difference is not sampling
    noise. The timestep distribution, shift and reduction are `cfg`'s; captions are
    always kept. Returns the mean over samples and draws (over tokens for
    ``loss_reduction="token"``).
    """
    if draws < 1:
        raise ValueError(f"draws must be positive, got {draws}")
    _, patch = _corpus_facts(root)
    device = next(model.parameters()).device
    fixed = dataclasses.replace(cfg, caption_dropout=0.0)
    generator = torch.Generator(device=device).manual_seed(seed)
    loader = make_loader(root, cfg, patch, 0, 1)
    loader.set_epoch(0)
    text = model.config.text_dim > 0
    total, weight = _summed_loss(model, loader, fixed, text, generator, draws)
    if weight == 0:
        raise ValueError(f"{root}: no packed batch to evaluate on ({loader.stats})")
    return total / weight


@torch.no_grad()
def _summed_loss(
    model: nn.Module,
    loader: Any,
    cfg: TrainConfig,
    text: bool,
    generator: torch.Generator,
    draws: int,
) -> tuple[float, int]:
    """Loss times weight summed over one pass of `loader`'s current epoch, `draws` times
    each batch, and the weight (samples, or tokens for ``loss_reduction="token"``), in
    eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    try:
        for batch in loader:
            b = _to_device(batch, device)
            count = b["num_samples"] if cfg.loss_reduction == "sample" else b["tokens"].shape[0]
            for _ in range(draws):
                with torch.autocast(
                    device.type, dtype=torch.bfloat16, enabled=_autocast_bf16(cfg, device)
                ):
                    loss = _loss(model, b, cfg, text, generator)
                total += float(loss) * count
                weight += int(count)
    finally:
        model.train(was_training)
    return total, weight


def _init_ray(address: str | None) -> None:
    """Join `address` or ``RAY_ADDRESS``, else start a fresh local Ray; nothing if joined."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        join_cluster(address)
    else:  # never a cluster that merely happens to run on this machine
        with sigint_ignored():  # Ctrl-C reaches the driver alone, which stops with a checkpoint
            ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)


def _ray_train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: `train`, then hand every rank's loss curve to the driver,
    and where the run stopped when the driver's stop file ended it early."""
    import ray.train

    stopped: dict[str, Any] | None = None
    try:
        losses = train(
            config["root"],
            config["out"],
            config["cfg"],
            resume=config["resume"],
            until=config["until"],
            stop_file=config["stop_file"],
        )
    except TrainingInterrupted as e:  # every rank stops at the same step
        losses, stopped = e.losses, {"step": e.step, "message": str(e)}
    curves: list[Any] = [losses]
    if dist.is_initialized() and dist.get_world_size() > 1:  # Ray Train's process group
        curves = [None] * dist.get_world_size()
        dist.all_gather_object(curves, losses)
    if ray.train.get_context().get_world_rank() == 0:
        # Ray Train keeps reported metrics only with checkpoints: the curves go through
        # the (shared) output folder instead.
        _atomic_write_text(
            Path(config["losses_file"]), json.dumps({"curves": curves, "stopped": stopped})
        )
    ray.train.report({"loss": losses[-1] if losses else math.nan})


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train_with_ray(
    root: str,
    out: str,
    cfg: TrainConfig,
    *,
    num_workers: int = 2,
    use_gpu: bool = False,
    resume: bool = False,
    until: int | None = None,
    ray_address: str | None = None,
) -> list[float]:
    """`train` on `num_workers` Ray Train workers (``TorchTrainer``; DDP or FSDP inside).

    Uses the Ray this process already joined; otherwise joins `ray_address` (``auto``,
    ``ray://head:10001``) or ``RAY_ADDRESS`` (set by ``ray job submit``), else starts a
    fresh local Ray. `root` must be storage every worker sees (``s3://`` or a shared
    filesystem on a cluster), `out` a folder every worker sees; local paths are made
    absolute. `resume` and
    `until` are `train`'s. Returns the losses, as `train` does; RuntimeError if the
    ranks' loss curves differ.
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if "://" not in root:
        root = str(Path(root).resolve())
    out_abs = str(Path(_check_out(out, resume)).resolve())
    losses_file = Path(out_abs) / "ray_losses.json"
    stop_file = Path(out_abs) / ".stop"  # written by the driver on SIGINT/SIGTERM
    Path(out_abs).mkdir(parents=True, exist_ok=True)
    losses_file.unlink(missing_ok=True)
    stop_file.unlink(missing_ok=True)
    _init_ray(ray_address)
    device = "cuda" if use_gpu else "cpu"
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "root": root,
            "out": out_abs,
            "cfg": dataclasses.replace(cfg, device=device),
            "resume": resume,
            "until": until,
            "losses_file": str(losses_file),
            "stop_file": str(stop_file),
        },
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name="reelpack-train", storage_path=str(Path(out_abs) / "ray")),
    )
    try:
        with _DriverStop(stop_file):
            _fit(trainer)
    except Exception as e:  # Ray Train's error holds each failed worker's own
        failures = getattr(e, "worker_failures", None) or {}
        first = failures[min(failures)] if failures else None
        if isinstance(first, ValueError | OSError):  # what `train` names: raised as such
            raise first from e
        raise
    finally:
        stop_file.unlink(missing_ok=True)
    result = json.loads(losses_file.read_text())
    curves: list[list[float]] = result["curves"]
    if any(curve != curves[0] for curve in curves):
        raise RuntimeError(f"Ray Train ranks disagree on the losses: {curves}")
    if result["stopped"] is not None:
        stopped = result["stopped"]
        raise TrainingInterrupted(stopped["message"], stopped["step"], curves[0])
    return curves[0]


def _fit(trainer: Any) -> Any:
    """``trainer.fit()`` in a thread of its own: in the main thread, Ray Train would
    take SIGINT for itself (aborting the run without a checkpoint), where
    :class:`_DriverStop` is to take it. The main thread waits, taking the signals."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in result:
        raise result["error"]
    return result.get("value")


class _DriverStop(_StopSignals):
    """The Ray Train driver's :class:`_StopSignals`: a first SIGINT or SIGTERM writes
    the signal's name to ``stop_file`` (in the output folder every worker sees), which
    each worker's loop reads as that signal; a second raises KeyboardInterrupt."""

    def __init__(self, stop_file: Path) -> None:
        super().__init__()
        self._target = stop_file

    def _handle(self, signum: int, frame: Any) -> None:
        super()._handle(signum, frame)
        try:
            _atomic_write_text(self._target, self.name or "stop")
        except OSError as e:  # the workers cannot be told: the next signal stops at once
            print(f"cannot ask the workers to stop ({e})", file=sys.stderr, flush=True)


def read_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """The state a training run saved at `path` (model, EMA, optimizer, config, ...),
    loaded without unpickling code (`mmap`: memory-mapped, read as it is used); a file
    that is not such a checkpoint is an error naming it (:func:`model.weights.load_weights`)."""
    from model.weights import load_weights

    state = load_weights(path, "checkpoint", device, mmap=mmap)
    if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and "model" in state):
        raise ValueError(
            f"checkpoint {path} holds no model and config: not one `reelpack train` wrote"
        )
    return state


def load_checkpoint(
    path: str, device: str = "cpu", *, ema: bool = False
) -> tuple[DiT, dict[str, Any]]:
    """A saved model (its EMA weights with `ema`) and its resolved config; nothing is
    unpickled, and of the optimizer state nothing is read."""
    return model_from_checkpoint(read_checkpoint(path, mmap=True), path, device, ema=ema)


def model_from_checkpoint(
    state: dict[str, Any], path: str, device: str = "cpu", *, ema: bool = False
) -> tuple[DiT, dict[str, Any]]:
    """:func:`load_checkpoint` of a state :func:`read_checkpoint` read from `path`."""
    model_cfg = dict(state["config"]["model"])
    model_cfg["patch_size"] = tuple(model_cfg["patch_size"])
    model = DiT(DiTConfig(**model_cfg)).to(device)
    model.load_state_dict(state["model"])
    if ema:
        if state.get("ema") is None:
            raise ValueError(f"{path}: the checkpoint holds no EMA weights (ema_decay was 0)")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state["ema"][name])
    return model, state["config"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="corpus root (local folder)")
    parser.add_argument("--out", required=True, help="output folder for config and checkpoint")
    parser.add_argument("--config", help="YAML/JSON file of TrainConfig fields")
    parser.add_argument("--resume", action="store_true")
    add_config_flags(parser)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    cfg = load_train_config(args.config, **overrides)
    try:
        train(args.root, args.out, cfg, resume=args.resume)
    except TrainingInterrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
