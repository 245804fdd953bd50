"""End to end on a real local Ray: generated videos -> corpus -> shards -> training steps.

Also the same build to ``s3://`` on a real SeaweedFS, read back with plain webdataset.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
import ray.data
import webdataset as wds
from safetensors.torch import load as load_safetensors

import schemas
from pipeline.config import BuildConfig, config_hash, load_config, to_dict
from pipeline.graph import build, build_steps, run_in_process, stage_labels
from pipeline.inspect import inspect_corpus
from pipeline.synth import synth_video
from pipeline.video import decode_mp4
from pipeline.writer import read_index, read_sources

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    specs = {
        "landscape.mp4": (192, 108, [30, 30]),
        "portrait.mp4": (90, 160, [36]),
        "square.mp4": (128, 128, [24, 24]),
    }
    out = {}
    for i, (name, (w, h, shots)) in enumerate(specs.items()):
        synth_video(str(root / name), width=w, height=h, fps=12.0, shots=shots, seed=i)
        out[name] = root / name
    (root / "broken.mp4").write_bytes(b"this is not a video")
    out["broken.mp4"] = root / "broken.mp4"
    out["photo.jpg"] = root / "photo.jpg"  # a still: a 1-frame clip, kept like any clip
    _photo(out["photo.jpg"])
    return out


def _photo(path: Path) -> None:
    """A 160x120 picture: a sky gradient, a sun and a few buildings, a little noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    y = np.linspace(0, 1, 120)[:, None, None]
    sky = (np.array([70, 120, 200]) * (1 - y) + np.array([200, 210, 230]) * y).repeat(160, 1)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((110, 12, 140, 42), fill=(250, 220, 120))
    for i, (x, h) in enumerate([(10, 50), (40, 80), (75, 60), (120, 70)]):
        draw.rectangle((x, 120 - h, x + 28, 119), fill=(60 + 30 * i, 50 + 20 * i, 70))
    noise = np.random.default_rng(0).normal(0, 4, (120, 160, 3))
    Image.fromarray((np.asarray(image) + noise).clip(0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> BuildConfig:
    cache = tmp_path_factory.mktemp("models")
    return load_config(
        preset="tiny",
        model_cache=str(cache),
        split={"min_clip_s": 1.0, "max_clip_s": 3.0},
        write={"shard_max_samples": 2},
    )


def _check_corpus_tables(root: str, videos: dict[str, Path]) -> list[dict]:
    index = read_index(root)
    assert index.schema.names == list(schemas.CLIP_SCHEMA.names)
    sources = {r["source"]: r for r in read_sources(root).to_pylist()}
    assert set(sources) == {str(p.resolve()) for p in videos.values()}
    broken = sources[str(videos["broken.mp4"].resolve())]
    assert broken["status"] == "error" and "broken.mp4" in broken["error"]
    portrait = sources[str(videos["portrait.mp4"].resolve())]
    assert (portrait["width"], portrait["height"]) == (90, 160)
    # the probe's facts reach the sources table
    assert (portrait["coded_width"], portrait["coded_height"], portrait["rotation_deg"]) == (
        90,
        160,
        0,
    )
    assert portrait["media_kind"] == "video" and portrait["container"].startswith("mov")
    assert portrait["start_s"] == 0.0 and portrait["has_audio"] is False
    rows = index.to_pylist()
    assert rows, "no clips in the index"
    assert len({r["clip_id"] for r in rows}) == len(rows)
    for s, src in sources.items():
        assert sum(r["source"] == s for r in rows) == (src["num_clips"] or 0)
    return rows


def _check_samples(samples: list[dict], rows: list[dict]) -> None:
    kept = {r["key"]: r for r in rows if r["status"] == "kept"}
    assert kept, "nothing kept"
    assert {s["__key__"] for s in samples} == set(kept)
    for s in samples:
        row = kept[s["__key__"]]
        latents = load_safetensors(s[schemas.SAMPLE_LATENTS])[schemas.TENSOR_LATENTS]
        assert list(latents.shape) == row["latent_shape"]
        meta = json.loads(s[schemas.SAMPLE_META])
        assert meta["clip_id"] == row["clip_id"]
        assert s[schemas.SAMPLE_CAPTION].decode() == row["caption"]
        assert row["caption"]
        # native aspect: the encoded size keeps the source's aspect within a few percent
        aspect = row["width"] / row["height"]
        assert abs(row["encode_width"] / row["encode_height"] / aspect - 1) < 0.15


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    exact = ("source", "status", "reasons", "start_frame", "end_frame", "caption", "latent_shape")
    by_id = {r["clip_id"]: r for r in want}
    assert sorted(r["clip_id"] for r in got) == sorted(by_id)
    for row in got:
        other = by_id[row["clip_id"]]
        assert {k: row[k] for k in exact} == {k: other[k] for k in exact}
        for name in schemas.SCORE_NAMES:
            a, b = row[schemas.score_column(name)], other[schemas.score_column(name)]
            assert (a is None) == (b is None) and (
                a is None or a == pytest.approx(b, rel=1e-4, abs=1e-6, nan_ok=True)
            ), name


def test_local_build_then_train(videos, tiny_cfg, tmp_path, capsys) -> None:
    root = str(tmp_path / "corpus")
    live = replace(
        tiny_cfg,
        ray=replace(tiny_cfg.ray, progress_interval_s=0.5),
        write=replace(tiny_cfg.write, clip_files=True),
    )
    summary = build([str(p) for p in videos.values()], root, live)
    assert summary["sources_built"] == 5
    # live progress on stderr: sources and clips, and every stage's rows and rate
    captured = capsys.readouterr()
    err = captured.err
    assert "[build] sources " in err
    # Ray Data's advice on model actors' memory stays out (pipeline.graph.init_ray)
    detectors = ray.data.DataContext.get_current().issue_detectors_config.detectors
    assert "HighMemoryIssueDetector" not in [d.__name__ for d in detectors]
    stage_lines = [line for line in err.splitlines() if line.startswith("[stages] probe ")]
    assert stage_lines and "| encode " in stage_lines[-1], err[-2000:]
    # the closing lines (stdout) show the final per-stage counts
    (closing,) = [line for line in captured.out.splitlines() if line.startswith("[stages]")]
    assert closing.startswith("[stages] probe 5 "), closing
    # exact rows in/out and busy time per stage, fused operators or not
    per = summary["per_stage"]
    assert list(per) == stage_labels(build_steps(live, root))
    assert per["probe"]["rows_in"] == per["split"]["rows_in"] == 5
    clips = per["split"]["rows_out"]
    assert clips >= read_index(root).num_rows
    for stage in list(per)[list(per).index("split") + 1 :]:  # 1:1 after split
        assert per[stage]["rows_in"] == per[stage]["rows_out"] == clips, stage
    assert all(s["batches"] >= 1 for s in per.values()), per
    assert per["split"]["busy_s"] > 0 and per["encode"]["busy_s"] > 0, per
    # every operator of the graph is accounted for, in order, named after its stage
    ops = [s["operator"] for s in summary["stages"]]
    names = ["Probe", "Split", "Score", "AestheticScorer", "Decide", "Dedup", "Captioner"]
    names += ["Agreement", "Encode", "TextEncode"]
    at = [next(i for i, op in enumerate(ops) if name in op) for name in names]
    assert at == sorted(at), ops
    encode = next(s for s in summary["stages"] if "Encode" in s["operator"])
    assert encode["cpu_s"] > 0 and encode["rows_out"] >= read_index(root).num_rows  # + placeholders
    rows = _check_corpus_tables(root, videos)
    for r in rows:
        assert r[schemas.score_column("sharpness")] is not None
        # motion is measured between frames: not for the photo's one
        assert math.isnan(r[schemas.score_column("motion")]) == r["source"].endswith(".jpg")
    # the photo: kept, whatever the motion thresholds (nothing moves in one frame), and
    # stored as a one-frame latent
    (photo,) = [r for r in rows if r["source"].endswith("photo.jpg")]
    assert photo["status"] == "kept" and photo["reasons"] == [], photo["reasons"]
    assert (photo["start_frame"], photo["end_frame"]) == (0, 1)
    assert photo["latent_shape"][1] == 1 and photo[schemas.score_column("sharpness")] > 20
    urls = sorted(str(p) for p in (Path(root) / "shards").glob("*.tar"))
    assert len(urls) >= 2  # shard_max_samples=2 forces a rollover
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    _check_samples(samples, rows)
    manifest = json.loads((Path(root) / schemas.MANIFEST_NAME).read_text())
    assert manifest["schema_version"] == schemas.SCHEMA_VERSION
    assert manifest["random_weights"] is True
    # each source names the config that built it, stored beside the corpus
    assert {r["config_hash"] for r in read_sources(root).to_pylist()} == {config_hash(live)}
    stored = Path(root) / schemas.config_file(config_hash(live))
    assert json.loads(stored.read_text()) == to_dict(live) == manifest["config"]
    assert manifest["counts"]["clips_kept"] == len(samples)
    assert manifest["vae"]["class"] == "AutoencoderKLWan"
    # the samples' caption embeddings come from the encoder the manifest names: the
    # trainer sizes the DiT's cross-attention by it, the sampler encodes prompts with it
    text = manifest["text_encoder"]
    assert (text["id"], text["class"]) == (live.text_encode.model, "UMT5EncoderModel")
    embeds = load_safetensors(samples[0][schemas.SAMPLE_LATENTS])[schemas.TENSOR_TEXT_EMBEDS]
    assert embeds.shape[-1] == text["dim"] == 32
    # the kept clips as files: what encode saw, at its size; nothing else
    kept = [r for r in rows if r["status"] == "kept"]
    assert sorted(p.name for p in (Path(root) / schemas.CLIPS_DIR).iterdir()) == sorted(
        f"{r['key']}.mp4" for r in kept
    )
    for r in kept:
        frames, _ = decode_mp4((Path(root) / schemas.clip_file(r["key"])).read_bytes())
        assert frames.shape[1:3] == (r["encode_src_height"], r["encode_src_width"])
        assert len(frames) > max(r["encode_frame_indices"])
    report = inspect_corpus(root)
    assert report.ok and report.stats["clip_files"] == len(kept), report.problems

    # resume: nothing left to do, the corpus is unchanged
    again = build([str(p) for p in videos.values()], root, tiny_cfg)
    assert again["sources_built"] == 0
    assert read_index(root).num_rows == len(rows)

    # the same steps without Ray give the same rows, split's chunks clip by clip or not
    alone = str(tmp_path / "in-process")
    chunked = replace(tiny_cfg, split=replace(tiny_cfg.split, flush_mib=1e-6))
    run_in_process([str(p) for p in videos.values()], alone, chunked)
    _assert_same_rows(read_index(alone).to_pylist(), rows)

    # the broken file, repaired: a resume leaves its error row be; --retry-errors builds
    # it again, and its rows replace the error
    broken, original = videos["broken.mp4"], videos["broken.mp4"].read_bytes()
    paths = [str(p) for p in videos.values()]
    try:
        synth_video(str(broken), width=96, height=64, fps=12.0, shots=[24, 24], seed=7)
        said: list[str] = []
        assert build(paths, root, tiny_cfg, echo=said.append)["sources_built"] == 0
        assert any("1 sources are errors from earlier runs" in line for line in said), said
        retried = build(paths, root, tiny_cfg, retry_errors=True)
    finally:
        broken.write_bytes(original)
    assert (retried["sources_built"], retried["sources_done"]) == (1, 1), retried
    statuses = {r["source"]: r["status"] for r in read_sources(root).to_pylist()}
    assert statuses[str(broken)] == "done" and set(statuses.values()) == {"done"}
    repaired = [r for r in read_index(root).to_pylist() if r["source"] == str(broken)]
    assert len(repaired) == 2 and all(r["clip_id"] for r in repaired), repaired
    others = [r for r in read_index(root).to_pylist() if r["source"] != str(broken)]
    _assert_same_rows(others, [r for r in rows if r["source"] != str(broken)])
    assert inspect_corpus(root).ok

    from model.train import TrainConfig, init_model, train

    cfg = TrainConfig(preset="DiT-tiny", steps=4)
    losses = train(root, str(tmp_path / "train"), cfg)
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert (tmp_path / "train" / "checkpoint.pt").exists()
    assert init_model(root, cfg).config.text_dim == 32  # a caption-conditioned DiT


def test_build_to_s3_reads_back_with_plain_webdataset(
    videos, tiny_cfg, s3_bucket, fresh_ray, tmp_path
) -> None:
    root = f"{s3_bucket}/corpus"
    build([str(p) for p in videos.values()], root, tiny_cfg)
    rows = _check_corpus_tables(root, videos)
    bucket, prefix = root[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3")
    keys = [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/shards/")["Contents"]
    ]
    samples: list[dict] = []
    for key in sorted(keys):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        local = tmp_path / Path(key).name
        local.write_bytes(body)
        samples.extend(wds.WebDataset(str(local), shardshuffle=False))
    _check_samples(samples, rows)
    manifest = json.load(
        io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")["Body"].read())
    )
    assert manifest["counts"]["shards"] == len(keys)
