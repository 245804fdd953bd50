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
        "clip_embedding": np.ones((2, 4), np.float32),  # vectors become lists
        "latent_shape": np.array([np.array([4, 2, 3, 5]), None], dtype=object),
        "reasons": np.array([np.array(["too_dark"], dtype=object), nan], dtype=object),
        "unknown": np.array([nan, 1.0]),
        # a stage's cell-by-cell copy of a float column Ray made of missing text
        "error": np.array([np.float32("nan"), "decode failed"], dtype=object),
    }
    out = clean_batch(dict(batch))
    assert list(out["src_error"]) == [None, None]
    assert list(out["error"]) == [None, "decode failed"]
    assert list(out["src_vfr"]) == [True, None] and isinstance(out["src_vfr"][0], bool)
    assert list(out["start_frame"]) == [3, None] and isinstance(out["start_frame"][0], int)
    assert out["score_motion"] is batch["score_motion"]
    assert list(out["clip_embedding"]) == [[1.0] * 4] * 2
    assert list(out["latent_shape"]) == [[4, 2, 3, 5], None]
    assert list(out["reasons"]) == [["too_dark"], None]
    assert out["unknown"] is batch["unknown"]
    one = pa.table({"src_vfr": out["src_vfr"]})
    other = pa.table({"src_vfr": np.array([False, True])})
    assert pa.concat_tables([one, other]).column("src_vfr").type == pa.bool_()


def test_blocks_with_list_cells_join_on_ray(fresh_ray) -> None:
    """Equal-shape numpy cells in one block (a tensor column to Ray) and a None in
    another (an object column) cannot be joined into one actor batch unless the stage
    outputs pass through clean_batch: the failure a build once hit in text_encode."""
    import ray

    from pipeline.stages.base import clean_batch

    def cells(values: list) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    def make(batch: dict) -> dict:
        i = int(batch["id"][0])
        shape = [np.array([4, 2, 3, 5 + i])] if i != 1 else [None]
        emb = [None] if i == 0 else [np.array([0.1, 0.2 * i], np.float32)]
        return clean_batch(
            {"id": batch["id"], "latent_shape": cells(shape), "clip_embedding": cells(emb)}
        )

    class PassOn:
        def __call__(self, batch: dict) -> dict:
            return clean_batch(dict(batch))

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.range(3, override_num_blocks=3).map_batches(make, batch_size=None)
    ds = ds.map_batches(
        PassOn, batch_size=3, num_cpus=0.1, compute=ray.data.ActorPoolStrategy(size=1)
    )
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [None if r["latent_shape"] is None else list(r["latent_shape"]) for r in rows] == [
        [4, 2, 3, 5],
        None,
        [4, 2, 3, 7],
    ]
    assert rows[0]["clip_embedding"] is None and len(rows[2]["clip_embedding"]) == 2


class _Model:
    """A model stage: built once per actor; adds its name to each row's ``caption``."""

    built = 0

    def __init__(self, name: str, seen: list[tuple[str, int]]) -> None:
        _Model.built += 1
        self.name, self.seen = name, seen

    def __call__(self, batch):
        self.seen.append((self.name, len(batch["source"])))
        captions = [
            f"{c or ''}{self.name}" for c in batch.get("caption", [None] * len(batch["source"]))
        ]
        return {**batch, "caption": np.array(captions, dtype=object)}


class _Task:
    """A stateless stage: built afresh per batch; marks each row kept."""

    built = 0

    def __init__(self) -> None:
        _Task.built += 1

    def __call__(self, batch):
        return {**batch, "status": np.array(["kept"] * len(batch["source"]), dtype=object)}


def test_fused_stages_run_each_member_in_its_own_batch_size() -> None:
    """Stages fused into one actor: rows pass through every member in order, each member
    sees slices of at most its batch size, a model stage is built once per actor and a
    stateless one per batch, and each reports to the meter under its own label."""
    from pipeline.stages.base import fused_stages

    seen: list[tuple[str, int]] = []
    metered: list[tuple[str, int, int]] = []
    _Model.built = _Task.built = 0
    cls = fused_stages(
        [
            ("caption", _Model, ("a", seen), True, 4),
            ("decide#2", _Task, (), False, None),
            ("encode", _Model, ("b", seen), True, 1),
        ],
        meter=lambda name, rows_in, rows_out, busy: metered.append((name, rows_in, rows_out)),
    )
    assert cls.__name__ == "_Model+_Task+_Model"
    actor = cls()
    assert _Model.built == 2 and _Task.built == 0
    sources = np.array([f"s{i}" for i in range(6)], dtype=object)
    out = actor({"source": sources})
    out2 = actor({"source": sources[:2]})
    assert _Model.built == 2 and _Task.built == 2  # the models once, the task per batch
    assert list(out["source"]) == list(sources)
    assert list(out["caption"]) == ["ab"] * 6 and list(out["status"]) == ["kept"] * 6
    assert list(out2["caption"]) == ["ab"] * 2
    assert seen == [("a", 4), ("a", 2)] + [("b", 1)] * 6 + [("a", 2)] + [("b", 1)] * 2
    assert [m[0] for m in metered[:4]] == ["caption", "caption", "decide#2", "encode"]
    assert {name for name, _, _ in metered} == {"caption", "decide#2", "encode"}
