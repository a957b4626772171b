"""A synthetic data set: 1-3 simple shapes in named colours on a plain background, each in its own quadrant,
with questions and exact short answers about them (which shapes, how many, which colour, where)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "KINDS",
    "QUADRANTS",
    "Scene",
    "Score",
    "Shape",
    "model_answerer",
    "questions",
    "random_scene",
    "render",
    "score",
    "write_dataset",
]

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 170),
    "orange": (250, 130, 20),
}
BACKGROUNDS = ((255, 255, 255), (235, 235, 235), (20, 20, 20))
KINDS = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    quadrant: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]


def random_scene(rng: np.random.Generator) -> Scene:
    count = int(rng.integers(1, 4))
    quadrants = sorted(rng.choice(len(QUADRANTS), size=count, replace=False).tolist())
    shapes = tuple(
        Shape(KINDS[int(rng.integers(len(KINDS)))], list(COLOURS)[int(rng.integers(len(COLOURS)))], QUADRANTS[q])
        for q in quadrants
    )
    return Scene(shapes, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])


def render(scene: Scene, size: int = 56) -> Image.Image:
    image = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(image)
    half = size / 2
    margin = size * 0.06
    for shape in scene.shapes:
        row, column = divmod(QUADRANTS.index(shape.quadrant), 2)
        x0, y0 = column * half + margin, row * half + margin
        x1, y1 = (column + 1) * half - margin, (row + 1) * half - margin
        colour = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape.kind == "square":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    return image


def _listing(shapes: Sequence[Shape]) -> str:
    names = [f"{'an' if s.name[0] in 'aeiou' else 'a'} {s.name}" for s in shapes]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Every question this scene answers unambiguously, with its exact answer (shapes listed in reading order)."""
    shapes = scene.shapes
    qa = [
        ("What shapes are in this image?", _listing(shapes)),
        ("How many shapes are there?", f"{NUMBERS[len(shapes)].capitalize()}."),
    ]
    for kind in KINDS:
        matching = [s for s in shapes if s.kind == kind]
        if len(matching) == 1:
            qa.append((f"What colour is the {kind}?", f"{matching[0].colour.capitalize()}."))
    names = [s.name for s in shapes]
    for shape in shapes:
        if names.count(shape.name) == 1:
            qa.append((f"Where is the {shape.name}?", f"{shape.quadrant.capitalize()}."))
    return qa


def _sample(image: str, question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    }


def write_dataset(
    output: str | Path, *, count: int = 1000, val_count: int = 100, seed: int = 0, size: int = 56
) -> list[Path]:
    """``output/train.jsonl`` and ``output/valid.jsonl`` (one sample per question), images under
    ``output/images/``; the same seed writes the same files."""
    from tqdm import tqdm

    if count < 1 or val_count < 0 or size < 28:
        raise ValueError("need --count >= 1, --val-count >= 0 and --size >= 28")
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for split, n in (("train", count), ("valid", val_count)):
        if n == 0:
            continue
        lines = []
        for i in tqdm(range(n), desc=f"shapes {split}", unit="image"):
            scene = random_scene(rng)
            name = f"images/{split}_{i:06d}.png"
            render(scene, size).save(output / name)
            lines.extend(json.dumps(_sample(name, q, a)) for q, a in questions(scene))
        file = output / f"{split}.jsonl"
        file.write_text("\n".join(lines) + "\n")
        files.append(file)
    return files


@dataclass(frozen=True)
class Score:
    correct: int
    total: int
    by_question: dict[str, tuple[int, int]]
    """Question kind (``what``, ``how many``, ``colour``, ``where``) -> (correct, asked)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def _kind(question: str) -> str:
    prefixes = {"What shapes": "what", "How many": "how many", "What colour": "colour", "Where": "where"}
    for prefix, kind in prefixes.items():
        if question.startswith(prefix):
            return kind
    return "other"


def score(
    answer: Callable[[Sequence[Image.Image], Sequence[str]], list[str]],
    *,
    count: int = 200,
    seed: int = 1,
    size: int = 56,
) -> Score:
    """Ask every question of ``count`` fresh scenes (``answer(images, questions)`` answers them all, one answer per
    pair, so a model can answer in batches); an answer counts when it equals the expected one exactly
    (surrounding whitespace aside). Use a seed other than the training data's."""
    rng = np.random.default_rng([seed, 7919])  # never the stream write_dataset uses for the same seed
    images, asked, expected = [], [], []
    for _ in range(count):
        scene = random_scene(rng)
        image = render(scene, size)
        for question, right in questions(scene):
            images.append(image)
            asked.append(question)
            expected.append(right)
    answers = answer(images, asked)
    if len(answers) != len(asked):
        raise ValueError(f"the answerer gave {len(answers)} answers to {len(asked)} questions")
    correct = 0
    by_question: dict[str, list[int]] = {}
    for question, right, given in zip(asked, expected, answers):
        ok = given.strip() == right
        tally = by_question.setdefault(_kind(question), [0, 0])
        tally[0] += ok
        tally[1] += 1
        correct += ok
    total = len(asked)
    return Score(correct, total, {k: (v[0], v[1]) for k, v in by_question.items()})


def model_answerer(
    model: Any, processor: Any, max_tokens: int = 48, batch_size: int = 64
) -> Callable[[Sequence[Image.Image], Sequence[str]], list[str]]:
    """Greedy answers of a loaded model through its chat template, ``batch_size`` questions at a time.
    ``max_tokens`` leaves room for the longest listing (three shapes: up to 36 tokens of the fixtures' tokenizer)."""
    from tqdm import tqdm

    from vlm_models import apply_chat_template
    from vlm_runtime import batch_generate

    def answer(images: Sequence[Image.Image], asked: Sequence[str]) -> list[str]:
        prompts = [apply_chat_template(processor, None, question, num_images=1) for question in asked]
        answers: list[str] = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="answering", unit="batch"):
            results = batch_generate(
                model,
                processor,
                prompts[start : start + batch_size],
                images=list(images[start : start + batch_size]),
                max_batch_size=batch_size,
                max_tokens=max_tokens,
            )
            answers.extend(result.text for result in results)
        return answers

    return answer
