"""The corpus store: ``reelpack inspect`` on good and damaged corpora, and builds that are
SIGKILLed mid-write then resumed, locally and on SeaweedFS, equal an uninterrupted build.

The crash tests run ``reelpack build`` as a subprocess and kill it with the writer's
test hook ``REELPACK_TEST_KILL_AFTER=<event>[:<n>]`` (see ``pipeline.writer``): the
process SIGKILLs itself right after that write, which is the worst moment for each
step of a commit. They are few builds (each starts Ray) and marked ``slow``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from test_interop import _rows

import schemas
from pipeline.inspect import inspect_corpus
from pipeline.stages.base import rows_to_batch
from pipeline.storage import is_s3, split_s3
from pipeline.writer import (
    KILL_ENV,
    CorpusWriter,
    WriteConfig,
    read_index,
    read_sources,
    rewrite_sources_rows,
)

# --- inspect ---------------------------------------------------------------------------------
TEXT_ENCODER = {"id": "tiny-t5", "class": "T5EncoderModel", "dim": 8}


def _make(root: str) -> str:
    writer = CorpusWriter(root, WriteConfig(shard_max_samples=2), ("c0ffee", {"preset": "tiny"}))
    writer.add(rows_to_batch(_rows(), columns=schemas.STREAM_COLUMNS))
    writer.close()
    writer.write_manifest(
        {
            "vae": {"id": "tiny", "latent_channels": 4},
            "patch_size": [1, 2, 2],
            "text_encoder": TEXT_ENCODER,  # the width of _rows' text_embeds
        }
    )
    writer.unlock()
    return root


@pytest.fixture
def good(tmp_path: Path) -> str:
    return _make(str(tmp_path / "good"))


def _damaged(good: str, tmp_path: Path) -> Path:
    copy = tmp_path / "damaged"
    shutil.copytree(good, copy)
    return copy


def _rewrite_tar(path: Path, keep: Any = lambda info: True, extra: list | None = None) -> None:
    tmp = path.with_suffix(".new")
    with tarfile.open(path) as tin, tarfile.open(tmp, "w") as tout:
        for info in tin.getmembers():
            if keep(info):
                tout.addfile(info, tin.extractfile(info))
        for name, data in extra or []:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def test_inspect_passes_on_a_good_corpus(good: str) -> None:
    report = inspect_corpus(good)
    assert report.ok, report.problems
    assert report.stats["clips_kept"] == 4 and report.stats["samples"] == 4
    assert report.stats["shards_read"] == report.stats["shards"] == 2
    assert report.stats["build_configs"] == 1


def test_inspect_passes_on_s3(s3_bucket: str) -> None:
    report = inspect_corpus(_make(s3_bucket))
    assert report.ok, report.problems
    assert report.stats["samples"] == 4


def test_inspect_after_refilter_counts_stale_samples(good: str) -> None:
    rows = {r["clip_id"]: r for r in read_index(good).to_pylist()}
    rewrite_sources_rows(good, {"/videos/v0.mp4": [dict(rows["clip00"], status="rejected")]})
    # new decisions, same lineage: the source still names the config that built it
    assert {r["config_hash"] for r in read_sources(good).to_pylist()} == {"c0ffee"}
    with open(os.path.join(good, schemas.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    with CorpusWriter(good) as writer:
        writer.write_manifest({k: manifest[k] for k in ("vae", "patch_size", "text_encoder")})
    report = inspect_corpus(good)
    assert report.ok, report.problems
    assert report.stats["stale_samples"] == 1 and report.stats["superseded_rows"] == 1


def _shard_of(root: Path, key: str) -> Path:
    row = next(r for r in read_index(str(root)).to_pylist() if r["key"] == key)
    return root / row["shard"]


_DAMAGE = {
    "missing shard": (
        lambda c: _shard_of(c, "clip00").unlink(),
        ["shards/shard-000000.tar: missing: the samples of 2 kept clip(s) are lost"],
    ),
    "truncated shard": (
        lambda c: os.truncate(_shard_of(c, "clip00"), 700),
        ["shards/shard-000000.tar: unreadable tar (", "): the samples of 2 kept clip(s) are lost"],
    ),
    "missing sample": (
        lambda c: _rewrite_tar(_shard_of(c, "clip03"), lambda i: not i.name.startswith("clip03")),
        ["clip03 is not in the shard"],
    ),
    "orphan member": (
        lambda c: _rewrite_tar(
            _shard_of(c, "clip00"),
            extra=[(f"ghost.{s}", b"{}") for s in ("latents.safetensors", "json", "txt")],
        ),
        ["ghost: orphan sample"],
    ),
    "pickle member": (
        lambda c: _rewrite_tar(_shard_of(c, "clip00"), extra=[("clip00.pyd", b"\x80\x04.")]),
        ["'clip00.pyd' would need unpickling"],
    ),
    "path traversal": (
        lambda c: _rewrite_tar(_shard_of(c, "clip00"), extra=[("../clip00.txt", b"x")]),
        ["unsafe member name '../clip00.txt'"],
    ),
    "wrong latent shape": (
        lambda c: _swap_latents(c, "clip01", "clip04"),
        ["tensor 'latents' is BF16 [4, 5, 4, 6], index says BF16 [4, 2, 4, 6]"],
    ),
    "manifest counts": (
        lambda c: _edit_manifest(c, lambda m: m["counts"].update(clips_kept=99)),
        ["counts.clips_kept is 99, the index gives 4"],
    ),
    "text encoder of another width": (
        lambda c: _edit_manifest(c, lambda m: m.update(text_encoder={**TEXT_ENCODER, "dim": 16})),
        ["clip00: tensor 'text_embeds' is [5, 8], the manifest's text encoder gives [L, 16]"],
    ),
    "no text encoder": (
        lambda c: _edit_manifest(c, lambda m: m.update(text_encoder=None)),
        ["clip00: holds 'text_embeds' but manifest.json names no text_encoder"],
    ),
    "text encoder without a width": (
        lambda c: _edit_manifest(c, lambda m: m.update(text_encoder={"id": "t5"})),
        ["text_encoder has no embedding width (dim)"],
    ),
    "missing build config": (
        lambda c: (c / "configs" / "c0ffee.json").unlink(),
        ["sources built with config c0ffee: configs/c0ffee.json is missing"],
    ),
    "uncommitted leftover": (
        lambda c: (c / "index" / "part-000009.parquet").write_bytes(
            (c / "index" / "part-000000.parquet").read_bytes()
        ),
        ["index part 000009 is not committed"],
    ),
}


def _swap_latents(root: Path, a: str, b: str) -> None:
    """Give sample ``a`` the latents of sample ``b`` (another shape)."""
    blob = None
    with tarfile.open(_shard_of(root, b)) as tar:
        blob = tar.extractfile(f"{b}.latents.safetensors").read()  # type: ignore[union-attr]
    path = _shard_of(root, a)
    _rewrite_tar(
        path, lambda i: i.name != f"{a}.latents.safetensors", [(f"{a}.latents.safetensors", blob)]
    )


def _edit_manifest(root: Path, edit: Any) -> None:
    path = root / schemas.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_inspect_fails_on_a_damaged_copy(good: str, tmp_path: Path, damage: str) -> None:
    copy = _damaged(good, tmp_path)
    apply, expected = _DAMAGE[damage]
    apply(copy)
    report = inspect_corpus(str(copy))
    assert not report.ok
    for text in expected:
        assert any(text in p for p in report.problems), report.problems


def test_commands_name_a_manifest_that_is_not_json(good: str) -> None:
    from pipeline.refilter import built_config
    from pipeline.report import render_report

    (Path(good) / schemas.MANIFEST_NAME).write_text('{"vae": ')
    for read in (built_config, render_report):
        with pytest.raises(ValueError, match=r"manifest.json: the corpus manifest is not JSON"):
            read(good)


def test_inspect_command(good: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reelpack.cli import main

    assert main(["inspect", good]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    copy = _damaged(good, tmp_path)
    _edit_manifest(copy, lambda m: m["counts"].update(shards=7))
    assert main(["inspect", str(copy), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and any("counts.shards" in p for p in out["problems"])


# --- kill a real build mid-write, resume, compare ------------------------------------------------
@pytest.fixture(scope="module")
def build_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """Four small videos (one broken) and a tiny-preset config with one sample per shard."""
    from pipeline.config import load_config
    from pipeline.synth import synth_video

    root = tmp_path_factory.mktemp("resume-inputs")
    specs = {
        "landscape.mp4": (192, 108, [30, 30]),
        "portrait.mp4": (90, 160, [36]),
        "square.mp4": (128, 128, [24, 24]),
    }
    videos = []
    for i, (name, (w, h, shots)) in enumerate(specs.items()):
        synth_video(str(root / name), width=w, height=h, fps=12.0, shots=shots, seed=i)
        videos.append(str(root / name))
    (root / "broken.mp4").write_bytes(b"not a video")
    videos.append(str(root / "broken.mp4"))
    cache = root / "models"
    config = {
        "preset": "tiny",
        "model_cache": str(cache),
        "split": {"min_clip_s": 1.0, "max_clip_s": 3.0},
        "write": {"shard_max_samples": 1},
        "ray": {"num_cpus": 2},
    }
    cfg_path = root / "build.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    load_config(str(cfg_path))  # builds the tiny models once, before the timed builds
    return videos, str(cfg_path)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """One Ray head node for this module's builds, as on a cluster: each build is a job
    of it, a killed build's driver leaves the cluster up, and the next build joins it
    instead of starting a Ray of its own."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False}
    )
    try:
        yield cluster.address
    finally:
        cluster.shutdown()


def _build(
    videos: list[str], out: str, config: str, kill: str | None, log: Path, address: str
) -> int:
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if kill:
        env[KILL_ENV] = kill
    cmd = [
        sys.executable,
        "-m",
        "reelpack.cli",
        "-v",
        "build",
        *videos,
        "--out",
        out,
        "--config",
        config,
        "--ray-address",
        address,
    ]
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = proc.wait(timeout=600)
        finally:
            # anything this build started shares its process group: end it too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return code


def _snapshot(root: str, tmp_path: Path) -> dict[str, Any]:
    """The corpus content that must not depend on kills: per clip, everything but the shard."""
    local = Path(_local_copy(root, tmp_path))
    rows = {r["clip_id"]: r for r in read_index(str(local)).to_pylist()}
    samples: dict[str, tuple[str, str, str]] = {}
    scores: dict[str, dict[str, Any]] = {}
    for path in sorted((local / schemas.SHARDS_DIR).glob("*.tar")):
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                key, _, suffix = info.name.partition(".")
                if suffix == schemas.SAMPLE_META:
                    meta = json.loads(data)
                    # model scores are compared with a tolerance below: CLIP runs batched,
                    # and a resumed build batches clips differently (float rounding)
                    scores[key] = {k: v for k, v in meta.items() if k.startswith("score_")}
                    data = json.dumps(
                        {k: v for k, v in meta.items() if k != "shard" and k not in scores[key]}
                    ).encode()
                digest = hashlib.sha256(data).hexdigest()
                entry = samples.setdefault(key, ("", "", ""))
                i = (schemas.SAMPLE_LATENTS, schemas.SAMPLE_META, schemas.SAMPLE_CAPTION).index(
                    suffix
                )
                assert entry[i] == "", f"{key}.{suffix} twice"  # no duplicates anywhere
                samples[key] = (*entry[:i], digest, *entry[i + 1 :])  # type: ignore[assignment]
    clips = {cid: {k: v for k, v in r.items() if k != "shard"} for cid, r in rows.items()}
    return {"clips": clips, "samples": samples, "scores": scores, "local": str(local)}


def _local_copy(root: str, tmp_path: Path) -> str:
    if not is_s3(root):
        return root
    import boto3

    bucket, prefix = split_s3(root)
    s3 = boto3.client("s3")
    dest = tmp_path / f"fetched-{prefix.replace('/', '_')}"
    shutil.rmtree(dest, ignore_errors=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out = dest / obj["Key"][len(prefix) + 1 :]
            out.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(out))
    return str(dest)


def _assert_only_leftovers(root: str) -> None:
    """A killed corpus: readers see complete sources only; inspect flags just the leftovers."""
    rows = read_index(root).to_pylist()
    assert len({r["clip_id"] for r in rows}) == len(rows)
    report = inspect_corpus(root)
    allowed = ("not committed", "no committed parts", schemas.MANIFEST_NAME)
    assert all(any(a in p for a in allowed) for p in report.problems), report.problems


@pytest.fixture(scope="module")
def reference(build_inputs, ray_head, tmp_path_factory) -> dict[str, Any]:
    videos, config = build_inputs
    tmp = tmp_path_factory.mktemp("reference")
    root = str(tmp / "corpus")
    assert _build(videos, root, config, None, tmp / "log", ray_head) == 0, (
        tmp / "log"
    ).read_text()[-3000:]
    snap = _snapshot(root, tmp)
    kept = [c for c in snap["clips"].values() if c["status"] == "kept"]
    assert len(kept) >= 3, "the reference build must write several shards"
    assert set(snap["samples"]) == {c["key"] for c in kept}
    assert inspect_corpus(root).ok
    return snap


def _assert_same(snap: dict[str, Any], reference: dict[str, Any]) -> None:
    assert sorted(snap["clips"]) == sorted(reference["clips"])  # same clips, none lost
    for cid, clip in reference["clips"].items():
        got = snap["clips"][cid]
        for k in (
            "status",
            "key",
            "caption",
            "latent_shape",
            "num_tokens",
            "encode_width",
            "encode_height",
            "encode_frames",
        ):
            assert got[k] == clip[k], (cid, k)
    assert snap["samples"] == reference["samples"]  # same bytes: latents, metadata, caption
    assert snap["scores"].keys() == reference["scores"].keys()
    for key, ref in reference["scores"].items():
        got = snap["scores"][key]
        assert got.keys() == ref.keys()
        for name, value in ref.items():
            if value is None:
                assert got[name] is None, (key, name)
            else:
                assert got[name] == pytest.approx(value, rel=1e-3, abs=1e-4), (key, name)


@pytest.mark.slow
def test_local_build_killed_twice_resumes_to_the_same_corpus(
    build_inputs, reference, ray_head, tmp_path
) -> None:
    videos, config = build_inputs
    root = str(tmp_path / "corpus")
    log = tmp_path / "log"
    # 1: killed right after the first shard reached its final name, before its index part
    assert _build(videos, root, config, "shard:1", log, ray_head) == -signal.SIGKILL, (
        log.read_text()[-3000:]
    )
    assert os.listdir(os.path.join(root, schemas.SHARDS_DIR))  # the shard is there...
    assert read_index(root).num_rows == 0  # ...but not visible
    _assert_only_leftovers(root)
    # 2: resumed, then killed after its second index part, before that part's commit marker
    assert _build(videos, root, config, "index:2", log, ray_head) == -signal.SIGKILL, (
        log.read_text()[-3000:]
    )
    done = {
        Path(s).name
        for s in pq.read_table(os.path.join(root, "sources")).column("source").to_pylist()
    }
    assert done and len(done) < len(videos)  # some sources committed, others not
    _assert_only_leftovers(root)
    # 3: resumed to the end
    assert _build(videos, root, config, None, log, ray_head) == 0, log.read_text()[-3000:]
    assert inspect_corpus(root).ok, inspect_corpus(root).problems
    _assert_same(_snapshot(root, tmp_path), reference)


@pytest.mark.slow
def test_interrupted_build_commits_what_is_complete_then_resumes(
    build_inputs, reference, ray_head, tmp_path
) -> None:
    """Ctrl-C (SIGINT, here sent while the writer is busy with the first sample) stops
    the build at the next safe point: complete sources are committed although their
    shard is far from full, nothing half-written is left, and a resume finishes the
    same corpus."""
    videos, config = build_inputs
    big_shards = tmp_path / "build.yaml"
    cfg = yaml.safe_load(Path(config).read_text())
    cfg["write"] = {"shard_max_samples": 1000}  # without the stop, nothing would commit
    big_shards.write_text(yaml.safe_dump(cfg))
    root = str(tmp_path / "corpus")
    log = tmp_path / "log"
    assert _build(videos, root, str(big_shards), "sample:1:INT", log, ray_head) == 130, (
        log.read_text()[-3000:]
    )
    assert "interrupted (SIGINT)" in log.read_text()
    done = read_index(root).to_pylist()
    assert done and len({r["source"] for r in done}) < len(videos)
    report = inspect_corpus(root)
    assert report.ok, report.problems  # a clean stop: no leftovers, manifest up to date
    summary = json.loads(Path(root, "summary.json").read_text())
    assert summary["interrupted"] == "SIGINT"
    assert _build(videos, root, str(big_shards), None, log, ray_head) == 0, log.read_text()[-3000:]
    assert inspect_corpus(root).ok
    _assert_same(_snapshot(root, tmp_path), reference)


def test_stop_signals_wait_for_the_writer() -> None:
    """The first SIGINT/SIGTERM stops the loop at once, or after the write in progress;
    a second SIGINT is a KeyboardInterrupt."""
    from pipeline.graph import _Stop, _StopSignals

    with pytest.raises(_Stop, match="SIGTERM"), _StopSignals():
        signal.raise_signal(signal.SIGTERM)
    with _StopSignals() as stop:
        stop.writing = True
        signal.raise_signal(signal.SIGINT)  # deferred: the write goes on
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        stop.writing = False
        with pytest.raises(_Stop):
            stop.check()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


@pytest.mark.slow
def test_s3_build_killed_resumes_to_the_same_corpus_and_leaks_no_keys(
    build_inputs, reference, ray_head, s3_server, s3_bucket, tmp_path
) -> None:
    videos, config = build_inputs
    root = f"{s3_bucket}/corpus"
    log = tmp_path / "log"
    assert _build(videos, root, config, "sources:2", log, ray_head) == -signal.SIGKILL, (
        log.read_text()[-3000:]
    )
    assert read_index(root).num_rows > 0
    _assert_only_leftovers(root)
    assert _build(videos, root, config, None, log, ray_head) == 0, log.read_text()[-3000:]
    report = inspect_corpus(root)
    assert report.ok, report.problems
    snap = _snapshot(root, tmp_path)
    _assert_same(snap, reference)
    # No credential in anything the build wrote or printed.
    secrets = [s3_server.access_key.encode(), s3_server.secret_key.encode()]
    files = [p for p in Path(snap["local"]).rglob("*") if p.is_file()] + [log]
    assert len(files) > 5
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{secret!r} leaked into {path}"
    with tarfile.open(next(Path(snap["local"]).rglob("*.tar"))) as tar:
        for info in tar.getmembers():
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            assert all(s not in data for s in secrets)
