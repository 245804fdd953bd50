"""model.train: overfitting, learning a small corpus, exact resume, DDP/FSDP on gloo, the CLI.

Corpora are written here as the writer lays them out: webdataset shards, a parquet
index (schemas.CLIP_SCHEMA) with its sources/ commit marker, and manifest.json. No Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds
from safetensors.torch import save as save_safetensors

import schemas
from model.train import TrainConfig, load_checkpoint, load_train_config, train

C = 4
PATCH = (1, 2, 2)
TEXT_DIM = 8


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    # OpenMP spin-waiting makes them 10-100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_corpus(
    root: Path,
    latents: list[torch.Tensor],
    *,
    text_dim: int = 0,
    per_shard: int = 4,
    vae: dict[str, Any] | None = None,
    seed: int = 0,
    scenes: int = 0,
    text_encoder: dict[str, Any] | None = None,
) -> Path:
    """A corpus of bf16 latents (+ caption embeddings when `text_dim`), with index and manifest.

    With `scenes`, clip i shows scene i % scenes (see `smooth_latents`) and its caption
    embeddings are that scene's vector plus noise, so captions carry information.
    """
    g = torch.Generator().manual_seed(seed)
    scene_vectors = torch.randn(max(scenes, 1), text_dim or 1, generator=g) * 2
    (root / schemas.SHARDS_DIR).mkdir(parents=True)
    rows = []
    for shard_start in range(0, len(latents), per_shard):
        rel = f"{schemas.SHARDS_DIR}/shard-{shard_start // per_shard:06d}.tar"
        with wds.TarWriter(str(root / rel)) as sink:
            for i in range(shard_start, min(shard_start + per_shard, len(latents))):
                key = f"clip{i:04d}"
                tensors = {schemas.TENSOR_LATENTS: latents[i].to(torch.bfloat16).contiguous()}
                if text_dim:
                    length = 1 + i % 3
                    embeds = torch.randn(length, text_dim, generator=g)
                    if scenes:
                        embeds = embeds * 0.1 + scene_vectors[i % scenes]
                    tensors[schemas.TENSOR_TEXT_EMBEDS] = embeds.to(torch.bfloat16)
                shape = list(latents[i].shape)
                blob = save_safetensors(tensors)
                row = {
                    "clip_id": key,
                    "source": f"/videos/v{i}.mp4",
                    "status": "kept",
                    "reasons": [],
                    "caption": f"caption {i}",
                    "latent_shape": shape,
                    "shard": rel,
                    "key": key,
                    "start_s": 0.0,
                    "end_s": 1.0,
                    "num_tokens": shape[1] * shape[2] // PATCH[1] * shape[3] // PATCH[2],
                    "latents_crc32": zlib.crc32(blob),
                }
                rows.append(row)
                sink.write(
                    {
                        "__key__": key,
                        schemas.SAMPLE_LATENTS: blob,
                        schemas.SAMPLE_META: json.dumps(row).encode(),
                        schemas.SAMPLE_CAPTION: row["caption"].encode(),
                    }
                )
    for directory in (schemas.INDEX_DIR, schemas.SOURCES_DIR):
        (root / directory).mkdir()
    index = pa.Table.from_pylist(
        [{n: r.get(n) for n in schemas.CLIP_SCHEMA.names} for r in rows], schema=schemas.CLIP_SCHEMA
    )
    pq.write_table(index, root / schemas.INDEX_DIR / "part-000000.parquet")
    sources = pa.Table.from_pylist(
        [{"source": r["source"], "status": "done", "num_clips": 1} for r in rows],
        schema=schemas.SOURCE_SCHEMA,
    )
    pq.write_table(sources, root / schemas.SOURCES_DIR / "part-000000.parquet")
    manifest = {
        "schema_version": schemas.SCHEMA_VERSION,
        "patch_size": list(PATCH),
        "vae": vae or {"latent_channels": C, "config_sha256": "synthetic"},
        "text_encoder": text_encoder
        or ({"id": "synthetic", "dim": text_dim} if text_dim else None),
    }
    (root / schemas.MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def smooth_latents(
    shapes: list[tuple[int, int, int]], seed: int = 0, scenes: int = 0
) -> list[torch.Tensor]:
    """Learnable data: per-channel low-frequency waves with random phases, like real latents.

    With `scenes`, clip i uses the phases of scene i % scenes (any size or duration).
    """
    g = torch.Generator().manual_seed(seed)
    phases = [torch.rand(C, 3, generator=g) * 6.28 for _ in range(scenes)]
    out = []
    for i, (t, h, w) in enumerate(shapes):
        tt, hh, ww = torch.meshgrid(
            torch.arange(t).float(), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"
        )
        phase = phases[i % scenes] if scenes else torch.rand(C, 3, generator=g) * 6.28
        x = torch.stack(
            [
                torch.sin(0.7 * hh + phase[c, 0]) * torch.cos(0.5 * ww + phase[c, 1])
                + 0.3 * torch.sin(tt + phase[c, 2])
                for c in range(C)
            ]
        )
        out.append((x * 1.2).to(torch.bfloat16).float())
    return out


MIX = [(1, 4, 4), (2, 4, 6), (3, 6, 4), (1, 8, 4), (2, 2, 8), (3, 4, 4), (1, 6, 6), (2, 6, 2)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# --- learning --------------------------------------------------------------------------
def test_overfits_one_clip(tmp_path: Path) -> None:
    root = make_corpus(tmp_path / "c", smooth_latents([(2, 4, 4)]) * 4)
    cfg = TrainConfig(
        steps=300,
        lr=3e-3,
        token_budget=32,
        log_every=50,
        ema_decay=0.0,
        warmup_steps=5,
        min_lr_ratio=0.0,
        shift_base_tokens=0,
    )
    losses = train(str(root), str(tmp_path / "run"), cfg)
    first, last = _mean(losses[:10]), _mean(losses[-10:])
    print(f"overfit one clip: {first:.4f} -> {last:.4f} ({1 - last / first:.1%} lower)")
    assert last <= 0.1 * first, (first, last)


@pytest.mark.slow
def test_tiny_model_learns_a_small_corpus(tmp_path: Path) -> None:
    # 32 clips of 8 sizes and aspect ratios showing 4 scenes, captions that name the
    # scene, 10% caption dropout
    shapes = MIX * 4
    root = make_corpus(
        tmp_path / "c", smooth_latents(shapes, seed=1, scenes=4), text_dim=TEXT_DIM, scenes=4
    )
    cfg = TrainConfig(
        steps=500,
        lr=2e-3,
        token_budget=96,
        log_every=100,
        warmup_steps=10,
        min_lr_ratio=0.05,
        shift_base_tokens=0,
    )
    losses = train(str(root), str(tmp_path / "run"), cfg)
    first, last = _mean(losses[:20]), _mean(losses[-20:])
    print(f"small corpus: {first:.4f} -> {last:.4f} ({1 - last / first:.1%} lower)")
    assert last <= 0.5 * first, (first, last)


def test_validation_loss_on_held_out_samples(tmp_path: Path) -> None:
    """val_samples holds the same samples out of training on every run; their loss is
    logged every val_every steps and at the end, the same each time it is computed."""
    from model.train import _corpus_facts, _Dist, _Validation, held_out_keys, make_loader

    root = str(make_corpus(tmp_path / "c", smooth_latents(MIX * 2), text_dim=TEXT_DIM))
    held = held_out_keys(root, 3)
    assert len(held) == 3 and held == held_out_keys(root, 3) and held < held_out_keys(root, 5)
    cfg = TrainConfig(
        steps=4, lr=1e-3, token_budget=64, log_every=2, val_samples=3, val_every=3, device="cpu"
    )
    _, patch = _corpus_facts(root)
    loader = make_loader(root, cfg, patch, 0, 1, held)
    assert len(loader.entries) == len(MIX) * 2 - 3 and not held & {e.key for e in loader.entries}
    out = tmp_path / "run"
    train(root, str(out), cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [step for step, _ in val] == [3, 4]  # every 3 steps, and the last
    model, _ = load_checkpoint(str(out / "checkpoint.pt"), ema=False)
    validation = _Validation(root, cfg, patch, _Dist(0, 1, torch.device("cpu"), False), held)
    again = [validation.loss(model, True) for _ in range(2)]
    assert again[0] == again[1] == pytest.approx(val[-1][1], rel=1e-5)
    with pytest.raises(ValueError, match="holds out all 16 kept samples; none is left"):
        held_out_keys(root, 16)
    with pytest.raises(ValueError, match="val_every must be >= 0"):
        TrainConfig(val_every=-1).validate()


# --- checkpoints and resume --------------------------------------------------------------
def test_resume_reproduces_the_uninterrupted_losses(tmp_path: Path) -> None:
    root = make_corpus(tmp_path / "c", smooth_latents(MIX), text_dim=TEXT_DIM)
    cfg = TrainConfig(
        steps=6,
        lr=1e-3,
        token_budget=64,
        log_every=1,
        warmup_steps=2,
        caption_dropout=0.5,
        grad_accum=2,
        device="cpu",  # exact equality holds on the CPU
    )
    full = train(str(root), str(tmp_path / "full"), cfg)
    half = train(str(root), str(tmp_path / "split"), cfg, until=3)  # as if preempted
    rest = train(str(root), str(tmp_path / "split"), cfg, resume=True)
    assert len(full) == 6 and len(half) == 3 and len(rest) == 3
    assert half + rest == full  # exact on the CPU
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
        assert torch.equal(a["ema"][name], b["ema"][name]), name
    # an already finished run has nothing left to do; a changed recipe is refused
    assert train(str(root), str(tmp_path / "split"), cfg, resume=True) == []
    with pytest.raises(ValueError, match=r"changed \['lr'\]"):
        train(
            str(root),
            str(tmp_path / "split"),
            TrainConfig(**{**cfg.__dict__, "lr": 1.0}),
            resume=True,
        )


def test_checkpoint_contents_and_ema_loading(tmp_path: Path) -> None:
    root = make_corpus(tmp_path / "c", smooth_latents(MIX[:4]))
    out = tmp_path / "run"
    train(str(root), str(out), TrainConfig(steps=3, lr=1e-2, token_budget=64, ema_decay=0.5))
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors and dicts only
    assert {"model", "ema", "optimizer", "scheduler", "rng", "loader", "step", "config"} <= set(
        state
    )
    assert state["config"] == json.loads((out / "config.json").read_text())
    assert (
        state["config"]["train"]["ema_decay"] == 0.5 and state["config"]["model"]["text_dim"] == 0
    )
    raw, _ = load_checkpoint(str(out / "checkpoint.pt"))
    averaged, _ = load_checkpoint(str(out / "checkpoint.pt"), ema=True)
    differs = [
        not torch.equal(p, q) for p, q in zip(raw.parameters(), averaged.parameters(), strict=True)
    ]
    assert any(differs)
    for name, p in averaged.named_parameters():
        assert torch.equal(p, state["ema"][name])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 3 and 0.0 <= metrics[-1]["padding"] < 1.0
    assert metrics[-1]["tokens_per_s"] > 0 and math.isfinite(metrics[-1]["loss"])


def test_config_file_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("preset: DiT-tiny\nlr: 2e-3\ngrad_accum: 2\n")  # an exponent float
    cfg = load_train_config(str(path), lr=None, steps=7)
    assert (cfg.lr, cfg.grad_accum, cfg.steps) == (0.002, 2, 7)
    path.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_train_config(str(path))
    with pytest.raises(ValueError, match="precision"):
        load_train_config(None, precision="fp8")


def test_cli_train_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reelpack.cli import main

    root = make_corpus(tmp_path / "c", smooth_latents(MIX[:4]))
    out = tmp_path / "run"
    args = ["train", str(root), "--out", str(out), "--steps", "2", "--token-budget", "64"]
    assert main(args) == 0
    assert main([*args[:4], "--steps", "3", "--token-budget", "64", "--resume"]) == 0
    text = capsys.readouterr().out
    assert "trained 2 steps" in text and "trained 1 steps" in text
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert main([*args, "--precision", "fp8"]) == 2
    # a fresh run never overwrites another's checkpoint or appends to its metrics
    metrics = (out / "metrics.jsonl").read_text()
    assert main(args) == 2
    assert "checkpoint.pt exists: pass --resume" in capsys.readouterr().err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert (out / "metrics.jsonl").read_text() == metrics
    # --resume where there is no checkpoint yet starts the run, and says so
    other = str(tmp_path / "other")
    assert main([*args[:3], other, *args[4:], "--resume"]) == 0
    assert "no checkpoint at" in capsys.readouterr().out
    # a checkpoint cut short (a copy that stopped) is named, not a torch traceback
    ckpt = Path(other) / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:4096])
    assert main([*args[:3], other, *args[4:], "--resume"]) == 1
    assert f"checkpoint {ckpt} is not a torch weights file, or it is cut short" in (
        capsys.readouterr().err
    )
    # a root that is no corpus, --out under a file: exit 2, one line naming it
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert (
        capsys.readouterr().err
        == f"reelpack train: {tmp_path}/manifest.json: no corpus manifest; {tmp_path} is not a corpus\n"
    )
    assert main(["train", str(ckpt), "--out", str(tmp_path / "x")]) == 2  # a file as root
    assert f"no corpus manifest; {ckpt} is not a corpus" in capsys.readouterr().err
    assert main([*args[:3], str(ckpt / "run"), *args[4:]]) == 2
    assert f"--out {ckpt}/run: {ckpt} is a file; training writes a folder" in (
        capsys.readouterr().err
    )
    # the corpus's own root: its files stay the build's
    before = sorted(p.name for p in root.iterdir())
    assert main([*args[:3], str(root), *args[4:]]) == 2
    assert f"--out {root}: the folder holds a corpus (manifest.json)" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == before


def test_sigterm_stops_training_after_the_step_with_a_checkpoint(tmp_path: Path) -> None:
    """A preempted run (SIGTERM; Ctrl-C alike) finishes its step, saves, and exits 130
    saying how to go on; --resume continues from that step."""
    import signal
    import subprocess
    import sys
    import time

    from reelpack.cli import main

    root = make_corpus(tmp_path / "c", smooth_latents(MIX[:4]))
    out = tmp_path / "run"
    args = ["train", str(root), "--out", str(out), "--token-budget", "64", "--log-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "reelpack.cli", *args, "--steps", "1000000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"SIGTERM: stopped after step {step} of 1000000, checkpoint {out}" in err
    assert "--resume" in err and "Traceback" not in err
    assert len(metrics.read_text().splitlines()) == step  # every step logged, none lost
    assert main([*args, "--steps", str(step + 2), "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 2


# --- several processes ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sigterm_in_call(loss: Any, at: int) -> Any:
    """``loss`` that sends this process SIGTERM in its call number ``at`` (0: never)."""
    import signal

    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    return wrapped


def _worker(rank: int, world: int, jobs: list[tuple[int, str, str, TrainConfig, int]]) -> None:
    """Each job is a run; with ``sigterm_at`` > 0, rank 1 gets SIGTERM in that step."""
    import model.train
    from model.train import TrainingInterrupted

    torch.set_num_threads(1)
    for port, root, out, cfg, sigterm_at in jobs:  # one process start (seconds) for several runs
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            WORLD_SIZE=str(world),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
        )
        real_loss = model.train._loss
        model.train._loss = _sigterm_in_call(real_loss, sigterm_at if rank == 1 else 0)
        try:
            losses = train(root, out, cfg)  # joins, then leaves, the process group
            torch.save({"losses": losses}, Path(out) / f"rank{rank}.pt")
        except TrainingInterrupted as e:
            torch.save({"stopped": e.step, "message": str(e)}, Path(out) / f"rank{rank}.pt")
        finally:
            model.train._loss = real_loss


def test_ddp_and_fsdp_on_gloo_two_processes(tmp_path: Path) -> None:
    root = make_corpus(tmp_path / "c", smooth_latents(MIX), text_dim=TEXT_DIM)
    ddp = TrainConfig(steps=3, lr=1e-2, token_budget=48, log_every=1, grad_accum=2)
    # FSDP with a validation loss: every rank runs the held-out batches (the same count)
    fsdp = TrainConfig(
        steps=2, lr=1e-2, token_budget=48, log_every=1, fsdp=True, val_samples=2, val_every=1
    )
    jobs = [
        (_free_port(), str(root), str(tmp_path / name), cfg, sigterm_at)
        for name, cfg, sigterm_at in (
            ("ddp", ddp, 0),
            ("fsdp", fsdp, 0),
            ("stop", dataclasses.replace(ddp, steps=6, grad_accum=1), 2),
        )
    ]
    mp.spawn(_worker, args=(2, jobs), nprocs=2, join=True)
    # SIGTERM to one rank: both stop after the same step, and one checkpoint holds it
    ranks = [torch.load(tmp_path / "stop" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == 2
    assert ranks[1]["message"].startswith("SIGTERM: stopped after step 2 of 6")
    assert ranks[0]["message"].startswith("a signal to another rank: stopped after step 2")
    state = torch.load(tmp_path / "stop" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and len(state["rng"]) == 2
    for name, steps in (("ddp", 3), ("fsdp", 2)):
        ranks = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True) for r in range(2)]
        # losses are averaged over ranks, so both report the same curve
        assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == steps
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert len(state["rng"]) == 2 and len(state["loader"]) == 2
        # each rank drew its own noise: the saved generator states differ
        assert not torch.equal(state["rng"][0]["generator"], state["rng"][1]["generator"])
        # the saved model and EMA are full (gathered), loadable without a process group
        model, _ = load_checkpoint(str(tmp_path / name / "checkpoint.pt"), ema=True)
        assert set(state["ema"]) == {n for n, _ in model.named_parameters()}
        assert state["model"]["x_embedder.weight"].shape == model.x_embedder.weight.shape
    records = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").open()]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [step for step, _ in val] == [1, 2] and all(math.isfinite(v) for _, v in val)


def test_samples_over_the_budget_are_cropped_or_named_in_the_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(make_corpus(tmp_path / "c", smooth_latents(MIX), text_dim=TEXT_DIM))
    # three of MIX's latents take 12 or 18 tokens: more than a budget of 10
    crop = TrainConfig(steps=2, lr=1e-2, token_budget=10, log_every=1, oversize="crop")
    losses = train(root, str(tmp_path / "crop"), crop)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    out = capsys.readouterr().out
    assert "3 cropped to fit" in out and "skipped" not in out
    train(root, str(tmp_path / "skip"), dataclasses.replace(crop, oversize="skip"))
    assert "3 skipped as over the token budget" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"all 8 samples are larger than the token budget \(3\)"):
        train(root, str(tmp_path / "none"), TrainConfig(steps=1, token_budget=3))
    assert not (tmp_path / "none").exists()  # nothing written for a run that never began
    odd = str(make_corpus(tmp_path / "odd", [torch.randn(4, 1, 3, 5), torch.randn(4, 2, 2, 3)]))
    with pytest.raises(
        ValueError, match=r"all 2 samples are not divisible by the patch \(1, 2, 2\)"
    ):
        train(odd, str(tmp_path / "odd-run"), TrainConfig(steps=1, token_budget=64))
    with pytest.raises(ValueError, match="oversize 'shrink' is not one of"):
        TrainConfig(oversize="shrink").validate()


def test_a_rank_left_without_a_sequence_is_told_why(tmp_path: Path) -> None:
    """Eight samples packed into one sequence leave the second of two ranks nothing to
    train on: the error counts the sequences and ranks, not "no kept samples"."""
    from model.loader import PackedLoader
    from model.train import _Stream

    root = str(make_corpus(tmp_path / "c", smooth_latents(MIX), text_dim=TEXT_DIM))
    loader = PackedLoader(root, token_budget=4096, rank=1, world_size=2)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "no batch for this rank: the epoch's 8 samples pack into 1 sequence of 4096 tokens, "
            "fewer than the 2 ranks; a smaller --token-budget makes more"
        ),
    ):
        next(_Stream(loader, 0, True, root))


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("log_every", 0, "log_every must be positive, not 0"),
        ("steps", 0, "steps must be positive, not 0"),
        ("token_budget", -4, "token_budget must be positive, not -4"),
        ("lr", -1.0, "lr must be a positive number, not -1.0"),
        ("lr", float("nan"), "lr must be a positive number, not nan"),
        ("timestep_std", 0.0, "timestep_std must be a positive number, not 0.0"),
        ("timestep_mean", float("inf"), "timestep_mean must be a number, not inf"),
        ("ema_decay", 1.0, "ema_decay must be in [0, 1), not 1.0"),
        ("caption_dropout", 2.0, "caption_dropout must be in [0, 1], not 2.0"),
        ("min_lr_ratio", 1.5, "min_lr_ratio must be in [0, 1], not 1.5"),
        ("shuffle_buffer", -1, "shuffle_buffer must be >= 0, not -1"),
        ("grad_clip", -0.5, "grad_clip must be >= 0, not -0.5"),
        ("warmup_steps", -2, "warmup_steps must be >= 0, not -2"),
        ("seed", -5, "seed must be >= 0, not -5"),
        # was: trained on the CPU without a word
        ("device", "mps", "device 'mps' is not auto, cpu, cuda or cuda:N"),
        ("precision", "fp16", "precision 'fp16' is not one of ('auto', 'bf16', 'fp32')"),
    ],
)
def test_a_config_value_out_of_range_is_named_before_training(
    field: str, value: float, words: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        dataclasses.replace(TrainConfig(), **{field: value}).validate()
    TrainConfig().validate()  # the defaults are valid


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("lr: abc\n", "lr must be float, got 'abc'"),
        ("steps: 2.5\n", "steps must be int, got 2.5"),
        ("steps: true\n", "steps must be int, got True"),
        ("fsdp: 1\n", "fsdp must be bool, got 1"),
        ("device: 0\n", "device must be str, got 0"),
    ],
)
def test_a_config_value_of_the_wrong_type_is_named(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {words}")):
        load_train_config(str(path))
    path.write_text("lr: 1\nsteps: 3\n")  # an int is a fine float
    cfg = load_train_config(str(path))
    assert (cfg.lr, cfg.steps) == (1.0, 3) and isinstance(cfg.lr, float)


def test_a_checkpoint_from_before_a_new_field_resumes_with_its_default(tmp_path: Path) -> None:
    root = str(make_corpus(tmp_path / "c", smooth_latents(MIX), text_dim=TEXT_DIM))
    out = tmp_path / "run"
    cfg = TrainConfig(steps=1, lr=1e-2, token_budget=48)
    train(root, str(out), cfg)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["config"]["train"]["oversize"]  # as a checkpoint written before the field
    torch.save(state, out / "checkpoint.pt")
    assert len(train(root, str(out), dataclasses.replace(cfg, steps=2), resume=True)) == 1
    with pytest.raises(ValueError, match=r"cannot resume with changed \['oversize'\]"):
        train(root, str(out), dataclasses.replace(cfg, steps=3, oversize="crop"), resume=True)


def test_the_default_device_is_the_gpu_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from model.train import _setup_distributed

    assert _setup_distributed(TrainConfig()).device == torch.device("cpu")
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert _setup_distributed(TrainConfig()).device == torch.device("cuda", 0)
    assert _setup_distributed(TrainConfig(device="cpu")).device == torch.device("cpu")
    assert chosen == [torch.device("cuda", 0)]


def test_a_cuda_device_torch_cannot_see_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from model.device import resolve_device
    from model.train import _setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'cuda': torch sees 0 CUDA device\(s\) \(no GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"device 'cuda:0': torch sees 0"):
        _setup_distributed(TrainConfig(device="cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"device 'cuda:2': torch sees 2 CUDA device\(s\)$"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match=r"device 'tpu': not a torch device; use auto, cpu"):
        resolve_device("tpu")  # was torch's RuntimeError listing its twenty device types


def test_one_rule_resolves_a_model_stage_device_and_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Caption, upsample, encode and the text encoder resolve "auto" one way: bfloat16 on
    CUDA, float32 elsewhere; a GPU torch cannot see is named (the text encoder too)."""
    from model.device import resolve_device_dtype
    from model.text import TextEncoder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "float16") == (torch.device("cpu"), torch.float16)
    with pytest.raises(ValueError, match=r"unknown torch dtype 'float17'"):
        resolve_device_dtype("cpu", "float17")
    with pytest.raises(ValueError, match=r"device 'cuda': torch sees 0 CUDA device"):
        TextEncoder.from_pretrained("any/model", device="cuda")  # before any download
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device_dtype("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device_dtype("cuda:0", "float32") == (torch.device("cuda", 0), torch.float32)


def test_a_corrupt_sample_stops_the_run_or_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sample whose latents fail their CRC stops a run with its name and the way on;
    with skip_corrupt (which a stopped run may resume with) it is left out and named."""
    import tarfile

    from model.train import RESUMABLE_CHANGES

    root = make_corpus(tmp_path / "c", smooth_latents(MIX[:4]))
    shard = root / schemas.SHARDS_DIR / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"clip0002.{schemas.SAMPLE_LATENTS}")
    with open(shard, "r+b") as f:
        f.seek(member.offset_data + member.size - 8)
        f.write(bytes(8))
    cfg = TrainConfig(steps=4, token_budget=64, log_every=1, device="cpu")
    with pytest.raises(ValueError, match=r"sample 'clip0002': .*CRC-32.*--skip-corrupt"):
        train(str(root), str(tmp_path / "stopped"), cfg)
    assert "skip_corrupt" in RESUMABLE_CHANGES
    skipping = dataclasses.replace(cfg, skip_corrupt=True)
    with caplog.at_level("WARNING", logger="model.loader"):
        losses = train(str(root), str(tmp_path / "run"), skipping)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert any("sample 'clip0002'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_a_lost_shard_stops_the_run_naming_it_or_leaves_every_sample_out(
    tmp_path: Path, damage: str
) -> None:
    root = make_corpus(tmp_path / "c", smooth_latents(MIX[:4]))
    shard = root / schemas.SHARDS_DIR / "shard-000000.tar"
    if damage == "missing":
        shard.unlink()
        why = "the shard is missing"
    else:
        os.truncate(shard, 700)
        why = r"the shard cannot be read from here on \(.+\)"
    cfg = TrainConfig(steps=2, token_budget=64, device="cpu")
    with pytest.raises(
        ValueError, match=rf"shard-000000.tar: sample '\w+': {why} .*--skip-corrupt"
    ):
        train(str(root), str(tmp_path / "stopped"), cfg)
    with pytest.raises(ValueError, match=r"no batch: all 4 samples .* left out as unreadable"):
        train(str(root), str(tmp_path / "run"), dataclasses.replace(cfg, skip_corrupt=True))


def test_a_bool_flag_alone_is_true_and_takes_a_value() -> None:
    import argparse

    from model.train import add_config_flags

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    assert parser.parse_args(["--skip-corrupt"]).skip_corrupt is True
    assert parser.parse_args(["--skip-corrupt", "false", "--fsdp", "yes"]).skip_corrupt is False
    assert parser.parse_args(["--fsdp", "yes"]).fsdp is True
    assert parser.parse_args([]).skip_corrupt is None  # unset: the config file's value


def test_mapped_reads_take_the_legacy_format_too(tmp_path: Path) -> None:
    """``load_weights(mmap=True)`` maps a zip-format file and reads a legacy one whole."""
    from model.weights import load_weights

    for zipped in (True, False):
        path = tmp_path / f"w{zipped}.pt"
        torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=zipped)
        got = load_weights(path, "weights", mmap=True)
        assert torch.equal(got["w"], torch.arange(4.0))
