"""Clip-caption agreement: CLIP cosine similarity between a clip and its caption.

1:1 stage after captioning, one clip in, the same clip out with
``score_agreement``: the cosine between the clip's L2-normalised CLIP image
embedding and the L2-normalised CLIP text embedding of its caption, in -1..1
(CLIPScore, Hessel et al. 2021, reports ``2.5 * max(cos, 0)``; we store the raw
cosine). Real captions of matching clips land around 0.25-0.35 with ViT-L/14,
mismatched ones around 0.1. CLIP reads at most 77 tokens, so a long descriptive
caption is judged by its beginning.

The image side reuses the stored ``clip_embedding`` (written by
``pipeline.stages.aesthetic``) when ``reuse_embeddings`` is on and its width
matches; otherwise it decodes ``clip_bytes`` and embeds sampled frames itself.
Reuse is only meaningful when both stages load the same CLIP model: configure
them from one place. Rows without a caption (not kept, so never captioned) get
NaN, which ``Decide`` treats as pending, not missing.

Example::

    batch = Agreement(AgreementConfig(clip_model="ViT-L-14-quickgelu"))(batch)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.stages.aesthetic import EMBEDDING, ClipEmbedder, clip_embedding
from pipeline.stages.base import Batch, num_rows
from pipeline.stages.score import (
    float_column,
    frame_count,
    object_column,
    passes_through,
    payload_bytes,
    require_columns,
    sample_indices,
)
from pipeline.video import decode_mp4_sampled
from schemas import score_column

__all__ = ["Agreement", "AgreementConfig"]

SCORE = score_column("agreement")


@dataclass(frozen=True)
class AgreementConfig:
    """Which CLIP to run (the same as the aesthetic stage's, to reuse its embeddings).
    Ray resources are ``BuildConfig.ray.agreement``, read by ``pipeline.graph`` only."""

    enabled: bool = False
    clip_model: str = "ViT-L-14-quickgelu"  # open_clip model name
    clip_pretrained: str | None = "openai"  # open_clip tag or a local checkpoint file
    clip_config: str | None = None  # open_clip config JSON for models it does not ship
    reuse_embeddings: bool = True  # use clip_embedding when present (same CLIP only!)
    num_frames: int = 4  # frames sampled when a clip has no stored embedding
    frames_per_second: float = 0.0  # > 0: per second of clip instead (max_frames cap)
    max_frames: int = 16
    batch_size: int = 16  # frames or captions per CLIP forward pass
    device: str = "auto"  # "auto" = cuda when available, else cpu


class Agreement:
    """1:1: write ``score_agreement`` for every clip row that has a caption.

    Rows with ``clip_id`` None or status ``"error"`` pass through; rows without a
    caption get NaN; a payload that cannot be decoded (when it is needed) makes that
    row alone an error.
    """

    reads: tuple[str, ...] = ("clip_id", "status", "caption", EMBEDDING, "clip_bytes")
    writes: tuple[str, ...] = (SCORE, "status", "error")

    def __init__(self, cfg: AgreementConfig | None = None) -> None:
        cfg = cfg or AgreementConfig()
        if cfg.num_frames < 1 or cfg.batch_size < 1:
            raise ValueError(f"num_frames and batch_size must be >= 1, got {cfg}")
        self.cfg = cfg
        self.clip = ClipEmbedder(
            cfg.clip_model, cfg.clip_pretrained, cfg.clip_config, cfg.device, cfg.batch_size
        )

    def _stored(self, value: Any) -> np.ndarray | None:
        if not self.cfg.reuse_embeddings or value is None:
            return None
        vec = np.asarray(value, dtype=np.float32).ravel()
        if vec.shape != (self.clip.width,) or not np.isfinite(vec).all():
            return None
        norm = float(np.linalg.norm(vec))
        return vec / norm if norm > 0 else None

    def _embed_payload(self, data: Any) -> np.ndarray:
        frames = decode_mp4_sampled(payload_bytes(data), self._choose)[0]
        return clip_embedding(self.clip.images(list(frames)))

    def _choose(self, total: int, fps: float) -> np.ndarray:
        cfg = self.cfg
        count = frame_count(total, fps, cfg.num_frames, cfg.frames_per_second, cfg.max_frames)
        return sample_indices(total, count)

    def __call__(self, batch: Batch) -> Batch:
        require_columns(batch, "agreement", ("clip_id", "caption"))
        n = num_rows(batch)
        scores = float_column(batch, SCORE)
        status = object_column(batch, "status")
        error = object_column(batch, "error")
        captions = object_column(batch, "caption")
        stored = object_column(batch, EMBEDDING)
        payloads = object_column(batch, "clip_bytes")
        rows: list[int] = []
        images: list[np.ndarray] = []
        for i in range(n):
            clip_id = batch["clip_id"][i]
            if passes_through(clip_id, status[i]):
                continue
            if not captions[i]:
                scores[i] = np.nan  # not captioned (rejected): pending, see Decide
                continue
            vec = self._stored(stored[i])
            if vec is None:
                try:
                    vec = self._embed_payload(payloads[i])
                except Exception as exc:  # a bad payload is this row's error only
                    status[i] = "error"
                    error[i] = f"agreement: clip {clip_id}: {type(exc).__name__}: {exc}"
                    scores[i] = np.nan
                    continue
            rows.append(i)
            images.append(vec)
        if rows:
            texts = self.clip.texts([str(captions[i]) for i in rows])  # (N, D), normalised
            sims = (np.stack(images) * texts).sum(axis=1)  # (N,) cosines
            for i, sim in zip(rows, sims, strict=True):
                scores[i] = float(sim)
        return {**batch, SCORE: scores, "status": status, "error": error}
