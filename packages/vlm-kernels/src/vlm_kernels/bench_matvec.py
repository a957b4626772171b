"""``vlm-kernels bench --kernels matvec-4 matvec-8 matvec-bf16``: the skinny products of ``quantized_matvec`` timed
next to MLX's own (``mx.quantized_matmul``; ``x @ W.T`` for bfloat16), on decode shapes of a 2B model.

Bytes are what a product must read (packed weight, scales, biases, activations) and write; effective bandwidth is
bytes / time. Each timing cycles through enough copies of the weight to overflow the GPU's L2 cache (an H200 has
50 MB), so every call reads its weight from memory as a decode step does; calls are queued back to back, launch cost
included. Medians over ``repeats`` timings of ``batch_calls`` calls.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .dispatch import resolve
from .quantized_matvec import DENSE_MATVEC, QUANTIZED_MATVEC, dense_matvec, quantized_matvec

__all__ = [
    "DECODE_SHAPES",
    "MATVEC_HEADER",
    "MatvecRow",
    "format_matvec_row",
    "format_matvec_table",
    "run_matvec_bench",
]

DECODE_SHAPES = ((1536, 8960), (8960, 1536), (1536, 1536), (1536, 256), (1536, 151936))
"""(in, out) widths of a Qwen2-VL-2B decoder: gate/up, down, q/o, k/v, the vocabulary head."""
_FLUSH_BYTES = 256e6  # weight copies per timing: past L2
_MAX_COPIES = 256  # 256 copies of the smallest decode weight (k/v, 0.2 MB at 4 bits) still overflow 50 MB


@dataclass(frozen=True)
class MatvecRow:
    kernel: str
    backend: str
    rows: int
    in_features: int
    out_features: int
    bytes_moved: int
    time_us: float
    gbs: float
    peak_pct: float | None
    mlx_us: float
    mlx_gbs: float
    speedup: float


def _timed(calls: list[Callable[[], mx.array]], repeats: int, batch_calls: int) -> float:
    """Median seconds per call, cycling through ``calls`` (one per weight copy)."""
    n = max(batch_calls, len(calls))
    for _ in range(2):
        mx.eval([calls[i % len(calls)]() for i in range(n)])
    samples = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval([calls[i % len(calls)]() for i in range(n)])
        mx.synchronize()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def _copies(nbytes: int) -> int:
    return max(1, min(_MAX_COPIES, math.ceil(_FLUSH_BYTES / nbytes)))


def _case(kind: str, rows: int, in_features: int, out_features: int, group_size: int, backend: str | None):
    """(ours, MLX's) call lists over fresh weight copies, and the bytes one call moves."""
    x = mx.random.normal((rows, in_features)).astype(mx.bfloat16)
    weight = (mx.random.normal((out_features, in_features)) * 0.02).astype(mx.bfloat16)
    if kind == "matvec-bf16":
        one = weight.nbytes
        copies = [weight] + [weight + 0 for _ in range(_copies(one) - 1)]
        mx.eval(x, copies)
        nbytes = one + x.nbytes + rows * out_features * 2
        ours = [lambda w=w: dense_matvec(x, w, backend=backend) for w in copies]
        theirs = [lambda w=w: x @ w.T for w in copies]
        return ours, theirs, nbytes
    bits = int(kind.split("-")[1])
    parts = mx.quantize(weight, group_size=group_size, bits=bits)
    one = sum(p.nbytes for p in parts)
    copies = [parts] + [tuple(p + 0 for p in parts) for _ in range(_copies(one) - 1)]
    mx.eval(x, copies)
    nbytes = one + x.nbytes + rows * out_features * 2
    ours = [lambda p=p: quantized_matvec(x, *p, bits=bits, group_size=group_size, backend=backend) for p in copies]
    theirs = [lambda p=p: mx.quantized_matmul(x, *p, transpose=True, group_size=group_size, bits=bits) for p in copies]
    return ours, theirs, nbytes


def run_matvec_bench(
    kernels: list[str],
    shapes: list[tuple[int, int]],
    rows: list[int],
    group_size: int,
    backend: str | None,
    repeats: int,
    batch_calls: int,
    peak_gbs: float | None,
    progress: Callable[[MatvecRow], None] | None = None,
) -> list[MatvecRow]:
    """Every (kernel, shape, rows) case; ``progress`` sees each row as soon as it is timed."""
    results = []
    for kind in kernels:
        chosen = resolve(DENSE_MATVEC if kind == "matvec-bf16" else QUANTIZED_MATVEC, backend)
        label = kind if kind == "matvec-bf16" else f"{kind} g{group_size}"
        for in_features, out_features in shapes:
            for n_rows in rows:
                ours, theirs, nbytes = _case(kind, n_rows, in_features, out_features, group_size, backend)
                seconds = _timed(ours, repeats, batch_calls)
                mlx_seconds = _timed(theirs, repeats, batch_calls)
                gbs = nbytes / seconds / 1e9
                results.append(
                    MatvecRow(
                        kernel=label,
                        backend=chosen,
                        rows=n_rows,
                        in_features=in_features,
                        out_features=out_features,
                        bytes_moved=nbytes,
                        time_us=seconds * 1e6,
                        gbs=gbs,
                        peak_pct=None if peak_gbs is None else 100 * gbs / peak_gbs,
                        mlx_us=mlx_seconds * 1e6,
                        mlx_gbs=nbytes / mlx_seconds / 1e9,
                        speedup=mlx_seconds / seconds,
                    )
                )
                if progress is not None:
                    progress(results[-1])
                del ours, theirs
    return results


MATVEC_HEADER = (
    f"{'kernel':<16}{'backend':<11}{'rows':>5}{'K':>7}{'N':>8}{'MB':>8}{'ours µs':>10}{'GB/s':>8}{'% peak':>8}"
    f"{'MLX µs':>9}{'MLX GB/s':>10}{'MLX %':>7}{'speedup':>9}"
)


def format_matvec_row(r: MatvecRow, peak_gbs: float | None) -> str:
    peak = "" if r.peak_pct is None else f"{r.peak_pct:.1f}"
    mlx_peak = "" if peak_gbs is None else f"{100 * r.mlx_gbs / peak_gbs:.1f}"
    return (
        f"{r.kernel:<16}{r.backend:<11}{r.rows:>5}{r.in_features:>7}{r.out_features:>8}{r.bytes_moved / 1e6:>8.2f}"
        f"{r.time_us:>10.1f}{r.gbs:>8.0f}{peak:>8}{r.mlx_us:>9.1f}{r.mlx_gbs:>10.0f}{mlx_peak:>7}{r.speedup:>8.2f}x"
    )


def format_matvec_table(rows: list[MatvecRow], peak_gbs: float | None) -> str:
    lines = [MATVEC_HEADER, "-" * len(MATVEC_HEADER)]
    lines += [format_matvec_row(r, peak_gbs) for r in rows]
    return "\n".join(lines)
