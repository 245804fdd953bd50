"""The YAML dialect of reelpack's config files and ``--set`` values.

PyYAML implements YAML 1.1, where a float needs a dot: ``1e-4`` and ``5E3`` load as
strings, so ``lr: 1e-4`` would be refused as "not a number". reelpack reads them as
YAML 1.2 (and JSON, and Python) do: numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_yaml", "read_config_file"]


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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a config file holds: YAML, or JSON for a ``.json`` name; an empty file
    is ``{}``. A file that is not UTF-8 text, not valid YAML or JSON (its line said), or
    not a mapping is a ValueError naming it; a missing one is FileNotFoundError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config {path}: not UTF-8 text (byte {e.start})") from None
    if str(path).endswith(".json"):
        try:
            loaded = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"config {path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
    else:
        try:
            loaded = load_yaml(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config {path}: not valid YAML{where}: {problem}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config {path}: top level must be a mapping")
    return loaded
