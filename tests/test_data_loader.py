"""model.loader.PackedLoader: index-planned epochs, rank/worker splits, resume, S3, policies.

Corpora are written here exactly as the corpus writer lays them out (webdataset shards,
``index/part-*.parquet`` in ``schemas.CLIP_SCHEMA``, ``sources/`` markers, manifest),
without Ray.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors

import schemas
from model.data import PackedBatch, PackedLoader, patchify, unpatchify
from model.loader import WHERE_SKIPS, attention_cost, read_catalog

C = 4
PATCH = (1, 2, 2)


# --- corpus builder --------------------------------------------------------------------------
def _tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # bf16-representable, so what is read back equals what was written
    return torch.randn(*shape, generator=g).to(torch.bfloat16).float()


def write_corpus(
    root: Path,
    shards: list[list[tuple[int, int, int]]],
    *,
    text_dim: int = 0,
    alt: dict[str, tuple[int, int, int]] | None = None,
    rejected: int = 0,
    extra_columns: bool = True,
) -> dict[str, dict[str, Any]]:
    """Shards of kept samples with (T, H, W) latent grids; returns key -> expected data.

    Every sample's ``latents@...`` alternatives: one per ``alt`` entry (name -> T,H,W),
    added to samples whose own size is larger. ``rejected`` rows without shards are
    added to the first index part.
    """
    for d in (schemas.SHARDS_DIR, schemas.INDEX_DIR, schemas.SOURCES_DIR):
        (root / d).mkdir(parents=True, exist_ok=True)
    manifest = {"schema_version": 1, "patch_size": list(PATCH), "vae": {"latent_channels": C}}
    (root / schemas.MANIFEST_NAME).write_text(json.dumps(manifest))
    expected: dict[str, dict[str, Any]] = {}
    n = 0
    for s, shapes in enumerate(shards):
        rel = f"{schemas.SHARDS_DIR}/shard-{s:06d}.tar"
        rows = []
        with wds.TarWriter(str(root / rel), encoder=False) as sink:
            for thw in shapes:
                key = f"clip{n:04d}"
                tensors = {schemas.TENSOR_LATENTS: _tensor((C, *thw), n).to(torch.bfloat16)}
                alts = []
                for name, a in (alt or {}).items():
                    if math.prod(a) < math.prod(thw):
                        tensors[name] = _tensor((C, *a), 1000 + n).to(torch.bfloat16)
                        alts.append((name, [C, *a]))
                if text_dim:
                    tensors[schemas.TENSOR_TEXT_EMBEDS] = _tensor((1 + n % 3, text_dim), 2000 + n)
                row: dict[str, Any] = {
                    "clip_id": key,
                    "source": f"/videos/v{n}.mp4",
                    "status": "kept",
                    "caption": f"caption {n}",
                    "latent_shape": [C, *thw],
                    "shard": rel,
                    "key": key,
                    "num_tokens": thw[0] * thw[1] // 2 * thw[2] // 2,
                    schemas.score_column("aesthetic"): float(n % 10),
                }
                if extra_columns:
                    row["extra_latents"] = [a[0] for a in alts]
                    row["extra_latent_shapes"] = [a[1] for a in alts]
                rows.append(row)
                sink.write(
                    {
                        "__key__": key,
                        schemas.SAMPLE_LATENTS: save_safetensors(tensors),
                        schemas.SAMPLE_META: json.dumps(row).encode(),
                        schemas.SAMPLE_CAPTION: row["caption"].encode(),
                    }
                )
                expected[key] = {k: v.float() for k, v in tensors.items()} | {"row": row}
                n += 1
        if s == 0:
            rows += [
                {"clip_id": f"rej{i}", "source": f"/videos/r{i}.mp4", "status": "rejected"}
                for i in range(rejected)
            ]
        _write_part(root, s, rows)
    return expected


def _write_part(root: Path, n: int, rows: list[dict[str, Any]]) -> None:
    schema = schemas.CLIP_SCHEMA
    if not all("extra_latents" in r for r in rows if r["status"] == "kept"):
        schema = pa.schema([f for f in schema if not f.name.startswith("extra_")])
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema),
        root / schemas.INDEX_DIR / f"part-{n:06d}.parquet",
    )
    sources = sorted({r["source"] for r in rows})
    pq.write_table(
        pa.Table.from_pylist(
            [{"source": s, "status": "done"} for s in sources], schema=schemas.SOURCE_SCHEMA
        ),
        root / schemas.SOURCES_DIR / f"part-{n:06d}.parquet",
    )


def tokens_of(thw: tuple[int, int, int]) -> int:
    return thw[0] * (thw[1] // 2) * (thw[2] // 2)


# a mix of images (T = 1) and videos of several aspects: 2..24 tokens each
MIX = [(1, 4, 4), (3, 4, 6), (1, 2, 8), (2, 6, 4), (4, 4, 4), (1, 6, 6), (2, 2, 2), (3, 2, 6)]
UNEVEN = [MIX[:1], MIX * 2, MIX[2:4], MIX[1:6], [], MIX[3:8] + MIX[:2]]  # 1, 16, 2, 5, 0, 7


def _all(loader: PackedLoader) -> list[PackedBatch]:
    return list(loader)


def check_batch(b: PackedBatch, expected: dict[str, dict[str, Any]], budget: int) -> None:
    """Packer invariants for one batch against the stored latents."""
    assert 0 < b.num_tokens <= budget and b.token_budget == budget
    assert b.num_padding == budget - b.num_tokens
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens[0] == 0
    assert int(b.cu_seqlens[-1]) == b.num_tokens
    assert torch.equal(
        b.sample_ids, torch.repeat_interleave(torch.arange(b.num_samples), b.cu_seqlens.diff())
    )
    assert b.timesteps is not None and b.timesteps.shape == (b.num_samples,)
    for i, key in enumerate(b.keys):
        lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
        lat = expected[key][schemas.TENSOR_LATENTS]
        assert b.policies[i] == ""
        _, positions = patchify(lat, PATCH)
        assert torch.equal(b.positions[lo:hi], positions)  # (t, h, w) within the sample
        assert torch.equal(unpatchify(b.tokens[lo:hi], b.grids[i], PATCH, C), lat)
        assert b.captions[i] == expected[key]["row"]["caption"]


# --- catalog -----------------------------------------------------------------------------------
def test_catalog_keeps_kept_rows_and_later_parts_win(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_corpus(root, [MIX[:3], MIX[3:5]], rejected=2)
    # part 2 re-lists the source of clip0000 as rejected: it supersedes part 0's row
    _write_part(root, 2, [{"clip_id": "x", "source": "/videos/v0.mp4", "status": "rejected"}])
    # a part without its sources/ commit marker is a killed writer's leftover: ignored
    pq.write_table(
        pa.Table.from_pylist(
            [{"clip_id": "clip0001", "source": "/videos/v1.mp4", "status": "rejected"}],
            schema=schemas.CLIP_SCHEMA,
        ),
        root / schemas.INDEX_DIR / "part-000003.parquet",
    )
    keys = [e.key for e in read_catalog(str(root))]
    assert keys == ["clip0001", "clip0002", "clip0003", "clip0004"]
    seen: list[dict] = []

    def aesthetic(row: dict) -> bool:
        seen.append(row)
        return row[schemas.score_column("aesthetic")] >= 3

    good = read_catalog(str(root), where=aesthetic)
    assert [e.key for e in good] == ["clip0003", "clip0004"]
    # the predicate sees every index column but the embeddings (large, and left out)
    assert set(seen[0]) == set(schemas.CLIP_SCHEMA.names) - {"clip_embedding"}
    assert seen[0]["caption"] and "clip_embedding" in WHERE_SKIPS


# --- invariants, exactly once, equal steps -------------------------------------------------------
def test_batches_hold_the_stored_latents(tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "c", UNEVEN, text_dim=3)
    loader = PackedLoader(str(tmp_path / "c"), token_budget=32, seed=1, shuffle_buffer=4)
    batches = _all(loader)
    assert batches and len(batches) == loader.stats.batches
    for b in batches:
        check_batch(b, expected, 32)
        assert b.text_embeds is not None and b.text_cu_seqlens is not None
        for i, key in enumerate(b.keys):
            lo, hi = int(b.text_cu_seqlens[i]), int(b.text_cu_seqlens[i + 1])
            assert torch.equal(b.text_embeds[lo:hi], expected[key][schemas.TENSOR_TEXT_EMBEDS])
    # images and videos share sequences
    assert any({g[0] == 1 for g in b.grids} == {True, False} for b in batches)
    s = loader.stats
    assert s.samples_packed == len(expected) and s.samples_skipped == 0
    assert s.tokens == sum(
        tokens_of(tuple(e["row"]["latent_shape"][1:])) for e in expected.values()
    )
    assert s.padding_fraction() == pytest.approx(s.padding_tokens / (s.tokens + s.padding_tokens))


def test_three_ranks_two_workers_exactly_once_equal_steps(tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "c", UNEVEN)
    root = str(tmp_path / "c")
    orders = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(3):
            loader = PackedLoader(
                root, token_budget=24, rank=rank, world_size=3, num_workers=2, seed=7
            )
            loader.set_epoch(epoch)
            per_rank.append([b.keys for b in loader])
            assert len(per_rank[-1]) == len(loader)
        plan = loader.plan(epoch)
        assert len({len(r) for r in per_rank}) == 1  # equal steps: no DDP hang
        seen = Counter(k for r in per_rank for keys in r for k in keys)
        assert max(seen.values()) == 1  # nothing twice
        # everything once, except the bounded drop: < world_size sequences at the end
        assert set(seen) | set(plan.dropped) == set(expected)
        assert not set(seen) & set(plan.dropped)
        assert len(plan.bins) - 3 * plan.per_rank < 3
        orders.append([k for r in per_rank for keys in r for k in keys])
    assert orders[0] != orders[1]  # each epoch has its own order (seeded by epoch)


def test_worker_count_does_not_change_the_stream(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", UNEVEN)
    a = _all(PackedLoader(str(tmp_path / "c"), token_budget=20, num_workers=0))
    b = _all(PackedLoader(str(tmp_path / "c"), token_budget=20, num_workers=2))
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(a, b, strict=True))


def test_drop_last_false_pads_ranks_and_drops_nothing(tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "c", UNEVEN)
    root = str(tmp_path / "c")
    per_rank = [
        [b.keys for b in PackedLoader(root, token_budget=24, rank=r, world_size=4, drop_last=False)]
        for r in range(4)
    ]
    assert len({len(r) for r in per_rank}) == 1
    assert {k for r in per_rank for ks in r for k in ks} == set(expected)


# --- resume ------------------------------------------------------------------------------------
def test_resume_mid_epoch_is_exact_with_other_worker_count(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", UNEVEN, text_dim=2)
    root = str(tmp_path / "c")
    kw: dict[str, Any] = {"token_budget": 20, "seed": 3, "token_drop": 0.3, "world_size": 2}
    full = PackedLoader(root, **kw)
    straight = [b for _ in range(2) for b in full]  # two epochs without a stop
    first = PackedLoader(root, **kw)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # JSON round trip, like a checkpoint
    assert state["epoch"] == 0 and state["position"] == 3
    resumed = PackedLoader(root, **kw, num_workers=2)
    resumed.load_state_dict(state)
    tail = [b for _ in range(2) for b in resumed][: len(straight) - 3]
    assert len(head) + len(tail) == len(straight)
    for x, y in zip(head + tail, straight, strict=True):
        assert x.keys == y.keys and x.batch_seed == y.batch_seed
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.positions, y.positions)
        assert x.keep_index is not None and y.keep_index is not None
        assert torch.equal(x.keep_index, y.keep_index)
    assert resumed.epoch == 2 and resumed.state_dict()["position"] == 0


def test_resume_refuses_other_settings_and_rescales_world_size(tmp_path: Path) -> None:
    write_corpus(tmp_path / "c", UNEVEN)
    root = str(tmp_path / "c")
    a = PackedLoader(root, token_budget=12, world_size=2)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    with pytest.raises(ValueError, match="other settings"):
        PackedLoader(root, token_budget=16, world_size=2).load_state_dict(state)
    b = PackedLoader(root, token_budget=12, world_size=1)
    with pytest.warns(UserWarning, match="same fraction"):
        b.load_state_dict(state)
    assert b.position == round(2 / len(a) * len(b))


# --- policies, dropping, balance -----------------------------------------------------------------
def test_oversize_policies(tmp_path: Path) -> None:
    # 36 and 48 tokens (over a budget of 16) among small ones; 16x16 alternative of 4 tokens
    shards = [[(1, 4, 4), (4, 6, 6), (1, 2, 2)], [(3, 8, 8), (2, 4, 4)]]
    big = {"clip0001", "clip0003"}
    alt = {"latents@64x64": (1, 4, 4)}
    for extra_columns in (True, False):  # from the index, or probed from the blob header
        root = tmp_path / f"c{extra_columns}"
        expected = write_corpus(root, shards, alt=alt, extra_columns=extra_columns)
        skip = PackedLoader(str(root), token_budget=16)
        assert {k for b in skip for k in b.keys} == set(expected) - big
        assert skip.stats.samples_skipped == 2 and set(skip.stats.skipped_keys) == big

        crop = PackedLoader(str(root), token_budget=16, oversize="crop")
        got = {k: (b, i) for b in crop for i, k in enumerate(b.keys)}
        assert set(got) == set(expected) and crop.stats.samples_cropped == 2
        b, i = got["clip0001"]  # 9 tokens per frame: keeps 1 frame of 4
        assert b.grids[i] == (1, 3, 3) and b.policies[i] == "crop"
        lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
        lat = expected["clip0001"][schemas.TENSOR_LATENTS][:, :1]
        assert torch.equal(unpatchify(b.tokens[lo:hi], (1, 3, 3), PATCH, C), lat)

        down = PackedLoader(str(root), token_budget=16, oversize="downscale")
        got = {k: (b, i) for b in down for i, k in enumerate(b.keys)}
        assert down.stats.samples_downscaled == 2 and set(got) == set(expected)
        b, i = got["clip0003"]
        assert b.policies[i] == "downscale" and b.grids[i] == (1, 2, 2)
        lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
        assert torch.equal(
            unpatchify(b.tokens[lo:hi], (1, 2, 2), PATCH, C), expected["clip0003"]["latents@64x64"]
        )
    # no stored alternative that fits: skipped and counted
    tight = PackedLoader(str(root), token_budget=3, oversize="downscale")
    list(tight)
    assert tight.stats.samples_skipped == 4 and tight.stats.samples_downscaled == 0


def test_token_drop_keeps_true_positions(tmp_path: Path) -> None:
    expected = write_corpus(tmp_path / "c", [MIX, MIX])
    loader = PackedLoader(str(tmp_path / "c"), token_budget=32, token_drop=0.5, seed=2)
    dropped = 0
    for b in loader:
        assert b.keep_index is not None and b.num_tokens <= 32
        for i, key in enumerate(b.keys):
            lo, hi = int(b.cu_seqlens[i]), int(b.cu_seqlens[i + 1])
            full_tokens, full_pos = patchify(expected[key][schemas.TENSOR_LATENTS], PATCH)
            idx = b.keep_index[lo:hi]
            assert bool((idx.diff() > 0).all()) and hi - lo >= 1
            assert torch.equal(b.tokens[lo:hi], full_tokens[idx])
            assert torch.equal(b.positions[lo:hi], full_pos[idx])
            dropped += full_tokens.shape[0] - (hi - lo)
    assert dropped > 0 and loader.stats.tokens_dropped == dropped


def test_balance_aligns_attention_cost_across_ranks(tmp_path: Path) -> None:
    # ranks hold similar mixes (a shuffled corpus); their step-by-step costs differ
    rng = random.Random(0)
    write_corpus(tmp_path / "c", [[rng.choice(MIX) for _ in range(16)] for _ in range(5)])
    root = str(tmp_path / "c")

    def imbalance(window: int) -> float:
        plan = PackedLoader(
            root, token_budget=24, world_size=2, pack_buffer=4, balance_window=window
        ).plan()
        ranks = [[attention_cost(b) for b in plan.rank_bins(r)] for r in range(2)]
        return sum(max(c) - min(c) for c in zip(*ranks, strict=True))

    plain, balanced = imbalance(0), imbalance(8)
    assert balanced < plain


# --- storage ---------------------------------------------------------------------------------
def test_s3_reads_the_same_batches_as_local(tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    alt = {"latents@32x32": (1, 2, 2)}
    expected = write_corpus(tmp_path / "c", UNEVEN, text_dim=2, alt=alt, extra_columns=False)
    client = s3_server.client()
    bucket, prefix = s3_bucket[len("s3://") :].split("/", 1)
    for path in sorted((tmp_path / "c").rglob("*")):
        if path.is_file():
            rel = path.relative_to(tmp_path / "c").as_posix()
            client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=path.read_bytes())
    local = _all(PackedLoader(str(tmp_path / "c"), token_budget=20, world_size=2, rank=1))
    remote = _all(PackedLoader(s3_bucket, token_budget=20, world_size=2, rank=1, num_workers=2))
    assert [b.keys for b in local] == [b.keys for b in remote] and local
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(local, remote, strict=True))
    # the downscale policy's header probe works over ranged reads too
    down = PackedLoader(s3_bucket, token_budget=4, oversize="downscale")
    over = [e for e in down.entries if tokens_of(e.shape[1:]) > 4]
    assert len(down.entries) == len(expected) and over
    assert all(e.alt_shapes == (("latents@32x32", (C, 1, 2, 2)),) for e in over)
    assert {k for b in down for k in b.keys} == set(expected) - set(down.plan(0).dropped)


def test_s3_failures_name_the_object(
    s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused S3 read or listing says which object or prefix, not just the cause."""
    from model import data

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setattr(data, "_S3_CLIENTS", {})  # a client with the wrong secret
    with pytest.raises(OSError, match=f"{s3_bucket}/manifest.json: ClientError"):
        data.read_manifest(s3_bucket)
    with pytest.raises(OSError, match=f"listing {s3_bucket}/shards: ClientError"):
        data.list_files(f"{s3_bucket}/shards", ".tar")


def test_cli_prints_an_unforeseen_failure_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from reelpack.cli import main

    def boom(*_: Any, **__: Any) -> Any:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr("model.loader.PackedLoader.__init__", boom)
    # -v would configure this test process's root logger for every later test
    monkeypatch.setattr("logging.basicConfig", lambda **_: None)
    assert main(["pack-stats", str(tmp_path), "--budget", "64"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "reelpack pack-stats: RuntimeError: the disk is on fire"
    assert main(["-v", "pack-stats", str(tmp_path), "--budget", "64"]) == 1
    assert "Traceback" in capsys.readouterr().err  # -v adds the traceback

    def unreachable(*_: Any, **__: Any) -> Any:
        raise OSError("s3://b/c/manifest.json: EndpointConnectionError: connection refused")

    # a storage failure foreseen: its message alone, no exception type
    monkeypatch.setattr("model.loader.PackedLoader.__init__", unreachable)
    assert main(["pack-stats", "s3://b/c", "--budget", "64"]) == 1
    assert capsys.readouterr().err.strip() == (
        "reelpack pack-stats: s3://b/c/manifest.json: EndpointConnectionError: connection refused"
    )


def test_refuses_pickles_and_unindexed_corpora_still_work(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_corpus(root, [MIX[:2]])
    # no index: the shards are scanned (headers only) and every sample still comes once
    for d in (schemas.INDEX_DIR, schemas.SOURCES_DIR):
        for f in (root / d).iterdir():
            f.unlink()
    assert sorted(k for b in PackedLoader(str(root), token_budget=64) for k in b.keys) == [
        "clip0000",
        "clip0001",
    ]
    with wds.TarWriter(str(root / schemas.SHARDS_DIR / "shard-000001.tar"), encoder=False) as w:
        w.write(
            {
                "__key__": "evil",
                schemas.SAMPLE_LATENTS: save_safetensors({"latents": torch.zeros(C, 1, 2, 2)}),
                schemas.SAMPLE_META: b"{}",
                schemas.SAMPLE_CAPTION: b"",
                "pyd": b"\x80\x04K\x01.",
            }
        )
    with pytest.raises(ValueError, match=r"evil.*'pyd'"):
        list(PackedLoader(str(root), token_budget=64))
