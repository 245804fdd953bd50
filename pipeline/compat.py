"""Whether a build may add to an existing corpus, from the corpus's ``manifest.json``.

A corpus holds the latents of one VAE at one patch size: the trainer normalises every
sample with the manifest's single VAE description, so latents of another VAE (another
class, architecture or normalisation) or patch size would train silently wrong. Its
caption embeddings come from one text encoder, whose width sizes the DiT's
cross-attention. :func:`check_resume` refuses a build that would mix either: another
class, config or width, or other weights where both manifests have their digest
(``weights_sha256``; a model folder that merely moved keeps it). Other
settings may change between runs (a resume with new thresholds, more actors, another
device); the ones that change what is stored are listed, since committed sources keep
what their run made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.fingerprint import other_weights

__all__ = ["CorpusMismatch", "check_resume", "config_changes"]

# What makes two VAE descriptions (model.vae.VideoVAE.describe) encode alike.
_VAE_IDENTITY = (
    "class",
    "config_sha256",
    "latent_channels",
    "spatial_factor",
    "temporal_factor",
    "frame_rule",
    "normalization",
)
# What makes two text encoder descriptions (model.text.describe_text_encoder) alike
# enough for one DiT: its cross-attention takes one embedding width from one model class.
_TEXT_IDENTITY = ("class", "dim")
# Settings that change how a build runs, not what it stores.
_RUNTIME = (
    "ray",
    "model_cache",
    "split.decoder",
    "split.flush_mib",
    "split.timeout_s",
    "split.transnet_device",
    "write.commit_interval_s",
    "write.part_max_rows",
    "write.shard_max_bytes",
    "write.shard_max_samples",
)
_RUNTIME_NAMES = ("device", "batch_size")


class CorpusMismatch(ValueError):
    """The corpus at ``--out`` holds latents this build's VAE or patch size cannot add to."""


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def _runtime(path: str) -> bool:
    return (
        any(path == r or path.startswith(r + ".") for r in _RUNTIME)
        or path.rsplit(".", 1)[-1] in _RUNTIME_NAMES
    )


def config_changes(built: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Dotted config keys whose value differs and that change what a build stores."""
    old, new = _flat(built), _flat(now)
    return sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not _runtime(k)
    )


def _differ(old: Mapping[str, Any], new: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    differ = [k for k in keys if old.get(k) != new.get(k)]
    if other_weights(old, new):
        differ.append("weights_sha256")
    return differ


def check_resume(root: str, manifest: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """Raise :class:`CorpusMismatch` when ``run`` (this build's manifest fields: ``vae``,
    ``patch_size``, ``text_encoder``, ``config``) cannot add to the corpus ``manifest``
    describes; else the config keys that changed since it was built."""
    old_vae, new_vae = manifest.get("vae") or {}, run.get("vae") or {}
    differ = _differ(old_vae, new_vae, _VAE_IDENTITY)
    if list(manifest.get("patch_size") or []) != list(run.get("patch_size") or []):
        differ.append("patch_size")
    if differ:
        raise CorpusMismatch(
            f"{root} holds latents of another VAE or patch size ({', '.join(differ)} differ: "
            f"the corpus has {old_vae.get('class')} {old_vae.get('id')!r}, patch "
            f"{manifest.get('patch_size')}; this build has {new_vae.get('class')} "
            f"{new_vae.get('id')!r}, patch {run.get('patch_size')}). Build into a new --out"
        )
    old_text, new_text = manifest.get("text_encoder"), run.get("text_encoder")
    if old_text and new_text:
        differ = _differ(old_text, new_text, _TEXT_IDENTITY)
        if differ:
            raise CorpusMismatch(
                f"{root} holds caption embeddings of another text encoder ({', '.join(differ)} "
                f"differ: the corpus has {old_text.get('class')} {old_text.get('id')!r}, "
                f"{old_text.get('dim')}-d; this build has {new_text.get('class')} "
                f"{new_text.get('id')!r}, {new_text.get('dim')}-d). Build into a new --out"
            )
    return config_changes(manifest.get("config") or {}, run.get("config") or {})
