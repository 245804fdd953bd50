"""reelpack's model package: the video VAE wrapper, corpus streaming and packing,
a packed-sequence DiT, rectified flow, and the trainer.

Separate from `pipeline` (never imports it); both depend on `schemas`. The pipeline
uses the loading pieces: `model.vae` (the one place a VAE is loaded), `model.text`,
`model.tiny_text`, `model.device`, `model.weights`, `model.fingerprint` and
`model.raycluster`. Submodules are imported explicitly (``from model.vae import VideoVAE``) so that loading the VAE wrapper does
not pull in the trainer.
"""

__all__ = [
    "data",
    "dit",
    "ema",
    "fingerprint",
    "flow",
    "loader",
    "sample",
    "text",
    "tiny_text",
    "train",
    "vae",
    "weights",
]
