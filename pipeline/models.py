"""Before a build starts Ray: can every model the build runs be loaded from here?

A model stage loads its model in each actor, after Ray has started and the first
sources are split; a model id with a typo, or weights that are neither on disk nor
reachable (an offline machine), then fail as an actor's death with a long traceback.
:func:`model_problems` finds those cases on the driver first, cheaply: a local folder
must exist and hold the config file its loader reads; a Hugging Face hub id must be in
the local cache or downloadable (only its small config file is fetched here; the
loaders fetch the weights). open_clip models are checked by their pretrained tag.

Skipped with ``ray.check_models: false``: on a cluster whose workers see models the
driver cannot (caches on the worker nodes only).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

__all__ = ["ModelUnavailable", "check_models", "model_problem", "model_problems"]


class ModelUnavailable(RuntimeError):
    """A model the build needs cannot be loaded (the message names each one and why)."""


@dataclass(frozen=True)
class _Need:
    setting: str  # the config key that names the model, e.g. "caption.model"
    ref: str  # hub id or local folder
    filename: str  # the file its loader reads first, relative to ref
    subfolder: str | None = None
    file: bool = False  # ref is a file itself (a checkpoint), not a folder or hub id


def _needs(cfg: BuildConfig) -> tuple[list[_Need], list[tuple[str, str, str | None]]]:
    """(hub or folder models, open_clip (stage, model, pretrained)) of the stages the
    build graph runs (:func:`pipeline.graph.build_steps`); an open_clip model given by
    its own config file (``clip_config``) is not checked."""
    from pipeline.graph import build_steps

    stages = {step.name for step in build_steps(cfg, "")}
    needs: list[_Need] = []
    clips: list[tuple[str, str, str | None]] = []
    for stage, clip in (("aesthetic", cfg.aesthetic), ("agreement", cfg.agreement)):
        if stage in stages and not clip.clip_config:
            clips.append((stage, clip.clip_model, clip.clip_pretrained))
    if "aesthetic" in stages and cfg.aesthetic.head:
        needs.append(_Need("aesthetic.head", cfg.aesthetic.head, "", file=True))
    if "caption" in stages:
        needs.append(_Need("caption.model", cfg.caption.model, "config.json"))
    needs.append(
        _Need("encode.vae", cfg.encode.vae, "config.json", subfolder=cfg.encode.vae_subfolder)
    )
    if "text_encode" in stages:
        needs.append(_Need("text_encode.model", cfg.text_encode.model, "config.json"))
    return needs, clips


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).expanduser().exists()


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here (None: it can, or a proxy decides). One
    TCP connection with a short timeout, so that an offline machine is told at once
    rather than after the hub client's retries."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=5).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def _hub_file_problem(
    repo: str, filename: str, subfolder: str | None, unreachable: str | None
) -> str | None:
    """Why ``filename`` of the hub repo ``repo`` is neither cached nor downloadable."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if "://" in repo:
        return (
            "a URI: models load from a local folder or a Hugging Face hub id; "
            "copy the model to a local folder first"
        )
    path = f"{subfolder}/{filename}" if subfolder else filename
    try:
        if isinstance(try_to_load_from_cache(repo, path), str):
            return None
    except HFValidationError:
        return "no such folder here, nor a Hugging Face hub id (NAME or NAMESPACE/NAME)"
    fetch = "download it first (`hf download ID`) or give a local folder"
    if _offline():
        return f"not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; {fetch}"
    if unreachable:
        return f"not in the local Hugging Face cache, and the hub cannot be reached ({unreachable}); {fetch}"
    try:
        hf_hub_download(repo, filename, subfolder=subfolder)
    except GatedRepoError:
        return "a gated model: accept its licence on the hub and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face hub (or it is private): check the id"
    except EntryNotFoundError as e:
        if not isinstance(e, LocalEntryNotFoundError):
            return f"the hub repository has no {path}"
        cause = _first_line(e)  # the hub did not answer
        return f"not in the local Hugging Face cache, and fetching it failed ({cause}); {fetch}"
    except Exception as e:  # refused connection, timeout, a proxy's error
        cause = _first_line(e)
        return f"not in the local Hugging Face cache, and fetching it failed ({cause}); {fetch}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _problem(need: _Need, unreachable: str | None) -> str | None:
    if need.file:
        path = Path(need.ref).expanduser()
        return None if path.is_file() else f"no such file {path}"
    if _looks_local(need.ref):
        folder = Path(need.ref).expanduser()
        if need.subfolder:
            folder = folder / need.subfolder
        if not folder.is_dir():
            return f"no such folder {folder}"
        if not (folder / need.filename).is_file():
            return f"{folder} has no {need.filename}: not a saved model"
        return None
    return _hub_file_problem(need.ref, need.filename, need.subfolder, unreachable)


def _clip_problem(model: str, pretrained: str | None, unreachable: str | None) -> str | None:
    import open_clip

    if model not in open_clip.list_models():
        return f"open_clip has no model {model!r} (give its config with clip_config)"
    if pretrained is None:
        return None
    if _looks_local(pretrained):
        path = Path(pretrained).expanduser()
        return None if path.is_file() else f"no such checkpoint file {path}"
    pretrained_cfg: dict[str, Any] = open_clip.get_pretrained_cfg(model, pretrained)
    if not pretrained_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        return f"open_clip has no pretrained tag {pretrained!r} for {model} (known: {tags})"
    hub = str(pretrained_cfg.get("hf_hub") or "").strip("/")
    if not hub:
        return None  # fetched from a URL by open_clip itself: not checked here
    weights = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(hub, w), str) for w in weights):
        return None
    return _hub_file_problem(hub, "open_clip_config.json", None, unreachable)


def model_problem(ref: str, filename: str = "config.json") -> str | None:
    """Why the model ``ref`` (hub id or local folder) cannot be loaded from here, or None:
    a missing folder, a folder without ``filename``, a hub model neither cached nor
    downloadable."""
    unreachable = None if _offline() or _looks_local(ref) else _hub_unreachable()
    return _problem(_Need("", ref, filename), unreachable)


def model_problems(cfg: BuildConfig) -> list[str]:
    """One line per model of the build that cannot be loaded from here, naming the
    setting, the model and why (empty: every one can)."""
    needs, clips = _needs(cfg)
    problems = []
    unreachable = None if _offline() else _hub_unreachable()
    for need in needs:
        why = _problem(need, unreachable)
        if why:
            problems.append(f"{need.setting} {need.ref!r}: {why}")
    for stage, model, pretrained in clips:
        why = _clip_problem(model, pretrained, unreachable)
        if why:
            problems.append(f"{stage}.clip_model {model!r} ({pretrained}): {why}")
    return problems


def check_models(cfg: BuildConfig) -> None:
    """Raise :class:`ModelUnavailable` listing :func:`model_problems`, unless
    ``ray.check_models`` is off."""
    if not cfg.ray.check_models:
        return
    problems = model_problems(cfg)
    if problems:
        raise ModelUnavailable(
            "models the build needs cannot be loaded:\n  "
            + "\n  ".join(problems)
            + "\n(set ray.check_models: false if the workers see models this machine cannot)"
        )
