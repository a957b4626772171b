"""Aggregate throughput of the batching engine at several batch sizes, optionally side by side with mlx-vlm.

N different text prompts are submitted to one ``BatchGenerator`` at once; each generates ``--tokens`` tokens
(EOS ignored). Reported per N: aggregate generated tokens/s over the whole call (prefill included: the
definition of ``shared/BASELINES.md``) and over the decode phase alone (after every request has joined), and
the speed-up over N = 1.

With ``--peer`` the same prompts go through ``mlx_vlm.batch_generate`` in the same process, alternating with
ours round by round; its figure is its generated tokens / wall time of the call (mlx-vlm cannot ignore EOS, so
its token count is what it really produced; with random weights EOS is about 1 in 150k per token).

    uv run --frozen python benchmarks/bench_batch.py --model /work/scratch/qwen2vl-tiny-f32 --sizes 1 4 16 32
    python3 benchmarks/bench_batch.py --model /tmp/qwen2vl-2b-bf16 --sizes 1 8 32 --peer   # a GPU host
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import mlx.core as mx


def ours(model: Any, processor: Any, prompts: list[str], tokens: int) -> tuple[float, float]:
    from vlm_runtime import BatchGenerator, GenerationConfig, Request

    start = time.perf_counter()
    engine = BatchGenerator(model, processor, max_batch_size=len(prompts))
    config = GenerationConfig(max_tokens=tokens, ignore_eos=True)
    for prompt in prompts:
        engine.submit(Request(processor.prepare_inputs(prompt), config=config))
    generated = len(engine.step())  # every request joins (prefill + first token)
    decoded, joined = 0, time.perf_counter()
    while engine.has_work():
        decoded += len(engine.step())
    end = time.perf_counter()
    return (generated + decoded) / (end - start), decoded / (end - joined)


def peer(model: Any, processor: Any, prompts: list[str], tokens: int) -> float:
    from mlx_vlm import batch_generate

    start = time.perf_counter()
    response = batch_generate(model, processor, prompts=prompts, max_tokens=tokens)
    return response.stats.generation_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--peer", action="store_true", help="also run mlx_vlm.batch_generate, alternating")
    args = parser.parse_args()

    from vlm_models import apply_chat_template, load

    model, processor = load(args.model)
    questions = [f"Question {i}: tell me a story about the number {i * 7}." for i in range(max(args.sizes))]
    prompts = [apply_chat_template(processor, None, q) for q in questions]
    ours(model, processor, prompts[:2], 8)  # warm-up
    if args.peer:
        import mlx_vlm
        from bench_mlx_vlm import pad_detokenizer  # random weights pick padding ids past the vocabulary

        peer_model, peer_processor = mlx_vlm.load(args.model)
        pad_detokenizer(peer_processor, peer_model)
        peer(peer_model, peer_processor, prompts[:2], 8)
    print(f"device: {mx.default_device()} | model: {args.model} | {args.tokens} tokens per request")
    head = f"{'requests':>8} {'ours tok/s':>11} {'(decode)':>9} {'vs 1':>6}"
    print(head + (f" {'mlx-vlm tok/s':>14} {'ours/peer':>10}" if args.peer else ""))
    base = None
    for n in args.sizes:
        totals, decodes, peers = [], [], []
        for _ in range(args.rounds):
            total, decode = ours(model, processor, prompts[:n], args.tokens)
            totals.append(total)
            decodes.append(decode)
            if args.peer:
                peers.append(peer(peer_model, peer_processor, prompts[:n], args.tokens))
        rate = statistics.median(totals)
        base = base or rate
        line = f"{n:>8} {rate:>11.1f} {statistics.median(decodes):>9.1f} {rate / base:>5.2f}x"
        if peers:
            other = statistics.median(peers)
            line += f" {other:>14.1f} {rate / other:>9.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
