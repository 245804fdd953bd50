"""Caption stage: a dense, literal description of every kept clip, by a video VLM.

1:1, one clip row in, the same row out with ``caption`` (and optionally
``caption_short``) set. Only rows with ``status == "kept"`` are captioned; rejected
and failed rows pass through untouched. The clip is read from ``clip_bytes`` (decode
once: the source is never reopened); frames are sampled evenly over the whole clip
(``num_frames`` of them, or ``sample_fps`` per second up to ``num_frames``) and
resized to at most ``max_pixels`` each, keeping the aspect ratio, and the model
generates greedily, several clips per ``generate`` call. A one-frame clip (an image
source) is given to the model as an image, with ``image_prompt``.

The model is any ``transformers`` image-text-to-text model that takes videos
(``AutoProcessor`` + ``AutoModelForImageTextToText``), from a hub id or a local
folder; the default is ``Qwen/Qwen3-VL-8B-Instruct``. It loads once per instance
(one per Ray actor), in bfloat16 on a GPU. Tests use a tiny random-weight Qwen3-VL
from :mod:`pipeline.tiny_vlm`, loaded the same way; captions from a model folder
carrying the tiny marker start with :data:`RANDOM_WEIGHTS_PREFIX`.

Output hygiene (:func:`finish_caption`): drop control characters and reasoning
blocks, collapse whitespace, strip boilerplate openings ("The video shows ..."), cap
the length at ``max_caption_tokens`` and end a cut caption at its last full
sentence. Degenerate output (empty, looping n-grams, non-language) is generated
once more with a repetition penalty; if it is still degenerate the clip becomes
``status="error"`` with the reason. Measured facts from earlier stages (duration,
frame size and aspect, amount of motion) can be given to the model as hints.

Robustness: one bad clip fails alone (an error row naming the clip and the cause);
a CUDA out-of-memory halves the generate batch and retries, and the actor keeps the
smaller batch from then on.
"""

from __future__ import annotations

import gc
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from pipeline.stages.base import Batch, num_rows
from pipeline.video import decode_mp4_sampled, even_size

__all__ = [
    "CAPTION_FACETS",
    "DEFAULT_IMAGE_PROMPT",
    "DEFAULT_IMAGE_SHORT_PROMPT",
    "DEFAULT_PROMPT",
    "DEFAULT_SHORT_PROMPT",
    "RANDOM_WEIGHTS_PREFIX",
    "CaptionConfig",
    "Captioner",
    "ClipFacts",
    "DegenerateCaption",
    "PreparedClip",
    "RawCaption",
    "aspect_name",
    "cap_tokens",
    "clean_caption",
    "clip_facts",
    "decode_sampled",
    "degenerate_reason",
    "describe_facts",
    "finish_caption",
    "first_sentence",
    "fit_frames",
    "prepare_clip",
    "sample_frame_indices",
    "sample_frame_indices_fps",
    "trim_to_sentence",
]

log = logging.getLogger(__name__)

# What a training caption covers, in order. Shared with the prompt upsampler
# (``pipeline.upsample``), so that prompts at inference read like training captions.
CAPTION_FACETS = (
    "the main subjects and their appearance (clothing, colors, materials); "
    "what they do and how it changes over time, in order; the setting and background; "
    "the camera's motion (static, pan, tilt, zoom, dolly, handheld, tracking) and framing "
    "(close-up, medium, wide, angle); the lighting and time of day; the visual style "
    "(live action, animation, film grain, color grade)"
)

DEFAULT_PROMPT = (
    "Describe this video in dense, literal detail for a text-to-video training set. "
    f"Cover: {CAPTION_FACETS}. "
    "State only what is visible. Do not guess names, intentions or sounds. "
    "Write one plain paragraph without lists, headings or an introduction."
)

DEFAULT_SHORT_PROMPT = (
    "Describe this video in one short sentence: the main subject, what it does, and "
    "the setting. State only what is visible."
)

# The same for a still image (a one-frame clip): nothing moves, so no motion over time
# and no camera motion to describe.
IMAGE_FACETS = (
    "the main subjects and their appearance (clothing, colors, materials); what they are "
    "doing; the setting and background; the framing (close-up, medium, wide, angle); the "
    "lighting and time of day; the visual style (photograph, illustration, animation, "
    "film grain, color grade)"
)

DEFAULT_IMAGE_PROMPT = (
    "Describe this image in dense, literal detail for a text-to-video training set. "
    f"Cover: {IMAGE_FACETS}. "
    "State only what is visible. Do not guess names, intentions or sounds. "
    "Write one plain paragraph without lists, headings or an introduction."
)

DEFAULT_IMAGE_SHORT_PROMPT = (
    "Describe this image in one short sentence: the main subject, what it does, and "
    "the setting. State only what is visible."
)

# Captions of a random-weight test model say so, wherever they end up.
RANDOM_WEIGHTS_PREFIX = "[random-weight tiny model] "

# Openings that carry no content; Qwen-style models start most answers with one.
_BOILERPLATE = re.compile(
    r"^(?:(?:the|this) (?:video|clip|footage|scene|sequence|image|picture|photo|photograph) "
    r"(?:shows|depicts|features|captures|presents|displays|begins with|opens with|is of)"
    r"|in (?:the|this) (?:video|clip|footage|scene|image|picture|photo))[\s:,]+",
    re.IGNORECASE,
)
# A label some models put before the answer ("Caption: ...", "**Description:** ...").
_LABEL = re.compile(r"^\**\s*(?:caption|description)\s*:\s*\**\s*", re.IGNORECASE)
# Reasoning blocks of "thinking" model variants.
_THINK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
# C0/C1 control characters other than whitespace: never part of a caption.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
# The end of a sentence: . ! ? (possibly inside a closing quote or bracket), then a
# space or the end.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]?(?=\s|$)")
_WORD = re.compile(r"\w+")
# A unit of up to 8 characters repeated 8+ times in a row ("hahaha...", "!!!!...").
_CHAR_LOOP = re.compile(r"(.{1,8}?)\1{7,}", re.DOTALL)

# Degenerate-output thresholds (see degenerate_reason).
_MIN_LETTER_SHARE = 0.5  # letters among non-space characters
_MAX_DUP_TRIGRAM_SHARE = 0.5  # repeated word 3-grams among all 3-grams
_MAX_PHRASE_REPEATS = 2  # an identical 5-word phrase may occur this often

# Words for the measured motion score (mean absolute frame difference in [0, 1]).
_MOTION_WORDS = (
    (0.01, "very little change between frames"),
    (0.04, "moderate change between frames"),
    (math.inf, "a lot of change between frames"),
)
# Common frame shapes, long side over short side.
_ASPECTS = (
    ("1:1", 1.0),
    ("5:4", 1.25),
    ("4:3", 4 / 3),
    ("3:2", 1.5),
    ("16:9", 16 / 9),
    ("1.85:1", 1.85),
    ("2:1", 2.0),
    ("2.39:1", 2.39),
)


@dataclass(frozen=True)
class CaptionConfig:
    """How clips are captioned. ``enabled`` and the Ray resources
    (``BuildConfig.ray.caption``) are read by ``pipeline.graph`` only."""

    model: str = "Qwen/Qwen3-VL-8B-Instruct"  # hub id or local folder
    prompt: str = DEFAULT_PROMPT
    num_frames: int = 8  # sampled evenly over the clip; the cap when sample_fps is set
    sample_fps: float | None = None  # frames per second of clip instead of a fixed count
    # per-frame pixel budget before the processor (which may shrink further to its own);
    # 256x384 = Qwen3-VL's default video budget spread over 8 frames
    max_pixels: int = 256 * 384
    max_new_tokens: int = 256
    max_caption_tokens: int = 256  # cap after hygiene, in the captioner's tokens
    batch_size: int = 4  # clips per generate() call (halved on CUDA out-of-memory)
    hints: bool = False  # give the model measured duration, frame size and motion
    retry_repetition_penalty: float = 1.2  # for the one retry of a degenerate caption
    short_caption: bool = False  # also write caption_short (one sentence)
    short_prompt: str = DEFAULT_SHORT_PROMPT
    short_max_new_tokens: int = 64
    # for one-frame clips (image sources), given to the model as an image
    image_prompt: str = DEFAULT_IMAGE_PROMPT
    image_short_prompt: str = DEFAULT_IMAGE_SHORT_PROMPT
    device: str = "auto"  # "auto" = cuda if available, else cpu; or "cpu", "cuda:1", ...
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU; or a torch dtype name
    enabled: bool = True  # False: the graph skips the stage (captions stay None)


@dataclass(frozen=True)
class PreparedClip:
    """Sampled, resized frames of one clip and what the processor must know about them."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    indices: list[int]  # positions of the frames in the decoded clip
    total_frames: int
    fps: float

    @property
    def is_image(self) -> bool:
        """A one-frame clip (an image source): captioned as an image."""
        return self.total_frames == 1


@dataclass(frozen=True)
class RawCaption:
    """A decoded answer and whether generation stopped at ``max_new_tokens``."""

    text: str
    truncated: bool = False


@dataclass(frozen=True)
class ClipFacts:
    """Measured facts about a clip from earlier stages; None where unknown."""

    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    motion: float | None = None  # score_motion


class DegenerateCaption(ValueError):
    """The model's answer is not a usable caption (the message says why)."""


# --- frames ----------------------------------------------------------------------------
def sample_frame_indices(total: int, num: int, min_count: int = 2) -> np.ndarray:
    """``num`` frame indices spread evenly over ``[0, total)``, first and last included.

    Never more than ``total`` distinct frames; short clips repeat frames up to
    ``min_count`` because video VLMs need whole temporal patches (2 frames for Qwen).
    """
    if total < 1:
        raise ValueError(f"need at least one frame, got {total}")
    if num < 1:
        raise ValueError(f"need to sample at least one frame, got {num}")
    count = max(min(num, total), min_count)
    return np.linspace(0, total - 1, count).round().astype(np.int64)


def sample_frame_indices_fps(
    total: int, fps: float, sample_fps: float, max_count: int, min_count: int = 2
) -> np.ndarray:
    """Indices at about ``sample_fps`` frames per second of clip, evenly spread, at most
    ``max_count`` (long clips are covered sparser, never cut)."""
    if fps <= 0 or sample_fps <= 0:
        raise ValueError(f"need positive rates, got fps={fps}, sample_fps={sample_fps}")
    wanted = max(1, round(total / fps * sample_fps))
    return sample_frame_indices(total, min(wanted, max_count), min_count)


def fit_frames(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    """Downscale (T, H, W, 3) frames to at most ``max_pixels`` each, keeping the aspect.

    Frames already within budget are returned unchanged (never upscaled).
    """
    _, h, w, _ = frames.shape
    if h * w <= max_pixels:
        return frames
    new_w, new_h = even_size(w, h, max_pixels)
    # INTER_AREA: the alias-free choice for downscaling
    return np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_AREA) for f in frames])


def _sample_indices(
    total: int, fps: float, num_frames: int, sample_fps: float | None
) -> np.ndarray:
    if sample_fps is None:
        return sample_frame_indices(total, num_frames)
    return sample_frame_indices_fps(total, fps, sample_fps, num_frames)


def decode_sampled(
    clip_bytes: bytes, num_frames: int, sample_fps: float | None = None
) -> tuple[np.ndarray, list[int], int, float]:
    """Decode only what the captioner needs: ``(frames (N, H, W, 3), indices, total, fps)``
    (:func:`pipeline.video.decode_mp4_sampled`; 24 fps when the payload has no rate)."""
    frames, indices, total, fps = decode_mp4_sampled(
        clip_bytes,
        lambda total, fps: _sample_indices(total, fps or 24.0, num_frames, sample_fps),
    )
    return frames, [int(i) for i in indices], total, fps or 24.0


def prepare_clip(
    clip_bytes: bytes, num_frames: int, max_pixels: int, sample_fps: float | None = None
) -> PreparedClip:
    """Decode mp4 bytes, sample frames evenly (a count, or a rate capped at
    ``num_frames``) and fit them to ``max_pixels``. A one-frame clip keeps its one frame
    (an image, not a video of it repeated)."""
    frames, indices, total, fps = decode_sampled(clip_bytes, num_frames, sample_fps)
    if total == 1:
        frames, indices = frames[:1], indices[:1]
    return PreparedClip(
        frames=fit_frames(frames, max_pixels), indices=indices, total_frames=total, fps=fps
    )


# --- hints -----------------------------------------------------------------------------
def aspect_name(width: int, height: int) -> str:
    """ "16:9 landscape", "9:16 portrait", "1:1 square" or "2.10:1 landscape"."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad frame size {width}x{height}")
    ratio = max(width, height) / min(width, height)
    name, ref = min(_ASPECTS, key=lambda a: abs(a[1] - ratio))
    if abs(ref - ratio) / ref > 0.03:
        name = f"{ratio:.2f}:1"
    if ratio < 1.03:
        return "1:1 square"
    if height > width:
        name = ":".join(reversed(name.split(":")))
        return f"{name} portrait"
    return f"{name} landscape"


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def clip_facts(batch: Batch, i: int) -> ClipFacts:
    """The measured facts of row ``i`` (columns absent or null give None)."""

    def col(name: str) -> Any:
        values = batch.get(name)
        return None if values is None else values[i]

    start, end = _finite(col("start_s")), _finite(col("end_s"))
    width, height = _finite(col("width")), _finite(col("height"))
    return ClipFacts(
        duration_s=end - start if start is not None and end is not None and end > start else None,
        width=int(width) if width and width > 0 else None,
        height=int(height) if height and height > 0 else None,
        motion=_finite(col("score_motion")),
    )


def describe_facts(facts: ClipFacts) -> str:
    """A sentence of measured facts for the prompt ("" when nothing is known)."""
    parts = []
    if facts.duration_s is not None:
        parts.append(f"it lasts {facts.duration_s:.1f} seconds")
    if facts.width and facts.height:
        parts.append(
            f"its frame is {facts.width}x{facts.height} pixels "
            f"({aspect_name(facts.width, facts.height)})"
        )
    if facts.motion is not None:
        words = next(w for limit, w in _MOTION_WORDS if facts.motion < limit)
        parts.append(f"it shows {words}")
    if not parts:
        return ""
    return (
        "Measured facts about this clip, to check your description against "
        f"(do not quote them): {'; '.join(parts)}."
    )


# --- hygiene ---------------------------------------------------------------------------
def clean_caption(text: str) -> str:
    """Light hygiene: drop control characters and reasoning blocks, collapse whitespace,
    strip a label ("Caption:"), wrapping quotes and a boilerplate opening ("The video
    shows ..."), capitalise. May return ""."""
    text = _WHITESPACE.sub(" ", _CONTROL.sub("", _THINK.sub(" ", text))).strip()
    text = _LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    stripped = _BOILERPLATE.sub("", text, count=1).strip()
    if stripped and stripped != text:
        text = stripped[0].upper() + stripped[1:]
    return text


def trim_to_sentence(text: str) -> str:
    """Cut ``text`` after its last complete sentence (unchanged when it has none)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].strip() if ends else text


def first_sentence(text: str) -> str:
    """The first sentence of ``text`` (all of it when it has no sentence end)."""
    match = _SENTENCE_END.search(text)
    return text[: match.end()].strip() if match else text.strip()


def cap_tokens(
    text: str,
    max_tokens: int,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
) -> tuple[str, bool]:
    """``text`` cut to ``max_tokens`` tokens, and whether it was cut."""
    ids = list(encode(text))
    if max_tokens < 1 or len(ids) <= max_tokens:
        return text, False
    # a byte-level cut may split a character: drop the replacement char it leaves
    return decode(ids[:max_tokens]).rstrip("\ufffd").strip(), True


def finish_caption(
    raw: RawCaption,
    max_tokens: int,
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
) -> str:
    """Clean, cap at ``max_tokens`` and, when cut (here or by ``max_new_tokens``), end at
    the last complete sentence."""
    text = clean_caption(raw.text)
    text, cut = cap_tokens(text, max_tokens, encode, decode)
    return trim_to_sentence(text) if cut or raw.truncated else text


def degenerate_reason(text: str) -> str | None:
    """Why ``text`` is not a usable caption, or None when it is.

    Degenerate: empty; mostly non-letters (garbage bytes, symbols, numbers); a short
    unit looping ("hahaha...", "!!!!!!!!"); more than half of the word 3-grams
    repeated; or one 5-word phrase occurring 3+ times.
    """
    if not text.strip():
        return "empty caption"
    visible = [c for c in text if not c.isspace()]
    letter_share = sum(c.isalpha() for c in visible) / len(visible)
    if letter_share < _MIN_LETTER_SHARE:
        return f"non-language output ({letter_share:.0%} letters)"
    loop = _CHAR_LOOP.search(text)
    if loop and len(loop.group(0)) >= 16:
        return f"looping characters {loop.group(1)!r}"
    words = _WORD.findall(text.lower())
    if len(words) >= 8:
        grams = [tuple(words[k : k + 3]) for k in range(len(words) - 2)]
        dup = 1 - len(set(grams)) / len(grams)
        if dup > _MAX_DUP_TRIGRAM_SHARE:
            return f"repeated 3-grams ({dup:.0%} of the text)"
    phrases = Counter(tuple(words[k : k + 5]) for k in range(len(words) - 4))
    if phrases:
        phrase, count = phrases.most_common(1)[0]
        if count > _MAX_PHRASE_REPEATS:
            return f"the phrase {' '.join(phrase)!r} repeats {count} times"
    return None


# --- the stage -------------------------------------------------------------------------
def _clip_error(clip_id: Any, cause: str | BaseException) -> str:
    if isinstance(cause, DegenerateCaption):
        cause = f"degenerate output: {cause}"
    elif isinstance(cause, BaseException):
        cause = f"{type(cause).__name__}: {cause}"
    return f"caption failed for clip {clip_id}: {cause}"


def _object_column(values: np.ndarray | None, n: int) -> np.ndarray:
    """A copy of ``values`` as an object array (all ``None`` when the column is absent)."""
    out = np.empty(n, dtype=object)
    if values is not None:
        out[:] = list(values)
    return out


_GenResult = RawCaption | BaseException


class Captioner:
    """``Captioner(cfg)(batch) -> batch``: captions the kept clips of a batch.

    Loads the processor and model once, in ``__init__`` (one per Ray actor).
    """

    reads: tuple[str, ...] = (
        "clip_id",
        "status",
        "clip_bytes",
        "start_s",
        "end_s",
        "width",
        "height",
        "score_motion",
    )
    writes: tuple[str, ...] = ("caption", "caption_short", "status", "error")

    def __init__(self, cfg: CaptionConfig = CaptionConfig()) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from model.tiny_text import is_tiny

        bad = [
            f"{name} must be >= {low}, got {value}"
            for name, value, low in (
                ("num_frames", cfg.num_frames, 1),
                ("max_pixels", cfg.max_pixels, 4),  # a frame of 2x2 pixels at least
                ("batch_size", cfg.batch_size, 1),
                ("max_new_tokens", cfg.max_new_tokens, 1),
            )
            if value < low
        ]
        if cfg.sample_fps is not None and cfg.sample_fps <= 0:
            bad.append(f"sample_fps must be > 0 or null, got {cfg.sample_fps}")
        if bad:
            raise ValueError("caption config: " + "; ".join(bad))
        self.cfg = cfg
        from model.device import resolve_device_dtype
        from model.weights import quiet_progress

        self.device, self.dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        # decoder-only batched generation: pad on the left so every prompt ends at the
        # position where generation starts
        self.processor.tokenizer.padding_side = "left"
        # Any: transformers types PreTrainedModel.to as taking a model, not a device
        with quiet_progress():
            model: Any = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self._torch = torch
        self.random_weights = is_tiny(cfg.model)
        self.prefix = RANDOM_WEIGHTS_PREFIX if self.random_weights else ""
        # generate() calls may shrink below cfg.batch_size after a CUDA out-of-memory
        self.batch_limit = cfg.batch_size
        self._chat_cache: dict[tuple[str, bool], str] = {}
        self.prompt_text: str = self._chat(cfg.prompt)
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # Qwen3-VL's processor warns unless told which per-frame pixel cap to use; we
        # size frames ourselves, so take the reference (qwen-vl-utils) behaviour.
        video_processor = getattr(self.processor, "video_processor", None)
        self._video_kwargs: dict[str, Any] = {}
        if hasattr(type(video_processor), "cap_pixels_per_frame"):
            self._video_kwargs["cap_pixels_per_frame"] = True

    # --- text helpers ---------------------------------------------------------------
    def _chat(self, prompt: str, image: bool = False) -> str:
        """The chat-templated model input for one instruction about one video (or, with
        ``image``, one image)."""
        key = (prompt, image)
        if key not in self._chat_cache:
            media = {"type": "image" if image else "video"}
            messages = [{"role": "user", "content": [media, {"type": "text", "text": prompt}]}]
            self._chat_cache[key] = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        return self._chat_cache[key]

    def _encode_text(self, text: str) -> list[int]:
        return list(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode_text(self, ids: Sequence[int]) -> str:
        return str(self.processor.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _finish(self, raw: RawCaption, max_tokens: int) -> str:
        return finish_caption(raw, max_tokens, self._encode_text, self._decode_text)

    def prompt_for(self, batch: Batch, i: int, image: bool = False) -> str:
        """The instruction for row ``i``: the configured prompt (``image_prompt`` for an
        image), plus measured facts when ``hints`` is on."""
        prompt = self.cfg.image_prompt if image else self.cfg.prompt
        if not self.cfg.hints:
            return prompt
        facts = clip_facts(batch, i)
        if image:  # it lasts no time and nothing moves
            facts = replace(facts, duration_s=None, motion=None)
        described = describe_facts(facts)
        return f"{prompt}\n{described}" if described else prompt

    # --- model calls ------------------------------------------------------------------
    def model_inputs(self, clips: Sequence[PreparedClip], prompts: Sequence[str]) -> Any:
        """The processor's batch for ``clips`` (tokens, patchified frames), on the device:
        videos as videos, one-frame clips as images."""
        media: dict[str, Any] = {}
        videos = [c for c in clips if not c.is_image]
        if videos:
            media["videos"] = [c.frames for c in videos]
            # frames are already sampled: the processor must not sample again, and
            # needs their positions and the rate to write Qwen3-VL's timestamps
            media["video_metadata"] = [
                {
                    "total_num_frames": c.total_frames,
                    "fps": c.fps,
                    "frames_indices": c.indices,
                    "width": int(c.frames.shape[2]),
                    "height": int(c.frames.shape[1]),
                    "duration": c.total_frames / c.fps,
                }
                for c in videos
            ]
            media["do_sample_frames"] = False
            media.update(self._video_kwargs)
        images = [c.frames[0] for c in clips if c.is_image]
        if images:
            media["images"] = images
        inputs = self.processor(
            text=[self._chat(p, c.is_image) for c, p in zip(clips, prompts, strict=True)],
            padding=True,
            return_tensors="pt",
            **media,
        )
        inputs = inputs.to(self.device)
        for name in ("pixel_values", "pixel_values_videos"):
            if name in inputs:
                inputs[name] = inputs[name].to(self.dtype)
        return inputs

    def generate_from_inputs(self, inputs: Any, **gen_kwargs: Any) -> list[RawCaption]:
        """Greedy answers for a processor batch, decoded."""
        kwargs = {"max_new_tokens": self.cfg.max_new_tokens, "do_sample": False, **gen_kwargs}
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, new)
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return [
            RawCaption(
                text=str(text),
                # no end token among the new ones: stopped by max_new_tokens
                truncated=not self._eos_ids.intersection(row.tolist()),
            )
            for text, row in zip(texts, new_tokens, strict=True)
        ]

    def _generate(
        self, clips: Sequence[PreparedClip], prompts: Sequence[str], **gen_kwargs: Any
    ) -> list[RawCaption]:
        """Raw decoded answers for ``clips`` in one ``generate`` call."""
        return self.generate_from_inputs(self.model_inputs(clips, prompts), **gen_kwargs)

    def _free_memory(self) -> None:
        gc.collect()
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()

    def _each_alone(
        self, clips: Sequence[PreparedClip], prompts: Sequence[str], **gen_kwargs: Any
    ) -> list[_GenResult]:
        results: list[_GenResult] = []
        for clip, prompt in zip(clips, prompts, strict=True):
            try:
                results.append(self._generate([clip], [prompt], **gen_kwargs)[0])
            except Exception as exc:  # this clip only
                results.append(exc)
        return results

    def generate_adaptive(
        self, clips: Sequence[PreparedClip], prompts: Sequence[str], **gen_kwargs: Any
    ) -> list[_GenResult]:
        """Answers for ``clips`` in ``generate`` calls of at most ``batch_limit`` clips.

        A CUDA out-of-memory halves ``batch_limit`` (for the rest of this actor's life)
        and retries the same clips; any other failure of a batched call retries each
        clip alone, so that one bad clip only fails itself.
        """
        results: list[_GenResult] = []
        start = 0
        while start < len(clips):
            size = min(self.batch_limit, len(clips) - start)
            part_clips, part_prompts = clips[start : start + size], prompts[start : start + size]
            oom: str | None = None
            try:
                part: list[_GenResult] = list(
                    self._generate(part_clips, part_prompts, **gen_kwargs)
                )
            except self._torch.cuda.OutOfMemoryError as exc:
                # keep only the message: the traceback's frames hold the failed call's tensors
                oom = str(exc)
                part = []
            except Exception as exc:  # one clip may have broken the whole call
                part = (
                    self._each_alone(part_clips, part_prompts, **gen_kwargs) if size > 1 else [exc]
                )
            if oom is not None:
                self._free_memory()
                if size > 1:
                    self.batch_limit = max(1, size // 2)
                    log.warning(
                        "caption: CUDA out of memory with %d clips per generate(); retrying with %d",
                        size,
                        self.batch_limit,
                    )
                    continue
                part = [self._torch.cuda.OutOfMemoryError(f"even for one clip: {oom}")]
            results.extend(part)
            start += size
        return results

    def _caption_chunk(
        self, clips: Sequence[PreparedClip], prompts: Sequence[str]
    ) -> list[str | BaseException]:
        """Final captions (or the reason there is none) for one chunk of clips."""
        results: list[str | BaseException] = []
        for raw in self.generate_adaptive(clips, prompts):
            results.append(
                raw
                if isinstance(raw, BaseException)
                else self._finish(raw, self.cfg.max_caption_tokens)
            )
        retry = [k for k, r in enumerate(results) if isinstance(r, str) and degenerate_reason(r)]
        if retry:
            again = self.generate_adaptive(
                [clips[k] for k in retry],
                [prompts[k] for k in retry],
                repetition_penalty=self.cfg.retry_repetition_penalty,
            )
            for k, raw in zip(retry, again, strict=True):
                results[k] = (
                    raw
                    if isinstance(raw, BaseException)
                    else self._finish(raw, self.cfg.max_caption_tokens)
                )
        for k, r in enumerate(results):
            reason = degenerate_reason(r) if isinstance(r, str) else None
            if reason:
                suffix = " after a retry" if k in retry else ""
                results[k] = DegenerateCaption(f"{reason}{suffix}")
        return results

    def _short_captions(self, clips: Sequence[PreparedClip], captions: Sequence[str]) -> list[str]:
        """One sentence per clip; the first sentence of its long caption when the model's
        short answer fails or is degenerate."""
        raws = self.generate_adaptive(
            clips,
            [self.cfg.image_short_prompt if c.is_image else self.cfg.short_prompt for c in clips],
            max_new_tokens=self.cfg.short_max_new_tokens,
        )
        out = []
        for raw, long_caption in zip(raws, captions, strict=True):
            text = "" if isinstance(raw, BaseException) else first_sentence(self._finish(raw, 0))
            out.append(text if not degenerate_reason(text) else first_sentence(long_caption))
        return out

    def _prepare(
        self, batch: Batch, status: np.ndarray, error: np.ndarray
    ) -> list[tuple[int, PreparedClip]]:
        """Decode and sample every kept clip; a clip that fails becomes an error row."""
        todo: list[tuple[int, PreparedClip]] = []
        payloads = batch.get("clip_bytes")
        for i in np.flatnonzero(status == "kept"):
            clip_id = batch["clip_id"][i]
            payload = None if payloads is None else payloads[i]
            if payload is None or len(payload) == 0:
                status[i], error[i] = "error", _clip_error(clip_id, "no clip_bytes")
                continue
            try:
                clip = prepare_clip(
                    bytes(payload), self.cfg.num_frames, self.cfg.max_pixels, self.cfg.sample_fps
                )
            except Exception as exc:  # undecodable payload: this clip only
                status[i], error[i] = "error", _clip_error(clip_id, exc)
                continue
            todo.append((int(i), clip))
        return todo

    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        # fresh object columns: a fixed-width str array could not hold a longer value
        status = _object_column(batch["status"], n)
        error = _object_column(batch.get("error"), n)
        caption = _object_column(batch.get("caption"), n)
        caption_short = _object_column(batch.get("caption_short"), n)

        todo = self._prepare(batch, status, error)
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start : start + self.cfg.batch_size]
            clips = [clip for _, clip in chunk]
            prompts = [self.prompt_for(batch, i, clip.is_image) for i, clip in chunk]
            results = self._caption_chunk(clips, prompts)
            done: list[tuple[int, PreparedClip, str]] = []
            for (i, clip), result in zip(chunk, results, strict=True):
                if isinstance(result, BaseException):
                    status[i], error[i] = "error", _clip_error(batch["clip_id"][i], result)
                else:
                    caption[i] = self.prefix + result
                    done.append((i, clip, result))
            if self.cfg.short_caption and done:
                shorts = self._short_captions([c for _, c, _ in done], [t for _, _, t in done])
                for (i, _, _), short in zip(done, shorts, strict=True):
                    caption_short[i] = self.prefix + short

        out = dict(batch)
        out.update(status=status, error=error, caption=caption, caption_short=caption_short)
        return out
