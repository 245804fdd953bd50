"""model.sample: size validation, packed CFG, output shapes, files decoded by the corpus VAE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_train import TEXT_DIM, make_corpus, smooth_latents

import schemas
from model.dit import build_dit
from model.sample import (
    Sample,
    check_output,
    corpus_sample_size,
    latent_grid,
    plan_samples,
    sample_latents,
    sample_to_file,
    sample_to_files,
    write_video,
)
from model.train import TrainConfig, train
from model.vae import build_tiny_vae, describe_pretrained

C = 4
WAN = {"spatial_factor": 8, "temporal_factor": 4, "frame_rule": {"base": 1, "step": 4}}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a shared 2-core machine
    yield
    torch.set_num_threads(before)


def test_latent_grid_sizes_and_errors() -> None:
    assert latent_grid(WAN, (1, 2, 2), 9, 32, 64) == ((3, 4, 8), (3, 2, 4))
    assert latent_grid(WAN, (1, 2, 2), 1, 48, 16) == ((1, 6, 2), (1, 3, 1))
    with pytest.raises(ValueError, match=r"10 frames .* 1 \+ 4k \(e\.g\. 9 or 13\)"):
        latent_grid(WAN, (1, 2, 2), 10, 32, 32)
    with pytest.raises(ValueError, match=r"height 24 is not a positive multiple of 16"):
        latent_grid(WAN, (1, 2, 2), 5, 24, 32)
    with pytest.raises(ValueError, match=r"temporal patch 2"):
        latent_grid(WAN, (2, 2, 2), 1, 32, 32)
    # sizes no run could hold are refused before anything is allocated
    assert latent_grid(WAN, (1, 2, 2), 1, 8192, 8192)[1] == (1, 512, 512)
    with pytest.raises(ValueError, match=r"100000x100000 is over 67,108,864 pixels a frame"):
        latent_grid(WAN, (1, 2, 2), 1, 100000, 100000)
    with pytest.raises(ValueError, match=r"401 frames of 8192x8192 make 26,476,544 tokens"):
        latent_grid(WAN, (1, 2, 2), 401, 8192, 8192)


GRIDS = [(2, 4, 2), (1, 2, 5), (1, 3, 3)]  # portrait video, landscape image, square image


def test_sample_latents_shapes_for_any_size() -> None:
    model = build_dit("DiT-tiny", in_channels=C, patch_size=(1, 2, 2), text_dim=TEXT_DIM)
    embeds = [torch.randn(n, TEXT_DIM) for n in (2, 5, 1)]
    out = sample_latents(model, GRIDS, text_embeds=embeds, steps=3, cfg_scale=4.0)
    assert [tuple(x.shape) for x in out] == [(C, 2, 8, 4), (C, 1, 4, 10), (C, 1, 6, 6)]
    assert all(torch.isfinite(x).all() for x in out)


def test_packed_cfg_equals_separate_runs_and_guidance_matters() -> None:
    model = build_dit("DiT-tiny", in_channels=C, patch_size=(1, 2, 2), text_dim=TEXT_DIM)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    embeds = [torch.randn(n, TEXT_DIM, generator=g) for n in (2, 5, 1)]
    together = sample_latents(model, GRIDS, text_embeds=embeds, steps=2, cfg_scale=3.0, seed=1)
    # sample 0 alone, with the guidance computed from two separate passes
    alone = sample_latents(model, GRIDS[:1], text_embeds=embeds[:1], steps=2, cfg_scale=3.0, seed=1)
    n0 = GRIDS[0][0] * GRIDS[0][1] * GRIDS[0][2]
    noise = torch.randn(n0, model.config.token_dim, generator=torch.Generator().manual_seed(1))
    from model.dit import grid_positions
    from model.flow import euler_sample

    pos, ids = grid_positions(GRIDS[0]), torch.zeros(n0, dtype=torch.long)
    te, tcu = embeds[0], torch.tensor([0, 2])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = model(x, pos, ids, t, text_embeds=te, text_cu_seqlens=tcu)
        uncond = model(
            x, pos, ids, t, text_embeds=te, text_cu_seqlens=tcu, text_keep=torch.tensor([False])
        )
        return uncond + 3.0 * (cond - uncond)

    with torch.no_grad():
        manual = model.unpatchify(
            euler_sample(velocity, noise, ids, 1, 2), torch.tensor([0, n0]), GRIDS[:1]
        )
    torch.testing.assert_close(alone[0], manual[0], atol=1e-5, rtol=1e-4)
    unguided = sample_latents(
        model, GRIDS[:1], text_embeds=embeds[:1], steps=2, cfg_scale=1.0, seed=1
    )
    assert not torch.allclose(unguided[0], alone[0], atol=1e-3)
    # each sample has noise of its own seed: what is packed beside it changes nothing
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-4)
    rest = sample_latents(model, GRIDS[1:], text_embeds=embeds[1:], steps=2, cfg_scale=3.0, seed=2)
    for got, want in zip(rest, together[1:], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    swapped = sample_latents(
        model, GRIDS[:2][::-1], text_embeds=embeds[:2][::-1], steps=2, cfg_scale=3.0, seed=[2, 1]
    )
    torch.testing.assert_close(swapped[1], alone[0], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="2 seeds for 3 samples"):
        sample_latents(model, GRIDS, text_embeds=embeds, steps=1, seed=[1, 2])


def test_plan_samples_names_every_clip(tmp_path: Path) -> None:
    one = plan_samples(["a kite"], 7, 1, str(tmp_path / "kite.mp4"))
    assert one == [Sample("a kite", 7, str(tmp_path / "kite.mp4"))]
    many = plan_samples(["a", "b"], 3, 2, str(tmp_path / "k.mp4"))
    assert [(s.prompt, s.seed, Path(s.out).name) for s in many] == [
        ("a", 3, "k-0.mp4"),
        ("a", 4, "k-1.mp4"),
        ("b", 3, "k-2.mp4"),
        ("b", 4, "k-3.mp4"),
    ]
    assert Path(plan_samples(["a"] * 11, 0, 1, "x.png")[10].out).name == "x-10.png"
    assert plan_samples(["a"] * 11, 0, 1, "x.png")[0].out == "x-00.png"
    named = plan_samples(["a", "b"], 0, 2, "out/p{prompt}-s{seed}.webm", frames=5)
    assert [s.out for s in named] == [
        "out/p0-s0.webm",
        "out/p0-s1.webm",
        "out/p1-s0.webm",
        "out/p1-s1.webm",
    ]
    assert plan_samples(["a"], 5, 1, "seed{seed}.gif")[0].out == "seed5.gif"
    with pytest.raises(ValueError, match=r"names 2 clips alike; add \{n\}"):
        plan_samples(["a"], 0, 2, "p{prompt}.mp4")
    with pytest.raises(ValueError, match=r"not a name template .*\{n\}, \{seed\} and \{prompt\}"):
        plan_samples(["a", "b"], 0, 1, "{name}.mp4")
    with pytest.raises(ValueError, match="holds one frame, not 5"):
        plan_samples(["a", "b"], 0, 1, "{n}.png", frames=5)
    with pytest.raises(ValueError, match="at least one sample per prompt, got 0"):
        plan_samples(["a"], 0, 0, "x.mp4")
    with pytest.raises(ValueError, match="no prompt"):
        plan_samples([], 0, 1, "x.mp4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained 3 steps on a corpus whose manifest names a real tiny Wan VAE."""
    tmp = tmp_path_factory.mktemp("sample")
    vae_dir = build_tiny_vae(str(tmp / "vae"))
    vae = describe_pretrained(vae_dir)  # 16 latent channels, 8x spatial, 4x temporal
    latents = [torch.randn(16, t, h, w) for t, h, w in [(1, 4, 4), (2, 2, 6), (3, 4, 2)]]
    root = make_corpus(tmp / "corpus", latents, vae=vae)
    out = tmp / "run"
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train(str(root), str(out), TrainConfig(steps=3, token_budget=64, lr=1e-3))
    return root, out / "checkpoint.pt"


@pytest.mark.parametrize(
    ("frames", "height", "width", "name"),
    [
        (5, 48, 16, "out.mp4"),  # portrait video
        (9, 16, 32, "out.webm"),  # landscape video, VP9
        (5, 16, 16, "out.mkv"),
        (1, 32, 48, "out.png"),  # one image
        (1, 16, 32, "one.mp4"),  # one frame, as the video file asked for
    ],
)
def test_sample_to_file_writes_decoded_video(
    trained: tuple[Path, Path], tmp_path: Path, frames: int, height: int, width: int, name: str
) -> None:
    root, ckpt = trained
    out = str(tmp_path / name)
    path = sample_to_file(str(ckpt), str(root), "a test", frames, height, width, 2, 3.0, out)
    assert path == out  # the file asked for, never another name
    if name.endswith(".png"):
        assert np.asarray(Image.open(path)).shape == (height, width, 3)
        return
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == 16  # the corpus names no encode rate: the default
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(decoded) == frames and decoded[0].shape == (height, width, 3)


def test_write_video_formats_rates_and_refusals(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (3, 16, 32, 3), dtype=np.uint8)
    gif = write_video(frames, str(tmp_path / "a.gif"), fps=10)
    with Image.open(gif) as image:
        assert image.n_frames == 3 and image.info["duration"] == 100
    mp4 = write_video(frames, str(tmp_path / "a.mp4"), fps=24000 / 1001)
    with av.open(mp4) as container:
        assert container.streams.video[0].average_rate == Fraction(24000, 1001)
    jpg = write_video(frames[:1], str(tmp_path / "a.jpg"))
    assert Image.open(jpg).size == (32, 16)
    with pytest.raises(ValueError, match=r"a\.png: \.png holds one frame, not 3; use \.mp4"):
        write_video(frames, str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match=r"unknown output type '\.avi'"):
        check_output(str(tmp_path / "a.avi"), 3)
    with pytest.raises(ValueError, match=r"unknown output type '\(no suffix\)'"):
        check_output(str(tmp_path / "a"), 1)
    for fps in (0.0, -3.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"b\.mp4: the frame rate must be a positive"):
            write_video(frames, str(tmp_path / "b.mp4"), fps=fps)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.jpg", "a.mp4"]
    # where the file cannot be written: named before or after the encode, nothing left
    with pytest.raises(ValueError, match=r"a\.mp4 is a folder; name the file to write"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.mp4").mkdir()
        write_video(frames, str(tmp_path / "d" / "a.mp4"))
    with pytest.raises(OSError, match=r"cannot write .*a\.jpg/b\.mp4: .*a\.jpg is a file"):
        write_video(frames, str(tmp_path / "a.jpg" / "b.mp4"))
    with pytest.raises(av.error.ExternalError):  # the encoder refuses odd sizes, mid-write
        write_video(frames[:, :15, :15], str(tmp_path / "odd.mp4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.jpg", "a.mp4", "d"]


def test_sample_cli_and_size_errors(
    trained: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import model.weights
    from reelpack.cli import main

    _, ckpt = trained  # the corpus comes from the checkpoint's config
    out = tmp_path / "clip.mp4"
    args = ["sample", str(ckpt), "--prompt", "x", "--height", "16", "--width", "16", "--steps", "1"]
    reads: list[tuple[object, bool]] = []
    real_load = model.weights._load

    def counted(path: object, map_location: object, mmap: bool) -> object:
        reads.append((path, mmap))
        return real_load(path, map_location, mmap)  # type: ignore[arg-type]

    monkeypatch.setattr(model.weights, "_load", counted)
    with caplog.at_level("WARNING", logger="model.sample"):
        assert main([*args, "--frames", "5", "--out", str(out)]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert reads == [(str(ckpt), True)]  # read once, mapped: the optimizer state never is
    # the model takes no captions: a prompt is said to change nothing, not silently dropped
    assert "trained without captions" in caplog.text and "the prompt" in caplog.text
    assert main([*args, "--frames", "6", "--out", str(out)]) == 2
    assert "frame rule" in capsys.readouterr().err
    # many clips, one load: prompts from a file and the command line, two seeds each
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite\n# not a prompt\n\nrain on a lake\n")
    reads.clear()
    many = ["--frames", "1", "--num-samples", "2", "--batch-size", "3", "--seed", "5"]
    template = str(tmp_path / "many" / "p{prompt}-s{seed}.png")
    assert main([*args, "--prompt", f"@{prompts}", *many, "--out", template]) == 0
    assert reads == [(str(ckpt), True)]
    lines = capsys.readouterr().out.splitlines()
    made = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert made == [f"p{p}-s{s}.png" for p in range(3) for s in (5, 6)]
    assert lines[0] == f"wrote {tmp_path / 'many' / 'p0-s5.png'}  seed 5  x"
    assert lines[-1] == f"wrote {tmp_path / 'many' / 'p2-s6.png'}  seed 6  rain on a lake"
    # a clip is the same alone as in its batch: its prompt and seed decide it
    alone = tmp_path / "alone.png"
    assert main([*args[:2], *args[4:], "--seed", "6", "--out", str(alone)]) == 0
    got = np.asarray(Image.open(tmp_path / "many" / "p1-s6.png"), dtype=int)
    assert np.abs(got - np.asarray(Image.open(alone), dtype=int)).max() <= 1
    assert main([*args, "--prompt", "@" + str(tmp_path / "none.txt"), "--out", str(out)]) == 1
    assert "prompt file" in capsys.readouterr().err
    assert main([*args, "--num-samples", "2", "--out", str(tmp_path / "same{prompt}.mp4")]) == 2
    assert "names 2 clips alike" in capsys.readouterr().err
    # a format that cannot hold the clip fails before any model is loaded
    assert main([*args, "--frames", "5", "--out", str(tmp_path / "clip.png")]) == 2
    assert "holds one frame, not 5" in capsys.readouterr().err
    assert not (tmp_path / "clip.png").exists()


def test_sample_names_a_bad_checkpoint_or_setting_before_building_the_model(
    trained: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import model.train
    from reelpack.cli import main

    _, ckpt = trained
    junk, cut, folder = tmp_path / "junk.pt", tmp_path / "cut.pt", tmp_path / "dir.pt"
    junk.write_text("not a checkpoint\n")
    cut.write_bytes(ckpt.read_bytes()[:2000])
    folder.mkdir()
    foreign = tmp_path / "tensor.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    out = str(tmp_path / "x.mp4")
    size = ["--height", "16", "--width", "16", "--out", out]
    for path, words in [
        (junk, f"checkpoint {junk} is not a torch weights file, or it is cut short"),
        (cut, f"checkpoint {cut} is not a torch weights file, or it is cut short"),
        (folder, f"checkpoint {folder} is a folder, not a file"),
        (tmp_path / "none.pt", f"checkpoint {tmp_path / 'none.pt'} does not exist"),
        (foreign, f"checkpoint {foreign} holds no model and config"),
    ]:
        assert main(["sample", str(path), *size]) == 2
        assert f"reelpack sample: {words}" in capsys.readouterr().err

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the request was checked")

    monkeypatch.setattr(model.train, "model_from_checkpoint", load)
    for extra, words in [
        (["--cfg", "nan"], "the guidance scale must be a number, got nan"),
        (["--steps", "0"], "need at least one sampling step, got 0"),
        (["--frames", "4"], "4 frames does not follow the VAE frame rule"),
        (["--width", "20"], "width 20 is not a positive multiple of 16"),
    ]:
        assert main(["sample", str(ckpt), *size, *extra]) == 2
        assert words in capsys.readouterr().err
    assert not Path(out).exists()


def test_sample_refuses_a_corpus_with_another_vae(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    _, ckpt = trained
    other = make_corpus(tmp_path / "other", smooth_latents([(1, 2, 2)]))
    with pytest.raises(ValueError, match="not the one"):
        sample_to_file(str(ckpt), str(other), "", 1, 16, 16, 1, 1.0, str(tmp_path / "x.png"))
    # the same VAE config with other weights (a fine-tuned VAE's corpus) is another VAE
    root, _ = trained
    manifest = json.loads((root / schemas.MANIFEST_NAME).read_text())
    assert len(manifest["vae"]["weights_sha256"]) == 64
    manifest["vae"]["weights_sha256"] = "0" * 64
    tuned = make_corpus(tmp_path / "tuned", smooth_latents([(1, 2, 2)]), vae=manifest["vae"])
    with pytest.raises(ValueError, match="not the one"):
        sample_to_file(str(ckpt), str(tuned), "", 1, 16, 16, 1, 1.0, str(tmp_path / "y.png"))


def test_sample_with_the_corpus_text_encoder(tmp_path: Path) -> None:
    from model.text import TextEncoder
    from model.tiny_text import build_tiny_text_encoder

    encoder_dir = build_tiny_text_encoder(str(tmp_path / "t5"))
    entry = TextEncoder.from_pretrained(encoder_dir, device="cpu").describe()
    vae = describe_pretrained(build_tiny_vae(str(tmp_path / "vae")))
    latents = [torch.randn(16, 1, 2, 4), torch.randn(16, 2, 4, 2)]
    root = make_corpus(
        tmp_path / "c", latents, vae=vae, text_dim=int(entry["dim"]), text_encoder=entry
    )
    train(str(root), str(tmp_path / "run"), TrainConfig(steps=2, token_budget=64))
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    path = sample_to_file(ckpt, None, "a kite", 5, 32, 16, 2, 4.0, str(tmp_path / "k.mp4"))
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 5
    # in a batch, each clip gets its own prompt's embeddings: as it would alone. Two
    # steps leave the zero-initialised caption path at zero; random weights, larger on
    # the cross-attention, let the prompt change the picture by several levels.
    state = torch.load(ckpt, weights_only=False)
    g = torch.Generator().manual_seed(0)
    for weights in (state["model"], state["ema"]):
        for name, w in weights.items():
            if w.is_floating_point():
                scale = 1.0 if "cross_attn" in name else 0.2
                weights[name] = w + scale * torch.randn(w.shape, generator=g)
    torch.save(state, ckpt)
    runs = [("a kite", 0), ("rain on a lake at dusk", 0), ("rain on a lake at dusk", 1)]
    batch = [Sample(p, seed, str(tmp_path / f"b{i}.png")) for i, (p, seed) in enumerate(runs)]
    made: list[Sample] = []
    paths = sample_to_files(ckpt, None, batch, 1, 16, 16, 2, 4.0, batch_size=2, written=made.append)
    assert paths == [b.out for b in batch] and made == batch
    images = [np.asarray(Image.open(b.out), dtype=int) for b in batch]
    for i, (prompt, seed) in enumerate(runs):
        one = sample_to_file(
            ckpt, None, prompt, 1, 16, 16, 2, 4.0, str(tmp_path / "1.png"), seed=seed
        )
        assert np.abs(np.asarray(Image.open(one), dtype=int) - images[i]).max() <= 1
    assert np.abs(images[0] - images[1]).max() > 1  # the prompt matters


def test_sample_runs_on_the_gpu_when_there_is_one(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.train

    devices: list[str] = []

    def load(state: dict, ckpt: str, device: str, ema: bool) -> None:
        devices.append(device)
        raise RuntimeError("stop after choosing the device")

    monkeypatch.setattr(model.train, "model_from_checkpoint", load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _, ckpt = trained
    for device in ("auto", "cpu"):
        with pytest.raises(RuntimeError, match="stop after"):
            sample_to_file(
                str(ckpt), None, "", 1, 16, 16, 1, 1.0, str(tmp_path / "x.png"), device=device
            )
    with pytest.raises(RuntimeError, match="stop after"):
        sample_to_file(str(ckpt), None, "", 1, 16, 16, 1, 1.0, str(tmp_path / "x.png"))
    assert devices == ["cuda", "cpu", "cuda"]


def test_sample_size_defaults_to_the_corpus_most_common_sample(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --frames, --height or --width a clip is shaped like the corpus's most
    common sample (an image file: one frame); a size given is kept."""
    import json

    from reelpack.cli import main

    root, ckpt = trained
    vae = json.loads((root / "manifest.json").read_text())["vae"]  # the checkpoint's VAE
    shapes = [(1, 4, 4), (2, 2, 6), (3, 4, 2), (2, 2, 6)]
    corpus = make_corpus(tmp_path / "c", [torch.randn(16, *s) for s in shapes], vae=vae)
    assert corpus_sample_size(str(corpus), vae) == (5, 16, 48)  # 1 + 4 x 1 frames, 8x space
    base = ["sample", str(ckpt), "--corpus", str(corpus), "--steps", "1"]
    for extra, name, want in [
        ([], "clip.mp4", (5, 16, 48)),
        (["--height", "32"], "tall.mp4", (5, 32, 48)),
        (["--frames", "9"], "long.webm", (9, 16, 48)),
        ([], "still.png", (1, 16, 48)),
    ]:
        out = tmp_path / name
        assert main([*base, *extra, "--out", str(out)]) == 0, capsys.readouterr().err
        if name.endswith(".png"):
            assert np.asarray(Image.open(out)).shape[:2] == want[1:]
            continue
        with av.open(str(out)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert (len(frames), *frames[0].shape[:2]) == want
    # an image file cannot hold the corpus's 5 frames when --frames asks for them
    assert main([*base, "--frames", "5", "--out", str(tmp_path / "x.png")]) == 2
    assert "holds one frame, not 5" in capsys.readouterr().err
    empty = make_corpus(tmp_path / "empty", [], vae=vae)
    assert main([*base[:2], "--corpus", str(empty), "--out", str(tmp_path / "e.mp4")]) == 2
    assert "keeps no sample to take a size from" in capsys.readouterr().err
