"""TurboQuantKVCache: close to float attention, one-token decode equals the prompt-chunk path, memory at 3.5 bits
within a quarter of bfloat16, the settings factory, and batches (merge / filter / extract) equal rows alone.

The generic cache tests (tests/runtime/test_caches.py) also run both TurboQuant classes through left-padded
prefill, merged decoding and save / load."""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest

from vlm_runtime.batch_cache import batch_cache_like, can_batch
from vlm_runtime.cache import KVCache, QuantizedKVCache, RotatingKVCache
from vlm_runtime.cache_settings import CacheSettings, make_layer_caches
from vlm_runtime.turboquant_cache import BatchTurboQuantKVCache, TurboQuantKVCache


def outlier_qkv(rng: np.random.Generator, n: int, *, batch: int = 1, heads: int = 4, kv_heads: int = 2, dim: int = 128):
    """Keys with a few large channels (as real keys have), values around a non-zero mean."""
    channel_scale = 1 + 8 * (rng.random(dim) < 0.04)
    q = rng.standard_normal((batch, heads, n, dim))
    k = rng.standard_normal((batch, kv_heads, n, dim)) * channel_scale
    v = rng.standard_normal((batch, kv_heads, n, dim)) + 0.3
    return tuple(mx.array(a.astype(np.float32)) for a in (q, k, v))


def cosine(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a, np.float64).ravel(), np.array(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# Measured on this data: 0.988 (4/4), 0.966 (3/4), 0.870 (2/2); affine 4-bit g64 reaches 0.972.
@pytest.mark.parametrize(("key_bits", "value_bits", "least_cosine"), [(4, 4, 0.98), (3, 4, 0.95), (2, 2, 0.85)])
def test_attention_is_close_to_float(key_bits: float, value_bits: float, least_cosine: float) -> None:
    rng = np.random.default_rng(0)
    q, k, v = outlier_qkv(rng, 300)
    scale = 128**-0.5
    cache, plain = TurboQuantKVCache(key_bits, value_bits), KVCache()
    got = cache.attend(q, k, v, scale=scale, mask="causal")
    expected = plain.attend(q, k, v, scale=scale, mask="causal")
    assert cosine(got, expected) > least_cosine
    q1, k1, v1 = outlier_qkv(rng, 1)
    assert cosine(
        cache.attend(q1, k1, v1, scale=scale, mask=None), plain.attend(q1, k1, v1, scale=scale, mask=None)
    ) > (least_cosine)


def test_four_bits_beat_affine_four_bits_on_keys_with_outlier_channels() -> None:
    rng = np.random.default_rng(0)
    q, k, v = outlier_qkv(rng, 300)
    expected = KVCache().attend(q, k, v, scale=0.1, mask="causal")
    turboquant = TurboQuantKVCache(4, 4).attend(q, k, v, scale=0.1, mask="causal")
    affine = QuantizedKVCache(4, 64).attend(q, k, v, scale=0.1, mask="causal")
    assert cosine(turboquant, expected) > cosine(affine, expected)


def test_one_token_decode_equals_the_prompt_chunk_path() -> None:
    rng = np.random.default_rng(1)
    cache = TurboQuantKVCache(3, 4)
    q, k, v = outlier_qkv(rng, 40, batch=2)
    cache.attend(q, k, v, scale=0.1, mask="causal")
    q1, k1, v1 = outlier_qkv(rng, 1, batch=2)
    decoded = cache.attend(q1, k1, v1, scale=0.1, mask=None)
    chunk = cache._attend_chunk(q1, 0.1, None)  # the same keys, through scaled_dot_product_attention
    np.testing.assert_allclose(np.array(decoded), np.array(chunk), atol=2e-5)
    assert cache.offset == 41 and cache.state[0].shape == (2, 2, 41, 12) and cache.state[1].dtype == mx.float16


def test_memory_at_three_and_a_half_bits_is_within_a_quarter_of_bfloat16() -> None:
    rng = np.random.default_rng(2)
    _, k, v = outlier_qkv(rng, 1000)
    plain, packed = KVCache(), TurboQuantKVCache(3, 4)
    plain.update_and_fetch(k.astype(mx.bfloat16), v.astype(mx.bfloat16))
    packed.update_and_fetch(k, v)
    assert packed.nbytes / plain.nbytes == pytest.approx((48 + 2 + 64 + 2) / 512)
    assert packed.nbytes <= 0.25 * plain.nbytes


def test_settings_give_three_bit_keys_and_four_bit_values_at_three_and_a_half() -> None:
    assert CacheSettings(kv_bits=3.5, kv_quant_scheme="turboquant").turboquant_bits == (3, 4)
    assert CacheSettings(kv_bits=3, kv_quant_scheme="turboquant").turboquant_bits == (3, 3)
    assert CacheSettings(kv_bits=3.5, kv_quant_scheme="turboquant", kv_key_bits=3.5).turboquant_bits == (3.5, 4)
    both = CacheSettings(kv_quant_scheme="turboquant", kv_key_bits=2, kv_value_bits=4)
    assert both.turboquant_bits == (2, 4) and not both.is_default


class WindowedModel:
    def make_cache(self) -> list:
        return [KVCache(), RotatingKVCache(8), KVCache()]


def test_factory_converts_plain_layers_and_sliding_windows_keep_theirs() -> None:
    settings = CacheSettings(kv_bits=3.5, kv_quant_scheme="turboquant")
    with pytest.warns(UserWarning) as record:
        cache = make_layer_caches(WindowedModel(), settings)
    assert [type(c) for c in cache] == [TurboQuantKVCache, RotatingKVCache, TurboQuantKVCache]
    assert (cache[0].key_bits, cache[0].value_bits) == (3, 4)
    assert len(record) == 1 and "1 RotatingKVCache" in str(record[0].message) and "turboquant" in str(record[0].message)


def test_batches_merge_filter_and_extract_like_rows_alone() -> None:
    rng = np.random.default_rng(3)
    rows = []
    for length in (7, 3, 12):
        cache = TurboQuantKVCache(2.5, 3.5, seed=5)
        cache.attend(*outlier_qkv(rng, length), scale=0.1, mask="causal")
        rows.append(cache)
    assert can_batch(rows[0]) and type(batch_cache_like(rows[0], [0])) is BatchTurboQuantKVCache
    merged = BatchTurboQuantKVCache.merge(rows)
    assert merged.padding == [5, 9, 0]
    step = [outlier_qkv(rng, 1) for _ in rows]
    q, k, v = (mx.concatenate([s[i] for s in step]) for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        together = merged.attend(q, k, v, scale=0.1, mask=merged.make_mask(1, mx.float32))
    alone = mx.concatenate([c.attend(*s, scale=0.1, mask=None) for c, s in zip(rows, step)])
    np.testing.assert_allclose(np.array(together), np.array(alone), atol=1e-5)
    merged.filter([2, 0])
    assert merged.padding == [0, 5]
    extracted = merged.extract(1)
    assert extracted.offset == rows[0].offset
    for a, b in zip(extracted.state, rows[0].state):
        np.testing.assert_array_equal(np.array(a), np.array(b))
