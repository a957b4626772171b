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


def _read_scene(image) -> dict[str, tuple[str, str]]:
    """A pixel-rule oracle: quadrant -> (colour, kind), from the quadrant's centre, corner and edge pixels."""
    pixels = np.asarray(image).astype(int)
    half = pixels.shape[0] // 2
    found = {}
    for index, quadrant in enumerate(QUADRANTS):
        row, column = divmod(index, 2)
        top, left = row * half, column * half
        centre = pixels[top + half // 2, left + half // 2]
        colour = next((name for name, rgb in COLOURS.items() if np.abs(centre - rgb).max() < 10), None)
        if colour is None:
            continue
        inset = int(half * 0.2)

        def filled(y: int, x: int) -> bool:
            return bool(np.abs(pixels[top + y, left + x] - COLOURS[colour]).max() < 10)  # noqa: B023

        if filled(inset, inset):
            kind = "square"
        elif filled(half - inset, inset):
            kind = "triangle"  # the base is filled at the bottom corners, the top corners are empty
        else:
            kind = "circle"
        found[quadrant] = (colour, kind)
    return found


def _oracle(image, question: str) -> str:
    from vlm_train.shapes import Scene, Shape, questions

    shapes = tuple(Shape(kind, colour, q) for q, (colour, kind) in _read_scene(image).items())
    return dict(questions(Scene(shapes, (0, 0, 0))))[question]


def _each(answer):
    return lambda images, asked: [answer(image, question) for image, question in zip(images, asked)]


def test_score_counts_exact_answers() -> None:
    from vlm_train.shapes import score

    perfect = score(_each(_oracle), count=30, seed=5)
    assert perfect.total > 60 and perfect.accuracy == 1.0
    assert set(perfect.by_question) == {"what", "how many", "colour", "where"}
    guessing = score(lambda images, asked: ["Two."] * len(asked), count=30, seed=5)
    assert guessing.by_question["how many"][0] < guessing.by_question["how many"][1]
    assert guessing.correct == guessing.by_question["how many"][0] and guessing.accuracy < 0.3


def test_shapes_score_command(capsys) -> None:
    from vlm_models.cli import main as vlm

    from .conftest import FLOAT_MODEL

    assert vlm(["train", "shapes-score", "--model", str(FLOAT_MODEL), "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exact answers: ") and "how many" in out
