"""Caches of recurrent (linear-attention) layers, beside the key/value caches of attention layers.

A gated delta-net layer (Qwen3-Next, Qwen3.5) summarises everything it has read in two arrays per sequence: the
last ``kernel - 1`` inputs of its causal convolution, and a (key_dim, value_dim) memory per value head that the
delta rule updates token by token. Neither grows with the sequence, and neither can be rolled back: ``trim``
drops nothing, so a prompt cache reuses such a layer only where its whole state is the state of the prefix.

* ``RecurrentCache``: one request's state (or that of a batch prefilled together from empty). A prompt's prefill
  also leaves a snapshot of the state ``SNAPSHOT_MARGIN`` tokens before its end: a chat template rewrites the last
  few tokens of a turn in the next one (Qwen3.5 drops the opened thinking block), and the prompt cache can then go
  back to the snapshot instead of recomputing the conversation.
* ``BatchRecurrentCache``: the rows of a continuous batch. Rows are left-padded like ``BatchKVCache``'s, and
  the two keep the same bookkeeping (``offset`` counts columns, padding included; per-row position deltas;
  ``merge`` / ``extend`` / ``filter`` / ``extract``), so every layer of a hybrid model agrees on where each row
  stands. Padding columns must leave a row's state as it was: ``token_mask`` tells the layer which new columns
  hold real tokens.

The layer itself does the arithmetic (vlm_models' gated delta rule); these classes only hold and move state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from .batch_cache import _LeftPadded, _per_row, register_batched_twin
from .cache import ArraysCache

__all__ = ["SNAPSHOT_MARGIN", "BatchRecurrentCache", "RecurrentCache"]

SNAPSHOT_MARGIN = 16
"""Tokens before the end of a prefill at which the state is kept: more than a chat template's generation prompt."""


class RecurrentCache(ArraysCache):
    """Conv state (batch, kernel - 1, channels) and recurrent state (batch, value_heads, key_dim, value_dim) of
    one linear-attention layer; both None until the layer first runs."""

    keeps_boundary_state = True

    def __init__(self) -> None:
        super().__init__(2)
        self.snapshot: tuple[int, list[mx.array]] | None = None
        """(offset, [conv state, recurrent state]) of the latest prefill, ``SNAPSHOT_MARGIN`` tokens before its end
        (or at ``snapshot_at``)."""
        self.snapshot_at: int | None = None
        """Where set, the offset whose state the next prefill keeps in ``snapshot`` instead (a prefix cache's
        block boundary)."""

    @property
    def conv_state(self) -> mx.array | None:
        return self.slots[0]

    @property
    def recurrent_state(self) -> mx.array | None:
        return self.slots[1]

    def update(
        self, conv_state: mx.array, recurrent_state: mx.array, n_tokens: int, snapshot: list[mx.array] | None = None
    ) -> None:
        """Keep the layer's new state after it consumed ``n_tokens`` more columns; ``snapshot``: the state at
        ``snapshot_split(n_tokens)`` of them."""
        if snapshot is not None:
            split = self.snapshot_split(n_tokens)
            assert split is not None, "a snapshot where none was asked for"
            self.snapshot = (self.offset + split, list(snapshot))
        self.slots = [conv_state, recurrent_state]
        self.offset += n_tokens
        if self.snapshot_at is not None and self.snapshot_at == self.offset:
            self.snapshot = (self.offset, list(self.slots))  # the boundary fell at the end of this piece

    def snapshot_split(self, n_tokens: int) -> int | None:
        """After how many of the next ``n_tokens`` the layer should hand over its state (``update``'s snapshot)."""
        if self.snapshot_at is not None:
            inside = self.snapshot_at - self.offset
            return inside if 0 < inside < n_tokens else None
        return n_tokens - SNAPSHOT_MARGIN if n_tokens > SNAPSHOT_MARGIN else None

    def rewind_point(self, n_tokens: int) -> int | None:
        """The longest prefix of at most ``n_tokens`` this cache can go back to (the prompt cache's question)."""
        if n_tokens >= self.offset:
            return self.offset
        if self.snapshot is not None and self.snapshot[0] <= n_tokens:
            return self.snapshot[0]
        return None

    def trim(self, n: int) -> int:
        """Go back ``n`` tokens where the snapshot is exactly there; otherwise nothing changes (returns 0)."""
        if n <= 0 or self.snapshot is None or self.snapshot[0] != self.offset - n:
            return 0
        self.offset, self.slots = self.snapshot[0], list(self.snapshot[1])
        return n

    @property
    def nbytes(self) -> int:
        kept = [] if self.snapshot is None else self.snapshot[1]
        return sum(a.nbytes for a in self.state + kept)

    def token_mask(self, n_tokens: int) -> mx.array | None:
        """(batch, n_tokens) booleans, True where the next ``n_tokens`` columns hold real tokens; None when all do."""
        return None

    # -- batching (``vlm_runtime.cache.batch_cache_like`` and ``merge_caches`` call these)
    def batch_like(self, left_padding: Sequence[int]) -> BatchRecurrentCache:
        """An empty batched cache for prefilling left-padded prompts together."""
        return BatchRecurrentCache(left_padding)

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> RecurrentCache:
        cache = cls()
        cache._restore(state, meta_state)
        return cache

    def _restore(self, state: list[mx.array], meta_state: dict[str, str]) -> None:
        if state and len(state) != 2:
            raise ValueError(f"{type(self).__name__}: expected the conv and recurrent states, got {len(state)} arrays")
        self.slots = list(state) if state else [None, None]
        self.offset = int(meta_state["offset"])

    def __repr__(self) -> str:
        return f"RecurrentCache(offset={self.offset})"


class BatchRecurrentCache(RecurrentCache):
    """``RecurrentCache`` rows of a batch, left-padded as ``BatchKVCache`` pads its rows.

    ``left_padding[b]`` leading columns of row b hold no token; ``position_delta`` is per row (a row's next rotary
    position is ``offset + delta[b]``). The state has no columns, so padding only matters while the padded columns
    are being read (``token_mask``); joining rows of other lengths just adds padding to the bookkeeping.
    """

    keeps_boundary_state = False  # rows of other lengths: no one offset to keep the state at

    # The KV batch caches' padding bookkeeping, the same functions (not a copy), so the two cannot drift apart.
    _init_padding = _LeftPadded._init_padding
    _set_padding = _LeftPadded._set_padding
    batch_size = _LeftPadded.batch_size

    def __init__(self, left_padding: Sequence[int]) -> None:
        super().__init__()
        self._init_padding(left_padding)

    def snapshot_split(self, n_tokens: int) -> int | None:
        return None  # a batch's rows have no prompt cache to go back for

    def can_trim_rows(self) -> bool:
        return False  # a state holds no tokens to take back: speculative rows decode plainly

    def token_mask(self, n_tokens: int) -> mx.array | None:
        if self.offset >= max(self.padding, default=0):
            return None
        columns = mx.arange(self.offset, self.offset + n_tokens)
        return columns[None, :] >= self.left_padding[:, None]

    def batch_like(self, left_padding: Sequence[int]) -> BatchRecurrentCache:
        return BatchRecurrentCache(left_padding)

    @classmethod
    def merge(cls, caches: Sequence[Any]) -> BatchRecurrentCache:
        """One batch of all the rows of ``caches`` (single or batched recurrent caches), aligned to the longest
        as ``BatchKVCache.merge`` aligns them: shorter rows get extra left padding and their position delta drops
        by as much."""
        if not caches:
            raise ValueError("merge needs at least one cache")
        if not all(isinstance(c, RecurrentCache) for c in caches):
            kinds = sorted({type(c).__name__ for c in caches})
            raise ValueError(f"cannot merge caches of different kinds: {kinds}")
        if any(c.conv_state is None for c in caches):
            raise ValueError("cannot merge an empty cache (prefill it first)")
        length = max(c.offset for c in caches)
        padding: list[int] = []
        deltas = []
        for c in caches:
            extra = length - c.offset
            rows = c.conv_state.shape[0]
            own = c.padding if isinstance(c, BatchRecurrentCache) else [0] * rows
            padding += [p + extra for p in own]
            deltas.append(_per_row(c.position_delta, rows) - extra)
        merged = cls(padding)
        dtype = caches[0].recurrent_state.dtype
        merged.slots = [
            mx.concatenate([c.conv_state for c in caches]),
            mx.concatenate([c.recurrent_state.astype(dtype) for c in caches]),
        ]
        merged.offset = length
        merged.position_delta = mx.concatenate(deltas)
        return merged

    def extend(self, other: Any) -> None:
        """Append ``other``'s rows (a batch or a single prefilled request), aligned as ``merge`` aligns them."""
        merged = type(self).merge([self, other])
        self.slots, self.offset, self.position_delta = merged.slots, merged.offset, merged.position_delta
        self._set_padding(merged.padding)

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order); forget the leading columns that are padding in all of them."""
        rows = list(rows)
        if not rows:
            raise ValueError("filter needs at least one row to keep; start a new cache instead")
        index = mx.array(rows, dtype=mx.int32)
        self.position_delta = _per_row(self.position_delta, self.batch_size)[index]
        self._set_padding([self.padding[r] for r in rows])
        if self.conv_state is not None:
            self.slots = [slot[index] for slot in self.slots]
        dropped = min(self.padding)
        if dropped:
            self.position_delta = self.position_delta + dropped
            self._set_padding([p - dropped for p in self.padding])
            self.offset -= dropped

    def extract(self, row: int) -> RecurrentCache:
        """Row ``row`` as a standalone cache, with its own int position delta."""
        padding = self.padding[row]
        cache = RecurrentCache()
        if self.conv_state is not None:
            cache.slots = [slot[row : row + 1] for slot in self.slots]
        cache.offset = self.offset - padding
        cache.position_delta = int(_per_row(self.position_delta, self.batch_size)[row].item()) + padding
        return cache

    @property
    def meta_state(self) -> dict[str, str]:
        return {**super().meta_state, "left_padding": ",".join(map(str, self.padding))}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> BatchRecurrentCache:
        cache = cls(_LeftPadded._padding_of(meta_state))
        cache._restore(state, meta_state)
        return cache

    def __repr__(self) -> str:
        return f"BatchRecurrentCache(left_padding={self.padding}, offset={self.offset})"


# The batching engine holds recurrent layers' rows in a BatchRecurrentCache (batch_cache's table of twins).
register_batched_twin(RecurrentCache, lambda layer, padding: layer.batch_like(padding))
register_batched_twin(BatchRecurrentCache, lambda layer, padding: layer.batch_like(padding))
