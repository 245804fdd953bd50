"""Prompt upsampling: a user's short prompt -> a detailed caption in the training style.

A video DiT trained on dense recaptions (see ``pipeline.stages.caption``) follows
prompts best when they read like its training captions, so at inference a short
prompt ("a corgi on a beach") is expanded by an instruct LLM into one paragraph
that covers the same facets in the same order (:data:`CAPTION_FACETS`: subjects
and appearance, actions over time, setting, camera motion and framing, lighting,
visual style). The answer goes through the captioner's own hygiene
(``finish_caption``) and degenerate-output checks, with one retry under a
repetition penalty.

The model is any ``transformers`` causal LM with a chat template
(``AutoTokenizer`` + ``AutoModelForCausalLM``), by hub id or local folder; the
default is ``Qwen/Qwen3-4B-Instruct-2507``. Offline tests use a tiny random Qwen3
from ``model.tiny_text.build_tiny_causal_lm``; its answers start with
``RANDOM_WEIGHTS_PREFIX``. Command line::

    reelpack upsample "a corgi on a beach"
    reelpack upsample --preset tiny "a corgi on a beach"     # offline, random weights
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.device import resolve_device_dtype
from model.weights import quiet_progress
from pipeline.stages.caption import (
    CAPTION_FACETS,
    RANDOM_WEIGHTS_PREFIX,
    RawCaption,
    degenerate_reason,
    finish_caption,
)

__all__ = [
    "DEFAULT_UPSAMPLE_MODEL",
    "SYSTEM_PROMPT",
    "UpsampleConfig",
    "UpsampleError",
    "Upsampler",
    "upsample",
]

DEFAULT_UPSAMPLE_MODEL = "Qwen/Qwen3-4B-Instruct-2507"

SYSTEM_PROMPT = (
    "You write prompts for a text-to-video model. It was trained on dense, literal "
    "descriptions of video clips, so it follows prompts written in that style. Expand "
    "the user's short idea into one such description of a single continuous shot. "
    f"Cover, in this order: {CAPTION_FACETS}. "
    "Keep everything the user asked for and contradict none of it; add concrete, "
    "plausible visual detail; describe only what a camera would see, no sounds, "
    "thoughts, names or on-screen text unless asked for. "
    "Answer with the description only: one plain paragraph of about 80 to 150 words, "
    "in the present tense, without lists, headings, quotes or an introduction."
)

_THINK_OPEN = re.compile(r"<think>.*", re.IGNORECASE | re.DOTALL)  # an unclosed block


@dataclass(frozen=True)
class UpsampleConfig:
    """How prompts are expanded."""

    model: str = DEFAULT_UPSAMPLE_MODEL  # hub id or local folder
    system_prompt: str = SYSTEM_PROMPT
    max_new_tokens: int = 320
    max_caption_tokens: int = 256  # cap after hygiene, in the LLM's tokens
    temperature: float = 0.0  # 0 = greedy (deterministic); > 0 samples
    top_p: float = 0.9  # when sampling
    seed: int = 0  # when sampling
    retry_repetition_penalty: float = 1.2
    device: str = "auto"  # "auto" = cuda if available, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU
    batch_size: int = 8  # prompts generated together (memory grows with it)

    def validate(self) -> None:
        """ValueError naming each setting out of range."""
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise ValueError("; ".join(problems))


class UpsampleError(ValueError):
    """The LLM gave no usable expansion (the message says why)."""


def check_prompts(prompts: Sequence[str]) -> None:
    """UpsampleError unless there is at least one prompt and none is blank."""
    if not prompts or any(not p.strip() for p in prompts):
        raise UpsampleError("upsample needs non-empty prompts")


class Upsampler:
    """``Upsampler(cfg)(prompts) -> captions``; loads the LLM once."""

    def __init__(self, cfg: UpsampleConfig = UpsampleConfig()) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from model.tiny_text import is_tiny

        cfg.validate()
        self.cfg = cfg
        self.device, self.dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        self.tokenizer.padding_side = "left"  # batched decoder-only generation
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Any: transformers types PreTrainedModel.to as taking a model, not a device
        with quiet_progress():
            model: Any = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self._torch = torch
        self.prefix = RANDOM_WEIGHTS_PREFIX if is_tiny(cfg.model) else ""
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def chat_text(self, prompt: str) -> str:
        """The chat-templated model input for one user prompt."""
        messages = [
            {"role": "system", "content": self.cfg.system_prompt},
            {"role": "user", "content": prompt.strip()},
        ]
        # enable_thinking=False: Qwen3 hybrid models answer directly; other templates
        # ignore the extra variable
        return str(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
            )
        )

    def _generate(self, prompts: Sequence[str], **gen_kwargs: Any) -> list[RawCaption]:
        inputs = self.tokenizer(
            [self.chat_text(p) for p in prompts],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,  # the chat template already has them
        ).to(self.device)
        kwargs: dict[str, Any] = {"max_new_tokens": self.cfg.max_new_tokens, **gen_kwargs}
        if self.cfg.temperature > 0:
            self._torch.manual_seed(self.cfg.seed)
            kwargs.update(do_sample=True, temperature=self.cfg.temperature, top_p=self.cfg.top_p)
        else:
            kwargs.update(do_sample=False)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, new)
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [
            RawCaption(
                # a reasoning block the model never closed is not part of the answer
                text=_THINK_OPEN.sub("", str(text)),
                truncated=not self._eos_ids.intersection(row.tolist()),
            )
            for text, row in zip(texts, new_tokens, strict=True)
        ]

    def _finish(self, raw: RawCaption) -> str:
        def encode(text: str) -> list[int]:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

        def decode(ids: Sequence[int]) -> str:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

        return finish_caption(raw, self.cfg.max_caption_tokens, encode, decode)

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        """One expanded caption per prompt, generated ``cfg.batch_size`` at a time;
        raises :class:`UpsampleError` naming the prompt when the LLM's answer stays
        degenerate after one retry."""
        prompts = list(prompts)
        check_prompts(prompts)
        size = self.cfg.batch_size
        return [
            c for at in range(0, len(prompts), size) for c in self._batch(prompts[at : at + size])
        ]

    def _batch(self, prompts: list[str]) -> list[str]:
        results = [self._finish(r) for r in self._generate(prompts)]
        retry = [k for k, text in enumerate(results) if degenerate_reason(text)]
        if retry:
            again = self._generate(
                [prompts[k] for k in retry], repetition_penalty=self.cfg.retry_repetition_penalty
            )
            for k, raw in zip(retry, again, strict=True):
                results[k] = self._finish(raw)
        for prompt, text in zip(prompts, results, strict=True):
            reason = degenerate_reason(text)
            if reason:
                raise UpsampleError(f"upsampling {prompt!r} failed after a retry: {reason}")
        return [self.prefix + text for text in results]


@functools.lru_cache(maxsize=2)
def _upsampler(cfg: UpsampleConfig) -> Upsampler:
    return Upsampler(cfg)


def upsample(prompt: str, cfg: UpsampleConfig = UpsampleConfig()) -> str:
    """Expand ``prompt`` into a detailed caption in the training style.

    The model is loaded on first use and kept for later calls with the same config.
    """
    return _upsampler(cfg)([prompt])[0]
