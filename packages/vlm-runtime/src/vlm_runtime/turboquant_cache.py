"""KV caches stored with TurboQuant (``vlm_kernels.turboquant``): about 3.5 bits per value instead of 16.

Each key and value vector is kept as its float16 norm plus a few bits per rotated coordinate (3-bit keys and
4-bit values by default: 0.23x of bfloat16's bytes). Decoding one token attends straight from the packed
codes (``vlm_kernels.decode_attention``: fused on a GPU, never dequantizing the cache); a prompt chunk decodes
the stored codes in the rotated space and runs ``scaled_dot_product_attention`` there, so neither keys nor
values are rotated back (q·k and the weighted sum of values are the same in any orthonormal basis).

* ``TurboQuantKVCache``: one sequence (or a batch of equal-length rows), grown in steps like ``KVCache``.
* ``BatchTurboQuantKVCache``: left-padded rows with the merge / filter / extend of the batching engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from vlm_kernels.decode_attention import is_row_mask, turboquant_decode_attention
from vlm_kernels.turboquant import TURBOQUANT_BITS, TurboQuantCodec, TurboQuantPacked, turboquant_codec

from .attention import attention
from .batch_cache import _LeftPadded, _per_row, register_batched_twin
from .cache import _AppendOnly, _meta_ints, _round_up, _with_room

__all__ = ["BatchTurboQuantKVCache", "TurboQuantKVCache"]


def _bits_text(bits: float) -> str:
    return str(int(bits)) if float(bits).is_integer() else str(bits)


def _parse_bits(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() else value


class TurboQuantKVCache(_AppendOnly):
    """Keys and values TurboQuant-encoded: ``key_bits`` / ``value_bits`` in 2, 2.5, 3, 3.5, 4 (x.5: half the
    channels one bit wider). ``seed`` fixes the rotations (keys use ``seed``, values ``seed + 1``)."""

    step = 256

    def __init__(self, key_bits: float = 3, value_bits: float = 4, seed: int = 0) -> None:
        for name, bits in (("key_bits", key_bits), ("value_bits", value_bits)):
            if bits not in TURBOQUANT_BITS:
                raise ValueError(f"TurboQuantKVCache {name} must be one of {TURBOQUANT_BITS}, got {bits}")
        self.key_bits, self.value_bits, self.seed = key_bits, value_bits, seed
        self.keys: TurboQuantPacked | None = None
        self.values: TurboQuantPacked | None = None
        self.offset = 0
        self.position_delta: mx.array | int = 0
        self._dims: tuple[int, int] | None = None
        """(key dim, value dim), known from the first keys stored."""

    # -- codecs (one per head dim, shared by every layer)
    @property
    def key_codec(self) -> TurboQuantCodec:
        return turboquant_codec(self._known_dims()[0], self.key_bits, self.seed)

    @property
    def value_codec(self) -> TurboQuantCodec:
        return turboquant_codec(self._known_dims()[1], self.value_bits, self.seed + 1)

    def _known_dims(self) -> tuple[int, int]:
        if self._dims is None:
            raise ValueError("the cache is empty: its head dims are not known yet")
        return self._dims

    # -- storing
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[TurboQuantPacked, TurboQuantPacked]:
        """Encode and store (batch, kv_heads, n, dim) keys/values; returns everything stored, packed."""
        self._append(keys, values)
        return self._fetch(self.keys), self._fetch(self.values)

    def _append(self, keys: mx.array, values: mx.array) -> None:
        if self._dims is None:
            self._dims = (keys.shape[-1], values.shape[-1])
        elif self._dims != (keys.shape[-1], values.shape[-1]):
            raise ValueError(f"this cache holds head dims {self._dims}, got {(keys.shape[-1], values.shape[-1])}")
        new_keys = self.key_codec.encode(keys)
        new_values = self.value_codec.encode(values)
        start, n_new = self.offset, keys.shape[2]
        if self.keys is None or start + n_new > self.keys.words.shape[2]:
            self._grow(new_keys, new_values, n_new)
        self.offset += n_new
        for stored, new in zip((*self.keys, *self.values), (*new_keys, *new_values)):
            stored[..., start : self.offset, :] = new

    def _fetch(self, packed: TurboQuantPacked) -> TurboQuantPacked:
        return TurboQuantPacked(*(a[..., : self.offset, :] for a in packed))

    def _grow(self, new_keys: TurboQuantPacked, new_values: TurboQuantPacked, n_new: int) -> None:
        capacity = _round_up(self.offset + n_new, self.step)
        if self.keys is None:
            self.keys = TurboQuantPacked(*(_with_room(a[..., :0, :], capacity) for a in new_keys))
            self.values = TurboQuantPacked(*(_with_room(a[..., :0, :], capacity) for a in new_values))
        else:
            self.keys = TurboQuantPacked(*(_with_room(a, capacity) for a in self._fetch(self.keys)))
            self.values = TurboQuantPacked(*(_with_room(a, capacity) for a in self._fetch(self.values)))

    # -- attention
    def _starts(self) -> mx.array | None:
        """First real column of each row (left padding); None when every row starts at column 0."""
        return None

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
    ) -> mx.array:
        self._append(keys, values)
        return self.attend_shared(queries, scale=scale, mask=mask)

    def attend_shared(self, queries: mx.array, *, scale: float, mask: mx.array | str | None) -> mx.array:
        """Attend over what is stored, storing nothing (the keys a later layer shares, Gemma 4's): append-only,
        so that is what the last ``attend`` used."""
        if queries.shape[2] == 1 and (mask is None or isinstance(mask, str) or is_row_mask(mask)):
            return turboquant_decode_attention(
                queries,
                self.keys,
                self.values,
                self.key_codec,
                self.value_codec,
                scale=scale,
                length=self.offset,
                starts=self._starts(),
                mask=None if isinstance(mask, str) else mask,  # one query is the last key: "causal" hides nothing
            )
        return self._attend_chunk(queries, scale, mask)

    def _attend_chunk(self, queries: mx.array, scale: float, mask: mx.array | str | None) -> mx.array:
        """Several queries (a prompt chunk): attention in the rotated spaces over the decoded codes."""
        key_codec, value_codec = self.key_codec, self.value_codec
        dtype = queries.dtype
        k_rot = key_codec.decode_rotated(self._fetch(self.keys)).astype(dtype)
        v_rot = value_codec.decode_rotated(self._fetch(self.values)).astype(dtype)
        q_rot = key_codec.rotate(queries).astype(dtype)
        out = attention(q_rot, k_rot, v_rot, scale=scale, mask=mask)
        return value_codec.unrotate(out.astype(mx.float32)).astype(dtype)

    # -- persistence
    @property
    def state(self) -> list[mx.array]:
        """Four arrays: key codes, key norms, value codes, value norms (each (batch, kv_heads, tokens, ...))."""
        if self.keys is None:
            return []
        return [*self._fetch(self.keys), *self._fetch(self.values)]

    @property
    def meta_state(self) -> dict[str, str]:
        meta = {
            "offset": str(self.offset),
            "key_bits": _bits_text(self.key_bits),
            "value_bits": _bits_text(self.value_bits),
            "seed": str(self.seed),
        }
        if self._dims is not None:
            meta["dims"] = f"{self._dims[0]},{self._dims[1]}"
        return meta

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> TurboQuantKVCache:
        return cls(*_settings(meta_state))._restore(state, meta_state)

    def _restore(self, state: list[mx.array], meta_state: dict[str, str]) -> Any:
        (offset,) = _meta_ints(meta_state, "offset")
        self._dims = _dims_of(meta_state)
        if state:
            self._store_parts(list(state), offset)
        self.offset = offset
        return self

    def _store_parts(self, parts: list[mx.array], offset: int) -> None:
        capacity = _round_up(offset, self.step)
        stored = [_with_room(p[..., :offset, :], capacity) for p in parts]
        self.keys, self.values = TurboQuantPacked(*stored[:2]), TurboQuantPacked(*stored[2:])
        self.offset = offset

    def batched(self, left_padding: Sequence[int]) -> BatchTurboQuantKVCache:
        """An empty batch of caches with this one's settings (its twin in ``batch_cache.BATCHED_TWINS``)."""
        batch = BatchTurboQuantKVCache(left_padding, self.key_bits, self.value_bits, self.seed)
        batch._dims = self._dims
        return batch

    def __repr__(self) -> str:
        return (
            f"TurboQuantKVCache(key_bits={self.key_bits}, value_bits={self.value_bits}, seed={self.seed}, "
            f"offset={self.offset})"
        )


def _dims_of(meta_state: dict[str, str]) -> tuple[int, int] | None:
    if "dims" not in meta_state:
        return None
    key_dim, value_dim = (int(d) for d in meta_state["dims"].split(","))
    return key_dim, value_dim


def _settings(meta_state: dict[str, str]) -> tuple[float, float, int]:
    return _parse_bits(meta_state["key_bits"]), _parse_bits(meta_state["value_bits"]), int(meta_state["seed"])


class BatchTurboQuantKVCache(_LeftPadded, TurboQuantKVCache):
    """``TurboQuantKVCache`` rows of a batch, left-padded (see ``_LeftPadded``). Padding columns hold zero codes
    and norms, which the kernel skips (each row starts at its padding) and the mask hides."""

    def __init__(self, left_padding: Sequence[int], key_bits: float = 3, value_bits: float = 4, seed: int = 0) -> None:
        TurboQuantKVCache.__init__(self, key_bits, value_bits, seed)
        self._init_padding(left_padding)

    def _parts(self) -> list[mx.array]:
        return self.state

    def _store(self, parts: list[mx.array], offset: int) -> None:
        self._store_parts(parts, offset)

    def batch_like(self, left_padding: Sequence[int]) -> BatchTurboQuantKVCache:
        return self.batched(left_padding)

    def _starts(self) -> mx.array | None:
        return self.left_padding if any(self.padding) else None

    def make_mask(
        self, n_queries: int, dtype: mx.Dtype, *, window: int | None = None, **own: Any
    ) -> mx.array | str | None:
        return self._batch_mask(n_queries, dtype, window, **own)

    def extract(self, row: int) -> TurboQuantKVCache:
        """Row ``row`` as a standalone cache: its tokens without padding, its own int position delta."""
        padding = self.padding[row]
        cache = TurboQuantKVCache(self.key_bits, self.value_bits, self.seed)
        cache._dims = self._dims
        if self.keys is not None:
            cache._store_parts(
                [a[row : row + 1, :, padding : self.offset, :] for a in self.state], self.offset - padding
            )
        cache.position_delta = int(_per_row(self.position_delta, self.batch_size)[row].item()) + padding
        return cache

    @property
    def meta_state(self) -> dict[str, str]:
        return {**TurboQuantKVCache.meta_state.fget(self), **_LeftPadded.meta_state.fget(self)}  # type: ignore[attr-defined]

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> BatchTurboQuantKVCache:
        cache = cls(cls._padding_of(meta_state), *_settings(meta_state))
        cache._dims = _dims_of(meta_state)
        return cache._restore_padded(state, meta_state)

    def __repr__(self) -> str:
        return (
            f"BatchTurboQuantKVCache(key_bits={self.key_bits}, value_bits={self.value_bits}, "
            f"left_padding={self.padding}, offset={self.offset})"
        )


register_batched_twin(TurboQuantKVCache, lambda layer, padding: layer.batched(padding))
