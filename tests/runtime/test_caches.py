"""The cache family against naive references: plain concatenation and explicit masks computed in numpy.

Covers RotatingKVCache (sliding window, bounded memory), QuantizedKVCache (close to float attention),
ArraysCache, BatchKVCache (merge / filter / extend / extract equal per-row decoding), trimming, saving and
loading (also in a fresh interpreter), and the settings factory's warnings.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime.batch_cache import BatchKVCache, BatchQuantizedKVCache, BatchRotatingKVCache, batch_cache_like
from vlm_runtime.cache import (
    ArraysCache,
    AttentionCache,
    Cache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    quantized_attention,
)
from vlm_runtime.cache_io import load_prompt_cache, save_prompt_cache
from vlm_runtime.cache_settings import CacheSettings, make_layer_caches
from vlm_runtime.turboquant_cache import BatchTurboQuantKVCache, TurboQuantKVCache

from .toy import BOS, ToyModel

ROOT = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=15, deadline=None)
HEAD_DIM = 32  # the toy model's single head


# -- references ------------------------------------------------------------------------------------------------


def allowed_mask(n_queries: int, n_keys: int, window: int | None = None) -> np.ndarray:
    """(n_queries, n_keys): the queries are the last keys; each sees itself, earlier keys, within the window."""
    distance = np.arange(n_keys - n_queries, n_keys)[:, None] - np.arange(n_keys)[None, :]
    return (distance >= 0) & (distance < (window or n_keys + 1))


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, allowed: np.ndarray) -> np.ndarray:
    """Softmax attention in float64 with grouped kv heads; ``allowed`` broadcasts to (batch, heads, q, k)."""
    repeats = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, repeats, axis=1).astype(np.float64), np.repeat(v, repeats, axis=1).astype(np.float64)
    scores = np.where(allowed, q.astype(np.float64) @ k.swapaxes(-1, -2) * scale, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (probs / probs.sum(axis=-1, keepdims=True)) @ v


def random_qkv(rng: np.random.Generator, n: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, batch: int = 1):
    q = rng.standard_normal((batch, heads, n, dim)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, n, dim)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, n, dim)).astype(np.float32)
    return q, k, v


def attend(cache, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float = 0.25) -> np.ndarray:
    mask = cache.make_mask(q.shape[2], mx.float32)
    return np.array(cache.attend(mx.array(q), mx.array(k), mx.array(v), scale=scale, mask=mask))


def dequantized(parts: list[mx.array], bits: int, group_size: int) -> np.ndarray:
    return np.array(mx.dequantize(*parts, group_size=group_size, bits=bits))


# -- the toy model, with per-row positions ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> ToyModel:
    return ToyModel()


def forward(model: ToyModel, tokens: mx.array, cache: list) -> mx.array:
    """The toy model's cached forward, with rotary positions offset + position_delta (per row for a batch)."""
    h = model.embed(tokens)
    for proj, layer in zip(model.qkv, cache):
        q, k, v = mx.split(proj(h)[:, None], 3, axis=-1)
        start = layer.offset + layer.position_delta
        q = mx.fast.rope(q, HEAD_DIM, traditional=False, base=10000.0, scale=1.0, offset=start)
        k = mx.fast.rope(k, HEAD_DIM, traditional=False, base=10000.0, scale=1.0, offset=start)
        mask = layer.make_mask(tokens.shape[1], h.dtype)
        h = h + layer.attend(q, k, v, scale=HEAD_DIM**-0.5, mask=mask)[:, 0]
    return model.out(h)


def windowed_logits(model: ToyModel, ids: list[int], window: int | None) -> np.ndarray:
    """Full forward (no cache) with a sliding-window mask: logits of every position."""
    h = model.embed(mx.array([ids]))
    mask = mx.array(allowed_mask(len(ids), len(ids), window))
    for proj in model.qkv:
        q, k, v = mx.split(proj(h)[:, None], 3, axis=-1)
        q = mx.fast.rope(q, HEAD_DIM, traditional=False, base=10000.0, scale=1.0, offset=0)
        k = mx.fast.rope(k, HEAD_DIM, traditional=False, base=10000.0, scale=1.0, offset=0)
        h = h + mx.fast.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5, mask=mask)[:, 0]
    return np.array(model.out(h))[0]


def greedy_continue(model: ToyModel, cache: list, last_logits: mx.array, n: int) -> list[int]:
    tokens = []
    for _ in range(n):
        tokens.append(int(mx.argmax(last_logits[0, -1]).item()))
        last_logits = forward(model, mx.array([[tokens[-1]]]), cache)
    return tokens


def prompt_ids(length: int, seed: int = 0) -> list[int]:
    return [BOS] + np.random.default_rng(seed).integers(32, 127, length - 1).tolist()


def prefill_alone(model: ToyModel, ids: list[int]) -> tuple[list[KVCache], mx.array]:
    cache = model.make_cache()
    logits = forward(model, mx.array([ids]), cache)
    return cache, logits[:, -1]


def test_every_cache_type_follows_the_protocols() -> None:
    attention = [KVCache(), RotatingKVCache(4), QuantizedKVCache(), BatchKVCache([1, 0])]
    assert all(isinstance(c, AttentionCache) for c in attention)
    assert isinstance(ArraysCache(1), Cache) and not isinstance(ArraysCache(1), AttentionCache)


# -- RotatingKVCache -------------------------------------------------------------------------------------------


@FAST
@given(
    window=st.integers(1, 12),
    chunks=st.lists(st.one_of(st.just(1), st.integers(2, 15)), min_size=1, max_size=12),
    step=st.sampled_from([1, 4, 256]),
)
def test_rotating_attend_equals_window_attention(window: int, chunks: list[int], step: int) -> None:
    rng = np.random.default_rng(window)
    cache = RotatingKVCache(window)
    cache.step = step
    keys, values = np.zeros((1, 2, 0, 16), np.float32), np.zeros((1, 2, 0, 16), np.float32)
    for n in chunks:
        q, k, v = random_qkv(rng, n)
        keys, values = np.concatenate([keys, k], axis=2), np.concatenate([values, v], axis=2)
        out = attend(cache, q, k, v)
        expected = attention_reference(q, keys, values, 0.25, allowed_mask(n, keys.shape[2], window))
        np.testing.assert_allclose(out, expected, atol=2e-5)
        assert cache.offset == keys.shape[2]
        assert cache.keys.shape[2] <= window
        stored = np.array(cache.state[0])
        np.testing.assert_array_equal(stored, keys[:, :, -min(window, keys.shape[2]) :])


def test_rotating_mask_is_none_for_one_query_and_causal_while_it_fits() -> None:
    cache = RotatingKVCache(8)
    assert cache.make_mask(1, mx.float32) is None
    assert cache.make_mask(8, mx.float32) == "causal"
    mask = np.array(cache.make_mask(9, mx.float32))
    np.testing.assert_array_equal(mask, allowed_mask(9, 9, 8))


def test_rotating_memory_stays_bounded_over_a_long_generation() -> None:
    window, tokens = 64, 3000
    cache = RotatingKVCache(window)
    bound = 2 * 1 * 2 * window * HEAD_DIM * 2  # keys + values, float16
    k = mx.random.normal((1, 2, 100, HEAD_DIM)).astype(mx.float16)
    cache.update_and_fetch(k, k)
    largest = cache.nbytes
    for i in range(tokens):
        step = mx.full((1, 2, 1, HEAD_DIM), i, mx.float16)
        fetched, _ = cache.update_and_fetch(step, step)
        mx.eval(fetched)
        largest = max(largest, cache.nbytes)
    assert largest <= bound
    assert cache.offset == 100 + tokens
    kept = np.array(cache.state[0])[0, 0, :, 0]
    np.testing.assert_array_equal(kept, np.arange(tokens - window, tokens).astype(np.float16))


def test_rotating_trim_only_before_anything_is_dropped() -> None:
    rng = np.random.default_rng(1)
    cache = RotatingKVCache(10)
    q, k, v = random_qkv(rng, 7)
    attend(cache, q, k, v)
    assert cache.is_trimmable() and cache.trim(3) == 3 and cache.offset == 4
    q2, k2, v2 = random_qkv(rng, 5)
    out = attend(cache, q2, k2, v2)
    keys = np.concatenate([k[:, :, :4], k2], axis=2)
    values = np.concatenate([v[:, :, :4], v2], axis=2)
    np.testing.assert_allclose(out, attention_reference(q2, keys, values, 0.25, allowed_mask(5, 9, 10)), atol=2e-5)
    for _ in range(2):
        attend(cache, *random_qkv(rng, 1))
    assert cache.offset == 11 and not cache.is_trimmable() and cache.trim(1) == 0 and cache.offset == 11


def test_rotating_greedy_decode_equals_windowed_full_forward(model: ToyModel) -> None:
    window, ids = 6, prompt_ids(9)
    cache = [RotatingKVCache(window) for _ in model.qkv]
    logits = forward(model, mx.array([ids[:4]]), cache)
    logits = forward(model, mx.array([ids[4:]]), cache)  # a chunk that pushes tokens out of the window
    tokens = greedy_continue(model, cache, logits, 10)
    for i, token in enumerate(tokens):
        reference = windowed_logits(model, ids + tokens[:i], window)[-1]
        assert token == int(reference.argmax())


# -- QuantizedKVCache ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "mean_error"), [(8, 0.01), (4, 0.1)])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantized_attend_close_to_float_attention(bits: int, group_size: int, mean_error: float) -> None:
    rng = np.random.default_rng(bits + group_size)
    cache = QuantizedKVCache(bits, group_size)
    cache.step = 8
    keys, values = np.zeros((1, 2, 0, 128), np.float32), np.zeros((1, 2, 0, 128), np.float32)
    scale = 128**-0.5
    for n in [5, 1, 1, 12, 1]:
        q, k, v = random_qkv(rng, n, dim=128)
        keys, values = np.concatenate([keys, k], axis=2), np.concatenate([values, v], axis=2)
        out = attend(cache, q, k, v, scale=scale)
        allowed = allowed_mask(n, keys.shape[2])
        # Exact against the stored (dequantized) keys and values: the attention itself adds no error ...
        stored = cache.state
        k_stored, v_stored = dequantized(stored[:3], bits, group_size), dequantized(stored[3:], bits, group_size)
        np.testing.assert_allclose(out, attention_reference(q, k_stored, v_stored, scale, allowed), atol=1e-4)
        # ... and close to float attention, as close as the bit width allows.
        error = np.abs(out - attention_reference(q, keys, values, scale, allowed))
        assert error.mean() < mean_error and error.max() < 20 * mean_error
    assert cache.offset == keys.shape[2]


@pytest.mark.parametrize("mask_kind", ["boolean", "additive", "per_head"])
def test_quantized_attention_takes_mask_arrays(mask_kind: str) -> None:
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 6, heads=6, kv_heads=2, dim=64, batch=2)
    allowed = rng.random((2, 6 if mask_kind == "per_head" else 1, 6, 6)) < 0.7
    allowed[..., 0] = True  # every query sees some key
    mask = mx.array(allowed)
    if mask_kind == "additive":
        mask = mx.where(mask, 0.0, mx.finfo(mx.float32).min)
    kq, vq = mx.quantize(mx.array(k), 64, 8), mx.quantize(mx.array(v), 64, 8)
    out = quantized_attention(mx.array(q), kq, vq, scale=0.125, mask=mask, bits=8, group_size=64)
    expected = attention_reference(q, dequantized(kq, 8, 64), dequantized(vq, 8, 64), 0.125, allowed)
    np.testing.assert_allclose(np.array(out), expected, atol=1e-4)


@pytest.mark.parametrize(("bits", "group_size", "match"), [(3, 64, "bits"), (8, 16, "group_size"), (2, 32, "bits")])
def test_quantized_rejects_unsupported_settings(bits: int, group_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(bits, group_size)


def test_quantized_keeps_float_where_head_dim_does_not_split_into_groups() -> None:
    rng = np.random.default_rng(4)
    cache, plain = QuantizedKVCache(4, 64), KVCache()
    q, k, v = random_qkv(rng, 5, dim=48)
    with pytest.warns(UserWarning, match="not a multiple of group size 64"):
        out = attend(cache, q, k, v)
    np.testing.assert_array_equal(out, attend(plain, q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per cache: later updates say nothing
        attend(cache, *random_qkv(rng, 1, dim=48))
    assert len(cache.state) == 2 and cache.offset == 6
    assert cache.trim(2) == 2 and cache.offset == 4 and cache.state[0].shape[2] == 4


def test_quantized_memory_is_a_fraction_of_float() -> None:
    k = mx.random.normal((1, 2, 512, 128)).astype(mx.bfloat16)
    plain, eight, four = KVCache(), QuantizedKVCache(8, 64), QuantizedKVCache(4, 64)
    for cache in (plain, eight, four):
        cache.update_and_fetch(k, k)
    assert eight.nbytes / plain.nbytes == pytest.approx(0.5 + 2 * 2 / 64 / 2)  # codes + bf16 scale, bias
    assert four.nbytes / plain.nbytes == pytest.approx(0.25 + 2 * 2 / 64 / 2)


# -- trimming --------------------------------------------------------------------------------------------------


def fresh(kind: str):
    return {
        "kv": KVCache,
        "rotating": lambda: RotatingKVCache(64),
        "quantized": lambda: QuantizedKVCache(8, 32),
        "batch": lambda: BatchKVCache([0]),
    }[kind]()


@FAST
@given(
    kind=st.sampled_from(["kv", "rotating", "quantized", "batch"]),
    before=st.integers(1, 20),
    dropped=st.integers(0, 25),
    after=st.integers(1, 6),
)
def test_trim_then_continue_equals_never_having_seen_the_trimmed_tokens(
    kind: str, before: int, dropped: int, after: int
) -> None:
    rng = np.random.default_rng(before)
    q, k, v = random_qkv(rng, before, dim=32)
    trimmed, clean = fresh(kind), fresh(kind)
    attend(trimmed, q, k, v)
    assert trimmed.is_trimmable()
    n_dropped = trimmed.trim(dropped)
    kept = before - n_dropped
    assert n_dropped == min(dropped, before) and trimmed.offset == kept
    if kept:
        attend(clean, q[:, :, :kept], k[:, :, :kept], v[:, :, :kept])
    q2, k2, v2 = random_qkv(rng, after, dim=32)
    np.testing.assert_allclose(attend(trimmed, q2, k2, v2), attend(clean, q2, k2, v2), atol=1e-6)


# -- ArraysCache -----------------------------------------------------------------------------------------------


def test_arrays_cache_slots_offset_and_state() -> None:
    cache = ArraysCache(3)
    assert len(cache) == 3 and cache[0] is None and cache.state == [] and cache.nbytes == 0
    cache[0], cache[2] = mx.ones((1, 4, 8)), mx.zeros((1, 16), mx.float16)
    cache.advance(5)
    assert cache.offset == 5 and cache.nbytes == 4 * 32 + 2 * 16
    assert not cache.is_trimmable() and cache.trim(2) == 0 and cache.offset == 5
    rebuilt = ArraysCache.from_state(cache.state, cache.meta_state)
    assert rebuilt[1] is None and rebuilt.offset == 5
    np.testing.assert_array_equal(np.array(rebuilt[0]), np.ones((1, 4, 8)))
    np.testing.assert_array_equal(np.array(rebuilt[2]), np.zeros((1, 16)))


# -- BatchKVCache ----------------------------------------------------------------------------------------------


def decode_rows_alone(model: ToyModel, caches: list[list], logits: list[mx.array], steps: int):
    """Greedy-decode each row with its own cache: the tokens fed and the logits after each step, per row."""
    fed, seen = [[] for _ in caches], [[] for _ in caches]
    for row, cache in enumerate(caches):
        last = logits[row]
        for _ in range(steps):
            token = int(mx.argmax(last[0]).item())
            fed[row].append(token)
            last = forward(model, mx.array([[token]]), cache)[:, -1]
            seen[row].append(np.array(last[0]))
    return fed, seen


def decode_batch(model: ToyModel, cache: list, fed: list[list[int]], start: int, steps: int) -> list[list]:
    seen = [[] for _ in fed]
    for s in range(start, start + steps):
        logits = forward(model, mx.array([[row[s]] for row in fed]), cache)[:, -1]
        for row in range(len(fed)):
            seen[row].append(np.array(logits[row]))
    return seen


@FAST
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), steps=st.integers(1, 4))
def test_merged_batch_decodes_like_each_row_alone(model: ToyModel, lengths: list[int], steps: int) -> None:
    prompts = [prompt_ids(n, seed=i) for i, n in enumerate(lengths)]
    alone = [prefill_alone(model, ids) for ids in prompts]
    merged = [BatchKVCache.merge([c[layer] for c, _ in alone]) for layer in range(len(model.qkv))]
    assert merged[0].offset == max(lengths)
    assert merged[0].padding == [max(lengths) - n for n in lengths]
    # merge copied the rows, so the single caches decode on independently.
    fed, expected = decode_rows_alone(model, [c for c, _ in alone], [logits for _, logits in alone], steps)
    got = decode_batch(model, merged, fed, 0, steps)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4)


def test_left_padded_prefill_equals_rows_alone(model: ToyModel) -> None:
    prompts = [prompt_ids(7, seed=1), prompt_ids(3, seed=2), prompt_ids(5, seed=3)]
    padding = [7 - len(p) for p in prompts]
    tokens = mx.array([[0] * pad + ids for pad, ids in zip(padding, prompts)])
    cache = [BatchKVCache(padding) for _ in model.qkv]
    logits = forward(model, tokens, cache)[:, -1]
    assert not np.isnan(np.array(logits)).any()  # padded query rows see no key, yet stay finite
    alone = [prefill_alone(model, ids) for ids in prompts]
    np.testing.assert_allclose(np.array(logits), np.array(mx.concatenate([l for _, l in alone])), atol=1e-4)
    fed, expected = decode_rows_alone(model, [c for c, _ in alone], [l for _, l in alone], 3)
    np.testing.assert_allclose(np.array(decode_batch(model, cache, fed, 0, 3)), np.array(expected), atol=1e-4)


def test_decode_mask_hides_padding_for_a_single_query() -> None:
    cache = BatchKVCache([2, 0])
    cache.update_and_fetch(mx.zeros((2, 1, 4, 8)), mx.zeros((2, 1, 4, 8)))
    mask = np.array(cache.make_mask(1, mx.float32))
    assert mask.shape == (2, 1, 1, 5)
    assert (mask[0, 0, 0, :2] == np.finfo(np.float32).min).all() and (mask[0, 0, 0, 2:] == 0).all()
    assert (mask[1] == 0).all()


def test_filter_extend_and_extract_keep_rows_unchanged(model: ToyModel) -> None:
    prompts = [prompt_ids(9, seed=5), prompt_ids(3, seed=6), prompt_ids(5, seed=7)]
    alone = [prefill_alone(model, ids) for ids in prompts]
    batch = [BatchKVCache.merge([c[layer] for c, _ in alone]) for layer in range(len(model.qkv))]
    references = [prefill_alone(model, ids) for ids in prompts]
    fed, expected = decode_rows_alone(model, [c for c, _ in references], [l for _, l in references], 6)
    np.testing.assert_allclose(np.array(decode_batch(model, batch, fed, 0, 2)), np.array(expected)[:, :2], atol=1e-4)

    # The longest row finishes: its columns of padding-only history go, the others decode on unchanged.
    for layer in batch:
        layer.filter([2, 1])
    assert batch[0].offset == 5 + 2 and batch[0].padding == [0, 2] and batch[0].keys.shape[0] == 2
    got = decode_batch(model, batch, [fed[2], fed[1]], 2, 2)
    np.testing.assert_allclose(np.array(got), np.array(expected)[[2, 1], 2:4], atol=1e-4)

    # A new request, prefilled alone, joins between decode steps (here longer than the running rows).
    newcomer_ids = prompt_ids(12, seed=8)
    newcomer, newcomer_logits = prefill_alone(model, newcomer_ids)
    for running, layer in zip(batch, newcomer):
        running.extend(BatchKVCache.merge([layer]))
    assert batch[0].padding == [3, 5, 0] and batch[0].offset == 12
    new_fed, new_expected = decode_rows_alone(model, [prefill_alone(model, newcomer_ids)[0]], [newcomer_logits], 2)
    got = decode_batch(model, batch, [fed[2][4:], fed[1][4:], new_fed[0]], 0, 2)
    np.testing.assert_allclose(np.array(got[:2]), np.array(expected)[[2, 1], 4:6], atol=1e-4)
    np.testing.assert_allclose(np.array(got[2]), np.array(new_expected[0]), atol=1e-4)

    # A row taken out of the batch continues alone, as if it had never been batched.
    single = [layer.extract(1) for layer in batch]
    assert isinstance(single[0].position_delta, int) and single[0].offset == 3 + 6
    reference, _ = prefill_alone(model, prompts[1])
    for token in fed[1]:
        forward(model, mx.array([[token]]), reference)
    token = mx.array([[7]])
    np.testing.assert_allclose(
        np.array(forward(model, token, single)), np.array(forward(model, token, reference)), atol=1e-4
    )


# The single kinds a batch can hold, and the batched kind each becomes. A window of 5 is shorter than most
# prompts here, so windows slide during prefill and decode.
BATCHABLE = {
    "plain": (KVCache, BatchKVCache),
    "rotating": (lambda: RotatingKVCache(5), BatchRotatingKVCache),
    "quantized": (lambda: QuantizedKVCache(8, 32), BatchQuantizedKVCache),
    "turboquant": (lambda: TurboQuantKVCache(3, 4), BatchTurboQuantKVCache),
}


def prefill_kind(model: ToyModel, ids: list[int], kind: str) -> tuple[list, mx.array]:
    make, _ = BATCHABLE[kind]
    cache = [make() for _ in model.qkv]
    return cache, forward(model, mx.array([ids]), cache)[:, -1]


@contextlib.contextmanager
def small_step():
    """Drop stale sliding-window columns every 3 tokens instead of every 256, so tests see it happen."""
    saved = BatchRotatingKVCache.step
    BatchRotatingKVCache.step = 3
    try:
        yield
    finally:
        BatchRotatingKVCache.step = saved


@FAST
@given(
    kind=st.sampled_from(sorted(BATCHABLE)),
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    steps=st.integers(1, 8),
)
def test_each_batched_kind_decodes_like_each_row_alone(
    model: ToyModel, kind: str, lengths: list[int], steps: int
) -> None:
    """Merge single caches of one kind, decode, let the first row leave, decode on: every row's logits equal
    its own cache's, step by step."""
    with small_step():
        _decode_merged_and_filtered(model, kind, lengths, steps)


def _decode_merged_and_filtered(model: ToyModel, kind: str, lengths: list[int], steps: int) -> None:
    prompts = [prompt_ids(n, seed=i) for i, n in enumerate(lengths)]
    alone = [prefill_kind(model, ids, kind) for ids in prompts]
    merged = [BatchKVCache.merge([c[layer] for c, _ in alone]) for layer in range(len(model.qkv))]
    assert type(merged[0]) is BATCHABLE[kind][1]
    after = 3
    fed, expected = decode_rows_alone(model, [c for c, _ in alone], [l for _, l in alone], steps + after)
    got = decode_batch(model, merged, fed, 0, steps)
    np.testing.assert_allclose(np.array(got), np.array(expected)[:, :steps], atol=1e-4)
    if len(prompts) > 1:
        keep = list(range(1, len(prompts)))
        for layer in merged:
            layer.filter(keep)
        got = decode_batch(model, merged, [fed[r] for r in keep], steps, after)
        np.testing.assert_allclose(np.array(got), np.array(expected)[keep, steps:], atol=1e-4)
    if kind == "rotating":
        # Memory stays bounded: stale columns are dropped once step of them have piled up.
        assert merged[0].keys.shape[2] <= merged[0].max_size + 2 * BatchRotatingKVCache.step


@pytest.mark.parametrize("kind", sorted(BATCHABLE))
def test_left_padded_prefill_of_each_kind_equals_rows_alone(model: ToyModel, kind: str) -> None:
    with small_step():
        _left_padded_prefill(model, kind)


def _left_padded_prefill(model: ToyModel, kind: str) -> None:
    prompts = [prompt_ids(9, seed=1), prompt_ids(3, seed=2), prompt_ids(6, seed=3)]
    padding = [9 - len(p) for p in prompts]
    tokens = mx.array([[0] * pad + ids for pad, ids in zip(padding, prompts)])
    make, batched = BATCHABLE[kind]
    cache = [batch_cache_like(make(), padding) for _ in model.qkv]
    assert type(cache[0]) is batched
    logits = forward(model, tokens, cache)[:, -1]
    alone = [prefill_kind(model, ids, kind) for ids in prompts]
    np.testing.assert_allclose(np.array(logits), np.array(mx.concatenate([l for _, l in alone])), atol=1e-4)
    fed, expected = decode_rows_alone(model, [c for c, _ in alone], [l for _, l in alone], 7)
    np.testing.assert_allclose(np.array(decode_batch(model, cache, fed, 0, 7)), np.array(expected), atol=1e-4)


def test_merge_refuses_mixed_kinds_and_unbatchable_layers() -> None:
    plain, window = KVCache(), RotatingKVCache(4)
    for layer in (plain, window):
        layer.update_and_fetch(mx.zeros((1, 1, 3, 32)), mx.zeros((1, 1, 3, 32)))
    with pytest.raises(ValueError, match="different kinds"):
        BatchKVCache.merge([plain, window])
    with pytest.raises(TypeError, match="cannot be batched"):
        batch_cache_like(ArraysCache(1), [0])


def test_merge_rejects_mismatched_or_empty_caches() -> None:
    a, b = KVCache(), KVCache()
    a.update_and_fetch(mx.zeros((1, 2, 3, 8)), mx.zeros((1, 2, 3, 8)))
    b.update_and_fetch(mx.zeros((1, 1, 3, 8)), mx.zeros((1, 1, 3, 8)))
    with pytest.raises(ValueError, match="disagree"):
        BatchKVCache.merge([a, b])
    with pytest.raises(ValueError, match="empty"):
        BatchKVCache.merge([a, KVCache()])


# -- saving and loading ----------------------------------------------------------------------------------------


def filled(kind: str) -> object:
    """A cache of each type with content, a few tokens into decoding, with a non-trivial position delta."""
    rng = np.random.default_rng(11)
    cache = {
        "kv": KVCache(),
        "rotating": RotatingKVCache(6),
        "quantized8": QuantizedKVCache(8, 32),
        "quantized4": QuantizedKVCache(4, 32),
        "quantized_float": QuantizedKVCache(8, 64),
        "batch": BatchKVCache([3, 0]),
        "batch_rotating": BatchRotatingKVCache([3, 0], 6),
        "batch_quantized": BatchQuantizedKVCache([3, 0], 8, 32),
        "batch_quantized_float": BatchQuantizedKVCache([3, 0], 8, 64),
        "turboquant": TurboQuantKVCache(3, 4),
        "batch_turboquant": BatchTurboQuantKVCache([3, 0], 2.5, 3.5, seed=7),
        "empty": KVCache(),
    }[kind]
    if kind == "empty":
        return cache
    batch = 2 if kind.startswith("batch") else 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized_float's fallback warning
        for n in (5, 1, 1, 1):
            attend(cache, *random_qkv(rng, n, dim=32, batch=batch))
    cache.position_delta = mx.array([-3, 0]) if kind.startswith("batch") else -2
    return cache


SAVEABLE = [
    "kv",
    "rotating",
    "quantized8",
    "quantized4",
    "quantized_float",
    "batch",
    "batch_rotating",
    "batch_quantized",
    "batch_quantized_float",
    "turboquant",
    "batch_turboquant",
    "empty",
]


def test_save_load_round_trips_every_type(tmp_path: Path) -> None:
    originals = [filled(kind) for kind in SAVEABLE]
    arrays = ArraysCache(2)
    arrays[1] = mx.arange(6).reshape(2, 3)
    arrays.advance(4)
    originals.append(arrays)
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(path, originals, {"model": "toy", "note": "ünïcode"})
    loaded, metadata = load_prompt_cache(path)
    assert metadata == {"model": "toy", "note": "ünïcode"}
    assert [type(c) for c in loaded] == [type(c) for c in originals]
    for before, after in zip(originals, loaded):
        assert after.offset == before.offset and after.meta_state == before.meta_state
        assert len(after.state) == len(before.state)
        for a, b in zip(before.state, after.state):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.array(a), np.array(b))
        np.testing.assert_array_equal(np.array(after.position_delta), np.array(before.position_delta))
        assert isinstance(after.position_delta, int) == isinstance(before.position_delta, int)
    rng = np.random.default_rng(12)
    for kind, before, after in zip(SAVEABLE, originals, loaded):
        qkv = random_qkv(rng, 3, dim=32, batch=2 if kind.startswith("batch") else 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.testing.assert_array_equal(attend(after, *qkv), attend(before, *qkv))


def test_loaded_cache_continues_in_a_fresh_interpreter(model: ToyModel, tmp_path: Path) -> None:
    """Save after a prompt, load in a new process, decode greedily: the same tokens as continuing here."""
    kinds = {
        "kv": KVCache,
        "rotating": lambda: RotatingKVCache(8),
        "quantized8": lambda: QuantizedKVCache(8, 32),
        "quantized4": lambda: QuantizedKVCache(4, 32),
    }
    ids, expected = prompt_ids(13, seed=9), {}
    for name, make in kinds.items():
        cache = [make() for _ in model.qkv]
        logits = forward(model, mx.array([ids]), cache)
        last = json.dumps(np.array(logits[0, -1]).tolist())
        save_prompt_cache(tmp_path / f"{name}.safetensors", cache, {"logits": last})
        expected[name] = greedy_continue(model, cache, logits, 8)
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
import mlx.core as mx
from tests.runtime.test_caches import ToyModel, forward, greedy_continue
from vlm_runtime.cache_io import load_prompt_cache
model, out = ToyModel(), {{}}
for name in {list(kinds)!r}:
    cache, meta = load_prompt_cache({str(tmp_path)!r} + "/" + name + ".safetensors")
    out[name] = greedy_continue(model, cache, mx.array([[json.loads(meta["logits"])]]), 8)
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_load_rejects_files_that_are_not_prompt_caches(tmp_path: Path) -> None:
    plain = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(plain), {"w": mx.zeros(3)})
    with pytest.raises(ValueError, match="not a prompt cache"):
        load_prompt_cache(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="cannot read"):
        load_prompt_cache(garbage)
    with pytest.raises(ValueError, match="cannot read"):
        load_prompt_cache(tmp_path / "missing.safetensors")


def test_save_refuses_unknown_classes_bad_metadata_and_other_suffixes(tmp_path: Path) -> None:
    class HomeMadeCache(KVCache):
        pass

    with pytest.raises(TypeError, match="not a registered cache class"):
        save_prompt_cache(tmp_path / "a.safetensors", [HomeMadeCache()])
    with pytest.raises(TypeError, match="str to str"):
        save_prompt_cache(tmp_path / "b.safetensors", [KVCache()], {"n": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="suffix"):
        save_prompt_cache(tmp_path / "c.cache", [KVCache()])


# -- settings and the factory ----------------------------------------------------------------------------------


class MixedLayoutModel:
    """A model whose layers are not all plain attention: recurrent, local (small window), wide window."""

    def make_cache(self) -> list:
        return [KVCache(), ArraysCache(2), RotatingKVCache(4), RotatingKVCache(1024), KVCache()]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_kv_size": 0}, "max_kv_size"),
        ({"kv_bits": 3}, "kv_bits"),
        ({"kv_bits": 8, "kv_group_size": 48}, "kv_group_size"),
        ({"max_kv_size": 128, "kv_bits": 8}, "choose one"),
        ({"kv_bits": 3.5}, "turboquant"),
        ({"kv_bits": 8, "kv_quant_scheme": "turboquant"}, "kv_bits"),
        ({"kv_bits": 4.5, "kv_quant_scheme": "turboquant"}, "kv_bits"),
        ({"kv_key_bits": 3, "kv_quant_scheme": "turboquant"}, "both"),
        ({"kv_key_bits": 3}, "need kv_quant_scheme"),
        ({"kv_bits": 3, "kv_value_bits": 5, "kv_quant_scheme": "turboquant"}, "kv_value_bits"),
        ({"kv_bits": 4, "kv_quant_scheme": "nf4"}, "kv_quant_scheme"),
        ({"max_kv_size": 128, "kv_bits": 3, "kv_quant_scheme": "turboquant"}, "choose one"),
    ],
)
def test_cache_settings_validate(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CacheSettings(**options)


def test_factory_converts_plain_layers_silently(model: ToyModel) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [type(c) for c in make_layer_caches(model, CacheSettings())] == [KVCache, KVCache]
        rotating = make_layer_caches(model, CacheSettings(max_kv_size=32))
        quantized = make_layer_caches(model, CacheSettings(kv_bits=4, kv_group_size=32))
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 32 for c in rotating)
    assert all(isinstance(c, QuantizedKVCache) and (c.bits, c.group_size) == (4, 32) for c in quantized)


def test_factory_warns_once_about_layers_that_keep_their_cache() -> None:
    with pytest.warns(UserWarning) as record:
        cache = make_layer_caches(MixedLayoutModel(), CacheSettings(max_kv_size=64))
    assert len(record) == 1 and "1 ArraysCache" in str(record[0].message)
    assert "max_kv_size=64" in str(record[0].message)
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache", "ArraysCache", "RotatingKVCache"] + [
        "RotatingKVCache"
    ] * 2
    assert [c.max_size for c in cache if isinstance(c, RotatingKVCache)] == [64, 4, 64, 64]

    with pytest.warns(UserWarning) as record:
        cache = make_layer_caches(MixedLayoutModel(), CacheSettings(kv_bits=8))
    assert len(record) == 1
    assert "1 ArraysCache, 2 RotatingKVCache" in str(record[0].message) and "kv_bits=8" in str(record[0].message)
    assert [type(c).__name__ for c in cache].count("QuantizedKVCache") == 2
