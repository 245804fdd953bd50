"""The corpus build on Ray Data: the only module in ``pipeline`` that knows Ray.

Streaming graph (cardinality per step)::

    sources                     one row per source URI not yet committed (resume)
      probe     task   1:1      container facts, limits; errors become values
      ranges    task   1:N      long sources -> frame ranges (stragglers; stitched on the driver)
      split     task   1:N      decode once, detect shots, clip payloads
      score     task   1:1      cheap quality signals
      clip      actors 1:1      CLIP embeddings (+ aesthetic score when a head is configured)
      decide    task   1:1      thresholds -> kept / rejected + reasons
      dedup     actor  1:1      near-duplicates across the whole build (one global index)
      caption   actors 1:1      VLM recaption of kept clips
      agreement actors 1:1      CLIP similarity of clip and caption (optional)
      decide    task   1:1      again, now with the caption-dependent signals
      encode    actors 1:1      VAE latents of kept clips
      text      actors 1:1      caption embeddings added to the latents (optional)
      stitch    driver N:1      ranges of one source merged back (exact)
      write     driver N:shards webdataset shards + parquet parts, exactly once

Nothing is materialised whole: Ray Data streams blocks between operators with
backpressure, the driver pulls finished batches, and the writer commits a shard
only together with the index rows of complete sources. The steps that parse sources'
bytes (probe, ranges, split) note each attempt in the build's :class:`BuildState`
actor (:class:`InFlight`): a source that :data:`WORKER_DEATHS` workers died on stops
the stream, and the driver streams the rest again with that source an error row
(:func:`_build_passes`). Resources per stage come from ``BuildConfig.ray``
(:class:`pipeline.config.StageResources`); consecutive model stages without GPUs
share one actor pool (:func:`fuse_steps`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray

import schemas
from model.raycluster import join_cluster, sigint_ignored
from pipeline.compat import check_resume
from pipeline.config import (
    ACTOR_STAGES,
    BuildConfig,
    StageResources,
    config_hash,
    to_dict,
    validate,
)
from pipeline.models import check_models
from pipeline.progress import (
    BuildProgress,
    RemoteMeter,
    StageCounts,
    StageMeter,
    stages_in_order,
)
from pipeline.sources import NoSources, describe_skipped, expand_sources
from pipeline.stages.aesthetic import AestheticScorer
from pipeline.stages.agreement import Agreement
from pipeline.stages.base import (
    ACTOR_CRASH_ENV,
    Batch,
    Meter,
    batch_to_rows,
    fused_stages,
    metered,
    rows_to_batch,
    stage_actor,
    stage_task,
)
from pipeline.stages.caption import Captioner
from pipeline.stages.decide import Decide
from pipeline.stages.dedup import Dedup
from pipeline.stages.encode import Encode
from pipeline.stages.probe import Probe
from pipeline.stages.score import Score
from pipeline.stages.split import CRASH_ENV, Split
from pipeline.stages.text_encode import TextEncode
from pipeline.stitching import RangeStitcher, expand_ranges
from pipeline.storage import is_s3, join, storage_for
from pipeline.writer import CorpusWriter, read_manifest

__all__ = [
    "BuildNotStarted",
    "PlacementError",
    "Pool",
    "Step",
    "actor_pools",
    "build",
    "build_dataset",
    "build_steps",
    "check_resources",
    "cluster_nodes",
    "fuse_steps",
    "gpu_shares",
    "init_ray",
    "run_in_process",
    "stage_labels",
    "stage_stats",
    "worker_env",
]

log = logging.getLogger(__name__)

# Environment variables handed to every Ray worker (S3 settings and retries, model cache).
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "REELPACK_S3_MAX_ATTEMPTS",
    "REELPACK_S3_BACKOFF_BASE_S",
    "REELPACK_S3_BACKOFF_MAX_S",
    "REELPACK_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    CRASH_ENV,
    ACTOR_CRASH_ENV,
)


# Defaults for Ray workers unless the driver's environment sets them. glibc's malloc
# gives each thread its own arena; split's decode, detect and encode threads churning
# through payload buffers then grow the heap with the video's length (about +80 MiB from
# a 2- to a 10-minute 720p source; with 2 arenas +13 MiB at the same speed).
WORKER_ENV_DEFAULTS = {"MALLOC_ARENA_MAX": "2"}


def worker_env() -> dict[str, str]:
    """The driver's S3 / cache settings and :data:`WORKER_ENV_DEFAULTS`, for the runtime
    env of Ray workers."""
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}
    return env | {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}


def init_ray(cfg: BuildConfig) -> None:
    """Join the configured cluster, or start a local Ray, once per process."""
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
        # Inside `ray job submit` the job's own runtime env already reaches the workers,
        # and Ray refuses to merge env vars it also sets; elsewhere forward ours.
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            kwargs["runtime_env"] = {"env_vars": worker_env()}
        if cfg.ray.address:
            local_only = [
                f"ray.{name}"
                for name in ("num_cpus", "object_store_memory")
                if getattr(cfg.ray, name) is not None
            ]
            if local_only:
                log.warning(
                    "%s %s a local Ray only; the cluster at %s keeps its own",
                    " and ".join(local_only),
                    "size" if len(local_only) > 1 else "sizes",
                    cfg.ray.address,
                )
            join_cluster(cfg.ray.address, **kwargs)
        else:  # always a fresh local instance, never a cluster that happens to run here
            with sigint_ignored():  # Ctrl-C stops the build, see _StopSignals
                ray.init(
                    address="local",
                    _node_ip_address="127.0.0.1",  # a local Ray listens on loopback only
                    num_cpus=cfg.ray.num_cpus,
                    object_store_memory=cfg.ray.object_store_memory,
                    **kwargs,
                )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    # Model actors hold their models by design (sized by ray.<stage>.max_actors), which
    # Ray Data's high-memory detector reports every 30 s as a multi-line warning.
    detectors = ctx.issue_detectors_config.detectors
    detectors[:] = [d for d in detectors if d.__name__ != "HighMemoryIssueDetector"]
    # the build's own progress lines and summary stand in for Ray Data's bars and its
    # closing line
    logging.getLogger("ray.data._internal.progress").addFilter(_not_ray_data_chatter)
    logging.getLogger("ray.data._internal.execution.streaming_executor").addFilter(
        _not_ray_data_chatter
    )


def _not_ray_data_chatter(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (
        message.startswith("Progress bars disabled")
        or (record.levelno <= logging.INFO and "execution finished in" in message)
    )


def gpu_shares(cfg: BuildConfig, cluster_gpus: float) -> dict[str, float]:
    """GPUs per actor of each enabled actor stage (dedup: none).

    A stage's ``num_gpus`` is used as given; ``None`` ("auto") means: none on a cluster
    without GPUs; one GPU per actor when the GPUs that stages with an explicit
    ``num_gpus`` leave over hold every auto stage's minimum pool; otherwise the same
    fraction ``1/n`` for all of them, so that ``n`` actors share each GPU (aesthetic,
    caption and encode on one GPU: a third each). The GPUs are those of the cluster
    when the build starts: on a cluster that adds GPU nodes on demand, set
    ``num_gpus`` explicitly.
    """
    stages = [s for s in _enabled_actor_stages(cfg) if s != "dedup"]
    res = {s: getattr(cfg.ray, s) for s in stages}
    auto = [s for s in stages if res[s].num_gpus is None]
    claimed = sum(r.num_gpus * r.min_actors for r in res.values() if r.num_gpus is not None)
    claimed += split_gpus(cfg)  # room for one split task's TransNetV2
    free = cluster_gpus - claimed
    actors = sum(res[s].min_actors for s in auto)
    share = 1.0  # also when explicit stages claim every GPU: check_resources names them
    if cluster_gpus <= 0:
        share = 0.0
    elif 0 < free < actors:
        share = math.floor(10_000 / math.ceil(actors / free)) / 10_000  # Ray's granularity
    shares = {s: share if r.num_gpus is None else r.num_gpus for s, r in res.items()}
    return shares | {"dedup": 0.0} if cfg.dedup.enabled else shares


def _task_args(res: StageResources) -> dict[str, Any]:
    args: dict[str, Any] = {"batch_size": res.batch_size, "num_cpus": res.num_cpus}
    if res.num_gpus:  # split's share of a GPU for TransNetV2 (config allows no other)
        args["num_gpus"] = res.num_gpus
    return args


def split_gpus(cfg: BuildConfig) -> float:
    """The GPUs each split task reserves: ``ray.split.num_gpus`` for the transnetv2
    detector (config refuses them for any other)."""
    return float(cfg.ray.split.num_gpus or 0.0) if cfg.split.detector == "transnetv2" else 0.0


# A source (or range) whose worker process died this many times reading it (a decoder
# crashing on the file, the kernel killing a worker that ran out of memory) becomes an
# error row: the build goes on without it instead of Ray retrying it forever (a node
# lost once costs one attempt).
WORKER_DEATHS = 3


class WorkerDeaths(RuntimeError):
    """Raised instead of reading a source again that :data:`WORKER_DEATHS` workers died
    on: a user error, which Ray does not retry, so the stream stops and the driver
    builds the rest without it."""


class InFlight:
    """The attempts at reading each source that began and did not end, per step (probe,
    ranges, split: the steps that parse a source's own bytes) and range. A worker that
    dies leaves its attempt open, so a source its workers died on
    :data:`WORKER_DEATHS` times shows here with that count; a finished attempt clears it."""

    def __init__(self) -> None:
        self.open: Counter[tuple[str, str, int]] = Counter()
        self.deaths: Counter[tuple[str, str, int]] = Counter()  # model stages' clips

    def begin(self, keys: list[tuple[str, str, int]]) -> int:
        """Note attempts at ``keys``; the most attempts now open at any of them."""
        self.open.update(keys)
        return max((self.open[k] for k in keys), default=0)

    def again(self, keys: list[tuple[str, str, int]]) -> list[int]:
        """Note one attempt at each of ``keys`` (a model stage's clips); an attempt still
        open from before died. The deaths at each key, in order."""
        for key in keys:
            if self.open[key]:
                self.deaths[key] += 1
            self.open[key] = 1
        return [self.deaths[k] for k in keys]

    def end(self, keys: list[tuple[str, str, int]]) -> None:
        for key in keys:
            self.open.pop(key, None)
            self.deaths.pop(key, None)

    def pause(self, keys: list[tuple[str, str, int]]) -> None:
        """Close the attempts at ``keys``, keeping the deaths counted at them."""
        for key in keys:
            self.open.pop(key, None)

    def died(self, times: int) -> dict[str, str]:
        """Source -> step for the sources more than ``times`` attempts were made at (and
        ``times`` died), or one of whose clips ``times`` model-stage workers died on."""
        deaths = {src: step for (step, src, _), n in self.deaths.items() if n >= times}
        return deaths | {src: step for (step, src, _), n in self.open.items() if n > times}

    def clear(self) -> None:
        self.open.clear()
        self.deaths.clear()


def _attempt_keys(step: str, batch: Batch) -> list[tuple[str, str, int]]:
    starts = batch.get("range_start_frame")
    keys = []
    for i, source in enumerate(batch["source"]):
        start = starts[i] if starts is not None else None
        keys.append((step, str(source), -1 if start is None or start != start else int(start)))
    return keys


def _guarded(fn: Callable[[Batch], Any], step: str, in_flight: Any) -> Callable[[Batch], Any]:
    """``fn`` with each call's sources noted in the :class:`InFlight` actor ``in_flight``
    before it runs and cleared when it has returned (a streaming stage: when its last
    chunk is out). After :data:`WORKER_DEATHS` attempts that died, it raises
    :class:`WorkerDeaths` instead of running ``fn`` again."""

    def run(batch: Batch) -> Any:
        keys = _attempt_keys(step, batch)
        if _began(in_flight, keys) > WORKER_DEATHS:
            sources = sorted({k[1] for k in keys})
            raise WorkerDeaths(f"{WORKER_DEATHS} workers died in {step} reading {sources}")
        out = fn(batch)
        if isinstance(out, Iterator):
            return _ended(out, in_flight, keys)
        _ended_now(in_flight, keys)
        return out

    run.__name__ = run.__qualname__ = getattr(fn, "__name__", step)
    return run


def _clip_keys(step: str, batch: Batch) -> list[tuple[str, str, int] | None]:
    """Each row's attempt key in model stage ``step`` (None for a row with no clip,
    which the model stages pass on untouched: its ``clip_id`` is None, or NaN where a
    block of such rows only reached the stage as a column of nulls)."""
    ids = batch.get("clip_id")
    if ids is None:
        return [None] * len(batch["source"])
    return [
        (step, str(source), int(clip, 16)) if isinstance(clip, str) and clip else None
        for source, clip in zip(batch["source"], ids, strict=True)
    ]


def guarded_actor(cls: type, step: str, in_flight: Any) -> type:
    """Model stage ``cls`` (an actor class from :func:`stage_actor`) with each batch's
    clips noted in the :class:`InFlight` actor ``in_flight``. A batch that a worker died
    on (Ray Data retries it on a new one) runs one clip at a time, each noted alone, so
    the clip that kills the worker is found; the attempt after its :data:`WORKER_DEATHS`
    death raises :class:`WorkerDeaths`, and the build goes on without its source."""

    def call(self: Any, batch: Batch) -> Batch:
        keyed = _clip_keys(step, batch)
        keys = [k for k in keyed if k is not None]
        deaths = _again(in_flight, keys)
        if max(deaths, default=0) >= WORKER_DEATHS:
            dead = zip(keys, deaths, strict=True)
            sources = sorted({k[1] for k, n in dead if n >= WORKER_DEATHS})
            raise WorkerDeaths(f"{WORKER_DEATHS} workers died in {step} on clips of {sources}")
        if not any(deaths):
            out = cls.__call__(self, batch)
            _ended_now(in_flight, keys)
            return out
        _call(in_flight.pause, keys)  # a worker died on this batch: find the clip
        outs: list[dict[str, Any]] = []
        for i, key in enumerate(keyed):
            row = {name: values[i : i + 1] for name, values in batch.items()}
            if key is not None:
                _again(in_flight, [key])
            outs += batch_to_rows(cls.__call__(self, row))
            if key is not None:
                _call(in_flight.end, [key])
        return rows_to_batch(outs)

    return type(cls.__name__, (cls,), {"__call__": call})


def _again(in_flight: Any, keys: list[tuple[str, str, int]]) -> list[int]:
    """:meth:`InFlight.again`, or no deaths when the actor is out of reach."""
    if not keys:
        return []
    try:
        return list(ray.get(in_flight.again.remote(keys), timeout=60))
    except ray.exceptions.RayError:
        return [0] * len(keys)


def _call(method: Any, keys: list[tuple[str, str, int]]) -> None:
    """``method`` of the :class:`InFlight` actor on ``keys``, waited for: the next death
    must not count at a clip the attempt is done with."""
    with contextlib.suppress(ray.exceptions.RayError):
        ray.get(method.remote(keys), timeout=60)


def _ended(
    chunks: Iterator[Any], in_flight: Any, keys: list[tuple[str, str, int]]
) -> Iterator[Any]:
    yield from chunks
    _ended_now(in_flight, keys)


def _ended_now(in_flight: Any, keys: list[tuple[str, str, int]]) -> None:
    """Clear the attempts at ``keys``, not waiting for it (a lost call leaves an attempt
    open: one of :data:`WORKER_DEATHS` spent, nothing else)."""
    with contextlib.suppress(Exception):
        in_flight.end.remote(keys)


def _began(in_flight: Any, keys: list[tuple[str, str, int]]) -> int:
    """Note attempts at ``keys``: the most now open at one of them, or 0 when the
    :class:`InFlight` actor is out of reach (as it can be for a moment while a node
    goes down; an error raised here would fail the stream, and Ray retries a dying
    worker, not an error)."""
    try:
        return int(ray.get(in_flight.begin.remote(keys), timeout=60))
    except ray.exceptions.RayError:  # GetTimeoutError included
        return 0


def _enabled_actor_stages(cfg: BuildConfig) -> list[str]:
    enabled = {
        "aesthetic": bool(cfg.aesthetic.head or (cfg.dedup.enabled and cfg.aesthetic.embeddings)),
        "dedup": cfg.dedup.enabled,
        "caption": cfg.caption.enabled,
        "agreement": cfg.caption.enabled and cfg.agreement.enabled,
        "encode": True,
        "text_encode": cfg.text_encode.enabled,
    }
    return [stage for stage in ACTOR_STAGES if enabled[stage]]


class PlacementError(ValueError):
    """The cluster's nodes cannot hold a stage's minimum actor pool (or one CPU task)."""


def check_resources(cfg: BuildConfig, nodes: list[dict[str, float]]) -> None:
    """Fail fast, naming the stage, when the model actors' minimum pools plus one CPU
    task cannot be placed on the cluster's nodes: Ray would otherwise wait forever.

    ``nodes`` holds each alive node's resources (``{"CPU": 8, "GPU": 1, ...}``). An
    actor needs its CPUs and GPUs on *one* node, so the check packs every actor of
    every minimum pool (largest first, each onto the fullest node where it fits) and
    then one task of the CPU stages (and one split task with its share of a GPU, for
    TransNetV2 on a GPU) beside them, instead of comparing cluster totals: 4 actors of
    1.5 CPUs do not fit on three 2-CPU nodes although 6 >= 6. Dedup's pool is one
    actor. Skipped with ``ray.check_resources: false`` (clusters that add nodes on
    demand).
    """
    if not cfg.ray.check_resources:
        return
    demands: list[tuple[str, float, float]] = []
    for pool in actor_pools(cfg, sum(n.get("GPU", 0.0) for n in nodes)):
        demands += [(pool.label, pool.num_cpus, pool.num_gpus)] * pool.min_actors
    demands.sort(key=lambda d: (d[2], d[1]), reverse=True)
    actors = len(demands)
    # then one task at a time beside them: a task ends, so tasks need room one by one
    gpu_split = split_gpus(cfg) > 0
    tasks = ("probe", "score", "decide") if gpu_split else ("probe", "split", "score", "decide")
    task_cpus = max(getattr(cfg.ray, s).num_cpus for s in tasks)
    demands.append((f"a CPU task ({'/'.join(tasks)})", task_cpus, 0.0))
    if gpu_split:
        demands.append(("a split task (TransNetV2)", cfg.ray.split.num_cpus, split_gpus(cfg)))
    free = [[n.get("CPU", 0.0), n.get("GPU", 0.0)] for n in nodes]
    eps = 1e-9
    placed: dict[str, int] = {}
    for i, (stage, cpus, gpus) in enumerate(demands):
        fits = [f for f in free if f[0] + eps >= cpus and f[1] + eps >= gpus]
        if not fits:
            shape = ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in free) or "none"
            before = ", ".join(f"{k} x{v}" for k, v in placed.items()) or "nothing"
            raise PlacementError(
                f"the Ray cluster cannot place {stage} ({cpus:g} CPU, {gpus:g} GPU on one "
                f"node): after {before}, the nodes have {shape} free (nodes: "
                f"{', '.join(_node_shape(n) for n in nodes) or 'none'}). Lower "
                f"ray.<stage>.num_cpus / num_gpus / min_actors, or use larger nodes"
            )
        if i < actors:
            best = min(fits, key=lambda f: (f[1] - gpus, f[0] - cpus))  # the fullest that fits
            best[0] -= cpus
            best[1] -= gpus
            placed[stage] = placed.get(stage, 0) + 1


def check_devices(cfg: BuildConfig, cluster_gpus: float) -> None:
    """Fail fast, naming the field, when a model stage (or split's TransNetV2) is set to
    a CUDA device that its actors (tasks) will not have: Ray shows an actor only the
    GPUs it reserved for it (none when the stage's ``num_gpus`` is 0, or auto on a
    cluster without GPUs), each actor's first as ``cuda:0``. Without this, every actor
    of the stage dies starting up."""
    device = cfg.split.transnet_device
    if cfg.split.detector == "transnetv2" and device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        seen = math.ceil(split_gpus(cfg))
        if index >= seen:
            has = (
                f"each sees {seen} GPU(s), as cuda:0"
                if seen
                else "they get no GPU (ray.split.num_gpus is 0)"
            )
            raise PlacementError(
                f"config split.transnet_device is {device!r}, but split runs as Ray tasks "
                f"and {has}: set split.transnet_device to auto or cpu, or give each split "
                "task a share of a GPU (ray.split.num_gpus, e.g. 0.25)"
            )
    for stage, gpus in gpu_shares(cfg, cluster_gpus).items():
        device = str(getattr(getattr(cfg, stage), "device", "auto"))
        if not device.startswith("cuda"):
            continue
        index = int(device.partition(":")[2] or 0)
        if index < math.ceil(gpus):
            continue
        given = getattr(cfg.ray, stage).num_gpus
        if gpus <= 0:
            why = (
                f"ray.{stage}.num_gpus is {given:g}"
                if given is not None
                else f"ray.{stage}.num_gpus is auto and the cluster has no GPUs"
            )
            has = f"its actors get no GPU ({why})"
        else:
            seen = math.ceil(gpus)
            names = "cuda:0" if seen == 1 else f"cuda:0..cuda:{seen - 1}"
            has = f"each of its actors sees {seen} GPU(s), as {names}"
        raise PlacementError(
            f"config {stage}.device is {device!r}, but {has}: set {stage}.device "
            f"to auto, or give the stage GPUs (ray.{stage}.num_gpus)"
        )


def _node_shape(node: dict[str, float]) -> str:
    return f"{node.get('CPU', 0.0):g} CPU/{node.get('GPU', 0.0):g} GPU"


def cluster_nodes() -> list[dict[str, float]]:
    """Resources of each alive node of the connected Ray cluster."""
    return [
        {k: float(v) for k, v in n.get("Resources", {}).items()}
        for n in ray.nodes()
        if n.get("Alive")
    ]


@dataclass(frozen=True)
class Step:
    """One operator of the build graph, runnable on Ray or in this process.

    ``kind``: ``"task"`` (a stateless stage: a fresh ``fn(*args)`` per batch, as Ray
    tasks), ``"function"`` (``fn`` maps batches itself), ``"actors"`` (an autoscaling
    pool of ``fn(*args)`` holding a model) or ``"single"`` (exactly one actor: state
    shared by the whole build).
    """

    name: str
    kind: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    res: StageResources


def build_steps(cfg: BuildConfig, out: str | None = None) -> list[Step]:
    """The graph's operators in order (see the module doc for their cardinality).

    ``out`` is the corpus root, which seeds the near-duplicate index on resume.
    """
    r = cfg.ray
    steps = [Step("probe", "task", Probe, (cfg.probe,), r.probe)]
    if r.straggler_range_frames > 0:
        ranges = functools.partial(
            expand_ranges, split_cfg=cfg.split, range_frames=r.straggler_range_frames
        )
        steps.append(Step("ranges", "function", ranges, (), replace(r.probe, batch_size=1)))
    steps += [
        Step("split", "task", Split, (cfg.split,), r.split),
        Step("score", "task", Score, (cfg.score,), r.score),
    ]
    if cfg.aesthetic.head or (cfg.dedup.enabled and cfg.aesthetic.embeddings):
        steps.append(Step("aesthetic", "actors", AestheticScorer, (cfg.aesthetic,), r.aesthetic))
    steps.append(Step("decide", "task", Decide, (cfg.decide,), r.decide))
    if cfg.dedup.enabled:
        steps.append(Step("dedup", "single", Dedup, (cfg.dedup, out), r.dedup))
    if cfg.caption.enabled:
        steps.append(Step("caption", "actors", Captioner, (cfg.caption,), r.caption))
        if cfg.agreement.enabled:
            steps += [
                Step("agreement", "actors", Agreement, (cfg.agreement,), r.agreement),
                Step("decide", "task", Decide, (cfg.decide,), r.decide),
            ]
    steps.append(Step("encode", "actors", Encode, (cfg.encode,), r.encode))
    if cfg.text_encode.enabled:
        steps.append(Step("text_encode", "actors", TextEncode, (cfg.text_encode,), r.text_encode))
    return steps


def stage_labels(steps: list[Step]) -> list[str]:
    """Display names of the steps, unique (a second ``decide`` is ``decide#2``)."""
    seen: dict[str, int] = {}
    labels = []
    for step in steps:
        seen[step.name] = seen.get(step.name, 0) + 1
        labels.append(step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}")
    return labels


def fuse_steps(cfg: BuildConfig, steps: list[Step], cluster_gpus: float) -> list[list[Step]]:
    """The steps as Ray Data operators, each a list of steps.

    With ``ray.fuse_cpu_models`` (the default), each run of two or more consecutive
    model stages whose actors get no GPU (:func:`gpu_shares`), with the stateless steps
    between them, is one operator: one actor pool whose actors hold all the run's
    models (:func:`pipeline.stages.base.fused_stages`). On two CPUs, six model actors
    starting at once (a process, Ray, torch and a model library each) cost more than a
    small build's own work. Dedup's single actor ends a run: its one global index does
    not share the fate of a model that a clip can crash. Every other step is an
    operator of its own.
    """
    shares = gpu_shares(cfg, cluster_gpus)
    ops: list[list[Step]] = []
    run: list[Step] = []

    def joins(step: Step) -> bool:
        if step.kind == "task":
            return bool(run) and not hasattr(step.fn, "stream")
        cpu_model = step.kind == "actors" and shares.get(step.name, 0.0) == 0
        return cfg.ray.fuse_cpu_models and cpu_model

    def end_run() -> None:
        tail: list[Step] = []
        while run and run[-1].kind == "task":
            tail.insert(0, run.pop())
        if len(run) - sum(step.kind == "task" for step in run) > 1:
            ops.append(list(run))
        else:
            ops.extend([step] for step in run)
        ops.extend([step] for step in tail)
        run.clear()

    for step in steps:
        if joins(step):
            run.append(step)
        else:
            end_run()
            ops.append([step])
    end_run()
    return ops


@dataclass(frozen=True)
class Pool:
    """The actor pool of one operator of model stages (one stage, or a fused run)."""

    label: str  # the stages' labels joined by "+"
    # what its model stages' actors would reserve together: an actor's torch runs on as
    # many threads (Ray sets OMP_NUM_THREADS from it), one model after another
    num_cpus: float
    num_gpus: float
    min_actors: int  # the most of any of its stages
    max_actors: int
    batch_size: int | None  # its first model stage's; each later one sees slices of its own


def actor_pools(
    cfg: BuildConfig, cluster_gpus: float, steps: list[Step] | None = None
) -> list[Pool]:
    """Every actor pool the build starts, dedup's single actor included, in graph order
    (of ``steps``, by default :func:`build_steps`)."""
    steps = steps if steps is not None else build_steps(cfg)
    labels = dict(zip(map(id, steps), stage_labels(steps), strict=True))
    shares = gpu_shares(cfg, cluster_gpus)
    pools = []
    for op in fuse_steps(cfg, steps, cluster_gpus):
        models = [step for step in op if step.kind in ("actors", "single")]
        if not models:
            continue
        single = op[0].kind == "single"
        pools.append(
            Pool(
                label="+".join(labels[id(step)] for step in op),
                num_cpus=round(sum(step.res.num_cpus for step in models), 4),
                num_gpus=sum(shares.get(step.name, 0.0) for step in models),
                min_actors=1 if single else max(step.res.min_actors for step in models),
                max_actors=1 if single else max(step.res.max_actors for step in models),
                batch_size=models[0].res.batch_size,
            )
        )
    return pools


def build_dataset(
    sources: list[str],
    cfg: BuildConfig,
    cluster_gpus: float = 0.0,
    out: str | None = None,
    meter: Meter | None = None,
    in_flight: Any = None,
    failed: dict[str, str] | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Data graph from source URIs to encoded rows (clip payloads dropped).

    ``out`` is the corpus root, which seeds the near-duplicate index on resume. With
    ``meter``, every stage reports each batch to it, named by :func:`stage_labels`.
    With ``in_flight`` (an :class:`InFlight` actor), the steps that read sources note
    their attempts there. ``failed`` maps sources to the reason each is an error row
    without being read (their workers died).
    """
    # one source per block, so a slow file never holds back others
    ds: ray.data.Dataset = ray.data.from_items(
        [{"source": s} for s in sources], override_num_blocks=max(1, len(sources))
    )
    steps = build_steps(cfg, out)
    labels = dict(zip(map(id, steps), stage_labels(steps), strict=True))
    pools = iter(actor_pools(cfg, cluster_gpus, steps))
    for op in fuse_steps(cfg, steps, cluster_gpus):
        step = op[0]
        if step.kind in ("task", "function"):
            args = (*step.args, failed or {}) if step.name == "probe" else step.args
            if step.kind == "task":
                fn = stage_task(step.fn, *args, name=labels[id(step)], meter=meter)
            else:
                fn = metered(step.fn, labels[id(step)], meter)
            if in_flight is not None and step.name in _READS_SOURCES:
                fn = _guarded(fn, step.name, in_flight)
            ds = ds.map_batches(fn, **_task_args(step.res))
            continue
        pool = next(pools)
        if len(op) > 1:
            members = [
                (labels[id(m)], m.fn, m.args, m.kind == "actors", m.res.batch_size) for m in op
            ]
            actor, args = fused_stages(members, meter), ()
        else:
            actor, args = stage_actor(step.fn, pool.label, meter), step.args
        if step.kind == "single":  # no GPU: the index is plain Python
            compute = ray.data.ActorPoolStrategy(size=1)
        else:
            if in_flight is not None:
                actor = guarded_actor(actor, pool.label, in_flight)
            compute = ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors)
        ds = ds.map_batches(
            actor,
            fn_constructor_args=args,
            batch_size=pool.batch_size,
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            compute=compute,
        )
    if cfg.write.clip_files:  # the writer stores kept clips' payloads as files
        return ds.map_batches(_kept_payloads_only, batch_size=None, num_cpus=0.1)
    # the payloads stay on the workers; the driver receives index rows and latents
    return ds.drop_columns(["clip_bytes"])


_READS_SOURCES = ("probe", "ranges", "split")  # the steps that parse sources' bytes


def _kept_payloads_only(batch: Batch) -> Batch:
    """The payloads of kept clips, None for the others: only those reach the driver."""
    payloads = np.empty(len(batch["clip_bytes"]), dtype=object)
    for i, (status, payload) in enumerate(zip(batch["status"], batch["clip_bytes"], strict=True)):
        payloads[i] = payload if status == "kept" else None
    return {**batch, "clip_bytes": payloads}


def run_in_process(sources: list[str], out: str, cfg: BuildConfig) -> dict[str, int]:
    """The same steps without Ray: one process, one source at a time (split's chunks
    one by one), each model loaded once. A reference for the Ray graph (same clips,
    same rows) and for debugging a stage; no resume, progress or summary. Returns the
    writer's commit counts."""
    fns = [
        s.fn(*s.args) if s.kind in ("task", "actors", "single") else s.fn
        for s in build_steps(cfg, out)
    ]
    writer = CorpusWriter(out, cfg.write, (config_hash(cfg), to_dict(cfg)))
    try:
        stitcher = RangeStitcher()
        for source in expand_sources(sources, exclude=out):
            for batch in _through(fns, {"source": np.array([source], dtype=object)}):
                if cfg.write.clip_files:
                    batch = _kept_payloads_only(batch)
                else:
                    batch.pop("clip_bytes", None)
                for whole in stitcher(batch):
                    writer.add(whole)
        counts = writer.close()
        writer.write_manifest(_manifest_extra(cfg))
    except BaseException:
        writer.abort()  # no partial shard left behind; committed sources stay
        raise
    finally:
        writer.unlock()
    return counts


def _through(fns: list[Any], batch: Batch) -> Iterator[Batch]:
    """``batch`` through the steps ``fns``; a streaming stage's chunks go on one by one,
    so a long source is never held whole (as on Ray)."""
    if not fns:
        yield batch
        return
    outs = fns[0].stream(batch) if hasattr(fns[0], "stream") else [fns[0](batch)]
    for out in outs:
        yield from _through(fns[1:], out)


def _operators_in_order(summary: Any) -> list[Any]:
    """Every operator's stats, sources first: a summary holds the last operator(s) and
    its inputs' summaries as ``parents``."""
    ops: list[Any] = []
    for parent in getattr(summary, "parents", None) or ():
        ops += _operators_in_order(parent)
    return ops + list(summary.operators_stats)


def stage_stats(
    ds: ray.data.Dataset, cfg: BuildConfig, cluster_gpus: float
) -> list[dict[str, Any]]:
    """Per Ray Data operator (fused stages share one): wall, CPU and reserved GPU seconds."""
    shares = gpu_shares(cfg, cluster_gpus)
    classes = {
        "AestheticScorer": "aesthetic",
        "Agreement": "agreement",
        "Captioner": "caption",
        "Encode": "encode",
        "TextEncode": "text_encode",
    }
    gpu_per_actor = {name: shares.get(stage, 0.0) for name, stage in classes.items()}
    out: list[dict[str, Any]] = []
    try:
        summary = ds._get_stats_summary()
    except Exception as e:  # stats are accounting, never a reason to fail a build
        log.warning("no Ray Data stats: %s", e)
        return out
    for op in _operators_in_order(summary):
        wall = float(op.wall_time.sum) if op.wall_time else 0.0
        cpu = float(op.cpu_time.sum) if op.cpu_time else 0.0
        gpus = next((g for name, g in gpu_per_actor.items() if name in op.operator_name), 0.0)
        rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
        out.append(
            {
                "operator": op.operator_name,
                "wall_s": round(wall, 3),
                "cpu_s": round(cpu, 3),
                "gpu_s": round(wall * gpus, 3),
                "rows_out": rows,
                "rows_per_s": round(rows / wall, 3) if wall > 0 else None,
            }
        )
    return out


class BuildState(StageMeter, InFlight):
    """The build's driver-side state as one actor (one worker process): the stage meter
    and the attempts in flight."""

    def __init__(self) -> None:
        StageMeter.__init__(self)
        InFlight.__init__(self)


def _start_meter() -> Any:
    """The build's :class:`BuildState` actor, on the driver's node (0 CPUs): it lives as
    long as the build."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(BuildState).options(num_cpus=0, scheduling_strategy=here).remote()


def _final_counts(meter: Any) -> StageCounts:
    """The meter's last snapshot (empty if it cannot be read); the meter is gone after."""
    try:
        return ray.get(meter.snapshot.remote(), timeout=30)
    except Exception as e:  # accounting, never a reason to fail a build
        log.warning("no per-stage counts: %s", e)
        return {}
    finally:
        ray.kill(meter)


def _per_stage(counts: StageCounts, order: list[str]) -> dict[str, Any]:
    """Each stage's final rows in/out, batches and busy seconds (summed over workers;
    exact per stage, where Ray Data's operator stats merge fused stages)."""
    out = {}
    for stage in stages_in_order(order, counts):
        if stage in counts:
            c = counts[stage]
            busy = float(c["busy_s"])
            out[stage] = {
                "rows_in": int(c["rows_in"]),
                "rows_out": int(c["rows_out"]),
                "batches": int(c["batches"]),
                "busy_s": round(busy, 3),
                "rows_per_busy_s": round(c["rows_out"] / busy, 3) if busy > 0 else None,
            }
    return out


@functools.lru_cache(maxsize=4)
def _describe_vae(vae: str, vae_class: str, subfolder: str | None) -> str:
    """The manifest's ``vae`` object as JSON; loading a VAE takes seconds, and a resumed
    build needs it twice (the compatibility check, the manifest)."""
    from model.vae import describe_pretrained

    return json.dumps(describe_pretrained(vae, vae_class=vae_class, subfolder=subfolder))


@functools.lru_cache(maxsize=4)
def _describe_text_encoder(
    model: str, max_length: int, subfolder: str | None, tokenizer_subfolder: str | None
) -> str:
    """The manifest's ``text_encoder`` object as JSON (from the encoder's config alone)."""
    from model.text import describe_text_encoder

    return json.dumps(
        describe_text_encoder(
            model,
            max_length=max_length,
            subfolder=subfolder,
            tokenizer_subfolder=tokenizer_subfolder,
        )
    )


_DESCRIBING = threading.Lock()  # one description at a time: a second caller gets the cache


def _manifest_extra(cfg: BuildConfig) -> dict[str, Any]:
    """The manifest's entries besides the writer's own: the VAE and text encoder that
    made the samples (:func:`_describe_vae` loads the VAE to describe it), the config."""
    with _DESCRIBING:
        return _describe_models(cfg)


def _prepare_manifest(cfg: BuildConfig) -> None:
    """Describe the build's models on a background thread while the build runs, so
    that the commit after the last sample does not wait for diffusers' import and a
    VAE's load (seconds; a driver is mostly idle meanwhile). A failure here is left to
    the commit, which describes them again and reports it."""

    def describe() -> None:
        with contextlib.suppress(Exception):
            _manifest_extra(cfg)

    # not a daemon: an exit waits for it rather than stopping it inside an import
    threading.Thread(target=describe, name="reelpack-describe-models").start()


def _describe_models(cfg: BuildConfig) -> dict[str, Any]:
    vae = json.loads(_describe_vae(cfg.encode.vae, cfg.encode.vae_class, cfg.encode.vae_subfolder))
    text = cfg.text_encode
    return {
        "vae": vae,
        "patch_size": list(cfg.encode.patch_size),
        # what the samples' text_embeds come from: the trainer sizes the DiT's
        # cross-attention by its dim, the sampler encodes prompts with it
        "text_encoder": json.loads(
            _describe_text_encoder(
                text.model, text.max_length, text.subfolder, text.tokenizer_subfolder
            )
        )
        if text.enabled
        else None,
        "captioner": {"id": cfg.caption.model} if cfg.caption.enabled else None,
        "random_weights": cfg.preset == "tiny",
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
    }


def _commit(
    writer: CorpusWriter, cfg: BuildConfig, drop_incomplete: bool = False
) -> dict[str, int]:
    """Commit every complete source and write the manifest; this run's counts."""
    counts = writer.close(drop_incomplete=drop_incomplete)
    writer.write_manifest(_manifest_extra(cfg))
    return counts


def _write_summary(out: str, summary: dict[str, Any]) -> None:
    blob = json.dumps(summary, indent=2, sort_keys=True).encode()
    st = storage_for(out)
    st.write(join(out, "runs", f"{summary['run_id']}.json"), blob)
    st.write(join(out, "summary.json"), blob)


class _Stop(BaseException):
    """The build loop was asked to stop (SIGINT or SIGTERM); the signal's name. Like
    KeyboardInterrupt, not an ``Exception``: no handler for errors (Ray Data's
    included) mistakes it for one."""


class _StopSignals:
    """SIGINT and SIGTERM (Ctrl-C, ``ray job stop``, a pod's termination) ask the build
    to stop at the next safe point, never in the middle of a write: the build then
    commits every complete source and returns. A second SIGINT stops at once
    (KeyboardInterrupt; a resume cleans up). Installed only in the main thread, where
    Python runs signal handlers."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.writing = False  # inside the writer: defer the stop to check()
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if not self.writing:
            raise _Stop(self.requested)

    def check(self) -> None:
        if self.requested is not None:
            raise _Stop(self.requested)


def _check_root(out: str) -> None:
    """Fail before any work when ``out`` cannot be a corpus root (not at the first commit)."""
    root = schemas.storage_location(out)  # gs://, https://, ...: no local folder named after it
    if is_s3(root):
        return
    path = Path(root)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker == path:
        raise NotADirectoryError(
            f"--out {out}: a file; the corpus root is a folder or s3:// prefix"
        )
    if blocker is not None:
        raise NotADirectoryError(
            f"--out {out}: {blocker} is a file; the corpus root is a folder or s3:// prefix"
        )


def build(
    source_args: list[str],
    out: str,
    cfg: BuildConfig,
    echo: Callable[[str], None] = print,
    retry_errors: bool = False,
) -> dict[str, Any]:
    """Build (or resume) a corpus at ``out`` from files, folders or ``s3://`` prefixes.

    A resume skips every source already committed, error rows included: a file that
    cannot be read stays an error. ``retry_errors`` builds the sources listed whose
    committed rows are an error again (a storage outage, a source replaced while it was
    read, a file repaired since); their new rows supersede the error.

    Returns this run's summary (also written to ``<out>/summary.json`` and
    ``<out>/runs/<run_id>.json``): counts by status and reason, per-stage time,
    throughput, config hash. SIGINT or SIGTERM stops the build early: every complete
    source is committed, ``summary["interrupted"]`` names the signal, and running the
    same build again resumes.
    """
    validate(cfg)
    _check_root(out)
    t0 = time.time()
    skipped: Counter[str] = Counter()
    try:
        sources = expand_sources(source_args, exclude=out, skipped=skipped)
        if not sources:  # a wrong path or prefix: fail before the corpus root is written
            raise NoSources(source_args, skipped)
        changed = _check_resume(out, cfg)
        # takes the corpus lock: one writer per corpus
        writer = CorpusWriter(out, cfg.write, (config_hash(cfg), to_dict(cfg)))
    except (FileNotFoundError, NotADirectoryError):
        raise  # a missing source, a root under a file: named as they are
    except OSError as e:  # storage unreachable or refusing: no source was built
        raise BuildNotStarted(str(e)) from e
    try:
        if changed:
            shown = ", ".join(changed[:6]) + (
                f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            )
            hint = (
                "; `reelpack refilter` re-decides them with new thresholds"
                if any(k.startswith(("decide.", "dedup.")) for k in changed)
                else ""
            )
            echo(
                f"note: {out} was built with other settings for {shown}; they apply to the "
                f"sources this run builds, committed sources keep what their run made{hint}"
            )
        note = describe_skipped(skipped)
        if note:
            echo(f"note: {note}")
        errored = writer.errored_sources() & set(sources)
        if errored and retry_errors:
            writer.redo(errored)
            echo(f"note: retrying {len(errored)} sources that earlier runs left as errors")
        elif errored:
            echo(
                f"note: {len(errored)} sources are errors from earlier runs and stay so; "
                "--retry-errors builds them again"
            )
        return _build(sources, out, cfg, echo, writer, t0, skipped)
    except BaseException:
        writer.abort()  # e.g. no space left: no partial shard left behind
        raise
    finally:
        writer.unlock()


class BuildNotStarted(OSError):
    """A storage failure (listing the sources, reading the corpus root, taking its lock)
    before any source was built: nothing was written."""


def _check_resume(out: str, cfg: BuildConfig) -> list[str]:
    """Raise CorpusMismatch when ``out`` holds another VAE's latents (pipeline.compat);
    the config keys that differ from the ones it was built with."""
    manifest = read_manifest(out)
    if manifest is None:
        return []
    return check_resume(out, manifest, _manifest_extra(cfg))


def _died(in_flight: Any, failed: dict[str, str]) -> dict[str, str]:
    """The sources (not yet in ``failed``) whose workers died :data:`WORKER_DEATHS`
    times, with the reason their error rows give."""
    died = ray.get(in_flight.died.remote(WORKER_DEATHS))
    return {
        source: (
            f"the worker reading it died {WORKER_DEATHS} times in {step} (a crash in "
            "the decoder, or out of memory): left out"
            if step in _READS_SOURCES
            else f"the worker running {step} died {WORKER_DEATHS} times on one of its "
            "clips (a crash in the model, or out of memory): left out"
        )
        for source, step in sorted(died.items())
        if source not in failed
    }


def _write_stream(
    ds: ray.data.Dataset, writer: CorpusWriter, progress: BuildProgress
) -> tuple[RangeStitcher, Iterator[Any], str | None]:
    """Every batch of ``ds``, its ranges stitched, into ``writer``: (the stitcher, the
    batch iterator, and the signal that stopped the stream early or None)."""
    stitcher = RangeStitcher()
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        with _StopSignals() as stop:
            for batch in batches:
                stop.writing = True
                progress.observe(batch)
                for whole in stitcher(batch):
                    writer.add(whole)
                    progress.update(whole)
                stop.writing = False
                stop.check()
    except _Stop as e:
        return stitcher, batches, str(e)
    except Exception:
        _close(batches)
        raise
    return stitcher, batches, None


def _close(batches: Iterator[Any]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()  # stops Ray Data's executor


def _build_passes(
    todo: list[str],
    cfg: BuildConfig,
    cluster_gpus: float,
    out: str,
    state: Any,
    writer: CorpusWriter,
    progress: BuildProgress,
    echo: Callable[[str], None],
) -> tuple[ray.data.Dataset, RangeStitcher, Iterator[Any], str | None]:
    """Stream the sources ``todo`` into ``writer``: (the last dataset, its stitcher and
    batch iterator, the signal that stopped it early or None). Where workers kept dying
    on a source (:data:`WORKER_DEATHS`), the stream fails: the complete sources are
    committed and the rest streamed again, that source an error row that says so.
    ``state`` is the build's :class:`BuildState` actor."""
    meter, in_flight = RemoteMeter(state), state
    failed: dict[str, str] = {}  # sources whose workers died: error rows, not read again
    while True:
        ds = build_dataset(
            todo, cfg, cluster_gpus, out=out, meter=meter, in_flight=in_flight, failed=failed
        )
        try:
            stitcher, batches, interrupted = _write_stream(ds, writer, progress)
        except Exception:
            died = _died(in_flight, failed)
            if not died:
                raise
            _commit(writer, cfg, drop_incomplete=True)
            for source, reason in died.items():
                echo(f"{source}: {reason}")
            failed.update(died)
            todo = [s for s in todo if s not in writer.done_sources()]
            ray.get(in_flight.clear.remote())
            continue
        return ds, stitcher, batches, interrupted


def _build(
    sources: list[str],
    out: str,
    cfg: BuildConfig,
    echo: Callable[[str], None],
    writer: CorpusWriter,
    t0: float,
    skipped: Counter[str],
) -> dict[str, Any]:
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t0)) + "-" + uuid.uuid4().hex[:6]
    done = writer.done_sources()
    todo = [s for s in sources if s not in done]
    echo(
        f"sources: {len(sources)} found, {len(sources) - len(todo)} already done, {len(todo)} to build"
    )
    progress = BuildProgress(
        len(todo),
        interval_s=cfg.ray.progress_interval_s,
        stages=stage_labels(build_steps(cfg, out)),
    )
    stages: list[dict[str, Any]] = []
    per_stage: dict[str, Any] = {}
    interrupted: str | None = None
    run_counts: dict[str, int] | None = None
    if todo:
        check_models(cfg)  # before Ray starts: a missing model fails here, not in an actor
        init_ray(cfg)
        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0.0))
        check_resources(cfg, cluster_nodes())
        check_devices(cfg, cluster_gpus)
        _prepare_manifest(cfg)
        meter = _start_meter()
        progress.poll = lambda: ray.get(meter.snapshot.remote(), timeout=10)
        progress.start()
        try:
            ds, stitcher, batches, interrupted = _build_passes(
                todo, cfg, cluster_gpus, out, meter, writer, progress, echo
            )
            if interrupted is not None:
                # Commit the complete sources first (the others are built by the next
                # run): `ray job stop` sends SIGKILL a few seconds after SIGTERM.
                run_counts = _commit(writer, cfg, drop_incomplete=True)
        finally:
            progress.stop()
        if interrupted is None:
            if stitcher.unfinished():
                raise RuntimeError(f"ranges missing for sources: {stitcher.unfinished()}")
            stages = stage_stats(ds, cfg, cluster_gpus)
        else:
            _close(batches)
        final = _final_counts(meter)
        progress.poll = lambda: final  # the closing line reads these, not the dead actor
        per_stage = _per_stage(final, progress.stages)
    if run_counts is None:
        run_counts = _commit(writer, cfg)
    wall = time.time() - t0
    counts = progress.counts()
    summary = {
        "run_id": run_id,
        "sources_total": len(sources),
        "sources_built": len(todo),
        # not media, by extension; links to files listed under another path (LINK_KEY)
        "files_skipped": dict(sorted(skipped.items())),
        **counts,
        "committed": run_counts,
        "stages": stages,
        "per_stage": per_stage,
        "wall_s": round(wall, 2),
        "clips_per_s": round(sum(counts["clips_by_status"].values()) / wall, 3)
        if wall > 0
        else None,
        "config_hash": config_hash(cfg),
        "interrupted": interrupted,
    }
    if todo:
        echo(progress.line())
        stage_line = progress.stage_line() if per_stage else None
        if stage_line is not None:
            echo(stage_line)
    if interrupted is not None:
        echo(
            f"interrupted ({interrupted}): {run_counts['sources']} sources committed this run, "
            f"{len(todo) - run_counts['sources']} not; run the same command again to resume"
        )
    _write_summary(out, summary)
    return summary
