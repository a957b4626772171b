"""Skinny matrix products for decode: ``x @ W.T`` for 1-32 rows of ``x``, W affine-quantized as ``mx.quantize``
stores it (``quantized_matvec``) or dense bfloat16 (``dense_matvec``).

At decode a linear layer reads its whole weight to produce one row: the product is bound by memory bandwidth, and
MLX's CUDA quantized matrix-vector product reached 9% of an H200's. The kernel (``_matvec_sources``) reads every
weight byte once with 128-bit loads, several in flight per thread, turns codes into floats with two bit operations
and a subtraction, and applies each group's scale and bias once per group and row. The layer's bias is added in
the same kernel (one launch, not two).

The mlx-ops reference is MLX's own ``mx.quantized_matmul`` (``x @ W.T`` for the dense one): the path every
device without a fast version takes, the oracle of the tests, and what callers fall back to where the kernel is
not faster (``matvec_applies``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from . import _matvec_sources
from .dispatch import Kernel, cuda_kernel, metal_kernel, requested_backend, resolve

__all__ = [
    "DENSE_MATVEC",
    "MAX_ROWS",
    "QUANTIZED_MATVEC",
    "dense_matvec",
    "matvec_applies",
    "output_dtype",
    "quantized_matvec",
]

_CUDA_NOTE = (
    "NVIDIA H200, MLX 0.32.4: equal to the float64 oracle on tests/kernels' hypothesis shapes (20 examples: 1-32 "
    "rows, 4/8-bit, groups 32/64/128, float16/bfloat16/float32, with and without bias; dense bfloat16), an "
    "unaligned activation view, and the 4-bit Qwen2-VL fixture's logits through it (tests/models); also the CPU "
    "emulation"
)
QUANTIZED_MATVEC = Kernel(
    name="quantized_matvec",
    fast=("cuda", "metal"),
    verified=(("reference", "CPU (this repo's CI)"), ("cuda", _CUDA_NOTE)),
)
DENSE_MATVEC = Kernel(
    name="dense_matvec",
    fast=("cuda", "metal"),
    verified=(("reference", "CPU (this repo's CI)"), ("cuda", _CUDA_NOTE)),
)

MAX_ROWS = 32
"""Rows of ``x`` the kernel takes; more rows (prefill) go to MLX's matrix product whatever the backend."""
FAST_ROWS = 0
"""Up to how many rows ``matvec_applies`` lets the kernel replace MLX's product when nothing is forced. 0: the
kernel passed its tests on an H200 but its speed there is not measured yet (the session's device time ran out), so
auto keeps MLX's product; ``benchmarks/device_matvec.sh`` measures it, and this becomes the largest row count at
which the kernel wins (its CUDA-core arithmetic grows with the rows). ``VLM_KERNELS_BACKEND=cuda`` uses the kernel
for up to ``MAX_ROWS`` rows now."""
_THREADS = 256
_ROW_TILE = 8  # rows accumulated in registers per block; more rows take more blocks along grid y
_WANTED_THREADS = 32768  # enough threads in flight to cover an H200's memory latency
_BITS = (4, 8)
_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class _Plan:
    cols: int  # output columns per group of threads
    lanes: int  # threads of a group, striding over a row's 16-byte chunks
    row_tile: int


@functools.lru_cache(maxsize=512)
def _plan(rows: int, in_features: int, out_features: int, bits: int) -> _Plan:
    """The launch shape: as many useful threads as the latency needs (up to ``_WANTED_THREADS``, few idle in the
    last stride), then the most columns per thread (activations read once for more columns), then about four
    chunks per thread (loads in flight without too many registers)."""
    chunks = in_features * bits // 128
    row_tile = min(rows, _ROW_TILE)
    # Registers: COLS x MT accumulators and the activations of a chunk; past about 128 per thread an H200 runs
    # fewer than two blocks per multiprocessor.
    widest = 4 if row_tile <= 2 else 2
    best: tuple[Any, ...] | None = None
    for cols in (c for c in (4, 2, 1) if c <= widest):
        for lanes in (4, 8, 16, 32, 64, 128, 256):
            iters = math.ceil(chunks / lanes)
            if iters > 8 or lanes > 2 * chunks:
                continue
            threads = math.ceil(out_features / cols) * lanes
            useful = min(threads, _WANTED_THREADS) * chunks / (iters * lanes)
            score = (round(useful), cols, -abs(iters - 4))
            if best is None or score > best[0]:
                best = (score, cols, lanes)
    if best is None:  # rows so long that even 256 lanes take over 8 strides
        best = (None, 1, 256)
    return _Plan(best[1], best[2], row_tile)


@functools.cache
def _kernel(backend: str) -> Any:
    build = cuda_kernel if backend == "cuda" else metal_kernel
    from . import _sources

    body = _sources.thread_ids(backend) + _matvec_sources.MATVEC_BODY
    inputs = ("x", "w", "scales", "biases", "lin_bias")
    return build("matvec", inputs, ("out",), body, _matvec_sources.matvec_prelude(backend))


@functools.lru_cache(maxsize=8)
def _dummy(dtype: mx.Dtype) -> mx.array:
    array = mx.zeros((1,), dtype)
    mx.eval(array)
    return array


def _launch(
    backend: str,
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    bias: mx.array | None,
    bits: int,
    group_size: int,
    out_features: int,
    out_dtype: mx.Dtype,
) -> mx.array:
    in_features = x.shape[-1]
    lead = x.shape[:-1]
    rows = math.prod(lead)
    plan = _plan(rows, in_features, out_features, bits)
    groups = _THREADS // plan.lanes
    blocks = math.ceil(out_features / (groups * plan.cols))
    template = [
        ("K", in_features),
        ("N", out_features),
        ("M", rows),
        ("MT", plan.row_tile),
        ("BITS", bits),
        ("GS", group_size),
        ("COLS", plan.cols),
        ("TK", plan.lanes),
        ("NT", _THREADS),
        ("HAS_BIAS", bias is not None),
        ("OutT", out_dtype),
    ]
    (out,) = _kernel(backend)(
        inputs=[x.reshape(rows, in_features), w, scales, biases, _dummy(out_dtype) if bias is None else bias],
        template=template,
        grid=(blocks * _THREADS, math.ceil(rows / plan.row_tile), 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(rows, out_features)],
        output_dtypes=[out_dtype],
    )
    return out.reshape(*lead, out_features)


def output_dtype(activations: mx.Dtype, weights: mx.Dtype) -> mx.Dtype:
    """MLX's promotion of two float types (float16 with bfloat16 gives float32)."""
    return activations if activations == weights else mx.float32


def _with_bias(y: mx.array, bias: mx.array | None) -> mx.array:
    return y if bias is None else y + bias


def _check_quantized(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int):
    if bits not in _BITS:
        raise ValueError(f"quantized_matvec: bits must be 4 or 8, got {bits}")
    if group_size not in _GROUP_SIZES:
        raise ValueError(f"quantized_matvec: group_size must be 32, 64 or 128, got {group_size}")
    if w.dtype != mx.uint32 or w.ndim != 2:
        raise ValueError(f"quantized_matvec: w must be mx.quantize's 2-D uint32 array, got {w.dtype} {w.shape}")
    in_features = w.shape[1] * 32 // bits
    if x.shape[-1] != in_features:
        raise ValueError(f"quantized_matvec: x has {x.shape[-1]} features, the weight takes {in_features}")
    groups = (w.shape[0], in_features // group_size)
    if scales.shape != groups or biases.shape != groups:
        raise ValueError(f"quantized_matvec: scales and biases must be {groups}, got {scales.shape}, {biases.shape}")


def quantized_matvec(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    bits: int,
    group_size: int,
    bias: mx.array | None = None,
    backend: str | None = None,
) -> mx.array:
    """``x @ dequantize(w).T (+ bias)``, what ``mx.quantized_matmul(x, w, scales, biases, transpose=True)`` computes.

    ``x`` (..., K) in float16, bfloat16 or float32; ``w`` (N, K * bits / 32) uint32, ``scales`` and ``biases``
    (N, K / group_size), as ``mx.quantize(W, group_size, bits)`` returns them (4 or 8 bits, groups of 32, 64 or
    128); ``bias`` (N,) or None. Returns (..., N) in the promoted type of ``x`` and ``scales``, as MLX does. Over
    ``MAX_ROWS`` rows of ``x`` it is MLX's product whatever the backend.
    """
    _check_quantized(x, w, scales, biases, bits, group_size)
    chosen = resolve(QUANTIZED_MATVEC, backend)
    rows = math.prod(x.shape[:-1])
    if chosen == "reference" or not 0 < rows <= MAX_ROWS:
        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
        return _with_bias(y, bias)
    out_dtype = output_dtype(x.dtype, scales.dtype)
    return _launch(chosen, x, w, scales, biases, bias, bits, group_size, w.shape[0], out_dtype)


def dense_matvec(x: mx.array, weight: mx.array, *, bias: mx.array | None = None, backend: str | None = None):
    """``x @ weight.T (+ bias)`` for a bfloat16 ``weight`` (N, K), K a multiple of 8; ``x`` (..., K). Other weight
    types, and over ``MAX_ROWS`` rows, are MLX's product."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"dense_matvec: x {x.shape} does not multiply a weight {weight.shape} transposed")
    chosen = resolve(DENSE_MATVEC, backend)
    rows = math.prod(x.shape[:-1])
    fits = weight.dtype == mx.bfloat16 and weight.shape[1] % 8 == 0 and 0 < rows <= MAX_ROWS
    if chosen == "reference" or not fits:
        return _with_bias(x @ weight.T, bias)
    out_dtype = output_dtype(x.dtype, weight.dtype)
    dummy = _dummy(mx.bfloat16)
    packed = weight.view(mx.uint32)
    return _launch(chosen, x, packed, dummy, dummy, bias, 16, 8, weight.shape[0], out_dtype)  # a group is a chunk


def matvec_applies(kernel: Kernel, rows: int, backend: str | None = None) -> bool:
    """Whether a caller with MLX's product as its own path (a model's linear layer) should call ``kernel`` for
    ``rows`` rows: a fast backend forced by name (argument or ``VLM_KERNELS_BACKEND``) for up to ``MAX_ROWS``
    rows; under auto, a fast version for up to ``FAST_ROWS`` rows (the rows at which it was measured faster). A
    forced ``reference`` says no."""
    if resolve(kernel, backend) == "reference":
        return False
    limit = MAX_ROWS if requested_backend(backend) != "auto" else FAST_ROWS
    return 0 < rows <= limit
