"""Text encoder wrapper, the text-encode stage and the unpadded-embedding storage round
trip, with a tiny random umT5 loaded through the same loaders as ``google/umt5-xxl``.

    python -m pytest tests/test_text.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import schemas
from model.data import decode_sample
from model.fingerprint import weights_sha256
from model.text import TextEncoder, describe_text_encoder, pad_embeds
from model.tiny_text import MARKER_NAME, build_tiny_text_encoder, is_tiny
from pipeline.stages.base import batch_to_rows, rows_to_batch
from pipeline.stages.text_encode import TextEncode, TextEncodeConfig, add_text_embeds

CAPTIONS = [
    "A corgi runs along a sandy beach at sunset.",
    "Close-up of hands kneading dough on a wooden kitchen table, soft window light.",
    "Rain.",
]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_text_encoder(str(tmp_path_factory.mktemp("umt5")))


@pytest.fixture(scope="module")
def encoder(encoder_dir: str) -> TextEncoder:
    return TextEncoder.from_pretrained(encoder_dir, max_length=64, device="cpu")


def _latents_blob(seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(16, 2, 2, 4, generator=g).to(torch.bfloat16)  # (C, T, H, W)
    return bytes(save_safetensors({schemas.TENSOR_LATENTS: latents}))


# --- the wrapper -----------------------------------------------------------------------


def test_tiny_encoder_loads_like_the_real_one(encoder_dir: str, encoder: TextEncoder) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert is_tiny(encoder_dir)
    marker = json.loads((Path(encoder_dir) / MARKER_NAME).read_text())
    assert marker["random_weights"] is True and marker["family"] == "umt5"
    assert type(encoder.model).__name__ == "UMT5EncoderModel"  # encoder only, no decoder
    assert AutoConfig.from_pretrained(encoder_dir).model_type == "umt5"
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    ids = tok("a dog")["input_ids"]
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0  # T5 conventions
    assert encoder.dim == 32 and encoder.dtype == torch.float32


def test_tiny_t5_tokenizer_is_the_same_in_every_process(encoder_dir: str) -> None:
    """Machines that build the tiny encoder get the same token ids for the same words."""
    from transformers import AutoTokenizer

    code = (
        "from model.tiny_text import build_t5_tokenizer; "
        "print(build_t5_tokenizer().backend_tokenizer.to_str())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    saved = Path(encoder_dir, "tokenizer.json").read_text()
    assert json.loads(other)["model"] == json.loads(saved)["model"]
    tok = AutoTokenizer.from_pretrained(encoder_dir)
    pieces = tok.convert_ids_to_tokens(tok("A dog runs across the park")["input_ids"])
    assert pieces == [
        "\u2581A",
        "\u2581dog",
        "\u2581runs",
        "\u2581across",
        "\u2581the",
        "\u2581park",
        "</s>",
    ]
    assert tok.convert_ids_to_tokens(tok("Zq, é")["input_ids"]) == [
        "\u2581",
        "Z",
        "q",
        ",",
        "\u2581",
        "<unk>",
        "</s>",
    ]


def test_t5_family_and_idempotent_build(encoder_dir: str, tmp_path: Path) -> None:
    weights = Path(encoder_dir) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_text_encoder(encoder_dir) == encoder_dir
    assert weights.stat().st_mtime_ns == before  # complete build left alone
    t5 = TextEncoder.from_pretrained(build_tiny_text_encoder(str(tmp_path / "t5"), "t5"))
    assert type(t5.model).__name__ == "T5EncoderModel"
    with pytest.raises(ValueError):
        build_tiny_text_encoder(str(tmp_path / "x"), "bert")


def test_building_and_loading_print_no_progress_bars(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    TextEncoder.from_pretrained(build_tiny_text_encoder(str(tmp_path / "enc")))
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "Writing model shards" not in out + err
    assert hf_logging.is_progress_bar_enabled()  # as it was: the user's setting stands


def test_describe_without_loading_weights(encoder_dir: str, encoder: TextEncoder) -> None:
    entry = describe_text_encoder(encoder_dir, max_length=64)
    # the loaded encoder's entry, and the digest of the weight files (read, not loaded)
    assert entry == {**encoder.describe(), "weights_sha256": weights_sha256(encoder_dir)}
    assert {"id", "class", "dim", "max_length"} <= set(entry)
    assert entry["class"] == "UMT5EncoderModel" and entry["dim"] == 32
    assert entry["max_length"] == 64 and entry["random_weights"] is True
    json.dumps(entry)  # goes into manifest.json


def test_encode_is_unpadded_and_batch_independent(encoder: TextEncoder) -> None:
    embeds = encoder.encode(CAPTIONS)
    lengths = encoder.num_tokens(CAPTIONS)
    assert [e.shape for e in embeds] == [torch.Size([n, encoder.dim]) for n in lengths]
    assert len(set(lengths)) == 3  # different lengths: padding really happened
    for text, batched in zip(CAPTIONS, embeds, strict=True):
        alone = encoder.encode([text])[0]
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(embeds[0][0], embeds[1][0])  # the text reaches the model


def test_max_length_truncates(encoder_dir: str) -> None:
    short = TextEncoder.from_pretrained(encoder_dir, max_length=8, device="cpu")
    (embeds,) = short.encode([CAPTIONS[1]])
    assert embeds.shape == (8, short.dim) and short.num_tokens([CAPTIONS[1]]) == [8]
    with pytest.raises(ValueError):
        TextEncoder.from_pretrained(encoder_dir, max_length=0)


def test_pad_embeds_round_trip(encoder: TextEncoder) -> None:
    embeds = encoder.encode(CAPTIONS)
    padded, mask = pad_embeds(embeds)
    assert padded.shape == (3, max(e.shape[0] for e in embeds), encoder.dim)
    assert mask.sum(dim=1).tolist() == [e.shape[0] for e in embeds]
    for i, e in enumerate(embeds):
        torch.testing.assert_close(padded[i][mask[i]], e)
        assert torch.all(padded[i][~mask[i]] == 0)
    # the padded forward agrees with the unpadded one on the real tokens
    hidden, hmask = encoder.encode_padded(CAPTIONS)
    assert torch.equal(hmask, mask)
    torch.testing.assert_close(hidden[mask], padded[mask])
    with pytest.raises(ValueError):
        pad_embeds([])
    with pytest.raises(ValueError):
        pad_embeds([torch.zeros(2, 4), torch.zeros(2, 5)])


def test_from_manifest_checks_identity(
    encoder: TextEncoder, encoder_dir: str, tmp_path: Path
) -> None:
    entry = describe_text_encoder(encoder_dir, max_length=64)  # what a build's manifest stores
    again = TextEncoder.from_manifest(entry, device="cpu")
    torch.testing.assert_close(again.encode(CAPTIONS[:1])[0], encoder.encode(CAPTIONS[:1])[0])
    with pytest.raises(ValueError, match="dim"):
        TextEncoder.from_manifest({**entry, "dim": 4096}, device="cpu")
    # a copy elsewhere is the same encoder; the same config with other weights is not
    moved = Path(shutil.copytree(encoder_dir, tmp_path / "moved"))
    TextEncoder.from_manifest({**entry, "id": str(moved)}, device="cpu")
    (weights,) = moved.glob("*.safetensors")
    tensors = load_safetensors(weights.read_bytes())
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    weights.write_bytes(save_safetensors(tensors, metadata={"format": "pt"}))
    with pytest.raises(ValueError, match=r"text encoder at .*moved.* has other weights"):
        TextEncoder.from_manifest({**entry, "id": str(moved)}, device="cpu")


# --- the stage and storage -------------------------------------------------------------


def test_stage_columns_are_in_schema() -> None:
    assert set(TextEncode.reads) <= set(schemas.STREAM_COLUMNS)
    assert set(TextEncode.writes) <= set(schemas.STREAM_COLUMNS)
    assert schemas.CLIP_SCHEMA.field("text_tokens").type == "int32"


def test_add_text_embeds() -> None:
    blob = _latents_blob()
    out = load_safetensors(add_text_embeds(blob, torch.ones(3, 8)))
    assert out[schemas.TENSOR_TEXT_EMBEDS].dtype == torch.bfloat16
    assert out[schemas.TENSOR_TEXT_EMBEDS].shape == (3, 8)
    assert torch.equal(out[schemas.TENSOR_LATENTS], load_safetensors(blob)[schemas.TENSOR_LATENTS])
    with pytest.raises(ValueError):
        add_text_embeds(blob, torch.ones(0, 8))
    with pytest.raises(ValueError):
        add_text_embeds(bytes(save_safetensors({"other": torch.ones(1)})), torch.ones(2, 8))


def _stage_batch() -> dict[str, np.ndarray]:
    rows: list[dict[str, Any]] = [
        {"clip_id": "a", "status": "kept", "caption": CAPTIONS[0], "latents": _latents_blob(0)},
        {"clip_id": "b", "status": "kept", "caption": CAPTIONS[1], "latents": _latents_blob(1)},
        {"clip_id": "rej", "status": "rejected", "caption": None, "latents": None},
        {"clip_id": "nocap", "status": "kept", "caption": None, "latents": _latents_blob(2)},
        {"clip_id": "nolat", "status": "kept", "caption": CAPTIONS[2], "latents": None},
        {"clip_id": "junk", "status": "kept", "caption": CAPTIONS[2], "latents": b"not st"},
        {"clip_id": "c", "status": "kept", "caption": CAPTIONS[2], "latents": _latents_blob(3)},
    ]
    for row in rows:
        row["error"] = None
    return rows_to_batch(rows)


def test_text_encode_stage(encoder_dir: str, encoder: TextEncoder) -> None:
    stage = TextEncode(TextEncodeConfig(model=encoder_dir, max_length=64, batch_size=2))
    batch = _stage_batch()
    out = {r["clip_id"]: r for r in batch_to_rows(stage(batch))}
    assert len(out) == 7  # no row dropped
    for cid, caption in (("a", CAPTIONS[0]), ("b", CAPTIONS[1]), ("c", CAPTIONS[2])):
        row = out[cid]
        assert row["status"] == "kept" and row["error"] is None
        tensors = load_safetensors(row["latents"])
        embeds = tensors[schemas.TENSOR_TEXT_EMBEDS]
        assert embeds.dtype == torch.bfloat16 and embeds.shape == (row["text_tokens"], 32)
        assert row["text_tokens"] == encoder.num_tokens([caption])[0]  # unpadded
        expected = encoder.encode([caption])[0].to(torch.bfloat16)
        torch.testing.assert_close(embeds, expected, rtol=2e-2, atol=2e-2)
    src = {r["clip_id"]: r for r in batch_to_rows(batch)}
    assert torch.equal(
        load_safetensors(out["a"]["latents"])[schemas.TENSOR_LATENTS],
        load_safetensors(src["a"]["latents"])[schemas.TENSOR_LATENTS],
    )
    assert out["rej"]["status"] == "rejected" and out["rej"]["text_tokens"] is None
    for cid, cause in (("nocap", "no caption"), ("nolat", "no latents"), ("junk", "Error")):
        assert out[cid]["status"] == "error", cid
        assert cid in out[cid]["error"] and cause in out[cid]["error"], out[cid]["error"]
    assert batch["status"][3] == "kept"  # the input batch is not modified in place


def test_storage_round_trip_through_the_trainer_decoder(encoder_dir: str) -> None:
    stage = TextEncode(TextEncodeConfig(model=encoder_dir, max_length=64))
    out = batch_to_rows(stage(_stage_batch()))[0]
    raw = {
        "__key__": "a",
        "__url__": "mem://shard-0.tar",
        schemas.SAMPLE_LATENTS: out["latents"],
        schemas.SAMPLE_META: json.dumps(
            {"clip_id": "a", "text_tokens": out["text_tokens"]}
        ).encode(),
        schemas.SAMPLE_CAPTION: out["caption"].encode(),
    }
    sample = decode_sample(raw)
    assert sample.caption == CAPTIONS[0]
    assert sample.text_embeds is not None
    assert sample.text_embeds.shape == (out["text_tokens"], 32)
    assert sample.latents.shape == (16, 2, 2, 4)
    padded, mask = pad_embeds([sample.text_embeds, sample.text_embeds[:2]])
    assert mask.sum().item() == out["text_tokens"] + 2 and padded.shape[0] == 2


@pytest.mark.gpu
def test_text_encode_on_cuda_bf16(encoder_dir: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    enc = TextEncoder.from_pretrained(encoder_dir)  # auto: cuda + bf16
    assert enc.device.type == "cuda" and enc.dtype == torch.bfloat16
    embeds = enc.encode(CAPTIONS)
    assert [e.shape[0] for e in embeds] == enc.num_tokens(CAPTIONS)
    assert all(torch.isfinite(e.float()).all() for e in embeds)
