"""A model's weights digest: what a corpus manifest's ``weights_sha256`` is, read from a
folder or from the Hugging Face cache without reading the cached files."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from model.fingerprint import (
    check_weights,
    file_sha256,
    model_folder,
    other_weights,
    weight_files,
    weights_sha256,
)


def _folder(root: Path, **files: bytes) -> Path:
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name.replace("__", ".")).write_bytes(data)
    return root


def test_the_digest_covers_the_weight_files_from_pretrained_reads(tmp_path: Path) -> None:
    a = _folder(tmp_path / "a", config__json=b"{}", model__safetensors=b"w" * 100)
    digest = weights_sha256(str(a))
    assert digest is not None and len(digest) == 64
    # a copy elsewhere is the same model; another config with the same weights too (the
    # config is compared on its own)
    b = Path(shutil.copytree(a, tmp_path / "b"))
    (b / "config.json").write_text('{"other": 1}')
    assert weights_sha256(str(b)) == digest
    # one changed byte is other weights
    (b / "model.safetensors").write_bytes(b"w" * 99 + b"x")
    assert weights_sha256(str(b)) != digest
    # .safetensors files are the ones loaded when a folder also has .bin ones
    (a / "pytorch_model.bin").write_bytes(b"pickled")
    assert [p.name for p in weight_files(a)] == ["model.safetensors"]
    assert weights_sha256(str(a)) == digest
    c = _folder(tmp_path / "c", pytorch_model__bin=b"pickled", config__json=b"{}")
    assert [p.name for p in weight_files(c)] == ["pytorch_model.bin"]
    # a sharded model: every shard counts, in name order
    d = _folder(tmp_path / "d", **{"model-00001-of-00002__safetensors": b"1"})
    one = weights_sha256(str(d))
    (d / "model-00002-of-00002.safetensors").write_bytes(b"2")
    two = weights_sha256(str(d))
    assert two not in (None, one)
    # a precision variant beside the default files (a repository downloaded whole) is
    # not what from_pretrained loads; a folder of variants only is taken as it is
    (d / "model.fp16-00001-of-00001.safetensors").write_bytes(b"half")
    (a / "model.fp16.safetensors").write_bytes(b"half")
    assert weights_sha256(str(d)) == two and weights_sha256(str(a)) == digest
    e = _folder(tmp_path / "e", **{"model__fp16__safetensors": b"half"})
    assert [p.name for p in weight_files(e)] == ["model.fp16.safetensors"]


def test_subfolders_and_models_not_on_this_machine(tmp_path: Path) -> None:
    _folder(tmp_path / "pipe" / "vae", diffusion_pytorch_model__safetensors=b"v")
    assert weights_sha256(str(tmp_path / "pipe"), "vae") == weights_sha256(
        str(tmp_path / "pipe" / "vae")
    )
    assert weights_sha256(str(tmp_path / "pipe")) is None  # no weight file at its top
    assert weights_sha256(str(tmp_path / "pipe"), "text_encoder") is None
    assert model_folder(str(tmp_path / "missing")) is None
    assert weights_sha256("no-such-org/no-such-model") is None  # not cached: no download
    assert weights_sha256("not a hub id //") is None


def _hub_cache(cache: Path, repo: str, blob_name: str, data: bytes) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays one out: the file's bytes in
    ``blobs/`` under its SHA-256, linked from a snapshot that ``refs/main`` names."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "blobs").mkdir(parents=True)
    (entry / "blobs" / blob_name).write_bytes(data)
    (entry / "refs").mkdir()
    revision = "0" * 40
    (entry / "refs" / "main").write_text(revision)
    snapshot = entry / "snapshots" / revision
    snapshot.mkdir(parents=True)
    os.symlink(f"../../blobs/{blob_name}", snapshot / "model.safetensors")
    return snapshot


def test_a_hub_model_in_the_local_cache_is_digested_from_its_blob_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # where from_pretrained and snapshot_download look (read from HF_HUB_CACHE at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = b"weights"
    real = hashlib.sha256(data).hexdigest()
    snapshot = _hub_cache(tmp_path / "hub", "org/model", real, data)
    assert model_folder("org/model") == snapshot
    assert file_sha256(snapshot / "model.safetensors") == real
    # the name is taken as the digest, not the bytes read: a blob named by another digest
    # gives that digest
    named = "ab" * 32
    other = _hub_cache(tmp_path / "hub", "org/named", named, data)
    assert file_sha256(other / "model.safetensors") == named
    # the same bytes in a plain folder give the same model digest as the cached copy
    plain = _folder(tmp_path / "plain", model__safetensors=data)
    assert weights_sha256("org/model") == weights_sha256(str(plain))
    # a link that is not into a cache's blobs is read
    link = tmp_path / "link.safetensors"
    os.symlink(plain / "model.safetensors", link)
    assert file_sha256(link) == real


def test_check_weights_and_other_weights(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", model__safetensors=b"w")
    entry = {"id": str(folder), "weights_sha256": weights_sha256(str(folder))}
    check_weights(entry, "VAE", str(folder))
    check_weights({"id": str(folder)}, "VAE", str(folder))  # a manifest without a digest
    check_weights(entry, "VAE", str(tmp_path / "gone"))  # files not here: nothing to tell
    (folder / "model.safetensors").write_bytes(b"v")
    with pytest.raises(ValueError, match=r"VAE at '.*m' has other weights .*the manifest says"):
        check_weights(entry, "VAE", str(folder))
    assert other_weights({"weights_sha256": "a"}, {"weights_sha256": "b"})
    assert not other_weights({"weights_sha256": "a"}, {"weights_sha256": "a"})
    assert not other_weights({"weights_sha256": "a"}, {"weights_sha256": None})
    assert not other_weights({}, {"weights_sha256": "b"})


def test_a_large_files_digest_is_kept_under_its_path_size_and_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import model.fingerprint as fingerprint

    monkeypatch.setenv("REELPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "_MEMO_MIN_BYTES", 4)
    memo = tmp_path / "cache" / "sha256.json"
    weights = tmp_path / "m.safetensors"
    weights.write_bytes(b"first")
    first = hashlib.sha256(b"first").hexdigest()
    assert file_sha256(weights) == first
    assert json.loads(memo.read_text())[str(weights.resolve())][2] == first
    # the same size and time: the kept digest (the file is not read again)
    st = weights.stat()
    weights.write_bytes(b"other")
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_sha256(weights) == first
    # another time: read again
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    other = hashlib.sha256(b"other").hexdigest()
    assert file_sha256(weights) == other
    # a memo that is not JSON is read as empty and replaced
    memo.write_text("{")
    assert file_sha256(weights) == other
    assert json.loads(memo.read_text())[str(weights.resolve())][2] == other
    # files below the size are not kept
    monkeypatch.setattr(fingerprint, "_MEMO_MIN_BYTES", 1 << 20)
    small = tmp_path / "small.bin"
    small.write_bytes(b"x")
    assert file_sha256(small) == hashlib.sha256(b"x").hexdigest()
    assert str(small.resolve()) not in json.loads(memo.read_text())
    # a cache that cannot be written (under a file): the digest all the same
    monkeypatch.setenv("REELPACK_CACHE", str(small / "cache"))
    monkeypatch.setattr(fingerprint, "_MEMO_MIN_BYTES", 1)
    assert file_sha256(small) == hashlib.sha256(b"x").hexdigest()
