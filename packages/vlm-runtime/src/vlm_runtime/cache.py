"""Key/value caches behind one small protocol.

Every cache stores, per layer, what attention needs to continue a sequence. Models build their list of caches
with ``make_cache()``; the generation loop only relies on the protocol below.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import mlx.core as mx

__all__ = ["Cache", "KVCache", "cache_nbytes"]


@runtime_checkable
class Cache(Protocol):
    """What the runtime needs from a per-layer cache."""

    offset: int
    """Number of tokens stored."""

    position_delta: mx.array | int
    """Rotary position of the next token minus ``offset``.

    Zero for plain text. Multimodal rotary schemes (M-RoPE) give image tokens fewer positions than tokens, so the
    next text position lags the token count; left padding shifts it per row. Kept here so models stay stateless.
    """

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]: ...

    @property
    def state(self) -> list[mx.array]: ...

    def trim(self, n: int) -> int: ...

    @property
    def nbytes(self) -> int: ...


class KVCache:
    """Keys and values of shape (batch, kv_heads, tokens, head_dim), grown in blocks of ``step`` tokens.

    Growing in blocks keeps decode from reallocating every token; slicing to ``offset`` hides the spare room.
    """

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.position_delta: mx.array | int = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset
        n_new = keys.shape[2]
        if self.keys is None or start + n_new > self.keys.shape[2]:
            self._grow(keys, values, n_new)
        self.offset += n_new
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, n_new: int) -> None:
        batch, heads, _, k_dim = keys.shape
        v_dim = values.shape[3]
        room = ((n_new + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((batch, heads, room, k_dim), keys.dtype)
        new_v = mx.zeros((batch, heads, room, v_dim), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
            return
        old_k = self.keys[..., : self.offset, :]
        old_v = self.values[..., : self.offset, :]
        self.keys = mx.concatenate([old_k, new_k], axis=2)
        self.values = mx.concatenate([old_v, new_v], axis=2)

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (at most all of them); returns how many were dropped."""
        dropped = min(max(n, 0), self.offset)
        self.offset -= dropped
        return dropped

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def __repr__(self) -> str:
        return f"KVCache(offset={self.offset})"


def cache_nbytes(cache: list[Cache]) -> int:
    return sum(c.nbytes for c in cache)
