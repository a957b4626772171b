"""A bounded LRU of projected vision features, keyed by image content.

A model's ``embed_prompt(..., vision_cache=cache)`` looks each image up by ``content_key`` of its preprocessed
pixels, its grid and the model's identity, and runs the vision tower only for the images the cache lacks. Keys
come from content, never from file paths, so a file rewritten in place misses.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

__all__ = ["DEFAULT_MAX_ENTRIES", "VisionFeatureCache", "content_key", "model_identity"]

DEFAULT_MAX_ENTRIES = 20


class VisionFeatureCache:
    """Least-recently-used map from ``content_key`` strings to (tokens, hidden) feature arrays.

    Thread-safe: a server thread and an engine thread may share one cache. ``hits`` and ``misses`` count
    ``get`` calls.
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"VisionFeatureCache needs max_entries >= 1 (an int), got {max_entries!r}")
        self._max_entries = max_entries
        self._entries: OrderedDict[str, mx.array] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    @property
    def max_entries(self) -> int:
        return self._max_entries

    @property
    def hits(self) -> int:
        return self._hits

    @property
    def misses(self) -> int:
        return self._misses

    def get(self, key: str) -> mx.array | None:
        """The features stored under ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return features

    def put(self, key: str, features: mx.array) -> None:
        """Store ``features`` under ``key`` as the most recently used entry, evicting the least recently used
        beyond ``max_entries``."""
        # Evaluate before sharing: an entry must be plain data, not a lazy graph that another thread (with its
        # own stream) would run again, or that would keep the whole vision forward pass alive.
        mx.eval(features)
        with self._lock:
            self._entries[key] = features
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency or the counters."""
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self._hits = 0
            self._misses = 0

    def __repr__(self) -> str:
        return f"VisionFeatureCache(entries={len(self)}/{self._max_entries}, hits={self._hits}, misses={self._misses})"


def content_key(*parts: Any) -> str:
    """A hex digest (SHA-256) of ``parts``: numpy or MLX arrays (data, shape and dtype), str, bytes, int,
    float, bool, None, and tuples or lists of those. Each part is tagged with its type and length, so
    ``("ab", "c")`` and ``("a", "bc")``, or an int and its decimal string, never collide."""
    # SHA-256, not blake2b: OpenSSL's uses the CPU's SHA instructions, about twice blake2b's speed on
    # megabytes of pixels, and this runs on every image of every request.
    digest = hashlib.sha256()
    for part in parts:
        _update(digest, part)
    return digest.hexdigest()


_IDENTITY_ATTRIBUTE = "_vlm_identity_memo"


def model_identity(owner: Any, weights: Sequence[mx.array], *parts: Any) -> str:
    """``content_key(*parts, weights)``, remembered on ``owner`` (a model) while ``parts`` are equal and the
    very same weight arrays are in place.

    Hashing megabytes of weights on every request costs more than a GPU's vision tower. MLX arrays are
    immutable, and loading or updating weights puts new array objects in place, so identity of the objects is
    enough to know the digest still holds.
    """
    weights = tuple(weights)
    memo = getattr(owner, _IDENTITY_ATTRIBUTE, None)
    if memo is not None:
        old_weights, old_parts, key = memo
        if (
            old_parts == parts
            and len(old_weights) == len(weights)
            and all(a is b for a, b in zip(old_weights, weights))
        ):
            return key
    key = content_key(*parts, list(weights))
    # object.__setattr__: an nn.Module would take a tuple of arrays for parameters.
    object.__setattr__(owner, _IDENTITY_ATTRIBUTE, (weights, parts, key))
    return key


def _update(digest: Any, part: Any) -> None:
    # Arrays hash by value: an MLX and a numpy array with the same data, shape and dtype give the same key.
    if isinstance(part, mx.array):
        _update_array(digest, _mx_to_numpy(part), str(part.dtype).removeprefix("mlx.core."))
    elif isinstance(part, (np.ndarray, np.generic)):
        _update_array(digest, np.asarray(part), str(part.dtype))
    elif isinstance(part, bool):  # before int: bool is an int subclass
        _update_bytes(digest, b"bool", b"1" if part else b"0")
    elif isinstance(part, int):
        _update_bytes(digest, b"int", str(part).encode())
    elif isinstance(part, float):
        _update_bytes(digest, b"float", part.hex().encode())
    elif isinstance(part, str):
        _update_bytes(digest, b"str", part.encode("utf-8"))
    elif isinstance(part, (bytes, bytearray, memoryview)):
        _update_bytes(digest, b"bytes", bytes(part))
    elif part is None:
        _update_bytes(digest, b"none", b"")
    elif isinstance(part, (tuple, list)):
        _update_bytes(digest, b"seq", str(len(part)).encode())
        for item in part:
            _update(digest, item)
    else:
        raise TypeError(f"content_key cannot hash a {type(part).__name__}")


def _update_bytes(digest: Any, tag: bytes, data: bytes) -> None:
    digest.update(tag + b":" + str(len(data)).encode() + b":")
    digest.update(data)


def _update_array(digest: Any, array: np.ndarray, dtype: str) -> None:
    # The shape and dtype go in with the bytes: the same bytes as (2, 6) or (3, 4), or as float32 or int32,
    # are different inputs.
    _update_bytes(digest, b"array", f"{dtype}{tuple(array.shape)}".encode())
    data = np.ascontiguousarray(array)
    digest.update(str(data.nbytes).encode() + b":")
    digest.update(data)


def _mx_to_numpy(array: mx.array) -> np.ndarray:
    # numpy has no bfloat16: hash its raw 16-bit patterns (the dtype string still goes into the key).
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return np.asarray(array)
