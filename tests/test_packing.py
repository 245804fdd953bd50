"""Packer invariants as property tests: `best_fit_pack` on sizes, and whole loader epochs
on generated corpora (no token lost or duplicated, budget respected, positions and
``cu_seqlens`` consistent), plus the ``pack-stats`` command."""

from __future__ import annotations

import contextlib
import json
import random
import re
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_loader import MIX, check_batch, tokens_of, write_corpus

from model.data import PackedLoader, PackStats, Sample, pack
from model.loader import best_fit_pack


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    budget=st.integers(1, 64),
    window=st.integers(1, 20),
    max_open=st.integers(1, 8),
)
def test_best_fit_pack_places_every_item_once_within_budget(
    data: st.DataObject, budget: int, window: int, max_open: int
) -> None:
    sizes = data.draw(st.lists(st.integers(1, budget), max_size=80))
    bins = best_fit_pack(sizes, budget, window, max_open)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert all(b and sum(sizes[i] for i in b) <= budget for b in bins)
    assert bins == best_fit_pack(sizes, budget, window, max_open)  # deterministic


def test_best_fit_pack_refuses_oversize_items() -> None:
    with pytest.raises(ValueError, match="budget is 4"):
        best_fit_pack([2, 5], 4)


def _realistic_sizes(n: int, budget: int) -> list[int]:
    """Token counts of a mix of aspects, pixel budgets and durations (VAE 8x4, patch 1x2x2)."""
    rng = random.Random(0)
    sizes = []
    for _ in range(n):
        aw, ah = rng.choice([(16, 9), (9, 16), (4, 3), (1, 1), (21, 9)])
        area = rng.choice([256 * 256, 384 * 384, 512 * 512])
        h, w = int((area * ah / aw) ** 0.5) // 16, int((area * aw / ah) ** 0.5) // 16
        t = 1 if rng.random() < 0.2 else rng.choice([3, 5, 9, 13, 17, 21])
        sizes.append(t * h * w)
    return [s for s in sizes if s <= budget]


def test_best_fit_beats_greedy_in_order_packing() -> None:
    # the same items through the old greedy in-order packer and the best-fit packer
    budget = 16384
    sizes = _realistic_sizes(1500, budget)
    bfd = best_fit_pack(sizes, budget, window=64)
    greedy_bins, used = 0, budget
    for s in sizes:
        if used + s > budget:
            greedy_bins, used = greedy_bins + 1, 0
        used += s
    pad_bfd = 1 - sum(sizes) / (len(bfd) * budget)
    pad_greedy = 1 - sum(sizes) / (greedy_bins * budget)
    assert pad_bfd < 0.02 and pad_greedy > 5 * pad_bfd, (pad_bfd, pad_greedy)


@settings(max_examples=12, deadline=None)
@given(
    shards=st.lists(st.lists(st.sampled_from(MIX), max_size=6), min_size=1, max_size=4).filter(
        lambda s: any(s)
    ),
    budget=st.integers(8, 40),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 3),
)
def test_loader_epoch_invariants(
    shards: list[list[tuple[int, int, int]]], budget: int, world_size: int, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        expected = write_corpus(Path(tmp) / "c", shards)
        root = str(Path(tmp) / "c")
        seen: Counter[str] = Counter()
        steps = set()
        for rank in range(world_size):
            loader = PackedLoader(
                root,
                token_budget=budget,
                rank=rank,
                world_size=world_size,
                seed=seed,
                shuffle_buffer=3,
                pack_buffer=4,
            )
            batches = list(loader)
            steps.add(len(batches))
            for b in batches:
                check_batch(b, expected, budget)  # tokens, positions, cu_seqlens, budget
                seen.update(b.keys)
        plan = loader.plan(0)
        assert len(steps) == 1
        assert max(seen.values(), default=1) == 1
        too_big = {
            k for k, e in expected.items() if tokens_of(e["row"]["latent_shape"][1:]) > budget
        }
        assert set(plan.skipped) == too_big
        assert set(seen) | set(plan.dropped) | too_big == set(expected)
        assert len(plan.bins) - world_size * plan.per_rank < world_size


def test_legacy_pack_reports_padding() -> None:
    import torch

    samples = [
        Sample(key=f"s{i}", latents=torch.zeros(4, 1, 2, 2 * n), caption="", meta={})
        for i, n in enumerate([3, 3, 2])
    ]
    stats = PackStats()
    assert stats.summary() == "0 samples in 0 packed sequences"  # no "nan% padding"
    batches = list(pack(samples, 4, (1, 2, 2), stats))
    assert [b.num_tokens for b in batches] == [3, 3, 2]
    assert [b.num_padding for b in batches] == [1, 1, 2]
    assert stats.padding_fraction() == pytest.approx(4 / 12)
    assert stats.summary() == "3 samples in 3 packed sequences (8 tokens, 33.3% padding)"
    stats.skip("big-1")
    stats.samples_cropped = 2
    assert stats.summary().endswith(
        "; 1 skipped as over the token budget, 2 cropped to fit (skipped: big-1)"
    )


def test_pack_stats_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from reelpack import cli

    write_corpus(tmp_path / "c", [MIX, [*MIX[:3], (8, 8, 8)]])  # one sample of 128 tokens
    code = cli.main(["pack-stats", str(tmp_path / "c"), "--budget", "32", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples_indexed"] == 12 and out["samples_skipped"] == 1
    assert out["samples_packed"] + out["samples_dropped_at_epoch_end"] == 11
    assert out["sequences"] == out["steps_per_epoch"] > 0
    assert 0 <= out["padding_fraction"] < 1 and out["tokens_per_s"] > 0
    code = cli.main(["pack-stats", str(tmp_path / "c"), "--budget", "32", "--oversize", "crop"])
    text = capsys.readouterr().out
    assert code == 0 and "samples_cropped" in text and "padding_fraction" in text
    # a patch the latents do not divide into: counted as such, not as over the budget
    code = cli.main(["pack-stats", str(tmp_path / "c"), "--budget", "32", "--patch", "1,4,4"])
    text = capsys.readouterr().out
    assert code == 0 and re.search(r"samples_not_divisible_by_patch +8\n", text), text
    assert re.search(r"samples_skipped +0\n", text)
    assert cli.main(["pack-stats", str(tmp_path / "nothing"), "--budget", "8"]) == 2
    # without --budget, train's default budget: every sample fits, none is skipped
    assert cli.main(["pack-stats", str(tmp_path / "c"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_budget"] == 4096 and out["samples_skipped"] == 0
    capsys.readouterr()
    # settings out of range are named, not clamped or ignored
    for flags, words in [
        (["--limit", "0"], "--limit must be positive, got 0"),
        (["--pack-buffer", "0"], "pack_buffer must be positive, got 0"),
        (["--workers", "-1"], "num_workers must be >= 0, got -1"),
        (["--patch", "a,b"], "--patch wants pt,ph,pw (positive), got 'a,b'"),
    ]:
        with contextlib.suppress(SystemExit):  # argparse exits 2 on a bad --patch
            assert cli.main(["pack-stats", str(tmp_path / "c"), "--budget", "32", *flags]) == 2
        assert words in capsys.readouterr().err
    # a shard lost: a named stop, or with --skip-corrupt its samples counted as left out
    next((tmp_path / "c" / "shards").glob("*.tar")).unlink()
    args = ["pack-stats", str(tmp_path / "c"), "--budget", "32", "--json"]
    assert cli.main(args) == 2
    assert "the shard is missing" in capsys.readouterr().err
    assert cli.main([*args, "--skip-corrupt"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples_corrupt"] > 0 and "the shard is missing" in out["corrupt_examples"][0]
