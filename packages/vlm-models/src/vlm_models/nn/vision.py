"""Vision transformer pieces shared by the families, and the step that merges media features into text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from vlm_runtime.masks import block_diagonal_mask
from vlm_runtime.vision_cache import VisionFeatureCache, content_key, model_identity

from .rope import apply_rotary

__all__ = [
    "EqualSegments",
    "GroupedSegments",
    "VisionAttention",
    "VisionBlock",
    "features_per_image",
    "image_groups",
    "merge_features",
    "segment_mask",
    "vision_identity",
]


@dataclass(frozen=True)
class EqualSegments:
    """Attention within consecutive runs of ``size`` tokens (a video's frames, all of one size): each run attends
    as a batch row of its own, so the cost grows with the tokens rather than with their square."""

    size: int


@dataclass(frozen=True)
class GroupedSegments:
    """Attention within segments of a few different lengths (a training batch of pictures of several sizes):
    the segments of each length attend as batch rows of their own, so no n x n mask is built."""

    groups: tuple[tuple[int, mx.array], ...]
    """``(length, token indices)``: the indices of all segments of that length, segment after segment."""
    order: mx.array
    """Where each token lands in the groups' concatenated outputs (the inverse of their index order)."""


SegmentMask = Union[mx.array, EqualSegments, GroupedSegments, None]  # noqa: UP007
"""How a flat sequence's attention is restricted: an (n, n) boolean mask, equal or grouped segments, or not at
all."""

DENSE_MASK_LIMIT = 512
"""Above this many tokens, segments of unequal lengths attend by length group instead of through an n x n mask."""


def segment_mask(boundaries: Sequence[int]) -> SegmentMask:
    """Attention within the segments ``[b[i], b[i+1])``: equal segments where they all have one length (no n x n
    mask is built), segments grouped by length where there are more than :data:`DENSE_MASK_LIMIT` tokens, else
    the block-diagonal mask (None for one segment)."""
    bounds = np.asarray(boundaries)
    lengths = np.diff(bounds)
    if len(lengths) > 1 and lengths[0] > 0 and (lengths == lengths[0]).all():
        return EqualSegments(int(lengths[0]))
    if len(lengths) > 1 and int(bounds[-1] - bounds[0]) > DENSE_MASK_LIMIT and bounds[0] == 0:
        groups, order = [], []
        for length in np.unique(lengths[lengths > 0]):
            starts = bounds[:-1][lengths == length]
            indices = (starts[:, None] + np.arange(length)[None, :]).reshape(-1)
            groups.append((int(length), mx.array(indices.astype(np.int32))))
            order.append(indices)
        inverse = np.empty(int(bounds[-1]), dtype=np.int32)
        inverse[np.concatenate(order)] = np.arange(int(bounds[-1]), dtype=np.int32)
        return GroupedSegments(tuple(groups), mx.array(inverse))
    return block_diagonal_mask(list(boundaries))


class VisionAttention(nn.Module):
    """Attention over a flat (tokens, dim) sequence with a fused qkv projection and optional 2D rotary."""

    def __init__(self, dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: SegmentMask) -> mx.array:
        """``cos``/``sin``: (n, head_dim); ``mask``: (n, n) boolean, equal segments, or None for attention over
        everything."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        # Rotate in the projection's own (n, heads, head_dim) layout, then move heads first for attention (each
        # equal segment a batch row of its own).
        rows, size = (n // mask.size, mask.size) if isinstance(mask, EqualSegments) else (1, n)

        def heads_first(t: mx.array) -> mx.array:
            return t.reshape(rows, size, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        if isinstance(mask, GroupedSegments):
            return self.proj(self._grouped(qkv, cos, sin, mask).reshape(n, -1))
        q = heads_first(apply_rotary(qkv[:, 0], cos[:, None], sin[:, None]))
        k = heads_first(apply_rotary(qkv[:, 1], cos[:, None], sin[:, None]))
        dense = None if isinstance(mask, EqualSegments) else mask
        out = mx.fast.scaled_dot_product_attention(q, k, heads_first(qkv[:, 2]), scale=self.head_dim**-0.5, mask=dense)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(n, -1))

    def _grouped(self, qkv: mx.array, cos: mx.array, sin: mx.array, mask: GroupedSegments) -> mx.array:
        q = apply_rotary(qkv[:, 0], cos[:, None], sin[:, None])
        k = apply_rotary(qkv[:, 1], cos[:, None], sin[:, None])
        v = qkv[:, 2]
        outputs = []
        for length, indices in mask.groups:

            def rows(t: mx.array, length: int = length, indices: mx.array = indices) -> mx.array:
                return t[indices].reshape(-1, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

            out = mx.fast.scaled_dot_product_attention(rows(q), rows(k), rows(v), scale=self.head_dim**-0.5)
            outputs.append(out.transpose(0, 2, 1, 3).reshape(-1, self.num_heads, self.head_dim))
        return mx.concatenate(outputs)[mask.order]


class VisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm()
        self.norm2 = norm()
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: SegmentMask) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


def merge_features(
    inputs_embeds: mx.array, input_ids: mx.array, token_id: int, features: mx.array, kind: str = "image"
) -> mx.array:
    """Put ``features`` (n, hidden), in order, at the positions of ``token_id`` in ``input_ids`` (batch, length)."""
    slots = input_ids == token_id
    n_slots = int(slots.sum().item())
    if n_slots != features.shape[0]:
        raise ValueError(
            f"the prompt has {n_slots} {kind} tokens but the {kind}s give {features.shape[0]} features; "
            f"the prompt and the {kind} inputs do not belong together"
        )
    if n_slots == 0:
        return inputs_embeds
    index = mx.maximum(mx.cumsum(slots.reshape(-1).astype(mx.int32)) - 1, 0)
    gathered = features.astype(inputs_embeds.dtype)[index].reshape(inputs_embeds.shape)
    return mx.where(slots[..., None], gathered, inputs_embeds)


def features_per_image(
    vision_cache: VisionFeatureCache | None,
    contents: Sequence[tuple[Any, ...]],
    identity: Callable[[], str],
    encode: Callable[[list[int]], list[mx.array]],
) -> list[mx.array]:
    """Each image's features, through the vision feature cache where there is one.

    ``encode(indices)`` runs the family's tower over the images at ``indices`` and returns their features, one
    array per image. ``contents[i]`` is what decides image i's features besides the model (its pixels, grid,
    patch mask ...); ``identity()`` names the model (``vision_identity``). Without a cache this is one
    ``encode`` over every image; with one, images seen before come from it and one ``encode`` call computes the
    rest (an image repeated in the prompt is computed once).
    """
    if vision_cache is None:
        return encode(list(range(len(contents))))
    model = identity()
    return _cached_per_image([content_key(*parts, model) for parts in contents], vision_cache, encode)


def _cached_per_image(
    keys: list[str], vision_cache: VisionFeatureCache, compute: Callable[[list[int]], list[mx.array]]
) -> list[mx.array]:
    found: dict[str, mx.array] = {}
    missing: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in found or key in missing:
            continue
        cached = vision_cache.get(key)
        if cached is None:
            missing[key] = i
        else:
            found[key] = cached
    if missing:
        for key, features in zip(missing, compute(list(missing.values()))):
            found[key] = features
            vision_cache.put(key, features)
    return [found[key] for key in keys]


def vision_identity(model: nn.Module, vision_config: Any, dtype: mx.Dtype, patch_embedding: nn.Module) -> str:
    """What besides the pixels decides a model's vision features: its class, the vision config, the weights'
    dtype, and a digest of the (small) patch-embedding weights, so two checkpoints of one architecture sharing a
    cache never collide. Swapped weights give a new digest, so they never serve stale features."""
    patch_weights = [value for _, value in tree_flatten(patch_embedding.parameters())]
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    return model_identity(model, patch_weights, model_class, repr(vision_config), str(dtype))


def image_groups(input_ids: np.ndarray, image_token_id: int | Sequence[int]) -> np.ndarray | None:
    """(batch, length) group ids: each run of image tokens (``image_token_id``, or any of several) is one group
    (0, 1, ... per row), text is -1. None when the prompt has no image tokens."""
    is_image = np.isin(input_ids, image_token_id)
    if not is_image.any():
        return None
    starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int32)
