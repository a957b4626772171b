"""Scaled dot-product attention, routed around a per-shape cost of MLX's CUDA backend.

On CUDA, ``mx.fast.scaled_dot_product_attention`` with more than one query runs through cuDNN, which builds
and plans a graph for every new pair of query and key lengths: about 90 ms on the H200, more than
prefilling 8k tokens of a 2B model. A few queries over a long cache (the rest of a prompt after a prefix-cache
hit, a speculative verify pass) meet a new pair almost every time, so for those this module computes attention
with two matrix products and a softmax instead (what MLX itself does on the CPU). One query (decode) and long
chunks keep MLX's kernels; Metal and the CPU are untouched.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx

__all__ = ["SHORT_QUERIES", "attention", "attention_by_products"]

SHORT_QUERIES = 64
"""At most this many queries go through the matrix products on CUDA."""
_MAX_SCORE_BYTES = 512 * 2**20
"""... and only while their float32 scores stay this small (a very long cache keeps MLX's kernel)."""


@cache
def _cuda() -> bool:
    return bool(getattr(mx, "cuda", None) and mx.cuda.is_available())


def attention(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` (queries (B, Hq, L, D), keys/values (B, Hkv, T, D)), through
    ``attention_by_products`` where MLX's kernel would plan a graph per shape."""
    batch, heads, n_queries, _ = queries.shape
    if (
        1 < n_queries <= SHORT_QUERIES
        and _cuda()
        and mx.default_device() == mx.gpu
        and 4 * batch * heads * n_queries * keys.shape[2] <= _MAX_SCORE_BYTES
    ):
        return attention_by_products(queries, keys, values, scale=scale, mask=mask)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def attention_by_products(
    queries: mx.array, keys: mx.array, values: mx.array, *, scale: float, mask: mx.array | str | None = None
) -> mx.array:
    """Attention as ``softmax(q k^T * scale + mask) v`` computed in float32; grouped-query heads share
    their key/value head without copies. ``mask``: None, ``"causal"`` (the queries are the last L of the T
    positions), a boolean array (True attends) or an additive one, broadcastable to (B, Hq, L, T)."""
    batch, heads, n_queries, dim = queries.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    # The group's queries stacked on the query axis: one plain product per key/value head, no broadcasting.
    # Float32 throughout, as attention kernels accumulate (scores rounded to half precision move the output by
    # several of its own roundings); a few queries make the casts cheap next to reading the cache.
    q = (queries.astype(mx.float32) * scale).reshape(batch, kv_heads, group * n_queries, dim)
    scores = (q @ keys.astype(mx.float32).swapaxes(-1, -2)).reshape(batch, kv_heads, group, n_queries, n_keys)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        rows = mx.arange(n_keys - n_queries, n_keys)[:, None]
        scores = mx.where(rows >= mx.arange(n_keys)[None], scores, -mx.inf)
    elif mask is not None:
        grouped = _grouped(mask, kv_heads, group)
        scores = mx.where(grouped, scores, -mx.inf) if grouped.dtype == mx.bool_ else scores + grouped
    weights = mx.softmax(scores, axis=-1).reshape(batch, kv_heads, group * n_queries, n_keys)
    out = weights @ values.astype(mx.float32)
    return out.reshape(batch, heads, n_queries, values.shape[-1]).astype(queries.dtype)


def _grouped(mask: mx.array, kv_heads: int, group: int) -> mx.array:
    """A mask broadcastable to (B, Hq, L, T) as one broadcastable to (B, Hkv, G, L, T)."""
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(mask.shape[0], kv_heads, group, *mask.shape[2:])
