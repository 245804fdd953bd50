"""Every stage declares the columns it reads and writes, and they exist in ``schemas``."""

from __future__ import annotations

import numpy as np
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


def test_clean_batch_restores_missing_values_to_their_column_types() -> None:
    """Arrow/pandas hand a column with None over as float NaN; blocks of different
    sources must keep one type per column, so missing values become None again."""
    import pyarrow as pa

    from pipeline.stages.base import clean_batch

    nan = float("nan")
    batch = {
        "src_error": np.array([nan, nan]),  # text
        "src_vfr": np.array([1.0, nan]),  # flag
        "start_frame": np.array([3.0, nan]),  # count
        "score_motion": np.array([0.5, nan]),  # a float column keeps its NaN
        "clip_embedding": np.ones((2, 4), np.float32),  # vectors stay as they are
        "unknown": np.array([nan, 1.0]),
    }
    out = clean_batch(dict(batch))
    assert list(out["src_error"]) == [None, None]
    assert list(out["src_vfr"]) == [True, None] and isinstance(out["src_vfr"][0], bool)
    assert list(out["start_frame"]) == [3, None] and isinstance(out["start_frame"][0], int)
    assert out["score_motion"] is batch["score_motion"]
    assert out["clip_embedding"] is batch["clip_embedding"]
    assert out["unknown"] is batch["unknown"]
    one = pa.table({"src_vfr": out["src_vfr"]})
    other = pa.table({"src_vfr": np.array([False, True])})
    assert pa.concat_tables([one, other]).column("src_vfr").type == pa.bool_()
