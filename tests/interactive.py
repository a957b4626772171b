"""What the interactive front ends' tests share: the demo question about examples/shapes.png and the answer
``vlm generate`` gives to it (computed, so a retrained demo model changes nothing here)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
DEMO_QUESTION = "What shapes are in this image?"


def vlm_command(*args: str) -> list[str]:
    """The ``vlm`` command of this environment."""
    return [sys.executable, "-m", "vlm_models.cli", *args]


@functools.cache
def generate_answer(question: str = DEMO_QUESTION, image: Path | None = SHAPES) -> str:
    """What ``vlm generate`` (the demo model, greedy) prints for ``question`` about ``image``."""
    command = vlm_command("generate", "--prompt", question, *(["--image", str(image)] if image else []))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=quiet_env(), check=True)
    answer = done.stdout.strip()
    assert answer, done.stderr
    return answer


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment for a child command: no colours, no terminal queries."""
    return {**os.environ, "NO_COLOR": "1", "PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", **extra}
