"""Skinny products ``x @ W.T`` (1-32 rows): the reference (MLX's product) against a float64 numpy oracle of the
dequantized weight, and every fast backend against the oracle too, on hypothesis-drawn shapes (4 and 8 bits, groups
of 32/64/128, widths that fill no block evenly, row counts past one row tile, float16 / bfloat16 / float32
activations, with and without the layer's bias). The CPU emulation of the CUDA source runs a few fixed cases of
every code path (one-warp and shared-memory reductions, two row tiles, dense bfloat16)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_kernels import quantized_matvec as qmv
from vlm_kernels.quantized_matvec import MAX_ROWS, dense_matvec, matvec_applies, output_dtype, quantized_matvec

from . import cpu_emulator
from .backends import KERNEL_SETTINGS, fast_backends

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
TOLERANCE = {mx.float16: 3e-3, mx.bfloat16: 1.6e-2, mx.float32: 1e-4}  # relative to the output's largest value


@dataclass(frozen=True)
class Case:
    rows: int
    in_features: int
    out_features: int
    bits: int  # 16: dense bfloat16
    group_size: int
    dtype: object
    with_bias: bool
    seed: int


@st.composite
def cases(draw) -> Case:
    bits = draw(st.sampled_from([4, 8]))
    group_size = draw(st.sampled_from([32, 64, 128]))
    return Case(
        rows=draw(st.sampled_from([1, 1, 2, 3, 4, 8, 9, 16, 32])),
        in_features=group_size * draw(st.integers(1, 40)),
        out_features=draw(st.integers(1, 300)),
        bits=bits,
        group_size=group_size,
        dtype=draw(st.sampled_from(DTYPES)),
        with_bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def inputs(case: Case):
    """Activations with a few large channels, a bfloat16 weight (quantized unless dense) and an optional bias."""
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal((case.rows, case.in_features)) * (1 + 4 * (rng.random(case.in_features) < 0.05))
    weight = mx.array((rng.standard_normal((case.out_features, case.in_features)) * 0.05).astype(np.float32))
    weight = weight.astype(mx.bfloat16)
    bias = mx.array(rng.standard_normal(case.out_features).astype(np.float32)).astype(case.dtype)
    x = mx.array(x.astype(np.float32)).astype(case.dtype)
    parts = None if case.bits == 16 else mx.quantize(weight, group_size=case.group_size, bits=case.bits)
    return x, weight, parts, bias if case.with_bias else None


def oracle(case: Case, x, weight, parts, bias) -> np.ndarray:
    if parts is None:
        w = np.array(weight.astype(mx.float32), np.float64)
    else:
        packed, scales, biases = parts
        f32 = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), case.group_size, case.bits)
        w = np.array(f32, np.float64)
    out = np.array(x.astype(mx.float32), np.float64) @ w.T
    return out if bias is None else out + np.array(bias.astype(mx.float32), np.float64)


def run(case: Case, data, backend: str) -> mx.array:
    x, weight, parts, bias = data
    if parts is None:
        return dense_matvec(x, weight, bias=bias, backend=backend)
    return quantized_matvec(x, *parts, bits=case.bits, group_size=case.group_size, bias=bias, backend=backend)


def close(actual: mx.array, expected: np.ndarray, dtype, tolerance=TOLERANCE) -> None:
    assert actual.shape == expected.shape
    actual = np.array(actual.astype(mx.float32), np.float64)
    scale = max(float(np.abs(expected).max()), 1e-3)
    worst = float(np.abs(actual - expected).max()) / scale
    assert worst < tolerance[dtype], f"largest error {worst:.2e} of the output's scale"


@KERNEL_SETTINGS
@given(case=cases())
def test_reference_equals_the_oracle(case: Case) -> None:
    data = inputs(case)
    out = run(case, data, "reference")
    assert out.dtype == output_dtype(case.dtype, mx.bfloat16)
    # MLX's product forms q * scale + bias in the activations' type: in bfloat16 each weight is then rounded to a
    # fraction of its bias (about 8 scales), off by several percent at times. The oracle is held to float32 here;
    # the fast versions (float32 arithmetic) are held to every type's rounding below.
    if case.dtype == mx.float32:
        close(out, oracle(case, *data), case.dtype)


@pytest.mark.parametrize("backend", fast_backends())
@KERNEL_SETTINGS
@given(case=cases(), dense=st.booleans())
def test_fast_backend_equals_the_oracle(backend: str, case: Case, dense: bool) -> None:
    if dense:
        case = Case(case.rows, case.in_features, case.out_features, 16, 8, case.dtype, case.with_bias, case.seed)
    data = inputs(case)
    close(run(case, data, backend), oracle(case, *data), case.dtype)


@pytest.mark.parametrize("backend", fast_backends())
def test_leading_axes_and_unaligned_rows(backend: str) -> None:
    """(batch, length, K) activations, and a view that starts mid-buffer (no 16-byte alignment)."""
    case = Case(3, 256, 70, 4, 64, mx.bfloat16, True, 5)
    x, weight, parts, bias = inputs(case)
    batched = x.reshape(1, 3, 256)
    out = quantized_matvec(batched, *parts, bits=4, group_size=64, bias=bias, backend=backend)
    assert out.shape == (1, 3, 70)
    close(out.reshape(3, 70), oracle(case, x, weight, parts, bias), case.dtype)
    flat = mx.concatenate([mx.zeros((1,), x.dtype), x.reshape(-1)])[1:].reshape(3, 256)
    close(
        quantized_matvec(flat, *parts, bits=4, group_size=64, bias=bias, backend=backend),
        oracle(case, x, weight, parts, bias),
        case.dtype,
    )


def test_more_rows_than_the_kernel_takes_use_mlx() -> None:
    case = Case(MAX_ROWS + 5, 128, 20, 8, 32, mx.float32, False, 1)
    data = inputs(case)
    close(run(case, data, "reference"), oracle(case, *data), case.dtype)
    assert not matvec_applies(qmv.QUANTIZED_MATVEC, 1, backend="reference")


def test_bad_arguments_say_what_is_wrong() -> None:
    x = mx.zeros((1, 64))
    packed, scales, biases = mx.quantize(mx.zeros((8, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantized_matvec(x, packed, scales, biases, bits=3, group_size=32)
    with pytest.raises(ValueError, match="features"):
        quantized_matvec(mx.zeros((1, 32)), packed, scales, biases, bits=4, group_size=32)
    with pytest.raises(ValueError, match="scales and biases"):
        quantized_matvec(x, packed, scales, biases, bits=4, group_size=64)


EMULATED = {
    "4-bit g64, one row, bias, one-warp reduction": Case(1, 256, 40, 4, 64, mx.bfloat16, True, 1),
    "8-bit g32, two row tiles": Case(11, 96, 19, 8, 32, mx.float16, False, 2),
    "4-bit g128, shared-memory reduction": Case(2, 4096, 8, 4, 128, mx.float32, True, 3),
    "dense bfloat16": Case(3, 64, 33, 16, 8, mx.bfloat16, True, 4),
}


@pytest.mark.slow
@pytest.mark.skipif(cpu_emulator.compiler() is None, reason="the emulation is built with g++ (C++20)")
@pytest.mark.parametrize("name", sorted(EMULATED))
def test_cuda_source_in_the_cpu_emulation(monkeypatch, name: str) -> None:
    case = EMULATED[name]
    data = inputs(case)
    if name.startswith("4-bit g128"):
        assert qmv._plan(case.rows, case.in_features, case.out_features, case.bits).lanes > 32
    with cpu_emulator.installed(monkeypatch):
        out = run(case, data, "cuda")
    close(out, oracle(case, *data), case.dtype)


def test_auto_keeps_mlx_until_the_kernel_is_measured_faster(monkeypatch) -> None:
    from vlm_kernels import dispatch

    monkeypatch.setattr(dispatch, "available_backends", lambda: ("reference", "cuda"))
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    dispatch.reread_environment()
    assert matvec_applies(qmv.QUANTIZED_MATVEC, 1) == (qmv.FAST_ROWS >= 1)
    assert matvec_applies(qmv.QUANTIZED_MATVEC, MAX_ROWS, backend="cuda")
    assert not matvec_applies(qmv.QUANTIZED_MATVEC, MAX_ROWS + 1, backend="cuda")
    assert not matvec_applies(qmv.QUANTIZED_MATVEC, 1, backend="reference")
