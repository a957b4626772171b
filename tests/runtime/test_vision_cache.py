"""VisionFeatureCache: the LRU invariant against a naive reference, thread safety, and content_key."""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime.vision_cache import DEFAULT_MAX_ENTRIES, VisionFeatureCache, content_key, model_identity

FAST = settings(max_examples=60, deadline=None)

# An operation: ("get", key) or ("put", key), over a small key space so that hits, re-puts and evictions all
# happen often.
operations = st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 7)), max_size=60)


class NaiveLRU:
    """The reference: a list ordered from least to most recently used."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.items: list[tuple[str, int]] = []
        self.hits = self.misses = 0

    def get(self, key: str) -> int | None:
        for i, (k, value) in enumerate(self.items):
            if k == key:
                self.items.append(self.items.pop(i))
                self.hits += 1
                return value
        self.misses += 1
        return None

    def put(self, key: str, value: int) -> None:
        self.items = [(k, v) for k, v in self.items if k != key] + [(key, value)]
        self.items = self.items[-self.max_entries :]


@FAST
@given(max_entries=st.integers(1, 5), ops=operations)
def test_lru_matches_naive_reference(max_entries: int, ops: list[tuple[str, int]]) -> None:
    cache, reference = VisionFeatureCache(max_entries), NaiveLRU(max_entries)
    for step, (op, n) in enumerate(ops):
        key = f"image-{n}"
        if op == "put":
            # A value that names its put, so a stale entry would show.
            cache.put(key, mx.array([step]))
            reference.put(key, step)
        else:
            got, expected = cache.get(key), reference.get(key)
            assert (None if got is None else got.item()) == expected
        assert len(cache) == len(reference.items) <= max_entries
        assert (cache.hits, cache.misses) == (reference.hits, reference.misses)
    # The survivors are exactly the most recently used keys (checked without touching recency).
    for n in range(8):
        assert (f"image-{n}" in cache) == any(k == f"image-{n}" for k, _ in reference.items)


def test_most_recently_used_survives_eviction() -> None:
    cache = VisionFeatureCache(max_entries=2)
    cache.put("a", mx.array([1]))
    cache.put("b", mx.array([2]))
    assert cache.get("a") is not None  # "a" is now more recent than "b"
    cache.put("c", mx.array([3]))
    assert "a" in cache and "c" in cache and "b" not in cache
    assert (cache.hits, cache.misses) == (1, 0)


def test_default_size_and_clear() -> None:
    cache = VisionFeatureCache()
    assert cache.max_entries == DEFAULT_MAX_ENTRIES == 20
    for n in range(25):
        cache.put(str(n), mx.array([n]))
    assert len(cache) == 20 and "4" not in cache and "5" in cache
    assert cache.get("24") is not None and cache.get("0") is None
    cache.clear()
    assert len(cache) == 0 and (cache.hits, cache.misses) == (0, 0)
    assert cache.get("24") is None


@pytest.mark.parametrize("bad", [0, -3, 2.5, "20", True, None])
def test_rejects_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="max_entries >= 1"):
        VisionFeatureCache(bad)  # type: ignore[arg-type]


def test_put_stores_evaluated_features() -> None:
    cache = VisionFeatureCache()
    lazy = mx.arange(6).reshape(2, 3) * 2
    cache.put("k", lazy)
    stored = cache.get("k")
    assert stored is not None
    np.testing.assert_array_equal(np.array(stored), np.arange(6).reshape(2, 3) * 2)


def test_concurrent_use_keeps_the_invariants() -> None:
    cache = VisionFeatureCache(max_entries=4)
    gets_per_thread, threads = 300, 4
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(gets_per_thread):
                key = str(int(rng.integers(0, 10)))
                if cache.get(key) is None:
                    cache.put(key, mx.array([int(key)]))
                assert len(cache) <= 4
        except BaseException as exc:  # surfaced below: an assert in a thread would otherwise be lost
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors
    assert cache.hits + cache.misses == gets_per_thread * threads
    assert len(cache) == 4
    for n in range(10):  # every surviving entry still holds its own key's value
        if str(n) in cache:
            assert cache.get(str(n)).item() == n


def test_content_key_separates_what_differs() -> None:
    pixels = np.arange(24, dtype=np.float32).reshape(4, 6)
    base = content_key(pixels, np.array([1, 2, 2]), "model-a")
    assert base == content_key(pixels.copy(), np.array([1, 2, 2]), "model-a")  # content, not identity
    assert base == content_key(mx.array(pixels), mx.array([1, 2, 2]).astype(mx.int64), "model-a")  # by value
    different = [
        content_key(pixels + 1e-3, np.array([1, 2, 2]), "model-a"),  # pixels
        content_key(pixels.reshape(6, 4), np.array([1, 2, 2]), "model-a"),  # shape
        content_key(pixels.astype(np.float64), np.array([1, 2, 2]), "model-a"),  # dtype
        content_key(pixels, np.array([1, 2, 4]), "model-a"),  # grid
        content_key(pixels, np.array([1, 2, 2]), "model-b"),  # model
    ]
    assert len({base, *different}) == 1 + len(different)


def test_content_key_parts_are_unambiguous() -> None:
    assert content_key("ab", "c") != content_key("a", "bc")
    assert content_key(1) != content_key("1") != content_key(1.0)
    assert content_key(True) != content_key(1)
    assert content_key((1, 2), 3) != content_key(1, (2, 3))
    assert content_key(b"x") != content_key("x")


def test_content_key_hashes_mlx_arrays_by_value() -> None:
    values = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    assert content_key(mx.array(values)) == content_key(mx.array(values.copy()))
    assert content_key(mx.array(values)) != content_key(mx.array(values)[:, ::-1])
    as_bf16 = mx.array(values).astype(mx.bfloat16)  # numpy has no bfloat16: hashed through its bit patterns
    assert content_key(as_bf16) == content_key(mx.array(values).astype(mx.bfloat16))
    assert content_key(as_bf16) != content_key(as_bf16.view(mx.uint16))  # same bits, different dtype
    with pytest.raises(TypeError, match="cannot hash"):
        content_key(object())


def test_model_identity_follows_the_weights_and_parts() -> None:
    class Owner:
        pass

    owner, weights = Owner(), [mx.arange(6, dtype=mx.float32), mx.ones((2, 3))]
    key = model_identity(owner, weights, "arch", "config")
    assert key == content_key("arch", "config", weights)
    assert model_identity(owner, weights, "arch", "config") == key
    # Equal values in new arrays: the same content, so the same key.
    assert model_identity(owner, [mx.array(w) for w in weights], "arch", "config") == key
    # New values, or other parts, give another key at once.
    assert model_identity(owner, [weights[0] * 2, weights[1]], "arch", "config") != key
    assert model_identity(owner, weights, "arch", "other config") != key
    assert model_identity(owner, weights, "arch", "config") == key
