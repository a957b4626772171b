"""The synthetic shapes data: pictures show what the answers say, and a seed fixes the data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from vlm_train.shapes import COLOURS, KINDS, QUADRANTS, questions, random_scene, render, write_dataset


@given(seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_pictures_match_their_scene(seed: int) -> None:
    scene = random_scene(np.random.default_rng(seed))
    assert 1 <= len(scene.shapes) <= 3
    assert len({s.quadrant for s in scene.shapes}) == len(scene.shapes)
    pixels = np.asarray(render(scene, 56))
    by_quadrant = {s.quadrant: s for s in scene.shapes}
    for index, quadrant in enumerate(QUADRANTS):
        row, column = divmod(index, 2)
        centre = tuple(pixels[row * 28 + 14, column * 28 + 14])
        expected = COLOURS[by_quadrant[quadrant].colour] if quadrant in by_quadrant else scene.background
        assert centre == tuple(expected), (quadrant, scene)


@given(seed=st.integers(0, 10_000))
@settings(max_examples=40, deadline=None)
def test_answers_follow_from_the_scene(seed: int) -> None:
    scene = random_scene(np.random.default_rng(seed))
    qa = dict(questions(scene))
    count_words = {1: "One.", 2: "Two.", 3: "Three."}
    assert qa["How many shapes are there?"] == count_words[len(scene.shapes)]
    listing = qa["What shapes are in this image?"].lower()
    for shape in scene.shapes:
        assert f"{shape.colour} {shape.kind}" in listing
    for kind in KINDS:
        question = f"What colour is the {kind}?"
        matching = [s for s in scene.shapes if s.kind == kind]
        assert (question in qa) == (len(matching) == 1)
        if len(matching) == 1:
            assert qa[question] == matching[0].colour.capitalize() + "."
    for shape in scene.shapes:
        question = f"Where is the {shape.colour} {shape.kind}?"
        if question in qa:
            assert qa[question] == shape.quadrant.capitalize() + "."


def test_the_seed_fixes_the_data_set(tmp_path: Path) -> None:
    first = write_dataset(tmp_path / "a", count=5, val_count=2, seed=3)
    second = write_dataset(tmp_path / "b", count=5, val_count=2, seed=3)
    assert [f.read_text() for f in first] == [f.read_text() for f in second]
    assert (tmp_path / "a" / "images" / "train_000004.png").read_bytes() == (
        tmp_path / "b" / "images" / "train_000004.png"
    ).read_bytes()
    rows = [json.loads(line) for line in first[0].read_text().splitlines()]
    assert len(rows) >= 5 * 2  # at least the "what" and "how many" question for every image
    assert all(r["messages"][0]["content"][0]["image"].startswith("images/train_") for r in rows)
