"""pipeline.models: a build names every model it cannot load before it starts Ray."""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from huggingface_hub import constants

from pipeline.config import load_config
from pipeline.models import ModelUnavailable, check_models, model_problems
from reelpack.cli import main


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache with nothing in it, whatever this machine has cached."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket goes


def test_the_tiny_preset_has_every_model_on_disk() -> None:
    assert model_problems(load_config(preset="tiny")) == []


def test_default_models_offline_are_named_with_the_setting_and_the_cause(
    empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = model_problems(load_config())
    assert [p.split(" ")[0] for p in problems] == [
        "caption.model",
        "encode.vae",
        "aesthetic.clip_model",
    ], problems
    assert all("HF_HUB_OFFLINE is set" in p for p in problems)
    assert "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'" in problems[1]


def test_an_unreachable_hub_is_found_at_once(
    empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    t0 = time.monotonic()
    problems = model_problems(load_config())
    assert time.monotonic() - t0 < 30  # no client retries per model
    assert len(problems) == 3
    assert all("the hub cannot be reached (127.0.0.1: " in p for p in problems), problems


def test_local_models_files_and_clip_tags(tmp_path: Path) -> None:
    tiny = load_config(preset="tiny")
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cfg = replace(
        tiny,
        caption=replace(tiny.caption, model=str(tmp_path / "missing")),
        encode=replace(tiny.encode, vae=str(not_a_model), vae_subfolder=None),
        aesthetic=replace(
            tiny.aesthetic,
            head=str(tmp_path / "head.pth"),
            clip_config=None,
            clip_model="ViT-B-32",
            clip_pretrained="no-such-tag",
        ),
    )
    assert model_problems(cfg) == [
        f"aesthetic.head '{tmp_path / 'head.pth'}': no such file {tmp_path / 'head.pth'}",
        f"caption.model '{tmp_path / 'missing'}': no such folder {tmp_path / 'missing'}",
        f"encode.vae '{not_a_model}': {not_a_model} has no config.json: not a saved model",
        "aesthetic.clip_model 'ViT-B-32' (no-such-tag): open_clip has no pretrained tag "
        "'no-such-tag' for ViT-B-32 (known: " + model_problems(cfg)[3].split("(known: ")[1],
    ]
    unknown = replace(cfg, aesthetic=replace(cfg.aesthetic, clip_model="ViT-Nope"))
    assert "open_clip has no model 'ViT-Nope'" in model_problems(unknown)[3]
    with pytest.raises(ModelUnavailable, match=r"cannot be loaded:\n  aesthetic.head"):
        check_models(cfg)
    check_models(replace(cfg, ray=replace(cfg.ray, check_models=False)))  # turned off


def test_build_stops_before_ray_when_a_model_is_missing(
    tmp_path: Path,
    empty_hub_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ray

    from pipeline.synth import synth_video

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    video = tmp_path / "v.mp4"
    synth_video(str(video), width=64, height=48, fps=12.0, shots=[24], seed=0)
    assert main(["build", str(video), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "models the build needs cannot be loaded:\n  caption.model" in err
    assert not ray.is_initialized()
