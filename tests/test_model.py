"""model.data / dit / flow / train: shards written here, packing, block-diagonal DiT, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

import schemas
from model.data import PackStats, Sample, iter_samples, pack, patchify, read_manifest, unpatchify
from model.dit import DIT_PRESETS, DiTConfig, apply_rope, build_dit, rope_3d
from model.flow import flow_loss, interpolate, per_sample_mean, sample_timesteps, velocity_target
from model.train import TrainConfig, load_checkpoint, train

C = 4  # latent channels of the synthetic corpora
PATCH = (1, 2, 2)


# --- synthetic corpora -----------------------------------------------------------------
def write_corpus(
    root: Path,
    latents: list[torch.Tensor],
    *,
    per_shard: int = 2,
    channels: int = C,
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A corpus laid out as schemas says: manifest.json + shards/*.tar of bf16 latents."""
    (root / schemas.SHARDS_DIR).mkdir(parents=True)
    manifest = {
        "schema_version": schemas.SCHEMA_VERSION,
        "patch_size": list(PATCH),
        "vae": {"latent_channels": channels},
    }
    (root / schemas.MANIFEST_NAME).write_text(json.dumps(manifest))
    for shard_start in range(0, len(latents), per_shard):
        path = root / schemas.SHARDS_DIR / f"shard-{shard_start // per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard_start, min(shard_start + per_shard, len(latents))):
                tensor = latents[i].to(torch.bfloat16).contiguous()
                sample = {
                    "__key__": f"clip{i:04d}",
                    schemas.SAMPLE_LATENTS: save_safetensors({schemas.TENSOR_LATENTS: tensor}),
                    schemas.SAMPLE_META: json.dumps(
                        {"clip_id": f"clip{i:04d}", "latent_shape": list(tensor.shape)}
                    ).encode(),
                    schemas.SAMPLE_CAPTION: f"caption {i}".encode(),
                    **(extra or {}),
                }
                sink.write(sample)
    return root


def _latents(shapes: list[tuple[int, int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # bf16-representable values, so what is read back equals what was written
    return [torch.randn(C, *s, generator=g).to(torch.bfloat16).float() for s in shapes]


# --- reading -------------------------------------------------------------------------------
def test_iter_samples_reads_back_what_was_written(tmp_path: Path) -> None:
    lat = _latents([(1, 2, 2), (2, 4, 6), (3, 2, 4)])
    root = write_corpus(tmp_path / "c", lat)
    assert read_manifest(str(root))["patch_size"] == list(PATCH)
    samples = list(iter_samples(str(root)))
    assert [s.key for s in samples] == ["clip0000", "clip0001", "clip0002"]
    for s, expected in zip(samples, lat, strict=True):
        assert s.latents.dtype == torch.float32
        assert torch.equal(s.latents, expected)
    assert samples[1].caption == "caption 1"
    assert samples[1].meta["latent_shape"] == [C, 2, 4, 6]


def test_a_damaged_manifest_is_named(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "c", _latents([(1, 2, 2)]))
    path = root / "manifest.json"
    for text, why in [("{bad", "is not JSON"), ("[1, 2]", "is not a JSON object")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"manifest.json: the corpus manifest {why}"):
            read_manifest(str(root))


def test_iter_samples_refuses_unknown_members(tmp_path: Path) -> None:
    # A pickle in a shard must never be loaded, whatever its suffix promises.
    root = write_corpus(tmp_path / "c", _latents([(1, 2, 2)]), extra={"pyd": b"\x80\x04K\x01."})
    with pytest.raises(ValueError, match=r"clip0000.*\['pyd'\]"):
        list(iter_samples(str(root)))
    # the error policy is explicit: skipping is a choice
    assert list(iter_samples(str(root), handler=wds.ignore_and_continue)) == []


def test_iter_samples_checks_channels_against_manifest(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "c", _latents([(1, 2, 2)]), channels=C + 1)
    with pytest.raises(ValueError, match="latent channels"):
        list(iter_samples(str(root)))


def test_missing_manifest_and_shards(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest"):
        list(iter_samples(str(tmp_path)))
    (tmp_path / schemas.MANIFEST_NAME).write_text(
        json.dumps({"patch_size": [1, 2, 2], "vae": {"latent_channels": C}})
    )
    with pytest.raises(FileNotFoundError, match="shards"):
        list(iter_samples(str(tmp_path)))


# --- patches and packing ---------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    patch=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    channels=st.integers(1, 4),
)
def test_patchify_round_trip(
    patch: tuple[int, int, int], grid: tuple[int, int, int], channels: int
) -> None:
    shape = (channels, *(g * p for g, p in zip(grid, patch, strict=True)))
    x = torch.arange(int(torch.tensor(shape).prod())).reshape(shape).float()
    tokens, positions = patchify(x, patch)
    n = grid[0] * grid[1] * grid[2]
    assert tokens.shape == (n, channels * patch[0] * patch[1] * patch[2])
    assert positions.dtype == torch.int64 and positions.shape == (n, 3)
    assert torch.equal(unpatchify(tokens, grid, patch, channels), x)
    # a token holds exactly the cells of its patch, at its position
    for i in (0, n - 1):
        t, h, w = positions[i].tolist()
        cells = x[
            :,
            t * patch[0] : (t + 1) * patch[0],
            h * patch[1] : (h + 1) * patch[1],
            w * patch[2] : (w + 1) * patch[2],
        ]
        assert sorted(tokens[i].tolist()) == sorted(cells.flatten().tolist())


def test_patchify_refuses_indivisible() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(C, 1, 3, 4), (1, 2, 2))


def _samples(shapes: list[tuple[int, int, int]]) -> list[Sample]:
    return [
        Sample(key=f"s{i}", latents=x, caption=f"c{i}", meta={})
        for i, x in enumerate(_latents(shapes, seed=1))
    ]


def test_pack_respects_budget_and_loses_nothing() -> None:
    # tokens per sample at patch (1, 2, 2): t * h/2 * w/2
    shapes = [(1, 4, 4), (2, 4, 6), (1, 2, 2), (4, 8, 8), (3, 4, 4), (1, 6, 2), (2, 2, 2)]
    samples = _samples(shapes)  # 4, 12, 1, 64 (over budget), 12, 3, 2 tokens
    stats = PackStats()
    batches = list(pack(samples, token_budget=16, patch=PATCH, stats=stats))
    assert stats.samples_skipped == 1 and stats.skipped_keys == ["s3"]
    assert stats.samples_packed == 6 and stats.batches == len(batches)

    seen = {}
    for b in batches:
        assert b.num_tokens <= 16
        assert b.cu_seqlens.dtype == torch.int32 and int(b.cu_seqlens[-1]) == b.num_tokens
        assert b.positions.shape == (b.num_tokens, 3) and b.sample_ids.shape == (b.num_tokens,)
        for i, key in enumerate(b.keys):
            lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
            assert torch.equal(b.sample_ids[lo:hi], torch.full((hi - lo,), i))
            seen[key] = unpatchify(b.tokens[lo:hi], b.grids[i], PATCH, C)
            assert b.captions[i] == f"c{key[1:]}"
    assert sorted(seen) == ["s0", "s1", "s2", "s4", "s5", "s6"]
    for s in samples:
        if s.key in seen:
            assert torch.equal(seen[s.key], s.latents)
    # greedy in order: [s0 s1] [s2 s4 ... ] never splits a sample and keeps order
    assert [k for b in batches for k in b.keys] == ["s0", "s1", "s2", "s4", "s5", "s6"]


# --- DiT -------------------------------------------------------------------------------
def _randomise(model: torch.nn.Module) -> None:
    # DiT zero-initialises its output and gates, making every output 0: comparisons
    # between outputs would pass trivially. Give every weight a random value instead.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_dit_starts_at_zero() -> None:
    model = build_dit("DiT-tiny", in_channels=C, patch_size=PATCH)
    b = next(pack(_samples([(2, 4, 4)]), 64, PATCH))
    out = model(b.tokens, b.positions, b.sample_ids, torch.tensor([0.5]))
    assert out.shape == b.tokens.shape and not out.any()


def test_dit_packed_equals_each_sample_alone() -> None:
    model = build_dit("DiT-tiny", in_channels=C, patch_size=PATCH).eval()
    _randomise(model)
    samples = _samples([(2, 4, 6), (1, 2, 8), (3, 4, 4)])
    batch = next(pack(samples, 1000, PATCH))
    assert batch.num_samples == 3
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        packed = model(batch.tokens, batch.positions, batch.sample_ids, t)  # (N, D)
        for i in range(3):
            lo, hi = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
            alone = model(
                batch.tokens[lo:hi],
                batch.positions[lo:hi],
                torch.zeros(hi - lo, dtype=torch.long),
                t[i : i + 1],
            )
            torch.testing.assert_close(packed[lo:hi], alone, atol=1e-5, rtol=1e-4)
        # the test can fail: letting samples see each other changes the result
        mixed = model(batch.tokens, batch.positions, torch.zeros_like(batch.sample_ids), t[:1])
        lo, hi = int(batch.cu_seqlens[0]), int(batch.cu_seqlens[1])
        assert not torch.allclose(mixed[lo:hi], packed[lo:hi], atol=1e-3)


def test_rope_3d_is_relative() -> None:
    # q.k after RoPE depends only on the position difference, on every axis
    head_dim = 32
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, head_dim, generator=g), torch.randn(1, 1, head_dim, generator=g)

    def score(pq: list[int], pk: list[int]) -> float:
        cq, sq = rope_3d(torch.tensor([pq]), head_dim)
        ck, sk = rope_3d(torch.tensor([pk]), head_dim)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score([1, 2, 3], [0, 0, 0]) == pytest.approx(score([5, 7, 9], [4, 5, 6]), abs=1e-4)
    for axis in range(3):
        shifted = [0, 0, 0]
        shifted[axis] = 1
        assert score(shifted, [0, 0, 0]) != pytest.approx(score([0, 0, 0], [0, 0, 0]), abs=1e-3)


@pytest.mark.parametrize("preset", sorted(DIT_PRESETS))
def test_presets_have_usable_heads(preset: str) -> None:
    # building the big ones is slow; check their shapes through the config only
    if preset == "DiT-tiny":
        assert build_dit(preset, in_channels=C).config.depth == 2
    else:
        with torch.device("meta"):
            model = build_dit(preset, in_channels=16)
        cfg: DiTConfig = model.config
        assert cfg.hidden_size % cfg.num_heads == 0 and cfg.token_dim == 64


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown DiT preset"):
        build_dit("DiT-XXL")


# --- flow ------------------------------------------------------------------------------
def test_interpolation_endpoints_and_velocity() -> None:
    x0, noise = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.equal(interpolate(x0, noise, torch.zeros(5, 1)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(5, 1)), noise)
    # the velocity is the derivative of the path in t
    t = torch.full((5, 1), 0.3)
    finite_diff = (interpolate(x0, noise, t + 1e-3) - interpolate(x0, noise, t)) / 1e-3
    torch.testing.assert_close(finite_diff, velocity_target(x0, noise), atol=1e-2, rtol=1e-2)


def test_logit_normal_timesteps() -> None:
    t = sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert abs(float(t.median()) - 0.5) < 0.02
    # unlike uniform (5%), logit-normal(0, 1) puts ~0.16% of its mass below 0.05
    assert float((t < 0.05).float().mean()) < 0.01


def test_loss_is_averaged_per_sample_not_per_token() -> None:
    values = torch.tensor([1.0, 1.0, 1.0, 4.0])  # sample 0 has 3 tokens, sample 1 one token
    ids = torch.tensor([0, 0, 0, 1])
    torch.testing.assert_close(per_sample_mean(values, ids, 2), torch.tensor([1.0, 4.0]))

    # flow_loss with a model whose error is 1 per element on sample 0 and 3 on sample 1.
    # With x0 = 0, x_t = t * noise, so the true velocity (noise - x0) is x_t / t.
    def model(
        x_t: torch.Tensor, pos: torch.Tensor, sid: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return x_t / t[sid, None] + torch.where(sid == 0, 1.0, 3.0)[:, None]

    x0 = torch.zeros(4, 2)
    loss = flow_loss(
        model, x0, torch.zeros(4, 3, dtype=torch.long), ids, 2, torch.Generator().manual_seed(0)
    )
    assert float(loss) == pytest.approx((1.0 + 9.0) / 2, rel=1e-5)  # per token it would be 3.0


# --- training --------------------------------------------------------------------------
def test_train_loss_goes_down_on_a_repeated_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _latents([(2, 4, 4)], seed=3)[0]
    # 8 copies of one 8-token sample, 8 per packed sequence; the stream cycles epochs
    root = write_corpus(tmp_path / "corpus", [one] * 8, per_shard=3)
    out = tmp_path / "run"
    cfg = TrainConfig(preset="DiT-tiny", steps=100, lr=3e-3, token_budget=64, seed=0, log_every=25)
    losses = train(str(root), str(out), cfg)

    assert len(losses) == 100 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["25", "50", "75", "100"]
    assert all(line.split()[2] == "loss" and line.split()[4] == "tokens/s" for line in lines)

    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["steps"] == 100 and saved["model"]["in_channels"] == C
    model, config = load_checkpoint(str(out / "checkpoint.pt"))  # weights_only=True inside
    assert config == saved
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state["model"][name])


def test_train_refuses_a_corpus_where_nothing_fits(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "corpus", _latents([(2, 8, 8)]))  # 32 tokens
    with pytest.raises(ValueError, match="token budget"):
        train(str(root), str(tmp_path / "run"), TrainConfig(steps=2, token_budget=16))
