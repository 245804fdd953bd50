"""Config tree: YAML loading, unknown keys, presets, hashing."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pipeline.config import (
    BuildConfig,
    config_hash,
    from_dict,
    load_config,
    parse_overrides,
    to_dict,
    validate,
)
from pipeline.refilter import load_refilter_config
from pipeline.stages.decide import DEFAULT_THRESHOLDS
from pipeline.stages.split import SplitConfig
from schemas.yamltext import read_config_file


def test_defaults_name_real_models() -> None:
    cfg = load_config()
    assert cfg.preset == "default"
    assert cfg.caption.model == "Qwen/Qwen3-VL-8B-Instruct"
    assert cfg.encode.vae_class == "AutoencoderKLWan"
    assert "Wan" in cfg.encode.vae


def test_yaml_overrides_and_types(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "encode:\n  pixel_budget: 4096\n  patch_size: [1, 2, 2]\n  target_fps: 12\n"
        "split:\n  min_clip_s: 0.5\n"
    )
    cfg = load_config(str(path))
    assert cfg.encode.pixel_budget == 4096
    assert cfg.encode.patch_size == (1, 2, 2)
    assert cfg.encode.target_fps == 12.0 and isinstance(cfg.encode.target_fps, float)
    assert cfg.split.min_clip_s == 0.5


def test_exponent_floats_are_numbers_in_files_and_set_items(tmp_path) -> None:
    """YAML 1.2 and JSON read ``1e-1`` as a number; PyYAML alone reads it as a string."""
    path = tmp_path / "c.yaml"
    path.write_text("split:\n  min_clip_s: 5e-1\n  max_clip_s: 1E+1\n")
    cfg = load_config(str(path), sets=["decide.thresholds.motion=[2.5e-3, null]"])
    assert (cfg.split.min_clip_s, cfg.split.max_clip_s) == (0.5, 10.0)
    assert cfg.decide.threshold_map()["motion"] == (0.0025, None)
    assert parse_overrides(["a.b=-1e0", "a.c=1_000e-3", "a.d=e5"]) == {
        "a": {"b": -1.0, "c": 1.0, "d": "e5"}
    }


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("c.yaml", b"split:\n  min_clip_s: 1\n split: 2\n", r"not valid YAML at line 3, column 2"),
        ("c.yaml", b"\xff\xfe split: 1", r"not UTF-8 text \(byte 0\)"),
        ("c.yaml", b"- a\n- b\n", r"top level must be a mapping"),
        ("c.json", b'{"split": {"min_clip_s": 1},}', r"not valid JSON at line 1, column 29"),
    ],
)
def test_a_config_file_that_cannot_be_read_is_named_with_the_line(
    tmp_path, capsys, name: str, data: bytes, message: str
) -> None:
    """Build, plan, refilter and train read config files one way; a broken one is a
    config error naming the file (and where it breaks), not a parser traceback."""
    from reelpack.cli import main

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"config {re.escape(str(path))}: {message}"):
        read_config_file(path)
    for argv in (
        ["build", str(path), "--out", str(tmp_path / "c"), "--config", str(path)],
        ["plan", str(path), "--config", str(path)],
        ["train", str(tmp_path / "c"), "--out", str(tmp_path / "t"), "--config", str(path)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(rf"{argv[0]}: (config error: )?config .*{name}: {message}", err), err
    with pytest.raises(ValueError, match=rf"config .*{name}: {message}"):
        load_refilter_config(str(path))
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(
    "item, message",
    [
        ("decide.thresholds.motion=abc", r"threshold 'motion': expected \[min, max\], got 'abc'"),
        ("decide.thresholds.motion=[1, 2, 3]", r"expected \[min, max\], got \[1, 2, 3\]"),
        ("decide.thresholds.motion=[low, null]", r"bounds are numbers or null, got 'low'"),
        ("decide.thresholds.motion=[true, null]", r"bounds are numbers or null, got True"),
        ("decide.thresholds.motion=[.nan, 1]", r"a bound is NaN"),
    ],
)
def test_a_malformed_threshold_names_the_signal_and_the_value(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(sets=[item])


@pytest.mark.parametrize(
    "text, where",
    [
        ("encode:\n  pixel_budgte: 4096\n", "encode"),
        ("bogus: 1\n", "top level"),
        ("encode:\n  pixel_budget: many\n", "encode.pixel_budget"),
        ("encode:\n  patch_size: [1, 2]\n", "encode.patch_size"),
        ("split:\n  min_clip_s: abc\n", "split.min_clip_s: expected a number, got 'abc'"),
        ("split:\n  max_clip_s: true\n", "split.max_clip_s: expected a number"),
        ("encode:\n  target_fps: fast\n", "encode.target_fps"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text: str, where: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=where.replace(".", r"\.")):
        load_config(str(path))


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(preset="huge")


def test_round_trip_and_hash() -> None:
    cfg = BuildConfig()
    data = to_dict(cfg)
    json.dumps(data)
    assert from_dict(BuildConfig, data) == cfg
    assert config_hash(cfg) == config_hash(from_dict(BuildConfig, data))
    other = from_dict(BuildConfig, {**data, "encode": {**data["encode"], "pixel_budget": 1024}})
    assert config_hash(other) != config_hash(cfg)


def test_tiny_preset_keeps_user_values(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("REELPACK_CACHE", str(tmp_path / "cache"))
    cfg = load_config(preset="tiny", encode={"pixel_budget": 64 * 64})
    assert cfg.encode.pixel_budget == 64 * 64  # the user's value wins over the preset's
    assert cfg.encode.vae.startswith(str(tmp_path / "cache"))
    assert cfg.caption.model.startswith(str(tmp_path / "cache"))
    # stage resources field by field: more encode actors keep the preset's CPU share
    ray = load_config(preset="tiny", sets=["ray.encode.max_actors=2"]).ray
    assert (ray.encode.max_actors, ray.encode.num_cpus, ray.encode.num_gpus) == (2, 0.1, 0.0)
    ray = load_config(preset="tiny", ray={"caption": {"num_cpus": 0.5}}).ray
    assert (ray.caption.num_cpus, ray.caption.num_gpus, ray.aesthetic.num_cpus) == (0.5, 0.0, 0.1)


def test_commands_and_ray_workers_start_without_torch(tmp_path) -> None:
    """Every command builds the whole parser; a build's driver resolves and checks its
    config, and each Ray worker of a build imports the graph module. None of them
    imports torch or a model library (several CPU-seconds each) once the tiny models
    are in the cache: only the model stages' actors do, when they load their models."""
    cache = tmp_path / "cache"
    load_config(preset="tiny", model_cache=str(cache))  # builds the models once
    code = (
        "import sys\n"
        "from reelpack.cli import _parser\n"
        "_parser()\n"
        "from pipeline.config import load_config\n"
        "cfg = load_config(preset='tiny', model_cache=sys.argv[1], sets=['encode.device=cuda:1'])\n"
        "import pipeline.graph\n"
        "heavy = ('torch', 'open_clip', 'diffusers', 'transformers')\n"
        "print([m for m in heavy if m in sys.modules], cfg.aesthetic.clip_model)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(cache)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[] reelpack-tiny-clip"
    # a device or dtype outside the common spellings is still checked by torch itself
    cfg = load_config(sets=["encode.device=meta", "encode.dtype=float64"])
    assert (cfg.encode.device, cfg.encode.dtype) == ("meta", "float64")
    for item, field in (
        ("encode.device=cuda:x", "encode.device"),
        ("text_encode.dtype=f32", "text_encode.dtype"),
    ):
        with pytest.raises(ValueError, match=re.escape(field)):
            load_config(sets=[item])


def test_payloads_are_at_least_as_large_as_the_latents() -> None:
    """The VAE never upscales a clip payload, so a build sizes payloads to the largest
    latent resolution asked for, unless the user sets split.work_max_area."""
    cfg = load_config()
    assert cfg.split.work_max_area == cfg.encode.pixel_budget > SplitConfig().work_max_area
    extra = load_config(encode={"extra_pixel_budgets": [1280 * 720]})
    assert extra.split.work_max_area == 1280 * 720
    small = load_config(encode={"pixel_budget": 64 * 64})
    assert small.split.work_max_area == SplitConfig().work_max_area  # never below the default
    assert load_config(split={"work_max_area": 1000}).split.work_max_area == 1000


def test_payloads_carry_the_frame_rate_the_vae_sees() -> None:
    """Payloads keep the frames on encode's frame-rate grid unless split.work_fps is set."""
    assert SplitConfig().work_fps is None  # the stage alone keeps every frame
    assert load_config().split.work_fps == load_config().encode.target_fps == 16.0
    assert load_config(encode={"target_fps": 24.0}).split.work_fps == 24.0
    assert load_config(encode={"target_fps": None}).split.work_fps is None
    assert load_config(split={"work_fps": None}).split.work_fps is None
    assert load_config(split={"work_fps": 30.0}, encode={"target_fps": 8}).split.work_fps == 30.0
    # a rate sparser than two frames in the shortest clip: payloads keep two, for score
    assert load_config(encode={"target_fps": 0.5}).split.work_fps == 2.0  # min_clip_s 1
    sparse = load_config(encode={"target_fps": 0.5}, split={"min_clip_s": 4.0})
    assert sparse.split.work_fps == 0.5
    assert load_config(encode={"target_fps": 0.5}, split={"min_clip_s": 0}).split.work_fps == 0.5


@pytest.mark.parametrize(
    "section, values, path",
    [
        ("probe", {"max_pixels": 0}, "probe.max_pixels"),
        ("split", {"min_clip_s": -3}, "split.min_clip_s"),
        ("split", {"min_clip_s": 4.0, "max_clip_s": 2.0}, "split.max_clip_s"),
        ("split", {"detector": "contnet"}, "split.detector"),
        ("split", {"work_preset": "turbo"}, "split.work_preset"),
        ("split", {"work_crf": 60}, "split.work_crf"),
        ("split", {"border_luma": -1}, "split.border_luma"),
        ("score", {"num_frames": 0}, "score.num_frames"),
        ("caption", {"dtype": "float17"}, "caption.dtype"),
        ("encode", {"device": "gpu"}, "encode.device"),
        ("encode", {"target_fps": 0}, "encode.target_fps"),
        ("encode", {"vae_class": "AutoencoderKL"}, "encode.vae_class"),
        ("text_encode", {"batch_size": 0}, "text_encode.batch_size"),
        ("write", {"shard_max_bytes": 0}, "write.shard_max_bytes"),
        ("ray", {"encode": {"min_actors": 3, "max_actors": 1}}, "ray.encode.max_actors"),
        ("ray", {"caption": {"num_gpus": -1}}, "ray.caption.num_gpus"),
    ],
)
def test_values_out_of_range_fail_at_load_naming_the_field(
    section: str, values: dict, path: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(path) + " must be"):
        load_config(**{section: values})


def test_every_bad_value_is_named_at_once() -> None:
    with pytest.raises(ValueError) as e:
        load_config(split={"min_clip_s": -1, "decoder": "ffmpeg"}, write={"part_max_rows": 0})
    for path in ("split.min_clip_s", "split.decoder", "write.part_max_rows"):
        assert path in str(e.value)


def test_values_at_their_limits_and_off_switches_are_valid() -> None:
    cfg = load_config(
        split={"min_clip_s": 0, "max_clip_s": 0.5, "timeout_s": 0, "work_fps": None},
        probe={"max_aspect": 0},
        ray={"straggler_range_frames": 0, "progress_interval_s": 0, "caption": {"num_gpus": 0.25}},
        caption={"device": "cuda:1", "dtype": "bfloat16"},
        encode={"target_fps": None},
    )
    validate(cfg)
    assert cfg.caption.device == "cuda:1" and cfg.split.max_clip_s == 0.5


def test_build_refuses_a_bad_config_or_a_file_as_root_before_any_work(tmp_path) -> None:
    from dataclasses import replace

    from pipeline.graph import build

    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    bad = replace(BuildConfig(), split=SplitConfig(min_clip_s=-1.0))
    with pytest.raises(ValueError, match=r"split\.min_clip_s"):
        build([str(video)], str(tmp_path / "c"), bad)
    afile = tmp_path / "corpus"
    afile.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="corpus"):
        build([str(video)], str(afile), BuildConfig())
    assert not (tmp_path / "c").exists()


def test_cli_build_exits_2_naming_a_bad_value_or_root(tmp_path, capsys) -> None:
    from reelpack.cli import main

    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    config = tmp_path / "c.yaml"
    config.write_text("split: {max_clip_s: -2}\n")
    assert main(["build", str(video), "--out", str(tmp_path / "c"), "--config", str(config)]) == 2
    assert "split.max_clip_s must be > 0" in capsys.readouterr().err
    afile = tmp_path / "corpus.tar"
    afile.write_text("")
    assert main(["build", str(video), "--out", str(afile)]) == 2
    assert f"--out {afile}: a file" in capsys.readouterr().err
    assert main(["build", str(video), "--out", str(afile / "c")]) == 2  # was: [Errno 20]
    assert f"--out {afile / 'c'}: {afile} is a file; the corpus root" in capsys.readouterr().err


def test_a_build_or_plan_of_no_sources_fails_and_writes_nothing(tmp_path, capsys) -> None:
    """An empty folder, a folder of other files, an empty list: exit 2 naming what was
    searched (and what was skipped), no corpus root made."""
    from reelpack.cli import main

    empty, docs = tmp_path / "empty", tmp_path / "docs"
    empty.mkdir()
    docs.mkdir()
    (docs / "notes.txt").write_text("x")
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing yet\n")
    out = tmp_path / "c"
    assert main(["build", str(empty), str(docs), "--out", str(out), "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert f"no video or image sources found in '{empty}', '{docs}'" in err
    assert "skipped 1 file that is not video or image by extension (.txt 1)" in err
    assert main(["build", f"@{listing}", "--out", str(out)]) == 2
    assert f"no video or image sources found in '@{listing}'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["plan", str(docs), "--preset", "tiny"]) == 2
    assert f"reelpack plan: no video or image sources found in '{docs}'" in (
        capsys.readouterr().err
    )
    # a source folder at or inside the corpus root: all its files would be the corpus's
    (docs / "v.mp4").write_bytes(b"")
    for root in (docs, tmp_path, f"file://{tmp_path}"):
        assert main(["build", str(docs), "--out", str(root), "--preset", "tiny"]) == 2
        err = capsys.readouterr().err
        assert f"source '{docs}' is at or inside the corpus root --out {root}: its files" in err
    assert not (tmp_path / "manifest.json").exists() and not (docs / "lock.json").exists()


def test_set_items_lay_dotted_values_over_the_file(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("split: {detector: histogram, min_clip_s: 0.5}\n")
    cfg = load_config(
        str(path),
        sets=[
            "split.detector=content",  # over the file
            "split.threshold=31.5",
            "encode.patch_size=[1, 2, 2]",  # YAML values
            "text_encode.enabled=true",
            "ray.encode.max_actors=3",  # nested sections
        ],
    )
    assert cfg.split.detector == "content" and cfg.split.threshold == 31.5
    assert cfg.split.min_clip_s == 0.5  # the file's other keys stay
    assert cfg.encode.patch_size == (1, 2, 2) and cfg.text_encode.enabled is True
    assert cfg.ray.encode.max_actors == 3
    assert parse_overrides(["a.b=1", "a.b=2", "a.c=x y"]) == {"a": {"b": 2, "c": "x y"}}


@pytest.mark.parametrize(
    "item, message",
    [
        ("split.detector", "expected KEY=VALUE"),
        ("split..detector=x", "expected KEY=VALUE"),
        ("split.detectr=content", r"config split: unknown key\(s\) \['detectr'\]"),
        ("split.min_clip_s=-1", "split.min_clip_s must be >= 0"),
        ("split.min_clip_s=[1", "not valid YAML"),
        # infinite lengths made every source "cannot convert float infinity to integer"
        ("split.max_clip_s=.inf", r"split\.max_clip_s must be a finite number, got inf"),
        ("split.min_scene_s=.inf", r"split\.min_scene_s must be a finite number, got inf"),
        ("split.threshold=-.inf", r"split\.threshold must be a finite number, got -inf"),
        # a task stage takes no GPU and has no pool: refused, not silently ignored
        ("ray.split.num_gpus=1", r"ray\.split\.num_gpus must be 0 \(split runs as CPU tasks"),
        ("ray.score.max_actors=4", r"ray\.score\.min_actors / max_actors: score runs as Ray"),
        ("ray.split.num_cpus=0", r"ray\.split\.num_cpus must be > 0"),  # unbounded tasks
        # one sampled frame scored every moving clip's motion 0 (rejected as static)
        ("score.num_frames=1", r"score\.num_frames must be >= 2, got 1"),
        ("caption.max_pixels=2", r"caption\.max_pixels must be >= 4, got 2"),  # was a crash
        ("ray.dedup.max_actors=2", r"ray\.dedup\.min_actors / max_actors: dedup is one actor"),
    ],
)
def test_bad_set_items_name_the_item_or_key(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(sets=[item])


def test_split_tasks_take_a_gpu_share_only_for_transnetv2() -> None:
    transnet = "split.detector=transnetv2"
    cfg = load_config(sets=[transnet, "split.transnet_device=cuda", "ray.split.num_gpus=0.25"])
    assert cfg.ray.split.num_gpus == 0.25
    with pytest.raises(ValueError, match=r"0 while split\.transnet_device is cpu \(the share"):
        load_config(sets=[transnet, "ray.split.num_gpus=0.25"])  # the device's default
    with pytest.raises(ValueError, match=r"and to split's transnetv2 detector\)"):
        load_config(sets=["split.detector=content", "ray.split.num_gpus=0.25"])
    with pytest.raises(ValueError, match=r"ray\.split\.num_gpus must be a number from 0 \(no"):
        load_config(sets=[transnet, "split.transnet_device=auto", "ray.split.num_gpus=2"])
    with pytest.raises(ValueError, match=r"ray\.split\.num_gpus must be a number from 0"):
        load_config(sets=[transnet, "ray.split.num_gpus=null"])
    with pytest.raises(ValueError, match=r"ray\.score\.num_gpus must be 0 \(score runs as CPU"):
        load_config(sets=[transnet, "ray.score.num_gpus=0.25"])


def test_a_thresholds_mapping_edits_the_defaults(tmp_path) -> None:
    """A config that names some thresholds changes those and keeps every other default;
    null removes one; a list of pairs (a stored config's form) is the whole set."""
    path = tmp_path / "c.yaml"
    path.write_text("decide:\n  thresholds: {aesthetic: [4.5, null], motion: [0.01, null]}\n")
    got = load_config(str(path), sets=["decide.thresholds.text_coverage=null"])
    expected = dict(DEFAULT_THRESHOLDS)
    expected.update(aesthetic=(4.5, None), motion=(0.01, None))
    del expected["text_coverage"]
    assert got.decide.threshold_map() == expected
    # the stored form round-trips as the whole set
    again = load_config(None, decide={"thresholds": to_dict(got)["decide"]["thresholds"]})
    assert again.decide.threshold_map() == expected
    whole = load_config(sets=["decide.thresholds=[[motion, [0.01, null]]]"])
    assert whole.decide.threshold_map() == {"motion": (0.01, None)}
    with pytest.raises(
        ValueError, match=r"decide\.thresholds: threshold on unknown signal 'moton'"
    ):
        load_config(sets=["decide.thresholds.moton=null"])


def test_cli_build_and_plan_take_set_items(tmp_path, capsys) -> None:
    from reelpack.cli import main

    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    out = str(tmp_path / "c")
    assert main(["build", str(video), "--out", out, "--set", "encode.target_fps=0"]) == 2
    assert "encode.target_fps must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["plan", str(video), "--set", "split.detector=nope"]) == 2
    assert "split.detector" in capsys.readouterr().err
