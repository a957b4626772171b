"""Decode steps with fixed shapes, compiled once and replayed every token.

Building a decode step's graph in Python costs more than the device needs to run it for a small model (a few
hundred operations per token, each a Python call, a graph node and a kernel launch). Compiling the step
(``mx.compile``) removes the Python and fuses the elementwise work, but a compiled graph has fixed shapes, and
a growing cache changes its keys' length every token. So for decoding, each layer's cache is swapped for a
*static* twin: a buffer of fixed capacity written at a position held in an array, attended over in full with the
positions not yet written masked out. The step's shapes then stay the same for the whole generation and for
every later one of the same batch size and capacity bucket, which reuse the compiled graph.

After decoding, ``write_back`` returns the tokens to the original caches (a prompt cache may keep them).
Recurrent layers (``RecurrentCache``) have fixed-shape state already; their twin only holds it. Cache kinds
without a static twin (quantized, batched) decode uncompiled, as before.

Measured: on this project's 2-core CPU, about 25% less CPU time per token (tiny Qwen2-VL, float32). On an H200
(MLX 0.32.4, 2B-shaped Qwen2-VL) a decode step is bound by the device, about 4 ms for some 500 kernels, not by
the host (about 1 ms to build the plain graph), and the compiled step was 5% (bf16) to 10% (4-bit) slower: MLX's
fused decode attention takes no array mask, so attention over the fixed buffers runs unfused. Hence
``GenerationConfig.compile_decode`` defaults to the CPU only; a decode-attention kernel that takes the length
(vlm-kernels) would remove that cost.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import KVCache, RotatingKVCache, _round_up
from .masks import AttentionMask
from .protocols import GenerativeModel
from .recurrent_cache import RecurrentCache

__all__ = [
    "CAPACITY_STEP",
    "STATIC_TWINS",
    "CompiledDecode",
    "StaticKVCache",
    "StaticRecurrentCache",
    "StaticRingKVCache",
    "compiled_decode",
]

CAPACITY_STEP = 1024
"""Static buffers hold a multiple of this many tokens: generations of similar length share a compiled step."""


class _Static:
    """What the static twins share: their arrays live in one dict, which the compiled step reads and updates."""

    arrays: dict[str, mx.array]
    capacity: int

    @property
    def offset(self) -> mx.array:
        """Tokens seen so far, as a scalar array (models use it for rotary positions)."""
        return self.arrays["offset"]

    @property
    def position_delta(self) -> mx.array:
        return self.arrays["delta"]

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
        """The slots written once the new token is: every key the query may see (the buffer is attended in
        full, so the mask is never None)."""
        if n_queries != 1 or groups is not None or key_padding is not None:
            raise ValueError("a static cache only decodes: one new token, no groups or padding of its own")
        if window is not None and window < self.capacity:
            raise ValueError("this static cache holds more than the layer's window")
        return mx.arange(self.capacity) <= self.arrays["offset"]

    def signature(self) -> tuple:
        """What a compiled step depends on: the twin's kind and its arrays' shapes and dtypes."""
        return (type(self).__name__, tuple(self.arrays["keys"].shape), self.arrays["keys"].dtype)

    is_ring = False
    """Whether slots are reused round the buffer (a sliding window): it then holds exactly the window."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write the new token at its slot; return the whole buffers (``make_mask`` says which slots count)."""
        if keys.shape[2] != 1:
            raise ValueError("a static cache takes one token per step")
        position = self.arrays["offset"]
        slot = (position % self.capacity if self.is_ring else position).reshape(1)
        for name, new in (("keys", keys), ("values", values)):
            self.arrays[name] = mx.slice_update(self.arrays[name], new.astype(self.arrays[name].dtype), slot, axes=(2,))
        self.arrays["offset"] = position + 1
        return self.arrays["keys"], self.arrays["values"]

    def attend(
        self, queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: AttentionMask
    ) -> mx.array:
        keys, values = self.update_and_fetch(keys, values)
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    def attend_shared(self, queries: mx.array, *, scale: float, mask: AttentionMask) -> mx.array:
        """Another layer's queries over this layer's buffers, as the last ``attend`` left them."""
        keys, values = self.arrays["keys"], self.arrays["values"]
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def _buffer(like: mx.array, capacity: int) -> mx.array:
    shape = list(like.shape)
    shape[2] = capacity
    return mx.zeros(shape, like.dtype)


def _arrays(keys: mx.array, values: mx.array, offset: int, delta: mx.array | int) -> dict[str, mx.array]:
    return {
        "keys": keys,
        "values": values,
        "offset": mx.array(offset, mx.int32),
        "delta": mx.array(delta).astype(mx.int32),
    }


class StaticKVCache(_Static):
    """A ``KVCache``'s tokens in a buffer of ``capacity`` tokens; token p sits at slot p."""

    def __init__(self, arrays: dict[str, mx.array]) -> None:
        self.arrays = arrays
        self.capacity = arrays["keys"].shape[2]

    @classmethod
    def of(cls, layer: KVCache, capacity: int) -> StaticKVCache:
        if layer.keys is None:
            raise ValueError("prefill the cache before decoding from it")
        keys, values = layer.state
        if keys.shape[2] > capacity:
            raise ValueError(f"{keys.shape[2]} tokens do not fit a static cache of {capacity}")
        buffers = []
        for part in (keys, values):
            buffer = _buffer(part, capacity)
            buffer[..., : part.shape[2], :] = part
            buffers.append(buffer)
        return cls(_arrays(*buffers, layer.offset, layer.position_delta))

    def write_back(self, layer: KVCache) -> None:
        offset = int(self.arrays["offset"].item())
        layer.keys, layer.values = self.arrays["keys"], self.arrays["values"]
        layer.offset = offset


class StaticRingKVCache(_Static):
    """A ``RotatingKVCache``'s window as a ring of ``max_size`` slots; token p sits at slot p % max_size. One query
    sees every slot written, in any order, and the ring holds exactly its window."""

    def __init__(self, arrays: dict[str, mx.array]) -> None:
        self.arrays = arrays
        self.capacity = arrays["keys"].shape[2]

    is_ring = True

    @classmethod
    def of(cls, layer: RotatingKVCache, capacity: int) -> StaticRingKVCache:
        state = layer.state
        if not state:
            raise ValueError("prefill the cache before decoding from it")
        keys, values = state  # oldest first: positions offset - n .. offset - 1
        size, n = layer.max_size, keys.shape[2]
        slots = mx.array([p % size for p in range(layer.offset - n, layer.offset)])
        buffers = []
        for part in (keys, values):
            buffer = _buffer(part, size)
            buffer[:, :, slots, :] = part
            buffers.append(buffer)
        return cls(_arrays(*buffers, layer.offset, layer.position_delta))

    def write_back(self, layer: RotatingKVCache) -> None:
        offset = int(self.arrays["offset"].item())
        size = self.capacity
        layer.keys, layer.values = self.arrays["keys"], self.arrays["values"]
        layer.offset = offset
        layer._stored = min(offset, size)
        layer._next = offset % size  # the oldest token's slot once full, the next free one before


class StaticRecurrentCache(_Static):
    """A ``RecurrentCache`` in the compiled step: its conv and recurrent states already have fixed shapes, so the
    twin only holds them (and the offset) as the step's arrays. Decoding never snapshots (``snapshot_split``)."""

    def __init__(self, arrays: dict[str, mx.array]) -> None:
        self.arrays = arrays
        self.capacity = 0

    @classmethod
    def of(cls, layer: RecurrentCache, capacity: int) -> StaticRecurrentCache:
        if layer.conv_state is None or layer.recurrent_state is None:
            raise ValueError("prefill the cache before decoding from it")
        return cls(
            {
                "conv": layer.conv_state,
                "state": layer.recurrent_state,
                "offset": mx.array(layer.offset, mx.int32),
                "delta": mx.array(layer.position_delta).astype(mx.int32),
            }
        )

    def signature(self) -> tuple:
        return (type(self).__name__, tuple(self.arrays["state"].shape), tuple(self.arrays["conv"].shape))

    @property
    def conv_state(self) -> mx.array:
        return self.arrays["conv"]

    @property
    def recurrent_state(self) -> mx.array:
        return self.arrays["state"]

    def token_mask(self, n_tokens: int) -> None:
        return None

    def snapshot_split(self, n_tokens: int) -> None:
        return None

    def update(
        self, conv_state: mx.array, recurrent_state: mx.array, n_tokens: int, snapshot: list[mx.array] | None = None
    ) -> None:
        self.arrays["conv"], self.arrays["state"] = conv_state, recurrent_state
        self.arrays["offset"] = self.arrays["offset"] + n_tokens

    def write_back(self, layer: RecurrentCache) -> None:
        layer.slots = [self.arrays["conv"], self.arrays["state"]]
        layer.offset = int(self.arrays["offset"].item())


STATIC_TWINS: dict[type, Callable[[Any, int], _Static]] = {
    KVCache: StaticKVCache.of,
    RotatingKVCache: StaticRingKVCache.of,
    RecurrentCache: StaticRecurrentCache.of,
}
"""Cache kind -> its static twin, given the layer and the capacity (a plain cache's; a ring keeps its size)."""


class CompiledDecode:
    """One compiled decode step over static twins of a model's prefilled caches."""

    def __init__(
        self, step: Callable[..., mx.array], layers: list[_Static], forget: Callable[[], None], room: int
    ) -> None:
        self._step = step
        self.layers = layers
        self._forget = forget
        self.steps_taken = 0
        self.room = room
        """Tokens the static buffers can still take (a sliding-window ring never fills)."""

    def __call__(self, tokens: mx.array) -> mx.array:
        """Logits (batch, vocab) for one new token per row; the caches advance by one."""
        if self.room <= 0:
            raise ValueError("the static caches are full: write them back and make a larger step")
        logits = self._step(tokens)
        self.steps_taken += 1
        self.room -= 1
        return logits

    def give_up(self, reason: Exception) -> None:
        """The step could not be traced (a model reading its caches in a way the static twins do not offer):
        this layout decodes uncompiled from now on, with one warning."""
        warnings.warn(f"decoding without a compiled step: {type(reason).__name__}: {reason}", stacklevel=3)
        self._forget()

    def write_back(self, caches: Sequence[Any]) -> None:
        for static, layer in zip(self.layers, caches):
            static.write_back(layer)


# id(model) -> {shape key: (compiled step, its cache slots, the weights it was traced with), or None where the
# step could not be traced}. Models (nn.Module is a dict) are not hashable; a finalizer drops a model's entry.
_COMPILED: dict[int, dict[tuple, tuple[Callable[..., mx.array], list[_Static], list[mx.array]] | None]] = {}


def _steps_of(model: Any) -> dict:
    steps = _COMPILED.get(id(model))
    if steps is None:
        steps = _COMPILED[id(model)] = {}
        try:
            weakref.finalize(model, _COMPILED.pop, id(model), None)
        except TypeError:  # cannot be weakly referenced: keep nothing for it
            del _COMPILED[id(model)]
    return steps


def compiled_decode(model: GenerativeModel, caches: Sequence[Any], capacity: int) -> CompiledDecode | None:
    """A compiled decode step for ``caches`` (prefilled, one per layer) with room for ``capacity`` tokens in the
    plain layers, or None where a layer has no static twin. Steps are compiled once per model, batch size,
    capacity bucket and cache layout, and reused.

    The model's weights are constants of the compiled step (reading them as inputs would cost a tree walk per
    token); a step is reused only while the model holds the very arrays it was compiled with, so it never runs
    on stale weights (an adapter loaded, weights swapped).
    """
    if not caches or any(type(c) not in STATIC_TWINS for c in caches):
        return None
    capacity = _round_up(capacity, CAPACITY_STEP)
    layers = [STATIC_TWINS[type(c)](c, capacity) for c in caches]
    key = tuple(s.signature() for s in layers) + tuple(tuple(s.arrays["delta"].shape) for s in layers[:1])
    steps = _steps_of(model)
    weights = _weights_of(model)
    if key in steps and steps[key] is not None and not _same_arrays(steps[key][2], weights):
        del steps[key]  # compiled against other weights
    if key in steps and steps[key] is None:
        return None  # tried before and could not be traced
    if key not in steps:
        slots = [dict(s.arrays) for s in layers]
        holders = [type(s)(arrays) for s, arrays in zip(layers, slots)]

        def step(tokens: mx.array) -> mx.array:
            hidden = model.hidden_states(model.embed_tokens(tokens[:, None]), cache=holders)
            return model.compute_logits(hidden[:, -1, :])

        steps[key] = (mx.compile(step, inputs=slots, outputs=slots), holders, weights)
    compiled, holders, _ = steps[key]
    for holder, static in zip(holders, layers):
        holder.arrays.update(static.arrays)  # this generation's caches in the compiled step's slots
    return CompiledDecode(compiled, holders, lambda: steps.__setitem__(key, None), capacity - caches[0].offset)


def _weights_of(model: Any) -> list[mx.array]:
    """The model's parameter arrays (an ``nn.Module`` is a tree of them); none for other models."""
    return [a for _, a in tree_flatten(model)] if isinstance(model, dict) else []


def _same_arrays(a: list[mx.array], b: list[mx.array]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
