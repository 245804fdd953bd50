"""Train a DiT with rectified flow on a reelpack corpus (streamed, packed, native size).

Tiny CPU run (seconds), on a corpus built with the tiny preset::

    python -m model.train --root /tmp/corpus --out /tmp/run --preset DiT-tiny --steps 50

The corpus is streamed shard by shard and cycled (epoch after epoch, same order);
samples are packed greedily into sequences of at most ``token_budget`` tokens, one
sequence per optimizer step. Writes ``<out>/config.json`` (resolved config) and
``<out>/checkpoint.pt`` (model weights and config as plain tensors and dicts,
loadable with ``torch.load(..., weights_only=True)``; see `load_checkpoint`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.data import PackStats, Sample, iter_samples, pack, read_manifest
from model.dit import DiT, DiTConfig, build_dit
from model.flow import flow_loss

__all__ = ["TrainConfig", "cycle_samples", "load_checkpoint", "train"]


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "DiT-tiny"
    steps: int = 100
    lr: float = 1e-4
    token_budget: int = 4096  # tokens per packed sequence = per optimizer step
    seed: int = 0
    log_every: int = 10
    device: str = "cpu"


def cycle_samples(root: str, stats: PackStats | None = None) -> Iterator[Sample]:
    """The corpus's samples, epoch after epoch, in stored order.

    Raises ValueError when an epoch holds no samples, or, given the `stats` of the
    `pack` consuming this stream, when a whole epoch packed none (all over budget):
    either would otherwise loop forever.
    """
    while True:
        count = 0
        packed_before = stats.samples_packed if stats is not None else 0
        for sample in iter_samples(root):
            count += 1
            yield sample
        if count == 0:
            raise ValueError(f"{root}: the corpus shards hold no samples")
        if stats is not None and stats.samples_packed == packed_before:
            raise ValueError(
                f"{root}: none of {count} samples fits the token budget "
                f"(skipped: {stats.skipped_keys[:5]}...)"
            )


def train(root: str, out: str, cfg: TrainConfig) -> list[float]:
    """Train `cfg.steps` steps on the corpus at `root`; save to `out`; return the losses."""
    manifest = read_manifest(root)
    if len(manifest["patch_size"]) != 3:
        raise ValueError(
            f"{root}: manifest patch_size {manifest['patch_size']} is not [pt, ph, pw]"
        )
    pt, ph, pw = (int(p) for p in manifest["patch_size"])
    patch = (pt, ph, pw)
    torch.manual_seed(cfg.seed)
    model = build_dit(
        cfg.preset,
        in_channels=int(manifest["vae"]["latent_channels"]),
        patch_size=patch,
    ).to(cfg.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = {
        "train": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(model.config),
        "corpus": {"root": root, "vae": manifest["vae"], "patch_size": list(patch)},
    }
    resolved = json.loads(json.dumps(resolved))  # plain JSON types, as stored everywhere
    (out_dir / "config.json").write_text(json.dumps(resolved, indent=2))

    stats = PackStats()
    batches = pack(cycle_samples(root, stats), cfg.token_budget, patch, stats)
    losses: list[float] = []
    model.train()
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        batch = next(batches).to(cfg.device)
        loss = flow_loss(
            model, batch.tokens, batch.positions, batch.sample_ids, batch.num_samples, generator
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            tokens_per_s = batch.num_tokens / (time.perf_counter() - start)
            print(f"step {step} loss {losses[-1]:.4f} tokens/s {tokens_per_s:.0f}", flush=True)

    print(
        f"packed {stats.samples_packed} samples in {stats.batches} sequences "
        f"(fill {stats.fill(cfg.token_budget):.2f}), skipped {stats.samples_skipped} over budget",
        flush=True,
    )
    torch.save(
        {"model": model.state_dict(), "config": resolved, "steps": cfg.steps},
        out_dir / "checkpoint.pt",
    )
    return losses


def load_checkpoint(path: str, device: str = "cpu") -> tuple[DiT, dict[str, Any]]:
    """A saved model and its resolved config (no pickled objects are loaded)."""
    state = torch.load(path, map_location=device, weights_only=True)
    model_cfg = dict(state["config"]["model"])
    model_cfg["patch_size"] = tuple(model_cfg["patch_size"])
    model = DiT(DiTConfig(**model_cfg)).to(device)
    model.load_state_dict(state["model"])
    return model, state["config"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", required=True, help="corpus root (local folder)")
    parser.add_argument("--out", required=True, help="output folder for config and checkpoint")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    train(args.root, args.out, cfg)


if __name__ == "__main__":
    main()
