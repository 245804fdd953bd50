"""The one place a video VAE is loaded: a thin wrapper over diffusers' video autoencoders.

`VideoVAE` loads a diffusers VAE class by name through that class's own
``from_pretrained`` (a hub id or a local folder), reads the family's compression
factors and latent normalisation from the loaded model, and exposes a strict
``encode`` / ``decode`` pair:

- ``encode`` refuses a clip whose frame count or size the VAE would silently
  truncate (diffusers' VAEs drop extra frames and pixels without an error), and
  returns the *normalised* latent mean, ready to be written to a shard.
- ``decode`` undoes that normalisation and decodes back to pixels in [-1, 1].
- ``describe`` is the JSON object stored under ``vae`` in the corpus manifest;
  ``VideoVAE.from_manifest`` loads the same VAE back from it and checks that it is
  the same one (same class, same config hash).

Supported classes: ``AutoencoderKLWan`` (default), ``AutoencoderKLCogVideoX``,
``AutoencoderKLHunyuanVideo``, ``AutoencoderKLLTXVideo``.

Offline / tests: ``build_tiny_vae(dir)`` saves a ~14k-parameter random Wan VAE that
loads back through the same ``VideoVAE.from_pretrained(dir)`` users run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where tensors are made: sizes and facts import without torch
    import torch

__all__ = [
    "SUPPORTED_VAE_CLASSES",
    "VideoVAE",
    "build_tiny_vae",
    "describe_pretrained",
    "native_size",
]


# --- family facts ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Facts:
    """What the rest of reelpack needs to know about one loaded VAE."""

    spatial_factor: int
    temporal_factor: int
    latent_channels: int
    normalization: dict[str, Any]  # {"kind": ..., values}; see _normalize


def _floats(values: Any) -> list[float]:
    import torch

    return [float(v) for v in torch.as_tensor(values, dtype=torch.float64).flatten().tolist()]


def _wan_facts(vae: Any) -> _Facts:
    cfg = vae.config
    # Derived from the architecture, not from `scale_factor_*` (older configs lack them):
    # one 2x spatial downsample per extra dim_mult level, one 2x temporal per True flag;
    # Wan 2.2 additionally folds `patch_size` pixels into channels.
    patch = int(cfg.patch_size or 1)
    spatial = 2 ** (len(cfg.dim_mult) - 1) * patch
    temporal = 2 ** sum(bool(f) for f in cfg.temperal_downsample)
    mean, std = _floats(cfg.latents_mean), _floats(cfg.latents_std)
    channels = int(cfg.z_dim)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"AutoencoderKLWan config: latents_mean/std have {len(mean)}/{len(std)} values "
            f"but z_dim is {channels}"
        )
    return _Facts(spatial, temporal, channels, {"kind": "mean_std", "mean": mean, "std": std})


def _cogvideox_facts(vae: Any) -> _Facts:
    cfg = vae.config
    if cfg.shift_factor is not None:
        raise ValueError("AutoencoderKLCogVideoX with shift_factor is not supported")
    return _Facts(
        spatial_factor=2 ** (len(cfg.block_out_channels) - 1),
        temporal_factor=int(cfg.temporal_compression_ratio),
        latent_channels=int(cfg.latent_channels),
        normalization={"kind": "scale", "scaling_factor": float(cfg.scaling_factor)},
    )


def _hunyuan_facts(vae: Any) -> _Facts:
    cfg = vae.config
    return _Facts(
        spatial_factor=int(cfg.spatial_compression_ratio),
        temporal_factor=int(cfg.temporal_compression_ratio),
        latent_channels=int(cfg.latent_channels),
        normalization={"kind": "scale", "scaling_factor": float(cfg.scaling_factor)},
    )


def _ltx_facts(vae: Any) -> _Facts:
    # LTX keeps its latent statistics as weights (buffers), not in the config.
    return _Facts(
        spatial_factor=int(vae.spatial_compression_ratio),
        temporal_factor=int(vae.temporal_compression_ratio),
        latent_channels=int(vae.config.latent_channels),
        normalization={
            "kind": "mean_std_scale",
            "mean": _floats(vae.latents_mean),
            "std": _floats(vae.latents_std),
            "scaling_factor": float(vae.config.scaling_factor),
        },
    )


_FAMILIES: dict[str, Callable[[Any], _Facts]] = {
    "AutoencoderKLWan": _wan_facts,
    "AutoencoderKLCogVideoX": _cogvideox_facts,
    "AutoencoderKLHunyuanVideo": _hunyuan_facts,
    "AutoencoderKLLTXVideo": _ltx_facts,
}
SUPPORTED_VAE_CLASSES = tuple(_FAMILIES)


def _channel_vector(values: list[float], like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)


def _normalize(z: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    """Raw VAE latent -> the scale a diffusion model trains on, as each family's pipeline does."""
    kind = norm["kind"]
    if kind == "mean_std":  # Wan, Mochi
        return (z - _channel_vector(norm["mean"], z)) / _channel_vector(norm["std"], z)
    if kind == "scale":  # CogVideoX, HunyuanVideo
        return z * norm["scaling_factor"]
    if kind == "mean_std_scale":  # LTX
        mean, std = _channel_vector(norm["mean"], z), _channel_vector(norm["std"], z)
        return (z - mean) * norm["scaling_factor"] / std
    raise ValueError(f"unknown latent normalization kind {kind!r}")


def _denormalize(z: torch.Tensor, norm: dict[str, Any]) -> torch.Tensor:
    """Inverse of `_normalize`."""
    kind = norm["kind"]
    if kind == "mean_std":
        return z * _channel_vector(norm["std"], z) + _channel_vector(norm["mean"], z)
    if kind == "scale":
        return z / norm["scaling_factor"]
    if kind == "mean_std_scale":
        mean, std = _channel_vector(norm["mean"], z), _channel_vector(norm["std"], z)
        return z * std / norm["scaling_factor"] + mean
    raise ValueError(f"unknown latent normalization kind {kind!r}")


def _config_sha256(config: Any) -> str:
    """Hash of the model config, ignoring diffusers' bookkeeping keys (`_name_or_path`, ...)."""
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    text = json.dumps(public, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()


# --- the wrapper -----------------------------------------------------------------------
class VideoVAE:
    """A loaded diffusers video VAE with strict shapes and the family's normalisation."""

    def __init__(
        self, vae: Any, *, name: str, vae_class: str, subfolder: str | None = None
    ) -> None:
        if vae_class not in _FAMILIES:
            raise ValueError(f"unsupported vae_class {vae_class!r}; one of {SUPPORTED_VAE_CLASSES}")
        facts = _FAMILIES[vae_class](vae)
        self.vae = vae.eval()
        self.name = name
        self.vae_class = vae_class
        self.subfolder = subfolder
        self.spatial_factor = facts.spatial_factor
        self.temporal_factor = facts.temporal_factor
        self.latent_channels = facts.latent_channels
        # Causal video VAEs encode the first frame alone, then `temporal_factor` frames
        # per latent frame: valid clip lengths are 1 + k * frame_step.
        self.frame_step = facts.temporal_factor
        self.normalization = facts.normalization
        self.config_sha256 = _config_sha256(vae.config)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        vae_class: str = "AutoencoderKLWan",
        subfolder: str | None = None,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        tiling: bool = True,
        slicing: bool = True,
    ) -> VideoVAE:
        """Load `vae_class` from a hub id or local folder with diffusers' own loader.

        ``dtype`` None is float32. Tiling and slicing (where the class has them) bound
        memory on large clips and batches; tiling only engages above the class's tile size.
        """
        if vae_class not in _FAMILIES:
            raise ValueError(f"unsupported vae_class {vae_class!r}; one of {SUPPORTED_VAE_CLASSES}")
        import diffusers  # deferred: importing diffusers costs seconds
        import torch

        model_cls = getattr(diffusers, vae_class)
        # diffusers loads weights without a random init first only with accelerate, and
        # otherwise prints a warning on every load: ask for what is installed
        low_mem = importlib.util.find_spec("accelerate") is not None
        kwargs: dict[str, Any] = {
            "torch_dtype": torch.float32 if dtype is None else dtype,
            "low_cpu_mem_usage": low_mem,
        }
        if subfolder is not None:
            kwargs["subfolder"] = subfolder
        vae = model_cls.from_pretrained(name_or_path, **kwargs).to(device)
        if tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        if slicing and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
        return cls(vae, name=name_or_path, vae_class=vae_class, subfolder=subfolder)

    @classmethod
    def from_manifest(
        cls,
        entry: dict[str, Any],
        path_override: str | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> VideoVAE:
        """Reload the VAE a corpus was built with, from the manifest's ``vae`` object.

        `path_override` is a folder holding the VAE's ``config.json`` (it replaces both
        ``id`` and ``subfolder``), for when the weights live elsewhere than at build time.
        Raises ValueError when the loaded VAE is not the one the manifest describes.
        """
        name = path_override if path_override is not None else entry["id"]
        subfolder = None if path_override is not None else entry.get("subfolder")
        vae = cls.from_pretrained(
            name, vae_class=entry["class"], subfolder=subfolder, device=device, dtype=dtype
        )
        if vae.config_sha256 != entry["config_sha256"]:
            raise ValueError(
                f"VAE at {name!r} has config sha256 {vae.config_sha256}, "
                f"the manifest says {entry['config_sha256']}"
            )
        from model.fingerprint import check_weights

        check_weights(entry, "VAE", name, subfolder)
        return vae

    # --- shapes ----------------------------------------------------------------------
    @property
    def compression(self) -> tuple[int, int, int]:
        """Compression factors (t, h, w): pixels per latent cell along each axis."""
        return (self.temporal_factor, self.spatial_factor, self.spatial_factor)

    @property
    def frame_rule(self) -> tuple[int, int]:
        """(base, step): valid clip lengths are base + k * step frames (1 + 4k for Wan)."""
        return (1, self.frame_step)

    def valid_frames(self, n: int) -> int:
        """Largest valid frame count 1 + k * frame_step that is <= n."""
        if n < 1:
            raise ValueError(f"need at least 1 frame, got {n}")
        return 1 + (n - 1) // self.frame_step * self.frame_step

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of the latent of a valid clip; ValueError for an invalid one."""
        self._check_clip(frames, height, width)
        return (
            self.latent_channels,
            1 + (frames - 1) // self.temporal_factor,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    def _check_clip(self, frames: int, height: int, width: int) -> None:
        s = self.spatial_factor
        if frames < 1 or (frames - 1) % self.frame_step:
            raise ValueError(
                f"{self.vae_class}: {frames} frames is not 1 + k*{self.frame_step}; "
                f"trim to {self.valid_frames(frames) if frames >= 1 else 1} frames first"
            )
        if height < s or width < s or height % s or width % s:
            raise ValueError(
                f"{self.vae_class}: size {height}x{width} (HxW) is not a positive multiple of {s}"
            )

    # --- encode / decode -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latent mean (B, C, t, h, w), float32.

        The result is on the VAE's device.
        """
        if video.ndim != 5 or video.shape[1] != 3 or not video.is_floating_point():
            raise ValueError(
                f"expected a float video (B, 3, T, H, W), got {video.dtype} {tuple(video.shape)}"
            )
        import torch

        b, _, t, h, w = video.shape
        expected = (b, *self.latent_shape(t, h, w))
        with torch.inference_mode():
            dist = self.vae.encode(video.to(self.device, self.dtype)).latent_dist
            z = _normalize(dist.mode().float(), self.normalization)  # (B, C, t, h, w)
        if tuple(z.shape) != expected:
            raise RuntimeError(
                f"{self.vae_class} encoded {tuple(video.shape)} to {tuple(z.shape)}, "
                f"expected {expected}: its compression factors differ from those read"
            )
        return z

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w) -> video (B, 3, T, H, W) in [-1, 1], float32."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.latent_channels}, t, h, w), got {tuple(latents.shape)}"
            )
        import torch

        with torch.inference_mode():
            z = _denormalize(latents.to(self.device, torch.float32), self.normalization)
            video = self.vae.decode(z.to(self.dtype)).sample  # (B, 3, T, H, W)
            return video.float().clamp(-1.0, 1.0)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``vae`` object (JSON-able)."""
        return {
            "id": self.name,
            "subfolder": self.subfolder,
            "class": self.vae_class,
            "config_sha256": self.config_sha256,
            "spatial_factor": self.spatial_factor,
            "temporal_factor": self.temporal_factor,
            "latent_channels": self.latent_channels,
            "frame_rule": {"base": 1, "step": self.frame_step},
            "normalization": dict(self.normalization),
        }


# --- offline helpers -------------------------------------------------------------------
def build_tiny_vae(out_dir: str, seed: int = 0) -> str:
    """Save a tiny random-weight Wan VAE (~14k params) to `out_dir`; skip if already there.

    Same factors as the real Wan 2.1 VAE (8x spatial, 4x temporal, 16 channels), so
    shapes, frame rules and the manifest are realistic; the latents are meaningless.
    """
    target = Path(out_dir)
    if (target / "config.json").is_file():
        return out_dir
    import torch
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae: Any = AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    # Save beside the target and rename into place: concurrent builders (several Ray
    # workers sharing a cache) never see a half-written folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        vae.save_pretrained(str(staging))
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder (e.g. a fresh temp dir) is not a build
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        # another process finished first; its build is identical (same seed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def describe_pretrained(
    name_or_path: str, *, vae_class: str = "AutoencoderKLWan", subfolder: str | None = None
) -> dict[str, Any]:
    """The manifest ``vae`` object of a VAE, loaded on the CPU just to describe it, with
    its ``weights_sha256`` (:func:`model.fingerprint.weights_sha256`; None when its files
    are not on this machine)."""
    from model.fingerprint import weights_sha256

    described = VideoVAE.from_pretrained(
        name_or_path, vae_class=vae_class, subfolder=subfolder, tiling=False, slicing=False
    ).describe()
    return {**described, "weights_sha256": weights_sha256(name_or_path, subfolder)}


def native_size(
    width: int,
    height: int,
    pixel_budget: int,
    multiple: int,
    max_aspect_error: float = 0.02,
    min_fill: float = 0.75,
) -> tuple[int, int]:
    """(W, H): multiples of `multiple`, W*H <= `pixel_budget`, aspect close to width/height.

    Searches every candidate height; for each, the widths on either side of the exact
    aspect that fit the budget. Among sizes whose relative aspect error is within
    `max_aspect_error`, the largest area wins (a tiny exact match must not beat a
    near-exact one at full budget). When that largest area fills less than `min_fill`
    of the budget, the tolerance widens in steps up to 1.5x `max_aspect_error` (the grid
    of multiples can leave no close size near the budget: 166x77 at 256^2 with 16 px
    blocks); when no size is within even that, the smallest aspect error wins (larger
    area on ties).
    """
    if width <= 0 or height <= 0 or multiple <= 0:
        raise ValueError(f"need positive sizes, got {width}x{height} multiple {multiple}")
    if pixel_budget < multiple * multiple:
        raise ValueError(f"pixel budget {pixel_budget} is below one {multiple}x{multiple} block")
    aspect = width / height
    candidates: list[tuple[float, int, int]] = []  # (error, W, H)
    for h in range(multiple, pixel_budget // multiple + 1, multiple):
        w_max = pixel_budget // h // multiple * multiple
        if w_max < multiple:
            break
        exact = h * aspect / multiple
        for k in {math.floor(exact), math.ceil(exact)}:
            w = min(max(k * multiple, multiple), w_max)
            candidates.append((abs(w / h / aspect - 1.0), w, h))
    best: tuple[int, int, int] | None = None  # (area, W, H)
    for tolerance in (max_aspect_error * f for f in (1.0, 1.25, 1.5)):
        close = [(w * h, w, h) for e, w, h in candidates if e <= tolerance]
        if close:
            best = max(close)
            if best[0] >= min_fill * pixel_budget:
                break
    if best is not None:
        return best[1], best[2]
    _, w, h = min(candidates, key=lambda c: (c[0], -c[1] * c[2]))
    return w, h
