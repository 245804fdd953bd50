"""The build configuration: one typed dataclass tree, presets, and YAML loading.

A config file is YAML (or JSON) mirroring :class:`BuildConfig`; unknown keys are
rejected with their dotted path, so a typo never passes silently::

    encode:
      pixel_budget: 409920
    decide:
      thresholds: {motion: [0.01, null]}   # edits the defaults: the others stay

``--set KEY=VALUE`` items (:func:`parse_overrides`) lay single values over the file.

Presets fill in model locations: ``default`` names the real models a user with a
GPU runs (hub ids); ``tiny`` builds random-weight models from small configs into
a cache folder and points the config at them, so everything runs offline on a
CPU through exactly the loaders the real models use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.stages.aesthetic import AestheticConfig
from pipeline.stages.agreement import AgreementConfig
from pipeline.stages.caption import CaptionConfig
from pipeline.stages.decide import DEFAULT_THRESHOLDS, DecideConfig, edit_thresholds
from pipeline.stages.dedup import DedupConfig
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.probe import ProbeConfig
from pipeline.stages.score import ScoreConfig
from pipeline.stages.split import SplitConfig
from pipeline.stages.text_encode import TextEncodeConfig
from pipeline.writer import WriteConfig
from schemas.yamltext import load_yaml, read_config_file

__all__ = [
    "ACTOR_STAGES",
    "PRESETS",
    "BuildConfig",
    "RayConfig",
    "StageResources",
    "config_hash",
    "from_dict",
    "load_config",
    "merge_layers",
    "parse_overrides",
    "resolve_preset",
    "to_dict",
    "validate",
]

T = TypeVar("T")


@dataclass(frozen=True)
class StageResources:
    """How one stage runs on Ray. Read only by ``pipeline.graph``.

    CPU stages run as Ray tasks; model stages as actor pools that autoscale
    between ``min_actors`` and ``max_actors``. ``num_gpus=None`` ("auto"): one GPU
    per actor when the cluster has enough for every auto stage's minimum pool, else
    an equal fraction so that they share the GPUs (three stages on one GPU: a third
    each; :func:`pipeline.graph.gpu_shares`), none on a cluster without GPUs. Set
    fractions yourself to share a GPU in other proportions.
    """

    num_cpus: float = 1.0
    num_gpus: float | None = 0.0
    # rows per call; None: one block per call (for the per-source CPU stages a block is
    # one source's clips, so sources spread over tasks instead of queueing in one)
    batch_size: int | None = 4
    min_actors: int = 1  # actor stages only
    max_actors: int = 1


# stages that run as long-lived actors (they hold a model or a global index)
ACTOR_STAGES = ("aesthetic", "dedup", "agreement", "caption", "encode", "text_encode")


def _cpu(batch_size: int | None) -> StageResources:
    return StageResources(num_cpus=1.0, num_gpus=0.0, batch_size=batch_size)


def _model(batch_size: int, num_gpus: float | None = None) -> StageResources:
    return StageResources(num_cpus=1.0, num_gpus=num_gpus, batch_size=batch_size)


@dataclass(frozen=True)
class RayConfig:
    """Where the build runs, and each stage's resources."""

    address: str | None = None  # None: start a local Ray; "auto" or ray://host:10001 for a cluster
    num_cpus: int | None = None  # local Ray only; None = all cores
    object_store_memory: int | None = None  # local Ray only, bytes
    probe: StageResources = field(default_factory=lambda: _cpu(1))
    split: StageResources = field(default_factory=lambda: _cpu(1))
    score: StageResources = field(default_factory=lambda: _cpu(None))
    aesthetic: StageResources = field(default_factory=lambda: _model(16, num_gpus=None))
    decide: StageResources = field(default_factory=lambda: _cpu(None))
    # one global near-duplicate index: a single actor holding only representatives
    dedup: StageResources = field(
        default_factory=lambda: StageResources(num_cpus=0.5, num_gpus=0.0, batch_size=64)
    )
    agreement: StageResources = field(default_factory=lambda: _model(16, num_gpus=None))
    caption: StageResources = field(default_factory=lambda: _model(4))
    encode: StageResources = field(default_factory=lambda: _model(1))
    text_encode: StageResources = field(default_factory=lambda: _model(16))
    # sources with more frames than this are split into ranges processed in parallel
    # (stitched back exactly; see pipeline.stitching); 0 turns range splitting off
    straggler_range_frames: int = 18_000
    progress_interval_s: float = 5.0  # seconds between progress lines; 0 turns them off
    # consecutive model stages whose actors get no GPU (caption, agreement, encode and
    # text_encode on a CPU-only cluster) run as one actor pool, all their models in each
    # actor: one process start and one torch import instead of one per stage
    # (pipeline.graph.fuse_steps); stages with GPUs always keep their own pools
    fuse_cpu_models: bool = True
    # fail fast when the minimum actor pools cannot be placed on the current nodes; turn
    # off on clusters that add nodes on demand (an autoscaling KubeRay cluster)
    check_resources: bool = True
    # fail fast when a model of the build is neither on disk nor downloadable from here
    # (pipeline.models); turn off when the workers see models the driver cannot
    check_models: bool = True


@dataclass(frozen=True)
class BuildConfig:
    preset: str = "default"
    model_cache: str = ""  # where the tiny preset builds its models; "" = ~/.cache/reelpack
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    aesthetic: AestheticConfig = field(default_factory=AestheticConfig)
    decide: DecideConfig = field(default_factory=DecideConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    agreement: AgreementConfig = field(default_factory=AgreementConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    text_encode: TextEncodeConfig = field(default_factory=TextEncodeConfig)
    write: WriteConfig = field(default_factory=WriteConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _resolve_type(tp: Any, owner: type) -> Any:
    if isinstance(tp, str):
        module = __import__(owner.__module__, fromlist=["_"])
        return eval(tp, vars(module))  # annotations of our own dataclasses only
    return tp


def _coerce_union(value: Any, args: tuple[Any, ...], path: str) -> Any:
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, path)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    raise ValueError(f"config {path}: {value!r} fits none of {args}: {errors}")


def _coerce_tuple(value: Any, args: tuple[Any, ...], path: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"config {path}: expected a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise ValueError(f"config {path}: expected {len(args)} items, got {value!r}")
    return tuple(
        _coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
    )


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"config {path}: expected a number, got {value!r}")
    if tp in (int, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        raise ValueError(f"config {path}: expected {tp.__name__}, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to the annotated field type (dataclasses, tuples, optionals)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), path)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(tp), path)
    if (is_dataclass(tp) and isinstance(tp, type)) or origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config {path}: expected a mapping, got {value!r}")
        return (
            from_dict(tp, value, path) if isinstance(tp, type) and is_dataclass(tp) else dict(value)
        )
    return _coerce_scalar(value, tp, path)


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys."""
    assert is_dataclass(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = path or "top level"
        raise ValueError(f"config {where}: unknown key(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(value, _resolve_type(hints[name], cls), f"{path}.{name}".lstrip("."))
        for name, value in data.items()
    }
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a resolved config (canonicalised through a load round trip,
    so ``20`` and ``20.0`` in a float field hash alike)."""
    canonical = to_dict(from_dict(type(cfg), to_dict(cfg)))
    blob = json.dumps(canonical, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# x264's presets, fastest first
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)  # fmt: skip


# device and dtype values checked without importing torch (seconds per command)
_COMMON_DEVICE = r"auto|cpu|cuda(:\d+)?"
_COMMON_DTYPES = ("auto", "float32", "float16", "bfloat16")


class _Checks:
    """Collects what is wrong with a config, each problem named by its dotted path."""

    def __init__(self, cfg: BuildConfig) -> None:
        self.cfg = cfg
        self.problems: list[str] = []

    def value(self, path: str) -> Any:
        node: Any = self.cfg
        for name in path.split("."):
            node = getattr(node, name)
        return node

    def need(self, ok: bool, path: str, rule: str) -> None:
        if not ok:
            self.problems.append(f"{path} must be {rule}, got {self.value(path)!r}")

    def at_least(self, low: float, *paths: str, none_ok: bool = False) -> None:
        for path in paths:
            v = self.value(path)
            rule = f">= {low:g}" + (" or null" if none_ok else "")
            if self._finite(v, path):
                self.need(none_ok if v is None else v >= low, path, rule)

    def above(self, low: float, *paths: str, none_ok: bool = False) -> None:
        for path in paths:
            v = self.value(path)
            rule = f"> {low:g}" + (" or null" if none_ok else "")
            if self._finite(v, path):
                self.need(none_ok if v is None else v > low, path, rule)

    def _finite(self, v: Any, path: str) -> bool:
        """False, with the problem noted, for an infinite value (YAML ``.inf``): no
        setting takes one, and frame counts and sizes cannot be made of it."""
        if isinstance(v, float) and math.isinf(v):
            self.problems.append(f"{path} must be a finite number, got {v!r}")
            return False
        return True

    def one_of(self, path: str, options: tuple[str, ...]) -> None:
        self.need(self.value(path) in options, path, f"one of {list(options)}")

    def device(self, *paths: str) -> None:
        for path in paths:
            v = self.value(path)
            ok = isinstance(v, str) and re.fullmatch(_COMMON_DEVICE, v) is not None
            if not ok:  # anything else is what torch makes of it
                import torch

                try:
                    ok = bool(torch.device(v))
                except (RuntimeError, ValueError, TypeError):
                    ok = False
            self.need(ok, path, '"auto" or a torch device ("cpu", "cuda", "cuda:1")')

    def dtype(self, *paths: str) -> None:
        for path in paths:
            v = self.value(path)
            ok = v in _COMMON_DTYPES
            if not ok:
                import torch

                ok = isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype)
            self.need(ok, path, '"auto" or a torch dtype ("bfloat16", "float32")')


def _check_sources(c: _Checks) -> None:
    cfg = c.cfg
    c.above(0, "probe.max_pixels", "probe.max_duration_s")
    c.at_least(1, "probe.min_side")
    c.need(
        cfg.probe.max_aspect == 0 or cfg.probe.max_aspect >= 1,
        "probe.max_aspect",
        ">= 1, or 0 (off)",
    )
    from pipeline.decode import BACKENDS
    from pipeline.stages.split import DETECTORS

    c.one_of("split.detector", DETECTORS)
    c.above(0, "split.threshold", "split.work_fps", none_ok=True)
    c.at_least(0, "split.min_scene_s", "split.min_clip_s", "split.trim_frames", "split.flush_mib")
    c.at_least(0, "split.timeout_s")
    c.above(0, "split.max_clip_s")
    c.need(
        cfg.split.max_clip_s >= cfg.split.min_clip_s,
        "split.max_clip_s",
        f">= split.min_clip_s ({cfg.split.min_clip_s:g})",
    )
    c.need(0 <= cfg.split.fade_luma <= 255, "split.fade_luma", "in [0, 255]")
    c.need(0 <= cfg.split.border_luma <= 255, "split.border_luma", "in [0, 255]")
    c.at_least(16, "split.detect_width")
    c.at_least(16 * 16, "split.work_max_area")
    c.need(0 <= cfg.split.work_crf <= 51, "split.work_crf", "in [0, 51] (an x264 CRF)")
    c.one_of("split.work_preset", X264_PRESETS)
    c.one_of("split.decoder", BACKENDS)
    c.device("split.transnet_device")


def _check_stages(c: _Checks) -> None:
    from model.vae import SUPPORTED_VAE_CLASSES

    cfg = c.cfg
    for section in ("score", "aesthetic", "agreement"):
        # score's motion compares its sampled frames: two at least
        low = 2 if section == "score" else 1
        c.at_least(low, f"{section}.num_frames", f"{section}.max_frames")
        c.at_least(0, f"{section}.frames_per_second")
    c.at_least(0, "score.analysis_width", "score.text_frames", "score.still_flow")
    c.at_least(16, "score.flow_width", "score.text_width")
    c.at_least(1, "score.flow_pairs", "aesthetic.batch_size", "agreement.batch_size")
    c.device("aesthetic.device", "agreement.device")
    c.at_least(0, "decide.min_duration_s")
    c.at_least(1, "caption.num_frames", "caption.batch_size")
    c.at_least(4, "caption.max_pixels")  # a frame of 2x2 pixels at least
    c.at_least(1, "caption.max_new_tokens", "caption.max_caption_tokens")
    c.at_least(1, "caption.short_max_new_tokens")
    c.above(0, "caption.sample_fps", none_ok=True)
    c.above(0, "caption.retry_repetition_penalty")
    c.at_least(16 * 16, "encode.pixel_budget")
    budgets = cfg.encode.extra_pixel_budgets
    c.need(all(b >= 256 for b in budgets), "encode.extra_pixel_budgets", "budgets >= 256")
    c.need(min(cfg.encode.patch_size) >= 1, "encode.patch_size", "(t, h, w), each >= 1")
    c.above(0, "encode.target_fps", none_ok=True)
    c.at_least(1, "encode.max_frames")
    c.one_of("encode.vae_class", SUPPORTED_VAE_CLASSES)
    c.at_least(2, "text_encode.max_length")
    c.at_least(1, "text_encode.batch_size")
    c.device("caption.device", "encode.device", "text_encode.device")
    c.dtype("caption.dtype", "encode.dtype", "text_encode.dtype")


def _check_output(c: _Checks) -> None:
    c.at_least(1, "write.shard_max_bytes", "write.shard_max_samples", "write.part_max_rows")
    c.at_least(0, "write.commit_interval_s")
    c.at_least(1, "ray.num_cpus", "ray.object_store_memory", none_ok=True)
    c.at_least(0, "ray.straggler_range_frames", "ray.progress_interval_s")
    for f in fields(RayConfig):
        res = getattr(c.cfg.ray, f.name)
        if not isinstance(res, StageResources):
            continue
        at = f"ray.{f.name}"
        c.at_least(0, f"{at}.num_cpus")
        c.at_least(0, f"{at}.num_gpus", none_ok=True)
        c.at_least(1, f"{at}.batch_size", none_ok=True)
        c.at_least(1, f"{at}.min_actors")
        c.need(
            res.max_actors >= res.min_actors,
            f"{at}.max_actors",
            f">= min_actors ({res.min_actors})",
        )
        # what a stage cannot use is refused, never silently ignored
        models = ", ".join(s for s in ACTOR_STAGES if s != "dedup")
        if f.name not in ACTOR_STAGES:
            # a CPU task needing no CPU would run unbounded, as many at once as there are blocks
            c.above(0, f"{at}.num_cpus")
            if f.name == "split" and c.cfg.split.detector == "transnetv2":
                # each split task may hold a share of a GPU for TransNetV2 (transnet_device)
                c.need(
                    res.num_gpus is not None and res.num_gpus <= 1,
                    f"{at}.num_gpus",
                    "a number from 0 (no GPU) to 1 (TransNetV2 runs on one device)",
                )
                c.need(
                    not (res.num_gpus and c.cfg.split.transnet_device == "cpu"),
                    f"{at}.num_gpus",
                    "0 while split.transnet_device is cpu (the share would sit unused; "
                    "set split.transnet_device to auto or cuda)",
                )
            else:
                c.need(
                    res.num_gpus == 0,
                    f"{at}.num_gpus",
                    f"0 ({f.name} runs as CPU tasks; GPUs go to the model stages: {models}"
                    + (", and to split's transnetv2 detector)" if f.name == "split" else ")"),
                )
            if (res.min_actors, res.max_actors) != (1, 1):
                c.problems.append(
                    f"{at}.min_actors / max_actors: {f.name} runs as Ray tasks (as many at "
                    "once as their num_cpus fit), not an actor pool; leave them out"
                )
        elif f.name == "dedup":
            c.need(res.num_gpus == 0, f"{at}.num_gpus", "0 (the near-duplicate index is CPU work)")
            if (res.min_actors, res.max_actors) != (1, 1):
                c.problems.append(
                    f"{at}.min_actors / max_actors: dedup is one actor holding the build's "
                    "one index (two would each miss the other's duplicates); leave them out"
                )


def validate(cfg: BuildConfig) -> None:
    """Check every value a build reads, so a bad config fails before any work (and not
    as an error row per clip, or a model actor dying mid-build). Raises one ValueError
    naming every bad field by its dotted path."""
    checks = _Checks(cfg)
    _check_sources(checks)
    _check_stages(checks)
    _check_output(checks)
    if checks.problems:
        raise ValueError("config: " + "; ".join(checks.problems))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """Command-line ``KEY=VALUE`` items as a nested mapping to lay over a config:
    ``["split.detector=content", "decide.thresholds.motion=[0.01, null]"]`` gives
    ``{"split": {"detector": "content"}, "decide": {"thresholds": {"motion": [0.01,
    None]}}}``. Keys are dotted paths into :class:`BuildConfig`; values are read as
    YAML (``0.5``, ``true``, ``null``, ``[1, 2]``; anything else is a string). Later
    items win. Unknown keys and bad values are caught when the config is built."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path):
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. split.detector=content")
        try:
            value = load_yaml(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: value is not valid YAML: {e}") from None
        node = out
        for i, name in enumerate(path[:-1]):
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(path[: i + 1])} is already a value")
            node = child
        node[path[-1]] = value
    return out


def merge_layers(thresholds: Any, layers: typing.Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Config mappings merged in order, later keys winning (nested sections merge key by
    key). ``decide.thresholds`` edits ``thresholds`` layer by layer
    (:func:`~pipeline.stages.decide.edit_thresholds`): a mapping changes only the
    signals it names, so a file that adds an aesthetic threshold keeps the defaults."""
    data: dict[str, Any] = {}
    edited = False
    for layer in layers:
        decide = layer.get("decide")
        if isinstance(decide, dict) and "thresholds" in decide:
            try:
                thresholds = edit_thresholds(thresholds, decide["thresholds"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"config decide.thresholds: {e}") from None
            edited = True
        data = _deep_merge(data, layer)
    if edited:
        data["decide"]["thresholds"] = [[name, list(bounds)] for name, bounds in thresholds]
    return data


def load_config(
    path: str | None = None,
    preset: str | None = None,
    sets: typing.Iterable[str] = (),
    **overrides: Any,
) -> BuildConfig:
    """Load a config: defaults <- YAML/JSON file <- preset name <- ``sets`` (``KEY=VALUE``
    items, :func:`parse_overrides`) <- overrides, then the preset resolves model
    locations (building tiny models if needed)."""
    layers: list[dict[str, Any]] = []
    if path:
        layers.append(read_config_file(path))
    if preset:
        layers.append({"preset": preset})
    layers += [parse_overrides(sets), overrides]
    data = merge_layers(DEFAULT_THRESHOLDS, layers)
    cfg = from_dict(BuildConfig, data)
    validate(cfg)  # before the preset builds any model
    resolved = resolve_preset(cfg, user_keys=data)
    validate(resolved)
    return resolved


def _cache_dir(cfg: BuildConfig) -> Path:
    root = cfg.model_cache or os.environ.get("REELPACK_CACHE") or "~/.cache/reelpack"
    return Path(root).expanduser()


def _tiny(cfg: BuildConfig, user_keys: dict[str, Any]) -> BuildConfig:
    """Random-weight models built from small configs into the model cache; sizes for CPUs."""
    from model.tiny_text import build_tiny_text_encoder
    from model.vae import build_tiny_vae
    from pipeline.tiny_clip import build_tiny_clip
    from pipeline.tiny_vlm import build_tiny_vlm

    cache = _cache_dir(cfg) / "tiny"
    vae_dir = build_tiny_vae(str(cache / "vae"))
    vlm_dir = build_tiny_vlm(str(cache / "vlm"))
    clip = build_tiny_clip(str(cache / "clip"))
    text_dir = build_tiny_text_encoder(str(cache / "text"))

    def keep_user(section: str, **values: Any) -> dict[str, Any]:
        given = user_keys.get(section, {}) or {}
        return {k: v for k, v in values.items() if k not in given}

    return replace(
        cfg,
        aesthetic=replace(
            cfg.aesthetic, **keep_user("aesthetic", **clip, num_frames=2, device="cpu")
        ),
        agreement=replace(cfg.agreement, **keep_user("agreement", enabled=True, device="cpu")),
        # a random CLIP maps every clip to nearly the same embedding: only the frame
        # hashes (exact copies) can find duplicates in the tiny preset
        dedup=replace(cfg.dedup, **keep_user("dedup", threshold=1.0)),
        caption=replace(
            cfg.caption, **keep_user("caption", model=vlm_dir, max_new_tokens=24, num_frames=4)
        ),
        encode=replace(
            cfg.encode,
            **keep_user(
                "encode",
                vae=vae_dir,
                vae_subfolder=None,
                pixel_budget=128 * 128,
                target_fps=8.0,
                max_frames=17,
            ),
        ),
        text_encode=replace(
            cfg.text_encode, **keep_user("text_encode", model=text_dir, enabled=True, max_length=64)
        ),
        split=replace(cfg.split, **keep_user("split", work_max_area=256 * 144)),
        write=replace(cfg.write, **keep_user("write", shard_max_bytes=4 << 20)),
        # the tiny model actors must fit beside the CPU tasks on a 2-core machine (a
        # stage's other resources, and any the user sets, stay as they are)
        ray=replace(
            cfg.ray,
            **{
                stage: replace(
                    getattr(cfg.ray, stage),
                    **{
                        k: v
                        for k, v in (("num_cpus", 0.1), ("num_gpus", 0.0))
                        if k not in ((user_keys.get("ray") or {}).get(stage) or {})
                    },
                )
                for stage in ACTOR_STAGES
            },
        ),
    )


PRESETS: dict[str, typing.Callable[[BuildConfig, dict[str, Any]], BuildConfig]] = {
    "default": lambda cfg, user_keys: cfg,  # the dataclass defaults name the real models
    "tiny": _tiny,
}


def resolve_preset(cfg: BuildConfig, user_keys: dict[str, Any] | None = None) -> BuildConfig:
    """Apply ``cfg.preset``; values the user set explicitly win over the preset's."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; known: {sorted(PRESETS)}")
    user_keys = user_keys or {}
    resolved = PRESETS[cfg.preset](cfg, user_keys)
    # agreement reuses the aesthetic stage's CLIP embeddings: it must be the same CLIP
    given = user_keys.get("agreement", {}) or {}
    same_clip = {
        k: getattr(resolved.aesthetic, k)
        for k in ("clip_model", "clip_pretrained", "clip_config")
        if k not in given
    }
    resolved = replace(resolved, agreement=replace(resolved.agreement, **same_clip))
    # clip payloads are what the VAE encodes (never upscaled): by default they are at
    # least as large as the largest latent resolution asked for
    largest = max((resolved.encode.pixel_budget, *resolved.encode.extra_pixel_budgets))
    user_split = user_keys.get("split", {}) or {}
    if "work_max_area" not in user_split and resolved.split.work_max_area < largest:
        resolved = replace(resolved, split=replace(resolved.split, work_max_area=largest))
    # ... and carry the frames the VAE will see: at its frame rate, but at least two
    # frames in the shortest clip kept, so score measures motion however sparse that rate
    # (encode resamples a denser payload to its own rate)
    if "work_fps" not in user_split:
        work_fps = resolved.encode.target_fps
        if work_fps is not None and resolved.split.min_clip_s > 0:
            work_fps = max(work_fps, 2.0 / resolved.split.min_clip_s)
        resolved = replace(resolved, split=replace(resolved.split, work_fps=work_fps))
    if resolved.text_encode.enabled and not resolved.caption.enabled:
        raise ValueError(
            "config text_encode.enabled needs caption.enabled (it encodes the captions)"
        )
    return resolved
