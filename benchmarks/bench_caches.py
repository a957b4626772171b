"""KV cache types compared: memory at long context, and decode speed on a small random Qwen2-VL.

    uv run --frozen python benchmarks/bench_caches.py
    uv run --frozen python benchmarks/bench_caches.py --contexts 4096 16384 --prompt 512 --tokens 64 --rounds 5
    python benchmarks/bench_caches.py --model /tmp/qwen2vl-2b --prompt 4096 --tokens 128 --decode-window 1024
    # the 2B decoder's shape with random weights, no checkpoint (hidden 1536, 28 layers, 12/2 heads, bf16):
    python3 benchmarks/bench_caches.py --hidden 1536 --layers 28 --kv-heads 2 --mlp 8960 --vocab 151936 \
        --dtype bfloat16 --prompt 8192 --batch 1 --tokens 64

(a) Memory: caches for a Qwen2-VL-2B-like decoder (28 layers, 2 kv heads, head_dim 128, bfloat16) filled with
random keys/values to each context length; ``nbytes`` summed over layers. No model is needed.

(b) Decode tokens/s: a random-weight Qwen2-VL built from the test fixture's config with a wider decoder (head_dim
128, so 4- and 8-bit groups of 64 fit), float32 unless ``--dtype`` says otherwise; ``--batch`` rows decode together
(one cache per layer holding all rows). Each round prefills the same prompt, then times greedy decoding
of ``--tokens`` tokens, for every cache type in turn (interleaved, so drifting host speed hits all alike);
the table shows the median over rounds. Caches come from ``model.make_cache()`` through ``make_layer_caches``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from vlm_runtime.cache import KVCache, QuantizedKVCache, RotatingKVCache, cache_nbytes
from vlm_runtime.cache_settings import CacheSettings, make_layer_caches
from vlm_runtime.turboquant_cache import TurboQuantKVCache

REPO = Path(__file__).resolve().parent.parent
FIXTURE_CONFIG = REPO / "tests" / "fixtures" / "qwen2_vl" / "hf4" / "config.json"

# Qwen2-VL-2B's decoder: what one sequence's cache costs.
LAYERS, KV_HEADS, HEAD_DIM = 28, 2, 128


def memory_table(contexts: list[int], window: int) -> list[tuple[str, list[int]]]:
    kinds: dict[str, Any] = {
        "KVCache (bf16)": KVCache,
        "QuantizedKVCache 8-bit g64": lambda: QuantizedKVCache(8, 64),
        "QuantizedKVCache 4-bit g64": lambda: QuantizedKVCache(4, 64),
        "TurboQuantKVCache 3.5 (K3 V4)": lambda: TurboQuantKVCache(3, 4),
        "TurboQuantKVCache 2.5 (K2 V3)": lambda: TurboQuantKVCache(2, 3),
        f"RotatingKVCache {window}": lambda: RotatingKVCache(window),
    }
    rows = []
    for name, make in kinds.items():
        sizes = []
        for context in contexts:
            keys = mx.random.normal((1, KV_HEADS, context, HEAD_DIM)).astype(mx.bfloat16)
            cache = [make() for _ in range(LAYERS)]
            for layer in cache:
                for start in range(0, context, 2048):  # prefill-sized chunks, as generation fills them
                    chunk = keys[:, :, start : start + 2048]
                    layer.update_and_fetch(chunk, chunk)
                mx.eval([layer.state for layer in cache])
            sizes.append(cache_nbytes(cache))
            del cache
        rows.append((name, sizes))
    return rows


def bench_model(hidden: int, layers: int, kv_heads: int | None, mlp: int | None, vocab: int, dtype: mx.Dtype) -> Any:
    from vlm_models.models.qwen2_vl import Model

    config = json.loads(FIXTURE_CONFIG.read_text())
    heads = hidden // HEAD_DIM
    config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        intermediate_size=mlp or 4 * hidden,
        vocab_size=vocab,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},  # halves of head_dim 128
    )
    model = Model.from_hf_config(config)
    if dtype != mx.float32:
        model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def decode_rate(model: Any, settings: CacheSettings, prompt: mx.array, tokens: int) -> float:
    cache = make_layer_caches(model, settings)
    hidden = model.hidden_states(model.embed_tokens(prompt), cache=cache)
    token = mx.argmax(model.compute_logits(hidden[:, -1, :]), axis=-1)
    mx.eval(token)
    start = time.perf_counter()
    for _ in range(tokens):
        hidden = model.hidden_states(model.embed_tokens(token[:, None]), cache=cache)
        token = mx.argmax(model.compute_logits(hidden[:, -1, :]), axis=-1)
        mx.async_eval(token)
    mx.eval(token)
    return tokens * prompt.shape[0] / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--window", type=int, default=4096, help="RotatingKVCache size in the memory table")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: half the heads")
    parser.add_argument("--mlp", type=int, default=None, help="MLP width (default 4x hidden)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--vocab", type=int, default=4096, help="vocabulary (Qwen2-VL-2B: 151936)")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--decode-window", type=int, default=256, help="max_kv_size for the decode run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default=None, help="a checkpoint to decode with instead of the random model")
    args = parser.parse_args(argv)

    print(f"device: {mx.default_device()}, mlx {mx.__version__}")
    print(f"\n(a) KV cache memory, {LAYERS} layers x {KV_HEADS} kv heads x head_dim {HEAD_DIM}, bfloat16")
    header = "".join(f"{c:>14,}" for c in args.contexts)
    print(f"{'cache':<30}{header}   (tokens; MiB below)")
    rows = memory_table(args.contexts, args.window)
    base = rows[0][1]
    for name, sizes in rows:
        cells = "".join(f"{s / 2**20:>9.1f} ({s / b:4.2f})" for s, b in zip(sizes, base))
        print(f"{name:<30}{cells}")

    if args.model:
        from vlm_models import load

        model, _ = load(args.model)
        dtype = model.model.language_model.embed_tokens.weight.dtype
    else:
        dtype = getattr(mx, args.dtype)
        model = bench_model(args.hidden, args.layers, args.kv_heads, args.mlp, args.vocab, dtype)
    kinds = {
        "KVCache": CacheSettings(),
        f"RotatingKVCache {args.decode_window}": CacheSettings(max_kv_size=args.decode_window),
        "QuantizedKVCache 8-bit g64": CacheSettings(kv_bits=8),
        "QuantizedKVCache 4-bit g64": CacheSettings(kv_bits=4),
        "TurboQuantKVCache 3.5 (K3 V4)": CacheSettings(kv_bits=3.5, kv_quant_scheme="turboquant"),
    }
    vocab = model.config.text.vocab_size
    prompt = mx.random.randint(0, vocab, (args.batch, args.prompt))
    for settings in kinds.values():  # warm-up: first-call costs out of the timings
        decode_rate(model, settings, prompt, 4)
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.rounds):
        for name, settings in kinds.items():
            rates[name].append(decode_rate(model, settings, prompt, args.tokens))
    text = model.config.text
    print(
        f"\n(b) decode, {args.model or 'random Qwen2-VL'} decoder: hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
        f"{text.num_attention_heads} heads / {text.num_key_value_heads} kv heads x {text.attention_head_dim}, "
        f"{dtype}; batch {args.batch}, prompt {args.prompt} tokens, {args.tokens} decoded, median of {args.rounds} "
        "interleaved rounds (tok/s counts every row)"
    )
    print(f"{'cache':<30}{'tok/s':>10}{'min':>10}{'max':>10}")
    for name, values in rates.items():
        print(f"{name:<30}{statistics.median(values):>10.1f}{min(values):>10.1f}{max(values):>10.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
