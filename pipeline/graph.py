"""The corpus build on Ray Data: the only module in ``pipeline`` that knows Ray.

Streaming graph (cardinality per step)::

    sources                     one row per source URI not yet committed (resume)
      probe     task   1:1      container facts, limits; errors become values
      split     task   1:N      decode once, detect shots, clip payloads
      score     task   1:1      cheap quality signals
      aesthetic actors 1:1      CLIP + aesthetic head (only when a head is configured)
      decide    task   1:1      thresholds -> kept / rejected + reasons
      caption   actors 1:1      VLM recaption of kept clips
      encode    actors 1:1      VAE latents of kept clips
      write     driver N:shards webdataset shards + parquet parts, exactly once

Nothing is materialised whole: the driver pulls batches as they finish and the
writer commits a shard only with the index rows of complete sources.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray

from pipeline.config import BuildConfig, config_hash, to_dict
from pipeline.sources import expand_sources
from pipeline.stages.aesthetic import AestheticScorer
from pipeline.stages.base import Batch
from pipeline.stages.caption import Captioner
from pipeline.stages.decide import Decide
from pipeline.stages.encode import Encode
from pipeline.stages.probe import Probe
from pipeline.stages.score import Score
from pipeline.stages.split import Split
from pipeline.writer import CorpusWriter

__all__ = ["build", "build_dataset", "init_ray", "worker_env"]

log = logging.getLogger(__name__)

# Environment variables handed to every Ray worker (S3 settings, model cache).
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "REELPACK_CACHE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
)


def worker_env() -> dict[str, str]:
    """The driver's S3 / cache settings, for the runtime env of Ray workers."""
    return {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}


def init_ray(cfg: BuildConfig) -> None:
    """Join the configured cluster, or start a local Ray, once per process."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": worker_env()},
        "log_to_driver": False,
        "include_dashboard": False,
    }
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
    else:
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            object_store_memory=cfg.ray.object_store_memory,
            **kwargs,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _task(
    stage_cls: Callable[[Any], Callable[[Batch], Batch]], stage_cfg: Any
) -> Callable[[Batch], Batch]:
    """A cheap stage as a plain function for Ray tasks (its constructor holds no model)."""

    def run(batch: Batch) -> Batch:
        return stage_cls(stage_cfg)(batch)

    run.__name__ = getattr(stage_cls, "__name__", "stage")
    return run


def build_dataset(sources: list[str], cfg: BuildConfig) -> ray.data.Dataset:
    """The lazy Ray Data graph from source URIs to encoded rows (clip payloads dropped)."""
    r = cfg.ray
    ds: ray.data.Dataset = ray.data.from_items(
        [{"source": s} for s in sources], override_num_blocks=max(1, len(sources))
    )
    # 1:1 probe, one source per task so a slow file never holds back others
    ds = ds.map_batches(_task(Probe, cfg.probe), batch_size=1)
    # 1:N split: one source in, its clips out (decode once)
    ds = ds.map_batches(_task(Split, cfg.split), batch_size=1)
    # 1:1 cheap signals
    ds = ds.map_batches(_task(Score, cfg.score), batch_size=r.cpu_stage_batch_size)
    # 1:1 CLIP aesthetic, actor pool (only with a configured head: no head, no score)
    if cfg.aesthetic.head:
        ds = ds.map_batches(
            AestheticScorer,
            fn_constructor_args=(cfg.aesthetic,),
            batch_size=cfg.aesthetic.batch_size,
            num_gpus=cfg.aesthetic.num_gpus,
            num_cpus=r.actor_num_cpus,
            compute=ray.data.ActorPoolStrategy(size=cfg.aesthetic.concurrency),
        )
    # 1:1 thresholds -> status + reasons
    ds = ds.map_batches(_task(Decide, cfg.decide), batch_size=r.cpu_stage_batch_size)
    # 1:1 recaption kept clips, actor pool
    if cfg.caption.enabled:
        ds = ds.map_batches(
            Captioner,
            fn_constructor_args=(cfg.caption,),
            batch_size=cfg.caption.batch_size,
            num_gpus=cfg.caption.num_gpus,
            num_cpus=r.actor_num_cpus,
            compute=ray.data.ActorPoolStrategy(size=cfg.caption.concurrency),
        )
    # 1:1 latents of kept clips, actor pool
    ds = ds.map_batches(
        Encode,
        fn_constructor_args=(cfg.encode,),
        batch_size=cfg.encode.batch_size,
        num_gpus=cfg.encode.num_gpus,
        num_cpus=r.actor_num_cpus,
        compute=ray.data.ActorPoolStrategy(size=cfg.encode.concurrency),
    )
    return ds.drop_columns(["clip_bytes"])


def _manifest_extra(cfg: BuildConfig) -> dict[str, Any]:
    from model.vae import describe_pretrained

    vae = describe_pretrained(
        cfg.encode.vae, vae_class=cfg.encode.vae_class, subfolder=cfg.encode.vae_subfolder
    )
    random_weights = cfg.preset == "tiny"
    return {
        "vae": vae,
        "patch_size": list(cfg.encode.patch_size),
        "text_encoder": None,
        "captioner": {"id": cfg.caption.model} if cfg.caption.enabled else None,
        "random_weights": random_weights,
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
    }


def build(
    source_args: list[str],
    out: str,
    cfg: BuildConfig,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build (or resume) a corpus at ``out`` from files, folders or ``s3://`` prefixes.

    Returns this run's summary: counts by status and reason, shards, tokens, time.
    """
    t0 = time.time()
    sources = expand_sources(source_args)
    writer = CorpusWriter(out, cfg.write)
    done = writer.done_sources()
    todo = [s for s in sources if s not in done]
    echo(
        f"sources: {len(sources)} found, {len(sources) - len(todo)} already done, {len(todo)} to build"
    )
    by_status: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    if todo:
        init_ray(cfg)
        ds = build_dataset(todo, cfg)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            writer.add(batch)
            for cid, status, reasons in zip(
                batch["clip_id"], batch["status"], batch["reasons"], strict=False
            ):
                if cid is None:
                    continue
                by_status[str(status)] += 1
                for reason in reasons if reasons is not None else ():
                    by_reason[str(reason)] += 1
    run_counts = writer.close()
    writer.write_manifest(_manifest_extra(cfg))
    summary = {
        "sources_total": len(sources),
        "sources_built": len(todo),
        "clips_by_status": dict(by_status),
        "rejected_by_reason": dict(by_reason),
        "run": run_counts,
        "wall_s": round(time.time() - t0, 2),
        "config_hash": config_hash(cfg),
    }
    return summary


def with_overrides(cfg: BuildConfig, **ray_overrides: Any) -> BuildConfig:
    """``cfg`` with fields of its Ray section replaced (CLI flags)."""
    return replace(cfg, ray=replace(cfg.ray, **ray_overrides))
