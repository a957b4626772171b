"""Key/value caches behind one small protocol.

Every cache stores, per layer, what attention needs to continue a sequence. Models build their list of caches
with ``make_cache()``; the generation loop only relies on the protocol below.

* ``KVCache``: keys and values as they are, grown in steps.
* ``RotatingKVCache``: a sliding window of at most ``max_size`` tokens (memory stays bounded).
* ``QuantizedKVCache``: keys and values stored 4- or 8-bit, attended through ``mx.quantized_matmul``.
* ``ArraysCache``: state slots for recurrent / linear-attention layers.

Their batched twins (left-padded rows in shared buffers, for the batching engine) are in ``batch_cache``; a
cache names its twin through ``batch_like``.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from vlm_kernels.decode_attention import AFFINE_DECODE, affine_decode_attention, fast_decode_applies

from .attention import attention
from .masks import AttentionMask, attention_mask_for

__all__ = [
    "ArraysCache",
    "AttentionCache",
    "Cache",
    "KVCache",
    "QUANTIZED_BITS",
    "QUANTIZED_GROUP_SIZES",
    "QuantizedKVCache",
    "RotatingKVCache",
    "cache_nbytes",
    "quantized_attention",
]


@runtime_checkable
class Cache(Protocol):
    """What the runtime needs from a per-layer cache.

    Attention layers call ``attend``, not ``update_and_fetch`` then attention: the cache knows how it stores
    keys (plainly, in a ring, quantized), so it also knows how to attend over them and which mask that needs.
    Recurrent layers' caches (``ArraysCache``) implement only the bookkeeping part.
    """

    offset: int
    """Number of tokens seen (for a sliding window, more than it stores)."""

    splits_into_blocks: bool
    """Whether every ``state`` array holds the tokens along axis 2, one slot per token, so that a prefix cache
    may cut it into blocks and rebuild the cache from blocks with ``from_state`` (append-only caches); a window,
    a recurrent state or a padded batch cannot be cut so."""

    keeps_boundary_state: bool
    """For a cache that cannot be cut into blocks: whether it can hand over its whole state at a chosen offset
    while prefilling (``snapshot_at``, then ``snapshot``), which a prefix cache keeps for prompts that start
    the same up to there (a recurrent layer's state is small and fixed-size)."""

    position_delta: mx.array | int
    """Rotary position of the next token minus ``offset``.

    Zero for plain text. Multimodal rotary schemes (M-RoPE) give image tokens fewer positions than tokens, so the
    next text position lags the token count; left padding shifts it per row. Kept here so models stay stateless.
    """

    @property
    def state(self) -> list[mx.array]:
        """The arrays that hold the cache's content (what ``save_prompt_cache`` writes)."""
        ...

    @property
    def meta_state(self) -> dict[str, str]:
        """Everything else needed to rebuild the cache with ``from_state`` (strings, for safetensors metadata)."""
        ...

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> Cache: ...

    def is_trimmable(self) -> bool: ...

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens where possible; returns how many were dropped."""
        ...

    def can_trim_after(self, n_new: int) -> bool:
        """Whether, after ``n_new`` more tokens, those could still be dropped again (speculative decoding feeds
        proposals it may have to take back)."""
        ...

    @property
    def nbytes(self) -> int: ...


@runtime_checkable
class AttentionCache(Cache, Protocol):
    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Any, Any]: ...

    def make_mask(
        self,
        n_queries: int,
        dtype: mx.Dtype,
        *,
        window: int | None = None,
        groups: mx.array | None = None,
        key_padding: mx.array | None = None,
        window_limits_groups: bool = True,
    ) -> AttentionMask:
        """The mask for ``n_queries`` new tokens over the keys the next ``attend`` will use: None, "causal", or
        an additive / boolean array broadcastable to (batch, heads, n_queries, n_keys).

        The cache owns it because only the cache knows which earlier keys it hands attention (all of them, a
        window's worth, padded rows). ``window``: the layer's own sliding window, on top of the cache's bound;
        ``groups`` / ``key_padding`` / ``window_limits_groups``: as ``masks.attention_mask_for`` takes them.
        """
        ...

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
    ) -> mx.array:
        """Store the new (batch, kv_heads, n, head_dim) keys/values, then attend from (batch, heads, n, head_dim)
        queries over everything stored."""
        ...

    def attend_shared(self, queries: mx.array, *, scale: float, mask: mx.array | str | None) -> mx.array:
        """Attend from another layer's queries over the keys/values the last ``attend`` used, storing nothing: a
        later layer that shares this layer's keys (Gemma 3n / Gemma 4's last layers) reads them this way."""
        ...


def _meta_ints(meta: dict[str, str], *names: str) -> list[int]:
    return [int(meta[n]) for n in names]


def _round_up(n: int, step: int) -> int:
    return max(1, (n + step - 1) // step) * step


def _with_room(data: mx.array, capacity: int) -> mx.array:
    """A fresh (..., capacity, dim) buffer starting with ``data``'s tokens (axis 2).

    A copy on purpose: a slice would share, and keep alive, the whole buffer it was cut from.
    """
    shape = list(data.shape)
    shape[2] = capacity
    buffer = mx.zeros(shape, data.dtype)
    buffer[..., : data.shape[2], :] = data
    return buffer


class _AppendOnly:
    """Caches that only ever append: dropping the last tokens is just moving ``offset`` back, and attention
    sees every earlier key."""

    offset: int
    splits_into_blocks = True
    keeps_boundary_state = False

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (at most all of them); returns how many were dropped."""
        dropped = min(max(n, 0), self.offset)
        self.offset -= dropped
        return dropped

    def can_trim_after(self, n_new: int) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)  # type: ignore[attr-defined]

    def make_mask(
        self,
        n_queries: int,
        dtype: mx.Dtype,
        *,
        window: int | None = None,
        groups: mx.array | None = None,
        key_padding: mx.array | None = None,
        window_limits_groups: bool = True,
    ) -> AttentionMask:
        return attention_mask_for(
            n_queries,
            dtype,
            n_past=self.offset,
            window=window,
            groups=groups,
            key_padding=key_padding,
            window_limits_groups=window_limits_groups,
        )


class _StoresFloat:
    """Caches that hand attention their keys and values as float arrays (from their ``update_and_fetch``)."""

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
    ) -> mx.array:
        keys, values = self.update_and_fetch(keys, values)
        # Kept for ``attend_shared``: a window's multi-token update hands attention more than it keeps.
        self._attended = keys, values
        return attention(queries, keys, values, scale=scale, mask=mask)

    def attend_shared(self, queries: mx.array, *, scale: float, mask: mx.array | str | None) -> mx.array:
        keys, values = self._attended
        return attention(queries, keys, values, scale=scale, mask=mask)


class KVCache(_StoresFloat, _AppendOnly):
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

    @property
    def meta_state(self) -> dict[str, str]:
        return {"offset": str(self.offset)}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> KVCache:
        return cls()._restore(state, meta_state)

    def _restore(self, state: list[mx.array], meta_state: dict[str, str]) -> Any:
        if state:
            self.keys, self.values = state
        (self.offset,) = _meta_ints(meta_state, "offset")
        return self

    def __repr__(self) -> str:
        return f"KVCache(offset={self.offset})"


class RotatingKVCache(_StoresFloat):
    """A sliding window: the query at position p sees the keys at positions k with 0 <= p - k < ``max_size``.

    The buffer holds at most ``max_size`` tokens. One-token updates (decode) write into a ring in place, so a
    long generation neither copies the buffer per token nor grows it. Multi-token updates (prefill chunks)
    return the retained previous tokens (up to ``max_size - 1``, oldest first) followed by the new ones, for
    ``make_mask``'s window-causal mask, then keep only the last ``max_size`` of them.

    ``offset`` counts every token seen. Trimming works only while nothing has been dropped yet.
    """

    step = 256
    splits_into_blocks = False  # its slots are a ring, not one per token
    keeps_boundary_state = False

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"RotatingKVCache needs max_size >= 1, got {max_size}")
        self.max_size = max_size
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.position_delta: mx.array | int = 0
        self._stored = 0
        # Ring slot the next one-token update writes; once the ring is full, also the oldest token's slot.
        self._next = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1:
            return self._write_one(keys, values)
        return self._write_chunk(keys, values)

    def _write_one(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self._stored < self.max_size:
            if self.keys is None or self._stored == self.keys.shape[2]:
                self._grow(keys, values)
            slot = self._stored
            self._stored += 1
        else:
            slot = self._next
        self.keys[..., slot : slot + 1, :] = keys
        self.values[..., slot : slot + 1, :] = values
        self._next = (slot + 1) % self.max_size
        self.offset += 1
        # One query attends to every stored token, so their order in the ring does not matter.
        return self.keys[..., : self._stored, :], self.values[..., : self._stored, :]

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        capacity = min(self.max_size, _round_up(self._stored + 1, self.step))
        if self.keys is None:
            self.keys = _with_room(keys[..., :0, :], capacity)
            self.values = _with_room(values[..., :0, :], capacity)
        else:
            self.keys = _with_room(self.keys[..., : self._stored, :], capacity)
            self.values = _with_room(self.values[..., : self._stored, :], capacity)

    def _write_chunk(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        retained = min(self._stored, self.max_size - 1)
        if retained:
            old_keys, old_values = self._chronological()
            keys = mx.concatenate([old_keys[..., -retained:, :], keys], axis=2)
            values = mx.concatenate([old_values[..., -retained:, :], values], axis=2)
        self.offset += keys.shape[2] - retained
        self._keep_linear(keys[..., -self.max_size :, :], values[..., -self.max_size :, :])
        return keys, values

    def _keep_linear(self, keys: mx.array, values: mx.array) -> None:
        """Store up to ``max_size`` tokens, oldest first, in a fresh buffer."""
        self._stored = keys.shape[2]
        capacity = min(self.max_size, _round_up(self._stored, self.step))
        self.keys, self.values = _with_room(keys, capacity), _with_room(values, capacity)
        self._next = self._stored % self.max_size

    def _chronological(self) -> tuple[mx.array, mx.array]:
        keys, values = self.keys[..., : self._stored, :], self.values[..., : self._stored, :]
        if self._stored < self.max_size or self._next == 0:
            return keys, values
        split = self._next
        return (
            mx.concatenate([keys[..., split:, :], keys[..., :split, :]], axis=2),
            mx.concatenate([values[..., split:, :], values[..., :split, :]], axis=2),
        )

    def make_mask(
        self,
        n_queries: int,
        dtype: mx.Dtype,
        *,
        window: int | None = None,
        groups: mx.array | None = None,
        key_padding: mx.array | None = None,
        window_limits_groups: bool = True,
    ) -> AttentionMask:
        if n_queries == 1 and groups is None and key_padding is None:
            return None  # one query sees the whole ring (whose slots are not in time order): all inside its window
        return attention_mask_for(
            n_queries,
            dtype,
            n_past=min(self.offset, self.max_size - 1),  # the earlier keys a chunk update hands attention
            window=self.max_size if window is None else min(window, self.max_size),
            groups=groups,
            key_padding=key_padding,
            window_limits_groups=window_limits_groups,
        )

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None or self._stored == 0:
            return []
        return list(self._chronological())

    @property
    def meta_state(self) -> dict[str, str]:
        return {"offset": str(self.offset), "max_size": str(self.max_size)}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> RotatingKVCache:
        offset, max_size = _meta_ints(meta_state, "offset", "max_size")
        cache = cls(max_size)
        if state:
            cache._keep_linear(*state)
        cache.offset = offset
        return cache

    def can_trim_after(self, n_new: int) -> bool:
        return self.offset + n_new <= self.max_size  # nothing has left the window yet

    def is_trimmable(self) -> bool:
        return self.offset <= self.max_size

    def trim(self, n: int) -> int:
        if not self.is_trimmable():
            return 0
        dropped = min(max(n, 0), self.offset)
        self.offset -= dropped
        self._stored -= dropped
        # Nothing was overwritten, so the tokens sit oldest first from slot 0.
        self._next = self._stored % self.max_size
        return dropped

    @property
    def nbytes(self) -> int:
        """Bytes allocated (not just filled): at most ``max_size`` tokens' worth."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def __repr__(self) -> str:
        return f"RotatingKVCache(max_size={self.max_size}, offset={self.offset})"


QUANTIZED_BITS = (4, 8)
QUANTIZED_GROUP_SIZES = (32, 64, 128)

Quantized = tuple[mx.array, mx.array, mx.array]
"""``mx.quantize``'s (packed, scales, biases) for a (batch, kv_heads, tokens, dim) array."""


def _heads_grouped_mask(mask: mx.array, n_kv_heads: int, n_repeats: int) -> mx.array:
    """An attention mask broadcastable to (batch, heads, q, k) reshaped for (batch, kv_heads, repeats, q, k)."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], n_kv_heads, n_repeats, *mask.shape[2:])


def quantized_attention(
    queries: mx.array,
    keys: Quantized,
    values: Quantized,
    *,
    scale: float,
    mask: mx.array | str | None,
    bits: int,
    group_size: int,
    n_valid: int | None = None,
) -> mx.array:
    """softmax(q·Kᵀ·scale + mask)·V with K and V quantized; queries (batch, heads, n, dim), heads a multiple
    of the kv heads. ``mask``: None, "causal" (queries are the last keys), or a boolean / additive array.

    ``n_valid``: only the first ``n_valid`` keys are real; the rest is spare buffer room, masked out. Passing
    the whole buffer keeps key counts at multiples of the growth step: MLX's CUDA quantized matmul has no
    kernel for some odd sizes, and a fixed shape saves re-tracing every token.
    """
    batch, n_heads, n_queries, dim = queries.shape
    n_kv_heads = keys[0].shape[1]
    n_repeats = n_heads // n_kv_heads
    # Grouped heads share their kv head's quantized matrix: the query heads of one kv head are stacked along
    # the rows, so K/V keep their own batch shape (MLX's CUDA kernel mishandles broadcast weight batches).
    q = (queries * scale).reshape(batch, n_kv_heads, n_repeats * n_queries, dim)
    scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=bits)
    scores = scores.reshape(batch, n_kv_heads, n_repeats, n_queries, -1).astype(mx.float32)
    n_keys = scores.shape[-1]
    n_real = n_keys if n_valid is None else n_valid
    if mask is not None:
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"unknown mask {mask!r}: expected None, 'causal' or an array")
            mask = mx.arange(n_real - n_queries, n_real)[:, None] >= mx.arange(n_real)[None, :]
        else:
            mask = _heads_grouped_mask(mask, n_kv_heads, n_repeats)
        if n_real < n_keys:
            spare = mx.zeros(mask.shape[:-1] + (n_keys - n_real,), mask.dtype)
            if mask.dtype != mx.bool_:
                spare = spare + mx.finfo(mask.dtype).min
            mask = mx.concatenate([mask, spare], axis=-1)
    elif n_real < n_keys:
        mask = mx.arange(n_keys) < n_real
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.array(mx.finfo(mx.float32).min, mx.float32))
        else:
            scores = scores + mask.astype(mx.float32)
    probs = mx.softmax(scores, axis=-1).astype(values[1].dtype)
    probs = probs.reshape(batch, n_kv_heads, n_repeats * n_queries, -1)
    out = mx.quantized_matmul(probs, *values, transpose=False, group_size=group_size, bits=bits)
    return out.reshape(batch, n_heads, n_queries, -1)


class QuantizedKVCache(_AppendOnly):
    """Keys and values stored as ``mx.quantize`` triples (uniform ``bits``-bit, one scale and bias per
    ``group_size`` values along head_dim), grown in steps like ``KVCache``.

    8 bits costs about half of bfloat16's memory, 4 bits about a quarter (scales and biases included, at group
    size 64). A layer whose head_dim is not a multiple of ``group_size`` cannot be quantized: it warns once
    and stores that layer in float.
    """

    step = 256

    def __init__(self, bits: int = 8, group_size: int = 64) -> None:
        if bits not in QUANTIZED_BITS:
            raise ValueError(f"QuantizedKVCache supports bits in {QUANTIZED_BITS}, got {bits}")
        if group_size not in QUANTIZED_GROUP_SIZES:
            raise ValueError(f"QuantizedKVCache supports group_size in {QUANTIZED_GROUP_SIZES}, got {group_size}")
        self.bits, self.group_size = bits, group_size
        self.keys: list[mx.array] | None = None
        self.values: list[mx.array] | None = None
        self.offset = 0
        self.position_delta: mx.array | int = 0
        self.float_fallback: KVCache | None = None
        """Where keys and values go when head_dim does not split into quantization groups."""

    def _fall_back_if_needed(self, keys: mx.array, values: mx.array) -> None:
        if self.keys is not None or self.float_fallback is not None:
            return
        key_dim, value_dim = keys.shape[-1], values.shape[-1]
        if key_dim % self.group_size == 0 and value_dim % self.group_size == 0:
            return
        dims = str(key_dim) if key_dim == value_dim else f"{key_dim} (keys) / {value_dim} (values)"
        # Python's default filter shows one message per text: one warning for all layers of a model.
        warnings.warn(
            f"QuantizedKVCache: head dim {dims} is not a multiple of group size {self.group_size} "
            "(mx.quantize groups the last axis), so this layer's keys/values stay unquantized in "
            f"{keys.dtype}; choose a group size that divides the head dim to quantize it",
            stacklevel=4,
        )
        self.float_fallback = self._float_cache()

    def _float_cache(self) -> KVCache:
        return KVCache()

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[list[mx.array], list[mx.array]] | tuple[mx.array, mx.array]:
        self._fall_back_if_needed(keys, values)
        if self.float_fallback is not None:
            fetched = self.float_fallback.update_and_fetch(keys, values)
            self.offset = self.float_fallback.offset
            return fetched
        start, n_new = self.offset, keys.shape[2]
        new_keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        new_values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        if self.keys is None or start + n_new > self.keys[0].shape[2]:
            self._grow(new_keys, new_values, n_new)
        self.offset += n_new
        for stored, new in zip(self.keys + self.values, new_keys + new_values):
            stored[..., start : self.offset, :] = new
        return self._fetch(self.keys), self._fetch(self.values)

    def _fetch(self, parts: list[mx.array]) -> list[mx.array]:
        return [a[..., : self.offset, :] for a in parts]

    def _grow(self, new_keys: Quantized, new_values: Quantized, n_new: int) -> None:
        capacity = _round_up(self.offset + n_new, self.step)
        if self.keys is None:
            self.keys = [_with_room(a[..., :0, :], capacity) for a in new_keys]
            self.values = [_with_room(a[..., :0, :], capacity) for a in new_values]
        else:
            self.keys = [_with_room(a, capacity) for a in self._fetch(self.keys)]
            self.values = [_with_room(a, capacity) for a in self._fetch(self.values)]

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None
    ) -> mx.array:
        stored_keys, stored_values = self.update_and_fetch(keys, values)
        if self.float_fallback is not None:
            return attention(queries, stored_keys, stored_values, scale=scale, mask=mask)
        if queries.shape[2] == 1 and fast_decode_applies(AFFINE_DECODE, mask):  # VLM_KERNELS_BACKEND=cuda
            quantization = {"bits": self.bits, "group_size": self.group_size}
            return affine_decode_attention(
                queries, self.keys, self.values, scale=scale, mask=mask, length=self.offset, **quantization
            )
        return quantized_attention(
            queries,
            self.keys,
            self.values,
            scale=scale,
            mask=mask,
            bits=self.bits,
            group_size=self.group_size,
            n_valid=self.offset,
        )

    def attend_shared(self, queries: mx.array, *, scale: float, mask: mx.array | str | None) -> mx.array:
        if self.float_fallback is not None:  # append-only: what it stores is what the last attend used
            keys, values = self.float_fallback.state
            return attention(queries, keys, values, scale=scale, mask=mask)
        return quantized_attention(
            queries,
            self.keys,
            self.values,
            scale=scale,
            mask=mask,
            bits=self.bits,
            group_size=self.group_size,
            n_valid=self.offset,
        )

    @property
    def state(self) -> list[mx.array]:
        """Six arrays (key packed/scales/biases, then the values'), or two float arrays for a fallback layer."""
        if self.float_fallback is not None:
            return self.float_fallback.state
        if self.keys is None:
            return []
        return self._fetch(self.keys) + self._fetch(self.values)

    @property
    def meta_state(self) -> dict[str, str]:
        storage = "float" if self.float_fallback is not None else "quantized"
        return {
            "offset": str(self.offset),
            "bits": str(self.bits),
            "group_size": str(self.group_size),
            "storage": storage,
        }

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> QuantizedKVCache:
        offset, bits, group_size = _meta_ints(meta_state, "offset", "bits", "group_size")
        cache = cls(bits, group_size)
        if meta_state.get("storage") == "float":
            cache.float_fallback = KVCache.from_state(state, {"offset": str(offset)})
        elif state:
            cache.keys, cache.values = list(state[:3]), list(state[3:])
        cache.offset = offset
        return cache

    def trim(self, n: int) -> int:
        dropped = super().trim(n)
        if self.float_fallback is not None:
            self.float_fallback.trim(dropped)
        return dropped

    def __repr__(self) -> str:
        return f"QuantizedKVCache(bits={self.bits}, group_size={self.group_size}, offset={self.offset})"


class ArraysCache:
    """A fixed number of state slots (``cache[i]``), for recurrent and linear-attention layers.

    Such a layer keeps a constant-size summary of everything it has seen, so the state cannot be rolled back:
    ``trim`` drops nothing. The layer calls ``advance(n)`` after consuming ``n`` tokens to keep ``offset``.
    """

    splits_into_blocks = False  # a summary of all tokens, no slot per token
    keeps_boundary_state = False

    def __init__(self, size: int) -> None:
        self.slots: list[mx.array | None] = [None] * size
        self.offset = 0
        self.position_delta: mx.array | int = 0

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index: int) -> mx.array | None:
        return self.slots[index]

    def __setitem__(self, index: int, value: mx.array | None) -> None:
        self.slots[index] = value

    def advance(self, n_tokens: int) -> None:
        self.offset += n_tokens

    @property
    def state(self) -> list[mx.array]:
        return [a for a in self.slots if a is not None]

    @property
    def meta_state(self) -> dict[str, str]:
        filled = [str(i) for i, a in enumerate(self.slots) if a is not None]
        return {"offset": str(self.offset), "size": str(len(self.slots)), "filled": ",".join(filled)}

    @classmethod
    def from_state(cls, state: list[mx.array], meta_state: dict[str, str]) -> ArraysCache:
        offset, size = _meta_ints(meta_state, "offset", "size")
        filled = [int(i) for i in meta_state["filled"].split(",") if i]
        if len(filled) != len(state):
            raise ValueError(f"ArraysCache: {len(state)} arrays for {len(filled)} filled slots")
        cache = cls(size)
        for index, array in zip(filled, state):
            cache.slots[index] = array
        cache.offset = offset
        return cache

    def is_trimmable(self) -> bool:
        return False

    def can_trim_after(self, n_new: int) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def __repr__(self) -> str:
        return f"ArraysCache(size={len(self.slots)}, offset={self.offset})"


def cache_nbytes(cache: list[Cache]) -> int:
    return sum(c.nbytes for c in cache)
