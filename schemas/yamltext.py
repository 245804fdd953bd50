"""The YAML dialect of reelpack's config files and ``--set`` values.

PyYAML implements YAML 1.1, where a float needs a dot: ``1e-4`` and ``5E3`` load as
strings, so ``lr: 1e-4`` would be refused as "not a number". reelpack reads them as
YAML 1.2 (and JSON, and Python) do: numbers.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["load_yaml"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also takes exponent floats without a dot (``1e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML (safe: plain data only), exponent floats as floats."""
    return yaml.load(text, Loader=_Loader)
