"""Estimate a build before running it: clips, latent tokens, storage and time per stage.

``reelpack plan SOURCE...`` probes a sample of the sources with the build's own
:class:`~pipeline.stages.probe.Probe` (container header + first frame, nothing else
is decoded), then models every probed source with the build's own rules:

- **clips**: the source is assumed cut into shots of ``mean_shot_s`` (a rate below;
  real shot lengths are only known after detection), and each shot is cut into
  clips by :func:`pipeline.stages.split.clip_spans`, the rule split applies;
- **latent tokens**: each clip is resampled to ``encode.target_fps``, capped at
  ``encode.max_frames`` and cut to the VAE's 1 + k*step frame rule; its working
  resolution (``split.work_max_area``) is fitted to ``encode.pixel_budget`` with
  :func:`model.vae.native_size`, as encode does; the latent grid follows from the
  VAE's spatial / temporal factors and the DiT patch size;
- **storage**: bf16 latents (2 bytes x channels per latent cell) of kept clips plus
  a per-sample overhead in the shards, plus an index row per clip;
- **time**: each stage's work (source frames x megapixels, clips, tokens...) times a
  rate from :class:`PlanRates`. CPU stages share ``workers`` CPU slots; model stages
  share ``gpus`` GPUs (or, with none, run on the CPUs ``cpu_per_gpu_s`` times slower).
  Every model actor first pays ``actor_start_s`` (its process, Ray Data, torch) and
  ``model_load_s`` per model it holds (the model's library and weights): a fixed cost
  that matters for small builds only. Without GPUs, consecutive model stages share
  one pool (:func:`pipeline.graph.fuse_steps`), so its actors start once. Each CPU
  slot's worker process and each single-process actor (the dedup index, the build's
  progress meter) pays ``worker_start_s`` once (Python, Ray, Ray Data and the stage's
  modules).
  Stages stream, so the build's wall time is estimated as the busiest resource pool:
  ``max(cpu work / workers, gpu work / gpus, driver write time)``.

The rates are rough defaults, documented beside each field; they are meant to be
replaced by measured ones (``plan:`` section of the config file or ``--rate
NAME=VALUE``). Sample estimates are scaled up to all sources.

    python -m reelpack.cli plan ~/videos --preset default --workers 64 --gpus 8
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig, from_dict, load_config, merge_layers, parse_overrides
from pipeline.hdr import HDR_TRANSFER_NAMES
from pipeline.progress import cause_lines, error_reason
from pipeline.stages.decide import DEFAULT_THRESHOLDS
from pipeline.stages.probe import Probe
from pipeline.stages.split import clip_spans
from pipeline.video import even_size, resample_indices
from schemas.yamltext import read_config_file

__all__ = [
    "RATE_PRESETS",
    "VAE_FACTORS",
    "Plan",
    "PlanRates",
    "SourceEstimate",
    "StageEstimate",
    "VaeFactors",
    "clip_latent_shape",
    "estimate_source",
    "format_plan",
    "load_plan_config",
    "make_plan",
    "parse_rates",
    "vae_factors",
]


@dataclass(frozen=True)
class PlanRates:
    """Assumptions and per-stage costs. Rough defaults for the ``default`` preset's
    models on a current data-centre GPU and x86 cores; measure and override."""

    mean_shot_s: float = 5.0  # average shot length in edited footage (split's input)
    keep_fraction: float = 0.7  # share of clips that pass decide's thresholds
    probe_cpu_s_per_source: float = 0.2  # open the container, decode one frame (S3: more)
    # split: H.264 software decode + detection downscale per source megapixel-frame
    # (~250 fps of 1080p per core), then resize + x264 "ultrafast" of the payload at the
    # working resolution and the VAE's frame rate
    split_cpu_s_per_source_mpx_frame: float = 0.002
    split_cpu_s_per_work_mpx_frame: float = 0.015
    # on top, per source megapixel-frame of interlaced video: bwdif, and FFmpeg's
    # fieldmatch before it on film in interlaced video (one core: ~2 and ~15 ms more
    # per 1920x1080 frame)
    deinterlace_cpu_s_per_mpx_frame: float = 0.001
    field_match_cpu_s_per_mpx_frame: float = 0.007
    # the transnetv2 detector (split.detector): its CNN over every source frame, on one
    # core (measured: 25 ms a frame), or on a GPU share (ray.split.num_gpus: one
    # 100-frame window per call, latency-bound)
    transnet_cpu_s_per_frame: float = 0.025
    transnet_gpu_s_per_frame: float = 0.0005
    score_cpu_s_per_clip: float = 0.05  # decode a few payload frames + OpenCV reductions
    decide_cpu_s_per_clip: float = 0.0001
    dedup_cpu_s_per_clip: float = 0.001  # one index lookup and insert
    aesthetic_gpu_s_per_clip: float = 0.02  # CLIP ViT-L/14 on a few frames, batched
    caption_gpu_s_per_clip: float = 1.5  # ~8B VLM, ~100 new tokens, batched, bf16
    agreement_gpu_s_per_clip: float = 0.01  # CLIP on the caption and a few frames
    # Wan 2.1 VAE: 81 frames of 480x832 (32 megapixel-frames) in ~2.5 s on an H100
    encode_gpu_s_per_mpx_frame: float = 0.08
    text_encode_gpu_s_per_clip: float = 0.02  # umt5-xxl encoder on one caption, batched
    # start one model actor (its process, Ray Data and torch imports), then per model
    # it holds: import the model's library and load its weights onto the device; paid by
    # every actor of a pool (its min_actors at the start), once per build
    actor_start_s: float = 10.0
    model_load_s: float = 30.0
    # start one worker process for CPU tasks, or an actor without a model: Python, Ray,
    # Ray Data and the stage's modules
    worker_start_s: float = 4.0
    cpu_per_gpu_s: float = 100.0  # CPU-core seconds per GPU second when gpus == 0
    write_bytes_per_s: float = 100e6  # driver -> storage (local disk or S3 multipart)
    sample_overhead_bytes: int = 4096  # tar headers + JSON metadata + caption per sample
    index_bytes_per_clip: int = 600  # compressed parquet row, all clips


# The tiny preset's random-weight models are small enough that their "GPU" work runs
# on a CPU at about the listed cost; measured on 2 cores (benchmarks/pipeline_bench.py).
RATE_PRESETS: dict[str, PlanRates] = {
    "default": PlanRates(),
    "tiny": PlanRates(
        aesthetic_gpu_s_per_clip=0.02,
        caption_gpu_s_per_clip=0.15,
        agreement_gpu_s_per_clip=0.002,
        encode_gpu_s_per_mpx_frame=0.5,
        text_encode_gpu_s_per_clip=0.001,
        actor_start_s=3.0,  # a worker process, Ray Data and torch on 2 busy cores
        model_load_s=2.0,  # mostly imports: open_clip / diffusers / transformers
        worker_start_s=3.5,  # measured on 2 busy cores
        cpu_per_gpu_s=1.0,
    ),
}


@dataclass(frozen=True)
class VaeFactors:
    spatial: int  # pixels per latent cell per side
    temporal: int  # frames per latent frame after the first
    channels: int


# Published compression of each supported diffusers VAE class (the real checkpoints).
VAE_FACTORS: dict[str, VaeFactors] = {
    "AutoencoderKLWan": VaeFactors(8, 4, 16),  # Wan 2.1 (Wan 2.2's 48-ch VAE: see below)
    "AutoencoderKLCogVideoX": VaeFactors(8, 4, 16),
    "AutoencoderKLHunyuanVideo": VaeFactors(8, 4, 16),
    "AutoencoderKLLTXVideo": VaeFactors(32, 8, 128),
}


def vae_factors(cfg: BuildConfig) -> VaeFactors:
    """The encode VAE's factors without loading it: from its ``config.json`` when it is a
    local Wan folder (tiny models, Wan 2.2), else the class's published factors."""
    enc = cfg.encode
    base = VAE_FACTORS.get(enc.vae_class)
    if base is None:
        raise ValueError(f"plan: unknown vae_class {enc.vae_class!r}; known {sorted(VAE_FACTORS)}")
    folder = Path(enc.vae) / (enc.vae_subfolder or "")
    config_file = folder / "config.json"
    if enc.vae_class == "AutoencoderKLWan" and config_file.is_file():
        c = json.loads(config_file.read_text())
        # same derivation as model.vae for a loaded Wan VAE
        patch = int(c.get("patch_size") or 1)
        spatial = 2 ** (len(c.get("dim_mult", [1, 2, 4, 4])) - 1) * patch
        temporal = 2 ** sum(bool(f) for f in c.get("temperal_downsample", [False, True, True]))
        return VaeFactors(spatial, temporal, int(c.get("z_dim", base.channels)))
    return base


def clip_latent_shape(
    num_frames: int, fps: float, work_size: tuple[int, int], cfg: BuildConfig, vae: VaeFactors
) -> tuple[tuple[int, int, int, int], tuple[int, int, int]]:
    """Latent ``(C, T, H, W)`` and encoder input ``(frames, width, height)`` of a clip of
    ``num_frames`` source frames at ``fps`` whose payload is ``work_size`` (W, H), by the
    rules of :mod:`pipeline.stages.encode`."""
    from model.vae import native_size

    enc = cfg.encode
    frames = min(len(resample_indices(num_frames, fps, enc.target_fps)), enc.max_frames)
    frames = 1 + (frames - 1) // vae.temporal * vae.temporal
    w, h = work_size
    multiple = vae.spatial * max(enc.patch_size[1], enc.patch_size[2])
    budget = min(enc.pixel_budget, max(w * h, multiple * multiple))
    width, height = native_size(w, h, budget, multiple)
    t = 1 + (frames - 1) // vae.temporal
    return (vae.channels, t, height // vae.spatial, width // vae.spatial), (frames, width, height)


@dataclass
class SourceEstimate:
    """What one probed source is expected to produce and cost."""

    source: str
    status: str  # "done" (probed fine) or "error"
    error: str | None = None
    duration_s: float = 0.0
    fps: float = 0.0
    width: int = 0
    height: int = 0
    clips: int = 0
    clip_s: float = 0.0  # total clip seconds
    tokens_per_clip: list[int] = field(default_factory=list)
    latent_bytes_per_clip: list[int] = field(default_factory=list)
    source_frames: int = 0  # frames split decodes (and TransNetV2 sees)
    source_mpx_frames: float = 0.0  # decode work of split
    work_mpx_frames: float = 0.0  # payload encode work of split
    deinterlace_cpu_s: float = 0.0  # split's deinterlacing (bwdif, field matching)
    encode_mpx_frames: list[float] = field(default_factory=list)  # VAE work per clip
    traits: list[str] = field(default_factory=list)  # TRAITS the source has


# source facts that change how split handles a source, as the plan names them
TRAITS = {
    "interlaced": "interlaced (deinterlaced)",
    "pulldown": "film in interlaced video (fields matched)",
    "hdr": "HDR (tone-mapped to SDR)",
    "vfr": "variable frame rate",
    "rotated": "rotated",
    "image": "still images",
}


def _traits(facts: dict[str, Any]) -> list[str]:
    found = {
        "interlaced": facts.get("src_interlaced") is True,
        "pulldown": facts.get("src_pulldown") is True,
        "hdr": facts.get("src_color_transfer") in HDR_TRANSFER_NAMES,
        "vfr": facts.get("src_vfr") is True,
        "rotated": bool((facts.get("src_rotation_deg") or 0) % 360),
        "image": facts.get("src_media_kind") == "image",
    }
    return [name for name in TRAITS if found[name]]


def _shots(num_frames: int, fps: float, mean_shot_s: float) -> list[tuple[int, int]]:
    """``num_frames`` cut into equal shots of about ``mean_shot_s`` (the last one longer)."""
    shot = max(1, round(mean_shot_s * fps))
    n = max(1, num_frames // shot)
    bounds = [round(i * num_frames / n) for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


def estimate_source(
    facts: dict[str, Any], cfg: BuildConfig, rates: PlanRates, vae: VaeFactors
) -> SourceEstimate:
    """Expected clips, tokens and work of one source from its probe row (``Probe`` output)."""
    est = SourceEstimate(source=str(facts["source"]), status=str(facts["src_status"]))
    if facts["src_status"] != "done":
        est.error = facts.get("src_error")
        return est
    fps, width, height = float(facts["fps"]), int(facts["width"]), int(facts["height"])
    num_frames = int(facts["src_num_frames"])
    est.traits = _traits(facts)
    est.duration_s, est.fps, est.width, est.height = (
        0.0 if "image" in est.traits else float(facts["src_duration_s"]),  # a still lasts none
        fps,
        width,
        height,
    )
    work = even_size(width, height, cfg.split.work_max_area)
    est.source_frames = num_frames
    est.source_mpx_frames = num_frames * width * height / 1e6
    payload_frames = len(resample_indices(num_frames, fps, cfg.split.work_fps))
    est.work_mpx_frames = payload_frames * work[0] * work[1] / 1e6
    if cfg.split.deinterlace and "interlaced" in est.traits:
        rate = rates.deinterlace_cpu_s_per_mpx_frame
        if cfg.split.field_match and "pulldown" in est.traits:
            rate += rates.field_match_cpu_s_per_mpx_frame
        est.deinterlace_cpu_s = est.source_mpx_frames * rate
    pt, ph, pw = cfg.encode.patch_size
    for a, b in _shots(num_frames, fps, rates.mean_shot_s):
        for start, end in clip_spans(a, b, fps, cfg.split):
            shape, (frames, w, h) = clip_latent_shape(end - start, fps, work, cfg, vae)
            c, t, lh, lw = shape
            est.clips += 1
            est.clip_s += (end - start) / fps
            est.tokens_per_clip.append((t // pt) * (lh // ph) * (lw // pw))
            est.latent_bytes_per_clip.append(2 * c * t * lh * lw)  # bf16
            est.encode_mpx_frames.append(frames * w * h / 1e6)
    return est


@dataclass
class StageEstimate:
    stage: str
    resource: str  # "cpu", "gpu" or "driver"
    work: float  # units of `unit`
    unit: str
    resource_s: float  # seconds of one CPU core / one GPU / the driver
    wall_s: float  # if the stage had its whole resource pool to itself


@dataclass
class Plan:
    """The estimate for all sources (sample figures scaled by sources / probed)."""

    preset: str
    sources: int
    probed: int
    probe_errors: int
    scale: float  # sources / probed
    duration_s: float
    clips: float
    clips_kept: float
    latent_tokens: float
    tokens_per_clip_mean: float
    storage_bytes: float
    workers: int
    gpus: int
    stages: list[StageEstimate]
    wall_s: float  # streaming estimate: the busiest resource pool
    bottleneck: str
    rates: dict[str, float]
    per_source: list[SourceEstimate] = field(default_factory=list)
    traits: dict[str, int] = field(default_factory=dict)  # probed sources per trait
    # probed sources that fail their probe, by cause (pipeline.progress.error_reason),
    # the most common first: what a build would record as their error rows
    probe_errors_by_reason: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _stage_work(
    ests: list[SourceEstimate], cfg: BuildConfig, rates: PlanRates, gpus: int
) -> list[tuple[str, str, float, str, float]]:
    """``(stage, resource, work, unit, resource seconds)`` summed over sampled sources,
    for the build's own stages (:func:`pipeline.graph.build_steps`, labelled as in its
    progress lines), then the model actors' start-up on a cluster of ``gpus`` GPUs.
    Model stages run on ``"gpu"``, and so does TransNetV2 when split tasks hold a GPU
    share on a cluster with GPUs (otherwise it is split's CPU work)."""
    from pipeline.graph import build_steps, fuse_steps, split_gpus, stage_labels

    ok = [e for e in ests if e.status == "done"]
    clips = sum(e.clips for e in ok)
    kept = clips * rates.keep_fraction
    src_mpx = sum(e.source_mpx_frames for e in ok)
    work_mpx = sum(e.work_mpx_frames for e in ok)
    enc_mpx = sum(sum(e.encode_mpx_frames) for e in ok) * rates.keep_fraction
    split_s = (
        src_mpx * rates.split_cpu_s_per_source_mpx_frame
        + work_mpx * rates.split_cpu_s_per_work_mpx_frame
        + sum(e.deinterlace_cpu_s for e in ok)
    )
    frames = sum(e.source_frames for e in ok)
    transnet = cfg.split.detector == "transnetv2"
    transnet_on_gpu = transnet and gpus > 0 and split_gpus(cfg) > 0
    if transnet and not transnet_on_gpu:
        split_s += frames * rates.transnet_cpu_s_per_frame
    # stage -> (work, unit, seconds per unit of work); a second decide sees kept clips
    work: dict[str, tuple[float, str, float]] = {
        "probe": (len(ests), "sources", rates.probe_cpu_s_per_source),
        "split": (src_mpx, "source Mpx-frames", split_s / src_mpx if src_mpx else 0.0),
        "score": (clips, "clips", rates.score_cpu_s_per_clip),
        "aesthetic": (clips, "clips", rates.aesthetic_gpu_s_per_clip),
        "decide": (clips, "clips", rates.decide_cpu_s_per_clip),
        "dedup": (clips, "clips", rates.dedup_cpu_s_per_clip),
        "caption": (kept, "kept clips", rates.caption_gpu_s_per_clip),
        "agreement": (kept, "kept clips", rates.agreement_gpu_s_per_clip),
        "decide#2": (kept, "kept clips", rates.decide_cpu_s_per_clip),
        "encode": (enc_mpx, "VAE Mpx-frames", rates.encode_gpu_s_per_mpx_frame),
        "text_encode": (kept, "kept clips", rates.text_encode_gpu_s_per_clip),
    }
    steps = build_steps(cfg)
    out: list[tuple[str, str, float, str, float]] = []
    for step, label in zip(steps, stage_labels(steps), strict=True):
        if label not in work:  # "ranges": splitting a row into frame ranges costs nothing
            continue
        amount, unit, rate = work[label]
        out.append((label, "gpu" if step.kind == "actors" else "cpu", amount, unit, amount * rate))
        if label == "split" and transnet_on_gpu:
            cost = frames * rates.transnet_gpu_s_per_frame
            out.append(("transnetv2", "gpu", frames, "source frames", cost))
    actors, start_s = 0, 0.0
    for op in fuse_steps(cfg, steps, gpus):  # a pool's actors hold all its models
        models = [step for step in op if step.kind == "actors"]
        if models:
            n = max(step.res.min_actors for step in models)
            actors += n
            start_s += n * (rates.actor_start_s + len(models) * rates.model_load_s)
    if actors:
        out.append(("start-up", "gpu", actors, "model actors", start_s))
    return out


def make_plan(
    sources: list[str],
    cfg: BuildConfig,
    *,
    sample: int = 32,
    workers: int | None = None,
    gpus: int = 0,
    rates: PlanRates | None = None,
    seed: int = 0,
) -> Plan:
    """Probe up to ``sample`` of ``sources`` (a seeded random choice) and estimate the
    whole build on ``workers`` CPU slots and ``gpus`` GPUs."""
    if not sources:
        raise ValueError("plan: no sources")
    if sample < 1:
        raise ValueError(f"--sample must be >= 1, got {sample}")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if gpus < 0:
        raise ValueError(f"--gpus must be >= 0, got {gpus}")
    rates = rates or RATE_PRESETS.get(cfg.preset, PlanRates())
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    chosen = sorted(random.Random(seed).sample(sources, min(sample, len(sources))))
    probe = Probe(cfg.probe)
    vae = vae_factors(cfg)
    ests = [estimate_source({"source": s, **probe.probe_one(s)}, cfg, rates, vae) for s in chosen]
    scale = len(sources) / len(chosen)

    stages: list[StageEstimate] = []
    pools = {"cpu": 0.0, "gpu": 0.0, "driver": 0.0}
    for stage, resource, work, unit, res_s in _stage_work(ests, cfg, rates, gpus):
        if stage != "start-up":  # a fixed cost, whatever the number of sources
            work, res_s = work * scale, res_s * scale
        if resource == "gpu" and gpus == 0:  # model stages fall back to the CPUs
            # (loading a model is host work: its time does not grow on a CPU)
            slower = 1.0 if stage == "start-up" else rates.cpu_per_gpu_s
            resource, res_s = "cpu", res_s * slower
        size = workers if resource == "cpu" else gpus
        pools[resource] += res_s
        stages.append(StageEstimate(stage, resource, work, unit, res_s, res_s / size))

    # one worker process per CPU slot, one per single-process actor and the meter's:
    # a fixed cost, as the model actors' start-up
    from pipeline.graph import build_steps

    processes = workers + sum(step.kind == "single" for step in build_steps(cfg)) + 1
    start_s = processes * rates.worker_start_s
    pools["cpu"] += start_s
    stages.append(
        StageEstimate("workers", "cpu", processes, "worker processes", start_s, start_s / workers)
    )

    ok = [e for e in ests if e.status == "done"]
    clips = sum(e.clips for e in ok) * scale
    kept = clips * rates.keep_fraction
    tokens_all = [t for e in ok for t in e.tokens_per_clip]
    tokens_mean = sum(tokens_all) / len(tokens_all) if tokens_all else 0.0
    latent_bytes = sum(sum(e.latent_bytes_per_clip) for e in ok) * scale * rates.keep_fraction
    storage = latent_bytes + kept * rates.sample_overhead_bytes + clips * rates.index_bytes_per_clip
    write_s = storage / rates.write_bytes_per_s
    pools["driver"] = write_s
    stages.append(StageEstimate("write", "driver", storage / 1e6, "MB", write_s, write_s))

    walls = {
        "cpu": pools["cpu"] / workers,
        "gpu": pools["gpu"] / gpus if gpus else 0.0,
        "driver": pools["driver"],
    }
    bottleneck = max(walls, key=lambda k: walls[k])
    return Plan(
        preset=cfg.preset,
        sources=len(sources),
        probed=len(chosen),
        probe_errors=sum(e.status != "done" for e in ests),
        probe_errors_by_reason=dict(
            Counter(
                error_reason(e.error or "", e.source) for e in ests if e.status != "done"
            ).most_common()
        ),
        scale=scale,
        duration_s=sum(e.duration_s for e in ok) * scale,
        clips=clips,
        clips_kept=kept,
        latent_tokens=tokens_mean * kept,
        tokens_per_clip_mean=tokens_mean,
        storage_bytes=storage,
        workers=workers,
        gpus=gpus,
        stages=stages,
        wall_s=walls[bottleneck],
        bottleneck=bottleneck,
        rates=asdict(rates),
        per_source=ests,
        traits={t: n for t in TRAITS if (n := sum(t in e.traits for e in ests))},
    )


# --- configuration ---------------------------------------------------------------------------


# rates the plan divides by: zero is no rate
_DIVISOR_RATES = ("mean_shot_s", "write_bytes_per_s")


def parse_rates(base: PlanRates, items: list[str] | dict[str, Any]) -> PlanRates:
    """``base`` with fields replaced from ``NAME=VALUE`` strings or a mapping (the config
    file's ``plan:`` section); unknown names are errors."""
    pairs = dict(items) if isinstance(items, dict) else {}
    if isinstance(items, list):
        for item in items:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"plan rate {item!r}: expected NAME=VALUE")
            pairs[name.strip()] = value.strip()
    known = {f.name: f for f in fields(PlanRates)}
    unknown = sorted(set(pairs) - set(known))
    if unknown:
        raise ValueError(f"plan: unknown rate(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, value in pairs.items():
        kind = int if known[name].type in (int, "int") else float
        try:
            values[name] = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"plan rate {name}: {value!r} is not a number") from None
        v = values[name]
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"plan rate {name}: must be >= 0, got {value!r}")
        if name in _DIVISOR_RATES and v == 0:
            raise ValueError(f"plan rate {name}: must be > 0, got {value!r}")
        if name == "keep_fraction" and v > 1:
            raise ValueError(f"plan rate {name}: a share, in [0, 1], got {value!r}")
    return replace(base, **values)


def load_plan_config(
    path: str | None,
    preset: str | None,
    rate_items: list[str] | None = None,
    sets: Sequence[str] = (),
) -> tuple[BuildConfig, PlanRates]:
    """The build config and plan rates: the config file may carry a ``plan:`` section of
    rates beside the build sections; ``--rate`` items override it, as ``sets``
    (``--set KEY=VALUE``) items override its build sections."""
    data: dict[str, Any] = {}
    if path:
        data = read_config_file(path)
    rate_section = data.pop("plan", None) or {}
    layers = [data, {"preset": preset} if preset else {}, parse_overrides(sets)]
    data = merge_layers(DEFAULT_THRESHOLDS, layers)
    from_dict(BuildConfig, data)  # reject unknown keys before building tiny models
    cfg = load_config(None, **data)
    rates = parse_rates(RATE_PRESETS.get(cfg.preset, PlanRates()), rate_section)
    return cfg, parse_rates(rates, rate_items or [])


# --- output ------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # unreachable: TB returns above


def _images(n: float) -> str:
    return f" (and ~{n:,.0f} image{'' if round(n) == 1 else 's'})"


def format_plan(plan: Plan) -> str:
    """The plan as a plain-text report with a per-stage table."""
    if plan.gpus:
        gpu_text = f"{plan.gpus} GPU" + ("s" if plan.gpus != 1 else "")
    else:
        gpu_text = "no GPUs (model stages on CPUs)"
    lines = [
        f"plan ({plan.preset} preset): {plan.sources} sources, {plan.probed} probed"
        f" ({plan.probe_errors} fail their probe), {plan.workers} CPU workers, {gpu_text}",
        f"  video      {_duration(plan.duration_s)}"
        + (_images(plan.traits["image"] * plan.scale) if "image" in plan.traits else ""),
        f"  clips      {plan.clips:,.0f} (kept ~{plan.clips_kept:,.0f})",
        f"  tokens     {plan.latent_tokens:,.0f} (~{plan.tokens_per_clip_mean:,.0f} per clip)",
        f"  storage    {_size(plan.storage_bytes)}",
    ]
    if plan.traits:
        found = ", ".join(f"{n} {TRAITS[t]}" for t, n in plan.traits.items())
        lines.append(f"  probed     {found}")
    causes = cause_lines(plan.probe_errors_by_reason, 5, "--json lists them")
    lines += [f"  {line}" for line in causes]
    lines += [
        "",
        f"  {'stage':<12} {'on':<7} {'work':>14} {'unit':<18} {'resource time':>14} {'wall':>10}",
    ]
    for s in plan.stages:
        lines.append(
            f"  {s.stage:<12} {s.resource:<7} {s.work:>14,.1f} {s.unit:<18}"
            f" {_duration(s.resource_s):>14} {_duration(s.wall_s):>10}"
        )
    lines += [
        "",
        f"  estimated wall time {_duration(plan.wall_s)} (stages stream; bound by {plan.bottleneck})",
        "  rates are rough defaults: override with a `plan:` config section or --rate NAME=VALUE",
    ]
    return "\n".join(lines)
