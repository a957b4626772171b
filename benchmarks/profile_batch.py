"""Where a batched decode step's time goes: the model alone vs the engine's step, and admission per request.

python3 benchmarks/profile_batch.py --model /tmp/qwen2vl-2b-bf16 --sizes 1 8 32
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import mlx.core as mx


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()

    from vlm_models import apply_chat_template, load
    from vlm_runtime import BatchGenerator, GenerationConfig, Request
    from vlm_runtime.batch_cache import BatchKVCache

    model, processor = load(args.model)
    layers = model.config.text.num_hidden_layers
    prompts = [
        apply_chat_template(processor, None, f"Question {i}: a story about {i * 7}.") for i in range(max(args.sizes))
    ]
    for batch in args.sizes:
        for padded in (False, True):
            cache = [BatchKVCache([b % 4 if padded else 0 for b in range(batch)]) for _ in range(layers)]
            model.hidden_states(model.embed_tokens(mx.zeros((batch, 40), mx.int32)), cache=cache)
            mx.eval([c.state for c in cache])
            token = mx.zeros((batch,), mx.int32)
            for timed in (False, True):
                start = time.perf_counter()
                build = 0.0
                for _ in range(args.steps):
                    tic = time.perf_counter()
                    hidden = model.hidden_states(model.embed_tokens(token[:, None]), cache=cache)
                    token = mx.argmax(model.compute_logits(hidden[:, -1, :]), axis=-1)
                    build += time.perf_counter() - tic
                    token.tolist()
                if timed:
                    total = (time.perf_counter() - start) / args.steps * 1e3
                    print(
                        f"model B={batch:<3} padded={padded!s:<5} {total:7.2f} ms/step (graph build {build / args.steps * 1e3:.2f})"
                    )
        engine = BatchGenerator(model, processor, max_batch_size=batch)
        config = GenerationConfig(max_tokens=args.steps + 1, ignore_eos=True)
        for prompt in prompts[:batch]:
            engine.submit(Request(processor.prepare_inputs(prompt), config=config))
        tic = time.perf_counter()
        engine.step()
        admit = (time.perf_counter() - tic) / batch * 1e3
        tic, steps, times = time.perf_counter(), 0, []
        profiler = cProfile.Profile() if batch == max(args.sizes) else None
        if profiler:
            profiler.enable()
        while engine.has_work():
            t0 = time.perf_counter()
            engine.step()
            times.append((time.perf_counter() - t0) * 1e3)
            steps += 1
        if profiler:
            profiler.disable()
        print(
            f"engine B={batch:<3} admission {admit:7.2f} ms/request, decode {(time.perf_counter() - tic) / steps * 1e3:7.2f} ms/step"
        )
        print(
            "  step ms: first 3", [round(t, 1) for t in times[:3]], "median", round(sorted(times)[len(times) // 2], 2)
        )
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
