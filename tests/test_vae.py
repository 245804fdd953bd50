"""model.vae: tiny VAEs saved and loaded through the user path, strict shapes, normalisation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.fingerprint import weights_sha256
from model.vae import VideoVAE, build_tiny_vae, describe_pretrained, native_size


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_vae(str(tmp_path_factory.mktemp("tiny_wan")))


@pytest.fixture(scope="module")
def vae(tiny_dir: str) -> VideoVAE:
    return VideoVAE.from_pretrained(tiny_dir)


def _video(t: int, h: int, w: int, b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def test_build_tiny_vae_is_idempotent(tiny_dir: str) -> None:
    weights = Path(tiny_dir) / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_vae(tiny_dir) == tiny_dir
    assert weights.stat().st_mtime_ns == before


def test_build_tiny_vae_into_a_new_nested_folder(tmp_path: Path) -> None:
    out = str(tmp_path / "cache" / "tiny" / "vae")
    assert build_tiny_vae(out) == out
    assert sorted(p.name for p in (tmp_path / "cache" / "tiny").iterdir()) == [
        "vae"
    ]  # no staging left
    assert VideoVAE.from_pretrained(out).latent_channels == 16


def test_from_pretrained_reads_wan_facts(vae: VideoVAE, tiny_dir: str) -> None:
    assert (vae.name, vae.vae_class) == (tiny_dir, "AutoencoderKLWan")
    assert (vae.spatial_factor, vae.temporal_factor, vae.frame_step) == (8, 4, 4)
    assert vae.latent_channels == 16
    # the wrapper holds the model diffusers loaded from the folder, weights included
    from diffusers import AutoencoderKLWan

    ref = AutoencoderKLWan.from_pretrained(tiny_dir)
    for (name, a), (_, b) in zip(
        vae.vae.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_from_pretrained_rejects_unknown_class(tiny_dir: str) -> None:
    with pytest.raises(ValueError, match="unsupported vae_class"):
        VideoVAE.from_pretrained(tiny_dir, vae_class="AutoencoderKL")


@pytest.mark.parametrize(("n", "valid"), [(1, 1), (4, 1), (5, 5), (8, 5), (9, 9), (12, 9)])
def test_valid_frames(vae: VideoVAE, n: int, valid: int) -> None:
    assert vae.valid_frames(n) == valid


def test_valid_frames_needs_one_frame(vae: VideoVAE) -> None:
    with pytest.raises(ValueError):
        vae.valid_frames(0)


@pytest.mark.parametrize(
    ("b", "t", "h", "w", "latent"),
    [
        (1, 1, 8, 8, (16, 1, 1, 1)),  # a single frame: an image
        (1, 5, 16, 24, (16, 2, 2, 3)),
        (2, 9, 16, 16, (16, 3, 2, 2)),
        (1, 9, 24, 16, (16, 3, 3, 2)),  # portrait
    ],
)
def test_encode_shapes(
    vae: VideoVAE, b: int, t: int, h: int, w: int, latent: tuple[int, int, int, int]
) -> None:
    assert vae.latent_shape(t, h, w) == latent
    z = vae.encode(_video(t, h, w, b))
    assert z.shape == (b, *latent)
    assert z.dtype == torch.float32
    assert torch.isfinite(z).all()


@pytest.mark.parametrize(
    ("t", "h", "w", "match"),
    [
        (4, 16, 16, "4 frames"),
        (6, 16, 16, "6 frames"),
        (5, 12, 16, "12x16"),
        (5, 16, 20, "16x20"),
        (5, 4, 8, "4x8"),
    ],
)
def test_encode_refuses_what_the_vae_would_truncate(
    vae: VideoVAE, t: int, h: int, w: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        vae.encode(_video(t, h, w))


@pytest.mark.parametrize(
    "video",
    [
        torch.zeros(3, 5, 16, 16),
        torch.zeros(1, 4, 5, 16, 16),
        torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8),
    ],
)
def test_encode_refuses_wrong_layout(vae: VideoVAE, video: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="expected a float video"):
        vae.encode(video)


def test_encode_normalises_like_the_wan_pipeline(vae: VideoVAE) -> None:
    x = _video(5, 16, 16)
    raw = vae.vae.encode(x).latent_dist.mode()  # (1, 16, 2, 2, 2), diffusers directly
    cfg = vae.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(vae.encode(x), (raw - mean) / std)


def test_decode_undoes_the_normalisation(vae: VideoVAE) -> None:
    x = _video(9, 16, 24)
    z = vae.encode(x)
    video = vae.decode(z)
    assert video.shape == x.shape
    assert video.min() >= -1 and video.max() <= 1
    raw = vae.vae.encode(x).latent_dist.mode()
    with torch.no_grad():
        expected = vae.vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(video, expected, atol=1e-5, rtol=1e-4)


def test_decode_checks_channels(vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match="latents"):
        vae.decode(torch.zeros(1, 4, 2, 2, 2))


def test_describe_and_from_manifest(vae: VideoVAE, tiny_dir: str, tmp_path: Path) -> None:
    entry = json.loads(json.dumps(vae.describe()))  # JSON-able, and what a manifest stores
    assert entry["class"] == "AutoencoderKLWan"
    assert entry["frame_rule"] == {"base": 1, "step": 4}
    assert (entry["spatial_factor"], entry["temporal_factor"], entry["latent_channels"]) == (
        8,
        4,
        16,
    )
    norm = entry["normalization"]
    assert norm["kind"] == "mean_std" and len(norm["mean"]) == len(norm["std"]) == 16
    assert len(entry["config_sha256"]) == 64

    described = describe_pretrained(tiny_dir)  # what a build's manifest stores
    assert described == {**entry, "weights_sha256": weights_sha256(tiny_dir)}
    again = VideoVAE.from_manifest(described)
    assert again.describe() == entry
    entry = described
    x = _video(5, 16, 16)
    torch.testing.assert_close(again.encode(x), vae.encode(x))

    # the same VAE moved elsewhere: same config hash, so it loads from the new path
    moved = tmp_path / "moved"
    vae.vae.save_pretrained(str(moved))
    assert VideoVAE.from_manifest(entry, path_override=str(moved)).name == str(moved)

    # the same config with other weights (a fine-tuned copy) is refused
    tuned = tmp_path / "tuned"
    with torch.no_grad():
        first = next(vae.vae.parameters())
        first.add_(1.0)
        try:
            vae.vae.save_pretrained(str(tuned))
        finally:
            first.sub_(1.0)
    with pytest.raises(ValueError, match=r"other weights than the corpus was built with"):
        VideoVAE.from_manifest(entry, path_override=str(tuned))
    # a manifest written before weight digests were kept loads it
    old = {k: v for k, v in entry.items() if k != "weights_sha256"}
    assert VideoVAE.from_manifest(old, path_override=str(tuned)).name == str(tuned)

    # a different VAE is refused
    other_dir = tmp_path / "other"
    from diffusers import AutoencoderKLWan

    smaller: Any = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True],
    )
    smaller.save_pretrained(str(other_dir))
    with pytest.raises(ValueError, match="config sha256"):
        VideoVAE.from_manifest(entry, path_override=str(other_dir))


# --- the other families, from tiny configs like diffusers' own tests ---------------------
_OTHER_FAMILIES: dict[str, tuple[dict[str, Any], str]] = {
    "AutoencoderKLCogVideoX": (
        dict(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
        ),
        "scale",
    ),
    "AutoencoderKLHunyuanVideo": (
        dict(
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            mid_block_add_attention=False,
        ),
        "scale",
    ),
    "AutoencoderKLLTXVideo": (
        dict(
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            latent_channels=8,
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4,
            upsample_factor=(1,) * 4,
            patch_size=1,
            patch_size_t=1,
        ),
        "mean_std_scale",
    ),
}


@pytest.mark.parametrize("vae_class", sorted(_OTHER_FAMILIES))
def test_other_families_load_with_their_factors(vae_class: str, tmp_path: Path) -> None:
    import diffusers

    config, kind = _OTHER_FAMILIES[vae_class]
    torch.manual_seed(0)
    getattr(diffusers, vae_class)(**config).save_pretrained(str(tmp_path))
    vae = VideoVAE.from_pretrained(str(tmp_path), vae_class=vae_class)
    assert vae.normalization["kind"] == kind
    assert vae.latent_channels == config["latent_channels"]
    t, s = 1 + 2 * vae.frame_step, 2 * vae.spatial_factor
    x = _video(t, s, s)
    z = vae.encode(x)  # also checks the shape against latent_shape
    assert z.shape == (1, *vae.latent_shape(t, s, s))
    assert vae.decode(z).shape == x.shape
    entry = json.loads(json.dumps(vae.describe()))
    assert VideoVAE.from_manifest(entry).config_sha256 == entry["config_sha256"]


# --- native_size -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src", "budget", "multiple", "size"),
    [
        ((1920, 1080), 1280 * 720, 16, (1280, 720)),
        ((1080, 1920), 1280 * 720, 16, (720, 1280)),
        ((720, 720), 512 * 512, 16, (512, 512)),
    ],
)
def test_native_size_known(
    src: tuple[int, int], budget: int, multiple: int, size: tuple[int, int]
) -> None:
    assert native_size(*src, budget, multiple) == size


def test_native_size_needs_one_block() -> None:
    with pytest.raises(ValueError):
        native_size(100, 100, 15 * 15, 16)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 8000),
    height=st.integers(1, 8000),
    multiple=st.sampled_from([8, 16, 32]),
    blocks=st.integers(1, 4000),
)
def test_native_size_properties(width: int, height: int, multiple: int, blocks: int) -> None:
    budget = blocks * multiple * multiple
    w, h = native_size(width, height, budget, multiple)
    assert w * h <= budget
    assert w % multiple == 0 and h % multiple == 0
    assert w >= multiple and h >= multiple


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(160, 4096),
    aspect=st.floats(1 / 3, 3),
    multiple=st.sampled_from([8, 16, 32]),
    side=st.integers(256, 1280),
)
def test_native_size_keeps_aspect_and_fills_budget(
    width: int, aspect: float, multiple: int, side: int
) -> None:
    """Reasonable inputs: aspect within 3x, budget of at least 16x16 blocks."""
    height = max(1, round(width / aspect))
    budget = max(side * side, (16 * multiple) ** 2)
    w, h = native_size(width, height, budget, multiple)
    # within 3%, or one block of rounding on the shorter side when the grid is that coarse
    assert abs(math.log((w / h) / (width / height))) <= max(0.03, multiple / min(w, h))
    assert w * h >= 0.7 * budget


def test_compression_and_frame_rule(vae: VideoVAE) -> None:
    assert vae.compression == (4, 8, 8)  # (t, h, w)
    assert vae.frame_rule == (1, 4)
    base, step = vae.frame_rule
    for n in range(1, 30):
        valid = vae.valid_frames(n)
        assert valid <= n and (valid - base) % step == 0 and n - valid < step
