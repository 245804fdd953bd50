"""The one place a text encoder is loaded: caption/prompt -> unpadded token embeddings.

:class:`TextEncoder` loads a ``transformers`` text encoder and its tokenizer through
their own ``from_pretrained`` (a hub id or a local folder, with optional subfolders
for diffusers-style repos such as ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` with
``subfolder="text_encoder", tokenizer_subfolder="tokenizer"``). T5-family configs
(``t5``, ``mt5``, ``umt5``) load as their encoder-only classes, so the decoder
weights are never built; any other encoder-only model loads through ``AutoModel``.
The default is ``google/umt5-xxl``, the text encoder of Wan 2.1, with captions cut
at 512 tokens as Wan does.

``encode`` returns one ``(L, D)`` tensor per text holding only its real tokens
(end token included, padding dropped): the corpus stores captions this way, and the
trainer and sampler pad them per batch with :func:`pad_embeds`. The build pipeline
(``pipeline.stages.text_encode``) and the DiT sampler both use this module, so
training and inference see identical embeddings. ``describe`` is the manifest's
``text_encoder`` entry; :meth:`TextEncoder.from_manifest` loads the same encoder back.

Offline / tests: ``model.tiny_text.build_tiny_text_encoder(dir)`` saves a tiny
random-weight umT5 that loads back through :meth:`TextEncoder.from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.device import resolve_device_dtype
from model.fingerprint import check_weights, weights_sha256
from model.weights import quiet_progress

if TYPE_CHECKING:  # imported where tensors are made: the build config imports without torch
    import torch

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "ENCODER_CLASSES",
    "TextEncoder",
    "describe_text_encoder",
    "pad_embeds",
]

DEFAULT_TEXT_ENCODER = "google/umt5-xxl"

# T5-family model types -> their encoder-only class (AutoModel would build the decoder).
ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
}


def _model_class(model_type: str) -> Any:
    import transformers

    name = ENCODER_CLASSES.get(model_type)
    return getattr(transformers, name) if name else transformers.AutoModel


def _load_config(model_id: str, subfolder: str | None) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_id, **({"subfolder": subfolder} if subfolder else {}))


def _hidden_size(config: Any) -> int:
    for name in ("d_model", "hidden_size"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the embedding width of a {type(config).__name__}")


def _is_tiny(model_id: str, subfolder: str | None) -> bool:
    # model.tiny_text's marker; read here without importing the builders
    folder = Path(model_id) / (subfolder or "")
    return (folder / "reelpack_tiny.json").is_file() or (
        Path(model_id) / "reelpack_tiny.json"
    ).is_file()


def describe_text_encoder(
    model_id: str = DEFAULT_TEXT_ENCODER,
    *,
    max_length: int = 512,
    subfolder: str | None = None,
    tokenizer_subfolder: str | None = None,
) -> dict[str, Any]:
    """The manifest entry for an encoder, from its config alone (no weights loaded).

    Keys: ``id``, ``class``, ``dim``, ``max_length``, ``subfolder``,
    ``tokenizer_subfolder``, ``random_weights``, ``weights_sha256``
    (:func:`model.fingerprint.weights_sha256`; None when the weights are not on this
    machine).
    """

    local = Path(model_id, subfolder or "", "config.json")
    raw = json.loads(local.read_text()) if local.is_file() else {}
    width = raw.get("d_model", raw.get("hidden_size"))
    if raw.get("model_type") and isinstance(width, int):
        # a local folder: its config.json says it all (transformers costs seconds to import)
        model_type, architectures, dim = raw["model_type"], raw.get("architectures"), width
    else:
        config = _load_config(model_id, subfolder)
        model_type, architectures, dim = (
            config.model_type,
            config.architectures,
            _hidden_size(config),
        )
    cls = ENCODER_CLASSES.get(model_type) or (architectures or ["AutoModel"])[0]
    return {
        "id": model_id,
        "class": cls,
        "dim": dim,
        "max_length": int(max_length),
        "subfolder": subfolder,
        "tokenizer_subfolder": tokenizer_subfolder,
        "random_weights": _is_tiny(model_id, subfolder),
        "weights_sha256": weights_sha256(model_id, subfolder),
    }


def pad_embeds(embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpadded ``(L_i, D)`` embeddings -> ``(B, L_max, D)`` zero-padded and a ``(B, L_max)``
    bool mask (True on real tokens). Zeros, as Wan's pipeline pads its own."""
    if not embeds:
        raise ValueError("pad_embeds needs at least one sequence")
    dims = {int(e.shape[-1]) for e in embeds}
    if len(dims) != 1 or any(e.ndim != 2 for e in embeds):
        raise ValueError(
            f"expected (L, D) tensors of one width, got {[tuple(e.shape) for e in embeds]}"
        )
    import torch

    longest = max(int(e.shape[0]) for e in embeds)
    first = embeds[0]
    out = first.new_zeros((len(embeds), longest, first.shape[1]))  # (B, L, D)
    mask = torch.zeros((len(embeds), longest), dtype=torch.bool, device=first.device)  # (B, L)
    for i, e in enumerate(embeds):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = True
    return out, mask


class TextEncoder:
    """A loaded text encoder: ``encode(texts) -> [(L_i, D), ...]``. Load once, reuse."""

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        *,
        model_id: str,
        max_length: int,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        random_weights: bool = False,
    ) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.model = model
        self.model_id = model_id
        self.max_length = max_length
        self.subfolder = subfolder
        self.tokenizer_subfolder = tokenizer_subfolder
        self.random_weights = random_weights
        self.dim = _hidden_size(model.config)

    @classmethod
    def from_pretrained(
        cls,
        model_id: str = DEFAULT_TEXT_ENCODER,
        *,
        max_length: int = 512,
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> TextEncoder:
        """Load tokenizer and encoder from a hub id or a local folder."""
        from transformers import AutoTokenizer

        dev, torch_dtype = resolve_device_dtype(device, dtype)
        config = _load_config(model_id, subfolder)
        tokenizer = AutoTokenizer.from_pretrained(
            model_id, **({"subfolder": tokenizer_subfolder} if tokenizer_subfolder else {})
        )
        with quiet_progress():
            model = _model_class(config.model_type).from_pretrained(
                model_id, dtype=torch_dtype, **({"subfolder": subfolder} if subfolder else {})
            )
        return cls(
            tokenizer,
            model.to(dev).eval(),
            model_id=model_id,
            max_length=max_length,
            subfolder=subfolder,
            tokenizer_subfolder=tokenizer_subfolder,
            random_weights=_is_tiny(model_id, subfolder),
        )

    @classmethod
    def from_manifest(
        cls, entry: Mapping[str, Any], *, device: str = "auto", dtype: str = "auto"
    ) -> TextEncoder:
        """Load the encoder a corpus manifest's ``text_encoder`` entry names, and check
        that it is the one the corpus was built with (class, width and, where the
        manifest has their digest, weights)."""
        enc = cls.from_pretrained(
            str(entry["id"]),
            max_length=int(entry.get("max_length", 512)),
            subfolder=entry.get("subfolder"),
            tokenizer_subfolder=entry.get("tokenizer_subfolder"),
            device=device,
            dtype=dtype,
        )
        got = enc.describe()
        for key in ("class", "dim"):
            if key in entry and entry[key] != got[key]:
                raise ValueError(
                    f"text encoder {entry['id']}: manifest says {key}={entry[key]!r}, "
                    f"the loaded model has {got[key]!r}"
                )
        check_weights(entry, "text encoder", enc.model_id, enc.subfolder)
        return enc

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> dict[str, Any]:
        """The manifest's ``text_encoder`` entry, but for ``weights_sha256`` (which reads
        the weight files: :func:`describe_text_encoder` has it)."""
        return {
            "id": self.model_id,
            "class": type(self.model).__name__,
            "dim": self.dim,
            "max_length": self.max_length,
            "subfolder": self.subfolder,
            "tokenizer_subfolder": self.tokenizer_subfolder,
            "random_weights": self.random_weights,
        }

    def num_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts after truncation to ``max_length`` (end token included)."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        return [len(x) for x in ids]

    def encode_padded(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, D)`` last hidden states padded to the longest text, and the ``(B, L)``
        attention mask (True on real tokens), on the model's device and dtype."""
        if not texts:
            raise ValueError("encode needs at least one text")
        import torch

        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].to(self.device)  # (B, L)
        mask = enc["attention_mask"].to(self.device)  # (B, L)
        with torch.inference_mode():
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return hidden, mask.bool()  # (B, L, D), (B, L)

    def encode(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """One ``(L_i, D)`` tensor per text, real tokens only. Padding is masked out of
        attention, so a text's embeddings do not depend on what it was batched with."""
        hidden, mask = self.encode_padded(texts)
        # select by mask, not by length: correct whichever side the tokenizer pads
        return [hidden[i][mask[i]] for i in range(hidden.shape[0])]
