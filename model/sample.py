"""Generate a video (or an image) of any size and duration from a trained DiT checkpoint.

    reelpack sample /ckpt/run1/checkpoint.pt --prompt "a red kite over the sea" \\
        --frames 33 --height 272 --width 480 --steps 30 --cfg 5 --out kite.mp4

Gaussian noise is laid out as the latent token grid of the requested size (any aspect
ratio, any valid frame count, one frame = an image), integrated from t = 1 to 0 with
Euler steps on the training run's shifted schedule, with classifier-free guidance:
the conditional and the null-caption copies of every sample are *packed into one
sequence* and run in one forward pass. The latent is decoded with the corpus's VAE
(from its manifest) and written to the file named, in the format its suffix names:
.mp4/.m4v/.mov/.mkv (H.264), .webm (VP9), .gif, or for one frame also .png/.jpg/.webp;
at the corpus's frame rate (its encode ``target_fps``) unless one is given. The prompt is
encoded with the corpus's text encoder (manifest ``text_encoder``); a model trained
without caption embeddings samples unconditionally.

One run makes as many clips as it is asked for, the model, VAE and text encoder loaded
once: every prompt with every seed, a batch of them generated at once
(:func:`plan_samples`, :func:`sample_to_files`). Each clip's noise comes from its own
seed, so a clip is the same whichever batch it ran in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.device import resolve_device
from model.dit import DiT, grid_positions
from model.flow import euler_sample, resolution_shift

log = logging.getLogger(__name__)

__all__ = [
    "Sample",
    "check_output",
    "corpus_sample_size",
    "latent_grid",
    "plan_samples",
    "sample_latents",
    "sample_to_file",
    "sample_to_files",
    "write_video",
]

Grid = tuple[int, int, int]


# Sizes no sampler run can hold: refused before anything is allocated (a typo such as
# --height 100000 would otherwise exhaust the host's memory)
MAX_SAMPLE_PIXELS = 8192 * 8192
MAX_SAMPLE_TOKENS = 1 << 22


def latent_grid(
    vae: dict[str, Any], patch: Sequence[int], frames: int, height: int, width: int
) -> tuple[tuple[int, int, int], Grid]:
    """(T, H, W) latent size and (t, h, w) token grid of a clip; ValueError saying what fits.

    `vae` is the manifest's ``vae`` object: H and W must be multiples of
    spatial_factor x patch, and frames must follow the VAE's frame rule (e.g. 1 + 4k).
    """
    s, tf = int(vae["spatial_factor"]), int(vae["temporal_factor"])
    rule = vae.get("frame_rule") or {"base": 1, "step": tf}
    base, step = int(rule["base"]), int(rule["step"])
    pt, ph, pw = (int(p) for p in patch)
    problems = []
    if frames < base or (frames - base) % step:
        lower = base + max(frames - base, 0) // step * step
        problems.append(
            f"{frames} frames does not follow the VAE frame rule {base} + {step}k "
            f"(e.g. {lower} or {lower + step})"
        )
    for name, size, p in (("height", height, ph), ("width", width, pw)):
        multiple = s * p
        if size < multiple or size % multiple:
            lower = max(size // multiple, 1) * multiple
            problems.append(
                f"{name} {size} is not a positive multiple of {multiple} "
                f"(VAE spatial factor {s} x patch {p}; e.g. {lower} or {lower + multiple})"
            )
    if height * width > MAX_SAMPLE_PIXELS:
        problems.append(
            f"{width}x{height} is over {MAX_SAMPLE_PIXELS:,} pixels a frame (8192 x 8192)"
        )
    if problems:
        raise ValueError("cannot sample that size: " + "; ".join(problems))
    latent = (1 + (frames - base) // tf, height // s, width // s)
    tokens = latent[0] // max(pt, 1) * (latent[1] // ph) * (latent[2] // pw)
    if tokens > MAX_SAMPLE_TOKENS:
        raise ValueError(
            f"cannot sample that size: {frames} frames of {width}x{height} make {tokens:,} "
            f"tokens, over {MAX_SAMPLE_TOKENS:,}: fewer frames or a smaller size"
        )
    if latent[0] % pt:
        raise ValueError(
            f"{frames} frames give {latent[0]} latent frames, not a multiple of the "
            f"temporal patch {pt}"
        )
    return latent, (latent[0] // pt, latent[1] // ph, latent[2] // pw)


@torch.no_grad()
def sample_latents(
    model: DiT,
    grids: Sequence[Grid],
    *,
    text_embeds: Sequence[torch.Tensor] | None = None,  # per sample (L, text_dim)
    steps: int = 30,
    cfg_scale: float = 1.0,
    shift_base_tokens: int = 0,
    seed: int | Sequence[int] = 0,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Packed generation of several samples at once -> their latents (C, T, H, W).

    Each sample's noise comes from a generator of its own: ``seed`` is one seed per
    sample, or an int ``s`` for seeds ``s, s + 1, ...``. A sample's result therefore does
    not depend on what else is packed with it.
    """
    model.eval()
    s = len(grids)
    seeds = [seed + i for i in range(s)] if isinstance(seed, int) else [int(x) for x in seed]
    if len(seeds) != s:
        raise ValueError(f"{len(seeds)} seeds for {s} samples")
    lengths = torch.tensor([g[0] * g[1] * g[2] for g in grids])
    n = int(lengths.sum())
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    positions = torch.cat([grid_positions(g, device) for g in grids])  # (N, 3)
    ids = torch.repeat_interleave(torch.arange(s), lengths).to(device)  # (N,)
    noise = torch.cat(
        [
            torch.randn(
                int(length),
                model.config.token_dim,
                generator=torch.Generator(device=device).manual_seed(each),
                device=device,
            )
            for length, each in zip(lengths, seeds, strict=True)
        ]
    )

    te, tcu = None, None
    if model.config.text_dim and text_embeds is not None:
        if len(text_embeds) != s:
            raise ValueError(f"{len(text_embeds)} caption embeddings for {s} samples")
        te = torch.cat(list(text_embeds)).to(device=device, dtype=torch.float32)  # (M, Dt)
        tlen = torch.tensor([e.shape[0] for e in text_embeds])
        tcu = torch.nn.functional.pad(tlen.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    guided = te is not None and tcu is not None and cfg_scale != 1.0

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided:
            return model(x, positions, ids, t, cu_seqlens=cu, text_embeds=te, text_cu_seqlens=tcu)
        assert te is not None and tcu is not None
        # conditional and null-caption copies in one packed sequence of 2S samples
        keep = torch.cat([torch.ones(s, dtype=torch.bool), torch.zeros(s, dtype=torch.bool)])
        out = model(
            torch.cat([x, x]),
            torch.cat([positions, positions]),
            torch.cat([ids, ids + s]),
            torch.cat([t, t]),
            cu_seqlens=torch.cat([cu, cu[1:] + n]),
            text_embeds=torch.cat([te, te]),
            text_cu_seqlens=torch.cat([tcu, tcu[1:] + tcu[-1]]),
            text_keep=keep.to(device),
        )  # (2N, D)
        cond, uncond = out[:n], out[n:]
        return uncond + cfg_scale * (cond - uncond)

    shift = resolution_shift(lengths.to(device), shift_base_tokens)  # (S,)
    x0 = euler_sample(velocity, noise, ids, s, steps, shift)  # (N, token_dim)
    return model.unpatchify(x0, cu, grids)


# suffix -> (PyAV container format, codec); every one takes any frame count
VIDEO_FORMATS = {
    ".mp4": ("mp4", "libx264"),
    ".m4v": ("mp4", "libx264"),
    ".mov": ("mov", "libx264"),
    ".mkv": ("matroska", "libx264"),
    ".webm": ("webm", "libvpx-vp9"),
}
# suffix -> PIL format; one frame only
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_FPS = 16.0  # when neither the caller nor the corpus names a rate


def check_output(out: str, frames: int | None, fps: float | None = None) -> None:
    """Raise ValueError unless ``out``'s suffix names a format that holds ``frames``
    (None: not known yet, any format), ``out`` is not a folder, and ``fps`` (when given)
    is a positive frame rate."""
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"{out}: the frame rate must be a positive number, not {fps:g}")
    if Path(out).is_dir():
        raise ValueError(f"{out} is a folder; name the file to write")
    suffix = Path(out).suffix.lower()
    if suffix in VIDEO_FORMATS or suffix == ".gif":
        return
    videos = ", ".join([*VIDEO_FORMATS, ".gif"])
    if suffix in IMAGE_FORMATS:
        if frames is None or frames == 1:
            return
        raise ValueError(f"{out}: {suffix} holds one frame, not {frames}; use {videos}")
    raise ValueError(
        f"{out}: unknown output type {suffix or '(no suffix)'!r}; use {videos}, "
        f"or {', '.join(IMAGE_FORMATS)} for one frame"
    )


def write_video(frames: np.ndarray, out: str, fps: float = DEFAULT_FPS) -> str:
    """(T, H, W, 3) uint8 -> the file ``out``, in the format its suffix names (see
    :func:`check_output`): H.264 or VP9 video with PyAV, GIF or a still image with PIL.
    Returns ``out``."""
    check_output(out, frames.shape[0], fps)
    path = Path(out)
    suffix = path.suffix.lower()
    # written beside it, then renamed: a failed write leaves no partial file at `out`
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(frames, tmp, suffix, fps)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            blocker = next((p for p in path.parents if p.is_file()), None)
            why = f"{blocker} is a file, not a folder" if blocker else e.strerror or str(e)
            raise OSError(f"cannot write {out}: {why}") from e
        raise
    return str(path)


def _write_file(frames: np.ndarray, path: Path, suffix: str, fps: float) -> None:
    """:func:`write_video`'s encoding of ``frames`` to ``path`` as ``suffix`` says."""
    import av
    from PIL import Image

    if suffix in IMAGE_FORMATS:
        Image.fromarray(frames[0]).save(path, format=IMAGE_FORMATS[suffix])
        return
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        ms = 10 * max(1, round(100 / fps))  # GIF delays are whole centiseconds
        images[0].save(
            path, format="GIF", save_all=True, append_images=images[1:], duration=ms, loop=0
        )
        return
    container_format, codec = VIDEO_FORMATS[suffix]
    _, h, w, _ = frames.shape
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _encode_prompts(
    entry: dict[str, Any] | None, prompts: Sequence[str], text_dim: int, device: str
) -> list[torch.Tensor]:
    """Each distinct prompt's caption embeddings (L, text_dim), the encoder loaded once."""
    if entry is None:
        raise ValueError(
            f"the model takes {text_dim}-d caption embeddings but the corpus manifest "
            "names no text_encoder to encode the prompt with"
        )
    from model.text import TextEncoder

    encoder = TextEncoder.from_manifest(entry, device=device, dtype="float32")
    distinct = list(dict.fromkeys(prompts))
    by_prompt = dict(zip(distinct, encoder.encode(distinct), strict=True))
    dim = next(iter(by_prompt.values())).shape[-1]
    if dim != text_dim:
        raise ValueError(
            f"text encoder {entry['id']!r} gives {dim}-d embeddings, "
            f"the model was trained on {text_dim}-d"
        )
    return [by_prompt[p].float() for p in prompts]


@dataclass(frozen=True)
class Sample:
    """One clip a sampling run writes: its prompt, its seed and the file it goes to."""

    prompt: str
    seed: int
    out: str


def plan_samples(
    prompts: Sequence[str], seed: int, per_prompt: int, out: str, frames: int | None = 1
) -> list[Sample]:
    """The clips of a run: ``per_prompt`` seeds (``seed``, ``seed + 1``, ...) for each
    prompt, in prompt order, and the file each is written to.

    ``out`` is a name template: ``{n}`` (the clip's number, from 0), ``{seed}`` and
    ``{prompt}`` (the prompt's number) are filled in, e.g. ``kite-{prompt}-{seed}.mp4``.
    With no field, one clip goes to ``out`` itself, and several get ``-{n}`` before its
    suffix (``kite.mp4`` -> ``kite-0.mp4``, ``kite-1.mp4``, ...). Raises
    ValueError for no prompt, a count below 1, an unknown field, or two clips named alike,
    or a format that cannot hold ``frames`` (None: not known yet).
    """
    if not prompts:
        raise ValueError("no prompt to sample")
    if per_prompt < 1:
        raise ValueError(f"need at least one sample per prompt, got {per_prompt}")
    pairs = [(i, p, seed + k) for i, p in enumerate(prompts) for k in range(per_prompt)]
    template = out
    if "{" not in out and len(pairs) == 1:
        check_output(out, frames)
        return [Sample(prompts[0], seed, out)]
    if "{" not in out:
        path = Path(out)
        template = str(
            path.with_name(f"{path.stem}-{{n:0{len(str(len(pairs) - 1))}d}}{path.suffix}")
        )
    names = []
    for n, (i, _, each) in enumerate(pairs):
        try:
            names.append(template.format(n=n, seed=each, prompt=i))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"--out {out}: not a name template ({e!r}); its fields are {{n}}, {{seed}} "
                "and {prompt}"
            ) from None
    if len(set(names)) < len(names):
        raise ValueError(
            f"--out {out} names {len(pairs)} clips alike; add {{n}} (or {{seed}} and "
            "{prompt}) to tell them apart"
        )
    for name in names:
        check_output(name, frames)
    return [Sample(p, each, name) for (_, p, each), name in zip(pairs, names, strict=True)]


def sample_to_files(
    ckpt: str,
    corpus_root: str | None,
    samples: Sequence[Sample],
    frames: int | None,
    height: int | None,
    width: int | None,
    steps: int,
    cfg_scale: float,
    *,
    fps: float | None = None,
    device: str = "auto",
    ema: bool = True,
    batch_size: int = 4,
    written: Callable[[Sample], None] | None = None,
) -> list[str]:
    """Generate every clip of ``samples`` (see :func:`plan_samples`), each
    ``frames x height x width`` pixels, and write each to its file in the format its
    suffix names (:func:`check_output`). Returns the written paths.

    The checkpoint, the VAE and the text encoder are loaded once for the whole run;
    ``batch_size`` clips are generated at once, packed into one sequence, and written
    as their batch finishes (``written`` is called with each). A clip's pixels depend
    on its prompt and seed, not on the batch it ran in.

    `corpus_root` gives the manifest (VAE, text encoder); None = the corpus the
    checkpoint was trained on. A size left None is the corpus's most common sample's
    (:func:`corpus_sample_size`); ``frames`` None is 1 when the files are images. ``fps`` None plays the clip at the rate the corpus's
    latents were made at (its encode ``target_fps``; 16 if it kept each clip's own).
    Uses the EMA weights when the checkpoint has them. ``device`` "auto": CUDA when
    available.
    """
    _check_request(samples, frames, fps, steps, cfg_scale, batch_size)  # before any work
    device = str(resolve_device(device))
    from model.data import read_manifest
    from model.fingerprint import other_weights
    from model.train import model_from_checkpoint, read_checkpoint
    from model.vae import VideoVAE

    state = read_checkpoint(ckpt, mmap=True)  # read once; the optimizer state never is
    config, has_ema = state["config"], state.get("ema") is not None
    root = corpus_root or config["corpus"]["root"]
    manifest = read_manifest(root)
    trained_vae = config["corpus"]["vae"]
    corpus_vae = manifest["vae"]
    if trained_vae.get("config_sha256") != corpus_vae.get("config_sha256") or other_weights(
        trained_vae, corpus_vae
    ):
        raise ValueError(
            f"{corpus_root}: the corpus VAE ({manifest['vae'].get('id')}) is not the one "
            f"{ckpt} was trained on ({trained_vae.get('id')})"
        )
    if frames is None and all(Path(each.out).suffix.lower() in IMAGE_FORMATS for each in samples):
        frames = 1
    if frames is None or height is None or width is None:
        common = corpus_sample_size(root, manifest["vae"])
        frames, height, width = (
            given if given is not None else default
            for given, default in zip((frames, height, width), common, strict=True)
        )
        for each in samples:
            check_output(each.out, frames, fps)
    patch = tuple(config["model"]["patch_size"])
    _, grid = latent_grid(manifest["vae"], patch, frames, height, width)  # before the model
    model, _ = model_from_checkpoint(state, ckpt, device, ema=ema and has_ema)
    del state
    prompts = [each.prompt for each in samples]
    embeds: list[torch.Tensor] | None = None
    if model.config.text_dim:
        embeds = _encode_prompts(
            manifest.get("text_encoder"), prompts, model.config.text_dim, device
        )
    elif any(p.strip() for p in prompts):
        log.warning(
            "%s was trained without captions (its corpus has no caption embeddings): "
            "the prompt and the guidance scale change nothing",
            ckpt,
        )
    vae = VideoVAE.from_manifest(manifest["vae"], device=device)
    if fps is None:
        fps = (manifest.get("config") or {}).get("encode", {}).get("target_fps") or DEFAULT_FPS
    paths = []
    for first in range(0, len(samples), batch_size):
        batch = samples[first : first + batch_size]
        latents = sample_latents(
            model,
            [grid] * len(batch),
            text_embeds=None if embeds is None else embeds[first : first + len(batch)],
            steps=steps,
            cfg_scale=cfg_scale,
            shift_base_tokens=int(config["train"].get("shift_base_tokens", 0)),
            seed=[each.seed for each in batch],
            device=device,
        )
        for each, latent in zip(batch, latents, strict=True):  # latent: (C, T, H, W)
            video = vae.decode(latent[None])[0]  # (3, frames, height, width) in [-1, 1]
            if tuple(video.shape[1:]) != (frames, height, width):
                raise RuntimeError(
                    f"VAE decoded {tuple(video.shape)}, expected 3x{frames}x{height}x{width}"
                )
            pixels = (video.permute(1, 2, 3, 0) + 1) * 127.5
            pixels = pixels.round().clamp(0, 255).to(torch.uint8)
            paths.append(write_video(pixels.cpu().numpy(), each.out, fps))
            if written is not None:
                written(each)
    return paths


def _check_request(
    samples: Sequence[Sample],
    frames: int | None,
    fps: float | None,
    steps: int,
    cfg_scale: float,
    batch_size: int,
) -> None:
    """ValueError for a sampling request no run can carry out."""
    if not samples:
        raise ValueError("no clip to sample")
    for each in samples:
        check_output(each.out, frames, fps)
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got {steps}")
    if not math.isfinite(cfg_scale):
        raise ValueError(f"the guidance scale must be a number, got {cfg_scale}")


def corpus_sample_size(root: str, vae: dict[str, Any]) -> tuple[int, int, int]:
    """``(frames, height, width)`` in pixels of the most common latent shape among the
    kept samples of the corpus at ``root`` (``vae``: its manifest entry), the size a
    sample "like the corpus" has. ValueError when the corpus keeps no sample."""
    from collections import Counter

    from model.loader import read_catalog

    shapes = Counter(entry.shape[1:] for entry in read_catalog(root))
    if not shapes:
        raise ValueError(
            f"{root}: the corpus keeps no sample to take a size from; give --frames, "
            "--height and --width"
        )
    (t, h, w), _ = shapes.most_common(1)[0]
    s, tf = int(vae["spatial_factor"]), int(vae["temporal_factor"])
    base = int((vae.get("frame_rule") or {}).get("base", 1))
    return base + (t - 1) * tf, h * s, w * s


def sample_to_file(
    ckpt: str,
    corpus_root: str | None,
    prompt: str,
    frames: int,
    height: int,
    width: int,
    steps: int,
    cfg_scale: float,
    out: str,
    *,
    seed: int = 0,
    fps: float | None = None,
    device: str = "auto",
    ema: bool = True,
) -> str:
    """Generate one clip of ``frames x height x width`` pixels and write it to `out`:
    :func:`sample_to_files` for one prompt and seed. Returns the written path."""
    (path,) = sample_to_files(
        ckpt,
        corpus_root,
        [Sample(prompt, seed, out)],
        frames,
        height,
        width,
        steps,
        cfg_scale,
        fps=fps,
        device=device,
        ema=ema,
    )
    return path
