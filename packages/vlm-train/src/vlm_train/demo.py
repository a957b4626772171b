"""The shipped demo model: a tiny Qwen2-VL trained from scratch on the shapes data by one command
(``vlm train demo``), small enough to live inside vlm-models as the offline default model.

The run: write the shapes data (the training writer of :mod:`vlm_train.shapes`), build a word-level byte BPE
tokenizer and a Qwen2-VL "base" (config, tokenizer, chat template, an image processor that resizes every picture
to about 112 x 112 pixels) for it, initialise random weights, train every weight, save the model, then score it
on freshly generated pictures and questions of the held-out writer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .scratch import ModelSizes
from .shapes import COLOURS, KINDS, NUMBERS, PLURALS, POSITIONS, TRAINING, Score, questions, random_scene

__all__ = ["DemoRecipe", "build_demo_base", "demo_training_config", "recipe_with", "score_demo", "train_demo"]

IMAGE_PIXELS = 112 * 112
"""Every picture is resized (aspect ratio kept) to about this many pixels: a square one to 8 x 8 patches of
14 px, merged 2 x 2 into 16 image tokens; a shape a seventh of the picture wide still covers a patch."""
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# ChatML like Qwen2-VL's, without the default system turn: the model only ever sees these prompts, and every
# token saved is training time.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class DemoRecipe:
    """Everything that decides the demo model; the defaults are the shipped model's."""

    sizes: ModelSizes = ModelSizes(
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        vision_embed_dim=96,
        vision_depth=2,
        vision_num_heads=2,
        vision_mlp_ratio=2,
    )
    images: int = 10000
    """Training images (each asked about seven questions)."""
    steps: int = 6000
    batch_size: int = 16
    learning_rate: float = 5e-4
    """v1 found that 1e-3 and up lets the image features grow along one direction and the model settle on the
    text prior, while 3e-4 to 5e-4 learned."""
    warmup_steps: int = 200
    seed: int = 0
    score_images: int = 200
    score_seed: int = 1


def _tokenizer_corpus(seed: int, scenes: int = 3000) -> list[str]:
    rng = np.random.default_rng([seed, 104729])
    lines = ["system", "user", "assistant", "You are a helpful assistant.", "Describe this image."] * 20
    lines += [f"{c} {k}" for c in COLOURS for k in KINDS] + list(PLURALS.values()) + list(NUMBERS)
    lines += [place for row in POSITIONS for place in row]
    for _ in range(scenes):
        for question in questions(random_scene(rng, TRAINING), rng, TRAINING):
            lines += [question.text, question.answer]
    return lines


def _build_tokenizer(seed: int) -> Any:
    """A byte-level BPE trained on the shapes questions and answers, so their words are single tokens
    (``" circle"``, ``" red"``): answers take a few tokens instead of a few dozen; any text still encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    return tokenizer


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def build_demo_base(folder: str | Path, seed: int = 0) -> Path:
    """A weightless Qwen2-VL checkpoint folder (config, tokenizer, chat template, image processor) for
    :func:`vlm_train.scratch.init_model` to size and initialise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(seed)
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "errors": "replace",
            "model_max_length": 4096,
            "processor_class": "Qwen2VLProcessor",
        },
    )
    _write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    pixels = IMAGE_PIXELS
    _write_json(
        folder / "preprocessor_config.json",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2VLProcessor",
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "rescale_factor": 1 / 255,
            "resample": 3,
            "min_pixels": pixels,
            "max_pixels": pixels,
            "size": {"shortest_edge": pixels, "longest_edge": pixels},
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
        },
    )
    _write_json(
        folder / "config.json",
        {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "vocab_size": vocab_size,
            "hidden_size": 64,  # init_model rewrites the sizes
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_window_layers": 1,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            # Qwen2-VL's 1e6 leaves the row and column sections of M-RoPE (its lowest frequencies) turning by
            # under 0.03 rad per image token, so the decoder cannot tell the quadrants apart by position; at 10
            # they turn 0.1-0.6 rad, and a 40-token prompt is still far shorter than the slowest period.
            "rope_theta": 10.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "sliding_window": 4096,
            "attention_dropout": 0.0,
            "torch_dtype": "float32",
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
            "vision_token_id": ids["<|vision_pad|>"],
            "vision_config": {
                "depth": 1,
                "embed_dim": 32,
                "hidden_size": 64,
                "in_chans": 3,
                "mlp_ratio": 2,
                "num_heads": 2,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "spatial_patch_size": 14,
                "temporal_patch_size": 2,
            },
        },
    )
    _write_json(
        folder / "generation_config.json",
        {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]},
    )
    return folder


def demo_training_config(
    recipe: DemoRecipe, init: Path, data: Path, work: Path, *, progress: bool, workers: int
) -> Any:
    """The :class:`vlm_train.TrainingConfig` of the recipe's run (full fine-tuning of the initialised model)."""
    from .config import TrainingConfig

    return TrainingConfig(
        model=str(init),
        train_data=str(data / "train.jsonl"),
        val_data=str(data / "valid.jsonl"),
        output=str(work / "run"),
        fine_tune_type="full",
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        warmup_steps=recipe.warmup_steps,
        min_learning_rate=recipe.learning_rate / 20,
        max_grad_norm=1.0,
        val_every=max(recipe.steps // 4, 1),
        val_batches=4,
        seed=recipe.seed,
        progress=progress,
        data_workers=workers,
    )


def default_workers() -> int:
    import os

    return max(1, min(os.cpu_count() or 1, 16))


def train_demo(
    output: str | Path,
    work: str | Path,
    recipe: DemoRecipe = DemoRecipe(),
    *,
    progress: bool = True,
    report: Callable[[str], None] = print,
    data: str | Path | None = None,
    workers: int | None = None,
) -> Score:
    """Build, train and save the demo model to ``output``; returns its held-out score (also written to
    ``output/demo_score.json``). ``work`` keeps the data, the initial model and the training files; ``data``: an
    existing shapes data folder to train on instead of writing one; ``workers``: processes that write and encode
    the data (default: the CPU count, at most 16; the data are the same with any number)."""
    from vlm_models import load
    from vlm_models.convert import save_model
    from vlm_models.loading import load_config

    from .scratch import init_model
    from .shapes import write_dataset
    from .trainer import Trainer

    workers = workers or default_workers()
    work, output = Path(work), Path(output)
    started = time.perf_counter()
    if data is None:
        data = work / "data"
        report(f"writing {recipe.images} shapes images to {data}")
        write_dataset(data, count=recipe.images, val_count=50, seed=recipe.seed, workers=workers)
    data = Path(data)
    base = build_demo_base(work / "base", seed=recipe.seed)
    init, n_params = init_model(base, work / "init", recipe.sizes, seed=recipe.seed)
    report(f"initialised a {n_params / 1e6:.2f}M-parameter Qwen2-VL in {init}")
    config = demo_training_config(recipe, init, data, work, progress=progress, workers=workers)
    model, processor = load(init)
    trainer = Trainer(model, processor, config, report=report)
    trainer.run()
    model.eval()
    folder = save_model(model, output, source=init, config=load_config(init))
    trained = time.perf_counter() - started
    return score_demo(folder, model, processor, recipe, n_params, trained, progress=progress, report=report)


def score_demo(
    folder: Path,
    model: Any,
    processor: Any,
    recipe: DemoRecipe,
    n_params: int,
    seconds: float,
    *,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> Score:
    """Score a trained demo model on the held-out writer's pictures and questions (and, for comparison, on fresh
    pictures of the training writer) and write ``folder/demo_score.json``."""
    from .shapes import TRAINING, model_answerer, score

    answerer = model_answerer(model, processor, progress=progress)
    result = score(answerer, count=recipe.score_images, seed=recipe.score_seed)
    seen = score(answerer, count=max(recipe.score_images // 4, 1), seed=recipe.score_seed, writer=TRAINING)
    summary = {
        "score": result.accuracy,
        "correct": result.correct,
        "questions": result.total,
        "by_question": result.by_question,
        "held_out_images": recipe.score_images,
        "score_seed": recipe.score_seed,
        "training_writer_score": seen.accuracy,
        "training_writer_by_question": seen.by_question,
        "parameters": n_params,
        "train_seconds": round(seconds, 1),
        "recipe": asdict(recipe),
    }
    _write_json(folder / "demo_score.json", summary)
    parts = ", ".join(f"{kind} {c}/{n}" for kind, (c, n) in result.by_question.items())
    report(
        f"saved the demo model to {folder} ({seconds / 60:.1f} min to train); held-out exact answers: "
        f"{result.correct}/{result.total} ({result.accuracy:.1%}: {parts}); fresh training-writer pictures: "
        f"{seen.accuracy:.1%}"
    )
    for question, expected, given in result.mistakes[:10]:
        report(f"  wrong: {question!r} -> {given!r} (expected {expected!r})")
    return result


def recipe_with(**changes: Any) -> DemoRecipe:
    """The shipped recipe with some fields changed (``sizes`` fields included, by name)."""
    size_fields = set(ModelSizes.__dataclass_fields__)
    sizes = {k: v for k, v in changes.items() if k in size_fields}
    rest = {k: v for k, v in changes.items() if k not in size_fields}
    recipe = DemoRecipe()
    return replace(recipe, sizes=replace(recipe.sizes, **sizes), **rest)
