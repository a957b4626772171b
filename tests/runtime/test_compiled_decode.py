"""The compiled decode step gives exactly the tokens of the step built anew each time: plain and sliding-window
caches, prompts of any length, a ring that wraps many times, a reused prompt cache, and models it cannot
serve (they fall back, with one warning)."""

from __future__ import annotations

import warnings

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime import KVCache, PromptCache, stream_generate
from vlm_runtime.compiled_decode import StaticKVCache, StaticRingKVCache, compiled_decode

from .toy import ByteProcessor, ToyModel

MODEL = ToyModel(layers=2, seed=3)
PROCESSOR = ByteProcessor()


def tokens(prompt: str, **options) -> list[int]:
    return [r.token for r in stream_generate(MODEL, PROCESSOR, prompt, ignore_eos=True, **options)]


@settings(max_examples=12, deadline=None)
@given(
    prompt=st.text(alphabet="abcdefgh xyz", min_size=1, max_size=40),
    max_tokens=st.integers(2, 40),
    window=st.sampled_from([None, 5, 9, 16]),
)
def test_compiled_tokens_equal_the_plain_step(prompt: str, max_tokens: int, window: int | None) -> None:
    """Windows shorter than prompt + answer make the ring wrap; longer ones never fill it."""
    options = dict(max_tokens=max_tokens, max_kv_size=window)
    assert tokens(prompt, compile_decode=True, **options) == tokens(prompt, compile_decode=False, **options)


def test_a_prompt_cache_gets_the_decoded_tokens_back() -> None:
    """Turn two reuses what turn one decoded through the static caches; same tokens as without compiling."""
    answers = {}
    for compiled in (True, False):
        cache = PromptCache()
        first = tokens("hello there", max_tokens=12, compile_decode=compiled, prompt_cache=cache)
        follow = "hello there" + PROCESSOR.decode(first) + " and more"
        results = list(stream_generate(MODEL, PROCESSOR, follow, max_tokens=8, ignore_eos=True, prompt_cache=cache))
        answers[compiled] = (first, [r.token for r in results], results[-1].cached_tokens)
    assert answers[True] == answers[False]
    assert answers[True][2] > len("hello there")  # the decoded tokens were reused, not recomputed


def test_static_twins_write_where_the_plain_caches_would() -> None:
    layer = KVCache()
    keys = mx.random.normal((1, 2, 5, 4))
    layer.update_and_fetch(keys, keys + 1)
    static = StaticKVCache.of(layer, 16)
    new = mx.ones((1, 2, 1, 4))
    mask = static.make_mask(1, mx.float32)
    stored, _ = static.update_and_fetch(new, new)
    assert mask.tolist() == [True] * 6 + [False] * 10
    assert mx.array_equal(stored[:, :, :5], keys) and mx.array_equal(stored[:, :, 5:6], new)
    assert int(static.offset.item()) == 6
    static.write_back(layer)
    assert layer.offset == 6 and mx.array_equal(layer.state[0][:, :, 5:6], new)


def test_the_ring_holds_exactly_the_window() -> None:
    from vlm_runtime import RotatingKVCache

    layer = RotatingKVCache(4)
    seen = mx.arange(7, dtype=mx.float32).reshape(1, 1, 7, 1)
    layer.update_and_fetch(seen, seen)
    ring = StaticRingKVCache.of(layer, 1024)
    assert ring.capacity == 4
    stored, _ = ring.update_and_fetch(mx.full((1, 1, 1, 1), 7.0), mx.full((1, 1, 1, 1), 7.0))
    assert sorted(stored.reshape(-1).tolist()) == [4.0, 5.0, 6.0, 7.0]  # positions 4..7, the last four
    ring.write_back(layer)
    assert layer.state[0].reshape(-1).tolist() == [4.0, 5.0, 6.0, 7.0]  # oldest first again


def test_kinds_without_a_static_twin_decode_uncompiled() -> None:
    """Quantized keys have no static twin: no compiled step, and generation runs as before."""
    cache = MODEL.make_cache()
    assert compiled_decode(MODEL, [object()] * len(cache), 64) is None
    quantized = dict(max_tokens=6, kv_bits=8, kv_group_size=32)
    assert tokens("abc", compile_decode=True, **quantized) == tokens("abc", compile_decode=False, **quantized)


class ReadsItsCacheAnotherWay(ToyModel):
    """A model that asks its caches for something the static twins do not have."""

    def hidden_states(self, inputs_embeds, *, cache, **kw):
        if cache and inputs_embeds.shape[1] == 1:
            cache[0].keys  # noqa: B018 -- only plain caches have it
        return super().hidden_states(inputs_embeds, cache=cache, **kw)


def test_a_model_the_static_caches_cannot_serve_falls_back_with_a_warning() -> None:
    model = ReadsItsCacheAnotherWay(layers=2, seed=3)
    plain = [
        r.token for r in stream_generate(model, PROCESSOR, "xy", max_tokens=6, ignore_eos=True, compile_decode=False)
    ]
    with pytest.warns(UserWarning, match="without a compiled step"):
        first = [r.token for r in stream_generate(model, PROCESSOR, "xy", max_tokens=6, ignore_eos=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        again = [r.token for r in stream_generate(model, PROCESSOR, "xy", max_tokens=6, ignore_eos=True)]
    assert first == plain == again


def test_buffers_grow_a_bucket_at_a_time(monkeypatch) -> None:
    """A long allowance does not size the buffers up front: they hold at most one bucket more than the tokens
    so far, are replaced by larger ones as decoding goes on, and the tokens stay those of the plain step."""
    import importlib

    module = importlib.import_module("vlm_runtime.compiled_decode")
    generation = importlib.import_module("vlm_runtime.generate")  # the module, not the function of that name

    monkeypatch.setattr(module, "CAPACITY_STEP", 8)
    monkeypatch.setattr(generation, "CAPACITY_STEP", 8)
    sizes = []

    def recording(model, caches, capacity):
        decoder = module.compiled_decode(model, caches, capacity)
        sizes.append((caches[0].offset, decoder.room))
        return decoder

    monkeypatch.setattr(generation, "compiled_decode", recording)
    compiled = tokens("abcdef", max_tokens=30, compile_decode=True)
    assert compiled == tokens("abcdef", max_tokens=30, compile_decode=False)
    assert len(sizes) >= 3  # 6 prompt tokens + 29 decode steps through buckets of 8
    # Never more slots than the next bucket boundary past the tokens held plus one bucket.
    assert all(0 < room and offset + room <= -(-(offset + 8) // 8) * 8 for offset, room in sizes)
    assert [offset for offset, _ in sizes] == sorted(offset for offset, _ in sizes)
