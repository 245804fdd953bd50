"""Text-encode stage: caption -> unpadded text-encoder embeddings stored with the latents.

1:1, runs after encode. For every row with ``status == "kept"`` the caption is
encoded by a ``transformers`` text encoder (:class:`model.text.TextEncoder`, the one
place a text encoder is loaded; default ``google/umt5-xxl``, Wan 2.1's) and the
embeddings of its real tokens only, ``[L, D]`` bfloat16, are added to the row's
``latents`` safetensors blob under ``schemas.TENSOR_TEXT_EMBEDS``; ``text_tokens``
records ``L``. The trainer then never runs the text encoder: it pads per batch.

Captions longer than ``max_length`` tokens are cut there, as Wan's pipeline does.
A kept row without a caption or latents, or whose encoding fails, becomes
``status="error"`` naming the clip and the cause; the other rows are still encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from model.text import DEFAULT_TEXT_ENCODER, TextEncoder
from pipeline.stages.base import Batch, num_rows, with_columns
from schemas import TENSOR_LATENTS, TENSOR_TEXT_EMBEDS

if TYPE_CHECKING:  # the actor imports torch with its encoder; the config needs none
    import torch

__all__ = ["TextEncode", "TextEncodeConfig", "add_text_embeds"]


@dataclass(frozen=True)
class TextEncodeConfig:
    """How captions are encoded. ``enabled`` and the Ray resources
    (``BuildConfig.ray.text_encode``) are read by ``pipeline.graph`` only; ``enabled``
    needs the caption stage."""

    enabled: bool = False
    model: str = DEFAULT_TEXT_ENCODER  # hub id or local folder
    subfolder: str | None = None  # e.g. "text_encoder" in a diffusers repo
    tokenizer_subfolder: str | None = None  # e.g. "tokenizer"
    max_length: int = 512  # tokens, end token included (Wan 2.1: 512)
    batch_size: int = 16  # captions per encoder forward
    device: str = "auto"  # "auto": cuda when available
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu


def add_text_embeds(latents_blob: bytes, embeds: torch.Tensor) -> bytes:
    """A latents safetensors blob with ``embeds`` ([L, D]) added as bf16 ``text_embeds``.

    The blob must hold ``latents``; an existing ``text_embeds`` is replaced (re-runs).
    """
    import torch
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    if embeds.ndim != 2 or embeds.shape[0] < 1:
        raise ValueError(f"text embeddings must be [L, D] with L >= 1, got {tuple(embeds.shape)}")
    tensors = load_safetensors(bytes(latents_blob))
    if TENSOR_LATENTS not in tensors:
        raise ValueError(f"latents blob has no {TENSOR_LATENTS!r} tensor: {sorted(tensors)}")
    tensors[TENSOR_TEXT_EMBEDS] = embeds.detach().to("cpu", torch.bfloat16).contiguous()
    return bytes(save_safetensors(tensors))


def _row_error(clip_id: Any, cause: str | BaseException) -> str:
    if isinstance(cause, BaseException):
        cause = f"{type(cause).__name__}: {cause}"
    return f"text encode failed for clip {clip_id}: {cause}"


class TextEncode:
    """``TextEncode(cfg)(batch) -> batch``; loads the encoder once (one per Ray actor)."""

    reads: ClassVar[tuple[str, ...]] = ("clip_id", "status", "caption", "latents")
    writes: ClassVar[tuple[str, ...]] = ("latents", "text_tokens", "status", "error")

    def __init__(self, cfg: TextEncodeConfig = TextEncodeConfig()) -> None:
        if cfg.batch_size < 1 or cfg.max_length < 1:
            raise ValueError(f"invalid text_encode config: {cfg}")
        self.cfg = cfg
        self.encoder = TextEncoder.from_pretrained(
            cfg.model,
            max_length=cfg.max_length,
            subfolder=cfg.subfolder,
            tokenizer_subfolder=cfg.tokenizer_subfolder,
            device=cfg.device,
            dtype=cfg.dtype,
        )

    def _encode_many(self, texts: Sequence[str]) -> list[torch.Tensor | BaseException]:
        """Batched; if the batch fails, each text alone so one bad caption fails alone."""
        try:
            return list(self.encoder.encode(texts))
        except Exception as batch_exc:
            if len(texts) == 1:
                return [batch_exc]
        results: list[torch.Tensor | BaseException] = []
        for text in texts:
            try:
                results.append(self.encoder.encode([text])[0])
            except Exception as exc:
                results.append(exc)
        return results

    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        status = list(batch["status"])
        error = list(batch.get("error", [None] * n))
        latents = list(batch.get("latents", [None] * n))
        tokens: list[Any] = list(batch.get("text_tokens", [None] * n))
        captions = batch.get("caption", np.full(n, None, dtype=object))

        todo: list[int] = []
        for i in range(n):
            if status[i] != "kept" or batch["clip_id"][i] is None:
                continue
            if not isinstance(captions[i], str) or not captions[i].strip():
                status[i], error[i] = "error", _row_error(batch["clip_id"][i], "no caption")
            elif latents[i] is None or len(latents[i]) == 0:
                status[i], error[i] = "error", _row_error(batch["clip_id"][i], "no latents")
            else:
                todo.append(i)

        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start : start + self.cfg.batch_size]
            results = self._encode_many([str(captions[i]) for i in chunk])
            for i, result in zip(chunk, results, strict=True):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    latents[i] = add_text_embeds(latents[i], result)
                    tokens[i] = int(result.shape[0])
                except Exception as exc:  # this row only
                    status[i], error[i] = "error", _row_error(batch["clip_id"][i], exc)
                    tokens[i] = None
        return with_columns(batch, latents=latents, text_tokens=tokens, status=status, error=error)
