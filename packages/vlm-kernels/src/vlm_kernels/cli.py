"""The ``vlm-kernels`` command: ``bench`` times the kernels on this device, ``info`` says which backend each
kernel would use here and where each backend was verified."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """The usage rules of every vlm command (``vlm_models.command_parser.CommandParser``, which this package may
    not import): a usage error is one line naming the subcommand, exit code 2; only whole option names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:  # a subcommand's unknown arguments are its own error, not the top-level parser's
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _bench(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .bench import KERNELS, Shape, device_peak_gbs, format_table, rows_json, run_bench

    known = (*KERNELS, *MATVEC_KERNELS)
    unknown = sorted(set(args.kernels) - set(known))
    if unknown:
        print(f"vlm-kernels bench: unknown kernel {unknown[0]!r}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    matvec = [k for k in args.kernels if k in MATVEC_KERNELS]
    if matvec:
        return _bench_matvec(args, matvec)
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


MATVEC_KERNELS = ("matvec-4", "matvec-8", "matvec-bf16")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _shape(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not KxN (input x output widths), e.g. 1536x8960") from None
    return k, n


def _bench_matvec(args: argparse.Namespace, kernels: list[str]) -> int:
    import json
    from dataclasses import asdict

    import mlx.core as mx

    from .bench import device_peak_gbs
    from .bench_matvec import DECODE_SHAPES, MATVEC_HEADER, format_matvec_row, run_matvec_bench

    if any(k not in MATVEC_KERNELS for k in args.kernels):
        print("vlm-kernels bench: time matvec kernels and attention kernels in separate runs", file=sys.stderr)
        return 2
    peak = args.peak_gbs if args.peak_gbs is not None else device_peak_gbs()
    name = mx.device_info().get("device_name", "?")
    print(f"device: {mx.default_device()} ({name}), mlx {mx.__version__}, peak {peak or '?'} GB/s")
    shapes = args.shapes or list(DECODE_SHAPES)
    print(MATVEC_HEADER, flush=True)
    try:
        rows = run_matvec_bench(
            kernels,
            shapes,
            args.rows,
            args.group_size,
            args.backend,
            args.repeats,
            args.batch_calls,
            peak,
            progress=lambda row: print(format_matvec_row(row, peak), flush=True),
        )
    except ValueError as error:
        print(f"vlm-kernels bench: {error}", file=sys.stderr)
        return 2
    if args.json:
        device = {"device": str(mx.default_device()), "mlx": mx.__version__, **mx.device_info(), "peak_gbs": peak}
        Path(args.json).write_text(
            json.dumps({"device": device, "rows": [asdict(r) for r in rows]}, indent=2, default=str)
        )
        print(f"wrote {args.json}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .decode_attention import AFFINE_DECODE, TURBOQUANT_DECODE
    from .dispatch import BACKEND_ENV, METAL_OPT_IN_ENV, available_backends, resolve
    from .quantized_matvec import DENSE_MATVEC, QUANTIZED_MATVEC
    from .turboquant import ENCODE

    print(
        f"available backends: {', '.join(available_backends())} ({BACKEND_ENV} forces one; {METAL_OPT_IN_ENV}=1 "
        "opts in to Metal kernels that never ran on Apple hardware)"
    )
    for kernel in (ENCODE, TURBOQUANT_DECODE, AFFINE_DECODE, QUANTIZED_MATVEC, DENSE_MATVEC):
        verified = "; ".join(f"{b}: {kernel.verified_on(b)}" for b in ("reference", *kernel.fast))
        print(f"{kernel.name:<30} runs on {resolve(kernel):<10} | verified: {verified}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vlm-kernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time the kernels against float16 SDPA on this device")
    bench.add_argument(
        "--kernels",
        nargs="+",
        default=["turboquant-3.5", "affine-8", "affine-4"],
        help="decode attention: turboquant-*, affine-*; skinny products: matvec-4, matvec-8, matvec-bf16",
    )
    bench.add_argument("--contexts", type=_positive_int, nargs="+", default=[8192, 32768, 131072])
    bench.add_argument("--batch", type=_positive_int, default=1)
    bench.add_argument("--heads", type=_positive_int, default=12)
    bench.add_argument("--kv-heads", type=_positive_int, default=2)
    bench.add_argument("--head-dim", type=_positive_int, default=128)
    bench.add_argument("--rows", type=_positive_int, nargs="+", default=[1, 4, 8, 16, 32], help="matvec: rows of x")
    bench.add_argument("--shapes", type=_shape, nargs="+", default=None, help="matvec: KxN widths (default: 2B decode)")
    bench.add_argument("--group-size", type=_positive_int, default=64, help="matvec: quantization group size")
    bench.add_argument("--backend", default=None, help="reference, cuda, metal or auto (default: auto)")
    bench.add_argument("--repeats", type=_positive_int, default=20)
    bench.add_argument("--batch-calls", type=_positive_int, default=10, help="independent calls evaluated per timing")
    bench.add_argument("--peak-gbs", type=float, default=None, help="the device's memory bandwidth, GB/s")
    bench.add_argument("--json", default=None, help="also write the rows to this JSON file")
    bench.set_defaults(run=_bench)
    info = commands.add_parser("info", help="which backend each kernel uses here, and where each was verified")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
