"""A conversation's cache kept between requests, so a shared prefix (a long system prompt, the turns so far)
is computed once.

The cache remembers which tokens it holds. A new prompt reuses the longest common prefix: the cache is trimmed
back to it where the cache type allows (a recurrent layer only to a state it saved, so the prefix may be shorter),
and only the rest is computed. Image tokens are the same id whatever
the image, so a prefix that came with media is reused only by a request with the same media.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import mlx.core as mx

from .cache import Cache
from .cache_io import load_prompt_cache, save_prompt_cache
from .cache_settings import CacheSettings, make_layer_caches
from .vision_cache import content_key

__all__ = ["PromptCache", "Rewindable", "media_key"]

_TEXT_INPUTS = frozenset({"input_ids", "attention_mask"})
_METADATA_KEY = "vlm.prompt_cache"


def media_key(inputs: Mapping[str, mx.array]) -> str | None:
    """A hash of a request's media tensors (pixels, grids, ...); None for a text-only request."""
    media = sorted(k for k in inputs if k not in _TEXT_INPUTS and inputs[k] is not None)
    if not media:
        return None
    return content_key(*[part for k in media for part in (k, inputs[k])])


@runtime_checkable
class Rewindable(Protocol):
    """A cache that can go back only to states it saved (a recurrent layer's): ``rewind_point(n)`` is the longest
    such prefix of at most ``n`` tokens, or None."""

    def rewind_point(self, n_tokens: int) -> int | None: ...


def _reachable(layer: Cache, n: int) -> int | None:
    if isinstance(layer, Rewindable):
        return layer.rewind_point(n)
    return n if layer.is_trimmable() else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """Pass one to ``stream_generate(prompt_cache=...)`` for every turn of a conversation. Not thread-safe: one
    conversation, one generation at a time."""

    def __init__(self) -> None:
        self.layers: list[Cache] | None = None
        self.tokens: list[int] = []
        self.media: str | None = None
        self.settings: CacheSettings | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def reuse(
        self, model: Any, settings: CacheSettings, tokens: list[int], media: str | None
    ) -> tuple[list[Cache], int]:
        """Layers to generate ``tokens`` with, and how many leading tokens they already hold."""
        reusable = self.layers is not None and self.settings == settings and (self.media is None or self.media == media)
        # At least one prompt token must be computed: its logits give the first generated token.
        common = min(_common_prefix(self.tokens, tokens), len(tokens) - 1) if reusable else 0
        held = self._trim_to(common) if common > 0 else 0
        if held > 0:
            return self.layers, held  # type: ignore[return-value]
        self.layers, self.tokens, self.media, self.settings = None, [], None, settings
        return make_layer_caches(model, settings), 0

    def _trim_to(self, n: int) -> int:
        """Trim every layer back to the longest prefix of at most ``n`` tokens that all of them can return to;
        how many tokens they then hold (0: none)."""
        assert self.layers is not None
        if len(self.tokens) == n:
            return n
        points = [_reachable(layer, n) for layer in self.layers]
        if any(p is None for p in points):
            return 0
        point = min(points)  # type: ignore[type-var]
        for layer in self.layers:
            layer.trim(len(self.tokens) - point)
        self.tokens = self.tokens[:point]
        return point

    def record(self, layers: list[Cache], tokens: list[int], media: str | None) -> None:
        """After a generation: ``layers`` hold the first ``offset`` of ``tokens`` (the last generated token may
        never have been fed back)."""
        held = layers[0].offset if layers else 0
        if held > len(tokens) or any(layer.offset != held for layer in layers):
            self.layers, self.tokens, self.media = None, [], None  # inconsistent (an interrupted step): start over
            return
        self.layers, self.tokens = layers, tokens[:held]
        if media is not None:
            self.media = media

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Write the layers and what they hold to a safetensors file; ``metadata`` is kept alongside."""
        if self.layers is None:
            raise ValueError("the prompt cache is empty: generate with it first")
        own = {
            "tokens": self.tokens,
            "media": self.media,
            "settings": None if self.settings is None else vars(self.settings),
        }
        save_prompt_cache(path, self.layers, {**(metadata or {}), _METADATA_KEY: json.dumps(own)})

    @classmethod
    def load(cls, path: str | Path) -> tuple[PromptCache, dict[str, str]]:
        layers, metadata = load_prompt_cache(path)
        raw = metadata.pop(_METADATA_KEY, None)
        if raw is None:
            raise ValueError(f"{path} holds caches but not a PromptCache (no {_METADATA_KEY!r} metadata)")
        own = json.loads(raw)
        cache = cls()
        cache.layers, cache.tokens, cache.media = layers, list(own["tokens"]), own["media"]
        cache.settings = None if own["settings"] is None else CacheSettings(**own["settings"])
        return cache, metadata
