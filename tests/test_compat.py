"""A build adds to a corpus only with the same VAE, patch size and text encoder width;
other changes are named."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import schemas
from pipeline.compat import CorpusMismatch, check_resume, config_changes
from pipeline.config import load_config, to_dict
from reelpack.cli import main

VAE = {
    "id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "class": "AutoencoderKLWan",
    "config_sha256": "ab12",
    "latent_channels": 16,
    "spatial_factor": 8,
    "temporal_factor": 4,
    "frame_rule": {"base": 1, "step": 4},
    "normalization": {"kind": "mean_std", "mean": [0.1], "std": [2.0]},
}


def _manifest(**config: object) -> dict:
    return {
        "vae": copy.deepcopy(VAE),
        "patch_size": [1, 2, 2],
        "config": to_dict(load_config(**config)),
    }


def test_same_settings_resume_silently_and_changes_that_matter_are_named() -> None:
    built = _manifest()
    assert check_resume("c", built, _manifest()) == []
    run = _manifest(
        decide={"thresholds": {"motion": [0.01, None]}},
        caption={"max_new_tokens": 64, "device": "cuda:1", "batch_size": 2},
        ray={"encode": {"max_actors": 8}},
        split={"timeout_s": 60.0},
    )
    assert check_resume("c", built, run) == ["caption.max_new_tokens", "decide.thresholds"]
    moved = _manifest()
    moved["vae"]["id"] = "/models/wan-vae"  # the same VAE from another place
    moved["config"]["encode"]["vae"] = "/models/wan-vae"
    assert check_resume("c", built, moved) == ["encode.vae"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("class", "AutoencoderKLCogVideoX"),
        ("config_sha256", "cd34"),
        ("normalization", {"kind": "mean_std", "mean": [0.0], "std": [1.0]}),
    ],
)
def test_another_vae_is_refused(field: str, value: object) -> None:
    run = _manifest()
    run["vae"][field] = value
    with pytest.raises(CorpusMismatch, match=rf"another VAE or patch size \({field} differ"):
        check_resume("s3://b/c", _manifest(), run)


def test_another_patch_size_is_refused() -> None:
    run = _manifest()
    run["patch_size"] = [1, 4, 4]
    with pytest.raises(CorpusMismatch, match=r"\(patch_size differ.*Build into a new --out"):
        check_resume("c", _manifest(), run)


def test_another_text_encoder_is_refused() -> None:
    umt5 = {"id": "google/umt5-xxl", "class": "UMT5EncoderModel", "dim": 4096, "max_length": 512}
    built, run = _manifest(), _manifest()
    built["text_encoder"], run["text_encoder"] = umt5, {**umt5, "id": "/models/umt5-xxl"}
    assert check_resume("c", built, run) == []  # the same encoder from another place
    run["text_encoder"] = {
        **umt5,
        "id": "google/t5-v1_1-small",
        "class": "T5EncoderModel",
        "dim": 512,
    }
    with pytest.raises(CorpusMismatch, match=r"another text encoder \(class, dim differ.*4096-d"):
        check_resume("c", built, run)
    # a corpus whose manifest names no encoder (built without caption embeddings) may
    # be continued with them, and the other way round: the config change is named
    run["text_encoder"] = None
    assert check_resume("c", built, run) == []


def test_other_weights_are_refused_where_both_manifests_have_their_digest() -> None:
    umt5 = {"id": "google/umt5-xxl", "class": "UMT5EncoderModel", "dim": 4096}
    built, run = _manifest(), _manifest()
    built["vae"]["weights_sha256"] = run["vae"]["weights_sha256"] = "a" * 64
    built["text_encoder"] = {**umt5, "weights_sha256": "c" * 64}
    run["text_encoder"] = {**umt5, "id": "/models/umt5-xxl", "weights_sha256": "c" * 64}
    assert check_resume("c", built, run) == []  # the same weights from another place
    # a driver without the model's files, or a corpus from before digests: nothing to tell
    run["vae"]["weights_sha256"] = None
    del built["text_encoder"]["weights_sha256"]
    assert check_resume("c", built, run) == []
    run["vae"]["weights_sha256"] = "b" * 64
    with pytest.raises(CorpusMismatch, match=r"another VAE or patch size \(weights_sha256 differ"):
        check_resume("c", built, run)
    run["vae"]["weights_sha256"] = "a" * 64
    built["text_encoder"]["weights_sha256"] = "d" * 64
    with pytest.raises(CorpusMismatch, match=r"another text encoder \(weights_sha256 differ"):
        check_resume("c", built, run)


def test_config_changes_ignore_runtime_settings() -> None:
    assert config_changes({"ray": {"num_cpus": 2}}, {"ray": {"num_cpus": 8}}) == []
    assert config_changes({"split": {"max_clip_s": 10}}, {"split": {"max_clip_s": 5}}) == [
        "split.max_clip_s"
    ]
    assert config_changes({}, {"write": {"clip_files": True}}) == ["write.clip_files"]


def test_build_refuses_a_corpus_of_another_vae_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.graph import _check_resume, _manifest_extra

    config = tmp_path / "tiny.yaml"
    config.write_text(f"preset: tiny\nmodel_cache: {tmp_path / 'models'}\n")
    cfg = load_config(str(config))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    manifest = _manifest_extra(cfg)
    (corpus / schemas.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert _check_resume(str(corpus), cfg) == []
    manifest["config"]["decide"]["min_duration_s"] = 3.0
    (corpus / schemas.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert _check_resume(str(corpus), cfg) == ["decide.min_duration_s"]
    # the models' weights digests are read from the tiny preset's model folders
    assert len(manifest["vae"]["weights_sha256"]) == 64
    assert len(manifest["text_encoder"]["weights_sha256"]) == 64
    manifest["vae"]["weights_sha256"] = "0" * 64
    (corpus / schemas.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CorpusMismatch, match=r"\(weights_sha256 differ"):
        _check_resume(str(corpus), cfg)
    manifest["vae"]["latent_channels"] = 4
    (corpus / schemas.MANIFEST_NAME).write_text(json.dumps(manifest))
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    assert main(["build", str(video), "--out", str(corpus), "--config", str(config)]) == 2
    assert "holds latents of another VAE or patch size (latent_channels" in capsys.readouterr().err
    assert sorted(p.name for p in corpus.iterdir()) == [schemas.MANIFEST_NAME]  # no lock, no parts


def test_the_models_are_described_while_the_build_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from pipeline import graph

    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def describe(cfg: object) -> dict[str, object]:
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        return {"vae": "described"}

    monkeypatch.setattr(graph, "_describe_models", describe)
    cfg = load_config(preset="tiny")
    graph._prepare_manifest(cfg)
    assert started.wait(10)  # on its own thread, the build goes on meanwhile
    assert calls == ["reelpack-describe-models"]
    waiting = threading.Thread(target=graph._manifest_extra, args=(cfg,))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # the commit waits for the description under way ...
    release.set()
    waiting.join(10)
    assert not waiting.is_alive() and len(calls) == 2  # ... then takes it (cached below)

    def broken(cfg: object) -> dict[str, object]:
        raise OSError("VAE folder gone")

    monkeypatch.setattr(graph, "_describe_models", broken)
    graph._prepare_manifest(cfg)  # a failure is left to the commit, which reports it
    with pytest.raises(OSError, match="VAE folder gone"):
        graph._manifest_extra(cfg)
