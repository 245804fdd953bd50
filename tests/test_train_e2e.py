"""Training end to end: on the corpus ``reelpack demo`` builds, and on Ray Train.

- ``reelpack demo``, run as a user runs it (the demo's videos built with the ``tiny``
  preset on a local Ray, trained 100 steps, one sample written): the flow loss of the
  model it trained, on fixed (x0, noise, t) triples (`model.train.evaluate`), must be
  at most half the untrained model's, and samples must carry the corpus's channel
  means.
- `train_with_ray`: two Ray Train workers (gloo) on a fresh local Ray, stopped by
  Ctrl-C at the driver and resumed, must reproduce the losses of two plain DDP
  processes exactly.
"""

from __future__ import annotations

import dataclasses
import json
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
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``reelpack demo --out DIR``, as a user runs it: the demo's six videos built with
    the ``tiny`` preset on a local Ray, 100 training steps, one sample."""
    import ray

    from reelpack import cli

    root = tmp_path_factory.mktemp("demo")
    started = not ray.is_initialized()
    with pytest.MonkeyPatch.context() as monkeypatch:
        # a fresh local Ray even if another cluster on this machine left its address file
        monkeypatch.setenv("RAY_ADDRESS", "local")
        monkeypatch.setenv("REELPACK_CACHE", str(root / "models"))
        assert cli.main(["demo", "--out", str(root)]) == 0
    if started:
        ray.shutdown()
    yield root


def test_the_demo_builds_trains_and_samples(demo_run: Path) -> None:
    import av

    with av.open(str(demo_run / "sample.mp4")) as container:
        rate = container.streams.video[0].average_rate
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3)
    assert rate == 8  # the rate the tiny preset's latents were made at
    logged = [json.loads(line) for line in (demo_run / "train" / "metrics.jsonl").open()]
    assert logged[-1]["step"] == demo_train_config().steps
    # the demo's token budget packs its small corpus into nearly full sequences
    assert max(m["padding"] for m in logged) < 0.15, logged[-1]


def test_the_demo_refuses_bad_flags_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from reelpack import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "0"]) == 2
    assert "reelpack demo: bad TrainConfig: steps must be positive, not 0" in (
        capsys.readouterr().err
    )
    assert not out.exists()  # nothing synthesized or built
    out.write_text("")
    assert cli.main(["demo", "--out", str(out)]) == 2
    assert f"--out {out} is a file; the demo writes a folder" in capsys.readouterr().err


def test_tiny_model_learns_the_demo_corpus(demo_run: Path) -> None:
    """The model ``reelpack demo`` trained, scored on fixed (x0, noise, t) triples."""
    corpus = str(demo_run / "corpus")
    cfg = demo_train_config()  # exactly what `reelpack demo` trains
    before = evaluate(init_model(corpus, cfg), corpus, cfg, draws=8)
    ckpt = str(demo_run / "train" / "checkpoint.pt")
    trained, _ = load_checkpoint(ckpt)
    averaged, _ = load_checkpoint(ckpt, ema=True)  # what `reelpack sample` uses
    after, after_ema = (evaluate(m, corpus, cfg, draws=8) for m in (trained, averaged))
    logged = [json.loads(line)["loss"] for line in (demo_run / "train" / "metrics.jsonl").open()]
    print(
        f"demo corpus, {cfg.steps} steps: fixed-triple loss {before:.4f} -> {after:.4f} "
        f"({1 - after / before:.1%} lower; EMA {after_ema:.4f}), "
        f"logged training loss {logged[0]:.4f} -> {logged[-1]:.4f}"
    )
    assert all(math.isfinite(x) for x in logged)
    assert after <= 0.5 * before, (before, after)
    assert after_ema <= 0.5 * before, (before, after_ema)
    assert logged[-1] <= 0.5 * logged[0], logged

    # The demo latents (a random-weight VAE) are almost constant per channel: samples
    # of the trained model carry those channel means, pure noise does not.
    target = torch.stack([s.latents.mean(dim=(1, 2, 3)) for s in iter_samples(corpus)])
    target = target.mean(dim=0)  # (C,)

    def channel_error(model: torch.nn.Module) -> float:
        grids = [(3, 6, 8), (3, 8, 5)]  # two of the demo clips' token grids
        out = sample_latents(model, grids, steps=16, shift_base_tokens=cfg.shift_base_tokens)
        means = torch.stack([x.mean(dim=(1, 2, 3)) for x in out]).mean(dim=0)
        return float((means - target).pow(2).mean().sqrt())

    untrained, sampled = channel_error(init_model(corpus, cfg)), channel_error(averaged)
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


def test_ray_train_two_workers_resume_and_match_ddp(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C at the driver stops both workers after the same step, with a checkpoint;
    resumed, the run's losses and weights are those of two uninterrupted DDP processes."""
    import os
    import signal
    import threading

    from model import train as train_module
    from model.train import TrainingInterrupted

    root = str(make_corpus(tmp_path / "c", smooth_latents(MIX), text_dim=TEXT_DIM))
    cfg = TrainConfig(steps=5, lr=1e-2, token_budget=48, log_every=1, ema_decay=0.9)
    out = tmp_path / "ray"
    fit = train_module._fit

    def ctrl_c_then_fit(trainer: object) -> object:
        # Ctrl-C while the run starts (its workers take seconds to reach their first step)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        return fit(trainer)

    monkeypatch.setattr(train_module, "_fit", ctrl_c_then_fit)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT: stopped after step 1 of 5") as stop:
        train_with_ray(root, str(out), cfg, num_workers=2)
    monkeypatch.undo()
    head = stop.value.losses
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == stop.value.step == 1
    assert not (out / ".stop").exists()
    # a worker's own error (as Ray Train hands it over: by rank) is raised as such
    from ray.train import WorkerGroupError

    def workers_fail(trainer: object) -> object:
        raise WorkerGroupError("...", {1: OSError("rank 1"), 0: ValueError("no batch: rank 0")})

    monkeypatch.setattr(train_module, "_fit", workers_fail)
    with pytest.raises(ValueError, match=r"^no batch: rank 0$"):
        train_with_ray(root, str(tmp_path / "failed"), cfg, num_workers=2)
    monkeypatch.undo()
    tail = train_with_ray(root, str(out), cfg, num_workers=2, resume=True)
    assert len(head) == 1 and len(tail) == 4
    assert all(math.isfinite(x) for x in head + tail)

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 5 and len(state["rng"]) == 2 and len(state["loader"]) == 2
    # both ranks took the same steps through the same epoch, each with its own noise
    assert state["epoch"][0] == state["epoch"][1]
    assert state["loader"][0]["position"] == state["loader"][1]["position"]
    assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])

    # the same run as two plain DDP processes (what torchrun starts): the same losses
    ddp = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, [(_free_port(), root, str(ddp), cfg, 0)]), nprocs=2, join=True)
    assert head + tail == torch.load(ddp / "rank0.pt", weights_only=True)["losses"]
    reference = torch.load(ddp / "checkpoint.pt", weights_only=True)
    for name, value in reference["model"].items():
        assert torch.equal(state["model"][name], value), name

    # the checkpoint samples without a process group
    model, config = load_checkpoint(str(out / "checkpoint.pt"), ema=True)
    # Ray Train workers run on the CPU unless use_gpu: the stored config says so
    assert config["train"] == {**dataclasses.asdict(cfg), "device": "cpu"}
    embeds = [torch.randn(2, TEXT_DIM)]
    (latent,) = sample_latents(model, [(2, 4, 2)], text_embeds=embeds, steps=2, cfg_scale=2.0)
    assert latent.shape == (4, 2, 8, 4) and torch.isfinite(latent).all()
