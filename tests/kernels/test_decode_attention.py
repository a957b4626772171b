"""Decode attention over compressed caches: the mlx-ops reference against a float64 numpy oracle, and every fast
backend against the reference, on hypothesis-drawn shapes (head dims 64-256, GQA 1-8, lengths that are no
multiple of any block, ragged rows, masks, float16 / bfloat16 / float32 queries)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_kernels.decode_attention import affine_decode_attention, turboquant_decode_attention
from vlm_kernels.turboquant import TURBOQUANT_BITS, turboquant_codec

from .backends import KERNEL_SETTINGS, fast_backends

DTYPES = [mx.float16, mx.bfloat16, mx.float32]
TOLERANCE = {mx.float16: 4e-3, mx.bfloat16: 2e-2, mx.float32: 2e-4}  # relative to the output's largest value


@dataclass(frozen=True)
class Case:
    batch: int
    kv_heads: int
    repeats: int
    key_dim: int
    value_dim: int
    length: int
    spare: int  # buffer columns past ``length`` (a cache's room to grow): never read
    starts: tuple[int, ...]
    masked: bool
    dtype: object
    seed: int

    @property
    def capacity(self) -> int:
        return self.length + self.spare


@st.composite
def cases(draw, dims=st.sampled_from([64, 80, 96, 128, 256]), same_dims: bool = False) -> Case:
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 700))
    key_dim = draw(dims)
    value_dim = key_dim if same_dims else draw(st.sampled_from([key_dim, key_dim, 64]))
    starts = tuple(draw(st.integers(0, length)) if draw(st.booleans()) else 0 for _ in range(batch))
    return Case(
        batch=batch,
        kv_heads=draw(st.integers(1, 3)),
        repeats=draw(st.integers(1, 8)),
        key_dim=key_dim,
        value_dim=value_dim,
        length=length,
        spare=draw(st.sampled_from([0, 0, 3, 61])),
        starts=starts,
        masked=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def tensors(case: Case) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
    """Queries, keys and values with outlier channels (as real keys have), and an optional additive mask."""
    rng = np.random.default_rng(case.seed)
    shape = (case.batch, case.kv_heads, case.capacity)
    keys = rng.standard_normal((*shape, case.key_dim)) * (1 + 6 * (rng.random(case.key_dim) < 0.05))
    values = rng.standard_normal((*shape, case.value_dim)) + 0.5
    queries = rng.standard_normal((case.batch, case.kv_heads * case.repeats, 1, case.key_dim))
    mask = None
    if case.masked:
        mask = mx.array(np.where(rng.random((case.batch, 1, 1, case.capacity)) < 0.2, -1e9, 0.0).astype(np.float32))
    as_mx = lambda a: mx.array(a.astype(np.float32))  # noqa: E731
    return as_mx(queries).astype(case.dtype), as_mx(keys), as_mx(values), mask


def oracle(queries, keys, values, case: Case, mask, scale: float) -> np.ndarray:
    """Plain float64 attention over dequantized keys/values."""
    q = np.array(queries.astype(mx.float32), np.float64)
    k, v = np.array(keys, np.float64), np.array(values, np.float64)
    out = np.zeros((case.batch, q.shape[1], 1, case.value_dim))
    for b in range(case.batch):
        columns = np.arange(case.starts[b], case.length)
        if columns.size == 0:
            continue
        for h in range(q.shape[1]):
            kv = h // case.repeats
            scores = k[b, kv, columns] @ q[b, h, 0] * scale
            if mask is not None:
                scores = scores + np.array(mask)[b, 0, 0, columns]
            weights = np.exp(scores - scores.max())
            out[b, h, 0] = weights @ v[b, kv, columns] / weights.sum()
    return out


def close(actual: mx.array, expected: np.ndarray, dtype) -> None:
    actual = np.array(actual.astype(mx.float32), np.float64)
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-3)
    worst = float(np.abs(actual - expected).max()) / scale
    assert worst < TOLERANCE[dtype], f"largest error {worst:.2e} of the output's scale"


def turboquant_inputs(case: Case, key_bits: float, value_bits: float):
    queries, keys, values, mask = tensors(case)
    key_codec = turboquant_codec(case.key_dim, key_bits, 1)
    value_codec = turboquant_codec(case.value_dim, value_bits, 2)
    return queries, key_codec.encode(keys), value_codec.encode(values), key_codec, value_codec, mask


def run_turboquant(case: Case, inputs, backend: str) -> mx.array:
    queries, keys, values, key_codec, value_codec, mask = inputs
    return turboquant_decode_attention(
        queries,
        keys,
        values,
        key_codec,
        value_codec,
        scale=case.key_dim**-0.5,
        length=case.length,
        starts=mx.array(case.starts),
        mask=mask,
        backend=backend,
    )


@KERNEL_SETTINGS
@given(case=cases(), key_bits=st.sampled_from(TURBOQUANT_BITS), value_bits=st.sampled_from(TURBOQUANT_BITS))
def test_turboquant_reference_equals_dequantized_attention(case: Case, key_bits: float, value_bits: float) -> None:
    inputs = turboquant_inputs(case, key_bits, value_bits)
    queries, keys, values, key_codec, value_codec, mask = inputs
    expected = oracle(queries, key_codec.decode(keys), value_codec.decode(values), case, mask, case.key_dim**-0.5)
    close(run_turboquant(case, inputs, "reference"), expected, case.dtype)


@pytest.mark.parametrize("backend", fast_backends())
@KERNEL_SETTINGS
@given(case=cases(), key_bits=st.sampled_from(TURBOQUANT_BITS), value_bits=st.sampled_from(TURBOQUANT_BITS))
def test_turboquant_fast_equals_the_reference(backend: str, case: Case, key_bits: float, value_bits: float) -> None:
    inputs = turboquant_inputs(case, key_bits, value_bits)
    expected = np.array(run_turboquant(case, inputs, "reference").astype(mx.float32), np.float64)
    close(run_turboquant(case, inputs, backend), expected, case.dtype)


@st.composite
def affine_cases(draw) -> tuple[Case, int, int]:
    group_size = draw(st.sampled_from([32, 64, 128]))
    dims = st.sampled_from([d for d in (64, 96, 128, 256) if d % group_size == 0])
    return draw(cases(dims=dims, same_dims=True)), draw(st.sampled_from([4, 8])), group_size


def affine_inputs(case: Case, bits: int, group_size: int):
    queries, keys, values, mask = tensors(case)
    quantized = [mx.quantize(a.astype(mx.bfloat16), group_size=group_size, bits=bits) for a in (keys, values)]
    return queries, *quantized, mask


def run_affine(case: Case, inputs, bits: int, group_size: int, backend: str) -> mx.array:
    queries, keys, values, mask = inputs
    return affine_decode_attention(
        queries,
        keys,
        values,
        bits=bits,
        group_size=group_size,
        scale=case.key_dim**-0.5,
        length=case.length,
        starts=mx.array(case.starts),
        mask=mask,
        backend=backend,
    )


@KERNEL_SETTINGS
@given(drawn=affine_cases())
def test_affine_reference_equals_dequantized_attention(drawn) -> None:
    case, bits, group_size = drawn
    inputs = affine_inputs(case, bits, group_size)
    queries, keys, values, mask = inputs

    def dequantize(parts):
        packed, scales, biases = parts
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)

    expected = oracle(queries, dequantize(keys), dequantize(values), case, mask, case.key_dim**-0.5)
    close(run_affine(case, inputs, bits, group_size, "reference"), expected, case.dtype)


@pytest.mark.parametrize("backend", fast_backends())
@KERNEL_SETTINGS
@given(drawn=affine_cases())
def test_affine_fast_equals_the_reference(backend: str, drawn) -> None:
    case, bits, group_size = drawn
    inputs = affine_inputs(case, bits, group_size)
    expected = np.array(run_affine(case, inputs, bits, group_size, "reference").astype(mx.float32), np.float64)
    close(run_affine(case, inputs, bits, group_size, backend), expected, case.dtype)


@pytest.mark.parametrize("backend", fast_backends())
@pytest.mark.parametrize("length", [1, 255, 257, 4097, 40000])
def test_split_k_lengths(backend: str, length: int) -> None:
    """Single pass, the first split lengths, and a long context with many splits (GQA 6, the 2B shape)."""
    case = Case(1, 2, 6, 128, 128, length, 5, (0,), False, mx.bfloat16, length)
    inputs = turboquant_inputs(case, 3, 4)
    expected = np.array(run_turboquant(case, inputs, "reference").astype(mx.float32), np.float64)
    close(run_turboquant(case, inputs, backend), expected, case.dtype)


def test_rows_without_keys_give_zeros_and_bad_input_is_refused() -> None:
    case = Case(2, 2, 2, 64, 64, 10, 0, (10, 0), False, mx.float32, 0)
    out = np.array(run_turboquant(case, turboquant_inputs(case, 3, 3), "reference"))
    assert not out[0].any() and np.abs(out[1]).sum() > 0
    queries, keys, values, kc, vc, _ = turboquant_inputs(case, 3, 3)
    with pytest.raises(ValueError, match="queries of shape"):
        turboquant_decode_attention(mx.zeros((2, 2, 3, 64)), keys, values, kc, vc, scale=1.0)
    with pytest.raises(ValueError, match="outside"):
        turboquant_decode_attention(queries, keys, values, kc, vc, scale=1.0, length=11)
    with pytest.raises(ValueError, match="group over"):
        turboquant_decode_attention(mx.zeros((2, 3, 1, 64)), keys, values, kc, vc, scale=1.0)
    with pytest.raises(ValueError, match="mask"):
        turboquant_decode_attention(queries, keys, values, kc, vc, scale=1.0, mask=mx.zeros((2, 2, 1, 10)))


def test_quantized_caches_take_the_fused_affine_kernel_only_when_asked(monkeypatch) -> None:
    from vlm_kernels import dispatch
    from vlm_kernels.decode_attention import AFFINE_DECODE, fast_decode_applies

    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    dispatch.reread_environment()
    assert not fast_decode_applies(AFFINE_DECODE, None)  # auto keeps MLX's quantized_matmul
    monkeypatch.setattr(dispatch, "available_backends", lambda: ("reference", "cuda"))
    assert not fast_decode_applies(AFFINE_DECODE, None)
    assert fast_decode_applies(AFFINE_DECODE, None, backend="cuda")
    monkeypatch.setenv(dispatch.BACKEND_ENV, "cuda")
    dispatch.reread_environment()
    assert fast_decode_applies(AFFINE_DECODE, mx.zeros((2, 1, 1, 9)))
    assert not fast_decode_applies(AFFINE_DECODE, mx.zeros((2, 4, 1, 9)))  # a mask per head: the fallback
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    dispatch.reread_environment()
    assert not fast_decode_applies(AFFINE_DECODE, None)
    monkeypatch.undo()
    dispatch.reread_environment()
