"""LAION's improved-aesthetic predictor head: the MLP on a CLIP image embedding.

Its own module, so that the aesthetic stage's config and the build graph import
without torch; the stage's actor imports this when it loads the head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["AestheticHead", "load_head"]


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
    from model.weights import load_weights

    state = load_weights(path, "aesthetic head")
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
