"""The repository's promises to CI: README's install and test commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, f"README section {heading!r} has no bash block"
    return match.group(1).strip()


def test_ci_runs_readme_install_and_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    install = _readme_block("Install")
    test = _readme_block("Tests")
    assert install.replace("pip install", "python -m pip install") in ci or install in ci
    assert test in ci.splitlines()
