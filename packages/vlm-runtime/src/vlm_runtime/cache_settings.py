"""How a request wants its KV cache stored (bounded window, quantized) and the factory that applies it.

Models decide their cache layout (``make_cache()``: one cache per layer, maybe recurrent or sliding-window
layers among them); the settings are applied on top, to every layer that can honour them. A setting is never
dropped silently: layers that keep their own cache are named in one warning.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

from vlm_kernels.turboquant import TURBOQUANT_BITS

from .cache import (
    QUANTIZED_BITS,
    QUANTIZED_GROUP_SIZES,
    Cache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
)
from .field_types import check_field_types
from .turboquant_cache import TurboQuantKVCache

__all__ = ["QUANT_SCHEMES", "CacheSettings", "make_layer_caches"]


QUANT_SCHEMES = ("affine", "turboquant")


@dataclass(frozen=True)
class CacheSettings:
    """``max_kv_size``: keep at most this many tokens per attention layer (a sliding window), so memory stays
    bounded in long generations. ``kv_bits``: store keys/values quantized, by ``kv_quant_scheme``:

    * ``"affine"`` (``QuantizedKVCache``): 4 or 8 bits, ``kv_group_size`` values (32, 64 or 128) sharing a scale
      and bias;
    * ``"turboquant"`` (``TurboQuantKVCache``): 2, 2.5, 3, 3.5 or 4 bits; x.5 means x-bit keys and (x+1)-bit
      values (3.5: 3-bit keys, 4-bit values); ``kv_key_bits`` / ``kv_value_bits`` set either side (x.5 there:
      half the channels one bit wider).

    A sliding window and quantization cannot be combined.
    """

    max_kv_size: int | None = None
    kv_bits: float | None = None
    kv_group_size: int = 64
    kv_quant_scheme: str = "affine"
    kv_key_bits: float | None = None
    kv_value_bits: float | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.max_kv_size is not None and self.max_kv_size < 1:
            raise ValueError(f"max_kv_size must be a positive number of tokens, got {self.max_kv_size}")
        if self.kv_quant_scheme not in QUANT_SCHEMES:
            raise ValueError(f"kv_quant_scheme must be one of {QUANT_SCHEMES}, got {self.kv_quant_scheme!r}")
        if self.kv_group_size not in QUANTIZED_GROUP_SIZES:
            raise ValueError(f"kv_group_size must be one of {QUANTIZED_GROUP_SIZES}, got {self.kv_group_size}")
        if self.kv_quant_scheme == "affine":
            self._check_affine()
        elif self.quantized:
            self.turboquant_bits  # noqa: B018 (the property raises on bad bits)
        if self.max_kv_size is not None and self.quantized:
            raise ValueError(
                "max_kv_size and kv_bits cannot be combined (no cache is both a sliding window and quantized): "
                "choose one"
            )

    def _check_affine(self) -> None:
        if self.kv_key_bits is not None or self.kv_value_bits is not None:
            raise ValueError("kv_key_bits / kv_value_bits need kv_quant_scheme='turboquant'")
        if self.kv_bits is not None and self.kv_bits not in QUANTIZED_BITS:
            raise ValueError(
                f"kv_bits must be one of {QUANTIZED_BITS} for the affine scheme (or None for float), got "
                f"{self.kv_bits}; kv_quant_scheme='turboquant' takes {TURBOQUANT_BITS}"
            )

    @property
    def quantized(self) -> bool:
        return self.kv_bits is not None or self.kv_key_bits is not None or self.kv_value_bits is not None

    @property
    def turboquant_bits(self) -> tuple[float, float]:
        """(key bits, value bits) of the TurboQuant scheme."""
        bits = self.kv_bits
        if bits is None and (self.kv_key_bits is None or self.kv_value_bits is None):
            raise ValueError("kv_quant_scheme='turboquant' needs kv_bits, or both kv_key_bits and kv_value_bits")
        if bits is not None and bits not in TURBOQUANT_BITS:
            raise ValueError(f"kv_bits must be one of {TURBOQUANT_BITS} for the turboquant scheme, got {bits}")
        key = self.kv_key_bits if self.kv_key_bits is not None else math.floor(bits)
        value = self.kv_value_bits if self.kv_value_bits is not None else math.ceil(bits)
        for name, side in (("kv_key_bits", key), ("kv_value_bits", value)):
            if side not in TURBOQUANT_BITS:
                raise ValueError(f"{name} must be one of {TURBOQUANT_BITS}, got {side}")
        return key, value

    @property
    def is_default(self) -> bool:
        return self.max_kv_size is None and not self.quantized


def make_layer_caches(model: Any, settings: CacheSettings | None = None) -> list[Cache]:
    """``model.make_cache()`` with each plain ``KVCache`` layer replaced as ``settings`` ask.

    With ``max_kv_size``: plain layers become ``RotatingKVCache(max_kv_size)``, and so do sliding-window
    layers with a larger window; a window already within the bound is kept (it honours it). With ``kv_bits``:
    plain layers become ``QuantizedKVCache`` (``TurboQuantKVCache`` under the turboquant scheme). Any other
    layer (recurrent state, sliding windows under ``kv_bits``, ...) is kept as the model made it, and one warning names those layer types.
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
    if settings.kv_quant_scheme == "turboquant":
        key_bits, value_bits = settings.turboquant_bits
        if type(layer) is KVCache:
            return TurboQuantKVCache(key_bits, value_bits)
        if type(layer) is TurboQuantKVCache and (layer.key_bits, layer.value_bits) == (key_bits, value_bits):
            return layer
        return None
    if type(layer) is KVCache:
        return QuantizedKVCache(settings.kv_bits, settings.kv_group_size)
    if type(layer) is QuantizedKVCache and (layer.bits, layer.group_size) == (settings.kv_bits, settings.kv_group_size):
        return layer
    return None


def _ignored_message(settings: CacheSettings, ignored: Counter[str], n_layers: int) -> str:
    if settings.max_kv_size is not None:
        setting = f"max_kv_size={settings.max_kv_size}"
    elif settings.kv_quant_scheme == "turboquant":
        key_bits, value_bits = settings.turboquant_bits
        setting = f"turboquant KV (keys {key_bits}-bit, values {value_bits}-bit)"
    else:
        setting = f"kv_bits={settings.kv_bits} (group size {settings.kv_group_size})"
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(ignored.items()))
    return (
        f"{setting} is not applied to {sum(ignored.values())} of {n_layers} cache layers ({kinds}): "
        "those layer types keep the cache the model made for them"
    )
