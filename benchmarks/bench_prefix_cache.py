"""Time to first token for a long shared prefix: cold, warm from the prefix cache's memory tier, warm from its
disk tier.

Each run sends the same long system prompt (``--prefix-tokens`` tokens of it) followed by a question of its own,
so only the prefix can be reused; the time is ``stream_generate``'s call to its first event (tokenizing,
the lookup, rebuilding the caches from blocks, prefilling the rest and choosing the first token):

* cold: no prefix cache;
* cold, storing: an empty prefix cache, which keeps the prompt's blocks (the cost a first request pays);
* warm memory: the cache that holds the prefix's blocks (each run's question is new to it);
* warm disk: a new ``PrefixCache`` on the folder an earlier one wrote (nothing in memory), as after a restart.

The sides are interleaved run by run (cold, memory, disk, storing, then again), in one process; the script
prints each side's median and the ratios of the medians to cold.

    uv run --frozen python benchmarks/make_random_checkpoint.py --preset tiny --dtype float32 \
        --out /work/scratch/pc-tiny-f32
    uv run --frozen python benchmarks/bench_prefix_cache.py --model /work/scratch/pc-tiny-f32 \
        --prefix-tokens 8192 --runs 5

On the accelerator, the 2B shape:

    python benchmarks/make_random_checkpoint.py --preset 2b --dtype bfloat16 --out /tmp/qwen2vl-2b
    python benchmarks/bench_prefix_cache.py --model /tmp/qwen2vl-2b --prefix-tokens 8192 --runs 5
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = (
    "the store keeps hammers nails screws drills saws paint brushes ladders tape glue wire rope hooks bolts "
    "washers hinges locks keys shelves boxes gloves goggles masks"
).split()


def long_system_prompt(processor: Any, n_tokens: int) -> str:
    """Plain words, grown until the tokenizer counts about ``n_tokens``."""
    text, i = "", 0
    while len(processor.encode(text)) < n_tokens:
        text += " ".join(WORDS[(i + j) % len(WORDS)] for j in range(64)) + ". "
        i += 7
    return text


def first_token_seconds(model: Any, processor: Any, prompt: str, cache: Any) -> tuple[float, int]:
    from vlm_runtime import stream_generate

    start = time.perf_counter()
    stream = stream_generate(model, processor, prompt, prefix_cache=cache, max_tokens=1)
    event = next(iter(stream))
    elapsed = time.perf_counter() - start
    for _ in stream:
        pass
    return elapsed, event.cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder (make_random_checkpoint.py makes one)")
    parser.add_argument("--prefix-tokens", type=int, default=8192, help="tokens of the shared system prompt")
    parser.add_argument("--runs", type=int, default=5, help="runs per side")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--disk-dir", default=None, help="folder for the disk tier (default: a temporary one)")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time each phase of cold and warm requests (each synchronised)"
    )
    args = parser.parse_args()

    import mlx.core as mx

    from vlm_models import apply_chat_template, load
    from vlm_runtime.prefix_cache import PrefixCache, PrefixCacheSettings

    model, processor = load(args.model)
    system = long_system_prompt(processor, args.prefix_tokens)

    def prompt(question: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return apply_chat_template(processor, None, messages)

    with tempfile.TemporaryDirectory() as scratch:
        disk = Path(args.disk_dir or scratch)
        settings = PrefixCacheSettings(
            block_size=args.block_size, max_blocks=4 * args.prefix_tokens // args.block_size + 64, disk_dir=disk
        )
        memory = PrefixCache(settings, model_id=args.model)
        first_token_seconds(model, processor, prompt("Warm-up question?"), None)
        first_token_seconds(model, processor, prompt("Which aisle holds the nails?"), memory)  # fills both tiers
        memory.flush()
        n_prompt = len(processor.encode(prompt("x")))
        times: dict[str, list[float]] = {"cold": [], "cold, storing": [], "warm memory": [], "warm disk": []}
        reused: dict[str, list[int]] = {k: [] for k in times}
        for run in range(args.runs):
            question = f"Question number {run}: what does item {run * 13 % 97} cost?"
            for side in times:
                if side == "cold":
                    cache = None
                elif side == "warm memory":
                    cache = memory
                elif side == "warm disk":
                    cache = PrefixCache(settings, model_id=args.model)  # memory empty: all from disk
                else:
                    cache = PrefixCache(PrefixCacheSettings(block_size=args.block_size), model_id=args.model)
                seconds, cached = first_token_seconds(model, processor, prompt(question), cache)
                times[side].append(seconds)
                reused[side].append(cached)
                if cache is not None and cache is not memory:
                    cache.close()
        memory.close()

    device = mx.default_device()
    print(f"# {platform.node()} {platform.machine()} mlx {mx.__version__} device {device}")
    print(f"# model {args.model}; prompt ~{n_prompt} tokens, block size {args.block_size}, {args.runs} runs per side")
    cold = statistics.median(times["cold"])
    print(f"{'side':<14} {'median TTFT s':>14} {'cold / side':>12} {'reused tokens':>14}")
    for side, values in times.items():
        median = statistics.median(values)
        print(f"{side:<14} {median:>14.4f} {cold / median:>12.2f} {statistics.median(reused[side]):>14.0f}")
    if args.breakdown:
        breakdown(model, processor, prompt, args.block_size)


def breakdown(model: Any, processor: Any, prompt: Any, block_size: int) -> None:
    """Each phase of a request timed on its own (an evaluation after each): where a warm request's time goes.
    A question asked twice in a row shows what new shapes cost (kernels planned or compiled per shape)."""
    import mlx.core as mx

    from vlm_runtime import CacheSettings
    from vlm_runtime.prefill import drop_prefix, prefill
    from vlm_runtime.prefix_cache import PrefixCache, PrefixCacheSettings

    cache = PrefixCache(PrefixCacheSettings(block_size=block_size, max_blocks=1 << 16), model_id="breakdown")
    print("phase ms:      inputs   embed  lookup prefill   store  reused  question")
    for run, question in enumerate(
        [
            "Warm-up one?",
            "Warm-up one?",
            "A new question?",
            "A new question?",
            "Another, longer question than that one?",
            "Another, longer question than that one?",
        ]
    ):
        for side, store in (("cold", None), ("warm", cache)):
            marks = [time.perf_counter()]
            inputs = processor.prepare_inputs(prompt(question))
            marks.append(time.perf_counter())
            embedded = model.embed_prompt(**inputs)
            mx.eval(embedded.inputs_embeds)
            marks.append(time.perf_counter())
            ids = inputs["input_ids"][0].tolist()
            match = None
            if store is None:
                layers, reused = model.make_cache(), 0
            else:
                match = store.lookup(model, CacheSettings(), ids, inputs, embedded)
                layers, reused = match.layers, match.cached_tokens
                mx.eval([layer.state for layer in layers])
            marks.append(time.perf_counter())
            mx.eval(prefill(model, drop_prefix(embedded, reused), layers, 2048))
            marks.append(time.perf_counter())
            if match is not None:
                store.store(match, layers)
                store.release(match)
            marks.append(time.perf_counter())
            phases = " ".join(f"{1e3 * (b - a):7.1f}" for a, b in itertools.pairwise(marks))
            if run >= 2:
                print(f"{side:<13} {phases} {reused:7d}  {question}")


if __name__ == "__main__":
    main()
