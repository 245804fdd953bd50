"""Encode stage: each kept clip -> a native-aspect, native-duration VAE latent.

1:1. For every row with ``status == "kept"`` the clip payload (``clip_bytes``) is
decoded, resampled to ``target_fps``, cut to the VAE's frame rule (e.g. 1 + 4k
frames), resized so that its area fits ``pixel_budget`` with sides that are
multiples of (VAE spatial factor x patch size) at the clip's own aspect ratio,
and encoded. The latent is stored as bf16 safetensors bytes in ``latents``
together with the exact size, frame rate and frame count the VAE saw.

The VAE is loaded once per instance (one per Ray actor) through
:class:`model.vae.VideoVAE`, the single place a VAE is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from model.vae import VideoVAE, native_size
from pipeline.stages.base import Batch, num_rows, with_columns
from pipeline.video import decode_mp4
from schemas import TENSOR_LATENTS

__all__ = ["Encode", "EncodeConfig", "fit_frames", "prepare_clip", "resample_indices"]


@dataclass(frozen=True)
class EncodeConfig:
    vae: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # hub id or local folder
    vae_subfolder: str | None = "vae"
    vae_class: str = "AutoencoderKLWan"
    pixel_budget: int = 480 * 832  # max H*W fed to the VAE; never upscales past the payload
    patch_size: tuple[int, int, int] = (1, 2, 2)  # DiT patch (t, h, w): sides are multiples of it
    target_fps: float | None = 16.0  # None keeps the clip's own rate
    max_frames: int = 81  # frames per clip fed to the VAE, before the frame rule
    device: str = "auto"  # "auto": cuda when available
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    batch_size: int = 1  # rows per call, set by the graph
    num_gpus: float = 0.0  # per encode actor; read by the graph
    concurrency: int = 1  # encode actors; read by the graph


def resample_indices(num_frames: int, fps: float, target_fps: float | None) -> np.ndarray:
    """Indices of the source frames nearest to a ``target_fps`` grid (never upsamples)."""
    if target_fps is None or fps <= 0 or target_fps >= fps:
        return np.arange(num_frames)
    duration = num_frames / fps
    times = np.arange(0.0, duration - 1e-9, 1.0 / target_fps)
    return np.unique(np.minimum(np.floor(times * fps + 1e-6).astype(np.int64), num_frames - 1))


def fit_frames(num_frames: int, max_frames: int, vae: VideoVAE) -> int:
    """How many frames to keep: at most ``max_frames``, cut to the VAE's frame rule."""
    return vae.valid_frames(min(num_frames, max_frames))


def _resize_cover(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize (T, h, w, 3) to cover (height, width) keeping aspect, then center-crop."""
    _, h, w, _ = frames.shape
    scale = max(width / w, height / h)
    rw, rh = max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    x0, y0 = (rw - width) // 2, (rh - height) // 2
    return np.stack(
        [
            cv2.resize(f, (rw, rh), interpolation=interp)[y0 : y0 + height, x0 : x0 + width]
            for f in frames
        ]
    )


def prepare_clip(
    frames: np.ndarray, fps: float, cfg: EncodeConfig, vae: VideoVAE
) -> tuple[np.ndarray, float]:
    """Frames (T, h, w, 3) uint8 at ``fps`` -> frames ready for the VAE, and their fps."""
    idx = resample_indices(len(frames), fps, cfg.target_fps)
    out_fps = fps if cfg.target_fps is None or cfg.target_fps >= fps else cfg.target_fps
    keep = fit_frames(len(idx), cfg.max_frames, vae)
    frames = frames[idx[:keep]]
    _, h, w, _ = frames.shape
    multiple = vae.spatial_factor * max(cfg.patch_size[1], cfg.patch_size[2])
    budget = min(cfg.pixel_budget, max(h * w, multiple * multiple))
    width, height = native_size(w, h, budget, multiple)
    return _resize_cover(frames, width, height), out_fps


def _device_dtype(cfg: EncodeConfig) -> tuple[str, torch.dtype]:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


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
    )

    def __init__(self, cfg: EncodeConfig) -> None:
        self.cfg = cfg
        self.device, self.dtype = _device_dtype(cfg)
        self.vae = VideoVAE.from_pretrained(
            cfg.vae,
            vae_class=cfg.vae_class,
            subfolder=cfg.vae_subfolder,
            device=self.device,
            dtype=self.dtype,
        )

    def encode_one(self, clip_bytes: bytes) -> dict[str, Any]:
        """One payload -> the encode columns of its row."""
        frames, fps = decode_mp4(clip_bytes)
        frames, out_fps = prepare_clip(frames, fps, self.cfg, self.vae)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W) uint8
        video = video.to(self.device, self.dtype) / 127.5 - 1.0
        latents = self.vae.encode(video)[0]  # (C, t, h, w), normalised
        c, t, h, w = latents.shape
        pt, ph, pw = self.cfg.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(
                f"latent {tuple(latents.shape)} not divisible by patch {self.cfg.patch_size}"
            )
        blob = save_safetensors({TENSOR_LATENTS: latents.to("cpu", torch.bfloat16).contiguous()})
        return {
            "latents": blob,
            "latent_shape": [c, t, h, w],
            "num_tokens": (t // pt) * (h // ph) * (w // pw),
            "encode_width": frames.shape[2],
            "encode_height": frames.shape[1],
            "encode_fps": float(out_fps),
            "encode_frames": frames.shape[0],
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
