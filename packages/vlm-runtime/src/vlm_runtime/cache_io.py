"""A whole prompt cache (one cache per layer) to and from one safetensors file.

Arrays are stored as ``layer.{i}.{j}`` (the j-th array of layer i's ``state``); the metadata records each
layer's class name, ``meta_state`` and position delta. Only the classes in ``CACHE_CLASSES`` are rebuilt:
the file names a class, it never says what to import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from .batch_cache import BatchKVCache, BatchQuantizedKVCache, BatchRotatingKVCache
from .cache import ArraysCache, Cache, KVCache, QuantizedKVCache, RotatingKVCache
from .recurrent_cache import BatchRecurrentCache, RecurrentCache
from .turboquant_cache import BatchTurboQuantKVCache, TurboQuantKVCache

__all__ = ["CACHE_CLASSES", "load_prompt_cache", "register_cache_class", "save_prompt_cache"]

CACHE_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        KVCache,
        RotatingKVCache,
        QuantizedKVCache,
        ArraysCache,
        BatchKVCache,
        BatchRotatingKVCache,
        BatchQuantizedKVCache,
        RecurrentCache,
        BatchRecurrentCache,
        TurboQuantKVCache,
        BatchTurboQuantKVCache,
    )
}
"""The cache classes a file may name; a model package with its own cache class adds it explicitly."""

_FORMAT_KEY = "vlm_runtime.prompt_cache"
_FORMAT_VERSION = "1"
_USER_PREFIX = "user."
_ARRAY_DELTA = "array"


def register_cache_class(cls: type) -> type:
    """Let ``load_prompt_cache`` rebuild ``cls`` (it must implement ``Cache``, ``from_state`` included).
    Usable as a class decorator."""
    CACHE_CLASSES[cls.__name__] = cls
    return cls


def save_prompt_cache(path: str | Path, cache: list[Cache], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``cache`` and the string-to-string ``metadata`` to the safetensors file ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a prompt cache file needs the .safetensors suffix, got {path.name!r}")
    arrays: dict[str, mx.array] = {}
    meta = {_FORMAT_KEY: _FORMAT_VERSION, "n_layers": str(len(cache))}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"prompt cache metadata must map str to str, got {key!r}: {type(value).__name__}")
        meta[_USER_PREFIX + key] = value
    for i, layer in enumerate(cache):
        name = type(layer).__name__
        if CACHE_CLASSES.get(name) is not type(layer):
            raise TypeError(f"layer {i}: {name} is not a registered cache class (see register_cache_class)")
        state = layer.state
        arrays.update({f"layer.{i}.{j}": a for j, a in enumerate(state)})
        meta[f"layer.{i}.class"] = name
        meta[f"layer.{i}.n_arrays"] = str(len(state))
        meta[f"layer.{i}.meta"] = json.dumps(layer.meta_state)
        delta = layer.position_delta
        if isinstance(delta, mx.array):
            arrays[f"layer.{i}.position_delta"] = delta
            meta[f"layer.{i}.position_delta"] = _ARRAY_DELTA
        else:
            meta[f"layer.{i}.position_delta"] = str(int(delta))
    mx.save_safetensors(str(path), arrays, metadata=meta)


def load_prompt_cache(path: str | Path) -> tuple[list[Cache], dict[str, str]]:
    """The caches saved by ``save_prompt_cache`` and the metadata given to it."""
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as error:  # MLX raises plain exceptions for missing / malformed files
        raise ValueError(f"{path}: cannot read a safetensors prompt cache ({error})") from error
    if meta.get(_FORMAT_KEY) != _FORMAT_VERSION:
        raise ValueError(f"{path} is not a prompt cache saved by save_prompt_cache (no {_FORMAT_KEY!r} metadata)")
    cache = [_load_layer(i, arrays, meta) for i in range(int(meta["n_layers"]))]
    user = {k[len(_USER_PREFIX) :]: v for k, v in meta.items() if k.startswith(_USER_PREFIX)}
    return cache, user


def _load_layer(i: int, arrays: dict[str, mx.array], meta: dict[str, str]) -> Cache:
    name = meta[f"layer.{i}.class"]
    cls = CACHE_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"layer {i}: unknown cache class {name!r}; known: {sorted(CACHE_CLASSES)}")
    state = [arrays[f"layer.{i}.{j}"] for j in range(int(meta[f"layer.{i}.n_arrays"]))]
    layer = cls.from_state(state, json.loads(meta[f"layer.{i}.meta"]))
    delta = meta[f"layer.{i}.position_delta"]
    layer.position_delta = arrays[f"layer.{i}.position_delta"] if delta == _ARRAY_DELTA else int(delta)
    return layer
