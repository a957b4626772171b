"""``vlm train`` (through the ``vlm.commands`` entry point) and the standalone ``vlm-train`` script.

``vlm train --model M --data D ...`` trains; ``vlm train fuse ...`` merges an adapter into its base;
``vlm train shapes ...`` writes the synthetic shapes data set, ``vlm train shapes-score ...`` scores a model on
fresh shapes images; ``vlm train init ...`` writes a randomly initialised small model to train from scratch;
``vlm train demo`` trains the shipped demo model from scratch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main", "register"]


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    from vlm_models.adapters import FINE_TUNE_TYPES, TARGET_GROUPS

    from .config import BAD_SAMPLE_POLICIES, LR_SCHEDULES

    what = parser.add_argument_group("what to train")
    what.add_argument("--model", help="base checkpoint: local folder or Hugging Face repo id")
    what.add_argument(
        "--data",
        help="JSONL of chat samples, a parquet/Arrow table, or a folder (train.jsonl + valid.jsonl, train/ +"
        " validation/ splits, train-*.parquet shards, or a datasets save_to_disk folder)",
    )
    what.add_argument("--val-data", default=None, help="validation samples, in any of the --data forms")
    usual_names = {"image": "image, images", "question": "question, prompt, ...", "answer": "answer, response, ..."}
    for column, usual in usual_names.items():
        what.add_argument(f"--{column}-column", default=None, help=f"table column with the {column} ({usual})")
    what.add_argument("--output", "--adapter-path", dest="output", default="adapters", help="folder for the adapters")
    what.add_argument("--fine-tune-type", default="lora", choices=FINE_TUNE_TYPES)
    what.add_argument("--rank", type=int, default=8, help="LoRA rank")
    what.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha/rank)")
    what.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    what.add_argument(
        "--lora-targets",
        default="language",
        help=f"comma-separated groups that get adapters, from {','.join(TARGET_GROUPS)} (default: language)",
    )
    what.add_argument(
        "--lora-modules",
        default=None,
        help="comma-separated glob patterns over module paths (e.g. '*.q_proj,*.v_proj'); replaces --lora-targets",
    )
    what.add_argument("--q-bits", type=int, default=4, help="QLoRA: bits of the quantized base")
    what.add_argument("--q-group-size", type=int, default=64, help="QLoRA: group size of the quantized base")

    how = parser.add_argument_group("how to train")
    how.add_argument("--steps", type=int, default=100, help="optimizer updates")
    how.add_argument("--batch-size", type=int, default=1)
    how.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per update")
    how.add_argument("--learning-rate", type=float, default=1e-4)
    how.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES)
    how.add_argument("--warmup-steps", type=int, default=0)
    how.add_argument("--min-learning-rate", type=float, default=0.0)
    how.add_argument("--weight-decay", type=float, default=0.0)
    how.add_argument("--max-grad-norm", type=float, default=None)
    how.add_argument("--max-length", type=int, default=2048, help="longer samples are bad samples")
    how.add_argument("--grad-checkpoint", action="store_true", help="recompute activations to save memory")
    how.add_argument("--val-every", type=int, default=0, help="validation loss every N steps (and after the last)")
    how.add_argument("--val-batches", type=int, default=0, help="batches per validation (0: all)")
    how.add_argument("--save-every", type=int, default=0, help="resumable checkpoint every N steps")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--on-bad-sample", default="skip", choices=BAD_SAMPLE_POLICIES)
    how.add_argument("--resume-from", default=None, help="checkpoint folder (OUTPUT/checkpoints/step_N)")
    how.add_argument("--no-progress", action="store_true", help="no progress bars")
    how.add_argument("--data-workers", type=int, default=1, help="processes encoding the samples before training")
    parser.add_argument("--verbose", action="store_true", help="tracebacks instead of one-line errors")


def _split(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def config_from_args(args: argparse.Namespace) -> Any:
    from .config import LoRAConfig, QuantizationConfig, TableColumns, TrainingConfig

    if not args.model or not args.data:
        raise ValueError("training needs --model and --data")
    modules = _split(args.lora_modules)
    return TrainingConfig(
        model=args.model,
        train_data=args.data,
        val_data=args.val_data,
        columns=TableColumns(image=args.image_column, question=args.question_column, answer=args.answer_column),
        output=args.output,
        fine_tune_type=args.fine_tune_type,
        lora=LoRAConfig(
            rank=args.rank,
            alpha=args.alpha,
            dropout=args.dropout,
            targets=() if modules else _split(args.lora_targets),
            modules=modules,
        ),
        quantization=QuantizationConfig(bits=args.q_bits, group_size=args.q_group_size),
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        min_learning_rate=args.min_learning_rate,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        max_length=args.max_length,
        grad_checkpoint=args.grad_checkpoint,
        val_every=args.val_every,
        val_batches=args.val_batches,
        save_every=args.save_every,
        seed=args.seed,
        on_bad_sample=args.on_bad_sample,
        resume_from=args.resume_from,
        progress=not args.no_progress,
        data_workers=args.data_workers,
    )


def _train(args: argparse.Namespace) -> None:
    from .trainer import train

    result = train(config_from_args(args))
    last = result.history[-1] if result.history else None
    summary = f"trained {result.steps} steps"
    if last is not None:
        summary += f", final loss {last['loss']:.4f}"
    if result.validation:
        summary += f", validation loss {result.validation[-1]['val_loss']:.4f}"
    if result.skipped:
        summary += f", {len(result.skipped)} bad sample(s) skipped"
    print(f"{summary}; adapters in {result.output}", file=sys.stderr)


def _fuse(args: argparse.Namespace) -> None:
    from .config import QuantizationConfig
    from .fuse import FuseOptions, fuse

    quantize = QuantizationConfig(bits=args.q_bits, group_size=args.q_group_size) if args.quantize else None
    out = fuse(args.model, args.adapter_path, args.output, FuseOptions(quantize=quantize, dequantize=args.dequantize))
    print(f"fused model written to {out}", file=sys.stderr)


def _shapes(args: argparse.Namespace) -> None:
    from .shapes import write_dataset

    files = write_dataset(
        args.output, count=args.count, val_count=args.val_count, seed=args.seed, workers=args.workers, size=args.size
    )
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)


def _score(args: argparse.Namespace) -> None:
    from vlm_models import load

    from .shapes import HELD_OUT, TRAINING, model_answerer, score

    model, processor = load(args.model, adapter_path=args.adapter_path)
    writer = TRAINING if args.writer == "training" else HELD_OUT
    result = score(model_answerer(model, processor), count=args.count, seed=args.seed, writer=writer)
    parts = ", ".join(f"{kind} {c}/{n}" for kind, (c, n) in sorted(result.by_question.items()))
    print(f"exact answers: {result.correct}/{result.total} = {result.accuracy:.1%} ({parts})")


def _init(args: argparse.Namespace) -> None:
    from .scratch import ModelSizes, init_model

    sizes = ModelSizes(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate_size,
        vision_embed_dim=args.vision_embed_dim,
        vision_depth=args.vision_depth,
        vision_num_heads=args.vision_heads,
    )
    out, n_params = init_model(args.like, args.output, sizes, seed=args.seed, max_pixels=args.max_pixels)
    print(f"wrote a randomly initialised model ({n_params / 1e6:.2f}M parameters) to {out}", file=sys.stderr)


def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoRecipe, recipe_with, train_demo

    if args.images < 1 or args.steps < 1:
        raise ValueError("--images and --steps must be at least 1")
    warmup = DemoRecipe().warmup_steps
    recipe = recipe_with(
        images=args.images, steps=args.steps, seed=args.seed, warmup_steps=warmup if warmup < args.steps else 0
    )
    train_demo(
        args.output, args.work, recipe, progress=not args.no_progress, report=lambda m: print(m, file=sys.stderr)
    )


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    from .scratch import ModelSizes

    sub = parser.add_subparsers(dest="train_command", metavar="{fuse,shapes,shapes-score,init,demo}")
    fuse = sub.add_parser("fuse", help="merge an adapter into its base model and save the result")
    fuse.add_argument("--model", required=True, help="the base checkpoint the adapter was trained on")
    fuse.add_argument("--adapter-path", required=True, help="folder with adapters.safetensors")
    fuse.add_argument("--output", required=True, help="folder for the fused model (MLX-community layout)")
    fuse.add_argument("--quantize", action="store_true", help="quantize the fused model")
    fuse.add_argument("--q-bits", type=int, default=4)
    fuse.add_argument("--q-group-size", type=int, default=64)
    fuse.add_argument("--dequantize", action="store_true", help="write a quantized base's layers in float")
    fuse.add_argument("--verbose", action="store_true")
    fuse.set_defaults(handler=_fuse)

    shapes = sub.add_parser("shapes", help="write the synthetic shapes data set (train.jsonl, valid.jsonl, images)")
    shapes.add_argument("--output", required=True, help="folder to write")
    shapes.add_argument("--count", type=int, default=1000, help="training images")
    shapes.add_argument("--val-count", type=int, default=100, help="validation images")
    shapes.add_argument("--workers", type=int, default=1, help="processes writing images (same files with any)")
    shapes.add_argument("--size", type=int, default=None, help="every picture square of this side (default: varied)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--verbose", action="store_true")
    shapes.set_defaults(handler=_shapes)

    scoring = sub.add_parser("shapes-score", help="exact-answer accuracy of a model on fresh shapes images")
    scoring.add_argument("--model", required=True)
    scoring.add_argument("--adapter-path", default=None)
    scoring.add_argument("--count", type=int, default=200, help="images (each asked all its questions)")
    scoring.add_argument("--seed", type=int, default=1)
    scoring.add_argument(
        "--writer",
        choices=("held-out", "training"),
        default="held-out",
        help="pictures and wordings of the held-out writer (default) or fresh ones of the training writer",
    )
    scoring.add_argument("--verbose", action="store_true")
    scoring.set_defaults(handler=_score)

    init = sub.add_parser("init", help="write a randomly initialised small model to train from scratch")
    init.add_argument("--like", required=True, help="checkpoint whose architecture, tokenizer and processor to use")
    init.add_argument("--output", required=True)
    sizes = ModelSizes()
    init.add_argument("--hidden-size", type=int, default=sizes.hidden_size)
    init.add_argument("--layers", type=int, default=sizes.num_hidden_layers)
    init.add_argument("--heads", type=int, default=sizes.num_attention_heads)
    init.add_argument("--kv-heads", type=int, default=sizes.num_key_value_heads)
    init.add_argument("--intermediate-size", type=int, default=sizes.intermediate_size)
    init.add_argument("--vision-embed-dim", type=int, default=sizes.vision_embed_dim)
    init.add_argument("--vision-depth", type=int, default=sizes.vision_depth)
    init.add_argument("--vision-heads", type=int, default=sizes.vision_num_heads)
    init.add_argument(
        "--max-pixels", type=int, default=None, help="resize larger images down to about this many pixels"
    )
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--verbose", action="store_true")
    init.set_defaults(handler=_init)

    from .demo import DemoRecipe

    recipe = DemoRecipe()
    demo = sub.add_parser("demo", help="train the demo model from scratch on shapes images (the shipped default)")
    demo.add_argument("--output", default="demo_model", help="folder for the trained model")
    demo.add_argument("--work", default="demo_work", help="folder for the data, initial model and training files")
    demo.add_argument("--images", type=int, default=recipe.images, help="training images")
    demo.add_argument("--steps", type=int, default=recipe.steps)
    demo.add_argument("--seed", type=int, default=recipe.seed)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--verbose", action="store_true")
    demo.set_defaults(handler=_demo)


def register(subparsers: Any) -> None:
    """The ``vlm.commands`` entry point: adds ``vlm train``."""
    parser = subparsers.add_parser("train", help="fine-tune a model (LoRA, QLoRA, full); fuse adapters")
    _add_arguments(parser)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    _add_training_args(parser)
    _add_subcommands(parser)
    parser.set_defaults(handler=_train)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vlm-train`` script: ``vlm train`` with the same options, messages and exit codes, under its own name."""
    from vlm_models.cli import prepare_process, run_command

    prepare_process()
    return run_command(build_parser(), argv)


def build_parser() -> argparse.ArgumentParser:
    """The ``vlm-train`` script's parser: ``vlm train``'s, named as the user typed it."""
    from vlm_models.command_parser import CommandParser

    parser = CommandParser(prog="vlm-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main())
