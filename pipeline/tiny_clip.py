"""A tiny random-weight CLIP and aesthetic head, for tests and CPU smoke runs.

No machine here can download the real ViT-L/14 or the LAION head, so tests
build this ~2 M-parameter stand-in, save it to a folder and load it back through
the same loaders users run: ``open_clip.create_model_and_transforms(name,
pretrained=<file>)`` and ``torch.load(weights_only=True)``. Its scores are
meaningless numbers; a corpus built with it must say ``random_weights``.

Example::

    paths = build_tiny_clip("/tmp/tiny")     # writes config, weights and head, once
    scorer = AestheticScorer(AestheticConfig(**paths))

Another process (a Ray worker) finds the model through ``AestheticConfig.clip_config``,
or by calling :func:`register_tiny_clip` before loading.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from pipeline.stages.aesthetic_head import AestheticHead

__all__ = [
    "TINY_CLIP_CONFIG",
    "TINY_CLIP_NAME",
    "TinyClipPaths",
    "build_tiny_clip",
    "register_tiny_clip",
]

TINY_CLIP_NAME = "reelpack-tiny-clip"  # open_clip names a model by its config file's stem
TINY_CLIP_CONFIG: dict = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # full vocab so the bundled BPE tokenizer's ids stay valid; it dominates the size
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@contextlib.contextmanager
def _random_init_unannounced() -> Iterator[None]:
    """Without open_clip's warning that no pretrained weights were loaded (random
    weights are the point here). It warns through ``logging.warning``, which would
    also give an unconfigured root logger a stderr handler: a handler that prints
    nothing is there meanwhile."""
    root = logging.getLogger()
    quiet = logging.NullHandler()

    def other(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root.addHandler(quiet)
    root.addFilter(other)
    try:
        yield
    finally:
        root.removeFilter(other)
        root.removeHandler(quiet)


class TinyClipPaths(TypedDict):
    """What :func:`build_tiny_clip` wrote; also ``AestheticConfig`` keyword arguments."""

    clip_model: str
    clip_pretrained: str
    head: str
    clip_config: str


def _config_path(out_dir: Path) -> Path:
    return out_dir / f"{TINY_CLIP_NAME}.json"


def _atomic_save(obj: object, path: Path) -> None:
    # a concurrent reader (another test worker) never sees a half-written file
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def register_tiny_clip(out_dir: str | Path) -> str:
    """Register the tiny config written by :func:`build_tiny_clip` with open_clip in this
    process; returns the model name."""
    from pipeline.stages.aesthetic import register_clip_config

    register_clip_config(_config_path(Path(out_dir)), TINY_CLIP_NAME)
    return TINY_CLIP_NAME


def _init_head(head: AestheticHead) -> None:
    """Variance-preserving init and a bias of 5, so random scores spread around the
    real head's ~1..10 range instead of collapsing to ~0 through five linear layers."""
    from torch import nn

    for layer in head.layers:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
            nn.init.zeros_(layer.bias)
    last = head.layers[-1]
    assert isinstance(last, nn.Linear)
    nn.init.constant_(last.bias, 5.0)


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> TinyClipPaths:
    """Write the tiny CLIP config, its seeded random weights and a seeded random
    aesthetic head of matching width under ``out_dir``. Idempotent: existing files are
    kept (same seed, same bytes), and then neither torch nor open_clip is imported, so
    resolving the tiny preset costs a command nothing. The config is registered with
    open_clip in this process when open_clip is loaded here (by the build, or before
    the call); the loaders register it themselves from ``clip_config``, and
    :func:`register_tiny_clip` does it for direct ``open_clip`` calls.

    Returns ``AestheticConfig`` keyword arguments: ``clip_model``, ``clip_pretrained``
    (weights file), ``head`` (head ``.pth``), ``clip_config`` (config JSON).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _config_path(out)
    text = json.dumps(TINY_CLIP_CONFIG, indent=2, sort_keys=True)
    if not config.exists() or config.read_text() != text:
        tmp = config.with_name(f".{config.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, config)

    weights = out / f"{TINY_CLIP_NAME}-seed{seed}.pt"
    head_path = out / f"aesthetic-head-{TINY_CLIP_CONFIG['embed_dim']}-seed{seed}.pth"
    if not weights.exists() or not head_path.exists():
        import open_clip
        import torch

        from pipeline.stages.aesthetic_head import AestheticHead

        register_tiny_clip(out)
        # seed a private RNG stream: building must not disturb the caller's randomness
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with _random_init_unannounced():
                model = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
            head = AestheticHead(TINY_CLIP_CONFIG["embed_dim"])
            _init_head(head)
        _atomic_save(model.state_dict(), weights)
        _atomic_save(head.state_dict(), head_path)
    elif "open_clip" in sys.modules:
        register_tiny_clip(out)
    return TinyClipPaths(
        clip_model=TINY_CLIP_NAME,
        clip_pretrained=str(weights),
        head=str(head_path),
        clip_config=str(config),
    )
