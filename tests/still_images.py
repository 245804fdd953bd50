"""Helpers of the still-image tests: a generated photo, and a file probed and split as
a build does it, its one clip's payload decoded."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.stages.base import batch_to_rows
from pipeline.stages.probe import Probe, ProbeConfig
from pipeline.stages.split import Split, SplitConfig
from pipeline.synth import iter_synth_frames
from pipeline.video import decode_mp4


def photo(seed: int, width: int = 160, height: int = 96) -> np.ndarray:
    """(height, width, 3) uint8 RGB: a generated picture with shapes and texture."""
    return next(iter(iter_synth_frames(width, height, [1], seed=seed)))


def probe_split(path: str, **probe: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The probe row of ``path`` (``probe``: ProbeConfig fields) and its split rows."""
    probed = Probe(ProbeConfig(**probe))({"source": np.array([path], dtype=object)})
    return batch_to_rows(probed)[0], batch_to_rows(Split(SplitConfig())(probed))


def payload(row: dict[str, Any]) -> np.ndarray:
    """The one frame of a clip row's payload, int16 RGB (differences do not wrap)."""
    frames, _ = decode_mp4(row["clip_bytes"])
    assert frames.shape[0] == 1
    return frames[0].astype(np.int16)
