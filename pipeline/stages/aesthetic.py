"""CLIP aesthetic score of each clip: the LAION improved-aesthetic predictor.

1:1 stage, one clip in, the same clip out with ``score_aesthetic`` added: the mean,
over a few frames sampled evenly from ``clip_bytes``, of an MLP head on the
L2-normalised CLIP image embedding of each frame (~1..10 with the real weights).

The real setup is OpenAI ViT-L/14 (``ViT-L-14-quickgelu``: OpenAI weights need
QuickGELU, else embeddings are silently wrong) and the head
``sac+logos+ava1-l14-linearMSE.pth`` from LAION's ``improved-aesthetic-predictor``
repository, which is on no hub: the user downloads it and passes its path. With no
head the stage refuses to run rather than invent a score. The head's input width
comes from the CLIP model, so tests run the same code on a tiny random CLIP
(``pipeline.tiny_clip``).

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
import torch
from PIL import Image
from torch import nn

from pipeline.stages.base import Batch, num_rows
from pipeline.stages.score import (
    float_column,
    object_column,
    passes_through,
    payload_bytes,
    require_columns,
    sample_indices,
)
from pipeline.video import decode_mp4
from schemas import score_column

__all__ = [
    "AestheticConfig",
    "AestheticHead",
    "AestheticScorer",
    "load_head",
    "register_clip_config",
    "resolve_device",
]

SCORE = score_column("aesthetic")


@dataclass(frozen=True)
class AestheticConfig:
    """Which CLIP and head to run, and how. ``num_gpus`` and ``concurrency`` are read by
    ``pipeline.graph`` only."""

    clip_model: str = "ViT-L-14-quickgelu"  # open_clip model name
    clip_pretrained: str | None = "openai"  # open_clip tag or a local checkpoint file
    head: str | None = None  # path to the LAION improved-aesthetic predictor .pth
    # optional open_clip model config JSON (stem == clip_model) to register before loading,
    # for models open_clip does not ship, e.g. the tiny test CLIP inside Ray workers
    clip_config: str | None = None
    num_frames: int = 4  # frames sampled evenly per clip; the score is their mean
    batch_size: int = 16  # frames per CLIP forward pass
    device: str = "auto"  # "auto" = cuda when available, else cpu
    num_gpus: float = 0.0  # per aesthetic actor; read by the graph
    concurrency: int = 1  # aesthetic actors; read by the graph


class AestheticHead(nn.Module):
    """LAION's improved-aesthetic MLP: dim -> 1024 -> 128 -> 64 -> 16 -> 1, no activations.

    Module names match the released checkpoints (``layers.0/2/4/6/7``); the
    dropouts are inert at inference but keep the indices right.
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, dim) L2-normalised image embeddings -> (N,) scores
        return self.layers(x).squeeze(-1)


def load_head(path: str | Path, dim: int) -> AestheticHead:
    """An :class:`AestheticHead` of input width ``dim`` from a state-dict file, loaded
    without unpickling code (``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    head = AestheticHead(dim)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"aesthetic head {path} does not fit a {dim}-wide CLIP embedding "
            f"(LAION's sac+logos+ava1-l14-linearMSE.pth needs ViT-L/14, 768): {exc}"
        ) from exc
    return head.eval()


def register_clip_config(path: str | Path, clip_model: str) -> None:
    """Make ``clip_model`` known to open_clip from its config JSON; a no-op if it is."""
    import open_clip

    path = Path(path)
    if path.stem != clip_model:
        raise ValueError(f"open_clip names a config by its file stem: {path} is not {clip_model!r}")
    if open_clip.get_model_config(clip_model) is None:
        open_clip.add_model_config(path)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _embed_width(model: Any) -> int:
    """Width of the model's image embeddings: the head's input width."""
    width = getattr(model.visual, "output_dim", None)
    if isinstance(width, int):
        return width
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    with torch.no_grad():
        out = model.encode_image(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
    return int(out.shape[-1])


class AestheticScorer:
    """1:1: write ``score_aesthetic`` for every clip row.

    Loads CLIP and the head once. Rows with ``clip_id`` None or status ``"error"``
    pass through; a payload that cannot be decoded makes that row alone an error.
    """

    reads: tuple[str, ...] = ("clip_id", "status", "clip_bytes")
    writes: tuple[str, ...] = (SCORE, "status", "error")

    def __init__(self, cfg: AestheticConfig | None = None) -> None:
        cfg = cfg or AestheticConfig()
        if cfg.head is None:
            raise ValueError(
                "AestheticConfig.head is None: the aesthetic score needs the LAION "
                "improved-aesthetic predictor weights (sac+logos+ava1-l14-linearMSE.pth); "
                "pass their path, or leave the aesthetic stage out of the build"
            )
        if cfg.num_frames < 1 or cfg.batch_size < 1:
            raise ValueError(f"num_frames and batch_size must be >= 1, got {cfg}")
        import open_clip  # heavy; only a configured scorer pays for it

        if cfg.clip_config is not None:
            register_clip_config(cfg.clip_config, cfg.clip_model)
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.clip_model, pretrained=cfg.clip_pretrained, device=self.device
        )
        self.model = model.eval()
        self.preprocess = preprocess  # the eval transform: resize, center crop, normalise
        self.head = load_head(cfg.head, _embed_width(self.model)).to(self.device)

    @torch.inference_mode()
    def score_frames(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Per-frame aesthetic scores (N,) of N RGB frames (H, W, 3) uint8, any sizes."""
        out: list[torch.Tensor] = []
        for start in range(0, len(frames), self.cfg.batch_size):
            chunk = frames[start : start + self.cfg.batch_size]
            pixels = torch.stack([self.preprocess(Image.fromarray(f)) for f in chunk])
            emb = self.model.encode_image(pixels.to(self.device), normalize=True)  # (B, D)
            out.append(self.head(emb.float()).cpu())  # (B,)
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def __call__(self, batch: Batch) -> Batch:
        require_columns(batch, "aesthetic", ("clip_id", "clip_bytes"))
        n = num_rows(batch)
        scores = float_column(batch, SCORE)
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
                clip, _ = decode_mp4(payload_bytes(batch["clip_bytes"][i]))
            except Exception as exc:  # a bad payload is this row's error, never the batch's
                status[i] = "error"
                error[i] = f"aesthetic: clip {clip_id}: {type(exc).__name__}: {exc}"
                scores[i] = np.nan
                continue
            picked = clip[sample_indices(len(clip), self.cfg.num_frames)]
            frames.extend(picked)
            owner.extend([i] * len(picked))
        if frames:
            per_frame = self.score_frames(frames)
            rows = np.asarray(owner)
            for i in np.unique(rows):
                scores[i] = float(per_frame[rows == i].mean())
        return {**batch, SCORE: scores, "status": status, "error": error}
