"""Aggregate decode throughput of the batching engine at several batch sizes.

N different text prompts are submitted to one ``BatchGenerator`` at once; each generates ``--tokens`` tokens
(EOS ignored). Reported per N: aggregate generated tokens/s over the decode phase (after every request has
joined) and the speed-up over N = 1.

    uv run --frozen python benchmarks/bench_batch.py --model /work/scratch/qwen2vl-tiny-f32 --sizes 1 4 16 32
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx


def run(model, processor, prompts: list[str], tokens: int) -> float:
    from vlm_runtime import BatchGenerator, GenerationConfig

    engine = BatchGenerator(model, processor, max_batch_size=len(prompts))
    config = GenerationConfig(max_tokens=tokens, ignore_eos=True)
    for prompt in prompts:
        engine.submit(processor.prepare_inputs(prompt), config=config)
    engine.step()  # every request joins (prefill + first token)
    generated, start = 0, time.perf_counter()
    while engine.has_work():
        generated += len(engine.step())
    return generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from vlm_models import apply_chat_template, load

    model, processor = load(args.model)
    questions = [f"Question {i}: tell me a story about the number {i * 7}." for i in range(max(args.sizes))]
    prompts = [apply_chat_template(processor, None, q) for q in questions]
    run(model, processor, prompts[:2], 8)  # warm-up
    print(f"device: {mx.default_device()} | model: {args.model} | {args.tokens} tokens per request")
    print(f"{'requests':>8} {'aggregate tok/s':>16} {'vs 1':>6}")
    base = None
    for n in args.sizes:
        rate = max(run(model, processor, prompts[:n], args.tokens) for _ in range(args.rounds))
        base = base or rate
        print(f"{n:>8} {rate:>16.1f} {rate / base:>5.2f}x")


if __name__ == "__main__":
    main()
