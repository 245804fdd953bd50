"""model.dit: packed attention backends, cross-attention, 3D RoPE, unpatchify, FLOPs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from model.data import patchify, unpatchify
from model.dit import (
    DiT,
    DiTConfig,
    apply_rope,
    build_dit,
    estimate_flops,
    grid_positions,
    rope_3d,
)

C = 4
PATCH = (1, 2, 2)
TEXT_DIM = 12


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    # OpenMP spin-waiting makes them 10-100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    # DiT zero-initialises gates and outputs, so all outputs start at 0 and any
    # comparison would pass; random weights make every path matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _packed(grids: list[tuple[int, int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([a * b * c for a, b, c in grids])
    tokens = torch.randn(int(lengths.sum()), C * 4, generator=g)
    text_lengths = torch.tensor([3, 1, 5, 2][: len(grids)])
    return {
        "tokens": tokens,
        "positions": torch.cat([grid_positions(gr) for gr in grids]),
        "sample_ids": torch.repeat_interleave(torch.arange(len(grids)), lengths),
        "cu": torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int(),
        "t": torch.rand(len(grids), generator=g),
        "text": torch.randn(int(text_lengths.sum()), TEXT_DIM, generator=g),
        "text_cu": torch.nn.functional.pad(text_lengths.cumsum(0), (1, 0)).int(),
    }


def _model(text_dim: int = TEXT_DIM) -> DiT:
    model = build_dit("DiT-tiny", in_channels=C, patch_size=PATCH, text_dim=text_dim).eval()
    _randomise(model)
    return model


def _run(model: DiT, b: dict[str, torch.Tensor], backend: str, **kw: object) -> torch.Tensor:
    model.attn_backend = backend
    with torch.no_grad():
        return model(
            b["tokens"],
            b["positions"],
            b["sample_ids"],
            b["t"],
            cu_seqlens=b["cu"],
            text_embeds=b["text"],
            text_cu_seqlens=b["text_cu"],
            **kw,
        )


# flex_attention runs uncompiled (unfused) on the CPU: right, and says so
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

GRIDS = [(2, 2, 3), (1, 1, 4), (3, 2, 2)]  # landscape, a wide strip, a longer clip


@pytest.mark.parametrize("backend", ["split", "dense", "flex"])
def test_packed_equals_each_sample_alone(backend: str) -> None:
    model = _model()
    b = _packed(GRIDS)
    packed = _run(model, b, backend)  # (N, token_dim)
    for i in range(len(GRIDS)):
        lo, hi = int(b["cu"][i]), int(b["cu"][i + 1])
        tlo, thi = int(b["text_cu"][i]), int(b["text_cu"][i + 1])
        model.attn_backend = "dense"
        with torch.no_grad():
            alone = model(
                b["tokens"][lo:hi],
                b["positions"][lo:hi],
                torch.zeros(hi - lo, dtype=torch.long),
                b["t"][i : i + 1],
                text_embeds=b["text"][tlo:thi],
                text_cu_seqlens=torch.tensor([0, thi - tlo]),
            )
        torch.testing.assert_close(packed[lo:hi], alone, atol=1e-5, rtol=1e-4)
    # the test can fail: one attention over the whole pack mixes the samples
    with torch.no_grad():
        model.attn_backend = backend
        mixed = model(
            b["tokens"],
            b["positions"],
            torch.zeros_like(b["sample_ids"]),
            b["t"][:1],
            text_embeds=b["text"],
            text_cu_seqlens=torch.tensor([0, b["text"].shape[0]]),
        )
    assert not torch.allclose(mixed, packed, atol=1e-3)


def test_backends_agree_and_gradients_match() -> None:
    model = _model()
    b = _packed(GRIDS, seed=1)
    ref = _run(model, b, "dense")
    for backend in ("split", "flex", "auto"):
        torch.testing.assert_close(_run(model, b, backend), ref, atol=1e-5, rtol=1e-4)
    grads = {}
    for backend in ("dense", "split"):
        model.zero_grad()
        model.attn_backend = backend
        model(
            b["tokens"],
            b["positions"],
            b["sample_ids"],
            b["t"],
            text_embeds=b["text"],
            text_cu_seqlens=b["text_cu"],
        ).square().sum().backward()
        grads[backend] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, c in zip(grads["dense"], grads["split"], strict=True):
        torch.testing.assert_close(a, c, atol=1e-3, rtol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = _model().train()
    b = _packed(GRIDS, seed=2)
    out = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(
            b["tokens"],
            b["positions"],
            b["sample_ids"],
            b["t"],
            text_embeds=b["text"],
            text_cu_seqlens=b["text_cu"],
        ).square().sum().backward()
        out.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, c in zip(*out, strict=True):
        torch.testing.assert_close(a, c)


def test_caption_reaches_only_its_own_sample_and_dropout_uses_the_null() -> None:
    model = _model()
    b = _packed(GRIDS, seed=3)
    base = _run(model, b, "split")
    changed = dict(b)
    changed["text"] = b["text"].clone()
    lo, hi = int(b["text_cu"][1]), int(b["text_cu"][2])
    # only sample 1's caption (random: a constant shift would vanish in the LayerNorm)
    changed["text"][lo:hi] += torch.randn(
        hi - lo, TEXT_DIM, generator=torch.Generator().manual_seed(9)
    )
    out = _run(model, changed, "split")
    cu = b["cu"].tolist()
    assert not torch.allclose(out[cu[1] : cu[2]], base[cu[1] : cu[2]], atol=1e-4)
    torch.testing.assert_close(out[: cu[1]], base[: cu[1]])
    torch.testing.assert_close(out[cu[2] :], base[cu[2] :])
    # dropping every caption == no captions at all == the learned null token only
    dropped = _run(model, b, "split", text_keep=torch.zeros(3, dtype=torch.bool))
    model.attn_backend = "split"
    with torch.no_grad():
        none = model(b["tokens"], b["positions"], b["sample_ids"], b["t"])
    torch.testing.assert_close(dropped, none)
    assert not torch.allclose(dropped, base, atol=1e-4)
    with pytest.raises(ValueError, match="text_dim"):
        _run(model, {**b, "text": torch.zeros(b["text"].shape[0], TEXT_DIM + 1)}, "split")


def test_unconditional_model_has_no_cross_attention() -> None:
    model = build_dit("DiT-tiny", in_channels=C, patch_size=PATCH)
    assert model.y_embedder is None and all(blk.cross_attn is None for blk in model.blocks)
    text_model = build_dit("DiT-tiny", in_channels=C, patch_size=PATCH, text_dim=TEXT_DIM)
    b = _packed(GRIDS)
    # zero-initialised gates and cross-attention: both start at exactly 0
    out = text_model(
        b["tokens"],
        b["positions"],
        b["sample_ids"],
        b["t"],
        text_embeds=b["text"],
        text_cu_seqlens=b["text_cu"],
    )
    assert not out.any()


def test_rope_3d_scores_depend_only_on_offsets() -> None:
    head_dim, heads = 32, 3
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, heads, head_dim, generator=g),
        torch.randn(1, heads, head_dim, generator=g),
    )

    def score(pq: torch.Tensor, pk: torch.Tensor) -> torch.Tensor:
        cq, sq = rope_3d(pq[None], head_dim)
        ck, sk = rope_3d(pk[None], head_dim)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum(-1)  # (1, heads)

    for _ in range(10):
        pq, pk, shift = (torch.randint(0, 40, (3,), generator=g) for _ in range(3))
        torch.testing.assert_close(
            score(pq, pk), score(pq + shift, pk + shift), atol=1e-4, rtol=1e-4
        )
    # every axis moves the score: (t, h, w) each own a slice of the head
    origin = torch.zeros(3, dtype=torch.long)
    for axis in range(3):
        moved = origin.clone()
        moved[axis] = 3
        assert not torch.allclose(score(moved, origin), score(origin, origin), atol=1e-3)
    # RoPE is a rotation: norms are unchanged
    c, s = rope_3d(torch.tensor([[5, 7, 9]]), head_dim)
    torch.testing.assert_close(apply_rope(q, c, s).norm(dim=-1), q.norm(dim=-1))


def test_unpatchify_inverts_patchify_per_sample() -> None:
    model = build_dit("DiT-tiny", in_channels=C, patch_size=PATCH)
    latents = [torch.randn(C, 2, 4, 6), torch.randn(C, 1, 8, 2)]
    tokens = torch.cat([patchify(x, PATCH)[0] for x in latents])
    grids = [(2, 2, 3), (1, 4, 1)]
    cu = torch.tensor([0, 12, 16])
    for x, y, grid in zip(latents, model.unpatchify(tokens, cu, grids), grids, strict=True):
        assert torch.equal(x, y)
        assert torch.equal(unpatchify(patchify(x, PATCH)[0], grid, PATCH, C), y)
    assert torch.equal(grid_positions((2, 2, 3)), patchify(latents[0], PATCH)[1])


def test_packing_saves_flops_over_padding() -> None:
    cfg = DiTConfig(in_channels=16, depth=2, hidden_size=64, num_heads=2)
    lengths = [16, 64, 256, 1024]
    packed = estimate_flops(cfg, lengths)["total"]
    padded = estimate_flops(cfg, [max(lengths)] * len(lengths))["total"]
    assert padded > 2.5 * packed
    # attention grows with the square of the length, linear layers with the length
    one = estimate_flops(cfg, [100])
    two = estimate_flops(cfg, [200])
    assert two["attention"] == pytest.approx(4 * one["attention"])
    assert two["linear"] == pytest.approx(2 * one["linear"])


def test_presets_override_fields() -> None:
    model = build_dit("DiT-tiny", in_channels=C, depth=1, text_dim=8)
    assert model.config.depth == 1 and model.config.text_dim == 8 and len(model.blocks) == 1
    with pytest.raises(ValueError, match="attention backend"):
        model.attn_backend = "nope"
        b = _packed(GRIDS)
        model(b["tokens"], b["positions"], b["sample_ids"], b["t"])
