"""The gated-delta decode step alone: the fused kernel (vlm_kernels.gated_delta) against the same step in mlx ops,
plain and under ``mx.compile`` (what mlx-vlm does on CUDA), at Qwen3.5 head shapes.

Bytes are the float32 state read and written once ((batch, value heads, key dim, value dim) x 4 B x 2); times are
medians of ``--repeats`` timings of ``--calls`` dependent steps (each reads the state the previous one wrote, as
the layers of a decode step do), evaluated together.

    python3 benchmarks/bench_gated_delta.py --batch 1 8 32
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--key-heads", type=int, default=16)
    parser.add_argument("--value-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--calls", type=int, default=24, help="steps per timing (a 4B Qwen3.5 has 24 such layers)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    import mlx.core as mx

    from vlm_kernels.dispatch import resolve
    from vlm_kernels.gated_delta import GATED_DELTA_DECODE, gated_delta_decode, gated_delta_decode_reference

    compiled_reference = mx.compile(gated_delta_decode_reference)
    fast = resolve(GATED_DELTA_DECODE)
    print(f"device {mx.default_device()} | fast backend: {fast}")
    print(f"{'batch':>5} {'variant':>18} {'us/step':>9} {'GB/s':>8} {'x ops':>6}")
    hk, hv, d = args.key_heads, args.value_heads, args.head_dim
    for batch in args.batch:
        keys = mx.random.split(mx.random.key(batch), 6)
        q = mx.random.normal((batch, hk, d), key=keys[0]).astype(mx.bfloat16)
        k = mx.random.normal((batch, hk, d), key=keys[1]).astype(mx.bfloat16)
        v = mx.random.normal((batch, hv, d), key=keys[2]).astype(mx.bfloat16)
        a = mx.random.normal((batch, hv), key=keys[3]).astype(mx.bfloat16)
        b = mx.random.normal((batch, hv), key=keys[4]).astype(mx.bfloat16)
        a_log, dt_bias = mx.zeros((hv,)), mx.ones((hv,))
        state0 = mx.random.normal((batch, hv, d, d), key=keys[5]) * 0.1
        nbytes = 2 * state0.nbytes
        operands = (q, k, v, a, b, a_log, dt_bias)
        variants = {
            "mlx ops": gated_delta_decode_reference,
            "mlx ops, compiled": compiled_reference,
            f"fused ({fast})": gated_delta_decode,
        }
        timings = {
            name: seconds_per_step(mx, step, operands, state0, args.calls, args.repeats)
            for name, step in variants.items()
        }
        base = timings["mlx ops"]
        for name, seconds in timings.items():
            print(f"{batch:>5} {name:>18} {seconds * 1e6:>9.1f} {nbytes / seconds / 1e9:>8.1f} {base / seconds:>6.2f}")
    return 0


def seconds_per_step(mx, step, operands, state0, calls: int, repeats: int) -> float:
    """Median seconds per step over ``repeats`` timings of ``calls`` chained steps, after a warm-up."""

    def run() -> None:
        state, outs = state0, []
        for _ in range(calls):
            y, state = step(*operands, state)
            outs.append(y)
        mx.eval(state, *outs)

    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


if __name__ == "__main__":
    raise SystemExit(main())
