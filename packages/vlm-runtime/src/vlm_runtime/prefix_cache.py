"""Automatic prefix caching: prompts that start the same (a system prompt, tools, documents, images) reuse the
keys and values computed for that start, by content, across requests and (with a disk tier) across restarts.

``lookup`` cuts a prompt into blocks (``block_pool.block_keys``: chained content keys, media included), finds
the longest run of leading blocks held in memory or on disk, and rebuilds the layers' caches from them; only
the rest of the prompt is then prefilled. ``store`` keeps the prompt's blocks once it is prefilled. The
single-stream loop (``stream_generate(prefix_cache=...)``) and the batching engine both drive it.

Only caches that keep one slot per token (``Cache.splits_into_blocks``: plain, affine-quantized and TurboQuant
keys/values) are cut into blocks. Layers that summarise the whole prefix in a fixed-size state
(``Cache.keeps_boundary_state``: Qwen3.5's recurrent layers) are kept whole, at one block boundary per prompt
(``SNAPSHOT_MARGIN`` or more tokens before its end, where the next turn of a chat still agrees with it): a later
prompt reuses the blocks up to the deepest boundary whose state was kept. A model with any other layer (a
sliding window) is skipped, with one log line per cache: its prompts are computed as without the cache.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .block_pool import Block, BlockPool, Segment, block_keys, joined_layer, namespace_key
from .cache import Cache
from .cache_settings import CacheSettings, make_layer_caches
from .prefix_disk import DiskTier
from .prompt_cache import media_key
from .protocols import GenerativeModel, PromptEmbedding
from .recurrent_cache import SNAPSHOT_MARGIN

__all__ = ["PrefixCache", "PrefixCacheSettings", "PrefixCacheStats", "PrefixMatch"]

_log = logging.getLogger("vlm_runtime.prefix_cache")
_STATE = "#state"
"""Suffix of the key under which whole-state layers' arrays at a block's end are kept."""


@dataclass(frozen=True)
class PrefixCacheSettings:
    """``block_size`` tokens per block (a prompt reuses whole blocks only); at most ``max_blocks`` blocks and
    ``max_bytes`` of them in memory (the byte cap is what keeps a large model's cache within reach: a 32B model's
    keys and values take some 250 KB per token); with ``disk_dir``, blocks are also written there, up to
    ``disk_max_bytes``."""

    block_size: int = 16
    max_blocks: int = 4096
    max_bytes: int = 2 * 2**30
    disk_dir: str | Path | None = None
    disk_max_bytes: int = 16 * 2**30

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"the prefix cache's block size must be >= 1, got {self.block_size}")
        if self.max_blocks < 1:
            raise ValueError(f"the prefix cache needs room for at least one block, got {self.max_blocks}")
        if self.max_bytes < 1:
            raise ValueError(f"the prefix cache's memory cap must be positive, got {self.max_bytes} bytes")
        if self.disk_max_bytes < 1:
            raise ValueError(f"the prefix cache's disk cap must be positive, got {self.disk_max_bytes} bytes")


@dataclass(frozen=True)
class PrefixCacheStats:
    """Counters since the cache was made (or reset); sizes now."""

    hits: int
    """Lookups that reused at least one block."""
    misses: int
    matched_tokens: int
    """Prompt tokens reused, summed over lookups."""
    skipped: int
    """Lookups for models whose caches cannot be cut into blocks."""
    stored_blocks: int
    evictions: int
    memory_blocks: int
    memory_bytes: int
    disk_hits: int
    """Blocks read back from disk."""
    disk_writes: int
    disk_corrupt: int
    """Shards found corrupt or truncated (each removed, never loaded)."""
    disk_evictions: int
    disk_blocks: int
    disk_bytes: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PrefixMatch:
    """A prompt's lookup: ``layers`` to prefill it into, already holding its first ``cached_tokens``."""

    layers: list[Cache]
    cached_tokens: int = 0
    keys: list[str] = field(default_factory=list)
    """The key of each full block of the prompt (empty when the model is skipped)."""
    held: list[str] = field(default_factory=list)
    """Keys whose blocks this request holds in the pool until it is released."""
    snapshot_at: int = 0
    """For a model with whole-state layers: the boundary whose state this prompt's prefill keeps (0: none)."""

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


class PrefixCache:
    """One model's prefix cache (``model_id`` names it, with its weights and adapter: blocks are only valid
    for the weights that computed them). Thread-safe: the engine thread looks up and stores while server
    threads read stats or reset it. ``close()`` stops the disk writer once queued shards are written."""

    def __init__(self, settings: PrefixCacheSettings = PrefixCacheSettings(), *, model_id: str = "") -> None:
        if settings.disk_dir is not None and not model_id:
            raise ValueError("a prefix cache with a disk tier needs a model_id (what computed its blocks)")
        self.settings, self.model_id = settings, model_id
        self._pool = BlockPool(settings.max_blocks, settings.max_bytes)
        self._disk = DiskTier(settings.disk_dir, settings.disk_max_bytes) if settings.disk_dir is not None else None
        self._lock = threading.Lock()
        self._bound: GenerativeModel | None = None
        self._identity = ""
        self._skip_logged: set[str] = set()
        self._counts = dict(hits=0, misses=0, matched_tokens=0, skipped=0, stored_blocks=0)

    # -- lookups
    def lookup(
        self,
        model: GenerativeModel,
        cache_settings: CacheSettings,
        prompt_ids: Sequence[int],
        inputs: Mapping[str, mx.array],
        prompt: PromptEmbedding,
        tenant: str = "",
    ) -> PrefixMatch:
        """Layers for ``prompt`` (its ``prompt_ids``, embedded), holding the longest prefix this cache has of it
        under ``tenant``. At least one prompt token is always left to compute (its logits give the first
        generated token). Release the match after prefilling (``store``, then ``release``)."""
        layers = make_layer_caches(model, cache_settings)
        unsplit = [type(layer).__name__ for layer in layers if not layer.splits_into_blocks]
        whole = [layer for layer in layers if not layer.splits_into_blocks and layer.keeps_boundary_state]
        if len(whole) < len(unsplit):
            self._note_skip(unsplit)
            return PrefixMatch(layers)
        size = self.settings.block_size
        keys = self._keys(model, cache_settings, prompt_ids, inputs, prompt, tenant)
        usable = _usable_blocks(prompt, len(prompt_ids), size)
        held, blocks = self._find(keys[:usable])
        match = PrefixMatch(layers, keys=keys, held=held)
        state = None
        if whole and blocks:
            # Whole-state layers restore only at a boundary whose state was kept: the deepest one found.
            depth = len(blocks)
            while depth and (state := self._find_state(keys[depth - 1])) is None:
                depth -= 1
            blocks = blocks[:depth]
        if blocks and all(b.kinds[i][0] == type(layer).__name__ for b in blocks for i, layer in enumerate(layers)):
            match.cached_tokens = len(blocks) * size
            match.layers = _rebuild(layers, blocks, match.cached_tokens, state)
        if whole:
            # The boundary this prompt keeps: SNAPSHOT_MARGIN tokens or more before its end (a chat's next turn
            # rewrites the generation prompt), past what was restored.
            boundary = (len(prompt_ids) - SNAPSHOT_MARGIN) // size * size
            if boundary > match.cached_tokens and boundary // size <= usable:
                match.snapshot_at = boundary
                for layer in match.layers:
                    if layer.keeps_boundary_state:
                        layer.snapshot_at = boundary
        with self._lock:
            self._counts["hits" if match.cached_tokens else "misses"] += 1
            self._counts["matched_tokens"] += match.cached_tokens
        return match

    def _keys(
        self,
        model: GenerativeModel,
        cache_settings: CacheSettings,
        prompt_ids: Sequence[int],
        inputs: Mapping[str, mx.array],
        prompt: PromptEmbedding,
        tenant: str,
    ) -> list[str]:
        namespace = namespace_key(self._identity_of(model), cache_settings, tenant)
        media = media_key(inputs)
        first = _first_media_position(model, inputs, prompt) if media is not None else 0
        return block_keys(namespace, list(prompt_ids), self.settings.block_size, media, first)

    def _identity_of(self, model: GenerativeModel) -> str:
        if self._bound is not model:
            if self._bound is not None and not self.model_id:
                raise ValueError("this PrefixCache holds another model's blocks: give each model its own (or model_id)")
            # The dtype the weights compute in changes every block: part of the identity, whatever model_id says.
            dtype = model.embed_tokens(mx.zeros((1, 1), mx.int32)).dtype
            kind = f"{type(model).__module__}.{type(model).__qualname__}"
            self._bound, self._identity = model, f"{self.model_id}|{kind}|{dtype}"
        return self._identity

    def _find(self, keys: list[str]) -> tuple[list[str], list[Block]]:
        """The leading blocks of ``keys`` from memory, then from disk (read back into memory); their keys
        held in the pool."""
        with self._lock:
            n = self._pool.matched(keys)
            blocks = self._pool.acquire(keys[:n])
        held = list(keys[:n])
        if self._disk is None:
            return held, blocks
        for key in keys[n:]:
            block = self._disk.read(key) if key in self._disk else None
            if block is None:
                break
            blocks.append(block)
            with self._lock:
                if self._pool.put(key, block):
                    self._pool.acquire([key])
                    held.append(key)
        self._disk.forget()
        return held, blocks

    def _find_state(self, key: str) -> Block | None:
        """The whole-state layers' arrays kept at the boundary of block ``key``, from memory or disk."""
        state_key = key + _STATE
        with self._lock:
            block = self._pool.touch(state_key)  # the caller keeps the arrays: no reference needed
        if block is not None or self._disk is None or state_key not in self._disk:
            return block
        block = self._disk.read(state_key)
        if block is not None:
            with self._lock:
                self._pool.put(state_key, block)
        return block

    def _note_skip(self, kinds: list[str]) -> None:
        with self._lock:
            self._counts["skipped"] += 1
            names = ", ".join(sorted(set(kinds)))
            if names in self._skip_logged:
                return
            self._skip_logged.add(names)
        _log.info(
            "prefix cache: skipped for this model (%d %s layer(s) cannot be cut into blocks); its prompts are "
            "computed in full",
            len(kinds),
            names,
        )

    # -- storing
    def store(self, match: PrefixMatch, layers: list[Cache]) -> None:
        """Keep the blocks of the prompt ``layers`` now hold (call right after prefilling it). A failure here
        (out of memory, say) is logged and costs the cache, never the request."""
        if not match.enabled:
            return
        try:
            self._store(match, layers)
        except Exception as error:
            _log.warning("prefix cache: could not keep a prompt's blocks: %s: %s", type(error).__name__, error)

    def _store(self, match: PrefixMatch, layers: list[Cache]) -> None:
        size = self.settings.block_size
        states = [layer.state for layer in layers]
        if not all(states):
            return  # a layer that stores nothing of its own (one sharing another's keys): nothing to rebuild it from
        kinds = tuple((type(layer).__name__, _meta_without_offset(layer)) for layer in layers)
        with self._lock:
            missing = [
                i
                for i, key in enumerate(match.keys)
                if key not in self._pool or (self._disk is not None and key not in self._disk)
            ]
        # Each run of neighbouring new blocks becomes one segment: one copy per layer array, not one per block.
        runs: list[list[int]] = []
        for index in missing:
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        new: list[tuple[list[str], Segment | Block]] = []
        for run in runs:
            start, stop = run[0] * size, (run[-1] + 1) * size
            cut = [
                [mx.contiguous(a[..., start:stop, :]) for a in state] if layer.splits_into_blocks else []
                for layer, state in zip(layers, states)
            ]
            new.append(([match.keys[i] for i in run], Segment(cut)))
        kept = _boundary_state(match, layers, kinds)
        if kept is not None:
            new.append(([match.keys[match.snapshot_at // size - 1] + _STATE], kept))
        if not new:
            return
        mx.eval([part.arrays if isinstance(part, Segment) else part.layers for _, part in new])
        with self._lock:
            for keys, part in reversed(new):  # the tail first: a short pool keeps the head
                for offset in reversed(range(len(keys))):
                    if isinstance(part, Segment):
                        block = Block(None, kinds, segment=part, start=offset * size, stop=(offset + 1) * size)
                    else:
                        block = part
                    if keys[offset] not in self._pool and self._pool.put(keys[offset], block):
                        self._counts["stored_blocks"] += 1
        if self._disk is not None:
            for keys, part in new:
                self._disk.write(keys, part, kinds, size)

    def release(self, match: PrefixMatch) -> None:
        """Let the pool evict the blocks ``match`` held."""
        with self._lock:
            self._pool.release(match.held)
        match.held = []

    # -- for operators
    def stats(self) -> PrefixCacheStats:
        disk = self._disk
        with self._lock:
            counts = dict(self._counts)
            memory_blocks, memory_bytes, evictions = len(self._pool), self._pool.nbytes, self._pool.evictions
        return PrefixCacheStats(
            **counts,
            evictions=evictions,
            memory_blocks=memory_blocks,
            memory_bytes=memory_bytes,
            disk_hits=disk.reads if disk is not None else 0,
            disk_writes=disk.writes if disk is not None else 0,
            disk_corrupt=disk.corrupt if disk is not None else 0,
            disk_evictions=disk.evictions if disk is not None else 0,
            disk_blocks=len(disk) if disk is not None else 0,
            disk_bytes=disk.nbytes if disk is not None else 0,
        )

    def reset(self, *, disk: bool = True) -> int:
        """Drop every block no request holds (on disk too, unless ``disk=False``); how many memory blocks went."""
        with self._lock:
            dropped = self._pool.clear()
        if disk and self._disk is not None:
            self._disk.clear()
        return dropped

    def flush(self) -> None:
        """Wait until the disk tier has written every queued block."""
        if self._disk is not None:
            self._disk.flush()

    def close(self) -> None:
        if self._disk is not None:
            self._disk.flush()
            self._disk.close()


def _usable_blocks(prompt: PromptEmbedding, n_tokens: int, size: int) -> int:
    """Blocks a hit may restore: all but the prompt's last token, and never ending inside a span that attends
    both ways (its early tokens must be computed together with its later ones)."""
    n = (n_tokens - 1) // size
    groups = prompt.attention_groups
    if groups is None or n == 0:
        return n
    row = np.asarray(groups)[0]
    while n > 0 and row[n * size] >= 0 and row[n * size] == row[n * size - 1]:
        n -= 1
    return n


def _first_media_position(model: GenerativeModel, inputs: Mapping[str, mx.array], prompt: PromptEmbedding) -> int:
    """The first position whose embedding is not its token's (there media features were merged in); 0 where
    that cannot be told (the embeddings differ in shape, or everywhere): the media digest then keys every block."""
    plain = model.embed_tokens(inputs["input_ids"])
    embedded = prompt.inputs_embeds
    if plain.shape != embedded.shape:
        return 0
    differs = mx.any(plain != embedded, axis=-1)[0]
    first = int(mx.argmax(differs).item())
    return first if bool(differs[first].item()) else 0


def _boundary_state(match: PrefixMatch, layers: list[Cache], kinds: tuple) -> Block | None:
    """The whole-state layers' arrays at ``match.snapshot_at``, where every one of them kept them there."""
    if not match.snapshot_at:
        return None
    arrays: list[list[mx.array]] = []
    for layer in layers:
        if layer.splits_into_blocks:
            arrays.append([])
            continue
        kept = layer.snapshot  # type: ignore[attr-defined]
        if kept is None or kept[0] != match.snapshot_at:
            return None
        arrays.append(list(kept[1]))
    return Block(arrays, kinds)


def _meta_without_offset(layer: Cache) -> str:
    meta = dict(layer.meta_state)
    meta.pop("offset", None)
    return json.dumps(meta, sort_keys=True)


def _rebuild(fresh: list[Cache], blocks: list[Block], n_tokens: int, whole: Block | None = None) -> list[Cache]:
    """Each layer's cache from its arrays in ``blocks``, joined along the token axis (a whole-state layer's
    from ``whole``, its state at the end of the blocks)."""
    layers: list[Cache] = []
    for i, layer in enumerate(fresh):
        if layer.splits_into_blocks:
            state = joined_layer(blocks, i)
        else:
            assert whole is not None, "a whole-state layer restored without its state"
            state = list(whole.layers[i])
        meta = {**json.loads(blocks[0].kinds[i][1]), "offset": str(n_tokens)}
        layers.append(type(layer).from_state(state, meta))
    return layers
