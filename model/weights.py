"""Reading torch weight files (training checkpoints, the aesthetic head) without
unpickling code, with errors that name the file and what it was meant to be; loading
and saving pretrained models without transformers' progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where weights are read: quiet_progress's importers need no torch
    import torch

__all__ = ["load_weights", "quiet_progress"]


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars off while a model loads or is saved ("Loading
    weights", "Writing model shards": one bar per model): a build and ``reelpack
    sample`` report their own progress, and a bar per actor only buries it. Restored
    afterwards as it was."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_weights(
    path: str | Path, what: str, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)``; with ``mmap``, memory-mapped where the
    file's format allows it, so that what the caller never reads (a checkpoint's
    optimizer state, when sampling) is never read from disk. A missing file, a folder, and a file that
    is not one ``torch.save`` wrote of tensors and plain containers (another format, or
    one cut short) raise FileNotFoundError, IsADirectoryError or ValueError, each
    naming ``what`` (e.g. "checkpoint") and the file."""
    name = f"{what} {path}"
    if Path(path).is_dir():
        raise IsADirectoryError(f"{name} is a folder, not a file")
    try:
        return _load(path, map_location, mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} does not exist") from None
    except OSError:
        raise
    except Exception as e:  # torch raises KeyError, RuntimeError, UnpicklingError, EOFError
        first = (str(e).strip().split(". ")[0].splitlines() or [""])[0][:160]
        cause = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise ValueError(f"{name} is not a torch weights file, or it is cut short ({cause})") from e


def _load(path: str | Path, map_location: str | torch.device, mmap: bool) -> Any:
    import torch

    if mmap:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
        # the legacy (pre-zip) format cannot be mapped: read whole
    return torch.load(path, map_location=map_location, weights_only=True)
