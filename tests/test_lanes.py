"""The two ways to run the tests: ``.ci/run`` runs everything; the README's fast lane leaves out the ``slow`` ones,
and the long tests issue 19 named carry that marker."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAST_LANE = 'uv run --frozen pytest -n 2 -m "not slow" tests'


def test_ci_runs_every_test() -> None:
    runs = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines() if " pytest " in line]
    assert runs, ".ci/run runs no pytest"
    for words in runs:
        assert "-m" not in words and "-k" not in words and words[-1] == "tests"


def test_the_readme_documents_the_fast_lane() -> None:
    readme = (ROOT / "README.md").read_text()
    assert FAST_LANE in readme
    declared = re.search(r"markers = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.DOTALL)
    assert declared is not None and '"slow:' in declared.group(1)


@pytest.mark.parametrize(
    "module, test",
    [
        ("tests.train.test_demo", "test_shipped_demo_model_answers_held_out_questions"),
        ("tests.serve.test_fuzz", "test_answers_conform_to_the_document"),
        ("tests.serve.test_fuzz", "test_answers_streamed_or_not_match_the_document"),
        ("tests.train.test_families", "test_a_few_lora_steps_on_image_samples_cut_the_loss"),
    ],
)
def test_the_long_tests_are_marked_slow(module: str, test: str) -> None:
    loaded = importlib.import_module(module)
    marks = [*getattr(getattr(loaded, test), "pytestmark", []), *_as_list(getattr(loaded, "pytestmark", []))]
    assert "slow" in {mark.name for mark in marks}


def _as_list(marks: object) -> list:
    return marks if isinstance(marks, list) else [marks]
