"""Batched caches: the rows of several requests in shared buffers, for the continuous batching engine.

Each row is left-padded to the longest; the caches carry each row's padding and rotary position, and give the
merge / filter / extend an engine needs between decode steps. ``BATCHED_TWINS`` says which batched kind holds
the rows of each single-request kind; a kind without one cannot be batched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from .cache import KVCache, QuantizedKVCache, RotatingKVCache, _meta_ints, _round_up, _with_room
from .masks import AttentionMask

__all__ = [
    "BatchKVCache",
    "BatchQuantizedKVCache",
    "BatchRotatingKVCache",
    "BATCHED_TWINS",
    "batch_cache_like",
    "can_batch",
    "merge_caches",
    "register_batched_twin",
]


def _per_row(delta: mx.array | int, batch: int) -> mx.array:
    if isinstance(delta, int):
        return mx.full((batch,), delta, mx.int32)
    return mx.broadcast_to(delta.reshape(-1).astype(mx.int32), (batch,))


class _LeftPadded:
    """Rows of a batch in shared buffers of (batch, kv_heads, columns, dim) arrays, each row left-padded to the
    longest: what ``BatchKVCache``, ``BatchRotatingKVCache`` and ``BatchQuantizedKVCache`` have in common.

    ``offset`` counts columns, padding included, and is shared by the rows; ``left_padding[b]`` columns of row
    b hold no token. ``position_delta`` is per row: a row's next rotary position is ``offset + delta[b]``,
    ``-left_padding[b]`` when each row's first real token sits at position 0.

    A continuous-batching engine prefills requests (alone, or several as one padded batch), joins them to the
    running batch with ``merge`` / ``extend`` between decode steps, and drops finished rows with ``filter``.
    """

    splits_into_blocks = False  # rows padded differently share each column
    keeps_boundary_state = False

    offset: int
    position_delta: mx.array | int
    step: int  # the stored kind's growth step (KVCache's, QuantizedKVCache's)

    def _init_padding(self, left_padding: Sequence[int]) -> None:
        self._set_padding(list(left_padding))
        self.position_delta = -self.left_padding

    def _set_padding(self, left_padding: list[int]) -> None:
        if any(p < 0 for p in left_padding):
            raise ValueError(f"left padding must be >= 0, got {left_padding}")
        self.padding = [int(p) for p in left_padding]
        """Host copy of ``left_padding``: decisions about the mask need no device sync."""
        self.left_padding = mx.array(self.padding, dtype=mx.int32)

    @property
    def batch_size(self) -> int:
        return len(self.padding)

    # -- what each kind stores
    def _parts(self) -> list[mx.array]:
        """The stored columns (``offset`` of them) of every buffer, each (batch, kv_heads, columns, dim)."""
        raise NotImplementedError

    def _store(self, parts: list[mx.array], offset: int) -> None:
        """Take ``parts`` (as ``_parts`` gives them) as the whole content, with room to grow."""
        raise NotImplementedError

    def batch_like(self, left_padding: Sequence[int]) -> _LeftPadded:
        """A new, empty batch of the same kind and settings."""
        raise NotImplementedError

    def _batch_mask(self, n_queries: int, dtype: mx.Dtype, window: int | None, **own: Any) -> AttentionMask:
        """``make_mask`` of a batch: its rows' padding (and ``window``) shape it. Rows carry no mask of their
        own (groups, key padding): the engine prefills such prompts alone, in a single-request cache."""
        if any(v is not None for k, v in own.items() if k != "window_limits_groups"):
            raise ValueError("a batched cache takes no groups or key padding: prefill such a prompt alone")
        if not any(self.padding) and (window is None or self.offset + n_queries <= window):
            return None if n_queries == 1 else "causal"
        return self._padded_mask(n_queries, dtype, window=window)

    # -- masks
    def _padded_mask(self, n_queries: int, dtype: mx.Dtype, window: int | None = None, dropped: int = 0) -> mx.array:
        """Causal, within ``window`` keys where given, and blind to each row's padding: (batch, 1, n_queries,
        n_keys), additive with a finite minimum so that a query row that is all padding averages its keys
        instead of producing NaN. ``dropped``: leading columns the next update removes before it attends."""
        offset = self.offset - dropped
        n_keys = offset + n_queries
        columns = mx.arange(n_keys)
        distance = mx.arange(offset, n_keys)[:, None] - columns[None, :]
        allowed = distance >= 0
        if window is not None:
            allowed = allowed & (distance < window)
        real = columns[None, :] >= mx.maximum(self.left_padding - dropped, 0)[:, None]
        allowed = allowed[None, None] & real[:, None, None, :]
        return mx.where(allowed, mx.array(0, dtype), mx.array(mx.finfo(dtype).min, dtype))

    # -- joining and leaving
    @classmethod
    def merge(cls, caches: Sequence[Any]) -> _LeftPadded:
        """One batch of all the rows of ``caches`` (single or batched caches of one kind), right-aligned:
        shorter rows get extra left padding, and their position delta drops by as much since the shared offset
        grows. Plain caches become a ``BatchKVCache``, sliding windows a ``BatchRotatingKVCache``, quantized
        ones a ``BatchQuantizedKVCache``."""
        if not caches:
            raise ValueError("merge needs at least one cache")
        rows = [_Rows.of(c) for c in caches]
        if any(r.parts is None for r in rows):
            raise ValueError("cannot merge an empty cache (prefill it first)")
        kinds = {r.kind for r in rows}
        if len(kinds) != 1:
            raise ValueError(f"cannot merge caches of different kinds: {sorted(map(str, kinds))}")
        shapes = {tuple((p.shape[1], p.shape[3]) for p in r.parts) for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"caches disagree on (kv_heads, dim) of their buffers: {sorted(shapes)}")
        length = max(r.length for r in rows)
        padding: list[int] = []
        deltas = []
        columns: list[list[mx.array]] = [[] for _ in rows[0].parts]
        for r in rows:
            extra = length - r.length
            for k, part in enumerate(r.parts):
                columns[k].append(mx.pad(part.astype(rows[0].parts[k].dtype), [(0, 0), (0, 0), (extra, 0), (0, 0)]))
            padding += [p + extra for p in r.padding]
            deltas.append(r.delta - extra)
        merged = rows[0].empty(padding)
        merged._store([mx.concatenate(c, axis=0) for c in columns], length)
        merged.position_delta = mx.concatenate(deltas)
        return merged

    def extend(self, other: Any) -> None:
        """Append ``other``'s rows (a batch or a single prefilled request), aligning lengths as ``merge``."""
        merged = type(self).merge([self, other])
        self._store(merged._parts(), merged.offset)
        self.position_delta = merged.position_delta
        self._set_padding(merged.padding)

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), and drop the leading columns that are padding in all of them."""
        rows = list(rows)
        if not rows:
            raise ValueError("filter needs at least one row to keep; start a new cache instead")
        index = mx.array(rows, dtype=mx.int32)
        self.position_delta = _per_row(self.position_delta, self.batch_size)[index]
        self._set_padding([self.padding[r] for r in rows])
        self._store([part[index] for part in self._parts()], self.offset)
        self._drop_leading(min(self.padding))

    def can_trim_rows(self) -> bool:
        """Whether ``trim_rows`` can take tokens back (speculative decoding in the batching engine)."""
        return True

    def trim_rows(self, dropped: Sequence[int]) -> None:
        """Drop the last ``dropped[b]`` tokens of each row b: rows that verified proposals they did not keep.

        The rows stay right-aligned to one shared offset: all drop the fewest, then a row that drops more moves
        right by the difference (its padding grows and its position delta falls by as much, so its next token's
        rotary position is unchanged). One gather per buffer, only when the rows disagree.
        """
        dropped = [int(d) for d in dropped]
        if len(dropped) != self.batch_size or min(dropped, default=0) < 0:
            raise ValueError(f"trim_rows needs one count >= 0 per row ({self.batch_size}), got {dropped}")
        common = min(dropped)
        shift = [d - common for d in dropped]
        if not any(shift):
            self._trim_columns(common)
            return
        parts, offset = self._parts(), self.offset - common
        moved = mx.array(shift, mx.int32)
        source = mx.arange(offset)[None, :] - moved[:, None]  # (batch, columns): where each column comes from
        kept = source >= 0
        source = mx.maximum(source, 0)
        out = []
        for part in parts:
            tail = [1] * (part.ndim - 3)
            index = source.reshape(self.batch_size, 1, offset, *tail)
            taken = mx.take_along_axis(part[:, :, :offset], index, axis=2)
            out.append(mx.where(kept.reshape(self.batch_size, 1, offset, *tail), taken, mx.zeros_like(taken)))
        self.position_delta = _per_row(self.position_delta, self.batch_size) - moved
        self._set_padding([p + s for p, s in zip(self.padding, shift)])
        self._store(out, offset)
        self._drop_leading(min(self.padding))

    def _trim_columns(self, n: int) -> None:
        """Drop the last ``n`` columns of every row."""
        self.trim(n)  # type: ignore[attr-defined]  # the append-only kinds just move their offset back

    def _drop_leading(self, n: int) -> None:
        """Forget the first ``n`` columns (padding, or tokens that left every row's window); positions stay."""
        if n <= 0:
            return
        self.position_delta = _per_row(self.position_delta, self.batch_size) + n
        self._set_padding([max(p - n, 0) for p in self.padding])
        self._store([part[..., n:, :] for part in self._parts()], self.offset - n)

    @property
    def meta_state(self) -> dict[str, str]:
        return {"offset": str(self.offset), "left_padding": ",".join(map(str, self.padding))}

    def _restore_padded(self, state: list[mx.array], meta_state: dict[str, str]) -> Any:
        (offset,) = _meta_ints(meta_state, "offset")
        if state:
            self._store(list(state), offset)
        self.offset = offset
        return self

    @staticmethod
    def _padding_of(meta_state: dict[str, str]) -> list[int]:
        return [int(p) for p in meta_state["left_padding"].split(",") if p]


class BatchKVCache(_LeftPadded, KVCache):
    """``KVCache`` rows of a batch, left-padded (see ``_LeftPadded``)."""

    def __init__(self, left_padding: Sequence[int]) -> None:
        KVCache.__init__(self)
        self._init_padding(left_padding)

    def _parts(self) -> list[mx.array]:
        return self.state

    def _store(self, parts: list[mx.array], offset: int) -> None:
        capacity = _round_up(offset, self.step)
        self.keys, self.values = (_with_room(p[..., :offset, :], capacity) for p in parts)
        self.offset = offset

    def batch_like(self, left_padding: Sequence[int]) -> BatchKVCache:
        return BatchKVCache(left_padding)

    def make_mask(self, n_queries: int, dtype: mx.Dtype, *, window: int | None = None, **own: Any) -> AttentionMask:
        return self._batch_mask(n_queries, dtype, window, **own)

    def extract(self, row: int) -> KVCache:
        """Row ``row`` as a standalone cache: its tokens without padding, its own int position delta."""
        padding = self.padding[row]
        cache = KVCache()
        if self.keys is not None:
            length = self.offset - padding
            capacity = _round_up(length, self.step)
            cache.keys = _with_room(self.keys[row : row + 1, :, padding : self.offset, :], capacity)
            cache.values = _with_room(self.values[row : row + 1, :, padding : self.offset, :], capacity)
            cache.offset = length
        cache.position_delta = int(_per_row(self.position_delta, self.batch_size)[row].item()) + padding
        return cache

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> BatchKVCache:
        return cls(cls._padding_of(meta_state))._restore_padded(state, meta_state)

    def __repr__(self) -> str:
        return f"BatchKVCache(left_padding={self.padding}, offset={self.offset})"


class BatchRotatingKVCache(BatchKVCache):
    """``RotatingKVCache`` rows of a batch: one sliding window of ``max_size`` tokens over left-padded rows.

    Rows advance one column per step, so a window in tokens is a window in columns. Columns are kept in order
    (no ring); once more than ``step`` columns have left every query's window they are dropped in one copy,
    so memory stays within ``max_size + step`` columns and the copy happens once per ``step`` tokens.
    """

    def __init__(self, left_padding: Sequence[int], max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"BatchRotatingKVCache needs max_size >= 1, got {max_size}")
        super().__init__(left_padding)
        self.max_size = max_size

    def _stale(self) -> int:
        """Columns the next update drops first: those no new query can see (all but the last max_size - 1),
        once there are at least ``step`` of them."""
        stale = self.offset - (self.max_size - 1)
        return stale if stale >= self.step else 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._drop_leading(self._stale())
        return super().update_and_fetch(keys, values)

    def make_mask(self, n_queries: int, dtype: mx.Dtype, *, window: int | None = None, **own: Any) -> AttentionMask:
        window = self.max_size if window is None else min(window, self.max_size)
        stale = self._stale()
        if not any(self.padding) and self.offset - stale + n_queries <= window:
            return self._batch_mask(n_queries, dtype, None, **own)  # every stored key is inside every window
        self._batch_mask(n_queries, dtype, window, **own)  # refuses masks of the rows' own
        return self._padded_mask(n_queries, dtype, window=window, dropped=stale)

    def batch_like(self, left_padding: Sequence[int]) -> BatchRotatingKVCache:
        return BatchRotatingKVCache(left_padding, self.max_size)

    def extract(self, row: int) -> KVCache:
        raise NotImplementedError("extract a row of a BatchKVCache; a sliding-window batch does not split")

    def is_trimmable(self) -> bool:
        return False

    def can_trim_after(self, n_new: int) -> bool:
        return False

    def can_trim_rows(self) -> bool:
        # Columns are kept in order and only those no later query can see are dropped (before an update, never
        # the ones it adds), so the last columns of a verify pass can be taken back like a plain cache's.
        return True

    def _trim_columns(self, n: int) -> None:
        self.offset -= min(max(n, 0), self.offset)

    def trim(self, n: int) -> int:
        return 0

    @property
    def meta_state(self) -> dict[str, str]:
        return {**super().meta_state, "max_size": str(self.max_size)}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> BatchRotatingKVCache:
        (max_size,) = _meta_ints(meta_state, "max_size")
        return cls(cls._padding_of(meta_state), max_size)._restore_padded(state, meta_state)

    def __repr__(self) -> str:
        return f"BatchRotatingKVCache(max_size={self.max_size}, left_padding={self.padding}, offset={self.offset})"


class BatchQuantizedKVCache(_LeftPadded, QuantizedKVCache):
    """``QuantizedKVCache`` rows of a batch, left-padded. Padding columns hold zeros (packed, scales and
    biases), which the mask hides."""

    def __init__(self, left_padding: Sequence[int], bits: int = 8, group_size: int = 64) -> None:
        QuantizedKVCache.__init__(self, bits, group_size)
        self._init_padding(left_padding)

    def _float_cache(self) -> KVCache:
        return BatchKVCache(self.padding)

    def _parts(self) -> list[mx.array]:
        return self.state

    def _store(self, parts: list[mx.array], offset: int) -> None:
        if self.float_fallback is not None:
            self.float_fallback._store(parts, offset)
        else:
            capacity = _round_up(offset, self.step)
            stored = [_with_room(p[..., :offset, :], capacity) for p in parts]
            self.keys, self.values = stored[:3], stored[3:]
        self.offset = offset

    def _set_padding(self, left_padding: list[int]) -> None:
        super()._set_padding(left_padding)
        if getattr(self, "float_fallback", None) is not None:
            self.float_fallback._set_padding(left_padding)

    def batch_like(self, left_padding: Sequence[int]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache(left_padding, self.bits, self.group_size)

    def extract(self, row: int) -> QuantizedKVCache:
        """Row ``row`` as a standalone cache: its tokens without padding, its own int position delta."""
        padding = self.padding[row]
        cache = QuantizedKVCache(self.bits, self.group_size)
        if self.float_fallback is not None:
            cache.float_fallback = self.float_fallback.extract(row)
            cache.offset = cache.float_fallback.offset
        elif self.keys is not None:
            length = self.offset - padding
            capacity = _round_up(length, self.step)
            parts = [_with_room(a[row : row + 1, :, padding : self.offset, :], capacity) for a in self.state]
            cache.keys, cache.values = parts[:3], parts[3:]
            cache.offset = length
        cache.position_delta = int(_per_row(self.position_delta, self.batch_size)[row].item()) + padding
        return cache

    def make_mask(self, n_queries: int, dtype: mx.Dtype, *, window: int | None = None, **own: Any) -> AttentionMask:
        return self._batch_mask(n_queries, dtype, window, **own)

    @property
    def meta_state(self) -> dict[str, str]:
        return {**QuantizedKVCache.meta_state.fget(self), **_LeftPadded.meta_state.fget(self)}  # type: ignore[attr-defined]

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> BatchQuantizedKVCache:
        bits, group_size = _meta_ints(meta_state, "bits", "group_size")
        cache = cls(cls._padding_of(meta_state), bits, group_size)
        if meta_state.get("storage") == "float":
            cache.float_fallback = cache._float_cache()
        return cache._restore_padded(state, meta_state)

    def __repr__(self) -> str:
        return (
            f"BatchQuantizedKVCache(bits={self.bits}, group_size={self.group_size}, left_padding={self.padding}, "
            f"offset={self.offset})"
        )


BATCHED_TWINS: dict[type, Callable[[Any, Sequence[int]], Any]] = {
    KVCache: lambda layer, padding: BatchKVCache(padding),
    RotatingKVCache: lambda layer, padding: BatchRotatingKVCache(padding, layer.max_size),
    QuantizedKVCache: lambda layer, padding: BatchQuantizedKVCache(padding, layer.bits, layer.group_size),
}
"""Single-request cache kind -> its batched twin, given the layer and the rows' left padding. A kind missing
here cannot be batched; a module with a cache kind of its own adds its twin with ``register_batched_twin``."""


def register_batched_twin(kind: type, make: Callable[[Any, Sequence[int]], Any]) -> None:
    """Let the batching engine batch ``kind`` layers: ``make(layer, left_padding)`` is an empty batched cache
    with ``layer``'s settings (it must do what ``BatchKVCache`` does: merge, filter, padded masks)."""
    BATCHED_TWINS[kind] = make


def batch_cache_like(layer: Any, left_padding: Sequence[int]) -> Any:
    """An empty batched cache of ``layer``'s kind and settings, for prefilling several prompts at once."""
    if isinstance(layer, _LeftPadded):
        return layer.batch_like(left_padding)
    make = BATCHED_TWINS.get(type(layer))
    if make is None:
        raise TypeError(f"{type(layer).__name__} layers cannot be batched")
    return make(layer, left_padding)


def can_batch(layer: Any) -> bool:
    return isinstance(layer, _LeftPadded) or type(layer) in BATCHED_TWINS


def merge_caches(caches: Sequence[Any]) -> Any:
    """One batched cache holding every row of ``caches`` (layers of one kind, single or batched)."""
    if not caches:
        raise ValueError("merge needs at least one cache")
    return type(batch_cache_like(caches[0], [])).merge(caches)


class _Rows:
    """A cache's stored columns, padding, per-row position delta and kind, as ``merge`` aligns them."""

    def __init__(
        self,
        parts: list[mx.array] | None,
        padding: list[int],
        delta: mx.array,
        empty: Any,
        kind: tuple,
    ) -> None:
        self.parts, self.padding, self.delta, self.empty, self.kind = parts, padding, delta, empty, kind

    @property
    def length(self) -> int:
        return 0 if self.parts is None else self.parts[0].shape[2]

    @classmethod
    def of(cls, cache: Any) -> _Rows:
        if isinstance(cache, QuantizedKVCache) and cache.float_fallback is not None:
            # Keys that could not be quantized are plain rows (batched alike with the other such layers).
            rows = cls.of(cache.float_fallback)
            if isinstance(cache, _LeftPadded):
                rows.delta = _per_row(cache.position_delta, len(rows.padding))
            return rows
        if not can_batch(cache):
            raise TypeError(
                f"can only batch KVCache, RotatingKVCache and QuantizedKVCache layers, got {type(cache).__name__}"
            )
        template = batch_cache_like(cache, [])
        kind: tuple = (
            type(template).__name__,
            *(getattr(template, a) for a in ("max_size", "bits", "group_size") if hasattr(template, a)),
        )
        state = cache.state
        if not state:
            return cls(None, [], mx.zeros((0,), mx.int32), template.batch_like, kind)
        batch = state[0].shape[0]
        padding = cache.padding if isinstance(cache, _LeftPadded) else [0] * batch
        delta = _per_row(cache.position_delta, batch)
        # A cache that keeps only the last tokens it saw (a sliding window) starts its columns after position 0.
        delta = delta + (cache.offset - state[0].shape[2])
        return cls(list(state), list(padding), delta, template.batch_like, kind)
