"""pipeline.stages.encode: planning (property tests) and ``Encode(cfg)(batch)`` without Ray."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

import schemas
from model.vae import VideoVAE, build_tiny_vae
from pipeline.stages.base import rows_to_batch
from pipeline.stages.encode import (
    Encode,
    EncodeConfig,
    cover_geometry,
    plan_clip,
    resample_indices,
)
from pipeline.video import decode_mp4, encode_mp4, resample_times


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_vae(str(tmp_path_factory.mktemp("tiny_wan")))


@pytest.fixture(scope="module")
def cfg(tiny_dir: str) -> EncodeConfig:
    return EncodeConfig(
        vae=tiny_dir,
        vae_subfolder=None,
        pixel_budget=9216,  # e.g. 128x72
        extra_pixel_budgets=(4096, 9216),  # 9216 repeats the primary: skipped
        target_fps=8.0,
        max_frames=9,
        device="cpu",
    )


@pytest.fixture(scope="module")
def stage(cfg: EncodeConfig) -> Encode:
    return Encode(cfg)


def _clip(t: int, h: int, w: int, seed: int) -> bytes:
    """A moving gradient clip as mp4 bytes at 24 fps."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(1, h, w, 3)).astype(np.int32)
    shift = np.arange(t).reshape(t, 1, 1, 1) * 7
    return encode_mp4(((base + shift) % 256).astype(np.uint8), fps=24.0)


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    return rows_to_batch(rows, columns=("clip_id", "status", "error", "clip_bytes"))


# --- planning: pure functions ---------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    width=st.integers(256, 3840),
    aspect=st.floats(1 / 3, 3),
    budget=st.sampled_from([256 * 256, 480 * 832, 720 * 1280]),
    extra=st.lists(st.sampled_from([128 * 128, 256 * 256, 480 * 832]), max_size=2),
    num_frames=st.integers(1, 200),
    fps=st.sampled_from([8.0, 23.976, 24.0, 30.0, 60.0]),
    target_fps=st.sampled_from([None, 8.0, 16.0, 24.0]),
    max_frames=st.integers(1, 121),
    patch=st.sampled_from([(1, 2, 2), (2, 2, 2), (1, 1, 1)]),
    step=st.sampled_from([4, 8]),
)
def test_plan_properties(
    width: int,
    aspect: float,
    budget: int,
    extra: list[int],
    num_frames: int,
    fps: float,
    target_fps: float | None,
    max_frames: int,
    patch: tuple[int, int, int],
    step: int,
) -> None:
    height = max(1, round(width / aspect))
    cfg = EncodeConfig(
        pixel_budget=budget,
        extra_pixel_budgets=tuple(extra),
        target_fps=target_fps,
        max_frames=max_frames,
        patch_size=patch,
    )
    spatial = 8
    try:
        plan = plan_clip(num_frames, fps, width, height, cfg, spatial, step)
    except ValueError as e:  # only when no latent length fits the temporal patch
        assert patch[0] > 1 and "temporal patch" in str(e)
        return
    n = len(plan.frame_indices)
    # frame rule, frame cap, latent length divisible by the temporal patch
    assert 1 <= n <= max_frames and (n - 1) % step == 0
    assert (1 + (n - 1) // step) % patch[0] == 0
    idx = plan.frame_indices
    assert idx[0] == 0 and np.all(np.diff(idx) > 0) and idx[-1] < num_frames
    assert plan.fps <= fps + 1e-9
    multiple = spatial * max(patch[1], patch[2])
    budgets = [budget, *extra]
    assert len(plan.sizes) == len({(s.width, s.height) for s in plan.sizes}) <= len(budgets)
    for size in plan.sizes:
        assert size.width % multiple == 0 and size.height % multiple == 0
        assert size.width * size.height <= max(budgets)
        assert size.width * size.height <= max(width * height, multiple**2)
        # aspect error bounded by one block of rounding on the shorter side
        error = abs(math.log((size.width / size.height) / (width / height)))
        assert error <= max(0.03, multiple / min(size.width, size.height)), size
        # the resize covers the target and the crop lies inside it
        assert size.resize_width >= size.width and size.resize_height >= size.height
        assert 0 <= size.crop_left <= size.resize_width - size.width
        assert 0 <= size.crop_top <= size.resize_height - size.height
    primary = plan.sizes[0]
    assert primary.width * primary.height <= budget


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(2, 4000),
    height=st.integers(2, 4000),
    tw=st.integers(1, 64).map(lambda k: 16 * k),
    th=st.integers(1, 64).map(lambda k: 16 * k),
)
def test_cover_geometry_keeps_aspect(width: int, height: int, tw: int, th: int) -> None:
    rw, rh, left, top = cover_geometry(width, height, tw, th)
    assert rw >= tw and rh >= th and left >= 0 and top >= 0
    assert left + tw <= rw and top + th <= rh
    # one side is exact, the other keeps the aspect up to rounding to whole pixels
    assert rw == tw or rh == th
    assert abs(rw * height - rh * width) <= max(width, height)


def test_resample_indices_to_target_fps() -> None:
    assert resample_indices(12, 24.0, 8.0).tolist() == [0, 3, 6, 9]
    assert resample_indices(5, 8.0, 16.0).tolist() == [0, 1, 2, 3, 4]  # never upsamples
    assert resample_indices(5, 30.0, None).tolist() == [0, 1, 2, 3, 4]


def test_resample_times_holds_and_skips_frames_by_their_times() -> None:
    # 10 fps for 0.3 s, then 30 fps: at 10 fps the fast part gives every third frame
    times = [0.0, 0.1, 0.2, 0.3, 1 / 3 + 0.0001, 0.3667, 0.4, 0.4333, 0.4667]
    assert resample_times(times, 0.5, 10.0).tolist() == [0, 1, 2, 3, 6]
    # a gap: the frame before it repeats until the next one is due
    assert resample_times([0.0, 0.05, 0.4], 0.45, 10.0).tolist() == [0, 1, 1, 1, 2]
    assert resample_times([2.0], 2.04, 16.0).tolist() == [0]  # one frame: itself


def test_plan_of_an_image_is_one_frame() -> None:
    plan = plan_clip(1, 0.0, 640, 480, EncodeConfig(pixel_budget=256 * 256), 8, 4)
    assert plan.frame_indices.tolist() == [0]
    assert (plan.sizes[0].width, plan.sizes[0].height) == (272, 208)  # 4:3 within 2%


# --- the stage on a batch, no Ray ------------------------------------------------------------
def test_encode_batch(stage: Encode, cfg: EncodeConfig) -> None:
    landscape = _clip(24, 90, 160, seed=1)  # 1 s at 24 fps -> 8 frames at 8 fps -> 5
    portrait = _clip(30, 160, 90, seed=2)
    image = _clip(1, 72, 128, seed=3)
    rows: list[dict[str, Any]] = [
        {"clip_id": "land", "status": "kept", "error": None, "clip_bytes": landscape},
        {"clip_id": "rej", "status": "rejected", "error": None, "clip_bytes": portrait},
        {"clip_id": "bad", "status": "kept", "error": None, "clip_bytes": b"\x00garbage"},
        {"clip_id": "port", "status": "kept", "error": None, "clip_bytes": portrait},
        {"clip_id": "img", "status": "kept", "error": None, "clip_bytes": image},
        {"clip_id": None, "status": None, "error": None, "clip_bytes": None},  # placeholder
    ]
    out = stage(_batch(rows))
    assert len(out["status"]) == len(rows)
    assert out["clip_bytes"][0] == landscape  # input columns pass through
    by_id = {cid: i for i, cid in enumerate(out["clip_id"]) if cid is not None}

    # garbage fails alone, with the clip named; untouched rows keep their state
    bad = by_id["bad"]
    assert out["status"][bad] == "error" and "bad" in out["error"][bad]
    assert out["latents"][bad] is None
    rej = by_id["rej"]
    assert out["status"][rej] == "rejected" and out["error"][rej] is None
    assert all(out[c][rej] is None for c in ("latents", "latent_shape", "encode_width"))
    assert out["status"][5] is None and out["latents"][5] is None

    expected = {  # clip -> (W, H) primary, frames, extra (W, H) or None
        "land": ((112, 64), 5, (80, 48)),
        "port": ((64, 112), 9, (48, 80)),
        "img": ((112, 64), 1, (80, 48)),
    }
    latents = {}
    for cid, ((w, h), frames, extra) in expected.items():
        i = by_id[cid]
        assert out["status"][i] == "kept" and out["error"][i] is None, out["error"][i]
        t = 1 + (frames - 1) // 4
        assert list(out["latent_shape"][i]) == [16, t, h // 8, w // 8]
        assert out["num_tokens"][i] == t * (h // 16) * (w // 16)
        assert (out["encode_width"][i], out["encode_height"][i]) == (w, h)
        assert out["encode_frames"][i] == frames == len(out["encode_frame_indices"][i])
        src_h, src_w = decode_mp4(rows[i]["clip_bytes"])[0].shape[1:3]
        assert (out["encode_src_width"][i], out["encode_src_height"][i]) == (src_w, src_h)
        rw, rh = out["encode_resize_width"][i], out["encode_resize_height"][i]
        assert out["encode_crop_left"][i] + w <= rw and out["encode_crop_top"][i] + h <= rh
        tensors = st_load(out["latents"][i])
        z = tensors[schemas.TENSOR_LATENTS]
        assert z.dtype == torch.bfloat16 and list(z.shape) == list(out["latent_shape"][i])
        assert torch.isfinite(z.float()).all()
        name = schemas.latents_tensor_name(extra[1], extra[0])
        assert list(out["extra_latents"][i]) == [name]  # the repeated 9216 budget is skipped
        assert sorted(tensors) == sorted([schemas.TENSOR_LATENTS, name])
        ex = tensors[name]
        assert list(out["extra_latent_shapes"][i]) == [list(ex.shape)]
        assert list(ex.shape) == [16, t, extra[1] // 8, extra[0] // 8]
        assert list(out["extra_num_tokens"][i]) == [t * (extra[1] // 16) * (extra[0] // 16)]
        latents[cid] = z
    assert out["encode_fps"][by_id["land"]] == 8.0
    # 24 fps -> 8 fps: every third payload frame
    assert list(out["encode_frame_indices"][by_id["land"]]) == [0, 3, 6, 9, 12]
    assert not torch.equal(latents["land"][:, :1], latents["img"])  # different inputs


def test_encode_matches_the_vae_on_the_planned_frames(stage: Encode, cfg: EncodeConfig) -> None:
    """The stored latent is exactly VideoVAE.encode of the recorded frames, size and crop."""
    import cv2

    payload = _clip(12, 90, 160, seed=4)
    out = stage(_batch([{"clip_id": "c", "status": "kept", "error": None, "clip_bytes": payload}]))
    frames, _ = decode_mp4(payload)
    frames = frames[list(out["encode_frame_indices"][0])]
    rw, rh = out["encode_resize_width"][0], out["encode_resize_height"][0]
    x0, y0 = out["encode_crop_left"][0], out["encode_crop_top"][0]
    w, h = out["encode_width"][0], out["encode_height"][0]
    prepared = np.stack(
        [
            cv2.resize(f, (rw, rh), interpolation=cv2.INTER_AREA)[y0 : y0 + h, x0 : x0 + w]
            for f in frames
        ]
    )
    video = torch.from_numpy(prepared).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    vae = VideoVAE.from_pretrained(cfg.vae)
    want = vae.encode(video)[0].to(torch.bfloat16)
    got = st_load(out["latents"][0])[schemas.TENSOR_LATENTS]
    assert torch.equal(got, want)


def test_encode_without_extra_budgets_stores_one_tensor(cfg: EncodeConfig) -> None:
    stage = Encode(replace(cfg, extra_pixel_budgets=()))
    out = stage(
        _batch(
            [{"clip_id": "c", "status": "kept", "error": None, "clip_bytes": _clip(5, 90, 160, 5)}]
        )
    )
    assert list(st_load(out["latents"][0])) == [schemas.TENSOR_LATENTS]
    assert out["extra_latents"][0] is None and out["extra_latent_shapes"][0] is None
