"""Training end to end: on the corpus ``reelpack demo`` builds, and on Ray Train.

- The demo corpus: `pipeline.synth.demo_videos` built with the ``tiny`` preset on a
  local Ray (as `reelpack.demo.run_demo` does), then trained with the demo's recipe.
  The flow loss on fixed (x0, noise, t) triples (`model.train.evaluate`) must fall by
  at least half, and samples must carry the corpus's per-channel means.
- `train_with_ray`: two Ray Train workers (gloo) on a fresh local Ray, stopped and
  resumed, must reproduce the losses of two plain DDP processes exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_train import MIX, TEXT_DIM, _free_port, _worker, make_corpus, smooth_latents

from model.data import iter_samples
from model.sample import sample_latents
from model.train import (
    TrainConfig,
    evaluate,
    init_model,
    load_checkpoint,
    train,
    train_with_ray,
)
from reelpack.demo import demo_train_config

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a shared 2-core machine
    yield
    torch.set_num_threads(before)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- the demo corpus -------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The corpus `reelpack demo` builds: its six videos, the ``tiny`` preset, local Ray."""
    import ray

    from pipeline.config import load_config
    from pipeline.graph import build
    from pipeline.synth import demo_videos

    root = tmp_path_factory.mktemp("demo")
    demo_videos(str(root / "videos"))
    cfg = load_config(preset="tiny", model_cache=str(root / "models"))
    started = not ray.is_initialized()
    with pytest.MonkeyPatch.context() as monkeypatch:
        # a fresh local Ray even if another cluster on this machine left its address file
        monkeypatch.setenv("RAY_ADDRESS", "local")
        build([str(root / "videos")], str(root / "corpus"), cfg, echo=lambda _: None)
    if started:
        ray.shutdown()
    yield str(root / "corpus")


def test_tiny_model_learns_the_demo_corpus(demo_corpus: str, tmp_path: Path) -> None:
    cfg = demo_train_config()  # exactly what `reelpack demo` trains
    before = evaluate(init_model(demo_corpus, cfg), demo_corpus, cfg, draws=8)
    losses = train(demo_corpus, str(tmp_path / "run"), cfg)
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    trained, _ = load_checkpoint(ckpt)
    averaged, _ = load_checkpoint(ckpt, ema=True)  # what `reelpack sample` uses
    after, after_ema = (evaluate(m, demo_corpus, cfg, draws=8) for m in (trained, averaged))
    first, last = _mean(losses[:10]), _mean(losses[-10:])
    print(
        f"demo corpus, {cfg.steps} steps: fixed-triple loss {before:.4f} -> {after:.4f} "
        f"({1 - after / before:.1%} lower; EMA {after_ema:.4f}), "
        f"training loss first/last 10 steps {first:.4f} -> {last:.4f}"
    )
    assert len(losses) == cfg.steps and all(math.isfinite(x) for x in losses)
    assert after <= 0.5 * before, (before, after)
    assert after_ema <= 0.5 * before, (before, after_ema)
    assert last <= 0.5 * first, (first, last)

    # The demo latents (a random-weight VAE) are almost constant per channel: samples
    # of the trained model carry those channel means, pure noise does not.
    target = torch.stack([s.latents.mean(dim=(1, 2, 3)) for s in iter_samples(demo_corpus)])
    target = target.mean(dim=0)  # (C,)

    def channel_error(model: torch.nn.Module) -> float:
        grids = [(3, 6, 8), (3, 8, 5)]  # two of the demo clips' token grids
        out = sample_latents(model, grids, steps=16, shift_base_tokens=cfg.shift_base_tokens)
        means = torch.stack([x.mean(dim=(1, 2, 3)) for x in out]).mean(dim=0)
        return float((means - target).pow(2).mean().sqrt())

    untrained, sampled = channel_error(init_model(demo_corpus, cfg)), channel_error(averaged)
    print(f"sample channel-mean RMS error: untrained {untrained:.4f}, trained {sampled:.4f}")
    assert sampled <= 0.2 * untrained, (untrained, sampled)


# --- Ray Train --------------------------------------------------------------------------
@pytest.fixture
def local_ray() -> Iterator[None]:
    """A fresh two-CPU local Ray for one test, shut down afterwards."""
    import ray

    if ray.is_initialized():  # e.g. left running by a corpus build
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_train_two_workers_resume_and_match_ddp(local_ray: None, tmp_path: Path) -> None:
    root = str(make_corpus(tmp_path / "c", smooth_latents(MIX), text_dim=TEXT_DIM))
    cfg = TrainConfig(steps=5, lr=1e-2, token_budget=48, log_every=1, ema_decay=0.9)
    out = tmp_path / "ray"
    head = train_with_ray(root, str(out), cfg, num_workers=2, until=3)  # as if preempted
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    tail = train_with_ray(root, str(out), cfg, num_workers=2, resume=True)
    assert len(head) == 3 and len(tail) == 2
    assert all(math.isfinite(x) for x in head + tail)

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and len(state["rng"]) == 2 and len(state["loader"]) == 2
    # both ranks took the same steps through the same epoch, each with its own noise
    assert state["epoch"][0] == state["epoch"][1]
    assert state["loader"][0]["position"] == state["loader"][1]["position"]
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])

    # the same run as two plain DDP processes (what torchrun starts): the same losses
    ddp = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, [(_free_port(), root, str(ddp), cfg)]), nprocs=2, join=True)
    assert head + tail == torch.load(ddp / "rank0.pt", weights_only=True)["losses"]
    reference = torch.load(ddp / "checkpoint.pt", weights_only=True)
    for name, value in reference["model"].items():
        assert torch.equal(state["model"][name], value), name

    # the checkpoint samples without a process group
    model, config = load_checkpoint(str(out / "checkpoint.pt"), ema=True)
    assert config["train"] == dataclasses.asdict(cfg)
    embeds = [torch.randn(2, TEXT_DIM)]
    (latent,) = sample_latents(model, [(2, 4, 2)], text_embeds=embeds, steps=2, cfg_scale=2.0)
    assert latent.shape == (4, 2, 8, 4) and torch.isfinite(latent).all()
