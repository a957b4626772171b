"""The ``vlm-kernels`` command: ``bench`` times the kernels on this device, ``info`` says which backend each
kernel would use here and where each backend was verified."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def _bench(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .bench import KERNELS, Shape, device_peak_gbs, format_table, rows_json, run_bench

    unknown = sorted(set(args.kernels) - set(KERNELS))
    if unknown:
        print(f"vlm-kernels bench: unknown kernel {unknown[0]!r}; choose from {', '.join(KERNELS)}", file=sys.stderr)
        return 2
    if args.heads % args.kv_heads:
        print(
            f"vlm-kernels bench: --heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}", file=sys.stderr
        )
        return 2
    peak = args.peak_gbs if args.peak_gbs is not None else device_peak_gbs()
    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim)
    name = mx.device_info().get("device_name", "?")
    print(f"device: {mx.default_device()} ({name}), mlx {mx.__version__}, peak {peak or '?'} GB/s")
    try:
        rows = run_bench(args.kernels, args.contexts, shape, args.backend, args.repeats, args.batch_calls, peak)
    except ValueError as error:
        print(f"vlm-kernels bench: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(rows_json(rows, peak))
        print(f"wrote {args.json}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .decode_attention import AFFINE_DECODE, TURBOQUANT_DECODE
    from .dispatch import BACKEND_ENV, METAL_OPT_IN_ENV, available_backends, resolve
    from .turboquant import ENCODE

    print(
        f"available backends: {', '.join(available_backends())} ({BACKEND_ENV} forces one; {METAL_OPT_IN_ENV}=1 "
        "opts in to Metal kernels that never ran on Apple hardware)"
    )
    for kernel in (ENCODE, TURBOQUANT_DECODE, AFFINE_DECODE):
        verified = "; ".join(f"{b}: {kernel.verified_on(b)}" for b in ("reference", *kernel.fast))
        print(f"{kernel.name:<30} runs on {resolve(kernel):<10} | verified: {verified}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time the kernels against float16 SDPA on this device")
    bench.add_argument("--kernels", nargs="+", default=["turboquant-3.5", "affine-8", "affine-4"])
    bench.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--heads", type=int, default=12)
    bench.add_argument("--kv-heads", type=int, default=2)
    bench.add_argument("--head-dim", type=int, default=128)
    bench.add_argument("--backend", default=None, help="reference, cuda, metal or auto (default: auto)")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--batch-calls", type=int, default=10, help="independent calls evaluated per timing")
    bench.add_argument("--peak-gbs", type=float, default=None, help="the device's memory bandwidth, GB/s")
    bench.add_argument("--json", default=None, help="also write the rows to this JSON file")
    bench.set_defaults(run=_bench)
    info = commands.add_parser("info", help="which backend each kernel uses here, and where each was verified")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
