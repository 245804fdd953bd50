"""Encode stage: each kept clip -> native-aspect, native-duration VAE latents.

1:1. For every row with ``status == "kept"`` the clip payload (``clip_bytes``) is
decoded once and planned by :func:`plan_clip`, a pure function of the payload's
size, frame count and rate:

- frames: resampled to ``target_fps`` (nearest source frame, never upsampled), at
  most ``max_frames``, cut to the VAE's frame rule (1 + k * temporal factor) and so
  that the latent duration is a multiple of the temporal patch. A single frame (an
  image) encodes as one latent frame.
- size, per pixel budget: H, W multiples of (VAE spatial factor x spatial patch),
  H * W <= budget, display aspect kept as closely as possible
  (:func:`model.vae.native_size`); never larger than the payload itself. The frames
  are resized to cover H x W (aspect kept) and centre-cropped.

``pixel_budget`` gives the primary latent (``schemas.TENSOR_LATENTS``);
``extra_pixel_budgets`` add more resolutions of the same frames to the same
safetensors blob as ``latents@<H>x<W>`` (``schemas.latents_tensor_name``), listed
in the ``extra_latents*`` columns. The blob stays a plain safetensors dict, so a
later stage can add ``text_embeds``. Every number needed to redo the
preprocessing is recorded in the ``encode_*`` columns.

The VAE is loaded once per instance (one per Ray actor) through
:class:`model.vae.VideoVAE`, the single place a VAE is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import cv2
import numpy as np

from model.device import resolve_device_dtype
from model.vae import VideoVAE, native_size
from pipeline.stages.base import Batch, num_rows, with_columns
from pipeline.video import decode_mp4, resample_indices
from schemas import TENSOR_LATENTS, latents_tensor_name

if TYPE_CHECKING:  # the actor imports torch when it loads the VAE; the config needs none
    import torch

__all__ = [
    "Encode",
    "EncodeConfig",
    "EncodePlan",
    "SizePlan",
    "cover_geometry",
    "fit_frames",
    "plan_clip",
    "prepare_clip",
    "resample_indices",
]


@dataclass(frozen=True)
class EncodeConfig:
    vae: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # hub id or local folder
    vae_subfolder: str | None = "vae"
    vae_class: str = "AutoencoderKLWan"
    pixel_budget: int = 480 * 832  # max H*W of the primary latent; never upscales the payload
    # more resolutions of each clip, stored beside the primary one (progressive training),
    # e.g. [65536, 921600] for 256x256 and 720p; sizes equal to an earlier one are skipped
    extra_pixel_budgets: tuple[int, ...] = ()
    patch_size: tuple[int, int, int] = (1, 2, 2)  # DiT patch (t, h, w): sides are multiples of it
    target_fps: float | None = 16.0  # None keeps the clip's own rate
    max_frames: int = 81  # frames per clip fed to the VAE, before the frame rule
    device: str = "auto"  # "auto": cuda when available
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu


@dataclass(frozen=True)
class SizePlan:
    """One target resolution: resize (aspect kept) to cover it, then centre-crop."""

    width: int  # fed to the VAE
    height: int
    resize_width: int
    resize_height: int
    crop_left: int
    crop_top: int


@dataclass(frozen=True)
class EncodePlan:
    """Everything :func:`plan_clip` decides for one clip."""

    frame_indices: np.ndarray  # payload frames fed to the VAE, increasing
    fps: float  # their frame rate
    sizes: tuple[SizePlan, ...]  # primary first, then the distinct extra resolutions


def fit_frames(num_frames: int, max_frames: int, vae: VideoVAE) -> int:
    """How many frames to keep: at most ``max_frames``, cut to the VAE's frame rule."""
    return vae.valid_frames(min(num_frames, max_frames))


def _fit_frames(num_frames: int, max_frames: int, frame_step: int, patch_t: int) -> int:
    """Frames 1 + k * frame_step <= min(num_frames, max_frames) whose latent length
    (1 + k) is a multiple of ``patch_t``; ValueError when none is."""
    n = min(num_frames, max_frames)
    latent_t = 1 + (n - 1) // frame_step if n >= 1 else 0
    latent_t -= latent_t % patch_t
    if latent_t < 1:
        raise ValueError(
            f"{num_frames} frames (max {max_frames}) give no latent length that is a multiple "
            f"of the temporal patch {patch_t} (frame rule 1 + k*{frame_step})"
        )
    return 1 + (latent_t - 1) * frame_step


def cover_geometry(
    width: int, height: int, target_w: int, target_h: int
) -> tuple[int, int, int, int]:
    """(resize_w, resize_h, crop_left, crop_top): scale ``width x height`` with its aspect
    to cover ``target_w x target_h``, then take the centred window of that size."""
    scale = max(target_w / width, target_h / height)
    rw = max(target_w, math.ceil(width * scale - 1e-6))
    rh = max(target_h, math.ceil(height * scale - 1e-6))
    return rw, rh, (rw - target_w) // 2, (rh - target_h) // 2


def plan_clip(
    num_frames: int,
    fps: float,
    width: int,
    height: int,
    cfg: EncodeConfig,
    spatial_factor: int,
    frame_step: int,
) -> EncodePlan:
    """Decide frames and sizes for a payload of ``num_frames`` at ``fps``, ``width x height``."""
    if num_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"empty clip: {num_frames} frames of {width}x{height}")
    idx = resample_indices(num_frames, fps, cfg.target_fps)
    out_fps = fps if cfg.target_fps is None or cfg.target_fps >= fps else cfg.target_fps
    keep = _fit_frames(len(idx), cfg.max_frames, frame_step, cfg.patch_size[0])
    multiple = spatial_factor * max(cfg.patch_size[1], cfg.patch_size[2])
    sizes: list[SizePlan] = []
    for budget in (cfg.pixel_budget, *cfg.extra_pixel_budgets):
        # Never upscale past the payload (but always at least one block).
        w, h = native_size(width, height, min(budget, max(width * height, multiple**2)), multiple)
        if any((s.width, s.height) == (w, h) for s in sizes):
            continue
        sizes.append(SizePlan(w, h, *cover_geometry(width, height, w, h)))
    return EncodePlan(idx[:keep].astype(np.int64), float(out_fps), tuple(sizes))


def _resize_crop(frames: np.ndarray, size: SizePlan) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, size.height, size.width, 3) by ``size``'s resize and crop."""
    w = frames.shape[2]
    interp = cv2.INTER_AREA if size.resize_width < w else cv2.INTER_CUBIC
    x0, y0 = size.crop_left, size.crop_top
    return np.stack(
        [
            cv2.resize(f, (size.resize_width, size.resize_height), interpolation=interp)[
                y0 : y0 + size.height, x0 : x0 + size.width
            ]
            for f in frames
        ]
    )


def prepare_clip(
    frames: np.ndarray, fps: float, cfg: EncodeConfig, vae: VideoVAE
) -> tuple[np.ndarray, float]:
    """Frames (T, h, w, 3) uint8 at ``fps`` -> primary-resolution frames for the VAE, fps."""
    t, h, w, _ = frames.shape
    plan = plan_clip(t, fps, w, h, cfg, vae.spatial_factor, vae.frame_step)
    return _resize_crop(frames[plan.frame_indices], plan.sizes[0]), plan.fps


class Encode:
    """Callable stage; holds the VAE. One instance per Ray actor."""

    reads: ClassVar[tuple[str, ...]] = ("clip_id", "status", "clip_bytes")
    writes: ClassVar[tuple[str, ...]] = (
        "status",
        "error",
        "latents",
        "latent_shape",
        "num_tokens",
        "encode_width",
        "encode_height",
        "encode_fps",
        "encode_frames",
        "encode_src_width",
        "encode_src_height",
        "encode_resize_width",
        "encode_resize_height",
        "encode_crop_left",
        "encode_crop_top",
        "encode_frame_indices",
        "extra_latents",
        "extra_latent_shapes",
        "extra_num_tokens",
    )

    def __init__(self, cfg: EncodeConfig) -> None:
        self.cfg = cfg
        device, self.dtype = resolve_device_dtype(cfg.device, cfg.dtype)
        self.device = str(device)
        self.vae = VideoVAE.from_pretrained(
            cfg.vae,
            vae_class=cfg.vae_class,
            subfolder=cfg.vae_subfolder,
            device=self.device,
            dtype=self.dtype,
        )

    def _latent(self, frames: np.ndarray) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> normalised latent (C, t, h, w) bf16 on the CPU."""
        import torch

        video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None]
        video = video.to(self.device, self.dtype) / 127.5 - 1.0  # (1, 3, T, H, W) in [-1, 1]
        latents = self.vae.encode(video)[0]  # shape checked against the frame/size rules
        pt, ph, pw = self.cfg.patch_size
        _, t, h, w = latents.shape
        if t % pt or h % ph or w % pw:
            raise ValueError(
                f"latent {tuple(latents.shape)} not divisible by patch {self.cfg.patch_size}"
            )
        return latents.to("cpu", torch.bfloat16).contiguous()

    def _tokens(self, shape: tuple[int, ...]) -> int:
        pt, ph, pw = self.cfg.patch_size
        _, t, h, w = shape
        return (t // pt) * (h // ph) * (w // pw)

    def encode_one(self, clip_bytes: bytes) -> dict[str, Any]:
        """One payload -> the encode columns of its row."""
        from safetensors.torch import save as save_safetensors

        frames, fps = decode_mp4(clip_bytes)
        t, h, w, _ = frames.shape
        plan = plan_clip(t, fps, w, h, self.cfg, self.vae.spatial_factor, self.vae.frame_step)
        frames = frames[plan.frame_indices]
        tensors: dict[str, torch.Tensor] = {}
        for i, size in enumerate(plan.sizes):
            name = TENSOR_LATENTS if i == 0 else latents_tensor_name(size.height, size.width)
            tensors[name] = self._latent(_resize_crop(frames, size))
        primary, extras = plan.sizes[0], list(tensors)[1:]
        shape = tuple(tensors[TENSOR_LATENTS].shape)
        return {
            "latents": save_safetensors(tensors),
            "latent_shape": list(shape),
            "num_tokens": self._tokens(shape),
            "encode_width": primary.width,
            "encode_height": primary.height,
            "encode_fps": plan.fps,
            "encode_frames": len(plan.frame_indices),
            "encode_src_width": w,
            "encode_src_height": h,
            "encode_resize_width": primary.resize_width,
            "encode_resize_height": primary.resize_height,
            "encode_crop_left": primary.crop_left,
            "encode_crop_top": primary.crop_top,
            "encode_frame_indices": [int(i) for i in plan.frame_indices],
            # None, not [], without extras: Ray Data types an all-empty list column as
            # list<null>, which does not concatenate with list<string> blocks.
            "extra_latents": extras or None,
            "extra_latent_shapes": [list(tensors[n].shape) for n in extras] or None,
            "extra_num_tokens": [self._tokens(tuple(tensors[n].shape)) for n in extras] or None,
        }

    def __call__(self, batch: Batch) -> Batch:
        n = num_rows(batch)
        cols: dict[str, list[Any]] = {name: [None] * n for name in self.writes}
        cols["status"] = list(batch["status"])
        cols["error"] = list(batch.get("error", [None] * n))
        for i in range(n):
            if batch["status"][i] != "kept" or batch["clip_id"][i] is None:
                continue
            try:
                out = self.encode_one(batch["clip_bytes"][i])
            except Exception as e:  # one bad clip fails alone
                cols["status"][i] = "error"
                cols["error"][i] = (
                    f"encode failed for clip {batch['clip_id'][i]}: {type(e).__name__}: {e}"
                )
                continue
            for k, v in out.items():
                cols[k][i] = v
        return with_columns(batch, **cols)
