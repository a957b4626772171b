"""``vlm-kernels bench``: each kernel timed on the current device next to what it replaces.

Decode attention (one query per row) over a compressed cache is timed against
``mx.fast.scaled_dot_product_attention`` on float16 K/V of the same shape. Bytes are those the kernel must read
(packed codes, norms or scales/biases, the queries); effective bandwidth is bytes / time, and its share of the
device's peak is shown where the peak is known (``--peak-gbs`` to give it). Times are medians over
``--repeats`` timings of ``--batch-calls`` independent calls evaluated together (launch cost included, as in
decoding), after a warm-up that compiles the kernels.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import mlx.core as mx

from .decode_attention import AFFINE_DECODE, TURBOQUANT_DECODE, affine_decode_attention, turboquant_decode_attention
from .dispatch import resolve
from .turboquant import ENCODE, turboquant_codec

__all__ = ["BenchRow", "PEAK_GBS", "Shape", "run_bench"]

PEAK_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
"""Vendor peak memory bandwidth by device-name fragment (GB/s)."""


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    head_dim: int

    def __str__(self) -> str:
        return f"B{self.batch} H{self.heads}/{self.kv_heads} d{self.head_dim}"


@dataclass(frozen=True)
class BenchRow:
    kernel: str
    backend: str
    shape: str
    context: int
    time_us: float
    bytes_read: int
    gbs: float
    peak_pct: float | None
    sdpa_fp16_us: float | None
    speedup_vs_sdpa: float | None

    @classmethod
    def timed(
        cls,
        kernel: str,
        backend: str,
        shape: Shape,
        context: int,
        seconds: float,
        nbytes: int,
        peak_gbs: float | None,
        sdpa_seconds: float | None = None,
    ) -> BenchRow:
        gbs = nbytes / seconds / 1e9
        return cls(
            kernel=kernel,
            backend=backend,
            shape=str(shape),
            context=context,
            time_us=seconds * 1e6,
            bytes_read=nbytes,
            gbs=gbs,
            peak_pct=None if peak_gbs is None else 100 * gbs / peak_gbs,
            sdpa_fp16_us=None if sdpa_seconds is None else sdpa_seconds * 1e6,
            speedup_vs_sdpa=None if sdpa_seconds is None else sdpa_seconds / seconds,
        )


def _timed(fn: Callable[[], mx.array], repeats: int, batch_calls: int) -> float:
    """Median seconds per call."""
    for _ in range(3):
        mx.eval([fn() for _ in range(batch_calls)])
    samples = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval([fn() for _ in range(batch_calls)])
        mx.synchronize()
        samples.append((time.perf_counter() - start) / batch_calls)
    return statistics.median(samples)


def device_peak_gbs() -> float | None:
    name = mx.device_info().get("device_name", "")
    return next((peak for fragment, peak in PEAK_GBS.items() if fragment in str(name)), None)


def _sdpa_time(shape: Shape, context: int, repeats: int, batch_calls: int) -> float:
    q = mx.random.normal((shape.batch, shape.heads, 1, shape.head_dim)).astype(mx.float16)
    k = mx.random.normal((shape.batch, shape.kv_heads, context, shape.head_dim)).astype(mx.float16)
    v = mx.random.normal((shape.batch, shape.kv_heads, context, shape.head_dim)).astype(mx.float16)
    mx.eval(q, k, v)
    scale = shape.head_dim**-0.5
    return _timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), repeats, batch_calls)


def _turboquant_case(shape: Shape, context: int, key_bits: float, value_bits: float, backend: str | None):
    kc = turboquant_codec(shape.head_dim, key_bits, 0)
    vc = turboquant_codec(shape.head_dim, value_bits, 1)
    size = (shape.batch, shape.kv_heads, context, shape.head_dim)
    keys, values = kc.encode(mx.random.normal(size)), vc.encode(mx.random.normal(size))
    q = mx.random.normal((shape.batch, shape.heads, 1, shape.head_dim)).astype(mx.bfloat16)
    mx.eval(keys, values, q)
    scale = shape.head_dim**-0.5
    nbytes = sum(a.nbytes for a in (*keys, *values)) + q.nbytes

    def call() -> mx.array:
        return turboquant_decode_attention(q, keys, values, kc, vc, scale=scale, backend=backend)

    return call, nbytes


def _affine_cache(shape: Shape, context: int, bits: int, group_size: int):
    """Random keys, values (``mx.quantize``d bfloat16) and bfloat16 queries, evaluated, and the bytes read."""
    size = (shape.batch, shape.kv_heads, context, shape.head_dim)
    keys = mx.quantize(mx.random.normal(size).astype(mx.bfloat16), group_size=group_size, bits=bits)
    values = mx.quantize(mx.random.normal(size).astype(mx.bfloat16), group_size=group_size, bits=bits)
    q = mx.random.normal((shape.batch, shape.heads, 1, shape.head_dim)).astype(mx.bfloat16)
    mx.eval(keys, values, q)
    return keys, values, q, sum(a.nbytes for a in (*keys, *values)) + q.nbytes


def _affine_case(shape: Shape, context: int, bits: int, group_size: int, backend: str | None):
    keys, values, q, nbytes = _affine_cache(shape, context, bits, group_size)
    scale = shape.head_dim**-0.5

    def call() -> mx.array:
        return affine_decode_attention(q, keys, values, bits=bits, group_size=group_size, scale=scale, backend=backend)

    return call, nbytes


def _quantized_matmul_case(shape: Shape, context: int, bits: int, group_size: int):
    """What MLX offers for the same cache: two ``mx.quantized_matmul`` around a softmax (the query heads of a
    kv head stacked as rows), as ``vlm_runtime``'s ``quantized_attention`` does."""
    keys, values, q, nbytes = _affine_cache(shape, context, bits, group_size)
    rows = (shape.batch, shape.kv_heads, shape.heads // shape.kv_heads, shape.head_dim)
    scale = shape.head_dim**-0.5

    def call() -> mx.array:
        scores = mx.quantized_matmul((q * scale).reshape(rows), *keys, group_size=group_size, bits=bits)
        probs = mx.softmax(scores.astype(mx.float32), axis=-1).astype(mx.bfloat16)
        return mx.quantized_matmul(probs, *values, transpose=False, group_size=group_size, bits=bits)

    return call, nbytes


KERNELS = {
    "turboquant-3.5": lambda s, c, b: _turboquant_case(s, c, 3, 4, b),  # 3-bit keys, 4-bit values
    "turboquant-2": lambda s, c, b: _turboquant_case(s, c, 2, 2, b),
    "turboquant-3": lambda s, c, b: _turboquant_case(s, c, 3, 3, b),
    "turboquant-4": lambda s, c, b: _turboquant_case(s, c, 4, 4, b),
    "affine-8": lambda s, c, b: _affine_case(s, c, 8, 64, b),  # group size 64
    "affine-4": lambda s, c, b: _affine_case(s, c, 4, 64, b),
}


def run_bench(
    kernels: list[str],
    contexts: list[int],
    shape: Shape,
    backend: str | None,
    repeats: int,
    batch_calls: int,
    peak_gbs: float | None,
) -> list[BenchRow]:
    rows = []
    for context in contexts:
        sdpa = _sdpa_time(shape, context, repeats, batch_calls)
        for name in kernels:
            spec = TURBOQUANT_DECODE if name.startswith("turboquant") else AFFINE_DECODE
            cases = [(f"{spec.name} {name}", resolve(spec, backend), KERNELS[name](shape, context, backend))]
            if name.startswith("affine"):
                bits = int(name.split("-")[1])
                cases.append(
                    (f"mx.quantized_matmul x2 {name}", "mlx", _quantized_matmul_case(shape, context, bits, 64))
                )
            for label, chosen, (call, nbytes) in cases:
                seconds = _timed(call, repeats, batch_calls)
                rows.append(BenchRow.timed(label, chosen, shape, context, seconds, nbytes, peak_gbs, sdpa))
        rows.append(_encode_row(shape, min(context, 2048), backend, repeats, batch_calls, peak_gbs))
    return rows


def _encode_row(
    shape: Shape, tokens: int, backend: str | None, repeats: int, batch_calls: int, peak_gbs: float | None
) -> BenchRow:
    """Quantize-and-pack of a prefill chunk of keys (what a cache does per new chunk)."""
    codec = turboquant_codec(shape.head_dim, 3, 0)
    x = mx.random.normal((shape.batch, shape.kv_heads, tokens, shape.head_dim)).astype(mx.bfloat16)
    mx.eval(x)
    seconds = _timed(lambda: codec.encode(x, backend=backend).words, repeats, batch_calls)
    nbytes = x.nbytes + x.size // shape.head_dim * codec.bytes_per_vector
    return BenchRow.timed("turboquant_encode 3-bit", resolve(ENCODE, backend), shape, tokens, seconds, nbytes, peak_gbs)


def format_table(rows: list[BenchRow]) -> str:
    header = (
        f"{'kernel':<44}{'backend':<11}{'shape':<18}{'context':>9}{'time µs':>10}{'GB/s':>9}{'% peak':>8}"
        f"{'SDPA f16 µs':>13}{'vs SDPA':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        peak = "" if r.peak_pct is None else f"{r.peak_pct:.1f}"
        sdpa = "" if r.sdpa_fp16_us is None else f"{r.sdpa_fp16_us:.1f}"
        ratio = "" if r.speedup_vs_sdpa is None else f"{r.speedup_vs_sdpa:.2f}x"
        lines.append(
            f"{r.kernel:<44}{r.backend:<11}{r.shape:<18}{r.context:>9}{r.time_us:>10.1f}{r.gbs:>9.1f}{peak:>8}"
            f"{sdpa:>13}{ratio:>9}"
        )
    return "\n".join(lines)


def rows_json(rows: list[BenchRow], peak_gbs: float | None) -> str:
    device = {"device": str(mx.default_device()), "mlx": mx.__version__, **mx.device_info(), "peak_gbs": peak_gbs}
    return json.dumps({"device": device, "rows": [asdict(r) for r in rows]}, indent=2, default=str)
