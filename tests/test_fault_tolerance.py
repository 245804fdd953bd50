"""Fault tolerance on a multi-node Ray cluster simulated on one machine.

A worker node is removed while the build runs; the build must still finish with
every clip present exactly once, equal to what the split stage produces for the
same files without Ray.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from pipeline.config import load_config
from pipeline.graph import build
from pipeline.stages.base import rows_to_batch
from pipeline.stages.probe import Probe
from pipeline.stages.split import Split
from pipeline.synth import synth_video
from pipeline.writer import read_index, read_sources

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    # the head runs no work; each worker node must fit a 1-CPU task beside small actors
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


def _expected_clip_ids(cfg, paths: list[str]) -> set[str]:
    probed = Probe(cfg.probe)(rows_to_batch([{"source": p} for p in paths]))
    split = Split(cfg.split)(probed)
    return {c for c in split["clip_id"] if c is not None}


def test_worker_node_killed_mid_build(cluster, tmp_path, tmp_path_factory) -> None:
    c, workers = cluster
    videos = tmp_path / "videos"
    videos.mkdir()
    paths = []
    for i in range(8):
        path = videos / f"v{i}.mp4"
        synth_video(str(path), width=96, height=64, fps=12.0, shots=[18, 18], seed=i)
        paths.append(str(path.resolve()))
    cfg = load_config(
        preset="tiny",
        model_cache=str(tmp_path_factory.mktemp("models")),
        split={"min_clip_s": 1.0, "max_clip_s": 2.0},
        write={"shard_max_samples": 1},
        ray={"progress_interval_s": 0},
    )
    root = tmp_path / "corpus"
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = build([str(videos)], str(root), cfg, echo=lambda s: None)
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 240
    # kill a node once the encode actors are up and before any source is committed
    while time.monotonic() < deadline and thread.is_alive():
        alive = list_actors(filters=[("state", "=", "ALIVE")])
        if any("Encode" in (a.class_name or "") for a in alive):
            break
        time.sleep(0.5)
    assert not list((root / "sources").glob("part-*.parquet")), "killed too late"
    killed_mid_build = thread.is_alive()
    # the driver is attached to one node's raylet; kill a worker node it is not attached to
    driver_raylet = ray._private.worker.global_worker.node._raylet_socket_name
    victim = next(n for n in workers if n._raylet_socket_name != driver_raylet)
    c.remove_node(victim, allow_graceful=False)
    thread.join(timeout=240)
    assert not thread.is_alive(), "build did not finish after a node was removed"
    assert "error" not in result, f"build failed: {result.get('error')!r}"
    assert killed_mid_build, "the build finished before the node could be killed"

    index = read_index(str(root)).to_pylist()
    ids = [r["clip_id"] for r in index]
    assert len(ids) == len(set(ids)), "a clip was written twice"
    assert set(ids) == _expected_clip_ids(cfg, paths)
    sources = read_sources(str(root)).to_pylist()
    assert sorted(s["source"] for s in sources) == sorted(paths)
    assert all(s["status"] == "done" for s in sources)
    kept = [r for r in index if r["status"] == "kept"]
    assert kept and all(r["shard"] and r["key"] for r in kept)
    assert Path(root / "summary.json").exists()


def _one_crashing_of_three(tmp_path) -> tuple[Path, list[str]]:
    """A folder of three short videos, the second named to crash (``b-crashes.mp4``), and
    their paths; no Ray running (the build starts a local one)."""
    if ray.is_initialized():
        ray.shutdown()
    videos = tmp_path / "videos"
    videos.mkdir()
    paths = []
    for i, name in enumerate(["a.mp4", "b-crashes.mp4", "c.mp4"]):
        path = videos / name
        synth_video(str(path), width=96, height=64, fps=12.0, shots=[18, 18], seed=i)
        paths.append(str(path.resolve()))
    return videos, paths


def _local_tiny_config(tmp_path_factory):
    return load_config(
        preset="tiny",
        model_cache=str(tmp_path_factory.mktemp("models")),
        split={"min_clip_s": 1.0, "max_clip_s": 2.0},
        ray={"progress_interval_s": 0, "num_cpus": 2},
    )


def _check_only_the_crashing_one_left_out(root, paths, cfg, reason, said) -> None:
    """The second of ``paths`` is an error row giving ``reason`` (and the build said
    so); the others are built, their clips exactly once."""
    assert any(line.startswith(f"{paths[1]}: {reason}") for line in said), said
    sources = {s["source"]: s for s in read_sources(str(root)).to_pylist()}
    assert sorted(sources) == sorted(paths)
    crashed = sources[paths[1]]
    assert crashed["status"] == "error" and reason in crashed["error"], crashed
    assert all(sources[p]["status"] == "done" for p in (paths[0], paths[2]))
    ids = [r["clip_id"] for r in read_index(str(root)).to_pylist() if r["clip_id"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == _expected_clip_ids(cfg, [paths[0], paths[2]])


def test_a_source_its_workers_keep_dying_on_becomes_an_error_row(
    tmp_path, tmp_path_factory, monkeypatch
) -> None:
    """A file that crashes the decoder kills the worker reading it, each time Ray retries
    it: after WORKER_DEATHS deaths the build goes on without it (an error row that says
    so) instead of retrying it forever, and every other source is built."""
    from pipeline.graph import WORKER_DEATHS
    from pipeline.stages.split import CRASH_ENV

    videos, paths = _one_crashing_of_three(tmp_path)
    monkeypatch.setenv(CRASH_ENV, "crashes")  # splitting b-crashes.mp4 aborts the process
    cfg = _local_tiny_config(tmp_path_factory)
    root = tmp_path / "corpus"
    said: list[str] = []
    try:
        summary = build([str(videos)], str(root), cfg, echo=said.append)
        again = build([str(videos)], str(root), cfg, echo=said.append)
    finally:
        ray.shutdown()
    reason = f"the worker reading it died {WORKER_DEATHS} times in split"
    monkeypatch.delenv(CRASH_ENV)
    _check_only_the_crashing_one_left_out(root, paths, cfg, reason, said)
    assert summary["sources_error"] == 1
    assert again["sources_built"] == 0  # the crashed source is committed, not retried


def test_a_clip_that_keeps_killing_a_model_worker_leaves_only_its_source_out(
    tmp_path, tmp_path_factory, monkeypatch
) -> None:
    """A clip that kills a model stage's worker (a crash in the model, the OOM killer)
    each time Ray Data retries its batch (the VAE's, in the actor pool the model stages
    after dedup share on CPUs: 16 clips, those of all three sources): the batch is
    retried one clip at a time to find that clip, and after WORKER_DEATHS deaths on it
    its source is an error row; the sources batched with it are built."""
    from pipeline.graph import ACTOR_CRASH_ENV, WORKER_DEATHS, actor_pools

    videos, paths = _one_crashing_of_three(tmp_path)
    monkeypatch.setenv(ACTOR_CRASH_ENV, "encode:crashes")
    cfg = _local_tiny_config(tmp_path_factory)
    cfg = replace(cfg, ray=replace(cfg.ray, caption=replace(cfg.ray.caption, batch_size=16)))
    pool = actor_pools(cfg, 0.0)[-1]
    assert pool.label == "caption+agreement+decide#2+encode+text_encode"
    assert pool.batch_size >= 6  # the clips of all three sources can meet
    root = tmp_path / "corpus"
    said: list[str] = []
    try:
        summary = build([str(videos)], str(root), cfg, echo=said.append)
    finally:
        ray.shutdown()
    reason = f"the worker running {pool.label} died {WORKER_DEATHS} times on one of its clips"
    monkeypatch.delenv(ACTOR_CRASH_ENV)
    _check_only_the_crashing_one_left_out(root, paths, cfg, reason, said)
    assert summary["sources_error"] == 1


def test_deaths_are_counted_at_the_clip_a_model_worker_died_on() -> None:
    """The bookkeeping behind the test above: a batch retried one clip at a time closes
    the clips it is done with, so only the clip being run when the worker died (and none
    that was not reached) counts one more death."""
    from pipeline.graph import WORKER_DEATHS, InFlight

    assert WORKER_DEATHS == 3
    state = InFlight()
    keys = [("caption", "a.mp4", 1), ("caption", "b.mp4", 2), ("caption", "c.mp4", 3)]

    def one_at_a_time_dying_at_b() -> None:
        state.pause(keys)
        state.again(keys[:1])
        state.end(keys[:1])
        state.again(keys[1:2])  # the worker dies here

    assert state.again(keys) == [0, 0, 0]  # the whole batch; the worker dies
    assert state.again(keys) == [1, 1, 1]  # retried: one at a time
    one_at_a_time_dying_at_b()
    assert state.again(keys) == [0, 2, 1]
    assert state.died(WORKER_DEATHS) == {}
    one_at_a_time_dying_at_b()
    assert state.again(keys) == [0, 3, 1]  # the guard raises now
    assert state.died(WORKER_DEATHS) == {"b.mp4": "caption"}
    state.end(keys)
    assert state.died(WORKER_DEATHS) == {} and state.again(keys) == [0, 0, 0]
