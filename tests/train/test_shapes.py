"""The synthetic shapes data: pictures show what the answers say, positions follow one rule, the held-out writer
draws what the training writer never does, and a seed fixes the data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_train.shapes import (
    HELD_OUT,
    KINDS,
    NUMBERS,
    TRAINING,
    Background,
    Scene,
    Shape,
    position_of,
    questions,
    random_scene,
    render,
    write_dataset,
)

writers = st.sampled_from([TRAINING, HELD_OUT])


def _covered(shape: Shape, later: list[Shape]) -> bool:
    x, y = shape.centre
    return any(s.box[0] - 1 <= x <= s.box[2] + 1 and s.box[1] - 1 <= y <= s.box[3] + 1 for s in later)


@given(seed=st.integers(0, 10_000), writer=writers)
@settings(max_examples=40, deadline=None)
def test_pictures_match_their_scene(seed: int, writer) -> None:
    scene = random_scene(np.random.default_rng(seed), writer)
    assert 0 <= len(scene.shapes) <= 4
    image = render(scene)
    assert image.size == (scene.width, scene.height)
    pixels = np.asarray(image)
    short = min(scene.width, scene.height)
    for i, shape in enumerate(scene.shapes):
        x0, y0, x1, y1 = shape.box
        assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
        assert x1 - x0 == y1 - y0 and x1 - x0 >= min(6, short)
        if not _covered(shape, list(scene.shapes[i + 1 :])):
            x, y = shape.centre
            assert tuple(pixels[int(y), int(x)]) == shape.rgb, (shape, scene.background)


def test_held_out_pictures_never_have_training_sizes() -> None:
    def sides(writer) -> set[int]:
        return {
            max(
                random_scene(np.random.default_rng(i), writer).width,
                random_scene(np.random.default_rng(i), writer).height,
            )
            for i in range(300)
        }

    training, held_out = sides(TRAINING), sides(HELD_OUT)
    assert not training & held_out
    assert min(training) < min(held_out) < max(training) < max(held_out)
    assert not set(TRAINING.templates["listing"]) & set(HELD_OUT.templates["listing"])
    assert "Describe this image." in TRAINING.templates["listing"]  # the command line's default prompt


def test_positions_follow_the_thirds_of_the_picture() -> None:
    def at(x: int, y: int, kind: str = "circle", side: int = 10) -> str | None:
        return position_of(
            Shape(kind, "red", (x - side // 2, y - side // 2, x + side // 2, y + side // 2), (0, 0, 0)), 300, 150
        )

    assert at(20, 20) == "top left" and at(150, 20) == "top" and at(280, 20) == "top right"
    assert at(20, 75) == "left" and at(150, 75) == "centre" and at(280, 75) == "right"
    assert at(20, 130) == "bottom left" and at(150, 130) == "bottom" and at(280, 130) == "bottom right"
    assert at(100, 75) is None and at(150, 52) is None  # on a third line: no position is asked
    # a triangle's place is its centroid's, two thirds of the way down its box
    assert at(150, 53, "triangle", side=60) == "centre" and at(150, 53, "circle", side=60) is None


def _scene(*shapes: tuple[str, str]) -> Scene:
    placed = tuple(
        Shape(kind, colour, (60 * i, 0, 60 * i + 50, 50), (0, 0, 0)) for i, (kind, colour) in enumerate(shapes)
    )
    return Scene(300, 300, Background("plain", ((255, 255, 255),)), placed)


def test_listings_are_grouped_in_a_fixed_order() -> None:
    rng = np.random.default_rng(0)
    listing = questions(_scene(("triangle", "green"), ("circle", "red"), ("square", "blue"), ("circle", "red")), rng)[0]
    assert listing.kind == "listing" and listing.answer == "Two red circles, a blue square and a green triangle."
    assert questions(_scene(("circle", "orange")), rng)[0].answer == "An orange circle."
    empty = questions(_scene(), rng)
    assert [q.answer for q in empty[:2]] == ["No shapes.", "Zero."] and empty[0].kind == "empty"


@given(seed=st.integers(0, 10_000), writer=writers)
@settings(max_examples=60, deadline=None)
def test_answers_follow_from_the_scene(seed: int, writer) -> None:
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, writer)
    shapes = scene.shapes
    asked = questions(scene, rng, writer)
    by_kind = {q.kind for q in asked}
    assert {"count of", "colour", "yes/no"} <= by_kind and ("empty" in by_kind) == (not shapes)
    for q in asked:
        text = q.text.lower()
        if q.kind in ("listing", "empty") and shapes:
            assert all(s.colour in q.answer.lower() for s in shapes)
        elif (q.kind in ("count", "empty") and "many" in text) or text.startswith("count the shapes"):
            assert q.answer == NUMBERS[len(shapes)].capitalize() + "."
        elif q.kind == "count of":
            n = sum(s.kind in text or s.colour in text for s in shapes)  # a kind's plural holds the kind
            assert q.answer == NUMBERS[n].capitalize() + "."
        elif q.kind == "yes/no":
            kind = next((k for k in KINDS if k in text), None)
            colour = next((c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c in text), None)
            there = any((kind is None or s.kind == kind) and (colour is None or s.colour == colour) for s in shapes)
            assert q.answer == ("Yes." if there else "No.")
        elif q.kind == "where" and not q.answer.startswith("There"):
            [shape] = [s for s in shapes if s.name in text]
            assert q.answer.lower() == position_of(shape, scene.width, scene.height) + "."
        elif q.kind == "colour" and not q.answer.startswith("There"):
            [shape] = [s for s in shapes if s.kind in text]
            assert q.answer == shape.colour.capitalize() + "."


def test_the_seed_fixes_the_data_set(tmp_path: Path) -> None:
    first = write_dataset(tmp_path / "a", count=5, val_count=2, seed=3)
    second = write_dataset(tmp_path / "b", count=5, val_count=2, seed=3, workers=2)
    assert [f.read_text() for f in first] == [f.read_text() for f in second]
    assert (tmp_path / "a" / "images" / "train_000004.png").read_bytes() == (
        tmp_path / "b" / "images" / "train_000004.png"
    ).read_bytes()
    rows = [json.loads(line) for line in first[0].read_text().splitlines()]
    assert len(rows) >= 5 * 6
    assert all(r["messages"][0]["content"][0]["image"].startswith("images/train_") for r in rows)


def test_score_counts_exact_answers() -> None:
    from vlm_train.shapes import held_out_questions, score

    expected = {q.text: q.answer for _, q in held_out_questions(30, 5)}
    # questions repeat across pictures with different answers: answer from the picture's own list instead
    asked = iter(held_out_questions(30, 5))
    perfect = score(lambda images, texts: [next(asked)[1].answer for _ in texts], count=30, seed=5)
    assert perfect.total > 150 and perfect.accuracy == 1.0 and expected
    assert {"listing", "count", "count of", "colour", "where", "yes/no"} <= set(perfect.by_question)
    guessing = score(lambda images, texts: ["Yes."] * len(texts), count=30, seed=5)
    assert 0 < guessing.by_question["yes/no"][0] < guessing.by_question["yes/no"][1]
    assert guessing.correct == guessing.by_question["yes/no"][0] and guessing.accuracy < 0.2


def test_shapes_score_command(capsys) -> None:
    from vlm_models.cli import main as vlm

    from .conftest import FLOAT_MODEL

    assert vlm(["train", "shapes-score", "--model", str(FLOAT_MODEL), "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exact answers: ") and "count" in out
