"""How a request wants its KV cache stored (bounded window, quantized) and the factory that applies it.

Models decide their cache layout (``make_cache()``: one cache per layer, maybe recurrent or sliding-window
layers among them); the settings are applied on top, to every layer that can honour them. A setting is never
dropped silently: layers that keep their own cache are named in one warning.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .cache import (
    QUANTIZED_BITS,
    QUANTIZED_GROUP_SIZES,
    Cache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)

__all__ = ["CacheSettings", "make_layer_caches"]


@dataclass(frozen=True)
class CacheSettings:
    """``max_kv_size``: keep at most this many tokens per attention layer (a sliding window), so memory stays
    bounded in long generations. ``kv_bits`` (4 or 8): store keys/values quantized, ``kv_group_size`` values
    (32, 64 or 128) sharing a scale and bias. One of the two at most."""

    max_kv_size: int | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64

    def __post_init__(self) -> None:
        if self.max_kv_size is not None and self.max_kv_size < 1:
            raise ValueError(f"max_kv_size must be a positive number of tokens, got {self.max_kv_size}")
        if self.kv_bits is not None and self.kv_bits not in QUANTIZED_BITS:
            raise ValueError(f"kv_bits must be one of {QUANTIZED_BITS} (or None for float), got {self.kv_bits}")
        if self.kv_group_size not in QUANTIZED_GROUP_SIZES:
            raise ValueError(f"kv_group_size must be one of {QUANTIZED_GROUP_SIZES}, got {self.kv_group_size}")
        if self.max_kv_size is not None and self.kv_bits is not None:
            raise ValueError(
                "max_kv_size and kv_bits cannot be combined (no cache is both a sliding window and quantized): "
                "choose one"
            )

    @property
    def is_default(self) -> bool:
        return self.max_kv_size is None and self.kv_bits is None


def make_layer_caches(model: Any, settings: CacheSettings | None = None) -> list[Cache]:
    """``model.make_cache()`` with each plain ``KVCache`` layer replaced as ``settings`` ask.

    With ``max_kv_size``: plain layers become ``RotatingKVCache(max_kv_size)``, and so do sliding-window
    layers with a larger window; a window already within the bound is kept (it honours it). With ``kv_bits``:
    plain layers become ``QuantizedKVCache``. Any other layer (recurrent state, sliding windows under
    ``kv_bits``, ...) is kept as the model made it, and one warning names those layer types.
    """
    cache = model.make_cache()
    if settings is None or settings.is_default:
        return cache
    ignored: Counter[str] = Counter()
    for i, layer in enumerate(cache):
        converted = _convert(layer, settings)
        if converted is None:
            ignored[type(layer).__name__] += 1
        else:
            cache[i] = converted
    if ignored:
        warnings.warn(_ignored_message(settings, ignored, len(cache)), stacklevel=2)
    return cache


def _convert(layer: Cache, settings: CacheSettings) -> Cache | None:
    """The layer's replacement (maybe itself, when it already complies), or None where it cannot comply."""
    if settings.max_kv_size is not None:
        if type(layer) is KVCache:
            return RotatingKVCache(settings.max_kv_size)
        if type(layer) is RotatingKVCache:
            if layer.max_size <= settings.max_kv_size:
                return layer
            return RotatingKVCache(settings.max_kv_size) if layer.offset == 0 else None
        return None
    assert settings.kv_bits is not None
    if type(layer) is KVCache:
        return QuantizedKVCache(settings.kv_bits, settings.kv_group_size)
    if type(layer) is QuantizedKVCache and (layer.bits, layer.group_size) == (settings.kv_bits, settings.kv_group_size):
        return layer
    return None


def _ignored_message(settings: CacheSettings, ignored: Counter[str], n_layers: int) -> str:
    if settings.max_kv_size is not None:
        setting = f"max_kv_size={settings.max_kv_size}"
    else:
        setting = f"kv_bits={settings.kv_bits} (group size {settings.kv_group_size})"
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(ignored.items()))
    return (
        f"{setting} is not applied to {sum(ignored.values())} of {n_layers} cache layers ({kinds}): "
        "those layer types keep the cache the model made for them"
    )
