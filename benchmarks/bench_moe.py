"""Time one sparse MoE layer (vlm_models.nn.moe.SparseMoE) against its number of experts, at decode (1 token) and
prefill (many tokens), with the top-k fixed: the work should follow the chosen experts, not the experts there are.

    uv run python benchmarks/bench_moe.py [--hidden 1024] [--inter 384] [--top-k 8] [--experts 8 32 128]

Prints the median of ``--repeats`` timed calls (after warm-up) per configuration, in milliseconds.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from vlm_models.nn.moe import MoEConfig, SparseMoE


def median_ms(layer: SparseMoE, x: mx.array, repeats: int) -> float:
    for _ in range(3):
        mx.eval(layer(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(layer(x))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=384)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    print(
        f"device {mx.default_device()}, hidden {args.hidden}, expert width {args.inter}, top-{args.top_k}, {args.dtype}"
    )
    print(f"{'experts':>8} " + " ".join(f"{f'{t} tok (ms)':>14}" for t in args.tokens))
    for experts in args.experts:
        config = MoEConfig(num_experts=experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.inter)
        layer = SparseMoE(args.hidden, config)
        layer.set_dtype(dtype)
        mx.eval(layer.parameters())
        row = [median_ms(layer, mx.random.normal((1, t, args.hidden)).astype(dtype), args.repeats) for t in args.tokens]
        print(f"{experts:>8} " + " ".join(f"{ms:>14.3f}" for ms in row))


if __name__ == "__main__":
    main()
