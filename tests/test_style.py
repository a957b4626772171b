"""The house style is checked, not hoped for: the tree is ruff-formatted and passes the lint set in
pyproject.toml (run `uv run ruff format . && uv run ruff check --fix .` to mend)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: it is in the dev dependency group (uv sync)")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_tree_is_formatted() -> None:
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_lint_set_passes() -> None:
    done = ruff("check", ".")
    assert done.returncode == 0, done.stdout + done.stderr
