"""Build progress lines and per-stage accounting, without Ray."""

from __future__ import annotations

import time

import numpy as np

from pipeline.progress import BuildProgress, StageMeter, error_reason
from pipeline.stages.base import metered, stage_actor, stage_task


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _rows(source: str, clips: int, status: str = "kept") -> dict[str, np.ndarray]:
    obj = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "source": obj([source] * clips),
        "src_num_clips": np.full(clips, clips, dtype=float),
        "src_status": obj(["ok"] * clips),
        "clip_id": obj([f"{source}-{i}" for i in range(clips)]),
        "status": obj([status] * clips),
        "reasons": obj([["motion_low"] if status == "rejected" else [] for _ in range(clips)]),
    }


def test_counts_sources_clips_and_reasons() -> None:
    clock, lines = Clock(), []
    p = BuildProgress(3, interval_s=5.0, echo=lines.append, clock=clock)
    p.update(_rows("a", 2))
    clock.t += 6.0
    p.update(_rows("b", 1, "rejected"))
    assert lines == [p.line()]
    assert p.line().startswith("[build] sources 2/3 (67%) | clips kept 2 rejected 1 error 0")
    assert p.counts()["rejected_by_reason"] == {"motion_low": 1}
    assert p.line().endswith("ETA 3s")  # 2 sources in 6 s, 1 left


def _timed(source: str, spans: list[tuple[float, float]], duration: float) -> dict:
    """Rows of one streamed chunk of ``source``: clips at ``spans`` (seconds)."""
    rows = _rows(source, len(spans))
    rows["src_num_clips"] = np.array([None] * len(spans), dtype=object)
    rows["start_s"] = np.array([a for a, _ in spans])
    rows["end_s"] = np.array([b for _, b in spans])
    rows["src_duration_s"] = np.full(len(spans), duration)
    return rows


def test_eta_credits_a_long_source_with_the_seconds_its_clips_cover() -> None:
    clock, lines = Clock(), []
    p = BuildProgress(2, interval_s=0, echo=lines.append, clock=clock)
    assert p.line().endswith("ETA ?")
    clock.t += 10.0
    chunk = _timed("movie", [(0.0, 20.0), (21.0, 41.0)], duration=400.0)
    p.observe(chunk)  # 40 of 400 s: 0.1 of 2 sources in 10 s
    p.update(chunk)
    assert p.fraction_done() == 0.1
    assert p.line().startswith("[build] sources 0/2 (5%)")
    assert p.line().endswith("ETA 3m10s")  # 1.9 sources left at 0.01 sources/s
    # rows without a clip, and images (no duration), add nothing
    empty = _timed("movie", [(0.0, 0.0)], duration=400.0)
    empty["clip_id"] = np.array([None], dtype=object)
    p.observe(empty)
    p.observe(_timed("photo", [(0.0, 0.0)], duration=0.0))
    p.observe({"source": np.array(["x"], dtype=object)})  # no times at all
    assert p.fraction_done() == 0.1
    # the covered share never passes the whole source; once done it counts as one
    p.observe(_timed("movie", [(41.0, 600.0)], duration=400.0))
    assert p.fraction_done() == 1.0
    last = _timed("movie", [(41.0, 60.0)], duration=400.0)
    last["src_num_clips"] = np.array([3.0])
    p.update(last)
    assert p.sources_done == 1 and p.fraction_done() == 1.0


def test_stage_line_shows_rows_and_rate_since_last_line() -> None:
    clock, meter = Clock(), StageMeter()
    p = BuildProgress(2, clock=clock, stages=["probe", "split", "encode"], poll=meter.snapshot)
    meter.add("probe", 2, 2, 0.1)
    meter.add("split", 1, 4, 2.0)
    clock.t += 2.0
    assert p.stage_line() == "[stages] probe 2 (1.0/s) | split 4 (2.0/s) | encode 0 (0.0/s)"
    meter.add("split", 1, 6, 2.0)
    meter.add("encode", 4, 4, 1.0)
    clock.t += 4.0
    assert p.stage_line() == "[stages] probe 2 (0.0/s) | split 10 (1.5/s) | encode 4 (1.0/s)"
    assert meter.snapshot()["split"] == {"rows_in": 2, "rows_out": 10, "batches": 2, "busy_s": 4.0}


def test_stage_line_survives_a_failing_poll() -> None:
    def slow() -> dict:
        raise TimeoutError("meter busy")

    def broken() -> dict:
        raise RuntimeError("meter actor gone")

    assert BuildProgress(1, stages=["split"], poll=slow).stage_line() is None  # next tick
    p = BuildProgress(1, stages=["split"], poll=broken)
    assert p.stage_line() == "[stages] unavailable: RuntimeError: meter actor gone"


def test_ticker_prints_while_no_batch_arrives() -> None:
    lines: list[str] = []
    meter = StageMeter()
    meter.add("split", 1, 3, 0.5)
    p = BuildProgress(4, interval_s=0.05, echo=lines.append, stages=["split"], poll=meter.snapshot)
    p.start()
    try:
        deadline = time.monotonic() + 10
        while len(lines) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        p.stop()
    assert any(line.startswith("[build] sources 0/4") for line in lines)
    assert any(line.startswith("[stages] split 3 (") for line in lines)
    settled = len(lines)
    time.sleep(0.15)
    assert len(lines) == settled  # stopped


class Double:
    """A 1:N stage: every row twice."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, batch: dict) -> dict:
        return {k: np.repeat(v, 2) for k, v in batch.items()}


def test_stage_wrappers_report_rows_and_busy_time() -> None:
    meter = StageMeter()
    batch = {"source": np.array(["a", "b", "c"], dtype=object)}
    assert len(stage_task(Double, "x", name="split", meter=meter.add)(batch)["source"]) == 6
    actor = stage_actor(Double, "caption", meter.add)("x")
    assert len(actor(batch)["source"]) == 6
    assert len(metered(Double("y"), "ranges", meter.add)(batch)["source"]) == 6
    snap = meter.snapshot()
    for stage in ("split", "caption", "ranges"):
        assert snap[stage]["rows_in"] == 3 and snap[stage]["rows_out"] == 6
        assert snap[stage]["batches"] == 1 and snap[stage]["busy_s"] >= 0
    # without a meter nothing is wrapped
    fn = Double("z")
    assert metered(fn, "x", None) is fn


def test_clips_count_when_their_source_completes_and_not_when_it_failed() -> None:
    p = BuildProgress(2, interval_s=0)
    early = _rows("long", 2)
    early["src_num_clips"] = np.array([None, None], dtype=object)  # a streamed chunk
    p.update(early)
    assert p.counts()["clips_by_status"] == {} and p.sources_done == 0
    last = _rows("long", 1)
    last["src_num_clips"] = np.array([3.0])
    last["clip_id"] = np.array(["long-2"], dtype=object)
    p.update(last)
    assert p.counts()["clips_by_status"] == {"kept": 3} and p.sources_done == 1
    # a source that failed after handing clips on: one error, its clips not counted
    chunk = _rows("bad", 1, "rejected")
    chunk["src_num_clips"] = np.array([None], dtype=object)
    final = _rows("bad", 1)
    final["clip_id"] = np.array(["bad-1"], dtype=object)
    final["src_num_clips"], final["src_status"] = np.array([2.0]), np.array(["error"], dtype=object)
    p.update(chunk)
    p.update(final)
    assert (p.sources_done, p.sources_error) == (2, 1)
    assert p.counts()["clips_by_status"] == {"kept": 3} and p.counts()["rejected_by_reason"] == {}
    assert p.counts()["errors_by_reason"] == {"(no reason given)": 1}


def test_failed_sources_are_counted_by_cause() -> None:
    """Causes that differ only in their numbers and in the source they name are one."""
    p = BuildProgress(3, interval_s=0)
    for name, error in (
        ("/v/a.mp4", "/v/a.mp4: frame size 9000x9000 exceeds 33177600 pixels (max_pixels)"),
        ("/v/b.mp4", "/v/b.mp4: frame size 12000x800 exceeds 33177600 pixels (max_pixels)"),
        ("/v/c.mp4", "/v/c.mp4: split failed: timeout after 1800 s (reading /v/c.mp4)"),
    ):
        row = _rows(name, 1)
        row["clip_id"] = np.array([None], dtype=object)
        row["src_status"] = np.array(["error"], dtype=object)
        row["src_error"] = np.array([error], dtype=object)
        p.update(row)
    assert p.counts()["errors_by_reason"] == {
        "frame size NxN exceeds N pixels (max_pixels)": 2,
        "split failed: timeout after N s (reading <source>)": 1,
    }
    # digits of names stay: a cause reads as the error did
    assert error_reason("/v/a.mp4: an MP4 without moov; H.264 (x264) at 29.97 fps", "/v/a.mp4") == (
        "an MP4 without moov; H.264 (x264) at N fps"
    )


def test_build_prints_a_short_summary_or_the_json(capsys, monkeypatch) -> None:
    """``reelpack build`` ends with a few lines; ``--json`` prints the whole summary."""
    import json

    from reelpack import cli

    summary = {
        "sources_total": 5,
        "sources_built": 4,
        "sources_done": 4,
        "sources_error": 1,
        "wall_s": 12.34,
        "clips_by_status": {"kept": 6, "rejected": 3},
        "rejected_by_reason": {"motion<0.002": 1, "still_fraction>0.9": 2},
        "committed": {"sources": 4, "clips": 9, "shards": 2, "latent_tokens": 12345},
        "files_skipped": {".cr2": 30, ".txt": 1},
        "errors_by_reason": {"not a readable video or image: an empty file (N bytes)": 1},
        "interrupted": None,
    }

    def build(*args: object, echo=print, **kwargs: object) -> dict:
        echo("sources: 5 found, 1 already done, 4 to build")  # what build() says on the way
        return summary

    monkeypatch.setattr("pipeline.graph.build", build)
    monkeypatch.setattr("pipeline.config.load_config", lambda *a, **k: None)
    assert cli.main(["build", "v.mp4", "--out", "/data/c"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "sources: 5 found, 1 already done, 4 to build",
        "sources    4 done of 4 (1 failed; 1 already in the corpus) in 12.3 s",
        "files      skipped 31 files that are not video or image by extension (.cr2 30, .txt 1)",
        "clips      kept 6, rejected 3, error 0",
        "failed     1 not a readable video or image: an empty file (N bytes)",
        "rejected   still_fraction>0.9 2, motion<0.002 1",
        "committed  sources 4, clips 9, shards 2, latent tokens 12,345",
        "summary    /data/c/summary.json (--json prints it)",
    ]
    assert cli.main(["build", "v.mp4", "--out", "/data/c", "--json"]) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out) == summary  # stdout is the JSON alone
    assert printed.err == "sources: 5 found, 1 already done, 4 to build\n"
    summary["interrupted"] = "SIGINT"
    assert cli.main(["build", "v.mp4", "--out", "/data/c"]) == 130


def test_ray_datas_own_lines_give_way_to_the_builds() -> None:
    import logging

    from pipeline.graph import _not_ray_data_chatter

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("ray.data", level, __file__, 1, message, None, None)

    finished = "Dataset dataset_1 execution finished in 23.63 seconds"
    assert not _not_ray_data_chatter(record(logging.INFO, finished))
    assert not _not_ray_data_chatter(record(logging.WARNING, "Progress bars disabled. ..."))
    assert _not_ray_data_chatter(record(logging.WARNING, "Operator failed: " + finished))
    assert _not_ray_data_chatter(record(logging.INFO, "Execution plan of Dataset"))
