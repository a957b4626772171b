"""Attention by matrix products (the CUDA route for a few queries over a long cache) against MLX's kernel, on
hypothesis-drawn shapes: grouped-query heads, causal and array masks (boolean and additive), float dtypes."""

from __future__ import annotations

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime.attention import attention, attention_by_products

# (absolute, relative): one or two roundings of the output's dtype apart.
TOLERANCE = {mx.float32: (1e-5, 1e-5), mx.float16: (1e-3, 2e-3), mx.bfloat16: (8e-3, 1.6e-2)}


def assert_close(got: mx.array, expected: mx.array, dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    got, expected = got.astype(mx.float32), expected.astype(mx.float32)
    excess = mx.abs(got - expected) - (atol + rtol * mx.abs(expected))
    assert float(excess.max()) <= 0, float(mx.abs(got - expected).max())


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    n_queries=st.integers(1, 12),
    extra_keys=st.integers(0, 40),
    dim=st.sampled_from([8, 16, 64]),
    mask_kind=st.sampled_from(["none", "causal", "bool", "additive", "bool-per-head"]),
    dtype=st.sampled_from([mx.float32, mx.float16, mx.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_attention_by_products_equals_the_kernel(
    batch, kv_heads, group, n_queries, extra_keys, dim, mask_kind, dtype, seed
):
    key = mx.random.key(seed)
    kq, kk, kv, km = mx.random.split(key, 4)
    heads, n_keys = kv_heads * group, n_queries + extra_keys
    q = mx.random.normal((batch, heads, n_queries, dim), key=kq).astype(dtype)
    k = mx.random.normal((batch, kv_heads, n_keys, dim), key=kk).astype(dtype)
    v = mx.random.normal((batch, kv_heads, n_keys, dim), key=kv).astype(dtype)
    mask = None
    if mask_kind == "causal":
        mask = "causal"
    elif mask_kind.startswith("bool"):
        shape = (batch, heads if mask_kind == "bool-per-head" else 1, n_queries, n_keys)
        mask = mx.random.bernoulli(0.7, shape, key=km)
        mask[..., -1] = True  # every query attends somewhere
    elif mask_kind == "additive":
        mask = (mx.random.normal((n_queries, n_keys), key=km) * 2).astype(dtype)
    scale = dim**-0.5
    # The reference: MLX's kernel on the same values in float32 (in half precision the kernel itself rounds
    # its scores; the products keep float32 to the end).
    wide = [a.astype(mx.float32) for a in (q, k, v)]
    wide_mask = mask.astype(mx.float32) if isinstance(mask, mx.array) and mask.dtype != mx.bool_ else mask
    expected = mx.fast.scaled_dot_product_attention(*wide, scale=scale, mask=wide_mask).astype(dtype)
    got = attention_by_products(q, k, v, scale=scale, mask=mask)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert_close(got, expected, dtype)
    # The router hands back one of the two: the products (on CUDA, a few queries) or MLX's kernel as it is.
    routed = attention(q, k, v, scale=scale, mask=mask).astype(mx.float32)
    kernel = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask).astype(mx.float32)
    assert mx.array_equal(routed, got.astype(mx.float32)) or mx.array_equal(routed, kernel)


def test_an_unknown_mask_name_is_refused():
    q = mx.zeros((1, 1, 2, 8))
    with pytest.raises(ValueError, match="unknown attention mask"):
        attention_by_products(q, q, q, scale=1.0, mask="sliding")
