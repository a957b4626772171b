"""A synthetic data set: 0-4 simple shapes in six named colours anywhere on a plain, gradient or noisy
background, pictures of many sizes and aspect ratios, with questions in many wordings and exact short answers
(which shapes, how many, how many of a kind or colour, which colour, where, is there ...).

Two writers draw from different distributions: :data:`TRAINING` (what ``write_dataset`` writes) and
:data:`HELD_OUT` (what ``score`` asks about by default): other picture sizes and aspect ratios, diagonal gradients
and coarse or graded noise, and question wordings the training writer never uses.
"""

from __future__ import annotations

import colorsys
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "HELD_OUT",
    "KINDS",
    "NUMBERS",
    "POSITIONS",
    "QUESTION_KINDS",
    "TRAINING",
    "Background",
    "Question",
    "Scene",
    "Score",
    "Shape",
    "Writer",
    "held_out_questions",
    "model_answerer",
    "position_of",
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
KINDS = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = ("zero", "one", "two", "three", "four")
# Where a shape's centre lies on a 3 x 3 grid of thirds of the picture (row, then column).
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)
AMBIGUOUS_MARGIN = 0.05
"""A centre closer than this (a fraction of the picture's width or height) to a third line has no asked
position: the answer would hang on a pixel."""
QUESTION_KINDS = ("listing", "count", "count of", "colour", "where", "yes/no", "empty")


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]
    """``(x0, y0, x1, y1)`` in pixels, a square: circles are round and squares square on any picture."""
    rgb: tuple[int, int, int]
    """The colour drawn: the named colour with a little hue and brightness jitter."""

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        if self.kind == "triangle":  # the centroid of the upright triangle, two thirds of the way down
            return (x0 + x1) / 2, y0 + (y1 - y0) * 2 / 3
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass(frozen=True)
class Background:
    style: str
    """``plain``, ``gradient`` (``angle`` degrees, 0: left to right), ``noise`` (per pixel, ``grain`` px blocks),
    or ``graded noise`` (a gradient with noise)."""
    colours: tuple[tuple[int, int, int], ...]
    angle: float = 0.0
    noise: float = 0.0
    grain: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: Background
    shapes: tuple[Shape, ...]


def position_of(shape: Shape, width: int, height: int) -> str | None:
    """The shape's place in words, from its centre's third of the picture across and down (``"top left"``,
    ``"top"``, ``"centre"`` ...); ``None`` where the centre lies within :data:`AMBIGUOUS_MARGIN` of a third line."""
    x, y = shape.centre
    fx, fy = x / width, y / height
    if any(abs(f - line) < AMBIGUOUS_MARGIN for f in (fx, fy) for line in (1 / 3, 2 / 3)):
        return None
    return POSITIONS[min(int(fy * 3), 2)][min(int(fx * 3), 2)]


# --------------------------------------------------------------------------------------------------- writers


@dataclass(frozen=True)
class Writer:
    """How scenes are drawn and asked about: one picture distribution and one set of wordings."""

    name: str
    sides: tuple[tuple[int, int], ...]
    """Ranges of the longer side in pixels, one picked at random, then uniform within it."""
    aspects: tuple[float, ...] | tuple[float, float]
    """Aspect ratios (longer over shorter side) to pick from, or with ``continuous_aspect`` a range."""
    continuous_aspect: bool
    gradient_angles: tuple[float, ...] | None
    """Gradient directions to pick from; ``None``: any diagonal (20-70 degrees off an axis)."""
    noise_grains: tuple[int, ...]
    graded_noise: bool
    """Noise over a gradient as well as over a plain colour."""
    templates: dict[str, tuple[str, ...]]


_TRAINING_TEMPLATES = {
    "listing": (
        "What shapes are in this image?",
        "What shapes are there?",
        "Describe this image.",
        "What do you see?",
        "What is in this image?",
        "Which shapes are in the picture?",
        "List the shapes.",
        "What shapes do you see?",
        "Describe the picture.",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in this image?",
        "How many shapes?",
        "Count the shapes.",
    ),
    "count kind": ("How many {plural} are there?", "How many {plural}?", "Count the {plural}."),
    "count colour": ("How many {colour} shapes are there?", "How many {colour} shapes?"),
    "colour": ("What colour is the {kind}?", "What color is the {kind}?", "Which colour is the {kind}?"),
    "where": ("Where is the {name}?", "Where is the {name} in this image?"),
    "yes name": ("Is there a {name}?", "Do you see a {name}?"),
    "yes kind": ("Is there a {kind}?", "Are there any {plural}?"),
    "yes colour": ("Is there a {colour} shape?",),
}
# Wordings no training sample uses, made of words the training wordings do use.
_HELD_OUT_TEMPLATES = {
    "listing": (
        "What shapes are in the picture?",
        "Which shapes do you see?",
        "What is in the picture?",
        "Describe the image.",
    ),
    "count": ("How many shapes are in the picture?", "How many shapes do you see?"),
    "count kind": ("How many {plural} do you see?", "How many {plural} are in this image?"),
    "count colour": ("How many {colour} shapes do you see?", "Count the {colour} shapes."),
    "colour": ("Which color is the {kind}?", "What colour is the {kind} in this image?"),
    "where": ("Where is the {name} in the picture?",),
    "yes name": ("Is there a {name} in this image?",),
    "yes kind": ("Do you see a {kind}?", "Is there a {kind} in the picture?", "Do you see any {plural}?"),
    "yes colour": ("Are there any {colour} shapes?", "Do you see a {colour} shape?"),
}

TRAINING = Writer(
    name="training",
    sides=((40, 100), (140, 640)),
    aspects=(1.0, 4 / 3, 3 / 2, 16 / 9, 2.0),
    continuous_aspect=False,
    gradient_angles=(0.0, 90.0, 180.0, 270.0),
    noise_grains=(1,),
    graded_noise=False,
    templates=_TRAINING_TEMPLATES,
)
HELD_OUT = Writer(
    name="held out",
    sides=((101, 139), (641, 1000)),
    aspects=(1.05, 2.25),
    continuous_aspect=True,
    gradient_angles=None,
    noise_grains=(2, 3),
    graded_noise=True,
    templates=_HELD_OUT_TEMPLATES,
)


def _pale_or_grey(rng: np.random.Generator) -> tuple[int, int, int]:
    pick = rng.random()
    if pick < 0.15:
        return (255, 255, 255)
    if pick < 0.25:
        return (0, 0, 0)
    if pick < 0.6:
        grey = int(rng.integers(0, 256))
        return (grey, grey, grey)
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.06, 0.25), rng.uniform(0.88, 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _background(rng: np.random.Generator, writer: Writer) -> Background:
    style = ["plain", "gradient", "noise"][int(rng.choice(3, p=[0.45, 0.3, 0.25]))]
    seed = int(rng.integers(2**31))
    if style == "plain":
        return Background("plain", (_pale_or_grey(rng),))
    if writer.gradient_angles is None:
        angle = float(rng.uniform(20, 70) + 90 * rng.integers(4))
    else:
        angle = float(writer.gradient_angles[int(rng.integers(len(writer.gradient_angles)))])
    ends = (_pale_or_grey(rng), _pale_or_grey(rng))
    if style == "gradient":
        return Background("gradient", ends, angle=angle)
    grain = writer.noise_grains[int(rng.integers(len(writer.noise_grains)))]
    noise = float(rng.uniform(6, 30))
    if writer.graded_noise and rng.random() < 0.5:
        return Background("graded noise", ends, angle=angle, noise=noise, grain=grain, seed=seed)
    return Background("noise", ends[:1], noise=noise, grain=grain, seed=seed)


def _jittered(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in COLOURS[colour]))
    h = (h + rng.uniform(-0.015, 0.015)) % 1.0
    s = min(1.0, s * rng.uniform(0.85, 1.05))
    v = min(1.0, v * rng.uniform(0.85, 1.08))
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def _far_from(rgb: tuple[int, int, int], background: Background) -> bool:
    return all(np.linalg.norm(np.subtract(rgb, c)) > 90 for c in background.colours)


def _picture_size(rng: np.random.Generator, writer: Writer) -> tuple[int, int]:
    low, high = writer.sides[int(rng.integers(len(writer.sides)))]
    longer = int(rng.integers(low, high + 1))
    if writer.continuous_aspect:
        aspect = float(rng.uniform(*writer.aspects))
    else:
        aspect = float(writer.aspects[int(rng.integers(len(writer.aspects)))])
    shorter = max(32, round(longer / aspect))
    return (longer, shorter) if rng.random() < 0.5 else (shorter, longer)


_LARGEST = {1: 0.8, 2: 0.55, 3: 0.45, 4: 0.4}
"""The largest side of a shape, as a fraction of the picture's shorter side, by how many shapes there are."""
SMALLEST = 0.14


def random_scene(rng: np.random.Generator, writer: Writer = TRAINING) -> Scene:
    """0-4 shapes (empty pictures about one in twelve) placed anywhere, sides from :data:`SMALLEST` to most of the
    picture's shorter side; boxes never overlap but in about one scene in ten, where they may overlap a little."""
    width, height = _picture_size(rng, writer)
    background = _background(rng, writer)
    count = int(rng.choice(5, p=[0.08, 0.23, 0.23, 0.23, 0.23]))
    overlap = 0.2 if rng.random() < 0.1 else 0.0
    short = min(width, height)
    for _attempt in range(100):
        shapes: list[Shape] = []
        for _ in range(count):
            for _try in range(60):
                side = max(6, round(short * rng.uniform(SMALLEST, _LARGEST[count])))
                x0 = int(rng.integers(0, width - side + 1))
                y0 = int(rng.integers(0, height - side + 1))
                box = (x0, y0, x0 + side, y0 + side)
                if all(_overlap(box, s.box) <= overlap for s in shapes):
                    break
            else:
                break
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            rgb = _jittered(rng, colour)
            while not _far_from(rgb, background):
                colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                rgb = _jittered(rng, colour)
            shapes.append(Shape(KINDS[int(rng.integers(len(KINDS)))], colour, box, rgb))
        if len(shapes) == count:
            return Scene(width, height, background, tuple(shapes))
    raise RuntimeError("could not place the shapes")  # pragma: no cover - the sizes always fit


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """The boxes' intersection as a share of the smaller box."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _background_pixels(background: Background, width: int, height: int) -> np.ndarray:
    colours = np.asarray(background.colours, dtype=np.float32)
    if background.style in ("gradient", "graded noise"):
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        theta = np.deg2rad(background.angle)
        along = xs / max(width - 1, 1) * np.cos(theta) + ys / max(height - 1, 1) * np.sin(theta)
        along = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        pixels = colours[0] + (colours[1] - colours[0]) * along[..., None]
    else:
        pixels = np.broadcast_to(colours[0], (height, width, 3)).astype(np.float32)
    if background.style in ("noise", "graded noise"):
        rng = np.random.default_rng(background.seed)
        grain = background.grain
        coarse = rng.normal(0, background.noise, (-(-height // grain), -(-width // grain), 1)).astype(np.float32)
        pixels = pixels + np.repeat(np.repeat(coarse, grain, 0), grain, 1)[:height, :width]
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    image = Image.fromarray(_background_pixels(scene.background, scene.width, scene.height))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = shape.box
        if shape.kind == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=shape.rgb)
        elif shape.kind == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=shape.rgb)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=shape.rgb)
    return image


# --------------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    kind: str
    """One of :data:`QUESTION_KINDS` (``empty``: a listing or count about a picture without shapes)."""
    text: str
    answer: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _listing(shapes: Sequence[Shape]) -> str:
    """Grouped and in a fixed order (kind, then colour, as :data:`KINDS` and :data:`COLOURS` list them), so the
    listing never hangs on where the shapes are: "Two red circles, a blue square and a green triangle"."""
    if not shapes:
        return "No shapes."
    groups: dict[tuple[str, str], int] = {}
    for shape in sorted(shapes, key=lambda s: (KINDS.index(s.kind), list(COLOURS).index(s.colour))):
        groups[(shape.kind, shape.colour)] = groups.get((shape.kind, shape.colour), 0) + 1
    parts = [
        f"{_article(colour)} {colour} {kind}" if n == 1 else f"{NUMBERS[n]} {colour} {PLURALS[kind]}"
        for (kind, colour), n in groups.items()
    ]
    return _sentence(parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])


def _there_are(n: int, kind: str, colour: str | None = None) -> str:
    what = f"{colour} {kind}" if colour else kind
    if n == 0:
        return f"There is no {what}."
    plural = f"{colour} {PLURALS[kind]}" if colour else PLURALS[kind]
    return f"There are {NUMBERS[n]} {plural}."


def _vary(rng: np.random.Generator, text: str) -> str:
    """Casing and punctuation as people type them: as written, first letter or everything lower-case, with or
    without the final mark."""
    pick = rng.random()
    if pick < 0.3:
        text = text[0].lower() + text[1:]
    elif pick < 0.45:
        text = text.lower()
    if rng.random() < 0.3:
        text = text.rstrip("?.")
    return text


def questions(scene: Scene, rng: np.random.Generator, writer: Writer = TRAINING) -> list[Question]:
    """Questions about ``scene`` with their exact answers, one or two of each kind, in ``writer``'s wordings
    (chosen, with the shapes, colours and kinds asked about, by ``rng``)."""
    shapes, templates = scene.shapes, writer.templates

    def pick(seq: Sequence[Any]) -> Any:
        return seq[int(rng.integers(len(seq)))]

    def ask(question_kind: str, template_kind: str, answer: str, **words: str) -> Question:
        text = re.sub(r"\ba ([aeiou])", r"an \1", pick(templates[template_kind]).format(**words))
        return Question(question_kind, _vary(rng, text), answer)

    count_kind = "empty" if not shapes else "count"
    qa = [
        ask("empty" if not shapes else "listing", "listing", _listing(shapes)),
        ask(count_kind, "count", _sentence(NUMBERS[len(shapes)])),
    ]
    kind = pick(KINDS)
    colour = pick(list(COLOURS))
    if rng.random() < 0.5:
        n = sum(s.kind == kind for s in shapes)
        qa.append(ask("count of", "count kind", _sentence(NUMBERS[n]), plural=PLURALS[kind]))
    else:
        n = sum(s.colour == colour for s in shapes)
        qa.append(ask("count of", "count colour", _sentence(NUMBERS[n]), colour=colour))

    # Colour of a kind: most often a kind that is there once; "There is no ..." / "There are two ..." otherwise.
    present = [k for k in KINDS if sum(s.kind == k for s in shapes) == 1]
    asked_kind = pick(present) if present and rng.random() < 0.75 else pick(KINDS)
    matching = [s for s in shapes if s.kind == asked_kind]
    answer = _sentence(matching[0].colour) if len(matching) == 1 else _there_are(len(matching), asked_kind)
    qa.append(ask("colour", "colour", answer, kind=asked_kind))

    # Where: a shape named once whose centre is clearly in one place; sometimes one that is not there.
    names = [s.name for s in shapes]
    placed = [(s, position_of(s, scene.width, scene.height)) for s in shapes if names.count(s.name) == 1]
    placed = [(s, where) for s, where in placed if where is not None]
    if placed and rng.random() < 0.85:
        shape, where = pick(placed)
        qa.append(ask("where", "where", _sentence(where), name=shape.name))
    else:
        kind, colour = pick(KINDS), pick(list(COLOURS))
        n = names.count(f"{colour} {kind}")
        if n != 1:
            qa.append(ask("where", "where", _there_are(n, kind, colour), name=f"{colour} {kind}"))

    # Yes/no: one whose answer is yes where there are shapes, one whose answer is most likely no.
    for want_yes in (True, False):
        form = pick(("yes name", "yes kind", "yes colour"))
        if want_yes and shapes:
            shape = pick(shapes)
            kind, colour = shape.kind, shape.colour
        else:
            kind, colour = pick(KINDS), pick(list(COLOURS))
        if form == "yes name":
            there = any(s.kind == kind and s.colour == colour for s in shapes)
        elif form == "yes kind":
            there = any(s.kind == kind for s in shapes)
        else:
            there = any(s.colour == colour for s in shapes)
        words = {"name": f"{colour} {kind}", "kind": kind, "plural": PLURALS[kind], "colour": colour}
        qa.append(ask("yes/no", form, "Yes." if there else "No.", **words))
    return qa


def _sample(image: str, question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ]
    }


def _write_chunk(args: tuple[Path, str, int, int, int, Writer]) -> list[str]:
    output, split, seed, start, stop, writer = args
    lines = []
    for i in range(start, stop):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        scene = random_scene(rng, writer)
        name = f"images/{split}_{i:06d}.png"
        render(scene).save(output / name)
        lines.extend(json.dumps(_sample(name, q.text, q.answer)) for q in questions(scene, rng, writer))
    return lines


def write_dataset(
    output: str | Path,
    *,
    count: int = 1000,
    val_count: int = 100,
    seed: int = 0,
    workers: int = 1,
    size: int | None = None,
) -> list[Path]:
    """``output/train.jsonl`` and ``output/valid.jsonl`` (one sample per question) from the :data:`TRAINING`
    writer, images under ``output/images/``; the same seed writes the same files, with any number of
    ``workers`` (processes). ``size``: every picture square, of that side (benchmarks want fixed shapes)."""
    from dataclasses import replace

    from tqdm import tqdm

    if count < 1 or val_count < 0 or (size is not None and size < 28):
        raise ValueError("need --count >= 1, --val-count >= 0 and --size >= 28")
    writer = TRAINING if size is None else replace(TRAINING, sides=((size, size),), aspects=(1.0,))
    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    files = []
    for split, n in (("train", count), ("valid", val_count)):
        if n == 0:
            continue
        step = max(1, min(500, -(-n // max(workers, 1))))
        chunks = [(output, split, seed, start, min(start + step, n), writer) for start in range(0, n, step)]
        lines: list[str] = []
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers) as pool:
                for part in tqdm(pool.map(_write_chunk, chunks), total=len(chunks), desc=f"shapes {split}"):
                    lines.extend(part)
        else:
            for chunk in tqdm(chunks, desc=f"shapes {split}", unit="chunk"):
                lines.extend(_write_chunk(chunk))
        file = output / f"{split}.jsonl"
        file.write_text("\n".join(lines) + "\n")
        files.append(file)
    return files


# --------------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Score:
    correct: int
    total: int
    by_question: dict[str, tuple[int, int]]
    """Question kind (:data:`QUESTION_KINDS`) -> (correct, asked)."""
    mistakes: tuple[tuple[str, str, str], ...] = ()
    """``(question, expected, given)`` of the first wrong answers."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def worst_kind(self) -> float:
        return min((c / n for c, n in self.by_question.values() if n), default=0.0)


def held_out_questions(count: int, seed: int, writer: Writer = HELD_OUT) -> list[tuple[Image.Image, Question]]:
    """``count`` fresh scenes of ``writer`` with their questions (a seed stream ``write_dataset`` never uses)."""
    asked = []
    for i in range(count):
        rng = np.random.default_rng([seed, 7919, i])
        scene = random_scene(rng, writer)
        image = render(scene)
        asked.extend((image, q) for q in questions(scene, rng, writer))
    return asked


def score(
    answer: Callable[[Sequence[Image.Image], Sequence[str]], list[str]],
    *,
    count: int = 200,
    seed: int = 1,
    writer: Writer = HELD_OUT,
) -> Score:
    """Ask every question of ``count`` fresh scenes (``answer(images, questions)`` answers them all, one answer per
    pair, so a model can answer in batches); an answer counts when it equals the expected one exactly
    (surrounding whitespace aside). By default the scenes and wordings are the :data:`HELD_OUT` writer's."""
    asked = held_out_questions(count, seed, writer)
    answers = answer([image for image, _ in asked], [q.text for _, q in asked])
    if len(answers) != len(asked):
        raise ValueError(f"the answerer gave {len(answers)} answers to {len(asked)} questions")
    correct = 0
    by_question: dict[str, list[int]] = {}
    mistakes = []
    for (_, question), given in zip(asked, answers):
        ok = given.strip() == question.answer
        tally = by_question.setdefault(question.kind, [0, 0])
        tally[0] += ok
        tally[1] += 1
        correct += ok
        if not ok and len(mistakes) < 40:
            mistakes.append((question.text, question.answer, given.strip()))
    by_kind = {k: (by_question[k][0], by_question[k][1]) for k in QUESTION_KINDS if k in by_question}
    return Score(correct, len(asked), by_kind, tuple(mistakes))


def model_answerer(
    model: Any, processor: Any, max_tokens: int = 32, batch_size: int = 64, progress: bool = True
) -> Callable[[Sequence[Image.Image], Sequence[str]], list[str]]:
    """Greedy answers of a loaded model through its chat template, ``batch_size`` questions at a time.
    ``max_tokens`` leaves room for the longest listing (four shapes: about 20 tokens of the demo's tokenizer)."""
    from tqdm import tqdm

    from vlm_models import apply_chat_template
    from vlm_runtime import batch_generate

    def answer(images: Sequence[Image.Image], asked: Sequence[str]) -> list[str]:
        prompts = [apply_chat_template(processor, None, question, num_images=1) for question in asked]
        answers: list[str] = []
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc="answering", unit="batch", disable=not progress):
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
