"""Where a batch-1 decode step's time goes: host-side graph building, the device's work, and the floor set by
reading the weights through MLX's own matrix-vector kernels.

For the plain step (built anew each token) and the compiled one (``vlm_runtime.compiled_decode``):
  * build_ms: host time to produce the step's lazy logits (no evaluation);
  * step_ms: one step built and evaluated, synchronously (host + device, nothing overlapped);
  * pipelined_ms: per token when each step is queued before the previous one is read (what generation does).
Then every linear layer of the decoder (and the head) as a lone ``x @ W.T`` (or ``quantized_matmul``) on one
token, timed and summed: weights_ms is what reading the weights costs with MLX's kernels, GB/s their speed.

    python3 benchmarks/profile_decode.py --model /tmp/qwen2vl-2b-bf16 --context 300
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", type=int, default=300, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--variants", default="plain,compiled", help="comma-separated: plain, compiled")
    args = parser.parse_args(argv)

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from vlm_models import load
    from vlm_runtime import make_layer_caches
    from vlm_runtime.compiled_decode import compiled_decode
    from vlm_runtime.generate import prefill
    from vlm_runtime.protocols import PromptEmbedding

    model, _ = load(args.model)
    ids = mx.array([[(i * 7919) % 1000 + 10 for i in range(args.context)]])

    def fresh_cache():
        cache = make_layer_caches(model)
        prefill(model, PromptEmbedding(model.embed_tokens(ids)), cache, 2048)
        mx.eval([c.state for c in cache])
        return cache

    def plain_step(cache):
        return lambda token: model.compute_logits(
            model.hidden_states(model.embed_tokens(token[:, None]), cache=cache)[:, -1, :]
        )

    def measure(label: str, make_step) -> None:
        token = mx.array([11], mx.int32)
        step = make_step(fresh_cache())
        for _ in range(4):
            mx.eval(step(token))  # warm up (the compiled step traces here)
        builds, syncs = [], []
        for _ in range(args.steps):
            tic = time.perf_counter()
            logits = step(token)
            built = time.perf_counter()
            mx.eval(logits)
            builds.append(built - tic)
            syncs.append(time.perf_counter() - tic)
        step = make_step(fresh_cache())
        mx.eval(step(token))
        tic = time.perf_counter()
        nxt = mx.argmax(step(token), axis=-1)
        mx.async_eval(nxt)
        marks = [tic]
        for _ in range(args.steps):
            following = mx.argmax(step(nxt), axis=-1)
            mx.async_eval(following)
            nxt.item()
            marks.append(time.perf_counter())
            nxt = following
        nxt.item()
        pipelined = (time.perf_counter() - tic) / (args.steps + 1)
        # The spread of the per-token times tells a steady cost from a few stalls (a recompile, an allocation).
        gaps = sorted(b - a for a, b in itertools.pairwise(marks))
        med = statistics.median
        print(
            f"{label:9s} build_ms {1e3 * med(builds):7.3f}  step_ms {1e3 * med(syncs):7.3f}  "
            f"pipelined_ms {1e3 * pipelined:7.3f}  ({1 / pipelined:7.1f} tok/s; per token min/median/max "
            f"{1e3 * gaps[0]:.2f}/{1e3 * med(gaps):.2f}/{1e3 * gaps[-1]:.2f} ms)"
        )

    print(f"{args.model} | mlx {mx.__version__} on {mx.default_device()} | context {args.context}")
    variants = args.variants.split(",")
    if "plain" in variants:
        measure("plain", plain_step)

    def compiled(cache):
        decoder = compiled_decode(model, cache, args.context + 4 * args.steps + 16)
        if decoder is None:
            raise SystemExit("this model's caches have no static twins")
        return decoder

    if "compiled" in variants:
        measure("compiled", compiled)

    decoder_layers = [
        m
        for path, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and "language_model" in path
    ]
    embedded_dtype = model.embed_tokens(mx.array([[11]])).dtype
    total_s, total_bytes = 0.0, 0
    for layer in decoder_layers:
        width = layer.weight.shape[1] * (32 // layer.bits if isinstance(layer, nn.QuantizedLinear) else 1)
        total_s += _timed(lambda layer=layer, width=width: layer(mx.ones((1, width), embedded_dtype)))
        total_bytes += sum(v.nbytes for _, v in tree_flatten(layer.parameters()))
    embedded = model.embed_tokens(mx.array([[11]]))[0]
    try:
        head = f"{1e3 * _timed(lambda: model.compute_logits(embedded)):.3f}"
    except ValueError:  # token embeddings wider than the hidden state (Gemma 4's per-layer inputs ride along)
        head = "n/a"
    print(
        f"decoder linears alone: {len(decoder_layers)} layers, {total_bytes / 1e9:.3f} GB, weights_ms "
        f"{1e3 * total_s:.3f} ({total_bytes / total_s / 1e12:.2f} TB/s, each evaluated alone); head_ms {head}"
    )
    return 0


def _timed(run, repeats: int = 20) -> float:
    import mlx.core as mx

    mx.eval(run())
    tic = time.perf_counter()
    for _ in range(repeats):
        mx.eval(run())
    return (time.perf_counter() - tic) / repeats


if __name__ == "__main__":
    raise SystemExit(main())
