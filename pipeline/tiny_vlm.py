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

from pathlib import Path

from model.tiny_text import (
    CHAT_TEMPLATE,
    CHATML_SPECIAL_TOKENS,
    MARKER_NAME,
    build_chatml_tokenizer,
    is_tiny,
    non_word_token_ids,
    publish_build,
)

__all__ = ["CHAT_TEMPLATE", "MARKER_NAME", "SPECIAL_TOKENS", "build_tiny_vlm", "is_tiny_vlm"]

# Qwen's chat and vision special tokens; the processor looks them up by these names.
SPECIAL_TOKENS = CHATML_SPECIAL_TOKENS

_SEED = 0
_VOCAB_SIZE = 384  # 256 byte symbols + 7 specials + some merges
# Wider than the real 0.02: at 0.02 a 2-layer, 32-wide model barely lets the video
# move the greedy answer, and tests need captions that depend on the clip.
_INIT_STD = 0.5


def is_tiny_vlm(model_dir: str) -> bool:
    """True when ``model_dir`` holds a tiny random-weight model built here."""
    return is_tiny(model_dir)


def build_tiny_vlm(out_dir: str) -> str:
    """Build (once) a tiny random-weight Qwen3-VL in ``out_dir``; return ``out_dir``.

    Deterministic: the tokenizer training is deterministic and the weights come from
    a fixed torch seed. A folder that already holds a complete, current build is left
    as is; one built by an older version of this function is rebuilt.
    """

    def save(folder: Path) -> None:
        import torch
        from transformers import (
            GenerationConfig,
            Qwen2VLImageProcessor,
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLProcessor,
            Qwen3VLVideoProcessor,
        )

        from model.weights import quiet_progress

        tokenizer = build_chatml_tokenizer(_VOCAB_SIZE)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        pad_id, eos_id = ids["<|endoftext|>"], ids["<|im_end|>"]

        # Real Qwen3-VL geometry (16 px patches, 2x2 merge, 2-frame temporal patches),
        # but a pixel budget of a few merged patches per frame so tests stay fast.
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

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            model = Qwen3VLForConditionalGeneration(config).eval()
        # A random model may emit end-of-turn, a vision token or stray bytes first; keep
        # it to word-like tokens so its (meaningless) captions are non-empty and pass
        # the captioner's language checks the way a real model's do.
        model.generation_config = GenerationConfig(
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            bos_token_id=None,
            suppress_tokens=non_word_token_ids(tokenizer),
            # random weights loop quickly; real models keep their own settings
            no_repeat_ngram_size=3,
            do_sample=False,
        )
        with quiet_progress():
            model.save_pretrained(str(folder))
        processor.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    marker = {
        "family": "qwen3_vl",
        "class": "Qwen3VLForConditionalGeneration",
        "note": "tiny random-weight test model built by pipeline.tiny_vlm; captions are meaningless",
    }
    needed = ("config.json", "generation_config.json", "model.safetensors", MARKER_NAME)
    return publish_build(out_dir, save, marker, needed)
