"""CLIP image embeddings and the aesthetic score of each clip (LAION improved-aesthetic).

1:1 stage, one clip in, the same clip out with ``clip_embedding`` (an (N, D)
float32 column, all-NaN rows where no embedding exists) and ``score_aesthetic``
added. Frames are sampled from ``clip_bytes`` (by count, or
per second of clip) and embedded with open_clip in batches; the clip's embedding
is the mean of its frames' L2-normalised embeddings, renormalised (what near-
duplicate detection, ``pipeline.stages.dedup``, and clip-caption agreement,
``pipeline.stages.agreement``, reuse); its aesthetic score is the mean, over its
frames, of an MLP head on each frame's normalised embedding (~1..10 with the real
weights).

The real setup is OpenAI ViT-L/14 (``ViT-L-14-quickgelu``: OpenAI weights need
QuickGELU, else embeddings are silently wrong) and the head
``sac+logos+ava1-l14-linearMSE.pth`` from LAION's ``improved-aesthetic-predictor``
repository, which is on no hub: the user downloads it and passes its path. With no
head the stage still writes embeddings and leaves ``score_aesthetic`` NaN (never an
invented score); with no head and ``embeddings=False`` it has nothing to do and
refuses to start. The head's input width comes from the CLIP model, so tests run
the same code on a tiny random CLIP (``pipeline.tiny_clip``).

Runs on a GPU when the actor has one (``device="auto"``), else on the CPU.

Example::

    scorer = AestheticScorer(AestheticConfig(head="/models/sac+logos+ava1-l14-linearMSE.pth"))
    batch = scorer(batch)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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

__all__ = [
    "EMBEDDING",
    "AestheticConfig",
    "AestheticScorer",
    "ClipEmbedder",
    "clip_embedding",
    "register_clip_config",
]

SCORE = score_column("aesthetic")
EMBEDDING = "clip_embedding"


@dataclass(frozen=True)
class AestheticConfig:
    """Which CLIP and head to run, and how. Ray resources (GPUs, actors, rows per call)
    are ``BuildConfig.ray.aesthetic``, read by ``pipeline.graph`` only."""

    clip_model: str = "ViT-L-14-quickgelu"  # open_clip model name
    clip_pretrained: str | None = "openai"  # open_clip tag or a local checkpoint file
    head: str | None = None  # path to the LAION improved-aesthetic predictor .pth
    # optional open_clip model config JSON (stem == clip_model) to register before loading,
    # for models open_clip does not ship, e.g. the tiny test CLIP inside Ray workers
    clip_config: str | None = None
    num_frames: int = 4  # frames sampled evenly per clip; the score is their mean
    # > 0: sample this many frames per second of clip instead of num_frames (max_frames cap)
    frames_per_second: float = 0.0
    max_frames: int = 16
    embeddings: bool = True  # write clip_embedding (near-duplicates, caption agreement)
    batch_size: int = 16  # frames per CLIP forward pass
    device: str = "auto"  # "auto" = cuda when available, else cpu


def register_clip_config(path: str | Path, clip_model: str) -> None:
    """Make ``clip_model`` known to open_clip from its config JSON; a no-op if it is."""
    import open_clip

    path = Path(path)
    if path.stem != clip_model:
        raise ValueError(f"open_clip names a config by its file stem: {path} is not {clip_model!r}")
    if open_clip.get_model_config(clip_model) is None:
        open_clip.add_model_config(path)


def _embed_width(model: Any) -> int:
    """Width of the model's image embeddings: the head's input width."""
    width = getattr(model.visual, "output_dim", None)
    if isinstance(width, int):
        return width
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    import torch

    with torch.no_grad():
        out = model.encode_image(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
    return int(out.shape[-1])


def clip_embedding(frame_embeddings: np.ndarray) -> np.ndarray:
    """One clip's embedding (D,) float32 from its frames' L2-normalised embeddings (N, D):
    their mean, renormalised (so cosine similarity is a dot product)."""
    mean = frame_embeddings.astype(np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


class ClipEmbedder:
    """An open_clip model loaded once: L2-normalised image and text embeddings in batches.

    Shared by the aesthetic and agreement stages so both load CLIP the same way.
    """

    def __init__(
        self,
        clip_model: str,
        clip_pretrained: str | None,
        clip_config: str | None = None,
        device: str = "auto",
        batch_size: int = 16,
    ) -> None:
        import open_clip  # heavy; only a configured stage pays for it

        from model.device import resolve_device

        if clip_config is not None:
            register_clip_config(clip_config, clip_model)
        self.name = clip_model
        self.device = resolve_device(device)
        self.batch_size = max(1, batch_size)
        model, _, preprocess = open_clip.create_model_and_transforms(
            clip_model, pretrained=clip_pretrained, device=self.device
        )
        self.model = model.eval()
        self.preprocess = preprocess  # the eval transform: resize, center crop, normalise
        self.width = _embed_width(self.model)
        self._tokenizer: Any = None

    def images(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Normalised embeddings (N, D) float32 of N RGB frames (H, W, 3) uint8, any sizes."""
        import torch
        from PIL import Image

        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(frames), self.batch_size):
                chunk = frames[start : start + self.batch_size]
                pixels = torch.stack([self.preprocess(Image.fromarray(f)) for f in chunk])
                emb = self.model.encode_image(pixels.to(self.device), normalize=True)  # (B, D)
                out.append(emb.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.width), np.float32)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised embeddings (N, D) float32 of N texts (the model's own tokenizer;
        longer texts are truncated to its context length, 77 tokens for CLIP)."""
        import open_clip
        import torch

        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.name)
        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self._tokenizer(list(texts[start : start + self.batch_size]))  # (B, L)
                emb = self.model.encode_text(tokens.to(self.device), normalize=True)  # (B, D)
                out.append(emb.float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.width), np.float32)


class AestheticScorer:
    """1:1: write ``clip_embedding`` and ``score_aesthetic`` for every clip row.

    Loads CLIP (and the head, when given) once. Rows with ``clip_id`` None or status
    ``"error"`` pass through; a payload that cannot be decoded makes that row alone an
    error.
    """

    reads: tuple[str, ...] = ("clip_id", "status", "clip_bytes")
    writes: tuple[str, ...] = (SCORE, EMBEDDING, "status", "error")

    def __init__(self, cfg: AestheticConfig | None = None) -> None:
        from pipeline.stages.aesthetic_head import load_head

        cfg = cfg or AestheticConfig()
        if cfg.head is None and not cfg.embeddings:
            raise ValueError(
                "AestheticConfig.head is None and embeddings=False: nothing to compute. The "
                "aesthetic score needs the LAION improved-aesthetic predictor weights "
                "(sac+logos+ava1-l14-linearMSE.pth); pass their path, or leave the stage out"
            )
        if cfg.num_frames < 1 or cfg.batch_size < 1:
            raise ValueError(f"num_frames and batch_size must be >= 1, got {cfg}")
        self.cfg = cfg
        self.clip = ClipEmbedder(
            cfg.clip_model, cfg.clip_pretrained, cfg.clip_config, cfg.device, cfg.batch_size
        )
        self.device = self.clip.device
        self.model = self.clip.model
        self.preprocess = self.clip.preprocess
        self.head = (
            None if cfg.head is None else load_head(cfg.head, self.clip.width).to(self.device)
        )

    def score_frames(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Per-frame aesthetic scores (N,) of N RGB frames (H, W, 3) uint8, any sizes."""
        return self._head_scores(self.clip.images(frames))

    def _head_scores(self, embeddings: np.ndarray) -> np.ndarray:
        if self.head is None:
            return np.full(len(embeddings), np.nan)
        import torch

        with torch.inference_mode():
            out = [
                self.head(torch.from_numpy(embeddings[s : s + self.cfg.batch_size]).to(self.device))
                .double()
                .cpu()
                for s in range(0, len(embeddings), self.cfg.batch_size)
            ]
        return torch.cat(out).numpy() if out else np.zeros(0)

    def _sample(self, data: Any) -> np.ndarray:
        return decode_mp4_sampled(payload_bytes(data), self._choose)[0]

    def _choose(self, total: int, fps: float) -> np.ndarray:
        cfg = self.cfg
        count = frame_count(total, fps, cfg.num_frames, cfg.frames_per_second, cfg.max_frames)
        return sample_indices(total, count)

    def __call__(self, batch: Batch) -> Batch:
        require_columns(batch, "aesthetic", ("clip_id", "clip_bytes"))
        n = num_rows(batch)
        scores = float_column(batch, SCORE)
        embeddings = self._embedding_matrix(batch)
        status = object_column(batch, "status")
        error = object_column(batch, "error")
        # decode every row first, then embed all sampled frames in full batches
        frames: list[np.ndarray] = []
        owner: list[int] = []
        for i in range(n):
            clip_id = batch["clip_id"][i]
            if passes_through(clip_id, status[i]):
                continue
            try:
                picked = self._sample(batch["clip_bytes"][i])
            except Exception as exc:  # a bad payload is this row's error, never the batch's
                status[i] = "error"
                error[i] = f"aesthetic: clip {clip_id}: {type(exc).__name__}: {exc}"
                scores[i] = np.nan
                embeddings[i] = np.nan
                continue
            frames.extend(picked)
            owner.extend([i] * len(picked))
        if frames:
            per_frame = self.clip.images(frames)  # (N, D), normalised
            per_score = self._head_scores(per_frame)  # (N,)
            rows = np.asarray(owner)
            for i in np.unique(rows):
                scores[i] = float(per_score[rows == i].mean())
                if self.cfg.embeddings:
                    embeddings[i] = clip_embedding(per_frame[rows == i])
        return {**batch, SCORE: scores, EMBEDDING: embeddings, "status": status, "error": error}

    def _embedding_matrix(self, batch: Batch) -> np.ndarray:
        """``clip_embedding`` as one (N, D) float32 array, NaN rows where there is none.

        Why not a list per row with None for missing: Ray Data stores a column of
        equal-length arrays as a tensor type but a column of lists (or with nulls) as
        list<double>, and fails to concatenate the two kinds in one stage's output. A
        fixed (N, D) array is a tensor column in every block, whatever the rows hold.
        An all-NaN embedding means "none" to every reader (dedup, agreement).
        """
        n = num_rows(batch)
        out = np.full((n, self.clip.width), np.nan, dtype=np.float32)
        for i, value in enumerate(batch.get(EMBEDDING, ())):
            if value is not None and np.size(value) == self.clip.width:
                out[i] = np.asarray(value, dtype=np.float32).ravel()
        return out
