"""``reelpack refilter``: new decisions from stored scores, with every decoder and model
made to raise (no recompute), only index parts added, and clips that become kept
either pointing at their old sample again or left for the next build."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.config import BuildConfig, to_dict
from pipeline.refilter import (
    built_config,
    load_refilter_config,
    reason_counts,
    redecide,
    refilter,
)
from pipeline.stages.base import rows_to_batch
from pipeline.stages.decide import DEFAULT_THRESHOLDS, Decide, DecideConfig
from pipeline.stages.dedup import Dedup, DedupConfig
from pipeline.stages.score import Score
from pipeline.video import encode_mp4
from pipeline.writer import CorpusWriter, read_index, sources_needing_work
from reelpack.cli import main

H, W, T = 64, 96, 8


def pan(seed: int) -> np.ndarray:
    base = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(T)])


# source -> its clips (clip_id, frames); "copy" repeats "pan-a" in another source
CLIPS: dict[str, list[tuple[str, np.ndarray]]] = {
    "/videos/a.mp4": [("pan-a", pan(0)), ("still-a", np.repeat(pan(1)[:1], T, axis=0))],
    "/videos/b.mp4": [
        ("soft-b", np.stack([cv2.GaussianBlur(f, (0, 0), 3.0) for f in pan(2)])),
        ("pan-b", pan(3)),
    ],
    "/videos/c.mp4": [("copy-c", pan(0))],
}


def stream_batch() -> dict[str, np.ndarray]:
    """What reaches the writer: scored, decided, deduplicated rows; kept ones 'encoded'."""
    rows = [
        {"clip_id": cid, "source": src, "status": None, "start_s": 0.0, "end_s": 1.0,
         "src_status": "done", "src_num_clips": len(clips), "clip_bytes": encode_mp4(f, 8.0)}
        for src, clips in CLIPS.items()
        for cid, f in clips
    ]  # fmt: skip
    batch = Dedup(DedupConfig())(Decide()(Score()(rows_to_batch(rows))))
    latents = np.empty(len(rows), dtype=object)
    for i, status in enumerate(batch["status"]):
        latents[i] = f"latents of {batch['clip_id'][i]}".encode() if status == "kept" else None
    return {**{k: v for k, v in batch.items() if k != "clip_bytes"}, "latents": latents}


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    batch = stream_batch()
    return {"batch": batch}


@pytest.fixture
def corpus(tmp_path: Path, built: dict[str, Any]) -> str:
    root = str(tmp_path / "corpus")
    with CorpusWriter(root) as writer:
        writer.add(built["batch"])
        writer.write_manifest({"config": to_dict(BuildConfig())})
    return root


@pytest.fixture
def no_recompute(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every decoder, scorer and model loader raises (and records the attempt)."""
    calls: list[str] = []

    def forbid(name: str) -> Any:
        def boom(*_: Any, **__: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"refilter called {name}")

        return boom

    import av
    import open_clip

    for target in (
        "pipeline.video.decode_mp4",
        "pipeline.video.decode_mp4_sampled",
        "pipeline.stages.score.decode_mp4_sampled",
        "pipeline.stages.score.score_clip",
        "pipeline.stages.score.score_payload",
        "pipeline.stages.score.flow_stats",
        "pipeline.stages.score.text_mask",
        "pipeline.stages.aesthetic.decode_mp4_sampled",
        "pipeline.stages.aesthetic.ClipEmbedder.__init__",
        "pipeline.stages.agreement.decode_mp4_sampled",
    ):
        monkeypatch.setattr(target, forbid(target))
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbid("open_clip"))
    monkeypatch.setattr(open_clip, "create_model", forbid("open_clip"))
    monkeypatch.setattr(av, "open", forbid("av.open"))
    yield calls
    assert calls == []


def by_id(root: str) -> dict[str, dict[str, Any]]:
    return {r["clip_id"]: r for r in read_index(root).to_pylist()}


def files(root: str, sub: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(root, sub).glob("*"))}


def write_config(path: Path, thresholds: Any, **extra: Any) -> str:
    path.write_text(json.dumps({"decide": {"thresholds": thresholds}, **extra}))
    return str(path)


# --- the tests --------------------------------------------------------------------------------


def test_built_corpus_is_what_the_tests_assume(corpus: str) -> None:
    rows = by_id(corpus)
    assert {k: r["status"] for k, r in rows.items()} == {
        "pan-a": "kept",
        "still-a": "rejected",
        "soft-b": "rejected",
        "pan-b": "kept",
        "copy-c": "rejected",
    }
    assert rows["copy-c"]["dup_of"] == "pan-a" and rows["copy-c"]["reasons"] == ["duplicate"]
    assert rows["still-a"]["reasons"] == ["motion<0.002", "still_fraction>0.9"]
    assert all(len(r["frame_hash"]) == 16 for r in rows.values())


def test_refilter_changes_decisions_without_recomputing(
    corpus: str, tmp_path: Path, no_recompute: list[str]
) -> None:
    shards_before = files(corpus, "shards")
    index_parts_before = files(corpus, "index")
    scores_before = {k: v for k, v in by_id(corpus)["still-a"].items() if k.startswith("score_")}
    # drop the motion / still thresholds: the still clip becomes kept
    loose = tuple((k, b) for k, b in DEFAULT_THRESHOLDS if k not in ("motion", "still_fraction"))
    summary = refilter(corpus, DecideConfig(thresholds=loose), DedupConfig())
    assert summary["before"]["by_status"] == {"kept": 2, "rejected": 3}
    assert summary["after"]["by_status"] == {"kept": 3, "rejected": 2}
    assert summary["after"]["rejected_by_reason"] == {"duplicate": 1, "sharpness<20": 1}
    assert summary["sources_rewritten"] == 1 and summary["part"] is not None
    assert summary["decision_changes"] == 1  # one clip, whose status and reasons changed
    rows = by_id(corpus)
    assert rows["still-a"]["status"] == "kept" and rows["still-a"]["reasons"] == []
    assert rows["still-a"]["shard"] is None  # never encoded: the next build does it
    assert sources_needing_work(corpus) == {"/videos/a.mp4"}
    assert rows["pan-a"]["shard"] and rows["pan-a"]["key"] == "pan-a"  # untouched
    # stored scores are exactly what they were
    scores_after = {k: v for k, v in rows["still-a"].items() if k.startswith("score_")}
    assert scores_after.keys() == scores_before.keys() and rows["still-a"]["score_motion"] < 0.002
    assert all(
        scores_after[k] == scores_before[k] or (math.isnan(scores_after[k]) and math.isnan(v))
        for k, v in scores_before.items()
    )
    # only the index grew: shards identical, old parts identical, one new part
    assert files(corpus, "shards") == shards_before
    after = files(corpus, "index")
    assert {k: after[k] for k in index_parts_before} == index_parts_before
    assert len(after) == len(index_parts_before) + 1
    manifest = json.loads(Path(corpus, "manifest.json").read_text())
    assert manifest["counts"]["clips_kept"] == 3
    assert manifest["config"]["decide"]["thresholds"] == [[k, list(b)] for k, b in loose]


def test_reject_then_keep_again_restores_the_sample(corpus: str, no_recompute: list[str]) -> None:
    strict = (*DEFAULT_THRESHOLDS[1:], ("sharpness", (1e9, None)))
    refilter(corpus, DecideConfig(thresholds=strict), DedupConfig())
    rows = by_id(corpus)
    assert rows["pan-a"]["status"] == "rejected" and rows["pan-a"]["shard"] is None
    assert "sharpness<1e+09" in rows["pan-a"]["reasons"]
    # while pan-a is rejected, its copy is not a duplicate of anything kept
    assert rows["copy-c"]["dup_of"] is None
    refilter(corpus, DecideConfig(), DedupConfig())
    rows = by_id(corpus)
    assert rows["pan-a"]["status"] == "kept" and rows["pan-a"]["key"] == "pan-a"
    assert rows["pan-a"]["shard"] == "shards/shard-000000.tar"
    assert rows["copy-c"]["dup_of"] == "pan-a"  # the copy with a sample wins
    assert sources_needing_work(corpus) == set()


def test_dedup_retuned_and_dry_run(corpus: str, no_recompute: list[str]) -> None:
    index_before = files(corpus, "index")
    off = refilter(corpus, DecideConfig(), DedupConfig(enabled=False), dry_run=True)
    assert off["after"]["by_status"] == {"kept": 3, "rejected": 2} and off["part"] is None
    assert files(corpus, "index") == index_before  # a dry run writes nothing
    same = refilter(corpus, DecideConfig(), DedupConfig())
    assert same["decision_changes"] == 0 and same["part"] is None  # nothing to rewrite


def test_redecide_keeps_errors_and_pending_agreement(corpus: str) -> None:
    table = read_index(corpus)
    cfg = DecideConfig(thresholds={"agreement": (0.25, None)})
    out = redecide(table, cfg, None).to_pylist()
    # nothing was captioned: agreement is pending, so nothing fails on it
    assert {r["clip_id"]: r["reasons"] for r in out}["still-a"] == []
    assert reason_counts(table) == {
        "duplicate": 1,
        "motion<0.002": 1,
        "sharpness<20": 1,
        "still_fraction>0.9": 1,
    }


def test_cli_refilter(
    corpus: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_recompute: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # a list of pairs is the whole set of thresholds: sharpness alone
    cfg = write_config(tmp_path / "t.json", [["sharpness", [20, None]]], dedup={"enabled": False})
    assert main(["refilter", corpus, "--config", cfg]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["after"]["by_status"] == {"kept": 4, "rejected": 1}
    assert set(summary["sources_needing_work"]) == {"/videos/a.mp4", "/videos/c.mp4"}
    bad = write_config(tmp_path / "bad.json", {"brightness": [0, 1]})
    assert main(["refilter", corpus, "--config", bad]) == 2
    assert "brightness" in capsys.readouterr().err
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"decide": {"treshold": {}}}))
    assert main(["refilter", corpus, "--config", str(typo)]) == 2
    negative = tmp_path / "negative.json"
    negative.write_text(json.dumps({"decide": {"min_duration_s": -1}}))
    assert main(["refilter", corpus, "--config", str(negative)]) == 2
    assert "decide.min_duration_s must be >= 0" in capsys.readouterr().err
    assert main(["refilter", str(tmp_path), "--config", cfg]) == 2  # not a corpus
    assert "no manifest.json; not a reelpack corpus" in capsys.readouterr().err
    assert main(["refilter", str(tmp_path / "nowhere")]) == 2  # said as inspect says it
    assert f"{tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err
    assert main(["refilter", str(typo)]) == 2
    assert f"{typo}: a file, not a corpus" in capsys.readouterr().err
    # a build writing the corpus (a live process of this host): named, nothing written
    from test_lock import _hold

    build = subprocess.Popen(["sleep", "60"])
    _hold(corpus, host=socket.gethostname(), pid=build.pid)
    strict = write_config(tmp_path / "s.json", [["sharpness", [1e9, None]]])
    try:
        assert main(["refilter", corpus, "--config", strict]) == 1
        err = capsys.readouterr().err
        assert "is being written by another run" in err and "CorpusLocked" not in err
    finally:
        build.kill()
        build.wait()
        os.remove(os.path.join(corpus, "lock.json"))


def test_load_config_reads_decide_and_dedup_from_a_build_config(tmp_path: Path) -> None:
    path = tmp_path / "build.yaml"
    path.write_text(
        "preset: tiny\n"  # presets are not resolved: no model is built
        "decide:\n  thresholds: {motion: [0.01, null]}\n  min_duration_s: 1.5\n"
        "dedup:\n  threshold: 0.9\n"
    )
    decide, dedup = load_refilter_config(path)
    assert decide.threshold_map() == {**dict(DEFAULT_THRESHOLDS), "motion": (0.01, None)}
    assert decide.min_duration_s == 1.5 and dedup.threshold == 0.9


def test_keys_the_file_leaves_out_keep_the_build_values(corpus: str, tmp_path: Path) -> None:
    """A file that retunes thresholds keeps the rest of decide and all of dedup as the
    corpus was built (e.g. the dedup threshold a preset chose), read from its manifest."""
    built = to_dict(BuildConfig())
    built["decide"]["min_duration_s"] = 2.5
    built["decide"]["thresholds"] = [["sharpness", [30.0, None]], ["exposure", [0.1, 0.9]]]
    built["dedup"].update(threshold=0.99, retired_key=1)  # a key this version dropped
    with CorpusWriter(corpus) as writer:
        writer.write_manifest({"config": built})
    path = write_config(tmp_path / "retune.json", {"motion": [0.01, None]})
    assert built_config(corpus) == built
    decide, dedup = load_refilter_config(path, built_config(corpus))
    # the build's thresholds, with the file's one added
    assert decide.threshold_map() == {
        "sharpness": (30.0, None),
        "exposure": (0.1, 0.9),
        "motion": (0.01, None),
    }
    assert decide.min_duration_s == 2.5 and dedup.threshold == 0.99
    # without a corpus config: the defaults
    decide, dedup = load_refilter_config(path)
    assert decide.min_duration_s == DecideConfig().min_duration_s
    assert dedup.threshold == DedupConfig().threshold
    # through the CLI, the manifest keeps the build's dedup settings
    assert main(["refilter", corpus, "--config", path]) == 0
    assert built_config(corpus)["dedup"]["threshold"] == 0.99
    assert built_config(corpus)["decide"]["min_duration_s"] == 2.5


def test_cli_set_items_edit_the_built_thresholds(
    corpus: str, capsys: pytest.CaptureFixture[str], no_recompute: list[str]
) -> None:
    """``--set`` changes single thresholds and keeps the others: dropping motion and
    still_fraction keeps the still clip, while sharpness still rejects the soft one."""
    sets = [
        "--set",
        "decide.thresholds.motion=null",
        "--set",
        "decide.thresholds.still_fraction=null",
    ]
    assert main(["refilter", corpus, *sets, "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["after"]["by_status"] == {"kept": 3, "rejected": 2}
    assert summary["after"]["rejected_by_reason"] == {"duplicate": 1, "sharpness<20": 1}
    assert by_id(corpus)["still-a"]["status"] == "rejected"  # a dry run writes nothing
    assert main(["refilter", corpus, "--set", "split.detector=content"]) == 2
    assert "refilter changes only decide and dedup" in capsys.readouterr().err
    # with no change given, the corpus's own settings apply again: nothing changes here
    assert main(["refilter", corpus, "--dry-run"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["decision_changes"] == 0 and summary["after"] == summary["before"]


def test_dedup_stage_seeded_from_the_corpus_on_resume(corpus: str, tmp_path: Path) -> None:
    """A resumed build's Dedup actor knows the kept clips already committed."""
    stage = Dedup(DedupConfig(), corpus_root=corpus)
    assert len(stage.index) == 2  # pan-a, pan-b (kept, not duplicates)
    rows = [
        {"clip_id": cid, "source": "/videos/new.mp4", "status": "kept", "reasons": [],
         "frame_hash": by_id(corpus)[orig]["frame_hash"]}
        for cid, orig in (("new-copy", "pan-b"), ("pan-a", "pan-a"))
    ]  # fmt: skip
    out = stage(rows_to_batch(rows))
    # a new copy of a committed clip is caught; the clip itself (rebuilt) is not
    assert out["dup_of"].tolist() == ["pan-b", None]
    assert len(Dedup(DedupConfig(), corpus_root=str(tmp_path / "empty")).index) == 0


def test_dedup_seeds_part_by_part_from_the_live_rows(corpus: str) -> None:
    """A resumed build's index is seeded one committed part at a time, from the live
    rows only: a clip a later part rejects is no representative any more."""
    from pipeline.writer import iter_index_parts

    rows = [r for r in read_index(corpus).to_pylist() if r["source"] == "/videos/b.mp4"]
    for row in rows:
        if row["clip_id"] == "pan-b":
            row.update(status="rejected", reasons=["sharpness<20"], shard=None, key=None)
    with CorpusWriter(corpus) as writer:
        writer.rewrite({"/videos/b.mp4": rows})
    parts = list(iter_index_parts(corpus, ["clip_id", "status"]))
    assert len(parts) == 2  # the first part's b rows are superseded by the second's
    assert sorted(r["clip_id"] for p in parts for r in p.to_pylist()) == sorted(
        read_index(corpus).column("clip_id").to_pylist()
    )
    assert parts[0].column_names == ["clip_id", "source", "status"]
    stage = Dedup(DedupConfig(), corpus_root=corpus)
    assert stage.index.ids == ["pan-a"]
    copy = {"clip_id": "new-copy", "source": "/videos/new.mp4", "status": "kept", "reasons": []}
    copy["frame_hash"] = by_id(corpus)["pan-b"]["frame_hash"]
    assert stage(rows_to_batch([copy]))["dup_of"].tolist() == [None]  # pan-b is rejected now


@pytest.mark.parametrize("hole", [False, True])
def test_rewritten_rows_keep_their_embeddings(
    tmp_path: Path, built: dict[str, Any], hole: bool
) -> None:
    """A refilter rewrites whole rows: every embedding (an array, a null, an empty list;
    with ``hole`` also one with a null value, which the rows then carry as lists)
    reaches the new part as it was."""
    rng = np.random.default_rng(3)
    batch = dict(built["batch"])
    cells = np.empty(len(batch["clip_id"]), dtype=object)
    last = [1.0, None] if hole else [1.0, 2.0]
    shapes: list[Any] = [rng.standard_normal(2).astype(np.float32), None, [], last]
    for i in range(len(cells)):
        cells[i] = shapes[i % len(shapes)]
    batch["clip_embedding"] = cells
    root = str(tmp_path / "corpus")
    with CorpusWriter(root) as writer:
        writer.add(batch)
        writer.write_manifest({"config": to_dict(BuildConfig())})
    before = {r["clip_id"]: r["clip_embedding"] for r in read_index(root).to_pylist()}
    # reject on sharpness everywhere: every source's rows are rewritten
    summary = refilter(root, DecideConfig(thresholds={"sharpness": [1e9, None]}), DedupConfig())
    assert summary["sources_rewritten"] == len(CLIPS) and summary["part"] == 1
    after = {r["clip_id"]: r["clip_embedding"] for r in read_index(root).to_pylist()}
    assert after == before and before[str(batch["clip_id"][3])] == last
