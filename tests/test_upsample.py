"""Prompt upsampling with a tiny random Qwen3 causal LM, loaded through the same
``AutoTokenizer`` / ``AutoModelForCausalLM`` path as a real instruct model.

    python -m pytest tests/test_upsample.py -q
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from model.tiny_text import MARKER_NAME, build_tiny_causal_lm, is_tiny
from pipeline.stages.caption import (
    CAPTION_FACETS,
    RANDOM_WEIGHTS_PREFIX,
    RawCaption,
    degenerate_reason,
)
from pipeline.upsample import (
    SYSTEM_PROMPT,
    UpsampleConfig,
    UpsampleError,
    Upsampler,
    upsample,
)
from reelpack.cli import main
from reelpack.commands.upsample import tiny_lm_dir

PROMPTS = ["a corgi on a beach", "a red car at night in the rain"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def lm_dir(cache: Path) -> str:
    # where `reelpack upsample --preset tiny` looks with REELPACK_CACHE=cache
    return build_tiny_causal_lm(str(cache / "tiny" / "lm"))


@pytest.fixture(scope="module")
def cfg(lm_dir: str) -> UpsampleConfig:
    return UpsampleConfig(model=lm_dir, max_new_tokens=24, device="cpu")


@pytest.fixture(scope="module")
def upsampler(cfg: UpsampleConfig) -> Upsampler:
    return Upsampler(cfg)


def test_tiny_lm_loads_as_qwen3(lm_dir: str, upsampler: Upsampler) -> None:
    marker = json.loads((Path(lm_dir) / MARKER_NAME).read_text())
    assert marker["random_weights"] is True and is_tiny(lm_dir)
    assert type(upsampler.model).__name__ == "Qwen3ForCausalLM"
    text = upsampler.chat_text("  a corgi on a beach ")
    assert text.startswith("<|im_start|>system\n" + SYSTEM_PROMPT)
    assert "<|im_start|>user\na corgi on a beach<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_system_prompt_asks_for_the_training_caption_style() -> None:
    assert CAPTION_FACETS in SYSTEM_PROMPT  # the captioner's facets, verbatim


def test_upsample_tiny_model(upsampler: Upsampler) -> None:
    out = upsampler(PROMPTS)
    assert len(out) == 2 and out[0] != out[1]  # the prompt reaches the model
    for text in out:
        assert text.startswith(RANDOM_WEIGHTS_PREFIX)  # random weights say so
        assert degenerate_reason(text[len(RANDOM_WEIGHTS_PREFIX) :]) is None
    # greedy: deterministic, and each answer independent of its batch neighbours
    assert upsampler(PROMPTS[:1]) == out[:1]
    assert upsampler(PROMPTS[1:]) == out[1:]


def test_sampling_is_seeded(cfg: UpsampleConfig) -> None:
    hot = Upsampler(replace(cfg, temperature=1.0, top_p=1.0, seed=3))
    assert hot(PROMPTS[:1]) == hot(PROMPTS[:1])


def test_bad_settings_are_named_before_the_model_loads(cfg: UpsampleConfig) -> None:
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0"):
        Upsampler(replace(cfg, max_new_tokens=0))
    with pytest.raises(ValueError, match=r"temperature must be a number >= 0, got -1"):
        Upsampler(replace(cfg, temperature=-1.0))
    with pytest.raises(ValueError, match=r"temperature must be a number >= 0, got nan"):
        Upsampler(replace(cfg, temperature=float("nan")))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        Upsampler(replace(cfg, top_p=0.0))


def test_upsample_function_loads_once(cfg: UpsampleConfig, upsampler: Upsampler) -> None:
    first = upsample(PROMPTS[0], cfg)
    assert first == upsampler(PROMPTS[:1])[0]
    from pipeline.upsample import _upsampler

    assert _upsampler(cfg) is _upsampler(cfg)


def test_prompts_are_generated_a_batch_at_a_time(
    upsampler: Upsampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory is bounded by ``batch_size``, not by the number of prompts."""
    sizes: list[int] = []

    def generate(prompts: list[str], **kw: Any) -> list[RawCaption]:
        sizes.append(len(prompts))
        return [RawCaption(f"A scene about {p}.") for p in prompts]

    monkeypatch.setattr(upsampler, "_generate", generate)
    monkeypatch.setattr(upsampler, "cfg", replace(upsampler.cfg, batch_size=2))
    captions = upsampler([f"prompt {k}" for k in range(5)])
    assert sizes == [2, 2, 1]
    assert [c.removeprefix(upsampler.prefix) for c in captions] == [
        f"A scene about prompt {k}." for k in range(5)
    ]


def test_hygiene_and_retry(upsampler: Upsampler, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def generate(prompts: list[str], **kw: Any) -> list[RawCaption]:
        calls.append(kw)
        if kw.get("repetition_penalty"):
            return [RawCaption('Caption: "A corgi trots along wet sand. Waves')] * len(prompts)
        return [RawCaption("corgi corgi corgi corgi corgi corgi corgi corgi corgi")] * len(prompts)

    monkeypatch.setattr(upsampler, "_generate", generate)
    (out,) = upsampler(["a corgi"])
    assert out == RANDOM_WEIGHTS_PREFIX + '"A corgi trots along wet sand. Waves'
    assert calls[1]["repetition_penalty"] == upsampler.cfg.retry_repetition_penalty

    monkeypatch.setattr(
        upsampler, "_generate", lambda prompts, **kw: [RawCaption("The video shows", True)]
    )
    (out,) = upsampler(["x"])
    assert out == RANDOM_WEIGHTS_PREFIX + "The video shows"

    monkeypatch.setattr(
        upsampler, "_generate", lambda prompts, **kw: [RawCaption("!!! ### 123", False)]
    )
    with pytest.raises(UpsampleError, match=r"'a corgi'.*non-language"):
        upsampler(["a corgi"])
    with pytest.raises(UpsampleError):
        upsampler(["   "])


def test_truncated_answers_end_at_a_sentence(
    upsampler: Upsampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        upsampler,
        "_generate",
        lambda prompts, **kw: [RawCaption("The video shows a corgi. It runs toward the", True)],
    )
    assert upsampler(["a corgi"]) == [RANDOM_WEIGHTS_PREFIX + "A corgi."]


def test_cli(
    lm_dir: str, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REELPACK_CACHE", str(cache))
    assert tiny_lm_dir() == lm_dir  # --preset tiny reuses the cached build
    argv = ["upsample", "--preset", "tiny", "--device", "cpu", "--max-new-tokens", "24"]
    assert main([*argv, PROMPTS[0]]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == upsample(
        PROMPTS[0], UpsampleConfig(model=lm_dir, max_new_tokens=24, device="cpu")
    )
    assert main(["upsample", *argv[3:], "--model", lm_dir, "--json", *PROMPTS]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["caption"].startswith(RANDOM_WEIGHTS_PREFIX) for r in rows)
    # a prompt file, one per line, captioned two at a time as each batch is done
    listed = cache / "prompts.txt"
    listed.write_text(f"# for the launch\n{PROMPTS[0]}\n\n{PROMPTS[1]}\n{PROMPTS[0]}\n")
    assert main([*argv, "--batch-size", "2", "--json", f"@{listed}"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert all(r["caption"].startswith(RANDOM_WEIGHTS_PREFIX) for r in rows)
    for arg, words in [
        (f"@{cache / 'none.txt'}", f"prompt file {cache / 'none.txt'}: No such file"),
        (f"@{lm_dir}", f"prompt file {lm_dir}: Is a directory"),
    ]:
        assert main([*argv, arg]) == 2
        assert f"reelpack upsample: {words}" in capsys.readouterr().err
    listed.write_text("# nothing yet\n")
    assert main([*argv, f"@{listed}"]) == 2
    assert f"prompt file {listed} holds no prompt" in capsys.readouterr().err
    assert main([*argv, "--batch-size", "0", "x"]) == 2
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err
    nowhere = cache / "nowhere"
    assert main(["upsample", "--model", str(nowhere), "a corgi"]) == 2
    assert f"reelpack upsample: --model '{nowhere}': no such folder {nowhere}" in (
        capsys.readouterr().err
    )
    assert main(["upsample", "--model", str(cache), "a corgi"]) == 2  # a folder, no model
    assert f"{cache} has no config.json: not a saved model" in capsys.readouterr().err
    # neither a folder nor a hub id: named, not the hub client's validation error
    assert main(["upsample", "--model", "s3://models/lm", "a corgi"]) == 2
    assert "'s3://models/lm': a URI: models load from a local folder" in capsys.readouterr().err
    assert main(["upsample", "--model", "my lm", "a corgi"]) == 2
    assert "'my lm': no such folder here, nor a Hugging Face hub id" in capsys.readouterr().err
    assert main(["upsample", "--model", str(cache), "a corgi"]) == 2
    assert f"{cache} has no config.json: not a saved model" in capsys.readouterr().err
    # what the command can check is checked before any model loads (a missing one here)
    for flags, words in [
        (["--temperature", "nan"], "temperature must be a number >= 0, got nan"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        (["--device", "cuda:7"], "device 'cuda:7': torch sees"),
        (["  "], "upsample needs non-empty prompts"),
    ]:
        assert main(["upsample", "--model", str(nowhere), "a corgi", *flags]) == 2
        assert f"reelpack upsample: {words}" in capsys.readouterr().err
