"""Caption stage: a dense, literal description of every kept clip, by a video VLM.

1:1, one clip row in, the same row out with ``caption`` set. Only rows with
``status == "kept"`` are captioned; rejected and failed rows pass through
untouched. The clip is read from ``clip_bytes`` (decode once: the source is never
reopened), ``num_frames`` frames are sampled evenly over the whole clip and
resized to at most ``max_pixels`` each, keeping the aspect ratio, and the model
generates greedily, several clips per ``generate`` call.

The model is any ``transformers`` image-text-to-text model that takes videos
(``AutoProcessor`` + ``AutoModelForImageTextToText``), from a hub id or a local
folder; the default is ``Qwen/Qwen3-VL-8B-Instruct``. Tests use a tiny
random-weight Qwen3-VL from :mod:`pipeline.tiny_vlm`, loaded the same way.

A clip that cannot be captioned (undecodable payload, a generation error, an
empty answer) becomes ``status="error"`` with the clip id and the cause; the
other clips of the batch are still captioned.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from pipeline.stages.base import Batch, num_rows
from pipeline.video import decode_mp4, even_size

__all__ = [
    "DEFAULT_PROMPT",
    "CaptionConfig",
    "Captioner",
    "PreparedClip",
    "clean_caption",
    "fit_frames",
    "prepare_clip",
    "sample_frame_indices",
]

DEFAULT_PROMPT = (
    "Describe this video in dense, literal detail for a text-to-video training set. "
    "Cover: the main subjects and their appearance (clothing, colors, materials); "
    "what they do and how it changes over time, in order; the setting and background; "
    "the camera's motion (static, pan, tilt, zoom, dolly, handheld, tracking) and framing "
    "(close-up, medium, wide, angle); the lighting and time of day; the visual style "
    "(live action, animation, film grain, color grade). "
    "State only what is visible. Do not guess names, intentions or sounds. "
    "Write one plain paragraph without lists, headings or an introduction."
)

# Openings that carry no content; Qwen-style models start most answers with one.
_BOILERPLATE = re.compile(
    r"^(?:(?:the|this) (?:video|clip|footage|scene|sequence) "
    r"(?:shows|depicts|features|captures|presents|displays|begins with|opens with|is of)"
    r"|in (?:the|this) (?:video|clip|footage|scene))[\s:,]+",
    re.IGNORECASE,
)
# C0/C1 control characters other than whitespace: never part of a caption.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class CaptionConfig:
    """How clips are captioned. ``num_gpus``, ``concurrency`` and ``enabled`` are read
    by ``pipeline.graph`` only."""

    model: str = "Qwen/Qwen3-VL-8B-Instruct"  # hub id or local folder
    prompt: str = DEFAULT_PROMPT
    num_frames: int = 8  # sampled evenly over the clip
    # per-frame pixel budget before the processor (which may shrink further to its own);
    # 256x384 = Qwen3-VL's default video budget spread over 8 frames
    max_pixels: int = 256 * 384
    max_new_tokens: int = 256
    batch_size: int = 4  # clips per generate() call
    device: str = "auto"  # "auto" = cuda if available, else cpu; or "cpu", "cuda:1", ...
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU; or a torch dtype name
    num_gpus: float = 0.0  # per captioning actor; read by the graph
    concurrency: int = 1  # captioning actors; read by the graph
    enabled: bool = True  # False: the graph skips the stage (captions stay None)


@dataclass(frozen=True)
class PreparedClip:
    """Sampled, resized frames of one clip and what the processor must know about them."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    indices: list[int]  # positions of the frames in the decoded clip
    total_frames: int
    fps: float


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


def prepare_clip(clip_bytes: bytes, num_frames: int, max_pixels: int) -> PreparedClip:
    """Decode mp4 bytes, sample ``num_frames`` evenly and fit them to ``max_pixels``."""
    frames, fps = decode_mp4(clip_bytes)
    indices = sample_frame_indices(len(frames), num_frames)
    return PreparedClip(
        frames=fit_frames(frames[indices], max_pixels),
        indices=[int(i) for i in indices],
        total_frames=len(frames),
        fps=fps if fps > 0 else 24.0,  # Qwen's own fallback when a rate is unknown
    )


def clean_caption(text: str) -> str:
    """Light hygiene: drop control characters, collapse whitespace, strip a
    boilerplate opening ("The video shows ..."), capitalise. May return ""."""
    text = _WHITESPACE.sub(" ", _CONTROL.sub("", text)).strip()
    stripped = _BOILERPLATE.sub("", text, count=1).strip()
    if stripped and stripped != text:
        text = stripped[0].upper() + stripped[1:]
    return text


def _resolve_device_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    """``("auto", "auto")`` -> cuda + bfloat16 when a GPU is there, else cpu + float32."""
    import torch

    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return dev, resolved


def _clip_error(clip_id: Any, cause: str | BaseException) -> str:
    if isinstance(cause, BaseException):
        cause = f"{type(cause).__name__}: {cause}"
    return f"caption failed for clip {clip_id}: {cause}"


def _object_column(values: np.ndarray | None, n: int) -> np.ndarray:
    """A copy of ``values`` as an object array (all ``None`` when the column is absent)."""
    out = np.empty(n, dtype=object)
    if values is not None:
        out[:] = list(values)
    return out


class Captioner:
    """``Captioner(cfg)(batch) -> batch``: captions the kept clips of a batch.

    Loads the processor and model once, in ``__init__`` (one per Ray actor).
    """

    reads: tuple[str, ...] = ("clip_id", "status", "clip_bytes")
    writes: tuple[str, ...] = ("caption", "status", "error")

    def __init__(self, cfg: CaptionConfig = CaptionConfig()) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if cfg.num_frames < 1 or cfg.max_pixels < 4 or cfg.batch_size < 1:
            raise ValueError(f"invalid caption config: {cfg}")
        self.cfg = cfg
        self.device, self.dtype = _resolve_device_dtype(cfg.device, cfg.dtype)
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        # decoder-only batched generation: pad on the left so every prompt ends at the
        # position where generation starts
        self.processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self._torch = torch
        messages = [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": cfg.prompt}]}
        ]
        self.prompt_text: str = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        # Qwen3-VL's processor warns unless told which per-frame pixel cap to use; we
        # size frames ourselves, so take the reference (qwen-vl-utils) behaviour.
        video_processor = getattr(self.processor, "video_processor", None)
        self._video_kwargs: dict[str, Any] = {}
        if hasattr(type(video_processor), "cap_pixels_per_frame"):
            self._video_kwargs["cap_pixels_per_frame"] = True

    # --- model calls ------------------------------------------------------------------
    def _generate(self, clips: Sequence[PreparedClip]) -> list[str]:
        """Raw decoded answers for ``clips`` in one ``generate`` call."""
        metadata = [
            {
                "total_num_frames": c.total_frames,
                "fps": c.fps,
                "frames_indices": c.indices,
                "width": int(c.frames.shape[2]),
                "height": int(c.frames.shape[1]),
                "duration": c.total_frames / c.fps,
            }
            for c in clips
        ]
        inputs = self.processor(
            text=[self.prompt_text] * len(clips),
            videos=[c.frames for c in clips],
            # frames are already sampled: the processor must not sample again, and
            # needs their positions and the rate to write Qwen3-VL's timestamps
            video_metadata=metadata,
            do_sample_frames=False,
            padding=True,
            return_tensors="pt",
            **self._video_kwargs,
        )
        inputs = inputs.to(self.device)
        if "pixel_values_videos" in inputs:
            inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(self.dtype)
        with self._torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]  # (B, new)
        return list(self.processor.batch_decode(new_tokens, skip_special_tokens=True))

    def _caption_many(self, clips: Sequence[PreparedClip]) -> list[str | BaseException]:
        """Batched generation; if the batch fails, retry each clip alone so one bad
        clip only fails itself."""
        try:
            return list(self._generate(clips))
        except Exception as batch_exc:  # one clip may have broken the whole call
            if len(clips) == 1:
                return [batch_exc]
        results: list[str | BaseException] = []
        for clip in clips:
            try:
                results.append(self._generate([clip])[0])
            except Exception as exc:
                results.append(exc)
        return results

    # --- the stage --------------------------------------------------------------------
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
                clip = prepare_clip(bytes(payload), self.cfg.num_frames, self.cfg.max_pixels)
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

        todo = self._prepare(batch, status, error)
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start : start + self.cfg.batch_size]
            results = self._caption_many([clip for _, clip in chunk])
            for (i, _), result in zip(chunk, results, strict=True):
                text = clean_caption(result) if isinstance(result, str) else ""
                if isinstance(result, BaseException) or not text:
                    cause = result if isinstance(result, BaseException) else "empty caption"
                    status[i], error[i] = "error", _clip_error(batch["clip_id"][i], cause)
                else:
                    caption[i] = text

        out = dict(batch)
        out.update(status=status, error=error, caption=caption)
        return out
