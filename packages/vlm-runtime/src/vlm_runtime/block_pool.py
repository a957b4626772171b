"""The prefix cache's keys and its memory tier.

A prompt is cut into blocks of ``block_size`` tokens. Block i's key hashes block i-1's key with block i's
token ids, so a key names the whole prefix up to the end of its block: two prompts share block i's entry only
when everything before it is the same too. The first block's parent is a namespace key (the model, the
settings that change what a cache holds, the tenant), so no entry is ever shared across those. Media
placeholder tokens carry the same id whatever the image, so from the first block that holds a media position
on, the key also hashes the request's media digest (and, through the chain, so do all later blocks).

``BlockPool`` keeps blocks by key up to a count, evicting the least recently used block that no running request
holds (a request holds the blocks it restored until it has prefilled).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import mlx.core as mx

__all__ = ["Block", "BlockPool", "Segment", "block_keys", "joined_layer", "namespace_key"]

KEY_CHARS = 32
"""Hex digits kept of each SHA-256 key: 128 bits, collision-free at any pool size."""


def namespace_key(model_identity: str, cache_settings: Any, tenant: str) -> str:
    """The root of every block key: what a cache's content depends on besides the prompt."""
    settings = vars(cache_settings) if hasattr(cache_settings, "__dataclass_fields__") else cache_settings
    text = json.dumps({"model": model_identity, "cache": settings, "tenant": tenant}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


def _chain(parent: str, tokens: Sequence[int], media: str | None) -> str:
    digest = hashlib.sha256(parent.encode())
    digest.update(b"t" + ",".join(map(str, tokens)).encode())
    if media is not None:
        digest.update(b"m" + media.encode())
    return digest.hexdigest()[:KEY_CHARS]


def block_keys(
    namespace: str, tokens: Sequence[int], block_size: int, media: str | None = None, first_media: int = 0
) -> list[str]:
    """One key per full block of ``tokens``. ``media``: the request's media digest (None for text alone);
    ``first_media``: the first position media fills (blocks ending at or before it are plain text)."""
    keys: list[str] = []
    parent = namespace
    for start in range(0, len(tokens) - block_size + 1, block_size):
        stop = start + block_size
        parent = _chain(parent, tokens[start:stop], media if media is not None and first_media < stop else None)
        keys.append(parent)
    return keys


class Segment:
    """Consecutive blocks of one prompt stored together: ``arrays[i]`` are layer i's state arrays over the
    segment's tokens (the token axis is -2). Blocks view it instead of each holding a copy: cutting a long
    prompt into hundreds of small arrays per layer, and joining them back, costs more on a GPU (a kernel per
    piece) than prefilling the prompt again. A segment's memory goes when the last of its blocks does, so the
    pool counts a segment's bytes while any of its blocks is there."""

    __slots__ = ("arrays", "in_pool", "nbytes")

    def __init__(self, arrays: list[list[mx.array]]) -> None:
        self.arrays = arrays
        self.nbytes = sum(a.nbytes for layer in arrays for a in layer)
        self.in_pool = 0
        """Pool entries viewing this segment."""


class Block:
    """One block of every layer: ``layers[i]`` are layer i's state arrays cut to the block's tokens, viewed in
    ``segment`` at ``[start, stop)`` (``stop`` None: the block is the whole segment, as for whole-state layers'
    arrays, which have no token axis)."""

    __slots__ = ("kinds", "refs", "segment", "start", "stop")

    def __init__(
        self,
        layers: list[list[mx.array]] | None,
        kinds: tuple[tuple[str, str], ...],
        *,
        segment: Segment | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        if (layers is None) == (segment is None):
            raise ValueError("a block takes either its own arrays or a segment to view")
        self.segment = segment if segment is not None else Segment(layers)  # type: ignore[arg-type]
        self.start, self.stop = (start, stop) if segment is not None else (0, None)
        self.kinds = kinds
        """Per layer: its cache class name and its ``meta_state`` without the offset (JSON)."""
        self.refs = 0

    @property
    def layers(self) -> list[list[mx.array]]:
        if self.stop is None:
            return self.segment.arrays
        return [[a[..., self.start : self.stop, :] for a in layer] for layer in self.segment.arrays]

    @property
    def nbytes(self) -> int:
        """What the segment holds for this block (the segment's share, by tokens)."""
        if self.stop is None:
            return self.segment.nbytes
        total = _segment_tokens(self.segment)
        return self.segment.nbytes * (self.stop - self.start) // total if total else 0


def _segment_tokens(segment: Segment) -> int:
    for layer in segment.arrays:
        for a in layer:
            return a.shape[-2]
    return 0


def joined_layer(blocks: Sequence[Block], layer: int) -> list[mx.array]:
    """Layer ``layer``'s state arrays over consecutive ``blocks``: one slice per run of blocks that are
    neighbours in one segment (a prefix stored by one request is one run), joined along the token axis."""
    runs: list[list] = []  # [segment, start, stop]
    for block in blocks:
        if runs and runs[-1][0] is block.segment and runs[-1][2] == block.start and block.stop is not None:
            runs[-1][2] = block.stop
        else:
            runs.append([block.segment, block.start, block.stop])
    count = len(blocks[0].segment.arrays[layer])
    joined = []
    for j in range(count):
        parts = [
            segment.arrays[layer][j] if stop is None else segment.arrays[layer][j][..., start:stop, :]
            for segment, start, stop in runs
        ]
        joined.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-2))
    return joined


class BlockPool:
    """Blocks by key, at most ``max_blocks`` of them and at most ``max_bytes`` of arrays (None: no byte cap;
    a segment's bytes count while any block viewing it is here); LRU eviction skips blocks a request holds. Not thread-safe: ``PrefixCache`` locks around it."""

    def __init__(self, max_blocks: int, max_bytes: int | None = None) -> None:
        if max_blocks < 0:
            raise ValueError(f"the prefix cache's block count must be >= 0, got {max_blocks}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"the prefix cache's memory cap must be >= 0 bytes, got {max_bytes}")
        self.max_blocks = max_blocks
        self.max_bytes = max_bytes
        self._blocks: OrderedDict[str, Block] = OrderedDict()
        self._nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: str) -> bool:
        return key in self._blocks

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def matched(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` the pool holds."""
        n = 0
        while n < len(keys) and keys[n] in self._blocks:
            n += 1
        return n

    def acquire(self, keys: Sequence[str]) -> list[Block]:
        """The blocks of ``keys`` (all held), each referenced once more and made most recent: the deepest
        first, so that a prefix's tail is evicted before its head (a head without its tail still hits)."""
        blocks = [self._blocks[k] for k in keys]
        for key, block in zip(reversed(keys), reversed(blocks)):
            block.refs += 1
            self._blocks.move_to_end(key)
        return blocks

    def touch(self, key: str) -> Block | None:
        """The block under ``key`` (made most recent, not held), or None."""
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            block = self._blocks.get(key)
            if block is not None and block.refs > 0:
                block.refs -= 1
        self._evict()

    def put(self, key: str, block: Block) -> bool:
        """Keep ``block`` under ``key`` (an existing entry is only touched); False when the pool is full of
        held blocks and cannot take it."""
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return True
        self._blocks[key] = block
        self._count_in(block)
        self._evict()
        return key in self._blocks

    def _over(self) -> bool:
        return len(self._blocks) > self.max_blocks or (self.max_bytes is not None and self._nbytes > self.max_bytes)

    def _evict(self) -> None:
        if not self._over():
            return
        for key in [k for k, b in self._blocks.items() if b.refs == 0]:
            if not self._over():
                break
            self._count_out(self._blocks.pop(key))
            self.evictions += 1

    def clear(self) -> int:
        """Drop every block no request holds; how many were dropped."""
        idle = [k for k, b in self._blocks.items() if b.refs == 0]
        for key in idle:
            self._count_out(self._blocks.pop(key))
        return len(idle)

    def _count_in(self, block: Block) -> None:
        if block.segment.in_pool == 0:
            self._nbytes += block.segment.nbytes
        block.segment.in_pool += 1

    def _count_out(self, block: Block) -> None:
        block.segment.in_pool -= 1
        if block.segment.in_pool == 0:
            self._nbytes -= block.segment.nbytes
