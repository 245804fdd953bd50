"""``reelpack plan``: estimates from probes, checked against the real stages.

The videos are generated with known shot lengths; with ``mean_shot_s`` set to that
length the plan's clip count must equal what Split cuts, and its tokens per clip must
equal what Encode (the tiny VAE, run in-process without Ray) produces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import BuildConfig, load_config
from pipeline.plan import (
    Plan,
    PlanRates,
    StageEstimate,
    format_plan,
    load_plan_config,
    make_plan,
    parse_rates,
    vae_factors,
)
from pipeline.stages.base import rows_to_batch
from pipeline.stages.encode import Encode
from pipeline.stages.probe import Probe
from pipeline.stages.split import Split
from pipeline.synth import synth_video
from reelpack.cli import main

SHOT = 30  # frames per generated shot
FPS = 12.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plan-videos")
    synth_video(str(root / "wide.mp4"), width=192, height=108, fps=FPS, shots=[SHOT] * 3, seed=0)
    synth_video(str(root / "tall.mp4"), width=90, height=160, fps=FPS, shots=[SHOT] * 2, seed=1)
    (root / "broken.mp4").write_bytes(b"not a video at all")
    return root


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory: pytest.TempPathFactory) -> BuildConfig:
    return load_config(
        preset="tiny",
        model_cache=str(tmp_path_factory.mktemp("models")),
        split={"min_clip_s": 1.0, "max_clip_s": 2.0},
    )


def _sources(root: Path) -> list[str]:
    return sorted(str(p) for p in root.iterdir())


def _actual(sources: list[str], cfg: BuildConfig) -> dict[str, list[int]]:
    """Tokens per clip of each source through the real Probe -> Split -> Encode."""
    batch = rows_to_batch([{"source": s} for s in sources])
    batch = Split(cfg.split)(Probe(cfg.probe)(batch))
    batch["status"] = np.array(
        [
            "kept" if c is not None else s
            for c, s in zip(batch["clip_id"], batch["src_status"], strict=True)
        ],
        dtype=object,
    )
    batch = Encode(cfg.encode)(batch)
    out: dict[str, list[int]] = {s: [] for s in sources}
    for cid, src, tokens in zip(
        batch["clip_id"], batch["source"], batch["num_tokens"], strict=True
    ):
        if cid is not None:
            out[str(src)].append(int(tokens))
    return out


def test_plan_matches_the_real_stages(videos: Path, tiny_cfg: BuildConfig) -> None:
    sources = _sources(videos)
    rates = replace_rates(tiny_cfg, mean_shot_s=SHOT / FPS)
    plan = make_plan(sources, tiny_cfg, sample=10, workers=2, gpus=0, rates=rates)
    assert (plan.sources, plan.probed, plan.probe_errors, plan.scale) == (3, 3, 1, 1.0)
    actual = _actual([s for s in sources if not s.endswith("broken.mp4")], tiny_cfg)
    by_source = {e.source: e for e in plan.per_source}
    assert by_source[str(videos / "broken.mp4")].status == "error"
    for source, tokens in actual.items():
        est = by_source[source]
        assert est.clips == len(tokens) > 0, source
        assert sorted(est.tokens_per_clip) == sorted(tokens), source
    assert plan.clips == sum(len(t) for t in actual.values())
    assert plan.duration_s == pytest.approx(5 * SHOT / FPS, rel=0.05)
    assert plan.latent_tokens == pytest.approx(
        np.mean([t for ts in actual.values() for t in ts]) * plan.clips_kept
    )
    # bf16 latents: 2 bytes x channels per latent cell, plus shard and index overheads
    vae = vae_factors(tiny_cfg)
    est = by_source[str(videos / "wide.mp4")]
    assert est.latent_bytes_per_clip[0] % (2 * vae.channels) == 0
    assert (
        plan.storage_bytes
        > sum(sum(e.latent_bytes_per_clip) for e in plan.per_source) * rates.keep_fraction
    )


def replace_rates(cfg: BuildConfig, **values: float) -> PlanRates:
    from pipeline.plan import RATE_PRESETS

    return parse_rates(RATE_PRESETS[cfg.preset], {k: v for k, v in values.items()})


def test_time_scales_with_cluster_size(videos: Path, tiny_cfg: BuildConfig) -> None:
    sources = _sources(videos)
    rates = PlanRates(cpu_per_gpu_s=50.0, worker_start_s=0.0)  # work only: no process starts
    small = make_plan(sources, tiny_cfg, workers=2, gpus=0, rates=rates)
    big = make_plan(sources, tiny_cfg, workers=4, gpus=0, rates=rates)
    gpu = make_plan(sources, tiny_cfg, workers=4, gpus=2, rates=rates)
    stages = {s.stage: s for s in small.stages}
    assert {"probe", "split", "score", "decide", "caption", "encode", "write"} <= set(stages)
    # without GPUs the model stages run on the CPUs, cpu_per_gpu_s times slower
    assert stages["encode"].resource == "cpu"
    assert big.wall_s == pytest.approx(small.wall_s / 2)
    gstages = {s.stage: s for s in gpu.stages}
    assert gstages["encode"].resource == "gpu"
    assert gstages["encode"].resource_s == pytest.approx(stages["encode"].resource_s / 50.0)
    assert gpu.wall_s < big.wall_s
    cpu_work = sum(s.resource_s for s in gpu.stages if s.resource == "cpu")
    gpu_work = sum(s.resource_s for s in gpu.stages if s.resource == "gpu")
    assert gpu.wall_s == pytest.approx(max(cpu_work / 4, gpu_work / 2, gstages["write"].wall_s))


def test_transnetv2_costs_split_cpu_or_its_gpu_share(videos: Path, tiny_cfg: BuildConfig) -> None:
    from dataclasses import replace

    sources = _sources(videos)
    frames = SHOT * 3 + SHOT * 2  # the two videos that probe
    rates = PlanRates(transnet_cpu_s_per_frame=0.03, transnet_gpu_s_per_frame=0.001)

    def stages(cfg: BuildConfig, gpus: int) -> dict[str, StageEstimate]:
        plan = make_plan(sources, cfg, workers=2, gpus=gpus, rates=rates)
        return {s.stage: s for s in plan.stages}

    adaptive = stages(tiny_cfg, 1)
    on_cpu = replace(tiny_cfg, split=replace(tiny_cfg.split, detector="transnetv2"))
    cpu = stages(on_cpu, 1)
    assert cpu["split"].resource_s == pytest.approx(adaptive["split"].resource_s + frames * 0.03)
    assert "transnetv2" not in cpu
    # with a GPU share per split task and GPUs to hold it: its own GPU line
    shared = replace(
        on_cpu,
        split=replace(on_cpu.split, transnet_device="auto"),
        ray=replace(on_cpu.ray, split=replace(on_cpu.ray.split, num_gpus=0.25)),
    )
    gpu = stages(shared, 1)
    assert gpu["split"].resource_s == pytest.approx(adaptive["split"].resource_s)
    line = gpu["transnetv2"]
    assert (line.resource, line.work, line.unit) == ("gpu", frames, "source frames")
    assert line.resource_s == pytest.approx(frames * 0.001)
    # a cluster without GPUs runs it on the CPUs after all
    assert stages(shared, 0)["split"].resource_s == pytest.approx(cpu["split"].resource_s)


def test_sample_is_scaled_to_all_sources(videos: Path, tiny_cfg: BuildConfig) -> None:
    sources = [s for s in _sources(videos) if s.endswith("wide.mp4")] * 1
    extra = [str(videos / "wide.mp4")] + [str(videos / f"copy{i}.mp4") for i in range(3)]
    for path in extra[1:]:
        Path(path).write_bytes((videos / "wide.mp4").read_bytes())
    one = make_plan(sources, tiny_cfg, sample=1, workers=2)
    four = make_plan(extra, tiny_cfg, sample=1, workers=2)
    assert (four.probed, four.scale) == (1, 4.0)
    assert four.clips == 4 * one.clips
    assert four.storage_bytes == pytest.approx(4 * one.storage_bytes)
    # starting the model actors is a fixed cost: it does not grow with the sources
    start_one, start_four = (
        next(s for s in p.stages if s.stage == "start-up") for p in (one, four)
    )
    assert start_one.resource_s == start_four.resource_s > 0
    assert start_one.work == start_four.work
    for path in extra[1:]:
        Path(path).unlink()


def test_rates_from_config_and_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "plan.yaml"
    cfg_file.write_text(
        "preset: default\nsplit: {max_clip_s: 4.0}\nplan: {mean_shot_s: 3.0, keep_fraction: 0.5}\n"
    )
    cfg, rates = load_plan_config(str(cfg_file), None, ["keep_fraction=0.25"])
    assert cfg.split.max_clip_s == 4.0 and cfg.preset == "default"
    assert (rates.mean_shot_s, rates.keep_fraction) == (3.0, 0.25)
    with pytest.raises(ValueError, match="unknown rate"):
        parse_rates(PlanRates(), ["mean_shot=3"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_rates(PlanRates(), ["mean_shot_s"])
    for item, words in [  # a zero divisor was a ZeroDivisionError; 2 of clips kept, taken
        ("write_bytes_per_s=0", "write_bytes_per_s: must be > 0"),
        ("mean_shot_s=0", "mean_shot_s: must be > 0"),
        ("keep_fraction=2", r"keep_fraction: a share, in \[0, 1\]"),
        ("model_load_s=inf", "model_load_s: must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_rates(PlanRates(), [item])
    cfg_file.write_text("splitt: {}\n")
    with pytest.raises(ValueError, match="splitt"):
        load_plan_config(str(cfg_file), None)


def test_cli(
    videos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REELPACK_CACHE", str(tmp_path / "cache"))
    argv = ["plan", str(videos), "--preset", "tiny", "--workers", "3", "--gpus", "1"]
    assert main([*argv, "--rate", f"mean_shot_s={SHOT / FPS}"]) == 0
    text = capsys.readouterr().out
    for word in ("clips", "tokens", "storage", "split", "encode", "estimated wall time"):
        assert word in text, text
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sources"] == 3 and data["workers"] == 3 and data["gpus"] == 1
    assert {s["stage"] for s in data["stages"]} >= {"probe", "split", "encode", "write"}
    assert main([*argv, "--rate", "nope=1"]) == 2
    capsys.readouterr()
    for flags, words in [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--gpus", "-1"], "--gpus must be >= 0, got -1"),
        (["--sample", "0"], "--sample must be >= 1, got 0"),
    ]:
        assert main(["plan", str(videos), "--preset", "tiny", *flags]) == 2
        assert capsys.readouterr().err == f"reelpack plan: {words}\n"
    assert main(["plan", str(tmp_path / "missing")]) == 2
    photos = tmp_path / "photos"  # nothing a build would take: said so, with what is there
    photos.mkdir()
    (photos / "IMG_0001.CR2").write_bytes(b"?")
    assert main(["plan", str(photos)]) == 2
    err = capsys.readouterr().err
    assert "skipped 1 file that is not video or image by extension (.cr2 1)" in err
    assert "no video or image sources found" in err


def test_format_mentions_every_stage(videos: Path, tiny_cfg: BuildConfig) -> None:
    plan = make_plan(_sources(videos), tiny_cfg, workers=2)
    text = format_plan(plan)
    for s in plan.stages:
        assert f"  {s.stage} " in text


def test_plan_lists_why_probed_sources_fail(
    videos: Path, tiny_cfg: BuildConfig, tmp_path: Path
) -> None:
    import dataclasses

    plain = make_plan(_sources(videos), tiny_cfg, workers=2)
    bad = []
    for n in range(5):
        path = tmp_path / f"bad{n}.mp4"
        path.write_bytes(b"" if n < 2 else b"not a video")
        bad.append(str(path))
    plan = make_plan(_sources(videos) + bad, tiny_cfg, workers=2, sample=100)
    assert plan.probe_errors == plain.probe_errors + 5
    reasons = plan.probe_errors_by_reason
    assert sum(reasons.values()) == plan.probe_errors
    assert reasons["not a readable video or image: an empty file (N bytes)"] == 2
    garbage = "not a readable video or image (unknown or corrupt container): Invalid data"
    assert sum(n for r, n in reasons.items() if r.startswith(garbage)) >= 3
    text = format_plan(plan)
    assert f"({plan.probe_errors} fail their probe)" in text
    top, count = next(iter(reasons.items()))
    assert f"  failed     {count} {top}"[:110] in text
    assert json.loads(json.dumps(plan.to_json()))["probe_errors_by_reason"] == reasons
    # five causes are listed, the rest summed
    many = dataclasses.replace(
        plan, probe_errors_by_reason={f"cause {c}": 9 - c for c in range(1, 8)}
    )
    lines = format_plan(many).splitlines()
    listed = [line for line in lines if " cause " in line]
    assert len(listed) == 5 and "  failed     8 cause 1" in lines
    assert "             5 of 2 other cause(s) (--json lists them)" in lines


def test_plan_names_sources_that_split_treats_specially(
    videos: Path, tiny_cfg: BuildConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interlaced, HDR, VFR, rotated and still sources in the sample are counted and
    named; a plain sample adds no line. Deinterlacing adds to split's time, field
    matching film in interlaced video more."""
    plain = make_plan(_sources(videos), tiny_cfg, workers=2)
    assert "  probed  " not in format_plan(plain)
    real = Probe.probe_one
    odd = {
        "wide.mp4": {"src_interlaced": True, "src_color_transfer": "arib-std-b67"},
        "tall.mp4": {
            "src_interlaced": True,
            "src_pulldown": True,
            "src_vfr": True,
            "src_rotation_deg": 90,
        },
    }

    def probe_one(self: Probe, source: str) -> dict:
        return {**real(self, source), **odd.get(Path(source).name, {})}

    monkeypatch.setattr(Probe, "probe_one", probe_one)
    plan = make_plan(_sources(videos), tiny_cfg, workers=2)
    assert plan.traits == {"interlaced": 2, "pulldown": 1, "hdr": 1, "vfr": 1, "rotated": 1}
    assert (
        "  probed     2 interlaced (deinterlaced), 1 film in interlaced video (fields "
        "matched), 1 HDR (tone-mapped to SDR), 1 variable frame rate, 1 rotated"
        in format_plan(plan)
    )
    rates = PlanRates()
    wide_mpx, tall_mpx = 3 * SHOT * 192 * 108 / 1e6, 2 * SHOT * 90 * 160 / 1e6
    extra = wide_mpx * rates.deinterlace_cpu_s_per_mpx_frame + tall_mpx * (
        rates.deinterlace_cpu_s_per_mpx_frame + rates.field_match_cpu_s_per_mpx_frame
    )

    def split_s(p: Plan) -> float:
        return next(s.resource_s for s in p.stages if s.stage == "split")

    assert split_s(plan) - split_s(plain) == pytest.approx(extra)


def test_plan_covers_the_build_stages(videos: Path, tiny_cfg: BuildConfig) -> None:
    """One row per stage the build runs (its progress labels), then start-up, workers
    and write; model stages on the GPUs, each pool's min_actors paying
    ``actor_start_s`` and ``model_load_s`` per model they hold, and each worker process
    ``worker_start_s``."""
    from dataclasses import replace

    from pipeline.graph import build_steps, stage_labels

    cfg = replace(
        tiny_cfg, ray=replace(tiny_cfg.ray, caption=replace(tiny_cfg.ray.caption, min_actors=3))
    )
    steps = build_steps(cfg)
    rates = PlanRates(actor_start_s=4.0, model_load_s=10.0)
    apart = replace(cfg, ray=replace(cfg.ray, fuse_cpu_models=False))  # a pool per stage
    plan = make_plan(_sources(videos), apart, workers=2, gpus=1, rates=rates)
    labels = [label for label in stage_labels(steps) if label != "ranges"]
    assert [s.stage for s in plan.stages] == [*labels, "start-up", "workers", "write"]
    # a worker process per CPU slot, one for the dedup index and one for the meter
    workers = next(s for s in plan.stages if s.stage == "workers")
    assert (workers.resource, workers.work) == ("cpu", 2 + 1 + 1)
    assert workers.resource_s == 4 * rates.worker_start_s and workers.wall_s == 2 * 4.0
    on = {s.stage: s.resource for s in plan.stages}
    assert {label for label, r in on.items() if r == "gpu"} == {
        label
        for step, label in zip(steps, stage_labels(steps), strict=True)
        if step.kind == "actors"
    } | {"start-up"}
    actors = sum(s.res.min_actors for s in steps if s.kind == "actors")
    start = next(s for s in plan.stages if s.stage == "start-up")
    assert (start.work, start.resource_s) == (actors, actors * 14.0)
    # shared pools (the tiny preset's models get no GPU): the stages after dedup are one
    # pool of caption's 3 actors, which start once and load 4 models each
    shared = make_plan(_sources(videos), cfg, workers=2, gpus=1, rates=rates)
    start = next(s for s in shared.stages if s.stage == "start-up")
    models = [s for s in steps if s.kind == "actors"]
    assert [s.name for s in models] == [
        "aesthetic",
        "caption",
        "agreement",
        "encode",
        "text_encode",
    ]
    assert (start.work, start.resource_s) == (1 + 3, 1 * 14.0 + 3 * (4.0 + 4 * 10.0))


def test_images_count_as_images_not_as_seconds_of_video(
    videos: Path, tiny_cfg: BuildConfig, tmp_path: Path
) -> None:
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((96, 128, 3), 60 * i, np.uint8)).save(tmp_path / f"p{i}.png")
    images = sorted(str(p) for p in tmp_path.glob("*.png"))
    plain = make_plan(_sources(videos), tiny_cfg, workers=2)
    both = make_plan(_sources(videos) + images, tiny_cfg, workers=2)
    assert both.duration_s == pytest.approx(plain.duration_s)  # a still lasts no time
    assert both.clips == plain.clips + 3 and both.traits == {"image": 3}
    text = format_plan(both).splitlines()[1]
    assert text.endswith("(and ~3 images)"), text
