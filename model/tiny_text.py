"""Tiny random-weight text models, built offline, for tests and dry runs.

No machine here can download weights, so tests use models of the real families,
built from small configs with tokenizers trained in code (no SentencePiece file):

- :func:`build_tiny_text_encoder`: a 2-layer, 32-wide ``UMT5EncoderModel`` (the
  family of ``google/umt5-xxl``, Wan 2.1's text encoder) or ``T5EncoderModel``, with
  a Unigram tokenizer in T5's conventions (``<pad>``=0, ``</s>``=1, ``<unk>``=2,
  ``</s>`` appended to every text).
- :func:`build_tiny_causal_lm`: a 2-layer, 32-wide ``Qwen3ForCausalLM`` with a
  byte-level BPE tokenizer and Qwen's ChatML chat template, for the prompt upsampler.

Each is saved with ``save_pretrained`` and loads back through exactly the loaders
users run (``AutoTokenizer``, ``AutoModelForCausalLM``, ``UMT5EncoderModel``
``.from_pretrained``). A ``reelpack_tiny.json`` marker in the folder says the
weights are random; :func:`is_tiny` reads it. Build one with::

    python -c "from model.tiny_text import build_tiny_text_encoder as b; print(b('/tmp/tiny-t5'))"
    python -c "from model.tiny_text import build_tiny_causal_lm as b; print(b('/tmp/tiny-lm'))"

The ChatML tokenizer (:func:`build_chatml_tokenizer`) and the atomic folder
publishing (:func:`publish_build`) are shared with ``pipeline.tiny_vlm``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CAPTION_CORPUS",
    "CHATML_SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "MARKER_NAME",
    "build_chatml_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_causal_lm",
    "build_tiny_text_encoder",
    "is_tiny",
    "non_word_token_ids",
    "publish_build",
]

MARKER_NAME = "reelpack_tiny.json"

# Qwen's chat and vision special tokens; Qwen processors look them up by these names.
CHATML_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The structure of Qwen's own chat template (ChatML; one vision placeholder per image
# or video item), without its tool-calling branches.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

# A few dozen caption-like strings: enough for the tokenizers to learn English pieces,
# so decoded output looks like (nonsense) words rather than single bytes.
CAPTION_CORPUS = (
    "A person walks along a sandy beach at sunset while waves roll in.",
    "The camera slowly pans left across a crowded city street at night.",
    "A red car drives down a winding mountain road in bright daylight.",
    "Close-up of hands kneading dough on a wooden kitchen table.",
    "A dog runs through tall green grass toward the camera.",
    "Wide shot of a snowy forest, soft overcast light, static camera.",
    "A woman in a blue coat looks out of a rainy window.",
    "Aerial view of a river winding through autumn hills.",
    "Two children play soccer in a park under warm afternoon light.",
    "The camera tracks a cyclist riding past old brick buildings.",
    "Time-lapse of clouds moving over a desert landscape.",
    "A man pours coffee into a white mug, shallow depth of field.",
    "Handheld footage of a busy market with colorful fruit stalls.",
    "A cat sleeps on a sofa next to a sunny window.",
    "Slow zoom in on a candle flame in a dark room.",
    "A train crosses a steel bridge over a wide river at dawn.",
    "Underwater shot of fish swimming around a coral reef.",
    "A chef slices vegetables quickly on a cutting board.",
    "Night scene of neon signs reflecting on wet pavement.",
    "A skateboarder performs a jump in an empty concrete skate park.",
    "The camera tilts up from a fountain to a tall glass tower.",
    "Golden hour light falls across a field of wheat in the wind.",
    "An old man reads a newspaper on a park bench.",
    "Cinematic wide shot of waves crashing against dark rocks.",
    "A hand writes notes with a pen on lined paper.",
    "Medium shot of a musician playing guitar on a small stage.",
    "Drone footage circling a lighthouse on a rocky coast.",
    "A bird lands on a branch covered in fresh snow.",
    "Static shot of a quiet library with rows of wooden shelves.",
    "Fireworks burst over a city skyline, filmed from a rooftop.",
    "Describe this video in detail: subjects, actions, setting, camera, lighting, style.",
    "The video shows 0.5 1.0 1.5 2.0 2.5 3.0 seconds of footage.",
)

_SEED = 0
_INIT_STD = 0.5  # wider than the real 0.02, so a tiny model's output depends on its input
# Bump when a builder's output changes: folders built by an older version are rebuilt.
_BUILD_VERSION = 4
# Decoded pieces a tiny model may emit: ASCII letters, spaces and light punctuation.
_WORDLIKE = re.compile(r"[A-Za-z ,.'-]*[A-Za-z][A-Za-z ,.'-]*")


def is_tiny(model_dir: str) -> bool:
    """True when ``model_dir`` is a local folder holding a random-weight model built here."""
    return (Path(model_dir) / MARKER_NAME).is_file()


def _marker_version(out: Path) -> int | None:
    try:
        return int(json.loads((out / MARKER_NAME).read_text()).get("version", 1))
    except (OSError, ValueError, AttributeError):
        return None


def _complete(out: Path, needed: tuple[str, ...]) -> bool:
    """Every file a load needs is there and the marker (written last) is current."""
    return all((out / n).is_file() for n in needed) and _marker_version(out) == _BUILD_VERSION


def _move_in(staging: Path, out: Path, needed: tuple[str, ...]) -> None:
    """Move a finished build to ``out``: one rename when ``out`` is absent or empty,
    else file by file with the marker last (unless another builder finished first)."""
    try:
        os.replace(staging, out)
        return
    except OSError:
        if _complete(out, needed):
            return
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir() if p.name != MARKER_NAME)
    for name in [*names, MARKER_NAME]:
        os.replace(staging / name, out / name)


def publish_build(
    out_dir: str,
    save: Callable[[Path], None],
    marker: dict[str, Any],
    needed: tuple[str, ...] = ("config.json",),
) -> str:
    """Run ``save(folder)`` into a staging folder beside ``out_dir`` and move it in.

    Idempotent: a folder that already holds a complete, current build is left alone.
    Concurrent builders (several Ray workers sharing one cache) never load a
    half-written folder, because the marker is moved in last.
    """
    out = Path(out_dir)
    if _complete(out, needed):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save(staging)
        body = {"random_weights": True, "version": _BUILD_VERSION, "seed": _SEED, **marker}
        (staging / MARKER_NAME).write_text(json.dumps(body, indent=2) + "\n")
        _move_in(staging, out, needed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


# --- tokenizers ------------------------------------------------------------------------
def build_chatml_tokenizer(vocab_size: int = 384) -> Any:
    """Byte-level BPE over :data:`CAPTION_CORPUS` with Qwen's special tokens and chat
    template, as a ``PreTrainedTokenizerFast`` that pads on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        # every byte gets a symbol, so any text (timestamps, unicode) is encodable
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CAPTION_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # decoder-only batched generation pads on the left
    )


def build_t5_tokenizer(vocab_size: int = 320, model_max_length: int = 512) -> Any:
    """A Unigram tokenizer in T5's conventions over :data:`CAPTION_CORPUS`.

    ``<pad>``=0, ``</s>``=1, ``<unk>``=2 as in T5/umT5; ``</s>`` is appended to every
    text, so an encoded caption's length counts its end token like the real ones. The
    pieces are fixed, not trained (the ``tokenizers`` Unigram trainer picks different
    pieces in each process): see :func:`t5_vocab`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram(t5_vocab(vocab_size), unk_id=2))
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def t5_vocab(vocab_size: int = 320) -> list[tuple[str, float]]:
    """:func:`build_t5_tokenizer`'s pieces and log-probability scores, the same everywhere.

    The three special tokens, ``▁`` and every printable ASCII character (anything else is
    ``<unk>``, as in T5), then the corpus's words as ``▁word`` pieces, most frequent first
    (ties by spelling), up to ``vocab_size``. A word scores its log frequency and a single
    character scores below any word, so a known word is one piece and any other is spelled.
    """
    words: dict[str, int] = {}
    for text in CAPTION_CORPUS:
        for word in re.findall(r"[A-Za-z]+", text):
            words[word] = words.get(word, 0) + 1
    total = sum(words.values())
    char_score = math.log(1 / total) - 4.0
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", char_score)]
    vocab += [(chr(c), char_score) for c in range(33, 127)]
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    room = max(0, vocab_size - len(vocab))
    vocab += [("\u2581" + w, math.log(n / total)) for w, n in ranked[:room]]
    return vocab


def non_word_token_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens that do not decode to word-like ASCII (specials, bytes, digits).

    A random-weight model that may only emit the other tokens writes pseudo-words,
    which pass the captioner's language checks; real models are never restricted.
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    out = []
    for token_id in sorted(vocab.values()):
        piece = tokenizer.decode([token_id])
        if token_id in special or not _WORDLIKE.fullmatch(piece):
            out.append(token_id)
    return out


# --- models ----------------------------------------------------------------------------
_ENCODER_FAMILIES = ("umt5", "t5")


def build_tiny_text_encoder(out_dir: str, family: str = "umt5") -> str:
    """Build (once) a tiny random-weight T5-family encoder in ``out_dir``; return it.

    ``family``: ``"umt5"`` (``UMT5EncoderModel``, as Wan 2.1) or ``"t5"``
    (``T5EncoderModel``). Deterministic: fixed tokenizer pieces and torch seed.
    """
    if family not in _ENCODER_FAMILIES:
        raise ValueError(f"unknown text encoder family {family!r}; known: {_ENCODER_FAMILIES}")

    def save(folder: Path) -> None:
        import torch
        from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

        from model.weights import quiet_progress

        tokenizer = build_t5_tokenizer()
        classes: tuple[Any, Any] = (
            (UMT5Config, UMT5EncoderModel) if family == "umt5" else (T5Config, T5EncoderModel)
        )
        config_cls, model_cls = classes
        config = config_cls(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",  # umT5 / T5 v1.1
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            model = model_cls(config).eval()
        with quiet_progress():
            model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    marker = {
        "family": family,
        "note": "tiny random-weight text encoder built by model.tiny_text; embeddings are meaningless",
    }
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    return publish_build(out_dir, save, marker, needed)


def build_tiny_causal_lm(out_dir: str) -> str:
    """Build (once) a tiny random-weight ``Qwen3ForCausalLM`` with a ChatML tokenizer.

    Its greedy output is meaningless but word-like (see :func:`non_word_token_ids`).
    """
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from model.weights import quiet_progress

    def save(folder: Path) -> None:
        tokenizer = build_chatml_tokenizer()
        config = Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=4096,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=_INIT_STD,
            tie_word_embeddings=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            model = Qwen3ForCausalLM(config).eval()
        model.generation_config = GenerationConfig(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
            suppress_tokens=non_word_token_ids(tokenizer),
            # random weights loop quickly; real models keep their own settings
            no_repeat_ngram_size=3,
            do_sample=False,
        )
        with quiet_progress():
            model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    marker = {
        "family": "qwen3",
        "class": "Qwen3ForCausalLM",
        "note": "tiny random-weight causal LM built by model.tiny_text; output is meaningless",
    }
    needed = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
    return publish_build(out_dir, save, marker, needed)
