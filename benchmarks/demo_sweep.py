"""Train a few variants of the demo-model recipe at once on one accelerator within a time budget, each run
exactly as ``vlm train demo`` would with the step count that fits (measured, not guessed), and score them.

How the shipped demo model was chosen and trained (one device call on an NVIDIA H200):

    python benchmarks/demo_sweep.py --out OUT --budget 500 --variant base --variant lr3e-4:learning_rate=3e-4

Each variant is ``name:field=value,...`` over :class:`vlm_train.demo.DemoRecipe` (``sizes`` fields by name). The
data are written once (the recipe's seed and image count, as ``vlm train demo`` writes them). Every variant then
encodes them, waits for the others, times 40 training steps while all run together, and sets its step count to what
fits the budget (rounded down to 500); then it trains from a fresh initialisation with that count (the same run as
``vlm train demo --steps N``), saves the model to OUT/<name>/model and scores it (demo_score.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path


def _parse_variant(text: str) -> tuple[str, dict]:
    name, _, fields = text.partition(":")
    changes: dict = {}
    for item in filter(None, fields.split(",")):
        key, _, value = item.partition("=")
        changes[key] = float(value) if any(c in value for c in ".e") else int(value)
    return name, changes


def run_one(args: argparse.Namespace) -> None:
    import mlx.core as mx

    from vlm_models import load
    from vlm_models.convert import save_model
    from vlm_models.loading import load_config
    from vlm_train.demo import build_demo_base, demo_training_config, recipe_with, score_demo
    from vlm_train.scratch import init_model
    from vlm_train.trainer import Trainer, _schedule

    name, changes = _parse_variant(args.variant)
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.txt").open("a", buffering=1)

    def report(message: str) -> None:
        log.write(f"{time.time() - args.start:7.1f}s {message}\n")

    recipe = recipe_with(**changes)
    work = Path(args.work) / name
    base = build_demo_base(work / "base", seed=recipe.seed)
    init, n_params = init_model(base, work / "init", recipe.sizes, seed=recipe.seed)
    report(f"{name}: {n_params} parameters, recipe {recipe}")
    config = demo_training_config(recipe, init, Path(args.data), work, progress=False, workers=args.workers)
    config = replace(config, steps=1_000_000, val_every=0)
    model, processor = load(init)
    trainer = Trainer(model, processor, config, report=report)
    report(f"encoded {len(trainer.train_samples)} samples")
    (out / "ready").write_text("")
    while len(list(Path(args.out).glob("*/ready"))) < args.variants and time.time() - args.start < args.budget / 2:
        time.sleep(0.5)
    for _ in range(10):
        trainer.train_step()
    tic = time.perf_counter()
    for _ in range(30):
        trainer.train_step()
    rate = 30 / (time.perf_counter() - tic)
    left = args.budget - (time.time() - args.start) - args.reserve
    steps = max(500, int(rate * left * 0.85) // 500 * 500)
    report(f"probe: {rate:.1f} steps/s, {left:.0f} s left: {steps} steps")

    recipe = replace(recipe, steps=steps, warmup_steps=min(recipe.warmup_steps, steps // 10))
    config = demo_training_config(recipe, init, Path(args.data), work, progress=False, workers=args.workers)
    fresh, _ = load(init)
    model.update(fresh.parameters())
    trainer.config = config
    trainer.schedule = _schedule(config)
    trainer.optimizer = type(trainer.optimizer)(learning_rate=trainer.schedule, weight_decay=config.weight_decay)
    trainer.step, trainer.history, trainer.validation = 0, [], []
    mx.eval(model.parameters())
    started = time.perf_counter()
    stopped_early = False
    while trainer.step < steps:
        entry = trainer.train_step()
        if trainer.step % 500 == 0:
            report(f"step {trainer.step} loss {entry['loss']:.4f} lr {entry['learning_rate']:.2e}")
        if time.time() - args.start > args.budget - args.reserve + 20:
            stopped_early = True
            report(f"out of time at step {trainer.step}")
            break
    seconds = time.perf_counter() - started
    report(
        f"trained {trainer.step} steps in {seconds:.0f} s; validation loss {trainer.evaluate(trainer.val_samples):.4f}"
    )
    model.eval()
    folder = save_model(model, out / "model", source=init, config=load_config(init))
    if stopped_early:
        recipe = replace(recipe, steps=trainer.step)
    result = score_demo(folder, model, processor, recipe, n_params, seconds, progress=False, report=report)
    import hashlib

    tokenizer_hash = hashlib.sha256((base / "tokenizer.json").read_bytes()).hexdigest()
    (out / "result.json").write_text(
        json.dumps(
            {
                "name": name,
                "steps": trainer.step,
                "stopped_early": stopped_early,
                "rate": rate,
                "train_seconds": seconds,
                "score": result.accuracy,
                "worst_kind": result.worst_kind(),
                "by_question": result.by_question,
                "tokenizer_sha256": tokenizer_hash,
                "recipe": json.loads((folder / "demo_score.json").read_text())["recipe"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/demo_sweep")
    parser.add_argument("--budget", type=float, default=500, help="seconds from start to scored models")
    parser.add_argument("--reserve", type=float, default=70, help="seconds kept for saving and scoring")
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--workers", type=int, default=4, help="encoding processes per variant")
    parser.add_argument("--write-workers", type=int, default=14)
    parser.add_argument("--keep", default=None, help="folder for the two best models' weights, scores and the logs")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variants", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.variant = args.variant[0]
        run_one(args)
        return
    from vlm_train.demo import recipe_with
    from vlm_train.shapes import write_dataset

    start = time.time()
    variants = args.variant or ["base"]
    images = {recipe_with(**_parse_variant(v)[1]).images for v in variants}
    seed = {recipe_with(**_parse_variant(v)[1]).seed for v in variants}
    assert len(images) == 1 and len(seed) == 1, "the variants share the data: same images and seed"
    data = Path(args.work) / "data"
    write_dataset(data, count=images.pop(), val_count=50, seed=seed.pop(), workers=args.write_workers)
    print(f"{time.time() - start:.1f}s data written", flush=True)
    children = []
    for variant in variants:
        command = [
            sys.executable,
            __file__,
            "--one",
            "--out",
            args.out,
            "--work",
            args.work,
            "--data",
            str(data),
            "--budget",
            str(args.budget),
            "--reserve",
            str(args.reserve),
            "--variant",
            variant,
            "--workers",
            str(args.workers),
            "--start",
            str(start),
            "--variants",
            str(len(variants)),
        ]
        children.append(subprocess.Popen(command))
    for child in children:
        child.wait()
    print(f"{time.time() - start:.1f}s all done", flush=True)
    results = [json.loads(f.read_text()) for f in sorted(Path(args.out).glob("*/result.json"))]
    for result in results:
        print(json.dumps(result), flush=True)
    # What comes back from the device: the weights and scores of the two best (by their worst question kind);
    # the other files of a model folder are rebuilt from the recipe (the tokenizer hash checks that).
    ranked = sorted(results, key=lambda r: (r["worst_kind"], r["score"]), reverse=True)
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        for rank, result in enumerate(ranked[:2]):
            model = Path(args.out) / result["name"] / "model"
            shutil.copy(model / "model.safetensors", keep / f"rank{rank}.safetensors")
            shutil.copy(model / "demo_score.json", keep / f"rank{rank}_score.json")
            if rank == 0:
                shutil.copy(model / "tokenizer.json", keep / "tokenizer.json")
        logs = "".join(f"== {f.parent.name}\n{f.read_text()}" for f in sorted(Path(args.out).glob("*/log.txt")))
        (keep / "logs.txt").write_text(logs + "\n".join(json.dumps(r) for r in results) + "\n")


if __name__ == "__main__":
    main()
