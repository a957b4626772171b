"""Training speed and memory: LoRA vs QLoRA vs full fine-tuning on a demo-sized Qwen2-VL.

Writes a randomly initialised model (``vlm train init``, ~3.5M parameters by default, the fixture tokenizer)
and a synthetic shapes data set into a temporary folder, then trains each mode in its own process (so peak
memory is that mode's own) and prints tokens/s (median over the timed steps, warm-up steps excluded) and peak
memory (MLX's allocator peak, model loading included).

    uv run python benchmarks/bench_train.py --steps 20 --warmup 3 --batch-size 8
    uv run python benchmarks/bench_train.py --model packages/vlm-models/src/vlm_models/demo_model --image-size 56 \
        --batch-size 16                                     # the shipped demo model
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "qwen2_vl" / "hf4"
MODES = ("lora", "qlora", "full")


def run_mode(args: argparse.Namespace) -> None:
    from vlm_kernels.cpu_blas import route_cpu_blas

    routing = route_cpu_blas()  # as the `vlm` commands do; VLM_CPU_BLAS=0 measures MLX's own BLAS
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vlm_models import load
    from vlm_train.config import LoRAConfig, QuantizationConfig, TrainingConfig
    from vlm_train.trainer import Trainer

    config = TrainingConfig(
        model=args.model,
        train_data=args.data,
        output=str(Path(args.workdir) / f"out-{args.mode}"),
        fine_tune_type=args.mode,
        lora=LoRAConfig(rank=args.rank),
        quantization=QuantizationConfig(bits=4, group_size=64),
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        learning_rate=1e-3 if args.mode == "full" else 1e-2,
        grad_checkpoint=args.grad_checkpoint,
        progress=False,
    )
    mx.reset_peak_memory()
    model, processor = load(args.model)
    trainer = Trainer(model, processor, config, report=lambda message: None)
    timed = [trainer.train_step() for _ in range(config.steps)][args.warmup :]
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    print(
        json.dumps(
            {
                "mode": args.mode,
                "tokens_per_s": statistics.median(h["tokens_per_s"] for h in timed),
                "peak_memory_mb": mx.get_peak_memory() / 1e6,
                "trainable_params": trainable,
                "first_loss": timed[0]["loss"],
                "last_loss": timed[-1]["loss"],
                "blas": "numpy's OpenBLAS (shim)" if routing.routed else f"MLX's own ({routing.reason})",
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=100, help="shapes images in the data set")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of lora,qlora,full")
    parser.add_argument("--model", default=None, help="train this checkpoint instead of a fresh demo-sized one")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        run_mode(args)
        return

    from vlm_train.scratch import init_model
    from vlm_train.shapes import write_dataset

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model, n_params = init_model(str(FIXTURE), Path(tmp) / "model")
            print(f"model: fresh Qwen2-VL, {n_params / 1e6:.2f}M parameters (vlm train init defaults)")
        write_dataset(Path(tmp) / "data", count=args.images, val_count=0, size=args.image_size)
        print(
            f"data: {args.images} shapes images of {args.image_size}px | batch {args.batch_size} | "
            f"{args.steps} timed steps after {args.warmup} warm-up | grad checkpoint {args.grad_checkpoint}"
        )
        print(f"{'mode':<6} {'tokens/s':>9} {'peak MB':>8} {'trainable':>10} {'loss first->last':>18}")
        for mode in args.modes.split(","):
            command = [
                sys.executable,
                __file__,
                "--mode",
                mode,
                "--model",
                str(model),
                "--data",
                str(Path(tmp) / "data"),
                "--workdir",
                tmp,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--batch-size",
                str(args.batch_size),
                "--rank",
                str(args.rank),
            ] + (["--grad-checkpoint"] if args.grad_checkpoint else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{mode}: failed\n{done.stderr}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{mode:<6} {row['tokens_per_s']:>9.0f} {row['peak_memory_mb']:>8.1f} {row['trainable_params']:>10,d} "
                f"{row['first_loss']:>8.3f} -> {row['last_loss']:.3f}   BLAS: {row['blas']}"
            )


if __name__ == "__main__":
    main()
