"""Which weights a pretrained model folder holds: one SHA-256 over its weight files.

A corpus's latents and caption embeddings are only as consistent as the weights that
made them; two models with one config (a fine-tuned VAE, another checkpoint of a text
encoder) have the same shape and class, so only their weights tell them apart. The
digest is the manifest's ``weights_sha256``: a build that resumes a corpus with other
weights is refused, and one whose model folder merely moved is not.

A file in a Hugging Face cache is read for free: the cache names each large (LFS) file
by its SHA-256. Any other file is read once (about a second per GB) and its digest kept
in ``$REELPACK_CACHE/sha256.json`` (default ``~/.cache/reelpack``) under its path, size
and modification time, so a build that starts again does not read a 20 GB text encoder
again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "WEIGHT_SUFFIXES",
    "check_weights",
    "file_sha256",
    "model_folder",
    "other_weights",
    "weight_files",
    "weights_sha256",
]

# What from_pretrained (transformers, diffusers) loads weights from; when a folder has
# .safetensors files they are the ones loaded, so only they count.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20
_MEMO_MIN_BYTES = 16 << 20  # smaller files are read again: cheaper than a memo entry


def model_folder(name_or_path: str, subfolder: str | None = None) -> Path | None:
    """The local folder ``from_pretrained(name_or_path, subfolder=...)`` loads from: the
    path itself, or a hub id's snapshot in the local Hugging Face cache; None when the
    model is not on this machine (nothing is downloaded)."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        folder = local / (subfolder or "")
        return folder if folder.is_dir() else None
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(name_or_path, local_files_only=True)
    except (OSError, ValueError):  # not cached here; not a hub id at all
        return None
    folder = Path(snapshot) / (subfolder or "")
    return folder if folder.is_dir() else None


def weight_files(folder: Path) -> list[Path]:
    """The weight files directly in ``folder`` that from_pretrained reads, by name: the
    ``.safetensors`` ones when there are any, and not a precision variant's
    (``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``) beside the
    default files, which from_pretrained loads unless asked for a variant: a folder
    downloaded whole and one that from_pretrained filled hold the same model."""
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES)
    )
    safetensors = [p for p in files if p.name.lower().endswith(".safetensors")]
    chosen = safetensors or files
    default = [p for p in chosen if p.name.count(".") == 1]  # name.suffix, no variant
    return default or chosen


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes; a Hugging Face cache link's blob name when it is
    one (the cache stores a large file once, under its SHA-256); for a large file read
    before with the same size and modification time, the digest kept then."""
    if path.is_symlink():
        target = path.resolve()
        if _SHA256_NAME.fullmatch(target.name) and target.parent.name == "blobs":
            return target.name
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    key = str(path.resolve())
    memo = _read_memo() if st.st_size >= _MEMO_MIN_BYTES else {}
    known = memo.get(key)
    if isinstance(known, list) and known[:2] == stamp and isinstance(known[2], str):
        return known[2]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if st.st_size >= _MEMO_MIN_BYTES:
        _write_memo({**memo, key: [*stamp, digest.hexdigest()]})
    return digest.hexdigest()


def _memo_path() -> Path:
    root = os.environ.get("REELPACK_CACHE") or "~/.cache/reelpack"
    return Path(root).expanduser() / "sha256.json"


def _read_memo() -> dict[str, Any]:
    """The kept digests; empty when there are none or the file is not readable JSON."""
    try:
        memo = json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(memo: dict[str, Any]) -> None:
    """Replace the memo file whole (another process sees the old or the new one); a
    cache that cannot be written only costs reading the file again next time."""
    path = _memo_path()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sha256-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def weights_sha256(name_or_path: str, subfolder: str | None = None) -> str | None:
    """One SHA-256 over the names and contents of a model's weight files; None when the
    model's files are not on this machine or its folder holds no weight file."""
    folder = model_folder(name_or_path, subfolder)
    if folder is None:
        return None
    files = weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def other_weights(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two manifest entries (``vae``, ``text_encoder``) name other weights: both
    have a digest and the digests differ. One without (a manifest written before digests
    were kept, or by a machine without the model's files) tells nothing."""
    return bool(a.get("weights_sha256") and b.get("weights_sha256")) and (
        a["weights_sha256"] != b["weights_sha256"]
    )


def check_weights(
    entry: Mapping[str, Any], what: str, name_or_path: str, subfolder: str | None = None
) -> None:
    """Raise ValueError when a manifest entry's ``weights_sha256`` is not the digest of
    the weights at ``name_or_path``; an entry without one (a corpus made before digests
    were kept) and a model whose files are not on this machine pass."""
    want = entry.get("weights_sha256")
    if not want:
        return
    got = weights_sha256(name_or_path, subfolder)
    if got is not None and got != want:
        where = f"{name_or_path!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise ValueError(
            f"{what} at {where} has other weights than the corpus was built with "
            f"(weights sha256 {got[:16]}..., the manifest says {want[:16]}...)"
        )
