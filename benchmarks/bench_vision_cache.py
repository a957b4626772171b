"""Second turn on the same image: prompt tok/s with and without a VisionFeatureCache.

A chat's second turn re-sends the whole conversation, image included. Without the cache the vision tower runs
again; with it (warmed by the first turn) the image's features come from the cache. Runs are interleaved (with,
without, without, with, ...: the order flips every pair so neither side always goes first), in one process, and
the script prints each side's median prompt tok/s, the ratio of the medians and the median of the per-pair
ratios. Prompt tok/s is ``GenerationResult.prompt_tps`` of ``vlm_runtime.stream_generate(..., max_tokens=1)``:
prompt tokens / (start -> first token), which includes the vision tower (and, with the cache, the hashing);
image loading and preprocessing happen before the clock starts, alike on both sides. Where
``stream_generate`` has no ``vision_cache`` keyword yet, the script times ``prefill`` over
``model.embed_prompt(**inputs, vision_cache=...)`` itself, with the same definition.

    uv run --frozen python benchmarks/make_random_checkpoint.py --preset tiny --dtype float32 \
        --out /work/scratch/vc-tiny-f32
    uv run --frozen python benchmarks/bench_vision_cache.py --model /work/scratch/vc-tiny-f32 \
        --image benchmarks/bench_448.png --pairs 20

The tiny preset's layers are a few dozen wide, so its times say little about a real model. The speed-up depends
on the vision/text balance, which needs the real layer shapes: the 2b preset's, with the depths cut (a slow CPU
cannot run all 32 + 28 layers; the real ratio is 32 vision blocks : 28 decoder layers, so 2 : 2 slightly
understates the tower's share):

    uv run --frozen python benchmarks/make_random_checkpoint.py --preset 2b --dtype float32 \
        --vision-depth 2 --text-layers 2 --out /work/scratch/vc-2b-d2-f32
    uv run --frozen python benchmarks/bench_vision_cache.py --model /work/scratch/vc-2b-d2-f32 \
        --image benchmarks/bench_448.png --pairs 3 --warmup 1
"""

from __future__ import annotations

import argparse
import inspect
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

FIRST_QUESTION = "Describe this image."
FIRST_ANSWER = (
    "The image shows a smooth colour gradient with a few simple geometric shapes drawn on top of it: a circle, "
    "a rectangle and a diagonal line, in contrasting colours."
)
FOLLOW_UP = (
    "Thanks. Now go through the picture again in much more detail. For every shape, say where it sits in the "
    "frame, roughly how large it is compared with the whole image, what colour it is, and how it overlaps or "
    "touches the other shapes. Then describe the gradient behind them: which corner is the darkest, which is the "
    "brightest, and whether the change in colour looks linear or curved. Finally, suggest three short captions "
    "that someone could use for this image in a presentation about computer vision test patterns, and explain in "
    "one sentence each why the caption fits."
)


def conversations() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The first turn, and the second turn (the whole conversation, image included, plus a longer question)."""
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FIRST_QUESTION}]}]
    second = [
        *first,
        {"role": "assistant", "content": [{"type": "text", "text": FIRST_ANSWER}]},
        {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]},
    ]
    return first, second


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--image", default="benchmarks/bench_448.png")
    parser.add_argument("--pairs", type=int, default=10, help="measured (with, without) pairs")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured pairs first")
    parser.add_argument(
        "--timer",
        choices=["auto", "stream_generate", "prefill"],
        default="auto",
        help="auto: stream_generate where it takes vision_cache, else the manual prefill timing",
    )
    parser.add_argument("--prefill-step", type=int, default=2048, help="chunk size of the manual prefill timing")
    args = parser.parse_args(argv)

    import mlx.core as mx

    from vlm_models import apply_chat_template, load
    from vlm_runtime import stream_generate
    from vlm_runtime.vision_cache import VisionFeatureCache

    model, processor = load(args.model)
    first_turn, second_turn = (apply_chat_template(processor, None, c) for c in conversations())
    second_inputs = processor.prepare_inputs(second_turn, [args.image])
    prompt_tokens = int(second_inputs["input_ids"].size)
    image_tokens = int((second_inputs["input_ids"] == model.config.image_token_id).sum().item())

    stream_takes_cache = "vision_cache" in inspect.signature(stream_generate).parameters
    if args.timer == "stream_generate" and not stream_takes_cache:
        parser.error("this vlm_runtime's stream_generate has no vision_cache keyword")
    through_stream = args.timer == "stream_generate" or (args.timer == "auto" and stream_takes_cache)
    if through_stream:

        def prompt_tps(cache: VisionFeatureCache | None) -> tuple[float, int]:
            """(prompt tok/s, first token) of one second-turn request."""
            last = None
            for last in stream_generate(  # noqa: B007
                model, processor, second_turn, image=args.image, max_tokens=1, vision_cache=cache
            ):
                pass
            assert last is not None and last.token is not None
            return last.prompt_tps, last.token

    else:
        from vlm_runtime.generate import prefill

        def prompt_tps(cache: VisionFeatureCache | None) -> tuple[float, int]:
            inputs = processor.prepare_inputs(second_turn, [args.image])
            started = time.perf_counter()
            extra = {} if cache is None else {"vision_cache": cache}
            logits = prefill(model, model.embed_prompt(**inputs, **extra), model.make_cache(), args.prefill_step)
            token = int(mx.argmax(logits, axis=-1).item())  # .item() waits for the whole prefill
            return prompt_tokens / (time.perf_counter() - started), token

    cache = VisionFeatureCache()
    # The first turn fills the cache, as in a chat.
    first_inputs = processor.prepare_inputs(first_turn, [args.image])
    mx.eval(model.embed_prompt(**first_inputs, vision_cache=cache).inputs_embeds)
    assert (cache.misses, len(cache)) == (1, 1), cache

    sides: dict[str, Callable[[], tuple[float, int]]] = {
        "with cache": lambda: prompt_tps(cache),
        "without cache": lambda: prompt_tps(None),
    }
    results: dict[str, list[float]] = {name: [] for name in sides}
    ratios: list[float] = []
    first_tokens: set[int] = set()
    for pair in range(args.warmup + args.pairs):
        order = list(sides) if pair % 2 == 0 else list(reversed(sides))
        measured = {}
        for name in order:
            measured[name], token = sides[name]()
            first_tokens.add(token)
        if pair >= args.warmup:
            for name, tps in measured.items():
                results[name].append(tps)
            ratios.append(measured["with cache"] / measured["without cache"])
            print(
                f"pair {pair - args.warmup + 1:>3}: with {measured['with cache']:10.1f} tok/s   "
                f"without {measured['without cache']:10.1f} tok/s   ratio {ratios[-1]:.2f}",
                flush=True,
            )

    # Every with-cache run must have been a hit, and both sides must compute the same thing.
    with_runs = args.warmup + args.pairs
    assert (cache.hits, cache.misses) == (with_runs, 1), cache
    assert len(first_tokens) == 1, f"with and without the cache disagree on the first token: {first_tokens}"

    with_median = statistics.median(results["with cache"])
    without_median = statistics.median(results["without cache"])
    print()
    print(
        f"model: {args.model} ({model.config.vision.depth} vision blocks, {model.config.text.num_hidden_layers} "
        f"decoder layers), image: {args.image}"
    )
    print(f"second turn: {prompt_tokens} prompt tokens ({image_tokens} image tokens)")
    print(f"timed through: {'stream_generate(..., vision_cache=)' if through_stream else 'prefill (fallback)'}")
    print(f"host: {platform.machine()} {platform.system()}, mlx {mx.__version__}, device {mx.default_device()}")
    print(f"pairs: {args.pairs} measured after {args.warmup} warm-up")
    print(f"median prompt tok/s  with cache:    {with_median:.1f}")
    print(f"median prompt tok/s  without cache: {without_median:.1f}")
    print(f"ratio of medians (with / without):  {with_median / without_median:.2f}x")
    print(f"median per-pair ratio:              {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
