"""reelpack: build captioned native-aspect video latent corpora, and train a DiT on them."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("reelpack")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"
