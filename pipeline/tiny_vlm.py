"""A tiny random-weight Qwen3-VL captioner, built offline, for tests and dry runs.

No machine here can download weights, so tests caption clips with a model of the
real family (``Qwen3VLForConditionalGeneration``, the class behind
``Qwen/Qwen3-VL-8B-Instruct``) that is built from a small config: a byte-level BPE
tokenizer trained in code, the family's image and video processors with a small
pixel budget, and 2-layer, 32-wide text and vision towers. It is saved with
``save_pretrained`` so that the caption stage loads it through exactly the same
``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` path as a real
checkpoint. Its captions are meaningless: ``reelpack_tiny.json`` in the folder says so.

Build one with::

    python -c "from pipeline.tiny_vlm import build_tiny_vlm; print(build_tiny_vlm('/tmp/tiny-vlm'))"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["MARKER_NAME", "SPECIAL_TOKENS", "build_tiny_vlm", "is_tiny_vlm"]

MARKER_NAME = "reelpack_tiny.json"

# Qwen's chat and vision special tokens; the processor looks them up by these names.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

_SEED = 0
_VOCAB_SIZE = 384  # 256 byte symbols + 7 specials + some merges
# Wider than the real 0.02: at 0.02 a 2-layer, 32-wide model barely lets the video
# move the greedy answer, and tests need captions that depend on the clip.
_INIT_STD = 0.5

# The structure of Qwen3-VL's own chat template (ChatML, one vision placeholder per
# image or video item), without its tool-calling branches.
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

# A few dozen caption-like strings: enough for BPE to learn some English merges, so
# decoded output looks like (nonsense) words rather than single bytes.
_CORPUS = (
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


def is_tiny_vlm(model_dir: str) -> bool:
    """True when ``model_dir`` holds a tiny random-weight model built here."""
    return (Path(model_dir) / MARKER_NAME).is_file()


def _build_tokenizer():  # -> PreTrainedTokenizerFast (kept untyped: lazy import)
    """Byte-level BPE over ``_CORPUS`` with Qwen's special tokens, in a HF wrapper."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # every byte gets a symbol, so any text (timestamps, unicode) is encodable
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # decoder-only batched generation pads on the left
    )


def _complete(out: Path) -> bool:
    """Every file a load needs is there (the marker is written last)."""
    needed = ("config.json", "generation_config.json", "model.safetensors", MARKER_NAME)
    return all((out / name).is_file() for name in needed)


def _move_in(staging: Path, out: Path) -> None:
    """Move a finished build to ``out``: one rename when ``out`` is absent or empty,
    else file by file with the marker last (unless another builder finished first)."""
    try:
        os.replace(staging, out)
        return
    except OSError:
        if _complete(out):
            return
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in staging.iterdir() if p.name != MARKER_NAME)
    for name in [*names, MARKER_NAME]:
        os.replace(staging / name, out / name)


def build_tiny_vlm(out_dir: str) -> str:
    """Build (once) a tiny random-weight Qwen3-VL in ``out_dir``; return ``out_dir``.

    Deterministic: the tokenizer training is deterministic and the weights come from
    a fixed torch seed. A folder that already holds a complete build is left as is.
    """
    out = Path(out_dir)
    if _complete(out):
        return str(out)

    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = _build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    pad_id, eos_id = ids["<|endoftext|>"], ids["<|im_end|>"]

    # Real Qwen3-VL geometry (16 px patches, 2x2 merge, 2-frame temporal patches), but
    # a pixel budget of a few merged patches per frame so tests stay fast.
    factor = 16 * 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],  # Qwen3-VL normalises to [-1, 1]
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": factor * factor, "longest_edge": 4 * factor * factor},
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        # budget over all frames (t * h * w), as Qwen3-VL's smart_resize counts it
        size={"shortest_edge": factor * factor, "longest_edge": 16 * factor * factor},
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    hidden, head_dim = 32, 8
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden // head_dim,
            "num_key_value_heads": 2,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            # interleaved M-RoPE over (t, h, w); sections sum to head_dim / 2
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
            "pad_token_id": pad_id,
            "bos_token_id": None,
            "eos_token_id": eos_id,
            "initializer_range": _INIT_STD,
        },
        vision_config={
            "depth": 2,
            "hidden_size": hidden,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden,
            "num_position_embeddings": 64,  # a square: positions are a 8x8 grid
            "deepstack_visual_indexes": [0],
            "initializer_range": _INIT_STD,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )

    torch.manual_seed(_SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # A random model may emit end-of-turn or a vision token first and stop with an
    # empty string; keep special tokens out of its output so captions are non-empty.
    model.generation_config = GenerationConfig(
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        suppress_tokens=sorted(ids.values()),
        do_sample=False,
    )

    marker = {
        "random_weights": True,
        "family": "qwen3_vl",
        "class": type(model).__name__,
        "seed": _SEED,
        "note": "tiny random-weight test model built by pipeline.tiny_vlm; captions are meaningless",
    }
    # Build beside the target and move it in, so that concurrent builders (several
    # Ray workers sharing one cache) never load a half-written folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(staging))
        processor.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        _move_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)
