"""Every stage declares the columns it reads and writes, and they exist in ``schemas``."""

from __future__ import annotations

import pytest

import schemas
from pipeline.stages.aesthetic import AestheticScorer
from pipeline.stages.caption import Captioner
from pipeline.stages.decide import Decide
from pipeline.stages.encode import Encode
from pipeline.stages.probe import Probe
from pipeline.stages.score import Score
from pipeline.stages.split import Split
from pipeline.stages.text_encode import TextEncode

STAGES = [Probe, Split, Score, AestheticScorer, Decide, Captioner, Encode, TextEncode]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.__name__)
def test_declared_columns_exist(stage) -> None:
    known = set(schemas.STREAM_COLUMNS)
    assert stage.writes, f"{stage.__name__} declares no output columns"
    unknown = (set(stage.reads) - known - {"source"}) | (set(stage.writes) - known)
    assert not unknown, f"{stage.__name__} uses columns missing from schemas: {sorted(unknown)}"


def test_score_columns_cover_every_signal() -> None:
    for name in schemas.SCORE_NAMES:
        assert schemas.score_column(name) in schemas.CLIP_SCHEMA.names


def test_sample_layout_is_pickle_free() -> None:
    for suffix in (schemas.SAMPLE_LATENTS, schemas.SAMPLE_META, schemas.SAMPLE_CAPTION):
        assert not suffix.endswith(("pyd", "pickle", "pkl", "pth"))
