from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "gemma3", "paligemma2", "pixtral", "mistral3"]
LAYOUTS = ["hf4", "hf5", "mlx_community"]
FAMILY_LAYOUTS = {
    "qwen2_vl": LAYOUTS,
    "qwen2_5_vl": LAYOUTS,
    "llava": LAYOUTS,
    "llava_next": LAYOUTS,
    # No peer-converted folder: its MLX-community layout is written by our own converter (test_gemma3.py).
    "gemma3": ["hf4", "hf5"],
    "paligemma2": ["hf4", "hf5"],
    # mlx_community: written by our own converter (tests/fixtures/make_mlx_community_llava.py), as for LLaVA.
    "pixtral": LAYOUTS,
    "mistral3": LAYOUTS,
}
PREFIX_LM = {"paligemma2"}
"""Families whose whole prompt attends both ways: a token decoded after a prefill is no longer in the prompt."""


def checkpoint_with_config(tmp_path: Path, family: str, change: Callable[[dict[str, Any]], Any]) -> Path:
    """A copy of the family's hf4 fixture whose config.json ``change`` edited in place."""
    path = Path(shutil.copytree(FIXTURES / family / "hf4", tmp_path / "model"))
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


class Reference:
    """The transformers outputs stored by tests/fixtures/make_fixtures.py for one family."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.root = FIXTURES / family
        self.arrays = np.load(self.root / "reference.npz")
        self.meta = json.loads((self.root / "reference.json").read_text())

    @property
    def cases(self) -> list[str]:
        return sorted({k.split("/")[0] for k in self.arrays.files})

    @property
    def single_cases(self) -> list[str]:
        """The cases of one prompt (not a padded batch)."""
        return [c for c in self.cases if self.arrays[f"{c}/input_ids"].shape[0] == 1]

    def get(self, case: str, name: str) -> np.ndarray | None:
        key = f"{case}/{name}"
        return self.arrays[key] if key in self.arrays.files else None

    def inputs(self, case: str) -> dict[str, np.ndarray]:
        names = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "image_sizes")
        return {n: self.get(case, n) for n in names if self.get(case, n) is not None}


@pytest.fixture(scope="session")
def references() -> dict[str, Reference]:
    return {family: Reference(family) for family in FAMILIES}
