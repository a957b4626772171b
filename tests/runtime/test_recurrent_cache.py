"""The recurrent-state caches (vlm_runtime.recurrent_cache): their rows are batched, filtered, merged and extracted
with exactly the bookkeeping of the key/value batch caches beside them (offset, padding, per-row positions), the
state rows travel with their requests, padding columns are masked, and the caches save, load and refuse to trim."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_runtime import BatchKVCache, BatchRecurrentCache, KVCache, RecurrentCache, load_prompt_cache, save_prompt_cache
from vlm_runtime.batch_cache import batch_cache_like, can_batch, merge_caches
from vlm_runtime.cache import Cache
from vlm_runtime.recurrent_cache import SNAPSHOT_MARGIN


def filled(offset: int, rows: int, tag: float, delta: int = 0) -> tuple[RecurrentCache, KVCache]:
    """A recurrent and a KV cache that have seen ``offset`` tokens of ``rows`` requests; states tagged per row."""
    recurrent, kv = RecurrentCache(), KVCache()
    tags = mx.arange(rows, dtype=mx.float32)[:, None, None] + tag
    recurrent.update(mx.broadcast_to(tags, (rows, 3, 4)), mx.broadcast_to(tags[..., None], (rows, 2, 4, 3)), offset)
    kv.update_and_fetch(mx.zeros((rows, 1, offset, 4)), mx.zeros((rows, 1, offset, 4)))
    recurrent.position_delta = kv.position_delta = delta
    return recurrent, kv


def row_tags(cache: RecurrentCache) -> list[float]:
    return np.array(cache.recurrent_state[:, 0, 0, 0]).tolist()


def same_bookkeeping(recurrent: BatchRecurrentCache, kv: BatchKVCache) -> None:
    assert recurrent.offset == kv.offset
    assert recurrent.padding == kv.padding
    np.testing.assert_array_equal(np.array(recurrent.position_delta), np.array(kv.position_delta))


@settings(max_examples=40, deadline=None)
@given(
    offsets=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    deltas=st.lists(st.integers(-5, 5), min_size=4, max_size=4),
    later=st.integers(1, 30),
    keep=st.data(),
)
def test_rows_move_as_the_kv_rows_do(offsets: list[int], deltas: list[int], later: int, keep) -> None:
    """Merge requests of different lengths, decode a step, let a request join, drop some rows, extract one: the
    recurrent cache agrees with a BatchKVCache treated alike, and each row's state is its request's."""
    pairs = [filled(n, 1, float(i), deltas[i]) for i, n in enumerate(offsets)]
    recurrent = merge_caches([r for r, _ in pairs])
    kv = merge_caches([k for _, k in pairs])
    assert isinstance(recurrent, BatchRecurrentCache) and isinstance(kv, BatchKVCache)
    same_bookkeeping(recurrent, kv)
    assert row_tags(recurrent) == [float(i) for i in range(len(offsets))]
    # One decode step.
    recurrent.update(recurrent.conv_state, recurrent.recurrent_state, 1)
    kv.update_and_fetch(mx.zeros((len(offsets), 1, 1, 4)), mx.zeros((len(offsets), 1, 1, 4)))
    joining_r, joining_kv = filled(later, 1, 10.0)
    recurrent.extend(joining_r)
    kv.extend(joining_kv)
    same_bookkeeping(recurrent, kv)
    rows = keep.draw(st.lists(st.integers(0, len(offsets)), min_size=1, max_size=len(offsets) + 1, unique=True))
    tags = row_tags(recurrent)
    recurrent.filter(rows)
    kv.filter(rows)
    same_bookkeeping(recurrent, kv)
    assert row_tags(recurrent) == [tags[r] for r in rows]
    alone_r, alone_kv = recurrent.extract(0), kv.extract(0)
    assert alone_r.offset == alone_kv.offset and alone_r.position_delta == alone_kv.position_delta
    assert row_tags(alone_r) == [tags[rows[0]]]


def test_token_mask_marks_the_padding_columns() -> None:
    cache = BatchRecurrentCache([0, 3, 1])
    np.testing.assert_array_equal(
        np.array(cache.token_mask(4)),
        [[True] * 4, [False, False, False, True], [False, True, True, True]],
    )
    cache.update(mx.zeros((3, 3, 4)), mx.zeros((3, 2, 4, 3)), 4)
    assert cache.token_mask(1) is None  # past the padding: nothing to hide
    assert RecurrentCache().token_mask(5) is None


def test_batching_entry_points_know_recurrent_layers() -> None:
    layer = RecurrentCache()
    assert isinstance(layer, Cache) and can_batch(layer)
    assert isinstance(batch_cache_like(layer, [2, 0]), BatchRecurrentCache)
    with pytest.raises(ValueError, match="empty cache"):
        merge_caches([layer])
    recurrent, kv = filled(3, 1, 0.0)
    with pytest.raises(ValueError, match="different kinds"):
        BatchRecurrentCache.merge([recurrent, kv])


def test_save_load_and_no_rollback(tmp_path: Path) -> None:
    single, _ = filled(7, 1, 0.0, delta=-2)
    batch = merge_caches([filled(4, 1, 1.0)[0], filled(6, 1, 2.0)[0]])
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(path, [single, batch])
    (again_single, again_batch), _ = load_prompt_cache(path)
    assert type(again_single) is RecurrentCache and type(again_batch) is BatchRecurrentCache
    assert again_single.offset == 7 and again_single.position_delta == -2
    assert again_batch.padding == [2, 0] and again_batch.offset == 6
    np.testing.assert_array_equal(np.array(again_batch.recurrent_state), np.array(batch.recurrent_state))
    np.testing.assert_array_equal(np.array(again_batch.position_delta), np.array(batch.position_delta))
    assert not again_single.is_trimmable() and again_single.trim(3) == 0 and again_single.offset == 7
    assert again_single.nbytes == single.nbytes > 0


def test_a_prefill_keeps_a_state_to_go_back_to() -> None:
    """The layer hands over its state ``SNAPSHOT_MARGIN`` tokens before the end of a long enough update; the cache
    can go back exactly there (or stay), nowhere else, and a batch keeps no snapshot."""
    cache = RecurrentCache()
    assert cache.snapshot_split(SNAPSHOT_MARGIN) is None and cache.snapshot_split(40) == 40 - SNAPSHOT_MARGIN
    early = [mx.full((1, 3, 4), 1.0), mx.full((1, 2, 4, 3), 1.0)]
    cache.update(mx.full((1, 3, 4), 2.0), mx.full((1, 2, 4, 3), 2.0), 40, snapshot=early)
    cache.update(mx.full((1, 3, 4), 3.0), mx.full((1, 2, 4, 3), 3.0), 1)  # a decode step keeps the snapshot
    point = 40 - SNAPSHOT_MARGIN
    assert [cache.rewind_point(n) for n in (point - 1, point, 39, 41, 60)] == [None, point, point, 41, 41]
    assert cache.trim(3) == 0 and cache.offset == 41  # no state 3 tokens back
    assert cache.trim(41 - point) == 41 - point and cache.offset == point
    assert np.array(cache.recurrent_state).max() == 1.0
    assert BatchRecurrentCache([0, 1]).snapshot_split(100) is None
